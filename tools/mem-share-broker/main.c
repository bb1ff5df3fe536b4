/*
 * mem-share-broker: command line, signals and the --stats client
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The daemon runs in the foreground (systemd, or a shell, supervises
 * it) and logs to stderr through GLib's default handler.  SIGTERM and
 * SIGINT end the main loop; the broker then drops every client and
 * removes its socket.  Clients keep their mappings of the stores: the
 * memfds live as long as someone maps them.
 *
 * docs/system/mem-share-broker.rst is the manual.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <inttypes.h>
#include <locale.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <glib-unix.h>

#include "mem-share/broker-client.h"
#include "broker.h"

#define DEFAULT_MAX_STORE (1ULL << 30)

static gboolean on_signal(gpointer opaque)
{
    GMainLoop *loop = opaque;

    g_message("signal received: shutting down");
    g_main_loop_quit(loop);
    return G_SOURCE_CONTINUE;
}

/* SIZE with an optional K, M, G or T suffix (powers of 1024) */
static bool parse_size(const char *s, uint64_t *out, GError **errp)
{
    char *end;
    guint64 v;
    int shift = 0;

    errno = 0;
    v = g_ascii_strtoull(s, &end, 10);
    switch (g_ascii_toupper(*end)) {
    case 'K':
        shift = 10;
        break;
    case 'M':
        shift = 20;
        break;
    case 'G':
        shift = 30;
        break;
    case 'T':
        shift = 40;
        break;
    }
    if (shift) {
        end++;
    }
    if (errno || end == s || *end || v > (UINT64_MAX >> shift)) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--max-store %s: a size in bytes, with an optional K,"
                    " M, G or T suffix, expected", s);
        return false;
    }
    *out = v << shift;
    return true;
}

static void print_broker_stats(const MsProtoBrokerStats *bs)
{
    printf("broker\n");
    printf("  clients               %" PRIu64 "\n", bs->clients);
    printf("  parked                %" PRIu64 "\n", bs->parked);
    printf("  groups                %" PRIu64 "\n", bs->groups);
    printf("  refused-clients       %" PRIu64 "\n", bs->refused_clients);
    printf("  refused-uid-clients   %" PRIu64 "\n", bs->refused_uid_clients);
    printf("  refused-access        %" PRIu64 "\n", bs->refused_access);
    printf("  refused-no-group      %" PRIu64 "\n", bs->refused_no_group);
    printf("  refused-groups        %" PRIu64 "\n", bs->refused_groups);
    printf("  refused-client-quota  %" PRIu64 "\n",
           bs->refused_client_quota);
    printf("  refused-uid-quota     %" PRIu64 "\n", bs->refused_uid_quota);
    printf("  dropped-idle          %" PRIu64 "\n", bs->dropped_idle);
    printf("  dropped-protocol      %" PRIu64 "\n", bs->dropped_protocol);
    printf("  reserve-admitted      %" PRIu64 "\n", bs->reserve_admitted);
}

static void print_stats(const MsProtoGroupStats *gs)
{
    if (gs->owner == MS_PROTO_OWNER_NONE) {
        printf("group %s (declared)\n", gs->name);
    } else {
        printf("group %s (private to uid %" PRIu64 ")\n", gs->name,
               gs->owner);
    }
    printf("  clients       %" PRIu64 "\n", gs->clients);
    printf("  parked        %" PRIu64 "\n", gs->parked);
    printf("  page-size     %" PRIu64 "\n", gs->page_size);
    printf("  slots         %" PRIu64 "\n", gs->slots);
    printf("  slots-used    %" PRIu64 "\n", gs->slots_used);
    printf("  shared-slots  %" PRIu64 "\n", gs->shared_slots);
    printf("  refs          %" PRIu64 "\n", gs->refs);
    printf("  bytes-held    %" PRIu64 "\n", gs->bytes_held);
    printf("  bytes-saved   %" PRIu64 "\n", gs->bytes_saved);
    printf("  lookups       %" PRIu64 "\n", gs->lookups);
    printf("  hits          %" PRIu64 "\n", gs->hits);
    printf("  uploads       %" PRIu64 "\n", gs->uploads);
    printf("  published     %" PRIu64 "\n", gs->published);
    printf("  refused       %" PRIu64 "\n", gs->refused);
    printf("  refused-quota %" PRIu64 "\n", gs->refused_quota);
}

static int stats_main(const char *path, const char *group)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) c = NULL;
    g_autoptr(GArray) groups = NULL;
    MsProtoBrokerStats bs;
    bool has_broker;

    c = group ? ms_broker_client_connect(path, group, "stats", 0, &err)
              : ms_broker_client_open(path, 0, &err);
    if (!c || !ms_broker_client_stats_full(c, &groups, &bs, &has_broker,
                                           &err)) {
        g_printerr("mem-share-broker: %s\n", err->message);
        return 1;
    }
    if (has_broker) {
        print_broker_stats(&bs);
    }
    if (groups->len == 0) {
        printf("no groups\n");
    }
    for (guint i = 0; i < groups->len; i++) {
        print_stats(&g_array_index(groups, MsProtoGroupStats, i));
    }
    return 0;
}

