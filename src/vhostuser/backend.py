"""``VhostUserBackend``: the class a device author subclasses.

The vocabulary is rust-vmm's ``vhost-user-backend`` crate, in idiomatic Python:
one class, no twin ``&self``/``&mut self`` traits, no lock wrappers.  The
smallest device overrides :attr:`num_queues`, :meth:`features` and
:meth:`handle_event`::

    class Echo(VhostUserBackend):
        num_queues = 1

        def handle_event(self, device_event, evset, vrings, thread_id):
            vring = vrings[device_event]
            while chains := vring.pop_batch():      # drain the ring, a batch at a time
                for chain in chains:
                    data = chain.reader().read(chain.writable_len)
                    chain.writer().write(data)
                    vring.add_used(chain, len(data))
            vring.signal_used_queue()

Threading: the daemon's protocol thread calls the configuration methods
(:meth:`acked_features`, :meth:`update_memory`, :meth:`get_config`, ...);
worker threads call :meth:`handle_event`.  While a worker runs
:meth:`handle_event`, the protocol thread cannot change the rings that worker
serves (it waits for the worker's lock), so a device never sees a ring change
under its feet.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from uuid import UUID
from typing import TYPE_CHECKING, ClassVar

from .device_state import LOAD, SAVE, StateTransfer
from .errors import DeviceError
from .fd_registry import FIRST_DEVICE_TOKEN, FdRegistry
from .protocol.message import VhostUserProtocolFeatures as PF
from .protocol.message import VirtioFeatures
from .sys_util.poll import EVENT_READ, FileDescriptorLike

if TYPE_CHECKING:
    from .backend_channel import BackendChannel
    from .memory import GuestMemory
    from .sys_util.event import EventConsumer
    from .vring import VringState

__all__ = ["FIRST_DEVICE_TOKEN", "VhostUserBackend"]

log = logging.getLogger(__name__)


class VhostUserBackend:
    """Base class of a vhost-user device back-end.

    Override what your device needs; every method has a sensible default.
    """

    #: number of virtqueues the device has (a class attribute, or set per instance)
    num_queues: int = 1
    #: the largest queue size the device accepts
    max_queue_size: int = 1024
    #: virtio device features the device offers (device-specific bits).
    #: VERSION_1, RING_EVENT_IDX, RING_INDIRECT_DESC and RING_PACKED are added
    #: by :meth:`features` unless you override it.
    device_features: ClassVar[int] = 0
    #: the device's config space (``None``: the device has none)
    config_space: bytes | None = None
    #: the device can save and restore its state for migration (DEVICE_STATE):
    #: set it and override :meth:`save_state` / :meth:`load_state`
    supports_device_state: ClassVar[bool] = False
    #: requests are idempotent, so after a back-end crash the requests that were
    #: in flight can be resubmitted (INFLIGHT_SHMFD): set it for e.g. block devices
    supports_inflight: ClassVar[bool] = False
    #: CHECK_DEVICE_STATE waits this long (seconds) for a transfer to finish
    device_state_timeout: float = 10.0
    #: the largest device state a load accepts (bytes)
    max_device_state_size: int = 256 << 20

    def __init__(self) -> None:
        self._acked_features = 0
        self._event_idx = False
        self.memory: GuestMemory | None = None
        self.backend_channel: BackendChannel | None = None
        #: the device's own fds that the daemon's workers watch (see :meth:`register_fd`)
        self.fd_registry = FdRegistry()
        self._state_transfer: StateTransfer | None = None

    # ------------------------------------------------------------ negotiation
    def features(self) -> int:
        """Virtio features offered to the front-end (``VHOST_USER_F_PROTOCOL_FEATURES``
        is added by the daemon)."""
        return (
            VirtioFeatures.VERSION_1
            | VirtioFeatures.RING_EVENT_IDX
            | VirtioFeatures.RING_INDIRECT_DESC
            | VirtioFeatures.RING_PACKED
            | self.device_features
        )

    def protocol_features(self) -> PF:
        """Protocol features the device supports.

        The daemon adds the ones it implements itself for every device (MQ,
        REPLY_ACK, CONFIGURE_MEM_SLOTS, BACKEND_REQ, BACKEND_SEND_FD, LOG_SHMFD,
        RESET_DEVICE, STATUS, INBAND_NOTIFICATIONS); return here the ones that
        need device work.  ``CONFIG`` is added when the device has a config
        space: :attr:`config_space` is set, or :meth:`get_config` is overridden
        (dynamic config); ``DEVICE_STATE`` with :attr:`supports_device_state`, ``INFLIGHT_SHMFD``
        with :attr:`supports_inflight`; override to add e.g. ``SHARED_OBJECT``.
        """
        pf = PF(0)
        if self.has_config():
            pf |= PF.CONFIG
        if self.supports_device_state:
            pf |= PF.DEVICE_STATE
        if self.supports_inflight:
            pf |= PF.INFLIGHT_SHMFD
        return pf

    def acked_features(self, features: int) -> None:
        """The front-end acknowledged ``features`` (SET_FEATURES, maybe repeatedly)."""
        self._acked_features = features

    @property
    def acked(self) -> int:
        """The features the front-end acknowledged last."""
        return self._acked_features

    def set_event_idx(self, enabled: bool) -> None:
        """VIRTIO_F_RING_EVENT_IDX was (not) negotiated."""
        self._event_idx = enabled

    # ----------------------------------------------------------------- memory
    def update_memory(self, memory: GuestMemory) -> None:
        """The guest memory table changed (SET_MEM_TABLE, ADD/REM_MEM_REG)."""
        self.memory = memory

    # ----------------------------------------------------------------- config
    def has_config(self) -> bool:
        """Whether the device has a config space (then ``PROTOCOL_F_CONFIG`` is
        offered): :attr:`config_space` is set or :meth:`get_config` is overridden."""
        return self.config_space is not None or type(self).get_config is not VhostUserBackend.get_config

    def get_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of the config space at ``offset`` (GET_CONFIG).

        The default reads :attr:`config_space`.  Override for a config space
        that changes (then :attr:`config_space` may stay ``None``); after a change
        the device may tell the driver with
        ``self.backend_channel.config_change()`` (when BACKEND_REQ was negotiated).
        Raise :class:`~vhostuser.errors.DeviceError` for a range the device
        does not have: the front-end gets a failed request."""
        space = self.config_space or b""
        if offset < 0 or size < 0 or offset + size > len(space):
            raise DeviceError(f"config read [{offset}, +{size}) outside the {len(space)}-byte config space")
        return bytes(space[offset:offset + size])

    def set_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the config space (SET_CONFIG).

        The default refuses writes (:class:`~vhostuser.errors.DeviceError`, the
        front-end gets a failed request).  The message's flags (front-end write or
        migration) are not passed on: a device that must tell them apart cannot yet."""
        raise DeviceError("this device's config space is read-only")

    # ---------------------------------------------------------------- threads
    def queues_per_thread(self) -> Sequence[int]:
        """One bit mask of queue indices per worker thread.

        The default serves every queue from one thread.
        """
        return [(1 << self.num_queues) - 1]

    def exit_event(self, thread_id: int) -> EventConsumer | None:
        """An event that, when signalled, makes worker ``thread_id`` exit.

        The daemon stops its workers itself; override this only if the device
        wants to end a worker on its own.
        """
        return None

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        """Process an event on worker thread ``thread_id`` (rust-vmm's argument order).

        ``device_event`` is the index of a queue whose kick fd fired (the ring is
        started and enabled), or a token the device registered with
        :meth:`register_fd`.  ``evset`` says why: a mask of
        :data:`~vhostuser.EVENT_READ`, :data:`~vhostuser.EVENT_WRITE` and
        :data:`~vhostuser.EVENT_ERROR` (always EVENT_READ for a kick).
        ``vrings`` maps queue index to :class:`~vhostuser.vring.VringState` for the
        queues this worker serves (:meth:`queues_per_thread`), and only those.

        Raising an exception while handling a queue fails that queue: the error
        is logged, the vring's error fd is signalled, and the daemon keeps
        serving.  An exception while handling a device token is logged.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement handle_event()")

    # ------------------------------------------------------------- ring hooks
    def vring_started(self, index: int, vring: VringState) -> None:
        """Queue ``index`` became started and enabled (called on its worker thread's
        lock, before any :meth:`handle_event` for it).  Lets a device begin work
        that does not wait for a kick, e.g. an rx queue that has data pending."""

    def vring_stopped(self, index: int, vring: VringState) -> None:
        """Queue ``index`` stopped or was disabled (GET_VRING_BASE,
        SET_VRING_ENABLE 0, reset, disconnect)."""

    # ------------------------------------------------------ device-owned fds
    def register_fd(self, fd: FileDescriptorLike, token: int, thread_id: int = 0,
                    events: int = EVENT_READ) -> None:
        """Watch ``fd`` in worker ``thread_id``; when it is ready (readable by
        default; ``events`` may be ``EVENT_WRITE`` or both), :meth:`handle_event`
        is called with ``device_event=token`` and the readiness in ``evset``.

        May be called at any time, also before the daemon starts and again for an
        fd registered already (which updates it): registering in
        :meth:`vring_started` is safe across reconnects.  ``token`` must be at
        least :data:`FIRST_DEVICE_TOKEN`.  See :class:`~vhostuser.FdRegistry`.
        """
        self.fd_registry.register(fd, token, thread_id, events)

    def modify_fd(self, fd: FileDescriptorLike, token: int, events: int, thread_id: int = 0) -> None:
        """Change what a registered ``fd`` is watched for (e.g. add ``EVENT_WRITE``
        while output is pending)."""
        self.fd_registry.modify(fd, token, events, thread_id)

    def unregister_fd(self, fd: FileDescriptorLike, thread_id: int | None = None) -> bool:
        """Stop watching ``fd`` (do it before closing the fd); False if it was not
        registered.  ``thread_id`` is accepted for compatibility and ignored."""
        return self.fd_registry.unregister(fd)

    # ---------------------------------------------------- back-end channel etc.
    def set_backend_req_fd(self, channel: BackendChannel) -> None:
        """The front-end gave us a channel for back-end requests (SET_BACKEND_REQ_FD)."""
        self.backend_channel = channel

    def get_shared_object(self, uuid: UUID) -> int:
        """Return an fd (which the daemon sends and then closes) for the shared
        object ``uuid`` (GET_SHARED_OBJECT).  Devices that export objects override."""
        raise DeviceError("this device exports no shared objects")

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP (protocol feature RARP): announce the guest's 6-byte ``mac``
        after a migration.  Net devices that offer RARP override."""
        raise DeviceError("this device does not send RARP announcements")

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (protocol feature MTU): the guest's MTU.  Net devices that
        offer MTU override."""
        raise DeviceError("this device has no MTU")

    def reset_device(self) -> None:
        """Reset device state (RESET_DEVICE, RESET_OWNER, or front-end disconnect)."""
        self._acked_features = 0
        self._event_idx = False

    # ----------------------------------------------------- device state (migration)
    def set_device_state_fd(self, direction: int, phase: int, fd: int) -> None:
        """Start a state transfer over ``fd`` (SET_DEVICE_STATE_FD), which the
        device now owns.  ``direction`` 0 saves (we write :meth:`save_state`'s
        bytes, then close), 1 loads (we read to EOF, then :meth:`load_state`).

        The transfer runs on its own thread (a
        :class:`~vhostuser.device_state.StateTransfer`), so the front-end can
        read or write the other end meanwhile; a transfer still running is
        cancelled first.  :meth:`check_device_state` waits for it.
        """
        self.cancel_device_state()
        if direction not in (SAVE, LOAD):
            os.close(fd)
            raise DeviceError(f"unknown device-state transfer direction {direction}")
        if phase != 0:
            os.close(fd)
            raise DeviceError(f"unsupported device-state migration phase {phase} (only STOPPED)")
        self._state_transfer = StateTransfer(fd, direction, save=self.save_state, load=self.load_state,
                                             max_size=self.max_device_state_size)
        self._state_transfer.start()

    def check_device_state(self) -> None:
        """Wait (at most :attr:`device_state_timeout` seconds) for the transfer
        started by :meth:`set_device_state_fd`; raise if it failed or did not
        finish in time (it is then cancelled) (CHECK_DEVICE_STATE)."""
        transfer, self._state_transfer = self._state_transfer, None
        if transfer is None:
            raise DeviceError("no device-state transfer was started")
        if not transfer.wait(self.device_state_timeout):
            transfer.cancel()
            raise DeviceError(f"device-state transfer did not finish within {self.device_state_timeout}s "
                              "(the front-end neither closed nor drained its end): cancelled")
        if transfer.error is not None:
            raise DeviceError(f"device-state transfer failed: {transfer.error}") from transfer.error

    def cancel_device_state(self) -> None:
        """Cancel a transfer still running (a new transfer, a disconnect)."""
        transfer, self._state_transfer = self._state_transfer, None
        if transfer is not None and not transfer.done:
            log.warning("cancelling an unfinished device-state transfer")
            transfer.cancel()

    def save_state(self) -> bytes:
        """Serialise the device's internal state for migration (DEVICE_STATE)."""
        return b""

    def load_state(self, state: bytes) -> None:
        """Restore state produced by :meth:`save_state` in another process."""
        if state:
            raise DeviceError("this device has no migratable state but received some")
