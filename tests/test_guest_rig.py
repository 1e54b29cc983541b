"""The real-QEMU guest rig (vhostuser.testing.guest).

Every test here needs the rig's prerequisites (QEMU, busybox-static, the Debian
kernel in the cache or apt to fetch it); a missing one is a test *error*, never
a skip.  Four guests are booted in total (~5 s each under TCG on an idle host).
"""
from __future__ import annotations

import gzip
import os
import re
import time
from pathlib import Path

import pytest

from vhostuser.testing import guest as g

pytestmark = pytest.mark.qemu

TIMEOUT = 120  # generous: CI hosts with 2 cores may run other guests in parallel


@pytest.fixture(scope="module")
def kernel() -> g.Kernel:
    g.check_prerequisites()  # raises (-> test error) naming the missing Debian package
    return g.fetch_kernel()


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (a psutil-free /proc scan)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------- no guest booted


def test_prerequisites_name_the_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    g.check_prerequisites()
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-system-x86_64 on PATH
    with pytest.raises(g.GuestPrerequisiteError, match=r"qemu-system-x86_64 \(Debian package qemu-system-x86\)"):
        g.check_prerequisites()


def test_kernel_comes_from_the_debian_package(kernel: g.Kernel) -> None:
    assert re.fullmatch(r"linux-image-\d+\.\d+\.\d+-\d+-amd64", kernel.package)
    assert kernel.package == f"linux-image-{kernel.version}"
    assert kernel.vmlinuz.is_file()
    assert (kernel.modules_dir / "modules.dep").is_file()
    # The cached tree is reused, not fetched again.
    assert g.fetch_kernel() == kernel


def test_modules_resolve_in_dependency_order(kernel: g.Kernel) -> None:
    order = [g._norm(p) for p in g.resolve_modules(
        ["virtio_pci", "drivers/char/hw_random/virtio-rng", "vmw_vsock_virtio_transport", "virtio_pci"], kernel)]
    assert len(order) == len(set(order))
    for before, after in [
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_pci"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("virtio_pci_legacy_dev", "virtio_pci"),
        ("virtio", "virtio_rng"),
        ("vsock", "vmw_vsock_virtio_transport_common"),
        ("vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"),
    ]:
        assert order.index(before) < order.index(after), order
    with pytest.raises(g.GuestKernelError, match="no module 'no_such_module'"):
        g.resolve_modules(["no_such_module"], kernel)


def test_initramfs_cache_reuses_identical_builds(kernel: g.Kernel, tmp_path: Path) -> None:
    script = "echo cache test"
    first = g.build_initramfs(script, ["virtio-rng"], {"/etc/data": b"x"}, kernel=kernel, cache=tmp_path)
    st = first.stat()
    second = g.build_initramfs(script, ["virtio_rng"], {"/etc/data": b"x"}, kernel=kernel, cache=tmp_path)
    assert second == first
    assert (second.stat().st_ino, second.stat().st_size) == (st.st_ino, st.st_size)
    assert len(list((tmp_path / "initramfs").iterdir())) == 1
    # Any input change is a different archive.
    assert g.build_initramfs(script + "!", ["virtio-rng"], {"/etc/data": b"x"}, kernel=kernel, cache=tmp_path) != first
    assert g.build_initramfs(script, ["virtio-rng"], {"/etc/data": b"y"}, kernel=kernel, cache=tmp_path) != first
    assert g.build_initramfs(script, [], {"/etc/data": b"x"}, kernel=kernel, cache=tmp_path) != first
    # The archive is newc with our init, script, and the modules in load order.
    raw = gzip.decompress(first.read_bytes())
    assert raw.startswith(b"070701")
    for name in (b"init\0", b"test.sh\0", b"bin/busybox\0", b"etc/data\0", b"TRAILER!!!\0"):
        assert name in raw
    listed = re.search(rb"((?:\d\d-\w+\.ko\n)+)", raw)
    assert listed is not None
    assert [line.split("-", 1)[1] for line in listed.group(1).decode().split()] == [
        "virtio_ring.ko", "virtio.ko", "virtio_pci_modern_dev.ko", "virtio_pci_legacy_dev.ko",
        "virtio_pci.ko", "virtio_rng.ko"]


