/*
 * mem-share: a memory backend that deduplicates guest RAM
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * A mem-share object owns a VM's guest RAM as private anonymous memory,
 * like memory-backend-ram, and deduplicates it according to its mode:
 *
 *  - off:    nothing is merged;
 *  - kernel: the RAM is marked MADV_MERGEABLE and the host's ksmd merges
 *            it; mem-share reports what ksmd did to this object's pages;
 *  - user:   mem-share's own scanner thread (mem-share-user.c) hashes the
 *            RAM and merges identical pages copy-on-write onto a store.
 *
 * Private anonymous memory is a requirement, not a default: merging maps
 * a shared page copy-on-write into the guest, and only a private mapping
 * gives every writer its own copy back.  Shared memory (share=on), file
 * and hugetlbfs backings are therefore refused.
 */

#include "qemu/osdep.h"
#include <pwd.h>
#include <sys/un.h>
#include "qemu/error-report.h"
#include "qemu/madvise.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-mem-share.h"
#include "qapi/qapi-visit-mem-share.h"
#include "qapi/visitor.h"
#include "qom/object_interfaces.h"
#include "hw/qdev-core.h"
#include "system/system.h"
#include "hw/mem-share/mem-share.h"
#include "mem-share/ksm.h"
#include "mem-share/proto.h"
#include "trace.h"

#define KSM_SYSFS_DIR "/sys/kernel/mm/ksm"

/* Defaults: converge a few GiB within seconds on an idle host */
#define MEM_SHARE_DEFAULT_SCAN_RATE     (256 * 1024)    /* pages/s: 1 GiB/s */
#define MEM_SHARE_DEFAULT_MAX_CPU       50
#define MEM_SHARE_DEFAULT_STABLE_SCANS  1
#define MEM_SHARE_MAX_STABLE_SCANS      16
#define MEM_SHARE_DEFAULT_MAP_BUDGET    50
#define MEM_SHARE_MAX_MAP_BUDGET        90

static const char *mem_share_id(MemShareBackend *ms)
{
    return object_get_canonical_path_component(OBJECT(ms));
}

/* MADV_MERGEABLE in mode kernel only: host KSM must not touch user mode */
static bool mem_share_set_mergeable(MemShareBackend *ms, bool merge,
                                    Error **errp)
{
    HostMemoryBackend *backend = MEMORY_BACKEND(ms);
    void *ptr = memory_region_get_ram_ptr(&backend->mr);
    uint64_t size = memory_region_size(&backend->mr);
    int ret;

    ret = qemu_madvise(ptr, size,
                       merge ? QEMU_MADV_MERGEABLE : QEMU_MADV_UNMERGEABLE);
    trace_mem_share_madvise(mem_share_id(ms), ptr, size,
                            merge ? "mergeable" : "unmergeable", ret);
    if (ret) {
        error_setg_errno(errp, errno, "cannot mark the guest RAM %s",
                         merge ? "mergeable" : "unmergeable");
        return false;
    }
    /* Keep the inherited 'merge' property truthful */
    backend->merge = merge;
    return true;
}

static void mem_share_warn_ksm_stopped(MemShareBackend *ms)
{
    g_autoptr(GError) gerr = NULL;
    MsKsmHost host;

    if (!ms_ksm_read_host(KSM_SYSFS_DIR, "/proc/vmstat", &host, &gerr)) {
        warn_report("mem-share '%s': %s; nothing will be merged",
                    mem_share_id(ms), gerr->message);
    } else if (!host.running) {
        warn_report_once("mem-share: host KSM is not running (%s/run is not 1);"
                         " mode=kernel marks guest RAM mergeable, but nothing"
                         " is merged until the host administrator starts it",
                         KSM_SYSFS_DIR);
    }
}

/* Leave @from and enter @to, with the RAM allocated */
static bool mem_share_switch(MemShareBackend *ms, MemShareMode from,
                             MemShareMode to, Error **errp)
{
    if (from == MEM_SHARE_MODE_USER &&
        !mem_share_user_stop(ms, true, errp)) {
        return false;
    }
    if (!mem_share_set_mergeable(ms, to == MEM_SHARE_MODE_KERNEL, errp)) {
        return false;
    }
    if (to == MEM_SHARE_MODE_USER && !mem_share_user_start(ms, errp)) {
        /* Back to where we were; the RAM is plain again meanwhile */
        mem_share_set_mergeable(ms, from == MEM_SHARE_MODE_KERNEL, NULL);
        return false;
    }
    if (to == MEM_SHARE_MODE_KERNEL) {
        mem_share_warn_ksm_stopped(ms);
    }
    trace_mem_share_set_mode(mem_share_id(ms), MemShareMode_str(from),
                             MemShareMode_str(to));
    return true;
}

