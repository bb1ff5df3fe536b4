/*
 * Unit tests for the mem-share merge primitive
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Everything runs on this process's own anonymous memory: what the merge
 * did is read back from /proc/self/maps (VMAs), /proc/self/smaps
 * (anonymous memory, leftover uffd-wp registrations) and
 * /proc/self/pagemap (whether a page maps the store).  The concurrency
 * test has writer threads hammer the pages being merged and checks that
 * no write is ever lost: before each write, a writer checks that its
 * word still holds its previous write (with the freeze disabled, this
 * finds hundreds of lost writes in two seconds).
 *
 * userfaultfd needs root, CAP_SYS_PTRACE or /dev/userfaultfd: without
 * them the tests are skipped.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#include <glib.h>

#include "mem-share/hash.h"
#include "mem-share/ksm.h"
#include "mem-share/merge.h"
#include "mem-share/store.h"

#define NPAGES 64
#define NSLOTS 1024

static size_t page;

typedef struct Fixture {
    MsStore *store;
    MsMerger *m;
    uint8_t *ram;
    bool skip;
} Fixture;

static void fill(void *buf, uint64_t seed)
{
    uint64_t *p = buf;

    for (size_t i = 0; i < page / sizeof(*p); i++) {
        p[i] = (seed + 1) * 0x9e3779b97f4a7c15ULL + i;
    }
}

static uint8_t *pg(Fixture *f, size_t i)
{
    return f->ram + i * page;
}

static void setup(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    MsMergeStore ms;

    (void)data;
    memset(f, 0, sizeof(*f));
    f->m = ms_merger_new(&err);
    if (!f->m) {
        g_test_skip(err->message);
        f->skip = true;
        return;
    }
    f->store = ms_store_new(page, NSLOTS, &err);
    g_assert_no_error(err);
    f->ram = mmap(NULL, NPAGES * page, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    g_assert_true(f->ram != MAP_FAILED);
    /* No THP: it would blur the anonymous-memory figures */
    madvise(f->ram, NPAGES * page, MADV_NOHUGEPAGE);
    for (size_t i = 0; i < NPAGES; i++) {
        fill(pg(f, i), 1000 + i);
    }
    ms = (MsMergeStore) {
        .fd = ms_store_ro_fd(f->store),
        .view = ms_store_view(f->store, 0),
        .nslots = NSLOTS,
    };
    g_assert_true(ms_merger_add_region(f->m, f->ram, NPAGES,
                                       MS_REGION_NOHUGEPAGE, &ms, &err));
}

static void teardown(Fixture *f, gconstpointer data)
{
    (void)data;
    if (f->skip) {
        return;
    }
    ms_merger_remove_region(f->m, f->ram);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 0);
    munmap(f->ram, NPAGES * page);
    ms_merger_free(f->m);
    ms_store_free(f->store);
}

/* Publish a copy of pages [i, i + n) into a fresh run of slots */
static uint32_t publish_copy(Fixture *f, size_t i, size_t n, uint32_t hint)
{
    g_autoptr(GError) err = NULL;
    uint32_t first;

    g_assert_true(ms_store_alloc_run(f->store, hint, n, &first, &err));
    for (size_t k = 0; k < n; k++) {
        g_assert_true(ms_store_publish(f->store, first + k, pg(f, i + k),
                                       &err));
    }
    return first;
}

static MsMergeOutcome merge(Fixture *f, size_t i, size_t n, uint32_t slot)
{
    g_autoptr(GError) err = NULL;
    MsMergeResult res;

    g_assert_true(ms_merge_run(f->m, pg(f, i), n, slot, NULL, &res, &err));
    g_assert_no_error(err);
    return res.outcome;
}

/* VMAs that overlap the test's RAM, from /proc/self/maps */
static int ram_vmas(Fixture *f)
{
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    uintptr_t lo = (uintptr_t)f->ram, hi = lo + NPAGES * page;
    int count = 0;

    g_assert_true(g_file_get_contents("/proc/self/maps", &text, NULL, NULL));
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l && **l; l++) {
        uint64_t start, end;

        g_assert_cmpint(sscanf(*l, "%" SCNx64 "-%" SCNx64, &start, &end), ==,
                        2);
        count += start < hi && end > lo;
    }
    return count;
}

/* The engine's count of the VMAs it added agrees with the kernel's */
/*
 * The engine's model must match the kernel's VMAs.  Once in about fifty
 * runs on a loaded host the kernel kept one more boundary than the model
 * predicts (seen once, not reproduced in 40 runs since; the kernel joins
 * private anonymous neighbours depending on their anon_vma, whose reuse
 * may depend on RCU-deferred frees).  One VMA of difference is harmless
 * next to a budget of half vm.max_map_count; more is a bug.
 */
static void check_vmas_of(Fixture *f, MsMerger *m)
{
    int64_t real = ram_vmas(f) - 1, model = ms_merger_vmas(m);

    if (real != model) {
        g_test_message("kernel has %" PRId64 " VMAs in the range, the model"
                       " %" PRId64, real, model);
    }
    g_assert_cmpint(real, >=, model);
    g_assert_cmpint(real, <=, model + 1);
}

static void check_vmas(Fixture *f)
{
    check_vmas_of(f, f->m);
}

typedef struct Smaps {
    uint64_t anon_kb;       /* Anonymous: in the range */
    uint64_t rss_kb;        /* Rss: in the range */
    uint64_t huge_kb;       /* AnonHugePages: in the range */
    int uffd_wp;            /* file VMAs anywhere with VmFlags uw */
} Smaps;

/* /proc/self/smaps figures of the VMAs within [@at, +@len) */
static void read_smaps_at(const void *at, size_t len, Smaps *s)
{
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    uintptr_t lo = (uintptr_t)at, hi = lo + len;
    bool in_ram = false, file = false;

    memset(s, 0, sizeof(*s));
    g_assert_true(g_file_get_contents("/proc/self/smaps", &text, NULL, NULL));
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l; l++) {
        uint64_t start, end, kb, inode;

        if (sscanf(*l, "%" SCNx64 "-%" SCNx64 " %*s %*s %*s %" SCNu64,
                   &start, &end, &inode) == 3 &&
            strchr(*l, '-') < strchr(*l, ' ')) {
            in_ram = start < hi && end > lo;
            file = inode != 0;
        } else if (in_ram && sscanf(*l, "Anonymous: %" SCNu64, &kb) == 1) {
            s->anon_kb += kb;
        } else if (in_ram && sscanf(*l, "Rss: %" SCNu64, &kb) == 1) {
            s->rss_kb += kb;
        } else if (in_ram &&
                   sscanf(*l, "AnonHugePages: %" SCNu64, &kb) == 1) {
            s->huge_kb += kb;
        } else if (file && g_str_has_prefix(*l, "VmFlags:") &&
                   strstr(*l, " uw")) {
            s->uffd_wp++;
        }
    }
}

static void read_smaps(Fixture *f, Smaps *s)
{
    read_smaps_at(f->ram, NPAGES * page, s);
}

/*
 * After any operation: no page is left write-protected (a writer would
 * sleep forever), and no store VMA is left registered (it would not join
 * its neighbours).  Anonymous memory stays registered by design.
 */
static void assert_nothing_registered(Fixture *f)
{
    g_autofree uint64_t *pm = g_new(uint64_t, NPAGES);
    g_autoptr(GError) err = NULL;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    Smaps s;

    read_smaps(f, &s);
    g_assert_cmpint(s.uffd_wp, ==, 0);
    g_assert_cmpint(fd, >=, 0);
    g_assert_true(ms_pagemap_read(fd, f->ram, NPAGES, page, pm, &err));
    close(fd);
    for (size_t i = 0; i < NPAGES; i++) {
        if (pm[i] & (1ULL << 57)) {
            g_error("page %zu is still write-protected", i);
        }
    }
}

/* Every page of the test's RAM is mapped (mincore(): ENOMEM if not) */
static void assert_ram_mapped(Fixture *f)
{
    unsigned char vec[NPAGES];

    g_assert_cmpint(mincore(f->ram, NPAGES * page, vec), ==, 0);
}

/* Pages of [i, i + n) that still map the store, checked both ways */
static size_t shared_pages(Fixture *f, size_t i, size_t n, bool *shared)
{
    g_autoptr(GError) err = NULL;
    g_autofree bool *other = g_new(bool, n);
    size_t count, count2;
    bool scan = ms_merger_use_pagemap_scan(f->m, true);

    g_assert_true(ms_merge_test_shared(f->m, pg(f, i), n, shared, &count,
                                       &err));
    if (scan) {
        ms_merger_use_pagemap_scan(f->m, false);
        g_assert_true(ms_merge_test_shared(f->m, pg(f, i), n, other, &count2,
                                           &err));
        g_assert_cmpuint(count, ==, count2);
        g_assert_cmpmem(shared, n * sizeof(bool), other, n * sizeof(bool));
        ms_merger_use_pagemap_scan(f->m, true);
    }
    /* From pagemap entries read here: the scanner's way */
    {
        g_autofree uint64_t *pm = g_new(uint64_t, n);
        int fd = open("/proc/self/pagemap", O_RDONLY);

        g_assert_cmpint(fd, >=, 0);
        g_assert_true(ms_pagemap_read(fd, pg(f, i), n, page, pm, &err));
        close(fd);
        g_assert_true(ms_merge_test_shared_pagemap(f->m, pg(f, i), n, pm,
                                                   other, &count2, &err));
        g_assert_cmpuint(count, ==, count2);
        g_assert_cmpmem(shared, n * sizeof(bool), other, n * sizeof(bool));
    }
    return count;
}

static void test_identical(Fixture *f, gconstpointer data)
{
    g_autofree uint8_t *expect = g_malloc(8 * page);
    bool shared[8];
    uint32_t slot;
    Smaps before, after;

    (void)data;
    if (f->skip) {
        return;
    }
    memcpy(expect, pg(f, 8), 8 * page);
    slot = publish_copy(f, 8, 8, MS_SLOT_NONE);
    read_smaps(f, &before);
    g_assert_cmpint(merge(f, 8, 8, slot), ==, MS_MERGE_DONE);
    read_smaps(f, &after);
    /* The private copies are gone */
    g_assert_cmpuint(before.anon_kb - after.anon_kb, ==, 8 * page / 1024);
    g_assert_cmpint(after.uffd_wp, ==, 0);
    /* An isolated run splits the anonymous VMA in three */
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 2);
    check_vmas(f);
    g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, 8)), ==, slot);
    g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, 15)), ==, slot + 7);
    g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, 16)), ==, MS_SLOT_NONE);

    /* Untouched since the merge: no page table entry, still shared */
    g_assert_cmpuint(shared_pages(f, 8, 8, shared), ==, 8);
    g_assert_cmpmem(pg(f, 8), 8 * page, expect, 8 * page);
    g_assert_cmpuint(shared_pages(f, 8, 8, shared), ==, 8);
    read_smaps(f, &after);
    g_assert_cmpuint(before.anon_kb - after.anon_kb, ==, 8 * page / 1024);

    /* A write breaks the sharing of that page only */
    pg(f, 11)[100] ^= 1;
    g_assert_cmpuint(shared_pages(f, 8, 8, shared), ==, 7);
    g_assert_false(shared[3]);
    g_assert_cmpuint(pg(f, 11)[100], ==, expect[3 * page + 100] ^ 1);
    g_assert_cmpmem(ms_store_view(f->store, slot + 3), page,
                    expect + 3 * page, page);
    /* Pages outside the run were never shared */
    g_assert_cmpuint(shared_pages(f, 0, 8, shared), ==, 0);
    check_vmas(f);
}

