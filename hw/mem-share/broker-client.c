/*
 * mem-share engine: the client side of the broker protocol
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Requests go out in order and their replies come back in order, one
 * frame each.  A call sends its request and waits for the reply until a
 * deadline (the client's timeout), or until the owner's interrupt
 * callback says someone needs the caller's locks.  Every wait is a
 * poll() in slices of at most INTERRUPT_SLICE_MS.
 *
 * A deadline is never proof that the broker is gone: a broker that a
 * SIGSTOP, swap or a busy host holds up answers later, and it keeps
 * every reference it handed out.  So a call that runs out of time leaves
 * its request pending instead of killing the connection:
 *
 *  - a frame that could not be sent in full keeps its unsent bytes
 *    (copied) and goes out before anything else;
 *  - its reply is read whenever it comes, by a later call, as are the
 *    replies of requests sent without waiting (RELEASE);
 *  - a late LOOKUP or UPLOAD reply hands the client references its
 *    caller never saw: they are released (a RELEASE queued right away);
 *    a late ANSWERED reply's answers are lost: the next ANSWERED call
 *    says so.
 *
 * While a request that timed out is still unanswered the broker is
 * "stalled": calls that wait fail at once (EAGAIN) after a look at the
 * socket, so that the caller goes on without the group instead of
 * paying a timeout per call.  Releases never wait at all: they are
 * queued and sent as the socket takes them.
 *
 * Only a broken connection kills the client: end of file, a socket
 * error, a reply that is not what the protocol says, an ERROR.  Then
 * later calls fail at once (EPIPE) and the caller frees the client.  The
 * references it held stay with the broker until this process exits (the
 * broker watches it with a pidfd) or the broker itself goes: pages that
 * still map slots of that store keep them.
 *
 * The broker is trusted more than a guest, but not blindly: its replies
 * go through the same decoder as anything else, and a descriptor arrives
 * only with WELCOME (any other is closed).  Before the first byte goes
 * out, the listener's credentials say whether it is the broker at all
 * (check_broker()): a HELLO alone tells the group and the VM's name, and
 * the LOOKUPs and UPLOADs that follow give away guest pages.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE     /* QEMU defines it on its command line */
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "mem-share/broker-client.h"
#include "mem-share/store.h"

#define DEFAULT_TIMEOUT_MS 5000
/* A wait looks at the interrupt callback at least this often */
#define INTERRUPT_SLICE_MS 10

G_STATIC_ASSERT(MS_PROTO_SECRET_SIZE == MS_HASH_SECRET_SIZE);

/* A request on the wire whose reply has not been read yet */
typedef struct Pending {
    uint32_t id;
    MsProtoType reply;      /* the type its reply must have */
} Pending;

struct MsBrokerClient {
    int fd;
    int store_fd;
    bool dead;
    bool joined;
    bool stalled;           /* a call timed out on a reply still due */
    int timeout_ms;
    uint32_t next_id;
    MsBrokerParams params;
    GByteArray *frame;      /* the reply being received, or the last one */
    size_t frame_want;      /* its full size, once its header is in */
    bool frame_taken;       /* the last one was decoded: start anew */
    GByteArray *unsent;     /* bytes of frames that must go out first */
    GArray *pending;        /* Pending, oldest first */
    GArray *orphans;        /* uint32_t: slots of late replies, to release */
    MsBrokerInterruptFn *interrupt;
    void *interrupt_opaque;
    uint64_t late_refs;     /* references late replies handed us */
    uint64_t features;      /* MS_FEATURE_*, from the last member STATS */
    bool features_known;
    bool answers_lost;      /* a late ANSWERED reply took some */
};

/* How a wait ended, short of success */
typedef enum WaitEnd {
    WAIT_OK,
    WAIT_TIMEOUT,           /* the deadline passed: the broker is slow */
    WAIT_INTERRUPTED,       /* the owner needs us back */
    WAIT_DEAD,              /* the connection is gone: errp is set */
} WaitEnd;

static bool set_dead(MsBrokerClient *c, GError **errp, int code,
                     const char *fmt, ...) G_GNUC_PRINTF(4, 5);

/* The connection is unusable from now on: say why, once */
static bool set_dead(MsBrokerClient *c, GError **errp, int code,
                     const char *fmt, ...)
{
    va_list ap;

    c->dead = true;
    va_start(ap, fmt);
    g_propagate_error(errp, g_error_new_valist(MS_ENGINE_ERROR, code, fmt,
                                               ap));
    va_end(ap);
    return false;
}

/*
 * Wait for @events until @deadline (monotonic, us; 0: just look), in
 * slices, asking the interrupt callback between them.
 */
