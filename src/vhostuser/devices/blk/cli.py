"""``vhostuser blk``: the vhost-user-blk command.

Flags follow the vhost-user spec's back-end conventions for block devices
(``--blk-file``, ``--read-only``, ``--print-capabilities``) and QEMU's
contrib/vhost-user-blk; ``--image`` is an alias of ``--blk-file``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ...errors import BlkImageError
from .image import BlockImage

log = logging.getLogger(__name__)

DESCRIPTION = """virtio-blk vhost-user back-end (device id 2), serving a raw image file or a block device.

QEMU side:
  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
  -chardev socket,id=blk0,path=PATH -device vhost-user-blk-pci,chardev=blk0[,num-queues=N][,packed=on]

Requests: read, write, flush, get-id, discard (punches holes), write-zeroes.
See docs/devices/blk.md."""

#: ``--print-capabilities`` (docs/interop/vhost-user.json: VHostUserBackendCapabilitiesBlock)
CAPABILITIES: dict[str, Any] = {"type": "block", "features": ["read-only", "blk-file"]}


def _positive(text: str) -> int:
    value = int(text, 0)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    from ..common import add_backend_arguments

    add_backend_arguments(parser)
    disk = parser.add_argument_group("disk")
    disk.add_argument("-b", "--blk-file", "--image", dest="blk_file", metavar="PATH",
                      help="the raw image file or block device to serve")
    disk.add_argument("-r", "--read-only", action="store_true",
                      help="open the image read-only; the guest sees a read-only disk (VIRTIO_BLK_F_RO)")
    disk.add_argument("--direct", action="store_true",
                      help="O_DIRECT: bypass the host page cache (unaligned guest buffers use a bounce buffer)")
    disk.add_argument("--serial", default="", metavar="ID",
                      help="the disk's serial number (GET_ID, at most 20 bytes; default: empty)")
    disk.add_argument("--no-discard", dest="discard", action="store_false",
                      help="do not offer VIRTIO_BLK_F_DISCARD")
    disk.add_argument("--no-write-zeroes", dest="write_zeroes", action="store_false",
                      help="do not offer VIRTIO_BLK_F_WRITE_ZEROES")
    disk.add_argument("--no-lock", dest="lock", action="store_false",
                      help="do not flock() the image (shared when read-only, exclusive otherwise)")
    queues = parser.add_argument_group("queues")
    queues.add_argument("-n", "--num-queues", type=_positive, default=1, metavar="N",
                        help="number of virtqueues offered (VIRTIO_BLK_F_MQ; default: 1)")
    queues.add_argument("-q", "--queue-size", type=_positive, default=1024, metavar="N",
                        help="largest queue size the front-end may use (default: 1024)")
    queues.add_argument("--seg-max", type=_positive, default=None, metavar="N",
                        help="data segments per request offered in the config (default: 126, for QEMU's "
                             "queue-size 128; at most the front-end's queue-size - 2)")
    queues.add_argument("--poll-ns", type=int, default=0, metavar="NS",
                        help="adaptive polling: busy-poll a queue NS nanoseconds after it ran dry before "
                             "sleeping (lower latency, more CPU; default: 0, off)")
    queues.add_argument("--queues-per-thread", type=_positive, default=1, metavar="N",
                        help="queues served by one worker thread (default: 1, a thread per queue)")


def run(args: argparse.Namespace) -> int:
    """Serve the image until SIGTERM/SIGINT."""
    from ..common import serve_backends
    from .device import BlkBackend

    if args.print_capabilities:
        json.dump(CAPABILITIES, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not args.blk_file:
        print("vhostuser blk: --blk-file (or --image) is required", file=sys.stderr)
        return 2
    count = getattr(args, "socket_count", 1)
    if count > 1 and not args.read_only:
        print("vhostuser blk: a writable image can be served to one front-end only "
              "(use --read-only with --socket-count)", file=sys.stderr)
        return 2
    try:
        image = BlockImage(args.blk_file, read_only=args.read_only, direct=args.direct, lock=args.lock)
    except BlkImageError as exc:
        print(f"vhostuser blk: {exc}", file=sys.stderr)
        return 1
    try:
        def make_backend(i: int) -> BlkBackend:
            del i
            return BlkBackend(image, num_queues=args.num_queues, queue_size=args.queue_size,
                              serial=args.serial, queues_per_thread=args.queues_per_thread, seg_max=args.seg_max,
                              discard=args.discard, write_zeroes=args.write_zeroes,
                              poll_ns=max(args.poll_ns, 0))

        return serve_backends("blk", args, make_backend, CAPABILITIES)
    finally:
        image.close()
