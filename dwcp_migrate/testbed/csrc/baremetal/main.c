/*
 * The bare-metal test guest: a multiboot v1 kernel running the workload core on its own.
 *
 * Memory map (identity: every address is a guest-physical address):
 *   0x100000 .. _end            this program (code, data, a 64 KiB stack in .bss)
 *   _end .. +8 B per page       the checksum table (page aligned)
 *   next 1 MiB boundary .. +ws  the working set
 * The end of usable RAM comes from the multiboot memory map (else mem_upper).
 *
 * Console: COM1 (0x3f8). Clock: rdtsc, calibrated against PIT channel 2 at boot (the CMOS
 * RTC if the PIT gate does not answer). Parameters: the multiboot command line, whose first
 * token is the kernel's file name.
 */
#include <stddef.h>
#include <stdint.h>

#include "../workload.h"

#define COM1 0x3f8
#define PIT_HZ 1193182u
#define CAL_MS 50u

struct mb_info {
    uint32_t flags;
    uint32_t mem_lower, mem_upper;
    uint32_t boot_device;
    uint32_t cmdline;
    uint32_t mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
};

struct mb_mmap {
    uint32_t size; /* of the rest of the entry, without this field */
    uint32_t base_lo, base_hi, len_lo, len_hi;
    uint32_t type;
} __attribute__((packed));

extern char _end[];

static char cmdline[1024];
static uint64_t mem_end;
static uint64_t tsc_khz;

/* The compiler may turn loops into calls to these even in freestanding code. */
void *memset(void *d, int c, size_t n)
{
    uint8_t *p = d;
    while (n--)
        *p++ = (uint8_t)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    uint8_t *p = d;
    const uint8_t *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    uint8_t *p = d;
    const uint8_t *q = s;
    if (p < q)
        return memcpy(d, s, n);
    while (n--)
        p[n] = q[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const uint8_t *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p - *q;
    return 0;
}

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

static void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0xc7); /* FIFO on, cleared */
    outb(COM1 + 4, 0x03);
}

static void serial_puts(const char *s)
{
    uint32_t spin;
    for (; *s; s++) {
        /* Bounded: a missing UART must not hang the workload. */
        for (spin = 0; spin < 100000 && !(inb(COM1 + 5) & 0x20); spin++)
            ;
        outb(COM1, (uint8_t)*s);
    }
}

/* Only forward steps count: a TSC that moves back (a migration) must not wrap the clock. */
static uint64_t now_us(void)
{
    static uint64_t last, cycles;
    uint64_t t = rdtsc();
    if (last && t > last)
        cycles += t - last;
    last = t;
    return cycles * 1000 / tsc_khz;
}

/* PIT channel 2 counts down CAL_MS with its gate on; bit 5 of port 0x61 rises at zero. */
static uint64_t calibrate_pit(void)
{
    uint32_t latch = PIT_HZ * CAL_MS / 1000, spin;
    uint64_t t0, t1;
    outb(0x61, (uint8_t)((inb(0x61) & ~0x02) | 0x01));
    outb(0x43, 0xb0); /* channel 2, lobyte/hibyte, mode 0 */
    outb(0x42, (uint8_t)(latch & 0xff));
    outb(0x42, (uint8_t)(latch >> 8));
    if (inb(0x61) & 0x20)
        return 0; /* already high: nothing is counting */
    t0 = rdtsc();
    for (spin = 0; !(inb(0x61) & 0x20); spin++)
        if (spin > 50000000u)
            return 0;
    t1 = rdtsc();
    return (t1 - t0) / CAL_MS;
}

static uint8_t cmos_seconds(void)
{
    outb(0x70, 0x00);
    return inb(0x71);
}

static uint64_t calibrate_rtc(void)
{
    uint8_t s0 = cmos_seconds(), s1;
    uint32_t spin;
    uint64_t t0;
    for (spin = 0; (s1 = cmos_seconds()) == s0; spin++)
        if (spin > 100000000u)
            return 0;
    t0 = rdtsc();
    for (spin = 0; cmos_seconds() == s1; spin++)
        if (spin > 100000000u)
            return 0;
    return (rdtsc() - t0) / 1000;
}

static uint32_t align_up(uint32_t v, uint32_t a)
{
    return (v + a - 1) & ~(a - 1);
}

static uint32_t table_base(void)
{
    return align_up((uint32_t)(uintptr_t)_end, 4096);
}

