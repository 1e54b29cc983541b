"""The one indirection point between the virtqueue classes and a ring core.

:func:`get_core` returns the module implementing the core contract of
docs/ring-core.md: the C core (:mod:`._nativecore`, over the cffi extension)
when :mod:`vhostuser._impl` chose ``native``, else the pure-Python reference
(:mod:`._pycore`).  No other module looks at the implementation choice.
"""
from __future__ import annotations

from types import ModuleType

from .. import _impl

__all__ = ["get_core"]

_CORE: ModuleType
if _impl.IMPL == "native":
    from . import _nativecore

    _CORE = _nativecore
else:
    from . import _pycore

    _CORE = _pycore


def get_core() -> ModuleType:
    """The ring core in use (module with QueueState, ChainBatch, pop_batch, ...)."""
    return _CORE
