"""The vsock command's configuration parsing (no daemon started)."""
from __future__ import annotations

import argparse
import json
import struct

import pytest

from vhostuser.devices.vsock import cli
from vhostuser.errors import VsockConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_single_vm_flags() -> None:
    vms = cli.configs_from_args(parse("--guest-cid", "4", "--socket", "/tmp/v.sock", "--uds-path", "/tmp/vm4.vsock",
                                      "--tx-buffer-size", "32768", "--queue-size", "256", "--groups", "a+b"))
    (vm,) = vms
    assert vm.socket == "/tmp/v.sock" and vm.queue_size == 256
    assert vm.engine.guest_cid == 4 and vm.engine.uds_path == "/tmp/vm4.vsock"
    assert vm.engine.tx_buffer_size == 32768 and vm.engine.groups == {"a", "b"}
    assert not vm.engine.seqpacket


def test_socket_path_alias_and_defaults() -> None:
    (vm,) = cli.configs_from_args(parse("--socket-path", "/tmp/s", "--uds-path", "/tmp/u"))
    assert vm.socket == "/tmp/s" and vm.engine.guest_cid == 3 and vm.engine.groups == {"default"}
    assert vm.engine.tx_buffer_size == 65536 and vm.queue_size == 1024


def test_repeated_vm() -> None:
    vms = cli.configs_from_args(parse(
        "--vm", "guest-cid=3,socket=/tmp/s3,uds-path=/tmp/u3,groups=g1+gA",
        "--vm", "guest_cid=4,socket=/tmp/s4,uds_path=/tmp/u4,tx-buffer-size=32768,queue-size=256,seqpacket=on"))
    assert [v.engine.guest_cid for v in vms] == [3, 4]
    assert vms[0].engine.groups == {"g1", "gA"} and vms[1].engine.seqpacket
    assert vms[1].queue_size == 256


def test_config_file_json(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "vsock.json"
    path.write_text(json.dumps({"vms": [
        {"guest_cid": 3, "socket": "/tmp/s3", "uds_path": "/tmp/u3", "groups": ["x", "y"]},
        {"guest_cid": 5, "socket": "/tmp/s5", "uds_path": "/tmp/u5", "tx_buffer_size": 4096},
    ]}))
    vms = cli.configs_from_args(parse("--config", str(path)))
    assert [v.engine.guest_cid for v in vms] == [3, 5]
    assert vms[0].engine.groups == {"x", "y"} and vms[1].engine.tx_buffer_size == 4096


@pytest.mark.parametrize("argv", [
    ("--vm", "guest-cid=3,socket=/s,uds-path=/u", "--guest-cid", "4"),
    ("--vm", "guest-cid=3,socket=/s", ),                         # no uds-path
    ("--vm", "guest-cid=3,uds-path=/u"),                          # no socket
    ("--vm", "guest-cid=3,socket=/s,uds-path=/u,bogus=1"),
    ("--vm", "guest-cid=2,socket=/s,uds-path=/u"),               # reserved CID
    ("--vm", "guest-cid=x,socket=/s,uds-path=/u"),
    ("--vm", "guest-cid=3,socket=/s,uds-path=/u,queue-size=100"),  # not a power of two
    ("--vm", "guest-cid=3,socket=/s,uds-path=/u", "--vm", "guest-cid=3,socket=/t,uds-path=/v"),
    ("--vm", "guest-cid=3,socket=/s,uds-path=/u", "--vm", "guest-cid=4,socket=/s,uds-path=/v"),
    ("--vm", "noequals"),
    ("--uds-path", "/u"),                                          # no socket and no --fd
])
def test_bad_configurations(argv: tuple[str, ...]) -> None:
    with pytest.raises(VsockConfigError):
        cli.configs_from_args(parse(*argv))


def test_bad_config_file(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(VsockConfigError):
        cli.configs_from_args(parse("--config", str(path)))
    path.write_text(json.dumps({"vms": []}))
    with pytest.raises(VsockConfigError):
        cli.configs_from_args(parse("--config", str(path)))


def test_print_capabilities(capsys) -> None:  # noqa: ANN001
    assert cli.run(parse("--print-capabilities")) == 0
    assert json.loads(capsys.readouterr().out) == {"type": "vsock", "features": []}


def test_bad_arguments_exit_2(capsys) -> None:  # noqa: ANN001
    assert cli.run(parse("--uds-path", "/u")) == 2
    assert "socket" in capsys.readouterr().err


def test_backend_config_space_and_features(tmp_path, no_fd_leak) -> None:  # noqa: ANN001
    from vhostuser.devices.vsock.device import VsockBackend
    from vhostuser.devices.vsock.engine import VsockEngineConfig
    from vhostuser.protocol.message import VhostUserProtocolFeatures as PF

    b = VsockBackend(VsockEngineConfig(guest_cid=0x1_0000_0005 & 0xFFFF_FFFF, uds_path=str(tmp_path / "u"),
                                       seqpacket=True), queue_size=256)
    try:
        assert b.get_config(0, 8) == struct.pack("<Q", 5)
        assert b.protocol_features() & PF.CONFIG
        assert b.features() & 0b11 == 0b11          # STREAM | SEQPACKET
        assert b.num_queues == 2 and b.max_queue_size == 256
        b.acked_features(1 << 32)                     # VERSION_1 only: no seqpacket
        assert not b.engine.seqpacket_negotiated
        b.acked_features(1 << 32 | 1 << 1)
        assert b.engine.seqpacket_negotiated
    finally:
        b.close()
