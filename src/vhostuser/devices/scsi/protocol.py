"""virtio-scsi wire structures (VIRTIO 1.3 §5.6) and SCSI sense data (SPC-4).

Queues: 0 control (task management, asynchronous notification), 1 event,
2.. request.  A request is one chain::

    device-readable:  struct virtio_scsi_req_cmd { u8 lun[8]; le64 id; u8 task_attr;
                      u8 prio; u8 crn; u8 cdb[32]; }   [data-out]
    device-writable:  struct virtio_scsi_resp_cmd { le32 sense_len; le32 residual;
                      le16 status_qualifier; u8 status; u8 response; u8 sense[96]; }
                      [data-in]
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

VIRTIO_ID_SCSI = 8

#: queue indices
CONTROL_QUEUE = 0
EVENT_QUEUE = 1
FIRST_REQUEST_QUEUE = 2

#: VIRTIO_SCSI_CDB_DEFAULT_SIZE / VIRTIO_SCSI_SENSE_DEFAULT_SIZE (what Linux and QEMU use)
CDB_SIZE = 32
SENSE_SIZE = 96

#: struct virtio_scsi_req_cmd (without the T10 PI fields: VIRTIO_SCSI_F_T10_PI is not offered)
REQ_CMD = struct.Struct(f"<8sQBBB{CDB_SIZE}s")
#: struct virtio_scsi_resp_cmd
RESP_CMD = struct.Struct(f"<IIHBB{SENSE_SIZE}s")
#: struct virtio_scsi_ctrl_tmf (device-readable part); the writable part is u8 response
CTRL_TMF = struct.Struct("<II8sQ")
#: struct virtio_scsi_ctrl_an (device-readable part); writable: le32 event_actual, u8 response
CTRL_AN = struct.Struct("<I8sI")
CTRL_AN_RESP = struct.Struct("<IB")
#: struct virtio_scsi_event
EVENT = struct.Struct("<I8sI")
#: struct virtio_scsi_config
CONFIG = struct.Struct("<IIIIIIIHHI")


class ScsiFeature(enum.IntFlag):
    """``VIRTIO_SCSI_F_*``."""

    INOUT = 1 << 0
    HOTPLUG = 1 << 1
    CHANGE = 1 << 2
    T10_PI = 1 << 3


class Response(enum.IntEnum):
    """``VIRTIO_SCSI_S_*``: the transport-level outcome of a request or TMF."""

    OK = 0  # also FUNCTION_COMPLETE for TMFs
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12


class ControlType(enum.IntEnum):
    """``VIRTIO_SCSI_T_*`` of a control-queue request."""

    TMF = 0
    AN_QUERY = 1
    AN_SUBSCRIBE = 2


class TmfSubtype(enum.IntEnum):
    """``VIRTIO_SCSI_T_TMF_*``."""

    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class EventType(enum.IntEnum):
    """``VIRTIO_SCSI_T_*`` of an event-queue entry."""

    NO_EVENT = 0
    TRANSPORT_RESET = 1
    ASYNC_NOTIFY = 2
    PARAM_CHANGE = 3


#: VIRTIO_SCSI_T_EVENTS_MISSED, or-ed into ``event``
EVENTS_MISSED = 0x80000000


class ResetReason(enum.IntEnum):
    """``VIRTIO_SCSI_EVT_RESET_*``: the reason of a TRANSPORT_RESET event."""

    HARD = 0
    RESCAN = 1
    REMOVED = 2


class Status(enum.IntEnum):
    """SCSI status byte (SAM-5)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28


class SenseKey(enum.IntEnum):
    """SPC-4 sense keys."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB


@dataclass(frozen=True)
class Sense:
    """A sense key with its additional sense code and qualifier."""

    key: SenseKey
    asc: int
    ascq: int = 0

    def fixed(self) -> bytes:
        """Fixed-format sense data (response code 0x70, 18 bytes)."""
        data = bytearray(18)
        data[0] = 0x70
        data[2] = int(self.key)
        data[7] = 10  # additional sense length
        data[12] = self.asc
        data[13] = self.ascq
        return bytes(data)

    def __str__(self) -> str:
        return f"{self.key.name} {self.asc:02x}/{self.ascq:02x}"


NO_SENSE = Sense(SenseKey.NO_SENSE, 0x00)
INVALID_OPCODE = Sense(SenseKey.ILLEGAL_REQUEST, 0x20)
LBA_OUT_OF_RANGE = Sense(SenseKey.ILLEGAL_REQUEST, 0x21)
INVALID_FIELD_IN_CDB = Sense(SenseKey.ILLEGAL_REQUEST, 0x24)
LUN_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x25)
INVALID_FIELD_IN_PARAMETER_LIST = Sense(SenseKey.ILLEGAL_REQUEST, 0x26)
PARAMETER_LIST_LENGTH_ERROR = Sense(SenseKey.ILLEGAL_REQUEST, 0x1A)
SAVING_PARAMETERS_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x39)
WRITE_PROTECTED = Sense(SenseKey.DATA_PROTECT, 0x27)
SPACE_ALLOCATION_FAILED = Sense(SenseKey.DATA_PROTECT, 0x27, 0x07)
UNRECOVERED_READ_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x11)
WRITE_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x0C)
INTERNAL_TARGET_FAILURE = Sense(SenseKey.HARDWARE_ERROR, 0x44)


def decode_lun(lun: bytes) -> tuple[int, int] | None:
    """``(target, lun)`` of a virtio-scsi LUN field, or None if it is not in the
    single-level format (byte 0 = 1, byte 1 = target, bytes 2-3 = flat LUN)."""
    if len(lun) != 8 or lun[0] != 1 or any(lun[4:]):
        return None
    return lun[1], ((lun[2] << 8) | lun[3]) & 0x3FFF


def encode_lun(target: int, lun: int) -> bytes:
    """The virtio-scsi LUN field for ``target`` / ``lun`` (as Linux's virtio_scsi builds it)."""
    return bytes([1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])


@dataclass
class VirtioScsiConfig:
    """``struct virtio_scsi_config`` (VIRTIO 1.3 §5.6.4)."""

    num_queues: int = 1
    seg_max: int = 126
    max_sectors: int = 0xFFFF
    cmd_per_lun: int = 128
    event_info_size: int = EVENT.size
    sense_size: int = SENSE_SIZE
    cdb_size: int = CDB_SIZE
    max_channel: int = 0
    max_target: int = 0
    max_lun: int = 16383

    def pack(self) -> bytes:
        """``struct virtio_scsi_config`` bytes."""
        return CONFIG.pack(self.num_queues, self.seg_max, self.max_sectors, self.cmd_per_lun,
                           self.event_info_size, self.sense_size, self.cdb_size, self.max_channel,
                           self.max_target, self.max_lun)
