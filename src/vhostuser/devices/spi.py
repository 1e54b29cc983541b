"""virtio-spi (device id 45): an SPI controller for the guest.

One queue (virtio spec 1.4, "SPI Controller Device").  Each request is one
transfer: a 32-byte ``virtio_spi_transfer_head`` and the tx bytes (readable),
then the rx bytes and a one-byte result (writable).  The config space
(``virtio_spi_config``) tells the driver the chip selects, the modes, word
sizes and the maximum clock.

Each chip select has an :class:`SpiDevice` behind it:

* :class:`LoopbackDevice` — MISO wired to MOSI: it reads back what is written;
* :class:`EepromDevice` — a 25xx-style SPI EEPROM (WREN, WRDI, RDSR, READ,
  WRITE, RDID) whose contents live in a host file;
* :class:`SpidevDevice` — a host ``/dev/spidevB.C`` (one transfer per ioctl).

A transfer whose head is invalid or asks for something the config space does
not offer (chip select out of range, an unsupported mode bit, word size, n-bit
mode or delay, a clock above ``max_freq_hz``, tx and rx of different lengths,
more than :data:`MAX_TRANSFER` bytes) gets ``VIRTIO_SPI_PARAM_ERR``; a device
that fails gets ``VIRTIO_SPI_TRANS_ERR``.  Both are logged and the queue keeps
serving.  A chain without room for the result byte is returned with length 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..backend import VhostUserBackend
from ..sys_util.spidev import Spidev
from ..virtqueue.chain import DescriptorChain, Writer
from ..vring import VringState

log = logging.getLogger(__name__)

VIRTIO_ID_SPI = 45

VIRTIO_SPI_TRANS_OK = 0
VIRTIO_SPI_PARAM_ERR = 1
VIRTIO_SPI_TRANS_ERR = 2

# transfer head ``mode`` bits
VIRTIO_SPI_CPHA = 1 << 0
VIRTIO_SPI_CPOL = 1 << 1
VIRTIO_SPI_CS_HIGH = 1 << 2
VIRTIO_SPI_MODE_LSB_FIRST = 1 << 3
VIRTIO_SPI_MODE_LOOP = 1 << 4

# config ``mode_func_supported`` bits
VIRTIO_SPI_MF_SUPPORT_CPHA_0 = 1 << 0
VIRTIO_SPI_MF_SUPPORT_CPHA_1 = 1 << 1
VIRTIO_SPI_MF_SUPPORT_CPOL_0 = 1 << 2
VIRTIO_SPI_MF_SUPPORT_CPOL_1 = 1 << 3
VIRTIO_SPI_MF_SUPPORT_CS_HIGH = 1 << 4
VIRTIO_SPI_MF_SUPPORT_LSB_FIRST = 1 << 5
VIRTIO_SPI_MF_SUPPORT_LOOPBACK = 1 << 6
ALL_MODES = 0x7F

# config ``tx/rx_nbits_supported`` bits
VIRTIO_SPI_RX_TX_SUPPORT_DUAL = 1 << 0
VIRTIO_SPI_RX_TX_SUPPORT_QUAD = 1 << 1
VIRTIO_SPI_RX_TX_SUPPORT_OCTAL = 1 << 2
_NBITS_SUPPORT = {2: VIRTIO_SPI_RX_TX_SUPPORT_DUAL, 4: VIRTIO_SPI_RX_TX_SUPPORT_QUAD,
                  8: VIRTIO_SPI_RX_TX_SUPPORT_OCTAL}

#: the largest transfer (tx or rx bytes) the device accepts
MAX_TRANSFER = 1 << 20

CONFIG = struct.Struct("<BBBBIIIIIII")
HEAD = struct.Struct("<BBBBB3xIIIIII")


@dataclass(frozen=True)
class SpiConfig:
    """``struct virtio_spi_config``."""

    cs_max_number: int = 1
    cs_change_supported: int = 1
    tx_nbits_supported: int = 0
    rx_nbits_supported: int = 0
    #: bit n set: words of n+1 bits (0: any); default 8-bit words only
    bits_per_word_mask: int = 1 << 7
    mode_func_supported: int = ALL_MODES
    max_freq_hz: int = 0
    max_word_delay_ns: int = 0
    max_cs_setup_ns: int = 0
    max_cs_hold_ns: int = 0
    max_cs_inactive_ns: int = 0

    def pack(self) -> bytes:
        """The config space bytes (``struct virtio_spi_config``, little-endian)."""
        return CONFIG.pack(self.cs_max_number, self.cs_change_supported, self.tx_nbits_supported,
                           self.rx_nbits_supported, self.bits_per_word_mask, self.mode_func_supported,
                           self.max_freq_hz, self.max_word_delay_ns, self.max_cs_setup_ns, self.max_cs_hold_ns,
                           self.max_cs_inactive_ns)

    @classmethod
    def unpack(cls, raw: bytes) -> SpiConfig:
        """Parse a ``struct virtio_spi_config``."""
        return cls(*CONFIG.unpack(raw))


@dataclass(frozen=True)
class TransferHead:
    """``struct virtio_spi_transfer_head``."""

    chip_select_id: int = 0
    bits_per_word: int = 8
    cs_change: int = 0
    tx_nbits: int = 0
    rx_nbits: int = 0
    mode: int = 0
    freq: int = 0
    word_delay_ns: int = 0
    cs_setup_ns: int = 0
    cs_delay_hold_ns: int = 0
    cs_change_delay_inactive_ns: int = 0

    def pack(self) -> bytes:
        """The request header bytes (``struct virtio_spi_transfer_head``)."""
        return HEAD.pack(self.chip_select_id, self.bits_per_word, self.cs_change, self.tx_nbits, self.rx_nbits,
                         self.mode, self.freq, self.word_delay_ns, self.cs_setup_ns, self.cs_delay_hold_ns,
                         self.cs_change_delay_inactive_ns)

    @classmethod
    def unpack(cls, raw: bytes) -> TransferHead:
        """Parse a ``struct virtio_spi_transfer_head`` (from the start of ``raw``)."""
        return cls(*HEAD.unpack_from(raw))


class SpiTransferError(Exception):
    """The device could not do a valid transfer (VIRTIO_SPI_TRANS_ERR)."""


class SpiDevice:
    """What sits on one chip select."""

    #: the delays and modes this device can honour (merged into the config space)
    mode_func_supported = ALL_MODES
    max_word_delay_ns = 0
    max_cs_hold_ns = 0

    def transfer(self, head: TransferHead, tx: bytes | None, rx_len: int) -> bytes:
        """Clock ``tx`` out (None: half-duplex read) and return ``rx_len`` bytes read."""
        raise NotImplementedError

    def reset(self) -> None:
        """The controller was reset (chip select released)."""

    def close(self) -> None:
        """Release the device."""


class LoopbackDevice(SpiDevice):
    """MISO wired to MOSI: a full-duplex transfer reads back its tx bytes; a
    half-duplex read sees the idle line (0xFF)."""

    def transfer(self, head: TransferHead, tx: bytes | None, rx_len: int) -> bytes:
        return tx[:rx_len] if tx is not None else b"\xff" * rx_len


class EepromDevice(SpiDevice):
    """A 25xx-style SPI EEPROM backed by ``path`` (its size is the file's; 2
    address bytes up to 64 KiB, else 3).

    Commands: WREN 0x06, WRDI 0x04, RDSR 0x05 (bit 1: write enabled), READ
    0x03 + address, WRITE 0x02 + address + data (needs WREN first; clears it),
    RDID 0x9F (JEDEC id).  virtio-spi carries single transfers, not SPI
    messages, so chip-select framing is inferred: a transfer with tx bytes
    starts a new command unless the open one still waits for its address or
    (WRITE) its first data bytes, or the previous transfer asked for a
    chip-select toggle (``cs_change``); a half-duplex read continues the open
    command (READ streams on, RDSR repeats the status).  That covers what
    Linux's at25 and spi-nor drivers send: one full-duplex transfer, or a
    command transfer followed by a read or write transfer.
    """

    WREN, WRDI, RDSR, READ, WRITE, RDID = 0x06, 0x04, 0x05, 0x03, 0x02, 0x9F
    JEDEC_ID = b"\x29\x00\x00"  # an "unknown" manufacturer: this is a simulation

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        if self.size == 0:
            os.close(self.fd)
            raise ValueError(f"EEPROM file {path} is empty: make it the EEPROM's size (e.g. truncate -s 8K)")
        self.addr_bytes = 2 if self.size <= 0x10000 else 3
        self.write_enabled = False
        self._cmd = bytearray()  # the open command's bytes so far
        self._cursor = 0         # READ/WRITE address, RDID index
        self._lock = threading.Lock()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reset(self) -> None:
        with self._lock:
            self._cmd.clear()
            self.write_enabled = False

    def _needs_more(self) -> bool:
        if not self._cmd:
            return False
        op = self._cmd[0]
        if op in (self.READ, self.WRITE):
            return len(self._cmd) < 1 + self.addr_bytes + (1 if op == self.WRITE else 0)
        return False

    def _clock(self, byte_in: int | None) -> int:
        """One byte time: ``byte_in`` on MOSI (None: a read, MOSI don't-care); returns MISO."""
        if not self._cmd:
            if byte_in is None:
                return 0xFF
            self._cmd.append(byte_in)
            if byte_in == self.WREN:
                self.write_enabled = True
            elif byte_in == self.WRDI:
                self.write_enabled = False
            self._cursor = 0
            return 0xFF
        op = self._cmd[0]
        if op in (self.READ, self.WRITE) and len(self._cmd) < 1 + self.addr_bytes:
            self._cmd.append(0 if byte_in is None else byte_in)
            if len(self._cmd) == 1 + self.addr_bytes:
                self._cursor = int.from_bytes(self._cmd[1:], "big") % self.size
            return 0xFF
        if op == self.READ:
            out = os.pread(self.fd, 1, self._cursor)[0]
            self._cursor = (self._cursor + 1) % self.size
            return out
        if op == self.WRITE:
            if byte_in is not None:
                if len(self._cmd) == 1 + self.addr_bytes:
                    self._cmd.append(0)  # mark: data started
                if self.write_enabled:
                    os.pwrite(self.fd, bytes([byte_in]), self._cursor)
                self._cursor = (self._cursor + 1) % self.size
            return 0xFF
        if op == self.RDSR:
            return 0x02 if self.write_enabled else 0x00
        if op == self.RDID:
            out = self.JEDEC_ID[self._cursor] if self._cursor < len(self.JEDEC_ID) else 0xFF
            self._cursor += 1
            return out
        return 0xFF  # WREN/WRDI/unknown: nothing more to say

    def _end_command(self) -> None:
        if self._cmd and self._cmd[0] == self.WRITE and len(self._cmd) > 1 + self.addr_bytes:
            self.write_enabled = False  # a completed write clears WEL
        self._cmd.clear()

    def transfer(self, head: TransferHead, tx: bytes | None, rx_len: int) -> bytes:
        with self._lock:
            if tx is not None and tx and not self._needs_more():
                self._end_command()
            if tx is not None:
                out = bytes(self._clock(b) for b in tx)
            else:
                out = bytes(self._clock(None) for _ in range(rx_len))
            if head.cs_change:
                self._end_command()
        return out[:rx_len]


class SpidevDevice(SpiDevice):
    """A host ``/dev/spidevB.C``."""

    max_word_delay_ns = 255_000
    max_cs_hold_ns = 65_535_000

    def __init__(self, path: str) -> None:
        self.dev = Spidev(path)

    def close(self) -> None:
        self.dev.close()

    def transfer(self, head: TransferHead, tx: bytes | None, rx_len: int) -> bytes:
        mode = head.mode & (VIRTIO_SPI_CPHA | VIRTIO_SPI_CPOL | VIRTIO_SPI_CS_HIGH | VIRTIO_SPI_MODE_LSB_FIRST)
        if head.mode & VIRTIO_SPI_MODE_LOOP:
            mode |= 0x20  # SPI_LOOP in the kernel's numbering
        try:
            self.dev.set_mode(mode)
            return self.dev.transfer(tx, rx_len, speed_hz=head.freq, bits_per_word=head.bits_per_word,
                                     cs_change=bool(head.cs_change), delay_usecs=head.cs_delay_hold_ns // 1000,
                                     word_delay_usecs=head.word_delay_ns // 1000,
                                     tx_nbits=head.tx_nbits, rx_nbits=head.rx_nbits)
        except OSError as exc:
            raise SpiTransferError(f"{self.dev.path}: {exc}") from exc


class SpiBackend(VhostUserBackend):
    """A virtio-spi controller; ``devices[i]`` answers chip select ``i``."""

    num_queues = 1
    max_queue_size = 1024

    def __init__(self, devices: Sequence[SpiDevice], *, max_freq_hz: int = 0) -> None:
        super().__init__()
        if not 1 <= len(devices) <= 255:
            raise ValueError("an SPI controller has 1 to 255 chip selects")
        self.devices = list(devices)
        modes = ALL_MODES
        for d in self.devices:
            modes &= d.mode_func_supported
        self.config = SpiConfig(
            cs_max_number=len(self.devices), mode_func_supported=modes, max_freq_hz=max_freq_hz,
            max_word_delay_ns=min(d.max_word_delay_ns for d in self.devices),
            max_cs_hold_ns=min(d.max_cs_hold_ns for d in self.devices))
        self.config_space = self.config.pack()

    def close(self) -> None:
        """Close the chip-select devices (the command and the fixtures call it at the end)."""
        for d in self.devices:
            d.close()

    def reset_device(self) -> None:
        super().reset_device()
        for d in self.devices:
            d.reset()

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        vring = vrings[0]
        if not vring.is_running:
            return
        used = []
        while (chain := vring.pop_descriptor_chain()) is not None:
            used.append((chain, self._serve(chain)))
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()

    def check_head(self, head: TransferHead, tx_len: int, rx_len: int) -> str | None:
        """Why ``head`` (with these buffer sizes) is a parameter error, or None."""
        cfg = self.config
        if head.chip_select_id >= cfg.cs_max_number:
            return f"chip select {head.chip_select_id} out of range (the controller has {cfg.cs_max_number})"
        if head.bits_per_word == 0 or head.bits_per_word > 32 or (
                cfg.bits_per_word_mask and not cfg.bits_per_word_mask & (1 << (head.bits_per_word - 1))):
            return f"{head.bits_per_word} bits per word not supported (mask {cfg.bits_per_word_mask:#x})"
        if head.cs_change and not cfg.cs_change_supported:
            return "cs_change not supported"
        for name, nbits, supported in (("tx", head.tx_nbits, cfg.tx_nbits_supported),
                                       ("rx", head.rx_nbits, cfg.rx_nbits_supported)):
            if nbits not in (0, 1) and not supported & _NBITS_SUPPORT.get(nbits, 0):
                return f"{name}_nbits {nbits} not supported"
        if head.mode & ~0x1F:
            return f"undefined mode bits {head.mode:#x}"
        mf = cfg.mode_func_supported
        for bit, one, zero, name in ((VIRTIO_SPI_CPHA, VIRTIO_SPI_MF_SUPPORT_CPHA_1, VIRTIO_SPI_MF_SUPPORT_CPHA_0,
                                      "CPHA"),
                                     (VIRTIO_SPI_CPOL, VIRTIO_SPI_MF_SUPPORT_CPOL_1, VIRTIO_SPI_MF_SUPPORT_CPOL_0,
                                      "CPOL")):
            if not mf & (one if head.mode & bit else zero):
                return f"{name}={int(bool(head.mode & bit))} not supported"
        for bit, support, name in ((VIRTIO_SPI_CS_HIGH, VIRTIO_SPI_MF_SUPPORT_CS_HIGH, "CS_HIGH"),
                                   (VIRTIO_SPI_MODE_LSB_FIRST, VIRTIO_SPI_MF_SUPPORT_LSB_FIRST, "LSB_FIRST"),
                                   (VIRTIO_SPI_MODE_LOOP, VIRTIO_SPI_MF_SUPPORT_LOOPBACK, "LOOP")):
            if head.mode & bit and not mf & support:
                return f"mode {name} not supported"
        if cfg.max_freq_hz and head.freq > cfg.max_freq_hz:
            return f"clock {head.freq} Hz above the maximum {cfg.max_freq_hz} Hz"
        for name, value, limit in (("word_delay_ns", head.word_delay_ns, cfg.max_word_delay_ns),
                                   ("cs_setup_ns", head.cs_setup_ns, cfg.max_cs_setup_ns),
                                   ("cs_delay_hold_ns", head.cs_delay_hold_ns, cfg.max_cs_hold_ns),
                                   ("cs_change_delay_inactive_ns", head.cs_change_delay_inactive_ns,
                                    cfg.max_cs_inactive_ns)):
            if value > limit:
                return f"{name} {value} above the supported {limit}"
        if tx_len and rx_len and tx_len != rx_len:
            return f"full-duplex transfer with {tx_len} tx and {rx_len} rx bytes"
        if max(tx_len, rx_len) > MAX_TRANSFER:
            return f"transfer of {max(tx_len, rx_len)} bytes above the maximum {MAX_TRANSFER}"
        return None

    def _serve(self, chain: DescriptorChain) -> int:
        if chain.writable_length < 1:
            log.warning("spi: request without room for its result byte (%d readable bytes) ignored",
                        chain.readable_length)
            return 0
        rx_len = chain.writable_length - 1
        tx_len = max(0, chain.readable_length - HEAD.size)
        writer = chain.writer()
        if chain.readable_length < HEAD.size:
            log.warning("spi: request of %d readable bytes, shorter than the %d-byte transfer head",
                        chain.readable_length, HEAD.size)
            return self._result(writer, rx_len, VIRTIO_SPI_PARAM_ERR)
        reader = chain.reader()
        head = TransferHead.unpack(reader.read_exact(HEAD.size))
        problem = self.check_head(head, tx_len, rx_len)
        if problem is not None:
            log.warning("spi: parameter error: %s", problem)
            return self._result(writer, rx_len, VIRTIO_SPI_PARAM_ERR)
        tx = reader.read_exact(tx_len) if tx_len else None
        device = self.devices[head.chip_select_id]
        try:
            if head.mode & VIRTIO_SPI_MODE_LOOP:
                rx = (tx or b"")[:rx_len].ljust(rx_len, b"\xff")  # the controller loops MOSI back to MISO
            else:
                rx = device.transfer(head, tx, rx_len)
        except (SpiTransferError, OSError) as exc:
            log.warning("spi: transfer on chip select %d failed: %s", head.chip_select_id, exc)
            return self._result(writer, rx_len, VIRTIO_SPI_TRANS_ERR)
        writer.write(rx.ljust(rx_len, b"\xff")[:rx_len])
        writer.write(bytes([VIRTIO_SPI_TRANS_OK]))
        return rx_len + 1

    @staticmethod
    def _result(writer: Writer, rx_len: int, result: int) -> int:
        writer.advance(rx_len)
        writer.write(bytes([result]))
        return rx_len + 1


# --------------------------------------------------------------------- command
DESCRIPTION = """virtio-spi vhost-user back-end (device id 45).

An SPI controller for the guest (drivers/spi/spi-virtio.c).  Chip select 0 is the
host device given with -l/--device (rust-vmm's flag), if any; each --simulate adds
a simulated device on the next chip select:
  loopback            reads back what is written (full duplex)
  eeprom:FILE         a 25xx SPI EEPROM whose contents are FILE (its size)
QEMU 7.2 has no virtio-spi front-end; a newer QEMU's generic vhost-user-device-pci
(virtio-id=45, num_vqs=1, config_size=32) can drive it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vhostuser spi`` options: the back-end conventions' flags plus the device's own."""
    from .common import add_backend_arguments

    add_backend_arguments(parser)
    parser.add_argument("-l", "--device", metavar="PATH", default=None,
                        help="host SPI device (/dev/spidevB.C) on chip select 0")
    parser.add_argument("--simulate", action="append", default=[], metavar="KIND[:FILE]",
                        help="a simulated device on the next chip select: loopback, eeprom:FILE (repeatable)")
    parser.add_argument("--max-speed", type=int, default=None, metavar="HZ",
                        help="max_freq_hz in the config space (default: the host device's, else no limit)")


def make_devices(host_device: str | None, simulate: Sequence[str]) -> list[SpiDevice]:
    """The chip selects' devices for the command's flags."""
    devices: list[SpiDevice] = []
    try:
        if host_device is not None:
            devices.append(SpidevDevice(host_device))
        for spec in simulate:
            kind, _, arg = spec.partition(":")
            if kind == "loopback" and not arg:
                devices.append(LoopbackDevice())
            elif kind == "eeprom" and arg:
                devices.append(EepromDevice(arg))
            else:
                raise ValueError(f"--simulate {spec!r}: expected loopback or eeprom:FILE")
    except (OSError, ValueError):
        for d in devices:
            d.close()
        raise
    if not devices:
        raise ValueError("give -l/--device or at least one --simulate")
    return devices


def run(args: argparse.Namespace) -> int:
    """Serve ``vhostuser spi`` as parsed into ``args`` until SIGTERM/SIGINT; the exit status."""
    from .common import capabilities, serve_backends

    def make(i: int) -> SpiBackend:
        devices = make_devices(args.device, args.simulate)
        speed = args.max_speed
        if speed is None and isinstance(devices[0], SpidevDevice):
            speed = devices[0].dev.max_speed_hz
        return SpiBackend(devices, max_freq_hz=speed or 0)

    return serve_backends("spi", args, make, capabilities("spi"))
