"""Resolve which variant (eventfd or pipe, memfd or shm_open, ...) to use."""
from __future__ import annotations

import os
from collections.abc import Collection
from enum import Enum
from typing import TypeVar

from ..errors import UnsupportedVariant

_E = TypeVar("_E", bound=Enum)


def _choose_variant(
    enum_cls: type[_E], requested: _E | str | None, env_var: str, available: Collection[_E], default: _E
) -> _E:
    """Resolve a variant: the argument if given, else ``$env_var`` if set, else ``default``.

    Raises :class:`UnsupportedVariant` for unknown names and unavailable variants.
    """
    source = "argument"
    value: object = requested
    if value is None:
        value = os.environ.get(env_var, "").strip()
        source = env_var
        if not value:
            return default
    if not isinstance(value, enum_cls):
        try:
            value = enum_cls(str(value).lower())
        except ValueError:
            names = ", ".join(str(m.value) for m in enum_cls)
            raise UnsupportedVariant(f"{source}={value!r}: expected one of {names}") from None
    if value not in available:
        raise UnsupportedVariant(f"{enum_cls.__name__}.{value.name} ({source}) is not available on this system")
    return value
