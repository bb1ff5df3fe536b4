/*
 * mem-share engine: the store of shared page contents
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Merged guest pages map one canonical copy of their content, copy on
 * write, the way KSM's stable tree pages work.  From user space the only
 * page that several private mappings can share copy-on-write is a page of
 * a file, so the canonical copies live in a memfd: the store.  Each
 * store page is a slot.
 *
 * Three rules keep guests safe:
 *
 *  - A published slot is immutable.  Guests map the memfd MAP_PRIVATE and
 *    see every later change of a page they have not written yet, so only
 *    the owner writes, once, with pwrite() on its own descriptor; guests
 *    and the comparison view get a read-only descriptor
 *    (/proc/self/fd/N reopened O_RDONLY, on which the kernel refuses a
 *    writable MAP_SHARED).  A read-only descriptor alone is not enough
 *    when it is handed to another process (the broker's members): a
 *    memfd inode is created with mode 0777, so its holder could open
 *    /proc/self/fd/N again, read-write.  Once the read-only descriptor
 *    exists the inode's mode drops to 0, and seals forbid resizing it;
 *    see open_memfd().
 *
 *  - A slot is released (fallocate PUNCH_HOLE) only when its exact
 *    reference count reaches zero: a guest that still maps it without
 *    having written it would silently read zeros.
 *
 *  - Neighbouring guest pages should map neighbouring slots: the kernel
 *    merges adjacent mappings of contiguous file offsets into one VMA,
 *    and a process has only vm.max_map_count VMAs (65530 by default).
 *    The allocator therefore hands out runs of contiguous slots, honours
 *    a hint (the slot after the previous page's one) and otherwise
 *    allocates next-fit, which tends to leave free slots after each run
 *    for it to grow into.
 *
 * A store may also have a zero region: slots after the last allocatable
 * one that are never written, so that they read as zeros forever.  On
 * kernels whose read faults do not map the shared zero page, a zero hole
 * in guest RAM fills with a real page whenever the guest reads it; a
 * zero page mapped onto the zero region stays shared when read.  The
 * region is not reference counted (its content can never be wrong,
 * even after a punch) and costs at most one page of memory per zero
 * slot, however many guest pages map it.
 *
 * The index maps a keyed hash (hash.c) to the published slots with that
 * hash.  A GHashTable holds the first slot of each hash; further slots
 * with the same hash (collisions, or a content published twice by a
 * race) are chained through a per-slot array, so the table holds no
 * allocation per slot and collisions are resolved by comparing bytes.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE     /* QEMU defines it on its command line */
#endif
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mem-share/hash.h"
#include "mem-share/store.h"

#define BITS_PER_WORD 64

struct MsStore {
    size_t page_size;
    uint32_t nslots;        /* allocatable slots */
    uint32_t nzero;         /* zero slots, after them */
    int fd;                 /* read-write: the owner's, for pwrite */
    int ro_fd;              /* read-only: for guests and the view */
    uint8_t *view;          /* MAP_SHARED, PROT_READ, whole store */
    MsHashKey key;

    uint32_t *refs;         /* per slot */
    uint64_t *hash;         /* per published slot; the index's keys */
    uint32_t *next;         /* next published slot with the same hash */
    uint8_t *published;     /* per slot */
    uint64_t *used;         /* bitmap: slot has a reference */
    uint32_t cursor;        /* where next-fit resumes */
    GHashTable *index;      /* &hash[head] -> GUINT_TO_POINTER(head + 1) */

    uint64_t slots_used;
    uint64_t nr_published;
    uint64_t nr_refs;
};

static bool slot_used(const MsStore *s, uint32_t slot)
{
    return s->used[slot / BITS_PER_WORD] & (1ULL << (slot % BITS_PER_WORD));
}

static void set_used(MsStore *s, uint32_t slot, bool used)
{
    uint64_t bit = 1ULL << (slot % BITS_PER_WORD);

    if (used) {
        s->used[slot / BITS_PER_WORD] |= bit;
    } else {
        s->used[slot / BITS_PER_WORD] &= ~bit;
    }
}

/* Slots in the memfd: the allocatable ones, then the zero region */
static size_t total_slots(const MsStore *s)
{
    return (size_t)s->nslots + s->nzero;
}

/*
 * What the store's descriptors must carry once open_memfd() is done: a
 * member that could shrink the memfd would make every guest page that
 * maps a slot beyond the new end SIGBUS, one that could grow it would
 * charge the group for memory.  F_SEAL_SEAL keeps anyone (a member can
 * never add seals anyway, that needs a writable descriptor) from sealing
 * the owner out.
 *
 * Not F_SEAL_WRITE, nor F_SEAL_FUTURE_WRITE: the owner still writes new
 * slots with pwrite() and frees them by punching holes, which both
 * forbid.  Writes are kept from members by their descriptor being
 * read-only and by the inode's mode, 0: the kernel refuses to reopen
 * /proc/self/fd/N for writing to anyone without CAP_DAC_OVERRIDE.
 */
