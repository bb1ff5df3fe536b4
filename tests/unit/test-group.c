/*
 * Unit tests for sharing across the members of a broker group: scanners
 * of three regions of this process, two in one group and one in another,
 * with a real mem-share-broker
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Regions A and B (group g1) each hold NSHARED pages that appear once in
 * each of them (the same contents, at other places), region C (group g2)
 * holds them too; every other page is unique.  Only A and B may share,
 * through the broker's store: what happened is checked through the bytes
 * (they never change), the pages' mappings (the group's memfd), the
 * regions' anonymous memory, and the broker's own figures.
 *
 * userfaultfd needs root, CAP_SYS_PTRACE or /dev/userfaultfd: without
 * them the tests are skipped.
 */

#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib.h>

#include "mem-share/broker-client.h"
#include "mem-share/hash.h"
#include "mem-share/scan.h"
#include "fake-broker.h"

#define NPAGES 1024
#define NOBODY 65534
#define NSHARED 200
#define NSLOTS 4096
/* The broker's table of misses has this many entries per slot */
#define UNSTABLE_PER_SLOT 4
#define DEADLINE_US (10 * G_USEC_PER_SEC)

static size_t page;
/* What members expect: the broker runs as the test does */
static uid_t broker_uid;

typedef struct Region {
    MsBrokerClient *c;
    MsScanner *s;
    uint8_t *ram;
    uint8_t *expect;
    size_t shared_at;       /* first of the NSHARED pages */
    uint64_t *dirty;        /* the fake dirty log, or NULL: none */
} Region;

typedef struct Fixture {
    int timeout_ms;         /* of the members' broker calls; 0: 5 s */
    char *dir;
    char *path;
    GPid pid;
    Region a, b, c;
    bool log;               /* the regions follow a (fake) dirty log */
    bool no_answers;        /* news from STATS only, not ANSWERED */
    size_t slots;           /* the group's store; 0: NSLOTS */
    bool skip;
} Fixture;

static void fill(uint8_t *p, uint64_t seed)
{
    uint64_t *w = (uint64_t *)p;

    for (size_t i = 0; i < page / 8; i++) {
        w[i] = seed * 0x9e3779b97f4a7c15ULL + i;
    }
}

static void broker_start(Fixture *f)
{
    const char *bin = g_getenv("MS_BROKER");
    g_autofree char *max_store =
        g_strdup_printf("%zu", (f->slots ? f->slots : NSLOTS) * page);
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;

    g_assert_nonnull(bin);
    f->pid = fork();
    g_assert_cmpint(f->pid, >=, 0);
    if (f->pid == 0) {
        int null = open("/dev/null", O_WRONLY);

        prctl(PR_SET_PDEATHSIG, SIGKILL);
        dup2(null, 2);
        execl(bin, bin, "--socket", f->path, "--max-store", max_store,
              (char *)NULL);
        _exit(127);
    }
    for (;;) {
        MsBrokerClient *c = ms_broker_client_open(f->path, 0, NULL);

        if (c) {
            ms_broker_client_free(c);
            return;
        }
        g_assert_cmpint(waitpid(f->pid, NULL, WNOHANG), ==, 0);
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(10000);
    }
}

/*
 * The fake dirty log: what QEMU's DIRTY_MEMORY_MEMSHARE client does.  A
 * region starts with every page written, as QEMU's log does.
 */
static void dirty_take(void *opaque, size_t first, size_t n, uint64_t *bits)
{
    Region *r = opaque;

    for (size_t k = 0; k < n; k++) {
        size_t i = first + k;

        if (r->dirty[i / 64] & (1ULL << (i % 64))) {
            r->dirty[i / 64] &= ~(1ULL << (i % 64));
            bits[k / 64] |= 1ULL << (k % 64);
        }
    }
}

