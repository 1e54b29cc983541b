"""pytest fixtures for testing vhost-user device back-ends.

Installed as a ``pytest11`` entry point, so these fixtures are available in any
project that has vhostuser installed (or add
``pytest_plugins = ["vhostuser.testing.pytest_plugin"]`` to a conftest.py).

The shortest device test::

    import pytest
    from vhostuser.testing import FrontendOptions

    @pytest.fixture
    def vhost_backend():
        return MyDevice()

    def test_my_device(vhost_frontend):
        used = vhost_frontend.request(0, [b"request"], [512])
        assert used.data.startswith(b"reply")

Fixtures:

* ``vhost_socket_dir`` - a short temporary directory for sockets (AF_UNIX paths
  must stay under 108 bytes, which pytest's ``tmp_path`` often exceeds);
* ``serve_backend`` - ``serve_backend(backend, mode="server") -> socket path``:
  runs a :class:`~vhostuser.daemon.VhostUserDaemon` in this process; every daemon
  is shut down (and ``backend.close()`` called, if it exists) at teardown;
* ``vhost_backend`` - override it to return your device (default: a 1-queue
  :class:`~vhostuser.testing.echo.EchoBackend`);
* ``vhost_frontend_options`` - the :class:`FrontendOptions` ``vhost_frontend``
  uses; parametrize it (``@pytest.mark.parametrize("vhost_frontend_options", [...])``);
* ``vhost_daemon`` - the daemon serving ``vhost_backend``;
* ``vhost_frontend`` - a started :class:`MockFrontend` connected to it;
* ``mock_frontend_factory`` - ``connect(path, options=None, **overrides)`` for more
  front-ends; all closed at teardown.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ..backend import VhostUserBackend
from ..daemon import VhostUserDaemon
from .echo import EchoBackend
from .frontend import FrontendOptions, MockFrontend

__all__ = ["BackendServer"]


class BackendServer:
    """Runs back-ends in-process with :class:`VhostUserDaemon`; what the
    ``serve_backend`` fixture is (callable)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.daemons: list[VhostUserDaemon] = []
        self._count = 0

    def __call__(self, backend: VhostUserBackend, *, mode: str = "server", path: str | os.PathLike[str] | None = None,
                 name: str | None = None) -> str:
        """Serve ``backend``; returns the socket path.

        ``mode="server"``: the daemon listens at the path (it is ready when this
        returns).  ``mode="client"``: the daemon connects to the path (a front-end
        must listen there: :meth:`MockFrontend.listen`) and reconnects.
        """
        self._count += 1
        path = os.path.join(self.directory, f"vhost{self._count}.sock") if path is None else os.fspath(path)
        daemon = VhostUserDaemon(name or f"{type(backend).__name__.lower()}{self._count}", backend)
        self.daemons.append(daemon)
        if mode == "server":
            daemon.start_server(path)
        elif mode == "client":
            daemon.start_client(path, max_backoff=0.1)
        else:
            raise ValueError(f"mode must be 'server' or 'client', not {mode!r}")
        return path

    def daemon_of(self, backend: VhostUserBackend) -> VhostUserDaemon:
        """The daemon serving ``backend``."""
        for d in self.daemons:
            if d.backend is backend:
                return d
        raise KeyError(backend)

    def stop(self, timeout: float = 5.0) -> None:
        """Shut every daemon down; close backends that have ``close()``."""
        errors = []
        for d in self.daemons:
            d.request_shutdown()
        for d in self.daemons:
            d.__exit__(None, None, None)
            if d.running:
                errors.append(f"daemon {d.name} did not stop")
            close = getattr(d.backend, "close", None)
            if callable(close):
                close()
        self.daemons.clear()
        if errors:
            raise AssertionError("; ".join(errors))


@pytest.fixture
def vhost_socket_dir() -> Iterator[str]:
    """A short-named temporary directory for UNIX sockets (removed afterwards)."""
    directory = tempfile.mkdtemp(prefix="vhu-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def serve_backend(vhost_socket_dir: str) -> Iterator[BackendServer]:
    """``serve_backend(backend, mode="server") -> socket path`` (see :class:`BackendServer`)."""
    server = BackendServer(vhost_socket_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vhost_backend() -> VhostUserBackend:
    """The device under test: override this fixture (default: a 1-queue echo device)."""
    return EchoBackend()


@pytest.fixture
def vhost_frontend_options() -> FrontendOptions:
    """Options for ``vhost_frontend``; override or parametrize this fixture."""
    return FrontendOptions()


@pytest.fixture
def vhost_daemon(serve_backend: BackendServer, vhost_backend: VhostUserBackend) -> VhostUserDaemon:
    """The daemon serving ``vhost_backend`` (its socket: ``vhost_daemon.socket_path``)."""
    serve_backend(vhost_backend)
    return serve_backend.daemon_of(vhost_backend)


@pytest.fixture
def vhost_frontend(vhost_daemon: VhostUserDaemon,
                   vhost_frontend_options: FrontendOptions) -> Iterator[MockFrontend]:
    """A :class:`MockFrontend` connected to ``vhost_backend``, rings started."""
    assert vhost_daemon.socket_path is not None
    with MockFrontend.connect(vhost_daemon.socket_path, vhost_frontend_options) as fe:
        yield fe


@pytest.fixture
def mock_frontend_factory() -> Iterator[Callable[..., MockFrontend]]:
    """``connect(path, options=None, **overrides) -> MockFrontend``; closed at teardown."""
    made: list[MockFrontend] = []

    def connect(path: str | os.PathLike[str], options: FrontendOptions | None = None, **overrides: Any) -> MockFrontend:
        fe = MockFrontend.connect(path, options, **overrides)
        made.append(fe)
        return fe

    try:
        yield connect
    finally:
        for fe in made:
            fe.close()