#define STORE_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

static bool open_memfd(MsStore *s, GError **errp)
{
    g_autofree char *path = NULL;

    s->fd = memfd_create("mem-share-store", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (s->fd < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot create the store memfd: %s", g_strerror(errno));
        return false;
    }
    /* The only size it will ever have: F_SEAL_GROW | F_SEAL_SHRINK below */
    if (ftruncate(s->fd, (off_t)total_slots(s) * s->page_size) < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot size the store to %zu pages: %s", total_slots(s),
                    g_strerror(errno));
        return false;
    }
    /*
     * A read-only open file description: no one can write through it.
     * Opened now, while the mode still lets the owner open the inode
     * by path (a QEMU that is not root has no CAP_DAC_OVERRIDE).
     */
    path = g_strdup_printf("/proc/self/fd/%d", s->fd);
    s->ro_fd = open(path, O_RDONLY | O_CLOEXEC);
    if (s->ro_fd < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot reopen the store read-only (%s): %s", path,
                    g_strerror(errno));
        return false;
    }
    /*
     * Nobody opens the inode by path again, for reading or writing,
     * unless it has CAP_DAC_OVERRIDE.  The owner's uid could chmod it
     * back, but a process with the owner's uid (or root) can ptrace the
     * owner and write its memory anyway: the mode protects the store
     * from members running as other users.
     */
    if (fchmod(s->fd, 0) < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot restrict the store's mode to 0: %s",
                    g_strerror(errno));
        return false;
    }
    if (fcntl(s->fd, F_ADD_SEALS, STORE_SEALS) < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot seal the store against resizing: %s",
                    g_strerror(errno));
        return false;
    }
    s->view = mmap(NULL, total_slots(s) * s->page_size, PROT_READ,
                   MAP_SHARED, s->ro_fd, 0);
    if (s->view == MAP_FAILED) {
        s->view = NULL;
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot map the store view: %s", g_strerror(errno));
        return false;
    }
    return true;
}

bool ms_store_fd_sealed(int fd)
{
    int seals = fcntl(fd, F_GET_SEALS);

    return seals >= 0 &&
           (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) ==
           (F_SEAL_SHRINK | F_SEAL_GROW);
}

MsStore *ms_store_new(size_t page_size, uint32_t max_slots, GError **errp)
{
    return ms_store_new_with_zero(page_size, max_slots, 0, errp);
}

MsStore *ms_store_new_with_zero(size_t page_size, uint32_t max_slots,
                                uint32_t zero_slots, GError **errp)
{
    g_autoptr(MsStore) s = g_new0(MsStore, 1);

    s->fd = s->ro_fd = -1;
    s->page_size = page_size;
    s->nslots = max_slots;
    s->nzero = zero_slots;
    if (!page_size || page_size % 64 || !max_slots ||
        zero_slots > MS_STORE_MAX_ZERO_SLOTS ||
        max_slots >= MS_SLOT_NONE - zero_slots) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "invalid store geometry: %u + %u zero pages of %zu "
                    "bytes (at most %u zero pages)", max_slots, zero_slots,
                    page_size, MS_STORE_MAX_ZERO_SLOTS);
        return NULL;
    }
    s->refs = g_new0(uint32_t, max_slots);
    s->hash = g_new0(uint64_t, max_slots);
    s->next = g_new0(uint32_t, max_slots);
    s->published = g_new0(uint8_t, max_slots);
    s->used = g_new0(uint64_t, (max_slots + BITS_PER_WORD - 1) / BITS_PER_WORD);
    s->index = g_hash_table_new(g_int64_hash, g_int64_equal);
    if (!ms_hash_key_init(&s->key, errp) || !open_memfd(s, errp)) {
        return NULL;
    }
    return g_steal_pointer(&s);
}

void ms_store_free(MsStore *s)
{
    if (!s) {
        return;
    }
    if (s->view) {
        munmap(s->view, total_slots(s) * s->page_size);
    }
    if (s->ro_fd >= 0) {
        close(s->ro_fd);
    }
    if (s->fd >= 0) {
        close(s->fd);
    }
    if (s->index) {
        g_hash_table_destroy(s->index);
    }
    g_free(s->refs);
    g_free(s->hash);
    g_free(s->next);
    g_free(s->published);
    g_free(s->used);
    g_free(s);
}

size_t ms_store_page_size(const MsStore *s)
{
    return s->page_size;
}

