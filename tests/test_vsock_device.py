"""VsockBackend's ring glue, with stand-in vrings and a real, not-started worker
whose poller we drive.  Real rings (mock front-end as the guest driver):
``test_vsock_rings.py``; a real guest under QEMU: ``test_vsock_guest.py``."""
from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque

from vhostuser.devices.vsock.device import RX_QUEUE, TX_QUEUE, VsockBackend
from vhostuser.devices.vsock.engine import VsockEngineConfig
from vhostuser.devices.vsock.packet import HDR_SIZE, HOST_CID, SHUTDOWN_BOTH, Op, VsockHeader
from vhostuser import EVENT_READ
from vhostuser.errors import ChainTooShort
from vhostuser.worker import Worker

TIMEOUT = 20.0


class FakeReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read_exact(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ChainTooShort("short")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


class FakeWriter:
    def __init__(self, size: int) -> None:
        self.buf = bytearray()
        self.size = size

    @property
    def available_bytes(self) -> int:
        return self.size - len(self.buf)

    @property
    def bytes_written(self) -> int:
        return len(self.buf)

    def write(self, data: bytes) -> int:
        if len(data) > self.available_bytes:
            raise ChainTooShort("full")
        self.buf += data
        return len(data)


class FakeChain:
    def __init__(self, data: bytes = b"", size: int = 0) -> None:
        self._reader, self._writer = FakeReader(data), FakeWriter(size)

    def reader(self) -> FakeReader:
        return self._reader

    def writer(self) -> FakeWriter:
        return self._writer


class FakeVring:
    is_running = True

    def __init__(self) -> None:
        self.avail: deque[FakeChain] = deque()
        self.used: list[tuple[FakeChain, int]] = []
        self.signals = 0

    def pop_descriptor_chain(self) -> FakeChain | None:
        return self.avail.popleft() if self.avail else None

    def pop_batch(self, n: int = 64) -> list[FakeChain]:
        out = []
        while self.avail and len(out) < n:
            out.append(self.avail.popleft())
        return out

    def add_used(self, chain: FakeChain, length: int) -> None:
        self.used.append((chain, length))

    def add_used_batch(self, entries) -> None:  # noqa: ANN001
        for chain, length in entries:
            self.add_used(chain, length)

    def enable_notification(self) -> bool:
        return False

    def signal_used_queue(self) -> bool:
        self.signals += 1
        return True


def test_glue_moves_packets_between_rings_and_host(tmp_path, no_fd_leak) -> None:  # noqa: ANN001
    uds = str(tmp_path / "vm.vsock")
    backend = VsockBackend(VsockEngineConfig(guest_cid=7, uds_path=uds))
    rx, tx = FakeVring(), FakeVring()
    vrings = [rx, tx]
    worker = Worker(0, backend, vrings, [0, 1], threading.RLock())  # type: ignore[arg-type]
    backend.fd_registry.bind([worker])  # what the daemon does when it starts
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_99")
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    host = None
    try:
        backend.vring_started(RX_QUEUE, rx)  # type: ignore[arg-type]

        def deliver_tx(hdr: VsockHeader, payload: bytes = b"") -> None:
            tx.avail.append(FakeChain(hdr.pack() + payload))
            backend.handle_event(TX_QUEUE, EVENT_READ, dict(enumerate(vrings)), 0)  # type: ignore[arg-type]

        def rx_packets() -> list[tuple[VsockHeader, bytes]]:
            out = []
            for chain, length in rx.used:
                raw = bytes(chain.writer().buf)
                assert len(raw) == length
                out.append((VsockHeader.unpack(raw), raw[HDR_SIZE:]))
            rx.used.clear()
            return out

        def poll_once(timeout: float) -> None:
            for token, _ev in worker.poller.wait(timeout):
                backend.handle_event(token, EVENT_READ, dict(enumerate(vrings)), 0)  # type: ignore[arg-type]

        def hdr(op: int, length: int = 0, flags: int = 0) -> VsockHeader:
            return VsockHeader(7, HOST_CID, 1000, 99, length, 1, op, flags, 65536, 0)

        # REQUEST with no rx buffers: the RESPONSE waits for the guest's rx kick
        deliver_tx(hdr(Op.REQUEST))
        assert tx.used and tx.used[0][1] == 0
        host, _ = listener.accept()
        host.settimeout(TIMEOUT)
        assert not rx.used
        for _ in range(4):
            rx.avail.append(FakeChain(size=4096))
        backend.handle_event(RX_QUEUE, EVENT_READ, dict(enumerate(vrings)), 0)  # type: ignore[arg-type]
        (resp, _), = rx_packets()
        assert resp.op == Op.RESPONSE and resp.dst_cid == 7 and resp.buf_alloc == 65536

        # guest -> host: payload across the chain
        deliver_tx(hdr(Op.RW, 5), b"hello")
        assert host.recv(5) == b"hello"

        # host -> guest through the worker poller
        host.sendall(b"x" * 10000)
        got = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while len(got) < 10000 and time.monotonic() < deadline:
            poll_once(0.05)
            for h, payload in rx_packets():
                assert h.op == Op.RW and len(payload) <= 4096 - HDR_SIZE
                got += payload
            while len(rx.avail) < 4:
                rx.avail.append(FakeChain(size=4096))
            backend.handle_event(RX_QUEUE, EVENT_READ, dict(enumerate(vrings)), 0)  # type: ignore[arg-type]
        assert bytes(got) == b"x" * 10000

        # a truncated tx chain is dropped, not fatal
        tx.avail.append(FakeChain(hdr(Op.RW, 50).pack() + b"short"))
        backend.handle_event(TX_QUEUE, EVENT_READ, dict(enumerate(vrings)), 0)  # type: ignore[arg-type]

        # clean close
        deliver_tx(hdr(Op.SHUTDOWN, flags=SHUTDOWN_BOTH))
        assert any(h.op == Op.RST for h, _ in rx_packets())
        assert host.recv(10) == b""
        assert not backend.engine.connections
    finally:
        if host is not None:
            host.close()
        listener.close()
        backend.close()
        worker.poller.close()
    assert not os.path.exists(uds)
