"""The ``vhostuser`` command: bundled device back-ends and tools.

Each subcommand lives in its own module and registers itself in
:data:`SUBCOMMANDS`: a name mapped to ``(module, help)``.  The module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Sequence

from . import __version__

#: subcommand -> (module implementing it, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vhostuser.cli_info", "show the version and which implementations are live"),
    "demo": ("vhostuser.cli_demo", "run the rng back-end and drive it end to end, narrated"),
    "rng": ("vhostuser.devices.rng", "virtio-rng back-end (entropy for the guest)"),
    "check": ("vhostuser.cli_check", "run vhost-user conformance checks against any back-end"),
    "trace": ("vhostuser.cli_trace", "relay a vhost-user session, decoding (and checking) every message"),
    "vsock": ("vhostuser.devices.vsock.cli", "virtio-vsock back-end (hybrid vsock over AF_UNIX, sibling VMs)"),
    "blk": ("vhostuser.devices.blk", "virtio-blk back-end (file or block device)"),
    "console": ("vhostuser.devices.console", "virtio-console back-end (terminal, TCP or UNIX socket)"),
    "net": ("vhostuser.devices.net.cli", "virtio-net back-end (a learning switch between VMs, capture, impairments)"),
    "scsi": ("vhostuser.devices.scsi", "virtio-scsi back-end (LUNs on image files)"),
    "gpio": ("vhostuser.devices.gpio", "virtio-gpio back-end (simulated GPIO chip)"),
    "i2c": ("vhostuser.devices.i2c", "virtio-i2c back-end (simulated devices, host /dev/i2c-N)"),
    "sound": ("vhostuser.devices.sound", "virtio-sound back-end (null, WAV files, PulseAudio; runtime on/off per direction)"),
    "input": ("vhostuser.devices.input", "virtio-input back-end (host evdev device or virtual keyboard/mouse/tablet)"),
    "can": ("vhostuser.devices.can", "virtio-can back-end (virtual CAN bus between VMs, or host SocketCAN)"),
    "spi": ("vhostuser.devices.spi", "virtio-spi back-end (host spidev, simulated loopback and EEPROM)"),
    "scmi": ("vhostuser.devices.scmi", "virtio-scmi back-end (SCMI base and sensor protocols; fake, hwmon, IIO sensors)"),
}


_ROLE = re.compile(r":(?:[\w-]+:)?[\w-]+:`~?([^`]+)`")


def plain_text(doc: str) -> str:
    """A reST docstring as ``--help`` should show it: ``code`` and :role:`x`
    markup dropped, a paragraph's closing ``::`` turned into ``:``."""
    text = _ROLE.sub(r"\1", doc)
    text = text.replace("``", "")
    return re.sub(r"(\S)::$", r"\1:", text, flags=re.M)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhostuser",
        description="vhost-user device back-ends and tools written with the vhostuser library.",
    )
    parser.add_argument("--version", action="version", version=f"vhostuser {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (modname, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(modname)
        p = sub.add_parser(name, help=help_text, description=plain_text(getattr(module, "DESCRIPTION", help_text)),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """``vhostuser COMMAND ...``: parse ``argv`` (default ``sys.argv[1:]``), run the
    subcommand, return its exit status (130 on Ctrl-C).  A reader that goes away
    (``vhostuser info | head``) ends the command quietly, as for any Unix filter."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        status = int(args._run(args) or 0)
        sys.stdout.flush()  # inside the try: a reader gone shows here, not at interpreter exit
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_gone()


def _stdout_gone() -> int:
    # Python flushes stdout again at exit, which would raise once more: point it at
    # /dev/null first.  141 = 128 + SIGPIPE, what a shell reports for a killed filter.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141


def _device_command(name: str) -> int:
    """``vhost-user-NAME ...`` is ``vhostuser NAME ...`` (the binary named in the
    device's vhost-user discovery JSON)."""
    return main([name, *sys.argv[1:]])


def rng_main() -> int:
    return _device_command("rng")


def blk_main() -> int:
    return _device_command("blk")


def vsock_main() -> int:
    return _device_command("vsock")


def console_main() -> int:
    return _device_command("console")


def scsi_main() -> int:
    return _device_command("scsi")


def gpio_main() -> int:
    return _device_command("gpio")


def i2c_main() -> int:
    return _device_command("i2c")


def can_main() -> int:
    return _device_command("can")


def spi_main() -> int:
    return _device_command("spi")


def scmi_main() -> int:
    return _device_command("scmi")


def input_main() -> int:
    return _device_command("input")


def sound_main() -> int:
    return _device_command("sound")


def net_main() -> int:
    return _device_command("net")


if __name__ == "__main__":
    sys.exit(main())
