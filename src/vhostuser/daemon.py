"""``VhostUserDaemon``: serve a :class:`~vhostuser.backend.VhostUserBackend`.

One protocol thread reads the vhost-user socket and applies requests; worker
threads (one per entry of :meth:`VhostUserBackend.queues_per_thread`) run the
device.  The daemon keeps serving across any number of front-end restarts:

* **server mode** (:meth:`serve`, :meth:`start_server`): we listen, the
  front-end connects (QEMU ``-chardev socket,path=...``).  After a disconnect
  the next connection is accepted on the *same* listening socket; the socket
  file is never unlinked and re-created while we run.
* **client mode** (:meth:`connect`, :meth:`start_client`): the front-end
  listens (QEMU ``server=on``); we connect, and reconnect with back-off after it
  goes away.
* **inherited fd** (:meth:`start_fd`): a listening socket (socket activation,
  ``--fd``) is served like server mode; a connected one is served until it
  closes.

Usage::

    with VhostUserDaemon("rng", RngBackend()) as daemon:
        daemon.start_server("/tmp/rng.sock")
        daemon.wait()          # until request_shutdown() or a signal handler ends it
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from types import TracebackType

from .backend import VhostUserBackend
from .backend_handler import VhostUserHandler
from .connection import Endpoint, Listener
from .errors import Disconnected, ProtocolError
from .handler import BackendConnection
from .sys_util.poll import Poller
from .sys_util.sockstate import is_listening

log = logging.getLogger(__name__)

_LISTENER, _CONNECTION = 0, 1


class VhostUserDaemon:
    """Run a device back-end over vhost-user (see module docs)."""

    def __init__(self, name: str, backend: VhostUserBackend) -> None:
        self.name = name
        self.backend = backend
        self.handler = VhostUserHandler(backend)
        self._poller = Poller()
        self._shutdown = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        self._endpoint: Endpoint | None = None
        #: the socket path given to start_server / start_client (None for start_fd)
        self.socket_path: str | None = None
        #: number of front-end connections served so far
        self.connections = 0
        #: the protocol state of the front-end being served (None between connections)
        self.connection: BackendConnection | None = None
        #: set while a front-end is connected (cleared once its session is cleaned up)
        self.connected = threading.Event()

    # ------------------------------------------------------------ public API
    def start_server(self, socket_path: str | os.PathLike[str], *, mode: int = 0o600) -> None:
        """Listen on ``socket_path`` (created with permissions ``mode``) and serve
        front-ends one after another, in a thread; returns at once.

        Raises :class:`OSError` if the socket cannot be created (the path exists,
        the directory is missing) and :class:`RuntimeError` if already started."""
        path = os.fspath(socket_path)
        self._start(self._serve_listener, Listener(path, mode=mode))
        self.socket_path = path

    def start_client(self, socket_path: str | os.PathLike[str], *, max_backoff: float = 2.0) -> None:
        """Connect to a front-end listening on ``socket_path``, in a thread;
        reconnect with back-off (at most ``max_backoff`` s apart) after it goes away.
        Returns at once; :class:`RuntimeError` if already started."""
        path = os.fspath(socket_path)
        self._start(self._serve_client, path, max_backoff)
        self.socket_path = path

    def start_fd(self, fd: int) -> None:
        """Serve an inherited socket: listening (many front-ends) or connected (one)."""
        sock = socket.socket(fileno=fd)
        listening = is_listening(sock)
        sock.detach()
        if listening:
            self._start(self._serve_listener, Listener.from_fd(fd))
        else:
            self._start(self._serve_connection_once, Endpoint.from_fd(fd))

    def serve(self, socket_path: str | os.PathLike[str]) -> None:
        """Listen on ``socket_path`` and serve front-ends until shut down:
        :meth:`start_server` then :meth:`wait`.  The usual way to run a device."""
        self.start_server(socket_path)
        self.wait()

    def connect(self, socket_path: str | os.PathLike[str]) -> None:
        """Serve a front-end that listens on ``socket_path`` (QEMU ``server=on``)
        until shut down: :meth:`start_client` then :meth:`wait`."""
        self.start_client(socket_path)
        self.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the daemon stops; False if ``timeout`` expired first."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def request_shutdown(self) -> None:
        """Ask the daemon to stop (from any thread, or a signal handler)."""
        self._shutdown.set()
        self._poller.wake()

    @property
    def running(self) -> bool:
        """Whether the daemon's protocol thread runs (started and not yet stopped)."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> VhostUserDaemon:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.request_shutdown()
        self.wait()

    # ------------------------------------------------------------ internals
    def _start(self, target, *args) -> None:  # noqa: ANN001
        if self._thread is not None:
            raise RuntimeError("the daemon is already started")
        self.handler.start_workers()
        self._thread = threading.Thread(target=self._main, args=(target, *args),
                                        name=f"vhostuser-{self.name}", daemon=True)
        self._thread.start()

    def _main(self, target, *args) -> None:  # noqa: ANN001
        try:
            target(*args)
        except Exception:  # noqa: BLE001 - logged; the daemon ends
            log.exception("%s: protocol thread failed", self.name)
        finally:
            self.handler.stop_workers()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._poller.close()
            log.info("%s: stopped", self.name)

    def _serve_listener(self, listener: Listener) -> None:
        self._listener = listener
        self._poller.register(listener.fileno(), _LISTENER)
        log.info("%s: listening on %s", self.name, listener.path or f"fd {listener.fileno()}")
        try:
            while not self._shutdown.is_set():
                if not self._poller.wait(None) or self._shutdown.is_set():
                    continue
                try:
                    endpoint = listener.accept_endpoint(timeout=0)
                except (BlockingIOError, TimeoutError):
                    continue
                self._serve_connection(endpoint)
        finally:
            self._poller.unregister(listener.fileno())

    def _serve_client(self, socket_path: str, max_backoff: float) -> None:
        delay = 0.05
        while not self._shutdown.is_set():
            try:
                endpoint = Endpoint.connect(socket_path, replies=False)
            except OSError as exc:
                log.debug("%s: connect to %s failed (%s); retrying in %.2fs", self.name, socket_path, exc, delay)
                if self._shutdown.wait(delay):
                    break
                delay = min(delay * 2, max_backoff)
                continue
            delay = 0.05
            self._serve_connection(endpoint)

    def _serve_connection_once(self, endpoint: Endpoint) -> None:
        self._serve_connection(endpoint)

    def _serve_connection(self, endpoint: Endpoint) -> None:
        """Serve one front-end until it disconnects or we shut down."""
        self.connections += 1
        self._endpoint = endpoint
        self.connected.set()
        conn = self.connection = BackendConnection(endpoint, self.handler)
        log.info("%s: front-end connected", self.name)
        fd = endpoint.fileno()  # kept: a fatal protocol error closes the endpoint before we unregister
        self._poller.register(fd, _CONNECTION)
        try:
            while not self._shutdown.is_set():
                events = self._poller.wait(None)
                if self._shutdown.is_set():
                    break
                if not any(token == _CONNECTION for token, _ in events):
                    continue
                conn.handle_one()
        except Disconnected:
            log.info("%s: front-end disconnected", self.name)
        except ProtocolError as exc:
            log.error("%s: dropping the connection: %s", self.name, exc)
        finally:
            self._poller.unregister(fd)
            endpoint.close()
            self._endpoint = None
            self.connection = None
            self.handler.disconnected()
            self.connected.clear()  # after the clean-up: every fd of the session is closed

