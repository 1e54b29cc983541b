"""The virtio-gpio back-end under real QEMU 7.2 (vhost-user-gpio-pci) with the
guest's own gpio-virtio driver, built out of tree from Debian's linux-source-6.1
against the guest kernel's headers (:mod:`vhostuser.testing.guest_modules`) and
loaded with insmod.  A static tool on the GPIO character device
(``tests/gpio_guest/gpio_tool.c``) reads the line names, reads an input the
host drives, waits for an edge, and sets an output: the host sees the output
and answers with an edge, which wakes the waiting guest reader.  One boot.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostuser.daemon import VhostUserDaemon
from vhostuser.devices.gpio.chip import SimulatedChip
from vhostuser.devices.gpio.device import GpioBackend
from vhostuser.devices.gpio.protocol import F_IRQ
from vhostuser.testing.guest import VhostUserDevice, build_static_program, fetch_kernel, run_guest
from vhostuser.testing.guest_modules import build_module

pytestmark = pytest.mark.qemu

TOOL = Path(__file__).parent / "gpio_guest" / "gpio_tool.c"

SCRIPT = r"""
set -e
insmod /gpio-virtio.ko
i=0
while [ ! -e /dev/gpiochip0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
/gpio_tool /dev/gpiochip0 info
echo "input $(/gpio_tool /dev/gpiochip0 get 2)"
echo "button-before $(/gpio_tool /dev/gpiochip0 get 1)"
/gpio_tool /dev/gpiochip0 out 0 1
# the host sees the LED and presses the button: wait for it
i=0
while [ "$(/gpio_tool /dev/gpiochip0 get 1)" != 1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "button-after $(/gpio_tool /dev/gpiochip0 get 1)"
echo "edge-request $(/gpio_tool /dev/gpiochip0 wait 1 1000 2>&1 | tail -n 1)"
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vhu-gpio-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_guest_driver_names_input_output_and_edge_interrupt(short_dir: Path, no_fd_leak: None) -> None:
    module = build_module("gpio-virtio", fetch_kernel())
    tool = build_static_program(TOOL, flags=("-O2", "-Wall"))
    backend = GpioBackend(SimulatedChip(4, ["led", "button", "switch", ""]))
    backend.drive(2, 1)  # the switch is on
    seen = threading.Event()
    stop = threading.Event()
    acked: list[int] = []

    def host() -> None:
        """Wait until the guest sets the LED, then press the button (a rising edge)."""
        while not stop.is_set():
            if backend.chip.lines[0].output == 1:
                acked.append(backend.acked)
                seen.set()
                backend.drive(1, 1)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=host)
    sock = short_dir / "gpio.sock"
    try:
        with VhostUserDaemon("gpio", backend) as daemon:
            daemon.start_server(str(sock))
            watcher.start()
            result = run_guest(SCRIPT, devices=[VhostUserDevice("gpio", sock)], timeout=240,
                               extra_files={"/gpio-virtio.ko": module, "/gpio_tool": tool})
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        backend.close()
    result.check()
    lines = result.output.strip().split("\n")
    assert lines[:4] == ["0 led", "1 button", "2 switch", "3 -"], result.output
    assert "input 1" in lines
    assert "button-before 0" in lines and "button-after 1" in lines, result.output
    assert seen.is_set()  # the host saw the guest's output
    # QEMU 7.2's vhost-user-gpio neither offers VIRTIO_GPIO_F_IRQ to the guest nor
    # passes it to the back-end, so the guest's chip has no interrupts: a request
    # for edge events fails (ENXIO from gpiod_to_irq).  The interrupt path is
    # tested with the library front-end (tests/test_gpio.py).
    assert acked and not acked[0] & F_IRQ
    assert lines[-1] == "edge-request GPIO_V2_GET_LINE_IOCTL: No such device or address", result.output
    assert backend.errors == 0
