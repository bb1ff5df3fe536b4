/*
 * mem-share engine: the scanner of mode=user
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The scanner decides what to merge; merge.c does the merging safely
 * and store.c keeps the shared copies.  Like Linux's mm/ksm.c it passes
 * over its region again and again, and keeps two structures:
 *
 *  - the stable tree: the store's index (store.c).  Published slots are
 *    immutable, so a hash found there, confirmed byte for byte, names a
 *    page the candidate can map at once.
 *  - the unstable tree: a hash table (hash -> guest page) of the pages
 *    found stable that matched nothing yet.  Its entries are guest pages
 *    that may change at any moment, so a hit is checked by comparing the
 *    two guest pages before a slot is allocated.  Unlike KSM's, it is
 *    not rebuilt every pass: a page leaves it when it is written (the
 *    log says so, or its hash changed) or merged, by deletion with
 *    backward shift, so it holds exactly the pages waiting in it.
 *
 * Dirty log.  ksmd must read every page at every pass to learn what
 * changed; QEMU knows which pages were written (mem-share-dirty.c), and
 * with that log (cfg.dirty_take) a pass costs what the guest wrote, not
 * what it owns.  Per page the scanner knows the pass that last saw it
 * written (or merged it), so a page's age in passes says whether it
 * proved stable; no visit is needed to count.  A pass takes a chunk's
 * dirty bits, ORs them with the chunk's "todo" bits (pages still
 * proving stable, or due for a group lookup) and, a 64-page word at a
 * time, passes over everything else: no pagemap read, no hash, no table
 * lookup.  A written page is not read either: it is marked (age 0) and
 * read once, when its age reaches its wait; then it is a candidate.
 * A sweep visits and hashes pages whatever the log says, as every
 * pass did before the log: a write the log missed (a kernel vhost
 * backend writes behind it) shows as a changed hash, merged pages it
 * broke as private ones.  Each pass sweeps one chunk in
 * MS_SCAN_SWEEP_EVERY (chunk_swept()), so every page is read once a
 * round at an even cost; the pass after ms_scanner_sweep(), and every
 * pass without a log, sweeps them all.  Correctness never depends on
 * the log: every merge compares the frozen page.
 *
 * Per guest page the scanner keeps 16 bytes (KSM's rmap_item is 64):
 * the hash seen at the last read, the pass it was last written or
 * merged (16 bits, ages saturate at AGE_MAX), the store slot the page
 * maps (the scanner holds one store reference per such page), flags,
 * two small counters (group misses, churn) and whether the page held
 * memory of its own when last seen ("Huge pages").  A visit of a page:
 *
 *   1. Pages the scanner merged are asked ms_merge_test_shared() (once
 *      per chunk, from the pagemap entries of step 2: one read serves
 *      both): one a write made private gives its reference back (a
 *      cow-break) and is an ordinary page again; one still shared
 *      costs nothing more, it is not even read.  Pagemap bit 61 alone
 *      must not decide this: a merged page not touched since has no
 *      page table entry at all.
 *   2. /proc/self/pagemap says which pages hold private memory (present
 *      and exclusively mapped, not a file page).  Holes, the shared
 *      zero page and swapped-out pages have nothing to give and are not
 *      read (reading a swapped page would swap it in).  That is also
 *      how a zero hole the scanner made is known to still be one.
 *   3. A page the log says was written restarts its age (and leaves the
 *      unstable tree).  In a sweep, or without a log, hash the page with
 *      the store's keyed hash: a changed hash is a write too.  A page is
 *      a candidate once its age reaches its wait (stable_scans, plus its
 *      churn wait); with a log it is hashed then, once.
 *   4. A candidate whose hash is that of zeros, and that reads as
 *      zeros, becomes a hole (ms_merge_zero): no slot and no VMA; or,
 *      where a read of a hole would fill it with a page again, it maps
 *      a zero slot (see below).  Only the hash decides whether to read:
 *      a group retry revisits a page the log says is unchanged, and a
 *      zero test of every such page cost half of a busy group's scan.
 *      Else the stable tree: a published slot with the same bytes.
 *      Else the unstable tree: an earlier page of this
 *      pass with the same hash and, compared now, the same bytes: a
 *      fresh slot gets the content and both pages are merged onto it.
 *      Else the page enters the unstable tree.
 *
 * Churn.  A merge that a write breaks soon is wasted twice: the merge
 * and the copy-on-write fault (with their TLB shootdowns, most of what
 * either costs), and the page comes back to be merged again.  KSM is
 * shielded by its slowness; a fast scanner is not.  So each page learns
 * it (broken()): a merge broken before it lasted as long as the wait
 * that led to it doubles the page's own wait (1 << churn passes more,
 * up to 1 << MAX_CHURN), and one that lasted twice its wait halves it.
 * Pages rewritten every fraction of a second stop being merged (visits
 * that hold them back count as churn_skips), pages stable for minutes
 * always are.  A zero hole a write filled is a break like a store
 * page's: a filling guest mostly writes zero pages.  A merged page a
 * write copied is written, even if the bytes stayed the same (a guest
 * rewriting zeros): a write, not only a new hash, makes a page volatile.
 * Merging such a page again keeps a saving up, it finds no new one
 * (merges_upkeep: a page whose last merge a write broke within
 * UPKEEP_LIVED passes, or within twice its wait): the pace of passes
 * (mem-share-user.c) does not count those merges as progress, or
 * pages rewritten every few seconds that the guests of a group write
 * alike would keep the passes that merge them at the fastest pace.
 * Without a log, breaks cannot be told from reads' refills page by
 * page soon enough, and the region as a whole adapts as well: when a
 * pass sees copy-on-write breaks of a quarter or more of the pages the
 * pass before merged, it asks one more unchanged scan of every
 * candidate (up to MAX_EXTRA_SCANS more); when breaks fall under a
 * sixteenth, it asks one less.
 *
 * Groups.  With a broker client (cfg.group) the region also shares with
 * the other members of its group: a candidate that neither the local
 * store nor a zero check claims is looked up in the group (one LOOKUP per
 * chunk) before it enters the unstable tree.  A slot the group returns
 * comes with a reference the page keeps while it maps the slot; its
 * bytes are compared through a read-only view of the group's store, then
 * it is merged like a found slot (the group's slots are numbered after
 * the local store's: merge.c maps them from the second store).  WANTED
 * means another member has the same page once: the page is uploaded and
 * merged onto the slot the broker returns (the WANTED pages of a lookup
 * go in one UPLOAD: a round trip each cost the two sides more than the
 * copies).  Misses go on to the local
 * unstable tree, so duplicates inside the region stay local.  A page
 * goes to the group one stable scan later than a local merge would
 * take it: what members share is mostly what their guests did alike at
 * boot (kernel data, freshly zeroed slabs), which they soon write, and
 * a group merge costs an upload and a release where a local one costs
 * neither (in the bench's group, 40% fewer copy-on-write breaks).  A page
 * the group missed is asked again less and less often while its hash
 * stays the same (like KSM's smart_scan): at every second scan after one
 * miss, every fourth after two, at most every 1 << GROUP_BACKOFF scans.
 * Most misses are pages that no other member has, and each costs the
 * broker a round trip.  With a log, where pages are not visited once
 * they settled, a miss is asked again when the page is 2, 4, 8, ...
 * passes older than its wait, GROUP_RETRIES times (members that wrote
 * the same page within a couple of minutes meet without waiting for a
 * sweep), then only at its chunk's turn in the rolling sweep, where a
 * page with a miss is asked again only if there is news (below) since
 * the chunk's last turn, and then whatever its backoff: a member that
 * writes the page hours later is met within a round.  Between retries
 * the page is not visited at all: a wheel of
 * per-pass lists (retry_in()) puts it back among the pages to visit in
 * the pass its retry is due.  Our miss waits in the broker's table of
 * misses until a meeting or a new slot with its hash answers it, or the
 * broker empties the table.  At the start of each pass one ANSWERED
 * round trip (take_answers()) says which of our misses were answered
 * since the last: the pages waiting under those hashes in our unstable
 * table (keyed by the group's hash, see gkey_same) are asked at once,
 * whatever their backoff.  Other retries can only pay after news that
 * no answer carries: the broker lost answers to us, or our own publish
 * or loss of an unstable entry (local_news), and for the sweep's turns
 * only, the broker's emptying of its table (unstable_resets: see
 * news()); not the other members' meetings, which in a group of
 * eight happen nearly every pass (counting those skipped almost no
 * retry there, docs/bench.md), and not even our own answers, which
 * there come nearly every pass too, each for a few pages (counting
 * those skipped none).  If nothing moved since the earliest lookup of
 * the pages due in the pass, every page that still waits counts as
 * missed again without a visit or a lookup (retries_due()), on the same
 * schedule.  From a broker without ANSWERED, or one whose hash key is
 * not our store's, news is any answer of ours (met, read with STATS
 * when retries are due).  A page put back on the wheel without a lookup
 * counts as asked before any news.  What a group costs follows what is
 * new for its members, not their RAM.  A meeting is
 * not lost:
 * the first member's miss waits in the broker's unstable table, the
 * second member uploads at once, and the first finds the slot at its
 * next lookup, at most 1 << GROUP_BACKOFF scans later.  Writes
 * that break a group page release its reference (one RELEASE per chunk,
 * sent without waiting for its reply).  A broker that is slow to answer
 * is not gone: a call that gives up waiting leaves its request pending
 * (broker-client.c), the chunk goes on without the group, and every
 * reference a reply handed out is used or released, never forgotten.
 * When the connection breaks the group stops being used; pages that map
 * its store keep it alive and stay merged until written, and their
 * references stay with the broker until this process exits.  A member's
 * store hashes with the group's key (taken before anything is
 * published), so the one hash of a visit is also the one LOOKUP and
 * UPLOAD need: hashing is a fifth of what the scanner costs.  The key
 * stays secret from guests either way; the members share it already.
 * After joining a broker with another key, pages are hashed a second
 * time for the group.
 *
 * Merges go in batches: consecutive candidates that map consecutive
 * slots are one run (one freeze, one mmap, one VMA), and the runs of a
 * chunk that map zero or found slots are one ms_merge_runs() (one
 * pagemap read and one wake for all: syscalls are most of what a merge
 * costs); a
 * pair run (pages i.. matching pages j..) gets a run of contiguous slots
 * right after the slot the page before i maps, so that duplicated
 * regions end up as one VMA on each side.  Every merge compares bytes
 * under the freeze, so a page that changed since it was hashed only
 * makes its merge fail (CHANGED); the pages of a failed run that did not
 * change are retried once as smaller runs.
 *
 * References: a batch holds one reference on each slot it will map (the
 * allocation's, or one taken when the slot was found) so that nothing
 * can free a slot between decision and merge; each page merged takes its
 * own; the batch's are dropped at the end, which frees a new slot that
 * no page ended up mapping.
 *
 * Limits: when the merger refuses a merge for its VMA budget, the
 * scanner stops creating slots for the rest of the pass (their pages
 * could only become more scattered mappings) unless mappings were given
 * back meanwhile; merges onto existing slots are still tried (the
 * refusal is cheap and extending a run may still fit), and zero holes
 * of anonymous pages, which add no VMA, go on: store merges are run
 * against a budget two VMAs lower, because freezing part of a VMA splits
 * it for a moment and a zero hole needs that headroom.  A full store
 * gives a pair run the longest run of slots it has, halving down to one,
 * then refuses.  With a log, refused pages are not visited again until
 * the next sweep, and a changed vm.max_map_count (the operator's answer
 * to a spent budget) makes the next pass one.  Pages mapped for DMA
 * (cfg.dma_pins) are refused by the
 * merger once frozen (see "DMA" in merge.c) and, like changed pages,
 * must prove stable again.  Refusals are counted by reason, per page and
 * attempt.
 *
 * Memory: 16 bytes per guest page, a bit per page of todo map, plus the
 * unstable table: an open addressing array of page numbers (4 bytes an
 * entry, the key is the page's own hash in its PageState, which is
 * why a page leaves the table before its hash changes), at most half
 * full, doubled when it gets there up to two entries per guest page.
 * Transient buffers stay small too:
 * glibc raises its mmap threshold to the largest block freed, and a
 * multi-megabyte buffer freed once leaves malloc holding that much for
 * good, memory the guest's savings pay for.
 *
 * Zero pages.  Most kernels map the shared zero page when a hole is
 * read, so a hole is the best zero merge: no memory, no VMA.  Some do
 * not (a 6.18 host of ours allocated a page on every read fault): there a
 * zero hole the guest reads holds memory again and the next pass makes
 * it a hole again, forever, which costs CPU and leaves memory unsaved
 * between passes.  Kernel KSM merges zero pages onto a KSM page of
 * zeros, which reads do not break.  The equivalent here is a zero slot:
 * the store ends with MS_SCAN_ZERO_SLOTS slots that are never written,
 * and zero page i maps zero slot (i modulo their number), so that a run
 * of zero pages maps a run of slots, one VMA per run.  Reads fill at
 * most one page per zero slot, shared by every page that maps it.
 * ms_scanner_new() probes the kernel (ms_read_fault_maps_zero_page())
 * and picks one way for the scanner's life.
 *
 * Huge pages.  A write to a hole faults in a whole transparent huge page
 * when its range had no page table yet (memory the guest never touched,
 * or a range a balloon emptied; our own holes never come back whole:
 * merge.c, discard_anon()).  The kernel fills the rest of the range with
 * zeros, and the log sees one page written: those zero pages would wait
 * for the rolling sweep, an hour at a quiet pace, where KSM merges them
 * within a pass (19 MiB of 8 fleet guests' memory was such pages).  So
 * the first write to a page that held no memory of its own when last
 * seen (PageState.mem clear: a hole, or never visited) reads the
 * pagemap entry of one other such page of its range (filled_around()).
 * If the kernel filled that one, every such page of the range counts as
 * written: each proves stable and is visited, and merged as a zero page
 * if it still is one.  One pagemap entry a page, once: mem stays set
 * until a visit finds the page a hole again.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE     /* QEMU defines it on its command line */
