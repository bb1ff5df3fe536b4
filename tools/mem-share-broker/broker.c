/*
 * mem-share-broker: the daemon's core
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One broker per host lets VMs of one trust group share pages.  Each
 * group owns an MsStore (a memfd of slots, written only here) and a hash
 * secret that its members receive, so that they can name a page by its
 * keyed hash.  A client joins a group (HELLO) and gets the store's
 * read-only descriptor; then it asks in batches which slots hold the
 * pages it hashed (LOOKUP), gives the broker pages to store (UPLOAD) and
 * gives references back (RELEASE).
 *
 * References.  Every slot a client is handed carries one store reference
 * for that client, recorded in the client's own slot -> count table.  A
 * client can only drop references its table holds.  A slot is freed by
 * ms_store_put() when its last reference goes, never earlier: a guest
 * that maps it must keep reading the same bytes.  So a reference goes
 * only when its client releases it, or when the client's process has
 * exited.  A connection that ends (end of file, a protocol violation)
 * proves nothing about the pages its process maps: a stopped QEMU, a
 * client that gave up on a slow broker, a buggy one we hung up on may
 * all still map the slots.  The broker takes a pidfd of the peer when it
 * connects (SO_PEERPIDFD, else pidfd_open() of SO_PEERCRED's pid) and a
 * client whose connection ended keeps its references, "parked", until
 * that pidfd says the process exited.  No timeout ever drops one.
 *
 * Meeting.  A page two members have once each is in no store yet: each
 * looks it up and misses.  Like KSM's unstable tree, the group remembers
 * which member missed a hash first; when another member misses the same
 * hash, it is told MS_STATUS_WANTED and uploads its page, and the first
 * member finds the slot at its next lookup.  A member's pages that
 * nobody else has are never stored.  The unstable table is an array of
 * 8-byte entries, open addressing with linear probing, one entry for
 * each slot of the store (at most UNSTABLE_MAX): most misses are pages
 * nobody else has, so a hash table of separately allocated entries grew
 * to several times the size and paid two allocations a miss.  It is
 * emptied when half full, as stale entries only cost misses; a member
 * told WANTED leaves a tombstone.  Buckets come from a hash of the hash
 * under a secret of the broker's, so that a member cannot pile its
 * misses into one run of buckets; an entry keeps the upper half of that
 * hash of the hash (the bucket is from the lower) and 32 bits of the
 * client's id.  Both only decide who uploads: two hashes that share a
 * bucket run and a tag (one lookup in 2^32) make a member upload a page
 * nobody else has, and a client id that wrapped makes a member miss one
 * meeting.  The bytes are compared before anyone maps anything, as
 * always.
 *
 * The index.  MsStore indexes slots under its own secret, which it keeps
 * to itself; the members need one they can compute, so each group also
 * has a lookup secret and its own index (the group hash of each slot,
 * chained the way store.c chains collisions).  An upload is only stored
 * if its content hashes as the client claimed, so the index cannot be
 * poisoned with wrong hashes; identical contents are found through the
 * store's own index (ms_store_find() compares bytes).
 *
 * Hostile clients.  Every byte is untrusted: frames are read to a cap
 * and decoded by proto.c, the order of messages is checked (HELLO first
 * and once), and any violation gets the client an ERROR and a hang-up
 * (its references stay parked until its process exits).  Memory per
 * client is bounded: a client has at most one frame being read and one
 * reply being written, and the broker reads its next request only once
 * the last reply is gone (so a client that floods requests without
 * reading replies only fills its own socket buffers).  One request is
 * served per wake-up, so a busy client cannot starve the others.  A
 * parked client costs its table until its process exits: the quota
 * bounds it, and it counts against --max-clients.
 *
 * Single-threaded: everything runs in the GLib main context.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>
#include <glib-unix.h>

#include "mem-share/hash.h"
#include "mem-share/proto.h"
#include "mem-share/store.h"
#include "broker.h"

G_STATIC_ASSERT(MS_PROTO_SECRET_SIZE == MS_HASH_SECRET_SIZE);

typedef struct Group Group;
typedef struct Client Client;

/* Linux 6.5; older kernels say ENOPROTOOPT and we use pidfd_open() */
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

/* The unstable table's most entries (128 MiB), whatever the store's size */
#define UNSTABLE_MAX (1u << 24)
/* Its entries' @client: never a client's unstable_id() */
#define UNSTABLE_FREE 0
#define UNSTABLE_GONE UINT32_MAX

/* An entry of the unstable table: who missed a hash first */
typedef struct Unstable {
    uint32_t tag;               /* upper half of the bucket's hash */
    uint32_t client;            /* unstable_id() of the client */
} Unstable;

struct MsBroker {
    MsBrokerConfig cfg;
    char *socket_path;
    int listen_fd;
    guint listen_watch;
    size_t page_size;
    uint32_t nslots;            /* per group store */
    GHashTable *group_uids;     /* name -> GArray of uid_t */
    GHashTable *groups;         /* name -> Group */
    GList *clients;             /* connected and parked */
    uint32_t nclients;          /* connected */
    uint32_t nparked;           /* gone, their process alive */
    uint64_t next_client_id;
};

