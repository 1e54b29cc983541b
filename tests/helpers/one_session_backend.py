"""A back-end that serves ONE front-end session and exits with status 3, the way
QEMU's virtiofsd does: ``python one_session_backend.py SOCKET``."""
from __future__ import annotations

import socket
import sys

from vhostuser import VhostUserDaemon
from vhostuser.testing import EchoBackend

if __name__ == "__main__":
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[1])
    listener.listen(1)
    conn, _ = listener.accept()
    listener.close()
    daemon = VhostUserDaemon("one-session", EchoBackend(1))
    daemon.start_fd(conn.detach())   # a connected socket: served until the front-end closes it
    daemon.wait()
    sys.exit(3)
