"""The virtio-blk back-end under real QEMU 7.2: a Linux guest writes and reads
/dev/vda (busybox dd, O_DIRECT), and the host checks the image file.

Three boots (~5 s each):

* our daemon (a thread of this process) and qemu-storage-daemon's vhost-user-blk
  export run the SAME guest script on fresh images: same guest output
  (checksums), byte-identical image files;
* two disks at once: a writable one from our daemon with num-queues=2,
  packed=on, O_DIRECT, and a read-only one from the ``vhostuser blk`` command
  (a subprocess serving an inherited listening socket); the guest proves the
  packed ring (feature bit 34) and both queues were used, discards a range,
  and cannot write the read-only disk.
"""
from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.qsd import qsd_export

from vhostuser.daemon import VhostUserDaemon
from vhostuser.devices.blk.device import BlkBackend
from vhostuser.testing.guest import VhostUserDevice, run_guest

pytestmark = pytest.mark.qemu

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB
TIMEOUT = 120
#: 1 MiB of deterministic bytes, shipped in the initramfs as /pattern.bin
PATTERN = hashlib.shake_256(b"vhostuser-blk-guest-pattern").digest(MiB)
LOW = 1 * MiB                  # where the guest writes the pattern ...
HIGH = IMAGE_SIZE - MiB        # ... and again in the last MiB of the disk

#: written in 64 KiB blocks with O_DIRECT, read back the same way; prints checksums only
IO_SCRIPT = r"""
set -e
dev=/dev/vda
sectors=$(cat /sys/block/vda/size)
echo "sectors=$sectors"
hi=$(( sectors * 512 / 65536 - 16 ))
dd if=/pattern.bin of=$dev bs=65536 seek=16 oflag=direct 2>/dev/null
dd if=/pattern.bin of=$dev bs=65536 seek=$hi oflag=direct conv=fsync 2>/dev/null
# 4 KiB writes, one every 64 KiB (many small requests), and one 512-byte sector
dd if=/pattern.bin of=$dev bs=4096 seek=1024 count=64 oflag=direct 2>/dev/null
dd if=/pattern.bin of=$dev bs=512 seek=12345 count=1 oflag=direct conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=$dev of=/tmp/lo bs=65536 skip=16 count=16 iflag=direct 2>/dev/null
dd if=$dev of=/tmp/hi bs=65536 skip=$hi count=16 iflag=direct 2>/dev/null
dd if=$dev of=/tmp/small bs=4096 skip=1024 count=64 2>/dev/null
echo "pattern $(md5sum < /pattern.bin)"
echo "low $(md5sum < /tmp/lo)"
echo "high $(md5sum < /tmp/hi)"
echo "small $(md5sum < /tmp/small)"
echo "sector $(dd if=$dev bs=512 skip=12345 count=1 2>/dev/null | md5sum)"
"""