/* A region whose NSHARED pages start at @at; the rest unique by @seed */
static bool region_setup(Fixture *f, Region *r, const char *group,
                         const char *name, size_t at, uint64_t seed)
{
    g_autoptr(GError) err = NULL;
    MsScanConfig cfg;

    r->ram = mmap(NULL, NPAGES * page, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    g_assert_true(r->ram != MAP_FAILED);
    madvise(r->ram, NPAGES * page, MADV_NOHUGEPAGE);
    r->shared_at = at;
    for (size_t i = 0; i < NPAGES; i++) {
        bool shared = i >= at && i < at + NSHARED;

        fill(r->ram + i * page, shared ? 1 + i - at : seed + i);
    }
    r->expect = g_memdup2(r->ram, NPAGES * page);
    r->c = ms_broker_client_connect_as(f->path, broker_uid, group, name,
                                       f->timeout_ms, &err);
    g_assert_no_error(err);
    ms_scan_config_init(&cfg);
    cfg.host = r->ram;
    cfg.npages = NPAGES;
    cfg.region_flags = MS_REGION_NOHUGEPAGE;
    cfg.group = r->c;
    cfg.group_no_answers = f->no_answers;
    if (f->log) {
        r->dirty = g_new(uint64_t, NPAGES / 64);
        memset(r->dirty, 0xff, NPAGES / 8);
        cfg.dirty_take = dirty_take;
        cfg.dirty_opaque = r;
    }
    r->s = ms_scanner_new(&cfg, &err);
    if (!r->s) {
        g_test_skip(err->message);
        return false;
    }
    return true;
}

static void region_teardown(Region *r)
{
    ms_scanner_free(r->s);
    ms_broker_client_free(r->c);
    if (r->ram) {
        munmap(r->ram, NPAGES * page);
    }
    g_free(r->expect);
    g_free(r->dirty);
}

static void setup_common(Fixture *f, int timeout_ms, bool log,
                         bool no_answers, size_t slots)
{
    g_autoptr(GError) err = NULL;

    memset(f, 0, sizeof(*f));
    f->timeout_ms = timeout_ms;
    f->log = log;
    f->no_answers = no_answers;
    f->slots = slots;
    f->dir = g_dir_make_tmp("test-group-XXXXXX", &err);
    g_assert_no_error(err);
    f->path = g_build_filename(f->dir, "broker.sock", NULL);
    broker_start(f);
    f->skip = !region_setup(f, &f->a, "g1", "vm-a", 100, 100000) ||
              !region_setup(f, &f->b, "g1", "vm-b", 600, 200000) ||
              !region_setup(f, &f->c, "g2", "vm-c", 300, 300000);
}

static void setup(Fixture *f, gconstpointer data)
{
    setup_common(f, GPOINTER_TO_INT(data), false, false, 0);
}

/* @data: non-NULL for news from STATS only, as from an older broker */
static void setup_log(Fixture *f, gconstpointer data)
{
    setup_common(f, 0, true, data != NULL, 0);
}

/* A log, and a table of misses that holds A's and B's with room left */
static void setup_log_big(Fixture *f, gconstpointer data)
{
    (void)data;
    setup_common(f, 0, true, false, 4 * NSLOTS);
}

static void teardown(Fixture *f, gconstpointer data)
{
    (void)data;
    region_teardown(&f->a);
    region_teardown(&f->b);
    region_teardown(&f->c);
    if (f->pid > 0) {
        kill(f->pid, SIGKILL);
        waitpid(f->pid, NULL, 0);
    }
    unlink(f->path);
    rmdir(f->dir);
    g_free(f->path);
    g_free(f->dir);
}

static void pass(Region *r)
{
    g_autoptr(GError) err = NULL;

    g_assert_true(ms_scanner_step(r->s, NPAGES, NULL, &err));
    g_assert_no_error(err);
}

static MsScanStats stats(Region *r)
{
    MsScanStats st;

    ms_scanner_get_stats(r->s, &st);
    return st;
}

static MsProtoGroupStats group_stats(Region *r)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GArray) groups = NULL;

    g_assert_true(ms_broker_client_stats(r->c, &groups, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(groups->len, ==, 1);
    return g_array_index(groups, MsProtoGroupStats, 0);
}

/* Anonymous memory of the region, from /proc/self/smaps */
static uint64_t anon_kb(Region *r)
{
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    uintptr_t lo = (uintptr_t)r->ram, hi = lo + NPAGES * page;
    bool in = false;
    uint64_t total = 0;

    g_assert_true(g_file_get_contents("/proc/self/smaps", &text, NULL, NULL));
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l; l++) {
        uint64_t start, end, kb;

        if (sscanf(*l, "%" SCNx64 "-%" SCNx64 " ", &start, &end) == 2 &&
            strchr(*l, '-') < strchr(*l, ' ')) {
            in = start < hi && end > lo;
        } else if (in && sscanf(*l, "Anonymous: %" SCNu64, &kb) == 1) {
            total += kb;
        }
    }
    return total;
}

static void check_bytes(Region *r)
{
    g_assert_cmpmem(r->ram, NPAGES * page, r->expect, NPAGES * page);
}

/* Passes over the three regions in turn until nothing more merges */
/*
 * Passes until nine in a row merge nothing more: a page the group missed
 * is asked again only every 2, 4, then 8 scans (scan.c, "Groups"), so a
 * member may find a meeting's slot up to eight passes after the upload.
 */
#define QUIET_PASSES 9

static void converge(Fixture *f)
{
    uint64_t last = UINT64_MAX;
    int quiet = 0;

    for (int n = 0; n < 40; n++) {
        uint64_t now;

        pass(&f->a);
        pass(&f->b);
        pass(&f->c);
        now = stats(&f->a).merges + stats(&f->b).merges +
              stats(&f->c).merges;
        quiet = now == last ? quiet + 1 : 0;
        if (quiet >= QUIET_PASSES) {
            return;
        }
        last = now;
    }
    g_assert_not_reached();
}

/* Page @i of @r gets content @seed, also in what it must read */
static void set_page(Region *r, size_t i, uint64_t seed)
{
    fill(r->ram + i * page, seed);
    fill(r->expect + i * page, seed);
}

/*
 * A and B meet through the broker and map one copy of each shared page;
 * a pair inside A goes to the group too, where B finds its one copy; C,
 * in another group, shares nothing; a write breaks the writer's copy
 * only, and its reference goes back to the broker.
 */
