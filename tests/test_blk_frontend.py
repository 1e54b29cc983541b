"""The virtio-blk device served by VhostUserDaemon, driven by the mock front-end
(QEMU 7.2's vhost-user-blk message order), and the ``vhostuser blk`` command."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.procs import vhostuser_process, wait_for_path

from vhostuser.devices.blk.device import BlkBackend
from vhostuser.devices.blk.engine import DWZ_SEGMENT, OUTHDR, BlkFeature, RequestType, Status, VirtioBlkConfig
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.protocol.message import VirtioFeatures as VF
from vhostuser.testing import FrontendOptions, MockFrontend

T = RequestType
IMAGE_SIZE = 8 << 20
SECTORS = IMAGE_SIZE // 512
ALL_BLK = int(BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH | BlkFeature.TOPOLOGY
              | BlkFeature.CONFIG_WCE | BlkFeature.MQ | BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES
              | BlkFeature.RO)
#: QEMU 7.2's vhost-user-blk-pci: 128 entries, SET_FEATURES twice, GET_CONFIG of 57 bytes
QEMU_BLK = FrontendOptions(queue_size=128, set_features_twice=True, config_size=57, device_features=ALL_BLK)


def hdr(rtype: int, sector: int = 0) -> bytes:
    return OUTHDR.pack(rtype, 0, sector)


def blob(n: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(n)


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return p


def host(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def status_of(fe: MockFrontend, index: int, used) -> int:  # noqa: ANN001
    """The status byte: the last byte of the chain's last writable buffer."""
    gpa, n = fe.driver(index).placed[used.token][-1]
    return fe.ram.memory.read(gpa + n - 1, 1)[0]


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_io_through_the_daemon(no_fd_leak, serve_backend, image_path: Path, packed: bool, event_idx: bool) -> None:
    path = serve_backend(BlkBackend(image_path, serial="mock-disk"))
    with MockFrontend.connect(path, QEMU_BLK.replace(packed=packed, event_idx=event_idx)) as fe:
        assert bool(fe.acked_features & VF.RING_PACKED) == packed
        assert bool(fe.acked_features & VF.RING_EVENT_IDX) == event_idx
        cfg = VirtioBlkConfig.unpack(fe.get_config(0, 57))
        assert cfg.capacity == SECTORS and cfg.blk_size == 512 and cfg.seg_max == 126
        # 24 writes of 16 KiB each at scattered sectors, in batches
        writes = [([hdr(T.OUT, i * 512 + 8), blob(16384, i)], [1]) for i in range(24)]
        used = fe.transfer(0, writes)
        assert [u.length for u in used] == [1] * 24 and [u.data for u in used] == [b"\x00"] * 24
        for i in range(24):
            assert host(image_path, (i * 512 + 8) * 512, 16384) == blob(16384, i)
        # read them back through scattered writable buffers
        reads = [([hdr(T.IN, i * 512 + 8)], [4096, 8192, 4096, 1]) for i in range(24)]
        for i, u in enumerate(fe.transfer(0, reads)):
            assert u.length == 16385 and u.data == blob(16384, i) + b"\x00"
        ident = fe.request(0, [hdr(T.GET_ID)], [20, 1])
        assert ident.data == b"mock-disk".ljust(20, b"\0") + b"\x00"
        assert fe.request(0, [hdr(T.FLUSH)], [1]).data == b"\x00"
        # discard the third write's range
        disc = fe.request(0, [hdr(T.DISCARD), DWZ_SEGMENT.pack(2 * 512 + 8, 32, 0)], [1])
        assert disc.data == b"\x00"
        assert host(image_path, (2 * 512 + 8) * 512, 16384) == bytes(16384)


def test_multiqueue_each_queue_on_its_own_worker(serve_backend, image_path: Path) -> None:
    backend = BlkBackend(image_path, num_queues=2)
    assert len(backend.queues_per_thread()) == 2
    path = serve_backend(backend)
    with MockFrontend.connect(path, QEMU_BLK.replace(num_queues=2)) as fe:
        assert fe.acked_features & BlkFeature.MQ
        assert VirtioBlkConfig.unpack(fe.get_config(0, 57)).num_queues == 2
        for q in (0, 1):
            for i in range(4):
                fe.add(q, [hdr(T.OUT, (q * 16 + i) * 8), blob(4096, q * 16 + i)], [1])
        fe.publish(0)
        fe.publish(1)
        for q in (0, 1):
            assert [u.data for u in fe.wait_used(q, 4)] == [b"\x00"] * 4
        for q in (0, 1):
            for i in range(4):
                assert fe.request(1 - q, [hdr(T.IN, (q * 16 + i) * 8)], [4096, 1]).data[:-1] == blob(4096, q * 16 + i)


