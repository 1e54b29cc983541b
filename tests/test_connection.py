"""Listener and Endpoint over real AF_UNIX sockets."""
from __future__ import annotations

import os
import socket
import stat

import pytest

from vhostuser.connection import Endpoint, Listener
from vhostuser.errors import Disconnected, InvalidMessage
from vhostuser.protocol import payloads as p
from vhostuser.protocol.codec import Message, encode
from vhostuser.protocol.message import FrontendReq


def test_listener_mode_stale_and_live(tmp_path, no_fd_leak) -> None:
    path = tmp_path / "vhu.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    with Listener(path) as lst:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        fe = Endpoint.connect(path)
        be = lst.accept_endpoint(timeout=5)
        fe.send(Message(FrontendReq.GET_FEATURES))
        assert be.recv(timeout=5) == Message(FrontendReq.GET_FEATURES)
        fe.close()
        with pytest.raises(Disconnected):
            be.recv(timeout=5)
        be.close()
        with pytest.raises(OSError, match="listening"):
            Listener(path)  # someone is listening: not unlinked (its probe connection is queued)
        lst.accept(timeout=5).close()
        assert path.exists()
    assert not path.exists()


def test_listener_refuses_non_socket(tmp_path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(OSError):
        Listener(path)
    assert path.exists()


def test_listener_from_fd(tmp_path, no_fd_leak) -> None:
    path = str(tmp_path / "act.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(1)
    lst = Listener.from_fd(sock.detach())
    assert lst.path == path
    fe = Endpoint.connect(path)
    conn = lst.accept(timeout=5)
    conn.close()
    fe.close()
    lst.close()
    assert os.path.exists(path)  # not ours to unlink
    os.unlink(path)


def test_endpoint_from_fd_fds_with_header_and_timeout(no_fd_leak) -> None:
    a, b = socket.socketpair()
    fe = Endpoint(a, FrontendReq, replies=True)
    be = Endpoint.from_fd(b.detach())
    r, w = os.pipe()
    try:
        fe.send(Message(FrontendReq.SET_VRING_KICK, p.vring_fd_u64(1, True), fds=(r,)))
        msg = be.recv(timeout=5)
        assert msg.request is FrontendReq.SET_VRING_KICK and len(msg.fds) == 1
        os.write(w, b"k")
        assert os.read(msg.fds[0], 1) == b"k"
        msg.close_fds()
        with pytest.raises(TimeoutError):
            be.recv(timeout=0.05)
        # a bad message is rejected, its fds closed, and the endpoint stays usable
        fe.send_bytes(encode(Message(FrontendReq.SET_OWNER))[:8] + (8).to_bytes(4, "little") + bytes(8), [r])
        with pytest.raises(InvalidMessage):
            be.recv(timeout=5)
        fe.send(Message(FrontendReq.SET_OWNER))
        assert be.recv(timeout=5) == Message(FrontendReq.SET_OWNER)
    finally:
        os.close(r)
        os.close(w)
        be.close()
    with pytest.raises(Disconnected):
        fe.send(Message(FrontendReq.SET_OWNER))
        fe.send(Message(FrontendReq.SET_OWNER))
    fe.close()


def test_eof_mid_message_is_disconnected(no_fd_leak) -> None:
    a, b = socket.socketpair()
    be = Endpoint(b)
    a.send(encode(Message(FrontendReq.SET_FEATURES, p.U64(1)))[:14])
    a.close()
    with pytest.raises(Disconnected):
        be.recv(timeout=5)
    be.close()
