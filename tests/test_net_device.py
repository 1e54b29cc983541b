"""virtio-net at the ring level: two ``NetBackend`` ports on an ``L2Switch``,
served in this process; mock front-ends play QEMU and the guests' virtio-net
drivers (RX = queue 0, TX = queue 1, a 12-byte virtio_net_hdr on every buffer).

Split and packed rings, with and without EVENT_IDX and MRG_RXBUF; bad TX
chains are dropped and counted while the device keeps serving; a guest without
RX buffers only fills its own bounded backlog.
"""
from __future__ import annotations

import struct
import time

import pytest

from vhostuser.devices.net import L2Switch, NetFeature, VirtioNetHdr
from vhostuser.devices.net.defs import HDR_LEN, MAX_FRAME_LEN
from vhostuser.devices.net.device import NetBackend
from vhostuser.testing import FrontendOptions

RX, TX = 0, 1
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
BCAST = b"\xff" * 6
MRG = 1 << NetFeature.MRG_RXBUF
_MiB = 1 << 20


def options(*, packed: bool = False, event_idx: bool | None = None, mrg: bool = True, **kw: object) -> FrontendOptions:
    feats = 1 << NetFeature.MAC | 1 << NetFeature.STATUS | (MRG if mrg else 0)
    base: dict[str, object] = dict(num_queues=2, queue_size=256, packed=packed, event_idx=event_idx,
                                   device_features=feats, data_size=2 * _MiB, timeout=10.0)
    base.update(kw)
    return FrontendOptions(**base)  # type: ignore[arg-type]