struct Group {
    MsBroker *broker;
    char *name;
    MsStore *store;
    MsHashKey key;              /* the members' lookup secret */
    GHashTable *index;          /* &ghash[head] -> head + 1 */
    uint64_t *ghash;            /* per indexed slot: its group hash */
    uint32_t *gnext;            /* next indexed slot with the same hash */
    uint8_t *indexed;
    uint32_t *holders;          /* per slot: clients holding a reference */
    uint64_t shared_slots;      /* slots with two holders or more */
    uint32_t nclients;          /* connected members */
    uint32_t nparked;           /* members gone whose process lives */
    Unstable *unstable;         /* see "Meeting" */
    uint32_t unstable_mask;     /* its entries - 1 (a power of two) */
    uint32_t unstable_used;     /* entries and tombstones */
    MsHashKey unstable_key;     /* the broker's: picks the bucket */
    uint64_t lookups, hits, uploads, published, refused;
};

struct Client {
    MsBroker *broker;
    uint64_t id;
    int fd;                     /* -1 once parked (see "References") */
    guint watch;
    GIOCondition cond;
    pid_t pid;
    uid_t uid;
    int pidfd;                  /* the peer process, or -1 */
    bool parked;                /* connection over, references kept */
    guint pid_watch;            /* while parked: its exit */
    char *label;                /* for log lines: who this is */
    Group *group;               /* NULL until HELLO */
    GByteArray *in;             /* the frame being read */
    size_t in_want;             /* its full size, once the header is in */
    GByteArray *out;            /* the reply being written */
    size_t out_pos;
    int out_fd;                 /* to pass with the reply's first byte */
    GHashTable *held;           /* slot -> references held */
    uint64_t refs;              /* sum of @held */
};

/* Groups and their index */

static void index_add(Group *g, uint32_t slot, uint64_t hash)
{
    gpointer head;

    g->ghash[slot] = hash;
    head = g_hash_table_lookup(g->index, &g->ghash[slot]);
    g->gnext[slot] = head ? GPOINTER_TO_UINT(head) - 1 : MS_SLOT_NONE;
    /* The key must live as long as the entry: the head slot's hash */
    g_hash_table_replace(g->index, &g->ghash[slot], GUINT_TO_POINTER(slot + 1));
    g->indexed[slot] = 1;
}

static void index_remove(Group *g, uint32_t slot)
{
    gpointer v = g_hash_table_lookup(g->index, &g->ghash[slot]);
    uint32_t head = GPOINTER_TO_UINT(v) - 1;

    g_assert(v && g->indexed[slot]);
    g->indexed[slot] = 0;
    if (head == slot) {
        uint32_t n = g->gnext[slot];

        g_hash_table_remove(g->index, &g->ghash[slot]);
        if (n != MS_SLOT_NONE) {
            g_hash_table_replace(g->index, &g->ghash[n],
                                 GUINT_TO_POINTER(n + 1));
        }
        return;
    }
    for (uint32_t i = head; i != MS_SLOT_NONE; i = g->gnext[i]) {
        if (g->gnext[i] == slot) {
            g->gnext[i] = g->gnext[slot];
            return;
        }
    }
    g_assert_not_reached();
}

static uint32_t index_find(Group *g, uint64_t hash)
{
    gpointer v = g_hash_table_lookup(g->index, &hash);

    return v ? GPOINTER_TO_UINT(v) - 1 : MS_SLOT_NONE;
}

static void group_free(Group *g)
{
    if (!g) {
        return;
    }
    ms_store_free(g->store);
    if (g->index) {
        g_hash_table_destroy(g->index);
    }
    g_free(g->unstable);
    g_free(g->ghash);
    g_free(g->gnext);
    g_free(g->indexed);
    g_free(g->holders);
    g_free(g->name);
    g_free(g);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Group, group_free)

static Group *group_new(MsBroker *b, const char *name, GError **errp)
{
    g_autoptr(Group) g = g_new0(Group, 1);

    g->broker = b;
    g->name = g_strdup(name);
    g->store = ms_store_new(b->page_size, b->nslots, errp);
    if (!g->store || !ms_hash_key_init(&g->key, errp) ||
        !ms_hash_key_init(&g->unstable_key, errp)) {
        return NULL;
    }
    g->index = g_hash_table_new(g_int64_hash, g_int64_equal);
    g->unstable_mask = (1u << g_bit_storage(CLAMP(b->nslots, 64, UNSTABLE_MAX)
                                            - 1)) - 1;
    g->unstable = g_new0(Unstable, g->unstable_mask + 1ull);
    g->ghash = g_new0(uint64_t, b->nslots);
    g->gnext = g_new0(uint32_t, b->nslots);
    g->indexed = g_new0(uint8_t, b->nslots);
    g->holders = g_new0(uint32_t, b->nslots);
    return g_steal_pointer(&g);
}

