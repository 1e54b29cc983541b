"""cffi out-of-line API-mode build script for ``vhostuser._native._ring``.

The C code lives in real files beside this script: ``ring.h`` (the declarations
cffi exposes, also used as the cdef) and ``ring.c`` (the implementation).  The C
side holds no policy: functions return error codes, Python raises.
"""
import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
# setuptools wants paths relative to the directory it runs in (the project root).
_REL = Path(os.path.relpath(HERE, Path.cwd()))


def _cdef_text() -> str:
    """The part of ring.h between the CDEF markers, which cffi parses."""
    text = (HERE / "ring.h").read_text()
    start = text.index("/* CDEF-BEGIN */") + len("/* CDEF-BEGIN */")
    end = text.index("/* CDEF-END */")
    return text[start:end]


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "vhostuser._native._ring",
    '#include "ring.h"',
    sources=[(_REL / "ring.c").as_posix()],
    include_dirs=[_REL.as_posix()],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-fno-strict-aliasing"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