#endif
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mem-share/hash.h"
#include "mem-share/scan.h"
#include "mem-share/ksm.h"

/* Pages per chunk: one pagemap read, one sharing test, batches inside */
#define CHUNK MS_SCAN_CHUNK

/* Churn: at most this many scans more than stable_scans */
#define MAX_EXTRA_SCANS 8
/* Churn: a page's wasted merges double its wait up to 1 << this passes */
#define MAX_CHURN 7     /* PageState.churn has 3 bits */
/* A page's age (passes) saturates here, far from PageState.since's wrap */
#define AGE_MAX 0x4000
/* A merge a write broke within this many passes was upkeep, not progress */
#define UPKEEP_LIVED 64
/* Fewer breaks in a pass than this are noise, never churn */
#define CHURN_MIN_BREAKS 64

/* /proc/self/pagemap (Documentation/admin-guide/mm/pagemap.rst) */
#define PM_PRESENT      (1ULL << 63)
#define PM_FILE         (1ULL << 61)
#define PM_EXCLUSIVE    (1ULL << 56)

enum {
    PG_KNOWN = 1 << 0,      /* hash holds the hash of an earlier visit */
    PG_ZERO = 1 << 1,       /* zero merged: a hole still, or a zero slot */
    PG_VOLATILE = 1 << 2,   /* the hash changed at the last visit */
    PG_WAS_MERGED = 1 << 3, /* merged before: the next merge is a re-merge */
    PG_PENDING = 1 << 4,    /* in a batch not merged yet */
    PG_UNSTABLE = 1 << 5,   /* in the unstable table, under hash */
    PG_ANSWERED = 1 << 6,   /* the group answered its miss: ask it now */
    PG_BROKEN_SOON = 1 << 7,/* a write broke its last merge soon: upkeep */
};

typedef struct PageState {
    uint64_t hash;          /* of the content, if PG_KNOWN */
    uint32_t slot;          /* slot it maps and holds a reference on */
    uint16_t since;         /* pass it was last written, or merged */
    uint8_t flags;
    uint8_t gmiss:4;      /* group lookups of this hash that missed */
    uint8_t churn:3;      /* its wasted merges, lately: see "Churn" */
    uint8_t mem:1;        /* held memory of its own: see "Huge pages" */
} PageState;

/* The unstable table starts with this many entries */
#define UNSTABLE_MIN 4096

/* A page the group keeps missing is looked up every 1 << this scans */
#define GROUP_BACKOFF 3
/* With a dirty log: a miss is asked again this many times between sweeps */
#define GROUP_RETRIES 8
/* Passes the retry wheel looks ahead: more than the longest retry delay */
#define RETRY_WHEEL 512

/* Pages [first, first + n) to merge onto slots [slot, slot + n) */
typedef struct Batch {
    size_t first;
    size_t n;
    uint32_t slot;          /* found batch: first slot; zero: or NONE */
    size_t partner;         /* pair batch: first page of the other side */
    bool found;             /* queued: holds a reference on each slot */
    bool group;             /* queued: a group slot, its page's reference */
} Batch;

/* A candidate to look up in the group; @hash is the local one */
typedef struct GroupLook {
    size_t page;
    uint64_t hash;
} GroupLook;

struct MsScanner {
    MsScanConfig cfg;
    uint8_t *base;
    size_t page_size;
    size_t npages;
    MsStore *store;
    MsMerger *m;
    size_t huge_size;       /* of its THPs: see "Huge pages"; 0: none */
    int pagemap_fd;
    PageState *pg;
    size_t cursor;
    uint32_t *unstable;     /* page index + 1, 0 = free */
    size_t unstable_mask;   /* its entries - 1 (a power of two) */
    size_t unstable_used;
    size_t unstable_max;    /* it grows up to this many entries */
    Batch zero, found, pair;
    Batch queue[CHUNK];     /* zero and found batches to merge at once */
    size_t queued;
    /* Group sharing (see "Groups") */
    MsBrokerClient *group;
    uint32_t gfirst;        /* first number any group store had */
    uint32_t gbase;         /* number of the current group store's slot 0 */
    uint32_t gslots;
    int gfd;                /* our own descriptor of the group's store */
    uint8_t *gview;         /* read-only view of it */
    bool gkey_same;         /* our store hashes with the group's key */
    uint64_t zero_hash;     /* the hash of a page of zeros, in our key */
    GArray *glook;          /* GroupLook: this chunk's pages to look up */
    GArray *grel;           /* uint32_t: group slots to give back */
    bool in_group_flush;
    bool zero_slots;        /* zero pages map zero slots, not holes */
    int64_t blocked_vmas;   /* no new slots while vmas >= this; -1: none */
    int64_t map_limit;      /* vm.max_map_count the budget was made of */
    unsigned extra_scans;   /* asked on top of stable_scans, for churn */
    uint64_t pass_merges;   /* merges in this pass */
    uint64_t last_merges;   /* merges in the previous pass */
    uint64_t pass_breaks;   /* copy-on-write breaks seen in this pass */
    uint64_t pm[CHUNK];     /* pagemap of the chunk's pages from pm_first */
    size_t pm_first;
    uint64_t dirty[CHUNK / 64];  /* this chunk's pages the log saw written */
    uint64_t *todo;         /* pages to visit at the next pass, clean or not */
    /* uint32_t page indexes to visit at pass p, in [p % RETRY_WHEEL] */
    GArray *retry[RETRY_WHEEL];
    /* news() before the earliest lookup of the pages in retry[w] */
    uint64_t retry_news[RETRY_WHEEL];
    uint64_t local_news;    /* our own events that can make a retry pay */
    uint64_t group_news;    /* the broker's, as last read (quiet_since()) */
    uint64_t group_resets;  /* its unstable resets, as last read */
    bool answers_probed;    /* whether the broker has ANSWERED is known */
    bool answers;           /* it tells us our misses it answered */
    bool sweep;             /* this chunk: visit and hash every page */
    bool sweep_pass;        /* this pass sweeps every chunk */
    bool sweep_asked;       /* ms_scanner_sweep(): the next pass sweeps */
    bool sweep_quiet;       /* this chunk's sweep: no news since its last */
    uint64_t *sweep_news;   /* per chunk: news() + 1 at its last turn */
    uint64_t sweeps;        /* whole-pass sweeps completed */
    MsScanYieldFn *yield;   /* ms_scanner_set_yield() */
    void *yield_opaque;
    MsScanStats live;       /* the scanner thread's */
    GMutex lock;            /* protects snap */
    MsScanStats snap;
};

void ms_scan_config_init(MsScanConfig *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->page_size = ms_host_page_size();
    cfg->stable_scans = 1;
    cfg->budget_share = 0.5;
}

static uint8_t *page_at(const MsScanner *s, size_t i)
{
    return s->base + i * s->page_size;
}

/* ---- life cycle ---- */

static bool check_config(const MsScanConfig *cfg, GError **errp)
{
    long sys_page = ms_host_page_size();

    if (!cfg->host || !cfg->npages || cfg->page_size != (size_t)sys_page ||
        (uintptr_t)cfg->host % sys_page || cfg->npages >= MS_SLOT_NONE) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "invalid scanner region %p+%zu pages of %zu bytes",
                    cfg->host, cfg->npages, cfg->page_size);
        return false;
    }
    if (cfg->stable_scans > UINT8_MAX) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "stable-scans %u is above %u", cfg->stable_scans,
                    UINT8_MAX);
        return false;
    }
    return true;
}

static bool setup_merger(MsScanner *s, GError **errp)
{
    MsMergeStore ms = {
        .fd = ms_store_ro_fd(s->store),
        .view = ms_store_view(s->store, 0),
        .nslots = ms_store_max_slots(s->store) +
                  ms_store_zero_slots(s->store),
        .nzero = ms_store_zero_slots(s->store),
        .fd2 = s->gfd,
        .view2 = s->gview,
        .nslots2 = s->gslots,
    };

    s->m = ms_merger_new(errp);
    if (!s->m || !ms_merger_add_region(s->m, s->base, s->npages,
                                       s->cfg.region_flags, &ms, errp) ||
        !ms_merger_set_dma_pins(s->m, s->base, s->cfg.dma_pins, errp)) {
        return false;
    }
    s->huge_size = ms_merger_huge_size(s->m, s->base);
    if (s->cfg.vma_budget > 0) {
        ms_merger_set_budget(s->m, s->cfg.vma_budget);
    } else {
        s->map_limit = ms_max_map_count();
        ms_merger_set_budget(s->m,
                             ms_merger_default_budget(s->cfg.budget_share));
    }
    return true;
}

