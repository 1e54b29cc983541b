"""What sits on the virtual I2C bus: simulated devices and host adapters.

A target is anything with ``transfer(msgs) -> list[bytes]`` over
:class:`~vhostuser.sys_util.i2cdev.I2cMsg` (one transfer: repeated starts
between the messages), raising :class:`I2cNack` when it does not acknowledge.

* :class:`Eeprom` - a 24Cxx-style EEPROM backed by a file: a write sets the
  address pointer (1 byte for up to 256 bytes, else 2, big-endian) and writes
  the rest, reads continue from the pointer, wrapping at the end;
* :class:`TemperatureSensor` - an LM75-style sensor: pointer register 0
  temperature (two bytes, 1/256 degC, 9 significant bits), 1 config, 2 T_hyst,
  3 T_os;
* :class:`HostAdapter` - the listed addresses of a host ``/dev/i2c-N``.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

from ...sys_util.i2cdev import I2cMsg, i2c_rdwr

log = logging.getLogger(__name__)


class I2cNack(Exception):
    """The target did not acknowledge (VIRTIO_I2C_MSG_ERR).  ``done``: how many
    messages of the transfer completed before (their ``results``)."""

    def __init__(self, reason: str, done: int = 0, results: Sequence[bytes] = ()) -> None:
        super().__init__(reason)
        self.done = done
        self.results = list(results)


class SimulatedTarget:
    """A simulated device: :meth:`message` handles one message at a time."""

    def message(self, m: I2cMsg) -> bytes:
        """Carry out one message; the bytes read (empty for a write)."""
        raise NotImplementedError

    def transfer(self, msgs: Sequence[I2cMsg]) -> list[bytes]:
        """Carry out ``msgs`` in order; the bytes each returned."""
        out: list[bytes] = []
        for m in msgs:
            try:
                out.append(self.message(m))
            except I2cNack as exc:
                raise I2cNack(str(exc), len(out), out) from None
        return out

    def close(self) -> None:
        """Release what the device holds (nothing by default)."""
        pass


class Eeprom(SimulatedTarget):
    """An EEPROM of ``len(file)`` bytes (1..65536) kept in ``path``; writes go
    to the file at once (``pwrite``), so data persists."""

    def __init__(self, path: str, *, size: int | None = None, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC, 0o644)
        try:
            current = os.fstat(self.fd).st_size
            if size is None:
                size = current or 256
            if not 1 <= size <= 65536:
                raise ValueError(f"an EEPROM has 1..65536 bytes, not {size}")
            if current < size and not read_only:
                os.ftruncate(self.fd, size)
                os.pwrite(self.fd, b"\xff" * (size - current), current)  # erased cells read 0xff
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.addr_bytes = 1 if size <= 256 else 2
        self.pointer = 0

    def message(self, m: I2cMsg) -> bytes:
        """Carry out one message on this simulated device; the bytes read (empty for a write)."""
        if m.read:
            return self._read(m.length)
        if len(m.data) >= self.addr_bytes:
            self.pointer = int.from_bytes(m.data[:self.addr_bytes], "big") % self.size
            self._write(m.data[self.addr_bytes:])
        elif m.data:
            raise I2cNack(f"EEPROM write of {len(m.data)} byte(s): the address needs {self.addr_bytes}")
        return b""

    def _read(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            take = min(n - len(data), self.size - self.pointer)
            chunk = os.pread(self.fd, take, self.pointer)
            data += chunk.ljust(take, b"\xff")
            self.pointer = (self.pointer + take) % self.size
        return bytes(data)

    def _write(self, data: bytes) -> None:
        if not data:
            return
        if self.read_only:
            raise I2cNack("the EEPROM is write-protected")
        pos = 0
        while pos < len(data):
            take = min(len(data) - pos, self.size - self.pointer)
            os.pwrite(self.fd, data[pos:pos + take], self.pointer)
            pos += take
            self.pointer = (self.pointer + take) % self.size

    def close(self) -> None:
        """Close the backing file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TemperatureSensor(SimulatedTarget):
    """An LM75-style sensor reading :attr:`celsius` (settable at any time)."""

    REGISTERS = 4

    def __init__(self, celsius: float = 25.0) -> None:
        self.celsius = celsius
        self.pointer = 0
        self.config = 0
        self.t_hyst = 75 * 256
        self.t_os = 80 * 256
        self._lock = threading.Lock()

    @staticmethod
    def encode(celsius: float) -> int:
        """Two's-complement 1/256 degC, rounded to the LM75's 0.5 degC."""
        raw = int(round(celsius * 2)) * 128
        return raw & 0xFFFF

    def _register(self, reg: int) -> bytes:
        if reg == 1:
            return bytes([self.config])
        value = {0: self.encode(self.celsius), 2: self.t_hyst, 3: self.t_os}[reg]
        return value.to_bytes(2, "big")

    def message(self, m: I2cMsg) -> bytes:
        """Carry out one message on this simulated device; the bytes read (empty for a write)."""
        with self._lock:
            if m.read:
                reg = self._register(self.pointer)
                return (reg * (m.length // len(reg) + 1))[:m.length]
            if not m.data:
                return b""
            if m.data[0] >= self.REGISTERS:
                raise I2cNack(f"LM75 register {m.data[0]} does not exist")
            self.pointer = m.data[0]
            value = m.data[1:]
            if value:
                if self.pointer == 0:
                    raise I2cNack("the temperature register is read-only")
                if self.pointer == 1:
                    self.config = value[0]
                elif len(value) >= 2:
                    setattr(self, "t_hyst" if self.pointer == 2 else "t_os", int.from_bytes(value[:2], "big"))
            return b""


class HostAdapter:
    """Addresses ``addrs`` of the host adapter ``/dev/i2c-<bus>`` (i2c-dev)."""

    def __init__(self, bus: int, addrs: Sequence[int], *, path: str | None = None) -> None:
        self.bus = bus
        self.addrs = list(addrs)
        self.path = path or f"/dev/i2c-{bus}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def transfer(self, msgs: Sequence[I2cMsg]) -> list[bytes]:
        """Run ``msgs`` as one I2C_RDWR transaction on the host adapter; the bytes each read returned."""
        try:
            return i2c_rdwr(self.fd, msgs)
        except OSError as exc:
            raise I2cNack(f"{self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Close the host adapter (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_device_list(text: str) -> list[tuple[int, list[int]]]:
    """vhost-device-i2c's ``-l``: ``BUS:ADDR[:ADDR...][,BUS:ADDR...]`` (decimal)
    -> [(bus, [addr, ...]), ...]."""
    result = []
    seen: set[int] = set()
    for entry in text.split(","):
        parts = entry.split(":")
        if len(parts) < 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"device-list entry {entry!r}: BUS:ADDR[:ADDR...] in decimal")
        bus, addrs = int(parts[0]), [int(a) for a in parts[1:]]
        for a in addrs:
            if not 0 < a < 0x78:
                raise ValueError(f"address {a} outside 1..119")
            if a in seen:
                raise ValueError(f"address {a} listed twice")
            seen.add(a)
        result.append((bus, addrs))
    return result
