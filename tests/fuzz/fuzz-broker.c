/*
 * libFuzzer target: the broker, stateful, with several clients
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * fuzz-proto.c feeds the decoder one frame; what it cannot reach is the
 * broker's state: groups, references, parked clients, limits, reloads.
 * Here an input is a script of operations by up to eight clients
 * against a whole broker (broker.c, config.c and the engine, linked in)
 * that listens on a socket in a private temporary directory and runs
 * in this thread's GLib main loop, which the script pumps.
 *
 * One broker per input.  Every client is this process, so a client that
 * disconnects holding references is parked until this process exits,
 * which it never does: a broker kept across inputs would fill with
 * parked clients and carry state from one input to the next (a crash
 * would not reproduce from its input alone).  ms_broker_new() and
 * ms_broker_free() cost tens of microseconds with the small stores used
 * here, so each input gets a fresh broker, and leaves nothing behind:
 * the harness checks that the broker's fds and GLib sources are gone.
 * Parking is still exercised both ways: a closed client that holds
 * references stays parked until the broker is freed, and SPAWN makes a
 * connection from a child process (see client_spawn()), whose exit
 * (EXIT) the broker sees through its pidfd, dropping the parked
 * client's references.
 *
 * The input (tests/fuzz/make-corpus.py writes seeds in this format; a
 * byte past the end of the input reads as 0):
 *
 *   config: 3 bytes (see config_parse())
 *   then up to MAX_OPS operations, each a byte: op = byte & 0x1f (modulo
 *   OP__MAX), client k = byte >> 5; then the op's arguments (run_op()
 *   and the op_*() functions say how each is read):
 *
 *   CONNECT k                  a new connection in slot k (the old one,
 *                              if any, is closed)
 *   HELLO k group name flags [split]
 *   LOOKUP k count flags [split] sel...
 *   UPLOAD k count flags [split] sel...
 *   RELEASE k count flags [split] entry...
 *   STATS k flags [split]
 *   ANSWERED k flags [split]
 *   RAW k len bytes...         up to 64 bytes as they are
 *   MUTATE k type n (pos16 val)... trunc
 *                              a well-formed frame of any type, n bytes
 *                              overwritten, maybe cut short
 *   FLUSH k                    send what a split left unsent
 *   READ k                     pump, then read and check k's replies
 *   CLOSE k, SHUTDOWN k        close(), shutdown(SHUT_WR)
 *   PUMP                       run the main loop until it is idle
 *   SPAWN k                    connect slot k from a child process (at
 *                              most MAX_SPAWNS an input)
 *   EXIT k                     that child exits
 *   RECONFIGURE c0 c1 c2       ms_broker_reconfigure() (config bytes)
 *   READ_ALL                   READ every client
 *
 * Well-formed frames are the rule: the fields, counts and hashes come
 * from the input, the hashes mostly keyed with the group's secret from
 * WELCOME (unknown to any seed: the harness computes them, reading the
 * WELCOME first if need be), so that pages are stored, found, shared,
 * released and parked.  Flags make a frame malformed on purpose, or
 * split it: part now, the rest at the client's next send or FLUSH.
 * After each operation the main loop runs once.
 *
 * The checks, besides ASan, UBSan and LSan:
 *
 *  - every frame the broker sends decodes, is a reply, and the store
 *    descriptor comes with WELCOME and nothing else; nothing follows an
 *    ERROR;
 *  - for a client that sent only well-formed frames (RAW and MUTATE
 *    make a client "tainted": its replies are only decoded), each reply
 *    answers its request in order, with its id, and says what the
 *    broker must say given what the client holds: a slot it gets holds
 *    the page uploaded, or one that hashes as looked up; QUOTA exactly
 *    when the client is at its quota; RELEASE_REPLY the count released,
 *    or ERROR EINVAL for references it does not hold; the ERROR codes a
 *    request may get (HELLO: EACCES only for a group declared without
 *    us, ...); EUSERS only when the script opened enough connections
 *    to fill the limits; no hang-up without ERROR on a request the
 *    broker must answer;
 *  - ms_broker_check() after every operation: references, holders,
 *    charges, the index and every count agree;
 *  - at the end every client closes, and the broker must still serve:
 *    a fresh client's STATS shows one connection and the parked clients
 *    the script must have left (and no more than it may have), then it
 *    joins the declared group "fz" and looks a page up (unless the
 *    script legitimately filled the connection limits);
 *  - once the broker is freed, every fd it opened is closed and no GLib
 *    source is left in the main context.
 *
 * Built and run by scripts/fuzz.sh (seeds in tests/fuzz/corpus-broker).
 * MS_FUZZ_VERBOSE=1 prints the broker's log and each operation, to
 * read what a crashing input did.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib.h>

#include "mem-share/hash.h"
#include "mem-share/proto.h"
#include "mem-share/store.h"
#include "broker.h"

#define NCLIENTS 8              /* slots the script addresses */
#define CHECKER NCLIENTS        /* the end's fresh client */
#define MAX_OPS 128
#define MAX_SPAWNS 2            /* a child costs an exec: per input */
#define MAX_UPLOAD_PAGES 512    /* per input, so that an input stays fast */
#define PUMP_MAX 256            /* main loop iterations per pump */
#define READ_ROUNDS 64
#define POOL 8                  /* pages every client knows */
#define MAX_PENDING (2u << 20)  /* unsent bytes a client may queue */

enum {
    OP_CONNECT, OP_HELLO, OP_LOOKUP, OP_UPLOAD, OP_RELEASE, OP_STATS,
    OP_RAW, OP_MUTATE, OP_FLUSH, OP_READ, OP_CLOSE, OP_SHUTDOWN, OP_PUMP,
    OP_SPAWN, OP_EXIT, OP_RECONFIGURE, OP_READ_ALL, OP_ANSWERED, OP__MAX
};

static const char *const op_names[OP__MAX] = {
    "CONNECT", "HELLO", "LOOKUP", "UPLOAD", "RELEASE", "STATS", "RAW",
    "MUTATE", "FLUSH", "READ", "CLOSE", "SHUTDOWN", "PUMP", "SPAWN", "EXIT",
    "RECONFIGURE", "READ_ALL", "ANSWERED",
};

/*
 * Group names HELLO picks from.  "fz" is declared for every uid in
 * every configuration; dr (our uid), dg (our gid), dx (another uid
 * only) and dm (us and another uid) are declared as the configuration
 * says, and are private groups otherwise; p0-p3 are always private.
 */
#define NGROUPS 9
static const char *const group_names[NGROUPS] = {
    "fz", "dr", "dg", "dx", "dm", "p0", "p1", "p2", "p3",
};
enum { G_FZ, G_DR, G_DG, G_DX, G_DM };

/* flag bits of the message operations */
#define F_SPLIT     0x01        /* send part now, the rest later */
#define F_BAD       0x02        /* malformed: a reserved field set, ... */
#define F_BAD2      0x04        /* malformed another way */

/* The configuration an input asks for, as numbers */
typedef struct FzConfig {
    uint32_t nslots;
    uint32_t client_quota;      /* 0: the default */
    uint32_t uid_quota;
    bool strict;
    uint32_t max_clients, reserved, max_per_uid;
    uint32_t max_groups, max_groups_per_uid;
    unsigned decl;              /* 1 << G_DR ...: declared */
} FzConfig;

/* A request sent by a strict client, waiting for its reply */
typedef struct Expect {
    MsProtoType type;
    uint32_t id;
    bool malformed;             /* the decoder refuses it: ERROR EPROTO */
    bool bad_page_size;         /* UPLOAD: ERROR EINVAL */
    int group;                  /* HELLO */
    uint32_t count;
    uint64_t *hashes;           /* LOOKUP, UPLOAD */
    bool *valid;                /* UPLOAD: hash matches the page */
    uint8_t *pages;             /* UPLOAD: count pages */
    uint32_t *slots, *refs;     /* RELEASE */
} Expect;

/* An fd that came with the bytes [start, end) of a client's stream */
typedef struct RecvFd {
    uint64_t start, end;
    int fd;
} RecvFd;

typedef struct FzClient {
    int fd;                     /* -1: no connection */
    int index;                  /* for messages */
    bool mortal;                /* connected from a child process */
    bool tainted;               /* sent bytes we cannot predict replies to */
    bool hello_sent;
    bool shut;                  /* shutdown(SHUT_WR) */
    bool eof;                   /* the broker hung up */
    bool errored;               /* ERROR received */
    bool unsure;                /* hung up with requests unanswered */
    bool exited;                /* mortal, and its process exited */
    uint32_t conn_no;           /* connections the script made before */
    uint32_t frames;            /* frames received */
    uint32_t next_id;
    GByteArray *pending;        /* bytes of frames not sent yet */
    GByteArray *in;             /* bytes received, not yet a whole frame */
    uint64_t in_base;           /* stream offset of in->data[0] */
    GArray *fds;                /* RecvFd */
    GQueue expects;
    /* What WELCOME said */
    bool joined;
    int joined_group;
    int store_fd;
    MsHashKey key;
    uint32_t quota;
    /* The references it holds (strict clients: exactly the broker's) */
    GHashTable *held;           /* slot -> refs */
    uint64_t refs;
    /* Hashes its lookups missed (NOT_FOUND): all ANSWERED may name */
    GHashTable *missed;         /* uint64_t * -> itself */
    bool asked_answers;         /* it sent an ANSWERED before */
    uint64_t resets;            /* the unstable resets ANSWERED last said */
    /* The last administrator's STATS_REPLY */
    bool got_stats;
    MsProtoBrokerStats bs;
    uint64_t group_clients, group_parked;
} FzClient;