static WaitEnd wait_fd(MsBrokerClient *c, short events, gint64 deadline,
                       GError **errp)
{
    for (;;) {
        gint64 left = deadline - g_get_monotonic_time();
        struct pollfd pfd = { .fd = c->fd, .events = events };
        int ms = left <= 0 ? 0 : (int)MIN(left / 1000 + 1,
                                          INTERRUPT_SLICE_MS);
        int r = poll(&pfd, 1, ms);

        if (r > 0) {
            return WAIT_OK;
        }
        if (r < 0 && errno != EINTR) {
            set_dead(c, errp, errno, "cannot poll the broker socket: %s",
                     g_strerror(errno));
            return WAIT_DEAD;
        }
        if (left <= 0) {
            return WAIT_TIMEOUT;
        }
        if (c->interrupt && c->interrupt(c->interrupt_opaque)) {
            return WAIT_INTERRUPTED;
        }
    }
}

/* Step @iov (@cnt entries, from *@first) over @n bytes that went out */
static void iov_advance(struct iovec *iov, size_t cnt, size_t *first,
                        size_t n)
{
    while (*first < cnt && n >= iov[*first].iov_len) {
        n -= iov[(*first)++].iov_len;
    }
    if (n) {
        iov[*first].iov_base = (uint8_t *)iov[*first].iov_base + n;
        iov[*first].iov_len -= n;
    }
}

/*
 * Send what @iov holds until @deadline.  Returns the wait's end; what
 * did not go out is left in iov[*first..].
 */
static WaitEnd send_iov(MsBrokerClient *c, struct iovec *iov, size_t cnt,
                        size_t *first, gint64 deadline, GError **errp)
{
    while (*first < cnt) {
        struct msghdr mh = {
            .msg_iov = iov + *first,
            .msg_iovlen = MIN(cnt - *first, IOV_MAX),
        };
        ssize_t n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        WaitEnd w;

        if (n >= 0) {
            iov_advance(iov, cnt, first, n);
            continue;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno != EAGAIN) {
            set_dead(c, errp, EPIPE, "broker connection lost: %s",
                     g_strerror(errno));
            return WAIT_DEAD;
        }
        w = wait_fd(c, POLLOUT, deadline, errp);
        if (w != WAIT_OK) {
            return w;
        }
    }
    return WAIT_OK;
}

/* Send the bytes left over from earlier frames, until @deadline */
static WaitEnd flush_unsent(MsBrokerClient *c, gint64 deadline,
                            GError **errp)
{
    struct iovec iov = { c->unsent->data, c->unsent->len };
    size_t first = 0;
    WaitEnd w;

    if (!c->unsent->len) {
        return WAIT_OK;
    }
    w = send_iov(c, &iov, 1, &first, deadline, errp);
    g_byte_array_remove_range(c->unsent, 0, c->unsent->len -
                              (first ? 0 : iov.iov_len));
    return w;
}

/* Keep a received descriptor only if we expect one and have none yet */
static void take_fds(struct msghdr *mh, int *fd_out)
{
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm;
         cm = CMSG_NXTHDR(mh, cm)) {
        int nfds;

        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) {
            continue;
        }
        nfds = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (int i = 0; i < nfds; i++) {
            int fd;

            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
            if (fd_out && *fd_out < 0) {
                *fd_out = fd;
            } else {
                close(fd);
            }
        }
    }
}

/*
 * Receive into c->frame until it holds one whole frame, or @deadline.
 * What came so far stays there for the next call: a frame is never
 * read twice nor lost.
 */
static WaitEnd recv_frame(MsBrokerClient *c, int *fd_out, gint64 deadline,
                          GError **errp)
{
    if (c->frame_taken) {
        g_byte_array_set_size(c->frame, 0);
        c->frame_want = 0;
        c->frame_taken = false;
    }
    for (;;) {
        size_t want = c->frame_want ? c->frame_want : MS_PROTO_HEADER_SIZE;
        size_t have = c->frame->len;
        union {
            char buf[CMSG_SPACE(sizeof(int) * 4)];
            struct cmsghdr align;
        } ctl;
        struct iovec iov;
        struct msghdr mh = {
            .msg_iov = &iov, .msg_iovlen = 1,
            .msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf),
        };
        ssize_t n;

        if (have == want && c->frame_want) {
            return WAIT_OK;
        }
        if (have == want) {
            g_autoptr(GError) err = NULL;
            MsProtoHeader hdr;

            if (!ms_proto_decode_header(c->frame->data, &hdr, &err)) {
                set_dead(c, errp, EPROTO, "bad reply from the broker: %s",
                         err->message);
                return WAIT_DEAD;
            }
            c->frame_want = MS_PROTO_HEADER_SIZE + hdr.length;
            continue;
        }
        g_byte_array_set_size(c->frame, want);
        iov = (struct iovec) { c->frame->data + have, want - have };
        n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        g_byte_array_set_size(c->frame, have + MAX(n, 0));
        if (n > 0) {
            take_fds(&mh, fd_out);
            continue;
        }
        if (n == 0) {
            set_dead(c, errp, EPIPE, "broker closed the connection");
            return WAIT_DEAD;
        }
        if (errno != EINTR && errno != EAGAIN) {
            set_dead(c, errp, EPIPE, "broker connection lost: %s",
                     g_strerror(errno));
            return WAIT_DEAD;
        }
        if (errno == EAGAIN) {
            WaitEnd w = wait_fd(c, POLLIN, deadline, errp);

            if (w != WAIT_OK) {
                return w;
            }
        }
    }
}