/* Our own descriptor and view of the group's store */
static bool setup_group(MsScanner *s, GError **errp)
{
    const MsBrokerParams *bp = ms_broker_client_params(s->group);

    if (!bp || !ms_broker_client_alive(s->group)) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "the broker client is not a live member of a group");
        return false;
    }
    if (bp->page_size != s->page_size) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "the group's pages are %u bytes, the region's %zu",
                    bp->page_size, s->page_size);
        return false;
    }
    /* Nothing is published yet: one hash for both stores (see "Groups") */
    s->gkey_same = ms_store_set_key(s->store, &bp->key, NULL);
    s->gbase = ms_store_max_slots(s->store) + ms_store_zero_slots(s->store);
    s->gfirst = s->gbase;
    s->gslots = bp->nslots;
    s->gfd = fcntl(ms_broker_client_store_fd(s->group), F_DUPFD_CLOEXEC, 0);
    if (s->gfd < 0 || s->gslots > MS_SLOT_NONE - s->gbase) {
        g_set_error(errp, MS_ENGINE_ERROR, s->gfd < 0 ? errno : EINVAL,
                    "cannot use the group's store of %u pages", s->gslots);
        return false;
    }
    s->gview = mmap(NULL, (size_t)s->gslots * s->page_size, PROT_READ,
                    MAP_SHARED, s->gfd, 0);
    if (s->gview == MAP_FAILED) {
        s->gview = NULL;
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot map the group's store: %s", g_strerror(errno));
        return false;
    }
    s->glook = g_array_new(false, false, sizeof(GroupLook));
    s->grel = g_array_new(false, false, sizeof(uint32_t));
    return true;
}

/* After setup_group(): the group's key may have replaced ours */
static uint64_t zero_hash(const MsScanner *s)
{
    g_autofree uint8_t *zeros = g_malloc0(s->page_size);

    return ms_store_hash(s->store, zeros);
}

static void publish_stats(MsScanner *s);

/* Chunks of the region, the last one maybe short */
static size_t nchunks(const MsScanner *s)
{
    return (s->npages + CHUNK - 1) / CHUNK;
}

MsScanner *ms_scanner_new(const MsScanConfig *cfg, GError **errp)
{
    g_autoptr(MsScanner) s = NULL;
    uint32_t slots, nzero;

    if (!check_config(cfg, errp)) {
        return NULL;
    }
    s = g_new0(MsScanner, 1);
    g_mutex_init(&s->lock);
    s->cfg = *cfg;
    s->base = cfg->host;
    s->page_size = cfg->page_size;
    s->npages = cfg->npages;
    s->pagemap_fd = -1;
    s->gfd = -1;
    s->group = cfg->group;
    s->blocked_vmas = -1;
    s->pg = g_new0(PageState, s->npages);
    /* A spare word: todo_bits() reads one past the last page's */
    s->todo = g_new0(uint64_t, s->npages / 64 + 2);
    s->sweep_news = g_new0(uint64_t, nchunks(s));
    s->sweep_pass = !cfg->dirty_take;
    for (size_t i = 0; i < s->npages; i++) {
        s->pg[i].slot = MS_SLOT_NONE;
    }
    s->unstable_max = MAX(UNSTABLE_MIN,
                          (size_t)1 << g_bit_storage(s->npages * 2 - 1));
    s->unstable_mask = UNSTABLE_MIN - 1;
    s->unstable = g_new0(uint32_t, UNSTABLE_MIN);
    slots = cfg->store_slots ? cfg->store_slots : (uint32_t)s->npages;
    s->zero_slots = cfg->zero_mode == MS_ZERO_SLOTS ||
                    (cfg->zero_mode == MS_ZERO_AUTO &&
                     !ms_read_fault_maps_zero_page());
    nzero = !s->zero_slots ? 0 :
            cfg->zero_slots ? cfg->zero_slots : MS_SCAN_ZERO_SLOTS;
    s->store = ms_store_new_with_zero(s->page_size, slots, nzero, errp);
    if (!s->store || (s->group && !setup_group(s, errp)) ||
        !setup_merger(s, errp)) {
        return NULL;
    }
    s->zero_hash = zero_hash(s);
    s->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (s->pagemap_fd < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot open /proc/self/pagemap: %s", g_strerror(errno));
        return NULL;
    }
    s->live.pages = s->npages;
    s->live.page_size = s->page_size;
    publish_stats(s);
    return g_steal_pointer(&s);
}

void ms_scanner_free(MsScanner *s)
{
    if (!s) {
        return;
    }
    if (s->pagemap_fd >= 0) {
        close(s->pagemap_fd);
    }
    /* Merged pages keep the memfd alive through their mappings */
    ms_merger_free(s->m);
    ms_store_free(s->store);
    if (s->gview) {
        munmap(s->gview, (size_t)s->gslots * s->page_size);
    }
    if (s->gfd >= 0) {
        close(s->gfd);
    }
    if (s->glook) {
        g_array_free(s->glook, true);
    }
    if (s->grel) {
        g_array_free(s->grel, true);
    }
    for (size_t k = 0; k < RETRY_WHEEL; k++) {
        if (s->retry[k]) {
            g_array_free(s->retry[k], true);
        }
    }
    g_free(s->unstable);
    g_free(s->todo);
    g_free(s->sweep_news);
    g_free(s->pg);
    g_mutex_clear(&s->lock);
    g_free(s);
}

MsStore *ms_scanner_store(MsScanner *s)
{
    return s->store;
}

MsMerger *ms_scanner_merger(MsScanner *s)
{
    return s->m;
}

/* ---- statistics ---- */

static void publish_stats(MsScanner *s)
{
    MsStoreStats st;
    MsScanStats *l = &s->live;
    uint64_t saved;

    ms_store_get_stats(s->store, &st);
    l->slots_used = st.slots_used;
    l->zero_slots = st.zero_slots;
    l->zero_held = st.zero_held;
    l->vmas = s->m ? ms_merger_vmas(s->m) : 0;
    l->group_stalled = s->group && ms_broker_client_alive(s->group) &&
                       ms_broker_client_stalled(s->group);
    l->vma_budget = s->m ? ms_merger_budget(s->m) : 0;
    /* Every used slot has a mapper between steps: merged >= slots */
    saved = l->pages_merged > l->slots_used ?
            l->pages_merged - l->slots_used : 0;
    saved += l->zero_holes + l->group_pages;
    saved -= MIN(saved, l->zero_held);
    l->bytes_saved = saved * s->page_size;
    g_mutex_lock(&s->lock);
    s->snap = *l;
    g_mutex_unlock(&s->lock);
}

void ms_scanner_get_stats(MsScanner *s, MsScanStats *st)
{
    g_mutex_lock(&s->lock);
    *st = s->snap;
    g_mutex_unlock(&s->lock);
}

/* ---- what a page is ---- */

static bool read_pagemap(MsScanner *s, size_t first, size_t n,
                         GError **errp)
{
    return ms_pagemap_read(s->pagemap_fd, page_at(s, first), n, s->page_size,
                           s->pm, errp);
}

/*
 * Does the page hold memory of its own?  Not a hole, not the shared zero
 * page (present but not exclusive), not swapped out (not present), not
 * a store page.
 */
static bool holds_private_memory(uint64_t pm)
{
    return (pm & PM_PRESENT) && (pm & PM_EXCLUSIVE) && !(pm & PM_FILE);
}

/*
 * Page @p no longer maps its slot (a write copied it, or it was made
 * private or discarded): give the reference back and count it out.
 */
/* A slot of a group store, the current one or one the broker lost */
static bool is_group_slot(const MsScanner *s, uint32_t slot)
{
    return s->group && slot != MS_SLOT_NONE && slot >= s->gfirst;
}

/* A slot of the current group store: its reference is the broker's */
static bool is_current_group_slot(const MsScanner *s, uint32_t slot)
{
    return is_group_slot(s, slot) && slot >= s->gbase &&
           slot - s->gbase < s->gslots;
}

static void drop_slot(MsScanner *s, PageState *p)
{
    if (ms_store_is_zero_slot(s->store, p->slot)) {
        p->flags &= ~PG_ZERO;
        s->live.zero_holes--;
    } else if (is_group_slot(s, p->slot)) {
        uint32_t g = p->slot - s->gbase;

        /* A store the broker lost took our references with it */
        if (is_current_group_slot(s, p->slot)) {
            g_array_append_val(s->grel, g);
        }
        s->live.group_pages--;
    } else {
        ms_store_put(s->store, p->slot);
        s->live.pages_merged--;
    }
    p->slot = MS_SLOT_NONE;
}

/* ---- the life of a page ---- */

static bool has_log(const MsScanner *s)
{
    return s->cfg.dirty_take != NULL;
}

static void todo_set(MsScanner *s, size_t i)
{
    s->todo[i / 64] |= 1ULL << (i % 64);
}

static void todo_clear(MsScanner *s, size_t i)
{
    s->todo[i / 64] &= ~(1ULL << (i % 64));
}

/* Passes since page @p was last written or merged */
static unsigned age(const MsScanner *s, const PageState *p)
{
    return (uint16_t)(s->live.full_scans - p->since);
}

/*
 * What can make a miss pay when asked again, as a sum of counters that
 * only grow: the broker's as last read (answers it lost, or any answer
 * of ours where it does not say which) and ours (see "Groups").  For
 * the sweep's turns (@sweep) also the emptyings of the broker's table
 * of misses: every member re-asks all its misses after one, and if the
 * retries of the wheel did so at once, the misses would fill the table
 * again at once, and the members of a large group would keep emptying
 * it for each other, each emptying making them ask everything again.
 */
static uint64_t news(const MsScanner *s, bool sweep)
{
    return s->group_news + s->local_news + (sweep ? s->group_resets : 0);
}

/*
 * Visit page @i again @delay passes from now, not before: the next
 * group lookup of a miss (group_due()).  Keeping the page in the todo
 * map instead would visit it at every pass in between (a pagemap read,
 * a zero test and two table lookups each), tens of thousands of pages
 * a pass for minutes after a guest filled its memory.
 * @asked is news() from before the page's last lookup, or 0 when that is
 * not known (0 is as old as any news): a list keeps its earliest.
 */
static void retry_in(MsScanner *s, size_t i, unsigned delay, uint64_t asked)
{
    size_t w;
    GArray **a;
    uint32_t v = i;

    delay = MIN(MAX(delay, 1u), RETRY_WHEEL - 1);
    w = (s->live.full_scans + delay) % RETRY_WHEEL;
    a = &s->retry[w];
    if (!*a) {
        *a = g_array_new(false, false, sizeof(uint32_t));
    }
    s->retry_news[w] = (*a)->len ? MIN(s->retry_news[w], asked) : asked;
    g_array_append_val(*a, v);
}

/*
 * Passes a page must stay unwritten before it is merged: stable_scans,
 * the region's churn allowance, and its own (see "Churn")
 */
static unsigned churn_wait(const PageState *p)
{
    return p->churn ? 1u << p->churn : 0;
}

static unsigned base_wait(const MsScanner *s)
{
    return s->cfg.stable_scans + s->extra_scans;
}

static unsigned wait_of(const MsScanner *s, const PageState *p)
{
    return base_wait(s) + churn_wait(p);
}

/* The next lookup of a group miss: 1, 2, 4, ... passes after the first */
static void retry_group(MsScanner *s, size_t i, uint64_t asked)
{
    const PageState *p = &s->pg[i];
    int delay = (int)(wait_of(s, p) + (1u << p->gmiss)) - (int)age(s, p);

    retry_in(s, i, MAX(delay, 1), asked);
}

static void set_volatile(MsScanner *s, PageState *p, bool on)
{
    if (on && !(p->flags & PG_VOLATILE)) {
        p->flags |= PG_VOLATILE;
        s->live.pages_volatile++;
    } else if (!on && (p->flags & PG_VOLATILE)) {
        p->flags &= ~PG_VOLATILE;
        s->live.pages_volatile--;
    }
}

static void unstable_remove(MsScanner *s, size_t i);
static uint32_t *unstable_find(MsScanner *s, uint64_t h);

/*
 * Page @i was written (a new hash, the log, a copy-on-write break):
 * it must prove stable again, from now.  With a log, its hash is stale
 * until the visit that finds it stable reads it again.
 */
