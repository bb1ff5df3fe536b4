/*
 * mem-share engine: the merge primitive (mode=user)
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Kernel KSM merges a page by taking the page table lock, checking that
 * nobody else holds a reference, write-protecting the PTE, comparing and
 * replacing the PTE.  From user space the page tables are out of reach,
 * but userfaultfd gives the one thing the protocol needs: a way to make
 * writers wait while the page is compared and replaced.
 *
 *   1. Freeze: UFFDIO_WRITEPROTECT the run.  Writers (vCPU threads,
 *      device emulation, and KVM's or the kernel's faults on QEMU's
 *      behalf, since the descriptor is not UFFD_USER_MODE_ONLY) now
 *      sleep in the kernel.
 *      Synchronous mode, not UFFD_FEATURE_WP_ASYNC: an asynchronous write
 *      between the compare and the replace would land in the old page and
 *      be lost.
 *   2. Check that every page really is frozen (bit 57 of pagemap): the
 *      kernel skips pages that were never populated unless
 *      UFFD_FEATURE_WP_UNPOPULATED (6.4) is on, and a write to such a
 *      page would not wait.  An unfrozen page counts as changed.
 *   3. Compare every page byte for byte with its store slot.  A hash
 *      match is never enough.
 *   4. Replace: mmap(MAP_PRIVATE | MAP_FIXED) of the store's read-only
 *      descriptor over the run.  The new VMA is not registered.  Re-apply
 *      the region's advice that matters to a page of a file (DONTFORK,
 *      DONTDUMP): a new VMA does not inherit it.  Not MADV_HUGEPAGE: a
 *      private copy in a file VMA is never a huge page, and khugepaged
 *      could otherwise collapse store pages into a huge page, filling
 *      the store's holes with memory.
 *   5. UFFDIO_WAKE the run: every writer that slept retries its fault,
 *      now on the new mapping, and takes a copy-on-write fault.  Nothing
 *      is lost.
 *
 * Failed remaps.  The mmap() of step 4 can fail for want of resources
 * (vm.max_map_count, RLIMIT_AS, the commit charge, a VMA allocation).
 * Kernels before 6.12 (the mmap_region() rework) unmap the old range
 * before some of these steps and return with a hole where the run was;
 * newer ones put the old VMAs back, except when they had cleared the old
 * page tables already, as before a file's mmap hook
 * (vms_abort_munmap_vmas() "leaves a gap").  Woken over a hole, a writer
 * would retry its fault on nothing, and QEMU die of SIGSEGV or KVM's
 * EFAULT later, with no word about why.  Yet the content of a frozen run
 * is known exactly: it was just compared equal to the slots (or to zero)
 * and nobody wrote since, so it is what the remap was to map (and a
 * discard was to leave zeros).  The invariant: a failed step of a merge
 * leaves every page with exactly its content, or the process stops with
 * an error that says why; it never carries on over a hole.  So after a
 * failure, mincore() (ENOMEM where nothing is mapped) tells whether the
 * run is intact; if not, that content is mapped back as anonymous memory
 * before anyone is woken: zeros by an mmap() into the hole, store content
 * copied into a temporary mapping first and moved into the hole in one
 * step by mremap(), so that no thread sees it half filled.  It gets the
 * region's advice, the registration of anonymous memory and the label
 * ANON.  If even that fails, ms_fatal() stops the process, saying why.
 * A failure for want of resources is then a refusal, MS_MERGE_NO_MEMORY,
 * not an error: the scanner carries on and tries again later.  One window
 * stays on the older kernels: a thread that touches the run between the
 * failed mmap() and the restore, not asleep in the freeze already, faults
 * on nothing.  Tests: test-merge's fault injection.
 *
 * Registration.  The anonymous memory of a region is registered for
 * write-protection once, when the region is added, and every anonymous
 * VMA the engine creates later is registered too: a freeze of anonymous
 * pages is then one ioctl, and anonymous neighbours keep the same flags
 * and stay one VMA.  Store VMAs are not registered (they must join their
 * neighbours on the store); a run that maps the store, to be merged
 * again after a copy-on-write break, is registered for its freeze only.
 * If a page differs, un-write-protect (which wakes), and unregister what
 * the freeze registered.  No path leaves a page write-protected or a
 * store VMA registered.  Syscalls are what a merge costs most (measured
 * here, in a nested guest: 5 to 8 us each), hence also PROCMAP_QUERY
 * only for bridges, below.  We never read the
 * descriptor: waking by range also wakes faults whose message is still
 * queued, and without UFFD_FEATURE_EVENT_UNMAP (never enabled) an
 * mmap(MAP_FIXED) over a registered range does not wait for a reader.
 *
 * Zero pages become holes the same way, with MADV_DONTNEED on anonymous
 * pages (never a whole huge-page range in one call: see discard_anon());
 * a page that maps the store gets fresh anonymous memory instead,
 * since MADV_DONTNEED there would bring the store content back.  The
 * invariant: zero merges and discards never MADV_DONTNEED a page that is
 * not private anonymous memory, and what the merger believes about a
 * range comes from the real mappings (see "Labels from the mappings"):
 * a VMA that maps a file when the region is added (an earlier run's
 * store mappings) is labelled FOREIGN, never a slot, treated like a store
 * VMA by zero merges, discards, freezes and the VMA model, and, like
 * them, registered only while frozen.
 *
 * Unmerging.  A copy-on-write fault makes a page private but leaves it
 * in the store's VMA, where MADV_DONTNEED (anyone's: a later merger's, a
 * balloon's) brings the store file's current content back: for a
 * group's store, whatever the broker put in the slot since.  So an
 * unmerge freezes each run of pages that map a file (whole VMAs, up to
 * 2 MiB), copies it into a fresh anonymous mapping, checks that every
 * page stayed frozen and none is mapped for DMA, and moves the copy over
 * the run with mremap(MREMAP_FIXED): one step, so a writer either slept
 * through it and retries on the copy after the wake, or comes after and
 * finds the copy.  The moved VMA keeps its own anon_vma and page offset
 * and never joins its anonymous neighbours: an unmerge leaves as many
 * VMAs as the store mappings it replaces, or fewer (neighbouring store
 * VMAs become one), and one more for a moment (the copy).  Where that
 * cannot be done (no memory for the copy, a page mapped for DMA, a
 * refused mremap that left the run intact) the pages take their
 * copy-on-write faults as before; a mremap that left a hole gets the
 * copy moved in again (see "Failed remaps").
 *
 * DMA.  Write-protection stops writers that go through the page tables,
 * not a transfer that already holds the page: QEMU's zero-copy I/O
 * (address_space_map(), then O_DIRECT preadv, io_uring or linux-aio into
 * guest RAM) has the kernel pin the page when the request is submitted
 * (GUP), and the device writes the pinned page when it completes.  A
 * merge in between would map the store over the address, and the
 * transfer would land in the orphaned old page: a lost write.  Kernel KSM
 * sees the pin (a reference count above the map count); from user space
 * only the VMM knows, so its owner gives the merger a counter per page
 * (ms_merger_set_dma_pins()) that is not zero while a mapping for DMA
 * covers the page, and a merge skips such pages (counted as changed, and
 * as pinned).  It is a Dekker pattern between the mapper and the merge:
 *
 *   mapper:  count++; full barrier; submit (the kernel pins the page)
 *   merge:   freeze (UFFDIO_WRITEPROTECT); full barrier; read count;
 *            compare; replace; wake
 *
 * If the merge reads a count of zero, either the mapping came later: its
 * increment follows our read, so its GUP follows the freeze, finds the
 * page write-protected (GUP for a write never pins a write-protected
 * page: it takes a write fault), sleeps in the userfaultfd until the
 * wake and then pins the new page, a private copy-on-write copy of the
 * store page, into which the transfer lands.  Or the mapping was
 * unmapped before our read: QEMU unmaps after the transfer completed, so
 * its data is in the page before we compare, and the compare sees it.
 * Hence the order: the count is read after the freeze and before the
 * compare.  Read after the compare, a transfer could complete and unmap
 * between the two, and the merge would replace its data with the stale
 * content it compared.  Read-only DMA (a device reading guest memory)
 * pins too; its pages are skipped as well, which costs little and keeps
 * the orphaned pages from staying allocated until the transfer ends.
 *
 * VMAs.  Mapping an isolated page onto the store splits the anonymous
 * VMA: +2; a page that extends a run mapped onto the adjacent store
 * offsets joins its VMA: 0; one that bridges two such runs: -2.  A
 * process has vm.max_map_count VMAs, and at the limit even a MAP_FIXED
 * that would lower the count fails with ENOMEM, so the engine keeps a
 * model of its regions: per page, the store slot its VMA maps (or
 * anonymous).  Two neighbouring pages share a VMA when both are
 * anonymous or they map consecutive slots; the change in VMAs of an
 * operation is the change in such breaks at its edges and inside, and
 * freezing costs up to two more for a moment (registering part of a VMA
 * splits it).  A merge that would take the count above the caller's
 * budget is refused before anything is touched.  The kernel refuses to
 * join both neighbours at once when both hold private copies of
 * different origin (different anon_vma): the budget check assumes it
 * will, and afterwards PROCMAP_QUERY (Linux 6.11) tells what the kernel
 * did; the model records such a boundary per page ("forced").  A join
 * on one side only is never refused (the new VMA has no anonymous pages
 * yet), so only bridges are asked about.  Without
 * PROCMAP_QUERY the model stays pessimistic.
 *
 * Which merged pages were written since: bit 61 ("file page") of
 * /proc/self/pagemap, or the PAGEMAP_SCAN ioctl (6.7) for a whole run in
 * one call where its PAGE_IS_FILE works (probed).
 * Bit 56 (exclusive) cannot tell.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE     /* QEMU defines it on its command line */