/* Client @c now holds one more reference to @slot (already taken) */
static void hold(Client *c, uint32_t slot)
{
    gpointer key = GUINT_TO_POINTER(slot);
    uint32_t n = GPOINTER_TO_UINT(g_hash_table_lookup(c->held, key));

    if (n == 0 && ++c->group->holders[slot] == 2) {
        c->group->shared_slots++;
    }
    g_hash_table_insert(c->held, key, GUINT_TO_POINTER(n + 1));
    c->refs++;
}

/* Drop @refs of the references @c holds to @slot (the caller checked) */
static void unhold(Client *c, uint32_t slot, uint32_t refs)
{
    Group *g = c->group;
    gpointer key = GUINT_TO_POINTER(slot);
    uint32_t n = GPOINTER_TO_UINT(g_hash_table_lookup(c->held, key));

    g_assert(refs <= n);
    if (refs == n) {
        g_hash_table_remove(c->held, key);
        if (g->holders[slot]-- == 2) {
            g->shared_slots--;
        }
    } else {
        g_hash_table_insert(c->held, key, GUINT_TO_POINTER(n - refs));
    }
    c->refs -= refs;
    for (uint32_t i = 0; i < refs; i++) {
        bool indexed = g->indexed[slot];

        if (ms_store_put(g->store, slot) && indexed) {
            index_remove(g, slot);
        }
    }
}

/* May @c take one more reference to @slot? */
static bool may_hold(Client *c, uint32_t slot)
{
    return c->refs < c->broker->cfg.client_quota &&
           (slot == MS_SLOT_NONE ||
            ms_store_refs(c->group->store, slot) < UINT32_MAX - 1);
}

/* Clients */

/* The group goes with its last member, connected or parked */
static void group_leave(MsBroker *b, Group *g)
{
    if (g->nclients == 0 && g->nparked == 0 &&
        !(b->group_uids && g_hash_table_contains(b->group_uids, g->name))) {
        g_hash_table_remove(b->groups, g->name);
    }
}

/* Close the connection of @c, if it has one */
static void client_close(Client *c)
{
    if (c->watch) {
        g_source_remove(c->watch);
        c->watch = 0;
    }
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
        c->broker->nclients--;
        if (c->group) {
            c->group->nclients--;
        }
    }
}

/* @c and its references go: it released them all, or its process exited */
static void client_free(Client *c)
{
    MsBroker *b = c->broker;
    Group *g = c->group;

    if (g) {
        GList *slots = g_hash_table_get_keys(c->held);

        for (GList *l = slots; l; l = l->next) {
            gpointer refs = g_hash_table_lookup(c->held, l->data);

            unhold(c, GPOINTER_TO_UINT(l->data), GPOINTER_TO_UINT(refs));
        }
        g_list_free(slots);
        g_message("%s: left group %s", c->label, g->name);
    }
    if (c->pid_watch) {
        g_source_remove(c->pid_watch);
    }
    if (c->parked) {
        g->nparked--;
        b->nparked--;
    }
    client_close(c);
    if (c->pidfd >= 0) {
        close(c->pidfd);
    }
    b->clients = g_list_remove(b->clients, c);
    g_byte_array_unref(c->in);
    g_byte_array_unref(c->out);
    g_hash_table_destroy(c->held);
    g_free(c->label);
    g_free(c);
    if (g) {
        group_leave(b, g);
    }
}

static gboolean client_exited(gint fd G_GNUC_UNUSED,
                              GIOCondition cond G_GNUC_UNUSED,
                              gpointer opaque)
{
    Client *c = opaque;

    g_message("%s: process exited: dropping its %" PRIu64 " references",
              c->label, c->refs);
    c->pid_watch = 0;
    client_free(c);
    return G_SOURCE_REMOVE;
}

/* Has the process behind @c exited?  (Unknown: it may still map slots) */
static bool client_process_exited(const Client *c)
{
    struct pollfd pfd = { .fd = c->pidfd, .events = POLLIN };

    return c->pidfd >= 0 && poll(&pfd, 1, 0) == 1;
}

/*
 * The connection of @c ended.  References it holds stay with it until
 * its process exits (see "References"): the client is parked.
 */
static void client_gone(Client *c)
{
    client_close(c);
    if (!c->group || !c->refs || client_process_exited(c)) {
        client_free(c);
        return;
    }
    c->parked = true;
    c->group->nparked++;
    c->broker->nparked++;
    if (c->pidfd < 0) {
        g_warning("%s: cannot watch its process: its %" PRIu64 " references"
                  " stay until the broker exits", c->label, c->refs);
        return;
    }
    g_message("%s: keeping its %" PRIu64 " references until process %d"
              " exits", c->label, c->refs, (int)c->pid);
    c->pid_watch = g_unix_fd_add(c->pidfd, G_IO_IN, client_exited, c);
}

static bool client_fail(Client *c, int code, const char *fmt, ...)
    G_GNUC_PRINTF(3, 4);

/*
 * A protocol violation: log it, try once to tell the client why (it may
 * not be reading), and have the caller drop it.
 */
