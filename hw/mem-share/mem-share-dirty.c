/*
 * mem-share: the scanner's dirty log (dirty-tracking=kvm)
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * QEMU's dirty memory has a client of mem-share's own,
 * DIRTY_MEMORY_MEMSHARE (patch 0012; its bitmap is allocated when the
 * first mem-share object turns it on): vCPU writes reach it through the
 * KVM dirty log (bitmap, with manual protect and clear, or the dirty
 * ring), TCG writes through TCG's not-dirty path, device emulation
 * through address_space_write() and address_space_unmap().  mem-share
 * reads and clears only its own client's bits: migration, dirty-rate and
 * display code keep theirs.
 *
 * Syncing the log needs the BQL (it walks the memory listeners and asks
 * KVM), which the scanner thread must never take (see mem-share-user.c),
 * so a main-loop timer syncs the log and ORs what it found into a
 * bitmap of the backend's pages: every MEM_SHARE_DIRTY_SYNC_MS at
 * first, then as often as the scanner's pace asks
 * (mem_share_dirty_set_period(): a few syncs per pass; a sync costs a
 * walk of the bitmap and, under TCG, a reset of every vCPU's TLB entries
 * for the region, after which each page's next write takes the slow
 * path again, so a guest the scanner visits every 4 s is not synced ten
 * times a second).  The scanner takes (and
 * clears) a chunk's bits, a word at a time, before it reads the chunk's
 * pages.  The main loop's CPU time for the sync is counted as the
 * scanner's (scan-cpu-ns): it is what the log costs.  A write
 * between the last sync and the scanner's visit shows at the next visit;
 * meanwhile the scanner may count the page unchanged on its old hash,
 * which only costs a merge that fails its byte compare.  Correctness
 * never depends on the log: every merge compares the frozen page.
 *
 * Turning the client on sets KVM_MEM_LOG_DIRTY_PAGES on the region's
 * memory slots (a flags-only update): no slot is deleted or created.
 *
 * A sync can drop the BQL: under TCG, memory_region_snapshot_and_clear_dirty()
 * waits for every vCPU to end its translation block (run_on_cpu()), in
 * qemu_cond_wait() on the BQL.  Another thread may take it meanwhile and
 * stop the scanner (a background snapshot's migration thread releasing
 * the RAM), so mem_share_dirty_stop() never frees a log whose sync is in
 * progress: it marks it stopped, and the sync frees it when it is back.
 * mem_share_dirty_start() does not sync, so that starting never drops
 * the BQL half way.
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/main-loop.h"
#include "qemu/thread.h"
#include "qemu/timer.h"
#include "exec/memory.h"
#include "hw/mem-share/mem-share.h"
#include "trace.h"

/* How often the log is synced until the scanner sets its period */
#define MEM_SHARE_DIRTY_SYNC_MS 100
/* Pages looked up in the snapshot at once before looking page by page */
#define MEM_SHARE_DIRTY_RUN 64

struct MemShareDirty {
    MemShareBackend *ms;
    MemoryRegion *mr;
    size_t npages;
    size_t page_size;
    QEMUTimer *timer;
    QemuMutex lock;             /* protects pending */
    unsigned long *pending;     /* written since the scanner last looked */
    uint64_t cpu_ns;            /* spent syncing; accessed with qatomic_* */
    unsigned period_ms;         /* between syncs; accessed with qatomic_* */
    bool syncing;               /* BQL: in mem_share_dirty_sync() */
    bool stopped;               /* BQL: stopped meanwhile, the sync frees */
};

static void mem_share_dirty_free(MemShareDirty *d)
{
    qemu_mutex_destroy(&d->lock);
    g_free(d->pending);
    g_free(d);
}

static int64_t thread_cpu_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * NANOSECONDS_PER_SECOND + ts.tv_nsec;
}

