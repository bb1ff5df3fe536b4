/*
 * A hostile member against the group's store
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every member of a group maps the broker's store: one byte changed in a
 * slot changes the memory of every VM that maps it, and a store shrunk
 * under them makes their merged pages SIGBUS.  The broker hands members
 * a read-only descriptor; this test checks that nothing a member can do
 * with it gets write access or changes the store's size.
 *
 * Each test starts the real broker ($MS_BROKER, set by meson), joins a
 * group and uploads a page, then forks a member that drops to another
 * uid (nobody, 65534) with the store descriptor it received, and tries
 * one attack through every route it can find: the descriptor itself, and
 * any descriptor it manages to open again through /proc/self/fd/N.  The
 * attack must fail, and afterwards the slot must hold the same bytes,
 * the store the same size, and the broker must still store new pages.
 *
 * The member runs as another uid: a process with the broker's uid (or
 * root) may ptrace the broker and write its memory anyway, so nothing
 * the store does could stop it.  The test needs root to change uids.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib.h>

#include "mem-share/broker-client.h"
#include "mem-share/proto.h"

#define NSLOTS 64
#define NOBODY 65534
#define DEADLINE_US (10 * G_USEC_PER_SEC)

static size_t page;
/* What members expect: the broker runs as the test does */
static uid_t broker_uid;
static pid_t broker_pid;    /* for the member that looks for its fds */

typedef struct Fixture {
    char *dir;
    char *path;
    char *log;
    GPid pid;
    MsBrokerClient *c;
    uint8_t *content;       /* what slot @slot holds */
    uint32_t slot;
    off_t size;             /* of the store, as the member received it */
} Fixture;

/*
 * One attack, run by the member after it dropped its privileges, on
 * @fd (the received descriptor or one it opened again).  Returns NULL if
 * the kernel refused, or what succeeded.
 */
typedef const char *AttackFn(int fd, off_t size);

static void fill(uint8_t *p, uint64_t seed)
{
    uint64_t *w = (uint64_t *)p;

    for (size_t i = 0; i < page / 8; i++) {
        w[i] = seed * 0x9e3779b97f4a7c15ULL + i;
    }
}

/* Broker process, as in test-broker.c */

static void broker_start(Fixture *f)
{
    const char *bin = g_getenv("MS_BROKER");
    g_autofree char *max_store = g_strdup_printf("%zu", NSLOTS * page);
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;
    int logfd;

    g_assert(bin);
    f->pid = fork();
    g_assert(f->pid >= 0);
    if (f->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        logfd = open(f->log, O_WRONLY | O_CREAT | O_APPEND, 0600);
        dup2(logfd, 1);
        dup2(logfd, 2);
        execl(bin, bin, "--socket", f->path, "--max-store", max_store,
              (char *)NULL);
        _exit(127);
    }
    for (;;) {
        MsBrokerClient *c = ms_broker_client_open(f->path, 0, NULL);

        if (c) {
            ms_broker_client_free(c);
            return;
        }
        g_assert(waitpid(f->pid, NULL, WNOHANG) == 0);
        g_assert(g_get_monotonic_time() < deadline);
        g_usleep(10000);
    }
}

static bool upload(MsBrokerClient *c, const void *p, uint32_t *slot)
{
    g_autoptr(GError) err = NULL;
    MsProtoResult r;

    if (!ms_broker_client_upload(c, p, NULL, 1, &r, &err)) {
        g_test_message("upload failed: %s", err->message);
        return false;
    }
    if (r.status != MS_STATUS_OK) {
        g_test_message("upload answered status %u", r.status);
        return false;
    }
    *slot = r.slot;
    return true;
}

static void fixture_setup(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    struct stat st;

    (void)data;
    f->dir = g_dir_make_tmp("test-store-attack-XXXXXX", &err);
    g_assert_no_error(err);
    f->path = g_build_filename(f->dir, "broker.sock", NULL);
    f->log = g_build_filename(f->dir, "broker.log", NULL);
    broker_start(f);
    broker_pid = f->pid;

    f->c = ms_broker_client_connect_as(f->path, broker_uid, "g", "victim", 0,
                                       &err);
    g_assert_no_error(err);
    g_assert(f->c);
    f->content = g_malloc(page);
    fill(f->content, 1);
    g_assert(upload(f->c, f->content, &f->slot));
    g_assert(fstat(ms_broker_client_store_fd(f->c), &st) == 0);
    f->size = st.st_size;
    g_assert(f->size == (off_t)(NSLOTS * page));
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
    (void)data;
    ms_broker_client_free(f->c);
    if (f->pid > 0) {
        kill(f->pid, SIGKILL);
        waitpid(f->pid, NULL, 0);
    }
    unlink(f->path);
    unlink(f->log);
    rmdir(f->dir);
    g_free(f->content);
    g_free(f->path);
    g_free(f->log);
    g_free(f->dir);
}