typedef struct Kid {
    pid_t pid;
    int die_fd;                 /* its end of the pipe: close to kill */
    int slot;
    uint32_t conn_no;           /* of the connection it made, if it did */
} Kid;

typedef struct Input {
    const uint8_t *p;
    size_t n;
} Input;

typedef struct Fuzz {
    Input in;
    MsBroker *b;
    FzConfig cfgs[MAX_OPS + 1]; /* the first, then each reload */
    int ncfgs;
    uint32_t nslots;
    FzClient c[NCLIENTS + 1];
    Kid kids[MAX_SPAWNS];
    int nkids;
    uint32_t conns;             /* connections made */
    uint32_t upload_pages;
    uint32_t sure_parked;       /* must be parked at the end */
    uint32_t may_parked;        /* may be */
} Fuzz;

static char *tmpdir;
static char *socket_path;
static size_t ps;
static uint8_t *pool;           /* POOL pages */
static bool verbose;
static int cur_op = -1;

static void cleanup(void);

static void G_GNUC_PRINTF(1, 2) G_GNUC_NORETURN fail(const char *fmt, ...)
{
    va_list ap;

    cleanup();      /* abort() runs no atexit() */
    fprintf(stderr, "fuzz-broker: invariant broken (operation %d): ",
            cur_op);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

static void G_GNUC_PRINTF(1, 2) say(const char *fmt, ...)
{
    va_list ap;

    if (!verbose) {
        return;
    }
    va_start(ap, fmt);
    fputs("fuzz-broker: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* The broker logs every refusal: quiet, unless asked; a critical is a bug */
static void log_handler(const gchar *domain G_GNUC_UNUSED,
                        GLogLevelFlags level, const gchar *message,
                        gpointer opaque G_GNUC_UNUSED)
{
    if (level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL)) {
        fail("GLib critical: %s", message);
    }
    if (verbose) {
        fprintf(stderr, "broker: %s\n", message);
    }
}

/* Input */

static uint8_t in_u8(Input *in)
{
    if (!in->n) {
        return 0;
    }
    in->n--;
    return *in->p++;
}

static uint16_t in_u16(Input *in)
{
    uint16_t lo = in_u8(in);

    return lo | in_u8(in) << 8;
}

static uint64_t in_u64(Input *in)
{
    uint64_t v = 0;

    for (int i = 0; i < 8; i++) {
        v |= (uint64_t)in_u8(in) << (8 * i);
    }
    return v;
}

/* Pages */

/* Page @i of the pool: a few distinct contents, one of them zeros */
static const uint8_t *pool_page(unsigned i)
{
    return pool + (i % POOL) * ps;
}

/* A page of its own for @seed: contents the pool does not have */
static void seed_page(uint8_t *page, uint32_t seed)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;

    for (size_t i = 0; i < ps; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(page + i, &x, 8);
    }
}

static uint64_t page_hash(FzClient *c, const void *page)
{
    return ms_hash_page(&c->key, page, ps);
}

/* The configuration */

/*
 *   c0: bits 0-1 store slots (16, 4, 64, 256), 2-3 client-quota
 *       (default, 1, 3, 8), 4-5 uid-quota (default, 1, 2, 6), 6
 *       strict-groups
 *   c1: bits 0-1 max-clients (64, 2, 4, 9), 2-3 reserved-clients (8, 0,
 *       1, 3), 4-5 max-clients-per-uid (default, 1, 3, 64), 6-7
 *       max-groups (16, 1, 2, 4)
 *   c2: bits 0-1 max-groups-per-uid (4, 1, 2, 3), 2-5 declare dr, dg,
 *       dx, dm
 */
static FzConfig config_parse(uint8_t c0, uint8_t c1, uint8_t c2)
{
    static const uint32_t slots[] = { 16, 4, 64, 256 };
    static const uint32_t cq[] = { 0, 1, 3, 8 }, uq[] = { 0, 1, 2, 6 };
    static const uint32_t mc[] = { 64, 2, 4, 9 }, rc[] = { 8, 0, 1, 3 };
    static const uint32_t mpu[] = { 0, 1, 3, 64 }, mg[] = { 16, 1, 2, 4 };
    static const uint32_t mgu[] = { 4, 1, 2, 3 };

    return (FzConfig) {
        .nslots = slots[c0 & 3],
        .client_quota = cq[(c0 >> 2) & 3],
        .uid_quota = uq[(c0 >> 4) & 3],
        .strict = c0 & 0x40,
        .max_clients = mc[c1 & 3],
        .reserved = rc[(c1 >> 2) & 3],
        .max_per_uid = mpu[(c1 >> 4) & 3],
        .max_groups = mg[(c1 >> 6) & 3],
        .max_groups_per_uid = mgu[c2 & 3],
        .decl = ((c2 >> 2) & 0xf) << G_DR,
    };
}

static void config_build(MsBrokerConfig *cfg, const FzConfig *fc,
                         uint32_t nslots)
{
    g_autofree char *dr = g_strdup_printf("dr:uid=%u", (unsigned)geteuid());
    g_autofree char *dg = g_strdup_printf("dg:gid=%u", (unsigned)getegid());
    g_autofree char *dx = g_strdup_printf("dx:uid=%u",
                                          (unsigned)geteuid() + 1);
    g_autofree char *dm = g_strdup_printf("dm:uid=%u,%u",
                                          (unsigned)geteuid(),
                                          (unsigned)geteuid() + 1);
    const char *specs[] = { "fz:uid=*", dr, dg, dx, dm };
    g_autoptr(GError) err = NULL;

    ms_broker_config_init(cfg);
    cfg->socket_path = g_strdup(socket_path);
    cfg->max_store = (uint64_t)nslots * ps;
    cfg->client_quota = fc->client_quota;
    cfg->uid_quota = fc->uid_quota;
    cfg->strict_groups = fc->strict;
    cfg->max_clients = fc->max_clients;
    cfg->reserved_clients = fc->reserved;
    cfg->max_clients_per_uid = fc->max_per_uid;
    cfg->max_groups = fc->max_groups;
    cfg->max_groups_per_uid = fc->max_groups_per_uid;
    for (int g = 0; g <= G_DM; g++) {
        if ((g == G_FZ || (fc->decl & (1u << g))) &&
            !ms_broker_config_add_group(cfg, specs[g], &err)) {
            fail("config: %s", err->message);
        }
    }
}

static bool declared(const FzConfig *fc, int group)
{
    return group == G_FZ || (group <= G_DM && (fc->decl & (1u << group)));
}

/* The references a client is told it may hold */
static uint32_t quota_of(const FzConfig *fc, uint32_t nslots)
{
    return fc->client_quota ? fc->client_quota : MAX(nslots / 2, 1);
}

/*
 * Connections, connected or parked, past which the broker refuses one
 * of ours: every client here has our uid, which may always use the
 * reserve.  The smallest over the configurations the input applied.
 */
static uint32_t refuse_threshold(Fuzz *f)
{
    uint32_t t = UINT32_MAX;

    for (int i = 0; i < f->ncfgs; i++) {
        const FzConfig *fc = &f->cfgs[i];
        uint32_t per_uid = fc->max_per_uid ? fc->max_per_uid
                                           : MAX(fc->max_clients / 2, 1);

        t = MIN(t, MIN(per_uid, fc->max_clients) + fc->reserved);
    }
    return t;
}

/* The main loop */

static void broker_check(Fuzz *f)
{
    g_autoptr(GError) err = NULL;

    if (!ms_broker_check(f->b, &err)) {
        fail("ms_broker_check: %s", err->message);
    }
}

static void pump(Fuzz *f)
{
    for (int i = 0; i < PUMP_MAX && g_main_context_iteration(NULL, FALSE);
         i++) {
    }
    broker_check(f);
}

/* Expectations */

static void expect_free(Expect *e)
{
    g_free(e->hashes);
    g_free(e->valid);
    g_free(e->pages);
    g_free(e->slots);
    g_free(e->refs);
    g_free(e);
}

static Expect *expect_new(MsProtoType type, uint32_t id, uint32_t count)
{
    Expect *e = g_new0(Expect, 1);

    e->type = type;
    e->id = id;
    e->count = count;
    return e;
}

/* Clients: sending */

static void taint(FzClient *c)
{
    c->tainted = true;
    g_queue_clear_full(&c->expects, (GDestroyNotify)expect_free);
}

/* Send what @c has pending, as far as the socket takes it */
static size_t flush(FzClient *c)
{
    size_t sent = 0;

    while (c->fd >= 0 && c->pending->len) {
        ssize_t n = send(c->fd, c->pending->data, c->pending->len,
                         MSG_NOSIGNAL | MSG_DONTWAIT);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            if (errno != EAGAIN) {
                /* The broker hung up: nothing will go out any more */
                g_byte_array_set_size(c->pending, 0);
            }
            break;
        }
        g_byte_array_remove_range(c->pending, 0, n);
        sent += n;
    }
    return sent;
}

