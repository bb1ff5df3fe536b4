/*
 * The broker as a host service: hostile clients of other uids
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Whoever can connect to the broker's socket is a local user, not
 * necessarily a friend.  These tests start the real broker ($MS_BROKER)
 * with the defaults (only the groups and a small store configured, in a
 * key file given with --config) and play its clients as separate uids:
 * users this test creates with useradd and removes at the end (a run
 * that crashed leaves users whose names carry a dead pid: the next run
 * removes them).  Each user is an "agent", a child process that dropped
 * to that uid and its groups and does what the test asks over a pipe:
 * join a group, upload or look pages up, open connections that never
 * say a word.
 *
 * Each case checks what was refused, with which errno, that the broker
 * counted it (the administrator's STATS) and logged it with the pid and
 * uid, and that the legitimate members kept sharing: their lookups
 * still hit the slots their pages are in.
 *
 * Clients of other uids need root (setuid); without it those cases
 * skip.  Socket activation (a listening socket passed the way systemd
 * passes it, without systemd) and bad configuration files need nothing.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib.h>

#include "mem-share/broker-client.h"
#include "mem-share/proto.h"

#define NSLOTS 256
#define DEADLINE_US (20 * G_USEC_PER_SEC)
#define USER_PREFIX "msbsvc"
/* The broker's defaults, which these tests rely on */
#define MAX_CLIENTS 64
#define MAX_PER_UID (MAX_CLIENTS / 2)
#define MAX_GROUPS 16
#define MAX_GROUPS_PER_UID 4
#define QUOTA (NSLOTS / 2)
#define MAX_AGENT_CLIENTS 8
#define MAX_AGENT_IDLE 64

static size_t page;

/* The test's users: two members, one in a supplementary group, hostiles */
enum { U_A, U_B, U_C, U_H1, U_H2, U_H3, U_H4, NUSERS };

typedef struct User {
    char name[32];
    uid_t uid;
    gid_t gid;
} User;

static User users[NUSERS];
static char staff[32];          /* a group of which only U_C is a member */
static bool have_users;

/* Users */

/* @argv[0] from PATH, else /usr/sbin (PATH may lack it) */
static int run(const char *const *args)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *prog = g_find_program_in_path(args[0]);
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    int status;

    if (!prog) {
        prog = g_build_filename("/usr/sbin", args[0], NULL);
    }
    g_ptr_array_add(argv, prog);
    for (int i = 1; args[i]; i++) {
        g_ptr_array_add(argv, (char *)args[i]);
    }
    g_ptr_array_add(argv, NULL);
    if (!g_spawn_sync(NULL, (char **)argv->pdata, NULL,
                      G_SPAWN_STDOUT_TO_DEV_NULL | G_SPAWN_STDERR_TO_DEV_NULL,
                      NULL, NULL, NULL, NULL, &status, &err)) {
        return -1;
    }
    return g_spawn_check_wait_status(status, NULL) ? 0 : -1;
}

/* useradd and friends fail while someone else holds /etc/passwd's lock */
static bool run_retry(const char *const *argv)
{
    for (int i = 0; i < 50; i++) {
        if (run(argv) == 0) {
            return true;
        }
        g_usleep(100 * 1000);
    }
    return false;
}

static void user_del(const char *name)
{
    const char *argv[] = { "userdel", name, NULL };

    run_retry(argv);
}

static void group_del(const char *name)
{
    const char *argv[] = { "groupdel", name, NULL };

    run_retry(argv);
}

/* Users and groups a run that died left: their pid is gone */
static void remove_stale(void)
{
    g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) groups = g_ptr_array_new_with_free_func(g_free);
    struct passwd *pw;
    struct group *gr;

    setpwent();
    while ((pw = getpwent())) {
        unsigned pid;

        if (sscanf(pw->pw_name, USER_PREFIX "%uu", &pid) == 1 &&
            kill(pid, 0) < 0 && errno == ESRCH) {
            g_ptr_array_add(names, g_strdup(pw->pw_name));
        }
    }
    endpwent();
    setgrent();
    while ((gr = getgrent())) {
        unsigned pid;

        if (sscanf(gr->gr_name, USER_PREFIX "%ug", &pid) == 1 &&
            kill(pid, 0) < 0 && errno == ESRCH) {
            g_ptr_array_add(groups, g_strdup(gr->gr_name));
        }
    }
    endgrent();
    for (guint i = 0; i < names->len; i++) {
        user_del(names->pdata[i]);
    }
    for (guint i = 0; i < groups->len; i++) {
        group_del(groups->pdata[i]);
    }
}

static void remove_users(void)
{
    for (int i = 0; i < NUSERS; i++) {
        if (users[i].name[0]) {
            user_del(users[i].name);
        }
    }
    if (staff[0]) {
        group_del(staff);
    }
}

static bool create_users(void)
{
    const char *groupadd[] = { "groupadd", "--system", staff, NULL };

    remove_stale();
    snprintf(staff, sizeof(staff), USER_PREFIX "%dg", (int)getpid());
    if (!run_retry(groupadd)) {
        staff[0] = 0;
        return false;
    }
    for (int i = 0; i < NUSERS; i++) {
        User *u = &users[i];
        const char *argv[] = {
            "useradd", "--system", "--no-create-home", "--user-group",
            "--shell", "/usr/sbin/nologin", "--groups",
            i == U_C ? staff : "", u->name, NULL
        };
        struct passwd *pw;

        snprintf(u->name, sizeof(u->name), USER_PREFIX "%du%d",
                 (int)getpid(), i);
        if (i != U_C) {
            argv[6] = u->name;      /* no --groups */
            argv[7] = NULL;
        }
        if (!run_retry(argv) || !(pw = getpwnam(u->name))) {
            u->name[0] = 0;
            return false;
        }
        u->uid = pw->pw_uid;
        u->gid = pw->pw_gid;
    }
    return true;
}

/* Broker process */

typedef struct Fixture {
    char *dir;
    char *path;
    char *log;
    char *conf;
    GPid pid;
} Fixture;

static void fill(uint8_t *p, uint64_t seed)
{
    uint64_t *w = (uint64_t *)p;

    for (size_t i = 0; i < page / 8; i++) {
        w[i] = seed * 0x9e3779b97f4a7c15ULL + i;
    }
}

static void write_conf(Fixture *f, const char *text)
{
    g_autofree char *all = g_strdup_printf("[broker]\nmax-store=%zu\n%s",
                                           NSLOTS * page, text);
    g_autoptr(GError) err = NULL;

    g_assert_true(g_file_set_contents(f->conf, all, -1, &err));
    g_assert_no_error(err);
}

static char *broker_log(Fixture *f)
{
    char *log = NULL;

    g_assert_true(g_file_get_contents(f->log, &log, NULL, NULL));
    return log;
}

/*
 * Ready once it says it listens: no connection to find out, since one
 * that a test did not make would count against the limits until the
 * broker noticed it closed
 */
static void wait_ready(Fixture *f)
{
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;

    for (;;) {
        g_autofree char *log = NULL;

        if (g_file_get_contents(f->log, &log, NULL, NULL) &&
            strstr(log, "listening on")) {
            return;
        }
        g_assert_cmpint(waitpid(f->pid, NULL, WNOHANG), ==, 0);
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(10000);
    }
}

