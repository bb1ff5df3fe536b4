/*
 * libFuzzer target: the broker protocol decoder
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The input is one frame as a peer would send it.  The decoder must
 * refuse it or accept it without reading out of bounds (ASan) or
 * undefined behaviour (UBSan); and the wire format has one encoding per
 * message, so a frame it accepts must encode back to the same bytes: a
 * field the decoder lets through unchecked, or reads from the wrong
 * place, shows up as a difference.
 *
 * Built and run by scripts/fuzz.sh (seeds in tests/fuzz/corpus).
 */

#include <stdlib.h>
#include <string.h>
#include <glib.h>

#include "mem-share/proto.h"

/* Encode @msg again, as the peer would have */
static void reencode(GByteArray *out, const MsProtoMsg *msg)
{
    switch (msg->type) {
    case MS_MSG_HELLO:
        ms_proto_encode_hello(out, msg->id, msg->hello.group, msg->hello.name);
        break;
    case MS_MSG_WELCOME:
        ms_proto_encode_welcome(out, msg->id, msg);
        break;
    case MS_MSG_LOOKUP: {
        g_autofree uint64_t *h = g_new(uint64_t, msg->lookup.count);

        for (uint32_t i = 0; i < msg->lookup.count; i++) {
            h[i] = ms_proto_lookup_hash(msg, i);
        }
        ms_proto_encode_lookup(out, msg->id, h, msg->lookup.count);
        break;
    }
    case MS_MSG_UPLOAD: {
        g_autofree uint64_t *h = g_new(uint64_t, msg->upload.count);

        for (uint32_t i = 0; i < msg->upload.count; i++) {
            h[i] = ms_proto_upload_hash(msg, i);
        }
        ms_proto_encode_upload(out, msg->id, h, ms_proto_upload_page(msg, 0),
                               msg->upload.page_size, msg->upload.count);
        break;
    }
    case MS_MSG_LOOKUP_REPLY:
    case MS_MSG_UPLOAD_REPLY: {
        g_autofree MsProtoResult *r = g_new(MsProtoResult,
                                            msg->results.count);

        for (uint32_t i = 0; i < msg->results.count; i++) {
            r[i] = ms_proto_result(msg, i);
        }
        ms_proto_encode_results(out, msg->id, msg->type, r,
                                msg->results.count);
        break;
    }
    case MS_MSG_RELEASE: {
        g_autofree uint32_t *slots = g_new(uint32_t, msg->release.count);
        g_autofree uint32_t *refs = g_new(uint32_t, msg->release.count);

        for (uint32_t i = 0; i < msg->release.count; i++) {
            ms_proto_release_entry(msg, i, &slots[i], &refs[i]);
        }
        ms_proto_encode_release(out, msg->id, slots, refs,
                                msg->release.count);
        break;
    }
    case MS_MSG_RELEASE_REPLY:
        ms_proto_encode_release_reply(out, msg->id,
                                      msg->release_reply.released);
        break;
    case MS_MSG_STATS:
        ms_proto_encode_stats(out, msg->id);
        break;
    case MS_MSG_STATS_REPLY: {
        g_autofree MsProtoGroupStats *gs = g_new0(MsProtoGroupStats,
                                                  msg->stats.count + 1);
        MsProtoBrokerStats bs;
        bool has_broker = ms_proto_broker_stats(msg, &bs);

        for (uint32_t i = 0; i < msg->stats.count; i++) {
            ms_proto_group_stats(msg, i, &gs[i]);
        }
        ms_proto_encode_stats_reply(out, msg->id, has_broker ? &bs : NULL,
                                    gs, msg->stats.count);
        break;
    }
    case MS_MSG_ERROR:
        ms_proto_encode_error(out, msg->id, msg->error.code,
                              msg->error.message);
        break;
    case MS_MSG_ANSWERED:
        ms_proto_encode_answered(out, msg->id);
        break;
    case MS_MSG_ANSWERED_REPLY: {
        g_autofree uint64_t *h = g_new(uint64_t, msg->answered.count + 1);

        for (uint32_t i = 0; i < msg->answered.count; i++) {
            h[i] = ms_proto_answered_hash(msg, i);
        }
        ms_proto_encode_answered_reply(out, msg->id, msg->answered.flags,
                                       msg->answered.unstable_resets, h,
                                       msg->answered.count);
        break;
    }
    default:
        abort();
    }
}

/*
 * A STATS_REPLY of an older or newer broker, encoded again in our
 * layout as @out: the fields we know read the same, those it lacks 0
 */
static void same_stats(const MsProtoMsg *msg, const GByteArray *out)
{
    MsProtoMsg again;

    if (!ms_proto_decode(out->data, out->len, &again, NULL) ||
        again.stats.count != msg->stats.count) {
        abort();
    }
    for (uint32_t i = 0; i < msg->stats.count; i++) {
        MsProtoGroupStats a, b;

        ms_proto_group_stats(msg, i, &a);
        ms_proto_group_stats(&again, i, &b);
        if (memcmp(&a, &b, sizeof(a))) {
            abort();
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    g_autofree uint8_t *copy = NULL;
    MsProtoHeader hdr;
    MsProtoMsg msg;

    if (size >= MS_PROTO_HEADER_SIZE) {
        /* The header alone, as the broker reads it first */
        ms_proto_decode_header(data, &hdr, NULL);
    }
    /* An exact-size copy, so that ASan catches any read past the end */
    copy = g_memdup2(data, size);
    if (!ms_proto_decode(copy, size, &msg, NULL)) {
        return 0;
    }
    reencode(out, &msg);
    if (msg.type == MS_MSG_STATS_REPLY &&
        msg.stats.fields != MS_PROTO_GROUP_STATS_FIELDS) {
        /* Another layout's records: ours must read the same */
        same_stats(&msg, out);
        return 0;
    }
    if (out->len != size || memcmp(out->data, data, size)) {
        abort();
    }
    return 0;
}
