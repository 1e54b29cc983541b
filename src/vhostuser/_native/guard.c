/*
 * SIGBUS recovery for guest-memory accesses (see guard.h, docs/robustness.md).
 *
 * Each thread has a stack of recovery points (one per nested vu_safe_* call).
 * The handler claims a fault only if the thread is inside a guarded call and
 * the address lies in a registered mapping; it then siglongjmps to the
 * innermost recovery point.  The handler is installed with SA_NODEFER, so
 * leaving it by siglongjmp does not leave SIGBUS blocked (and the recovery
 * point need not save the signal mask: no system call per guarded call).
 *
 * SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 */
#define _GNU_SOURCE
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>

#include "guard.h"

#define VU_E_GUEST_FAULT 25
#define VU_GUARD_SLOTS 4096

struct vu_recovery {
    sigjmp_buf jb;
    struct vu_recovery *prev;
    uintptr_t fault;
};

static _Thread_local struct vu_recovery *volatile vu_top;

/* registered mappings: start == 0 marks a free slot */
static _Atomic uintptr_t vu_range_start[VU_GUARD_SLOTS];
static _Atomic uintptr_t vu_range_end[VU_GUARD_SLOTS];
static _Atomic uint64_t vu_fault_count;

static struct sigaction vu_prev;
static volatile sig_atomic_t vu_installed;

static int vu_claims(uintptr_t addr)
{
    for (int i = 0; i < VU_GUARD_SLOTS; i++) {
        uintptr_t s = atomic_load_explicit(&vu_range_start[i], memory_order_acquire);
        if (s && addr >= s && addr < atomic_load_explicit(&vu_range_end[i], memory_order_acquire))
            return 1;
    }
    return 0;
}

static void vu_sigbus(int sig, siginfo_t *si, void *uc)
{
    struct vu_recovery *r = vu_top;
    if (r && vu_claims((uintptr_t)si->si_addr)) {
        r->fault = (uintptr_t)si->si_addr;
        atomic_fetch_add_explicit(&vu_fault_count, 1, memory_order_relaxed);
        siglongjmp(r->jb, 1);
    }
    /* not ours: chain */
    if (vu_prev.sa_flags & SA_SIGINFO) {
        vu_prev.sa_sigaction(sig, si, uc);
        return;
    }
    if (vu_prev.sa_handler == SIG_DFL || vu_prev.sa_handler == SIG_IGN) {
        /* back to the default action; returning re-runs the faulting access */
        signal(sig, SIG_DFL);
        return;
    }
    vu_prev.sa_handler(sig);
}

int vu_guard_install(void)
{
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0)
        return -errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == vu_sigbus)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = vu_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    vu_prev = cur; /* whoever replaced us is now the one we chain to */
    if (sigaction(SIGBUS, &sa, NULL) != 0)
        return -errno;
    vu_installed = 1;
    return 0;
}

int vu_guard_add_range(uint8_t *start, uint64_t size)
{
    uintptr_t s = (uintptr_t)start;
    if (!s || !size)
        return -1;
    for (int i = 0; i < VU_GUARD_SLOTS; i++) {
        uintptr_t expected = 0;
        atomic_store_explicit(&vu_range_end[i], s + size, memory_order_relaxed);
        if (atomic_load_explicit(&vu_range_start[i], memory_order_relaxed) == 0 &&
            atomic_compare_exchange_strong(&vu_range_start[i], &expected, s))
            return 0;
    }
    return -1;
}

void vu_guard_remove_range(uint8_t *start)
{
    uintptr_t s = (uintptr_t)start;
    for (int i = 0; i < VU_GUARD_SLOTS; i++) {
        uintptr_t expected = s;
        if (atomic_compare_exchange_strong(&vu_range_start[i], &expected, 0))
            return;
    }
}

uint64_t vu_guard_faults(void)
{
    return atomic_load(&vu_fault_count);
}

/*
 * VU_GUARDED(type, on_fault, call): run `call` under a recovery point; after a
 * claimed fault run `on_fault` (with `fault_` the address) and return
 * -VU_E_GUEST_FAULT.  Wraps entry points without touching their bodies.
 */
#define VU_GUARDED(type, on_fault, call)                                   \
    do {                                                                   \
        struct vu_recovery rec_;                                           \
        rec_.prev = vu_top;                                                \
        rec_.fault = 0;                                                    \
        if (sigsetjmp(rec_.jb, 0)) {                                       \
            uint64_t fault_ = rec_.fault;                                  \
            vu_top = rec_.prev;                                            \
            on_fault;                                                      \
            (void)fault_;                                                  \
            return (type)-VU_E_GUEST_FAULT;                                \
        }                                                                  \
        vu_top = &rec_;                                                    \
        type ret_ = (call);                                                \
        vu_top = rec_.prev;                                                \
        return ret_;                                                       \
    } while (0)