#endif
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/userfaultfd.h>
#include <linux/fs.h>

#include "mem-share/hash.h"
#include "mem-share/merge.h"
#include "mem-share/ksm.h"

/* Newer than Debian 12's uapi headers: probed at run time */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#ifndef PAGEMAP_SCAN
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)

struct page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};
#endif

#ifndef PROCMAP_QUERY
/* Linux 6.11: ask /proc/self/maps for the VMA around an address */
struct procmap_query {
    uint64_t size;
    uint64_t query_flags;
    uint64_t query_addr;
    uint64_t vma_start;
    uint64_t vma_end;
    uint64_t vma_flags;
    uint64_t vma_page_size;
    uint64_t vma_offset;
    uint64_t inode;
    uint32_t dev_major;
    uint32_t dev_minor;
    uint32_t vma_name_size;
    uint32_t build_id_size;
    uint64_t vma_name_addr;
    uint64_t build_id_addr;
};
#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#endif

/* /proc/self/pagemap (Documentation/admin-guide/mm/pagemap.rst) */
#define PM_PRESENT      (1ULL << 63)
#define PM_SWAP         (1ULL << 62)
#define PM_FILE         (1ULL << 61)
#define PM_UFFD_WP      (1ULL << 57)

#define ANON            UINT32_MAX  /* label of a page in an anonymous VMA */
/*
 * Label of a page in a VMA that maps a file the merger did not map (see
 * "Labels from the mappings"): never a slot, joins only its own kind
 */
#define FOREIGN         (UINT32_MAX - 1)
#define PAGEMAP_BATCH   512
#define SCAN_VEC        64

typedef struct Region {
    uint8_t *base;
    size_t npages;
    unsigned flags;
    MsMergeStore store;
    uint32_t *label;        /* per page: slot its VMA maps, or ANON */
    uint8_t *forced;        /* per page: a VMA starts here, whatever labels */
    /*
     * The second store's slots are numbered from base2.  A second store
     * that was replaced (a broker that came back with a new store) keeps
     * its numbers for the pages that still map it: they never join a
     * page of another store.  Numbers no page uses any more are given to
     * later stores, so that a VM that rejoins for years never runs out.
     */
    uint32_t base2;
    GArray *old;            /* StoreRange: replaced stores still mapped */
    const uint32_t *pins;   /* per page: DMA mappings (see "DMA"), or NULL */
} Region;

struct MsMerger {
    int uffd;
    int pagemap_fd;
    int maps_fd;            /* /proc/self/maps, for PROCMAP_QUERY */
    size_t page_size;
    size_t huge_size;       /* of a PMD-mapped huge page; 0: no THP */
    uint64_t features;
    bool has_pagemap_scan;
    bool use_pagemap_scan;
    GPtrArray *regions;
    int64_t vmas;
    int64_t budget;
    /* ms_merger_inject_remap_failure(), for tests */
    int inject_err;
    bool inject_hole;
    void (*inject_frozen)(void *opaque);
    void *inject_opaque;
};

/*
 * The VMAs every merger of the process adds: vm.max_map_count limits a
 * process, not a merger, so two mem-share objects (boot RAM and a DIMM
 * plugged later) spend one budget between them.  Each merger's own count
 * is its statistic; the budget is checked against this sum.
 */
static int64_t process_vmas;

static void count_vmas(MsMerger *m, int64_t delta)
{
    m->vmas += delta;
    __atomic_add_fetch(&process_vmas, delta, __ATOMIC_RELAXED);
}

/*
 * Would @cost more VMAs stay within @m's budget?  Two scanner threads may
 * both pass before either adds its VMAs; the overshoot is one batch each,
 * and the budget's headroom below vm.max_map_count is far larger.
 */
static bool within_budget(const MsMerger *m, int64_t cost)
{
    return __atomic_load_n(&process_vmas, __ATOMIC_RELAXED) + cost <=
           m->budget;
}

/* The slot numbers of a replaced second store */
typedef struct StoreRange {
    uint32_t start;
    uint32_t n;
} StoreRange;

/* A run of pages inside one region */
typedef struct Run {
    Region *r;
    size_t first;           /* page index in the region */
    size_t n;
    uint8_t *host;
    size_t len;
} Run;

static void region_free(gpointer p)
{
    Region *r = p;

    g_free(r->label);
    g_free(r->forced);
    if (r->old) {
        g_array_free(r->old, true);
    }
    g_free(r);
}

/* ---- userfaultfd ---- */

static int uffd_open(void)
{
    int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    int dev;

    if (fd >= 0) {
        return fd;
    }
    /* Without CAP_SYS_PTRACE: /dev/userfaultfd (Linux 6.1) if allowed */
    dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) {
        return -1;
    }
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    close(dev);
    return fd;
}

static void set_uffd_error(GError **errp, int err, const char *what)
{
    g_set_error(errp, MS_ENGINE_ERROR, err,
                "mode=user needs userfaultfd with write-protection of "
                "anonymous memory: %s (%s); grant CAP_SYS_PTRACE (or run "
                "as root), read-write access to /dev/userfaultfd, or set "
                "vm.unprivileged_userfaultfd=1, on a kernel with "
                "CONFIG_HAVE_ARCH_USERFAULTFD_WP (x86_64 and arm64, "
                "Linux 5.7 or later)", what, g_strerror(err));
}

/* Features the kernel offers: UFFDIO_API may be called once per fd */
static bool uffd_probe(uint64_t *features, GError **errp)
{
    struct uffdio_api api = { .api = UFFD_API };
    int fd = uffd_open();

    if (fd < 0) {
        set_uffd_error(errp, errno, "cannot open a userfaultfd");
        return false;
    }
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        set_uffd_error(errp, errno, "UFFDIO_API failed");
        close(fd);
        return false;
    }
    close(fd);
    *features = api.features;
    return true;
}

static bool uffd_init(MsMerger *m, GError **errp)
{
    struct uffdio_api api = { .api = UFFD_API };
    uint64_t offered;

    if (!uffd_probe(&offered, errp)) {
        return false;
    }
    if (!(offered & UFFD_FEATURE_PAGEFAULT_FLAG_WP)) {
        set_uffd_error(errp, ENOTSUP, "UFFD_FEATURE_PAGEFAULT_FLAG_WP is "
                       "missing");
        return false;
    }
    /* Not EVENT_UNMAP: mmap(MAP_FIXED) over the range would wait for us */
    api.features = UFFD_FEATURE_PAGEFAULT_FLAG_WP |
                   (offered & UFFD_FEATURE_WP_UNPOPULATED);
    m->uffd = uffd_open();
    if (m->uffd < 0) {
        set_uffd_error(errp, errno, "cannot open a userfaultfd");
        return false;
    }
    if (ioctl(m->uffd, UFFDIO_API, &api) < 0) {
        set_uffd_error(errp, errno, "UFFDIO_API failed");
        return false;
    }
    m->features = api.features;
    return true;
}

static int uffd_register_range(MsMerger *m, void *host, size_t len)
{
    struct uffdio_register reg = {
        .range = { .start = (uintptr_t)host, .len = len },
        .mode = UFFDIO_REGISTER_MODE_WP,
    };

    if (ioctl(m->uffd, UFFDIO_REGISTER, &reg) < 0) {
        return -errno;
    }
    if (!(reg.ioctls & (1ULL << _UFFDIO_WRITEPROTECT))) {
        return -ENOTSUP;
    }
    return 0;
}

static int uffd_register(MsMerger *m, const Run *run)
{
    return uffd_register_range(m, run->host, run->len);
}

static int uffd_writeprotect(MsMerger *m, const Run *run, bool wp)
{
    struct uffdio_writeprotect w = {
        .range = { .start = (uintptr_t)run->host, .len = run->len },
        .mode = wp ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };

    return ioctl(m->uffd, UFFDIO_WRITEPROTECT, &w) < 0 ? -errno : 0;
}

static void uffd_wake(MsMerger *m, const Run *run)
{
    struct uffdio_range r = { .start = (uintptr_t)run->host, .len = run->len };

    /* Cannot fail on a valid range; writers would sleep forever if it did */
    if (ioctl(m->uffd, UFFDIO_WAKE, &r) < 0) {
        g_error("mem-share: UFFDIO_WAKE failed: %s", g_strerror(errno));
    }
}

static bool run_maps_store(const Run *run);

/* Unregister the pages of @run that map the store (see freeze()) */
static void unregister_store_parts(MsMerger *m, const Run *run)
{
    const uint32_t *label = run->r->label + run->first;

    for (size_t a = 0, b; a < run->n; a = b + 1) {
        struct uffdio_range r;

        for (; a < run->n && label[a] == ANON; a++) {
            /* anonymous: registered for good */
        }
        for (b = a; b < run->n && label[b] != ANON; b++) {
            /* the store part [a, b) */
        }
        if (b > a) {
            r.start = (uintptr_t)(run->host + a * m->page_size);
            r.len = (b - a) * m->page_size;
            ioctl(m->uffd, UFFDIO_UNREGISTER, &r);
        }
    }
}

/*
 * Thaw a frozen run that stays as it is: clearing write-protection wakes
 * the sleepers, unregistering the store parts wakes any that came in
 * between, and so does the final wake.
 */
static void unfreeze(MsMerger *m, const Run *run)
{
    uffd_writeprotect(m, run, false);
    if (run_maps_store(run)) {
        unregister_store_parts(m, run);
    }
}