static bool client_fail(Client *c, int code, const char *fmt, ...)
{
    g_autofree char *why = NULL;
    g_autoptr(GByteArray) err = g_byte_array_new();
    va_list ap;

    va_start(ap, fmt);
    why = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_warning("%s: %s: disconnecting", c->label, why);
    ms_proto_encode_error(err, 0, code, why);
    if (send(c->fd, err->data, err->len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
        /* Nothing more to do: the client is going anyway */
    }
    return false;
}

/* Queue a reply; the caller's watch sends it */
static void reply(Client *c, GByteArray *frame, int fd)
{
    g_assert(c->out->len == 0);
    g_byte_array_append(c->out, frame->data, frame->len);
    c->out_pos = 0;
    c->out_fd = fd;
}

static bool client_flush(Client *c)
{
    while (c->out_pos < c->out->len) {
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } ctl;
        struct iovec iov = { c->out->data + c->out_pos,
                             c->out->len - c->out_pos };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        ssize_t n;

        if (c->out_fd >= 0) {
            struct cmsghdr *cm;

            memset(&ctl, 0, sizeof(ctl));
            mh.msg_control = ctl.buf;
            mh.msg_controllen = sizeof(ctl.buf);
            cm = CMSG_FIRSTHDR(&mh);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cm), &c->out_fd, sizeof(int));
        }
        n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && errno == EAGAIN) {
            return true;
        }
        if (n < 0) {
            g_message("%s: connection lost: %s", c->label, g_strerror(errno));
            return false;
        }
        c->out_fd = -1;     /* it went with the first byte */
        c->out_pos += n;
    }
    g_byte_array_set_size(c->out, 0);
    c->out_pos = 0;
    return true;
}

/* Requests */

static bool group_allows(MsBroker *b, const char *name, uid_t uid)
{
    GArray *uids = b->group_uids ? g_hash_table_lookup(b->group_uids, name)
                                 : NULL;

    if (!uids || uids->len == 0 || uid == 0 || uid == geteuid()) {
        return true;
    }
    for (guint i = 0; i < uids->len; i++) {
        if (g_array_index(uids, uid_t, i) == uid) {
            return true;
        }
    }
    return false;
}

static bool do_hello(Client *c, const MsProtoMsg *msg)
{
    MsBroker *b = c->broker;
    g_autoptr(GByteArray) out = g_byte_array_new();
    g_autoptr(GError) err = NULL;
    const char *name = msg->hello.group;
    MsProtoMsg w = { .type = MS_MSG_WELCOME };
    Group *g;

    if (c->group) {
        return client_fail(c, EPROTO, "second HELLO (already in group %s)",
                           c->group->name);
    }
    if (b->cfg.strict_groups &&
        !(b->group_uids && g_hash_table_contains(b->group_uids, name))) {
        return client_fail(c, ENOENT, "no group %s: this broker serves only"
                           " the groups it was started with", name);
    }
    if (!group_allows(b, name, c->uid)) {
        return client_fail(c, EACCES, "uid %u may not join group %s",
                           (unsigned)c->uid, name);
    }
    g = g_hash_table_lookup(b->groups, name);
    if (!g) {
        if (g_hash_table_size(b->groups) >= b->cfg.max_groups) {
            return client_fail(c, ENOSPC, "cannot create group %s: %u groups"
                               " exist, --max-groups allows %u", name,
                               g_hash_table_size(b->groups),
                               b->cfg.max_groups);
        }
        g = group_new(b, name, &err);
        if (!g) {
            return client_fail(c, ENOMEM, "cannot create group %s: %s", name,
                               err->message);
        }
        g_hash_table_insert(b->groups, g->name, g);
        g_message("group %s: created, %u slots of %zu bytes", name,
                  b->nslots, b->page_size);
    }
    c->group = g;
    g->nclients++;
    g_free(c->label);
    c->label = g_strdup_printf("client %" PRIu64 " %s (pid %d uid %u)", c->id,
                               msg->hello.name, (int)c->pid, (unsigned)c->uid);
    g_message("%s: joined group %s", c->label, name);

    w.welcome.page_size = b->page_size;
    w.welcome.nslots = b->nslots;
    w.welcome.max_refs = b->cfg.client_quota;
    w.welcome.max_lookup = MS_PROTO_MAX_LOOKUP;
    w.welcome.max_upload = ms_proto_max_upload(b->page_size);
    w.welcome.max_release = MS_PROTO_MAX_RELEASE;
    w.welcome.hash_algo = MS_PROTO_HASH_XXH3_SECRET;
    memcpy(w.welcome.secret, g->key.secret, MS_PROTO_SECRET_SIZE);
    ms_proto_encode_welcome(out, msg->id, &w);
    reply(c, out, ms_store_ro_fd(g->store));
    return true;
}

/*
 * The entry of the hash keyed to @k in the unstable table, or NULL and in
 * @free where it would go.  The table is never more than half full: the
 * probe ends.
 */
static Unstable *unstable_find(Group *g, uint64_t k, Unstable **free)
{
    uint32_t i = k & g->unstable_mask, tag = k >> 32;

    *free = NULL;
    for (;; i = (i + 1) & g->unstable_mask) {
        Unstable *u = &g->unstable[i];

        if (u->client == UNSTABLE_FREE) {
            *free = *free ? *free : u;
            return NULL;
        }
        if (u->client == UNSTABLE_GONE) {
            *free = *free ? *free : u;
        } else if (u->tag == tag) {
            return u;
        }
    }
}