/* @conf: the key file after [broker] max-store=... */
static void broker_start(Fixture *f, const char *conf)
{
    const char *bin = g_getenv("MS_BROKER");

    g_assert_nonnull(bin);
    write_conf(f, conf);
    f->pid = fork();
    g_assert_cmpint(f->pid, >=, 0);
    if (f->pid == 0) {
        int logfd = open(f->log, O_WRONLY | O_CREAT | O_APPEND, 0600);

        prctl(PR_SET_PDEATHSIG, SIGKILL);
        dup2(logfd, 1);
        dup2(logfd, 2);
        /* The socket from the command line, the rest from the file */
        execl(bin, bin, "--config", f->conf, "--socket", f->path,
              "--socket-mode", "0666", (char *)NULL);
        _exit(127);
    }
    wait_ready(f);
}

static void fixture_setup(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;

    (void)data;
    f->dir = g_dir_make_tmp("test-broker-service-XXXXXX", &err);
    g_assert_no_error(err);
    /* Other uids must reach the socket */
    g_assert_cmpint(chmod(f->dir, 0755), ==, 0);
    f->path = g_build_filename(f->dir, "broker.sock", NULL);
    f->log = g_build_filename(f->dir, "broker.log", NULL);
    f->conf = g_build_filename(f->dir, "broker.conf", NULL);
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
    int status;

    (void)data;
    if (f->pid > 0) {
        kill(f->pid, SIGTERM);
        g_assert_cmpint(waitpid(f->pid, &status, 0), ==, f->pid);
        g_assert_true(WIFEXITED(status));
        g_assert_cmpint(WEXITSTATUS(status), ==, 0);
    }
    if (g_test_failed()) {
        g_autofree char *log = NULL;

        if (g_file_get_contents(f->log, &log, NULL, NULL)) {
            g_test_message("broker log:\n%s", log);
        }
    }
    unlink(f->path);
    unlink(f->log);
    unlink(f->conf);
    rmdir(f->dir);
    g_free(f->path);
    g_free(f->log);
    g_free(f->conf);
    g_free(f->dir);
}

static void assert_log(Fixture *f, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static void assert_log(Fixture *f, const char *fmt, ...)
{
    g_autofree char *log = broker_log(f);
    g_autofree char *what = NULL;
    va_list ap;

    va_start(ap, fmt);
    what = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (!strstr(log, what)) {
        g_test_message("the log lacks: %s", what);
        g_test_fail();
    }
}

/* The administrator's view: the broker's counters and every group */
static MsProtoBrokerStats admin_stats(Fixture *f, GArray **groups)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) c = ms_broker_client_open(f->path, 0, &err);
    g_autoptr(GArray) all = NULL;
    MsProtoBrokerStats bs;
    bool has;

    g_assert_no_error(err);
    g_assert_true(ms_broker_client_stats_full(c, &all, &bs, &has, &err));
    g_assert_no_error(err);
    g_assert_true(has);
    if (groups) {
        *groups = g_steal_pointer(&all);
    }
    return bs;
}

/* Agents: a child process running as one of the users */

typedef enum Op {
    OP_JOIN,        /* client @idx joins @group */
    OP_UPLOAD,      /* client @idx uploads pages @seed .. @seed + @n - 1 */
    OP_LOOKUP,      /* client @idx looks page @seed up */
    OP_STATS,       /* client @idx asks STATS */
    OP_CLOSE,       /* client @idx goes (its process stays) */
    OP_IDLE,        /* open @n connections that never send a byte */
    OP_REFUSED,     /* which idle connections the broker hung up on */
    OP_EXIT,
} Op;

typedef struct Cmd {
    Op op;
    int idx;
    uint32_t n;
    uint64_t seed;
    char group[MS_PROTO_MAX_NAME + 1];
} Cmd;

typedef struct Reply {
    int err;                    /* the GError's code (an errno), or 0 */
    char msg[256];
    uint32_t status;            /* of the first entry */
    uint32_t slot;
    uint32_t ok, quota, other;  /* entries by status; OP_IDLE/REFUSED */
    uint32_t ngroups;
    MsProtoGroupStats gs;
} Reply;

typedef struct Agent {
    pid_t pid;
    int fd;
    const User *user;
} Agent;

typedef struct AgentState {
    const char *path;
    MsBrokerClient *c[MAX_AGENT_CLIENTS];
    int idle[MAX_AGENT_IDLE];
    uint32_t nidle;
} AgentState;

static void reply_error(Reply *r, GError *err)
{
    r->err = err ? err->code : 0;
    if (err) {
        g_strlcpy(r->msg, err->message, sizeof(r->msg));
    }
}

static void agent_upload(AgentState *s, const Cmd *cmd, Reply *r)
{
    g_autofree uint8_t *p = g_malloc(page * cmd->n);
    g_autofree MsProtoResult *res = g_new0(MsProtoResult, cmd->n);
    g_autoptr(GError) err = NULL;

    for (uint32_t i = 0; i < cmd->n; i++) {
        fill(p + i * page, cmd->seed + i);
    }
    if (!ms_broker_client_upload(s->c[cmd->idx], p, NULL, cmd->n, res,
                                 &err)) {
        reply_error(r, err);
        return;
    }
    r->status = res[0].status;
    r->slot = res[0].slot;
    for (uint32_t i = 0; i < cmd->n; i++) {
        r->ok += res[i].status == MS_STATUS_OK;
        r->quota += res[i].status == MS_STATUS_QUOTA;
        r->other += res[i].status != MS_STATUS_OK &&
                    res[i].status != MS_STATUS_QUOTA;
    }
}

static void agent_lookup(AgentState *s, const Cmd *cmd, Reply *r)
{
    g_autofree uint8_t *p = g_malloc(page);
    g_autoptr(GError) err = NULL;
    MsProtoResult res;
    uint64_t h;

    fill(p, cmd->seed);
    h = ms_broker_client_hash(s->c[cmd->idx], p);
    if (!ms_broker_client_lookup(s->c[cmd->idx], &h, 1, &res, &err)) {
        reply_error(r, err);
        return;
    }
    r->status = res.status;
    r->slot = res.slot;
}

static void agent_idle(AgentState *s, const Cmd *cmd, Reply *r)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };

    g_strlcpy(sa.sun_path, s->path, sizeof(sa.sun_path));
    for (uint32_t i = 0; i < cmd->n && s->nidle < MAX_AGENT_IDLE; i++) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            r->err = errno;
            if (fd >= 0) {
                close(fd);
            }
            return;
        }
        s->idle[s->nidle++] = fd;
        r->ok++;
    }
}

/*
 * The idle connections the broker hung up on, after an ERROR: closed
 * and counted (@quota), their code in @err (all the same, or -1)
 */
static void agent_refused(AgentState *s, Reply *r)
{
    uint32_t kept = 0;

    for (uint32_t i = 0; i < s->nidle; i++) {
        struct pollfd pfd = { .fd = s->idle[i], .events = POLLIN };
        uint8_t buf[MS_PROTO_HEADER_SIZE + 512];
        ssize_t n;
        MsProtoMsg msg;

        if (poll(&pfd, 1, 0) != 1) {
            s->idle[kept++] = s->idle[i];
            continue;
        }
        n = recv(s->idle[i], buf, sizeof(buf), MSG_DONTWAIT);
        close(s->idle[i]);
        r->quota++;
        if (n < MS_PROTO_HEADER_SIZE ||
            !ms_proto_decode(buf, n, &msg, NULL) ||
            msg.type != MS_MSG_ERROR) {
            r->err = -1;
            continue;
        }
        if (r->err != -1 && r->err != (int)msg.error.code) {
            r->err = r->err ? -1 : (int)msg.error.code;
        }
        g_strlcpy(r->msg, msg.error.message, sizeof(r->msg));
    }
    s->nidle = kept;
    r->ok = kept;
}

