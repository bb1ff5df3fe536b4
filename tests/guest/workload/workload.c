/*
 * mem-share guest workload: PID 1 of the test initramfs.
 *
 * Fills a region of anonymous memory with a known mix of pages and verifies
 * it byte for byte, round after round, optionally rewriting some pages.
 *
 * Parameters come from the kernel command line (/proc/cmdline), or, when the
 * program is started by hand (not PID 1), from argv ("ms.mib=8 ms.rounds=1"):
 *
 *   ms.mib=N       MiB to allocate and fill (default 64)
 *   ms.seed=N      seed of the unique pages; differs between guests (default 1)
 *   ms.zero=P      percent of zero pages (default 25)
 *   ms.shared=P    percent of shared pages (default 50); the rest is unique
 *   ms.rounds=N    verify rounds, 0 = forever (default 3)
 *   ms.rewrite=P   percent of pages rewritten each round (default 0)
 *   ms.interval=S  seconds to sleep before each round (default 2; 0: none,
 *                  the console is still read between rounds)
 *   ms.idle=1      never power off: verify every interval forever
 *   ms.corrupt=K   self-test of the verifier: flip one byte of page K-1
 *                  after the fill (0 = off, default); the first verify fails
 *   ms.virtio=1    as PID 1: load the virtio modules of the initramfs
 *                  (/lib/modules, see build.sh) before anything else, for
 *                  tests with virtio-blk, virtio-balloon or virtio-mem
 *   ms.dupmib=N    after the fill, also fill N MiB of duplicates (see
 *                  below) that a line starting with 'f' on the console
 *                  frees again (munmap): the guest's free memory then
 *                  holds pages with non-zero content that were merged,
 *                  for balloon tests (default 0: none)
 *
 * Busy mode (a guest that keeps writing after the fill; off by default):
 *   ms.busy=P      each tick, rewrite P percent of the filled pages, chosen
 *                  anew each tick (a pure function of seed, tick and page);
 *                  half of those writes store identical bytes (every word
 *                  read and stored back), half change the page (its next
 *                  generation, under the same category rules as the fill)
 *   ms.hot=1       the busy pages are the same every tick: a working set of
 *                  ms.busy percent of the pages (a pure function of seed
 *                  and page), every one of them rewritten at every tick;
 *                  the rest stays as filled (default 0: chosen anew)
 *   ms.hz=N        ticks per second (default 4); a tick that comes due while
 *                  the previous one still runs is skipped (counted: missed)
 *   ms.flip=N      pages altered and restored per second: each one is
 *                  changed (every word XORed with a key of the page) and put
 *                  back ms.flipms later (default 0: none)
 *   ms.flipms=N    milliseconds a flipped page stays altered (default 300)
 * Verification stays exact: the workload keeps each page's generation and
 * whether it is altered right now, and a verify round checks the pages in
 * chunks between ticks (writes go on while it runs) against their state at
 * that moment.  The page ms.corrupt damaged is left alone by busy writes
 * and flips, so the verifier still finds it.
 *
 * Disk mode (tests/guest/test-dma; instead of the memory fill):
 *   ms.disk=1      read /dev/vda with O_DIRECT into page-aligned buffers,
 *                  again and again, and verify every byte of every read
 *   ms.diskkib=N   KiB per read, one region of the disk (default 64)
 *   ms.diskjobs=N  processes reading at once, each into its own buffer
 *                  (default 3)
 *   ms.diskreads=N reads per process, 0 = until stopped (default 0)
 *
 * The disk holds two regions of ms.diskkib KiB, region 0 at offset 0 and
 * region 1 right after it; 4 KiB block j of region r holds the words
 * disk_word(r, j % 4, w) (see there; the test writes the same image).
 * Read k of process J reads region (k + J) % 2, so each read changes the
 * buffer's content while the buffer's pages, between reads, are copies of
 * each other and of the other processes' buffers: merge candidates.  A
 * transfer that landed in a page merged away meanwhile leaves the old
 * region's content in the buffer, which the verification reports.
 *
 * Page categories: the category of page i at generation g is a pure function
 * of (i, g); the zero/shared/unique split holds for every generation.
 *   zero:   all bytes zero
 *   shared: content is a pure function of ((i + 7 g) mod 1024, fixed key):
 *           identical across guests and repeated every 1024 pages in a guest
 *   unique: content is a function of (seed, i, g): differs between guests
 * Each round, page i is rewritten (generation + 1) iff a pure function of
 * (seed, i, round) falls below ms.rewrite percent, so verification is exact.
 *
 * Stop request: a line starting with 'q' on the console (stdin) makes the
 * workload finish the current round, print "done ok" and power off, also in
 * idle mode or with ms.rounds=0 (the tests write "q" to the serial port).
 *
 * Output lines (serial console):
 *   MS-WORKLOAD start mib=.. seed=.. zero=.. shared=.. rounds=.. rewrite=..
 *   MS-WORKLOAD filled pages=N zero=Z shared=S unique=U fp-shared=0x.. fp-unique=0x..
 *     (fp-*: fingerprints of the content of each category: fp-shared is the
 *     same in every guest with the same mib/zero/shared, fp-unique differs
 *     with the seed)
 *   MS-WORKLOAD verify round=K pages=N bad=0
 *   MS-WORKLOAD rewrite round=K pages=R
 *   MS-WORKLOAD verify round=K pages=N bad=0 after=rewrite
 *   MS-WORKLOAD dup filled pages=N period=64 (ms.dupmib)
 *   MS-WORKLOAD busy start busy=P hz=N flip=N flipms=N pages=N hot=0|1
 *     (ms.busy or ms.flip: after the fill)
 *   MS-WORKLOAD busy round=K ms=E ticks=T missed=M writes=W identical=I
 *     changed=C flips=F restored=R pending=Q verify-altered=A
 *     (after each round's first verify, also a failed one: counters since
 *     the fill, E ms after it; pending: pages altered right now;
 *     verify-altered: pages this round's verify found altered by a flip,
 *     as expected)
 *   MS-WORKLOAD dup freed pages=N (after 'f')
 *   MS-WORKLOAD done ok
 *   MS-WORKLOAD FAIL page=P cat=C gen=G word=W expected=0x.. got=0x.. bad=B pages=N
 * Disk mode:
 *   MS-WORKLOAD disk start kib=.. jobs=.. reads=..
 *   MS-WORKLOAD disk job=J reads=N bad=0          (every 256 reads)
 *   MS-WORKLOAD disk job=J done reads=N bad=0
 *   MS-WORKLOAD disk done jobs=J bad=0
 *   MS-WORKLOAD FAIL disk job=J read=K region=R page=P word=W expected=0x..
 *     got=0x.. old-region=0|1 (1: the page holds the previous read's data)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <poll.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8)
#define SHARED_SLOTS 1024u
#define SHARED_KEY 0x6d656d2d73686172ull   /* "mem-shar" */
#define CAT_KEY 0x9e3779b97f4a7c15ull
#define SEL_KEY 0xc2b2ae3d27d4eb4full