/* @c's id in the unstable table: 1 .. UINT32_MAX - 1 */
static uint32_t unstable_id(const Client *c)
{
    return c->id % (UINT32_MAX - 1) + 1;
}

/* A miss: is another member waiting for this hash?  See "Meeting" */
static MsProtoStatus miss(Client *c, uint64_t hash)
{
    Group *g = c->group;
    uint64_t k = ms_hash_page(&g->unstable_key, &hash, sizeof(hash));
    Unstable *free, *u = unstable_find(g, k, &free);

    if (u) {
        if (u->client == unstable_id(c)) {
            return MS_STATUS_NOT_FOUND;
        }
        u->client = UNSTABLE_GONE;
        return MS_STATUS_WANTED;
    }
    if (free->client == UNSTABLE_FREE) {
        if (g->unstable_used >= (g->unstable_mask + 1ull) / 2) {
            memset(g->unstable, 0,
                   (g->unstable_mask + 1ull) * sizeof(*g->unstable));
            g->unstable_used = 0;
            unstable_find(g, k, &free);
        }
        g->unstable_used++;
    }
    *free = (Unstable) { k >> 32, unstable_id(c) };
    return MS_STATUS_NOT_FOUND;
}

static MsProtoResult lookup_one(Client *c, uint64_t hash)
{
    Group *g = c->group;
    uint32_t slot = index_find(g, hash);

    g->lookups++;
    if (slot == MS_SLOT_NONE) {
        return (MsProtoResult) { MS_SLOT_NONE, miss(c, hash) };
    }
    g->hits++;
    if (!may_hold(c, slot)) {
        g->refused++;
        return (MsProtoResult) { MS_SLOT_NONE, MS_STATUS_QUOTA };
    }
    ms_store_get(g->store, slot);
    hold(c, slot);
    return (MsProtoResult) { slot, MS_STATUS_OK };
}

static bool do_lookup(Client *c, const MsProtoMsg *msg)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    g_autofree MsProtoResult *res = g_new(MsProtoResult, msg->lookup.count);

    for (uint32_t i = 0; i < msg->lookup.count; i++) {
        res[i] = lookup_one(c, ms_proto_lookup_hash(msg, i));
    }
    ms_proto_encode_results(out, msg->id, MS_MSG_LOOKUP_REPLY, res,
                            msg->lookup.count);
    reply(c, out, -1);
    return true;
}

/*
 * Store one page: the slot of an identical page if there is one, else a
 * new slot, preferably @hint (after the previous new one: neighbouring
 * guest pages then map neighbouring slots, and their mappings merge).
 */
static MsProtoResult upload_one(Client *c, uint64_t claimed,
                                const void *page, uint32_t *hint)
{
    Group *g = c->group;
    g_autoptr(GError) err = NULL;
    uint32_t slot;

    g->uploads++;
    if (ms_hash_page(&g->key, page, c->broker->page_size) != claimed) {
        g->refused++;
        return (MsProtoResult) { MS_SLOT_NONE, MS_STATUS_BAD_HASH };
    }
    slot = ms_store_find(g->store, ms_store_hash(g->store, page), page);
    if (!may_hold(c, slot)) {
        g->refused++;
        return (MsProtoResult) { MS_SLOT_NONE, MS_STATUS_QUOTA };
    }
    if (slot != MS_SLOT_NONE) {
        ms_store_get(g->store, slot);
        hold(c, slot);
        return (MsProtoResult) { slot, MS_STATUS_OK };
    }
    if (!ms_store_alloc_run(g->store, *hint, 1, &slot, &err)) {
        g->refused++;
        return (MsProtoResult) { MS_SLOT_NONE, MS_STATUS_FULL };
    }
    if (!ms_store_publish(g->store, slot, page, &err)) {
        g_warning("group %s: %s", g->name, err->message);
        ms_store_put(g->store, slot);
        g->refused++;
        return (MsProtoResult) { MS_SLOT_NONE, MS_STATUS_FULL };
    }
    index_add(g, slot, claimed);
    hold(c, slot);      /* the reference alloc_run took */
    g->published++;
    *hint = slot + 1 < c->broker->nslots ? slot + 1 : MS_SLOT_NONE;
    return (MsProtoResult) { slot, MS_STATUS_OK };
}

static bool do_upload(Client *c, const MsProtoMsg *msg)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    g_autofree MsProtoResult *res = g_new(MsProtoResult, msg->upload.count);
    uint32_t hint = MS_SLOT_NONE;
    uint32_t bad = 0;

    if (msg->upload.page_size != c->broker->page_size) {
        return client_fail(c, EINVAL, "UPLOAD of %u-byte pages: group %s"
                           " has %zu-byte pages", msg->upload.page_size,
                           c->group->name, c->broker->page_size);
    }
    for (uint32_t i = 0; i < msg->upload.count; i++) {
        res[i] = upload_one(c, ms_proto_upload_hash(msg, i),
                            ms_proto_upload_page(msg, i), &hint);
        bad += res[i].status == MS_STATUS_BAD_HASH;
    }
    if (bad) {
        g_message("%s: %u of %u uploaded pages refused: content does not"
                  " match the hash given", c->label, bad, msg->upload.count);
    }
    ms_proto_encode_results(out, msg->id, MS_MSG_UPLOAD_REPLY, res,
                            msg->upload.count);
    reply(c, out, -1);
    return true;
}

