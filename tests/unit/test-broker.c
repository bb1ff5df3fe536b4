/*
 * Tests of mem-share-broker, through its socket
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Each test starts the real daemon ($MS_BROKER, set by meson) on a
 * socket in a fresh directory, with small stores (1024 slots) and a
 * small reference quota, and talks to it with the client library or, to
 * play a hostile client, with raw bytes.  What the broker did is checked
 * where a guest would see it: the bytes of the store mapped from the
 * descriptor it hands out, the memfd's allocated pages (a freed slot is
 * a hole again), and the group statistics.
 *
 * Nothing waits on a timer where a reply can be awaited: a client sees
 * its own requests answered in order.  References go only when their
 * client releases them or its process exits (a connection that ends
 * proves nothing): the tests that check this poll the statistics until
 * the broker noticed the exit, within a generous deadline.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib.h>

#include "mem-share/broker-client.h"
#include "mem-share/hash.h"
#include "mem-share/proto.h"
#include "fake-broker.h"

#define NSLOTS 1024
/* Entries of the broker's table of misses (UNSTABLE_PER_SLOT per slot) */
#define UNSTABLE (4 * NSLOTS)
#define NOBODY 65534
#define QUOTA 64
#define MAX_CLIENTS 12
#define DEADLINE_US (10 * G_USEC_PER_SEC)

static size_t page;
/* What members expect: the broker runs as the test does */
static uid_t broker_uid;

typedef struct Fixture {
    const char *const *extra;   /* more broker arguments */
    bool as_nobody;             /* the broker runs as uid 65534 */
    char *dir;
    char *path;
    char *log;
    GPid pid;
} Fixture;

/* Broker process */

