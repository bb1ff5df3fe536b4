/*
 * Unit tests for the mem-share engine's reading of host KSM state
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The kernel's files are replaced by files laid out the same way in a
 * temporary directory, so every parser is exercised on known input.  The
 * page census also runs once on this process's real memory.
 */

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "mem-share/ksm.h"

#define PAGE 4096

typedef struct Fixture {
    char *dir;
} Fixture;

static void fixture_setup(Fixture *f, gconstpointer data)
{
    (void)data;
    f->dir = g_dir_make_tmp("mem-share-test-XXXXXX", NULL);
    g_assert_nonnull(f->dir);
}

static void rm_rf(const char *path)
{
    GDir *dir = g_dir_open(path, 0, NULL);
    const char *name;

    if (dir) {
        while ((name = g_dir_read_name(dir))) {
            g_autofree char *child = g_build_filename(path, name, NULL);

            rm_rf(child);
        }
        g_dir_close(dir);
    }
    g_remove(path);
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
    (void)data;
    rm_rf(f->dir);
    g_free(f->dir);
}

static void put(const char *dir, const char *name, const char *text)
{
    g_autofree char *path = g_build_filename(dir, name, NULL);
    g_autofree char *parent = g_path_get_dirname(path);

    g_assert_cmpint(g_mkdir_with_parents(parent, 0700), ==, 0);
    g_assert_true(g_file_set_contents(path, text, -1, NULL));
}

static void test_host(Fixture *f, gconstpointer data)
{
    g_autofree char *vmstat = g_build_filename(f->dir, "vmstat", NULL);
    MsKsmHost host;

    (void)data;
    put(f->dir, "ksm/run", "1\n");
    put(f->dir, "ksm/use_zero_pages", "0\n");
    put(f->dir, "ksm/pages_shared", "41\n");
    put(f->dir, "ksm/pages_sharing", "1234\n");
    put(f->dir, "ksm/pages_unshared", "7\n");
    put(f->dir, "ksm/pages_volatile", "3\n");
    put(f->dir, "ksm/pages_scanned", "99999\n");
    put(f->dir, "ksm/full_scans", "12\n");
    put(f->dir, "vmstat", "nr_free_pages 5\nksm_swpin_copy 0\ncow_ksm 17\n"
        "cow_ksm_extra 1\n");
    {
        g_autofree char *ksm = g_build_filename(f->dir, "ksm", NULL);

        g_assert_true(ms_ksm_read_host(ksm, vmstat, &host, NULL));
    }
    g_assert_true(host.available);
    g_assert_true(host.running);
    g_assert_false(host.use_zero_pages);
    g_assert_cmpuint(host.pages_shared, ==, 41);
    g_assert_cmpuint(host.pages_sharing, ==, 1234);
    g_assert_cmpuint(host.pages_unshared, ==, 7);
    g_assert_cmpuint(host.pages_volatile, ==, 3);
    g_assert_cmpuint(host.pages_scanned, ==, 99999);
    g_assert_cmpuint(host.full_scans, ==, 12);
    /* A missing file reads as zero */
    g_assert_cmpuint(host.ksm_zero_pages, ==, 0);
    /* Exact key match: cow_ksm, not cow_ksm_extra */
    g_assert_cmpuint(host.cow_ksm, ==, 17);
}

static void test_host_missing(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    MsKsmHost host;

    (void)data;
    g_assert_false(ms_ksm_read_host(f->dir, "/nonexistent", &host, &err));
    g_assert_false(host.available);
    g_assert_false(host.running);
    g_assert_error(err, MS_ENGINE_ERROR, ENOENT);
    g_assert_nonnull(strstr(err->message, "has no KSM"));
}

/* Linux 6.7+ layout: merging pages inside ksm_stat, booleans with colons */
static void test_process_new(Fixture *f, gconstpointer data)
{
    MsKsmProcess proc;

    (void)data;
    put(f->dir, "ksm_stat", "ksm_rmap_items 300\nksm_zero_pages 4\n"
        "ksm_merging_pages 120\nksm_process_profit -4096\n"
        "ksm_merge_any: no\nksm_mergeable: yes\n");
    put(f->dir, "ksm_merging_pages", "121\n");
    g_assert_true(ms_ksm_read_process(f->dir, &proc, NULL));
    g_assert_true(proc.available);
    g_assert_cmpuint(proc.rmap_items, ==, 300);
    g_assert_cmpuint(proc.zero_pages, ==, 4);
    /* The dedicated file wins: it is read last and is never older */
    g_assert_cmpuint(proc.merging_pages, ==, 121);
    g_assert_cmpint(proc.process_profit, ==, -4096);
    g_assert_false(proc.merge_any);
    g_assert_true(proc.mergeable);
}