static bool do_release(Client *c, const MsProtoMsg *msg)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    uint64_t released = 0;

    for (uint32_t i = 0; i < msg->release.count; i++) {
        uint32_t slot, refs, held;

        ms_proto_release_entry(msg, i, &slot, &refs);
        held = GPOINTER_TO_UINT(g_hash_table_lookup(c->held,
                                                    GUINT_TO_POINTER(slot)));
        if (refs > held) {
            /* Dropping its own references on the way out is harmless */
            return client_fail(c, EINVAL, "RELEASE of %u references to slot"
                               " %u: the client holds %u", refs, slot, held);
        }
        unhold(c, slot, refs);
        released += refs;
    }
    ms_proto_encode_release_reply(out, msg->id, released);
    reply(c, out, -1);
    return true;
}

static void group_stats(Group *g, MsProtoGroupStats *gs)
{
    MsStoreStats st;

    ms_store_get_stats(g->store, &st);
    g_strlcpy(gs->name, g->name, sizeof(gs->name));
    gs->clients = g->nclients;
    gs->page_size = g->broker->page_size;
    gs->slots = st.slots;
    gs->slots_used = st.slots_used;
    gs->shared_slots = g->shared_slots;
    gs->refs = st.refs;
    gs->bytes_held = st.bytes_held;
    gs->bytes_saved = (st.refs - st.slots_used) * g->broker->page_size;
    gs->lookups = g->lookups;
    gs->hits = g->hits;
    gs->uploads = g->uploads;
    gs->published = g->published;
    gs->refused = g->refused;
    gs->owner = MS_PROTO_OWNER_NONE;
    gs->parked = g->nparked;
}

/*
 * A member sees its own group; a client that joined none sees them all,
 * if it is root or runs as the broker does (the administrator).
 */
static bool do_stats(Client *c, const MsProtoMsg *msg)
{
    MsBroker *b = c->broker;
    g_autoptr(GByteArray) out = g_byte_array_new();
    g_autoptr(GArray) all = g_array_new(FALSE, TRUE,
                                        sizeof(MsProtoGroupStats));
    GHashTableIter it;
    gpointer value;

    if (c->group) {
        g_array_set_size(all, 1);
        group_stats(c->group, &g_array_index(all, MsProtoGroupStats, 0));
    } else if (c->uid == 0 || c->uid == geteuid()) {
        g_hash_table_iter_init(&it, b->groups);
        while (g_hash_table_iter_next(&it, NULL, &value) &&
               all->len < MS_PROTO_MAX_GROUPS) {
            g_array_set_size(all, all->len + 1);
            group_stats(value, &g_array_index(all, MsProtoGroupStats,
                                              all->len - 1));
        }
    } else {
        return client_fail(c, EACCES, "STATS of every group: only root or"
                           " uid %u may ask (others join a group first)",
                           (unsigned)geteuid());
    }
    ms_proto_encode_stats_reply(out, msg->id, NULL,
                                (MsProtoGroupStats *)all->data, all->len);
    reply(c, out, -1);
    return true;
}

static bool dispatch(Client *c)
{
    g_autoptr(GError) err = NULL;
    MsProtoMsg msg;

    if (!ms_proto_decode(c->in->data, c->in->len, &msg, &err)) {
        return client_fail(c, EPROTO, "%s", err->message);
    }
    switch (msg.type) {
    case MS_MSG_HELLO:
        return do_hello(c, &msg);
    case MS_MSG_STATS:
        return do_stats(c, &msg);
    case MS_MSG_LOOKUP:
    case MS_MSG_UPLOAD:
    case MS_MSG_RELEASE:
        if (!c->group) {
            return client_fail(c, EPROTO, "%s before HELLO",
                               ms_proto_type_name(msg.type));
        }
        return msg.type == MS_MSG_LOOKUP ? do_lookup(c, &msg) :
               msg.type == MS_MSG_UPLOAD ? do_upload(c, &msg) :
               do_release(c, &msg);
    default:
        return client_fail(c, EPROTO, "%s is not a request",
                           ms_proto_type_name(msg.type));
    }
}

/*
 * Read what is missing of the current frame, never past its end (the
 * next request stays in the socket until this one is answered).  Returns
 * false to drop the client; sets *complete when a whole frame is in.
 */
