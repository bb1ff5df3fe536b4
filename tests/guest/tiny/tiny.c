/*
 * Tiny 32-bit multiboot guest for mem-share tests.
 *
 * Runs in protected mode with paging off (flat physical addresses), writes a
 * pattern over a region of RAM, reads it back and checks it, prints over the
 * serial port (COM1, 0x3f8) and exits QEMU through isa-debug-exit
 * (-device isa-debug-exit,iobase=0xf4,iosize=0x04): value 0 -> QEMU exit
 * status 1 (success), value 1 -> exit status 3 (failure).
 *
 * Parameters, from the multiboot command line (-append "mib=16 passes=3"):
 *   base=N     start of the region in MiB (default 16)
 *   mib=N      size of the region in MiB (default 16)
 *   kib=N      size of the region in KiB, a multiple of 4 (instead of mib):
 *              for KVM hosts that emulate 32-bit guest code (about 10 s a
 *              MiB written or read)
 *   passes=N   write+check passes (default 3); each pass writes new content;
 *              0 = until a 'q' arrives on the serial input (looked at after
 *              each pass; "TINY stop requested"), then "TINY done": for
 *              writers racing merges
 *   checks=N   read-back checks after each write (default 1)
 *   stride=N   pass p > 1 rewrites only the pages n with n % N == p % N
 *              (default 1: every page, every pass); a page then keeps its
 *              content for N - 1 passes, long enough for a scanner that
 *              waits until a written page is stable.  Pass 1 writes all
 *              pages.  N must not be a multiple of 4 (pattern=mixed would
 *              rewrite one kind of page only)
 *   seed=N     seed of the unique content (default 1)
 *   corrupt=1  self-test of the checker: flip one word after the first
 *              write, so pass 1 must report FAIL (default 0)
 *   pattern=P  dup | unique | zero | mixed (default mixed)
 *              dup:    every page of the region holds the same content
 *                      (a function of word offset in the page and the pass)
 *              unique: content is a function of (seed, address, pass)
 *              zero:   pages are written with zeros
 *              mixed:  page n: n%4==0 zero, n%4==1 or 2 dup, n%4==3 unique
 *
 * Output:
 *   TINY start base=0x.. mib=.. passes=.. pattern=.. mem_upper_kib=..
 *   TINY pass=K ok sum=0x........
 *   TINY pass=K FAIL addr=0x........ expected=0x........ got=0x........ bad=N
 *   TINY stop requested            (passes=0, after a 'q')
 *   TINY done ok | TINY done FAIL
 */
#include <stdint.h>

#define PAGE 4096u

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

#define COM1 0x3f8

static void serial_init(void)
{
    outb(COM1 + 1, 0x00);   /* no interrupts */
    outb(COM1 + 3, 0x80);   /* DLAB */
    outb(COM1 + 0, 0x01);   /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);   /* 8n1 */
    outb(COM1 + 2, 0xc7);   /* FIFO */
    outb(COM1 + 4, 0x03);
}

static void putc_(char c)
{
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++) {
    }
    outb(COM1, c);
}

/* A 'q' is waiting on the serial input (other bytes are dropped) */
static int stop_requested(void)
{
    while (inb(COM1 + 5) & 0x01) {
        if (inb(COM1) == 'q') {
            return 1;
        }
    }
    return 0;
}

static void puts_(const char *s)
{
    while (*s) {
        if (*s == '\n') {
            putc_('\r');
        }
        putc_(*s++);
    }
}

static void puthex(uint32_t v)
{
    static const char d[] = "0123456789abcdef";
    puts_("0x");
    for (int i = 28; i >= 0; i -= 4) {
        putc_(d[(v >> i) & 15]);
    }
}