def test_bad_guest_requests_get_a_status_and_the_daemon_keeps_serving(serve_backend, image_path: Path) -> None:
    path = serve_backend(BlkBackend(image_path))
    with MockFrontend.connect(path, QEMU_BLK) as fe:
        bad = [
            ([b"\x01\x00\x00\x00"], [1], Status.IOERR),                          # 4-byte header
            ([hdr(T.OUT, SECTORS), bytes(512)], [1], Status.IOERR),              # past the end
            ([hdr(T.IN, SECTORS - 1)], [1024, 1], Status.IOERR),                 # straddles the end
            ([hdr(T.IN, 1 << 60)], [512, 1], Status.IOERR),                      # absurd sector
            ([hdr(T.OUT, 0), bytes(100)], [1], Status.IOERR),                    # not whole sectors
            ([hdr(77)], [1], Status.UNSUPP),                                     # unknown type
            ([hdr(T.DISCARD), DWZ_SEGMENT.pack(0, 1, 1)], [1], Status.UNSUPP),   # unmap on discard
        ]
        for readable, writable, expect in bad:
            used = fe.request(0, readable, writable)
            assert status_of(fe, 0, used) == expect, readable
        # no status byte at all: returned with length 0, nothing written
        assert fe.request(0, [hdr(T.OUT, 0), b"\xff" * 512], []).length == 0
        assert os.path.getsize(image_path) == IMAGE_SIZE
        assert host(image_path, 0, 512) == bytes(512)
        assert fe.request(0, [hdr(T.OUT, 0), b"\x01" * 512], [1]).data == b"\x00"  # still serving


def test_hostile_ring_signals_the_error_fd(serve_backend, image_path: Path) -> None:
    path = serve_backend(BlkBackend(image_path))
    with MockFrontend.connect(path, QEMU_BLK) as fe:
        drv = fe.driver(0)
        drv.write_desc(0, 1 << 40, 16)  # a buffer far outside guest RAM
        drv.push_avail(0)
        fe.publish(0, force_kick=True)
        assert fe.wait_err(0, timeout=5)
    assert os.stat(image_path).st_blocks == 0
    # the daemon takes the next front-end
    with MockFrontend.connect(path, QEMU_BLK) as fe:
        assert fe.request(0, [hdr(T.FLUSH)], [1]).data == b"\x00"


def test_read_only_disk(serve_backend, image_path: Path) -> None:
    image_path.write_bytes(b"\x5a" * IMAGE_SIZE)
    backend = BlkBackend(image_path, read_only=True)
    path = serve_backend(backend)
    with MockFrontend.connect(path, QEMU_BLK) as fe:
        assert fe.acked_features & BlkFeature.RO
        assert not fe.acked_features & (BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES)
        assert fe.request(0, [hdr(T.IN, 3)], [512, 1]).data == b"\x5a" * 512 + b"\x00"
        assert status_of(fe, 0, fe.request(0, [hdr(T.OUT, 3), bytes(512)], [1])) == Status.IOERR
        assert status_of(fe, 0, fe.request(0, [hdr(T.WRITE_ZEROES), DWZ_SEGMENT.pack(0, 8, 0)], [1])) == Status.UNSUPP
    assert image_path.read_bytes() == b"\x5a" * IMAGE_SIZE


