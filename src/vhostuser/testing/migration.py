"""Live-migrate a running test guest between QEMUs on this machine.

Builds on :mod:`vhostuser.testing.guest`: every QEMU of one
:class:`MigratingGuest` boots the same kernel and initramfs (so they run the same
guest), has a QMP socket, and a destination listens with ``-incoming
unix:PATH`` (paused with ``-S`` by default, so that guest RAM of both sides can be
dumped and compared before the destination runs).

::

    with MigratingGuest(script, devices=[VhostUserDevice("blk", sock_a)]) as mg:
        src = mg.start([VhostUserDevice("blk", sock_a)])
        src.guest.wait_for_output("ready")
        dst = mg.incoming([VhostUserDevice("blk", sock_b)])
        stats = mg.migrate(src, dst)                 # several dirty rounds, then converges
        diff = compare_ram(src.dump_ram(d / "a"), dst.dump_ram(d / "b"))
        dst.cont()
        result = mg.wait(dst)                        # the script's output, both QEMUs

Guest RAM defaults to :data:`DEFAULT_MEMORY`, which is deliberately NOT a
multiple of 256 KiB: QEMU 7.2 under TCG loses guest CPU stores during migration
otherwise (see docs/migration.md).  QMP is spoken directly (JSON lines on a
UNIX socket); no QEMU Python package is needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .guest import GuestError, GuestProcess, GuestResult, Kernel, VhostUserDevice, prepare_boot, qemu_command

__all__ = [
    "DEFAULT_MEMORY",
    "QMPError",
    "MigrationError",
    "QMP",
    "MigrationParams",
    "MigrationStats",
    "VM",
    "MigratingGuest",
    "RamComparison",
    "compare_ram",
    "ram_dumps",
]

log = logging.getLogger(__name__)

#: 256 MiB - 8 KiB.  QEMU 7.2's TCG loses guest stores during migration when guest
#: RAM is a multiple of 256 KiB (a dirty-bitmap fast path that skips resetting TCG's
#: write tracking); any other size avoids it.
DEFAULT_MEMORY = "262136K"
PAGE_SIZE = 4096
MiB = 1 << 20


class QMPError(GuestError):
    """QMP answered with an error (``.error_class`` holds its class)."""

    def __init__(self, message: str, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class


class MigrationError(GuestError):
    """A migration failed or did not finish in time (``.info``: the last query-migrate)."""

    def __init__(self, message: str, info: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.info = dict(info or {})


# ------------------------------------------------------------------------ QMP


class QMP:
    """A minimal QMP client: connect, ``qmp_capabilities``, :meth:`execute`.

    Asynchronous events are kept in :attr:`events` (name -> count).
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        self.events: dict[str, int] = {}
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(os.fspath(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"cannot connect to QMP at {path}") from None
                time.sleep(0.05)
        sock.settimeout(timeout)
        self._sock = sock
        self._file = sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` (arguments with ``-`` in their names: pass a dict via
        ``**{"max-bandwidth": n}``); returns its ``return`` value."""
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                self.events[msg["event"]] = self.events.get(msg["event"], 0) + 1
                continue
            if "error" in msg:
                err = msg["error"]
                raise QMPError(f"{command}: {err.get('desc')}", err.get("class", ""))
            return msg.get("return")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()


# ----------------------------------------------------------------- parameters


@dataclasses.dataclass
class MigrationParams:
    """How :meth:`MigratingGuest.migrate` drives a migration.

    It starts throttled (``max_bandwidth`` bytes/s, ``downtime_limit_ms``) so that
    QEMU cannot converge and runs dirty-page rounds; after ``lift_after_syncs``
    bitmap syncs (``ram.dirty-sync-count``) it sets ``final_bandwidth`` and
    ``final_downtime_ms`` so that the next round converges.
    ``cancel_after_syncs`` instead cancels the migration (``migrate_cancel``) after
    that many syncs.
    """

    max_bandwidth: int = 32 * MiB
    downtime_limit_ms: int = 1
    lift_after_syncs: int = 4
    final_bandwidth: int = 1 << 30
    final_downtime_ms: int = 5000
    cancel_after_syncs: int | None = None
    timeout: float = 240.0
    poll_interval: float = 0.05


@dataclasses.dataclass
class MigrationStats:
    """What one migration did (from the source's ``query-migrate``).

    ``status``: ``completed`` or ``cancelled``; times in ms (``downtime_ms`` is
    QEMU's measured downtime, ``None`` when cancelled); ``dirty_syncs``: bitmap
    syncs (dirty-page rounds); ``transferred``: bytes; ``normal_pages``: pages sent
    whole, ``duplicate_pages``: zero pages; ``wall_s``: migrate -> done, as seen
    here; ``info``: the last query-migrate answer.
    """

    status: str
    total_time_ms: int | None
    downtime_ms: int | None
    setup_time_ms: int | None
    dirty_syncs: int
    transferred: int
    normal_pages: int
    duplicate_pages: int
    wall_s: float
    info: dict[str, Any]

    @classmethod
    def from_info(cls, info: Mapping[str, Any], wall_s: float) -> MigrationStats:
        """Build from a ``query-migrate`` answer."""
        ram = info.get("ram", {})
        return cls(
            status=str(info.get("status")), total_time_ms=info.get("total-time"), downtime_ms=info.get("downtime"),
            setup_time_ms=info.get("setup-time"), dirty_syncs=int(ram.get("dirty-sync-count", 0)),
            transferred=int(ram.get("transferred", 0)), normal_pages=int(ram.get("normal", 0)),
            duplicate_pages=int(ram.get("duplicate", 0)), wall_s=wall_s, info=dict(info),
        )


# ------------------------------------------------------------------ one QEMU


class VM:
    """One QEMU of a :class:`MigratingGuest`: its :class:`GuestProcess` and QMP."""

    def __init__(self, name: str, guest: GuestProcess, qmp: QMP, incoming: Path | None) -> None:
        self.name = name
        self.guest = guest
        self.qmp = qmp
        #: the ``-incoming unix:`` socket of a destination
        self.incoming = incoming

    def status(self) -> str:
        """The run state (``running``, ``paused``, ``inmigrate``, ``postmigrate``, ...)."""
        return str(self.qmp.execute("query-status")["status"])

    def ram_size(self) -> int:
        """Guest RAM in bytes (``query-memory-size-summary``)."""
        return int(self.qmp.execute("query-memory-size-summary")["base-memory"])

    def dump_ram(self, path: Path) -> Path:
        """Write guest-physical ``[0, RAM size)`` to ``path`` (QMP ``pmemsave``).

        All of guest RAM lies below 4 GiB for the rig's sizes (q35 puts up to
        2 GiB there), so this is every RAM page.  The VM should be stopped.
        """
        size = self.ram_size()
        self.qmp.execute("pmemsave", val=0, size=size, filename=os.fspath(path))
        return path

    def cont(self) -> None:
        """Resume the guest (``cont``)."""
        self.qmp.execute("cont")

    def close(self) -> None:
        """Kill QEMU, close QMP (idempotent)."""
        self.qmp.close()
        self.guest.close()


def _wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise MigrationError(f"timed out waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------- a migrating guest


class MigratingGuest:
    """A guest that runs ``script`` and can move between QEMUs.

    Arguments as :func:`vhostuser.testing.guest.start_guest`; ``devices`` decides
    the guest modules (every QEMU must then get devices of the same kinds and
    options, as migration demands).  Use as a context manager: every QEMU is
    killed and the work directory removed at the end.
    """

    def __init__(
        self,
        script: str,
        *,
        devices: Sequence[VhostUserDevice | str] = (),
        modules: Sequence[str] = (),
        extra_files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
        memory: str = DEFAULT_MEMORY,
        timeout: float = 300.0,
        kernel: Kernel | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.kernel, self.initramfs = prepare_boot(script, devices=devices, modules=modules,
                                                   extra_files=extra_files, kernel=kernel)
        self.memory = memory
        self.timeout = timeout
        self.extra_args = list(extra_args)
        self.workdir = Path(tempfile.mkdtemp(prefix="vhu-mig-"))
        self.vms: list[VM] = []

    def _launch(self, devices: Sequence[VhostUserDevice | str], *, incoming: bool, paused: bool) -> VM:
        name = f"vm{len(self.vms)}"
        wd = self.workdir / name
        wd.mkdir()
        qmp_path = wd / "qmp.sock"
        extra = ["-qmp", f"unix:{qmp_path},server=on,wait=off", *self.extra_args]
        in_path = wd / "in.sock" if incoming else None
        if in_path is not None:
            extra += ["-incoming", f"unix:{in_path}"]
        if paused:
            extra.append("-S")
        cmd = qemu_command(self.kernel, self.initramfs, devices=devices, memory=self.memory,
                           extra_args=extra, console_path=wd / "console.log")
        guest = GuestProcess(cmd, wd, wd / "console.log", self.timeout, keep_workdir=True)
        try:
            qmp = QMP(qmp_path)
        except BaseException:
            guest.close()
            raise
        vm = VM(name, guest, qmp, in_path)
        self.vms.append(vm)
        return vm

    def start(self, devices: Sequence[VhostUserDevice | str] = (), *, paused: bool = False) -> VM:
        """Boot the first QEMU (running, or stopped before the first instruction
        with ``paused``)."""
        return self._launch(devices, incoming=False, paused=paused)

    def incoming(self, devices: Sequence[VhostUserDevice | str] = (), *, paused: bool = True) -> VM:
        """Start a destination QEMU listening on a UNIX socket (``-incoming``);
        with ``paused`` (``-S``) it stays paused after the migration."""
        vm = self._launch(devices, incoming=True, paused=paused)
        assert vm.incoming is not None
        _wait_until(f"{vm.name}'s incoming socket", vm.incoming.exists, 30)
        return vm

    def migrate(self, src: VM, dst: VM, params: MigrationParams | None = None) -> MigrationStats:
        """Migrate ``src`` to ``dst`` and wait until it completed (or was
        cancelled, with ``params.cancel_after_syncs``); returns the source's
        statistics.  A completed migration has ``dst`` out of ``inmigrate``
        (paused if it was started with ``-S``) when this returns.

        Raises :class:`MigrationError` if QEMU reports ``failed`` or time runs out.
        """
        p = params or MigrationParams()
        if dst.incoming is None:
            raise ValueError(f"{dst.name} was not started with incoming()")
        src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": p.max_bandwidth,
                                                     "downtime-limit": p.downtime_limit_ms})
        t0 = time.monotonic()
        src.qmp.execute("migrate", uri=f"unix:{dst.incoming}")
        lifted = cancelled = False
        deadline = t0 + p.timeout
        while True:
            info = src.qmp.execute("query-migrate")
            status = info.get("status")
            syncs = int(info.get("ram", {}).get("dirty-sync-count", 0))
            if status == "completed" or (status == "cancelled" and cancelled):
                break
            if status in ("failed", "cancelled"):
                raise MigrationError(f"migration {src.name} -> {dst.name} {status}: {info.get('error-desc', '')}",
                                     info)
            if p.cancel_after_syncs is not None and not cancelled and syncs >= p.cancel_after_syncs:
                log.info("cancelling migration %s -> %s after %d syncs", src.name, dst.name, syncs)
                src.qmp.execute("migrate_cancel")
                cancelled = True
            elif not lifted and p.cancel_after_syncs is None and syncs >= p.lift_after_syncs:
                log.info("lifting migration limits after %d syncs", syncs)
                src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": p.final_bandwidth,
                                                             "downtime-limit": p.final_downtime_ms})
                lifted = True
            if time.monotonic() > deadline:
                with contextlib.suppress(QMPError):
                    src.qmp.execute("migrate_cancel")
                raise MigrationError(f"migration {src.name} -> {dst.name} did not finish in {p.timeout} s "
                                     f"(status {status}, {syncs} syncs)", info)
            time.sleep(p.poll_interval)
        stats = MigrationStats.from_info(info, time.monotonic() - t0)
        log.info("migration %s -> %s %s: %s ms total, %s ms downtime, %d syncs, %d bytes", src.name, dst.name,
                 stats.status, stats.total_time_ms, stats.downtime_ms, stats.dirty_syncs, stats.transferred)
        if stats.status == "completed":
            _wait_until(f"{dst.name} to finish the incoming migration", lambda: dst.status() != "inmigrate",
                        max(5.0, deadline - time.monotonic()))
        return stats

    def wait(self, vm: VM, timeout: float | None = None) -> GuestResult:
        """Wait for the guest on ``vm`` (the last QEMU it ran on) to power off;
        the result's output joins what every QEMU's result channel carried."""
        earlier = "".join(v.guest.raw_output for v in self.vms if v is not vm)
        return vm.guest.wait(timeout, earlier_output=earlier)

    def close(self) -> None:
        """Kill every QEMU and remove the work directory."""
        for vm in self.vms:
            vm.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MigratingGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------ RAM comparison


@dataclasses.dataclass
class RamComparison:
    """Two guest RAM dumps compared page by page (4 KiB pages, page n = gpa n*4096).

    ``differing``: page numbers whose contents differ; ``backend_written``: those
    of them that the classifier recognised as data the back-end wrote (on either
    side).
    """

    pages: int
    differing: list[int]
    backend_written: list[int]

    @property
    def identical(self) -> bool:
        """True when every page is equal."""
        return not self.differing

    def describe(self, limit: int = 10) -> str:
        """A one-paragraph summary for assertion messages and reports."""
        if self.identical:
            return f"all {self.pages} pages identical"
        shown = ", ".join(f"{p * PAGE_SIZE:#x}" for p in self.differing[:limit])
        more = "" if len(self.differing) <= limit else f" (+{len(self.differing) - limit} more)"
        return (f"{len(self.differing)} of {self.pages} pages differ, {len(self.backend_written)} of them in "
                f"buffers the back-end wrote; first at gpa {shown}{more}")


def compare_ram(a: Path, b: Path, *, backend_page: Callable[[bytes], bool] | None = None,
                chunk: int = 4 * MiB) -> RamComparison:
    """Compare two RAM dumps (:meth:`VM.dump_ram`) page by page.

    ``backend_page(page_bytes) -> bool`` says whether a page's content is data the
    back-end wrote (e.g. a recognisable disk block); a differing page counts as
    back-end-written when either side's copy is.
    """
    differing: list[int] = []
    backend: list[int] = []
    pages = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        base = 0
        while True:
            xa, xb = fa.read(chunk), fb.read(chunk)
            if not xa and not xb:
                break
            if len(xa) != len(xb):
                raise ValueError(f"RAM dumps differ in size: {a} vs {b}")
            pages += (len(xa) + PAGE_SIZE - 1) // PAGE_SIZE
            if xa != xb:
                for off in range(0, len(xa), PAGE_SIZE):
                    pa, pb = xa[off:off + PAGE_SIZE], xb[off:off + PAGE_SIZE]
                    if pa != pb:
                        page = (base + off) // PAGE_SIZE
                        differing.append(page)
                        if backend_page is not None and (backend_page(pa) or backend_page(pb)):
                            backend.append(page)
            base += len(xa)
    return RamComparison(pages, differing, backend)


@contextlib.contextmanager
def ram_dumps(*vms: VM) -> Iterator[list[Path]]:
    """Dump the RAM of ``vms`` into a temporary directory, removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="vhu-ram-"))
    try:
        yield [vm.dump_ram(d / f"{vm.name}.ram") for vm in vms]
    finally:
        shutil.rmtree(d, ignore_errors=True)
