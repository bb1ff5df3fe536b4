/*
 * Unit tests for the mem-share scanner (mode=user)
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The scanner runs over this process's own anonymous memory, filled with
 * a known mix: zero pages, a few contents repeated many times, a block
 * duplicated as a whole, and unique pages.  Every expected figure is
 * derived from the fill; what the scanner did is checked against the
 * bytes (they never change), /proc/self/smaps (the memory really went
 * away) and the store's reference counts.  A writer test has threads
 * rewrite pages while they are merged and checks that no write is lost.
 *
 * userfaultfd needs root, CAP_SYS_PTRACE or /dev/userfaultfd: without
 * them the tests are skipped.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <unistd.h>
#include <glib.h>

#include "mem-share/hash.h"
#include "mem-share/ksm.h"
#include "mem-share/merge.h"
#include "mem-share/scan.h"
#include "mem-share/store.h"

#define MIB (1024 * 1024)
#define NDUP 5              /* contents repeated all over the region */
#define MAX_PASSES 12

static size_t page;

typedef struct Fixture {
    MsScanner *s;
    uint8_t *ram;
    size_t npages;
    uint8_t *expect;        /* what the RAM must read */
    /* Derived from the fill */
    size_t zeros;           /* zero pages */
    size_t dup_pages;       /* pages whose content appears twice or more */
    size_t dup_contents;    /* distinct such contents */
    bool skip;
    unsigned long *dirty;   /* the fake dirty log (Params.dirty), or NULL */
    size_t filled;          /* pages the fill wrote; the rest: untouched */
} Fixture;

typedef struct Params {
    size_t mib;
    unsigned stable_scans;
    int64_t vma_budget;
    uint32_t store_slots;
    bool thp;               /* transparent huge pages, as QEMU asks */
    MsZeroMode zero;        /* zero holes or zero slots; AUTO: the host's */
    bool dirty;             /* a dirty log: the test marks what it writes */
    bool from_limit;        /* a budget of a few VMAs, from the sysctl */
    bool half_untouched;    /* the fill leaves the second half untouched */
} Params;

static const Params normal = { .mib = 16, .stable_scans = 1 };
static const Params eager = { .mib = 16, .stable_scans = 0 };
static const Params tiny_budget = { .mib = 16, .stable_scans = 1,
                                    .vma_budget = 6, .zero = MS_ZERO_HOLES };
static const Params tiny_budget_slots = { .mib = 16, .stable_scans = 1,
                                          .vma_budget = 6,
                                          .zero = MS_ZERO_SLOTS };
static const Params limit_budget = { .mib = 16, .stable_scans = 1,
                                     .from_limit = true,
                                     .zero = MS_ZERO_HOLES };
static const Params small_store = { .mib = 16, .stable_scans = 1,
                                    .store_slots = 64 };
static const Params thp = { .mib = 16, .stable_scans = 1, .thp = true };
static const Params big = { .mib = 64, .stable_scans = 1 };
static const Params zero_slots = { .mib = 16, .stable_scans = 1,
                                   .zero = MS_ZERO_SLOTS };
static const Params zero_holes = { .mib = 16, .stable_scans = 1,
                                   .zero = MS_ZERO_HOLES };
static const Params dirty_log = { .mib = 16, .stable_scans = 1,
                                  .dirty = true };
static const Params thp_fresh = { .mib = 16, .stable_scans = 1,
                                  .thp = true, .dirty = true,
                                  .half_untouched = true };

/* Content ids: 0 zero, then duplicated contents, then unique pages */
#define ID_ZERO 0
#define ID_DUP(c) (1 + (c))
#define ID_BLOCK(j) (1000 + (j))
#define ID_UNIQUE(i) (1000000 + (i))

static void fill(void *buf, uint64_t id)
{
    uint64_t *p = buf;

    if (id == ID_ZERO) {
        memset(buf, 0, page);
        return;
    }
    for (size_t i = 0; i < page / sizeof(*p); i++) {
        p[i] = id * 0x9e3779b97f4a7c15ULL + i;
    }
}

/*
 * The mix: an eighth of the region is a block that appears twice (a
 * duplicated file, say: runs of pairs), one page in eight is zero, one
 * in eight one of NDUP contents, the rest unique.
 */
static uint64_t content_id(size_t npages, size_t i)
{
    size_t block = npages / 8, copy = npages / 2;

    if (i < block) {
        return ID_BLOCK(i);
    }
    if (i >= copy && i < copy + block) {
        return ID_BLOCK(i - copy);
    }
    switch (i % 8) {
    case 0:
        return ID_ZERO;
    case 3:
        return ID_DUP((i / 8) % NDUP);
    default:
        return ID_UNIQUE(i);
    }
}

static uint8_t *pg(Fixture *f, size_t i)
{
    return f->ram + i * page;
}

/* Fill the RAM and derive what a perfect scanner merges */
static void fill_ram(Fixture *f)
{
    g_autoptr(GHashTable) count = g_hash_table_new(g_direct_hash,
                                                   g_direct_equal);
    GHashTableIter it;
    gpointer k, v;

    for (size_t i = 0; i < f->filled; i++) {
        uint64_t id = content_id(f->npages, i);

        fill(pg(f, i), id);
        if (id == ID_ZERO) {
            f->zeros++;
            continue;
        }
        v = g_hash_table_lookup(count, GSIZE_TO_POINTER(id));
        g_hash_table_insert(count, GSIZE_TO_POINTER(id),
                            GSIZE_TO_POINTER(GPOINTER_TO_SIZE(v) + 1));
    }
    g_hash_table_iter_init(&it, count);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        if (GPOINTER_TO_SIZE(v) >= 2) {
            f->dup_pages += GPOINTER_TO_SIZE(v);
            f->dup_contents++;
        }
    }
    /* Untouched pages are not read: a read fault could fill them */
    memcpy(f->expect, f->ram, f->filled * page);
    memset(f->expect + f->filled * page, 0, (f->npages - f->filled) * page);
}

static int64_t maps_lines(void)
{
    g_autofree char *text = NULL;
    int64_t n = 0;

    g_assert_true(g_file_get_contents("/proc/self/maps", &text, NULL, NULL));
    for (const char *p = text; *p; p++) {
        n += *p == '\n';
    }
    return n;
}

/* procfs takes a plain write, not g_file_set_contents()'s rename */
static bool set_max_map_count(int64_t value)
{
    g_autofree char *text = g_strdup_printf("%" PRId64 "\n", value);
    int fd = open("/proc/sys/vm/max_map_count", O_WRONLY | O_CLOEXEC);
    bool ok;

    if (fd < 0) {
        return false;
    }
    ok = write(fd, text, strlen(text)) == (ssize_t)strlen(text);
    close(fd);
    return ok;
}

