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
 * Who shares with whom.  A group is a trust domain: a member learns
 * whether other members hold a page it can guess (LOOKUP answers, and
 * the timing of copy-on-write).  So a group spans uids only when the
 * operator says so.  A name a client gives that the operator did not
 * declare is a private group of the client's uid: two uids that both
 * say "web" get two groups, with two stores and two secrets, and the
 * second cannot even tell that the first exists.  A declared group
 * (config.c: [group NAME], --group) takes the uids and gids it lists,
 * or every uid if it says uids=*; nobody else, root included.  A member
 * sees the statistics of its own group only; the administrator (root,
 * or the broker's uid, without joining) sees all of them and the
 * broker's counters.
 *
 * References.  Every slot a client is handed carries one store reference
 * for that client, recorded in the client's own counts (held.c).  A
 * client can only drop references it holds.  A slot is freed by
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
 * 8-byte entries, open addressing with linear probing, up to
 * UNSTABLE_PER_SLOT entries for each slot of the store (at most
 * UNSTABLE_MAX): most misses are pages nobody else has, so a hash table
 * of separately allocated entries grew to several times the size and
 * paid two allocations a miss.  Those misses wait as long as their
 * pages stay: at eight fleet members they came to more than the store
 * has slots, and a table of one entry per slot, emptied every minute or
 * so, made every member ask all its misses again each time.  A group
 * starts with UNSTABLE_MIN entries and doubles its table when half
 * full, up to that size: hashes land anywhere, so a table of the full
 * size had all its pages touched after a few thousand misses (8 MiB
 * for a 1 GiB store, for two small guests as for eight big ones).
 * Growing empties the table like a wipe (an entry keeps too few bits
 * of its hash to find its bucket in a larger table), a few times in a
 * group's life.  At its full size it is
 * emptied when half full, as stale entries only cost misses; an answered
 * entry leaves a tombstone, freed when no probe passes it (the next
 * entry is free: unstable_drop()).  Buckets come from a hash of the hash
 * under a secret of the broker's, so that a member cannot pile its
 * misses into one run of buckets; an entry keeps the upper half of that
 * hash of the hash (the bucket is from the lower) and 32 bits of the
 * client's id.  Both only decide who uploads: two hashes that share a
 * bucket run and a tag (one lookup in 2^32) make a member upload a page
 * nobody else has, and a client id that wrapped makes a member miss one
 * meeting, or the news of one (its retries then wait for its sweep).
 * The bytes are compared before anyone maps anything, as
 * always.  An entry is answered by a meeting, or by a new slot with its
 * hash (an upload nobody was told WANTED for, or one that came after
 * the first member asked again): either counts for its member (met), and
 * so does emptying the table (unstable_resets).  Nothing else can turn a
 * member's miss into a hit or a meeting; the group's wanted and
 * published move with every member's meetings, and in a group of eight
 * something moves nearly all the time.  Even a member's own met moves
 * at nearly every pass there, so a member that only knew that would ask
 * all its misses again each time: a member that asked ANSWERED once is
 * told which hashes, up to MS_PROTO_MAX_ANSWERED between two asks (the
 * table keeps no hashes, only tags: the meeting or the upload has it),
 * and asks only those pages again.
 *
 * The index.  MsStore indexes slots under its own secret, which it keeps
 * to itself; the members need one they can compute, so each group also
 * has a lookup secret and its own index (the group hash of each slot,
 * chained the way store.c chains collisions).  An upload is only stored
 * if its content hashes as the client claimed, so the index cannot be
 * poisoned with wrong hashes; identical contents are found through the
 * store's own index (ms_store_find() compares bytes).
 *
 * Limits.  Whoever can connect to the socket is a local user, not a
 * friend; what one of them can take from the others is bounded without
 * any configuration, and every refusal is an ERROR to the client, a log
 * line with its pid and uid, and a counter in STATS:
 *
 *  - references: a client holds at most client-quota (half the store's
 *    slots by default), so one client never pins a whole store;
 *  - store pages: in a group that several uids may join, the pages one
 *    uid stored (charged to the uid of the client that published them,
 *    until they are freed) are at most uid-quota, half the store by
 *    default, so the other uids always find room.  Sharing is never
 *    charged: a lookup that hits costs a reference, not a page;
 *  - connections: max-clients, parked clients included since they keep
 *    memory, and half of that per uid (max-clients-per-uid);
 *  - groups: max-groups private groups at once (declared groups are the
 *    operator's and never crowded out), max-groups-per-uid per uid;
 *  - time: a connection that has not joined a group join-timeout seconds
 *    after it connected is dropped.  It holds no reference (only a
 *    member can), so dropping it costs nobody a page; a member is never
 *    dropped for being slow or idle.
 *
 * Past max-clients, and past its uid's share, reserved-clients more
 * connections are taken from clients that are likely to be members
 * rejoining (a VM whose old client is parked counts against the limits
 * until its process exits, and must not be locked out): a uid that a
 * declared group lists by uid or gid may have all of them, which holds
 * after a broker restart too, when nobody has members yet; a uid that
 * has members (connected or parked) only the first half (reserve_of()):
 * any uid can be a member of a private group of its own, and two such
 * uids together must not lock out the operator's VMs.  Idle strangers
 * cannot lock members out: they fill max-clients at most, and only for
 * join-timeout.  The administrator (root, the broker's uid) may use the
 * whole reserve too: --stats matters most when the broker is full.
 * None of this stands against many uids colluding, each with its share:
 * who may connect at all is the socket's mode.
 *
 * Hostile clients.  Every byte is untrusted: frames are read to a cap
 * and decoded by proto.c, the order of messages is checked (HELLO first
 * and once), and any violation gets the client an ERROR and a hang-up
 * (its references stay parked until its process exits).  Memory per
 * client is bounded: a client has at most one frame being read and one
 * reply being written, and the broker reads its next request only once
 * the last reply is gone (so a client that floods requests without
 * reading replies only fills its own socket buffers).  One request is
 * served per wake-up, so a busy client cannot starve the others.
 *
 * Reloading.  ms_broker_reconfigure() swaps the configuration: new
 * limits and declarations apply to what comes next.  Nobody is dropped:
 * a member a group no longer lists stays until it leaves, a group no
 * longer declared serves its members until the last one leaves (new
 * joins of that name get private groups), and the client quota a member
 * was told in WELCOME stays its quota.
 *
 * Single-threaded: everything runs in the GLib main context.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <string.h>
#include <poll.h>
#include <stdlib.h>
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
#include "held.h"

G_STATIC_ASSERT(MS_PROTO_SECRET_SIZE == MS_HASH_SECRET_SIZE);

typedef struct Group Group;
typedef struct Client Client;

/* Linux 6.5; older kernels say ENOPROTOOPT and we use pidfd_open() */
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

/* The unstable table's entries per slot of the store (see "Meeting") */
#define UNSTABLE_PER_SLOT 4
/* The unstable table's most entries (128 MiB), whatever the store's size */
#define UNSTABLE_MAX (1u << 24)
/* Its entries when the group is new (512 KiB): it grows from there */
#define UNSTABLE_MIN (1u << 16)
/* Its entries' @client: never a client's unstable_id() */
#define UNSTABLE_FREE 0
#define UNSTABLE_GONE UINT32_MAX

/* A client's quota refusals are logged at most this often (us) */
#define QUOTA_LOG_INTERVAL (60 * G_USEC_PER_SEC)

/* Room for a peer's supplementary groups, before it says it needs more */
#define MAX_PEER_GROUPS 64

/* An entry of the unstable table: who missed a hash first */
typedef struct Unstable {
    uint32_t tag;               /* upper half of the bucket's hash */
    uint32_t client;            /* unstable_id() of the client */
} Unstable;

/* What a uid has at the broker, for its limits */
typedef struct UidState {
    uint32_t conns;             /* connections open */
    uint32_t members;           /* of which joined a group */
    uint32_t parked;            /* clients parked */
    uint32_t groups;            /* private groups it owns */
} UidState;

/* The credentials of a peer, from its socket */
typedef struct Peer {
    pid_t pid;
    uid_t uid;
    gid_t gid;
    GArray *gids;               /* supplementary groups (gid_t) */
} Peer;

struct MsBroker {
    MsBrokerConfig cfg;
    bool activated;             /* systemd's socket: not ours to remove */
    char *socket_path;
    int listen_fd;
    guint listen_watch;
    size_t page_size;
    uint32_t nslots;            /* per group store */
    uint32_t client_quota;      /* the limits, defaults resolved */
    uint32_t uid_quota;
    uint32_t max_per_uid;
    GHashTable *groups;         /* group_key() -> Group */
    GHashTable *uids;           /* uid -> UidState */
    GList *clients;             /* connected and parked */
    uint32_t nclients;          /* connected */
    uint32_t nparked;           /* gone, their process alive */
    uint32_t nprivate;          /* private groups */
    uint64_t next_client_id;
    MsProtoBrokerStats counters;    /* the refusals */
};

typedef enum GroupKind {
    GROUP_PRIVATE,              /* a name one uid gave: only that uid */
    GROUP_DECLARED,             /* the operator's, with its list */
    GROUP_RETIRED,              /* declared no more: serves its members */
} GroupKind;

struct Group {
    MsBroker *broker;
    char *key;                  /* in broker->groups */
    char *name;                 /* as the members named it */
    GroupKind kind;
    uid_t owner;                /* GROUP_PRIVATE: the only uid */
    bool uids_quota;            /* several uids may join: uid-quota holds */
    MsStore *store;
    MsHashKey key_secret;       /* the members' lookup secret */
    GHashTable *index;          /* &ghash[head] -> head + 1 */
    uint64_t *ghash;            /* per indexed slot: its group hash */
    uint32_t *gnext;            /* next indexed slot with the same hash */
    uint8_t *indexed;
    uint32_t *holders;          /* per slot: clients holding a reference */
    uid_t *charged;             /* per slot: the uid that published it */
    GHashTable *charges;        /* uid -> slots charged to it */
    uint64_t shared_slots;      /* slots with two holders or more */
    uint32_t nclients;          /* connected members */
    uint32_t nparked;           /* members gone whose process lives */
    Unstable *unstable;         /* see "Meeting" */
    uint32_t unstable_mask;     /* its entries - 1 (a power of two) */
    uint32_t unstable_max;      /* the most entries it grows to */
    uint32_t unstable_used;     /* entries and tombstones */
    MsHashKey unstable_key;     /* the broker's: picks the bucket */
    uint64_t lookups, hits, uploads, published, refused, refused_quota;
    uint64_t wanted, unstable_resets;  /* see "Meeting" */
    GHashTable *members;        /* unstable_id() -> connected member */
};

struct Client {
    MsBroker *broker;
    uint64_t id;
    int fd;                     /* -1 once parked (see "References") */
    guint watch;
    GIOCondition cond;
    guint join_deadline;        /* until HELLO: see "Limits" */
    Peer peer;
    int pidfd;                  /* the peer process, or -1 */
    bool parked;                /* connection over, references kept */
    guint pid_watch;            /* while parked: its exit */
    char *label;                /* for log lines: who this is */
    Group *group;               /* NULL until HELLO */
    uint32_t quota;             /* references it may hold (WELCOME) */
    gint64 quota_logged;        /* when a quota refusal was last logged */
    uint64_t quota_unlogged;    /* refusals since */
    GByteArray *in;             /* the frame being read */
    size_t in_want;             /* its full size, once the header is in */
    GByteArray *out;            /* the reply being written */
    size_t out_pos;
    int out_fd;                 /* to pass with the reply's first byte */
    MsHeld *held;               /* references held, per slot */
    uint64_t refs;              /* sum of @held */
    uint64_t met;               /* its misses answered: see "Meeting" */
    GArray *answered;           /* their hashes, once it asked: ANSWERED */
    bool answers_lost;          /* some were not kept since it last asked */
};

/* @c's id in the unstable table: 1 .. UINT32_MAX - 1 */
static uint32_t unstable_id(const Client *c)
{
    return c->id % (UINT32_MAX - 1) + 1;
}

/* Uids */

static UidState *uid_state(MsBroker *b, uid_t uid)
{
    UidState *u = g_hash_table_lookup(b->uids, GUINT_TO_POINTER(uid));

    if (!u) {
        u = g_new0(UidState, 1);
        g_hash_table_insert(b->uids, GUINT_TO_POINTER(uid), u);
    }
    return u;
}

/* Forget @uid once it has nothing left here */
static void uid_state_put(MsBroker *b, uid_t uid)
{
    UidState *u = g_hash_table_lookup(b->uids, GUINT_TO_POINTER(uid));

    if (u && !u->conns && !u->parked && !u->groups) {
        g_hash_table_remove(b->uids, GUINT_TO_POINTER(uid));
    }
}

static bool gid_listed(const GArray *gids, gid_t gid)
{
    for (guint i = 0; i < gids->len; i++) {
        if (g_array_index(gids, gid_t, i) == gid) {
            return true;
        }
    }
    return false;
}

/* Does @d list @p, by uid, gid or a supplementary group?  (Not by "*") */
static bool decl_lists(const MsBrokerGroupDecl *d, const Peer *p)
{
    for (guint i = 0; i < d->uids->len; i++) {
        if (g_array_index(d->uids, uid_t, i) == p->uid) {
            return true;
        }
    }
    if (gid_listed(d->gids, p->gid)) {
        return true;
    }
    for (guint i = 0; p->gids && i < p->gids->len; i++) {
        if (gid_listed(d->gids, g_array_index(p->gids, gid_t, i))) {
            return true;
        }
    }
    return false;
}

static bool decl_allows(const MsBrokerGroupDecl *d, const Peer *p)
{
    return d->any_uid || decl_lists(d, p);
}

/* Can more than one uid join a group declared as @d? */
static bool decl_multi_uid(const MsBrokerGroupDecl *d)
{
    return d->any_uid || d->uids->len > 1 || d->gids->len > 0;
}

/*
 * How much of the reserve may @p have?  All of it if a declared group
 * names its uid (the operator's say) or it is the administrator, whose
 * --stats must work when the broker is full.  Half if its uid has
 * members or parked clients: likely a member rejoining, but any uid can
 * make itself a member of a private group of its own, and two such uids
 * must not take what the operator's VMs need.  None for strangers.
 */
static uint32_t reserve_of(MsBroker *b, const Peer *p)
{
    UidState *u = g_hash_table_lookup(b->uids, GUINT_TO_POINTER(p->uid));
    GHashTableIter it;
    gpointer value;

    if (p->uid == 0 || p->uid == geteuid()) {
        return b->cfg.reserved_clients;
    }
    g_hash_table_iter_init(&it, b->cfg.groups);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        if (decl_lists(value, p)) {
            return b->cfg.reserved_clients;
        }
    }
    return u && (u->members || u->parked) ? b->cfg.reserved_clients / 2 : 0;
}

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
    if (g->charges) {
        g_hash_table_destroy(g->charges);
    }
    if (g->members) {
        g_hash_table_destroy(g->members);
    }
    g_free(g->unstable);
    g_free(g->ghash);
    g_free(g->gnext);
    g_free(g->indexed);
    g_free(g->holders);
    g_free(g->charged);
    g_free(g->name);
    g_free(g->key);
    g_free(g);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Group, group_free)

/*
 * A declared group is found by its name, a private one by its owner and
 * name: names have no ':', so the two never meet
 */
static char *group_key(const char *name, bool private, uid_t uid)
{
    return private ? g_strdup_printf("%u:%s", (unsigned)uid, name)
                   : g_strdup(name);
}

static Group *group_new(MsBroker *b, const char *name, GroupKind kind,
                        uid_t owner, GError **errp)
{
    g_autoptr(Group) g = g_new0(Group, 1);

    g->broker = b;
    g->name = g_strdup(name);
    g->kind = kind;
    g->owner = owner;
    g->key = group_key(name, kind == GROUP_PRIVATE, owner);
    g->store = ms_store_new(b->page_size, b->nslots, errp);
    if (!g->store || !ms_hash_key_init(&g->key_secret, errp) ||
        !ms_hash_key_init(&g->unstable_key, errp)) {
        return NULL;
    }
    g->index = g_hash_table_new(g_int64_hash, g_int64_equal);
    g->charges = g_hash_table_new(g_direct_hash, g_direct_equal);
    g->members = g_hash_table_new(g_direct_hash, g_direct_equal);
    g->unstable_max =
        1u << g_bit_storage(CLAMP((uint64_t)b->nslots * UNSTABLE_PER_SLOT,
                                  64, UNSTABLE_MAX) - 1);
    g->unstable_mask = MIN(g->unstable_max, UNSTABLE_MIN) - 1;
    g->unstable = g_new0(Unstable, g->unstable_mask + 1ull);
    g->ghash = g_new0(uint64_t, b->nslots);
    g->gnext = g_new0(uint32_t, b->nslots);
    g->indexed = g_new0(uint8_t, b->nslots);
    g->holders = g_new0(uint32_t, b->nslots);
    g->charged = g_new0(uid_t, b->nslots);
    return g_steal_pointer(&g);
}

static uint32_t charge_of(Group *g, uid_t uid)
{
    return GPOINTER_TO_UINT(g_hash_table_lookup(g->charges,
                                                GUINT_TO_POINTER(uid)));
}

/* @slot was published by a client of @uid: its page counts for the uid */
static void charge(Group *g, uint32_t slot, uid_t uid)
{
    g->charged[slot] = uid;
    g_hash_table_insert(g->charges, GUINT_TO_POINTER(uid),
                        GUINT_TO_POINTER(charge_of(g, uid) + 1));
}

/* @slot was freed */
static void uncharge(Group *g, uint32_t slot)
{
    uid_t uid = g->charged[slot];
    uint32_t n = charge_of(g, uid);

    g_assert(n > 0);
    if (n == 1) {
        g_hash_table_remove(g->charges, GUINT_TO_POINTER(uid));
    } else {
        g_hash_table_insert(g->charges, GUINT_TO_POINTER(uid),
                            GUINT_TO_POINTER(n - 1));
    }
}

/* Client @c now holds one more reference to @slot (already taken) */
static void hold(Client *c, uint32_t slot)
{
    if (ms_held_add(c->held, slot) == 0 &&
        ++c->group->holders[slot] == 2) {
        c->group->shared_slots++;
    }
    c->refs++;
}

/* Drop @refs of the references @c holds to @slot (the caller checked) */
static void unhold(Client *c, uint32_t slot, uint32_t refs)
{
    Group *g = c->group;

    if (ms_held_sub(c->held, slot, refs) == 0 && g->holders[slot]-- == 2) {
        g->shared_slots--;
    }
    c->refs -= refs;
    for (uint32_t i = 0; i < refs; i++) {
        bool indexed = g->indexed[slot];

        if (ms_store_put(g->store, slot)) {
            uncharge(g, slot);
            if (indexed) {
                index_remove(g, slot);
            }
        }
    }
}

/* May @c take one more reference to @slot? */
static bool may_hold(Client *c, uint32_t slot)
{
    return c->refs < c->quota &&
           (slot == MS_SLOT_NONE ||
            ms_store_refs(c->group->store, slot) < UINT32_MAX - 1);
}

/* Clients */

/* A group that is not declared goes with its last member */
static void group_leave(MsBroker *b, Group *g)
{
    if (g->nclients || g->nparked || g->kind == GROUP_DECLARED) {
        return;
    }
    if (g->kind == GROUP_PRIVATE) {
        uid_state(b, g->owner)->groups--;
        b->nprivate--;
        uid_state_put(b, g->owner);
        g_message("group %s (private to uid %u): freed with its last"
                  " member", g->name, (unsigned)g->owner);
    } else {
        g_message("group %s: freed with its last member", g->name);
    }
    g_hash_table_remove(b->groups, g->key);
}

/* Close the connection of @c, if it has one */
static void client_close(Client *c)
{
    MsBroker *b = c->broker;

    if (c->watch) {
        g_source_remove(c->watch);
        c->watch = 0;
    }
    if (c->join_deadline) {
        g_source_remove(c->join_deadline);
        c->join_deadline = 0;
    }
    if (c->fd >= 0) {
        UidState *u = uid_state(b, c->peer.uid);

        close(c->fd);
        c->fd = -1;
        b->nclients--;
        u->conns--;
        if (c->group) {
            gpointer id = GUINT_TO_POINTER(unstable_id(c));

            /* Gone: nobody reads its met or its answers any more */
            if (g_hash_table_lookup(c->group->members, id) == c) {
                g_hash_table_remove(c->group->members, id);
            }
            g_clear_pointer(&c->answered, g_array_unref);
            c->group->nclients--;
            u->members--;
        }
    }
}

/* @c and its references go: it released them all, or its process exited */
/*
 * Forget @c.  @release gives its references back, freeing the slots
 * nobody else holds: only when its process exited or never held any.
 * A broker that stops must not: punching a slot's hole takes the page
 * out of the memfd under every mapping of it, and the members' merged
 * pages would read zeros from then on.
 */
static void client_free(Client *c, bool release)
{
    MsBroker *b = c->broker;
    Group *g = c->group;
    uid_t uid = c->peer.uid;

    if (g && release) {
        for (uint32_t s = ms_held_next(c->held, 0); s != UINT32_MAX;
             s = ms_held_next(c->held, s + 1)) {
            unhold(c, s, ms_held_get(c->held, s));
        }
    }
    if (g) {
        g_message("%s: left group %s", c->label, g->name);
    }
    if (c->pid_watch) {
        g_source_remove(c->pid_watch);
    }
    if (c->parked) {
        g->nparked--;
        b->nparked--;
        uid_state(b, uid)->parked--;
    }
    client_close(c);
    if (c->pidfd >= 0) {
        close(c->pidfd);
    }
    b->clients = g_list_remove(b->clients, c);
    g_byte_array_unref(c->in);
    g_byte_array_unref(c->out);
    ms_held_free(c->held);
    if (c->peer.gids) {
        g_array_unref(c->peer.gids);
    }
    g_free(c->label);
    g_free(c);
    if (g) {
        group_leave(b, g);
    }
    uid_state_put(b, uid);
}

static gboolean client_exited(gint fd G_GNUC_UNUSED,
                              GIOCondition cond G_GNUC_UNUSED,
                              gpointer opaque)
{
    Client *c = opaque;

    g_message("%s: process exited: dropping its %" PRIu64 " references",
              c->label, c->refs);
    c->pid_watch = 0;
    client_free(c, true);
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
        client_free(c, true);
        return;
    }
    c->parked = true;
    c->group->nparked++;
    c->broker->nparked++;
    uid_state(c->broker, c->peer.uid)->parked++;
    if (c->pidfd < 0) {
        g_warning("%s: cannot watch its process: its %" PRIu64 " references"
                  " stay until the broker exits", c->label, c->refs);
        return;
    }
    g_message("%s: keeping its %" PRIu64 " references until process %d"
              " exits", c->label, c->refs, (int)c->peer.pid);
    c->pid_watch = g_unix_fd_add(c->pidfd, G_IO_IN, client_exited, c);
}

