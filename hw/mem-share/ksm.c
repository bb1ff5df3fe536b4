/*
 * mem-share engine: reading the host kernel's KSM state
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * In mode=kernel the host's ksmd does the merging; mem-share only marks
 * the guest RAM MADV_MERGEABLE and reports what happened.  The kernel
 * publishes three levels of figures:
 *
 *  - host-wide, in /sys/kernel/mm/ksm and /proc/vmstat (cow_ksm);
 *  - per process, in /proc/PID/ksm_stat and /proc/PID/ksm_merging_pages;
 *  - per page, through /proc/self/pagemap (which page frame a virtual
 *    page maps) and /proc/kpageflags (whether that frame is a KSM page
 *    or the zero page).
 *
 * A QEMU process has more RAM than one memory backend, and may have several
 * mem-share backends, so the per-object figures come from the per-page
 * census of the backend's own range.  Page frame numbers are visible to
 * CAP_SYS_ADMIN only; without them the caller reports the per-process
 * figures instead, and says so.
 *
 * Nothing here depends on QEMU: the same code is unit-tested with files
 * laid out like the kernel's.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mem-share/ksm.h"

/* /proc/self/pagemap entries (Documentation/admin-guide/mm/pagemap.rst) */
#define PM_PRESENT          (1ULL << 63)
#define PM_PFN_MASK         ((1ULL << 55) - 1)

/* Bits of /proc/kpageflags (include/uapi/linux/kernel-page-flags.h) */
#define KPF_KSM             21
#define KPF_ZERO_PAGE       24

/* Entries read from pagemap per pread() */
#define CENSUS_BATCH        1024
/* Entries read from kpageflags per pread(): neighbouring frames are common */
#define KPF_WINDOW          64

GQuark ms_engine_error_quark(void)
{
    return g_quark_from_static_string("mem-share-engine-error-quark");
}

static bool read_file_u64(const char *dir, const char *name, uint64_t *val)
{
    g_autofree char *path = g_build_filename(dir, name, NULL);
    g_autofree char *text = NULL;
    char *end;

    if (!g_file_get_contents(path, &text, NULL, NULL)) {
        return false;
    }
    errno = 0;
    *val = g_ascii_strtoull(text, &end, 10);
    return errno == 0 && end != text;
}

static uint64_t vmstat_value(const char *vmstat_path, const char *key)
{
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    size_t keylen = strlen(key);

    if (!g_file_get_contents(vmstat_path, &text, NULL, NULL)) {
        return 0;
    }
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l; l++) {
        if (!strncmp(*l, key, keylen) && (*l)[keylen] == ' ') {
            return g_ascii_strtoull(*l + keylen + 1, NULL, 10);
        }
    }
    return 0;
}

bool ms_ksm_read_host(const char *sysfs_dir, const char *vmstat_path,
                      MsKsmHost *host, GError **errp)
{
    uint64_t run = 0, zero = 0;

    memset(host, 0, sizeof(*host));
    if (!read_file_u64(sysfs_dir, "run", &run)) {
        g_set_error(errp, MS_ENGINE_ERROR, ENOENT,
                    "host kernel has no KSM (%s/run is missing)", sysfs_dir);
        return false;
    }
    host->available = true;
    host->running = run == 1;
    read_file_u64(sysfs_dir, "use_zero_pages", &zero);
    host->use_zero_pages = zero != 0;
    read_file_u64(sysfs_dir, "pages_shared", &host->pages_shared);
    read_file_u64(sysfs_dir, "pages_sharing", &host->pages_sharing);
    read_file_u64(sysfs_dir, "pages_unshared", &host->pages_unshared);
    read_file_u64(sysfs_dir, "pages_volatile", &host->pages_volatile);
    read_file_u64(sysfs_dir, "pages_scanned", &host->pages_scanned);
    read_file_u64(sysfs_dir, "full_scans", &host->full_scans);
    read_file_u64(sysfs_dir, "ksm_zero_pages", &host->ksm_zero_pages);
    host->cow_ksm = vmstat_value(vmstat_path, "cow_ksm");
    return true;
}

/*
 * ksm_stat has "name value" lines; the boolean ones are "name: yes|no"
 * (Linux 6.7 and later).
 */
