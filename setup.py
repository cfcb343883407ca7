from setuptools import find_packages, setup

setup(
    name="relay",
    version="0.1.0",
    description=(
        "A multiplexing HTTP relay server and client on Twisted, wire-compatible "
        "with the Cloud Robotics Go http-relay"
    ),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["relay", "relay.*"]) + ["twisted.plugins"],
    package_data={"relay.proto": ["*.proto"]},
    python_requires=">=3.9",
    install_requires=[
        "twisted>=23.10",
        "treq>=23.11",
        "protobuf>=4.21.6",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: Implementation :: CPython",
        "Programming Language :: Python :: Implementation :: PyPy",
    ],
)
