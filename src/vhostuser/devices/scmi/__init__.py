"""virtio-scmi (device id 32): an Arm SCMI platform for the guest.

The guest is an SCMI agent (Linux: ``drivers/firmware/arm_scmi/virtio.c``).  It
sends commands on ``cmdq`` (0): a readable request (header + parameters) and a
writable buffer for the response (header, status, return values).  With
``VIRTIO_SCMI_F_P2A_CHANNELS`` it keeps writable buffers on ``eventq`` (1),
where the platform posts notifications.  The platform here
(:class:`~.protocol.ScmiPlatform`) implements the base protocol and the
sensor management protocol over sensors with fake values or host hwmon / IIO
files (:mod:`.sensors`), like rust-vmm's vhost-device-scmi.

Enabled sensors with continuous updates on are sampled every ``update_interval``
seconds and a SENSOR_UPDATE notification goes to ``eventq``
(:meth:`ScmiBackend.notify_update` sends one at once).

Bad requests get an SCMI status and a log line: unknown protocols or messages
(NOT_SUPPORTED), short parameters (PROTOCOL_ERROR), an unknown sensor
(NOT_FOUND), invalid values (INVALID_PARAMETERS).  A request longer than
:data:`MAX_MSG_SIZE` gets PROTOCOL_ERROR; a chain without a writable part, or
a readable buffer on ``eventq``, is returned with length 0 (logged).
"""
from __future__ import annotations

import argparse
import collections
import logging
import threading
from collections.abc import Mapping, Sequence

from ...backend import FIRST_DEVICE_TOKEN, VhostUserBackend
from ...sys_util.event import new_event_consumer_and_notifier
from ...virtqueue.chain import DescriptorChain
from ...vring import VringState
from .protocol import ScmiPlatform, Status, u32s
from .sensors import Sensor, SensorError, parse_device

log = logging.getLogger(__name__)

VIRTIO_ID_SCMI = 32
CMDQ, EVENTQ = 0, 1
VIRTIO_SCMI_F_P2A_CHANNELS = 0
VIRTIO_SCMI_F_SHARED_MEMORY = 1
#: the largest request accepted: header + 128 bytes (Linux's VIRTIO_SCMI_MAX_MSG_SIZE)
MAX_MSG_SIZE = 4 + 128

_EVENT_TOKEN = FIRST_DEVICE_TOKEN

__all__ = ["ScmiBackend", "ScmiPlatform", "Sensor", "SensorError", "parse_device"]


