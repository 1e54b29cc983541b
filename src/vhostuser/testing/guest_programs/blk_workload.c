/*
 * blk_workload: the guest side of the live-migration tests (vhostuser.testing.migration).
 *
 * Runs NTHREADS threads of O_DIRECT I/O on a virtio-blk disk (so up to NTHREADS
 * requests are in flight: QD > 1) until the host writes a stop marker into the
 * disk's last 4 KiB block, then verifies everything it holds and exits 0 if all
 * of it is right.
 *
 *   blk_workload DEV READ_BLOCKS WRITE_BLOCKS NTHREADS SLOTS IO_KIB
 *
 * Disk layout, in 4 KiB blocks:
 *   [0, READ_BLOCKS)                          read area: block b holds pattern(b) (written by the host)
 *   [READ_BLOCKS, READ_BLOCKS + WRITE_BLOCKS) write area, split evenly between the threads
 *   last block                                stop block: "VHUSTOP!" at offset 0 ends the run
 *
 * pattern(b): 1024 little-endian u32 words, word i = ((b << 10) | i) ^ 0xA5C3E1F7.
 * A write of generation g to block w: word i = ((w << 10) | i) ^ (g * 0x9E3779B1) ^ 0x3C96D2E1.
 *
 * Reads go into SLOTS buffers of IO_KIB KiB per thread that the program KEEPS:
 * after each read the slot records which block it holds, and the CPU never
 * writes a slot (only the back-end does, by DMA), so a page the back-end wrote
 * but did not log in the dirty bitmap reaches a migration destination stale and
 * the final check of the slots finds it.  Writes come from a separate buffer
 * per thread; their generations are recorded and read back at the end.
 *
 * Output (stdout): "ready" once every thread has done some I/O, then after the
 * stop one line "reads=N writes=N slots=N checked_writes=N bad_slots=N
 * bad_writes=N", and a line per bad slot/block (at most 20).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BLK 4096u
#define WORDS (BLK / 4u)
#define READ_XOR 0xA5C3E1F7u
#define WRITE_XOR 0x3C96D2E1u
#define GEN_MUL 0x9E3779B1u

static const char *dev;
static unsigned read_blocks, write_blocks, nthreads, slots, io_blocks;
static uint64_t stop_block;
static volatile int stop;
static volatile unsigned started;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

struct worker {
    pthread_t tid;
    unsigned index;
    int fd;
    uint64_t rng;
    unsigned char **slot;  /* SLOTS buffers of io_blocks * BLK bytes, only the back-end writes them */
    int64_t *held;         /* first block each slot holds, -1 = none */
    unsigned char *wbuf;   /* the write source */
    uint32_t *gen;         /* generation last written to each of this thread's write blocks */
    unsigned wfirst, wcount;
    unsigned long reads, writes;
};