static bool client_read(Client *c, bool *complete)
{
    *complete = false;
    for (;;) {
        size_t want = c->in_want ? c->in_want : MS_PROTO_HEADER_SIZE;
        size_t have = c->in->len;
        ssize_t n;

        if (have == want && c->in_want) {
            *complete = true;
            return true;
        }
        if (have == want) {
            g_autoptr(GError) err = NULL;
            MsProtoHeader hdr;

            if (!ms_proto_decode_header(c->in->data, &hdr, &err)) {
                return client_fail(c, EPROTO, "%s", err->message);
            }
            c->in_want = MS_PROTO_HEADER_SIZE + hdr.length;
            continue;
        }
        g_byte_array_set_size(c->in, want);
        n = recv(c->fd, c->in->data + have, want - have, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) {
            g_byte_array_set_size(c->in, have);
            continue;
        }
        if (n < 0 && errno == EAGAIN) {
            g_byte_array_set_size(c->in, have);
            return true;
        }
        if (n <= 0) {
            if (have) {
                g_warning("%s: hung up in the middle of a frame (%zu of %zu"
                          " bytes)", c->label, have, want);
            } else if (n < 0) {
                g_message("%s: connection lost: %s", c->label,
                          g_strerror(errno));
            } else {
                g_message("%s: disconnected", c->label);
            }
            return false;
        }
        g_byte_array_set_size(c->in, have + n);
    }
}

static bool client_io(Client *c, GIOCondition cond)
{
    bool complete;

    if (c->out->len) {
        return client_flush(c);
    }
    if (!(cond & (G_IO_IN | G_IO_HUP | G_IO_ERR))) {
        return true;
    }
    if (!client_read(c, &complete)) {
        return false;
    }
    if (!complete) {
        return true;
    }
    if (!dispatch(c)) {
        return false;
    }
    g_byte_array_set_size(c->in, 0);
    c->in_want = 0;
    return client_flush(c);
}

static gboolean client_ready(gint fd, GIOCondition cond, gpointer opaque)
{
    Client *c = opaque;
    GIOCondition want;

    if (!client_io(c, cond)) {
        c->watch = 0;       /* this source goes with the return value */
        client_gone(c);
        return G_SOURCE_REMOVE;
    }
    /* Writing a reply, or waiting for the next request */
    want = c->out->len ? G_IO_OUT : G_IO_IN;
    if (want != c->cond) {
        c->cond = want;
        c->watch = g_unix_fd_add(fd, want, client_ready, c);
        return G_SOURCE_REMOVE;
    }
    return G_SOURCE_CONTINUE;
}

/*
 * A pidfd of the process at the other end of @fd: exact with
 * SO_PEERPIDFD (Linux 6.5); else of @pid, which is that process unless it
 * exited and its pid was reused within the microseconds since accept().
 */
static int peer_pidfd(int fd, pid_t pid)
{
    socklen_t len = sizeof(int);
    int pidfd = -1;

    if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) == 0 &&
        pidfd >= 0) {
        return pidfd;
    }
    if (pid <= 0) {
        return -1;
    }
    pidfd = syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) {
        g_warning("cannot watch process %d: %s", (int)pid, g_strerror(errno));
    }
    return pidfd;
}

static void client_new(MsBroker *b, int fd)
{
    Client *c = g_new0(Client, 1);
    struct ucred cred;
    socklen_t len = sizeof(cred);

    c->broker = b;
    c->id = ++b->next_client_id;
    c->fd = fd;
    c->out_fd = -1;
    c->pid = -1;
    c->uid = (uid_t)-1;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
        c->pid = cred.pid;
        c->uid = cred.uid;
    }
    c->pidfd = peer_pidfd(fd, c->pid);
    c->label = g_strdup_printf("client %" PRIu64 " (pid %d uid %u)", c->id,
                               (int)c->pid, (unsigned)c->uid);
    c->in = g_byte_array_new();
    c->out = g_byte_array_new();
    c->held = g_hash_table_new(g_direct_hash, g_direct_equal);
    c->cond = G_IO_IN;
    c->watch = g_unix_fd_add(fd, G_IO_IN, client_ready, c);
    b->clients = g_list_prepend(b->clients, c);
    b->nclients++;
    g_message("%s: connected", c->label);
}

static gboolean listen_ready(gint lfd, GIOCondition cond G_GNUC_UNUSED,
                             gpointer opaque)
{
    MsBroker *b = opaque;
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

    if (fd < 0) {
        if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
            g_warning("cannot accept a client: %s", g_strerror(errno));
        }
        return G_SOURCE_CONTINUE;
    }
    /* Parked clients count: they hold references and memory */
    if (b->nclients + b->nparked >= b->cfg.max_clients) {
        struct ucred cred = { .pid = -1, .uid = -1 };
        socklen_t len = sizeof(cred);

        getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len);
        g_warning("refusing a client (pid %d uid %u): %u clients connected"
                  " and %u parked, --max-clients allows %u", (int)cred.pid,
                  (unsigned)cred.uid, b->nclients, b->nparked,
                  b->cfg.max_clients);
        close(fd);
        return G_SOURCE_CONTINUE;
    }
    client_new(b, fd);
    return G_SOURCE_CONTINUE;
}

/* The socket */

/*
 * A socket file left by a broker that died is stale: nothing accepts on
 * it.  A live one belongs to another broker, which we must not steal
 * from (its clients would lose their broker without noticing).
 */
