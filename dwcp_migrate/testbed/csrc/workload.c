/*
 * The memory-integrity workload core (see workload.h).
 *
 * Parameters (space-separated key=value; tokens without '=' are ignored):
 *   ws=MIB            working set in MiB (required, 1..65535)
 *   dirty=MIB_S       pages dirtied per second, in MiB/s, up to 3 decimals (0 = none; default 0)
 *   mix=Z,T,L,R       percent of zero, text, low-entropy and random pages, sum 100
 *                     (',' ':' or '/' separate; default 25,25,25,25); a quarter of the text
 *                     pages come from a pool of 16, so they duplicate each other
 *   dup=PCT           percent of pages that are exact copies of another non-zero page (default
 *                     0); the mix applies to the other pages
 *   rewrite=PCT       percent of dirtying writes that rewrite the whole page (default 10)
 *   seed=N            decimal or 0x hex (default 1)
 *   corrupt_after=N   self-test: corrupt one page after verify pass N (default 0 = off)
 *   passes=N          return after N verify passes (default 0 = run forever)
 *
 * Console lines (every line starts with "dwcp-guest: "; fields are key=value, hex with 0x):
 *   start kind=K ws_mib=W dirty_mib_s=D mix=Z,T,L,R dup=P rewrite=P seed=S corrupt_after=N
 *         passes=N pages=N
 *   progress phase=fill mib=M of=W at_ms=T
 *   filled mib=W pages=N zero=N text=N lowent=N random=N dup=N ms=T digest=0xH
 *   progress phase=verify pass=N page=I of=N dirtied_total=N corrupt_total=N at_ms=T
 *   verify pass=N pages=N dirtied_total=N corrupt_total=N ms=T dirty_kib_s=R at_ms=T
 *   selftest corrupted page=I gpa=0xA offset=O after_pass=N
 *   CORRUPT page=I gpa=0xA expected=0xH got=0xH pass=N where=verify|write
 *   done passes=N corrupt_total=N
 *   error MESSAGE
 * and from the platform programs, not the core:
 *   boot kind=baremetal clock=pit|rtc|guess tsc_khz=N mem_mib=N     (first line, bare-metal)
 *   boot kind=linux                                                  (first line, Linux)
 *   memory ws_gpa=0xA ws_end=0xA table_gpa=0xA mem_end=0xA           (bare-metal)
 *   memory ws_va=0xA table_va=0xA mem_total_mib=N mem_avail_mib=N pagemap=0|1   (Linux)
 *   halted            (bare-metal, after passes=N)
 *   exited rc=0       (Linux /init, after passes=N; a failure is an error line)
 * `pass` on a CORRUPT line is the pass being walked (completed passes + 1). `gpa` is "none"
 * when the platform cannot tell. `ms` on verify lines is that pass's duration, `at_ms` the time
 * since the start line. `digest` hashes the checksum table after the fill: the same parameters
 * give the same digest on every platform.
 *
 * A CORRUPT page is reported once: its table entry then takes the value found, so a page that
 * is corrupted again is reported again. Pages are checked before every dirtying write too, so a
 * write never hides a corruption. Zero pages stay zero when dirtied (they are rewritten with
 * zeros, as a kernel clearing a page would); other small modifications change 4..16 bytes.
 */
#include "pages.h"

#define VERIFY_CHUNK 64u       /* pages verified between two looks at the clock */
#define DIRTY_BATCH_MAX 64u    /* at most as many dirtied pages per verify chunk */
#define PROGRESS_US 2000000u   /* a line at least this often */
#define MAX_WS_MIB 65535u
#define MAX_DIRTY_MILLI 4096000u

struct params {
    uint32_t ws_mib;
    uint32_t dirty_milli; /* MiB/s x 1000 */
    uint32_t mix[4];
    uint32_t dup;
    uint32_t rewrite;
    uint64_t seed;
    uint32_t corrupt_after;
    uint32_t passes;
};

