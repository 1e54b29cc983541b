"""The virtio-vsock packet header (VIRTIO 1.3 §5.10.6), sans-IO.

Every packet on the rx and tx queues starts with ``struct virtio_vsock_hdr``,
44 bytes little-endian::

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port;
    le32 len; le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;

followed by ``len`` payload bytes (only for ``VIRTIO_VSOCK_OP_RW``).
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace
from typing import Final

from ...errors import VsockPacketError

__all__ = [
    "HDR_SIZE",
    "HOST_CID",
    "VMADDR_CID_ANY",
    "VIRTIO_ID_VSOCK",
    "VIRTIO_VSOCK_F_STREAM",
    "VIRTIO_VSOCK_F_SEQPACKET",
    "VIRTIO_VSOCK_F_NO_IMPLIED_STREAM",
    "SHUTDOWN_RCV",
    "SHUTDOWN_SEND",
    "SHUTDOWN_BOTH",
    "SEQ_EOM",
    "SEQ_EOR",
    "MAX_PKT_PAYLOAD",
    "Op",
    "SockType",
    "VsockHeader",
    "parse_packet",
]

#: size of ``struct virtio_vsock_hdr``
HDR_SIZE: Final = 44
_HDR: Final = struct.Struct("<QQIIIHHIII")
assert _HDR.size == HDR_SIZE

#: the well-known CID of the host (VMADDR_CID_HOST)
HOST_CID: Final = 2
#: VMADDR_CID_ANY (-1U): never a valid guest CID
VMADDR_CID_ANY: Final = 0xFFFF_FFFF
#: virtio device id of the socket device
VIRTIO_ID_VSOCK: Final = 19

#: feature bit numbers (VIRTIO 1.3 §5.10.3)
VIRTIO_VSOCK_F_STREAM: Final = 0
VIRTIO_VSOCK_F_SEQPACKET: Final = 1
VIRTIO_VSOCK_F_NO_IMPLIED_STREAM: Final = 2

#: SHUTDOWN flags
SHUTDOWN_RCV: Final = 1
SHUTDOWN_SEND: Final = 2
SHUTDOWN_BOTH: Final = SHUTDOWN_RCV | SHUTDOWN_SEND
#: RW flags of SOCK_SEQPACKET connections: end of message / end of record
SEQ_EOM: Final = 1
SEQ_EOR: Final = 2

#: The largest RW payload we accept from the guest in one packet.  Linux sends
#: at most 64 KiB (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); we allow more headroom but
#: refuse absurd lengths before touching the payload.
MAX_PKT_PAYLOAD: Final = 1 << 20


class Op(enum.IntEnum):
    """``virtio_vsock_hdr.op``."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class SockType(enum.IntEnum):
    """``virtio_vsock_hdr.type``."""

    STREAM = 1
    SEQPACKET = 2


_OPS: Final = frozenset(int(o) for o in Op if o is not Op.INVALID)


@dataclass(frozen=True)
class VsockHeader:
    """One ``struct virtio_vsock_hdr``.  ``op`` and ``type`` are kept as plain
    ints so that a header with an unknown value can still be parsed, logged and
    answered (with RST); :meth:`validate` checks them."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        """The 44 wire bytes (raises :class:`VsockPacketError` on out-of-range fields)."""
        try:
            return _HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                             self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)
        except struct.error as exc:
            raise VsockPacketError(f"cannot encode vsock header {self}: {exc}") from None

    def pack_into(self, buffer: bytearray | memoryview, offset: int = 0) -> None:
        """Write the header into ``buffer`` at ``offset``."""
        try:
            _HDR.pack_into(buffer, offset, self.src_cid, self.dst_cid, self.src_port, self.dst_port,
                           self.len, self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)
        except struct.error as exc:
            raise VsockPacketError(f"cannot encode vsock header {self}: {exc}") from None

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VsockHeader:
        """Parse the first 44 bytes of ``data`` (:class:`VsockPacketError` if shorter)."""
        if len(data) < HDR_SIZE:
            raise VsockPacketError(f"vsock header needs {HDR_SIZE} bytes, got {len(data)}")
        return cls(*_HDR.unpack_from(data, 0))

    def validate(self, *, max_payload: int = MAX_PKT_PAYLOAD) -> None:
        """Check the fields a guest controls: a known op, a known type, a sane length."""
        if self.op not in _OPS:
            raise VsockPacketError(f"unknown vsock op {self.op}")
        if self.type not in (SockType.STREAM, SockType.SEQPACKET):
            raise VsockPacketError(f"unknown vsock socket type {self.type}")
        if self.len > max_payload:
            raise VsockPacketError(f"vsock payload length {self.len} exceeds {max_payload}")
        if self.op != Op.RW and self.len != 0:
            raise VsockPacketError(f"vsock {Op(self.op).name} packet with {self.len} payload bytes")

    def reply(self, op: int, **fields: int) -> VsockHeader:
        """A header going the other way (ports and CIDs swapped), ``len`` 0."""
        base = VsockHeader(src_cid=self.dst_cid, dst_cid=self.src_cid, src_port=self.dst_port,
                           dst_port=self.src_port, len=0, type=self.type, op=op)
        return replace(base, **fields) if fields else base

    def describe(self) -> str:
        """A short human-readable form for logs."""
        try:
            op = Op(self.op).name
        except ValueError:
            op = f"op{self.op}"
        return (f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} "
                f"type={self.type} len={self.len} flags={self.flags:#x} "
                f"buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt}")


def parse_packet(data: bytes | bytearray | memoryview, *, max_payload: int = MAX_PKT_PAYLOAD
                 ) -> tuple[VsockHeader, bytes]:
    """Split one contiguous packet into header and payload, checking that the
    header's ``len`` matches the bytes that follow."""
    hdr = VsockHeader.unpack(data)
    hdr.validate(max_payload=max_payload)
    payload = bytes(data[HDR_SIZE:])
    if len(payload) != hdr.len:
        raise VsockPacketError(f"vsock header says len={hdr.len} but {len(payload)} payload bytes follow")
    return hdr, payload
