"""The virtio-i2c back-end under real QEMU 7.2 (vhost-user-i2c-pci) with the
guest's own i2c-virtio driver, built out of tree from Debian's linux-source-6.1
(:mod:`vhostuser.testing.guest_modules`) and loaded with insmod.  busybox's
i2cdetect / i2cget / i2cset / i2ctransfer (through i2c-dev) find the two
simulated devices, read and write the EEPROM (the data lands in its host
file), read the temperature sensor, and fail cleanly at an absent address.
One boot.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostuser.daemon import VhostUserDaemon
from vhostuser.devices.i2c.bus import Eeprom, TemperatureSensor
from vhostuser.devices.i2c.device import I2cBackend
from vhostuser.testing.guest import VhostUserDevice, fetch_kernel, run_guest
from vhostuser.testing.guest_modules import build_module

pytestmark = pytest.mark.qemu

SCRIPT = r"""
set -e
insmod /i2c-virtio.ko
i=0
while [ ! -e /dev/i2c-0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "adapter $(cat /sys/bus/i2c/devices/i2c-0/name)"
i2cdetect -y 0 | tr -s ' ' | grep -o ' [0-9a-f][0-9a-f]' | tr -d ' ' | tr '\n' ' ' | sed 's/^/found /'; echo
echo "byte $(i2cget -y 0 0x50 0x10)"
i2cset -y 0 0x50 0x20 0xab
i2ctransfer -y 0 w6@0x50 0x80 0x68 0x65 0x6c 0x6c 0x6f
echo "block $(i2ctransfer -y 0 w1@0x50 0x80 r5)"
echo "temp $(i2ctransfer -y 0 w1@0x48 0x00 r2)"
if i2cget -y 0 0x33 0x00 2>/dev/null; then echo absent=ok; else echo absent=failed; fi
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vhu-i2c-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_guest_tools_use_the_eeprom_and_sensor(tmp_path: Path, short_dir: Path, no_fd_leak: None) -> None:
    module = build_module("i2c-virtio", fetch_kernel())
    rom = tmp_path / "eeprom.bin"
    rom.write_bytes(bytes(range(256)))
    backend = I2cBackend({0x50: Eeprom(str(rom)), 0x48: TemperatureSensor(21.5)})
    sock = short_dir / "i2c.sock"
    try:
        with VhostUserDaemon("i2c", backend) as daemon:
            daemon.start_server(str(sock))
            result = run_guest(SCRIPT, devices=[VhostUserDevice("i2c", sock)], modules=["i2c-dev"], timeout=240,
                               extra_files={"/i2c-virtio.ko": module})
    finally:
        backend.close()
    result.check()
    out = dict(line.split(" ", 1) for line in result.output.strip().split("\n") if " " in line)
    assert out["found"].split() == ["48", "50"], result.output
    assert out["byte"] == "0x10"
    assert out["block"] == "0x68 0x65 0x6c 0x6c 0x6f"
    assert out["temp"] == "0x15 0x80"
    assert "absent=failed" in result.output
    data = rom.read_bytes()
    assert data[0x20] == 0xAB and data[0x80:0x85] == b"hello"  # persisted in the host file
    assert data[0x10] == 0x10 and data[0x21] == 0x21