/* The frame in c->frame answers the oldest pending request: decode it */
static bool take_reply(MsBrokerClient *c, MsProtoMsg *msg, GError **errp)
{
    g_autoptr(GError) err = NULL;
    Pending p = g_array_index(c->pending, Pending, 0);

    /* @msg points into the frame: it is emptied by the next receive */
    c->frame_taken = true;
    g_array_remove_index(c->pending, 0);
    if (!ms_proto_decode(c->frame->data, c->frame->len, msg, &err)) {
        return set_dead(c, errp, EPROTO, "bad reply from the broker: %s",
                        err->message);
    }
    if (msg->type == MS_MSG_ERROR) {
        /* Each reply type follows its request's: name the request */
        return set_dead(c, errp, msg->error.code ? msg->error.code : EPROTO,
                        "broker refused %s: %s",
                        ms_proto_type_name(p.reply - 1), msg->error.message);
    }
    if (msg->type != p.reply || msg->id != p.id) {
        return set_dead(c, errp, EPROTO, "broker answered request %u with %s"
                        " %u: %s %u expected", p.id,
                        ms_proto_type_name(msg->type), msg->id,
                        ms_proto_type_name(p.reply), p.id);
    }
    return true;
}

/*
 * A reply whose caller stopped waiting: the references it hands us are
 * nobody's, give them back.  A slot outside the store is a broken
 * broker.
 */
static bool take_late_reply(MsBrokerClient *c, const MsProtoMsg *msg,
                            GError **errp)
{
    if (msg->type == MS_MSG_ANSWERED_REPLY) {
        c->answers_lost = true;
        return true;
    }
    if (msg->type != MS_MSG_LOOKUP_REPLY && msg->type != MS_MSG_UPLOAD_REPLY) {
        return true;
    }
    for (uint32_t i = 0; i < msg->results.count; i++) {
        MsProtoResult r = ms_proto_result(msg, i);

        if (r.status != MS_STATUS_OK) {
            continue;
        }
        if (r.slot >= c->params.nslots) {
            return set_dead(c, errp, EPROTO, "broker returned slot %u of a"
                            " store of %u", r.slot, c->params.nslots);
        }
        g_array_append_val(c->orphans, r.slot);
        c->late_refs++;
    }
    return true;
}

static void queue_release(MsBrokerClient *c, const uint32_t *slots,
                          const uint32_t *refs, uint32_t count);

/*
 * Read the replies of the pending requests but the last @keep ones,
 * until @deadline.  Late references are collected for release.
 */
static WaitEnd read_replies(MsBrokerClient *c, guint keep, gint64 deadline,
                            GError **errp)
{
    WaitEnd w = WAIT_OK;

    while (w == WAIT_OK && c->pending->len > keep) {
        MsProtoMsg msg;

        w = recv_frame(c, NULL, deadline, errp);
        if (w == WAIT_OK && (!take_reply(c, &msg, errp) ||
                             !take_late_reply(c, &msg, errp))) {
            w = WAIT_DEAD;
        }
    }
    return w;
}

/*
 * Get level with the broker by @deadline: every byte sent, every reply
 * read, and the references of late replies queued for release (whose
 * replies are read by a later call).
 */
static WaitEnd catch_up(MsBrokerClient *c, gint64 deadline, GError **errp)
{
    WaitEnd w = flush_unsent(c, deadline, errp);

    if (w == WAIT_OK) {
        w = read_replies(c, 0, deadline, errp);
    }
    if (w != WAIT_OK) {
        return w;
    }
    c->stalled = false;
    if (c->orphans->len) {
        g_autoptr(GArray) o = g_steal_pointer(&c->orphans);

        c->orphans = g_array_new(false, false, sizeof(uint32_t));
        queue_release(c, (uint32_t *)o->data, NULL, o->len);
        w = flush_unsent(c, deadline, errp);
    }
    return w;
}