static void broker_start(Fixture *f)
{
    const char *bin = g_getenv("MS_BROKER");
    g_autofree char *max_store = g_strdup_printf("%zu", NSLOTS * page);
    g_autofree char *quota = g_strdup_printf("%d", QUOTA);
    g_autofree char *maxc = g_strdup_printf("%d", MAX_CLIENTS);
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    int logfd;

    g_assert_nonnull(bin);
    g_ptr_array_add(argv, (char *)bin);
    g_ptr_array_add(argv, (char *)"--socket");
    g_ptr_array_add(argv, f->path);
    g_ptr_array_add(argv, (char *)"--max-store");
    g_ptr_array_add(argv, max_store);
    g_ptr_array_add(argv, (char *)"--client-quota");
    g_ptr_array_add(argv, quota);
    g_ptr_array_add(argv, (char *)"--max-clients");
    g_ptr_array_add(argv, maxc);
    /*
     * Every client here is this test's uid, and the flood test wants the
     * cap exact: test-broker-service.c tests the per-uid share and the
     * reserve
     */
    g_ptr_array_add(argv, (char *)"--max-clients-per-uid");
    g_ptr_array_add(argv, maxc);
    g_ptr_array_add(argv, (char *)"--reserved-clients");
    g_ptr_array_add(argv, (char *)"0");
    for (int i = 0; f->extra && f->extra[i]; i++) {
        g_ptr_array_add(argv, (char *)f->extra[i]);
    }
    g_ptr_array_add(argv, NULL);
    f->pid = fork();
    g_assert_cmpint(f->pid, >=, 0);
    if (f->pid == 0) {
        /* A failed assertion aborts the test: take the broker along */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        logfd = open(f->log, O_WRONLY | O_CREAT | O_APPEND, 0600);
        dup2(logfd, 1);
        dup2(logfd, 2);
        if (f->as_nobody &&
            (setgroups(0, NULL) < 0 || setresgid(NOBODY, NOBODY, NOBODY) < 0 ||
             setresuid(NOBODY, NOBODY, NOBODY) < 0)) {
            _exit(126);
        }
        execv(bin, (char **)argv->pdata);
        _exit(127);
    }
    /* Ready when it accepts a connection */
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

static void broker_kill(Fixture *f)
{
    int status;

    if (f->pid > 0) {
        kill(f->pid, SIGKILL);
        g_assert_cmpint(waitpid(f->pid, &status, 0), ==, f->pid);
        f->pid = 0;
    }
}

static void fixture_setup(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;

    f->extra = data;
    f->dir = g_dir_make_tmp("test-broker-XXXXXX", &err);
    g_assert_no_error(err);
    f->path = g_build_filename(f->dir, "broker.sock", NULL);
    f->log = g_build_filename(f->dir, "broker.log", NULL);
    broker_start(f);
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
    int status;

    (void)data;
    if (f->pid > 0) {
        /* A clean shutdown removes the socket */
        kill(f->pid, SIGTERM);
        g_assert_cmpint(waitpid(f->pid, &status, 0), ==, f->pid);
        g_assert_true(WIFEXITED(status));
        g_assert_cmpint(WEXITSTATUS(status), ==, 0);
        g_assert_false(g_file_test(f->path, G_FILE_TEST_EXISTS));
    }
    unlink(f->path);
    unlink(f->log);
    rmdir(f->dir);
    g_free(f->path);
    g_free(f->log);
    g_free(f->dir);
}

/* Clients and the store */

static MsBrokerClient *join_store(Fixture *f, const char *group,
                                  const char *name, uint32_t nslots)
{
    g_autoptr(GError) err = NULL;
    MsBrokerClient *c = ms_broker_client_connect_as(f->path, broker_uid,
                                                    group, name, 0, &err);

    g_assert_no_error(err);
    g_assert_nonnull(c);
    g_assert_cmpuint(ms_broker_client_params(c)->page_size, ==, page);
    g_assert_cmpuint(ms_broker_client_params(c)->nslots, ==, nslots);
    return c;
}

static MsBrokerClient *join(Fixture *f, const char *group, const char *name)
{
    return join_store(f, group, name, NSLOTS);
}

static void fill(uint8_t *p, uint64_t seed)
{
    uint64_t *w = (uint64_t *)p;

    for (size_t i = 0; i < page / 8; i++) {
        w[i] = seed * 0x9e3779b97f4a7c15ULL + i;
    }
}

static uint32_t upload(MsBrokerClient *c, const void *p)
{
    g_autoptr(GError) err = NULL;
    MsProtoResult r;

    g_assert_true(ms_broker_client_upload(c, p, NULL, 1, &r, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(r.status, ==, MS_STATUS_OK);
    return r.slot;
}

static MsProtoResult lookup(MsBrokerClient *c, uint64_t hash)
{
    g_autoptr(GError) err = NULL;
    MsProtoResult r;

    g_assert_true(ms_broker_client_lookup(c, &hash, 1, &r, &err));
    g_assert_no_error(err);
    return r;
}

static MsProtoGroupStats stats(MsBrokerClient *c)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GArray) groups = NULL;

    g_assert_true(ms_broker_client_stats(c, &groups, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(groups->len, ==, 1);
    return g_array_index(groups, MsProtoGroupStats, 0);
}

/* The whole store, mapped the way a guest maps it */
static uint8_t *map_store(MsBrokerClient *c)
{
    uint8_t *m = mmap(NULL, NSLOTS * page, PROT_READ, MAP_PRIVATE,
                      ms_broker_client_store_fd(c), 0);

    g_assert_true(m != MAP_FAILED);
    return m;
}

static bool slot_has_data(MsBrokerClient *c, uint32_t slot)
{
    off_t off = (off_t)slot * page;

    return lseek(ms_broker_client_store_fd(c), off, SEEK_DATA) == off;
}

/* Tests */

/* Two members of a group share one slot: same memfd, same bytes */
static void test_share(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join(f, "g1", "vm-a");
    g_autoptr(MsBrokerClient) b = join(f, "g1", "vm-b");
    g_autofree uint8_t *p = g_malloc(page);
    struct stat sa, sb;
    uint8_t *ma, *mb;
    uint32_t slot;
    MsProtoResult r;
    MsProtoGroupStats gs;

    (void)data;
    fill(p, 1);
    g_assert_cmphex(ms_broker_client_hash(a, p), ==,
                    ms_broker_client_hash(b, p));
    r = lookup(b, ms_broker_client_hash(b, p));
    g_assert_cmpuint(r.status, ==, MS_STATUS_NOT_FOUND);

    slot = upload(a, p);
    r = lookup(b, ms_broker_client_hash(b, p));
    g_assert_cmpuint(r.status, ==, MS_STATUS_OK);
    g_assert_cmpuint(r.slot, ==, slot);
    /* Uploading the same content again finds the same slot */
    g_assert_cmpuint(upload(b, p), ==, slot);

    g_assert_cmpint(fstat(ms_broker_client_store_fd(a), &sa), ==, 0);
    g_assert_cmpint(fstat(ms_broker_client_store_fd(b), &sb), ==, 0);
    g_assert_cmpuint(sa.st_ino, ==, sb.st_ino);
    g_assert_cmpint(sa.st_size, ==, (off_t)NSLOTS * page);
    ma = map_store(a);
    mb = map_store(b);
    g_assert_cmpmem(ma + slot * page, page, p, page);
    g_assert_cmpmem(mb + slot * page, page, p, page);

    /* The store is read-only for members */
    g_assert_true(mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED,
                       ms_broker_client_store_fd(b), 0) == MAP_FAILED);
    g_assert_cmpint(errno, ==, EACCES);

    gs = stats(b);
    g_assert_cmpstr(gs.name, ==, "g1");
    g_assert_cmpuint(gs.clients, ==, 2);
    g_assert_cmpuint(gs.slots_used, ==, 1);
    g_assert_cmpuint(gs.shared_slots, ==, 1);
    g_assert_cmpuint(gs.refs, ==, 3);
    g_assert_cmpuint(gs.bytes_held, ==, page);
    g_assert_cmpuint(gs.bytes_saved, ==, 2 * page);
    g_assert_cmpuint(gs.published, ==, 1);
    g_assert_cmpuint(gs.hits, ==, 1);
    munmap(ma, NSLOTS * page);
    munmap(mb, NSLOTS * page);
}

/*
 * Two members that each have a page once meet through the group's
 * unstable table: the second to miss is told WANTED, uploads, and the
 * first finds the slot; nobody is told WANTED for its own misses, and a
 * member of another group never meets them.  The first member's STATS
 * count the answer (met), and only its own: it asks its misses again
 * when met moved (scan.c, "Groups").  A slot uploaded without a
 * meeting answers a waiting miss too.
 */
static void test_wanted(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join(f, "g1", "vm-a");
    g_autoptr(MsBrokerClient) b = join(f, "g1", "vm-b");
    g_autoptr(MsBrokerClient) x = join(f, "g2", "vm-x");
    g_autofree uint8_t *p = g_malloc(page);
    uint64_t h;
    uint32_t slot;
    MsProtoResult r;

    (void)data;
    fill(p, 7);
    h = ms_broker_client_hash(a, p);
    g_assert_cmpuint(lookup(a, h).status, ==, MS_STATUS_NOT_FOUND);
    g_assert_cmpuint(lookup(a, h).status, ==, MS_STATUS_NOT_FOUND);
    g_assert_cmpuint(lookup(x, ms_broker_client_hash(x, p)).status, ==,
                     MS_STATUS_NOT_FOUND);
    g_assert_cmpuint(stats(a).wanted, ==, 0);
    g_assert_cmpuint(stats(a).met, ==, 0);
    r = lookup(b, h);
    g_assert_cmpuint(r.status, ==, MS_STATUS_WANTED);
    g_assert_cmpuint(r.slot, ==, UINT32_MAX);
    /* What a member waits for before it asks a miss again (scan.c) */
    g_assert_cmpuint(stats(a).wanted, ==, 1);
    g_assert_cmpuint(stats(a).met, ==, 1);
    g_assert_cmpuint(stats(b).met, ==, 0);
    g_assert_cmpuint(stats(x).met, ==, 0);
    slot = upload(b, p);
    g_assert_cmpuint(stats(a).met, ==, 1);
    r = lookup(a, h);
    g_assert_cmpuint(r.status, ==, MS_STATUS_OK);
    g_assert_cmpuint(r.slot, ==, slot);
    g_assert_cmpuint(stats(a).shared_slots, ==, 1);
    /* The other group still has nothing */
    g_assert_cmpuint(lookup(x, ms_broker_client_hash(x, p)).status, ==,
                     MS_STATUS_NOT_FOUND);

    /* B's miss waits; A uploads the page without being told: B is told */
    fill(p, 8);
    h = ms_broker_client_hash(b, p);
    g_assert_cmpuint(lookup(b, h).status, ==, MS_STATUS_NOT_FOUND);
    g_assert_cmpuint(stats(b).met, ==, 0);
    slot = upload(a, p);
    g_assert_cmpuint(stats(b).met, ==, 1);
    g_assert_cmpuint(stats(a).met, ==, 1);
    r = lookup(b, h);
    g_assert_cmpuint(r.status, ==, MS_STATUS_OK);
    g_assert_cmpuint(r.slot, ==, slot);
}

/* ANSWERED: the hashes, whether some were lost, the unstable resets */
static GArray *answered(MsBrokerClient *c, bool *lost, uint64_t *resets)
{
    g_autoptr(GError) err = NULL;
    uint64_t features = 0, r = 0;
    GArray *hashes = NULL;

    g_assert_true(ms_broker_client_features(c, &features, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(features & MS_FEATURE_ANSWERED, !=, 0);
    g_assert_true(ms_broker_client_answered(c, &hashes, lost,
                                            resets ? resets : &r, &err));
    g_assert_no_error(err);
    return hashes;
}

static void assert_answers(MsBrokerClient *c, bool lost,
                           const uint64_t *want, guint n)
{
    g_autoptr(GArray) got = NULL;
    bool got_lost;

    got = answered(c, &got_lost, NULL);
    g_assert_cmpint(got_lost, ==, lost);
    g_assert_cmpmem(got->data, got->len * sizeof(uint64_t),
                    want, n * sizeof(uint64_t));
}

/*
 * ANSWERED (broker.c, "Meeting"): a member gets the hashes of its own
 * misses that were answered since it last asked, by a meeting or by a
 * new slot; nobody else's, and nothing twice.  Answers are kept from
 * its first ANSWERED on, which says that earlier ones were lost, as
 * does the one after more answers than a reply may carry.
 */
static void test_answered(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join(f, "g1", "vm-a");
    g_autoptr(MsBrokerClient) b = join(f, "g1", "vm-b");
    g_autoptr(MsBrokerClient) x = join(f, "g2", "vm-x");
    g_autofree uint8_t *p = g_malloc(page);
    uint64_t h1 = 0x1111, h2, resets = 1;
    bool lost;

    (void)data;
    /* Before the first ANSWERED, nothing is kept: lost */
    g_assert_cmpuint(lookup(a, h1).status, ==, MS_STATUS_NOT_FOUND);
    g_assert_cmpuint(lookup(b, h1).status, ==, MS_STATUS_WANTED);
    assert_answers(a, true, NULL, 0);
    assert_answers(b, true, NULL, 0);
    assert_answers(x, true, NULL, 0);
    assert_answers(a, false, NULL, 0);

    /* A meeting answers the first member's miss, not the second's */
    h1++;
    g_assert_cmpuint(lookup(a, h1).status, ==, MS_STATUS_NOT_FOUND);
    assert_answers(a, false, NULL, 0);
    g_assert_cmpuint(lookup(b, h1).status, ==, MS_STATUS_WANTED);
    assert_answers(a, false, &h1, 1);
    assert_answers(a, false, NULL, 0);
    assert_answers(b, false, NULL, 0);

    /* A new slot answers B's miss; A's own upload answers none of A's */
    fill(p, 9);
    h2 = ms_broker_client_hash(b, p);
    g_assert_cmpuint(lookup(b, h2).status, ==, MS_STATUS_NOT_FOUND);
    upload(a, p);
    assert_answers(b, false, &h2, 1);
    assert_answers(a, false, NULL, 0);
    /* The other group heard of none of it */
    assert_answers(x, false, NULL, 0);
    /* met counts every answer, kept or not */
    g_assert_cmpuint(stats(a).met, ==, 2);
    g_assert_cmpuint(stats(b).met, ==, 1);
    /* The reply carries the group's resets: none so far */
    {
        g_autoptr(GArray) none = answered(a, &lost, &resets);

        g_assert_cmpuint(none->len, ==, 0);
        g_assert_cmpuint(resets, ==, stats(a).unstable_resets);
        g_assert_cmpuint(resets, ==, 0);
    }

    /* One more than a reply may carry: the list is cut, and says so */
    for (uint64_t k = 0; k <= MS_PROTO_MAX_ANSWERED; k++) {
        g_assert_cmpuint(lookup(a, 0x100000 + k).status, ==,
                         MS_STATUS_NOT_FOUND);
        g_assert_cmpuint(lookup(b, 0x100000 + k).status, ==,
                         MS_STATUS_WANTED);
    }
    {
        g_autoptr(GArray) got = answered(a, &lost, NULL);

        g_assert_true(lost);
        g_assert_cmpuint(got->len, ==, MS_PROTO_MAX_ANSWERED);
        for (guint k = 0; k < got->len; k++) {
            g_assert_cmpuint(g_array_index(got, uint64_t, k), ==,
                             0x100000 + k);
        }
    }
    assert_answers(a, false, NULL, 0);
}

/*
 * The unstable table has UNSTABLE entries (4 a slot of the store) and is
 * emptied when half full (broker.c, "Meeting"): a pending meeting
 * survives fewer misses than that, and a wipe only costs a meeting one
 * more round.  STATS counts the wipes: members ask their misses again
 * after one (scan.c, "Groups").
 */
static void test_unstable_full(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join(f, "g1", "vm-a");
    g_autoptr(MsBrokerClient) b = join(f, "g1", "vm-b");
    g_autoptr(MsBrokerClient) x = join(f, "g1", "vm-x");
    const uint64_t h = 0xfeedface;

    (void)data;
    g_assert_cmpuint(lookup(a, h).status, ==, MS_STATUS_NOT_FOUND);
    for (uint64_t k = 1; k < UNSTABLE / 2 - 1; k++) {
        g_assert_cmpuint(lookup(x, h + k).status, ==, MS_STATUS_NOT_FOUND);
    }
    g_assert_cmpuint(lookup(b, h).status, ==, MS_STATUS_WANTED);
    g_assert_cmpuint(stats(a).unstable_resets, ==, 0);

    /* Past half full, the table starts again: the meeting waits a round */
    g_assert_cmpuint(lookup(a, h + UNSTABLE).status, ==, MS_STATUS_NOT_FOUND);
    for (uint64_t k = 1; k <= UNSTABLE / 2; k++) {
        g_assert_cmpuint(lookup(x, h + UNSTABLE + k).status, ==,
                         MS_STATUS_NOT_FOUND);
    }
    g_assert_cmpuint(stats(a).unstable_resets, ==, 1);
    {
        /* ANSWERED says so too: A's misses may be forgotten */
        uint64_t resets = 0;
        bool lost;
        g_autoptr(GArray) got = answered(a, &lost, &resets);

        g_assert_cmpuint(resets, ==, 1);
    }
    g_assert_cmpuint(stats(a).wanted, ==, 1);
    g_assert_cmpuint(lookup(b, h + UNSTABLE).status, ==, MS_STATUS_NOT_FOUND);
    g_assert_cmpuint(lookup(a, h + UNSTABLE).status, ==, MS_STATUS_WANTED);
}

/* The broker's anonymous memory, in KiB */
static uint64_t broker_anon_kib(Fixture *f)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/status", f->pid);
    g_autofree char *text = NULL;
    const char *line;

    g_assert_true(g_file_get_contents(path, &text, NULL, NULL));
    line = strstr(text, "\nRssAnon:");
    g_assert_nonnull(line);
    return g_ascii_strtoull(line + strlen("\nRssAnon:"), NULL, 10);
}

/* @c misses @n hashes from @first on, none of which anybody missed yet */
static void miss_new(MsBrokerClient *c, uint64_t first, size_t n)
{
    g_autofree uint64_t *h = g_new(uint64_t, MS_PROTO_MAX_LOOKUP);
    g_autofree MsProtoResult *r = g_new(MsProtoResult, MS_PROTO_MAX_LOOKUP);

    while (n) {
        size_t k = MIN(n, MS_PROTO_MAX_LOOKUP);
        g_autoptr(GError) err = NULL;

        for (size_t i = 0; i < k; i++) {
            h[i] = first++;
        }
        g_assert_true(ms_broker_client_lookup(c, h, k, r, &err));
        g_assert_no_error(err);
        for (size_t i = 0; i < k; i++) {
            g_assert_cmpuint(r[i].status, ==, MS_STATUS_NOT_FOUND);
        }
        n -= k;
    }
}

/* A 1 GiB store: its unstable table may grow to 2^20 entries, 8 MiB */
#define BIG_NSLOTS (1u << 18)
#define BIG_UNSTABLE (4 * BIG_NSLOTS)
/* broker.c's UNSTABLE_MIN: a new group's table */
#define UNSTABLE_FIRST (1u << 16)

static const char *const big_store_args[] = { "--max-store", "1G", NULL };
/* A client that holds one slot hundreds of times */
static const char *const many_refs_args[] = {
    "--client-quota", "1024", NULL
};

/*
 * A group's table of misses starts at UNSTABLE_FIRST entries and doubles
 * when half full, up to its size for the store (broker.c, "Meeting"):
 * a table of its full size from the start had all its pages touched
 * after a few thousand misses, however few pages the members had.
 * Growing empties it like a wipe, and members are told so; at its full
 * size it is wiped when half full, and grows no more.
 */
static void test_unstable_grows(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join_store(f, "g1", "vm-a", BIG_NSLOTS);
    uint64_t next = 0x1000000, resets = 0, anon;
    size_t half;

    (void)data;
    anon = broker_anon_kib(f);
    miss_new(a, next, UNSTABLE_FIRST / 2);
    next += UNSTABLE_FIRST / 2;
    /* A full-size table would have 8 MiB touched by now */
    g_assert_cmpuint(broker_anon_kib(f), <, anon + 2048);
    g_assert_cmpuint(stats(a).unstable_resets, ==, 0);

    for (size_t size = UNSTABLE_FIRST; size <= BIG_UNSTABLE; size *= 2) {
        /* Half full: the next miss empties it (from now: one entry) */
        miss_new(a, next++, 1);
        g_assert_cmpuint(stats(a).unstable_resets, ==, ++resets);
        /* Twice the size: half full again after as many misses more */
        half = MIN(size * 2, BIG_UNSTABLE) / 2;
        miss_new(a, next, half - 1);
        next += half - 1;
        g_assert_cmpuint(stats(a).unstable_resets, ==, resets);
    }
    /* It stopped at its full size: half full now, not a quarter */
    miss_new(a, next, 1);
    g_assert_cmpuint(stats(a).unstable_resets, ==, ++resets);
}

/*
 * Meetings leave no tombstones behind that nothing probes past: a group
 * whose members meet over many more pages than its table could hold
 * tombstones for never empties it, and so never makes its members ask
 * all their misses again.
 */
static void test_unstable_meetings(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join(f, "g1", "vm-a");
    g_autoptr(MsBrokerClient) b = join(f, "g1", "vm-b");

    (void)data;
    for (uint64_t k = 0; k < 4 * UNSTABLE; k++) {
        g_assert_cmpuint(lookup(a, 0x5000000 + k).status, ==,
                         MS_STATUS_NOT_FOUND);
        g_assert_cmpuint(lookup(b, 0x5000000 + k).status, ==,
                         MS_STATUS_WANTED);
    }
    g_assert_cmpuint(stats(a).wanted, ==, 4 * UNSTABLE);
    g_assert_cmpuint(stats(a).unstable_resets, ==, 0);
}

/* Releasing references frees the slot at zero, not before */
static void test_release(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join(f, "g1", "vm-a");
    g_autoptr(MsBrokerClient) b = join(f, "g1", "vm-b");
    g_autofree uint8_t *p = g_malloc(page);
    g_autoptr(GError) err = NULL;
    uint64_t released = 0;
    uint32_t slot;
    MsProtoGroupStats gs;

    (void)data;
    fill(p, 2);
    slot = upload(a, p);
    g_assert_cmpuint(lookup(b, ms_broker_client_hash(b, p)).slot, ==, slot);
    g_assert_cmpuint(lookup(b, ms_broker_client_hash(b, p)).slot, ==, slot);
    g_assert_true(slot_has_data(a, slot));

    g_assert_true(ms_broker_client_release(b, &slot, &(uint32_t){ 2 }, 1,
                                           &released, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(released, ==, 2);
    gs = stats(a);
    g_assert_cmpuint(gs.refs, ==, 1);
    g_assert_cmpuint(gs.shared_slots, ==, 0);
    g_assert_true(slot_has_data(a, slot));

    /* Counts past a byte, which the broker keeps aside (held.c) */
    for (int i = 0; i < 300; i++) {
        g_assert_cmpuint(lookup(b, ms_broker_client_hash(b, p)).slot, ==,
                         slot);
    }
    g_assert_cmpuint(stats(a).refs, ==, 301);
    g_assert_true(ms_broker_client_release(b, &slot, &(uint32_t){ 100 }, 1,
                                           &released, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(released, ==, 100);
    g_assert_true(ms_broker_client_release(b, &slot, &(uint32_t){ 200 }, 1,
                                           &released, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(released, ==, 200);
    gs = stats(a);
    g_assert_cmpuint(gs.refs, ==, 1);
    g_assert_cmpuint(gs.shared_slots, ==, 0);
    g_assert_true(slot_has_data(a, slot));

    g_assert_true(ms_broker_client_release(a, &slot, NULL, 1, NULL, &err));
    g_assert_no_error(err);
    gs = stats(a);
    g_assert_cmpuint(gs.refs, ==, 0);
    g_assert_cmpuint(gs.slots_used, ==, 0);
    g_assert_false(slot_has_data(a, slot));
    g_assert_cmpuint(lookup(b, ms_broker_client_hash(b, p)).status, ==,
                     MS_STATUS_NOT_FOUND);
}

/* Groups do not see each other's pages, stores or secrets */
static void test_groups(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join(f, "g1", "vm-a");
    g_autoptr(MsBrokerClient) c = join(f, "g2", "vm-c");
    g_autofree uint8_t *p = g_malloc(page);
    const MsBrokerParams *pa = ms_broker_client_params(a);
    const MsBrokerParams *pc = ms_broker_client_params(c);
    struct stat sa, sc;
    uint32_t slot, slot_c;
    uint8_t *mc;

    (void)data;
    fill(p, 3);
    g_assert_true(memcmp(pa->key.secret, pc->key.secret,
                         MS_HASH_SECRET_SIZE) != 0);
    slot = upload(a, p);
    /* Neither with its own group's hash nor with the other's */
    g_assert_cmpuint(lookup(c, ms_broker_client_hash(c, p)).status, ==,
                     MS_STATUS_NOT_FOUND);
    g_assert_cmpuint(lookup(c, ms_broker_client_hash(a, p)).status, ==,
                     MS_STATUS_NOT_FOUND);

    g_assert_cmpint(fstat(ms_broker_client_store_fd(a), &sa), ==, 0);
    g_assert_cmpint(fstat(ms_broker_client_store_fd(c), &sc), ==, 0);
    g_assert_cmpuint(sa.st_ino, !=, sc.st_ino);
    /* The other group's slot is a hole in this group's store */
    g_assert_false(slot_has_data(c, slot));

    slot_c = upload(c, p);
    mc = map_store(c);
    g_assert_cmpmem(mc + slot_c * page, page, p, page);
    g_assert_cmpuint(stats(a).refs, ==, 1);
    g_assert_cmpuint(stats(c).refs, ==, 1);
    munmap(mc, NSLOTS * page);
}

static const char *const locked_args[] = {
    "--socket-mode", "0666", "--group", "locked:uid=4242", NULL
};

/* In a child running as @uid: join @group, exit with the error code */
static int join_as(Fixture *f, uid_t uid, const char *group)
{
    pid_t child = fork();
    int status;

    g_assert_cmpint(child, >=, 0);
    if (child == 0) {
        GError *err = NULL;
        MsBrokerClient *c;
        int code;

        if (setgid(uid) < 0 || setuid(uid) < 0) {
            _exit(100);
        }
        c = ms_broker_client_connect_as(f->path, broker_uid, group,
                                        "child", 0, &err);
        code = c ? 0 : err->code < 100 ? err->code : 99;
        ms_broker_client_free(c);
        g_clear_error(&err);
        _exit(code);
    }
    g_assert_cmpint(waitpid(child, &status, 0), ==, child);
    g_assert_true(WIFEXITED(status));
    return WEXITSTATUS(status);
}

/* A group restricted to some uids refuses the others */
static void test_group_uids(Fixture *f, gconstpointer data)
{
    (void)data;
    if (geteuid() != 0) {
        g_test_skip("needs root to run clients as other uids");
        return;
    }
    /* Let other uids reach the socket: the mode says 0666 */
    g_assert_cmpint(chmod(f->dir, 0755), ==, 0);
    g_assert_cmpint(join_as(f, 4243, "locked"), ==, EACCES);
    g_assert_cmpint(join_as(f, 4242, "locked"), ==, 0);
    g_assert_cmpint(join_as(f, 4243, "open"), ==, 0);
}

/* A declaration says who may join: here, anyone */
static const char *const strict_args[] = {
    "--strict-groups", "--group", "only:uid=*", NULL
};

/* With --strict-groups only the configured groups exist */
static void test_strict_groups(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) c = NULL;
    g_autoptr(MsBrokerClient) only = join(f, "only", "me");

    (void)data;
    g_assert_true(ms_broker_client_alive(only));
    c = ms_broker_client_connect_as(f->path, broker_uid, "other", "me", 0,
                                    &err);
    g_assert_null(c);
    g_assert_error(err, MS_ENGINE_ERROR, ENOENT);
    g_assert_nonnull(strstr(err->message, "no group other"));
}

/* The per-client reference quota */
static void test_quota(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join(f, "g1", "vm-a");
    g_autofree uint8_t *p = g_malloc(page);
    uint64_t hashes[QUOTA + 8];
    MsProtoResult r[QUOTA + 8];
    g_autoptr(GError) err = NULL;

    (void)data;
    fill(p, 4);
    upload(a, p);
    for (int i = 0; i < QUOTA + 8; i++) {
        hashes[i] = ms_broker_client_hash(a, p);
    }
    g_assert_true(ms_broker_client_lookup(a, hashes, QUOTA + 8, r, &err));
    g_assert_no_error(err);
    for (int i = 0; i < QUOTA + 8; i++) {
        /* one reference is the upload's */
        g_assert_cmpuint(r[i].status, ==, i < QUOTA - 1 ? MS_STATUS_OK
                                                        : MS_STATUS_QUOTA);
    }
    g_assert_cmpuint(stats(a).refs, ==, QUOTA);
}

/* A client killed with SIGKILL loses its references */
static void test_client_killed(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) obs = join(f, "g1", "observer");
    int ready[2];
    pid_t child;
    char byte;
    gint64 deadline;
    MsProtoGroupStats gs;

    (void)data;
    g_assert_cmpint(pipe(ready), ==, 0);
    child = fork();
    g_assert_cmpint(child, >=, 0);
    if (child == 0) {
        MsBrokerClient *c = ms_broker_client_connect_as(f->path, broker_uid,
                                                        "g1", "victim", 0,
                                                        NULL);
        uint8_t *p = g_malloc(page * 3);
        MsProtoResult r[3];
        uint64_t h;

        for (int i = 0; i < 3; i++) {
            fill(p + i * page, 100 + i);
        }
        h = c ? ms_broker_client_hash(c, p) : 0;
        if (!c || !ms_broker_client_upload(c, p, NULL, 3, r, NULL) ||
            !ms_broker_client_lookup(c, &h, 1, r, NULL) ||
            write(ready[1], "r", 1) != 1) {
            _exit(1);
        }
        pause();
        _exit(0);
    }
    close(ready[1]);
    g_assert_cmpint(read(ready[0], &byte, 1), ==, 1);
    close(ready[0]);

    gs = stats(obs);
    g_assert_cmpuint(gs.clients, ==, 2);
    g_assert_cmpuint(gs.slots_used, ==, 3);
    g_assert_cmpuint(gs.refs, ==, 4);
    {
        uint32_t with_data = 0;

        for (uint32_t s = 0; s < NSLOTS; s++) {
            with_data += slot_has_data(obs, s);
        }
        g_assert_cmpuint(with_data, ==, 3);
    }

    kill(child, SIGKILL);
    g_assert_cmpint(waitpid(child, NULL, 0), ==, child);
    /* The broker notices the exit when it next polls */
    deadline = g_get_monotonic_time() + DEADLINE_US;
    while ((gs = stats(obs)).clients != 1 || gs.refs) {
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(1000);
    }
    g_assert_cmpuint(gs.slots_used, ==, 0);
    g_assert_cmpuint(gs.refs, ==, 0);
    for (uint32_t s = 0; s < NSLOTS; s++) {
        g_assert_false(slot_has_data(obs, s));
    }
}

/* The broker dies: mappings stay, calls fail, a new broker can be joined */
static void test_broker_killed(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join(f, "g1", "vm-a");
    g_autoptr(MsBrokerClient) again = NULL;
    g_autofree uint8_t *p = g_malloc(page);
    g_autoptr(GError) err = NULL;
    MsProtoResult r;
    uint64_t h;
    uint32_t slot;
    uint8_t *m;

    (void)data;
    fill(p, 5);
    slot = upload(a, p);
    m = map_store(a);
    g_assert_cmpmem(m + slot * page, page, p, page);

    broker_kill(f);
    g_assert_cmpmem(m + slot * page, page, p, page);

    h = ms_broker_client_hash(a, p);
    g_assert_false(ms_broker_client_lookup(a, &h, 1, &r, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EPIPE);
    g_assert_false(ms_broker_client_alive(a));
    g_clear_error(&err);
    g_assert_false(ms_broker_client_lookup(a, &h, 1, &r, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EPIPE);
    g_assert_nonnull(strstr(err->message, "reconnect"));

    /* Still the same bytes, also through a fresh mapping of the fd */
    g_assert_cmpmem(m + slot * page, page, p, page);
    munmap(m, NSLOTS * page);
    m = map_store(a);
    g_assert_cmpmem(m + slot * page, page, p, page);
    munmap(m, NSLOTS * page);

    /* A new broker replaces the stale socket; the old store is not its */
    broker_start(f);
    again = join(f, "g1", "vm-a");
    g_assert_cmpuint(lookup(again, ms_broker_client_hash(again, p)).status,
                     ==, MS_STATUS_NOT_FOUND);
}

/* How long @fn took, in ms */
#define ELAPSED_MS(fn) ({ \
    gint64 t0_ = g_get_monotonic_time(); \
    fn; \
    (g_get_monotonic_time() - t0_) / 1000; \
})

/*
 * Until a stalled client read its late replies, calls fail at once
 * (EAGAIN): ask for statistics until they come
 */
static void caught_up(MsBrokerClient *c)
{
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;

    for (;;) {
        g_autoptr(GError) err = NULL;
        g_autoptr(GArray) groups = NULL;

        if (ms_broker_client_stats(c, &groups, &err)) {
            return;
        }
        g_assert_error(err, MS_ENGINE_ERROR, EAGAIN);
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(1000);
    }
}

static bool interrupt_now(void *opaque)
{
    return *(bool *)opaque;
}

/*
 * A broker that stops answering (SIGSTOP) is not gone: a call costs its
 * timeout once and leaves its request pending, later calls fail at once
 * (EAGAIN) while it stays behind, an interrupt ends a wait within one
 * slice, and when the broker answers again the late replies are read:
 * the references a late LOOKUP handed out are released, nothing is lost
 * and the connection goes on.
 */
static void test_timeout(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) c = ms_broker_client_connect_as(
        f->path, broker_uid, "g1", "vm", 200, &err);
    g_autoptr(MsBrokerClient) c2 = join(f, "g1", "vm2");
    g_autoptr(MsBrokerClient) c3 = NULL;
    g_autoptr(MsBrokerClient) late = NULL;
    g_autoptr(GArray) fds = g_array_new(FALSE, FALSE, sizeof(int));
    g_autoptr(GArray) groups = NULL;
    g_autofree uint8_t *p = g_malloc(page);
    g_autofree uint8_t *p2 = g_malloc(page);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    bool interrupt = false;
    MsProtoResult r;
    uint32_t slot, slot2;
    uint64_t h2;
    uint64_t h;
    gint64 ms;

    (void)data;
    g_assert_no_error(err);
    c3 = ms_broker_client_connect_as(f->path, broker_uid, "g1", "vm3", 5000,
                                     &err);
    g_assert_no_error(err);
    ms_broker_client_set_interrupt(c3, interrupt_now, &interrupt);
    fill(p, 11);
    slot = upload(c, p);
    h = ms_broker_client_hash(c, p);
    fill(p2, 12);
    slot2 = upload(c3, p2);

    g_assert_cmpint(kill(f->pid, SIGSTOP), ==, 0);
    ms = ELAPSED_MS(g_assert_false(ms_broker_client_stats(c, &groups,
                                                          &err)));
    g_assert_error(err, MS_ENGINE_ERROR, ETIMEDOUT);
    g_assert_cmpint(ms, >=, 190);
    g_assert_true(ms_broker_client_alive(c));
    g_assert_true(ms_broker_client_stalled(c));
    g_clear_error(&err);
    /* Behind: no second timeout */
    ms = ELAPSED_MS(g_assert_false(ms_broker_client_lookup(c, &h, 1, &r,
                                                           &err)));
    g_assert_error(err, MS_ENGINE_ERROR, EAGAIN);
    g_assert_cmpint(ms, <, 100);
    g_assert_cmpuint(r.status, ==, MS_STATUS_NOT_FOUND);
    g_clear_error(&err);
    /* A release never waits */
    ms = ELAPSED_MS(g_assert_true(ms_broker_client_release_nowait(
                                      c, &slot, NULL, 1, &err)));
    g_assert_no_error(err);
    g_assert_cmpint(ms, <, 100);
    /* An interrupt ends a wait of 5 s at once; the request stays pending */
    interrupt = true;
    ms = ELAPSED_MS(g_assert_false(ms_broker_client_stats(c3, &groups,
                                                          &err)));
    g_assert_error(err, MS_ENGINE_ERROR, EINTR);
    g_assert_cmpint(ms, <, 100);
    g_assert_true(ms_broker_client_alive(c3));
    g_clear_error(&err);
    interrupt = false;
    /* A lookup that hits, answered after its caller gave up */
    {
        g_autoptr(MsBrokerClient) slow = NULL;

        slow = ms_broker_client_connect_as(f->path, broker_uid, "g1", "slow",
                                           200, &err);
        g_assert_null(slow);
        g_assert_error(err, MS_ENGINE_ERROR, ETIMEDOUT);
        g_clear_error(&err);
    }
    h2 = ms_broker_client_hash(c2, p2);
    g_assert_false(ms_broker_client_lookup(c2, &h2, 1, &r, &err));
    g_assert_error(err, MS_ENGINE_ERROR, ETIMEDOUT);
    g_clear_error(&err);
    g_assert_cmpint(kill(f->pid, SIGCONT), ==, 0);

    /* Late replies read, the late reference released, all alive */
    caught_up(c2);
    g_assert_cmpuint(ms_broker_client_late_refs(c2), ==, 1);
    caught_up(c);
    g_assert_false(ms_broker_client_stalled(c));
    caught_up(c3);
    /* c released its upload, c2 its late lookup: c3's upload is left */
    g_assert_cmpuint(stats(c).refs, ==, 1);
    g_assert_cmpuint(stats(c2).slots_used, ==, 1);
    g_assert_cmpuint(lookup(c2, h).status, ==, MS_STATUS_NOT_FOUND);
    g_assert_true(ms_broker_client_release(c3, &slot2, NULL, 1, NULL, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(stats(c).refs, ==, 0);

    /* Fill the listen backlog: then connect() itself has to wait */
    g_assert_cmpint(kill(f->pid, SIGSTOP), ==, 0);
    g_strlcpy(sa.sun_path, f->path, sizeof(sa.sun_path));
    for (int i = 0; i < 1024; i++) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                        0);

        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            g_assert_cmpint(errno, ==, EAGAIN);
            close(fd);
            break;
        }
        g_array_append_val(fds, fd);
    }
    g_assert_cmpuint(fds->len, <, 1024);
    late = ms_broker_client_open(f->path, 200, &err);
    g_assert_null(late);
    g_assert_error(err, MS_ENGINE_ERROR, EAGAIN);

    for (guint i = 0; i < fds->len; i++) {
        close(g_array_index(fds, int, i));
    }
    g_assert_cmpint(kill(f->pid, SIGCONT), ==, 0);
}

/*
 * A connection that ends is no proof that its process stopped mapping
 * the slots: the references stay ("parked") until the process exits,
 * whether the client closed the connection, or broke the protocol and
 * was hung up on.
 */
static void test_parked(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) obs = join(f, "g1", "observer");
    int ready[2];
    pid_t child;
    char byte;
    gint64 deadline;
    MsProtoGroupStats gs;

    (void)data;
    g_assert_cmpint(pipe(ready), ==, 0);
    child = fork();
    g_assert_cmpint(child, >=, 0);
    if (child == 0) {
        MsBrokerClient *c = ms_broker_client_connect_as(f->path, broker_uid,
                                                        "g1", "quiet", 0,
                                                        NULL);
        MsBrokerClient *bad = ms_broker_client_connect_as(f->path, broker_uid,
                                                          "g1", "bad", 0,
                                                          NULL);
        uint8_t *p = g_malloc(page * 3);
        MsProtoResult r[3];
        uint32_t twice[2];

        for (int i = 0; i < 3; i++) {
            fill(p + i * page, 200 + i);
        }
        if (!c || !bad || !ms_broker_client_upload(c, p, NULL, 3, r, NULL) ||
            !ms_broker_client_upload(bad, p, NULL, 1, r, NULL)) {
            _exit(1);
        }
        /* One client goes quietly, the other breaks the protocol */
        ms_broker_client_free(c);
        twice[0] = r[0].slot;
        twice[1] = 2;
        if (ms_broker_client_release(bad, twice, twice + 1, 1, NULL, NULL) ||
            ms_broker_client_alive(bad) || write(ready[1], "r", 1) != 1) {
            _exit(2);
        }
        pause();
        _exit(0);
    }
    close(ready[1]);
    g_assert_cmpint(read(ready[0], &byte, 1), ==, 1);
    close(ready[0]);

    /* Both connections are over; their 4 references stay */
    deadline = g_get_monotonic_time() + DEADLINE_US;
    while ((gs = stats(obs)).clients != 1) {
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(1000);
    }
    g_assert_cmpuint(gs.slots_used, ==, 3);
    g_assert_cmpuint(gs.refs, ==, 4);
    g_usleep(200 * 1000);
    gs = stats(obs);
    g_assert_cmpuint(gs.refs, ==, 4);
    g_assert_true(slot_has_data(obs, 0) || slot_has_data(obs, 1));
    {
        g_autofree char *log = NULL;

        g_assert_true(g_file_get_contents(f->log, &log, NULL, NULL));
        g_assert_nonnull(strstr(log, "until process"));
    }

    kill(child, SIGKILL);
    g_assert_cmpint(waitpid(child, NULL, 0), ==, child);
    while ((gs = stats(obs)).refs) {
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(1000);
    }
    g_assert_cmpuint(gs.slots_used, ==, 0);
    for (uint32_t s = 0; s < NSLOTS; s++) {
        g_assert_false(slot_has_data(obs, s));
    }
}

/* Hostile clients: raw frames */

static int raw_connect(Fixture *f)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

    g_assert_cmpint(fd, >=, 0);
    g_strlcpy(sa.sun_path, f->path, sizeof(sa.sun_path));
    g_assert_cmpint(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), ==, 0);
    return fd;
}

static void raw_send(int fd, const void *buf, size_t len)
{
    g_assert_cmpint(send(fd, buf, len, MSG_NOSIGNAL), ==, (ssize_t)len);
}

/* Read everything until the broker hangs up; close any fd received */
static GByteArray *raw_read_to_eof(int fd)
{
    GByteArray *all = g_byte_array_new();
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;

    for (;;) {
        union {
            char buf[CMSG_SPACE(sizeof(int) * 4)];
            struct cmsghdr align;
        } ctl;
        uint8_t buf[4096];
        struct iovec iov = { buf, sizeof(buf) };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = ctl.buf,
                             .msg_controllen = sizeof(ctl.buf) };
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        ssize_t n;

        g_assert_cmpint(poll(&pfd, 1, (deadline - g_get_monotonic_time())
                             / 1000 + 1), ==, 1);
        n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == ECONNRESET) {
            return all;
        }
        g_assert_cmpint(n, >=, 0);
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm;
             cm = CMSG_NXTHDR(&mh, cm)) {
            int rfd;

            memcpy(&rfd, CMSG_DATA(cm), sizeof(int));
            close(rfd);
        }
        if (n == 0) {
            return all;
        }
        g_byte_array_append(all, buf, n);
    }
}

