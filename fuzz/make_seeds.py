"""Write the seed corpora of the fuzz harnesses into ``fuzz/corpus/``.

``ring/`` (``ring_fuzz.c``): each seed is a valid, busy queue (so the fuzzer starts deep inside the walkers
instead of at "bad size"): split and packed, with direct chains, a chain
spanning two adjacent regions, an indirect table, EVENT_IDX and a dirty log,
followed by a script that pops, copies, does batch I/O, completes, notifies and
has the guest post more buffers.  The input layout is described at the top of
``ring_fuzz.c``.

``codec/`` and ``handler/`` (``codec_fuzz.py``, ``handler_fuzz.py``): a whole
front-end session (features, memory table, a queue set up, enabled, kicked,
config read, stopped, inflight area asked for) encoded by the library's own
encoder, behind each harness's prefix byte(s).

Run ``python fuzz/make_seeds.py`` after changing a harness's input format.
"""
from __future__ import annotations

import struct
from pathlib import Path

from vhostuser.protocol import payloads as p
from vhostuser.protocol.codec import Message, encode
from vhostuser.protocol.message import FrontendReq as R

CORPUS = Path(__file__).resolve().parent / "corpus"
NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
SIZE = 8
DESC, DRIVER, DEVICE = 0x0, 0x100, 0x200  # split: desc 128 B, avail 22 B, used 70 B
TABLE = 0x800  # indirect table
IMAGE = 0x1000  # bytes of region 0 written (the rest of guest memory is zero)

# op kinds: 0 pop, 1 complete, 2 bogus complete, 3 needs_notification,
# 4 set_notification, 5 avail_pending + poll, 6 gather/scatter, 7 heads + log,
# 8 chain_io, 9 guest write (the next bytes of the script are the data)
SCRIPT = [
    (5, 0, 0, 0), (0, 1, 0, 0), (6, 0, 3, 1), (7, 0, 16, 2), (1, 0, 0, 0),
    (3, 0, 0, 0), (4, 0, 0, 0), (0, 7, 0, 0), (8, 0x24, 1, 0x21), (0, 7, 0, 0),
    (7, 1, 40, 3), (1, 2, 0, 0), (2, 5, 1, 2), (3, 0, 0, 0), (4, 1, 0, 0),
]


def desc(addr: int, length: int, flags: int, nxt: int = 0) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


def packed_desc(addr: int, length: int, bid: int, flags: int) -> bytes:
    return struct.pack("<QIHH", addr, length, bid, flags)


def header(flags: int, size: int) -> bytes:
    extra = 1 | (4 if flags & 4 else 0)  # one size of extra descriptor room; a 1-byte dirty log
    ops = b"".join(bytes(op) for op in SCRIPT)
    return struct.pack("<BBHHHHHBB", flags, size, 0, 0, DESC, DRIVER, DEVICE, extra, len(SCRIPT)) + ops


def split_seed(flags: int) -> bytes:
    img = bytearray(IMAGE)
    descs = [
        desc(0x1000, 64, 0),  # 0: one readable buffer
        desc(0x1100, 16, NEXT, 2),  # 1 -> 2: a request header, then a reply spanning regions 0 and 1
        desc(0x1F00, 0x200, WRITE),
        desc(TABLE, 3 * 16, INDIRECT),  # 3: indirect
        desc(0x1200, 512, NEXT, 5), desc(0x4000, 512, WRITE | NEXT, 6), desc(0x1400, 1, WRITE),  # 4..6
    ]
    img[DESC:DESC + 16 * len(descs)] = b"".join(descs)
    img[TABLE:TABLE + 48] = desc(0x1600, 16, NEXT, 1) + desc(0x2800, 0x100, WRITE | NEXT, 2) + desc(0x1700, 1, WRITE)
    heads = [0, 1, 3, 4]
    struct.pack_into("<HH", img, DRIVER, 0, len(heads))
    for k, h in enumerate(heads):
        struct.pack_into("<H", img, DRIVER + 4 + 2 * k, h)
    return header(flags, SIZE) + bytes(img)


