"""What every bundled device command shares: QEMU's "Backend program conventions".

* ``--socket-path PATH`` (server mode: we listen, QEMU connects) or
  ``--fd N`` (an inherited listening or connected socket);
* ``--socket-count N`` serves N front-ends on ``PATH0`` .. ``PATH{N-1}``
  (with N = 1 the path is used as given);
* ``--print-capabilities`` prints the JSON the vhost-user spec defines and exits;
* SIGTERM and SIGINT end the program cleanly; it serves again after every
  front-end disconnect until then.

:func:`serve_backends` does all of it for a command with one kind of back-end
per socket; a command that builds its back-ends itself (vsock: one per VM,
sharing a sibling registry) calls :func:`serve_daemons` with them.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..backend import VhostUserBackend
from ..daemon import VhostUserDaemon

log = logging.getLogger(__name__)


def add_backend_arguments(parser: argparse.ArgumentParser, *, socket_count: bool = True) -> None:
    """The options every device command has."""
    where = parser.add_argument_group("vhost-user socket")
    where.add_argument("-s", "--socket-path", metavar="PATH",
                       help="listen on this UNIX socket; the front-end (QEMU -chardev socket,path=PATH) connects")
    where.add_argument("--fd", type=int, metavar="N",
                       help="serve the already-open socket N (listening or connected) instead of --socket-path")
    if socket_count:
        where.add_argument("-c", "--socket-count", type=int, default=1, metavar="N",
                           help="serve N front-ends on PATH0..PATH{N-1} (default: 1, on PATH itself)")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the back-end's capabilities as JSON (vhost-user spec) and exit")


def capabilities(device_type: str, features: Sequence[str] = ()) -> dict[str, Any]:
    """The ``--print-capabilities`` document."""
    return {"type": device_type, "features": list(features)}


def socket_paths(path: str, count: int) -> list[str]:
    """The socket paths for ``--socket-count``."""
    if count < 1:
        raise ValueError("--socket-count must be at least 1")
    return [path] if count == 1 else [f"{path}{i}" for i in range(count)]


def serve_backends(name: str, args: argparse.Namespace, make_backend: Callable[[int], VhostUserBackend],
                   caps: dict[str, Any]) -> int:
    """Run the command: print capabilities, or serve ``make_backend(i)`` on each socket
    until SIGTERM / SIGINT."""
    if args.print_capabilities:
        print_capabilities(caps)
        return 0
    if (args.socket_path is None) == (args.fd is None):
        print(f"vhostuser {name}: give exactly one of --socket-path or --fd", file=sys.stderr)
        return 2
    count = getattr(args, "socket_count", 1)
    if args.fd is not None and count != 1:
        print(f"vhostuser {name}: --socket-count needs --socket-path", file=sys.stderr)
        return 2
    where: list[str | int] = [args.fd] if args.fd is not None else list(socket_paths(args.socket_path, count))
    served: list[tuple[str, VhostUserBackend, str | int]] = []
    try:
        for i, target in enumerate(where):
            served.append((f"{name}{i}" if len(where) > 1 else name, make_backend(i), target))
    except (OSError, ValueError) as exc:
        print(f"vhostuser {name}: {exc}", file=sys.stderr)
        _close_backends(b for _, b, _ in served)
        return 1
    return serve_daemons(name, served)


def print_capabilities(caps: dict[str, Any]) -> None:
    """Write the ``--print-capabilities`` document to stdout."""
    json.dump(caps, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _close_backends(backends: Iterable[VhostUserBackend]) -> None:
    for backend in backends:
        close = getattr(backend, "close", None)
        if callable(close):
            close()


def serve_daemons(name: str, served: Sequence[tuple[str, VhostUserBackend, str | int]]) -> int:
    """Serve each ``(daemon name, backend, socket path or inherited fd)`` with its
    own :class:`VhostUserDaemon` until SIGTERM / SIGINT (or every daemon ended);
    then close the backends that have ``close()``.  Returns 0, or 1 (message on
    stderr) if a daemon could not start.  A device command with several
    back-ends of its own (e.g. one per VM) calls this directly."""
    daemons: list[VhostUserDaemon] = []

    def shutdown() -> None:
        for d in daemons:
            d.request_shutdown()
        for d in daemons:
            d.wait()
        _close_backends(b for _, b, _ in served)

    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        del frame
        log.info("%s: signal %d, shutting down", name, signum)
        stopping.append(signum)
        for d in daemons:
            d.request_shutdown()

    # handlers first: a front-end may connect (and a signal arrive) as soon as a socket exists
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for daemon_name, backend, target in served:
            daemon = VhostUserDaemon(daemon_name, backend)
            daemons.append(daemon)
            if isinstance(target, int):
                daemon.start_fd(target)
            else:
                daemon.start_server(target)
                log.info("%s: serving on %s", daemon_name, target)
    except (OSError, ValueError) as exc:
        print(f"vhostuser {name}: {exc}", file=sys.stderr)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        shutdown()
        return 1

    if stopping:  # a signal came while the daemons started: stop the late ones too
        for d in daemons:
            d.request_shutdown()
    try:
        while any(d.running for d in daemons):
            for d in daemons:
                d.wait(0.2)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        shutdown()
    return 0