static void putdec(uint32_t v)
{
    char b[12];
    int n = 0;
    do {
        b[n++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (n) {
        putc_(b[--n]);
    }
}

static void __attribute__((noreturn)) qemu_exit(int ok)
{
    outl(0xf4, ok ? 0 : 1);
    /* No isa-debug-exit device: halt forever. */
    puts_("TINY no isa-debug-exit device, halting\n");
    for (;;) {
        __asm__ volatile("cli; hlt");
    }
}

struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower;
    uint32_t mem_upper;
    uint32_t boot_device;
    uint32_t cmdline;
};

enum { PAT_MIXED, PAT_DUP, PAT_UNIQUE, PAT_ZERO };
static const char *const pat_name[] = { "mixed", "dup", "unique", "zero" };

static struct {
    uint32_t base, mib, kib, passes, checks, seed, corrupt, pattern, stride;
} P = { 16, 16, 0, 3, 1, 1, 0, PAT_MIXED, 1 };

static int streq_prefix(const char *s, const char *p)
{
    while (*p) {
        if (*s++ != *p++) {
            return 0;
        }
    }
    return 1;
}

static uint32_t atou(const char *s)
{
    uint32_t v = 0;
    while (*s >= '0' && *s <= '9') {
        v = v * 10 + (*s++ - '0');
    }
    return v;
}

static void parse_cmdline(const char *s)
{
    static const struct { const char *k; uint32_t *v; } keys[] = {
        { "base=", &P.base }, { "mib=", &P.mib }, { "kib=", &P.kib },
        { "passes=", &P.passes },
        { "checks=", &P.checks }, { "seed=", &P.seed },
        { "corrupt=", &P.corrupt }, { "stride=", &P.stride },
    };
    while (*s) {
        while (*s == ' ') {
            s++;
        }
        for (unsigned i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
            if (streq_prefix(s, keys[i].k)) {
                const char *v = s;
                while (*v != '=') {
                    v++;
                }
                *keys[i].v = atou(v + 1);
            }
        }
        if (streq_prefix(s, "pattern=")) {
            for (unsigned i = 0; i < 4; i++) {
                const char *v = s + 8;
                const char *n = pat_name[i];
                while (*n && *v == *n) {
                    v++, n++;
                }
                if (!*n && (*v == ' ' || !*v)) {
                    P.pattern = i;
                }
            }
        }
        while (*s && *s != ' ') {
            s++;
        }
    }
}

static inline uint32_t mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* Expected content of the 32-bit word at physical address a in pass p. */
static inline uint32_t expected(uint32_t a, uint32_t p)
{
    uint32_t kind = P.pattern;

    if (kind == PAT_MIXED) {
        static const uint8_t m[4] = { PAT_ZERO, PAT_DUP, PAT_DUP, PAT_UNIQUE };
        kind = m[(a / PAGE) & 3];
    }
    switch (kind) {
    case PAT_ZERO:
        return 0;
    case PAT_DUP:
        return mix32((a & (PAGE - 1)) ^ (p * 0x9e3779b9u) ^ 0x4d534852u) | 1;
    default:
        return mix32(a ^ mix32(p * 0x85ebca6bu ^ P.seed)) | 1;
    }
}

/* The pass that last wrote the page at a, pass p being written or done */
static inline uint32_t written_in(uint32_t a, uint32_t p)
{
    uint32_t back = (p + P.stride - (a / PAGE) % P.stride) % P.stride;

    return back >= p ? 1 : p - back;
}

void tiny_main(uint32_t magic, struct multiboot_info *mbi)
{
    uint32_t mem_upper_kib = 0;

    serial_init();
    puts_("TINY hello\n");
    if (magic != 0x2badb002u) {
        puts_("TINY FAIL bad multiboot magic ");
        puthex(magic);
        puts_("\n");
        qemu_exit(0);
    }
    if (mbi->flags & (1u << 2)) {
        parse_cmdline((const char *)mbi->cmdline);
    }
    if (mbi->flags & 1u) {
        mem_upper_kib = mbi->mem_upper;
    }
    uint32_t start = P.base << 20;
    uint32_t kib = P.kib ? P.kib : P.mib << 10;
    uint32_t end = start + (kib << 10);
    puts_("TINY start base=");
    puthex(start);
    if (P.kib) {
        puts_(" kib=");
        putdec(P.kib);
    } else {
        puts_(" mib=");
        putdec(P.mib);
    }
    puts_(" passes=");
    putdec(P.passes);
    puts_(" checks=");
    putdec(P.checks);
    puts_(" stride=");
    putdec(P.stride);
    puts_(" pattern=");
    puts_(pat_name[P.pattern]);
    puts_(" mem_upper_kib=");
    putdec(mem_upper_kib);
    puts_("\n");
    /* The region must lie in RAM above the kernel image (at 1 MiB) and
     * below the end of RAM reported by the boot loader. */
    if (P.stride == 0 || P.stride % 4 == 0) {
        puts_("TINY FAIL stride must be at least 1 and not a multiple of 4\n");
        qemu_exit(0);
    }
    if (P.base < 4 || kib == 0 || kib % 4 || kib > (4000u << 10) ||
        P.base + (kib >> 10) + 1 > 4000 ||
        (mem_upper_kib && end > (1u << 20) + (mem_upper_kib << 10))) {
        puts_("TINY FAIL region outside RAM\n");
        qemu_exit(0);
    }

    int all_ok = 1;
    for (uint32_t p = 1; !P.passes || p <= P.passes; p++) {
        volatile uint32_t *w;
        for (uint32_t pg = start; pg < end; pg += PAGE) {
            if (written_in(pg, p) != p) {
                continue;
            }
            for (uint32_t a = pg; a < pg + PAGE; a += 4) {
                w = (volatile uint32_t *)a;
                *w = expected(a, p);
            }
        }
        if (P.corrupt && p == 1) {
            w = (volatile uint32_t *)(start + PAGE * 3 + 40);
            *w ^= 0x00100000u;
            puts_("TINY corrupted addr=");
            puthex(start + PAGE * 3 + 40);
            puts_("\n");
        }
        for (uint32_t c = 1; c <= P.checks; c++) {
            uint32_t sum = 0, bad = 0, bad_addr = 0, bad_exp = 0, bad_got = 0;
            uint32_t wp = 0;
            for (uint32_t a = start; a < end; a += 4) {
                uint32_t got = *(volatile uint32_t *)a;
                if (a % PAGE == 0) {
                    wp = written_in(a, p);
                }
                uint32_t e = expected(a, wp);
                sum += got;
                if (got != e) {
                    if (!bad) {
                        bad_addr = a, bad_exp = e, bad_got = got;
                    }
                    bad++;
                }
            }
            puts_("TINY pass=");
            putdec(p);
            if (P.checks > 1) {
                puts_(" check=");
                putdec(c);
            }
            if (bad) {
                all_ok = 0;
                puts_(" FAIL addr=");
                puthex(bad_addr);
                puts_(" expected=");
                puthex(bad_exp);
                puts_(" got=");
                puthex(bad_got);
                puts_(" bad=");
                putdec(bad);
            } else {
                puts_(" ok");
            }
            puts_(" sum=");
            puthex(sum);
            puts_("\n");
        }
        if (!P.passes && stop_requested()) {
            puts_("TINY stop requested\n");
            break;
        }
    }
    puts_(all_ok ? "TINY done ok\n" : "TINY done FAIL\n");
    qemu_exit(all_ok);
}
