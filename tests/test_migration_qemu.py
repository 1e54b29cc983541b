"""Live migration of a running QEMU 7.2 (TCG) guest with our vhost-user-blk
back-end, proven end to end (docs/migration.md).

The guest runs ``blk_workload`` (vhostuser.testing.blk_workload): 4 threads of
O_DIRECT I/O (queue depth 4) reading into buffers it keeps - so the back-end
writes guest RAM all the time - and writing.  The source and destination
back-ends are two ``vhostuser blk --no-lock`` processes on one image.  Each
migration runs throttled for several dirty-page rounds, then converges.  Checks:

(a) the destination starts paused (``-S``); after the migration guest RAM of both
    sides is dumped (QMP ``pmemsave``) and compared page by page: identical;
(b) the destination resumes, the host writes the stop marker, and the guest checks
    every buffer it holds and every block it wrote.

A negative control runs the source back-end with ``VHOSTUSER_TEST_SKIP_DATA_LOG=1``
(data pages not logged, rings still logged): the comparison must then find
differing pages in buffers the back-end wrote, and the guest bad buffers.

Each migration test costs ~30-60 s under TCG, so the matrix is split between the
two passes of scripts/test: ``impl_pass`` runs a test only in the pass of that
core (the other pass deselects it), ``both_impls`` lets a guest test into the
python pass at all.  The back-ends run the pass's core.

* native (C core): split ring (a)+(b); negative control; ping-pong A -> B -> A
  on the packed ring; vhost-user-rng/-vsock refuse migration (QEMU 7.2);
* python (pure-Python core): packed ring (a)+(b); a migration cancelled half-way
  (the source keeps serving, split ring).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from helpers.procs import reap, wait_for_path

from vhostuser._impl import IMPL
from vhostuser.testing.blk_workload import BlkWorkload, WorkloadReport, is_read_block
from vhostuser.devices.net import read_pcap
from vhostuser.testing.guest import VhostUserDevice
from vhostuser.testing.migration import (
    VM,
    MigratingGuest,
    MigrationParams,
    MigrationStats,
    QMPError,
    RamComparison,
    compare_ram,
    ram_dumps,
)
from vhostuser.virtqueue.chain import SKIP_DATA_LOG_ENV

pytestmark = pytest.mark.qemu

WORKLOAD = BlkWorkload()
TIMEOUT = 300.0
PARAMS = MigrationParams()
LAYOUT = {"split": "", "packed": "packed=on"}


class Rig:
    """A short directory, the image, ``vhostuser blk --no-lock`` back-ends on it."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vhu-migt-"))
        stack.callback(shutil.rmtree, self.dir, True)
        self.stack = stack
        self.image = WORKLOAD.make_image(self.dir / "disk.img")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def backend(self, name: str, env: Mapping[str, str] | None = None) -> Path:
        """Start a back-end listening on ``<dir>/<name>.sock``, return the socket."""
        sock = self.dir / f"{name}.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhostuser", "blk", "--no-lock", "--socket-path", str(sock),
             "--blk-file", str(self.image)],
            env={**os.environ, "VHOSTUSER_IMPL": IMPL, **(env or {})})
        self.stack.callback(reap, proc)
        self.procs[name] = proc
        wait_for_path(sock, proc)
        return sock

    def alive(self) -> None:
        """Every back-end still runs."""
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"back-end {name} exited with status {proc.returncode}"


@pytest.fixture
def rig() -> Iterator[Rig]:
    with contextlib.ExitStack() as stack:
        yield Rig(stack)


def blk(sock: Path, layout: str) -> VhostUserDevice:
    return VhostUserDevice("blk", sock, extra=LAYOUT[layout])


def migrating_guest(layout: str) -> MigratingGuest:
    return MigratingGuest(WORKLOAD.script(), devices=[blk(Path("/unused"), layout)],
                          extra_files=WORKLOAD.extra_files(), timeout=TIMEOUT)


def migrate_and_compare(mg: MigratingGuest, src: VM, dst: VM) -> tuple[MigrationStats, RamComparison]:
    """Migrate (several dirty rounds) into a paused destination, dump and compare RAM."""
    stats = mg.migrate(src, dst, PARAMS)
    assert stats.status == "completed"
    assert stats.dirty_syncs >= PARAMS.lift_after_syncs, stats  # several rounds really ran
    assert src.status() == "postmigrate" and dst.status() == "paused"
    with ram_dumps(src, dst) as (a, b):
        return stats, compare_ram(a, b, backend_page=is_read_block)


