"""Guest mappings a front-end can make fault, and what we do about them.

A front-end that shrinks (``ftruncate``) the file behind guest memory or the
dirty log after we mapped it makes the next access to the missing part raise
SIGBUS, which would kill the daemon.  At map time, :func:`protect` sorts a
mapping into one of three cases (docs/robustness.md):

* the fd is sealed against shrinking (``F_SEAL_SHRINK``, what QEMU's
  ``memory-backend-memfd`` does by default): it cannot fault; nothing to do;
* the C core is in use: the mapping is registered with its SIGBUS guard, so a
  fault inside a C core call becomes a :class:`~vhostuser.errors.GuestMemoryFault`
  (the queue fails, the daemon keeps serving);
* the pure-Python core: Python cannot recover from SIGBUS; the mapping is
  accepted with a warning (once per process), or refused when
  ``VHOSTUSER_UNSEALED_MEMORY=refuse``.

Before any of that, a mapping larger than its (regular) file is refused: it
would fault at once.
"""
from __future__ import annotations

import logging
import os
import stat
from typing import Any, NoReturn

from . import _impl
from .errors import GuestMemoryError
from .sys_util.shm import shrink_sealed

__all__ = ["ENV_VAR", "protect", "unprotect", "recovered_faults"]

log = logging.getLogger(__name__)

#: ``warn`` (default) or ``refuse``: what the pure-Python core does with an fd
#: that is not sealed against shrinking
ENV_VAR = "VHOSTUSER_UNSEALED_MEMORY"
_warned = False


def protect(fd: int, offset: int, size: int, host_addr: int, what: str) -> bool:
    """Check a mapping of ``size`` bytes of ``fd`` at ``offset`` (at ``host_addr``);
    True if it was registered with the C core's guard (then :func:`unprotect` it
    before unmapping).  Raises :class:`GuestMemoryError` for a mapping that
    would fault at once, or an unsealed fd the policy refuses."""
    global _warned
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
        raise GuestMemoryError(f"{what}: the fd holds {st.st_size:#x} bytes, the mapping needs "
                               f"{offset:#x}+{size:#x}")
    if shrink_sealed(fd):
        return False
    native = _impl.NATIVE
    if native is not None:
        if native.lib.vu_guard_install() != 0 or native.lib.vu_guard_add_range(
                native.ffi.cast("uint8_t *", host_addr), size) != 0:
            log.warning("%s: cannot guard the mapping against SIGBUS (guard table full?)", what)
            return False
        return True
    if os.environ.get(ENV_VAR, "warn").strip().lower() == "refuse":
        raise GuestMemoryError(f"{what}: the fd is not sealed against shrinking (F_SEAL_SHRINK) and the "
                               f"pure-Python core cannot survive SIGBUS ({ENV_VAR}=refuse)")
    if not _warned:
        _warned = True
        log.warning("%s: the fd is not sealed against shrinking and the pure-Python core cannot survive "
                    "SIGBUS: a front-end that truncates it can crash this process (use the C core, or "
                    "sealed memfds; %s=refuse refuses such fds)", what, ENV_VAR)
    return False


def unprotect(host_addr: int) -> None:
    """Forget a mapping :func:`protect` registered (before unmapping it)."""
    native = _impl.NATIVE
    if native is not None:
        native.lib.vu_guard_remove_range(native.ffi.cast("uint8_t *", host_addr))


def recovered_faults() -> int:
    """How many SIGBUS faults the C core turned into errors in this process."""
    native = _impl.NATIVE
    return int(native.lib.vu_guard_faults()) if native is not None else 0


def mark_log(log_ptr: Any, log_size: int, gpa: int, length: int) -> None:
    """Mark pages in a dirty log (``log_ptr``: its ``uint8_t *``) with the C
    core's atomic ORs under its SIGBUS guard: a shrunk log raises
    :class:`~vhostuser.errors.GuestMemoryFault`.  Only with the C core."""
    native = _impl.NATIVE
    fault = native.ffi.new("uint64_t *")
    if native.lib.vu_safe_log_mark(log_ptr, log_size, gpa, length, fault) < 0:
        raise_fault(fault[0])


def raise_fault(host_addr: int) -> NoReturn:
    """Raise the :class:`~vhostuser.errors.GuestMemoryFault` of a recovered fault."""
    from .virtqueue.errcodes import ErrorCode, make_error  # noqa: PLC0415

    raise make_error(ErrorCode.GUEST_FAULT, host_addr)
