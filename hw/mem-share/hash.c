/*
 * mem-share engine: keyed page hashing
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The scanner hashes every stable page and looks the hash up in the
 * store's index; a hash only nominates candidates, the merge always
 * compares bytes.  The hash therefore needs speed more than strength, but
 * it must not be predictable: with a fixed function a guest could fill
 * its memory with pages that all land on one hash and turn every lookup
 * into a long chain of byte comparisons.  XXH3 with a custom secret
 * (Debian's libxxhash, ~18 GB/s) is keyed: the secret is drawn from
 * getrandom() per store and never leaves the host.
 *
 * ms_page_is_zero() is separate because zero pages are by far the most
 * common duplicate and need no store slot: they become holes.
 */

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>
#include <xxhash.h>

#include "mem-share/hash.h"

G_STATIC_ASSERT(MS_HASH_SECRET_SIZE >= XXH3_SECRET_SIZE_MIN);

bool ms_hash_key_init(MsHashKey *key, GError **errp)
{
    size_t done = 0;

    while (done < sizeof(key->secret)) {
        ssize_t n = getrandom(key->secret + done,
                              sizeof(key->secret) - done, 0);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            g_set_error(errp, MS_ENGINE_ERROR, n < 0 ? errno : EIO,
                        "cannot draw the hash secret from getrandom(): %s",
                        n < 0 ? g_strerror(errno) : "no data");
            return false;
        }
        done += n;
    }
    return true;
}

uint64_t ms_hash_page(const MsHashKey *key, const void *page, size_t page_size)
{
    return XXH3_64bits_withSecret(page, page_size, key->secret,
                                  sizeof(key->secret));
}

/*
 * OR 64 bytes at a time so that the compiler vectorises the inner loop,
 * and leave at the first non-zero block: most non-zero pages differ from
 * zero in their first bytes.
 */
size_t ms_host_page_size(void)
{
    return sysconf(_SC_PAGESIZE);
}

bool ms_page_is_zero(const void *page, size_t page_size)
{
    const uint64_t *p = page;
    size_t words = page_size / sizeof(*p);
    size_t i;

    for (i = 0; i + 8 <= words; i += 8) {
        uint64_t acc = 0;

        for (size_t j = 0; j < 8; j++) {
            acc |= p[i + j];
        }
        if (acc) {
            return false;
        }
    }
    for (; i < words; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

void ms_fatal(const char *fmt, ...)
{
    va_list ap;

    fputs("mem-share: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    abort();
}
