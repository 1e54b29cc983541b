"""Host SPI devices through Linux's spidev character device (``/dev/spidevB.C``).

The OS part of the spi device: one full-duplex transfer per
``SPI_IOC_MESSAGE(1)`` ioctl, with the mode set by ``SPI_IOC_WR_MODE32``
(``include/uapi/linux/spi/spidev.h``).  Other systems have no spidev:
:class:`Spidev` then fails to open with :class:`OSError`.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import struct

_IOC_WRITE, _IOC_READ = 1, 2
_SPI_IOC_MAGIC = ord("k")


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_SPI_IOC_MAGIC << 8) | nr


#: struct spi_ioc_transfer: tx_buf, rx_buf, len, speed_hz, delay_usecs,
#: bits_per_word, cs_change, tx_nbits, rx_nbits, word_delay_usecs, pad
SPI_IOC_TRANSFER = struct.Struct("<QQIIHBBBBBB")
SPI_IOC_MESSAGE_1 = _ioc(_IOC_WRITE, 0, SPI_IOC_TRANSFER.size)
SPI_IOC_RD_MAX_SPEED_HZ = _ioc(_IOC_READ, 4, 4)
SPI_IOC_RD_MODE32 = _ioc(_IOC_READ, 5, 4)
SPI_IOC_WR_MODE32 = _ioc(_IOC_WRITE, 5, 4)


class Spidev:
    """An open ``/dev/spidevB.C``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _read_u32(self, request: int) -> int:
        buf = bytearray(4)
        fcntl.ioctl(self.fd, request, buf)
        return int.from_bytes(buf, "little")

    @property
    def max_speed_hz(self) -> int:
        """The device's maximum clock rate."""
        return self._read_u32(SPI_IOC_RD_MAX_SPEED_HZ)

    def set_mode(self, mode: int) -> None:
        """``SPI_IOC_WR_MODE32`` (SPI_CPHA, SPI_CPOL, SPI_CS_HIGH, SPI_LSB_FIRST, SPI_LOOP bits)."""
        fcntl.ioctl(self.fd, SPI_IOC_WR_MODE32, struct.pack("<I", mode))

    def transfer(self, tx: bytes | None, rx_len: int, *, speed_hz: int = 0, bits_per_word: int = 8,
                 cs_change: bool = False, delay_usecs: int = 0, word_delay_usecs: int = 0,
                 tx_nbits: int = 0, rx_nbits: int = 0) -> bytes:
        """One transfer (a one-transfer SPI message); returns the ``rx_len`` bytes read."""
        length = len(tx) if tx is not None else rx_len
        txbuf = ctypes.create_string_buffer(tx, length) if tx is not None else None
        rxbuf = ctypes.create_string_buffer(rx_len) if rx_len else None
        xfer = SPI_IOC_TRANSFER.pack(
            ctypes.addressof(txbuf) if txbuf is not None else 0,
            ctypes.addressof(rxbuf) if rxbuf is not None else 0,
            length, speed_hz, min(delay_usecs, 0xFFFF), bits_per_word, int(cs_change),
            tx_nbits, rx_nbits, min(word_delay_usecs, 0xFF), 0)
        fcntl.ioctl(self.fd, SPI_IOC_MESSAGE_1, xfer)
        return rxbuf.raw[:rx_len] if rxbuf is not None else b""
