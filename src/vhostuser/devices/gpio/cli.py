"""``vhostuser gpio``: the vhost-user-gpio command.

``-l/--device-list`` takes rust-vmm vhost-device-gpio's syntax, one entry per
socket separated by ``:``; here an entry ``sN`` is a simulated chip with N
lines (host gpiochips by number are not supported yet).  ``--lines N`` is the
same as ``-l sN`` for one socket.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = """virtio-gpio vhost-user back-end (device id 41): a simulated GPIO chip.

QEMU side:
  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
  -chardev socket,id=gpio0,path=PATH -device vhost-user-gpio-pci,chardev=gpio0

The host drives inputs and watches outputs on --control PATH ('set LINE 0|1',
'get LINE', 'list'); edges and levels raise the guest's interrupts.
See docs/devices/gpio.md."""

CAPABILITIES: dict[str, Any] = {"type": "gpio", "features": []}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    from ..common import add_backend_arguments

    add_backend_arguments(parser)
    chip = parser.add_argument_group("chip")
    chip.add_argument("-l", "--device-list", metavar="sN[:sN...]",
                      help="one chip per socket (vhost-device-gpio syntax): sN = simulated, N lines")
    chip.add_argument("--lines", type=int, metavar="N", help="one simulated chip with N lines (default: 8)")
    chip.add_argument("--names", default="", metavar="A,B,...", help="line names (comma-separated, in order)")
    chip.add_argument("--control", metavar="PATH",
                      help="control socket of the simulated chip(s) (PATH0.. with several sockets)")


def parse_device_list(text: str) -> list[int]:
    """``s8:s4`` -> [8, 4] (lines per simulated chip)."""
    counts = []
    for entry in text.split(":"):
        if not (entry.startswith("s") and entry[1:].isdigit()):
            raise ValueError(f"device-list entry {entry!r}: only simulated chips 'sN' are supported")
        counts.append(int(entry[1:]))
    return counts


def run(args: argparse.Namespace) -> int:
    """Serve the chip(s) until SIGTERM/SIGINT."""
    from ..common import print_capabilities, serve_backends, socket_paths
    from .chip import SimulatedChip
    from .device import GpioBackend

    if args.print_capabilities:
        print_capabilities(CAPABILITIES)
        return 0
    try:
        if args.device_list and args.lines is not None:
            raise ValueError("give --device-list or --lines, not both")
        counts = parse_device_list(args.device_list) if args.device_list else [args.lines or 8]
        if len(counts) != args.socket_count:
            if args.device_list:
                raise ValueError(f"--device-list has {len(counts)} entries for {args.socket_count} sockets")
            counts *= args.socket_count
        names = [n for n in args.names.split(",")] if args.names else []
        chips = [SimulatedChip(n, names[:n]) for n in counts]
    except ValueError as exc:
        print(f"vhostuser gpio: {exc}", file=sys.stderr)
        return 2
    controls = socket_paths(args.control, len(chips)) if args.control else [None] * len(chips)

    def make_backend(i: int) -> GpioBackend:
        return GpioBackend(chips[i], control_path=controls[i])

    return serve_backends("gpio", args, make_backend, CAPABILITIES)
