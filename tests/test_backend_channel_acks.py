"""Issue 10: in-band notifications never wait for the front-end, and a late ack
never desynchronises the back-end channel."""
from __future__ import annotations

import socket
import time

import pytest

from vhostuser.backend_channel import BackendChannel
from vhostuser.connection import Endpoint, ack_bytes
from vhostuser.protocol.message import BackendReq
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF

FEATURES = PF.REPLY_ACK | PF.BACKEND_REQ | PF.INBAND_NOTIFICATIONS | PF.CONFIG


@pytest.fixture
def channel():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    chan = BackendChannel(Endpoint(ours, BackendReq, replies=True), int(FEATURES), reply_timeout=2.0)
    peer = Endpoint(theirs, BackendReq)
    yield chan, peer
    chan.close()
    peer.close()


def test_vring_call_does_not_wait_for_the_ack(channel) -> None:
    chan, peer = channel
    t0 = time.monotonic()
    for _ in range(3):
        chan.vring_call(0)  # nobody acks (yet)
    assert time.monotonic() - t0 < 1.0
    for _ in range(3):
        assert peer.recv(1.0).request == BackendReq.VRING_CALL
        peer.send_bytes(ack_bytes(BackendReq.VRING_CALL, 0))
    peer.send_bytes(ack_bytes(BackendReq.CONFIG_CHANGE_MSG, 0))  # answered ahead of time
    chan.config_change()  # skips the three late acks, takes its own


def test_a_late_ack_is_not_taken_for_the_next_reply(channel) -> None:
    chan, peer = channel
    chan.reply_timeout = 0.2
    with pytest.raises(TimeoutError):
        chan.config_change()
    peer.send_bytes(ack_bytes(BackendReq.CONFIG_CHANGE_MSG, 1))  # the first one, late and failed
    peer.send_bytes(ack_bytes(BackendReq.CONFIG_CHANGE_MSG, 0))  # the second one, fine
    chan.reply_timeout = 2.0
    chan.config_change()  # must not read the late failure as its own


def test_posting_stops_when_the_frontend_never_acks(channel, monkeypatch) -> None:
    import vhostuser.backend_channel as bc
    from vhostuser.errors import RequestFailed

    chan, peer = channel
    monkeypatch.setattr(bc, "MAX_UNACKED", 4)
    for _ in range(4):
        chan.vring_call(1)
    with pytest.raises(RequestFailed):
        chan.vring_call(1)
