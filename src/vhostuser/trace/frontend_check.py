"""``vhostuser check --frontend``: judge a front-end against the spec.

A back-end of the chosen device type (one of ours, in this process) serves behind
a checking :class:`~.proxy.TraceProxy`; the front-end under test is started by a
*launcher* with the proxy's socket path.  Once it has started a ring, the back-end
closes the session (as a crashing back-end would) and we watch whether the
front-end survives and reconnects.  Then (``nack``) the front-end is started a
second time and the tracer answers its first acknowledged ``nack`` request (by
default the memory table: SET_MEM_TABLE or ADD_MEM_REG) with a failure: the front-end must survive it, and should
not go on to start rings on what the back-end refused.  Each aspect becomes a
:class:`~vhostuser.testing.checker.CheckResult` (same report as ``vhostuser check``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from ..backend import VhostUserBackend
from ..daemon import VhostUserDaemon
from ..testing.checker import CheckResult
from ..vring import VringState
from .events import TraceEvent
from .proxy import TraceOptions, TraceProxy
from .rules import Finding
from .session import SessionState

__all__ = ["Launched", "FRONTEND_DEVICES", "check_frontend", "make_backend"]

log = logging.getLogger(__name__)

#: device types ``check --frontend`` can serve
FRONTEND_DEVICES = ("rng", "blk", "vsock", "net")

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
    elif device == "net":
        backend = NetSink()
    else:
        raise ValueError(f"check --frontend cannot serve a {device!r} device (one of {', '.join(FRONTEND_DEVICES)})")
    try:
        yield backend
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()


class NetSink(VhostUserBackend):
    """A virtio-net back-end that is all a front-end check needs: one queue pair,
    every transmitted frame consumed (used, length 0), nothing ever received.
    It offers no device feature beyond what every virtio-net driver copes without."""

    num_queues = 2
    max_queue_size = 32768

    def __init__(self) -> None:
        super().__init__()
        #: frames the front-end transmitted
        self.tx_frames = 0

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState], thread_id: int) -> None:
        vring = vrings.get(device_event)
        if vring is None or device_event % 2 == 0:  # rx: we have nothing to send
            return
        while True:
            while chains := vring.pop_batch():
                vring.add_used_batch([(chain, 0) for chain in chains])
                self.tx_frames += len(chains)
            vring.signal_used_queue()
            if not vring.enable_notification():
                return


def _wait(cond: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or not alive():
            return cond()
        time.sleep(0.05)  # another process's progress: nothing to block on
    return True


#: the requests whose first acknowledgement is turned into a failure by default
DEFAULT_NACK = ("SET_MEM_TABLE", "ADD_MEM_REG")


def check_frontend(device: str, launch: Callable[[str], Launched], *, timeout: float = 60.0,
                   backend_close: bool = True, reconnect_timeout: float = 10.0,
                   sink: Callable[[TraceEvent], None] | None = None,
                   nack: tuple[str, ...] = DEFAULT_NACK) -> list[CheckResult]:
    """Serve a ``device`` back-end to the front-end ``launch(socket_path)`` starts, and judge it.

    ``nack``: request names, the first acknowledgement of one of which is answered
    with a failure in a second run of the front-end (empty: no such run)."""
    events: list[TraceEvent] = []

    def record(ev: TraceEvent) -> None:
        events.append(ev)
        if sink is not None:
            sink(ev)

    workdir = tempfile.mkdtemp(prefix="vhu-fecheck-")
    results: list[CheckResult] = []
    try:
        with _front_end_behind_tracer(device, workdir, launch, record,
                                      TraceOptions(check=True, device=device)) as (proxy, proc):
            alive = lambda: proc.poll() is None  # noqa: E731
            started = _wait(lambda: _ring_started(proxy.sessions, 0), timeout, alive)
            dropped_alive = reconnected = None
            early_exit: int | None = None
            if started and backend_close:
                time.sleep(0.5)  # let the front-end settle into the running state
                early_exit = proc.poll()
                n = len(proxy.sessions)
                proxy.drop_sessions()
                reconnected = _wait(lambda: _ring_started(proxy.sessions, n), reconnect_timeout, alive)
                dropped_alive = alive() or (proc.poll() == 0)
            if alive():
                _wait(lambda: False, timeout if not started else 5.0, alive)
        results = _judge(proxy.sessions, proxy.findings, started, backend_close, dropped_alive, reconnected,
                         early_exit)
        if nack and started:
            results.append(_nack_run(device, launch, nack, workdir, timeout, record))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


@contextlib.contextmanager
def _front_end_behind_tracer(device: str, workdir: str, launch: Callable[[str], Launched],
                             sink: Callable[[TraceEvent], None],
                             options: TraceOptions) -> Iterator[tuple[TraceProxy, Launched]]:
    """Our ``device`` back-end behind a tracer in ``workdir``, and the front-end
    ``launch`` started on the tracer's socket; killed and stopped at the end."""
    with make_backend(device, workdir) as backend, VhostUserDaemon(device, backend) as daemon:
        back = os.path.join(workdir, "backend.sock")
        daemon.start_server(back)
        proxy = TraceProxy(os.path.join(workdir, "frontend.sock"), back, sink, options)
        proxy.start()
        proc: Launched | None = None
        try:
            proc = launch(proxy.listen_path)
            yield proxy, proc
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            proxy.stop()


