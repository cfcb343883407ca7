"""The start-up advice for PyPy's GC nursery: given once, on PyPy only, and only when it is needed."""

import platform

import pytest
from twisted.logger import Logger, eventAsText
from twisted.trial import unittest

from relay.tuning import pypy_gc

pytestmark = pytest.mark.memory


class NurseryAdviceTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        self.log = Logger(observer=self.events.append)

    def on_pypy(self):
        self.patch(platform, "python_implementation", lambda: "PyPy")

    def test_pypy_without_the_setting_is_told_what_to_set(self):
        self.on_pypy()
        self.patch(pypy_gc.os, "environ", {})
        pypy_gc.log_nursery_advice(self.log)
        self.assertEqual(len(self.events), 1)
        self.assertIn(
            "PYPY_GC_NURSERY=" + pypy_gc.RECOMMENDED_NURSERY, eventAsText(self.events[0], includeTimestamp=False)
        )

    def test_pypy_with_the_setting_says_nothing(self):
        self.on_pypy()
        self.patch(pypy_gc.os, "environ", {"PYPY_GC_NURSERY": "32MB"})
        pypy_gc.log_nursery_advice(self.log)
        self.assertEqual(self.events, [])

    def test_cpython_says_nothing(self):
        self.patch(platform, "python_implementation", lambda: "CPython")
        self.patch(pypy_gc.os, "environ", {})
        pypy_gc.log_nursery_advice(self.log)
        self.assertEqual(self.events, [])
