"""What a connected socket's peer has shut down, without reading from it.

:func:`socket_peer_state` asks ``poll()`` (with a zero timeout) about one fd:

* ``send_shut``: the peer shut down its sending side - a read returns EOF once
  the queued data is consumed (``POLLRDHUP``, or ``POLLHUP`` where the system
  has no ``POLLRDHUP``);
* ``both_shut``: the peer shut down both directions or closed the socket
  (``POLLHUP`` / ``POLLERR``; AF_UNIX reports ``POLLHUP`` only then).

Variant by capability probe: ``select.poll`` -> ``poll``; without it (or forced
with ``kind="none"`` / ``VHOSTUSER_SOCKSTATE=none``) nothing can be told and the
answer is "closed both ways" (``known=False``), the safe assumption after EOF.

:func:`is_listening` tells a listening socket from a connected one
(``SO_ACCEPTCONN`` where the system has it, else "has no peer").
"""
from __future__ import annotations

import enum
import errno
import select
import socket
from dataclasses import dataclass
from typing import Final

from ._variant import _choose_variant

__all__ = [
    "AVAILABLE_SOCKSTATE_KINDS",
    "DEFAULT_SOCKSTATE_KIND",
    "ENV_VAR",
    "PeerState",
    "SockStateKind",
    "is_listening",
    "socket_peer_state",
]


def is_listening(sock: socket.socket) -> bool:
    """True if ``sock`` is listening (accepts connections), False if connected."""
    opt = getattr(socket, "SO_ACCEPTCONN", None)
    if opt is not None:
        return bool(sock.getsockopt(socket.SOL_SOCKET, opt))
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return True
        raise
    return False

ENV_VAR: Final = "VHOSTUSER_SOCKSTATE"


class SockStateKind(enum.Enum):
    """How :func:`socket_peer_state` finds out."""

    POLL = "poll"
    NONE = "none"


AVAILABLE_SOCKSTATE_KINDS: Final = frozenset(
    {SockStateKind.NONE} | ({SockStateKind.POLL} if hasattr(select, "poll") else set())
)
DEFAULT_SOCKSTATE_KIND: Final = SockStateKind.POLL if SockStateKind.POLL in AVAILABLE_SOCKSTATE_KINDS \
    else SockStateKind.NONE

_RDHUP: Final = getattr(select, "POLLRDHUP", 0)


@dataclass(frozen=True)
class PeerState:
    """See the module docs.  ``known`` is False when the system cannot tell
    (then both flags are True)."""

    send_shut: bool
    both_shut: bool
    known: bool = True


def socket_peer_state(fd: int, kind: SockStateKind | str | None = None) -> PeerState:
    """The shutdown state of the peer of the connected socket ``fd`` (never blocks)."""
    chosen = _choose_variant(SockStateKind, kind, ENV_VAR, AVAILABLE_SOCKSTATE_KINDS, DEFAULT_SOCKSTATE_KIND)
    if chosen is SockStateKind.NONE:
        return PeerState(True, True, known=False)
    poller = select.poll()
    poller.register(fd, select.POLLIN | _RDHUP)
    try:
        events = poller.poll(0)
    except OSError:
        return PeerState(True, True, known=False)
    bits = 0
    for _fd, ev in events:
        bits |= ev
    both = bool(bits & (select.POLLHUP | select.POLLERR | getattr(select, "POLLNVAL", 0)))
    send = both or bool(bits & _RDHUP)
    return PeerState(send, both)
