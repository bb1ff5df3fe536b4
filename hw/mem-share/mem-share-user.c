/*
 * mem-share: the mode=user scanner thread
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The engine (hw/mem-share/scan.c) decides what to merge and merges it;
 * this file runs it for one backend in a thread of its own and paces it.
 *
 * The thread never takes the BQL: merging freezes guest pages with
 * userfaultfd write-protection, and a vCPU or the main loop that writes a
 * frozen page sleeps in the kernel until the merge is done.  Holding the
 * BQL while a thread that needs it sleeps on our freeze would deadlock.
 *
 * Pacing: after each batch the thread sleeps long enough that neither
 * the page rate (scan-rate, pages visited per second) nor the CPU share
 * (max-cpu, percent of one CPU, measured with the thread's own CPU clock
 * and, with a dirty log, the main loop's syncs of it) is exceeded.
 *
 * With a dirty log (dirty-tracking=kvm, the default) a pass visits only
 * what was written and what waits to prove stable, so its cost follows
 * the guest's writes; what paces it is time: a pass starts at most every
 * MEM_SHARE_PASS_MS, and a pass is also the unit of stability (a page
 * must stay unwritten for whole passes, see scan.c), so it must span
 * several syncs of the log: MEM_SHARE_PASS_SYNCS in the period of a
 * pass, so that the syncs slow down with the passes.  A productive pass
 * (merges and zero merges together at least 1/64 of the pages it
 * visited, not counting merges again of pages whose last merge a write
 * broke soon) keeps that period; each unproductive one doubles it, up to
 * 2^MEM_SHARE_MAX_PASS_BACKOFF times: a merged, quiet guest costs almost
 * nothing, a busy one is visited less often (each pass visits a page
 * once however often it was written), and the next productive pass
 * restores the pace.
 *
 * Without a log (dirty-tracking=hash) every pass reads every page, so
 * the limits themselves back off: after each full pass that found little
 * to do (merges, zero holes, copy-on-write breaks and changed pages
 * together under 1/64 of the pages) both are halved, down to 1/32, and a
 * pass that finds work restores them.
 *
 * A scan-now request makes the next pass a sweep (every page read,
 * whatever the log says) and lifts the limits until it is done.  It
 * takes no lock: the thread picks it up before its next step, so the
 * monitor never waits for a step in progress.
 *
 * Groups: with group= and broker=, the object joins the broker's group
 * when the scanner first starts (creation fails if it cannot) and the
 * scanner also shares with the group's other members.  The connection
 * is kept from one mode=user run to the next (a mode switch, a migration
 * or snapshot pause): a restart never waits for the broker.  While the
 * scanner runs, the connection is the scanner thread's.  A broker that
 * is slow to answer is not gone (broker-client.c): the thread waits at
 * most its timeout once, then goes on without the group until the
 * broker catches up, and any thread that needs the scanner's lock
 * (discards, a stop: the main loop among them) interrupts a
 * wait within 10 ms.  If the connection breaks, the object says so once,
 * keeps what it merged, shares inside itself only, and tries to join the
 * group again every 5 s, without holding the scanner's lock while it
 * connects (a new broker has a new store: pages on the old one stay as
 * they are until written).
 *
 * Discards.  MADV_DONTNEED on a page that maps the store, or that was
 * merged and written since, brings back the store's content instead of
 * zeros.  So while the scanner runs, QEMU's ram_block_discard_range()
 * on this RAM (virtio-balloon, virtio-mem) goes to the engine
 * (ms_scanner_discard(): anonymous memory over merged pages, their
 * references dropped).  The callers hold the BQL (virtio-balloon,
 * virtio-mem) or not (the migration thread's release-ram); they take the
 * scanner's lock between two batches, which never waits for the BQL.
 * mem_share_discard_lock keeps the scanner from going away under a
 * discard that does not hold the BQL.
 *
 * Pinning.  Merging remaps guest pages: a device that pinned guest RAM
 * (VFIO, vhost-vdpa, the userspace NVMe driver) would go on reading and
 * writing the pages it pinned, no longer the guest's.  Those devices
 * disable RAM discards, and mode=user requires discards
 * (ram_block_discard_require()): whichever comes second is refused.
 */

