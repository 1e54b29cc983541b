"""The virtio-i2c device through the daemon; the mock front-end plays Linux's
drivers/i2c/busses/i2c-virtio.c: one request per i2c_msg, FAIL_NEXT on all but
the last, zero-length requests for SMBus quick (i2cdetect); simulated EEPROM
and temperature sensor; bad requests get VIRTIO_I2C_MSG_ERR."""
from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.procs import vhostuser_process, wait_for_path

from vhostuser.devices.i2c import protocol as p
from vhostuser.devices.i2c.bus import Eeprom, HostAdapter, TemperatureSensor, parse_device_list
from vhostuser.devices.i2c.device import I2cBackend
from vhostuser.sys_util import i2cdev
from vhostuser.testing import FrontendOptions, MockFrontend

OPTS = FrontendOptions(queue_size=128, device_features=p.F_ZERO_LENGTH_REQUEST)
EEPROM, SENSOR = 0x50, 0x48
OK, ERR = p.Status.OK, p.Status.ERR


def hdr(addr: int, flags: int) -> bytes:
    return p.OUT_HDR.pack(addr << 1, 0, flags)


def xfer(fe: MockFrontend, *msgs: tuple[int, bytes | int]) -> list[tuple[int, bytes]]:
    """i2c_transfer: (addr, bytes to write | number of bytes to read) per message."""
    reqs = []
    for i, (addr, what) in enumerate(msgs):
        flags = p.FLAGS_FAIL_NEXT if i != len(msgs) - 1 else 0
        if isinstance(what, int):
            reqs.append(([hdr(addr, flags | p.FLAGS_M_RD)], ([what] if what else []) + [1]))
        else:
            reqs.append(([hdr(addr, flags)] + ([what] if what else []), [1]))
    out = []
    for u in fe.transfer(0, reqs):
        status = u.data[u.length - 1]
        out.append((status, u.data[:u.length - 1] if status == OK else b""))  # a failed read's buffer is junk
    return out


@pytest.fixture
def bus(no_fd_leak, serve_backend, tmp_path: Path):  # noqa: ANN001, ANN201
    eeprom_file = tmp_path / "eeprom.bin"
    eeprom_file.write_bytes(bytes(range(256)))
    sensor = TemperatureSensor(21.5)
    backend = I2cBackend({EEPROM: Eeprom(str(eeprom_file)), SENSOR: sensor})
    path = serve_backend(backend)
    try:
        with MockFrontend.connect(path, OPTS) as fe:
            yield fe, backend, eeprom_file, sensor
    finally:
        backend.close()


def test_smbus_style_reads_and_writes_hit_the_eeprom_file(bus) -> None:  # noqa: ANN001
    fe, backend, eeprom_file, _ = bus
    assert fe.acked_features & p.F_ZERO_LENGTH_REQUEST
    # i2cget 0x50 0x10: write the register, read one byte (repeated start)
    assert xfer(fe, (EEPROM, b"\x10"), (EEPROM, 1)) == [(OK, b""), (OK, b"\x10")]
    # i2cset 0x50 0x20 0xab
    assert xfer(fe, (EEPROM, b"\x20\xab")) == [(OK, b"")]
    assert eeprom_file.read_bytes()[0x20] == 0xAB  # persisted in the host file
    # i2ctransfer: a block write, then a block read that wraps around the end
    assert xfer(fe, (EEPROM, b"\xfe" + b"hello")) == [(OK, b"")]
    data = eeprom_file.read_bytes()
    assert data[0xFE:] == b"he" and data[:3] == b"llo"
    assert xfer(fe, (EEPROM, b"\xfd"), (EEPROM, 6)) == [(OK, b""), (OK, b"\xfdhello")]
    # a read continues from the pointer
    assert xfer(fe, (EEPROM, 2)) == [(OK, b"\x03\x04")]
    assert backend.errors == 0