static void mark_written(MsScanner *s, size_t i)
{
    PageState *p = &s->pg[i];

    p->mem = 1;
    unstable_remove(s, i);
    p->since = s->live.full_scans;
    p->gmiss = 0;
    p->flags &= ~PG_ANSWERED;
    if (has_log(s)) {
        p->flags &= ~PG_KNOWN;
        todo_set(s, i);
    }
}

/* Could the kernel fill page @i without a write to it?  "Huge pages" */
static bool maybe_hole(const MsScanner *s, size_t i)
{
    const PageState *p = &s->pg[i];

    return !p->mem && p->slot == MS_SLOT_NONE && !(p->flags & PG_ZERO);
}

/* The first maybe_hole() page of [@j, @end), or @end */
static size_t next_hole(const MsScanner *s, size_t j, size_t end)
{
    while (j < end && !maybe_hole(s, j)) {
        j++;
    }
    return j;
}

/*
 * Page @i, a hole when last seen, was written (and marked so): if that
 * faulted in a huge page, the other holes of its range hold zeros now,
 * and count as written too.  See "Huge pages".
 */
static void filled_around(MsScanner *s, size_t i)
{
    size_t off = ((uintptr_t)page_at(s, i) % s->huge_size) / s->page_size;
    /* The range, within the region (which need not start or end on one) */
    size_t first = i - MIN(i, off);
    size_t end = MIN(i + s->huge_size / s->page_size - off, s->npages);
    size_t probe;
    uint64_t pm;

    /*
     * After @i first: a pass takes written pages in order, so those
     * before it in a range nobody filled were marked written already
     */
    probe = next_hole(s, i + 1, end);
    if (probe == end) {
        probe = next_hole(s, first, i);
        if (probe == i) {
            return;             /* the range has no other hole */
        }
    }
    if (!ms_pagemap_read(s->pagemap_fd, page_at(s, probe), 1, s->page_size,
                         &pm, NULL) ||
        !holds_private_memory(pm)) {
        return;
    }
    s->live.huge_fills++;
    for (size_t j = next_hole(s, first, end); j < end;
         j = next_hole(s, j + 1, end)) {
        mark_written(s, j);
    }
}

static void written(MsScanner *s, size_t i)
{
    bool hole = maybe_hole(s, i);

    mark_written(s, i);
    if (hole && has_log(s) && s->huge_size) {
        filled_around(s, i);
    }
}

/*
 * A write broke the merge of page @i (a copy-on-write fault of a store
 * page, or the fill of a zero hole).  A merge that did not outlive the
 * wait that led to it cost more than it saved: wait twice as long before
 * the next one.  One that lived twice its wait paid: wait half as long.
 */
static void broken(MsScanner *s, size_t i, bool store)
{
    PageState *p = &s->pg[i];
    unsigned lived = age(s, p), wait = MAX(wait_of(s, p), 1);

    if (lived <= wait) {
        s->live.merges_wasted++;
        if (p->churn < MAX_CHURN) {
            p->churn++;
        }
    } else if (lived > 2 * wait && p->churn) {
        p->churn--;
    }
    if (lived <= MAX(UPKEEP_LIVED, 2 * wait)) {
        p->flags |= PG_BROKEN_SOON;
    } else {
        p->flags &= ~PG_BROKEN_SOON;
    }
    s->live.cow_breaks += store;
    s->pass_breaks++;
    written(s, i);
}

/*
 * Merged pages of [first, first + n) that a write made private give
 * their reference back and become ordinary pages.  The chunk's pagemap
 * entries from s->pm_first cover [first, first + n).
 */
static bool settle_merged(MsScanner *s, size_t first, size_t n,
                          GError **errp)
{
    bool shared[CHUNK];
    size_t merged = 0;
    const uint64_t *pm = s->pm + (first - s->pm_first);

    for (size_t i = first; i < first + n; i++) {
        merged += s->pg[i].slot != MS_SLOT_NONE;
    }
    if (!merged) {
        return true;
    }
    if (!ms_merge_test_shared_pagemap(s->m, page_at(s, first), n, pm,
                                      shared, NULL, errp)) {
        return false;
    }
    for (size_t k = 0; k < n; k++) {
        PageState *p = &s->pg[first + k];

        if (p->slot != MS_SLOT_NONE && !shared[k]) {
            drop_slot(s, p);
            /* Written, if with the same bytes: it must prove stable again */
            broken(s, first + k, true);
        }
    }
    return true;
}

/*
 * Record the hash @h of a visit that read page @i.  A hash that changed
 * is a write; so is the first one without a log.  With a log, a page
 * without a known hash was written when the log said so, not now.
 */
static void observe(MsScanner *s, size_t i, uint64_t h)
{
    PageState *p = &s->pg[i];
    bool known = p->flags & PG_KNOWN;

    if (known && p->hash == h) {
        set_volatile(s, p, false);
        return;
    }
    if (known) {
        s->live.hash_changes++;
        set_volatile(s, p, true);
    }
    if (known || !has_log(s)) {
        written(s, i);
    }
    p->hash = h;
    p->flags |= PG_KNOWN;
}

/* ---- merging a batch ---- */

/*
 * Freezing part of a VMA splits it for a moment, so even a zero hole,
 * which adds no VMA in the end, needs two VMAs of headroom: store merges
 * leave them free, so that zero holes go on when the budget is spent.
 */
#define ZERO_RESERVE 2

static bool do_merge(MsScanner *s, size_t first, size_t n, uint32_t slot,
                     bool *changed, MsMergeResult *res, GError **errp)
{
    int64_t budget = ms_merger_budget(s->m);
    bool ok;

    if (slot == MS_SLOT_NONE) {
        return ms_merge_zero(s->m, page_at(s, first), n, changed, res, errp);
    }
    /* Zero slots too: their mappings count as much as any other */
    ms_merger_set_budget(s->m, budget - ZERO_RESERVE);
    ok = ms_merge_run(s->m, page_at(s, first), n, slot, changed, res, errp);
    ms_merger_set_budget(s->m, budget);
    return ok;
}

/*
 * Count a refusal; a budget refusal stops new slots for a while.  A
 * remap the kernel refused (MS_MERGE_NO_MEMORY) left every page with its
 * content: the pages are simply tried again on a later pass.
 */
static void refused(MsScanner *s, const MsMergeResult *res, size_t n)
{
    if (res->outcome == MS_MERGE_NO_BUDGET) {
        s->live.refused_budget += n;
        s->blocked_vmas = ms_merger_process_vmas();
    } else if (res->outcome == MS_MERGE_NO_MEMORY) {
        s->live.refused_nomem += n;
    } else {
        /* Pinned pages count as changed in @res: count them apart */
        s->live.refused_changed += res->changed - res->pinned;
        s->live.refused_dma += res->pinned;
    }
}

/*
 * Merge pages [first, first + n) onto slots [slot, slot + n), or make
 * them holes (slot MS_SLOT_NONE); @done[k] tells which were.  After a
 * CHANGED outcome the runs of pages that did not change are tried once
 * more on their own; the pages that did must prove stable again.
 */
static bool retry_unchanged(MsScanner *s, size_t first, size_t n,
                            uint32_t slot, MsMergeResult res,
                            const bool *changed, bool *done, GError **errp);

static bool merge_pages(MsScanner *s, size_t first, size_t n, uint32_t slot,
                        bool *done, GError **errp)
{
    bool changed[CHUNK];
    MsMergeResult res;

    g_assert(n <= CHUNK);
    res.outcome = MS_MERGE_FAILED;
    if (!do_merge(s, first, n, slot, changed, &res, errp)) {
        /* Replaced all the same if DONE (its advice failed): record it */
        memset(done, res.outcome == MS_MERGE_DONE, n * sizeof(*done));
        return false;
    }
    return retry_unchanged(s, first, n, slot, res, changed, done, errp);
}

/* After a first attempt (@res, @changed): see merge_pages() */
static bool retry_unchanged(MsScanner *s, size_t first, size_t n,
                            uint32_t slot, MsMergeResult res,
                            const bool *changed, bool *done, GError **errp)
{
    bool ok;

    memset(done, 0, n * sizeof(*done));
    if (res.outcome == MS_MERGE_DONE) {
        memset(done, 1, n * sizeof(*done));
        return true;
    }
    refused(s, &res, n);
    if (res.outcome != MS_MERGE_CHANGED) {
        return true;
    }
    for (size_t a = 0, b; a < n; a = b) {
        if (changed[a]) {
            written(s, first + a);
            b = a + 1;
            continue;
        }
        for (b = a; b < n && !changed[b]; b++) {
            /* the run of unchanged pages [a, b) */
        }
        ok = do_merge(s, first + a, b - a, slot == MS_SLOT_NONE ?
                      slot : slot + a, NULL, &res, errp);
        if (res.outcome == MS_MERGE_DONE) {
            memset(done + a, 1, (b - a) * sizeof(*done));
        } else if (ok) {
            refused(s, &res, b - a);
        }
        if (!ok) {
            return false;
        }
    }
    return true;
}

/*
 * Page @i now maps @slot (MS_SLOT_NONE: is a hole); take its reference.
 * A zero slot is mapped, so the page is skipped until a write copies it,
 * as a store page would be; a hole is not, so PG_ZERO tells it is ours.
 */
static void record_merge(MsScanner *s, size_t i, uint32_t slot)
{
    PageState *p = &s->pg[i];
    bool again = p->flags & PG_WAS_MERGED;

    unstable_remove(s, i);
    p->flags |= PG_WAS_MERGED;
    /* From now on its age is how long the merge lived: see broken() */
    p->since = s->live.full_scans;
    s->pass_merges++;
    s->live.merges_upkeep += !!(p->flags & PG_BROKEN_SOON);
    if (slot == MS_SLOT_NONE || ms_store_is_zero_slot(s->store, slot)) {
        p->flags |= PG_ZERO;
        p->slot = slot;
        s->live.zero_holes++;
        s->live.zero_merges++;
        return;
    }
    s->live.merges++;
    s->live.remerges += again;
    p->slot = slot;
    if (is_group_slot(s, slot)) {
        s->live.group_pages++;      /* its reference is the lookup's */
        return;
    }
    ms_store_get(s->store, slot);
    s->live.pages_merged++;
}

static void clear_pending(MsScanner *s, size_t first, size_t n)
{
    for (size_t i = first; i < first + n; i++) {
        s->pg[i].flags &= ~PG_PENDING;
    }
}

/*
 * Merge the pages of a batch and record those merged; @slot as in
 * merge_pages().
 */
static void record_done(MsScanner *s, size_t first, size_t n, uint32_t slot,
                        const bool *done)
{
    clear_pending(s, first, n);
    for (size_t k = 0; k < n; k++) {
        if (done[k]) {
            record_merge(s, first + k, slot == MS_SLOT_NONE ? slot : slot + k);
        }
    }
}

/* Pages merged must be recorded even on an error: they map the store */
static bool merge_and_record(MsScanner *s, size_t first, size_t n,
                             uint32_t slot, GError **errp)
{
    bool done[CHUNK];
    bool ok = merge_pages(s, first, n, slot, done, errp);

    record_done(s, first, n, slot, done);
    return ok;
}

/* Queue a zero or found batch: flush_queue() merges the chunk's at once */
static void enqueue(MsScanner *s, Batch *b, bool found)
{
    g_assert(s->queued < CHUNK);
    s->queue[s->queued] = *b;
    s->queue[s->queued++].found = found;
    b->n = 0;
}

/* ---- groups ---- */

static bool group_usable(const MsScanner *s)
{
    return s->group && !s->live.group_lost &&
           ms_broker_client_alive(s->group);
}