#include "qemu/osdep.h"
#include "qemu/error-report.h"
#include "qemu/madvise.h"
#include "qemu/main-loop.h"
#include "qemu/thread.h"
#include "qemu/timer.h"
#include "qapi/error.h"
#include "exec/memory.h"
#include "exec/ramblock.h"
#include "system/system.h"
#include "system/qtest.h"
#include "hw/boards.h"
#include "hw/mem-share/mem-share.h"
#include "mem-share/scan.h"
#include "trace.h"

/* Pages per step: long enough to amortise, short enough to stop quickly */
#define MEM_SHARE_BATCH     4096
/* A pass is quiet when it did less work than 1 page in this many */
#define MEM_SHARE_QUIET     64
/* Quiet passes halve the pace, at most this many times */
#define MEM_SHARE_MAX_BACKOFF 5
/* With a dirty log: a pass at most this often ... */
#define MEM_SHARE_PASS_MS   500
/* ... and this many syncs of the log in the period of a pass */
#define MEM_SHARE_PASS_SYNCS 4
/* ... and unproductive passes double that, at most this many times */
#define MEM_SHARE_MAX_PASS_BACKOFF 3
/* After losing the broker: try to join again this often, this long */
#define MEM_SHARE_REJOIN_NS         (5 * NANOSECONDS_PER_SECOND)
#define MEM_SHARE_REJOIN_TIMEOUT_MS 1000

/* Held by discards, and to clear MemShareBackend.user (any backend) */
static QemuMutex mem_share_discard_lock;

static void __attribute__((constructor)) mem_share_discard_lock_init(void)
{
    qemu_mutex_init(&mem_share_discard_lock);
}

struct MemShareUser {
    MsScanner *scanner;
    MsBrokerClient *client; /* ms->broker_client, or NULL */
    MemShareDirty *dirty;   /* dirty-tracking=kvm: the dirty log */
    bool lost_reported;
    bool refused_reported;  /* a listener that is not the broker, said */
    int64_t rejoin_at;      /* next attempt to join the group again */
    QemuThread thread;
    QemuMutex lock;         /* serialises the scanner and the fields below */
    /*
     * Posted to end the thread's sleep early.  A semaphore, not a
     * condition: a post needs no lock, so asking (scan-now, a new pace)
     * never waits for a step, and a post made before the thread sleeps
     * is not lost.
     */
    QemuSemaphore wakeup;
    /* Threads waiting for the lock; the scanner thread lets them go first */
    unsigned waiters;       /* accessed with qatomic_* */
    QemuCond waiters_done;
    bool stop;
    bool scan_now_asked;     /* qatomic_*: taken by the next step */
    uint64_t scan_now_pages; /* pages still to scan without pacing */
    bool error_reported;
    uint64_t cpu_ns;        /* accessed with qatomic_* */
    uint64_t log_cpu_ns;    /* the log's part of cpu_ns; qatomic_* */
    /* Back-off when converged */
    uint64_t pass_full_scans;   /* full scans when the current pass began */
    uint64_t pass_work;         /* work counters then */
    uint64_t pass_visits;       /* pages_scanned then */
    int64_t pass_start;         /* get_clock() when the current pass began */
    uint64_t visits;            /* pages_scanned at the last step */
    /* the limits (with a log: the pass period) divided (times) 2^backoff */
    unsigned backoff;
    uint64_t refused_dma;       /* refused_dma at the last step */
    bool budget_reported;       /* the operator was told the budget ran out */
    int64_t vma_budget;         /* the budget then */
    uint64_t refused_budget;    /* refused_budget when the budget was set */
};

static int64_t thread_cpu_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * NANOSECONDS_PER_SECOND + ts.tv_nsec;
}

/* How long to wait after a batch of @pages that took @wall_ns and @cpu_ns */
static int64_t mem_share_delay_ns(MemShareBackend *ms, uint64_t pages,
                                  int64_t wall_ns, int64_t cpu_ns)
{
    /* With a log, quiet passes lengthen the pass instead */
    unsigned backoff = ms->user->dirty ? 0 : ms->user->backoff;
    uint64_t rate = qatomic_read(&ms->scan_rate);
    uint32_t cpu = MAX(qatomic_read(&ms->max_cpu) >> backoff, 1);
    int64_t want = 0;

    if (rate) {
        want = pages * NANOSECONDS_PER_SECOND / MAX(rate >> backoff, 1);
    }
    if (cpu < 100) {
        want = MAX(want, cpu_ns * 100 / cpu);
    }
    return want - wall_ns;
}

