/*
 * mem-share: statistics (QMP query-mem-share, query-stats, HMP)
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/cutils.h"
#include "qemu/timer.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-mem-share.h"
#include "qapi/qapi-commands-stats.h"
#include "qobject/qdict.h"
#include "monitor/hmp.h"
#include "monitor/monitor.h"
#include "system/stats.h"
#include "qom/object.h"
#include "hw/mem-share/mem-share.h"
#include "mem-share/ksm.h"
#include "trace.h"

#define KSM_SYSFS_DIR "/sys/kernel/mm/ksm"

/*
 * Count, page by page, what this backend's RAM maps.  Page frame numbers
 * are only readable with CAP_SYS_ADMIN: without them, fail and let the
 * caller fall back to the process-wide figures.
 */
static bool mem_share_census(MemShareBackend *ms, MsPageCensus *census)
{
    HostMemoryBackend *backend = MEMORY_BACKEND(ms);
    g_autoptr(GError) gerr = NULL;
    int64_t start = get_clock();
    int pagemap_fd, kpageflags_fd;
    bool ok = false;

    pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    kpageflags_fd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
    if (pagemap_fd >= 0 && kpageflags_fd >= 0) {
        ok = ms_page_census(pagemap_fd, kpageflags_fd,
                            memory_region_get_ram_ptr(&backend->mr),
                            backend->size / qemu_real_host_page_size(),
                            qemu_real_host_page_size(), census, &gerr);
    }
    if (pagemap_fd >= 0) {
        close(pagemap_fd);
    }
    if (kpageflags_fd >= 0) {
        close(kpageflags_fd);
    }
    trace_mem_share_census(object_get_canonical_path_component(OBJECT(ms)),
                           ok, ok ? census->present : 0, ok ? census->ksm : 0,
                           ok ? census->zero_pfn : 0,
                           get_clock() - start);
    return ok;
}

static void mem_share_fill_kernel(MemShareBackend *ms, MemShareInfo *info)
{
    MemShareKernelInfo *k = g_new0(MemShareKernelInfo, 1);
    MsKsmHost host;
    MsKsmProcess proc;
    MsPageCensus census;

    /* Missing files leave zeros, which is what they mean */
    ms_ksm_read_host(KSM_SYSFS_DIR, "/proc/vmstat", &host, NULL);
    ms_ksm_read_process("/proc/self", &proc, NULL);

    k->running = host.running;
    k->use_zero_pages = host.use_zero_pages;
    k->merging_pages = proc.merging_pages;
    k->zero_pages = proc.zero_pages;
    k->rmap_items = proc.rmap_items;
    k->process_profit = proc.process_profit;
    k->pages_shared = host.pages_shared;
    k->pages_sharing = host.pages_sharing;
    k->pages_unshared = host.pages_unshared;
    k->pages_volatile = host.pages_volatile;

    k->per_object = mem_share_census(ms, &census);
    if (k->per_object) {
        k->pages_ksm = census.ksm;
        k->pages_zero_pfn = census.zero_pfn;
        info->pages_merged = census.ksm + census.zero_pfn;
        info->pages_zero = census.ksm_zero + census.zero_pfn;
    } else {
        k->pages_ksm = proc.merging_pages;
        k->pages_zero_pfn = proc.zero_pages;
        info->pages_merged = proc.merging_pages + proc.zero_pages;
        info->pages_zero = proc.zero_pages;
    }

    /* The scanner is the host's ksmd: its figures are host-wide */
    info->pages_scanned = host.pages_scanned;
    info->full_scans = host.full_scans;
    info->cow_breaks = host.cow_ksm;
    info->scan_cpu_ns = ms_ksmd_cpu_ns("/proc");
    info->kernel = k;
}

MemShareInfo *mem_share_get_info(MemShareBackend *ms)
{
    HostMemoryBackend *backend = MEMORY_BACKEND(ms);
    MemShareInfo *info = g_new0(MemShareInfo, 1);

    info->id = g_strdup(object_get_canonical_path_component(OBJECT(ms)));
    info->mode = ms->mode;
    info->size = backend->size;
    info->page_size = qemu_real_host_page_size();
    if (ms->mode == MEM_SHARE_MODE_KERNEL) {
        mem_share_fill_kernel(ms, info);
    } else if (ms->user) {
        mem_share_user_fill_info(ms, info);
    }
    return info;
}