static void test_share(Fixture *f, gconstpointer data)
{
    uint64_t before_a, before_b;
    MsProtoGroupStats gs;
    MsScanStats sa, sb, sc;
    size_t w;

    (void)data;
    if (f->skip) {
        return;
    }
    set_page(&f->a, 900, 777);
    set_page(&f->a, 950, 777);
    set_page(&f->b, 10, 777);
    before_a = anon_kb(&f->a);
    before_b = anon_kb(&f->b);
    converge(f);
    sa = stats(&f->a);
    sb = stats(&f->b);
    sc = stats(&f->c);
    g_test_message("A: %" PRIu64 " group pages, %" PRIu64 " lookups, %"
                   PRIu64 " hits, %" PRIu64 " uploads; B: %" PRIu64
                   " group pages, %" PRIu64 " uploads; C: %" PRIu64,
                   sa.group_pages, sa.group_lookups, sa.group_hits,
                   sa.group_uploads, sb.group_pages, sb.group_uploads,
                   sc.group_pages);
    g_assert_cmpuint(sa.group_pages, ==, NSHARED + 2);
    g_assert_cmpuint(sb.group_pages, ==, NSHARED + 1);
    /* Each shared page once, and both sides of A's pair */
    g_assert_cmpuint(sa.group_uploads + sb.group_uploads, ==, NSHARED + 2);
    g_assert_cmpuint(sc.group_pages, ==, 0);
    g_assert_cmpuint(sa.pages_merged + sb.pages_merged + sc.pages_merged,
                     ==, 0);
    g_assert_cmpuint(sa.group_lost + sb.group_lost + sc.group_lost, ==, 0);
    check_bytes(&f->a);
    check_bytes(&f->b);
    check_bytes(&f->c);
    /* The private copies are gone: the pages read the group's memfd */
    g_assert_cmpuint(before_a - anon_kb(&f->a), >=, NSHARED * page / 1024);
    g_assert_cmpuint(before_b - anon_kb(&f->b), >=, NSHARED * page / 1024);
    gs = group_stats(&f->a);
    g_assert_cmpuint(gs.clients, ==, 2);
    g_assert_cmpuint(gs.slots_used, ==, NSHARED + 1);
    g_assert_cmpuint(gs.shared_slots, ==, NSHARED + 1);
    g_assert_cmpuint(gs.refs, ==, 2 * NSHARED + 3);
    g_assert_cmpuint(group_stats(&f->c).slots_used, ==, 0);

    /* A writes one of them: its copy breaks, B's stays the group's */
    w = f->a.shared_at + 7;
    f->a.ram[w * page + 5] ^= 0x5a;
    f->a.expect[w * page + 5] ^= 0x5a;
    pass(&f->a);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED + 1);
    g_assert_cmpuint(stats(&f->a).cow_breaks, >=, 1);
    gs = group_stats(&f->b);
    g_assert_cmpuint(gs.refs, ==, 2 * NSHARED + 2);
    g_assert_cmpuint(gs.shared_slots, ==, NSHARED);
    check_bytes(&f->a);
    check_bytes(&f->b);

    /* B unmerges everything: its references all go back */
    g_assert_true(ms_scanner_unmerge_all(f->b.s, NULL));
    g_assert_cmpuint(stats(&f->b).group_pages, ==, 0);
    /* Its releases went without waiting: B's next request follows them */
    gs = group_stats(&f->b);
    g_assert_cmpuint(gs.refs, ==, NSHARED + 1);
    g_assert_cmpuint(gs.shared_slots, ==, 0);
    check_bytes(&f->a);
    check_bytes(&f->b);
}

/*
 * A discard (balloon, virtio-mem) of pages that map the group's store:
 * they read zeros, and their references go back to the broker.
 */
static void test_discard(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    size_t first = f->b.shared_at, n = 10;
    MsProtoGroupStats gs0, gs;
    MsScanStats sb0, sb;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    sb0 = stats(&f->b);
    gs0 = group_stats(&f->a);
    g_assert_cmpuint(sb0.group_pages, ==, NSHARED);
    /* The start of a run of group pages, and the unique page before it */
    g_assert_true(ms_scanner_discard(f->b.s, f->b.ram + (first - 1) * page,
                                     n + 1, &err));
    g_assert_no_error(err);
    memset(f->b.expect + (first - 1) * page, 0, (n + 1) * page);
    check_bytes(&f->b);
    sb = stats(&f->b);
    /* B's releases went without waiting: its next request follows them */
    gs = group_stats(&f->b);
    g_assert_cmpuint(sb.group_pages, ==, sb0.group_pages - n);
    g_assert_cmpuint(gs.refs, ==, gs0.refs - n);
    check_bytes(&f->a);
    /* The next passes find them private and merge nothing back */
    pass(&f->b);
    pass(&f->b);
    check_bytes(&f->b);
    g_assert_cmpuint(stats(&f->b).group_pages, ==, sb0.group_pages - n);
    g_assert_cmpuint(stats(&f->b).cow_breaks, ==, sb0.cow_breaks);
}