/* With a dirty log: the period of a pass at the present pace */
static unsigned mem_share_pass_period_ms(const MemShareUser *u)
{
    return MEM_SHARE_PASS_MS << u->backoff;
}

/* At the end of each full pass, slow down if it found little to do */
static void mem_share_update_backoff(MemShareBackend *ms, MemShareUser *u,
                                     const MsScanStats *st)
{
    uint64_t work;

    uint64_t visits = st->pages_scanned - u->pass_visits;
    bool quiet;

    if (st->full_scans == u->pass_full_scans) {
        return;
    }
    if (u->dirty) {
        /*
         * Only merges: pages found stable that match nothing kept a
         * fleet of guests that write unique pages all the time at the
         * fastest pace (one merge for a hundred candidates), and each
         * pass costs its log syncs and chunk walks, and the group's
         * retries are counted in passes.  Copy-on-write breaks and
         * writes are not work either: what churns is visited, not
         * merged.  Nor are merges of pages whose last merge a write
         * broke soon (upkeep, see scan.c): a group of guests that
         * write alike kept its passes at full pace with those.
         */
        work = st->merges + st->zero_merges - st->merges_upkeep;
        quiet = (work - u->pass_work) * MEM_SHARE_QUIET <= visits;
    } else {
        /* Changed hashes are work to come: candidates of the next pass */
        work = st->merges + st->zero_merges + st->cow_breaks +
               st->hash_changes;
        quiet = (work - u->pass_work) * MEM_SHARE_QUIET < st->pages;
    }
    /* The first passes only learn hashes: their candidates come later */
    if (quiet && st->full_scans > ms->stable_scans + 1) {
        u->backoff = MIN(u->backoff + 1, u->dirty ? MEM_SHARE_MAX_PASS_BACKOFF
                                                  : MEM_SHARE_MAX_BACKOFF);
    } else {
        u->backoff = 0;
    }
    if (u->dirty) {
        mem_share_dirty_set_period(u->dirty, mem_share_pass_period_ms(u) /
                                             MEM_SHARE_PASS_SYNCS);
    }
    trace_mem_share_user_pass(object_get_canonical_path_component(OBJECT(ms)),
                              st->full_scans, work - u->pass_work, u->backoff);
    u->pass_full_scans = st->full_scans;
    u->pass_work = work;
    u->pass_visits = st->pages_scanned;
}

/* Trace the merges refused for DMA since the last report */
static void mem_share_trace_dma(MemShareBackend *ms, MemShareUser *u,
                                const MsScanStats *st)
{
    if (st->refused_dma != u->refused_dma) {
        trace_mem_share_user_dma_busy(
            object_get_canonical_path_component(OBJECT(ms)),
            st->refused_dma - u->refused_dma, st->refused_dma);
        u->refused_dma = st->refused_dma;
    }
}

/*
 * The first merge the mapping budget refuses is worth one line on stderr:
 * from then on scattered duplicates stay unmerged, and the fix is the
 * host's, not QEMU's (see map-budget in docs/system/mem-share.rst).  The
 * scanner makes the budget again when vm.max_map_count changes; a larger
 * one that is spent in turn is worth another line.
 */
static void mem_share_report_budget(MemShareBackend *ms, MemShareUser *u,
                                    const MsScanStats *st)
{
    g_autofree char *text = NULL;

    if (st->vma_budget != u->vma_budget) {
        trace_mem_share_user_budget(
            object_get_canonical_path_component(OBJECT(ms)),
            u->vma_budget, st->vma_budget, st->vmas);
        if (st->vma_budget > u->vma_budget) {
            u->budget_reported = false;
        }
        u->vma_budget = st->vma_budget;
        u->refused_budget = st->refused_budget;
    }
    if (u->budget_reported || st->refused_budget == u->refused_budget) {
        return;
    }
    u->budget_reported = true;
    g_file_get_contents("/proc/sys/vm/max_map_count", &text, NULL, NULL);
    warn_report("mem-share '%s': the mapping budget (%" PRId64 " mappings, "
                "map-budget=%u%% of vm.max_map_count=%s) is spent: pages "
                "whose duplicates are scattered stay unmerged; raise "
                "vm.max_map_count on the host to merge them",
                object_get_canonical_path_component(OBJECT(ms)),
                st->vma_budget, ms->map_budget,
                text ? g_strstrip(text) : "?");
}

