"""The README's first code sample works as printed: its device, served by the
daemon, echoes through a virtqueue driven by the mock front-end."""
from __future__ import annotations

import re
from pathlib import Path

from vhostuser.testing.frontend import MockFrontend

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_device_class() -> type:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    device_part = code.split("\nwith VhostUserDaemon")[0]  # the serving part blocks forever
    namespace: dict = {}
    exec(compile(device_part, str(README), "exec"), namespace)  # noqa: S102 - our own README
    return namespace["Echo"]


def test_readme_device_echoes(no_fd_leak, serve_backend) -> None:
    path = serve_backend(readme_device_class()())
    with MockFrontend.connect(path) as fe:
        results = fe.transfer(0, [([f"line {i}".encode()], [32]) for i in range(200)])
        assert [u.data[: u.length] for u in results] == [f"line {i}".encode() for i in range(200)]