def test_vhost_user_device_arguments(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    assert g.VhostUserDevice("rng", sock, extra="packed=on").qemu_args(3) == [
        "-chardev", f"socket,id=vhu3,path={sock}",
        "-device", "vhost-user-rng-pci,chardev=vhu3,id=vhudev3,packed=on"]
    fs = g.VhostUserDevice("fs", sock, chardev_extra="reconnect=1")
    assert fs.qemu_args(0)[1].endswith(",reconnect=1")
    assert "tag=vhostuser" in fs.qemu_args(0)[3]
    assert g.VhostUserDevice("vsock", sock).guest_modules() == ("vmw_vsock_virtio_transport",)


# ---------------------------------------------------------------- guests booted


def test_guest_runs_script_and_reports_output_and_status(kernel: g.Kernel, no_fd_leak: None) -> None:
    script = r"""
uname -r
cat /proc/cmdline
echo "sum=$((17 * 3 + 1))"
cat /etc/vhostuser-test-data
echo "to stderr" >&2
printf 'no newline at the end'
exit 3
"""
    r = g.run_guest(script, timeout=TIMEOUT, extra_files={"/etc/vhostuser-test-data": b"from the host\n"},
                    append="vhostuser.marker=42")
    assert r.status == 3, r.console
    lines = r.output.split("\n")
    assert lines[0] == kernel.version
    assert "vhostuser.marker=42" in lines[1] and "console=ttyS0" in lines[1]
    assert lines[2:] == ["sum=52", "from the host", "to stderr", "no newline at the end"]
    assert g.MARK_BEGIN in r.console and "no newline at the end" in r.console
    assert r.script_start is not None and 0 < r.script_start < r.duration
    with pytest.raises(g.GuestScriptError, match="status 3"):
        r.check()


def test_virtio_modules_load_and_rng_driver_binds(kernel: g.Kernel) -> None:
    script = r"""
set -e
for d in /sys/bus/virtio/devices/*; do
    echo "$(basename $d) device=$(cat $d/device) driver=$(basename $(readlink $d/driver))"
done
cut -d' ' -f1 /proc/modules | sort | tr '\n' ' '; echo
cat /sys/class/misc/hw_random/rng_current
head -c 64 /dev/hwrng | od -An -v -tx1 | tr -d ' \n'; echo
"""
    r = g.run_guest(script, devices=["virtio-rng-pci"], timeout=TIMEOUT).check()
    devices, modules, current, hexdata = r.output.strip().split("\n")
    assert devices == "virtio0 device=0x0004 driver=virtio_rng"
    assert set(modules.split()) == {"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                                    "virtio_pci", "virtio_rng"}
    assert current.startswith("virtio_rng")
    assert re.fullmatch(r"[0-9a-f]{128}", hexdata), hexdata
    assert len(bytes.fromhex(hexdata)) == 64
    assert len(set(bytes.fromhex(hexdata))) > 8  # not a constant pattern


def test_hanging_script_times_out_and_qemu_is_gone(kernel: g.Kernel, tmp_path: Path, no_fd_leak: None) -> None:
    script = "echo ready; sleep 100000"
    # 1. The script really runs and hangs: wait for it, then time out.
    workdir = tmp_path / "hang"  # unique, and on QEMU's command line (console path)
    with g.start_guest(script, timeout=TIMEOUT, workdir=workdir) as guest:
        guest.wait_for_output("ready")
        assert _processes_mentioning(str(workdir)) == [guest.pid]
        t0 = time.monotonic()
        with pytest.raises(g.GuestTimeout) as exc:
            guest.wait(timeout=1)
        assert time.monotonic() - t0 < 10
        assert "ready" in exc.value.output
        assert "ready" in exc.value.console and "console tail" in str(exc.value)
        assert guest.proc.returncode is not None
        assert not _alive(guest.pid)
    assert _processes_mentioning(str(workdir)) == []
    # 2. run_guest's own timeout (here it expires during boot).
    workdir = tmp_path / "boot"
    t0 = time.monotonic()
    with pytest.raises(g.GuestTimeout, match="timeout 2 s"):
        g.run_guest(script, timeout=2, workdir=str(workdir))  # a str is a path too
    assert time.monotonic() - t0 < 12
    assert _processes_mentioning(str(workdir)) == []
    assert (workdir / "qemu.stderr").exists()  # a given workdir is kept


@pytest.mark.parametrize("device", [g.VhostUserDevice("input", "/tmp/x.sock"), g.VhostUserDevice("vhost-user-gpu-pci", "/tmp/x.sock"),
                                    "vhost-user-input-pci,chardev=c0"])
def test_devices_qemu_cannot_run_under_tcg_are_refused_before_booting(device, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU 7.2 realizes vhost-user-input/-gpu only with KVM; the rig is TCG only."""
    def never(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the rig went on to boot")
    monkeypatch.setattr(g, "check_prerequisites", never)
    monkeypatch.setattr(g, "fetch_kernel", never)
    with pytest.raises(g.GuestUnsupportedDeviceError, match="requires kvm.*MockFrontend"):
        g.run_guest("true", devices=[device])


def test_qemu_failure_is_a_boot_error_with_stderr(kernel: g.Kernel, tmp_path: Path) -> None:
    # No back-end listens: QEMU 7.2 exits at once with "Failed to connect".
    missing = tmp_path / "nobody.sock"
    with pytest.raises(g.GuestBootError, match="Failed to connect") as exc:
        g.run_guest("true", devices=[g.VhostUserDevice("rng", missing)], timeout=TIMEOUT)
    assert str(missing) in exc.value.stderr
    assert _processes_mentioning(str(missing)) == []