static MsBrokerClient *mem_share_join(MemShareBackend *ms, int timeout_ms,
                                      GError **errp)
{
    const char *id = object_get_canonical_path_component(OBJECT(ms));
    g_autofree char *client = g_strdup_printf("qemu-%d-%s", getpid(), id);

    GError *err = NULL;
    MsBrokerClient *c;

    /* The broker's names are [A-Za-z0-9._-]: the id may hold more */
    g_strcanon(client, G_CSET_A_2_Z G_CSET_a_2_z G_CSET_DIGITS "._-", '_');
    /* Pages go only to a listener of the expected uid: see broker-uid */
    c = ms_broker_client_connect_as(ms->broker, ms->broker_uid, ms->group,
                                    client, timeout_ms, &err);
    if (!c) {
        if (g_error_matches(err, MS_ENGINE_ERROR, EPERM)) {
            trace_mem_share_user_broker_refused(id, ms->broker,
                                                ms->broker_uid);
        }
        g_propagate_error(errp, err);
    }
    return c;
}

/* What to say after the client library's refusal of a listener */
#define MEM_SHARE_BROKER_UID_HINT \
    "if that process is mem-share-broker, set broker-uid to the user it" \
    " runs as"

/* Somebody waits for the scanner's lock: broker calls give up waiting */
static bool mem_share_user_interrupt(void *opaque)
{
    MemShareUser *u = opaque;

    return qatomic_read(&u->waiters) > 0;
}

/*
 * Say once that the broker connection broke (sharing goes on inside the
 * VM), then try to join the group again every MEM_SHARE_REJOIN_NS.
 * Connecting does not need the scanner: the lock is dropped meanwhile,
 * so that discards and QMP never wait for a broker that does not answer.
 */
static void mem_share_check_group(MemShareBackend *ms, MemShareUser *u,
                                  const MsScanStats *st)
{
    const char *id = object_get_canonical_path_component(OBJECT(ms));
    g_autoptr(GError) gerr = NULL;
    MsBrokerClient *c;
    int64_t now;

    if (!u->client || !st->group_lost) {
        return;
    }
    if (!u->lost_reported) {
        warn_report("mem-share '%s': lost the broker of group '%s' (%s);"
                    " %" PRIu64 " pages merged with the group stay merged;"
                    " trying to join again every %d s", id, ms->group,
                    ms->broker, st->group_pages,
                    (int)(MEM_SHARE_REJOIN_NS / NANOSECONDS_PER_SECOND));
        u->lost_reported = true;
        u->rejoin_at = get_clock() + MEM_SHARE_REJOIN_NS;
    }
    now = get_clock();
    if (now < u->rejoin_at) {
        return;
    }
    u->rejoin_at = now + MEM_SHARE_REJOIN_NS;
    qemu_mutex_unlock(&u->lock);
    c = mem_share_join(ms, MEM_SHARE_REJOIN_TIMEOUT_MS, &gerr);
    qemu_mutex_lock(&u->lock);
    if (!c) {
        trace_mem_share_user_rejoin(id, false);
        /* Someone else took the broker's socket: worth a line, once */
        if (g_error_matches(gerr, MS_ENGINE_ERROR, EPERM) &&
            !u->refused_reported) {
            warn_report("mem-share '%s': cannot join group '%s' again: %s"
                        " (%s); still trying every %d s", id, ms->group,
                        gerr->message, MEM_SHARE_BROKER_UID_HINT,
                        (int)(MEM_SHARE_REJOIN_NS / NANOSECONDS_PER_SECOND));
            u->refused_reported = true;
        }
        return;
    }
    if (u->stop || !ms_scanner_set_group(u->scanner, c, &gerr)) {
        ms_broker_client_free(c);
        return;
    }
    /*
     * The old connection is closed: the broker keeps its references
     * until this process exits, as pages may still map their slots
     */
    ms_broker_client_free(u->client);
    u->client = ms->broker_client = c;
    ms_broker_client_set_interrupt(c, mem_share_user_interrupt, u);
    u->lost_reported = false;
    u->refused_reported = false;
    trace_mem_share_user_rejoin(id, true);
    info_report("mem-share '%s': joined group '%s' again at %s", id,
                ms->group, ms->broker);
}

