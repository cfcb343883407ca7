"""
Small file helpers for tests that write configuration files the relay reloads.
"""

import os


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    # A new mtime even within the same clock tick: reloads key on it.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000000))
