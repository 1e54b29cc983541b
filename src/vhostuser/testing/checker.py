"""Conformance checker: protocol checks against ANY vhost-user back-end.

:func:`run_checks` connects (repeatedly) to a back-end's socket with the mock
front-end and runs a suite of checks; each gives a :class:`CheckResult`
(pass / fail / skip), *required* or not.  ``vhostuser check`` (:mod:`vhostuser.cli_check`)
is the command-line face.  A back-end conforms if every required check passes.

Checks (``CHECKS``, in order):

* ``handshake`` - GET_FEATURES (VERSION_1, PROTOCOL_FEATURES), protocol
  features, SET_OWNER, GET_QUEUE_NUM / GET_MAX_MEM_SLOTS when offered;
* ``features`` - SET_FEATURES is accepted, also twice (as QEMU's blk sends it),
  and GET_FEATURES is stable;
* ``reply-ack`` - with REPLY_ACK, every request of a full bring-up is acked;
* ``rings`` - rings start and stop; with ``--device``, requests are answered;
* ``vring-base`` - GET_VRING_BASE after traffic returns the index the ring
  reached, and the ring continues from it after a restart;
* ``reconnect`` - an abrupt disconnect, then a new connection is served (and
  requests still in the ring are processed, QEMU-style);
* ``memory-table`` - ADD_MEM_REG / REM_MEM_REG of an unrelated region (or a new
  SET_MEM_TABLE) while the rings run;
* ``device-<class>`` - with ``--device rng|blk|echo``: the device works;
* ``malformed-*`` - bad requests sent with NEED_REPLY: the back-end must nack
  them or drop the connection, and accept a new connection afterwards (an
  unknown request code, a short payload, a missing fd are required; a wrong
  protocol version and an out-of-range vring index are optional: warnings).

A back-end the checker started itself (:class:`BackendProcess`, ``--exec``) is
watched: when it exits, the check that was running fails with "back-end exited
(status N)" and the rest are reported as not run.  With ``restart_each`` a
fresh process serves every check (for back-ends that serve one session and
exit, like QEMU's virtiofsd).
"""
from __future__ import annotations

import logging
import os
import select
import shlex
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import Disconnected, RequestFailed, VhostUserError
from ..protocol.message import VERSION, FrontendReq, VhostUserHeaderFlag
from ..protocol.message import VhostUserProtocolFeatures as PF
from ..protocol.message import VirtioFeatures as VF
from .device_profiles import PROFILES, DeviceProfile
from .frontend import FrontendOptions, MockFrontend

