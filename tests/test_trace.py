"""``vhostuser trace``: the relaying proxy (messages and fds through unchanged,
decoded, replies matched, the back-end channel relayed), its JSON Lines output,
the spec checks (one test double per rule) and fd hygiene over many sessions."""
from __future__ import annotations

import gc
import io
import json
import os
import struct
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import check_no_fd_leak
from helpers.trace_doubles import NEED_REPLY, FR, Misbehaviour, RawFrontend, ScriptedBackend

from vhostuser.daemon import VhostUserDaemon
from vhostuser.devices.blk.device import BlkBackend
from vhostuser.devices.rng import RngBackend
from vhostuser.protocol import (
    U64,
    MemoryRegion,
    MemoryTable,
    VringAddr,
    VringState,
)
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.protocol.message import VirtioFeatures as VF
from vhostuser.sys_util import SharedMemory, describe_fd, new_event_consumer_and_notifier
from vhostuser.testing import FrontendOptions, MockFrontend
from vhostuser.trace import RULES, JsonWriter, TraceEvent, TraceOptions, TraceProxy, read_json_lines

QEMU_RNG = FrontendOptions(queue_size=4, memory=((0, 1 << 20), (2 << 20, 1 << 20)), data_size=64 << 10)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vhu-trace-"))
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


class Traced:
    """A proxy on a thread, collecting its events."""

    def __init__(self, front: str, back: str, **options: object) -> None:
        self.events: list[TraceEvent] = []
        self.proxy = TraceProxy(front, back, self.events.append, TraceOptions(**options))  # type: ignore[arg-type]
        self.front = front

    def wait_closed(self, sessions: int = 1, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for e in self.events if e.kind == "summary") < sessions:
            assert time.monotonic() < deadline, "the session did not end"
            time.sleep(0.01)

    def messages(self, channel: str = "main") -> list[TraceEvent]:
        return [e for e in self.events if e.kind in ("request", "reply") and e.channel == channel]

    def findings(self) -> list[TraceEvent]:
        return [e for e in self.events if e.kind == "finding"]


@pytest.fixture
def traced(sock_dir: Path) -> Iterator[Callable[..., Traced]]:
    made: list[Traced] = []

    def make(back: str, **options: object) -> Traced:
        t = Traced(str(sock_dir / f"front{len(made)}.sock"), back, **options)
        made.append(t)
        t.proxy.start()
        return t

    try:
        yield make
    finally:
        for t in made:
            t.proxy.stop()


@pytest.fixture
def rng_server(sock_dir: Path) -> Iterator[VhostUserDaemon]:
    with VhostUserDaemon("rng", RngBackend()) as daemon:
        daemon.start_server(str(sock_dir / "rng.sock"))
        yield daemon


@pytest.fixture
def rng_daemon(rng_server: VhostUserDaemon) -> str:
    return str(rng_server.socket_path)


# ------------------------------------------------------------------ relay
def test_relays_a_session_decoded_and_unchanged(rng_daemon: str, traced: Callable[..., Traced]) -> None:
    t = traced(rng_daemon, check=True, device="rng")
    with MockFrontend.connect(t.front, QEMU_RNG) as fe:
        chunks = [fe.request(0, [], [64]) for _ in range(4)]
        assert all(c.length == 64 for c in chunks) and len({c.data for c in chunks}) == 4
        bases = fe.stop()
    t.wait_closed()
    msgs = t.messages()
    reqs = [e for e in msgs if e.kind == "request"]
    assert all(e.dir == "F->B" for e in reqs) and all(e.dir == "B->F" for e in msgs if e.kind == "reply")
    names = [e.request for e in reqs]
    assert names[:2] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES"]
    for needed in ("SET_OWNER", "SET_FEATURES", "ADD_MEM_REG", "SET_VRING_ADDR", "SET_VRING_KICK", "GET_VRING_BASE"):
        assert needed in names
    # every reply is matched to its request, and each request expecting one got one
    by_seq = {e.seq: e for e in msgs}
    for r in (e for e in msgs if e.kind == "reply"):
        assert r.reply_to is not None and by_seq[r.reply_to].request == r.request
    gvb = next(e for e in msgs if e.kind == "reply" and e.request == "GET_VRING_BASE")
    assert gvb.payload == {"index": 0, "num": bases[0]} == {"index": 0, "num": 4}
    # fd kinds: memory regions are memfds (with their size), kick/call are eventfds, the channel a socket
    add = next(e for e in reqs if e.request == "ADD_MEM_REG")
    assert add.fds and add.fds[0]["kind"] in ("memfd", "shm", "file") and add.fds[0]["size"] >= 1 << 20
    kick_kind = "pipe" if os.environ.get("VHOSTUSER_NOTIFIER") == "pipe" or not hasattr(os, "eventfd") else "eventfd"
    assert next(e for e in reqs if e.request == "SET_VRING_KICK").fds == [{"kind": kick_kind}]
    assert next(e for e in reqs if e.request == "SET_BACKEND_REQ_FD").fds == [{"kind": "socket"}]
    feats = next(e for e in msgs if e.kind == "reply" and e.request == "GET_FEATURES")
    assert feats.decoded and "VERSION_1" in feats.decoded["value"]
    summary = next(e for e in t.events if e.kind == "summary").data
    assert summary is not None
    assert summary["counts"]["ADD_MEM_REG"] == 2 and summary["rings"][0]["num"] == 4
    assert "first_ring_start_s" in summary and "VERSION_1" in summary["features_acked_names"]
    assert summary["backend_channel"] is True
    assert t.findings() == []  # a valid session: nothing to report


