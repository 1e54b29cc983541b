"""A device's config space: static (``config_space``) or dynamic (``get_config``
overridden, ``config_space`` left None) - either way PROTOCOL_F_CONFIG is
offered and GET_CONFIG / SET_CONFIG reach the device."""
from __future__ import annotations

import struct

from vhostuser import VhostUserBackend
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.testing import FrontendOptions, MockFrontend


class Counter(VhostUserBackend):
    """Config = a little-endian u32 that counts the reads; writable."""

    num_queues = 1

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.written: list[tuple[int, bytes]] = []

    def get_config(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return struct.pack("<I", self.reads)[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        self.written.append((offset, bytes(data)))

    def handle_event(self, *args: object) -> None:
        pass


class NoConfig(Counter):
    get_config = VhostUserBackend.get_config
    set_config = VhostUserBackend.set_config


def test_overriding_get_config_offers_config(no_fd_leak, serve_backend) -> None:
    dev = Counter()
    assert dev.config_space is None and dev.has_config()
    path = serve_backend(dev)
    with MockFrontend.connect(path, FrontendOptions(config_size=4)) as fe:
        assert fe.protocol_features & PF.CONFIG
        assert struct.unpack("<I", fe.config)[0] == 1
        assert struct.unpack("<I", fe.frontend.get_config(0, 4))[0] == 2  # dynamic: read again
        fe.frontend.set_config(0, b"\x07\x00")
        fe.sync()
    assert dev.written == [(0, b"\x07\x00")]


def test_no_config_space_no_config_feature(serve_backend) -> None:
    dev = NoConfig()
    assert not dev.has_config()
    path = serve_backend(dev)
    with MockFrontend.connect(path) as fe:
        assert not fe.protocol_features & PF.CONFIG