/* The member */

/* Become nobody, with no supplementary groups and no capabilities left */
static const char *drop_privileges(void)
{
    if (setgroups(0, NULL) < 0) {
        return "setgroups(0) failed";
    }
    if (setresgid(NOBODY, NOBODY, NOBODY) < 0) {
        return "setresgid(65534) failed";
    }
    if (setresuid(NOBODY, NOBODY, NOBODY) < 0) {
        return "setresuid(65534) failed";
    }
    if (geteuid() != NOBODY || getegid() != NOBODY) {
        return "still not uid/gid 65534";
    }
    return NULL;
}

/*
 * Runs @attack on the received descriptor and on every descriptor of the
 * store the member can open again for writing.  Opening it again is an
 * attack of its own: AttackFn is then not called.
 */
static const char *member(int fd, off_t size, AttackFn *attack)
{
    static char why[256];
    static const struct {
        int flags;
        const char *name;
    } reopen[] = {
        { O_RDWR, "O_RDWR" },
        { O_WRONLY, "O_WRONLY" },
    };
    const char *err = drop_privileges();
    g_autofree char *path = g_strdup_printf("/proc/self/fd/%d", fd);

    if (err) {
        return err;
    }
    err = attack ? attack(fd, size) : NULL;
    if (err) {
        snprintf(why, sizeof(why), "%s through the received descriptor",
                 err);
        return why;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(reopen); i++) {
        int rw = open(path, reopen[i].flags | O_CLOEXEC);

        if (rw < 0) {
            continue;
        }
        err = attack ? attack(rw, size) : "succeeded";
        close(rw);
        if (err) {
            snprintf(why, sizeof(why), "open(%s, %s): %s", path,
                     reopen[i].name, err);
            return why;
        }
    }
    return NULL;
}

/*
 * Fork the member, let it attack and tell why it succeeded, if it did;
 * then check that the store is intact and the broker still works.
 */
static void run_attack(Fixture *f, AttackFn *attack)
{
    int fd = ms_broker_client_store_fd(f->c);
    g_autofree uint8_t *buf = g_malloc(page);
    g_autofree uint8_t *other = g_malloc(page);
    char why[256] = "";
    int pfd[2], status;
    uint32_t slot;
    struct stat st;
    ssize_t n;
    pid_t pid;

    g_assert(pipe2(pfd, O_CLOEXEC) == 0);
    pid = fork();
    g_assert(pid >= 0);
    if (pid == 0) {
        const char *err;

        close(pfd[0]);
        err = member(fd, f->size, attack);
        if (err && write(pfd[1], err, strlen(err)) < 0) {
            _exit(2);
        }
        _exit(err ? 1 : 0);
    }
    close(pfd[1]);
    n = read(pfd[0], why, sizeof(why) - 1);
    why[n > 0 ? n : 0] = 0;
    close(pfd[0]);
    g_assert(waitpid(pid, &status, 0) == pid);

    /* What the member managed, if anything */
    g_assert_cmpstr(why, ==, "");
    g_assert_true(WIFEXITED(status));

    /* The store still has its size and the slot its bytes */
    g_assert_cmpint(fstat(fd, &st), ==, 0);
    g_assert_cmpint(st.st_size, ==, f->size);
    memset(buf, 0, page);
    g_assert_cmpint(pread(fd, buf, page, (off_t)f->slot * page), ==, page);
    g_assert_cmpmem(buf, page, f->content, page);

    /* The broker still stores pages, and they read back right */
    fill(other, 2);
    if (!upload(f->c, other, &slot)) {
        g_test_fail();
        return;
    }
    g_assert_cmpuint(slot, !=, f->slot);
    memset(buf, 0, page);
    g_assert_cmpint(pread(fd, buf, page, (off_t)slot * page), ==, page);
    g_assert_cmpmem(buf, page, other, page);
    /* And an existing content is still found where it was */
    g_assert_true(upload(f->c, f->content, &slot));
    g_assert_cmpuint(slot, ==, f->slot);
}

/* Attacks */

static const char *try_ftruncate_shrink(int fd, off_t size)
{
    return ftruncate(fd, size - page) == 0 ? "ftruncate() shrank it" : NULL;
}

static const char *try_ftruncate_grow(int fd, off_t size)
{
    return ftruncate(fd, size + page) == 0 ? "ftruncate() grew it" : NULL;
}

static const char *try_punch(int fd, off_t size)
{
    (void)size;
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                     page) == 0 ? "fallocate() punched slot 0" : NULL;
}