/* Try once to tell the peer at @fd why it is dropped (it may not read) */
static void send_error(int fd, int code, const char *why)
{
    g_autoptr(GByteArray) err = g_byte_array_new();

    ms_proto_encode_error(err, 0, code, why);
    if (send(fd, err->data, err->len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
        /* Nothing more to do: the client is going anyway */
    }
}

static bool client_refuse(Client *c, int code, uint64_t *counter,
                          const char *fmt, ...) G_GNUC_PRINTF(4, 5);

/*
 * Refuse what @c asked, or drop it for a protocol violation: log it,
 * count it in @counter, tell the client why, and have the caller drop
 * it (returns false).
 */
static bool client_refuse(Client *c, int code, uint64_t *counter,
                          const char *fmt, ...)
{
    g_autofree char *why = NULL;
    va_list ap;

    va_start(ap, fmt);
    why = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    (*counter)++;
    g_warning("%s: %s: disconnecting", c->label, why);
    send_error(c->fd, code, why);
    return false;
}

#define client_fail(c, code, ...) \
    client_refuse(c, code, &(c)->broker->counters.dropped_protocol, \
                  __VA_ARGS__)

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

/* Count a QUOTA answer; log the first one, then at most once a minute */
static void quota_refused(Client *c, bool uid_quota)
{
    MsBroker *b = c->broker;
    Group *g = c->group;
    gint64 now = g_get_monotonic_time();

    g->refused++;
    g->refused_quota++;
    if (uid_quota) {
        b->counters.refused_uid_quota++;
    } else {
        b->counters.refused_client_quota++;
    }
    c->quota_unlogged++;
    if (c->quota_logged && now - c->quota_logged < QUOTA_LOG_INTERVAL) {
        return;
    }
    if (uid_quota) {
        g_message("%s: quota reached, %" PRIu64 " refused: uid %u stored"
                  " %u pages in group %s, uid-quota allows %u", c->label,
                  c->quota_unlogged, (unsigned)c->peer.uid,
                  charge_of(g, c->peer.uid), g->name, b->uid_quota);
    } else {
        g_message("%s: quota reached, %" PRIu64 " refused: it holds %" PRIu64
                  " references, its client-quota is %u", c->label,
                  c->quota_unlogged, c->refs, c->quota);
    }
    c->quota_logged = now;
    c->quota_unlogged = 0;
}

/*
 * A private group for @c: within the broker's and the uid's group
 * limits.  Declared groups are not counted: a crowd of private groups
 * must never keep the operator's from being served.
 */
static Group *private_group_new(Client *c, const char *name)
{
    MsBroker *b = c->broker;
    UidState *u = uid_state(b, c->peer.uid);
    g_autoptr(GError) err = NULL;
    Group *g;

    if (b->nprivate >= b->cfg.max_groups) {
        client_refuse(c, ENOSPC, &b->counters.refused_groups,
                      "cannot create group %s: the broker has as many"
                      " private groups as max-groups allows (%u); groups"
                      " the operator declares are not limited", name,
                      b->cfg.max_groups);
        return NULL;
    }
    if (u->groups >= b->cfg.max_groups_per_uid) {
        client_refuse(c, ENOSPC, &b->counters.refused_groups,
                      "cannot create group %s: uid %u has %u private"
                      " groups, max-groups-per-uid allows %u", name,
                      (unsigned)c->peer.uid, u->groups,
                      b->cfg.max_groups_per_uid);
        return NULL;
    }
    g = group_new(b, name, GROUP_PRIVATE, c->peer.uid, &err);
    if (!g) {
        client_refuse(c, ENOMEM, &b->counters.refused_groups,
                      "cannot create group %s: %s", name, err->message);
        return NULL;
    }
    u->groups++;
    b->nprivate++;
    g_message("group %s: created, private to uid %u, %u slots of %zu"
              " bytes", name, (unsigned)c->peer.uid, b->nslots,
              b->page_size);
    return g;
}

static Group *declared_group_new(Client *c, const char *name,
                                 const MsBrokerGroupDecl *d)
{
    MsBroker *b = c->broker;
    g_autoptr(GError) err = NULL;
    Group *g = group_new(b, name, GROUP_DECLARED, 0, &err);

    if (!g) {
        client_refuse(c, ENOMEM, &b->counters.refused_groups,
                      "cannot create group %s: %s", name, err->message);
        return NULL;
    }
    g->uids_quota = decl_multi_uid(d);
    g_message("group %s: created, declared, %u slots of %zu bytes", name,
              b->nslots, b->page_size);
    return g;
}

/* The group @c may join under @name, created if need be, or NULL */
static Group *hello_group(Client *c, const char *name)
{
    MsBroker *b = c->broker;
    const MsBrokerGroupDecl *d = ms_broker_config_group(&b->cfg, name);
    g_autofree char *key = group_key(name, !d, c->peer.uid);
    Group *g;

    if (d && !decl_allows(d, &c->peer)) {
        client_refuse(c, EACCES, &b->counters.refused_access,
                      "group %s is declared for other users: uid %u (gid"
                      " %u) is not on its list", name, (unsigned)c->peer.uid,
                      (unsigned)c->peer.gid);
        return NULL;
    }
    if (!d && b->cfg.strict_groups) {
        client_refuse(c, ENOENT, &b->counters.refused_no_group,
                      "no group %s: this broker serves only the groups its"
                      " operator declared", name);
        return NULL;
    }
    g = g_hash_table_lookup(b->groups, key);
    if (g) {
        return g;
    }
    g = d ? declared_group_new(c, name, d) : private_group_new(c, name);
    if (g) {
        g_hash_table_insert(b->groups, g->key, g);
    }
    return g;
}

static bool do_hello(Client *c, const MsProtoMsg *msg)
{
    MsBroker *b = c->broker;
    g_autoptr(GByteArray) out = g_byte_array_new();
    MsProtoMsg w = { .type = MS_MSG_WELCOME };
    Group *g;

    if (c->group) {
        return client_fail(c, EPROTO, "second HELLO (already in group %s)",
                           c->group->name);
    }
    g = hello_group(c, msg->hello.group);
    if (!g) {
        return false;
    }
    c->group = g;
    g->nclients++;
    g_hash_table_insert(g->members, GUINT_TO_POINTER(unstable_id(c)), c);
    uid_state(b, c->peer.uid)->members++;
    if (c->join_deadline) {
        g_source_remove(c->join_deadline);
        c->join_deadline = 0;
    }
    /* The quota it is told now stays its quota, whatever a reload says */
    c->quota = b->client_quota;
    g_free(c->label);
    c->label = g_strdup_printf("client %" PRIu64 " %s (pid %d uid %u)", c->id,
                               msg->hello.name, (int)c->peer.pid,
                               (unsigned)c->peer.uid);
    g_message("%s: joined group %s", c->label, g->name);

    w.welcome.page_size = b->page_size;
    w.welcome.nslots = b->nslots;
    w.welcome.max_refs = c->quota;
    w.welcome.max_lookup = MS_PROTO_MAX_LOOKUP;
    w.welcome.max_upload = ms_proto_max_upload(b->page_size);
    w.welcome.max_release = MS_PROTO_MAX_RELEASE;
    w.welcome.hash_algo = MS_PROTO_HASH_XXH3_SECRET;
    memcpy(w.welcome.secret, g->key_secret.secret, MS_PROTO_SECRET_SIZE);
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

/*
 * Entry @u goes.  Its tombstone keeps the probe sequences that pass it
 * whole; none passes it if the next entry is free, nor the tombstones
 * right before it then: those are freed, so that the tombstones of
 * meetings do not fill the table (it is emptied when entries and
 * tombstones fill half of it, and every member then asks its misses
 * again).
 */
static void unstable_drop(Group *g, Unstable *u)
{
    uint32_t mask = g->unstable_mask, i = u - g->unstable;

    u->client = UNSTABLE_GONE;
    if (g->unstable[(i + 1) & mask].client != UNSTABLE_FREE) {
        return;
    }
    /* Ends at an entry: the table is never more than half full */
    for (; g->unstable[i].client == UNSTABLE_GONE; i = (i - 1) & mask) {
        g->unstable[i] = (Unstable) { 0, UNSTABLE_FREE };
        g->unstable_used--;
    }
}

/*
 * Entry @u, of @hash, is answered: its member's next lookup can pay (see
 * "Meeting").  A member that asks for its answers (ANSWERED) gets the
 * hash; past MS_PROTO_MAX_ANSWERED waiting, it is told some were lost.
 */
static void unstable_answered(Group *g, Unstable *u, uint64_t hash)
{
    Client *first = g_hash_table_lookup(g->members,
                                        GUINT_TO_POINTER(u->client));

    if (first) {
        first->met++;
        if (first->answered &&
            first->answered->len < MS_PROTO_MAX_ANSWERED) {
            g_array_append_val(first->answered, hash);
        } else if (first->answered) {
            first->answers_lost = true;
        }
    }
    unstable_drop(g, u);
}

/* A new slot of @hash answers the miss waiting for it, if any */
static void unstable_published(Group *g, uint64_t hash)
{
    uint64_t k = ms_hash_page(&g->unstable_key, &hash, sizeof(hash));
    Unstable *free, *u = unstable_find(g, k, &free);

    if (u) {
        unstable_answered(g, u, hash);
    }
}

/*
 * The unstable table is half full: empty it, in a table twice the size
 * until it has its most entries.  Members hear of it (unstable_resets)
 * and ask their misses again.
 */
static void unstable_empty(Group *g)
{
    uint64_t n = g->unstable_mask + 1ull;

    if (n < g->unstable_max) {
        /* Not realloc: a fresh table is zeros nobody touched yet */
        g_free(g->unstable);
        n *= 2;
        g->unstable = g_new0(Unstable, n);
        g->unstable_mask = n - 1;
    } else {
        memset(g->unstable, 0, n * sizeof(*g->unstable));
    }
    g->unstable_used = 0;
    g->unstable_resets++;
    g_debug("group %s: table of misses emptied (%" PRIu64 " times),"
            " %" PRIu64 " entries", g->name, g->unstable_resets, n);
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
        unstable_answered(g, u, hash);
        g->wanted++;
        return MS_STATUS_WANTED;
    }
    if (free->client == UNSTABLE_FREE) {
        if (g->unstable_used >= (g->unstable_mask + 1ull) / 2) {
            unstable_empty(g);
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
        quota_refused(c, false);
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

/* May @c store one more page in its group?  (See "Limits") */
static bool may_publish(Client *c)
{
    Group *g = c->group;

    return !g->uids_quota ||
           charge_of(g, c->peer.uid) < c->broker->uid_quota;
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
    if (ms_hash_page(&g->key_secret, page, c->broker->page_size) != claimed) {
        g->refused++;
        return (MsProtoResult) { MS_SLOT_NONE, MS_STATUS_BAD_HASH };
    }
    slot = ms_store_find(g->store, ms_store_hash(g->store, page), page);
    if (!may_hold(c, slot)) {
        quota_refused(c, false);
        return (MsProtoResult) { MS_SLOT_NONE, MS_STATUS_QUOTA };
    }
    if (slot != MS_SLOT_NONE) {
        ms_store_get(g->store, slot);
        hold(c, slot);
        return (MsProtoResult) { slot, MS_STATUS_OK };
    }
    if (!may_publish(c)) {
        quota_refused(c, true);
        return (MsProtoResult) { MS_SLOT_NONE, MS_STATUS_QUOTA };
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
    charge(g, slot, c->peer.uid);
    hold(c, slot);      /* the reference alloc_run took */
    g->published++;
    unstable_published(g, claimed);
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
        held = ms_held_get(c->held, slot);
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
    gs->owner = g->kind == GROUP_PRIVATE ? g->owner : MS_PROTO_OWNER_NONE;
    gs->parked = g->nparked;
    gs->refused_quota = g->refused_quota;
    gs->wanted = g->wanted;
    gs->unstable_resets = g->unstable_resets;
    gs->features = MS_FEATURE_ANSWERED;
}

/*
 * A member sees its own group and nothing else: not the broker's
 * counters, not even how many groups there are.  A client that joined
 * none sees every group and the broker's counters, if it is root or
 * runs as the broker does (the administrator).
 */
static bool do_stats(Client *c, const MsProtoMsg *msg)
{
    MsBroker *b = c->broker;
    g_autoptr(GByteArray) out = g_byte_array_new();
    g_autoptr(GArray) all = g_array_new(FALSE, TRUE,
                                        sizeof(MsProtoGroupStats));
    MsProtoBrokerStats *bs = NULL;
    GHashTableIter it;
    gpointer value;

    if (c->group) {
        g_array_set_size(all, 1);
        group_stats(c->group, &g_array_index(all, MsProtoGroupStats, 0));
        g_array_index(all, MsProtoGroupStats, 0).met = c->met;
    } else if (c->peer.uid == 0 || c->peer.uid == geteuid()) {
        g_hash_table_iter_init(&it, b->groups);
        while (g_hash_table_iter_next(&it, NULL, &value) &&
               all->len < MS_PROTO_MAX_GROUPS) {
            g_array_set_size(all, all->len + 1);
            group_stats(value, &g_array_index(all, MsProtoGroupStats,
                                              all->len - 1));
        }
        bs = &b->counters;
        bs->clients = b->nclients;
        bs->parked = b->nparked;
        bs->groups = g_hash_table_size(b->groups);
    } else {
        return client_refuse(c, EACCES, &b->counters.refused_access,
                             "STATS of every group: only root or uid %u may"
                             " ask (others join a group first)",
                             (unsigned)geteuid());
    }
    ms_proto_encode_stats_reply(out, msg->id, bs,
                                (MsProtoGroupStats *)all->data, all->len);
    reply(c, out, -1);
    return true;
}

/*
 * A member's misses answered since it last asked (see "Meeting"), and
 * the group's unstable resets: what it needs to know which of its
 * misses to ask again.  Answers are kept from its first ANSWERED on,
 * so that members that never ask cost nothing; the first reply says
 * the earlier ones were lost.
 */
static bool do_answered(Client *c, const MsProtoMsg *msg)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    uint32_t flags = 0;

    if (!c->answered) {
        c->answered = g_array_new(FALSE, FALSE, sizeof(uint64_t));
        c->answers_lost = true;
    }
    if (c->answers_lost) {
        flags |= MS_ANSWERED_LOST;
    }
    ms_proto_encode_answered_reply(out, msg->id, flags,
                                   c->group->unstable_resets,
                                   (const uint64_t *)c->answered->data,
                                   c->answered->len);
    g_array_set_size(c->answered, 0);
    c->answers_lost = false;
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
    case MS_MSG_ANSWERED:
        if (!c->group) {
            return client_fail(c, EPROTO, "%s before HELLO",
                               ms_proto_type_name(msg.type));
        }
        return msg.type == MS_MSG_LOOKUP ? do_lookup(c, &msg) :
               msg.type == MS_MSG_UPLOAD ? do_upload(c, &msg) :
               msg.type == MS_MSG_ANSWERED ? do_answered(c, &msg) :
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

/*
 * Its time to join is over.  It holds no reference (only members do):
 * dropping it costs nobody a page, and frees its connection for others.
 */
static gboolean client_join_late(gpointer opaque)
{
    Client *c = opaque;
    MsBroker *b = c->broker;

    c->join_deadline = 0;
    g_assert(!c->group && !c->refs);
    client_refuse(c, ETIMEDOUT, &b->counters.dropped_idle,
                  "no HELLO within %u s of connecting (join-timeout)",
                  b->cfg.join_timeout);
    client_gone(c);
    return G_SOURCE_REMOVE;
}

static void peer_clear(Peer *p)
{
    if (p->gids) {
        g_array_unref(p->gids);
        p->gids = NULL;
    }
}

/*
 * Who is at the other end of @fd: SO_PEERCRED, and SO_PEERGROUPS for
 * the gids= of declared groups (a peer with more than NGROUPS_MAX
 * cannot exist; one whose groups we cannot read is matched by its
 * primary gid only)
 */
static void peer_get(int fd, Peer *p)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);
    g_autofree gid_t *gids = g_new(gid_t, MAX_PEER_GROUPS);
    int r;

    *p = (Peer) { .pid = -1, .uid = (uid_t)-1, .gid = (gid_t)-1 };
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
        p->pid = cred.pid;
        p->uid = cred.uid;
        p->gid = cred.gid;
    }
    len = MAX_PEER_GROUPS * sizeof(gid_t);
    r = getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, gids, &len);
    if (r < 0 && errno == ERANGE && len <= NGROUPS_MAX * sizeof(gid_t)) {
        /* The kernel said how much room they need */
        gids = g_realloc(gids, len);
        r = getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, gids, &len);
    }
    if (r < 0) {
        len = 0;
    }
    p->gids = g_array_new(FALSE, FALSE, sizeof(gid_t));
    g_array_append_vals(p->gids, gids, len / sizeof(gid_t));
}

