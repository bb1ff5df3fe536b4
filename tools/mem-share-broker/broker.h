/*
 * mem-share-broker: the daemon's core
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * An MsBroker listens on a UNIX socket and serves its clients from the
 * thread-default GLib main context; main.c owns the loop, the options
 * and the signals.  See broker.c for the design.
 */

#ifndef MEM_SHARE_BROKER_H
#define MEM_SHARE_BROKER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>

typedef struct MsBroker MsBroker;

typedef struct MsBrokerConfig {
    const char *socket_path;
    unsigned socket_mode;       /* permissions of the socket file */
    uint64_t max_store;         /* bytes of store per group */
    uint32_t client_quota;      /* references one client may hold */
    uint32_t max_clients;
    uint32_t max_groups;
    bool strict_groups;         /* serve only the groups in @group_uids */
    /* group name -> GArray of uid_t allowed (empty: any uid), or NULL */
    GHashTable *group_uids;
} MsBrokerConfig;

/*
 * Bind the socket (replacing a stale one, refusing to take over a live
 * one) and start serving.  The config is copied.
 */
MsBroker *ms_broker_new(const MsBrokerConfig *cfg, GError **errp);

/* Disconnect every client, free every group, remove the socket file. */
void ms_broker_free(MsBroker *b);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(MsBroker, ms_broker_free)

/*
 * Parse "NAME:uid=1000,1001" (or just "NAME") into @group_uids.  Returns
 * false with a message that says what is allowed.
 */
bool ms_broker_parse_group(GHashTable *group_uids, const char *spec,
                           GError **errp);

/* A GHashTable for ms_broker_parse_group(). */
GHashTable *ms_broker_group_table_new(void);

#endif /* MEM_SHARE_BROKER_H */
