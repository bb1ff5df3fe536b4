/*
 * Unit tests for the mem-share store, its slot allocator and the keyed
 * page hash
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The store is a real memfd: what it holds is checked through the
 * memfd's allocated blocks (SEEK_DATA / st_blocks) and through mappings
 * of its read-only descriptor, the way guests see it.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <glib.h>

#include "mem-share/hash.h"
#include "mem-share/store.h"

static size_t page;

static void fill(void *buf, uint64_t seed)
{
    uint64_t *p = buf;

    for (size_t i = 0; i < page / sizeof(*p); i++) {
        p[i] = seed * 0x9e3779b97f4a7c15ULL + i;
    }
}

static MsStore *new_store(uint32_t slots)
{
    g_autoptr(GError) err = NULL;
    MsStore *s = ms_store_new(page, slots, &err);

    g_assert_no_error(err);
    g_assert_nonnull(s);
    return s;
}

static uint32_t alloc(MsStore *s, uint32_t hint, uint32_t n)
{
    g_autoptr(GError) err = NULL;
    uint32_t first = MS_SLOT_NONE;

    g_assert_true(ms_store_alloc_run(s, hint, n, &first, &err));
    g_assert_no_error(err);
    return first;
}

static void publish(MsStore *s, uint32_t slot, uint64_t seed)
{
    g_autoptr(GError) err = NULL;
    g_autofree void *buf = g_malloc(page);

    fill(buf, seed);
    g_assert_true(ms_store_publish(s, slot, buf, &err));
    g_assert_no_error(err);
}

/* Is the memfd page of @slot backed by memory? */
static bool slot_has_data(MsStore *s, uint32_t slot)
{
    off_t off = ms_store_offset(s, slot);
    off_t data = lseek(ms_store_ro_fd(s), off, SEEK_DATA);

    return data == off;
}

static void test_hash_keyed(void)
{
    g_autoptr(MsStore) a = new_store(4);
    g_autoptr(MsStore) b = new_store(4);
    g_autofree void *buf = g_malloc(page);
    g_autofree void *copy = NULL;

    fill(buf, 1);
    copy = g_memdup2(buf, page);
    g_assert_cmpuint(ms_store_hash(a, buf), ==, ms_store_hash(a, copy));
    g_assert_cmpuint(ms_store_hash(b, buf), ==, ms_store_hash(b, copy));
    /* Different secrets: 2^-64 chance of a false failure */
    g_assert_cmpuint(ms_store_hash(a, buf), !=, ms_store_hash(b, buf));
    ((uint8_t *)copy)[page - 1] ^= 1;
    g_assert_cmpuint(ms_store_hash(a, buf), !=, ms_store_hash(a, copy));
}

