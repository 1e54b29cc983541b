/*
 * libFuzzer harness for the C ring core (src/vhostuser/_native/ring.c, chainio.c).
 *
 * One input = one hostile front-end: a queue configuration, a guest-memory
 * image (rings, descriptors, indirect tables, data) and a script of device
 * operations interleaved with guest writes.  The three guest regions are
 * separate heap buffers of exactly their size, so AddressSanitizer reports any
 * access outside them; UBSan reports overflow, misaligned loads and shifts.
 * The harness itself asserts the core's own invariants (batch bounds, queue
 * state ranges) and aborts if one breaks.
 *
 * Input layout (little-endian; short inputs are zero-extended):
 *   [0]      flags: 1 packed, 2 EVENT_IDX, 4 dirty log, 8 avail_wrap,
 *                   16 used_wrap, 32 notify_enabled
 *   [1]      queue size (0..255; the core rejects bad sizes)
 *   [2..3]   next_avail      [4..5] next_used
 *   [6..7]   desc gpa        [8..9] driver gpa   [10..11] device gpa
 *   [12]     batch descriptor capacity, in multiples of the size (0..3 extra)
 *   [13]     number of operations n (each 4 bytes: kind, a, b, c)
 *   [14..]   the operations, then the guest-memory image (region 0, 1, 2)
 *
 * Build and run: fuzz/run (see docs/testing.md, "Coverage-guided fuzzing").
 *
 * SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ring.h"

#define HDR 14
#define NREG 3
/* region 1 is adjacent to region 0 (a buffer may span them); a hole follows it */
static const uint64_t REG_GPA[NREG] = {0x0, 0x2000, 0x4000};
static const uint64_t REG_SIZE[NREG] = {0x2000, 0x1000, 0x1000};
#define FILE_SIZE 0x3000

static int io_fd = -1;

#define CHECK(cond) \
    do {            \
        if (!(cond)) \
            abort(); \
    } while (0)

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

struct ctx {
    struct vu_queue q;
    struct vu_mem_table mem;
    struct vu_mem_region reg[NREG];
    struct vu_chain_batch b;
    uint32_t *ids, *lens, *slots, *ulens;
    int32_t *errs;
    uint8_t *log;
    uint64_t log_size;
};

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz);
    CHECK(p);
    return p;
}

static void batch_alloc(struct ctx *c, uint32_t size, uint32_t extra)
{
    uint32_t ccap = size ? size : 1;
    uint32_t dcap = ccap * (1 + extra);
    struct vu_chain_batch *b = &c->b;
    b->chain_cap = ccap;
    b->desc_cap = dcap;
    b->desc_alloc = dcap;
    b->head = xcalloc(ccap, 4);
    b->slots = xcalloc(ccap, 4);
    b->desc_start = xcalloc(ccap, 4);
    b->ndesc = xcalloc(ccap, 4);
    b->nread = xcalloc(ccap, 4);
    b->read_bytes = xcalloc(ccap, 8);
    b->write_bytes = xcalloc(ccap, 8);
    b->addr = xcalloc(dcap, 8);
    b->len = xcalloc(dcap, 4);
    b->flags = xcalloc(dcap, 2);
    c->ids = xcalloc(ccap, 4);
    c->lens = xcalloc(ccap, 4);
    c->slots = xcalloc(ccap, 4);
    c->ulens = xcalloc(ccap, 4);
    c->errs = xcalloc(ccap, 4);
}

static void batch_free(struct ctx *c)
{
    struct vu_chain_batch *b = &c->b;
    void *ps[] = {b->head, b->slots, b->desc_start, b->ndesc, b->nread, b->read_bytes, b->write_bytes,
                  b->addr, b->len, b->flags, c->ids, c->lens, c->slots, c->ulens, c->errs};
    for (size_t k = 0; k < sizeof ps / sizeof ps[0]; k++)
        free(ps[k]);
}

