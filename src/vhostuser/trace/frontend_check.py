"""``vhostuser check --frontend``: judge a front-end against the spec.

A back-end of the chosen device type (one of ours, in this process) serves behind
a checking :class:`~.proxy.TraceProxy`; the front-end under test is started by a
*launcher* with the proxy's socket path.  Once it has started a ring, the back-end
closes the session (as a crashing back-end would) and we watch whether the
front-end survives and reconnects.  Each aspect becomes a
:class:`~vhostuser.testing.checker.CheckResult` (same report as ``vhostuser check``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from ..backend import VhostUserBackend
from ..daemon import VhostUserDaemon
from ..testing.checker import CheckResult
from .events import TraceEvent
from .proxy import TraceOptions, TraceProxy
from .rules import Finding
from .session import SessionState

__all__ = ["Launched", "FRONTEND_DEVICES", "check_frontend", "make_backend"]

log = logging.getLogger(__name__)

#: device types ``check --frontend`` can serve
FRONTEND_DEVICES = ("rng", "blk", "vsock")

#: result name -> the rules whose findings fail it
_GROUPS: dict[str, tuple[str, ...]] = {
    "order": ("owner-first", "rings-before-memory", "vring-enable-without-protocol-features"),
    "negotiation": ("features-offered", "protocol-features-bit", "feature-gated", "need-reply-without-reply-ack"),
    "memory-table": ("memory-table", "ring-outside-memory"),
    "rings": ("ring-size", "vring-index"),
    "get-vring-base-before-reuse": ("reuse-before-get-base",),
    "messages": ("decode", "request-while-waiting"),
}


class Launched(Protocol):
    """A running front-end (``subprocess.Popen`` fits)."""

    def poll(self) -> int | None:
        """The exit status if the front-end has exited, else None."""

    def kill(self) -> None:
        """Kill the front-end."""

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the front-end to exit (up to ``timeout`` s); its exit status."""


@contextlib.contextmanager
def make_backend(device: str, workdir: str) -> Iterator[VhostUserBackend]:
    """One of our back-ends of ``device`` type, closed at the end."""
    backend: VhostUserBackend
    if device == "rng":
        from ..devices.rng import RngBackend
        backend = RngBackend()
    elif device == "blk":
        from ..devices.blk.device import BlkBackend
        image = os.path.join(workdir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        backend = BlkBackend(image)
    elif device == "vsock":
        from ..devices.vsock.device import VsockBackend
        from ..devices.vsock.engine import VsockEngineConfig
        backend = VsockBackend(VsockEngineConfig(guest_cid=3, uds_path=os.path.join(workdir, "vsock.uds")))
    else:
        raise ValueError(f"check --frontend cannot serve a {device!r} device (one of {', '.join(FRONTEND_DEVICES)})")
    try:
        yield backend
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()


def _wait(cond: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or not alive():
            return cond()
        time.sleep(0.05)  # another process's progress: nothing to block on
    return True


def check_frontend(device: str, launch: Callable[[str], Launched], *, timeout: float = 60.0,
                   backend_close: bool = True, reconnect_timeout: float = 10.0,
                   sink: Callable[[TraceEvent], None] | None = None) -> list[CheckResult]:
    """Serve a ``device`` back-end to the front-end ``launch(socket_path)`` starts, and judge it."""
    events: list[TraceEvent] = []

    def record(ev: TraceEvent) -> None:
        events.append(ev)
        if sink is not None:
            sink(ev)

    workdir = tempfile.mkdtemp(prefix="vhu-fecheck-")
    results: list[CheckResult] = []
    proc: Launched | None = None
    try:
        with make_backend(device, workdir) as backend, VhostUserDaemon(device, backend) as daemon:
            back = os.path.join(workdir, "backend.sock")
            daemon.start_server(back)
            proxy = TraceProxy(os.path.join(workdir, "frontend.sock"), back, record,
                               TraceOptions(check=True, device=device))
            proxy.start()
            try:
                proc = launch(proxy.listen_path)
                alive = lambda: proc is not None and proc.poll() is None  # noqa: E731
                started = _wait(lambda: _ring_started(proxy.sessions, 0), timeout, alive)
                dropped_alive = reconnected = None
                if started and backend_close:
                    time.sleep(0.5)  # let the front-end settle into the running state
                    n = len(proxy.sessions)
                    proxy.drop_sessions()
                    reconnected = _wait(lambda: _ring_started(proxy.sessions, n), reconnect_timeout, alive)
                    dropped_alive = alive() or (proc.poll() == 0)
                if alive():
                    _wait(lambda: False, timeout if not started else 5.0, alive)
            finally:
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proxy.stop()
            results = _judge(proxy.sessions, proxy.findings, started, backend_close, dropped_alive, reconnected)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _ring_started(sessions: list[SessionState], first: int) -> bool:
    return any(s.first_ring_start is not None for s in sessions[first:])


def _judge(sessions: list[SessionState], findings: list[Finding], started: bool, backend_close: bool,
           dropped_alive: bool | None, reconnected: bool | None) -> list[CheckResult]:
    out = [CheckResult("connects", "pass" if sessions else "fail", True,
                       f"{len(sessions)} session(s)" if sessions else "the front-end never connected")]
    if not sessions:
        return out
    s0 = sessions[0]
    out.append(CheckResult("starts-a-ring", "pass" if started else "fail", True,
                           f"first ring start {1000 * (s0.first_ring_start - s0.t_connect):.0f} ms after connect"
                           if s0.first_ring_start is not None else "no SET_VRING_KICK seen"))
    mine = [f for f in findings if f.who == "frontend"]
    for name, rules in _GROUPS.items():
        hits = [f for f in mine if f.rule.id in rules]
        errors = [f for f in hits if f.severity == "error"]
        status = "fail" if hits else "pass"
        detail = "; ".join(f"{f.rule.id}: {f.message} (#{f.about})" for f in hits[:3]) or "no finding"
        out.append(CheckResult(name, status, bool(errors) or not hits, detail))
    if backend_close:
        out.append(CheckResult("backend-close", "pass" if dropped_alive else "fail", True,
                               "the front-end survived the back-end closing mid-session" if dropped_alive
                               else "the front-end died when the back-end closed the session"))
        out.append(CheckResult("reconnect", "pass" if reconnected else "fail", False,
                               "reconnected and restarted its rings" if reconnected
                               else "did not reconnect (QEMU 7.2 reconnects only blk with reconnect=N)"))
    return out