/* Say why a call gave up waiting; the connection stays */
static bool gave_up(MsBrokerClient *c, WaitEnd w, uint32_t id, GError **errp)
{
    if (w == WAIT_DEAD) {
        return false;
    }
    if (w == WAIT_INTERRUPTED) {
        g_set_error(errp, MS_ENGINE_ERROR, EINTR, "interrupted while waiting"
                    " for the broker's answer to request %u", id);
        return false;
    }
    c->stalled = true;
    g_set_error(errp, MS_ENGINE_ERROR, ETIMEDOUT, "broker did not answer"
                " request %u within %d ms (it stays pending)", id,
                c->timeout_ms);
    return false;
}

/*
 * Put a frame on the wire: @head, then @npages pages of @ps bytes, the
 * i-th at @pages[i] (guest memory: neighbours in one iovec entry).  What
 * the socket does not take by @deadline is copied to c->unsent, and the
 * request is pending either way (its reply will come).  Returns the
 * wait's end.
 */
static WaitEnd put_frame(MsBrokerClient *c, const GByteArray *head,
                         const void *const *pages, uint32_t npages,
                         size_t ps, uint32_t id, MsProtoType reply,
                         gint64 deadline, GError **errp)
{
    g_autofree struct iovec *iov = g_new(struct iovec, npages + 1);
    Pending p = { .id = id, .reply = reply };
    size_t first = 0, cnt = 0;
    WaitEnd w = WAIT_OK;

    iov[cnt++] = (struct iovec) { head->data, head->len };
    for (uint32_t i = 0; i < npages; i++) {
        struct iovec *last = &iov[cnt - 1];

        if (cnt > 1 && (uint8_t *)last->iov_base + last->iov_len ==
                       (const uint8_t *)pages[i]) {
            last->iov_len += ps;
        } else {
            iov[cnt++] = (struct iovec) { (void *)pages[i], ps };
        }
    }
    g_array_append_val(c->pending, p);
    /* Behind other frames' bytes: after them, in order */
    if (!c->unsent->len) {
        w = send_iov(c, iov, cnt, &first, deadline, errp);
    }
    if (w == WAIT_DEAD) {
        return w;
    }
    for (; first < cnt; first++) {
        g_byte_array_append(c->unsent, iov[first].iov_base,
                            iov[first].iov_len);
    }
    return w;
}

/* A RELEASE that nobody waits for: its reply is read by a later call */
static void queue_release(MsBrokerClient *c, const uint32_t *slots,
                          const uint32_t *refs, uint32_t count)
{
    for (uint32_t done = 0; done < count; ) {
        g_autoptr(GByteArray) req = g_byte_array_new();
        uint32_t n = MIN(count - done, c->params.max_release);
        g_autofree uint32_t *ones = NULL;
        uint32_t id = c->next_id++;
        Pending p = { .id = id, .reply = MS_MSG_RELEASE_REPLY };

        if (!refs) {
            ones = g_new(uint32_t, n);
            for (uint32_t i = 0; i < n; i++) {
                ones[i] = 1;
            }
        }
        ms_proto_encode_release(req, id, slots + done,
                                refs ? refs + done : ones, n);
        g_byte_array_append(c->unsent, req->data, req->len);
        g_array_append_val(c->pending, p);
        done += n;
    }
}

/*
 * One request, one reply: send @req (and @npages pages), wait for its
 * reply into @msg.  Earlier replies are read on the way (catch_up()).
 */
static bool call_with(MsBrokerClient *c, GByteArray *req,
                      const void *const *pages, uint32_t npages,
                      uint32_t id, MsProtoType reply, MsProtoMsg *msg,
                      int *fd_out, GError **errp)
{
    gint64 deadline = g_get_monotonic_time() + c->timeout_ms * 1000LL;
    WaitEnd w;

    if (c->dead) {
        g_set_error(errp, MS_ENGINE_ERROR, EPIPE,
                    "broker connection was lost earlier: reconnect");
        return false;
    }
    /* A stalled broker gets a look, not another timeout */
    w = catch_up(c, c->stalled ? 0 : deadline, errp);
    if (w != WAIT_OK) {
        if (w == WAIT_TIMEOUT && c->stalled) {
            g_set_error(errp, MS_ENGINE_ERROR, EAGAIN, "broker has not"
                        " answered an earlier request yet");
            return false;
        }
        return gave_up(c, w, id, errp);
    }
    w = put_frame(c, req, pages, npages, c->params.page_size, id, reply,
                  deadline, errp);
    if (w == WAIT_OK) {
        w = flush_unsent(c, deadline, errp);
    }
    /* Releases that catch_up() queued are answered first */
    if (w == WAIT_OK) {
        w = read_replies(c, 1, deadline, errp);
    }
    if (w == WAIT_OK) {
        w = recv_frame(c, fd_out, deadline, errp);
    }
    if (w != WAIT_OK) {
        return gave_up(c, w, id, errp);
    }
    return take_reply(c, msg, errp);
}

