/*
 * mem-share engine: the client side of the broker protocol
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Depends on libc, GLib and libxxhash only, never on QEMU.
 *
 * An MsBrokerClient is one connection to mem-share-broker: it joins a
 * group (HELLO), receives the group's store as a read-only descriptor
 * with its geometry and hash secret (WELCOME), and then makes blocking
 * requests, each bounded by the timeout given at connect time, so that a
 * scanner thread can call it directly.  Batches larger than the broker's
 * caps are split transparently.
 *
 * The broker writes the store, never the client.  A slot returned by a
 * lookup or an upload comes with one reference that the client owns
 * until it releases it: the slot cannot be freed (nor reused)
 * meanwhile, not even after the connection is lost, as long as this
 * process lives (the broker watches it with a pidfd).  It may still hold
 * another content than the client's page (a hash collision, or a lying
 * peer in the group): the client must compare bytes before it maps a
 * slot.
 *
 * A call that runs out of time (or is interrupted, see
 * ms_broker_client_set_interrupt()) fails with ETIMEDOUT (or EINTR) and
 * leaves its request pending: the connection stays, the reply is read
 * later, and references a late reply hands out are released by the
 * client itself.  While a timed-out request is unanswered, calls fail
 * at once with EAGAIN: the caller goes on without the group for now.
 * A timeout is never taken for a dead broker.
 *
 * When the connection breaks (end of file, an ERROR, a reply that breaks
 * the protocol), every call fails with EPIPE or EPROTO and the client is
 * dead for good: mappings of the store stay valid (they hold the memfd),
 * the caller frees the client and may connect again later.
 *
 * Who the broker is.  Guest pages go to whatever listens on the socket
 * path, so before sending anything the client checks the credentials of
 * the listener (SO_PEERCRED: those of the process that called listen(),
 * systemd's when it passed the socket to the broker) against the uid the
 * caller expects the broker to run as.  A process of another uid that
 * bound the path (a broker's socket directory writable by others, a
 * stale path after the broker went) is refused before it gets a HELLO.
 * Root is accepted too: it can read our memory anyway.
 *
 * Not thread-safe: one thread uses a client at a time.
 */

#ifndef MEM_SHARE_BROKER_CLIENT_H
#define MEM_SHARE_BROKER_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>

#include "mem-share/error.h"
#include "mem-share/hash.h"
#include "mem-share/proto.h"

typedef struct MsBrokerClient MsBrokerClient;

/* What WELCOME said about the group */
typedef struct MsBrokerParams {
    uint32_t page_size;
    uint32_t nslots;        /* the store is nslots * page_size bytes */
    uint32_t max_refs;      /* references this client may hold */
    uint32_t max_lookup;    /* batch caps (the client splits for them) */
    uint32_t max_upload;
    uint32_t max_release;
    MsHashKey key;          /* the group's hash secret */
} MsBrokerParams;

/*
 * For @broker_uid: accept a broker of any uid.  Only for a client that
 * gives the broker nothing: no page, no lookup (statistics).  (uid_t)-1
 * is no user's uid.
 */
#define MS_BROKER_UID_ANY ((uid_t)-1)

/*
 * Connect to the broker at @path without joining a group: such a client
 * can only ask for statistics (of every group, if its uid is root's or
 * the broker's).  @timeout_ms bounds every later call; 0 means 5 s.
 * The listener must run as @broker_uid or root, else the call fails with
 * EPERM, having sent nothing.
 */
MsBrokerClient *ms_broker_client_open_as(const char *path, uid_t broker_uid,
                                         int timeout_ms, GError **errp);

/* The same for a broker of any uid: statistics only */
MsBrokerClient *ms_broker_client_open(const char *path, int timeout_ms,
                                      GError **errp);

/*
 * Connect and join @group as @name (names: see ms_proto_name_valid()),
 * if the broker runs as @broker_uid or root (else EPERM, nothing sent).
 */
MsBrokerClient *ms_broker_client_connect_as(const char *path,
                                            uid_t broker_uid,
                                            const char *group,
                                            const char *name, int timeout_ms,
                                            GError **errp);

/* The same with a broker that runs as root */
MsBrokerClient *ms_broker_client_connect(const char *path, const char *group,
                                         const char *name, int timeout_ms,
                                         GError **errp);

void ms_broker_client_free(MsBrokerClient *c);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(MsBrokerClient, ms_broker_client_free)

/* False once the connection is lost: free the client and reconnect. */
bool ms_broker_client_alive(const MsBrokerClient *c);

/* True while a request that timed out waits for its reply. */
bool ms_broker_client_stalled(const MsBrokerClient *c);

