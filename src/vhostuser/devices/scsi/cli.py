"""``vhostuser scsi``: the vhost-user-scsi command.

``--lun FILE[,ro]`` (repeatable) attaches LUN 0, 1, ... of target 0; the
socket options are the common ones (``--socket-path``, ``--fd``,
``--print-capabilities``).  rust-vmm's vhost-device-scsi has ``--read-only``
(all LUNs) and ``--num-request-queues``; both exist here too, and its
positional image list is accepted as well.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ...errors import BlkImageError

DESCRIPTION = """virtio-scsi vhost-user back-end (device id 8): LUNs of one target backed by raw image files.

QEMU side:
  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
  -chardev socket,id=scsi0,path=PATH -device vhost-user-scsi-pci,chardev=scsi0[,num_queues=N]

Commands: INQUIRY (VPD 00/80/83/b0/b1/b2), READ CAPACITY, READ/WRITE 6-16, UNMAP,
WRITE SAME (fallocate), SYNCHRONIZE CACHE, MODE SENSE, REPORT LUNS, REQUEST SENSE.
See docs/devices/scsi.md."""

#: ``--print-capabilities`` (the vhost-user spec defines no scsi-specific feature names)
CAPABILITIES: dict[str, Any] = {"type": "scsi", "features": []}


def _positive(text: str) -> int:
    value = int(text, 0)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    from ..common import add_backend_arguments

    add_backend_arguments(parser, socket_count=False)
    luns = parser.add_argument_group("logical units")
    luns.add_argument("--lun", action="append", default=[], metavar="FILE[,ro]",
                      help="a raw image file or block device as the next LUN (repeatable); ',ro' makes it read-only")
    luns.add_argument("images", nargs="*", metavar="IMAGE",
                      help="more LUNs, as vhost-device-scsi takes them (after the --lun ones)")
    luns.add_argument("-r", "--read-only", action="store_true", help="every LUN read-only")
    queues = parser.add_argument_group("queues")
    queues.add_argument("--num-request-queues", type=_positive, default=1, metavar="N",
                        help="request queues offered (QEMU's num_queues; default: 1); the device has 2 more")
    queues.add_argument("-q", "--queue-size", type=_positive, default=1024, metavar="N",
                        help="largest queue size the front-end may use (default: 1024)")


def run(args: argparse.Namespace) -> int:
    """Serve the LUNs until SIGTERM/SIGINT."""
    from ..common import print_capabilities, serve_backends
    from .device import LunSpec, ScsiBackend

    if args.print_capabilities:
        print_capabilities(CAPABILITIES)
        return 0
    try:
        specs = [LunSpec.parse(t) for t in args.lun] + [LunSpec(path) for path in args.images]
    except ValueError as exc:
        print(f"vhostuser scsi: {exc}", file=sys.stderr)
        return 2
    if not specs:
        print("vhostuser scsi: give at least one --lun FILE", file=sys.stderr)
        return 2
    from ..blk.image import BlockImage

    images: list[BlockImage] = []
    try:
        for spec in specs:
            images.append(BlockImage(spec.path, read_only=spec.read_only or args.read_only))
    except BlkImageError as exc:
        print(f"vhostuser scsi: {exc}", file=sys.stderr)
        for image in images:
            image.close()
        return 1
    try:
        def make_backend(i: int) -> ScsiBackend:
            del i
            return ScsiBackend(images, num_request_queues=args.num_request_queues, queue_size=args.queue_size)

        return serve_backends("scsi", args, make_backend, CAPABILITIES)
    finally:
        for image in images:
            image.close()