/* A broker that dies leaves the merged pages as they are */
static void test_broker_dies(Fixture *f, gconstpointer data)
{
    MsScanStats sa;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED);
    kill(f->pid, SIGKILL);
    waitpid(f->pid, NULL, 0);
    f->pid = 0;
    /* A write to a group page, then passes: no crash, no error */
    f->a.ram[(f->a.shared_at + 3) * page] ^= 1;
    f->a.expect[(f->a.shared_at + 3) * page] ^= 1;
    pass(&f->a);
    pass(&f->a);
    sa = stats(&f->a);
    g_assert_cmpuint(sa.group_lost, ==, 1);
    g_assert_cmpuint(sa.group_pages, ==, NSHARED - 1);
    check_bytes(&f->a);
    check_bytes(&f->b);
}

/*
 * A broker that is stopped (SIGTERM: systemctl stop, or restart after an
 * upgrade) frees nothing its members map: their merged pages keep their
 * bytes, and a write still breaks only the writer's copy.
 */
static void test_broker_stops(Fixture *f, gconstpointer data)
{
    int status;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED);
    g_assert_cmpuint(stats(&f->b).group_pages, ==, NSHARED);
    kill(f->pid, SIGTERM);
    g_assert_cmpint(waitpid(f->pid, &status, 0), ==, f->pid);
    f->pid = 0;
    g_assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    check_bytes(&f->a);
    check_bytes(&f->b);
    f->a.ram[(f->a.shared_at + 3) * page] ^= 1;
    f->a.expect[(f->a.shared_at + 3) * page] ^= 1;
    pass(&f->a);
    pass(&f->b);
    check_bytes(&f->a);
    check_bytes(&f->b);
}

/* A member joins the group of a new broker after losing the old one */
static void rejoin(Fixture *f, Region *r, const char *name)
{
    g_autoptr(GError) err = NULL;
    MsBrokerClient *c = ms_broker_client_connect_as(f->path, broker_uid,
                                                    "g1", name,
                                                    f->timeout_ms, &err);

    g_assert_no_error(err);
    g_assert_true(ms_scanner_set_group(r->s, c, &err));
    g_assert_no_error(err);
    ms_broker_client_free(r->c);
    r->c = c;
}

/*
 * After the broker died and a new one started, the members rejoin: pages
 * on the old store stay merged, new sharing goes through the new store,
 * and a write to an old page releases nothing on the new broker.
 */
static void test_rejoin(Fixture *f, gconstpointer data)
{
    MsProtoGroupStats gs;
    MsScanStats sa;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    kill(f->pid, SIGKILL);
    waitpid(f->pid, NULL, 0);
    pass(&f->a);
    pass(&f->b);
    g_assert_cmpuint(stats(&f->a).group_lost, ==, 1);
    unlink(f->path);
    broker_start(f);
    rejoin(f, &f->a, "vm-a2");
    rejoin(f, &f->b, "vm-b2");
    g_assert_cmpuint(stats(&f->a).group_lost, ==, 0);
    g_assert_cmpuint(stats(&f->a).group_rejoins, ==, 1);
    /* New contents both have once */
    for (size_t k = 0; k < 32; k++) {
        set_page(&f->a, 400 + k, 5000 + k);
        set_page(&f->b, 800 + k, 5000 + k);
    }
    converge(f);
    sa = stats(&f->a);
    g_assert_cmpuint(sa.group_pages, ==, NSHARED + 32);
    g_assert_cmpuint(stats(&f->b).group_pages, ==, NSHARED + 32);
    gs = group_stats(&f->a);
    g_assert_cmpuint(gs.slots_used, ==, 32);
    g_assert_cmpuint(gs.shared_slots, ==, 32);
    g_assert_cmpuint(gs.refs, ==, 64);
    check_bytes(&f->a);
    check_bytes(&f->b);
    /* A write to a page of the old store: nothing to release here */
    f->a.ram[(f->a.shared_at + 1) * page] ^= 1;
    f->a.expect[(f->a.shared_at + 1) * page] ^= 1;
    pass(&f->a);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED + 31);
    g_assert_cmpuint(group_stats(&f->a).refs, ==, 64);
    g_assert_cmpuint(stats(&f->a).group_lost, ==, 0);
    check_bytes(&f->a);
    check_bytes(&f->b);

    /*
     * A VM that rejoins for years: the numbers of stores no page maps
     * any more are used again (on 8af7614 stores of 2^30 slots ran out
     * of numbers at the fourth).  C's merger only, C scans no more.
     */
    for (int k = 0; k < 16; k++) {
        g_autoptr(GError) err = NULL;
        uint32_t base;

        g_assert_true(ms_merger_replace_second_store(
                          ms_scanner_merger(f->c.s), f->c.ram, -1, NULL,
                          1u << 30, &base, &err));
        g_assert_no_error(err);
    }
    check_bytes(&f->c);
}

/*
 * The broker dies and another process takes its socket path (a fake
 * broker): the member trying to join again, as QEMU does every 5 s
 * after losing its broker, is refused and sends it nothing, and keeps
 * what it merged.  When the real broker is back, it joins.  Needs root
 * to run the fake as another uid.
 */