def test_backend_channel_is_relayed(sock_dir: Path, traced: Callable[..., Traced], tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    backend = BlkBackend(image)
    path = str(sock_dir / "blk.sock")
    with VhostUserDaemon("blk", backend) as daemon:
        daemon.start_server(path)
        t = traced(path)
        with MockFrontend.connect(t.front, QEMU_RNG) as fe:
            daemon_channel = backend.backend_channel
            assert daemon_channel is not None
            daemon_channel.config_change()
            assert fe.handler.config_changed.wait(5)
    t.wait_closed()
    chan = t.messages("backend")
    backend.close()
    assert chan and chan[0].request == "CONFIG_CHANGE_MSG" and chan[0].dir == "B->F"


def test_reconnects_are_followed(rng_daemon: str, traced: Callable[..., Traced]) -> None:
    t = traced(rng_daemon)
    for _ in range(3):
        with MockFrontend.connect(t.front, QEMU_RNG) as fe:
            assert fe.request(0, [], [16]).length == 16
    t.wait_closed(3)
    assert [e.data["session"] for e in t.events if e.kind == "summary" and e.data] == [1, 2, 3]


def test_undecodable_message_is_relayed_and_reported(rng_daemon: str, traced: Callable[..., Traced]) -> None:
    t = traced(rng_daemon, check=True)
    with RawFrontend(t.front) as fe:
        fe.send_raw(b"\x63\x00\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00")  # unknown request 99, NEED_REPLY
        fe.call(FR.GET_FEATURES)  # the stream is still in step
    t.wait_closed()
    bad = next(e for e in t.events if e.kind == "request" and e.code == 99)
    assert bad.error and "unknown" in bad.error
    assert any(f.rule == "decode" and f.who == "frontend" and f.about == bad.seq for f in t.findings())


# --------------------------------------------------------------------- JSON
def test_json_lines_parse_and_round_trip(rng_daemon: str, sock_dir: Path) -> None:
    out = io.StringIO()
    proxy = TraceProxy(str(sock_dir / "f.sock"), rng_daemon, JsonWriter(out), TraceOptions(check=True, max_sessions=1))
    proxy.start()
    try:
        with MockFrontend.connect(str(sock_dir / "f.sock"), QEMU_RNG) as fe:
            fe.request(0, [], [8])
        assert proxy.wait(10)
    finally:
        proxy.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) > 20
    parsed = [json.loads(line) for line in lines]
    assert all({"kind", "seq", "t", "ts"} <= set(d) for d in parsed)
    assert [d["seq"] for d in parsed] == list(range(1, len(parsed) + 1))
    events = read_json_lines(out.getvalue())
    assert [e.to_json() for e in events] == lines  # round trip, byte for byte
    assert {"request", "reply", "summary", "connect", "close"} <= {e.kind for e in events}


# ------------------------------------------------------ rules: front-ends
def _region(gpa: int, size: int, uva: int, off: int = 0) -> MemoryRegion:
    return MemoryRegion(gpa, size, uva, off)