/* A group member's store takes the group's key, until it publishes */
static void test_set_key(void)
{
    g_autoptr(MsStore) s = new_store(4);
    g_autoptr(MsStore) other = new_store(4);
    g_autoptr(GError) err = NULL;
    g_autofree void *buf = g_malloc(page);
    MsHashKey key;
    uint32_t slot;

    g_assert_true(ms_hash_key_init(&key, &err));
    fill(buf, 9);
    g_assert_false(ms_store_has_key(s, &key));
    g_assert_true(ms_store_set_key(s, &key, &err));
    g_assert_no_error(err);
    g_assert_true(ms_store_has_key(s, &key));
    g_assert_false(ms_store_has_key(other, &key));
    g_assert_cmphex(ms_store_hash(s, buf), ==, ms_hash_page(&key, buf, page));

    slot = alloc(s, MS_SLOT_NONE, 1);
    g_assert_true(ms_store_publish(s, slot, buf, &err));
    g_assert_no_error(err);
    /* The index holds hashes of this key now: no other may replace it */
    g_assert_false(ms_store_set_key(s, &key, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EBUSY);
    g_assert_true(ms_store_has_key(s, &key));
    g_assert_cmpuint(ms_store_find(s, ms_hash_page(&key, buf, page), buf),
                     ==, slot);
}

static void test_page_is_zero(void)
{
    g_autofree uint8_t *buf = g_malloc0(page);

    g_assert_true(ms_page_is_zero(buf, page));
    for (size_t i = 0; i < page; i += page / 8 - 1) {
        buf[i] = 1;
        g_assert_false(ms_page_is_zero(buf, page));
        buf[i] = 0;
    }
    buf[page - 1] = 0x80;
    g_assert_false(ms_page_is_zero(buf, page));
}

static void test_geometry(void)
{
    g_autoptr(GError) err = NULL;

    g_assert_null(ms_store_new(page, 0, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EINVAL);
}

static void test_alloc_runs(void)
{
    g_autoptr(MsStore) s = new_store(64);
    g_autoptr(GError) err = NULL;
    MsStoreStats st;
    uint32_t a, b, c, d, first;

    a = alloc(s, MS_SLOT_NONE, 4);
    g_assert_cmpuint(a, ==, 0);
    /* The hint is honoured: the run continues right after the previous */
    b = alloc(s, a + 4, 2);
    g_assert_cmpuint(b, ==, 4);
    /* A used hint falls back to next-fit */
    c = alloc(s, a, 3);
    g_assert_cmpuint(c, ==, 6);
    /* A free hint far away is honoured too */
    d = alloc(s, 40, 8);
    g_assert_cmpuint(d, ==, 40);
    for (uint32_t i = 0; i < 4; i++) {
        g_assert_cmpuint(ms_store_refs(s, a + i), ==, 1);
    }
    ms_store_get_stats(s, &st);
    g_assert_cmpuint(st.slots_used, ==, 17);
    g_assert_cmpuint(st.published, ==, 0);
    g_assert_cmpuint(st.bytes_held, ==, 0);

    /* Hint past the end, and a zero-length run, are handled */
    first = alloc(s, 63, 2);
    g_assert_cmpuint(first, !=, 63);
    g_assert_false(ms_store_alloc_run(s, MS_SLOT_NONE, 0, &first, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EINVAL);
}

static void test_alloc_fragmented(void)
{
    g_autoptr(MsStore) s = new_store(16);
    g_autoptr(GError) err = NULL;
    uint32_t first;

    /* Fill the store one slot at a time, then free every other slot */
    for (uint32_t i = 0; i < 16; i++) {
        g_assert_cmpuint(alloc(s, MS_SLOT_NONE, 1), ==, i);
    }
    g_assert_false(ms_store_alloc_run(s, MS_SLOT_NONE, 1, &first, &err));
    g_assert_error(err, MS_ENGINE_ERROR, ENOSPC);
    g_clear_error(&err);
    for (uint32_t i = 0; i < 16; i += 2) {
        g_assert_true(ms_store_put(s, i));
    }
    /* No two free slots are adjacent: a run of two fails cleanly */
    g_assert_false(ms_store_alloc_run(s, MS_SLOT_NONE, 2, &first, &err));
    g_assert_error(err, MS_ENGINE_ERROR, ENOSPC);
    g_clear_error(&err);
    /* Free 9 and 11 too: 8..12 is the only run of five */
    g_assert_true(ms_store_put(s, 9));
    g_assert_true(ms_store_put(s, 11));
    g_assert_cmpuint(alloc(s, 2, 5), ==, 8);
    /* Single slots still fit in the holes: next-fit, then wrapping */
    g_assert_cmpuint(alloc(s, MS_SLOT_NONE, 1), ==, 14);
    g_assert_cmpuint(alloc(s, MS_SLOT_NONE, 1), ==, 0);
}

static void test_alloc_wraps(void)
{
    g_autoptr(MsStore) s = new_store(8);

    g_assert_cmpuint(alloc(s, MS_SLOT_NONE, 6), ==, 0);
    for (uint32_t i = 0; i < 3; i++) {
        ms_store_put(s, i);
    }
    /* Next-fit finds no run of 3 after slot 6: it wraps to the start */
    g_assert_cmpuint(alloc(s, MS_SLOT_NONE, 3), ==, 0);
}

static void test_refcount_punch(void)
{
    g_autoptr(MsStore) s = new_store(8);
    struct stat st0, st1;
    MsStoreStats st;
    uint32_t slot = alloc(s, MS_SLOT_NONE, 2);

    g_assert_false(slot_has_data(s, slot));
    g_assert_cmpint(fstat(ms_store_ro_fd(s), &st0), ==, 0);
    publish(s, slot, 7);
    publish(s, slot + 1, 8);
    g_assert_true(slot_has_data(s, slot));
    g_assert_true(slot_has_data(s, slot + 1));
    g_assert_cmpint(fstat(ms_store_ro_fd(s), &st1), ==, 0);
    g_assert_cmpint(st1.st_blocks - st0.st_blocks, ==, 2 * page / 512);

    ms_store_get(s, slot);
    ms_store_get(s, slot);
    g_assert_cmpuint(ms_store_refs(s, slot), ==, 3);
    ms_store_get_stats(s, &st);
    g_assert_cmpuint(st.refs, ==, 4);
    g_assert_cmpuint(st.published, ==, 2);
    g_assert_cmpuint(st.bytes_held, ==, 2 * page);

    /* Every reference but the last keeps the page */
    g_assert_false(ms_store_put(s, slot));
    g_assert_false(ms_store_put(s, slot));
    g_assert_true(slot_has_data(s, slot));
    g_assert_true(ms_store_is_published(s, slot));
    g_assert_true(ms_store_put(s, slot));
    g_assert_false(slot_has_data(s, slot));
    g_assert_true(slot_has_data(s, slot + 1));
    g_assert_false(ms_store_is_published(s, slot));
    g_assert_cmpint(fstat(ms_store_ro_fd(s), &st1), ==, 0);
    g_assert_cmpint(st1.st_blocks - st0.st_blocks, ==, page / 512);

    ms_store_get_stats(s, &st);
    g_assert_cmpuint(st.slots_used, ==, 1);
    g_assert_cmpuint(st.published, ==, 1);
    g_assert_cmpuint(st.refs, ==, 1);
    /* The freed slot is allocated again */
    g_assert_cmpuint(alloc(s, slot, 1), ==, slot);
}

static void test_publish_immutable(void)
{
    g_autoptr(MsStore) s = new_store(4);
    g_autoptr(GError) err = NULL;
    g_autofree void *buf = g_malloc(page);
    g_autofree void *other = g_malloc(page);
    uint32_t slot = alloc(s, MS_SLOT_NONE, 1);
    uint8_t *guest;

    fill(buf, 3);
    fill(other, 4);
    g_assert_true(ms_store_publish(s, slot, buf, &err));
    g_assert_cmpmem(ms_store_view(s, slot), page, buf, page);

    /* A second publish is refused and changes nothing */
    g_assert_false(ms_store_publish(s, slot, other, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EEXIST);
    g_assert_cmpmem(ms_store_view(s, slot), page, buf, page);

    /* The descriptor guests get is read-only */
    g_assert_true(mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED,
                       ms_store_ro_fd(s), 0) == MAP_FAILED);
    g_assert_cmpint(write(ms_store_ro_fd(s), buf, 1), ==, -1);

    /* A guest's private writable mapping copies on write */
    guest = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE,
                 ms_store_ro_fd(s), ms_store_offset(s, slot));
    g_assert_true(guest != MAP_FAILED);
    g_assert_cmpmem(guest, page, buf, page);
    guest[0] ^= 0xff;
    g_assert_cmpmem(ms_store_view(s, slot), page, buf, page);
    munmap(guest, page);
}

/*
 * The descriptor guests get may go to other processes (a broker's
 * members): it must not lead back to a writable or resizable memfd.
 * Its mode is 0, so no one without CAP_DAC_OVERRIDE reopens it by path,
 * and it is sealed against resizing, but not against the owner's writes
 * and punches, which must keep working.  test-store-attack.c plays the
 * hostile member as another uid.
 */
static void test_sealed(void)
{
    g_autoptr(MsStore) s = NULL;
    g_autoptr(GError) err = NULL;
    int fd, plain, seals, pipefd[2];
    struct stat st;
    uint32_t slot;

    s = ms_store_new_with_zero(page, 8, 4, &err);
    g_assert_no_error(err);
    fd = ms_store_ro_fd(s);

    g_assert_cmpint(fstat(fd, &st), ==, 0);
    g_assert_cmpint(st.st_size, ==, 12 * page);
    g_assert_cmpint(st.st_mode & 07777, ==, 0);
    seals = fcntl(fd, F_GET_SEALS);
    g_assert_cmpint(seals, ==, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    g_assert_true(ms_store_fd_sealed(fd));

    /* The owner still publishes into the sealed store and punches it */
    slot = alloc(s, MS_SLOT_NONE, 2);
    publish(s, slot, 5);
    publish(s, slot + 1, 6);
    g_assert_true(slot_has_data(s, slot));
    g_assert_true(ms_store_put(s, slot));
    g_assert_false(slot_has_data(s, slot));
    g_assert_true(slot_has_data(s, slot + 1));
    /* The zero region reads as zeros and the size never changed */
    g_assert_true(ms_page_is_zero(
        ms_store_view(s, ms_store_zero_slot(s, 3)), page));
    g_assert_cmpint(fstat(fd, &st), ==, 0);
    g_assert_cmpint(st.st_size, ==, 12 * page);

    /* An unsealed memfd, one sealed only half-way, not a memfd at all */
    plain = memfd_create("plain", MFD_CLOEXEC);
    g_assert_cmpint(plain, >=, 0);
    g_assert_false(ms_store_fd_sealed(plain));
    close(plain);
    plain = memfd_create("half", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    g_assert_cmpint(plain, >=, 0);
    g_assert_cmpint(fcntl(plain, F_ADD_SEALS, F_SEAL_SHRINK), ==, 0);
    g_assert_false(ms_store_fd_sealed(plain));
    g_assert_cmpint(fcntl(plain, F_ADD_SEALS, F_SEAL_GROW), ==, 0);
    g_assert_true(ms_store_fd_sealed(plain));
    close(plain);
    g_assert_cmpint(pipe(pipefd), ==, 0);
    g_assert_false(ms_store_fd_sealed(pipefd[0]));
    close(pipefd[0]);
    close(pipefd[1]);
    g_assert_false(ms_store_fd_sealed(-1));
}

static void test_index(void)
{
    g_autoptr(MsStore) s = new_store(8);
    g_autofree void *buf = g_malloc(page);
    uint32_t a = alloc(s, MS_SLOT_NONE, 3);

    fill(buf, 5);
    g_assert_cmpuint(ms_store_find(s, ms_store_hash(s, buf), buf), ==,
                     MS_SLOT_NONE);
    publish(s, a, 5);
    publish(s, a + 1, 6);
    /* The same content twice: both indexed under one hash */
    publish(s, a + 2, 5);
    g_assert_cmpuint(ms_store_find(s, ms_store_hash(s, buf), buf), ==, a + 2);
    /* A hash match alone finds nothing: bytes are compared */
    fill(buf, 6);
    g_assert_cmpuint(ms_store_find(s, ms_store_hash(s, buf) ^ 1, buf), ==,
                     MS_SLOT_NONE);
    g_assert_cmpuint(ms_store_find(s, ms_store_hash(s, buf), buf), ==, a + 1);

    /* Removing the head of a chain keeps the rest of it */
    fill(buf, 5);
    ms_store_put(s, a + 2);
    g_assert_cmpuint(ms_store_find(s, ms_store_hash(s, buf), buf), ==, a);
    ms_store_put(s, a);
    g_assert_cmpuint(ms_store_find(s, ms_store_hash(s, buf), buf), ==,
                     MS_SLOT_NONE);
    fill(buf, 6);
    g_assert_cmpuint(ms_store_find(s, ms_store_hash(s, buf), buf), ==, a + 1);
}

/* Chains of colliding hashes: unlink from the middle and the tail */
/*
 * Zero slots: after the allocatable ones, never handed out, not counted,
 * read as zeros through a guest's mapping, and filled with one page each
 * at most however many mappings read them.
 */
static void test_zero_slots(void)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsStore) s = ms_store_new_with_zero(page, 8, 4, &err);
    MsStoreStats st;
    uint32_t z, first;
    uint8_t *a, *b;

    g_assert_no_error(err);
    g_assert_cmpuint(ms_store_zero_slots(s), ==, 4);
    z = ms_store_zero_slot(s, 0);
    g_assert_cmpuint(z, ==, 8);
    g_assert_cmpuint(ms_store_zero_slot(s, 5), ==, 9);
    g_assert_true(ms_store_is_zero_slot(s, 11));
    g_assert_false(ms_store_is_zero_slot(s, 7));
    g_assert_false(ms_store_is_zero_slot(s, 12));
    /* Not reference counted, never published */
    ms_store_get(s, z);
    g_assert_false(ms_store_put(s, z));
    g_assert_cmpuint(ms_store_refs(s, z), ==, 0);
    g_assert_false(ms_store_is_published(s, z));
    /* The allocator never hands them out, even when full */
    g_assert_true(ms_store_alloc_run(s, MS_SLOT_NONE, 8, &first, &err));
    g_assert_cmpuint(first, ==, 0);
    g_assert_false(ms_store_alloc_run(s, 8, 1, &first, &err));
    g_assert_error(err, MS_ENGINE_ERROR, ENOSPC);
    g_clear_error(&err);

    /* Two private mappings of zero slot 1 read zeros and share a page */
    a = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE,
             ms_store_ro_fd(s), ms_store_offset(s, z + 1));
    b = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE,
             ms_store_ro_fd(s), ms_store_offset(s, z + 1));
    g_assert_true(a != MAP_FAILED && b != MAP_FAILED);
    ms_store_get_stats(s, &st);
    g_assert_cmpuint(st.zero_slots, ==, 4);
    g_assert_cmpuint(st.zero_held, ==, 0);
    g_assert_true(ms_page_is_zero(a, page) && ms_page_is_zero(b, page));
    ms_store_get_stats(s, &st);
    g_assert_cmpuint(st.zero_held, ==, 1);
    /* A write copies, as for any slot: the other mapping still reads 0 */
    a[0] = 1;
    g_assert_true(ms_page_is_zero(b, page));
    munmap(a, page);
    munmap(b, page);

    g_assert_null(ms_store_new_with_zero(page, 8,
                                         MS_STORE_MAX_ZERO_SLOTS + 1, &err));
    g_assert_error(err, MS_ENGINE_ERROR, EINVAL);
}

