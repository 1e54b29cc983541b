"""virtio-console wire formats: control messages, config space, queue numbering."""
from __future__ import annotations

import struct

import pytest

from vhostuser.devices.console.control import (
    CONFIG_SIZE,
    ControlEvent,
    ControlMessage,
    num_queues,
    pack_config,
    queue_role,
    rx_queue,
    tx_queue,
)
from vhostuser.errors import ConsoleControlError


def test_header_layout_is_id_event_value_little_endian():
    msg = ControlMessage(0x01020304, ControlEvent.PORT_OPEN, 1)
    assert msg.pack() == bytes([4, 3, 2, 1, 6, 0, 1, 0])
    assert ControlMessage.unpack(msg.pack()) == msg


def test_spec_event_numbers():
    assert [e.value for e in ControlEvent] == list(range(8))
    assert ControlEvent.DEVICE_READY == 0 and ControlEvent.PORT_NAME == 7


def test_unpack_keeps_trailing_bytes_and_rejects_short_buffers():
    data = struct.pack("<IHH", 2, 7, 1) + b"org.name"
    msg = ControlMessage.unpack(data)
    assert (msg.id, msg.event, msg.value, msg.payload) == (2, 7, 1, b"org.name")
    for n in range(8):
        with pytest.raises(ConsoleControlError):
            ControlMessage.unpack(data[:n])


def test_out_of_range_fields_are_refused():
    with pytest.raises(ConsoleControlError):
        ControlMessage(1 << 32, 0, 0).pack()
    with pytest.raises(ConsoleControlError):
        ControlMessage(0, 1 << 16, 0).pack()
    with pytest.raises(ConsoleControlError):
        ControlMessage(0, 0, -1).pack()


def test_resize_and_name_payloads():
    assert ControlMessage.resize(0, 80, 25).pack() == struct.pack("<IHHHH", 0, 5, 0, 80, 25)
    assert ControlMessage.name(3, "ports.é").pack() == struct.pack("<IHH", 3, 7, 1) + "ports.é".encode()


def test_unknown_event_has_a_printable_name():
    assert ControlMessage(0, 99, 0).event_name == "EVENT_99"
    assert "PORT_READY(id=1, value=1)" == str(ControlMessage(1, 3, 1))


def test_config_space():
    cfg = pack_config(132, 43, 4)
    assert len(cfg) == CONFIG_SIZE == 12
    assert struct.unpack("<HHII", cfg) == (132, 43, 4, 0)


def test_queue_numbering_follows_the_spec():
    assert [rx_queue(p) for p in range(4)] == [0, 4, 6, 8]
    assert [tx_queue(p) for p in range(4)] == [1, 5, 7, 9]
    assert num_queues(1, False) == 2 and num_queues(1, True) == 4 and num_queues(3, True) == 8
    assert queue_role(0) == ("rx", 0) and queue_role(1) == ("tx", 0)
    assert queue_role(2) == ("ctrl-rx", -1) and queue_role(3) == ("ctrl-tx", -1)
    assert queue_role(6) == ("rx", 2) and queue_role(7) == ("tx", 2)
    for p in range(1, 10):
        assert queue_role(rx_queue(p)) == ("rx", p) and queue_role(tx_queue(p)) == ("tx", p)