static void client_new(MsBroker *b, int fd, Peer *peer)
{
    Client *c = g_new0(Client, 1);

    c->broker = b;
    c->id = ++b->next_client_id;
    c->fd = fd;
    c->out_fd = -1;
    c->peer = *peer;
    *peer = (Peer) { 0 };
    c->pidfd = peer_pidfd(fd, c->peer.pid);
    c->label = g_strdup_printf("client %" PRIu64 " (pid %d uid %u)", c->id,
                               (int)c->peer.pid, (unsigned)c->peer.uid);
    c->in = g_byte_array_new();
    c->out = g_byte_array_new();
    c->held = ms_held_new(b->nslots);
    c->cond = G_IO_IN;
    c->watch = g_unix_fd_add(fd, G_IO_IN, client_ready, c);
    /*
     * Below the priority of I/O: a HELLO that came in time, but that a
     * busy or stopped broker has not read yet, is read first
     */
    c->join_deadline = g_timeout_add_full(G_PRIORITY_LOW,
                                          b->cfg.join_timeout * 1000,
                                          client_join_late, c, NULL);
    b->clients = g_list_prepend(b->clients, c);
    b->nclients++;
    uid_state(b, c->peer.uid)->conns++;
    g_message("%s: connected", c->label);
}

static void refuse_peer(int fd, const Peer *p, int code, uint64_t *counter,
                        const char *fmt, ...) G_GNUC_PRINTF(5, 6);