/* The broker hung up on @fd, after an ERROR with @code (0: any or none) */
static void expect_hangup(int fd, uint32_t code)
{
    g_autoptr(GByteArray) got = raw_read_to_eof(fd);
    MsProtoHeader hdr;
    MsProtoMsg msg;

    close(fd);
    if (!code) {
        return;
    }
    g_assert_cmpuint(got->len, >=, MS_PROTO_HEADER_SIZE);
    g_assert_true(ms_proto_decode_header(got->data, &hdr, NULL));
    g_assert_cmpuint(got->len, ==, MS_PROTO_HEADER_SIZE + hdr.length);
    g_assert_true(ms_proto_decode(got->data, got->len, &msg, NULL));
    g_assert_cmpint(msg.type, ==, MS_MSG_ERROR);
    g_assert_cmpuint(msg.error.code, ==, code);
    g_assert_cmpuint(strlen(msg.error.message), >, 0);
}

/* A raw client that joined @group: read WELCOME, keep its secret */
static int raw_join(Fixture *f, const char *group, MsHashKey *key)
{
    g_autoptr(GByteArray) req = g_byte_array_new();
    g_autoptr(GByteArray) rep = g_byte_array_new();
    int fd = raw_connect(f);
    MsProtoHeader hdr;
    MsProtoMsg msg;
    size_t want = MS_PROTO_HEADER_SIZE;

    ms_proto_encode_hello(req, 1, group, "hostile");
    raw_send(fd, req->data, req->len);
    while (rep->len < want) {
        uint8_t buf[512];
        ssize_t n = recv(fd, buf, MIN(sizeof(buf), want - rep->len), 0);

        g_assert_cmpint(n, >, 0);
        g_byte_array_append(rep, buf, n);
        if (rep->len == MS_PROTO_HEADER_SIZE) {
            g_assert_true(ms_proto_decode_header(rep->data, &hdr, NULL));
            want += hdr.length;
        }
    }
    g_assert_true(ms_proto_decode(rep->data, rep->len, &msg, NULL));
    g_assert_cmpint(msg.type, ==, MS_MSG_WELCOME);
    if (key) {
        memcpy(key->secret, msg.welcome.secret, MS_HASH_SECRET_SIZE);
    }
    /* The descriptor came with the first byte and was dropped by recv() */
    return fd;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = v;
    p[1] = v >> 8;
    p[2] = v >> 16;
    p[3] = v >> 24;
}