def test_quick_probe_like_i2cdetect(bus) -> None:  # noqa: ANN001
    fe, backend, _, _ = bus
    # SMBus quick write: a zero-length request per address; only 0x48 and 0x50 ack
    found = [a for a in range(0x03, 0x78) if xfer(fe, (a, b""))[0][0] == OK]
    assert found == [SENSOR, EEPROM]
    assert xfer(fe, (EEPROM, 0)) == [(OK, b"")]  # zero-length read
    assert backend.errors == 0x78 - 0x03 - 2


def test_temperature_sensor(bus) -> None:  # noqa: ANN001
    fe, _, _, sensor = bus
    assert xfer(fe, (SENSOR, b"\x00"), (SENSOR, 2)) == [(OK, b""), (OK, bytes([21, 0x80]))]
    sensor.celsius = -10.0
    assert xfer(fe, (SENSOR, b"\x00"), (SENSOR, 2))[1] == (OK, (0x10000 - 10 * 256).to_bytes(2, "big"))
    assert xfer(fe, (SENSOR, b"\x03\x50\x00"), (SENSOR, b"\x03"), (SENSOR, 2))[2] == (OK, b"\x50\x00")
    assert xfer(fe, (SENSOR, b"\x01\x01"), (SENSOR, 1))[1] == (OK, b"\x01")


def test_a_failed_message_fails_the_rest_of_its_transfer(bus) -> None:  # noqa: ANN001
    fe, backend, eeprom_file, _ = bus
    # an absent address first: the EEPROM write after it must not happen
    assert xfer(fe, (0x33, b"\x00"), (EEPROM, b"\x00\xee")) == [(ERR, b""), (ERR, b"")]
    assert eeprom_file.read_bytes()[0] == 0
    # a NACK in the middle (LM75 register 9), the read after it fails, the write before stands
    assert xfer(fe, (EEPROM, b"\x05\x55"), (SENSOR, b"\x09"), (SENSOR, 2)) == [(OK, b""), (ERR, b""), (ERR, b"")]
    assert eeprom_file.read_bytes()[5] == 0x55
    # the next transfer is independent
    assert xfer(fe, (EEPROM, b"\x05"), (EEPROM, 1)) == [(OK, b""), (OK, b"\x55")]


def test_bad_requests_get_err(bus) -> None:  # noqa: ANN001
    fe, backend, eeprom_file, _ = bus

    def one(readable: list[bytes], writable: list[int]) -> tuple[int, int]:
        u = fe.request(0, readable, writable)
        return (u.data[u.length - 1] if u.length else -1), u.length

    assert one([b"\x00" * 4], [1]) == (ERR, 1)  # short header
    assert one([p.OUT_HDR.pack(EEPROM << 1, 0, 0x80)], [1]) == (ERR, 1)  # unknown flag
    assert one([p.OUT_HDR.pack((EEPROM << 1) | 1, 0, 0)], [1]) == (ERR, 1)  # not a 7-bit address
    assert one([hdr(EEPROM, p.FLAGS_M_RD), b"\x00"], [4, 1]) == (ERR, 5)  # a read with data to write
    assert one([hdr(EEPROM, 0), b"\x00\x01"], [4, 1]) == (ERR, 5)  # a write with a read buffer
    assert one([hdr(EEPROM, 0), b"\x00\x01"], []) == (-1, 0)  # no status byte: returned unused
    assert one([hdr(0x7F, p.FLAGS_M_RD)], [2, 1]) == (ERR, 3)  # nobody at 0x7f
    assert eeprom_file.read_bytes()[0] == 0
    assert xfer(fe, (EEPROM, b"\x01"), (EEPROM, 1)) == [(OK, b""), (OK, b"\x01")]  # still serving
    assert backend.errors == 7