enum { CAT_ZERO, CAT_SHARED, CAT_UNIQUE };
static const char *cat_name[] = { "zero", "shared", "unique" };

static struct {
    unsigned long mib, seed, zero, shared, rounds, rewrite, interval, idle;
    unsigned long corrupt, virtio, dupmib;
    unsigned long busy, hz, flip, flipms, hot;
} P = { 64, 1, 25, 50, 3, 0, 2, 0, 0, 0, 0, 0, 4, 0, 300, 0 };

/* Disk mode (see the top comment) */
static struct {
    unsigned long on, kib, jobs, reads;
} D = { 0, 64, 3, 0 };

static int is_init;

static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if (n > (int)sizeof(buf) - 2) {
        n = sizeof(buf) - 2;
    }
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            break;
        }
        off += w;
    }
}

static void finish(int ok)
{
    if (!is_init) {
        exit(ok ? 0 : 1);
    }
    sync();
    reboot(RB_POWER_OFF);
    /* Not reached unless power off failed. */
    say("MS-WORKLOAD poweroff failed errno=%d", errno);
    for (;;) {
        pause();
    }
}

/* splitmix64 finaliser: a good 64-bit mixer. */
static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

static inline int page_cat(uint64_t i, uint32_t gen)
{
    unsigned r = mix64(i * CAT_KEY ^ ((uint64_t)gen << 40) ^ 0x5ca1ab1e) % 100;

    if (r < P.zero) {
        return CAT_ZERO;
    }
    if (r < P.zero + P.shared) {
        return CAT_SHARED;
    }
    return CAT_UNIQUE;
}

