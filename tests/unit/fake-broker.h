/*
 * A fake broker: whoever binds the broker's socket path to collect the
 * guest pages that members upload
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * For the tests of the client's check of who listens on the socket.  A
 * child process listens on a path as some uid, accepts every connection
 * and counts the connections and every byte clients send; it answers
 * nothing.  When the test stops it, it takes in what is still queued
 * (connections not accepted yet, bytes not read yet) and reports the
 * counts, so that "nothing was sent" is what the fake saw, not what the
 * client says.
 *
 * Listening as another uid needs root; with the test's own uid it runs
 * anywhere.  Plain system calls only in the child: the test process may
 * have threads.
 */

#ifndef TESTS_UNIT_FAKE_BROKER_H
#define TESTS_UNIT_FAKE_BROKER_H

#include <errno.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib.h>

#define FAKE_MAX_CONNS 32

typedef struct FakeBroker {
    pid_t pid;
    int stop;               /* closing it stops the fake */
    int report;             /* the fake writes its FakeReport there */
} FakeBroker;

typedef struct FakeReport {
    uint64_t connections;
    uint64_t bytes;
} FakeReport;

/* Read what is readable now from @fd; false at end of file */
static inline bool fake_drain(int fd, FakeReport *r)
{
    char buf[65536];

    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);

        if (n > 0) {
            r->bytes += n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
        }
    }
}

static inline void fake_serve(int ls, int stop, int report)
{
    struct pollfd pfd[FAKE_MAX_CONNS + 2];
    int nconns = 0;
    FakeReport r = { 0, 0 };
    bool stopping = false;

    for (;;) {
        pfd[0] = (struct pollfd) { .fd = ls, .events = POLLIN };
        pfd[1] = (struct pollfd) { .fd = stop, .events = POLLIN };
        if (!stopping && poll(pfd, nconns + 2, -1) < 0 && errno != EINTR) {
            _exit(3);
        }
        stopping = stopping || pfd[1].revents;
        /* Accept whatever waits in the backlog, then read every socket */
        for (;;) {
            int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

            if (fd < 0) {
                break;
            }
            r.connections++;
            if (nconns == FAKE_MAX_CONNS) {
                _exit(4);
            }
            pfd[2 + nconns++] = (struct pollfd) { .fd = fd, .events = POLLIN };
        }
        for (int i = 0; i < nconns; ) {
            if (fake_drain(pfd[2 + i].fd, &r)) {
                i++;
                continue;
            }
            /* The client hung up: the last one takes its place */
            close(pfd[2 + i].fd);
            nconns--;
            pfd[2 + i] = pfd[2 + nconns];
        }
        if (stopping) {
            if (write(report, &r, sizeof(r)) != sizeof(r)) {
                _exit(5);
            }
            _exit(0);
        }
    }
}

/*
 * Listen on @path as @uid (and its gid the same number, no supplementary
 * groups).  The socket is bound before the uid changes, so the directory
 * need not be writable by @uid; the credentials a client sees are those
 * of listen().
 */
static inline void fake_broker_start(FakeBroker *fb, const char *path,
                                     uid_t uid)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int stop[2], report[2], ready[2];
    char byte;

    g_assert_cmpuint(strlen(path), <, sizeof(sa.sun_path));
    strcpy(sa.sun_path, path);
    g_assert_cmpint(pipe(stop), ==, 0);
    g_assert_cmpint(pipe(report), ==, 0);
    g_assert_cmpint(pipe(ready), ==, 0);
    fb->pid = fork();
    g_assert_cmpint(fb->pid, >=, 0);
    if (fb->pid == 0) {
        int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                        0);

        prctl(PR_SET_PDEATHSIG, SIGKILL);
        close(stop[1]);
        close(report[0]);
        close(ready[0]);
        if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            _exit(1);
        }
        if (uid != geteuid() &&
            (setgroups(0, NULL) < 0 || setresgid(uid, uid, uid) < 0 ||
             setresuid(uid, uid, uid) < 0)) {
            _exit(2);
        }
        if (listen(ls, FAKE_MAX_CONNS) < 0 || write(ready[1], "r", 1) != 1) {
            _exit(1);
        }
        fake_serve(ls, stop[0], report[1]);
    }
    close(stop[0]);
    close(report[1]);
    close(ready[1]);
    g_assert_cmpint(read(ready[0], &byte, 1), ==, 1);
    close(ready[0]);
    fb->stop = stop[1];
    fb->report = report[0];
}

/* Stop the fake; what it received, from its own count */
static inline FakeReport fake_broker_stop(FakeBroker *fb, const char *path)
{
    FakeReport r;
    int status;

    close(fb->stop);
    g_assert_cmpint(read(fb->report, &r, sizeof(r)), ==, sizeof(r));
    close(fb->report);
    g_assert_cmpint(waitpid(fb->pid, &status, 0), ==, fb->pid);
    g_assert_true(WIFEXITED(status));
    g_assert_cmpint(WEXITSTATUS(status), ==, 0);
    fb->pid = 0;
    unlink(path);
    return r;
}

#endif /* TESTS_UNIT_FAKE_BROKER_H */
