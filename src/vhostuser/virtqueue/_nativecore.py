"""The C ring core: the :mod:`._pycore` API over the cffi extension ``vhostuser._native._ring``.

Same functions, same results, same state changes, same guest-memory writes, same
``-ErrorCode`` and details (docs/ring-core.md).  This module only marshals:

* :class:`QueueState` wraps a ``struct vu_queue`` (attribute access reads and
  writes the C fields, so :class:`~vhostuser.virtqueue.Queue` uses either state
  alike).
* :class:`ChainBatch` is filled with cffi arrays, never with a Python object per
  descriptor or per chain value.  Each pop fills a block of per-chain and
  per-descriptor arrays that belongs to it as long as anything refers to it (a
  batch, its chains, their cursors: tracked with an ``ffi.gc`` lease); free
  blocks are reused from a small per-state pool.  Chains are thus lazy views
  over flat C arrays.
* guest memory tables are built once per :class:`~vhostuser.memory.GuestMemory`
  snapshot (``mem.native_table``).

It loads the extension whatever ``VHOSTUSER_IMPL`` says (the differential tests
and the benchmark compare both cores in one process); :mod:`._core` decides which
core the package uses.
"""
from __future__ import annotations

from array import array as _array
from typing import Any

from .. import _impl
from ..errors import GuestMemoryError
from ..memory import GuestMemory
from . import _pycore
from .defs import DESC_SIZE, Layout
from ._pycore import IO_NONE, IO_READ, IO_WRITE, check_io_args
from .errcodes import BREAKS_QUEUE, ErrorCode, make_error

__all__ = [
    "NAME",
    "QueueState",
    "ChainBatch",
    "configure",
    "pop_batch",
    "add_used_batch",
    "needs_notification",
    "set_notification",
    "avail_pending",
    "gather",
    "gather_into",
    "scatter",
    "chain_io",
    "chain_heads",
    "poll",
    "IO_NONE",
    "IO_READ",
    "IO_WRITE",
    "ffi",
    "lib",
]

NAME = "native"


def _load() -> Any:
    mod = _impl.NATIVE
    if mod is None:
        mod = _impl._load_native()  # raises ImportError if the extension is not built
    return mod


_mod = _load()
ffi: Any = _mod.ffi
lib: Any = _mod.lib
_NULL = ffi.NULL
_CData = ffi.CData
_new_raw = ffi.new_allocator(should_clear_after_alloc=False)
_cast = ffi.cast
_gc = ffi.gc
_from_buffer = ffi.from_buffer
_unpack = ffi.unpack
_U32_MAX = 0xFFFFFFFF
_PACKED = Layout.PACKED
#: from this many values on, lists go to C through an array.array (~7 ns a value
#: instead of ~23 for a cffi slice assignment)
_ARRAY_MIN = 8 if _array("I").itemsize == 4 else 1 << 62
_U32_CODE = "I" if _array("I").itemsize == 4 else "?"  # "?": no such array typecode
_memmove = ffi.memmove

# Every entry point that touches guest memory runs under the C core's SIGBUS
# recovery point (guard.c): a fault in a front-end-shrunk mapping becomes an
# error return, never a dead process.
_lib_configure = lib.vu_safe_queue_configure
_lib_pop = lib.vu_safe_queue_pop_batch
_lib_add_used = lib.vu_safe_queue_add_used_batch
_lib_needs = lib.vu_safe_queue_needs_notification
_lib_setnotif = lib.vu_safe_queue_set_notification
_lib_pending = lib.vu_safe_queue_avail_pending
_lib_gather = lib.vu_safe_gather
_lib_scatter = lib.vu_safe_scatter
_lib_log_written = lib.vu_safe_log_written
_lib_chain_io = lib.vu_safe_chain_io
_lib_chain_heads = lib.vu_safe_chain_heads
_lib_poll = lib.vu_safe_queue_poll
_GUEST_FAULT = -ErrorCode.GUEST_FAULT
_fault = ffi.new("uint64_t *")  # the faulting address of a gather/scatter (GIL-protected)