def _handshake(fe: RawFrontend, features: int = int(VF.VERSION_1 | VF.PROTOCOL_FEATURES),
               protocol: int = int(PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS)) -> None:
    fe.call(FR.GET_FEATURES)
    fe.call(FR.GET_PROTOCOL_FEATURES)
    fe.send(FR.SET_PROTOCOL_FEATURES, U64(protocol))
    fe.call(FR.GET_QUEUE_NUM)
    fe.send(FR.SET_OWNER)
    fe.send(FR.SET_FEATURES, U64(features))


def _frontend_case(case: str, fe: RawFrontend, shm: SharedMemory, event_fd: int) -> None:
    """Drive one broken front-end (one per rule)."""
    uva = 0x7F0000000000
    table = MemoryTable((_region(0, 1 << 20, uva),))
    if case == "owner-first":
        fe.call(FR.GET_FEATURES)
        fe.send(FR.SET_FEATURES, U64(int(VF.VERSION_1)))
    elif case == "protocol-features-bit":
        fe.call(FR.GET_FEATURES)
        fe.call(FR.GET_PROTOCOL_FEATURES)
    elif case == "feature-gated":
        _handshake(fe)
        fe.send(FR.SET_STATUS, U64(1))
    elif case == "features-offered":
        fe.call(FR.GET_FEATURES)
        fe.send(FR.SET_OWNER)
        fe.send(FR.SET_FEATURES, U64(int(VF.VERSION_1 | VF.RING_PACKED)))
    elif case == "rings-before-memory":
        _handshake(fe)
        fe.send(FR.SET_VRING_ADDR, VringAddr(0, 0, uva, uva + 0x2000, uva + 0x1000))
    elif case == "ring-outside-memory":
        _handshake(fe)
        fe.send(FR.SET_MEM_TABLE, table, fds=[shm.fd])
        fe.send(FR.SET_VRING_NUM, VringState(0, 8))
        fe.send(FR.SET_VRING_ADDR, VringAddr(0, 0, uva, uva + (2 << 20), uva + 0x1000))
        fe.send(FR.SET_VRING_KICK, U64(0), fds=[event_fd])
    elif case == "ring-size":
        _handshake(fe)
        fe.send(FR.SET_VRING_NUM, VringState(0, 100))
    elif case == "vring-index":
        _handshake(fe)
        fe.send(FR.SET_VRING_NUM, VringState(3, 8))
    elif case == "reuse-before-get-base":
        _handshake(fe)
        fe.send(FR.SET_MEM_TABLE, table, fds=[shm.fd])
        fe.send(FR.SET_VRING_NUM, VringState(0, 8))
        fe.send(FR.SET_VRING_ADDR, VringAddr(0, 0, uva, uva + 0x2000, uva + 0x1000))
        fe.send(FR.SET_VRING_KICK, U64(0), fds=[event_fd])
        fe.send(FR.SET_VRING_BASE, VringState(0, 5))
    elif case == "vring-enable-without-protocol-features":
        _handshake(fe, features=int(VF.VERSION_1))
        fe.send(FR.SET_VRING_ENABLE, VringState(0, 1))
    elif case == "memory-table":
        _handshake(fe)
        fe.send(FR.SET_MEM_TABLE, MemoryTable((_region(0, 1 << 20, uva), _region(1 << 19, 1 << 20, uva + (4 << 20)))),
                fds=[shm.fd, shm.fd])
    elif case == "need-reply-without-reply-ack":
        fe.call(FR.GET_FEATURES)
        fe.call(FR.SET_OWNER, flags=NEED_REPLY)
    elif case == "request-while-waiting":
        _handshake(fe)
        fe.send(FR.GET_VRING_BASE, VringState(0, 0))  # the back-end double never answers it
        fe.send(FR.SET_VRING_NUM, VringState(0, 8))
    elif case == "decode":
        fe.call(FR.GET_FEATURES)
        fe.send_raw(Header_with_fd(), [event_fd])  # SET_OWNER carrying an fd
        fe.call(FR.GET_FEATURES)
    else:
        raise AssertionError(case)


def Header_with_fd() -> bytes:  # noqa: N802 - reads as a constant
    return (3).to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little")