/* Refuse a connection before it is a client: log, count, tell, close */
static void refuse_peer(int fd, const Peer *p, int code, uint64_t *counter,
                        const char *fmt, ...)
{
    g_autofree char *why = NULL;
    va_list ap;

    va_start(ap, fmt);
    why = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    (*counter)++;
    g_warning("refusing a client (pid %d uid %u): %s", (int)p->pid,
              (unsigned)p->uid, why);
    send_error(fd, code, why);
    close(fd);
}

/*
 * May @p connect?  Within its uid's share, and within max-clients; or,
 * if it may use the reserve (see "Limits"), with up to reserved-clients
 * more, past either.  Parked clients count: they hold references and
 * memory.
 */
static bool admit(MsBroker *b, int fd, const Peer *p)
{
    UidState *u = g_hash_table_lookup(b->uids, GUINT_TO_POINTER(p->uid));
    uint32_t mine = u ? u->conns + u->parked : 0;
    uint32_t all = b->nclients + b->nparked;
    uint32_t reserve = reserve_of(b, p);

    if (mine >= b->max_per_uid + reserve) {
        refuse_peer(fd, p, EUSERS, &b->counters.refused_uid_clients,
                    "uid %u has %u clients connected or parked,"
                    " max-clients-per-uid allows %u%s", (unsigned)p->uid,
                    mine, b->max_per_uid,
                    reserve ? " and some of reserved-clients" : "");
        return false;
    }
    if (all < b->cfg.max_clients && mine < b->max_per_uid) {
        return true;
    }
    if (all < b->cfg.max_clients + reserve) {
        b->counters.reserve_admitted++;
        g_message("client (pid %d uid %u): taken into the reserve: %u"
                  " clients connected or parked (max-clients %u), %u of"
                  " its uid (max-clients-per-uid %u)", (int)p->pid,
                  (unsigned)p->uid, all, b->cfg.max_clients, mine,
                  b->max_per_uid);
        return true;
    }
    refuse_peer(fd, p, EUSERS, &b->counters.refused_clients,
                "the broker is full: %u clients connected or parked,"
                " max-clients allows %u; the %u reserved are for uids a"
                " declared group lists and the administrator (half of them"
                " for uids with members)", all, b->cfg.max_clients,
                b->cfg.reserved_clients);
    return false;
}

