/*
 * mem-share engine: the broker protocol, encoder and decoder
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Depends on libc and GLib only, never on QEMU.
 *
 * The broker (tools/mem-share-broker) and its clients (QEMU, the
 * --stats mode, the tests) exchange length-prefixed binary frames over a
 * UNIX stream socket.  The wire format is docs/devel/broker-protocol.md;
 * this is its only implementation, shared by both sides and by the
 * fuzzer.  Every frame is a 16-byte header followed by a payload of at
 * most MS_PROTO_MAX_PAYLOAD bytes; all integers are little-endian.
 *
 * The decoder treats every byte as hostile: it checks the magic, the
 * version, the type, the length against the cap and the type's exact
 * layout, every count against its cap and every name against its
 * alphabet, and it never allocates more than the caps allow.  Batches
 * are not copied: a decoded message points into the frame it came from,
 * and the accessors read entries with memcpy (no alignment assumed).
 */

#ifndef MEM_SHARE_PROTO_H
#define MEM_SHARE_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <glib.h>

#include "mem-share/error.h"

#define MS_PROTO_MAGIC          0x4b42534dU     /* "MSBK" on the wire */
#define MS_PROTO_VERSION        1
#define MS_PROTO_HEADER_SIZE    16

/* Caps: a frame, a batch, a name; a broker may announce lower ones */
#define MS_PROTO_MAX_PAYLOAD    (1U << 20)
#define MS_PROTO_MAX_LOOKUP     4096
#define MS_PROTO_MAX_UPLOAD     64
#define MS_PROTO_MAX_RELEASE    4096
#define MS_PROTO_MAX_GROUPS     256
#define MS_PROTO_MAX_ANSWERED   4096
#define MS_PROTO_MAX_NAME       64
#define MS_PROTO_MAX_ERROR      256

/* Page sizes a store may have: powers of two in this range */
#define MS_PROTO_MIN_PAGE       4096
#define MS_PROTO_MAX_PAGE       65536

/* Hash the lookups use: XXH3-64 keyed with a secret (see hash.h) */
#define MS_PROTO_HASH_XXH3_SECRET 1
#define MS_PROTO_SECRET_SIZE    192

typedef enum MsProtoType {
    MS_MSG_HELLO = 1,           /* client -> broker */
    MS_MSG_WELCOME,             /* broker -> client, carries the store fd */
    MS_MSG_LOOKUP,
    MS_MSG_LOOKUP_REPLY,
    MS_MSG_UPLOAD,
    MS_MSG_UPLOAD_REPLY,
    MS_MSG_RELEASE,
    MS_MSG_RELEASE_REPLY,
    MS_MSG_STATS,
    MS_MSG_STATS_REPLY,
    MS_MSG_ERROR,               /* broker -> client, then it hangs up */
    MS_MSG_ANSWERED,            /* client -> broker (MS_FEATURE_ANSWERED) */
    MS_MSG_ANSWERED_REPLY,
    MS_MSG__MAX,
} MsProtoType;

/* What happened to one entry of a LOOKUP or UPLOAD batch */
typedef enum MsProtoStatus {
    MS_STATUS_OK = 0,           /* slot returned, one reference taken */
    MS_STATUS_NOT_FOUND,        /* lookup: no page with this hash */
    MS_STATUS_BAD_HASH,         /* upload: content does not hash as claimed */
    MS_STATUS_FULL,             /* upload: the group's store is full */
    MS_STATUS_QUOTA,            /* the client holds its maximum of references */
    MS_STATUS_WANTED,           /* lookup: none yet, another member has it */
    MS_STATUS__MAX,
} MsProtoStatus;

typedef struct MsProtoHeader {
    uint32_t magic;
    uint16_t version;
    uint16_t type;
    uint32_t length;            /* of the payload */
    uint32_t id;                /* the requester's; echoed in the reply */
} MsProtoHeader;

typedef struct MsProtoResult {
    uint32_t slot;              /* MS_SLOT_NONE unless status is OK */
    uint32_t status;            /* MsProtoStatus */
} MsProtoResult;

