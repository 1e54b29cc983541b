"""vsock under real QEMU: a Linux guest's own virtio-vsock driver (vsock,
vmw_vsock_virtio_transport[_common]) talks AF_VSOCK through our back-end
(``vhost-user-vsock-pci``, guest CID 3) to AF_UNIX sockets on the host.

The guest side is ``tests/vsock_guest/vsock_io.c`` (busybox has no AF_VSOCK
tool), compiled here with ``gcc -static`` into a cache keyed by the source's
hash and put into the guest with ``extra_files``.  Both sides generate the same
deterministic streams and check every received byte (so loss, duplication and
reordering fail), and the sizes are compared.

* one boot, the device in this process: a host -> guest stream (``CONNECT``) and
  a guest -> host stream (``<uds>_<port>``) at the same time, each answered by a
  stream in the other direction;
* one boot, the ``vhostuser vsock`` command (``--fd``, the way a service manager
  hands it a listening socket): 8 host -> guest and 8 guest -> host connections
  in parallel.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from vhostuser.daemon import VhostUserDaemon
from vhostuser.devices.vsock.device import VsockBackend
from vhostuser.devices.vsock.engine import VsockEngineConfig
from vhostuser.testing.guest import VhostUserDevice, build_static_program, start_guest

pytestmark = pytest.mark.qemu

SOURCE = Path(__file__).parent / "vsock_guest" / "vsock_io.c"
GUEST_CID = 3
GUEST_BIN = "/root/vsock_io"
HOST_PORT = 6000          # the guest connects to CID 2 port 6000 -> <uds>_6000
GUEST_PORT = 5000         # the host sends CONNECT 5000
REPLY_XOR = 0x5A5A5A5A
IO_TIMEOUT = 120.0
_MiB = 1 << 20


# -------------------------------------------------------------- the program
def build_vsock_io() -> Path:
    """Compile vsock_io.c (static) once per source version; returns the binary."""
    return build_static_program(SOURCE, flags=("-O2", "-Wall"))


@pytest.fixture(scope="module")
def vsock_io() -> Path:
    return build_vsock_io()


# ---------------------------------------------------- the streams (as in C)
_TABLE_SIZE = 65536 + 4096
_CHUNK = 4096
_M64 = (1 << 64) - 1


def _table(seed: int) -> bytes:
    x = (seed * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D) & _M64 or 1
    words = []
    for _ in range(_TABLE_SIZE // 8):
        x ^= (x << 13) & _M64
        x ^= x >> 7
        x ^= (x << 17) & _M64
        words.append(x)
    return struct.pack(f"<{len(words)}Q", *words)


def stream(seed: int, n: int) -> bytes:
    """The bytes vsock_io sends for ``seed`` (u32)."""
    table = _table(seed)
    out = bytearray()
    k = 0
    while len(out) < n:
        off = (k * 1237) % 65536
        out += struct.pack("<I", (seed ^ k) & 0xFFFF_FFFF) + table[off:off + _CHUNK - 4]
        k += 1
    return bytes(out[:n])


def reply_seed(seed: int) -> int:
    return seed ^ REPLY_XOR


# --------------------------------------------------------------- the host
def _recv_all(sock: socket.socket) -> bytes:
    got = bytearray()
    while chunk := sock.recv(256 * 1024):
        got += chunk
    return bytes(got)


def host_responder(sock: socket.socket, back_bytes: int) -> tuple[int, bytes]:
    """A guest connection accepted on ``<uds>_<port>``: learn the seed from the
    first 4 bytes, send ``stream(seed ^ REPLY_XOR, back_bytes)`` while reading to
    EOF.  Returns (seed, everything received)."""
    with sock:
        sock.settimeout(IO_TIMEOUT)
        head = b""
        while len(head) < 4:
            b = sock.recv(4 - len(head))
            assert b, "EOF before the seed"
            head += b
        seed = struct.unpack("<I", head)[0]
        data = stream(reply_seed(seed), back_bytes)

        def send() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = head + _recv_all(sock)
        sender.join(IO_TIMEOUT)
        assert not sender.is_alive()
        return seed, got


def host_initiator(uds: str, port: int, seed: int, nbytes: int) -> tuple[int, bytes]:
    """Connect to the guest's ``port`` through ``uds`` (``CONNECT``), send
    ``stream(seed, nbytes)``, read to EOF.  Returns (local port, what came back)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.connect(uds)
        data = f"CONNECT {port}\n".encode() + stream(seed, nbytes)

        def send() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        line = b""
        while not line.endswith(b"\n"):
            b = sock.recv(1)
            assert b, f"closed before OK (got {line!r})"
            line += b
        m = re.fullmatch(rb"OK (\d+)\n", line)
        assert m, line
        got = _recv_all(sock)
        sender.join(IO_TIMEOUT)
        assert not sender.is_alive()
        return int(m.group(1)), got