/* The group's hash of page @i, whose hash in our store is @h */
static uint64_t group_hash(const MsScanner *s, size_t i, uint64_t h)
{
    return s->gkey_same ? h : ms_broker_client_hash(s->group, page_at(s, i));
}

/*
 * A group call failed.  A broken connection is lost for good: the
 * statistics say so, the caller reports it and may reconnect.  A call
 * that only gave up waiting leaves the connection as it is.
 */
static void group_failed(MsScanner *s, const GError *err)
{
    (void)err;
    if (ms_broker_client_alive(s->group)) {
        s->live.group_waits++;
    } else {
        s->live.group_lost = 1;
    }
}

/*
 * Give back the references of group pages that left their slot.  The
 * client sends them without waiting for the reply.  On a connection that
 * broke, the broker keeps them until this process exits.
 */
static void group_release(MsScanner *s)
{
    g_autoptr(GError) err = NULL;

    if (!s->grel || !s->grel->len) {
        return;
    }
    if (group_usable(s) &&
        !ms_broker_client_release_nowait(s->group, (uint32_t *)s->grel->data,
                                         NULL, s->grel->len, &err)) {
        group_failed(s, err);
    }
    g_array_set_size(s->grel, 0);
}

/* References a failed call handed out anyway go back */
static void group_give_back(MsScanner *s, const MsProtoResult *res,
                            size_t n)
{
    for (size_t k = 0; k < n; k++) {
        if (res[k].status == MS_STATUS_OK) {
            g_array_append_val(s->grel, res[k].slot);
        }
    }
}

/* Merge page @i onto group slot @gslot, whose reference it takes over */
static void add_group(MsScanner *s, size_t i, uint32_t gslot)
{
    Batch b = { .first = i, .n = 1, .slot = s->gbase + gslot };

    s->pg[i].flags |= PG_PENDING;
    enqueue(s, &b, false);
    s->queue[s->queued - 1].group = true;
}

static bool add_unstable(MsScanner *s, size_t i, uint64_t h, GError **errp);

/*
 * WANTED: give the group those pages of the lookup, all in one UPLOAD
 * (one round trip, not one per page), and put each one's answer in
 * @res, flagged in @uploaded.  If the upload fails, the pages it did not
 * store keep what the lookup said, and group_result() sends them to the
 * unstable tree; those it stored (an earlier batch) are merged as usual.
 */
static void group_upload_wanted(MsScanner *s, GArray *look,
                                const uint64_t *gh, MsProtoResult *res,
                                bool *uploaded)
{
    g_autofree const void **pages = g_new(const void *, look->len);
    g_autofree uint64_t *hashes = g_new(uint64_t, look->len);
    g_autofree guint *which = g_new(guint, look->len);
    g_autofree MsProtoResult *ur = NULL;
    g_autoptr(GError) err = NULL;
    guint n = 0;
    bool ok;

    for (guint k = 0; k < look->len; k++) {
        if (res[k].status == MS_STATUS_WANTED) {
            pages[n] = page_at(s, g_array_index(look, GroupLook, k).page);
            hashes[n] = gh[k];
            which[n++] = k;
        }
    }
    if (!n) {
        return;
    }
    ur = g_new(MsProtoResult, n);
    ok = ms_broker_client_upload_pages(s->group, pages, hashes, n, ur, &err);
    if (!ok) {
        group_failed(s, err);
    }
    for (guint j = 0; j < n; j++) {
        if (ok || ur[j].status == MS_STATUS_OK) {
            res[which[j]] = ur[j];
            uploaded[which[j]] = true;
            s->live.group_uploads++;
        }
    }
}

/*
 * The group did not have page @i, asked when news() was @asked: ask
 * again later, less and less often
 */
static void group_missed(MsScanner *s, size_t i, uint64_t asked)
{
    PageState *p = &s->pg[i];

    if (p->gmiss < 15) {
        p->gmiss++;
        if (has_log(s) && !s->sweep && p->gmiss <= GROUP_RETRIES) {
            retry_group(s, i, asked);
        }
    }
}

/*
 * Has nothing happened since news(@sweep) was @then?  Reads the
 * broker's counters (a STATS round trip) unless take_answers() did;
 * false when they cannot be read.
 */
static bool quiet_since(MsScanner *s, uint64_t then, bool sweep)
{
    g_autoptr(GArray) groups = NULL;
    g_autoptr(GError) err = NULL;
    const MsProtoGroupStats *gs;

    if (!group_usable(s) || ms_broker_client_stalled(s->group)) {
        return false;
    }
    if (s->answers) {
        /* take_answers() read the broker's news at the pass's start */
        return news(s, sweep) == then;
    }
    if (!ms_broker_client_stats(s->group, &groups, &err)) {
        group_failed(s, err);
        return false;
    }
    if (groups->len != 1) {
        return false;
    }
    gs = &g_array_index(groups, MsProtoGroupStats, 0);
    s->group_news = gs->met;
    s->group_resets = gs->unstable_resets;
    return news(s, sweep) == then;
}

/* Page @i, in the retry wheel, still waits for the group to have it */
static bool waits_for_group(const MsScanner *s, size_t i)
{
    const PageState *p = &s->pg[i];

    return p->slot == MS_SLOT_NONE && p->gmiss &&
           (p->flags & PG_KNOWN) && !(p->flags & (PG_ZERO | PG_PENDING));
}

/* Does the broker tell us which of our misses it answered?  Asks once */
static bool answers_offered(MsScanner *s)
{
    g_autoptr(GError) err = NULL;
    uint64_t features;

    if (!s->answers_probed) {
        if (!ms_broker_client_features(s->group, &features, &err)) {
            group_failed(s, err);
            return false;
        }
        s->answers_probed = true;
        s->answers = features & MS_FEATURE_ANSWERED;
    }
    return s->answers;
}

/*
 * The group answered our miss of @h: the page waiting under it in the
 * unstable table (its key is the group's hash too, see gkey_same) is
 * asked at its next visit, this pass, whatever its backoff.
 */
static void answered(MsScanner *s, uint64_t h)
{
    uint32_t e = *unstable_find(s, h);

    s->live.group_answers++;
    if (e && waits_for_group(s, e - 1)) {
        s->pg[e - 1].flags |= PG_ANSWERED;
        todo_set(s, e - 1);
    }
}

/*
 * A pass begins: which of our misses did the group answer since the
 * last one?  One round trip a pass.  Those pages are asked again at
 * once, and the retries of the others only when news says that asking
 * can pay: the broker forgot misses (its table was emptied), or lost
 * some of its answers to us, or we did something ourselves.  Without
 * our key (a broker that came back with another) the group's hashes
 * are not our table's keys: news is then any answer of ours (met).
 */
static void take_answers(MsScanner *s)
{
    g_autoptr(GArray) hashes = NULL;
    g_autoptr(GError) err = NULL;
    uint64_t resets;
    bool lost;

    if (!group_usable(s) || ms_broker_client_stalled(s->group) ||
        !s->gkey_same || s->cfg.group_no_answers || !answers_offered(s)) {
        return;
    }
    if (!ms_broker_client_answered(s->group, &hashes, &lost, &resets,
                                   &err)) {
        /* A late reply's answers are lost: the next call says so */
        group_failed(s, err);
        return;
    }
    if (lost) {
        /* news() only grows: one step is enough to let every retry by */
        s->group_news++;
    }
    s->group_resets = MAX(s->group_resets, resets);
    for (guint k = 0; k < hashes->len; k++) {
        answered(s, g_array_index(hashes, uint64_t, k));
    }
}

/*
 * A pass begins: the retries due in it join the pages to visit.  If
 * nothing happened since they were put on the wheel, their lookups
 * would miss again: count them missed, without a visit or a lookup.
 */
static void retries_due(MsScanner *s)
{
    size_t w = s->live.full_scans % RETRY_WHEEL;
    GArray *a = s->retry[w];
    int quiet = -1;         /* not read yet: only for a page that waits */

    if (!a) {
        return;
    }
    for (guint k = 0; k < a->len; k++) {
        uint32_t i = g_array_index(a, uint32_t, k);
        bool waits = !s->sweep_pass && waits_for_group(s, i);

        if (waits && quiet < 0) {
            quiet = quiet_since(s, s->retry_news[w], false);
        }
        if (waits && quiet) {
            /* As if asked now, with nothing new: see quiet_since() */
            s->live.group_retries_skipped++;
            group_missed(s, i, news(s, false));
        } else {
            todo_set(s, i);
        }
    }
    g_array_set_size(a, 0);
}

/* A lookup that was not answered: neither a miss nor a hit */
#define GROUP_UNASKED 0xff

static bool group_result(MsScanner *s, const GroupLook *l, MsProtoResult r,
                         bool uploaded, uint64_t asked, GError **errp)
{
    if (uploaded) {
        /* Our own bytes, or bytes the broker found equal to them */
        if (r.status == MS_STATUS_OK && r.slot < s->gslots) {
            add_group(s, l->page, r.slot);
            return true;
        }
        /* Changed since hashed (BAD_HASH), full, or over quota */
        return add_unstable(s, l->page, l->hash, errp);
    }
    if (r.status == MS_STATUS_OK && r.slot < s->gslots) {
        /* The hash only nominates: the bytes decide */
        if (!memcmp(page_at(s, l->page), s->gview +
                    (size_t)r.slot * s->page_size, s->page_size)) {
            s->live.group_hits++;
            add_group(s, l->page, r.slot);
            return true;
        }
        g_array_append_val(s->grel, r.slot);
    }
    if (r.status == MS_STATUS_NOT_FOUND) {
        group_missed(s, l->page, asked);
    }
    return add_unstable(s, l->page, l->hash, errp);
}

/* Look up the chunk's candidates in the group, one LOOKUP for all */
static bool group_flush(MsScanner *s, GError **errp)
{
    g_autoptr(GArray) look = NULL;
    g_autofree uint64_t *gh = NULL;
    g_autofree MsProtoResult *res = NULL;
    g_autofree bool *uploaded = NULL;
    g_autoptr(GError) err = NULL;
    /* Before the LOOKUP: a miss's stamp is never newer than its lookup */
    uint64_t asked = news(s, false);
    bool ok = true;

    if (!s->glook || !s->glook->len) {
        return true;
    }
    /* Taken: a page that comes back while we work goes in a new one */
    look = g_steal_pointer(&s->glook);
    s->glook = g_array_new(false, false, sizeof(GroupLook));
    gh = g_new(uint64_t, look->len);
    res = g_new(MsProtoResult, look->len);
    uploaded = g_new0(bool, look->len);
    for (guint k = 0; k < look->len; k++) {
        const GroupLook *l = &g_array_index(look, GroupLook, k);

        gh[k] = group_hash(s, l->page, l->hash);
        res[k] = (MsProtoResult) { MS_SLOT_NONE, MS_STATUS_NOT_FOUND };
    }
    /* A failed lookup still hands out what earlier batches found */
    if (!group_usable(s) ||
        !ms_broker_client_lookup(s->group, gh, look->len, res, &err)) {
        if (err) {
            group_failed(s, err);
        }
        for (guint k = 0; k < look->len; k++) {
            if (res[k].status == MS_STATUS_NOT_FOUND) {
                res[k].status = GROUP_UNASKED;
            }
        }
    } else {
        s->live.group_lookups += look->len;
        group_upload_wanted(s, look, gh, res, uploaded);
    }
    /* What falls back to the unstable tree must not come back here */
    s->in_group_flush = true;
    for (guint k = 0; ok && k < look->len; k++) {
        ok = group_result(s, &g_array_index(look, GroupLook, k), res[k],
                          uploaded[k], asked, errp);
        /* After an error the rest are not merged: their slots go back */
        if (!ok) {
            group_give_back(s, res + k + 1, look->len - k - 1);
        }
    }
    s->in_group_flush = false;
    return ok;
}

