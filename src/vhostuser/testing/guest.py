"""Boot a throw-away Linux guest under QEMU (TCG) and run a shell script in it.

This is the real-QEMU test rig: tests start a vhost-user back-end (a thread or a
process listening on a unix socket), then boot a guest whose PCI devices are
backed by it, run a busybox shell script inside and assert on its output.

Everything comes from Debian packages:

* the kernel: the ``linux-image-6.1.0-NN-amd64`` package that ``linux-image-amd64``
  depends on, fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``
  into a cache directory (never installed into the system), plus ``depmod`` (kmod)
  to produce ``modules.dep``;
* ``busybox-static`` as the guest's whole userland;
* ``qemu-system-x86`` to run it.

The initramfs is written here (cpio "newc", gzip, deterministic) and cached by
content hash. See ``docs/guest-rig.md``.

Typical use::

    from vhostuser.testing.guest import VhostUserDevice, run_guest

    result = run_guest(
        "head -c 64 /dev/hwrng | od -An -tx1",
        devices=[VhostUserDevice("rng", socket_path)],
        timeout=120,
    )
    assert result.status == 0, result.console
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path

from vhostuser.errors import VhostUserError

__all__ = [
    "GuestError",
    "GuestPrerequisiteError",
    "GuestUnsupportedDeviceError",
    "TCG_UNSUPPORTED",
    "check_tcg_support",
    "GuestKernelError",
    "GuestBootError",
    "GuestTimeout",
    "GuestScriptError",
    "Kernel",
    "VhostUserDevice",
    "GuestResult",
    "GuestProcess",
    "DEVICE_MODULES",
    "BASE_MODULES",
    "cache_dir",
    "check_prerequisites",
    "resolve_kernel_package",
    "fetch_kernel",
    "resolve_modules",
    "build_initramfs",
    "prepare_boot",
    "build_static_program",
    "qemu_command",
    "start_guest",
    "run_guest",
]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------- errors
# (They live here rather than in vhostuser.errors because they concern only the
# test rig; all derive from VhostUserError.)


class GuestError(VhostUserError):
    """Base class of the guest rig's errors."""


class GuestPrerequisiteError(GuestError):
    """A host tool the rig needs is missing; the message names the Debian package."""


class GuestUnsupportedDeviceError(GuestError):
    """QEMU cannot run this vhost-user device under TCG (the rig never has KVM):
    raised before anything is booted.  See :data:`TCG_UNSUPPORTED`."""


class GuestKernelError(GuestError):
    """The guest kernel package could not be resolved, downloaded or unpacked."""


