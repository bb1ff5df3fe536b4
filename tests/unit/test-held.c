/*
 * Unit tests for the broker's per-client reference counts (held.c)
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The counts decide which RELEASEs the broker accepts: a count too high
 * lets a client free a slot other guests map (their pages would read
 * zeros), one too low disconnects an honest client.  Every operation is
 * checked against a plain array of counts.
 */

#include <glib.h>

#include "held.h"

/* Three pages of counts and part of a fourth */
#define NSLOTS (3 * 4096 + 100)

/*
 * @h and @model agree on every slot, and ms_held_next() finds exactly
 * the slots with references
 */
static void check_model(const MsHeld *h, const uint32_t *model,
                        uint32_t nslots)
{
    uint32_t next = ms_held_next(h, 0);

    for (uint32_t s = 0; s < nslots; s++) {
        g_assert_cmpuint(ms_held_get(h, s), ==, model[s]);
        if (model[s]) {
            g_assert_cmpuint(next, ==, s);
            next = ms_held_next(h, s + 1);
        }
    }
    g_assert_cmpuint(next, ==, UINT32_MAX);
}

/* Random holds and releases, some slots far past the one-byte counts */
static void test_model(void)
{
    g_autofree uint32_t *model = g_new0(uint32_t, NSLOTS);
    g_autoptr(GRand) rand = g_rand_new_with_seed(20261207);
    MsHeld *h = ms_held_new(NSLOTS);
    size_t empty = ms_held_bytes(h);

    for (int round = 0; round < 200000; round++) {
        /* A few hot slots collect hundreds of references */
        uint32_t s = g_rand_int_range(rand, 0, 8) == 0 ?
                     g_rand_int_range(rand, 0, 4) * 4096 + 7 :
                     g_rand_int_range(rand, 0, NSLOTS);

        if (g_rand_int_range(rand, 0, 4)) {
            g_assert_cmpuint(ms_held_add(h, s), ==, model[s]);
            model[s]++;
        } else if (model[s]) {
            uint32_t refs = g_rand_int_range(rand, 1, MIN(model[s], 3) + 1);

            g_assert_cmpuint(ms_held_sub(h, s, refs), ==, model[s] - refs);
            model[s] -= refs;
        }
    }
    check_model(h, model, NSLOTS);
    g_assert_cmpuint(ms_held_get(h, 7), >, 255);

    /* Give everything back: the memory goes back too */
    for (uint32_t s = ms_held_next(h, 0); s != UINT32_MAX;
         s = ms_held_next(h, s + 1)) {
        g_assert_cmpuint(ms_held_sub(h, s, model[s]), ==, 0);
        model[s] = 0;
    }
    check_model(h, model, NSLOTS);
    g_assert_cmpuint(ms_held_bytes(h), ==, empty);
    ms_held_free(h);
}

/* A count crossing the one-byte limit both ways keeps its value */
static void test_big(void)
{
    MsHeld *h = ms_held_new(NSLOTS);
    size_t empty = ms_held_bytes(h);

    for (uint32_t n = 0; n < 600; n++) {
        g_assert_cmpuint(ms_held_add(h, 4095), ==, n);
    }
    g_assert_cmpuint(ms_held_get(h, 4095), ==, 600);
    g_assert_cmpuint(ms_held_sub(h, 4095, 345), ==, 255);
    g_assert_cmpuint(ms_held_sub(h, 4095, 1), ==, 254);
    g_assert_cmpuint(ms_held_add(h, 4095), ==, 254);
    g_assert_cmpuint(ms_held_add(h, 4095), ==, 255);
    g_assert_cmpuint(ms_held_get(h, 4095), ==, 256);
    g_assert_cmpuint(ms_held_get(h, 4094), ==, 0);
    g_assert_cmpuint(ms_held_get(h, 4096), ==, 0);
    g_assert_cmpuint(ms_held_sub(h, 4095, 256), ==, 0);
    g_assert_cmpuint(ms_held_next(h, 0), ==, UINT32_MAX);
    g_assert_cmpuint(ms_held_bytes(h), ==, empty);
    ms_held_free(h);
}

/* Slots a client names that the store does not have hold nothing */
static void test_bounds(void)
{
    MsHeld *h = ms_held_new(NSLOTS);
    MsHeld *none = ms_held_new(0);

    ms_held_add(h, NSLOTS - 1);
    g_assert_cmpuint(ms_held_get(h, NSLOTS - 1), ==, 1);
    g_assert_cmpuint(ms_held_get(h, NSLOTS), ==, 0);
    g_assert_cmpuint(ms_held_get(h, UINT32_MAX), ==, 0);
    g_assert_cmpuint(ms_held_next(h, 0), ==, NSLOTS - 1);
    g_assert_cmpuint(ms_held_next(h, NSLOTS), ==, UINT32_MAX);
    g_assert_cmpuint(ms_held_next(h, UINT32_MAX), ==, UINT32_MAX);
    g_assert_cmpuint(ms_held_get(none, 0), ==, 0);
    g_assert_cmpuint(ms_held_next(none, 0), ==, UINT32_MAX);
    ms_held_free(h);
    ms_held_free(none);
    ms_held_free(NULL);
}

/*
 * What a fleet member costs: 69k slots spread over a 1 GiB store (every
 * third slot), one held many times.  At most a byte a slot of the
 * store and the page pointers; the hash table it replaced took 1.5 MiB.
 */
static void test_bytes(void)
{
    const uint32_t nslots = 262144;
    MsHeld *h = ms_held_new(nslots);

    for (uint32_t s = 0; s < 3 * 69000; s += 3) {
        ms_held_add(h, s);
    }
    for (uint32_t n = 0; n < 1000; n++) {
        ms_held_add(h, 42);
    }
    g_assert_cmpuint(ms_held_get(h, 42), ==, 1001);
    g_assert_cmpuint(ms_held_bytes(h), <=,
                     nslots + nslots / 4096 * (sizeof(void *) + 64) + 4096);
    ms_held_free(h);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/held/model", test_model);
    g_test_add_func("/held/big", test_big);
    g_test_add_func("/held/bounds", test_bounds);
    g_test_add_func("/held/bytes", test_bytes);
    return g_test_run();
}
