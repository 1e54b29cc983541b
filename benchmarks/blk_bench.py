"""Back-end-bound virtio-blk benchmark: ``vhostuser blk`` (C core and Python core)
against ``qemu-storage-daemon`` on the same tmpfs image, in interleaved rounds.

The front-end is the library's :class:`~vhostuser.testing.MockFrontend` for the
vhost-user handshake and the guest RAM / ring set-up; then a small C driver
(``blk_driver.c``, compiled here with the system C compiler and called through
ctypes, one thread per queue, the GIL released) keeps QD requests in flight on
each split ring with EVENT_IDX, sleeps on the call eventfd like a guest driver,
verifies every status byte and three words of every read against the image's
pattern.  Back-end CPU comes from ``/proc/PID/stat`` (utime + stime of all its
threads) around the timed part.

Only ratios from one run mean anything on a shared machine: every round runs
every case on every back-end, back-ends interleaved, and the median of the
rounds is reported.  See benchmarks/README.md.

    .venv/bin/python benchmarks/blk_bench.py                 # 3 rounds of 2 s per case (~2 min)
    .venv/bin/python benchmarks/blk_bench.py --quick         # 1 round of 0.5 s
    .venv/bin/python benchmarks/blk_bench.py --json out.json --backends native,qsd --cases randread-qd32
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vhostuser.devices.blk.engine import BlkFeature
from vhostuser.testing import FrontendOptions, MockFrontend

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
QUEUE_SIZE = 256
GUEST_RAM = 16 * MiB
DATA_SIZE = 2 * MiB  # per queue: QD data buffers + QD 32-byte header/status slots
SEED = 0x5EED_0F_B10C


@dataclass(frozen=True)
class Case:
    """One workload."""

    name: str
    bs: int
    qd: int
    write: bool = False
    sequential: bool = False
    queues: int = 1


CASES = {
    c.name: c
    for c in (
        Case("randread-4k-qd1", 4096, 1),
        Case("randread-4k-qd32", 4096, 32),
        Case("randwrite-4k-qd32", 4096, 32, write=True),
        Case("seqread-64k-qd16", 65536, 16, sequential=True),
        Case("randread-4k-qd16x2q", 4096, 16, queues=2),
    )
}
#: "-poll": vhostuser blk with polling on (--poll-ns, default 200 us)
BACKENDS = ("qsd", "native", "python", "native-poll")


class BenchQueue(ctypes.Structure):
    """``struct bench_queue`` of blk_driver.c."""

    _fields_ = [
        ("desc", ctypes.c_void_p), ("avail", ctypes.c_void_p), ("used", ctypes.c_void_p),
        ("data_gpa", ctypes.c_uint64), ("data_host", ctypes.c_void_p),
        ("size", ctypes.c_uint32), ("qd", ctypes.c_uint32), ("bs", ctypes.c_uint32),
        ("write", ctypes.c_uint32), ("sequential", ctypes.c_uint32), ("pad0", ctypes.c_uint32),
        ("image_bytes", ctypes.c_uint64), ("seed", ctypes.c_uint64), ("rng", ctypes.c_uint64),
        ("seq_next", ctypes.c_uint64),
        ("kick_fd", ctypes.c_int), ("call_fd", ctypes.c_int),
        ("seconds", ctypes.c_double), ("max_requests", ctypes.c_uint64),
        ("completed", ctypes.c_uint64), ("bytes", ctypes.c_uint64), ("latency_ns", ctypes.c_uint64),
        ("interrupts", ctypes.c_uint64), ("kicks", ctypes.c_uint64),
        ("bad_status", ctypes.c_uint64), ("bad_data", ctypes.c_uint64), ("bad_used", ctypes.c_uint64),
        ("elapsed_ns", ctypes.c_uint64), ("error", ctypes.c_int),
    ]  # fmt: skip


def build_driver(workdir: Path) -> ctypes.CDLL:
    """Compile blk_driver.c into ``workdir`` and load it."""
    cc = os.environ.get("CC") or shutil.which("cc") or "gcc"
    out = workdir / "blk_driver.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wall", "-o", str(out), str(HERE / "blk_driver.c")],
                   check=True)
    lib = ctypes.CDLL(str(out))
    lib.bench_run.argtypes = [ctypes.POINTER(BenchQueue)]
    lib.bench_fill.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64]
    lib.bench_pattern.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
    lib.bench_pattern.restype = ctypes.c_uint64
    return lib


def fill_image(lib: ctypes.CDLL, path: Path, size: int, seed: int = SEED) -> None:
    """Create ``path`` holding the pattern of ``seed`` (blk_driver.c: bench_pattern)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        rc = lib.bench_fill(fd, size, seed)
        if rc:
            raise OSError(rc, os.strerror(rc), str(path))
    finally:
        os.close(fd)


