"""
The import rule of docs/development.md ("Module map"), checked on every
import statement of every module under C{relay/}, those inside functions
too: the server never imports the relay-client, the relay-client never
imports the server, and a shared module (anything outside C{relay/server}
and C{relay/client}) imports neither. So each side loads only itself and
what is shared, and a change to one side cannot break the other through a
back door. The subpackages of C{relay}, and its modules, import each other
without a cycle.
"""

import ast
import os
import subprocess
import sys
from typing import Dict, Iterator, List, Set, Tuple

import pytest
from twisted.trial import unittest

import relay

ROOT = os.path.dirname(os.path.abspath(relay.__file__))
SIDES = ("relay.server", "relay.client")


def module_name(path: str) -> str:
    """relay/server/admin/web.py -> relay.server.admin.web; a package's __init__.py -> the package."""
    relative = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")]
    parts = relative.split(os.sep)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Iterator[Tuple[str, str]]:
    """(name, path) of every module under relay/."""
    for folder, _, files in os.walk(ROOT):
        for file in sorted(files):
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                yield module_name(path), path


def type_checking_only(tree: ast.AST) -> Set[ast.AST]:
    """The nodes under C{if TYPE_CHECKING:}, which never run."""
    hidden: Set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                for child in node.body:
                    hidden.update(ast.walk(child))
    return hidden


def imported(name: str, source: str, is_package: bool = False, at_run_time: bool = False) -> List[Tuple[int, str]]:
    """
    (line, module) for each module of C{relay} that C{source}, the module
    C{name}, imports anywhere: C{from a.b import c} counts as both C{a.b}
    and C{a.b.c}, since C{c} may be a module. With C{at_run_time}, not the
    imports that only a type checker reads (C{if TYPE_CHECKING:}).
    """
    found: List[Tuple[int, str]] = []
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(source)
    hidden = type_checking_only(tree) if at_run_time else set()
    for node in ast.walk(tree):
        if node in hidden:
            continue
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found.extend((node.lineno, base + "." + alias.name) for alias in node.names if alias.name != "*")
    return [(line, target) for line, target in found if target == "relay" or target.startswith("relay.")]


def side(name: str) -> str:
    for prefix in SIDES:
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return "shared"


def violations(name: str, targets: List[Tuple[int, str]]) -> List[str]:
    """The imports of module C{name} that break the rule, as C{module:line -> target}."""
    mine = side(name)
    out = []
    for line, target in targets:
        theirs = side(target)
        if theirs != "shared" and theirs != mine:
            out.append("%s:%d -> %s" % (name, line, target))
    return sorted(out)


def unit(name: str) -> str:
    """The subpackage (or top-level module) of relay that C{name} belongs to."""
    return ".".join(name.split(".")[:2])


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The cycles of a directed graph, each once, as found by a depth-first walk."""
    found: List[List[str]] = []
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for other in sorted(edges.get(node, ())):
            if state.get(other) == 1:
                found.append(path[path.index(other) :] + [other])
            elif other not in state:
                visit(other)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.mark.memory
class LayerTests(unittest.SynchronousTestCase):
    def test_the_walk_sees_both_sides_and_the_shared_packages(self):
        names = {name for name, _ in modules()}
        for name in ("relay.server.forward", "relay.client.tap", "relay.outbound.h2", "relay.net.transport"):
            self.assertIn(name, names)

    def test_no_side_imports_the_other_and_shared_modules_import_neither(self):
        offenders = []
        for name, path in modules():
            targets = imported(name, read(path), path.endswith("__init__.py"))
            offenders.extend(violations(name, targets))
        self.assertEqual(offenders, [])

    def test_no_cycle_between_the_subpackages(self):
        edges: Dict[str, Set[str]] = {}
        for name, path in modules():
            for _, target in imported(name, read(path), path.endswith("__init__.py")):
                if target != "relay" and unit(target) != unit(name) and unit(name) != "relay":
                    edges.setdefault(unit(name), set()).add(unit(target))
        self.assertEqual(cycles(edges), [])

    def test_no_cycle_between_modules(self):
        """
        Not even one hidden inside a function. Annotations may name a module
        that imports this one (C{if TYPE_CHECKING:}): that import never runs.
        """
        names = {name for name, _ in modules()}
        edges: Dict[str, Set[str]] = {}
        for name, path in modules():
            for _, target in imported(name, read(path), path.endswith("__init__.py"), at_run_time=True):
                if target in names and target != name:
                    edges.setdefault(name, set()).add(target)
        self.assertEqual(cycles(edges), [])


@pytest.mark.process
class LoadedTests(unittest.TestCase):
    """What the rule is for: starting one side loads nothing of the other."""

    def loaded(self, module: str, prefix: str):
        code = "import sys, %s; print(sorted(m for m in sys.modules if m.startswith(%r)))" % (module, prefix)
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=os.path.dirname(ROOT), capture_output=True, text=True, check=True
        ).stdout
        return out.strip()

    def test_the_server_loads_nothing_of_the_client(self):
        self.assertEqual(self.loaded("relay.server.tap", "relay.client"), "[]")

    def test_the_client_loads_nothing_of_the_server(self):
        self.assertEqual(self.loaded("relay.client.tap", "relay.server"), "[]")


@pytest.mark.memory
class CheckerTests(unittest.SynchronousTestCase):
    """The checks above would catch what they are for."""

    def test_function_level_and_relative_imports_count(self):
        source = (
            "import os\n"
            "def later():\n"
            "    from relay.client.backend import BackendTarget\n"
            "from ..client import tap\n"
            "from . import forward\n"
        )
        targets = imported("relay.server.site", source)
        self.assertEqual(
            violations("relay.server.site", targets),
            [
                "relay.server.site:3 -> relay.client.backend",
                "relay.server.site:3 -> relay.client.backend.BackendTarget",
                "relay.server.site:4 -> relay.client",
                "relay.server.site:4 -> relay.client.tap",
            ],
        )
        self.assertIn((5, "relay.server.forward"), targets)

    def test_a_shared_module_may_import_neither_side(self):
        targets = imported("relay.tracing", "from relay.server import broker\nimport relay.headers\n")
        self.assertEqual(
            violations("relay.tracing", targets),
            ["relay.tracing:1 -> relay.server", "relay.tracing:1 -> relay.server.broker"],
        )

    def test_cycles_are_found(self):
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c", "a"]])
        self.assertEqual(cycles({"a": {"b"}, "b": set()}), [])

    def test_imports_for_the_type_checker_only_count_for_layers_not_cycles(self):
        source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from relay.client import tap\n"
        self.assertEqual(
            violations("relay.server.site", imported("relay.server.site", source)),
            ["relay.server.site:3 -> relay.client", "relay.server.site:3 -> relay.client.tap"],
        )
        self.assertEqual(imported("relay.server.site", source, at_run_time=True), [])
