/*
 * mem-share engine: the scanner of mode=user
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Depends on libc, GLib and the engine only, never on QEMU.
 *
 * An MsScanner decides what to merge in one region of guest RAM: it
 * walks the region a chunk at a time, hashes populated private pages,
 * and once a page's hash has stayed the same long enough merges it with
 * a hole or a zero slot (zero content), with a page already in the
 * store, or with an identical page seen earlier.  It
 * owns the store and the merger of the region.  See hw/mem-share/scan.c
 * for the algorithm.
 *
 * Threads: one thread (the scanner thread) calls ms_scanner_step(),
 * ms_scanner_unmerge_all() and ms_scanner_free(), and everything that
 * uses ms_scanner_store() or ms_scanner_merger().  That thread must not
 * hold the BQL (see merge.h).  ms_scanner_get_stats() may be called from
 * any thread at any time: it copies a snapshot that the scanner thread
 * publishes under a mutex at the end of every step.
 */

#ifndef MEM_SHARE_SCAN_H
#define MEM_SHARE_SCAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <glib.h>

#include "mem-share/broker-client.h"
#include "mem-share/error.h"
#include "mem-share/merge.h"
#include "mem-share/store.h"

typedef struct MsScanner MsScanner;

typedef enum MsZeroMode {
    MS_ZERO_AUTO,           /* holes if ms_read_fault_maps_zero_page() */
    MS_ZERO_HOLES,
    MS_ZERO_SLOTS,
} MsZeroMode;

/* Zero slots by default: 2 MiB; a zero run costs a mapping per 2 MiB */
#define MS_SCAN_ZERO_SLOTS 512

/*
 * A dirty log (see MsScanConfig.dirty_take): sets in @bits (bit k of
 * word k / 64 for page first + k) the pages of [first, first + n) written
 * since it last reported them, and forgets them; n <= 512.
 */
typedef void MsDirtyTakeFn(void *opaque, size_t first, size_t n,
                           uint64_t *bits);

typedef struct MsScanConfig {
    void *host;             /* the region: page aligned, private anonymous */
    size_t npages;
    size_t page_size;       /* the host page size */
    unsigned region_flags;  /* MS_REGION_* advice of the region (merge.h) */
    /*
     * Scans a page's hash must stay unchanged, after the scan that first
     * saw it, before the page is merged: 0 merges on first sight.
     */
    unsigned stable_scans;
    uint32_t store_slots;   /* store capacity; 0: one slot per page */
    /*
     * VMA budget: vma_budget if > 0, else ms_merger_default_budget()
     * with budget_share of vm.max_map_count, made again at the end of
     * a full pass that finds the sysctl changed.
     */
    int64_t vma_budget;
    double budget_share;
    /*
     * Where zero pages go: holes (no memory, no VMA) where a read of a
     * hole maps the shared zero page, else zero slots of the store,
     * which stay shared when read but cost mappings.
     */
    MsZeroMode zero_mode;
    uint32_t zero_slots;    /* zero slots for MS_ZERO_SLOTS; 0: default */
    /*
     * Share with the other members of a broker group (NULL: inside the
     * region only).  Borrowed, used by the scanner thread only, and only
     * while ms_broker_client_alive(); the scanner keeps its own reference
     * to the group's store.
     */
    MsBrokerClient *group;
    /*
     * Learn what can make a group miss pay from the broker's counters
     * (STATS) even if it can say which misses it answered (ANSWERED):
     * what a broker without ANSWERED gives.  For tests.
     */
    bool group_no_answers;
    /*
     * Dirty tracking (optional, NULL: every pass reads and hashes every
     * private page).  Called by the scanner thread once per chunk: it
     * must not take the BQL.  With a log a pass visits only the pages it
     * reports written and those still proving stable; a page is read
     * once it stayed unwritten long enough.  A sweep reads and hashes
     * pages whatever the log says: every page once in MS_SCAN_SWEEP_EVERY
     * passes (a chunk at a time), and all of them in the pass after
     * ms_scanner_sweep(), so a writer the log misses costs merges, never
     * correctness (every merge compares bytes anyway).
     */
    MsDirtyTakeFn *dirty_take;
    void *dirty_opaque;
    /*
     * Per page of the region, the DMA mappings that cover it (see
     * ms_merger_set_dma_pins()): pages with a count are not merged.
     * Borrowed; NULL: the region has no DMA.
     */
    const uint32_t *dma_pins;
} MsScanConfig;

