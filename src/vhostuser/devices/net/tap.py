"""``TapPort``: a TAP interface as a switch port (the host's side of the network).

Frames the switch sends to the port are written to the TAP with a zero
virtio_net_hdr; a reader thread hands frames the host sends to the switch.
The TAP is opened without offloads, so the host kernel checksums and
segments before it hands a frame over; a frame that still asks for checksum
completion (NEEDS_CSUM) gets its checksum computed here, a GSO frame is dropped
(counted).  A TAP that disappears (``ip link del``) ends the reader with a
logged error; the switch and the other ports carry on.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections import Counter
from typing import TYPE_CHECKING

from ...sys_util.tap import Tap, open_tap
from .defs import ETH_HLEN, HDR_LEN, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VirtioNetHdr

if TYPE_CHECKING:
    from .switch import L2Switch, SwitchPort

log = logging.getLogger(__name__)
_ZERO_HDR = bytes(HDR_LEN)


def internet_checksum(data: bytes | memoryview) -> int:
    """RFC 1071 one's-complement sum (as stored: complemented)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def complete_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Fold the checksum over ``frame[csum_start:]`` into ``csum_start + csum_offset``
    (VIRTIO_NET_HDR_F_NEEDS_CSUM: the field holds the pseudo-header sum already)."""
    pos = csum_start + csum_offset
    if csum_start >= len(frame) or pos + 2 > len(frame):
        raise ValueError("checksum position outside the frame")
    out = bytearray(frame)
    csum = internet_checksum(memoryview(out)[csum_start:])
    out[pos:pos + 2] = csum.to_bytes(2, "big")
    return bytes(out)


class TapPort:
    """A TAP interface attached to an :class:`~.switch.L2Switch`."""

    def __init__(self, name: str, switch: L2Switch) -> None:
        self.tap: Tap = open_tap(name)
        self.name = self.tap.name
        self.switch = switch
        self.drops: Counter[str] = Counter()
        self.port: SwitchPort = switch.add_port(self, name=f"tap:{self.name}")
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._read_loop, name=f"vhostuser-tap-{self.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ switch -> host
    def deliver(self, frame: bytes) -> bool:
        """Write ``frame`` to the tap device; False if the write failed."""
        try:
            self.tap.write(_ZERO_HDR + frame)
        except BlockingIOError:
            self.drops["tap-full"] += 1
            return False
        except OSError as exc:
            self.drops["tap-error"] += 1
            if self.drops["tap-error"] == 1:
                log.error("TAP %s: write failed: %s (frames to it are dropped)", self.name, exc)
            return False
        return True

    # ------------------------------------------------------------ host -> switch
    def _read_loop(self) -> None:
        poll = select.poll()
        poll.register(self.tap.fd, select.POLLIN)
        poll.register(self._stop_r, select.POLLIN)
        while True:
            ready = dict(poll.poll())
            if self._stop_r in ready:
                return
            if ready.get(self.tap.fd, 0) & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                log.error("TAP %s went away; its port stops receiving", self.name)
                return
            while True:
                try:
                    data = self.tap.read()
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EINTR):
                        break
                    log.error("TAP %s: read failed: %s; its port stops receiving", self.name, exc)
                    return
                if data is None:
                    break
                frame = self._frame(data)
                if frame is not None:
                    self.switch.input(self.port, frame)

    def _frame(self, data: bytes) -> bytes | None:
        if len(data) < HDR_LEN + ETH_HLEN:
            self.drops["tap-runt"] += 1
            return None
        hdr = VirtioNetHdr.unpack(data[:HDR_LEN])
        frame = data[HDR_LEN:]
        if hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE:
            self.drops["tap-gso"] += 1
            return None
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            try:
                frame = complete_checksum(frame, hdr.csum_start, hdr.csum_offset)
            except ValueError:
                self.drops["tap-bad-csum"] += 1
                return None
        return frame

    def close(self) -> None:
        """Stop the reader and close the TAP (a TAP this created disappears)."""
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._stop_r)
        os.close(self._stop_w)
        self.tap.close()