static gboolean listen_ready(gint lfd, GIOCondition cond G_GNUC_UNUSED,
                             gpointer opaque)
{
    MsBroker *b = opaque;
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    Peer peer;

    if (fd < 0) {
        if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
            g_warning("cannot accept a client: %s", g_strerror(errno));
        }
        return G_SOURCE_CONTINUE;
    }
    peer_get(fd, &peer);
    if (admit(b, fd, &peer)) {
        client_new(b, fd, &peer);
    }
    peer_clear(&peer);
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

static bool bind_socket(MsBroker *b, GError **errp)
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
    return true;
}

static int sockopt_int(int fd, int opt)
{
    int v = -1;
    socklen_t len = sizeof(v);

    return getsockopt(fd, SOL_SOCKET, opt, &v, &len) < 0 ? -1 : v;
}

bool ms_broker_socket_from_systemd(int *fd, GError **errp)
{
    g_autofree char *pid_env = g_strdup(g_getenv("LISTEN_PID"));
    g_autofree char *fds_env = g_strdup(g_getenv("LISTEN_FDS"));
    guint64 pid, n;
    struct stat st;

    *fd = -1;
    /* Ours or not, they must not reach anything we start */
    g_unsetenv("LISTEN_PID");
    g_unsetenv("LISTEN_FDS");
    g_unsetenv("LISTEN_FDNAMES");
    if (!pid_env || !fds_env ||
        !g_ascii_string_to_unsigned(pid_env, 10, 1, G_MAXINT, &pid, NULL) ||
        pid != (guint64)getpid()) {
        return true;
    }
    if (!g_ascii_string_to_unsigned(fds_env, 10, 0, G_MAXINT, &n, NULL) ||
        n != 1) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "systemd passed LISTEN_FDS=%s: the broker takes exactly"
                    " one socket (one ListenStream= in its .socket unit)",
                    fds_env);
        return false;
    }
    /* SD_LISTEN_FDS_START */
    if (fstat(3, &st) < 0 || !S_ISSOCK(st.st_mode) ||
        sockopt_int(3, SO_DOMAIN) != AF_UNIX ||
        sockopt_int(3, SO_TYPE) != SOCK_STREAM ||
        sockopt_int(3, SO_ACCEPTCONN) != 1) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "systemd passed fd 3, which is not a listening AF_UNIX"
                    " stream socket: the .socket unit needs ListenStream="
                    " with a path");
        return false;
    }
    if (fcntl(3, F_SETFD, FD_CLOEXEC) < 0 ||
        fcntl(3, F_SETFL, fcntl(3, F_GETFL) | O_NONBLOCK) < 0) {
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot set up systemd's socket (fd 3): %s",
                    g_strerror(errno));
        return false;
    }
    *fd = 3;
    return true;
}