def _faulted() -> GuestMemoryError:
    return make_error(_GUEST_FAULT, _fault[0])  # type: ignore[return-value]


def _closed() -> GuestMemoryError:
    return GuestMemoryError("guest memory snapshot is closed")


# ------------------------------------------------------------------ memory
def _keep(*objs: Any) -> Any:
    """An ``ffi.gc`` destructor that keeps ``objs`` alive as long as the cdata."""

    def destructor(_p: Any, _objs: tuple[Any, ...] = objs) -> None:
        pass

    return destructor


def mem_table(mem: GuestMemory) -> Any:
    """The ``struct vu_mem_table *`` of a snapshot (built once, cached on it)."""
    t = mem.native_table
    if t is None:
        lib.vu_guard_install()  # (again, if a later handler replaced ours: it is chained)
        regs = mem.table()
        arr = ffi.new("struct vu_mem_region[]", max(1, len(regs)))
        for i, (gpa, size, uva, host) in enumerate(regs):
            r = arr[i]
            r.gpa = gpa
            r.size = size
            r.uva = uva
            r.host = _cast("uint8_t *", host)
        raw = ffi.new("struct vu_mem_table *")
        raw.n = len(regs)
        raw.r = arr
        t = _gc(raw, _keep(arr))
        mem.native_table = t
    return t


# ------------------------------------------------------------------- state
_INT_FIELDS = (
    "layout", "size", "desc_gpa", "driver_gpa", "device_gpa", "next_avail", "avail_wrap",
    "next_used", "used_wrap", "num_added", "inflight", "broken", "err_a", "err_b", "log_guest_addr",
)  # fmt: skip
_BOOL_FIELDS = ("ready", "event_idx", "notify_enabled", "log_used")


class _Block:
    """The arrays one pop fills, with their own ``struct vu_chain_batch`` (``cb``)
    pointing at them: per descriptor (``addr``, ``len``, ``flags``, for ``cap``
    descriptors) and per chain (``chain``: head, slots, desc_start, ndesc, nread,
    read_bytes, write_bytes, for ``ccap`` chains).  ``busy`` while an ``ffi.gc``
    view of ``addr`` (held by a batch, its chains and their cursors) is alive:
    chains read their values from these arrays when asked."""

    __slots__ = ("cap", "ccap", "cb", "addr", "len", "flags", "chain", "busy")

    def __init__(self, cap: int, ccap: int) -> None:
        self.cap = cap
        self.ccap = ccap
        self.addr = _new_raw("uint64_t[]", cap)
        self.len = _new_raw("uint32_t[]", cap)
        self.flags = _new_raw("uint16_t[]", cap)
        self.chain = (
            _new_raw("uint32_t[]", ccap), _new_raw("uint32_t[]", ccap), _new_raw("uint32_t[]", ccap),
            _new_raw("uint32_t[]", ccap), _new_raw("uint32_t[]", ccap), _new_raw("uint64_t[]", ccap),
            _new_raw("uint64_t[]", ccap),
        )  # fmt: skip
        cb = self.cb = ffi.new("struct vu_chain_batch *")
        cb.addr = self.addr
        cb.len = self.len
        cb.flags = self.flags
        cb.desc_alloc = cap
        cb.head, cb.slots, cb.desc_start, cb.ndesc, cb.nread, cb.read_bytes, cb.write_bytes = self.chain
        cb.chain_cap = ccap
        self.busy = False

    def release(self, _p: Any) -> None:
        self.busy = False

    def lease(self) -> Any:
        self.busy = True
        return _gc(_cast("uint64_t *", self.addr), self.release)


#: blocks kept per queue state for reuse (a device holding the chains of one or
#: two earlier pops while it pops again still allocates nothing)
_POOL = 3