static void test_rejoin_fake(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    MsBrokerClient *c;
    FakeBroker fb;
    FakeReport r;

    (void)data;
    if (f->skip) {
        return;
    }
    if (geteuid() != 0) {
        g_test_skip("needs root to run the fake broker as another uid");
        return;
    }
    converge(f);
    kill(f->pid, SIGKILL);
    waitpid(f->pid, NULL, 0);
    f->pid = 0;
    pass(&f->a);
    g_assert_cmpuint(stats(&f->a).group_lost, ==, 1);
    unlink(f->path);

    fake_broker_start(&fb, f->path, NOBODY);
    c = ms_broker_client_connect_as(f->path, broker_uid, "g1", "vm-a2",
                                    f->timeout_ms, &err);
    g_assert_null(c);
    g_assert_error(err, MS_ENGINE_ERROR, EPERM);
    g_clear_error(&err);
    pass(&f->a);
    g_assert_cmpuint(stats(&f->a).group_lost, ==, 1);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED);
    check_bytes(&f->a);
    r = fake_broker_stop(&fb, f->path);
    g_assert_cmpuint(r.connections, ==, 1);
    g_assert_cmpuint(r.bytes, ==, 0);

    broker_start(f);
    rejoin(f, &f->a, "vm-a2");
    g_assert_cmpuint(stats(&f->a).group_lost, ==, 0);
    g_assert_cmpuint(stats(&f->a).group_rejoins, ==, 1);
    check_bytes(&f->a);
    check_bytes(&f->b);
}

/* A pass whose broker calls time out once, then fail at once */
static gint64 timed_pass(Region *r)
{
    gint64 t0 = g_get_monotonic_time();

    pass(r);
    return (g_get_monotonic_time() - t0) / 1000;
}

/*
 * The broker stops answering (SIGSTOP) past every timeout while both
 * members write, break their sharing (RELEASEs), look pages up and
 * upload new ones.  A timeout is not a lost broker: nothing is dropped,
 * and when it answers again the group goes on.  Then the connection of
 * A breaks and A joins again, as QEMU does after a lost connection:
 * A's references stay with the broker while this process lives, so
 * when B unmerges everything and stores new pages, no slot A maps is
 * freed or reused.  (On 8af7614 a timeout killed the connection, the
 * rejoin made the broker drop A's references, and B's unmerge punched
 * A's slots: A's pages read zeros.)
 */
static void test_stall(Fixture *f, gconstpointer data)
{
    MsScanStats sa, sb;

    (void)data;
    if (f->skip) {
        return;
    }
    converge(f);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED);
    g_assert_cmpuint(stats(&f->b).group_pages, ==, NSHARED);

    g_assert_cmpint(kill(f->pid, SIGSTOP), ==, 0);
    /* Writes that break group pages: RELEASEs go while it is stopped */
    for (size_t k = 0; k < 20; k++) {
        set_page(&f->a, f->a.shared_at + k, 7000 + k);
    }
    /* Contents both have once: lookups, WANTED, uploads to come */
    for (size_t k = 0; k < 16; k++) {
        set_page(&f->a, 400 + k, 8000 + k);
        set_page(&f->b, 900 + k, 8000 + k);
    }
    for (int n = 0; n < 6; n++) {
        /* One timeout at most per pass: then calls fail at once */
        g_assert_cmpint(timed_pass(&f->a), <, 3 * f->timeout_ms);
        g_assert_cmpint(timed_pass(&f->b), <, 3 * f->timeout_ms);
    }
    sa = stats(&f->a);
    sb = stats(&f->b);
    g_assert_cmpuint(sa.group_lost, ==, 0);
    g_assert_cmpuint(sb.group_lost, ==, 0);
    g_assert_cmpuint(sa.group_waits + sb.group_waits, >, 0);
    g_assert_cmpuint(sa.group_pages, ==, NSHARED - 20);
    check_bytes(&f->a);
    check_bytes(&f->b);
    g_assert_cmpint(kill(f->pid, SIGCONT), ==, 0);

    /* It answers again: the group goes on, the new pages meet */
    converge(f);
    sa = stats(&f->a);
    g_assert_cmpuint(sa.group_lost, ==, 0);
    g_assert_cmpuint(sa.group_pages, ==, NSHARED - 20 + 16);
    g_assert_cmpuint(stats(&f->b).group_pages, ==, NSHARED + 16);
    check_bytes(&f->a);
    check_bytes(&f->b);

    /* A's connection breaks; A joins again as QEMU does */
    rejoin(f, &f->a, "vm-a2");
    /* B gives everything back and stores other pages in freed slots */
    g_assert_true(ms_scanner_unmerge_all(f->b.s, NULL));
    for (size_t k = 0; k < 64; k++) {
        set_page(&f->b, 100 + k, 9000 + k % 32);
    }
    converge(f);
    g_assert_cmpuint(stats(&f->b).group_pages, >, 0);
    /* A still maps its old slots, which hold what A's guest wrote */
    g_assert_cmpuint(stats(&f->a).group_pages, >=, NSHARED - 20 + 16);
    check_bytes(&f->a);
    check_bytes(&f->b);
}

