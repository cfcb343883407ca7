"""
The documentation's links stay inside the repository and lead somewhere:
every relative link in README.md and docs/*.md names a file or folder of the
checkout, and every #anchor names a heading of its target, as GitHub spells
heading anchors.
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