/* Start state of the xorshift stream of a page (never zero). */
static inline uint64_t page_key(uint64_t i, uint32_t gen, int cat)
{
    uint64_t k;

    if (cat == CAT_SHARED) {
        k = mix64(SHARED_KEY ^ ((i + 7ull * gen) % SHARED_SLOTS));
    } else {
        k = mix64(mix64(P.seed * 0x100000001b3ull + 0x1234567) ^
                  (i << 20) ^ gen);
    }
    return k ? k : 0x8badf00dull;
}

static inline uint64_t xs_next(uint64_t *s)
{
    uint64_t x = *s;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

/* Fill page i with its generation-gen content; returns the XOR of the
 * page's words rotated by their position (a cheap content fingerprint). */
static uint64_t fill_page(uint64_t *p, uint64_t i, uint32_t gen)
{
    int cat = page_cat(i, gen);
    uint64_t fp = 0;

    if (cat == CAT_ZERO) {
        memset(p, 0, PAGE);
        return 0;
    }
    uint64_t s = page_key(i, gen, cat);
    for (unsigned w = 0; w < WORDS; w += 4) {
        p[w] = xs_next(&s);
        p[w + 1] = xs_next(&s);
        p[w + 2] = xs_next(&s);
        p[w + 3] = xs_next(&s);
        fp ^= p[w] ^ (p[w + 1] << 1) ^ (p[w + 2] << 2) ^ (p[w + 3] << 3);
    }
    return fp;
}

/*
 * Returns -1 if the page is intact, else the index of the first bad word.
 * @x: XORed into every expected word (a page altered by a flip), else 0.
 */
static int check_page(const uint64_t *p, uint64_t i, uint32_t gen,
                      uint64_t x, uint64_t *expected)
{
    int cat = page_cat(i, gen);

    if (cat == CAT_ZERO) {
        for (unsigned w = 0; w < WORDS; w++) {
            if (p[w] != x) {
                *expected = x;
                return w;
            }
        }
        return -1;
    }
    uint64_t s = page_key(i, gen, cat);
    for (unsigned w = 0; w < WORDS; w++) {
        uint64_t e = xs_next(&s) ^ x;
        if (p[w] != e) {
            *expected = e;
            return w;
        }
    }
    return -1;
}

static int stdin_open = 1;
static int stop_requested;
static int free_requested;

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Wait up to `ms` milliseconds for console input and act on it. */
static void watch_stdin(long ms)
{
    if (!stdin_open) {
        struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };
        nanosleep(&ts, NULL);
        return;
    }
    struct pollfd pfd = { .fd = 0, .events = POLLIN };
    int r = poll(&pfd, 1, ms);
    if (r < 0 && errno != EINTR) {
        stdin_open = 0;
    } else if (r > 0) {
        char buf[256];
        ssize_t n = read(0, buf, sizeof(buf));
        if (n <= 0 || (pfd.revents & (POLLERR | POLLNVAL))) {
            stdin_open = 0;     /* EOF or no usable stdin */
            return;
        }
        for (ssize_t k = 0; k < n; k++) {
            if (buf[k] == 'q' && !stop_requested) {
                stop_requested = 1;
                say("MS-WORKLOAD stop requested");
            }
            if (buf[k] == 'f') {
                free_requested = 1;
            }
        }
    }
}

/*
 * Sleep for `sec` seconds, watching stdin for a stop request ("q").
 * With 0 (rounds back to back), still look once.
 */
static void sleep_watch(unsigned long sec)
{
    int64_t end = now_ns() + (int64_t)sec * 1000000000;

    if (!sec) {
        watch_stdin(0);
        return;
    }
    for (;;) {
        long ms = (end - now_ns()) / 1000000;
        if (ms <= 0) {
            return;
        }
        watch_stdin(ms);
    }
}

static uint8_t *mem;
static uint32_t *gen;
static uint64_t npages;

/* ---- busy mode (ms.busy, ms.hz, ms.flip; see the top comment) ---- */