static bool mem_share_alloc(HostMemoryBackend *backend, Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(backend);
    g_autofree char *name = NULL;
    uint32_t ram_flags;

    if (!backend->size || backend->size % qemu_real_host_page_size()) {
        error_setg(errp, "size must be a non-zero multiple of the host page"
                   " size (%zu bytes)", qemu_real_host_page_size());
        return false;
    }
    if (backend->share) {
        error_setg(errp, "share=on is not supported: merged pages are mapped"
                   " copy-on-write, which needs private memory");
        return false;
    }
    if (backend->guest_memfd) {
        error_setg(errp, "mem-share cannot back the RAM of a confidential"
                   " guest: its private memory is a guest_memfd, which"
                   " cannot be deduplicated (use memory-backend-ram)");
        return false;
    }

    name = host_memory_backend_get_name(backend);
    /*
     * Private even with -machine aux-ram-share=on, which would otherwise
     * make the RAM a shared memfd
     */
    ram_flags = RAM_PRIVATE;
    ram_flags |= backend->reserve ? 0 : RAM_NORESERVE;
    if (!memory_region_init_ram_flags_nomigrate(&backend->mr, OBJECT(backend),
                                                name, backend->size,
                                                ram_flags, errp)) {
        return false;
    }
    mem_share_dma_init(ms);

    /*
     * The mode decides, not the machine's mem-merge default: RAM block
     * allocation has already marked the RAM mergeable if mem-merge is on,
     * and the generic backend code marks it again after alloc() if 'merge'
     * is set.  Apply the mode explicitly, both ways.
     */
    if (!mem_share_set_mergeable(ms, ms->mode == MEM_SHARE_MODE_KERNEL,
                                 errp)) {
        return false;
    }
    if (ms->mode == MEM_SHARE_MODE_KERNEL) {
        mem_share_warn_ksm_stopped(ms);
    }
    mem_share_stats_register();
    mem_share_migration_register();
    trace_mem_share_alloc(mem_share_id(ms), MemShareMode_str(ms->mode),
                          backend->size);
    return true;
}

/*
 * Machine init done: the preallocation of an object created on the
 * command line has finished, mode=user can start
 */
static void mem_share_start_deferred(Notifier *n, void *data)
{
    MemShareBackend *ms = container_of(n, MemShareBackend, start_notifier);
    Error *err = NULL;

    qemu_remove_machine_init_done_notifier(&ms->start_notifier);
    ms->start_deferred = false;
    trace_mem_share_start_deferred(mem_share_id(ms));
    if (ms->mode == MEM_SHARE_MODE_USER && !ms->user &&
        !mem_share_user_start(ms, &err)) {
        error_prepend(&err, "mem-share '%s': ", mem_share_id(ms));
        error_report_err(err);
        exit(EXIT_FAILURE);
    }
}

/*
 * The scanner starts once the generic backend code is done with the RAM
 * (preallocation, NUMA policy, dump advice), so that it sees the final
 * mapping and re-applies the final advice to the pages it merges.
 */
static void mem_share_complete(UserCreatable *uc, Error **errp)
{
    ERRP_GUARD();
    MemShareBackend *ms = MEM_SHARE(uc);
    MemShareBackendClass *mc = MEM_SHARE_GET_CLASS(uc);

    if (!ms->group != !ms->broker) {
        error_setg(errp, "group and broker go together: group=NAME names"
                   " the mem-share-broker group, broker=PATH its socket");
        return;
    }
    mc->parent_complete(uc, errp);
    if (*errp) {
        return;
    }
    if (ms->mode != MEM_SHARE_MODE_USER) {
        return;
    }
    if (MEMORY_BACKEND(ms)->prealloc &&
        !phase_check(PHASE_LATE_BACKENDS_CREATED)) {
        /*
         * The backends of the command line preallocate their RAM in the
         * background, until they are all created: the scanner must not
         * merge pages that are being populated.  Start it once the
         * machine is ready.
         */
        ms->start_notifier.notify = mem_share_start_deferred;
        qemu_add_machine_init_done_notifier(&ms->start_notifier);
        ms->start_deferred = true;
        return;
    }
    mem_share_user_start(ms, errp);
}

static int mem_share_get_mode(Object *obj, Error **errp)
{
    return MEM_SHARE(obj)->mode;
}