/* Sleep timeout_ms or until woken, without the lock */
static void mem_share_user_sleep(MemShareUser *u, int timeout_ms)
{
    qemu_mutex_unlock(&u->lock);
    qemu_sem_timedwait(&u->wakeup, timeout_ms);
    /* Many posts are one wake-up: do not let them cut later sleeps short */
    while (qemu_sem_timedwait(&u->wakeup, 0) == 0) {
        continue;
    }
    qemu_mutex_lock(&u->lock);
}

static void mem_share_user_step(MemShareBackend *ms, MemShareUser *u)
{
    MsScanStats st;
    g_autoptr(GError) gerr = NULL;
    int64_t wall = get_clock(), cpu = thread_cpu_ns(), delay;
    uint64_t log_cpu;
    size_t scanned = 0, visits;
    bool pass_done;

    if (qatomic_xchg(&u->scan_now_asked, false)) {
        u->scan_now_pages = MEMORY_BACKEND(ms)->size /
                            qemu_real_host_page_size();
        ms_scanner_sweep(u->scanner);
    }
    if (!ms_scanner_step(u->scanner, MEM_SHARE_BATCH, &scanned, &gerr)) {
        if (!u->error_reported) {
            error_report("mem-share '%s': scanning failed: %s; retrying",
                         object_get_canonical_path_component(OBJECT(ms)),
                         gerr->message);
            u->error_reported = true;
        }
        mem_share_user_sleep(u, 1000);
        return;
    }
    /* The log's syncs since the last step count against max-cpu too */
    log_cpu = mem_share_dirty_cpu_ns(u->dirty);
    cpu = thread_cpu_ns() - cpu + (log_cpu - qatomic_read(&u->log_cpu_ns));
    qatomic_set(&u->log_cpu_ns, log_cpu);
    wall = get_clock() - wall;
    qatomic_set(&u->cpu_ns, qatomic_read(&u->cpu_ns) + cpu);

    /* What the step did, for the pace and for the operator */
    ms_scanner_get_stats(u->scanner, &st);
    visits = st.pages_scanned - u->visits;
    u->visits = st.pages_scanned;
    pass_done = st.full_scans != u->pass_full_scans;
    trace_mem_share_user_step(object_get_canonical_path_component(OBJECT(ms)),
                              scanned, visits, wall, cpu);
    mem_share_update_backoff(ms, u, &st);
    mem_share_trace_dma(ms, u, &st);
    mem_share_report_budget(ms, u, &st);
    mem_share_check_group(ms, u, &st);
    if (u->scan_now_pages) {
        u->scan_now_pages -= MIN(u->scan_now_pages, scanned);
        u->pass_start = get_clock();
        return;
    }
    delay = mem_share_delay_ns(ms, visits, wall, cpu);
    if (u->dirty && pass_done) {
        int64_t period = (int64_t)mem_share_pass_period_ms(u) * SCALE_MS;

        delay = MAX(delay, u->pass_start + period - get_clock());
    }
    if (delay >= SCALE_MS) {
        mem_share_user_sleep(u, delay / SCALE_MS);
    }
    if (pass_done) {
        u->pass_start = get_clock();
    }
}

static void *mem_share_user_thread(void *opaque)
{
    MemShareBackend *ms = opaque;
    MemShareUser *u = ms->user;

    qemu_mutex_lock(&u->lock);
    while (!u->stop) {
        mem_share_user_step(ms, u);
        /*
         * A step that does not sleep keeps the lock: let the BQL holders
         * waiting for it (discards, a stop) have it first.
         */
        while (qatomic_read(&u->waiters)) {
            qemu_cond_wait(&u->waiters_done, &u->lock);
        }
    }
    qemu_mutex_unlock(&u->lock);
    return NULL;
}

/* Take the scanner's lock from outside the scanner thread */
static void mem_share_user_lock(MemShareUser *u)
{
    qatomic_inc(&u->waiters);
    qemu_mutex_lock(&u->lock);
}

static void mem_share_user_unlock(MemShareUser *u)
{
    if (qatomic_fetch_dec(&u->waiters) == 1) {
        qemu_cond_broadcast(&u->waiters_done);
    }
    qemu_mutex_unlock(&u->lock);
}

static unsigned mem_share_region_flags(HostMemoryBackend *backend);

/*
 * A discard while no scanner runs.  Where an earlier mode=user left
 * mappings of a store in the RAM (unmerged pages are private copies
 * inside them), MADV_DONTNEED would bring back the store file's content
 * at that offset: a freed slot of our own store reads zeros, but a
 * group's slot holds whatever the broker put there since.  Such RAM gets
 * fresh anonymous memory instead, with QEMU's advice again.
 */