struct wl {
    const struct wl_platform *pf;
    struct params p;
    uint8_t *ws;
    uint64_t *table;
    uint32_t npages;
    struct xs dr; /* drives dirtying: which page, what change */
    uint64_t t_start;
    uint64_t t_last_line;
    uint64_t t_last_tick;
    uint64_t tokens_milli; /* dirtying budget in thousandths of a page */
    uint64_t rate_milli;   /* thousandths of a page per second */
    uint64_t dirtied_total;
    uint64_t corrupt_total;
    uint32_t pass; /* completed passes */
};

/* ---- console lines ------------------------------------------------------------------ */

struct line {
    char buf[320];
    uint32_t n;
};

static void l_str(struct line *l, const char *s)
{
    while (*s && l->n < sizeof l->buf - 2)
        l->buf[l->n++] = *s++;
}

static void l_u64(struct line *l, uint64_t v)
{
    char t[21];
    int i = 0;
    do {
        t[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i && l->n < sizeof l->buf - 2)
        l->buf[l->n++] = t[--i];
}

static void l_hex(struct line *l, uint64_t v, int digits)
{
    static const char hx[] = "0123456789abcdef";
    char t[16];
    int i = 0;
    do {
        t[i++] = hx[v & 15];
        v >>= 4;
    } while (v || i < digits);
    l_str(l, "0x");
    while (i && l->n < sizeof l->buf - 2)
        l->buf[l->n++] = t[--i];
}

static void l_kv(struct line *l, const char *key, uint64_t v)
{
    l_str(l, " ");
    l_str(l, key);
    l_str(l, "=");
    l_u64(l, v);
}

static void l_begin(struct line *l, const char *event)
{
    l->n = 0;
    l_str(l, "dwcp-guest: ");
    l_str(l, event);
}

static void l_end(struct wl *w, struct line *l)
{
    l->buf[l->n++] = '\n';
    l->buf[l->n] = 0;
    w->pf->puts(l->buf);
    w->t_last_line = w->pf->now_us();
}

static void say_error(const struct wl_platform *pf, const char *msg, const char *detail)
{
    struct line l;
    l_begin(&l, "error ");
    l_str(&l, msg);
    if (detail) {
        l_str(&l, ": ");
        l_str(&l, detail);
    }
    l.buf[l.n++] = '\n';
    l.buf[l.n] = 0;
    pf->puts(l.buf);
}

/* ---- which page is what: a pure function of the seed and the page index ------------- */

static enum wl_kind base_kind(const struct wl *w, uint32_t i)
{
    uint32_t pct = (uint32_t)wl_h64(w->p.seed, i, 1) % 100, acc = 0;
    int k;
    for (k = 0; k < 3; k++) {
        acc += w->p.mix[k];
        if (pct < acc)
            return (enum wl_kind)k;
    }
    return K_RANDOM;
}

static int raw_dup(const struct wl *w, uint32_t i)
{
    return i > 0 && w->p.dup && (uint32_t)wl_h64(w->p.seed, i, 2) % 100 < w->p.dup;
}

/* The page this one copies, or -1. Sources are never zero pages nor copies themselves. */
static int64_t dup_source(const struct wl *w, uint32_t i)
{
    uint32_t t, j;
    if (!raw_dup(w, i))
        return -1;
    for (t = 0; t < 4; t++) {
        j = (uint32_t)(((uint64_t)(uint32_t)wl_h64(w->p.seed, i, 3 + t) * i) >> 32);
        if (!raw_dup(w, j) && base_kind(w, j) != K_ZERO)
            return j;
    }
    return -1;
}

static enum wl_kind content_kind(const struct wl *w, uint32_t i, int64_t *src)
{
    *src = dup_source(w, i);
    return base_kind(w, *src >= 0 ? (uint32_t)*src : i);
}

/* ---- checking and dirtying ---------------------------------------------------------- */

static uint8_t *page_at(const struct wl *w, uint32_t i)
{
    return w->ws + (size_t)i * PAGE;
}

static void l_gpa(struct wl *w, struct line *l, const uint8_t *p)
{
    uint64_t gpa = w->pf->gpa_of ? w->pf->gpa_of(p) : WL_NO_GPA;
    l_str(l, " gpa=");
    if (gpa == WL_NO_GPA)
        l_str(l, "none");
    else
        l_hex(l, gpa, 1);
}

static void check_page(struct wl *w, uint32_t i, const char *where)
{
    uint64_t got = wl_hash_page(page_at(w, i));
    struct line l;
    if (got == w->table[i])
        return;
    l_begin(&l, "CORRUPT");
    l_kv(&l, "page", i);
    l_gpa(w, &l, page_at(w, i));
    l_str(&l, " expected=");
    l_hex(&l, w->table[i], 16);
    l_str(&l, " got=");
    l_hex(&l, got, 16);
    l_kv(&l, "pass", w->pass + 1);
    l_str(&l, " where=");
    l_str(&l, where);
    l_end(w, &l);
    w->table[i] = got;
    w->corrupt_total++;
}

static void dirty_one(struct wl *w)
{
    uint32_t i = xs_below(&w->dr, w->npages);
    uint8_t *p = page_at(w, i);
    int64_t src;
    enum wl_kind k = content_kind(w, i, &src);
    check_page(w, i, "write");
    if (xs_below(&w->dr, 100) < w->p.rewrite) {
        if (src >= 0) {
            /* Copying the expected checksum too means a corrupt source is caught here as well. */
            wl_copy_page(p, page_at(w, (uint32_t)src));
            w->table[i] = w->table[src];
            w->dirtied_total++;
            return;
        }
        wl_gen_kind(p, k, w->p.seed, xs_next64(&w->dr));
    } else {
        wl_modify_small(&w->dr, p, k, (uint32_t)w->dirtied_total);
    }
    w->table[i] = wl_hash_page(p);
    w->dirtied_total++;
}

static void dirty_some(struct wl *w, uint64_t now)
{
    uint64_t dt, cap;
    uint32_t n = 0;
    if (!w->rate_milli)
        return;
    dt = now > w->t_last_tick ? now - w->t_last_tick : 0;
    w->t_last_tick = now;
    if (dt > 1000000)
        dt = 1000000; /* a paused or migrated VM must not come back to a burst */
    w->tokens_milli += dt * w->rate_milli / 1000000;
    cap = w->rate_milli / 4 > 1000 * DIRTY_BATCH_MAX ? w->rate_milli / 4 : 1000 * DIRTY_BATCH_MAX;
    if (w->tokens_milli > cap)
        w->tokens_milli = cap;
    while (w->tokens_milli >= 1000 && n < DIRTY_BATCH_MAX) {
        dirty_one(w);
        w->tokens_milli -= 1000;
        n++;
    }
}

static uint64_t ms_since(uint64_t now, uint64_t then)
{
    return now > then ? (now - then) / 1000 : 0;
}

static void selftest_corrupt(struct wl *w)
{
    uint64_t h = wl_h64(w->p.seed, 0xbadu, w->pass);
    uint32_t i = (uint32_t)(((uint64_t)(uint32_t)h * w->npages) >> 32);
    uint32_t off = (uint32_t)(h >> 32) % PAGE;
    struct line l;
    page_at(w, i)[off] ^= 0x5a;
    l_begin(&l, "selftest corrupted");
    l_kv(&l, "page", i);
    l_gpa(w, &l, page_at(w, i));
    l_kv(&l, "offset", off);
    l_kv(&l, "after_pass", w->pass);
    l_end(w, &l);
}

static void fill(struct wl *w)
{
    uint32_t i, counts[4] = {0, 0, 0, 0}, dups = 0;
    uint64_t now, digest = 0;
    int64_t src;
    enum wl_kind k;
    struct line l;
    for (i = 0; i < w->npages; i++) {
        k = content_kind(w, i, &src);
        if (src >= 0) {
            wl_copy_page(page_at(w, i), page_at(w, (uint32_t)src));
            w->table[i] = w->table[src];
            dups++;
        } else {
            wl_gen_kind(page_at(w, i), k, w->p.seed, wl_h64(w->p.seed, i, 7));
            w->table[i] = wl_hash_page(page_at(w, i));
            counts[k]++;
        }
        if ((i & 63) == 63) {
            now = w->pf->now_us();
            if (now - w->t_last_line >= PROGRESS_US && now > w->t_last_line) {
                l_begin(&l, "progress phase=fill");
                l_kv(&l, "mib", (uint64_t)(i + 1) * PAGE >> 20);
                l_kv(&l, "of", w->p.ws_mib);
                l_kv(&l, "at_ms", ms_since(now, w->t_start));
                l_end(w, &l);
            }
        }
    }
    for (i = 0; i < w->npages; i++)
        digest = wl_mix64(digest ^ w->table[i]);
    now = w->pf->now_us();
    l_begin(&l, "filled");
    l_kv(&l, "mib", w->p.ws_mib);
    l_kv(&l, "pages", w->npages);
    l_kv(&l, "zero", counts[K_ZERO]);
    l_kv(&l, "text", counts[K_TEXT]);
    l_kv(&l, "lowent", counts[K_LOWENT]);
    l_kv(&l, "random", counts[K_RANDOM]);
    l_kv(&l, "dup", dups);
    l_kv(&l, "ms", ms_since(now, w->t_start));
    l_str(&l, " digest=");
    l_hex(&l, digest, 16);
    l_end(w, &l);
}

static void run(struct wl *w)
{
    uint32_t pos = 0, end, i;
    uint64_t now, t_pass = w->pf->now_us(), dirtied_at_pass = 0, ms, dirty_kib_s;
    struct line l;
    w->t_last_tick = t_pass;
    for (;;) {
        end = pos + VERIFY_CHUNK < w->npages ? pos + VERIFY_CHUNK : w->npages;
        for (i = pos; i < end; i++)
            check_page(w, i, "verify");
        pos = end;
        now = w->pf->now_us();
        if (pos == w->npages) {
            w->pass++;
            ms = ms_since(now, t_pass);
            dirty_kib_s = ms ? (w->dirtied_total - dirtied_at_pass) * 4000 / ms : 0;
            l_begin(&l, "verify");
            l_kv(&l, "pass", w->pass);
            l_kv(&l, "pages", w->npages);
            l_kv(&l, "dirtied_total", w->dirtied_total);
            l_kv(&l, "corrupt_total", w->corrupt_total);
            l_kv(&l, "ms", ms);
            l_kv(&l, "dirty_kib_s", dirty_kib_s);
            l_kv(&l, "at_ms", ms_since(now, w->t_start));
            l_end(w, &l);
            if (w->p.corrupt_after && w->pass == w->p.corrupt_after)
                selftest_corrupt(w);
            if (w->p.passes && w->pass >= w->p.passes) {
                l_begin(&l, "done");
                l_kv(&l, "passes", w->pass);
                l_kv(&l, "corrupt_total", w->corrupt_total);
                l_end(w, &l);
                return;
            }
            pos = 0;
            t_pass = now;
            dirtied_at_pass = w->dirtied_total;
        } else if (now - w->t_last_line >= PROGRESS_US && now > w->t_last_line) {
            l_begin(&l, "progress phase=verify");
            l_kv(&l, "pass", w->pass + 1);
            l_kv(&l, "page", pos);
            l_kv(&l, "of", w->npages);
            l_kv(&l, "dirtied_total", w->dirtied_total);
            l_kv(&l, "corrupt_total", w->corrupt_total);
            l_kv(&l, "at_ms", ms_since(now, w->t_start));
            l_end(w, &l);
        }
        dirty_some(w, now);
    }
}

/* ---- parameters --------------------------------------------------------------------- */

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static int key_is(const char *k, uint32_t klen, const char *name)
{
    uint32_t i;
    for (i = 0; i < klen; i++)
        if (name[i] != k[i])
            return 0;
    return name[klen] == 0;
}

/* Parses an unsigned integer (decimal or 0x hex) filling [v, v+len) exactly. */
static int parse_u64(const char *v, uint32_t len, uint64_t *out)
{
    uint64_t r = 0, d;
    uint32_t i = 0;
    int hex = len > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X');
    if (hex)
        i = 2;
    if (i >= len)
        return 0;
    for (; i < len; i++) {
        char c = v[i];
        if (c >= '0' && c <= '9')
            d = (uint64_t)(c - '0');
        else if (hex && c >= 'a' && c <= 'f')
            d = (uint64_t)(c - 'a' + 10);
        else if (hex && c >= 'A' && c <= 'F')
            d = (uint64_t)(c - 'A' + 10);
        else
            return 0;
        if (hex ? r >> 60 : r > (~(uint64_t)0 - d) / 10)
            return 0;
        r = hex ? r << 4 | d : r * 10 + d;
    }
    *out = r;
    return 1;
}

static int parse_u32_max(const char *v, uint32_t len, uint32_t max, uint32_t *out)
{
    uint64_t r;
    if (!parse_u64(v, len, &r) || r > max)
        return 0;
    *out = (uint32_t)r;
    return 1;
}

/* "12", "0.5", "2.125": thousandths, at most 3 decimals. */
static int parse_milli(const char *v, uint32_t len, uint32_t *out)
{
    uint64_t r = 0;
    uint32_t i, decimals = 0;
    int dot = 0;
    if (!len || v[0] == '.')
        return 0;
    for (i = 0; i < len; i++) {
        if (v[i] == '.' && !dot) {
            dot = 1;
            continue;
        }
        if (v[i] < '0' || v[i] > '9' || (dot && ++decimals > 3) || r > MAX_DIRTY_MILLI)
            return 0;
        r = r * 10 + (uint64_t)(v[i] - '0');
    }
    if (dot && !decimals)
        return 0;
    while (decimals++ < 3)
        r *= 10;
    if (r > MAX_DIRTY_MILLI)
        return 0;
    *out = (uint32_t)r;
    return 1;
}

static int parse_mix(const char *v, uint32_t len, uint32_t mix[4])
{
    uint32_t i = 0, start, k;
    for (k = 0; k < 4; k++) {
        start = i;
        while (i < len && v[i] != ',' && v[i] != ':' && v[i] != '/')
            i++;
        if (!parse_u32_max(v + start, i - start, 100, &mix[k]))
            return 0;
        if (k < 3) {
            if (i >= len)
                return 0;
            i++;
        }
    }
    return i == len && mix[0] + mix[1] + mix[2] + mix[3] == 100;
}

static const char *parse_args(const char *s, struct params *p, char *bad, uint32_t badlen)
{
    const char *k, *v;
    uint32_t klen, vlen, i;
    int ok, have_ws = 0;
    p->ws_mib = 0;
    p->dirty_milli = 0;
    for (i = 0; i < 4; i++)
        p->mix[i] = 25;
    p->dup = 0;
    p->rewrite = 10;
    p->seed = 1;
    p->corrupt_after = 0;
    p->passes = 0;
    while (*s) {
        while (is_space(*s))
            s++;
        if (!*s)
            break;
        k = s;
        while (*s && !is_space(*s) && *s != '=')
            s++;
        if (*s != '=') {
            while (*s && !is_space(*s))
                s++;
            continue;
        }
        klen = (uint32_t)(s - k);
        v = ++s;
        while (*s && !is_space(*s))
            s++;
        vlen = (uint32_t)(s - v);
        for (i = 0; i < klen + 1 + vlen && i + 1 < badlen; i++)
            bad[i] = k[i];
        bad[i] = 0;
        if (key_is(k, klen, "ws")) {
            ok = parse_u32_max(v, vlen, MAX_WS_MIB, &p->ws_mib) && p->ws_mib > 0;
            have_ws = 1;
        } else if (key_is(k, klen, "dirty")) {
            ok = parse_milli(v, vlen, &p->dirty_milli);
        } else if (key_is(k, klen, "mix")) {
            ok = parse_mix(v, vlen, p->mix);
        } else if (key_is(k, klen, "dup")) {
            ok = parse_u32_max(v, vlen, 100, &p->dup);
        } else if (key_is(k, klen, "rewrite")) {
            ok = parse_u32_max(v, vlen, 100, &p->rewrite);
        } else if (key_is(k, klen, "seed")) {
            ok = parse_u64(v, vlen, &p->seed);
        } else if (key_is(k, klen, "corrupt_after")) {
            ok = parse_u32_max(v, vlen, 0xffffffffu, &p->corrupt_after);
        } else if (key_is(k, klen, "passes")) {
            ok = parse_u32_max(v, vlen, 0xffffffffu, &p->passes);
        } else {
            return "unknown parameter";
        }
        if (!ok)
            return "bad value (ws=1..65535 MiB, dirty<=4096 MiB/s with <=3 decimals, "
                   "mix=Z,T,L,R summing to 100, dup/rewrite 0..100)";
    }
    bad[0] = 0;
    if (!have_ws)
        return "missing ws=MIB";
    return 0;
}

int wl_main(const struct wl_platform *pf, const char *args)
{
    static struct wl w; /* static: a bare-metal stack is small */
    char bad[64];
    const char *err;
    struct line l;
    uint32_t i;
    w.pf = pf;
    err = parse_args(args, &w.p, bad, sizeof bad);
    if (err) {
        say_error(pf, err, bad[0] ? bad : 0);
        return 1;
    }
    w.npages = (uint32_t)(((uint64_t)w.p.ws_mib << 20) / PAGE);
    w.t_start = pf->now_us();
    l_begin(&l, "start kind=");
    l_str(&l, pf->kind);
    l_kv(&l, "ws_mib", w.p.ws_mib);
    l_kv(&l, "dirty_mib_s", w.p.dirty_milli / 1000);
    if (w.p.dirty_milli % 1000) {
        l_str(&l, ".");
        l.buf[l.n++] = (char)('0' + w.p.dirty_milli % 1000 / 100);
        if (w.p.dirty_milli % 100)
            l.buf[l.n++] = (char)('0' + w.p.dirty_milli % 100 / 10);
        if (w.p.dirty_milli % 10)
            l.buf[l.n++] = (char)('0' + w.p.dirty_milli % 10);
    }
    l_str(&l, " mix=");
    for (i = 0; i < 4; i++) {
        if (i)
            l_str(&l, ",");
        l_u64(&l, w.p.mix[i]);
    }
    l_kv(&l, "dup", w.p.dup);
    l_kv(&l, "rewrite", w.p.rewrite);
    l_kv(&l, "seed", w.p.seed);
    l_kv(&l, "corrupt_after", w.p.corrupt_after);
    l_kv(&l, "passes", w.p.passes);
    l_kv(&l, "pages", w.npages);
    l_end(&w, &l);
    err = pf->get_memory(w.npages, &w.ws, &w.table);
    if (err) {
        say_error(pf, err, 0);
        return 1;
    }
    xs_seed(&w.dr, wl_h64(w.p.seed, 0xd1u, 0));
    /* 1 MiB/s = 256 pages/s */
    w.rate_milli = (uint64_t)w.p.dirty_milli * 256;
    w.tokens_milli = 0;
    fill(&w);
    run(&w);
    return 0;
}
