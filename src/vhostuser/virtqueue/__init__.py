"""Virtqueues (VIRTIO 1.3 §2.7 split, §2.8 packed), device side.

* :class:`Queue` - configure, pop chains (one or a batch), add used entries,
  decide on notifications; one API for both layouts.
* :class:`DescriptorChain` - one request: its readable and writable buffers.
* :class:`Reader` / :class:`Writer` - byte streams across descriptor boundaries,
  with zero-copy memoryviews for ``os.preadv``/``os.pwritev``.
* :class:`IoBatch` / :class:`IoOp` - batch file I/O between an fd and many
  chains in one ring-core call (:meth:`Queue.pop_io_batch`, :meth:`Queue.complete_io`).
* :mod:`vhostuser.virtqueue.driver` - the driver side, for tests and mock front-ends.

The hot loop lives in a "ring core" (docs/ring-core.md): the C core
(``_native/ring.c`` over cffi) when the extension is built, else the pure-Python
reference; :mod:`vhostuser.virtqueue._core` picks one (``VHOSTUSER_IMPL``).
"""
from __future__ import annotations

from .chain import DescriptorChain, Reader, Writer
from .defs import (
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Layout,
)
from .errcodes import ErrorCode
from .iobatch import IoBatch, IoOp
from .queue import Queue

__all__ = [
    "Queue",
    "DescriptorChain",
    "Reader",
    "Writer",
    "Layout",
    "ErrorCode",
    "IoBatch",
    "IoOp",
    "MAX_QUEUE_SIZE",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_USED_F_NO_NOTIFY",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
]
