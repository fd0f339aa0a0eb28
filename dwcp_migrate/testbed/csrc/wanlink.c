/*
 * wanlink: an emulated WAN link between two network namespaces, in user space.
 *
 * The test machines' kernel has no netem (and no fq/fq_codel), so delay, rate and loss are
 * emulated by forwarding IP packets between two TUN devices, one in each namespace. Per
 * direction, independently:
 *   1. random loss: each arriving packet is dropped with probability --loss;
 *   2. a drop-tail queue of --queue-bytes, drained at --rate-mbit (the bottleneck);
 *   3. a fixed one-way delay of --delay-ms after the packet has left the queue.
 * One thread per direction: it reads whatever has arrived (in bursts), stamps each packet with
 * its departure time and keeps it in a preallocated byte ring (no malloc per packet), writes
 * the packets that are due, then sleeps in ppoll until the next departure or the next arrival.
 *
 * Signals: SIGUSR1 prints counters to stderr; SIGRTMIN cuts the link (every queued packet and
 * every arriving one is dropped), SIGRTMIN+1 restores it; SIGRTMIN+2 arms a corruption: the
 * next A-to-B TCP segment with at least 64 bytes of payload gets one payload byte flipped
 * and its TCP checksum fixed up, so TCP delivers the damage (as a faulty middlebox or NIC
 * would) and only an end-to-end check above TCP can catch it; SIGTERM/SIGINT exit cleanly (exit
 * status 0) after printing the final counters. The TUN devices are not persistent: they vanish
 * with the process, so a killed forwarder leaves nothing behind.
 *
 * Build: gcc -O2 -Wall -Wextra -pthread -o wanlink wanlink.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXPKT 65536u   /* a TUN read never returns more than this */
#define BURST 64        /* packets read per wakeup before transmitting what is due */
#define REC_WRAP 0xffffffffu
#define TXQLEN 10000    /* TUN queue: deep enough that a busy forwarder loses nothing there */

/* One packet in a ring: header, then the packet, padded to 16 bytes. */
struct rec {
    uint64_t depart_ns;
    uint32_t len;
    uint32_t pad;
};

struct ring {
    uint8_t *buf;
    size_t cap, head, tail, count;
};

struct counters {  /* written by one direction thread, read by the main thread */
    uint64_t fwd_pkts, fwd_bytes, drop_loss, drop_queue, drop_ring, drop_cut, write_err;
    uint64_t corrupted;
    uint64_t max_backlog;
};

struct dir {
    const char *name;
    int in_fd, out_fd, wake_fd;
    struct ring ring;
    uint64_t link_free_ns;  /* when the bottleneck has sent everything queued so far */
    uint64_t rng;
    uint8_t *scratch;       /* target of reads that will be dropped anyway */
    struct counters c;
};

static struct {
    const char *ns[2], *addr[2], *dev;
    double delay_ms, rate_mbit, loss, early_us;
    long long queue_bytes;
    int mtu;
    uint64_t seed;
    int seed_set;
} opt = {.dev = "wan0", .delay_ms = -1, .rate_mbit = -1, .queue_bytes = -1, .mtu = 1500,
         .early_us = 20};