static bool call(MsBrokerClient *c, GByteArray *req, uint32_t id,
                 MsProtoType reply, MsProtoMsg *msg, int *fd_out,
                 GError **errp)
{
    return call_with(c, req, NULL, 0, id, reply, msg, fd_out, errp);
}

static bool check_joined(const MsBrokerClient *c, const char *what,
                         GError **errp)
{
    if (!c->joined) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "cannot %s: this broker client joined no group", what);
        return false;
    }
    return true;
}

/* "uid N (name)", or "uid N" for a uid without a name */
static char *describe_uid(uid_t uid)
{
    long max = sysconf(_SC_GETPW_R_SIZE_MAX);
    size_t size = max > 0 ? max : 16384;
    g_autofree char *buf = g_malloc(size);
    struct passwd pw, *found = NULL;

    if (getpwuid_r(uid, &pw, buf, size, &found) == 0 && found) {
        return g_strdup_printf("uid %u (%s)", (unsigned)uid, pw.pw_name);
    }
    return g_strdup_printf("uid %u", (unsigned)uid);
}

/*
 * Is the listener at the other end of c->fd the broker?  SO_PEERCRED
 * gives the credentials of the process that called listen() on the
 * socket: the broker's own, or systemd's (root) when systemd made the
 * socket and handed it over.  Root may be the broker whatever
 * @broker_uid says: it could read this process's memory anyway.
 */
static bool check_broker(MsBrokerClient *c, const char *path,
                         uid_t broker_uid, GError **errp)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);
    g_autofree char *peer = NULL;
    g_autofree char *want = NULL;

    if (broker_uid == MS_BROKER_UID_ANY) {
        return true;
    }
    if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno, "cannot tell who listens"
                    " on the broker socket %s (SO_PEERCRED): %s", path,
                    g_strerror(errno));
        return false;
    }
    if (cred.uid == broker_uid || cred.uid == 0) {
        return true;
    }
    peer = describe_uid(cred.uid);
    want = describe_uid(broker_uid);
    g_set_error(errp, MS_ENGINE_ERROR, EPERM, "refusing the broker at %s:"
                " the process listening there (pid %d) runs as %s, but the"
                " broker must run as %s%s; nothing was sent to it", path,
                (int)cred.pid, peer, want,
                broker_uid ? " or root" : "");
    return false;
}

MsBrokerClient *ms_broker_client_open(const char *path, int timeout_ms,
                                      GError **errp)
{
    return ms_broker_client_open_as(path, MS_BROKER_UID_ANY, timeout_ms,
                                    errp);
}

MsBrokerClient *ms_broker_client_open_as(const char *path, uid_t broker_uid,
                                         int timeout_ms, GError **errp)
{
    g_autoptr(MsBrokerClient) c = g_new0(MsBrokerClient, 1);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct timeval tv;

    c->fd = c->store_fd = -1;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : DEFAULT_TIMEOUT_MS;
    c->frame = g_byte_array_new();
    c->unsent = g_byte_array_new();
    c->pending = g_array_new(false, false, sizeof(Pending));
    c->orphans = g_array_new(false, false, sizeof(uint32_t));
    c->next_id = 1;
    if (strlen(path) >= sizeof(sa.sun_path)) {
        g_set_error(errp, MS_ENGINE_ERROR, ENAMETOOLONG,
                    "broker socket path of %zu bytes: at most %zu allowed",
                    strlen(path), sizeof(sa.sun_path) - 1);
        return NULL;
    }
    strcpy(sa.sun_path, path);
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot create a socket: %s", g_strerror(errno));
        return NULL;
    }
    /*
     * A UNIX connect() waits while the broker's backlog is full, as long
     * as the send timeout allows: bound it like any other call
     */
    tv.tv_sec = c->timeout_ms / 1000;
    tv.tv_usec = (c->timeout_ms % 1000) * 1000;
    if (setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0 ||
        connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        g_set_error(errp, MS_ENGINE_ERROR, errno,
                    "cannot connect to the broker at %s: %s", path,
                    g_strerror(errno));
        return NULL;
    }
    if (!check_broker(c, path, broker_uid, errp)) {
        return NULL;
    }
    return g_steal_pointer(&c);
}

/*
 * The descriptor must be what WELCOME says: a file of nslots pages, open
 * read-only and sealed against resizing (a writable or resizable one
 * would let a member corrupt every member's pages, and means the broker
 * is not what it claims).
 */
