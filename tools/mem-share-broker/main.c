/*
 * mem-share-broker: command line, signals and the --stats client
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The daemon runs in the foreground (systemd, or a shell, supervises
 * it) and logs to stderr through GLib's default handler.  SIGTERM and
 * SIGINT end the main loop; the broker then closes every connection,
 * without freeing a slot (broker.c, client_free()), and removes its
 * socket (unless systemd made it).  Clients keep their mappings of the
 * stores: the memfds live as long as someone maps them.
 *
 * The configuration is the defaults, then the --config key file, then
 * the options, each over the one before (config.c).  SIGHUP builds it
 * again from the same file and options and hands it to the broker,
 * which applies it without dropping anyone; a file that no longer
 * parses leaves the running configuration as it was.
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

/* What the command line said, to build the configuration from, again */
typedef struct Options {
    char *config_path;
    GPtrArray *keys;            /* [broker] keys the options set ... */
    GPtrArray *values;          /* ... and their values */
    GPtrArray *groups;          /* --group specs */
} Options;

typedef struct Daemon {
    Options *opts;
    MsBroker *broker;
    GMainLoop *loop;
} Daemon;

/* --max-clients N and friends: the [broker] key of the same name */
static gboolean on_key_option(const gchar *name, const gchar *value,
                              gpointer data, GError **errp)
{
    Options *o = data;
    const char *key = g_str_has_prefix(name, "--") ? name + 2 : "socket";

    (void)errp;
    if (!strcmp(key, "strict-groups")) {
        value = "true";
    }
    g_ptr_array_add(o->keys, g_strdup(key));
    g_ptr_array_add(o->values, g_strdup(value));
    return TRUE;
}

static gboolean on_group_option(const gchar *name, const gchar *value,
                                gpointer data, GError **errp)
{
    Options *o = data;

    (void)name;
    (void)errp;
    g_ptr_array_add(o->groups, g_strdup(value));
    return TRUE;
}

static bool option_given(const Options *o, const char *key)
{
    for (guint i = 0; i < o->keys->len; i++) {
        if (!strcmp(o->keys->pdata[i], key)) {
            return true;
        }
    }
    return false;
}

/* Defaults, then the file, then the options */
static bool build_config(const Options *o, MsBrokerConfig *cfg,
                         GError **errp)
{
    ms_broker_config_init(cfg);
    if (o->config_path && !ms_broker_config_load(cfg, o->config_path, errp)) {
        return false;
    }
    for (guint i = 0; i < o->keys->len; i++) {
        g_autofree char *where = g_strdup_printf("--%s %s",
                                                 (char *)o->keys->pdata[i],
                                                 (char *)o->values->pdata[i]);

        if (!ms_broker_config_set(cfg, o->keys->pdata[i], o->values->pdata[i],
                                  where, errp)) {
            return false;
        }
    }
    for (guint i = 0; i < o->groups->len; i++) {
        if (!ms_broker_config_add_group(cfg, o->groups->pdata[i], errp)) {
            return false;
        }
    }
    return ms_broker_config_check(cfg, errp);
}

static gboolean on_signal(gpointer opaque)
{
    Daemon *d = opaque;

    g_message("signal received: shutting down");
    g_main_loop_quit(d->loop);
    return G_SOURCE_CONTINUE;
}

static gboolean on_reload(gpointer opaque)
{
    Daemon *d = opaque;
    g_auto(MsBrokerConfig) cfg = { 0 };
    g_autoptr(GError) err = NULL;

    if (!d->broker) {
        return G_SOURCE_CONTINUE;
    }
    if (!d->opts->config_path) {
        g_message("SIGHUP: no --config file: reading the command line"
                  " again (user and group names included)");
    } else {
        g_message("SIGHUP: reloading %s", d->opts->config_path);
    }
    if (!build_config(d->opts, &cfg, &err) ||
        !ms_broker_reconfigure(d->broker, &cfg, &err)) {
        g_warning("reload failed, the running configuration stays: %s",
                  err->message);
        return G_SOURCE_CONTINUE;
    }
    g_message("reload done");
    return G_SOURCE_CONTINUE;
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
    /* Scripts and tests find a group by this line: keep it as it is */
    printf("group %s\n", gs->name);
    if (gs->owner == MS_PROTO_OWNER_NONE) {
        printf("  owner         declared\n");
    } else {
        printf("  owner         uid %" PRIu64 "\n", gs->owner);
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
    printf("  wanted        %" PRIu64 "\n", gs->wanted);
    printf("  resets        %" PRIu64 "\n", gs->unstable_resets);
}

static int stats_main(const char *path, const char *group)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) c = NULL;
    g_autoptr(GArray) groups = NULL;
    MsProtoBrokerStats bs;
    bool has_broker;

    /* It sends no page: any listener may answer, whatever its uid */
    c = group ? ms_broker_client_connect_as(path, MS_BROKER_UID_ANY, group,
                                            "stats", 0, &err)
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

static void options_free(Options *o)
{
    g_free(o->config_path);
    g_ptr_array_unref(o->keys);
    g_ptr_array_unref(o->values);
    g_ptr_array_unref(o->groups);
}

#define KEY_OPTION(name, short_name, help, what) \
    { name, short_name, 0, G_OPTION_ARG_CALLBACK, on_key_option, help, what }