class ScmiBackend(VhostUserBackend):
    """A virtio-scmi device exposing ``sensors``."""

    num_queues = 2
    max_queue_size = 1024
    device_features = 1 << VIRTIO_SCMI_F_P2A_CHANNELS

    def __init__(self, sensors: Sequence[Sensor], *, update_interval: float = 1.0, max_pending: int = 256) -> None:
        super().__init__()
        if update_interval <= 0:
            raise ValueError("update_interval must be positive")
        self.platform = ScmiPlatform(sensors, notifications=self._p2a)
        self.platform.update_interval_ms = max(1, round(update_interval * 1000))
        self.update_interval = update_interval
        self._pending: collections.deque[bytes] = collections.deque(maxlen=max_pending)
        self._lock = threading.Lock()
        self._consumer, self._notifier = new_event_consumer_and_notifier()
        self.register_fd(self._consumer.fileno(), _EVENT_TOKEN)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="scmi-updates", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        """Stop the sensor-update thread and unregister its event (the command and the fixtures call it at the end)."""
        self._stop.set()
        self._ticker.join()
        self.unregister_fd(self._consumer.fileno())
        self._consumer.close()
        self._notifier.close()

    def reset_device(self) -> None:
        """Front-end reset or gone: notifications off, sensors enabled, nothing pending."""
        super().reset_device()
        with self._lock:
            for sensor in self.platform.sensors:
                sensor.notify = False
                sensor.enabled = True
            self._pending.clear()

    def _p2a(self) -> bool:
        return bool(self.acked & (1 << VIRTIO_SCMI_F_P2A_CHANNELS))

    # ------------------------------------------------------------ notifications
    def _tick(self) -> None:
        while not self._stop.wait(self.update_interval):
            for i, sensor in enumerate(self.platform.sensors):
                if sensor.notify and sensor.enabled:
                    self.notify_update(i, subscribed_only=True)

    def notify_update(self, sensor_id: int, *, subscribed_only: bool = False) -> None:
        """Queue a SENSOR_UPDATE notification for ``sensor_id`` (any thread);
        with ``subscribed_only``, only if the agent still wants them."""
        message = self.platform.sensor_update(sensor_id)
        if message is None:
            return
        sensor = self.platform.sensors[sensor_id]
        with self._lock:  # checked under the lock reset_device takes: no stale update after a reset
            if subscribed_only and not (sensor.notify and sensor.enabled):
                return
            if len(self._pending) == self._pending.maxlen:
                log.warning("scmi: eventq has no buffers; dropping the oldest notification")
            self._pending.append(message)
        self._notifier.notify()

    # ------------------------------------------------------------ queues
    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        if device_event == CMDQ:
            self._serve_commands(vrings[CMDQ])
        elif device_event in (EVENTQ, _EVENT_TOKEN):
            if device_event == _EVENT_TOKEN:
                self._consumer.consume()
            if EVENTQ in vrings:
                self._post_events(vrings[EVENTQ])

    def _serve_commands(self, vring: VringState) -> None:
        if not vring.is_running:
            return
        used = []
        while (chain := vring.pop_descriptor_chain()) is not None:
            used.append((chain, self._command(chain)))
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()

    def _command(self, chain: DescriptorChain) -> int:
        room = chain.writable_length
        if room < 8:
            log.warning("scmi: command with a %d-byte response buffer (need at least 8) ignored", room)
            return 0
        if chain.readable_length > MAX_MSG_SIZE:
            request = chain.reader().read(4)
            log.warning("scmi: request of %d bytes, above the %d-byte maximum", chain.readable_length, MAX_MSG_SIZE)
            response = request.ljust(4, b"\0") + u32s(Status.PROTOCOL_ERROR)
        else:
            response = self.platform.handle(chain.reader().read(chain.readable_length), room)
        return chain.writer().write(response)

    def _post_events(self, vring: VringState) -> None:
        if not vring.is_running:
            return
        used = []
        with self._lock:
            while self._pending:
                chain = vring.pop_descriptor_chain()
                if chain is None:
                    break
                if chain.readable_length or chain.writable_length < len(self._pending[0]):
                    log.warning("scmi: eventq buffer unusable (%d readable, %d writable bytes): returned empty",
                                chain.readable_length, chain.writable_length)
                    used.append((chain, 0))
                    continue
                used.append((chain, chain.writer().write(self._pending.popleft())))
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()


# --------------------------------------------------------------------- command
DESCRIPTION = """virtio-scmi vhost-user back-end (device id 32).

An Arm SCMI platform for the guest's SCMI agent (drivers/firmware/arm_scmi/virtio.c):
the base protocol and the sensor management protocol.  Sensors, one per -d/--device
(vhost-device-scmi's syntax), get ids 0, 1, ... in order (--help-devices lists the kinds).
QEMU 7.2 has no vhost-user-scmi front-end (later QEMUs have vhost-user-scmi-pci)."""


DEVICES_HELP = """Sensor kinds for -d/--device KIND,PROPERTY=VALUE,...:
  fake[,name=NAME]                          a counter: 0, 1, 2, ... on every read
  hwmon,path=DIR,channel=temp1[,name=NAME]  DIR/temp1_input, in the hwmon sysfs units
  iio,path=DIR,channel=in_temp[,name=NAME]  (DIR/in_temp_raw + _offset) * _scale, in thousandths"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..common import add_backend_arguments

    add_backend_arguments(parser)
    parser.add_argument("-d", "--device", action="append", default=[], metavar="SPEC",
                        help="a sensor: fake[,name=N], hwmon,path=DIR,channel=C[,name=N], iio,path=DIR,channel=C[,...]")
    parser.add_argument("--help-devices", action="store_true",
                        help="describe the sensor kinds --device accepts and exit (as vhost-device-scmi)")
    parser.add_argument("--update-interval", type=float, default=1.0, metavar="SECONDS",
                        help="how often sensors with continuous updates on notify the guest (default: 1)")


def run(args: argparse.Namespace) -> int:
    from ..common import capabilities, serve_backends

    if args.help_devices:
        print(DEVICES_HELP)
        return 0

    def make(i: int) -> ScmiBackend:
        try:
            sensors = [parse_device(spec, n) for n, spec in enumerate(args.device)]
        except SensorError as exc:
            raise ValueError(str(exc)) from exc
        return ScmiBackend(sensors, update_interval=args.update_interval)

    return serve_backends("scmi", args, make, capabilities("scmi"))