/* The fake dirty log: what QEMU's DIRTY_MEMORY_MEMSHARE client does */
static void dirty_take(void *opaque, size_t first, size_t n, uint64_t *bits)
{
    Fixture *f = opaque;

    g_assert_cmpuint(n, <=, 512);
    for (size_t k = 0; k < n; k++) {
        size_t i = first + k, w = i / (8 * sizeof(long));
        unsigned long bit = 1UL << (i % (8 * sizeof(long)));

        if (f->dirty[w] & bit) {
            f->dirty[w] &= ~bit;
            bits[k / 64] |= 1ULL << (k % 64);
        }
    }
}

static void mark_dirty(Fixture *f, size_t i)
{
    f->dirty[i / (8 * sizeof(long))] |= 1UL << (i % (8 * sizeof(long)));
}

static void setup(Fixture *f, gconstpointer data)
{
    const Params *p = data;
    g_autoptr(GError) err = NULL;
    MsScanConfig cfg;

    memset(f, 0, sizeof(*f));
    f->npages = p->mib * MIB / page;
    f->ram = mmap(NULL, f->npages * page, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    g_assert_true(f->ram != MAP_FAILED);
    /* Without THP unless asked: it blurs the anonymous-memory figures */
    madvise(f->ram, f->npages * page,
            p->thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    f->expect = g_malloc(f->npages * page);
    f->filled = p->half_untouched ? f->npages / 2 : f->npages;
    fill_ram(f);

    ms_scan_config_init(&cfg);
    cfg.host = f->ram;
    cfg.npages = f->npages;
    cfg.region_flags = p->thp ? MS_REGION_HUGEPAGE : MS_REGION_NOHUGEPAGE;
    cfg.stable_scans = p->stable_scans;
    cfg.vma_budget = p->vma_budget;
    if (p->from_limit) {
        /* What the process maps already, and a few VMAs on top */
        cfg.budget_share = (maps_lines() + 32.0) / ms_max_map_count();
    }
    cfg.store_slots = p->store_slots;
    cfg.zero_mode = p->zero;
    if (p->dirty) {
        /* Like a new RAM block: every page dirty */
        f->dirty = g_new(unsigned long, f->npages / (8 * sizeof(long)) + 1);
        memset(f->dirty, 0xff,
               (f->npages / (8 * sizeof(long)) + 1) * sizeof(long));
        cfg.dirty_take = dirty_take;
        cfg.dirty_opaque = f;
    }
    f->s = ms_scanner_new(&cfg, &err);
    if (!f->s) {
        g_test_skip(err->message);
        f->skip = true;
    }
}

static void teardown(Fixture *f, gconstpointer data)
{
    (void)data;
    ms_scanner_free(f->s);
    munmap(f->ram, f->npages * page);
    g_free(f->expect);
    g_free(f->dirty);
}

static void stats(Fixture *f, MsScanStats *st)
{
    ms_scanner_get_stats(f->s, st);
}

/* One full pass from wherever the cursor is */
static void pass(Fixture *f)
{
    g_autoptr(GError) err = NULL;
    size_t scanned;

    ms_scanner_step(f->s, f->npages, &scanned, &err);
    g_assert_no_error(err);
    g_assert_cmpuint(scanned, ==, f->npages);
}

/* Scan until two full passes merge nothing new; returns the passes */
static unsigned converge(Fixture *f)
{
    MsScanStats st;
    uint64_t last = UINT64_MAX;
    unsigned quiet = 0, n;

    for (n = 0; n < MAX_PASSES && quiet < 2; n++) {
        pass(f);
        stats(f, &st);
        quiet = st.merges + st.zero_merges == last ? quiet + 1 : 0;
        last = st.merges + st.zero_merges;
    }
    g_assert_cmpuint(quiet, ==, 2);
    return n;
}

static uint64_t anon_kb(Fixture *f)
{
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    uintptr_t lo = (uintptr_t)f->ram, hi = lo + f->npages * page;
    bool in_ram = false;
    uint64_t total = 0;

    g_assert_true(g_file_get_contents("/proc/self/smaps", &text, NULL, NULL));
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l; l++) {
        uint64_t start, end, kb;

        if (sscanf(*l, "%" SCNx64 "-%" SCNx64 " ", &start, &end) == 2 &&
            strchr(*l, '-') < strchr(*l, ' ')) {
            in_ram = start < hi && end > lo;
        } else if (in_ram && sscanf(*l, "Anonymous: %" SCNu64, &kb) == 1) {
            total += kb;
        }
    }
    return total;
}

/* The references the store holds are exactly the merged pages' */
static void check_refs(Fixture *f)
{
    MsScanStats st;
    MsStoreStats ss;

    stats(f, &st);
    ms_store_get_stats(ms_scanner_store(f->s), &ss);
    g_assert_cmpuint(ss.refs, ==, st.pages_merged);
    g_assert_cmpuint(ss.slots_used, ==, st.slots_used);
    g_assert_cmpuint(ss.published, ==, ss.slots_used);
}

static void check_content(Fixture *f)
{
    for (size_t i = 0; i < f->npages; i++) {
        if (memcmp(pg(f, i), f->expect + i * page, page)) {
            g_error("page %zu changed (content id %" PRIu64 ")", i,
                    content_id(f->npages, i));
        }
    }
}

/* The converged state of the fill: exact figures */
static void check_converged(Fixture *f)
{
    MsScanStats st;

    stats(f, &st);
    g_assert_cmpuint(st.pages_merged, ==, f->dup_pages);
    g_assert_cmpuint(st.zero_holes, ==, f->zeros);
    g_assert_cmpuint(st.slots_used, ==, f->dup_contents);
    /* Zero slots that reads filled hold memory; holes hold none */
    g_assert_cmpuint(st.zero_held, <=, st.zero_slots);
    g_assert_cmpuint(st.bytes_saved, ==,
                     (f->dup_pages - f->dup_contents + f->zeros -
                      st.zero_held) * page);
    g_assert_cmpint(st.vmas, <=, st.vma_budget);
    check_refs(f);
}

static void test_converge(Fixture *f, gconstpointer data)
{
    uint64_t before, after, want;
    unsigned passes;
    MsScanStats st;

    if (f->skip) {
        return;
    }
    before = anon_kb(f);
    passes = converge(f);
    after = anon_kb(f);
    stats(f, &st);
    g_test_message("%zu pages: %zu zero, %zu duplicates of %zu contents; "
                   "converged in %u passes, %" PRId64 " VMAs, %" PRIu64
                   " KiB anonymous -> %" PRIu64, f->npages, f->zeros,
                   f->dup_pages, f->dup_contents, passes, st.vmas, before,
                   after);
    check_converged(f);
    g_assert_cmpuint(st.full_scans, ==, passes);
    if (f->dirty) {
        /* Each page: written (all are, at first), stable, read once */
        g_assert_cmpuint(st.pages_scanned, <=, 2 * f->npages);
        g_assert_cmpuint(st.candidates, <=, f->npages);
    } else {
        g_assert_cmpuint(st.pages_scanned, ==, passes * f->npages);
    }
    g_assert_cmpuint(st.cow_breaks, ==, 0);
    g_assert_cmpuint(st.remerges, ==, 0);
    want = (f->dup_pages - f->dup_contents + f->zeros) * page / 1024;
    if (!((const Params *)data)->thp) {
        g_assert_cmpuint(before - after, >=, want);
    }
    check_content(f);
    if (!st.zero_slots && !ms_read_fault_maps_zero_page()) {
        /*
         * This kernel gives a read of a hole a page of its own (see
         * ms_read_fault_maps_zero_page(), and why zero=auto picks zero
         * slots then): check_content() filled every hole, and the
         * scanner merges them again
         */
        converge(f);
        stats(f, &st);
        g_assert_cmpuint(st.zero_merges, ==, 2 * f->zeros);
    } else {
        /* Reading merged pages and holes changes nothing */
        pass(f);
    }
    check_converged(f);
    check_content(f);
}

/*
 * A remap the kernel refuses (ENOMEM: vm.max_map_count, RLIMIT_AS) is a
 * refusal, not an error: the scanner counts it, goes on with the rest of
 * the pass, and merges the page on a later one.  Failed without and with
 * a hole (as kernels before 6.12 may leave one): every byte stays.
 */
static void test_remap_no_memory(Fixture *f, gconstpointer data)
{
    MsMerger *m;
    MsScanStats st;

    (void)data;
    if (f->skip) {
        return;
    }
    m = ms_scanner_merger(f->s);
    pass(f);
    for (int hole = 0; hole < 2; hole++) {
        ms_merger_inject_remap_failure(m, ENOMEM, hole, NULL, NULL);
        pass(f);
        stats(f, &st);
        g_assert_cmpuint(st.refused_nomem, >, 0);
        check_content(f);
    }
    g_test_message("%" PRIu64 " pages refused for want of memory",
                   st.refused_nomem);
    converge(f);
    check_converged(f);
    check_content(f);
}

/* The @nth page (from 0) with content @id */
static size_t find_page(Fixture *f, uint64_t id, size_t nth)
{
    for (size_t i = 0; i < f->npages; i++) {
        if (content_id(f->npages, i) == id && nth-- == 0) {
            return i;
        }
    }
    g_assert_not_reached();
}

static void test_cow_break(Fixture *f, gconstpointer data)
{
    MsMerger *m;
    MsStore *store;
    MsScanStats st;
    size_t d, b, z;
    uint32_t dslot, bslot, drefs;
    bool shared;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    m = ms_scanner_merger(f->s);
    store = ms_scanner_store(f->s);
    d = find_page(f, ID_DUP(2), 3);
    b = find_page(f, ID_BLOCK(7), 1);
    dslot = ms_merger_slot_at(m, pg(f, d));
    bslot = ms_merger_slot_at(m, pg(f, b));
    drefs = ms_store_refs(store, dslot);
    g_assert_cmpuint(ms_store_refs(store, bslot), ==, 2);

    /* A write breaks only the page written */
    pg(f, d)[10] ^= 1;
    pg(f, b)[20] ^= 1;
    f->expect[d * page + 10] ^= 1;
    f->expect[b * page + 20] ^= 1;
    pass(f);
    stats(f, &st);
    g_assert_cmpuint(st.cow_breaks, ==, 2);
    g_assert_cmpuint(st.pages_merged, ==, f->dup_pages - 2);
    g_assert_cmpuint(ms_store_refs(store, dslot), ==, drefs - 1);
    g_assert_cmpuint(ms_store_refs(store, bslot), ==, 1);
    /* Its neighbours: another duplicate still shared, a unique page not */
    g_assert_cmpuint(content_id(f->npages, d - 8), ==, ID_DUP(1));
    g_assert_true(ms_merge_test_shared(m, pg(f, d - 8), 1, &shared, NULL,
                                       NULL));
    g_assert_true(shared);
    g_assert_true(ms_merge_test_shared(m, pg(f, d + 1), 1, &shared, NULL,
                                       NULL));
    g_assert_false(shared);
    check_refs(f);
    check_content(f);

    /* Identical again: merged again, onto the same slots */
    pg(f, d)[10] ^= 1;
    pg(f, b)[20] ^= 1;
    f->expect[d * page + 10] ^= 1;
    f->expect[b * page + 20] ^= 1;
    converge(f);
    stats(f, &st);
    g_assert_cmpuint(st.remerges, ==, 2);
    check_converged(f);
    g_assert_cmpuint(ms_merger_slot_at(m, pg(f, d)), ==, dslot);
    g_assert_cmpuint(ms_merger_slot_at(m, pg(f, b)), ==, bslot);
    check_content(f);

    /* A zero hole written becomes an ordinary page, then a hole again */
    z = find_page(f, ID_ZERO, 0);
    pg(f, z)[0] = 1;
    pass(f);
    stats(f, &st);
    g_assert_cmpuint(st.zero_holes, ==, f->zeros - 1);
    pg(f, z)[0] = 0;
    converge(f);
    check_converged(f);
    check_content(f);
}

static void test_unmerge_all(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autofree bool *shared = NULL;
    MsStoreStats ss;
    MsScanStats st;
    size_t nshared;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    g_assert_true(ms_scanner_unmerge_all(f->s, &err));
    g_assert_no_error(err);
    ms_store_get_stats(ms_scanner_store(f->s), &ss);
    g_assert_cmpuint(ss.slots_used, ==, 0);
    g_assert_cmpuint(ss.refs, ==, 0);
    stats(f, &st);
    g_assert_cmpuint(st.pages_merged, ==, 0);
    g_assert_cmpuint(st.zero_holes, ==, 0);
    g_assert_cmpuint(st.slots_used, ==, 0);
    g_assert_cmpuint(st.bytes_saved, ==, 0);
    shared = g_new(bool, f->npages);
    g_assert_true(ms_merge_test_shared(ms_scanner_merger(f->s), f->ram,
                                       f->npages, shared, &nshared, &err));
    g_assert_cmpuint(nshared, ==, 0);
    check_content(f);
    /* Scanning may start over */
    converge(f);
    stats(f, &st);
    if (!st.zero_slots && ms_read_fault_maps_zero_page()) {
        /*
         * The zero holes stayed holes, and reading them (check_content)
         * mapped the shared zero page: nothing there to merge again
         */
        g_assert_cmpuint(st.zero_holes, ==, 0);
        g_assert_cmpuint(st.pages_merged, ==, f->dup_pages);
        g_assert_cmpuint(st.slots_used, ==, f->dup_contents);
        check_refs(f);
    } else {
        check_converged(f);
    }
    check_content(f);
}

static void test_budget(Fixture *f, gconstpointer data)
{
    MsScanStats st;
    bool slots = ((const Params *)data)->zero == MS_ZERO_SLOTS;

    if (f->skip) {
        return;
    }
    converge(f);
    stats(f, &st);
    g_test_message("budget %" PRId64 ": %" PRId64 " VMAs, %" PRIu64
                   " pages merged, %" PRIu64 " refused", st.vma_budget,
                   st.vmas, st.pages_merged, st.refused_budget);
    g_assert_cmpint(st.vmas, <=, st.vma_budget);
    g_assert_cmpuint(st.refused_budget, >, 0);
    g_assert_cmpuint(st.pages_merged, <, f->dup_pages);
    if (slots) {
        /* Zero slots are mappings like the others */
        g_assert_cmpuint(st.zero_holes, <, f->zeros);
    } else {
        /* Holes of anonymous pages cost no VMA: all of them */
        g_assert_cmpuint(st.zero_holes, ==, f->zeros);
    }
    check_refs(f);
    check_content(f);
}

/* A full store refuses new slots; everything stays exact */
/*
 * A budget made of vm.max_map_count follows the sysctl: raised, the next
 * passes merge what the budget refused; lowered again, merging stops and
 * every merged page stays.  The sysctl is the host's: the test needs
 * root and puts the old value back before it asserts anything.
 */
static void test_budget_follows_limit(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    int64_t limit = ms_max_map_count();
    MsScanStats before, raised, after;
    bool set;
    int lock;

    (void)data;
    if (f->skip) {
        return;
    }
    /* test-merge fills or lowers the limit meanwhile: wait for it */
    lock = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC);
    g_assert_cmpint(lock, >=, 0);
    g_assert_cmpint(flock(lock, LOCK_EX), ==, 0);
    limit = ms_max_map_count();
    converge(f);
    stats(f, &before);
    g_assert_cmpuint(before.refused_budget, >, 0);
    g_assert_cmpint(before.vmas, <=, before.vma_budget);
    if (!set_max_map_count(limit * 16)) {
        g_test_skip("cannot write /proc/sys/vm/max_map_count (needs root)");
        close(lock);
        return;
    }
    /* The first pass sees the new limit at its end, the next ones use it */
    for (unsigned n = 0; n < 4 && !err; n++) {
        ms_scanner_step(f->s, f->npages, NULL, &err);
    }
    stats(f, &raised);
    set = set_max_map_count(limit);
    close(lock);
    g_assert_true(set);
    g_assert_no_error(err);
    g_test_message("budget %" PRId64 " -> %" PRId64 ": %" PRIu64 " -> %"
                   PRIu64 " pages merged", before.vma_budget,
                   raised.vma_budget, before.pages_merged,
                   raised.pages_merged);
    g_assert_cmpint(raised.vma_budget, >, before.vma_budget * 8);
    g_assert_cmpuint(raised.pages_merged, >, before.pages_merged);
    g_assert_cmpint(raised.vmas, <=, raised.vma_budget);

    pass(f);
    pass(f);
    stats(f, &after);
    g_assert_cmpint(after.vma_budget, <, raised.vma_budget);
    g_assert_cmpuint(after.pages_merged, ==, raised.pages_merged);
    check_refs(f);
    check_content(f);
}