static void parse_ksm_stat_line(const char *line, MsKsmProcess *proc)
{
    g_auto(GStrv) f = g_strsplit_set(line, " \t", 2);
    char *key, *val;
    size_t len;

    if (!f[0] || !f[1]) {
        return;
    }
    key = g_strstrip(f[0]);
    val = g_strstrip(f[1]);
    len = strlen(key);
    if (len && key[len - 1] == ':') {
        key[len - 1] = '\0';
    }
    if (!strcmp(key, "ksm_rmap_items")) {
        proc->rmap_items = g_ascii_strtoull(val, NULL, 10);
    } else if (!strcmp(key, "ksm_zero_pages")) {
        proc->zero_pages = g_ascii_strtoull(val, NULL, 10);
    } else if (!strcmp(key, "ksm_merging_pages")) {
        proc->merging_pages = g_ascii_strtoull(val, NULL, 10);
    } else if (!strcmp(key, "ksm_process_profit")) {
        proc->process_profit = g_ascii_strtoll(val, NULL, 10);
    } else if (!strcmp(key, "ksm_merge_any")) {
        proc->merge_any = !strcmp(val, "yes");
    } else if (!strcmp(key, "ksm_mergeable")) {
        proc->mergeable = !strcmp(val, "yes");
    }
}

bool ms_ksm_read_process(const char *proc_dir, MsKsmProcess *proc,
                         GError **errp)
{
    g_autofree char *path = g_build_filename(proc_dir, "ksm_stat", NULL);
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    uint64_t merging;

    memset(proc, 0, sizeof(*proc));
    if (!g_file_get_contents(path, &text, NULL, errp)) {
        return false;
    }
    proc->available = true;
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l; l++) {
        parse_ksm_stat_line(*l, proc);
    }
    /* Older kernels (6.1) have ksm_merging_pages only in its own file */
    if (read_file_u64(proc_dir, "ksm_merging_pages", &merging)) {
        proc->merging_pages = merging;
    }
    return true;
}

static bool comm_is_ksmd(const char *proc_root, const char *pid)
{
    g_autofree char *path = g_build_filename(proc_root, pid, "comm", NULL);
    g_autofree char *comm = NULL;

    return g_file_get_contents(path, &comm, NULL, NULL) &&
           !strcmp(g_strchomp(comm), "ksmd");
}

/* utime + stime of /proc/PID/stat, fields 14 and 15, in clock ticks */
static uint64_t stat_cpu_ticks(const char *proc_root, const char *pid)
{
    g_autofree char *path = g_build_filename(proc_root, pid, "stat", NULL);
    g_autofree char *text = NULL;
    g_auto(GStrv) f = NULL;
    char *rest;

    if (!g_file_get_contents(path, &text, NULL, NULL)) {
        return 0;
    }
    /* The command name may contain spaces: fields restart after ')' */
    rest = strrchr(text, ')');
    if (!rest) {
        return 0;
    }
    f = g_strsplit(rest + 2, " ", 14);
    /* f[0] is field 3 (state), so utime is f[11] and stime f[12] */
    if (g_strv_length(f) < 14) {
        return 0;
    }
    return g_ascii_strtoull(f[11], NULL, 10) +
           g_ascii_strtoull(f[12], NULL, 10);
}

uint64_t ms_ksmd_cpu_ns(const char *proc_root)
{
    /* ksmd is started once at boot: remember where it was */
    static char cached_pid[16];
    g_autoptr(GDir) dir = NULL;
    const char *name;
    long hz = sysconf(_SC_CLK_TCK);

    if (hz <= 0) {
        return 0;
    }
    if (cached_pid[0] && comm_is_ksmd(proc_root, cached_pid)) {
        return stat_cpu_ticks(proc_root, cached_pid) * (1000000000ULL / hz);
    }
    dir = g_dir_open(proc_root, 0, NULL);
    if (!dir) {
        return 0;
    }
    while ((name = g_dir_read_name(dir))) {
        if (g_ascii_isdigit(name[0]) && strlen(name) < sizeof(cached_pid) &&
            comm_is_ksmd(proc_root, name)) {
            g_strlcpy(cached_pid, name, sizeof(cached_pid));
            return stat_cpu_ticks(proc_root, name) * (1000000000ULL / hz);
        }
    }
    return 0;
}