typedef struct MsProtoGroupStats {
    char name[MS_PROTO_MAX_NAME + 1];
    uint64_t clients;
    uint64_t page_size;
    uint64_t slots;             /* capacity */
    uint64_t slots_used;
    uint64_t shared_slots;      /* slots referenced by two clients or more */
    uint64_t refs;              /* references held by all clients */
    uint64_t bytes_held;        /* memory the store holds */
    uint64_t bytes_saved;       /* (refs - slots used) * page size */
    uint64_t lookups;           /* entries looked up */
    uint64_t hits;              /* of which found */
    uint64_t uploads;           /* entries uploaded */
    uint64_t published;         /* of which became new slots */
    uint64_t refused;           /* entries refused: bad hash, full, quota */
    uint64_t owner;             /* uid of a private group, or OWNER_NONE */
    uint64_t parked;            /* members gone whose process lives */
    uint64_t refused_quota;     /* of @refused: a client's or a uid's quota */
    uint64_t wanted;            /* entries answered WANTED: meetings */
    uint64_t unstable_resets;   /* times the unstable table was emptied */
    uint64_t met;               /* a member's: its misses answered, else 0 */
    uint64_t features;          /* MS_FEATURE_*: what the broker offers */
} MsProtoGroupStats;

#define MS_PROTO_GROUP_STATS_FIELDS 20     /* the uint64_t fields above */
/*
 * A group record of a STATS_REPLY has at least this many fields (older
 * brokers send no features) and at most MAX: the reply's length says
 * how many, and a reader ignores those it does not know.
 */
#define MS_PROTO_GROUP_STATS_FIELDS_MIN 19
#define MS_PROTO_GROUP_STATS_FIELDS_MAX 64

/* MsProtoGroupStats.features */
#define MS_FEATURE_ANSWERED     (1ULL << 0)     /* ANSWERED requests */

/* ANSWERED_REPLY flags */
#define MS_ANSWERED_LOST        (1U << 0)       /* answers were not kept */

/* MsProtoGroupStats.owner of a group the operator declared */
#define MS_PROTO_OWNER_NONE UINT64_MAX

/*
 * What the broker refused, for its administrator only (a member's STATS
 * says nothing about other groups or their members).  Connections and
 * joins are counted once each, quota refusals per entry.
 */
typedef struct MsProtoBrokerStats {
    uint64_t clients;           /* connections open */
    uint64_t parked;            /* clients gone whose process lives */
    uint64_t groups;
    uint64_t refused_clients;   /* connections: the broker is full */
    uint64_t refused_uid_clients; /* connections: the uid's limit */
    uint64_t refused_access;    /* joins and STATS not allowed to the uid */
    uint64_t refused_no_group;  /* joins of a group not served */
    uint64_t refused_groups;    /* joins: no more groups (total or uid) */
    uint64_t refused_client_quota; /* entries: the client's quota */
    uint64_t refused_uid_quota; /* entries: the uid's quota in a group */
    uint64_t dropped_idle;      /* connections that did not join in time */
    uint64_t dropped_protocol;  /* protocol violations */
    uint64_t reserve_admitted;  /* connections taken into the reserve */
} MsProtoBrokerStats;

#define MS_PROTO_BROKER_STATS_FIELDS 13    /* the uint64_t fields above */

/*
 * A decoded message.  Batch entries are read with the accessors below;
 * they point into the frame given to ms_proto_decode(), which must
 * outlive the message.  Names are copied and NUL-terminated.
 */
typedef struct MsProtoMsg {
    MsProtoType type;
    uint32_t id;
    union {
        struct {
            char group[MS_PROTO_MAX_NAME + 1];
            char name[MS_PROTO_MAX_NAME + 1];
        } hello;
        struct {
            uint32_t page_size;
            uint32_t nslots;
            uint32_t max_refs;          /* the client's quota */
            uint32_t max_lookup;        /* batch caps of this broker */
            uint32_t max_upload;
            uint32_t max_release;
            uint32_t hash_algo;
            uint8_t secret[MS_PROTO_SECRET_SIZE];
        } welcome;
        struct {
            uint32_t count;
            const uint8_t *hashes;      /* count x u64 */
        } lookup;
        struct {
            uint32_t count;
            uint32_t page_size;
            const uint8_t *hashes;      /* count x u64 */
            const uint8_t *pages;       /* count x page_size bytes */
        } upload;
        struct {
            uint32_t count;
            const uint8_t *results;     /* count x (u32 slot, u32 status) */
        } results;                      /* LOOKUP_REPLY and UPLOAD_REPLY */
        struct {
            uint32_t count;
            const uint8_t *entries;     /* count x (u32 slot, u32 refs) */
        } release;
        struct {
            uint64_t released;          /* references dropped */
        } release_reply;
        struct {
            uint32_t count;
            const uint8_t *broker;      /* the broker's record, or NULL */
            const uint8_t *groups;      /* count x stats record */
            uint32_t fields;            /* u64 fields of each record */
        } stats;
        struct {
            uint32_t count;
            uint32_t flags;             /* MS_ANSWERED_* */
            uint64_t unstable_resets;   /* the group's, now */
            const uint8_t *hashes;      /* count x u64 */
        } answered;
        struct {
            uint32_t code;              /* an errno value */
            char message[MS_PROTO_MAX_ERROR + 1];
        } error;
    };
} MsProtoMsg;