static void mem_share_set_mode(Object *obj, int value, Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(obj);

    if (ms->migration_paused && value == MEM_SHARE_MODE_USER) {
        error_setg(errp, "mode=user is paused while a migration (postcopy"
                   " or background snapshot) owns the guest RAM; it resumes"
                   " by itself when the migration ends");
        return;
    }
    if (host_memory_backend_mr_inited(MEMORY_BACKEND(obj)) &&
        value != ms->mode &&
        !mem_share_switch(ms, ms->mode, value, errp)) {
        return;
    }
    ms->mode = value;
}

/* Getters of the tuning fields; @opaque is the field's offset */
static void mem_share_get_u64(Object *obj, Visitor *v, const char *name,
                              void *opaque, Error **errp)
{
    uint64_t value = qatomic_read((uint64_t *)((char *)obj +
                                               (uintptr_t)opaque));

    visit_type_uint64(v, name, &value, errp);
}

static void mem_share_get_u32(Object *obj, Visitor *v, const char *name,
                              void *opaque, Error **errp)
{
    uint32_t value = qatomic_read((uint32_t *)((char *)obj +
                                               (uintptr_t)opaque));

    visit_type_uint32(v, name, &value, errp);
}

static void mem_share_set_scan_rate(Object *obj, Visitor *v, const char *name,
                                    void *opaque, Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(obj);
    uint64_t value;

    if (!visit_type_uint64(v, name, &value, errp)) {
        return;
    }
    qatomic_set(&ms->scan_rate, value);
    mem_share_user_kick(ms);
}

static void mem_share_set_max_cpu(Object *obj, Visitor *v, const char *name,
                                  void *opaque, Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(obj);
    uint32_t value;

    if (!visit_type_uint32(v, name, &value, errp)) {
        return;
    }
    if (value < 1 || value > 100) {
        error_setg(errp, "max-cpu must be between 1 and 100 (percent of one"
                   " CPU), not %" PRIu32, value);
        return;
    }
    qatomic_set(&ms->max_cpu, value);
    mem_share_user_kick(ms);
}

/* Properties the scanner reads once, when it starts */
static bool mem_share_check_not_started(MemShareBackend *ms, const char *name,
                                        Error **errp)
{
    if (host_memory_backend_mr_inited(MEMORY_BACKEND(ms))) {
        error_setg(errp, "%s can only be set when the object is created",
                   name);
        return false;
    }
    return true;
}

static void mem_share_set_stable_scans(Object *obj, Visitor *v,
                                       const char *name, void *opaque,
                                       Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(obj);
    uint32_t value;

    if (!mem_share_check_not_started(ms, name, errp) ||
        !visit_type_uint32(v, name, &value, errp)) {
        return;
    }
    if (value > MEM_SHARE_MAX_STABLE_SCANS) {
        error_setg(errp, "stable-scans must be between 0 and %d, not %" PRIu32,
                   MEM_SHARE_MAX_STABLE_SCANS, value);
        return;
    }
    ms->stable_scans = value;
}

static void mem_share_set_map_budget(Object *obj, Visitor *v,
                                     const char *name, void *opaque,
                                     Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(obj);
    uint32_t value;

    if (!mem_share_check_not_started(ms, name, errp) ||
        !visit_type_uint32(v, name, &value, errp)) {
        return;
    }
    if (value < 1 || value > MEM_SHARE_MAX_MAP_BUDGET) {
        error_setg(errp, "map-budget must be between 1 and %d (percent of"
                   " vm.max_map_count), not %" PRIu32,
                   MEM_SHARE_MAX_MAP_BUDGET, value);
        return;
    }
    ms->map_budget = value;
}

static int mem_share_get_dirty_tracking(Object *obj, Error **errp)
{
    return MEM_SHARE(obj)->dirty_tracking;
}

static void mem_share_set_dirty_tracking(Object *obj, int value,
                                         Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(obj);

    if (!mem_share_check_not_started(ms, "dirty-tracking", errp)) {
        return;
    }
    ms->dirty_tracking = value;
}

static char *mem_share_get_group(Object *obj, Error **errp)
{
    return g_strdup(MEM_SHARE(obj)->group ?: "");
}

static void mem_share_set_group(Object *obj, const char *value, Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(obj);

    if (!mem_share_check_not_started(ms, "group", errp)) {
        return;
    }
    if (!ms_proto_name_valid(value, NULL)) {
        error_setg(errp, "group '%s' is not a valid name: 1 to %d characters"
                   " of A-Z a-z 0-9 . _ -, not starting with . or -", value,
                   MS_PROTO_MAX_NAME);
        return;
    }
    g_free(ms->group);
    ms->group = g_strdup(value);
}

static char *mem_share_get_broker(Object *obj, Error **errp)
{
    return g_strdup(MEM_SHARE(obj)->broker ?: "");
}

