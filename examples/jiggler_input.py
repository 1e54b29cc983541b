#!/usr/bin/env python3
"""A device that produces events on its own: a virtio-input mouse jiggler.

Every ``interval`` seconds the mouse moves a little (right, then back left),
with no guest request behind it.  The tutorial's points (docs/device-guide.md,
"A device that produces events"):

* **pending events**: the device makes events whenever it likes; the guest
  gives it buffers (8 bytes, one event each) whenever *it* likes.  Events wait
  in ``self.pending`` until there is a buffer.
* **flush on kick and on host input**: ``handle_event`` runs for the queue's kick
  (new buffers: flush what waits) and for the device's own fd (new events:
  flush them if buffers wait).
* **register_fd in vring_started**: the timer's fd is watched by the worker
  once the event queue runs.  ``vring_started`` runs again after every
  reconnect; registering the same fd again just updates it.

Run it:   python examples/jiggler_input.py --socket-path /tmp/jiggle.sock
Test it:  python -m pytest examples/test_jiggler_input.py
(QEMU: -device vhost-user-input-pci,chardev=... ; QEMU 7.2 wants KVM for it.)
"""
from __future__ import annotations

import argparse
import logging
import os
import struct
import sys
import threading
from collections import deque

from vhostuser import FIRST_DEVICE_TOKEN, VhostUserBackend, VhostUserDaemon

EV_SYN, EV_REL, REL_X, REL_Y = 0x00, 0x02, 0x00, 0x01
TICK = FIRST_DEVICE_TOKEN          # our own fd's token
EVENTQ, STATUSQ = 0, 1


def event(ev_type: int, code: int, value: int) -> bytes:
    """``struct virtio_input_event``: le16 type, le16 code, le32 value."""
    return struct.pack("<HHi", ev_type, code, value)


def config_for(select: int, subsel: int) -> bytes:
    """The 136-byte config space after the driver wrote select/subsel (VIRTIO §5.8.4)."""
    payload = b""
    if select == 0x01:                              # ID_NAME
        payload = b"jiggler"
    elif select == 0x11 and subsel == EV_REL:       # EV_BITS for EV_REL: REL_X, REL_Y
        payload = bytes([1 << REL_X | 1 << REL_Y])
    return bytes([select, subsel, len(payload)]) + bytes(5) + payload.ljust(128, b"\0")


class JigglerBackend(VhostUserBackend):
    num_queues = 2                  # eventq, statusq
    max_queue_size = 256
    config_space = bytes(136)       # offered; get_config computes the content

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__()
        self.select = self.subsel = 0
        self.pending: deque[bytes] = deque(maxlen=1024)    # events waiting for a buffer
        self.tick_r, self.tick_w = os.pipe()               # the timer thread writes a byte per tick
        os.set_blocking(self.tick_r, False)
        self.stopping = threading.Event()
        self.step = 0
        self.timer = threading.Thread(target=self._tick, args=(interval,), daemon=True)
        self.timer.start()

    def _tick(self, interval: float) -> None:
        while not self.stopping.wait(interval):
            os.write(self.tick_w, b"t")

    def close(self) -> None:
        self.stopping.set()
        self.timer.join()
        self.unregister_fd(self.tick_r)
        os.close(self.tick_r)
        os.close(self.tick_w)

    # config: the driver writes select (byte 0) and subsel (byte 1), then reads
    def get_config(self, offset, size):
        return config_for(self.select, self.subsel)[offset:offset + size]

    def set_config(self, offset, data):
        for i, byte in enumerate(data, start=offset):
            if i == 0:
                self.select = byte
            elif i == 1:
                self.subsel = byte

    def vring_started(self, index, vring):
        if index == EVENTQ:
            self.register_fd(self.tick_r, TICK)     # again after a reconnect: fine
            self.flush(vring)                       # events made while nobody listened

    def handle_event(self, device_event, evset, vrings, thread_id):
        if device_event == TICK:                    # host input: make events
            while True:
                try:
                    ticks = os.read(self.tick_r, 64)
                except BlockingIOError:
                    break
                for _ in ticks:
                    dx = 10 if self.step % 2 == 0 else -10
                    self.step += 1
                    self.pending.extend([event(EV_REL, REL_X, dx), event(EV_SYN, 0, 0)])
        elif device_event == STATUSQ:               # the guest's LED etc.: nothing to do but return them
            vring = vrings[STATUSQ]
            while chain := vring.pop_descriptor_chain():
                vring.add_used(chain, 0)
            vring.signal_used_queue()
            return
        self.flush(vrings[EVENTQ])                  # on a kick (new buffers) and on new events

    def flush(self, vring):
        if not vring.is_running:
            return
        used = []
        while self.pending and (chain := vring.pop_descriptor_chain()) is not None:
            written = chain.writer().write(self.pending.popleft())
            used.append((chain, written))
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket-path", required=True, help="UNIX socket the front-end connects to")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between moves")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    backend = JigglerBackend(args.interval)
    with VhostUserDaemon("jiggler", backend) as daemon:
        daemon.start_server(args.socket_path)
        try:
            daemon.wait()
        except KeyboardInterrupt:
            pass
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
