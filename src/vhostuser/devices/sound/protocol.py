"""virtio-snd wire formats and the PCM state machine (VIRTIO 1.3 §5.14).  Sans-IO.

Queues: 0 control, 1 event, 2 tx (output PCM), 3 rx (input PCM).
Every control request starts with ``virtio_snd_hdr`` (le32 code) and is
answered with a ``virtio_snd_hdr`` status, followed by the items of an INFO
query.  PCM I/O messages start with ``virtio_snd_pcm_xfer`` (le32 stream id)
and end with the device-written ``virtio_snd_pcm_status`` (le32 status, le32
latency_bytes).
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

VIRTIO_ID_SOUND = 25
CONTROL_QUEUE, EVENT_QUEUE, TX_QUEUE, RX_QUEUE = 0, 1, 2, 3

CONFIG = struct.Struct("<III")  # jacks, streams, chmaps


class Code(enum.IntEnum):
    """Request, event and status codes (spec names without ``VIRTIO_SND_``)."""

    R_JACK_INFO = 1
    R_JACK_REMAP = 2
    R_PCM_INFO = 0x0100
    R_PCM_SET_PARAMS = 0x0101
    R_PCM_PREPARE = 0x0102
    R_PCM_RELEASE = 0x0103
    R_PCM_START = 0x0104
    R_PCM_STOP = 0x0105
    R_CHMAP_INFO = 0x0200
    EVT_JACK_CONNECTED = 0x1000
    EVT_JACK_DISCONNECTED = 0x1001
    EVT_PCM_PERIOD_ELAPSED = 0x1100
    EVT_PCM_XRUN = 0x1101
    S_OK = 0x8000
    S_BAD_MSG = 0x8001
    S_NOT_SUPP = 0x8002
    S_IO_ERR = 0x8003


class Direction(enum.IntEnum):
    """A PCM stream's direction (``VIRTIO_SND_D_OUTPUT`` / ``VIRTIO_SND_D_INPUT``)."""
    OUTPUT = 0
    INPUT = 1


class Format(enum.IntEnum):
    """``VIRTIO_SND_PCM_FMT_*`` the device supports (the spec has more)."""

    U8 = 4
    S16 = 5
    S32 = 17
    FLOAT = 19


#: bytes per sample
SAMPLE_BYTES = {Format.U8: 1, Format.S16: 2, Format.S32: 4, Format.FLOAT: 4}

#: ``VIRTIO_SND_PCM_RATE_*`` index -> frames per second
RATES = {0: 5512, 1: 8000, 2: 11025, 3: 16000, 4: 22050, 5: 32000, 6: 44100, 7: 48000, 8: 64000,
         9: 88200, 10: 96000, 11: 176400, 12: 192000, 13: 384000}
RATE_INDEX = {hz: i for i, hz in RATES.items()}

# PCM features
PCM_F_SHMEM_HOST, PCM_F_SHMEM_GUEST, PCM_F_MSG_POLLING, PCM_F_EVT_SHMEM_PERIODS, PCM_F_EVT_XRUNS = range(5)
JACK_F_REMAP = 0
# channel positions
CHMAP_NONE, CHMAP_NA, CHMAP_MONO, CHMAP_FL, CHMAP_FR = 0, 1, 2, 3, 4
CHMAP_MAX_SIZE = 18

HDR = struct.Struct("<I")
QUERY_INFO = struct.Struct("<IIII")          # hdr, start_id, count, size
JACK_HDR = struct.Struct("<II")              # hdr, jack_id
JACK_REMAP = struct.Struct("<IIII")          # jack_hdr, association, sequence
PCM_HDR = struct.Struct("<II")               # hdr, stream_id
PCM_SET_PARAMS = struct.Struct("<IIIIIBBBx")  # pcm_hdr, buffer_bytes, period_bytes, features, channels, format, rate
JACK_INFO = struct.Struct("<IIIIB7x")        # hda_fn_nid, features, hda_reg_defconf, hda_reg_caps, connected
PCM_INFO = struct.Struct("<IIQQBBB5x")       # hda_fn_nid, features, formats, rates, direction, ch min, ch max
CHMAP_INFO = struct.Struct("<IBB18s")        # hda_fn_nid, direction, channels, positions
XFER = struct.Struct("<I")                   # stream_id
PCM_STATUS = struct.Struct("<II")            # status, latency_bytes
EVENT = struct.Struct("<II")                 # hdr, data