FRONTEND_RULES = [r.id for r in RULES.values() if r.who == "frontend"] + ["decode"]


@pytest.mark.parametrize("case", FRONTEND_RULES)
def test_check_flags_a_broken_frontend(case: str, sock_dir: Path, traced: Callable[..., Traced]) -> None:
    features = int(VF.VERSION_1 | VF.PROTOCOL_FEATURES) if case != "protocol-features-bit" else int(VF.VERSION_1)
    misbehave = Misbehaviour(no_reply={FR.GET_VRING_BASE}) if case == "request-while-waiting" else None
    gc.collect()  # fds of objects earlier tests dropped must not close during the count
    with check_no_fd_leak():
        with ScriptedBackend(str(sock_dir / "b.sock"), features=features, misbehave=misbehave), \
                SharedMemory(4 << 20) as shm:
            consumer, notifier = new_event_consumer_and_notifier()
            try:
                t = traced(str(sock_dir / "b.sock"), check=True)
                with RawFrontend(t.front) as fe:
                    _frontend_case(case, fe, shm, consumer.fileno())
                    fe.call(FR.GET_FEATURES)  # the proxy has seen everything before the session ends
                t.wait_closed()
                t.proxy.stop()
            finally:
                consumer.close()
                notifier.close()
    found = [f for f in t.findings() if f.rule == case]
    assert found, f"no {case} finding in {[(f.rule, f.text) for f in t.findings()]}"
    assert all(f.who == "frontend" and f.section and f.severity in ("error", "warning") for f in found)
    assert found[0].about is not None


# ------------------------------------------------------- rules: back-ends
BACKEND_CASES = {
    "missing-reply": Misbehaviour(no_reply={FR.GET_QUEUE_NUM}),
    "unsolicited-reply": Misbehaviour(extra_reply={FR.SET_OWNER}),
    "ring-used-after-get-base": Misbehaviour(use_ring_after_stop=True),
}


def test_every_backend_rule_has_a_double() -> None:
    assert set(BACKEND_CASES) == {r.id for r in RULES.values() if r.who == "backend"}


@pytest.mark.parametrize("case", sorted(BACKEND_CASES))
def test_check_flags_a_broken_backend(case: str, sock_dir: Path, traced: Callable[..., Traced]) -> None:
    with ScriptedBackend(str(sock_dir / "b.sock"), misbehave=BACKEND_CASES[case]):
        t = traced(str(sock_dir / "b.sock"), check=True)
        opts = QEMU_RNG.replace(reply_timeout=1.0, timeout=1.0)
        try:
            with MockFrontend.connect(t.front, opts, start=False) as fe:
                if case == "ring-used-after-get-base":
                    fe.start()
                    fe.stop()
                    fe.frontend.get_features()
        except Exception:  # noqa: BLE001 - the mock front-end may give up on a broken back-end
            pass
        t.wait_closed()
    found = [f for f in t.findings() if f.rule == case]
    assert found, f"no {case} finding in {[(f.rule, f.text) for f in t.findings()]}"
    assert all(f.who == "backend" for f in found)


# --------------------------------------------------------------- fd hygiene
def test_no_fd_leak_over_200_sessions(rng_server: VhostUserDaemon, traced: Callable[..., Traced]) -> None:
    t = traced(str(rng_server.socket_path), check=True)
    MockFrontend.connect(t.front, QEMU_RNG).close()  # the daemon's lazily made fds exist before counting
    t.wait_closed(1)
    gc.collect()  # fds of objects earlier tests dropped must not close during the count
    with check_no_fd_leak():
        for k in range(200):
            fe = MockFrontend.connect(t.front, QEMU_RNG, start=(k % 10 == 0))
            fe.close()
        t.wait_closed(201, timeout=120)
        deadline = time.monotonic() + 10
        while rng_server.connected.is_set():  # the daemon's own clean-up of the last session
            assert time.monotonic() < deadline
            time.sleep(0.01)
    t.proxy.stop()
    assert not [e for e in t.events if e.kind == "error"]
    assert sum(1 for e in t.events if e.kind == "summary") == 201