/*
 * Queue @frame after what is pending and send: all of it, or with
 * @split (1..255) only about split/256 of it now.  @e, if not NULL, is
 * the reply it waits for (strict clients only).
 */
static void send_frame(FzClient *c, GByteArray *frame, uint8_t split,
                       Expect *e)
{
    if (c->fd < 0 || c->shut || c->eof) {
        /* Nobody will answer: the broker hung up, or we shut down */
        if (e) {
            expect_free(e);
        }
        return;
    }
    if (e && !c->tainted) {
        g_queue_push_tail(&c->expects, e);
    } else if (e) {
        expect_free(e);
    }
    flush(c);
    if (c->pending->len + frame->len > MAX_PENDING) {
        /* A client that never reads: lose the frame, and the plot */
        taint(c);
        return;
    }
    if (split && !c->pending->len && frame->len > 1) {
        size_t now = MAX(1, frame->len * split / 256);
        ssize_t n = send(c->fd, frame->data, now,
                         MSG_NOSIGNAL | MSG_DONTWAIT);

        if (n < 0) {
            n = 0;
        }
        g_byte_array_append(c->pending, frame->data + n, frame->len - n);
        return;
    }
    g_byte_array_append(c->pending, frame->data, frame->len);
    flush(c);
}

/* A header for a payload of @len bytes: frames the encoders refuse */
static void put_header(GByteArray *out, uint16_t type, uint32_t len,
                       uint32_t id)
{
    uint32_t magic = GUINT32_TO_LE(MS_PROTO_MAGIC);
    uint16_t version = GUINT16_TO_LE(MS_PROTO_VERSION);
    uint16_t t = GUINT16_TO_LE(type);
    uint32_t l = GUINT32_TO_LE(len), i = GUINT32_TO_LE(id);

    g_byte_array_append(out, (uint8_t *)&magic, 4);
    g_byte_array_append(out, (uint8_t *)&version, 2);
    g_byte_array_append(out, (uint8_t *)&t, 2);
    g_byte_array_append(out, (uint8_t *)&l, 4);
    g_byte_array_append(out, (uint8_t *)&i, 4);
}

static void put_u32(GByteArray *out, uint32_t v)
{
    v = GUINT32_TO_LE(v);
    g_byte_array_append(out, (uint8_t *)&v, 4);
}

static void put_u64(GByteArray *out, uint64_t v)
{
    v = GUINT64_TO_LE(v);
    g_byte_array_append(out, (uint8_t *)&v, 8);
}

static void send_hello(FzClient *c, int group, uint8_t name, uint8_t flags,
                       uint8_t split)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    g_autofree char *cname = g_strdup_printf("vm%u", name);
    uint32_t id = ++c->next_id;
    Expect *e = expect_new(MS_MSG_HELLO, id, 0);

    e->group = group;
    if (flags & F_BAD2) {
        /* A name outside the alphabet */
        static const char bad[] = "../x";

        put_header(out, MS_MSG_HELLO, 4 + 4 + strlen(cname), id);
        g_byte_array_append(out, (const uint8_t[]) { 4, strlen(cname), 0, 0 },
                            4);
        g_byte_array_append(out, (const uint8_t *)bad, 4);
        g_byte_array_append(out, (const uint8_t *)cname, strlen(cname));
        e->malformed = true;
    } else {
        ms_proto_encode_hello(out, id, group_names[group], cname);
        if (flags & F_BAD) {
            out->data[MS_PROTO_HEADER_SIZE + 2] = 1;    /* reserved */
            e->malformed = true;
        }
    }
    c->hello_sent = true;
    send_frame(c, out, split, e);
}

static void send_stats(FzClient *c, uint8_t split)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    uint32_t id = ++c->next_id;

    ms_proto_encode_stats(out, id);
    send_frame(c, out, split, expect_new(MS_MSG_STATS, id, 0));
}

static void send_answered(FzClient *c, uint8_t split)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    uint32_t id = ++c->next_id;

    ms_proto_encode_answered(out, id);
    send_frame(c, out, split, expect_new(MS_MSG_ANSWERED, id, 0));
}

static void send_lookup(FzClient *c, const uint64_t *hashes, uint32_t count,
                        uint8_t flags, uint8_t split)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    uint32_t id = ++c->next_id;
    Expect *e = expect_new(MS_MSG_LOOKUP, id, count);

    if (count == 0 || count > MS_PROTO_MAX_LOOKUP) {
        put_header(out, MS_MSG_LOOKUP, 8 + 8 * count, id);
        put_u32(out, count);
        put_u32(out, 0);
        for (uint32_t i = 0; i < count; i++) {
            put_u64(out, hashes[i]);
        }
        e->malformed = true;
    } else {
        ms_proto_encode_lookup(out, id, hashes, count);
        if (flags & F_BAD) {
            out->data[MS_PROTO_HEADER_SIZE + 4] = 1;    /* reserved */
            e->malformed = true;
        }
    }
    e->hashes = g_memdup2(hashes, count * sizeof(uint64_t));
    send_frame(c, out, split, e);
}

/* @pages: @count pages of @page_size bytes */
static void send_upload(FzClient *c, const uint64_t *hashes,
                        const bool *valid, const uint8_t *pages,
                        uint32_t page_size, uint32_t count, uint8_t flags,
                        uint8_t split)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    uint32_t id = ++c->next_id;
    Expect *e = expect_new(MS_MSG_UPLOAD, id, count);

    if (count == 0 || count > ms_proto_max_upload(page_size)) {
        put_header(out, MS_MSG_UPLOAD, 8 + (8 + page_size) * count, id);
        put_u32(out, count);
        put_u32(out, page_size);
        for (uint32_t i = 0; i < count; i++) {
            put_u64(out, hashes[i]);
        }
        g_byte_array_append(out, pages, count * page_size);
        e->malformed = true;
    } else {
        ms_proto_encode_upload(out, id, hashes, pages, page_size, count);
        if (flags & F_BAD) {
            /* One byte short, and a header that says so */
            uint32_t len = GUINT32_TO_LE(out->len - 1 - MS_PROTO_HEADER_SIZE);

            g_byte_array_set_size(out, out->len - 1);
            memcpy(out->data + 8, &len, 4);
            e->malformed = true;
        }
    }
    e->bad_page_size = page_size != ps;
    e->hashes = g_memdup2(hashes, count * sizeof(uint64_t));
    e->valid = g_memdup2(valid, count * sizeof(bool));
    if (!e->malformed && !e->bad_page_size) {
        e->pages = g_memdup2(pages, (size_t)count * ps);
    }
    send_frame(c, out, split, e);
}

static void send_release(FzClient *c, const uint32_t *slots,
                         const uint32_t *refs, uint32_t count, uint8_t flags,
                         uint8_t split)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    uint32_t id = ++c->next_id;
    Expect *e = expect_new(MS_MSG_RELEASE, id, count);

    if (count == 0 || count > MS_PROTO_MAX_RELEASE) {
        put_header(out, MS_MSG_RELEASE, 8 + 8 * count, id);
        put_u32(out, count);
        put_u32(out, 0);
        for (uint32_t i = 0; i < count; i++) {
            put_u32(out, slots[i]);
            put_u32(out, refs[i]);
        }
        e->malformed = true;
    } else {
        ms_proto_encode_release(out, id, slots, refs, count);
        if (flags & F_BAD) {
            /* The last entry releases 0 references */
            memset(out->data + out->len - 4, 0, 4);
            e->malformed = true;
        }
    }
    e->slots = g_memdup2(slots, count * sizeof(uint32_t));
    e->refs = g_memdup2(refs, count * sizeof(uint32_t));
    send_frame(c, out, split, e);
}

/* Clients: receiving */

static bool is_reply(uint32_t type)
{
    return type == MS_MSG_WELCOME || type == MS_MSG_LOOKUP_REPLY ||
           type == MS_MSG_UPLOAD_REPLY || type == MS_MSG_RELEASE_REPLY ||
           type == MS_MSG_STATS_REPLY || type == MS_MSG_ERROR ||
           type == MS_MSG_ANSWERED_REPLY;
}