static int g_stop, g_cut;  /* accessed with __atomic builtins */
static int g_corrupt;  /* armed corruptions still to apply (A to B only) */
static unsigned g_cut_gen;  /* bumped by every cut, so a quick cut/restore/cut still flushes */
static uint64_t delay_ns, early_ns, queue_limit;
static double ns_per_byte, bytes_per_ns;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("wanlink: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("wanlink: bad argument: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputs("\n(see wanlink --help)\n", stderr);
    va_end(ap);
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* splitmix64: fast, good enough for Bernoulli loss, reproducible with --seed. */
static double rnd01(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

#define BUMP(d, field, n) \
    __atomic_store_n(&(d)->c.field, (d)->c.field + (n), __ATOMIC_RELAXED)

/* ---- ring of variable-size records ---------------------------------------------------- */
static size_t rec_size(uint32_t len) { return (sizeof(struct rec) + len + 15) & ~(size_t)15; }

/* Room for one more packet of up to MAXPKT at the tail, or NULL if the ring is full. */
static uint8_t *ring_reserve(struct ring *r) {
    const size_t need = sizeof(struct rec) + MAXPKT;
    if (r->count == 0)
        r->head = r->tail = 0;
    if (r->count == 0 || r->tail > r->head) {  /* used space is [head, tail) */
        if (r->cap - r->tail >= need)
            return r->buf + r->tail;
        if (r->head >= need) {  /* wrap: the reader jumps to 0 at the marker */
            if (r->cap - r->tail >= sizeof(struct rec))
                ((struct rec *)(r->buf + r->tail))->len = REC_WRAP;
            r->tail = 0;
            return r->buf;
        }
        return NULL;
    }
    /* wrapped (or full when tail == head): free space is [tail, head) */
    return r->head - r->tail >= need ? r->buf + r->tail : NULL;
}

static void ring_commit(struct ring *r, uint32_t len, uint64_t depart) {
    struct rec *rec = (struct rec *)(r->buf + r->tail);
    rec->depart_ns = depart;
    rec->len = len;
    r->tail += rec_size(len);
    r->count++;
}

static struct rec *ring_front(struct ring *r) {
    if (r->count == 0)
        return NULL;
    if (r->cap - r->head < sizeof(struct rec))
        r->head = 0;
    struct rec *h = (struct rec *)(r->buf + r->head);
    if (h->len == REC_WRAP) {
        r->head = 0;
        h = (struct rec *)r->buf;
    }
    return h;
}

static void ring_pop(struct ring *r, struct rec *h) {
    r->head += rec_size(h->len);
    if (--r->count == 0)
        r->head = r->tail = 0;
}

/* ---- forwarding ----------------------------------------------------------------------- */
/* Flip one payload byte of an IPv4 TCP segment and fix its checksum (RFC 1624, eqn. 3).
 * Returns 1 if the packet was corrupted, 0 if it is not a suitable segment. */
static int corrupt_tcp(uint8_t *pkt, size_t len) {
    if (len < 20 || (pkt[0] >> 4) != 4 || pkt[9] != 6)
        return 0;
    size_t ihl = (size_t)(pkt[0] & 0x0f) * 4;
    if (len < ihl + 20)
        return 0;
    size_t doff = (size_t)(pkt[ihl + 12] >> 4) * 4;
    size_t payload = ihl + doff;
    if (len < payload + 64)
        return 0;
    size_t at = payload + (len - payload) / 2;
    size_t word = ihl + ((at - ihl) & ~(size_t)1);  /* 16-bit word from the TCP header start */
    uint16_t old_word = (uint16_t)(pkt[word] << 8 | pkt[word + 1]);
    pkt[at] ^= 0x5a;
    uint16_t new_word = (uint16_t)(pkt[word] << 8 | pkt[word + 1]);
    uint8_t *ck = pkt + ihl + 16;
    uint32_t sum = (uint16_t)~(uint16_t)(ck[0] << 8 | ck[1]);
    sum += (uint16_t)~old_word;
    sum += new_word;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    uint16_t out = (uint16_t)~sum;
    ck[0] = (uint8_t)(out >> 8);
    ck[1] = (uint8_t)out;
    return 1;
}

static void *run_dir(void *arg) {
    struct dir *d = arg;
    struct pollfd pfd[2] = {{.fd = d->in_fd, .events = POLLIN}, {.fd = d->wake_fd, .events = POLLIN}};
    unsigned cut_seen = 0;
    while (!__atomic_load_n(&g_stop, __ATOMIC_ACQUIRE)) {
        unsigned gen = __atomic_load_n(&g_cut_gen, __ATOMIC_ACQUIRE);
        int cut = __atomic_load_n(&g_cut, __ATOMIC_ACQUIRE);
        if (gen != cut_seen) {  /* a cut loses what is on the wire too */
            struct rec *h;
            while ((h = ring_front(&d->ring)) != NULL) {
                BUMP(d, drop_cut, 1);
                ring_pop(&d->ring, h);
            }
            d->link_free_ns = 0;
        }
        cut_seen = gen;

        int n_read;
        for (n_read = 0; n_read < BURST; n_read++) {
            uint8_t *slot = cut ? NULL : ring_reserve(&d->ring);
            uint8_t *dst = slot ? slot + sizeof(struct rec) : d->scratch;
            ssize_t n = read(d->in_fd, dst, MAXPKT);
            if (n < 0) {
                if (errno == EAGAIN)
                    break;
                if (errno == EINTR)
                    continue;
                die("%s: read from TUN: %s", d->name, strerror(errno));
            }
            if (n == 0)
                continue;
            if (cut) {
                BUMP(d, drop_cut, 1);
                continue;
            }
            if (opt.loss > 0 && rnd01(&d->rng) < opt.loss) {
                BUMP(d, drop_loss, 1);
                continue;
            }
            if (d->name[0] == 'a' && __atomic_load_n(&g_corrupt, __ATOMIC_ACQUIRE) > 0 &&
                    corrupt_tcp(dst, (size_t)n)) {
                __atomic_sub_fetch(&g_corrupt, 1, __ATOMIC_ACQ_REL);
                BUMP(d, corrupted, 1);
            }
            uint64_t now = now_ns();
            uint64_t start = d->link_free_ns > now ? d->link_free_ns : now;
            /* Bytes still waiting for the bottleneck: a fluid view of the drop-tail queue. */
            uint64_t backlog = (uint64_t)((double)(start - now) * bytes_per_ns);
            if (backlog + (uint64_t)n > queue_limit) {
                BUMP(d, drop_queue, 1);
                continue;
            }
            if (!slot) {  /* cannot happen with the ring sized in main(); counted if it does */
                BUMP(d, drop_ring, 1);
                continue;
            }
            if (backlog + (uint64_t)n > d->c.max_backlog)
                BUMP(d, max_backlog, backlog + (uint64_t)n - d->c.max_backlog);
            d->link_free_ns = start + (uint64_t)((double)n * ns_per_byte + 0.5);
            ring_commit(&d->ring, (uint32_t)n, d->link_free_ns + delay_ns);
        }

        uint64_t now = now_ns();
        struct rec *h;
        while ((h = ring_front(&d->ring)) != NULL && h->depart_ns <= now + early_ns) {
            ssize_t w = write(d->out_fd, h + 1, h->len);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0) {
                BUMP(d, write_err, 1);  /* e.g. the peer device was set down */
            } else {
                BUMP(d, fwd_pkts, 1);
                BUMP(d, fwd_bytes, h->len);
            }
            ring_pop(&d->ring, h);
            /* Writing runs the receiving stack in this thread: time moves on noticeably. */
            now = now_ns();
        }
        if (n_read == BURST)
            continue;  /* more is probably waiting: read again before sleeping */

        struct timespec ts, *tsp = NULL;
        if (h) {
            uint64_t wait = h->depart_ns - early_ns > now ? h->depart_ns - early_ns - now : 0;
            ts.tv_sec = (time_t)(wait / 1000000000ull);
            ts.tv_nsec = (long)(wait % 1000000000ull);
            tsp = &ts;
        }
        if (ppoll(pfd, 2, tsp, NULL) < 0 && errno != EINTR)
            die("%s: ppoll: %s", d->name, strerror(errno));
        if (pfd[1].revents & POLLIN) {
            uint64_t v;
            if (read(d->wake_fd, &v, sizeof v) < 0 && errno != EAGAIN)
                die("%s: eventfd: %s", d->name, strerror(errno));
        }
    }
    return NULL;
}

/* ---- setup ----------------------------------------------------------------------------- */
static void set_if(int sock, unsigned long req, struct ifreq *ifr, const char *what) {
    if (ioctl(sock, req, ifr) < 0)
        die("%s %s: %s", ifr->ifr_name, what, strerror(errno));
}

static void set_inet(struct sockaddr *sa, in_addr_t addr) {
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = addr};
    memcpy(sa, &sin, sizeof sin);
}