def test_describe_fd_kinds(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    consumer, notifier = new_event_consumer_and_notifier()
    with SharedMemory(8192) as shm, open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 100)
        f.flush()
        try:
            assert describe_fd(a.fileno()).kind == "socket"
            assert describe_fd(r).kind == "pipe"
            assert describe_fd(f.fileno()).kind == "file" and describe_fd(f.fileno()).size == 100
            assert describe_fd(shm.fd).size == 8192
            assert describe_fd(consumer.fileno()).kind in ("eventfd", "pipe")
        finally:
            for s in (a, b):
                s.close()
            os.close(r)
            os.close(w)
            consumer.close()
            notifier.close()


# ---------------------------------------------------------------------- CLI
def test_cli_traces_an_exec_backend_as_json(sock_dir: Path) -> None:
    front = str(sock_dir / "front.sock")
    cmd = [sys.executable, "-m", "vhostuser", "trace", "--listen", front, "--json", "--check", "--sessions", "1",
           "--exec", f"{sys.executable} -m vhostuser rng --socket-path {{socket}}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(front):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with MockFrontend.connect(front, QEMU_RNG) as fe:
            assert fe.request(0, [], [32]).length == 32
            fe.stop()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    events = read_json_lines(out)
    assert any(e.kind == "reply" and e.request == "GET_VRING_BASE" for e in events)
    assert not [e for e in events if e.kind == "finding"]


# ------------------------------------------------------------------ --rings
def test_rings_view_decodes_blk_requests_and_completions(sock_dir: Path, traced: Callable[..., Traced],
                                                         tmp_path: Path) -> None:
    """--rings: kicks and calls pass through the proxy (the I/O works), and each
    names the blk requests it carried (type, sector, length) and their status."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    backend = BlkBackend(image)
    path = str(sock_dir / "blk.sock")
    data = bytes(range(256)) * 16
    with check_no_fd_leak(), VhostUserDaemon("blk", backend) as daemon:
        daemon.start_server(path)
        t = traced(path, rings=True, device="blk")
        with MockFrontend.connect(t.front, QEMU_RNG) as fe:
            write = fe.request(0, [struct.pack("<IIQ", 1, 0, 8), data], [1])  # OUT, sector 8
            assert write.data == b"\x00"
            read = fe.request(0, [struct.pack("<IIQ", 0, 0, 8)], [len(data), 1])  # IN, sector 8
            assert read.data == data + b"\x00"
            bad = fe.request(0, [struct.pack("<IIQ", 0, 0, 1 << 40)], [512, 1])  # beyond the disk
            assert bad.length == 1  # only the status byte (IOERR, checked below) was written
            fe.stop()
        t.wait_closed()
        t.proxy.stop()
    backend.close()
    assert image.read_bytes()[8 * 512:8 * 512 + len(data)] == data
    ring = [e.data for e in t.events if e.kind == "ring" and e.data]
    # a request shows up with the kick that announced it, or (EVENT_IDX: the driver
    # may not kick while the back-end polls) with the call that completed it
    reqs = [q for r in ring for q in r.get("requests", [])]
    done = [c for r in ring for c in r.get("completions", [])]
    assert [(q["type"], q["sector"], q["len"]) for q in reqs] == [("OUT", 8, 4096), ("IN", 8, 4096),
                                                                 ("IN", 1 << 40, 512)]
    assert [c["status"] for c in done] == ["OK", "OK", "IOERR"]
    assert [c["written"] for c in done] == [1, 4097, 1]  # a failed request wrote its status only
    summary = next(e for e in t.events if e.kind == "summary").data
    # with EVENT_IDX a kick (or call) may stand for several requests: at least one of each
    assert summary is not None and summary["ring_notifications"]["kicks"] >= 1
    assert summary["ring_notifications"]["calls"] >= 1


def test_rings_view_survives_a_ring_it_cannot_read(rng_daemon: str, traced: Callable[..., Traced]) -> None:
    """A descriptor outside guest memory: the proxy reports it and still passes the kick on."""
    t = traced(rng_daemon, rings=True, device="rng")
    with MockFrontend.connect(t.front, QEMU_RNG) as fe:
        assert fe.request(0, [], [32]).length == 32
        fe.stop()
    t.wait_closed()
    ring = [e for e in t.events if e.kind == "ring"]
    assert any(e.data and e.data.get("requests") == [{"head": 0, "out": 0, "in": 32, "segs": 1}] for e in ring)
    assert any(e.data and e.data["event"] == "call" and e.data.get("completions") for e in ring)
