"""DescriptorChain (one request popped from a queue) and the Reader/Writer
cursors over its device-readable and device-writable buffers."""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from typing import Any

from ..errors import ChainTooShort
from ..memory import GuestMemory
from ._core import get_core

log = logging.getLogger(__name__)

#: Test-only negative control of the live-migration tests (docs/migration.md):
#: ``VHOSTUSER_TEST_SKIP_DATA_LOG=1`` makes the back-end NOT mark the buffers it
#: writes in the dirty log (the rings are still logged), so a migrated guest gets
#: stale data pages.  Read once, at import.  Never set it outside that test.
SKIP_DATA_LOG_ENV = "VHOSTUSER_TEST_SKIP_DATA_LOG"
_SKIP_DATA_LOG = os.environ.get(SKIP_DATA_LOG_ENV, "") == "1"
if _SKIP_DATA_LOG:
    log.warning("%s=1: written buffers are NOT dirty-logged (test-only negative control; "
                "live migration will corrupt guests)", SKIP_DATA_LOG_ENV)

__all__ = ["DescriptorChain", "Reader", "Writer"]

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_new = object.__new__


class _Cursor:
    """A byte cursor over buffers ``addrs[start:end]``/``lens[...]`` in guest memory."""

    __slots__ = ("memory", "_addrs", "_lens", "_j", "_end", "_off", "_remaining", "_done", "_core")

    def __init__(self, mem: GuestMemory, addrs: Sequence[int], lens: Sequence[int], start: int, count: int, total: int) -> None:
        self.memory = mem
        self._addrs = addrs
        self._lens = lens
        self._j = start
        self._end = start + count
        self._off = 0
        self._remaining = total
        self._done = 0
        self._core = get_core()

    @property
    def available_bytes(self) -> int:
        """Bytes left between the cursor and the end of the buffers."""
        return self._remaining

    def _advance(self, n: int) -> None:
        self._remaining -= n
        self._done += n
        off = self._off + n
        lens = self._lens
        while self._j < self._end and off >= lens[self._j]:
            off -= lens[self._j]
            self._j += 1
        self._off = off

    def _segments(self, n: int | None) -> list[tuple[int, int]]:
        """(gpa, len) pieces of the next ``n`` bytes (default: all remaining)."""
        n = self._remaining if n is None else min(n, self._remaining)
        out = []
        j, off = self._j, self._off
        while n > 0:
            take = min(self._lens[j] - off, n)
            out.append((self._addrs[j] + off, take))
            n -= take
            j += 1
            off = 0
        return out

    def buffers(self, n: int | None = None) -> list[tuple[int, int]]:
        """``(gpa, len)`` pieces of the next ``n`` bytes (default all), not consuming."""
        return self._segments(n)

    def views(self, n: int | None = None) -> list[memoryview]:
        """Writable memoryviews of guest memory for the next ``n`` bytes (default
        all), not consuming them: pass them to ``os.preadv``/``os.pwritev`` and then
        call :meth:`advance`/:meth:`skip` with the byte count."""
        out: list[memoryview] = []
        for gpa, ln in self._segments(n):
            out.extend(self.memory.get_slices(gpa, ln))
        return out

    def _split(self, offset: int) -> tuple[int, int, int, int]:
        """Truncate self to ``offset`` bytes; return (j, off, end, remaining) of the rest."""
        if offset < 0:
            raise ValueError("offset must be >= 0")
        offset = min(offset, self._remaining)
        rest = self._remaining - offset
        j, off = self._j, self._off + offset
        while j < self._end and off >= self._lens[j]:
            off -= self._lens[j]
            j += 1
        end = self._end
        self._remaining = offset
        return j, off, end, rest

    def _clone_rest(self, offset: int) -> Any:
        j, off, end, rest = self._split(offset)
        other = object.__new__(type(self))
        other.memory = self.memory
        other._addrs = self._addrs
        other._lens = self._lens
        other._j = j
        other._end = end
        other._off = off
        other._remaining = rest
        other._done = 0
        other._core = self._core
        return other


