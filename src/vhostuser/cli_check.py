"""``vhostuser check``: run the conformance checker against a vhost-user back-end."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

log = logging.getLogger(__name__)

DESCRIPTION = """Run vhost-user protocol conformance checks against any back-end.

Connect to a back-end already listening at --socket-path, or start one with
--exec (its command line, with {socket} replaced by a fresh socket path; the
process is killed at the end; if it exits during the run, that is reported and
the remaining checks are not run).  Prints one line per check and a summary; the
exit status is 0 if and only if every required check passed and at least one
check passed (1 otherwise, 2 for a usage error or a back-end that did not start).

  vhostuser check --socket-path /tmp/vhost.sock
  vhostuser check --device rng --exec "vhostuser rng --socket-path {socket}"
  vhostuser check --device blk --exec "qemu-storage-daemon --blockdev driver=file,node-name=f,filename=disk.img \\
      --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket},writable=on"

  vhostuser check --frontend --device rng --exec "qemu-system-x86_64 ... \\
      -chardev socket,id=c0,path={socket} -device vhost-user-rng-pci,chardev=c0"

With --frontend the roles turn: a back-end of --device type (rng, blk, vsock, net) is
served behind a checking tracer and the front-end started by --exec is judged
(order, negotiation, memory table, rings, GET_VRING_BASE before reuse, surviving
a back-end that closes mid-session, reconnecting).  See docs/tools/trace.md.

Checks: handshake, features, reply-ack, rings, vring-base, reconnect, memory-table,
malformed-* (bad requests must be nacked or the connection dropped, and the
back-end must accept a new connection afterwards), device-<class> (--device)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-s", "--socket-path", metavar="PATH", help="the back-end's listening socket")
    where.add_argument("--exec", dest="exec_cmd", metavar="CMD",
                       help="start this back-end command ({socket} is replaced by the socket path)")
    parser.add_argument("--frontend", action="store_true",
                        help="judge a FRONT-END instead: serve a --device back-end, start the front-end with --exec "
                             "({socket} is where it must connect), report what it does against the spec")
    parser.add_argument("--no-backend-close", dest="backend_close", action="store_false",
                        help="--frontend: do not close the session mid-way (reconnect check)")
    parser.add_argument("--nack", metavar="REQ[,REQ]", default="SET_MEM_TABLE,ADD_MEM_REG",
                        help="--frontend: start the front-end a second time and answer the first acknowledged "
                             "REQ with a failure (default: the memory table); 'none' skips this run")
    parser.add_argument("--device", choices=["rng", "blk", "echo", "vsock", "net"],
                        help="also check device-class behaviour (requests are answered correctly)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="seconds to wait for any reply or used buffer (default 5)")
    parser.add_argument("--only", metavar="NAMES",
                        help="comma-separated check names to run (the handshake's facts are gathered anyway)")
    parser.add_argument("--restart-per-check", action="store_true",
                        help="with --exec: a fresh back-end process for every check (for back-ends that serve "
                             "one session and exit)")
    parser.add_argument("--packed", action="store_true", help="use packed rings (the back-end must offer them)")


def run_frontend(args: argparse.Namespace) -> int:
    """``--frontend``: serve a back-end, start the front-end, judge it."""
    from .testing.checker import format_report, format_result, results_json
    from .trace.frontend_check import FRONTEND_DEVICES, check_frontend

    if not args.exec_cmd or args.device not in FRONTEND_DEVICES:
        print(f"vhostuser check --frontend needs --exec CMD and --device {'|'.join(FRONTEND_DEVICES)}",
              file=sys.stderr)
        return 2

    def launch(socket_path: str) -> subprocess.Popen[bytes]:
        argv = [a.replace("{socket}", socket_path) for a in shlex.split(args.exec_cmd)]
        log.info("starting the front-end %s", argv)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    results = check_frontend(args.device, launch, timeout=max(args.timeout, 60.0),
                             backend_close=args.backend_close,
                             nack=() if args.nack.lower() == "none" else tuple(args.nack.upper().split(",")))
    if args.json:
        json.dump(results_json(results), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in results:
            print(format_result(r))
        print(format_report(results).splitlines()[-1])
    return 0 if all(r.ok for r in results) else 1


def run(args: argparse.Namespace) -> int:
    if args.frontend:
        return run_frontend(args)
    from .testing.device_profiles import PROFILES
    if args.device is not None and args.device not in PROFILES:
        print(f"vhostuser check: no device-class checks for {args.device!r} back-ends yet "
              f"({', '.join(sorted(PROFILES))}); --device {args.device} is for --frontend", file=sys.stderr)
        return 2
    from .testing.checker import BackendProcess, conforms, format_report, format_result, results_json, run_checks
    from .testing.frontend import FrontendOptions

    only = [n.strip() for n in args.only.split(",")] if args.only else None
    if args.restart_per_check and not args.exec_cmd:
        print("vhostuser check: --restart-per-check needs --exec", file=sys.stderr)
        return 2
    options = FrontendOptions(queue_size=64, memory=((0, 2 << 20), (4 << 20, 2 << 20)), data_size=128 << 10,
                              timeout=args.timeout, reply_timeout=args.timeout, packed=True if args.packed else False)
    backend = None
    tmpdir = None
    try:
        if args.exec_cmd:
            tmpdir = tempfile.mkdtemp(prefix="vhu-check-")
            socket_path = os.path.join(tmpdir, "backend.sock")
            backend = BackendProcess(args.exec_cmd, socket_path, max(args.timeout, 10.0))
            if not args.restart_per_check:
                try:
                    backend.start()
                except (OSError, RuntimeError) as exc:
                    print(f"vhostuser check: {exc}", file=sys.stderr)
                    return 2
        else:
            socket_path = args.socket_path
        progress = None if args.json else (lambda r: print(format_result(r), flush=True))
        try:
            results = run_checks(socket_path, device=args.device, options=options, timeout=args.timeout,
                                 only=only, progress=progress, backend=backend,
                                 restart_each=args.restart_per_check)
        except ValueError as exc:
            print(f"vhostuser check: {exc}", file=sys.stderr)
            return 2
    finally:
        if backend is not None:
            backend.stop()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    if args.json:
        json.dump(results_json(results), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(results).splitlines()[-1])
    return 0 if conforms(results) else 1