#define BUSY_KEY 0x627573792d777269ull     /* "busy-wri" */
#define FLIP_KEY 0x666c69702d706167ull     /* "flip-pag" */
#define VERIFY_CHUNK 64                     /* pages verified between ticks */

struct flip {
    uint64_t page;
    int64_t due;                /* now_ns() when it is put back */
};

static struct {
    int on;
    int64_t t0, next_tick, period;
    uint64_t ticks, missed, writes, identical, changed, flips, restored;
    uint64_t altered_seen;      /* this round's verify: pages found altered */
    uint64_t skip;              /* the page ms.corrupt damaged */
    uint8_t *altered;           /* per page: 1 while a flip holds it */
    struct flip *q;             /* flips to put back, oldest first */
    unsigned long qcap, qhead, qlen;
} B = { .skip = UINT64_MAX };

static inline uint64_t *page_ptr(uint64_t i)
{
    return (uint64_t *)(mem + i * PAGE);
}

static inline int page_altered(uint64_t i)
{
    return B.altered && B.altered[i];
}

/* What a flip XORs into every word of page i (never 0). */
static inline uint64_t flip_key(uint64_t i)
{
    return mix64(FLIP_KEY ^ (P.seed << 40) ^ i) | 1;
}

static void xor_page(uint64_t i, uint64_t x)
{
    uint64_t *p = page_ptr(i);

    for (unsigned w = 0; w < WORDS; w++) {
        p[w] ^= x;
    }
}

/* The next generation of page i (an altered page stays altered). */
static void next_generation(uint64_t i)
{
    gen[i]++;
    fill_page(page_ptr(i), i, gen[i]);
    if (page_altered(i)) {
        xor_page(i, flip_key(i));
    }
}

/* Store the bytes page i holds back into it, word by word. */
static void store_same(uint64_t i)
{
    volatile uint64_t *p = page_ptr(i);

    for (unsigned w = 0; w < WORDS; w++) {
        p[w] = p[w];
    }
}

static void flip_restore_oldest(void)
{
    struct flip *f = &B.q[B.qhead];

    xor_page(f->page, flip_key(f->page));
    B.altered[f->page] = 0;
    B.qhead = (B.qhead + 1) % B.qcap;
    B.qlen--;
    B.restored++;
}

static void flip_start(int64_t now)
{
    uint64_t i = mix64(FLIP_KEY ^ (P.seed << 48) ^ B.flips) % npages;

    B.flips++;
    for (uint64_t n = 0; i == B.skip || B.altered[i]; n++) {
        if (n == npages) {
            return;
        }
        i = (i + 1) % npages;
    }
    if (B.qlen == B.qcap) {
        flip_restore_oldest();      /* not expected: qcap has room */
    }
    xor_page(i, flip_key(i));
    B.altered[i] = 1;
    B.q[(B.qhead + B.qlen) % B.qcap] = (struct flip){
        i, now + (int64_t)P.flipms * 1000000 };
    B.qlen++;
}

static void busy_tick(int64_t now)
{
    uint64_t tk = mix64(BUSY_KEY ^ (P.seed << 40) ^ B.ticks);

    B.ticks++;
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t r = mix64(tk ^ i);
        /* The working set (ms.hot) is chosen by the page alone */
        uint64_t sel = P.hot ? mix64(BUSY_KEY ^ (P.seed << 40) ^ ~i) : r;

        if (sel % 100 >= P.busy || i == B.skip) {
            continue;
        }
        if (r >> 63) {
            next_generation(i);
            B.changed++;
        } else {
            store_same(i);
            B.identical++;
        }
        B.writes++;
    }
    /* ms.flip per second since the fill, started at the ticks */
    uint64_t due = (uint64_t)((now - B.t0) / 1000000) * P.flip / 1000;
    while (B.flips < due) {
        flip_start(now);
    }
}

/* Runs what is due (flips to put back, a tick); returns when the next
 * thing is due. */
static int64_t busy_poll(void)
{
    int64_t now = now_ns();

    while (B.qlen && B.q[B.qhead].due <= now) {
        flip_restore_oldest();
    }
    if (now >= B.next_tick) {
        busy_tick(now);
        B.next_tick += B.period;
        now = now_ns();
        while (B.next_tick <= now) {
            B.next_tick += B.period;
            B.missed++;
        }
    }
    if (B.qlen && B.q[B.qhead].due < B.next_tick) {
        return B.q[B.qhead].due;
    }
    return B.next_tick;
}

