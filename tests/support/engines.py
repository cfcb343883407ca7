"""
Running tests on each HTTP/1.1 engine (L{relay.http1_engine}): a test module
that speaks HTTP/1.1 to the server or through the relay-client's agent ends
with C{on_each_engine(globals())}.
"""

from twisted.trial import unittest

from relay import http1_engine


def on_each_engine(namespace: dict) -> None:
    """
    Run every test case class defined in the module whose C{globals()} is
    C{namespace} on each HTTP/1.1 engine: the class as written runs on
    httptools (skipped where it is not installed), and a twin named
    C{...OnTwistedWeb} on twisted.web's engine. Every server and
    relay-client built in the test (by the test or by the code) gets its
    engine from C{http1_engine.resolve}, which the test replaces.
    """
    module = namespace["__name__"]
    for name, value in list(namespace.items()):
        if not (isinstance(value, type) and issubclass(value, unittest.TestCase)):
            continue
        if value.__module__ != module or "http1_engine" in value.__dict__:
            continue
        value.http1_engine = "httptools"
        _force_engine(value)
        twin = type(name + "OnTwistedWeb", (value,), {"http1_engine": "twisted", "__module__": module})
        namespace[twin.__name__] = twin


def _force_engine(cls) -> None:
    set_up = cls.setUp

    def setUp(self, *args, **kwargs):
        engine = self.http1_engine
        if engine == "httptools" and not http1_engine.available():
            raise unittest.SkipTest("httptools is not installed for this interpreter")
        self.patch(http1_engine, "resolve", lambda choice, implementation=None: engine)
        return set_up(self, *args, **kwargs)

    cls.setUp = setUp