static void test_store_full(Fixture *f, gconstpointer data)
{
    MsScanStats st;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    stats(f, &st);
    g_test_message("%" PRIu64 " slots: %" PRIu64 " pages merged, %" PRIu64
                   " refused", st.slots_used, st.pages_merged,
                   st.refused_store_full);
    g_assert_cmpuint(st.slots_used, ==, 64);
    g_assert_cmpuint(st.refused_store_full, >, 0);
    g_assert_cmpuint(st.pages_merged, <, f->dup_pages);
    g_assert_cmpuint(st.zero_holes, ==, f->zeros);
    check_refs(f);
    check_content(f);
}

/* Pages rewritten between passes are volatile and never merged */
static void test_volatile(Fixture *f, gconstpointer data)
{
    size_t first = find_page(f, ID_DUP(0), 0), nvol = 0;
    MsScanStats st;

    (void)data;
    if (f->skip) {
        return;
    }
    for (unsigned n = 0; n < 6; n++) {
        nvol = 0;
        /* Every other copy of ID_DUP(0) changes before each pass */
        for (size_t i = first; i < f->npages; i += 2 * 8 * NDUP) {
            uint64_t *word = (uint64_t *)pg(f, i);

            if (content_id(f->npages, i) != ID_DUP(0)) {
                continue;   /* the duplicated block */
            }
            *word += 1;
            memcpy(f->expect + i * page, word, sizeof(*word));
            nvol++;
        }
        pass(f);
    }
    stats(f, &st);
    g_assert_cmpuint(st.pages_volatile, ==, nvol);
    g_assert_cmpuint(st.hash_changes, ==, 5 * nvol);
    g_assert_cmpuint(st.pages_merged, ==, f->dup_pages - nvol);
    for (size_t i = first; i < f->npages; i += 2 * 8 * NDUP) {
        g_assert_true(content_id(f->npages, i) != ID_DUP(0) ||
                      ms_merger_slot_at(ms_scanner_merger(f->s),
                                        pg(f, i)) == MS_SLOT_NONE);
    }
    check_refs(f);
    check_content(f);
    /* Once they stop changing they are not volatile any more */
    pass(f);
    stats(f, &st);
    g_assert_cmpuint(st.pages_volatile, ==, 0);
}