/* Keep writing for `sec` seconds, watching stdin for a stop request. */
static void busy_run(unsigned long sec)
{
    int64_t end = now_ns() + (int64_t)sec * 1000000000;

    for (;;) {
        int64_t next = busy_poll(), now = now_ns();

        if (now >= end) {
            return;
        }
        if (next > end) {
            next = end;
        }
        watch_stdin(next > now ? (next - now + 999999) / 1000000 : 0);
    }
}

static int busy_setup(void)
{
    B.on = P.busy || P.flip;
    if (!B.on) {
        return 1;
    }
    B.qcap = P.flip * (P.flipms / 1000 + 2) + 1;
    if (!P.hz || P.hz > 1000 || P.busy > 100 || B.qcap >= npages / 2) {
        say("MS-WORKLOAD FAIL bad parameters");
        return 0;
    }
    B.altered = calloc(npages, 1);
    B.q = calloc(B.qcap, sizeof(*B.q));
    if (!B.altered || !B.q) {
        say("MS-WORKLOAD FAIL cannot allocate the busy state");
        return 0;
    }
    if (P.corrupt && P.corrupt <= npages) {
        B.skip = P.corrupt - 1;
    }
    B.period = 1000000000 / P.hz;
    B.t0 = B.next_tick = now_ns();
    say("MS-WORKLOAD busy start busy=%lu hz=%lu flip=%lu flipms=%lu pages=%llu"
        " hot=%lu", P.busy, P.hz, P.flip, P.flipms, (unsigned long long)npages,
        P.hot);
    return 1;
}

static void busy_report(unsigned long round)
{
    if (!B.on) {
        return;
    }
    say("MS-WORKLOAD busy round=%lu ms=%llu ticks=%llu missed=%llu "
        "writes=%llu identical=%llu changed=%llu flips=%llu restored=%llu "
        "pending=%lu verify-altered=%llu", round,
        (unsigned long long)((now_ns() - B.t0) / 1000000),
        (unsigned long long)B.ticks, (unsigned long long)B.missed,
        (unsigned long long)B.writes, (unsigned long long)B.identical,
        (unsigned long long)B.changed, (unsigned long long)B.flips,
        (unsigned long long)B.restored, B.qlen,
        (unsigned long long)B.altered_seen);
}

/* In busy mode the writes go on while the pages are checked: each page is
 * checked against its generation and flip state of that moment. */
static int verify(unsigned long round, const char *suffix)
{
    uint64_t bad = 0;

    B.altered_seen = 0;
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t *p = page_ptr(i);
        uint64_t e, x = 0;

        if (B.on && i % VERIFY_CHUNK == 0) {
            busy_poll();
        }
        if (page_altered(i)) {
            x = flip_key(i);
            B.altered_seen++;
        }
        int w = check_page(p, i, gen[i], x, &e);

        if (w >= 0) {
            if (!bad) {
                say("MS-WORKLOAD FAIL round=%lu page=%llu cat=%s gen=%u "
                    "word=%d expected=0x%016llx got=0x%016llx",
                    round, (unsigned long long)i,
                    cat_name[page_cat(i, gen[i])], gen[i], w,
                    (unsigned long long)e, (unsigned long long)p[w]);
            }
            bad++;
        }
    }
    if (bad) {
        say("MS-WORKLOAD FAIL round=%lu pages=%llu bad=%llu%s", round,
            (unsigned long long)npages, (unsigned long long)bad, suffix);
        return 0;
    }
    say("MS-WORKLOAD verify round=%lu pages=%llu bad=0%s", round,
        (unsigned long long)npages, suffix);
    return 1;
}

static void rewrite(unsigned long round)
{
    uint64_t n = 0;

    for (uint64_t i = 0; i < npages; i++) {
        uint64_t r = mix64(SEL_KEY ^ (P.seed << 48) ^ ((uint64_t)round << 32) ^ i);
        if (r % 100 < P.rewrite) {
            next_generation(i);
            n++;
        }
    }
    say("MS-WORKLOAD rewrite round=%lu pages=%llu", round,
        (unsigned long long)n);
}