/*
 * The victim: a member with a page in the store, mapped.  After each
 * hostile act it must still be served and its bytes must not change.
 */
typedef struct Victim {
    MsBrokerClient *c;
    uint8_t *page;
    uint32_t slot;
    uint64_t hash;
    uint8_t *map;
    uint8_t *snapshot;
} Victim;

static void victim_init(Fixture *f, Victim *v)
{
    v->c = join(f, "g1", "victim");
    v->page = g_malloc(page);
    fill(v->page, 6);
    v->slot = upload(v->c, v->page);
    v->map = map_store(v->c);
    v->snapshot = g_memdup2(v->map, NSLOTS * page);
}

static void victim_check(Victim *v)
{
    MsProtoGroupStats gs = stats(v->c);
    MsProtoResult r = lookup(v->c, ms_broker_client_hash(v->c, v->page));
    g_autoptr(GError) err = NULL;

    g_assert_cmpuint(r.status, ==, MS_STATUS_OK);
    g_assert_cmpuint(r.slot, ==, v->slot);
    g_assert_true(ms_broker_client_release(v->c, &r.slot, NULL, 1, NULL,
                                           &err));
    g_assert_no_error(err);
    /* Only the victim's own reference is left */
    g_assert_cmpuint(gs.refs, ==, 1);
    g_assert_cmpuint(gs.slots_used, ==, 1);
    g_assert_cmpmem(v->map + v->slot * page, page, v->page, page);
    g_assert_true(memcmp(v->map, v->snapshot, NSLOTS * page) == 0);
}