def _get_block(st: Any, need_desc: int, need_chains: int) -> _Block:
    """A free block of at least this capacity (the current one if it is free)."""
    blk = st._blk
    if blk is not None and not blk.busy and blk.cap >= need_desc and blk.ccap >= need_chains:
        return blk
    pool = st._pool
    for b in pool:
        if not b.busy and b.cap >= need_desc and b.ccap >= need_chains:
            st._blk = b
            return b
    size = st._q.size
    if blk is None:
        blk = _Block(max(need_desc, size, 1), max(need_chains, 16))
    else:  # never smaller than the last one: no ping-pong between sizes
        blk = _Block(max(need_desc, size, blk.cap), max(need_chains, blk.ccap))
    # keep the free blocks that are big enough and the busy ones (they come back)
    pool[:] = [b for b in pool if b.busy or (b.cap >= blk.cap and b.ccap >= blk.ccap)][-(_POOL - 1) :] + [blk]
    st._blk = blk
    return blk


class QueueState:
    """Per-queue state in a C ``struct vu_queue``; the fields of
    :class:`._pycore.QueueState` are properties over it."""

    __slots__ = (
        "_q", "_log", "_desc_mv", "_driver_mv", "_device_mv",
        "_blk", "_pool", "_ucap", "_uids", "_ulens", "_uslots",
    )  # fmt: skip

    def __init__(self) -> None:
        self._q = ffi.new("struct vu_queue *")
        self._blk: _Block | None = None
        self._pool: list[_Block] = []
        self._ucap = 0
        self._uids = self._ulens = self._uslots = _NULL
        self.reset()

    def reset(self) -> None:
        """Back to the power-on state (keeps nothing but scratch arrays)."""
        lib.vu_queue_reset(self._q)
        self._log: Any = None
        self._desc_mv: memoryview | None = None
        self._driver_mv: memoryview | None = None
        self._device_mv: memoryview | None = None

    # -- the dirty log: a DirtyLog in Python, a host pointer in C
    @property
    def log(self) -> Any:
        return self._log

    @log.setter
    def log(self, value: Any) -> None:
        if value is self._log:
            return
        self._log = value
        q = self._q
        if value is None or value._closed or not value.size:
            q.log = _NULL
            q.log_size = 0
        else:
            q.log = _cast("uint8_t *", value.host_addr)
            q.log_size = value.size

    # -- resolved ring areas: memoryviews kept (so the mapping stays alive, as
    # with the Python core); clearing one clears the C pointer.
    @property
    def desc_mv(self) -> memoryview | None:
        return self._desc_mv

    @desc_mv.setter
    def desc_mv(self, v: memoryview | None) -> None:
        self._desc_mv = v
        if v is None:
            self._q.desc_host = _NULL

    @property
    def driver_mv(self) -> memoryview | None:
        return self._driver_mv

    @driver_mv.setter
    def driver_mv(self, v: memoryview | None) -> None:
        self._driver_mv = v
        if v is None:
            self._q.driver_host = _NULL

    @property
    def device_mv(self) -> memoryview | None:
        return self._device_mv

    @device_mv.setter
    def device_mv(self, v: memoryview | None) -> None:
        self._device_mv = v
        if v is None:
            self._q.device_host = _NULL

    # -- scratch
    def _grow_used(self, n: int) -> None:
        cap = max(n, 2 * self._ucap, 64)
        self._uids = _new_raw("uint32_t[]", cap)
        self._ulens = _new_raw("uint32_t[]", cap)
        self._uslots = _new_raw("uint32_t[]", cap)
        self._ucap = cap


def _make_field(name: str, boolean: bool) -> property:
    ns: dict[str, Any] = {}
    get = f"bool(self._q.{name})" if boolean else f"self._q.{name}"
    exec(  # noqa: S102 - generated trivial accessors (fast attribute access)
        f"def fget(self):\n    return {get}\ndef fset(self, v):\n    self._q.{name} = v\n", ns
    )
    return property(ns["fget"], ns["fset"], doc=f"``struct vu_queue.{name}``")


for _name in _INT_FIELDS:
    setattr(QueueState, _name, _make_field(_name, False))
