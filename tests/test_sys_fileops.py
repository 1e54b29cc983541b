"""sys_util.fileops: hole punching and block-device geometry, with their fallbacks."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vhostuser.sys_util import fileops


def test_punching_a_hole_frees_blocks_and_reads_zeros(tmp_path: Path) -> None:
    if not fileops.HAVE_FALLOCATE:
        pytest.fail("fallocate() is expected on Linux")
    path = tmp_path / "f"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDWR)
    try:
        before = os.fstat(fd).st_blocks
        fileops.fallocate(fd, fileops.FALLOC_FL_PUNCH_HOLE | fileops.FALLOC_FL_KEEP_SIZE, 0, 512 << 10)
        assert os.fstat(fd).st_size == 1 << 20
        assert os.fstat(fd).st_blocks < before
        assert os.pread(fd, 512 << 10, 0) == bytes(512 << 10)
    finally:
        os.close(fd)


def test_without_fallocate_the_error_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fileops, "_fallocate", None)
    fd = os.open(tmp_path / "g", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError) as exc:
            fileops.fallocate(fd, fileops.FALLOC_FL_PUNCH_HOLE | fileops.FALLOC_FL_KEEP_SIZE, 0, 4096)
        assert exc.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_sector_size_of_a_regular_file_is_the_default(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "h", os.O_RDWR | os.O_CREAT)
    try:
        assert fileops.block_sector_size(fd) == 512
        assert fileops.block_sector_size(fd, 4096) == 4096
    finally:
        os.close(fd)
