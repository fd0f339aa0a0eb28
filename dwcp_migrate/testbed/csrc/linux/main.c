/*
 * The Linux test guest's workload: the shared core as a static user program, started by the
 * initramfs /init with the dwcp.* kernel parameters (without the prefix) as arguments.
 *
 * The working set and the checksum table are two anonymous mappings; the kernel decides where
 * their pages live in guest-physical memory, and CORRUPT lines show the address read from
 * /proc/self/pagemap at the time of the report (PID 1's child runs as root, so PFNs are
 * visible). It also runs on an ordinary Linux host, which the tests use to check the core
 * without booting anything.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../workload.h"

static int pagemap_fd = -1;

static void console_puts(const char *s)
{
    size_t n = strlen(s);
    ssize_t w;
    while (n) {
        w = write(1, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static unsigned long meminfo_kib(const char *key)
{
    char line[256];
    unsigned long v = 0;
    size_t klen = strlen(key);
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, klen) && line[klen] == ':') {
            v = strtoul(line + klen + 1, NULL, 10);
            break;
        }
    fclose(f);
    return v;
}

static const char *get_memory(uint32_t pages, uint8_t **ws, uint64_t **table)
{
    static char msg[200];
    size_t ws_bytes = (size_t)pages * WL_PAGE_SIZE, table_bytes = (size_t)pages * 8;
    unsigned long avail = meminfo_kib("MemAvailable");
    unsigned long need = (unsigned long)((ws_bytes + table_bytes) >> 10) + 16384;
    void *a, *b;
    char line[200];
    /* Overcommit would let the mapping succeed and the OOM killer end the fill instead. */
    if (avail && need > avail) {
        snprintf(msg, sizeof msg,
                 "working set does not fit: needs %lu MiB with a 16 MiB margin, "
                 "MemAvailable is %lu MiB",
                 need >> 10, avail >> 10);
        return msg;
    }
    a = mmap(NULL, ws_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    b = mmap(NULL, table_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED || b == MAP_FAILED) {
        snprintf(msg, sizeof msg, "cannot map %zu MiB", (ws_bytes + table_bytes) >> 20);
        return msg;
    }
    *ws = a;
    *table = b;
    pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    snprintf(line, sizeof line,
             "dwcp-guest: memory ws_va=%p table_va=%p mem_total_mib=%lu mem_avail_mib=%lu "
             "pagemap=%d\n",
             a, b, meminfo_kib("MemTotal") >> 10, avail >> 10, pagemap_fd >= 0);
    console_puts(line);
    return NULL;
}

static uint64_t gpa_of(const uint8_t *p)
{
    uint64_t entry, va = (uint64_t)(uintptr_t)p;
    if (pagemap_fd < 0 ||
        pread(pagemap_fd, &entry, sizeof entry, (off_t)(va / WL_PAGE_SIZE * 8)) != sizeof entry)
        return WL_NO_GPA;
    /* Bit 63: present. Bits 0-54: the frame number, zero without CAP_SYS_ADMIN. */
    if (!(entry >> 63) || !(entry & ((1ull << 55) - 1)))
        return WL_NO_GPA;
    return (entry & ((1ull << 55) - 1)) * WL_PAGE_SIZE + va % WL_PAGE_SIZE;
}

int main(int argc, char **argv)
{
    static char args[4096];
    size_t n = 0, len;
    int i;
    const struct wl_platform platform = {"linux", console_puts, now_us, get_memory, gpa_of};
    for (i = 1; i < argc; i++) {
        len = strlen(argv[i]);
        if (n + len + 2 > sizeof args)
            break;
        memcpy(args + n, argv[i], len);
        n += len;
        args[n++] = ' ';
    }
    args[n] = 0;
    console_puts("dwcp-guest: boot kind=linux\n");
    return wl_main(&platform, args);
}