static void thaw(MsMerger *m, const Run *run)
{
    unfreeze(m, run);
    uffd_wake(m, run);
}

/* Anonymous pages are registered already; store VMAs for this freeze */
static bool freeze(MsMerger *m, const Run *run, GError **errp)
{
    int ret = run_maps_store(run) ? uffd_register(m, run) : 0;

    if (ret == 0) {
        ret = uffd_writeprotect(m, run, true);
    }
    if (ret < 0) {
        /* Registration may have reached part of the range */
        thaw(m, run);
        g_set_error(errp, MS_ENGINE_ERROR, -ret,
                    "cannot write-protect %zu pages at %p: %s", run->n,
                    run->host, g_strerror(-ret));
        return false;
    }
    return true;
}

/* ---- pagemap ---- */

static bool read_pagemap(MsMerger *m, const void *host, size_t n,
                         uint64_t *entries, GError **errp)
{
    return ms_pagemap_read(m->pagemap_fd, host, n, m->page_size, entries,
                           errp);
}

/*
 * PAGEMAP_SCAN exists since 6.7: try it on a private mapping of a memfd
 * page, which must say PAGE_IS_FILE as pagemap's bit 61 does, and use the
 * ioctl only if it does.
 */
static bool probe_pagemap_scan(MsMerger *m)
{
    struct page_region vec[1] = { { 0 } };
    struct pm_scan_arg arg = {
        .size = sizeof(arg),
        .vec = (uintptr_t)vec,
        .vec_len = 1,
        .return_mask = PAGE_IS_PRESENT | PAGE_IS_FILE,
    };
    int fd = memfd_create("mem-share-probe", MFD_CLOEXEC);
    bool works = false;
    uint8_t *p = MAP_FAILED;

    if (fd >= 0 && pwrite(fd, "x", 1, 0) == 1) {
        p = mmap(NULL, m->page_size, PROT_READ, MAP_PRIVATE, fd, 0);
    }
    if (p != MAP_FAILED) {
        /* volatile: the read must happen, to map the page */
        *(volatile uint8_t *)p;
        arg.start = (uintptr_t)p;
        arg.end = arg.start + m->page_size;
        works = ioctl(m->pagemap_fd, PAGEMAP_SCAN, &arg) == 1 &&
                (vec[0].categories & PAGE_IS_FILE);
        munmap(p, m->page_size);
    }
    if (fd >= 0) {
        close(fd);
    }
    return works;
}

/* ---- regions and the VMA model ---- */

static Region *find_region(const MsMerger *m, const void *host)
{
    for (guint i = 0; i < m->regions->len; i++) {
        Region *r = g_ptr_array_index(m->regions, i);

        if ((const uint8_t *)host >= r->base &&
            (const uint8_t *)host < r->base + r->npages * m->page_size) {
            return r;
        }
    }
    return NULL;
}

static bool get_run(MsMerger *m, void *host, size_t n, Run *run,
                    GError **errp)
{
    Region *r = find_region(m, host);
    size_t first;

    if (!r || (uintptr_t)host % m->page_size || n == 0) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "%p is not a page of a mem-share region", host);
        return false;
    }
    first = ((uint8_t *)host - r->base) / m->page_size;
    if (n > r->npages - first) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "%zu pages at %p go past the end of their region", n,
                    host);
        return false;
    }
    *run = (Run) { .r = r, .first = first, .n = n, .host = host,
                   .len = n * m->page_size };
    return true;
}

/*
 * Do pages labelled @a then @b (neighbours, in this order) share a VMA?
 * Not across the boundary between the two stores: different files.
 */
static bool store_start(const Region *r, uint32_t slot)
{
    if (slot == r->store.nslots || slot == r->base2) {
        return true;
    }
    for (guint i = 0; r->old && i < r->old->len; i++) {
        if (g_array_index(r->old, StoreRange, i).start == slot) {
            return true;
        }
    }
    return false;
}

static bool joined(const Region *r, uint32_t a, uint32_t b)
{
    if (a == ANON || a == FOREIGN || b == ANON || b == FOREIGN) {
        return a == b;
    }
    return b == a + 1 && !store_start(r, b);
}

/* Is [@first, @first + @n) a valid run of slots of one store of @r? */
static bool slots_valid(const Region *r, uint32_t first, size_t n)
{
    uint64_t end = (uint64_t)first + n;

    if (end <= r->store.nslots) {
        return true;
    }
    return first >= r->base2 && end <= (uint64_t)r->base2 + r->store.nslots2;
}

/* Label of page @i of the run after relabelling it from @first_slot */
static uint32_t new_label(uint32_t first_slot, size_t i)
{
    return first_slot == ANON ? ANON : first_slot + i;
}

/* VMA boundaries inside region @r at page boundaries [from, to] */
static int breaks(const Region *r, size_t from, size_t to)
{
    int count = 0;

    for (size_t i = MAX(from, 1); i <= MIN(to, r->npages - 1); i++) {
        count += r->forced[i] || !joined(r, r->label[i - 1], r->label[i]);
    }
    return count;
}

/*
 * VMAs that mapping @run uniformly from @first_slot (ANON: fresh anonymous
 * memory) adds at most, and adds for a moment when registering it
 * (@peak).  Joining both neighbours at once may be refused by the kernel
 * (their anonymous pages came from different sources): count one more.
 */
static int vma_delta(const Run *run, uint32_t first_slot, int *peak)
{
    const Region *r = run->r;
    size_t s = run->first, e = run->first + run->n;
    int before = breaks(r, s, e), after = 0, splits = 0, joins = 0;

    if (s > 0) {
        after += !joined(r, r->label[s - 1], new_label(first_slot, 0));
        joins += joined(r, r->label[s - 1], new_label(first_slot, 0));
        splits += !r->forced[s] && joined(r, r->label[s - 1], r->label[s]);
    }
    if (e < r->npages) {
        after += !joined(r, new_label(first_slot, run->n - 1), r->label[e]);
        joins += joined(r, new_label(first_slot, run->n - 1), r->label[e]);
        splits += !r->forced[e] && joined(r, r->label[e - 1], r->label[e]);
    }
    after += joins == 2;
    if (peak) {
        *peak = MAX(splits, after - before);
    }
    return after - before;
}

/* The VMA around @addr, from PROCMAP_QUERY; false if unknown */
static bool query_vma(MsMerger *m, const void *addr, uintptr_t *start,
                      uintptr_t *end)
{
    struct procmap_query q = {
        .size = sizeof(q),
        .query_addr = (uintptr_t)addr,
    };

    if (m->maps_fd < 0 || ioctl(m->maps_fd, PROCMAP_QUERY, &q) < 0) {
        return false;
    }
    *start = q.vma_start;
    *end = q.vma_end;
    return true;
}

/*
 * After @run was mapped anew from @first_slot: record its labels, and at
 * its edges whether the kernel really joined the neighbours (asked with
 * PROCMAP_QUERY, Linux 6.11; else assume a bridge joined one side only).
 * Returns the change in VMAs.
 */
static int relabel(MsMerger *m, const Run *run, uint32_t first_slot)
{
    Region *r = run->r;
    size_t s = run->first, e = run->first + run->n;
    int before = breaks(r, s, e), after;
    uintptr_t vs, ve;
    bool known, left, right;

    for (size_t i = 0; i < run->n; i++) {
        r->label[s + i] = new_label(first_slot, i);
        r->forced[s + i] = false;
    }
    left = s > 0 && joined(r, r->label[s - 1], r->label[s]);
    right = e < r->npages && joined(r, r->label[e - 1], r->label[e]);
    /* Only a bridge may be refused: ask the kernel then only */
    known = left && right && query_vma(m, run->host, &vs, &ve);
    if (known) {
        r->forced[s] = left && vs == (uintptr_t)run->host;
        if (e < r->npages) {
            r->forced[e] = right && ve == (uintptr_t)run->host + run->len;
        }
    } else if (e < r->npages) {
        r->forced[e] = left && right;
    }
    after = breaks(r, s, e);
    count_vmas(m, after - before);
    return after - before;
}

/* Does some page of @run map a file (a store, or FOREIGN)? */
static bool run_maps_store(const Run *run)
{
    for (size_t i = 0; i < run->n; i++) {
        if (run->r->label[run->first + i] != ANON) {
            return true;
        }
    }
    return false;
}

/* ---- life cycle ---- */

size_t ms_thp_pmd_size(void)
{
    g_autofree char *text = NULL;
    guint64 size;

    if (!g_file_get_contents("/sys/kernel/mm/transparent_hugepage/"
                             "hpage_pmd_size", &text, NULL, NULL) ||
        !g_ascii_string_to_unsigned(g_strstrip(text), 10, 1, G_MAXSIZE,
                                    &size, NULL)) {
        return 0;
    }
    return size;
}

MsMerger *ms_merger_new(GError **errp)
{
    g_autoptr(MsMerger) m = g_new0(MsMerger, 1);

    m->uffd = m->pagemap_fd = m->maps_fd = -1;
    m->page_size = ms_host_page_size();
    m->huge_size = ms_thp_pmd_size();
    m->regions = g_ptr_array_new_with_free_func(region_free);
    m->budget = ms_merger_default_budget(0.5);
    if (!uffd_init(m, errp)) {
        return NULL;
    }
    m->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (m->pagemap_fd < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot open /proc/self/pagemap: %s", g_strerror(errno));
        return NULL;
    }
    m->has_pagemap_scan = m->use_pagemap_scan = probe_pagemap_scan(m);
    m->maps_fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    return g_steal_pointer(&m);
}