static const char *try_allocate(int fd, off_t size)
{
    /* Memory charged to the group, and a grown store */
    if (fallocate(fd, 0, size, page) == 0) {
        return "fallocate() grew it";
    }
    return fallocate(fd, 0, 0, size) == 0 ? "fallocate() allocated it" : NULL;
}

static const char *try_mmap_shared_write(int fd, off_t size)
{
    uint8_t *m = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

    (void)size;
    if (m != MAP_FAILED) {
        m[0] ^= 0xff;
        munmap(m, page);
        return "mmap(PROT_WRITE, MAP_SHARED) wrote slot 0";
    }
    /* A read-only shared mapping must not become writable either */
    m = mmap(NULL, page, PROT_READ, MAP_SHARED, fd, 0);
    if (m != MAP_FAILED) {
        int r = mprotect(m, page, PROT_READ | PROT_WRITE);

        if (r == 0) {
            m[0] ^= 0xff;
        }
        munmap(m, page);
        if (r == 0) {
            return "mprotect(PROT_WRITE) of a MAP_SHARED mapping wrote slot 0";
        }
    }
    return NULL;
}

static const char *try_write(int fd, off_t size)
{
    uint8_t junk[64];

    (void)size;
    memset(junk, 0x5a, sizeof(junk));
    if (lseek(fd, 0, SEEK_SET) < 0) {
        return NULL;
    }
    return write(fd, junk, sizeof(junk)) > 0 ? "write() wrote slot 0" : NULL;
}

static const char *try_pwrite(int fd, off_t size)
{
    uint8_t junk[64];

    (void)size;
    memset(junk, 0x5a, sizeof(junk));
    return pwrite(fd, junk, sizeof(junk), 0) > 0 ? "pwrite() wrote slot 0"
                                                  : NULL;
}

/* Sealed against writes, the broker could store nothing new */
static const char *try_seal_write(int fd, off_t size)
{
    (void)size;
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE) == 0) {
        return "F_ADD_SEALS F_SEAL_WRITE succeeded";
    }
    return fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE) == 0 ?
           "F_ADD_SEALS F_SEAL_FUTURE_WRITE succeeded" : NULL;
}

/* The broker's own descriptors, through /proc/PID/fd */
static const char *try_broker_fds(int fd, off_t size)
{
    static char why[128];
    g_autofree char *dir = g_strdup_printf("/proc/%d/fd", (int)broker_pid);
    struct stat want;
    struct dirent *e;
    DIR *d;

    (void)size;
    d = opendir(dir);
    if (!d || fstat(fd, &want) < 0) {
        if (d) {
            closedir(d);
        }
        return NULL;
    }
    why[0] = 0;
    while (!why[0] && (e = readdir(d))) {
        g_autofree char *path = g_build_filename(dir, e->d_name, NULL);
        int rw = open(path, O_RDWR | O_CLOEXEC);
        struct stat st;

        if (rw >= 0 && fstat(rw, &st) == 0 && st.st_ino == want.st_ino &&
            st.st_dev == want.st_dev) {
            snprintf(why, sizeof(why), "open(%s, O_RDWR) succeeded", path);
        }
        if (rw >= 0) {
            close(rw);
        }
    }
    closedir(d);
    return why[0] ? why : NULL;
}

/* Opening it again writable is already too much */
static void test_reopen(Fixture *f, gconstpointer data)
{
    (void)data;
    run_attack(f, NULL);
}

static void test_attack(Fixture *f, gconstpointer data)
{
    run_attack(f, (AttackFn *)data);
}

static void skip_not_root(void)
{
    g_test_skip("not root: the member cannot change its uid");
}

static void add(const char *name, AttackFn *attack)
{
    g_test_add(name, Fixture, attack, fixture_setup,
               attack ? test_attack : test_reopen, fixture_teardown);
}

int main(int argc, char **argv)
{
    page = sysconf(_SC_PAGESIZE);
    broker_uid = geteuid();
    g_test_init(&argc, &argv, NULL);
    /* Every attack gets its verdict, even after one succeeded */
    g_test_set_nonfatal_assertions();

    if (geteuid() != 0) {
        g_test_add_func("/store-attack/needs-root", skip_not_root);
        return g_test_run();
    }
    add("/store-attack/reopen-writable", NULL);
    add("/store-attack/broker-fds", try_broker_fds);
    add("/store-attack/ftruncate-shrink", try_ftruncate_shrink);
    add("/store-attack/ftruncate-grow", try_ftruncate_grow);
    add("/store-attack/fallocate-punch", try_punch);
    add("/store-attack/fallocate-allocate", try_allocate);
    add("/store-attack/mmap-shared-write", try_mmap_shared_write);
    add("/store-attack/write", try_write);
    add("/store-attack/pwrite", try_pwrite);
    add("/store-attack/seal-write", try_seal_write);
    return g_test_run();
}
