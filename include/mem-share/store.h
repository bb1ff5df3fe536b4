/*
 * mem-share engine: the store of shared page contents
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Depends on libc, GLib and libxxhash only, never on QEMU.
 *
 * A store is a memfd of @max_slots pages.  Each slot holds one canonical
 * copy of a content that guest pages map copy-on-write.  Life of a slot:
 *
 *   ms_store_alloc_run()  -> reserved, one reference held by the caller
 *   ms_store_publish()    -> content written once, immutable, indexed
 *   ms_store_get()/put()  -> one reference per guest page that maps it
 *   last ms_store_put()   -> hole punched, slot free again
 *
 * Zero slots (ms_store_new_with_zero()) follow the allocatable ones:
 * never written, never counted, they read as zeros forever.  Guest zero
 * pages map them where a hole would not stay a hole (see store.c).
 *
 * The store is not thread-safe: one thread (the scanner, or the broker's
 * main loop) owns it.
 */

#ifndef MEM_SHARE_STORE_H
#define MEM_SHARE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>

#include "mem-share/error.h"
#include "mem-share/hash.h"

/* "No slot": also a valid "no preference" hint for ms_store_alloc_run() */
#define MS_SLOT_NONE UINT32_MAX

typedef struct MsStore MsStore;

typedef struct MsStoreStats {
    uint64_t slots;         /* capacity */
    uint64_t slots_used;    /* slots with a reference (reserved or published) */
    uint64_t published;     /* slots holding a published content */
    uint64_t zero_slots;    /* size of the zero region */
    uint64_t zero_held;     /* zero slots that reads filled with a page */
    uint64_t bytes_held;    /* memory the memfd holds: published + zero held */
    uint64_t refs;          /* sum of all reference counts */
} MsStoreStats;

/*
 * Create a store of @max_slots pages of @page_size bytes (the host page
 * size), with its own random hash secret.
 */
MsStore *ms_store_new(size_t page_size, uint32_t max_slots, GError **errp);

/* At most this many zero slots (16 MiB of 4 KiB pages) */
#define MS_STORE_MAX_ZERO_SLOTS 4096

/*
 * The same, followed by @zero_slots zero slots (at most
 * MS_STORE_MAX_ZERO_SLOTS).  ms_store_get/put() ignore zero slots and
 * ms_store_refs() says 0 for them.
 */
MsStore *ms_store_new_with_zero(size_t page_size, uint32_t max_slots,
                                uint32_t zero_slots, GError **errp);
void ms_store_free(MsStore *store);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(MsStore, ms_store_free)

size_t ms_store_page_size(const MsStore *store);
/* Allocatable slots; the zero slots come after them */
uint32_t ms_store_max_slots(const MsStore *store);
uint32_t ms_store_zero_slots(const MsStore *store);
/*
 * The zero slot for guest page @index (index modulo the zero slots, so
 * that neighbouring zero pages map neighbouring slots and their mappings
 * join), or MS_SLOT_NONE if the store has none.
 */
uint32_t ms_store_zero_slot(const MsStore *store, uint64_t index);
bool ms_store_is_zero_slot(const MsStore *store, uint32_t slot);

/*
 * A read-only descriptor of the memfd, owned by the store (dup() it to
 * keep it).  Guests map it MAP_PRIVATE with PROT_READ|PROT_WRITE: writes
 * then copy; MAP_SHARED with PROT_WRITE is refused by the kernel.  It is
 * safe to hand to another process: the memfd's mode is 0 (it cannot be
 * reopened by path without CAP_DAC_OVERRIDE) and it is sealed against
 * resizing (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL).
 */
int ms_store_ro_fd(const MsStore *store);

/*
 * True if @fd (any access mode: F_GET_SEALS works on a read-only
 * descriptor) is sealed against shrinking and growing, as a store's
 * descriptors are.  A member checks the descriptor a broker sends: an
 * unsealed one could be resized under every guest that maps it.
 */
bool ms_store_fd_sealed(int fd);

/* Offset of @slot in the memfd, for mmap(). */
off_t ms_store_offset(const MsStore *store, uint32_t slot);

/*
 * Read-only view of the bytes of @slot (a MAP_SHARED mapping of the whole
 * store; ms_store_view(store, 0) is its base).  Only read published slots:
 * reading an unpublished one would allocate memory in the memfd.  Zero
 * slots may be read: the page that allocates is the one guests reading
 * that slot share anyway.
 */
const void *ms_store_view(const MsStore *store, uint32_t slot);

/* Keyed hash of one page with this store's secret (see hash.h). */
uint64_t ms_store_hash(const MsStore *store, const void *page);

/*
 * Key the store's hash with @key rather than its own random secret: a
 * member of a group takes the group's, so that one hash serves both its
 * store and the group's.  Only while nothing is published (the index's
 * hashes would be wrong).
 */
bool ms_store_set_key(MsStore *store, const MsHashKey *key, GError **errp);
/* True if the store's hash is keyed with @key */
bool ms_store_has_key(const MsStore *store, const MsHashKey *key);

/*
 * Reserve @n contiguous free slots and hold one reference on each; the
 * first one is returned in @first.  Tried in order: [@hint, @hint + @n)
 * (pass the slot after the one the previous guest page maps, so that
 * neighbouring guest pages stay neighbours in the store and their
 * mappings merge into one VMA), then the next free run after the last
 * allocation (which leaves room to grow), then any run.  Fails with
 * ENOSPC when no run of @n free slots exists.
 */
bool ms_store_alloc_run(MsStore *store, uint32_t hint, uint32_t n,
                        uint32_t *first, GError **errp);

/*
 * Write @content into the reserved @slot, once, and index it under its
 * keyed hash.  The hash is computed on what the memfd holds after the
 * write, so the index is right even if @content changed meanwhile (it
 * may be a live guest page: merges compare bytes anyway).
 * Fails with EEXIST if the slot is already published.
 */
bool ms_store_publish(MsStore *store, uint32_t slot, const void *content,
                      GError **errp);

/*
 * Find a published slot whose content equals the @page_size bytes at
 * @content, among those indexed under @hash.  Returns MS_SLOT_NONE if
 * there is none.  Takes no reference.
 */
uint32_t ms_store_find(const MsStore *store, uint64_t hash,
                       const void *content);

/* Add one reference to a used @slot. */
void ms_store_get(MsStore *store, uint32_t slot);

/*
 * Drop one reference to @slot.  At zero the slot leaves the index, its
 * page is released (fallocate PUNCH_HOLE) and it becomes free: never
 * earlier, since a guest that still maps it would read zeros.
 * Returns true if the slot was freed.
 */
bool ms_store_put(MsStore *store, uint32_t slot);

uint32_t ms_store_refs(const MsStore *store, uint32_t slot);
bool ms_store_is_published(const MsStore *store, uint32_t slot);
void ms_store_get_stats(const MsStore *store, MsStoreStats *stats);

#endif /* MEM_SHARE_STORE_H */