int main(int argc, char **argv)
{
    Options opts = {
        .keys = g_ptr_array_new_with_free_func(g_free),
        .values = g_ptr_array_new_with_free_func(g_free),
        .groups = g_ptr_array_new_with_free_func(g_free),
    };
    g_autofree char *stats_group = NULL;
    gboolean stats = FALSE;
    GOptionEntry entries[] = {
        { "config", 'c', 0, G_OPTION_ARG_FILENAME, &opts.config_path,
          "read the configuration from this key file (default: none;"
          " options given here override its values)", "PATH" },
        KEY_OPTION("socket", 's', "UNIX socket to listen on (or, with"
                   " --stats, to ask); optional when systemd passes the"
                   " socket", "PATH"),
        KEY_OPTION("socket-mode", 0, "permissions of the socket file"
                   " (default 0660; not with systemd's socket)", "OCTAL"),
        KEY_OPTION("max-store", 0, "store size of each group (default"
                   " 1G)", "SIZE"),
        KEY_OPTION("client-quota", 0, "references one client may hold"
                   " (default: half the store's slots)", "N"),
        KEY_OPTION("uid-quota", 0, "pages one uid may store in a group"
                   " that several uids may join (default: half the"
                   " store's slots)", "N"),
        KEY_OPTION("max-clients", 0, "clients connected or parked at"
                   " once (default 64)", "N"),
        KEY_OPTION("max-clients-per-uid", 0, "clients of one uid"
                   " (default: half of --max-clients)", "N"),
        KEY_OPTION("reserved-clients", 0, "more clients past"
                   " --max-clients, for members rejoining (default 8)",
                   "N"),
        KEY_OPTION("max-groups", 0, "private groups at once (default"
                   " 16; declared groups do not count)", "N"),
        KEY_OPTION("max-groups-per-uid", 0, "private groups of one uid"
                   " (default 4)", "N"),
        KEY_OPTION("join-timeout", 0, "seconds a client has to join a"
                   " group before it is disconnected (default 5)",
                   "SECONDS"),
        { "group", 'g', 0, G_OPTION_ARG_CALLBACK, on_group_option,
          "declare a group that the listed uids and gids may join, names"
          " or numbers (repeatable; uid=* lets every uid join)",
          "NAME:uid=LIST[:gid=LIST]" },
        { "strict-groups", 0, G_OPTION_FLAG_NO_ARG, G_OPTION_ARG_CALLBACK,
          on_key_option, "serve only the declared groups: no private"
          " groups", NULL },
        { "stats", 0, 0, G_OPTION_ARG_NONE, &stats,
          "print the statistics of a running broker and exit", NULL },
        { "stats-group", 0, 0, G_OPTION_ARG_STRING, &stats_group,
          "with --stats: join GROUP and print only its statistics",
          "GROUP" },
        { NULL, 0, 0, 0, NULL, NULL, NULL }
    };
    g_autoptr(GOptionContext) ctx =
        g_option_context_new("- share pages between the VMs of a group");
    GOptionGroup *main_group = g_option_group_new(NULL, NULL, NULL, &opts,
                                                  NULL);
    g_autoptr(GError) err = NULL;
    g_auto(MsBrokerConfig) cfg = { 0 };
    g_autoptr(GMainLoop) loop = NULL;
    Daemon d = { .opts = &opts };
    int rc = 0;

    setlocale(LC_ALL, "");
    g_option_group_add_entries(main_group, entries);
    g_option_context_set_main_group(ctx, main_group);
    g_option_context_set_description(ctx,
        "Clients join groups by name.  A name the operator did not declare"
        " is a group\nprivate to the client's uid; declared groups (--group,"
        " or [group NAME] in\nthe --config file) take the uids and gids they"
        " list.  SIGHUP reloads the\nconfiguration.  See mem-share-broker(8)"
        " (docs/system/mem-share-broker.rst).");
    if (!g_option_context_parse(ctx, &argc, &argv, &err)) {
        g_printerr("mem-share-broker: %s\n", err->message);
        options_free(&opts);
        return 2;
    }
    if (argc > 1) {
        g_printerr("mem-share-broker: unexpected argument '%s': options"
                   " only (see --help)\n", argv[1]);
        options_free(&opts);
        return 2;
    }
    if (!build_config(&opts, &cfg, &err)) {
        g_printerr("mem-share-broker: %s\n", err->message);
        options_free(&opts);
        return 2;
    }
    if (stats) {
        if (!cfg.socket_path) {
            g_printerr("mem-share-broker: --stats needs the socket: --socket"
                       " PATH, or socket= in the --config file\n");
            rc = 2;
        } else {
            rc = stats_main(cfg.socket_path, stats_group);
        }
        options_free(&opts);
        return rc;
    }
    if (!ms_broker_socket_from_systemd(&cfg.listen_fd, &err)) {
        g_printerr("mem-share-broker: %s\n", err->message);
        options_free(&opts);
        return 2;
    }
    if (cfg.listen_fd < 0 && !cfg.socket_path) {
        g_printerr("mem-share-broker: no socket to listen on: --socket PATH,"
                   " socket= in the --config file, or a socket systemd"
                   " passes\n");
        options_free(&opts);
        return 2;
    }
    if (cfg.listen_fd >= 0 && option_given(&opts, "socket-mode")) {
        g_warning("--socket-mode is ignored: systemd made the socket"
                  " (SocketMode= in its .socket unit sets the mode)");
    }

    loop = g_main_loop_new(NULL, FALSE);
    d.loop = loop;
    /* Before the socket exists: a SIGHUP must never kill the broker */
    g_unix_signal_add(SIGTERM, on_signal, &d);
    g_unix_signal_add(SIGINT, on_signal, &d);
    g_unix_signal_add(SIGHUP, on_reload, &d);
    d.broker = ms_broker_new(&cfg, &err);
    if (!d.broker) {
        g_printerr("mem-share-broker: %s\n", err->message);
        options_free(&opts);
        /* A value that does not fit is a usage error, as above */
        return err->domain == G_OPTION_ERROR ? 2 : 1;
    }
    g_main_loop_run(loop);
    g_clear_pointer(&d.broker, ms_broker_free);
    g_message("stopped");
    options_free(&opts);
    return 0;
}