static MsProtoType reply_type(MsProtoType request)
{
    switch (request) {
    case MS_MSG_HELLO:
        return MS_MSG_WELCOME;
    case MS_MSG_LOOKUP:
        return MS_MSG_LOOKUP_REPLY;
    case MS_MSG_UPLOAD:
        return MS_MSG_UPLOAD_REPLY;
    case MS_MSG_RELEASE:
        return MS_MSG_RELEASE_REPLY;
    case MS_MSG_ANSWERED:
        return MS_MSG_ANSWERED_REPLY;
    default:
        return MS_MSG_STATS_REPLY;
    }
}

static uint32_t held_of(FzClient *c, uint32_t slot)
{
    return GPOINTER_TO_UINT(g_hash_table_lookup(c->held,
                                                GUINT_TO_POINTER(slot)));
}

static void hold(FzClient *c, uint32_t slot, int64_t delta)
{
    uint32_t n = held_of(c, slot) + delta;

    if (n) {
        g_hash_table_insert(c->held, GUINT_TO_POINTER(slot),
                            GUINT_TO_POINTER(n));
    } else {
        g_hash_table_remove(c->held, GUINT_TO_POINTER(slot));
    }
    c->refs += delta;
}

/*
 * Play RELEASE @e on the references @c holds: the broker drops entry
 * after entry and refuses the first it does not hold.  Returns false
 * there; with @apply, the entries before it stay applied, as they do in
 * the broker.
 */
static bool release_sim(FzClient *c, const Expect *e, bool apply,
                        uint64_t *released)
{
    uint32_t i;

    *released = 0;
    for (i = 0; i < e->count && e->refs[i] <= held_of(c, e->slots[i]); i++) {
        hold(c, e->slots[i], -(int64_t)e->refs[i]);
        *released += e->refs[i];
    }
    for (uint32_t j = 0; !apply && j < i; j++) {
        hold(c, e->slots[j], e->refs[j]);
    }
    return i == e->count;
}

/* What the broker may answer to @e: a reply, and/or ERROR with @codes */
typedef struct Outcome {
    bool reply;
    int codes[4];
    int ncodes;
} Outcome;

static void outcome_add(Outcome *o, int code)
{
    for (int i = 0; i < o->ncodes; i++) {
        if (o->codes[i] == code) {
            return;
        }
    }
    g_assert(o->ncodes < (int)G_N_ELEMENTS(o->codes));
    o->codes[o->ncodes++] = code;
}

static Outcome outcome(Fuzz *f, FzClient *c, const Expect *e)
{
    Outcome o = { 0 };
    uint64_t released;

    if (e->malformed) {
        outcome_add(&o, EPROTO);
        return o;
    }
    switch (e->type) {
    case MS_MSG_HELLO:
        if (c->joined) {
            outcome_add(&o, EPROTO);
            break;
        }
        /* Any configuration the input applied may be the one in force */
        for (int i = 0; i < f->ncfgs; i++) {
            if (e->group == G_DX && declared(&f->cfgs[i], G_DX)) {
                outcome_add(&o, EACCES);
            } else if (declared(&f->cfgs[i], e->group)) {
                o.reply = true;
            } else if (f->cfgs[i].strict) {
                outcome_add(&o, ENOENT);
            } else {
                o.reply = true;
                outcome_add(&o, ENOSPC);
            }
        }
        break;
    case MS_MSG_STATS:
        o.reply = true;         /* we are root, or the broker's uid */
        break;
    default:
        if (!c->joined) {
            outcome_add(&o, EPROTO);
        } else if (e->bad_page_size) {
            outcome_add(&o, EINVAL);
        } else if (e->type == MS_MSG_RELEASE &&
                   !release_sim(c, e, false, &released)) {
            outcome_add(&o, EINVAL);
        } else {
            o.reply = true;
        }
    }
    return o;
}

/* The content of @slot in @c's store */
static void read_slot(FzClient *c, uint32_t slot, uint8_t *page)
{
    if (pread(c->store_fd, page, ps, (off_t)slot * ps) != (ssize_t)ps) {
        fail("client %d: cannot read slot %u of the store: %s", c->index,
             slot, g_strerror(errno));
    }
}

/*
 * Does a slot the broker gave @c still hold what it held then?  Yes,
 * while @c holds the reference: unless a RELEASE that came after
 * dropped it (its reply is still to be read), or its process exited.
 */
static bool slots_stable(FzClient *c)
{
    for (GList *l = c->expects.head; l; l = l->next) {
        if (((Expect *)l->data)->type == MS_MSG_RELEASE) {
            return false;
        }
    }
    return !c->exited;
}

static void check_results(Fuzz *f, FzClient *c, const Expect *e,
                          const MsProtoMsg *msg)
{
    g_autofree uint8_t *page = g_malloc(ps);
    bool multi_uid = false, stable = slots_stable(c);

    if (msg->results.count != e->count) {
        fail("client %d: %u results to %u entries", c->index,
             msg->results.count, e->count);
    }
    /* A group several uids may join has a uid-quota (uids=*, gids=, ...) */
    for (int i = 0; i < f->ncfgs; i++) {
        multi_uid |= c->joined_group == G_FZ ||
                     ((c->joined_group == G_DG || c->joined_group == G_DM) &&
                      declared(&f->cfgs[i], c->joined_group));
    }
    for (uint32_t i = 0; i < e->count; i++) {
        MsProtoResult r = ms_proto_result(msg, i);
        bool lookup = e->type == MS_MSG_LOOKUP;

        say("client %d: %s %u entry %u: slot %d %s", c->index,
            ms_proto_type_name(msg->type), msg->id, i, (int)r.slot,
            ms_proto_status_name(r.status));

        if ((r.status == MS_STATUS_OK) != (r.slot != MS_SLOT_NONE)) {
            fail("client %d: entry %u: slot %u with status %s", c->index, i,
                 r.slot, ms_proto_status_name(r.status));
        }
        if (!lookup && !e->valid[i] && r.status != MS_STATUS_BAD_HASH) {
            fail("client %d: upload %u with a wrong hash: %s", c->index, i,
                 ms_proto_status_name(r.status));
        }
        switch (r.status) {
        case MS_STATUS_OK:
            if (r.slot >= f->nslots || c->refs >= c->quota) {
                fail("client %d: entry %u: slot %u, holding %" PRIu64
                     " of %u", c->index, i, r.slot, c->refs, c->quota);
            }
            if (stable) {
                read_slot(c, r.slot, page);
            }
            if (stable && (lookup ? page_hash(c, page) != e->hashes[i]
                           : memcmp(page, e->pages + (size_t)i * ps, ps))) {
                fail("client %d: entry %u: slot %u holds another page",
                     c->index, i, r.slot);
            }
            hold(c, r.slot, 1);
            break;
        case MS_STATUS_QUOTA:
            if (c->refs < c->quota && (lookup || !multi_uid)) {
                fail("client %d: entry %u: QUOTA holding %" PRIu64 " of %u",
                     c->index, i, c->refs, c->quota);
            }
            break;
        case MS_STATUS_NOT_FOUND:
        case MS_STATUS_WANTED:
            if (!lookup) {
                fail("client %d: upload %u: %s", c->index, i,
                     ms_proto_status_name(r.status));
            }
            if (r.status == MS_STATUS_NOT_FOUND) {
                g_hash_table_add(c->missed, g_memdup2(&e->hashes[i], 8));
            }
            break;
        case MS_STATUS_BAD_HASH:
            if (lookup || e->valid[i]) {
                fail("client %d: entry %u: BAD_HASH", c->index, i);
            }
            break;
        case MS_STATUS_FULL:
            if (lookup) {
                fail("client %d: lookup %u: FULL", c->index, i);
            }
            break;
        default:
            fail("client %d: entry %u: status %u", c->index, i, r.status);
        }
    }
}

static void check_group_stats(FzClient *c, const MsProtoGroupStats *gs,
                              uint32_t nslots)
{
    if (gs->slots != nslots || gs->page_size != ps ||
        gs->slots_used > gs->slots || gs->shared_slots > gs->slots_used ||
        gs->refs < gs->slots_used || gs->hits > gs->lookups ||
        gs->published > gs->uploads || gs->refused_quota > gs->refused ||
        gs->wanted > gs->lookups - gs->hits ||
        gs->bytes_saved != (gs->refs - gs->slots_used) * ps) {
        fail("client %d: STATS of group %s do not add up", c->index,
             gs->name);
    }
}

