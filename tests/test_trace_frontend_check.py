"""``vhostuser check --frontend``: a front-end judged while it drives one of our
back-ends behind a checking tracer.  The mock front-end (valid, then broken) runs
in every CI pass; QEMU 7.2 guests (rng, blk, vsock, net) prove it on a real front-end."""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from vhostuser.errors import RequestFailed
from vhostuser.frontend import Frontend
from vhostuser.protocol.message import VirtioFeatures as VF
from vhostuser.testing import FrontendOptions, MockFrontend
from vhostuser.testing.guest import VhostUserDevice, start_guest
from vhostuser.trace.frontend_check import check_frontend

QEMU_RNG = FrontendOptions(queue_size=4, memory=((0, 1 << 20), (2 << 20, 1 << 20)), data_size=64 << 10,
                           reply_timeout=5, timeout=5)


class ThreadFrontend:
    """A mock front-end on a thread, shaped like a process (poll / kill / wait)."""

    def __init__(self, body: Callable[[], None]) -> None:
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, args=(body,), daemon=True)
        self.thread.start()

    def _run(self, body: Callable[[], None]) -> None:
        try:
            body()
            self.status = 0
        except Exception:  # noqa: BLE001 - a front-end that fails exits non-zero
            self.status = 1

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else self.status

    def kill(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        self.thread.join(timeout)
        return self.status or 0


def _reconnecting_mock(path: str, options: FrontendOptions) -> ThreadFrontend:
    def body() -> None:
        with MockFrontend.connect(path, options) as fe:
            fe.request(0, [], [16])
            try:  # the back-end goes away mid-session: reconnect, as QEMU blk with reconnect=1 does
                fe.wait_err(0, timeout=5)
                fe.request(0, [], [16], timeout=2)
            except Exception:  # noqa: BLE001
                fe.reconnect(timeout=5)
                fe.request(0, [], [16])
            fe.stop()
    return ThreadFrontend(body)


def test_a_valid_front_end_passes() -> None:
    results = check_frontend("rng", lambda path: _reconnecting_mock(path, QEMU_RNG), timeout=20)
    by_name = {r.name: r for r in results}
    assert all(r.ok for r in results), [(r.name, r.detail) for r in results if not r.ok]
    for name in ("connects", "starts-a-ring", "order", "negotiation", "memory-table", "rings",
                 "get-vring-base-before-reuse", "backend-close"):
        assert by_name[name].status == "pass", (name, by_name[name].detail)
    assert by_name["reconnect"].status == "pass", by_name["reconnect"].detail
    # the second run: the tracer refused the memory table; the mock gives up (RequestFailed) cleanly
    nack = by_name["handles-nack"]
    assert nack.status == "pass" and "ADD_MEM_REG" in nack.detail and "rings started" not in nack.detail, nack


def test_a_front_end_that_ignores_a_nack_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A front-end that swallows the NACK of its memory table and starts its rings anyway."""
    real = Frontend.request

    def deaf(self: Frontend, *args: object, **kw: object) -> object:
        try:
            return real(self, *args, **kw)  # type: ignore[arg-type]
        except RequestFailed:
            return None

    monkeypatch.setattr(Frontend, "request", deaf)
    results = check_frontend("rng", lambda path: _reconnecting_mock(path, QEMU_RNG), timeout=20,
                             backend_close=False)
    nack = {r.name: r for r in results}["handles-nack"]
    assert nack.status == "fail" and not nack.required and "rings started" in nack.detail, nack


@pytest.mark.parametrize(("changes", "group", "rule"), [
    ({"queue_size": 6}, "rings", "ring-size"),  # not a power of 2 on a split ring
    ({"force_features": int(VF.IN_ORDER)}, "negotiation", "features-offered"),  # never offered
], ids=["ring-size", "features-offered"])
def test_a_broken_front_end_fails(changes: dict, group: str, rule: str) -> None:
    bad = QEMU_RNG.replace(**changes)
    results = check_frontend("rng", lambda path: _reconnecting_mock(path, bad), timeout=10, backend_close=False,
                             nack=())
    by_name = {r.name: r for r in results}
    assert by_name[group].status == "fail" and rule in by_name[group].detail, by_name[group]
    assert not all(r.ok for r in results)


#: what each guest does with the device while it is judged
_GUEST_USE = {
    "rng": "head -c 64 /dev/hwrng | wc -c\nsleep 4\nhead -c 64 /dev/hwrng | wc -c\n",
    "blk": "dd if=/dev/vda of=/dev/null bs=4096 count=16 iflag=direct\nsleep 4\n",
    "vsock": "sleep 5\n",  # the driver starts the rings at probe
}


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["rng", "blk", "vsock"])
def test_qemu_front_end_is_judged(kind: str) -> None:
    guests = []

    def launch(path: str) -> object:
        g = start_guest(_GUEST_USE[kind], devices=[VhostUserDevice(kind, path)], timeout=180)
        guests.append(g)
        return g.proc

    try:
        results = check_frontend(kind, launch, timeout=150)
    finally:
        for g in guests:
            g.close()
    by_name = {r.name: r for r in results}
    # QEMU 7.2 drives rng, blk and vsock by the spec, survives the back-end going away
    # and a refused memory table, but does not reconnect (no reconnect=)
    for name in ("connects", "starts-a-ring", "order", "negotiation", "memory-table", "rings",
                 "get-vring-base-before-reuse", "messages", "backend-close", "handles-nack"):
        assert by_name[name].status == "pass", (name, by_name[name].detail)
    assert by_name["reconnect"].status == "fail" and not by_name["reconnect"].required


@pytest.mark.qemu
def test_qemu_net_front_end_is_judged() -> None:
    """QEMU 7.2's vhost-user net front-end (virtio-net-pci, vectors=0) against our
    net back-end: the guest's driver brings the link up and transmits."""
    guests = []

    def launch(path: str) -> object:
        g = start_guest("ip link set eth0 up\nsleep 5\n", devices=[VhostUserDevice("net", path)], modules=["virtio_net"],
                        timeout=180)
        guests.append(g)
        return g.proc

    try:
        results = check_frontend("net", launch, timeout=150)
    finally:
        for g in guests:
            g.close()
    by_name = {r.name: r for r in results}
    for name in ("connects", "starts-a-ring", "negotiation", "memory-table", "rings",
                 "get-vring-base-before-reuse", "messages", "backend-close", "handles-nack"):
        assert by_name[name].status == "pass", (name, by_name[name].detail)
    # QEMU 7.2's vhost-net enables the rings before SET_FEATURES acks PROTOCOL_FEATURES
    # (vhost-user.rst: SET_VRING_ENABLE only once it is negotiated) - a real finding,
    # and the only one
    order = by_name["order"]
    assert order.status == "fail", order.detail
    assert {part.split(":")[0] for part in order.detail.split("; ")} == {"vring-enable-without-protocol-features"}
