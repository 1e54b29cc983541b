"""What the conformance checker knows about device classes: how to make a
request a back-end of that class must answer, and how to tell a right answer.

A :class:`DeviceProfile` turns request number ``i`` into the buffers of one
chain (``readable`` contents, ``writable`` sizes) and checks the used buffer.
Without a profile the checker exercises the control plane only.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .frontend import FrontendOptions, MockFrontend, UsedBuffer

__all__ = ["DeviceProfile", "EchoProfile", "RngProfile", "BlkProfile", "PROFILES"]

Request = tuple[Sequence[bytes], Sequence[int]]


@dataclass
class DeviceProfile:
    """Base class: one request queue, no device-specific features."""

    name: str = "generic"
    #: the queue requests go to
    queue: int = 0

    def options(self, base: FrontendOptions) -> FrontendOptions:
        """Front-end options this device class needs."""
        return base

    def prepare(self, fe: MockFrontend) -> None:
        """Called once the rings run (e.g. read config space)."""

    def make_request(self, i: int) -> Request:
        """The ``i``-th request."""
        raise NotImplementedError

    def check(self, i: int, used: UsedBuffer) -> str | None:
        """None if ``used`` is a right answer to request ``i``, else what is wrong."""
        raise NotImplementedError

    def device_check(self, fe: MockFrontend) -> str:
        """The device-class check (``--device``): raise AssertionError on failure;
        return a one-line summary."""
        for i in range(4):
            used = fe.request(self.queue, *self.make_request(i))
            problem = self.check(i, used)
            if problem:
                raise AssertionError(problem)
        return "4 requests answered correctly"


@dataclass
class EchoProfile(DeviceProfile):
    """:class:`~vhostuser.testing.echo.EchoBackend`: the reply is the request."""

    name: str = "echo"

    def make_request(self, i: int) -> Request:
        data = bytes([i & 0xFF]) * (16 + i % 48)
        return [data], [len(data)]

    def check(self, i: int, used: UsedBuffer) -> str | None:
        want = self.make_request(i)[0][0]
        return None if used.data == want else f"echo {i}: got {used.data[:16]!r}..., want {want[:16]!r}..."


@dataclass
class RngProfile(DeviceProfile):
    """virtio-rng: writable buffers come back filled."""

    name: str = "rng"
    size: int = 64

    def make_request(self, i: int) -> Request:
        return [], [self.size]

    def check(self, i: int, used: UsedBuffer) -> str | None:
        if used.length <= 0 or used.length > self.size:
            return f"rng request {i}: used length {used.length} (buffer {self.size})"
        return None

    def device_check(self, fe: MockFrontend) -> str:
        got = [fe.request(self.queue, *self.make_request(i)) for i in range(4)]
        for i, used in enumerate(got):
            problem = self.check(i, used)
            if problem:
                raise AssertionError(problem)
        data = b"".join(u.data for u in got)
        if data.count(0) == len(data):
            raise AssertionError(f"{len(data)} bytes of entropy, all zero")
        if len({u.data for u in got}) < len(got):
            raise AssertionError("two 64-byte entropy buffers were identical")
        return f"{len(data)} random bytes in 4 requests"


VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_S_OK = 0
_BLK_HDR = struct.Struct("<IIQ")
SECTOR = 512


@dataclass
class BlkProfile(DeviceProfile):
    """virtio-blk: reads of sector ``i % capacity``; the device check writes a
    sector through the ring and reads it back."""

    name: str = "blk"
    capacity: int = 0

    def options(self, base: FrontendOptions) -> FrontendOptions:
        return base.replace(config_size=8)

    def prepare(self, fe: MockFrontend) -> None:
        config = fe.config if fe.config else fe.get_config(0, 8)
        self.capacity = struct.unpack_from("<Q", config)[0]

    def make_request(self, i: int) -> Request:
        sector = i % max(1, self.capacity)
        return [_BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, sector)], [SECTOR, 1]

    def check(self, i: int, used: UsedBuffer) -> str | None:
        if used.length < 1:
            return f"blk read {i}: used length {used.length}"
        status = used.data[used.length - 1] if len(used.data) >= used.length else None
        if status != VIRTIO_BLK_S_OK:
            return f"blk read {i}: status {status}"
        return None

    def device_check(self, fe: MockFrontend) -> str:
        if not self.capacity:
            self.prepare(fe)
        if self.capacity < 2:
            raise AssertionError(f"capacity {self.capacity} sectors: too small to test")
        sector = min(self.capacity - 1, 7)
        pattern = bytes((sector * 31 + k) & 0xFF for k in range(SECTOR))
        w = fe.request(self.queue, [_BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, sector), pattern], [1])
        if w.length < 1 or w.data[:1] != bytes([VIRTIO_BLK_S_OK]):
            raise AssertionError(f"write of sector {sector}: used length {w.length}, status {w.data[:1]!r}")
        r = fe.request(self.queue, [_BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, sector)], [SECTOR, 1])
        if r.length != SECTOR + 1 or r.data[-1:] != bytes([VIRTIO_BLK_S_OK]):
            raise AssertionError(f"read of sector {sector}: used length {r.length}, status {r.data[-1:]!r}")
        if r.data[:SECTOR] != pattern:
            raise AssertionError(f"sector {sector} read back differs from what was written")
        return f"capacity {self.capacity} sectors; sector {sector} written and read back"


#: ``--device`` choices
PROFILES: dict[str, type[DeviceProfile]] = {"echo": EchoProfile, "rng": RngProfile, "blk": BlkProfile}