void ms_merger_free(MsMerger *m)
{
    if (!m) {
        return;
    }
    /* Whatever it still maps is no longer the engine's to count */
    count_vmas(m, -m->vmas);
    if (m->uffd >= 0) {
        close(m->uffd);
    }
    if (m->pagemap_fd >= 0) {
        close(m->pagemap_fd);
    }
    if (m->maps_fd >= 0) {
        close(m->maps_fd);
    }
    g_ptr_array_unref(m->regions);
    g_free(m);
}

/*
 * Labels from the mappings.  A region is not always fresh anonymous
 * memory: a mode=user run that stopped leaves the VMAs it mapped from a
 * store in place (the private copies of what it merged, and pages it
 * never wrote, still map the file).  MADV_DONTNEED on such a page brings
 * back the file's content at that offset: zeros for a freed slot of a
 * local store, but whatever the broker put in a group's slot since.  So
 * what the merger believes comes from /proc/self/maps: pages of a VMA
 * that maps a file get the label FOREIGN, which makes zero merges and
 * discards map fresh anonymous memory there, and every VMA start is a
 * boundary in the model.
 */
static bool label_from_maps(MsMerger *m, Region *r, GError **errp)
{
    g_autofree char *text = NULL;
    g_autoptr(GError) err = NULL;
    uintptr_t lo = (uintptr_t)r->base, hi = lo + r->npages * m->page_size;
    char *line, *next;

    if (!g_file_get_contents("/proc/self/maps", &text, NULL, &err)) {
        g_set_error(errp, MS_ENGINE_ERROR, EIO,
                    "cannot learn the mappings of %p+%zu pages: %s",
                    r->base, r->npages, err->message);
        return false;
    }
    for (size_t i = 0; i < r->npages; i++) {
        r->label[i] = ANON;
        r->forced[i] = 0;
    }
    for (line = text; line && *line; line = next) {
        unsigned long start, end, inode;
        size_t first, last;

        next = strchr(line, '\n');
        if (next) {
            *next++ = '\0';
        }
        if (sscanf(line, "%lx-%lx %*s %*s %*s %lu", &start, &end,
                   &inode) != 3 || end <= lo || start >= hi) {
            continue;
        }
        first = (MAX(start, lo) - lo) / m->page_size;
        last = (MIN(end, hi) - lo) / m->page_size;
        if (start > lo) {
            r->forced[first] = 1;
        }
        for (size_t i = first; inode && i < last; i++) {
            r->label[i] = FOREIGN;
        }
    }
    return true;
}

/*
 * The registration of the whole region reached the VMAs that map a file
 * too.  Like the store VMAs the merger maps, they must be registered only
 * while frozen (see "Registration"): a thaw unregisters the frozen pages
 * only, and would split such a VMA for good.  Returns whether there were
 * any: unregistering may let the kernel join VMAs, so learn them again.
 */
static bool unregister_foreign(MsMerger *m, Region *r)
{
    Run all = { .r = r, .first = 0, .n = r->npages, .host = r->base,
                .len = r->npages * m->page_size };

    if (!run_maps_store(&all)) {
        return false;
    }
    unregister_store_parts(m, &all);
    return true;
}

/* Undo the registration of a region that could not be added */
static void forget_new_region(MsMerger *m, Region *r)
{
    struct uffdio_range range = {
        .start = (uintptr_t)r->base,
        .len = r->npages * m->page_size,
    };

    ioctl(m->uffd, UFFDIO_UNREGISTER, &range);
    region_free(r);
}

bool ms_merger_add_region(MsMerger *m, void *host, size_t npages,
                          unsigned flags, const MsMergeStore *store,
                          GError **errp)
{
    Region *r;
    int ret;

    if ((uintptr_t)host % m->page_size || npages == 0 ||
        find_region(m, host) ||
        find_region(m, (uint8_t *)host + npages * m->page_size - 1)) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "invalid or overlapping mem-share region %p+%zu pages",
                    host, npages);
        return false;
    }
    ret = uffd_register_range(m, host, npages * m->page_size);
    if (ret < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, -ret,
                    "cannot register %zu pages at %p with userfaultfd%s: %s",
                    npages, host, ret == -EBUSY ?
                    " (another userfaultfd, postcopy or a background "
                    "snapshot, holds them)" : "", g_strerror(-ret));
        return false;
    }
    r = g_new0(Region, 1);
    r->base = host;
    r->npages = npages;
    r->flags = flags;
    r->store = *store;
    r->label = g_new(uint32_t, npages);
    r->forced = g_new0(uint8_t, npages);
    r->base2 = store->nslots;
    if (!label_from_maps(m, r, errp) ||
        (unregister_foreign(m, r) && !label_from_maps(m, r, errp))) {
        forget_new_region(m, r);
        return false;
    }
    count_vmas(m, breaks(r, 0, r->npages));
    g_ptr_array_add(m->regions, r);
    return true;
}

/* Does any page of @r map a slot of @range? */
static bool range_mapped(const Region *r, StoreRange range)
{
    for (size_t i = 0; i < r->npages; i++) {
        if (r->label[i] != ANON && r->label[i] >= range.start &&
            r->label[i] - range.start < range.n) {
            return true;
        }
    }
    return false;
}

/* Keep the replaced stores that pages still map; forget the others */
static void prune_old_stores(Region *r)
{
    for (guint i = r->old->len; i-- > 0; ) {
        if (!range_mapped(r, g_array_index(r->old, StoreRange, i))) {
            g_array_remove_index_fast(r->old, i);
        }
    }
}

/*
 * The lowest number from which @n slot numbers overlap neither the first
 * store nor a replaced store still mapped, or MS_MERGE_ZERO if none
 */
static uint32_t free_numbers(const Region *r, uint32_t n)
{
    uint64_t base = r->store.nslots;
    bool moved = true;

    while (moved) {
        moved = false;
        for (guint i = 0; i < r->old->len; i++) {
            StoreRange o = g_array_index(r->old, StoreRange, i);

            if (base < (uint64_t)o.start + o.n && o.start < base + n) {
                base = (uint64_t)o.start + o.n;
                moved = true;
            }
        }
    }
    return base + n < MS_MERGE_ZERO ? base : MS_MERGE_ZERO;
}

bool ms_merger_replace_second_store(MsMerger *m, void *host, int fd,
                                    const void *view, uint32_t nslots,
                                    uint32_t *base, GError **errp)
{
    Region *r = find_region(m, host);
    StoreRange cur;
    uint32_t next;

    if (!r || r->base != host) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "%p does not start a mem-share region", host);
        return false;
    }
    if (!r->old) {
        r->old = g_array_new(false, false, sizeof(StoreRange));
    }
    cur = (StoreRange) { r->base2, r->store.nslots2 };
    if (cur.n) {
        g_array_append_val(r->old, cur);
    }
    prune_old_stores(r);
    next = free_numbers(r, nslots);
    if (next == MS_MERGE_ZERO) {
        g_set_error(errp, MS_ENGINE_ERROR, ENOSPC,
                    "no slot numbers left for another store of %u slots:"
                    " %u replaced stores are still mapped", nslots,
                    r->old->len);
        return false;
    }
    r->base2 = next;
    r->store.fd2 = fd;
    r->store.view2 = view;
    r->store.nslots2 = nslots;
    *base = r->base2;
    return true;
}

bool ms_merger_set_dma_pins(MsMerger *m, void *host, const uint32_t *pins,
                            GError **errp)
{
    Region *r = find_region(m, host);

    if (!r || r->base != host) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "%p does not start a mem-share region", host);
        return false;
    }
    r->pins = pins;
    return true;
}

void ms_merger_remove_region(MsMerger *m, void *host)
{
    for (guint i = 0; i < m->regions->len; i++) {
        Region *r = g_ptr_array_index(m->regions, i);

        if (r->base == host) {
            struct uffdio_range range = {
                .start = (uintptr_t)host,
                .len = r->npages * m->page_size,
            };

            /* Its VMAs go away with the RAM, if they have not already */
            ioctl(m->uffd, UFFDIO_UNREGISTER, &range);
            count_vmas(m, -(int64_t)breaks(r, 0, r->npages));
            g_ptr_array_remove_index_fast(m->regions, i);
            return;
        }
    }
}

void ms_merger_set_budget(MsMerger *m, int64_t budget)
{
    m->budget = budget;
}

int64_t ms_merger_budget(const MsMerger *m)
{
    return m->budget;
}

int64_t ms_merger_vmas(const MsMerger *m)
{
    return m->vmas;
}

int64_t ms_merger_process_vmas(void)
{
    return __atomic_load_n(&process_vmas, __ATOMIC_RELAXED);
}

int64_t ms_max_map_count(void)
{
    g_autofree char *text = NULL;
    int64_t max = 0;

    if (g_file_get_contents("/proc/sys/vm/max_map_count", &text, NULL, NULL)) {
        max = g_ascii_strtoll(text, NULL, 10);
    }
    /* The kernel's default, should the sysctl be unreadable */
    return max > 0 ? max : 65530;
}

int64_t ms_merger_default_budget(double share)
{
    g_autofree char *text = NULL;
    int64_t max = ms_max_map_count(), used = 0;

    if (g_file_get_contents("/proc/self/maps", &text, NULL, NULL)) {
        for (const char *p = text; *p; p++) {
            used += *p == '\n';
        }
    }
    /* The mergers' own VMAs are in @used, but the budget counts them */
    used = MAX(used - ms_merger_process_vmas(), 0);
    return MAX((int64_t)(max * share) - used, 0);
}

