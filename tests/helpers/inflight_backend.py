"""A back-end process for the inflight crash test: ``hold`` takes requests and
never completes them (then gets killed); ``echo`` completes them (upper-cased).

Usage: python -m tests.helpers.inflight_backend SOCKET hold|echo
Prints one line per event to stdout, for the test to follow.
"""
from __future__ import annotations

import sys

from vhostuser import VhostUserBackend, VhostUserDaemon


class InflightDevice(VhostUserBackend):
    num_queues = 1
    supports_inflight = True

    def __init__(self, hold: bool) -> None:
        super().__init__()
        self.hold = hold
        self.held: list = []

    def handle_event(self, device_event, evset, vrings, thread_id):  # noqa: ANN001
        vring = vrings[device_event]
        chains = vring.pop_batch()
        if self.hold:
            self.held += chains
            print(f"holding {len(self.held)}", flush=True)
            return
        used = []
        for chain in chains:
            data = chain.reader().read_all()
            chain.writer().write(data.upper())
            used.append((chain, len(data)))
        vring.add_used_batch(used)
        vring.signal_used_queue()
        print(f"completed {len(used)}", flush=True)


def main() -> int:
    path, mode = sys.argv[1], sys.argv[2]
    with VhostUserDaemon("inflight", InflightDevice(hold=mode == "hold")) as daemon:
        daemon.start_server(path)
        print("listening", flush=True)
        daemon.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