def accept_responders(listener: socket.socket, pool: ThreadPoolExecutor, count: int, back_bytes: int,
                      stop: threading.Event) -> list:
    with listener:
        listener.settimeout(IO_TIMEOUT)
        futures = []
        for _ in range(count):
            sock, _ = listener.accept()
            if stop.is_set():
                sock.close()
                raise RuntimeError("aborted")
            futures.append(pool.submit(host_responder, sock, back_bytes))
        return [f.result(IO_TIMEOUT) for f in futures]


@contextlib.contextmanager
def acceptor(listener: socket.socket, pool: ThreadPoolExecutor, count: int, back_bytes: int) -> Iterator[Future]:
    """Run :func:`accept_responders` in ``pool``; if the block fails, wake the
    blocked ``accept`` (a connection of our own) so the pool can shut down at once."""
    stop = threading.Event()
    path = listener.getsockname()
    future = pool.submit(accept_responders, listener, pool, count, back_bytes, stop)
    try:
        yield future
    except BaseException:
        stop.set()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
        raise


def guest_lines(output: str, prefix: str) -> list[dict[str, str]]:
    """The ``OK <role> key=value ...`` lines of vsock_io for ``role``."""
    out = []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] == "OK" and parts[1] == prefix:
            out.append(dict(p.split("=", 1) for p in parts[2:]))
    return out


def listen_uds(path: str, backlog: int = 16) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(backlog)
    return s


# ---------------------------------------------------------------- the tests
G2H_BYTES = 8 * _MiB + 123      # guest -> host stream
G2H_BACK = 2 * _MiB + 7         # the host's answer on it
H2G_BYTES = 8 * _MiB + 45       # host -> guest stream
H2G_BACK = 2 * _MiB + 9         # the guest's answer on it


@pytest.mark.both_impls  # the guest's I/O runs through the data-path core
def test_guest_streams_both_ways(no_fd_leak: None, vsock_io: Path, tmp_path: Path) -> None:
    uds = str(tmp_path / "vm.vsock")
    sock = str(tmp_path / "vhost.sock")
    backend = VsockBackend(VsockEngineConfig(guest_cid=GUEST_CID, uds_path=uds))
    listener = listen_uds(f"{uds}_{HOST_PORT}")
    script = (
        f"{GUEST_BIN} listen {GUEST_PORT} 1 {H2G_BACK} & L=$!\n"
        f"{GUEST_BIN} connect 2 {HOST_PORT} {G2H_BYTES} 7; echo connect-rc=$?\n"
        "wait $L; echo listen-rc=$?\n"
    )
    t0 = time.monotonic()
    try:
        with VhostUserDaemon("vsock", backend) as daemon, ThreadPoolExecutor(4) as pool:
            daemon.start_server(sock)
            with start_guest(script, devices=[VhostUserDevice("vsock", sock)],
                             extra_files={GUEST_BIN: vsock_io}, timeout=240) as guest, \
                    acceptor(listener, pool, 1, G2H_BACK) as accepted:
                guest.wait_for_output(f"READY listen {GUEST_PORT}")
                t_ready = time.monotonic()
                initiated = pool.submit(host_initiator, uds, GUEST_PORT, 99, H2G_BYTES)
                result = guest.wait()
                t_end = time.monotonic()
                assert result.status == 0, result.output
                assert "connect-rc=0" in result.output and "listen-rc=0" in result.output, result.output
                local_port, back = initiated.result(IO_TIMEOUT)
                ((seed, got),) = accepted.result(IO_TIMEOUT)
            # guest -> host: every byte the guest sent, in order; and the guest checked our answer
            assert seed == 7 and len(got) == G2H_BYTES and got == stream(7, G2H_BYTES)
            (conn,) = guest_lines(result.output, "connect")
            assert (int(conn["sent"]), int(conn["recv"])) == (G2H_BYTES, G2H_BACK)
            # host -> guest: the guest checked every byte; what it answered is exact too
            (lst,) = guest_lines(result.output, "listen")
            assert (int(lst["port"]), int(lst["recv"]), int(lst["sent"])) == (local_port, H2G_BYTES, H2G_BACK)
            assert back == stream(reply_seed(99), H2G_BACK)
            assert daemon.connections == 1
    finally:
        listener.close()
        backend.close()
    total = G2H_BYTES + G2H_BACK + H2G_BYTES + H2G_BACK
    print(f"\nguest streams: {total / _MiB:.1f} MiB in {t_end - t_ready:.1f} s after the guest was ready "
          f"({total / _MiB / (t_end - t_ready):.2f} MiB/s); boot + all {t_end - t0:.1f} s")