/* The first unique page after page @i */
static size_t unique_after(Fixture *f, size_t i)
{
    while (++i < f->npages && content_id(f->npages, i) != ID_UNIQUE(i)) {
        /* next */
    }
    g_assert_cmpuint(i, <, f->npages);
    return i;
}

/*
 * With a dirty log, converged passes visit no page at all (nothing was
 * written, nothing waits), a page the log says was written is read
 * again once it stayed unwritten for a pass and merged once it matches,
 * and a write the log missed is found by a sweep (asked, or the periodic
 * one), never merged on a stale hash.
 */
static void test_dirty_log(Fixture *f, gconstpointer data)
{
    size_t u1 = f->npages / 8 + 1, u2 = f->npages / 8 + 2;
    size_t u3 = unique_after(f, u2);
    size_t d = find_page(f, ID_DUP(1), 0);
    uint32_t slot_d;
    MsScanStats st, st2;

    (void)data;
    if (f->skip) {
        return;
    }
    g_assert_cmpuint(content_id(f->npages, u1), ==, ID_UNIQUE(u1));
    g_assert_cmpuint(content_id(f->npages, u2), ==, ID_UNIQUE(u2));
    converge(f);
    check_converged(f);
    stats(f, &st);
    /* Every page was dirty at first; nothing was written since */
    g_assert_cmpuint(st.pages_dirty, ==, f->npages);
    pass(f);
    stats(f, &st2);
    g_assert_cmpuint(st2.pages_scanned, ==, st.pages_scanned);
    g_assert_cmpuint(st2.hash_skips - st.hash_skips, ==, f->npages);
    g_assert_cmpuint(st2.candidates, ==, st.candidates);

    /* u1 becomes a copy of ID_DUP(1), and the log says so: merged */
    fill(pg(f, u1), ID_DUP(1));
    fill(f->expect + u1 * page, ID_DUP(1));
    mark_dirty(f, u1);
    /* u2 too, behind the log's back */
    fill(pg(f, u2), ID_DUP(1));
    fill(f->expect + u2 * page, ID_DUP(1));
    slot_d = ms_merger_slot_at(ms_scanner_merger(f->s), pg(f, d));
    g_assert_cmpuint(slot_d, !=, MS_SLOT_NONE);
    stats(f, &st);
    pass(f);                /* u1 written: not read yet */
    stats(f, &st2);
    g_assert_cmpuint(st2.pages_dirty, ==, st.pages_dirty + 1);
    g_assert_cmpuint(st2.pages_scanned, ==, st.pages_scanned + 1);
    g_assert_cmpuint(st2.candidates, ==, st.candidates);
    pass(f);                /* stable for a pass: read and merged */
    stats(f, &st2);
    g_assert_cmpuint(st2.pages_scanned, ==, st.pages_scanned + 2);
    g_assert_cmpuint(st2.candidates, ==, st.candidates + 1);
    g_assert_cmpuint(ms_merger_slot_at(ms_scanner_merger(f->s), pg(f, u1)),
                     ==, slot_d);
    g_assert_cmpuint(ms_merger_slot_at(ms_scanner_merger(f->s), pg(f, u2)),
                     ==, MS_SLOT_NONE);
    check_content(f);
    check_refs(f);

    /* A sweep, asked, reads every page: it finds u2 and merges it next */
    ms_scanner_sweep(f->s);
    pass(f);
    stats(f, &st);
    g_assert_cmpuint(st.pages_scanned - st2.pages_scanned, ==, f->npages);
    pass(f);
    g_assert_cmpuint(ms_merger_slot_at(ms_scanner_merger(f->s), pg(f, u2)),
                     ==, slot_d);
    check_content(f);
    check_refs(f);

    /*
     * The rolling sweep finds u3: its chunk c is read in the passes
     * MS_SCAN_SWEEP_EVERY - 1 - c (modulo that), the other passes skip it
     */
    fill(pg(f, u3), ID_DUP(1));
    fill(f->expect + u3 * page, ID_DUP(1));
    stats(f, &st);
    while ((u3 / MS_SCAN_CHUNK + st.full_scans + 1) % MS_SCAN_SWEEP_EVERY) {
        pass(f);
        stats(f, &st);
    }
    g_assert_cmpuint(ms_merger_slot_at(ms_scanner_merger(f->s), pg(f, u3)),
                     ==, MS_SLOT_NONE);
    st2 = st;
    pass(f);                /* the sweep of u3's chunk, and only of it */
    stats(f, &st);
    g_assert_cmpuint(st.pages_scanned - st2.pages_scanned, ==,
                     MIN(MS_SCAN_CHUNK, f->npages - u3 / MS_SCAN_CHUNK *
                                        MS_SCAN_CHUNK));
    pass(f);
    g_assert_cmpuint(ms_merger_slot_at(ms_scanner_merger(f->s), pg(f, u3)),
                     ==, slot_d);
    check_content(f);
    check_refs(f);
}