static void victim_free(Victim *v)
{
    munmap(v->map, NSLOTS * page);
    g_free(v->snapshot);
    g_free(v->page);
    ms_broker_client_free(v->c);
}

static GByteArray *frame_header(uint32_t magic, uint16_t version,
                                uint16_t type, uint32_t length)
{
    GByteArray *b = g_byte_array_new();

    g_byte_array_set_size(b, MS_PROTO_HEADER_SIZE);
    put32(b->data, magic);
    b->data[4] = version;
    b->data[5] = version >> 8;
    b->data[6] = type;
    b->data[7] = type >> 8;
    put32(b->data + 8, length);
    put32(b->data + 12, 1);
    return b;
}

static void test_hostile_bytes(Fixture *f, gconstpointer data)
{
    Victim v;
    g_autofree uint8_t *junk = g_malloc(8192);
    g_autofree char *log = NULL;
    g_autofree char *pidstr = g_strdup_printf("pid %d ", (int)getpid());

    (void)data;
    victim_init(f, &v);
    for (int i = 0; i < 8192; i++) {
        junk[i] = g_test_rand_int();
    }

    /* Garbage */
    {
        int fd = raw_connect(f);

        raw_send(fd, junk, 8192);
        expect_hangup(fd, EPROTO);
        victim_check(&v);
    }
    /* A length of 16 MiB */
    {
        g_autoptr(GByteArray) h = frame_header(MS_PROTO_MAGIC,
                                               MS_PROTO_VERSION,
                                               MS_MSG_LOOKUP, 16 << 20);
        int fd = raw_connect(f);

        raw_send(fd, h->data, h->len);
        expect_hangup(fd, EPROTO);
        victim_check(&v);
    }
    /* Another version */
    {
        g_autoptr(GByteArray) h = frame_header(MS_PROTO_MAGIC, 2,
                                               MS_MSG_STATS, 0);
        int fd = raw_connect(f);

        raw_send(fd, h->data, h->len);
        expect_hangup(fd, EPROTO);
        victim_check(&v);
    }
    /* A truncated frame, then the client goes */
    {
        g_autoptr(GByteArray) h = frame_header(MS_PROTO_MAGIC,
                                               MS_PROTO_VERSION,
                                               MS_MSG_LOOKUP, 8 + 8 * 8);
        int fd = raw_connect(f);

        g_byte_array_append(h, junk, 20);
        raw_send(fd, h->data, h->len);
        g_assert_cmpint(shutdown(fd, SHUT_WR), ==, 0);
        expect_hangup(fd, 0);
        victim_check(&v);
    }
    /* A batch whose count does not match its length */
    {
        g_autoptr(GByteArray) h = frame_header(MS_PROTO_MAGIC,
                                               MS_PROTO_VERSION,
                                               MS_MSG_LOOKUP, 8 + 8);
        uint8_t body[16] = { 0 };
        int fd = raw_join(f, "g1", NULL);

        put32(body, 5);
        g_byte_array_append(h, body, sizeof(body));
        raw_send(fd, h->data, h->len);
        expect_hangup(fd, EPROTO);
        victim_check(&v);
    }
    g_assert_true(g_file_get_contents(f->log, &log, NULL, NULL));
    g_assert_nonnull(strstr(log, pidstr));
    g_assert_nonnull(strstr(log, "disconnecting"));
    victim_free(&v);
}

