/*
 * Unit tests for the mem-share broker protocol codec
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every message type is encoded, decoded and compared field by field;
 * then each rule of the decoder is broken on purpose, one at a time, by
 * frames built byte by byte here (not by the encoder, which refuses to
 * build them), and each must be rejected with EPROTO.  Every strict
 * prefix of every valid frame, and the frame with one byte more, must be
 * rejected too.
 */

#include <errno.h>
#include <string.h>
#include <glib.h>

#include "mem-share/proto.h"

#define PAGE 4096

/* Raw frame building, independent of the encoder */

static void raw8(GByteArray *b, uint8_t v)
{
    g_byte_array_append(b, &v, 1);
}

static void raw16(GByteArray *b, uint16_t v)
{
    raw8(b, v);
    raw8(b, v >> 8);
}

static void raw32(GByteArray *b, uint32_t v)
{
    raw16(b, v);
    raw16(b, v >> 16);
}

static void raw64(GByteArray *b, uint64_t v)
{
    raw32(b, v);
    raw32(b, v >> 32);
}

static GByteArray *raw_header(uint32_t magic, uint16_t version, uint16_t type,
                              uint32_t length)
{
    GByteArray *b = g_byte_array_new();

    raw32(b, magic);
    raw16(b, version);
    raw16(b, type);
    raw32(b, length);
    raw32(b, 7);
    return b;
}

/* A frame of @type around the payload in @payload (length filled in) */
static GByteArray *raw_frame(uint16_t type, const GByteArray *payload)
{
    GByteArray *b = raw_header(MS_PROTO_MAGIC, MS_PROTO_VERSION, type,
                               payload->len);

    g_byte_array_append(b, payload->data, payload->len);
    return b;
}

static void decode_ok(const GByteArray *f, MsProtoMsg *msg)
{
    g_autoptr(GError) err = NULL;

    g_assert_true(ms_proto_decode(f->data, f->len, msg, &err));
    g_assert_no_error(err);
}

static void decode_bad(const GByteArray *f, const char *why)
{
    g_autoptr(GError) err = NULL;
    MsProtoMsg msg;

    if (ms_proto_decode(f->data, f->len, &msg, &err)) {
        g_error("accepted a frame with %s", why);
    }
    g_assert_error(err, MS_ENGINE_ERROR, EPROTO);
    g_assert_cmpuint(strlen(err->message), >, 0);
    g_assert_false(g_str_has_suffix(err->message, "."));
}