/* Isolated runs, extending and bridging: the model follows the kernel */
static void test_vma_accounting(Fixture *f, gconstpointer data)
{
    uint32_t a, b;

    (void)data;
    if (f->skip) {
        return;
    }
    a = publish_copy(f, 10, 5, MS_SLOT_NONE);
    b = publish_copy(f, 14, 1, MS_SLOT_NONE);   /* not a + 4 */

    g_assert_cmpint(merge(f, 10, 1, a), ==, MS_MERGE_DONE);
    check_vmas(f);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 2);
    g_assert_cmpint(merge(f, 12, 1, a + 2), ==, MS_MERGE_DONE);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 4);
    check_vmas(f);
    /* Bridging page 11 onto slot a + 1 joins three VMAs */
    g_assert_cmpint(merge(f, 11, 1, a + 1), ==, MS_MERGE_DONE);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 2);
    check_vmas(f);
    /* Extending the run costs nothing */
    g_assert_cmpint(merge(f, 13, 1, a + 3), ==, MS_MERGE_DONE);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 2);
    check_vmas(f);
    /* A neighbour mapping a slot elsewhere is a VMA of its own */
    g_assert_cmpint(merge(f, 14, 1, b), ==, MS_MERGE_DONE);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 3);
    check_vmas(f);
    /* At the region's first page there is nothing to split on the left */
    g_assert_cmpint(merge(f, 0, 1, publish_copy(f, 0, 1, MS_SLOT_NONE)), ==,
                    MS_MERGE_DONE);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 4);
    check_vmas(f);
    assert_nothing_registered(f);
}

/*
 * Bridging two runs whose VMAs both hold private copies (different
 * anon_vma): the kernel joins only one side.  The model must follow.
 */
static void test_vma_bridge_written(Fixture *f, gconstpointer data)
{
    uint32_t a;

    (void)data;
    if (f->skip) {
        return;
    }
    a = publish_copy(f, 30, 4, MS_SLOT_NONE);
    g_assert_cmpint(merge(f, 30, 1, a), ==, MS_MERGE_DONE);
    g_assert_cmpint(merge(f, 32, 1, a + 2), ==, MS_MERGE_DONE);
    pg(f, 30)[0] ^= 1;
    pg(f, 32)[0] ^= 1;
    g_assert_cmpint(merge(f, 31, 1, a + 1), ==, MS_MERGE_DONE);
    g_test_message("bridge of two written runs: %d VMAs added, model %"
                   PRId64, ram_vmas(f) - 1, ms_merger_vmas(f->m));
    check_vmas(f);
    /* The boundary the kernel kept stays known to later operations */
    g_assert_cmpint(merge(f, 33, 1, a + 3), ==, MS_MERGE_DONE);
    check_vmas(f);
    memset(pg(f, 31), 0, 2 * page);
    g_assert_true(ms_merge_discard(f->m, pg(f, 31), 2, NULL));
    check_vmas(f);
}

static void test_changed(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *expect = NULL;
    MsMergeResult res;
    bool changed[4], shared[4];
    uint32_t slot;

    (void)data;
    if (f->skip) {
        return;
    }
    slot = publish_copy(f, 40, 4, MS_SLOT_NONE);
    /* The page changes between hashing and freezing */
    pg(f, 42)[7] ^= 0x55;
    expect = g_memdup2(pg(f, 40), 4 * page);
    g_assert_true(ms_merge_run(f->m, pg(f, 40), 4, slot, changed, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_CHANGED);
    g_assert_cmpuint(res.changed, ==, 1);
    g_assert_cmpuint(res.first_changed, ==, 2);
    g_assert_true(!changed[0] && !changed[1] && changed[2] && !changed[3]);
    /* Nothing was replaced, nothing is left frozen */
    g_assert_cmpmem(pg(f, 40), 4 * page, expect, 4 * page);
    g_assert_cmpuint(shared_pages(f, 40, 4, shared), ==, 0);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 0);
    check_vmas(f);
    assert_nothing_registered(f);
    /* And the pages can still be written */
    pg(f, 41)[0] = 1;
}

/*
 * Pages mapped for DMA (a count in the pin array) are not merged, single
 * run, zero run or batch, even though their content matches: a transfer
 * into them may be in flight.  Once the count is back to zero they are.
 */