static int mem_share_collect(Object *obj, void *opaque)
{
    GPtrArray *objs = opaque;

    if (object_dynamic_cast(obj, TYPE_MEM_SHARE) &&
        host_memory_backend_mr_inited(MEMORY_BACKEND(obj))) {
        g_ptr_array_add(objs, obj);
    }
    return 0;
}

/* Every mem-share object that has its RAM, in QOM tree order */
static GPtrArray *mem_share_objects(void)
{
    GPtrArray *objs = g_ptr_array_new();

    object_child_foreach_recursive(object_get_objects_root(),
                                   mem_share_collect, objs);
    return objs;
}

MemShareInfoList *qmp_query_mem_share(Error **errp)
{
    g_autoptr(GPtrArray) objs = mem_share_objects();
    MemShareInfoList *list = NULL;

    for (guint i = objs->len; i-- > 0;) {
        QAPI_LIST_PREPEND(list, mem_share_get_info(MEM_SHARE(objs->pdata[i])));
    }
    return list;
}

void hmp_info_mem_share(Monitor *mon, const QDict *qdict)
{
    g_autoptr(MemShareInfoList) list = qmp_query_mem_share(NULL);

    if (!list) {
        monitor_printf(mon, "No mem-share memory backends\n");
        return;
    }
    for (MemShareInfoList *l = list; l; l = l->next) {
        MemShareInfo *i = l->value;
        g_autofree char *size = size_to_str(i->size);

        monitor_printf(mon, "%s: mode %s, size %s\n", i->id,
                       MemShareMode_str(i->mode), size);
        monitor_printf(mon, "  pages merged %" PRIu64 " (zero %" PRIu64 ")\n",
                       i->pages_merged, i->pages_zero);
        monitor_printf(mon, "  pages scanned %" PRIu64 ", full scans %" PRIu64
                       ", cow breaks %" PRIu64 ", scan cpu %" PRIu64 " ms\n",
                       i->pages_scanned, i->full_scans, i->cow_breaks,
                       i->scan_cpu_ns / SCALE_MS);
        if (i->user) {
            MemShareUserInfo *u = i->user;

            monitor_printf(mon, "  store pages %" PRIu64 ", shared pages %"
                           PRIu64 ", volatile %" PRIu64 ", saved %" PRIu64
                           " bytes\n", u->store_pages, u->pages_shared,
                           u->pages_volatile, u->bytes_saved);
            monitor_printf(mon, "  dirty tracking %s: pages dirty %" PRIu64
                           ", hashes skipped %" PRIu64 ", candidates %"
                           PRIu64 "\n",
                           MemShareDirtyTracking_str(u->dirty_tracking),
                           u->pages_dirty, u->hash_skips, u->candidates);
            monitor_printf(mon, "  churn: merges wasted %" PRIu64
                           ", skips %" PRIu64 ", upkeep merges %" PRIu64
                           "; huge pages filled %" PRIu64 "\n",
                           u->merges_wasted, u->churn_skips,
                           u->merges_upkeep, u->huge_fills);
            monitor_printf(mon, "  merges %" PRIu64 ", zero merges %" PRIu64
                           ", remerges %" PRIu64 ", mappings %" PRIu64 "/%"
                           PRIu64 ", refused: budget %" PRIu64 ", changed %"
                           PRIu64 ", store full %" PRIu64 ", DMA %" PRIu64
                           "\n", u->merges,
                           u->zero_merges, u->remerges, u->mappings,
                           u->mapping_budget, u->refused_budget,
                           u->refused_changed, u->refused_store_full,
                           u->refused_dma);
            if (u->dma_mapped_pages) {
                monitor_printf(mon, "  pages mapped for DMA now %" PRIu64
                               "\n", u->dma_mapped_pages);
            }
            if (u->zero_slots) {
                monitor_printf(mon, "  zero pages map %" PRIu64 " zero store"
                               " pages (%" PRIu64 " hold memory)\n",
                               u->zero_slots, u->zero_slots_held);
            }
            if (u->group) {
                MemShareGroupInfo *g = u->group;

                monitor_printf(mon, "  group %s (broker %s, broker-uid %"
                               PRIu32 ", %s): %" PRIu64
                               " pages on the group's store, lookups %"
                               PRIu64 ", hits %" PRIu64 ", uploads %" PRIu64
                               "\n", g->group, g->broker, g->broker_uid,
                               g->connected ? "connected" : "lost",
                               g->pages, g->lookups, g->hits, g->uploads);
            }
        }
        if (i->kernel) {
            MemShareKernelInfo *k = i->kernel;

            monitor_printf(mon, "  host KSM %s, counted %s\n",
                           k->running ? "running" : "not running",
                           k->per_object ? "per object" : "per process");
            monitor_printf(mon, "  ksm pages %" PRIu64 ", zero-pfn pages %"
                           PRIu64 ", process merging %" PRIu64
                           ", process profit %" PRId64 " bytes\n",
                           k->pages_ksm, k->pages_zero_pfn, k->merging_pages,
                           k->process_profit);
        }
    }
}

