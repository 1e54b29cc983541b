"""``vhostuser console``: the virtio-console command (flags as rust-vmm's
vhost-device-console, plus ``--backend unix`` and MULTIPORT options)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ...errors import ConsoleConfigError
from ..common import add_backend_arguments, capabilities, serve_backends, socket_paths
from .device import ConsoleBackend
from .host import HostEndpoint, StdioHost, tcp_listener, unix_listener

log = logging.getLogger(__name__)

DEFAULT_TCP_PORT = 12345
DEFAULT_QUEUE_SIZE = 1024
#: ``--print-capabilities``
CAPABILITIES: dict[str, Any] = capabilities("console")

DESCRIPTION = """virtio-console vhost-user back-end (device id 3).

The guest's console (hvc0 in a Linux guest) on this terminal, a local TCP port
or a UNIX socket:

  vhostuser console -s /tmp/con.sock                                # --backend nested
  vhostuser console -s /tmp/con.sock -b network -p 12345            # nc 127.0.0.1 12345
  vhostuser console -s /tmp/con.sock -b unix --uds-path /tmp/con.uds --max-ports 3

QEMU 7.2 has no vhost-user console front-end. QEMU 10.2+:
  -chardev socket,id=con0,path=/tmp/con.sock
  -device vhost-user-test-device-pci,chardev=con0,virtio-id=3,num_vqs=N,config_size=12
  (N = 2 for one port without --multiport, else 2 * (max-ports + 1))