for _name in _BOOL_FIELDS:
    setattr(QueueState, _name, _make_field(_name, True))
del _name


class ChainBatch:
    """Output of :func:`pop_batch` (see :class:`._pycore.ChainBatch`): the same
    attributes, indexable cffi arrays instead of lists.  All of them (per chain
    and per descriptor) belong to this pop alone as long as the batch's ``addr``
    (a lease of them) is referenced - by the batch, its chains or their cursors;
    the next pop into the same batch object lets go of it, so with one reused
    batch they are valid until the next pop.

    ``head`` and ``slots`` can go straight back into :func:`add_used_batch` (the
    zero-copy batch API).  ``raw`` is accepted for compatibility: the per-chain
    values are always cffi arrays."""

    __slots__ = (
        "count", "desc_cap", "head", "slots", "desc_start", "ndesc", "nread",
        "read_bytes", "write_bytes", "addr", "len", "flags", "raw", "cb",
    )  # fmt: skip

    def __init__(self, desc_cap: int, *, raw: bool = False) -> None:
        self.count = 0
        self.desc_cap = desc_cap
        self.raw = raw
        self.head = self.slots = self.desc_start = self.ndesc = self.nread = ()
        self.read_bytes = self.write_bytes = self.addr = self.len = self.flags = ()
        #: the ``struct vu_chain_batch *`` of the last pop (for chain_io / chain_heads)
        self.cb: Any = None


# --------------------------------------------------------------- functions
def _logging(st: QueueState) -> Any:
    """The DirtyLog whose lock to hold around a C call that may log ring writes
    (so C's atomic ORs never race Python's locked read-modify-write), or None."""
    lg = st._log
    if lg is None or not st._q.log_used:
        return None
    if lg._closed:
        st._q.log = _NULL
        return None
    return lg


def configure(st: QueueState, mem: GuestMemory) -> int:
    """Validate the configuration and resolve the ring areas (see _pycore.configure)."""
    if mem._closed:
        raise _closed()
    q = st._q
    rc = _lib_configure(q, mem_table(mem))
    if rc == 0:
        # Keep views of the areas, as the Python core does: the mapping then
        # survives a close of the snapshot while the queue still points into it.
        size = q.size
        if q.layout == _PACKED:
            lens = (DESC_SIZE * size, 4, 4)
        else:
            extra = 2 if q.event_idx else 0
            lens = (DESC_SIZE * size, 4 + 2 * size + extra, 4 + 8 * size + extra)
        st._desc_mv = _pycore._region_view(mem, q.desc_gpa, lens[0])
        st._driver_mv = _pycore._region_view(mem, q.driver_gpa, lens[1])
        st._device_mv = _pycore._region_view(mem, q.device_gpa, lens[2])
    return rc  # type: ignore[no-any-return]


def log_written(log: Any, batch: ChainBatch, first: int, count: int, lens: Any) -> None:
    """Dirty-log what ``add_used`` reports written (see _pycore.log_written): one
    C call for the whole run of chains, atomic ORs, under the log's lock."""
    cptr = log._cptr
    if cptr is None:
        _pycore.log_written(log, batch, first, count, lens)  # type: ignore[arg-type]  # same attributes
        return
    used = ffi.from_buffer("uint32_t[]", lens) if type(lens) is _array else ffi.new("uint32_t[]", list(lens))
    with log._lock:
        if log._closed:
            return
        got = _lib_log_written(cptr, log.size, batch.addr, batch.len, batch.desc_start, batch.nread,
                               batch.ndesc, first, count, used, _fault)
        if got < 0:
            raise _faulted()
        log.pages_marked += got