/* Main loop, BQL held: move the log's news into pending */
static void mem_share_dirty_sync(void *opaque)
{
    MemShareDirty *d = opaque;
    g_autofree DirtyBitmapSnapshot *snap = NULL;
    uint64_t found = 0;
    int64_t t0 = get_clock(), cpu0 = thread_cpu_ns();

    /* May drop the BQL (see the top of this file) */
    d->syncing = true;
    snap = memory_region_snapshot_and_clear_dirty(d->mr, 0,
                                                  d->npages * d->page_size,
                                                  DIRTY_MEMORY_MEMSHARE);
    d->syncing = false;
    if (d->stopped) {
        trace_mem_share_dirty_sync_stopped(d);
        mem_share_dirty_free(d);
        return;
    }
    qemu_mutex_lock(&d->lock);
    for (size_t p = 0; p < d->npages; p += MEM_SHARE_DIRTY_RUN) {
        size_t n = MIN(MEM_SHARE_DIRTY_RUN, d->npages - p);

        if (!memory_region_snapshot_get_dirty(d->mr, snap, p * d->page_size,
                                              n * d->page_size)) {
            continue;
        }
        for (size_t k = p; k < p + n; k++) {
            if (memory_region_snapshot_get_dirty(d->mr, snap,
                                                 k * d->page_size,
                                                 d->page_size)) {
                set_bit(k, d->pending);
                found++;
            }
        }
    }
    qemu_mutex_unlock(&d->lock);
    /* The log's cost is the scanner's: query-mem-share's scan-cpu-ns */
    qatomic_set(&d->cpu_ns,
                qatomic_read(&d->cpu_ns) + thread_cpu_ns() - cpu0);
    trace_mem_share_dirty_sync(
        object_get_canonical_path_component(OBJECT(d->ms)), found,
        get_clock() - t0);
    timer_mod(d->timer, qemu_clock_get_ms(QEMU_CLOCK_REALTIME) +
              qatomic_read(&d->period_ms));
}

/*
 * Scanner thread: sync every @period_ms from the next sync on.  Any
 * period is safe: a write the log has not brought yet only makes a
 * merge fail its byte compare (see above).
 */
void mem_share_dirty_set_period(MemShareDirty *d, unsigned period_ms)
{
    qatomic_set(&d->period_ms, MAX(period_ms, 1));
}

/* Scanner thread: the chunk's pages written since it last looked */
void mem_share_dirty_take(void *opaque, size_t first, size_t n,
                          uint64_t *bits)
{
    MemShareDirty *d = opaque;

    assert(first + n <= d->npages);
    qemu_mutex_lock(&d->lock);
    if (BITS_PER_LONG == 64 && first % 64 == 0) {
        /* Whole words: the scanner's chunks start on one */
        for (size_t k = 0; k < n; k += 64) {
            unsigned long *w = &d->pending[BIT_WORD(first + k)];
            unsigned long mask = n - k >= 64 ? ~0UL :
                                 BITMAP_LAST_WORD_MASK(n - k);

            bits[k / 64] |= *w & mask;
            *w &= ~mask;
        }
    } else {
        for (size_t k = 0; k < n; k++) {
            if (test_and_clear_bit(first + k, d->pending)) {
                bits[k / 64] |= 1ULL << (k % 64);
            }
        }
    }
    qemu_mutex_unlock(&d->lock);
}

uint64_t mem_share_dirty_cpu_ns(MemShareDirty *d)
{
    return d ? qatomic_read(&d->cpu_ns) : 0;
}

MemShareDirty *mem_share_dirty_start(MemShareBackend *ms)
{
    HostMemoryBackend *backend = MEMORY_BACKEND(ms);
    MemShareDirty *d = g_new0(MemShareDirty, 1);

    assert(bql_locked());
    d->ms = ms;
    d->mr = &backend->mr;
    d->page_size = qemu_real_host_page_size();
    d->npages = backend->size / d->page_size;
    qemu_mutex_init(&d->lock);
    /* Nothing is known yet: the first visit of every page hashes it */
    d->pending = bitmap_new(d->npages);
    bitmap_set(d->pending, 0, d->npages);
    /* The first time, this allocates the client's bitmap (patch 0012) */
    memory_region_set_log(d->mr, true, DIRTY_MEMORY_MEMSHARE);
    /*
     * Our bits start clean (a previous run may have left some): the next
     * sync brings what was written since.  Not with a snapshot, which can
     * drop the BQL.  TCG's next store to each page marks our client:
     * turning the log on committed a memory transaction, which flushed
     * every vCPU's TLB.
     */
    memory_region_reset_dirty(d->mr, 0, backend->size, DIRTY_MEMORY_MEMSHARE);
    d->period_ms = MEM_SHARE_DIRTY_SYNC_MS;
    d->timer = timer_new_ms(QEMU_CLOCK_REALTIME, mem_share_dirty_sync, d);
    timer_mod(d->timer, qemu_clock_get_ms(QEMU_CLOCK_REALTIME) +
              d->period_ms);
    return d;
}

/* After the scanner thread stopped */
void mem_share_dirty_stop(MemShareDirty *d)
{
    if (!d) {
        return;
    }
    assert(bql_locked());
    timer_free(d->timer);
    d->timer = NULL;
    memory_region_set_log(d->mr, false, DIRTY_MEMORY_MEMSHARE);
    if (d->syncing) {
        /* Its sync waits for the BQL we hold: it frees on its way out */
        d->stopped = true;
        return;
    }
    mem_share_dirty_free(d);
}