/* query-stats provider "mem-share": one result per object, target "vm" */

typedef struct MemShareStatDesc {
    const char *name;
    StatsType type;
    bool has_unit;
    StatsUnit unit;
    int exponent;
} MemShareStatDesc;

static const MemShareStatDesc mem_share_stat_descs[] = {
    { "size", STATS_TYPE_INSTANT, true, STATS_UNIT_BYTES, 0 },
    { "pages-merged", STATS_TYPE_INSTANT },
    { "pages-zero", STATS_TYPE_INSTANT },
    { "pages-scanned", STATS_TYPE_CUMULATIVE },
    { "full-scans", STATS_TYPE_CUMULATIVE },
    { "cow-breaks", STATS_TYPE_CUMULATIVE },
    { "scan-cpu-ns", STATS_TYPE_CUMULATIVE, true, STATS_UNIT_SECONDS, -9 },
};

static uint64_t mem_share_stat_value(MemShareInfo *info, size_t idx)
{
    const uint64_t values[] = {
        info->size, info->pages_merged, info->pages_zero,
        info->pages_scanned, info->full_scans, info->cow_breaks,
        info->scan_cpu_ns,
    };

    QEMU_BUILD_BUG_ON(ARRAY_SIZE(values) != ARRAY_SIZE(mem_share_stat_descs));
    return values[idx];
}

static void mem_share_stats_cb(StatsResultList **result, StatsTarget target,
                               strList *names, strList *targets, Error **errp)
{
    g_autoptr(GPtrArray) objs = mem_share_objects();

    if (target != STATS_TARGET_VM) {
        return;
    }
    for (guint i = 0; i < objs->len; i++) {
        g_autoptr(MemShareInfo) info = mem_share_get_info(objs->pdata[i]);
        g_autofree char *path = object_get_canonical_path(objs->pdata[i]);
        StatsList *stats = NULL;

        for (size_t j = ARRAY_SIZE(mem_share_stat_descs); j-- > 0;) {
            Stats *s;

            if (!apply_str_list_filter(mem_share_stat_descs[j].name, names)) {
                continue;
            }
            s = g_new0(Stats, 1);
            s->name = g_strdup(mem_share_stat_descs[j].name);
            s->value = g_new0(StatsValue, 1);
            s->value->type = QTYPE_QNUM;
            s->value->u.scalar = mem_share_stat_value(info, j);
            QAPI_LIST_PREPEND(stats, s);
        }
        if (stats) {
            add_stats_entry(result, STATS_PROVIDER_MEM_SHARE, path, stats);
        }
    }
}

static void mem_share_schemas_cb(StatsSchemaList **result, Error **errp)
{
    StatsSchemaValueList *list = NULL;

    for (size_t j = ARRAY_SIZE(mem_share_stat_descs); j-- > 0;) {
        const MemShareStatDesc *d = &mem_share_stat_descs[j];
        StatsSchemaValue *v = g_new0(StatsSchemaValue, 1);

        v->name = g_strdup(d->name);
        v->type = d->type;
        v->has_unit = d->has_unit;
        v->unit = d->unit;
        v->exponent = d->exponent;
        v->has_base = d->exponent != 0;
        v->base = 10;
        QAPI_LIST_PREPEND(list, v);
    }
    add_stats_schema(result, STATS_PROVIDER_MEM_SHARE, STATS_TARGET_VM, list);
}

/* Called when the first mem-share object is created, like KVM's provider */
void mem_share_stats_register(void)
{
    static bool registered;

    if (!registered) {
        add_stats_callbacks(STATS_PROVIDER_MEM_SHARE, mem_share_stats_cb,
                            mem_share_schemas_cb);
        registered = true;
    }
}