static void check_stats(Fuzz *f, FzClient *c, const MsProtoMsg *msg)
{
    MsProtoBrokerStats bs;
    MsProtoGroupStats gs;
    bool has_broker = ms_proto_broker_stats(msg, &bs);

    if (c->joined) {
        if (has_broker || msg->stats.count != 1) {
            fail("client %d: a member's STATS has %u groups and %s broker"
                 " record", c->index, msg->stats.count,
                 has_broker ? "a" : "no");
        }
        ms_proto_group_stats(msg, 0, &gs);
        /* A member's misses are answered by meetings and new slots */
        if (strcmp(gs.name, group_names[c->joined_group]) ||
            gs.refs < c->refs || gs.clients < 1 ||
            gs.met > gs.wanted + gs.published ||
            gs.features != MS_FEATURE_ANSWERED) {
            fail("client %d: STATS of %s (%" PRIu64 " references) for a"
                 " member of %s holding %" PRIu64, c->index, gs.name,
                 gs.refs, group_names[c->joined_group], c->refs);
        }
    } else if (!has_broker || bs.groups != msg->stats.count ||
               bs.clients < 1) {
        fail("client %d: the administrator's STATS: %s broker record, %u"
             " groups", c->index, has_broker ? "a" : "no",
             msg->stats.count);
    } else {
        c->got_stats = true;
        c->bs = bs;
        c->group_clients = c->group_parked = 0;
    }
    for (uint32_t i = 0; i < msg->stats.count; i++) {
        ms_proto_group_stats(msg, i, &gs);
        check_group_stats(c, &gs, f->nslots);
        if (has_broker && gs.met) {
            fail("client %d: the administrator's STATS of %s: met %" PRIu64,
                 c->index, gs.name, gs.met);
        }
        if (has_broker) {
            c->group_clients += gs.clients;
            c->group_parked += gs.parked;
        }
    }
}

/*
 * A member is told only of its own misses, and its first ANSWERED says
 * that the answers before it were not kept.
 */
static void check_answered(FzClient *c, const MsProtoMsg *msg)
{
    if (!c->asked_answers && !(msg->answered.flags & MS_ANSWERED_LOST)) {
        fail("client %d: a first ANSWERED_REPLY that kept answers from "
             "before it was asked", c->index);
    }
    if (msg->answered.unstable_resets < c->resets) {
        fail("client %d: ANSWERED_REPLY: unstable resets went back from %"
             PRIu64 " to %" PRIu64, c->index, c->resets,
             msg->answered.unstable_resets);
    }
    c->asked_answers = true;
    c->resets = msg->answered.unstable_resets;
    for (uint32_t i = 0; i < msg->answered.count; i++) {
        uint64_t h = ms_proto_answered_hash(msg, i);

        if (!g_hash_table_contains(c->missed, &h)) {
            fail("client %d: ANSWERED_REPLY names %016" PRIx64 ", which it"
                 " never missed", c->index, h);
        }
    }
}

/* Check a reply of strict client @c against its request */
static void check_expected(Fuzz *f, FzClient *c, const MsProtoMsg *msg)
{
    Expect *e = g_queue_pop_head(&c->expects);
    Outcome o;
    uint64_t released;

    if (!e) {
        fail("client %d: %s with no request outstanding", c->index,
             ms_proto_type_name(msg->type));
    }
    o = outcome(f, c, e);
    if (msg->type == MS_MSG_ERROR) {
        bool ok = false;

        for (int i = 0; i < o.ncodes; i++) {
            ok |= o.codes[i] == (int)msg->error.code;
        }
        if (!ok) {
            fail("client %d: ERROR %s (%s) to %s %u", c->index,
                 g_strerror(msg->error.code), msg->error.message,
                 ms_proto_type_name(e->type), e->id);
        }
        if (e->type == MS_MSG_RELEASE && msg->error.code == EINVAL) {
            release_sim(c, e, true, &released);
        }
        expect_free(e);
        return;
    }
    if (!o.reply || msg->id != e->id || msg->type != reply_type(e->type)) {
        fail("client %d: %s %u to %s %u%s", c->index,
             ms_proto_type_name(msg->type), msg->id,
             ms_proto_type_name(e->type), e->id,
             o.reply ? "" : ", which it must refuse");
    }
    switch (msg->type) {
    case MS_MSG_WELCOME:
        c->joined_group = e->group;
        break;
    case MS_MSG_LOOKUP_REPLY:
    case MS_MSG_UPLOAD_REPLY:
        check_results(f, c, e, msg);
        break;
    case MS_MSG_RELEASE_REPLY:
        release_sim(c, e, true, &released);
        if (msg->release_reply.released != released) {
            fail("client %d: released %" PRIu64 " references of %" PRIu64,
                 c->index, msg->release_reply.released, released);
        }
        break;
    case MS_MSG_STATS_REPLY:
        check_stats(f, c, msg);
        break;
    case MS_MSG_ANSWERED_REPLY:
        check_answered(c, msg);
        break;
    default:
        break;
    }
    expect_free(e);
}

static void check_welcome(Fuzz *f, FzClient *c, const MsProtoMsg *msg,
                          int fd)
{
    struct stat st;
    bool quota_ok = false;

    for (int i = 0; i < f->ncfgs; i++) {
        quota_ok |= msg->welcome.max_refs == quota_of(&f->cfgs[i],
                                                      f->nslots);
    }
    if (c->joined || msg->welcome.page_size != ps ||
        msg->welcome.nslots != f->nslots || !quota_ok ||
        msg->welcome.max_lookup != MS_PROTO_MAX_LOOKUP ||
        msg->welcome.max_upload != ms_proto_max_upload(ps) ||
        msg->welcome.max_release != MS_PROTO_MAX_RELEASE ||
        msg->welcome.hash_algo != MS_PROTO_HASH_XXH3_SECRET) {
        fail("client %d: WELCOME%s with unexpected terms", c->index,
             c->joined ? " again" : "");
    }
    if (fstat(fd, &st) < 0 || st.st_size != (off_t)f->nslots * (off_t)ps ||
        (fcntl(fd, F_GETFL) & O_ACCMODE) != O_RDONLY ||
        !ms_store_fd_sealed(fd)) {
        fail("client %d: the store's descriptor is not read-only, sealed,"
             " of the store's size", c->index);
    }
}

static void on_frame(Fuzz *f, FzClient *c, const MsProtoMsg *msg, int fd)
{
    if (c->errored) {
        fail("client %d: %s after ERROR", c->index,
             ms_proto_type_name(msg->type));
    }
    if (!is_reply(msg->type) || (msg->type == MS_MSG_WELCOME) != (fd >= 0)) {
        fail("client %d: the broker sent %s %s a descriptor", c->index,
             ms_proto_type_name(msg->type), fd >= 0 ? "with" : "without");
    }
    if (msg->type == MS_MSG_ERROR) {
        if (msg->id != 0) {
            fail("client %d: ERROR with id %u", c->index, msg->id);
        }
        if (msg->error.code == EUSERS &&
            (c->frames || c->conn_no < refuse_threshold(f))) {
            fail("client %d: EUSERS (%s) with %u connections made before,"
                 " %u frames received", c->index, msg->error.message,
                 c->conn_no, c->frames);
        }
    }
    c->frames++;
    if (msg->type == MS_MSG_WELCOME) {
        check_welcome(f, c, msg, fd);
    }
    /* A refused connection: whatever it sent goes unanswered */
    if (!c->tainted &&
        !(msg->type == MS_MSG_ERROR && msg->error.code == EUSERS)) {
        check_expected(f, c, msg);
    }
    if (msg->type == MS_MSG_WELCOME) {
        c->joined = true;
        c->store_fd = fd;
        c->quota = msg->welcome.max_refs;
        memcpy(c->key.secret, msg->welcome.secret, sizeof(c->key.secret));
    } else if (fd >= 0) {
        close(fd);
    }
    if (msg->type == MS_MSG_ERROR) {
        c->errored = true;
        g_queue_clear_full(&c->expects, (GDestroyNotify)expect_free);
    }
}

/*
 * The descriptor that came with the WELCOME at stream offset @at, or -1.
 * A read returns the bytes up to and with the message that carried a
 * descriptor, and the descriptor: so it came with a read that includes
 * @at.
 */
static int take_fd(FzClient *c, uint64_t at)
{
    for (guint i = 0; i < c->fds->len; i++) {
        RecvFd *r = &g_array_index(c->fds, RecvFd, i);

        if (r->start <= at && at < r->end) {
            int fd = r->fd;

            g_array_remove_index(c->fds, i);
            return fd;
        }
    }
    return -1;
}

/* A descriptor came with reads whose frames are all in: none a WELCOME */
static void check_orphan_fds(FzClient *c)
{
    for (guint i = 0; i < c->fds->len; i++) {
        if (g_array_index(c->fds, RecvFd, i).end <= c->in_base) {
            fail("client %d: a descriptor with no WELCOME", c->index);
        }
    }
}

static void parse_frames(Fuzz *f, FzClient *c)
{
    while (c->in->len >= MS_PROTO_HEADER_SIZE) {
        g_autoptr(GError) err = NULL;
        MsProtoHeader hdr;
        MsProtoMsg msg;
        size_t len;
        int fd;

        if (!ms_proto_decode_header(c->in->data, &hdr, &err)) {
            fail("client %d: the broker sent a bad header: %s", c->index,
                 err->message);
        }
        len = MS_PROTO_HEADER_SIZE + hdr.length;
        if (c->in->len < len) {
            break;
        }
        if (!ms_proto_decode(c->in->data, len, &msg, &err)) {
            fail("client %d: the broker sent a bad frame: %s", c->index,
                 err->message);
        }
        fd = msg.type == MS_MSG_WELCOME ? take_fd(c, c->in_base) : -1;
        on_frame(f, c, &msg, fd);
        g_byte_array_remove_range(c->in, 0, len);
        c->in_base += len;
        check_orphan_fds(c);
    }
}

