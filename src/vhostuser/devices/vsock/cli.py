"""``vhostuser vsock``: the vhost-user-vsock command (flags as rust-vmm's vhost-device-vsock).

One VM::

    vhostuser vsock --guest-cid 4 --socket /tmp/vhost4.socket --uds-path /tmp/vm4.vsock

Several VMs in one process (siblings talk when their groups intersect)::

    vhostuser vsock --vm guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,groups=a+b \\
                    --vm guest-cid=4,socket=/tmp/vhost4.socket,uds-path=/tmp/vm4.vsock,groups=b

or ``--config FILE`` (JSON; TOML too where :mod:`tomllib` exists, Python >= 3.11)::

    {"vms": [{"guest_cid": 3, "socket": "/tmp/vhost3.socket", "uds_path": "/tmp/vm3.vsock",
              "groups": "a+b"}, ...]}
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import VsockConfigError
from ..common import add_backend_arguments, capabilities, print_capabilities, serve_daemons
from .engine import (
    DEFAULT_GROUP,
    DEFAULT_GUEST_CID,
    DEFAULT_RX_BUFFER_SIZE,
    DEFAULT_TX_BUFFER_SIZE,
    SiblingRegistry,
    VsockEngineConfig,
)

log = logging.getLogger(__name__)

DESCRIPTION = __doc__
DEFAULT_QUEUE_SIZE = 1024
#: ``--print-capabilities``: the vhost-user spec defines no vsock features
CAPABILITIES = capabilities("vsock")

_KEYS = ("guest-cid", "socket", "uds-path", "tx-buffer-size", "rx-buffer-size", "queue-size", "groups",
         "seqpacket")
_ALIASES = {"socket-path": "socket", "cid": "guest-cid"}


@dataclass
class VmConfig:
    """One device of the command: its engine settings, vhost-user socket and queue size."""

    engine: VsockEngineConfig
    socket: str | None
    queue_size: int = DEFAULT_QUEUE_SIZE


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise VsockConfigError(f"{key}: expected an integer, got {value!r}")
    try:
        return int(str(value), 0)
    except ValueError:
        raise VsockConfigError(f"{key}: expected an integer, got {value!r}") from None


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "on", "yes", "true"):
        return True
    if text in ("0", "off", "no", "false"):
        return False
    raise VsockConfigError(f"{key}: expected on/off, got {value!r}")


def _groups(value: Any) -> frozenset[str]:
    names = value if isinstance(value, (list, tuple)) else str(value).split("+")
    groups = frozenset(str(n).strip() for n in names if str(n).strip())
    if not groups:
        raise VsockConfigError("groups: at least one group name is needed")
    return groups


def vm_config_from_mapping(values: Mapping[str, Any], *, need_socket: bool = True) -> VmConfig:
    """Build a :class:`VmConfig` from ``--vm`` / config-file keys (``_`` and ``-``
    are interchangeable; unknown keys are errors)."""
    norm: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).strip().lower().replace("_", "-")
        key = _ALIASES.get(key, key)
        if key not in _KEYS:
            raise VsockConfigError(f"unknown vsock VM key {raw_key!r} (known: {', '.join(_KEYS)})")
        if key in norm:
            raise VsockConfigError(f"vsock VM key {key!r} given twice")
        norm[key] = value
    if need_socket and not norm.get("socket"):
        raise VsockConfigError("socket is required for each VM")
    if not norm.get("uds-path"):
        raise VsockConfigError("uds-path is required for each VM")
    engine = VsockEngineConfig(
        guest_cid=_int("guest-cid", norm.get("guest-cid", DEFAULT_GUEST_CID)),
        uds_path=str(norm["uds-path"]),
        tx_buffer_size=_int("tx-buffer-size", norm.get("tx-buffer-size", DEFAULT_TX_BUFFER_SIZE)),
        rx_buffer_size=_int("rx-buffer-size", norm.get("rx-buffer-size", DEFAULT_RX_BUFFER_SIZE)),
        groups=_groups(norm.get("groups", DEFAULT_GROUP)),
        seqpacket=_bool("seqpacket", norm.get("seqpacket", False)),
    )
    engine.validate()
    queue_size = _int("queue-size", norm.get("queue-size", DEFAULT_QUEUE_SIZE))
    if not 1 <= queue_size <= 32768 or queue_size & (queue_size - 1):
        raise VsockConfigError(f"queue-size {queue_size} must be a power of two up to 32768")
    socket_path = norm.get("socket")
    return VmConfig(engine=engine, socket=str(socket_path) if socket_path else None, queue_size=queue_size)


def parse_vm_string(text: str) -> VmConfig:
    """Parse one ``--vm key=value,key=value`` argument."""
    values: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise VsockConfigError(f"--vm: expected key=value, got {item!r}")
        if key.strip() in values:
            raise VsockConfigError(f"--vm: {key.strip()!r} given twice")
        values[key.strip()] = value.strip()
    return vm_config_from_mapping(values)


def load_config_file(path: str) -> list[VmConfig]:
    """Read a ``--config`` file: JSON, or TOML (``*.toml``, Python >= 3.11).

    The document is ``{"vms": [ {...}, ... ]}`` (a bare list of VMs is accepted too).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise VsockConfigError(f"cannot read {path}: {exc}") from exc
    if path.endswith(".toml"):
        try:
            import tomllib  # type: ignore[import-not-found]
        except ImportError:
            raise VsockConfigError("TOML config files need Python >= 3.11; use JSON") from None
        try:
            doc: Any = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise VsockConfigError(f"{path}: {exc}") from exc
    else:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise VsockConfigError(f"{path}: not valid JSON: {exc}") from exc
    vms = doc.get("vms") if isinstance(doc, dict) else doc
    if not isinstance(vms, list) or not vms or not all(isinstance(v, dict) for v in vms):
        raise VsockConfigError(f"{path}: expected {{\"vms\": [{{...}}, ...]}} with at least one VM")
    return [vm_config_from_mapping(v) for v in vms]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags (``-v`` is added by the ``vhostuser`` front command)."""
    add_backend_arguments(parser, socket_count=False)
    parser.add_argument("--socket", dest="socket_path", metavar="PATH", help="alias of --socket-path")
    dev = parser.add_argument_group("vsock device (one VM)")
    dev.add_argument("--guest-cid", type=int, default=None,
                     help=f"the guest's context ID (default: {DEFAULT_GUEST_CID})")
    dev.add_argument("--uds-path", metavar="PATH",
                     help="host AF_UNIX socket of the hybrid vsock: the host connects here and sends "
                          "'CONNECT <port>'; guest connections to port P go to PATH_P")
    dev.add_argument("--tx-buffer-size", type=int, default=None,
                     help=f"per-connection buffer for guest->host data, advertised as buf_alloc "
                          f"(default: {DEFAULT_TX_BUFFER_SIZE})")
    dev.add_argument("--rx-buffer-size", type=int, default=None,
                     help=f"per-connection read-ahead from the host socket (default: {DEFAULT_RX_BUFFER_SIZE})")
    dev.add_argument("--queue-size", type=int, default=None,
                     help=f"largest virtqueue size accepted (default: {DEFAULT_QUEUE_SIZE})")
    dev.add_argument("--groups", default=None,
                     help=f"'+'-separated group names; sibling VMs sharing a group can talk "
                          f"(default: {DEFAULT_GROUP})")
    dev.add_argument("--seqpacket", action="store_true", default=None,
                     help="offer VIRTIO_VSOCK_F_SEQPACKET (host side: AF_UNIX SOCK_SEQPACKET)")
    many = parser.add_argument_group("several VMs")
    many.add_argument("--vm", action="append", default=[], metavar="KEY=VALUE,...",
                      help="one device: guest-cid=,socket=,uds-path=[,tx-buffer-size=][,rx-buffer-size=]"
                           "[,queue-size=][,groups=a+b][,seqpacket=on]; repeat for more VMs")
    many.add_argument("--config", metavar="FILE",
                      help='JSON (or TOML) file: {"vms": [{"guest_cid": 3, "socket": ..., "uds_path": ...}, ...]}')


_SINGLE_FLAGS = ("guest_cid", "uds_path", "tx_buffer_size", "rx_buffer_size", "queue_size", "groups", "seqpacket")


def configs_from_args(args: argparse.Namespace) -> list[VmConfig]:
    """The devices the arguments describe (:class:`VsockConfigError` if inconsistent)."""
    single = {k: getattr(args, k) for k in _SINGLE_FLAGS if getattr(args, k, None) is not None}
    if args.config and args.vm:
        raise VsockConfigError("--config and --vm exclude each other")
    if args.config or args.vm:
        if single or args.socket_path or args.fd is not None:
            raise VsockConfigError("--vm/--config exclude the single-VM flags "
                                   f"({', '.join('--' + k.replace('_', '-') for k in single) or '--socket/--fd'})")
        vms = load_config_file(args.config) if args.config else [parse_vm_string(v) for v in args.vm]
    else:
        values: dict[str, Any] = {k.replace("_", "-"): v for k, v in single.items()}
        if args.socket_path:
            values["socket"] = args.socket_path
        vms = [vm_config_from_mapping(values, need_socket=args.fd is None)]
    seen_cids: set[int] = set()
    seen_paths: set[str] = set()
    for vm in vms:
        if vm.engine.guest_cid in seen_cids:
            raise VsockConfigError(f"guest CID {vm.engine.guest_cid} used twice")
        seen_cids.add(vm.engine.guest_cid)
        for path in (vm.socket, vm.engine.uds_path):
            if path and path in seen_paths:
                raise VsockConfigError(f"path {path} used twice")
            if path:
                seen_paths.add(path)
    return vms


def run(args: argparse.Namespace) -> int:
    """Serve the configured devices until SIGTERM / SIGINT."""
    from .device import VsockBackend  # the device pulls in the daemon and the protocol stack

    if args.print_capabilities:
        print_capabilities(CAPABILITIES)
        return 0
    try:
        vms = configs_from_args(args)
    except VsockConfigError as exc:
        print(f"vhostuser vsock: {exc}", file=sys.stderr)
        return 2
    registry = SiblingRegistry()
    served: list[tuple[str, VsockBackend, str | int]] = []
    try:
        for vm in vms:
            target: str | int | None = args.fd if args.fd is not None else vm.socket
            assert target is not None  # configs_from_args: a socket per VM unless --fd
            backend = VsockBackend(vm.engine, registry=registry, queue_size=vm.queue_size)
            served.append((f"vsock-{vm.engine.guest_cid}", backend, target))
            backend.start()  # bind the host listeners now: a bad uds-path fails before serving
            log.info("vsock: guest CID %d on %s, host side %s", vm.engine.guest_cid,
                     vm.socket or f"fd {args.fd}", vm.engine.uds_path)
    except (OSError, ValueError) as exc:  # VsockConfigError is a ValueError
        print(f"vhostuser vsock: {exc}", file=sys.stderr)
        for _, backend, _ in served:
            backend.close()
        return 1
    return serve_daemons("vsock", served)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``vhostuser vsock ARGS`` (the same parser and help)."""
    from ...cli import main as cli_main

    return cli_main(["vsock", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