/* RAM end of the available region holding our image, from the map if there is one. */
static uint64_t find_mem_end(const struct mb_info *mbi)
{
    uint64_t end = 0x100000ull + (uint64_t)mbi->mem_upper * 1024, base, len;
    uint32_t p, stop;
    const struct mb_mmap *e;
    if (!(mbi->flags & (1u << 6)))
        return (mbi->flags & 1u) ? end : 0;
    stop = mbi->mmap_addr + mbi->mmap_length;
    for (p = mbi->mmap_addr; p < stop; p += e->size + 4) {
        e = (const struct mb_mmap *)(uintptr_t)p;
        base = (uint64_t)e->base_hi << 32 | e->base_lo;
        len = (uint64_t)e->len_hi << 32 | e->len_lo;
        if (e->type == 1 && base <= 0x100000 && base + len > 0x100000)
            return base + len;
    }
    return end;
}

static struct line_buf {
    char b[200];
    uint32_t n;
} lb;

static void lb_str(const char *s)
{
    while (*s && lb.n < sizeof lb.b - 2)
        lb.b[lb.n++] = *s++;
}

static void lb_hex(uint64_t v)
{
    static const char hx[] = "0123456789abcdef";
    int sh = 60;
    lb_str("0x");
    while (sh > 0 && !(v >> sh))
        sh -= 4;
    for (; sh >= 0; sh -= 4)
        lb.b[lb.n++] = hx[(v >> sh) & 15];
}

static void lb_dec(uint64_t v)
{
    char t[21];
    int i = 0;
    do {
        t[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        lb.b[lb.n++] = t[--i];
}

static void lb_flush(void)
{
    lb.b[lb.n++] = '\n';
    lb.b[lb.n] = 0;
    serial_puts(lb.b);
    lb.n = 0;
}

static const char *get_memory(uint32_t pages, uint8_t **ws, uint64_t **table)
{
    static char msg[160];
    uint32_t tb = table_base();
    uint64_t ws_base = align_up(tb + pages * 8u, 0x100000);
    uint64_t need = ws_base + (uint64_t)pages * WL_PAGE_SIZE;
    if (need > mem_end || need > 0xffffffffull) {
        lb.n = 0;
        lb_str("working set does not fit: needs RAM up to ");
        lb_hex(need);
        lb_str(" (");
        lb_dec((need + 0xfffff) >> 20);
        lb_str(" MiB), usable RAM ends at ");
        lb_hex(mem_end);
        lb_str(" (");
        lb_dec(mem_end >> 20);
        lb_str(" MiB)");
        lb.b[lb.n] = 0;
        memcpy(msg, lb.b, lb.n + 1);
        lb.n = 0;
        return msg;
    }
    *table = (uint64_t *)(uintptr_t)tb;
    *ws = (uint8_t *)(uintptr_t)ws_base;
    lb.n = 0;
    lb_str("dwcp-guest: memory ws_gpa=");
    lb_hex(ws_base);
    lb_str(" ws_end=");
    lb_hex(need);
    lb_str(" table_gpa=");
    lb_hex(tb);
    lb_str(" mem_end=");
    lb_hex(mem_end);
    lb_flush();
    return 0;
}

static uint64_t gpa_of(const uint8_t *p)
{
    return (uint64_t)(uintptr_t)p;
}

static const struct wl_platform platform = {
    "baremetal", serial_puts, now_us, get_memory, gpa_of,
};

void kmain(uint32_t magic, const struct mb_info *mbi)
{
    const char *src, *args = cmdline;
    uint32_t i;
    const char *clock = "pit";
    serial_init();
    if (magic != 0x2BADB002u) {
        serial_puts("dwcp-guest: error not started by a multiboot loader\n");
        return;
    }
    /* The info block and the command line lie past _end: copy them before using that RAM. */
    if (mbi->flags & (1u << 2)) {
        src = (const char *)(uintptr_t)mbi->cmdline;
        for (i = 0; src[i] && i < sizeof cmdline - 1; i++)
            cmdline[i] = src[i];
        cmdline[i] = 0;
    }
    mem_end = find_mem_end(mbi);
    tsc_khz = calibrate_pit();
    if (tsc_khz < 10000) {
        clock = "rtc";
        tsc_khz = calibrate_rtc();
    }
    if (tsc_khz < 10000) {
        clock = "guess";
        tsc_khz = 1000000;
    }
    now_us(); /* time starts here */
    lb.n = 0;
    lb_str("dwcp-guest: boot kind=baremetal clock=");
    lb_str(clock);
    lb_str(" tsc_khz=");
    lb_dec(tsc_khz);
    lb_str(" mem_mib=");
    lb_dec(mem_end >> 20);
    lb_flush();
    /* Skip the kernel's file name, which may itself contain '='. */
    while (*args && *args != ' ')
        args++;
    if (wl_main(&platform, args) == 0)
        serial_puts("dwcp-guest: halted\n");
}
