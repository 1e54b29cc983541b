"""``BlockImage``: the host side of the disk - a raw image file or a block device.

Everything that touches the image lives here, so the request engine never does
raw I/O and can never reach outside ``[0, capacity)`` by accident:

* vectored, zero-copy I/O (``os.preadv``/``os.pwritev`` straight into / out of
  the memoryviews of guest buffers), looping over short transfers and over
  ``IOV_MAX``;
* ``O_DIRECT``: guest buffers are used in place when every buffer's address
  and length are aligned to :attr:`BlockImage.direct_alignment`; otherwise the
  data goes through a per-thread, page-aligned bounce buffer.  A request whose
  offset or length is not aligned (a guest that ignores ``blk_size``) goes
  through a second, buffered fd of the same image;
* discard (``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``, via
  ctypes since :mod:`os` has only ``posix_fallocate``) and write-zeroes
  (``FALLOC_FL_ZERO_RANGE`` or a punched hole), each falling back to writing
  zeros where the file system or OS cannot;
* an advisory ``flock`` (shared for read-only, exclusive otherwise) so that two
  back-ends never write one image.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ...errors import BlkImageError
from ...sys_util import fileops
from ...sys_util.shm import buffer_address
from ...sys_util.fileops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    O_DIRECT,
    block_sector_size,
    lock_file,
)

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

_IOV_MAX = 1024
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX-complete
    pass
_ZERO_CHUNK = 1 << 20


def _buffer_address(view: memoryview) -> int | None:
    """The address of a writable buffer's first byte, or None (read-only or exotic)."""
    if view.readonly:
        return None
    try:
        return buffer_address(view)
    except (TypeError, ValueError):
        return None


def _transfer_all(op, fd: int, views: Sequence[memoryview], offset: int) -> int:  # noqa: ANN001
    """Run ``op`` (os.preadv / os.pwritev) until every byte of ``views`` moved.

    Returns the byte count, short only at end of file (reads).  Splits the vector
    into ``IOV_MAX`` pieces and restarts after short transfers.
    """
    pending = [v for v in views if v.nbytes]
    done = 0
    while pending:
        batch = pending[:_IOV_MAX]
        n = op(fd, batch, offset + done)
        if n == 0:
            if op is os.pwritev:
                raise OSError(errno.EIO, "pwritev() wrote nothing")
            break  # end of file
        done += n
        # drop what moved; keep the tail of a partially moved view
        k = 0
        while k < len(batch) and n >= batch[k].nbytes:
            n -= batch[k].nbytes
            k += 1
        rest = pending[k:]
        if n:
            rest[0] = rest[0][n:]
        pending = rest
    return done