static int mem_share_discard_plain(MemShareBackend *ms, void *host,
                                   size_t length)
{
    unsigned flags = mem_share_region_flags(MEMORY_BACKEND(ms));
    g_autoptr(GError) gerr = NULL;

    if (!ms->discard_remap) {
        return qemu_madvise(host, length, QEMU_MADV_DONTNEED) ? -errno : 0;
    }
    if (qatomic_read(&ms->mode) == MEM_SHARE_MODE_KERNEL) {
        flags |= MS_REGION_MERGEABLE;
    }
    if (!ms_map_fresh_anon(host, length, flags, &gerr)) {
        error_report("mem-share '%s': %s",
                     object_get_canonical_path_component(OBJECT(ms)),
                     gerr->message);
        return -(gerr->code ?: EIO);
    }
    return 0;
}

/*
 * ram_block_discard_range() on our RAM, with the BQL held.  The scanner
 * thread may be in a batch: wait for its end, which needs no BQL.  Once
 * the scanner stopped (still installed if it left store mappings, see
 * mem_share_discard_plain()), an ordinary discard.
 */
static int mem_share_user_discard(RAMBlock *rb, void *host, size_t length,
                                  void *opaque)
{
    MemShareBackend *ms = opaque;
    const char *id = object_get_canonical_path_component(OBJECT(ms));
    g_autoptr(GError) gerr = NULL;
    QEMU_LOCK_GUARD(&mem_share_discard_lock);
    MemShareUser *u = ms->user;
    int ret = 0;

    if (!u) {
        /* Stopped, or since the caller found this handler */
        ret = mem_share_discard_plain(ms, host, length);
        trace_mem_share_user_discard(id, host, length, ret);
        return ret;
    }
    mem_share_user_lock(u);
    if (!ms_scanner_discard(u->scanner, host,
                            length / qemu_real_host_page_size(), &gerr)) {
        ret = -(gerr->code ?: EIO);
    }
    mem_share_user_unlock(u);
    trace_mem_share_user_discard(id, host, length, ret);
    if (ret) {
        error_report("mem-share '%s': cannot discard 0x%zx bytes of guest"
                     " RAM at %p: %s", id, length, host, gerr->message);
    }
    return ret;
}

/* The advice QEMU gave the RAM, which every new mapping must get again */
static unsigned mem_share_region_flags(HostMemoryBackend *backend)
{
    unsigned flags = MS_REGION_HUGEPAGE;

    if (!qtest_enabled()) {
        flags |= MS_REGION_DONTFORK;
    }
    if (!backend->dump || !machine_dump_guest_core(current_machine)) {
        flags |= MS_REGION_DONTDUMP;
    }
    if (!backend->reserve) {
        flags |= MS_REGION_NORESERVE;
    }
    return flags;
}

