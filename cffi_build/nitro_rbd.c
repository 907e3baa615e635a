/*
 * nitro_rbd.c: virtio-blk on a Ceph RBD image through librbd's aio calls
 * (nitro_rbd.h). The request checks are nitro_blk.c's (nitro_blk_internal.h);
 * only the I/O differs.
 *
 * Threads: the worker pops a chain, checks it, copies a write's data out
 * of guest memory into the request's buffer and calls rbd_aio_*; librbd
 * completes on its own threads (rbd_done), which record the result, push
 * the request on the ring's done stack (lock-free, many producers) and,
 * when the stack was empty, write the ring's eventfd. That eventfd is the
 * ring's aux fd (nitro_ring.h), so a sleeping worker wakes; a busy one
 * finds the stack in its next poll without a system call. Only the worker
 * touches guest memory (copying a read's data in, the status byte, the
 * used ring), inside the engine's guards.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "nitro_blk_internal.h"
#include "nitro_iov.h"
#include "nitro_rbd.h"
#include "nitro_ring.h"

/* A request's buffer stays with its slot for the next request up to this
 * size; larger ones are freed on completion (a ring of 256 slots keeps at
 * most 32 MiB). */
#define BUF_KEEP_BYTES (128u << 10)

const char *const nitro_rbd_stage_names[NITRO_RBD_STAGES] = {
    "ok", "create", "conf", "connect", "pool", "image", "lock", "size",
};

struct nitro_rbd {
    rados_t cluster;
    rados_ioctx_t ioctx;
    rbd_image_t image;
    uint64_t size;
    bool locked;
};

/* ---- the image --------------------------------------------------------- */

static int rbd_stage(int *err, int rc, int stage)
{
    *err = rc;
    return rc < 0 ? stage : NITRO_RBD_OK;
}

int nitro_rbd_open(const char *conf, const char *user, const char *keyring,
                   const char *pool, const char *image, uint32_t readonly,
                   struct nitro_rbd **out, int *err)
{
    struct nitro_rbd *v = calloc(1, sizeof(*v));
    if (v == NULL)
        return rbd_stage(err, -ENOMEM, NITRO_RBD_STAGE_CREATE);
    int st = rbd_stage(err, rados_create(&v->cluster, user), NITRO_RBD_STAGE_CREATE);
    if (st != NITRO_RBD_OK) {
        free(v);
        return st;
    }
    st = rbd_stage(err, rados_conf_read_file(v->cluster, conf), NITRO_RBD_STAGE_CONF);
    if (st == NITRO_RBD_OK && keyring != NULL && keyring[0] != '\0')
        st = rbd_stage(err, rados_conf_set(v->cluster, "keyring", keyring),
                       NITRO_RBD_STAGE_CONF);
    if (st == NITRO_RBD_OK)
        st = rbd_stage(err, rados_connect(v->cluster), NITRO_RBD_STAGE_CONNECT);
    if (st == NITRO_RBD_OK)
        st = rbd_stage(err, rados_ioctx_create(v->cluster, pool, &v->ioctx),
                       NITRO_RBD_STAGE_POOL);
    if (st == NITRO_RBD_OK)
        st = rbd_stage(err, readonly ? rbd_open_read_only(v->ioctx, image, &v->image, NULL)
                                     : rbd_open(v->ioctx, image, &v->image, NULL),
                       NITRO_RBD_STAGE_IMAGE);
    if (st == NITRO_RBD_OK && !readonly) {
        st = rbd_stage(err, rbd_lock_acquire(v->image, RBD_LOCK_MODE_EXCLUSIVE),
                       NITRO_RBD_STAGE_LOCK);
        v->locked = st == NITRO_RBD_OK;
    }
    if (st == NITRO_RBD_OK)
        st = rbd_stage(err, rbd_get_size(v->image, &v->size), NITRO_RBD_STAGE_SIZE);
    if (st != NITRO_RBD_OK) {
        int keep = *err;
        nitro_rbd_close(v);
        *err = keep;
        return st;
    }
    *err = 0;
    *out = v;
    return NITRO_RBD_OK;
}

uint64_t nitro_rbd_size(const struct nitro_rbd *v)
{
    return v->size;
}

