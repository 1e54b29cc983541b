"""``vhostuser net``: virtio-net back-end; its VMs meet on a built-in L2 switch.

Two VMs on one switch::

    vhostuser net --socket-path /tmp/net.sock --socket-count 2
    # VM i: -chardev socket,id=c0,path=/tmp/net.sock<i> -netdev vhost-user,id=n0,chardev=c0
    #       -device virtio-net-pci,netdev=n0,vectors=0      (vectors=0: QEMU 7.2 under TCG)

One VM and the host (a TAP interface on the same switch)::

    vhostuser net --socket-path /tmp/net.sock --tap vhu0
    ip addr add 10.0.0.1/24 dev vhu0 && ip link set vhu0 up

A VM with a stock QEMU NIC (QEMU's -netdev stream framing)::

    vhostuser net -s /tmp/net.sock -c 2 --stream /tmp/net-stream.sock
    # -netdev stream,id=s0,server=off,addr.type=unix,addr.path=/tmp/net-stream.sock -device virtio-net-pci,netdev=s0

Capture and impair::

    vhostuser net -s /tmp/net.sock -c 2 --pcap /tmp/net.pcap \\
        --impair loss=5%,seed=1 --impair latency=20ms,jitter=5ms,port=1

--impair keys: loss, duplicate, corrupt, reorder (percent), reorder-gap, latency,
jitter (ms), rate (bit/s: 10M, 1G), seed, port (default: all), direction
(egress: towards the port's guest [default]; ingress: from it).
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..common import add_backend_arguments, capabilities, print_capabilities, serve_daemons, socket_paths
from .defs import parse_mac

log = logging.getLogger(__name__)

DESCRIPTION = __doc__
CAPABILITIES = capabilities("net")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vhostuser net`` options: the back-end conventions' flags plus the device's own."""
    add_backend_arguments(parser)
    dev = parser.add_argument_group("device")
    dev.add_argument("--mac", metavar="MAC",
                     help="MAC of the first port's config space (others count up; default: random, "
                          "locally administered). QEMU uses its own -device ...,mac=")
    dev.add_argument("--queue-pairs", type=int, default=1, metavar="N",
                     help="RX/TX queue pairs per port, one worker each (QEMU: -netdev ...,queues=N "
                          "-device virtio-net-pci,mq=on; default: 1)")
    dev.add_argument("--queue-size", type=int, default=1024, metavar="N", help="largest ring (default: 1024)")
    dev.add_argument("--rx-backlog", type=int, default=1024, metavar="N",
                     help="frames waiting per port when its guest has no RX buffers; more are dropped "
                          "(default: 1024)")
    sw = parser.add_argument_group("switch")
    sw.add_argument("--ageing-time", type=float, default=300.0, metavar="S",
                    help="forget a MAC not seen for S seconds (default: 300)")
    sw.add_argument("--mac-filter", action="store_true",
                    help="a port may not send with a source MAC learned on another port")
    sw.add_argument("--tap", metavar="NAME",
                    help="attach TAP interface NAME (created if missing) to the switch: the host's port")
    sw.add_argument("--stream", metavar="PATH",
                    help="listen on UNIX socket PATH for a QEMU -netdev stream peer (4-byte length framing): "
                         "a VM with a stock QEMU NIC joins the switch")
    sw.add_argument("--pcap", metavar="FILE", help="capture every frame entering the switch (pcap format)")
    sw.add_argument("--impair", action="append", default=[], metavar="SPEC",
                    help="impair frames (repeatable): e.g. loss=5%%,seed=1 or latency=20ms,jitter=5ms,port=1")


def _mac_plus(mac: bytes, i: int) -> bytes:
    return (int.from_bytes(mac, "big") + i & (1 << 48) - 1).to_bytes(6, "big")


def run(args: argparse.Namespace) -> int:
    """Serve ``vhostuser net`` as parsed into ``args`` until SIGTERM/SIGINT; the exit status."""
    if args.print_capabilities:
        print_capabilities(CAPABILITIES)
        return 0
    if (args.socket_path is None) == (args.fd is None):
        print("vhostuser net: give exactly one of --socket-path or --fd", file=sys.stderr)
        return 2
    if args.fd is not None and args.socket_count != 1:
        print("vhostuser net: --socket-count needs --socket-path", file=sys.stderr)
        return 2
    from .device import NetBackend
    from .hooks import parse_impairment
    from .pcap import PcapWriter
    from .switch import L2Switch

    try:
        where: list[str | int] = [args.fd] if args.fd is not None else list(
            socket_paths(args.socket_path, args.socket_count))
        base = parse_mac(args.mac) if args.mac else None
        impairments = [parse_impairment(spec) for spec in args.impair]
        nports = len(where) + (1 if args.tap else 0) + (1 if args.stream else 0)
        for spec in impairments:
            if spec.port is not None and not 0 <= spec.port < nports:
                raise ValueError(f"--impair port={spec.port}: there are {nports} ports")
        pcap = PcapWriter(args.pcap) if args.pcap else None
    except (OSError, ValueError) as exc:
        print(f"vhostuser net: {exc}", file=sys.stderr)
        return 2
    switch = L2Switch(ageing_time=args.ageing_time, mac_filter=args.mac_filter, pcap=pcap)
    served = []
    tap = None
    stream = None
    try:
        for i, target in enumerate(where):
            name = f"net{i}" if len(where) > 1 else "net"
            backend = NetBackend(mac=_mac_plus(base, i) if base else None, queue_size=args.queue_size,
                                 rx_backlog=args.rx_backlog, name=name, queue_pairs=args.queue_pairs)
            switch.attach(backend)
            served.append((name, backend, target))
        if args.tap:  # the last port: the VMs keep port numbers 0..N-1
            from .tap import TapPort

            tap = TapPort(args.tap, switch)
        if args.stream:  # after the TAP
            from .stream import StreamPort

            stream = StreamPort(args.stream, switch)
        for spec in impairments:
            for hook in spec.hooks:
                switch.add_hook(hook, direction=spec.direction, port=spec.port)
    except (OSError, ValueError) as exc:
        print(f"vhostuser net: {exc}", file=sys.stderr)
        for _, backend, _ in served:
            backend.close()
        for extra in (tap, stream):
            if extra is not None:
                extra.close()
        switch.close()
        return 2
    try:
        return serve_daemons("net", served)
    finally:
        for extra in (tap, stream):
            if extra is not None:
                extra.close()
                if extra.drops:
                    log.info("%s drops: %s", extra.port.name, dict(extra.drops))
        switch.close()
        for name, backend, _ in served:
            log.info("%s: %s", name, backend.stats)
        if switch.drops:
            log.info("switch drops: %s", dict(switch.drops))
