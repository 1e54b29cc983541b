"""INBAND_NOTIFICATIONS: kicks arrive as VRING_KICK messages and completions
leave as VRING_CALL on the back-end channel instead of eventfds."""
from __future__ import annotations

import time

from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.testing.echo import EchoBackend
from vhostuser.testing.frontend import DEFAULT_PROTOCOL_FEATURES, FrontendOptions, MockFrontend


def test_kicks_and_calls_travel_in_band(no_fd_leak, serve_backend) -> None:
    path = serve_backend(EchoBackend())
    opts = FrontendOptions(protocol_features=int(DEFAULT_PROTOCOL_FEATURES | PF.INBAND_NOTIFICATIONS),
                           event_idx=False)
    with MockFrontend.connect(path, opts) as fe:
        assert fe.protocol_features & PF.INBAND_NOTIFICATIONS
        fe.frontend.set_vring_call(0, None)  # no call fd: only VRING_CALL can tell us
        for i in range(5):
            used = fe.request(0, [f"ping {i}".encode()], [16])
            assert used.data[: used.length] == f"ping {i}".encode()
        # VRING_CALL is posted (its ack not waited for): the channel thread may
        # log the last ones a moment after the used entries became visible
        deadline = time.monotonic() + 10
        while len([n for n in fe.handler.log if n == "VRING_CALL 0"]) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        calls = [n for n in fe.handler.log if n == "VRING_CALL 0"]
        assert len(calls) >= 5