/*
 * @fn is asked after every chunk of a step (512 pages): true ends the
 * step there, so that another thread waiting for the caller's lock gets
 * it within one chunk's work, not one step's.
 */
typedef bool MsScanYieldFn(void *opaque);
void ms_scanner_set_yield(MsScanner *s, MsScanYieldFn *fn, void *opaque);

/*
 * Give the scanner a dirty log (see MsScanConfig.dirty_take) after
 * ms_scanner_new(), before the scanner thread first steps it.
 */
void ms_scanner_set_dirty_log(MsScanner *s, MsDirtyTakeFn *take,
                              void *opaque);

/* Pages a step reads at once; the sweeps' unit */
#define MS_SCAN_CHUNK 512

/*
 * With dirty tracking, each pass sweeps one chunk in this many (chunk c
 * in the passes E - 1 - c modulo E): every page is read once a round.
 * At two passes a second a round is about 8 minutes, and a 512 MiB
 * guest's sweeping about 130 pages a second.
 */
#define MS_SCAN_SWEEP_EVERY 1024

/*
 * Make the next pass a sweep: every page is read and hashed, whatever
 * the dirty log says (scan-now).  Scanner thread, or its lock held.
 */
void ms_scanner_sweep(MsScanner *s);

/*
 * Statistics.  "now" figures describe the region at the end of the last
 * step; the others count events since ms_scanner_new().
 */
typedef struct MsScanStats {
    uint64_t pages;             /* region size, pages */
    uint64_t page_size;
    uint64_t pages_scanned;     /* pages visited */
    uint64_t full_scans;        /* passes over the whole region completed */
    uint64_t pages_merged;      /* now: guest pages that map a store slot */
    uint64_t zero_holes;        /* now: zero pages merged (holes or slots) */
    uint64_t zero_slots;        /* zero slots of the store; 0: zero holes */
    uint64_t zero_held;         /* zero slots holding a page (reads filled) */
    uint64_t slots_used;        /* now: store slots in use */
    /* now: written (hash changed, or dirty in the log) at the last visit */
    uint64_t pages_volatile;
    uint64_t hash_changes;      /* visits that found a changed hash */
    uint64_t pages_dirty;       /* visits of pages the dirty log saw written */
    /* pages passed over, or visited without a hash: clean in the log */
    uint64_t hash_skips;
    uint64_t candidates;        /* pages found stable and read for a merge */
    /* merges a write broke before they outlived their wait: see "Churn" */
    uint64_t merges_wasted;
    /* visits of stable pages held back by their own churn wait */
    uint64_t churn_skips;
    uint64_t merges;            /* pages merged onto the store */
    /*
     * Zero pages merged (holes or zero slots).  Where holes are used on a
     * kernel whose read faults allocate a page (multi-size THP), a guest
     * reading a hole fills it again and a later scan makes it a hole
     * again: this count grows, re-merges do not.
     */
    uint64_t zero_merges;
    uint64_t remerges;          /* merges of pages merged before */
    /* merges, zero ones too, of pages whose last merge broke soon */
    uint64_t merges_upkeep;
    /* first writes to a hole that found its huge page filled */
    uint64_t huge_fills;
    uint64_t cow_breaks;        /* merged pages a write made private */
    uint64_t extra_scans;       /* now: scans asked on top, for churn */
    uint64_t refused_budget;    /* merges refused: VMA budget */
    uint64_t refused_changed;   /* merges refused: content changed */
    uint64_t refused_store_full;/* merges refused: no free store slot */
    uint64_t refused_dma;       /* merges refused: page mapped for DMA */
    uint64_t refused_nomem;     /* merges refused: the kernel's mmap() */
    uint64_t group_pages;       /* now: pages that map the group's store */
    uint64_t group_lookups;     /* pages looked up in the group */
    uint64_t group_retries_skipped; /* retries not asked: nothing new */
    uint64_t group_answers;     /* our misses the broker said it answered */
    uint64_t group_hits;        /* of which the group had, same bytes */
    uint64_t group_uploads;     /* pages given to the group (WANTED) */
    uint64_t group_lost;        /* 1 while the broker connection is lost */
    uint64_t group_waits;       /* group calls that gave up waiting */
    uint64_t group_stalled;     /* 1 while one that timed out is unanswered */
    uint64_t group_rejoins;     /* ms_scanner_set_group() after a loss */
    int64_t vmas;               /* VMAs the merged mappings add, net */
    int64_t vma_budget;
    /*
     * (merged - slots used + zero holes - zero held + group pages) pages,
     * in bytes: a page on the group's store frees its private copy, and
     * the store page is the broker's.
     */
    uint64_t bytes_saved;
} MsScanStats;