static bool flush_zero(MsScanner *s, GError **errp)
{
    (void)errp;
    if (s->zero.n) {
        enqueue(s, &s->zero, false);
    }
    return true;
}

static bool flush_found(MsScanner *s, GError **errp)
{
    (void)errp;
    if (s->found.n) {
        enqueue(s, &s->found, true);
    }
    return true;
}

static int batch_cmp(const void *a, const void *b)
{
    const Batch *x = a, *y = b;

    return x->first < y->first ? -1 : x->first > y->first;
}

/* A queued batch is done with: its found references go back */
static void unqueue(MsScanner *s, const Batch *b)
{
    clear_pending(s, b->first, b->n);
    for (size_t k = 0; b->found && k < b->n; k++) {
        ms_store_put(s->store, b->slot + k);
    }
    if (b->group && s->pg[b->first].slot != b->slot) {
        /* Not merged: the lookup's reference goes back */
        uint32_t g = b->slot - s->gbase;

        g_array_append_val(s->grel, g);
    }
}

/* Merge the queued batches with one ms_merge_runs() and record them */
static bool flush_queue(MsScanner *s, GError **errp)
{
    g_autofree MsMergeReq *req = NULL;
    g_autofree bool *changed = NULL;
    int64_t budget = ms_merger_budget(s->m);
    size_t nq = s->queued, off = 0;
    bool ok;

    if (!nq) {
        return true;
    }
    s->queued = 0;
    qsort(s->queue, nq, sizeof(s->queue[0]), batch_cmp);
    req = g_new0(MsMergeReq, nq);
    changed = g_new0(bool, CHUNK * 2);
    for (size_t k = 0; k < nq; k++) {
        const Batch *b = &s->queue[k];

        req[k] = (MsMergeReq) {
            .host = page_at(s, b->first),
            .n = b->n,
            .first_slot = b->slot == MS_SLOT_NONE ? MS_MERGE_ZERO : b->slot,
            .changed = changed + off,
        };
        off += b->n;
    }
    g_assert(off <= CHUNK * 2);
    /* Store merges leave the zero reserve: see do_merge() */
    ms_merger_set_budget(s->m, budget - ZERO_RESERVE);
    ok = ms_merge_runs(s->m, req, nq, errp);
    ms_merger_set_budget(s->m, budget);
    for (size_t k = 0; k < nq; k++) {
        const Batch *b = &s->queue[k];
        bool done[CHUNK];

        if (req[k].res.outcome == MS_MERGE_DONE || ok) {
            /* After an error, DONE still needs recording; no retries */
            ok = retry_unchanged(s, b->first, b->n, b->slot, req[k].res,
                                 req[k].changed, done, ok ? errp : NULL) &&
                 ok;
            record_done(s, b->first, b->n, b->slot, done);
        }
        unqueue(s, b);
    }
    return ok;
}

/* New slots are pointless while the budget refuses their mappings */
static bool slots_blocked(MsScanner *s)
{
    return s->blocked_vmas >= 0 &&
           ms_merger_process_vmas() >= s->blocked_vmas;
}

/* The slot after the one page @i - 1 maps, or MS_SLOT_NONE */
static uint32_t hint_after(MsScanner *s, size_t i)
{
    uint32_t prev;

    if (i == 0) {
        return MS_SLOT_NONE;
    }
    prev = ms_merger_slot_at(s->m, page_at(s, i - 1));
    return prev == MS_SLOT_NONE ? MS_SLOT_NONE : prev + 1;
}

/*
 * Reserve the longest run of slots, up to @b->n, that the store has
 * (halving the length while it has none) and publish the content of
 * the pages from @b->first in it.  *@n: how many; 0 if the store is full.
 */
static bool new_slots(MsScanner *s, const Batch *b, uint32_t *slot,
                      size_t *n, GError **errp)
{
    uint32_t hint = hint_after(s, b->first);

    if (hint == MS_SLOT_NONE) {
        hint = hint_after(s, b->partner);
    }
    *n = MIN(b->n, ms_store_max_slots(s->store));
    for (;;) {
        g_autoptr(GError) err = NULL;

        if (ms_store_alloc_run(s->store, hint, *n, slot, &err)) {
            break;
        }
        if (err->code != ENOSPC) {
            g_propagate_error(errp, g_steal_pointer(&err));
            return false;
        }
        *n /= 2;
        if (!*n) {
            return true;
        }
    }
    /* A retry may find these slots (see news()) */
    s->local_news++;
    for (size_t k = 0; k < *n; k++) {
        if (!ms_store_publish(s->store, *slot + k, page_at(s, b->first + k),
                              errp)) {
            for (size_t j = 0; j < *n; j++) {
                ms_store_put(s->store, *slot + j);
            }
            return false;
        }
    }
    return true;
}

/*
 * In a group, a pair goes to the group's store rather than ours: another
 * member with the same content then finds it there, and the group holds
 * one copy, not one per member.  Both sides are uploaded (the broker
 * keeps one page and gives a reference per side) and merged one by one.
 * Returns false with *@lost set if the broker could not be asked.
 */
static bool flush_pair_group(MsScanner *s, Batch *b, bool *lost,
                             GError **errp)
{
    size_t n = b->n;
    g_autofree uint64_t *gh = g_new(uint64_t, 2 * n);
    g_autofree MsProtoResult *res = g_new(MsProtoResult, 2 * n);
    g_autoptr(GError) err = NULL;
    bool ok = true;

    for (size_t k = 0; k < 2 * n; k++) {
        size_t page = k < n ? b->first + k : b->partner + k - n;

        /* The hash of its visit: one written since comes back BAD_HASH */
        gh[k] = group_hash(s, page, s->pg[page].hash);
    }
    /*
     * Each side from guest memory, not from a copy: a copy of up to two
     * chunks would leave malloc holding megabytes (see "Memory").  A page
     * written meanwhile comes back BAD_HASH and is not merged.
     */
    for (size_t k = 0; k < 2 * n; k++) {
        res[k] = (MsProtoResult) { MS_SLOT_NONE, MS_STATUS_NOT_FOUND };
    }
    *lost = !ms_broker_client_upload(s->group, page_at(s, b->first), gh, n,
                                     res, &err) ||
            !ms_broker_client_upload(s->group, page_at(s, b->partner),
                                     gh + n, n, res + n, &err);
    if (*lost) {
        /* The pair merges locally; what was stored goes back */
        group_failed(s, err);
        group_give_back(s, res, 2 * n);
        return true;
    }
    s->live.group_uploads += 2 * n;
    for (size_t k = 0; k < 2 * n; k++) {
        size_t page = k < n ? b->first + k : b->partner + k - n;
        uint32_t slot;

        clear_pending(s, page, 1);
        if (res[k].status != MS_STATUS_OK || res[k].slot >= s->gslots) {
            continue;
        }
        slot = s->gbase + res[k].slot;
        ok = ok && merge_and_record(s, page, 1, slot, errp);
        if (s->pg[page].slot != slot) {
            /* Not merged: the upload's reference goes back */
            g_array_append_val(s->grel, res[k].slot);
        }
    }
    b->n = 0;
    return ok;
}

/* Merge a piece of a pair batch: both sides onto new slots */
static bool flush_pair_piece(MsScanner *s, Batch *b, GError **errp)
{
    uint32_t slot;
    size_t n;
    bool ok;

    if (!new_slots(s, b, &slot, &n, errp)) {
        return false;
    }
    if (!n) {
        s->live.refused_store_full += 2 * b->n;
        clear_pending(s, b->first, b->n);
        clear_pending(s, b->partner, b->n);
        b->n = 0;
        return true;
    }
    ok = merge_and_record(s, b->first, n, slot, errp) &&
         merge_and_record(s, b->partner, n, slot, errp);
    /* The allocation's references: a slot nobody maps is freed here */
    for (size_t k = 0; k < n; k++) {
        ms_store_put(s->store, slot + k);
    }
    clear_pending(s, b->partner, n);
    b->first += n;
    b->partner += n;
    b->n -= n;
    return ok;
}

static bool flush_pair(MsScanner *s, GError **errp)
{
    Batch b = s->pair;

    s->pair.n = 0;
    if (b.n && slots_blocked(s)) {
        s->live.refused_budget += 2 * b.n;
        clear_pending(s, b.first, b.n);
        clear_pending(s, b.partner, b.n);
        return true;
    }
    if (b.n && group_usable(s)) {
        bool lost;

        if (!flush_pair_group(s, &b, &lost, errp)) {
            return false;
        }
    }
    while (b.n) {
        if (!flush_pair_piece(s, &b, errp)) {
            clear_pending(s, b.first, b.n);
            clear_pending(s, b.partner, b.n);
            return false;
        }
    }
    return true;
}

static bool flush_all(MsScanner *s, GError **errp)
{
    return flush_zero(s, errp) && flush_found(s, errp) &&
           flush_queue(s, errp) && flush_pair(s, errp);
}

/* After an error: forget the batches, give their references back */
static void drop_batches(MsScanner *s)
{
    if (s->glook) {
        g_array_set_size(s->glook, 0);
    }
    for (size_t k = 0; k < s->queued; k++) {
        unqueue(s, &s->queue[k]);
    }
    s->queued = 0;
    clear_pending(s, s->zero.first, s->zero.n);
    clear_pending(s, s->found.first, s->found.n);
    for (size_t k = 0; k < s->found.n; k++) {
        ms_store_put(s->store, s->found.slot + k);
    }
    clear_pending(s, s->pair.first, s->pair.n);
    clear_pending(s, s->pair.partner, s->pair.n);
    s->zero.n = s->found.n = s->pair.n = 0;
}

/* ---- candidates ---- */

static bool add_zero(MsScanner *s, size_t i, GError **errp)
{
    Batch *b = &s->zero;
    /* MS_SLOT_NONE for a hole; runs of zero slots wrap around */
    uint32_t slot = ms_store_zero_slot(s->store, i);

    if (b->n && i == b->first + b->n &&
        (slot == MS_SLOT_NONE || slot == b->slot + b->n)) {
        b->n++;
    } else {
        if (!flush_zero(s, errp)) {
            return false;
        }
        *b = (Batch) { .first = i, .n = 1, .slot = slot };
    }
    s->pg[i].flags |= PG_PENDING;
    return true;
}

static bool add_found(MsScanner *s, size_t i, uint32_t slot, GError **errp)
{
    Batch *b = &s->found;

    if (!b->n || i != b->first + b->n || slot != b->slot + b->n) {
        if (!flush_found(s, errp)) {
            return false;
        }
        *b = (Batch) { .first = i, .slot = slot };
    }
    /* Held until the batch is merged, whatever happens meanwhile */
    ms_store_get(s->store, slot);
    b->n++;
    s->pg[i].flags |= PG_PENDING;
    return true;
}

static bool add_pair(MsScanner *s, size_t i, size_t q, GError **errp)
{
    Batch *b = &s->pair;

    if (b->n && i == b->first + b->n && q == b->partner + b->n) {
        b->n++;
    } else {
        if (!flush_pair(s, errp)) {
            return false;
        }
        *b = (Batch) { .first = i, .n = 1, .partner = q };
    }
    s->pg[i].flags |= PG_PENDING;
    s->pg[q].flags |= PG_PENDING;
    return true;
}