/* Pages of @r visited by one pass */
static uint64_t pass_visits(Region *r)
{
    uint64_t before = stats(r).pages_scanned;

    pass(r);
    return stats(r).pages_scanned - before;
}

/*
 * With a dirty log, a page the group missed is due again 1, 3, 7, ...
 * passes after its first lookup, and not visited in between.  A due
 * retry is asked only if something that can make it pay happened since:
 * A misses everything, and while two other members meet and publish
 * nothing A wants, its retries come and go without a visit or a
 * lookup.  Then B joins: its lookups meet A's misses in the broker's
 * unstable table, B uploads, and the broker tells A which of its misses
 * it answered (ANSWERED): A asks those pages again the pass after, and
 * nothing else.  From a broker that only counts the answers (STATS'
 * met, @data non-NULL) A learns that some were answered, and asks every
 * due retry.
 */
/* Two members of g1 that are not regions meet over a page A lacks */
static void others_meet(Fixture *f, uint64_t seed)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) d = NULL;
    g_autoptr(MsBrokerClient) e = NULL;
    g_autofree uint8_t *p = g_malloc(page);
    uint64_t h;
    MsProtoResult r;

    d = ms_broker_client_connect_as(f->path, broker_uid, "g1", "vm-d", 0,
                                    &err);
    g_assert_no_error(err);
    e = ms_broker_client_connect_as(f->path, broker_uid, "g1", "vm-e", 0,
                                    &err);
    g_assert_no_error(err);
    fill(p, seed);
    h = ms_broker_client_hash(d, p);
    g_assert_true(ms_broker_client_lookup(d, &h, 1, &r, &err));
    g_assert_cmpuint(r.status, ==, MS_STATUS_NOT_FOUND);
    g_assert_true(ms_broker_client_lookup(e, &h, 1, &r, &err));
    g_assert_cmpuint(r.status, ==, MS_STATUS_WANTED);
    g_assert_true(ms_broker_client_upload(e, p, NULL, 1, &r, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(r.status, ==, MS_STATUS_OK);
}

/* Write @seed's content into pages @i and @j of @r, as the guest would */
static void write_pair(Region *r, size_t i, size_t j, uint64_t seed)
{
    for (size_t k = 0; k < 2; k++) {
        size_t p = k ? j : i;

        fill(r->ram + p * page, seed);
        memcpy(r->expect + p * page, r->ram + p * page, page);
        r->dirty[p / 64] |= 1ULL << (p % 64);
    }
}

static void test_retry_wheel(Fixture *f, gconstpointer data)
{
    /* Where the broker says which misses it answered: A's own pair */
    uint64_t own = f->no_answers ? 0 : 2;
    MsProtoGroupStats g0;
    uint64_t busy = 0, lookups, merges;
    int n;

    (void)data;
    if (f->skip) {
        return;
    }
    /* Written, proved stable, looked up (and missed) */
    for (n = 0; n < 3; n++) {
        pass(&f->a);
    }
    g_assert_cmpuint(stats(&f->a).group_lookups, ==, NPAGES);
    /*
     * Retries due when the page is 2, 4, 8, 16, 32 passes older than
     * its wait (1, 3, 7, 15 and 31 passes after the first lookup): five
     * of 40 passes, each skipped
     */
    g0 = group_stats(&f->a);
    merges = stats(&f->a).merges;
    for (n = 0; n < 40; n++) {
        if (n % 4 == 0) {
            others_meet(f, 900000 + n);
        }
        if (n == 20 && own) {
            /*
             * A's own duplicates: their upload answers A's miss of the
             * first of them, news for A's retries only if it is not told
             * which miss that was
             */
            write_pair(&f->a, 900, 950, 777777);
        }
        busy += pass_visits(&f->a) != 0;
    }
    g_test_message("A alone: %" PRIu64 " of 40 passes visited its pages,"
                   " %" PRIu64 " retries skipped", busy,
                   stats(&f->a).group_retries_skipped);
    /* The group had news, none of it for A but its own */
    g_assert_cmpuint(group_stats(&f->a).wanted, ==, g0.wanted + 10);
    g_assert_cmpuint(group_stats(&f->a).published, ==,
                     g0.published + 10 + own / 2);
    g_assert_cmpuint(group_stats(&f->a).met, ==, own / 2);
    g_assert_cmpuint(stats(&f->a).merges, ==, merges + own);
    g_assert_cmpuint(stats(&f->a).group_answers, ==, own / 2);
    /* The pair's own passes: written, stable, looked up and merged */
    g_assert_cmpuint(busy, <=, own ? 5 : 0);
    /* The pair's last retries (at age 32) came after their write */
    g_assert_cmpuint(stats(&f->a).group_retries_skipped, ==,
                     5 * NPAGES - own);
    g_assert_cmpuint(stats(&f->a).group_lookups, ==, NPAGES + own);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, own);

    /* B meets A's misses; A finds the slots */
    for (n = 0; n < 100 && stats(&f->a).group_pages < NSHARED + own; n++) {
        pass(&f->a);
        pass(&f->b);
    }
    g_test_message("A mapped %" PRIu64 " group pages after %d more passes,"
                   " %" PRIu64 " lookups", stats(&f->a).group_pages, n,
                   stats(&f->a).group_lookups);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED + own);
    g_assert_cmpuint(stats(&f->b).group_pages, ==, NSHARED);
    if (f->no_answers) {
        /* At its retry at age 65, which the news lets through: all */
        g_assert_cmpuint(stats(&f->a).group_lookups, ==, 2 * NPAGES);
        g_assert_cmpuint(stats(&f->a).group_answers, ==, 0);
    } else {
        /* One lookup for each page B has, none for the others */
        g_assert_cmpuint(stats(&f->a).group_lookups, ==,
                         NPAGES + own + NSHARED);
        g_assert_cmpuint(stats(&f->a).group_answers, ==, 1 + NSHARED);
    }
    g_assert_cmpuint(stats(&f->a).group_lost, ==, 0);
    lookups = stats(&f->a).group_lookups;

    /* A retry that missed again is no news: the next ones are skipped */
    for (n = 0; n < 200; n++) {
        pass(&f->a);
        pass(&f->b);
    }
    g_assert_cmpuint(stats(&f->a).group_lookups, ==, lookups);
    check_bytes(&f->a);
    check_bytes(&f->b);
}