static void test_dma_pinned(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *expect = NULL;
    uint32_t pins[NPAGES] = { 0 };
    MsMergeResult res;
    MsMergeReq req[2];
    bool changed[4], shared[4];
    uint32_t slot, slot2;

    (void)data;
    if (f->skip) {
        return;
    }
    g_assert_true(ms_merger_set_dma_pins(f->m, f->ram, pins, &err));
    g_assert_false(ms_merger_set_dma_pins(f->m, pg(f, 1), pins, NULL));
    slot = publish_copy(f, 40, 4, MS_SLOT_NONE);
    slot2 = publish_copy(f, 10, 2, MS_SLOT_NONE);
    memset(pg(f, 20), 0, 2 * page);
    expect = g_memdup2(f->ram, NPAGES * page);
    pins[41] = 1;
    pins[21] = 2;
    pins[11] = 1;

    /* One run */
    g_assert_true(ms_merge_run(f->m, pg(f, 40), 4, slot, changed, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_CHANGED);
    g_assert_cmpuint(res.changed, ==, 1);
    g_assert_cmpuint(res.pinned, ==, 1);
    g_assert_cmpuint(res.first_changed, ==, 1);
    g_assert_true(!changed[0] && changed[1] && !changed[2] && !changed[3]);
    g_assert_cmpuint(shared_pages(f, 40, 4, shared), ==, 0);

    /* A zero run */
    g_assert_true(ms_merge_zero(f->m, pg(f, 20), 2, NULL, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_CHANGED);
    g_assert_cmpuint(res.pinned, ==, 1);

    /* A batch */
    req[0] = (MsMergeReq) { .host = pg(f, 10), .n = 2, .first_slot = slot2 };
    req[1] = (MsMergeReq) { .host = pg(f, 20), .n = 2,
                            .first_slot = MS_MERGE_ZERO };
    g_assert_true(ms_merge_runs(f->m, req, 2, &err));
    g_assert_no_error(err);
    g_assert_cmpint(req[0].res.outcome, ==, MS_MERGE_CHANGED);
    g_assert_cmpuint(req[0].res.pinned, ==, 1);
    g_assert_cmpuint(req[0].res.first_changed, ==, 1);
    g_assert_cmpint(req[1].res.outcome, ==, MS_MERGE_CHANGED);
    g_assert_cmpuint(req[1].res.pinned, ==, 1);

    /* Nothing was replaced, nothing is left frozen */
    g_assert_cmpmem(f->ram, NPAGES * page, expect, NPAGES * page);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 0);
    assert_nothing_registered(f);
    check_vmas(f);

    /* The transfers ended: the same merges go through */
    pins[41] = pins[21] = pins[11] = 0;
    g_assert_true(ms_merge_run(f->m, pg(f, 40), 4, slot, NULL, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
    g_assert_cmpuint(res.pinned, ==, 0);
    g_assert_cmpuint(shared_pages(f, 40, 4, shared), ==, 4);
    req[0].res.outcome = req[1].res.outcome = MS_MERGE_FAILED;
    g_assert_true(ms_merge_runs(f->m, req, 2, &err));
    g_assert_cmpint(req[0].res.outcome, ==, MS_MERGE_DONE);
    g_assert_cmpint(req[1].res.outcome, ==, MS_MERGE_DONE);
    g_assert_cmpmem(f->ram, NPAGES * page, expect, NPAGES * page);
    check_vmas(f);
    g_assert_true(ms_merger_set_dma_pins(f->m, f->ram, NULL, &err));
}

static void test_zero(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    MsMergeResult res;
    Smaps before, after;
    uint32_t slot;
    bool shared[1];

    (void)data;
    if (f->skip) {
        return;
    }
    memset(pg(f, 20), 0, 4 * page);
    pg(f, 23)[page - 1] = 1;
    read_smaps(f, &before);
    /* One non-zero page refuses the whole run */
    g_assert_true(ms_merge_zero(f->m, pg(f, 20), 4, NULL, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_CHANGED);
    g_assert_cmpuint(res.first_changed, ==, 3);
    g_assert_cmpuint(pg(f, 23)[page - 1], ==, 1);
    g_assert_true(ms_merge_zero(f->m, pg(f, 20), 3, NULL, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
    read_smaps(f, &after);
    /* Holes: the memory is freed, no VMA is added */
    g_assert_cmpuint(before.anon_kb - after.anon_kb, ==, 3 * page / 1024);
    g_assert_cmpint(after.uffd_wp, ==, 0);
    check_vmas(f);
    g_assert_true(ms_page_is_zero(pg(f, 20), page));
    g_assert_true(ms_page_is_zero(pg(f, 22), page));

    /* A merged page written to zeros: fresh anonymous memory, not DONTNEED */
    slot = publish_copy(f, 30, 1, MS_SLOT_NONE);
    g_assert_cmpint(merge(f, 30, 1, slot), ==, MS_MERGE_DONE);
    memset(pg(f, 30), 0, page);
    g_assert_true(ms_merge_zero(f->m, pg(f, 30), 1, NULL, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
    g_assert_cmpint(res.vma_delta, ==, -2);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 0);
    check_vmas(f);
    g_assert_true(ms_page_is_zero(pg(f, 30), page));
    g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, 30)), ==, MS_SLOT_NONE);
    /* The store page can go now: the guest no longer maps it */
    g_assert_true(ms_store_put(f->store, slot));
    g_assert_cmpuint(shared_pages(f, 30, 1, shared), ==, 0);
    g_assert_true(ms_page_is_zero(pg(f, 30), page));
    assert_nothing_registered(f);
}

/* Transparent huge pages: khugepaged must not undo a merge */

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25        /* Linux 6.1 */
#endif
#define HUGE_SIZE (2u << 20)

/* AnonHugePages and Anonymous (kB) of the VMAs within [@lo, +@len) */
static void huge_figures(const uint8_t *lo, size_t len, uint64_t *huge_kb,
                         uint64_t *anon_kb)
{
    Smaps sm;

    read_smaps_at(lo, len, &sm);
    *huge_kb = sm.huge_kb;
    *anon_kb = sm.anon_kb;
}

/* @len bytes aligned to a huge page, advised MADV_HUGEPAGE and filled */
static uint8_t *huge_ram(size_t len, uint8_t **raw)
{
    uint8_t *p;

    *raw = mmap(NULL, len + HUGE_SIZE, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    g_assert_true(*raw != MAP_FAILED);
    p = (uint8_t *)(((uintptr_t)*raw + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1ul));
    madvise(p, len, MADV_HUGEPAGE);
    for (size_t i = 0; i < len / page; i++) {
        fill(p + i * page, 7000 + i);
    }
    return p;
}

/*
 * A merger and a store for two huge pages of filled RAM (huge_ram(), so
 * advised MADV_HUGEPAGE), one region with MS_REGION_* @flags; NULL (the
 * test skipped) without a merger
 */
static MsMerger *huge_region(unsigned flags, MsStore **store, uint8_t **raw,
                             uint8_t **ram)
{
    g_autoptr(GError) err = NULL;
    MsMerger *m = ms_merger_new(&err);
    MsMergeStore ms;

    if (!m) {
        g_test_skip(err->message);
        return NULL;
    }
    *store = ms_store_new(page, NSLOTS, &err);
    g_assert_no_error(err);
    *ram = huge_ram(2 * HUGE_SIZE, raw);
    ms = (MsMergeStore) {
        .fd = ms_store_ro_fd(*store),
        .view = ms_store_view(*store, 0),
        .nslots = NSLOTS,
    };
    g_assert_true(ms_merger_add_region(m, *ram, 2 * HUGE_SIZE / page, flags,
                                       &ms, &err));
    return m;
}

/* Pages [@first, +@n) of @p are holes: nothing present or swapped */
static bool are_holes(const uint8_t *p, size_t first, size_t n)
{
    g_autoptr(GError) err = NULL;
    g_autofree uint64_t *pm = g_new(uint64_t, n);
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    bool holes = true;

    g_assert_cmpint(fd, >=, 0);
    g_assert_true(ms_pagemap_read(fd, p + first * page, n, page, pm, &err));
    close(fd);
    for (size_t i = 0; i < n; i++) {
        holes &= !(pm[i] >> 62);    /* bits 62 swapped, 63 present */
    }
    return holes;
}

/*
 * With the kernel's default max_ptes_none (511), khugepaged collapses a
 * huge-page range that holds holes back into a whole huge page, filling
 * the holes with memory again; MADV_COLLAPSE does the same at once, and
 * ignores max_ptes_none.  A region's anonymous memory is registered
 * with userfaultfd, and the kernel does not collapse a range with holes
 * in a registered VMA (nor one that spans store VMAs): what the merger
 * freed stays free, and the rest of the range keeps what the guest
 * wrote.  Shown against a control mapping, not registered, where the
 * same holes are filled.
 */
static void test_thp_collapse(void)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsStore) store = NULL;
    g_autoptr(MsMerger) m = NULL;
    uint8_t *raw_ctl, *raw, *ctl, *ram;
    const size_t npages = 2 * HUGE_SIZE / page, hp = HUGE_SIZE / page;
    uint64_t huge_kb, anon_kb;
    MsMergeResult res;
    uint32_t first;

    if (page != 4096) {
        g_test_skip("huge pages of 2 MiB over 4 KiB pages only");
        return;
    }
    ctl = huge_ram(HUGE_SIZE, &raw_ctl);
    huge_figures(ctl, HUGE_SIZE, &huge_kb, &anon_kb);
    if (huge_kb < HUGE_SIZE / 1024) {
        munmap(raw_ctl, 2 * HUGE_SIZE);
        g_test_skip("no transparent huge page for the test (THP disabled,"
                    " or none free)");
        return;
    }
    /* The control: 64 holes, collapsed back into a whole huge page */
    madvise(ctl + 64 * page, 64 * page, MADV_DONTNEED);
    g_assert_true(are_holes(ctl, 64, 64));
    if (madvise(ctl, HUGE_SIZE, MADV_COLLAPSE) < 0) {
        g_autofree char *why = g_strdup_printf("MADV_COLLAPSE: %s",
                                               g_strerror(errno));

        munmap(raw_ctl, 2 * HUGE_SIZE);
        g_test_skip(why);
        return;
    }
    huge_figures(ctl, HUGE_SIZE, &huge_kb, &anon_kb);
    g_assert_cmpuint(huge_kb, ==, HUGE_SIZE / 1024);
    g_assert_false(are_holes(ctl, 64, 64));
    munmap(raw_ctl, 2 * HUGE_SIZE);

    m = huge_region(MS_REGION_HUGEPAGE, &store, &raw, &ram);
    if (!m) {
        return;
    }
    /* First huge page: 64 zero pages become holes */
    memset(ram + 64 * page, 0, 64 * page);
    g_assert_true(ms_merge_zero(m, ram + 64 * page, 64, NULL, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
    /* Second: 64 pages map store slots with their content */
    g_assert_true(ms_store_alloc_run(store, MS_SLOT_NONE, 64, &first, &err));
    for (size_t k = 0; k < 64; k++) {
        g_assert_true(ms_store_publish(store, first + k,
                                       ram + (hp + 64 + k) * page, &err));
    }
    g_assert_true(ms_merge_run(m, ram + (hp + 64) * page, 64, first, NULL,
                               &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);

    /* Neither range collapses, and nothing of the saving comes back */
    g_assert_cmpint(madvise(ram, HUGE_SIZE, MADV_COLLAPSE), <, 0);
    g_assert_cmpint(madvise(ram + HUGE_SIZE, HUGE_SIZE, MADV_COLLAPSE), <, 0);
    huge_figures(ram, 2 * HUGE_SIZE, &huge_kb, &anon_kb);
    g_assert_cmpuint(huge_kb, ==, 0);
    g_assert_cmpuint(anon_kb, ==, (npages - 128) * page / 1024);
    g_assert_true(are_holes(ram, 64, 64));
    for (size_t k = 0; k < 64; k++) {
        g_assert_cmpuint(ms_merger_slot_at(m, ram + (hp + 64 + k) * page),
                         ==, first + k);
    }
    /* And every byte is what it was */
    for (size_t i = 0; i < npages; i++) {
        g_autofree uint8_t *want = g_malloc0(page);

        if (i < 64 || i >= 128) {
            fill(want, 7000 + i);
        }
        g_assert_cmpmem(ram + i * page, page, want, page);
    }
    ms_merger_remove_region(m, ram);
    munmap(raw, 3 * HUGE_SIZE);
    for (size_t k = 0; k < 64; k++) {
        ms_store_put(store, first + k);
    }
}

/*
 * A whole huge page of zeros made holes, then one guest write into it:
 * the write must fault one page, not a whole huge page of 2 MiB again
 * (which an MADV_DONTNEED of the whole range in one call gives, as the
 * control shows).  @batch: through ms_merge_runs(), else ms_merge_zero();
 * @advised: the region has MS_REGION_HUGEPAGE, else no advice flag.
 */
typedef struct ThpRefill {
    bool batch;
    bool advised;
} ThpRefill;

static void test_thp_refill(gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsStore) store = NULL;
    g_autoptr(MsMerger) m = NULL;
    const size_t npages = 2 * HUGE_SIZE / page, hp = HUGE_SIZE / page;
    uint64_t huge_kb, anon_kb, huge0, anon0;
    uint8_t *raw, *ram;
    const ThpRefill *t = data;
    MsMergeReq req;

    if (page != 4096) {
        g_test_skip("huge pages of 2 MiB over 4 KiB pages only");
        return;
    }
    /* The control: zapped whole, refilled whole by one write */
    ram = huge_ram(HUGE_SIZE, &raw);
    huge_figures(ram, HUGE_SIZE, &huge_kb, &anon_kb);
    if (huge_kb < HUGE_SIZE / 1024) {
        munmap(raw, 2 * HUGE_SIZE);
        g_test_skip("no transparent huge page for the test (THP disabled,"
                    " or none free)");
        return;
    }
    madvise(ram, HUGE_SIZE, MADV_DONTNEED);
    ram[5 * page] = 1;
    huge_figures(ram, HUGE_SIZE, &huge_kb, &anon_kb);
    g_assert_cmpuint(anon_kb, ==, HUGE_SIZE / 1024);
    munmap(raw, 2 * HUGE_SIZE);

    /* THP "always": a region QEMU did not advise may be huge too */
    m = huge_region(t->advised ? MS_REGION_HUGEPAGE : 0, &store, &raw, &ram);
    if (!m) {
        return;
    }
    /* The first huge page and the first half of the second: zeros */
    memset(ram, 0, HUGE_SIZE + HUGE_SIZE / 2);
    huge_figures(ram, 2 * HUGE_SIZE, &huge0, &anon0);
    req = (MsMergeReq) { .host = ram, .n = hp + hp / 2,
                         .first_slot = MS_MERGE_ZERO };
    if (t->batch) {
        g_assert_true(ms_merge_runs(m, &req, 1, &err));
    } else {
        g_assert_true(ms_merge_zero(m, ram, hp + hp / 2, NULL, &req.res,
                                    &err));
    }
    g_assert_cmpint(req.res.outcome, ==, MS_MERGE_DONE);
    g_assert_true(are_holes(ram, 0, hp + hp / 2));
    huge_figures(ram, 2 * HUGE_SIZE, &huge_kb, &anon_kb);
    g_assert_cmpuint(anon_kb, ==, anon0 - (hp + hp / 2) * page / 1024);

    /* One write into each range: one page each */
    ram[5 * page] = 1;
    ram[(hp + 5) * page] = 2;
    huge_figures(ram, 2 * HUGE_SIZE, &huge_kb, &anon_kb);
    g_assert_cmpuint(huge_kb, ==, 0);
    g_assert_cmpuint(anon_kb, ==, anon0 - (hp + hp / 2 - 2) * page / 1024);
    g_assert_true(are_holes(ram, 6, hp - 6));
    for (size_t i = 0; i < npages; i++) {
        g_autofree uint8_t *want = g_malloc0(page);

        if (i >= hp + hp / 2) {
            fill(want, 7000 + i);
        }
        want[0] = i == 5 ? 1 : i == hp + 5 ? 2 : want[0];
        g_assert_cmpmem(ram + i * page, page, want, page);
    }
    ms_merger_remove_region(m, ram);
    munmap(raw, 3 * HUGE_SIZE);
}

static void test_zero_unpopulated(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    MsMergeResult res;
    uint8_t *p;

    (void)data;
    if (f->skip) {
        return;
    }
    /* Never touched: either frozen by WP_UNPOPULATED, or refused */
    madvise(pg(f, 50), 2 * page, MADV_DONTNEED);
    g_assert_true(ms_merge_zero(f->m, pg(f, 50), 2, NULL, &res, &err));
    g_test_message("zero merge of unpopulated pages: %s",
                   res.outcome == MS_MERGE_DONE ? "done" : "refused");
    p = pg(f, 50);
    p[0] = 1;
    g_assert_cmpuint(p[0], ==, 1);
    assert_nothing_registered(f);
}

static void test_unmerge(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *expect = g_malloc(6 * page);
    bool shared[6];
    Smaps merged, after;
    uint32_t slot;

    (void)data;
    if (f->skip) {
        return;
    }
    memcpy(expect, pg(f, 4), 6 * page);
    slot = publish_copy(f, 4, 6, MS_SLOT_NONE);
    g_assert_cmpint(merge(f, 4, 6, slot), ==, MS_MERGE_DONE);
    pg(f, 5)[9] = expect[page + 9];   /* already private, same content */
    read_smaps(f, &merged);
    g_assert_cmpuint(shared_pages(f, 4, 6, shared), ==, 5);
    g_assert_true(ms_unmerge(f->m, pg(f, 4), 6, &err));
    g_assert_cmpuint(shared_pages(f, 4, 6, shared), ==, 0);
    g_assert_cmpmem(pg(f, 4), 6 * page, expect, 6 * page);
    read_smaps(f, &after);
    g_assert_cmpuint(after.anon_kb - merged.anon_kb, ==, 5 * page / 1024);
    /* Now the slots can go, and the guest does not notice */
    for (uint32_t i = 0; i < 6; i++) {
        g_assert_true(ms_store_put(f->store, slot + i));
    }
    g_assert_cmpmem(pg(f, 4), 6 * page, expect, 6 * page);
    check_vmas(f);
}

/* VMAs in the test's RAM that map a file, from /proc/self/maps */
static int ram_file_vmas(Fixture *f)
{
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    uintptr_t lo = (uintptr_t)f->ram, hi = lo + NPAGES * page;
    int count = 0;

    g_assert_true(g_file_get_contents("/proc/self/maps", &text, NULL, NULL));
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l && **l; l++) {
        uint64_t start, end, inode;

        g_assert_cmpint(sscanf(*l, "%" SCNx64 "-%" SCNx64 " %*s %*s %*s %"
                               SCNu64, &start, &end, &inode), ==, 3);
        count += start < hi && end > lo && inode;
    }
    return count;
}

/*
 * An unmerge leaves anonymous memory, not private copies inside store
 * VMAs that a later MADV_DONTNEED would fill with the store's content
 * (see "Unmerging" in merge.c): every byte kept, no VMA maps the store,
 * no more VMAs than before, the model right.  A page mapped for DMA
 * keeps its VMA and only takes its copy-on-write fault.
 */
static void test_unmerge_anon(Fixture *f, gconstpointer data)
{
    static const struct { size_t first, n; } runs[] = {
        { 2, 1 }, { 5, 1 }, { 10, 4 }, { 20, 2 }, { 22, 3 }, { 30, 1 },
    };
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *expect = NULL;
    g_autofree bool *shared = g_new(bool, NPAGES);
    uint32_t pins[NPAGES] = { 0 }, slot[G_N_ELEMENTS(runs)];
    int merged_vmas;
    gint64 t0;

    (void)data;
    if (f->skip) {
        return;
    }
    g_assert_true(ms_merger_set_dma_pins(f->m, f->ram, pins, &err));
    for (size_t k = 0; k < G_N_ELEMENTS(runs); k++) {
        /* Runs 3 and 4 are neighbours: not on neighbouring slots */
        slot[k] = publish_copy(f, runs[k].first, runs[k].n,
                               k == 4 ? 500 : MS_SLOT_NONE);
        g_assert_cmpint(merge(f, runs[k].first, runs[k].n, slot[k]), ==,
                        MS_MERGE_DONE);
    }
    pg(f, 11)[7] = pg(f, 11)[7];    /* one private copy already */
    expect = g_memdup2(f->ram, NPAGES * page);
    merged_vmas = ram_vmas(f);
    g_assert_cmpint(ram_file_vmas(f), ==, G_N_ELEMENTS(runs));
    pins[30] = 1;

    t0 = g_get_monotonic_time();
    g_assert_true(ms_unmerge(f->m, f->ram, NPAGES, &err));
    g_assert_no_error(err);
    g_test_message("unmerge of %zu runs: %.1f us per run, VMAs %d -> %d",
                   G_N_ELEMENTS(runs),
                   (double)(g_get_monotonic_time() - t0) /
                   G_N_ELEMENTS(runs), merged_vmas, ram_vmas(f));

    g_assert_cmpmem(f->ram, NPAGES * page, expect, NPAGES * page);
    assert_ram_mapped(f);
    assert_nothing_registered(f);
    check_vmas(f);
    g_assert_cmpint(ram_vmas(f), <=, merged_vmas);
    /* Only the pinned page still has its store VMA, with a private copy */
    g_assert_cmpint(ram_file_vmas(f), ==, 1);
    g_assert_cmpuint(shared_pages(f, 0, NPAGES, shared), ==, 0);
    for (size_t i = 0; i < NPAGES; i++) {
        g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, i)), ==,
                         i == 30 ? slot[5] : MS_SLOT_NONE);
    }

    /* The slots can go; discards and zero merges then read zeros */
    for (size_t k = 0; k < G_N_ELEMENTS(runs); k++) {
        for (size_t i = 0; i < runs[k].n; i++) {
            g_assert_true(ms_store_put(f->store, slot[k] + i));
        }
    }
    g_assert_cmpmem(f->ram, NPAGES * page, expect, NPAGES * page);
    g_assert_true(ms_merge_discard(f->m, pg(f, 11), 1, &err));
    g_assert_true(ms_page_is_zero(pg(f, 11), page));
    pins[30] = 0;
    g_assert_true(ms_unmerge(f->m, pg(f, 30), 1, &err));
    g_assert_cmpint(ram_file_vmas(f), ==, 0);
    check_vmas(f);
    g_assert_true(ms_merger_set_dma_pins(f->m, f->ram, NULL, &err));
}

static void test_discard(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    uint32_t slot;

    (void)data;
    if (f->skip) {
        return;
    }
    slot = publish_copy(f, 44, 2, MS_SLOT_NONE);
    g_assert_cmpint(merge(f, 44, 2, slot), ==, MS_MERGE_DONE);
    pg(f, 45)[0] ^= 1;
    /* What MADV_DONTNEED gets wrong: the store's content comes back */
    g_assert_true(ms_merge_discard(f->m, pg(f, 44), 3, &err));
    g_assert_true(ms_page_is_zero(pg(f, 44), page));
    g_assert_true(ms_page_is_zero(pg(f, 45), page));
    g_assert_true(ms_page_is_zero(pg(f, 46), page));
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 0);
    check_vmas(f);
}