uint32_t ms_store_max_slots(const MsStore *s)
{
    return s->nslots;
}

int ms_store_ro_fd(const MsStore *s)
{
    return s->ro_fd;
}

off_t ms_store_offset(const MsStore *s, uint32_t slot)
{
    return (off_t)slot * s->page_size;
}

uint32_t ms_store_zero_slots(const MsStore *s)
{
    return s->nzero;
}

uint32_t ms_store_zero_slot(const MsStore *s, uint64_t index)
{
    return s->nzero ? s->nslots + (uint32_t)(index % s->nzero) : MS_SLOT_NONE;
}

bool ms_store_is_zero_slot(const MsStore *s, uint32_t slot)
{
    return slot >= s->nslots && slot < total_slots(s);
}

const void *ms_store_view(const MsStore *s, uint32_t slot)
{
    g_assert(slot < total_slots(s));
    return s->view + (size_t)slot * s->page_size;
}

uint64_t ms_store_hash(const MsStore *s, const void *page)
{
    return ms_hash_page(&s->key, page, s->page_size);
}

bool ms_store_set_key(MsStore *s, const MsHashKey *key, GError **errp)
{
    if (s->nr_published) {
        g_set_error(errp, MS_ENGINE_ERROR, EBUSY,
                    "cannot change the hash key of a store that holds %"
                    PRIu64 " published pages", s->nr_published);
        return false;
    }
    s->key = *key;
    return true;
}

bool ms_store_has_key(const MsStore *s, const MsHashKey *key)
{
    return !memcmp(s->key.secret, key->secret, sizeof(key->secret));
}

static bool run_is_free(const MsStore *s, uint32_t first, uint32_t n)
{
    if (first >= s->nslots || n > s->nslots - first) {
        return false;
    }
    for (uint32_t i = first; i < first + n; i++) {
        if (slot_used(s, i)) {
            return false;
        }
    }
    return true;
}

/* First run of @n free slots starting in [from, to), or MS_SLOT_NONE */
static uint32_t find_free_run(const MsStore *s, uint32_t from, uint32_t to,
                              uint32_t n)
{
    uint64_t i = from;

    while (i < to && i + n <= s->nslots) {
        uint64_t j;

        /* Skip full words at once: a busy store is mostly full words */
        if (i % BITS_PER_WORD == 0 && s->used[i / BITS_PER_WORD] == ~0ULL) {
            i += BITS_PER_WORD;
            continue;
        }
        for (j = i; j < i + n && !slot_used(s, j); j++) {
            /* count free slots from i */
        }
        if (j == i + n) {
            return i;
        }
        i = j + 1;
    }
    return MS_SLOT_NONE;
}

bool ms_store_alloc_run(MsStore *s, uint32_t hint, uint32_t n,
                        uint32_t *first, GError **errp)
{
    uint32_t r = MS_SLOT_NONE;

    if (n == 0 || n > s->nslots) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "cannot allocate a run of %u slots in a store of %u",
                    n, s->nslots);
        return false;
    }
    if (hint != MS_SLOT_NONE && run_is_free(s, hint, n)) {
        r = hint;
    }
    if (r == MS_SLOT_NONE) {
        r = find_free_run(s, s->cursor, s->nslots, n);
    }
    if (r == MS_SLOT_NONE) {
        r = find_free_run(s, 0, s->cursor, n);
    }
    if (r == MS_SLOT_NONE) {
        g_set_error(errp, MS_ENGINE_ERROR, ENOSPC,
                    "store has no run of %u free slots (%" PRIu64
                    " of %u used)", n, s->slots_used, s->nslots);
        return false;
    }
    for (uint32_t i = r; i < r + n; i++) {
        set_used(s, i, true);
        s->refs[i] = 1;
    }
    s->slots_used += n;
    s->nr_refs += n;
    s->cursor = (r + n) % s->nslots;
    *first = r;
    return true;
}

static void index_add(MsStore *s, uint32_t slot)
{
    gpointer head = g_hash_table_lookup(s->index, &s->hash[slot]);

    s->next[slot] = head ? GPOINTER_TO_UINT(head) - 1 : MS_SLOT_NONE;
    /* The key must live as long as the entry: the head slot's hash */
    g_hash_table_replace(s->index, &s->hash[slot], GUINT_TO_POINTER(slot + 1));
}

