"""``vhostuser console`` as a program: flags, the nested (stdio) and unix backends,
clean shutdown on SIGTERM."""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

import pytest

from vhostuser.cli import build_parser
from vhostuser.devices.console import ConsoleBackend, StdioHost, build_backends
from vhostuser.errors import ConsoleConfigError
from vhostuser.testing import FrontendOptions, MockFrontend

TIMEOUT = 10.0


def parse(*argv: str):  # noqa: ANN201
    return build_parser().parse_args(["console", *argv])


def read_exact(fd: int, n: int, timeout: float = TIMEOUT) -> bytes:
    """Read n bytes from a (blocking) pipe, bounded by a deadline."""
    out = bytearray()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n:
            left = deadline - time.monotonic()
            assert left > 0 and sel.select(left), f"timed out after {len(out)} of {n} bytes"
            chunk = os.read(fd, n - len(out))
            assert chunk, "EOF"
            out += chunk
    finally:
        sel.close()
    return bytes(out)


def spawn(*argv: str, **kwargs) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen([sys.executable, "-m", "vhostuser", "console", *argv], **kwargs)


def test_registered_subcommand_and_capabilities() -> None:
    done = subprocess.run([sys.executable, "-m", "vhostuser", "console", "--print-capabilities"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == {"type": "console", "features": []}


def test_discovery_descriptor_is_valid_json() -> None:
    import vhostuser.devices as devices

    path = os.path.join(os.path.dirname(devices.__file__), "console.json")
    with open(path) as f:
        desc = json.load(f)
    assert desc["type"] == "console" and desc["binary"]


@pytest.mark.parametrize(("argv", "message"), [
    (["-b", "nested", "-c", "2"], "nested backend serves one"),
    (["-b", "nested", "--max-ports", "2"], "nested backend serves one"),
    (["-b", "unix"], "needs --uds-path"),
    (["-b", "network", "-p", "65535", "--max-ports", "2"], "do not fit"),
    (["-b", "unix", "--uds-path", "/x", "--max-ports", "2", "--port-name", "5=x"], "no port 5"),
    (["-b", "unix", "--uds-path", "/x", "--max-ports", "0"], "at least 1"),
])
def test_bad_option_combinations(argv, message) -> None:  # noqa: ANN001
    with pytest.raises(ConsoleConfigError, match=message):
        build_backends(parse("-s", "/tmp/unused.sock", *argv))


def test_port_names_and_tcp_ports(no_fd_leak) -> None:  # noqa: ANN001
    backends = build_backends(parse("-s", "/x", "-b", "network", "-p", "0", "-c", "2", "--max-ports", "3",
                                    "--port-name", "one", "--port-name", "2=two"))
    try:
        assert len(backends) == 2
        for b in backends:
            assert b.multiport and b.num_queues == 8
            assert [p.name for p in b.ports] == [None, "one", "two"]
            assert all(p.host.describe().startswith("tcp 127.0.0.1:") for p in b.ports)
    finally:
        for b in backends:
            b.close()


def test_tcp_ports_follow_vhost_device_console(no_fd_leak) -> None:  # noqa: ANN001
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    base = probe.getsockname()[1]
    probe.close()
    try:
        backends = build_backends(parse("-s", "/x", "-b", "network", "-p", str(base), "-c", "2"))
    except ConsoleConfigError:
        pytest.skip("the probed TCP ports are taken")
    try:
        assert [b.ports[0].host.address[1] for b in backends] == [base, base + 1]
    finally:
        for b in backends:
            b.close()


def test_unix_backend_program(vhost_socket_dir) -> None:  # noqa: ANN001
    sock = os.path.join(vhost_socket_dir, "vhu.sock")
    uds = os.path.join(vhost_socket_dir, "con.uds")
    proc = spawn("-s", sock, "-b", "unix", "--uds-path", uds, stderr=subprocess.PIPE)
    try:
        with MockFrontend.connect(sock, FrontendOptions(queue_size=64), timeout=TIMEOUT) as fe:
            fe.add(0, [], [64])
            fe.publish(0)
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while True:  # the program creates the socket at start-up
                try:
                    client.connect(uds)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            with client:
                client.sendall(b"login: ")
                assert fe.wait_used(0, 1, TIMEOUT)[0].data == b"login: "
                fe.request(1, [b"root\r\n"], [])
                assert client.recv(16) == b"root\r\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert not os.path.exists(uds) and not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_nested_backend_over_pipes(vhost_socket_dir) -> None:  # noqa: ANN001
    """--backend nested with stdin/stdout pipes (no tty: no raw mode, no escape)."""
    sock = os.path.join(vhost_socket_dir, "vhu.sock")
    proc = spawn("-s", sock, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with MockFrontend.connect(sock, FrontendOptions(queue_size=64), timeout=TIMEOUT) as fe:
            fe.request(1, [b"guest says hi\n"], [])
            assert read_exact(proc.stdout.fileno(), 14) == b"guest says hi\n"
            for _ in range(4):
                fe.add(0, [], [64])
            fe.publish(0)
            proc.stdin.write(b"host types")
            proc.stdin.flush()
            got = bytearray()
            while len(got) < 10:
                got += b"".join(u.data for u in fe.wait_used(0, 1, TIMEOUT))
            assert bytes(got) == b"host types"
            proc.stdin.close()  # EOF on the input: output still flows
            fe.request(1, [b"bye"], [])
            assert read_exact(proc.stdout.fileno(), 3) == b"bye"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None and not f.closed:
                f.close()


def test_stdio_host_restores_fd_flags(no_fd_leak) -> None:  # noqa: ANN001
    r, w = os.pipe()
    try:
        before = os.get_blocking(r), os.get_blocking(w)
        host = StdioHost(r, w)
        assert not os.get_blocking(r) and not os.get_blocking(w)
        backend = ConsoleBackend([host])
        backend.close()
        assert (os.get_blocking(r), os.get_blocking(w)) == before
    finally:
        os.close(r)
        os.close(w)


def test_stdio_host_refuses_a_regular_file(tmp_path, no_fd_leak) -> None:  # noqa: ANN001
    path = tmp_path / "input"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    try:
        with pytest.raises(ConsoleConfigError, match="regular file"):
            StdioHost(fd, w)
        assert os.get_blocking(fd) and os.get_blocking(w)
    finally:
        for x in (fd, r, w):
            os.close(x)
