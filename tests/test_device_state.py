"""DEVICE_STATE migration: save a device's state in one daemon, restore it in
another, through the real protocol (SET_DEVICE_STATE_FD + CHECK_DEVICE_STATE)."""
from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostuser.backend import VhostUserBackend
from vhostuser.daemon import VhostUserDaemon
from vhostuser.errors import RequestFailed
from vhostuser.frontend import Frontend
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.protocol.message import VirtioFeatures as VF

SAVE, LOAD, STOPPED = 0, 1, 0


class Counter(VhostUserBackend):
    """A device whose whole state is a counter and a blob (big enough to fill a pipe)."""

    supports_device_state = True

    def __init__(self, value: int = 0, blob: bytes = b"") -> None:
        super().__init__()
        self.value = value
        self.blob = blob

    def handle_event(self, device_event, evset, vrings, thread_id):  # noqa: ANN001 - unused here
        pass

    def save_state(self) -> bytes:
        return struct.pack("<Q", self.value) + self.blob

    def load_state(self, state: bytes) -> None:
        if len(state) < 8:
            raise ValueError(f"state of {len(state)} bytes is too short")
        (self.value,) = struct.unpack_from("<Q", state)
        self.blob = state[8:]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    daemons: list[VhostUserDaemon] = []

    def start(backend: VhostUserBackend) -> Frontend:
        daemon = VhostUserDaemon("state", backend)
        daemons.append(daemon)
        path = str(tmp_path / f"s{len(daemons)}.sock")
        daemon.start_server(path)
        fe = Frontend.connect(path)
        fe.get_features()
        pf = fe.get_protocol_features()
        assert pf & PF.DEVICE_STATE
        fe.set_protocol_features(pf & (PF.REPLY_ACK | PF.DEVICE_STATE))
        fe.set_owner()
        fe.set_features(VF.VERSION_1 | VF.PROTOCOL_FEATURES)
        return fe

    yield start
    for d in daemons:
        d.request_shutdown()
        assert d.wait(5)


def _save(fe: Frontend) -> bytes:
    r, w = os.pipe()
    assert fe.set_device_state_fd(SAVE, STOPPED, w) is None  # our fd is used
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    fe.check_device_state()
    return b"".join(chunks)


def _load(fe: Frontend, state: bytes) -> None:
    r, w = os.pipe()
    assert fe.set_device_state_fd(LOAD, STOPPED, r) is None
    os.close(r)
    with os.fdopen(w, "wb") as out:
        out.write(state)
    fe.check_device_state()


def test_state_saved_in_one_daemon_is_restored_in_another(no_fd_leak, serve) -> None:
    blob = os.urandom(300_000)  # larger than a pipe buffer: the transfer must not block the protocol thread
    source, target = Counter(42, blob), Counter()
    fe_a = serve(source)
    state = _save(fe_a)
    fe_b = serve(target)
    _load(fe_b, state)
    assert (target.value, target.blob) == (42, blob)
    fe_a.close()
    fe_b.close()


def test_a_failed_load_is_reported_by_check_device_state(serve) -> None:
    fe = serve(Counter())
    with pytest.raises(RequestFailed):
        _load(fe, b"\x01\x02")  # too short for load_state
    # the connection is still usable afterwards
    assert fe.get_features() & VF.PROTOCOL_FEATURES
    fe.close()


def test_devices_without_state_support_do_not_offer_it(tmp_path: Path) -> None:
    class Plain(Counter):
        supports_device_state = False

    with VhostUserDaemon("plain", Plain()) as daemon:
        path = str(tmp_path / "p.sock")
        daemon.start_server(path)
        fe = Frontend.connect(path)
        fe.get_features()
        assert not fe.get_protocol_features() & PF.DEVICE_STATE
        fe.close()


# ---------------------------------------------------------------- issue 10: a front-end cannot wedge us
def test_check_of_a_load_whose_writer_stays_open_fails_in_bounded_time(serve) -> None:
    backend = Counter()
    backend.device_state_timeout = 0.5
    fe = serve(backend)
    r, w = os.pipe()  # we keep the write end open and never write
    try:
        assert fe.set_device_state_fd(LOAD, STOPPED, r) is None
        os.close(r)
        with pytest.raises(RequestFailed):
            fe.check_device_state()
        assert fe.get_features() & VF.PROTOCOL_FEATURES  # still served
    finally:
        os.close(w)
        fe.close()


def test_disconnect_cancels_a_stuck_transfer_and_the_next_frontend_is_served(serve, tmp_path: Path) -> None:
    fe = serve(Counter())
    r, w = os.pipe()
    try:
        assert fe.set_device_state_fd(LOAD, STOPPED, r) is None
        os.close(r)
        fe.close()  # gone, with the transfer stuck on a pipe nobody writes
        fe2 = Frontend.connect(str(tmp_path / "s1.sock"), reply_timeout=10.0)  # the same daemon
        assert fe2.get_features() & VF.PROTOCOL_FEATURES
        fe2.close()
    finally:
        os.close(w)


def test_a_second_transfer_cancels_an_abandoned_save(serve) -> None:
    backend = Counter(7, os.urandom(1 << 20))  # far more than a pipe holds: the save blocks
    fe = serve(backend)
    r1, w1 = os.pipe()
    try:
        assert fe.set_device_state_fd(SAVE, STOPPED, w1) is None  # nobody reads r1
        os.close(w1)
        state = _save(fe)  # a new transfer: the old one is cancelled, this one completes
        assert state[:8] == struct.pack("<Q", 7)
        assert fe.get_features() & VF.PROTOCOL_FEATURES
    finally:
        os.close(r1)
        fe.close()