def _nack_run(device: str, launch: Callable[[str], Launched], requests: tuple[str, ...], workdir: str,
              timeout: float, record: Callable[[TraceEvent], None]) -> CheckResult:
    """Start the front-end again; the tracer NACKs one of ``requests``; judge what follows."""
    name = "handles-nack"
    events: list[TraceEvent] = []

    def keep(ev: TraceEvent) -> None:
        events.append(ev)
        record(ev)

    sub = tempfile.mkdtemp(prefix="nack-", dir=workdir)
    with _front_end_behind_tracer(device, sub, launch, keep, TraceOptions(device=device, nack=requests)) \
            as (proxy, proc):
        alive = lambda: proc.poll() is None  # noqa: E731
        injected = _wait(lambda: proxy.injected_nack is not None, timeout, alive)
        if injected:
            _wait(lambda: False, 3.0, alive)  # what does it do next?
        status = proc.poll()
    if not injected:
        return CheckResult(name, "skip", False, f"the front-end never asked for an acknowledged "
                           f"{' or '.join(requests)} (NEED_REPLY with REPLY_ACK), so nothing was refused")
    assert proxy.injected_nack is not None
    session, seq, request = proxy.injected_nack
    after = [e for e in events if e.seq > seq and e.session == session and e.kind == "request"]
    kicks = [e for e in after if e.request == "SET_VRING_KICK"]
    reply = next((e for e in events if e.seq == seq), None)
    refused = next((e for e in events if reply is not None and e.seq == reply.reply_to), None)
    # the same request again (for ADD_MEM_REG: the same region, not the next one)
    resent = any(e.request == request and (refused is None or e.payload == refused.payload) for e in after)
    what = (f"{len(after)} request(s) after the NACK" + (f", {request} sent again" if resent else "")
            + (", rings started" if kicks else "") + (", session closed" if any(
                e.kind == "close" and e.session == session for e in events) else ""))
    if status is not None and status < 0:
        return CheckResult(name, "fail", True, f"the front-end died (signal {-status}) after the NACK: {what}")
    if kicks and not resent:
        return CheckResult(name, "fail", False, f"survived, but started rings although {request} was refused "
                           f"and not sent again: {what}")
    exit_note = f" and exited with status {status}" if status is not None else ""
    return CheckResult(name, "pass", True, f"survived the NACK of {request}{exit_note}: {what}")


def _ring_started(sessions: list[SessionState], first: int) -> bool:
    return any(s.first_ring_start is not None for s in sessions[first:])


def _judge(sessions: list[SessionState], findings: list[Finding], started: bool, backend_close: bool,
           dropped_alive: bool | None, reconnected: bool | None, early_exit: int | None = None) -> list[CheckResult]:
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
    if backend_close and early_exit is not None:
        out.append(CheckResult("backend-close", "fail", True, f"the front-end exited (status {early_exit}) before "
                               "the back-end closed the session: see its own output"))
    elif backend_close:
        out.append(CheckResult("backend-close", "pass" if dropped_alive else "fail", True,
                               "the front-end survived the back-end closing mid-session" if dropped_alive
                               else "the front-end died when the back-end closed the session"))
        out.append(CheckResult("reconnect", "pass" if reconnected else "fail", False,
                               "reconnected and restarted its rings" if reconnected
                               else "did not reconnect (QEMU 7.2 reconnects only blk, with reconnect=N)"))
    return out
