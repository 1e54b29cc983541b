"""virtio-i2c wire structures (VIRTIO 1.3 §5.19, device id 34).

One queue (requestq); a request is one chain::

    device-readable:  struct virtio_i2c_out_hdr { le16 addr; le16 padding; le32 flags; }
                      [write buffer]
    device-writable:  [read buffer]  struct virtio_i2c_in_hdr { u8 status; }

``addr`` is the 7-bit address shifted left by one.  A zero-length request
(VIRTIO_I2C_F_ZERO_LENGTH_REQUEST, which Linux requires) has no buffer; M_RD
then says which direction it is.  A request with FAIL_NEXT belongs to one
transfer with the next one: if it fails, the rest of the transfer fails too.
"""
from __future__ import annotations

import enum
import struct

VIRTIO_ID_I2C = 34
REQUEST_QUEUE = 0

#: VIRTIO_I2C_F_ZERO_LENGTH_REQUEST
F_ZERO_LENGTH_REQUEST = 1 << 0

OUT_HDR = struct.Struct("<HHI")
#: VIRTIO_I2C_FLAGS_*
FLAGS_FAIL_NEXT = 1 << 0
FLAGS_M_RD = 1 << 1
FLAGS_KNOWN = FLAGS_FAIL_NEXT | FLAGS_M_RD
#: the largest buffer one request may carry (a Linux i2c_msg length is 16 bits)
MAX_LENGTH = 0xFFFF


class Status(enum.IntEnum):
    """``VIRTIO_I2C_MSG_*``."""

    OK = 0
    ERR = 1