class BlockImage:
    """A raw image (regular file or block device) opened for the device.

    ``path``: the file or block device.  ``read_only`` opens it ``O_RDONLY``.
    ``direct`` adds ``O_DIRECT`` (see module docs).  ``lock`` takes an advisory
    ``flock`` (shared when read-only, exclusive otherwise) and fails at once if
    another process holds a conflicting one.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False, direct: bool = False,
                 lock: bool = True) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.direct = direct
        if direct and not O_DIRECT:
            raise BlkImageError("O_DIRECT is not available on this system (drop --direct)")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags | (O_DIRECT if direct else 0))
        except OSError as exc:
            raise BlkImageError(f"cannot open {self.path}: {exc.strerror}") from exc
        self._buffered_fd: int | None = None
        self._local = threading.local()
        self._zeros: mmap.mmap | None = None
        self._lock = threading.Lock()
        self._bounces: list[mmap.mmap] = []
        #: O_DIRECT transfers that went through the bounce buffer (misaligned
        #: guest buffers) and through the buffered fd (misaligned offset/length)
        self.bounced = 0
        self.unaligned = 0
        self._closed = False
        try:
            st = os.fstat(self.fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if self.is_block_device:
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
                self.logical_block_size = self._blkssz()
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
                self.logical_block_size = SECTOR_SIZE
            else:
                raise BlkImageError(f"{self.path} is neither a regular file nor a block device")
            if lock:
                if not lock_file(self.fd, shared=read_only):
                    raise BlkImageError(f"{self.path} is in use by another process (flock)")
            self.direct_alignment = 1
            if direct:
                self.direct_alignment = max(self.logical_block_size, self._probe_direct_alignment())
                self.logical_block_size = self.direct_alignment
                self._buffered_fd = os.open(self.path, flags)
        except BaseException:
            self.close()
            raise
        log.info("image %s: %d bytes (%d sectors), %s%s%s", self.path, self.size, self.capacity,
                 "block device" if self.is_block_device else "file", ", read-only" if read_only else "",
                 f", O_DIRECT (alignment {self.direct_alignment})" if direct else "")

    # --------------------------------------------------------------- geometry
    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors (a trailing partial sector is not addressable)."""
        return self.size >> SECTOR_SHIFT

    @property
    def can_fallocate(self) -> bool:
        """fallocate(2) exists here (punch hole / zero range may still be refused per file)."""
        return fileops.HAVE_FALLOCATE and not self.read_only

    def _blkssz(self) -> int:
        return block_sector_size(self.fd, SECTOR_SIZE)

    def _probe_direct_alignment(self) -> int:
        """The smallest power-of-two alignment O_DIRECT reads accept (512..4096)."""
        buf = mmap.mmap(-1, 2 * mmap.PAGESIZE)
        try:
            for align in (512, 1024, 2048, 4096):
                view = memoryview(buf)[align:2 * align]  # aligned to align, not to 2*align
                try:
                    os.preadv(self.fd, [view], 0)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise BlkImageError(f"{self.path}: O_DIRECT read failed: {exc.strerror}") from exc
                finally:
                    view.release()
            return 4096
        finally:
            buf.close()

    def check_range(self, offset: int, length: int) -> bool:
        """Is ``[offset, offset+length)`` inside the image?"""
        return 0 <= offset and 0 <= length and offset + length <= self.capacity << SECTOR_SHIFT

    def _require_range(self, offset: int, length: int) -> None:
        if not self.check_range(offset, length):
            raise BlkImageError(f"I/O [{offset}, +{length}) outside the {self.capacity}-sector image")

    def _require_writable(self) -> None:
        if self.read_only:
            raise BlkImageError(f"{self.path} is read-only")

    # -------------------------------------------------------------- O_DIRECT
    def _aligned(self, offset: int, length: int) -> bool:
        return (offset | length) % self.direct_alignment == 0

    def _views_aligned(self, views: Sequence[memoryview]) -> bool:
        a = self.direct_alignment
        for v in views:
            if v.nbytes % a:
                return False
            addr = _buffer_address(v)
            if addr is None or addr % a:
                return False
        return True

    @contextmanager
    def _bounce(self, n: int) -> Iterator[memoryview]:
        """A page-aligned scratch buffer of ``n`` bytes, one per thread, grown on demand."""
        self.bounced += 1
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            size = max(n + mmap.PAGESIZE - 1, mmap.PAGESIZE) // mmap.PAGESIZE * mmap.PAGESIZE
            new = mmap.mmap(-1, size)
            with self._lock:
                if buf is not None:
                    self._bounces.remove(buf)
                    buf.close()
                self._bounces.append(new)
            buf = self._local.buf = new
        view = memoryview(buf)[:n]
        try:
            yield view
        finally:
            view.release()

    # -------------------------------------------------------------------- I/O
    def readv(self, views: Sequence[memoryview], offset: int) -> int:
        """Read ``sum(len(v))`` bytes at ``offset`` into ``views`` (zero-copy when it can).

        Returns the byte count; raises :class:`OSError` on I/O errors and
        :class:`BlkImageError` if the range is outside the image.
        """
        n = sum(v.nbytes for v in views)
        self._require_range(offset, n)
        if not self.direct:
            return _transfer_all(os.preadv, self.fd, views, offset)
        if not self._aligned(offset, n):
            assert self._buffered_fd is not None
            self.unaligned += 1
            return _transfer_all(os.preadv, self._buffered_fd, views, offset)
        if self._views_aligned(views):
            try:
                return _transfer_all(os.preadv, self.fd, views, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.debug("O_DIRECT preadv refused the guest buffers (EINVAL); using the bounce buffer")
        with self._bounce(n) as bounce:
            got = _transfer_all(os.preadv, self.fd, [bounce], offset)
            pos = 0
            for v in views:
                take = min(v.nbytes, got - pos)
                if take <= 0:
                    break
                v[:take] = bounce[pos:pos + take]
                pos += take
            return got

    def writev(self, views: Sequence[memoryview], offset: int) -> int:
        """Write ``views`` at ``offset`` (zero-copy when it can); returns the byte count."""
        self._require_writable()
        n = sum(v.nbytes for v in views)
        self._require_range(offset, n)
        if not self.direct:
            return _transfer_all(os.pwritev, self.fd, views, offset)
        if not self._aligned(offset, n):
            assert self._buffered_fd is not None
            self.unaligned += 1
            return _transfer_all(os.pwritev, self._buffered_fd, views, offset)
        if self._views_aligned(views):
            try:
                return _transfer_all(os.pwritev, self.fd, views, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.debug("O_DIRECT pwritev refused the guest buffers (EINVAL); using the bounce buffer")
        with self._bounce(n) as bounce:
            pos = 0
            for v in views:
                bounce[pos:pos + v.nbytes] = v
                pos += v.nbytes
            return _transfer_all(os.pwritev, self.fd, [bounce], offset)

    def read(self, offset: int, length: int) -> bytes:
        """Convenience copy of ``length`` bytes (tests, tools)."""
        buf = bytearray(length)
        got = self.readv([memoryview(buf)], offset)
        return bytes(buf[:got])

    def write(self, offset: int, data: bytes) -> int:
        """Convenience write of ``data`` (tests, tools)."""
        return self.writev([memoryview(bytearray(data))], offset)

    def flush(self) -> None:
        """Make written data durable (``fdatasync``; ``fsync`` where there is none)."""
        sync = getattr(os, "fdatasync", os.fsync)
        sync(self.fd)

    # ------------------------------------------------------- discard / zeroes
    def _zero_buffer(self) -> memoryview:
        with self._lock:
            if self._zeros is None:
                self._zeros = mmap.mmap(-1, _ZERO_CHUNK)  # anonymous: zero-filled, page-aligned
            return memoryview(self._zeros)

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = self._zero_buffer()
        try:
            while length > 0:
                n = min(length, len(zeros))
                self.writev([zeros[:n]], offset)
                offset += n
                length -= n
        finally:
            zeros.release()

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """fallocate; False if the OS / file system does not support ``mode``."""
        if not fileops.HAVE_FALLOCATE:
            return False
        try:
            fileops.fallocate(self.fd, mode, offset, length)
            return True
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY):
                log.debug("fallocate(mode=%#x) not supported on %s: %s", mode, self.path, exc.strerror)
                return False
            raise

    def discard(self, offset: int, length: int) -> None:
        """Deallocate ``[offset, offset+length)`` (reads return zeros afterwards).

        Punches a hole; where that is impossible, writes zeros.
        """
        self._require_writable()
        self._require_range(offset, length)
        if length == 0:
            return
        if not self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            self._write_zeros(offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make ``[offset, offset+length)`` read as zeros; ``unmap`` allows
        deallocating it (a punched hole) instead of allocating zeroed blocks."""
        self._require_writable()
        self._require_range(offset, length)
        if length == 0:
            return
        if unmap and self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if self._try_fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        self._write_zeros(offset, length)

    # -------------------------------------------------------------- lifecycle
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close the fds and free the scratch buffers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for name in ("fd", "_buffered_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        with self._lock:
            for buf in self._bounces:
                buf.close()
            self._bounces.clear()
        if self._zeros is not None:
            self._zeros.close()
            self._zeros = None

    def __enter__(self) -> BlockImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BlockImage {self.path!r} {self.capacity} sectors{' ro' if self.read_only else ''}>"