size_t ms_merger_huge_size(const MsMerger *m, const void *host)
{
    const Region *r = find_region(m, host);

    return r && !(r->flags & MS_REGION_NOHUGEPAGE) ? m->huge_size : 0;
}

uint32_t ms_merger_slot_at(const MsMerger *m, const void *host)
{
    const Region *r = find_region(m, host);

    uint32_t label;

    if (!r) {
        return ANON;
    }
    label = r->label[((const uint8_t *)host - r->base) / m->page_size];
    return label == FOREIGN ? ANON : label;
}

/*
 * A read fault on never-written private anonymous memory maps the shared
 * zero page on most kernels: present, neither exclusive nor a file page
 * in pagemap (the PFN, hidden without CAP_SYS_ADMIN, is not needed).
 * Some kernels allocate a page instead (no zero page, or small
 * multi-size THP); then the page is exclusively ours.
 */
#define PM_EXCLUSIVE    (1ULL << 56)

bool ms_read_fault_maps_zero_page(void)
{
    static int answer = -1;
    size_t ps = ms_host_page_size();
    uint64_t e = 0;
    /* volatile: the probe's read fault is the point, it must happen */
    volatile uint8_t *p;
    int fd;

    if (answer >= 0) {
        return answer;
    }
    p = mmap(NULL, ps, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (p == MAP_FAILED || fd < 0) {
        /* Cannot tell: holes are right anyway, only maybe not lasting */
        answer = 1;
    } else {
        madvise((void *)p, ps, MADV_NOHUGEPAGE);
        (void)p[0];
        answer = !ms_pagemap_read(fd, (const void *)p, 1, ps, &e, NULL) ||
                 ((e & PM_PRESENT) && !(e & (PM_EXCLUSIVE | PM_FILE)));
    }
    if (fd >= 0) {
        close(fd);
    }
    if (p != MAP_FAILED) {
        munmap((void *)p, ps);
    }
    return answer;
}

bool ms_merger_use_pagemap_scan(MsMerger *m, bool use)
{
    m->use_pagemap_scan = use && m->has_pagemap_scan;
    return m->use_pagemap_scan;
}

/* ---- the operations ---- */

/* The madvise() calls that MS_REGION_* @flags stand for, on [@host, +@len) */
static bool advise(void *host, size_t len, unsigned flags, GError **errp)
{
    static const struct {
        unsigned flag;
        int advice;
        const char *name;
    } advice[] = {
        { MS_REGION_HUGEPAGE, MADV_HUGEPAGE, "MADV_HUGEPAGE" },
        { MS_REGION_NOHUGEPAGE, MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE" },
        { MS_REGION_DONTFORK, MADV_DONTFORK, "MADV_DONTFORK" },
        { MS_REGION_DONTDUMP, MADV_DONTDUMP, "MADV_DONTDUMP" },
        { MS_REGION_MERGEABLE, MADV_MERGEABLE, "MADV_MERGEABLE" },
    };

    for (size_t i = 0; i < G_N_ELEMENTS(advice); i++) {
        if ((flags & advice[i].flag) &&
            madvise(host, len, advice[i].advice) < 0) {
            g_set_error(errp, MS_ENGINE_ERROR, errno,
                        "cannot re-apply %s to %zu pages at %p: %s",
                        advice[i].name, len / ms_host_page_size(), host,
                        g_strerror(errno));
            return false;
        }
    }
    return true;
}

/* Re-apply the region's advice to @run, mapped anew (ANON or store) */
static bool apply_advice(MsMerger *m, const Run *run, uint32_t first_slot,
                         GError **errp)
{
    unsigned flags = run->r->flags;

    (void)m;
    if (first_slot != ANON) {
        /* See the top comment: no huge pages on the store */
        flags &= ~(MS_REGION_HUGEPAGE | MS_REGION_NOHUGEPAGE);
    }
    return advise(run->host, run->len, flags, errp);
}

bool ms_map_fresh_anon(void *host, size_t len, unsigned flags, GError **errp)
{
    if (mmap(host, len, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED |
             (flags & MS_REGION_NORESERVE ? MAP_NORESERVE : 0),
             -1, 0) == MAP_FAILED) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot map anonymous memory at %p+0x%zx: %s", host, len,
                    g_strerror(errno));
        return false;
    }
    return advise(host, len, flags, errp);
}

/*
 * Register @run, just mapped anonymous, like the rest of the region's
 * anonymous memory: the next freeze needs it, and only with the same
 * flags does the kernel join it with its anonymous neighbours.
 */
static bool register_anon(MsMerger *m, const Run *run, GError **errp)
{
    int ret = uffd_register(m, run);

    if (ret < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, -ret,
                    "cannot register %zu pages at %p with userfaultfd: %s",
                    run->n, run->host, g_strerror(-ret));
        return false;
    }
    return true;
}

/*
 * The content of slot @slot of @r's stores, or NULL for a zero slot
 * (reading it through the view would fill it).
 */
static const uint8_t *slot_content(MsMerger *m, const Region *r,
                                   uint32_t slot)
{
    const MsMergeStore *st = &r->store;

    if (slot >= st->nslots - st->nzero && slot < st->nslots) {
        return NULL;
    }
    if (slot >= st->nslots) {
        return (const uint8_t *)st->view2 +
               (size_t)(slot - r->base2) * m->page_size;
    }
    return (const uint8_t *)st->view + (size_t)slot * m->page_size;
}

/*
 * Is every page of @run mapped?  mincore() fails with ENOMEM where
 * nothing is; any other failure cannot tell, and counts as a hole:
 * restoring known content is always right.
 */
static bool run_mapped(MsMerger *m, const Run *run)
{
    unsigned char vec[PAGEMAP_BATCH];

    for (size_t done = 0; done < run->n; done += PAGEMAP_BATCH) {
        size_t k = MIN(run->n - done, PAGEMAP_BATCH);

        if (mincore(run->host + done * m->page_size, k * m->page_size,
                    vec) < 0) {
            return false;
        }
    }
    return true;
}

/*
 * After @run was mapped anew as one anonymous VMA: label it ANON, and
 * ask the kernel whether it joined its neighbours (a moved VMA keeps its
 * own anon_vma, which the kernel does not join with theirs); without
 * PROCMAP_QUERY, assume it did not.  Returns the change in VMAs.
 */
static int relabel_restored(MsMerger *m, const Run *run)
{
    Region *r = run->r;
    size_t s = run->first, e = run->first + run->n;
    int before = breaks(r, s, e), after;
    uintptr_t vs = 0, ve = 0;
    bool known = query_vma(m, run->host, &vs, &ve);

    for (size_t i = 0; i < run->n; i++) {
        r->label[s + i] = ANON;
        r->forced[s + i] = false;
    }
    if (s > 0) {
        r->forced[s] = !known || vs == (uintptr_t)run->host;
    }
    if (e < r->npages) {
        r->forced[e] = !known || ve == (uintptr_t)run->host + run->len;
    }
    after = breaks(r, s, e);
    count_vmas(m, after - before);
    return after - before;
}

/*
 * After a failed remap left @run mapped: the kernel may have split the
 * VMAs at its edges before it failed (6.18 does when RLIMIT_AS refuses)
 * and put the pieces back without joining them.  Learn the edges from
 * the kernel (PROCMAP_QUERY; without it, assume split).  Not while a
 * freeze keeps store parts registered: that splits them too.
 */
static void learn_edges(MsMerger *m, const Run *run)
{
    Region *r = run->r;
    size_t s = run->first, e = run->first + run->n;
    int before = breaks(r, s, e);
    uintptr_t vs, ve;

    if (s > 0) {
        r->forced[s] = !query_vma(m, run->host, &vs, &ve) ||
                       vs == (uintptr_t)run->host || r->forced[s];
    }
    if (e < r->npages) {
        r->forced[e] = !query_vma(m, run->host + run->len - 1, &vs, &ve) ||
                       ve == (uintptr_t)run->host + run->len || r->forced[e];
    }
    count_vmas(m, breaks(r, s, e) - before);
}

static void __attribute__((noreturn))
restore_failed(const Run *run, const char *step, int err, int remap_err)
{
    ms_fatal("cannot restore guest memory at %p after a failed remap: "
             "%s: %s (the remap of %zu pages failed with: %s)", run->host,
             step, g_strerror(err), run->n, g_strerror(remap_err));
}

/* MAP_* flags of anonymous memory of @r's kind */
static int anon_map_flags(const Region *r)
{
    return MAP_PRIVATE | MAP_ANONYMOUS |
           (r->flags & MS_REGION_NORESERVE ? MAP_NORESERVE : 0);
}

/*
 * @run was just mapped anew as anonymous memory, not registered, by a
 * move or into a hole: give it the region's advice and registration,
 * and the label ANON.  The content is right: missing advice or
 * registration is no reason to stop (a later freeze of these pages
 * fails, and says why).
 */
static void adopt_anon(MsMerger *m, const Run *run, const char *what)
{
    g_autoptr(GError) err = NULL;

    if (!apply_advice(m, run, ANON, &err) || !register_anon(m, run, &err)) {
        g_warning("mem-share: guest memory at %p %s, but: %s", run->host,
                  what, err->message);
    }
    relabel_restored(m, run);
}

/*
 * Move @tmp, anonymous memory holding the content @run must have, over
 * the hole a failed @run left, in one step: no thread sees it half
 * filled.  Stops the process if impossible.
 */
