"""The virtio-scsi device through the daemon, driven by the mock front-end as
Linux's virtio_scsi + sd drive it: INQUIRY/VPD, READ CAPACITY, I/O, UNMAP,
WRITE SAME, MODE SENSE, REPORT LUNS, TMFs, events; and bad requests, each with
its sense key / response code."""
from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.procs import vhostuser_process, wait_for_path

from vhostuser.devices.scsi import protocol as p
from vhostuser.devices.scsi.device import LunSpec, ScsiBackend
from vhostuser.testing import FrontendOptions, MockFrontend

MiB = 1 << 20
SIZE = 8 * MiB
BLOCKS = SIZE // 512
RESP = p.RESP_CMD.size
#: QEMU 7.2's vhost-user-scsi-pci: 128 entries, HOTPLUG and CHANGE acked
OPTS = FrontendOptions(queue_size=128, device_features=int(p.ScsiFeature.HOTPLUG | p.ScsiFeature.CHANGE))


def blob(n: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(n)


def cmd(cdb: bytes, lun: int = 0, target: int = 0) -> bytes:
    return p.REQ_CMD.pack(p.encode_lun(target, lun), 7, 0, 0, 0, cdb.ljust(p.CDB_SIZE, b"\0"))


def cdb10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def cdb16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


class Reply:
    def __init__(self, data: bytes, length: int) -> None:
        self.sense_len, self.resid, _q, self.status, self.response, sense = p.RESP_CMD.unpack(data[:RESP])
        self.sense = sense[:self.sense_len]
        self.data = data[RESP:length]
        self.length = length

    @property
    def key_asc(self) -> tuple[int, int, int]:
        assert self.sense[0] == 0x70 and self.sense[7] == 10, self.sense.hex()
        return self.sense[2], self.sense[12], self.sense[13]


def run(fe: MockFrontend, cdb: bytes, data_in: int = 0, data_out: bytes = b"", lun: int = 0,
        target: int = 0) -> Reply:
    readable = [cmd(cdb, lun, target)] + ([data_out] if data_out else [])
    used = fe.request(2, readable, [RESP] + ([data_in] if data_in else []))
    return Reply(used.data, used.length)


def good(r: Reply) -> Reply:
    assert r.response == p.Response.OK and r.status == p.Status.GOOD, (r.response, r.status, r.sense.hex())
    return r


def check(r: Reply, sense: p.Sense) -> None:
    assert r.response == p.Response.OK and r.status == p.Status.CHECK_CONDITION
    assert r.key_asc == (sense.key, sense.asc, sense.ascq)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(2):
        path = tmp_path / f"lun{i}.img"
        with open(path, "wb") as f:
            f.truncate(SIZE)
        paths.append(path)
    return paths


@pytest.fixture
def fe(no_fd_leak, serve_backend, images: list[Path]):  # noqa: ANN001, ANN201
    backend = ScsiBackend([str(images[0]), LunSpec(str(images[1]), read_only=True)])
    path = serve_backend(backend)
    try:
        with MockFrontend.connect(path, OPTS) as front:
            front.backend = backend
            yield front
    finally:
        backend.close()


def test_queues_and_features(fe: MockFrontend) -> None:
    assert fe.queue_num == 3  # control, event, one request queue
    assert fe.acked_features & 0xF == p.ScsiFeature.HOTPLUG | p.ScsiFeature.CHANGE


def test_inquiry_and_vpd_pages(fe: MockFrontend) -> None:
    std = good(run(fe, bytes([0x12, 0, 0, 0, 96, 0]), 96)).data
    assert std[0] == 0 and std[2] == 5 and std[4] == 31 and std[8:16] == b"vhostusr" and len(std) == 36
    # the allocation length truncates
    assert good(run(fe, bytes([0x12, 0, 0, 0, 5, 0]), 96)).data == std[:5]
    pages = good(run(fe, bytes([0x12, 1, 0x00, 0, 255, 0]), 255)).data
    assert pages[1] == 0 and list(pages[4:4 + pages[3]]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    serial = good(run(fe, bytes([0x12, 1, 0x80, 0, 255, 0]), 255)).data
    assert serial[4:] == b"vhostuser-lun0"
    ident = good(run(fe, bytes([0x12, 1, 0x83, 0, 255, 0]), 255)).data
    assert ident[4:8] == bytes([2, 1, 0, 22]) and ident[8:] == b"vhostusrvhostuser-lun0"
    limits = good(run(fe, bytes([0x12, 1, 0xB0, 0, 255, 0]), 255)).data
    assert struct.unpack_from(">II", limits, 20) == (1 << 22, 255)  # max unmap blocks, descriptors
    chars = good(run(fe, bytes([0x12, 1, 0xB1, 0, 255, 0]), 255)).data
    assert chars[4:6] == b"\x00\x01"  # non-rotating
    lbp = good(run(fe, bytes([0x12, 1, 0xB2, 0, 255, 0]), 255)).data
    assert lbp[5] & 0xE4 == 0xE4 and lbp[6] & 7 == 2  # LBPU LBPWS LBPWS10 LBPRZ, thin
    check(run(fe, bytes([0x12, 1, 0x89, 0, 255, 0]), 255), p.INVALID_FIELD_IN_CDB)
    check(run(fe, bytes([0x12, 0, 0x80, 0, 255, 0]), 255), p.INVALID_FIELD_IN_CDB)


def test_read_capacity_mode_sense_report_luns(fe: MockFrontend) -> None:
    assert good(run(fe, bytes(10).replace(b"\0", b"\x25", 1), 8)).data == struct.pack(">II", BLOCKS - 1, 512)
    rc16 = good(run(fe, bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2), 32)).data
    assert struct.unpack_from(">QI", rc16) == (BLOCKS - 1, 512) and rc16[14] & 0xC0 == 0xC0
    check(run(fe, bytes([0x9E, 0x11]) + bytes(14), 32), p.INVALID_FIELD_IN_CDB)
    ms = good(run(fe, bytes([0x1A, 0, 0x3F, 0, 255, 0]), 255)).data
    assert ms[0] == len(ms) - 1 and ms[2] == 0 and ms[3] == 8  # not WP, one block descriptor
    caching = ms[4 + 8:]
    assert caching[0] == 0x08 and caching[2] & 0x04  # WCE
    ms_ro = good(run(fe, bytes([0x1A, 0x08, 0x08, 0, 255, 0]), 255, lun=1)).data
    assert ms_ro[2] == 0x80 and ms_ro[3] == 0 and ms_ro[4] == 0x08  # WP, DBD
    ms10 = good(run(fe, bytes([0x5A, 0, 0x0A, 0, 0, 0, 0, 0, 255, 0]), 255)).data
    assert struct.unpack_from(">H", ms10)[0] == len(ms10) - 2 and ms10[8 + 8] == 0x0A
    check(run(fe, bytes([0x1A, 0, 0x1C, 0, 255, 0]), 255), p.INVALID_FIELD_IN_CDB)
    check(run(fe, bytes([0x1A, 0, 0xC8, 0, 255, 0]), 255), p.SAVING_PARAMETERS_NOT_SUPPORTED)
    for lun in (0, 1, 5):  # the target's list, whichever LUN is asked
        luns = good(run(fe, bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 64) + bytes(2), 64, lun=lun)).data
        assert luns == struct.pack(">I4x", 16) + bytes([0, 0]) + bytes(6) + bytes([0, 1]) + bytes(6)
    check(run(fe, bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 8) + bytes(2), 64), p.INVALID_FIELD_IN_CDB)
    good(run(fe, bytes(6)))  # TEST UNIT READY
    sense = good(run(fe, bytes([0x03, 0, 0, 0, 18, 0]), 18)).data
    assert sense[0] == 0x70 and sense[2] == 0


