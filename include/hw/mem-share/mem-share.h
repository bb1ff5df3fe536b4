/*
 * mem-share: a memory backend that deduplicates guest RAM
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef HW_MEM_SHARE_H
#define HW_MEM_SHARE_H

#include "system/hostmem.h"
#include "qom/object_interfaces.h"
#include "qapi/qapi-types-mem-share.h"

#define TYPE_MEM_SHARE "mem-share"
OBJECT_DECLARE_TYPE(MemShareBackend, MemShareBackendClass, MEM_SHARE)

struct MemShareBackendClass {
    HostMemoryBackendClass parent_class;

    /* The generic backend's completion, which allocates the RAM */
    void (*parent_complete)(UserCreatable *uc, Error **errp);
};

typedef struct MemShareUser MemShareUser;

struct MemShareBackend {
    HostMemoryBackend parent_obj;

    MemShareMode mode;
    /* mode=user tuning */
    uint64_t scan_rate;         /* pages per second, 0: no limit */
    uint32_t max_cpu;           /* percent of one CPU */
    uint32_t stable_scans;
    uint32_t map_budget;        /* percent of vm.max_map_count */
    MemShareDirtyTracking dirty_tracking;
    char *group;                /* broker group to share with, or NULL */
    char *broker;               /* the broker's socket */
    uid_t broker_uid;           /* who must listen on it (or root) */
    MemShareUser *user;         /* the scanner, while mode=user runs */
    /* mode=user waits for machine init done (preallocation) */
    Notifier start_notifier;
    bool start_deferred;
    /*
     * The group's broker connection: kept from one mode=user run to the
     * next, so that a restart neither waits for the broker nor leaves
     * references behind a closed connection (MsBrokerClient in
     * mem-share/broker-client.h)
     */
    struct MsBrokerClient *broker_client;
    bool migration_paused;      /* mode=user stopped for an incoming postcopy */
    /*
     * An earlier mode=user left store mappings in the RAM: discards map
     * fresh anonymous memory (see mem-share-user.c)
     */
    bool discard_remap;
    /* Per page of the RAM: direct mappings for DMA (mem-share-dma.c) */
    uint32_t *dma_pins;
    size_t dma_npages;
    size_t dma_page_size;
};

/* The current statistics of @ms */
MemShareInfo *mem_share_get_info(MemShareBackend *ms);

/* Make the "mem-share" provider of query-stats available */
void mem_share_stats_register(void);

/* mode=user (mem-share-user.c) */
bool mem_share_user_start(MemShareBackend *ms, Error **errp);
bool mem_share_user_stop(MemShareBackend *ms, bool unmerge, Error **errp);
void mem_share_user_finalize(MemShareBackend *ms);
void mem_share_user_scan_now(MemShareBackend *ms);
void mem_share_user_kick(MemShareBackend *ms);
void mem_share_user_fill_info(MemShareBackend *ms, MemShareInfo *info);

/* The scanner's dirty log, dirty-tracking=kvm (mem-share-dirty.c) */
typedef struct MemShareDirty MemShareDirty;
MemShareDirty *mem_share_dirty_start(MemShareBackend *ms);
void mem_share_dirty_stop(MemShareDirty *d);
/* CPU time the main loop spent syncing the log for @d (NULL: 0) */
uint64_t mem_share_dirty_cpu_ns(MemShareDirty *d);
void mem_share_dirty_set_period(MemShareDirty *d, unsigned period_ms);
void mem_share_dirty_take(void *opaque, size_t first, size_t n,
                          uint64_t *bits);
/* Direct mappings of the RAM for DMA (mem-share-dma.c) */
void mem_share_dma_init(MemShareBackend *ms);
void mem_share_dma_cleanup(MemShareBackend *ms);
uint64_t mem_share_dma_pages_mapped(MemShareBackend *ms);

/* Migration (mem-share-migration.c) */
void mem_share_migration_register(void);
bool mem_share_migration_check_user(MemShareBackend *ms, Error **errp);

#endif /* HW_MEM_SHARE_H */