def test_stop_restart_and_reconnect_keep_the_ring_position(serve_backend, image_path: Path) -> None:
    path = serve_backend(BlkBackend(image_path))
    with MockFrontend.connect(path, QEMU_BLK) as fe:
        fe.transfer(0, [([hdr(T.OUT, i * 8), blob(4096, i)], [1]) for i in range(5)])
        # QEMU's stop: SET_STATUS 0 first (7.2 does that), then SET_VRING_ENABLE 0 + GET_VRING_BASE
        if fe.protocol_features & PF.STATUS:
            fe.frontend.set_status(0)
        assert fe.stop() == [5]
        fe.restart()
        assert fe.request(0, [hdr(T.IN, 8)], [4096, 1]).data == blob(4096, 1) + b"\x00"
        # QEMU reconnect: the ring restarts from the used index
        fe.reconnect()
        assert fe.request(0, [hdr(T.IN, 16)], [4096, 1]).data == blob(4096, 2) + b"\x00"


def test_writeback_is_writable_through_set_config(serve_backend, image_path: Path) -> None:
    backend = BlkBackend(image_path)
    path = serve_backend(backend)
    with MockFrontend.connect(path, QEMU_BLK) as fe:
        assert fe.get_config(32, 1) == b"\x01"
        fe.set_config(32, b"\x00")  # what QEMU sends when the guest picks write-through
        assert fe.get_config(32, 1) == b"\x00"
        assert not backend.engine.writeback


# ---------------------------------------------------------------- the command
def test_blk_command_serves_the_image_and_stops_on_sigterm(tmp_path: Path, image_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    with vhostuser_process(["blk", "--socket-path", str(sock), "--image", str(image_path), "--num-queues", "2",
                            "--serial", "cli"], stderr=subprocess.PIPE, text=True) as proc:
        wait_for_path(sock, proc)
        for round_ in range(2):  # serves again after a disconnect
            with MockFrontend.connect(sock, QEMU_BLK.replace(num_queues=2)) as fe:
                assert fe.request(1, [hdr(T.OUT, 64 + round_), blob(512, round_)], [1]).data == b"\x00"
                assert fe.request(0, [hdr(T.GET_ID)], [20, 1]).data == b"cli".ljust(20, b"\0") + b"\x00"
        # a second writer on the same image is refused (flock)
        second = subprocess.run([sys.executable, "-m", "vhostuser", "blk", "--socket-path", str(tmp_path / "x"),
                                 "--blk-file", str(image_path)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "in use" in second.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert host(image_path, 64 * 512, 1024) == blob(512, 0) + blob(512, 1)


def test_blk_command_argument_errors(tmp_path: Path, image_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vhostuser", "blk", *args], capture_output=True, text=True,
                              timeout=60)

    out = run("--socket-path", str(tmp_path / "s"))
    assert out.returncode == 2 and "--blk-file" in out.stderr
    out = run("--socket-path", str(tmp_path / "s"), "--blk-file", str(image_path), "--socket-count", "2")
    assert out.returncode == 2 and "--read-only" in out.stderr
    out = run("--socket-path", str(tmp_path / "s"), "--blk-file", str(tmp_path / "missing"))
    assert out.returncode == 1 and "cannot open" in out.stderr
    out = run("--socket-path", str(tmp_path / "s"), "--blk-file", str(image_path), "--serial", "x" * 21)
    assert out.returncode == 1 and "serial" in out.stderr


def test_batch_path_reports_io_errors(no_fd_leak, serve_backend, image_path: Path) -> None:
    """A read the ring core's preadv cannot complete (the image shrank under the
    device) gets IOERR; its neighbours in the batch are served."""
    backend = BlkBackend(image_path)
    path = serve_backend(backend)
    with MockFrontend.connect(path, QEMU_BLK.replace(event_idx=True)) as fe:
        fe.transfer(0, [([hdr(T.OUT, 0), blob(4096, 1)], [1])])
        os.truncate(image_path, IMAGE_SIZE // 2)
        used = fe.transfer(0, [([hdr(T.IN, 0)], [4096, 1]), ([hdr(T.IN, SECTORS - 8)], [4096, 1])])
        assert used[0].data == blob(4096, 1) + b"\x00"
        status_gpa, n = fe.driver(0).placed[used[1].token][-1]
        assert used[1].length == 1  # a failed request wrote its status byte only
        assert fe.ram.memory.read(status_gpa + n - 1, 1) == bytes([Status.IOERR])
        deadline = time.monotonic() + 10  # the worker counts the error after publishing
        while backend.engine.stats.errors == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.engine.stats.errors == 1
        assert backend.engine.stats.reads == 1 and backend.engine.stats.writes == 1