int main(int argc, char **argv)
{
    g_autofree char *socket_path = NULL;
    g_autofree char *mode = NULL;
    g_autofree char *max_store = NULL;
    g_autofree char *stats_group = NULL;
    g_auto(GStrv) group_specs = NULL;
    gint quota = 0, max_clients = 64, max_groups = 16;
    gboolean strict = FALSE, stats = FALSE;
    GOptionEntry entries[] = {
        { "socket", 's', 0, G_OPTION_ARG_FILENAME, &socket_path,
          "UNIX socket to listen on (or, with --stats, to ask)", "PATH" },
        { "socket-mode", 0, 0, G_OPTION_ARG_STRING, &mode,
          "permissions of the socket file (default 0660)", "OCTAL" },
        { "max-store", 0, 0, G_OPTION_ARG_STRING, &max_store,
          "store size of each group (default 1G)", "SIZE" },
        { "client-quota", 0, 0, G_OPTION_ARG_INT, &quota,
          "references one client may hold (default: the store's slots)",
          "N" },
        { "max-clients", 0, 0, G_OPTION_ARG_INT, &max_clients,
          "clients connected at once (default 64)", "N" },
        { "max-groups", 0, 0, G_OPTION_ARG_INT, &max_groups,
          "groups at once (default 16)", "N" },
        { "group", 'g', 0, G_OPTION_ARG_STRING_ARRAY, &group_specs,
          "a group, optionally restricted to some uids (repeatable)",
          "NAME[:uid=UID,...]" },
        { "strict-groups", 0, 0, G_OPTION_ARG_NONE, &strict,
          "serve only the groups given with --group", NULL },
        { "stats", 0, 0, G_OPTION_ARG_NONE, &stats,
          "print the statistics of a running broker and exit", NULL },
        { "stats-group", 0, 0, G_OPTION_ARG_STRING, &stats_group,
          "with --stats: join GROUP and print only its statistics",
          "GROUP" },
        { NULL, 0, 0, 0, NULL, NULL, NULL }
    };
    g_autoptr(GOptionContext) ctx =
        g_option_context_new("- share pages between the VMs of a group");
    g_autoptr(GError) err = NULL;
    g_autoptr(GHashTable) group_uids = ms_broker_group_table_new();
    g_autoptr(MsBroker) broker = NULL;
    g_autoptr(GMainLoop) loop = NULL;
    MsBrokerConfig cfg = {
        .socket_mode = 0660,
        .max_store = DEFAULT_MAX_STORE,
    };

    setlocale(LC_ALL, "");
    g_option_context_add_main_entries(ctx, entries, NULL);
    if (!g_option_context_parse(ctx, &argc, &argv, &err)) {
        g_printerr("mem-share-broker: %s\n", err->message);
        return 2;
    }
    if (!socket_path) {
        g_printerr("mem-share-broker: --socket PATH is required\n");
        return 2;
    }
    if (stats) {
        return stats_main(socket_path, stats_group);
    }
    if (mode) {
        guint64 m;

        if (!g_ascii_string_to_unsigned(mode, 8, 0, 0777, &m, NULL)) {
            g_printerr("mem-share-broker: --socket-mode %s: an octal mode"
                       " from 0 to 0777 expected\n", mode);
            return 2;
        }
        cfg.socket_mode = m;
    }
    if (max_store && !parse_size(max_store, &cfg.max_store, &err)) {
        g_printerr("mem-share-broker: %s\n", err->message);
        return 2;
    }
    if (quota < 0 || max_clients < 1 || max_groups < 1 ||
        max_groups > MS_PROTO_MAX_GROUPS) {
        g_printerr("mem-share-broker: --client-quota must be 0 or more,"
                   " --max-clients at least 1, --max-groups 1 to %d\n",
                   MS_PROTO_MAX_GROUPS);
        return 2;
    }
    for (int i = 0; group_specs && group_specs[i]; i++) {
        if (!ms_broker_parse_group(group_uids, group_specs[i], &err)) {
            g_printerr("mem-share-broker: %s\n", err->message);
            return 2;
        }
    }
    if (strict && g_hash_table_size(group_uids) == 0) {
        g_printerr("mem-share-broker: --strict-groups needs at least one"
                   " --group\n");
        return 2;
    }
    cfg.socket_path = socket_path;
    cfg.client_quota = quota;
    cfg.max_clients = max_clients;
    cfg.max_groups = max_groups;
    cfg.strict_groups = strict;
    cfg.group_uids = group_uids;

    loop = g_main_loop_new(NULL, FALSE);
    g_unix_signal_add(SIGTERM, on_signal, loop);
    g_unix_signal_add(SIGINT, on_signal, loop);
    broker = ms_broker_new(&cfg, &err);
    if (!broker) {
        g_printerr("mem-share-broker: %s\n", err->message);
        return 1;
    }
    g_main_loop_run(loop);
    g_clear_pointer(&broker, ms_broker_free);
    g_message("stopped");
    return 0;
}
