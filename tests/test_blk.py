"""virtio-blk device: the image layer, the request engine and the ring glue,
driven through real virtqueues (split and packed) over anonymous guest memory."""
from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import pytest

from vhostuser import EVENT_READ
from vhostuser.devices.blk import image as image_mod
from vhostuser.devices.blk.cli import CAPABILITIES
from vhostuser.devices.blk.device import BlkBackend
from vhostuser.devices.blk.engine import (
    CONFIG_SIZE,
    DWZ_SEGMENT,
    OUTHDR,
    BlkFeature,
    BlkRequestEngine,
    RequestType,
    Status,
    VirtioBlkConfig,
)
from vhostuser.devices.blk.image import BlockImage
from vhostuser.errors import BlkImageError, DeviceError, QueueError
from vhostuser.memory import GuestMemory
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.protocol.message import VirtioFeatures as VF
from vhostuser.sys_util.event import new_event_consumer_and_notifier
from vhostuser.virtqueue.driver import RingDriver
from vhostuser.vring import VringState

MiB = 1 << 20
IMAGE_SIZE = 4 * MiB
SECTORS = IMAGE_SIZE // 512
MEM_SIZE = 8 * MiB
T = RequestType


def pattern(n: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating-looking bytes."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += struct.pack("<QQ", seed, i) * 32
        i += 1
    return bytes(out[:n])


def hdr(rtype: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return OUTHDR.pack(rtype, ioprio, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return DWZ_SEGMENT.pack(sector, num, flags)


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return p


class Rig:
    """A driver-side ring over anonymous guest memory, a device queue on it, and an engine."""

    def __init__(self, engine: BlkRequestEngine, *, packed: bool = False, event_idx: bool = False,
                 size: int = 128) -> None:
        self.engine = engine
        self.mem = GuestMemory.anonymous([(0, MEM_SIZE)])
        self.drv = RingDriver.create(self.mem, size, packed=packed, event_idx=event_idx)
        self.queue = self.drv.make_queue()

    def submit(self, readable: Sequence[bytes], writable: Sequence[int], *, indirect: bool = False
               ) -> tuple[int, bytes]:
        """One request; returns (used length, the first used-length bytes of the writable buffers)."""
        token = self.drv.add(list(readable), list(writable), indirect=indirect)
        self.drv.publish()
        chains = self.queue.pop_batch(64)
        assert len(chains) == 1
        self.queue.add_used_batch([(c, self.engine.process(c)) for c in chains])
        used = self.drv.get_used()
        assert [t for t, _ in used] == [token]
        length = used[0][1]
        self.last_status = None
        if writable:
            gpa, n = self.drv.placed[token][-1]
            self.last_status = self.mem.read(gpa + n - 1, 1)[0]
        return length, self.drv.read_written(token, length)

    def request(self, rtype: int, sector: int = 0, data: bytes = b"", read_len: int = 0) -> tuple[Status, bytes]:
        """A well-formed request: header (+ data) readable, (read_len +) status writable."""
        readable = [hdr(rtype, sector)] + ([data] if data else [])
        writable = ([read_len] if read_len else []) + [1]
        length, written = self.submit(readable, writable)
        status = Status(self.last_status)
        if status != Status.OK:  # the used length counts what was written: the status byte only
            assert length == 1, (status, length)
            return status, b""
        assert length == read_len + 1 and written[-1] == status
        return status, written[:-1]

    def close(self) -> None:
        del self.queue  # it holds views of the ring areas
        self.mem.close()


@pytest.fixture
def image(image_path: Path) -> Iterator[BlockImage]:
    img = BlockImage(image_path)
    yield img
    img.close()


@pytest.fixture
def rig(image: BlockImage) -> Iterator[Rig]:
    r = Rig(BlkRequestEngine(image, serial="SN-0001"))
    yield r
    r.close()


def host_bytes(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


# ------------------------------------------------------------------ config space
def test_config_layout_matches_virtio_blk_config(image: BlockImage) -> None:
    engine = BlkRequestEngine(image, num_queues=3, seg_max=254)
    raw = engine.config().pack()
    assert len(raw) == CONFIG_SIZE == 96
    capacity, size_max, seg_max = struct.unpack_from("<QII", raw, 0)
    assert (capacity, size_max, seg_max) == (SECTORS, 0, 254)
    assert struct.unpack_from("<I", raw, 20)[0] == 512                      # blk_size
    assert struct.unpack_from("<BBHI", raw, 24) == (0, 0, 1, 0)             # topology
    assert raw[32] == 1                                                      # writeback
    assert struct.unpack_from("<H", raw, 34)[0] == 3                        # num_queues
    max_discard, max_discard_seg, align, max_wz, max_wz_seg = struct.unpack_from("<IIIII", raw, 36)
    assert max_discard > 0 and max_discard_seg > 0 and align == 1 and max_wz > 0 and max_wz_seg > 0
    assert raw[56] == 1                                                      # write_zeroes_may_unmap
    assert raw[57:] == bytes(CONFIG_SIZE - 57)
    assert VirtioBlkConfig.unpack(raw[:57]) == engine.config()               # QEMU 7.2 reads 57 bytes


def test_features_and_read_only_config(image_path: Path) -> None:
    with BlockImage(image_path, read_only=True) as ro:
        engine = BlkRequestEngine(ro)
        f = BlkFeature(engine.features())
        assert BlkFeature.RO in f and BlkFeature.FLUSH in f
        assert BlkFeature.DISCARD not in f and BlkFeature.WRITE_ZEROES not in f
        cfg = engine.config()
        assert cfg.max_discard_sectors == cfg.max_write_zeroes_sectors == cfg.write_zeroes_may_unmap == 0


def test_writeback_follows_flush_negotiation(image: BlockImage) -> None:
    engine = BlkRequestEngine(image)
    engine.set_acked_features(int(BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE))  # SeaBIOS
    assert not engine.writeback and engine.config().writeback == 0
    engine.set_acked_features(engine.features())  # Linux
    assert engine.writeback
    engine.set_writeback(0)
    assert engine.config().writeback == 0


# ----------------------------------------------------------------------- requests
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_write_then_read_lands_at_the_right_offset(image_path: Path, image: BlockImage, packed: bool,
                                                   indirect: bool) -> None:
    r = Rig(BlkRequestEngine(image), packed=packed)
    try:
        data = pattern(3 * 4096, seed=7)
        sector = 1000
        # data split over three descriptors of odd sizes (sum is a multiple of 512)
        parts = [data[:1000], data[1000:5000], data[5000:]]
        length, written = r.submit([hdr(T.OUT, sector)] + parts, [1], indirect=indirect)
        assert (length, written) == (1, b"\x00")
        assert host_bytes(image_path, sector * 512, len(data)) == data
        length, written = r.submit([hdr(T.IN, sector)], [4096, 4096, 4095, 2], indirect=indirect)
        assert length == len(data) + 1
        assert written == data + b"\x00"
        assert r.engine.stats.reads == 1 and r.engine.stats.writes == 1
    finally:
        r.close()


def test_header_split_over_descriptors(rig: Rig, image_path: Path) -> None:
    h = hdr(T.OUT, 8)
    length, written = rig.submit([h[:3], h[3:11], h[11:] + b"\xab" * 512], [1])
    assert written == b"\x00"
    assert host_bytes(image_path, 8 * 512, 512) == b"\xab" * 512


def test_last_sector_and_out_of_range(rig: Rig, image_path: Path) -> None:
    assert rig.request(T.OUT, SECTORS - 1, b"\x5a" * 512)[0] == Status.OK
    assert host_bytes(image_path, IMAGE_SIZE - 512, 512) == b"\x5a" * 512
    # one sector past the end, straddling the end, absurd sectors
    for sector, n in [(SECTORS, 512), (SECTORS - 1, 1024), (1 << 55, 512), ((1 << 64) - 1, 512)]:
        assert rig.request(T.OUT, sector, b"\x11" * n)[0] == Status.IOERR
        status, data = rig.request(T.IN, sector, read_len=n)
        assert status == Status.IOERR
    assert os.path.getsize(image_path) == IMAGE_SIZE  # nothing written past the end
    assert rig.engine.stats.errors == 8


def test_data_not_a_multiple_of_512_is_ioerr(rig: Rig, image_path: Path) -> None:
    assert rig.request(T.OUT, 0, b"\x77" * 513)[0] == Status.IOERR
    assert rig.request(T.IN, 0, read_len=100)[0] == Status.IOERR
    assert host_bytes(image_path, 0, 1024) == bytes(1024)


def test_short_header_and_missing_status(rig: Rig, image_path: Path) -> None:
    length, written = rig.submit([b"\x01\x00\x00\x00" + bytes(8)], [1])  # 12-byte header
    assert (length, written) == (1, bytes([Status.IOERR]))
    length, written = rig.submit([hdr(T.OUT, 0) + b"\x33" * 512], [])  # no writable byte at all
    assert length == 0
    assert rig.engine.stats.no_status == 1
    assert host_bytes(image_path, 0, 512) == bytes(512)  # not executed


def test_used_length_counts_only_the_bytes_written(rig: Rig) -> None:
    """Issue 10: a failed request reports 1 (its status byte), not the whole writable part."""
    length, _ = rig.submit([hdr(T.IN, SECTORS)], [4096, 1])  # a read at capacity
    assert (length, rig.last_status) == (1, Status.IOERR)
    length, _ = rig.submit([hdr(0x7777, 0)], [512, 1])  # a bogus request type
    assert (length, rig.last_status) == (1, Status.UNSUPP)
    length, _ = rig.submit([hdr(T.IN, 0), bytes(512)], [1])  # a read into a device-readable buffer
    assert (length, rig.last_status) == (1, Status.IOERR)
    length, written = rig.submit([hdr(T.GET_ID, 0)], [20, 1])  # a successful request: data + status
    assert length == 21 and rig.last_status == Status.OK


def test_zero_length_requests(rig: Rig) -> None:
    assert rig.request(T.IN, 0) == (Status.OK, b"")
    assert rig.request(T.OUT, SECTORS) == (Status.OK, b"")  # zero bytes at the end are in range


def test_unknown_and_unsupported_types(rig: Rig) -> None:
    for t in (T.GET_LIFETIME, T.SECURE_ERASE, 99, 0xFFFFFFFF):
        assert rig.request(t, 0, read_len=16)[0] == Status.UNSUPP
    assert rig.engine.stats.unsupported == 4


def test_get_id(rig: Rig, image: BlockImage) -> None:
    status, ident = rig.request(T.GET_ID, read_len=20)
    assert status == Status.OK and ident == b"SN-0001" + bytes(13)
    full = Rig(BlkRequestEngine(image, serial="A" * 20))
    try:
        assert full.request(T.GET_ID, read_len=20) == (Status.OK, b"A" * 20)
    finally:
        full.close()
    with pytest.raises(ValueError):
        BlkRequestEngine(image, serial="B" * 21)


def test_flush_and_write_through(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(rig.engine.image, "flush", lambda: calls.append(1))
    assert rig.request(T.FLUSH)[0] == Status.OK
    assert len(calls) == 1
    rig.request(T.OUT, 0, bytes(512))
    assert len(calls) == 1  # write-back: no sync per write
    rig.engine.set_writeback(0)
    rig.request(T.OUT, 0, bytes(512))
    assert len(calls) == 2  # write-through: every write is synced


def test_io_error_becomes_ioerr(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(rig.engine.image, "readv", fail)
    assert rig.request(T.IN, 0, read_len=512)[0] == Status.IOERR


def test_read_only_image(image_path: Path) -> None:
    with open(image_path, "r+b") as f:
        f.write(b"\x42" * 512)
    with BlockImage(image_path, read_only=True) as ro:
        r = Rig(BlkRequestEngine(ro))
        try:
            assert r.request(T.IN, 0, read_len=512) == (Status.OK, b"\x42" * 512)
            assert r.request(T.OUT, 0, b"\x00" * 512)[0] == Status.IOERR
            assert r.request(T.DISCARD, 0, seg(0, 1))[0] == Status.UNSUPP
            assert r.request(T.WRITE_ZEROES, 0, seg(0, 1))[0] == Status.UNSUPP
            assert r.request(T.FLUSH)[0] == Status.OK
        finally:
            r.close()
        with pytest.raises(BlkImageError):
            ro.write(0, b"\x00" * 512)
    assert host_bytes(image_path, 0, 512) == b"\x42" * 512


# ------------------------------------------------------------ discard / zeroes
def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_discard_punches_a_hole(rig: Rig, image_path: Path) -> None:
    data = pattern(MiB, seed=3)
    assert rig.request(T.OUT, 0, data)[0] == Status.OK
    os.fsync(rig.engine.image.fd)
    before = allocated(image_path)
    # two segments: [256 KiB, +256 KiB) and [768 KiB, +64 KiB)
    assert rig.request(T.DISCARD, 0, seg(512, 512) + seg(1536, 128))[0] == Status.OK
    got = host_bytes(image_path, 0, MiB)
    assert got[: 256 << 10] == data[: 256 << 10]
    assert got[256 << 10: 512 << 10] == bytes(256 << 10)
    assert got[512 << 10: 768 << 10] == data[512 << 10: 768 << 10]
    assert got[768 << 10: 832 << 10] == bytes(64 << 10)
    assert got[832 << 10:] == data[832 << 10:]
    assert allocated(image_path) <= before - (320 << 10)  # the blocks are gone
    assert os.path.getsize(image_path) == IMAGE_SIZE
    assert rig.engine.stats.discards == 1


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(rig: Rig, image_path: Path, unmap: bool) -> None:
    data = pattern(MiB, seed=4)
    rig.request(T.OUT, 0, data)
    os.fsync(rig.engine.image.fd)
    before = allocated(image_path)
    assert rig.request(T.WRITE_ZEROES, 0, seg(1024, 256, flags=int(unmap)))[0] == Status.OK
    got = host_bytes(image_path, 0, MiB)
    assert got == data[: 512 << 10] + bytes(128 << 10) + data[640 << 10:]
    if unmap:
        assert allocated(image_path) <= before - (128 << 10)
    assert os.path.getsize(image_path) == IMAGE_SIZE


def test_discard_falls_back_to_writing_zeros(rig: Rig, image_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.request(T.OUT, 0, b"\xff" * 8192)
    monkeypatch.setattr(image_mod.fileops, "HAVE_FALLOCATE", False)
    assert rig.request(T.DISCARD, 0, seg(2, 4))[0] == Status.OK
    assert rig.request(T.WRITE_ZEROES, 0, seg(10, 2, flags=1))[0] == Status.OK
    got = host_bytes(image_path, 0, 8192)
    assert got == b"\xff" * 1024 + bytes(2048) + b"\xff" * 2048 + bytes(1024) + b"\xff" * 2048


def test_discard_write_zeroes_validation(rig: Rig, image_path: Path) -> None:
    rig.request(T.OUT, 0, b"\xee" * 4096)
    eng = rig.engine
    cases = [
        (T.DISCARD, seg(0, 1, flags=1), Status.UNSUPP),                 # unmap on discard
        (T.WRITE_ZEROES, seg(0, 1, flags=2), Status.UNSUPP),            # reserved flag
        (T.DISCARD, seg(0, 1)[:15], Status.IOERR),                       # truncated segment
        (T.DISCARD, b"", Status.IOERR),                                  # no segment
        (T.DISCARD, seg(0, eng.max_discard_sectors + 1), Status.IOERR),  # too long
        (T.DISCARD, seg(0, 1) * (eng.max_discard_seg + 1), Status.UNSUPP),  # too many
        (T.WRITE_ZEROES, seg(0, 1) + seg(SECTORS, 1), Status.IOERR),     # 2nd out of range
    ]
    for rtype, payload, expect in cases:
        assert rig.request(rtype, 0, payload)[0] == expect, (rtype, payload)
    # validated before applied: the first segment of the last case was not zeroed
    assert host_bytes(image_path, 0, 4096) == b"\xee" * 4096
    eng.set_acked_features(eng.features() & ~BlkFeature.DISCARD)
    assert rig.request(T.DISCARD, 0, seg(0, 1))[0] == Status.UNSUPP


# -------------------------------------------------------------------- the image
def test_image_checks(tmp_path: Path, image_path: Path) -> None:
    with pytest.raises(BlkImageError, match="cannot open"):
        BlockImage(tmp_path / "missing.img")
    with pytest.raises(BlkImageError, match="cannot open"):
        BlockImage(tmp_path)  # a directory, read-write
    with pytest.raises(BlkImageError, match="neither"):
        BlockImage(tmp_path, read_only=True)
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with BlockImage(odd) as img:
        assert img.capacity == 1  # the partial sector is not addressable
        with pytest.raises(BlkImageError):
            img.read(512, 512)


def test_image_lock(image_path: Path) -> None:
    with BlockImage(image_path):
        with pytest.raises(BlkImageError, match="in use"):
            BlockImage(image_path)
        with pytest.raises(BlkImageError, match="in use"):
            BlockImage(image_path, read_only=True)
        BlockImage(image_path, lock=False).close()
    with BlockImage(image_path, read_only=True), BlockImage(image_path, read_only=True):
        pass  # readers share


def test_vectors_longer_than_iov_max(image: BlockImage) -> None:
    n = 2100  # > IOV_MAX (1024)
    data = pattern(n * 512, seed=9)
    src = memoryview(bytearray(data))
    assert image.writev([src[i * 512:(i + 1) * 512] for i in range(n)], 0) == len(data)
    dst = bytearray(len(data))
    view = memoryview(dst)
    assert image.readv([view[i * 512:(i + 1) * 512] for i in range(n)], 0) == len(data)
    assert dst == data


def test_direct_io_zero_copy_and_bounce(image_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bounces = []
    orig = BlockImage._bounce

    def spy(self: BlockImage, n: int):  # noqa: ANN202
        bounces.append(n)
        return orig(self, n)

    monkeypatch.setattr(BlockImage, "_bounce", spy)
    with BlockImage(image_path, direct=True) as img:
        a = img.direct_alignment
        assert a in (512, 1024, 2048, 4096) and img.logical_block_size == a
        assert BlkRequestEngine(img).config().blk_size == a
        # a page-aligned guest buffer: zero copy
        mem = GuestMemory.anonymous([(0, MiB)])
        try:
            data = pattern(4 * a, seed=11)
            mem.write(4096, data)
            assert img.writev(mem.get_slices(4096, len(data)), 0) == len(data)
            assert bounces == []
            mem.fill(4096, len(data))
            assert img.readv(mem.get_slices(4096, len(data)), 0) == len(data)
            assert bounces == [] and mem.read(4096, len(data)) == data
            # a misaligned guest buffer: through the bounce buffer
            assert img.readv(mem.get_slices(4096 + 8, len(data)), 0) == len(data)
            assert bounces == [len(data)] and mem.read(4096 + 8, len(data)) == data
            mem.write(8192 + 8, data[::-1])
            assert img.writev(mem.get_slices(8192 + 8, len(data)), 4 * a) == len(data)
            # an unaligned offset/length (a guest ignoring blk_size): buffered fd
            assert img.write(512 * 3, b"\x99" * 512) == 512
        finally:
            mem.close()
    with open(image_path, "rb") as f:
        got = f.read(8 * a)
    expect = bytearray(data + data[::-1])
    expect[1536:2048] = b"\x99" * 512
    assert got == bytes(expect)


def test_direct_engine_round_trip_through_a_ring(image_path: Path) -> None:
    with BlockImage(image_path, direct=True) as img:
        r = Rig(BlkRequestEngine(img))
        try:
            data = pattern(16384, seed=12)
            assert r.request(T.OUT, 64, data)[0] == Status.OK
            assert r.request(T.IN, 64, read_len=len(data)) == (Status.OK, data)
        finally:
            r.close()
    assert host_bytes(image_path, 64 * 512, 16384) == data


# ---------------------------------------------------------------- the backend
def test_backend_negotiation_and_config(image_path: Path) -> None:
    be = BlkBackend(image_path, num_queues=4, queue_size=256, queues_per_thread=3)
    try:
        f = be.features()
        assert f & VF.VERSION_1 and f & VF.RING_PACKED and f & VF.RING_EVENT_IDX
        assert f & BlkFeature.MQ and f & BlkFeature.FLUSH and f & BlkFeature.DISCARD
        assert be.protocol_features() & PF.CONFIG
        assert be.num_queues == 4 and be.max_queue_size == 256
        assert list(be.queues_per_thread()) == [0b0111, 0b1000]
        cfg = VirtioBlkConfig.unpack(be.get_config(0, 57))
        assert cfg.capacity == SECTORS and cfg.num_queues == 4 and cfg.seg_max == 126
        assert be.get_config(32, 1) == b"\x01"
        be.set_config(32, b"\x00")
        assert be.get_config(32, 1) == b"\x00" and not be.engine.writeback
        with pytest.raises(DeviceError):
            be.set_config(0, b"\x00" * 8)
        with pytest.raises(DeviceError):
            be.get_config(90, 10)
        be.acked_features(f & ~BlkFeature.FLUSH)
        assert not be.engine.writeback
        be.reset_device()
        assert be.engine.writeback
    finally:
        be.close()
    assert be.image.closed


def test_backend_rejects_bad_arguments(image_path: Path) -> None:
    for kw in ({"num_queues": 0}, {"queue_size": 2}, {"queues_per_thread": 0}, {"seg_max": 255, "queue_size": 256}):
        with pytest.raises(ValueError):
            BlkBackend(image_path, **kw)  # type: ignore[arg-type]


class RingBench:
    """A BlkBackend serving one VringState built by hand, with a call eventfd."""

    def __init__(self, image_path: Path, *, packed: bool, event_idx: bool) -> None:
        self.backend = BlkBackend(image_path)
        self.mem = GuestMemory.anonymous([(0, MEM_SIZE)])
        self.drv = RingDriver.create(self.mem, 128, packed=packed, event_idx=event_idx)
        self.vring = VringState(0, 1024, threading.RLock())
        self.vring.queue = self.drv.make_queue()
        self.vring.started = self.vring.enabled = True
        self.call_consumer, self.vring.call = new_event_consumer_and_notifier()

    def close(self) -> None:
        self.vring.close_fds()
        self.vring.queue = None
        self.call_consumer.close()
        self.mem.close()
        self.backend.close()


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_backend_serves_a_ring(image_path: Path, packed: bool, event_idx: bool, no_fd_leak: None) -> None:
    bench = RingBench(image_path, packed=packed, event_idx=event_idx)
    try:
        drv = bench.drv
        tokens = {}
        for i in range(40):  # more than fit at once in some layouts: three rounds
            tokens[drv.add([hdr(T.OUT, i * 8), pattern(4096, seed=i)], [1])] = i
        drv.publish()
        assert drv.kick_needed()
        assert bench.backend.handle_event(0, EVENT_READ, {0: bench.vring}, 0) is None
        used = drv.get_used()
        assert sorted(tokens[t] for t, _ in used) == list(range(40))
        assert all(length == 1 for _, length in used)
        assert bench.call_consumer.consume()  # the driver was notified
        assert not bench.call_consumer.consume()
        for i in range(40):
            assert host_bytes(image_path, i * 4096, 4096) == pattern(4096, seed=i)
        # reads, and a bad request in the middle of the batch
        t1 = drv.add([hdr(T.IN, 8)], [4096, 1])
        t2 = drv.add([hdr(T.IN, SECTORS)], [512, 1])
        t3 = drv.add([hdr(T.GET_ID)], [20, 1])
        drv.publish()
        assert bench.backend.process_queue(bench.vring) == 3
        used = dict(drv.get_used())
        assert drv.read_written(t1, used[t1]) == pattern(4096, seed=1) + b"\x00"
        status_gpa, _ = drv.placed[t2][-1]
        assert used[t2] == 1 and bench.mem.read(status_gpa, 1)[0] == Status.IOERR  # only the status was written
        assert drv.read_written(t3, used[t3]) == bytes(21)
        assert bench.call_consumer.consume()
    finally:
        bench.close()


def test_backend_hostile_ring_fails_the_queue_not_the_image(image_path: Path) -> None:
    bench = RingBench(image_path, packed=False, event_idx=False)
    try:
        drv = bench.drv
        drv.write_desc(0, MEM_SIZE + 4096, 16)  # outside guest memory
        drv.push_avail(0)
        drv.publish()
        with pytest.raises(QueueError):
            bench.backend.handle_event(0, EVENT_READ, {0: bench.vring}, 0)
        assert os.stat(image_path).st_blocks == 0
    finally:
        bench.close()


def test_backend_ignores_a_stopped_ring(image_path: Path) -> None:
    bench = RingBench(image_path, packed=False, event_idx=False)
    try:
        bench.drv.add([hdr(T.FLUSH)], [1])
        bench.drv.publish()
        bench.vring.enabled = False
        assert bench.backend.process_queue(bench.vring) == 0
        bench.vring.enabled = True
        bench.backend.vring_started(0, bench.vring)  # pending requests are served on enable
        assert len(bench.drv.get_used()) == 1
    finally:
        bench.close()


# -------------------------------------------------------------------- discovery
def test_discovery_descriptor_and_capabilities() -> None:
    text = resources.files("vhostuser.devices").joinpath("blk.json").read_text()
    desc = json.loads(text)
    assert desc["type"] == "block" == CAPABILITIES["type"]  # VHostUserBackendType
    assert set(desc["features"]) == set(CAPABILITIES["features"]) == {"read-only", "blk-file"}
    assert desc["binary"] and desc["description"]


def test_hostile_ring_found_at_enable_fails_the_ring(image_path: Path) -> None:
    bench = RingBench(image_path, packed=False, event_idx=False)
    try:
        bench.drv.write_desc(0, MEM_SIZE + 4096, 16)
        bench.drv.push_avail(0)
        bench.drv.publish()
        bench.backend.vring_started(0, bench.vring)  # the protocol thread: must not raise
        assert isinstance(bench.vring.failed, QueueError)
    finally:
        bench.close()
