"""The portable OS layer: the only place in vhostuser with per-OS code.

* :mod:`.event` - :class:`EventNotifier` / :class:`EventConsumer` (eventfd, or a pipe)
* :mod:`.sock_ctrl_msg` - :func:`send_with_fds` / :func:`recv_with_fds` (SCM_RIGHTS)
* :mod:`.shm` - shared memory by fd (memfd_create, or shm_open + unlink), fd mappings
* :mod:`.poll` - :class:`Poller` over :mod:`selectors` (epoll / kqueue / poll / select)

Each variant is picked by a capability probe (never ``sys.platform``) and can be
forced by a ``kind=`` argument or an environment variable read at call time
(``VHOSTUSER_NOTIFIER``, ``VHOSTUSER_SHM``, ``VHOSTUSER_SELECTOR``,
``VHOSTUSER_CMSG_CLOEXEC``), so the macOS/BSD fallbacks also run on Linux.
See ``docs/os-layer.md``.
"""
from __future__ import annotations

import os
from collections.abc import Collection
from enum import Enum
from typing import TypeVar

from ..errors import UnsupportedVariant

_E = TypeVar("_E", bound=Enum)


def _choose_variant(
    enum_cls: type[_E], requested: _E | str | None, env_var: str, available: Collection[_E], default: _E
) -> _E:
    """Resolve a variant: the argument if given, else ``$env_var`` if set, else ``default``.

    Defined before the submodule imports below because they import it.
    Raises :class:`UnsupportedVariant` for unknown names and unavailable variants.
    """
    source = "argument"
    value: object = requested
    if value is None:
        value = os.environ.get(env_var, "").strip()
        source = env_var
        if not value:
            return default
    if not isinstance(value, enum_cls):
        try:
            value = enum_cls(str(value).lower())
        except ValueError:
            names = ", ".join(str(m.value) for m in enum_cls)
            raise UnsupportedVariant(f"{source}={value!r}: expected one of {names}") from None
    if value not in available:
        raise UnsupportedVariant(f"{enum_cls.__name__}.{value.name} ({source}) is not available on this system")
    return value


from .event import (  # noqa: E402
    AVAILABLE_EVENT_KINDS,
    DEFAULT_EVENT_KIND,
    EventConsumer,
    EventKind,
    EventNotifier,
    new_event_consumer_and_notifier,
)
from .poll import (  # noqa: E402
    AVAILABLE_SELECTOR_KINDS,
    DEFAULT_SELECTOR_KIND,
    EVENT_READ,
    EVENT_WRITE,
    Poller,
    SelectorKind,
)
from .shm import (  # noqa: E402
    AVAILABLE_SHM_KINDS,
    DEFAULT_SHM_KIND,
    MappedRegion,
    SharedMemory,
    ShmKind,
    buffer_address,
    create_shm_fd,
    map_fd,
)
from .sock_ctrl_msg import (  # noqa: E402
    HAVE_MSG_CMSG_CLOEXEC,
    MAX_FDS,
    recv_into_with_fds,
    recv_with_fds,
    send_with_fds,
)

__all__ = [
    "AVAILABLE_EVENT_KINDS",
    "DEFAULT_EVENT_KIND",
    "EventConsumer",
    "EventKind",
    "EventNotifier",
    "new_event_consumer_and_notifier",
    "AVAILABLE_SELECTOR_KINDS",
    "DEFAULT_SELECTOR_KIND",
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
    "create_shm_fd",
    "map_fd",
    "HAVE_MSG_CMSG_CLOEXEC",
    "MAX_FDS",
    "recv_into_with_fds",
    "recv_with_fds",
    "send_with_fds",
]
