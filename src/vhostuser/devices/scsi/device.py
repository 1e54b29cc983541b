"""``ScsiBackend``: the virtio-scsi device (id 8) as a :class:`~vhostuser.backend.VhostUserBackend`.

One target (0) with one :class:`~.disk.ScsiDisk` per LUN.  Queue 0 is the
control queue (task management functions, asynchronous-notification
queries), queue 1 the event queue (its buffers stay in the ring until an event
is posted: :meth:`ScsiBackend.add_lun` / :meth:`remove_lun` post a
TRANSPORT_RESET event, which makes Linux rescan or remove the LUN), queues 2..
the request queues.  One worker thread serves all queues.

Requests execute synchronously, so when a TMF arrives no task is in flight:
ABORT TASK / ABORT TASK SET / CLEAR TASK SET / LOGICAL UNIT RESET / I_T NEXUS
RESET complete (FUNCTION COMPLETE), QUERY TASK (SET) reports no task.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ...backend import VhostUserBackend
from ...errors import QueueError
from ...vring import VringState
from ..blk.image import BlockImage
from . import protocol as p
from .disk import CheckCondition, CommandResult, Opcode, ScsiDisk, absent_lun_inquiry, report_luns
from .protocol import Response

log = logging.getLogger(__name__)

BATCH = 64


@dataclass
class LunSpec:
    """A ``--lun FILE[,ro]`` argument."""

    path: str
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> LunSpec:
        """Parse a ``--lun PATH[,OPTION...]`` argument."""
        path, _, opts = text.partition(",")
        if not path:
            raise ValueError(f"--lun {text!r}: no file")
        flags = [o for o in opts.split(",") if o]
        for o in flags:
            if o not in ("ro", "rw"):
                raise ValueError(f"--lun {text!r}: unknown option {o!r} (ro)")
        return cls(path, read_only="ro" in flags)


@dataclass
class ScsiStats:
    """Transport-level counters."""

    requests: int = 0
    bad_requests: int = 0
    bad_target: int = 0
    tmfs: int = 0
    events_posted: int = 0
    events_missed: int = 0


class ScsiBackend(VhostUserBackend):
    """A virtio-scsi device whose LUNs are :class:`BlockImage` files.

    ``luns``: images (or paths / :class:`LunSpec`, opened here) for LUN 0, 1, ...
    ``num_request_queues``: request queues offered (the front-end's
    ``num_queues``); the device has two more (control, event).
    """

    def __init__(self, luns: Sequence[BlockImage | LunSpec | str], *, num_request_queues: int = 1,
                 queue_size: int = 1024, serial_prefix: str = "vhostuser") -> None:
        super().__init__()
        if not 1 <= num_request_queues <= 0xFFFD:
            raise ValueError(f"num_request_queues must be in 1..65533, not {num_request_queues}")
        self.num_queues = p.FIRST_REQUEST_QUEUE + num_request_queues  # type: ignore[misc]
        self.max_queue_size = queue_size  # type: ignore[misc]
        self._owned: list[BlockImage] = []
        self.disks: dict[int, ScsiDisk] = {}
        self._serial_prefix = serial_prefix
        self._lock = threading.RLock()
        self._event_vring: VringState | None = None
        self._events_missed = False
        self.stats = ScsiStats()
        try:
            for i, lun in enumerate(luns):
                if isinstance(lun, LunSpec):
                    self.add_lun(i, lun.path, read_only=lun.read_only, notify=False)
                else:
                    self.add_lun(i, lun, notify=False)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ LUNs
    def add_lun(self, lun: int, image: BlockImage | str, *, read_only: bool = False, notify: bool = True) -> None:
        """Attach ``image`` as ``lun``; with ``notify``, tell the driver (event queue:
        TRANSPORT_RESET / RESCAN)."""
        if not 0 <= lun <= 16383:
            raise ValueError(f"LUN {lun} outside 0..16383")
        with self._lock:
            if lun in self.disks:
                raise ValueError(f"LUN {lun} exists")
            if not isinstance(image, BlockImage):
                image = BlockImage(image, read_only=read_only)
                self._owned.append(image)
            self.disks[lun] = ScsiDisk(image, serial=f"{self._serial_prefix}-lun{lun}", lun=lun)
        log.info("LUN %d: %r", lun, image)
        if notify:
            self.post_event(p.EventType.TRANSPORT_RESET, lun, p.ResetReason.RESCAN)

    def remove_lun(self, lun: int, *, notify: bool = True) -> None:
        """Detach ``lun`` (TRANSPORT_RESET / REMOVED on the event queue with ``notify``)."""
        with self._lock:
            disk = self.disks.pop(lun)
            if disk.image in self._owned:
                self._owned.remove(disk.image)
                disk.image.close()
        if notify:
            self.post_event(p.EventType.TRANSPORT_RESET, lun, p.ResetReason.REMOVED)

    # ---------------------------------------------------------------- events
    def post_event(self, event: int, lun: int, reason: int) -> bool:
        """Deliver one ``struct virtio_scsi_event`` in the next event-queue buffer.
        Without a buffer it is lost and the next event carries EVENTS_MISSED;
        returns whether it was delivered."""
        # lock order: the worker's lock (vring.lock), then self._lock
        vring = self._event_vring
        if vring is None:
            return self._missed(event, lun)
        with vring.lock, self._lock:
            if not vring.is_running:
                return self._missed(event, lun)
            chain = self._pop_event_buffer(vring)
            if chain is not None:
                code = int(event) | (p.EVENTS_MISSED if self._events_missed else 0)
                chain.writer().write_obj(p.EVENT, code, p.encode_lun(0, lun), int(reason))
                vring.add_used(chain, p.EVENT.size)
                vring.signal_used_queue()
                self._events_missed = False
                self.stats.events_posted += 1
                return True
            vring.signal_used_queue()
            return self._missed(event, lun)

    @staticmethod
    def _pop_event_buffer(vring: VringState):  # noqa: ANN205 - a DescriptorChain or None
        """The next usable event buffer; wrong-shaped ones are returned unused."""
        while (chain := vring.pop_descriptor_chain()) is not None:
            if not chain.readable_len and chain.writable_len >= p.EVENT.size:
                return chain
            log.warning("event-queue buffer with %d readable / %d writable bytes (needs %d writable): "
                        "returned unused", chain.readable_len, chain.writable_len, p.EVENT.size)
            vring.add_used(chain, 0)
        return None

    @property
    def event_queue_ready(self) -> bool:
        """The event queue is started: :meth:`post_event` can deliver (if the
        driver has given buffers)."""
        vring = self._event_vring
        return vring is not None and vring.is_running

    def _deliver_missed_notice(self) -> None:
        """NO_EVENT | EVENTS_MISSED in the next buffer, if there is one (Linux
        then rescans the bus); without a buffer the notice stays pending."""
        vring = self._event_vring
        if vring is None:
            return
        with vring.lock, self._lock:
            if not self._events_missed or not vring.is_running:
                return
            chain = self._pop_event_buffer(vring)
            if chain is not None:
                chain.writer().write_obj(p.EVENT, p.EventType.NO_EVENT | p.EVENTS_MISSED, bytes(8), 0)
                vring.add_used(chain, p.EVENT.size)
                self._events_missed = False
                self.stats.events_posted += 1
            vring.signal_used_queue()

    def _missed(self, event: int, lun: int) -> bool:
        with self._lock:
            self._events_missed = True
            self.stats.events_missed += 1
        log.info("event %d for LUN %d lost: no event-queue buffer (the next event reports EVENTS_MISSED)",
                 event, lun)
        return False

    # ----------------------------------------------------------- negotiation
    def features(self) -> int:
        # QEMU 7.2's vhost-user-scsi acks CHANGE (its param_change property)
        # whether offered or not: offer it (no PARAM_CHANGE events are sent)
        return super().features() | int(p.ScsiFeature.HOTPLUG | p.ScsiFeature.CHANGE)

    def queues_per_thread(self) -> Sequence[int]:
        return [(1 << self.num_queues) - 1]

    def config(self) -> p.VirtioScsiConfig:
        """The ``struct virtio_scsi_config`` this device would present (QEMU builds its own)."""
        return p.VirtioScsiConfig(num_queues=self.num_queues - p.FIRST_REQUEST_QUEUE)

    # ---------------------------------------------------------------- rings
    def vring_started(self, index: int, vring: VringState) -> None:
        if index == p.EVENT_QUEUE:
            with self._lock:
                self._event_vring = vring
                missed = self._events_missed
            if missed:  # events came before the queue started: tell the driver (it rescans)
                self._deliver_missed_notice()
            return
        try:
            self.process_queue(vring)
        except QueueError as exc:
            vring.fail(exc)

    def vring_stopped(self, index: int, vring: VringState) -> None:
        if index == p.EVENT_QUEUE:
            with self._lock:
                self._event_vring = None

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        if device_event not in vrings:
            log.warning("unexpected device event %d", device_event)
            return
        if device_event == p.EVENT_QUEUE:
            # new event buffers: deliver a pending "events missed" notice
            if self._events_missed:
                self._deliver_missed_notice()
            return
        self.process_queue(vrings[device_event])

    def process_queue(self, vring: VringState) -> int:
        """Serve every available request of a control or request queue."""
        if not vring.is_running:
            return 0
        handler = self.control_request if vring.index == p.CONTROL_QUEUE else self.command_request
        total = 0
        while True:
            vring.disable_notification()
            while chains := vring.pop_batch(BATCH):
                vring.add_used_batch([(chain, handler(chain)) for chain in chains])
                vring.signal_used_queue()
                total += len(chains)
            if not vring.enable_notification():
                return total

    # -------------------------------------------------------- request queue
    def command_request(self, chain) -> int:  # noqa: ANN001 - a DescriptorChain
        """Execute one ``virtio_scsi_req_cmd``; returns the used length."""
        self.stats.requests += 1
        if chain.writable_len < p.RESP_CMD.size:
            self.stats.bad_requests += 1
            log.warning("virtio-scsi request with %d writable bytes (the response needs %d): returned unprocessed",
                        chain.writable_len, p.RESP_CMD.size)
            return 0
        writer = chain.writer()
        data_in = writer.split_at(p.RESP_CMD.size)
        in_len = data_in.available_bytes
        if chain.readable_len < p.REQ_CMD.size:
            self.stats.bad_requests += 1
            log.warning("virtio-scsi request header is %d bytes, not %d: FAILURE", chain.readable_len, p.REQ_CMD.size)
            writer.write_obj(p.RESP_CMD, 0, in_len, 0, 0, Response.FAILURE, b"")
            return p.RESP_CMD.size
        reader = chain.reader()
        lun_field, _tag, _attr, _prio, _crn, cdb = reader.read_obj(p.REQ_CMD)
        out_len = reader.available_bytes
        result = self._execute(lun_field, cdb, reader, data_in)
        sense = result.sense.fixed() if result.sense else b""
        resid = (in_len - result.data_in) if in_len else (out_len - result.data_out)
        writer.write_obj(p.RESP_CMD, len(sense), resid, 0, int(result.status), int(result.response), sense)
        return p.RESP_CMD.size + result.data_in

    def _execute(self, lun_field: bytes, cdb: bytes, reader, data_in) -> CommandResult:  # noqa: ANN001
        addr = p.decode_lun(lun_field)
        if addr is None or addr[0] != 0:
            self.stats.bad_target += 1
            log.debug("request for LUN field %s: BAD_TARGET", lun_field.hex())
            return CommandResult(response=Response.BAD_TARGET)
        lun = addr[1]
        with self._lock:
            disk = self.disks.get(lun)
            luns = list(self.disks)
        if disk is not None and cdb[0] != Opcode.REPORT_LUNS:
            return disk.execute(cdb, reader, data_in)
        # REPORT LUNS (the target's list, whichever LUN it is sent to), and
        # a LUN that does not exist: what the target itself answers (SPC-4)
        result = CommandResult()
        try:
            if cdb[0] == Opcode.REPORT_LUNS:
                result.data_in = report_luns(luns, cdb, data_in)
            elif cdb[0] == Opcode.INQUIRY:
                result.data_in = absent_lun_inquiry(cdb, data_in)
            elif cdb[0] == Opcode.REQUEST_SENSE:
                result.data_in = min(18, cdb[4], data_in.available_bytes)
                data_in.write(p.LUN_NOT_SUPPORTED.fixed()[:result.data_in])
            else:
                raise CheckCondition(p.LUN_NOT_SUPPORTED, f"LUN {lun} does not exist")
        except CheckCondition as cc:
            log.info("LUN %d: CDB %s: CHECK CONDITION %s (%s)", lun, cdb[:16].hex(), cc.sense, cc)
            result.status, result.sense = p.Status.CHECK_CONDITION, cc.sense
        return result

    # -------------------------------------------------------- control queue
    def control_request(self, chain) -> int:  # noqa: ANN001 - a DescriptorChain
        """Handle one control-queue request (TMF or AN); returns the used length."""
        if chain.readable_len < 4 or chain.writable_len < 1:
            self.stats.bad_requests += 1
            log.warning("control request with %d readable / %d writable bytes: returned unprocessed",
                        chain.readable_len, chain.writable_len)
            return 0
        reader, writer = chain.reader(), chain.writer()
        ctype = reader.read_obj("<I")[0]
        reader = chain.reader()
        if ctype == p.ControlType.TMF:
            if chain.readable_len < p.CTRL_TMF.size:
                return self._control_fail(writer, f"TMF request of {chain.readable_len} bytes")
            _t, subtype, lun_field, tag = reader.read_obj(p.CTRL_TMF)
            writer.write_u8(self._tmf(subtype, lun_field, tag))
            return 1
        if ctype in (p.ControlType.AN_QUERY, p.ControlType.AN_SUBSCRIBE):
            if chain.readable_len < p.CTRL_AN.size or chain.writable_len < p.CTRL_AN_RESP.size:
                return self._control_fail(writer, f"AN request of {chain.readable_len}/{chain.writable_len} bytes")
            _t, lun_field, requested = reader.read_obj(p.CTRL_AN)
            addr = p.decode_lun(lun_field)
            response = Response.OK if addr is not None and addr[0] == 0 else Response.BAD_TARGET
            log.debug("AN %s for events %#x: none supported", p.ControlType(ctype).name, requested)
            writer.write_obj(p.CTRL_AN_RESP, 0, int(response))
            return p.CTRL_AN_RESP.size
        return self._control_fail(writer, f"unknown control request type {ctype}")

    def _control_fail(self, writer, reason: str) -> int:  # noqa: ANN001
        self.stats.bad_requests += 1
        log.warning("control queue: %s: FAILURE", reason)
        writer.write_u8(Response.FAILURE)
        return 1

    def _tmf(self, subtype: int, lun_field: bytes, tag: int) -> Response:
        self.stats.tmfs += 1
        addr = p.decode_lun(lun_field)
        if addr is None or addr[0] != 0:
            log.info("TMF %d for LUN field %s: BAD_TARGET", subtype, lun_field.hex())
            return Response.BAD_TARGET
        with self._lock:
            present = addr[1] in self.disks
        if not present and subtype != p.TmfSubtype.I_T_NEXUS_RESET:
            log.info("TMF %d for absent LUN %d: INCORRECT_LUN", subtype, addr[1])
            return Response.INCORRECT_LUN
        try:
            name = p.TmfSubtype(subtype).name
        except ValueError:
            log.warning("TMF subtype %d unknown: FUNCTION_REJECTED", subtype)
            return Response.FUNCTION_REJECTED
        if subtype == p.TmfSubtype.CLEAR_ACA:
            log.info("TMF CLEAR_ACA: ACA is not supported: FUNCTION_REJECTED")
            return Response.FUNCTION_REJECTED
        # commands complete synchronously: there is never a task to abort or report
        log.info("TMF %s LUN %d tag %#x: nothing in flight, function complete", name, addr[1], tag)
        return Response.OK

    # ------------------------------------------------------------- lifecycle
    def reset_device(self) -> None:
        super().reset_device()
        with self._lock:
            self._event_vring = None
            self._events_missed = False

    def close(self) -> None:
        """Close the images this backend opened."""
        for image in self._owned:
            image.close()
        self._owned.clear()
