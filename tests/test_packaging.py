"""Packaging as a user installs it: ``python -m build`` makes an sdist and a wheel
from a pristine checkout; a fresh venv installs each (the sdist builds the C
core), and ``vhostuser demo`` runs from each.

Needs the registry for the build requirements and cffi (as any user's install
does).  It does not depend on VHOSTUSER_IMPL, so scripts/test runs it once, on
its own (``-m packaging``), not in each implementation's pass.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:  # noqa: ANN003
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"  # a pristine checkout: no in-place extension, no venv, no build left-overs
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".hypothesis", ".pytest_cache"))
    _run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(src)])
    return tmp / "dist"


def test_sdist_and_wheel_hold_what_a_user_needs(dist: Path) -> None:
    (sdist,) = dist.glob("vhostuser-*.tar.gz")
    (wheel,) = dist.glob("vhostuser-*.whl")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("pyproject.toml", "setup.py", "README.md", "LICENSE-APACHE", "LICENSE-BSD-3-Clause",
                   "src/vhostuser/_native/ring.c", "src/vhostuser/_native/ring.h",
                   "src/vhostuser/_native/build_native.py", "src/vhostuser/devices/rng.json"):
        assert needed in names, needed
    with zipfile.ZipFile(wheel) as zf:
        wnames = zf.namelist()
    assert "vhostuser/py.typed" in wnames and "vhostuser/devices/rng.json" in wnames
    assert any(n.startswith("vhostuser/") and n.endswith(".so") for n in wnames), "the wheel has no C core"


@pytest.mark.parametrize("kind", ["sdist", "wheel"])
def test_fresh_venv_installs_it_and_the_demo_runs(dist: Path, kind: str, tmp_path: Path) -> None:
    (artifact,) = dist.glob("vhostuser-*.tar.gz" if kind == "sdist" else "vhostuser-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(artifact)])
    env = {k: v for k, v in os.environ.items() if k not in ("VHOSTUSER_IMPL", "PYTHONPATH")}
    info = _run([str(venv / "bin" / "vhostuser"), "info"], env=env, cwd=tmp_path)
    assert "implementation: native" in info.stdout, info.stdout  # the C core was built and installed
    demo = _run([str(venv / "bin" / "vhostuser"), "demo"], env=env, cwd=tmp_path)
    assert "bytes of entropy read through a virtqueue" in demo.stdout + demo.stderr
    assert "exited with status 0" in demo.stdout + demo.stderr
    man = _run([str(venv / "bin" / "python"), "-m", "vhostuser.manpages", str(tmp_path / "man")], env=env)
    assert "vhostuser-rng.1" in man.stdout
