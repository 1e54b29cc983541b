"""Bad input never crashes the daemon: hypothesis sends garbage and malformed
vhost-user messages (random request codes, flags, sizes, payloads, fds) to a
live daemon; after each example a normal front-end is still served, and no fd
leaks."""
from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
from collections.abc import Iterator

import pytest
from conftest import check_no_fd_leak, fuzz_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostuser.daemon import VhostUserDaemon
from vhostuser.protocol.requests import FRONTEND_REQUESTS
from vhostuser.sys_util import create_shm_fd, new_event_consumer_and_notifier, send_with_fds
from vhostuser.testing.echo import EchoBackend
from vhostuser.testing.frontend import MockFrontend

HEADER = struct.Struct("=III")

#: payload sizes of real requests (u64, vring state/addr, regions, memory table of 1-2, config, ...)
PAYLOAD_SIZES = [0, 8, 12, 16, 20, 24, 32, 40, 48, 72, 104]
payload = st.one_of(
    st.binary(max_size=160),
    st.sampled_from(PAYLOAD_SIZES).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
)
#: requests with a fixed payload size -> that size (memory tables: 8 + 32 per region)
FIXED_SIZES = {int(req): spec.payload.SIZE for req, spec in FRONTEND_REQUESTS.items() if spec.payload.SIZE is not None}
FIXED_SIZES[5] = 8 + 32  # SET_MEM_TABLE with one region
FIXED_SIZES[24] = FIXED_SIZES[25] = 12 + 8  # GET/SET_CONFIG of 8 bytes
FLAGS = st.one_of(*[st.sampled_from([0x1, 0x9])] * 3, st.integers(0, 2**32 - 1))  # mostly version 1 (+/- NEED_REPLY)
well_sized = st.sampled_from(sorted(FIXED_SIZES)).flatmap(lambda code: st.tuples(
    st.just(code), FLAGS, st.binary(min_size=FIXED_SIZES[code], max_size=FIXED_SIZES[code]),
    st.none(), st.integers(0, 2), st.sampled_from(["eventfd", "memfd"])))
anything = st.tuples(
    st.one_of(st.integers(0, 50), st.integers(0, 2**32 - 1)),          # request code (valid ones, and not)
    FLAGS,
    payload,
    st.one_of(st.none(), st.integers(0, 5000)),                          # size field (None: the truth)
    st.integers(0, 3),                                                   # fds to attach
    st.sampled_from(["eventfd", "memfd"]),
)
message = st.one_of(well_sized, well_sized, anything)


@pytest.fixture(scope="module")
def daemon() -> Iterator[VhostUserDaemon]:
    with VhostUserDaemon("fuzz", EchoBackend()) as daemon:
        daemon.start_server(os.path.join(tempfile.mkdtemp(prefix="vhu-fuzz-"), "echo.sock"))
        yield daemon
        assert daemon.running, "the daemon died"


def _fds(n: int, kind: str) -> list[int]:
    fds = []
    for _ in range(n):
        if kind == "memfd":
            fds.append(create_shm_fd(4096))
        else:
            consumer, notifier = new_event_consumer_and_notifier()
            fds.append(notifier.detach())
            consumer.close()
    return fds


def _send(path: str, chunks: list[tuple[bytes, list[int]]]) -> None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.settimeout(2)
            for data, fds in chunks:
                try:
                    send_with_fds(sock, [data], fds)
                except OSError:
                    break  # the daemon dropped us: that is allowed
    finally:
        for _, fds in chunks:
            for fd in fds:
                os.close(fd)


def _still_serves(daemon: VhostUserDaemon) -> None:
    """A normal front-end is served; then wait until the daemon has cleaned up
    after it (so that fd counts compare equal)."""
    before = daemon.connections
    with MockFrontend.connect(daemon.socket_path) as fe:
        used = fe.request(0, [b"still alive"], [16])
        assert used.data[: used.length] == b"still alive"
    deadline = time.monotonic() + 30  # generous: a loaded 2-core CI machine
    while daemon.connected.is_set() or daemon.connections == before:
        assert daemon.running, "the daemon died"
        assert time.monotonic() < deadline, "the daemon did not finish the disconnect"
        time.sleep(0.005)


FUZZ = settings(max_examples=fuzz_examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(min_size=1, max_size=512))
def test_garbage_bytes(daemon: VhostUserDaemon, garbage: bytes) -> None:
    with check_no_fd_leak():
        _send(daemon.socket_path, [(garbage, [])])
        _still_serves(daemon)


def _valid(request: int, payload: bytes = b"") -> tuple[bytes, list[int]]:
    return HEADER.pack(request, 0x1, len(payload)) + payload, []


#: a legitimate start (SET_OWNER, protocol features incl. REPLY_ACK and mem slots,
#: SET_FEATURES) so that the random messages after it reach the deep handlers
HANDSHAKE = [
    _valid(1),                                              # GET_FEATURES (its reply is ignored)
    _valid(15),                                             # GET_PROTOCOL_FEATURES
    _valid(3),                                              # SET_OWNER
    _valid(16, struct.pack("=Q", (1 << 0) | (1 << 3) | (1 << 15) | (1 << 16))),  # SET_PROTOCOL_FEATURES
    _valid(2, struct.pack("=Q", (1 << 32) | (1 << 30))),     # SET_FEATURES: VERSION_1 | PROTOCOL_FEATURES
]


@FUZZ
@given(st.booleans(), st.lists(message, min_size=1, max_size=12))
def test_malformed_message_sequences(daemon: VhostUserDaemon, handshake: bool, messages: list) -> None:
    with check_no_fd_leak():
        chunks = list(HANDSHAKE) if handshake else []
        for request, flags, payload, size, nfds, kind in messages:
            header = HEADER.pack(request, flags, len(payload) if size is None else size)
            chunks.append((header + payload, _fds(nfds, kind)))
        _send(daemon.socket_path, chunks)
        _still_serves(daemon)
