"""Issue 10: a front-end that shrinks guest memory (or the dirty log) after
handing it over cannot kill the daemon (docs/robustness.md).

With the C core, an access to the missing part raises SIGBUS inside a guarded
C call: the queue fails with GuestMemoryFault and the daemon keeps serving.
The pure-Python core cannot recover from SIGBUS: it warns about (or, on
request, refuses) fds that are not sealed against shrinking."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from vhostuser import _impl, memory_guard
from vhostuser.devices.blk import BlkBackend
from vhostuser.devices.blk.engine import OUTHDR, RequestType, Status
from vhostuser.devices.rng import RngBackend
from vhostuser.errors import GuestMemoryError, GuestMemoryFault
from vhostuser.memory import DirtyLog, MemoryRegion
from vhostuser.sys_util.shm import create_shm_fd, shrink_sealed
from vhostuser.testing import FrontendOptions, MockFrontend

NATIVE = _impl.IMPL == "native"
MiB = 1 << 20
#: one 4 MiB region; the rings and the driver's data area sit in its first MiB
OPTS = FrontendOptions(queue_size=16, memory=((0, 4 * MiB),), data_size=64 * 1024, mem_slots=False)
MISSING = 3 * MiB  # a gpa in the part we cut off


def _shrink(fe: MockFrontend, size: int = MiB) -> None:
    (fd,) = set(fe.ram.fds())
    for v in fe.vrings:
        assert v.ring_gpa + v.ring_bytes + v.data_size <= size  # the rings stay intact
    os.ftruncate(fd, size)


def _wait_failed(daemon, index: int = 0, timeout: float = 10.0) -> BaseException:  # noqa: ANN001
    vring = daemon.handler.vrings[index]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with vring.lock:
            if vring.failed is not None:
                return vring.failed
        time.sleep(0.02)
    raise AssertionError("the queue did not fail")


def _fault_in_chain(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, GuestMemoryFault):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _python_core_warns(path: str, caplog: pytest.LogCaptureFixture) -> None:
    """The pure-Python core: no shrinking (it would kill us); the unsealed fd is
    accepted with a warning."""
    memory_guard._warned = False
    with caplog.at_level(logging.WARNING, logger="vhostuser.memory_guard"), MockFrontend.connect(path, OPTS) as fe:
        assert fe.connected
    assert any("not sealed against shrinking" in r.getMessage() for r in caplog.records)


def test_rng_survives_guest_memory_shrunk_under_it(serve_backend, caplog) -> None:
    backend = RngBackend()
    path = serve_backend(backend)
    if not NATIVE:
        _python_core_warns(path, caplog)
        return
    daemon = serve_backend.daemon_of(backend)
    faults = memory_guard.recovered_faults()
    with MockFrontend.connect(path, OPTS) as fe:
        _shrink(fe)
        fe.driver(0).add_buffers([(MISSING, 4096, True)])
        fe.publish(0, force_kick=True)
        assert _fault_in_chain(_wait_failed(daemon))
    assert memory_guard.recovered_faults() > faults
    with MockFrontend.connect(path, OPTS) as fe:  # the daemon keeps serving
        assert fe.request(0, [], [64]).length == 64


def test_blk_survives_guest_memory_shrunk_under_it(serve_backend, caplog, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    backend = BlkBackend(image)
    path = serve_backend(backend)
    if not NATIVE:
        _python_core_warns(path, caplog)
        return
    daemon = serve_backend.daemon_of(backend)
    with MockFrontend.connect(path, OPTS) as fe:
        _shrink(fe)
        drv = fe.driver(0)
        header = drv.alloc(OUTHDR.size)
        fe.ram.memory.write(header, OUTHDR.pack(RequestType.IN, 0, 0))
        status = drv.alloc(1)
        # the data buffer is gone: the read fails (EFAULT from the kernel), the queue lives
        drv.add_buffers([(header, OUTHDR.size, False), (MISSING, 4096, True), (status, 1, True)])
        fe.publish(0, force_kick=True)
        (used,) = fe.wait_used(0)
        assert used.length == 1 and fe.ram.memory.read(status, 1)[0] == Status.IOERR
        # the status byte is gone: the queue fails, the daemon lives
        drv.add_buffers([(header, OUTHDR.size, False), (MISSING, 1, True)])
        fe.publish(0, force_kick=True)
        assert _fault_in_chain(_wait_failed(daemon))
    with MockFrontend.connect(path, OPTS) as fe:  # the daemon keeps serving
        assert fe.request(0, [OUTHDR.pack(RequestType.GET_ID, 0, 0)], [20, 1]).length == 21


def test_a_shrunk_dirty_log_fails_the_queue_not_the_daemon(serve_backend, caplog) -> None:
    backend = RngBackend()
    path = serve_backend(backend)
    if not NATIVE:
        _python_core_warns(path, caplog)
        return
    daemon = serve_backend.daemon_of(backend)
    with MockFrontend.connect(path, OPTS) as fe:
        fe.enable_dirty_log()
        assert fe.request(0, [], [64]).length == 64
        os.ftruncate(fe._log_fd, 0)  # type: ignore[arg-type]
        fe.add(0, [], [64])
        fe.publish(0, force_kick=True)
        assert _fault_in_chain(_wait_failed(daemon))
    with MockFrontend.connect(path, OPTS) as fe:
        assert fe.request(0, [], [64]).length == 64


def _sealed_memfd(size: int) -> int:
    fd = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)  # type: ignore[attr-defined]
    os.ftruncate(fd, size)
    import fcntl

    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)  # type: ignore[attr-defined]
    return fd


def test_mapping_policy_sealed_unsealed_and_too_short(monkeypatch, caplog) -> None:
    if hasattr(os, "memfd_create"):  # a sealed memfd cannot shrink: accepted, nothing to guard
        fd = _sealed_memfd(MiB)
        assert shrink_sealed(fd)
        region = MemoryRegion.from_fd(fd, 0, MiB)
        assert not region._guarded
        region.close()
    fd = create_shm_fd(MiB)
    assert not shrink_sealed(fd)
    with pytest.raises(GuestMemoryError):  # larger than its file: it would fault at once
        MemoryRegion.from_fd(os.dup(fd), 0, 2 * MiB)
    with pytest.raises(GuestMemoryError):
        DirtyLog.from_fd(os.dup(fd), 4096, MiB)
    monkeypatch.setenv(memory_guard.ENV_VAR, "refuse")
    if NATIVE:  # guarded by the C core: the policy does not apply
        region = MemoryRegion.from_fd(fd, 0, MiB)
        assert region._guarded
        region.close()
        return
    with pytest.raises(GuestMemoryError, match="not sealed"):
        MemoryRegion.from_fd(os.dup(fd), 0, MiB)
    monkeypatch.setenv(memory_guard.ENV_VAR, "warn")
    memory_guard._warned = False
    with caplog.at_level(logging.WARNING, logger="vhostuser.memory_guard"):
        MemoryRegion.from_fd(fd, 0, MiB).close()
    assert any("not sealed" in r.getMessage() for r in caplog.records)
