"""vhostuser: write vhost-user device back-ends in Python.

``vhostuser.IMPL`` says which data-path implementation is live: ``"native"``
(the cffi C extension) or ``"python"`` (the pure-Python reference).  Set the
environment variable ``VHOSTUSER_IMPL`` to ``native`` or ``python`` to force one.
"""
from __future__ import annotations

import logging

from ._impl import IMPL
from .backend import VhostUserBackend
from .daemon import VhostUserDaemon
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .fd_registry import FIRST_DEVICE_TOKEN, FdRegistry
from .sys_util.poll import EVENT_ERROR, EVENT_READ, EVENT_WRITE
from .vring import VringState

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "IMPL",
    "__version__",
    "EVENT_ERROR",
    "EVENT_READ",
    "EVENT_WRITE",
    "FIRST_DEVICE_TOKEN",
    "FdRegistry",
    "VhostUserBackend",
    "VhostUserDaemon",
    "VringState",
    *_errors_all,
]