/*
 * A retry looks the page up by the hash its last read gave: the log
 * vouches that the page was not written since, so the retry reads nothing
 * (not even to test for zeros, which cost most of a retry).  A write the
 * log does not see, which QEMU's log never misses, shows whether it did:
 * pages A zeroes behind the log's back must not merge as zero pages at
 * the retries B's news lets through.
 */
static void test_retry_unread(Fixture *f, gconstpointer data)
{
    (void)data;
    if (f->skip) {
        return;
    }
    for (int n = 0; n < 3; n++) {
        pass(&f->a);
    }
    g_assert_cmpuint(stats(&f->a).group_lookups, ==, NPAGES);
    for (size_t i = 0; i < 16; i++) {
        memset(f->a.ram + i * page, 0, page);
        memset(f->a.expect + i * page, 0, page);
    }
    for (int n = 0; n < 40; n++) {
        pass(&f->a);
        pass(&f->b);
    }
    g_assert_cmpuint(stats(&f->a).zero_merges, ==, 0);
    g_assert_cmpuint(stats(&f->a).zero_holes, ==, 0);
    /* The retries were asked, with the zeroed pages among them */
    g_assert_cmpuint(stats(&f->a).group_lookups, >=, 2 * NPAGES);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED);
    check_bytes(&f->a);
    check_bytes(&f->b);
}

/* Passes of @r until its full scans reach @n */
static void pass_until(Region *r, uint64_t n)
{
    while (stats(r).full_scans < n) {
        pass(r);
    }
}

/*
 * A miss whose retries are spent is asked again at its chunk's turn in
 * the rolling sweep only if there is news since the chunk's last turn:
 * a turn with nothing new asks nothing.  A member that meets the page
 * much later is found the pass after, when the broker says which misses
 * it answered; from a broker that only counts them (@data non-NULL),
 * at the chunk's next turn, whatever the miss's backoff.
 */
static void test_sweep_news(Fixture *f, gconstpointer data)
{
    uint64_t skipped;
    int n;

    (void)data;
    if (f->skip) {
        return;
    }
    /* A alone: looked up, retries skipped, then its chunks' first turns */
    pass_until(&f->a, MS_SCAN_SWEEP_EVERY);
    g_assert_cmpuint(stats(&f->a).group_lookups, ==, 2 * NPAGES);
    skipped = stats(&f->a).group_retries_skipped;

    /* The next round's turns: nothing new, nothing asked */
    pass_until(&f->a, 2 * MS_SCAN_SWEEP_EVERY);
    g_assert_cmpuint(stats(&f->a).group_lookups, ==, 2 * NPAGES);
    g_assert_cmpuint(stats(&f->a).group_retries_skipped, ==,
                     skipped + NPAGES);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, 0);

    /* B meets A's misses and uploads; A maps the slots at its turn */
    for (n = 0; n < 10 && stats(&f->b).group_pages < NSHARED; n++) {
        pass(&f->b);
    }
    g_assert_cmpuint(stats(&f->b).group_pages, ==, NSHARED);
    g_assert_cmpuint(group_stats(&f->a).met, ==, NSHARED);
    if (!f->no_answers) {
        /* Told at the end of the next pass, mapped in the one after */
        pass(&f->a);
        pass(&f->a);
        g_assert_cmpuint(stats(&f->a).group_answers, ==, NSHARED);
        g_assert_cmpuint(stats(&f->a).group_lookups, ==,
                         2 * NPAGES + NSHARED);
        g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED);
        /* The turns after ask nothing more */
        pass_until(&f->a, 4 * MS_SCAN_SWEEP_EVERY);
        g_assert_cmpuint(stats(&f->a).group_lookups, ==,
                         2 * NPAGES + NSHARED);
        check_bytes(&f->a);
        check_bytes(&f->b);
        return;
    }
    pass_until(&f->a, 3 * MS_SCAN_SWEEP_EVERY - 2);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, 0);
    pass_until(&f->a, 3 * MS_SCAN_SWEEP_EVERY);
    g_assert_cmpuint(stats(&f->a).group_lookups, ==, 3 * NPAGES);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED);
    check_bytes(&f->a);
    check_bytes(&f->b);
}

