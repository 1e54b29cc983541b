#!/usr/bin/env python3
"""The smallest useful vhost-user device: echo.

Each request on queue 0 is a chain of device-readable buffers followed by
device-writable ones; the device copies what it reads into what it may write
and returns the chain.  It is the tutorial device of docs/device-guide.md.

Run it:   python examples/echo_device.py --socket-path /tmp/echo.sock
Test it:  python -m pytest examples/test_echo_device.py
"""
from __future__ import annotations

import argparse
import logging
import sys

from vhostuser import VhostUserBackend, VhostUserDaemon


class EchoBackend(VhostUserBackend):
    num_queues = 1
    max_queue_size = 256

    def handle_event(self, device_event, evset, vrings, thread_id):
        vring = vrings[device_event]
        while chains := vring.pop_batch():  # until the ring is empty: one kick may cover many batches
            used = []
            for chain in chains:
                data = chain.reader().read(chain.writable_len)  # at most what fits
                chain.writer().write(data)
                used.append((chain, len(data)))
            vring.add_used_batch(used)
        vring.signal_used_queue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket-path", required=True, help="UNIX socket the front-end connects to")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    with VhostUserDaemon("echo", EchoBackend()) as daemon:
        daemon.start_server(args.socket_path)
        try:
            daemon.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