/* Is page @q, seen earlier in this pass, still a partner for @content? */
static bool partner_ok(MsScanner *s, size_t q, uint64_t h,
                       const void *content)
{
    const PageState *p = &s->pg[q];

    return p->slot == MS_SLOT_NONE && !(p->flags & PG_ZERO) &&
           (p->flags & PG_KNOWN) && p->hash == h &&
           !memcmp(page_at(s, q), content, s->page_size);
}

static bool candidate(MsScanner *s, size_t i, uint64_t h, GError **errp);

/*
 * The unstable table's entry for @h, or the free entry where it would go.
 * An entry's key is its page's hash now: one whose page changed since is
 * found by no one (partner_ok() would refuse it anyway) and costs a probe.
 */
static uint32_t *unstable_find(MsScanner *s, uint64_t h)
{
    for (size_t k = h & s->unstable_mask;; k = (k + 1) & s->unstable_mask) {
        uint32_t *e = &s->unstable[k];

        if (!*e || s->pg[*e - 1].hash == h) {
            return e;
        }
    }
}

/* Double the table, or say no if it is as large as it may be */
static bool unstable_grow(MsScanner *s)
{
    size_t n = s->unstable_mask + 1;
    uint32_t *old = s->unstable;

    if (n * 2 > s->unstable_max) {
        return false;
    }
    s->unstable = g_new0(uint32_t, n * 2);
    s->unstable_mask = n * 2 - 1;
    for (size_t k = 0; k < n; k++) {
        if (old[k]) {
            *unstable_find(s, s->pg[old[k] - 1].hash) = old[k];
        }
    }
    g_free(old);
    return true;
}

/*
 * Remember page @i under @h until it is written or merged (if there is
 * room).  @h is its hash: the entry's key is read from its PageState.
 */
static void unstable_add(MsScanner *s, size_t i, uint64_t h)
{
    uint32_t *e = unstable_find(s, h);

    g_assert(s->pg[i].hash == h && (s->pg[i].flags & PG_KNOWN));
    if (*e == i + 1) {
        /* Still waiting (a retry missed again): nothing happened */
        return;
    }
    if (!*e) {
        if (s->unstable_used + 1 > (s->unstable_mask + 1) / 2) {
            if (!unstable_grow(s)) {
                /* A miss: this page waits for the next sweep, or a retry */
                s->local_news++;
                return;
            }
            e = unstable_find(s, h);
        }
        s->unstable_used++;
    } else {
        /* Same hash: a page that changed, or a collision.  It goes. */
        s->pg[*e - 1].flags &= ~PG_UNSTABLE;
        s->local_news++;
    }
    *e = i + 1;
    s->pg[i].flags |= PG_UNSTABLE;
}

/*
 * Take page @i out of the table, before its hash changes or when it is
 * merged: an entry whose key changed would be lost in the probe
 * sequence.  Deletion shifts the entries after it back (linear probing
 * needs no tombstones), so the table holds exactly the pages waiting in
 * it and never needs rebuilding.
 */
static void unstable_remove(MsScanner *s, size_t i)
{
    size_t mask = s->unstable_mask, k, j;

    if (!(s->pg[i].flags & PG_UNSTABLE)) {
        return;
    }
    s->pg[i].flags &= ~PG_UNSTABLE;
    for (k = s->pg[i].hash & mask; s->unstable[k] != i + 1;
         k = (k + 1) & mask) {
        g_assert(s->unstable[k]);
    }
    s->unstable_used--;
    for (j = (k + 1) & mask; s->unstable[j]; j = (j + 1) & mask) {
        size_t home = s->pg[s->unstable[j] - 1].hash & mask;

        /* It may move back to k if k is no earlier than its home */
        if (((j - home) & mask) >= ((j - k) & mask)) {
            s->unstable[k] = s->unstable[j];
            k = j;
        }
    }
    s->unstable[k] = 0;
}

static void unstable_clear(MsScanner *s)
{
    for (size_t k = 0; k <= s->unstable_mask; k++) {
        if (s->unstable[k]) {
            s->pg[s->unstable[k] - 1].flags &= ~PG_UNSTABLE;
        }
    }
    memset(s->unstable, 0, (s->unstable_mask + 1) * sizeof(*s->unstable));
    s->unstable_used = 0;
    s->local_news++;
}

/* The unstable tree: pair with an earlier page, or wait for a later one */
static bool add_unstable(MsScanner *s, size_t i, uint64_t h, GError **errp)
{
    uint32_t e = *unstable_find(s, h);
    size_t q = e ? e - 1 : i;

    if (q != i && (s->pg[q].flags & PG_PENDING)) {
        /* Its slot is about to exist: merge, then find it in the store */
        return flush_all(s, errp) && candidate(s, i, h, errp);
    }
    if (q != i && partner_ok(s, q, h, page_at(s, i))) {
        if (slots_blocked(s)) {
            s->live.refused_budget++;
            return true;
        }
        return add_pair(s, i, q, errp);
    }
    unstable_add(s, i, h);
    return true;
}

/* Is page @i due for a group lookup this scan?  See "Groups" */
static bool group_due(MsScanner *s, size_t i)
{
    unsigned miss = s->pg[i].gmiss, shift = MIN(miss, GROUP_BACKOFF);
    uint64_t scans = s->live.full_scans;

    if (s->pg[i].flags & PG_ANSWERED) {
        /* take_answers(): the broker has what we missed, or wants it */
        s->pg[i].flags &= ~PG_ANSWERED;
        return true;
    }
    if (has_log(s)) {
        /* Between sweeps: 1, 2, 4, ... passes after the first lookup */
        if (!s->sweep) {
            return miss <= GROUP_RETRIES &&
                   age(s, &s->pg[i]) >= wait_of(s, &s->pg[i]) + (1u << miss);
        }
        if (!s->sweep_pass) {
            /*
             * Its chunk's turn in the rolling sweep: a miss is asked
             * again, whatever its backoff, if the broker answered one of
             * ours or forgot them since the chunk's last turn (a member
             * that writes this page hours later meets it within a
             * round); else it would only miss again
             */
            if (miss && s->sweep_quiet) {
                s->live.group_retries_skipped++;
                return false;
            }
            return true;
        }
        scans = s->sweeps;
    }
    /* Offset by the page: not all the misses of one scan come back at once */
    return ((scans + i) & ((1u << shift) - 1)) == 0;
}

static bool candidate(MsScanner *s, size_t i, uint64_t h, GError **errp)
{
    const uint8_t *host = page_at(s, i);
    uint32_t slot;

    /* Read it for zeros only when the hash says so: see step 4 above */
    if (h == s->zero_hash && ms_page_is_zero(host, s->page_size)) {
        return add_zero(s, i, errp);
    }
    slot = ms_store_find(s->store, h, host);
    if (slot != MS_SLOT_NONE) {
        return add_found(s, i, slot, errp);
    }
    if (group_usable(s) && !s->in_group_flush) {
        GroupLook l = { .page = i, .hash = h };

        /* One more stable scan first, then backed off: see "Groups" */
        if (age(s, &s->pg[i]) < wait_of(s, &s->pg[i]) + 1) {
            todo_set(s, i);
            return true;
        }
        if (group_due(s, i)) {
            g_array_append_val(s->glook, l);
            return true;
        }
        if (has_log(s) && !s->sweep && s->pg[i].gmiss <= GROUP_RETRIES) {
            /* Not asked now, and when it was is not kept: 0 */
            retry_group(s, i, 0);
        }
    }
    return add_unstable(s, i, h, errp);
}

/* ---- scanning ---- */

/*
 * Visit page @i: @pm is its pagemap entry, @dirty whether the log saw
 * it written since the last visit.  See "A visit of a page".
 */
static bool visit(MsScanner *s, size_t i, uint64_t pm, bool dirty,
                  GError **errp)
{
    PageState *p = &s->pg[i];

    s->live.pages_scanned++;
    if (p->slot != MS_SLOT_NONE || !holds_private_memory(pm)) {
        /*
         * Still maps the store; or a hole (maybe ours), the zero page,
         * swap: nothing to gain until written
         */
        if (p->slot == MS_SLOT_NONE) {
            p->mem = 0;
        }
        todo_clear(s, i);
        return true;
    }
    p->mem = 1;
    if (p->flags & PG_ZERO) {
        /*
         * A write filled our hole (reads do not, or zero pages would map
         * zero slots): a break like a store page's, for "Churn" too,
         * since zero pages are most of what a filling guest breaks.
         */
        p->flags &= ~PG_ZERO;
        s->live.zero_holes--;
        broken(s, i, false);
    } else if (dirty) {
        s->live.pages_dirty++;
        set_volatile(s, p, true);
        written(s, i);
    } else if (has_log(s)) {
        set_volatile(s, p, false);
    }
    if (s->sweep) {
        observe(s, i, ms_store_hash(s->store, page_at(s, i)));
    }
    if (age(s, p) > AGE_MAX) {
        p->since = s->live.full_scans - AGE_MAX;
    }
    if (age(s, p) < wait_of(s, p)) {
        s->live.churn_skips += age(s, p) >= base_wait(s);
        todo_set(s, i);
        return true;
    }
    todo_clear(s, i);
    if (!(p->flags & PG_KNOWN)) {
        /* Stable since the log said it was written: read it once */
        observe(s, i, ms_store_hash(s->store, page_at(s, i)));
        s->live.candidates++;
    } else if (!s->sweep) {
        s->live.hash_skips++;
    }
    return candidate(s, i, p->hash, errp);
}

void ms_scanner_sweep(MsScanner *s)
{
    if (s->cursor == 0) {
        s->sweep_pass = true;   /* the next pass starts with the next step */
    } else {
        s->sweep_asked = true;
    }
}

void ms_scanner_set_yield(MsScanner *s, MsScanYieldFn *fn, void *opaque)
{
    s->yield = fn;
    s->yield_opaque = opaque;
}

void ms_scanner_set_dirty_log(MsScanner *s, MsDirtyTakeFn *take,
                              void *opaque)
{
    s->cfg.dirty_take = take;
    s->cfg.dirty_opaque = opaque;
    s->sweep_pass = !take;
}

/* This chunk's dirty bits, taken before its pages are read */
static void take_dirty(MsScanner *s, size_t first, size_t n)
{
    memset(s->dirty, 0, sizeof(s->dirty));
    if (has_log(s)) {
        s->cfg.dirty_take(s->cfg.dirty_opaque, first, n, s->dirty);
    }
}

/* 64 bits of the todo map from page @first (the map has a spare word) */
static uint64_t todo_bits(const MsScanner *s, size_t first)
{
    size_t w = first / 64, o = first % 64;
    uint64_t v = s->todo[w] >> o;

    return o ? v | s->todo[w + 1] << (64 - o) : v;
}

/*
 * The pages of the chunk [first, first + n) to visit, in @work.  Without
 * a log, and in a sweep, every page.  With a log, the pages it saw
 * written and those waiting to prove stable: the rest were looked at
 * before and nobody wrote them since, so they are not even read.
 */
static void chunk_work(MsScanner *s, size_t first, size_t n, uint64_t *work)
{
    size_t words = (n + 63) / 64, visits = 0;

    for (size_t w = 0; w < words; w++) {
        uint64_t valid = n - w * 64 >= 64 ? ~0ULL :
                         (1ULL << (n - w * 64)) - 1;

        work[w] = s->sweep ? valid :
                  (s->dirty[w] | todo_bits(s, first + w * 64)) & valid;
        visits += __builtin_popcountll(work[w]);
    }
    s->live.hash_skips += n - visits;
}

/*
 * A page the log saw written, that maps no slot and is no zero hole: a
 * visit would only restart its age (it is read when it proved stable),
 * so it needs no pagemap entry.  Reading those entries was most of what
 * a busy guest's passes cost: the kernel walks every mapping in the
 * span read, and each run of merged pages is a mapping of its own.
 */