PARALLEL = 8
PAR_BYTES = 512 * 1024 + 3      # each initiator's stream
PAR_BACK = 256 * 1024 + 5       # each responder's answer


def test_guest_parallel_connections_through_the_command(no_fd_leak: None, vsock_io: Path, tmp_path: Path) -> None:
    uds = str(tmp_path / "vm.vsock")
    listener = listen_uds(f"{uds}_{HOST_PORT}", backlog=PARALLEL)
    # the vhost-user socket is made here and inherited with --fd, so QEMU can
    # connect as soon as it starts (no waiting for the command to bind it)
    vhost = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_path = str(tmp_path / "vhost.sock")
    vhost.bind(sock_path)
    vhost.listen(1)
    cmd = [sys.executable, "-m", "vhostuser", "vsock", "--fd", str(vhost.fileno()), "--guest-cid", str(GUEST_CID),
           "--uds-path", uds, "--queue-size", "128"]
    proc = subprocess.Popen(cmd, pass_fds=[vhost.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    vhost.close()
    script = (
        f"{GUEST_BIN} listen {GUEST_PORT} {PARALLEL} {PAR_BACK} & L=$!\n"
        f"{GUEST_BIN} connect-many 2 {HOST_PORT} {PARALLEL} {PAR_BYTES} 1000; echo connect-rc=$?\n"
        "wait $L; echo listen-rc=$?\n"
    )
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(2 * PARALLEL + 2) as pool:
            with start_guest(script, devices=[VhostUserDevice("vsock", sock_path)],
                             extra_files={GUEST_BIN: vsock_io}, timeout=240) as guest, \
                    acceptor(listener, pool, PARALLEL, PAR_BACK) as accepted:
                guest.wait_for_output(f"READY listen {GUEST_PORT}")
                t_ready = time.monotonic()
                initiated = [pool.submit(host_initiator, uds, GUEST_PORT, 2000 + i, PAR_BYTES)
                             for i in range(PARALLEL)]
                result = guest.wait()
                t_end = time.monotonic()
                assert result.status == 0, result.output
                assert "connect-rc=0" in result.output and "listen-rc=0" in result.output, result.output
                host_init = [f.result(IO_TIMEOUT) for f in initiated]
                host_resp = accepted.result(IO_TIMEOUT)
        # guest -> host: 8 connections, seeds 1000..1007, each stream exact
        assert sorted(seed for seed, _ in host_resp) == list(range(1000, 1000 + PARALLEL))
        for seed, got in host_resp:
            assert got == stream(seed, PAR_BYTES), f"connection with seed {seed} differs"
        conns = guest_lines(result.output, "connect")
        assert sorted(int(c["seed"]) for c in conns) == list(range(1000, 1000 + PARALLEL))
        assert all((int(c["sent"]), int(c["recv"])) == (PAR_BYTES, PAR_BACK) for c in conns), conns
        # host -> guest: 8 connections, each answered exactly
        for i, (_port, back) in enumerate(host_init):
            assert back == stream(reply_seed(2000 + i), PAR_BACK), f"host connection {i} got a wrong answer"
        lst = guest_lines(result.output, "listen")
        assert sorted(int(c["port"]) for c in lst) == sorted(p for p, _ in host_init)
        assert all((int(c["recv"]), int(c["sent"])) == (PAR_BYTES, PAR_BACK) for c in lst), lst
    finally:
        listener.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert not os.path.exists(uds), "the command did not remove its host socket"
    total = 2 * PARALLEL * (PAR_BYTES + PAR_BACK)
    print(f"\nparallel: {total / _MiB:.1f} MiB over {2 * PARALLEL} connections in {t_end - t_ready:.1f} s "
          f"({total / _MiB / (t_end - t_ready):.2f} MiB/s); boot + all {t_end - t0:.1f} s")
