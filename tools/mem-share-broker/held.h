/*
 * mem-share-broker: the references a client holds, per store slot
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * What a client may give back: the broker drops a client's references
 * only as far as these counts go (broker.c, "References").  See held.c
 * for the layout.
 */

#ifndef MEM_SHARE_BROKER_HELD_H
#define MEM_SHARE_BROKER_HELD_H

#include <stddef.h>
#include <stdint.h>

typedef struct MsHeld MsHeld;

/* Counts for slots 0 .. @nslots - 1, all zero */
MsHeld *ms_held_new(uint32_t nslots);
void ms_held_free(MsHeld *h);

/* The references held to @slot: 0 for any slot out of range */
uint32_t ms_held_get(const MsHeld *h, uint32_t slot);

/* One more reference to @slot (< nslots); the count before */
uint32_t ms_held_add(MsHeld *h, uint32_t slot);

/* @refs fewer references to @slot (at most its count); the count after */
uint32_t ms_held_sub(MsHeld *h, uint32_t slot, uint32_t refs);

/* The first slot from @slot on with references, or UINT32_MAX */
uint32_t ms_held_next(const MsHeld *h, uint32_t slot);

/* Bytes of memory the counts take (for tests and statistics) */
size_t ms_held_bytes(const MsHeld *h);

#endif