static void agent_do(AgentState *s, const Cmd *cmd, Reply *r)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GArray) groups = NULL;

    switch (cmd->op) {
    case OP_JOIN:
        ms_broker_client_free(s->c[cmd->idx]);
        s->c[cmd->idx] = ms_broker_client_connect(s->path, cmd->group,
                                                  "agent", 0, &err);
        reply_error(r, err);
        break;
    case OP_UPLOAD:
        agent_upload(s, cmd, r);
        break;
    case OP_LOOKUP:
        agent_lookup(s, cmd, r);
        break;
    case OP_STATS:
        if (!s->c[cmd->idx]) {
            s->c[cmd->idx] = ms_broker_client_open(s->path, 0, &err);
        }
        if (s->c[cmd->idx] &&
            ms_broker_client_stats(s->c[cmd->idx], &groups, &err)) {
            r->ngroups = groups->len;
            if (groups->len) {
                r->gs = g_array_index(groups, MsProtoGroupStats, 0);
            }
        }
        reply_error(r, err);
        break;
    case OP_CLOSE:
        g_clear_pointer(&s->c[cmd->idx], ms_broker_client_free);
        break;
    case OP_IDLE:
        agent_idle(s, cmd, r);
        break;
    case OP_REFUSED:
        agent_refused(s, r);
        break;
    case OP_EXIT:
        _exit(0);
    }
}

/* Become @u, with its groups, for good */
static bool become(const User *u)
{
    return initgroups(u->name, u->gid) == 0 &&
           setresgid(u->gid, u->gid, u->gid) == 0 &&
           setresuid(u->uid, u->uid, u->uid) == 0 && geteuid() == u->uid;
}

static void agent_main(const char *path, const User *u, int fd)
{
    AgentState s = { .path = path };
    Cmd cmd;

    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (!become(u)) {
        _exit(100);
    }
    while (read(fd, &cmd, sizeof(cmd)) == sizeof(cmd)) {
        Reply r = { 0 };

        if (cmd.idx < 0 || cmd.idx >= MAX_AGENT_CLIENTS ||
            ((cmd.op == OP_UPLOAD || cmd.op == OP_LOOKUP) &&
             !s.c[cmd.idx])) {
            r.err = -2;
        } else {
            agent_do(&s, &cmd, &r);
        }
        if (write(fd, &r, sizeof(r)) != sizeof(r)) {
            _exit(101);
        }
    }
    _exit(0);
}

static void agent_start(Fixture *f, Agent *a, int user)
{
    int sv[2];

    g_assert_cmpint(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0,
                               sv), ==, 0);
    a->user = &users[user];
    a->pid = fork();
    g_assert_cmpint(a->pid, >=, 0);
    if (a->pid == 0) {
        close(sv[0]);
        agent_main(f->path, a->user, sv[1]);
    }
    close(sv[1]);
    a->fd = sv[0];
}

static Reply agent_cmd(Agent *a, Op op, int idx, const char *group,
                       uint64_t seed, uint32_t n)
{
    Cmd cmd = { .op = op, .idx = idx, .seed = seed, .n = n };
    Reply r;

    if (group) {
        g_strlcpy(cmd.group, group, sizeof(cmd.group));
    }
    g_assert_cmpint(write(a->fd, &cmd, sizeof(cmd)), ==, sizeof(cmd));
    g_assert_cmpint(read(a->fd, &r, sizeof(r)), ==, sizeof(r));
    g_assert_cmpint(r.err, !=, -2);
    return r;
}

static void agent_stop(Agent *a)
{
    int status;

    Cmd cmd = { .op = OP_EXIT };

    if (a->pid <= 0) {
        return;
    }
    /* Not just a close: agents forked later hold this end too */
    g_assert_cmpint(write(a->fd, &cmd, sizeof(cmd)), ==, sizeof(cmd));
    close(a->fd);
    g_assert_cmpint(waitpid(a->pid, &status, 0), ==, a->pid);
    g_assert_true(WIFEXITED(status));
    g_assert_cmpint(WEXITSTATUS(status), ==, 0);
    a->pid = 0;
}

/* Agent commands that must succeed, and those that must be refused */

static int join(Agent *a, int idx, const char *group)
{
    Reply r = agent_cmd(a, OP_JOIN, idx, group, 0, 0);

    if (r.err) {
        g_test_message("uid %u joining %s: %s", (unsigned)a->user->uid,
                       group, r.msg);
    }
    return r.err;
}

static void join_ok(Agent *a, int idx, const char *group)
{
    g_assert_cmpint(join(a, idx, group), ==, 0);
}

static uint32_t upload_ok(Agent *a, int idx, uint64_t seed)
{
    Reply r = agent_cmd(a, OP_UPLOAD, idx, NULL, seed, 1);

    g_assert_cmpint(r.err, ==, 0);
    g_assert_cmpuint(r.status, ==, MS_STATUS_OK);
    return r.slot;
}

static Reply lookup(Agent *a, int idx, uint64_t seed)
{
    Reply r = agent_cmd(a, OP_LOOKUP, idx, NULL, seed, 0);

    g_assert_cmpint(r.err, ==, 0);
    return r;
}

/* A legitimate member still shares: its page is found where it was */
static void still_hits(Agent *a, int idx, uint64_t seed, uint32_t slot)
{
    Reply r = lookup(a, idx, seed);

    g_assert_cmpuint(r.status, ==, MS_STATUS_OK);
    g_assert_cmpuint(r.slot, ==, slot);
}

static MsProtoGroupStats group_stats(Agent *a, int idx)
{
    Reply r = agent_cmd(a, OP_STATS, idx, NULL, 0, 0);

    g_assert_cmpint(r.err, ==, 0);
    /* A member sees its own group, and only it */
    g_assert_cmpuint(r.ngroups, ==, 1);
    return r.gs;
}

/*
 * Open @n connections that never send a byte; wait until the broker
 * refused @refused of them (it answers a refusal at once, with an
 * ERROR), and give it a moment to refuse more: the administrator's
 * counters, read later, must then say exactly as many
 */
static Reply idle_conns(Agent *a, uint32_t n, uint32_t refused)
{
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;
    Reply r = agent_cmd(a, OP_IDLE, 0, NULL, 0, n);
    Reply got = { 0 };

    g_assert_cmpint(r.err, ==, 0);
    g_assert_cmpuint(r.ok, ==, n);
    for (int settle = 0; settle < 10; g_usleep(10 * 1000)) {
        r = agent_cmd(a, OP_REFUSED, 0, NULL, 0, 0);
        got.quota += r.quota;
        got.ok = r.ok;
        if (r.quota) {
            got.err = r.err;
            memcpy(got.msg, r.msg, sizeof(got.msg));
        }
        g_assert_cmpuint(got.quota, <=, refused);
        settle += got.quota == refused;
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
    }
    return got;
}

