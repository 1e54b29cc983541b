"""The C ring core: the :mod:`._pycore` API over the cffi extension ``vhostuser._native._ring``.

Same functions, same results, same state changes, same guest-memory writes, same
``-ErrorCode`` and details (docs/ring-core.md).  This module only marshals:

* :class:`QueueState` wraps a ``struct vu_queue`` (attribute access reads and
  writes the C fields, so :class:`~vhostuser.virtqueue.Queue` uses either state
  alike).
* :class:`ChainBatch` is filled with cffi arrays, never with a Python object per
  descriptor.  The arrays are preallocated per queue state and reused: the
  per-chain arrays on every pop (a :class:`DescriptorChain` copies its few
  per-chain values when it is built), the per-descriptor arrays (``addr``,
  ``len``, ``flags``) as soon as no chain or cursor from an earlier pop refers to
  them any more (tracked with an ``ffi.gc`` pointer), otherwise a fresh set is
  allocated.  Chains are thus lazy views over flat C arrays.
* guest memory tables are built once per :class:`~vhostuser.memory.GuestMemory`
  snapshot (``mem.native_table``).

It loads the extension whatever ``VHOSTUSER_IMPL`` says (the differential tests
and the benchmark compare both cores in one process); :mod:`._core` decides which
core the package uses.
"""
from __future__ import annotations

from typing import Any

from .. import _impl
from ..errors import GuestMemoryError
from ..memory import GuestMemory
from . import _pycore
from .defs import DESC_SIZE, Layout
from .errcodes import BREAKS_QUEUE, ErrorCode

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
    "scatter",
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
#: batches of at least this many chains get their per-chain values as lists
_UNPACK_MIN = 8

_lib_configure = lib.vu_queue_configure
_lib_pop = lib.vu_queue_pop_batch
_lib_add_used = lib.vu_queue_add_used_batch
_lib_needs = lib.vu_queue_needs_notification
_lib_setnotif = lib.vu_queue_set_notification
_lib_pending = lib.vu_queue_avail_pending
_lib_gather = lib.vu_gather
_lib_scatter = lib.vu_scatter


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
    """Per-descriptor arrays of one capacity; ``busy`` while an ``ffi.gc`` view of
    ``addr`` (held by a batch, its chains and their cursors) is alive."""

    __slots__ = ("cap", "addr", "len", "flags", "busy")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.addr = _new_raw("uint64_t[]", cap)
        self.len = _new_raw("uint32_t[]", cap)
        self.flags = _new_raw("uint16_t[]", cap)
        self.busy = False

    def release(self, _p: Any) -> None:
        self.busy = False

    def lease(self) -> Any:
        self.busy = True
        return _gc(_cast("uint64_t *", self.addr), self.release)