static uint64_t next_rand(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void fail(const char *what)
{
    pthread_mutex_lock(&out_lock);
    printf("error: %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(2);
}

static int check_read(const unsigned char *buf, uint64_t first, unsigned nblocks)
{
    const uint32_t *w = (const uint32_t *)buf;
    for (unsigned b = 0; b < nblocks; b++)
        for (unsigned i = 0; i < WORDS; i++)
            if (w[b * WORDS + i] != ((uint32_t)(((first + b) << 10) | i) ^ READ_XOR))
                return (int)b;
    return -1;
}

static void fill_write(unsigned char *buf, uint64_t block, uint32_t gen)
{
    uint32_t *w = (uint32_t *)buf;
    for (unsigned i = 0; i < WORDS; i++)
        w[i] = (uint32_t)((block << 10) | i) ^ (gen * GEN_MUL) ^ WRITE_XOR;
}

static int check_write(const unsigned char *buf, uint64_t block, uint32_t gen)
{
    const uint32_t *w = (const uint32_t *)buf;
    for (unsigned i = 0; i < WORDS; i++)
        if (w[i] != ((uint32_t)((block << 10) | i) ^ (gen * GEN_MUL) ^ WRITE_XOR))
            return 0;
    return 1;
}

static int stop_marker_seen(int fd, unsigned char *buf)
{
    if (pread(fd, buf, BLK, (off_t)(stop_block * BLK)) != (ssize_t)BLK)
        fail("pread stop block");
    return memcmp(buf, "VHUSTOP!", 8) == 0;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    size_t io = (size_t)io_blocks * BLK;
    unsigned char *probe;
    unsigned long ops = 0;
    if (posix_memalign((void **)&probe, BLK, BLK))
        fail("posix_memalign");
    while (!stop) {
        uint64_t r = next_rand(&w->rng);
        if (r % 4 != 0 || w->wcount == 0) {
            unsigned s = (unsigned)((r >> 8) % slots);
            uint64_t first = ((r >> 24) % (read_blocks / io_blocks)) * io_blocks;
            w->held[s] = -1;
            if (pread(w->fd, w->slot[s], io, (off_t)(first * BLK)) != (ssize_t)io)
                fail("pread");
            w->held[s] = (int64_t)first;
            w->reads++;
        } else {
            unsigned k = (unsigned)((r >> 8) % w->wcount);
            uint64_t block = w->wfirst + k;
            uint32_t gen = w->gen[k] + 1;
            fill_write(w->wbuf, block, gen);
            if (pwrite(w->fd, w->wbuf, BLK, (off_t)(block * BLK)) != (ssize_t)BLK)
                fail("pwrite");
            w->gen[k] = gen;
            w->writes++;
        }
        if (++ops == 8)
            __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
        if (w->index == 0 && ops % 16 == 0 && stop_marker_seen(w->fd, probe))
            stop = 1;
    }
    free(probe);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s DEV READ_BLOCKS WRITE_BLOCKS NTHREADS SLOTS IO_KIB\n", argv[0]);
        return 2;
    }
    dev = argv[1];
    read_blocks = (unsigned)strtoul(argv[2], NULL, 0);
    write_blocks = (unsigned)strtoul(argv[3], NULL, 0);
    nthreads = (unsigned)strtoul(argv[4], NULL, 0);
    slots = (unsigned)strtoul(argv[5], NULL, 0);
    io_blocks = (unsigned)strtoul(argv[6], NULL, 0) / 4;
    if (!nthreads || !slots || !io_blocks || read_blocks < io_blocks) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    stop_block = read_blocks + write_blocks;
    setvbuf(stdout, NULL, _IOLBF, 0);

    struct worker *ws = calloc(nthreads, sizeof *ws);
    if (!ws)
        fail("calloc");
    size_t io = (size_t)io_blocks * BLK;
    for (unsigned t = 0; t < nthreads; t++) {
        struct worker *w = &ws[t];
        w->index = t;
        w->fd = open(dev, O_RDWR | O_DIRECT);
        if (w->fd < 0)
            fail("open");
        w->rng = 0x9E3779B97F4A7C15ull * (t + 1) ^ (uint64_t)getpid();
        w->slot = calloc(slots, sizeof *w->slot);
        w->held = calloc(slots, sizeof *w->held);
        w->wcount = write_blocks / nthreads;
        w->wfirst = read_blocks + t * w->wcount;
        w->gen = calloc(w->wcount ? w->wcount : 1, sizeof *w->gen);
        if (!w->slot || !w->held || !w->gen || posix_memalign((void **)&w->wbuf, BLK, BLK))
            fail("alloc");
        for (unsigned s = 0; s < slots; s++) {
            if (posix_memalign((void **)&w->slot[s], BLK, io))
                fail("posix_memalign");
            memset(w->slot[s], 0, io); /* fault the pages in now */
            w->held[s] = -1;
        }
    }
    for (unsigned t = 0; t < nthreads; t++)
        if (pthread_create(&ws[t].tid, NULL, run, &ws[t]))
            fail("pthread_create");
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < nthreads && !stop)
        usleep(10000);
    printf("ready\n");
    for (unsigned t = 0; t < nthreads; t++)
        pthread_join(ws[t].tid, NULL);

    unsigned long reads = 0, writes = 0, nslots = 0, nwrites = 0, bad_slots = 0, bad_writes = 0;
    unsigned reported = 0;
    unsigned char *buf;
    if (posix_memalign((void **)&buf, BLK, BLK))
        fail("posix_memalign");
    for (unsigned t = 0; t < nthreads; t++) {
        struct worker *w = &ws[t];
        reads += w->reads;
        writes += w->writes;
        for (unsigned s = 0; s < slots; s++) {
            if (w->held[s] < 0)
                continue;
            nslots++;
            int b = check_read(w->slot[s], (uint64_t)w->held[s], io_blocks);
            if (b >= 0) {
                bad_slots++;
                if (reported++ < 20) {
                    const uint32_t *word = (const uint32_t *)(w->slot[s] + (size_t)b * BLK);
                    printf("bad slot: thread %u slot %u block %lld (+%d) holds block %u\n", t, s,
                           (long long)w->held[s], b, (word[0] ^ READ_XOR) >> 10);
                }
            }
        }
        for (unsigned k = 0; k < w->wcount; k++) {
            if (!w->gen[k])
                continue;
            nwrites++;
            uint64_t block = w->wfirst + k;
            if (pread(w->fd, buf, BLK, (off_t)(block * BLK)) != (ssize_t)BLK)
                fail("pread back");
            if (!check_write(buf, block, w->gen[k])) {
                bad_writes++;
                if (reported++ < 20)
                    printf("bad write: block %llu generation %u\n", (unsigned long long)block, w->gen[k]);
            }
        }
    }
    printf("reads=%lu writes=%lu slots=%lu checked_writes=%lu bad_slots=%lu bad_writes=%lu\n", reads, writes,
           nslots, nwrites, bad_slots, bad_writes);
    return bad_slots || bad_writes ? 1 : 0;
}