static void test_hostile_order(Fixture *f, gconstpointer data)
{
    Victim v;

    (void)data;
    victim_init(f, &v);
    /* LOOKUP before HELLO */
    {
        g_autoptr(GByteArray) req = g_byte_array_new();
        uint64_t h = 1;
        int fd = raw_connect(f);

        ms_proto_encode_lookup(req, 1, &h, 1);
        raw_send(fd, req->data, req->len);
        expect_hangup(fd, EPROTO);
        victim_check(&v);
    }
    /* Two HELLOs */
    {
        g_autoptr(GByteArray) req = g_byte_array_new();
        int fd = raw_join(f, "g1", NULL);

        ms_proto_encode_hello(req, 2, "g2", "again");
        raw_send(fd, req->data, req->len);
        expect_hangup(fd, EPROTO);
        victim_check(&v);
    }
    /* A reply where a request belongs */
    {
        g_autoptr(GByteArray) req = g_byte_array_new();
        MsProtoResult r = { 0, MS_STATUS_OK };
        int fd = raw_join(f, "g1", NULL);

        ms_proto_encode_results(req, 2, MS_MSG_LOOKUP_REPLY, &r, 1);
        raw_send(fd, req->data, req->len);
        expect_hangup(fd, EPROTO);
        victim_check(&v);
    }
    /* Pages of another size than the group's */
    {
        g_autoptr(GByteArray) req = g_byte_array_new();
        g_autofree uint8_t *big = g_malloc0(page * 2);
        uint64_t h = 0;
        int fd = raw_join(f, "g1", NULL);

        ms_proto_encode_upload(req, 2, &h, big, page * 2, 1);
        raw_send(fd, req->data, req->len);
        expect_hangup(fd, EINVAL);
        victim_check(&v);
    }
    victim_free(&v);
}

