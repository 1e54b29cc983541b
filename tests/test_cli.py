"""The commands: ``vhostuser``'s subcommands and the device programs' conventions
(vhost-user spec, "Backend program conventions")."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from helpers.procs import vhostuser_process, wait_for_path

from vhostuser.cli import SUBCOMMANDS
from vhostuser.frontend import Frontend

DEVICES = [name for name, (module, _) in SUBCOMMANDS.items() if module.startswith("vhostuser.devices.")]
#: QEMU's VHostUserBackendType names
SCHEMA_TYPES = {"9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net", "rng",
                "rpmsg", "rproc-serial", "scsi", "vsock", "fs"}
#: device types QEMU's schema does not name yet (no QEMU front-end, or none in the schema): the virtio
#: spec's device name
UNLISTED_TYPES = {"can", "spi", "scmi", "sound", "gpio", "i2c"}


def vhostuser(*args: str, **kw) -> subprocess.CompletedProcess[str]:  # noqa: ANN003
    return subprocess.run([sys.executable, "-m", "vhostuser", *args], capture_output=True, text=True,
                          timeout=60, **kw)


def test_info_names_the_live_implementation() -> None:
    out = vhostuser("info")
    assert out.returncode == 0, out.stderr
    impl = os.environ.get("VHOSTUSER_IMPL")
    assert f"implementation: {impl}" in out.stdout if impl else "implementation:" in out.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_device_help_explains_the_options(device: str) -> None:
    out = vhostuser(device, "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--socket-path", "--fd", "--print-capabilities"):
        assert flag in out.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_print_capabilities_matches_the_discovery_json(device: str) -> None:
    out = vhostuser(device, "--print-capabilities")
    assert out.returncode == 0, out.stderr
    caps = json.loads(out.stdout)
    descriptor = json.loads(resources.files("vhostuser.devices").joinpath(f"{device}.json").read_text())
    assert caps["type"] == descriptor["type"]
    assert descriptor["type"] in SCHEMA_TYPES | UNLISTED_TYPES
    assert os.path.isabs(descriptor["binary"]) and descriptor["binary"].endswith(f"vhost-user-{device}")
    assert isinstance(caps.get("features", []), list)


def test_device_needs_a_socket() -> None:
    out = vhostuser("rng")
    assert out.returncode == 2
    assert "--socket-path" in out.stderr


def test_rng_command_serves_again_after_disconnect_and_stops_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    with vhostuser_process(["rng", "--socket-path", str(sock), "-v"], stderr=subprocess.PIPE, text=True) as proc:
        wait_for_path(sock, proc)
        assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
        for _ in range(3):  # serves again after every disconnect
            fe = Frontend.connect(str(sock))
            assert fe.get_features() & (1 << 32)  # VERSION_1
            fe.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not sock.exists()


def test_rng_socket_count_serves_numbered_sockets(tmp_path: Path) -> None:
    base = tmp_path / "rng.sock"
    with vhostuser_process(["rng", "--socket-path", str(base), "--socket-count", "2"],
                           stderr=subprocess.PIPE, text=True) as proc:
        for i in range(2):
            path = Path(f"{base}{i}")
            wait_for_path(path, proc)
            fe = Frontend.connect(str(path))
            assert fe.get_features()
            fe.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_demo_drives_the_rng_backend_end_to_end(ring: str) -> None:
    args = ["demo", "--requests", "3", "--bytes", "8"] + (["--packed"] if ring == "packed" else [])
    out = vhostuser(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    requests = [line for line in out.stdout.splitlines() if "] #" in line]
    assert len(requests) == 3
    blobs = {line.rsplit(" ", 1)[1] for line in requests}
    assert all(len(b) == 16 for b in blobs) and len(blobs) == 3  # 8 random bytes each, all different
    assert f"{ring} ring" in out.stdout
    assert "exited with status 0; socket removed: True" in out.stdout


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_help_shows_no_raw_rest_markup(command: str) -> None:
    out = vhostuser(command, "--help")
    assert out.returncode == 0, out.stderr
    for markup in ("``", ":class:", ":func:", ":meth:", ":mod:", ":data:"):
        assert markup not in out.stdout, (command, markup)
    assert not any(line.rstrip().endswith("::") for line in out.stdout.splitlines()), command


def test_info_into_a_closed_pipe_ends_quietly() -> None:
    """``vhostuser info | head -0``: the reader has gone before the first write."""
    r, w = os.pipe()
    os.close(r)
    try:
        out = subprocess.run([sys.executable, "-m", "vhostuser", "info"], stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=60)
    finally:
        os.close(w)
    assert out.stderr == ""
    assert out.returncode == 141  # 128 + SIGPIPE, as a shell reports a filter whose reader left


def test_info_piped_into_head_has_no_traceback() -> None:
    out = subprocess.run(f"{sys.executable} -m vhostuser info | head -n 1", shell=True, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.startswith("vhostuser ")
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr
