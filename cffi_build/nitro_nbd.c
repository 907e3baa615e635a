/*
 * nitro_nbd.c: virtio-blk volumes on an NBD export, through libnbd's
 * asynchronous API on the engine's workers (nitro_nbd.h says who does
 * what; docs/volumes.md the behaviour an operator sees).
 *
 * A request popped from the ring is parsed and checked like a local one
 * (nitro_blk_internal.h), then becomes one slot (struct nbd_io) that owns
 * a buffer: a read lands in it and is copied (or decrypted) into the
 * guest when the server answered, an encrypted write is encrypted into it
 * at once, DISCARD and WRITE_ZEROES keep their checked segments in it. So
 * libnbd never writes guest memory: a guest that truncates its memory
 * while libnbd's state machine reads a reply cannot fault libnbd half way
 * through it (nitro's own copy out runs under the ring's guard).
 *
 * A plain write is sent from guest memory, as qemu's NBD client sends it,
 * when its buffers are few and long (guest_runs), over a connection
 * without TLS: there the kernel reads the guest's pages (send(2)), and a
 * page the guest truncated fails the send with EFAULT instead of raising
 * SIGBUS in libnbd. nitro takes that EFAULT as the guest's memory fault
 * and breaks the ring, as its own guarded copy would. GnuTLS reads the
 * payload itself, so over TLS the write is copied into the buffer at
 * once; so it is when its buffers are scattered (one NBD command per run
 * would likely cost the server more than the copy; not measured) or split
 * sectors (guest_runs). Guest memory stays mapped while libnbd may
 * send from it: every slot completes, answered or failed by libnbd,
 * before its ring is detached (drain), and memory is unmapped only after
 * that (nitro/vhost: detach, then close); a handle given up is never
 * driven again, only closed.
 *
 * A slot is free, waiting (no connection: in the FIFO wait list), sent
 * (NBD commands outstanding: `pending`) or done (in the done list, filled
 * by libnbd's completion callbacks, which only record: guest memory is
 * touched after libnbd returned). A done slot whose commands failed while
 * the connection died waits again; one the server failed, or that waited
 * io_timeout, completes with IOERR. Every slot completes to the guest
 * exactly once (blk_finish), so inflight tracking stays exact.
 *
 * Only the acknowledgement of the server completes a write: nothing is
 * acked from nitro's side. A FLUSH is sent to the server (when it has a
 * cache: NBD_FLAG_SEND_FLUSH) and acked when it answered.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libnbd.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nitro_blk_internal.h"
#include "nitro_iov.h"
#include "nitro_nbd.h"
#include "nitro_ring.h"

#define INLINE_IOV 8
/* The largest NBD command we send (the spec's recommended ceiling for
 * servers that state none); larger requests are split. */
#define NBD_MAX_COMMAND (32u << 20)
/* A slot's buffer is kept for its next request up to this size. */
#define BUF_KEEP_BYTES (1u << 20)
/* What nbd_io_prepare returns when the request goes to the server. */
#define SEND 0xff
/* A write split into more runs of guest memory than one is sent from
 * guest memory only when its runs average at least this: each run is an
 * NBD command of its own. */
#define GUEST_RUN_MIN (32u << 10)

/* A connected handle and the worker's own duplicate of its socket: the
 * epoll set holds the duplicate, which stays open until the control plane
 * closes the link, so libnbd closing its socket when the connection dies
 * can never leave the set watching a number the process reuses. */
struct nbd_link {
    struct nbd_handle *h;
    int fd;
};

struct nitro_nbd {
    _Atomic(struct nbd_link *) offered;   /* control plane -> worker */
    _Atomic(struct nbd_link *) retired;   /* worker -> control plane */
    atomic_bool wanting;
    int offer_fd;      /* eventfd: a handle was offered (wakes the worker) */
    int want_fd;       /* the caller's eventfd: need a handle / one to close */
    uint64_t io_timeout_ns;
    /* The ring's worker's (the caller's while detached). */
    struct nbd_handle *h;       /* link->h, or NULL */
    struct nbd_link *link;
    struct nbd_link *dying;     /* dead; handed back at the next poll */
    bool can_flush, can_trim, can_zero;
    bool tls;                   /* the live handle negotiated TLS */
    uint64_t min_block;         /* what a command's offset and length align to */
    uint64_t max_command;
    struct nitro_nbd_stats stats;
};

enum nbd_io_state { NIO_FREE, NIO_WAITING, NIO_SENT, NIO_DONE };

struct nbd_ring;

struct nbd_io {
    struct nbd_ring *ring;
    struct nbd_io *next;         /* free, wait or done list */
    enum nbd_io_state state;
    uint32_t type;               /* VIRTIO_BLK_T_* */
    uint16_t head;
    bool resubmitted;            /* by inflight tracking (stats) */
    bool from_guest;             /* a write sent from giov, not buf */
    uint64_t start, deadline;
    uint8_t *status;
    struct blk_done d;
    struct iovec inline_iov[INLINE_IOV];
    struct iovec *giov;          /* a read's guest buffers; a write's runs */
    int gcnt;
    uint8_t *buf;                /* payload (ciphertext when encrypted) or segments */
    size_t cap;
    uint64_t off;                /* byte offset in the data segment (IVs) */
    uint64_t len;                /* payload bytes */
    int nseg;
    uint32_t pending;            /* NBD commands not answered yet */
    uint64_t got;                /* a read's bytes the server's chunks covered */
    int err;                     /* the first error a command reported */
};

struct nbd_ring {
    struct nitro_ring r;
    const struct nitro_blk_params *p;
    struct nitro_blk_stats *s;
    struct nitro_nbd *c;
    struct blk_queue q;          /* the next request, through the volume's QoS */
    struct nitro_xts_lane *lane;
    struct nbd_io *ios;
    uint32_t nios;
    struct nbd_io *free;
    struct nbd_io *wait_head, **wait_tail;
    struct nbd_io *done;
    uint32_t outstanding;        /* popped and not completed */
    /* The slot whose guest memory is being read or written (a write's
     * data copied in, an answer copied out): a fault there leaves it in no
     * list, so abandon() frees it, or a drain would wait for it forever. */
    struct nbd_io *touching;
    /* libnbd's send of a write from guest memory failed with EFAULT: the
     * guest truncated that memory. The ring breaks at the end of the call. */
    bool guest_fault;
    /* The link's fd while a batch is issued corked (ring_cork), else -1:
     * a guest fault jumping out of the poll leaves it for abandon(). */
    int corked;
    uint64_t next_deadline;      /* earliest deadline of a waiting/sent slot, 0 */
    struct blk_calls calls;      /* answer moderation (nitro_blk_internal.h) */
};

/* ---- connections (control plane threads) ---------------------------------- */

static void set_err(char *err, size_t errlen, const char *what)
{
    const char *msg = nbd_get_error();
    if (err != NULL && errlen > 0)
        snprintf(err, errlen, "%s", msg != NULL ? msg : what);
}

/* A server that hangs without closing the socket (stopped, or a host gone
 * without a reset) never answers, and libnbd's blocking calls would wait
 * for it for ever: on a start-up, a stop, a reconnect. So the control
 * plane runs libnbd's state machine itself, up to a deadline, then hangs
 * the connection up (as a ring does with a request past its io_timeout).
 * `done` says whether what it waits for happened; 0 when it did, -1 when
 * libnbd failed (its error is the thread's), -2 at the deadline. */
static int run_until(struct nbd_handle *h, int (*done)(struct nbd_handle *, int64_t),
                     int64_t cookie, uint64_t deadline)
{
    for (;;) {
        int rc = done(h, cookie);
        if (rc != 0)
            return rc > 0 ? 0 : -1;
        uint64_t now = nitro_now_ns();
        if (now >= deadline)
            break;
        uint64_t ms = (deadline - now + 999999) / 1000000;
        if (nbd_poll(h, ms > INT_MAX ? INT_MAX : (int)ms) < 0)
            return -1;
    }
    int64_t fd = nbd_aio_get_fd(h);
    if (fd >= 0)
        shutdown((int)fd, SHUT_RDWR);
    return -2;
}

/* 1 once connected, 0 while connecting, -1 when it failed. */
static int connected(struct nbd_handle *h, int64_t unused)
{
    (void)unused;
    if (nbd_aio_is_connecting(h))
        return 0;
    return nbd_aio_is_ready(h) ? 1 : -1;
}

/* 1 once the command completed, 0 while in flight, -1 when it failed. */
static int completed(struct nbd_handle *h, int64_t cookie)
{
    return nbd_aio_command_completed(h, cookie);
}

static void set_timeout_err(char *err, size_t errlen, const char *what, uint64_t timeout_ns)
{
    if (err != NULL && errlen > 0)
        snprintf(err, errlen, "%s: no answer within %.3g s; hung up", what,
                 (double)timeout_ns / 1e9);
}

/* Why a connect failed. libnbd gives no errno when a plaintext server
 * hung up mid-handshake (a proxy in front of a server that is down, a
 * server shutting down): that passes, like a refused connection. Over TLS
 * a wrong PSK looks the same (the server ends the TLS handshake), and that
 * will not pass: left a configuration error. The hang-up may come while
 * nbd_aio_connect_uri still runs the state machine or after it returned:
 * both are the same failure. */
static int connect_errno(const char *uri)
{
    int e = nbd_get_errno();
    if (e == 0 && strncmp(uri, "nbds", 4) != 0)
        e = ECONNRESET;
    return e;
}

struct nbd_handle *nitro_nbd_connect(const char *uri, const char *tls_psk_file,
                                     const char *tls_username,
                                     const char *tls_certificates, uint64_t timeout_ns,
                                     char *err, size_t errlen, int *errnum)
{
    /* The errno tells the caller whether the server was unreachable
     * (worth retrying) or refused us (a configuration to fix). */
    *errnum = 0;
    struct nbd_handle *h = nbd_create();
    if (h == NULL) {
        set_err(err, errlen, "nbd_create failed");
        *errnum = nbd_get_errno();
        return NULL;
    }
    /* TCP only, and no URI query may name a local file to read. Reads
     * land in slot buffers zeroed when allocated (io_buf): libnbd need
     * not zero each one again before its read (128 KiB of memset per
     * 128 KiB read). */
    if (nbd_set_uri_allow_transports(h, LIBNBD_ALLOW_TRANSPORT_TCP) < 0 ||
        nbd_set_uri_allow_local_file(h, false) < 0 ||
        nbd_set_pread_initialize(h, false) < 0 ||
        (tls_psk_file && nbd_set_tls_psk_file(h, tls_psk_file) < 0) ||
        (tls_username && nbd_set_tls_username(h, tls_username) < 0) ||
        (tls_certificates && nbd_set_tls_certificates(h, tls_certificates) < 0) ||
        nbd_aio_connect_uri(h, uri) < 0) {
        set_err(err, errlen, "connect failed");
        *errnum = connect_errno(uri);
        nbd_close(h);
        return NULL;
    }
    /* The handshake (and TLS), as nbd_connect_uri would wait for it. */
    int rc = run_until(h, connected, 0, nitro_now_ns() + timeout_ns);
    if (rc < 0) {
        if (rc == -2) {
            set_timeout_err(err, errlen, "connect", timeout_ns);
            *errnum = ETIMEDOUT;
        } else {
            set_err(err, errlen, "connect failed");
            *errnum = connect_errno(uri);
        }
        nbd_close(h);
        return NULL;
    }
    return h;
}

int nitro_nbd_info(struct nbd_handle *h, struct nitro_nbd_info *out)
{
    int64_t size = nbd_get_size(h);
    if (size < 0)
        return NITRO_ERR_ARG;
    int64_t min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    int64_t max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    *out = (struct nitro_nbd_info){
        .size = (uint64_t)size,
        .readonly = nbd_is_read_only(h) == 1,
        .can_flush = nbd_can_flush(h) == 1,
        .can_trim = nbd_can_trim(h) == 1,
        .can_zero = nbd_can_zero(h) == 1,
        .can_multi_conn = nbd_can_multi_conn(h) == 1,
        .can_fua = nbd_can_fua(h) == 1,
        .min_block = min > 0 ? (uint32_t)min : 0,
        .max_block = max > 0 && max <= UINT32_MAX ? (uint32_t)max : 0,
    };
    return NITRO_OK;
}

/* One command (its cookie, or < 0: it was not sent), waited for. */
static int await_command(struct nbd_handle *h, int64_t cookie, uint64_t timeout_ns,
                         const char *what, char *err, size_t errlen)
{
    int rc = cookie < 0 ? -1 : run_until(h, completed, cookie, nitro_now_ns() + timeout_ns);
    if (rc == -2)
        set_timeout_err(err, errlen, what, timeout_ns);
    else if (rc < 0)
        set_err(err, errlen, what);
    return rc;
}

int nitro_nbd_pread(struct nbd_handle *h, void *buf, size_t count, uint64_t offset,
                    uint64_t timeout_ns, char *err, size_t errlen)
{
    for (size_t done = 0; done < count;) {
        size_t n = count - done < NBD_MAX_COMMAND ? count - done : NBD_MAX_COMMAND;
        int64_t cookie = nbd_aio_pread(h, (uint8_t *)buf + done, n, offset + done,
                                       NBD_NULL_COMPLETION, 0);
        int rc = await_command(h, cookie, timeout_ns, "read failed", err, errlen);
        if (rc < 0)
            return rc;
        done += n;
    }
    return 0;
}

int nitro_nbd_pwrite(struct nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                     uint64_t timeout_ns, char *err, size_t errlen)
{
    for (size_t done = 0; done < count;) {
        size_t n = count - done < NBD_MAX_COMMAND ? count - done : NBD_MAX_COMMAND;
        int64_t cookie = nbd_aio_pwrite(h, (const uint8_t *)buf + done, n, offset + done,
                                        NBD_NULL_COMPLETION, 0);
        int rc = await_command(h, cookie, timeout_ns, "write failed", err, errlen);
        if (rc < 0)
            return rc;
        done += n;
    }
    if (nbd_can_flush(h) != 1)
        return 0;
    return await_command(h, nbd_aio_flush(h, NBD_NULL_COMPLETION, 0), timeout_ns,
                         "flush failed", err, errlen);
}

void nitro_nbd_close(struct nbd_handle *h)
{
    if (h != NULL)
        nbd_close(h);
}

struct nitro_nbd *nitro_nbd_new(int want_fd, uint64_t io_timeout_ns)
{
    if (want_fd < 0 || io_timeout_ns == 0)
        return NULL;
    struct nitro_nbd *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->offer_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->offer_fd < 0) {
        free(c);
        return NULL;
    }
    c->want_fd = want_fd;
    c->io_timeout_ns = io_timeout_ns;
    atomic_init(&c->offered, NULL);
    atomic_init(&c->retired, NULL);
    atomic_init(&c->wanting, true);
    return c;
}

static void link_close(struct nbd_link *l)
{
    if (l == NULL)
        return;
    close(l->fd);
    nbd_close(l->h);
    free(l);
}

void nitro_nbd_free(struct nitro_nbd *c)
{
    if (c == NULL)
        return;
    link_close(c->link);
    link_close(c->dying);
    link_close(atomic_exchange(&c->offered, NULL));
    link_close(atomic_exchange(&c->retired, NULL));
    close(c->offer_fd);
    free(c);
}

int nitro_nbd_offer(struct nitro_nbd *c, struct nbd_handle *h)
{
    if (h == NULL || atomic_load(&c->offered) != NULL)
        return NITRO_ERR_ARG;
    int64_t fd = nbd_aio_get_fd(h);
    struct nbd_link *l = malloc(sizeof(*l));
    if (l == NULL)
        return NITRO_ERR_NOMEM;
    l->h = h;
    l->fd = fd >= 0 ? fcntl((int)fd, F_DUPFD_CLOEXEC, 0) : -1;
    if (l->fd < 0) {
        free(l);
        return NITRO_ERR_SYS;
    }
    struct nbd_link *none = NULL;
    if (!atomic_compare_exchange_strong(&c->offered, &none, l)) {
        close(l->fd);
        free(l);
        return NITRO_ERR_ARG;
    }
    nitro_eventfd_signal(c->offer_fd);
    return NITRO_OK;
}

int nitro_nbd_wants(const struct nitro_nbd *c)
{
    return atomic_load(&c->wanting) && atomic_load(&c->offered) == NULL;
}

void nitro_nbd_reap(struct nitro_nbd *c)
{
    link_close(atomic_exchange(&c->retired, NULL));
}

static bool handle_alive(struct nbd_handle *h)
{
    return h != NULL && !nbd_aio_is_dead(h) && !nbd_aio_is_closed(h);
}

/* nbd_flush would wait for a server that hangs without closing the
 * socket for ever, and hold a daemon's stop with it: run_until. */
int nitro_nbd_flush(struct nitro_nbd *c, uint64_t timeout_ns, char *err, size_t errlen)
{
    if (!handle_alive(c->h))
        return 1;
    if (!c->can_flush)
        return 0;
    return await_command(c->h, nbd_aio_flush(c->h, NBD_NULL_COMPLETION, 0), timeout_ns,
                         "flush failed", err, errlen);
}

void nitro_nbd_stats(const struct nitro_nbd *c, struct nitro_nbd_stats *out)
{
    nitro_stats_copy(out, &c->stats, sizeof(*out));
}

/* ---- the connection as the worker sees it --------------------------------- */

static void nbd_ask(struct nitro_nbd *c)
{
    if (!atomic_exchange(&c->wanting, true))
        nitro_eventfd_signal(c->want_fd);
}

static bool nbd_take(struct nitro_nbd *c)
{
    struct nbd_link *l = atomic_exchange(&c->offered, NULL);
    if (l == NULL)
        return false;
    struct nbd_handle *h = l->h;
    c->link = l;
    c->h = h;
    c->can_flush = nbd_can_flush(h) == 1;
    c->can_trim = nbd_can_trim(h) == 1;
    c->can_zero = nbd_can_zero(h) == 1;
    c->tls = nbd_get_tls_negotiated(h) == 1;
    /* A server that states no minimum is to be sent whole sectors (the
     * NBD spec's default of 512, which libnbd also assumes). */
    int64_t min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    c->min_block = min > SECTOR_SIZE ? (uint64_t)min : SECTOR_SIZE;
    int64_t max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    c->max_command = max > 0 && max < NBD_MAX_COMMAND ? (uint64_t)max : NBD_MAX_COMMAND;
    atomic_store(&c->wanting, false);
    nitro_stat_add(&c->stats.connects, 1);
    __atomic_store_n(&c->stats.connected, 1, __ATOMIC_RELAXED);
    return true;
}

/* The handle died: keep it until the worker's epoll set forgot its fd
 * (the engine syncs after this poll), then hand it back (nbd_publish);
 * ask for a new one unless the ring is broken (its next attach asks). */
static void nbd_lose(struct nitro_nbd *c, bool ask)
{
    if (c->dying != NULL) {
        /* Two deaths between two polls cannot happen (a handle is taken
         * only in a poll that publishes first); never leak one anyway. */
        link_close(c->dying);
    }
    c->dying = c->link;
    c->link = NULL;
    c->h = NULL;
    nitro_stat_add(&c->stats.disconnects, 1);
    __atomic_store_n(&c->stats.connected, 0, __ATOMIC_RELAXED);
    if (ask)
        nbd_ask(c);
}

static void nbd_publish(struct nitro_nbd *c)
{
    struct nbd_link *none = NULL;
    if (c->dying != NULL &&
        atomic_compare_exchange_strong(&c->retired, &none, c->dying)) {
        c->dying = NULL;
        nitro_eventfd_signal(c->want_fd);
    }
}

/* ---- slots ----------------------------------------------------------------- */

static bool io_buf(struct nbd_io *io, size_t len)
{
    if (io->cap >= len)
        return true;
    free(io->buf);
    /* Zeroed: libnbd does not zero a read's buffer (nitro_nbd_connect),
     * and a server's reply that covers part of it twice and part not at
     * all passes io_answered's count: what it leaves is then this
     * device's own earlier data, never the heap's. */
    io->buf = calloc(1, len);
    io->cap = io->buf != NULL ? len : 0;
    return io->buf != NULL;
}

static void io_release(struct nbd_ring *b, struct nbd_io *io)
{
    if (io->giov != io->inline_iov)
        free(io->giov);
    io->giov = NULL;
    if (io->cap > BUF_KEEP_BYTES) {
        free(io->buf);
        io->buf = NULL;
        io->cap = 0;
    }
    io->state = NIO_FREE;
    io->next = b->free;
    b->free = io;
    b->outstanding--;
}

/* A read's data from the buffer into the guest (decrypted out of place). */
static uint8_t io_copy_out(struct nbd_ring *b, struct nbd_io *io)
{
    struct iovec *g = io->giov;
    int gc = io->gcnt;
    if (b->p->xts == NULL) {
        nitro_buf_to_iov(g, gc, io->buf, io->len);
        return VIRTIO_BLK_S_OK;
    }
    int rc = nitro_xts_iov_buf(b->p->xts, b->lane, io->buf, &g, &gc, io->len,
                               io->off, false);
    return rc == NITRO_OK ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
}

/* A broken ring answers nothing and sends nothing more. */
static bool ring_broken(const struct nbd_ring *b)
{
    return b->r.status != NITRO_OK || b->guest_fault;
}

/* Answer the guest, or, on a broken ring (draining: its memory may be
 * gone), only let the slot go. */
static void io_complete(struct nbd_ring *b, struct nbd_io *io, uint8_t status)
{
    if (ring_broken(b)) {
        blk_queue_uncount(&b->q);
        io_release(b, io);
        return;
    }
    b->touching = io;
    if (status == VIRTIO_BLK_S_OK && io->type == VIRTIO_BLK_T_IN)
        status = io_copy_out(b, io);
    io->d.status = status;
    blk_finish(&b->q, io->head, io->resubmitted, io->status, &io->d, io->start);
    b->touching = NULL;
    blk_calls_answer(&b->calls, io->d.bytes);
    io_release(b, io);
}

static void io_wait(struct nbd_ring *b, struct nbd_io *io)
{
    io->state = NIO_WAITING;
    io->next = NULL;
    *b->wait_tail = io;
    b->wait_tail = &io->next;
}

/* libnbd's chunk callback of a read: count what the reply covered. */
static int io_chunk(void *user_data, const void *subbuf, size_t count,
                    uint64_t offset, unsigned status, int *error)
{
    (void)subbuf, (void)offset, (void)error;
    struct nbd_io *io = user_data;
    if (status == LIBNBD_READ_DATA || status == LIBNBD_READ_HOLE)
        io->got += count;
    return 0;
}

/* libnbd's completion callback: record only (see the top of the file).
 * A read whose replies did not cover it (a server breaking the protocol)
 * failed: libnbd checks that only for commands retired without a
 * callback, and the uncovered part holds whatever the buffer held. */
static int io_answered(void *user_data, int *error)
{
    struct nbd_io *io = user_data;
    if (*error != 0 && io->err == 0)
        io->err = *error;
    if (--io->pending == 0) {
        if (io->type == VIRTIO_BLK_T_IN && io->err == 0 && io->got != io->len)
            io->err = EIO;
        io->state = NIO_DONE;
        io->next = io->ring->done;
        io->ring->done = io;
    }
    return 1;  /* retire the command */
}

/* Whether the ring's writes may go from guest memory (the top of the
 * file): plain text on the wire and in the image. */
static bool ring_sends_from_guest(const struct nbd_ring *b)
{
    return b->p->xts == NULL && !b->c->tls;
}

/* After a libnbd call that may have sent on a handle alive before it:
 * did a send fail with EFAULT and kill the connection? That is a send
 * from guest memory the guest truncated (the top of the file). libnbd
 * does not fail the call for it (a command is queued all the same, and
 * its callback gets ENOTCONN): the handle's death and the thread's last
 * libnbd error, which every move to DEAD sets, tell. The thread-local
 * error first: the handle's state takes its lock. */
static void sent_check(struct nbd_ring *b, struct nbd_handle *h)
{
    if (ring_sends_from_guest(b) && nbd_get_errno() == EFAULT && !handle_alive(h))
        b->guest_fault = true;
}

/* One command was (rc >= 0) or was not issued. */
static void io_issued(struct nbd_io *io, int64_t rc)
{
    if (rc >= 0)
        return;
    io->pending--;  /* libnbd calls no callback for a command it refused */
    if (io->err == 0)
        io->err = nbd_get_errno() ? nbd_get_errno() : EIO;
}

#define CB(io) ((nbd_completion_callback){.callback = io_answered, .user_data = (io)})
#define CHUNK(io) ((nbd_chunk_callback){.callback = io_chunk, .user_data = (io)})

/* A read or write: one command per max_command bytes of each run (the
 * slot's buffer, or a write's runs of guest memory). */
static void io_send_data(struct nbd_io *io, struct nbd_handle *h, uint64_t max)
{
    struct iovec whole = {.iov_base = io->buf, .iov_len = io->len};
    const struct iovec *run = io->from_guest ? io->giov : &whole;
    int runs = io->from_guest ? io->gcnt : 1;
    uint64_t at = io->ring->p->data_offset + io->off;
    for (int i = 0; i < runs && io->err == 0; i++) {
        uint8_t *p = run[i].iov_base;
        for (uint64_t o = 0; o < run[i].iov_len && io->err == 0;) {
            uint64_t n = run[i].iov_len - o < max ? run[i].iov_len - o : max;
            io->pending++;
            io_issued(io, io->type == VIRTIO_BLK_T_IN
                ? nbd_aio_pread_structured(h, p + o, n, at, CHUNK(io), CB(io), 0)
                : nbd_aio_pwrite(h, p + o, n, at, CB(io), 0));
            if (io->from_guest)
                sent_check(io->ring, h);
            o += n;
            at += n;
        }
    }
}

/* Send a slot's commands on the live handle. `pending` holds one extra
 * count while issuing, so no callback can finish the slot half sent. */
static void io_send(struct nbd_ring *b, struct nbd_io *io)
{
    struct nitro_nbd *c = b->c;
    struct nbd_handle *h = c->h;
    io->state = NIO_SENT;
    io->err = 0;
    io->got = 0;
    io->pending = 1;
    uint64_t base = b->p->data_offset;
    switch (io->type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT:
        /* A URI's scheme fixes TLS for every connection of a volume, so a
         * write taken as plain text never meets a TLS one; should it, it
         * fails rather than let GnuTLS read guest memory. */
        if (io->from_guest && c->tls)
            io->err = EPROTO;
        else
            io_send_data(io, h, c->max_command);
        break;
    case VIRTIO_BLK_T_FLUSH:
        /* A server without NBD_FLAG_SEND_FLUSH has no cache to flush: its
         * acks mean durable, and the slot completes OK with no command. */
        if (c->can_flush) {
            io->pending++;
            io_issued(io, nbd_aio_flush(h, CB(io), 0));
        }
        break;
    default: {  /* DISCARD, WRITE_ZEROES: the segments are in buf */
        bool zeroes = io->type == VIRTIO_BLK_T_WRITE_ZEROES;
        const struct segment *seg = (const struct segment *)io->buf;
        for (int i = 0; i < io->nseg && io->err == 0; i++) {
            uint64_t off = base + (seg[i].sector << SECTOR_SHIFT);
            uint64_t len = (uint64_t)seg[i].num_sectors << SECTOR_SHIFT;
            if (len == 0)
                continue;
            if (!zeroes && !c->can_trim)
                continue;  /* discard is advisory */
            io->pending++;
            /* 5.2.6.2: without UNMAP the range must stay allocated. */
            uint32_t fl = seg[i].flags & VIRTIO_BLK_WZ_FLAG_UNMAP
                              ? 0 : LIBNBD_CMD_FLAG_NO_HOLE;
            io_issued(io, zeroes ? nbd_aio_zero(h, len, off, CB(io), fl)
                                 : nbd_aio_trim(h, len, off, CB(io), 0));
        }
        break;
    }
    }
    io_answered(io, &(int){0});  /* drop the hold */
}

/* ---- preparing a request ------------------------------------------------- */

static uint8_t prep_read(struct nbd_ring *b, struct nbd_io *io,
                         const struct blk_req *rq)
{
    if (rq->oversize || rq->wr_len >= UINT32_MAX ||
        !blk_range_ok(b->p, rq->sector, rq->wr_len))
        return VIRTIO_BLK_S_IOERR;
    io->d.op = NITRO_BLK_OP_IN;
    io->d.bytes = rq->wr_len;
    io->d.used_len = (uint32_t)rq->wr_len + 1;
    io->len = rq->wr_len;
    if (io->len == 0)
        return VIRTIO_BLK_S_OK;
    io->giov = io->inline_iov;
    if (rq->n_wr > INLINE_IOV &&
        (io->giov = malloc((size_t)rq->n_wr * sizeof(struct iovec))) == NULL)
        return VIRTIO_BLK_S_IOERR;
    memcpy(io->giov, rq->wr, (size_t)rq->n_wr * sizeof(struct iovec));
    io->gcnt = rq->n_wr;
    return io_buf(io, io->len) ? SEND : VIRTIO_BLK_S_IOERR;
}

/* A write's guest buffers as runs of adjacent memory, in io->inline_iov:
 * true (giov set) when they can be sent from there, one NBD command per
 * run: one run, or a few long ones; each a whole number of the server's
 * blocks (a descriptor may end mid-sector, and a sector split over two
 * commands is neither aligned nor written as one). */
static bool guest_runs(struct nbd_io *io, const struct blk_req *rq, uint64_t block)
{
    struct iovec *run = io->inline_iov;
    int n = 0;
    for (int i = 0; i < rq->n_rd; i++) {
        const struct iovec *v = &rq->rd[i];
        if (v->iov_len == 0)
            continue;
        if (n > 0 && (uint8_t *)run[n - 1].iov_base + run[n - 1].iov_len ==
                         (uint8_t *)v->iov_base) {
            run[n - 1].iov_len += v->iov_len;
            continue;
        }
        if (n == INLINE_IOV)
            return false;
        run[n++] = *v;
    }
    if (n > 1 && io->len / (uint64_t)n < GUEST_RUN_MIN)
        return false;
    for (int i = 0; i < n; i++)
        if (run[i].iov_len % block != 0)
            return false;
    io->giov = run;
    io->gcnt = n;
    return true;
}

static uint8_t prep_write(struct nbd_ring *b, struct nbd_io *io,
                          const struct blk_req *rq)
{
    if (rq->oversize || b->p->readonly ||
        !blk_range_ok(b->p, rq->sector, rq->rd_len))
        return VIRTIO_BLK_S_IOERR;
    io->d.op = NITRO_BLK_OP_OUT;
    io->d.bytes = rq->rd_len;
    io->len = rq->rd_len;
    if (io->len == 0)
        return VIRTIO_BLK_S_OK;
    /* Sent from the guest's memory (the top of the file): what goes on
     * the wire, again after a reconnect, is what the guest has there
     * then, as with any device that reads a write's data when it does
     * the I/O. Before the first connection TLS is not known yet: copied. */
    if (b->c->h != NULL && ring_sends_from_guest(b) &&
        (io->from_guest = guest_runs(io, rq, b->c->min_block))) {
        nitro_stat_add(&b->c->stats.guest_writes, 1);
        return SEND;
    }
    if (!io_buf(io, io->len))
        return VIRTIO_BLK_S_IOERR;
    /* Copied (or encrypted) once, now: what goes on the wire, again after
     * a reconnect, is what was there when the request was taken. */
    if (b->p->xts == NULL) {
        nitro_iov_to_buf(rq->rd, rq->n_rd, io->buf, io->len);
        return SEND;
    }
    struct iovec *g = rq->rd;
    int gc = rq->n_rd;
    return nitro_xts_iov_buf(b->p->xts, b->lane, io->buf, &g, &gc, io->len,
                             io->off, true) == NITRO_OK ? SEND : VIRTIO_BLK_S_IOERR;
}

static uint8_t prep_segments(struct nbd_ring *b, struct nbd_io *io,
                             const struct blk_req *rq)
{
    bool zeroes = rq->type == VIRTIO_BLK_T_WRITE_ZEROES;
    io->d.op = zeroes ? NITRO_BLK_OP_WRITE_ZEROES : NITRO_BLK_OP_DISCARD;
    if ((zeroes ? b->p->max_write_zeroes_sectors : b->p->max_discard_sectors) == 0)
        return VIRTIO_BLK_S_UNSUPP;
    if (b->p->readonly)
        return VIRTIO_BLK_S_IOERR;
    struct segment seg[BLK_SEGMENTS_CAP];
    int count = 0;
    uint8_t st = blk_segments(b->p, rq, zeroes, seg, &count);
    if (st != VIRTIO_BLK_S_OK)
        return st;
    if (!io_buf(io, (size_t)count * sizeof(seg[0])))
        return VIRTIO_BLK_S_IOERR;
    memcpy(io->buf, seg, (size_t)count * sizeof(seg[0]));
    io->nseg = count;
    for (int i = 0; i < count; i++)
        io->d.bytes += (uint64_t)seg[i].num_sectors << SECTOR_SHIFT;
    return SEND;
}

/* Fill a slot for a parsed request: SEND, or the status to complete it
 * with right away. */
static uint8_t io_prepare(struct nbd_ring *b, struct nbd_io *io,
                          const struct blk_req *rq)
{
    io->type = rq->type;
    io->off = rq->sector << SECTOR_SHIFT;
    io->d.used_len = 1;
    switch (rq->type) {
    case VIRTIO_BLK_T_IN:
        return prep_read(b, io, rq);
    case VIRTIO_BLK_T_OUT:
        return prep_write(b, io, rq);
    case VIRTIO_BLK_T_FLUSH:
        io->d.op = NITRO_BLK_OP_FLUSH;
        return SEND;
    default:
        return prep_segments(b, io, rq);
    }
}

/* ---- the ring -------------------------------------------------------------- */

static void ring_deadline(struct nbd_ring *b, uint64_t deadline)
{
    if (b->next_deadline == 0 || deadline < b->next_deadline) {
        b->next_deadline = deadline;
        b->r.timer_ns = deadline;
    }
}

static void ring_start(struct nbd_ring *b, struct nitro_chain *c,
                       struct blk_req *rq, uint64_t start)
{
    if (rq->type == VIRTIO_BLK_T_GET_ID ||
        (rq->type != VIRTIO_BLK_T_IN && rq->type != VIRTIO_BLK_T_OUT &&
         rq->type != VIRTIO_BLK_T_FLUSH && rq->type != VIRTIO_BLK_T_DISCARD &&
         rq->type != VIRTIO_BLK_T_WRITE_ZEROES)) {
        blk_handle_sync(&b->q, c, b->lane, rq, start);  /* no I/O */
        b->calls.due = true;
        return;
    }
    struct nbd_io *io = b->free;
    b->free = io->next;
    b->outstanding++;
    /* io_timeout runs from now: time QoS held the request is not the server's. */
    *io = (struct nbd_io){.ring = b, .head = c->head,
                          .resubmitted = c->resubmitted, .start = start,
                          .deadline = nitro_now_ns() + b->c->io_timeout_ns,
                          .status = rq->status, .buf = io->buf, .cap = io->cap};
    b->touching = io;
    uint8_t st = io_prepare(b, io, rq);
    b->touching = NULL;
    if (st != SEND) {
        io_complete(b, io, st);
        return;
    }
    ring_deadline(b, io->deadline);
    if (b->c->h != NULL)
        io_send(b, io);
    else
        io_wait(b, io);
}

/* Hand the done slots back: complete them, or, when the connection died
 * under them, let them wait for the next one. */
static void ring_reap(struct nbd_ring *b)
{
    struct nitro_nbd *c = b->c;
    bool dead = c->h != NULL && !handle_alive(c->h);
    struct nbd_io *io;
    /* NBD_ESHUTDOWN: the server is going away and fails what it has; as
     * with a lost connection, those requests go again on the next one. */
    for (io = b->done; io != NULL && c->h != NULL; io = io->next)
        if (io->err == ESHUTDOWN)
            dead = true;
    while ((io = b->done) != NULL) {
        b->done = io->next;
        if (io->err != 0 && (dead || c->h == NULL) && !ring_broken(b)) {
            io_wait(b, io);
            nitro_stat_add(&c->stats.resent, 1);
        } else {
            io_complete(b, io, io->err ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK);
        }
    }
    if (dead) {
        nbd_lose(c, !ring_broken(b));
        /* Commands libnbd still had (a server that failed some with
         * ESHUTDOWN before closing): no callback comes for them once the
         * handle is given up, so they wait for the next connection now. */
        for (uint32_t i = 0; i < b->nios; i++)
            if (b->ios[i].state == NIO_SENT) {
                b->ios[i].pending = 0;
                if (ring_broken(b)) {
                    io_complete(b, &b->ios[i], VIRTIO_BLK_S_IOERR);
                    continue;
                }
                io_wait(b, &b->ios[i]);
                nitro_stat_add(&c->stats.resent, 1);
            }
    }
}