/* ---- disk mode ---- */

#ifndef DISK_DEV
#define DISK_DEV "/dev/vda"     /* -DDISK_DEV=... to try it on a host */
#endif
#define DISK_KEY 0x6469736b2d646d61ull     /* "disk-dma" */
#define DISK_VARIANTS 4u                    /* distinct blocks per region */
#define DISK_REPORT 256                     /* progress line every N reads */

/* Word w of a block of region r whose index is j (mod DISK_VARIANTS) */
static inline uint64_t disk_word(unsigned r, unsigned j, unsigned w)
{
    return mix64(DISK_KEY ^ ((uint64_t)r << 40) ^ ((uint64_t)j << 20) ^ w);
}

/*
 * Check @buf, just read from region @r; returns -1 if every byte is
 * right, else the index of the first bad word (*@page, *@expected).
 */
static long disk_check(const uint64_t *buf, size_t len, unsigned r,
                       size_t *page, uint64_t *expected)
{
    for (size_t i = 0; i < len / PAGE; i++) {
        const uint64_t *p = buf + i * WORDS;

        for (unsigned w = 0; w < WORDS; w++) {
            uint64_t e = disk_word(r, i % DISK_VARIANTS, w);

            if (p[w] != e) {
                *page = i;
                *expected = e;
                return w;
            }
        }
    }
    return -1;
}

/* One reader process; returns its exit status */
static int disk_job(unsigned job, volatile int *stop)
{
    size_t len = D.kib * 1024;
    unsigned long k;
    uint64_t *buf;
    int fd = open(DISK_DEV, O_RDONLY | O_DIRECT);

    if (fd < 0) {
        say("MS-WORKLOAD FAIL disk job=%u cannot open %s errno=%d", job,
            DISK_DEV, errno);
        return 1;
    }
    if (posix_memalign((void **)&buf, PAGE, len)) {
        say("MS-WORKLOAD FAIL disk job=%u cannot allocate %zu bytes", job,
            len);
        return 1;
    }
    /* Populated, so the first read already goes into pages of our own */
    memset(buf, 0, len);
    for (k = 0; !*stop && (!D.reads || k < D.reads); k++) {
        unsigned r = (k + job) % 2;
        size_t page = 0;
        uint64_t e = 0;
        ssize_t n = pread(fd, buf, len, (off_t)r * len);
        long w;

        if (n != (ssize_t)len) {
            say("MS-WORKLOAD FAIL disk job=%u read=%lu region=%u returned "
                "%zd errno=%d", job, k, r, n, errno);
            return 1;
        }
        w = disk_check(buf, len, r, &page, &e);
        if (w >= 0) {
            uint64_t got = buf[page * WORDS + w];

            say("MS-WORKLOAD FAIL disk job=%u read=%lu region=%u page=%zu "
                "word=%ld expected=0x%016llx got=0x%016llx old-region=%d",
                job, k, r, page, w, (unsigned long long)e,
                (unsigned long long)got,
                got == disk_word(1 - r, page % DISK_VARIANTS, w));
            return 1;
        }
        if ((k + 1) % DISK_REPORT == 0) {
            say("MS-WORKLOAD disk job=%u reads=%lu bad=0", job, k + 1);
        }
    }
    say("MS-WORKLOAD disk job=%u done reads=%lu bad=0", job, k);
    return 0;
}

/*
 * Run ms.diskjobs readers until they are done or a stop request comes;
 * returns whether every read of every reader verified.
 */
static int disk_run(void)
{
    volatile int *stop = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    unsigned long running = 0;
    int ok = 1;

    say("MS-WORKLOAD disk start kib=%lu jobs=%lu reads=%lu", D.kib, D.jobs,
        D.reads);
    if (stop == MAP_FAILED || !D.kib || D.kib * 1024 % PAGE || !D.jobs) {
        say("MS-WORKLOAD FAIL disk bad parameters");
        return 0;
    }
    for (unsigned j = 0; j < D.jobs; j++) {
        pid_t pid = fork();

        if (pid == 0) {
            _exit(disk_job(j, stop));
        }
        if (pid < 0) {
            say("MS-WORKLOAD FAIL disk cannot fork errno=%d", errno);
            *stop = 1;
            ok = 0;
            break;
        }
        running++;
    }
    while (running) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);

        if (pid > 0) {
            running--;
            if (!WIFEXITED(status) || WEXITSTATUS(status)) {
                ok = 0;
                *stop = 1;      /* one failure is enough: stop the rest */
            }
            continue;
        }
        sleep_watch(1);
        if (stop_requested) {
            *stop = 1;
        }
    }
    if (ok) {
        say("MS-WORKLOAD disk done jobs=%lu bad=0", D.jobs);
    }
    return ok;
}