/* Same file?  The names may differ (relative, symlinks) */
static bool same_socket(const char *a, const char *b)
{
    struct stat sa, sb;

    return !strcmp(a, b) ||
           (stat(a, &sa) == 0 && stat(b, &sb) == 0 &&
            sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino);
}

/*
 * Serve the socket systemd passed: it made, bound and chmod-ed it
 * (SocketMode=, SocketGroup=) and removes it; we only accept on it
 */
static bool take_socket(MsBroker *b, int fd, GError **errp)
{
    struct sockaddr_un sa = { 0 };
    socklen_t len = sizeof(sa);
    g_autofree char *path = NULL;

    if (getsockname(fd, (struct sockaddr *)&sa, &len) < 0 ||
        sa.sun_family != AF_UNIX) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "systemd's socket (fd %d) has no AF_UNIX address", fd);
        return false;
    }
    if (len <= offsetof(struct sockaddr_un, sun_path) || !sa.sun_path[0]) {
        path = g_strdup("(unnamed or abstract)");
    } else {
        path = g_strndup(sa.sun_path, sizeof(sa.sun_path));
    }
    if (b->socket_path && !same_socket(b->socket_path, path)) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "systemd passed the socket %s but the broker was told"
                    " to listen on %s: give the same path, or no socket"
                    " (it is systemd's to choose)", path, b->socket_path);
        return false;
    }
    g_free(b->socket_path);
    b->socket_path = g_steal_pointer(&path);
    b->listen_fd = fd;
    b->activated = true;
    return true;
}

/* Defaults that follow from the store's size and max-clients */
static void resolve_limits(MsBroker *b)
{
    b->client_quota = b->cfg.client_quota ? b->cfg.client_quota
                                          : MAX(b->nslots / 2, 1);
    b->uid_quota = b->cfg.uid_quota ? b->cfg.uid_quota
                                    : MAX(b->nslots / 2, 1);
    b->max_per_uid = b->cfg.max_clients_per_uid ?
                     b->cfg.max_clients_per_uid :
                     MAX(b->cfg.max_clients / 2, 1);
}

static void log_limits(MsBroker *b)
{
    g_message("limits: %u references per client, %u pages per uid in a"
              " group several uids share; %u clients (%u per uid) and %u"
              " reserved for members rejoining; %u private groups (%u per"
              " uid); %u s to join", b->client_quota, b->uid_quota,
              b->cfg.max_clients, b->max_per_uid, b->cfg.reserved_clients,
              b->cfg.max_groups, b->cfg.max_groups_per_uid,
              b->cfg.join_timeout);
}

MsBroker *ms_broker_new(const MsBrokerConfig *cfg, GError **errp)
{
    g_autoptr(MsBroker) b = g_new0(MsBroker, 1);
    long ps = ms_host_page_size();
    uint64_t nslots = cfg->max_store / ps;

    ms_broker_config_copy(&b->cfg, cfg);
    b->listen_fd = -1;
    b->socket_path = g_strdup(cfg->socket_path);
    b->groups = g_hash_table_new_full(g_str_hash, g_str_equal, NULL,
                                      (GDestroyNotify)group_free);
    b->uids = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL,
                                    g_free);
    b->page_size = ps;
    if (nslots < 1 || nslots >= MS_SLOT_NONE) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "store size of %" PRIu64 " bytes: 1 to %" PRIu64 " pages"
                    " of %ld bytes allowed", cfg->max_store,
                    (uint64_t)MS_SLOT_NONE - 1, ps);
        return NULL;
    }
    b->nslots = nslots;
    resolve_limits(b);
    if (!ms_broker_config_check(&b->cfg, errp)) {
        return NULL;
    }
    if (cfg->listen_fd >= 0) {
        if (!take_socket(b, cfg->listen_fd, errp)) {
            return NULL;
        }
    } else if (!b->socket_path) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "no socket to listen on: give one (--socket or socket="
                    " in the config file), or let systemd pass one");
        return NULL;
    } else if (!bind_socket(b, errp)) {
        return NULL;
    }
    b->listen_watch = g_unix_fd_add(b->listen_fd, G_IO_IN, listen_ready, b);
    if (b->activated) {
        g_message("listening on %s (from systemd): groups of %u slots of"
                  " %zu bytes", b->socket_path, b->nslots, b->page_size);
    } else {
        g_message("listening on %s (mode %04o): groups of %u slots of %zu"
                  " bytes", b->socket_path, b->cfg.socket_mode, b->nslots,
                  b->page_size);
    }
    log_limits(b);
    return g_steal_pointer(&b);
}