class Reader(_Cursor):
    """Reads the device-readable part of a chain as one byte stream.

    ``read`` returns fewer bytes at the end (like a file); the ``read_exact`` /
    ``read_u*`` family raise :class:`~vhostuser.errors.ChainTooShort` instead.
    """

    __slots__ = ()

    @property
    def bytes_read(self) -> int:
        """Bytes consumed so far."""
        return self._done

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all remaining if ``n < 0``)."""
        if n < 0 or n > self._remaining:
            n = self._remaining
        if n == 0:
            return b""
        data = self._core.gather(self.memory, self._addrs, self._lens, self._j, self._end - self._j, self._off, n)
        self._advance(len(data))
        return data

    def read_all(self) -> bytes:
        """Everything that is left."""
        return self.read(-1)

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`ChainTooShort` (nothing consumed)."""
        if n > self._remaining:
            raise ChainTooShort(f"need {n} bytes, the chain has {self._remaining} readable bytes left")
        return self.read(n)

    def readinto(self, buf: Any) -> int:
        """Fill ``buf`` as far as possible; returns the byte count."""
        dst: Any
        if type(buf) is bytearray:
            dst = buf
            n = len(buf)
        else:
            dst = memoryview(buf).cast("B")
            if dst.readonly:  # as always: read, then fail to store (TypeError)
                data = self.read(dst.nbytes)
                dst[: len(data)] = data
                return len(data)
            n = dst.nbytes
        if n > self._remaining:
            n = self._remaining
        if n == 0:
            return 0
        # straight from guest memory into buf: one copy
        got = self._core.gather_into(self.memory, self._addrs, self._lens, self._j, self._end - self._j, self._off, dst, n)
        self._advance(got)
        return got  # type: ignore[no-any-return]

    def read_obj(self, fmt: str | struct.Struct) -> tuple[Any, ...]:
        """``struct.unpack`` of the next bytes (use a ``<`` format)."""
        st = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        return st.unpack(self.read_exact(st.size))

    def read_u8(self) -> int:
        """Next byte."""
        return _U8.unpack(self.read_exact(1))[0]

    def read_u16(self) -> int:
        """Next little-endian u16."""
        return _U16.unpack(self.read_exact(2))[0]

    def read_u32(self) -> int:
        """Next little-endian u32."""
        return _U32.unpack(self.read_exact(4))[0]

    def read_u64(self) -> int:
        """Next little-endian u64."""
        return _U64.unpack(self.read_exact(8))[0]

    def skip(self, n: int) -> int:
        """Consume up to ``n`` bytes without copying (e.g. after ``os.pwritev`` of
        :meth:`views`); returns the count skipped."""
        n = max(0, min(n, self._remaining))
        self._advance(n)
        return n

    consume = skip

    def split_at(self, offset: int) -> Reader:
        """Keep the first ``offset`` remaining bytes in ``self``; return a Reader for the rest."""
        return self._clone_rest(offset)  # type: ignore[no-any-return]


class Writer(_Cursor):
    """Writes the device-writable part of a chain as one byte stream.

    ``write`` is all-or-nothing: :class:`~vhostuser.errors.ChainTooShort` if the
    data does not fit.  ``bytes_written`` is what to report to ``add_used``.
    """

    __slots__ = ()

    @property
    def bytes_written(self) -> int:
        """Bytes written (or :meth:`advance`-d) so far."""
        return self._done

    def write(self, data: Any) -> int:
        """Write all of ``data``; returns its length."""
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        if n > self._remaining:
            raise ChainTooShort(f"{n} bytes do not fit: the chain has {self._remaining} writable bytes left")
        if n == 0:
            return 0
        done = self._core.scatter(self.memory, self._addrs, self._lens, self._j, self._end - self._j, self._off, data)
        self._advance(done)
        return done

    def write_obj(self, fmt: str | struct.Struct, *values: Any) -> int:
        """``struct.pack`` values and write them (use a ``<`` format)."""
        st = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        return self.write(st.pack(*values))

    def write_u8(self, value: int) -> int:
        """Write one byte."""
        return self.write(_U8.pack(value))

    def write_u16(self, value: int) -> int:
        """Write a little-endian u16."""
        return self.write(_U16.pack(value))

    def write_u32(self, value: int) -> int:
        """Write a little-endian u32."""
        return self.write(_U32.pack(value))

    def write_u64(self, value: int) -> int:
        """Write a little-endian u64."""
        return self.write(_U64.pack(value))

    def advance(self, n: int) -> int:
        """Count ``n`` bytes as written by someone else (e.g. ``os.preadv`` into
        :meth:`views`); returns the count (clamped to what is left)."""
        n = max(0, min(n, self._remaining))
        self._advance(n)
        return n

    def split_at(self, offset: int) -> Writer:
        """Keep the first ``offset`` remaining bytes in ``self``; return a Writer for
        the rest (e.g. a virtio-blk data area and its trailing status byte)."""
        return self._clone_rest(offset)  # type: ignore[no-any-return]