/*
 * The broker hung up on @c.  Only an ERROR may be cut short (the broker
 * sends it once, without waiting); and a strict client is not dropped
 * without a reason.
 */
static void client_eof(Fuzz *f, FzClient *c)
{
    Expect *e = g_queue_peek_head(&c->expects);
    uint16_t type;

    if (c->in->len >= 8) {
        memcpy(&type, c->in->data + 6, 2);
        if (GUINT16_FROM_LE(type) != MS_MSG_ERROR) {
            fail("client %d: the broker hung up in the middle of a %s",
                 c->index, ms_proto_type_name(GUINT16_FROM_LE(type)));
        }
    }
    if (!c->tainted && !c->errored && !c->shut) {
        if (!e) {
            fail("client %d: the broker hung up for no reason", c->index);
        }
        if (outcome(f, c, e).ncodes == 0) {
            fail("client %d: the broker hung up on %s %u, which it must"
                 " answer", c->index, ms_proto_type_name(e->type), e->id);
        }
    }
    /* What it holds depends on a request whose answer never came */
    c->unsure |= e != NULL;
    g_queue_clear_full(&c->expects, (GDestroyNotify)expect_free);
}

/* Read what the broker sent @c and check it; returns the bytes read */
static size_t client_read(Fuzz *f, FzClient *c)
{
    static uint8_t buf[65536];
    size_t got = 0;

    if (c->eof) {
        /* Judged once, when it came: nothing is read after it */
        return 0;
    }
    for (int round = 0; c->fd >= 0 && round < READ_ROUNDS;
         round++) {
        union {
            char buf[CMSG_SPACE(4 * sizeof(int))];
            struct cmsghdr align;
        } ctl;
        struct iovec iov = { buf, sizeof(buf) };
        struct msghdr mh = {
            .msg_iov = &iov, .msg_iovlen = 1,
            .msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf),
        };
        ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        uint64_t at = c->in_base + c->in->len;

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && errno == EAGAIN) {
            break;
        }
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); n >= 0 && cm;
             cm = CMSG_NXTHDR(&mh, cm)) {
            size_t nfds = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);

            if (cm->cmsg_level != SOL_SOCKET ||
                cm->cmsg_type != SCM_RIGHTS || nfds != 1) {
                fail("client %d: ancillary data of type %d, %zu fds",
                     c->index, cm->cmsg_type, nfds);
            }
            g_array_append_val(c->fds, ((RecvFd) {
                at, at + MAX(n, 1), *(int *)CMSG_DATA(cm) }));
        }
        if (n >= 0 && (mh.msg_flags & MSG_CTRUNC)) {
            fail("client %d: more descriptors than one", c->index);
        }
        if (n <= 0) {
            /* End of file, or ECONNRESET: it hung up with our bytes unread */
            c->eof = true;
            break;
        }
        g_byte_array_append(c->in, buf, n);
        got += n;
        parse_frames(f, c);
    }
    if (c->eof) {
        check_orphan_fds(c);
        client_eof(f, c);
    }
    return got;
}

/* Pump and read until @c (or every client) has nothing more to read */
static void settle(Fuzz *f, int only)
{
    for (int round = 0; round < READ_ROUNDS; round++) {
        size_t moved = 0;

        pump(f);
        for (int i = 0; i <= CHECKER; i++) {
            if (only < 0 || only == i) {
                moved += flush(&f->c[i]);
                moved += client_read(f, &f->c[i]);
            }
        }
        if (!moved) {
            break;
        }
    }
}

/* Connections */

static void kid_exit(Fuzz *f, Kid *k)
{
    FzClient *c = &f->c[k->slot];
    int status;

    close(k->die_fd);
    while (waitpid(k->pid, &status, 0) < 0 && errno == EINTR) {
    }
    k->pid = 0;
    if (c->fd >= 0 && c->mortal && c->conn_no == k->conn_no) {
        c->exited = true;
    }
}

/* @c's slot: connected on @fd, or empty (-1) */
static void client_init(Fuzz *f, FzClient *c, int fd)
{
    *c = (FzClient) {
        .fd = fd,
        .index = c->index,
        .store_fd = -1,
        .conn_no = fd >= 0 ? f->conns++ : 0,
        .pending = g_byte_array_new(),
        .in = g_byte_array_new(),
        .fds = g_array_new(FALSE, FALSE, sizeof(RecvFd)),
        .held = g_hash_table_new(g_direct_hash, g_direct_equal),
        .missed = g_hash_table_new_full(g_int64_hash, g_int64_equal, g_free,
                                        NULL),
    };
    g_queue_init(&c->expects);
}

static void client_free(FzClient *c)
{
    if (c->fd >= 0) {
        close(c->fd);
    }
    if (c->store_fd >= 0) {
        close(c->store_fd);
    }
    for (guint i = 0; i < c->fds->len; i++) {
        close(g_array_index(c->fds, RecvFd, i).fd);
    }
    g_array_unref(c->fds);
    g_queue_clear_full(&c->expects, (GDestroyNotify)expect_free);
    g_byte_array_unref(c->pending);
    g_byte_array_unref(c->in);
    g_hash_table_destroy(c->held);
    g_hash_table_destroy(c->missed);
}

static void client_open(Fuzz *f, FzClient *c, int fd)
{
    client_free(c);
    client_init(f, c, fd);
}

static void client_close(Fuzz *f, FzClient *c)
{
    if (c->fd < 0) {
        return;
    }
    client_read(f, c);
    if (c->hello_sent || c->tainted) {
        /*
         * Parked if it holds references: surely, when a strict client
         * has its last reply and holds some (its process is ours, which
         * lives); maybe, if we cannot tell
         */
        bool known = !c->tainted && !c->unsure &&
                     g_queue_is_empty(&c->expects);

        if (!known || c->refs) {
            f->may_parked++;
        }
        if (known && c->refs && !c->mortal) {
            f->sure_parked++;
        }
    }
    client_open(f, c, -1);
}

static struct sockaddr_un broker_addr(void)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };

    g_strlcpy(sa.sun_path, socket_path, sizeof(sa.sun_path));
    return sa;
}

static void client_connect(Fuzz *f, FzClient *c)
{
    struct sockaddr_un sa = broker_addr();
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    client_close(f, c);
    if (fd < 0) {
        fail("socket: %s", g_strerror(errno));
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        /* The backlog is full: the script connected without pumping */
        close(fd);
        return;
    }
    client_open(f, c, fd);
}

/*
 * Connect @c from a child process that then lives until told to exit:
 * the broker reads the child's credentials and pidfd, and this process
 * keeps the connection.  fork() of this process (hundreds of MiB under
 * ASan) cost more than the rest of an input, page tables and
 * copy-on-write faults; so vfork(): the child connects with raw system
 * calls, closes every descriptor but its pipe (a copy would hold other
 * connections open) and becomes cat(1) reading the pipe, which exits
 * when we close our end.  Until it exec()s we are suspended.
 */
static void client_spawn(Fuzz *f, FzClient *c)
{
    static char *const argv[] = { (char *)"cat", NULL };
    static char *const envp[] = { NULL };
    struct sockaddr_un sa = broker_addr();
    static volatile int connected;
    int die[2], fd;
    pid_t pid;

    if (f->nkids >= MAX_SPAWNS) {
        return;
    }
    client_close(f, c);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || pipe2(die, O_CLOEXEC) < 0) {
        fail("socket, pipe: %s", g_strerror(errno));
    }
    connected = 0;
    pid = vfork();
    if (pid < 0) {
        fail("vfork: %s", g_strerror(errno));
    }
    if (pid == 0) {
        connected = syscall(SYS_connect, fd, &sa, sizeof(sa)) == 0;
        syscall(SYS_dup2, die[0], 0);
        syscall(SYS_close_range, 3, ~0u, 0);
        syscall(SYS_execve, "/bin/cat", argv, envp);
        syscall(SYS_exit, 127);
    }
    close(die[0]);
    f->kids[f->nkids++] = (Kid) { pid, die[1], c->index, UINT32_MAX };
    if (!connected) {
        close(fd);
        return;
    }
    client_open(f, c, fd);
    c->mortal = true;
    f->kids[f->nkids - 1].conn_no = c->conn_no;
}

/* Operations */

/* The key of @c's group: read the WELCOME if it is on its way */
static void learn_key(Fuzz *f, FzClient *c)
{
    if (c->hello_sent && !c->joined && c->fd >= 0) {
        settle(f, c->index);
    }
}

/* With F_SPLIT, a byte: send about byte/256 of the frame now */
static uint8_t split_arg(Input *in, uint8_t flags)
{
    uint8_t split = flags & F_SPLIT ? in_u8(in) : 0;

    return flags & F_SPLIT ? MAX(split, 1) : 0;
}

