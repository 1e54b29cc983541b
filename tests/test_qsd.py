"""Our front-end client against a real third-party back-end: qemu-storage-daemon's
vhost-user-blk export (libvhost-user).  Control plane only, all with REPLY_ACK."""
from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from vhostuser.frontend import Frontend
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.protocol.message import VirtioFeatures as VF
from vhostuser.protocol.payloads import MemoryRegion, VringAddr
from vhostuser.sys_util import create_shm_fd, new_event_consumer_and_notifier

IMAGE_SIZE = 64 << 20
GUEST_MEM = 2 << 20
USER_ADDR = 0x7F0000000000


@pytest.fixture
def qsd(tmp_path: Path):
    """Start qemu-storage-daemon exporting a fresh raw image; yield its socket path."""
    binary = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"
    if not os.access(binary, os.X_OK):
        pytest.fail("qemu-storage-daemon not found: install the Debian package qemu-system-common")
    image, sock, pidfile = tmp_path / "disk.img", tmp_path / "qsd.sock", tmp_path / "qsd.pid"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    cmd = [binary,
           "--blockdev", f"driver=file,node-name=file0,filename={image}",
           "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},writable=on",
           "--daemonize", "--pidfile", str(pidfile)]
    # --daemonize: the parent exits once the export is listening, so no polling is needed
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert done.returncode == 0, done.stderr
        assert sock.exists()
        yield sock
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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
