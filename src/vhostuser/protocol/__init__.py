"""The vhost-user wire format, sans-IO: no sockets, threads or mmap here.

* :mod:`.message` - request codes, header flags, feature bits
* :mod:`.payloads` - typed payloads that pack/unpack themselves
* :mod:`.requests` - the table: per request payload, fds, reply, gating feature
* :mod:`.codec` - :class:`Decoder` (bytes + fds -> messages) and :func:`encode`
"""
from __future__ import annotations

from .codec import EOF, NEED_DATA, Decoder, Header, Message, close_fds, encode
from .message import (
    HEADER_SIZE,
    MAX_MEM_TABLE_REGIONS,
    MAX_MSG_SIZE,
    BackendReq,
    FrontendReq,
    VhostUserHeaderFlag,
    VhostUserProtocolFeatures,
    VirtioFeatures,
)
from .payloads import *  # noqa: F403
from .payloads import __all__ as _payloads_all
from .requests import BACKEND_REQUESTS, FRONTEND_REQUESTS, Reply, RequestSpec, spec_for

__all__ = [
    "EOF", "NEED_DATA", "Decoder", "Header", "Message", "close_fds", "encode",
    "HEADER_SIZE", "MAX_MEM_TABLE_REGIONS", "MAX_MSG_SIZE",
    "BackendReq", "FrontendReq", "VhostUserHeaderFlag", "VhostUserProtocolFeatures", "VirtioFeatures",
    "BACKEND_REQUESTS", "FRONTEND_REQUESTS", "Reply", "RequestSpec", "spec_for",
    *_payloads_all,
]
