"""``vhostuser trace``: relay a vhost-user session and decode (and judge) every message."""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import TextIO


DESCRIPTION = """Relay vhost-user sessions between a front-end and a back-end, decoding every message.

The front-end connects to --listen; for each connection the tracer connects to
the back-end at --connect (or one started with --exec, {socket} replaced by a
fresh socket path).  Every message and fd is passed through unchanged and printed:
direction, request, flags, payload fields, fd kinds (memfd:size, eventfd, socket),
the reply matched to its request, the back-end channel (SET_BACKEND_REQ_FD) too.
A summary follows each session.  --json prints JSON Lines (fields documented in
docs/tools/trace.md); --check adds spec findings (exit status 1 if any error);
--rings adds what each kick and call moved on the rings (blk: type, sector,
length, status; net: frames; vsock: op, ports; others: buffer lengths).

  vhostuser trace --listen /tmp/front.sock --connect /tmp/back.sock
  vhostuser trace --listen /tmp/front.sock --exec "vhostuser rng --socket-path {socket}" --check
  qemu-system-x86_64 ... -chardev socket,id=c0,path=/tmp/front.sock -device vhost-user-rng-pci,chardev=c0"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-l", "--listen", required=True, metavar="PATH",
                        help="socket the front-end connects to (created; removed at exit)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--connect", metavar="PATH", help="the back-end's listening socket")
    where.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                       help="start this back-end ({socket} is replaced by its socket path); stopped at exit")
    parser.add_argument("--json", action="store_true", help="JSON Lines, one object per event")
    parser.add_argument("--check", action="store_true", help="check both sides against the spec")
    parser.add_argument("--rings", action="store_true",
                        help="interpose the kick/call fds and report what each kick and call moved on the "
                             "rings (split rings; requests decoded per --device)")
    parser.add_argument("--device", choices=["blk", "net", "rng", "vsock", "console", "scsi"],
                        help="device type, to name device feature bits")
    parser.add_argument("--sessions", type=int, metavar="N", help="exit after N sessions ended")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the trace here instead of stdout")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for the back-end socket (default 10)")


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
    else:
        with open(path, "w", encoding="utf-8") as f:
            yield f


def run(args: argparse.Namespace) -> int:
    from .testing.checker import BackendProcess
    from .trace import JsonWriter, TextWriter, TraceOptions, TraceProxy

    tmpdir = None
    proc = None
    try:
        if args.exec_cmd:
            tmpdir = tempfile.mkdtemp(prefix="vhu-trace-")
            backend = os.path.join(tmpdir, "backend.sock")
            try:
                proc = BackendProcess(args.exec_cmd, backend, args.timeout)
                proc.start()
            except (OSError, RuntimeError) as exc:
                print(f"vhostuser trace: {exc}", file=sys.stderr)
                return 2
        else:
            backend = args.connect
        with _output(args.output) as out:
            sink = JsonWriter(out) if args.json else TextWriter(out)
            options = TraceOptions(check=args.check, device=args.device, connect_timeout=args.timeout,
                                   max_sessions=args.sessions, rings=args.rings)
            try:
                proxy = TraceProxy(args.listen, backend, sink, options)
            except OSError as exc:
                print(f"vhostuser trace: cannot listen on {args.listen}: {exc}", file=sys.stderr)
                return 2
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, lambda *_: proxy.stop())
            try:
                proxy.start()
                while not proxy.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
            finally:
                proxy.stop()
        return 1 if args.check and proxy.error_findings else 0
    finally:
        if proc is not None:
            proc.stop()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
