"""virtio-rng under real QEMU: a Linux guest's own virtio-rng driver reads
/dev/hwrng through our back-end (daemon in this process, QEMU the front-end)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from vhostuser.daemon import VhostUserDaemon
from vhostuser.devices.rng import RngBackend
from vhostuser.testing.guest import VhostUserDevice, run_guest

pytestmark = pytest.mark.qemu

READ_SIZE = 4096
#: the guest kernel's khwrngd also reads /dev/hwrng (to seed its pool), so the
#: file is larger than what the script reads, and the script's bytes must be a
#: contiguous run of the file
FILE_SIZE = 64 * 1024


def _hexdump_bytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def test_guest_reads_exactly_the_source_file(tmp_path: Path) -> None:
    source = tmp_path / "entropy.bin"
    pattern = os.urandom(FILE_SIZE)
    source.write_bytes(pattern)
    sock = str(tmp_path / "rng.sock")
    backend = RngBackend(str(source))
    with VhostUserDaemon("rng", backend) as daemon:
        daemon.start_server(sock)
        result = run_guest(
            "cat /sys/class/misc/hw_random/rng_current\n"
            f"head -c {READ_SIZE} /dev/hwrng > /tmp/r\n"
            "od -An -v -tx1 /tmp/r\n",
            devices=[VhostUserDevice("rng", sock)],
            timeout=180,
        ).check()
        lines = result.output.splitlines()
        assert lines[0].startswith("virtio_rng"), result.output[:200]
        got = _hexdump_bytes("\n".join(lines[1:]))
        assert len(got) == READ_SIZE
        assert pattern.find(got) >= 0, "the guest read bytes that are not a run of the source file"
        assert READ_SIZE <= backend.bytes_served <= FILE_SIZE
        assert daemon.connections == 1
    backend.close()


@pytest.mark.both_impls  # the guest's I/O runs through the data-path core
def test_guest_reads_the_whole_file_in_order(tmp_path: Path) -> None:
    """The guest reads the file to its end: once the script has stopped the
    kernel's own reader (khwrngd, which virtio-rng's quality of 1000 starts, and
    which takes some bytes during boot), it gets exactly the rest of the file,
    in order, and then the source is exhausted (reads block rather than invent
    data)."""
    source = tmp_path / "entropy.bin"
    pattern = os.urandom(8192)
    source.write_bytes(pattern)
    sock = str(tmp_path / "rng.sock")
    backend = RngBackend(str(source))
    with VhostUserDaemon("rng", backend) as daemon:
        daemon.start_server(sock)
        result = run_guest(
            "echo 0 > /sys/class/misc/hw_random/rng_quality\n"  # stops khwrngd
            # reads of the hwrng core's chunk size (64 bytes on x86): a read blocks
            # until it is filled, so when the source runs dry only the last,
            # unfillable read is cut short; smaller reads would come out of the
            # core's buffer back to front
            "timeout 3 dd if=/dev/hwrng of=/tmp/r bs=64 2>/dev/null\n"
            "od -An -v -tx1 /tmp/r\n",
            devices=[VhostUserDevice("rng", sock)],
            timeout=180,
        )
        got = _hexdump_bytes(result.output)
    backend.close()
    early = len(pattern) - len(got)
    assert 0 <= early <= 4096, f"the guest kernel took {early} bytes before the script ran"
    assert got == pattern[early:]
    assert backend.exhausted and backend.bytes_served == len(pattern)
