"""A minimal pcap writer (the classic libpcap format, LINKTYPE_ETHERNET),
readable by tcpdump and Wireshark.  Thread-safe: every port of a switch may
capture into one file."""
from __future__ import annotations

import os
import struct
import threading
import time
from typing import BinaryIO

PCAP_MAGIC_US = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
_FILE_HDR = struct.Struct("<IHHiIII")
_REC_HDR = struct.Struct("<IIII")


class PcapWriter:
    """Append frames to a pcap file (or any binary stream)."""

    def __init__(self, target: str | os.PathLike[str] | BinaryIO, *, snaplen: int = SNAPLEN) -> None:
        if isinstance(target, (str, os.PathLike)):
            self._f: BinaryIO = open(target, "wb")  # noqa: SIM115 - closed in close()
            self._owned = True
        else:
            self._f, self._owned = target, False
        self.snaplen = snaplen
        self._lock = threading.Lock()
        self.frames = 0
        self._f.write(_FILE_HDR.pack(PCAP_MAGIC_US, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
        self._f.flush()

    def write(self, frame: bytes, timestamp: float | None = None) -> None:
        """Record one Ethernet frame (truncated to ``snaplen``)."""
        ts = time.time() if timestamp is None else timestamp
        sec = int(ts)
        usec = int((ts - sec) * 1_000_000)
        data = frame[:self.snaplen]
        with self._lock:
            if self._f.closed:
                return
            self._f.write(_REC_HDR.pack(sec, usec, len(data), len(frame)))
            self._f.write(data)
            self.frames += 1

    def flush(self) -> None:
        """Write buffered packets to the file."""
        with self._lock:
            if not self._f.closed:
                self._f.flush()

    def close(self) -> None:
        """Flush and close the capture file (if this writer opened it)."""
        with self._lock:
            if self._owned and not self._f.closed:
                self._f.close()
            elif not self._f.closed:
                self._f.flush()


def read_pcap(path: str | os.PathLike[str]) -> list[tuple[float, bytes]]:
    """``(timestamp, frame)`` records of a pcap file written by :class:`PcapWriter`."""
    with open(path, "rb") as f:
        raw = f.read()
    magic, _major, _minor, _zone, _sig, _snap, linktype = _FILE_HDR.unpack_from(raw, 0)
    if magic != PCAP_MAGIC_US or linktype != LINKTYPE_ETHERNET:
        raise ValueError("not an Ethernet pcap file in little-endian microsecond format")
    out = []
    pos = _FILE_HDR.size
    while pos + _REC_HDR.size <= len(raw):
        sec, usec, incl, _orig = _REC_HDR.unpack_from(raw, pos)
        pos += _REC_HDR.size
        out.append((sec + usec / 1e6, raw[pos:pos + incl]))
        pos += incl
    return out