static bool check_store_fd(MsBrokerClient *c, const MsProtoMsg *msg,
                           GError **errp)
{
    uint64_t size = (uint64_t)msg->welcome.nslots * msg->welcome.page_size;
    int flags = fcntl(c->store_fd, F_GETFL);
    struct stat st;

    if (fstat(c->store_fd, &st) < 0 || !S_ISREG(st.st_mode) ||
        (uint64_t)st.st_size != size) {
        return set_dead(c, errp, EPROTO, "broker sent a store descriptor"
                        " that is not a file of %u pages of %u bytes",
                        msg->welcome.nslots, msg->welcome.page_size);
    }
    if (flags < 0 || (flags & O_ACCMODE) != O_RDONLY) {
        return set_dead(c, errp, EPROTO, "broker sent a writable store"
                        " descriptor: only a read-only one is accepted");
    }
    if (!ms_store_fd_sealed(c->store_fd)) {
        return set_dead(c, errp, EPROTO, "broker sent a store that is not"
                        " sealed against resizing (F_SEAL_SHRINK and"
                        " F_SEAL_GROW): a resize would fault every member");
    }
    return true;
}

static bool hello(MsBrokerClient *c, const char *group, const char *name,
                  GError **errp)
{
    g_autoptr(GByteArray) req = g_byte_array_new();
    MsProtoMsg msg;
    uint32_t id = c->next_id++;
    int fd = -1;

    ms_proto_encode_hello(req, id, group, name);
    if (!call(c, req, id, MS_MSG_WELCOME, &msg, &fd, errp)) {
        if (fd >= 0) {
            close(fd);
        }
        return false;
    }
    if (fd < 0) {
        return set_dead(c, errp, EPROTO,
                        "broker sent WELCOME without the store descriptor");
    }
    c->store_fd = fd;
    if (!check_store_fd(c, &msg, errp)) {
        return false;
    }
    c->params.page_size = msg.welcome.page_size;
    c->params.nslots = msg.welcome.nslots;
    c->params.max_refs = msg.welcome.max_refs;
    c->params.max_lookup = msg.welcome.max_lookup;
    c->params.max_upload = MIN(msg.welcome.max_upload,
                               ms_proto_max_upload(msg.welcome.page_size));
    c->params.max_release = msg.welcome.max_release;
    memcpy(c->params.key.secret, msg.welcome.secret, MS_HASH_SECRET_SIZE);
    c->joined = true;
    return true;
}

MsBrokerClient *ms_broker_client_connect(const char *path, const char *group,
                                         const char *name, int timeout_ms,
                                         GError **errp)
{
    return ms_broker_client_connect_as(path, 0, group, name, timeout_ms,
                                       errp);
}

MsBrokerClient *ms_broker_client_connect_as(const char *path,
                                            uid_t broker_uid,
                                            const char *group,
                                            const char *name, int timeout_ms,
                                            GError **errp)
{
    g_autoptr(MsBrokerClient) c = NULL;
    g_autoptr(GError) err = NULL;

    if (!ms_proto_name_valid(group, &err) ||
        !ms_proto_name_valid(name, &err)) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "cannot join group '%s' as '%s': %s", group, name,
                    err->message);
        return NULL;
    }
    c = ms_broker_client_open_as(path, broker_uid, timeout_ms, errp);
    /* A HELLO that timed out holds nothing yet: the client just goes */
    if (!c || !hello(c, group, name, errp)) {
        return NULL;
    }
    return g_steal_pointer(&c);
}

void ms_broker_client_set_interrupt(MsBrokerClient *c,
                                    MsBrokerInterruptFn *fn, void *opaque)
{
    c->interrupt = fn;
    c->interrupt_opaque = opaque;
}

void ms_broker_client_free(MsBrokerClient *c)
{
    if (!c) {
        return;
    }
    if (c->fd >= 0) {
        /* Releases still queued go if the socket takes them now */
        if (!c->dead && c->unsent && c->unsent->len) {
            flush_unsent(c, 0, NULL);
        }
        close(c->fd);
    }
    if (c->store_fd >= 0) {
        close(c->store_fd);
    }
    if (c->frame) {
        g_byte_array_unref(c->frame);
    }
    if (c->unsent) {
        g_byte_array_unref(c->unsent);
    }
    if (c->pending) {
        g_array_free(c->pending, true);
    }
    if (c->orphans) {
        g_array_free(c->orphans, true);
    }
    g_free(c);
}

bool ms_broker_client_alive(const MsBrokerClient *c)
{
    return !c->dead;
}

bool ms_broker_client_stalled(const MsBrokerClient *c)
{
    return c->stalled;
}

