"""Batch I/O between a file and many chains: the types of
:meth:`Queue.pop_io_batch <vhostuser.virtqueue.Queue.pop_io_batch>` /
:meth:`Queue.complete_io <vhostuser.virtqueue.Queue.complete_io>`.

The device keeps the policy: it parses the chains' headers from one flat
buffer, validates them and picks, per chain, an :class:`IoOp` and a file
offset (rare requests it serves itself through the chain).  The ring core
then does the mechanics in one call (the C core without the GIL): vectored
``preadv``/``pwritev`` between the fd and the chains' data segments, the
status byte at each chain's last writable byte, the dirty log, the used
entries and the notifications (docs/ring-core.md, "Batch I/O").
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .chain import DescriptorChain

__all__ = ["IoOp", "IoBatch"]


class IoOp(enum.IntEnum):
    """What :meth:`Queue.complete_io` does for one chain."""

    #: nothing: the device served the chain itself; its used length is the caller's
    NONE = 0
    #: ``preadv`` at the offset into the writable bytes before the status tail
    READ = 1
    #: ``pwritev`` of the readable bytes after the header at the offset
    WRITE = 2


@dataclass(slots=True)
class IoBatch:
    """Chains popped by :meth:`Queue.pop_io_batch`, with their headers.

    ``headers`` holds ``header_len`` bytes per chain (its first readable bytes,
    zero-filled when it has fewer); ``readable[k]`` / ``writable[k]`` are chain
    ``k``'s readable / writable byte counts."""

    chains: list[DescriptorChain]
    header_len: int
    headers: bytes
    readable: list[int]
    writable: list[int]

    def __len__(self) -> int:
        return len(self.chains)
