"""virtio-spi driven by the mock front-end playing the Linux driver
(drivers/spi/spi-virtio.c; QEMU 7.2 has no virtio-spi front-end): probe reads
cs_max_number, mode_func_supported, tx/rx_nbits_supported, bits_per_word_mask
and max_freq_hz from the config space; transfer_one sends the 32-byte head and
the tx buffer (readable), the rx buffer and the result byte (writable), one
transfer in flight.

No host spidev exists here (no /dev/spidev*): SpidevDevice is tested for its
ioctl encoding and its clean failure only.
"""
from __future__ import annotations

import logging
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostuser.devices import spi
from vhostuser.devices.spi import (
    VIRTIO_SPI_CPHA,
    VIRTIO_SPI_CPOL,
    VIRTIO_SPI_MODE_LOOP,
    VIRTIO_SPI_PARAM_ERR,
    VIRTIO_SPI_TRANS_ERR,
    VIRTIO_SPI_TRANS_OK,
    EepromDevice,
    LoopbackDevice,
    SpiBackend,
    SpiConfig,
    SpiDevice,
    SpiTransferError,
    TransferHead,
)
from vhostuser.sys_util import spidev
from vhostuser.testing import FrontendOptions, MockFrontend

TIMEOUT = 10.0
EEPROM_SIZE = 8192


class SpiDriver:
    """What spi-virtio.c does, on a mock front-end."""

    def __init__(self, socket_path: str) -> None:
        self.fe = MockFrontend.connect(socket_path, FrontendOptions(config_size=spi.CONFIG.size, queue_size=32,
                                                                    data_size=3 << 20))
        self.config = SpiConfig.unpack(self.fe.get_config(0, spi.CONFIG.size))  # virtio_spi_read_config

    def close(self) -> None:
        self.fe.close()

    def transfer_one(self, head: TransferHead, tx: bytes | None = None, rx_len: int = 0) -> tuple[int, bytes]:
        readable = [head.pack()] + ([tx] if tx is not None else [])
        writable = ([rx_len] if rx_len else []) + [1]
        used = self.fe.request(0, readable, writable, timeout=TIMEOUT)
        assert used.length == rx_len + 1
        return used.data[-1], used.data[:rx_len]

    def write_then_read(self, cs: int, tx: bytes, rx_len: int) -> bytes:
        """spi_write_then_read: a tx transfer then an rx transfer, chip select held."""
        result, _ = self.transfer_one(TransferHead(cs), tx)
        assert result == VIRTIO_SPI_TRANS_OK
        result, rx = self.transfer_one(TransferHead(cs), None, rx_len)
        assert result == VIRTIO_SPI_TRANS_OK
        return rx