uint64_t ms_broker_client_late_refs(const MsBrokerClient *c)
{
    return c->late_refs;
}

const MsBrokerParams *ms_broker_client_params(const MsBrokerClient *c)
{
    return c->joined ? &c->params : NULL;
}

int ms_broker_client_store_fd(const MsBrokerClient *c)
{
    return c->store_fd;
}

uint64_t ms_broker_client_hash(const MsBrokerClient *c, const void *page)
{
    g_assert(c->joined);
    return ms_hash_page(&c->params.key, page, c->params.page_size);
}

/* Copy the @count results of a reply, checking there are as many */
static bool take_results(MsBrokerClient *c, const MsProtoMsg *msg,
                         uint32_t count, MsProtoResult *results,
                         GError **errp)
{
    if (msg->results.count != count) {
        return set_dead(c, errp, EPROTO, "broker answered %u entries with"
                        " %u results", count, msg->results.count);
    }
    for (uint32_t i = 0; i < count; i++) {
        results[i] = ms_proto_result(msg, i);
        if (results[i].status == MS_STATUS_OK &&
            results[i].slot >= c->params.nslots) {
            return set_dead(c, errp, EPROTO, "broker returned slot %u of a"
                            " store of %u", results[i].slot,
                            c->params.nslots);
        }
    }
    return true;
}

/*
 * The references of the batches before a failure are the caller's
 * (@results says which): it releases them.  The entries after are
 * NOT_FOUND, so that the caller's loop over the results stays simple.
 */
static void results_not_found(MsProtoResult *results, uint32_t count)
{
    for (uint32_t i = 0; i < count; i++) {
        results[i] = (MsProtoResult) { UINT32_MAX, MS_STATUS_NOT_FOUND };
    }
}

bool ms_broker_client_lookup(MsBrokerClient *c, const uint64_t *hashes,
                             uint32_t count, MsProtoResult *results,
                             GError **errp)
{
    if (!check_joined(c, "look pages up", errp)) {
        return false;
    }
    results_not_found(results, count);
    for (uint32_t done = 0; done < count; ) {
        g_autoptr(GByteArray) req = g_byte_array_new();
        uint32_t n = MIN(count - done, c->params.max_lookup);
        uint32_t id = c->next_id++;
        MsProtoMsg msg;

        ms_proto_encode_lookup(req, id, hashes + done, n);
        if (!call(c, req, id, MS_MSG_LOOKUP_REPLY, &msg, NULL, errp) ||
            !take_results(c, &msg, n, results + done, errp)) {
            return false;
        }
        done += n;
    }
    return true;
}

bool ms_broker_client_upload_pages(MsBrokerClient *c,
                                   const void *const *pages,
                                   const uint64_t *hashes, uint32_t count,
                                   MsProtoResult *results, GError **errp)
{
    if (!check_joined(c, "upload pages", errp)) {
        return false;
    }
    results_not_found(results, count);
    for (uint32_t done = 0; done < count; ) {
        g_autoptr(GByteArray) req = g_byte_array_new();
        uint32_t n = MIN(count - done, c->params.max_upload);
        g_autofree uint64_t *h = g_new(uint64_t, n);
        uint32_t id = c->next_id++;
        MsProtoMsg msg;

        for (uint32_t i = 0; i < n; i++) {
            h[i] = hashes ? hashes[done + i]
                          : ms_broker_client_hash(c, pages[done + i]);
        }
        /* The pages go from where they are: no copy of up to 256 KiB */
        ms_proto_encode_upload_head(req, id, h, c->params.page_size, n);
        if (!call_with(c, req, pages + done, n, id, MS_MSG_UPLOAD_REPLY,
                       &msg, NULL, errp) ||
            !take_results(c, &msg, n, results + done, errp)) {
            return false;
        }
        done += n;
    }
    return true;
}

bool ms_broker_client_upload(MsBrokerClient *c, const void *pages,
                             const uint64_t *hashes, uint32_t count,
                             MsProtoResult *results, GError **errp)
{
    /* Not joined, page_size is 0: upload_pages() says so, sends nothing */
    g_autofree const void **p = g_new(const void *, count);

    for (uint32_t i = 0; i < count; i++) {
        p[i] = (const uint8_t *)pages + (size_t)i * c->params.page_size;
    }
    return ms_broker_client_upload_pages(c, p, hashes, count, results, errp);
}

