/*
 * mem-share engine: the merge primitive (mode=user)
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Depends on libc, Linux uapi headers and GLib only, never on QEMU.
 *
 * An MsMerger replaces runs of guest pages, in place and without losing a
 * concurrent write, by copy-on-write mappings of store slots (merge) or by
 * holes (zero merge), makes them private again (unmerge), tells which
 * merged pages a write has since made private, and counts the VMAs all
 * this costs against a budget.  See hw/mem-share/merge.c for the protocol.
 *
 * Threads: one thread (the scanner) calls all of these for a given merger.
 * It must not take locks that a writer of guest RAM may hold (the BQL):
 * writers to a range being merged sleep in the kernel until the call
 * returns.  Other threads may read and write guest RAM freely.
 */

#ifndef MEM_SHARE_MERGE_H
#define MEM_SHARE_MERGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <glib.h>

#include "mem-share/error.h"

typedef struct MsMerger MsMerger;

/*
 * Region flags: the madvise() advice QEMU gave the RAM, which every new
 * mapping must get again (a new VMA does not inherit advice), and how
 * the RAM was mapped.
 */
#define MS_REGION_HUGEPAGE      (1u << 0)   /* MADV_HUGEPAGE */
#define MS_REGION_NOHUGEPAGE    (1u << 1)   /* MADV_NOHUGEPAGE */
#define MS_REGION_DONTFORK      (1u << 2)   /* MADV_DONTFORK */
#define MS_REGION_DONTDUMP      (1u << 3)   /* MADV_DONTDUMP */
#define MS_REGION_MERGEABLE     (1u << 4)   /* MADV_MERGEABLE */
#define MS_REGION_NORESERVE     (1u << 5)   /* mapped with MAP_NORESERVE */

/* The store a region's pages are merged into: its fd, and a view of it */
typedef struct MsMergeStore {
    int fd;                 /* read-only descriptor of the store memfd */
    const void *view;       /* read-only mapping of the whole store */
    uint32_t nslots;        /* all slots, the zero slots included */
    uint32_t nzero;         /* the last nzero slots read as zeros */
    /*
     * Optional second store (a group's, from the broker; nslots2 0: none):
     * its slots are numbered from nslots on.  A run lies in one store.
     */
    int fd2;
    const void *view2;
    uint32_t nslots2;
} MsMergeStore;

typedef enum MsMergeOutcome {
    MS_MERGE_DONE,          /* every page of the run was replaced */
    MS_MERGE_CHANGED,       /* some page differed once frozen: nothing done */
    MS_MERGE_NO_BUDGET,     /* it would exceed the VMA budget: nothing done */
    /*
     * The kernel refused the new mapping for want of resources (ENOMEM,
     * EAGAIN: vm.max_map_count, RLIMIT_AS, commit charge): every page
     * keeps its content, which the engine restored if the failed mmap()
     * left a hole; the pages may now be anonymous memory of their own
     * VMA.  A refusal like NO_BUDGET, not an error: try again later.
     */
    MS_MERGE_NO_MEMORY,
    MS_MERGE_FAILED,        /* a system error came first: nothing done */
} MsMergeOutcome;

typedef struct MsMergeResult {
    MsMergeOutcome outcome;
    size_t changed;         /* pages that differed (MS_MERGE_CHANGED) */
    size_t pinned;          /* of which mapped for DMA (see below) */
    size_t first_changed;   /* index of the first one in the run */
    int vma_delta;          /* VMAs the operation added (may be negative) */
} MsMergeResult;

/*
 * Open the userfaultfd and probe the kernel.  Fails, naming what is
 * missing, without userfaultfd write-protection for anonymous memory.
 * The VMA budget starts at half of vm.max_map_count.
 */
MsMerger *ms_merger_new(GError **errp);
void ms_merger_free(MsMerger *m);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(MsMerger, ms_merger_free)

/*
 * Declare @npages host pages at @host (page aligned, private anonymous,
 * one VMA with the advice in @flags) as guest RAM to merge into @store.
 * All operations below act inside one region.  The region's ends count
 * as fixed VMA boundaries.
 */
bool ms_merger_add_region(MsMerger *m, void *host, size_t npages,
                          unsigned flags, const MsMergeStore *store,
                          GError **errp);
