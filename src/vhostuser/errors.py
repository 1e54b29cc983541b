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
    "GuestMemoryFault",
    "GuestAddressError",
    "QueueError",
    "InvalidDescriptorError",
    "DescriptorChainTooLong",
    "InvalidAvailIndex",
    "InvalidIndirectTable",
    "DeviceError",
    "UnsupportedVariant",
    "MessageFramingError",
    "UnknownRequest",
    "InvalidMessage",
    "FdCountError",
    "RequestNotAllowed",
    "RequestNotSupported",
    "RequestFailed",
    # what a device author catches on the data path
    "QueueNotReady",
    "QueueBroken",
    "QueueAddressError",
    "DescriptorAddressError",
    "IndirectTableAddressError",
    "QueueUsageError",
    "ChainTooShort",
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


class GuestMemoryFault(GuestMemoryError):
    """An access to mapped guest memory (or the dirty log) faulted: the front-end
    shrank the file behind it after it was mapped (SIGBUS, caught by the C core)."""


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


# ------------------------------------------------------------ OS layer variants
class UnsupportedVariant(VhostUserError, ValueError):
    """A forced OS-layer variant (a ``kind=`` argument or a ``VHOSTUSER_*``
    environment variable such as ``VHOSTUSER_SELECTOR=kqueue``) is unknown or is
    not available on this system."""


# ------------------------------------------------------- protocol (details)
class _RemoteProtocolErrorWithFate(RemoteProtocolError):
    """A :class:`RemoteProtocolError` that says whether the connection survives.

    ``fatal`` is True when the connection must be dropped (the byte stream can no
    longer be trusted, or the peer waits for a reply we cannot give).
    """

    fatal: bool = False

    def __init__(self, message: str, *, request: object | None = None, fatal: bool | None = None) -> None:
        super().__init__(message, request=request)
        if fatal is not None:
            self.fatal = fatal


class MessageFramingError(_RemoteProtocolErrorWithFate):
    """The peer's byte stream is not a vhost-user message stream (wrong version,
    reserved flag bits, a size over the 4 KiB limit, EOF inside a message).
    Always fatal: the connection must be dropped."""

    fatal = True


class UnknownRequest(_RemoteProtocolErrorWithFate):
    """The peer sent a request code this side does not know.  The message was
    skipped; the connection stays usable."""


class InvalidMessage(_RemoteProtocolErrorWithFate):
    """A well-framed message whose payload is wrong for its request: size not
    matching the payload type, too many memory regions, a config space size that
    does not match, a REPLY flag where none belongs, a bad field value."""


class FdCountError(_RemoteProtocolErrorWithFate):
    """A message came with the wrong number of file descriptors (they were closed)."""


class RequestNotAllowed(_RemoteProtocolErrorWithFate):
    """A request arrived that negotiation does not allow: its protocol feature was
    not negotiated, ``VHOST_USER_F_PROTOCOL_FEATURES`` was not offered, or it came
    before SET_OWNER."""


class RequestNotSupported(DeviceError):
    """The back-end (handler) does not implement this request."""


class RequestFailed(VhostUserError):
    """The peer answered a request with a failure (a non-zero REPLY_ACK, an empty
    GET_CONFIG reply, ...).  ``request`` names it and ``code`` is the value returned."""

    def __init__(self, message: str, *, request: object | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.request = request
        self.code = code


# ------------------------------------------- guest memory / virtqueue additions
class QueueNotReady(QueueError):
    """The virtqueue is not configured and enabled (no size, no addresses, not ready)."""


class QueueBroken(QueueError):
    """The virtqueue failed earlier (hostile or corrupt ring) and refuses work until reset."""


class QueueAddressError(QueueError, GuestAddressError):
    """A ring area (descriptor table, avail/used ring, event area) is misaligned or
    not inside one guest memory region."""


class DescriptorAddressError(InvalidDescriptorError, GuestAddressError):
    """A descriptor's buffer is not entirely inside guest memory."""


class IndirectTableAddressError(InvalidIndirectTable, GuestAddressError):
    """An indirect descriptor table is not inside one guest memory region."""


class QueueUsageError(VhostUserError, ValueError):
    """The device used the queue API incorrectly (a bug in the device, not in the
    driver): e.g. ``add_used`` of an out-of-range head or of more buffers than are
    in flight.  The queue state is left unchanged."""


class ChainTooShort(DeviceError, EOFError):
    """A :class:`~vhostuser.virtqueue.Reader` or :class:`~vhostuser.virtqueue.Writer`
    ran out of chain bytes: the driver's buffers are shorter than the request needs.
    The device should fail that request, not the queue."""


# ------------------------------------------------------------------ vsock device
class VsockError(DeviceError):
    """An error of the bundled vsock device (:mod:`vhostuser.devices.vsock`)."""


class VsockPacketError(VsockError, ValueError):
    """The guest sent a malformed virtio-vsock packet (short header, a ``len``
    that does not match the payload, an unknown op or type).  The packet is
    dropped (or answered with RST); the device keeps running."""


class VsockConfigError(VsockError, ValueError):
    """An invalid vsock device configuration (command line, ``--vm`` string or
    ``--config`` file)."""


__all__ += ["VsockError", "VsockPacketError", "VsockConfigError"]


# ------------------------------------------------------------ mock front-end
class MockFrontendError(VhostUserError):
    """The mock front-end (:mod:`vhostuser.testing.frontend`) cannot do what it was
    asked: a required feature is not offered, the guest RAM is too small, the
    rings were not started..."""


class VringFailed(MockFrontendError):
    """The back-end signalled a vring's error fd (SET_VRING_ERR) while the mock
    front-end was waiting for used buffers on it."""

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        #: the vring whose error fd fired
        self.index = index


__all__ += ["MockFrontendError", "VringFailed"]


# -------------------------------------------------------------------- blk device
class BlkError(DeviceError):
    """An error of the bundled virtio-blk device (:mod:`vhostuser.devices.blk`)."""


class BlkImageError(BlkError):
    """The disk image cannot be used: it cannot be opened, is locked by another
    process, is not a file or block device, or an access fell outside it."""


__all__ += ["BlkError", "BlkImageError"]


# ------------------------------------------------------------------ console device
class ConsoleError(DeviceError):
    """An error of the bundled virtio-console device (:mod:`vhostuser.devices.console`)."""


class ConsoleControlError(ConsoleError, ValueError):
    """A malformed MULTIPORT control message (too short, field out of range)."""


class ConsoleConfigError(ConsoleError, ValueError):
    """Invalid console options (backend/port combination, socket count, size)."""


__all__ += ["ConsoleError", "ConsoleControlError", "ConsoleConfigError"]
