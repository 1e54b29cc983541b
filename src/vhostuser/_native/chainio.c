/*
 * vhostuser native batch I/O: file I/O straight between an fd and the data
 * segments of many popped chains, then the per-chain status byte, the dirty
 * log and the used entries.  Generic (no device knowledge): the caller decides
 * per chain what to do and at which file offset (docs/ring-core.md, "chain_io").
 * Python twin: virtqueue/_pycore.py chain_io / chain_heads.
 *
 * Called by cffi with the GIL released.
 *
 * SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 */
#define _DEFAULT_SOURCE
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "ring.h"

#define IO_NONE 0
#define IO_READ 1  /* file -> the chain's writable bytes [0, write_bytes - tail) */
#define IO_WRITE 2 /* the chain's readable bytes [skip, read_bytes) -> file */
#define MAX_IOV 1024

/* Append the host pieces of [gpa, gpa+len) to iov (adjacent regions allowed).
   Returns the new count, or -1 if not guest memory or more than MAX_IOV pieces. */
static int add_iov(const struct vu_mem_table *m, uint64_t gpa, uint64_t len, struct iovec *iov, int cnt)
{
    if (len == 0)
        return cnt;
    if (!vu_mem_in_memory(m, gpa, len))
        return -1;
    while (len) {
        int64_t i = vu_mem_region_index(m, gpa);
        const struct vu_mem_region *r = &m->r[i];
        uint64_t off = gpa - r->gpa;
        uint64_t take = r->size - off;
        if (take > len)
            take = len;
        if (cnt >= MAX_IOV)
            return -1;
        iov[cnt].iov_base = r->host + off;
        iov[cnt].iov_len = (size_t)take;
        cnt++;
        gpa += take;
        len -= take;
    }
    return cnt;
}

/* The iovec of `want` bytes of descriptors [d0, d1) after skipping `skip`. */
static int build_iov(const struct vu_mem_table *m, const struct vu_chain_batch *b, uint32_t d0, uint32_t d1,
                     uint64_t skip, uint64_t want, struct iovec *iov)
{
    int cnt = 0;
    for (uint32_t j = d0; j < d1 && want; j++) {
        uint64_t len = b->len[j];
        if (skip >= len) {
            skip -= len;
            continue;
        }
        uint64_t take = len - skip;
        if (take > want)
            take = want;
        cnt = add_iov(m, b->addr[j] + skip, take, iov, cnt);
        if (cnt < 0)
            return -1;
        skip = 0;
        want -= take;
    }
    return want ? -1 : cnt;
}

