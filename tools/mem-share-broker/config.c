/*
 * mem-share-broker: configuration (key file, command line, defaults)
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * A configuration is built in three layers: the defaults, then the key
 * file (--config), then the command line.  The command line's options
 * are the [broker] keys of the file under the same names (--max-clients
 * N is max-clients=N), and both go through ms_broker_config_set(), so a
 * value means the same and is checked the same wherever it comes from.
 * SIGHUP builds a configuration the same way again.
 *
 * Groups the operator declares ([group NAME] in the file, --group on
 * the command line) list who may join them: uids and gids, as numbers or
 * as user and group names (resolved when the file is read, so a reload
 * sees renamed or new users), or "*" for every uid.  A declaration
 * without a list is refused rather than taken to mean "everyone": an
 * open group is a decision the operator has to write down.
 *
 * The file is untrusted input like any other: every key is checked
 * against what is known and allowed, and an error names the file, the
 * section, the key and what is allowed.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <grp.h>
#include <inttypes.h>
#include <pwd.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#include "mem-share/proto.h"
#include "broker.h"

#define DEFAULT_SOCKET_MODE 0660
#define DEFAULT_MAX_STORE (1ULL << 30)
/* Enough for a host's VMs; a connection costs two fds and ~1 MiB at most */
#define DEFAULT_MAX_CLIENTS 64
/*
 * Past max-clients, for clients that rejoin (broker.c, "Limits"): as
 * many as a few VMs that lose their connection at once
 */
#define DEFAULT_RESERVED_CLIENTS 8
#define DEFAULT_MAX_GROUPS 16
/* A user's own VMs rarely need more trust domains than that */
#define DEFAULT_MAX_GROUPS_PER_UID 4
/* A client that joins does so in its first round trip: a few ms */
#define DEFAULT_JOIN_TIMEOUT 5

#define MAX_CLIENTS_LIMIT 65536
#define JOIN_TIMEOUT_LIMIT 3600

typedef enum KeyKind {
    KEY_PATH,                   /* char * */
    KEY_MODE,                   /* unsigned, octal */
    KEY_SIZE,                   /* uint64_t, with K/M/G/T */
    KEY_COUNT,                  /* uint32_t */
    KEY_BOOL,                   /* bool */
} KeyKind;

typedef struct ConfigKey {
    const char *name;
    KeyKind kind;
    size_t offset;              /* of the field in MsBrokerConfig */
    uint64_t min, max;          /* KEY_COUNT */
} ConfigKey;

#define KEY(n, k, f, lo, hi) { n, k, offsetof(MsBrokerConfig, f), lo, hi }

static const ConfigKey keys[] = {
    KEY("socket", KEY_PATH, socket_path, 0, 0),
    KEY("socket-mode", KEY_MODE, socket_mode, 0, 0777),
    KEY("max-store", KEY_SIZE, max_store, 0, 0),
    KEY("client-quota", KEY_COUNT, client_quota, 0, UINT32_MAX - 1),
    KEY("uid-quota", KEY_COUNT, uid_quota, 0, UINT32_MAX - 1),
    KEY("max-clients", KEY_COUNT, max_clients, 1, MAX_CLIENTS_LIMIT),
    KEY("max-clients-per-uid", KEY_COUNT, max_clients_per_uid, 0,
        MAX_CLIENTS_LIMIT),
    KEY("reserved-clients", KEY_COUNT, reserved_clients, 0,
        MAX_CLIENTS_LIMIT),
    KEY("max-groups", KEY_COUNT, max_groups, 1, MS_PROTO_MAX_GROUPS),
    KEY("max-groups-per-uid", KEY_COUNT, max_groups_per_uid, 1,
        MS_PROTO_MAX_GROUPS),
    KEY("join-timeout", KEY_COUNT, join_timeout, 1, JOIN_TIMEOUT_LIMIT),
    KEY("strict-groups", KEY_BOOL, strict_groups, 0, 0),
};

static void group_decl_free(MsBrokerGroupDecl *d)
{
    if (d) {
        g_array_unref(d->uids);
        g_array_unref(d->gids);
        g_free(d);
    }
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(MsBrokerGroupDecl, group_decl_free)

static MsBrokerGroupDecl *group_decl_new(void)
{
    MsBrokerGroupDecl *d = g_new0(MsBrokerGroupDecl, 1);

    d->uids = g_array_new(FALSE, FALSE, sizeof(uid_t));
    d->gids = g_array_new(FALSE, FALSE, sizeof(gid_t));
    return d;
}

static GHashTable *group_table_new(void)
{
    return g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                 (GDestroyNotify)group_decl_free);
}

