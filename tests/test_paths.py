"""Every public call that takes a path accepts ``str`` and any ``os.PathLike``
(the guest rig's ``workdir`` is covered in test_guest_rig.py)."""
from __future__ import annotations

from pathlib import Path

from vhostuser import VhostUserDaemon
from vhostuser.testing import EchoBackend, MockFrontend
from vhostuser.testing.checker import run_checks


def test_daemon_serves_a_pathlike_socket(no_fd_leak, vhost_socket_dir: str) -> None:
    sock = Path(vhost_socket_dir) / "p.sock"
    with VhostUserDaemon("echo", EchoBackend(1)) as daemon:
        daemon.start_server(sock)
        assert daemon.socket_path == str(sock)
        with MockFrontend.connect(sock) as fe:
            assert fe.request(0, [b"ping"], [8]).data[:4] == b"ping"


def test_fixture_and_checker_take_pathlike(serve_backend, vhost_socket_dir: str) -> None:
    sock = Path(vhost_socket_dir) / "q.sock"
    assert serve_backend(EchoBackend(1), path=sock) == str(sock)
    results = run_checks(sock, only=["handshake"], timeout=5)
    assert [r.status for r in results] == ["pass"]
