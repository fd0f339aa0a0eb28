/*
 * Page contents, checksums and random numbers of the workload core: private to workload.c
 * and pages.c (the platform programs only include workload.h).
 */
#ifndef DWCP_PAGES_H
#define DWCP_PAGES_H

#include "workload.h"

#define PAGE WL_PAGE_SIZE
#define PAGE_WORDS (PAGE / 4u)
#define TEXT_POOL 16u /* text pages drawn from the pool are exact duplicates of each other */
#define TEXT_POOL_PERCENT 25u

enum wl_kind { K_ZERO, K_TEXT, K_LOWENT, K_RANDOM };

/* xorshift128: fast in 32-bit code, good enough for page contents and choices. */
struct xs {
    uint32_t x, y, z, w;
};

uint64_t wl_mix64(uint64_t z);
/* A 64-bit hash of (seed, a, b): the source of every per-page decision. */
uint64_t wl_h64(uint64_t seed, uint32_t a, uint32_t b);

void xs_seed(struct xs *r, uint64_t s);
uint32_t xs_next(struct xs *r);
uint32_t xs_below(struct xs *r, uint32_t n); /* uniform in [0, n) */
uint64_t xs_next64(struct xs *r);

/* Fills a page with content of kind k; text pages may come from the duplicate pool. */
void wl_gen_kind(uint8_t *p, enum wl_kind k, uint64_t seed, uint64_t cseed);
void wl_copy_page(uint8_t *dst, const uint8_t *src);
/* An in-place change like a counter or timestamp update; `stamp` is any changing number. */
void wl_modify_small(struct xs *r, uint8_t *p, enum wl_kind k, uint32_t stamp);

#endif
