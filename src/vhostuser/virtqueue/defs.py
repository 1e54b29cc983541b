"""Virtqueue constants (VIRTIO 1.3 §2.7 split, §2.8 packed) shared by the queue,
the cores and the test driver."""
from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = [
    "Layout",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_AVAIL",
    "VIRTQ_DESC_F_USED",
    "VIRTQ_USED_F_NO_NOTIFY",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "RING_EVENT_FLAGS_ENABLE",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_DESC",
    "DESC_SIZE",
    "MAX_QUEUE_SIZE",
    "MAX_CHAIN_BYTES",
    "split_ring_sizes",
]


class Layout(IntEnum):
    """Virtqueue layout (``VIRTIO_F_RING_PACKED`` selects PACKED)."""

    SPLIT = 0
    PACKED = 1


#: Descriptor flags (both layouts).
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
#: Packed-ring availability flags.
VIRTQ_DESC_F_AVAIL: Final = 1 << 7
VIRTQ_DESC_F_USED: Final = 1 << 15

#: Split ring: used.flags bit - the device does not want available-buffer notifications.
VIRTQ_USED_F_NO_NOTIFY: Final = 1
#: Split ring: avail.flags bit - the driver does not want used-buffer notifications.
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1

#: Packed ring event-suppression flags.
RING_EVENT_FLAGS_ENABLE: Final = 0
RING_EVENT_FLAGS_DISABLE: Final = 1
RING_EVENT_FLAGS_DESC: Final = 2

#: Size of one descriptor (split and packed) and of an indirect-table entry.
DESC_SIZE: Final = 16
#: Largest queue size of either layout.
MAX_QUEUE_SIZE: Final = 32768
#: A chain's buffers may total at most 2**32 bytes (VIRTIO 1.3 §2.7.5.2... drivers MUST NOT exceed).
MAX_CHAIN_BYTES: Final = 1 << 32

#: Alignment of the ring areas (desc, driver area, device area) per layout.
SPLIT_ALIGN: Final = (16, 2, 4)
PACKED_ALIGN: Final = (16, 4, 4)


def split_ring_sizes(size: int, event_idx: bool = True) -> tuple[int, int, int]:
    """Byte sizes of (descriptor table, avail ring, used ring) of a split queue.

    The avail ring's trailing ``used_event`` and the used ring's trailing
    ``avail_event`` are counted when ``event_idx`` (the default; always safe).
    """
    extra = 2 if event_idx else 0
    return DESC_SIZE * size, 4 + 2 * size + extra, 4 + 8 * size + extra


def packed_ring_sizes(size: int) -> tuple[int, int, int]:
    """Byte sizes of (descriptor ring, driver event area, device event area)."""
    return DESC_SIZE * size, 4, 4
