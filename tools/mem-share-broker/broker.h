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

/* Who may join a group the operator declared */
typedef struct MsBrokerGroupDecl {
    bool any_uid;               /* uids=*: every uid that can connect */
    GArray *uids;               /* uid_t */
    GArray *gids;               /* gid_t: the client's gid or one of its
                                 * supplementary groups */
} MsBrokerGroupDecl;

/*
 * Everything an operator sets (config.c).  Zero for the quotas and
 * max_clients_per_uid means the default, derived from the store's size
 * and max_clients (broker.c, "Limits").
 */
typedef struct MsBrokerConfig {
    char *socket_path;          /* optional with socket activation */
    unsigned socket_mode;       /* permissions of the socket file */
    int listen_fd;              /* systemd's listening socket, or -1 */
    uint64_t max_store;         /* bytes of store per group */
    uint32_t client_quota;      /* references one client may hold */
    uint32_t uid_quota;         /* pages one uid may store in a group */
    uint32_t max_clients;       /* connected and parked, but the reserve */
    uint32_t max_clients_per_uid;
    uint32_t reserved_clients;  /* past max_clients, for rejoins */
    uint32_t max_groups;        /* private groups at once */
    uint32_t max_groups_per_uid;
    uint32_t join_timeout;      /* seconds to send HELLO */
    bool strict_groups;         /* serve only the declared groups */
    GHashTable *groups;         /* name -> MsBrokerGroupDecl */
} MsBrokerConfig;

/* config.c */

/* The defaults, with no groups declared */
void ms_broker_config_init(MsBrokerConfig *cfg);
void ms_broker_config_clear(MsBrokerConfig *cfg);
G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(MsBrokerConfig, ms_broker_config_clear)
void ms_broker_config_copy(MsBrokerConfig *dst, const MsBrokerConfig *src);

/*
 * Read a key file over @cfg: a [broker] section of keys named like the
 * long options, and [group NAME] sections with uids= and gids= lists.
 * Fails on a missing or unreadable file, an unknown section or key, or
 * a bad value, saying where and what is allowed.
 */
bool ms_broker_config_load(MsBrokerConfig *cfg, const char *path,
                           GError **errp);

/* Set one [broker] key (from the file or an option; @where says which) */
bool ms_broker_config_set(MsBrokerConfig *cfg, const char *key,
                          const char *value, const char *where,
                          GError **errp);

/* Declare a group: "NAME:uid=1000,libvirt-qemu:gid=kvm" (--group) */
bool ms_broker_config_add_group(MsBrokerConfig *cfg, const char *spec,
                                GError **errp);

/* What no single key can check: how the values fit together */
bool ms_broker_config_check(const MsBrokerConfig *cfg, GError **errp);

const MsBrokerGroupDecl *ms_broker_config_group(const MsBrokerConfig *cfg,
                                                const char *name);
bool ms_broker_group_decl_equal(const MsBrokerGroupDecl *a,
                                const MsBrokerGroupDecl *b);

/* broker.c */

/*
 * The listening socket systemd passed, if it passed one to this process
 * (LISTEN_PID, LISTEN_FDS=1, fd 3): checked to be a listening AF_UNIX
 * stream socket, else an error.  *@fd is -1 when there is none.  Unsets
 * the LISTEN_* variables either way.
 */
bool ms_broker_socket_from_systemd(int *fd, GError **errp);

/*
 * Start serving: @cfg->listen_fd if it is one (never bound, chmod-ed
 * nor removed here), else bind @cfg->socket_path (replacing a stale
 * socket, refusing to take over a live one).  The config is copied.
 */
MsBroker *ms_broker_new(const MsBrokerConfig *cfg, GError **errp);

/*
 * Apply a new configuration (SIGHUP): groups and limits apply to the
 * connections, joins and uploads that come next; no member is dropped,
 * not even one the new groups no longer allow (the log says so).  The
 * socket and the store size stay as they were started.
 */
bool ms_broker_reconfigure(MsBroker *b, const MsBrokerConfig *cfg,
                           GError **errp);

/*
 * Count every client's references, every group's slots, holders,
 * charges and index, and every uid's connections again, and compare
 * with the counts kept as they change: false, saying what differs, if
 * one drifted.  For tests and the fuzzer; O(slots of every group).
 */
bool ms_broker_check(MsBroker *b, GError **errp);

/* Disconnect every client, free every group, remove the socket file. */
void ms_broker_free(MsBroker *b);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(MsBroker, ms_broker_free)

#endif /* MEM_SHARE_BROKER_H */