def packed_seed(flags: int) -> bytes:
    img = bytearray(IMAGE)
    a = AVAIL  # first lap: avail_wrap = 1, so AVAIL set and USED clear
    descs = [
        packed_desc(0x1000, 64, 0, a),
        packed_desc(0x1100, 16, 9, a | NEXT), packed_desc(0x1F00, 0x200, 1, a | WRITE),
        packed_desc(TABLE, 3 * 16, 2, a | INDIRECT),
        packed_desc(0x1200, 512, 9, a | NEXT), packed_desc(0x4000, 512, 9, a | WRITE | NEXT),
        packed_desc(0x1400, 1, 3, a | WRITE),
    ]
    img[DESC:DESC + 16 * len(descs)] = b"".join(descs)
    img[TABLE:TABLE + 48] = (packed_desc(0x1600, 16, 0, 0) + packed_desc(0x2800, 0x100, 0, WRITE)
                             + packed_desc(0x1700, 1, 0, WRITE))
    return header(flags | 1, SIZE) + bytes(img)


def session(need_reply: bool) -> bytes:
    """A front-end's requests for one queue of 16 in 1 MiB of guest memory at 0."""
    f = 0x1 | (0x8 if need_reply else 0)
    uva = 0x7F0000000000
    region = p.MemoryRegion(guest_phys_addr=0, memory_size=1 << 20, userspace_addr=uva, mmap_offset=0)
    msgs = [
        Message(R.GET_FEATURES, flags=0x1), Message(R.SET_OWNER, flags=f),
        Message(R.SET_FEATURES, p.U64((1 << 32) | (1 << 30) | (1 << 29) | (1 << 28)), f),
        Message(R.GET_PROTOCOL_FEATURES, flags=0x1),
        Message(R.SET_PROTOCOL_FEATURES, p.U64(0x1 | 0x2 | 0x8 | 0x200 | 0x1000), f),
        Message(R.GET_QUEUE_NUM, flags=0x1),
        Message(R.SET_MEM_TABLE, p.MemoryTable((region,)), f, (-1,)),
        Message(R.SET_VRING_NUM, p.VringState(0, 16), f),
        Message(R.SET_VRING_ADDR, p.VringAddr(index=0, flags=0, descriptor=uva, used=uva + 0x2000,
                                              available=uva + 0x1000, log=0), f),
        Message(R.SET_VRING_BASE, p.VringState(0, 0), f),
        Message(R.SET_VRING_KICK, p.U64(0), f, (-1,)),
        Message(R.SET_VRING_CALL, p.U64(0), f, (-1,)),
        Message(R.SET_VRING_ENABLE, p.VringState(0, 1), f),
        Message(R.GET_CONFIG, p.Config(offset=0, data=bytes(8), flags=0), 0x1),
        Message(R.GET_VRING_BASE, p.VringState(0, 0), 0x1),
        Message(R.GET_INFLIGHT_FD, p.Inflight(mmap_size=0, mmap_offset=0, num_queues=1, queue_size=16), 0x1),
    ]  # fmt: skip
    return b"".join(encode(m) for m in msgs)


def write(sub: str, seeds: dict[str, bytes]) -> None:
    out = CORPUS / sub
    out.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (out / name).write_bytes(data)


def main() -> None:
    wraps = 8 | 16 | 32  # avail_wrap, used_wrap, notify_enabled
    seeds = {
        "split": split_seed(wraps),
        "split-event-idx-log": split_seed(wraps | 2 | 4),
        "packed": packed_seed(wraps),
        "packed-event-idx-log": packed_seed(wraps | 2 | 4),
    }
    write("ring", {name: data.rstrip(b"\0") for name, data in seeds.items()})
    streams = {"session": session(False), "session-need-reply": session(True)}
    write("codec", {name: b"\0" * 5 + data for name, data in streams.items()})
    write("handler", {name: b"\0" + data for name, data in streams.items()})


if __name__ == "__main__":
    main()