/*
 * Pages of the region that starts at @host which the RAM's owner has
 * mapped for DMA: @pins[i] counts the mappings of page i (QEMU's
 * address_space_map() of a zero-copy transfer), raised with a full
 * barrier before the transfer starts and lowered after it ended; the
 * merger only reads it, with atomic loads, and keeps the pointer
 * (NULL: no DMA).  A page whose count is not zero once it is frozen is
 * not merged: the merge counts it as changed and as pinned.  See "DMA"
 * in merge.c for why this is enough.
 */
bool ms_merger_set_dma_pins(MsMerger *m, void *host, const uint32_t *pins,
                            GError **errp);

/* Forget the region starting at @host (when the RAM is unmapped). */
void ms_merger_remove_region(MsMerger *m, void *host);

/*
 * Give the region that starts at @host a new second store (a broker that
 * came back with a new store for the group): @fd, @view, @nslots as in
 * MsMergeStore.  Its slots are numbered from *@base, after every number
 * the previous second stores used; pages that still map those keep their
 * numbers.  The caller keeps @fd and @view valid while they are used.
 */
bool ms_merger_replace_second_store(MsMerger *m, void *host, int fd,
                                    const void *view, uint32_t nslots,
                                    uint32_t *base, GError **errp);

/*
 * VMAs the engine may add to the process, net, all mergers together.  A
 * merge that would bring ms_merger_process_vmas() above it, even for a
 * moment, is refused with MS_MERGE_NO_BUDGET: at vm.max_map_count the
 * kernel fails even an mmap(MAP_FIXED) that would lower the count.
 */
void ms_merger_set_budget(MsMerger *m, int64_t budget);
int64_t ms_merger_budget(const MsMerger *m);
/* VMAs this merger's mappings currently add to the process, net. */
int64_t ms_merger_vmas(const MsMerger *m);
/* The same, summed over every merger of the process. */
int64_t ms_merger_process_vmas(void);
/* vm.max_map_count now (65530, the kernel's default, if unreadable) */
int64_t ms_max_map_count(void);

/* The size of a PMD-mapped transparent huge page, or 0 if there is none */
size_t ms_thp_pmd_size(void);
/*
 * vm.max_map_count times @share, minus what the process already uses
 * besides the mergers' own VMAs.
 */
int64_t ms_merger_default_budget(double share);

/*
 * The store slot the mapping at @host points at (MS_SLOT_NONE, i.e.
 * UINT32_MAX, for anonymous memory), whether or not a write has since
 * made the page private.  Pass the slot after it as the allocation hint
 * for the next page.
 */
uint32_t ms_merger_slot_at(const MsMerger *m, const void *host);

/*
 * The size of the transparent huge pages that anonymous memory of region
 * @host may get (a PMD's), or 0: THP off, or the region advised
 * MS_REGION_NOHUGEPAGE.
 */
size_t ms_merger_huge_size(const MsMerger *m, const void *host);

/*
 * Merge the @n pages at @host with the published store slots
 * [@first_slot, @first_slot + @n): freeze (write-protect), compare every
 * page byte for byte, and only if all are equal map the slots over them
 * and wake the writers that slept.  The pages' references to the slots
 * are the caller's: take them when the outcome is MS_MERGE_DONE.
 * If @changed is not NULL it receives, per page, whether it differed.
 * Returns false (nothing replaced, nothing left registered or frozen)
 * on a system error.  Whatever fails, no page is ever left unmapped or
 * with other bytes: a failed mmap() that left a hole is mapped back with
 * the content, or the process stops saying why (ms_fatal(); see "Failed
 * remaps" in merge.c).
 */
bool ms_merge_run(MsMerger *m, void *host, size_t n, uint32_t first_slot,
                  bool *changed, MsMergeResult *res, GError **errp);

/*
 * Replace the @n pages at @host by holes if they are all zero, with the
 * same freeze / check / replace / wake protocol.  Pages that map the
 * store get fresh anonymous memory (MADV_DONTNEED there would bring the
 * store's content back); the caller drops their slot references.
 */
bool ms_merge_zero(MsMerger *m, void *host, size_t n, bool *changed,
                   MsMergeResult *res, GError **errp);

/* A merge request of ms_merge_runs() */
#define MS_MERGE_ZERO UINT32_MAX    /* first_slot of a zero merge */