static bool need_users(void)
{
    if (geteuid() != 0) {
        g_test_skip("not root: cannot run clients as other uids");
        return false;
    }
    if (!have_users) {
        g_test_skip("cannot create the test's users with useradd");
        return false;
    }
    return true;
}

/* Tests */

/*
 * Two uids name the same undeclared group: two private groups, nothing
 * shared between them; a uid's own clients share; STATS shows a member
 * its own group only, and nothing to a non-member that is not root
 */
static void test_private_groups(Fixture *f, gconstpointer data)
{
    Agent a, b;
    g_autoptr(GArray) groups = NULL;
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) root = NULL;
    MsProtoGroupStats gs;
    MsProtoBrokerStats bs;
    uint32_t slot;
    Reply r;
    uint64_t owners = 0;

    (void)data;
    if (!need_users()) {
        return;
    }
    broker_start(f, "");
    agent_start(f, &a, U_A);
    agent_start(f, &b, U_B);
    join_ok(&a, 0, "web");
    slot = upload_ok(&a, 0, 1);
    join_ok(&b, 0, "web");
    /* B's "web" is not A's: A's page is not there */
    g_assert_cmpuint(lookup(&b, 0, 1).status, ==, MS_STATUS_NOT_FOUND);
    gs = group_stats(&b, 0);
    g_assert_cmpstr(gs.name, ==, "web");
    g_assert_cmpuint(gs.owner, ==, users[U_B].uid);
    g_assert_cmpuint(gs.clients, ==, 1);
    g_assert_cmpuint(gs.slots_used, ==, 0);
    g_assert_cmpuint(gs.lookups, ==, 1);
    gs = group_stats(&a, 0);
    g_assert_cmpuint(gs.owner, ==, users[U_A].uid);
    g_assert_cmpuint(gs.clients, ==, 1);
    g_assert_cmpuint(gs.slots_used, ==, 1);

    /* A's second VM shares A's group */
    join_ok(&a, 1, "web");
    still_hits(&a, 1, 1, slot);
    /* Nor does root's "web" see it */
    root = ms_broker_client_connect(f->path, "web", "root", 0, &err);
    g_assert_no_error(err);
    {
        g_autofree uint8_t *p = g_malloc(page);
        uint64_t h;
        MsProtoResult res;

        fill(p, 1);
        h = ms_broker_client_hash(root, p);
        g_assert_true(ms_broker_client_lookup(root, &h, 1, &res, &err));
        g_assert_cmpuint(res.status, ==, MS_STATUS_NOT_FOUND);
    }
    /* Every group's statistics: the administrator's only */
    r = agent_cmd(&b, OP_STATS, 3, NULL, 0, 0);
    g_assert_cmpint(r.err, ==, EACCES);

    bs = admin_stats(f, &groups);
    g_assert_cmpuint(groups->len, ==, 3);
    for (guint i = 0; i < groups->len; i++) {
        MsProtoGroupStats *g = &g_array_index(groups, MsProtoGroupStats, i);

        g_assert_cmpstr(g->name, ==, "web");
        g_assert_cmpuint(g->owner, !=, MS_PROTO_OWNER_NONE);
        owners |= g->owner == users[U_A].uid ? 1 : 0;
        owners |= g->owner == users[U_B].uid ? 2 : 0;
        owners |= g->owner == 0 ? 4 : 0;
    }
    g_assert_cmpuint(owners, ==, 7);
    g_assert_cmpuint(bs.refused_access, ==, 1);
    assert_log(f, "uid %u): STATS of every group: only root",
               (unsigned)users[U_B].uid);
    still_hits(&a, 0, 1, slot);
    agent_stop(&a);
    agent_stop(&b);
}

/*
 * A declared group spans the uids and gids it lists, names or numbers,
 * and nobody else: not another uid, not root
 */
static void test_declared_groups(Fixture *f, gconstpointer data)
{
    Agent a, b, c, h;
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) root = NULL;
    g_autofree char *conf = NULL;
    uint32_t slot;
    MsProtoBrokerStats bs;

    (void)data;
    if (!need_users()) {
        return;
    }
    /* A by name, B by number; C through its supplementary group */
    conf = g_strdup_printf("[group team]\nuids=%s, %u\n\n"
                           "[group staff]\ngids=%s\n", users[U_A].name,
                           (unsigned)users[U_B].uid, staff);
    broker_start(f, conf);
    agent_start(f, &a, U_A);
    agent_start(f, &b, U_B);
    agent_start(f, &c, U_C);
    agent_start(f, &h, U_H1);
    join_ok(&a, 0, "team");
    slot = upload_ok(&a, 0, 1);
    join_ok(&b, 0, "team");
    still_hits(&b, 0, 1, slot);
    g_assert_cmpuint(group_stats(&b, 0).owner, ==, MS_PROTO_OWNER_NONE);

    g_assert_cmpint(join(&h, 0, "team"), ==, EACCES);
    g_assert_cmpint(join(&c, 0, "team"), ==, EACCES);
    root = ms_broker_client_connect(f->path, "team", "root", 0, &err);
    g_assert_null(root);
    g_assert_error(err, MS_ENGINE_ERROR, EACCES);
    g_assert_nonnull(strstr(err->message, "declared for other users"));

    join_ok(&c, 0, "staff");
    g_assert_cmpint(join(&h, 1, "staff"), ==, EACCES);

    bs = admin_stats(f, NULL);
    g_assert_cmpuint(bs.refused_access, ==, 4);
    assert_log(f, "uid %u): group team is declared for other users",
               (unsigned)users[U_H1].uid);
    assert_log(f, "pid %d uid %u", (int)h.pid, (unsigned)users[U_H1].uid);
    /* The members never noticed */
    still_hits(&a, 0, 1, slot);
    still_hits(&b, 0, 1, slot);
    g_assert_cmpuint(group_stats(&a, 0).clients, ==, 2);
    agent_stop(&a);
    agent_stop(&b);
    agent_stop(&c);
    agent_stop(&h);
}

/* Upload unique pages from client @idx until refused; how many went in */
static uint32_t upload_until_quota(Agent *a, int idx, uint64_t seed)
{
    uint32_t stored = 0;

    for (int i = 0; i < NSLOTS / 32; i++) {
        Reply r = agent_cmd(a, OP_UPLOAD, idx, NULL, seed + stored, 32);

        g_assert_cmpint(r.err, ==, 0);
        g_assert_cmpuint(r.other, ==, 0);
        stored += r.ok;
        if (r.quota) {
            return stored;
        }
    }
    return stored;
}

/*
 * A hostile member of a shared group stores unique pages: one client
 * gets half the store's slots in references, all of its uid's clients
 * together half the store's pages; the legitimate member still stores
 * and shares.  In a private group only the client quota holds: the
 * store is the uid's own.
 */
