"""The virtio-gpio device through the daemon; the mock front-end plays Linux's
drivers/gpio/gpio-virtio.c: config, GET_NAMES, directions, values, interrupts
(SET_IRQ_TYPE then one eventq buffer per line, re-queued after each interrupt),
and bad requests, each answered with VIRTIO_GPIO_STATUS_ERR / IRQ INVALID."""
from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest
from helpers.procs import vhostuser_process, wait_for_path

from vhostuser.devices.gpio import protocol as p
from vhostuser.devices.gpio.chip import SimulatedChip
from vhostuser.devices.gpio.device import GpioBackend
from vhostuser.testing import FrontendOptions, MockFrontend

D, T, M = p.Direction, p.IrqType, p.MsgType
OPTS = FrontendOptions(queue_size=256, device_features=p.F_IRQ)
NAMES = ["led", "button", "", "reset"]


class Driver:
    """gpio-virtio.c's requests, as the driver sends them."""

    def __init__(self, fe: MockFrontend) -> None:
        self.fe = fe
        ngpio, names_size = p.CONFIG.unpack(fe.get_config(0, p.CONFIG.size))
        self.ngpio, self.names_size = ngpio, names_size

    def req(self, rtype: int, gpio: int = 0, value: int = 0, rxlen: int = 2) -> tuple[int, bytes]:
        used = self.fe.request(0, [p.REQUEST.pack(rtype, gpio, value)], [rxlen])
        return used.data[0], used.data[1:used.length]

    def ok(self, rtype: int, gpio: int = 0, value: int = 0) -> int:
        status, data = self.req(rtype, gpio, value)
        assert status == p.Status.OK and len(data) == 1
        return data[0]

    def arm(self, gpio: int) -> int:
        """virtio_gpio_irq_prepare: queue the line's eventq buffer."""
        token = self.fe.add(1, [p.IRQ_REQUEST.pack(gpio)], [1])
        self.fe.publish(1)
        return token

    def irq(self, timeout: float = 10) -> tuple[int, int]:
        [used] = self.fe.wait_used(1, 1, timeout=timeout)
        return used.token, used.data[0]


@pytest.fixture
def gpio(no_fd_leak, serve_backend, tmp_path: Path):  # noqa: ANN001, ANN201
    backend = GpioBackend(SimulatedChip(4, NAMES), control_path=str(tmp_path / "ctl.sock"))
    path = serve_backend(backend)
    try:
        with MockFrontend.connect(path, OPTS) as fe:
            yield backend, Driver(fe), str(tmp_path / "ctl.sock")
    finally:
        backend.close()


