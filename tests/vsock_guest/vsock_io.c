/* vsock_io: AF_VSOCK stream exerciser for the vhostuser vsock guest test.
 *
 * Built on the host at test time (gcc -static -O2) and run inside the guest.
 *
 *   vsock_io connect <cid> <port> <nbytes> <seed>        one connection
 *   vsock_io connect-many <cid> <port> <n> <nbytes> <seed>  n in parallel (fork), seeds seed..seed+n-1
 *   vsock_io listen <port> <n> <back_bytes>              accept n connections, one child each
 *
 * The initiator sends stream(seed, nbytes) and half-closes; the responder learns
 * the seed from the first 4 bytes (they are the seed), sends back
 * stream(seed ^ 0x5a5a5a5a, back_bytes) and half-closes.  Each side checks every
 * byte it receives against the stream it expects (so loss, duplication or
 * reordering is caught) and reads until EOF.  An initiator expects exactly
 * what the responder sends: it cannot know the size, so it prints it; the host
 * side compares.
 *
 * The stream (same in tests/test_vsock_guest.py): 4096-byte chunks; chunk k is
 * le32(seed ^ k) followed by 4092 bytes of a 69632-byte xorshift64 table taken at
 * offset (k * 1237) % 65536.
 *
 * Output, one line per connection (one write(2) each, so lines do not mix):
 *   OK <role> port=<peer port> seed=<seed> sent=<n> recv=<n> fnv_recv=<fnv1a64>
 *   FAIL <role> ... <reason>
 * and "READY listen <port>" once listening.  Exit status 0 when all succeeded.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define CHUNK 4096
#define TABLE_SIZE (65536 + 4096)
#define REPLY_XOR 0x5a5a5a5au
#define IO_TIMEOUT_MS 60000
#define OVERALL_TIMEOUT_S 240

struct stream {
    uint32_t seed;
    uint8_t table[TABLE_SIZE];
};

static void stream_init(struct stream *s, uint32_t seed)
{
    uint64_t x = (uint64_t)seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
    if (!x)
        x = 1;
    s->seed = seed;
    for (size_t i = 0; i < TABLE_SIZE; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for (int b = 0; b < 8; b++)
            s->table[i + b] = (uint8_t)(x >> (8 * b));
    }
}

/* bytes [pos, pos + len) of the stream */
static void stream_gen(const struct stream *s, uint64_t pos, uint8_t *out, size_t len)
{
    while (len) {
        uint64_t k = pos / CHUNK;
        size_t r = pos % CHUNK, n = CHUNK - r;
        uint8_t chunk_hdr[4];
        uint32_t v = s->seed ^ (uint32_t)k;
        size_t off = (size_t)((k * 1237) % 65536);
        if (n > len)
            n = len;
        for (int b = 0; b < 4; b++)
            chunk_hdr[b] = (uint8_t)(v >> (8 * b));
        for (size_t i = 0; i < n; i++) {
            size_t rr = r + i;
            out[i] = rr < 4 ? chunk_hdr[rr] : s->table[off + rr - 4];
        }
        out += n;
        pos += n;
        len -= n;
    }
}

static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(1, line, n);
    (void)w;
}

struct conn {
    int fd;
    const char *role;
    unsigned peer_port;
    int have_seed;              /* the responder learns it from the first 4 bytes */
    struct stream tx, rx;
    uint64_t tx_total, tx_done;
    uint64_t rx_done;
    uint8_t seed_bytes[4];
    uint64_t fnv;
};

static int fail(struct conn *c, const char *why)
{
    say("FAIL %s port=%u seed=%u sent=%llu recv=%llu: %s (errno %d %s)", c->role, c->peer_port, c->tx.seed,
        (unsigned long long)c->tx_done, (unsigned long long)c->rx_done, why, errno, strerror(errno));
    return 1;
}