/* Releasing what one does not hold: hang-up, nobody else loses a ref */
static void test_hostile_release(Fixture *f, gconstpointer data)
{
    Victim v;

    (void)data;
    victim_init(f, &v);
    /* The victim's slot, never obtained */
    {
        g_autoptr(GByteArray) req = g_byte_array_new();
        uint32_t refs = 1;
        int fd = raw_join(f, "g1", NULL);

        ms_proto_encode_release(req, 2, &v.slot, &refs, 1);
        raw_send(fd, req->data, req->len);
        expect_hangup(fd, EINVAL);
        victim_check(&v);
    }
    /* Obtained once, released twice in one batch */
    {
        g_autoptr(GByteArray) lk = g_byte_array_new();
        g_autoptr(GByteArray) req = g_byte_array_new();
        uint32_t slots[2] = { v.slot, v.slot }, refs[2] = { 1, 1 };
        uint8_t rep[MS_PROTO_HEADER_SIZE + 16];
        MsHashKey key;
        MsProtoMsg msg;
        uint64_t h;
        int fd = raw_join(f, "g1", &key);

        h = ms_hash_page(&key, v.page, page);
        ms_proto_encode_lookup(lk, 2, &h, 1);
        raw_send(fd, lk->data, lk->len);
        g_assert_cmpint(recv(fd, rep, sizeof(rep), MSG_WAITALL), ==,
                        sizeof(rep));
        g_assert_true(ms_proto_decode(rep, sizeof(rep), &msg, NULL));
        g_assert_cmpuint(ms_proto_result(&msg, 0).slot, ==, v.slot);
        g_assert_cmpuint(stats(v.c).refs, ==, 2);

        ms_proto_encode_release(req, 3, slots, refs, 2);
        raw_send(fd, req->data, req->len);
        expect_hangup(fd, EINVAL);
        victim_check(&v);
    }
    /*
     * Obtained 300 times, one more released: all 300 go (past the counts
     * of a byte, held.c), then the one more is refused
     */
    {
        g_autoptr(GByteArray) lk = g_byte_array_new();
        g_autoptr(GByteArray) req = g_byte_array_new();
        g_autofree uint64_t *h = g_new(uint64_t, 300);
        /* The reply: its count, then a slot and a status an entry */
        const size_t rep_len = MS_PROTO_HEADER_SIZE + 8 + 8 * 300;
        g_autofree uint8_t *rep = g_malloc(rep_len);
        uint32_t slots[2] = { v.slot, v.slot }, refs[2] = { 300, 1 };
        MsHashKey key;
        MsProtoMsg msg;
        int fd = raw_join(f, "g1", &key);

        for (int i = 0; i < 300; i++) {
            h[i] = ms_hash_page(&key, v.page, page);
        }
        ms_proto_encode_lookup(lk, 2, h, 300);
        raw_send(fd, lk->data, lk->len);
        g_assert_cmpint(recv(fd, rep, rep_len, MSG_WAITALL), ==, rep_len);
        g_assert_true(ms_proto_decode(rep, rep_len, &msg, NULL));
        g_assert_cmpuint(ms_proto_result(&msg, 299).slot, ==, v.slot);

        ms_proto_encode_release(req, 3, slots, refs, 2);
        raw_send(fd, req->data, req->len);
        expect_hangup(fd, EINVAL);
        victim_check(&v);
    }
    /* Slots out of the store */
    {
        g_autoptr(GByteArray) req = g_byte_array_new();
        uint32_t slot = NSLOTS + 5, refs = UINT32_MAX;
        int fd = raw_join(f, "g1", NULL);

        ms_proto_encode_release(req, 2, &slot, &refs, 1);
        raw_send(fd, req->data, req->len);
        expect_hangup(fd, EINVAL);
        victim_check(&v);
    }
    victim_free(&v);
}

/*
 * Pages that are not neighbours go in one UPLOAD: scattered single pages
 * and runs (sent as one iovec entry each), one content twice, and more
 * bytes than a socket buffer holds, so that sendmsg() sends part of it.
 */
static void test_upload_pages(Fixture *f, gconstpointer data)
{
    enum { N = 60 };
    g_autoptr(MsBrokerClient) c = join(f, "g1", "vm-a");
    g_autofree uint8_t *buf = g_malloc(3 * N * page);
    const void *pages[N];
    MsProtoResult r[N];
    g_autoptr(GError) err = NULL;
    size_t pos = 0;
    uint8_t *m;

    (void)data;
    for (int i = 0; i < N; i++) {
        /* Runs of one, two and three neighbours, a hole after each run */
        pos += (i % 6 == 0 || i % 6 == 1 || i % 6 == 3) ? 2 : 1;
        pages[i] = buf + pos * page;
        fill(buf + pos * page, 1000 + (i == N - 1 ? 5 : i));
    }
    g_assert_cmpuint(pos, <, 3 * N);
    g_assert_cmpuint(N, <=, ms_broker_client_params(c)->max_upload);
    g_assert_true(ms_broker_client_upload_pages(c, pages, NULL, N, r, &err));
    g_assert_no_error(err);
    m = map_store(c);
    for (int i = 0; i < N; i++) {
        g_assert_cmpuint(r[i].status, ==, MS_STATUS_OK);
        g_assert_cmpmem(m + (size_t)r[i].slot * page, page, pages[i], page);
    }
    /* Page N - 1 has the content of page 5: one slot for both */
    g_assert_cmpuint(r[N - 1].slot, ==, r[5].slot);
    g_assert_cmpuint(stats(c).published, ==, N - 1);
    munmap(m, NSLOTS * page);
    for (int i = 0; i < N; i++) {
        g_assert_true(ms_broker_client_release(c, &r[i].slot, NULL, 1, NULL,
                                               &err));
        g_assert_no_error(err);
    }
}

/* Lies about hashes: refused entry by entry, nothing stored */
static void test_hostile_hash(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) c = join(f, "g1", "liar");
    Victim v;
    g_autofree uint8_t *p = g_malloc(page * 2);
    g_autoptr(GError) err = NULL;
    uint64_t h[2];
    MsProtoResult r[2];
    MsProtoGroupStats gs;

    (void)data;
    victim_init(f, &v);
    fill(p, 7);
    fill(p + page, 8);
    /* A new content under a wrong hash; the victim's hash on other bytes */
    h[0] = ms_broker_client_hash(c, p) ^ 1;
    h[1] = ms_broker_client_hash(c, v.page);
    g_assert_true(ms_broker_client_upload(c, p, h, 2, r, &err));
    g_assert_no_error(err);
    for (int i = 0; i < 2; i++) {
        g_assert_cmpuint(r[i].status, ==, MS_STATUS_BAD_HASH);
        g_assert_cmpuint(r[i].slot, ==, UINT32_MAX);
    }
    gs = stats(c);
    g_assert_cmpuint(gs.refused, ==, 2);
    g_assert_cmpuint(gs.published, ==, 1);
    g_assert_cmpuint(lookup(c, h[0]).status, ==, MS_STATUS_NOT_FOUND);
    /* The lie did not cost the liar its connection */
    g_assert_true(ms_broker_client_alive(c));
    r[0] = lookup(c, h[1]);
    g_assert_cmpuint(r[0].slot, ==, v.slot);
    g_assert_true(ms_broker_client_release(c, &r[0].slot, NULL, 1, NULL,
                                           &err));
    g_assert_no_error(err);
    victim_check(&v);
    victim_free(&v);
}

/* Floods: of requests never read, and of connections */
static void test_hostile_flood(Fixture *f, gconstpointer data)
{
    Victim v;
    g_autoptr(GByteArray) req = g_byte_array_new();
    uint64_t hashes[MS_PROTO_MAX_LOOKUP];
    int fds[MAX_CLIENTS + 4];
    size_t sent = 0;
    int fd, extra;

    (void)data;
    victim_init(f, &v);
    for (int i = 0; i < MS_PROTO_MAX_LOOKUP; i++) {
        hashes[i] = i;
    }
    ms_proto_encode_lookup(req, 2, hashes, MS_PROTO_MAX_LOOKUP);
    fd = raw_join(f, "g1", NULL);
    /* Write requests, read no reply, until the socket is full */
    for (;;) {
        ssize_t n = send(fd, req->data, req->len,
                         MSG_NOSIGNAL | MSG_DONTWAIT);

        if (n < 0) {
            g_assert_cmpint(errno, ==, EAGAIN);
            break;
        }
        sent += n;
    }
    g_assert_cmpuint(sent, >, req->len);
    /* The broker still serves others while that one is stuck */
    victim_check(&v);
    close(fd);
    victim_check(&v);

    /* Connections up to the cap (the victim is one), then refused */
    for (int i = 0; i < MAX_CLIENTS - 1; i++) {
        fds[i] = raw_join(f, "g1", NULL);
    }
    extra = raw_connect(f);
    expect_hangup(extra, 0);
    victim_check(&v);
    for (int i = 0; i < MAX_CLIENTS - 1; i++) {
        close(fds[i]);
    }
    /* Closed ones leave; wait until the broker counts us alone */
    {
        gint64 deadline = g_get_monotonic_time() + DEADLINE_US;

        while (stats(v.c).clients != 1) {
            g_assert_cmpint(g_get_monotonic_time(), <, deadline);
            g_usleep(1000);
        }
    }
    victim_check(&v);
    victim_free(&v);
}

/*
 * Valid requests with a few bytes changed, each on its own connection
 * (half of them members of the group), from a child process: whatever
 * the broker makes of them, it answers or hangs up, and once the child
 * exited (the references a mutant got stay until then) the victim holds
 * the only reference and sees the same bytes.  --seed replays a run.
 */
