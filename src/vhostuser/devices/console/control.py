"""virtio-console wire formats (VIRTIO 1.3 §5.3): feature bits, the config
space and the control messages of the MULTIPORT control queues.

Sans-IO: nothing here touches rings or fds.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ...errors import ConsoleControlError

__all__ = [
    "VIRTIO_ID_CONSOLE",
    "VIRTIO_CONSOLE_F_SIZE",
    "VIRTIO_CONSOLE_F_MULTIPORT",
    "VIRTIO_CONSOLE_F_EMERG_WRITE",
    "CONFIG_SIZE",
    "EMERG_WR_OFFSET",
    "ControlEvent",
    "ControlMessage",
    "pack_config",
    "rx_queue",
    "tx_queue",
    "CONTROL_RX_QUEUE",
    "CONTROL_TX_QUEUE",
    "queue_role",
    "num_queues",
]

#: virtio device id of the console
VIRTIO_ID_CONSOLE = 3

#: config ``cols``/``rows`` are valid
VIRTIO_CONSOLE_F_SIZE = 0
#: several ports, control queues 2 and 3
VIRTIO_CONSOLE_F_MULTIPORT = 1
#: the driver may write a character to config ``emerg_wr``
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

_CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr
#: bytes of ``struct virtio_console_config``
CONFIG_SIZE = _CONFIG.size
#: offset of ``emerg_wr`` in the config space
EMERG_WR_OFFSET = 8

#: queue indices of the control queues (MULTIPORT)
CONTROL_RX_QUEUE = 2
CONTROL_TX_QUEUE = 3


class ControlEvent(enum.IntEnum):
    """``virtio_console_control.event`` values (spec names)."""

    DEVICE_READY = 0   # driver -> device, value 1 ok / 0 failed
    DEVICE_ADD = 1     # device -> driver, id = new port
    DEVICE_REMOVE = 2  # device -> driver
    PORT_READY = 3     # driver -> device, value 1 ok / 0 failed
    CONSOLE_PORT = 4   # device -> driver, value 1: the port is a console
    RESIZE = 5         # device -> driver, followed by le16 cols, le16 rows
    PORT_OPEN = 6      # both ways, value 1 open / 0 closed
    PORT_NAME = 7      # device -> driver, followed by the name bytes


_HEADER = struct.Struct("<IHH")  # id, event, value
_RESIZE = struct.Struct("<HH")   # cols, rows (spec order)


@dataclass(frozen=True)
class ControlMessage:
    """One ``struct virtio_console_control`` and the bytes that follow it in the
    same buffer (the name of PORT_NAME, the size of RESIZE)."""

    id: int
    event: int
    value: int = 0
    payload: bytes = b""

    HEADER_SIZE = _HEADER.size

    def pack(self) -> bytes:
        """The message as the driver sees it in a control receiveq buffer."""
        if not 0 <= self.id <= 0xFFFFFFFF or not 0 <= self.event <= 0xFFFF or not 0 <= self.value <= 0xFFFF:
            raise ConsoleControlError(f"control message field out of range: {self}")
        return _HEADER.pack(self.id, self.event, self.value) + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> ControlMessage:
        """Parse a buffer from the control transmitq.  Raises
        :class:`~vhostuser.errors.ConsoleControlError` if it is shorter than the header."""
        if len(data) < _HEADER.size:
            raise ConsoleControlError(f"control message of {len(data)} bytes (need {_HEADER.size})")
        pid, event, value = _HEADER.unpack_from(data)
        return cls(pid, event, value, bytes(data[_HEADER.size:]))

    @classmethod
    def resize(cls, port: int, cols: int, rows: int) -> ControlMessage:
        """RESIZE for ``port``: ``le16 cols, le16 rows`` after the header (spec order;
        the Linux driver has long declared them as rows, cols)."""
        return cls(port, ControlEvent.RESIZE, 0, _RESIZE.pack(cols, rows))

    @classmethod
    def name(cls, port: int, name: str) -> ControlMessage:
        """PORT_NAME for ``port`` (UTF-8, not NUL-terminated: the buffer length ends it)."""
        return cls(port, ControlEvent.PORT_NAME, 1, name.encode())

    @property
    def event_name(self) -> str:
        """The event's spec name, or ``EVENT_<n>`` for an unknown one."""
        try:
            return ControlEvent(self.event).name
        except ValueError:
            return f"EVENT_{self.event}"

    def __str__(self) -> str:
        extra = f" +{len(self.payload)}B" if self.payload else ""
        return f"{self.event_name}(id={self.id}, value={self.value}{extra})"


def pack_config(cols: int, rows: int, max_nr_ports: int) -> bytes:
    """``struct virtio_console_config`` (``emerg_wr`` reads as 0)."""
    return _CONFIG.pack(cols, rows, max_nr_ports, 0)


# ------------------------------------------------------------------- queues
def rx_queue(port: int) -> int:
    """The receiveq (host -> guest) of ``port``: 0, then 4, 6, 8..."""
    return 0 if port == 0 else 2 + 2 * port


def tx_queue(port: int) -> int:
    """The transmitq (guest -> host) of ``port``: 1, then 5, 7, 9..."""
    return 1 if port == 0 else 3 + 2 * port


def num_queues(max_ports: int, multiport: bool) -> int:
    """Queues of a device with ``max_ports`` ports."""
    return 2 * (max_ports + 1) if multiport else 2


def queue_role(index: int) -> tuple[str, int]:
    """``("rx"|"tx", port)`` or ``("ctrl-rx"|"ctrl-tx", -1)`` for queue ``index``."""
    if index == CONTROL_RX_QUEUE:
        return "ctrl-rx", -1
    if index == CONTROL_TX_QUEUE:
        return "ctrl-tx", -1
    if index < 2:
        return ("rx", "tx")[index], 0
    return ("rx", "tx")[index % 2], index // 2 - 1