# ------------------------------------------------------------------ back-ends
def _wait_socket(sock: Path, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the back-end exited with {proc.returncode} before listening on {sock}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no socket at {sock} after {timeout} s")
        time.sleep(0.05)  # another process creates it: nothing to poll on


@dataclass
class Backend:
    """A running back-end: its socket and the pid whose CPU time is counted."""

    name: str
    sock: Path
    pid: int


@contextlib.contextmanager
def start_backend(name: str, image: Path, workdir: Path, queues: int, poll_ns: int = 200_000) -> Iterator[Backend]:
    """Start back-end ``name`` (one of :data:`BACKENDS`) serving ``image`` with
    ``queues`` queues (``poll_ns``: the polling window of the "-poll" ones)."""
    sock = workdir / f"{name}.sock"
    if name == "qsd":
        binary = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"
        pidfile = workdir / "qsd.pid"
        cmd = [binary,
               "--blockdev", f"driver=file,node-name=file0,filename={image},locking=off",
               "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},"
                           f"writable=on,num-queues={queues}",
               "--daemonize", "--pidfile", str(pidfile)]  # fmt: skip
        subprocess.run(cmd, check=True, timeout=30)
        pid = int(pidfile.read_text())
        try:
            _wait_socket(sock, None)
            yield Backend(name, sock, pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return
    impl, _, variant = name.partition("-")
    env = dict(os.environ, VHOSTUSER_IMPL=impl)
    cmd = [sys.executable, "-m", "vhostuser", "blk", "--socket-path", str(sock), "--blk-file", str(image),
           "--no-lock", "--num-queues", str(queues)]
    if variant == "poll":
        cmd += ["--poll-ns", str(poll_ns)]
    proc = subprocess.Popen(cmd, env=env)
    try:
        _wait_socket(sock, proc)
        yield Backend(name, sock, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (/proc/PID/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------- a run
@dataclass
class Result:
    """One case on one back-end in one round."""

    backend: str
    case: str
    completed: int
    seconds: float
    iops: float
    mbps: float
    latency_us: float
    cpu_us_per_req: float
    completions_per_irq: float
    kicks: int
    interrupts: int
    bad_status: int
    bad_data: int


def run_case(lib: ctypes.CDLL, backend: Backend, case: Case, image_bytes: int, seconds: float,
             max_requests: int = 0, seed: int = SEED) -> Result:
    """Connect to ``backend``, run ``case`` for ``seconds`` (or ``max_requests``
    per queue), disconnect."""
    opts = FrontendOptions(
        num_queues=case.queues, queue_size=QUEUE_SIZE, event_idx=True, packed=False, indirect=False,
        memory=((0, GUEST_RAM),), data_size=DATA_SIZE, backend_channel=False, inflight=False,
        device_features=int(BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH | BlkFeature.MQ),
        reply_timeout=10.0,
    )
    with MockFrontend.connect(backend.sock, opts, timeout=10.0) as fe:
        (gpa0, _size, _uva, host0), = fe.ram.memory.table()
        queues = []
        for k, v in enumerate(fe.vrings):
            drv = v.driver
            assert drv is not None
            bq = BenchQueue(
                desc=host0 + drv.desc_gpa - gpa0, avail=host0 + drv.driver_gpa - gpa0,
                used=host0 + drv.device_gpa - gpa0, data_gpa=v.data_gpa, data_host=host0 + v.data_gpa - gpa0,
                size=v.size, qd=case.qd, bs=case.bs, write=int(case.write), sequential=int(case.sequential),
                image_bytes=image_bytes, seed=seed, rng=0x9E3779B97F4A7C15 + 7919 * (k + 1) + time.time_ns(),
                seq_next=(image_bytes // case.queues // case.bs) * case.bs * k,
                kick_fd=v.kick.fileno(), call_fd=v.call.fileno(), seconds=seconds, max_requests=max_requests,
            )  # fmt: skip
            queues.append(bq)
        cpu0 = cpu_seconds(backend.pid)
        rcs = [0] * len(queues)

        def drive(k: int) -> None:
            rcs[k] = lib.bench_run(ctypes.byref(queues[k]))

        threads = [threading.Thread(target=drive, args=(k,)) for k in range(len(queues))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu1 = cpu_seconds(backend.pid)
    for k, (rc, bq) in enumerate(zip(rcs, queues)):
        if rc:
            raise RuntimeError(f"{backend.name} {case.name} queue {k}: driver failed: "
                               f"{os.strerror(bq.error)} (bad used entries {bq.bad_used})")
    done = sum(q.completed for q in queues)
    elapsed = max(q.elapsed_ns for q in queues) / 1e9
    irqs = sum(q.interrupts for q in queues)
    return Result(
        backend=backend.name, case=case.name, completed=done, seconds=elapsed,
        iops=done / elapsed, mbps=sum(q.bytes for q in queues) / elapsed / 1e6,
        latency_us=sum(q.latency_ns for q in queues) / max(done, 1) / 1e3,
        cpu_us_per_req=(cpu1 - cpu0) / max(done, 1) * 1e6,
        completions_per_irq=done / max(irqs, 1), kicks=sum(q.kicks for q in queues), interrupts=irqs,
        bad_status=sum(q.bad_status for q in queues), bad_data=sum(q.bad_data for q in queues),
    )


# ----------------------------------------------------------------- reporting
def summarize(results: list[Result], backends: list[str], cases: list[str]) -> str:
    """Medians per (case, back-end) and ratios to qemu-storage-daemon."""
    med: dict[tuple[str, str], dict[str, float]] = {}
    for c in cases:
        for b in backends:
            rs = [r for r in results if r.case == c and r.backend == b]
            if rs:
                med[c, b] = {k: statistics.median(getattr(r, k) for r in rs)
                             for k in ("iops", "mbps", "latency_us", "cpu_us_per_req", "completions_per_irq")}
    lines = [f"{'case':<22}{'back-end':<12}{'IOPS':>10}{'MB/s':>9}{'lat us':>9}{'CPU us/req':>12}"
             f"{'compl/irq':>11}{'IOPS/qsd':>10}{'lat/qsd':>9}{'CPU/qsd':>9}"]
    for c in cases:
        ref = med.get((c, "qsd"))
        for b in backends:
            m = med.get((c, b))
            if m is None:
                continue
            ratios = ""
            if ref:
                ratios = (f"{m['iops'] / ref['iops']:>10.2f}{m['latency_us'] / ref['latency_us']:>9.2f}"
                          f"{m['cpu_us_per_req'] / ref['cpu_us_per_req'] if ref['cpu_us_per_req'] else 0:>9.2f}")
            lines.append(f"{c:<22}{b:<12}{m['iops']:>10,.0f}{m['mbps']:>9.1f}{m['latency_us']:>9.1f}"
                         f"{m['cpu_us_per_req']:>12.2f}{m['completions_per_irq']:>11.1f}{ratios}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="per case, back-end and round (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--image-mib", type=int, default=256, help="image size in MiB (default 256)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {','.join(BACKENDS)}")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {','.join(CASES)}")
    ap.add_argument("--poll-ns", type=int, default=200_000, help="--poll-ns of the *-poll back-ends (default 200000)")
    ap.add_argument("--max-requests", type=int, default=0, help="stop each run after N requests per queue")
    ap.add_argument("--quick", action="store_true", help="1 round of 0.5 s")
    ap.add_argument("--json", metavar="PATH", help="write every result as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 0.5, 1
    backends = [b for b in args.backends.split(",") if b]
    cases = [c for c in args.cases.split(",") if c]
    for b in backends:
        if b not in (*BACKENDS, "python-poll"):
            ap.error(f"unknown back-end {b}")
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c}")
    image_bytes = args.image_mib * MiB
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    workdir = Path(tempfile.mkdtemp(prefix="vhu-blkbench-", dir=shm))
    results: list[Result] = []
    try:
        lib = build_driver(workdir)
        image = workdir / "disk.img"
        fill_image(lib, image, image_bytes)
        queues = max(CASES[c].queues for c in cases)
        with contextlib.ExitStack() as stack:
            running = {b: stack.enter_context(start_backend(b, image, workdir, queues, args.poll_ns))
                       for b in backends}
            for rnd in range(args.rounds):
                for c in cases:
                    order = backends[rnd % len(backends):] + backends[:rnd % len(backends)]
                    for b in order:
                        r = run_case(lib, running[b], CASES[c], image_bytes, args.seconds, args.max_requests)
                        results.append(r)
                        print(f"round {rnd + 1} {c:<22} {b:<11} {r.iops:>10,.0f} IOPS {r.latency_us:>8.1f} us "
                              f"{r.cpu_us_per_req:>7.2f} CPU us/req {r.completions_per_irq:>5.1f} compl/irq"
                              + (f"  BAD status {r.bad_status} data {r.bad_data}" if r.bad_status or r.bad_data
                                 else ""), flush=True)
        print()
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; image {args.image_mib} MiB on "
              f"{'tmpfs' if shm else 'the temp dir'}; {args.rounds} rounds of {args.seconds} s; medians")
        print(summarize(results, backends, cases))
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
        bad = sum(r.bad_status + r.bad_data for r in results)
        if bad:
            print(f"VERIFICATION FAILED: {bad} bad completions", file=sys.stderr)
            return 1
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
