"""The bundled virtio-rng device served by VhostUserDaemon, through the mock front-end."""
from __future__ import annotations

import os
import time

import pytest

from vhostuser.devices.rng import RngBackend
from vhostuser.protocol.message import VirtioFeatures as VF
from vhostuser.testing import FrontendOptions, MockFrontend

# QEMU 7.2's vhost-user-rng: 4 entries, and it acks INDIRECT/EVENT_IDX whatever is offered
QEMU_RNG = FrontendOptions(queue_size=4, mem_slots=False,
                           force_features=VF.RING_INDIRECT_DESC | VF.RING_EVENT_IDX,
                           memory=((0, 1 << 20), (2 << 20, 1 << 20)), data_size=64 << 10)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rng_returns_random_bytes(no_fd_leak, serve_backend, packed: bool) -> None:
    path = serve_backend(RngBackend())
    with MockFrontend.connect(path, QEMU_RNG.replace(packed=packed)) as fe:
        chunks = [fe.request(0, [], [64]) for _ in range(8)]
        assert all(c.length == 64 and len(c.data) == 64 for c in chunks)
        assert len({c.data for c in chunks}) == 8  # 512 random bits never repeat
        # several writable buffers in one chain, through an indirect table
        used = fe.request(0, [], [10, 20, 30], indirect=True)
        assert used.length == 60


def test_rng_file_source_bytes_equal_the_file(serve_backend, tmp_path) -> None:
    data = os.urandom(3000)
    source = tmp_path / "entropy.bin"
    source.write_bytes(data)
    path = serve_backend(RngBackend(str(source)))
    with MockFrontend.connect(path, QEMU_RNG) as fe:
        got = b"".join(u.data for u in fe.transfer(0, [([], [100])] * 30))
    assert got == data


def test_rng_rate_limit_delays_but_delivers(serve_backend) -> None:
    period_ms, max_bytes = 150, 100
    backend = RngBackend(period_ms=period_ms, max_bytes=max_bytes)
    path = serve_backend(backend)
    with MockFrontend.connect(path, QEMU_RNG) as fe:
        t0 = time.monotonic()
        used = fe.transfer(0, [([], [max_bytes])] * 4, timeout=5)
        elapsed = time.monotonic() - t0
    assert [u.length for u in used] == [max_bytes] * 4
    # 400 bytes at 100 per period: at least three period boundaries had to pass
    assert elapsed >= 3 * period_ms / 1000 * 0.9
    assert backend.bytes_served == 4 * max_bytes


def test_rng_quota_splits_a_large_request(serve_backend) -> None:
    backend = RngBackend(period_ms=100, max_bytes=64)
    path = serve_backend(backend)
    with MockFrontend.connect(path, QEMU_RNG) as fe:
        used = fe.request(0, [], [200], timeout=5)
    assert used.length == 64  # a chain gets what the quota allows, at once
