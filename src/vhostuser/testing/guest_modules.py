"""Guest kernel modules the Debian kernel does not build, built out of tree.

Debian's 6.1 kernel has ``# CONFIG_GPIO_VIRTIO is not set`` and ``# CONFIG_I2C_VIRTIO
is not set``, but its ``CONFIG_GPIOLIB`` and ``CONFIG_I2C`` are built in, so the
drivers build as external modules against the headers of the guest kernel:

* the source file comes from Debian's ``linux-source-6.1`` tarball
  (``/usr/src/linux-source-6.1.tar.xz``, one member extracted);
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


def _extract(member: str, dest: Path) -> bytes:
    if not SOURCE_TARBALL.exists():
        raise GuestPrerequisiteError(f"{SOURCE_TARBALL} is missing: install the Debian package linux-source-6.1")
    with tempfile.TemporaryDirectory(prefix="vhu-src-") as tmp:
        r = subprocess.run(["tar", "-xJf", str(SOURCE_TARBALL), "-C", tmp, SOURCE_PREFIX + member],
                           capture_output=True, text=True, timeout=600, check=False)
        if r.returncode != 0:
            raise GuestPrerequisiteError(f"cannot extract {member} from {SOURCE_TARBALL}: {r.stderr.strip()}")
        data = (Path(tmp) / (SOURCE_PREFIX + member)).read_bytes()
    dest.write_bytes(data)
    return data


def build_module(name: str, kernel: Kernel) -> Path:
    """The ``.ko`` of out-of-tree module ``name`` (:data:`OUT_OF_TREE`) for
    ``kernel``, built once and cached.  Raises :class:`GuestPrerequisiteError`
    when the packages are missing or the build fails."""
    member = OUT_OF_TREE[name]
    headers = _headers(kernel)
    cache = cache_dir() / "modules" / kernel.version
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
            _extract(member, work / Path(member).name)
            (work / "Makefile").write_text(f"obj-m := {Path(member).stem}.o\n")
            log.info("building %s for %s against %s", name, kernel.version, headers)
            r = subprocess.run(["make", "-C", str(headers), f"M={work}", "modules"], capture_output=True,
                               text=True, timeout=900, check=False)
            ko = work / f"{Path(member).stem}.ko"
            if r.returncode != 0 or not ko.exists():
                raise GuestPrerequisiteError(f"building {name} failed (status {r.returncode}):\n"
                                             f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(ko, tmp)
            os.replace(tmp, target)
            return target
        finally:
            shutil.rmtree(work, ignore_errors=True)