/* Fill @cfg with the defaults (stable_scans 1, budget share 0.5). */
void ms_scan_config_init(MsScanConfig *cfg);

/*
 * Create a scanner for the region described by @cfg, with its own store
 * and merger.  Fails when the merger cannot work (no userfaultfd write
 * protection) or the store cannot be created.
 */
MsScanner *ms_scanner_new(const MsScanConfig *cfg, GError **errp);
/*
 * Free the scanner.  Merged pages keep mapping the store (the mappings
 * hold the memfd), so call ms_scanner_unmerge_all() first unless the
 * region is about to be unmapped.
 */
void ms_scanner_free(MsScanner *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(MsScanner, ms_scanner_free)

/*
 * Scan up to @max_pages pages from the cursor, up to the region's end at
 * most (which completes a full scan: the caller paces passes), merging
 * what is ready; @scanned (may be NULL) receives the number of pages the
 * cursor passed, visited or not (pages_scanned counts visits).  Returns false
 * on a system error (a failed mmap, pagemap read, ...); the state stays
 * consistent and the next step may try again.
 */
bool ms_scanner_step(MsScanner *s, size_t max_pages, size_t *scanned,
                     GError **errp);

/*
 * Make every page private again, contents unchanged, and drop every
 * store reference: afterwards the store is empty.  Zero holes stay
 * holes (they read zeros, as before).  Scanning may resume afterwards,
 * from scratch.
 */
bool ms_scanner_unmerge_all(MsScanner *s, GError **errp);

/*
 * Discard the @n pages at @host (balloon, virtio-mem, postcopy: QEMU's
 * ram_block_discard_range()): afterwards they read zeros, and merged
 * ones gave their store references back.  Plain MADV_DONTNEED must not
 * be used on the region: on a merged page, or a page that was merged
 * and written since, it brings back the store's content, or zeros once
 * the slot is freed.  Any range of whole pages (zero holes, zero slots,
 * group slots, part of a run).  From the scanner thread, or from another
 * thread between two steps, serialised with them.
 */
bool ms_scanner_discard(MsScanner *s, void *host, size_t n, GError **errp);

/*
 * After the broker connection was lost (group_lost), continue with @c, a
 * new connection to the group (borrowed, as MsScanConfig.group): new
 * merges use its store; pages that map the old store stay as they are
 * (their mappings keep it alive) and are counted until written.  Scanner
 * thread only.
 */
bool ms_scanner_set_group(MsScanner *s, MsBrokerClient *c, GError **errp);

/* Copy the statistics of the last step; any thread. */
void ms_scanner_get_stats(MsScanner *s, MsScanStats *st);

/*
 * The scanner's store and merger, for the scanner thread only: e.g. to
 * discard pages with ms_merge_discard() (the next scan then finds them
 * private and drops their references), or to change the VMA budget.
 */
MsStore *ms_scanner_store(MsScanner *s);
MsMerger *ms_scanner_merger(MsScanner *s);

#endif /* MEM_SHARE_SCAN_H */
