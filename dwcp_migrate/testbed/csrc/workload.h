/*
 * The memory-integrity workload shared by the bare-metal and the Linux test guest.
 *
 * It fills a working set with a realistic mix of pages, keeps a 64-bit checksum of every page
 * in a table outside the working set, dirties pages at a paced rate and walks the whole set
 * again and again comparing every page with its checksum. Everything it reports is a line on
 * the console starting with "dwcp-guest: " (the formats are listed in workload.c and parsed by
 * dwcp_migrate/testbed/guests.py: keep the two in step).
 *
 * The core knows nothing about the machine: the platform hands it a console, a clock and the
 * memory. It uses no libc, no floating point and only fixed-width integers, so the same seed
 * gives byte-identical pages (and the same digest) on both guests.
 */
#ifndef DWCP_WORKLOAD_H
#define DWCP_WORKLOAD_H

#include <stddef.h>
#include <stdint.h>

#define WL_PAGE_SIZE 4096u
#define WL_NO_GPA (~(uint64_t)0)

struct wl_platform {
    /* "baremetal" or "linux"; echoed on the start line. */
    const char *kind;
    /* Writes a NUL-terminated string (whole lines) to the console. */
    void (*puts)(const char *s);
    /* Monotonic microseconds. May stand still or jump while the VM is paused or migrated. */
    uint64_t (*now_us)(void);
    /*
     * Provides `pages` pages of working set and `pages` uint64_t checksum slots, in separate
     * places. Returns NULL on success, else a message for the error line.
     */
    const char *(*get_memory)(uint32_t pages, uint8_t **ws, uint64_t **table);
    /* Guest-physical address of a byte of the working set, or WL_NO_GPA. */
    uint64_t (*gpa_of)(const uint8_t *p);
};

/*
 * Parses `args` (space-separated key=value tokens, see workload.c) and runs the workload.
 * Returns only on a parameter or memory error (1) or after the requested number of passes (0).
 */
int wl_main(const struct wl_platform *pf, const char *args);

/* The page checksum: exposed so that a platform could check a page itself. */
uint64_t wl_hash_page(const uint8_t *page);

#endif
