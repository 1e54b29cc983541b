"""send_with_fds / recv_with_fds over AF_UNIX stream sockets, with and without
MSG_CMSG_CLOEXEC (the fallback sets FD_CLOEXEC with fcntl after receipt)."""
from __future__ import annotations

import array
import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest
from conftest import check_no_fd_leak
from hypothesis import given
from hypothesis import strategies as st

from vhostuser.errors import ControlMessageTruncated, FdPassingError, UnsupportedVariant
from vhostuser.sys_util import (
    HAVE_MSG_CMSG_CLOEXEC,
    MAX_FDS,
    recv_into_with_fds,
    recv_with_fds,
    send_with_fds,
)
from vhostuser.sys_util import sock_ctrl_msg

CLOEXEC = [
    pytest.param(
        True, id="msg_cmsg_cloexec", marks=pytest.mark.skipif(not HAVE_MSG_CMSG_CLOEXEC, reason="no MSG_CMSG_CLOEXEC")
    ),
    pytest.param(False, id="fcntl_cloexec"),
]


@pytest.fixture(scope="module")
def files() -> Iterator[list[int]]:
    """MAX_FDS open fds of distinct files."""
    fobjs = [tempfile.TemporaryFile() for _ in range(MAX_FDS)]
    yield [f.fileno() for f in fobjs]
    for f in fobjs:
        f.close()


@pytest.fixture
def pair(no_fd_leak: None) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


def _same_file(fd1: int, fd2: int) -> bool:
    s1, s2 = os.fstat(fd1), os.fstat(fd2)
    return (s1.st_dev, s1.st_ino) == (s2.st_dev, s2.st_ino)


def _cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("cloexec", CLOEXEC)
@given(
    data=st.binary(min_size=1, max_size=16384),
    picks=st.lists(st.integers(0, MAX_FDS - 1), max_size=MAX_FDS),
    split=st.integers(min_value=0),
)
def test_round_trip(files: list[int], cloexec: bool, data: bytes, picks: list[int], split: int) -> None:
    sent = [files[i] for i in picks]
    cut = split % (len(data) + 1)
    with check_no_fd_leak():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            assert send_with_fds(a, [data[:cut], memoryview(data)[cut:]], sent) == len(data)
            got, fds = recv_with_fds(b, len(data), MAX_FDS, cmsg_cloexec=cloexec)
            try:
                while len(got) < len(data):  # the stream may hand the bytes over in pieces
                    more, extra = recv_with_fds(b, len(data) - len(got), MAX_FDS, cmsg_cloexec=cloexec)
                    assert more and extra == []
                    got += more
                assert got == data
                assert len(fds) == len(sent)
                assert len(set(fds)) == len(fds) and not set(fds) & set(files)
                assert all(_same_file(s, r) for s, r in zip(sent, fds))
                assert all(_cloexec(fd) for fd in fds)
            finally:
                _close(fds)


@pytest.mark.parametrize("cloexec", CLOEXEC)
def test_recv_into_with_fds(pair, files: list[int], cloexec: bool) -> None:
    a, b = pair
    send_with_fds(a, [b"hello", b" world"], files[:3])
    buf = bytearray(64)
    n, fds = recv_into_with_fds(b, buf, MAX_FDS, cmsg_cloexec=cloexec)
    try:
        assert buf[:n] == b"hello world"
        assert [_same_file(s, r) for s, r in zip(files[:3], fds)] == [True] * 3
        assert all(_cloexec(fd) for fd in fds)
    finally:
        _close(fds)


@pytest.mark.parametrize("cloexec", CLOEXEC)
@pytest.mark.parametrize(("sent", "allowed"), [(5, 0), (5, 1), (2, 1), (5, 4), (MAX_FDS, MAX_FDS - 1)])
def test_truncated_control_data_closes_everything(files: list[int], cloexec: bool, sent: int, allowed: int) -> None:
    with check_no_fd_leak():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            send_with_fds(a, [b"x" * 16], files[:sent])
            with pytest.raises(ControlMessageTruncated):
                recv_with_fds(b, 16, allowed, cmsg_cloexec=cloexec)


@pytest.mark.parametrize("n", [0, 1, 7, MAX_FDS])
def test_exactly_max_fds_is_fine(pair, files: list[int], n: int) -> None:
    a, b = pair
    send_with_fds(a, [b"m"], files[:n])
    data, fds = recv_with_fds(b, 1, n)
    _close(fds)
    assert (data, len(fds)) == (b"m", n)


@pytest.mark.parametrize("cloexec", CLOEXEC)
def test_fds_arrive_with_a_short_read(pair, files: list[int], cloexec: bool) -> None:
    a, b = pair
    payload = bytes(range(64))
    send_with_fds(a, [payload], files[:3])
    head, fds = recv_with_fds(b, 10, MAX_FDS, cmsg_cloexec=cloexec)
    try:
        assert head == payload[:10]
        assert [_same_file(s, r) for s, r in zip(files[:3], fds)] == [True] * 3
        tail, more = recv_with_fds(b, 100, MAX_FDS, cmsg_cloexec=cloexec)
        assert (tail, more) == (payload[10:], [])
    finally:
        _close(fds)