int nitro_rbd_flush(struct nitro_rbd *v)
{
    return rbd_flush(v->image);
}

void nitro_rbd_close(struct nitro_rbd *v)
{
    if (v == NULL)
        return;
    if (v->image != NULL) {
        if (v->locked)
            rbd_lock_release(v->image);
        rbd_close(v->image);
    }
    if (v->ioctx != NULL)
        rados_ioctx_destroy(v->ioctx);
    if (v->cluster != NULL)
        rados_shutdown(v->cluster);
    free(v);
}

/* ---- requests in flight ---------------------------------------------- */

struct rbd_ring;

/* One request slot. */
struct rbd_io {
    struct rbd_ring *ring;
    struct rbd_io *next;        /* the free list, or the done stack */
    uint16_t head;
    bool resubmitted;
    uint64_t start;
    uint8_t *status;
    struct blk_done d;
    struct iovec *giov;         /* a read's guest buffers (a copy) */
    int gcnt;
    uint8_t *buf;               /* the data, never guest memory */
    size_t cap;
    int pending;                /* aio calls not yet completed (atomic) */
    int failed;                 /* one of them failed (atomic) */
};

struct rbd_ring {
    struct nitro_ring r;
    struct nitro_rbd *v;
    const struct nitro_blk_params *p;
    struct nitro_blk_stats *s;
    struct rbd_io *ios;
    uint32_t nios;
    struct rbd_io *free;
    uint32_t in_flight;         /* the worker's count of slots in use */
    struct rbd_io *done;        /* completed by librbd, not yet finished */
    int efd;
    bool notify;
};