def status(code: int) -> bytes:
    """A ``struct virtio_snd_hdr`` carrying status ``code``."""
    return HDR.pack(code)


def pcm_status(code: int, latency_bytes: int = 0) -> bytes:
    """A ``struct virtio_snd_pcm_status``."""
    return PCM_STATUS.pack(code, latency_bytes)


def event(code: int, data: int) -> bytes:
    """A ``struct virtio_snd_event``."""
    return EVENT.pack(code, data)


@dataclass(frozen=True)
class PcmParams:
    """What PCM_SET_PARAMS set."""

    buffer_bytes: int
    period_bytes: int
    features: int
    channels: int
    format: Format
    rate: int  # frames per second

    @property
    def frame_bytes(self) -> int:
        """Bytes per frame (all channels)."""
        return self.channels * SAMPLE_BYTES[self.format]

    def seconds(self, nbytes: int) -> float:
        """How long ``nbytes`` of this stream play."""
        return nbytes / self.frame_bytes / self.rate


class PcmState(enum.Enum):
    """The spec's stream states (§5.14.6.6.1); INITIAL: no parameters yet."""

    INITIAL = "initial"
    SET_PARAMETERS = "set-parameters"
    PREPARE = "prepare"
    START = "start"
    STOP = "stop"
    RELEASE = "release"


#: request -> the states it is allowed in, and the state it leads to
TRANSITIONS: dict[Code, tuple[frozenset[PcmState], PcmState]] = {
    Code.R_PCM_SET_PARAMS: (frozenset({PcmState.INITIAL, PcmState.SET_PARAMETERS, PcmState.PREPARE,
                                       PcmState.RELEASE}), PcmState.SET_PARAMETERS),
    Code.R_PCM_PREPARE: (frozenset({PcmState.SET_PARAMETERS, PcmState.PREPARE, PcmState.RELEASE}),
                         PcmState.PREPARE),
    Code.R_PCM_START: (frozenset({PcmState.PREPARE, PcmState.STOP}), PcmState.START),
    Code.R_PCM_STOP: (frozenset({PcmState.START}), PcmState.STOP),
    Code.R_PCM_RELEASE: (frozenset({PcmState.PREPARE, PcmState.STOP}), PcmState.RELEASE),
}


def next_state(state: PcmState, request: Code) -> PcmState | None:
    """The state after ``request`` in ``state``, or None if the spec forbids it."""
    allowed, to = TRANSITIONS[request]
    return to if state in allowed else None


def silence(fmt: Format, nbytes: int) -> bytes:
    """``nbytes`` of silence in ``fmt`` (unsigned 8-bit silence is 0x80)."""
    return (b"\x80" if fmt == Format.U8 else b"\0") * nbytes


@dataclass(frozen=True)
class StreamInfo:
    """What PCM_INFO tells the driver about one stream."""

    direction: Direction
    formats: frozenset[Format] = frozenset({Format.U8, Format.S16, Format.S32, Format.FLOAT})
    rates: frozenset[int] = frozenset({8000, 11025, 16000, 22050, 32000, 44100, 48000})
    channels_min: int = 1
    channels_max: int = 2
    features: int = 1 << PCM_F_EVT_XRUNS

    def pack(self) -> bytes:
        """``struct virtio_snd_pcm_info`` bytes."""
        fmts = sum(1 << f for f in self.formats)
        rates = sum(1 << RATE_INDEX[r] for r in self.rates)
        return PCM_INFO.pack(0, self.features, fmts, rates, self.direction, self.channels_min, self.channels_max)


@dataclass
class JackInfo:
    """One jack (HDA pin default-configuration style)."""

    direction: Direction
    connected: bool = True
    hda_reg_defconf: int = 0
    hda_reg_caps: int = 0
    features: int = 1 << JACK_F_REMAP
    association: int = 0
    sequence: int = 0

    def pack(self) -> bytes:
        """``struct virtio_snd_jack_info`` bytes."""
        return JACK_INFO.pack(0, self.features, self.hda_reg_defconf, self.hda_reg_caps, int(self.connected))


@dataclass(frozen=True)
class ChmapInfo:
    direction: Direction
    positions: tuple[int, ...] = (CHMAP_FL, CHMAP_FR)

    def pack(self) -> bytes:
        """``struct virtio_snd_chmap_info`` bytes."""
        return CHMAP_INFO.pack(0, self.direction, len(self.positions), bytes(self.positions))