static bool written_only(const MsScanner *s, size_t i)
{
    const PageState *p = &s->pg[i];

    return p->slot == MS_SLOT_NONE && !(p->flags & PG_ZERO) &&
           wait_of(s, p) > 0;
}

static void visit_written(MsScanner *s, size_t i)
{
    s->live.pages_scanned++;
    s->live.pages_dirty++;
    set_volatile(s, &s->pg[i], true);
    written(s, i);              /* age 0, below its wait: visit it again */
}

/* Visit the written_only() pages of @work now, and take them out of it */
static void visit_written_pages(MsScanner *s, size_t first, size_t n,
                                uint64_t *work)
{
    if (s->sweep) {
        return;
    }
    for (size_t w = 0; w < (n + 63) / 64; w++) {
        for (uint64_t bits = work[w] & s->dirty[w]; bits; bits &= bits - 1) {
            size_t k = w * 64 + __builtin_ctzll(bits);

            if (written_only(s, first + k)) {
                visit_written(s, first + k);
                work[w] &= ~(1ULL << (k % 64));
            }
        }
    }
}

/* The span [*lo, *hi) of the pages in @work; false if there are none */
static bool work_span(const uint64_t *work, size_t n, size_t *lo, size_t *hi)
{
    bool any = false;

    for (size_t w = 0; w < (n + 63) / 64; w++) {
        if (work[w]) {
            *hi = w * 64 + 64 - __builtin_clzll(work[w]);
            if (!any) {
                *lo = w * 64 + __builtin_ctzll(work[w]);
                any = true;
            }
        }
    }
    return any;
}

/*
 * Is the chunk of page @first swept in this pass?  Besides the whole
 * passes asked (or without a log), each pass sweeps the chunks whose
 * number is its own modulo MS_SCAN_SWEEP_EVERY: every page is read once
 * a round of that many passes, and each pass pays the same small share
 * of it.  Whole sweeps every so many passes cost a full read of the RAM
 * (and a group lookup of every page that missed) at once, a burst that
 * came to most of the CPU a quiet group of eight spent.
 */
static bool chunk_swept(const MsScanner *s, size_t first)
{
    /* Chunk c in the passes E - 1 - c (mod E): none early in a small one */
    return s->sweep_pass ||
           (first / CHUNK + s->live.full_scans + 1) % MS_SCAN_SWEEP_EVERY == 0;
}

static bool scan_chunk(MsScanner *s, size_t first, size_t n, GError **errp)
{
    uint64_t work[CHUNK / 64];
    size_t lo = 0, hi = 0;

    s->sweep = chunk_swept(s, first);
    if (s->sweep && !s->sweep_pass && group_usable(s)) {
        uint64_t *then = &s->sweep_news[first / CHUNK];

        /* 0: no turn yet on this connection, older than any news */
        s->sweep_quiet = *then && quiet_since(s, *then - 1, true);
        *then = news(s, true) + 1;
    }
    take_dirty(s, first, n);
    chunk_work(s, first, n, work);
    visit_written_pages(s, first, n, work);
    if (!work_span(work, n, &lo, &hi)) {
        return true;
    }
    s->pm_first = first + lo;
    if (!read_pagemap(s, first + lo, hi - lo, errp) ||
        !settle_merged(s, first + lo, hi - lo, errp)) {
        return false;
    }
    for (size_t w = lo / 64; w < (hi + 63) / 64; w++) {
        for (uint64_t bits = work[w]; bits; bits &= bits - 1) {
            size_t k = w * 64 + __builtin_ctzll(bits);

            if (!visit(s, first + k, s->pm[k - lo],
                       s->dirty[w] & (1ULL << (k % 64)), errp)) {
                drop_batches(s);
                return false;
            }
        }
    }
    if (!group_flush(s, errp) || !flush_all(s, errp)) {
        drop_batches(s);
        group_release(s);
        return false;
    }
    group_release(s);
    return true;
}

/*
 * Ask more stability while writes break what the last pass merged.
 * Without a log only: with one, each page learns its own wait.
 */
static void adapt_to_churn(MsScanner *s)
{
    uint64_t breaks = has_log(s) ? 0 : s->pass_breaks;

    if (breaks >= CHURN_MIN_BREAKS && breaks * 4 >= s->last_merges) {
        s->extra_scans = MIN(s->extra_scans + 1, MAX_EXTRA_SCANS);
    } else if (s->extra_scans &&
               (breaks < CHURN_MIN_BREAKS || breaks * 16 < s->last_merges)) {
        s->extra_scans--;
    }
    s->live.extra_scans = s->extra_scans;
    s->last_merges = s->pass_merges;
    s->pass_merges = s->pass_breaks = 0;
}

/*
 * A budget made of vm.max_map_count follows it: when the budget is spent,
 * QEMU tells the operator to raise the limit, and a running VM should
 * then merge what it had to leave, without a restart.  Reading the
 * sysctl costs a few microseconds a pass; the budget, which reads
 * /proc/self/maps, is made again only when the limit moved.  A lower
 * limit lowers the budget: merges stop, merged pages stay.
 */
static void follow_map_limit(MsScanner *s)
{
    int64_t limit;

    if (s->cfg.vma_budget > 0) {
        return;
    }
    limit = ms_max_map_count();
    if (limit != s->map_limit) {
        /*
         * With a log, the pages the old budget refused are not visited
         * again until a sweep: make the next pass one
         */
        if (s->map_limit > 0 && s->live.refused_budget) {
            s->sweep_asked = true;
        }
        s->map_limit = limit;
        ms_merger_set_budget(s->m,
                             ms_merger_default_budget(s->cfg.budget_share));
    }
}

static void end_full_scan(MsScanner *s)
{
    follow_map_limit(s);
    adapt_to_churn(s);
    s->sweeps += s->sweep_pass;
    s->live.full_scans++;
    s->sweep_pass = !has_log(s) || s->sweep_asked;
    s->sweep_asked = false;
    /* After the choice: a sweep visits every page, and asks anyway */
    take_answers(s);
    retries_due(s);
    s->blocked_vmas = -1;
}

bool ms_scanner_step(MsScanner *s, size_t max_pages, size_t *scanned,
                     GError **errp)
{
    size_t done = 0;
    bool ok = true;

    while (ok && done < max_pages) {
        /* A step stays inside one CHUNK-aligned chunk: see chunk_swept() */
        size_t n = MIN(MIN(CHUNK - s->cursor % CHUNK, s->npages - s->cursor),
                       max_pages - done);

        ok = scan_chunk(s, s->cursor, n, errp);
        if (ok) {
            done += n;
            s->cursor += n;
        }
        if (s->cursor == s->npages) {
            s->cursor = 0;
            end_full_scan(s);
            break;          /* the caller paces passes */
        }
        if (s->yield && s->yield(s->yield_opaque)) {
            break;
        }
    }
    publish_stats(s);
    if (scanned) {
        *scanned = done;
    }
    return ok;
}

/* ---- unmerging ---- */

/* Start over with a private page: it must prove stable again */
static void forget(MsScanner *s, size_t i)
{
    PageState *p = &s->pg[i];

    if (p->flags & PG_ZERO) {
        s->live.zero_holes--;
    }
    set_volatile(s, p, false);
    unstable_remove(s, i);
    p->flags &= PG_WAS_MERGED;
    p->since = s->live.full_scans;
    p->churn = 0;
    p->gmiss = 0;
    todo_set(s, i);
}

/* ---- a broker that came back ---- */

bool ms_scanner_set_group(MsScanner *s, MsBrokerClient *c, GError **errp)
{
    const MsBrokerParams *bp = ms_broker_client_params(c);
    uint8_t *view;
    uint32_t base;
    int fd;

    if (!s->group) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "the scanner was created without a group");
        return false;
    }
    if (!bp || !ms_broker_client_alive(c) || bp->page_size != s->page_size) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "the broker client is not a live member of a group of "
                    "%zu-byte pages", s->page_size);
        return false;
    }
    fd = fcntl(ms_broker_client_store_fd(c), F_DUPFD_CLOEXEC, 0);
    if (fd < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot use the group's store: %s", g_strerror(errno));
        return false;
    }
    view = mmap(NULL, (size_t)bp->nslots * s->page_size, PROT_READ,
                MAP_SHARED, fd, 0);
    if (view == MAP_FAILED) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot map the group's store: %s", g_strerror(errno));
        close(fd);
        return false;
    }
    if (!ms_merger_replace_second_store(s->m, s->base, fd, view, bp->nslots,
                                        &base, errp)) {
        munmap(view, (size_t)bp->nslots * s->page_size);
        close(fd);
        return false;
    }
    /* Pages on the old store keep it alive through their own mappings */
    munmap(s->gview, (size_t)s->gslots * s->page_size);
    close(s->gfd);
    s->gfd = fd;
    s->gview = view;
    s->gslots = bp->nslots;
    s->gbase = base;
    s->group = c;
    /* A new broker has a new key: our store keeps the one it has */
    s->gkey_same = ms_store_has_key(s->store, &bp->key);
    /*
     * References of the old connection died with its broker, or stay
     * with it until this process exits: never release them to this one
     */
    g_array_set_size(s->grel, 0);
    g_array_set_size(s->glook, 0);
    /* Its misses too: ask the new one about every page at once */
    for (size_t i = 0; i < s->npages; i++) {
        s->pg[i].gmiss = 0;
    }
    /* Its counters start again: nothing read from the old one compares */
    s->group_news = s->group_resets = 0;
    s->answers_probed = s->answers = false;
    memset(s->retry_news, 0, sizeof(s->retry_news));
    memset(s->sweep_news, 0, nchunks(s) * sizeof(*s->sweep_news));
    ms_scanner_sweep(s);
    s->live.group_lost = 0;
    s->live.group_rejoins++;
    publish_stats(s);
    return true;
}

bool ms_scanner_discard(MsScanner *s, void *host, size_t n, GError **errp)
{
    size_t first = ((uint8_t *)host - s->base) / s->page_size;

    if ((uint8_t *)host < s->base || (uintptr_t)host % s->page_size ||
        first >= s->npages || n > s->npages - first) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "%zu pages at %p are not inside the scanned region", n,
                    host);
        return false;
    }
    /* On failure the next scan finds out which pages still map the store */
    if (!ms_merge_discard(s->m, host, n, errp)) {
        return false;
    }
    for (size_t i = first; i < first + n; i++) {
        PageState *p = &s->pg[i];

        if (p->slot != MS_SLOT_NONE) {
            drop_slot(s, p);
        }
        forget(s, i);
    }
    group_release(s);
    publish_stats(s);
    return true;
}

bool ms_scanner_unmerge_all(MsScanner *s, GError **errp)
{
    g_autofree bool *shared = g_new(bool, s->npages);
    size_t nshared;
    bool ok;

    ok = ms_unmerge(s->m, s->base, s->npages, errp) &&
         ms_merge_test_shared(s->m, s->base, s->npages, shared, &nshared,
                              errp);
    for (size_t i = 0; ok && i < s->npages; i++) {
        PageState *p = &s->pg[i];

        /* Never drop the reference of a page that still maps its slot */
        if (p->slot != MS_SLOT_NONE && !shared[i]) {
            drop_slot(s, p);
        }
        if (p->slot == MS_SLOT_NONE) {
            forget(s, i);
        }
    }
    if (ok && nshared) {
        g_set_error(errp, MS_ENGINE_ERROR, EAGAIN,
                    "%zu pages still map the store after unmerging", nshared);
        ok = false;
    }
    unstable_clear(s);
    group_release(s);
    publish_stats(s);
    return ok;
}
