"""``vhostuser input``: the virtio-input command."""
from __future__ import annotations

import argparse
from typing import Any

from ..common import add_backend_arguments, capabilities, serve_backends
from .device import InputBackend
from .sources import KINDS, EvdevInput, VirtualInput

#: ``--print-capabilities``
#: (the feature names of QEMU's vhost-user.json for "input": contrib/vhost-user-input's flags)
CAPABILITIES: dict[str, Any] = capabilities("input", ["evdev-path", "no-grab"])

DESCRIPTION = """virtio-input vhost-user back-end (device id 18).

Either a host evdev device passed through, or a built-in virtual keyboard,
mouse or tablet driven from a control socket:

  vhostuser input -s /tmp/in.sock --evdev-path /dev/input/event3
  vhostuser input -s /tmp/in.sock --virtual keyboard --control-socket /tmp/kbd.ctl
      echo 'type hello' | socat - UNIX-CONNECT:/tmp/kbd.ctl

Control socket (0600), one request line -> one reply line (OK ... / ERROR ...):
  type TEXT | key NAME | press NAME | release NAME | move DX DY | move X Y |
  click [left|right|middle] | button NAME down|up | wheel N | leds | help

QEMU: -chardev socket,id=in0,path=/tmp/in.sock -device vhost-user-input-pci,chardev=in0
(QEMU 7.2 requires KVM for vhost-user-input-pci)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vhostuser input`` options: the back-end conventions' flags plus the event source."""
    add_backend_arguments(parser, socket_count=False)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--evdev-path", "--evdev", dest="evdev", metavar="PATH",
                     help="pass this host evdev device through (/dev/input/eventN)")
    src.add_argument("--virtual", choices=KINDS, default=None,
                     help="a built-in virtual device driven from --control-socket (default: keyboard)")
    parser.add_argument("--no-grab", dest="grab", action="store_false",
                        help="with --evdev-path: leave the device to the host too (default: EVIOCGRAB it)")
    parser.add_argument("--control-socket", metavar="PATH", help="with --virtual: the control socket to create")
    parser.add_argument("--name", help="the device name the guest sees (virtual devices)")
    parser.add_argument("--serial", default="", help="the serial string the guest sees (virtual devices)")


def build_backend(args: argparse.Namespace) -> InputBackend:
    """The back-end the arguments describe (with its control socket, if any)."""
    if args.evdev:
        if args.control_socket:
            raise ValueError("--control-socket drives a --virtual device, not --evdev-path")
        return InputBackend(EvdevInput.open(args.evdev, grab=args.grab))
    source = VirtualInput(args.virtual or "keyboard", name=args.name, serial=args.serial)
    backend = InputBackend(source)
    if args.control_socket:
        from ..control_socket import attach_control_socket

        attach_control_socket(backend, args.control_socket, source.command, name="input-control")
    return backend


def run(args: argparse.Namespace) -> int:
    """Serve ``vhostuser input`` as parsed into ``args`` until SIGTERM/SIGINT; the exit status."""
    return serve_backends("input", args, lambda i: build_backend(args), CAPABILITIES)