@pytest.fixture
def eeprom_file(tmp_path) -> str:  # noqa: ANN001
    path = tmp_path / "eeprom.bin"
    path.write_bytes(bytes(range(256)) * (EEPROM_SIZE // 256))
    return str(path)


@pytest.fixture
def driver(serve_backend, eeprom_file):  # noqa: ANN001, ANN201
    backend = SpiBackend([LoopbackDevice(), EepromDevice(eeprom_file)], max_freq_hz=10_000_000)
    d = SpiDriver(serve_backend(backend))
    yield d
    d.close()


def test_config_space_describes_the_controller(driver) -> None:  # noqa: ANN001
    cfg = driver.config
    assert cfg.cs_max_number == 2 and cfg.max_freq_hz == 10_000_000
    assert cfg.mode_func_supported == 0x7F and cfg.bits_per_word_mask == 1 << 7
    assert cfg.tx_nbits_supported == 0 and cfg.rx_nbits_supported == 0


def test_loopback_full_duplex_and_half_duplex(driver) -> None:  # noqa: ANN001
    data = os.urandom(300)
    assert driver.transfer_one(TransferHead(0, freq=1_000_000, mode=VIRTIO_SPI_CPHA | VIRTIO_SPI_CPOL),
                               data, len(data)) == (VIRTIO_SPI_TRANS_OK, data)
    assert driver.transfer_one(TransferHead(0), b"write only") == (VIRTIO_SPI_TRANS_OK, b"")
    assert driver.transfer_one(TransferHead(0), None, 4) == (VIRTIO_SPI_TRANS_OK, b"\xff" * 4)
    assert driver.transfer_one(TransferHead(0)) == (VIRTIO_SPI_TRANS_OK, b"")  # zero-length: CS toggle only


def test_controller_loop_mode_reads_back_tx_on_any_chip_select(driver) -> None:  # noqa: ANN001
    assert driver.transfer_one(TransferHead(1, mode=VIRTIO_SPI_MODE_LOOP), b"\x9f\x00", 2) == \
        (VIRTIO_SPI_TRANS_OK, b"\x9f\x00")


def test_eeprom_reads_writes_and_persists(driver, eeprom_file) -> None:  # noqa: ANN001
    ee = 1
    # one full-duplex READ: 3 dummy bytes while cmd + address go out
    result, rx = driver.transfer_one(TransferHead(ee), b"\x03\x01\x10" + bytes(4), 7)
    assert result == VIRTIO_SPI_TRANS_OK and rx[3:] == bytes([0x10, 0x11, 0x12, 0x13])
    # at25-style: write-then-read
    assert driver.write_then_read(ee, b"\x03\x00\xfe", 4) == bytes([0xFE, 0xFF, 0x00, 0x01])
    # write without WREN is ignored
    assert driver.transfer_one(TransferHead(ee), b"\x02\x00\x00hello")[0] == VIRTIO_SPI_TRANS_OK
    assert driver.write_then_read(ee, b"\x03\x00\x00", 5) == bytes(range(5))
    # WREN, RDSR shows WEL, WRITE (command transfer + data transfer), WEL cleared
    assert driver.transfer_one(TransferHead(ee), b"\x06")[0] == VIRTIO_SPI_TRANS_OK
    assert driver.write_then_read(ee, b"\x05", 1) == b"\x02"
    assert driver.transfer_one(TransferHead(ee), b"\x02\x10\x00")[0] == VIRTIO_SPI_TRANS_OK
    assert driver.transfer_one(TransferHead(ee, cs_change=1), b"persistent")[0] == VIRTIO_SPI_TRANS_OK
    assert driver.write_then_read(ee, b"\x05", 1) == b"\x00"
    assert driver.write_then_read(ee, b"\x03\x10\x00", 10) == b"persistent"
    assert driver.write_then_read(ee, b"\x9f", 3) == EepromDevice.JEDEC_ID
    with open(eeprom_file, "rb") as f:
        f.seek(0x1000)
        assert f.read(10) == b"persistent"


BAD_HEADS = [
    pytest.param(TransferHead(chip_select_id=2), id="chip-select-out-of-range"),
    pytest.param(TransferHead(chip_select_id=255), id="chip-select-255"),
    pytest.param(TransferHead(bits_per_word=16), id="16-bit-words"),
    pytest.param(TransferHead(bits_per_word=0), id="0-bit-words"),
    pytest.param(TransferHead(tx_nbits=4), id="quad-tx"),
    pytest.param(TransferHead(rx_nbits=3), id="invalid-rx-nbits"),
    pytest.param(TransferHead(mode=1 << 5), id="undefined-mode-bit"),
    pytest.param(TransferHead(freq=20_000_000), id="clock-too-fast"),
    pytest.param(TransferHead(word_delay_ns=10), id="word-delay-unsupported"),
    pytest.param(TransferHead(cs_setup_ns=10), id="cs-setup-unsupported"),
]


@pytest.mark.parametrize("head", BAD_HEADS)
def test_bad_heads_get_param_err_and_a_log_line(driver, head: TransferHead, caplog) -> None:  # noqa: ANN001
    with caplog.at_level(logging.WARNING, logger="vhostuser.devices.spi"):
        result, _ = driver.transfer_one(head, b"abcd", 4)
    assert result == VIRTIO_SPI_PARAM_ERR
    assert "parameter error" in caplog.text
    assert driver.transfer_one(TransferHead(0), b"ok", 2) == (VIRTIO_SPI_TRANS_OK, b"ok")


def test_malformed_requests(no_fd_leak, driver, caplog) -> None:  # noqa: ANN001
    fe = driver.fe
    with caplog.at_level(logging.WARNING, logger="vhostuser.devices.spi"):
        # a head shorter than 32 bytes
        assert fe.request(0, [b"\x00" * 10], [1], timeout=TIMEOUT).data == bytes([VIRTIO_SPI_PARAM_ERR])
        # full duplex with tx and rx of different lengths
        assert driver.transfer_one(TransferHead(0), b"abc", 5)[0] == VIRTIO_SPI_PARAM_ERR
        # oversized
        big = spi.MAX_TRANSFER + 1
        assert fe.request(0, [TransferHead(0).pack()], [big, 1], timeout=TIMEOUT).data[-1] == VIRTIO_SPI_PARAM_ERR
        # no room for the result: returned with length 0
        assert fe.request(0, [TransferHead(0).pack(), b"x"], [], timeout=TIMEOUT).length == 0
    assert "shorter than" in caplog.text and "full-duplex" in caplog.text and "result byte" in caplog.text
    assert driver.transfer_one(TransferHead(0), b"still", 5) == (VIRTIO_SPI_TRANS_OK, b"still")


class FailingDevice(SpiDevice):
    def transfer(self, head: TransferHead, tx: bytes | None, rx_len: int) -> bytes:
        raise SpiTransferError("the wire is cut")


def test_device_failure_is_trans_err(serve_backend, caplog) -> None:  # noqa: ANN001
    d = SpiDriver(serve_backend(SpiBackend([FailingDevice(), LoopbackDevice()])))
    try:
        with caplog.at_level(logging.WARNING, logger="vhostuser.devices.spi"):
            assert d.transfer_one(TransferHead(0), b"x", 1)[0] == VIRTIO_SPI_TRANS_ERR
        assert "the wire is cut" in caplog.text
        assert d.transfer_one(TransferHead(1), b"y", 1) == (VIRTIO_SPI_TRANS_OK, b"y")
        assert d.config.max_freq_hz == 0  # no limit
    finally:
        d.close()


def test_spidev_ioctl_encoding_and_missing_device(tmp_path) -> None:  # noqa: ANN001
    # the numbers from include/uapi/linux/spi/spidev.h
    assert spidev.SPI_IOC_TRANSFER.size == 32
    assert spidev.SPI_IOC_MESSAGE_1 == 0x40206B00
    assert spidev.SPI_IOC_WR_MODE32 == 0x40046B05 and spidev.SPI_IOC_RD_MAX_SPEED_HZ == 0x80046B04
    with pytest.raises(OSError):
        spi.SpidevDevice(str(tmp_path / "spidev9.9"))
    # a file that is not a spidev: the ioctl fails and becomes TRANS_ERR's exception
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    dev = spi.SpidevDevice(str(plain))
    try:
        with pytest.raises(SpiTransferError):
            dev.transfer(TransferHead(0), b"x", 1)
    finally:
        dev.close()


def test_command_flags(tmp_path, eeprom_file) -> None:  # noqa: ANN001
    devices = spi.make_devices(None, ["loopback", f"eeprom:{eeprom_file}"])
    assert [type(d) for d in devices] == [LoopbackDevice, EepromDevice]
    for d in devices:
        d.close()
    for bad in (["bogus"], ["eeprom"], [f"loopback:{eeprom_file}"]):
        with pytest.raises(ValueError):
            spi.make_devices(None, bad)
    with pytest.raises(ValueError):
        spi.make_devices(None, [])
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        spi.make_devices(None, [f"eeprom:{empty}"])


def test_command_serves_simulated_devices(tmp_path, eeprom_file) -> None:  # noqa: ANN001
    import signal
    import subprocess

    from helpers.procs import vhostuser_process, wait_for_path

    sock = tmp_path / "spi.sock"
    with vhostuser_process(["spi", "--socket-path", str(sock), "--simulate", "loopback",
                            "--simulate", f"eeprom:{eeprom_file}", "--max-speed", "5000000"],
                           stderr=subprocess.PIPE, text=True) as proc:
        wait_for_path(sock, proc)
        d = SpiDriver(str(sock))
        try:
            assert d.config.cs_max_number == 2 and d.config.max_freq_hz == 5_000_000
            assert d.write_then_read(1, b"\x03\x00\x10", 3) == bytes([0x10, 0x11, 0x12])
        finally:
            d.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


@given(head=st.builds(TransferHead, *(st.integers(0, 255) for _ in range(5)),
                      *(st.integers(0, 2**32 - 1) for _ in range(6))),
       tx_len=st.integers(0, 2 * spi.MAX_TRANSFER), rx_len=st.integers(0, 2 * spi.MAX_TRANSFER))
def test_check_head_accepts_only_what_the_config_offers(head: TransferHead, tx_len: int, rx_len: int) -> None:
    backend = SpiBackend([LoopbackDevice(), LoopbackDevice()], max_freq_hz=10_000_000)
    problem = backend.check_head(head, tx_len, rx_len)
    if problem is None:
        assert head.chip_select_id < 2 and head.bits_per_word == 8 and head.mode <= 0x1F
        assert head.tx_nbits in (0, 1) and head.rx_nbits in (0, 1) and head.freq <= 10_000_000
        assert not (head.word_delay_ns or head.cs_setup_ns or head.cs_delay_hold_ns
                    or head.cs_change_delay_inactive_ns)
        assert not (tx_len and rx_len and tx_len != rx_len) and max(tx_len, rx_len) <= spi.MAX_TRANSFER


def test_control_plane_conformance(no_fd_leak, serve_backend, eeprom_file) -> None:  # noqa: ANN001
    from vhostuser.testing.checker import format_report, run_checks

    results = run_checks(serve_backend(SpiBackend([LoopbackDevice(), EepromDevice(eeprom_file)])), timeout=5)
    assert all(r.status in ("pass", "skip") for r in results), format_report(results)
    assert sum(r.status == "pass" for r in results) >= 10, format_report(results)


_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 1023), st.binary(min_size=1, max_size=40), st.booleans()),
    st.tuples(st.just("read"), st.integers(0, 1023), st.integers(1, 40), st.booleans())), max_size=25)


