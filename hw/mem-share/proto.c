/*
 * mem-share engine: the broker protocol, encoder and decoder
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every payload has one fixed layout per message type (see
 * docs/devel/broker-protocol.md), so decoding is: check the header, check
 * that the payload length is exactly what the layout and its counts say,
 * check the counts and names, and point into the frame.  The length is
 * computed in 64 bits from counts already capped, so no product can
 * overflow, and nothing is allocated: a hostile peer can make the decoder
 * fail, never make it read out of bounds or grow.
 *
 * Reserved fields must be zero, so that a later version can give them a
 * meaning that an older peer notices instead of silently ignoring.
 */

#include <errno.h>
#include <string.h>

#include "mem-share/proto.h"

#define STATS_RECORD_SIZE(fields) (MS_PROTO_MAX_NAME + 8 * (fields))
#define BROKER_RECORD_SIZE (8 * MS_PROTO_BROKER_STATS_FIELDS)
#define WELCOME_SIZE (7 * 4 + MS_PROTO_SECRET_SIZE)

G_STATIC_ASSERT(MS_PROTO_HEADER_SIZE == 16);
/* A full batch of 4 KiB pages fits in one frame */
G_STATIC_ASSERT(8 + MS_PROTO_MAX_UPLOAD * (8 + MS_PROTO_MIN_PAGE)
                <= MS_PROTO_MAX_PAYLOAD);

static const char *const type_names[MS_MSG__MAX] = {
    [MS_MSG_HELLO] = "HELLO",
    [MS_MSG_WELCOME] = "WELCOME",
    [MS_MSG_LOOKUP] = "LOOKUP",
    [MS_MSG_LOOKUP_REPLY] = "LOOKUP_REPLY",
    [MS_MSG_UPLOAD] = "UPLOAD",
    [MS_MSG_UPLOAD_REPLY] = "UPLOAD_REPLY",
    [MS_MSG_RELEASE] = "RELEASE",
    [MS_MSG_RELEASE_REPLY] = "RELEASE_REPLY",
    [MS_MSG_STATS] = "STATS",
    [MS_MSG_STATS_REPLY] = "STATS_REPLY",
    [MS_MSG_ERROR] = "ERROR",
    [MS_MSG_ANSWERED] = "ANSWERED",
    [MS_MSG_ANSWERED_REPLY] = "ANSWERED_REPLY",
};

static const char *const status_names[MS_STATUS__MAX] = {
    [MS_STATUS_OK] = "ok",
    [MS_STATUS_NOT_FOUND] = "not found",
    [MS_STATUS_BAD_HASH] = "content does not match its hash",
    [MS_STATUS_FULL] = "store full",
    [MS_STATUS_QUOTA] = "reference quota reached",
    [MS_STATUS_WANTED] = "not found, wanted by another member",
};

const char *ms_proto_type_name(uint32_t type)
{
    return type > 0 && type < MS_MSG__MAX ? type_names[type] : "unknown";
}

const char *ms_proto_status_name(uint32_t status)
{
    return status < MS_STATUS__MAX ? status_names[status] : "unknown status";
}

uint32_t ms_proto_max_upload(uint32_t page_size)
{
    g_assert(page_size > 0);
    return MIN(MS_PROTO_MAX_UPLOAD,
               (MS_PROTO_MAX_PAYLOAD - 8) / (8 + page_size));
}

/* Little-endian accessors: the wire is LE whatever the host is */

static uint16_t get16(const uint8_t *p)
{
    return p[0] | (uint16_t)p[1] << 8;
}

static uint32_t get32(const uint8_t *p)
{
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
    return get32(p) | (uint64_t)get32(p + 4) << 32;
}

static void put8(GByteArray *out, uint8_t v)
{
    g_byte_array_append(out, &v, 1);
}

static void put16(GByteArray *out, uint16_t v)
{
    uint8_t b[2] = { v, v >> 8 };

    g_byte_array_append(out, b, sizeof(b));
}

static void put32(GByteArray *out, uint32_t v)
{
    uint8_t b[4] = { v, v >> 8, v >> 16, v >> 24 };

    g_byte_array_append(out, b, sizeof(b));
}

static void put64(GByteArray *out, uint64_t v)
{
    put32(out, v);
    put32(out, v >> 32);
}