Nested backend: the terminal is in raw mode (Ctrl-C goes to the guest); the
escape character (default Ctrl-]) ends the program."""


def _escape(text: str) -> int | None:
    if text.lower() in ("none", "off", ""):
        return None
    if len(text) == 2 and text[0] == "^":
        return ord(text[1].upper()) ^ 0x40
    if len(text) == 1:
        return ord(text)
    raise argparse.ArgumentTypeError(f"escape character {text!r}: give one character, ^X or none")


def _size(text: str) -> tuple[int, int]:
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected COLSxROWS, e.g. 80x25") from None
    if not (0 < cols <= 0xFFFF and 0 < rows <= 0xFFFF):
        raise argparse.ArgumentTypeError(f"size {text!r} out of range")
    return cols, rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    add_backend_arguments(parser)
    host = parser.add_argument_group("host side")
    host.add_argument("-b", "--backend", choices=("nested", "network", "unix"), default="nested",
                      help="nested: this terminal (one socket only); network: TCP on 127.0.0.1; "
                           "unix: an AF_UNIX socket at --uds-path (default: nested)")
    host.add_argument("-p", "--tcp-port", type=int, default=DEFAULT_TCP_PORT, metavar="PORT",
                      help="network: first TCP port; socket i, console port j use PORT + i*max_ports + j "
                           f"(default {DEFAULT_TCP_PORT}; 0: any free port, logged)")
    host.add_argument("--uds-path", metavar="PATH",
                      help="unix: the socket path (suffixed 0..N-1 with --socket-count N; "
                           "console port j > 0 gets PATH.j)")
    host.add_argument("--no-raw", action="store_true", help="nested: leave the terminal mode alone")
    host.add_argument("--escape", type=_escape, default=0x1D, metavar="CHAR",
                      help="nested: the character that ends the program (^X, a character, or none; default ^])")
    dev = parser.add_argument_group("device")
    dev.add_argument("-q", "--max-queue-size", type=int, default=DEFAULT_QUEUE_SIZE, metavar="SIZE",
                     help=f"largest virtqueue size accepted (power of two, default {DEFAULT_QUEUE_SIZE})")
    dev.add_argument("--max-ports", type=int, default=1, metavar="N",
                     help="console ports per device; N > 1 offers VIRTIO_CONSOLE_F_MULTIPORT (default 1)")
    dev.add_argument("--multiport", action="store_true",
                     help="offer MULTIPORT (control queues) even with one port, as vhost-device-console does")
    dev.add_argument("--port-name", action="append", default=[], metavar="[N=]NAME",
                     help="PORT_NAME of port N (default: the next port from 1); repeatable")
    dev.add_argument("--size", type=_size, metavar="COLSxROWS",
                     help="offer VIRTIO_CONSOLE_F_SIZE with this size (nested on a tty: the terminal's size)")


def _port_names(specs: Sequence[str], max_ports: int) -> list[str | None]:
    names: list[str | None] = [None] * max_ports
    nxt = 1
    for spec in specs:
        key, sep, value = spec.partition("=")
        if sep and key.strip().isdigit():
            index, name = int(key), value
        else:
            index, name = nxt, spec
        if not 0 <= index < max_ports:
            raise ConsoleConfigError(f"--port-name {spec!r}: no port {index} (--max-ports {max_ports})")
        if not name or len(name.encode()) > 4000:
            raise ConsoleConfigError(f"--port-name {spec!r}: the name must have 1..4000 bytes")
        names[index] = name
        nxt = index + 1
    return names


def build_backends(args: argparse.Namespace) -> list[ConsoleBackend]:
    """One :class:`ConsoleBackend` per socket, host sides bound (raises
    :class:`~vhostuser.errors.ConsoleConfigError`; nothing is left open then)."""
    count = getattr(args, "socket_count", 1)
    if count < 1:
        raise ConsoleConfigError("--socket-count must be at least 1")
    ports = args.max_ports
    if ports < 1:
        raise ConsoleConfigError("--max-ports must be at least 1")
    names = _port_names(args.port_name, ports)
    multiport = args.multiport or ports > 1
    if args.backend == "nested" and (count != 1 or ports != 1):
        raise ConsoleConfigError("the nested backend serves one guest with one port "
                                 "(use --backend network or unix for --socket-count/--max-ports > 1)")
    if args.backend == "unix" and not args.uds_path:
        raise ConsoleConfigError("--backend unix needs --uds-path")
    if args.backend == "network" and not (0 <= args.tcp_port and args.tcp_port + count * ports - 1 <= 65535):
        raise ConsoleConfigError(f"--tcp-port {args.tcp_port}: the ports do not fit below 65536")
    if args.backend != "nested" and (args.no_raw or args.escape != 0x1D):
        log.warning("--no-raw and --escape apply to the nested backend only")
    backends: list[ConsoleBackend] = []
    hosts: list[HostEndpoint] = []
    try:
        for i in range(count):
            hosts = []
            size = args.size
            if args.backend == "nested":
                escape = args.escape
                hosts.append(StdioHost(0, 1, raw=not args.no_raw, escape=escape,
                                       on_escape=lambda: os.kill(os.getpid(), signal.SIGTERM)))
                if size is None and os.isatty(1):
                    with contextlib.suppress(OSError):
                        size = tuple(os.get_terminal_size(1))
            elif args.backend == "network":
                for j in range(ports):
                    hosts.append(tcp_listener(args.tcp_port + i * ports + j if args.tcp_port else 0))
            else:
                base = socket_paths(args.uds_path, count)[i]
                for j in range(ports):
                    hosts.append(unix_listener(base if j == 0 else f"{base}.{j}"))
            backends.append(ConsoleBackend(hosts, multiport=multiport, names=names, size=size,
                                           max_queue_size=args.max_queue_size))
            hosts = []
    except BaseException:
        for h in hosts:
            h.close()
        for b in backends:
            b.close()
        raise
    return backends


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT (or the escape character in nested mode)."""
    if args.print_capabilities or (args.socket_path is None) == (args.fd is None):
        return serve_backends("console", args, lambda i: None, CAPABILITIES)  # type: ignore[arg-type,return-value]
    try:
        backends = build_backends(args)
    except (ConsoleConfigError, OSError) as exc:
        print(f"vhostuser console: {exc}", file=sys.stderr)
        return 1
    for i, b in enumerate(backends):
        for port in b.ports:
            print(f"vhostuser console: socket {i} port {port.index}: {port.host.describe()}", file=sys.stderr)
    old_winch = None
    if args.backend == "nested":
        if os.isatty(0) and args.escape is not None:
            print(f"vhostuser console: escape character is ^{chr(args.escape ^ 0x40)}", file=sys.stderr)
        if backends[0].size is not None and os.isatty(1) and hasattr(signal, "SIGWINCH"):
            def winch(signum: int, frame: object) -> None:
                del signum, frame
                with contextlib.suppress(OSError):
                    backends[0].set_size(*os.get_terminal_size(1))
            old_winch = signal.signal(signal.SIGWINCH, winch)
    try:
        return serve_backends("console", args, lambda i: backends[i], CAPABILITIES)
    finally:
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        for b in backends:
            b.close()