static bool clear_stale_socket(const char *path, GError **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct stat st;
    int fd, r;

    if (lstat(path, &st) < 0) {
        return true;
    }
    if (!S_ISSOCK(st.st_mode)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                    "%s exists and is not a socket: not replacing it", path);
        return false;
    }
    strcpy(sa.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    r = fd < 0 ? -1 : connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    if (fd >= 0) {
        close(fd);
    }
    if (r == 0) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                    "another broker is listening on %s", path);
        return false;
    }
    if (unlink(path) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot remove the stale socket %s: %s", path,
                    g_strerror(errno));
        return false;
    }
    return true;
}

static bool open_socket(MsBroker *b, GError **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    const char *path = b->socket_path;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NAMETOOLONG,
                    "socket path of %zu bytes: at most %zu allowed",
                    strlen(path), sizeof(sa.sun_path) - 1);
        return false;
    }
    if (!clear_stale_socket(path, errp)) {
        return false;
    }
    strcpy(sa.sun_path, path);
    b->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                          0);
    if (b->listen_fd < 0 ||
        bind(b->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot bind %s: %s", path, g_strerror(errno));
        return false;
    }
    /* Until chmod the mode follows the umask; nobody can use it yet */
    if (chmod(path, b->cfg.socket_mode) < 0 || listen(b->listen_fd, 64) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot set up %s: %s", path, g_strerror(errno));
        unlink(path);
        return false;
    }
    b->listen_watch = g_unix_fd_add(b->listen_fd, G_IO_IN, listen_ready, b);
    return true;
}

MsBroker *ms_broker_new(const MsBrokerConfig *cfg, GError **errp)
{
    g_autoptr(MsBroker) b = g_new0(MsBroker, 1);
    long ps = ms_host_page_size();
    uint64_t nslots = cfg->max_store / ps;

    b->cfg = *cfg;
    b->listen_fd = -1;
    b->socket_path = g_strdup(cfg->socket_path);
    b->cfg.socket_path = b->socket_path;
    b->group_uids = cfg->group_uids ? g_hash_table_ref(cfg->group_uids)
                                    : NULL;
    b->groups = g_hash_table_new_full(g_str_hash, g_str_equal, NULL,
                                      (GDestroyNotify)group_free);
    b->page_size = ps;
    if (nslots < 1 || nslots >= MS_SLOT_NONE) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "store size of %" PRIu64 " bytes: 1 to %" PRIu64 " pages"
                    " of %ld bytes allowed", cfg->max_store,
                    (uint64_t)MS_SLOT_NONE - 1, ps);
        return NULL;
    }
    b->nslots = nslots;
    if (!b->cfg.client_quota) {
        b->cfg.client_quota = b->nslots;
    }
    if (!open_socket(b, errp)) {
        return NULL;
    }
    g_message("listening on %s (mode %04o): groups of %u slots of %zu bytes,"
              " %u references per client", b->socket_path,
              b->cfg.socket_mode, b->nslots, b->page_size,
              b->cfg.client_quota);
    return g_steal_pointer(&b);
}

void ms_broker_free(MsBroker *b)
{
    if (!b) {
        return;
    }
    while (b->clients) {
        client_free(b->clients->data);
    }
    if (b->listen_watch) {
        g_source_remove(b->listen_watch);
    }
    if (b->listen_fd >= 0) {
        close(b->listen_fd);
        unlink(b->socket_path);
    }
    g_hash_table_destroy(b->groups);
    if (b->group_uids) {
        g_hash_table_unref(b->group_uids);
    }
    g_free(b->socket_path);
    g_free(b);
}

/* Configuration */

GHashTable *ms_broker_group_table_new(void)
{
    return g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                 (GDestroyNotify)g_array_unref);
}

bool ms_broker_parse_group(GHashTable *group_uids, const char *spec,
                           GError **errp)
{
    g_auto(GStrv) parts = g_strsplit(spec, ":", 2);
    g_autoptr(GArray) uids = g_array_new(FALSE, FALSE, sizeof(uid_t));
    g_autoptr(GError) err = NULL;

    if (!ms_proto_name_valid(parts[0] ? parts[0] : "", &err)) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--group %s: bad group name: %s", spec, err->message);
        return false;
    }
    if (parts[0] && parts[1]) {
        g_auto(GStrv) list = NULL;

        if (!g_str_has_prefix(parts[1], "uid=")) {
            g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                        "--group %s: NAME or NAME:uid=UID[,UID...] expected",
                        spec);
            return false;
        }
        list = g_strsplit(parts[1] + 4, ",", -1);
        for (int i = 0; list[i]; i++) {
            guint64 v;

            if (!g_ascii_string_to_unsigned(list[i], 10, 0, UINT32_MAX - 1,
                                            &v, NULL)) {
                g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                            "--group %s: uid '%s' is not a number", spec,
                            list[i]);
                return false;
            }
            g_array_append_vals(uids, &(uid_t){ v }, 1);
        }
    }
    g_hash_table_replace(group_uids, g_strdup(parts[0]),
                         g_steal_pointer(&uids));
    return true;
}