static void index_remove(MsStore *s, uint32_t slot)
{
    gpointer v = g_hash_table_lookup(s->index, &s->hash[slot]);
    uint32_t head = GPOINTER_TO_UINT(v) - 1;

    g_assert(v);
    if (head == slot) {
        if (s->next[slot] == MS_SLOT_NONE) {
            g_hash_table_remove(s->index, &s->hash[slot]);
        } else {
            uint32_t n = s->next[slot];

            g_hash_table_replace(s->index, &s->hash[n],
                                 GUINT_TO_POINTER(n + 1));
        }
        return;
    }
    for (uint32_t i = head; i != MS_SLOT_NONE; i = s->next[i]) {
        if (s->next[i] == slot) {
            s->next[i] = s->next[slot];
            return;
        }
    }
    g_assert_not_reached();
}

bool ms_store_publish(MsStore *s, uint32_t slot, const void *content,
                      GError **errp)
{
    size_t done = 0;

    g_assert(slot < s->nslots && slot_used(s, slot));
    if (s->published[slot]) {
        g_set_error(errp, MS_ENGINE_ERROR, EEXIST,
                    "store slot %u is already published", slot);
        return false;
    }
    while (done < s->page_size) {
        ssize_t n = pwrite(s->fd, (const uint8_t *)content + done,
                           s->page_size - done,
                           ms_store_offset(s, slot) + done);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            g_set_error(errp, MS_ENGINE_ERROR, n < 0 ? errno : EIO,
                        "cannot write store slot %u: %s", slot,
                        n < 0 ? g_strerror(errno) : "short write");
            return false;
        }
        done += n;
    }
    s->hash[slot] = ms_store_hash(s, ms_store_view(s, slot));
    s->published[slot] = 1;
    s->nr_published++;
    index_add(s, slot);
    return true;
}

uint32_t ms_store_find(const MsStore *s, uint64_t hash, const void *content)
{
    gpointer v = g_hash_table_lookup(s->index, &hash);

    for (uint32_t i = v ? GPOINTER_TO_UINT(v) - 1 : MS_SLOT_NONE;
         i != MS_SLOT_NONE; i = s->next[i]) {
        if (!memcmp(ms_store_view(s, i), content, s->page_size)) {
            return i;
        }
    }
    return MS_SLOT_NONE;
}

void ms_store_get(MsStore *s, uint32_t slot)
{
    if (ms_store_is_zero_slot(s, slot)) {
        return;
    }
    g_assert(slot < s->nslots && s->refs[slot] > 0 &&
             s->refs[slot] < UINT32_MAX);
    s->refs[slot]++;
    s->nr_refs++;
}

static void release_slot(MsStore *s, uint32_t slot)
{
    if (s->published[slot]) {
        index_remove(s, slot);
        s->published[slot] = 0;
        s->nr_published--;
    }
    /*
     * Also for a slot that was never published: a failed publish may have
     * written part of it.  If the punch fails the memory stays held, but
     * reusing the slot is still correct: publish overwrites all of it.
     */
    if (fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  ms_store_offset(s, slot), s->page_size) < 0) {
        g_warning("mem-share: cannot release store slot %u: %s", slot,
                  g_strerror(errno));
    }
    set_used(s, slot, false);
    s->slots_used--;
}

bool ms_store_put(MsStore *s, uint32_t slot)
{
    if (ms_store_is_zero_slot(s, slot)) {
        return false;
    }
    g_assert(slot < s->nslots && s->refs[slot] > 0);
    s->nr_refs--;
    if (--s->refs[slot] > 0) {
        return false;
    }
    release_slot(s, slot);
    return true;
}

uint32_t ms_store_refs(const MsStore *s, uint32_t slot)
{
    if (ms_store_is_zero_slot(s, slot)) {
        return 0;
    }
    g_assert(slot < s->nslots);
    return s->refs[slot];
}

bool ms_store_is_published(const MsStore *s, uint32_t slot)
{
    if (ms_store_is_zero_slot(s, slot)) {
        return false;
    }
    g_assert(slot < s->nslots);
    return s->published[slot];
}

/* Pages of the zero region that reads have filled (mincore: no fault) */
static uint64_t zero_resident(const MsStore *s)
{
    g_autofree unsigned char *vec = NULL;
    uint64_t n = 0;

    if (!s->nzero) {
        return 0;
    }
    vec = g_malloc(s->nzero);
    if (mincore(s->view + (size_t)s->nslots * s->page_size,
                (size_t)s->nzero * s->page_size, vec) < 0) {
        return s->nzero;    /* cannot tell: assume the worst */
    }
    for (uint32_t i = 0; i < s->nzero; i++) {
        n += vec[i] & 1;
    }
    return n;
}

void ms_store_get_stats(const MsStore *s, MsStoreStats *st)
{
    st->slots = s->nslots;
    st->slots_used = s->slots_used;
    st->published = s->nr_published;
    st->zero_slots = s->nzero;
    st->zero_held = zero_resident(s);
    st->bytes_held = (s->nr_published + st->zero_held) * s->page_size;
    st->refs = s->nr_refs;
}