bool ms_pagemap_read(int pagemap_fd, const void *host, size_t n,
                     size_t page_size, uint64_t *entries, GError **errp)
{
    size_t done = 0;

    while (done < n) {
        off_t off = ((uintptr_t)host / page_size + done) * sizeof(uint64_t);
        ssize_t got = pread(pagemap_fd, entries + done,
                            (n - done) * sizeof(uint64_t), off);

        if (got < 0 && errno == EINTR) {
            continue;
        }
        if (got <= 0 || got % sizeof(uint64_t)) {
            g_set_error(errp, MS_ENGINE_ERROR, got < 0 ? errno : EIO,
                        "cannot read pagemap at offset %" PRIu64 ": %s",
                        (uint64_t)off,
                        got < 0 ? g_strerror(errno) : "short read");
            return false;
        }
        done += got / sizeof(uint64_t);
    }
    return true;
}

static bool page_is_zero(const void *page, size_t page_size)
{
    const uint64_t *p = page;

    for (size_t i = 0; i < page_size / sizeof(*p); i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

/* A small cache of /proc/kpageflags around the last frame looked up */
typedef struct KpfWindow {
    int fd;
    uint64_t first;
    size_t count;
    uint64_t flags[KPF_WINDOW];
} KpfWindow;

static bool kpf_lookup(KpfWindow *w, uint64_t pfn, uint64_t *flags)
{
    ssize_t n;

    if (w->count == 0 || pfn < w->first || pfn >= w->first + w->count) {
        w->first = pfn - pfn % KPF_WINDOW;
        n = pread(w->fd, w->flags, sizeof(w->flags),
                  w->first * sizeof(uint64_t));
        if (n < (ssize_t)sizeof(uint64_t)) {
            w->count = 0;
            return false;
        }
        w->count = n / sizeof(uint64_t);
        if (pfn >= w->first + w->count) {
            return false;
        }
    }
    *flags = w->flags[pfn - w->first];
    return true;
}

static bool census_entry(KpfWindow *w, uint64_t entry, const void *page,
                         size_t page_size, MsPageCensus *c, GError **errp)
{
    uint64_t pfn = entry & PM_PFN_MASK;
    uint64_t flags;

    if (!(entry & PM_PRESENT)) {
        return true;
    }
    c->present++;
    if (pfn == 0) {
        g_set_error(errp, MS_ENGINE_ERROR, EPERM,
                    "page frame numbers are hidden from this process "
                    "(reading them needs CAP_SYS_ADMIN)");
        return false;
    }
    if (!kpf_lookup(w, pfn, &flags)) {
        g_set_error(errp, MS_ENGINE_ERROR, EIO,
                    "cannot read flags of page frame 0x%" PRIx64, pfn);
        return false;
    }
    if (flags & (1ULL << KPF_ZERO_PAGE)) {
        c->zero_pfn++;
    } else if (flags & (1ULL << KPF_KSM)) {
        c->ksm++;
        if (page_is_zero(page, page_size)) {
            c->ksm_zero++;
        }
    }
    return true;
}

bool ms_page_census(int pagemap_fd, int kpageflags_fd, const void *host,
                    size_t npages, size_t page_size, MsPageCensus *census,
                    GError **errp)
{
    uint64_t entries[CENSUS_BATCH];
    KpfWindow w = { .fd = kpageflags_fd };
    uintptr_t base = (uintptr_t)host;

    memset(census, 0, sizeof(*census));
    if (base % page_size) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "range %p is not page aligned", host);
        return false;
    }
    for (size_t done = 0; done < npages;) {
        size_t n = MIN(npages - done, CENSUS_BATCH);

        if (!ms_pagemap_read(pagemap_fd, (const char *)host + done * page_size,
                             n, page_size, entries, errp)) {
            return false;
        }
        for (size_t i = 0; i < n; i++) {
            const char *page = (const char *)host + (done + i) * page_size;

            if (!census_entry(&w, entries[i], page, page_size, census, errp)) {
                return false;
            }
        }
        done += n;
    }
    return true;
}