def test_read_write_all_sizes_hit_the_image(fe: MockFrontend, images: list[Path]) -> None:
    data = blob(64 * 1024, 1)
    good(run(fe, cdb10(0x2A, 100, 128), data_out=data))
    with open(images[0], "rb") as f:
        f.seek(100 * 512)
        assert f.read(len(data)) == data
    assert good(run(fe, cdb10(0x28, 100, 128), 64 * 1024)).data == data
    # READ(6) / (12) / (16) and WRITE(6) / (12) / (16)
    good(run(fe, bytes([0x0A, 0, 0, 10, 2, 0]), data_out=data[:1024]))
    assert good(run(fe, bytes([0x08, 0, 0, 10, 2, 0]), 1024)).data == data[:1024]
    good(run(fe, struct.pack(">BBIIBB", 0xAA, 0, 20, 4, 0, 0), data_out=data[:2048]))
    assert good(run(fe, struct.pack(">BBIIBB", 0xA8, 0, 20, 4, 0, 0), 2048)).data == data[:2048]
    good(run(fe, cdb16(0x8A, BLOCKS - 8, 8), data_out=data[:4096]))
    r = good(run(fe, cdb16(0x88, BLOCKS - 8, 8), 4096 + 512))
    assert r.data == data[:4096] and r.resid == 512
    good(run(fe, cdb10(0x35, 0, 0)))  # SYNCHRONIZE CACHE(10)
    good(run(fe, cdb16(0x91, 0, 0)))