static void test_budget(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *expect = NULL;
    MsMergeResult res;
    uint32_t slot;

    (void)data;
    if (f->skip) {
        return;
    }
    expect = g_memdup2(pg(f, 30), page);
    slot = publish_copy(f, 30, 2, MS_SLOT_NONE);
    ms_merger_set_budget(f->m, 1);
    g_assert_true(ms_merge_run(f->m, pg(f, 30), 1, slot, NULL, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_NO_BUDGET);
    g_assert_cmpmem(pg(f, 30), page, expect, page);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 0);
    check_vmas(f);
    assert_nothing_registered(f);
    ms_merger_set_budget(f->m, 2);
    g_assert_cmpint(merge(f, 30, 1, slot), ==, MS_MERGE_DONE);
    /*
     * Extending the run adds no VMA in the end, but freezing splits the
     * anonymous VMA for a moment: refused at the limit, done above it
     */
    g_assert_true(ms_merge_run(f->m, pg(f, 31), 1, slot + 1, NULL, &res,
                               &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_NO_BUDGET);
    ms_merger_set_budget(f->m, 3);
    g_assert_cmpint(merge(f, 31, 1, slot + 1), ==, MS_MERGE_DONE);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 2);
    check_vmas(f);
    g_assert_cmpint(ms_merger_default_budget(0.5), >, 1000);
}

/*
 * vm.max_map_count limits the process: a second merger (a second
 * mem-share object) spends the same budget, and gets it back when the
 * first one's mappings go.
 */