__all__ = ["CheckResult", "CheckSkipped", "CheckContext", "BackendProcess", "CHECKS", "CHECK_NAMES", "run_checks",
           "conforms", "format_result", "format_report", "results_json"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("=III")


class CheckSkipped(Exception):
    """Raised by a check that does not apply to this back-end."""


@dataclass
class CheckResult:
    """One check's outcome."""

    #: the check's name (``handshake``, ``device-blk``, ...)
    name: str
    #: ``"pass"``, ``"fail"``, ``"skip"`` (does not apply) or ``"not run"`` (the back-end exited)
    status: str
    #: whether a failure makes the back-end non-conforming (else it is a warning)
    required: bool
    #: what was observed, or why it failed / was skipped
    detail: str = ""
    #: how long the check took
    seconds: float = 0.0
    #: the exit status of a back-end process (``--exec``) found gone during or before the check
    backend_exit: int | None = None

    @property
    def ok(self) -> bool:
        """Passed, skipped, or failed but optional (a required check not run is not ok)."""
        if self.status == "not run":
            return not self.required
        return self.status != "fail" or not self.required


@dataclass
class CheckContext:
    """What every check gets: where the back-end is and how to talk to it."""

    socket_path: str
    options: FrontendOptions
    profile: DeviceProfile | None = None
    timeout: float = 5.0
    #: filled by the handshake check
    facts: dict[str, Any] = field(default_factory=dict)

    def connect(self, *, start: bool = True, **overrides: Any) -> MockFrontend:
        """A mock front-end with the context's options (plus ``overrides``)."""
        opts = self.options.replace(**overrides) if overrides else self.options
        fe = MockFrontend.connect(self.socket_path, opts, start=False, timeout=self.timeout)
        try:
            if start:
                fe.start()
                if self.profile is not None:
                    self.profile.prepare(fe)
        except BaseException:
            fe.close()
            raise
        return fe

    def traffic(self, fe: MockFrontend, count: int, first: int = 0) -> None:
        """Send ``count`` device requests and check the answers (needs a profile)."""
        assert self.profile is not None
        p = self.profile
        reqs = [p.make_request(first + k) for k in range(count)]
        used = fe.transfer(p.queue, reqs, timeout=self.timeout)
        for k, u in enumerate(used):
            problem = p.check(first + k, u)
            if problem:
                raise AssertionError(problem)


class BackendProcess:
    """A back-end command the checker starts itself (``vhostuser check --exec``).

    ``command`` is a shell-like command line in which ``{socket}`` is replaced
    by ``socket_path``.  :meth:`start` runs it (in its own session) and waits up
    to ``timeout`` seconds for the socket to appear; :meth:`stop` ends it
    (SIGTERM, then SIGKILL); :meth:`exit_status` tells whether it has exited.
    Use it as a context manager.

    Raises:
        RuntimeError: from :meth:`start`, when the process exits or does not
            create its socket in time (the message carries its stderr).
        OSError: from :meth:`start`, when the command cannot be executed.
    """

    def __init__(self, command: str, socket_path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.argv = [a.replace("{socket}", self.socket_path) for a in shlex.split(command)]
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        #: how many times the process was started
        self.starts = 0

    def start(self) -> None:
        """Start the command and wait for its socket (stopping a previous instance first)."""
        self.stop()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        log.info("starting %s", self.argv)
        proc = self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + self.timeout
        while not os.path.exists(self.socket_path):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                self.stop()
                raise RuntimeError(f"the back-end exited with status {proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the back-end did not create {self.socket_path} within {self.timeout}s")
            time.sleep(0.02)  # another process creating its socket: nothing to poll on

    def exit_status(self, wait: float = 0.0) -> int | None:
        """The exit status if the process has exited (waiting up to ``wait`` s), else None."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(wait) if wait > 0 else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """End the process if it runs and release its pipe (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> BackendProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ==================================================================== checks
def check_handshake(ctx: CheckContext) -> str:
    fe = ctx.connect(start=False)
    try:
        offered = fe.offered_features
        ctx.facts.update(features=offered, protocol_features=int(fe.offered_protocol_features),
                         queue_num=fe.queue_num, max_mem_slots=fe.max_mem_slots)
        if not offered & VF.VERSION_1:
            raise AssertionError(f"VIRTIO_F_VERSION_1 not offered (features {offered:#x})")
        parts = [f"features {offered:#x}"]
        if offered & VF.PROTOCOL_FEATURES:
            parts.append(f"protocol features {int(fe.offered_protocol_features):#x}")
        else:
            parts.append("no protocol features")
        if fe.queue_num is not None:
            if fe.queue_num < 1:
                raise AssertionError(f"GET_QUEUE_NUM answered {fe.queue_num}")
            parts.append(f"{fe.queue_num} queues")
        if fe.max_mem_slots is not None:
            if fe.max_mem_slots < 1:
                raise AssertionError(f"GET_MAX_MEM_SLOTS answered {fe.max_mem_slots}")
            parts.append(f"{fe.max_mem_slots} memory slots")
        return ", ".join(parts)
    finally:
        fe.close()


def check_features(ctx: CheckContext) -> str:
    fe = ctx.connect(start=False)
    try:
        first = fe.offered_features
        again = fe.frontend.get_features()
        if again != first:
            raise AssertionError(f"GET_FEATURES changed: {first:#x} then {again:#x}")
        fe.frontend.set_features(fe.acked_features)
        fe.frontend.set_features(fe.acked_features)
        fe.sync()
        return f"acked {fe.acked_features:#x} (twice)"
    finally:
        fe.close()


def check_reply_ack(ctx: CheckContext) -> str:
    if not ctx.facts.get("protocol_features", 0) & PF.REPLY_ACK:
        raise CheckSkipped("REPLY_ACK not offered")
    sent: list[str] = []
    fe = MockFrontend(ctx.options.replace(reply_ack=True, reply_timeout=min(ctx.timeout, 3.0)))
    try:
        fe.socket_path = ctx.socket_path
        fe._attach(fe._connect_endpoint(ctx.socket_path, ctx.timeout))  # noqa: SLF001
        ep = fe.frontend.endpoint
        orig_send = ep.send

        def send(msg):  # noqa: ANN001, ANN202
            sent.append(msg.request.name)
            return orig_send(msg)

        ep.send = send  # type: ignore[method-assign]
        try:
            fe.handshake()
            fe.start()
            fe.stop()
        except TimeoutError:
            raise AssertionError(f"no reply to {sent[-1] if sent else '?'} with NEED_REPLY") from None
        except RequestFailed as exc:
            raise AssertionError(f"nack for a valid request: {exc}") from None
        return f"{len(sent)} requests, each acked"
    finally:
        fe.close()


def check_rings(ctx: CheckContext) -> str:
    fe = ctx.connect()
    try:
        detail = f"{len(fe.vrings)} rings ({'packed' if fe.packed else 'split'}) started"
        if ctx.profile is not None:
            ctx.traffic(fe, 8)
            detail += ", 8 requests answered"
        fe.stop()
        return detail + ", stopped"
    finally:
        fe.close()


def check_vring_base(ctx: CheckContext) -> str:
    fe = ctx.connect()
    try:
        n = 0
        if ctx.profile is not None:
            n = 10
            ctx.traffic(fe, n)
        q = ctx.profile.queue if ctx.profile is not None else 0
        bases = fe.stop()
        drv: Any = fe.driver(q)  # a SplitDriver or PackedDriver
        if fe.packed:
            want = (drv.next_used | drv.used_wrap << 15)
            want |= want << 16
        else:
            want = drv.used_idx()
        if bases[q] != want:
            raise AssertionError(f"GET_VRING_BASE({q}) = {bases[q]:#x}, the ring is at {want:#x}")
        fe.restart()
        if ctx.profile is not None:
            ctx.traffic(fe, 5, first=n)
            (again,) = fe.stop()[q:q + 1]
            if not fe.packed and again != n + 5:
                raise AssertionError(f"after a restart from {bases[q]} and 5 requests, base {again} (want {n + 5})")
        return f"base {bases[q]:#x} after {n} requests; restart continues"
    finally:
        fe.close()


def check_reconnect(ctx: CheckContext) -> str:
    fe = ctx.connect()
    try:
        if ctx.profile is not None:
            ctx.traffic(fe, 4)
            # leave a request in the ring, unkicked, as if the front-end died mid-request
            fe.add(ctx.profile.queue, *ctx.profile.make_request(4))
            fe.publish(ctx.profile.queue, kick=False)
        fe.reconnect(timeout=ctx.timeout)
        if ctx.profile is not None:
            got = fe.wait_used(ctx.profile.queue, 1, ctx.timeout)
            problem = ctx.profile.check(4, got[0])
            if problem:
                raise AssertionError(f"request left in the ring: {problem}")
            ctx.traffic(fe, 4, first=5)
            return "served again; the request left in the ring was processed"
        fe.sync()
        return "served again"
    finally:
        fe.close()


def check_memory_table(ctx: CheckContext) -> str:
    fe = ctx.connect()
    try:
        how = "ADD_MEM_REG/REM_MEM_REG" if fe.protocol_features & PF.CONFIGURE_MEM_SLOTS else "SET_MEM_TABLE"
        gpa = max(g + s for g, s in ctx.options.memory) + (64 << 20)
        for i in range(3):
            fe.add_region(gpa + i * (2 << 20), 1 << 20)
            if ctx.profile is not None:
                ctx.traffic(fe, 3, first=3 * i)
        for i in range(3):
            fe.remove_region(gpa + i * (2 << 20))
        if ctx.profile is not None:
            ctx.traffic(fe, 3, first=9)
        fe.sync()
        return f"3 regions added and removed with {how}" + (" during traffic" if ctx.profile else "")
    finally:
        fe.close()


# ------------------------------------------------------------- malformed
def _raw_reply(sock: socket.socket, timeout: float) -> tuple[int, int, bytes] | None:
    """Read one message (header + payload) raw; None at EOF / reset.  TimeoutError."""
    deadline = time.monotonic() + timeout
    buf = b""
    need = _HEADER.size
    header = None
    while True:
        while len(buf) < need:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply")
            r, _, _ = select.select([sock], [], [], remaining)
            if not r:
                continue
            try:
                chunk = sock.recv(need - len(buf))
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            buf += chunk
        if header is None:
            header = _HEADER.unpack(buf[:_HEADER.size])
            need = _HEADER.size + min(header[2], 4096)
            if need == len(buf):
                return header[0], header[1], buf[_HEADER.size:]
            continue
        return header[0], header[1], buf[_HEADER.size:]


def _still_usable(fe: MockFrontend) -> bool:
    """Whether the connection still answers a request after a malformed one."""
    try:
        fe.sync()
    except (Disconnected, OSError, TimeoutError, VhostUserError):
        return False
    return True


def _malformed(ctx: CheckContext, data: bytes, fds: Sequence[int] = (), *, request: int) -> str:
    """Send raw ``data`` after a handshake; the back-end must nack it or drop the
    connection, and then accept a new connection."""
    acked_zero = False
    fe = ctx.connect(start=False, reply_ack=True)
    try:
        fe.frontend.endpoint.send_bytes(data, fds)
        sock = fe.frontend.endpoint.socket
        try:
            reply = _raw_reply(sock, min(ctx.timeout, 3.0))
        except TimeoutError:
            raise AssertionError("neither a nack nor a dropped connection (no reply within the timeout)") from None
        if reply is None:
            outcome = "connection dropped"
        else:
            req, flags, payload = reply
            if req != request or not flags & VhostUserHeaderFlag.REPLY or len(payload) != 8:
                raise AssertionError(f"unexpected answer: request {req}, flags {flags:#x}, {len(payload)} bytes")
            value = struct.unpack("=Q", payload)[0]
            acked_zero = value == 0
            outcome = "acked (0) the malformed request" if acked_zero else f"nack ({value})"
            outcome += ", connection still usable" if _still_usable(fe) else ", then dropped the connection"
    except (Disconnected, OSError) as exc:
        outcome = f"connection dropped ({type(exc).__name__})"
    finally:
        fe.close()
    try:
        ctx.connect(start=False).close()
    except (VhostUserError, OSError, TimeoutError) as exc:
        raise AssertionError(f"{outcome}; a new connection failed: {type(exc).__name__}: {exc}") from None
    outcome += "; new connection accepted"
    if acked_zero:
        raise AssertionError(outcome)
    return outcome


def _hdr(request: int, size: int, flags: int = VERSION | VhostUserHeaderFlag.NEED_REPLY) -> bytes:
    return _HEADER.pack(request, flags, size)


def check_malformed_unknown(ctx: CheckContext) -> str:
    return _malformed(ctx, _hdr(250, 0), request=250)


def check_malformed_size(ctx: CheckContext) -> str:
    # SET_VRING_NUM carries 8 bytes (index, num); send 4
    return _malformed(ctx, _hdr(FrontendReq.SET_VRING_NUM, 4) + struct.pack("=I", 0),
                      request=FrontendReq.SET_VRING_NUM)


def check_malformed_fds(ctx: CheckContext) -> str:
    # SET_VRING_KICK for ring 0 without the NOFD bit and without an fd
    return _malformed(ctx, _hdr(FrontendReq.SET_VRING_KICK, 8) + struct.pack("=Q", 0),
                      request=FrontendReq.SET_VRING_KICK)


def check_malformed_version(ctx: CheckContext) -> str:
    # protocol version 2 in the flags
    return _malformed(ctx, _hdr(FrontendReq.SET_OWNER, 0, flags=0x2 | VhostUserHeaderFlag.NEED_REPLY),
                      request=FrontendReq.SET_OWNER)


def check_malformed_index(ctx: CheckContext) -> str:
    # a vring index the device does not have
    return _malformed(ctx, _hdr(FrontendReq.SET_VRING_NUM, 8) + struct.pack("=II", 200, 16),
                      request=FrontendReq.SET_VRING_NUM)


def check_device(ctx: CheckContext) -> str:
    if ctx.profile is None:
        raise CheckSkipped("no --device given")
    fe = ctx.connect()
    try:
        return ctx.profile.device_check(fe)
    finally:
        fe.close()


#: (name, function, required) in the order they run
CHECKS: list[tuple[str, Callable[[CheckContext], str], bool]] = [
    ("handshake", check_handshake, True),
    ("features", check_features, True),
    ("reply-ack", check_reply_ack, True),
    ("rings", check_rings, True),
    ("vring-base", check_vring_base, True),
    ("reconnect", check_reconnect, True),
    ("memory-table", check_memory_table, True),
    ("device", check_device, True),
    # the malformed requests last: a back-end may not survive them
    ("malformed-unknown-request", check_malformed_unknown, True),
    ("malformed-payload-size", check_malformed_size, True),
    ("malformed-missing-fd", check_malformed_fds, True),
    ("malformed-version", check_malformed_version, False),
    ("malformed-vring-index", check_malformed_index, False),
]


#: every name ``only`` may contain (``device`` selects ``device-<class>``)
CHECK_NAMES: tuple[str, ...] = tuple(name for name, _, _ in CHECKS)


def run_checks(socket_path: str | os.PathLike[str], *, device: str | None = None, options: FrontendOptions | None = None,
               timeout: float = 5.0, only: Sequence[str] | None = None,
               progress: Callable[[CheckResult], None] | None = None,
               backend: BackendProcess | None = None, restart_each: bool = False) -> list[CheckResult]:
    """Run the checks against the back-end at ``socket_path``.

    Args:
        socket_path: where the back-end listens.
        device: a device profile (``rng``, ``blk``, ``echo``) for the device-class checks.
        options: the mock front-end's options (default: 64-entry rings, two small regions).
        timeout: seconds to wait for any reply or used buffer.
        only: run just these checks (names from :data:`CHECK_NAMES`, ``device`` or
            ``device-<class>``); the facts they need (offered features) are still
            gathered with a handshake first.
        progress: called with each result as soon as it is known.
        backend: the back-end process, when the checker started it: its exit is
            reported as such and ends the run (the rest are "not run").
        restart_each: with ``backend``, start a fresh back-end for every check.

    A failing ``handshake`` stops the run.

    Raises:
        ValueError: ``only`` names a check that does not exist, or ``restart_each``
            is given without ``backend``.
    """
    if only is not None:
        unknown = [n for n in only if n not in CHECK_NAMES and not n.startswith("device")]
        if unknown:
            raise ValueError(f"unknown check {', '.join(unknown)}; the checks are {', '.join(CHECK_NAMES)}")
    if restart_each and backend is None:
        raise ValueError("restart_each needs the back-end process (backend=)")
    profile = PROFILES[device]() if device else None
    base = options or FrontendOptions(queue_size=64, memory=((0, 2 << 20), (4 << 20, 2 << 20)),
                                      data_size=128 << 10, timeout=timeout, reply_timeout=timeout)
    if profile is not None:
        base = profile.options(base)
    ctx = CheckContext(os.fspath(socket_path), base, profile, timeout)
    selected = []
    for name, fn, required in CHECKS:
        if name == "device" and profile is not None:
            name = f"device-{profile.name}"
        if only and name not in only and not (name.startswith("device") and "device" in only):
            continue
        selected.append((name, fn, required))
    if only and "handshake" not in only:
        # the facts later checks rely on (offered protocol features) come from the handshake
        selected.insert(0, ("handshake", check_handshake, True))
        reported: set[str] | None = set(only)
    else:
        reported = None

    results: list[CheckResult] = []

    def record(result: CheckResult) -> None:
        log.info("check %s: %s %s", result.name, result.status, result.detail)
        if reported is None or result.name in reported or result.name.startswith("device") and "device" in reported \
                or result.status != "pass":
            results.append(result)
            if progress is not None:
                progress(result)

    for k, (name, fn, required) in enumerate(selected):
        t0 = time.monotonic()
        exited: int | None = None
        try:
            if backend is not None and restart_each:
                backend.start()
            detail = fn(ctx)
            status = "pass"
        except CheckSkipped as exc:
            status, detail = "skip", str(exc)
        except (AssertionError, VhostUserError, OSError, TimeoutError, RuntimeError) as exc:
            status = "fail"
            detail = str(exc) or type(exc).__name__
            if not isinstance(exc, AssertionError):
                detail = f"{type(exc).__name__}: {detail}"
            if backend is not None:
                exited = backend.exit_status(wait=1.0)
                if exited is not None:
                    detail = f"back-end exited (status {exited}); {detail}"
        if backend is not None and exited is None and not restart_each:
            exited = backend.exit_status()  # passed, yet gone afterwards: the next checks cannot run
        record(CheckResult(name, status, required, detail, time.monotonic() - t0,
                           backend_exit=exited if status != "pass" else None))
        if name == "handshake" and status == "fail":
            break
        if exited is not None and not restart_each:
            for rest, _, rest_required in selected[k + 1:]:
                record(CheckResult(rest, "not run", rest_required, f"back-end exited (status {exited})",
                                   backend_exit=exited))
            break
    if backend is not None and restart_each:
        backend.stop()
    return results


def conforms(results: Sequence[CheckResult]) -> bool:
    """Every required check passed (or did not apply), and at least one check passed."""
    return bool(results) and all(r.ok for r in results) and any(r.status == "pass" for r in results)


def format_result(r: CheckResult) -> str:
    """One report line."""
    mark = {"pass": "PASS", "skip": "SKIP", "fail": "FAIL" if r.required else "WARN", "not run": "----"}[r.status]
    return f"{mark:4}  {r.name:28} {r.detail}"


def format_report(results: Sequence[CheckResult]) -> str:
    """The human report: one line per check, then a summary."""
    lines = [format_result(r) for r in results]
    passed = sum(r.status == "pass" for r in results)
    failed = sum(r.status == "fail" and r.required for r in results)
    # failures only because the process had gone: the run is incomplete, not a verdict
    real_failures = sum(r.status == "fail" and r.required and r.backend_exit is None for r in results)
    warned = sum(r.status == "fail" and not r.required for r in results)
    skipped = sum(r.status == "skip" for r in results)
    not_run = sum(r.status == "not run" for r in results)
    if conforms(results):
        verdict = "CONFORMS"
    elif real_failures:
        verdict = "DOES NOT CONFORM"
    elif failed or not_run:
        verdict = "INCOMPLETE (the back-end exited)"
    else:
        verdict = "NOTHING CHECKED (no check passed)"
    counts = f"{passed} passed, {failed} failed, {warned} warnings, {skipped} skipped"
    if not_run:
        counts += f", {not_run} not run"
    lines.append(f"{counts}: {verdict}")
    return "\n".join(lines)


def results_json(results: Sequence[CheckResult]) -> dict[str, Any]:
    """Machine-readable results."""
    return {"ok": conforms(results), "checks": [asdict(r) for r in results]}