/* Create the TUN device inside namespace `ns`, configure it there, return its fd. */
static int open_tun(const char *ns, const char *cidr) {
    char path[4096];
    snprintf(path, sizeof path, "/run/netns/%s", ns);
    int self = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    int target = open(path, O_RDONLY | O_CLOEXEC);
    if (self < 0)
        die("open /proc/self/ns/net: %s", strerror(errno));
    if (target < 0)
        die("network namespace %s: %s: %s", ns, path, strerror(errno));
    if (setns(target, CLONE_NEWNET) < 0)
        die("setns into %s: %s (needs root)", ns, strerror(errno));

    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        die("open /dev/net/tun in %s: %s", ns, strerror(errno));
    struct ifreq ifr = {0};
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", opt.dev);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF %s in %s: %s", opt.dev, ns, strerror(errno));

    /* No IPv6 on the link: router solicitations and MLD reports would only add noise. */
    snprintf(path, sizeof path, "/proc/sys/net/ipv6/conf/%s/disable_ipv6", opt.dev);
    int v6 = open(path, O_WRONLY | O_CLOEXEC);
    if (v6 >= 0) {
        if (write(v6, "1", 1) < 0) { /* IPv6 noise is harmless: ignore */ }
        close(v6);
    }

    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        die("socket in %s: %s", ns, strerror(errno));
    ifr.ifr_mtu = opt.mtu;
    set_if(sock, SIOCSIFMTU, &ifr, "set MTU");
    ifr.ifr_qlen = TXQLEN;
    set_if(sock, SIOCSIFTXQLEN, &ifr, "set txqueuelen");
    if (cidr) {  /* address and netmask while down, so only the right prefix route appears */
        char ip[64];
        snprintf(ip, sizeof ip, "%s", cidr);
        char *slash = strchr(ip, '/');
        *slash = '\0';
        int plen = atoi(slash + 1);
        set_inet(&ifr.ifr_addr, inet_addr(ip));
        set_if(sock, SIOCSIFADDR, &ifr, "set address");
        set_inet(&ifr.ifr_netmask, htonl(plen ? ~0u << (32 - plen) : 0));
        set_if(sock, SIOCSIFNETMASK, &ifr, "set netmask");
    }
    set_if(sock, SIOCGIFFLAGS, &ifr, "get flags");
    ifr.ifr_flags |= IFF_UP;
    set_if(sock, SIOCSIFFLAGS, &ifr, "set up");
    close(sock);

    if (setns(self, CLONE_NEWNET) < 0)
        die("setns back: %s", strerror(errno));
    close(self);
    close(target);
    return fd;
}

