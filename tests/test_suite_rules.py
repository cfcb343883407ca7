"""
The test suite's own rules, read from the source: a test module imports
helpers from C{tests.support}, never from another test module (so running
one module never runs or depends on another), and every test declares
exactly one tier (C{memory}, C{socket} or C{process}) so
C{pytest -m memory} is the fast, socket-free run. Also the ports tests
reserve for servers in other processes: distinct, and held until used.
"""

import ast
import glob
import os
import socket

import pytest
from twisted.internet import protocol, reactor
from twisted.trial import unittest

from tests.support.ports import reserve_ports
from tests.support.process import ROOT

TIERS = ("memory", "socket", "process")


def suite_modules():
    return sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py")))


def parse(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def imported_test_modules(tree):
    """Names of C{tests.test_*} modules a module imports, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("tests.test_"):
                found.append(node.module)
            elif node.module == "tests":
                found += ["tests." + a.name for a in node.names if a.name.startswith("test_")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("tests.test_")]
    return found


def tier_marks(node):
    """The tiers C{pytest.mark.X} expressions in C{node} name."""
    return [
        n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and n.attr in TIERS and ast.unparse(n.value) == "pytest.mark"
    ]


def module_tiers(tree):
    marks = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            marks += tier_marks(node.value)
    return marks


def classes_of(tree):
    """C{{name: (bases, own tier marks, has test methods)}} for the module's classes."""
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            own = [m for d in node.decorator_list for m in tier_marks(d)]
            tests = any(
                isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")
                for n in node.body
            )
            classes[node.name] = ([ast.unparse(b) for b in node.bases], own, tests)
    return classes


def inherited(classes, cls, seen=()):
    """A class's tier marks and whether it has tests, through its bases in the same module."""
    if cls not in classes or cls in seen:
        return [], False
    bases, own, tests = classes[cls]
    marks = list(own)
    for base in bases:
        more, more_tests = inherited(classes, base, seen + (cls,))
        marks += more
        tests = tests or more_tests
    return marks, tests


@pytest.mark.memory
class NoTestImportsTest(unittest.SynchronousTestCase):
    def test_no_test_module_imports_another(self):
        offenders = {}
        for path in suite_modules() + glob.glob(os.path.join(ROOT, "tests", "support", "*.py")):
            found = imported_test_modules(parse(path))
            if found:
                offenders[os.path.relpath(path, ROOT)] = found
        self.assertEqual(offenders, {}, "shared helpers belong in tests/support/")

    def test_the_rule_sees_every_form(self):
        tree = ast.parse(
            "from tests.test_a import x\nfrom tests import test_b as b, support\nimport tests.test_c\n"
            "def f():\n    from tests.test_d import y\nfrom tests.support import z\n"
        )
        self.assertEqual(imported_test_modules(tree), ["tests.test_a", "tests.test_b", "tests.test_c", "tests.test_d"])


@pytest.mark.memory
class OneTierEachTest(unittest.SynchronousTestCase):
    def test_every_test_has_exactly_one_tier(self):
        wrong = []
        for path in suite_modules():
            tree = parse(path)
            name = os.path.relpath(path, ROOT)
            module = module_tiers(tree)
            classes = classes_of(tree)
            if len(module) > 1:
                wrong.append("%s: pytestmark names %s" % (name, module))
                continue

            for cls in classes:
                marks, tests = inherited(classes, cls)
                if module and marks:
                    wrong.append("%s: %s has a tier of its own besides the module's" % (name, cls))
                elif not module and tests and len(set(marks)) != 1:
                    wrong.append("%s: %s has tiers %s" % (name, cls, sorted(set(marks))))
            if not module and not any(inherited(classes, c)[0] for c in classes):
                wrong.append("%s: no tier (pytestmark = pytest.mark.memory, socket or process)" % (name,))
        self.assertEqual(wrong, [])

    def test_tiers_are_registered(self):
        with open(os.path.join(ROOT, "setup.cfg")) as f:
            text = f.read()
        for tier in TIERS:
            self.assertIn("\n    %s:" % (tier,), text)


@pytest.mark.socket
class ReservedPortsTest(unittest.TestCase):
    def test_distinct_refused_and_listenable(self):
        ports = reserve_ports(self, 20)
        self.assertEqual(len(set(ports)), 20)
        # Nobody listens yet: a connection is refused, not left hanging.
        with socket.socket() as s:
            self.assertNotEqual(s.connect_ex(("127.0.0.1", ports[0])), 0)
        # Nor does a bind to port 0 get one of them while they are held.
        for _ in range(200):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.assertNotIn(s.getsockname()[1], ports)
        # A server that sets SO_REUSEADDR (as Twisted does) listens on it.
        port = reactor.listenTCP(ports[0], protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().port, ports[0])