/* librbd's thread: the last completion of a request hands it over. */
static void rbd_done(rbd_completion_t c, void *arg)
{
    struct rbd_io *io = arg;
    ssize_t rv = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    if (rv < 0)
        __atomic_store_n(&io->failed, 1, __ATOMIC_RELAXED);
    if (__atomic_sub_fetch(&io->pending, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    struct rbd_ring *b = io->ring;
    struct rbd_io *old = __atomic_load_n(&b->done, __ATOMIC_RELAXED);
    do
        io->next = old;
    while (!__atomic_compare_exchange_n(&b->done, &old, io, true, __ATOMIC_RELEASE,
                                        __ATOMIC_RELAXED));
    if (old == NULL)
        nitro_eventfd_signal(b->efd);
}

static bool rbd_buf_get(struct rbd_io *io, size_t len)
{
    if (io->cap >= len)
        return true;
    free(io->buf);
    io->buf = malloc(len);
    io->cap = io->buf != NULL ? len : 0;
    return io->buf != NULL;
}

static void rbd_io_release(struct rbd_io *io)
{
    struct rbd_ring *b = io->ring;
    free(io->giov);
    io->giov = NULL;
    if (io->cap > BUF_KEEP_BYTES) {
        free(io->buf);
        io->buf = NULL;
        io->cap = 0;
    }
    io->next = b->free;
    b->free = io;
    b->in_flight--;
}

/* The worker: copy a read's data into the guest, complete the chain. */
static void rbd_io_finish(struct rbd_io *io)
{
    struct rbd_ring *b = io->ring;
    io->d.status = __atomic_load_n(&io->failed, __ATOMIC_RELAXED) ? VIRTIO_BLK_S_IOERR
                                                                    : VIRTIO_BLK_S_OK;
    if (io->d.status == VIRTIO_BLK_S_OK && io->d.op == NITRO_BLK_OP_IN)
        nitro_buf_to_iov(io->giov, io->gcnt, io->buf, io->d.bytes);
    if (io->d.status != VIRTIO_BLK_S_OK) {
        io->d.bytes = 0;
        io->d.used_len = 1;
    }
    blk_finish(b->r.vq, io->head, io->resubmitted, io->status, &io->d, b->s, io->start);
    b->notify = true;
    rbd_io_release(io);
}

/* Finish every request librbd completed; how many. */
static uint32_t rbd_reap(struct rbd_ring *b)
{
    struct rbd_io *io = __atomic_exchange_n(&b->done, NULL, __ATOMIC_ACQUIRE);
    uint32_t n = 0;
    while (io != NULL) {
        struct rbd_io *next = io->next;
        rbd_io_finish(io);
        io = next;
        n++;
    }
    return n;
}

/* ---- starting a request -------------------------------------------------- */

typedef int (*rbd_submit_fn)(struct rbd_io *io, rbd_completion_t c, uint64_t off,
                             uint64_t len);

static int submit_read(struct rbd_io *io, rbd_completion_t c, uint64_t off, uint64_t len)
{
    return rbd_aio_read(io->ring->v->image, off, len, (char *)io->buf, c);
}

static int submit_write(struct rbd_io *io, rbd_completion_t c, uint64_t off, uint64_t len)
{
    return rbd_aio_write(io->ring->v->image, off, len, (const char *)io->buf, c);
}

static int submit_flush(struct rbd_io *io, rbd_completion_t c, uint64_t off, uint64_t len)
{
    (void)off;
    (void)len;
    return rbd_aio_flush(io->ring->v->image, c);
}

static int submit_discard(struct rbd_io *io, rbd_completion_t c, uint64_t off, uint64_t len)
{
    return rbd_aio_discard(io->ring->v->image, off, len, c);
}

static int submit_zeroes(struct rbd_io *io, rbd_completion_t c, uint64_t off, uint64_t len)
{
    return rbd_aio_write_zeroes(io->ring->v->image, off, len, c, 0, 0);
}

/* One aio call for io (whose pending count already includes it). A call
 * librbd refuses counts as a failed completion. */
static void rbd_submit(struct rbd_io *io, rbd_submit_fn fn, uint64_t off, uint64_t len)
{
    rbd_completion_t c;
    int rc = rbd_aio_create_completion(io, rbd_done, &c);
    if (rc == 0) {
        rc = fn(io, c, off, len);
        if (rc < 0)
            rbd_aio_release(c);
    }
    if (rc < 0) {
        __atomic_store_n(&io->failed, 1, __ATOMIC_RELAXED);
        if (__atomic_sub_fetch(&io->pending, 1, __ATOMIC_ACQ_REL) == 0)
            rbd_io_finish(io);
    }
}

static struct rbd_io *rbd_io_take(struct rbd_ring *b, const struct nitro_chain *c,
                                  const struct blk_req *rq, uint64_t start, int op)
{
    struct rbd_io *io = b->free;
    b->free = io->next;
    b->in_flight++;
    io->next = NULL;
    io->head = c->head;
    io->resubmitted = c->resubmitted;
    io->start = start;
    io->status = rq->status;
    io->d = (struct blk_done){.op = op, .used_len = 1};
    io->failed = 0;
    io->pending = 0;
    return io;
}

/* A read or write: the data through io->buf. False: no memory. */
static bool rbd_start_rw(struct rbd_io *io, const struct blk_req *rq)
{
    bool write = io->d.op == NITRO_BLK_OP_OUT;
    uint64_t len = write ? rq->rd_len : rq->wr_len;
    if (!rbd_buf_get(io, len > 0 ? len : 1))
        return false;
    if (write) {
        nitro_iov_to_buf(rq->rd, rq->n_rd, io->buf, len);
    } else {
        io->giov = malloc((size_t)rq->n_wr * sizeof(struct iovec));
        if (io->giov == NULL && rq->n_wr > 0)
            return false;
        memcpy(io->giov, rq->wr, (size_t)rq->n_wr * sizeof(struct iovec));
        io->gcnt = rq->n_wr;
        io->d.used_len = (uint32_t)len + 1;
    }
    io->d.bytes = len;
    io->pending = 1;
    rbd_submit(io, write ? submit_write : submit_read, rq->sector << SECTOR_SHIFT, len);
    return true;
}

/* DISCARD / WRITE_ZEROES: one aio call per non-empty segment. *started:
 * io is in flight (it may even be finished already: do not touch it). */
static uint8_t rbd_start_segments(struct rbd_ring *b, struct rbd_io *io,
                                  const struct blk_req *rq, bool zeroes, bool *started)
{
    const struct nitro_blk_params *p = b->p;
    if ((zeroes ? p->max_write_zeroes_sectors : p->max_discard_sectors) == 0)
        return VIRTIO_BLK_S_UNSUPP;
    if (p->readonly)
        return VIRTIO_BLK_S_IOERR;
    struct segment seg[BLK_SEGMENTS_CAP];
    int count = 0;
    uint8_t st = blk_segments(p, rq, zeroes, seg, &count);
    if (st != VIRTIO_BLK_S_OK)
        return st;
    int calls = 0;
    for (int i = 0; i < count; i++) {
        calls += seg[i].num_sectors > 0;
        io->d.bytes += (uint64_t)seg[i].num_sectors << SECTOR_SHIFT;
    }
    if (calls == 0)
        return VIRTIO_BLK_S_OK;
    /* Every call counted before the first: none can finish io early. */
    io->pending = calls;
    *started = true;
    for (int i = 0; i < count; i++)
        if (seg[i].num_sectors > 0)
            rbd_submit(io, zeroes ? submit_zeroes : submit_discard,
                       seg[i].sector << SECTOR_SHIFT,
                       (uint64_t)seg[i].num_sectors << SECTOR_SHIFT);
    return VIRTIO_BLK_S_OK;
}

/* Put one parsed request in flight, or complete it here (errors, GET_ID,
 * unsupported types). */
static void rbd_start(struct rbd_ring *b, struct nitro_chain *c, struct blk_req *rq,
                      uint64_t start)
{
    const struct nitro_blk_params *p = b->p;
    struct blk_done d = {.status = VIRTIO_BLK_S_IOERR, .used_len = 1};
    struct rbd_io *io;
    switch (rq->type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT: {
        bool write = rq->type == VIRTIO_BLK_T_OUT;
        uint64_t len = write ? rq->rd_len : rq->wr_len;
        d.op = write ? NITRO_BLK_OP_OUT : NITRO_BLK_OP_IN;
        /* used_len is 32 bits and a chain is capped at 2^32 bytes (2.7.5.2). */
        if (rq->oversize || (write && p->readonly) || len >= UINT32_MAX ||
            !blk_range_ok(p, rq->sector, len))
            break;
        io = rbd_io_take(b, c, rq, start, d.op);
        if (!rbd_start_rw(io, rq)) {
            rbd_io_release(io);
            break;
        }
        return;
    }
    case VIRTIO_BLK_T_FLUSH:
        io = rbd_io_take(b, c, rq, start, NITRO_BLK_OP_FLUSH);
        io->pending = 1;
        rbd_submit(io, submit_flush, 0, 0);
        return;
    case VIRTIO_BLK_T_GET_ID:
        d.op = NITRO_BLK_OP_GET_ID;
        d.status = blk_get_id(p, rq, &d);
        break;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
        bool zeroes = rq->type == VIRTIO_BLK_T_WRITE_ZEROES;
        d.op = zeroes ? NITRO_BLK_OP_WRITE_ZEROES : NITRO_BLK_OP_DISCARD;
        bool started = false;
        io = rbd_io_take(b, c, rq, start, d.op);
        d.status = rbd_start_segments(b, io, rq, zeroes, &started);
        if (started)
            return;
        d.bytes = d.status == VIRTIO_BLK_S_OK ? io->d.bytes : 0;
        rbd_io_release(io);
        break;
    }
    default:
        d.op = NITRO_BLK_OP_UNSUPPORTED;
        d.status = VIRTIO_BLK_S_UNSUPP;
    }
    if (d.status != VIRTIO_BLK_S_OK) {
        d.bytes = 0;
        d.used_len = 1;
    }
    blk_finish(b->r.vq, c->head, c->resubmitted, rq->status, &d, b->s, start);
    b->notify = true;
}

/* ---- the ring ------------------------------------------------------------ */

static void rbd_ring_notify(struct rbd_ring *b)
{
    if (b->notify) {
        b->notify = false;
        nitro_vq_notify(b->r.vq);
    }
}

static int rbd_ring_poll(struct nitro_ring *r, struct nitro_io *uring, uint32_t budget)
{
    (void)uring;  /* librbd does the I/O */
    struct rbd_ring *b = (struct rbd_ring *)r;
    if (r->aux_revents) {
        /* Drained before reaping: a completion after the reap writes it again. */
        r->aux_revents = 0;
        nitro_eventfd_drain(b->efd);
    }
    uint32_t done = rbd_reap(b);
    int rc = 0;
    uint32_t popped = 0;
    while (popped < budget && b->free != NULL) {
        struct nitro_chain *c;
        rc = nitro_vq_pop(r->vq, &c);
        if (rc <= 0)
            break;
        uint64_t start = nitro_now_ns();
        nitro_stat_add(&b->s->inflight, 1);
        struct blk_req rq = {0};
        if (blk_parse(r->vq, b->p, c, &rq) != NITRO_OK) {
            nitro_stat_sub(&b->s->inflight, 1);
            rc = NITRO_ERR_GUEST;
            break;
        }
        popped++;
        rbd_start(b, c, &rq, start);
    }
    rbd_ring_notify(b);
    return rc < 0 ? rc : (int)(done + popped);
}

/* Before the worker sleeps: completions waiting count as work. */
static int rbd_ring_arm(struct nitro_ring *r)
{
    struct rbd_ring *b = (struct rbd_ring *)r;
    int rc = nitro_ring_arm_vq(r);
    if (rc == 0 && __atomic_load_n(&b->done, __ATOMIC_ACQUIRE) != NULL)
        rc = 1;
    return rc;
}

/* The engine waits for io_uring requests only: none here. */
static uint32_t rbd_ring_in_flight(const struct nitro_ring *r)
{
    (void)r;
    return 0;
}

static int rbd_ring_attach(struct nitro_ring *r)
{
    struct rbd_ring *b = (struct rbd_ring *)r;
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
        b->ios[i].ring = b;
        b->ios[i].next = b->free;
        b->free = &b->ios[i];
    }
    b->in_flight = 0;
    r->aux_events = EPOLLIN;
    return NITRO_OK;
}