static double parse_num(const char *name, const char *s, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v))
        usage_error("%s: not a number: '%s'", name, s);
    if (v < lo || v > hi)
        usage_error("%s must be in [%g, %g], got %s", name, lo, hi, s);
    return v;
}

static void check_cidr(const char *name, const char *s) {
    char ip[64];
    struct in_addr a;
    const char *slash = strchr(s, '/');
    if (!slash || (size_t)(slash - s) >= sizeof ip)
        usage_error("%s must look like 10.201.0.1/24, got '%s'", name, s);
    memcpy(ip, s, (size_t)(slash - s));
    ip[slash - s] = '\0';
    if (inet_pton(AF_INET, ip, &a) != 1)
        usage_error("%s: bad IPv4 address '%s'", name, ip);
    parse_num(name, slash + 1, 1, 32);
}

static void usage(void) {
    puts("usage: wanlink --ns-a NS --ns-b NS --delay-ms D --rate-mbit R [options]\n"
         "Forwards IP packets between TUN device DEV in namespace A and DEV in namespace B,\n"
         "per direction: random loss, drop-tail queue drained at the rate, fixed delay.\n"
         "  --ns-a NS, --ns-b NS   network namespaces (names under /run/netns)\n"
         "  --dev NAME             TUN device name in both namespaces (default wan0)\n"
         "  --addr-a CIDR          address of A's device, e.g. 10.201.0.1/24 (optional)\n"
         "  --addr-b CIDR          address of B's device (optional)\n"
         "  --delay-ms D           one-way delay per direction, 0..10000 ms\n"
         "  --rate-mbit R          bottleneck rate per direction, 0.01..100000 Mbit/s\n"
         "  --loss P               drop probability per packet and direction, 0..1 (default 0)\n"
         "  --queue-bytes N        drop-tail queue limit (default: max(one BDP, 32 MTU), BDP =\n"
         "                         rate x 2 x delay)\n"
         "  --mtu M                device MTU, 576..65535 (default 1500)\n"
         "  --seed S               seed of the loss generator (default: from the clock)\n"
         "  --early-us U           send packets up to U us before they are due, to batch\n"
         "                         wakeups (default 20)\n"
         "Signals: USR1 prints counters, RTMIN cuts the link, RTMIN+1 restores it, TERM exits.");
}

static void print_counters(const char *what, unsigned seq, struct dir *dirs) {
    char line[2048];
    int off = snprintf(line, sizeof line, "wanlink: %s seq=%u cut=%d", what, seq,
                       __atomic_load_n(&g_cut, __ATOMIC_RELAXED));
    for (int i = 0; i < 2; i++) {
        struct counters *c = &dirs[i].c;
#define F(x) (unsigned long long)__atomic_load_n(&c->x, __ATOMIC_RELAXED)
        off += snprintf(line + off, sizeof line - (size_t)off,
                        " %s_fwd_pkts=%llu %s_fwd_bytes=%llu %s_drop_loss=%llu"
                        " %s_drop_queue=%llu %s_drop_ring=%llu %s_drop_cut=%llu"
                        " %s_write_err=%llu %s_max_backlog=%llu %s_corrupted=%llu",
                        dirs[i].name, F(fwd_pkts), dirs[i].name, F(fwd_bytes), dirs[i].name,
                        F(drop_loss), dirs[i].name, F(drop_queue), dirs[i].name, F(drop_ring),
                        dirs[i].name, F(drop_cut), dirs[i].name, F(write_err), dirs[i].name,
                        F(max_backlog), dirs[i].name, F(corrupted));
#undef F
    }
    fprintf(stderr, "%s\n", line);
    fflush(stderr);
}