/* Every strict prefix and one trailing byte more must be refused */
static void decode_only_whole(const GByteArray *f)
{
    g_autoptr(GByteArray) longer = g_byte_array_new();
    g_autoptr(GError) err = NULL;
    MsProtoMsg msg;

    for (guint len = 0; len < f->len; len++) {
        g_assert_false(ms_proto_decode(f->data, len, &msg, NULL));
    }
    g_byte_array_append(longer, f->data, f->len);
    raw8(longer, 0);
    g_assert_false(ms_proto_decode(longer->data, longer->len, &msg, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EPROTO);
}

static void fill_page(uint8_t *p, uint32_t seed)
{
    for (int i = 0; i < PAGE; i++) {
        p[i] = seed * 31 + i * 7;
    }
}

/* Round trips */

static void test_hello(void)
{
    g_autoptr(GByteArray) f = g_byte_array_new();
    MsProtoMsg msg;

    ms_proto_encode_hello(f, 42, "group-1", "qemu.vm_2");
    decode_ok(f, &msg);
    g_assert_cmpint(msg.type, ==, MS_MSG_HELLO);
    g_assert_cmpuint(msg.id, ==, 42);
    g_assert_cmpstr(msg.hello.group, ==, "group-1");
    g_assert_cmpstr(msg.hello.name, ==, "qemu.vm_2");
    decode_only_whole(f);
}

static void test_welcome(void)
{
    g_autoptr(GByteArray) f = g_byte_array_new();
    MsProtoMsg w = { .type = MS_MSG_WELCOME }, msg;

    w.welcome.page_size = PAGE;
    w.welcome.nslots = 123456;
    w.welcome.max_refs = 99;
    w.welcome.max_lookup = MS_PROTO_MAX_LOOKUP;
    w.welcome.max_upload = 10;
    w.welcome.max_release = 3;
    w.welcome.hash_algo = MS_PROTO_HASH_XXH3_SECRET;
    for (int i = 0; i < MS_PROTO_SECRET_SIZE; i++) {
        w.welcome.secret[i] = i * 13;
    }
    ms_proto_encode_welcome(f, 1, &w);
    decode_ok(f, &msg);
    g_assert_cmpint(msg.type, ==, MS_MSG_WELCOME);
    g_assert_cmpuint(msg.welcome.page_size, ==, PAGE);
    g_assert_cmpuint(msg.welcome.nslots, ==, 123456);
    g_assert_cmpuint(msg.welcome.max_refs, ==, 99);
    g_assert_cmpuint(msg.welcome.max_lookup, ==, MS_PROTO_MAX_LOOKUP);
    g_assert_cmpuint(msg.welcome.max_upload, ==, 10);
    g_assert_cmpuint(msg.welcome.max_release, ==, 3);
    g_assert_cmpmem(msg.welcome.secret, MS_PROTO_SECRET_SIZE,
                    w.welcome.secret, MS_PROTO_SECRET_SIZE);
    decode_only_whole(f);
}

static void test_lookup(void)
{
    g_autoptr(GByteArray) f = g_byte_array_new();
    uint64_t h[MS_PROTO_MAX_LOOKUP];
    MsProtoMsg msg;

    for (int i = 0; i < MS_PROTO_MAX_LOOKUP; i++) {
        h[i] = 0x0123456789abcdefULL * (i + 1);
    }
    ms_proto_encode_lookup(f, 3, h, MS_PROTO_MAX_LOOKUP);
    decode_ok(f, &msg);
    g_assert_cmpuint(msg.lookup.count, ==, MS_PROTO_MAX_LOOKUP);
    for (int i = 0; i < MS_PROTO_MAX_LOOKUP; i++) {
        g_assert_cmphex(ms_proto_lookup_hash(&msg, i), ==, h[i]);
    }
    g_byte_array_set_size(f, 0);
    ms_proto_encode_lookup(f, 3, h, 2);
    decode_only_whole(f);
}

static void test_upload(void)
{
    g_autoptr(GByteArray) f = g_byte_array_new();
    uint32_t n = ms_proto_max_upload(PAGE);
    g_autofree uint8_t *pages = g_malloc((size_t)n * PAGE);
    g_autofree uint64_t *h = g_new(uint64_t, n);
    MsProtoMsg msg;

    g_assert_cmpuint(n, ==, MS_PROTO_MAX_UPLOAD);
    g_assert_cmpuint(ms_proto_max_upload(65536), ==, 15);
    for (uint32_t i = 0; i < n; i++) {
        fill_page(pages + i * PAGE, i);
        h[i] = ~(uint64_t)i;
    }
    ms_proto_encode_upload(f, 4, h, pages, PAGE, n);
    g_assert_cmpuint(f->len, <=, MS_PROTO_HEADER_SIZE + MS_PROTO_MAX_PAYLOAD);
    decode_ok(f, &msg);
    g_assert_cmpuint(msg.upload.count, ==, n);
    g_assert_cmpuint(msg.upload.page_size, ==, PAGE);
    for (uint32_t i = 0; i < n; i++) {
        g_assert_cmphex(ms_proto_upload_hash(&msg, i), ==, h[i]);
        g_assert_cmpmem(ms_proto_upload_page(&msg, i), PAGE,
                        pages + i * PAGE, PAGE);
    }
    g_byte_array_set_size(f, 0);
    ms_proto_encode_upload(f, 4, h, pages, PAGE, 1);
    decode_only_whole(f);

    /* A head followed by the pages is the same frame, byte for byte */
    {
        g_autoptr(GByteArray) whole = g_byte_array_new();

        ms_proto_encode_upload(whole, 9, h, pages, PAGE, n);
        g_byte_array_set_size(f, 0);
        ms_proto_encode_upload_head(f, 9, h, PAGE, n);
        g_assert_cmpuint(f->len, ==, whole->len - (size_t)n * PAGE);
        g_byte_array_append(f, pages, n * PAGE);
        g_assert_cmpmem(f->data, f->len, whole->data, whole->len);
    }
}

static void test_results(void)
{
    MsProtoResult r[] = {
        { 5, MS_STATUS_OK }, { UINT32_MAX, MS_STATUS_NOT_FOUND },
        { UINT32_MAX, MS_STATUS_BAD_HASH }, { UINT32_MAX, MS_STATUS_FULL },
        { UINT32_MAX, MS_STATUS_QUOTA }, { 0, MS_STATUS_OK },
    };
    MsProtoType types[] = { MS_MSG_LOOKUP_REPLY, MS_MSG_UPLOAD_REPLY };

    for (int t = 0; t < 2; t++) {
        g_autoptr(GByteArray) f = g_byte_array_new();
        MsProtoMsg msg;

        ms_proto_encode_results(f, 9, types[t], r, G_N_ELEMENTS(r));
        decode_ok(f, &msg);
        g_assert_cmpint(msg.type, ==, types[t]);
        g_assert_cmpuint(msg.results.count, ==, G_N_ELEMENTS(r));
        for (guint i = 0; i < G_N_ELEMENTS(r); i++) {
            MsProtoResult got = ms_proto_result(&msg, i);

            g_assert_cmpuint(got.slot, ==, r[i].slot);
            g_assert_cmpuint(got.status, ==, r[i].status);
        }
        decode_only_whole(f);
    }
}

static void test_release(void)
{
    g_autoptr(GByteArray) f = g_byte_array_new();
    g_autoptr(GByteArray) g = g_byte_array_new();
    uint32_t slots[] = { 0, 7, UINT32_MAX - 1 };
    uint32_t refs[] = { 1, 1000, UINT32_MAX };
    MsProtoMsg msg;

    ms_proto_encode_release(f, 11, slots, refs, 3);
    decode_ok(f, &msg);
    g_assert_cmpuint(msg.release.count, ==, 3);
    for (int i = 0; i < 3; i++) {
        uint32_t s, n;

        ms_proto_release_entry(&msg, i, &s, &n);
        g_assert_cmpuint(s, ==, slots[i]);
        g_assert_cmpuint(n, ==, refs[i]);
    }
    decode_only_whole(f);

    ms_proto_encode_release_reply(g, 11, 1ULL << 40);
    decode_ok(g, &msg);
    g_assert_cmpint(msg.type, ==, MS_MSG_RELEASE_REPLY);
    g_assert_cmpuint(msg.release_reply.released, ==, 1ULL << 40);
    decode_only_whole(g);
}

static void test_stats(void)
{
    g_autoptr(GByteArray) req = g_byte_array_new();
    g_autoptr(GByteArray) none = g_byte_array_new();
    g_autoptr(GByteArray) f = g_byte_array_new();
    MsProtoGroupStats gs[2] = {
        { .name = "a", .clients = 1, .page_size = PAGE, .slots = 2,
          .slots_used = 3, .shared_slots = 4, .refs = 5, .bytes_held = 6,
          .bytes_saved = 7, .lookups = 8, .hits = 9, .uploads = 10,
          .published = 11, .refused = 12, .owner = 1000, .parked = 13,
          .refused_quota = 3, .wanted = 14, .unstable_resets = 15,
          .met = 16, .features = MS_FEATURE_ANSWERED },
    };
    const MsProtoBrokerStats bs = {
        .clients = 1, .parked = 2, .groups = 3, .refused_clients = 4,
        .refused_uid_clients = 5, .refused_access = 6,
        .refused_no_group = 7, .refused_groups = 8,
        .refused_client_quota = 9, .refused_uid_quota = 10,
        .dropped_idle = 11, .dropped_protocol = 12,
        .reserve_admitted = UINT64_MAX,
    };
    g_autoptr(GByteArray) fb = g_byte_array_new();
    MsProtoBrokerStats got_bs;
    MsProtoMsg msg;

    memset(gs[1].name, 'x', MS_PROTO_MAX_NAME);
    gs[1].name[MS_PROTO_MAX_NAME] = 0;
    gs[1].refused = UINT64_MAX;
    gs[1].owner = MS_PROTO_OWNER_NONE;

    ms_proto_encode_stats(req, 5);
    decode_ok(req, &msg);
    g_assert_cmpint(msg.type, ==, MS_MSG_STATS);
    decode_only_whole(req);

    ms_proto_encode_stats_reply(none, 5, NULL, NULL, 0);
    decode_ok(none, &msg);
    g_assert_cmpuint(msg.stats.count, ==, 0);
    g_assert_false(ms_proto_broker_stats(&msg, &got_bs));

    /* The broker's record, for its administrator: with or without groups */
    ms_proto_encode_stats_reply(fb, 6, &bs, NULL, 0);
    decode_ok(fb, &msg);
    g_assert_cmpuint(msg.stats.count, ==, 0);
    g_assert_true(ms_proto_broker_stats(&msg, &got_bs));
    g_assert_cmpmem(&got_bs, sizeof(got_bs), &bs, sizeof(bs));
    decode_only_whole(fb);
    g_byte_array_set_size(fb, 0);
    ms_proto_encode_stats_reply(fb, 6, &bs, gs, 2);
    decode_ok(fb, &msg);
    g_assert_cmpuint(msg.stats.count, ==, 2);
    g_assert_true(ms_proto_broker_stats(&msg, &got_bs));
    g_assert_cmpuint(got_bs.reserve_admitted, ==, UINT64_MAX);
    g_assert_cmpuint(got_bs.clients, ==, 1);
    {
        MsProtoGroupStats got;

        ms_proto_group_stats(&msg, 1, &got);
        g_assert_cmpstr(got.name, ==, gs[1].name);
        g_assert_cmpuint(got.owner, ==, MS_PROTO_OWNER_NONE);
    }
    decode_only_whole(fb);

    ms_proto_encode_stats_reply(f, 5, NULL, gs, 2);
    decode_ok(f, &msg);
    g_assert_cmpuint(msg.stats.count, ==, 2);
    g_assert_false(ms_proto_broker_stats(&msg, &got_bs));
    for (int i = 0; i < 2; i++) {
        MsProtoGroupStats got;

        ms_proto_group_stats(&msg, i, &got);
        g_assert_cmpstr(got.name, ==, gs[i].name);
        g_assert_cmpuint(got.clients, ==, gs[i].clients);
        g_assert_cmpuint(got.page_size, ==, gs[i].page_size);
        g_assert_cmpuint(got.slots, ==, gs[i].slots);
        g_assert_cmpuint(got.slots_used, ==, gs[i].slots_used);
        g_assert_cmpuint(got.shared_slots, ==, gs[i].shared_slots);
        g_assert_cmpuint(got.refs, ==, gs[i].refs);
        g_assert_cmpuint(got.bytes_held, ==, gs[i].bytes_held);
        g_assert_cmpuint(got.bytes_saved, ==, gs[i].bytes_saved);
        g_assert_cmpuint(got.lookups, ==, gs[i].lookups);
        g_assert_cmpuint(got.hits, ==, gs[i].hits);
        g_assert_cmpuint(got.uploads, ==, gs[i].uploads);
        g_assert_cmpuint(got.published, ==, gs[i].published);
        g_assert_cmpuint(got.refused, ==, gs[i].refused);
        g_assert_cmpuint(got.owner, ==, gs[i].owner);
        g_assert_cmpuint(got.parked, ==, gs[i].parked);
        g_assert_cmpuint(got.refused_quota, ==, gs[i].refused_quota);
        g_assert_cmpuint(got.wanted, ==, gs[i].wanted);
        g_assert_cmpuint(got.unstable_resets, ==, gs[i].unstable_resets);
        g_assert_cmpuint(got.met, ==, gs[i].met);
        g_assert_cmpuint(got.features, ==, gs[i].features);
    }
    decode_only_whole(f);
}

/*
 * A STATS_REPLY whose @count group records have @fields u64 each, field
 * j of record i being 100 * i + j + 1
 */
static GByteArray *stats_reply_of(uint32_t count, uint32_t fields)
{
    g_autoptr(GByteArray) p = g_byte_array_new();

    raw32(p, count);
    raw32(p, 0);
    for (uint32_t i = 0; i < count; i++) {
        char name[MS_PROTO_MAX_NAME] = "g";

        g_byte_array_append(p, (const guint8 *)name, sizeof(name));
        for (uint32_t j = 0; j < fields; j++) {
            raw64(p, 100 * i + j + 1);
        }
    }
    return raw_frame(MS_MSG_STATS_REPLY, p);
}

/*
 * Group records are as long as the reply says: a broker from before
 * features (19 fields) reads as one without any, a newer one's fields
 * past ours are skipped, and the records still line up.
 */
static void test_stats_layouts(void)
{
    static const struct {
        uint32_t fields;
        uint64_t features;      /* of record 1 */
    } cases[] = {
        { MS_PROTO_GROUP_STATS_FIELDS_MIN, 0 },
        { MS_PROTO_GROUP_STATS_FIELDS, 120 },
        { MS_PROTO_GROUP_STATS_FIELDS + 7, 120 },
        { MS_PROTO_GROUP_STATS_FIELDS_MAX, 120 },
    };

    for (size_t k = 0; k < G_N_ELEMENTS(cases); k++) {
        g_autoptr(GByteArray) f = stats_reply_of(2, cases[k].fields);
        MsProtoGroupStats got;
        MsProtoMsg msg;

        decode_ok(f, &msg);
        g_assert_cmpuint(msg.stats.fields, ==, cases[k].fields);
        ms_proto_group_stats(&msg, 1, &got);
        g_assert_cmpstr(got.name, ==, "g");
        g_assert_cmpuint(got.clients, ==, 101);
        g_assert_cmpuint(got.met, ==, 119);
        g_assert_cmpuint(got.features, ==, cases[k].features);
        decode_only_whole(f);
    }
    for (uint32_t fields = 0; fields < MS_PROTO_GROUP_STATS_FIELDS_MIN;
         fields++) {
        g_autoptr(GByteArray) f = stats_reply_of(2, fields);

        decode_bad(f, "group records shorter than the oldest layout");
    }
    {
        g_autoptr(GByteArray) f =
            stats_reply_of(1, MS_PROTO_GROUP_STATS_FIELDS_MAX + 1);
        g_autoptr(GByteArray) odd = stats_reply_of(2, 20);

        decode_bad(f, "group records longer than any layout may be");
        /* Three more bytes: records of 2 groups no longer divide evenly */
        g_byte_array_set_size(odd, odd->len + 3);
        odd->data[8] += 3;
        decode_bad(odd, "a payload that is not whole records");
    }
}

static void test_answered(void)
{
    const uint64_t hashes[3] = { 1, UINT64_MAX, 0x1234567890abcdefULL };
    g_autoptr(GByteArray) req = g_byte_array_new();
    g_autoptr(GByteArray) f = g_byte_array_new();
    g_autoptr(GByteArray) none = g_byte_array_new();
    MsProtoMsg msg;

    ms_proto_encode_answered(req, 9);
    decode_ok(req, &msg);
    g_assert_cmpint(msg.type, ==, MS_MSG_ANSWERED);
    g_assert_cmpuint(msg.id, ==, 9);
    decode_only_whole(req);

    ms_proto_encode_answered_reply(f, 9, MS_ANSWERED_LOST, 77, hashes, 3);
    decode_ok(f, &msg);
    g_assert_cmpint(msg.type, ==, MS_MSG_ANSWERED_REPLY);
    g_assert_cmpuint(msg.answered.count, ==, 3);
    g_assert_cmpuint(msg.answered.flags, ==, MS_ANSWERED_LOST);
    g_assert_cmpuint(msg.answered.unstable_resets, ==, 77);
    for (uint32_t i = 0; i < 3; i++) {
        g_assert_cmpuint(ms_proto_answered_hash(&msg, i), ==, hashes[i]);
    }
    decode_only_whole(f);

    /* Nothing answered is an answer too */
    ms_proto_encode_answered_reply(none, 10, 0, 0, NULL, 0);
    decode_ok(none, &msg);
    g_assert_cmpuint(msg.answered.count, ==, 0);
    g_assert_cmpuint(msg.answered.flags, ==, 0);
    decode_only_whole(none);
}

static void test_bad_answered(void)
{
    g_autoptr(GByteArray) body = g_byte_array_new();
    g_autoptr(GByteArray) many = g_byte_array_new();
    g_autoptr(GByteArray) flags = g_byte_array_new();
    g_autoptr(GByteArray) f1 = NULL;
    g_autoptr(GByteArray) f2 = NULL;
    g_autoptr(GByteArray) f3 = NULL;
    g_autoptr(GByteArray) f4 = NULL;

    raw8(body, 0);
    f1 = raw_frame(MS_MSG_ANSWERED, body);
    decode_bad(f1, "an ANSWERED request with a payload");

    raw32(many, MS_PROTO_MAX_ANSWERED + 1);
    raw32(many, 0);
    raw64(many, 0);
    g_byte_array_set_size(many, 16 + 8 * (MS_PROTO_MAX_ANSWERED + 1));
    f2 = raw_frame(MS_MSG_ANSWERED_REPLY, many);
    decode_bad(f2, "more hashes than an ANSWERED_REPLY may have");

    raw32(flags, 0);
    raw32(flags, 2);
    raw64(flags, 0);
    f3 = raw_frame(MS_MSG_ANSWERED_REPLY, flags);
    decode_bad(f3, "an unknown ANSWERED_REPLY flag");

    /* Two hashes announced, one there */
    g_byte_array_set_size(flags, 0);
    raw32(flags, 2);
    raw32(flags, 0);
    raw64(flags, 0);
    raw64(flags, 5);
    f4 = raw_frame(MS_MSG_ANSWERED_REPLY, flags);
    decode_bad(f4, "an ANSWERED_REPLY cut short");
}

static void test_error(void)
{
    g_autoptr(GByteArray) f = g_byte_array_new();
    g_autofree char *longmsg = g_strnfill(1000, 'e');
    MsProtoMsg msg;

    ms_proto_encode_error(f, 0, EACCES, "no\x01way\n");
    decode_ok(f, &msg);
    g_assert_cmpint(msg.type, ==, MS_MSG_ERROR);
    g_assert_cmpuint(msg.error.code, ==, EACCES);
    g_assert_cmpstr(msg.error.message, ==, "no?way?");
    decode_only_whole(f);

    g_byte_array_set_size(f, 0);
    ms_proto_encode_error(f, 0, EIO, longmsg);
    decode_ok(f, &msg);
    g_assert_cmpuint(strlen(msg.error.message), ==, MS_PROTO_MAX_ERROR);
}

static void test_names(void)
{
    const char *good[] = { "a", "A0", "_x", "vm-1.group_2", NULL };
    const char *bad[] = { "", ".a", "-a", "a/b", "a b", "a\xc3\xa9", NULL };
    g_autofree char *longest = g_strnfill(MS_PROTO_MAX_NAME, 'n');
    g_autofree char *too_long = g_strnfill(MS_PROTO_MAX_NAME + 1, 'n');

    for (int i = 0; good[i]; i++) {
        g_assert_true(ms_proto_name_valid(good[i], NULL));
    }
    for (int i = 0; bad[i]; i++) {
        g_autoptr(GError) err = NULL;

        g_assert_false(ms_proto_name_valid(bad[i], &err));
        g_assert_nonnull(err);
    }
    g_assert_true(ms_proto_name_valid(longest, NULL));
    g_assert_false(ms_proto_name_valid(too_long, NULL));
}

/* Malformed frames */

static void test_bad_header(void)
{
    struct {
        uint32_t magic;
        uint16_t version, type;
        uint32_t length;
        const char *why;
    } cases[] = {
        { 0x4b42534e, MS_PROTO_VERSION, MS_MSG_STATS, 0, "bad magic" },
        { MS_PROTO_MAGIC, 0, MS_MSG_STATS, 0, "version 0" },
        { MS_PROTO_MAGIC, MS_PROTO_VERSION + 1, MS_MSG_STATS, 0,
          "a newer version" },
        { MS_PROTO_MAGIC, MS_PROTO_VERSION, 0, 0, "type 0" },
        { MS_PROTO_MAGIC, MS_PROTO_VERSION, MS_MSG__MAX, 0, "unknown type" },
        { MS_PROTO_MAGIC, MS_PROTO_VERSION, 0xffff, 0, "type 0xffff" },
        { MS_PROTO_MAGIC, MS_PROTO_VERSION, MS_MSG_LOOKUP,
          MS_PROTO_MAX_PAYLOAD + 1, "an oversized length" },
        { MS_PROTO_MAGIC, MS_PROTO_VERSION, MS_MSG_LOOKUP, UINT32_MAX,
          "length 4 GiB" },
    };

    for (guint i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autoptr(GByteArray) f = raw_header(cases[i].magic, cases[i].version,
                                             cases[i].type, cases[i].length);
        g_autoptr(GError) err = NULL;
        MsProtoHeader hdr;

        g_assert_false(ms_proto_decode_header(f->data, &hdr, &err));
        g_assert_error(err, MS_ENGINE_ERROR, EPROTO);
        decode_bad(f, cases[i].why);
    }
}

static void test_length_mismatch(void)
{
    /* The header says 8 bytes, the frame carries 16 */
    g_autoptr(GByteArray) f = raw_header(MS_PROTO_MAGIC, MS_PROTO_VERSION,
                                         MS_MSG_RELEASE_REPLY, 8);

    raw64(f, 1);
    raw64(f, 2);
    decode_bad(f, "more bytes than its header says");
}

static GByteArray *hello_payload(uint8_t glen, uint8_t nlen, uint16_t rsvd,
                                 const char *group, const char *name)
{
    GByteArray *p = g_byte_array_new();

    raw8(p, glen);
    raw8(p, nlen);
    raw16(p, rsvd);
    g_byte_array_append(p, (const guint8 *)group, strlen(group));
    g_byte_array_append(p, (const guint8 *)name, strlen(name));
    return p;
}

static void test_bad_hello(void)
{
    g_autofree char *n65 = g_strnfill(65, 'n');
    struct {
        uint8_t glen, nlen;
        uint16_t rsvd;
        const char *group, *name, *why;
    } cases[] = {
        { 1, 1, 0, "ga", "n", "lengths not matching the payload" },
        { 0, 1, 0, "", "n", "an empty group" },
        { 1, 0, 0, "g", "", "an empty client name" },
        { 1, 65, 0, "g", n65, "a 65-byte name" },
        { 3, 1, 0, "a/b", "n", "a slash in the group" },
        { 2, 1, 0, ".g", "n", "a group starting with a dot" },
        { 1, 2, 0, "g", "\x01n", "a control byte in the name" },
        { 1, 1, 1, "g", "n", "a non-zero reserved field" },
    };
    g_autoptr(GByteArray) nul = g_byte_array_new();
    g_autoptr(GByteArray) f = NULL;

    for (guint i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autoptr(GByteArray) p = hello_payload(cases[i].glen, cases[i].nlen,
                                                cases[i].rsvd, cases[i].group,
                                                cases[i].name);
        g_autoptr(GByteArray) fr = raw_frame(MS_MSG_HELLO, p);

        decode_bad(fr, cases[i].why);
    }
    /* A NUL inside the group name */
    raw8(nul, 2);
    raw8(nul, 1);
    raw16(nul, 0);
    g_byte_array_append(nul, (const guint8 *)"g\0n", 3);
    f = raw_frame(MS_MSG_HELLO, nul);
    decode_bad(f, "a NUL in the group name");
}

static GByteArray *batch_payload(uint32_t count, uint32_t second,
                                 uint32_t entries, size_t entry_size)
{
    GByteArray *p = g_byte_array_new();

    raw32(p, count);
    raw32(p, second);
    for (uint32_t i = 0; i < entries; i++) {
        for (size_t j = 0; j < entry_size; j++) {
            raw8(p, 1);
        }
    }
    return p;
}

static void bad_batch(uint16_t type, uint32_t count, uint32_t second,
                      uint32_t entries, size_t entry_size, const char *why)
{
    g_autoptr(GByteArray) p = batch_payload(count, second, entries,
                                            entry_size);
    g_autoptr(GByteArray) f = raw_frame(type, p);

    decode_bad(f, why);
}

static void test_bad_batches(void)
{
    uint16_t types[] = { MS_MSG_LOOKUP, MS_MSG_RELEASE, MS_MSG_LOOKUP_REPLY,
                         MS_MSG_UPLOAD_REPLY };
    uint32_t caps[] = { MS_PROTO_MAX_LOOKUP, MS_PROTO_MAX_RELEASE,
                        MS_PROTO_MAX_LOOKUP, MS_PROTO_MAX_UPLOAD };

    for (int t = 0; t < 4; t++) {
        bad_batch(types[t], 0, 0, 0, 8, "a count of zero");
        bad_batch(types[t], caps[t] + 1, 0, caps[t] + 1, 8,
                  "a count over the cap");
        bad_batch(types[t], UINT32_MAX, 0, 1, 8, "a count of 2^32-1");
        bad_batch(types[t], 3, 0, 2, 8, "fewer entries than counted");
        bad_batch(types[t], 2, 0, 3, 8, "more entries than counted");
        bad_batch(types[t], 1, 5, 1, 8, "a non-zero reserved field");
        bad_batch(types[t], 1, 0, 0, 7, "a half entry");
    }
    /* a payload shorter than the count itself */
    {
        g_autoptr(GByteArray) p = g_byte_array_new();
        g_autoptr(GByteArray) f = NULL;

        raw32(p, 1);
        f = raw_frame(MS_MSG_LOOKUP, p);
        decode_bad(f, "a 4-byte LOOKUP");
    }
}

static void bad_pair(uint16_t type, uint32_t a, uint32_t b, const char *why)
{
    g_autoptr(GByteArray) p = g_byte_array_new();
    g_autoptr(GByteArray) f = NULL;

    raw32(p, 1);
    raw32(p, 0);
    raw32(p, a);
    raw32(p, b);
    f = raw_frame(type, p);
    decode_bad(f, why);
}

static void test_bad_entries(void)
{
    bad_pair(MS_MSG_LOOKUP_REPLY, 3, MS_STATUS__MAX, "an unknown status");
    bad_pair(MS_MSG_UPLOAD_REPLY, UINT32_MAX, MS_STATUS_OK,
             "status ok without a slot");
    bad_pair(MS_MSG_LOOKUP_REPLY, 3, MS_STATUS_NOT_FOUND,
             "a slot with status not found");
    bad_pair(MS_MSG_RELEASE, UINT32_MAX, 1, "a release of no slot");
    bad_pair(MS_MSG_RELEASE, 3, 0, "a release of zero references");
}

static void bad_upload(uint32_t count, uint32_t ps, uint32_t entries,
                       uint32_t bytes_per_page, const char *why)
{
    g_autoptr(GByteArray) p = g_byte_array_new();
    g_autoptr(GByteArray) f = NULL;

    raw32(p, count);
    raw32(p, ps);
    for (uint32_t i = 0; i < entries; i++) {
        raw64(p, i);
    }
    g_byte_array_set_size(p, p->len + (size_t)entries * bytes_per_page);
    f = raw_frame(MS_MSG_UPLOAD, p);
    decode_bad(f, why);
}

static void test_bad_upload(void)
{
    bad_upload(0, PAGE, 0, PAGE, "no page");
    bad_upload(MS_PROTO_MAX_UPLOAD + 1, PAGE, MS_PROTO_MAX_UPLOAD + 1, PAGE,
               "one page over the cap");
    bad_upload(1, 3000, 1, 3000, "a page size not a power of two");
    bad_upload(1, 2048, 1, 2048, "pages too small");
    bad_upload(1, 1 << 17, 1, 16, "pages too large");
    bad_upload(1, 0, 1, 0, "pages of zero bytes");
    bad_upload(2, PAGE, 2, PAGE - 1, "short pages");
    bad_upload(1, PAGE, 1, PAGE + 1, "long pages");
    bad_upload(16, 65536, 16, 65536, "a frame over the payload cap");
}

static GByteArray *welcome_payload(uint32_t ps, uint32_t nslots,
                                   uint32_t lookup, uint32_t upload,
                                   uint32_t release, uint32_t algo)
{
    GByteArray *p = g_byte_array_new();

    raw32(p, ps);
    raw32(p, nslots);
    raw32(p, 10);
    raw32(p, lookup);
    raw32(p, upload);
    raw32(p, release);
    raw32(p, algo);
    g_byte_array_set_size(p, p->len + MS_PROTO_SECRET_SIZE);
    return p;
}

static void test_bad_welcome(void)
{
    struct {
        uint32_t ps, nslots, lookup, upload, release, algo;
        const char *why;
    } cases[] = {
        { 4095, 1, 1, 1, 1, 1, "page size not a power of two" },
        { 4096, 0, 1, 1, 1, 1, "no slots" },
        { 4096, UINT32_MAX, 1, 1, 1, 1, "2^32-1 slots" },
        { 4096, 1, 0, 1, 1, 1, "a zero lookup cap" },
        { 4096, 1, 1, MS_PROTO_MAX_UPLOAD + 1, 1, 1, "an upload cap too big" },
        { 4096, 1, 1, 1, MS_PROTO_MAX_RELEASE + 1, 1, "release cap too big" },
        { 4096, 1, 1, 1, 1, 2, "an unknown hash" },
    };
    g_autoptr(GByteArray) good = welcome_payload(4096, 1, 1, 1, 1, 1);
    g_autoptr(GByteArray) gf = raw_frame(MS_MSG_WELCOME, good);
    MsProtoMsg msg;

    decode_ok(gf, &msg);
    for (guint i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autoptr(GByteArray) p = welcome_payload(cases[i].ps,
                                                  cases[i].nslots,
                                                  cases[i].lookup,
                                                  cases[i].upload,
                                                  cases[i].release,
                                                  cases[i].algo);
        g_autoptr(GByteArray) f = raw_frame(MS_MSG_WELCOME, p);

        decode_bad(f, cases[i].why);
    }
}

static void test_bad_stats_and_error(void)
{
    g_autoptr(GByteArray) many = batch_payload(MS_PROTO_MAX_GROUPS + 1, 0,
                                               0, 0);
    g_autoptr(GByteArray) f1 = NULL;
    g_autoptr(GByteArray) f2 = NULL;
    g_autoptr(GByteArray) f3 = NULL;
    g_autoptr(GByteArray) f4 = NULL;
    g_autoptr(GByteArray) f5 = NULL;
    g_autoptr(GByteArray) f6 = NULL;
    g_autoptr(GByteArray) rec = g_byte_array_new();
    g_autoptr(GByteArray) err_long = g_byte_array_new();
    g_autoptr(GByteArray) err_ctl = g_byte_array_new();
    g_autoptr(GByteArray) stats_body = g_byte_array_new();

    f1 = raw_frame(MS_MSG_STATS_REPLY, many);
    decode_bad(f1, "too many groups");

    /* one record whose name has a byte after its NUL */
    raw32(rec, 1);
    raw32(rec, 0);
    raw8(rec, 'g');
    raw8(rec, 0);
    raw8(rec, 'x');
    g_byte_array_set_size(rec, 8 + MS_PROTO_MAX_NAME +
                          8 * MS_PROTO_GROUP_STATS_FIELDS);
    f2 = raw_frame(MS_MSG_STATS_REPLY, rec);
    decode_bad(f2, "a group name not NUL-padded");
    rec->data[8] = 0;
    f3 = raw_frame(MS_MSG_STATS_REPLY, rec);
    decode_bad(f3, "an empty group name");

    raw32(err_long, EIO);
    raw16(err_long, MS_PROTO_MAX_ERROR + 1);
    raw16(err_long, 0);
    g_byte_array_set_size(err_long, 8 + MS_PROTO_MAX_ERROR + 1);
    memset(err_long->data + 8, 'e', MS_PROTO_MAX_ERROR + 1);
    f4 = raw_frame(MS_MSG_ERROR, err_long);
    decode_bad(f4, "an oversized error message");

    raw32(err_ctl, EIO);
    raw16(err_ctl, 2);
    raw16(err_ctl, 0);
    raw8(err_ctl, 'a');
    raw8(err_ctl, '\n');
    f5 = raw_frame(MS_MSG_ERROR, err_ctl);
    decode_bad(f5, "a control byte in an error message");

    raw8(stats_body, 0);
    f6 = raw_frame(MS_MSG_STATS, stats_body);
    decode_bad(f6, "a STATS request with a payload");

    /* Broker records: 0 or 1, and only as many bytes as they take */
    {
        g_autoptr(GByteArray) two = g_byte_array_new();
        g_autoptr(GByteArray) short_rec = g_byte_array_new();
        g_autoptr(GByteArray) f7 = NULL;
        g_autoptr(GByteArray) f8 = NULL;

        raw32(two, 0);
        raw32(two, 2);
        g_byte_array_set_size(two, 8 + 2 * 8 * MS_PROTO_BROKER_STATS_FIELDS);
        f7 = raw_frame(MS_MSG_STATS_REPLY, two);
        decode_bad(f7, "two broker records");
        raw32(short_rec, 0);
        raw32(short_rec, 1);
        g_byte_array_set_size(short_rec,
                              8 + 8 * MS_PROTO_BROKER_STATS_FIELDS - 8);
        f8 = raw_frame(MS_MSG_STATS_REPLY, short_rec);
        decode_bad(f8, "a broker record cut short");
    }
}

/*
 * Flip each byte of valid frames through a few values: the decoder may
 * accept the result (a different valid message) but must then describe
 * a message of the frame's own type and id, never crash, and reject
 * any change to the magic or version.
 */
static void test_mutations(void)
{
    g_autoptr(GPtrArray) frames = g_ptr_array_new_with_free_func(
        (GDestroyNotify)g_byte_array_unref);
    uint64_t h[3] = { 1, 2, 3 };
    uint32_t slots[2] = { 1, 2 }, refs[2] = { 1, 1 };
    MsProtoResult r[2] = { { 1, MS_STATUS_OK },
                           { UINT32_MAX, MS_STATUS_FULL } };
    const uint8_t values[] = { 0x00, 0x01, 0x7f, 0x80, 0xff };
    uint8_t page[PAGE];
    GByteArray *f;

    fill_page(page, 1);
    f = g_byte_array_new();
    ms_proto_encode_hello(f, 1, "grp", "me");
    g_ptr_array_add(frames, f);
    f = g_byte_array_new();
    ms_proto_encode_lookup(f, 1, h, 3);
    g_ptr_array_add(frames, f);
    f = g_byte_array_new();
    ms_proto_encode_release(f, 1, slots, refs, 2);
    g_ptr_array_add(frames, f);
    f = g_byte_array_new();
    ms_proto_encode_results(f, 1, MS_MSG_UPLOAD_REPLY, r, 2);
    g_ptr_array_add(frames, f);
    f = g_byte_array_new();
    ms_proto_encode_upload(f, 1, h, page, PAGE, 1);
    g_byte_array_set_size(f, MS_PROTO_HEADER_SIZE + 16 + 64);   /* truncated */
    g_ptr_array_add(frames, f);

    for (guint k = 0; k < frames->len; k++) {
        GByteArray *fr = frames->pdata[k];
        g_autoptr(GByteArray) copy = g_byte_array_sized_new(fr->len);

        g_byte_array_append(copy, fr->data, fr->len);
        for (guint i = 0; i < MIN(copy->len, 64); i++) {
            uint8_t orig = copy->data[i];

            for (guint v = 0; v < G_N_ELEMENTS(values); v++) {
                MsProtoMsg msg;

                if (values[v] == orig) {
                    continue;
                }
                copy->data[i] = values[v];
                if (ms_proto_decode(copy->data, copy->len, &msg, NULL)) {
                    g_assert_cmpuint(i, >=, 6);
                    g_assert_cmpuint(msg.type, ==,
                                     copy->data[6] | copy->data[7] << 8);
                }
            }
            copy->data[i] = orig;
        }
    }
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/proto/roundtrip/hello", test_hello);
    g_test_add_func("/proto/roundtrip/welcome", test_welcome);
    g_test_add_func("/proto/roundtrip/lookup", test_lookup);
    g_test_add_func("/proto/roundtrip/upload", test_upload);
    g_test_add_func("/proto/roundtrip/results", test_results);
    g_test_add_func("/proto/roundtrip/release", test_release);
    g_test_add_func("/proto/roundtrip/stats", test_stats);
    g_test_add_func("/proto/roundtrip/stats-layouts", test_stats_layouts);
    g_test_add_func("/proto/roundtrip/answered", test_answered);
    g_test_add_func("/proto/roundtrip/error", test_error);
    g_test_add_func("/proto/names", test_names);
    g_test_add_func("/proto/bad/header", test_bad_header);
    g_test_add_func("/proto/bad/length-mismatch", test_length_mismatch);
    g_test_add_func("/proto/bad/hello", test_bad_hello);
    g_test_add_func("/proto/bad/batches", test_bad_batches);
    g_test_add_func("/proto/bad/entries", test_bad_entries);
    g_test_add_func("/proto/bad/upload", test_bad_upload);
    g_test_add_func("/proto/bad/welcome", test_bad_welcome);
    g_test_add_func("/proto/bad/stats-and-error", test_bad_stats_and_error);
    g_test_add_func("/proto/bad/answered", test_bad_answered);
    g_test_add_func("/proto/bad/mutations", test_mutations);
    return g_test_run();
}