void ms_broker_free(MsBroker *b)
{
    if (!b) {
        return;
    }
    /* The members keep their pages: the stores live on in their mappings */
    while (b->clients) {
        client_free(b->clients->data, false);
    }
    if (b->listen_watch) {
        g_source_remove(b->listen_watch);
    }
    if (b->listen_fd >= 0) {
        close(b->listen_fd);
        if (!b->activated) {
            unlink(b->socket_path);
        }
    }
    g_hash_table_destroy(b->groups);
    g_hash_table_destroy(b->uids);
    ms_broker_config_clear(&b->cfg);
    g_free(b->socket_path);
    g_free(b);
}

/* Reloading */

/* Say what changed in the limits */
static void log_limit_changes(const MsBrokerConfig *o,
                              const MsBrokerConfig *n)
{
    static const struct {
        const char *name;
        size_t offset;
    } counts[] = {
        { "client-quota", offsetof(MsBrokerConfig, client_quota) },
        { "uid-quota", offsetof(MsBrokerConfig, uid_quota) },
        { "max-clients", offsetof(MsBrokerConfig, max_clients) },
        { "max-clients-per-uid",
          offsetof(MsBrokerConfig, max_clients_per_uid) },
        { "reserved-clients", offsetof(MsBrokerConfig, reserved_clients) },
        { "max-groups", offsetof(MsBrokerConfig, max_groups) },
        { "max-groups-per-uid",
          offsetof(MsBrokerConfig, max_groups_per_uid) },
        { "join-timeout", offsetof(MsBrokerConfig, join_timeout) },
    };

    for (size_t i = 0; i < G_N_ELEMENTS(counts); i++) {
        uint32_t a = *(const uint32_t *)((const char *)o + counts[i].offset);
        uint32_t z = *(const uint32_t *)((const char *)n + counts[i].offset);

        if (a != z) {
            g_message("reload: %s: %u -> %u%s", counts[i].name, a, z,
                      a && z ? "" : " (0: the default)");
        }
    }
    if (o->strict_groups != n->strict_groups) {
        g_message("reload: strict-groups: %s -> %s%s",
                  o->strict_groups ? "true" : "false",
                  n->strict_groups ? "true" : "false",
                  n->strict_groups ? " (private groups keep their members"
                  " until they leave; no new ones)" : "");
    }
    if (o->max_store != n->max_store) {
        g_message("reload: max-store changed: kept at %" PRIu64 " bytes"
                  " until the broker restarts", o->max_store);
    }
    if (o->socket_mode != n->socket_mode) {
        g_message("reload: socket-mode changed: kept at %04o until the"
                  " broker restarts", o->socket_mode);
    }
}

/* The members of @g that @d no longer lets in: they stay, say so */
static void log_unlisted_members(MsBroker *b, Group *g,
                                 const MsBrokerGroupDecl *d)
{
    for (GList *l = b->clients; l; l = l->next) {
        Client *c = l->data;

        if (c->group == g && !decl_allows(d, &c->peer)) {
            g_message("reload: %s: uid %u is no longer on the list of"
                      " group %s: it stays a member until it leaves",
                      c->label, (unsigned)c->peer.uid, g->name);
        }
    }
}

/* How many private groups are named @name */
static uint32_t private_named(MsBroker *b, const char *name)
{
    GHashTableIter it;
    gpointer value;
    uint32_t n = 0;

    g_hash_table_iter_init(&it, b->groups);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        Group *g = value;

        n += g->kind == GROUP_PRIVATE && !strcmp(g->name, name);
    }
    return n;
}

/* Groups declared now, or with another list */
static void apply_new_decls(MsBroker *b, const MsBrokerConfig *n)
{
    GHashTableIter it;
    gpointer key, value;

    g_hash_table_iter_init(&it, n->groups);
    while (g_hash_table_iter_next(&it, &key, &value)) {
        const MsBrokerGroupDecl *old = ms_broker_config_group(&b->cfg, key);
        Group *g = g_hash_table_lookup(b->groups, key);
        uint32_t private = private_named(b, key);

        if (!old) {
            g_message("reload: group %s: declared", (char *)key);
        } else if (!ms_broker_group_decl_equal(old, value)) {
            g_message("reload: group %s: who may join changed",
                      (char *)key);
        }
        if (!old && private) {
            g_message("reload: group %s: %u private groups of that name"
                      " keep their members until they leave; new joins go"
                      " to the declared group", (char *)key, private);
        }
        if (g) {
            /* Declared again before its last member left */
            g->kind = GROUP_DECLARED;
            g->uids_quota = decl_multi_uid(value);
            log_unlisted_members(b, g, value);
        }
    }
}

/* Groups no longer declared: their members stay until they leave */
static void retire_old_decls(MsBroker *b, const MsBrokerConfig *n)
{
    GHashTableIter it;
    gpointer key;

    g_hash_table_iter_init(&it, b->cfg.groups);
    while (g_hash_table_iter_next(&it, &key, NULL)) {
        Group *g;

        if (ms_broker_config_group(n, key)) {
            continue;
        }
        g = g_hash_table_lookup(b->groups, key);
        if (!g || (!g->nclients && !g->nparked)) {
            g_message("reload: group %s: no longer declared%s", (char *)key,
                      g ? ", and it has no members: freed" : "");
            if (g) {
                g->kind = GROUP_RETIRED;
                group_leave(b, g);
            }
            continue;
        }
        g_message("reload: group %s: no longer declared: its %u members"
                  " (%u parked) stay until they leave; new joins of that"
                  " name get private groups", (char *)key, g->nclients,
                  g->nparked);
        g->kind = GROUP_RETIRED;
        group_leave(b, g);
    }
}

bool ms_broker_reconfigure(MsBroker *b, const MsBrokerConfig *cfg,
                           GError **errp)
{
    MsBrokerConfig old;

    if (!ms_broker_config_check(cfg, errp)) {
        return false;
    }
    if (cfg->socket_path && b->socket_path &&
        !same_socket(cfg->socket_path, b->socket_path)) {
        g_message("reload: socket changed: still listening on %s until"
                  " the broker restarts", b->socket_path);
    }
    log_limit_changes(&b->cfg, cfg);
    apply_new_decls(b, cfg);
    retire_old_decls(b, cfg);

    /* Keep what only a restart changes */
    old = b->cfg;
    ms_broker_config_copy(&b->cfg, cfg);
    b->cfg.max_store = old.max_store;
    b->cfg.socket_mode = old.socket_mode;
    b->cfg.listen_fd = old.listen_fd;
    ms_broker_config_clear(&old);
    resolve_limits(b);
    log_limits(b);
    return true;
}

/*
 * Consistency.  The counts above are kept incrementally, on paths a
 * hostile client steers; a count that drifts frees a slot a guest still
 * maps, or pins one forever.  ms_broker_check() counts everything again
 * from the clients' tables, for the fuzzer (tests/fuzz/fuzz-broker.c),
 * which calls it after every step.  The daemon never does: it walks
 * every slot of every group.
 */