static bool fail(GError **errp, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static bool fail(GError **errp, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_propagate_error(errp, g_error_new_valist(MS_ENGINE_ERROR, EPROTO,
                                               fmt, ap));
    va_end(ap);
    return false;
}

static bool name_char_ok(char c, bool first)
{
    if (g_ascii_isalnum(c) || c == '_') {
        return true;
    }
    return !first && (c == '.' || c == '-');
}

/* Check the @len bytes at @p as a name (not NUL-terminated on the wire) */
static bool name_bytes_valid(const uint8_t *p, size_t len, const char *what,
                             GError **errp)
{
    if (len < 1 || len > MS_PROTO_MAX_NAME) {
        return fail(errp, "%s of %zu characters: 1 to %d allowed", what, len,
                    MS_PROTO_MAX_NAME);
    }
    for (size_t i = 0; i < len; i++) {
        if (!name_char_ok(p[i], i == 0)) {
            return fail(errp, "%s has byte 0x%02x at %zu: letters, digits and"
                        " '_' allowed, and '.' or '-' after the first", what,
                        p[i], i);
        }
    }
    return true;
}

bool ms_proto_name_valid(const char *name, GError **errp)
{
    return name_bytes_valid((const uint8_t *)name, strlen(name), "name",
                            errp);
}

bool ms_proto_decode_header(const void *buf, MsProtoHeader *hdr,
                            GError **errp)
{
    const uint8_t *p = buf;

    hdr->magic = get32(p);
    hdr->version = get16(p + 4);
    hdr->type = get16(p + 6);
    hdr->length = get32(p + 8);
    hdr->id = get32(p + 12);
    if (hdr->magic != MS_PROTO_MAGIC) {
        return fail(errp, "bad magic 0x%08x: not a mem-share broker frame",
                    hdr->magic);
    }
    if (hdr->version != MS_PROTO_VERSION) {
        return fail(errp, "protocol version %u: only version %d is spoken",
                    hdr->version, MS_PROTO_VERSION);
    }
    if (hdr->type == 0 || hdr->type >= MS_MSG__MAX) {
        return fail(errp, "unknown message type %u", hdr->type);
    }
    if (hdr->length > MS_PROTO_MAX_PAYLOAD) {
        return fail(errp, "%s payload of %u bytes: at most %u allowed",
                    ms_proto_type_name(hdr->type), hdr->length,
                    MS_PROTO_MAX_PAYLOAD);
    }
    return true;
}

/* The payload must be exactly @want bytes */
static bool check_size(const MsProtoHeader *hdr, uint64_t want, GError **errp)
{
    if (hdr->length != want) {
        return fail(errp, "%s payload of %u bytes: its layout needs %"
                    G_GUINT64_FORMAT, ms_proto_type_name(hdr->type),
                    hdr->length, want);
    }
    return true;
}

static bool check_count(const MsProtoHeader *hdr, uint32_t count,
                        uint32_t max, GError **errp)
{
    if (count < 1 || count > max) {
        return fail(errp, "%s of %u entries: 1 to %u allowed",
                    ms_proto_type_name(hdr->type), count, max);
    }
    return true;
}

static bool check_reserved(const MsProtoHeader *hdr, uint32_t v,
                           GError **errp)
{
    if (v) {
        return fail(errp, "%s has a non-zero reserved field (0x%x)",
                    ms_proto_type_name(hdr->type), v);
    }
    return true;
}

static bool page_size_valid(uint32_t ps)
{
    return ps >= MS_PROTO_MIN_PAGE && ps <= MS_PROTO_MAX_PAGE &&
           !(ps & (ps - 1));
}

static bool decode_hello(const MsProtoHeader *hdr, const uint8_t *p,
                         MsProtoMsg *msg, GError **errp)
{
    uint8_t glen, nlen;

    if (hdr->length < 4) {
        return check_size(hdr, 4, errp);
    }
    glen = p[0];
    nlen = p[1];
    if (!check_reserved(hdr, get16(p + 2), errp) ||
        !check_size(hdr, 4 + (uint32_t)glen + nlen, errp) ||
        !name_bytes_valid(p + 4, glen, "group name", errp) ||
        !name_bytes_valid(p + 4 + glen, nlen, "client name", errp)) {
        return false;
    }
    memcpy(msg->hello.group, p + 4, glen);
    msg->hello.group[glen] = 0;
    memcpy(msg->hello.name, p + 4 + glen, nlen);
    msg->hello.name[nlen] = 0;
    return true;
}

static bool decode_welcome(const MsProtoHeader *hdr, const uint8_t *p,
                           MsProtoMsg *msg, GError **errp)
{
    if (!check_size(hdr, WELCOME_SIZE, errp)) {
        return false;
    }
    msg->welcome.page_size = get32(p);
    msg->welcome.nslots = get32(p + 4);
    msg->welcome.max_refs = get32(p + 8);
    msg->welcome.max_lookup = get32(p + 12);
    msg->welcome.max_upload = get32(p + 16);
    msg->welcome.max_release = get32(p + 20);
    msg->welcome.hash_algo = get32(p + 24);
    memcpy(msg->welcome.secret, p + 28, MS_PROTO_SECRET_SIZE);
    if (!page_size_valid(msg->welcome.page_size)) {
        return fail(errp, "WELCOME with a page size of %u: a power of two"
                    " from %d to %d allowed", msg->welcome.page_size,
                    MS_PROTO_MIN_PAGE, MS_PROTO_MAX_PAGE);
    }
    if (msg->welcome.nslots == 0 || msg->welcome.nslots == UINT32_MAX) {
        return fail(errp, "WELCOME with a store of %u slots",
                    msg->welcome.nslots);
    }
    if (msg->welcome.max_lookup < 1 ||
        msg->welcome.max_lookup > MS_PROTO_MAX_LOOKUP ||
        msg->welcome.max_upload < 1 ||
        msg->welcome.max_upload > MS_PROTO_MAX_UPLOAD ||
        msg->welcome.max_release < 1 ||
        msg->welcome.max_release > MS_PROTO_MAX_RELEASE) {
        return fail(errp, "WELCOME with batch caps %u/%u/%u: 1 to %d/%d/%d"
                    " allowed", msg->welcome.max_lookup,
                    msg->welcome.max_upload, msg->welcome.max_release,
                    MS_PROTO_MAX_LOOKUP, MS_PROTO_MAX_UPLOAD,
                    MS_PROTO_MAX_RELEASE);
    }
    if (msg->welcome.hash_algo != MS_PROTO_HASH_XXH3_SECRET) {
        return fail(errp, "WELCOME with hash algorithm %u: only %d (keyed"
                    " XXH3-64) is known", msg->welcome.hash_algo,
                    MS_PROTO_HASH_XXH3_SECRET);
    }
    return true;
}

/* u32 count, u32 reserved, then @count entries of @entry bytes */
static bool decode_batch(const MsProtoHeader *hdr, const uint8_t *p,
                         uint32_t max, size_t entry, uint32_t *count,
                         const uint8_t **entries, GError **errp)
{
    if (hdr->length < 8) {
        return check_size(hdr, 8, errp);
    }
    *count = get32(p);
    if (!check_reserved(hdr, get32(p + 4), errp) ||
        !check_count(hdr, *count, max, errp) ||
        !check_size(hdr, 8 + (uint64_t)*count * entry, errp)) {
        return false;
    }
    *entries = p + 8;
    return true;
}

static bool decode_upload(const MsProtoHeader *hdr, const uint8_t *p,
                          MsProtoMsg *msg, GError **errp)
{
    uint32_t count, ps;

    if (hdr->length < 8) {
        return check_size(hdr, 8, errp);
    }
    count = get32(p);
    ps = get32(p + 4);
    if (!check_count(hdr, count, MS_PROTO_MAX_UPLOAD, errp)) {
        return false;
    }
    if (!page_size_valid(ps)) {
        return fail(errp, "UPLOAD of pages of %u bytes: a power of two from"
                    " %d to %d allowed", ps, MS_PROTO_MIN_PAGE,
                    MS_PROTO_MAX_PAGE);
    }
    if (!check_size(hdr, 8 + (uint64_t)count * (8 + ps), errp)) {
        return false;
    }
    msg->upload.count = count;
    msg->upload.page_size = ps;
    msg->upload.hashes = p + 8;
    msg->upload.pages = p + 8 + (size_t)count * 8;
    return true;
}

static bool decode_results(const MsProtoHeader *hdr, const uint8_t *p,
                           MsProtoMsg *msg, GError **errp)
{
    uint32_t max = hdr->type == MS_MSG_UPLOAD_REPLY ? MS_PROTO_MAX_UPLOAD
                                                    : MS_PROTO_MAX_LOOKUP;

    if (!decode_batch(hdr, p, max, 8, &msg->results.count,
                      &msg->results.results, errp)) {
        return false;
    }
    for (uint32_t i = 0; i < msg->results.count; i++) {
        MsProtoResult r = ms_proto_result(msg, i);

        if (r.status >= MS_STATUS__MAX) {
            return fail(errp, "%s entry %u has unknown status %u",
                        ms_proto_type_name(hdr->type), i, r.status);
        }
        if ((r.status == MS_STATUS_OK) != (r.slot != UINT32_MAX)) {
            return fail(errp, "%s entry %u: slot %u with status %u",
                        ms_proto_type_name(hdr->type), i, r.slot, r.status);
        }
    }
    return true;
}

static bool decode_release(const MsProtoHeader *hdr, const uint8_t *p,
                           MsProtoMsg *msg, GError **errp)
{
    if (!decode_batch(hdr, p, MS_PROTO_MAX_RELEASE, 8, &msg->release.count,
                      &msg->release.entries, errp)) {
        return false;
    }
    for (uint32_t i = 0; i < msg->release.count; i++) {
        uint32_t slot, refs;

        ms_proto_release_entry(msg, i, &slot, &refs);
        if (slot == UINT32_MAX || refs == 0) {
            return fail(errp, "RELEASE entry %u of %u references to slot %u:"
                        " a slot and at least one reference needed", i, refs,
                        slot);
        }
    }
    return true;
}

/*
 * How many fields the group records of a STATS_REPLY have: what the
 * rest of the payload divides into, MIN to MAX (older brokers send
 * fewer fields, newer ones may send more).  No groups, no records.
 */
static bool stats_fields(const MsProtoHeader *hdr, uint32_t broker,
                         MsProtoMsg *msg, GError **errp)
{
    uint64_t head = 8 + (uint64_t)broker * BROKER_RECORD_SIZE;
    uint64_t rest = hdr->length - MIN(hdr->length, head), rec;
    uint32_t count = msg->stats.count;

    msg->stats.fields = MS_PROTO_GROUP_STATS_FIELDS;
    if (!count || hdr->length < head) {
        return check_size(hdr, head, errp);
    }
    rec = rest / count;
    if (rest % count || (rec - STATS_RECORD_SIZE(0)) % 8 ||
        rec < STATS_RECORD_SIZE(MS_PROTO_GROUP_STATS_FIELDS_MIN) ||
        rec > STATS_RECORD_SIZE(MS_PROTO_GROUP_STATS_FIELDS_MAX)) {
        return fail(errp, "STATS_REPLY of %u groups in %u bytes: a group "
                    "record is a %d-byte name and %d to %d u64 fields",
                    count, hdr->length, MS_PROTO_MAX_NAME,
                    MS_PROTO_GROUP_STATS_FIELDS_MIN,
                    MS_PROTO_GROUP_STATS_FIELDS_MAX);
    }
    msg->stats.fields = (rec - STATS_RECORD_SIZE(0)) / 8;
    return true;
}

static bool decode_answered_reply(const MsProtoHeader *hdr, const uint8_t *p,
                                  MsProtoMsg *msg, GError **errp)
{
    if (hdr->length < 16) {
        return check_size(hdr, 16, errp);
    }
    msg->answered.count = get32(p);
    msg->answered.flags = get32(p + 4);
    msg->answered.unstable_resets = get64(p + 8);
    msg->answered.hashes = p + 16;
    /* Zero is a valid answer: nothing was answered */
    if (msg->answered.count > MS_PROTO_MAX_ANSWERED) {
        return fail(errp, "ANSWERED_REPLY of %u hashes: at most %d allowed",
                    msg->answered.count, MS_PROTO_MAX_ANSWERED);
    }
    if (msg->answered.flags & ~MS_ANSWERED_LOST) {
        return fail(errp, "ANSWERED_REPLY with unknown flags 0x%x",
                    msg->answered.flags);
    }
    return check_size(hdr, 16 + (uint64_t)msg->answered.count * 8, errp);
}

static bool decode_stats_reply(const MsProtoHeader *hdr, const uint8_t *p,
                               MsProtoMsg *msg, GError **errp)
{
    uint32_t broker;

    if (hdr->length < 8) {
        return check_size(hdr, 8, errp);
    }
    msg->stats.count = get32(p);
    broker = get32(p + 4);
    /* Zero groups is a valid answer: a broker that serves none yet */
    if (msg->stats.count > MS_PROTO_MAX_GROUPS) {
        return fail(errp, "STATS_REPLY of %u groups: at most %d allowed",
                    msg->stats.count, MS_PROTO_MAX_GROUPS);
    }
    if (broker > 1) {
        return fail(errp, "STATS_REPLY with %u broker records: 0 or 1"
                    " allowed", broker);
    }
    if (!stats_fields(hdr, broker, msg, errp)) {
        return false;
    }
    msg->stats.broker = broker ? p + 8 : NULL;
    msg->stats.groups = p + 8 + broker * BROKER_RECORD_SIZE;
    for (uint32_t i = 0; i < msg->stats.count; i++) {
        const uint8_t *rec = msg->stats.groups +
                             (size_t)i * STATS_RECORD_SIZE(msg->stats.fields);
        size_t len = strnlen((const char *)rec, MS_PROTO_MAX_NAME);

        /* NUL-padded: nothing but zeros after the name */
        for (size_t j = len; j < MS_PROTO_MAX_NAME; j++) {
            if (rec[j]) {
                return fail(errp, "STATS_REPLY group %u: name not NUL-padded",
                            i);
            }
        }
        if (!name_bytes_valid(rec, len, "group name", errp)) {
            return false;
        }
    }
    return true;
}

static bool decode_error(const MsProtoHeader *hdr, const uint8_t *p,
                         MsProtoMsg *msg, GError **errp)
{
    uint16_t len;

    if (hdr->length < 8) {
        return check_size(hdr, 8, errp);
    }
    msg->error.code = get32(p);
    len = get16(p + 4);
    if (!check_reserved(hdr, get16(p + 6), errp)) {
        return false;
    }
    if (len > MS_PROTO_MAX_ERROR) {
        return fail(errp, "ERROR message of %u bytes: at most %d allowed",
                    len, MS_PROTO_MAX_ERROR);
    }
    if (!check_size(hdr, 8 + (uint32_t)len, errp)) {
        return false;
    }
    for (uint16_t i = 0; i < len; i++) {
        if (p[8 + i] < 0x20 || p[8 + i] > 0x7e) {
            return fail(errp, "ERROR message has byte 0x%02x at %u: printable"
                        " ASCII allowed", p[8 + i], i);
        }
    }
    memcpy(msg->error.message, p + 8, len);
    msg->error.message[len] = 0;
    return true;
}

bool ms_proto_decode(const void *buf, size_t len, MsProtoMsg *msg,
                     GError **errp)
{
    const uint8_t *p;
    MsProtoHeader hdr;

    memset(msg, 0, sizeof(*msg));
    if (len < MS_PROTO_HEADER_SIZE) {
        return fail(errp, "frame of %zu bytes: shorter than its %d-byte"
                    " header", len, MS_PROTO_HEADER_SIZE);
    }
    p = (const uint8_t *)buf + MS_PROTO_HEADER_SIZE;
    if (!ms_proto_decode_header(buf, &hdr, errp)) {
        return false;
    }
    if (len - MS_PROTO_HEADER_SIZE != hdr.length) {
        return fail(errp, "%s frame of %zu bytes: its header says %u of"
                    " payload", ms_proto_type_name(hdr.type), len,
                    hdr.length);
    }
    msg->type = hdr.type;
    msg->id = hdr.id;
    switch (hdr.type) {
    case MS_MSG_HELLO:
        return decode_hello(&hdr, p, msg, errp);
    case MS_MSG_WELCOME:
        return decode_welcome(&hdr, p, msg, errp);
    case MS_MSG_LOOKUP:
        return decode_batch(&hdr, p, MS_PROTO_MAX_LOOKUP, 8,
                            &msg->lookup.count, &msg->lookup.hashes, errp);
    case MS_MSG_UPLOAD:
        return decode_upload(&hdr, p, msg, errp);
    case MS_MSG_LOOKUP_REPLY:
    case MS_MSG_UPLOAD_REPLY:
        return decode_results(&hdr, p, msg, errp);
    case MS_MSG_RELEASE:
        return decode_release(&hdr, p, msg, errp);
    case MS_MSG_RELEASE_REPLY:
        if (!check_size(&hdr, 8, errp)) {
            return false;
        }
        msg->release_reply.released = get64(p);
        return true;
    case MS_MSG_STATS:
        return check_size(&hdr, 0, errp);
    case MS_MSG_STATS_REPLY:
        return decode_stats_reply(&hdr, p, msg, errp);
    case MS_MSG_ERROR:
        return decode_error(&hdr, p, msg, errp);
    case MS_MSG_ANSWERED:
        return check_size(&hdr, 0, errp);
    case MS_MSG_ANSWERED_REPLY:
        return decode_answered_reply(&hdr, p, msg, errp);
    default:
        g_assert_not_reached();     /* ms_proto_decode_header() checked */
    }
}

uint64_t ms_proto_lookup_hash(const MsProtoMsg *msg, uint32_t i)
{
    g_assert(msg->type == MS_MSG_LOOKUP && i < msg->lookup.count);
    return get64(msg->lookup.hashes + (size_t)i * 8);
}

uint64_t ms_proto_upload_hash(const MsProtoMsg *msg, uint32_t i)
{
    g_assert(msg->type == MS_MSG_UPLOAD && i < msg->upload.count);
    return get64(msg->upload.hashes + (size_t)i * 8);
}

const void *ms_proto_upload_page(const MsProtoMsg *msg, uint32_t i)
{
    g_assert(msg->type == MS_MSG_UPLOAD && i < msg->upload.count);
    return msg->upload.pages + (size_t)i * msg->upload.page_size;
}

MsProtoResult ms_proto_result(const MsProtoMsg *msg, uint32_t i)
{
    const uint8_t *e;

    g_assert((msg->type == MS_MSG_LOOKUP_REPLY ||
              msg->type == MS_MSG_UPLOAD_REPLY) && i < msg->results.count);
    e = msg->results.results + (size_t)i * 8;
    return (MsProtoResult) { .slot = get32(e), .status = get32(e + 4) };
}

uint64_t ms_proto_answered_hash(const MsProtoMsg *msg, uint32_t i)
{
    g_assert(msg->type == MS_MSG_ANSWERED_REPLY && i < msg->answered.count);
    return get64(msg->answered.hashes + (size_t)i * 8);
}

void ms_proto_release_entry(const MsProtoMsg *msg, uint32_t i,
                            uint32_t *slot, uint32_t *refs)
{
    const uint8_t *e;

    g_assert(msg->type == MS_MSG_RELEASE && i < msg->release.count);
    e = msg->release.entries + (size_t)i * 8;
    *slot = get32(e);
    *refs = get32(e + 4);
}

void ms_proto_group_stats(const MsProtoMsg *msg, uint32_t i,
                          MsProtoGroupStats *gs)
{
    const uint8_t *rec, *f;
    uint64_t *fields[MS_PROTO_GROUP_STATS_FIELDS] = {
        &gs->clients, &gs->page_size, &gs->slots, &gs->slots_used,
        &gs->shared_slots, &gs->refs, &gs->bytes_held, &gs->bytes_saved,
        &gs->lookups, &gs->hits, &gs->uploads, &gs->published, &gs->refused,
        &gs->owner, &gs->parked, &gs->refused_quota, &gs->wanted,
        &gs->unstable_resets, &gs->met, &gs->features,
    };

    g_assert(msg->type == MS_MSG_STATS_REPLY && i < msg->stats.count);
    memset(gs, 0, sizeof(*gs));
    rec = msg->stats.groups + (size_t)i * STATS_RECORD_SIZE(msg->stats.fields);
    memcpy(gs->name, rec, MS_PROTO_MAX_NAME);
    gs->name[MS_PROTO_MAX_NAME] = 0;
    f = rec + MS_PROTO_MAX_NAME;
    /* Fields this side does not know are skipped, missing ones are 0 */
    for (uint32_t j = 0; j < MIN(msg->stats.fields,
                                 MS_PROTO_GROUP_STATS_FIELDS); j++) {
        *fields[j] = get64(f + 8 * j);
    }
}

bool ms_proto_broker_stats(const MsProtoMsg *msg, MsProtoBrokerStats *bs)
{
    uint64_t *fields[MS_PROTO_BROKER_STATS_FIELDS] = {
        &bs->clients, &bs->parked, &bs->groups, &bs->refused_clients,
        &bs->refused_uid_clients, &bs->refused_access, &bs->refused_no_group,
        &bs->refused_groups, &bs->refused_client_quota,
        &bs->refused_uid_quota, &bs->dropped_idle, &bs->dropped_protocol,
        &bs->reserve_admitted,
    };

    g_assert(msg->type == MS_MSG_STATS_REPLY);
    memset(bs, 0, sizeof(*bs));
    if (!msg->stats.broker) {
        return false;
    }
    for (int j = 0; j < MS_PROTO_BROKER_STATS_FIELDS; j++) {
        *fields[j] = get64(msg->stats.broker + 8 * j);
    }
    return true;
}

/* Encoding: a header with a length to patch once the payload is there */

static guint begin(GByteArray *out, uint32_t id, MsProtoType type)
{
    guint start = out->len;

    put32(out, MS_PROTO_MAGIC);
    put16(out, MS_PROTO_VERSION);
    put16(out, type);
    put32(out, 0);
    put32(out, id);
    return start;
}

/* Set the length of the frame at @start: its bytes in @out and @more */
static void end_with(GByteArray *out, guint start, uint32_t more)
{
    uint32_t len = out->len - start - MS_PROTO_HEADER_SIZE + more;
    uint8_t *p = out->data + start + 8;

    g_assert(len <= MS_PROTO_MAX_PAYLOAD);
    p[0] = len;
    p[1] = len >> 8;
    p[2] = len >> 16;
    p[3] = len >> 24;
}

static void end(GByteArray *out, guint start)
{
    end_with(out, start, 0);
}

void ms_proto_encode_hello(GByteArray *out, uint32_t id, const char *group,
                           const char *name)
{
    guint start = begin(out, id, MS_MSG_HELLO);

    g_assert(ms_proto_name_valid(group, NULL) &&
             ms_proto_name_valid(name, NULL));
    put8(out, strlen(group));
    put8(out, strlen(name));
    put16(out, 0);
    g_byte_array_append(out, (const guint8 *)group, strlen(group));
    g_byte_array_append(out, (const guint8 *)name, strlen(name));
    end(out, start);
}

void ms_proto_encode_welcome(GByteArray *out, uint32_t id,
                             const MsProtoMsg *w)
{
    guint start = begin(out, id, MS_MSG_WELCOME);

    g_assert(page_size_valid(w->welcome.page_size));
    put32(out, w->welcome.page_size);
    put32(out, w->welcome.nslots);
    put32(out, w->welcome.max_refs);
    put32(out, w->welcome.max_lookup);
    put32(out, w->welcome.max_upload);
    put32(out, w->welcome.max_release);
    put32(out, w->welcome.hash_algo);
    g_byte_array_append(out, w->welcome.secret, MS_PROTO_SECRET_SIZE);
    end(out, start);
}

void ms_proto_encode_lookup(GByteArray *out, uint32_t id,
                            const uint64_t *hashes, uint32_t count)
{
    guint start = begin(out, id, MS_MSG_LOOKUP);

    g_assert(count >= 1 && count <= MS_PROTO_MAX_LOOKUP);
    put32(out, count);
    put32(out, 0);
    for (uint32_t i = 0; i < count; i++) {
        put64(out, hashes[i]);
    }
    end(out, start);
}

void ms_proto_encode_upload_head(GByteArray *out, uint32_t id,
                                 const uint64_t *hashes, uint32_t page_size,
                                 uint32_t count)
{
    guint start = begin(out, id, MS_MSG_UPLOAD);

    g_assert(count >= 1 && count <= MS_PROTO_MAX_UPLOAD);
    g_assert(page_size_valid(page_size));
    put32(out, count);
    put32(out, page_size);
    for (uint32_t i = 0; i < count; i++) {
        put64(out, hashes[i]);
    }
    /* The length counts the pages that follow the head */
    end_with(out, start, count * page_size);
}

void ms_proto_encode_upload(GByteArray *out, uint32_t id,
                            const uint64_t *hashes, const void *pages,
                            uint32_t page_size, uint32_t count)
{
    ms_proto_encode_upload_head(out, id, hashes, page_size, count);
    g_byte_array_append(out, pages, (guint)count * page_size);
}

void ms_proto_encode_results(GByteArray *out, uint32_t id, MsProtoType type,
                             const MsProtoResult *results, uint32_t count)
{
    guint start = begin(out, id, type);

    g_assert(type == MS_MSG_LOOKUP_REPLY || type == MS_MSG_UPLOAD_REPLY);
    g_assert(count >= 1 && count <= (type == MS_MSG_UPLOAD_REPLY ?
                                     MS_PROTO_MAX_UPLOAD :
                                     MS_PROTO_MAX_LOOKUP));
    put32(out, count);
    put32(out, 0);
    for (uint32_t i = 0; i < count; i++) {
        g_assert((results[i].status == MS_STATUS_OK) ==
                 (results[i].slot != UINT32_MAX));
        put32(out, results[i].slot);
        put32(out, results[i].status);
    }
    end(out, start);
}

void ms_proto_encode_release(GByteArray *out, uint32_t id,
                             const uint32_t *slots, const uint32_t *refs,
                             uint32_t count)
{
    guint start = begin(out, id, MS_MSG_RELEASE);

    g_assert(count >= 1 && count <= MS_PROTO_MAX_RELEASE);
    put32(out, count);
    put32(out, 0);
    for (uint32_t i = 0; i < count; i++) {
        g_assert(slots[i] != UINT32_MAX && refs[i] > 0);
        put32(out, slots[i]);
        put32(out, refs[i]);
    }
    end(out, start);
}

void ms_proto_encode_release_reply(GByteArray *out, uint32_t id,
                                   uint64_t released)
{
    guint start = begin(out, id, MS_MSG_RELEASE_REPLY);

    put64(out, released);
    end(out, start);
}

void ms_proto_encode_stats(GByteArray *out, uint32_t id)
{
    end(out, begin(out, id, MS_MSG_STATS));
}

void ms_proto_encode_stats_reply(GByteArray *out, uint32_t id,
                                 const MsProtoBrokerStats *broker,
                                 const MsProtoGroupStats *groups,
                                 uint32_t count)
{
    guint start = begin(out, id, MS_MSG_STATS_REPLY);

    g_assert(count <= MS_PROTO_MAX_GROUPS);
    put32(out, count);
    put32(out, broker != NULL);
    if (broker) {
        const uint64_t fields[MS_PROTO_BROKER_STATS_FIELDS] = {
            broker->clients, broker->parked, broker->groups,
            broker->refused_clients, broker->refused_uid_clients,
            broker->refused_access, broker->refused_no_group,
            broker->refused_groups, broker->refused_client_quota,
            broker->refused_uid_quota, broker->dropped_idle,
            broker->dropped_protocol, broker->reserve_admitted,
        };

        for (int j = 0; j < MS_PROTO_BROKER_STATS_FIELDS; j++) {
            put64(out, fields[j]);
        }
    }
    for (uint32_t i = 0; i < count; i++) {
        const MsProtoGroupStats *gs = &groups[i];
        uint8_t name[MS_PROTO_MAX_NAME] = { 0 };
        const uint64_t fields[MS_PROTO_GROUP_STATS_FIELDS] = {
            gs->clients, gs->page_size, gs->slots, gs->slots_used,
            gs->shared_slots, gs->refs, gs->bytes_held, gs->bytes_saved,
            gs->lookups, gs->hits, gs->uploads, gs->published, gs->refused,
            gs->owner, gs->parked, gs->refused_quota, gs->wanted,
            gs->unstable_resets, gs->met, gs->features,
        };

        g_assert(ms_proto_name_valid(gs->name, NULL));
        memcpy(name, gs->name, strlen(gs->name));
        g_byte_array_append(out, name, sizeof(name));
        for (int j = 0; j < MS_PROTO_GROUP_STATS_FIELDS; j++) {
            put64(out, fields[j]);
        }
    }
    end(out, start);
}

void ms_proto_encode_answered(GByteArray *out, uint32_t id)
{
    end(out, begin(out, id, MS_MSG_ANSWERED));
}

void ms_proto_encode_answered_reply(GByteArray *out, uint32_t id,
                                    uint32_t flags, uint64_t unstable_resets,
                                    const uint64_t *hashes, uint32_t count)
{
    guint start = begin(out, id, MS_MSG_ANSWERED_REPLY);

    g_assert(count <= MS_PROTO_MAX_ANSWERED && !(flags & ~MS_ANSWERED_LOST));
    put32(out, count);
    put32(out, flags);
    put64(out, unstable_resets);
    for (uint32_t i = 0; i < count; i++) {
        put64(out, hashes[i]);
    }
    end(out, start);
}

void ms_proto_encode_error(GByteArray *out, uint32_t id, uint32_t code,
                           const char *message)
{
    guint start = begin(out, id, MS_MSG_ERROR);
    size_t len = MIN(strlen(message), MS_PROTO_MAX_ERROR);

    put32(out, code);
    put16(out, len);
    put16(out, 0);
    /* Printable only: the message may quote what a hostile peer sent */
    for (size_t i = 0; i < len; i++) {
        char c = message[i];

        put8(out, c >= 0x20 && c <= 0x7e ? c : '?');
    }
    end(out, start);
}