class DescriptorChain:
    """One available buffer (request) popped from a :class:`~vhostuser.virtqueue.Queue`.

    Holds the guest memory snapshot it was popped with.  Its buffers were checked
    to lie inside guest memory when it was popped.  Return it with
    ``queue.add_used(chain, bytes_written)``.

    A chain is a view of entry ``_i`` of the core's ``ChainBatch`` ``_b``: its
    per-chain values are read from the batch when asked for, so popping builds
    one small object per chain and copies nothing.
    """

    __slots__ = ("memory", "_b", "_i")

    def __init__(self, mem: GuestMemory, batch: Any, i: int) -> None:
        """View chain ``i`` of a core ``ChainBatch`` (internal; use Queue.pop_*).
        The batch's per-chain and per-descriptor arrays must stay as they are
        while the chain lives (both cores give each pop its own)."""
        self.memory = mem
        self._b = batch
        self._i = i

    @property
    def head_index(self) -> int:
        """Split: the head descriptor index.  Packed: the buffer id.  Pass either to add_used."""
        return self._b.head[self._i]  # type: ignore[no-any-return]

    @property
    def desc_count(self) -> int:
        """Ring descriptors the chain occupies (packed: how far the used index advances)."""
        return self._b.slots[self._i]  # type: ignore[no-any-return]

    @property
    def readable_len(self) -> int:
        """Total bytes of the device-readable buffers."""
        return self._b.read_bytes[self._i]  # type: ignore[no-any-return]

    @property
    def writable_len(self) -> int:
        """Total bytes of the device-writable buffers."""
        return self._b.write_bytes[self._i]  # type: ignore[no-any-return]

    @property
    def _addrs(self) -> Any:
        return self._b.addr

    @property
    def _lens(self) -> Any:
        return self._b.len

    @property
    def _start(self) -> int:
        return self._b.desc_start[self._i]  # type: ignore[no-any-return]

    @property
    def _ndesc(self) -> int:
        return self._b.ndesc[self._i]  # type: ignore[no-any-return]

    @property
    def _nread(self) -> int:
        return self._b.nread[self._i]  # type: ignore[no-any-return]

    @property
    def readable_length(self) -> int:
        """Alias of :attr:`readable_len`."""
        return self.readable_len

    @property
    def writable_length(self) -> int:
        """Alias of :attr:`writable_len`."""
        return self.writable_len

    @property
    def id(self) -> int:
        """Alias of :attr:`head_index` (the packed-ring name)."""
        return self.head_index

    def __len__(self) -> int:
        """Number of buffer descriptors (indirect tables flattened)."""
        return self._ndesc

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head_index}, descs={self._ndesc}, "
            f"readable={self.readable_len}, writable={self.writable_len})"
        )

    def descriptors(self) -> list[tuple[int, int, bool]]:
        """``[(gpa, len, writable), ...]`` in chain order."""
        b, i = self._b, self._i
        s, nread, addrs, lens = b.desc_start[i], b.nread[i], b.addr, b.len
        return [(addrs[s + k], lens[s + k], k >= nread) for k in range(b.ndesc[i])]

    def readable_buffers(self) -> list[tuple[int, int]]:
        """``[(gpa, len), ...]`` of the device-readable buffers."""
        b, i = self._b, self._i
        s, addrs, lens = b.desc_start[i], b.addr, b.len
        return [(addrs[j], lens[j]) for j in range(s, s + b.nread[i])]

    def writable_buffers(self) -> list[tuple[int, int]]:
        """``[(gpa, len), ...]`` of the device-writable buffers."""
        b, i = self._b, self._i
        s, addrs, lens = b.desc_start[i], b.addr, b.len
        return [(addrs[j], lens[j]) for j in range(s + b.nread[i], s + b.ndesc[i])]

    def readable_views(self) -> list[memoryview]:
        """memoryviews of all device-readable bytes (zero-copy, e.g. ``os.pwritev``)."""
        return self.reader().views()

    def writable_views(self) -> list[memoryview]:
        """memoryviews of all device-writable bytes (zero-copy, e.g. ``os.preadv``)."""
        return self.writer().views()

    def reader(self) -> Reader:
        """A fresh :class:`Reader` over the device-readable buffers."""
        b, i = self._b, self._i
        r = _new(Reader)
        r.memory = self.memory
        r._addrs = b.addr
        r._lens = b.len
        r._j = j = b.desc_start[i]
        r._end = j + b.nread[i]
        r._off = r._done = 0
        r._remaining = b.read_bytes[i]
        r._core = get_core()
        return r

    def writer(self) -> Writer:
        """A fresh :class:`Writer` over the device-writable buffers."""
        b, i = self._b, self._i
        w = _new(Writer)
        w.memory = self.memory
        w._addrs = b.addr
        w._lens = b.len
        s = b.desc_start[i]
        w._j = s + b.nread[i]
        w._end = s + b.ndesc[i]
        w._off = w._done = 0
        w._remaining = b.write_bytes[i]
        w._core = get_core()
        return w

    def _mark_written(self, log: Any, length: int) -> None:
        """Mark the first ``length`` writable bytes dirty in ``log``."""
        if _SKIP_DATA_LOG:
            return
        b, i = self._b, self._i
        s, addrs, lens = b.desc_start[i], b.addr, b.len
        for j in range(s + b.nread[i], s + b.ndesc[i]):
            if length <= 0:
                break
            n = min(lens[j], length)
            log.mark(addrs[j], n)
            length -= n
