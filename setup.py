"""Build script: the cffi extension is optional.

The C hot path (``vhostuser._native._ring``) is compiled when cffi and a C
compiler are available.  When they are not, ``pip install .`` still succeeds,
prints a warning, and the package runs on its pure-Python reference path
(``vhostuser.IMPL == "python"``).
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "vhostuser", "_native"))


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into a warning."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure is non-fatal
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        msg = (
            "\nWARNING: vhostuser's C extension could not be built (%s).\n"
            "The package is installed with its pure-Python implementation "
            "(vhostuser.IMPL == 'python').\n" % (exc,)
        )
        sys.stderr.write(msg)
        print(msg)


def _extensions():
    try:
        from build_native import ffibuilder  # noqa: PLC0415
    except Exception as exc:  # cffi missing
        OptionalBuildExt._warn(exc)
        return []
    return [ffibuilder.distutils_extension()]


ext_modules = _extensions()
for ext in ext_modules:
    ext.optional = True

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