/*
 * With a dirty log the unstable table lasts: a unique page entered it
 * once and is never visited again, yet a page written later with the
 * same bytes finds it and both are merged.
 */
static void test_dirty_unstable(Fixture *f, gconstpointer data)
{
    size_t u = unique_after(f, f->npages / 8), v = unique_after(f, u);
    MsScanStats st, st2;
    uint32_t slot;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    stats(f, &st);
    for (unsigned n = 0; n < 20; n++) {
        pass(f);
    }
    stats(f, &st2);
    g_assert_cmpuint(st2.pages_scanned, ==, st.pages_scanned);
    fill(pg(f, v), ID_UNIQUE(u));
    fill(f->expect + v * page, ID_UNIQUE(u));
    mark_dirty(f, v);
    pass(f);
    pass(f);
    stats(f, &st);
    g_assert_cmpuint(st.pages_scanned - st2.pages_scanned, ==, 2);
    slot = ms_merger_slot_at(ms_scanner_merger(f->s), pg(f, u));
    g_assert_cmpuint(slot, !=, MS_SLOT_NONE);
    g_assert_cmpuint(ms_merger_slot_at(ms_scanner_merger(f->s), pg(f, v)),
                     ==, slot);
    check_content(f);
    check_refs(f);
}

/* Rewrite (same bytes) every page of content @id, through the log */
static size_t rewrite_dirty(Fixture *f, uint64_t id)
{
    size_t n = 0;

    for (size_t i = 0; i < f->npages; i++) {
        if (content_id(f->npages, i) == id) {
            memcpy(pg(f, i), f->expect + i * page, page);
            mark_dirty(f, i);
            n++;
        }
    }
    return n;
}

/*
 * Leave the merged pages alone for @quiet passes, rewrite the pages of
 * content @id (same bytes) and scan 2 passes: the stats before and after
 * those 2 passes in @before and @after
 */
static void rewrite_after(Fixture *f, unsigned quiet, uint64_t id,
                          MsScanStats *before, MsScanStats *after)
{
    for (unsigned t = 0; t < quiet; t++) {
        pass(f);
    }
    rewrite_dirty(f, id);
    stats(f, before);
    pass(f);
    pass(f);
    stats(f, after);
}

/*
 * Churn per page: pages rewritten every other pass are merged once,
 * broken before the merge outlived its wait (wasted), and then left
 * alone while the writes go on; once the writes stop they are merged
 * after the longer wait, and a merge that lives long gives the page its
 * short wait back.
 */