class GuestBootError(GuestError):
    """QEMU exited (or a module failed to load) before the test script reported a status.

    ``console`` holds the serial console log, ``stderr`` QEMU's standard error.
    """

    def __init__(self, message: str, *, console: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.console = console
        self.stderr = stderr


class GuestTimeout(GuestError, TimeoutError):
    """The guest did not finish within its timeout; QEMU was killed.

    ``console`` holds the serial console log so far, ``output`` the test output so far.
    """

    def __init__(self, message: str, *, console: str = "", output: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.console = console
        self.output = output
        self.stderr = stderr


class GuestScriptError(GuestError):
    """Raised by :meth:`GuestResult.check` when the test script exited non-zero."""


# ------------------------------------------------------------------ constants

#: The Debian meta package whose dependency names the versioned kernel image.
KERNEL_META_PACKAGE = "linux-image-amd64"

#: Loaded first, in dependency order (the PCI transport of virtio).
BASE_MODULES: tuple[str, ...] = ("virtio_pci",)

#: QEMU ``-device`` driver -> the guest modules that drive it (dependencies are
#: added from modules.dep).  Add a line here to support a new device.
DEVICE_MODULES: dict[str, tuple[str, ...]] = {
    "vhost-user-rng-pci": ("virtio-rng",),
    "virtio-rng-pci": ("virtio-rng",),
    "vhost-user-blk-pci": ("virtio_blk",),
    "virtio-blk-pci": ("virtio_blk",),
    "vhost-user-vsock-pci": ("vmw_vsock_virtio_transport",),
    "vhost-vsock-pci": ("vmw_vsock_virtio_transport",),
    "vhost-user-fs-pci": ("virtiofs",),
    "vhost-user-scsi-pci": ("virtio_scsi", "sd_mod"),
    "virtio-scsi-pci": ("virtio_scsi", "sd_mod"),
    "vhost-user-input-pci": ("virtio_input", "evdev"),
    "virtio-serial-pci": ("virtio_console",),
    "virtio-net-pci": ("virtio_net",),
}

#: Short ``VhostUserDevice.kind`` names -> QEMU driver.
VHOST_USER_KINDS: dict[str, str] = {
    "rng": "vhost-user-rng-pci",
    "blk": "vhost-user-blk-pci",
    "vsock": "vhost-user-vsock-pci",
    "fs": "vhost-user-fs-pci",
    "scsi": "vhost-user-scsi-pci",
    "input": "vhost-user-input-pci",
    "gpio": "vhost-user-gpio-pci",
    "i2c": "vhost-user-i2c-pci",
    "net": "virtio-net-pci",
}

#: vhost-user devices QEMU refuses to realize without KVM, with the reason.  The
#: rig always runs TCG, so asking for one fails up front
#: (:class:`GuestUnsupportedDeviceError`) instead of after a boot attempt.  QEMU 7.2
#: exits with "vhost initialization failed: requires kvm" for both; test such a
#: back-end with the mock front-end (:class:`vhostuser.testing.MockFrontend`).
TCG_UNSUPPORTED: dict[str, str] = {
    "vhost-user-input-pci": "QEMU 7.2 realizes vhost-user-input only with KVM "
                            "(\"vhost initialization failed: requires kvm\")",
    "vhost-user-gpu-pci": "QEMU 7.2 realizes vhost-user-gpu only with KVM "
                          "(\"vhost initialization failed: requires kvm\")",
}


def check_tcg_support(devices: Sequence[VhostUserDevice | str]) -> None:
    """Raise :class:`GuestUnsupportedDeviceError` if a device in ``devices`` (a
    :class:`VhostUserDevice` or a raw ``-device`` string) cannot run under TCG."""
    for dev in devices:
        driver = dev.driver if isinstance(dev, VhostUserDevice) else _device_driver(dev)
        reason = TCG_UNSUPPORTED.get(driver)
        if reason:
            raise GuestUnsupportedDeviceError(
                f"{driver}: {reason}; the guest rig runs QEMU under TCG (no KVM), so it cannot boot this "
                "device. Test the back-end with vhostuser.testing.MockFrontend instead (docs/guest-rig.md)")


#: Host tool -> Debian package that provides it.
_TOOLS: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "depmod": "kmod",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
}

_BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")

MARK_BEGIN = "===VHOSTUSER-RESULT-BEGIN==="
MARK_END = "===VHOSTUSER-RESULT-END==="
MARK_STATUS = "===VHOSTUSER-STATUS==="
MARK_MODULE_FAILED = "===VHOSTUSER-MODULE-FAILED==="

_INITRAMFS_FORMAT = 1  # bump when the archive layout or init changes meaning
_INITRAMFS_KEEP_DAYS = 14
_INITRAMFS_KEEP_COUNT = 200
_DEFAULT_APPEND = "console=ttyS0 quiet panic=-1 rdinit=/init"

# ------------------------------------------------------------------ the cache


def cache_dir() -> Path:
    """The rig's cache: ``$VHOSTUSER_GUEST_CACHE`` or ``~/.cache/vhostuser/guest``.

    It lives outside the repository so that fresh clones on the same machine
    reuse the (large) unpacked kernel.
    """
    env = os.environ.get("VHOSTUSER_GUEST_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vhostuser" / "guest"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created), for concurrent test runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -------------------------------------------------------------- prerequisites


def _find_busybox() -> Path | None:
    for p in _BUSYBOX_PATHS:
        if os.access(p, os.X_OK):
            return Path(p)
    return None


def _is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF file without a PT_INTERP program header."""
    import struct

    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # ELF64 only (x86-64 host)
            return False
        endian = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack_from(endian + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def check_prerequisites(*, kernel: bool = True) -> None:
    """Raise :class:`GuestPrerequisiteError` naming every missing Debian package.

    ``kernel=True`` also requires the tools to fetch and unpack the kernel
    (apt-get, dpkg-deb, depmod) unless a kernel is already in the cache.
    All of them are installed by ``scripts/install-deps --test``.
    """
    missing: dict[str, str] = {}
    if shutil.which("qemu-system-x86_64") is None:
        missing["qemu-system-x86_64"] = _TOOLS["qemu-system-x86_64"]
    bb = _find_busybox()
    if bb is None or not _is_static_elf(bb):
        missing["static /bin/busybox"] = "busybox-static"
    if kernel and _cached_kernel() is None:
        for tool in ("apt-get", "apt-cache", "dpkg-deb", "depmod"):
            if shutil.which(tool) is None:
                missing[tool] = _TOOLS[tool]
    if missing:
        what = ", ".join(f"{tool} (Debian package {pkg})" for tool, pkg in missing.items())
        pkgs = " ".join(sorted(set(missing.values())))
        raise GuestPrerequisiteError(
            f"the QEMU guest rig needs: {what}. "
            f"Run scripts/install-deps --test (or apt-get install {pkgs})."
        )


# ------------------------------------------------------------------- the kernel


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel image package.

    ``root`` is the ``dpkg-deb -x`` tree (``boot/``, ``lib/modules/<version>/``),
    ``version`` the kernel release (``6.1.0-56-amd64``), ``package`` the Debian
    package it came from.
    """

    root: Path
    version: str
    package: str

    @property
    def vmlinuz(self) -> Path:
        """The bootable kernel image."""
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules_dir(self) -> Path:
        """``lib/modules/<version>`` of the unpacked tree (with modules.dep)."""
        return self.root / "lib" / "modules" / self.version


def _run(cmd: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    log.debug("running %s", " ".join(cmd))
    return subprocess.run(
        list(cmd), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
        env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"},
    )


def _apt_update() -> None:
    if os.geteuid() != 0:
        raise GuestKernelError(
            "apt-get update is needed to resolve/download the guest kernel, and that needs root: "
            "run `sudo apt-get update` (or scripts/fetch-guest-kernel as root) once"
        )
    log.info("running apt-get update")
    r = _run(["apt-get", "update", "-qq"])
    if r.returncode != 0:
        raise GuestKernelError(f"apt-get update failed (status {r.returncode}): {r.stderr.strip()}")


def _depends_of(meta: str) -> str | None:
    r = _run(["apt-cache", "depends", meta])
    if r.returncode != 0:
        return None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*\|?(?:Pre)?Depends:\s*(linux-image-\S+)", line)
        if m and not m.group(1).startswith("<"):
            return m.group(1)
    return None


_resolved: dict[str, str] = {}


def resolve_kernel_package(meta: str = KERNEL_META_PACKAGE) -> str:
    """The versioned kernel package ``meta`` depends on (``linux-image-6.1.0-NN-amd64``).

    Runs ``apt-get update`` once if apt does not know ``meta`` yet.  The answer
    is remembered for the life of the process.
    """
    if meta in _resolved:
        return _resolved[meta]
    if shutil.which("apt-cache") is None:
        raise GuestPrerequisiteError("apt-cache is missing (Debian package apt); cannot resolve the guest kernel")
    pkg = _depends_of(meta)
    if pkg is None:
        _apt_update()
        pkg = _depends_of(meta)
    if pkg is None:
        raise GuestKernelError(f"cannot resolve the kernel image package: apt-cache depends {meta} names none")
    _resolved[meta] = pkg
    return pkg


def _kernel_from_tree(root: Path, package: str) -> Kernel | None:
    mods = root / "lib" / "modules"
    if not (root / ".complete").exists() or not mods.is_dir():
        return None
    versions = sorted(p.name for p in mods.iterdir() if (p / "modules.dep").exists())
    for v in versions:
        if (root / "boot" / f"vmlinuz-{v}").exists():
            return Kernel(root=root, version=v, package=package)
    return None


def _cached_kernel(cache: Path | None = None) -> Kernel | None:
    """The newest complete kernel in the cache, whatever its package."""
    kdir = (cache or cache_dir()) / "kernel"
    if not kdir.is_dir():
        return None
    trees = sorted(kdir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for tree in trees:
        k = _kernel_from_tree(tree, tree.name)
        if k is not None:
            return k
    return None


def _download(package: str, dest: Path) -> Path:
    for attempt in (1, 2):
        r = _run(["apt-get", "download", package], cwd=dest)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if r.returncode == 0 and debs:
            return debs[-1]
        if attempt == 1:
            log.info("apt-get download %s failed (%s); updating the package lists", package, r.stderr.strip())
            _apt_update()
    raise GuestKernelError(
        f"apt-get download {package} failed (status {r.returncode}): {r.stderr.strip()}"
    )


def fetch_kernel(package: str | None = None, *, cache: str | os.PathLike[str] | None = None) -> Kernel:
    """Return the unpacked guest kernel, downloading it into the cache if needed.

    ``package`` defaults to what ``linux-image-amd64`` depends on.  If apt cannot
    resolve or download that (no package lists, not Debian, offline) the newest
    cached kernel is used instead, with a warning.  The download goes to ``<cache>/kernel/<package>/`` via ``apt-get
    download`` + ``dpkg-deb -x`` + ``depmod -b``; the system is not modified
    (except for ``apt-get update``, run only when apt does not know the package).
    Safe to call concurrently from several processes (flock).
    """
    cache = Path(cache) if cache is not None else cache_dir()
    if package is None:
        try:
            package = resolve_kernel_package()
            return _fetch_kernel(package, cache)
        except GuestError as exc:
            cached = _cached_kernel(cache)
            if cached is None:
                raise
            log.warning("%s; using the cached kernel %s", exc, cached.package)
            return cached
    return _fetch_kernel(package, cache)


def _fetch_kernel(package: str, cache: Path) -> Kernel:
    tree = cache / "kernel" / package
    k = _kernel_from_tree(tree, package)
    if k is not None:
        return k
    for tool in ("apt-get", "dpkg-deb", "depmod"):
        if shutil.which(tool) is None:
            raise GuestPrerequisiteError(f"{tool} is missing (Debian package {_TOOLS[tool]}); cannot fetch {package}")
    with _locked(cache / "kernel" / ".lock"):
        k = _kernel_from_tree(tree, package)
        if k is not None:
            return k
        log.info("fetching guest kernel %s into %s", package, tree)
        work = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=cache / "kernel"))
        try:
            deb = _download(package, work)
            unpacked = work / "root"
            r = _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
            if r.returncode != 0:
                raise GuestKernelError(f"dpkg-deb -x {deb.name} ({package}) failed: {r.stderr.strip()}")
            deb.unlink()
            mods = unpacked / "lib" / "modules"
            versions = [p.name for p in mods.iterdir()] if mods.is_dir() else []
            if len(versions) != 1:
                raise GuestKernelError(f"{package} has no single lib/modules/<version> tree: {versions}")
            version = versions[0]
            if not (unpacked / "boot" / f"vmlinuz-{version}").exists():
                raise GuestKernelError(f"{package} has no boot/vmlinuz-{version}")
            r = _run(["depmod", "-b", str(unpacked), version])
            if r.returncode != 0:
                raise GuestKernelError(f"depmod -b for {package} failed: {r.stderr.strip()}")
            (unpacked / ".complete").write_text(f"{package} {version}\n")
            if tree.exists():  # an incomplete leftover
                shutil.rmtree(tree)
            os.replace(unpacked, tree)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        k = _kernel_from_tree(tree, package)
        assert k is not None
        log.info("guest kernel %s ready (%s)", k.version, k.vmlinuz)
        return k


# -------------------------------------------------------------------- modules


def _norm(name: str) -> str:
    """Module name as the kernel sees it: basename, no .ko[.xz|.zst|.gz], '-' == '_'."""
    base = name.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def _read_modules_dep(kernel: Kernel) -> dict[str, tuple[str, list[str]]]:
    """norm name -> (relative path, [relative paths of its dependencies])."""
    table: dict[str, tuple[str, list[str]]] = {}
    with open(kernel.modules_dir / "modules.dep") as f:
        for line in f:
            path, _, deps = line.partition(":")
            path = path.strip()
            if path:
                table[_norm(path)] = (path, deps.split())
    return table


def _builtin(kernel: Kernel) -> set[str]:
    p = kernel.modules_dir / "modules.builtin"
    return {_norm(line.strip()) for line in p.read_text().splitlines() if line.strip()} if p.exists() else set()


def resolve_modules(modules: Sequence[str], kernel: Kernel) -> list[str]:
    """Module files (relative to ``lib/modules/<version>``) to load, in load order.

    ``modules`` are names (``virtio-rng``, ``virtio_blk``) or paths
    (``drivers/char/hw_random/virtio-rng``); their dependencies from modules.dep
    come first, each module once.  Built-in modules are skipped.  An unknown name
    raises :class:`GuestKernelError`.
    """
    table = _read_modules_dep(kernel)
    builtin = _builtin(kernel)
    by_path = {path: name for name, (path, _) in table.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise GuestKernelError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        path, deps = table[name]
        for dep in reversed(deps):  # modprobe's order: the last listed dependency first
            visit(by_path.get(dep, _norm(dep)), chain + (name,))
        seen.add(name)
        order.append(path)

    for requested in modules:
        name = _norm(requested)
        if name in table:
            visit(name, ())
        elif name in builtin:
            log.debug("module %s is built into %s", requested, kernel.version)
        else:
            raise GuestKernelError(f"no module {requested!r} in {kernel.package} ({kernel.version})")
    return order


def _module_bytes(path: Path) -> bytes:
    """A module's ELF bytes; busybox insmod cannot load compressed modules."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise GuestPrerequisiteError(f"{name} is zstd-compressed: install the Debian package zstd")
        r = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=False)
        if r.returncode != 0:
            raise GuestKernelError(f"zstd -d {path} failed: {r.stderr.decode(errors='replace')}")
        return r.stdout
    return data


# ------------------------------------------------------------------ initramfs


class _Cpio:
    """A deterministic cpio "newc" archive writer (all files owned by root, mtime 0)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.buf.write(hdr + encoded)
        self.buf.write(b"\0" * (-(len(hdr) + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        if not path or path in self.dirs:
            return
        self.mkdir(os.path.dirname(path))
        self.dirs.add(path)
        self._entry(path, 0o040755, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, 0o120777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def _init_script() -> str:
    return resources.files("vhostuser.testing").joinpath("guest_init.sh").read_text()


def _busybox_applets(busybox: Path) -> list[str]:
    r = _run([str(busybox), "--list-full"])
    if r.returncode != 0:
        raise GuestPrerequisiteError(f"{busybox} --list-full failed; is busybox-static installed?")
    return [line.strip().lstrip("/") for line in r.stdout.splitlines() if line.strip()]


def _prune_initramfs_cache(directory: Path) -> None:
    """Drop archives unused for _INITRAMFS_KEEP_DAYS, and the oldest beyond _INITRAMFS_KEEP_COUNT."""
    limit = time.time() - _INITRAMFS_KEEP_DAYS * 86400
    entries = []
    for p in directory.glob("*.cpio.gz"):
        with contextlib.suppress(OSError):
            entries.append((p.stat().st_mtime, p))
    entries.sort(reverse=True)
    for i, (mtime, p) in enumerate(entries):
        if mtime < limit or i >= _INITRAMFS_KEEP_COUNT:
            with contextlib.suppress(OSError):
                p.unlink()


def build_initramfs(
    script: str,
    modules: Sequence[str] = (),
    extra_files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    *,
    kernel: Kernel | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> Path:
    """Build (or reuse) an initramfs that runs ``script`` and return its path.

    The archive holds busybox-static with a symlink per applet, ``/init``
    (``guest_init.sh``), ``/test.sh`` = ``script``, the modules
    :data:`BASE_MODULES` + ``modules`` with their dependencies (decompressed, in
    load order), and ``extra_files`` (guest path -> bytes, str or host path; host
    files keep their executable bit).  The result is cached under
    ``<cache>/initramfs/<sha256>.cpio.gz``: identical inputs return the same file
    without rebuilding.
    """
    kernel = kernel or fetch_kernel(cache=cache)
    busybox = _find_busybox()
    if busybox is None or not _is_static_elf(busybox):
        raise GuestPrerequisiteError("a static /bin/busybox is needed: install the Debian package busybox-static")
    order = resolve_modules([*BASE_MODULES, *modules], kernel)
    init = _init_script()

    files: dict[str, tuple[bytes, int]] = {}
    for guest_path, content in (extra_files or {}).items():
        if isinstance(content, bytes):
            files[guest_path] = (content, 0o644)
        elif isinstance(content, str):
            files[guest_path] = (content.encode(), 0o644)
        else:
            host = Path(content)
            files[guest_path] = (host.read_bytes(), 0o755 if os.access(host, os.X_OK) else 0o644)

    h = hashlib.sha256()
    bb_stat = busybox.stat()
    for part in (
        f"format {_INITRAMFS_FORMAT}", init, script, kernel.package, kernel.version,
        f"busybox {busybox} {bb_stat.st_size} {bb_stat.st_mtime_ns}", *order,
    ):
        h.update(part.encode() + b"\0\1")
    for guest_path in sorted(files):
        data, mode = files[guest_path]
        h.update(guest_path.encode() + b"\0" + str(mode).encode() + b"\0" + hashlib.sha256(data).digest())
    out_dir = (Path(cache) if cache is not None else cache_dir()) / "initramfs"
    out = out_dir / f"{h.hexdigest()[:32]}.cpio.gz"
    if out.exists():
        os.utime(out)  # keep it from being pruned
        log.debug("initramfs cache hit %s", out)
        return out

    t0 = time.monotonic()
    cpio = _Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root", "mnt", "etc/vhostuser"):
        cpio.mkdir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("init", init.encode(), 0o755)
    cpio.file("test.sh", script.encode(), 0o755)
    names = []
    for i, rel in enumerate(order):
        name = f"{i:02d}-{_norm(rel)}.ko"
        cpio.file(f"lib/modules/{name}", _module_bytes(kernel.modules_dir / rel))
        names.append(name)
    cpio.file("etc/vhostuser/modules", "".join(n + "\n" for n in names).encode())
    cpio.file("etc/hostname", b"vhostuser-guest\n")
    for guest_path, (data, mode) in sorted(files.items()):
        cpio.file(guest_path, data, mode)
    raw = cpio.finish()

    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".cpio.gz", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(raw)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    log.info("built initramfs %s (%d modules, %d KiB) in %.2f s",
             out.name, len(order), out.stat().st_size // 1024, time.monotonic() - t0)
    _prune_initramfs_cache(out_dir)
    return out


# -------------------------------------------------------------------- devices


@dataclasses.dataclass(frozen=True)
class VhostUserDevice:
    """A vhost-user PCI device whose back-end listens on ``socket_path``.

    ``kind`` is a short name (``rng``, ``blk``, ``vsock``, ``fs``, ``scsi``,
    ``input``, ``gpio``, ``i2c``, ``net``) or a QEMU driver name (``vhost-user-rng-pci``).
    ``net`` is ``-netdev vhost-user`` + ``virtio-net-pci,...,vectors=0`` (``extra``:
    ``"mac=52:54:00:00:00:01,packed=on"``).
    ``extra`` is appended to ``-device`` (``"num-queues=2,packed=on"``),
    ``chardev_extra`` to ``-chardev socket`` (``"reconnect=1"``, blk only in QEMU
    7.2).  For ``fs`` a ``tag=vhostuser`` is added unless ``extra`` has a tag.

    The back-end must already listen when QEMU starts (QEMU is the client and,
    for rng/vsock/fs, fails or hangs otherwise: see ``docs/guest-rig.md``).
    """

    kind: str
    socket_path: str | os.PathLike[str]
    extra: str = ""
    chardev_extra: str = ""
    id: str | None = None

    @property
    def driver(self) -> str:
        """The QEMU ``-device`` driver name."""
        return VHOST_USER_KINDS.get(self.kind, self.kind)

    def guest_modules(self) -> tuple[str, ...]:
        """The guest modules needed for the device (empty if unknown)."""
        return DEVICE_MODULES.get(self.driver, ())

    def qemu_args(self, index: int) -> list[str]:
        """``-chardev`` and ``-device`` arguments; ``index`` makes the ids unique."""
        chardev = f"vhu{index}"
        cdev = f"socket,id={chardev},path={os.fspath(self.socket_path)}"
        if self.chardev_extra:
            cdev += "," + self.chardev_extra
        if self.kind == "net":
            # vhost-user-net is a -netdev; vectors=0 because MSI-X crashes QEMU 7.2's
            # virtio-net under TCG at DRIVER_OK (INTx works)
            dev = f"virtio-net-pci,netdev=vhunet{index},id={self.id or f'vhudev{index}'},vectors=0"
            if self.extra:
                dev += "," + self.extra
            return ["-chardev", cdev, "-netdev", f"vhost-user,id=vhunet{index},chardev={chardev}", "-device", dev]
        dev = f"{self.driver},chardev={chardev},id={self.id or f'vhudev{index}'}"
        if self.driver == "vhost-user-fs-pci" and "tag=" not in self.extra:
            dev += ",tag=vhostuser"
        if self.extra:
            dev += "," + self.extra
        return ["-chardev", cdev, "-device", dev]


def _device_driver(spec: str) -> str:
    return spec.split(",", 1)[0]


# ---------------------------------------------------------------------- runner


@dataclasses.dataclass
class GuestResult:
    """What a guest run produced.

    ``output``: stdout+stderr of the test script (exact bytes decoded as UTF-8,
    between the result markers); ``status``: its exit status; ``console``: the
    whole serial console (kernel + init + output, ``\\r\\n`` normalised);
    ``duration``: wall seconds from QEMU start to exit; ``script_start``: guest
    uptime (s) when the script started, i.e. the boot time seen by the guest;
    ``stderr``: QEMU's standard error.
    """

    output: str
    status: int
    console: str
    duration: float
    script_start: float | None = None
    stderr: str = ""

    def check(self) -> GuestResult:
        """Raise :class:`GuestScriptError` (with the console tail) unless status is 0."""
        if self.status != 0:
            raise GuestScriptError(
                f"guest script exited with status {self.status}\n--- output ---\n{self.output}"
                f"\n--- console tail ---\n{_tail(self.console)}"
            )
        return self


def _tail(text: str, chars: int = 4000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def _parse_result(raw: str) -> tuple[str | None, int | None, float | None, str | None]:
    """(output, status, script_start, failed module) from the result channel."""
    failed = None
    m = re.search(re.escape(MARK_MODULE_FAILED) + r" (\S+)", raw)
    if m:
        failed = m.group(1)
    begin = re.search(re.escape(MARK_BEGIN) + r"(?: ([0-9.]+))?\n", raw)
    if begin is None:
        return None, None, None, failed
    start = float(begin.group(1)) if begin.group(1) else None
    end = raw.find("\n" + MARK_END + "\n", begin.end() - 1)
    status_m = re.search(re.escape(MARK_STATUS) + r" (-?\d+)", raw)
    if end < 0 or status_m is None:
        return None, None, start, failed
    output = raw[begin.end():end] if end >= begin.end() else ""
    return output, int(status_m.group(1)), start, failed


def qemu_command(
    kernel: Kernel,
    initramfs: Path,
    *,
    devices: Sequence[VhostUserDevice | str] = (),
    memory: str = "512M",
    cpus: int = 1,
    machine: str = "q35",
    append: str = "",
    extra_args: Sequence[str] = (),
    console_path: Path,
) -> list[str]:
    """The QEMU command line (without the pdeathsig wrapper).

    Guest RAM is a shared memfd (needed by every vhost-user device), TCG only.
    ttyS0 (the console) goes to ``console_path``, ttyS1 (the result channel) to
    stdout.  ``devices`` entries are :class:`VhostUserDevice` or raw ``-device``
    strings (``"virtio-rng-pci"``).
    """
    cmd = [
        "qemu-system-x86_64",
        "-nodefaults", "-no-user-config",
        "-machine", f"{machine},accel=tcg",
        "-cpu", "max",
        "-smp", str(cpus),
        "-m", memory,
        "-object", f"memory-backend-memfd,id=mem0,size={memory},share=on",
        "-numa", "node,memdev=mem0",
        "-display", "none", "-vga", "none", "-nic", "none", "-no-reboot",
        "-chardev", f"file,id=con0,path={console_path}",
        "-serial", "chardev:con0",
        "-chardev", "stdio,id=res0,signal=off",
        "-serial", "chardev:res0",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(initramfs),
        "-append", f"{_DEFAULT_APPEND} {append}".strip(),
    ]
    for i, dev in enumerate(devices):
        if isinstance(dev, VhostUserDevice):
            cmd += dev.qemu_args(i)
        else:
            cmd += ["-device", dev]
    cmd += list(extra_args)
    return cmd


class GuestProcess:
    """A running guest (see :func:`start_guest`); a context manager that always
    kills QEMU and removes its work directory on exit.

    The result channel (ttyS1) is read by a thread; :meth:`wait_for_output`
    lets a test wait until the guest script printed something (e.g. "ready")
    before acting on the host side.
    """

    def __init__(self, cmd: list[str], workdir: Path, console_path: Path, timeout: float, *, keep_workdir: bool = False) -> None:
        self.cmd = cmd
        self.workdir = workdir
        self.console_path = console_path
        self.timeout = timeout
        self.keep_workdir = keep_workdir
        self._stderr_path = workdir / "qemu.stderr"
        self._result = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._start = time.monotonic()
        self.deadline = self._start + timeout
        self._done: GuestResult | None = None
        wrapper = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        log.info("starting guest: %s", " ".join(cmd))
        with open(self._stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                wrapper + cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                start_new_session=True, close_fds=True,
            )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"guest-{self.pid}-ttyS1", daemon=True)
        self._reader.start()

    # -- output
    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                with self._cond:
                    self._result += chunk
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    @property
    def raw_output(self) -> str:
        """Everything received on the result channel so far."""
        with self._cond:
            return self._result.decode(errors="replace")

    @property
    def console(self) -> str:
        """The serial console log so far."""
        try:
            return self.console_path.read_bytes().decode(errors="replace").replace("\r\n", "\n")
        except OSError:
            return ""

    @property
    def stderr(self) -> str:
        """QEMU's standard error so far."""
        try:
            return self._stderr_path.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def wait_for_output(self, text: str, timeout: float | None = None) -> None:
        """Block until ``text`` appears on the result channel.

        Raises :class:`GuestTimeout` (and kills QEMU) after ``timeout`` seconds
        or at the guest's deadline, :class:`GuestBootError` if QEMU exits first.
        """
        deadline = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        needle = text.encode()
        with self._cond:
            while needle not in self._result:
                if self._eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            found = needle in self._result
        if found:
            return
        if self.proc.poll() is None and time.monotonic() >= deadline:
            self._timeout(f"{text!r} did not appear on the guest's result channel")
        self.proc.wait()
        raise GuestBootError(
            f"QEMU exited with status {self.proc.returncode} before the guest printed {text!r}"
            f"\n--- QEMU stderr ---\n{self.stderr}\n--- console tail ---\n{_tail(self.console)}",
            console=self.console, stderr=self.stderr,
        )

    # -- lifecycle
    def _timeout(self, why: str) -> None:
        self.kill()
        console, output = self.console, self.raw_output
        raise GuestTimeout(
            f"guest timed out after {time.monotonic() - self._start:.1f} s (timeout {self.timeout} s): {why}; "
            f"QEMU killed\n--- QEMU stderr ---\n{self.stderr}\n--- result channel ---\n{_tail(output, 2000)}"
            f"\n--- console tail ---\n{_tail(console)}",
            console=console, output=output, stderr=self.stderr,
        )

    def wait(self, timeout: float | None = None, *, earlier_output: str = "") -> GuestResult:
        """Wait for the guest to power off and return its :class:`GuestResult`.

        ``timeout`` (seconds from now) may shorten the guest's overall deadline.
        On expiry QEMU is killed and :class:`GuestTimeout` raised.
        ``earlier_output``: what the result channel carried on the QEMUs this
        guest was live-migrated from (the start of the script's output is there).
        """
        if self._done is not None:
            return self._done
        deadline = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._timeout("the guest did not power off")
        duration = time.monotonic() - self._start
        self._reader.join(5)
        raw, console, stderr = earlier_output + self.raw_output, self.console, self.stderr
        output, status, start, failed = _parse_result(raw)
        if failed is not None:
            raise GuestBootError(
                f"guest could not load module {failed}\n--- console tail ---\n{_tail(console)}",
                console=console, stderr=stderr,
            )
        if output is None or status is None:
            raise GuestBootError(
                f"QEMU exited with status {self.proc.returncode} without a script result"
                f"\n--- QEMU stderr ---\n{stderr}\n--- result channel ---\n{_tail(raw, 2000)}"
                f"\n--- console tail ---\n{_tail(console)}",
                console=console, stderr=stderr,
            )
        if self.proc.returncode != 0:
            log.warning("QEMU exited with status %s after the script finished: %s", self.proc.returncode, stderr)
        log.info("guest finished in %.1f s (script started at guest uptime %s s), status %d",
                 duration, start, status)
        self._done = GuestResult(output=output, status=status, console=console, duration=duration,
                                 script_start=start, stderr=stderr)
        return self._done

    def kill(self) -> None:
        """Kill QEMU (its whole process group) and reap it; idempotent."""
        if self.proc.poll() is None:
            log.info("killing QEMU pid %d", self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(5)

    def close(self) -> None:
        """Kill QEMU if still running, close pipes, remove the work directory."""
        try:
            self.kill()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            if not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare_boot(
    script: str,
    *,
    devices: Sequence[VhostUserDevice | str] = (),
    modules: Sequence[str] = (),
    extra_files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    kernel: Kernel | None = None,
) -> tuple[Kernel, Path]:
    """The kernel and the initramfs (cached) that boot ``script`` with the guest
    modules ``devices`` need plus ``modules``; what :func:`start_guest` boots.

    Several QEMUs booted from the same pair run the same guest, which is what a
    live migration needs (see :mod:`vhostuser.testing.migration`).
    Raises :class:`GuestUnsupportedDeviceError` first for a device QEMU cannot run
    under TCG.
    """
    check_tcg_support(devices)
    check_prerequisites()
    kernel = kernel or fetch_kernel()
    wanted: list[str] = []
    for dev in devices:
        driver = dev.driver if isinstance(dev, VhostUserDevice) else _device_driver(dev)
        wanted += DEVICE_MODULES.get(driver, ())
    wanted += modules
    return kernel, build_initramfs(script, list(dict.fromkeys(wanted)), extra_files, kernel=kernel)


def build_static_program(source: Path, *, flags: Sequence[str] = ("-O2", "-Wall", "-pthread")) -> Path:
    """Compile a C program for the guest with ``gcc -static`` (busybox has no
    compiler and the guest no libc) into ``<cache>/bin``, once per source and
    flags; returns the binary.  Ship it with ``extra_files``.

    Raises :class:`GuestPrerequisiteError` without gcc / static glibc (Debian
    packages gcc, libc6-dev).
    """
    data = source.read_bytes()
    digest = hashlib.sha256(data + repr(tuple(flags)).encode()).hexdigest()[:16]
    out = cache_dir() / "bin" / f"{source.stem}-{digest}"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GuestPrerequisiteError("gcc is missing: install the Debian packages gcc and libc6-dev (static glibc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    done = subprocess.run([gcc, "-static", *flags, "-o", str(tmp), str(source)], capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise GuestPrerequisiteError(
            f"building {source.name} failed (static glibc is in the Debian package libc6-dev):\n{done.stderr}")
    os.replace(tmp, out)
    return out


def start_guest(
    script: str,
    *,
    devices: Sequence[VhostUserDevice | str] = (),
    modules: Sequence[str] = (),
    memory: str = "512M",
    timeout: float = 120,
    extra_args: Sequence[str] = (),
    extra_files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    cpus: int = 1,
    machine: str = "q35",
    append: str = "",
    kernel: Kernel | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> GuestProcess:
    """Boot a guest that runs ``script`` (busybox ``sh``) and return at once.

    Use as a context manager; :meth:`GuestProcess.wait` gives the result.  The
    guest modules for ``devices`` are added to ``modules`` automatically (see
    :data:`DEVICE_MODULES`).  ``timeout`` counts from now.  ``workdir`` (kept
    afterwards) receives the console log and QEMU's stderr; by default a
    temporary directory is used and removed.

    Raises :class:`GuestUnsupportedDeviceError` at once for a device QEMU cannot
    run under TCG (:data:`TCG_UNSUPPORTED`), :class:`GuestPrerequisiteError` for a
    missing host tool, :class:`GuestKernelError` if no guest kernel can be had.
    """
    kernel, initramfs = prepare_boot(script, devices=devices, modules=modules, extra_files=extra_files,
                                     kernel=kernel)
    keep = workdir is not None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="vhostuser-guest-"))
    else:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    console_path = workdir / "console.log"
    cmd = qemu_command(kernel, initramfs, devices=devices, memory=memory, cpus=cpus, machine=machine,
                       append=append, extra_args=extra_args, console_path=console_path)
    try:
        return GuestProcess(cmd, workdir, console_path, timeout, keep_workdir=keep)
    except BaseException:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def run_guest(
    script: str,
    *,
    devices: Sequence[VhostUserDevice | str] = (),
    modules: Sequence[str] = (),
    memory: str = "512M",
    timeout: float = 120,
    extra_args: Sequence[str] = (),
    extra_files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    cpus: int = 1,
    machine: str = "q35",
    append: str = "",
    kernel: Kernel | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> GuestResult:
    """Boot a guest, run ``script`` in it, wait for power-off, return the result.

    The arguments are those of :func:`start_guest`.  Raises
    :class:`GuestTimeout` (QEMU killed) or :class:`GuestBootError`; QEMU never
    outlives the call.  A non-zero script status is *not* an error: see
    :meth:`GuestResult.check`.
    """
    with start_guest(
        script, devices=devices, modules=modules, memory=memory, timeout=timeout, extra_args=extra_args,
        extra_files=extra_files, cpus=cpus, machine=machine, append=append, kernel=kernel, workdir=workdir,
    ) as guest:
        return guest.wait()


# ------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vhostuser.testing.guest {check,fetch,run}``."""
    parser = argparse.ArgumentParser(prog="python -m vhostuser.testing.guest", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="check the host prerequisites")
    f = sub.add_parser("fetch", help="download and unpack the guest kernel into the cache")
    f.add_argument("--package", help="kernel image package (default: what linux-image-amd64 depends on)")
    r = sub.add_parser("run", help="boot a guest and run a shell script in it")
    r.add_argument("script", help="shell code to run in the guest")
    r.add_argument("--device", action="append", default=[], help="raw -device string (repeatable)")
    r.add_argument("--vhost-user", action="append", default=[], metavar="KIND=SOCKET",
                   help="a vhost-user device whose back-end listens on SOCKET, e.g. rng=/tmp/rng.sock (repeatable)")
    r.add_argument("--module", action="append", default=[], help="extra guest module (repeatable)")
    r.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = sys.stdout
    try:
        if args.cmd == "check":
            check_prerequisites()
            out.write("guest rig prerequisites: ok\n")
        elif args.cmd == "fetch":
            k = fetch_kernel(args.package)
            out.write(f"{k.package} {k.version}\n{k.vmlinuz}\n{k.modules_dir}\n")
        else:
            devices: list[VhostUserDevice | str] = list(args.device)
            for spec in args.vhost_user:
                kind, sep, path = spec.partition("=")
                if not sep or not kind or not path:
                    parser.error(f"--vhost-user wants KIND=SOCKET, not {spec!r}")
                devices.append(VhostUserDevice(kind, path))
            res = run_guest(args.script, devices=devices, modules=args.module, timeout=args.timeout)
            out.write(res.output)
            out.write(f"\n[status {res.status}, {res.duration:.1f} s, script started at guest uptime {res.script_start} s]\n")
            return res.status
    except GuestError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