static void test_quotas(Fixture *f, gconstpointer data)
{
    Agent a, h, p;
    g_autofree char *conf = NULL;
    uint32_t slot;
    Reply r;
    MsProtoGroupStats gs;
    MsProtoBrokerStats bs;

    (void)data;
    if (!need_users()) {
        return;
    }
    conf = g_strdup_printf("[group team]\nuids=%s;%s\n", users[U_A].name,
                           users[U_H1].name);
    broker_start(f, conf);
    agent_start(f, &a, U_A);
    agent_start(f, &h, U_H1);
    agent_start(f, &p, U_H2);
    join_ok(&a, 0, "team");
    slot = upload_ok(&a, 0, 1);
    join_ok(&h, 0, "team");
    join_ok(&h, 1, "team");

    /* One client: its references */
    g_assert_cmpuint(upload_until_quota(&h, 0, 1000), ==, QUOTA);
    gs = group_stats(&h, 0);
    g_assert_cmpuint(gs.refused_quota, >, 0);
    g_assert_cmpuint(gs.refused_quota, ==, gs.refused);
    /* Its uid's other client: the uid's pages are at uid-quota */
    r = agent_cmd(&h, OP_UPLOAD, 1, NULL, 5000, 1);
    g_assert_cmpuint(r.status, ==, MS_STATUS_QUOTA);
    /* But sharing is not storing: it may still map A's page */
    still_hits(&h, 1, 1, slot);

    /* The member stores new pages: there is room, and it shares */
    r = agent_cmd(&a, OP_UPLOAD, 0, NULL, 2, 32);
    g_assert_cmpuint(r.ok, ==, 32);
    still_hits(&a, 0, 1, slot);
    g_assert_cmpuint(lookup(&a, 0, 1000).status, ==, MS_STATUS_OK);

    /* Private: the uid's second client goes past half the store */
    join_ok(&p, 0, "mine");
    join_ok(&p, 1, "mine");
    g_assert_cmpuint(upload_until_quota(&p, 0, 1000), ==, QUOTA);
    r = agent_cmd(&p, OP_UPLOAD, 1, NULL, 9000, 32);
    g_assert_cmpuint(r.ok, ==, 32);

    bs = admin_stats(f, NULL);
    g_assert_cmpuint(bs.refused_client_quota, >=, 2);
    g_assert_cmpuint(bs.refused_uid_quota, ==, 1);
    assert_log(f, "uid %u stored %u pages in group team, uid-quota allows"
               " %u", (unsigned)users[U_H1].uid, QUOTA, QUOTA);
    assert_log(f, "its client-quota is %u", QUOTA);
    agent_stop(&a);
    agent_stop(&h);
    agent_stop(&p);
}

/*
 * Connections: one uid gets half of max-clients; strangers then fill
 * the rest and are refused; members keep theirs, and one that connects
 * again gets one of the reserved connections
 */
static void test_connections(Fixture *f, gconstpointer data)
{
    Agent a, b, h1, h2, h3;
    uint32_t slot_a, slot_b;
    Reply r;
    MsProtoBrokerStats bs;

    (void)data;
    if (!need_users()) {
        return;
    }
    /* The strangers' connections stay for the whole test */
    broker_start(f, "join-timeout=600\n");
    agent_start(f, &a, U_A);
    agent_start(f, &b, U_B);
    agent_start(f, &h1, U_H1);
    agent_start(f, &h2, U_H2);
    agent_start(f, &h3, U_H3);
    join_ok(&a, 0, "web");
    slot_a = upload_ok(&a, 0, 1);
    /* B's VM lost its connection, but lives: B has a parked client */
    join_ok(&b, 0, "mine");
    slot_b = upload_ok(&b, 0, 2);
    agent_cmd(&b, OP_CLOSE, 0, NULL, 0, 0);

    r = idle_conns(&h1, MAX_PER_UID + 8, 8);
    g_assert_cmpuint(r.quota, ==, 8);
    g_assert_cmpint(r.err, ==, EUSERS);
    g_assert_nonnull(strstr(r.msg, "max-clients-per-uid"));
    g_assert_cmpuint(r.ok, ==, MAX_PER_UID);
    /* A and B's parked client hold two: H2 fills the rest */
    r = idle_conns(&h2, MAX_PER_UID, 2);
    g_assert_cmpuint(r.ok, ==, MAX_CLIENTS - 2 - MAX_PER_UID);
    g_assert_cmpuint(r.quota, ==, 2);
    g_assert_cmpint(r.err, ==, EUSERS);
    g_assert_nonnull(strstr(r.msg, "the broker is full"));
    r = idle_conns(&h3, 1, 1);
    g_assert_cmpint(r.err, ==, EUSERS);

    /* Members kept sharing */
    still_hits(&a, 0, 1, slot_a);
    /* A's second VM, and B's VM rejoining: the reserve */
    join_ok(&a, 1, "web");
    still_hits(&a, 1, 1, slot_a);
    join_ok(&b, 1, "mine");
    still_hits(&b, 1, 2, slot_b);

    /* Nobody else lost a connection */
    g_assert_cmpuint(agent_cmd(&h1, OP_REFUSED, 0, NULL, 0, 0).ok, ==,
                     MAX_PER_UID);
    bs = admin_stats(f, NULL);
    g_assert_cmpuint(bs.refused_uid_clients, ==, 8);
    g_assert_cmpuint(bs.refused_clients, ==, 3);
    /* A's and B's, and the administrator's look just now */
    g_assert_cmpuint(bs.reserve_admitted, ==, 3);
    g_assert_cmpuint(bs.parked, ==, 1);
    g_assert_cmpuint(bs.clients + bs.parked, ==, MAX_CLIENTS + 3);
    assert_log(f, "refusing a client (pid %d uid %u): uid %u has %u clients"
               " connected or parked, max-clients-per-uid allows %u",
               (int)h1.pid, (unsigned)users[U_H1].uid,
               (unsigned)users[U_H1].uid, MAX_PER_UID, MAX_PER_UID);
    agent_stop(&h1);
    agent_stop(&h2);
    agent_stop(&h3);
    agent_stop(&a);
    agent_stop(&b);
}

/*
 * A broker that just (re)started is full of 64 strangers' connections
 * before any VM comes back: a uid the operator listed still gets in,
 * and so does its uid's next VM; another stranger does not
 */
static void test_rejoin_full(Fixture *f, gconstpointer data)
{
    Agent a, h1, h2, h3;
    g_autofree char *conf = NULL;
    uint32_t slot;
    Reply r;
    MsProtoBrokerStats bs;

    (void)data;
    if (!need_users()) {
        return;
    }
    conf = g_strdup_printf("join-timeout=600\n[group team]\nuids=%s\n",
                           users[U_A].name);
    broker_start(f, conf);
    agent_start(f, &a, U_A);
    agent_start(f, &h1, U_H1);
    agent_start(f, &h2, U_H2);
    agent_start(f, &h3, U_H3);
    r = idle_conns(&h1, MAX_PER_UID, 0);
    g_assert_cmpuint(r.ok, ==, MAX_PER_UID);
    r = idle_conns(&h2, MAX_PER_UID, 0);
    g_assert_cmpuint(r.ok, ==, MAX_PER_UID);
    /* 64 strangers' connections: the next stranger is refused */
    r = idle_conns(&h3, 1, 1);
    g_assert_cmpint(r.err, ==, EUSERS);

    join_ok(&a, 0, "team");
    slot = upload_ok(&a, 0, 1);
    join_ok(&a, 1, "team");
    still_hits(&a, 1, 1, slot);
    /* The member's first VM goes and comes back */
    agent_cmd(&a, OP_CLOSE, 0, NULL, 0, 0);
    join_ok(&a, 0, "team");
    still_hits(&a, 0, 1, slot);

    /* The strangers kept theirs: nobody was dropped to make room */
    g_assert_cmpuint(agent_cmd(&h1, OP_REFUSED, 0, NULL, 0, 0).ok, ==,
                     MAX_PER_UID);
    g_assert_cmpuint(agent_cmd(&h2, OP_REFUSED, 0, NULL, 0, 0).ok, ==,
                     MAX_PER_UID);
    bs = admin_stats(f, NULL);
    g_assert_cmpuint(bs.refused_clients, ==, 1);
    /* A's three connections and the administrator's */
    g_assert_cmpuint(bs.reserve_admitted, ==, 4);
    assert_log(f, "uid %u): taken into the reserve",
               (unsigned)users[U_A].uid);
    agent_stop(&h1);
    agent_stop(&h2);
    agent_stop(&h3);
    agent_stop(&a);
}

