/*
 * mem-share engine: reading the host kernel's KSM state
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * This header is part of the mem-share engine: it depends on libc and
 * GLib only, never on QEMU, so that the engine can be unit-tested on its
 * own and shared with the broker.
 */

#ifndef MEM_SHARE_KSM_H
#define MEM_SHARE_KSM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <glib.h>

#include "mem-share/error.h"

/* Host-wide KSM state, from /sys/kernel/mm/ksm and /proc/vmstat. */
typedef struct MsKsmHost {
    bool available;         /* /sys/kernel/mm/ksm exists */
    bool running;           /* run == 1 */
    bool use_zero_pages;
    uint64_t pages_shared;
    uint64_t pages_sharing;
    uint64_t pages_unshared;
    uint64_t pages_volatile;
    uint64_t pages_scanned;
    uint64_t full_scans;
    uint64_t ksm_zero_pages;
    uint64_t cow_ksm;       /* /proc/vmstat: copy-on-write breaks of KSM */
} MsKsmHost;

/* Per-process KSM state, from /proc/PID/ksm_stat and ksm_merging_pages. */
typedef struct MsKsmProcess {
    bool available;         /* ksm_stat exists (Linux 6.1 and later) */
    uint64_t rmap_items;
    uint64_t zero_pages;
    uint64_t merging_pages;
    int64_t process_profit;
    bool merge_any;
    bool mergeable;
} MsKsmProcess;

/*
 * What one range of this process's memory maps, page by page, as told by
 * /proc/self/pagemap and /proc/kpageflags.
 */
typedef struct MsPageCensus {
    uint64_t present;       /* pages with a page table entry */
    uint64_t ksm;           /* pages that map a KSM page */
    uint64_t zero_pfn;      /* pages that map the shared zero page */
    uint64_t ksm_zero;      /* KSM pages whose content is all zeros */
} MsPageCensus;

bool ms_ksm_read_host(const char *sysfs_dir, const char *vmstat_path,
                      MsKsmHost *host, GError **errp);
bool ms_ksm_read_process(const char *proc_dir, MsKsmProcess *proc,
                         GError **errp);

/* CPU time (user + system) of the host's ksmd thread, 0 if not found. */
uint64_t ms_ksmd_cpu_ns(const char *proc_root);

/*
 * Read the /proc/self/pagemap entries (via @pagemap_fd) of the @n pages
 * at @host into @entries, retrying short reads and EINTR.
 */
bool ms_pagemap_read(int pagemap_fd, const void *host, size_t n,
                     size_t page_size, uint64_t *entries, GError **errp);

/*
 * Count what the @npages pages at @host map.  @pagemap_fd and
 * @kpageflags_fd are open descriptors of /proc/self/pagemap and
 * /proc/kpageflags (or test doubles with the same layout).  Page frame
 * numbers are only visible to CAP_SYS_ADMIN: without them the census
 * fails and the caller falls back to process-wide figures.
 */
bool ms_page_census(int pagemap_fd, int kpageflags_fd, const void *host,
                    size_t npages, size_t page_size, MsPageCensus *census,
                    GError **errp);

#endif /* MEM_SHARE_KSM_H */