/* Linux 6.1 layout: ksm_rmap_items only */
static void test_process_old(Fixture *f, gconstpointer data)
{
    MsKsmProcess proc;

    (void)data;
    put(f->dir, "ksm_stat", "ksm_rmap_items 5\n");
    put(f->dir, "ksm_merging_pages", "2\n");
    g_assert_true(ms_ksm_read_process(f->dir, &proc, NULL));
    g_assert_cmpuint(proc.rmap_items, ==, 5);
    g_assert_cmpuint(proc.merging_pages, ==, 2);
    g_assert_cmpuint(proc.zero_pages, ==, 0);
    g_assert_false(proc.mergeable);
}

static void test_process_garbage(Fixture *f, gconstpointer data)
{
    MsKsmProcess proc;

    (void)data;
    put(f->dir, "ksm_stat", "\n\nksm_rmap_items\nnonsense here 5\n"
        "ksm_zero_pages    9\t\n:\n\t\n");
    g_assert_true(ms_ksm_read_process(f->dir, &proc, NULL));
    g_assert_cmpuint(proc.rmap_items, ==, 0);
    g_assert_cmpuint(proc.zero_pages, ==, 9);
}

static void test_process_missing(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    MsKsmProcess proc;

    (void)data;
    g_assert_false(ms_ksm_read_process(f->dir, &proc, &err));
    g_assert_nonnull(err);
    g_assert_false(proc.available);
}

static void test_ksmd_cpu(Fixture *f, gconstpointer data)
{
    long hz = sysconf(_SC_CLK_TCK);

    (void)data;
    put(f->dir, "1/comm", "systemd\n");
    put(f->dir, "1/stat", "1 (systemd) S 0 1 1 0 -1 4194560 1 2 3 4 500 600 "
        "0 0 20 0 1 0 5 0 0\n");
    put(f->dir, "77/comm", "ksmd\n");
    /* A name with spaces and parentheses must not shift the fields */
    put(f->dir, "77/stat", "77 (ks md) (x) S 2 0 0 0 -1 2129984 0 0 0 0 "
        "30 12 0 0 25 5 1 0 7 0 0\n");
    put(f->dir, "self/comm", "test\n");
    g_assert_cmpuint(ms_ksmd_cpu_ns(f->dir), ==, 42 * (1000000000ULL / hz));
}

/* A pagemap laid out like the kernel's, for the pages of @buf */
static int fake_pagemap(const char *dir, const void *buf, const uint64_t *e,
                        size_t n)
{
    g_autofree char *path = g_build_filename(dir, "pagemap", NULL);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    off_t off = (uintptr_t)buf / PAGE * sizeof(uint64_t);

    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(pwrite(fd, e, n * sizeof(*e), off), ==, n * sizeof(*e));
    return fd;
}

static int fake_kpageflags(const char *dir, const uint64_t (*pf)[2], size_t n)
{
    g_autofree char *path = g_build_filename(dir, "kpageflags", NULL);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);

    g_assert_cmpint(fd, >=, 0);
    for (size_t i = 0; i < n; i++) {
        g_assert_cmpint(pwrite(fd, &pf[i][1], 8, pf[i][0] * 8), ==, 8);
    }
    return fd;
}

#define PRESENT     (1ULL << 63)
#define KPF_KSM     (1ULL << 21)
#define KPF_ZERO    (1ULL << 24)
#define KPF_ANON    (1ULL << 12)

