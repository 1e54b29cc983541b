"""Bundled device back-ends, each a short module built only on the public API.

Each device is also a command: ``vhostuser <device> --help``.
"""