static void mutants(Fixture *f, Victim *v, uint32_t seed)
{
    g_autofree uint8_t *p = g_malloc(page);
    GRand *rand = g_rand_new_with_seed(seed);

    for (int round = 0; round < 200; round++) {
        g_autoptr(GByteArray) req = g_byte_array_new();
        uint64_t h[2] = { v->hash, round };
        uint32_t slots[2] = { v->slot, round }, refs[2] = { 1, 1 };
        int kind = g_rand_int_range(rand, 0, 5);
        int fd = round % 2 ? raw_join(f, "g1", NULL) : raw_connect(f);

        fill(p, 1000 + round);
        switch (kind) {
        case 0:
            ms_proto_encode_lookup(req, round, h, 2);
            break;
        case 1:
            ms_proto_encode_upload(req, round, h, p, page, 1);
            break;
        case 2:
            ms_proto_encode_release(req, round, slots, refs, 2);
            break;
        case 3:
            ms_proto_encode_hello(req, round, "g1", "mutant");
            break;
        default:
            ms_proto_encode_stats(req, round);
            break;
        }
        for (int n = g_rand_int_range(rand, 1, 4); n > 0; n--) {
            /* mostly the header and the counts, where the checks are */
            guint at = g_rand_int_range(rand, 0, MIN(req->len, 32));

            req->data[at] = g_rand_int(rand);
        }
        if (send(fd, req->data, req->len, MSG_NOSIGNAL) < 0) {
            g_assert_cmpint(errno, ==, EPIPE);
        }
        shutdown(fd, SHUT_WR);
        expect_hangup(fd, 0);
    }
    g_rand_free(rand);
}

static void test_hostile_mutations(Fixture *f, gconstpointer data)
{
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;
    uint32_t seed = g_test_rand_int();
    Victim v;
    pid_t child;
    int status;

    (void)data;
    victim_init(f, &v);
    v.hash = ms_broker_client_hash(v.c, v.page);
    child = fork();
    g_assert_cmpint(child, >=, 0);
    if (child == 0) {
        mutants(f, &v, seed);
        _exit(0);
    }
    g_assert_cmpint(waitpid(child, &status, 0), ==, child);
    g_assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    while (stats(v.c).refs != 1) {
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(1000);
    }
    victim_check(&v);
    g_assert_cmpuint(stats(v.c).clients, ==, 1);
    victim_free(&v);
}

/* Statistics of every group for the administrator */
static void test_stats_all(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) a = join(f, "g1", "vm-a");
    g_autoptr(MsBrokerClient) b = join(f, "g2", "vm-b");
    g_autoptr(MsBrokerClient) admin = NULL;
    g_autoptr(GArray) groups = NULL;
    g_autoptr(GError) err = NULL;
    bool seen[2] = { false, false };

    (void)data;
    g_assert_true(ms_broker_client_alive(a) && ms_broker_client_alive(b));
    admin = ms_broker_client_open(f->path, 0, &err);
    g_assert_no_error(err);
    g_assert_true(ms_broker_client_stats(admin, &groups, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(groups->len, ==, 2);
    for (guint i = 0; i < groups->len; i++) {
        MsProtoGroupStats *gs = &g_array_index(groups, MsProtoGroupStats, i);

        g_assert_cmpuint(gs->clients, ==, 1);
        seen[g_str_equal(gs->name, "g2")] = true;
    }
    g_assert_true(seen[0] && seen[1]);
}

/*
 * Someone else listens on the socket path (a fake broker, collecting
 * what members give it): a member refuses it before it sends a byte, as
 * the HELLO alone tells the group and the VM, and uploads give pages.
 * As root the fake runs as nobody; as another user, as that user, who is
 * not the root that members expect either.
 */
static void test_auth_refused(Fixture *f, gconstpointer data)
{
    g_autofree char *path = g_build_filename(f->dir, "fake.sock", NULL);
    uid_t uid = geteuid() == 0 ? NOBODY : geteuid();
    g_autofree char *pid_text = NULL;
    g_autofree char *uid_text = NULL;
    g_autoptr(GByteArray) frame = g_byte_array_new();
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) any = NULL;
    g_autoptr(GArray) groups = NULL;
    MsBrokerClient *c;
    FakeBroker fb;
    FakeReport r;

    (void)data;
    fake_broker_start(&fb, path, uid);
    pid_text = g_strdup_printf(" (pid %d) ", fb.pid);
    uid_text = g_strdup_printf(" runs as uid %u", (unsigned)uid);

    /* A member that expects root, the default */
    c = ms_broker_client_connect(path, "g1", "vm", 0, &err);
    g_assert_null(c);
    g_assert_error(err, MS_ENGINE_ERROR, EPERM);
    g_test_message("%s", err->message);
    g_assert_true(g_str_has_prefix(err->message, "refusing the broker at "));
    g_assert_nonnull(strstr(err->message, path));
    g_assert_nonnull(strstr(err->message, pid_text));
    g_assert_nonnull(strstr(err->message, uid_text));
    g_assert_nonnull(strstr(err->message,
                            "the broker must run as uid 0 (root);"));
    g_assert_nonnull(strstr(err->message, "nothing was sent to it"));
    g_clear_error(&err);

    /* One that expects another uid */
    c = ms_broker_client_connect_as(path, 4242, "g1", "vm", 0, &err);
    g_assert_null(c);
    g_assert_error(err, MS_ENGINE_ERROR, EPERM);
    g_assert_nonnull(strstr(err->message, "must run as uid 4242"));
    g_assert_nonnull(strstr(err->message, " or root;"));
    g_clear_error(&err);

    /* A statistics client that asks for the check */
    c = ms_broker_client_open_as(path, 0, 0, &err);
    g_assert_null(c);
    g_assert_error(err, MS_ENGINE_ERROR, EPERM);
    g_clear_error(&err);

    /* One that accepts any broker gets through: the fake does count */
    any = ms_broker_client_open(path, 100, &err);
    g_assert_no_error(err);
    g_assert_false(ms_broker_client_stats(any, &groups, &err));
    g_assert_error(err, MS_ENGINE_ERROR, ETIMEDOUT);

    r = fake_broker_stop(&fb, path);
    g_assert_cmpuint(r.connections, ==, 4);
    /* The STATS request is all it ever received */
    ms_proto_encode_stats(frame, 1);
    g_assert_cmpuint(r.bytes, ==, frame->len);
}

/*
 * A broker that runs as an unprivileged user on a socket of its own:
 * members that expect that uid join and upload; a member that expects
 * root is refused, and its HELLO never reaches the broker.
 */
static void test_auth_broker_uid(Fixture *f, gconstpointer data)
{
    g_autoptr(MsBrokerClient) c = NULL;
    g_autoptr(MsBrokerClient) admin = NULL;
    g_autoptr(GArray) groups = NULL;
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *p = g_malloc(page);
    MsProtoGroupStats *gs;

    (void)data;
    if (geteuid() != 0) {
        g_test_skip("needs root to run the broker as another uid");
        return;
    }
    broker_kill(f);
    g_assert_cmpint(chown(f->dir, NOBODY, NOBODY), ==, 0);
    f->as_nobody = true;
    broker_start(f);

    c = ms_broker_client_connect(f->path, "wrong", "vm", 0, &err);
    g_assert_null(c);
    g_assert_error(err, MS_ENGINE_ERROR, EPERM);
    g_assert_nonnull(strstr(err->message, "runs as uid 65534"));
    g_clear_error(&err);

    c = ms_broker_client_connect_as(f->path, NOBODY, "g1", "vm", 0, &err);
    g_assert_no_error(err);
    g_assert_nonnull(c);
    fill(p, 77);
    upload(c, p);

    /* Root may see every group: only the accepted member's exists */
    admin = ms_broker_client_open(f->path, 0, &err);
    g_assert_no_error(err);
    g_assert_true(ms_broker_client_stats(admin, &groups, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(groups->len, ==, 1);
    gs = &g_array_index(groups, MsProtoGroupStats, 0);
    g_assert_cmpstr(gs->name, ==, "g1");
    g_assert_cmpuint(gs->clients, ==, 1);
    g_assert_cmpuint(gs->uploads, ==, 1);
    g_assert_cmpuint(gs->published, ==, 1);
}

static void add_args(const char *name, void (*fn)(Fixture *, gconstpointer),
                     const char *const *extra)
{
    g_test_add(name, Fixture, extra, fixture_setup, fn, fixture_teardown);
}

static void add(const char *name, void (*fn)(Fixture *, gconstpointer))
{
    add_args(name, fn, NULL);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    page = ms_host_page_size();
    broker_uid = geteuid();
    signal(SIGPIPE, SIG_IGN);
    add("/broker/share", test_share);
    add_args("/broker/release", test_release, many_refs_args);
    add("/broker/wanted", test_wanted);
    add("/broker/answered", test_answered);
    add("/broker/unstable-meetings", test_unstable_meetings);
    add("/broker/upload-pages", test_upload_pages);
    add("/broker/unstable-full", test_unstable_full);
    add_args("/broker/unstable-grows", test_unstable_grows, big_store_args);
    add("/broker/groups", test_groups);
    add_args("/broker/group-uids", test_group_uids, locked_args);
    add_args("/broker/strict-groups", test_strict_groups, strict_args);
    add("/broker/quota", test_quota);
    add("/broker/stats-all", test_stats_all);
    add("/broker/client-killed", test_client_killed);
    add("/broker/broker-killed", test_broker_killed);
    add("/broker/timeout", test_timeout);
    add("/broker/parked", test_parked);
    add("/broker/hostile/bytes", test_hostile_bytes);
    add("/broker/hostile/order", test_hostile_order);
    add_args("/broker/hostile/release", test_hostile_release, many_refs_args);
    add("/broker/hostile/hash", test_hostile_hash);
    add("/broker/hostile/flood", test_hostile_flood);
    add("/broker/hostile/mutations", test_hostile_mutations);
    add("/broker/auth/refused", test_auth_refused);
    add("/broker/auth/broker-uid", test_auth_broker_uid);
    return g_test_run();
}