def finish(mg: MigratingGuest, rig: Rig, vm: VM) -> WorkloadReport:
    """Stop the workload; the guest checks its buffers and writes; return its report."""
    WORKLOAD.stop(rig.image)
    result = mg.wait(vm, timeout=120)
    report = WorkloadReport.parse(result.output)
    assert report.reads > 0 and report.writes > 0 and report.slots > 0, result.output
    return report


@pytest.mark.parametrize("layout", [
    pytest.param("split", marks=pytest.mark.impl_pass("native")),
    pytest.param("packed", marks=[pytest.mark.impl_pass("python"), pytest.mark.both_impls]),
])
def test_migrated_ram_is_identical_and_the_guest_verifies_its_buffers(rig: Rig, layout: str) -> None:
    sock_a, sock_b = rig.backend("a"), rig.backend("b")
    with migrating_guest(layout) as mg:
        src = mg.start([blk(sock_a, layout)])
        src.guest.wait_for_output("ready", 180)
        dst = mg.incoming([blk(sock_b, layout)])
        stats, cmp = migrate_and_compare(mg, src, dst)
        assert cmp.identical, cmp.describe()
        dst.cont()
        report = finish(mg, rig, dst)
    assert report.ok, report
    rig.alive()
    print(f"{layout}/{IMPL}: {stats.dirty_syncs} syncs, {stats.total_time_ms} ms, downtime {stats.downtime_ms} ms, "
          f"{cmp.pages} pages identical; {report}")


@pytest.mark.impl_pass("native")
def test_negative_control_unlogged_data_pages_are_caught(rig: Rig) -> None:
    """With data pages not logged the same migration corrupts the guest, and both
    checks see it: so the tests above have teeth."""
    sock_a, sock_b = rig.backend("a", {SKIP_DATA_LOG_ENV: "1"}), rig.backend("b")
    with migrating_guest("split") as mg:
        src = mg.start([blk(sock_a, "split")])
        src.guest.wait_for_output("ready", 180)
        dst = mg.incoming([blk(sock_b, "split")])
        _, cmp = migrate_and_compare(mg, src, dst)
        dst.cont()
        report = finish(mg, rig, dst)
    print(f"negative control: {cmp.describe()}; {report}")
    assert not cmp.identical
    assert cmp.backend_written, cmp.describe()  # the stale pages are disk blocks the back-end wrote
    assert report.bad_slots > 0, report


@pytest.mark.impl_pass("native")
def test_ping_pong_migration(rig: Rig) -> None:
    """A -> B -> A: the first back-end serves the guest again after its QEMU left
    (packed ring)."""
    sock_a, sock_b = rig.backend("a"), rig.backend("b")
    with migrating_guest("packed") as mg:
        first = mg.start([blk(sock_a, "packed")])
        first.guest.wait_for_output("ready", 180)
        second = mg.incoming([blk(sock_b, "packed")])
        _, there = migrate_and_compare(mg, first, second)
        assert there.identical, f"A -> B: {there.describe()}"
        second.cont()
        first.close()  # the source QEMU quits; back-end a waits for the next front-end
        back = mg.incoming([blk(sock_a, "packed")])
        _, again = migrate_and_compare(mg, second, back)
        assert again.identical, f"B -> A: {again.describe()}"
        back.cont()
        report = finish(mg, rig, back)
    assert report.ok, report
    rig.alive()


@pytest.mark.impl_pass("python")
@pytest.mark.both_impls
def test_cancelled_migration_source_keeps_serving(rig: Rig) -> None:
    sock_a, sock_b = rig.backend("a"), rig.backend("b")
    with migrating_guest("split") as mg:
        src = mg.start([blk(sock_a, "split")])
        src.guest.wait_for_output("ready", 180)
        dst = mg.incoming([blk(sock_b, "split")])
        stats = mg.migrate(src, dst, MigrationParams(cancel_after_syncs=2))
        assert stats.status == "cancelled"
        assert src.status() == "running"
        dst.close()
        time.sleep(2)  # the guest keeps doing I/O on the source, logging off again
        report = finish(mg, rig, src)
    assert report.ok, report
    rig.alive()


