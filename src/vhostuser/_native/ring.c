/*
 * vhostuser native hot path: the C twin of virtqueue/_pycore.py.
 *
 * Contract: docs/ring-core.md.  Same results, same state changes, same guest
 * memory writes and the same (error code, err_a, err_b) as the Python core, in
 * the same order of checks.  Every guest address is checked against the memory
 * table with overflow-safe arithmetic; every loop is bounded by the queue size
 * or an indirect table's length.
 *
 * Portable C11 + the GCC/Clang __atomic builtins; no OS headers.
 *
 * SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 */
#include <string.h>

#include "ring.h"

#define VU_ABI_VERSION 4

/* error codes: virtqueue/errcodes.py (values are ABI) */
enum {
    E_NOT_READY = 1,
    E_BROKEN = 2,
    E_RING_ADDRESS = 3,
    E_RING_ALIGNMENT = 4,
    E_AVAIL_INDEX = 5,
    E_INFLIGHT = 6,
    E_HEAD_INDEX = 7,
    E_DESC_INDEX = 8,
    E_DESC_ZERO_LEN = 9,
    E_DESC_ADDRESS = 10,
    E_DESC_ORDER = 11,
    E_CHAIN_TOO_LONG = 12,
    E_CHAIN_TOO_BIG = 13,
    E_INDIRECT_NESTED = 14,
    E_INDIRECT_CHAINED = 15,
    E_INDIRECT_LENGTH = 16,
    E_INDIRECT_SIZE = 17,
    E_INDIRECT_ADDRESS = 18,
    E_USED_ID = 19,
    E_USED_OVERFLOW = 20,
    E_USED_SLOTS = 21,
    E_BASE_RANGE = 22,
    E_BATCH_CAPACITY = 23,
    E_BAD_SIZE = 24,
};

#define DESC_F_NEXT 1u
#define DESC_F_WRITE 2u
#define DESC_F_INDIRECT 4u
#define DESC_F_AVAIL (1u << 7)
#define DESC_F_USED (1u << 15)
#define AVAIL_F_NO_INTERRUPT 1u
#define USED_F_NO_NOTIFY 1u
#define EVENT_FLAGS_ENABLE 0u
#define EVENT_FLAGS_DISABLE 1u
#define EVENT_FLAGS_DESC 2u
#define DESC_SIZE 16u
#define MAX_QUEUE_SIZE 32768u
#define MAX_CHAIN_BYTES (UINT64_C(1) << 32)
#define LOG_PAGE_SHIFT 12
#define LAYOUT_PACKED 1u

#if defined(__GNUC__) || defined(__clang__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#endif

int vu_native_abi_version(void)
{
    return VU_ABI_VERSION;
}

/* ------------------------------------------------------------ little endian */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE16(x) __builtin_bswap16(x)
#define LE32(x) __builtin_bswap32(x)
#define LE64(x) __builtin_bswap64(x)
#else
#define LE16(x) (x)
#define LE32(x) (x)
#define LE64(x) (x)
#endif

static inline uint16_t ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return LE16(v);
}

static inline uint32_t ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return LE32(v);
}

static inline uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return LE64(v);
}

static inline void st16(uint8_t *p, uint16_t v)
{
    v = LE16(v);
    memcpy(p, &v, sizeof v);
}

static inline void st32(uint8_t *p, uint32_t v)
{
    v = LE32(v);
    memcpy(p, &v, sizeof v);
}

/* Acquire load / release store of a u16 the other side polls.  The ring areas
   are aligned in guest-physical space; their host mapping normally is too, but
   a region mapped at an odd mmap_offset could break that: then fall back to a
   fence plus a plain access (still ordered, not single-copy atomic). */
static inline uint16_t ld16_acquire(const uint8_t *p)
{
    uint16_t v;
    if (LIKELY(((uintptr_t)p & 1u) == 0)) {
        v = __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_ACQUIRE);
    } else {
        memcpy(&v, p, sizeof v);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
    }
    return LE16(v);
}