def pop_batch(st: QueueState, mem: GuestMemory, max_chains: int, batch: ChainBatch) -> int:
    """Pop up to ``max_chains`` chains into ``batch`` (see _pycore.pop_batch)."""
    if mem._closed:
        raise _closed()
    tbl = mem.native_table
    if tbl is None:
        tbl = mem_table(mem)
    q = st._q
    # let go of what this batch held from its previous use, so it can be reused
    batch.addr = batch.len = batch.flags = ()
    batch.cb = None
    if max_chains < 0:
        max_chains = 0
    elif max_chains > _U32_MAX:
        max_chains = _U32_MAX
    desc_cap = batch.desc_cap
    size = q.size
    # Chains per batch <= min(max_chains, size); descriptors per chain <= size.
    need_chains = max_chains if max_chains < size else size
    need_desc = need_chains * size
    if desc_cap < need_desc:
        need_desc = desc_cap
    blk = _get_block(st, need_desc, need_chains)
    cb = blk.cb
    cb.desc_cap = desc_cap if desc_cap < _U32_MAX else _U32_MAX
    lg = _logging(st) if st._log is not None else None
    if lg is None:
        n = _lib_pop(q, tbl, max_chains, cb)
    else:
        with lg._lock:
            n = _lib_pop(q, tbl, max_chains, cb)
    if n > 0:
        batch.count = n
        # views, not copies: the lease below keeps them for this batch's chains
        (batch.head, batch.slots, batch.desc_start, batch.ndesc, batch.nread,
         batch.read_bytes, batch.write_bytes) = blk.chain  # fmt: skip
        batch.addr = blk.lease()
        batch.len = blk.len
        batch.flags = blk.flags
        batch.cb = blk.cb
    elif n == 0 or -n in BREAKS_QUEUE:  # the walk failed (preamble errors leave the batch alone)
        batch.count = 0
    return n  # type: ignore[no-any-return]


def _u32_array(st: QueueState, which: int, values: Any, n: int) -> Any:
    if isinstance(values, _CData):
        return values
    arr = (st._uids, st._ulens, st._uslots)[which]
    if type(values) is _array and values.typecode == _U32_CODE and len(values) >= n:  # from Queue.add_used_batch
        _memmove(arr, values, 4 * n)
        return arr
    if len(values) != n:
        values = values[:n]
    if n >= _ARRAY_MIN:
        try:
            _memmove(arr, _array("I", values), 4 * n)
            return arr
        except (TypeError, OverflowError, ValueError):
            pass  # the slice assignment below raises what it always raised
    arr[0:n] = values
    return arr


def _out_of_range(st: QueueState, ids: Any, slots: Any, n: int) -> int:
    """A value did not fit the C arrays: the error the Python core reports for it
    (a used id or slot count >= 2**32 is out of range for any queue), else 0."""
    q = st._q
    size = q.size
    if q.layout == _PACKED:
        for k in range(n):
            if not 1 <= slots[k] <= size and 0 <= slots[k] < 1 << 64:
                q.err_a, q.err_b = slots[k], size
                return -ErrorCode.USED_SLOTS
        return 0
    for k in range(n):
        if ids[k] >= size and ids[k] < 1 << 64:
            q.err_a, q.err_b = ids[k], size
            return -ErrorCode.USED_ID
    return 0


def add_used_batch(st: QueueState, mem: GuestMemory, ids: Any, lens: Any, slots: Any, n: int) -> int:
    """Publish ``n`` used entries with one release (see _pycore.add_used_batch).
    ``ids``/``lens``/``slots`` are lists or cffi ``uint32_t`` arrays."""
    q = st._q
    if n <= 0 or not q.ready:
        return _lib_add_used(q, _NULL, _NULL, _NULL, _NULL, 0)  # type: ignore[no-any-return]
    if n > st._ucap:
        st._grow_used(n)
    try:
        ids_c = _u32_array(st, 0, ids, n)
        lens_c = _u32_array(st, 1, lens, n)
        slots_c = _u32_array(st, 2, slots, n)
    except OverflowError:
        rc = _out_of_range(st, ids, slots, n)
        if rc:
            return rc
        raise
    if st._log is None:
        return _lib_add_used(q, _NULL, ids_c, lens_c, slots_c, n)  # type: ignore[no-any-return]
    lg = _logging(st)
    if lg is None:
        return _lib_add_used(q, _NULL, ids_c, lens_c, slots_c, n)  # type: ignore[no-any-return]
    with lg._lock:
        return _lib_add_used(q, _NULL, ids_c, lens_c, slots_c, n)  # type: ignore[no-any-return]


