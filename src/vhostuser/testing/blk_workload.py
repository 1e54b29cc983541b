"""The guest workload of the live-migration tests: O_DIRECT reads into buffers
the guest keeps, and writes, at queue depth > 1, on a virtio-blk disk.

The guest program is ``guest_programs/blk_workload.c`` (built static with
:func:`~vhostuser.testing.guest.build_static_program`; its header documents the
disk layout).  The host side here makes the image, writes the stop marker, tells
a disk block from other RAM (to say whether a page that differs after migration
lies in a buffer the back-end wrote) and parses the program's report.

Because the program's CPU never writes a read buffer (the back-end fills it by
DMA), QEMU's own dirty tracking never sees those pages change: only the
back-end's dirty log does.  A back-end that forgets to log them leaves stale
pages on the destination, which :func:`~vhostuser.testing.migration.compare_ram`
and the program's final check both find.
"""
from __future__ import annotations

import array
import dataclasses
import os
import re
import struct
from pathlib import Path

from .guest import build_static_program

__all__ = ["SOURCE", "GUEST_BIN", "BlkWorkload", "WorkloadReport", "is_read_block"]

SOURCE = Path(__file__).parent / "guest_programs" / "blk_workload.c"
GUEST_BIN = "/root/blk_workload"
BLOCK = 4096
STOP_MARKER = b"VHUSTOP!"
_READ_XOR = 0xA5C3E1F7
_WORDS = BLOCK // 4
_WORD = struct.Struct("<I")


def _read_area(blocks: int) -> bytes:
    """pattern(b) for b in [0, blocks): word n (= b * 1024 + i) is n ^ READ_XOR."""
    words = array.array("I", range(blocks * _WORDS))
    if words.itemsize != 4:  # pragma: no cover - every supported platform has a 4-byte "I"
        raise RuntimeError("array 'I' is not 32-bit here")
    raw = words.tobytes()
    mask = _WORD.pack(_READ_XOR) * (blocks * _WORDS)
    return (int.from_bytes(raw, "little") ^ int.from_bytes(mask, "little")).to_bytes(len(raw), "little")


def is_read_block(page: bytes) -> bool:
    """True if ``page`` (4 KiB) is a block of the read area, i.e. data the back-end
    copied into guest RAM for a read."""
    if len(page) != BLOCK:
        return False
    first = _WORD.unpack_from(page)[0] ^ _READ_XOR
    if first & (_WORDS - 1):
        return False
    expected = array.array("I", range(first, first + _WORDS)).tobytes()
    mask = _WORD.pack(_READ_XOR) * _WORDS
    return page == (int.from_bytes(expected, "little") ^ int.from_bytes(mask, "little")).to_bytes(BLOCK, "little")


@dataclasses.dataclass(frozen=True)
class WorkloadReport:
    """The program's final line: I/O done, what it checked, what was wrong."""

    reads: int
    writes: int
    slots: int
    checked_writes: int
    bad_slots: int
    bad_writes: int

    @classmethod
    def parse(cls, output: str) -> WorkloadReport:
        """Find the report in the guest's output (ValueError if absent)."""
        m = re.search(r"reads=(\d+) writes=(\d+) slots=(\d+) checked_writes=(\d+) bad_slots=(\d+) "
                      r"bad_writes=(\d+)", output)
        if m is None:
            raise ValueError(f"no workload report in the guest output:\n{output}")
        return cls(*(int(g) for g in m.groups()))

    @property
    def ok(self) -> bool:
        """Everything held and written was right."""
        return self.bad_slots == 0 and self.bad_writes == 0


@dataclasses.dataclass(frozen=True)
class BlkWorkload:
    """Sizes of one workload run.

    ``threads`` = requests in flight (queue depth); each thread keeps ``slots``
    read buffers of ``io_kib`` KiB (4 x 32 x 64 KiB = 8 MiB of buffers by default).
    """

    read_blocks: int = 8192
    write_blocks: int = 1024
    threads: int = 4
    slots: int = 32
    io_kib: int = 64

    @property
    def stop_block(self) -> int:
        """The block the host writes :data:`STOP_MARKER` into."""
        return self.read_blocks + self.write_blocks

    @property
    def image_size(self) -> int:
        """Bytes: read area, write area, stop block."""
        return (self.stop_block + 1) * BLOCK

    def make_image(self, path: Path) -> Path:
        """Write a fresh image: the read pattern, a zeroed write area and stop block."""
        with open(path, "wb") as f:
            f.write(_read_area(self.read_blocks))
            f.truncate(self.image_size)
        return path

    def stop(self, image: Path) -> None:
        """Write the stop marker: the program stops, checks and reports."""
        self._write_stop_block(image, STOP_MARKER)

    def clear_stop(self, image: Path) -> None:
        """Remove the stop marker (to run the program again on the same image)."""
        self._write_stop_block(image, bytes(len(STOP_MARKER)))

    def _write_stop_block(self, image: Path, data: bytes) -> None:
        fd = os.open(image, os.O_WRONLY)
        try:
            os.pwrite(fd, data, self.stop_block * BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)

    def script(self, device: str = "/dev/vda") -> str:
        """The guest script: run the program on ``device``."""
        return (f"{GUEST_BIN} {device} {self.read_blocks} {self.write_blocks} {self.threads} "
                f"{self.slots} {self.io_kib}\n")

    @staticmethod
    def extra_files() -> dict[str, str | os.PathLike[str]]:
        """The program for ``extra_files`` (compiled on first use)."""
        return {GUEST_BIN: build_static_program(SOURCE)}
