"""virtio-gpio wire structures (VIRTIO 1.3 §5.17, device id 41).

requestq (0): ``struct virtio_gpio_request { le16 type; le16 gpio; le32 value; }``
then ``struct virtio_gpio_response { u8 status; u8 value; }`` (GET_NAMES: the
status byte and ``gpio_names_size`` bytes of NUL-terminated names).
eventq (1, with VIRTIO_GPIO_F_IRQ): ``struct virtio_gpio_irq_request { le16 gpio; }``
then ``struct virtio_gpio_irq_response { u8 status; }``, returned when the
line's interrupt fires (VALID) or is disabled (INVALID).
"""
from __future__ import annotations

import enum
import struct

VIRTIO_ID_GPIO = 41
REQUEST_QUEUE = 0
EVENT_QUEUE = 1

#: VIRTIO_GPIO_F_IRQ
F_IRQ = 1 << 0

REQUEST = struct.Struct("<HHI")
RESPONSE = struct.Struct("<BB")
IRQ_REQUEST = struct.Struct("<H")
IRQ_RESPONSE = struct.Struct("<B")
#: struct virtio_gpio_config { le16 ngpio; u8 padding[2]; le32 gpio_names_size; }
CONFIG = struct.Struct("<H2xI")


class MsgType(enum.IntEnum):
    """``VIRTIO_GPIO_MSG_*``."""

    GET_NAMES = 0x0001
    GET_DIRECTION = 0x0002
    SET_DIRECTION = 0x0003
    GET_VALUE = 0x0004
    SET_VALUE = 0x0005
    SET_IRQ_TYPE = 0x0006


class Status(enum.IntEnum):
    """``VIRTIO_GPIO_STATUS_*``."""

    OK = 0
    ERR = 1


class Direction(enum.IntEnum):
    """``VIRTIO_GPIO_DIRECTION_*``."""

    NONE = 0
    OUT = 1
    IN = 2


class IrqType(enum.IntEnum):
    """``VIRTIO_GPIO_IRQ_TYPE_*``."""

    NONE = 0
    EDGE_RISING = 1
    EDGE_FALLING = 2
    EDGE_BOTH = 3
    LEVEL_HIGH = 4
    LEVEL_LOW = 8


class IrqStatus(enum.IntEnum):
    """``VIRTIO_GPIO_IRQ_STATUS_*``."""

    INVALID = 0
    VALID = 1


def pack_names(names: list[str]) -> bytes:
    """The ``gpio_names`` block: each name NUL-terminated (empty names allowed)."""
    return b"".join(n.encode() + b"\0" for n in names)
