/*
 * vhostuser native core: surviving SIGBUS in guest memory.
 *
 * A front-end may shrink the file behind guest memory (or the dirty log) after
 * we mapped it; the next access to the missing part raises SIGBUS.  The
 * vu_safe_* functions are the ring.h entry points run under a per-thread
 * recovery point: a SIGBUS at an address inside a registered guest mapping,
 * raised while this thread is inside a vu_safe_* call, jumps back out of it and
 * the call returns -VU_E_GUEST_FAULT (25) with err_a = the faulting address
 * (and, for queue functions, the queue marked broken).  Any other SIGBUS goes
 * to the handler that was installed before ours (or the default action).
 * Contract: docs/robustness.md.
 *
 * SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 */
#ifndef VHOSTUSER_GUARD_H
#define VHOSTUSER_GUARD_H

#include "ring.h"

/* CDEF-BEGIN */
/* Install the SIGBUS handler (again, if someone replaced it); 0 or -errno. */
int vu_guard_install(void);
/* Register / forget a mapping whose faults are recoverable; 0, or -1 if the
   table is full (the mapping is then not guarded). */
int vu_guard_add_range(uint8_t *start, uint64_t size);
void vu_guard_remove_range(uint8_t *start);
/* How many faults were recovered so far (diagnostics, tests). */
uint64_t vu_guard_faults(void);

int vu_safe_queue_configure(struct vu_queue *q, const struct vu_mem_table *mem);
int vu_safe_queue_pop_batch(struct vu_queue *q, const struct vu_mem_table *mem, uint32_t max_chains,
                            struct vu_chain_batch *b);
int vu_safe_queue_add_used_batch(struct vu_queue *q, const struct vu_mem_table *mem, const uint32_t *ids,
                                 const uint32_t *lens, const uint32_t *slots, uint32_t n);
int vu_safe_queue_needs_notification(struct vu_queue *q, const struct vu_mem_table *mem);
int vu_safe_queue_set_notification(struct vu_queue *q, const struct vu_mem_table *mem, int enable);
int vu_safe_queue_avail_pending(struct vu_queue *q, const struct vu_mem_table *mem);
int64_t vu_safe_gather(const struct vu_mem_table *mem, const uint64_t *addrs, const uint32_t *lens,
                       uint32_t start, uint32_t count, uint64_t skip, void *out, uint64_t n, uint64_t *fault);
int64_t vu_safe_scatter(const struct vu_mem_table *mem, const uint64_t *addrs, const uint32_t *lens,
                        uint32_t start, uint32_t count, uint64_t skip, const char *data, uint64_t n,
                        uint64_t *fault);
int vu_safe_log_mark(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len, uint64_t *fault);
/* vu_log_written's page count, or -25 after a fault */
int64_t vu_safe_log_written(uint8_t *log, uint64_t log_size, const uint64_t *addrs, const uint32_t *lens,
                            const uint32_t *desc_start, const uint32_t *nread, const uint32_t *ndesc,
                            uint32_t first, uint32_t count, const uint32_t *used_lens, uint64_t *fault);
int vu_safe_chain_io(struct vu_queue *q, const struct vu_mem_table *mem, const struct vu_chain_batch *b,
                     uint32_t first, uint32_t n, int fd, const uint8_t *ops, const uint64_t *offsets, uint32_t skip,
                     uint32_t tail, uint8_t ok, uint8_t err, uint32_t *lens, int32_t *errs, uint32_t every,
                     int call_fd);
int vu_safe_chain_heads(const struct vu_mem_table *mem, const struct vu_chain_batch *b, uint32_t first, uint32_t n,
                        uint32_t hlen, uint8_t *out, uint64_t *fault);
int vu_safe_queue_poll(struct vu_queue *q, const struct vu_mem_table *mem, uint64_t ns);
/* CDEF-END */

#endif
