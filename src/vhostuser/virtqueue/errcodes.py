"""Error codes shared by the pure-Python and the C ring cores.

A core function returns ``-code`` on failure and leaves two detail values in the
queue state (``err_a``, ``err_b``).  :func:`raise_for` turns (code, a, b) into the
exception class and message listed here, so both cores raise identical errors.
The numbering is part of the C ABI (docs/ring-core.md): only append.
"""
from __future__ import annotations

from enum import IntEnum
from typing import NoReturn

from .. import errors as E

__all__ = ["ErrorCode", "BREAKS_QUEUE", "make_error", "raise_for"]


class ErrorCode(IntEnum):
    """Core error codes (returned negated)."""

    OK = 0
    NOT_READY = 1
    BROKEN = 2
    RING_ADDRESS = 3
    RING_ALIGNMENT = 4
    AVAIL_INDEX = 5
    INFLIGHT = 6
    HEAD_INDEX = 7
    DESC_INDEX = 8
    DESC_ZERO_LEN = 9
    DESC_ADDRESS = 10
    DESC_ORDER = 11
    CHAIN_TOO_LONG = 12
    CHAIN_TOO_BIG = 13
    INDIRECT_NESTED = 14
    INDIRECT_CHAINED = 15
    INDIRECT_LENGTH = 16
    INDIRECT_SIZE = 17
    INDIRECT_ADDRESS = 18
    USED_ID = 19
    USED_OVERFLOW = 20
    USED_SLOTS = 21
    BASE_RANGE = 22
    BATCH_CAPACITY = 23
    BAD_SIZE = 24
    GUEST_FAULT = 25


C = ErrorCode

#: code -> (exception class, message template with {a} and {b}).
_TABLE: dict[ErrorCode, tuple[type[E.VhostUserError], str]] = {
    C.NOT_READY: (E.QueueNotReady, "virtqueue is not ready"),
    C.BROKEN: (E.QueueBroken, "virtqueue is broken ({a_name}); reset it"),
    C.RING_ADDRESS: (E.QueueAddressError, "ring area {a:#x}+{b:#x} is not inside one guest memory region"),
    C.RING_ALIGNMENT: (E.QueueAddressError, "ring area at {a:#x} is not aligned to {b} bytes"),
    C.AVAIL_INDEX: (E.InvalidAvailIndex, "avail index {a} is more than the queue size ahead of next_avail {b}"),
    C.INFLIGHT: (E.InvalidAvailIndex, "driver made more than the queue size available: {a} in flight, size {b}"),
    C.HEAD_INDEX: (E.InvalidDescriptorError, "avail ring names head {a}, out of range for queue size {b}"),
    C.DESC_INDEX: (E.InvalidDescriptorError, "next descriptor index {a} out of range for a table of {b}"),
    C.DESC_ZERO_LEN: (E.InvalidDescriptorError, "zero-length descriptor buffer at {a:#x}"),
    C.DESC_ADDRESS: (E.DescriptorAddressError, "descriptor buffer {a:#x}+{b:#x} is not inside guest memory"),
    C.DESC_ORDER: (E.InvalidDescriptorError, "device-readable descriptor {a} follows a device-writable one"),
    C.CHAIN_TOO_LONG: (E.DescriptorChainTooLong, "descriptor chain from {a} has more than {b} descriptors"),
    C.CHAIN_TOO_BIG: (E.DescriptorChainTooLong, "descriptor chain from {a} is longer than 2**32 bytes"),
    C.INDIRECT_NESTED: (E.InvalidIndirectTable, "indirect descriptor inside an indirect table (entry {a})"),
    C.INDIRECT_CHAINED: (E.InvalidIndirectTable, "indirect descriptor {a} is chained with other descriptors"),
    C.INDIRECT_LENGTH: (E.InvalidIndirectTable, "indirect table length {a} is zero or not a multiple of 16"),
    C.INDIRECT_SIZE: (E.InvalidIndirectTable, "indirect table has {a} entries, more than the queue size {b}"),
    C.INDIRECT_ADDRESS: (E.IndirectTableAddressError, "indirect table {a:#x}+{b:#x} is not inside one guest memory region"),
    C.USED_ID: (E.QueueUsageError, "used id {a} out of range for queue size {b}"),
    C.USED_OVERFLOW: (E.QueueUsageError, "{a} used entries but only {b} in flight"),
    C.USED_SLOTS: (E.QueueUsageError, "used entry spans {a} descriptors, queue size {b}"),
    C.BASE_RANGE: (E.QueueError, "ring position {a} out of range for queue size {b}"),
    C.BATCH_CAPACITY: (E.QueueUsageError, "batch descriptor capacity {a} is smaller than the queue size {b}"),
    C.BAD_SIZE: (E.QueueError, "queue size {a} is invalid (at most {b}; a power of two for split rings)"),
    C.GUEST_FAULT: (E.GuestMemoryFault, "guest memory at host address {a:#x} faulted (SIGBUS: the front-end "
                                        "shrank the file behind it)"),
}

#: Codes after which the core marks the queue broken (hostile ring).
BREAKS_QUEUE = frozenset(
    {
        C.AVAIL_INDEX, C.INFLIGHT, C.HEAD_INDEX, C.DESC_INDEX, C.DESC_ZERO_LEN, C.DESC_ADDRESS,
        C.DESC_ORDER, C.CHAIN_TOO_LONG, C.CHAIN_TOO_BIG, C.INDIRECT_NESTED, C.INDIRECT_CHAINED,
        C.INDIRECT_LENGTH, C.INDIRECT_SIZE, C.INDIRECT_ADDRESS, C.GUEST_FAULT,
    }
)

_ADDRESS_CODES = {C.RING_ADDRESS: True, C.DESC_ADDRESS: True, C.INDIRECT_ADDRESS: True}


def message(code: int, a: int = 0, b: int = 0) -> str:
    """The message for ``code`` with details ``a`` and ``b``."""
    c = ErrorCode(code)
    _, tmpl = _TABLE[c]
    a_name = ErrorCode(a).name if c is C.BROKEN and a in ErrorCode._value2member_map_ else str(a)
    return tmpl.format(a=a, b=b, a_name=a_name)


def make_error(code: int, a: int = 0, b: int = 0) -> E.VhostUserError:
    """The exception for a (positive or negative) core error code."""
    c = ErrorCode(abs(code))
    cls, _ = _TABLE[c]
    msg = message(c, a, b)
    if c in _ADDRESS_CODES:
        return cls(msg, addr=a, length=b)  # type: ignore[call-arg]
    if c is C.RING_ALIGNMENT:
        return cls(msg, addr=a, length=None)  # type: ignore[call-arg]
    return cls(msg)


def raise_for(code: int, a: int = 0, b: int = 0) -> NoReturn:
    """Raise :func:`make_error`."""
    raise make_error(code, a, b)