static void test_dirty_churn(Fixture *f, gconstpointer data)
{
    MsScanStats st0, st;
    size_t m = 0;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    stats(f, &st0);
    for (unsigned t = 0; t < 20; t++) {
        if (t % 2 == 0) {
            m = rewrite_dirty(f, ID_DUP(2));
        }
        pass(f);
    }
    g_assert_cmpuint(m, >=, 2);
    stats(f, &st);
    g_assert_cmpuint(st.cow_breaks - st0.cow_breaks, ==, 2 * m);
    g_assert_cmpuint(st.merges - st0.merges, ==, m);
    g_assert_cmpuint(st.merges_wasted - st0.merges_wasted, ==, m);
    g_assert_cmpuint(st.churn_skips - st0.churn_skips, >=, 3 * m);
    /* Merges of pages broken soon after their last one keep up a saving */
    g_assert_cmpuint(st.merges_upkeep - st0.merges_upkeep, ==, m);
    /* Quiet since the last write (the loop's last pass is one): merged
     * once unwritten for 1 + 2 passes */
    pass(f);
    stats(f, &st0);
    g_assert_cmpuint(st0.merges, ==, st.merges);
    pass(f);
    stats(f, &st);
    g_assert_cmpuint(st.merges - st0.merges, ==, m);
    check_content(f);
    check_refs(f);
    /* Lived long: one write, not wasted, and the wait is 1 again */
    rewrite_after(f, 8, ID_DUP(2), &st0, &st);
    g_assert_cmpuint(st.merges_wasted, ==, st0.merges_wasted);
    g_assert_cmpuint(st.merges - st0.merges, ==, m);
    /* ... still within 64 passes: upkeep */
    g_assert_cmpuint(st.merges_upkeep - st0.merges_upkeep, ==, m);
    check_content(f);
    check_refs(f);
    /* Merged for 64 passes and more: merging it again is progress */
    rewrite_after(f, 64, ID_DUP(2), &st0, &st);
    g_assert_cmpuint(st.merges - st0.merges, ==, m);
    g_assert_cmpuint(st.remerges - st0.remerges, ==, m);
    g_assert_cmpuint(st.merges_upkeep, ==, st0.merges_upkeep);
    check_content(f);
    check_refs(f);
}

static void test_discard(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    size_t d = find_page(f, ID_DUP(3), 0), b = find_page(f, ID_BLOCK(9), 0);
    size_t zeros = 0, merged = 0;
    MsScanStats st0, st;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    stats(f, &st0);
    /* A merged page written since: what MADV_DONTNEED would get wrong */
    pg(f, b)[1] ^= 1;
    /* Part of runs: merged pages, zero holes or zero slots, unique pages */
    g_assert_true(ms_scanner_discard(f->s, pg(f, d - 16), 32, &err));
    g_assert_true(ms_scanner_discard(f->s, pg(f, b), 1, &err));
    g_assert_no_error(err);
    for (size_t i = d - 16; i < d + 16; i++) {
        uint64_t id = content_id(f->npages, i);

        zeros += id == ID_ZERO;
        merged += id != ID_ZERO && id < ID_UNIQUE(0);
        memset(f->expect + i * page, 0, page);
    }
    memset(f->expect + b * page, 0, page);
    /* Every discarded page gave its reference back */
    stats(f, &st);
    g_assert_cmpuint(zeros, >, 0);
    g_assert_cmpuint(merged, >, 0);
    g_assert_cmpuint(st.pages_merged, ==, st0.pages_merged - merged - 1);
    g_assert_cmpuint(st.zero_holes, ==, st0.zero_holes - zeros);
    check_refs(f);
    check_content(f);
    converge(f);
    stats(f, &st);
    g_assert_cmpuint(st.cow_breaks, ==, 0);
    check_refs(f);
    check_content(f);
    g_assert_false(ms_scanner_discard(f->s, f->ram + f->npages * page, 1,
                                      &err));
    g_assert_error(err, MS_ENGINE_ERROR, EINVAL);
}

/* ---- writers against the scanner ---- */

#define NWRITERS 2
#define HAMMER_PAGES 64     /* pairs of pages (2k, 2k + 1) per writer area */
#define HAMMER_SECONDS 3

typedef struct Writer {
    Fixture *f;
    pthread_t thread;
    unsigned id;
    uint64_t last[HAMMER_PAGES];
    uint64_t writes;
    uint64_t lost;
    int *stop;              /* read with g_atomic_int_get() */
} Writer;

/* The hammered pages: from the middle of the unique pages */
static size_t hammer_page(Fixture *f, size_t k)
{
    return f->npages * 3 / 4 + k;
}

static uint64_t *writer_word(Fixture *f, size_t k, unsigned id)
{
    return (uint64_t *)(pg(f, hammer_page(f, k)) + 64 * (id + 1));
}

/*
 * Each writer owns one word in each hammered page and writes the same
 * value into both pages of a pair, or zero: between bursts the pair is
 * identical and gets merged, and writes land on pages being merged.
 */
static void *writer_main(void *opaque)
{
    Writer *w = opaque;
    GRand *rand = g_rand_new_with_seed(w->id + 7);
    uint64_t counter = 0;

    while (!g_atomic_int_get(w->stop)) {
        size_t k = g_rand_int_range(rand, 0, HAMMER_PAGES / 2) * 2;
        uint64_t value = g_rand_int_range(rand, 0, 4) ?
                         (++counter << 8) | (w->id + 1) : 0;

        for (size_t j = k; j < k + 2; j++) {
            /* volatile: every access must reach the page under test */
            volatile uint64_t *word = writer_word(w->f, j, w->id);

            /* Only this thread writes this word: it holds our last value */
            w->lost += *word != w->last[j];
            *word = value;
            w->last[j] = value;
            w->writes++;
        }
        if (g_rand_int_range(rand, 0, 32) == 0) {
            g_usleep(g_rand_int_range(rand, 0, 2000));
        }
    }
    g_rand_free(rand);
    return NULL;
}

/* Zero the words of a zero pair some writer left non-zero; false if none */
static bool written_zero_pair(Fixture *f, Writer *w)
{
    for (size_t k = 0; k < HAMMER_PAGES / 2; k += 2) {
        bool written = false;

        for (unsigned i = 0; i < NWRITERS; i++) {
            written |= w[i].last[k] != 0;
        }
        if (!written) {
            continue;
        }
        for (size_t j = k; j < k + 2; j++) {
            for (unsigned i = 0; i < NWRITERS; i++) {
                *writer_word(f, j, i) = 0;
                memset(f->expect + hammer_page(f, j) * page + 64 * (i + 1),
                       0, sizeof(uint64_t));
            }
        }
        return true;
    }
    return false;
}

