"""``L2Switch``: a learning Ethernet switch between ports in one process.

A port is anything with ``deliver(frame) -> bool`` (a :class:`~.device.NetBackend`
for each VM; a TAP uplink).  Frames a port sends enter with :meth:`L2Switch.input`:

1. ingress hooks of the port (and of every port) run - see :mod:`.hooks`;
2. the source MAC is checked (never multicast; with ``mac_filter``, not a
   MAC learned on another port, and one of the port's ``allowed_macs`` if set)
   and learned; entries age out after ``ageing_time`` seconds without traffic;
3. broadcast, multicast and unknown unicast are flooded to every other port;
   known unicast goes to its port (a frame for the port it came from is dropped);
4. egress hooks of the destination port run, and the port's ``deliver`` queues it.

With no hook installed the hook machinery costs one attribute test per frame.
``pcap`` records every frame as it enters the switch (before hooks).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .defs import format_mac, is_multicast
from .hooks import Direction, Hook, Scheduler, apply_hooks
from .pcap import PcapWriter

log = logging.getLogger(__name__)

DEFAULT_AGEING_TIME = 300.0


class FrameSink(Protocol):
    """What the switch needs of a port's host side."""

    def deliver(self, frame: bytes) -> bool:
        """Hand ``frame`` to this port; False if it was dropped."""


class NetBackendLike(FrameSink, Protocol):
    """A port that also sends: :class:`~.device.NetBackend`."""

    name: str
    on_tx: Callable[..., None] | None


@dataclass
class SwitchPort:
    """One port: its sink, its number and its optional source-MAC allow list."""

    index: int
    sink: FrameSink
    name: str
    allowed_macs: frozenset[bytes] | None = None
    ingress_hooks: list[Hook] = field(default_factory=list)
    egress_hooks: list[Hook] = field(default_factory=list)