/* Another member of g1 misses until the broker empties its table */
static void empty_table(Fixture *f)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) x = NULL;
    size_t n = UNSTABLE_PER_SLOT * f->slots / 2;
    g_autofree uint64_t *h = g_new(uint64_t, n);
    g_autofree MsProtoResult *r = g_new(MsProtoResult, n);

    x = ms_broker_client_connect_as(f->path, broker_uid, "g1", "vm-x", 0,
                                    &err);
    g_assert_no_error(err);
    for (size_t k = 0; k < n; k++) {
        h[k] = 0x7000000 + k;
    }
    /*
     * The table is emptied when half full: once here, with A's misses
     * in it, leaving X's last NPAGES
     */
    g_assert_true(ms_broker_client_lookup(x, h, n, r, &err));
    g_assert_no_error(err);
}

/*
 * An emptying of the broker's table of misses forgets every member's
 * misses, and each must ask them again to meet the members that miss
 * the same pages later.  If the retries of the wheel did so at once,
 * their misses would fill the table again at once: in a group of
 * eight, members kept emptying it for each other, and each emptying
 * made every member ask everything again.  So it is news for the
 * sweep's turns only: A's retries stay skipped, B (which misses after
 * the emptying) waits, and A meets B at its chunks' turns.
 */
static void test_reset_news(Fixture *f, gconstpointer data)
{
    uint64_t resets;

    (void)data;
    if (f->skip) {
        return;
    }
    pass_until(&f->a, 3);
    g_assert_cmpuint(stats(&f->a).group_lookups, ==, NPAGES);
    resets = group_stats(&f->a).unstable_resets;
    empty_table(f);
    g_assert_cmpuint(group_stats(&f->a).unstable_resets, ==, resets + 1);

    /* The wheel's 5 retries of each page: skipped */
    pass_until(&f->a, 43);
    g_assert_cmpuint(stats(&f->a).group_retries_skipped, ==, 5 * NPAGES);
    g_assert_cmpuint(stats(&f->a).group_lookups, ==, NPAGES);

    /* B misses first now, and finds nothing */
    for (int n = 0; n < 10; n++) {
        pass(&f->b);
    }
    g_assert_cmpuint(stats(&f->b).group_pages, ==, 0);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, 0);

    /* A's chunks' turns ask again, meet B's misses; then B finds them */
    pass_until(&f->a, MS_SCAN_SWEEP_EVERY);
    g_test_message("A: %" PRIu64 " lookups, %" PRIu64 " uploads, %" PRIu64
                   " hits, %" PRIu64 " group pages; B: %" PRIu64 " lookups",
                   stats(&f->a).group_lookups, stats(&f->a).group_uploads,
                   stats(&f->a).group_hits, stats(&f->a).group_pages,
                   stats(&f->b).group_lookups);
    g_assert_cmpuint(stats(&f->a).group_lookups, ==, 2 * NPAGES);
    g_assert_cmpuint(stats(&f->a).group_pages, ==, NSHARED);
    for (int n = 0; n < 3; n++) {
        pass(&f->b);
    }
    g_assert_cmpuint(stats(&f->b).group_pages, ==, NSHARED);
    check_bytes(&f->a);
    check_bytes(&f->b);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    page = ms_host_page_size();
    broker_uid = geteuid();
    signal(SIGPIPE, SIG_IGN);
    g_test_add("/group/share", Fixture, NULL, setup, test_share, teardown);
    g_test_add("/group/broker-dies", Fixture, NULL, setup, test_broker_dies,
               teardown);
    g_test_add("/group/rejoin", Fixture, NULL, setup, test_rejoin, teardown);
    g_test_add("/group/broker-stops", Fixture, NULL, setup,
               test_broker_stops, teardown);
    g_test_add("/group/rejoin-fake", Fixture, NULL, setup, test_rejoin_fake,
               teardown);
    g_test_add("/group/discard", Fixture, NULL, setup, test_discard,
               teardown);
    g_test_add("/group/stall", Fixture, GINT_TO_POINTER(300), setup,
               test_stall, teardown);
    g_test_add("/group/retry-wheel", Fixture, NULL, setup_log,
               test_retry_wheel, teardown);
    g_test_add("/group/retry-wheel-counted", Fixture, "counted", setup_log,
               test_retry_wheel, teardown);
    /* Every due retry asked: the zeroed pages, which B lacks, too */
    g_test_add("/group/retry-unread", Fixture, "counted", setup_log,
               test_retry_unread, teardown);
    g_test_add("/group/sweep-news", Fixture, NULL, setup_log,
               test_sweep_news, teardown);
    g_test_add("/group/sweep-news-counted", Fixture, "counted", setup_log,
               test_sweep_news, teardown);
    g_test_add("/group/reset-news", Fixture, NULL, setup_log_big,
               test_reset_news, teardown);
    return g_test_run();
}