/*
 * A uid at its share of connections: a VM of it whose old connection
 * is parked (its QEMU lives) still gets back in, from the reserve; a
 * stranger at its share does not get more
 */
static void test_rejoin_uid_limit(Fixture *f, gconstpointer data)
{
    Agent b, h;
    uint32_t slot;
    Reply r;
    MsProtoBrokerStats bs;

    (void)data;
    if (!need_users()) {
        return;
    }
    broker_start(f, "max-clients-per-uid=2\njoin-timeout=600\n");
    agent_start(f, &b, U_B);
    agent_start(f, &h, U_H1);
    join_ok(&b, 0, "mine");
    slot = upload_ok(&b, 0, 1);
    join_ok(&b, 1, "mine");
    agent_cmd(&b, OP_CLOSE, 0, NULL, 0, 0);
    /* Two: one connected, one parked.  The VM comes back */
    join_ok(&b, 0, "mine");
    still_hits(&b, 0, 1, slot);
    r = idle_conns(&h, 3, 1);
    g_assert_cmpint(r.err, ==, EUSERS);
    g_assert_cmpuint(r.ok, ==, 2);
    bs = admin_stats(f, NULL);
    g_assert_cmpuint(bs.refused_uid_clients, ==, 1);
    g_assert_cmpuint(bs.reserve_admitted, ==, 1);
    assert_log(f, "uid %u): taken into the reserve",
               (unsigned)users[U_B].uid);
    agent_stop(&b);
    agent_stop(&h);
}

/*
 * Two uids that each made themselves a member of a private group fill
 * max-clients and take what they may of the reserve: half of it.  The
 * uid a declared group lists, and the administrator, still get in.
 */
static void test_reserve_hogs(Fixture *f, gconstpointer data)
{
    Agent a, h1, h2, h3;
    g_autofree char *conf = NULL;
    uint32_t slot;
    Reply r;
    MsProtoBrokerStats bs;

    (void)data;
    if (!need_users()) {
        return;
    }
    conf = g_strdup_printf("join-timeout=600\n[group team]\nuids=%s\n",
                           users[U_A].name);
    broker_start(f, conf);
    agent_start(f, &a, U_A);
    agent_start(f, &h1, U_H1);
    agent_start(f, &h2, U_H2);
    agent_start(f, &h3, U_H3);
    join_ok(&h1, 0, "mine");
    join_ok(&h2, 0, "mine");
    /* Its share less its member, and half the reserve */
    r = idle_conns(&h1, MAX_PER_UID + 8, 5);
    g_assert_cmpuint(r.ok, ==, MAX_PER_UID - 1 + 4);
    g_assert_cmpint(r.err, ==, EUSERS);
    /* The rest of max-clients; the reserve's first half is gone */
    r = idle_conns(&h2, MAX_PER_UID, 1);
    g_assert_cmpuint(r.ok, ==, MAX_CLIENTS - (2 + MAX_PER_UID - 1 + 4) + 4);
    g_assert_nonnull(strstr(r.msg, "the broker is full"));
    r = idle_conns(&h3, 1, 1);
    g_assert_cmpint(r.err, ==, EUSERS);

    join_ok(&a, 0, "team");
    slot = upload_ok(&a, 0, 1);
    join_ok(&a, 1, "team");
    still_hits(&a, 1, 1, slot);
    bs = admin_stats(f, NULL);
    g_assert_cmpuint(bs.clients, ==, MAX_CLIENTS + 4 + 2 + 1);
    assert_log(f, "uid %u): taken into the reserve",
               (unsigned)users[U_A].uid);
    agent_stop(&h1);
    agent_stop(&h2);
    agent_stop(&h3);
    agent_stop(&a);
}

/*
 * Connections that never join are dropped after join-timeout, with
 * ETIMEDOUT; members that stay idle longer than that, and a parked
 * client, are not
 */
static void test_idle(Fixture *f, gconstpointer data)
{
    Agent a, b, h;
    gint64 deadline;
    uint32_t slot_a, dropped = 0;
    MsProtoBrokerStats bs;
    g_autoptr(GArray) groups = NULL;

    (void)data;
    if (!need_users()) {
        return;
    }
    broker_start(f, "join-timeout=1\n");
    agent_start(f, &a, U_A);
    agent_start(f, &b, U_B);
    agent_start(f, &h, U_H1);
    join_ok(&a, 0, "web");
    slot_a = upload_ok(&a, 0, 1);
    join_ok(&b, 0, "mine");
    upload_ok(&b, 0, 2);
    agent_cmd(&b, OP_CLOSE, 0, NULL, 0, 0);
    g_assert_cmpuint(agent_cmd(&h, OP_IDLE, 0, NULL, 0, 10).ok, ==, 10);

    deadline = g_get_monotonic_time() + DEADLINE_US;
    while (dropped < 10) {
        Reply r = agent_cmd(&h, OP_REFUSED, 0, NULL, 0, 0);

        g_assert_true(r.err == 0 || r.err == ETIMEDOUT);
        dropped += r.quota;
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(50 * 1000);
    }
    g_assert_cmpuint(dropped, ==, 10);
    /* The member was idle for longer, and is still served */
    still_hits(&a, 0, 1, slot_a);
    bs = admin_stats(f, &groups);
    g_assert_cmpuint(bs.dropped_idle, ==, 10);
    for (guint i = 0; i < groups->len; i++) {
        MsProtoGroupStats *g = &g_array_index(groups, MsProtoGroupStats, i);

        if (g->owner == users[U_B].uid) {
            g_assert_cmpuint(g->parked, ==, 1);
            g_assert_cmpuint(g->refs, ==, 1);
        }
    }
    assert_log(f, "uid %u): no HELLO within 1 s of connecting",
               (unsigned)users[U_H1].uid);
    agent_stop(&a);
    agent_stop(&b);
    agent_stop(&h);
}

/*
 * Private groups: 4 per uid, 16 in all; the operator's declared groups
 * are never crowded out, and existing groups can still be joined
 */