static inline void st16_release(uint8_t *p, uint16_t v)
{
    v = LE16(v);
    if (LIKELY(((uintptr_t)p & 1u) == 0)) {
        __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELEASE);
    } else {
        __atomic_thread_fence(__ATOMIC_RELEASE);
        memcpy(p, &v, sizeof v);
    }
}

static inline void fence_full(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* --------------------------------------------------------------- memory */
/* Index of the last region with gpa <= addr, or -1. */
static inline int64_t region_index(const struct vu_mem_table *m, uint64_t addr)
{
    uint32_t lo = 0, hi = m->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (m->r[mid].gpa <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (int64_t)lo - 1;
}

int64_t vu_mem_region_index(const struct vu_mem_table *m, uint64_t addr)
{
    return region_index(m, addr);
}

uint8_t *vu_mem_region_ptr(const struct vu_mem_table *m, uint64_t gpa, uint64_t len)
{
    int64_t i = region_index(m, gpa);
    if (i < 0)
        return NULL;
    const struct vu_mem_region *r = &m->r[i];
    uint64_t off = gpa - r->gpa;
    if (off > r->size || len > r->size - off)
        return NULL;
    return r->host + off;
}

/* len > 0 */
static int in_memory(const struct vu_mem_table *m, uint64_t gpa, uint64_t len)
{
    if (len - 1 > UINT64_MAX - gpa) /* gpa + len > 2**64 */
        return 0;
    uint64_t last = gpa + (len - 1);
    int64_t i = region_index(m, gpa);
    if (i < 0)
        return 0;
    const struct vu_mem_region *r = &m->r[i];
    if (gpa - r->gpa >= r->size)
        return 0;
    for (;;) { /* at most n iterations */
        uint64_t rlast = r->gpa + (r->size - 1);
        if (last <= rlast)
            return 1;
        if ((uint64_t)i + 1 >= m->n || rlast == UINT64_MAX || m->r[i + 1].gpa != rlast + 1)
            return 0;
        i++;
        r = &m->r[i];
    }
}

int vu_mem_in_memory(const struct vu_mem_table *m, uint64_t gpa, uint64_t len)
{
    if (len == 0)
        return 1;
    return in_memory(m, gpa, len);
}

/* Copy between [gpa, gpa+len) (possibly across adjacent regions) and host memory.
   Checks the whole range first (as GuestMemory.read/write do): 0 or -1. */
static int copy_guest(const struct vu_mem_table *m, uint64_t gpa, uint64_t len, uint8_t *host, int to_guest)
{
    if (len == 0)
        return 0;
    if (!in_memory(m, gpa, len))
        return -1;
    int64_t i = region_index(m, gpa);
    while (len) { /* in_memory guaranteed the regions are there and adjacent */
        const struct vu_mem_region *r = &m->r[i];
        uint64_t off = gpa - r->gpa;
        uint64_t take = r->size - off;
        if (take > len)
            take = len;
        if (to_guest)
            memcpy(r->host + off, host, (size_t)take);
        else
            memcpy(host, r->host + off, (size_t)take);
        host += take;
        len -= take;
        gpa += take;
        i++;
    }
    return 0;
}

/* --------------------------------------------------------------- dirty log */
void vu_log_mark(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len)
{
    if (!log || !len || !log_size)
        return;
    uint64_t first = gpa >> LOG_PAGE_SHIFT;
    uint64_t last = (len - 1 > UINT64_MAX - gpa) ? (UINT64_MAX >> LOG_PAGE_SHIFT) : ((gpa + (len - 1)) >> LOG_PAGE_SHIFT);
    uint64_t limit = log_size > (UINT64_MAX >> 3) ? UINT64_MAX : log_size << 3; /* pages */
    if (first >= limit)
        return;
    if (last >= limit)
        last = limit - 1;
    for (uint64_t page = first; page <= last;) {
        if ((page & 7u) == 0 && last - page >= 7) {
            __atomic_fetch_or(&log[page >> 3], (uint8_t)0xff, __ATOMIC_RELAXED);
            page += 8;
            continue;
        }
        __atomic_fetch_or(&log[page >> 3], (uint8_t)(1u << (page & 7u)), __ATOMIC_RELAXED);
        page++;
    }
}

uint64_t vu_log_written(uint8_t *log, uint64_t log_size, const uint64_t *addrs, const uint32_t *lens,
                        const uint32_t *desc_start, const uint32_t *nread, const uint32_t *ndesc,
                        uint32_t first, uint32_t count, const uint32_t *used_lens)
{
    uint64_t pages = 0;
    if (!log || !log_size)
        return 0;
    for (uint32_t k = 0; k < count; k++) {
        uint32_t i = first + k;
        uint64_t left = used_lens[k];
        uint64_t end = (uint64_t)desc_start[i] + ndesc[i];
        for (uint64_t j = (uint64_t)desc_start[i] + nread[i]; j < end && left; j++) {
            uint64_t n = lens[j] < left ? lens[j] : left;
            if (!n)
                continue;
            vu_log_mark(log, log_size, addrs[j], n);
            pages += ((addrs[j] + (n - 1)) >> LOG_PAGE_SHIFT) - (addrs[j] >> LOG_PAGE_SHIFT) + 1;
            left -= n;
        }
    }
    return pages;
}

/* Log [base+off, base+off+len) if ring logging is on.  base + off beyond 2**64
   is a page far beyond any bitmap: ignored (Python computes it unbounded). */
static inline void qlog(const struct vu_queue *q, uint64_t base, uint64_t off, uint64_t len)
{
    if (q->log && q->log_used && off <= UINT64_MAX - base)
        vu_log_mark(q->log, q->log_size, base + off, len);
}

/* ---------------------------------------------------------------- errors */
static inline int is_breaking(int code)
{
    return code >= E_AVAIL_INDEX && code <= E_INDIRECT_ADDRESS;
}

static int fail(struct vu_queue *q, int code, uint64_t a, uint64_t b)
{
    q->err_a = a;
    q->err_b = b;
    if (is_breaking(code))
        q->broken = (uint32_t)code;
    return -code;
}

/* NOT_READY unless ready AND configured for the current size/layout/event_idx
   (the second part can only fail if the state was edited without configure; it
   keeps every ring access inside the resolved areas). */
static inline int not_ready(struct vu_queue *q)
{
    if (UNLIKELY(!q->ready || !q->desc_host || !q->driver_host || !q->device_host || q->size != q->cfg_size ||
                 q->layout != q->cfg_layout || (q->event_idx != 0) != (q->cfg_event_idx != 0) || q->size == 0 ||
                 (q->layout == LAYOUT_PACKED && (q->next_avail >= q->size || q->next_used >= q->size))))
        return fail(q, E_NOT_READY, 0, 0);
    return 0;
}

void vu_queue_reset(struct vu_queue *q)
{
    memset(q, 0, sizeof *q);
    q->avail_wrap = 1;
    q->used_wrap = 1;
    q->notify_enabled = 1;
}

/* ------------------------------------------------------------- configure */
int vu_queue_configure(struct vu_queue *q, const struct vu_mem_table *m)
{
    uint32_t size = q->size;
    int packed = q->layout == LAYOUT_PACKED;
    if (size == 0 || size > MAX_QUEUE_SIZE || (!packed && (size & (size - 1))))
        return fail(q, E_BAD_SIZE, size, MAX_QUEUE_SIZE);
    uint64_t gpa[3] = {q->desc_gpa, q->driver_gpa, q->device_gpa};
    uint64_t len[3], align[3];
    uint64_t extra = q->event_idx ? 2 : 0;
    len[0] = (uint64_t)DESC_SIZE * size;
    align[0] = 16;
    if (packed) {
        len[1] = len[2] = 4;
        align[1] = align[2] = 4;
    } else {
        len[1] = 4 + 2 * (uint64_t)size + extra;
        len[2] = 4 + 8 * (uint64_t)size + extra;
        align[1] = 2;
        align[2] = 4;
    }
    for (int k = 0; k < 3; k++)
        if (gpa[k] % align[k])
            return fail(q, E_RING_ALIGNMENT, gpa[k], align[k]);
    uint8_t *host[3];
    for (int k = 0; k < 3; k++) {
        host[k] = vu_mem_region_ptr(m, gpa[k], len[k]);
        if (!host[k])
            return fail(q, E_RING_ADDRESS, gpa[k], len[k]);
    }
    if (packed) {
        if (q->next_avail >= size)
            return fail(q, E_BASE_RANGE, q->next_avail, size);
        if (q->next_used >= size)
            return fail(q, E_BASE_RANGE, q->next_used, size);
    }
    q->desc_host = host[0];
    q->driver_host = host[1];
    q->device_host = host[2];
    q->cfg_size = size;
    q->cfg_layout = q->layout;
    q->cfg_event_idx = q->event_idx ? 1 : 0;
    return 0;
}

/* ---------------------------------------------------------------- pop */
#define NOROOM 1

struct walk {
    uint64_t total;
    uint64_t read_total;
    uint32_t nread;
    uint32_t seen_write;
    uint64_t headref; /* CHAIN_TOO_BIG detail: split head / packed head position */
};

/* Buffer checks for one descriptor and append: 0, NOROOM or -code. */
static inline int emit(struct vu_queue *q, const struct vu_mem_table *m, struct vu_chain_batch *b, uint32_t *nd,
                       struct walk *w, uint64_t addr, uint32_t len, uint32_t writable, uint32_t idx)
{
    if (UNLIKELY(len == 0))
        return fail(q, E_DESC_ZERO_LEN, addr, 0);
    if (UNLIKELY(!in_memory(m, addr, len)))
        return fail(q, E_DESC_ADDRESS, addr, len);
    if (writable) {
        w->seen_write = 1;
    } else if (UNLIKELY(w->seen_write)) {
        return fail(q, E_DESC_ORDER, idx, 0);
    } else {
        w->nread++;
        w->read_total += len;
    }
    w->total += len;
    if (UNLIKELY(w->total > MAX_CHAIN_BYTES))
        return fail(q, E_CHAIN_TOO_BIG, w->headref, 0);
    uint32_t j = *nd;
    if (UNLIKELY(j >= b->desc_cap || j >= b->desc_alloc))
        return NOROOM;
    b->addr[j] = addr;
    b->len[j] = len;
    b->flags[j] = writable ? (uint16_t)DESC_F_WRITE : 0;
    *nd = j + 1;
    return 0;
}

static inline void end_chain(struct vu_chain_batch *b, uint32_t n, uint32_t head, uint32_t slots, uint32_t start,
                             uint32_t nd, const struct walk *w)
{
    b->head[n] = head;
    b->slots[n] = slots;
    b->desc_start[n] = start;
    b->ndesc[n] = nd - start;
    b->nread[n] = w->nread;
    b->read_bytes[n] = w->read_total;
    b->write_bytes[n] = w->total - w->read_total;
}

/* Indirect checks: 0 with the table pointer and entry count set, or -code. */
static inline int indirect_table(struct vu_queue *q, const struct vu_mem_table *m, uint64_t addr, uint32_t len,
                                 const uint8_t **table, uint32_t *entries)
{
    if (len == 0 || len % DESC_SIZE)
        return fail(q, E_INDIRECT_LENGTH, len, 0);
    uint32_t e = len / DESC_SIZE;
    if (e > q->size)
        return fail(q, E_INDIRECT_SIZE, e, q->size);
    const uint8_t *t = vu_mem_region_ptr(m, addr, len);
    if (!t)
        return fail(q, E_INDIRECT_ADDRESS, addr, len);
    *table = t;
    *entries = e;
    return 0;
}

static int pop_split(struct vu_queue *q, const struct vu_mem_table *m, uint32_t max, struct vu_chain_batch *b)
{
    const uint32_t size = q->size;
    const uint8_t *avail = q->driver_host;
    const uint8_t *desc = q->desc_host;
    uint16_t avail_idx = ld16_acquire(avail + 2);
    uint32_t pending = (uint16_t)(avail_idx - q->next_avail);
    if (pending > size)
        return fail(q, E_AVAIL_INDEX, avail_idx, q->next_avail);
    uint16_t na = q->next_avail;
    uint32_t inflight = q->inflight;
    uint32_t n = 0, nd = 0;
    while (n < max && pending) {
        if (inflight + 1 > size)
            return fail(q, E_INFLIGHT, (uint64_t)inflight + 1, size);
        uint32_t head = ld16(avail + 4 + 2 * (na % size));
        if (head >= size)
            return fail(q, E_HEAD_INDEX, head, size);
        struct walk w = {0, 0, 0, 0, head};
        uint32_t start = nd;
        const uint8_t *table = desc;
        uint32_t entries = size, idx = head, count = 0;
        int in_indirect = 0, rc;
        for (;;) { /* at most entries + 1 iterations (+1 for the indirect descriptor) */
            const uint8_t *d = table + (size_t)idx * DESC_SIZE;
            uint64_t addr = ld64(d);
            uint32_t len = ld32(d + 8);
            uint16_t flags = ld16(d + 12);
            uint16_t next = ld16(d + 14);
            if (flags & DESC_F_INDIRECT) {
                if (in_indirect)
                    return fail(q, E_INDIRECT_NESTED, idx, 0);
                if (count || (flags & DESC_F_NEXT))
                    return fail(q, E_INDIRECT_CHAINED, idx, 0);
                rc = indirect_table(q, m, addr, len, &table, &entries);
                if (rc)
                    return rc;
                in_indirect = 1;
                idx = 0;
                continue;
            }
            count++;
            if (count > entries)
                return fail(q, E_CHAIN_TOO_LONG, head, entries);
            rc = emit(q, m, b, &nd, &w, addr, len, flags & DESC_F_WRITE, idx);
            if (rc < 0)
                return rc;
            if (rc == NOROOM) {
                nd = start;
                goto done;
            }
            if (!(flags & DESC_F_NEXT))
                break;
            idx = next;
            if (idx >= entries)
                return fail(q, E_DESC_INDEX, idx, entries);
        }
        end_chain(b, n, head, 1, start, nd, &w);
        na++;
        pending--;
        inflight++;
        n++;
    }
done:
    q->next_avail = na;
    q->inflight = inflight;
    b->ndescs = nd;
    return (int)n;
}

static inline int packed_available(const uint8_t *desc, uint32_t pos, uint32_t wrap)
{
    uint16_t flags = ld16_acquire(desc + (size_t)pos * DESC_SIZE + 14);
    return (((flags & DESC_F_AVAIL) != 0) == (wrap != 0)) && (((flags & DESC_F_USED) != 0) != (wrap != 0));
}

static int pop_packed(struct vu_queue *q, const struct vu_mem_table *m, uint32_t max, struct vu_chain_batch *b)
{
    const uint32_t size = q->size;
    const uint8_t *desc = q->desc_host;
    uint32_t pos = q->next_avail, wrap = q->avail_wrap;
    uint32_t inflight = q->inflight;
    uint32_t n = 0, nd = 0;
    int rc;
    while (n < max && packed_available(desc, pos, wrap)) {
        struct walk w = {0, 0, 0, 0, pos};
        uint32_t start = nd;
        uint32_t i = pos, slots = 0;
        uint16_t bid;
        for (;;) { /* at most size iterations (CHAIN_TOO_LONG) */
            const uint8_t *d = desc + (size_t)i * DESC_SIZE;
            uint64_t addr = ld64(d);
            uint32_t len = ld32(d + 8);
            bid = ld16(d + 12);
            uint16_t flags = ld16(d + 14);
            slots++;
            if (flags & DESC_F_INDIRECT) {
                const uint8_t *table;
                uint32_t entries;
                if (slots > 1 || (flags & DESC_F_NEXT))
                    return fail(q, E_INDIRECT_CHAINED, i, 0);
                rc = indirect_table(q, m, addr, len, &table, &entries);
                if (rc)
                    return rc;
                for (uint32_t k = 0; k < entries; k++) {
                    const uint8_t *e = table + (size_t)k * DESC_SIZE;
                    uint64_t a = ld64(e);
                    uint32_t l = ld32(e + 8);
                    uint16_t f = ld16(e + 14); /* only WRITE is meaningful here */
                    rc = emit(q, m, b, &nd, &w, a, l, f & DESC_F_WRITE, k);
                    if (rc < 0)
                        return rc;
                    if (rc == NOROOM) {
                        nd = start;
                        goto done;
                    }
                }
                break;
            }
            if (slots > size)
                return fail(q, E_CHAIN_TOO_LONG, pos, size);
            rc = emit(q, m, b, &nd, &w, addr, len, flags & DESC_F_WRITE, i);
            if (rc < 0)
                return rc;
            if (rc == NOROOM) {
                nd = start;
                goto done;
            }
            if (!(flags & DESC_F_NEXT))
                break;
            i++;
            if (i == size)
                i = 0;
        }
        if (inflight + slots > size)
            return fail(q, E_INFLIGHT, (uint64_t)inflight + slots, size);
        end_chain(b, n, bid, slots, start, nd, &w); /* buffer id: from the last ring descriptor */
        inflight += slots;
        pos += slots;
        if (pos >= size) {
            pos -= size;
            wrap ^= 1;
        }
        n++;
    }
done:
    q->next_avail = (uint16_t)pos;
    q->avail_wrap = (uint8_t)wrap;
    q->inflight = inflight;
    b->ndescs = nd;
    return (int)n;
}

static void write_avail_event(struct vu_queue *q)
{
    if (q->layout == LAYOUT_PACKED) {
        st16(q->device_host, (uint16_t)(q->next_avail | (q->avail_wrap ? 0x8000u : 0)));
        qlog(q, q->device_gpa, 0, 2);
    } else {
        uint64_t off = 4 + 8 * (uint64_t)q->size;
        st16(q->device_host + off, q->next_avail);
        qlog(q, q->log_guest_addr, off, 2);
    }
}

int vu_queue_pop_batch(struct vu_queue *q, const struct vu_mem_table *m, uint32_t max_chains,
                       struct vu_chain_batch *b)
{
    int rc = not_ready(q);
    b->count = 0;
    b->ndescs = 0;
    if (rc)
        return rc;
    if (q->broken)
        return fail(q, E_BROKEN, q->broken, 0);
    if (b->desc_cap < q->size)
        return fail(q, E_BATCH_CAPACITY, b->desc_cap, q->size);
    if (max_chains > b->chain_cap)
        max_chains = b->chain_cap;
    if (q->layout == LAYOUT_PACKED)
        rc = pop_packed(q, m, max_chains, b);
    else
        rc = pop_split(q, m, max_chains, b);
    if (rc < 0) {
        b->ndescs = 0;
        return rc;
    }
    b->count = (uint32_t)rc;
    if (rc && q->event_idx && q->notify_enabled)
        write_avail_event(q);
    return rc;
}

int vu_queue_avail_pending(struct vu_queue *q, const struct vu_mem_table *m)
{
    (void)m;
    int rc = not_ready(q);
    if (rc)
        return rc;
    if (q->layout == LAYOUT_PACKED)
        return packed_available(q->desc_host, q->next_avail, q->avail_wrap);
    return (uint16_t)(ld16_acquire(q->driver_host + 2) - q->next_avail);
}

/* ---------------------------------------------------------------- used */
int vu_queue_add_used_batch(struct vu_queue *q, const struct vu_mem_table *m, const uint32_t *ids,
                            const uint32_t *lens, const uint32_t *slots, uint32_t n)
{
    (void)m;
    int rc = not_ready(q);
    if (rc)
        return rc;
    if (n == 0)
        return 0;
    const uint32_t size = q->size;
    if (q->layout == LAYOUT_PACKED) {
        uint64_t total = 0;
        for (uint32_t k = 0; k < n; k++) {
            uint32_t s = slots[k];
            if (s < 1 || s > size)
                return fail(q, E_USED_SLOTS, s, size);
            total += s;
        }
        if (total > q->inflight)
            return fail(q, E_USED_OVERFLOW, total, q->inflight);
        uint8_t *desc = q->desc_host;
        uint32_t pos = q->next_used, wrap = q->used_wrap;
        size_t first_off = 0;
        uint16_t first_flags = 0;
        for (uint32_t k = 0; k < n; k++) { /* total <= inflight <= size: pos stays in range */
            uint32_t ln = lens[k];
            uint16_t flags = (uint16_t)((wrap ? (DESC_F_AVAIL | DESC_F_USED) : 0) | (ln ? DESC_F_WRITE : 0));
            size_t off = (size_t)pos * DESC_SIZE;
            st32(desc + off + 8, ln);
            st16(desc + off + 12, (uint16_t)ids[k]);
            if (k == 0) {
                first_off = off;
                first_flags = flags;
            } else {
                st16(desc + off + 14, flags);
            }
            qlog(q, q->desc_gpa, off, DESC_SIZE);
            pos += slots[k];
            if (pos >= size) {
                pos -= size;
                wrap ^= 1;
            }
        }
        /* release: everything above before the first descriptor's flags */
        st16_release(desc + first_off + 14, first_flags);
        q->next_used = (uint16_t)pos;
        q->used_wrap = (uint8_t)wrap;
        q->num_added += total;
        q->inflight -= (uint32_t)total;
        return 0;
    }
    for (uint32_t k = 0; k < n; k++)
        if (ids[k] >= size)
            return fail(q, E_USED_ID, ids[k], size);
    if (n > q->inflight)
        return fail(q, E_USED_OVERFLOW, n, q->inflight);
    uint8_t *used = q->device_host;
    uint16_t nu = q->next_used;
    uint32_t mask = size - 1; /* split sizes are powers of two */
    for (uint32_t k = 0; k < n; k++) {
        size_t off = 4 + 8 * (size_t)((uint16_t)(nu + k) & mask);
        st32(used + off, ids[k]);
        st32(used + off + 4, lens[k]);
        qlog(q, q->log_guest_addr, off, 8);
    }
    nu = (uint16_t)(nu + n);
    st16_release(used + 2, nu); /* release: used elements before the index */
    qlog(q, q->log_guest_addr, 2, 2);
    q->next_used = nu;
    q->num_added += n;
    q->inflight -= n;
    return 0;
}

/* --------------------------------------------------------- notifications */
static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

int vu_queue_needs_notification(struct vu_queue *q, const struct vu_mem_table *m)
{
    (void)m;
    int rc = not_ready(q);
    if (rc)
        return rc;
    fence_full(); /* used writes before reading the driver's suppression state */
    uint64_t added = q->num_added;
    q->num_added = 0;
    if (added == 0)
        return 0;
    const uint32_t size = q->size;
    uint16_t new_idx = q->next_used;
    uint16_t old = (uint16_t)(new_idx - (uint16_t)added);
    if (q->layout == LAYOUT_PACKED) {
        uint16_t off_wrap = ld16(q->driver_host);
        uint16_t flags = ld16(q->driver_host + 2) & 3u;
        if (flags == EVENT_FLAGS_DISABLE)
            return 0;
        if (flags != EVENT_FLAGS_DESC || !q->event_idx || added >= size)
            return 1;
        uint16_t event = off_wrap & 0x7fffu;
        if ((uint32_t)(off_wrap >> 15) != q->used_wrap)
            event = (uint16_t)(event - size);
        return need_event(event, new_idx, old);
    }
    if (!q->event_idx)
        return !(ld16(q->driver_host) & AVAIL_F_NO_INTERRUPT);
    if (added >= size)
        return 1;
    uint16_t used_event = ld16(q->driver_host + 4 + 2 * (size_t)size);
    return need_event(used_event, new_idx, old);
}

int vu_queue_set_notification(struct vu_queue *q, const struct vu_mem_table *m, int enable)
{
    (void)m;
    int rc = not_ready(q);
    if (rc)
        return rc;
    q->notify_enabled = enable ? 1 : 0;
    if (q->layout == LAYOUT_PACKED) {
        uint16_t flags;
        if (enable) {
            if (q->event_idx) {
                write_avail_event(q);
                flags = EVENT_FLAGS_DESC;
            } else {
                flags = EVENT_FLAGS_ENABLE;
            }
        } else {
            flags = EVENT_FLAGS_DISABLE;
        }
        st16(q->device_host + 2, flags);
        qlog(q, q->device_gpa, 2, 2);
    } else if (q->event_idx) {
        if (enable)
            write_avail_event(q);
        /* disable with EVENT_IDX: nothing to write */
    } else {
        st16(q->device_host, (uint16_t)(enable ? 0 : USED_F_NO_NOTIFY));
        qlog(q, q->log_guest_addr, 0, 2);
    }
    if (!enable)
        return 0;
    fence_full(); /* the enable store before re-reading the driver's state */
    if (q->layout == LAYOUT_PACKED)
        return packed_available(q->desc_host, q->next_avail, q->avail_wrap);
    return ld16_acquire(q->driver_host + 2) != q->next_avail;
}

/* ------------------------------------------------------------ copy helpers */
int64_t vu_gather(const struct vu_mem_table *m, const uint64_t *addrs, const uint32_t *lens, uint32_t start,
                  uint32_t count, uint64_t skip, void *out_, uint64_t n)
{
    uint8_t *out = out_;
    uint64_t done = 0;
    for (uint64_t j = start; j < (uint64_t)start + count; j++) {
        uint64_t ln = lens[j];
        if (skip >= ln) {
            skip -= ln;
            continue;
        }
        uint64_t take = ln - skip;
        if (take > n)
            take = n;
        if (take && (skip > UINT64_MAX - addrs[j] || copy_guest(m, addrs[j] + skip, take, out + done, 0)))
            return -E_DESC_ADDRESS;
        done += take;
        n -= take;
        skip = 0;
        if (n == 0)
            break;
    }
    return (int64_t)done;
}

int64_t vu_scatter(const struct vu_mem_table *m, const uint64_t *addrs, const uint32_t *lens, uint32_t start,
                   uint32_t count, uint64_t skip, const char *data_, uint64_t n)
{
    const uint8_t *data = (const uint8_t *)data_;
    uint64_t pos = 0;
    for (uint64_t j = start; j < (uint64_t)start + count; j++) {
        if (pos >= n)
            break;
        uint64_t ln = lens[j];
        if (skip >= ln) {
            skip -= ln;
            continue;
        }
        uint64_t take = ln - skip;
        if (take > n - pos)
            take = n - pos;
        if (skip > UINT64_MAX - addrs[j] || copy_guest(m, addrs[j] + skip, take, (uint8_t *)(uintptr_t)(data + pos), 1))
            return -E_DESC_ADDRESS;
        pos += take;
        skip = 0;
    }
    return (int64_t)pos;
}
