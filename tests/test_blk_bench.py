"""Smoke test of benchmarks/blk_bench.py at a tiny size: its C driver really
drives ``vhostuser blk`` (the implementation of this run) and qemu-storage-daemon,
every completion is verified, writes land in the image, and a wrong data
pattern is caught.  Not a timing test: no speed is asserted."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.qsd import qsd_binary

from vhostuser import _impl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import blk_bench  # noqa: E402

IMAGE = 4 << 20
REQUESTS = 150


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return blk_bench.build_driver(tmp_path_factory.mktemp("driver"))


@pytest.fixture
def image(lib, tmp_path: Path) -> Path:  # noqa: ANN001
    path = tmp_path / "disk.img"
    blk_bench.fill_image(lib, path, IMAGE)
    return path


#: qemu-storage-daemon does not depend on the implementation: driven in the native run only
PEERS = ["vhostuser", "vhostuser-poll"] + ([pytest.param("qsd", marks=pytest.mark.qsd)] if _impl.IMPL == "native" else [])


@pytest.fixture(params=PEERS)
def backend(request: pytest.FixtureRequest, image: Path, tmp_path: Path) -> Iterator[blk_bench.Backend]:
    name = {"vhostuser": _impl.IMPL, "vhostuser-poll": f"{_impl.IMPL}-poll", "qsd": "qsd"}[request.param]
    if name == "qsd":
        qsd_binary()  # fails (never skips) when qemu-storage-daemon is missing
    with blk_bench.start_backend(name, image, tmp_path, queues=2) as b:
        yield b


@pytest.mark.parametrize("case", list(blk_bench.CASES))
def test_every_case_completes_verified(lib, backend: blk_bench.Backend, case: str) -> None:  # noqa: ANN001
    c = blk_bench.CASES[case]
    r = blk_bench.run_case(lib, backend, c, IMAGE, seconds=30.0, max_requests=REQUESTS)
    assert r.completed == REQUESTS * c.queues
    assert r.bad_status == 0 and r.bad_data == 0
    assert r.iops > 0 and r.latency_us > 0 and r.mbps > 0
    assert r.cpu_us_per_req >= 0
    # an interrupt may be spurious (a signal left from the ring's start-up); one
    # eventfd read may collect several signals, and a driver that finds its
    # completions before it sleeps needs none at all
    assert r.interrupts <= r.completed + 2 * c.queues and r.kicks >= 1
    assert r.completions_per_irq >= 0.5


def test_wrong_data_is_caught_and_writes_land(lib, backend: blk_bench.Backend, image: Path) -> None:  # noqa: ANN001
    read = blk_bench.CASES["randread-4k-qd32"]
    r = blk_bench.run_case(lib, backend, read, IMAGE, seconds=30.0, max_requests=64, seed=1)
    assert r.completed == 0 and r.bad_data == 64 and r.bad_status == 0
    # random writes with a new pattern: every 4 KiB block holds the old or the new one
    new_seed = 0xABCDEF
    write = blk_bench.CASES["randwrite-4k-qd32"]
    w = blk_bench.run_case(lib, backend, write, IMAGE, seconds=30.0, max_requests=64, seed=new_seed)
    assert w.completed == 64 and w.bad_status == 0
    data = image.read_bytes()
    old = new = 0
    for blk in range(IMAGE // 4096):
        off = blk * 4096
        words = [int.from_bytes(data[off + 8 * k: off + 8 * k + 8], "little") for k in (0, 511)]
        if words == [lib.bench_pattern(off, blk_bench.SEED), lib.bench_pattern(off + 4088, blk_bench.SEED)]:
            old += 1
        elif words == [lib.bench_pattern(off, new_seed), lib.bench_pattern(off + 4088, new_seed)]:
            new += 1
    assert old + new == IMAGE // 4096
    assert 1 <= new <= 64