/* Let libnbd read and write what the socket allows. */
static void ring_step(struct nbd_ring *b, uint32_t revents)
{
    struct nbd_handle *h = b->c->h;
    /* Dead already (a send before, or the control plane's flush): the
     * thread's last libnbd error is not this step's. Asked only where
     * the answer is used (the state takes the handle's lock). */
    bool alive = ring_sends_from_guest(b) && handle_alive(h);
    unsigned dir = nbd_aio_get_direction(h);
    if (dir & LIBNBD_AIO_DIRECTION_WRITE)
        nbd_aio_notify_write(h);
    /* Reading a reply can send too: the state machine issues what is
     * queued once it is back to ready. */
    if ((dir & LIBNBD_AIO_DIRECTION_READ) && (revents || nbd_aio_in_flight(h) > 0))
        nbd_aio_notify_read(h);
    if (alive)
        sent_check(b, h);
    ring_reap(b);
}

/* The waiting slots: sent on the live handle, or, on a broken ring, let
 * go (nothing is answered there, and its memory is not sent from). */
static void ring_send_waiting(struct nbd_ring *b)
{
    struct nbd_io *io = b->wait_head;
    b->wait_head = NULL;
    b->wait_tail = &b->wait_head;
    while (io != NULL) {
        struct nbd_io *next = io->next;
        if (ring_broken(b))
            io_complete(b, io, VIRTIO_BLK_S_IOERR);  /* nothing is answered */
        else
            io_send(b, io);  /* a dead handle fails them: they wait again */
        io = next;
    }
}

/* A sent request outlived io_timeout on a live connection: the server is
 * hung. Hang up (shutdown makes libnbd see EOF and fail every command),
 * so the requests wait for a new connection or their own timeout. */
static void ring_hang_up(struct nbd_ring *b)
{
    struct nbd_handle *h = b->c->h;
    int64_t fd = nbd_aio_get_fd(h);
    if (fd >= 0)
        shutdown((int)fd, SHUT_RDWR);
    /* EOF: libnbd moves to DEAD and calls every outstanding command's
     * callback with ENOTCONN; ring_reap sees a dead handle. */
    nbd_aio_notify_read(h);
    ring_reap(b);
}

static void ring_timeouts(struct nbd_ring *b, uint64_t now)
{
    if (b->next_deadline == 0 || now < b->next_deadline)
        return;
    if (b->c->h != NULL)
        for (uint32_t i = 0; i < b->nios; i++)
            if (b->ios[i].state == NIO_SENT && b->ios[i].deadline <= now) {
                ring_hang_up(b);
                break;
            }
    uint64_t next = 0;
    struct nbd_io **pp = &b->wait_head, *io;
    while ((io = *pp) != NULL) {
        if (io->deadline <= now) {
            *pp = io->next;
            nitro_stat_add(&b->c->stats.timeouts, 1);
            nitro_stat_add(&b->s->timeouts, 1);
            io_complete(b, io, VIRTIO_BLK_S_IOERR);
            continue;
        }
        if (next == 0 || io->deadline < next)
            next = io->deadline;
        pp = &io->next;
    }
    b->wait_tail = pp;
    for (uint32_t i = 0; i < b->nios; i++)
        if (b->ios[i].state == NIO_SENT &&
            (next == 0 || b->ios[i].deadline < next))
            next = b->ios[i].deadline;
    b->next_deadline = next;
    b->r.timer_ns = next;
}

/* What the worker should wait for on the aux fd. */
static void ring_watch(struct nbd_ring *b)
{
    struct nbd_handle *h = b->c->h;
    if (h == NULL) {
        b->r.aux_fd = b->c->offer_fd;
        b->r.aux_events = EPOLLIN;
        return;
    }
    unsigned dir = nbd_aio_get_direction(h);
    b->r.aux_fd = b->c->link->fd;
    b->r.aux_events = EPOLLIN | (dir & LIBNBD_AIO_DIRECTION_WRITE ? EPOLLOUT : 0);
}

/* Everything but taking new requests: the connection, answers, timeouts. */
static void ring_service(struct nbd_ring *b)
{
    struct nitro_nbd *c = b->c;
    uint32_t revents = b->r.aux_revents;
    b->r.aux_revents = 0;
    nbd_publish(c);
    if (ring_broken(b))
        ring_send_waiting(b);
    if (c->h == NULL) {
        if (revents)
            nitro_eventfd_drain(c->offer_fd);
        /* A broken ring takes none: it sends nothing more (the next
         * attach asks again). */
        if (!ring_broken(b) && nbd_take(c))
            ring_send_waiting(b);
        revents = 0;
    }
    if (c->h != NULL)
        ring_step(b, revents);
    ring_timeouts(b, nitro_now_ns());
}

/* Call the guest for published answers, or let the call wait (answer
 * moderation); the ring's timer then covers it too. */
static void ring_signal(struct nbd_ring *b)
{
    blk_calls_signal(&b->calls, b->r.vq, b->outstanding);
    b->r.timer_ns = blk_calls_timer(&b->calls, b->next_deadline);
}

/* Hold the socket's sends while a batch of requests is issued (TCP_CORK):
 * libnbd sends each command as it is issued, a segment (and a wakeup of
 * the server) each; corked, a batch leaves together when ring_uncork
 * lets it go. Only for a batch known to be two or more requests (a
 * split ring's avail index; a packed ring tells none) that can all be
 * taken now (two free slots, QoS not holding the queue) on a live
 * connection: one request goes at once. */
static void ring_cork(struct nbd_ring *b, uint32_t budget)
{
    if (b->c->h == NULL || b->free == NULL || b->free->next == NULL || budget < 2 ||
        blk_queue_waiting(&b->q) || nitro_vq_waiting_hint(b->r.vq) < 2)
        return;
    /* The link's fd stays open to the end of the poll even if the handle
     * dies in it (nbd_lose keeps the link until the next publish), and to
     * abandon() after a fault in it. */
    int fd = b->c->link->fd;
    if (setsockopt(fd, IPPROTO_TCP, TCP_CORK, &(int){1}, sizeof(int)) == 0)
        b->corked = fd;
}

static void ring_uncork(struct nbd_ring *b)
{
    if (b->corked < 0)
        return;
    setsockopt(b->corked, IPPROTO_TCP, TCP_CORK, &(int){0}, sizeof(int));
    b->corked = -1;
}

