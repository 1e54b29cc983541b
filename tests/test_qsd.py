"""Our front-end client against a real third-party back-end: qemu-storage-daemon's
vhost-user-blk export (libvhost-user).  Control plane only, all with REPLY_ACK."""
from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.qsd import qsd_blk

from vhostuser.frontend import Frontend
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.protocol.message import VirtioFeatures as VF
from vhostuser.protocol.payloads import MemoryRegion, VringAddr
from vhostuser.sys_util import create_shm_fd, new_event_consumer_and_notifier

IMAGE_SIZE = 64 << 20
GUEST_MEM = 2 << 20
USER_ADDR = 0x7F0000000000


@pytest.fixture
def qsd() -> Iterator[Path]:
    """qemu-storage-daemon exporting a fresh raw image; yields its socket path."""
    with qsd_blk(IMAGE_SIZE) as (sock, _image):
        yield sock


@pytest.mark.qsd
def test_control_plane_against_qsd(qsd: Path, no_fd_leak) -> None:
    mem = create_shm_fd(GUEST_MEM, "guest")
    kick, kick_notifier = new_event_consumer_and_notifier()
    call_consumer, call = new_event_consumer_and_notifier()
    fe = Frontend.connect(qsd, reply_timeout=10)
    try:
        features = fe.get_features()
        assert features & VF.PROTOCOL_FEATURES and features & VF.VERSION_1
        offered = fe.get_protocol_features()
        assert offered & (PF.CONFIGURE_MEM_SLOTS | PF.REPLY_ACK | PF.CONFIG | PF.MQ) == (
            PF.CONFIGURE_MEM_SLOTS | PF.REPLY_ACK | PF.CONFIG | PF.MQ)
        fe.set_protocol_features(PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS)
        assert fe.reply_ack
        assert fe.get_queue_num() >= 1
        assert fe.get_max_mem_slots() >= 1
        fe.set_owner()
        config = fe.get_config(0, 57)
        capacity = struct.unpack_from("=Q", config)[0]
        assert capacity == IMAGE_SIZE // 512
        fe.set_features(VF.VERSION_1 | VF.PROTOCOL_FEATURES)
        fe.add_mem_reg(MemoryRegion(0, GUEST_MEM, USER_ADDR, 0), mem)
        fe.set_vring_num(0, 128)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(VringAddr(0, 0, USER_ADDR, USER_ADDR + 0x1000, USER_ADDR + 0x800, 0))
        fe.set_vring_kick(0, kick.fileno())
        fe.set_vring_call(0, call.fileno())
        fe.set_vring_enable(0, True)
        fe.set_vring_enable(0, False)
        assert fe.get_vring_base(0) == 0  # nothing was ever made available
        fe.rem_mem_reg(MemoryRegion(0, GUEST_MEM, USER_ADDR, 0))
    finally:
        fe.close()
        for obj in (kick, kick_notifier, call_consumer, call):
            obj.close()
        os.close(mem)