static void test_writers(Fixture *f, gconstpointer data)
{
    Writer w[NWRITERS];
    uint64_t zero_merges;
    int stop = false;
    uint64_t writes = 0, lost = 0;
    MsScanStats st;
    gint64 end;
    size_t passes = 0;

    (void)data;
    if (f->skip) {
        return;
    }
    /*
     * Pairs start identical: the pages of a pair get the same content;
     * the first half are zero pages, so that they become holes whenever
     * the writers' words are all zero.
     */
    memset(pg(f, hammer_page(f, 0)), 0, HAMMER_PAGES / 2 * page);
    for (size_t k = 0; k < HAMMER_PAGES; k += 2) {
        memcpy(pg(f, hammer_page(f, k + 1)), pg(f, hammer_page(f, k)), page);
    }
    memcpy(f->expect, f->ram, f->npages * page);
    for (unsigned i = 0; i < NWRITERS; i++) {
        w[i] = (Writer) { .f = f, .id = i, .stop = &stop };
        for (size_t k = 0; k < HAMMER_PAGES; k++) {
            w[i].last[k] = *writer_word(f, k, i);
        }
        g_assert_cmpint(pthread_create(&w[i].thread, NULL, writer_main,
                                       &w[i]), ==, 0);
    }
    end = g_get_monotonic_time() + HAMMER_SECONDS * G_USEC_PER_SEC;
    while (g_get_monotonic_time() < end) {
        pass(f);
        passes++;
    }
    g_atomic_int_set(&stop, true);
    for (unsigned i = 0; i < NWRITERS; i++) {
        pthread_join(w[i].thread, NULL);
        writes += w[i].writes;
        lost += w[i].lost;
    }
    stats(f, &st);
    g_test_message("%" PRIu64 " writes, %" PRIu64 " lost; %" PRIu64
                   " merges, %" PRIu64 " zero merges, %" PRIu64
                   " cow-breaks, %" PRIu64 " re-merges, %" PRIu64
                   " hash changes, %" PRIu64 " refused (changed), %zu passes",
                   writes, lost, st.merges, st.zero_merges, st.cow_breaks,
                   st.remerges, st.hash_changes, st.refused_changed, passes);
    g_assert_cmpuint(lost, ==, 0);
    g_assert_cmpuint(st.hash_changes, >, 0);
    g_assert_cmpuint(st.cow_breaks, >, 0);

    for (size_t k = 0; k < HAMMER_PAGES; k++) {
        for (unsigned i = 0; i < NWRITERS; i++) {
            g_assert_cmphex(*writer_word(f, k, i), ==, w[i].last[k]);
            memcpy(f->expect + hammer_page(f, k) * page + 64 * (i + 1),
                   &w[i].last[k], sizeof(uint64_t));
        }
    }
    check_content(f);
    /*
     * A zero pair the writers left non-zero goes back to zero: the next
     * passes merge its pages as zero pages again.  (While they ran, all
     * of a page's words being zero at once is a matter of chance.)
     */
    /*
     * Some pair surely is: each of the 16 zero pairs is left all zero by
     * both writers with odds of 1 in 16 only, so none with 1 in 2^64.
     */
    g_assert_true(written_zero_pair(f, w));
    stats(f, &st);
    zero_merges = st.zero_merges;
    /*
     * It must prove stable first: the region's wait after the hammering
     * (up to 9 passes) and the pages' own churn wait (up to 128 more)
     */
    for (int n = 0; n < 512 && st.zero_merges < zero_merges + 2; n++) {
        pass(f);
        stats(f, &st);
    }
    g_assert_cmpuint(st.zero_merges, >=, zero_merges + 2);
    /* Quiet again: everything settles, references exact */
    converge(f);
    check_refs(f);
    check_content(f);
}

/* ---- figures ---- */

/*
 * Zero pages stay merged when the guest reads them: with zero slots on
 * any kernel, with holes where a read maps the shared zero page.  On
 * kernels that allocate a page on a read fault a read hole is filled
 * and the next pass merges it again (counted as zero merges).
 */
static void test_zero_read(Fixture *f, gconstpointer data)
{
    MsScanStats st, after;
    uint64_t anon, sum = 0;
    bool slots = ((const Params *)data)->zero == MS_ZERO_SLOTS;

    if (f->skip) {
        return;
    }
    converge(f);
    stats(f, &st);
    g_assert_cmpuint(st.zero_holes, ==, f->zeros);
    g_assert_cmpuint(st.zero_slots, ==, slots ? MS_SCAN_ZERO_SLOTS : 0);
    anon = anon_kb(f);
    for (size_t i = 0; i < f->npages; i++) {
        if (content_id(f->npages, i) == ID_ZERO) {
            for (size_t k = 0; k < page; k += 64) {
                /* volatile: each read must reach the page (read faults) */
                sum += ((volatile uint8_t *)pg(f, i))[k];
            }
        }
    }
    g_assert_cmpuint(sum, ==, 0);
    if (slots || ms_read_fault_maps_zero_page()) {
        pass(f);
    } else {
        /* The reads filled the holes: merged again, as a write's would be */
        converge(f);
    }
    stats(f, &after);
    g_test_message("%zu zero pages read: anonymous %" PRIu64 " -> %" PRIu64
                   " KiB, zero merges %" PRIu64 " -> %" PRIu64 ", %" PRIu64
                   " zero slots hold a page", f->zeros, anon, anon_kb(f),
                   st.zero_merges, after.zero_merges, after.zero_held);
    g_assert_cmpuint(after.zero_holes, ==, f->zeros);
    if (slots || ms_read_fault_maps_zero_page()) {
        /* Nothing came back: no memory, no merge to do again */
        g_assert_cmpuint(after.zero_merges, ==, st.zero_merges);
        g_assert_cmpuint(anon_kb(f), <=, anon);
    }
    if (slots) {
        /* At most one page per zero slot, however many pages map it */
        g_assert_cmpuint(after.zero_held, >, 0);
        g_assert_cmpuint(after.zero_held, <=, MIN(f->zeros,
                                                  MS_SCAN_ZERO_SLOTS));
    }
    check_converged(f);
    check_content(f);
}

/*
 * Churn: when writes break many of the pages the scanner merged, it asks
 * one more unchanged scan of candidates, and gives it back once quiet.
 */
static void test_churn(Fixture *f, gconstpointer data)
{
    MsScanStats st, before;
    size_t written = 0;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    stats(f, &before);
    g_assert_cmpuint(before.extra_scans, ==, 0);
    /* Zero every merged duplicate: each write breaks a merge */
    for (size_t i = 0; i < f->npages; i++) {
        uint64_t id = content_id(f->npages, i);

        if (id != ID_ZERO && id < ID_UNIQUE(0)) {
            memset(pg(f, i), 0, page);
            memset(f->expect + i * page, 0, page);
            written++;
        }
    }
    g_assert_cmpuint(written, ==, f->dup_pages);
    pass(f);                /* sees the breaks and the new (zero) hashes */
    stats(f, &st);
    g_assert_cmpuint(st.cow_breaks, ==, f->dup_pages);
    g_assert_cmpuint(st.extra_scans, ==, 1);
    pass(f);                /* stable once: enough before, not now */
    stats(f, &st);
    g_assert_cmpuint(st.zero_holes, ==, f->zeros);
    g_assert_cmpuint(st.extra_scans, ==, 0);
    pass(f);                /* quiet again: merged */
    stats(f, &st);
    g_assert_cmpuint(st.zero_holes, ==, f->zeros + f->dup_pages);
    g_assert_cmpuint(st.pages_merged, ==, 0);
    check_content(f);
}