bool mem_share_user_start(MemShareBackend *ms, Error **errp)
{
    HostMemoryBackend *backend = MEMORY_BACKEND(ms);
    const char *id = object_get_canonical_path_component(OBJECT(ms));
    g_autoptr(GError) gerr = NULL;
    g_autofree char *full_name = g_strdup_printf("mem-share-%s", id);
    g_autofree char *name = NULL;
    MsScanConfig cfg;
    MemShareUser *u;

    assert(!ms->user);
    if (!mem_share_migration_check_user(ms, errp)) {
        return false;
    }
    ms_scan_config_init(&cfg);
    cfg.host = memory_region_get_ram_ptr(&backend->mr);
    cfg.page_size = qemu_real_host_page_size();
    cfg.npages = backend->size / cfg.page_size;
    cfg.region_flags = mem_share_region_flags(backend);
    cfg.stable_scans = ms->stable_scans;
    cfg.budget_share = ms->map_budget / 100.0;
    cfg.dma_pins = ms->dma_pins;

    u = g_new0(MemShareUser, 1);
    if (ms->group && ms->broker_client &&
        !ms_broker_client_alive(ms->broker_client)) {
        /* Broken while stopped: what it held stays until we exit */
        ms_broker_client_free(ms->broker_client);
        ms->broker_client = NULL;
    }
    if (ms->group && !ms->broker_client) {
        ms->broker_client = mem_share_join(ms, 0, &gerr);
        if (!ms->broker_client) {
            bool refused = g_error_matches(gerr, MS_ENGINE_ERROR, EPERM);

            error_setg(errp, "mode=user: cannot join group '%s' at broker %s:"
                       " %s%s%s%s", ms->group, ms->broker, gerr->message,
                       refused ? " (" : "",
                       refused ? MEM_SHARE_BROKER_UID_HINT : "",
                       refused ? ")" : "");
            g_free(u);
            return false;
        }
    }
    u->client = cfg.group = ms->broker_client;
    u->scanner = ms_scanner_new(&cfg, &gerr);
    if (!u->scanner) {
        error_setg(errp, "mode=user: %s", gerr->message);
        g_free(u);
        return false;
    }
    if (ram_block_discard_require(true)) {
        error_setg(errp, "mode=user cannot run while a device pins guest RAM"
                   " (VFIO, vhost-vdpa, the userspace NVMe driver): merging"
                   " remaps guest pages behind the device's back; remove the"
                   " device or use mode=kernel");
        ms_scanner_free(u->scanner);
        g_free(u);
        return false;
    }
    qemu_mutex_init(&u->lock);
    qemu_sem_init(&u->wakeup, 0);
    qemu_cond_init(&u->waiters_done);
    if (u->client) {
        ms_broker_client_set_interrupt(u->client, mem_share_user_interrupt, u);
    }
    ms_scanner_set_yield(u->scanner, mem_share_user_interrupt, u);
    if (ms->dirty_tracking == MEM_SHARE_DIRTY_TRACKING_KVM) {
        u->dirty = mem_share_dirty_start(ms);
        ms_scanner_set_dirty_log(u->scanner, mem_share_dirty_take, u->dirty);
    }
    /* Whole before anyone can see it */
    ms->user = u;
    qemu_ram_set_discard_handler(backend->mr.ram_block,
                                 mem_share_user_discard, ms);

    /* Thread names are 15 characters at most */
    name = g_strndup(full_name, 15);
    qemu_thread_create(&u->thread, name, mem_share_user_thread, ms,
                       QEMU_THREAD_JOINABLE);
    trace_mem_share_user_start(id, cfg.npages, cfg.region_flags);
    return true;
}

bool mem_share_user_stop(MemShareBackend *ms, bool unmerge, Error **errp)
{
    MsScanStats st;
    MemShareUser *u = ms->user;
    g_autoptr(GError) gerr = NULL;
    bool ok;

    if (!u) {
        return true;
    }
    mem_share_user_lock(u);
    u->stop = true;
    qemu_sem_post(&u->wakeup);
    mem_share_user_unlock(u);
    qemu_thread_join(&u->thread);

    /* Discards may still come, without the BQL: they take the lock */
    mem_share_user_lock(u);
    ok = !unmerge || ms_scanner_unmerge_all(u->scanner, &gerr);
    mem_share_user_unlock(u);
    if (!ok) {
        /* Keep the scanner: its pages still map the store */
        error_setg(errp, "cannot unmerge the guest RAM: %s", gerr->message);
        u->stop = false;
        qemu_thread_create(&u->thread, "mem-share", mem_share_user_thread,
                           ms, QEMU_THREAD_JOINABLE);
        return false;
    }
    trace_mem_share_user_stop(object_get_canonical_path_component(OBJECT(ms)),
                              unmerge);
    ms_scanner_get_stats(u->scanner, &st);
    /* The RAM keeps its store mappings, with private copies in them */
    if (st.merges || st.group_hits || st.group_uploads ||
        (st.zero_slots && st.zero_merges)) {
        ms->discard_remap = true;
    }
    qemu_ram_set_discard_handler(MEMORY_BACKEND(ms)->mr.ram_block,
                                 unmerge && ms->discard_remap ?
                                 mem_share_user_discard : NULL, ms);
    /* A discard that found the handler before it was cleared is done */
    WITH_QEMU_LOCK_GUARD(&mem_share_discard_lock) {
        ms->user = NULL;
    }
    ms_scanner_free(u->scanner);
    mem_share_dirty_stop(u->dirty);
    /*
     * The connection stays for the next run (its releases, sent without
     * waiting, go as the broker reads them).  Without unmerging, the RAM
     * is about to go: the references go when the connection is closed
     * and this process exits.
     */
    if (u->client) {
        ms_broker_client_set_interrupt(u->client, NULL, NULL);
    }
    ram_block_discard_require(false);
    qemu_cond_destroy(&u->waiters_done);
    qemu_sem_destroy(&u->wakeup);
    qemu_mutex_destroy(&u->lock);
    g_free(u);
    return true;
}