void ms_broker_config_init(MsBrokerConfig *cfg)
{
    *cfg = (MsBrokerConfig) {
        .socket_mode = DEFAULT_SOCKET_MODE,
        .listen_fd = -1,
        .max_store = DEFAULT_MAX_STORE,
        .max_clients = DEFAULT_MAX_CLIENTS,
        .reserved_clients = DEFAULT_RESERVED_CLIENTS,
        .max_groups = DEFAULT_MAX_GROUPS,
        .max_groups_per_uid = DEFAULT_MAX_GROUPS_PER_UID,
        .join_timeout = DEFAULT_JOIN_TIMEOUT,
        .groups = group_table_new(),
    };
}

void ms_broker_config_clear(MsBrokerConfig *cfg)
{
    g_clear_pointer(&cfg->socket_path, g_free);
    g_clear_pointer(&cfg->groups, g_hash_table_unref);
}

void ms_broker_config_copy(MsBrokerConfig *dst, const MsBrokerConfig *src)
{
    *dst = *src;
    dst->socket_path = g_strdup(src->socket_path);
    /* Declarations are never changed once read: share them */
    dst->groups = g_hash_table_ref(src->groups);
}

const MsBrokerGroupDecl *ms_broker_config_group(const MsBrokerConfig *cfg,
                                                const char *name)
{
    return g_hash_table_lookup(cfg->groups, name);
}

/*
 * An empty GArray's data is NULL, and memcmp() of NULL is undefined even
 * for 0 bytes (uids=* has no uids, most declarations no gids)
 */
static bool ids_equal(const GArray *a, const GArray *b, size_t size)
{
    return a->len == b->len &&
           (!a->len || !memcmp(a->data, b->data, a->len * size));
}

bool ms_broker_group_decl_equal(const MsBrokerGroupDecl *a,
                                const MsBrokerGroupDecl *b)
{
    return a->any_uid == b->any_uid &&
           ids_equal(a->uids, b->uids, sizeof(uid_t)) &&
           ids_equal(a->gids, b->gids, sizeof(gid_t));
}

/* SIZE with an optional K, M, G or T suffix (powers of 1024) */
static bool parse_size(const char *s, uint64_t *out)
{
    char *end;
    guint64 v;
    int shift = 0;

    if (!g_ascii_isdigit(*s)) {
        return false;
    }
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
    if (errno || *end || v > (UINT64_MAX >> shift)) {
        return false;
    }
    *out = v << shift;
    return true;
}

static bool parse_bool(const char *s, bool *out)
{
    if (!g_ascii_strcasecmp(s, "true") || !strcmp(s, "1") ||
        !g_ascii_strcasecmp(s, "yes")) {
        *out = true;
        return true;
    }
    if (!g_ascii_strcasecmp(s, "false") || !strcmp(s, "0") ||
        !g_ascii_strcasecmp(s, "no")) {
        *out = false;
        return true;
    }
    return false;
}

static bool bad_value(GError **errp, const char *where, const char *allowed)
{
    g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "%s: %s expected", where, allowed);
    return false;
}

