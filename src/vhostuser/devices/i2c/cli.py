"""``vhostuser i2c``: the vhost-user-i2c command.

``-l/--device-list`` is rust-vmm vhost-device-i2c's: host adapters and the
addresses on them the guest may use, ``BUS:ADDR[:ADDR...][,BUS:ADDR...]`` in
decimal.  Simulated devices join the same bus with ``--eeprom`` and
``--temp-sensor``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = """virtio-i2c vhost-user back-end (device id 34): a virtual I2C bus.

QEMU side:
  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
  -chardev socket,id=i2c0,path=PATH -device vhost-user-i2c-pci,chardev=i2c0

Devices: simulated EEPROMs backed by files (--eeprom 0x50:eeprom.bin), LM75-style
temperature sensors (--temp-sensor 0x48:21.5), and addresses of host /dev/i2c-N
adapters (-l 1:32:21). See docs/devices/i2c.md."""

CAPABILITIES: dict[str, Any] = {"type": "i2c", "features": []}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    from ..common import add_backend_arguments

    add_backend_arguments(parser, socket_count=False)
    bus = parser.add_argument_group("bus")
    bus.add_argument("-l", "--device-list", metavar="BUS:ADDR[:ADDR],...",
                     help="host adapters /dev/i2c-BUS and the (decimal) addresses served from them")
    bus.add_argument("--eeprom", action="append", default=[], metavar="ADDR:FILE[:SIZE]",
                     help="a simulated EEPROM at ADDR kept in FILE (SIZE bytes, default: the file's size or 256)")
    bus.add_argument("--temp-sensor", action="append", default=[], metavar="ADDR[:CELSIUS]",
                     help="a simulated LM75-style temperature sensor at ADDR (default 25.0 degC)")


def _addr(text: str) -> int:
    value = int(text, 0)
    if not 0 < value < 0x78:
        raise ValueError(f"address {text} outside 0x01..0x77")
    return value


def build_targets(args: argparse.Namespace) -> dict[int, Any]:
    """The bus the options describe (raises ValueError / OSError; closes what it opened on error)."""
    from .bus import Eeprom, HostAdapter, TemperatureSensor, parse_device_list

    targets: dict[int, Any] = {}

    def place(addr: int, target: Any) -> None:
        if addr in targets:
            target.close()
            raise ValueError(f"two devices at address {addr:#04x}")
        targets[addr] = target

    try:
        for spec in args.eeprom:
            parts = spec.split(":")
            if len(parts) not in (2, 3) or not parts[1]:
                raise ValueError(f"--eeprom {spec!r}: ADDR:FILE[:SIZE]")
            addr = _addr(parts[0])
            place(addr, Eeprom(parts[1], size=int(parts[2], 0) if len(parts) == 3 else None))
        for spec in args.temp_sensor:
            addr_text, _, temp = spec.partition(":")
            place(_addr(addr_text), TemperatureSensor(float(temp) if temp else 25.0))
        if args.device_list:
            for bus, addrs in parse_device_list(args.device_list):
                adapter = HostAdapter(bus, addrs)
                for a in addrs:
                    place(a, adapter)
    except BaseException:
        for t in targets.values():
            t.close()
        raise
    if not targets:
        raise ValueError("the bus is empty: give --eeprom, --temp-sensor or -l")
    return targets


def run(args: argparse.Namespace) -> int:
    """Serve the bus until SIGTERM/SIGINT."""
    from ..common import print_capabilities, serve_backends
    from .device import I2cBackend

    if args.print_capabilities:
        print_capabilities(CAPABILITIES)
        return 0
    try:
        targets = build_targets(args)
    except (ValueError, OSError) as exc:
        print(f"vhostuser i2c: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1

    def make_backend(i: int) -> I2cBackend:
        del i
        return I2cBackend(targets)

    return serve_backends("i2c", args, make_backend, CAPABILITIES)
