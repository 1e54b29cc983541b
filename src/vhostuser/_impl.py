"""Choose, once, which implementation of the data path is live.

``VHOSTUSER_IMPL`` selects it:

* unset or ``auto`` - the C extension if it was built, else pure Python;
* ``native`` - the C extension; an :class:`~vhostuser.errors.ImplementationUnavailable`
  (an ``ImportError``) if it is missing - never a silent fallback;
* ``python`` - the pure-Python reference implementation.

Only :mod:`vhostuser.virtqueue` and :mod:`vhostuser.memory` look at the result;
no other module checks which implementation is active.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Final

from .errors import ImplementationUnavailable

ENV_VAR: Final = "VHOSTUSER_IMPL"
NATIVE_ABI_VERSION: Final = 4
_CHOICES = ("auto", "native", "python")


def _load_native() -> ModuleType:
    from ._native import _ring  # type: ignore[attr-defined]  # noqa: PLC0415

    have = _ring.lib.vu_native_abi_version()
    if have != NATIVE_ABI_VERSION:
        raise ImportError(f"vhostuser._native._ring has ABI version {have}, expected {NATIVE_ABI_VERSION}; rebuild the package")
    return _ring


def _select() -> tuple[str, Any]:
    want = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if want not in _CHOICES:
        raise ImplementationUnavailable(f"{ENV_VAR}={want!r}: expected one of {', '.join(_CHOICES)}")
    if want == "python":
        return "python", None
    try:
        return "native", _load_native()
    except ImportError as exc:
        if want == "native":
            raise ImplementationUnavailable(
                f"{ENV_VAR}=native but the C extension vhostuser._native._ring is not available ({exc}); "
                "install cffi and a C compiler and reinstall the package"
            ) from exc
        return "python", None


#: ``"native"`` or ``"python"``: the implementation in use.
IMPL: str
#: The cffi module (with ``.ffi`` and ``.lib``) when ``IMPL == "native"``, else None.
NATIVE: Any
IMPL, NATIVE = _select()