bool ms_broker_config_set(MsBrokerConfig *cfg, const char *key,
                          const char *value, const char *where,
                          GError **errp)
{
    const ConfigKey *k = NULL;
    void *field;
    guint64 v;

    for (size_t i = 0; i < G_N_ELEMENTS(keys); i++) {
        if (!strcmp(keys[i].name, key)) {
            k = &keys[i];
        }
    }
    if (!k) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_UNKNOWN_OPTION,
                    "%s: unknown key '%s' (known: socket, socket-mode,"
                    " max-store, client-quota, uid-quota, max-clients,"
                    " max-clients-per-uid, reserved-clients, max-groups,"
                    " max-groups-per-uid, join-timeout, strict-groups)",
                    where, key);
        return false;
    }
    field = (char *)cfg + k->offset;
    switch (k->kind) {
    case KEY_PATH:
        if (!*value) {
            return bad_value(errp, where, "a path");
        }
        g_free(*(char **)field);
        *(char **)field = g_strdup(value);
        return true;
    case KEY_MODE:
        if (!g_ascii_string_to_unsigned(value, 8, 0, 0777, &v, NULL)) {
            return bad_value(errp, where, "an octal mode from 0 to 0777");
        }
        *(unsigned *)field = v;
        return true;
    case KEY_SIZE:
        if (!parse_size(value, (uint64_t *)field)) {
            return bad_value(errp, where, "a size in bytes, with an"
                             " optional K, M, G or T suffix,");
        }
        return true;
    case KEY_COUNT:
        if (!g_ascii_string_to_unsigned(value, 10, k->min, k->max, &v,
                                        NULL)) {
            g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                        "%s: a number from %" PRIu64 " to %" PRIu64
                        " expected", where, k->min, k->max);
            return false;
        }
        *(uint32_t *)field = v;
        return true;
    case KEY_BOOL:
        if (!parse_bool(value, (bool *)field)) {
            return bad_value(errp, where, "true or false");
        }
        return true;
    }
    g_assert_not_reached();
}

/* A uid or gid: a number, or a name that NSS knows */
static bool resolve_id(const char *s, bool group, uint32_t *id,
                       const char *where, GError **errp)
{
    guint64 v;

    if (g_ascii_isdigit(*s)) {
        if (!g_ascii_string_to_unsigned(s, 10, 0, UINT32_MAX - 1, &v,
                                        NULL)) {
            g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                        "%s: %s '%s': a number below 4294967295 or a name"
                        " expected", where, group ? "gid" : "uid", s);
            return false;
        }
        *id = v;
        return true;
    }
    if (group) {
        struct group *gr = getgrnam(s);

        if (gr) {
            *id = gr->gr_gid;
            return true;
        }
    } else {
        struct passwd *pw = getpwnam(s);

        if (pw) {
            *id = pw->pw_uid;
            return true;
        }
    }
    g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "%s: no %s named '%s' on this host", where,
                group ? "group" : "user", s);
    return false;
}

/* "a,b c;d": uids or gids, or "*" (uids only) */
static bool parse_ids(MsBrokerGroupDecl *d, const char *list, bool group,
                      const char *where, GError **errp)
{
    g_auto(GStrv) items = g_regex_split_simple("[,;\\s]+", list, 0, 0);
    GArray *ids = group ? d->gids : d->uids;
    bool any = false;

    for (int i = 0; items[i]; i++) {
        uint32_t id;

        if (!items[i][0]) {
            continue;
        }
        if (!strcmp(items[i], "*")) {
            if (group) {
                g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                            "%s: '*' is for uids (every uid), not gids",
                            where);
                return false;
            }
            d->any_uid = true;
            any = true;
            continue;
        }
        if (!resolve_id(items[i], group, &id, where, errp)) {
            return false;
        }
        g_array_append_val(ids, id);
        any = true;
    }
    if (!any) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "%s: an empty list of %s", where,
                    group ? "gids" : "uids");
        return false;
    }
    return true;
}

static bool check_decl(const MsBrokerGroupDecl *d, const char *where,
                       GError **errp)
{
    if (!d->any_uid && !d->uids->len && !d->gids->len) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "%s: say who may join: uids= and/or gids= (uids=* lets"
                    " every uid join)", where);
        return false;
    }
    return true;
}

static bool check_group_name(const char *name, const char *where,
                             GError **errp)
{
    g_autoptr(GError) err = NULL;

    if (!ms_proto_name_valid(name, &err)) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "%s: bad group name '%s': %s", where, name, err->message);
        return false;
    }
    return true;
}

bool ms_broker_config_add_group(MsBrokerConfig *cfg, const char *spec,
                                GError **errp)
{
    g_auto(GStrv) parts = g_strsplit(spec, ":", -1);
    g_autoptr(MsBrokerGroupDecl) d = group_decl_new();
    g_autofree char *where = g_strdup_printf("--group %s", spec);

    if (!parts[0] || !check_group_name(parts[0], where, errp)) {
        if (!parts[0]) {
            g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                        "%s: NAME:uid=LIST[:gid=LIST] expected", where);
        }
        return false;
    }
    for (int i = 1; parts[i]; i++) {
        const char *p = parts[i];
        bool group = g_str_has_prefix(p, "gid=") ||
                     g_str_has_prefix(p, "gids=");

        if (!group && !g_str_has_prefix(p, "uid=") &&
            !g_str_has_prefix(p, "uids=")) {
            g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                        "%s: '%s': uid=LIST or gid=LIST expected (names or"
                        " numbers separated by commas, or uid=* for every"
                        " uid)", where, p);
            return false;
        }
        if (!parse_ids(d, strchr(p, '=') + 1, group, where, errp)) {
            return false;
        }
    }
    if (!check_decl(d, where, errp)) {
        return false;
    }
    g_hash_table_replace(cfg->groups, g_strdup(parts[0]),
                         g_steal_pointer(&d));
    return true;
}