/* Send c->tx_total bytes of c->tx (once known) and receive until EOF, checking. */
static int run_conn(struct conn *c, uint64_t back_bytes)
{
    static uint8_t buf[65536], want[65536];
    int tx_shut = 0, rx_eof = 0;
    c->fnv = 1469598103934665603ull;
    if (fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK) < 0)
        return fail(c, "fcntl");
    while (!rx_eof || !tx_shut) {
        if (c->have_seed && !tx_shut && c->tx_done == c->tx_total) {
            if (shutdown(c->fd, SHUT_WR) < 0)
                return fail(c, "shutdown");
            tx_shut = 1;
            continue;
        }
        struct pollfd p = { .fd = c->fd, .events = 0 };
        if (!rx_eof)
            p.events |= POLLIN;
        if (c->have_seed && !tx_shut)
            p.events |= POLLOUT;
        int n = poll(&p, 1, IO_TIMEOUT_MS);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return fail(c, n == 0 ? "timeout" : "poll");
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = recv(c->fd, buf, sizeof buf, 0);
            if (r < 0 && errno != EAGAIN && errno != EINTR)
                return fail(c, "recv");
            if (r == 0) {
                rx_eof = 1;
                if (!c->have_seed)
                    return fail(c, "EOF before the seed");
            }
            size_t i = 0;
            while (r > 0 && !c->have_seed && i < (size_t)r) {
                c->seed_bytes[c->rx_done + i] = buf[i];
                i++;
                if (c->rx_done + i == 4) {
                    uint32_t seed = c->seed_bytes[0] | c->seed_bytes[1] << 8 | c->seed_bytes[2] << 16
                                  | (uint32_t)c->seed_bytes[3] << 24;
                    stream_init(&c->rx, seed);
                    stream_init(&c->tx, seed ^ REPLY_XOR);
                    c->tx_total = back_bytes;
                    c->have_seed = 1;
                }
            }
            if (r > 0) {
                stream_gen(&c->rx, c->rx_done, want, (size_t)r);
                if (c->have_seed && memcmp(want, buf, (size_t)r) != 0) {
                    for (ssize_t j = 0; j < r; j++)
                        if (want[j] != buf[j]) {
                            c->rx_done += j;
                            break;
                        }
                    errno = 0;
                    return fail(c, "received data differ from the expected stream");
                }
                for (ssize_t j = 0; j < r; j++) {
                    c->fnv ^= buf[j];
                    c->fnv *= 1099511628211ull;
                }
                c->rx_done += r;
            }
        }
        if (c->have_seed && !tx_shut && (p.revents & POLLOUT) && c->tx_done < c->tx_total) {
            uint64_t left = c->tx_total - c->tx_done;
            size_t len = left < sizeof buf ? (size_t)left : sizeof buf;
            stream_gen(&c->tx, c->tx_done, buf, len);
            ssize_t w = send(c->fd, buf, len, MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN && errno != EINTR)
                return fail(c, "send");
            if (w > 0)
                c->tx_done += w;
        }
    }
    say("OK %s port=%u seed=%u sent=%llu recv=%llu fnv_recv=%016llx", c->role, c->peer_port, c->tx.seed,
        (unsigned long long)c->tx_done, (unsigned long long)c->rx_done, (unsigned long long)c->fnv);
    return 0;
}

static int do_connect(unsigned cid, unsigned port, uint64_t nbytes, uint32_t seed)
{
    static struct conn c;
    memset(&c, 0, sizeof c);
    c.role = "connect";
    c.peer_port = port;
    c.fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (c.fd < 0)
        return fail(&c, "socket");
    struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
    if (connect(c.fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        return fail(&c, "connect");
    if (nbytes < 4) {
        errno = 0;
        return fail(&c, "an initiator sends at least 4 bytes");
    }
    stream_init(&c.tx, seed);
    stream_init(&c.rx, seed ^ REPLY_XOR);
    c.tx_total = nbytes;
    c.have_seed = 1;
    int rc = run_conn(&c, 0);
    close(c.fd);
    return rc;
}

static int wait_children(int n)
{
    int failed = 0;
    for (int i = 0; i < n; i++) {
        int st;
        if (wait(&st) < 0)
            return 1;
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            failed = 1;
    }
    return failed;
}

static int do_connect_many(unsigned cid, unsigned port, int n, uint64_t nbytes, uint32_t seed)
{
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0)
            _exit(do_connect(cid, port, nbytes, seed + (uint32_t)i));
    }
    return wait_children(n);
}

static int do_listen(unsigned port, int n, uint64_t back_bytes)
{
    int lfd = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 64) < 0) {
        say("FAIL listen port=%u: %s", port, strerror(errno));
        return 1;
    }
    say("READY listen %u", port);
    for (int i = 0; i < n; i++) {
        struct sockaddr_vm peer;
        socklen_t len = sizeof peer;
        int fd = accept(lfd, (struct sockaddr *)&peer, &len);
        if (fd < 0) {
            say("FAIL accept: %s", strerror(errno));
            return 1;
        }
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            static struct conn c;
            close(lfd);
            memset(&c, 0, sizeof c);
            c.fd = fd;
            c.role = "listen";
            c.peer_port = peer.svm_port;
            int rc = run_conn(&c, back_bytes);
            close(fd);
            _exit(rc);
        }
        close(fd);
    }
    close(lfd);
    return wait_children(n);
}

static unsigned long long num(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end) {
        fprintf(stderr, "vsock_io: bad number %s\n", s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    alarm(OVERALL_TIMEOUT_S);  /* never hang the guest for ever */
    signal(SIGPIPE, SIG_IGN);
    if (argc == 6 && !strcmp(argv[1], "connect"))
        return do_connect(num(argv[2]), num(argv[3]), num(argv[4]), (uint32_t)num(argv[5]));
    if (argc == 7 && !strcmp(argv[1], "connect-many"))
        return do_connect_many(num(argv[2]), num(argv[3]), (int)num(argv[4]), num(argv[5]), (uint32_t)num(argv[6]));
    if (argc == 5 && !strcmp(argv[1], "listen"))
        return do_listen(num(argv[2]), (int)num(argv[3]), num(argv[4]));
    fprintf(stderr,
            "usage: vsock_io connect <cid> <port> <nbytes> <seed>\n"
            "       vsock_io connect-many <cid> <port> <n> <nbytes> <seed>\n"
            "       vsock_io listen <port> <n> <back_bytes>\n");
    return 2;
}
