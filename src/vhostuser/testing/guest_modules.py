"""Guest kernel modules the Debian kernel does not build, built out of tree.

Debian's 6.1 kernel has ``# CONFIG_GPIO_VIRTIO is not set`` and ``# CONFIG_I2C_VIRTIO
is not set``, but its ``CONFIG_GPIOLIB`` and ``CONFIG_I2C`` are built in, so the
drivers build as external modules against the headers of the guest kernel:

* the source files come from Debian's ``linux-source-6.1`` tarball
  (``/usr/src/linux-source-6.1.tar.xz``; both drivers extracted in one pass and kept);
* ``make -C /usr/src/linux-headers-<version> M=<dir> modules`` builds it
  (``linux-headers-<version>``, which ``linux-headers-amd64`` pulls in);
* the ``.ko`` is cached under :func:`~vhostuser.testing.guest.cache_dir`
  ``/modules/<version>/``, keyed by the source's hash, like the kernel itself.

Load it in the guest with ``insmod`` (pass the file with ``extra_files``).
``scripts/install-deps --test`` installs the packages.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .guest import GuestPrerequisiteError, Kernel, _locked, cache_dir

log = logging.getLogger(__name__)

__all__ = ["OUT_OF_TREE", "build_module"]

#: module name -> its source file in the kernel tree
OUT_OF_TREE: dict[str, str] = {
    "gpio-virtio": "drivers/gpio/gpio-virtio.c",
    "i2c-virtio": "drivers/i2c/busses/i2c-virtio.c",
}

SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_PREFIX = "linux-source-6.1/"


def _headers(kernel: Kernel) -> Path:
    headers = Path(f"/usr/src/linux-headers-{kernel.version}")
    if not (headers / "Makefile").exists():
        raise GuestPrerequisiteError(
            f"{headers} is missing: install linux-headers-{kernel.version} (the guest kernel's headers; "
            "scripts/install-deps --test installs linux-headers-amd64)")
    return headers


def _sources(cache: Path, stamp: int) -> Path:
    """Every :data:`OUT_OF_TREE` source, extracted from the tarball in one pass
    (decompressing it takes a minute or more) and kept in the cache."""
    if not SOURCE_TARBALL.exists():
        raise GuestPrerequisiteError(f"{SOURCE_TARBALL} is missing: install the Debian package linux-source-6.1")
    tree = cache / f"src-{stamp}"
    if all((tree / m).exists() for m in OUT_OF_TREE.values()):
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="vhu-src-", dir=cache) as tmp:
        members = [SOURCE_PREFIX + m for m in OUT_OF_TREE.values()]
        r = subprocess.run(["tar", "-xJf", str(SOURCE_TARBALL), "-C", tmp, *members],
                           capture_output=True, text=True, timeout=900, check=False)
        if r.returncode != 0:
            raise GuestPrerequisiteError(f"cannot extract the driver sources from {SOURCE_TARBALL}: {r.stderr.strip()}")
        os.replace(Path(tmp) / SOURCE_PREFIX.rstrip("/"), tree)
    for old in cache.glob("src-*"):
        if old != tree:
            shutil.rmtree(old, ignore_errors=True)
    return tree


def build_module(name: str, kernel: Kernel) -> Path:
    """The ``.ko`` of out-of-tree module ``name`` (:data:`OUT_OF_TREE`) for
    ``kernel``, built once and cached.  Raises :class:`GuestPrerequisiteError`
    when the packages are missing or the build fails."""
    member = OUT_OF_TREE[name]
    headers = _headers(kernel)
    cache = cache_dir() / "modules" / kernel.version
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        done = sorted(cache.glob(f"{name}-*.ko"))
        stamp = SOURCE_TARBALL.stat().st_mtime_ns if SOURCE_TARBALL.exists() else 0
        key = hashlib.sha256(f"{member}|{stamp}|{headers}".encode()).hexdigest()[:16]
        target = cache / f"{name}-{key}.ko"
        if target.exists():
            return target
        for old in done:
            old.unlink(missing_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"vhu-{name}-"))
        try:
            shutil.copyfile(_sources(cache, stamp) / member, work / Path(member).name)
            (work / "Makefile").write_text(f"obj-m := {Path(member).stem}.o\n")
            log.info("building %s for %s against %s", name, kernel.version, headers)
            r = subprocess.run(["make", "-C", str(headers), f"M={work}", "modules"], capture_output=True,
                               text=True, timeout=900, check=False)
            ko = work / f"{Path(member).stem}.ko"
            if r.returncode != 0 or not ko.exists():
                raise GuestPrerequisiteError(f"building {name} failed (status {r.returncode}):\n"
                                             f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(ko, tmp)
            os.replace(tmp, target)
            return target
        finally:
            shutil.rmtree(work, ignore_errors=True)