def test_eof(pair) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    assert recv_with_fds(b, 100, MAX_FDS) == (b"", [])
    n, fds = recv_into_with_fds(b, bytearray(8), MAX_FDS)
    assert (n, fds) == (0, [])


def test_nonblocking_socket_raises_blocking_io_error(pair) -> None:
    _, b = pair
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_with_fds(b, 100, MAX_FDS)


def test_fds_need_data(pair, files: list[int]) -> None:
    a, _ = pair
    with pytest.raises(ValueError, match="at least one byte"):
        send_with_fds(a, [b""], files[:1])


class FakeSocket:
    """Returns canned recvmsg results (after optional EINTRs); records the flags."""

    def __init__(self, ancdata: list[tuple[int, int, bytes]], msg_flags: int = 0, eintr: int = 0) -> None:
        self.ancdata, self.msg_flags, self.eintr = ancdata, msg_flags, eintr
        self.flags: list[int] = []

    def recvmsg(self, size: int, ancbufsize: int, flags: int) -> tuple[bytes, list, int, None]:
        self.flags.append(flags)
        if self.eintr:
            self.eintr -= 1
            raise InterruptedError
        return b"data", self.ancdata, self.msg_flags, None


def _rights(fds: list[int], extra: bytes = b"") -> tuple[int, int, bytes]:
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes() + extra)


def test_malformed_control_message_closes_received_fds(files: list[int], no_fd_leak: None) -> None:
    fds = [os.dup(files[0]), os.dup(files[1])]  # the fds "the kernel installed"
    with pytest.raises(FdPassingError, match="malformed"):
        recv_with_fds(FakeSocket([_rights(fds, b"\x01\x02")]), 4, MAX_FDS)  # type: ignore[arg-type]


def test_ctrunc_flag_closes_received_fds(files: list[int], no_fd_leak: None) -> None:
    fds = [os.dup(files[0])]
    sock = FakeSocket([_rights(fds)], msg_flags=socket.MSG_CTRUNC)
    with pytest.raises(ControlMessageTruncated):
        recv_with_fds(sock, 4, MAX_FDS)  # type: ignore[arg-type]


def test_eintr_retried_and_other_cmsgs_ignored(files: list[int], no_fd_leak: None) -> None:
    fd = os.dup(files[0])
    sock = FakeSocket([(socket.SOL_SOCKET, 0x7F, b"????"), _rights([fd])], eintr=2)
    data, fds = recv_with_fds(sock, 4, MAX_FDS, cmsg_cloexec=False)  # type: ignore[arg-type]
    _close(fds)
    assert (data, fds, len(sock.flags)) == (b"data", [fd], 3)


@pytest.mark.parametrize(("env", "want_flag"), [("0", False), ("1", True), ("", HAVE_MSG_CMSG_CLOEXEC)])
def test_env_switch(monkeypatch: pytest.MonkeyPatch, env: str, want_flag: bool) -> None:
    if want_flag and not HAVE_MSG_CMSG_CLOEXEC:
        pytest.skip("no MSG_CMSG_CLOEXEC")
    monkeypatch.setenv("VHOSTUSER_CMSG_CLOEXEC", env)
    sock = FakeSocket([])
    recv_with_fds(sock, 4, MAX_FDS)  # type: ignore[arg-type]
    assert bool(sock.flags[0] & getattr(socket, "MSG_CMSG_CLOEXEC", 0)) is want_flag


def test_bad_env_and_unavailable_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHOSTUSER_CMSG_CLOEXEC", "yes")
    with pytest.raises(UnsupportedVariant, match="expected 0 or 1"):
        recv_with_fds(FakeSocket([]), 4, MAX_FDS)  # type: ignore[arg-type]
    monkeypatch.delenv("VHOSTUSER_CMSG_CLOEXEC")
    monkeypatch.setattr(sock_ctrl_msg, "HAVE_MSG_CMSG_CLOEXEC", False)  # as on macOS
    with pytest.raises(UnsupportedVariant, match="not available"):
        recv_with_fds(FakeSocket([]), 4, MAX_FDS, cmsg_cloexec=True)  # type: ignore[arg-type]
    sock = FakeSocket([])
    recv_with_fds(sock, 4, MAX_FDS)  # type: ignore[arg-type]
    assert sock.flags == [0]


def test_empty_receive_buffer_rejected(pair) -> None:
    _, b = pair
    with pytest.raises(ValueError):
        recv_with_fds(b, 0, MAX_FDS)
    with pytest.raises(ValueError):
        recv_into_with_fds(b, bytearray(0), MAX_FDS)
    with pytest.raises(ValueError):
        recv_with_fds(b, 1, -1)