def make_image(path: Path, fill: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(IMAGE_SIZE)
        else:
            f.write(fill * (IMAGE_SIZE // len(fill)))
    return path


def expected_image() -> bytes:
    img = bytearray(IMAGE_SIZE)
    img[LOW:LOW + MiB] = PATTERN
    img[HIGH:HIGH + MiB] = PATTERN
    img[4 * MiB:4 * MiB + 256 * 1024] = PATTERN[:256 * 1024]
    img[12345 * 512:12346 * 512] = PATTERN[:512]
    return bytes(img)


def guest(script: str, devices: list, **kw) -> str:  # noqa: ANN003
    result = run_guest(script, devices=devices, extra_files={"/pattern.bin": PATTERN}, timeout=TIMEOUT, **kw)
    result.check()
    return result.output


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - a checksum, as busybox md5sum prints


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for UNIX sockets (sun_path is ~108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vhu-blk-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.both_impls  # the guest's I/O runs through the data-path core
def test_guest_io_same_as_qemu_storage_daemon(tmp_path: Path, short_dir: Path, no_fd_leak: None) -> None:
    ours_img = make_image(tmp_path / "ours.img")
    qsd_img = make_image(tmp_path / "qsd.img")

    # --- our daemon, in this process
    sock = short_dir / "ours.sock"
    backend = BlkBackend(ours_img)
    try:
        with VhostUserDaemon("blk", backend) as daemon:
            daemon.start_server(str(sock))
            ours_out = guest(IO_SCRIPT, [VhostUserDevice("blk", sock)])
        served = sum(backend.requests_served)
    finally:
        backend.close()

    # --- qemu-storage-daemon, same script
    with qsd_export(qsd_img, short_dir / "qsd.sock") as qsock:
        qsd_out = guest(IO_SCRIPT, [VhostUserDevice("blk", qsock)])

    p = md5(PATTERN)
    lines = dict(line.split(" ", 1) if " " in line else line.split("=", 1) for line in ours_out.split("\n") if line)
    assert ours_out.startswith(f"sectors={IMAGE_SIZE // 512}\n")
    assert lines["pattern"].split()[0] == lines["low"].split()[0] == lines["high"].split()[0] == p
    assert lines["small"].split()[0] == md5(PATTERN[:256 * 1024])
    assert lines["sector"].split()[0] == md5(PATTERN[:512])
    assert served > 64
    assert ours_out == qsd_out  # same checksums, line for line

    expect = expected_image()
    ours, theirs = ours_img.read_bytes(), qsd_img.read_bytes()
    assert ours[LOW:LOW + MiB] == PATTERN and ours[HIGH:] == PATTERN
    assert ours == expect
    assert theirs == expect  # qemu-storage-daemon wrote exactly the same bytes


MQ_SCRIPT = r"""
set -e
for b in vda vdb; do
  f=$(cat /sys/block/$b/device/features)
  echo "$b serial=$(cat /sys/block/$b/serial) ro=$(cat /sys/block/$b/ro) packed=$(echo $f | cut -c35) mq=$(echo $f | cut -c13) queues=$(ls /sys/block/$b/mq | wc -l)"
done
echo "cpus=$(nproc)"
# one writer per CPU: blk-mq maps each CPU to its own hardware queue
taskset -c 0 dd if=/pattern.bin of=/dev/vda bs=4096 seek=256 oflag=direct 2>/dev/null &
taskset -c 1 dd if=/pattern.bin of=/dev/vda bs=4096 seek=512 oflag=direct 2>/dev/null &
wait
echo "a $(dd if=/dev/vda bs=4096 skip=256 count=256 iflag=direct 2>/dev/null | md5sum)"
echo "b $(dd if=/dev/vda bs=4096 skip=512 count=256 iflag=direct 2>/dev/null | md5sum)"
# discard the middle 256 KiB of the second copy
blkdiscard -o $(( 512 * 4096 + 262144 )) -l 262144 /dev/vda
echo "discarded $(dd if=/dev/vda bs=4096 skip=576 count=64 iflag=direct 2>/dev/null | md5sum)"
echo "ro-read $(dd if=/dev/vdb bs=65536 count=16 iflag=direct 2>/dev/null | md5sum)"
if dd if=/pattern.bin of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then echo ro-write=ok; else echo ro-write=refused; fi
"""


@pytest.mark.both_impls  # the guest's I/O runs through the data-path core
def test_guest_multiqueue_packed_direct_and_a_read_only_disk(tmp_path: Path, short_dir: Path) -> None:
    rw_img = make_image(tmp_path / "rw.img")
    ro_img = make_image(tmp_path / "ro.img", fill=PATTERN)

    # the read-only disk: the command, serving a listening socket we hand it (--fd)
    ro_sock = short_dir / "ro.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(ro_sock))
    listener.listen(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostuser", "blk", "--fd", str(listener.fileno()), "--blk-file", str(ro_img),
         "--read-only", "--serial", "ro-disk"],
        pass_fds=[listener.fileno()], stderr=subprocess.PIPE, text=True)
    listener.close()
    rw_sock = short_dir / "rw.sock"
    backend = BlkBackend(rw_img, num_queues=2, direct=True, serial="rw-disk")
    try:
        with VhostUserDaemon("blk", backend) as daemon:
            daemon.start_server(str(rw_sock))
            out = guest(MQ_SCRIPT, [VhostUserDevice("blk", rw_sock, extra="num-queues=2,packed=on"),
                                    VhostUserDevice("blk", ro_sock, extra="num-queues=1")], cpus=2)
        per_queue = list(backend.requests_served)
        bounced = backend.image.bounced
    finally:
        backend.close()
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()

    lines = out.split("\n")
    assert lines[0] == "vda serial=rw-disk ro=0 packed=1 mq=1 queues=2", out
    assert lines[1] == "vdb serial=ro-disk ro=1 packed=0 mq=0 queues=1", out
    assert lines[2] == "cpus=2"
    p = md5(PATTERN)
    assert f"a {p}  -" in lines and f"b {p}  -" in lines, out
    assert f"discarded {md5(bytes(262144))}  -" in lines, out
    assert f"ro-read {p}  -" in lines and "ro-write=refused" in lines, out
    assert all(n > 0 for n in per_queue), per_queue  # both queues carried requests
    # O_DIRECT went straight into the guest's (aligned) buffers, not through the bounce buffer
    assert bounced < sum(per_queue) // 10, (bounced, per_queue)

    rw = rw_img.read_bytes()
    assert rw[256 * 4096:512 * 4096] == PATTERN
    assert rw[512 * 4096:576 * 4096] == PATTERN[:262144]
    assert rw[576 * 4096:640 * 4096] == bytes(262144)
    assert rw[640 * 4096:768 * 4096] == PATTERN[524288:]
    assert ro_img.read_bytes() == PATTERN * (IMAGE_SIZE // MiB)  # untouched