def test_unmap_and_write_same_punch_holes(fe: MockFrontend, images: list[Path]) -> None:
    for i in range(4):
        good(run(fe, cdb10(0x2A, 512 * i, 512), data_out=blob(256 * 1024, i)))
    allocated = os.stat(images[0]).st_blocks
    params = struct.pack(">HH4x", 6 + 16, 16) + struct.pack(">QI4x", 512, 512)
    good(run(fe, bytes([0x42, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", len(params)) + b"\0", data_out=params))
    assert os.stat(images[0]).st_blocks < allocated  # a hole: 256 KiB deallocated
    assert good(run(fe, cdb10(0x28, 512, 512), 256 * 1024)).data == bytes(256 * 1024)
    # WRITE SAME(16) with UNMAP and a zero block: another hole
    before = os.stat(images[0]).st_blocks
    good(run(fe, cdb16(0x93, 1024, 256, flags=0x08), data_out=bytes(512)))
    assert os.stat(images[0]).st_blocks < before
    # WRITE SAME(10) with a pattern block
    good(run(fe, cdb10(0x41, 4000, 3), data_out=b"\xab" * 512))
    assert good(run(fe, cdb10(0x28, 4000, 3), 1536)).data == b"\xab" * 1536
    check(run(fe, cdb16(0x93, 0, 0, flags=0x08), data_out=bytes(512)), p.INVALID_FIELD_IN_CDB)
    check(run(fe, cdb16(0x93, BLOCKS - 1, 2), data_out=bytes(512)), p.LBA_OUT_OF_RANGE)
    bad = struct.pack(">HH4x", 6 + 16, 15) + struct.pack(">QI4x", 512, 512)
    check(run(fe, bytes([0x42] + [0] * 6) + struct.pack(">H", len(bad)) + b"\0", data_out=bad),
          p.INVALID_FIELD_IN_PARAMETER_LIST)
    far = struct.pack(">HH4x", 6 + 16, 16) + struct.pack(">QI4x", BLOCKS, 1)
    check(run(fe, bytes([0x42] + [0] * 6) + struct.pack(">H", len(far)) + b"\0", data_out=far), p.LBA_OUT_OF_RANGE)
    check(run(fe, bytes([0x42] + [0] * 6) + struct.pack(">H", 24) + b"\0", data_out=b"\0" * 4),
          p.PARAMETER_LIST_LENGTH_ERROR)


def test_errors_get_their_sense_codes(fe: MockFrontend, images: list[Path]) -> None:
    check(run(fe, cdb10(0x28, BLOCKS - 1, 2), 1024), p.LBA_OUT_OF_RANGE)
    check(run(fe, cdb16(0x8A, BLOCKS, 1), data_out=bytes(512)), p.LBA_OUT_OF_RANGE)
    check(run(fe, bytes([0xC5] + [0] * 9)), p.INVALID_OPCODE)
    check(run(fe, cdb10(0x2A, 0, 1), data_out=bytes(512), lun=1), p.WRITE_PROTECTED)  # read-only LUN
    check(run(fe, cdb10(0x2A, 0, 4), data_out=bytes(512)), p.INVALID_FIELD_IN_CDB)  # too little data-out
    check(run(fe, cdb10(0x28, 0, 1, flags=0x20), 512), p.INVALID_FIELD_IN_CDB)  # RDPROTECT
    # a LUN that does not exist: INQUIRY says so, other commands LOGICAL UNIT NOT SUPPORTED
    assert good(run(fe, bytes([0x12, 0, 0, 0, 36, 0]), 36, lun=9)).data[0] == 0x7F
    check(run(fe, cdb10(0x28, 0, 1), 512, lun=9), p.LUN_NOT_SUPPORTED)
    # another target: BAD_TARGET (Linux: DID_BAD_TARGET, the scan moves on)
    assert run(fe, bytes(6), target=3).response == p.Response.BAD_TARGET
    # the data-in buffer is too small for the READ: OVERRUN
    assert run(fe, cdb10(0x28, 0, 8), 512).response == p.Response.OVERRUN
    # a short header: FAILURE; no room for the response: returned with length 0
    used = fe.request(2, [b"\1" * 20], [RESP])
    assert Reply(used.data, used.length).response == p.Response.FAILURE
    assert fe.request(2, [cmd(bytes(6))], [RESP - 1]).length == 0
    # the short image file: a read beyond its end is a MEDIUM ERROR, not a hang
    os.truncate(images[0], SIZE - 4096)
    check(run(fe, cdb10(0x28, BLOCKS - 1, 1), 512), p.UNRECOVERED_READ_ERROR)
    # the device still serves
    good(run(fe, bytes(6)))
    assert fe.backend.stats.bad_requests == 2


def test_task_management_and_async_notification(fe: MockFrontend) -> None:
    def tmf(subtype: int, lun: int = 0, target: int = 0) -> int:
        return fe.request(0, [p.CTRL_TMF.pack(0, subtype, p.encode_lun(target, lun), 5)], [1]).data[0]

    for sub in (p.TmfSubtype.ABORT_TASK, p.TmfSubtype.ABORT_TASK_SET, p.TmfSubtype.CLEAR_TASK_SET,
                p.TmfSubtype.LOGICAL_UNIT_RESET, p.TmfSubtype.I_T_NEXUS_RESET, p.TmfSubtype.QUERY_TASK):
        assert tmf(sub) == p.Response.OK
    assert tmf(p.TmfSubtype.CLEAR_ACA) == p.Response.FUNCTION_REJECTED
    assert tmf(99) == p.Response.FUNCTION_REJECTED
    assert tmf(p.TmfSubtype.LOGICAL_UNIT_RESET, lun=7) == p.Response.INCORRECT_LUN
    assert tmf(p.TmfSubtype.ABORT_TASK, target=1) == p.Response.BAD_TARGET
    an = fe.request(0, [p.CTRL_AN.pack(1, p.encode_lun(0, 0), 0x10)], [5])
    assert p.CTRL_AN_RESP.unpack(an.data) == (0, p.Response.OK)
    # bad control requests: FAILURE (unknown type, short TMF), or returned unused (no room)
    assert fe.request(0, [struct.pack("<I", 9) + bytes(20)], [1]).data[0] == p.Response.FAILURE
    assert fe.request(0, [struct.pack("<II", 0, 0)], [1]).data[0] == p.Response.FAILURE
    assert fe.request(0, [struct.pack("<I", 0)], []).length == 0


def test_events_for_hot_add_and_remove(fe: MockFrontend, tmp_path: Path) -> None:
    backend: ScsiBackend = fe.backend  # type: ignore[attr-defined]
    extra = tmp_path / "extra.img"
    extra.write_bytes(bytes(MiB))
    # no event buffer yet (the ring starts at its first kick): the event is
    # missed, and the next one says so
    backend.add_lun(2, str(extra))
    assert backend.stats.events_missed == 1
    for _ in range(2):
        fe.add(1, [], [p.EVENT.size])
    fe.publish(1)
    [first] = fe.wait_used(1, 1, timeout=10)  # the pending "missed" notice, on the kick
    event, lun, _reason = p.EVENT.unpack(first.data)
    assert event == p.EVENTS_MISSED | p.EventType.NO_EVENT
    backend.remove_lun(2)
    [second] = fe.wait_used(1, 1, timeout=10)
    assert p.EVENT.unpack(second.data) == (p.EventType.TRANSPORT_RESET, p.encode_lun(0, 2), p.ResetReason.REMOVED)
    check(run(fe, cdb10(0x28, 0, 1), 512, lun=2), p.LUN_NOT_SUPPORTED)


def wait_event_queue(backend: ScsiBackend) -> None:
    """A ring starts at its first kick, on the worker: wait for it."""
    deadline = time.monotonic() + 10
    while not backend.event_queue_ready:
        assert time.monotonic() < deadline, "the event queue never started"
        time.sleep(0.01)


def test_events_missed_before_the_queue_starts_are_reported(no_fd_leak, serve_backend, images) -> None:  # noqa: ANN001
    backend = ScsiBackend([str(images[0])])
    try:
        backend.add_lun(1, str(images[1]))  # no front-end yet: missed
        assert backend.stats.events_missed == 1
        path = serve_backend(backend)
        with MockFrontend.connect(path, OPTS) as front:
            front.add(1, [], [p.EVENT.size])
            front.publish(1)
            [notice] = front.wait_used(1, 1, timeout=10)
            assert p.EVENT.unpack(notice.data) == (p.EVENTS_MISSED | p.EventType.NO_EVENT, bytes(8), 0)
    finally:
        backend.close()


def test_lun_spec() -> None:
    assert LunSpec.parse("/a.img,ro") == LunSpec("/a.img", True)
    assert LunSpec.parse("/a.img") == LunSpec("/a.img", False)
    with pytest.raises(ValueError):
        LunSpec.parse("/a.img,bogus")


def test_the_command_serves_luns(tmp_path: Path, images: list[Path]) -> None:
    sock = tmp_path / "scsi.sock"
    argv = ["scsi", "--socket-path", str(sock), "--lun", str(images[0]), "--lun", f"{images[1]},ro"]
    with vhostuser_process(argv, stderr=subprocess.PIPE, text=True) as proc:
        wait_for_path(sock, proc)
        with MockFrontend.connect(str(sock), OPTS) as front:
            assert front.queue_num == 3
            good(run(front, cdb10(0x2A, 8, 1), data_out=b"\x5a" * 512))
            check(run(front, cdb10(0x2A, 8, 1), data_out=b"\x5a" * 512, lun=1), p.WRITE_PROTECTED)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    with open(images[0], "rb") as f:
        f.seek(8 * 512)
        assert f.read(512) == b"\x5a" * 512


def test_the_command_rejects_bad_arguments(tmp_path: Path) -> None:
    def cmd_rc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vhostuser", "scsi", *args], capture_output=True, text=True,
                              timeout=60)

    assert cmd_rc("--socket-path", str(tmp_path / "s")).returncode == 2  # no LUN
    out = cmd_rc("--socket-path", str(tmp_path / "s"), "--lun", "x.img,bogus")
    assert out.returncode == 2 and "bogus" in out.stderr
    out = cmd_rc("--socket-path", str(tmp_path / "s"), "--lun", str(tmp_path / "missing.img"))
    assert out.returncode == 1 and "cannot open" in out.stderr


def test_random_commands_and_chains_never_break_the_queue(fe: MockFrontend) -> None:
    """Random CDBs on a valid header, and random chains: every request gets a
    well-formed answer (or is returned unused), and the device keeps serving."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    statuses = {int(s) for s in p.Status}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cdb=st.binary(min_size=6, max_size=16), lun=st.integers(0, 3), data_in=st.integers(0, 4096),
           data_out=st.binary(max_size=1024))
    def random_cdb(cdb: bytes, lun: int, data_in: int, data_out: bytes) -> None:
        r = run(fe, cdb, data_in, data_out, lun=lun)
        assert r.response in (p.Response.OK, p.Response.OVERRUN)
        assert r.status in statuses and r.length <= RESP + data_in
        if r.status == p.Status.CHECK_CONDITION:
            assert r.key_asc[0] in {int(k) for k in p.SenseKey}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(readable=st.lists(st.binary(min_size=1, max_size=80), max_size=3),
           writable=st.lists(st.integers(1, 200), max_size=3))
    def random_chain(readable: list[bytes], writable: list[int]) -> None:
        if not readable and not writable:
            return
        for queue in (0, 2):
            used = fe.request(queue, readable, writable)
            assert used.length <= sum(writable)

    random_cdb()
    random_chain()
    good(run(fe, bytes(6)))  # still serving


def test_a_request_on_the_event_queue_is_returned_unused(fe: MockFrontend, tmp_path: Path) -> None:
    backend: ScsiBackend = fe.backend  # type: ignore[attr-defined]
    extra = tmp_path / "extra.img"
    extra.write_bytes(bytes(MiB))
    wrong = fe.add(1, [cmd(bytes(6))], [RESP])  # a request-queue chain on the event queue
    good_buf = fe.add(1, [], [p.EVENT.size])
    fe.publish(1)
    wait_event_queue(backend)
    backend.add_lun(3, str(extra))
    used = {u.token: u for u in fe.wait_used(1, 2, timeout=10)}
    assert used[wrong].length == 0
    assert p.EVENT.unpack(used[good_buf].data) == (p.EventType.TRANSPORT_RESET, p.encode_lun(0, 3),
                                                   p.ResetReason.RESCAN)
    assert good(run(fe, bytes([0x12, 0, 0, 0, 36, 0]), 36, lun=3)).data[0] == 0  # the new LUN answers