def needs_notification(st: QueueState, mem: GuestMemory) -> int:
    """1 if the driver must be notified (see _pycore.needs_notification)."""
    return _lib_needs(st._q, _NULL)  # type: ignore[no-any-return]


def set_notification(st: QueueState, mem: GuestMemory, enable: int) -> int:
    """Enable/disable kicks (see _pycore.set_notification)."""
    lg = _logging(st) if st._log is not None else None
    if lg is None:
        return _lib_setnotif(st._q, _NULL, 1 if enable else 0)  # type: ignore[no-any-return]
    with lg._lock:
        return _lib_setnotif(st._q, _NULL, 1 if enable else 0)  # type: ignore[no-any-return]


def avail_pending(st: QueueState, mem: GuestMemory) -> int:
    """Chains available (split) / 0-1 (packed) (see _pycore.avail_pending)."""
    return _lib_pending(st._q, _NULL)  # type: ignore[no-any-return]


# ------------------------------------------------------------ copy helpers
def gather(mem: GuestMemory, addrs: Any, lens: Any, start: int, count: int, skip: int, n: int) -> bytes:
    """Copy ``n`` bytes out of the buffers after skipping ``skip`` (see _pycore.gather)."""
    if mem._closed:
        raise _closed()
    if n <= 0 or not isinstance(addrs, _CData) or not isinstance(lens, _CData):
        return _pycore.gather(mem, addrs, lens, start, count, skip, n)
    tbl = mem.native_table
    if tbl is None:
        tbl = mem_table(mem)
    buf = _new_raw("char[]", n)
    got = _lib_gather(tbl, addrs, lens, start, count, skip, buf, n, _fault)
    if got == _GUEST_FAULT:
        raise _faulted()
    if got < 0:  # a piece outside guest memory: let the reference raise its error
        return _pycore.gather(mem, addrs, lens, start, count, skip, n)
    return _unpack(buf, got)  # type: ignore[no-any-return]


def gather_into(mem: GuestMemory, addrs: Any, lens: Any, start: int, count: int, skip: int, dst: Any, n: int) -> int:
    """:func:`gather` straight into the writable byte memoryview ``dst`` (see
    _pycore.gather_into); returns the count copied."""
    if mem._closed:
        raise _closed()
    if n <= 0 or not isinstance(addrs, _CData) or not isinstance(lens, _CData):
        return _pycore.gather_into(mem, addrs, lens, start, count, skip, dst, n)
    tbl = mem.native_table
    if tbl is None:
        tbl = mem_table(mem)
    out = _from_buffer("char[]", dst, True)  # writable only (positional: faster)
    if n > len(out):  # never from Reader: let the reference store what fits
        return _pycore.gather_into(mem, addrs, lens, start, count, skip, dst, n)
    got = _lib_gather(tbl, addrs, lens, start, count, skip, out, n, _fault)
    if got == _GUEST_FAULT:
        raise _faulted()
    if got < 0:  # a piece outside guest memory: let the reference raise its error
        return _pycore.gather_into(mem, addrs, lens, start, count, skip, dst, n)
    return got  # type: ignore[no-any-return]