static void op_lookup(Fuzz *f, FzClient *c)
{
    static const uint32_t special[] = { 16, 256, 4096, 4097, 0 };
    uint8_t n = in_u8(&f->in), flags = in_u8(&f->in);
    uint8_t split = split_arg(&f->in, flags);
    uint32_t count = n >= 0xf8 && n - 0xf8 < 5 ? special[n - 0xf8]
                                                : 1 + n % 8;
    g_autofree uint64_t *h = g_new0(uint64_t, MAX(count, 8));
    g_autofree uint8_t *page = g_malloc(ps);

    learn_key(f, c);
    for (uint32_t i = 0; i < MIN(count, 8); i++) {
        uint8_t sel = in_u8(&f->in);

        if (sel < 0x80) {
            h[i] = page_hash(c, pool_page(sel));
        } else if (sel < 0xc0) {
            seed_page(page, in_u16(&f->in));
            h[i] = page_hash(c, page);
        } else {
            h[i] = in_u64(&f->in);
        }
    }
    /*
     * Past the eighth, every other entry repeats one (more references to
     * a slot), the others are hashes nobody has: misses that fill the
     * unstable table until it is emptied
     */
    for (uint32_t i = 8; i < count; i++) {
        h[i] = i % 2 ? h[i % 8] : h[i % 8] ^ (i * 0x9e3779b97f4a7c15ull);
    }
    send_lookup(c, h, count, flags, split);
}

static void op_upload(Fuzz *f, FzClient *c)
{
    static const uint32_t special[] = { 8, 64, 65, 0 };
    uint8_t n = in_u8(&f->in), flags = in_u8(&f->in);
    uint8_t split = split_arg(&f->in, flags);
    uint32_t count = n >= 0xf8 && n - 0xf8 < 4 ? special[n - 0xf8]
                                                : 1 + n % 4;
    /* F_BAD2: pages of twice the group's size */
    uint32_t page_size = flags & F_BAD2 ? 2 * ps : ps;
    g_autofree uint64_t *h = NULL;
    g_autofree bool *valid = NULL;
    g_autofree uint8_t *pages = NULL;
    uint8_t sel[8] = { 0 };
    uint16_t seeds[8] = { 0 };

    if (f->upload_pages + count > MAX_UPLOAD_PAGES) {
        count = 1;
    }
    f->upload_pages += count;
    h = g_new0(uint64_t, MAX(count, 1));
    valid = g_new0(bool, MAX(count, 1));
    pages = g_malloc0((size_t)MAX(count, 1) * page_size);
    learn_key(f, c);
    for (uint32_t i = 0; i < MIN(count, 8); i++) {
        sel[i] = in_u8(&f->in);
        seeds[i] = sel[i] & 0x10 ? in_u16(&f->in) : 0;
    }
    for (uint32_t i = 0; i < count; i++) {
        uint8_t *p = pages + (size_t)i * page_size;
        uint8_t s = sel[i % 8];

        /*
         * bits 0-2: a page of the pool; bit 4: a page of its own; bit
         * 3: a wrong hash.  Past the eighth, pages of their own.
         */
        if (i >= 8) {
            seed_page(p, 0x10000 + i * 251 + s);
        } else if (s & 0x10) {
            seed_page(p, seeds[i]);
        } else {
            memcpy(p, pool_page(s & 7), ps);
        }
        if (page_size != ps) {
            memcpy(p + ps, p, ps);
        }
        h[i] = page_hash(c, p) ^ (s & 0x08 ? 1 : 0);
        valid[i] = c->joined && !(s & 0x08);
    }
    send_upload(c, h, valid, pages, page_size, count, flags, split);
}

static gint slot_cmp(gconstpointer a, gconstpointer b)
{
    uint32_t x = GPOINTER_TO_UINT(a), y = GPOINTER_TO_UINT(b);

    return x < y ? -1 : x > y;
}

static void op_release(Fuzz *f, FzClient *c)
{
    uint8_t n = in_u8(&f->in), flags = in_u8(&f->in);
    uint8_t split = split_arg(&f->in, flags);
    uint32_t count = n == 0xfc ? 0 : n == 0xfd ? 4097 : 1 + n % 8;
    g_autofree uint32_t *slots = g_new0(uint32_t, MAX(count, 8));
    g_autofree uint32_t *refs = g_new0(uint32_t, MAX(count, 8));
    /* Sorted, so that a selector names the same slot every run */
    g_autoptr(GList) held = g_list_sort(g_hash_table_get_keys(c->held),
                                        slot_cmp);
    guint nheld = g_list_length(held);

    for (uint32_t i = 0; i < MIN(count, 8); i++) {
        uint8_t e = in_u8(&f->in), r = in_u8(&f->in);

        if (e < 0xc0 && nheld) {
            /* One it holds: r selects how many (0x80..: one too many) */
            uint32_t slot = GPOINTER_TO_UINT(g_list_nth_data(held,
                                                             e % nheld));
            uint32_t have = held_of(c, slot);

            slots[i] = slot;
            refs[i] = e < 0x80 ? 1 + r % have : have + 1;
        } else {
            slots[i] = r;
            refs[i] = 1 + e % 3;
        }
    }
    for (uint32_t i = 8; i < count; i++) {
        slots[i] = slots[i % 8];
        refs[i] = refs[i % 8];
    }
    send_release(c, slots, refs, count, flags, split);
}

/* Bytes as they come: the client's replies can no longer be predicted */
static void op_raw(Fuzz *f, FzClient *c)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    uint8_t len = 1 + in_u8(&f->in) % 64;

    for (uint8_t i = 0; i < len; i++) {
        uint8_t b = in_u8(&f->in);

        g_byte_array_append(out, &b, 1);
    }
    taint(c);
    send_frame(c, out, 0, NULL);
}

/* A well-formed frame of @type, requests and replies alike */
static void build_frame(FzClient *c, GByteArray *out, unsigned type)
{
    MsProtoMsg w = { .type = MS_MSG_WELCOME };
    MsProtoResult r = { 0, MS_STATUS_OK };
    uint64_t h[2] = { page_hash(c, pool_page(1)), page_hash(c, pool_page(2)) };
    uint32_t slot = 0, refs = 1;
    uint32_t id = ++c->next_id;

    switch (type) {
    case MS_MSG_WELCOME:
        w.welcome.page_size = ps;
        w.welcome.nslots = 16;
        w.welcome.max_refs = 8;
        w.welcome.max_lookup = MS_PROTO_MAX_LOOKUP;
        w.welcome.max_upload = ms_proto_max_upload(ps);
        w.welcome.max_release = MS_PROTO_MAX_RELEASE;
        w.welcome.hash_algo = MS_PROTO_HASH_XXH3_SECRET;
        ms_proto_encode_welcome(out, id, &w);
        break;
    case MS_MSG_LOOKUP:
        ms_proto_encode_lookup(out, id, h, 2);
        break;
    case MS_MSG_LOOKUP_REPLY:
    case MS_MSG_UPLOAD_REPLY:
        ms_proto_encode_results(out, id, type, &r, 1);
        break;
    case MS_MSG_UPLOAD:
        ms_proto_encode_upload(out, id, h, pool_page(1), ps, 1);
        break;
    case MS_MSG_RELEASE:
        ms_proto_encode_release(out, id, &slot, &refs, 1);
        break;
    case MS_MSG_RELEASE_REPLY:
        ms_proto_encode_release_reply(out, id, 1);
        break;
    case MS_MSG_STATS:
        ms_proto_encode_stats(out, id);
        break;
    case MS_MSG_STATS_REPLY:
        ms_proto_encode_stats_reply(out, id, NULL, NULL, 0);
        break;
    case MS_MSG_ERROR:
        ms_proto_encode_error(out, id, EPROTO, "from a client");
        break;
    case MS_MSG_ANSWERED:
        ms_proto_encode_answered(out, id);
        break;
    case MS_MSG_ANSWERED_REPLY:
        ms_proto_encode_answered_reply(out, id, MS_ANSWERED_LOST, 1, h, 2);
        break;
    default:
        /* HELLO, and HELLO's bytes under a type nobody knows */
        ms_proto_encode_hello(out, id, "fz", "mutant");
        out->data[6] = type;
        break;
    }
}

static void op_mutate(Fuzz *f, FzClient *c)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    unsigned type = in_u8(&f->in) % (MS_MSG__MAX + 1);
    uint8_t n = in_u8(&f->in) % 5, trunc;

    learn_key(f, c);
    build_frame(c, out, type);
    for (uint8_t i = 0; i < n; i++) {
        uint16_t pos = in_u16(&f->in);

        out->data[pos % out->len] = in_u8(&f->in);
    }
    trunc = in_u8(&f->in);
    if (trunc >= 0x80) {
        g_byte_array_set_size(out, out->len - (trunc & 0x7f) % out->len);
    }
    taint(c);
    send_frame(c, out, 0, NULL);
}

