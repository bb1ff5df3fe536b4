/*
 * mem-share-broker: the references a client holds, per store slot
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * A member of a group holds tens of thousands of slots, spread over the
 * whole store: the store allocates next-fit (store.c), so the slots in
 * use move round it as pages come and go.  A GHashTable of slot -> count
 * took about 22 bytes a slot, 1.5 MiB for a fleet guest's 69k slots.
 *
 * Nearly every count is small: a member holds a slot once for each of
 * its pages with that content, and a content repeated hundreds of times
 * in one guest is rare.  So a count is one byte, in pages of
 * HELD_PAGE_SLOTS counts allocated when the first of their slots is held
 * and freed when the last is dropped; a count of HELD_BIG or more is
 * marked HELD_BIG in its byte and kept in a hash table.  A member then
 * costs at most one byte a slot of the store (256 KiB for 1 GiB), less
 * where its slots leave whole pages empty.
 */

#include <glib.h>

#include "held.h"

/* Slots per page of counts: a page of memory */
#define HELD_SHIFT 12
#define HELD_PAGE_SLOTS (1u << HELD_SHIFT)
/* A count this high or higher is kept in MsHeld.big */
#define HELD_BIG UINT8_MAX

typedef struct HeldPage {
    uint32_t nheld;             /* slots of the page with references */
    uint8_t refs[HELD_PAGE_SLOTS];
} HeldPage;

struct MsHeld {
    uint32_t nslots;
    uint32_t npages;
    HeldPage **pages;           /* NULL where no slot is held */
    uint32_t npages_used;       /* pages allocated */
    GHashTable *big;            /* slot -> count, counts of HELD_BIG on */
};

MsHeld *ms_held_new(uint32_t nslots)
{
    MsHeld *h = g_new0(MsHeld, 1);

    h->nslots = nslots;
    h->npages = (uint32_t)(((uint64_t)nslots + HELD_PAGE_SLOTS - 1) >>
                           HELD_SHIFT);
    h->pages = g_new0(HeldPage *, h->npages);
    h->big = g_hash_table_new(g_direct_hash, g_direct_equal);
    return h;
}

void ms_held_free(MsHeld *h)
{
    if (!h) {
        return;
    }
    for (uint32_t p = 0; p < h->npages; p++) {
        g_free(h->pages[p]);
    }
    g_free(h->pages);
    g_hash_table_destroy(h->big);
    g_free(h);
}

uint32_t ms_held_get(const MsHeld *h, uint32_t slot)
{
    const HeldPage *page;
    uint8_t n;

    if (slot >= h->nslots) {
        return 0;
    }
    page = h->pages[slot >> HELD_SHIFT];
    if (!page) {
        return 0;
    }
    n = page->refs[slot & (HELD_PAGE_SLOTS - 1)];
    if (n < HELD_BIG) {
        return n;
    }
    return GPOINTER_TO_UINT(g_hash_table_lookup(h->big,
                                                GUINT_TO_POINTER(slot)));
}

/* Make @slot's count @n (it was @old) */
static void held_set(MsHeld *h, uint32_t slot, uint32_t old, uint32_t n)
{
    HeldPage **pp = &h->pages[slot >> HELD_SHIFT];
    uint32_t i = slot & (HELD_PAGE_SLOTS - 1);

    if (!*pp) {
        *pp = g_new0(HeldPage, 1);
        h->npages_used++;
    }
    if (n >= HELD_BIG) {
        g_hash_table_insert(h->big, GUINT_TO_POINTER(slot),
                            GUINT_TO_POINTER(n));
    } else if (old >= HELD_BIG) {
        g_hash_table_remove(h->big, GUINT_TO_POINTER(slot));
    }
    (*pp)->refs[i] = MIN(n, HELD_BIG);
    if (old == 0) {
        (*pp)->nheld++;
    } else if (n == 0 && --(*pp)->nheld == 0) {
        /* A client that gives its slots back gives the memory back */
        g_free(*pp);
        *pp = NULL;
        h->npages_used--;
    }
}

uint32_t ms_held_add(MsHeld *h, uint32_t slot)
{
    uint32_t n = ms_held_get(h, slot);

    g_assert(slot < h->nslots && n < UINT32_MAX);
    held_set(h, slot, n, n + 1);
    return n;
}

uint32_t ms_held_sub(MsHeld *h, uint32_t slot, uint32_t refs)
{
    uint32_t n = ms_held_get(h, slot);

    g_assert(refs <= n);
    if (refs) {
        held_set(h, slot, n, n - refs);
    }
    return n - refs;
}

uint32_t ms_held_next(const MsHeld *h, uint32_t slot)
{
    uint64_t s = slot;

    while (s < h->nslots) {
        const HeldPage *page = h->pages[s >> HELD_SHIFT];
        uint64_t end = MIN((uint64_t)h->nslots,
                           (s | (HELD_PAGE_SLOTS - 1)) + 1);

        if (page) {
            for (; s < end; s++) {
                if (page->refs[s & (HELD_PAGE_SLOTS - 1)]) {
                    return s;
                }
            }
        }
        s = end;
    }
    return UINT32_MAX;
}

size_t ms_held_bytes(const MsHeld *h)
{
    return sizeof(*h) + h->npages * sizeof(HeldPage *) +
           (size_t)h->npages_used * sizeof(HeldPage) +
           g_hash_table_size(h->big) * 2 * sizeof(gpointer);
}