/*
 * Duplicates to free (ms.dupmib): page i holds the content of page
 * i mod DUP_PERIOD, non-zero and unlike the main region's, so each run of
 * DUP_PERIOD pages merges with the first.  Freed on request ('f'): the
 * guest kernel keeps the bytes in its free pages, which a balloon then
 * takes.
 */
#define DUP_PERIOD 64
#define DUP_KEY 0x6475702d66726565ull   /* "dup-free" */

static uint8_t *dup_mem;
static uint64_t dup_pages;

static void dup_fill(void)
{
    if (!P.dupmib) {
        return;
    }
    dup_pages = (uint64_t)P.dupmib * (1024 * 1024 / PAGE);
    dup_mem = mmap(NULL, dup_pages * PAGE, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (dup_mem == MAP_FAILED) {
        say("MS-WORKLOAD FAIL cannot allocate %lu MiB of duplicates errno=%d",
            P.dupmib, errno);
        finish(0);
    }
    for (uint64_t i = 0; i < dup_pages; i++) {
        uint64_t *p = (uint64_t *)(dup_mem + i * PAGE);
        uint64_t st = mix64(DUP_KEY ^ (i % DUP_PERIOD)) | 1;

        for (unsigned w = 0; w < WORDS; w++) {
            p[w] = xs_next(&st);
        }
    }
    say("MS-WORKLOAD dup filled pages=%llu period=%u",
        (unsigned long long)dup_pages, DUP_PERIOD);
}

static void dup_free(void)
{
    if (!free_requested || !dup_mem) {
        return;
    }
    munmap(dup_mem, dup_pages * PAGE);
    dup_mem = NULL;
    say("MS-WORKLOAD dup freed pages=%llu", (unsigned long long)dup_pages);
}

static void parse_token(const char *t)
{
    static const struct { const char *name; unsigned long *v; } keys[] = {
        { "ms.mib=", &P.mib }, { "ms.seed=", &P.seed },
        { "ms.zero=", &P.zero }, { "ms.shared=", &P.shared },
        { "ms.rounds=", &P.rounds }, { "ms.rewrite=", &P.rewrite },
        { "ms.interval=", &P.interval }, { "ms.idle=", &P.idle },
        { "ms.corrupt=", &P.corrupt }, { "ms.virtio=", &P.virtio },
        { "ms.disk=", &D.on }, { "ms.diskkib=", &D.kib },
        { "ms.diskjobs=", &D.jobs }, { "ms.diskreads=", &D.reads },
        { "ms.dupmib=", &P.dupmib }, { "ms.busy=", &P.busy },
        { "ms.hz=", &P.hz }, { "ms.flip=", &P.flip },
        { "ms.flipms=", &P.flipms }, { "ms.hot=", &P.hot },
    };
    for (unsigned k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
        size_t l = strlen(keys[k].name);
        if (!strncmp(t, keys[k].name, l)) {
            *keys[k].v = strtoul(t + l, NULL, 0);
        }
    }
}

static void parse_cmdline(void)
{
    char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    ssize_t n;

    if (fd < 0) {
        say("MS-WORKLOAD cannot open /proc/cmdline errno=%d", errno);
        return;
    }
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0) {
        return;
    }
    buf[n] = 0;
    for (char *save, *t = strtok_r(buf, " \t\n", &save); t;
         t = strtok_r(NULL, " \t\n", &save)) {
        parse_token(t);
    }
}

static void setup_init(void)
{
    mkdir("/proc", 0555);
    mkdir("/dev", 0755);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    /* If the kernel could not open /dev/console for us, do it now. */
    if (fcntl(1, F_GETFD) < 0) {
        int fd = open("/dev/console", O_RDWR);
        if (fd >= 0) {
            dup2(fd, 0);
            dup2(fd, 1);
            dup2(fd, 2);
            if (fd > 2) {
                close(fd);
            }
        }
    }
}