static void test_census(Fixture *f, gconstpointer data)
{
    uint8_t *buf = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    const uint64_t entries[8] = {
        0,                      /* not present */
        PRESENT | 100,          /* KSM page of zeros */
        PRESENT | 101,          /* KSM page with data */
        PRESENT | 102,          /* the zero page */
        PRESENT | 103,          /* a private anonymous page */
        PRESENT | 1000,         /* KSM page far away: another flags window */
        1ULL << 62,             /* swapped out */
        PRESENT | 101,          /* the same KSM page again */
    };
    const uint64_t flags[][2] = {
        { 100, KPF_KSM | KPF_ANON }, { 101, KPF_KSM | KPF_ANON },
        { 102, KPF_ZERO }, { 103, KPF_ANON }, { 1000, KPF_KSM | KPF_ANON },
    };
    g_autoptr(GError) err = NULL;
    MsPageCensus c;
    int pm, kpf;

    (void)data;
    g_assert_true(buf != MAP_FAILED);
    memset(buf + 2 * PAGE, 0x5a, PAGE);
    memset(buf + 5 * PAGE, 0x01, PAGE);
    buf[7 * PAGE + 100] = 1;
    pm = fake_pagemap(f->dir, buf, entries, 8);
    kpf = fake_kpageflags(f->dir, flags, G_N_ELEMENTS(flags));

    g_assert_true(ms_page_census(pm, kpf, buf, 8, PAGE, &c, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(c.present, ==, 6);
    g_assert_cmpuint(c.ksm, ==, 4);
    g_assert_cmpuint(c.zero_pfn, ==, 1);
    /* Only page 1 is a KSM page whose content is all zeros */
    g_assert_cmpuint(c.ksm_zero, ==, 1);

    /* A sub-range */
    g_assert_true(ms_page_census(pm, kpf, buf + 3 * PAGE, 2, PAGE, &c, NULL));
    g_assert_cmpuint(c.present, ==, 2);
    g_assert_cmpuint(c.ksm, ==, 0);
    g_assert_cmpuint(c.zero_pfn, ==, 1);

    close(pm);
    close(kpf);
    munmap(buf, 8 * PAGE);
}

static void test_census_errors(Fixture *f, gconstpointer data)
{
    uint8_t *buf = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    const uint64_t hidden[2] = { PRESENT, PRESENT };
    const uint64_t beyond[2] = { PRESENT | 5000, 0 };
    const uint64_t flags[][2] = { { 1, KPF_ANON } };
    g_autoptr(GError) err = NULL;
    MsPageCensus c;
    int pm, kpf;

    (void)data;
    g_assert_true(buf != MAP_FAILED);
    kpf = fake_kpageflags(f->dir, flags, 1);

    /* Page frame numbers hidden: what an unprivileged process sees */
    pm = fake_pagemap(f->dir, buf, hidden, 2);
    g_assert_false(ms_page_census(pm, kpf, buf, 2, PAGE, &c, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EPERM);
    g_assert_nonnull(strstr(err->message, "CAP_SYS_ADMIN"));
    g_clear_error(&err);
    close(pm);

    /* A frame beyond the end of kpageflags */
    pm = fake_pagemap(f->dir, buf, beyond, 2);
    g_assert_false(ms_page_census(pm, kpf, buf, 2, PAGE, &c, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EIO);
    g_clear_error(&err);

    /* Unaligned range */
    g_assert_false(ms_page_census(pm, kpf, buf + 1, 1, PAGE, &c, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EINVAL);
    g_clear_error(&err);
    close(pm);

    /* A range past the end of the pagemap file */
    pm = fake_pagemap(f->dir, buf, beyond, 1);
    g_assert_false(ms_page_census(pm, kpf, buf + PAGE, 1, PAGE, &c, &err));
    g_assert_nonnull(err);
    close(pm);
    close(kpf);
    munmap(buf, 2 * PAGE);
}

/* The census on this process's own memory, as QEMU runs it */
static void test_census_live(void)
{
    const size_t n = 64;
    uint8_t *buf = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    g_autoptr(GError) err = NULL;
    int pm = open("/proc/self/pagemap", O_RDONLY);
    int kpf = open("/proc/kpageflags", O_RDONLY);
    MsPageCensus c;
    /* volatile: the reads must happen, to fault the pages in */
    volatile uint8_t sink = 0;

    g_assert_true(buf != MAP_FAILED);
    g_assert_cmpint(pm, >=, 0);
    if (kpf < 0) {
        g_test_skip("/proc/kpageflags is not readable (needs root)");
        munmap(buf, n * PAGE);
        close(pm);
        return;
    }
    /*
     * 16 pages written, 8 only read, 40 untouched.  A read fault maps the
     * zero page or, with multi-size THP, may allocate a real page.
     */
    for (size_t i = 0; i < 16; i++) {
        buf[i * PAGE] = i + 1;
    }
    for (size_t i = 16; i < 24; i++) {
        sink += buf[i * PAGE];
    }
    (void)sink;
    if (!ms_page_census(pm, kpf, buf, n, PAGE, &c, &err)) {
        g_assert_error(err, MS_ENGINE_ERROR, EPERM);
        g_test_skip("page frame numbers are hidden (needs CAP_SYS_ADMIN)");
    } else {
        g_assert_cmpuint(c.present, ==, 24);
        g_assert_cmpuint(c.zero_pfn, <=, 8);
        g_assert_cmpuint(c.ksm, ==, 0);
    }
    close(pm);
    close(kpf);
    munmap(buf, n * PAGE);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);

#define ADD(path, fn) \
    g_test_add(path, Fixture, NULL, fixture_setup, fn, fixture_teardown)
    ADD("/ksm/host", test_host);
    ADD("/ksm/host-missing", test_host_missing);
    ADD("/ksm/process/new-layout", test_process_new);
    ADD("/ksm/process/old-layout", test_process_old);
    ADD("/ksm/process/garbage", test_process_garbage);
    ADD("/ksm/process/missing", test_process_missing);
    ADD("/ksm/ksmd-cpu", test_ksmd_cpu);
    ADD("/ksm/census/synthetic", test_census);
    ADD("/ksm/census/errors", test_census_errors);
    g_test_add_func("/ksm/census/live", test_census_live);

    return g_test_run();
}
