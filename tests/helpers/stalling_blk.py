"""A blk back-end process that serves ``N`` requests, then takes the next batch
from the ring and stalls (never completes it) - so that when the test kills it,
those requests are certainly in flight.

Usage: python -m tests.helpers.stalling_blk SOCKET IMAGE N
"""
from __future__ import annotations

import sys
import threading

from vhostuser.daemon import VhostUserDaemon
from vhostuser.devices.blk.device import BlkBackend
from vhostuser.vring import VringState


class StallingBlk(BlkBackend):
    def __init__(self, image: str, stall_after: int) -> None:
        super().__init__(image)
        self.stall_after = stall_after
        self.served = 0

    def process_queue(self, vring: VringState) -> int:
        while True:
            vring.disable_notification()
            while chains := vring.pop_batch(8):
                if self.served >= self.stall_after:
                    print(f"stalled with {len(chains)} requests in flight", flush=True)
                    threading.Event().wait()  # until SIGKILL
                vring.add_used_batch([(chain, self.engine.process(chain)) for chain in chains])
                vring.signal_used_queue()
                self.served += len(chains)
            if not vring.enable_notification():
                return self.served


def main() -> int:
    sock, image, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with VhostUserDaemon("stalling-blk", StallingBlk(image, n)) as daemon:
        daemon.start_server(sock)
        print("listening", flush=True)
        daemon.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
