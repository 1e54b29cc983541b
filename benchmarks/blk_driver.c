/*
 * A minimal virtio-blk driver for benchmarks/blk_bench.py: keeps QD requests in
 * flight on a split ring (EVENT_IDX) that a Python front-end has set up, waits
 * for call interrupts like a guest driver, verifies every status byte and a
 * sample of every read's data, and counts what it saw.
 *
 * The guest RAM is mapped in this process (the front-end's shm); the ring and
 * the data buffers are given as host pointers plus their guest addresses.
 * One bench_run call drives one queue; run several from several threads.
 * Compiled by blk_bench.py with the system C compiler, loaded with ctypes.
 *
 * SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define F_NEXT 1u
#define F_WRITE 2u
#define T_IN 0u
#define T_OUT 1u

struct bench_queue {
    /* set by Python */
    uint8_t *desc;           /* host pointers of the three ring areas */
    uint8_t *avail;
    uint8_t *used;
    uint64_t data_gpa;       /* QD buffers of `bs` bytes, then QD headers+status */
    uint8_t *data_host;
    uint32_t size;           /* ring entries */
    uint32_t qd;
    uint32_t bs;             /* bytes per request */
    uint32_t write;          /* 1: writes, 0: reads */
    uint32_t sequential;     /* 1: sequential offsets, 0: random */
    uint32_t pad0;
    uint64_t image_bytes;    /* the requests stay inside [0, image_bytes) */
    uint64_t seed;           /* data pattern (see pattern()) */
    uint64_t rng;            /* offset generator state (non-zero) */
    uint64_t seq_next;
    int kick_fd;
    int call_fd;
    double seconds;          /* run this long (then drain) */
    uint64_t max_requests;   /* or stop after this many (0: no limit) */
    /* results */
    uint64_t completed;
    uint64_t bytes;
    uint64_t latency_ns;     /* sum over completed requests */
    uint64_t interrupts;     /* call eventfd reads that found a count */
    uint64_t kicks;
    uint64_t bad_status;
    uint64_t bad_data;
    uint64_t bad_used;       /* used entries for ids not in flight */
    uint64_t elapsed_ns;
    int error;               /* errno of a failed syscall, or 0 */
};

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The 8-byte word the image holds at byte offset `off` (a multiple of 8). */
uint64_t bench_pattern(uint64_t off, uint64_t seed)
{
    return (off * 0x9E3779B97F4A7C15ull) ^ seed;
}

/* Fill [0, bytes) of fd with the pattern; 0 or errno. */
int bench_fill(int fd, uint64_t bytes, uint64_t seed)
{
    static uint64_t buf[1 << 15];
    for (uint64_t off = 0; off < bytes; off += sizeof(buf)) {
        uint64_t n = bytes - off < sizeof(buf) ? bytes - off : sizeof(buf);
        for (uint64_t i = 0; i < n / 8; i++)
            buf[i] = bench_pattern(off + 8 * i, seed);
        if (pwrite(fd, buf, n, (off_t)off) != (ssize_t)n)
            return errno ? errno : EIO;
    }
    return 0;
}

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

struct slot {
    uint64_t off;
    uint64_t t0;
};

/* the header of request slot i and its status byte live after the data buffers */
static inline uint8_t *hdr_host(struct bench_queue *q, uint32_t i)
{
    return q->data_host + (uint64_t)q->qd * q->bs + 32u * i;
}

static void prepare(struct bench_queue *q, struct slot *s, uint32_t i)
{
    uint64_t blocks = q->image_bytes / q->bs;
    uint64_t off;
    if (q->sequential) {
        off = q->seq_next;
        q->seq_next = (q->seq_next + q->bs) % (blocks * q->bs);
    } else {
        off = (xorshift(&q->rng) % blocks) * q->bs;
    }
    s[i].off = off;
    uint8_t *h = hdr_host(q, i);
    uint32_t type = q->write ? T_OUT : T_IN;
    uint64_t sector = off >> 9;
    memcpy(h, &type, 4);
    memset(h + 4, 0, 4);
    memcpy(h + 8, &sector, 8);
    h[16] = 0xff; /* status: the device must overwrite it */
    uint64_t *d = (uint64_t *)(q->data_host + (uint64_t)i * q->bs);
    if (q->write) {
        for (uint32_t k = 0; k < q->bs / 8; k++)
            d[k] = bench_pattern(off + 8 * k, q->seed);
    } else {
        d[0] = d[q->bs / 8 - 1] = 0; /* verified words: stale data must not pass */
    }
}