/*
 * Churn from zero pages: a guest filling memory writes the zero pages
 * the scanner made holes, which is the same waste as writes into store
 * pages and must ask the same extra scan.
 */
static void test_churn_zero(Fixture *f, gconstpointer data)
{
    MsScanStats st, before;
    size_t written = 0;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    stats(f, &before);
    g_assert_cmpuint(before.extra_scans, ==, 0);
    g_assert_cmpuint(before.zero_holes, ==, f->zeros);
    g_assert_cmpuint(f->zeros, >=, 64);
    for (size_t i = 0; i < f->npages; i++) {
        if (content_id(f->npages, i) == ID_ZERO) {
            fill(pg(f, i), ID_UNIQUE(i));
            fill(f->expect + i * page, ID_UNIQUE(i));
            written++;
        }
    }
    g_assert_cmpuint(written, ==, f->zeros);
    pass(f);                /* sees the filled holes */
    stats(f, &st);
    g_assert_cmpuint(st.zero_holes, ==, 0);
    g_assert_cmpuint(st.extra_scans, ==, 1);
    check_content(f);
}

static void test_throughput(Fixture *f, gconstpointer data)
{
    MsScanStats st;
    gint64 t0, t1, t2;
    double mib = (double)f->npages * page / MIB;

    (void)data;
    if (f->skip) {
        return;
    }
    t0 = g_get_monotonic_time();
    pass(f);                /* hashes only */
    t1 = g_get_monotonic_time();
    pass(f);                /* merges */
    t2 = g_get_monotonic_time();
    stats(f, &st);
    g_test_message("%.0f MiB: first pass (hashing) %.0f MiB/s; merging "
                   "pass %.0f MiB/s, %" PRIu64 " pages merged, %" PRIu64
                   " zero holes, %.1f MiB saved", mib,
                   mib / ((t1 - t0) / 1e6), mib / ((t2 - t1) / 1e6),
                   st.merges, st.zero_merges,
                   (double)st.bytes_saved / MIB);
    t0 = g_get_monotonic_time();
    pass(f);                /* steady state: nothing left to merge */
    t1 = g_get_monotonic_time();
    g_test_message("steady pass %.0f MiB/s", mib / ((t1 - t0) / 1e6));
    converge(f);
    check_converged(f);
}

/*
 * A first write to memory the guest never touched faults in a whole
 * transparent huge page: the kernel fills the other 511 pages with zeros
 * that the log never sees written.  They count as written (huge_fills)
 * and are merged as zero pages a few passes later, not at their chunk's
 * turn in the rolling sweep (1024 passes on).  See "Huge pages" in
 * scan.c.
 */
static void test_huge_fill(Fixture *f, gconstpointer data)
{
    size_t huge = ms_thp_pmd_size(), per = huge / page, a, w;
    g_autoptr(GError) err = NULL;
    MsScanStats st0, st;
    uint64_t e;
    int fd;

    (void)data;
    if (f->skip || !huge) {
        g_test_skip(f->skip ? "no scanner" : "no transparent huge pages");
        return;
    }
    converge(f);
    stats(f, &st0);
    /* The first huge page range of the untouched half */
    a = (((uintptr_t)pg(f, f->filled) + huge - 1) / huge * huge -
         (uintptr_t)f->ram) / page;
    g_assert_cmpuint(a + per, <=, f->npages);
    w = a + 5;
    fill(pg(f, w), ID_UNIQUE(w));
    fill(f->expect + w * page, ID_UNIQUE(w));
    mark_dirty(f, w);

    /* Did the kernel fill the range?  Not if THP is off, or no page free */
    fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    g_assert_cmpint(fd, >=, 0);
    g_assert_true(ms_pagemap_read(fd, pg(f, a), 1, page, &e, &err));
    close(fd);
    if (!(e >> 63)) {
        g_test_skip("the write faulted in no huge page (THP set to never?)");
        return;
    }
    for (int n = 0; n < 8; n++) {
        pass(f);
    }
    stats(f, &st);
    g_assert_cmpuint(st.zero_merges - st0.zero_merges, ==, per - 1);
    g_assert_cmpuint(st.huge_fills - st0.huge_fills, ==, 1);
    check_content(f);
    check_refs(f);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    page = ms_host_page_size();

#define ADD(path, params, fn) \
    g_test_add(path, Fixture, &params, setup, fn, teardown)
    ADD("/scan/converge", normal, test_converge);
    /* 16k pages: the unstable table doubles three times in a pass */
    ADD("/scan/converge-big", big, test_converge);
    ADD("/scan/converge-eager", eager, test_converge);
    ADD("/scan/converge-thp", thp, test_converge);
    ADD("/scan/converge-zero-slots", zero_slots, test_converge);
    ADD("/scan/converge-zero-holes", zero_holes, test_converge);
    ADD("/scan/zero-read-slots", zero_slots, test_zero_read);
    ADD("/scan/zero-read-holes", zero_holes, test_zero_read);
    ADD("/scan/cow-break", normal, test_cow_break);
    ADD("/scan/unmerge-all", normal, test_unmerge_all);
    ADD("/scan/budget", tiny_budget, test_budget);
    ADD("/scan/budget-zero-slots", tiny_budget_slots, test_budget);
    ADD("/scan/budget-follows-limit", limit_budget,
        test_budget_follows_limit);
    ADD("/scan/store-full", small_store, test_store_full);
    ADD("/scan/volatile", normal, test_volatile);
    ADD("/scan/discard", normal, test_discard);
    ADD("/scan/dirty-log", dirty_log, test_dirty_log);
    ADD("/scan/converge-dirty-log", dirty_log, test_converge);
    ADD("/scan/dirty-unstable", dirty_log, test_dirty_unstable);
    ADD("/scan/dirty-churn", dirty_log, test_dirty_churn);
    ADD("/scan/huge-fill", thp_fresh, test_huge_fill);
    ADD("/scan/discard-zero-slots", zero_slots, test_discard);
    ADD("/scan/writers", eager, test_writers);
    ADD("/scan/churn", normal, test_churn);
    ADD("/scan/churn-zero", normal, test_churn_zero);
    ADD("/scan/throughput", big, test_throughput);
    ADD("/scan/remap-no-memory", normal, test_remap_no_memory);

    return g_test_run();
}
