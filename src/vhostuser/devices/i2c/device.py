"""``I2cBackend``: the virtio-i2c device (id 34): a virtual bus of targets.

Requests are executed in ring order.  Consecutive requests chained by
FAIL_NEXT form one transfer; consecutive messages of a transfer to the same
target go to it in one call (a host adapter then runs them as one
``I2C_RDWR``, with repeated starts).  When a message fails (NACK, an absent
address, a malformed request), the rest of its transfer fails too.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ...backend import VhostUserBackend
from ...errors import QueueError
from ...sys_util.i2cdev import I2cMsg
from ...vring import VringState
from .bus import I2cNack
from .protocol import F_ZERO_LENGTH_REQUEST, FLAGS_FAIL_NEXT, FLAGS_KNOWN, FLAGS_M_RD, MAX_LENGTH, OUT_HDR, Status

log = logging.getLogger(__name__)


class I2cTarget(Protocol):
    """What sits at an address (see :mod:`.bus`)."""

    def transfer(self, msgs: Sequence[I2cMsg]) -> list[bytes]:
        """Run ``msgs`` as one transaction; the bytes each read returned."""

    def close(self) -> None:
        """Release the device."""


@dataclass
class _Request:
    chain: Any
    msg: I2cMsg | None  # None: malformed
    fail_next: bool
    status: Status = Status.ERR
    data: bytes = b""


class I2cBackend(VhostUserBackend):
    """A virtio-i2c adapter with ``targets`` (7-bit address -> target)."""

    num_queues = 1
    max_queue_size = 1024

    def __init__(self, targets: Mapping[int, I2cTarget]) -> None:
        super().__init__()
        for addr in targets:
            if not 0 <= addr <= 0x7F:
                raise ValueError(f"7-bit address {addr:#x} out of range")
        self.targets = dict(targets)
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0

    def features(self) -> int:
        return super().features() | F_ZERO_LENGTH_REQUEST

    # ---------------------------------------------------------------- rings
    def vring_started(self, index: int, vring: VringState) -> None:
        try:
            self.process_queue(vring)
        except QueueError as exc:
            vring.fail(exc)

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        if device_event not in vrings:
            log.warning("unexpected device event %d", device_event)
            return
        self.process_queue(vrings[device_event])

    def process_queue(self, vring: VringState) -> int:
        """Serve every available request; returns how many."""
        if not vring.is_running:
            return 0
        total = 0
        while True:
            vring.disable_notification()
            while chains := vring.pop_batch(64):
                vring.add_used_batch(self.process(chains))
                vring.signal_used_queue()
                total += len(chains)
            if not vring.enable_notification():
                return total

    # ------------------------------------------------------------- requests
    def process(self, chains: Sequence[Any]) -> list[tuple[Any, int]]:
        """Execute ``chains`` in order; returns ``(chain, used length)`` for each."""
        reqs = [self._parse(c) for c in chains]
        with self._lock:
            start = 0
            for i, r in enumerate(reqs):
                if not r.fail_next or i == len(reqs) - 1:
                    self._run_transfer(reqs[start:i + 1])
                    start = i + 1
        return [(r.chain, self._complete(r)) for r in reqs]

    def _parse(self, chain: Any) -> _Request:
        self.requests += 1
        fail_next = False
        if chain.readable_len < OUT_HDR.size:
            return self._bad(chain, fail_next, f"request header of {chain.readable_len} bytes, not {OUT_HDR.size}")
        addr, _pad, flags = chain.reader().read_obj(OUT_HDR)
        fail_next = bool(flags & FLAGS_FAIL_NEXT)
        if chain.writable_len < 1:
            return self._bad(chain, fail_next, "no writable status byte")
        if flags & ~FLAGS_KNOWN:
            return self._bad(chain, fail_next, f"unknown flags {flags:#x}")
        if addr & ~0xFE:
            return self._bad(chain, fail_next, f"address field {addr:#x} is not a 7-bit address << 1")
        write_len, read_len = chain.readable_len - OUT_HDR.size, chain.writable_len - 1
        if flags & FLAGS_M_RD:
            if write_len:
                return self._bad(chain, fail_next, f"a read request with {write_len} bytes to write")
            if read_len > MAX_LENGTH:
                return self._bad(chain, fail_next, f"a read of {read_len} bytes")
            return _Request(chain, I2cMsg(addr >> 1, True, length=read_len), fail_next)
        if read_len:
            return self._bad(chain, fail_next, f"a write request with a {read_len}-byte read buffer")
        if write_len > MAX_LENGTH:
            return self._bad(chain, fail_next, f"a write of {write_len} bytes")
        reader = chain.reader()
        reader.skip(OUT_HDR.size)
        return _Request(chain, I2cMsg(addr >> 1, False, data=reader.read_exact(write_len)), fail_next)

    def _bad(self, chain: Any, fail_next: bool, reason: str) -> _Request:
        self.errors += 1
        log.warning("i2c request failed: %s", reason)
        return _Request(chain, None, fail_next)

    def _run_transfer(self, reqs: list[_Request]) -> None:
        i = 0
        while i < len(reqs):
            msg = reqs[i].msg
            if msg is None:
                break
            target = self.targets.get(msg.addr)
            if target is None:
                log.info("i2c: no device at %#04x (NACK)", msg.addr)
                self.errors += 1
                break
            j = i
            while j < len(reqs) and reqs[j].msg is not None and reqs[j].msg.addr == msg.addr:  # type: ignore[union-attr]
                j += 1
            run = [r.msg for r in reqs[i:j] if r.msg is not None]
            try:
                results = target.transfer(run)
            except I2cNack as nack:
                self.errors += 1
                log.info("i2c: device %#04x: NACK after %d of %d messages: %s", msg.addr, nack.done, len(run), nack)
                for r, data in zip(reqs[i:i + nack.done], nack.results):
                    r.status, r.data = Status.OK, data
                return
            except Exception:  # noqa: BLE001 - a bug must not take the queue down with it
                self.errors += 1
                log.exception("i2c: device %#04x failed", msg.addr)
                return
            for r, data in zip(reqs[i:j], results):
                r.status, r.data = Status.OK, data
            i = j
        # the failed message and the rest of the transfer stay ERR

    def _complete(self, r: _Request) -> int:
        writable = r.chain.writable_len
        if writable < 1:
            return 0
        writer = r.chain.writer()
        status_w = writer.split_at(writable - 1)
        if r.status == Status.OK and r.data:
            writer.write(r.data[:writable - 1])
        status_w.write_u8(int(r.status))
        return writable

    def close(self) -> None:
        """Close every target."""
        for target in self.targets.values():
            target.close()
