from setuptools import find_packages, setup

# Debian's PyPy is Python 3.9: the newest cryptography with a PyPy 3.9 wheel
# is 43.x (newer ones would need a Rust build). Twisted 26.4 itself installs
# there, but its TLS extra (which we and the tests' treq need) wants pyOpenSSL
# >= 25.2, hence cryptography >= 45; without it pip falls back to a 2015 treq. So PyPy
# gets Twisted 25.5, the newest whose TLS extra fits cryptography 43.
PYPY39 = 'platform_python_implementation == "PyPy" and python_version < "3.10"'

# Distributed tracing (relay/tracing.py, docs/deploying.md): OpenTelemetry's
# SDK, its OTLP/HTTP exporter and the B3 propagator. 1.41 is the newest
# release that still installs on PyPy 3.9 (Python 3.9).
TRACING = [
    "opentelemetry-api>=1.41,<2",
    "opentelemetry-sdk>=1.41,<2",
    "opentelemetry-exporter-otlp-proto-http>=1.41,<2",
    "opentelemetry-propagator-b3>=1.41,<2",
]

setup(
    name="relay",
    version="0.1.0",
    description=(
        "A multiplexing HTTP relay server and client on Twisted, wire-compatible "
        "with the Cloud Robotics Go http-relay"
    ),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["relay", "relay.*"]) + ["twisted.plugins"],
    # Says the packages live at the top of the checkout, as they would by
    # default, so that `pip install -e .` puts the checkout on sys.path (a
    # .pth line) instead of setuptools' import hook. Twisted finds plugins
    # by scanning sys.path for twisted/plugins/ folders, which the hook
    # hides: `twistd relay` would be an "Unknown command".
    package_dir={"": "."},
    package_data={"relay.proto": ["*.proto"], "relay.server.admin": ["static/*"]},
    python_requires=">=3.9",
    install_requires=[
        "twisted[tls,http2]>=24.7",
        "protobuf>=4.21.6",
        "prometheus_client>=0.21",
        # The lean HTTP/1.1 engine (relay/http1_engine.py): llhttp, the C
        # parser of Node.js, for the relay's three exchanges per request.
        # CPython only: on PyPy it goes through cpyext, slower than
        # twisted.web's Python under the JIT, and Debian's PyPy cannot build
        # it (no headers without pypy3-dev); PyPy keeps twisted.web's engine.
        'httptools>=0.6; platform_python_implementation != "PyPy"',
        "cryptography<44; " + PYPY39,
        "twisted<26; " + PYPY39,
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "treq>=24.9",  # the tests' HTTP client, and StubTreq for in-memory cases
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            "pyyaml",  # tests/test_deploy.py parses deploy/ manifests
            'grpcio; platform_python_implementation != "PyPy"',
            # tests/test_tracing.py runs the relay traced and decodes the
            # spans it exports.
            "opentelemetry-proto>=1.41,<2",
            # .ci/run lints and type-checks; mypy cannot run on PyPy and
            # mypy 2 no longer targets Python 3.9.
            "ruff>=0.17,<0.18",
            'mypy>=1.20,<2; platform_python_implementation != "PyPy"',
            'mypy-zope>=1.0.17; platform_python_implementation != "PyPy"',
        ]
        + TRACING,
        "tracing": TRACING,
    },
    classifiers=[
        "Framework :: Twisted",
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: Implementation :: CPython",
        "Programming Language :: Python :: Implementation :: PyPy",
    ],
)