/* The batch a successful pop returned must stay inside its arrays and the guest. */
static void check_batch(const struct ctx *c, int n)
{
    const struct vu_chain_batch *b = &c->b;
    CHECK((uint32_t)n == b->count && b->count <= b->chain_cap && b->ndescs <= b->desc_alloc);
    uint32_t end = 0;
    for (uint32_t k = 0; k < b->count; k++) {
        CHECK(b->desc_start[k] == end);
        end += b->ndesc[k];
        CHECK(b->nread[k] <= b->ndesc[k]);
        uint64_t rd = 0, wr = 0;
        for (uint32_t j = b->desc_start[k]; j < end; j++) {
            CHECK(b->len[j] > 0 && vu_mem_in_memory(&c->mem, b->addr[j], b->len[j]));
            if (j - b->desc_start[k] < b->nread[k])
                rd += b->len[j];
            else
                wr += b->len[j];
        }
        CHECK(rd == b->read_bytes[k] && wr == b->write_bytes[k]);
    }
    CHECK(end == b->ndescs);
}

static void check_queue(const struct vu_queue *q)
{
    CHECK(q->inflight <= q->size);
    if (q->layout == 1 && q->size) {
        CHECK(q->next_avail < q->size && q->next_used < q->size);
    }
}

/* One device operation (kind % 10) with parameters a, b, c. */
static void run_op(struct ctx *c, uint8_t kind, uint8_t a, uint8_t pb, uint8_t pc, const uint8_t *data, size_t dlen)
{
    struct vu_queue *q = &c->q;
    struct vu_chain_batch *b = &c->b;
    int rc;
    switch (kind % 10) {
    case 0: /* pop */
        rc = vu_queue_pop_batch(q, &c->mem, (uint32_t)a + 1, b);
        if (rc >= 0)
            check_batch(c, rc);
        else
            b->count = 0;
        break;
    case 1: { /* complete the popped chains, with lens from the script */
        for (uint32_t k = 0; k < b->count; k++) {
            c->ids[k] = b->head[k];
            c->slots[k] = b->slots[k];
            c->lens[k] = (uint32_t)a * 64 + k;
        }
        uint32_t n = b->count;
        if (pb & 1 && n) /* misuse: complete fewer than popped */
            n--;
        rc = vu_queue_add_used_batch(q, &c->mem, c->ids, c->lens, c->slots, n);
        (void)rc;
        b->count = 0;
        break;
    }
    case 2: { /* misuse: complete ids and slot counts the device never popped */
        uint32_t n = (uint32_t)(pc % 4) + 1;
        if (n > b->chain_cap)
            n = b->chain_cap;
        for (uint32_t k = 0; k < n; k++) {
            c->ids[k] = (uint32_t)a + k;
            c->slots[k] = (uint32_t)(pb % 5);
            c->lens[k] = (uint32_t)pb << 24 | a;
        }
        vu_queue_add_used_batch(q, &c->mem, c->ids, c->lens, c->slots, n);
        break;
    }
    case 3:
        rc = vu_queue_needs_notification(q, &c->mem);
        CHECK(rc < 0 || rc <= 1);
        break;
    case 4:
        vu_queue_set_notification(q, &c->mem, a & 1);
        break;
    case 5:
        vu_queue_avail_pending(q, &c->mem);
        vu_queue_poll(q, &c->mem, 0);
        break;
    case 6: { /* copies through the popped descriptors */
        if (!b->count)
            break;
        uint32_t k = a % b->count;
        uint32_t start = b->desc_start[k], count = b->ndesc[k];
        uint64_t n = (uint64_t)pb * 37, skip = (uint64_t)pc * 29;
        uint8_t *buf = xcalloc(n, 1);
        int64_t got = vu_gather(&c->mem, b->addr, b->len, start, count, skip, buf, n);
        CHECK(got <= (int64_t)n);
        got = vu_scatter(&c->mem, b->addr, b->len, start, count, skip, (const char *)buf, n);
        CHECK(got <= (int64_t)n);
        free(buf);
        break;
    }
    case 7: { /* chain heads and the dirty-log marking of a completion */
        if (!b->count)
            break;
        uint32_t first = a % b->count, n = b->count - first, hlen = pb % 48;
        uint8_t *out = xcalloc((size_t)n * hlen, 1);
        rc = vu_chain_heads(&c->mem, b, first, n, hlen, out);
        CHECK(rc == 0);
        for (uint32_t k = 0; k < n; k++)
            c->ulens[k] = (uint32_t)pc * 97 * (k + 1);
        if (c->log)
            vu_log_written(c->log, c->log_size, b->addr, b->len, b->desc_start, b->nread, b->ndesc, first, n, c->ulens);
        vu_chain_heads(&c->mem, b, b->count, 1, hlen, out); /* out of range: refused */
        free(out);
        break;
    }
    case 8: { /* batch I/O against a file, completing (or not) through the queue */
        if (!b->count || io_fd < 0)
            break;
        uint32_t n = b->count;
        uint8_t ops[256];
        uint64_t offs[256];
        for (uint32_t k = 0; k < n; k++) {
            ops[k] = (uint8_t)((a >> (k % 4)) % 3);
            offs[k] = ((uint64_t)pb * 512 + (uint64_t)k * 4096) % (FILE_SIZE + 0x1000);
        }
        rc = vu_chain_io((pc & 1) ? q : NULL, &c->mem, b, 0, n, io_fd, ops, offs, pc % 32, (pc >> 5) & 1, 0, 1,
                         c->lens, c->errs, pc >> 6, -1);
        (void)rc;
        if (pc & 1)
            b->count = 0;
        break;
    }
    case 9: { /* the guest writes a ring or buffer behind the device's back */
        if (!dlen)
            break;
        uint64_t gpa = ((uint64_t)pb << 8 | a) % 0x5000;
        for (int r = 0; r < NREG; r++) {
            if (gpa >= REG_GPA[r] && gpa < REG_GPA[r] + REG_SIZE[r]) {
                uint64_t room = REG_GPA[r] + REG_SIZE[r] - gpa, n = (uint64_t)(pc % 16) + 1;
                if (n > room)
                    n = room;
                if (n > dlen)
                    n = dlen;
                memcpy(c->reg[r].host + (gpa - REG_GPA[r]), data, n);
            }
        }
        break;
    }
    }
    check_queue(q);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    io_fd = memfd_create("ring-fuzz-file", 0);
    if (io_fd >= 0 && ftruncate(io_fd, FILE_SIZE) != 0) {
        close(io_fd);
        io_fd = -1;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t hdr[HDR] = {0};
    memcpy(hdr, data, size < HDR ? size : HDR);
    size_t nops = hdr[13], ops_len = nops * 4, pos = size < HDR ? size : HDR;
    const uint8_t *ops = data + pos;
    if (ops_len > size - pos)
        ops_len = (size - pos) / 4 * 4;
    pos += ops_len;

    struct ctx c;
    memset(&c, 0, sizeof c);
    for (int r = 0; r < NREG; r++) {
        c.reg[r].gpa = REG_GPA[r];
        c.reg[r].size = REG_SIZE[r];
        c.reg[r].host = xcalloc(REG_SIZE[r], 1);
        c.reg[r].uva = (uint64_t)(uintptr_t)c.reg[r].host;
        size_t n = size - pos < REG_SIZE[r] ? size - pos : REG_SIZE[r];
        memcpy(c.reg[r].host, data + pos, n);
        pos += n;
    }
    c.mem.n = NREG;
    c.mem.r = c.reg;

    struct vu_queue *q = &c.q;
    vu_queue_reset(q);
    q->layout = hdr[0] & 1;
    q->event_idx = (hdr[0] >> 1) & 1;
    q->avail_wrap = (hdr[0] >> 3) & 1;
    q->used_wrap = (hdr[0] >> 4) & 1;
    q->notify_enabled = (hdr[0] >> 5) & 1;
    q->size = hdr[1];
    q->next_avail = get16(hdr + 2);
    q->next_used = get16(hdr + 4);
    q->desc_gpa = get16(hdr + 6);
    q->driver_gpa = get16(hdr + 8);
    q->device_gpa = get16(hdr + 10);
    q->ready = 1;
    if (hdr[0] & 4) {
        /* 1 byte covers pages 0..7 (0x8000): all of guest memory; 0 bytes: none of it */
        c.log_size = (hdr[12] >> 2) & 1;
        c.log = xcalloc(1, 1);
        q->log = c.log;
        q->log_size = c.log_size;
        q->log_used = 1;
        q->log_guest_addr = q->device_gpa;
    }
    batch_alloc(&c, q->size, hdr[12] & 3);
    if (vu_queue_configure(q, &c.mem) == 0) {
        for (size_t k = 0; k + 4 <= ops_len; k += 4)
            run_op(&c, ops[k], ops[k + 1], ops[k + 2], ops[k + 3], ops + k + 4, ops_len - k - 4);
    }
    batch_free(&c);
    free(c.log);
    for (int r = 0; r < NREG; r++)
        free(c.reg[r].host);
    return 0;
}