def test_host_adapter_builds_i2c_rdwr(tmp_path: Path) -> None:
    seen = {}

    def fake_ioctl(fd: int, request: int, arg) -> int:  # noqa: ANN001
        seen["request"], seen["n"] = request, arg.nmsgs
        msgs = arg.msgs
        seen["msgs"] = [(msgs[i].addr, msgs[i].flags, msgs[i].len) for i in range(arg.nmsgs)]
        seen["write"] = ctypes.string_at(msgs[0].buf, msgs[0].len)
        ctypes.memmove(msgs[1].buf, b"\x42\x43", 2)  # the "kernel" fills the read
        return 0

    out = i2cdev.i2c_rdwr(5, [i2cdev.I2cMsg(0x50, False, data=b"\x10"), i2cdev.I2cMsg(0x50, True, length=2)],
                          ioctl=fake_ioctl)
    assert out == [b"", b"\x42\x43"]
    assert seen == {"request": i2cdev.I2C_RDWR, "n": 2, "msgs": [(0x50, 0, 1), (0x50, i2cdev.I2C_M_RD, 2)],
                    "write": b"\x10"}
    with pytest.raises(OSError):
        i2cdev.i2c_rdwr(5, [], ioctl=fake_ioctl)
    # a host adapter that is not an i2c-dev node: the transfer NACKs (ENOTTY), never raises through
    node = tmp_path / "i2c-9"
    node.write_bytes(b"")
    adapter = HostAdapter(9, [0x20], path=str(node))
    try:
        with pytest.raises(Exception, match="i2c-9"):
            adapter.transfer([i2cdev.I2cMsg(0x20, True, length=1)])
    finally:
        adapter.close()


def test_device_list_syntax() -> None:
    assert parse_device_list("1:4,2:32:21,5:10:23") == [(1, [4]), (2, [32, 21]), (5, [10, 23])]
    for bad in ("1", "1:x", "1:4,2:4", "1:200"):
        with pytest.raises(ValueError):
            parse_device_list(bad)


def test_the_command(tmp_path: Path) -> None:
    sock, rom = tmp_path / "i2c.sock", tmp_path / "rom.bin"
    argv = ["i2c", "--socket-path", str(sock), "--eeprom", f"0x50:{rom}:512", "--temp-sensor", "0x48:30"]
    with vhostuser_process(argv, stderr=subprocess.PIPE, text=True) as proc:
        wait_for_path(sock, proc)
        with MockFrontend.connect(str(sock), OPTS) as fe:
            # a 512-byte EEPROM takes two address bytes; a new file reads 0xff
            assert xfer(fe, (EEPROM, b"\x01\x00\x99"), (EEPROM, b"\x01\x00"), (EEPROM, 2)) == \
                [(OK, b""), (OK, b""), (OK, b"\x99\xff")]
            assert xfer(fe, (SENSOR, b"\x00"), (SENSOR, 2))[1] == (OK, bytes([30, 0]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert len(rom.read_bytes()) == 512 and rom.read_bytes()[256] == 0x99
    for bad in (["--eeprom", "0x99:x"], [], ["--temp-sensor", "0x48", "--temp-sensor", "0x48"]):
        out = subprocess.run([sys.executable, "-m", "vhostuser", "i2c", "--socket-path", str(sock), *bad],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "vhostuser i2c:" in out.stderr, out.stderr


def test_random_chains_never_break_the_queue(bus) -> None:  # noqa: ANN001
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fe, _, _, _ = bus

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(addr=st.integers(0, 0xFF), flags=st.integers(0, 7), write=st.binary(max_size=8),
           read=st.integers(0, 8), extra=st.booleans())
    def random_request(addr: int, flags: int, write: bytes, read: int, extra: bool) -> None:
        readable = [p.OUT_HDR.pack(addr, 0, flags)] + ([write] if write else [])
        if extra:
            readable = [readable[0][:5]]
        used = fe.request(0, readable, ([read] if read else []) + [1])
        assert used.data[used.length - 1] in (OK, ERR)

    random_request()
    assert xfer(fe, (EEPROM, b"\x00"), (EEPROM, 1)) == [(OK, b""), (OK, eeprom_byte(bus, 0))]


def eeprom_byte(bus, offset: int) -> bytes:  # noqa: ANN001
    return bus[2].read_bytes()[offset:offset + 1]