static void test_index_chain(void)
{
    g_autoptr(MsStore) s = new_store(8);
    g_autofree void *buf = g_malloc(page);
    uint32_t a = alloc(s, MS_SLOT_NONE, 4);

    for (uint32_t i = 0; i < 4; i++) {
        publish(s, a + i, 9);
    }
    fill(buf, 9);
    ms_store_put(s, a + 1);
    ms_store_put(s, a);
    ms_store_put(s, a + 3);
    g_assert_cmpuint(ms_store_find(s, ms_store_hash(s, buf), buf), ==, a + 2);
    ms_store_put(s, a + 2);
    g_assert_cmpuint(ms_store_find(s, ms_store_hash(s, buf), buf), ==,
                     MS_SLOT_NONE);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    page = ms_host_page_size();

    g_test_add_func("/hash/keyed", test_hash_keyed);
    g_test_add_func("/hash/zero", test_page_is_zero);
    g_test_add_func("/store/set-key", test_set_key);
    g_test_add_func("/store/geometry", test_geometry);
    g_test_add_func("/store/alloc/runs", test_alloc_runs);
    g_test_add_func("/store/alloc/fragmented", test_alloc_fragmented);
    g_test_add_func("/store/alloc/wraps", test_alloc_wraps);
    g_test_add_func("/store/refcount-punch", test_refcount_punch);
    g_test_add_func("/store/publish-immutable", test_publish_immutable);
    g_test_add_func("/store/sealed", test_sealed);
    g_test_add_func("/store/index", test_index);
    g_test_add_func("/store/index-chain", test_index_chain);
    g_test_add_func("/store/zero-slots", test_zero_slots);

    return g_test_run();
}