static void wake_all(struct dir *dirs) {
    uint64_t one = 1;
    for (int i = 0; i < 2; i++)
        if (write(dirs[i].wake_fd, &one, sizeof one) < 0)
            die("eventfd write: %s", strerror(errno));
}

int main(int argc, char **argv) {
    static const struct option longopts[] = {
        {"ns-a", required_argument, 0, 'a'},    {"ns-b", required_argument, 0, 'b'},
        {"dev", required_argument, 0, 'd'},     {"addr-a", required_argument, 0, 'A'},
        {"addr-b", required_argument, 0, 'B'},  {"delay-ms", required_argument, 0, 'D'},
        {"rate-mbit", required_argument, 0, 'R'}, {"loss", required_argument, 0, 'L'},
        {"queue-bytes", required_argument, 0, 'Q'}, {"mtu", required_argument, 0, 'M'},
        {"seed", required_argument, 0, 'S'},    {"early-us", required_argument, 0, 'E'},
        {"help", no_argument, 0, 'h'},          {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'a': opt.ns[0] = optarg; break;
        case 'b': opt.ns[1] = optarg; break;
        case 'd': opt.dev = optarg; break;
        case 'A': check_cidr("--addr-a", optarg); opt.addr[0] = optarg; break;
        case 'B': check_cidr("--addr-b", optarg); opt.addr[1] = optarg; break;
        case 'D': opt.delay_ms = parse_num("--delay-ms", optarg, 0, 10000); break;
        case 'R': opt.rate_mbit = parse_num("--rate-mbit", optarg, 0.01, 100000); break;
        case 'L': opt.loss = parse_num("--loss", optarg, 0, 1); break;
        case 'Q': opt.queue_bytes = (long long)parse_num("--queue-bytes", optarg, 1, 1 << 30);
                  break;
        case 'M': opt.mtu = (int)parse_num("--mtu", optarg, 576, 65535); break;
        case 'S': opt.seed = (uint64_t)parse_num("--seed", optarg, 0, 9007199254740992.0);
                  opt.seed_set = 1; break;
        case 'E': opt.early_us = parse_num("--early-us", optarg, 0, 10000); break;
        case 'h': usage(); return 0;
        default: usage_error("unknown option (argument %d)", optind - 1);
        }
    }
    if (optind < argc)
        usage_error("unexpected argument '%s'", argv[optind]);
    if (!opt.ns[0] || !opt.ns[1])
        usage_error("--ns-a and --ns-b are required");
    if (strcmp(opt.ns[0], opt.ns[1]) == 0)
        usage_error("--ns-a and --ns-b must differ (both are '%s')", opt.ns[0]);
    if (strchr(opt.ns[0], '/') || strchr(opt.ns[1], '/'))
        usage_error("namespace names must not contain '/'");
    if (opt.delay_ms < 0)
        usage_error("--delay-ms is required");
    if (opt.rate_mbit < 0)
        usage_error("--rate-mbit is required");
    if (strlen(opt.dev) == 0 || strlen(opt.dev) >= IFNAMSIZ || strchr(opt.dev, '/'))
        usage_error("--dev must be 1..%d characters without '/'", IFNAMSIZ - 1);

    delay_ns = (uint64_t)(opt.delay_ms * 1e6 + 0.5);
    early_ns = (uint64_t)(opt.early_us * 1e3);
    bytes_per_ns = opt.rate_mbit / 8000.0;
    ns_per_byte = 8000.0 / opt.rate_mbit;
    double bdp = opt.rate_mbit * 1e6 / 8 * 2 * opt.delay_ms / 1e3;
    if (opt.queue_bytes < 0)
        opt.queue_bytes = (long long)fmax(bdp, 32.0 * opt.mtu);
    if (opt.queue_bytes < opt.mtu)
        usage_error("--queue-bytes (%lld) must hold at least one packet of --mtu (%d)",
                    opt.queue_bytes, opt.mtu);
    queue_limit = (uint64_t)opt.queue_bytes;

    /* Ring: the queue plus what is in flight in the delay line. Small packets cost up to ~2x
     * their size in record headers and padding; add room for the wrap and a read in progress. */
    double in_flight = bytes_per_ns * (double)delay_ns + bytes_per_ns * 2e6;
    double ring_bytes = 2.2 * ((double)queue_limit + in_flight) + 4.0 * MAXPKT + (1 << 20);
    if (ring_bytes > 4.0 * (1ull << 30))
        usage_error("rate x delay + queue needs a %.1f GiB ring per direction: too large",
                    ring_bytes / (1ull << 30));
    size_t cap = ((size_t)ring_bytes + 15) & ~(size_t)15;

    /* Signals are handled synchronously by the main thread; the workers never see them. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGRTMIN);
    sigaddset(&set, SIGRTMIN + 1);
    sigaddset(&set, SIGRTMIN + 2);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    int fd_a = open_tun(opt.ns[0], opt.addr[0]);
    int fd_b = open_tun(opt.ns[1], opt.addr[1]);

    uint64_t seed = opt.seed_set ? opt.seed : now_ns() ^ ((uint64_t)getpid() << 32);
    static struct dir dirs[2];
    dirs[0] = (struct dir){.name = "ab", .in_fd = fd_a, .out_fd = fd_b, .rng = seed};
    dirs[1] = (struct dir){.name = "ba", .in_fd = fd_b, .out_fd = fd_a,
                           .rng = seed ^ 0x5deece66dull};
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        /* MAP_POPULATE: all memory is touched now, not on the forwarding path. */
        void *mem = mmap(NULL, cap, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        void *scratch = mmap(NULL, MAXPKT, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (mem == MAP_FAILED || scratch == MAP_FAILED)
            die("cannot allocate %zu bytes of ring: %s", cap, strerror(errno));
        dirs[i].ring = (struct ring){.buf = mem, .cap = cap};
        dirs[i].scratch = scratch;
        dirs[i].wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (dirs[i].wake_fd < 0)
            die("eventfd: %s", strerror(errno));
    }
    for (int i = 0; i < 2; i++) {
        int rc = pthread_create(&th[i], NULL, run_dir, &dirs[i]);
        if (rc)
            die("pthread_create: %s", strerror(rc));
    }
    fprintf(stderr,
            "wanlink: ready pid=%d dev=%s ns_a=%s ns_b=%s delay_ms=%g rate_mbit=%g loss=%g "
            "queue_bytes=%llu mtu=%d ring_bytes=%zu\n",
            getpid(), opt.dev, opt.ns[0], opt.ns[1], opt.delay_ms, opt.rate_mbit, opt.loss,
            (unsigned long long)queue_limit, opt.mtu, cap);
    fflush(stderr);

    unsigned seq = 0;
    for (;;) {
        int sig = sigwaitinfo(&set, NULL);
        if (sig < 0) {
            if (errno == EINTR)
                continue;
            die("sigwaitinfo: %s", strerror(errno));
        }
        if (sig == SIGUSR1) {
            print_counters("stats", ++seq, dirs);
        } else if (sig == SIGRTMIN + 2) {
            __atomic_add_fetch(&g_corrupt, 1, __ATOMIC_ACQ_REL);
            fprintf(stderr, "wanlink: corrupt armed seq=%u\n", ++seq);
            fflush(stderr);
        } else if (sig == SIGRTMIN || sig == SIGRTMIN + 1) {
            /* The flag first, then the generation: a worker that sees the new generation
             * (loaded before the flag) also sees the flag set. */
            __atomic_store_n(&g_cut, sig == SIGRTMIN, __ATOMIC_RELEASE);
            if (sig == SIGRTMIN)
                __atomic_add_fetch(&g_cut_gen, 1, __ATOMIC_RELEASE);
            wake_all(dirs);
            /* Printed after the workers were woken: the caller may wait for this line. */
            fprintf(stderr, "wanlink: link %s seq=%u\n", sig == SIGRTMIN ? "cut" : "restored",
                    ++seq);
            fflush(stderr);
        } else {  /* TERM, INT, HUP */
            break;
        }
    }
    __atomic_store_n(&g_stop, 1, __ATOMIC_RELEASE);
    wake_all(dirs);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    print_counters("final", ++seq, dirs);
    return 0;
}
