"""The device side of a virtqueue, split or packed, over a ring core."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from array import array
from functools import partial
from itertools import repeat
from typing import Any, Union

from ..errors import QueueBroken, QueueError, QueueUsageError
from ..memory import DirtyLog, GuestMemory
from ._core import get_core
from .inflight import _RING_DESC, PackedInflight, RingDescriptor, SplitInflight, rebuild_chain
from .chain import _SKIP_DATA_LOG, DescriptorChain
from .defs import MAX_QUEUE_SIZE, Layout
from .errcodes import BREAKS_QUEUE, ErrorCode, make_error
from .iobatch import IoBatch

__all__ = ["Queue", "UsedEntry"]

log = logging.getLogger(__name__)

_new = object.__new__
#: lens as a flat u32 array (OverflowError/TypeError for anything but 0..2**32-1)
_u32s = partial(array, "I")
_U32_ARRAYS = array("I").itemsize == 4
_PACKED = int(Layout.PACKED)

#: What ``add_used``/``add_used_batch`` accept to name a buffer: the chain, or
#: (split only) its head index.
UsedEntry = Union[DescriptorChain, int]


class Queue:
    """A virtqueue as the device sees it (rust-vmm ``Queue`` naming).

    Configure it as the vhost-user messages arrive (``SET_VRING_NUM`` ->
    :meth:`set_size`, ``SET_VRING_BASE`` -> :meth:`set_vring_base`,
    ``SET_VRING_ADDR`` -> ``set_*_address`` (gpas: translate uvas with
    :meth:`GuestMemory.uva_to_gpa`), features -> :meth:`set_event_idx` /
    ``layout``), give it memory (:meth:`set_memory`) and :meth:`set_ready`.
    Then :meth:`pop_batch` / :meth:`pop_descriptor_chain`, :meth:`add_used` /
    :meth:`add_used_batch`, and :meth:`needs_notification` before signalling.

    Not thread-safe: one worker thread uses a queue at a time.
    """

    def __init__(
        self,
        mem: GuestMemory | None = None,
        max_size: int = MAX_QUEUE_SIZE,
        *,
        layout: Layout | int = Layout.SPLIT,
        packed: bool | None = None,
        size: int | None = None,
        event_idx: bool = False,
        desc_addr: int | None = None,
        driver_addr: int | None = None,
        device_addr: int | None = None,
    ) -> None:
        """A queue of up to ``max_size`` entries (the size defaults to ``max_size``).

        Shortcut: with ``size``, ``event_idx``, ``packed`` and all three ring gpas
        (``desc_addr``, ``driver_addr`` = avail ring / driver area, ``device_addr`` =
        used ring / device area) the queue is configured and made ready at once
        (raising like :meth:`set_ready`).
        """
        if not 1 <= max_size <= MAX_QUEUE_SIZE:
            raise QueueUsageError(f"max_size {max_size} out of range 1..{MAX_QUEUE_SIZE}")
        self._core = get_core()
        self.max_size = max_size
        self._st = self._core.QueueState()
        if packed is not None:
            layout = Layout.PACKED if packed else Layout.SPLIT
        self._initial_layout = Layout(layout)
        self._mem = mem
        self._log: DirtyLog | None = None
        self._broken_exc: QueueError | None = None
        self._warned_head_log = False
        self._inflight: SplitInflight | PackedInflight | None = None
        self._inflight_entries: dict[int, int] = {}  # packed: buffer id -> inflight entry
        self._resubmit: list[DescriptorChain] = []
        self.reset()
        if size is not None:
            self.set_size(size)
        if event_idx:
            self.set_event_idx(True)
        if desc_addr is not None and driver_addr is not None and device_addr is not None:
            self.set_addresses(desc_addr, driver_addr, device_addr)
            self.set_ready(True)

    # ---------------------------------------------------------- configuration
    def reset(self) -> None:
        """Back to the initial state: not ready, size ``max_size``, addresses 0,
        indices 0 (packed wrap counters 1), EVENT_IDX off, not broken, no log.
        Memory and layout are kept."""
        self._st.reset()
        self._st.layout = self._initial_layout
        self._st.size = self.max_size
        self._log = None
        self._broken_exc = None

    @property
    def state(self) -> Any:
        """The core's state record (see docs/ring-core.md); for the core's twins and tests."""
        return self._st

    @property
    def memory(self) -> GuestMemory | None:
        """The guest memory snapshot chains are popped from."""
        return self._mem

    def set_memory(self, mem: GuestMemory | None) -> None:
        """Use a new memory snapshot (after a memory-table change).  A ready queue
        re-resolves its rings and raises if they no longer fit (then not ready).
        The caller still owns (and later closes) the old snapshot."""
        self._mem = mem
        self._st.desc_mv = self._st.driver_mv = self._st.device_mv = None
        self.refresh_dirty_log()
        if self._st.ready:
            self._reconfigure()

    @property
    def layout(self) -> Layout:
        """SPLIT or PACKED."""
        return Layout(self._st.layout)

    def set_layout(self, layout: Layout | int) -> None:
        """Choose the layout (from ``VIRTIO_F_RING_PACKED``); keeps it across reset."""
        self._initial_layout = Layout(layout)
        self._st.layout = self._initial_layout
        self._changed()

    @property
    def packed(self) -> bool:
        """True for a packed ring."""
        return self._st.layout == Layout.PACKED

    @property
    def size(self) -> int:
        """The queue size (number of descriptors)."""
        return int(self._st.size)

    def set_size(self, size: int) -> None:
        """``SET_VRING_NUM``.  Validated when the queue becomes ready."""
        if not 1 <= size <= self.max_size:
            raise QueueUsageError(f"queue size {size} out of range 1..{self.max_size}")
        self._st.size = size
        self._changed()

    @property
    def event_idx(self) -> bool:
        """Whether VIRTIO_F_EVENT_IDX (VIRTIO_RING_F_EVENT_IDX) is in use."""
        return bool(self._st.event_idx)

    def set_event_idx(self, enabled: bool) -> None:
        """Enable or disable EVENT_IDX notification suppression."""
        self._st.event_idx = bool(enabled)
        self._changed()

    @property
    def desc_table(self) -> int:
        """Gpa of the descriptor table (split) / descriptor ring (packed)."""
        return int(self._st.desc_gpa)

    @property
    def avail_ring(self) -> int:
        """Gpa of the avail ring (split) / driver event suppression area (packed)."""
        return int(self._st.driver_gpa)

    @property
    def used_ring(self) -> int:
        """Gpa of the used ring (split) / device event suppression area (packed)."""
        return int(self._st.device_gpa)

    def set_desc_table_address(self, gpa: int) -> None:
        """Set the descriptor table / ring gpa."""
        self._st.desc_gpa = gpa
        self._changed()

    def set_avail_ring_address(self, gpa: int) -> None:
        """Set the avail ring gpa (packed: the driver area)."""
        self._st.driver_gpa = gpa
        self._changed()

    def set_used_ring_address(self, gpa: int) -> None:
        """Set the used ring gpa (packed: the device area).  Also the default base
        for logging used-ring writes."""
        self._st.device_gpa = gpa
        if not self._st.log_used:
            self._st.log_guest_addr = gpa
        self._changed()

    def set_addresses(self, desc: int, avail: int, used: int) -> None:
        """All three ring gpas at once."""
        self._st.desc_gpa, self._st.driver_gpa, self._st.device_gpa = desc, avail, used
        if not self._st.log_used:
            self._st.log_guest_addr = used
        self._changed()

    @property
    def ready(self) -> bool:
        """Whether the queue is enabled."""
        return bool(self._st.ready)

    def set_ready(self, ready: bool) -> None:
        """Enable (after validating the configuration: raises
        :class:`~vhostuser.errors.QueueError` subclasses) or disable the queue."""
        if ready:
            self._reconfigure()
        else:
            self._st.ready = False
            self._st.desc_mv = self._st.driver_mv = self._st.device_mv = None

    def is_valid(self) -> bool:
        """True if the configuration is usable with the current memory (size,
        alignment, every ring area inside one region)."""
        if self._mem is None or self._mem.closed:
            return False
        return self._core.configure(self._st, self._mem) == 0

    def _reconfigure(self) -> None:
        if self._mem is None or self._mem.closed:
            self._st.ready = False
            raise QueueError("virtqueue has no guest memory")
        rc = self._core.configure(self._st, self._mem)
        if rc < 0:
            self._st.ready = False
            raise make_error(rc, self._st.err_a, self._st.err_b)
        self._st.ready = True

    def _changed(self) -> None:
        if self._st.ready:
            self._reconfigure()

    # ------------------------------------------------------- ring positions
    @property
    def next_avail(self) -> int:
        """Split: the free-running avail index of the next chain to pop.
        Packed: its ring position (see :attr:`avail_wrap_counter`)."""
        return int(self._st.next_avail)

    @property
    def next_used(self) -> int:
        """Split: the used index we will publish next.  Packed: the ring position of
        the next used descriptor (see :attr:`used_wrap_counter`)."""
        return int(self._st.next_used)

    @property
    def avail_wrap_counter(self) -> int:
        """Packed: the device's view of the driver ring wrap counter."""
        return int(self._st.avail_wrap)

    @property
    def used_wrap_counter(self) -> int:
        """Packed: the device ring wrap counter."""
        return int(self._st.used_wrap)

    def set_next_avail(self, next_avail: int, wrap: int | None = None) -> None:
        """Set where popping resumes (``wrap``: packed avail wrap counter)."""
        limit = 0x7FFF if self.packed else 0xFFFF
        if not 0 <= next_avail <= limit:
            raise QueueUsageError(f"next_avail {next_avail} out of range")
        self._st.next_avail = next_avail
        if wrap is not None:
            self._st.avail_wrap = 1 if wrap else 0
        self._st.inflight = 0
        self._changed()

    def set_next_used(self, next_used: int, wrap: int | None = None) -> None:
        """Set where used entries are written next (``wrap``: packed used wrap counter)."""
        limit = 0x7FFF if self.packed else 0xFFFF
        if not 0 <= next_used <= limit:
            raise QueueUsageError(f"next_used {next_used} out of range")
        self._st.next_used = next_used
        if wrap is not None:
            self._st.used_wrap = 1 if wrap else 0
        self._st.num_added = 0
        self._st.inflight = 0
        self._changed()

    def vring_base(self) -> int:
        """The ``GET_VRING_BASE`` value.  Split: next_avail.  Packed:
        ``next_avail | avail_wrap << 15 | (next_used | used_wrap << 15) << 16``."""
        st = self._st
        if self.packed:
            return (st.next_avail | st.avail_wrap << 15) | (st.next_used | st.used_wrap << 15) << 16
        return int(st.next_avail)

    def set_vring_base(self, num: int) -> None:
        """Apply ``SET_VRING_BASE``.  Split: next_avail = next_used = ``num & 0xffff``
        (as rust-vmm).  Packed: the encoding of :meth:`vring_base` (QEMU starts
        with 0x80008000: both positions 0, both wrap counters 1).  A packed base
        with an empty upper half (DPDK 22.11's virtio-user sends 0x8000) means
        used = avail, as DPDK's own vhost library reads it."""
        st = self._st
        if self.packed:
            st.next_avail, st.avail_wrap = num & 0x7FFF, (num >> 15) & 1
            if num >> 16:
                st.next_used, st.used_wrap = (num >> 16) & 0x7FFF, (num >> 31) & 1
            else:
                st.next_used, st.used_wrap = st.next_avail, st.avail_wrap
        else:
            st.next_avail = st.next_used = num & 0xFFFF
        st.num_added = 0
        st.inflight = 0
        self._changed()

    # ------------------------------------------------------------------ state
    @property
    def broken(self) -> QueueError | None:
        """The error that broke the queue (hostile ring), or None."""
        if not self._st.broken:
            return None
        return self._broken_exc or make_error(self._st.broken, self._st.err_a, self._st.err_b)  # type: ignore[return-value]

    def _raise(self, rc: int) -> None:
        exc = make_error(rc, self._st.err_a, self._st.err_b)
        code = ErrorCode(-rc)
        if code in BREAKS_QUEUE:
            self._broken_exc = exc  # type: ignore[assignment]
            log.warning("virtqueue broken: %s", exc)
        if code is ErrorCode.BROKEN and self._broken_exc is not None:
            raise QueueBroken(f"virtqueue is broken ({self._broken_exc}); reset it") from self._broken_exc
        raise exc

    # -------------------------------------------------------------------- pop
    def _memory(self) -> GuestMemory:
        mem = self._mem
        if mem is None:
            raise QueueError("virtqueue has no guest memory")
        return mem

    def pop_batch(self, max_chains: int = 64) -> list[DescriptorChain]:
        """Pop up to ``max_chains`` available chains (fewer if fewer are available).

        Raises a :class:`~vhostuser.errors.QueueError` subclass for a hostile ring
        (then the queue is broken: every later pop raises
        :class:`~vhostuser.errors.QueueBroken` until :meth:`reset`); nothing of the
        failing batch is consumed.
        """
        if max_chains <= 0:
            return []
        if self._resubmit:  # requests in flight before a back-end restart go first
            chains, self._resubmit = self._resubmit[:max_chains], self._resubmit[max_chains:]
            return chains
        mem = self._mem
        if mem is None:
            raise QueueError("virtqueue has no guest memory")
        st = self._st
        tracker = self._inflight
        if tracker is not None:
            start = (int(st.next_avail), int(st.avail_wrap))
        size = int(st.size)
        batch = self._core.ChainBatch(max(size, 4 * max_chains) if max_chains > 1 else size)
        rc = self._core.pop_batch(st, mem, max_chains, batch)
        if rc <= 0:
            if rc < 0:
                self._raise(rc)
            return []
        # One small view object per chain (DescriptorChain reads the batch lazily),
        # built without a Python-level __init__ call.
        chains = list(map(_new, repeat(DescriptorChain, rc)))
        i = 0
        for c in chains:
            c.memory = mem
            c._b = batch
            c._i = i
            i += 1
        if tracker is not None:
            self._record_popped(mem, chains, start)
        return chains

    def pop_descriptor_chain(self) -> DescriptorChain | None:
        """Pop one chain, or None if none is available (errors as :meth:`pop_batch`)."""
        chains = self.pop_batch(1)
        return chains[0] if chains else None

    def iter(self, batch: int = 64) -> Iterator[DescriptorChain]:
        """Pop and yield chains until the queue is empty."""
        while True:
            chains = self.pop_batch(batch)
            if not chains:
                return
            yield from chains

    def poll(self, ns: int) -> bool:
        """Busy-poll up to ``ns`` nanoseconds for available buffers (adaptive
        polling, before :meth:`enable_notification` and sleeping); True as soon
        as some are there.  The C core spins without the GIL."""
        if self._resubmit:
            return True
        rc = self._core.poll(self._st, self._memory(), ns)
        if rc < 0:
            self._raise(rc)
        return rc > 0

    def has_available(self) -> bool:
        """True if at least one chain is available to pop (no validation)."""
        rc = self._core.avail_pending(self._st, self._memory())
        if rc < 0:
            self._raise(rc)
        return rc > 0

    # ------------------------------------------------------------------- used
    def add_used(self, chain: UsedEntry, len: int) -> None:  # noqa: A002 - rust-vmm name
        """Return a chain to the driver with ``len`` bytes written into it.

        ``chain`` is the :class:`DescriptorChain` (both layouts) or, for split
        rings only, its head index.  Publishes the used index at once.
        """
        self.add_used_batch(((chain, len),))

    def add_used_batch(self, entries: Iterable[tuple[UsedEntry, int]]) -> None:
        """Return several chains, publishing the used index ONCE (one release).

        Validated first: on :class:`~vhostuser.errors.QueueUsageError` nothing
        is written.  With a dirty log, the written bytes of each chain (up to its
        ``len``) are marked.
        """
        if self._inflight is None and _U32_ARRAYS and (type(entries) is list or type(entries) is tuple):
            if not entries:
                return
            if self._add_used_run(entries):
                return
        ids: list[int] = []
        lens: list[int] = []
        slots: list[int] = []
        chains: list[tuple[DescriptorChain, int]] = []
        packed = self.packed
        for item, ln in entries:
            if not 0 <= ln <= 0xFFFFFFFF:
                raise QueueUsageError(f"used length {ln} out of range")
            if isinstance(item, DescriptorChain):
                ids.append(item.head_index)
                slots.append(item.desc_count)
                chains.append((item, ln))
            else:
                if packed:
                    raise QueueUsageError("packed rings need the DescriptorChain, not an index, in add_used")
                ids.append(int(item))
                slots.append(1)
                if (self._log is not None or (self._mem is not None and self._mem.dirty_log is not None)) and ln \
                        and not self._warned_head_log:
                    self._warned_head_log = True
                    log.warning("add_used(head, len) with dirty logging: pass the chain so its pages are logged")
            lens.append(ln)
        if not ids:
            return
        dlog = self._log
        if dlog is None and self._mem is not None:
            dlog = self._mem.dirty_log
        self._st.log = dlog
        if dlog is not None:
            for c, ln in chains:
                c._mark_written(dlog, ln)
        tracker = self._inflight
        if tracker is None:
            rc = self._core.add_used_batch(self._st, self._memory(), ids, lens, slots, len(ids))
            if rc < 0:
                self._raise(rc)
            return
        if isinstance(tracker, SplitInflight):
            tracker.before_used(ids)
            rc = self._core.add_used_batch(self._st, self._memory(), ids, lens, slots, len(ids))
            if rc < 0:
                self._raise(rc)
            tracker.after_used(ids, int(self._st.next_used))
            return
        region_entries = {i: self._inflight_entries.pop(i) for i in ids if i in self._inflight_entries}
        pos, wrap = int(self._st.next_used), int(self._st.used_wrap)
        for s_ in slots:
            pos += s_
            if pos >= self.size:
                pos, wrap = pos - self.size, wrap ^ 1
        known = list(region_entries.values())
        tracker.before_used(known, slots, pos, wrap)
        rc = self._core.add_used_batch(self._st, self._memory(), ids, lens, slots, len(ids))
        if rc < 0:  # nothing reached the ring: undo the region's half-done batch
            tracker.rollback()
            self._inflight_entries.update(region_entries)
            self._raise(rc)
        tracker.after_used(known)

    def _add_used_run(self, entries: list[Any] | tuple[Any, ...]) -> bool:
        """add_used_batch's fast path: ``entries`` are ``(chain, len)`` pairs whose
        chains are consecutive chains of one pop, in pop order (the common case:
        a batch completed as popped, or one chain).  Their ids and slot counts are
        handed to the core straight from the batch's arrays.  Returns False,
        having done nothing, for anything else (the general path then does the
        work, and raises for misuse exactly as it always did)."""
        lens: Any
        try:
            if len(entries) == 1:
                ((c0, ln),) = entries
                if type(ln) is not int or not 0 <= ln <= 0xFFFFFFFF or not isinstance(c0, DescriptorChain):
                    return False
                lens, n = (ln,), 1
            else:
                c0 = entries[0][0]
                if not isinstance(c0, DescriptorChain):
                    return False
                b = c0._b
                i0 = c0._i
                n = len(entries)
                # consecutive chains of c0's pop (this also unpacks every pair)
                if [c._i if c._b is b else -1 for c, _ in entries] != list(range(i0, i0 + n)):
                    return False
                # every len an int in 0..2**32-1 (else OverflowError/TypeError), as
                # a flat u32 array that the C core takes as it is
                lens = _u32s([ln for _, ln in entries])
        except Exception:  # noqa: BLE001 - not (chain, len) pairs: the general path raises
            return False
        b = c0._b
        i0 = c0._i
        dlog = self._log
        mem = self._mem
        if dlog is None and mem is not None:
            dlog = mem.dirty_log
        st = self._st
        st.log = dlog
        if dlog is not None and not _SKIP_DATA_LOG:
            self._core.log_written(dlog, b, i0, n, lens)
        if mem is None:
            raise QueueError("virtqueue has no guest memory")
        if i0 == 0:
            ids, slots = b.head, b.slots
        else:
            ids, slots = b.head[i0 : i0 + n], b.slots[i0 : i0 + n]
        if st.layout != _PACKED:
            slots = ids  # split: the core ignores slots
        rc = self._core.add_used_batch(st, mem, ids, lens, slots, n)
        if rc < 0:
            self._raise(rc)
        return True

    # -------------------------------------------------------------- batch I/O
    @staticmethod
    def _runs(chains: list[DescriptorChain]) -> Iterator[tuple[Any, int, int, int]]:
        """``(batch, first index in it, count, position in chains)`` for each run
        of consecutive chains of one pop (one run for a plain pop)."""
        n = len(chains)
        c0, cl = chains[0], chains[-1]
        if cl._b is c0._b and cl._i - c0._i == n - 1:  # one pop, in order: the usual case
            yield c0._b, c0._i, n, 0
            return
        k = 0
        while k < n:
            c = chains[k]
            b, i0 = c._b, c._i
            m = k + 1
            while m < n and chains[m]._b is b and chains[m]._i == i0 + (m - k):
                m += 1
            yield b, i0, m - k, k
            k = m

    def pop_io_batch(self, max_chains: int, header_len: int) -> IoBatch | None:
        """Pop up to ``max_chains`` chains (as :meth:`pop_batch`) with the first
        ``header_len`` readable bytes of each in one flat buffer; None if none."""
        chains = self.pop_batch(max_chains)
        if not chains:
            return None
        mem = self._memory()
        heads = self._core.chain_heads
        parts = [heads(mem, b, i0, cnt, header_len) for b, i0, cnt, _ in self._runs(chains)]
        if len(parts) == 1:
            h, rd, wr = parts[0]
        else:
            h = b"".join(p[0] for p in parts)
            rd = [x for p in parts for x in p[1]]
            wr = [x for p in parts for x in p[2]]
        return IoBatch(chains, header_len, h, rd, wr)

    def complete_io(self, iob: IoBatch, fd: int, ops: Any, offsets: Any, lens: Any, *, skip: int, tail: int = 1,
                    ok: int = 0, err: int = 1, every: int = 0, call_fd: int = -1,
                    helper: Executor | None = None) -> array:
        """Finish every chain of ``iob`` in one ring-core call per pop.

        Per chain ``k``: ``ops[k]`` (an :class:`~.iobatch.IoOp`, u8 array),
        ``offsets[k]`` (file offset, u64 array), ``lens[k]`` (u32 array: the used
        length of an ``IoOp.NONE`` chain; set to the writable byte count for the
        others).  READ fills the writable bytes before the ``tail`` status bytes
        from ``fd``; WRITE writes the readable bytes after ``skip`` to ``fd``; then
        the chain's last writable byte becomes ``ok`` or ``err``.  All chains are
        then used (the written bytes marked in the dirty log), published every
        ``every`` chains (0: once) with a notification through ``call_fd`` when
        the driver wants one (-1: the caller notifies).  Returns the per-chain
        errno (0: done) as an ``array('i')``.  Queue errors raise as in
        :meth:`add_used_batch`.

        ``helper`` (an executor, e.g. one thread): the I/O of the second half of
        the batch runs there while this thread does the first half and
        publishes it (the core calls release the GIL); the second half is
        published when both are done.  Worth it for large transfers only."""
        chains = iob.chains
        n = len(chains)
        errs = array("i", bytes(4 * n))
        mem = self._memory()
        dlog = self._log
        if dlog is None:
            dlog = mem.dirty_log
        st = self._st
        st.log = dlog
        in_core = self._inflight is None  # else the tracker sees the used entries (add_used_batch)
        chain_io = self._core.chain_io
        if helper is not None and in_core and len(chains) >= 2:
            runs = list(self._runs(chains))
            if len(runs) == 1:
                self._complete_split(runs[0][0], runs[0][1], n, fd, ops, offsets, lens, errs, skip, tail, ok, err,
                                     every, call_fd, helper)
                return errs
        views: tuple[Any, ...] | None = None
        o: Any
        of: Any
        ln: Any
        er: Any
        for b, i0, cnt, k in self._runs(chains):
            if cnt == n:
                o, of, ln, er = ops, offsets, lens, errs
            else:
                if views is None:
                    views = tuple(memoryview(a) for a in (ops, offsets, lens, errs))
                o, of, ln, er = (v[k:k + cnt] for v in views)
            rc = chain_io(st if in_core else None, mem, b, i0, cnt, fd, o, of, skip, tail, ok, err, ln, er,
                          every, call_fd if in_core else -1)
            if rc < 0:
                self._raise(rc)
        if not in_core:
            self.add_used_batch([(c, lens[k]) for k, c in enumerate(chains)])
        return errs

    def _complete_split(self, b: Any, i0: int, n: int, fd: int, ops: Any, offsets: Any, lens: Any, errs: array,
                        skip: int, tail: int, ok: int, err: int, every: int, call_fd: int, helper: Executor) -> None:
        """complete_io of one pop's chains in two halves, the second's I/O on ``helper``."""
        mem = self._memory()
        st = self._st
        chain_io = self._core.chain_io
        h = n // 2
        vo, vof, vln, ver = (memoryview(a) for a in (ops, offsets, lens, errs))
        second = helper.submit(chain_io, None, mem, b, i0 + h, n - h, fd, vo[h:n], vof[h:n], skip, tail, ok, err,
                               vln[h:n], ver[h:n], 0, -1)
        rc = chain_io(st, mem, b, i0, h, fd, vo[:h], vof[:h], skip, tail, ok, err, vln[:h], ver[:h], every, call_fd)
        second.result()  # its errors are per chain, in errs
        if rc < 0:
            self._raise(rc)
        # publish the second half: nothing to do but the used entries, the log and the call
        rc = chain_io(st, mem, b, i0 + h, n - h, fd, bytes(n - h), vof[h:n], skip, tail, ok, err, vln[h:n],
                      array("i", bytes(4 * (n - h))), every, call_fd)
        if rc < 0:
            self._raise(rc)

    @property
    def notifies_in_core(self) -> bool:
        """Whether :meth:`complete_io` given a call fd notifies the driver itself
        (no inflight region to update around the used entries)."""
        return self._inflight is None

    # ------------------------------------------------------- inflight I/O
    def set_inflight(self, tracker: SplitInflight | PackedInflight | None) -> None:
        """Record every popped / used chain in an inflight region (INFLIGHT_SHMFD),
        so a restarted back-end can resubmit what was in flight."""
        self._inflight = tracker
        self._inflight_entries.clear()

    def resubmit_inflight(self) -> int:
        """After a back-end restart (the ring configured from SET_VRING_BASE and the
        inflight region of the old back-end): recover the region and queue its
        in-flight requests, oldest first, ahead of new ones.  The ring position
        becomes used index + requests in flight, as libvhost-user does.
        Returns how many requests will be resubmitted."""
        tracker = self._inflight
        if tracker is None:
            return 0
        mem = self._memory()
        st = self._st
        size = self.size
        if isinstance(tracker, SplitInflight):
            used_idx = mem.read_u16(int(self.used_ring) + 2)
            pending = tracker.recover(used_idx)
            slots = len(pending)
            self.set_next_avail((used_idx + slots) & 0xFFFF)
            st.next_used = used_idx
        elif tracker.fresh:
            # A new area (no back-end ran before it): nothing to resubmit, and the
            # ring position is SET_VRING_BASE's - e.g. 0x80008000 at boot, the
            # source's position on a migration destination.  Record it.
            tracker.start_at(int(st.next_used), int(st.used_wrap))
            pending = []
            slots = 0
        else:
            desc = int(self.desc_table)
            pending = tracker.recover(lambda i: mem.read_u16(desc + 16 * i + 14))
            used, uwrap = tracker.used_position
            slots = sum(len(p.descriptors) for p in pending)
            avail, awrap = used + slots, uwrap
            if avail >= size:
                avail, awrap = avail - size, awrap ^ 1
            st.next_used, st.used_wrap = used, uwrap
            self.set_next_avail(avail, awrap)
        self._resubmit = []
        self._inflight_entries.clear()
        for item in pending:
            try:
                batch = rebuild_chain(mem, packed=self.packed, size=size, desc_gpa=int(self.desc_table), item=item)
            except QueueError as exc:
                log.error("queue: in-flight request %d cannot be resubmitted (%s); dropping it", item.head, exc)
                continue
            self._resubmit.append(DescriptorChain(mem, batch, 0))
            if item.entry >= 0:  # packed: the entry stays in flight until the chain is used
                self._inflight_entries[item.head] = item.entry
        st.inflight = slots
        return len(self._resubmit)

    def _record_popped(self, mem: GuestMemory, chains: list[DescriptorChain], start: tuple[int, int]) -> None:
        tracker = self._inflight
        if isinstance(tracker, SplitInflight):
            tracker.popped([c.head_index for c in chains])
            return
        assert isinstance(tracker, PackedInflight)
        pos, _ = start
        desc = int(self.desc_table)
        size = self.size
        per_chain = []
        for c in chains:
            descs = []
            for _ in range(c.desc_count):
                addr, ln, bid, flags = _RING_DESC.unpack(mem.read(desc + 16 * pos, 16))
                descs.append(RingDescriptor(addr, ln, bid, flags))
                pos = pos + 1 if pos + 1 < size else 0
            per_chain.append(descs)
        for c, entry in zip(chains, tracker.popped(per_chain)):
            self._inflight_entries[c.head_index] = entry

    # --------------------------------------------------------- notifications
    def needs_notification(self) -> bool:
        """True if the driver must be notified (interrupted) about the used entries
        added since the last call (EVENT_IDX / NO_INTERRUPT / packed event flags)."""
        rc = self._core.needs_notification(self._st, self._memory())
        if rc < 0:
            self._raise(rc)
        return bool(rc)

    def enable_notification(self) -> bool:
        """Ask the driver to kick us for new buffers.  Returns True if buffers are
        already available (process them: no kick is coming for those)."""
        rc = self._core.set_notification(self._st, self._memory(), 1)
        if rc < 0:
            self._raise(rc)
        return bool(rc)

    def disable_notification(self) -> None:
        """Ask the driver not to kick us (we are polling)."""
        rc = self._core.set_notification(self._st, self._memory(), 0)
        if rc < 0:
            self._raise(rc)

    # ------------------------------------------------------------ dirty log
    @property
    def dirty_log(self) -> DirtyLog | None:
        """The dirty log written chains are marked in, or None."""
        return self._log

    def set_dirty_log(self, dirty_log: DirtyLog | None) -> None:
        """Start (VHOST_F_LOG_ALL with a SET_LOG_BASE log) or stop dirty logging of
        the buffers devices write.  Ring writes are logged too when
        :meth:`set_log_used` enabled it.  The caller owns the log.  Without a log
        of its own the queue uses its memory snapshot's
        (:meth:`GuestMemory.set_dirty_log`)."""
        self._log = dirty_log
        self._st.log = dirty_log

    def refresh_dirty_log(self) -> None:
        """Pick up a dirty-log change of the memory snapshot now (not only at the
        next :meth:`add_used_batch`), so every later ring write is logged in it."""
        dlog = self._log
        if dlog is None and self._mem is not None:
            dlog = self._mem.dirty_log
        self._st.log = dlog

    def set_log_used(self, enabled: bool, log_guest_addr: int | None = None) -> None:
        """``VHOST_VRING_F_LOG`` of SET_VRING_ADDR: log ring writes, split used ring
        at ``log_guest_addr`` (default: the used ring gpa)."""
        self._st.log_used = bool(enabled)
        self._st.log_guest_addr = self._st.device_gpa if log_guest_addr is None else log_guest_addr

    def set_used_log(self, log_guest_addr: int) -> None:
        """``set_log_used(True, log_guest_addr)`` (SET_VRING_ADDR with VHOST_VRING_F_LOG)."""
        self.set_log_used(True, log_guest_addr)

    def __repr__(self) -> str:
        st = self._st
        return (
            f"Queue({self.layout.name.lower()}, size={st.size}, ready={bool(st.ready)}, "
            f"next_avail={st.next_avail}, next_used={st.next_used}, broken={bool(st.broken)})"
        )
