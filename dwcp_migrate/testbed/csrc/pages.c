/*
 * Page contents, checksums and random numbers of the workload core (private to workload.c).
 * Every generator is a pure function of its seed, in 32-bit integer arithmetic.
 */
#include "pages.h"

/* ---- hashing and random numbers ----------------------------------------------------- */

uint64_t wl_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t wl_h64(uint64_t seed, uint32_t a, uint32_t b)
{
    return wl_mix64(seed + 0x9e3779b97f4a7c15ull * (((uint64_t)a << 32 | b) + 1));
}

static uint32_t fmix32(uint32_t h)
{
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

/*
 * Two 32-bit lanes rather than one 64-bit state because the bare-metal guest is 32-bit code
 * under TCG, where a 64-bit multiply costs three. Every step is a bijection of the lane, so a
 * page that differs in a single 32-bit word always gets a different checksum.
 */
uint64_t wl_hash_page(const uint8_t *page)
{
    const uint32_t *w = (const uint32_t *)page;
    uint32_t a = 0x9e3779b9u, b = 0x7f4a7c15u, hi;
    uint32_t i;
    for (i = 0; i < PAGE_WORDS; i += 2) {
        a = (a ^ w[i]) * 0x85ebca77u;
        a ^= a >> 15;
        b = (b ^ w[i + 1]) * 0xc2b2ae3du;
        b ^= b >> 13;
    }
    hi = fmix32(a + 0x27d4eb2fu);
    return (uint64_t)hi << 32 | fmix32(b ^ hi);
}

void xs_seed(struct xs *r, uint64_t s)
{
    uint64_t a = wl_mix64(s + 0x9e3779b97f4a7c15ull), b = wl_mix64(s + 0x3c6ef372fe94f82aull);
    r->x = (uint32_t)a;
    r->y = (uint32_t)(a >> 32);
    r->z = (uint32_t)b;
    r->w = (uint32_t)(b >> 32) | 1u;
}

uint32_t xs_next(struct xs *r)
{
    uint32_t t = r->x ^ (r->x << 11);
    r->x = r->y;
    r->y = r->z;
    r->z = r->w;
    r->w = r->w ^ (r->w >> 19) ^ t ^ (t >> 8);
    return r->w;
}

uint32_t xs_below(struct xs *r, uint32_t n)
{
    return (uint32_t)(((uint64_t)xs_next(r) * n) >> 32);
}

uint64_t xs_next64(struct xs *r)
{
    uint64_t hi = xs_next(r);
    return hi << 32 | xs_next(r);
}

/* ---- page content ------------------------------------------------------------------- */

static const char *const words[64] = {
    "request", "user",     "session",  "cache",      "miss",     "hit",      "timeout",
    "retry",   "connection", "closed", "opened",     "worker",   "queue",    "job",
    "started", "finished", "error",    "warning",    "ok",       "latency",  "bytes",
    "sent",    "received", "table",    "index",      "commit",   "rollback", "select",
    "update",  "insert",   "delete",   "from",       "where",    "order",    "customer",
    "invoice", "payment",  "shipment", "token",      "refresh",  "login",    "logout",
    "health",  "check",    "backend",  "frontend",   "upstream", "config",   "reload",
    "signal",  "memory",   "disk",     "network",    "packet",   "dropped",  "accepted",
    "the",     "a",        "for",      "with",       "and",      "to",       "in",
    "of",
};
static const char *const services[8] = {"nginx", "postgres", "redis", "app",
                                        "sshd",  "cron",     "kernel", "worker"};
static const char *const levels[8] = {"INFO", "INFO", "INFO", "DEBUG",
                                      "WARN", "ERROR", "INFO", "DEBUG"};

struct tw {
    uint8_t *p;
    uint32_t n;
    uint32_t end;
};

static void tw_str(struct tw *t, const char *s)
{
    while (*s && t->n < t->end)
        t->p[t->n++] = (uint8_t)*s++;
}

static void tw_dec(struct tw *t, uint32_t v, int width)
{
    char d[12];
    int i = 0;
    do {
        d[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i < width)
        d[i++] = '0';
    while (i && t->n < t->end)
        t->p[t->n++] = (uint8_t)d[--i];
}

/* Log lines such as "2025-06-14T09:26:53.123456Z host-07 redis[2231]: INFO cache miss id=42". */
static void gen_text(uint8_t *p, uint64_t cseed)
{
    struct xs r;
    struct tw t = {p, 0, PAGE};
    uint32_t day, ts, us, host, pid, nw, k;
    xs_seed(&r, cseed);
    day = 1 + xs_below(&r, 28);
    ts = xs_below(&r, 86000);
    us = xs_below(&r, 1000000);
    host = xs_below(&r, 32);
    while (t.n < PAGE) {
        ts += xs_below(&r, 3);
        us = (us + xs_below(&r, 300000)) % 1000000;
        tw_str(&t, "2025-06-");
        tw_dec(&t, day, 2);
        tw_str(&t, "T");
        tw_dec(&t, (ts / 3600) % 24, 2);
        tw_str(&t, ":");
        tw_dec(&t, (ts / 60) % 60, 2);
        tw_str(&t, ":");
        tw_dec(&t, ts % 60, 2);
        tw_str(&t, ".");
        tw_dec(&t, us, 6);
        tw_str(&t, "Z host-");
        tw_dec(&t, host, 2);
        tw_str(&t, " ");
        k = xs_below(&r, 8);
        tw_str(&t, services[k]);
        tw_str(&t, "[");
        pid = 100 + k * 997;
        tw_dec(&t, pid, 0);
        tw_str(&t, "]: ");
        tw_str(&t, levels[xs_below(&r, 8)]);
        nw = 3 + xs_below(&r, 8);
        while (nw--) {
            tw_str(&t, " ");
            tw_str(&t, words[xs_below(&r, 64)]);
        }
        if (xs_below(&r, 2)) {
            tw_str(&t, " id=");
            tw_dec(&t, xs_below(&r, 100000), 0);
        }
        tw_str(&t, "\n");
    }
}

/* Small integers, arrays of records and sparse pointer-like values: what heaps are made of. */
static void gen_lowent(uint8_t *p, uint64_t cseed)
{
    uint32_t *w = (uint32_t *)p;
    struct xs r;
    uint32_t i, base, flags, v, run, gap;
    xs_seed(&r, cseed);
    switch (xs_below(&r, 3)) {
    case 0:
        base = xs_next(&r) & 0xffffu;
        flags = xs_below(&r, 4) << 16;
        for (i = 0; i < PAGE_WORDS; i += 4) {
            w[i] = base + i / 4;
            w[i + 1] = xs_below(&r, 4) | flags;
            w[i + 2] = xs_below(&r, 16);
            w[i + 3] = 0;
        }
        break;
    case 1:
        for (i = 0; i < PAGE_WORDS;) {
            v = xs_below(&r, 256) >> xs_below(&r, 8);
            run = 1 + xs_below(&r, 16);
            while (run-- && i < PAGE_WORDS)
                w[i++] = v;
        }
        break;
    default:
        for (i = 0; i < PAGE_WORDS; i++)
            w[i] = 0;
        for (i = xs_below(&r, 16) & ~1u; i + 1 < PAGE_WORDS; i += gap) {
            w[i] = 0x88800000u | (xs_next(&r) & 0x000fffc0u);
            w[i + 1] = 0xffff8880u;
            gap = 2 * (4 + xs_below(&r, 28));
        }
        break;
    }
}

static void gen_random(uint8_t *p, uint64_t cseed)
{
    uint32_t *w = (uint32_t *)p;
    struct xs r;
    uint32_t i;
    xs_seed(&r, cseed);
    for (i = 0; i < PAGE_WORDS; i++)
        w[i] = xs_next(&r);
}

static void gen_zero(uint8_t *p)
{
    uint32_t *w = (uint32_t *)p;
    uint32_t i;
    for (i = 0; i < PAGE_WORDS; i++)
        w[i] = 0;
}

void wl_copy_page(uint8_t *dst, const uint8_t *src)
{
    uint32_t *d = (uint32_t *)dst;
    const uint32_t *s = (const uint32_t *)src;
    uint32_t i;
    for (i = 0; i < PAGE_WORDS; i++)
        d[i] = s[i];
}

static uint64_t text_seed(uint64_t seed, uint64_t h)
{
    if ((uint32_t)h % 100 < TEXT_POOL_PERCENT)
        return wl_h64(seed, 0x7e57u, (uint32_t)(h >> 32) % TEXT_POOL);
    return h;
}

void wl_gen_kind(uint8_t *p, enum wl_kind k, uint64_t seed, uint64_t cseed)
{
    switch (k) {
    case K_ZERO:
        gen_zero(p);
        break;
    case K_TEXT:
        gen_text(p, text_seed(seed, cseed));
        break;
    case K_LOWENT:
        gen_lowent(p, cseed);
        break;
    default:
        gen_random(p, cseed);
        break;
    }
}

/*
 * A counter or timestamp changing in place: typically 4..16 bytes differ from the previous
 * version. A zero page gets zeros written over it and stays zero.
 */
void wl_modify_small(struct xs *r, uint8_t *p, enum wl_kind k, uint32_t stamp)
{
    uint32_t *words32 = (uint32_t *)p;
    uint32_t o, i;
    struct tw t;
    switch (k) {
    case K_ZERO:
        o = xs_below(r, PAGE_WORDS / 4) * 4;
        for (i = 0; i < 4; i++)
            words32[o + i] = 0;
        break;
    case K_TEXT:
        t.p = p;
        t.n = xs_below(r, PAGE - 16);
        t.end = PAGE;
        tw_dec(&t, 1000000000u + xs_below(r, 1000000000u), 10);
        t.n += 1 + xs_below(r, 4);
        tw_dec(&t, xs_below(r, 10000), 4);
        break;
    case K_LOWENT:
        words32[xs_below(r, PAGE_WORDS)]++;
        o = xs_below(r, PAGE_WORDS / 2) * 2;
        words32[o] = stamp ^ xs_below(r, 1u << 20);
        words32[o + 1] = 0x00010000u | xs_below(r, 256);
        break;
    default:
        o = xs_below(r, PAGE_WORDS - 3);
        for (i = 0; i < 3; i++)
            words32[o + i] = xs_next(r);
        break;
    }
}
