"""Build a small C tool statically for the test guest (busybox initramfs), once
per source version, cached next to the guest rig's kernel."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vhostuser.testing.guest import cache_dir


def build_static_tool(source: Path, hint: str = "") -> Path:
    """Compile ``source`` with ``gcc -static -O2``; returns the cached binary
    (pytest.fail with the compiler's output if that is impossible)."""
    text = source.read_bytes()
    digest = hashlib.sha256(text + b"gcc -static -O2").hexdigest()[:16]
    out = cache_dir() / "bin" / f"{source.stem}-{digest}"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: install the Debian packages gcc and libc6-dev (static glibc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    done = subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(tmp), str(source)], capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        pytest.fail(f"building {source.name} failed (static glibc is in the Debian package libc6-dev{hint}):\n"
                    f"{done.stderr}")
    os.replace(tmp, out)
    return out