static void test_groups(Fixture *f, gconstpointer data)
{
    Agent a, b, h[4];
    g_autofree char *conf = NULL;
    uint32_t slot;
    MsProtoBrokerStats bs;

    (void)data;
    if (!need_users()) {
        return;
    }
    conf = g_strdup_printf("[group team]\nuids=%s\n", users[U_A].name);
    broker_start(f, conf);
    agent_start(f, &a, U_A);
    agent_start(f, &b, U_B);
    for (int i = 0; i < 4; i++) {
        agent_start(f, &h[i], U_H1 + i);
        for (int j = 0; j < MAX_GROUPS_PER_UID; j++) {
            g_autofree char *name = g_strdup_printf("g%d", j);

            join_ok(&h[i], j, name);
        }
        if (i == 0) {
            /* The uid's share, while the broker has room for more */
            g_assert_cmpint(join(&h[0], MAX_GROUPS_PER_UID, "one-more"), ==,
                            ENOSPC);
        }
    }
    /* Every private group is taken: B cannot make one */
    g_assert_cmpint(join(&b, 0, "mine"), ==, ENOSPC);
    /* The declared group is served; an existing one can be joined */
    join_ok(&a, 0, "team");
    slot = upload_ok(&a, 0, 1);
    join_ok(&h[1], MAX_GROUPS_PER_UID, "g0");
    bs = admin_stats(f, NULL);
    g_assert_cmpuint(bs.refused_groups, ==, 2);
    g_assert_cmpuint(bs.groups, ==, MAX_GROUPS + 1);
    assert_log(f, "uid %u has %u private groups, max-groups-per-uid"
               " allows %u", (unsigned)users[U_H1].uid, MAX_GROUPS_PER_UID,
               MAX_GROUPS_PER_UID);
    assert_log(f, "as many private groups as max-groups allows (%u)",
               MAX_GROUPS);
    still_hits(&a, 0, 1, slot);
    for (int i = 0; i < 4; i++) {
        agent_stop(&h[i]);
    }
    agent_stop(&a);
    agent_stop(&b);
}

static int count(const char *s, const char *what)
{
    int n = 0;

    for (const char *p = s; (p = strstr(p, what)); p++) {
        n++;
    }
    return n;
}

/* Write @conf, send SIGHUP, wait for the verdict of the @n-th reload */
static void sighup(Fixture *f, const char *conf, int n)
{
    gint64 deadline = g_get_monotonic_time() + DEADLINE_US;

    write_conf(f, conf);
    g_assert_cmpint(kill(f->pid, SIGHUP), ==, 0);
    for (;;) {
        g_autofree char *log = broker_log(f);

        if (count(log, "reload done") + count(log, "reload failed") >= n) {
            return;
        }
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(10000);
    }
}

/*
 * SIGHUP: a member the new list leaves out stays until it leaves, but
 * cannot join again; new limits hold for new joins; a file that no
 * longer parses changes nothing; a group no longer declared serves its
 * members, and the name gives private groups from then on
 */
static void test_reload(Fixture *f, gconstpointer data)
{
    Agent a, b;
    g_autofree char *v1 = NULL;
    g_autofree char *v2 = NULL;
    g_autoptr(GArray) groups = NULL;
    uint32_t slot;
    bool retired = false;

    (void)data;
    if (!need_users()) {
        return;
    }
    v1 = g_strdup_printf("[group team]\nuids=%s,%s\n", users[U_A].name,
                         users[U_B].name);
    broker_start(f, v1);
    agent_start(f, &a, U_A);
    agent_start(f, &b, U_B);
    join_ok(&a, 0, "team");
    slot = upload_ok(&a, 0, 1);
    join_ok(&b, 0, "team");
    still_hits(&b, 0, 1, slot);

    v2 = g_strdup_printf("max-groups-per-uid=1\n[group team]\nuids=%s\n",
                         users[U_A].name);
    sighup(f, v2, 1);
    assert_log(f, "uid %u is no longer on the list of group team: it stays"
               " a member until it leaves", (unsigned)users[U_B].uid);
    assert_log(f, "max-groups-per-uid: 4 -> 1");
    still_hits(&b, 0, 1, slot);
    g_assert_cmpint(join(&b, 1, "team"), ==, EACCES);
    join_ok(&b, 1, "x1");
    g_assert_cmpint(join(&b, 2, "x2"), ==, ENOSPC);

    sighup(f, "[group team\nuids=\n", 2);
    assert_log(f, "reload failed, the running configuration stays");
    g_assert_cmpint(join(&b, 2, "team"), ==, EACCES);
    still_hits(&a, 0, 1, slot);

    sighup(f, "", 3);
    assert_log(f, "group team: no longer declared: its 2 members");
    still_hits(&a, 0, 1, slot);
    still_hits(&b, 0, 1, slot);
    /* "team" is a name like any other now: A's own */
    join_ok(&a, 1, "team");
    g_assert_cmpuint(lookup(&a, 1, 1).status, ==, MS_STATUS_NOT_FOUND);
    g_assert_cmpuint(group_stats(&a, 1).owner, ==, users[U_A].uid);
    admin_stats(f, &groups);
    for (guint i = 0; i < groups->len; i++) {
        MsProtoGroupStats *g = &g_array_index(groups, MsProtoGroupStats, i);

        retired |= !strcmp(g->name, "team") &&
                   g->owner == MS_PROTO_OWNER_NONE && g->clients == 2;
    }
    g_assert_true(retired);
    agent_stop(&a);
    agent_stop(&b);
}

/* Socket activation, the way systemd does it, without systemd */

typedef enum Activation {
    ACT_OK,             /* fd 3, LISTEN_PID and LISTEN_FDS=1 */
    ACT_SAME_PATH,      /* and --socket naming it */
    ACT_OTHER_PATH,     /* and --socket naming another */
    ACT_TWO_FDS,        /* LISTEN_FDS=2 */
    ACT_NOT_SOCKET,     /* fd 3 is a pipe */
    ACT_OTHER_PID,      /* LISTEN_PID is someone else's: not for us */
} Activation;

static int listening_socket(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);

    g_strlcpy(sa.sun_path, path, sizeof(sa.sun_path));
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), ==, 0);
    g_assert_cmpint(listen(fd, 16), ==, 0);
    return fd;
}

/* In the child: fd 3 and the environment, as systemd leaves them */
static void activate(Fixture *f, Activation how, int lfd)
{
    const char *bin = g_getenv("MS_BROKER");
    g_autofree char *other = g_build_filename(f->dir, "other.sock", NULL);
    g_autofree char *pid = g_strdup_printf("%d", (int)getpid() +
                                           (how == ACT_OTHER_PID));
    int pfd[2];
    int logfd = open(f->log, O_WRONLY | O_CREAT | O_APPEND, 0600);

    prctl(PR_SET_PDEATHSIG, SIGKILL);
    dup2(logfd, 1);
    dup2(logfd, 2);
    if (how == ACT_NOT_SOCKET) {
        if (pipe(pfd) < 0) {
            _exit(126);
        }
        lfd = pfd[0];
    }
    /* dup2() of an fd onto itself would keep its close-on-exec flag */
    if (lfd != 3 && dup2(lfd, 3) < 0) {
        _exit(126);
    }
    fcntl(3, F_SETFD, 0);
    g_setenv("LISTEN_PID", pid, TRUE);
    g_setenv("LISTEN_FDS", how == ACT_TWO_FDS ? "2" : "1", TRUE);
    switch (how) {
    case ACT_SAME_PATH:
        execl(bin, bin, "--socket", f->path, (char *)NULL);
        break;
    case ACT_OTHER_PATH:
        execl(bin, bin, "--socket", other, (char *)NULL);
        break;
    default:
        execl(bin, bin, (char *)NULL);
        break;
    }
    _exit(127);
}

