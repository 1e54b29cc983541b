"""cffi out-of-line API-mode build script for ``vhostuser._native._ring``.

The C code lives in real files beside this script: ``ring.h`` (the declarations
cffi exposes, also used as the cdef) and ``ring.c`` + ``chainio.c`` (the implementation);
``guard.h``/``guard.c`` wrap the entry points in SIGBUS recovery points.  The C
side holds no policy: functions return error codes, Python raises.

``python src/vhostuser/_native/build_native.py`` builds the extension in place
(next to this file) without going through setuptools; extra compiler flags can
be given in ``VHOSTUSER_CFLAGS`` (e.g. ``-fsanitize=address,undefined`` for a
throwaway sanitizer build) and the compiler in ``CC``.
"""
import os
import shlex
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-fno-strict-aliasing"]


#: the headers whose CDEF parts cffi parses, and the C files
HEADERS = ("ring.h", "guard.h")
SOURCES = ("ring.c", "chainio.c", "guard.c")


def _cdef_text() -> str:
    """The parts of the headers between the CDEF markers, which cffi parses."""
    parts = []
    for name in HEADERS:
        text = (HERE / name).read_text()
        start = text.index("/* CDEF-BEGIN */") + len("/* CDEF-BEGIN */")
        parts.append(text[start:text.index("/* CDEF-END */")])
    return "\n".join(parts)


def make_ffibuilder(base: Path | None = None, extra_cflags: list | None = None) -> FFI:
    """The FFI builder; source paths relative to ``base`` (default: the cwd,
    which is what setuptools wants), or absolute if ``base`` is None and this is
    an in-place build."""
    src = HERE if base is None else Path(os.path.relpath(HERE, base))
    builder = FFI()
    builder.cdef(_cdef_text())
    builder.set_source(
        "vhostuser._native._ring",
        "".join(f'#include "{name}"\n' for name in HEADERS),
        sources=[(src / name).as_posix() for name in SOURCES],
        include_dirs=[src.as_posix()],
        extra_compile_args=CFLAGS + (extra_cflags or []),
        extra_link_args=list(extra_cflags or []),
    )
    return builder


# setuptools wants paths relative to the directory it runs in (the project root).
ffibuilder = make_ffibuilder(Path.cwd())


def build_in_place(extra_cflags: list | None = None, verbose: bool = False) -> Path:
    """Compile the extension and copy it next to this file; returns its path."""
    builder = make_ffibuilder(None, extra_cflags)
    with tempfile.TemporaryDirectory(prefix="vhostuser-native-") as tmp:
        built = Path(builder.compile(tmpdir=tmp, verbose=verbose))
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        dest = HERE / ("_ring" + suffix)
        tmp_dest = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(built, tmp_dest)
        os.chmod(tmp_dest, 0o755)
        os.replace(tmp_dest, dest)  # atomic: a running process keeps its old mapping
    return dest


if __name__ == "__main__":
    flags = shlex.split(os.environ.get("VHOSTUSER_CFLAGS", ""))
    print(build_in_place(flags, verbose="-v" in sys.argv[1:]))