typedef struct MsMergeReq {
    void *host;             /* first page */
    size_t n;
    uint32_t first_slot;    /* as ms_merge_run(); MS_MERGE_ZERO: as _zero() */
    bool *changed;          /* may be NULL; as ms_merge_run() */
    MsMergeResult res;      /* filled in */
} MsMergeReq;

/*
 * Do the @nreq merges of @reqs (sorted by address, disjoint, in one
 * region: those of one scan chunk), each exactly as ms_merge_run() or
 * ms_merge_zero() would, but with one pagemap read and one wake for
 * them all: every run is frozen first, and writers to any of them sleep
 * until all are replaced or thawed.  Runs that map the store take the
 * single-run path.  Returns false on a system error; the outcome of each
 * request is in its @res.
 */
bool ms_merge_runs(MsMerger *m, MsMergeReq *reqs, size_t nreq,
                   GError **errp);
/*
 * (On failure some requests may be MS_MERGE_DONE all the same: their
 * pages map the store; the others are MS_MERGE_FAILED or as above.)
 */

/*
 * Make the @n pages at @host private again, content unchanged: the pages
 * that map a file (a store, or one found when the region was added)
 * become anonymous memory, moved over them while they are frozen (see
 * "Unmerging" in merge.c).  Where that cannot be done (a page mapped for
 * DMA, the kernel refuses the mappings), each such page takes its
 * copy-on-write fault instead and its store mapping stays.  Either way
 * the caller drops the references of the pages ms_merge_test_shared()
 * no longer reports shared.
 */
bool ms_unmerge(MsMerger *m, void *host, size_t n, GError **errp);

/*
 * Discard the @n pages at @host: afterwards they read as zeros.  For
 * QEMU's ram_block_discard_range() (balloon, virtio-mem, postcopy) in
 * place of MADV_DONTNEED, which on a merged page brings back the store
 * content.  Not budgeted (a discard must not fail), but counted.  If
 * the kernel refuses the new mapping, the pages keep their content, or
 * read as zeros if the failure left a hole (never a hole).
 */
bool ms_merge_discard(MsMerger *m, void *host, size_t n, GError **errp);

/*
 * Map fresh anonymous memory over [@host, @host + @len), outside any
 * merger, with the advice of MS_REGION_* @flags (a new mapping inherits
 * none): zeros, whatever was mapped there.  For discards of RAM that a
 * merger left with store mappings after it went away.
 */
bool ms_map_fresh_anon(void *host, size_t len, unsigned flags, GError **errp);

/*
 * For each of the @n pages at @host, whether it still maps the store
 * (true) or is private: never merged, or a write copied it.  A merged
 * page not touched since the merge has no page table entry yet and still
 * maps the store.  @nshared (may be NULL) receives the count of true.
 * Uses the PAGEMAP_SCAN ioctl (Linux 6.7) when the kernel has it, else
 * reads /proc/self/pagemap.
 */
bool ms_merge_test_shared(MsMerger *m, const void *host, size_t n,
                          bool *shared, size_t *nshared, GError **errp);

/*
 * The same from @pagemap, the /proc/self/pagemap entries of the @n pages
 * read by the caller: a scanner that reads them for its own use anyway
 * saves the second read.
 */
bool ms_merge_test_shared_pagemap(MsMerger *m, const void *host, size_t n,
                                  const uint64_t *pagemap, bool *shared,
                                  size_t *nshared, GError **errp);

/*
 * Whether a read fault on never-written anonymous memory maps the shared
 * zero page here (probed once).  If not, a zero hole the guest reads
 * holds a page again: zero pages are better mapped onto zero slots.
 */
bool ms_read_fault_maps_zero_page(void);

/* Whether PAGEMAP_SCAN is used; switch it off (@use false) for tests. */
bool ms_merger_use_pagemap_scan(MsMerger *m, bool use);

/*
 * For tests only: fault injection.  The next remap (the mmap() that
 * replaces a run, frozen for a merge or not for a discard, or the
 * mremap() of anonymous memory over a frozen run to unmerge) first calls
 * @frozen(@opaque) if it is not NULL, then, if @err is not 0, fails with
 * errno @err instead of mapping, after unmapping the run first if @hole,
 * as kernels before 6.12 may do when mmap_region() fails late.
 */
void ms_merger_inject_remap_failure(MsMerger *m, int err, bool hole,
                                    void (*frozen)(void *opaque),
                                    void *opaque);

#endif /* MEM_SHARE_MERGE_H */
