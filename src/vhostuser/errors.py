"""The exception hierarchy shared by every layer and by both implementations.

Every exception the library raises on purpose derives from :class:`VhostUserError`.
The native (C) and pure-Python implementations raise the same classes with the
same messages, so callers never need to know which one is active.

Who broke the rules is part of the type (as in h11):

* :class:`RemoteProtocolError` - the peer sent bytes or fds that violate the
  vhost-user protocol.  The right reaction is to fail the request or drop the
  connection, never the process.
* :class:`LocalProtocolError` - *we* were asked to do something the protocol does
  not allow (a bug in the caller).
"""
from __future__ import annotations

__all__ = [
    "VhostUserError",
    "ImplementationUnavailable",
    "FdPassingError",
    "ControlMessageTruncated",
    "ProtocolError",
    "RemoteProtocolError",
    "LocalProtocolError",
    "Disconnected",
    "GuestMemoryError",
    "GuestAddressError",
    "QueueError",
    "InvalidDescriptorError",
    "DescriptorChainTooLong",
    "InvalidAvailIndex",
    "InvalidIndirectTable",
    "DeviceError",
]


class VhostUserError(Exception):
    """Base class of every error raised by vhostuser."""


class ImplementationUnavailable(ImportError, VhostUserError):
    """The requested implementation (``VHOSTUSER_IMPL=native``) cannot be loaded."""


# --------------------------------------------------------------------- OS layer
class FdPassingError(VhostUserError, OSError):
    """Passing file descriptors over an AF_UNIX socket failed."""


class ControlMessageTruncated(FdPassingError):
    """The kernel truncated the ancillary data (MSG_CTRUNC): more fds were sent
    than the receiver allowed.  Every fd that did arrive has been closed."""


# --------------------------------------------------------------------- protocol
class ProtocolError(VhostUserError):
    """A vhost-user protocol violation.

    ``request`` names the request (an enum member or ``None``) the error is about.
    """

    def __init__(self, message: str, *, request: object | None = None) -> None:
        super().__init__(message)
        self.request = request


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol (malformed message, wrong fd count, ...)."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class Disconnected(VhostUserError, ConnectionError):
    """The peer closed the connection (EOF, EPIPE or ECONNRESET).

    Callers use this to decide whether to wait for / retry a new connection.
    """


# ----------------------------------------------------------------- guest memory
class GuestMemoryError(VhostUserError):
    """A guest memory table or region is invalid."""


class GuestAddressError(GuestMemoryError):
    """An access (address + length) is not entirely inside guest memory."""

    def __init__(self, message: str, *, addr: int | None = None, length: int | None = None) -> None:
        super().__init__(message)
        self.addr = addr
        self.length = length


# -------------------------------------------------------------------- virtqueues
class QueueError(VhostUserError):
    """A virtqueue is in a state the device cannot process (hostile or broken ring).

    After this error the queue must be considered failed: the device should stop
    using it and may signal the vring's error fd.
    """


class InvalidDescriptorError(QueueError):
    """A descriptor is malformed: index out of range, bad flags, zero length,
    or a buffer outside guest memory."""


class DescriptorChainTooLong(QueueError):
    """A chain is longer than the queue size (which includes a chain that loops)."""


class InvalidAvailIndex(QueueError):
    """The driver's avail index moved by more than the queue size."""


class InvalidIndirectTable(QueueError):
    """An indirect descriptor table is malformed (bad length, nested indirect, ...)."""


# ------------------------------------------------------------------------ device
class DeviceError(VhostUserError):
    """A device back-end failed to handle a request."""
