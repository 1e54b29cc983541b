"""socket_peer_state: what the peer of a connected socket has shut down."""
from __future__ import annotations

import socket

import pytest
from conftest import variant_params

from vhostuser.errors import UnsupportedVariant
from vhostuser.sys_util import AVAILABLE_SOCKSTATE_KINDS, PeerState, SockStateKind, socket_peer_state

POLL = variant_params(SockStateKind, AVAILABLE_SOCKSTATE_KINDS - {SockStateKind.NONE})


@pytest.mark.parametrize("family,kind", [
    (socket.AF_UNIX, socket.SOCK_STREAM),
    (socket.AF_UNIX, socket.SOCK_SEQPACKET),
])
@pytest.mark.parametrize("variant", POLL)
def test_open_half_closed_and_closed(family: int, kind: int, variant: SockStateKind, no_fd_leak: None) -> None:
    a, b = socket.socketpair(family, kind)
    with a, b:
        assert socket_peer_state(a.fileno(), variant) == PeerState(False, False)
        b.send(b"x")
        assert socket_peer_state(a.fileno(), variant) == PeerState(False, False)  # data is not a shutdown
        b.shutdown(socket.SHUT_WR)
        state = socket_peer_state(a.fileno(), variant)
        assert state.send_shut and not state.both_shut and state.known
        assert a.recv(10) == b"x"
        b.close()
        assert socket_peer_state(a.fileno(), variant) == PeerState(True, True)


@pytest.mark.parametrize("variant", POLL)
def test_both_directions_shut_is_hangup(variant: SockStateKind, no_fd_leak: None) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.shutdown(socket.SHUT_RDWR)
        assert socket_peer_state(a.fileno(), variant).both_shut


def test_without_poll_assumes_closed(monkeypatch: pytest.MonkeyPatch, no_fd_leak: None) -> None:
    a, b = socket.socketpair()
    with a, b:
        assert socket_peer_state(a.fileno(), "none") == PeerState(True, True, known=False)
        monkeypatch.setenv("VHOSTUSER_SOCKSTATE", "none")
        assert not socket_peer_state(a.fileno()).known
        monkeypatch.setenv("VHOSTUSER_SOCKSTATE", "bogus")
        with pytest.raises(UnsupportedVariant):
            socket_peer_state(a.fileno())