static void restore_from(MsMerger *m, const Run *run, uint8_t *tmp,
                         int remap_err)
{
    if (mremap(tmp, run->len, run->len, MREMAP_MAYMOVE | MREMAP_FIXED,
               run->host) == MAP_FAILED) {
        restore_failed(run, "mremap", errno, remap_err);
    }
    adopt_anon(m, run, "restored after a failed remap");
}

/*
 * See "Failed remaps": map the content the remap of @run from
 * @first_slot (ANON: zeros) was to map back over it, as anonymous memory
 * of the region, before anyone is woken; stop the process if impossible.
 */
static void restore(MsMerger *m, const Run *run, uint32_t first_slot,
                    int remap_err)
{
    int flags = anon_map_flags(run->r);
    uint8_t *tmp;

    if (first_slot == ANON) {
        /* Zeros need no filling: map them into the hole at once */
        if (mmap(run->host, run->len, PROT_READ | PROT_WRITE,
                 flags | MAP_FIXED, -1, 0) == MAP_FAILED) {
            restore_failed(run, "mmap", errno, remap_err);
        }
        adopt_anon(m, run, "restored after a failed remap");
        return;
    }
    tmp = mmap(NULL, run->len, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (tmp == MAP_FAILED) {
        restore_failed(run, "mmap of a temporary copy", errno, remap_err);
    }
    for (size_t i = 0; i < run->n; i++) {
        const uint8_t *src = slot_content(m, run->r, first_slot + i);

        if (src) {
            memcpy(tmp + i * m->page_size, src, m->page_size);
        }
    }
    restore_from(m, run, tmp, remap_err);
}

/* A remap that failed for want of resources: a refusal, not an error */
static bool no_memory(int ret)
{
    return ret == -ENOMEM || ret == -EAGAIN;
}

/*
 * mmap() the run from the store (@first_slot) or anonymous (ANON).  On
 * failure, the run holds what it held, or the content it was to get,
 * anonymous (see "Failed remaps"); returns -errno of the failure.
 */
/*
 * ms_merger_inject_remap_failure(), for tests: the errno the remap of
 * @run must fail with, after making a hole if asked, or 0
 */
static int injected_failure(MsMerger *m, const Run *run)
{
    int err = m->inject_err;

    if (m->inject_frozen) {
        void (*frozen)(void *opaque) = m->inject_frozen;

        m->inject_frozen = NULL;
        frozen(m->inject_opaque);
    }
    if (err) {
        m->inject_err = 0;
        if (m->inject_hole) {
            munmap(run->host, run->len);
        }
    }
    return err;
}

static int remap(MsMerger *m, const Run *run, uint32_t first_slot)
{
    int flags = MAP_PRIVATE | MAP_FIXED, err = injected_failure(m, run);
    void *p;

    if (err) {
        errno = err;
        p = MAP_FAILED;
    } else if (first_slot == ANON) {
        flags |= run->r->flags & MS_REGION_NORESERVE ? MAP_NORESERVE : 0;
        p = mmap(run->host, run->len, PROT_READ | PROT_WRITE,
                 flags | MAP_ANONYMOUS, -1, 0);
    } else {
        const MsMergeStore *st = &run->r->store;
        bool second = first_slot >= st->nslots;

        flags |= run->r->flags & MS_REGION_NORESERVE ? MAP_NORESERVE : 0;
        p = mmap(run->host, run->len, PROT_READ | PROT_WRITE, flags,
                 second ? st->fd2 : st->fd,
                 (off_t)(second ? first_slot - run->r->base2 : first_slot) *
                 m->page_size);
    }
    if (p != MAP_FAILED) {
        return 0;
    }
    err = errno;
    if (!run_mapped(m, run)) {
        restore(m, run, first_slot, err);
    } else if (!run_maps_store(run)) {
        learn_edges(m, run);
    }
    return -err;
}

void ms_merger_inject_remap_failure(MsMerger *m, int err, bool hole,
                                    void (*frozen)(void *opaque),
                                    void *opaque)
{
    m->inject_err = err;
    m->inject_hole = hole;
    m->inject_frozen = frozen;
    m->inject_opaque = opaque;
}

static bool page_differs(MsMerger *m, const Run *run, uint32_t first_slot,
                         size_t i)
{
    const uint8_t *page = run->host + i * m->page_size;
    const MsMergeStore *st = &run->r->store;
    size_t slot = (size_t)first_slot + i;

    /* Reading a zero slot through the view would fill it: no need */
    if (first_slot == ANON ||
        (slot >= st->nslots - st->nzero && slot < st->nslots)) {
        return !ms_page_is_zero(page, m->page_size);
    }
    if (slot >= st->nslots) {
        return memcmp(page, (const uint8_t *)st->view2 +
                      (slot - run->r->base2) * m->page_size,
                      m->page_size) != 0;
    }
    return memcmp(page, (const uint8_t *)st->view + slot * m->page_size,
                  m->page_size) != 0;
}

/*
 * Whether page @i of the frozen @run is mapped for DMA.  Call it after the
 * freeze and dma_fence(), before the page is compared (see "DMA").
 */
static bool page_pinned(const Run *run, size_t i)
{
    const uint32_t *pins = run->r->pins;

    return pins && __atomic_load_n(&pins[run->first + i], __ATOMIC_SEQ_CST);
}

/*
 * Whether page @i of the frozen @run must not merge onto @first_slot's
 * content: mapped for DMA (counted in @res as pinned, and not compared,
 * its content is in flight), or different.  After dma_fence().
 */
static bool page_refused(MsMerger *m, const Run *run, uint32_t first_slot,
                         size_t i, MsMergeResult *res)
{
    if (page_pinned(run, i)) {
        res->pinned++;
        return true;
    }
    return page_differs(m, run, first_slot, i);
}

/*
 * The merge's barrier of the Dekker pattern (see "DMA"): the freeze's
 * write-protection, done by the ioctl that returned, before the reads of
 * the DMA counts.  The mapper's is after its increment.
 */
static void dma_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/*
 * Count the pages of the frozen run that differ from their slots (or from
 * zero), that are mapped for DMA (also counted as pinned), or that are
 * not really frozen: never populated, the kernel did not protect them,
 * and a write there would not wait.
 */
static bool check_frozen(MsMerger *m, const Run *run, uint32_t first_slot,
                         bool *changed, MsMergeResult *res, GError **errp)
{
    uint64_t entries[PAGEMAP_BATCH];
    bool differs[PAGEMAP_BATCH];

    dma_fence();
    for (size_t done = 0; done < run->n; done += PAGEMAP_BATCH) {
        size_t k = MIN(run->n - done, PAGEMAP_BATCH);

        for (size_t i = 0; i < k; i++) {
            differs[i] = page_refused(m, run, first_slot, done + i, res);
        }
        /* After the reads: a read may populate a page, which keeps the mark */
        if (!read_pagemap(m, run->host + done * m->page_size, k, entries,
                          errp)) {
            return false;
        }
        for (size_t i = 0; i < k; i++) {
            differs[i] |= !(entries[i] & PM_UFFD_WP);
            if (changed) {
                changed[done + i] = differs[i];
            }
            if (differs[i] && !res->changed++) {
                res->first_changed = done + i;
            }
        }
    }
    return true;
}

/*
 * MADV_DONTNEED the anonymous pages of @run, to make holes: never a whole
 * huge-page range in one call.  A call that covers a whole range empties
 * its PMD (a huge page is zapped whole; a page table emptied by one call
 * is freed, CONFIG_PT_RECLAIM), and the next write anywhere in the range
 * faults a whole huge page back, 2 MiB of memory for one guest write in
 * a MADV_HUGEPAGE region, userfaultfd or not: 511 zero pages that later
 * passes must discard again, for as long as the guest writes there.  A
 * call that stops one page into the range splits the huge page first
 * and leaves a page table, so later writes fault one page each.
 */
static int discard_anon(const MsMerger *m, const Run *run)
{
    uintptr_t a = (uintptr_t)run->host, end = a + run->len;
    /* Not only MADV_HUGEPAGE: with THP "always" any region may be huge */
    size_t huge = run->r->flags & MS_REGION_NOHUGEPAGE ? 0 : m->huge_size;

    while (a < end) {
        uintptr_t b = end;

        if (huge) {
            uintptr_t next = (a | (huge - 1)) + 1;   /* boundary after a */

            if (a % huge == 0 && end - a >= huge) {
                b = a + m->page_size;
            } else if (next < end) {
                /* The piece after this one starts on the boundary */
                b = next;
            }
        }
        if (madvise((void *)a, b - a, MADV_DONTNEED) < 0) {
            return -errno;
        }
        a = b;
    }
    return 0;
}

/*
 * Freeze, check, replace by @first_slot (a store run, or ANON for
 * zeros), wake.  The one protocol of ms_merge_run() and ms_merge_zero().
 */
static bool merge_common(MsMerger *m, void *host, size_t n,
                         uint32_t first_slot, bool *changed,
                         MsMergeResult *res, GError **errp)
{
    Run run;
    int peak, delta, ret;
    bool anon_holes, ok;

    memset(res, 0, sizeof(*res));
    res->outcome = MS_MERGE_FAILED;
    if (!get_run(m, host, n, &run, errp)) {
        return false;
    }
    if (first_slot != ANON && !slots_valid(run.r, first_slot, n)) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "store slots %u+%zu are out of range", first_slot, n);
        return false;
    }
    /* A zero run that is all anonymous needs no new mapping (delta 0) */
    anon_holes = first_slot == ANON && !run_maps_store(&run);
    delta = vma_delta(&run, first_slot, &peak);
    delta = anon_holes ? 0 : delta;
    if (!within_budget(m, MAX(peak, delta))) {
        res->outcome = MS_MERGE_NO_BUDGET;
        return true;
    }
    if (!freeze(m, &run, errp)) {
        return false;
    }
    if (!check_frozen(m, &run, first_slot, changed, res, errp)) {
        thaw(m, &run);
        return false;
    }
    if (res->changed) {
        thaw(m, &run);
        res->outcome = MS_MERGE_CHANGED;
        return true;
    }
    if (anon_holes) {
        ret = discard_anon(m, &run);
        thaw(m, &run);
    } else {
        /* On failure: as it was, or restored (see "Failed remaps") */
        ret = remap(m, &run, first_slot);
        if (ret < 0) {
            thaw(m, &run);
            if (run_maps_store(&run)) {
                /* Intact, and unregistered now: see learn_edges() */
                learn_edges(m, &run);
            }
        } else {
            /* The new VMA is not registered: only the sleepers remain */
            uffd_wake(m, &run);
        }
        if (no_memory(ret)) {
            res->outcome = MS_MERGE_NO_MEMORY;
            return true;
        }
    }
    if (ret < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, -ret,
                    "cannot replace %zu pages at %p: %s", n, host,
                    g_strerror(-ret));
        return false;
    }
    res->outcome = MS_MERGE_DONE;
    if (anon_holes) {
        return true;
    }
    /*
     * The writers are awake already: the advice comes after, harmlessly,
     * and before the accounting: the kernel joins the new VMA with its
     * neighbours only once their flags match.
     */
    ok = apply_advice(m, &run, first_slot, errp) &&
         (first_slot != ANON || register_anon(m, &run, errp));
    res->vma_delta = relabel(m, &run, first_slot);
    return ok;
}