static int run_activated(Fixture *f, Activation how)
{
    int lfd = listening_socket(f->path);
    int status;

    f->pid = fork();
    g_assert_cmpint(f->pid, >=, 0);
    if (f->pid == 0) {
        activate(f, how, lfd);
    }
    close(lfd);
    if (how != ACT_OK && how != ACT_SAME_PATH) {
        g_assert_cmpint(waitpid(f->pid, &status, 0), ==, f->pid);
        f->pid = 0;
        g_assert_true(WIFEXITED(status));
        return WEXITSTATUS(status);
    }
    wait_ready(f);
    return 0;
}

static void test_activation(Fixture *f, gconstpointer data)
{
    Activation how = GPOINTER_TO_INT(data);
    g_autoptr(GError) err = NULL;
    g_autoptr(MsBrokerClient) c = NULL;
    g_autofree uint8_t *p = g_malloc(page);
    MsProtoResult r;
    uint64_t h;
    int status;

    if (how != ACT_OK && how != ACT_SAME_PATH) {
        g_assert_cmpint(run_activated(f, how), ==, 2);
        switch (how) {
        case ACT_OTHER_PATH:
            assert_log(f, "systemd passed the socket %s but the broker was"
                       " told to listen on", f->path);
            break;
        case ACT_TWO_FDS:
            assert_log(f, "LISTEN_FDS=2: the broker takes exactly one"
                       " socket");
            break;
        case ACT_NOT_SOCKET:
            assert_log(f, "not a listening AF_UNIX stream socket");
            break;
        default:
            assert_log(f, "no socket to listen on");
            break;
        }
        return;
    }
    run_activated(f, how);
    c = ms_broker_client_connect(f->path, "g", "vm", 0, &err);
    g_assert_no_error(err);
    fill(p, 1);
    g_assert_true(ms_broker_client_upload(c, p, NULL, 1, &r, &err));
    g_assert_cmpuint(r.status, ==, MS_STATUS_OK);
    h = ms_broker_client_hash(c, p);
    g_assert_true(ms_broker_client_lookup(c, &h, 1, &r, &err));
    g_assert_cmpuint(r.status, ==, MS_STATUS_OK);
    assert_log(f, "listening on %s (from systemd)", f->path);
    g_clear_pointer(&c, ms_broker_client_free);

    kill(f->pid, SIGTERM);
    g_assert_cmpint(waitpid(f->pid, &status, 0), ==, f->pid);
    f->pid = 0;
    g_assert_true(WIFEXITED(status));
    g_assert_cmpint(WEXITSTATUS(status), ==, 0);
    /* The socket is systemd's: the broker leaves it where it was */
    g_assert_true(g_file_test(f->path, G_FILE_TEST_EXISTS));
}

/* Configuration files that are wrong: a clear error, never a crash */
static void test_bad_config(Fixture *f, gconstpointer data)
{
    static const struct {
        const char *text;
        const char *error;
    } cases[] = {
        { "[broker]\nmax-client=3\n", "unknown key 'max-client'" },
        { "[broker]\nmax-clients=0\n", "a number from 1 to 65536" },
        { "[broker]\njoin-timeout=-1\n", "join-timeout=-1" },
        { "[broker]\nmax-store=12Q\n", "max-store=12Q" },
        { "[broker]\nstrict-groups=maybe\n", "true or false" },
        { "[brokr]\n", "unknown section [brokr]" },
        { "[group web]\n", "say who may join" },
        { "[group web]\nuids=no-such-user-here\n", "no user named" },
        { "[group web]\ngids=*\n", "'*' is for uids" },
        { "[group ../x]\nuids=*\n", "bad group name" },
        { "[group web]\nuids=1,2\nmembers=3\n", "unknown key 'members'" },
        { "[broker]\nstrict-groups=true\n", "none is declared" },
        { "\x01\xff\xfe garbage [[[\n", "cannot read" },
    };
    const char *bin = g_getenv("MS_BROKER");

    (void)data;
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autoptr(GError) err = NULL;
        g_autofree char *out = NULL;
        int status;
        const char *argv[] = { bin, "--config", f->conf, "--socket", f->path,
                               NULL };

        g_assert_true(g_file_set_contents(f->conf, cases[i].text, -1,
                                          &err));
        g_assert_true(g_spawn_sync(NULL, (char **)argv, NULL,
                                   G_SPAWN_STDOUT_TO_DEV_NULL, NULL, NULL,
                                   NULL, &out, &status, &err));
        g_assert_no_error(err);
        g_assert_true(WIFEXITED(status));
        g_assert_cmpint(WEXITSTATUS(status), ==, 2);
        if (!strstr(out, cases[i].error)) {
            g_test_message("case %zu: '%s' not in: %s", i, cases[i].error,
                           out);
            g_test_fail();
        }
        g_assert_false(g_file_test(f->path, G_FILE_TEST_EXISTS));
    }
    /* A file given that is not there is an error too */
    {
        g_autofree char *missing = g_build_filename(f->dir, "none.conf",
                                                    NULL);
        const char *argv[] = { bin, "--config", missing, "--socket",
                               f->path, NULL };
        g_autofree char *out = NULL;
        int status;

        g_assert_true(g_spawn_sync(NULL, (char **)argv, NULL,
                                   G_SPAWN_STDOUT_TO_DEV_NULL, NULL, NULL,
                                   NULL, &out, &status, NULL));
        g_assert_cmpint(WEXITSTATUS(status), ==, 2);
        g_assert_nonnull(strstr(out, "none.conf"));
    }
}

static void add(const char *name, void (*fn)(Fixture *, gconstpointer),
                gconstpointer data)
{
    g_test_add(name, Fixture, data, fixture_setup, fn, fixture_teardown);
}

int main(int argc, char **argv)
{
    int rc;

    g_test_init(&argc, &argv, NULL);
    page = ms_host_page_size();
    signal(SIGPIPE, SIG_IGN);
    have_users = geteuid() == 0 && create_users();

    add("/broker-service/private-groups", test_private_groups, NULL);
    add("/broker-service/declared-groups", test_declared_groups, NULL);
    add("/broker-service/quotas", test_quotas, NULL);
    add("/broker-service/connections", test_connections, NULL);
    add("/broker-service/rejoin-full", test_rejoin_full, NULL);
    add("/broker-service/rejoin-uid-limit", test_rejoin_uid_limit, NULL);
    add("/broker-service/reserve-hogs", test_reserve_hogs, NULL);
    add("/broker-service/idle", test_idle, NULL);
    add("/broker-service/groups", test_groups, NULL);
    add("/broker-service/reload", test_reload, NULL);
    add("/broker-service/activation/ok", test_activation,
        GINT_TO_POINTER(ACT_OK));
    add("/broker-service/activation/same-path", test_activation,
        GINT_TO_POINTER(ACT_SAME_PATH));
    add("/broker-service/activation/other-path", test_activation,
        GINT_TO_POINTER(ACT_OTHER_PATH));
    add("/broker-service/activation/two-fds", test_activation,
        GINT_TO_POINTER(ACT_TWO_FDS));
    add("/broker-service/activation/not-a-socket", test_activation,
        GINT_TO_POINTER(ACT_NOT_SOCKET));
    add("/broker-service/activation/other-pid", test_activation,
        GINT_TO_POINTER(ACT_OTHER_PID));
    add("/broker-service/bad-config", test_bad_config, NULL);
    rc = g_test_run();
    remove_users();
    return rc;
}
