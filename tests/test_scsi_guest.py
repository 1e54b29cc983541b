"""The virtio-scsi back-end under real QEMU 7.2 (vhost-user-scsi-pci): a Linux
guest's virtio_scsi + sd drivers find two LUNs (one read-only), write a pattern
and read it back with O_DIRECT, discard a range with ``blkdiscard`` (UNMAP:
the host file gets a hole), and send raw commands with SG_IO (``sg_cmd``, a tiny
static tool) to see that an out-of-range READ and an unknown opcode come back
as CHECK CONDITION with the right sense, not a hang.  One boot (~10 s).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostuser.daemon import VhostUserDaemon
from vhostuser.devices.scsi.device import LunSpec, ScsiBackend
from vhostuser.testing.guest import VhostUserDevice, build_static_program, run_guest

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZE = 64 * MiB
RO_SIZE = 16 * MiB
PATTERN = hashlib.shake_256(b"vhostuser-scsi-guest-pattern").digest(MiB)
SG_CMD = Path(__file__).parent / "scsi_guest" / "sg_cmd.c"
DISCARD_AT, DISCARD_LEN = 2 * MiB + 256 * 1024, 256 * 1024


def read10(lba: int, n: int) -> str:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, n, 0).hex()


SCRIPT = f"""
set -e
i=0
# sd names follow the (asynchronous) probe order: find each LUN's disk by H:C:T:L
while ! ls /sys/bus/scsi/devices/0:0:0:1/block >/dev/null 2>&1 && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
while ! ls /sys/bus/scsi/devices/0:0:0:0/block >/dev/null 2>&1 && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
rw=$(ls /sys/bus/scsi/devices/0:0:0:0/block)
ro=$(ls /sys/bus/scsi/devices/0:0:0:1/block)
show() {{
  d=/sys/block/$2
  echo "$1 hctl=$(basename $(readlink $d/device)) size=$(cat $d/size) ro=$(cat $d/ro) \
vendor=$(cat $d/device/vendor) mode=$(cat $d/device/scsi_disk/*/provisioning_mode)"
}}
show rw $rw
show ro $ro
dd if=/pattern.bin of=/dev/$rw bs=65536 seek=16 oflag=direct 2>/dev/null
dd if=/pattern.bin of=/dev/$rw bs=65536 seek=32 oflag=direct conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
echo "low $(dd if=/dev/$rw bs=65536 skip=16 count=16 iflag=direct 2>/dev/null | md5sum)"
blkdiscard -o {DISCARD_AT} -l {DISCARD_LEN} /dev/$rw
echo "after-discard $(dd if=/dev/$rw bs=65536 skip=32 count=16 iflag=direct 2>/dev/null | md5sum)"
echo "ro-read $(dd if=/dev/$ro bs=65536 count=16 iflag=direct 2>/dev/null | md5sum)"
if dd if=/pattern.bin of=/dev/$ro bs=4096 count=1 oflag=direct 2>/dev/null; then echo ro-write=ok; \
else echo ro-write=refused; fi
echo "in-range $(/sg_cmd /dev/$rw {read10(SIZE // 512 - 1, 1)} 512)"
echo "out-of-range $(/sg_cmd /dev/$rw {read10(SIZE // 512, 1)} 512)"
echo "bad-opcode $(/sg_cmd /dev/$rw c50000000000)"
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vhu-scsi-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - as busybox md5sum prints


def test_guest_sees_the_luns_and_does_io_discard_and_gets_sense(tmp_path: Path, short_dir: Path,
                                                                 no_fd_leak: None) -> None:
    sg_cmd = build_static_program(SG_CMD, flags=("-O2", "-Wall"))
    rw, ro = tmp_path / "rw.img", tmp_path / "ro.img"
    with open(rw, "wb") as f:
        f.truncate(SIZE)
    ro.write_bytes(PATTERN * (RO_SIZE // MiB))
    sock = short_dir / "scsi.sock"
    backend = ScsiBackend([str(rw), LunSpec(str(ro), read_only=True)])
    try:
        with VhostUserDaemon("scsi", backend) as daemon:
            daemon.start_server(str(sock))
            result = run_guest(SCRIPT, devices=[VhostUserDevice("scsi", sock)], timeout=180,
                               extra_files={"/pattern.bin": PATTERN, "/sg_cmd": sg_cmd})
        result.check()
        stats = backend.stats
        unmaps = backend.disks[0].stats.unmaps
    finally:
        backend.close()
    out = result.output
    lines = dict(line.split(" ", 1) for line in out.strip().split("\n") if " " in line)
    assert lines["rw"] == f"hctl=0:0:0:0 size={SIZE // 512} ro=0 vendor=vhostusr mode=unmap", out
    assert lines["ro"] == f"hctl=0:0:0:1 size={RO_SIZE // 512} ro=1 vendor=vhostusr mode=full", out
    assert lines["low"].split()[0] == md5(PATTERN), out
    expect = bytearray(PATTERN)
    hole = DISCARD_AT - 2 * MiB
    expect[hole:hole + DISCARD_LEN] = bytes(DISCARD_LEN)
    assert lines["after-discard"].split()[0] == md5(bytes(expect)), out
    assert lines["ro-read"].split()[0] == md5(PATTERN), out
    assert "ro-write=refused" in out
    assert re.fullmatch(r"status=0 host=0 driver=0 sense=0/00/00 resid=0", lines["in-range"]), out
    assert re.fullmatch(r"status=2 host=0 driver=\d+ sense=5/21/00 resid=\d+", lines["out-of-range"]), out
    assert re.fullmatch(r"status=2 host=0 driver=\d+ sense=5/20/00 resid=0", lines["bad-opcode"]), out
    assert unmaps >= 1 and stats.requests > 10
    # the host file: the pattern at 1 MiB and 2 MiB, a hole where the guest discarded
    data = rw.read_bytes()
    assert data[MiB:2 * MiB] == PATTERN
    assert data[2 * MiB:3 * MiB] == bytes(expect)
    fd = os.open(rw, os.O_RDONLY)
    try:
        assert os.lseek(fd, DISCARD_AT, os.SEEK_HOLE) == DISCARD_AT  # deallocated, not just zeros
        assert os.lseek(fd, DISCARD_AT, os.SEEK_DATA) >= DISCARD_AT + DISCARD_LEN
    finally:
        os.close(fd)