@pytest.mark.impl_pass("native")
@pytest.mark.parametrize(("kind", "args"), [
    ("rng", []),
    ("vsock", ["--guest-cid", "3", "--uds-path", "{dir}/vm.vsock"]),
])
def test_qemu_72_refuses_to_migrate_vhost_user_rng_and_vsock(kind: str, args: list[str]) -> None:
    """QEMU 7.2 marks vhost-user-rng-pci and vhost-user-vsock-pci unmigratable
    (``.unmigratable = 1`` in their VMStateDescription): ``migrate`` fails at once,
    the guest is untouched and the back-end still serves."""
    d = Path(tempfile.mkdtemp(prefix="vhu-migr-"))
    sock = d / f"{kind}.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vhostuser", kind, "--socket-path", str(sock),
                             *(a.format(dir=d) for a in args)])
    try:
        wait_for_path(sock, proc)
        dev = VhostUserDevice(kind, sock)
        with MigratingGuest("true", devices=[dev], timeout=60) as mg:
            vm = mg.start([dev], paused=True)
            with pytest.raises(QMPError) as info:
                vm.qmp.execute("migrate", uri=f"unix:{d}/nowhere.sock")
            assert "non-migratable device" in str(info.value) and f"vhost-user-{kind}" in str(info.value)
            assert vm.status() == "prelaunch"
            state = vm.qmp.execute("query-migrate")
            assert "status" not in state  # no migration ever started
            assert any(f"vhost-user-{kind}" in r for r in state["blocked-reasons"]), state
        assert proc.poll() is None
    finally:
        reap(proc)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.impl_pass("native")
def test_net_guest_migrates_and_the_destination_announces_it() -> None:
    """A virtio-net guest on ``vhostuser net``'s switch migrates from port 0 to
    port 1 of the same switch.  The device does not offer GUEST_ANNOUNCE, so QEMU
    7.2 sends SEND_RARP to the destination back-end after switchover, and the
    switch broadcasts the guest's RARP: it is in the capture, from the guest's MAC,
    after the migration - so the network learns where the guest went."""
    mac = "52:54:00:00:00:07"
    d = Path(tempfile.mkdtemp(prefix="vhu-mign-"))
    sock, pcap = d / "net.sock", d / "net.pcap"
    proc = subprocess.Popen([sys.executable, "-m", "vhostuser", "net", "--socket-path", str(sock), "--socket-count",
                             "2", "--pcap", str(pcap), "-v"], stderr=subprocess.PIPE, text=True)
    try:
        for i in range(2):
            wait_for_path(Path(f"{sock}{i}"), proc)
        devs = [VhostUserDevice("net", Path(f"{sock}{i}"), extra=f"mac={mac}") for i in range(2)]
        script = "ip link set eth0 up\nip addr add 10.0.0.7/24 dev eth0\nsleep 600\n"
        with MigratingGuest(script, devices=[devs[0]], timeout=TIMEOUT) as mg:
            src = mg.start([devs[0]])
            time.sleep(3)  # let the guest's driver come up
            dst = mg.incoming([devs[1]])
            stats = mg.migrate(src, dst, MigrationParams(lift_after_syncs=1))
            assert stats.status == "completed", stats
            t_switchover = time.time()
            dst.cont()
            time.sleep(5)  # QEMU announces a few times after the switchover
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
        rarps = _rarps(pcap, mac)  # the capture is complete once the command exited
        shutil.rmtree(d, ignore_errors=True)
    assert f"RARP for {mac}" in stderr, stderr[-3000:]
    assert rarps and all(t >= t_switchover - 1 for t, _ in rarps), stderr[-3000:]
    _, frame = rarps[0]
    assert frame[:6] == b"\xff" * 6  # broadcast, opcode 3 (reverse request)
    assert frame[20:22] == b"\x00\x03"


def _rarps(pcap: Path, mac: str) -> list[tuple[float, bytes]]:
    """(time, frame) of the RARP frames (ethertype 0x8035) from ``mac`` in the capture."""
    src = bytes.fromhex(mac.replace(":", ""))
    return [(t, f) for t, f in read_pcap(pcap) if f[6:12] == src and f[12:14] == b"\x80\x35"]
