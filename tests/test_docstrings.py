"""Every public name has a docstring: the package's ``__all__``, everything
``vhostuser.testing`` and ``vhostuser.trace`` offer, and every bundled device's modules (classes, their
public methods and properties, functions).  The API reference site is built
from these (scripts/docs)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import vhostuser
import vhostuser.devices
import vhostuser.testing
import vhostuser.trace


def _modules(package: ModuleType) -> list[ModuleType]:
    mods = [package]
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        mods.append(importlib.import_module(info.name))
    return mods


def _public(module: ModuleType) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
    return [(n, getattr(module, n)) for n in names]


def _missing(qualname: str, obj: object) -> list[str]:
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return []  # constants, enum members, type aliases: documented with #: comments
    own_doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    out = [] if own_doc and own_doc.strip() else [qualname]
    if inspect.isclass(obj) and not issubclass(obj, BaseException):
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                member = member.fget
            if inspect.isfunction(member) and not (member.__doc__ and member.__doc__.strip()):
                # an override documented by the base class it overrides is fine
                inherited = any(getattr(getattr(base, name, None), "__doc__", None) for base in obj.__mro__[1:])
                if not inherited:
                    out.append(f"{qualname}.{name}")
    return out


MODULES = [vhostuser, *_modules(vhostuser.testing), *_modules(vhostuser.devices), *_modules(vhostuser.trace)]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_public_names_have_docstrings(module: ModuleType) -> None:
    assert module.__doc__ and module.__doc__.strip(), f"module {module.__name__}"
    missing = [m for name, obj in _public(module) for m in _missing(f"{module.__name__}.{name}", obj)]
    assert not missing, "no docstring: " + ", ".join(missing)