bool ms_merge_run(MsMerger *m, void *host, size_t n, uint32_t first_slot,
                  bool *changed, MsMergeResult *res, GError **errp)
{
    if (first_slot == ANON) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL, "no store slot given");
        return false;
    }
    return merge_common(m, host, n, first_slot, changed, res, errp);
}

bool ms_merge_zero(MsMerger *m, void *host, size_t n, bool *changed,
                   MsMergeResult *res, GError **errp)
{
    return merge_common(m, host, n, ANON, changed, res, errp);
}

/* ---- several runs at once ---- */

/*
 * A batch amortises what a merge costs besides its mmap: one pagemap
 * read and one wake for all its runs instead of one each.  Runs that map
 * the store (re-merges) take the single-run path: their freeze registers
 * and splits VMAs, which the batch does not account for.
 */
typedef struct BatchRun {
    MsMergeReq *req;
    Run run;
    uint32_t slot;          /* first slot, or ANON */
    bool anon_holes;
    bool frozen;
} BatchRun;

static bool batch_prepare(MsMerger *m, MsMergeReq *req, BatchRun *b,
                          GError **errp)
{
    memset(&req->res, 0, sizeof(req->res));
    req->res.outcome = MS_MERGE_FAILED;
    b->req = req;
    b->slot = req->first_slot == MS_MERGE_ZERO ? ANON : req->first_slot;
    b->frozen = false;
    if (!get_run(m, req->host, req->n, &b->run, errp)) {
        return false;
    }
    if (b->slot != ANON && !slots_valid(b->run.r, b->slot, req->n)) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "store slots %u+%zu are out of range", b->slot, req->n);
        return false;
    }
    b->anon_holes = b->slot == ANON && !run_maps_store(&b->run);
    return true;
}

/* Would replacing @b now stay within the budget?  Holes cost nothing. */
static bool batch_budget_ok(MsMerger *m, const BatchRun *b)
{
    int peak, delta;

    if (b->anon_holes) {
        return true;
    }
    delta = vma_delta(&b->run, b->slot, &peak);
    return within_budget(m, MAX(peak, delta));
}

/*
 * Compare the frozen runs with their slots (or zero), then read their
 * write-protect marks at once: a page not really frozen, or mapped for
 * DMA, counts as changed, as in check_frozen().
 */
static bool batch_check(MsMerger *m, BatchRun *b, size_t nb, GError **errp)
{
    uint8_t *lo = b[0].run.host;
    size_t span = (b[nb - 1].run.host + b[nb - 1].run.len - lo) /
                  m->page_size;
    g_autofree uint64_t *entries = g_new(uint64_t, span);
    g_autofree bool *differs = g_new0(bool, span);

    dma_fence();
    for (size_t k = 0; k < nb; k++) {
        size_t off = (b[k].run.host - lo) / m->page_size;

        for (size_t i = 0; i < b[k].run.n; i++) {
            differs[off + i] = page_refused(m, &b[k].run, b[k].slot, i,
                                            &b[k].req->res);
        }
    }
    /* After the reads: a read may populate a page, which keeps the mark */
    for (size_t done = 0; done < span; done += PAGEMAP_BATCH) {
        if (!read_pagemap(m, lo + done * m->page_size,
                          MIN(span - done, PAGEMAP_BATCH), entries + done,
                          errp)) {
            return false;
        }
    }
    for (size_t k = 0; k < nb; k++) {
        size_t off = (b[k].run.host - lo) / m->page_size;
        MsMergeResult *res = &b[k].req->res;

        for (size_t i = 0; i < b[k].run.n; i++) {
            bool d = differs[off + i] || !(entries[off + i] & PM_UFFD_WP);

            if (b[k].req->changed) {
                b[k].req->changed[i] = d;
            }
            if (d && !res->changed++) {
                res->first_changed = i;
            }
        }
    }
    return true;
}

/* Replace one frozen, checked run; it stays frozen until the wake */
static int batch_replace(MsMerger *m, BatchRun *b, GError **errp)
{
    MsMergeResult *res = &b->req->res;
    int ret;

    if (b->anon_holes) {
        ret = discard_anon(m, &b->run);
        unfreeze(m, &b->run);
        b->frozen = false;
    } else {
        /* As in merge_common(); still frozen, the caller thaws it */
        ret = remap(m, &b->run, b->slot);
        b->frozen = ret < 0;
        if (no_memory(ret)) {
            res->outcome = MS_MERGE_NO_MEMORY;
            return 0;
        }
    }
    if (ret < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, -ret,
                    "cannot replace %zu pages at %p: %s", b->run.n,
                    b->run.host, g_strerror(-ret));
        return ret;
    }
    res->outcome = MS_MERGE_DONE;
    if (!b->anon_holes) {
        /* New VMA: its advice, then the accounting (see merge_common()) */
        if (!apply_advice(m, &b->run, b->slot, errp) ||
            (b->slot == ANON && !register_anon(m, &b->run, errp))) {
            ret = -EIO;
        }
        res->vma_delta = relabel(m, &b->run, b->slot);
    }
    return ret;
}

static bool batch_single(MsMerger *m, MsMergeReq *req, GError **errp)
{
    return merge_common(m, req->host, req->n, req->first_slot ==
                        MS_MERGE_ZERO ? ANON : req->first_slot, req->changed,
                        &req->res, errp);
}

bool ms_merge_runs(MsMerger *m, MsMergeReq *reqs, size_t nreq,
                   GError **errp)
{
    g_autofree BatchRun *b = g_new0(BatchRun, nreq);
    g_autofree bool *single = g_new0(bool, nreq);
    size_t nb = 0;
    bool ok = true;

    for (size_t k = 0; k < nreq; k++) {
        if (k && (uint8_t *)reqs[k].host <
            (uint8_t *)reqs[k - 1].host + reqs[k - 1].n * m->page_size) {
            g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                        "merge requests overlap or are not sorted");
            return false;
        }
        if (!batch_prepare(m, &reqs[k], &b[nb], errp)) {
            return false;
        }
        if (run_maps_store(&b[nb].run) || (nb && b[nb].run.r != b[0].run.r)) {
            single[k] = true;
        } else if (!batch_budget_ok(m, &b[nb])) {
            reqs[k].res.outcome = MS_MERGE_NO_BUDGET;
        } else {
            nb++;
        }
    }
    /* Freeze every run; writers to any of them sleep until the wake */
    for (size_t k = 0; ok && k < nb; k++) {
        int ret = uffd_writeprotect(m, &b[k].run, true);

        if (ret < 0) {
            g_set_error(errp, MS_ENGINE_ERROR, -ret,
                        "cannot write-protect %zu pages at %p: %s",
                        b[k].run.n, b[k].run.host, g_strerror(-ret));
            ok = false;
        }
        b[k].frozen = ok;
    }
    ok = ok && (!nb || batch_check(m, b, nb, errp));
    for (size_t k = 0; ok && k < nb; k++) {
        MsMergeResult *res = &b[k].req->res;

        if (res->changed) {
            res->outcome = MS_MERGE_CHANGED;
        } else if (!batch_budget_ok(m, &b[k])) {
            res->outcome = MS_MERGE_NO_BUDGET;
        } else {
            ok = batch_replace(m, &b[k], errp) >= 0;
            continue;
        }
        unfreeze(m, &b[k].run);
        b[k].frozen = false;
    }
    /* After an error or a refused remap, what is still frozen thaws */
    for (size_t k = 0; k < nb; k++) {
        if (b[k].frozen) {
            unfreeze(m, &b[k].run);
        }
    }
    if (nb) {
        Run all = b[0].run;

        all.len = b[nb - 1].run.host + b[nb - 1].run.len - all.host;
        uffd_wake(m, &all);
    }
    for (size_t k = 0; ok && k < nreq; k++) {
        if (single[k]) {
            ok = batch_single(m, &reqs[k], errp);
        }
    }
    return ok;
}

