"""Test helpers shipped with vhostuser: mock front-end, the QEMU guest rig
(:mod:`vhostuser.testing.guest`), pytest fixtures
(:mod:`vhostuser.testing.pytest_plugin`), the conformance checker
(:mod:`vhostuser.testing.checker`) and an echo test device."""
from __future__ import annotations

from .driver_memory import GuestRam, RamRegion
from .echo import EchoBackend
from .frontend import FrontendOptions, MockFrontend, MockFrontendReqHandler, UsedBuffer

__all__ = [
    "EchoBackend",
    "FrontendOptions",
    "GuestRam",
    "MockFrontend",
    "MockFrontendReqHandler",
    "RamRegion",
    "UsedBuffer",
]