def frame(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


def hdr() -> bytes:
    return VirtioNetHdr().pack()


def send(fe, data: bytes) -> None:  # noqa: ANN001 - MockFrontend
    fe.request(TX, [hdr() + data], [])


def post_rx(fe, count: int, size: int = 2048) -> None:  # noqa: ANN001
    for _ in range(count):
        fe.add(RX, [], [size])
    fe.publish(RX)


def receive(fe, count: int = 1, timeout: float = 10.0) -> list[tuple[VirtioNetHdr, bytes]]:  # noqa: ANN001
    """``count`` packets: (header, frame), joining MRG_RXBUF buffers."""
    got = []
    pending: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        pending += fe.wait_used(RX, 1, timeout=max(0.1, deadline - time.monotonic()))
        while pending:
            h = VirtioNetHdr.unpack(pending[0].data[:HDR_LEN])
            n = max(1, h.num_buffers)
            if len(pending) < n:
                break
            bufs, pending = pending[:n], pending[n:]
            got.append((h, b"".join(b.data for b in bufs)[HDR_LEN:]))
    assert not pending
    return got


@pytest.fixture
def pair(serve_backend, mock_frontend_factory):  # noqa: ANN001, ANN201
    """``make(options_a, options_b=None, **switch_kw) -> (switch, (a, fe_a), (b, fe_b))``"""
    made: list[L2Switch] = []

    def make(opts: FrontendOptions, opts_b: FrontendOptions | None = None, *, rx_backlog: int = 1024,
             **switch_kw: object):  # noqa: ANN202
        switch = L2Switch(**switch_kw)  # type: ignore[arg-type]
        made.append(switch)
        ports = []
        for name, mac, o in (("a", MAC_A, opts), ("b", MAC_B, opts_b or opts)):
            backend = NetBackend(mac=mac, name=name, rx_backlog=rx_backlog)
            switch.attach(backend)
            fe = mock_frontend_factory(serve_backend(backend), o)
            ports.append((backend, fe))
        return switch, ports[0], ports[1]

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
@pytest.mark.parametrize("mrg", [True, False], ids=["mrg", "no-mrg"])
def test_two_ports_learn_and_exchange_frames(pair, packed: bool, event_idx: bool, mrg: bool) -> None:  # noqa: ANN001
    switch, (a, fe_a), (b, fe_b) = pair(options(packed=packed, event_idx=event_idx, mrg=mrg))
    assert fe_a.acked_features & MRG == (MRG if mrg else 0)
    post_rx(fe_a, 32)
    post_rx(fe_b, 32)
    hello = frame(BCAST, MAC_A, b"who is there?" * 10)
    send(fe_a, hello)
    [(h, got)] = receive(fe_b)
    assert got == hello and h.flags == 0 and h.gso_type == 0
    assert h.num_buffers == (1 if mrg else 0)
    # b answers by unicast: a's MAC was learned, the frame goes to a only
    reply = frame(MAC_A, MAC_B, bytes(range(256)) * 5)
    send(fe_b, reply)
    [(_, got)] = receive(fe_a)
    assert got == reply
    assert switch.fdb() == {"02:00:00:00:00:01": "a", "02:00:00:00:00:02": "b"}
    # many frames both ways, in order
    for i in range(20):
        send(fe_a, frame(MAC_B, MAC_A, struct.pack(">I", i) * 100))
    assert [f[14:18] for _, f in receive(fe_b, 20)] == [struct.pack(">I", i) for i in range(20)]
    assert a.stats.tx_frames == 21 and b.stats.rx_frames == 21
    assert not a.stats.drops and not b.stats.drops
    assert fe_a.reap(RX) == []  # nothing flooded back to the sender


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_mrg_rxbuf_spreads_a_frame_over_several_buffers(pair, packed: bool) -> None:  # noqa: ANN001
    _, (_, fe_a), (_, fe_b) = pair(options(packed=packed))
    post_rx(fe_b, 16, size=1024)
    big = frame(MAC_B, MAC_A, bytes(i % 251 for i in range(9000)))
    send(fe_a, big)
    [(h, got)] = receive(fe_b)
    assert h.num_buffers == 9  # 12 + 9014 bytes in 1024-byte buffers
    assert got == big


def test_without_mrg_a_frame_too_big_for_the_buffer_is_dropped(pair) -> None:  # noqa: ANN001
    _, (_, fe_a), (b, fe_b) = pair(options(mrg=False))
    post_rx(fe_b, 1, size=512)
    send(fe_a, frame(MAC_B, MAC_A, bytes(1000)))
    small = frame(MAC_B, MAC_A, b"fits")
    send(fe_a, small)
    [(_, got)] = receive(fe_b)
    assert got == small  # the held buffer took the next frame that fits
    assert b.stats.drops == {"rx-too-big": 1}


def test_header_split_across_descriptors(pair) -> None:  # noqa: ANN001
    _, (_, fe_a), (_, fe_b) = pair(options())
    post_rx(fe_b, 4)
    data = frame(MAC_B, MAC_A, b"split header" * 20)
    raw = hdr() + data
    fe_a.request(TX, [raw[:3], raw[3:13], raw[13:20], raw[20:]], [])
    [(_, got)] = receive(fe_b)
    assert got == data


def test_bad_tx_chains_are_dropped_and_counted(pair) -> None:  # noqa: ANN001
    _, (a, fe_a), (b, fe_b) = pair(options())
    post_rx(fe_b, 8)
    fe_a.request(TX, [b"short"], [])                                         # shorter than the header
    fe_a.request(TX, [hdr() + b"runt"], [])                                  # no Ethernet header
    fe_a.request(TX, [VirtioNetHdr(flags=1).pack() + frame(MAC_B, MAC_A, b"x" * 64)], [])   # NEEDS_CSUM
    fe_a.request(TX, [VirtioNetHdr(gso_type=1).pack() + frame(MAC_B, MAC_A, b"x" * 64)], [])  # TSO4
    fe_a.request(TX, [hdr() + frame(MAC_B, MAC_A, bytes(MAX_FRAME_LEN))], [])  # over 64 KiB
    good = frame(MAC_B, MAC_A, b"still serving")
    send(fe_a, good)
    [(_, got)] = receive(fe_b)
    assert got == good
    assert a.stats.drops == {"tx-short": 1, "tx-runt": 1, "tx-offload": 2, "tx-oversize": 1}
    assert a.stats.tx_frames == 1


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_no_rx_buffers_fill_a_bounded_backlog_only(pair, packed: bool) -> None:  # noqa: ANN001
    switch, (a, fe_a), (b, fe_b) = pair(options(packed=packed), rx_backlog=16)
    post_rx(fe_a, 8)
    for i in range(40):  # b posts nothing: its backlog fills, the rest is dropped
        send(fe_a, frame(MAC_B, MAC_A, struct.pack(">I", i) * 16))
    assert b.rx_backlog() == 16 and b.stats.drops == {"rx-backlog-full": 24}
    # a is not stalled by b: b -> a still flows
    send(fe_b, frame(MAC_A, MAC_B, b"ping"))
    assert receive(fe_a)[0][1][14:] == b"ping"
    # once b posts buffers, the oldest 16 arrive in order
    post_rx(fe_b, 32)
    got = receive(fe_b, 16)
    assert [f[14:18] for _, f in got] == [struct.pack(">I", i) for i in range(16)]
    assert b.rx_backlog() == 0


def test_mac_filter_refuses_another_ports_source_mac(pair) -> None:  # noqa: ANN001
    switch, (_, fe_a), (_, fe_b) = pair(options(), mac_filter=True)
    post_rx(fe_a, 4)
    post_rx(fe_b, 4)
    send(fe_a, frame(BCAST, MAC_A, b"a is here"))
    assert receive(fe_b)[0][1][14:] == b"a is here"
    send(fe_b, frame(BCAST, MAC_A, b"b pretends to be a"))   # spoofed: dropped
    send(fe_b, frame(BCAST, MAC_B, b"b as itself"))
    assert receive(fe_a)[0][1][14:] == b"b as itself"
    assert switch.drops["source-mac-filter"] == 1
    assert switch.fdb()["02:00:00:00:00:01"] == "a"


def test_mac_ageing_floods_again(pair) -> None:  # noqa: ANN001
    switch, (_, fe_a), (_, fe_b) = pair(options(), ageing_time=0.2)
    post_rx(fe_a, 4)
    post_rx(fe_b, 4)
    send(fe_a, frame(BCAST, MAC_A, b"hello"))
    receive(fe_b)
    assert "02:00:00:00:00:01" in switch.fdb()
    time.sleep(0.3)
    assert switch.fdb() == {}
    assert switch.age() == 1


def test_rings_enabled_before_set_features_as_qemu_72_net_does(serve_backend) -> None:  # noqa: ANN001
    """QEMU 7.2's vhost-user-net sends SET_VRING_ENABLE before SET_FEATURES
    (qemu72-net trace): after SET_PROTOCOL_FEATURES that must be accepted."""
    from vhostuser.frontend import Frontend
    from vhostuser.protocol.message import VhostUserProtocolFeatures as PF

    backend = NetBackend(name="q")
    fe = Frontend.connect(serve_backend(backend))
    try:
        features = fe.get_features()
        fe.set_protocol_features(fe.get_protocol_features() & PF.REPLY_ACK)
        fe.set_owner()
        fe.set_vring_enable(0, True)   # acked (REPLY_ACK): not refused
        fe.set_vring_enable(1, True)
        fe.set_features(features & (1 << 32 | 1 << 30 | MRG))
        assert fe.get_features() == features
    finally:
        fe.close()


# ------------------------------------------------------------------ hooks, capture
def test_hooks_drop_modify_duplicate_and_delay(pair, tmp_path) -> None:  # noqa: ANN001
    from vhostuser.devices.net import DROP, Delay, Direction, PcapWriter, read_pcap

    pcap = PcapWriter(tmp_path / "cap.pcap")
    switch, (_, fe_a), (_, fe_b) = pair(options(), pcap=pcap)
    post_rx(fe_b, 16)
    seen = []

    def hook(packet):  # noqa: ANN001, ANN202
        seen.append((packet.port, packet.direction))
        tag = packet.frame[14:]
        if tag == b"drop":
            return DROP
        if tag == b"modify":
            return packet.frame[:14] + b"MODIFIED"
        if tag == b"twice":
            return [packet.frame, packet.frame]
        if tag == b"late":
            return Delay(0.3)
        return None

    switch.add_hook(hook, direction="ingress", port=0)
    t0 = time.monotonic()
    for tag in (b"late", b"drop", b"modify", b"twice", b"plain"):
        send(fe_a, frame(MAC_B, MAC_A, tag))
    got = [f[14:] for _, f in receive(fe_b, 5)]
    assert got == [b"MODIFIED", b"twice", b"twice", b"plain", b"late"]
    assert time.monotonic() - t0 >= 0.3
    assert seen == [(0, Direction.INGRESS)] * 5
    assert switch.drops["hook-ingress"] == 1
    switch.close()
    assert [f[14:] for _, f in read_pcap(tmp_path / "cap.pcap")] == [b"late", b"drop", b"modify", b"twice", b"plain"]


def test_failing_hook_drops_the_frame_not_the_switch(pair) -> None:  # noqa: ANN001
    switch, (_, fe_a), (_, fe_b) = pair(options())
    post_rx(fe_b, 4)
    switch.add_hook(lambda p: 1 / 0 if p.frame[14:] == b"boom" else None)
    send(fe_a, frame(MAC_B, MAC_A, b"boom"))
    send(fe_a, frame(MAC_B, MAC_A, b"fine"))
    assert receive(fe_b)[0][1][14:] == b"fine"
    assert switch.drops["hook-error"] == 1


def test_loss_impairment_is_seeded_and_near_its_rate(pair) -> None:  # noqa: ANN001
    from vhostuser.devices.net import parse_impairment

    spec = parse_impairment("loss=20%,seed=7,port=1")
    switch, (_, fe_a), (_, fe_b) = pair(options())
    for hook in spec.hooks:
        switch.add_hook(hook, direction=spec.direction, port=spec.port)
    post_rx(fe_b, 200)
    n = 200
    fe_a.transfer(TX, [([hdr() + frame(MAC_B, MAC_A, struct.pack(">I", i))], []) for i in range(n)])
    time.sleep(0.5)
    got = fe_b.reap(RX)
    # binomial(200, 0.2): mean 40, sd 5.7 -> a 5-sd window
    assert 12 <= n - len(got) <= 68
    # the same seed drops the same frames
    from vhostuser.devices.net import Loss, Packet

    again = Loss(20, seed=7)
    kept = [i for i in range(n) if again(Packet(b"", 1, spec.direction, 0.0)) is None]
    assert [struct.unpack(">I", u.data[HDR_LEN + 14:HDR_LEN + 18])[0] for u in got] == kept


def test_impairment_hooks_unit() -> None:
    from vhostuser.devices.net.hooks import (
        Corrupt,
        Delay,
        Direction,
        Duplicate,
        Latency,
        Packet,
        RateLimit,
        Reorder,
        apply_hooks,
        parse_impairment,
    )

    f = frame(MAC_B, MAC_A, bytes(100))
    pkt = Packet(f, 0, Direction.EGRESS, 10.0)
    bad = Corrupt(100, seed=1)(pkt)
    assert isinstance(bad, bytes) and len(bad) == len(f) and bad[:14] == f[:14]
    assert sum(bin(x ^ y).count("1") for x, y in zip(bad, f)) == 1
    assert Duplicate(100)(pkt) == [f, f]
    d = Latency(20, 5, seed=3)(pkt)
    assert isinstance(d, Delay) and 0.015 <= d.seconds <= 0.025
    assert Reorder(100, gap_ms=7)(pkt) == Delay(0.007)
    assert Reorder(0)(pkt) is None
    rate = RateLimit(8000, max_queue_ms=300)  # 1000 bytes/s: a 114-byte frame takes 0.114 s
    waits = [apply_hooks([rate], f, 0, Direction.EGRESS, now=10.0) for _ in range(4)]
    assert [round(w[0][1], 3) for w in waits[:3]] == [0.114, 0.228, 0.342]
    assert waits[3] == []  # 0.342 s of frames already waiting > 0.3 s: dropped
    spec = parse_impairment("loss=1,corrupt=2%,duplicate=3,reorder=4,latency=10ms,jitter=1ms,rate=10M,seed=5")
    assert [type(h).__name__ for h in spec.hooks] == ["Loss", "Corrupt", "Duplicate", "Reorder", "Latency", "RateLimit"]
    assert spec.direction is Direction.EGRESS and spec.port is None
    with pytest.raises(ValueError):
        parse_impairment("loss=120")
    with pytest.raises(ValueError):
        parse_impairment("wobble=3")


def test_two_queue_pairs_spread_flows_and_take_tx_on_both(serve_backend, mock_frontend_factory) -> None:  # noqa: ANN001
    switch = L2Switch()
    a, b = NetBackend(mac=MAC_A, name="a", queue_pairs=2), NetBackend(mac=MAC_B, name="b", queue_pairs=2)
    switch.attach(a)
    switch.attach(b)
    mq = options(num_queues=4, queue_size=64,
                 device_features=MRG | 1 << NetFeature.MAC | 1 << NetFeature.STATUS | 1 << NetFeature.MQ)
    fe_a = mock_frontend_factory(serve_backend(a), mq)
    fe_b = mock_frontend_factory(serve_backend(b), mq)
    assert fe_a.acked_features >> NetFeature.MQ & 1 and b.queues_per_thread() == [0b0011, 0b1100]
    for q in (0, 2):
        for _ in range(32):
            fe_b.add(q, [], [2048])
        fe_b.publish(q)
    sources = [bytes([2, 0, 0, 0, 1, i]) for i in range(24)]
    for i, src in enumerate(sources):  # alternate TX queues 1 and 3 (both pairs' workers)
        fe_a.request(1 if i % 2 == 0 else 3, [hdr() + frame(BCAST, src, b"flow %d" % i)], [])
    got: dict[int, list[bytes]] = {0: [], 2: []}
    deadline = time.monotonic() + 10
    while sum(map(len, got.values())) < len(sources) and time.monotonic() < deadline:
        for q in (0, 2):
            got[q] += [u.data[HDR_LEN:] for u in fe_b.reap(q)]
        time.sleep(0.01)
    assert sorted(f[6:12] for fs in got.values() for f in fs) == sorted(sources)
    assert got[0] and got[2]  # both RX queues carried flows
    assert a.stats.tx_frames == len(sources)
    switch.close()


def test_hostile_tx_ring_fails_only_that_queue(pair) -> None:  # noqa: ANN001
    """A TX descriptor pointing outside guest memory: that port's TX queue fails
    (err fd signalled, logged), the other port and the switch keep working."""
    _, (a, fe_a), (b, fe_b) = pair(options())
    post_rx(fe_a, 4)
    drv = fe_b.driver(TX)
    drv.write_desc(0, 0xDEAD_0000_0000, 64)
    drv.push_avail(0)
    drv.publish()
    fe_b.kick(TX)
    assert fe_b.wait_err(TX, timeout=10)
    # a still reaches b's RX (b's RX queue is fine) and b's port still delivers
    post_rx(fe_b, 4)
    send(fe_a, frame(MAC_B, MAC_A, b"after the failure"))
    assert receive(fe_b)[0][1][14:] == b"after the failure"


def test_a_guest_flooding_tx_does_not_stall_the_others(serve_backend, mock_frontend_factory) -> None:  # noqa: ANN001
    """Port a floods frames to b, which never posts RX buffers; a third port c
    still exchanges frames with a, and b's backlog stays bounded."""
    switch = L2Switch()
    mac_c = bytes.fromhex("020000000003")
    ports = {}
    for name, mac in (("a", MAC_A), ("b", MAC_B), ("c", mac_c)):
        backend = NetBackend(mac=mac, name=name, rx_backlog=64)
        switch.attach(backend)
        ports[name] = (backend, mock_frontend_factory(serve_backend(backend), options()))
    fe_a, (b, fe_b), fe_c = ports["a"][1], ports["b"], ports["c"][1]
    send(fe_b, frame(BCAST, MAC_B, b"b exists"))        # learned: the flood is unicast to b
    post_rx(fe_c, 8)
    receive(fe_c)
    fe_a.transfer(TX, [([hdr() + frame(MAC_B, MAC_A, bytes(1000))], []) for _ in range(2000)])
    assert b.rx_backlog() == 64 and b.stats.drops["rx-backlog-full"] == 2000 - 64
    post_rx(fe_a, 4)
    send(fe_c, frame(MAC_A, mac_c, b"c to a"))
    assert [f[14:] for _, f in receive(fe_a, 2)] == [b"b exists", b"c to a"]  # the broadcast waited for a too
    switch.close()


def test_send_rarp_and_net_set_mtu(pair) -> None:  # noqa: ANN001
    """SEND_RARP (after a migration) floods a RARP from the guest's MAC, which the
    switch learns; NET_SET_MTU updates the config space's mtu."""
    from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
    from vhostuser.testing.frontend import DEFAULT_PROTOCOL_FEATURES

    switch, (a, fe_a), (_, fe_b) = pair(options(config_size=12,
                                                protocol_features=int(DEFAULT_PROTOCOL_FEATURES | PF.RARP | PF.MTU)))
    assert fe_a.protocol_features & PF.RARP and fe_a.protocol_features & PF.MTU
    assert a.features() >> NetFeature.MTU & 1 == 0  # not offered (DPDK's virtio-user mishandles it)
    post_rx(fe_b, 2)
    fe_a.frontend.send_rarp(MAC_A)
    [(_, rarp)] = receive(fe_b)
    assert rarp[:6] == BCAST and rarp[6:12] == MAC_A and rarp[12:14] == b"\x80\x35" and len(rarp) == 60
    assert rarp[20:22] == b"\x00\x03" and rarp[22:28] == MAC_A   # opcode 3, sender = the MAC
    assert switch.fdb()["02:00:00:00:00:01"] == "a"
    fe_a.frontend.net_set_mtu(9000)
    assert a.mtu == 9000 and a.get_config(10, 2) == struct.pack("<H", 9000)