static void mem_share_set_broker(Object *obj, const char *value,
                                 Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(obj);
    struct sockaddr_un sun;

    if (!mem_share_check_not_started(ms, "broker", errp)) {
        return;
    }
    if (!*value || strlen(value) >= sizeof(sun.sun_path)) {
        error_setg(errp, "broker must be the path of mem-share-broker's"
                   " socket, 1 to %zu characters", sizeof(sun.sun_path) - 1);
        return;
    }
    g_free(ms->broker);
    ms->broker = g_strdup(value);
}

static char *mem_share_get_broker_uid(Object *obj, Error **errp)
{
    return g_strdup_printf("%u", (unsigned)MEM_SHARE(obj)->broker_uid);
}

/*
 * The user mem-share-broker runs as: a uid, or a user name looked up
 * now (a user renumbered later is not followed).  (uid_t)-1 is nobody's
 * uid, and the client library's "any broker".
 */
static void mem_share_set_broker_uid(Object *obj, const char *value,
                                     Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(obj);
    long max = sysconf(_SC_GETPW_R_SIZE_MAX);
    size_t size = max > 0 ? max : 16384;
    g_autofree char *buf = NULL;
    struct passwd pw, *found = NULL;
    guint64 uid;
    int ret;

    if (!mem_share_check_not_started(ms, "broker-uid", errp)) {
        return;
    }
    if (g_ascii_string_to_unsigned(value, 10, 0, (uid_t)-1 - 1, &uid,
                                   NULL)) {
        ms->broker_uid = uid;
        return;
    }
    buf = g_malloc(size);
    ret = getpwnam_r(value, &pw, buf, size, &found);
    if (ret) {
        error_setg(errp, "broker-uid: cannot look user '%s' up: %s", value,
                   strerror(ret));
        return;
    }
    if (!found) {
        error_setg(errp, "broker-uid '%s' is neither a uid (0 to %u) nor a"
                   " user of this host: give the uid or the name of the"
                   " user mem-share-broker runs as", value,
                   (unsigned)((uid_t)-1 - 1));
        return;
    }
    ms->broker_uid = pw.pw_uid;
}

/*
 * mem-share has no file backing; this property exists only so that a
 * configuration that asks for one gets told why it cannot work.
 */
static char *mem_share_get_mem_path(Object *obj, Error **errp)
{
    return g_strdup("");
}

static void mem_share_set_mem_path(Object *obj, const char *value,
                                   Error **errp)
{
    error_setg(errp, "mem-path is not supported: mem-share needs private"
               " anonymous memory; file and hugetlbfs backings cannot be"
               " merged copy-on-write (use memory-backend-file without"
               " mem-share)");
}

void qmp_mem_share_scan_now(const char *id, Error **errp)
{
    Object *obj = object_resolve_path_component(object_get_objects_root(), id);
    MemShareBackend *ms = obj ? (MemShareBackend *)
                          object_dynamic_cast(obj, TYPE_MEM_SHARE) : NULL;

    if (!ms) {
        error_setg(errp, "'%s' is not a mem-share object", id);
        return;
    }
    if (!ms->user) {
        error_setg(errp, "mem-share '%s' is in mode %s; scanning on request"
                   " needs mode=user", id, MemShareMode_str(ms->mode));
        return;
    }
    mem_share_user_scan_now(ms);
}

static void mem_share_instance_init(Object *obj)
{
    MemShareBackend *ms = MEM_SHARE(obj);

    ms->mode = MEM_SHARE_MODE_OFF;
    ms->scan_rate = MEM_SHARE_DEFAULT_SCAN_RATE;
    ms->dirty_tracking = MEM_SHARE_DIRTY_TRACKING_KVM;
    ms->max_cpu = MEM_SHARE_DEFAULT_MAX_CPU;
    ms->stable_scans = MEM_SHARE_DEFAULT_STABLE_SCANS;
    ms->map_budget = MEM_SHARE_DEFAULT_MAP_BUDGET;
    ms->broker_uid = 0;
}

static void mem_share_instance_finalize(Object *obj)
{
    MemShareBackend *ms = MEM_SHARE(obj);

    if (ms->start_deferred) {
        qemu_remove_machine_init_done_notifier(&ms->start_notifier);
    }
    /* The RAM goes away with the object: no need to unmerge it first */
    mem_share_user_finalize(ms);
    mem_share_dma_cleanup(ms);
    g_free(ms->group);
    g_free(ms->broker);
}