def control(path: str, *commands: str) -> list[str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        replies = []
        f = s.makefile("r")
        for c in commands:
            s.sendall(c.encode() + b"\n")
            reply = [f.readline().rstrip("\n")]
            while c == "list" and reply[-1] != "ok":
                reply.append(f.readline().rstrip("\n"))
            replies.append("\n".join(reply))
        return replies


def test_probe_names_output_input(gpio) -> None:  # noqa: ANN001
    backend, drv, ctl = gpio
    assert drv.fe.acked_features & p.F_IRQ
    assert drv.ngpio == 4 and drv.names_size == len(b"led\0button\0\0reset\0")
    status, names = drv.req(M.GET_NAMES, rxlen=1 + drv.names_size)
    assert status == p.Status.OK and names.split(b"\0")[:4] == [b"led", b"button", b"", b"reset"]
    # gpiochip_add_data reads every line's direction
    assert [drv.ok(M.GET_DIRECTION, i) for i in range(4)] == [D.NONE] * 4
    # direction_output(led, 1): SET_VALUE first, then SET_DIRECTION
    drv.ok(M.SET_VALUE, 0, 1)
    drv.ok(M.SET_DIRECTION, 0, D.OUT)
    assert drv.ok(M.GET_DIRECTION, 0) == D.OUT and drv.ok(M.GET_VALUE, 0) == 1
    assert control(ctl, "get led") == ["0 led dir=out value=1 irq=none"]  # the host sees it
    drv.ok(M.SET_VALUE, 0, 0)
    assert control(ctl, "get 0") == ["0 led dir=out value=0 irq=none"]
    # direction_input(button): the host drives it, the guest reads it
    drv.ok(M.SET_DIRECTION, 1, D.IN)
    assert drv.ok(M.GET_VALUE, 1) == 0
    assert control(ctl, "set button 1") == ["ok"]
    assert drv.ok(M.GET_VALUE, 1) == 1
    # driving an output changes nothing the guest reads
    assert control(ctl, "set led 1") == ["ok"] and drv.ok(M.GET_VALUE, 0) == 0
    listing = control(ctl, "list")[0].split("\n")
    assert listing[-1] == "ok" and listing[1] == "1 button dir=in value=1 irq=none" and len(listing) == 5
    assert control(ctl, "set nosuch 1", "set 1 7", "frobnicate")[0].startswith("error: no line")
    # free: SET_DIRECTION NONE
    drv.ok(M.SET_DIRECTION, 1, D.NONE)
    assert drv.ok(M.GET_DIRECTION, 1) == D.NONE
    assert backend.errors == 0


def test_edge_interrupts_are_delivered_and_latched(gpio) -> None:  # noqa: ANN001
    backend, drv, ctl = gpio
    drv.ok(M.SET_DIRECTION, 1, D.IN)
    # irq_bus_sync_unlock: IRQ_TYPE, then the buffer
    drv.ok(M.SET_IRQ_TYPE, 1, T.EDGE_RISING)
    token = drv.arm(1)
    control(ctl, "set 1 0")  # no edge: nothing
    assert drv.fe.reap(1) == []
    control(ctl, "set 1 1")  # rising edge
    assert drv.irq() == (token, p.IrqStatus.VALID)
    # a falling edge does not fire a rising-edge line; re-armed buffer waits
    token = drv.arm(1)
    control(ctl, "set 1 0")
    assert drv.fe.reap(1) == []
    # both edges; an edge while no buffer is queued is latched and delivered on arming
    drv.ok(M.SET_IRQ_TYPE, 1, T.EDGE_BOTH)
    control(ctl, "set 1 1")
    assert drv.irq() == (token, p.IrqStatus.VALID)
    control(ctl, "set 1 0")
    token = drv.arm(1)
    assert drv.irq() == (token, p.IrqStatus.VALID)
    # disabling the interrupt returns the queued buffer INVALID
    token = drv.arm(1)
    drv.ok(M.SET_IRQ_TYPE, 1, T.NONE)
    assert drv.irq() == (token, p.IrqStatus.INVALID)
    assert backend.interrupts == 3


def test_level_interrupts(gpio) -> None:  # noqa: ANN001
    backend, drv, ctl = gpio
    drv.ok(M.SET_DIRECTION, 3, D.IN)
    drv.ok(M.SET_IRQ_TYPE, 3, T.LEVEL_HIGH)
    token = drv.arm(3)
    assert drv.fe.reap(1) == []
    control(ctl, "set reset 1")
    assert drv.irq() == (token, p.IrqStatus.VALID)
    token = drv.arm(3)  # still high: fires again at once (handle_level_irq)
    assert drv.irq() == (token, p.IrqStatus.VALID)
    control(ctl, "set reset 0")
    drv.ok(M.SET_IRQ_TYPE, 3, T.LEVEL_LOW)
    token = drv.arm(3)
    assert drv.irq() == (token, p.IrqStatus.VALID)


def test_bad_requests_get_err(gpio) -> None:  # noqa: ANN001
    backend, drv, _ = gpio
    fe = drv.fe
    assert drv.req(M.GET_VALUE, 4)[0] == p.Status.ERR  # line out of range
    assert drv.req(M.GET_DIRECTION, 0xFFFF)[0] == p.Status.ERR
    assert drv.req(0x77, 0)[0] == p.Status.ERR  # unknown type
    assert drv.req(M.SET_DIRECTION, 0, 3)[0] == p.Status.ERR  # unknown direction
    assert drv.req(M.SET_VALUE, 0, 2)[0] == p.Status.ERR
    assert drv.req(M.SET_IRQ_TYPE, 0, 5)[0] == p.Status.ERR  # unknown interrupt type
    drv.ok(M.SET_DIRECTION, 2, D.OUT)
    assert drv.req(M.SET_IRQ_TYPE, 2, T.EDGE_BOTH)[0] == p.Status.ERR  # an output
    assert drv.req(M.GET_NAMES, rxlen=5)[0] == p.Status.ERR  # wrong response size
    assert drv.req(M.GET_VALUE, 0, rxlen=3)[0] == p.Status.ERR  # oversized response buffer
    short = fe.request(0, [p.REQUEST.pack(M.GET_VALUE, 0, 0)[:6]], [2])
    assert short.data[0] == p.Status.ERR and short.length == 2
    assert fe.request(0, [p.REQUEST.pack(M.GET_VALUE, 0, 0) + b"xx"], [2]).data[0] == p.Status.ERR
    assert fe.request(0, [p.REQUEST.pack(M.GET_VALUE, 0, 0)], []).length == 0  # no status byte
    # eventq: a line out of range, no interrupt enabled, a second buffer, a request-shaped buffer
    drv.arm(9)
    assert drv.irq()[1] == p.IrqStatus.INVALID
    drv.arm(1)
    assert drv.irq()[1] == p.IrqStatus.INVALID
    drv.ok(M.SET_DIRECTION, 1, D.IN)
    drv.ok(M.SET_IRQ_TYPE, 1, T.EDGE_RISING)
    first = drv.arm(1)
    drv.arm(1)
    assert drv.irq()[1] == p.IrqStatus.INVALID
    fe.add(1, [p.REQUEST.pack(M.GET_VALUE, 0, 0)], [2])
    fe.publish(1)
    assert drv.irq()[1] == p.IrqStatus.INVALID
    # the device still serves, and the first buffer still waits for its edge
    backend.drive(1, 1)
    assert drv.irq() == (first, p.IrqStatus.VALID)
    assert drv.ok(M.GET_VALUE, 1) == 1
    assert backend.errors == 16


def test_chip_without_names() -> None:
    backend = GpioBackend(SimulatedChip(2))
    assert p.CONFIG.unpack(backend.config_space) == (2, 0)
    with pytest.raises(ValueError):
        SimulatedChip(0)
    with pytest.raises(ValueError):
        SimulatedChip(2, ["a", "b", "c"])


def test_the_command(tmp_path: Path) -> None:
    sock, ctl = tmp_path / "gpio.sock", tmp_path / "ctl.sock"
    argv = ["gpio", "--socket-path", str(sock), "-l", "s3", "--names", "a,b,c", "--control", str(ctl)]
    with vhostuser_process(argv, stderr=subprocess.PIPE, text=True) as proc:
        wait_for_path(sock, proc)
        wait_for_path(ctl, proc)
        with MockFrontend.connect(str(sock), OPTS) as fe:
            drv = Driver(fe)
            assert drv.ngpio == 3
            drv.ok(M.SET_DIRECTION, 2, D.IN)
            assert control(str(ctl), "set c 1") == ["ok"]
            assert drv.ok(M.GET_VALUE, 2) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    bad = subprocess.run([*vhostuser_argv(), "gpio", "--socket-path", str(sock), "-l", "0"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "simulated" in bad.stderr


def vhostuser_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "vhostuser"]


def test_random_requests_never_break_the_queues(gpio) -> None:  # noqa: ANN001
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    backend, drv, _ = gpio

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rtype=st.integers(0, 8), line=st.integers(0, 6), value=st.integers(0, 9), rxlen=st.integers(1, 40))
    def random_request(rtype: int, line: int, value: int, rxlen: int) -> None:
        status, _ = drv.req(rtype, line, value, rxlen)
        assert status in (p.Status.OK, p.Status.ERR)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(readable=st.lists(st.binary(min_size=1, max_size=12), max_size=2),
           writable=st.lists(st.integers(1, 30), min_size=1, max_size=2))
    def random_chain(readable: list[bytes], writable: list[int]) -> None:
        assert drv.fe.request(0, readable, writable).length <= sum(writable)

    random_request()
    random_chain()
    # turn every interrupt off: buffers the random requests armed come back INVALID
    for line in range(4):
        drv.ok(M.SET_DIRECTION, line, D.IN)
        drv.ok(M.SET_IRQ_TYPE, line, T.NONE)
    drv.fe.reap(1)
    drv.ok(M.SET_VALUE, 0, 1)  # still serving
