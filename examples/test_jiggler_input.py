"""The event-producing tutorial device's test: the Linux virtio-input driver
(modelled by VirtioInputDriver) probes it, gets the moves it makes on its own,
and keeps getting them after the front-end reconnects."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from vhostuser.devices.input.config import CONFIG_SIZE, InputEvent
from vhostuser.testing import FrontendOptions
from vhostuser.testing.input_driver import VirtioInputDriver

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is not a package
from jiggler_input import EV_REL, EV_SYN, REL_X, JigglerBackend  # noqa: E402

OPTIONS = FrontendOptions(config_size=CONFIG_SIZE, queue_size=16)


def moves(events):
    return [e.value for e in events if e.type == EV_REL]


def test_the_driver_sees_a_jiggling_mouse(serve_backend, mock_frontend_factory):
    backend = JigglerBackend(interval=0.02)
    drv = VirtioInputDriver(mock_frontend_factory(serve_backend(backend), OPTIONS))
    dev = drv.probe()
    assert dev.name == "jiggler" and dev.events == {EV_REL: {0, 1}}
    events = drv.events(6)
    assert events[:2] == [InputEvent(EV_REL, REL_X, 10), InputEvent(EV_SYN, 0, 0)]
    assert moves(events)[:3] == [10, -10, 10]


def test_events_made_without_buffers_wait_then_flow_after_a_reconnect(serve_backend, mock_frontend_factory):
    backend = JigglerBackend(interval=0.02)
    fe = mock_frontend_factory(serve_backend(backend), OPTIONS)
    drv = VirtioInputDriver(fe, event_buffers=4)
    drv.probe()
    drv.events(4)
    time.sleep(0.3)                 # the 4 buffers are gone; ticks pile up as pending events
    assert len(backend.pending) > 4
    fe.reconnect()                  # vring_started again: register_fd again must be fine
    got = drv.events(20)            # the pending ones, then fresh ones, alternating directions
    values = moves(got)
    assert all(a == -b for a, b in zip(values, values[1:]))