/* The RAM goes away: no discard may call us any more */
void mem_share_user_finalize(MemShareBackend *ms)
{
    HostMemoryBackend *backend = MEMORY_BACKEND(ms);

    mem_share_user_stop(ms, false, &error_abort);
    ms_broker_client_free(ms->broker_client);
    ms->broker_client = NULL;
    if (ms->discard_remap && host_memory_backend_mr_inited(backend)) {
        qemu_ram_set_discard_handler(backend->mr.ram_block, NULL, NULL);
        /* A discard that found the handler before it was cleared is done */
        WITH_QEMU_LOCK_GUARD(&mem_share_discard_lock) {
            ms->discard_remap = false;
        }
    }
}

void mem_share_user_scan_now(MemShareBackend *ms)
{
    MemShareUser *u = ms->user;

    /*
     * The thread takes the request before its next step: the monitor
     * never waits for a step in progress, however slow (a busy host, a
     * broker that does not answer).
     */
    qatomic_set(&u->scan_now_asked, true);
    qemu_sem_post(&u->wakeup);
}

/* Wake the thread so that a new scan-rate or max-cpu applies now */
void mem_share_user_kick(MemShareBackend *ms)
{
    if (ms->user) {
        qemu_sem_post(&ms->user->wakeup);
    }
}

void mem_share_user_fill_info(MemShareBackend *ms, MemShareInfo *info)
{
    MemShareUser *u = ms->user;
    MemShareUserInfo *ui = g_new0(MemShareUserInfo, 1);
    MsScanStats st;

    ms_scanner_get_stats(u->scanner, &st);
    info->pages_scanned = st.pages_scanned;
    info->full_scans = st.full_scans;
    info->pages_merged = st.pages_merged + st.zero_holes + st.group_pages;
    info->pages_zero = st.zero_holes;
    info->cow_breaks = st.cow_breaks;
    info->scan_cpu_ns = qatomic_read(&u->cpu_ns);
    /* With the log's syncs since the last step (their CPU is ours) */
    info->scan_cpu_ns += mem_share_dirty_cpu_ns(u->dirty) -
                         qatomic_read(&u->log_cpu_ns);

    ui->store_pages = st.slots_used;
    ui->pages_shared = st.pages_merged;
    ui->pages_volatile = st.pages_volatile;
    ui->dirty_tracking = ms->dirty_tracking;
    ui->pages_dirty = st.pages_dirty;
    ui->hash_skips = st.hash_skips;
    ui->candidates = st.candidates;
    ui->merges_wasted = st.merges_wasted;
    ui->churn_skips = st.churn_skips;
    ui->merges = st.merges;
    ui->zero_merges = st.zero_merges;
    ui->zero_slots = st.zero_slots;
    ui->zero_slots_held = st.zero_held;
    ui->remerges = st.remerges;
    ui->merges_upkeep = st.merges_upkeep;
    ui->huge_fills = st.huge_fills;
    ui->extra_scans = st.extra_scans;
    ui->mappings = MAX(st.vmas, 0);
    ui->mapping_budget = MAX(st.vma_budget, 0);
    ui->refused_budget = st.refused_budget;
    ui->refused_changed = st.refused_changed;
    ui->refused_store_full = st.refused_store_full;
    ui->refused_nomem = st.refused_nomem;
    ui->refused_dma = st.refused_dma;
    ui->dma_mapped_pages = mem_share_dma_pages_mapped(ms);
    ui->bytes_saved = st.bytes_saved;
    if (ms->group) {
        MemShareGroupInfo *gi = g_new0(MemShareGroupInfo, 1);

        gi->group = g_strdup(ms->group);
        gi->broker = g_strdup(ms->broker);
        gi->broker_uid = ms->broker_uid;
        gi->connected = !st.group_lost;
        gi->pages = st.group_pages;
        gi->lookups = st.group_lookups;
        gi->retries_skipped = st.group_retries_skipped;
        gi->answers = st.group_answers;
        gi->hits = st.group_hits;
        gi->uploads = st.group_uploads;
        gi->rejoins = st.group_rejoins;
        gi->waits = st.group_waits;
        gi->stalled = st.group_stalled;
        ui->group = gi;
    }
    info->user = ui;
}