static void op_reconfigure(Fuzz *f)
{
    g_auto(MsBrokerConfig) cfg = { 0 };
    g_autoptr(GError) err = NULL;
    uint8_t c0 = in_u8(&f->in), c1 = in_u8(&f->in), c2 = in_u8(&f->in);
    FzConfig fc = config_parse(c0, c1, c2);

    config_build(&cfg, &fc, f->nslots);
    if (!ms_broker_reconfigure(f->b, &cfg, &err)) {
        fail("ms_broker_reconfigure: %s", err->message);
    }
    f->cfgs[f->ncfgs++] = fc;
}

static void run_op(Fuzz *f, uint8_t byte)
{
    int op = (byte & 0x1f) % OP__MAX, k = byte >> 5;
    FzClient *c = &f->c[k];
    uint8_t g, name, flags, split;

    say("operation %d: %s %d", cur_op, op_names[op], k);
    switch (op) {
    case OP_CONNECT:
        client_connect(f, c);
        break;
    case OP_HELLO:
        g = in_u8(&f->in);
        name = in_u8(&f->in);
        flags = in_u8(&f->in);
        split = split_arg(&f->in, flags);
        send_hello(c, g % NGROUPS, name, flags, split);
        break;
    case OP_LOOKUP:
        op_lookup(f, c);
        break;
    case OP_UPLOAD:
        op_upload(f, c);
        break;
    case OP_RELEASE:
        op_release(f, c);
        break;
    case OP_STATS:
        flags = in_u8(&f->in);
        send_stats(c, split_arg(&f->in, flags));
        break;
    case OP_ANSWERED:
        flags = in_u8(&f->in);
        send_answered(c, split_arg(&f->in, flags));
        break;
    case OP_RAW:
        op_raw(f, c);
        break;
    case OP_MUTATE:
        op_mutate(f, c);
        break;
    case OP_FLUSH:
        flush(c);
        break;
    case OP_READ:
        settle(f, k);
        break;
    case OP_CLOSE:
        client_close(f, c);
        break;
    case OP_SHUTDOWN:
        if (c->fd >= 0 && !c->shut) {
            flush(c);
            shutdown(c->fd, SHUT_WR);
            c->shut = true;
        }
        break;
    case OP_PUMP:
        pump(f);
        break;
    case OP_SPAWN:
        client_spawn(f, c);
        break;
    case OP_EXIT:
        for (int i = 0; i < f->nkids; i++) {
            if (f->kids[i].pid && f->kids[i].slot == k) {
                kid_exit(f, &f->kids[i]);
            }
        }
        break;
    case OP_RECONFIGURE:
        op_reconfigure(f);
        break;
    case OP_READ_ALL:
        settle(f, -1);
        break;
    }
}

/* The end */

/*
 * Every client gone, the broker must still serve: STATS from a fresh
 * client, which then joins "fz" and looks a page up.  Unless the
 * connections the script made filled the limits: then on_frame()
 * checked that the refusal was due.
 */
static void check_serving(Fuzz *f)
{
    FzClient *c = &f->c[CHECKER];
    uint64_t h;

    client_connect(f, c);
    if (c->fd < 0) {
        fail("the broker's backlog is full after the script");
    }
    send_stats(c, 0);
    settle(f, CHECKER);
    if (c->errored) {
        return;
    }
    if (!c->got_stats) {
        fail("no answer to a fresh client's STATS");
    }
    if (c->bs.clients != 1 || c->bs.parked < f->sure_parked ||
        c->bs.parked > f->may_parked || c->group_clients ||
        c->group_parked != c->bs.parked) {
        fail("after the script: %" PRIu64 " clients, %" PRIu64 " parked"
             " (%" PRIu64 " in the groups), %" PRIu64 " members; expected 1"
             " client, %u to %u parked, no member", c->bs.clients,
             c->bs.parked, c->group_parked, c->group_clients,
             f->sure_parked, f->may_parked);
    }
    send_hello(c, G_FZ, 0, 0, 0);
    settle(f, CHECKER);
    h = page_hash(c, pool_page(1));
    send_lookup(c, &h, 1, 0, 0);
    send_stats(c, 0);
    settle(f, CHECKER);
    if (!c->joined || c->errored || !g_queue_is_empty(&c->expects)) {
        fail("a fresh client cannot join fz: %s",
             c->errored ? "refused" : "no answer");
    }
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (!d) {
        fail("/proc/self/fd: %s", g_strerror(errno));
    }
    while ((e = readdir(d))) {
        n += e->d_name[0] != '.';
    }
    closedir(d);
    return n;
}

/* Descriptors the default main context polls; @timeout: -1 if none */
static int context_fds(int *timeout)
{
    GMainContext *ctx = g_main_context_default();
    GPollFD fds[256];
    gint prio, n;

    if (!g_main_context_acquire(ctx)) {
        fail("cannot acquire the main context");
    }
    g_main_context_prepare(ctx, &prio);
    n = g_main_context_query(ctx, prio, timeout, fds, G_N_ELEMENTS(fds));
    g_main_context_check(ctx, prio, fds, MIN(n, (gint)G_N_ELEMENTS(fds)));
    g_main_context_dispatch(ctx);
    g_main_context_release(ctx);
    return n;
}

const char *__asan_default_options(void);
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The socket directory (the broker may still hold the socket file) */
static void cleanup(void)
{
    if (socket_path) {
        unlink(socket_path);
    }
    if (tmpdir) {
        rmdir(tmpdir);
    }
}

/*
 * An input allocates a few MiB (pages, frames, a store's tables) and
 * frees them: with ASan's 256 MiB quarantine every allocation was a
 * fresh page to fault in, and that was most of the time an input took.
 * A use after free still has to survive 32 MiB of later allocations to
 * go unnoticed: several inputs' worth.  ASAN_OPTIONS overrides it.
 */
const char *__asan_default_options(void)
{
    return "quarantine_size_mb=32";
}

int LLVMFuzzerInitialize(int *argc G_GNUC_UNUSED, char ***argv G_GNUC_UNUSED)
{
    g_autoptr(GError) err = NULL;

    verbose = g_getenv("MS_FUZZ_VERBOSE") != NULL;
    g_log_set_default_handler(log_handler, NULL);
    signal(SIGPIPE, SIG_IGN);
    ps = ms_host_page_size();
    tmpdir = g_dir_make_tmp("fuzz-broker-XXXXXX", &err);
    if (!tmpdir) {
        fail("%s", err->message);
    }
    socket_path = g_build_filename(tmpdir, "s", NULL);
    atexit(cleanup);
    /* What GLib opens once, before the first input counts descriptors */
    g_main_context_iteration(NULL, FALSE);
    /* Zeros, then pages that differ from their first byte on */
    pool = g_malloc0(POOL * ps);
    for (unsigned i = 1; i < POOL; i++) {
        memset(pool + i * ps, 0x11 * i, ps);
        pool[i * ps] = i;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    g_autofree Fuzz *f = g_new0(Fuzz, 1);
    g_auto(MsBrokerConfig) cfg = { 0 };
    g_autoptr(GError) err = NULL;
    int timeout, timeout_after, ctx = context_fds(&timeout);
    int fds = count_fds();
    uint8_t c0, c1, c2;

    f->in = (Input) { data, size };
    for (int i = 0; i <= CHECKER; i++) {
        f->c[i].index = i;
        client_init(f, &f->c[i], -1);
    }
    c0 = in_u8(&f->in);
    c1 = in_u8(&f->in);
    c2 = in_u8(&f->in);
    f->cfgs[f->ncfgs++] = config_parse(c0, c1, c2);
    f->nslots = f->cfgs[0].nslots;
    config_build(&cfg, &f->cfgs[0], f->nslots);
    f->b = ms_broker_new(&cfg, &err);
    if (!f->b) {
        fail("ms_broker_new: %s", err->message);
    }
    broker_check(f);

    for (cur_op = 0; cur_op < MAX_OPS && f->in.n; cur_op++) {
        run_op(f, in_u8(&f->in));
        g_main_context_iteration(NULL, FALSE);
        broker_check(f);
    }

    /* The end: replies read, clients closed, the broker still serving */
    settle(f, -1);
    for (int i = 0; i < NCLIENTS; i++) {
        client_close(f, &f->c[i]);
    }
    pump(f);
    check_serving(f);
    client_close(f, &f->c[CHECKER]);
    for (int i = 0; i < f->nkids; i++) {
        if (f->kids[i].pid) {
            kid_exit(f, &f->kids[i]);
        }
    }
    settle(f, -1);
    ms_broker_free(f->b);
    for (int i = 0; i <= CHECKER; i++) {
        client_free(&f->c[i]);
    }
    cur_op = -1;
    if (count_fds() != fds) {
        fail("%d descriptors open after the input, %d before", count_fds(),
             fds);
    }
    if (context_fds(&timeout_after) != ctx || timeout_after != timeout) {
        fail("GLib sources left in the main context");
    }
    return 0;
}
