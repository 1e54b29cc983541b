"""``vhostuser info``: version, data-path implementation and OS-layer choices."""
from __future__ import annotations

import argparse

DESCRIPTION = """Print the vhostuser version, which data-path implementation is live
(native C extension or pure Python; force one with VHOSTUSER_IMPL=native|python)
and which OS mechanisms were picked for events, shared memory and polling."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    import vhostuser
    from vhostuser import sys_util

    print(f"vhostuser {vhostuser.__version__}")
    print(f"implementation: {vhostuser.IMPL}")
    for label, name in (("events", "DEFAULT_EVENT_KIND"), ("shared memory", "DEFAULT_SHM_KIND"),
                        ("selector", "DEFAULT_SELECTOR_KIND")):
        value = getattr(sys_util, name, None)
        if value is not None:
            print(f"{label}: {getattr(value, 'value', value)}")
    return 0
