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
 *  - user:   mem-share's own scanner and merge engine (not yet available).
 *
 * Private anonymous memory is a requirement, not a default: merging maps
 * a shared page copy-on-write into the guest, and only a private mapping
 * gives every writer its own copy back.  Shared memory (share=on), file
 * and hugetlbfs backings are therefore refused.
 */

#include "qemu/osdep.h"
#include "qemu/error-report.h"
#include "qemu/madvise.h"
#include "qapi/error.h"
#include "qapi/qapi-visit-mem-share.h"
#include "qom/object_interfaces.h"
#include "hw/mem-share/mem-share.h"
#include "mem-share/ksm.h"
#include "trace.h"

#define KSM_SYSFS_DIR "/sys/kernel/mm/ksm"

static bool mem_share_apply_mode(MemShareBackend *ms, MemShareMode mode,
                                 Error **errp)
{
    HostMemoryBackend *backend = MEMORY_BACKEND(ms);
    void *ptr = memory_region_get_ram_ptr(&backend->mr);
    uint64_t size = memory_region_size(&backend->mr);
    bool merge = mode == MEM_SHARE_MODE_KERNEL;
    int ret;

    ret = qemu_madvise(ptr, size,
                       merge ? QEMU_MADV_MERGEABLE : QEMU_MADV_UNMERGEABLE);
    trace_mem_share_madvise(object_get_canonical_path_component(OBJECT(ms)),
                            ptr, size, merge ? "mergeable" : "unmergeable",
                            ret);
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
                    object_get_canonical_path_component(OBJECT(ms)),
                    gerr->message);
    } else if (!host.running) {
        warn_report_once("mem-share: host KSM is not running (%s/run is not 1);"
                         " mode=kernel marks guest RAM mergeable, but nothing"
                         " is merged until the host administrator starts it",
                         KSM_SYSFS_DIR);
    }
}

static void mem_share_alloc(HostMemoryBackend *backend, Error **errp)
{
    ERRP_GUARD();
    MemShareBackend *ms = MEM_SHARE(backend);
    const char *id = object_get_canonical_path_component(OBJECT(backend));
    g_autofree char *name = NULL;
    uint32_t ram_flags;

    if (!backend->size || backend->size % qemu_real_host_page_size()) {
        error_setg(errp, "size must be a non-zero multiple of the host page"
                   " size (%zu bytes)", qemu_real_host_page_size());
        return;
    }
    if (backend->share) {
        error_setg(errp, "share=on is not supported: merged pages are mapped"
                   " copy-on-write, which needs private memory");
        return;
    }
    if (ms->mode == MEM_SHARE_MODE_USER) {
        error_setg(errp, "mode=user is not available in this build;"
                   " use mode=kernel (host KSM) or mode=off");
        return;
    }

    name = host_memory_backend_get_name(backend);
    ram_flags = backend->reserve ? 0 : RAM_NORESERVE;
    memory_region_init_ram_flags_nomigrate(&backend->mr, OBJECT(backend),
                                           name, backend->size, ram_flags,
                                           errp);
    if (*errp) {
        return;
    }

    /*
     * The mode decides, not the machine's mem-merge default: RAM block
     * allocation has already marked the RAM mergeable if mem-merge is on,
     * and the generic backend code marks it again after alloc() if 'merge'
     * is set.  Apply the mode explicitly, both ways.
     */
    if (!mem_share_apply_mode(ms, ms->mode, errp)) {
        return;
    }
    if (ms->mode == MEM_SHARE_MODE_KERNEL) {
        mem_share_warn_ksm_stopped(ms);
    }
    mem_share_stats_register();
    trace_mem_share_alloc(id, MemShareMode_str(ms->mode), backend->size);
}

static int mem_share_get_mode(Object *obj, Error **errp)
{
    return MEM_SHARE(obj)->mode;
}

static void mem_share_set_mode(Object *obj, int value, Error **errp)
{
    MemShareBackend *ms = MEM_SHARE(obj);
    HostMemoryBackend *backend = MEMORY_BACKEND(obj);

    if (!host_memory_backend_mr_inited(backend)) {
        ms->mode = value;
        return;
    }
    if (value == ms->mode) {
        return;
    }
    if (value == MEM_SHARE_MODE_USER || ms->mode == MEM_SHARE_MODE_USER) {
        error_setg(errp, "mode=user is not available in this build;"
                   " at run time a mem-share object can switch between"
                   " mode=off and mode=kernel");
        return;
    }
    if (!mem_share_apply_mode(ms, value, errp)) {
        return;
    }
    trace_mem_share_set_mode(object_get_canonical_path_component(obj),
                             MemShareMode_str(ms->mode),
                             MemShareMode_str(value));
    ms->mode = value;
    if (value == MEM_SHARE_MODE_KERNEL) {
        mem_share_warn_ksm_stopped(ms);
    }
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

static void mem_share_instance_init(Object *obj)
{
    MEM_SHARE(obj)->mode = MEM_SHARE_MODE_OFF;
}

static void mem_share_class_init(ObjectClass *oc, void *data)
{
    HostMemoryBackendClass *bc = MEMORY_BACKEND_CLASS(oc);

    bc->alloc = mem_share_alloc;

    object_class_property_add_enum(oc, "mode", "MemShareMode",
                                   &MemShareMode_lookup,
                                   mem_share_get_mode, mem_share_set_mode);
    object_class_property_set_description(oc, "mode",
        "Deduplication mode: off (none), kernel (host KSM merges the RAM),"
        " user (mem-share's own engine; not available yet). Default: off."
        " Can be changed at run time between off and kernel");
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
        .class_init = mem_share_class_init,
    },
};

DEFINE_TYPES(mem_share_types)