def scatter(mem: GuestMemory, addrs: Any, lens: Any, start: int, count: int, skip: int, data: Any) -> int:
    """Copy ``data`` into the buffers (see _pycore.scatter); returns bytes written."""
    if mem._closed:
        raise _closed()
    if not isinstance(addrs, _CData) or not isinstance(lens, _CData):
        return _pycore.scatter(mem, addrs, lens, start, count, skip, data)
    tbl = mem.native_table
    if tbl is None:
        tbl = mem_table(mem)
    if type(data) is bytes:  # passed as a char pointer, no copy, no wrapper object
        got = _lib_scatter(tbl, addrs, lens, start, count, skip, data, len(data), _fault)
    else:
        src = _from_buffer(data)
        got = _lib_scatter(tbl, addrs, lens, start, count, skip, src, len(src), _fault)
    if got == _GUEST_FAULT:
        raise _faulted()
    if got < 0:  # pieces before the bad one are written, as the reference does
        return _pycore.scatter(mem, addrs, lens, start, count, skip, data)
    return got  # type: ignore[no-any-return]


# ------------------------------------------------------------------- batch I/O
def chain_io(st: QueueState | None, mem: GuestMemory, batch: Any, first: int, n: int, fd: int, ops: Any,
             offsets: Any, skip: int, tail: int, ok: int, err: int, lens: Any, errs: Any, every: int,
             call_fd: int) -> int:
    """Vectored file I/O for chains of one pop, status bytes and (with ``st``)
    dirty log + used entries + notifications, in one C call without the GIL
    (see _pycore.chain_io).  ``ops`` bytes-like of u8, ``offsets`` u64,
    ``lens`` writable u32, ``errs`` writable i32 (``array.array`` 'B'/'Q'/'I'/'i')."""
    if mem._closed:
        raise _closed()
    if type(batch) is not ChainBatch or batch.cb is None:  # e.g. a resubmitted chain's batch
        if st is not None:
            raise TypeError("chain_io publishes only chains of a native pop; pass st=None")
        return _pycore.chain_io(None, mem, batch, first, n, fd, ops, offsets, skip, tail, ok, err, lens, errs,
                                every, call_fd)
    check_io_args(batch, first, n, ops, offsets, lens, errs)
    if n == 0:
        return 0
    tbl = mem.native_table
    if tbl is None:
        tbl = mem_table(mem)
    args = (batch.cb, first, n, fd, _from_buffer("uint8_t[]", ops), _from_buffer("uint64_t[]", offsets), skip, tail,
            ok, err, _from_buffer("uint32_t[]", lens, True), _from_buffer("int32_t[]", errs, True),
            max(every, 0), call_fd)
    if st is None:
        return _lib_chain_io(_NULL, tbl, *args)  # type: ignore[no-any-return]
    q = st._q
    lg = st._log
    if lg is None or lg._closed:
        if lg is not None:
            q.log = _NULL
        return _lib_chain_io(q, tbl, *args)  # type: ignore[no-any-return]
    with lg._lock:  # C's atomic ORs never race Python's locked read-modify-write
        return _lib_chain_io(q, tbl, *args)  # type: ignore[no-any-return]


def chain_heads(mem: GuestMemory, batch: Any, first: int, n: int, hlen: int) -> tuple[bytes, list[int], list[int]]:
    """The first ``hlen`` readable bytes of each chain, flat, with the chains'
    readable / writable byte counts (see _pycore.chain_heads)."""
    if mem._closed:
        raise _closed()
    if type(batch) is not ChainBatch or batch.cb is None:
        return _pycore.chain_heads(mem, batch, first, n, hlen)
    check_io_args(batch, first, n)
    tbl = mem.native_table
    if tbl is None:
        tbl = mem_table(mem)
    out = _new_raw("uint8_t[]", max(n * hlen, 1))
    if _lib_chain_heads(tbl, batch.cb, first, n, hlen, out, _fault) == _GUEST_FAULT:
        raise _faulted()
    rb: Any = batch.read_bytes
    wb: Any = batch.write_bytes
    return _unpack(_cast("char *", out), n * hlen), _unpack(rb + first, n), _unpack(wb + first, n)


def poll(st: QueueState, mem: GuestMemory, ns: int) -> int:
    """Busy-poll for available buffers for up to ``ns`` ns without the GIL (see _pycore.poll)."""
    return _lib_poll(st._q, _NULL, max(ns, 0))  # type: ignore[no-any-return]