class L2Switch:
    """A MAC-learning switch (see the module docstring)."""

    def __init__(self, *, ageing_time: float = DEFAULT_AGEING_TIME, mac_filter: bool = False,
                 pcap: PcapWriter | None = None) -> None:
        self.ageing_time = ageing_time
        self.mac_filter = mac_filter
        self.pcap = pcap
        self.ports: list[SwitchPort] = []
        self._fdb: dict[bytes, tuple[SwitchPort, float]] = {}
        self._lock = threading.Lock()
        self._global_hooks: dict[Direction, list[Hook]] = {Direction.INGRESS: [], Direction.EGRESS: []}
        self._hooked = False
        self.scheduler = Scheduler()
        #: frames dropped by the switch, by reason
        self.drops: Counter[str] = Counter()
        self.forwarded = 0
        self.flooded = 0

    # ------------------------------------------------------------ set-up
    def add_port(self, sink: FrameSink, *, name: str | None = None,
                 allowed_macs: Iterable[bytes] | None = None) -> SwitchPort:
        """Attach ``sink``; returns the port (its ``index`` is the port number)."""
        port = SwitchPort(len(self.ports), sink, name or f"port{len(self.ports)}",
                          frozenset(allowed_macs) if allowed_macs is not None else None)
        self.ports.append(port)
        return port

    def attach(self, backend: NetBackendLike, *, allowed_macs: Iterable[bytes] | None = None) -> SwitchPort:
        """Add a port for a :class:`~.device.NetBackend` and send its TX frames here."""
        port = self.add_port(backend, name=backend.name, allowed_macs=allowed_macs)

        def on_tx(_backend: object, frame: bytes) -> None:
            self.input(port, frame)

        backend.on_tx = on_tx
        return port

    def add_hook(self, hook: Hook, *, direction: Direction | str = Direction.EGRESS,
                 port: int | None = None) -> None:
        """Run ``hook`` for frames entering (``ingress``) or leaving (``egress``)
        the switch at ``port`` (None: every port).  Hooks run in the order added;
        per-port hooks after the switch-wide ones."""
        d = Direction(direction)
        if port is None:
            self._global_hooks[d].append(hook)
        else:
            p = self.ports[port]
            (p.ingress_hooks if d is Direction.INGRESS else p.egress_hooks).append(hook)
        self._hooked = True

    def clear_hooks(self) -> None:
        """Remove every hook (global and per port)."""
        for hooks in self._global_hooks.values():
            hooks.clear()
        for p in self.ports:
            p.ingress_hooks.clear()
            p.egress_hooks.clear()
        self._hooked = False

    def close(self) -> None:
        """Stop the timer (frames still delayed are dropped) and close the capture."""
        self.scheduler.close()
        if self.pcap is not None:
            self.pcap.close()

    # ------------------------------------------------------------ the path
    def input(self, port: SwitchPort, frame: bytes) -> None:
        """A frame sent by ``port``'s guest (or host side)."""
        if self.pcap is not None:
            self.pcap.write(frame)
        if not self._hooked:
            self._switch(port, frame)
            return
        hooks = self._global_hooks[Direction.INGRESS] + port.ingress_hooks
        for f, delay in self._run_hooks(hooks, frame, port, Direction.INGRESS):
            if delay > 0:
                self.scheduler.call_later(delay, self._switch, port, f)
            else:
                self._switch(port, f)

    def _run_hooks(self, hooks: list[Hook], frame: bytes, port: SwitchPort,
                   direction: Direction) -> list[tuple[bytes, float]]:
        if not hooks:
            return [(frame, 0.0)]
        try:
            out = apply_hooks(hooks, frame, port.index, direction)
        except Exception:  # noqa: BLE001 - a broken hook drops the frame, not the switch
            log.exception("%s hook on %s failed: frame dropped", direction.value, port.name)
            self.drops["hook-error"] += 1
            return []
        if not out:
            self.drops[f"hook-{direction.value}"] += 1
        return out

    def _switch(self, src: SwitchPort, frame: bytes) -> None:
        if len(frame) < 14:
            self.drops["runt"] += 1
            return
        dst_mac, src_mac = frame[:6], frame[6:12]
        if is_multicast(src_mac):
            self.drops["multicast-source"] += 1
            return
        now = time.monotonic()
        with self._lock:
            known = self._fdb.get(src_mac)
            if known is not None and known[0] is not src and now - known[1] < self.ageing_time \
                    and self.mac_filter:
                self.drops["source-mac-filter"] += 1
                log.debug("%s sent with %s, a MAC of %s: dropped", src.name, format_mac(src_mac), known[0].name)
                return
            if self.mac_filter and src.allowed_macs is not None and src_mac not in src.allowed_macs:
                self.drops["source-mac-filter"] += 1
                return
            if known is None or known[0] is not src or now - known[1] > 1.0:
                self._fdb[src_mac] = (src, now)
            dst = None
            if not is_multicast(dst_mac):
                entry = self._fdb.get(dst_mac)
                if entry is not None:
                    if now - entry[1] < self.ageing_time:
                        dst = entry[0]
                    else:
                        del self._fdb[dst_mac]
        if dst is None:
            self.flooded += 1
            for port in self.ports:
                if port is not src:
                    self._output(port, frame)
        elif dst is src:
            self.drops["hairpin"] += 1
        else:
            self.forwarded += 1
            self._output(dst, frame)

    def _output(self, port: SwitchPort, frame: bytes) -> None:
        if not self._hooked:
            port.sink.deliver(frame)
            return
        hooks = self._global_hooks[Direction.EGRESS] + port.egress_hooks
        for f, delay in self._run_hooks(hooks, frame, port, Direction.EGRESS):
            if delay > 0:
                self.scheduler.call_later(delay, port.sink.deliver, f)
            else:
                port.sink.deliver(f)

    # ------------------------------------------------------------ inspection
    def fdb(self) -> dict[str, str]:
        """The live MAC table: MAC -> port name (aged entries left out)."""
        now = time.monotonic()
        with self._lock:
            return {format_mac(mac): port.name for mac, (port, seen) in self._fdb.items()
                    if now - seen < self.ageing_time}

    def age(self) -> int:
        """Remove aged entries now (lookups ignore them anyway); returns how many."""
        now = time.monotonic()
        with self._lock:
            old = [mac for mac, (_, seen) in self._fdb.items() if now - seen >= self.ageing_time]
            for mac in old:
                del self._fdb[mac]
        return len(old)