static void mem_share_class_init(ObjectClass *oc, void *data)
{
    HostMemoryBackendClass *bc = MEMORY_BACKEND_CLASS(oc);
    UserCreatableClass *ucc = USER_CREATABLE_CLASS(oc);
    MemShareBackendClass *mc = MEM_SHARE_CLASS(oc);

    bc->alloc = mem_share_alloc;
    mc->parent_complete = ucc->complete;
    ucc->complete = mem_share_complete;

    object_class_property_add_enum(oc, "mode", "MemShareMode",
                                   &MemShareMode_lookup,
                                   mem_share_get_mode, mem_share_set_mode);
    object_class_property_set_description(oc, "mode",
        "Deduplication mode: off (none), kernel (host KSM merges the RAM),"
        " user (mem-share's own scanner merges it). Default: off."
        " Can be changed at run time");
    object_class_property_add(oc, "scan-rate", "uint64", mem_share_get_u64,
                              mem_share_set_scan_rate, NULL,
                              (void *)offsetof(MemShareBackend, scan_rate));
    object_class_property_set_description(oc, "scan-rate",
        "mode=user: pages scanned per second at most, 0 for no limit."
        " Default: 262144 (1 GiB/s of 4 KiB pages). Can be changed at run"
        " time");
    object_class_property_add(oc, "max-cpu", "uint32", mem_share_get_u32,
                              mem_share_set_max_cpu, NULL,
                              (void *)offsetof(MemShareBackend, max_cpu));
    object_class_property_set_description(oc, "max-cpu",
        "mode=user: CPU the scanner may use, in percent of one CPU (1-100)."
        " Default: 50. Can be changed at run time");
    object_class_property_add(oc, "stable-scans", "uint32", mem_share_get_u32,
                              mem_share_set_stable_scans, NULL,
                              (void *)offsetof(MemShareBackend, stable_scans));
    object_class_property_set_description(oc, "stable-scans",
        "mode=user: scans a page must stay unchanged before it is merged"
        " (0-16). Default: 1");
    object_class_property_add(oc, "map-budget", "uint32", mem_share_get_u32,
                              mem_share_set_map_budget, NULL,
                              (void *)offsetof(MemShareBackend, map_budget));
    object_class_property_set_description(oc, "map-budget",
        "mode=user: share of vm.max_map_count, in percent (1-90), that"
        " merged mappings may use. Default: 50");
    object_class_property_add_enum(oc, "dirty-tracking",
                                   "MemShareDirtyTracking",
                                   &MemShareDirtyTracking_lookup,
                                   mem_share_get_dirty_tracking,
                                   mem_share_set_dirty_tracking);
    object_class_property_set_description(oc, "dirty-tracking",
        "mode=user: how changed pages are found: kvm (QEMU's dirty log:"
        " the KVM dirty log for vCPU writes, TCG's and device emulation's"
        " marking otherwise; a pass visits only what was written, so the"
        " scanner's CPU follows the guest's writes; costs the guest small"
        " pages under KVM) or hash (read and hash every page at every"
        " pass, like kernel KSM). Default: kvm. Set at creation only");
    object_class_property_add_str(oc, "group", mem_share_get_group,
                                  mem_share_set_group);
    object_class_property_set_description(oc, "group",
        "mode=user: share pages with the other members of this"
        " mem-share-broker group (needs broker). Default: share inside"
        " this object only. Set at creation only");
    object_class_property_add_str(oc, "broker", mem_share_get_broker,
                                  mem_share_set_broker);
    object_class_property_set_description(oc, "broker",
        "mode=user: path of mem-share-broker's UNIX socket (with group)."
        " Set at creation only");
    object_class_property_add_str(oc, "broker-uid", mem_share_get_broker_uid,
                                  mem_share_set_broker_uid);
    object_class_property_set_description(oc, "broker-uid",
        "mode=user: the user (uid or name) that must listen on the broker's"
        " socket: nothing is sent to a listener of another uid (root is"
        " always accepted). Default: 0, root (systemd, when it passes the"
        " socket to the broker). Set at creation only");
    object_class_property_add_str(oc, "mem-path", mem_share_get_mem_path,
                                  mem_share_set_mem_path);
    object_class_property_set_description(oc, "mem-path",
        "Not supported: mem-share backs guest RAM with private anonymous"
        " memory");
}

static const TypeInfo mem_share_types[] = {
    {
        .name = TYPE_MEM_SHARE,
        .parent = TYPE_MEMORY_BACKEND,
        .instance_size = sizeof(MemShareBackend),
        .instance_init = mem_share_instance_init,
        .instance_finalize = mem_share_instance_finalize,
        .class_size = sizeof(MemShareBackendClass),
        .class_init = mem_share_class_init,
    },
};

DEFINE_TYPES(mem_share_types)