/* descriptors 3i, 3i+1, 3i+2: header, data, status */
static void write_descs(struct bench_queue *q, uint32_t i)
{
    uint64_t hdr_gpa = q->data_gpa + (uint64_t)q->qd * q->bs + 32u * i;
    struct {
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        uint16_t next;
    } d[3] = {
        {hdr_gpa, 16, F_NEXT, (uint16_t)(3 * i + 1)},
        {q->data_gpa + (uint64_t)i * q->bs, q->bs, (uint16_t)(F_NEXT | (q->write ? 0 : F_WRITE)), (uint16_t)(3 * i + 2)},
        {hdr_gpa + 16, 1, F_WRITE, 0},
    };
    memcpy(q->desc + 16u * 3 * i, d, sizeof(d));
}

static int check(struct bench_queue *q, struct slot *s, uint32_t i)
{
    if (hdr_host(q, i)[16] != 0) {
        q->bad_status++;
        return 0;
    }
    if (!q->write) {
        const uint64_t *d = (const uint64_t *)(q->data_host + (uint64_t)i * q->bs);
        uint32_t words = q->bs / 8;
        uint32_t mid = (uint32_t)((s[i].off >> 9) % words);
        if (d[0] != bench_pattern(s[i].off, q->seed) ||
            d[words - 1] != bench_pattern(s[i].off + 8 * (words - 1), q->seed) ||
            d[mid] != bench_pattern(s[i].off + 8 * mid, q->seed)) {
            q->bad_data++;
            return 0;
        }
    }
    return 1;
}

static inline uint16_t load16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void store16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* Drive the queue; 0, or -1 with q->error set (a syscall failed, or the device
   returned an id that is not in flight: q->bad_used). */
int bench_run(struct bench_queue *q)
{
    struct slot s[1024];
    uint8_t busy[1024];
    if (q->qd == 0 || q->qd > 1024 || 3 * q->qd > q->size || q->bs % 512 || q->bs < 512 ||
        q->image_bytes < q->bs || q->rng == 0) {
        q->error = EINVAL;
        return -1;
    }
    uint16_t *avail_ring = (uint16_t *)(q->avail + 4);
    uint8_t *used_event = q->avail + 4 + 2u * q->size;
    uint8_t *avail_event = q->used + 4 + 8u * q->size;
    uint16_t avail_idx = load16(q->avail + 2);
    uint16_t last_used = load16(q->used + 2);
    uint16_t kicked_at = avail_idx;
    uint64_t start = now_ns(), stop = start + (uint64_t)(q->seconds * 1e9);
    uint64_t issued = 0;
    uint32_t inflight = 0;
    int stopping = 0;

    for (uint32_t i = 0; i < q->qd; i++) {
        write_descs(q, i);
        busy[i] = 0;
    }
    for (;;) {
        /* submit every free slot */
        if (!stopping) {
            uint64_t t = now_ns();
            for (uint32_t i = 0; i < q->qd; i++) {
                if (busy[i])
                    continue;
                if (q->max_requests && issued >= q->max_requests)
                    break;
                prepare(q, s, i);
                s[i].t0 = t;
                busy[i] = 1;
                avail_ring[avail_idx % q->size] = (uint16_t)(3 * i);
                avail_idx++;
                inflight++;
                issued++;
            }
        }
        if (avail_idx != kicked_at) {
            store16(q->avail + 2, avail_idx);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (need_event(load16(avail_event), avail_idx, kicked_at)) {
                uint64_t one = 1;
                if (write(q->kick_fd, &one, 8) != 8) {
                    q->error = errno;
                    return -1;
                }
                q->kicks++;
            }
            kicked_at = avail_idx;
        }
        if (inflight == 0)
            break;
        /* reap; ask for an interrupt for the next used entry, recheck, sleep */
        for (;;) {
            uint16_t used_idx = load16(q->used + 2);
            if (used_idx != last_used) {
                uint64_t t = now_ns();
                while (last_used != used_idx) {
                    const uint8_t *e = q->used + 4 + 8u * (last_used % q->size);
                    uint32_t id;
                    memcpy(&id, e, 4);
                    last_used++;
                    uint32_t i = id / 3;
                    if (id % 3 || i >= q->qd || !busy[i]) {
                        q->bad_used++;
                        q->error = EPROTO;
                        return -1;
                    }
                    busy[i] = 0;
                    inflight--;
                    if (check(q, s, i)) {
                        q->completed++;
                        q->bytes += q->bs;
                        q->latency_ns += t - s[i].t0;
                    }
                }
                if (t >= stop)
                    stopping = 1;
                break;
            }
            store16(used_event, last_used);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (load16(q->used + 2) != last_used)
                continue;
            struct pollfd pfd = {q->call_fd, POLLIN, 0};
            int rc = poll(&pfd, 1, 10000);
            if (rc == 0) {
                q->error = ETIMEDOUT;
                return -1;
            }
            if (rc < 0) {
                if (errno == EINTR)
                    continue;
                q->error = errno;
                return -1;
            }
            uint64_t cnt;
            if (read(q->call_fd, &cnt, 8) == 8)
                q->interrupts++;
        }
    }
    q->elapsed_ns = now_ns() - start;
    return 0;
}