static bool check_fail(GError **errp, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static bool check_fail(GError **errp, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_propagate_error(errp, g_error_new_valist(MS_ENGINE_ERROR, EFAULT, fmt,
                                               ap));
    va_end(ap);
    return false;
}

/* The index holds exactly the published slots, under their group hash */
static bool check_index(MsBroker *b, Group *g, GError **errp)
{
    GHashTableIter it;
    gpointer key, value;

    g_hash_table_iter_init(&it, g->index);
    while (g_hash_table_iter_next(&it, &key, &value)) {
        uint32_t head = GPOINTER_TO_UINT(value) - 1;

        if (head >= b->nslots || key != &g->ghash[head] ||
            !g->indexed[head]) {
            return check_fail(errp, "group %s: index entry of slot %u is"
                              " stale", g->name, head);
        }
    }
    for (uint32_t s = 0; s < b->nslots; s++) {
        uint32_t steps = 0, i;

        if (g->indexed[s] != ms_store_is_published(g->store, s)) {
            return check_fail(errp, "group %s: slot %u is %sindexed but"
                              " %spublished", g->name, s,
                              g->indexed[s] ? "" : "not ",
                              ms_store_is_published(g->store, s) ? ""
                                                                  : "not ");
        }
        if (!g->indexed[s]) {
            continue;
        }
        for (i = index_find(g, g->ghash[s]); i != s && i != MS_SLOT_NONE &&
             steps < b->nslots; i = g->gnext[i], steps++) {
            if (i >= b->nslots || !g->indexed[i] ||
                g->ghash[i] != g->ghash[s]) {
                return check_fail(errp, "group %s: the chain of slot %u"
                                  " passes slot %u", g->name, s, i);
            }
        }
        if (i != s) {
            return check_fail(errp, "group %s: slot %u is not in its hash"
                              " chain", g->name, s);
        }
    }
    return true;
}

/* A group's slots: references, holders, charges, the unstable table */
static bool check_group(MsBroker *b, Group *g, GError **errp)
{
    g_autofree uint64_t *refs = g_new0(uint64_t, b->nslots);
    g_autofree uint32_t *holders = g_new0(uint32_t, b->nslots);
    g_autoptr(GHashTable) charges = g_hash_table_new(g_direct_hash,
                                                     g_direct_equal);
    uint32_t nclients = 0, nparked = 0, used = 0;
    uint64_t shared = 0;
    GHashTableIter it;
    gpointer key, value;

    for (GList *l = b->clients; l; l = l->next) {
        Client *c = l->data;

        if (c->group != g) {
            continue;
        }
        nclients += !c->parked;
        nparked += c->parked;
        for (uint32_t s = ms_held_next(c->held, 0); s != UINT32_MAX;
             s = ms_held_next(c->held, s + 1)) {
            refs[s] += ms_held_get(c->held, s);
            holders[s]++;
        }
    }
    if (nclients != g->nclients || nparked != g->nparked) {
        return check_fail(errp, "group %s: counts %u members and %u parked,"
                          " has %u and %u", g->name, g->nclients, g->nparked,
                          nclients, nparked);
    }
    if (g->kind != GROUP_DECLARED && !nclients && !nparked) {
        return check_fail(errp, "group %s: no member left, yet not freed",
                          g->name);
    }
    for (uint32_t s = 0; s < b->nslots; s++) {
        if (ms_store_refs(g->store, s) != refs[s]) {
            return check_fail(errp, "group %s: slot %u has %u references"
                              " in the store, its holders hold %" PRIu64,
                              g->name, s, ms_store_refs(g->store, s),
                              refs[s]);
        }
        if (g->holders[s] != holders[s]) {
            return check_fail(errp, "group %s: slot %u counts %u holders,"
                              " has %u", g->name, s, g->holders[s],
                              holders[s]);
        }
        shared += holders[s] >= 2;
        if (g->indexed[s]) {
            gpointer uid = GUINT_TO_POINTER(g->charged[s]);

            g_hash_table_insert(charges, uid, GUINT_TO_POINTER(
                GPOINTER_TO_UINT(g_hash_table_lookup(charges, uid)) + 1));
        }
    }
    if (shared != g->shared_slots) {
        return check_fail(errp, "group %s: counts %" PRIu64 " shared slots,"
                          " has %" PRIu64, g->name, g->shared_slots, shared);
    }
    if (!check_index(b, g, errp)) {
        return false;
    }
    /* Every published slot is charged to the uid that published it */
    g_hash_table_iter_init(&it, g->charges);
    while (g_hash_table_iter_next(&it, &key, &value)) {
        if (g_hash_table_lookup(charges, key) != value) {
            return check_fail(errp, "group %s: uid %u is charged %u pages,"
                              " published %u", g->name,
                              GPOINTER_TO_UINT(key), GPOINTER_TO_UINT(value),
                              GPOINTER_TO_UINT(g_hash_table_lookup(charges,
                                                                   key)));
        }
    }
    if (g_hash_table_size(charges) != g_hash_table_size(g->charges)) {
        return check_fail(errp, "group %s: a uid published pages it is not"
                          " charged for", g->name);
    }
    /* At most half full, or a probe might never end */
    for (uint64_t i = 0; i <= g->unstable_mask; i++) {
        used += g->unstable[i].client != UNSTABLE_FREE;
    }
    if (used != g->unstable_used || used > (g->unstable_mask + 1ull) / 2) {
        return check_fail(errp, "group %s: unstable table of %u entries"
                          " counts %u used, has %u", g->name,
                          g->unstable_mask + 1, g->unstable_used, used);
    }
    return true;
}

static UidState *check_uid(GHashTable *uids, uid_t uid)
{
    UidState *u = g_hash_table_lookup(uids, GUINT_TO_POINTER(uid));

    if (!u) {
        u = g_new0(UidState, 1);
        g_hash_table_insert(uids, GUINT_TO_POINTER(uid), u);
    }
    return u;
}

bool ms_broker_check(MsBroker *b, GError **errp)
{
    g_autoptr(GHashTable) uids = g_hash_table_new_full(g_direct_hash,
                                                       g_direct_equal, NULL,
                                                       g_free);
    uint32_t nclients = 0, nparked = 0, nprivate = 0;
    GHashTableIter it;
    gpointer key, value;

    for (GList *l = b->clients; l; l = l->next) {
        Client *c = l->data;
        UidState *u = check_uid(uids, c->peer.uid);
        uint64_t refs = 0;

        for (uint32_t s = ms_held_next(c->held, 0); s != UINT32_MAX;
             s = ms_held_next(c->held, s + 1)) {
            refs += ms_held_get(c->held, s);
        }
        if (refs != c->refs || (refs && !c->group)) {
            return check_fail(errp, "%s: counts %" PRIu64 " references, holds"
                              " %" PRIu64 "%s", c->label, c->refs, refs,
                              c->group ? "" : " outside any group");
        }
        if (c->parked != (c->fd < 0) || (c->parked && !c->refs)) {
            return check_fail(errp, "%s: %s, fd %d, %" PRIu64 " references",
                              c->label, c->parked ? "parked" : "connected",
                              c->fd, c->refs);
        }
        if (c->group &&
            g_hash_table_lookup(b->groups, c->group->key) != c->group) {
            return check_fail(errp, "%s: its group %s was freed", c->label,
                              c->group->name);
        }
        if (c->parked) {
            nparked++;
            u->parked++;
        } else {
            nclients++;
            u->conns++;
            u->members += c->group != NULL;
        }
    }
    if (nclients != b->nclients || nparked != b->nparked) {
        return check_fail(errp, "counts %u clients and %u parked, has %u and"
                          " %u", b->nclients, b->nparked, nclients, nparked);
    }
    g_hash_table_iter_init(&it, b->groups);
    while (g_hash_table_iter_next(&it, &key, &value)) {
        Group *g = value;

        if (strcmp(key, g->key)) {
            return check_fail(errp, "group %s: filed under %s", g->name,
                              (char *)key);
        }
        if (!check_group(b, g, errp)) {
            return false;
        }
        if (g->kind == GROUP_PRIVATE) {
            nprivate++;
            check_uid(uids, g->owner)->groups++;
        }
    }
    if (nprivate != b->nprivate) {
        return check_fail(errp, "counts %u private groups, has %u",
                          b->nprivate, nprivate);
    }
    /* Each uid's counts; and a uid with nothing left is forgotten */
    g_hash_table_iter_init(&it, b->uids);
    while (g_hash_table_iter_next(&it, &key, &value)) {
        UidState *u = value, none = { 0 };
        UidState *real = g_hash_table_lookup(uids, key);

        real = real ? real : &none;
        if (memcmp(u, real, sizeof(*u)) || !(u->conns || u->parked ||
                                             u->groups)) {
            return check_fail(errp, "uid %u counts %u connections, %u"
                              " members, %u parked, %u groups; has %u, %u,"
                              " %u, %u", GPOINTER_TO_UINT(key), u->conns,
                              u->members, u->parked, u->groups, real->conns,
                              real->members, real->parked, real->groups);
        }
    }
    if (g_hash_table_size(uids) != g_hash_table_size(b->uids)) {
        return check_fail(errp, "a uid with clients or groups has no counts");
    }
    return true;
}