/* Wait for librbd to complete what is in flight (librbd retries while
 * the cluster is away: this waits as long as the requests do). */
static void rbd_wait_idle(struct rbd_ring *b, bool finish)
{
    while (b->in_flight > 0) {
        struct rbd_io *io = __atomic_exchange_n(&b->done, NULL, __ATOMIC_ACQUIRE);
        if (io == NULL) {
            struct timespec ts = {.tv_nsec = 100000};
            nanosleep(&ts, NULL);
        }
        while (io != NULL) {
            struct rbd_io *next = io->next;
            if (finish)
                rbd_io_finish(io);
            else
                rbd_io_release(io);
            io = next;
        }
    }
}

/* The worker lets go: every request completes to the guest first. */
static void rbd_ring_detach(struct nitro_ring *r)
{
    struct rbd_ring *b = (struct rbd_ring *)r;
    rbd_wait_idle(b, r->status == NITRO_OK);
    rbd_ring_notify(b);
    nitro_eventfd_drain(b->efd);
}

static void rbd_ring_free(struct nitro_ring *r)
{
    struct rbd_ring *b = (struct rbd_ring *)r;
    /* librbd must not complete into freed slots; guest memory may be gone. */
    rbd_wait_idle(b, false);
    for (uint32_t i = 0; i < b->nios; i++)
        free(b->ios[i].buf);
    free(b->ios);
    close(b->efd);
    free(b);
}