const char *ms_proto_type_name(uint32_t type);
const char *ms_proto_status_name(uint32_t status);

/* Most pages of @page_size bytes one UPLOAD frame can carry */
uint32_t ms_proto_max_upload(uint32_t page_size);

/*
 * Check a group or client name: 1 to MS_PROTO_MAX_NAME characters of
 * [A-Za-z0-9._-], not starting with '.' or '-'.
 */
bool ms_proto_name_valid(const char *name, GError **errp);

/*
 * Decode and check the MS_PROTO_HEADER_SIZE bytes at @buf: magic,
 * version, a known type and a payload length within the cap.
 */
bool ms_proto_decode_header(const void *buf, MsProtoHeader *hdr,
                            GError **errp);

/*
 * Decode one whole frame (header and payload, exactly @len bytes) into
 * @msg.  Fails, saying what was wrong, on anything but a well-formed
 * message of a known type.
 */
bool ms_proto_decode(const void *buf, size_t len, MsProtoMsg *msg,
                     GError **errp);

/* Entry @i of a decoded batch (i < count; checked by assertion). */
uint64_t ms_proto_lookup_hash(const MsProtoMsg *msg, uint32_t i);
uint64_t ms_proto_upload_hash(const MsProtoMsg *msg, uint32_t i);
const void *ms_proto_upload_page(const MsProtoMsg *msg, uint32_t i);
MsProtoResult ms_proto_result(const MsProtoMsg *msg, uint32_t i);
uint64_t ms_proto_answered_hash(const MsProtoMsg *msg, uint32_t i);
void ms_proto_release_entry(const MsProtoMsg *msg, uint32_t i,
                            uint32_t *slot, uint32_t *refs);
void ms_proto_group_stats(const MsProtoMsg *msg, uint32_t i,
                          MsProtoGroupStats *gs);
/* The broker's record of a STATS_REPLY: false if it has none */
bool ms_proto_broker_stats(const MsProtoMsg *msg, MsProtoBrokerStats *bs);

/*
 * Encoders: each appends one whole frame to @out.  They assert what the
 * decoder checks (counts, names, sizes): a caller never builds a frame
 * the other side would reject.
 */
void ms_proto_encode_hello(GByteArray *out, uint32_t id, const char *group,
                           const char *name);
void ms_proto_encode_welcome(GByteArray *out, uint32_t id,
                             const MsProtoMsg *welcome);
void ms_proto_encode_lookup(GByteArray *out, uint32_t id,
                            const uint64_t *hashes, uint32_t count);
void ms_proto_encode_upload(GByteArray *out, uint32_t id,
                            const uint64_t *hashes, const void *pages,
                            uint32_t page_size, uint32_t count);
/*
 * An UPLOAD frame without its pages: the sender sends the @count pages
 * right after it (from where they are, without copying them here)
 */
void ms_proto_encode_upload_head(GByteArray *out, uint32_t id,
                                 const uint64_t *hashes, uint32_t page_size,
                                 uint32_t count);
void ms_proto_encode_results(GByteArray *out, uint32_t id, MsProtoType type,
                             const MsProtoResult *results, uint32_t count);
void ms_proto_encode_release(GByteArray *out, uint32_t id,
                             const uint32_t *slots, const uint32_t *refs,
                             uint32_t count);
void ms_proto_encode_release_reply(GByteArray *out, uint32_t id,
                                   uint64_t released);
void ms_proto_encode_stats(GByteArray *out, uint32_t id);
/* @broker may be NULL: the reply then has no broker record */
void ms_proto_encode_stats_reply(GByteArray *out, uint32_t id,
                                 const MsProtoBrokerStats *broker,
                                 const MsProtoGroupStats *groups,
                                 uint32_t count);
void ms_proto_encode_answered(GByteArray *out, uint32_t id);
void ms_proto_encode_answered_reply(GByteArray *out, uint32_t id,
                                    uint32_t flags, uint64_t unstable_resets,
                                    const uint64_t *hashes, uint32_t count);
void ms_proto_encode_error(GByteArray *out, uint32_t id, uint32_t code,
                           const char *message);

#endif /* MEM_SHARE_PROTO_H */