static int nbd_ring_poll(struct nitro_ring *r, struct nitro_io *unused,
                         uint32_t budget)
{
    (void)unused;
    struct nbd_ring *b = (struct nbd_ring *)r;
    ring_service(b);
    ring_cork(b, budget);
    uint32_t done = 0;
    int rc = 0;
    while (done < budget && !blk_queue_waiting(&b->q) && b->free != NULL &&
           !b->guest_fault) {
        struct nitro_chain *c;
        struct blk_req rq = {0};  /* set by blk_queue_next; gcc cannot always see it */
        uint64_t start;
        rc = blk_queue_next(&b->q, &c, &rq, &start);
        if (rc <= 0)
            break;
        done++;
        ring_start(b, c, &rq, start);
    }
    ring_uncork(b);
    ring_reap(b);  /* commands libnbd refused at once */
    ring_watch(b);
    ring_signal(b);
    if (b->guest_fault)
        return nitro_vq_set_fault(r->vq, NITRO_FAULT_MEMORY);
    return rc < 0 ? rc : (int)done;
}

static int nbd_ring_arm(struct nitro_ring *r)
{
    struct nbd_ring *b = (struct nbd_ring *)r;
    int rc = nitro_ring_arm_vq(r);
    if (rc != 0)
        return rc;
    if (b->done != NULL || (b->c->h == NULL && atomic_load(&b->c->offered)))
        return 1;
    ring_watch(b);
    return 0;
}

static int nbd_ring_attach(struct nitro_ring *r)
{
    struct nbd_ring *b = (struct nbd_ring *)r;
    if (nitro_vq_fault(r->vq) != NITRO_FAULT_NONE)
        return NITRO_ERR_GUEST;
    uint32_t num = nitro_vq_num(r->vq);
    if (b->nios != num) {
        for (uint32_t i = 0; i < b->nios; i++)
            free(b->ios[i].buf);
        free(b->ios);
        b->ios = calloc(num, sizeof(*b->ios));
        b->nios = b->ios != NULL ? num : 0;
        if (b->ios == NULL)
            return NITRO_ERR_NOMEM;
    }
    b->free = NULL;
    for (uint32_t i = num; i-- > 0;) {
        b->ios[i].state = NIO_FREE;
        b->ios[i].next = b->free;
        b->free = &b->ios[i];
    }
    b->wait_head = NULL;
    b->wait_tail = &b->wait_head;
    b->done = NULL;
    b->outstanding = 0;
    b->touching = NULL;
    b->guest_fault = false;
    b->next_deadline = 0;
    b->calls = (struct blk_calls){0};
    r->timer_ns = 0;
    if (b->p->xts != NULL) {
        b->lane = nitro_xts_lane_get(b->p->xts);
        if (b->lane == NULL)
            return NITRO_ERR_NOMEM;
    }
    if (b->c->h == NULL && !atomic_load(&b->c->offered))
        nbd_ask(b->c);
    ring_watch(b);
    return NITRO_OK;
}

/* A request QoS held back points into guest memory that may be replaced
 * before the next attach: send it now, over the budget (detaching is
 * rare); a broken ring's is dropped with the ring. */
static void nbd_release_held(struct nbd_ring *b)
{
    struct nitro_chain *c;
    struct blk_req rq;
    uint64_t start;
    int rc = blk_queue_release_held(&b->q, b->free != NULL, &c, &rq, &start);
    if (rc > 0)
        ring_start(b, c, &rq, start);
    else if (rc < 0)
        b->calls.due = true;
}

/* Being detached (nitro_ring.h, drain): every request taken completes
 * first, as on a local volume, answered by the server or at its
 * io_timeout (a new connection the control plane offers meanwhile is
 * taken and the waiting requests resent on it). The worker calls this on
 * its passes, woken by the aux fd (socket or offer) and timer_ns, until
 * nothing is outstanding. */
static int nbd_ring_drain(struct nitro_ring *r)
{
    struct nbd_ring *b = (struct nbd_ring *)r;
    nbd_release_held(b);  /* nothing once the first call sent it */
    ring_service(b);
    if (b->guest_fault)
        nitro_vq_set_fault(r->vq, NITRO_FAULT_MEMORY);
    if (!ring_broken(b))
        blk_calls_flush(&b->calls, r->vq);
    ring_watch(b);
    return (int)b->outstanding;
}

/* A fault cut a copy to or from guest memory short: the slot it was for
 * is in no list; let it go (the ring is broken, nothing is answered). */
static void nbd_ring_abandon(struct nitro_ring *r)
{
    struct nbd_ring *b = (struct nbd_ring *)r;
    struct nbd_io *io = b->touching;
    b->touching = NULL;
    b->calls = (struct blk_calls){0};
    /* The connection outlives the ring: left corked, it would hold a
     * lone request of the next attach for the kernel's 200 ms. */
    ring_uncork(b);
    if (io != NULL) {
        blk_queue_uncount(&b->q);
        io_release(b, io);
    }
}

/* The worker lets go; drain() found nothing outstanding. */
static void nbd_ring_detach(struct nitro_ring *r)
{
    struct nbd_ring *b = (struct nbd_ring *)r;
    nbd_publish(b->c);
    r->aux_fd = -1;
    r->aux_events = 0;
    r->timer_ns = 0;
    nitro_xts_lane_put(b->lane);
    b->lane = NULL;
}

static void nbd_ring_free(struct nitro_ring *r)
{
    struct nbd_ring *b = (struct nbd_ring *)r;
    blk_queue_forget(&b->q);
    for (uint32_t i = 0; i < b->nios; i++)
        free(b->ios[i].buf);
    free(b->ios);
    free(b);
}

static const struct nitro_ring_ops nbd_ring_ops = {
    .poll = nbd_ring_poll,
    .arm = nbd_ring_arm,
    .disarm = nitro_ring_disarm_vq,
    .attach = nbd_ring_attach,
    .detach = nbd_ring_detach,
    .free = nbd_ring_free,
    .abandon = nbd_ring_abandon,
    .drain = nbd_ring_drain,
};

struct nitro_ring *nitro_ring_nbd_new(struct nitro_vq *vq,
                                      const struct nitro_blk_params *params,
                                      struct nitro_blk_stats *stats,
                                      struct nitro_nbd *c)
{
    if (vq == NULL || params == NULL || stats == NULL || c == NULL ||
        !blk_params_ok(params))
        return NULL;
    struct nbd_ring *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return NULL;
    b->r = nitro_ring_detached(&nbd_ring_ops, vq, NITRO_RING_BLK);
    b->p = params;
    b->s = stats;
    b->c = c;
    b->corked = -1;
    b->q = blk_queue_of(&b->r, params, stats);
    return &b->r;
}
