"""atheris harness: the back-end's request dispatch (``BackendConnection`` over
``VhostUserHandler`` with the echo test device), in-process.

One input = a hostile front-end's byte stream.  The harness frames it by the
headers' size fields and attaches the fds each request needs (a memfd per
memory region, an eventfd for SET_VRING_KICK/CALL/ERR without the no-fd bit,
...), so the fuzzer reaches the handlers instead of stopping at fd-count
checks; the first input byte adds stray fds.  The connection may only end with
a disconnect or a :class:`~vhostuser.errors.ProtocolError`; afterwards
``disconnected()`` (the handler is reused, as the daemon does) must leave no fd open and no thread running.

    python fuzz/handler_fuzz.py fuzz/corpus/handler -max_total_time=60 -timeout=30
"""
from __future__ import annotations

import os
import socket
import logging
import struct
import sys
import threading

import atheris

with atheris.instrument_imports():
    from vhostuser.backend_handler import VhostUserHandler
    from vhostuser.connection import Endpoint
    from vhostuser.errors import Disconnected, ProtocolError
    from vhostuser.handler import BackendConnection
    from vhostuser.sys_util import create_shm_fd, new_event_consumer_and_notifier
    from vhostuser.testing.echo import EchoBackend

logging.disable(logging.CRITICAL)  # every rejected request logs: too slow and too loud to fuzz
HEADER = struct.Struct("=III")
MEM_SIZE = 1 << 20
#: requests that carry a memory fd per region (memory tables: the region count)
MEM_FD = {5, 6, 32, 37}
#: requests with an eventfd unless bit 8 of their u64 payload (VRING_NOFD_MASK) is set
VRING_FD = {12, 13, 14}
#: device-state transfer (42, 43) gets no fd: tests/test_device_state.py covers it with real pipes


def _eventfd() -> int:
    consumer, notifier = new_event_consumer_and_notifier()
    consumer.close()
    return notifier.detach()


def _fds_for(request: int, body: bytes) -> list[int]:
    if request in MEM_FD:
        n = min(struct.unpack_from("<I", body)[0], 8) if request == 5 and len(body) >= 4 else 1
        return [create_shm_fd(MEM_SIZE) for _ in range(n)]
    if request in VRING_FD and not (len(body) >= 8 and struct.unpack_from("<Q", body)[0] & 0x100):
        return [_eventfd()]
    if request == 7:
        return [_eventfd()]
    if request == 21:  # SET_BACKEND_REQ_FD: a channel whose peer is already gone
        ours, theirs = socket.socketpair()
        ours.close()
        return [theirs.detach()]
    return []


def _frame(stream: bytes, stray: int) -> list[tuple[bytes, list[int]]]:
    """Cut the stream into messages (by header size) with their fds."""
    chunks, pos = [], 0
    while pos < len(stream):
        end = pos + HEADER.size
        if end <= len(stream):
            request, _, size = HEADER.unpack_from(stream, pos)
            end = min(end + size, len(stream))
            fds = _fds_for(request, stream[pos + HEADER.size:end])
        else:
            fds = []
        if stray and len(chunks) == stray % 4:
            fds.append(_eventfd())
        chunks.append((stream[pos:end], fds))
        pos = end
    return chunks


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


#: one handler serves every input, as the daemon's serves connection after connection
HANDLER = VhostUserHandler(EchoBackend())


def test_one_input(data: bytes) -> None:
    if not data:
        return
    threads, fds_before = threading.active_count(), _open_fds()
    handler = HANDLER
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    conn = BackendConnection(Endpoint(theirs), handler)
    try:
        for data_chunk, fds in _frame(data[1:], data[0]):
            try:
                socket.send_fds(ours, [data_chunk], fds)
            finally:
                for fd in fds:
                    os.close(fd)
        ours.shutdown(socket.SHUT_WR)
        while True:
            conn.handle_one(timeout=5)
    except (Disconnected, ProtocolError):
        pass
    finally:
        conn.close()
        handler.disconnected()
        ours.close()
    assert threading.active_count() == threads, "a worker thread outlived the connection"
    assert _open_fds() == fds_before, "fd leak"


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