class QueueState:
    """Per-queue state in a C ``struct vu_queue``; the fields of
    :class:`._pycore.QueueState` are properties over it."""

    __slots__ = (
        "_q", "_log", "_desc_mv", "_driver_mv", "_device_mv",
        "_cb", "_chain_cap", "_carr", "_blk", "_ucap", "_uids", "_ulens", "_uslots",
    )  # fmt: skip

    def __init__(self) -> None:
        self._q = ffi.new("struct vu_queue *")
        self._cb = ffi.new("struct vu_chain_batch *")
        self._chain_cap = 0
        self._carr: tuple[Any, ...] = ()
        self._blk: _Block | None = None
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
    def _grow_chains(self, need: int) -> None:
        cap = max(need, 2 * self._chain_cap, 16)
        arrs = (
            _new_raw("uint32_t[]", cap), _new_raw("uint32_t[]", cap), _new_raw("uint32_t[]", cap),
            _new_raw("uint32_t[]", cap), _new_raw("uint32_t[]", cap), _new_raw("uint64_t[]", cap),
            _new_raw("uint64_t[]", cap),
        )  # fmt: skip
        cb = self._cb
        cb.head, cb.slots, cb.desc_start, cb.ndesc, cb.nread, cb.read_bytes, cb.write_bytes = arrs
        cb.chain_cap = cap
        self._carr = arrs
        self._chain_cap = cap

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
    attributes, indexable cffi arrays instead of lists.  Per-chain arrays are
    valid until the next pop on the same queue; per-descriptor arrays as long as
    they are referenced.

    With ``raw=True`` the per-chain arrays are always the cffi ``uint32_t``/
    ``uint64_t`` arrays, so ``head`` and ``slots`` can go straight back into
    :func:`add_used_batch` (the zero-copy batch API); otherwise batches of 8+
    chains carry them as lists, which DescriptorChain reads faster."""

    __slots__ = (
        "count", "desc_cap", "head", "slots", "desc_start", "ndesc", "nread",
        "read_bytes", "write_bytes", "addr", "len", "flags", "raw",
    )  # fmt: skip

    def __init__(self, desc_cap: int, *, raw: bool = False) -> None:
        self.count = 0
        self.desc_cap = desc_cap
        self.raw = raw
        self.head = self.slots = self.desc_start = self.ndesc = self.nread = ()
        self.read_bytes = self.write_bytes = self.addr = self.len = self.flags = ()


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


def pop_batch(st: QueueState, mem: GuestMemory, max_chains: int, batch: ChainBatch) -> int:
    """Pop up to ``max_chains`` chains into ``batch`` (see _pycore.pop_batch)."""
    if mem._closed:
        raise _closed()
    tbl = mem.native_table
    if tbl is None:
        tbl = mem_table(mem)
    q = st._q
    cb = st._cb
    # let go of what this batch held from its previous use, so it can be reused
    batch.addr = batch.len = batch.flags = ()
    if max_chains < 0:
        max_chains = 0
    elif max_chains > _U32_MAX:
        max_chains = _U32_MAX
    desc_cap = batch.desc_cap
    size = q.size
    # Chains per batch <= min(max_chains, size); descriptors per chain <= size.
    need_chains = max_chains if max_chains < size else size
    if need_chains > st._chain_cap:
        st._grow_chains(need_chains)
    need_desc = need_chains * size
    if desc_cap < need_desc:
        need_desc = desc_cap
    blk = st._blk
    if blk is None or blk.busy or blk.cap < need_desc:
        blk = st._blk = _Block(max(need_desc, size, 1))
        cb.addr = blk.addr
        cb.len = blk.len
        cb.flags = blk.flags
        cb.desc_alloc = blk.cap
    cb.desc_cap = desc_cap if desc_cap < _U32_MAX else _U32_MAX
    lg = _logging(st) if st._log is not None else None
    if lg is None:
        n = _lib_pop(q, tbl, max_chains, cb)
    else:
        with lg._lock:
            n = _lib_pop(q, tbl, max_chains, cb)
    if n > 0:
        batch.count = n
        carr = st._carr
        if n >= _UNPACK_MIN and not batch.raw:
            # DescriptorChain reads 7 per-chain values: from lists that is ~20 ns
            # cheaper per value than from cdata, which pays for the unpack.
            (batch.head, batch.slots, batch.desc_start, batch.ndesc, batch.nread, batch.read_bytes,
             batch.write_bytes) = [_unpack(a, n) for a in carr]  # fmt: skip
        else:
            (batch.head, batch.slots, batch.desc_start, batch.ndesc, batch.nread,
             batch.read_bytes, batch.write_bytes) = carr  # fmt: skip
        batch.addr = blk.lease()
        batch.len = blk.len
        batch.flags = blk.flags
    elif n == 0 or -n in BREAKS_QUEUE:  # the walk failed (preamble errors leave the batch alone)
        batch.count = 0
    return n  # type: ignore[no-any-return]


def _u32_array(st: QueueState, which: int, values: Any, n: int) -> Any:
    if isinstance(values, _CData):
        return values
    arr = (st._uids, st._ulens, st._uslots)[which]
    if len(values) != n:
        values = values[:n]
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
    got = _lib_gather(tbl, addrs, lens, start, count, skip, buf, n)
    if got < 0:  # a piece outside guest memory: let the reference raise its error
        return _pycore.gather(mem, addrs, lens, start, count, skip, n)
    return _unpack(buf, got)  # type: ignore[no-any-return]


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
        got = _lib_scatter(tbl, addrs, lens, start, count, skip, data, len(data))
    else:
        src = _from_buffer(data)
        got = _lib_scatter(tbl, addrs, lens, start, count, skip, src, len(src))
    if got < 0:  # pieces before the bad one are written, as the reference does
        return _pycore.scatter(mem, addrs, lens, start, count, skip, data)
    return got  # type: ignore[no-any-return]
