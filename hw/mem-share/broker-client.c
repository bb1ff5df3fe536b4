/*
 * mem-share engine: the client side of the broker protocol
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One request at a time: send a frame, wait for the frame that answers
 * it (same id, the matching reply type), decode it.  Every wait is a
 * poll() against one deadline per call, so a wedged broker costs the
 * caller at most its timeout.  The broker is trusted more than a guest,
 * but not blindly: its replies go through the same decoder as anything
 * else, a reply that does not match the request kills the connection,
 * and a descriptor arrives only with WELCOME (any other is closed).
 *
 * Any failure on the socket leaves the stream in an unknown state, so
 * the client is then dead: later calls fail at once and the caller
 * reconnects.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE     /* QEMU defines it on its command line */
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "mem-share/broker-client.h"

#define DEFAULT_TIMEOUT_MS 5000

G_STATIC_ASSERT(MS_PROTO_SECRET_SIZE == MS_HASH_SECRET_SIZE);

struct MsBrokerClient {
    int fd;
    int store_fd;
    bool dead;
    bool joined;
    int timeout_ms;
    uint32_t next_id;
    MsBrokerParams params;
    GByteArray *frame;      /* the last reply received */
};

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

/* Wait for @events until @deadline (monotonic, us) */
static bool wait_fd(MsBrokerClient *c, short events, gint64 deadline,
                    GError **errp)
{
    for (;;) {
        gint64 left = deadline - g_get_monotonic_time();
        struct pollfd pfd = { .fd = c->fd, .events = events };
        int r;

        if (left <= 0) {
            return set_dead(c, errp, ETIMEDOUT,
                            "broker did not answer within %d ms",
                            c->timeout_ms);
        }
        r = poll(&pfd, 1, (int)MIN(left / 1000 + 1, G_MAXINT));
        if (r > 0) {
            return true;
        }
        if (r < 0 && errno != EINTR) {
            return set_dead(c, errp, errno, "cannot poll the broker socket: %s",
                            g_strerror(errno));
        }
    }
}

/*
 * Send @buf, then @npages pages of @ps bytes, the i-th at @pages[i]: sent
 * from where they are (guest memory), neighbours in one iovec entry.
 */
static bool send_frame(MsBrokerClient *c, const GByteArray *buf,
                       const void *const *pages, uint32_t npages, size_t ps,
                       gint64 deadline, GError **errp)
{
    g_autofree struct iovec *iov = g_new(struct iovec, npages + 1);
    size_t first = 0, cnt = 0;

    iov[cnt++] = (struct iovec) { buf->data, buf->len };
    for (uint32_t i = 0; i < npages; i++) {
        struct iovec *last = &iov[cnt - 1];

        if (cnt > 1 && (uint8_t *)last->iov_base + last->iov_len ==
                       (const uint8_t *)pages[i]) {
            last->iov_len += ps;
        } else {
            iov[cnt++] = (struct iovec) { (void *)pages[i], ps };
        }
    }
    while (first < cnt) {
        struct msghdr mh = {
            .msg_iov = iov + first, .msg_iovlen = MIN(cnt - first, IOV_MAX),
        };
        ssize_t n;

        if (!wait_fd(c, POLLOUT, deadline, errp)) {
            return false;
        }
        n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
            continue;
        }
        if (n < 0) {
            return set_dead(c, errp, EPIPE, "broker connection lost: %s",
                            g_strerror(errno));
        }
        /* Step over what went: whole entries, then part of one */
        while (first < cnt && (size_t)n >= iov[first].iov_len) {
            n -= iov[first++].iov_len;
        }
        if (n) {
            iov[first].iov_base = (uint8_t *)iov[first].iov_base + n;
            iov[first].iov_len -= n;
        }
    }
    return true;
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

static bool recv_exact(MsBrokerClient *c, uint8_t *buf, size_t len,
                       int *fd_out, gint64 deadline, GError **errp)
{
    size_t done = 0;

    while (done < len) {
        union {
            char buf[CMSG_SPACE(sizeof(int) * 4)];
            struct cmsghdr align;
        } ctl;
        struct iovec iov = { buf + done, len - done };
        struct msghdr mh = {
            .msg_iov = &iov, .msg_iovlen = 1,
            .msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf),
        };
        ssize_t n;

        if (!wait_fd(c, POLLIN, deadline, errp)) {
            return false;
        }
        n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
            continue;
        }
        if (n < 0) {
            return set_dead(c, errp, EPIPE, "broker connection lost: %s",
                            g_strerror(errno));
        }
        if (n == 0) {
            return set_dead(c, errp, EPIPE,
                            "broker closed the connection");
        }
        take_fds(&mh, fd_out);
        done += n;
    }
    return true;
}

/*
 * Receive the reply to request @id, expected of type @type, into @msg
 * (which points into c->frame).  An ERROR from the broker becomes the
 * error; the broker hangs up after it.
 */
