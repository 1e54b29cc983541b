"""The back-end -> front-end channel driven by a device: it exports a shared
object (SHARED_OBJECT_ADD, then the front-end fetches it with GET_SHARED_OBJECT)
and announces a config change (CONFIG_CHANGE_MSG), through the daemon."""
from __future__ import annotations

import os
import uuid

from vhostuser.backend import VhostUserBackend
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.sys_util import create_shm_fd
from vhostuser.testing.frontend import DEFAULT_PROTOCOL_FEATURES, FrontendOptions, MockFrontend

OBJECT = uuid.UUID("12345678-1234-5678-1234-567812345678")
PAYLOAD = b"a shared object's bytes"


class Exporter(VhostUserBackend):
    """On each request: export a shared object and bump its config space."""

    num_queues = 1

    def __init__(self) -> None:
        super().__init__()
        self.config_space = b"\x00" * 8
        self.objects: dict[uuid.UUID, int] = {}

    def protocol_features(self) -> PF:
        return super().protocol_features() | PF.SHARED_OBJECT

    def handle_event(self, device_event, evset, vrings, thread_id):  # noqa: ANN001
        vring = vrings[device_event]
        while chains := vring.pop_batch():
            for chain in chains:
                if OBJECT not in self.objects:
                    fd = create_shm_fd(len(PAYLOAD))
                    os.pwrite(fd, PAYLOAD, 0)
                    self.objects[OBJECT] = fd
                    self.backend_channel.shared_object_add(OBJECT)
                self.config_space = (int.from_bytes(self.config_space, "little") + 1).to_bytes(8, "little")
                self.backend_channel.config_change()
                vring.add_used(chain, 0)
        vring.signal_used_queue()

    def get_shared_object(self, uuid_: uuid.UUID) -> int:
        return os.dup(self.objects[uuid_])  # the daemon sends it, then closes it

    def close(self) -> None:
        for fd in self.objects.values():
            os.close(fd)


def test_device_exports_objects_and_announces_config_changes(no_fd_leak, serve_backend) -> None:
    device = Exporter()
    path = serve_backend(device)
    opts = FrontendOptions(protocol_features=int(DEFAULT_PROTOCOL_FEATURES | PF.SHARED_OBJECT), config_size=8)
    with MockFrontend.connect(path, opts) as fe:
        assert fe.protocol_features & PF.SHARED_OBJECT
        fe.request(0, [b"go"], [])
        assert OBJECT in fe.handler.shared_objects
        fd = fe.frontend.get_shared_object(OBJECT)
        try:
            assert os.pread(fd, len(PAYLOAD), 0) == PAYLOAD
        finally:
            os.close(fd)
        assert fe.handler.config_changed.wait(5)
        assert fe.get_config(0, 8) == (1).to_bytes(8, "little")
        fe.request(0, [b"again"], [])
        assert fe.handler.config_changes == 2
        assert fe.get_config(0, 8) == (2).to_bytes(8, "little")
