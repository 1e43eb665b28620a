"""Builds the C modules (aserver/native.py) when a compiler is there; without one aserver
installs and runs on their pure-Python equivalents. Metadata: pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("aserver.ipc._ring_core", ["aserver/ipc/_ring_core.c"], optional=True),
        Extension("aserver.worker._inline", ["aserver/worker/_inline.c"], optional=True),
        Extension("aserver.conn._conn_core", ["aserver/conn/_conn_core.c"], optional=True),
    ]
)