static void test_budget_process(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *expect = NULL;
    Fixture f2;
    MsMergeResult res;
    uint32_t slot, slot2;
    int64_t base;

    (void)data;
    if (f->skip) {
        return;
    }
    setup(&f2, NULL);
    g_assert_false(f2.skip);
    base = ms_merger_process_vmas();
    slot = publish_copy(f, 30, 1, MS_SLOT_NONE);
    slot2 = publish_copy(&f2, 30, 1, MS_SLOT_NONE);
    expect = g_memdup2(pg(&f2, 30), page);
    ms_merger_set_budget(f->m, base + 2);
    ms_merger_set_budget(f2.m, base + 2);

    /* An isolated page costs two VMAs: the first merger spends them all */
    g_assert_cmpint(merge(f, 30, 1, slot), ==, MS_MERGE_DONE);
    g_assert_cmpint(ms_merger_process_vmas(), ==, base + 2);
    g_assert_true(ms_merge_run(f2.m, pg(&f2, 30), 1, slot2, NULL, &res,
                               &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_NO_BUDGET);
    g_assert_cmpmem(pg(&f2, 30), page, expect, page);
    g_assert_cmpint(ms_merger_vmas(f2.m), ==, 0);

    /* Discarded, the page is anonymous again: the VMAs are free to spend */
    g_assert_true(ms_merge_discard(f->m, pg(f, 30), 1, &err));
    g_assert_no_error(err);
    g_assert_cmpint(ms_merger_process_vmas(), ==, base);
    g_assert_cmpint(merge(&f2, 30, 1, slot2), ==, MS_MERGE_DONE);
    g_assert_cmpint(ms_merger_vmas(f2.m), ==, 2);
    g_assert_cmpmem(pg(&f2, 30), page, expect, page);
    g_assert_cmpint(ms_merger_process_vmas(), ==, base + 2);
    g_assert_true(ms_merge_discard(f2.m, pg(&f2, 30), 1, &err));
    teardown(&f2, NULL);
    g_assert_cmpint(ms_merger_process_vmas(), ==, base);
}

static void test_errors(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *expect = g_memdup2(pg(f, 0), NPAGES * page);
    MsMergeResult res;
    MsMergeStore bad;
    uint8_t *other;
    uint32_t slot;

    (void)data;
    if (f->skip) {
        return;
    }
    slot = publish_copy(f, 3, 1, MS_SLOT_NONE);
    /* Outside any region, unaligned, past the end, slots out of range */
    g_assert_false(ms_merge_run(f->m, expect, 1, slot, NULL, &res, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EINVAL);
    g_clear_error(&err);
    g_assert_false(ms_merge_run(f->m, pg(f, 3) + 1, 1, slot, NULL, &res,
                                &err));
    g_clear_error(&err);
    g_assert_false(ms_merge_run(f->m, pg(f, 60), 5, slot, NULL, &res, &err));
    g_clear_error(&err);
    g_assert_false(ms_merge_run(f->m, pg(f, 3), 1, NSLOTS - 1 + 1, NULL,
                                &res, &err));
    g_clear_error(&err);
    g_assert_false(ms_merger_add_region(f->m, pg(f, 1), 2, 0, &bad, &err));
    g_clear_error(&err);

    /* A failure after the freeze (the remap) leaves nothing frozen */
    other = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memcpy(other, pg(f, 3), page);
    bad = (MsMergeStore) {
        .fd = -1,
        .view = ms_store_view(f->store, 0),
        .nslots = NSLOTS,
    };
    g_assert_true(ms_merger_add_region(f->m, other, 4, 0, &bad, &err));
    g_assert_false(ms_merge_run(f->m, other, 1, slot, NULL, &res, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EBADF);
    g_test_message("%s", err->message);
    g_assert_cmpmem(other, page, pg(f, 3), page);
    assert_nothing_registered(f);
    other[0] ^= 1;
    ms_merger_remove_region(f->m, other);
    munmap(other, 4 * page);
    g_assert_cmpmem(pg(f, 0), NPAGES * page, expect, NPAGES * page);
}

/* ---- writers against the merger ---- */

#define NWRITERS 3
#define HAMMER_PAGES 16
#define HAMMER_SECONDS 2

typedef struct Writer {
    Fixture *f;
    pthread_t thread;
    unsigned id;
    uint64_t last[HAMMER_PAGES];
    uint64_t writes;
    uint64_t slow;          /* writes that took over 20 us: slept frozen */
    uint64_t lost;          /* times the word no longer held our last write */
    int *stop;              /* read with g_atomic_int_get() */
} Writer;

static uint64_t *writer_word(Fixture *f, size_t p, unsigned id)
{
    return (uint64_t *)(pg(f, p) + 64 * (id + 1));
}

static void *writer_main(void *opaque)
{
    Writer *w = opaque;
    GRand *rand = g_rand_new_with_seed(w->id);
    uint64_t counter = 0;

    while (!g_atomic_int_get(w->stop)) {
        size_t p = g_rand_int_range(rand, 0, HAMMER_PAGES);
        uint64_t value = (++counter << 8) | w->id;
        /* volatile: every access must reach the page under test */
        volatile uint64_t *word = writer_word(w->f, p, w->id);
        gint64 t0;

        /* Only this thread writes this word: it must hold our last value */
        w->lost += *word != w->last[p];
        t0 = g_get_monotonic_time();
        *word = value;
        w->last[p] = value;
        w->writes++;
        w->slow += g_get_monotonic_time() - t0 > 20;
        /* Bursts and pauses, so that some pages are stable long enough */
        if (g_rand_int_range(rand, 0, 64) == 0) {
            g_usleep(g_rand_int_range(rand, 0, 200));
        }
    }
    g_rand_free(rand);
    return NULL;
}

/* One pass of a tiny scanner: copy, publish, merge, settle references */
static void hammer_pass(Fixture *f, uint32_t *slot_of, GRand *rand,
                        uint64_t *done, uint64_t *refused)
{
    g_autoptr(GError) err = NULL;
    size_t p = g_rand_int_range(rand, 0, HAMMER_PAGES);
    size_t n = g_rand_int_range(rand, 1, 5);   /* not inside MIN() */
    bool shared[4];
    MsMergeResult res;
    uint32_t first;

    n = MIN(n, HAMMER_PAGES - p);
    /* Drop the references of pages a write made private */
    g_assert_true(ms_merge_test_shared(f->m, pg(f, p), n, shared, NULL, &err));
    for (size_t k = 0; k < n; k++) {
        if (slot_of[p + k] != MS_SLOT_NONE && !shared[k]) {
            ms_store_put(f->store, slot_of[p + k]);
            slot_of[p + k] = MS_SLOT_NONE;
        }
    }
    first = publish_copy(f, p, n, MS_SLOT_NONE);
    g_assert_true(ms_merge_run(f->m, pg(f, p), n, first, NULL, &res, &err));
    g_assert_no_error(err);
    for (size_t k = 0; k < n; k++) {
        uint32_t old = res.outcome == MS_MERGE_DONE ? slot_of[p + k]
                                                    : first + k;

        if (res.outcome == MS_MERGE_DONE) {
            slot_of[p + k] = first + k;
        }
        if (old != MS_SLOT_NONE) {
            ms_store_put(f->store, old);
        }
    }
    *(res.outcome == MS_MERGE_DONE ? done : refused) += 1;
}

/*
 * Unmerge a few pages (see "Unmerging": anonymous memory moved over the
 * runs, with the writers frozen) and drop the references of those that no
 * longer map their slot
 */
static void hammer_unmerge(Fixture *f, uint32_t *slot_of, GRand *rand)
{
    g_autoptr(GError) err = NULL;
    size_t p = g_rand_int_range(rand, 0, HAMMER_PAGES);
    size_t n = g_rand_int_range(rand, 1, 8);
    bool shared[8];

    n = MIN(n, HAMMER_PAGES - p);
    g_assert_true(ms_unmerge(f->m, pg(f, p), n, &err));
    g_assert_true(ms_merge_test_shared(f->m, pg(f, p), n, shared, NULL,
                                       &err));
    for (size_t k = 0; k < n; k++) {
        g_assert_false(shared[k]);
        if (slot_of[p + k] != MS_SLOT_NONE) {
            ms_store_put(f->store, slot_of[p + k]);
            slot_of[p + k] = MS_SLOT_NONE;
        }
    }
}

/* @data: unmerge now and then too */
static void test_writers(Fixture *f, gconstpointer data)
{
    bool unmerges = GPOINTER_TO_INT(data);
    g_autoptr(GRand) rand = g_rand_new_with_seed(42);
    g_autofree uint8_t *expect = NULL;
    uint32_t slot_of[HAMMER_PAGES];
    Writer w[NWRITERS];
    int stop = false;
    uint64_t done = 0, refused = 0, writes = 0, slow = 0, lost = 0;
    gint64 end;
    MsStoreStats st;

    (void)data;
    if (f->skip) {
        return;
    }
    expect = g_memdup2(pg(f, 0), HAMMER_PAGES * page);
    for (size_t p = 0; p < HAMMER_PAGES; p++) {
        slot_of[p] = MS_SLOT_NONE;
    }
    for (unsigned i = 0; i < NWRITERS; i++) {
        w[i] = (Writer) { .f = f, .id = i, .stop = &stop };
        for (size_t p = 0; p < HAMMER_PAGES; p++) {
            w[i].last[p] = *writer_word(f, p, i);
        }
        g_assert_cmpint(pthread_create(&w[i].thread, NULL, writer_main,
                                       &w[i]), ==, 0);
    }
    end = g_get_monotonic_time() + HAMMER_SECONDS * G_USEC_PER_SEC;
    for (unsigned pass = 0; g_get_monotonic_time() < end; pass++) {
        hammer_pass(f, slot_of, rand, &done, &refused);
        if (unmerges && pass % 4 == 3) {
            hammer_unmerge(f, slot_of, rand);
        }
    }
    g_atomic_int_set(&stop, true);
    for (unsigned i = 0; i < NWRITERS; i++) {
        pthread_join(w[i].thread, NULL);
        writes += w[i].writes;
        slow += w[i].slow;
        lost += w[i].lost;
    }
    g_test_message("%" PRIu64 " merges done, %" PRIu64 " refused, %" PRIu64
                   " writes (%" PRIu64 " slow, %" PRIu64 " lost)", done,
                   refused, writes, slow, lost);
    g_assert_cmpuint(lost, ==, 0);
    g_assert_cmpuint(done, >, 0);
    g_assert_cmpuint(refused, >, 0);

    /* Every word holds the last value its writer wrote; others unchanged */
    for (size_t p = 0; p < HAMMER_PAGES; p++) {
        for (unsigned i = 0; i < NWRITERS; i++) {
            uint64_t *e = (uint64_t *)(expect + p * page + 64 * (i + 1));

            g_assert_cmphex(*writer_word(f, p, i), ==, w[i].last[p]);
            *e = w[i].last[p];
        }
    }
    g_assert_cmpmem(pg(f, 0), HAMMER_PAGES * page, expect,
                    HAMMER_PAGES * page);
    assert_nothing_registered(f);
    check_vmas(f);
    /* References: exactly one per page still mapping its slot */
    ms_store_get_stats(f->store, &st);
    for (size_t p = 0; p < HAMMER_PAGES; p++) {
        if (slot_of[p] != MS_SLOT_NONE) {
            g_assert_cmpuint(ms_store_refs(f->store, slot_of[p]), ==, 1);
            st.refs--;
        }
    }
    g_assert_cmpuint(st.refs, ==, 0);
}

/* ---- figures ---- */

static double time_merges(Fixture *f, size_t run, bool zero)
{
    g_autoptr(GError) err = NULL;
    MsMergeResult res;
    double total = 0;
    size_t merged = 0;

    for (size_t i = 0; i + run <= NPAGES; i += run * 2) {
        uint32_t slot = zero ? 0 : publish_copy(f, i, run, MS_SLOT_NONE);
        gint64 t0;

        if (zero) {
            memset(pg(f, i), 0, run * page);
        }
        t0 = g_get_monotonic_time();
        if (zero) {
            g_assert_true(ms_merge_zero(f->m, pg(f, i), run, NULL, &res, &err));
        } else {
            g_assert_true(ms_merge_run(f->m, pg(f, i), run, slot, NULL, &res,
                                       &err));
        }
        total += g_get_monotonic_time() - t0;
        g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
        merged += run;
    }
    return total / merged;
}

static void test_timing(Fixture *f, gconstpointer data)
{
    (void)data;
    if (f->skip) {
        return;
    }
    g_test_message("merge, isolated pages: %.2f us per page",
                   time_merges(f, 1, false));
    check_vmas(f);
}

static void test_timing_runs(Fixture *f, gconstpointer data)
{
    (void)data;
    if (f->skip) {
        return;
    }
    g_test_message("merge, runs of 16 pages: %.2f us per page",
                   time_merges(f, 16, false));
    check_vmas(f);
}

static void test_timing_zero(Fixture *f, gconstpointer data)
{
    (void)data;
    if (f->skip) {
        return;
    }
    g_test_message("zero merge, isolated pages: %.2f us per page",
                   time_merges(f, 1, true));
    check_vmas(f);
}

/*
 * Several runs at once: each gets the outcome it would get alone, pages
 * read back unchanged, nothing stays frozen, and a run that maps the
 * store (a re-merge) takes the single-run path.
 */
static void test_runs(Fixture *f, gconstpointer data)
{
    g_autofree uint8_t *expect = g_malloc(NPAGES * page);
    g_autoptr(GError) err = NULL;
    bool changed[4];
    MsMergeReq req[4];
    Smaps before, after;
    uint32_t a, b;

    (void)data;
    if (f->skip) {
        return;
    }
    memset(pg(f, 20), 0, 2 * page);             /* a zero run */
    a = publish_copy(f, 4, 3, MS_SLOT_NONE);    /* pages 4-6 */
    b = publish_copy(f, 30, 4, MS_SLOT_NONE);   /* pages 30-33 */
    pg(f, 32)[7] ^= 0x10;                       /* changed since */
    memcpy(expect, f->ram, NPAGES * page);
    read_smaps(f, &before);
    req[0] = (MsMergeReq) { .host = pg(f, 4), .n = 3, .first_slot = a };
    req[1] = (MsMergeReq) { .host = pg(f, 20), .n = 2,
                            .first_slot = MS_MERGE_ZERO };
    req[2] = (MsMergeReq) { .host = pg(f, 30), .n = 4, .first_slot = b,
                            .changed = changed };
    g_assert_true(ms_merge_runs(f->m, req, 3, &err));
    g_assert_no_error(err);
    g_assert_cmpint(req[0].res.outcome, ==, MS_MERGE_DONE);
    g_assert_cmpint(req[1].res.outcome, ==, MS_MERGE_DONE);
    g_assert_cmpint(req[2].res.outcome, ==, MS_MERGE_CHANGED);
    g_assert_cmpuint(req[2].res.changed, ==, 1);
    g_assert_cmpuint(req[2].res.first_changed, ==, 2);
    g_assert_true(!changed[0] && !changed[1] && changed[2] && !changed[3]);
    read_smaps(f, &after);
    g_assert_cmpuint(before.anon_kb - after.anon_kb, ==, 5 * page / 1024);
    g_assert_cmpmem(f->ram, NPAGES * page, expect, NPAGES * page);
    g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, 5)), ==, a + 1);
    g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, 31)), ==, MS_SLOT_NONE);
    assert_nothing_registered(f);
    check_vmas(f);

    /* A write copies page 5; merging it again maps the store: single path */
    pg(f, 5)[9] ^= 1;
    pg(f, 5)[9] ^= 1;
    req[0] = (MsMergeReq) { .host = pg(f, 5), .n = 1, .first_slot = a + 1 };
    req[1] = (MsMergeReq) { .host = pg(f, 30), .n = 2, .first_slot = b };
    g_assert_true(ms_merge_runs(f->m, req, 2, &err));
    g_assert_cmpint(req[0].res.outcome, ==, MS_MERGE_DONE);
    g_assert_cmpint(req[1].res.outcome, ==, MS_MERGE_DONE);
    g_assert_cmpmem(f->ram, NPAGES * page, expect, NPAGES * page);
    assert_nothing_registered(f);
    check_vmas(f);

    /* Unsorted or overlapping requests are refused before anything */
    req[0] = (MsMergeReq) { .host = pg(f, 40), .n = 2, .first_slot = a };
    req[1] = (MsMergeReq) { .host = pg(f, 41), .n = 1, .first_slot = a };
    g_assert_false(ms_merge_runs(f->m, req, 2, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EINVAL);
    g_assert_cmpmem(f->ram, NPAGES * page, expect, NPAGES * page);
}

/*
 * A second store (a group's) after the first: its slots are numbered on
 * from the first's, runs map the right file, and the last slot of one
 * store and the first of the other are not neighbours.
 */