bool ms_broker_client_release(MsBrokerClient *c, const uint32_t *slots,
                              const uint32_t *refs, uint32_t count,
                              uint64_t *released, GError **errp)
{
    uint64_t total = 0;

    if (!check_joined(c, "release slots", errp)) {
        return false;
    }
    for (uint32_t done = 0; done < count; ) {
        g_autoptr(GByteArray) req = g_byte_array_new();
        uint32_t n = MIN(count - done, c->params.max_release);
        g_autofree uint32_t *ones = NULL;
        uint32_t id = c->next_id++;
        MsProtoMsg msg;

        if (!refs) {
            ones = g_new(uint32_t, n);
            for (uint32_t i = 0; i < n; i++) {
                ones[i] = 1;
            }
        }
        ms_proto_encode_release(req, id, slots + done,
                                refs ? refs + done : ones, n);
        if (!call(c, req, id, MS_MSG_RELEASE_REPLY, &msg, NULL, errp)) {
            return false;
        }
        total += msg.release_reply.released;
        done += n;
    }
    if (released) {
        *released = total;
    }
    return true;
}

bool ms_broker_client_release_nowait(MsBrokerClient *c,
                                     const uint32_t *slots,
                                     const uint32_t *refs, uint32_t count,
                                     GError **errp)
{
    WaitEnd w;

    if (!check_joined(c, "release slots", errp)) {
        return false;
    }
    if (c->dead) {
        g_set_error(errp, MS_ENGINE_ERROR, EPIPE,
                    "broker connection was lost earlier: reconnect");
        return false;
    }
    queue_release(c, slots, refs, count);
    /* Send what the socket takes now, read the replies that are there */
    w = catch_up(c, 0, errp);
    return w != WAIT_DEAD;
}

bool ms_broker_client_stats(MsBrokerClient *c, GArray **groups,
                            GError **errp)
{
    return ms_broker_client_stats_full(c, groups, NULL, NULL, errp);
}

bool ms_broker_client_stats_full(MsBrokerClient *c, GArray **groups,
                                 MsProtoBrokerStats *broker, bool *has_broker,
                                 GError **errp)
{
    g_autoptr(GByteArray) req = g_byte_array_new();
    uint32_t id = c->next_id++;
    MsProtoMsg msg;
    MsProtoBrokerStats bs;
    bool has;

    ms_proto_encode_stats(req, id);
    if (!call(c, req, id, MS_MSG_STATS_REPLY, &msg, NULL, errp)) {
        return false;
    }
    has = ms_proto_broker_stats(&msg, &bs);
    if (broker) {
        *broker = bs;
    }
    if (has_broker) {
        *has_broker = has;
    }
    *groups = g_array_sized_new(FALSE, TRUE, sizeof(MsProtoGroupStats),
                                msg.stats.count);
    g_array_set_size(*groups, msg.stats.count);
    for (uint32_t i = 0; i < msg.stats.count; i++) {
        ms_proto_group_stats(&msg, i,
                             &g_array_index(*groups, MsProtoGroupStats, i));
    }
    if (c->joined && msg.stats.count == 1) {
        c->features = g_array_index(*groups, MsProtoGroupStats, 0).features;
        c->features_known = true;
    }
    return true;
}

bool ms_broker_client_features(MsBrokerClient *c, uint64_t *features,
                               GError **errp)
{
    g_autoptr(GArray) groups = NULL;

    if (!c->features_known &&
        !ms_broker_client_stats(c, &groups, errp)) {
        return false;
    }
    if (!c->features_known) {
        g_set_error(errp, MS_ENGINE_ERROR, EPROTO,
                    "the broker's STATS did not describe our group");
        return false;
    }
    *features = c->features;
    return true;
}

bool ms_broker_client_answered(MsBrokerClient *c, GArray **hashes,
                               bool *lost, uint64_t *unstable_resets,
                               GError **errp)
{
    g_autoptr(GByteArray) req = g_byte_array_new();
    uint32_t id;
    MsProtoMsg msg;

    if (!check_joined(c, "ask for answers", errp)) {
        return false;
    }
    if (!(c->features & MS_FEATURE_ANSWERED)) {
        g_set_error(errp, MS_ENGINE_ERROR, ENOTSUP,
                    "this broker does not answer ANSWERED");
        return false;
    }
    id = c->next_id++;
    ms_proto_encode_answered(req, id);
    if (!call(c, req, id, MS_MSG_ANSWERED_REPLY, &msg, NULL, errp)) {
        return false;
    }
    *hashes = g_array_sized_new(FALSE, FALSE, sizeof(uint64_t),
                                msg.answered.count);
    for (uint32_t i = 0; i < msg.answered.count; i++) {
        uint64_t h = ms_proto_answered_hash(&msg, i);

        g_array_append_val(*hashes, h);
    }
    *lost = (msg.answered.flags & MS_ANSWERED_LOST) || c->answers_lost;
    c->answers_lost = false;
    *unstable_resets = msg.answered.unstable_resets;
    return true;
}
