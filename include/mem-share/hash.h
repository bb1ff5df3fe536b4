/*
 * mem-share engine: keyed page hashing
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Depends on libc, GLib and libxxhash only, never on QEMU.
 */

#ifndef MEM_SHARE_HASH_H
#define MEM_SHARE_HASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <glib.h>

#include "mem-share/error.h"

/* Bytes of secret; XXH3 needs at least XXH3_SECRET_SIZE_MIN (136) */
#define MS_HASH_SECRET_SIZE 192

/*
 * The secret that keys the page hash.  Each store (each trust group) has
 * its own, drawn from getrandom(), so that a guest cannot compute which
 * contents collide and flood one index bucket.
 */
typedef struct MsHashKey {
    uint8_t secret[MS_HASH_SECRET_SIZE];
} MsHashKey;

/* Fill @key with fresh random bytes. */
bool ms_hash_key_init(MsHashKey *key, GError **errp);

/* Keyed 64-bit XXH3 of the @page_size bytes at @page. */
uint64_t ms_hash_page(const MsHashKey *key, const void *page, size_t page_size);

/* True if the @page_size bytes at @page (8-byte aligned) are all zero. */
/*
 * The host's page size.  The engine is QEMU-free and cannot call
 * qemu_real_host_page_size(): this is its one place that asks libc.
 */
size_t ms_host_page_size(void);

bool ms_page_is_zero(const void *page, size_t page_size);

#endif /* MEM_SHARE_HASH_H */
