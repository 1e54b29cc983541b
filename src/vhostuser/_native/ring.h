/*
 * vhostuser native hot path: declarations.
 *
 * The C twin of src/vhostuser/virtqueue/_pycore.py (contract: docs/ring-core.md).
 * The C side holds no policy: every function returns >= 0 on success or
 * -ErrorCode (virtqueue/errcodes.py) with the two details in q->err_a/err_b;
 * Python turns that into the exception.  No Python callbacks, no allocation.
 *
 * Everything between the CDEF markers is parsed by cffi (build_native.py), so
 * it must stay in the subset of C that cffi's cdef understands (no macros with
 * expressions, no inline functions, one declarator per line).
 *
 * SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 */
#ifndef VHOSTUSER_RING_H
#define VHOSTUSER_RING_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
/* ABI version of this extension; the Python side checks it at import. */
int vu_native_abi_version(void);

/* One guest memory region: [gpa, gpa+size) is mapped at host. */
struct vu_mem_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uva;
    uint8_t *host;
};

/* A GuestMemory snapshot: n regions sorted by gpa, not overlapping. */
struct vu_mem_table {
    uint32_t n;
    const struct vu_mem_region *r;
};

/* Per-queue state (field names as _pycore.QueueState). */
struct vu_queue {
    uint64_t desc_gpa;
    uint64_t driver_gpa;
    uint64_t device_gpa;
    uint64_t log_guest_addr;
    uint64_t err_a;
    uint64_t err_b;
    uint64_t num_added;
    /* dirty log bitmap (NULL: none) and its size in bytes */
    uint8_t *log;
    uint64_t log_size;
    /* resolved by vu_queue_configure (NULL when not configured) */
    uint8_t *desc_host;
    uint8_t *driver_host;
    uint8_t *device_host;
    uint32_t size;
    uint32_t inflight;
    uint32_t broken;
    /* what the areas were resolved for: the functions refuse (NOT_READY) a
       state changed behind configure's back, so no access leaves the areas */
    uint32_t cfg_size;
    uint16_t next_avail;
    uint16_t next_used;
    uint8_t layout;
    uint8_t ready;
    uint8_t event_idx;
    uint8_t avail_wrap;
    uint8_t used_wrap;
    uint8_t notify_enabled;
    uint8_t log_used;
    uint8_t cfg_layout;
    uint8_t cfg_event_idx;
};

/* Output of vu_queue_pop_batch: per chain i < count, per descriptor j < ndescs. */
struct vu_chain_batch {
    uint32_t count;
    uint32_t chain_cap;     /* capacity of the per-chain arrays */
    uint32_t desc_cap;      /* descriptor limit of the batch (contract: >= size) */
    uint32_t desc_alloc;    /* real length of addr/len/flags (the C never writes beyond) */
    uint32_t ndescs;        /* descriptors filled */
    uint32_t *head;         /* split: head index; packed: buffer id */
    uint32_t *slots;        /* ring descriptors used: split 1, packed n */
    uint32_t *desc_start;
    uint32_t *ndesc;
    uint32_t *nread;        /* readable descriptors come first */
    uint64_t *read_bytes;
    uint64_t *write_bytes;
    uint64_t *addr;
    uint32_t *len;
    uint16_t *flags;        /* VIRTQ_DESC_F_WRITE or 0 */
};

/* Power-on state (everything 0 but avail_wrap = used_wrap = notify_enabled = 1). */
void vu_queue_reset(struct vu_queue *q);
int vu_queue_configure(struct vu_queue *q, const struct vu_mem_table *mem);
int vu_queue_pop_batch(struct vu_queue *q, const struct vu_mem_table *mem, uint32_t max_chains,
                       struct vu_chain_batch *b);
int vu_queue_add_used_batch(struct vu_queue *q, const struct vu_mem_table *mem, const uint32_t *ids,
                            const uint32_t *lens, const uint32_t *slots, uint32_t n);
int vu_queue_needs_notification(struct vu_queue *q, const struct vu_mem_table *mem);
int vu_queue_set_notification(struct vu_queue *q, const struct vu_mem_table *mem, int enable);
int vu_queue_avail_pending(struct vu_queue *q, const struct vu_mem_table *mem);

