"""The portable OS layer: the only place in vhostuser with per-OS code.

* :mod:`.event` - :class:`EventNotifier` / :class:`EventConsumer` (eventfd, or a pipe)
* :mod:`.sock_ctrl_msg` - :func:`send_with_fds` / :func:`recv_with_fds` (SCM_RIGHTS)
* :mod:`.shm` - shared memory by fd (memfd_create, or shm_open + unlink), fd mappings
* :mod:`.poll` - :class:`Poller` over :mod:`selectors` (epoll / kqueue / poll / select)
* :mod:`.fdinfo` - :func:`describe_fd` (memfd / eventfd / socket ..., size) for diagnostics
* :mod:`.sockstate` - :func:`socket_peer_state` (what a socket's peer shut down, by ``poll()``)
* :mod:`.tap` - :func:`open_tap` (Linux TAP interfaces with IFF_VNET_HDR)

Each variant is picked by a capability probe (never ``sys.platform``) and can be
forced by a ``kind=`` argument or an environment variable read at call time
(``VHOSTUSER_NOTIFIER``, ``VHOSTUSER_SHM``, ``VHOSTUSER_SELECTOR``,
``VHOSTUSER_CMSG_CLOEXEC``), so the macOS/BSD fallbacks also run on Linux.
See ``docs/os-layer.md``.
"""
from __future__ import annotations

from .event import (
    AVAILABLE_EVENT_KINDS,
    DEFAULT_EVENT_KIND,
    EventConsumer,
    EventKind,
    EventNotifier,
    new_event_consumer_and_notifier,
)
from .fdinfo import HAVE_PROC_FD, FdInfo, describe_fd
from .poll import (
    AVAILABLE_SELECTOR_KINDS,
    DEFAULT_SELECTOR_KIND,
    EVENT_ERROR,
    EVENT_READ,
    EVENT_WRITE,
    Poller,
    SelectorKind,
)
from .shm import (
    AVAILABLE_SHM_KINDS,
    DEFAULT_SHM_KIND,
    MappedRegion,
    SharedMemory,
    ShmKind,
    buffer_address,
    create_shm_fd,
    fd_size,
    map_fd,
    shrink_sealed,
)
from .sockstate import (
    AVAILABLE_SOCKSTATE_KINDS,
    DEFAULT_SOCKSTATE_KIND,
    PeerState,
    SockStateKind,
    is_listening,
    socket_peer_state,
)
from .sock_ctrl_msg import (
    HAVE_MSG_CMSG_CLOEXEC,
    MAX_FDS,
    recv_into_with_fds,
    recv_with_fds,
    send_with_fds,
)

__all__ = [
    "HAVE_PROC_FD",
    "FdInfo",
    "describe_fd",
    "AVAILABLE_EVENT_KINDS",
    "DEFAULT_EVENT_KIND",
    "EventConsumer",
    "EventKind",
    "EventNotifier",
    "new_event_consumer_and_notifier",
    "AVAILABLE_SELECTOR_KINDS",
    "DEFAULT_SELECTOR_KIND",
    "EVENT_ERROR",
    "EVENT_READ",
    "EVENT_WRITE",
    "Poller",
    "SelectorKind",
    "AVAILABLE_SHM_KINDS",
    "DEFAULT_SHM_KIND",
    "MappedRegion",
    "SharedMemory",
    "ShmKind",
    "buffer_address",
    "fd_size",
    "shrink_sealed",
    "create_shm_fd",
    "map_fd",
    "AVAILABLE_SOCKSTATE_KINDS",
    "DEFAULT_SOCKSTATE_KIND",
    "PeerState",
    "SockStateKind",
    "is_listening",
    "socket_peer_state",
    "HAVE_MSG_CMSG_CLOEXEC",
    "MAX_FDS",
    "recv_into_with_fds",
    "recv_with_fds",
    "send_with_fds",
]