static const struct nitro_ring_ops rbd_ring_ops = {
    .poll = rbd_ring_poll,
    .arm = rbd_ring_arm,
    .disarm = nitro_ring_disarm_vq,
    .in_flight = rbd_ring_in_flight,
    .attach = rbd_ring_attach,
    .detach = rbd_ring_detach,
    .free = rbd_ring_free,
};

struct nitro_ring *nitro_ring_blk_rbd_new(struct nitro_vq *vq, struct nitro_rbd *v,
                                          const struct nitro_blk_params *params,
                                          struct nitro_blk_stats *stats)
{
    if (vq == NULL || v == NULL || params == NULL || stats == NULL)
        return NULL;
    uint32_t bs = params->block_size;
    if (bs < (1u << SECTOR_SHIFT) || (bs & (bs - 1)) != 0 || params->xts != NULL ||
        params->capacity > v->size >> SECTOR_SHIFT)
        return NULL;
    struct rbd_ring *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return NULL;
    b->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (b->efd < 0) {
        free(b);
        return NULL;
    }
    b->r = nitro_ring_detached(&rbd_ring_ops, vq, NITRO_RING_BLK);
    b->r.aux_fd = b->efd;
    b->v = v;
    b->p = params;
    b->s = stats;
    return &b->r;
}