static bool recv_reply(MsBrokerClient *c, uint32_t id, MsProtoType type,
                       MsProtoMsg *msg, int *fd_out, gint64 deadline,
                       GError **errp)
{
    g_autoptr(GError) err = NULL;
    MsProtoHeader hdr;

    g_byte_array_set_size(c->frame, MS_PROTO_HEADER_SIZE);
    if (!recv_exact(c, c->frame->data, MS_PROTO_HEADER_SIZE, fd_out,
                    deadline, errp)) {
        return false;
    }
    if (!ms_proto_decode_header(c->frame->data, &hdr, &err)) {
        return set_dead(c, errp, EPROTO, "bad reply from the broker: %s",
                        err->message);
    }
    g_byte_array_set_size(c->frame, MS_PROTO_HEADER_SIZE + hdr.length);
    if (!recv_exact(c, c->frame->data + MS_PROTO_HEADER_SIZE, hdr.length,
                    fd_out, deadline, errp)) {
        return false;
    }
    if (!ms_proto_decode(c->frame->data, c->frame->len, msg, &err)) {
        return set_dead(c, errp, EPROTO, "bad reply from the broker: %s",
                        err->message);
    }
    if (msg->type == MS_MSG_ERROR) {
        /* Each reply type follows its request's: name the request */
        return set_dead(c, errp, msg->error.code ? msg->error.code : EPROTO,
                        "broker refused %s: %s", ms_proto_type_name(type - 1),
                        msg->error.message);
    }
    if (msg->type != type || msg->id != id) {
        return set_dead(c, errp, EPROTO, "broker answered request %u with %s"
                        " %u: %s %u expected", id,
                        ms_proto_type_name(msg->type), msg->id,
                        ms_proto_type_name(type), id);
    }
    return true;
}

/* One request, one reply: send @req (and @npages pages), wait */
static bool call_with(MsBrokerClient *c, GByteArray *req,
                      const void *const *pages, uint32_t npages,
                      uint32_t id, MsProtoType reply, MsProtoMsg *msg,
                      int *fd_out, GError **errp)
{
    gint64 deadline = g_get_monotonic_time() + c->timeout_ms * 1000LL;

    if (c->dead) {
        g_set_error(errp, MS_ENGINE_ERROR, EPIPE,
                    "broker connection was lost earlier: reconnect");
        return false;
    }
    return send_frame(c, req, pages, npages, c->params.page_size, deadline,
                      errp) &&
           recv_reply(c, id, reply, msg, fd_out, deadline, errp);
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

MsBrokerClient *ms_broker_client_open(const char *path, int timeout_ms,
                                      GError **errp)
{
    g_autoptr(MsBrokerClient) c = g_new0(MsBrokerClient, 1);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct timeval tv;

    c->fd = c->store_fd = -1;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : DEFAULT_TIMEOUT_MS;
    c->frame = g_byte_array_new();
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
    return g_steal_pointer(&c);
}

/*
 * The descriptor must be what WELCOME says: a file of nslots pages, open
 * read-only (a writable one would let this process corrupt every
 * member's pages, and means the broker is not what it claims).
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
    g_autoptr(MsBrokerClient) c = NULL;
    g_autoptr(GError) err = NULL;

    if (!ms_proto_name_valid(group, &err) ||
        !ms_proto_name_valid(name, &err)) {
        g_set_error(errp, MS_ENGINE_ERROR, EINVAL,
                    "cannot join group '%s' as '%s': %s", group, name,
                    err->message);
        return NULL;
    }
    c = ms_broker_client_open(path, timeout_ms, errp);
    if (!c || !hello(c, group, name, errp)) {
        return NULL;
    }
    return g_steal_pointer(&c);
}

void ms_broker_client_free(MsBrokerClient *c)
{
    if (!c) {
        return;
    }
    if (c->fd >= 0) {
        close(c->fd);
    }
    if (c->store_fd >= 0) {
        close(c->store_fd);
    }
    if (c->frame) {
        g_byte_array_unref(c->frame);
    }
    g_free(c);
}

bool ms_broker_client_alive(const MsBrokerClient *c)
{
    return !c->dead;
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

bool ms_broker_client_lookup(MsBrokerClient *c, const uint64_t *hashes,
                             uint32_t count, MsProtoResult *results,
                             GError **errp)
{
    if (!check_joined(c, "look pages up", errp)) {
        return false;
    }
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

bool ms_broker_client_stats(MsBrokerClient *c, GArray **groups,
                            GError **errp)
{
    g_autoptr(GByteArray) req = g_byte_array_new();
    uint32_t id = c->next_id++;
    MsProtoMsg msg;

    ms_proto_encode_stats(req, id);
    if (!call(c, req, id, MS_MSG_STATS_REPLY, &msg, NULL, errp)) {
        return false;
    }
    *groups = g_array_sized_new(FALSE, TRUE, sizeof(MsProtoGroupStats),
                                msg.stats.count);
    g_array_set_size(*groups, msg.stats.count);
    for (uint32_t i = 0; i < msg.stats.count; i++) {
        ms_proto_group_stats(&msg, i,
                             &g_array_index(*groups, MsProtoGroupStats, i));
    }
    return true;
}
