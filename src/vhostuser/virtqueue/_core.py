"""The one indirection point between the virtqueue classes and a ring core.

:func:`get_core` returns the module implementing the core contract of
docs/ring-core.md.  For now it is always the pure-Python core; the native core
(selected by :mod:`vhostuser._impl`) will be returned from here once it exists,
and nothing else in the package needs to change.
"""
from __future__ import annotations

from types import ModuleType

from . import _pycore

__all__ = ["get_core"]


def get_core() -> ModuleType:
    """The ring core in use (module with QueueState, ChainBatch, pop_batch, ...)."""
    return _pycore