/* preadv/pwritev the whole iovec at `off`, retrying short transfers; 0 or errno. */
static int transfer(int fd, int write_op, struct iovec *iov, int cnt, uint64_t off)
{
    while (cnt > 0) {
        ssize_t got = write_op ? pwritev(fd, iov, cnt, (off_t)off) : preadv(fd, iov, cnt, (off_t)off);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return errno ? errno : EIO;
        }
        if (got == 0)
            return write_op ? EIO : ENODATA; /* end of file */
        off += (uint64_t)got;
        while (cnt > 0 && (size_t)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    return 0;
}

/* Host address of the chain's last writable byte, or NULL. */
static uint8_t *last_writable(const struct vu_mem_table *m, const struct vu_chain_batch *b, uint32_t d0,
                              uint32_t d1)
{
    for (uint32_t j = d1; j > d0; j--)
        if (b->len[j - 1])
            return vu_mem_region_ptr(m, b->addr[j - 1] + b->len[j - 1] - 1, 1);
    return NULL;
}

/* Mark the first `len` writable bytes of descriptors [d0, d1) in q's dirty log. */
static void log_written(const struct vu_queue *q, const struct vu_chain_batch *b, uint32_t d0, uint32_t d1,
                        uint64_t len)
{
    for (uint32_t j = d0; j < d1 && len; j++) {
        uint64_t take = b->len[j] < len ? b->len[j] : len;
        vu_log_mark(q->log, q->log_size, b->addr[j], take);
        len -= take;
    }
}

static int one_chain(const struct vu_mem_table *m, const struct vu_chain_batch *b, uint32_t i, int fd,
                     uint8_t op, uint64_t off, uint32_t skip, uint32_t tail, uint8_t ok, uint8_t err,
                     uint32_t *len_out)
{
    struct iovec iov[MAX_IOV];
    uint32_t d0 = b->desc_start[i], dw = d0 + b->nread[i], d1 = d0 + b->ndesc[i];
    uint64_t wbytes = b->write_bytes[i], rbytes = b->read_bytes[i];
    uint8_t *status = last_writable(m, b, dw, d1);
    if (wbytes < tail || wbytes > UINT32_MAX || (tail && !status)) {
        *len_out = 0;
        return EINVAL; /* no room for the status: nothing done, used length 0 */
    }
    *len_out = (uint32_t)wbytes;
    int rc, cnt;
    if (op == IO_READ)
        cnt = build_iov(m, b, dw, d1, 0, wbytes - tail, iov);
    else
        cnt = rbytes < skip ? -1 : build_iov(m, b, d0, dw, skip, rbytes - skip, iov);
    rc = cnt < 0 ? EFAULT : transfer(fd, op == IO_WRITE, iov, cnt, off);
    if (tail)
        *status = rc ? err : ok;
    if (rc)
        *len_out = tail; /* a failed request reports its status byte only */
    return rc;
}

static int publish(struct vu_queue *q, const struct vu_mem_table *m, const struct vu_chain_batch *b, uint32_t from,
                   uint32_t n, const uint32_t *lens, int call_fd, int *notified)
{
    if (q->log && q->log_size)
        for (uint32_t k = 0; k < n; k++) {
            uint32_t i = from + k, d0 = b->desc_start[i];
            log_written(q, b, d0 + b->nread[i], d0 + b->ndesc[i], lens[k]);
        }
    int rc = vu_queue_add_used_batch(q, m, b->head + from, lens, b->slots + from, n);
    if (rc < 0)
        return rc;
    if (call_fd >= 0 && vu_queue_needs_notification(q, m) == 1) {
        uint64_t one = 1;
        ssize_t w;
        do
            w = write(call_fd, &one, sizeof(one));
        while (w < 0 && errno == EINTR);
        ++*notified; /* EAGAIN: a signal is pending already */
    }
    return 0;
}

int vu_chain_io(struct vu_queue *q, const struct vu_mem_table *m, const struct vu_chain_batch *b, uint32_t first,
                uint32_t n, int fd, const uint8_t *ops, const uint64_t *offsets, uint32_t skip, uint32_t tail,
                uint8_t ok, uint8_t err, uint32_t *lens, int32_t *errs, uint32_t every, int call_fd)
{
    if ((uint64_t)first + n > b->count)
        return -1;
    int notified = 0;
    uint32_t done = 0;
    if (every == 0)
        every = n ? n : 1;
    for (uint32_t k = 0; k < n; k++) {
        uint8_t op = ops[k];
        errs[k] = 0;
        if (op == IO_READ || op == IO_WRITE)
            errs[k] = one_chain(m, b, first + k, fd, op, offsets[k], skip, tail, ok, err, &lens[k]);
        else if (op != IO_NONE)
            errs[k] = EINVAL;
        if (q && k + 1 - done >= every) {
            int rc = publish(q, m, b, first + done, k + 1 - done, lens + done, call_fd, &notified);
            if (rc < 0)
                return rc;
            done = k + 1;
        }
    }
    if (q && done < n) {
        int rc = publish(q, m, b, first + done, n - done, lens + done, call_fd, &notified);
        if (rc < 0)
            return rc;
    }
    return notified;
}

int vu_chain_heads(const struct vu_mem_table *m, const struct vu_chain_batch *b, uint32_t first, uint32_t n,
                   uint32_t hlen, uint8_t *out)
{
    if ((uint64_t)first + n > b->count)
        return -1;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = first + k;
        uint8_t *dst = out + (size_t)k * hlen;
        uint64_t want = b->read_bytes[i] < hlen ? b->read_bytes[i] : hlen;
        int64_t got = vu_gather(m, b->addr, b->len, b->desc_start[i], b->nread[i], 0, dst, want);
        if (got < 0)
            got = 0;
        memset(dst + got, 0, (size_t)(hlen - (uint64_t)got));
    }
    return 0;
}

/* Busy-poll the avail ring for up to ns nanoseconds (GIL released by cffi):
   1 as soon as vu_queue_avail_pending says buffers are there, 0 at the end of
   the window, or its -ErrorCode. */
int vu_queue_poll(struct vu_queue *q, const struct vu_mem_table *m, uint64_t ns)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int rc = vu_queue_avail_pending(q, m);
        if (rc != 0)
            return rc > 0 ? 1 : rc;
        clock_gettime(CLOCK_MONOTONIC, &t);
        uint64_t el = (uint64_t)(t.tv_sec - t0.tv_sec) * 1000000000u + (uint64_t)t.tv_nsec - (uint64_t)t0.tv_nsec;
        if (el >= ns)
            return 0;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
}