/*
 * The virtio modules, each after the ones it needs (build.sh puts them in
 * the initramfs).  A missing one is reported and skipped: the test that
 * needs its device finds out.
 */
static void load_modules(void)
{
    static const char *const mods[] = {
        "virtio_ring", "virtio", "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev", "virtio_pci", "virtio_blk",
        "virtio_balloon", "virtio_mem",
    };

    for (unsigned k = 0; k < sizeof(mods) / sizeof(mods[0]); k++) {
        char path[64];
        int fd;

        snprintf(path, sizeof(path), "/lib/modules/%s.ko", mods[k]);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            say("MS-WORKLOAD module %s missing errno=%d", mods[k], errno);
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) && errno != EEXIST) {
            say("MS-WORKLOAD module %s failed errno=%d", mods[k], errno);
        }
        close(fd);
    }
    say("MS-WORKLOAD modules loaded");
}

int main(int argc, char **argv)
{
    uint64_t counts[3] = { 0, 0, 0 };
    uint64_t fps[3] = { 0, 0, 0 };

    is_init = getpid() == 1;
    if (is_init) {
        setup_init();
        parse_cmdline();
    } else {
        for (int a = 1; a < argc; a++) {
            parse_token(argv[a]);
        }
    }
    if (is_init && P.virtio) {
        load_modules();
    }
    if (D.on) {
        if (!disk_run()) {
            finish(0);
        }
        say("MS-WORKLOAD done ok");
        finish(1);
    }
    if (P.zero > 100 || P.shared > 100 - P.zero || P.rewrite > 100 ||
        P.mib == 0) {
        say("MS-WORKLOAD FAIL bad parameters");
        finish(0);
    }
    say("MS-WORKLOAD start mib=%lu seed=%lu zero=%lu shared=%lu rounds=%lu "
        "rewrite=%lu interval=%lu idle=%lu", P.mib, P.seed, P.zero, P.shared,
        P.rounds, P.rewrite, P.interval, P.idle);

    npages = (uint64_t)P.mib * (1024 * 1024 / PAGE);
    mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    gen = calloc(npages, sizeof(*gen));
    if (mem == MAP_FAILED || !gen) {
        say("MS-WORKLOAD FAIL cannot allocate %lu MiB errno=%d", P.mib, errno);
        finish(0);
    }
    for (uint64_t i = 0; i < npages; i++) {
        /* Zero pages are written too (not left untouched): they are real
         * guest pages full of zeros, touched like every other page. */
        int cat = page_cat(i, 0);
        fps[cat] ^= fill_page((uint64_t *)(mem + i * PAGE), i, 0) + i;
        counts[cat]++;
    }
    say("MS-WORKLOAD filled pages=%llu zero=%llu shared=%llu unique=%llu "
        "fp-shared=0x%016llx fp-unique=0x%016llx",
        (unsigned long long)npages, (unsigned long long)counts[CAT_ZERO],
        (unsigned long long)counts[CAT_SHARED],
        (unsigned long long)counts[CAT_UNIQUE],
        (unsigned long long)fps[CAT_SHARED], (unsigned long long)fps[CAT_UNIQUE]);
    if (P.corrupt && P.corrupt <= npages) {
        mem[(P.corrupt - 1) * PAGE + 123] ^= 0x40;
        say("MS-WORKLOAD corrupted page=%lu", P.corrupt - 1);
    }
    dup_fill();
    if (!busy_setup()) {
        finish(0);
    }

    for (unsigned long round = 1; ; round++) {
        if (B.on) {
            busy_run(P.interval);
        } else {
            sleep_watch(P.interval);
        }
        dup_free();
        int ok = verify(round, "");
        busy_report(round);
        if (!ok) {
            finish(0);
        }
        if (P.rewrite) {
            rewrite(round);
            if (!verify(round, " after=rewrite")) {
                finish(0);
            }
        }
        if (stop_requested || (!P.idle && P.rounds && round >= P.rounds)) {
            break;
        }
    }
    say("MS-WORKLOAD done ok");
    finish(1);
    return 0;
}