static bool load_group(MsBrokerConfig *cfg, GKeyFile *kf, const char *path,
                       const char *section, GError **errp)
{
    const char *name = section + strlen("group ");
    g_autoptr(MsBrokerGroupDecl) d = group_decl_new();
    g_auto(GStrv) keys_in = g_key_file_get_keys(kf, section, NULL, NULL);
    g_autofree char *where = g_strdup_printf("%s: [%s]", path, section);

    if (!check_group_name(name, where, errp)) {
        return false;
    }
    for (int i = 0; keys_in && keys_in[i]; i++) {
        g_autofree char *value = g_key_file_get_value(kf, section,
                                                      keys_in[i], NULL);
        g_autofree char *kwhere = g_strdup_printf("%s %s=%s", where,
                                                  keys_in[i], value);
        bool group = !strcmp(keys_in[i], "gids");

        if (!group && strcmp(keys_in[i], "uids")) {
            g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_UNKNOWN_OPTION,
                        "%s: unknown key '%s' (known: uids, gids)", where,
                        keys_in[i]);
            return false;
        }
        if (!parse_ids(d, value, group, kwhere, errp)) {
            return false;
        }
    }
    if (!check_decl(d, where, errp)) {
        return false;
    }
    g_hash_table_replace(cfg->groups, g_strdup(name), g_steal_pointer(&d));
    return true;
}

bool ms_broker_config_load(MsBrokerConfig *cfg, const char *path,
                           GError **errp)
{
    g_autoptr(GKeyFile) kf = g_key_file_new();
    g_autoptr(GError) err = NULL;
    g_auto(GStrv) sections = NULL;

    if (!g_key_file_load_from_file(kf, path, G_KEY_FILE_NONE, &err)) {
        g_set_error(errp, err->domain, err->code, "cannot read %s: %s", path,
                    err->message);
        return false;
    }
    sections = g_key_file_get_groups(kf, NULL);
    for (int i = 0; sections[i]; i++) {
        const char *s = sections[i];

        if (g_str_has_prefix(s, "group ")) {
            if (!load_group(cfg, kf, path, s, errp)) {
                return false;
            }
        } else if (!strcmp(s, "broker")) {
            g_auto(GStrv) ks = g_key_file_get_keys(kf, s, NULL, NULL);
            g_autofree char *where = g_strdup_printf("%s: [broker]", path);

            for (int j = 0; ks && ks[j]; j++) {
                g_autofree char *v = g_key_file_get_value(kf, s, ks[j],
                                                          NULL);
                g_autofree char *kwhere = g_strdup_printf("%s %s=%s", where,
                                                          ks[j], v);

                if (!ms_broker_config_set(cfg, ks[j], v ? v : "", kwhere,
                                          errp)) {
                    return false;
                }
            }
        } else {
            g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_UNKNOWN_OPTION,
                        "%s: unknown section [%s] (known: [broker],"
                        " [group NAME])", path, s);
            return false;
        }
    }
    return true;
}

bool ms_broker_config_check(const MsBrokerConfig *cfg, GError **errp)
{
    guint declared = g_hash_table_size(cfg->groups);

    if (cfg->strict_groups && declared == 0) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "strict-groups serves only declared groups, and none"
                    " is declared ([group NAME] or --group)");
        return false;
    }
    /* STATS_REPLY lists every group the administrator asks about */
    if (declared + cfg->max_groups > MS_PROTO_MAX_GROUPS) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "%u declared groups and max-groups=%u: at most %d"
                    " groups in all", declared, cfg->max_groups,
                    MS_PROTO_MAX_GROUPS);
        return false;
    }
    return true;
}
