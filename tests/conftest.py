"""Shared test helpers: fd-leak detection.

Use the ``no_fd_leak`` fixture on any test that opens fds::

    def test_something(no_fd_leak): ...

or, inside a hypothesis test (function-scoped fixtures do not run per example),
the context manager::

    from conftest import check_no_fd_leak

    with check_no_fd_leak():
        ...

``@pytest.mark.impl_pass("native")`` (or ``"python"``) runs a test only in the
pass of ``scripts/test`` whose implementation (``VHOSTUSER_IMPL``, see
``vhostuser._impl.IMPL``) matches: the other pass deselects it (not a skip).  For
slow guest tests where one pass covers a combination.

``variant_params(Kind, AVAILABLE)`` makes one ``pytest.param`` per member of an
OS-layer variant enum (``EventKind``, ``ShmKind``, ``SelectorKind``), skipping the
ones this system lacks, so one test body covers every variant.

``import_native_core()`` returns the C core's Python face (``_nativecore``) or
skips the calling test module when the extension is not built - except in CI
(``CI=true``) or when ``VHOSTUSER_IMPL=native`` asks for it, where a missing
extension fails the run (the project's rule for missing peers).

Hypothesis: in CI (``CI=true``) the ``ci`` profile is loaded: no deadline (a
loaded 2-core machine makes timings meaningless), no ``too_slow`` /
``data_too_large`` health checks, and ``fuzz_examples(n)`` (the example count of
the fuzz tests) is scaled up by ``VHOSTUSER_FUZZ_SCALE`` (default 2).

The leak checks compare the set of this process's open fds before and after and fail with
the leaked fds and what they point to (``/proc/self/fd/N`` link target).  Objects
that close their fds only when garbage-collected count as leaks: close explicitly.
"""
from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Collection, Iterator
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

#: running in CI (the convention of CI services: CI=true)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
if IN_CI:
    settings.load_profile("ci")


def fuzz_examples(n: int) -> int:
    """``max_examples`` for a fuzz test that runs ``n`` examples locally: more in CI."""
    return n * int(os.environ.get("VHOSTUSER_FUZZ_SCALE", "2")) if IN_CI else n


def native_required() -> bool:
    """A missing C extension is a failure here, not a skip (CI, or VHOSTUSER_IMPL=native)."""
    return IN_CI or os.environ.get("VHOSTUSER_IMPL", "").strip().lower() == "native"


def import_native_core() -> ModuleType:
    """``vhostuser.virtqueue._nativecore``; skips the calling module when the C
    extension is missing, or fails it when :func:`native_required`."""
    try:
        from vhostuser.virtqueue import _nativecore  # noqa: PLC0415
    except ImportError as exc:
        why = f"C extension not available: {exc}"
        if native_required():
            pytest.fail(f"{why} (required: CI=true or VHOSTUSER_IMPL=native)", pytrace=False)
        pytest.skip(why, allow_module_level=True)
    return _nativecore


_FD_DIR = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> set[int]:
    """The fds open in this process right now.

    Lists ``/proc/self/fd`` (``/dev/fd`` elsewhere) and drops the fds that are no
    longer open afterwards (the directory fd the listing itself used).
    """
    return {fd for fd in map(int, os.listdir(_FD_DIR)) if _is_open(fd)}


def describe_fd(fd: int) -> str:
    """``fd -> target`` for error messages (the target is best effort)."""
    try:
        return f"{fd} -> {os.readlink(f'{_FD_DIR}/{fd}')}"
    except OSError:
        return str(fd)


@contextlib.contextmanager
def check_no_fd_leak() -> Iterator[None]:
    """Assert that the block leaves exactly the fds open that were open before it
    (no fd leaked, none closed that the block did not own)."""
    before = open_fds()
    yield
    after = open_fds()
    leaked, lost = sorted(after - before), sorted(before - after)
    assert not leaked and not lost, (
        f"fd leak: opened and not closed: {[describe_fd(fd) for fd in leaked]}; closed but not ours: {lost}"
    )


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves fds open (or closes fds it did not open)."""
    with check_no_fd_leak():
        yield


def variant_params(kinds: type[enum.Enum], available: Collection[enum.Enum]) -> list:
    """One ``pytest.param`` per member of ``kinds`` that this OS has (id: its value).

    Variants the OS lacks (kqueue on Linux, eventfd on macOS) are not generated
    at all, so a skip in the test report always means something.
    """
    return [pytest.param(k, id=str(k.value)) for k in kinds if k in available]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect ``impl_pass`` tests of the other implementation's pass."""
    from vhostuser._impl import IMPL

    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        mark = item.get_closest_marker("impl_pass")
        (dropped if mark is not None and IMPL not in mark.args else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