/* References that replies handed out after their call gave up waiting */
uint64_t ms_broker_client_late_refs(const MsBrokerClient *c);

/*
 * Called between slices of every wait (at least every 10 ms): true makes
 * the call give up now with EINTR, its request left pending.  For the
 * owner of a lock that others need: they must not wait for the broker.
 */
typedef bool MsBrokerInterruptFn(void *opaque);
void ms_broker_client_set_interrupt(MsBrokerClient *c,
                                    MsBrokerInterruptFn *fn, void *opaque);

/* The group's parameters, or NULL if the client joined none. */
const MsBrokerParams *ms_broker_client_params(const MsBrokerClient *c);

/*
 * The store's read-only descriptor, owned by the client (dup() it to
 * keep it past ms_broker_client_free()), or -1 if it joined no group.
 * Map it MAP_PRIVATE with PROT_READ (and PROT_WRITE for copy-on-write).
 */
int ms_broker_client_store_fd(const MsBrokerClient *c);

/* The group's keyed hash of one page, as LOOKUP and UPLOAD expect. */
uint64_t ms_broker_client_hash(const MsBrokerClient *c, const void *page);

/*
 * Look up @count page hashes.  results[i] says, for hashes[i], which slot
 * holds a page with that hash (one reference taken for the client) or
 * why none was returned.  On failure too: the batches answered before it
 * may hold OK entries (references the caller owns), the rest say
 * NOT_FOUND.  The same goes for the uploads.
 */
bool ms_broker_client_lookup(MsBrokerClient *c, const uint64_t *hashes,
                             uint32_t count, MsProtoResult *results,
                             GError **errp);

/*
 * Give the broker @count pages (page_size bytes each, contiguous at
 * @pages) to store.  Each gets the slot of an identical page already
 * stored, or a new one, with one reference for the client.  @hashes may
 * be NULL: the client computes them.  The pages are sent from @pages,
 * not copied first: guest memory may be given, and a page written
 * between hashing and sending comes back BAD_HASH.
 */
bool ms_broker_client_upload(MsBrokerClient *c, const void *pages,
                             const uint64_t *hashes, uint32_t count,
                             MsProtoResult *results, GError **errp);

/*
 * The same for pages that need not be neighbours: the i-th at @pages[i].
 * One UPLOAD (one round trip) per max_upload pages, wherever they are.
 */
bool ms_broker_client_upload_pages(MsBrokerClient *c,
                                   const void *const *pages,
                                   const uint64_t *hashes, uint32_t count,
                                   MsProtoResult *results, GError **errp);

/*
 * Drop refs[i] references (1 each if @refs is NULL) to slots[i].  Releasing
 * a reference the client does not hold is a protocol violation: the
 * broker hangs up.  @released (may be NULL) gets how many were dropped.
 */
bool ms_broker_client_release(MsBrokerClient *c, const uint32_t *slots,
                              const uint32_t *refs, uint32_t count,
                              uint64_t *released, GError **errp);

/*
 * The same without waiting: the RELEASE is queued, sent as far as the
 * socket takes it now and later, and its reply is read by a later call.
 * Fails only if the connection is dead.
 */
bool ms_broker_client_release_nowait(MsBrokerClient *c,
                                     const uint32_t *slots,
                                     const uint32_t *refs, uint32_t count,
                                     GError **errp);

/* Statistics of the client's group, or of every group (see _open()). */
bool ms_broker_client_stats(MsBrokerClient *c, GArray **groups,
                            GError **errp);

/*
 * What the broker offers a member beyond the base protocol (MS_FEATURE_*
 * of proto.h), as its first STATS of the group said (one round trip the
 * first time).
 */
bool ms_broker_client_features(MsBrokerClient *c, uint64_t *features,
                               GError **errp);

/*
 * ANSWERED (only if ms_broker_client_features() said so): the hashes of
 * this member's misses the group answered since the last call, by a
 * meeting or by a new slot (a lookup of each can pay now); *@lost when
 * more were answered than this says (the first call of a connection,
 * an overflow, a late reply): any miss may have been; and the group's
 * unstable resets, which forget misses.
 */
bool ms_broker_client_answered(MsBrokerClient *c, GArray **hashes,
                               bool *lost, uint64_t *unstable_resets,
                               GError **errp);

/*
 * The same, with the broker's own counters (refusals, limits), which
 * only its administrator gets: *@has_broker says whether they came.
 * @broker and @has_broker may be NULL.
 */
bool ms_broker_client_stats_full(MsBrokerClient *c, GArray **groups,
                                 MsProtoBrokerStats *broker, bool *has_broker,
                                 GError **errp);

#endif /* MEM_SHARE_BROKER_CLIENT_H */
