/*
 * mem-share: a memory backend that deduplicates guest RAM
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef HW_MEM_SHARE_H
#define HW_MEM_SHARE_H

#include "sysemu/hostmem.h"
#include "qapi/qapi-types-mem-share.h"

#define TYPE_MEM_SHARE "mem-share"
OBJECT_DECLARE_SIMPLE_TYPE(MemShareBackend, MEM_SHARE)

struct MemShareBackend {
    HostMemoryBackend parent_obj;

    MemShareMode mode;
};

/* The current statistics of @ms */
MemShareInfo *mem_share_get_info(MemShareBackend *ms);

/* Make the "mem-share" provider of query-stats available */
void mem_share_stats_register(void);

#endif /* HW_MEM_SHARE_H */