static void test_two_stores(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsStore) group = ms_store_new(page, 8, &err);
    g_autofree uint8_t *expect = g_malloc(NPAGES * page);
    uint8_t *ram2;
    MsMergeStore ms;
    MsMergeResult res;
    uint32_t last, first;

    (void)data;
    if (f->skip) {
        return;
    }
    g_assert_no_error(err);
    ram2 = mmap(NULL, NPAGES * page, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    g_assert_true(ram2 != MAP_FAILED);
    madvise(ram2, NPAGES * page, MADV_NOHUGEPAGE);
    for (size_t i = 0; i < NPAGES; i++) {
        fill(ram2 + i * page, 5000 + i);
    }
    ms = (MsMergeStore) {
        .fd = ms_store_ro_fd(f->store),
        .view = ms_store_view(f->store, 0),
        .nslots = NSLOTS,
        .fd2 = ms_store_ro_fd(group),
        .view2 = ms_store_view(group, 0),
        .nslots2 = 8,
    };
    g_assert_true(ms_merger_add_region(f->m, ram2, NPAGES,
                                       MS_REGION_NOHUGEPAGE, &ms, &err));
    /* Page 10 onto the first store's last slot, 11 onto the group's first */
    g_assert_true(ms_store_alloc_run(f->store, NSLOTS - 1, 1, &last, &err));
    g_assert_cmpuint(last, ==, NSLOTS - 1);
    g_assert_true(ms_store_publish(f->store, last, ram2 + 10 * page, &err));
    g_assert_true(ms_store_alloc_run(group, 0, 1, &first, &err));
    g_assert_true(ms_store_publish(group, first, ram2 + 11 * page, &err));
    memcpy(expect, ram2, NPAGES * page);
    g_assert_true(ms_merge_run(f->m, ram2 + 10 * page, 1, last, NULL, &res,
                               &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
    g_assert_true(ms_merge_run(f->m, ram2 + 11 * page, 1, NSLOTS + first,
                               NULL, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
    g_assert_no_error(err);
    /* Two mappings of two files: 10, 11, and the anonymous rest twice */
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 3);
    g_assert_cmpmem(ram2, NPAGES * page, expect, NPAGES * page);
    g_assert_cmpuint(ms_merger_slot_at(f->m, ram2 + 11 * page), ==,
                     NSLOTS + first);
    /* The group's page is the group's memfd */
    g_assert_cmpmem(ram2 + 11 * page, page, ms_store_view(group, first),
                    page);
    /* A run may not straddle the two stores, nor pass the second's end */
    g_assert_false(ms_merge_run(f->m, ram2 + 20 * page, 2, NSLOTS - 1, NULL,
                                &res, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EINVAL);
    g_clear_error(&err);
    g_assert_false(ms_merge_run(f->m, ram2 + 20 * page, 2, NSLOTS + 7, NULL,
                                &res, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EINVAL);
    g_clear_error(&err);

    /*
     * A new second store (a broker that came back) is numbered after the
     * old one, whose pages stay: the old store's last slot and the new
     * one's first are not neighbours, and old numbers take no new merge.
     */
    {
        g_autoptr(MsStore) group2 = ms_store_new(page, 8, &err);
        uint32_t base, s7, n0;

        g_assert_true(ms_store_alloc_run(group, 7, 1, &s7, &err));
        g_assert_true(ms_store_publish(group, s7, ram2 + 30 * page, &err));
        g_assert_true(ms_merge_run(f->m, ram2 + 30 * page, 1, NSLOTS + s7,
                                   NULL, &res, &err));
        g_assert_true(ms_merger_replace_second_store(
            f->m, ram2, ms_store_ro_fd(group2), ms_store_view(group2, 0), 8,
            &base, &err));
        g_assert_cmpuint(base, ==, NSLOTS + 8);
        g_assert_true(ms_store_alloc_run(group2, 0, 1, &n0, &err));
        g_assert_true(ms_store_publish(group2, n0, ram2 + 31 * page, &err));
        g_assert_true(ms_merge_run(f->m, ram2 + 31 * page, 1, base + n0, NULL,
                                   &res, &err));
        g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
        /*
         * 10, 11, 30, 31: four mappings in two pairs, 6 VMAs added (5 if
         * 30 and 31 were taken for one)
         */
        g_assert_cmpint(ms_merger_vmas(f->m), ==, 6);
        g_assert_cmpmem(ram2, NPAGES * page, expect, NPAGES * page);
        g_assert_cmpmem(ram2 + 31 * page, page, ms_store_view(group2, n0),
                        page);
        g_assert_false(ms_merge_run(f->m, ram2 + 40 * page, 1, NSLOTS + 1,
                                    NULL, &res, &err));
        g_assert_error(err, MS_ENGINE_ERROR, EINVAL);
        ms_merger_remove_region(f->m, ram2);
    }
    munmap(ram2, NPAGES * page);
}

/* ---- a merger over RAM an earlier one left store mappings in ---- */

/* The second store of the restart test: a group's, written "by the broker" */
#define GSLOTS 16

static MsMerger *merger_with_group(Fixture *f, int gfd, const void *gview)
{
    g_autoptr(GError) err = NULL;
    MsMergeStore ms = {
        .fd = ms_store_ro_fd(f->store),
        .view = ms_store_view(f->store, 0),
        .nslots = NSLOTS,
        .fd2 = gfd,
        .view2 = gview,
        .nslots2 = GSLOTS,
    };
    MsMerger *m = ms_merger_new(&err);

    g_assert_no_error(err);
    g_assert_true(ms_merger_add_region(m, f->ram, NPAGES,
                                       MS_REGION_NOHUGEPAGE, &ms, &err));
    g_assert_no_error(err);
    return m;
}

static bool page_is_zero(const uint8_t *p)
{
    for (size_t i = 0; i < page; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

/*
 * The group store of the restart tests: slots 0-2 hold pages 3-5, slot 3
 * page 7, as the first run uploaded them.
 */
static int restart_store(Fixture *f, int *ro, uint8_t **gview)
{
    g_autofree char *path = NULL;
    int gfd = memfd_create("test-group-store", MFD_CLOEXEC);

    g_assert_cmpint(gfd, >=, 0);
    g_assert_cmpint(ftruncate(gfd, GSLOTS * page), ==, 0);
    g_assert_cmpint(pwrite(gfd, pg(f, 3), 3 * page, 0), ==,
                    (ssize_t)(3 * page));
    g_assert_cmpint(pwrite(gfd, pg(f, 7), page, 3 * page), ==,
                    (ssize_t)page);
    path = g_strdup_printf("/proc/self/fd/%d", gfd);
    *ro = open(path, O_RDONLY | O_CLOEXEC);
    g_assert_cmpint(*ro, >=, 0);
    *gview = mmap(NULL, GSLOTS * page, PROT_READ, MAP_SHARED, *ro, 0);
    g_assert_true(*gview != MAP_FAILED);
    return gfd;
}

/* The first run: merge, then stop with an unmerge, as mode=user does */
static void restart_first_run(Fixture *f, int ro, const uint8_t *gview)
{
    g_autoptr(GError) err = NULL;
    MsMergeResult res;
    MsMerger *m = merger_with_group(f, ro, gview);

    g_assert_true(ms_merge_run(m, pg(f, 3), 3, NSLOTS, NULL, &res, &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
    g_assert_true(ms_merge_run(m, pg(f, 7), 1, NSLOTS + 3, NULL, &res,
                               &err));
    g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
    g_assert_true(ms_unmerge(m, f->ram, NPAGES, &err));
    g_assert_no_error(err);
    ms_merger_remove_region(m, f->ram);
    ms_merger_free(m);
}

/*
 * What an unmerge that only takes copy-on-write faults leaves (8af7614's,
 * or one that could not map anonymous memory): the store's VMAs, with
 * private copies inside.  Made by hand, so that the new merger's view of
 * such mappings is tested whatever ms_unmerge() does.
 */
static void restart_store_vmas(Fixture *f, int ro)
{
    g_autofree uint8_t *save = g_memdup2(pg(f, 3), 5 * page);

    g_assert_true(mmap(pg(f, 3), 3 * page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_FIXED, ro, 0) != MAP_FAILED);
    g_assert_true(mmap(pg(f, 7), page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_FIXED, ro, 3 * page) !=
                  MAP_FAILED);
    for (size_t i = 0; i < 5; i++) {
        if (i != 3) {
            /* the private copy of every page, as the unmerge made */
            pg(f, 3 + i)[0] = save[i * page];
        }
    }
    g_assert_cmpmem(pg(f, 3), 5 * page, save, 5 * page);
}

/*
 * mode=user stops with an unmerge and starts again with a new merger;
 * the broker meanwhile gives the group's freed slots other contents.
 * The guest zeroes a page that was merged and the new merger makes it a
 * hole; another is discarded (balloon): both must read zeros, not the
 * slot's new content.  A page that refuses a zero merge (not zero) must
 * leave the VMAs as the model says, and nothing registered.  On 8af7614
 * the new merger took every page for anonymous memory, and MADV_DONTNEED
 * brought the slots' content back (@data: the old mappings made by hand).
 */
static void test_restart_labels(Fixture *f, gconstpointer data)
{
    bool by_hand = GPOINTER_TO_INT(data);
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *other = g_malloc(page);
    g_autofree uint8_t *want = g_malloc(page);
    MsMergeResult res;
    MsMerger *m;
    uint8_t *gview;
    int gfd, ro;

    if (f->skip) {
        return;
    }
    gfd = restart_store(f, &ro, &gview);
    /* The fixture's merger gives the region to the first run's */
    ms_merger_remove_region(f->m, f->ram);
    if (by_hand) {
        restart_store_vmas(f, ro);
    } else {
        restart_first_run(f, ro, gview);
    }

    /* The broker frees slots 0 and 3 and stores other pages there */
    fill(other, 4242);
    g_assert_cmpint(pwrite(gfd, other, page, 0), ==, (ssize_t)page);
    g_assert_cmpint(pwrite(gfd, other, page, 3 * page), ==, (ssize_t)page);
    g_assert_true(memcmp(pg(f, 3), gview, page) != 0);
    m = merger_with_group(f, ro, gview);
    for (size_t i = 3; i < 8; i++) {
        g_assert_cmpuint(ms_merger_slot_at(m, pg(f, i)), ==, MS_SLOT_NONE);
    }
    assert_nothing_registered(f);
    check_vmas_of(f, m);

    /* Page 4 is not zero: refused, and its VMA is as it was */
    g_assert_true(ms_merge_zero(m, pg(f, 4), 1, NULL, &res, &err));
    g_assert_no_error(err);
    g_assert_cmpint(res.outcome, ==, MS_MERGE_CHANGED);
    assert_nothing_registered(f);
    check_vmas_of(f, m);

    /* The guest zeroes page 3; the new run makes it a hole */
    memset(pg(f, 3), 0, page);
    g_assert_true(ms_merge_zero(m, pg(f, 3), 1, NULL, &res, &err));
    g_assert_no_error(err);
    g_assert_cmpint(res.outcome, ==, MS_MERGE_DONE);
    g_assert_true(page_is_zero(pg(f, 3)));
    /* Page 7 is ballooned */
    g_assert_true(ms_merge_discard(m, pg(f, 7), 1, &err));
    g_assert_no_error(err);
    g_assert_true(page_is_zero(pg(f, 7)));
    /* Every other page holds what it held */
    for (size_t i = 0; i < NPAGES; i++) {
        if (i == 3 || i == 7) {
            continue;
        }
        fill(want, 1000 + i);
        g_assert_cmpmem(pg(f, i), page, want, page);
    }
    assert_nothing_registered(f);
    check_vmas_of(f, m);
    ms_merger_remove_region(m, f->ram);
    ms_merger_free(m);

    /* Back to the fixture's merger, for its teardown */
    {
        MsMergeStore ms = {
            .fd = ms_store_ro_fd(f->store),
            .view = ms_store_view(f->store, 0),
            .nslots = NSLOTS,
        };

        g_assert_true(ms_merger_add_region(f->m, f->ram, NPAGES,
                                           MS_REGION_NOHUGEPAGE, &ms, &err));
    }
    munmap(gview, GSLOTS * page);
    close(ro);
    close(gfd);
}

/* ---- failed remaps: fault injection (issue 15, item 5) ---- */

/*
 * A failed remap must leave every page with exactly its content, mapped
 * (see "Failed remaps" in merge.c).  Each test checks every byte of the
 * RAM afterwards, that all of it is mapped, and that a writer which went
 * to sleep in the freeze lost nothing: the merger calls back while the
 * run is frozen (ms_merger_inject_remap_failure()), the writer starts its
 * write then and must still be asleep 20 ms later.
 */

#define FAIL_FIRST 20   /* the run under test: anonymous neighbours */
#define FAIL_N 3
#define FAIL_WORD 256   /* byte offset of the sleeper's word */

typedef struct Sleeper {
    pthread_t thread;
    uint64_t *word;
    uint64_t value;
    int go;
    int started;
    int done;
    bool slept;         /* still writing 20 ms after it started */
} Sleeper;

static void *sleeper_main(void *opaque)
{
    Sleeper *w = opaque;

    while (!g_atomic_int_get(&w->go)) {
        g_usleep(100);
    }
    g_atomic_int_set(&w->started, 1);
    /* volatile: the store itself is the point, it must fault */
    *(volatile uint64_t *)w->word = w->value;
    g_atomic_int_set(&w->done, 1);
    return NULL;
}

static void sleeper_start(Sleeper *w, uint64_t *word, uint64_t value)
{
    *w = (Sleeper) { .word = word, .value = value };
    g_assert_cmpint(pthread_create(&w->thread, NULL, sleeper_main, w), ==,
                    0);
}

/* Called by the merger with the run frozen: the write must sleep */
static void sleeper_frozen(void *opaque)
{
    Sleeper *w = opaque;

    g_atomic_int_set(&w->go, 1);
    while (!g_atomic_int_get(&w->started)) {
        g_usleep(100);
    }
    g_usleep(20000);
    w->slept = !g_atomic_int_get(&w->done);
}

static void sleeper_join(Sleeper *w)
{
    pthread_join(w->thread, NULL);
    g_assert_true(w->slept);
    g_assert_true(g_atomic_int_get(&w->done));
}

/* All of the RAM holds @expect, is mapped, frozen nowhere, modelled */
static void assert_ram_intact(Fixture *f, const uint8_t *expect)
{
    assert_ram_mapped(f);
    for (size_t i = 0; i < NPAGES; i++) {
        if (memcmp(pg(f, i), expect + i * page, page)) {
            g_error("page %zu changed", i);
        }
    }
    assert_nothing_registered(f);
    check_vmas(f);
}

typedef enum FailKind {
    FAIL_MERGE,         /* anonymous pages onto new slots: ms_merge_run() */
    FAIL_BATCH,         /* the same through ms_merge_runs() */
    FAIL_REMERGE,       /* pages that map slots, onto other slots */
    FAIL_ZERO_STORE,    /* zero pages that map the store: ms_merge_zero() */
} FailKind;

typedef struct FailCase {
    FailKind kind;
    bool hole;
} FailCase;

/* Attempt the merge of @kind on the run (set up by the caller) */
static MsMergeOutcome fail_attempt(Fixture *f, FailKind kind, uint32_t slot)
{
    g_autoptr(GError) err = NULL;
    MsMergeReq req = {
        .host = pg(f, FAIL_FIRST), .n = FAIL_N, .first_slot = slot,
    };
    MsMergeResult res;

    switch (kind) {
    case FAIL_BATCH:
        g_assert_true(ms_merge_runs(f->m, &req, 1, &err));
        g_assert_no_error(err);
        return req.res.outcome;
    case FAIL_ZERO_STORE:
        g_assert_true(ms_merge_zero(f->m, pg(f, FAIL_FIRST), FAIL_N, NULL,
                                    &res, &err));
        break;
    default:
        g_assert_true(ms_merge_run(f->m, pg(f, FAIL_FIRST), FAIL_N, slot,
                                   NULL, &res, &err));
        break;
    }
    g_assert_no_error(err);
    return res.outcome;
}

static void test_remap_fail(Fixture *f, gconstpointer data)
{
    const FailCase *c = data;
    g_autofree uint8_t *expect = NULL;
    uint32_t old = MS_SLOT_NONE, slot;
    uint64_t *word = (uint64_t *)(pg(f, FAIL_FIRST + 1) + FAIL_WORD);
    Sleeper w;

    if (f->skip) {
        return;
    }
    if (c->kind == FAIL_ZERO_STORE) {
        memset(pg(f, FAIL_FIRST), 0, FAIL_N * page);
    }
    if (c->kind == FAIL_REMERGE || c->kind == FAIL_ZERO_STORE) {
        old = publish_copy(f, FAIL_FIRST, FAIL_N, MS_SLOT_NONE);
        g_assert_cmpint(merge(f, FAIL_FIRST, FAIL_N, old), ==,
                        MS_MERGE_DONE);
    }
    slot = c->kind == FAIL_ZERO_STORE ? MS_MERGE_ZERO
         : publish_copy(f, FAIL_FIRST, FAIL_N, MS_SLOT_NONE);
    expect = g_memdup2(f->ram, NPAGES * page);
    sleeper_start(&w, word, 0x5eed5eed5eed5eedULL);
    *(uint64_t *)(expect + (FAIL_FIRST + 1) * page + FAIL_WORD) = w.value;

    ms_merger_inject_remap_failure(f->m, ENOMEM, c->hole, sleeper_frozen,
                                   &w);
    g_assert_cmpint(fail_attempt(f, c->kind, slot), ==, MS_MERGE_NO_MEMORY);
    sleeper_join(&w);
    assert_ram_intact(f, expect);
    for (size_t k = 0; k < FAIL_N; k++) {
        /* Intact: as before; restored: anonymous */
        g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, FAIL_FIRST + k)), ==,
                         c->hole || old == MS_SLOT_NONE ? MS_SLOT_NONE
                                                        : old + k);
    }

    /* Nothing is left armed or broken: the same pages merge now */
    slot = publish_copy(f, FAIL_FIRST, FAIL_N, MS_SLOT_NONE);
    g_assert_cmpint(merge(f, FAIL_FIRST, FAIL_N, slot), ==, MS_MERGE_DONE);
    assert_ram_intact(f, expect);
    g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, FAIL_FIRST)), ==, slot);
}

/* A discard whose remap fails with a hole reads zeros, mapped */
static void test_remap_fail_discard(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *expect = NULL;
    uint32_t slot;
    bool ok;

    (void)data;
    if (f->skip) {
        return;
    }
    slot = publish_copy(f, FAIL_FIRST, FAIL_N, MS_SLOT_NONE);
    g_assert_cmpint(merge(f, FAIL_FIRST, FAIL_N, slot), ==, MS_MERGE_DONE);
    expect = g_memdup2(f->ram, NPAGES * page);
    memset(expect + FAIL_FIRST * page, 0, FAIL_N * page);
    ms_merger_inject_remap_failure(f->m, ENOMEM, true, NULL, NULL);
    ok = ms_merge_discard(f->m, pg(f, FAIL_FIRST), FAIL_N, &err);
    g_test_message("discard over a hole: %s", ok ? "done" : err->message);
    assert_ram_intact(f, expect);
}

/*
 * The mremap() of an unmerge fails (see "Unmerging" in merge.c): intact,
 * the pages take their copy-on-write faults in the store's VMAs; over a
 * hole, the copy made while frozen is moved in.  Either way every byte is
 * kept, the sleeper's write included, and no page maps its slot.
 */
static void test_unmerge_fail(Fixture *f, gconstpointer data)
{
    bool hole = GPOINTER_TO_INT(data);
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *expect = NULL;
    uint64_t *word = (uint64_t *)(pg(f, FAIL_FIRST + 1) + FAIL_WORD);
    bool shared[FAIL_N];
    uint32_t slot;
    Sleeper w;

    if (f->skip) {
        return;
    }
    slot = publish_copy(f, FAIL_FIRST, FAIL_N, MS_SLOT_NONE);
    g_assert_cmpint(merge(f, FAIL_FIRST, FAIL_N, slot), ==, MS_MERGE_DONE);
    expect = g_memdup2(f->ram, NPAGES * page);
    sleeper_start(&w, word, 0x0123456789abcdefULL);
    *(uint64_t *)(expect + (FAIL_FIRST + 1) * page + FAIL_WORD) = w.value;

    ms_merger_inject_remap_failure(f->m, ENOMEM, hole, sleeper_frozen, &w);
    g_assert_true(ms_unmerge(f->m, f->ram, NPAGES, &err));
    g_assert_no_error(err);
    sleeper_join(&w);
    assert_ram_intact(f, expect);
    g_assert_cmpuint(shared_pages(f, FAIL_FIRST, FAIL_N, shared), ==, 0);
    g_assert_cmpint(ram_file_vmas(f), ==, hole ? 0 : 1);
    for (size_t k = 0; k < FAIL_N; k++) {
        g_assert_true(ms_store_put(f->store, slot + k));
    }
    assert_ram_intact(f, expect);

    /* Nothing is left armed: the next unmerge leaves anonymous memory */
    slot = publish_copy(f, FAIL_FIRST, FAIL_N, MS_SLOT_NONE);
    g_assert_cmpint(merge(f, FAIL_FIRST, FAIL_N, slot), ==, MS_MERGE_DONE);
    g_assert_true(ms_unmerge(f->m, f->ram, NPAGES, &err));
    g_assert_cmpint(ram_file_vmas(f), ==, 0);
    assert_ram_intact(f, expect);
}

/*
 * Writers hammer pages while every remap fails (without a hole: over a
 * hole, a thread that was not asleep in the freeze already would fault
 * on nothing, on the old kernels too; the sleeper tests cover holes).
 */
static void test_remap_fail_writers(Fixture *f, gconstpointer data)
{
    g_autoptr(GRand) rand = g_rand_new_with_seed(7);
    g_autofree uint8_t *expect = NULL;
    Writer w[NWRITERS];
    int stop = false;
    uint64_t nomem = 0, changed = 0, lost = 0, writes = 0, slow = 0;
    gint64 end;
    MsStoreStats st;

    (void)data;
    if (f->skip) {
        return;
    }
    expect = g_memdup2(f->ram, NPAGES * page);
    for (unsigned i = 0; i < NWRITERS; i++) {
        w[i] = (Writer) { .f = f, .id = i, .stop = &stop };
        for (size_t p = 0; p < HAMMER_PAGES; p++) {
            w[i].last[p] = *writer_word(f, p, i);
        }
        g_assert_cmpint(pthread_create(&w[i].thread, NULL, writer_main,
                                       &w[i]), ==, 0);
    }
    end = g_get_monotonic_time() + G_USEC_PER_SEC;
    for (unsigned pass = 0; g_get_monotonic_time() < end; pass++) {
        g_autoptr(GError) err = NULL;
        size_t p = g_rand_int_range(rand, 0, HAMMER_PAGES);
        size_t n = g_rand_int_range(rand, 1, 5);
        MsMergeReq req;
        uint32_t first;

        n = MIN(n, HAMMER_PAGES - p);
        first = publish_copy(f, p, n, MS_SLOT_NONE);
        req = (MsMergeReq) { .host = pg(f, p), .n = n, .first_slot = first };
        ms_merger_inject_remap_failure(f->m, pass % 3 ? ENOMEM : EAGAIN,
                                       false, NULL, NULL);
        if (pass % 2) {
            g_assert_true(ms_merge_runs(f->m, &req, 1, &err));
        } else {
            g_assert_true(ms_merge_run(f->m, req.host, n, first, NULL,
                                       &req.res, &err));
        }
        g_assert_no_error(err);
        g_assert_cmpint(req.res.outcome, !=, MS_MERGE_DONE);
        nomem += req.res.outcome == MS_MERGE_NO_MEMORY;
        changed += req.res.outcome == MS_MERGE_CHANGED;
        for (size_t k = 0; k < n; k++) {
            ms_store_put(f->store, first + k);
        }
    }
    ms_merger_inject_remap_failure(f->m, 0, false, NULL, NULL);
    g_atomic_int_set(&stop, true);
    for (unsigned i = 0; i < NWRITERS; i++) {
        pthread_join(w[i].thread, NULL);
        lost += w[i].lost;
        writes += w[i].writes;
        slow += w[i].slow;
        for (size_t p = 0; p < HAMMER_PAGES; p++) {
            *(uint64_t *)(expect + p * page + 64 * (i + 1)) = w[i].last[p];
        }
    }
    g_test_message("%" PRIu64 " remaps failed, %" PRIu64 " changed, %"
                   PRIu64 " writes (%" PRIu64 " slow, %" PRIu64 " lost)",
                   nomem, changed, writes, slow, lost);
    g_assert_cmpuint(lost, ==, 0);
    g_assert_cmpuint(nomem, >, 0);
    assert_ram_intact(f, expect);
    g_assert_cmpint(ms_merger_vmas(f->m), ==, 0);
    ms_store_get_stats(f->store, &st);
    g_assert_cmpuint(st.refs, ==, 0);
}

/*
 * Real exhaustion: the process's map count at vm.max_map_count while the
 * run is frozen, so that the mmap() of an isolated page (+2 VMAs) fails
 * in the kernel.  The process fills its own map count up to the limit
 * with one-page VMAs (every other page of one PROT_NONE mapping made
 * readable, none joins) and unmaps them after the merge: no other
 * process notices.  Only where the limit is too far (raised for games or
 * benchmarks) is the sysctl lowered to the process's map count instead:
 * for the few syscalls of the failing remap only, and always put back
 * (right after the merge, at exit, and on a fatal signal such as a
 * failed assertion's SIGABRT); lowered, it breaks every process with
 * more mappings, parallel tests included.  Tests that read or change the
 * sysctl hold flock(LOCK_EX) on it meanwhile (test-scan too).
 */
#define FILL_MAX 300000     /* VMAs a test may add to reach the limit */

static uint8_t *filler;
static size_t filler_len;
static int map_count_fd = -1;
static char map_count_saved[32];
static size_t map_count_saved_len;
static volatile sig_atomic_t map_count_lowered;

/* Async-signal-safe: called from the handlers too */
static void map_count_restore(void)
{
    if (map_count_lowered) {
        if (pwrite(map_count_fd, map_count_saved, map_count_saved_len, 0) !=
            (ssize_t)map_count_saved_len) {
            static const char msg[] = "test-merge: cannot restore "
                                      "vm.max_map_count\n";

            (void)!write(2, msg, sizeof(msg) - 1);
        }
        map_count_lowered = 0;
    }
}

static void map_count_signal(int sig)
{
    map_count_restore();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Open and save the sysctl, once; false if it cannot be written */
static bool map_count_prepare(void)
{
    static const int sigs[] = { SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE,
                                SIGINT, SIGTERM, SIGTRAP };
    ssize_t len;

    if (map_count_fd >= 0) {
        return true;
    }
    map_count_fd = open("/proc/sys/vm/max_map_count", O_RDWR | O_CLOEXEC);
    if (map_count_fd < 0) {
        return false;
    }
    len = pread(map_count_fd, map_count_saved, sizeof(map_count_saved) - 1,
                0);
    g_assert_cmpint(len, >, 0);
    map_count_saved_len = len;
    atexit(map_count_restore);
    for (size_t i = 0; i < G_N_ELEMENTS(sigs); i++) {
        struct sigaction sa = { .sa_handler = map_count_signal };

        sigaction(sigs[i], &sa, NULL);
    }
    return true;
}

/*
 * VMAs of the process: /proc/self/maps lines, [vsyscall] is none.  Read
 * into a static buffer: at the limit, malloc() cannot map a big one.
 */
static int map_count(void)
{
    static const char gate[] = "[vsyscall]";
    static char buf[65536];
    size_t keep = 0;
    int count = 0, fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    bool has_gate = false;
    ssize_t got;

    g_assert_cmpint(fd, >=, 0);
    while ((got = read(fd, buf + keep, sizeof(buf) - 1 - keep)) > 0) {
        size_t len = keep + got;

        buf[len] = '\0';
        for (size_t i = keep; i < len; i++) {
            count += buf[i] == '\n';
        }
        has_gate |= strstr(buf, gate) != NULL;
        /* A name cut at the end of this read is found in the next */
        keep = MIN(len, sizeof(gate) - 1);
        memmove(buf, buf + len - keep, keep);
    }
    g_assert_cmpint(got, ==, 0);
    close(fd);
    return count - has_gate;
}

static void map_count_lower(void)
{
    g_autofree char *value = g_strdup_printf("%d\n", map_count());

    map_count_lowered = 1;
    g_assert_cmpint(pwrite(map_count_fd, value, strlen(value), 0), ==,
                    (ssize_t)strlen(value));
}

/* Serialise with other tests that read or change the sysctl */
static int map_count_lock(void)
{
    int fd = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC);

    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(flock(fd, LOCK_EX), ==, 0);
    return fd;
}

/* Make one-page VMAs until the process has vm.max_map_count of them */
static void map_count_fill(void)
{
    int64_t limit = ms_max_map_count();

    filler_len = (size_t)(limit - map_count() + 4) * 2 * page;
    filler = mmap(NULL, filler_len, PROT_NONE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    g_assert_true(filler != MAP_FAILED);
    /* Interior pages split twice: at the limit, the last one splits once */
    for (size_t off = page; off < filler_len; off += 2 * page) {
        if (mprotect(filler + off, page, PROT_READ) < 0) {
            g_assert_cmpint(errno, ==, ENOMEM);
            break;
        }
    }
    if (map_count() == limit - 1) {
        /* The tail is PROT_NONE still: one split at its end */
        mprotect(filler + filler_len - page, page, PROT_READ);
    }
}

static void map_count_unfill(void)
{
    if (filler) {
        munmap(filler, filler_len);
        filler = NULL;
    }
}

static void exhaust_map_count(void *opaque)
{
    sleeper_frozen(opaque);
    if (map_count_fd >= 0) {
        map_count_lower();
    } else {
        map_count_fill();
        g_assert_cmpint(map_count(), ==, ms_max_map_count());
    }
}

/* RLIMIT_AS one page below the address space in use, while frozen */
static struct rlimit as_saved;

static void exhaust_address_space(void *opaque)
{
    g_autofree char *text = NULL;
    struct rlimit low;
    const char *vm;

    if (opaque) {
        sleeper_frozen(opaque);
    }
    g_assert_true(g_file_get_contents("/proc/self/status", &text, NULL,
                                      NULL));
    vm = strstr(text, "VmSize:");
    g_assert_nonnull(vm);
    g_assert_cmpint(getrlimit(RLIMIT_AS, &as_saved), ==, 0);
    low = as_saved;
    low.rlim_cur = g_ascii_strtoull(vm + 7, NULL, 10) * 1024 - page;
    g_assert_cmpint(setrlimit(RLIMIT_AS, &low), ==, 0);
}

static void test_remap_exhausted(Fixture *f, gconstpointer data)
{
    bool rlimit = GPOINTER_TO_INT(data);
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *expect = NULL;
    uint64_t *word = (uint64_t *)(pg(f, FAIL_FIRST) + FAIL_WORD);
    int64_t budget = ms_merger_budget(f->m);
    MsMergeResult res;
    uint32_t slot;
    Sleeper w;
    bool ok;
    int lock;

    if (f->skip) {
        return;
    }
    lock = rlimit ? -1 : map_count_lock();
    if (!rlimit && ms_max_map_count() - map_count() > FILL_MAX &&
        !map_count_prepare()) {
        g_test_skip("vm.max_map_count is too high to reach, and cannot "
                    "be written");
        close(lock);
        return;
    }
    /* The engine's own budget must not refuse first */
    ms_merger_set_budget(f->m, G_MAXINT64 / 2);
    slot = publish_copy(f, FAIL_FIRST, 1, MS_SLOT_NONE);
    expect = g_memdup2(f->ram, NPAGES * page);
    sleeper_start(&w, word, 0xfeedfacefeedfaceULL);
    *(uint64_t *)(expect + FAIL_FIRST * page + FAIL_WORD) = w.value;
    ms_merger_inject_remap_failure(f->m, 0, false, rlimit ?
                                   exhaust_address_space : exhaust_map_count,
                                   &w);
    ok = ms_merge_run(f->m, pg(f, FAIL_FIRST), 1, slot, NULL, &res, &err);
    /* Before anything else, assertions included */
    if (rlimit) {
        g_assert_cmpint(setrlimit(RLIMIT_AS, &as_saved), ==, 0);
    } else {
        map_count_unfill();
        map_count_restore();
    }
    g_assert_no_error(err);
    g_assert_true(ok);
    g_assert_cmpint(res.outcome, ==, MS_MERGE_NO_MEMORY);
    sleeper_join(&w);
    assert_ram_intact(f, expect);
    g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, FAIL_FIRST)), ==,
                     MS_SLOT_NONE);

    /* With the limit back, the merge succeeds */
    ms_store_put(f->store, slot);
    slot = publish_copy(f, FAIL_FIRST, 1, MS_SLOT_NONE);
    g_assert_cmpint(merge(f, FAIL_FIRST, 1, slot), ==, MS_MERGE_DONE);
    g_assert_cmpuint(ms_merger_slot_at(f->m, pg(f, FAIL_FIRST)), ==, slot);
    assert_ram_intact(f, expect);
    ms_merger_set_budget(f->m, budget);
    if (lock >= 0) {
        close(lock);
    }
}

static void teardown_exhausted(Fixture *f, gconstpointer data)
{
    map_count_unfill();
    map_count_restore();
    teardown(f, data);
}

/*
 * When even the restore fails (here: RLIMIT_AS below what the process
 * maps once the hole is there, so no mapping can be made), the process
 * stops and says why, instead of waking anyone over the hole.
 */
static void exhaust_after_hole(void *opaque)
{
    struct rlimit low = { .rlim_cur = 0, .rlim_max = 0 };

    (void)opaque;
    /* No core file for the abort() this test wants */
    setrlimit(RLIMIT_CORE, &low);
    exhaust_address_space(NULL);
}

static void test_remap_fail_fatal(Fixture *f, gconstpointer data)
{
    const FailCase *c = data;

    if (f->skip) {
        return;
    }
    if (g_test_subprocess()) {
        uint32_t slot = c->kind == FAIL_ZERO_STORE ? MS_MERGE_ZERO :
                        publish_copy(f, FAIL_FIRST, FAIL_N, MS_SLOT_NONE);

        if (c->kind == FAIL_ZERO_STORE) {
            memset(pg(f, FAIL_FIRST), 0, FAIL_N * page);
            slot = publish_copy(f, FAIL_FIRST, FAIL_N, MS_SLOT_NONE);
            g_assert_cmpint(merge(f, FAIL_FIRST, FAIL_N, slot), ==,
                            MS_MERGE_DONE);
            slot = MS_MERGE_ZERO;
        }
        ms_merger_inject_remap_failure(f->m, ENOMEM, true,
                                       exhaust_after_hole, NULL);
        fail_attempt(f, c->kind, slot);
        g_error("the merge returned over a hole it could not restore");
    }
    g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
    g_test_trap_assert_failed();
    g_test_trap_assert_stderr("*mem-share: cannot restore guest memory at "
                              "0x* after a failed remap: *Cannot allocate "
                              "memory*");
}

static const FailCase fail_cases[] = {
    { FAIL_MERGE, false }, { FAIL_MERGE, true },
    { FAIL_BATCH, false }, { FAIL_BATCH, true },
    { FAIL_REMERGE, false }, { FAIL_REMERGE, true },
    { FAIL_ZERO_STORE, false }, { FAIL_ZERO_STORE, true },
};

static const char *const fail_kind_names[] = {
    [FAIL_MERGE] = "merge", [FAIL_BATCH] = "batch",
    [FAIL_REMERGE] = "remerge", [FAIL_ZERO_STORE] = "zero-store",
};

static void add_remap_fail_tests(void)
{
    for (size_t i = 0; i < G_N_ELEMENTS(fail_cases); i++) {
        g_autofree char *path = g_strdup_printf(
            "/merge/remap-fail/%s/%s", fail_kind_names[fail_cases[i].kind],
            fail_cases[i].hole ? "hole" : "intact");

        g_test_add(path, Fixture, &fail_cases[i], setup, test_remap_fail,
                   teardown);
    }
    g_test_add("/merge/remap-fail/unmerge/intact", Fixture,
               GINT_TO_POINTER(false), setup, test_unmerge_fail, teardown);
    g_test_add("/merge/remap-fail/unmerge/hole", Fixture,
               GINT_TO_POINTER(true), setup, test_unmerge_fail, teardown);
    g_test_add("/merge/remap-fail/discard-hole", Fixture, NULL, setup,
               test_remap_fail_discard, teardown);
    g_test_add("/merge/remap-fail/writers", Fixture, NULL, setup,
               test_remap_fail_writers, teardown);
    g_test_add("/merge/remap-fail/max-map-count", Fixture,
               GINT_TO_POINTER(false), setup, test_remap_exhausted,
               teardown_exhausted);
    g_test_add("/merge/remap-fail/rlimit-as", Fixture, GINT_TO_POINTER(true),
               setup, test_remap_exhausted, teardown);
    /* fail_cases[1] and [7]: a merge and a zero merge, over a hole */
    g_test_add("/merge/remap-fail/fatal/merge", Fixture, &fail_cases[1],
               setup, test_remap_fail_fatal, teardown);
    g_test_add("/merge/remap-fail/fatal/zero-store", Fixture, &fail_cases[7],
               setup, test_remap_fail_fatal, teardown);
}

static const ThpRefill thp_refill[] = {
    { .batch = false, .advised = true },
    { .batch = true, .advised = true },
    { .batch = false, .advised = false },
};

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    page = ms_host_page_size();

#define ADD(path, fn) \
    g_test_add(path, Fixture, NULL, setup, fn, teardown)
    ADD("/merge/identical", test_identical);
    ADD("/merge/vma-accounting", test_vma_accounting);
    ADD("/merge/vma-bridge-written", test_vma_bridge_written);
    ADD("/merge/changed", test_changed);
    ADD("/merge/dma-pinned", test_dma_pinned);
    ADD("/merge/zero", test_zero);
    ADD("/merge/zero-unpopulated", test_zero_unpopulated);
    g_test_add_func("/merge/thp-collapse", test_thp_collapse);
    g_test_add_data_func("/merge/thp-refill/zero", &thp_refill[0],
                         test_thp_refill);
    g_test_add_data_func("/merge/thp-refill/runs", &thp_refill[1],
                         test_thp_refill);
    g_test_add_data_func("/merge/thp-refill/unadvised", &thp_refill[2],
                         test_thp_refill);
    ADD("/merge/unmerge", test_unmerge);
    ADD("/merge/unmerge-anon", test_unmerge_anon);
    ADD("/merge/discard", test_discard);
    ADD("/merge/budget", test_budget);
    ADD("/merge/budget-process", test_budget_process);
    ADD("/merge/errors", test_errors);
    ADD("/merge/writers", test_writers);
    g_test_add("/merge/writers/unmerge", Fixture, GINT_TO_POINTER(true),
               setup, test_writers, teardown);
    ADD("/merge/runs", test_runs);
    ADD("/merge/two-stores", test_two_stores);
    g_test_add("/merge/restart-labels", Fixture, GINT_TO_POINTER(false),
               setup, test_restart_labels, teardown);
    g_test_add("/merge/restart-labels/store-vmas", Fixture,
               GINT_TO_POINTER(true), setup, test_restart_labels, teardown);
    ADD("/merge/timing/isolated", test_timing);
    ADD("/merge/timing/runs", test_timing_runs);
    ADD("/merge/timing/zero", test_timing_zero);

    add_remap_fail_tests();

    return g_test_run();
}