/* Copies between the buffers addrs[start..start+count)/lens[...] (after skipping
   `skip` bytes of them) and a flat host buffer.  Return the bytes copied, or
   -10 (DESC_ADDRESS) if a piece to copy is not guest memory: pieces before it
   are copied, exactly as the Python core would have done before raising.
   (data is a char pointer so that cffi passes a bytes object without a copy.) */
int64_t vu_gather(const struct vu_mem_table *mem, const uint64_t *addrs, const uint32_t *lens,
                  uint32_t start, uint32_t count, uint64_t skip, void *out, uint64_t n);
int64_t vu_scatter(const struct vu_mem_table *mem, const uint64_t *addrs, const uint32_t *lens,
                   uint32_t start, uint32_t count, uint64_t skip, const char *data, uint64_t n);

/* Mark the pages of [gpa, gpa+len) in a dirty bitmap of log_size bytes (atomic OR;
   pages beyond the bitmap are ignored). */
void vu_log_mark(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len);
/* For chains first..first+count-1 of a popped batch (its per-descriptor addrs/lens
   and per-chain desc_start/nread/ndesc arrays): mark the pages of the first
   used_lens[k] bytes of chain first+k's device-writable buffers (what add_used
   reports written).  Returns the pages marked. */
uint64_t vu_log_written(uint8_t *log, uint64_t log_size, const uint64_t *addrs, const uint32_t *lens,
                        const uint32_t *desc_start, const uint32_t *nread, const uint32_t *ndesc,
                        uint32_t first, uint32_t count, const uint32_t *used_lens);

/* Host address of [gpa, gpa+len) if it lies inside ONE region, else NULL. */
uint8_t *vu_mem_region_ptr(const struct vu_mem_table *mem, uint64_t gpa, uint64_t len);
/* 1 if every byte of [gpa, gpa+len) is guest memory (adjacent regions allowed). */
int vu_mem_in_memory(const struct vu_mem_table *mem, uint64_t gpa, uint64_t len);

/* Batch I/O (chainio.c), for chains first..first+n-1 of a popped batch b.
   vu_chain_io: per chain k, ops[k] 0 = nothing (lens[k] is the caller's),
   1 = preadv at offsets[k] into the writable bytes [0, write_bytes - tail),
   2 = pwritev of the readable bytes [skip, read_bytes) at offsets[k]; then the
   chain's last writable byte (if tail) becomes `ok` or `err`, lens[k] = its
   writable bytes (`tail` after a failure: only the status was written) and errs[k] = 0 or an errno (EINVAL: no room for the status,
   nothing done, lens[k] = 0; EFAULT: a segment is not guest memory).
   With q (else NULL): the first lens[k] writable bytes of each chain are marked
   in q's dirty log and the used entries published every `every` chains (0: once),
   each publish followed by an 8-byte write to call_fd (-1: none) when
   vu_queue_needs_notification says so.  Returns the notifications sent, or
   -ErrorCode from the publish (-1: first + n beyond the batch).
   vu_chain_heads: the first hlen readable bytes of each chain into out[k*hlen]
   (zero-filled when shorter).  0, or -1: first + n beyond the batch. */
int vu_chain_io(struct vu_queue *q, const struct vu_mem_table *mem, const struct vu_chain_batch *b, uint32_t first,
                uint32_t n, int fd, const uint8_t *ops, const uint64_t *offsets, uint32_t skip, uint32_t tail,
                uint8_t ok, uint8_t err, uint32_t *lens, int32_t *errs, uint32_t every, int call_fd);
int vu_chain_heads(const struct vu_mem_table *mem, const struct vu_chain_batch *b, uint32_t first, uint32_t n,
                   uint32_t hlen, uint8_t *out);
/* Busy-poll (adaptive polling) for up to ns: 1 when buffers are available,
   0 when the window ended, or -ErrorCode (vu_queue_avail_pending's). */
int vu_queue_poll(struct vu_queue *q, const struct vu_mem_table *mem, uint64_t ns);
/* CDEF-END */

/* Index of the last region with gpa <= addr, or -1 (shared by ring.c and chainio.c). */
int64_t vu_mem_region_index(const struct vu_mem_table *mem, uint64_t addr);

#endif