bool ms_merge_discard(MsMerger *m, void *host, size_t n, GError **errp)
{
    Run run;
    int ret;
    bool remapped, ok;

    if (!get_run(m, host, n, &run, errp)) {
        return false;
    }
    remapped = run_maps_store(&run);
    if (!remapped) {
        ret = madvise(run.host, run.len, MADV_DONTNEED) < 0 ? -errno : 0;
    } else {
        ret = remap(m, &run, ANON);
    }
    if (ret < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, -ret,
                    "cannot discard %zu pages at %p: %s", n, host,
                    g_strerror(-ret));
        return false;
    }
    if (!remapped) {
        return true;
    }
    ok = apply_advice(m, &run, ANON, errp) && register_anon(m, &run, errp);
    relabel(m, &run, ANON);
    return ok;
}

/*
 * Make the pages of @run that map a file private by taking their
 * copy-on-write faults.  An atomic add of 0 is a write that changes
 * nothing: a concurrent guest write to the same word is neither lost nor
 * torn.  volatile, because a compiler may turn an idempotent atomic add
 * into a load.  The store VMAs stay (see "Unmerging").
 */
static void unmerge_touch(MsMerger *m, const Run *run)
{
    for (size_t i = 0; i < run->n; i++) {
        if (run->r->label[run->first + i] != ANON) {
            __atomic_fetch_add((volatile uint64_t *)(run->host +
                                                     i * m->page_size),
                               0, __ATOMIC_RELAXED);
        }
    }
}

/*
 * May the frozen @run, whose content is copied, be replaced?  Not if a
 * page is mapped for DMA (a transfer would land in the old page), nor if
 * a page was not really frozen (a write may have come after its copy).
 * Read after the copy: a read may populate a page, which keeps the mark.
 */
static bool unmerge_frozen(MsMerger *m, const Run *run)
{
    uint64_t entries[PAGEMAP_BATCH];

    dma_fence();
    for (size_t done = 0; done < run->n; done += PAGEMAP_BATCH) {
        size_t k = MIN(run->n - done, PAGEMAP_BATCH);

        if (!read_pagemap(m, run->host + done * m->page_size, k, entries,
                          NULL)) {
            return false;
        }
        for (size_t i = 0; i < k; i++) {
            if (page_pinned(run, done + i) || !(entries[i] & PM_UFFD_WP)) {
                return false;
            }
        }
    }
    return true;
}

/*
 * Replace @run, whose pages all map a file, by anonymous memory with the
 * same bytes (see "Unmerging").  False if it could not, the run as it was.
 */
static bool unmerge_anon(MsMerger *m, const Run *run)
{
    uint8_t *tmp = mmap(NULL, run->len, PROT_READ | PROT_WRITE,
                        anon_map_flags(run->r), -1, 0);
    int err;

    if (tmp == MAP_FAILED) {
        return false;
    }
    if (!freeze(m, run, NULL)) {
        munmap(tmp, run->len);
        return false;
    }
    memcpy(tmp, run->host, run->len);
    if (!unmerge_frozen(m, run)) {
        thaw(m, run);
        munmap(tmp, run->len);
        return false;
    }
    err = injected_failure(m, run);
    if (!err && mremap(tmp, run->len, run->len,
                       MREMAP_MAYMOVE | MREMAP_FIXED, run->host) !=
        MAP_FAILED) {
        /* The new VMA is not registered: only the sleepers remain */
        uffd_wake(m, run);
        adopt_anon(m, run, "unmerged");
        return true;
    }
    err = err ? err : errno;
    if (!run_mapped(m, run)) {
        /* See "Failed remaps": @tmp holds the content, frozen since */
        restore_from(m, run, tmp, err);
        uffd_wake(m, run);
        return true;
    }
    thaw(m, run);
    learn_edges(m, run);
    munmap(tmp, run->len);
    return false;
}

/*
 * The end of the next piece of [@first, @end) of @r to unmerge at once:
 * whole VMAs of the model (a piece becomes one VMA), all mapping a file,
 * at most UNMERGE_MAX pages unless one VMA is longer.
 */
#define UNMERGE_MAX 512

/* Does a VMA of the model start at page @i (> 0) of @r? */
static bool vma_starts(const Region *r, size_t i)
{
    return r->forced[i] || !joined(r, r->label[i - 1], r->label[i]);
}

static size_t unmerge_piece(const Region *r, size_t first, size_t end)
{
    size_t cut = first, b;

    for (b = first + 1; b < end && r->label[b] != ANON &&
         b - first < UNMERGE_MAX; b++) {
        cut = vma_starts(r, b) ? b : cut;
    }
    if (b == end || r->label[b] == ANON || vma_starts(r, b)) {
        return b;
    }
    /* Mid-VMA at the limit: back to its start, if it is not the first */
    return cut > first ? cut : b;
}

bool ms_unmerge(MsMerger *m, void *host, size_t n, GError **errp)
{
    Run all, run;
    size_t end, b;

    if (!get_run(m, host, n, &all, errp)) {
        return false;
    }
    end = all.first + n;
    for (size_t a = all.first; a < end; a = b) {
        if (all.r->label[a] == ANON) {
            b = a + 1;
            continue;
        }
        b = unmerge_piece(all.r, a, end);
        run = (Run) { .r = all.r, .first = a, .n = b - a,
                      .host = all.r->base + a * m->page_size,
                      .len = (b - a) * m->page_size };
        if (!unmerge_anon(m, &run)) {
            unmerge_touch(m, &run);
        }
    }
    return true;
}

/* Fill @cat with PAGE_IS_* categories of each page, via PAGEMAP_SCAN */
static bool scan_categories(MsMerger *m, const Run *run, uint64_t *cat,
                            GError **errp)
{
    struct page_region vec[SCAN_VEC];
    uintptr_t start = (uintptr_t)run->host, end = start + run->len;

    memset(cat, 0, run->n * sizeof(*cat));
    while (start < end) {
        struct pm_scan_arg arg = {
            .size = sizeof(arg),
            .start = start,
            .end = end,
            .vec = (uintptr_t)vec,
            .vec_len = SCAN_VEC,
            .return_mask = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_SWAPPED,
        };
        int got = ioctl(m->pagemap_fd, PAGEMAP_SCAN, &arg);

        if (got < 0) {
            g_set_error(errp, MS_ENGINE_ERROR, errno,
                        "PAGEMAP_SCAN failed: %s", g_strerror(errno));
            return false;
        }
        for (int i = 0; i < got; i++) {
            for (uint64_t a = vec[i].start; a < vec[i].end; a += m->page_size) {
                cat[(a - (uintptr_t)run->host) / m->page_size] =
                    vec[i].categories;
            }
        }
        if (arg.walk_end <= start) {
            break;
        }
        start = arg.walk_end;
    }
    return true;
}

/* The same categories from /proc/self/pagemap entries */
static void categories_of(const uint64_t *pagemap, size_t n, uint64_t *cat)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t e = pagemap[i];

        cat[i] = (e & PM_PRESENT ? PAGE_IS_PRESENT : 0) |
                 (e & PM_SWAP ? PAGE_IS_SWAPPED : 0) |
                 (e & PM_FILE ? PAGE_IS_FILE : 0);
    }
}

static bool pagemap_categories(MsMerger *m, const Run *run, uint64_t *cat,
                               GError **errp)
{
    if (!read_pagemap(m, run->host, run->n, cat, errp)) {
        return false;
    }
    categories_of(cat, run->n, cat);
    return true;
}

/* Which pages of @run still map the store, from their categories */
static size_t classify_shared(const Run *run, const uint64_t *cat,
                              bool *shared)
{
    size_t count = 0;

    for (size_t i = 0; i < run->n; i++) {
        /*
         * In a store VMA: a file page is the store's; no entry at all
         * means the next access maps the store's page.  A present or
         * swapped anonymous page is a private copy.
         */
        uint32_t label = run->r->label[run->first + i];
        bool in_store = label != ANON && label != FOREIGN;
        bool private = cat[i] & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED) &&
                       !(cat[i] & PAGE_IS_FILE);

        shared[i] = in_store && !private;
        count += shared[i];
    }
    return count;
}

/*
 * Which of the @n pages at @host still map the store: from the caller's
 * /proc/self/pagemap entries if @pagemap is given, else read here.
 */
static bool test_shared(MsMerger *m, const void *host, size_t n,
                        const uint64_t *pagemap, bool *shared,
                        size_t *nshared, GError **errp)
{
    g_autofree uint64_t *cat = NULL;
    size_t count;
    Run run;

    if (!get_run(m, (void *)host, n, &run, errp)) {
        return false;
    }
    cat = g_new(uint64_t, n);
    if (pagemap) {
        categories_of(pagemap, n, cat);
    } else if (m->use_pagemap_scan ? !scan_categories(m, &run, cat, errp)
                                   : !pagemap_categories(m, &run, cat,
                                                         errp)) {
        return false;
    }
    count = classify_shared(&run, cat, shared);
    if (nshared) {
        *nshared = count;
    }
    return true;
}

bool ms_merge_test_shared(MsMerger *m, const void *host, size_t n,
                          bool *shared, size_t *nshared, GError **errp)
{
    return test_shared(m, host, n, NULL, shared, nshared, errp);
}

bool ms_merge_test_shared_pagemap(MsMerger *m, const void *host, size_t n,
                                  const uint64_t *pagemap, bool *shared,
                                  size_t *nshared, GError **errp)
{
    g_assert(pagemap);
    return test_shared(m, host, n, pagemap, shared, nshared, errp);
}
