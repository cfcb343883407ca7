"""
The documentation's links stay inside the repository and lead somewhere:
every relative link in README.md and docs/*.md names a file or folder of the
checkout, and every #anchor names a heading of its target, as GitHub spells
heading anchors. The flag tables of docs/server.md and docs/client.md list
the flags C{--help} prints, with the config's defaults.
"""

import glob
import os
import re
from urllib.parse import unquote

import pytest
from twisted.trial import unittest

pytestmark = pytest.mark.memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def pages():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def links(text: str):
    """The targets of the Markdown links in C{text}, outside code."""
    text = _FENCE.sub("", text)
    text = _CODE.sub("", text)
    return _LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str):
    seen, result = {}, set()
    for _, heading in _HEADING.findall(_FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else "%s-%d" % (base, n))
    return result


class HelperTests(unittest.SynchronousTestCase):
    def test_slug(self):
        self.assertEqual(slug("HTTP/2 and gRPC"), "http2-and-grpc")
        self.assertEqual(slug("`relay.tac`"), "relaytac")
        self.assertEqual(slug("Where we differ from the Go server"), "where-we-differ-from-the-go-server")

    def test_links_skip_code(self):
        text = "[a](x.md) `[b](y.md)`\n```\n[c](z.md)\n```\n![d](img.png \"t\")"
        self.assertEqual(links(text), ["x.md", "img.png"])

    def test_duplicate_headings(self):
        self.assertEqual(anchors("# A\n## A\n"), {"a", "a-1"})


class LinkTests(unittest.SynchronousTestCase):
    def test_pages_exist(self):
        names = {os.path.relpath(p, ROOT) for p in pages()}
        for name in (
            "README.md",
            "docs/protocol.md",
            "docs/server.md",
            "docs/client.md",
            "docs/deploying.md",
            "docs/security.md",
            "docs/performance.md",
            "docs/development.md",
        ):
            self.assertIn(name, names)
        self.assertTrue(os.path.exists(os.path.join(ROOT, "LICENSE")))

    def test_relative_links_resolve_inside_the_repository(self):
        problems = []
        checked = 0
        for page in pages():
            with open(page, encoding="utf-8") as f:
                text = f.read()
            here = os.path.relpath(page, ROOT)
            for target in links(text):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                    continue  # http:, https:, mailto:: not a file of ours
                path, _, anchor = target.partition("#")
                checked += 1
                if not path:
                    resolved = page
                else:
                    resolved = os.path.normpath(os.path.join(os.path.dirname(page), unquote(path)))
                rel = os.path.relpath(resolved, ROOT)
                if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(path):
                    problems.append("%s: %s points outside the repository" % (here, target))
                    continue
                if not os.path.exists(resolved):
                    problems.append("%s: %s does not exist" % (here, target))
                    continue
                if anchor and resolved.endswith(".md"):
                    with open(resolved, encoding="utf-8") as f:
                        if anchor not in anchors(f.read()):
                            problems.append("%s: no heading for #%s in %s" % (here, anchor, rel))
        self.assertGreater(checked, 20)
        self.assertEqual(problems, [])

    def test_no_mention_of_files_outside(self):
        """Prose must not send readers to ../shared either."""
        for page in pages():
            with open(page, encoding="utf-8") as f:
                text = f.read()
            self.assertNotIn("PROTOCOL.md", text, page)

    def test_module_map_lists_every_module_once(self):
        """
        docs/development.md's module map is one line per module of relay/,
        and names no module that is gone.
        """
        with open(os.path.join(ROOT, "docs", "development.md"), encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("## Module map"):text.index("Elsewhere:")]
        mapped = []
        for target in links(section):
            path = os.path.normpath(os.path.join(ROOT, "docs", target))
            if path.endswith(".py"):
                mapped.append(os.path.relpath(path, ROOT))
        modules = sorted(
            os.path.relpath(path, ROOT)
            for path in glob.glob(os.path.join(ROOT, "relay", "**", "*.py"), recursive=True)
            if os.path.basename(path) != "__init__.py"
        )
        self.assertEqual(sorted(mapped), modules)


def flag_table(path: str):
    """C{[(flag, default cell)]} of the C{| flag | default | meaning |} table of a page."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = lines.index("| flag | default | meaning |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((re.fullmatch(r"`--([^`]+)`", cells[0]).group(1), cells[1]))
    return rows


def same_default(documented: str, expected: str) -> bool:
    """Equal, or the same Go duration (C{60s} for the config's C{1m0s})."""
    from relay.durations import parse_duration

    if documented == expected:
        return True
    try:
        return parse_duration(documented) == parse_duration(expected)
    except ValueError:
        return False


class FlagTables(unittest.SynchronousTestCase):
    """
    docs/server.md's and docs/client.md's flag tables against the option
    tables that C{--help} prints: every flag, no other, and each default as
    the config holds it (the first C{`value`} of the cell; a flag with no
    default has none).
    """

    def check(self, path, options_class, config_class):
        from relay.config import flag_default

        table = flag_table(path)
        documented = [flag for flag, _ in table]
        self.assertEqual(sorted(documented), sorted(set(documented)), "%s lists a flag twice" % (path,))
        flags = [row[0] for row in options_class.optParameters]
        on_off = [row[0] for row in getattr(options_class, "optFlags", [])]
        self.assertEqual(sorted(documented), sorted(flags + on_off), path)
        wrong = []
        for flag, cell in table:
            code = re.match(r"`([^`]*)`", cell)
            if flag in on_off:
                expected = None
                ok = cell == "off"
            else:
                expected = flag_default(config_class, flag)
                if expected in (None, ""):
                    ok = code is None
                else:
                    ok = code is not None and same_default(code.group(1), str(expected))
            if not ok:
                wrong.append("--%s: the docs say %s, the config %r" % (flag, cell, expected))
        self.assertEqual(wrong, [], path)

    def test_server(self):
        from relay.config import ServerConfig
        from relay.server.tap import Options

        self.check("docs/server.md", Options, ServerConfig)

    def test_client(self):
        from relay.client.tap import Options
        from relay.config import ClientConfig

        self.check("docs/client.md", Options, ClientConfig)

    def test_help_prints_every_documented_flag(self):
        """The tables' flags are the ones C{--help} prints, with its defaults."""
        from relay.client.tap import Options as ClientOptions
        from relay.server.tap import Options as ServerOptions

        for path, options_class in (("docs/server.md", ServerOptions), ("docs/client.md", ClientOptions)):
            text = str(options_class())
            for flag, _ in flag_table(path):
                self.assertRegex(text, r"--%s[ =]" % (re.escape(flag),), path)
