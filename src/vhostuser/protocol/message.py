"""vhost-user wire constants: request codes, header flags and feature bits.

Names follow the newest vhost-user specification (QEMU ``docs/interop/vhost-user.rst``)
and rust-vmm's ``vhost`` crate.  The old "slave" names are kept as enum aliases
(``FrontendReq.SET_SLAVE_REQ_FD``, ``VhostUserProtocolFeatures.SLAVE_REQ``, ...)
so traces and older documents can be matched; the canonical names are the new ones.
"""
from __future__ import annotations

import enum

__all__ = [
    "FrontendReq",
    "BackendReq",
    "VhostUserHeaderFlag",
    "VhostUserProtocolFeatures",
    "VirtioFeatures",
    "HEADER_SIZE",
    "MAX_MSG_SIZE",
    "VERSION",
    "VERSION_MASK",
    "VRING_INDEX_MASK",
    "VRING_NOFD_MASK",
    "MAX_MEM_TABLE_REGIONS",
    "MAX_CONFIG_SIZE",
    "MAX_SHMEM_REGIONS",
    "MAX_BACKEND_FDS",
]

#: Size of the message header: request (u32), flags (u32), size (u32).
HEADER_SIZE = 12
#: Largest payload we accept or send (the 4 KiB limit of QEMU, libvhost-user and rust-vmm).
MAX_MSG_SIZE = 0x1000
#: The only protocol version (low two bits of ``flags``).
VERSION = 0x1
#: Mask of the version bits in ``flags``.
VERSION_MASK = 0x3
#: Vring index bits in the u64 payload of SET_VRING_KICK/CALL/ERR.
VRING_INDEX_MASK = 0xFF
#: "No fd" (poll) bit in the u64 payload of SET_VRING_KICK/CALL/ERR and of a vring area.
VRING_NOFD_MASK = 0x100
#: Regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS); more need ADD_MEM_REG.
MAX_MEM_TABLE_REGIONS = 8
#: Upper bound of a virtio device config space as carried by GET/SET_CONFIG.
MAX_CONFIG_SIZE = 0x1000
#: Entries of the GET_SHMEM_CONFIG reply array (one per shmid).
MAX_SHMEM_REGIONS = 256
#: At most this many fds in one back-end -> front-end message (BACKEND_SEND_FD).
MAX_BACKEND_FDS = 8


class FrontendReq(enum.IntEnum):
    """Requests the front-end sends to the back-end (``VHOST_USER_*``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    # old name (alias)
    SET_SLAVE_REQ_FD = 21


class BackendReq(enum.IntEnum):
    """Requests the back-end sends to the front-end (``VHOST_USER_BACKEND_*``)
    over the channel set up by SET_BACKEND_REQ_FD."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class VhostUserHeaderFlag(enum.IntFlag):
    """Bits of the header ``flags`` field.  ``VERSION`` is the value of the
    two version bits (always 1); see :data:`VERSION_MASK`."""

    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


class VhostUserProtocolFeatures(enum.IntFlag):
    """Protocol feature bits (``VHOST_USER_PROTOCOL_F_*``), negotiated with
    GET/SET_PROTOCOL_FEATURES once ``VHOST_USER_F_PROTOCOL_FEATURES`` is offered."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    GET_VRING_BASE_INFLIGHT = 1 << 20
    SHMEM = 1 << 21
    # old names (aliases)
    NET_MTU = 1 << 4
    SLAVE_REQ = 1 << 5
    SLAVE_SEND_FD = 1 << 10


class VirtioFeatures(enum.IntFlag):
    """Device-independent virtio feature bits, plus the two vhost bits that share
    the feature word (``VHOST_F_LOG_ALL`` and ``VHOST_USER_F_PROTOCOL_FEATURES``).
    Device-specific bits (0..23) belong to each device."""

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    LOG_ALL = 1 << 26
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40
    ADMIN_VQ = 1 << 41
    # old name (alias)
    IOMMU_PLATFORM = 1 << 33