#define VU_QUEUE_FAULT (q->broken = VU_E_GUEST_FAULT, q->err_a = fault_, q->err_b = 0)
#define VU_OUT_FAULT (*fault = fault_)

int vu_safe_queue_configure(struct vu_queue *q, const struct vu_mem_table *mem)
{
    VU_GUARDED(int, VU_QUEUE_FAULT, vu_queue_configure(q, mem));
}

int vu_safe_queue_pop_batch(struct vu_queue *q, const struct vu_mem_table *mem, uint32_t max_chains,
                            struct vu_chain_batch *b)
{
    VU_GUARDED(int, VU_QUEUE_FAULT, vu_queue_pop_batch(q, mem, max_chains, b));
}

int vu_safe_queue_add_used_batch(struct vu_queue *q, const struct vu_mem_table *mem, const uint32_t *ids,
                                 const uint32_t *lens, const uint32_t *slots, uint32_t n)
{
    VU_GUARDED(int, VU_QUEUE_FAULT, vu_queue_add_used_batch(q, mem, ids, lens, slots, n));
}

int vu_safe_queue_needs_notification(struct vu_queue *q, const struct vu_mem_table *mem)
{
    VU_GUARDED(int, VU_QUEUE_FAULT, vu_queue_needs_notification(q, mem));
}

int vu_safe_queue_set_notification(struct vu_queue *q, const struct vu_mem_table *mem, int enable)
{
    VU_GUARDED(int, VU_QUEUE_FAULT, vu_queue_set_notification(q, mem, enable));
}

int vu_safe_queue_avail_pending(struct vu_queue *q, const struct vu_mem_table *mem)
{
    VU_GUARDED(int, VU_QUEUE_FAULT, vu_queue_avail_pending(q, mem));
}

int64_t vu_safe_gather(const struct vu_mem_table *mem, const uint64_t *addrs, const uint32_t *lens,
                       uint32_t start, uint32_t count, uint64_t skip, void *out, uint64_t n, uint64_t *fault)
{
    VU_GUARDED(int64_t, VU_OUT_FAULT, vu_gather(mem, addrs, lens, start, count, skip, out, n));
}

int64_t vu_safe_scatter(const struct vu_mem_table *mem, const uint64_t *addrs, const uint32_t *lens,
                        uint32_t start, uint32_t count, uint64_t skip, const char *data, uint64_t n,
                        uint64_t *fault)
{
    VU_GUARDED(int64_t, VU_OUT_FAULT, vu_scatter(mem, addrs, lens, start, count, skip, data, n));
}

static int vu_log_mark_rc(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len)
{
    vu_log_mark(log, log_size, gpa, len);
    return 0;
}

int vu_safe_log_mark(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len, uint64_t *fault)
{
    VU_GUARDED(int, VU_OUT_FAULT, vu_log_mark_rc(log, log_size, gpa, len));
}

int64_t vu_safe_log_written(uint8_t *log, uint64_t log_size, const uint64_t *addrs, const uint32_t *lens,
                            const uint32_t *desc_start, const uint32_t *nread, const uint32_t *ndesc,
                            uint32_t first, uint32_t count, const uint32_t *used_lens, uint64_t *fault)
{
    VU_GUARDED(int64_t, VU_OUT_FAULT,
               (int64_t)vu_log_written(log, log_size, addrs, lens, desc_start, nread, ndesc, first, count,
                                       used_lens));
}

#define VU_MAYBE_QUEUE_FAULT do { if (q) VU_QUEUE_FAULT; } while (0)

int vu_safe_chain_io(struct vu_queue *q, const struct vu_mem_table *mem, const struct vu_chain_batch *b,
                     uint32_t first, uint32_t n, int fd, const uint8_t *ops, const uint64_t *offsets, uint32_t skip,
                     uint32_t tail, uint8_t ok, uint8_t err, uint32_t *lens, int32_t *errs, uint32_t every,
                     int call_fd)
{
    VU_GUARDED(int, VU_MAYBE_QUEUE_FAULT,
               vu_chain_io(q, mem, b, first, n, fd, ops, offsets, skip, tail, ok, err, lens, errs, every,
                           call_fd));
}

int vu_safe_chain_heads(const struct vu_mem_table *mem, const struct vu_chain_batch *b, uint32_t first, uint32_t n,
                        uint32_t hlen, uint8_t *out, uint64_t *fault)
{
    VU_GUARDED(int, VU_OUT_FAULT, vu_chain_heads(mem, b, first, n, hlen, out));
}

int vu_safe_queue_poll(struct vu_queue *q, const struct vu_mem_table *mem, uint64_t ns)
{
    VU_GUARDED(int, VU_QUEUE_FAULT, vu_queue_poll(q, mem, ns));
}