@given(ops=_ops)
def test_eeprom_matches_a_byte_array_model(tmp_path_factory, ops) -> None:  # noqa: ANN001
    path = tmp_path_factory.mktemp("ee") / "ee.bin"
    path.write_bytes(bytes(1024))
    model = bytearray(1024)
    dev = EepromDevice(str(path))
    head = TransferHead(0)
    try:
        for op, addr, arg, split in ops:
            cmd = bytes([0x02 if op == "write" else 0x03]) + addr.to_bytes(2, "big")
            if op == "write":
                dev.transfer(head, b"\x06", 0)
                if split:  # command transfer, then a data transfer
                    dev.transfer(head, cmd, 0)
                    dev.transfer(head, arg, 0)
                else:
                    dev.transfer(head, cmd + arg, 0)
                for k, b in enumerate(arg):
                    model[(addr + k) % 1024] = b
            elif split:  # write-then-read
                dev.transfer(head, cmd, 0)
                got = dev.transfer(head, None, arg)
                assert got == bytes(model[(addr + k) % 1024] for k in range(arg))
            else:  # one full-duplex transfer
                got = dev.transfer(head, cmd + bytes(arg), 3 + arg)
                assert got[3:] == bytes(model[(addr + k) % 1024] for k in range(arg))
    finally:
        dev.close()
    assert path.read_bytes() == bytes(model)
