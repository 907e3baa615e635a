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
 * finds the stack in its next poll without a system call. The worker
 * touches guest memory (a write's data, the status byte, the used ring)
 * inside the engine's guards. One copy is librbd's thread's: a plain
 * read's data goes from the OSD reply's buffers, which librbd hands over
 * in a bufferlist (nitro_rbd_bl.h: one copy per read, not two), into the
 * guest in rbd_done, under a guard of its own, before the request is
 * handed over (see rbd_read_deliver for why, and for the rule that keeps
 * it off memory the worker has let go).
 *
 * An encrypted volume (params->xts: a LUKS2 image, backends/luks.py) has
 * the same path with the copies replaced by AES-XTS, out of place: a
 * write is encrypted from guest memory into the request's buffer, a read
 * decrypted from librbd's buffers into guest memory (on the worker), so
 * librbd (and the cluster) only ever see ciphertext and guest memory never
 * holds any. Offsets are the data segment's (what the IVs count from) plus
 * params->data_offset.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "nitro_blk_internal.h"
#include "nitro_guard.h"
#include "nitro_iov.h"
#include "nitro_rbd.h"
#include "nitro_rbd_bl.h"
#include "nitro_ring.h"
#include "nitro_xts_internal.h"

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
    char owner[NITRO_RBD_OWNER_MAX];  /* this client as the lock's owner */
};

/* ---- the image --------------------------------------------------------- */

static int rbd_stage(int *err, int rc, int stage)
{
    *err = rc;
    return rc < 0 ? stage : NITRO_RBD_OK;
}

/* The image's lock owners (at most 4 reported); each call gets them anew. */
#define OWNERS_MAX 4

/* A lock held by `stale` (what nitro_rbd_lock_owner said in a daemon
 * that is gone) is broken now: librbd would wait for the dead client's
 * watch to time out on the OSD (30 s) before taking it over. Breaking
 * blocklists that client, so even a late write of it is refused. */
static void rbd_break_stale(rbd_image_t image, const char *stale)
{
    if (stale == NULL || stale[0] == '\0')
        return;
    char *owners[OWNERS_MAX];
    size_t n = OWNERS_MAX;
    rbd_lock_mode_t mode;
    if (rbd_lock_get_owners(image, &mode, owners, &n) < 0)
        return;
    for (size_t i = 0; i < n; i++)
        if (strcmp(owners[i], stale) == 0)
            rbd_lock_break(image, mode, owners[i]);
    rbd_lock_get_owners_cleanup(owners, n);
}

/* Remember who this client is as the lock's owner. */
static void rbd_note_owner(struct nitro_rbd *v)
{
    char *owners[OWNERS_MAX];
    size_t n = OWNERS_MAX;
    rbd_lock_mode_t mode;
    if (rbd_lock_get_owners(v->image, &mode, owners, &n) < 0)
        return;
    if (n == 1 && strlen(owners[0]) < sizeof(v->owner))
        strcpy(v->owner, owners[0]);
    rbd_lock_get_owners_cleanup(owners, n);
}

int nitro_rbd_open(const char *conf, const char *user, const char *keyring,
                   const char *pool, const char *image, uint32_t readonly,
                   const char *stale_owner, struct nitro_rbd **out, int *err)
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
    /* No librbd write-back cache: a write is acknowledged to the guest only
     * once the OSDs have it, so a daemon killed with unflushed writes loses
     * none the guest was told about (the file ring's are in the page cache). */
    if (st == NITRO_RBD_OK)
        st = rbd_stage(err, rados_conf_set(v->cluster, "rbd_cache", "false"),
                       NITRO_RBD_STAGE_CONF);
    /* A write's data is already nitro's own copy (io->buf: guest memory is
     * never handed to librbd), which stays put until the completion. So
     * librbd may send from it instead of copying it again (its default,
     * meant for callers that might change a buffer in flight): one copy
     * of a write's data per request, where qemu-storage-daemon has one
     * too (librbd's). librbd delays the completion until it lets go of
     * the buffer. */
    if (st == NITRO_RBD_OK)
        st = rbd_stage(err, rados_conf_set(v->cluster, "rbd_disable_zero_copy_writes", "false"),
                       NITRO_RBD_STAGE_CONF);
    /* Unreachable monitors: give up after 10 s, not librados' 300, so the
     * daemon (which retries in the background) never holds its start-up
     * past systemd's timeout waiting on a cluster that is away. */
    if (st == NITRO_RBD_OK)
        st = rbd_stage(err, rados_conf_set(v->cluster, "client_mount_timeout", "10"),
                       NITRO_RBD_STAGE_CONF);
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
        rbd_break_stale(v->image, stale_owner);
        st = rbd_stage(err, rbd_lock_acquire(v->image, RBD_LOCK_MODE_EXCLUSIVE),
                       NITRO_RBD_STAGE_LOCK);
        v->locked = st == NITRO_RBD_OK;
        if (v->locked)
            rbd_note_owner(v);
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

const char *nitro_rbd_lock_owner(const struct nitro_rbd *v)
{
    return v->owner;
}

int nitro_rbd_flush(struct nitro_rbd *v)
{
    return rbd_flush(v->image);
}

int nitro_rbd_read(struct nitro_rbd *v, uint64_t off, uint64_t len, void *buf)
{
    if (off > v->size || len > v->size - off)
        return -EINVAL;
    ssize_t n = rbd_read(v->image, off, len, buf);
    return n < 0 ? (int)n : (uint64_t)n == len ? 0 : -EIO;
}

int nitro_rbd_write(struct nitro_rbd *v, uint64_t off, uint64_t len, const void *buf)
{
    if (off > v->size || len > v->size - off)
        return -EINVAL;
    ssize_t n = rbd_write(v->image, off, len, buf);
    if (n < 0)
        return (int)n;
    return (uint64_t)n == len ? rbd_flush(v->image) : -EIO;
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

/* Who may touch a sent request's guest buffers. librbd's thread copies a
 * read's data into them only from SENT (COPYING, then SENT again); the
 * worker orphans a request only from SENT. So an orphan's buffers, which
 * the guest may have reused since its IOERR, are never written, and a
 * ring is never detached (its memory table swapped) under a copy. */
enum rbd_io_state {
    RBD_IO_SENT,
    RBD_IO_COPYING,
    RBD_IO_ORPHAN,              /* answered already; librbd still holds it */
};

/* One request slot, allocated on its own. A request librbd has not
 * completed by its deadline is answered IOERR and leaves the ring's slots
 * as an orphan: librbd may still fill its bufferlist, so it lives until
 * librbd completes it, then is freed (and the ring allocates a new slot in
 * its place: a cluster that is away does not starve the guest's queue). */
struct rbd_io {
    struct rbd_ring *ring;
    struct rbd_io *next;        /* the free list, or the done stack */
    struct rbd_io *older;       /* the ring's awaited list, by deadline */
    struct rbd_io *newer;
    uint16_t head;
    bool resubmitted;
    bool copied;                /* a read's data is in the guest (rbd_read_deliver) */
    int state;                  /* enum rbd_io_state (atomic) */
    uint64_t start;
    uint64_t deadline;          /* IOERR to the guest then; 0: never */
    uint8_t *status;
    struct blk_done d;
    uint64_t off;               /* in the data segment (the XTS IVs' count) */
    struct iovec *giov;         /* a read's guest buffers (a copy) */
    int gcnt;
    uint8_t *buf;               /* a write's data (ciphertext if encrypted), never guest memory */
    size_t cap;
    struct nitro_rbd_bl *bl;    /* a read's: the OSD reply's buffers, handed over by librbd */
    int pending;                /* aio calls not yet completed (atomic) */
    int failed;                 /* one of them failed (atomic) */
};

struct rbd_ring {
    struct nitro_ring r;
    struct nitro_rbd *v;
    const struct nitro_blk_params *p;
    struct nitro_blk_stats *s;
    struct rbd_io *free;
    uint32_t num;               /* the ring's size: at most this many slots */
    uint32_t nslots;            /* slots the ring owns (orphans are not) */
    uint32_t in_flight;         /* of them, in use */
    /* Sent to librbd and awaited by the guest, oldest first: one timeout
     * for all, so the order of sending is the order of deadlines. */
    struct rbd_io *oldest;
    struct rbd_io *newest;
    struct rbd_io *done;        /* completed by librbd, not yet finished */
    /* Taken off `done` by the reap in progress: a fault (guest memory
     * gone) may cut that reap short, and the next drain finishes these. */
    struct rbd_io *reaping;
    /* The slot whose guest memory is being copied or answered: a fault
     * there leaves it in no list, so abandon() lets it go. */
    struct rbd_io *touching;
    struct blk_queue q;         /* the next request, through QoS */
    struct nitro_xts_lane *lane;  /* the worker's cipher contexts (p->xts) */
    /* The owner's reference and one per request librbd holds (atomic):
     * whoever drops the last frees the ring, so a ring freed while librbd
     * still holds orphans goes when the last of them completes. */
    int refs;
    int efd;
    struct blk_calls calls;     /* answer moderation (nitro_blk_internal.h) */
};

static void rbd_ring_destroy(struct rbd_ring *b);

static void rbd_ring_put(struct rbd_ring *b)
{
    if (__atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) == 0)
        rbd_ring_destroy(b);
}

/* librbd let go of io: hand it to the worker (lock-free push, many
 * producers), wake it when the stack was empty. */
static void rbd_io_complete(struct rbd_io *io)
{
    struct rbd_ring *b = io->ring;
    struct rbd_io *old = __atomic_load_n(&b->done, __ATOMIC_RELAXED);
    do
        io->next = old;
    while (!__atomic_compare_exchange_n(&b->done, &old, io, true, __ATOMIC_RELEASE,
                                        __ATOMIC_RELAXED));
    if (old == NULL)
        nitro_eventfd_signal(b->efd);
    rbd_ring_put(b);
}

/* What fits on the stack of librbd's buffers for one read: one per object
 * it spans, more where a sparse read had holes. */
#define BL_SEGS 16

/* The buffers librbd handed io's read over in: `stack` when they fit,
 * else an array allocated here (*heap, the caller frees it); NULL: no
 * memory. Fetched before any guard: nothing here touches the guest. */
static struct iovec *rbd_bl_get(const struct rbd_io *io, struct iovec *stack,
                                struct iovec **heap, int *n)
{
    *heap = NULL;
    *n = nitro_rbd_bl_segments(io->bl, stack, BL_SEGS);
    if (*n <= BL_SEGS)
        return stack;
    *heap = malloc((size_t)*n * sizeof(struct iovec));
    if (*heap != NULL)
        nitro_rbd_bl_segments(io->bl, *heap, *n);  /* nobody changes the list now */
    return *heap;
}

/* A plain read's data from librbd's buffers into the guest's; false if
 * they held less than the request (librbd zero-fills holes, so a short
 * reply is an error, never stale guest bytes). */
static bool rbd_bl_to_guest(const struct rbd_io *io, const struct iovec *seg, int n)
{
    struct nitro_iov_at at = {0, 0};
    uint64_t done = 0;
    for (int i = 0; i < n && done < io->d.bytes; i++) {
        uint64_t len = seg[i].iov_len < io->d.bytes - done ? seg[i].iov_len : io->d.bytes - done;
        done += nitro_buf_to_iov_at(io->giov, io->gcnt, &at, seg[i].iov_base, len);
    }
    return done == io->d.bytes;
}

/* The same, on the worker (inside the engine's guards). */
static bool rbd_bl_copy(const struct rbd_io *io)
{
    struct iovec stack[BL_SEGS], *heap;
    int n;
    const struct iovec *seg = rbd_bl_get(io, stack, &heap, &n);
    bool ok = seg != NULL && rbd_bl_to_guest(io, seg, n);
    free(heap);
    return ok;
}

static void rbd_copy_guarded(struct rbd_ring *b, struct rbd_io *io)
{
    struct iovec stack[BL_SEGS], *heap;
    int n;
    const struct iovec *seg = rbd_bl_get(io, stack, &heap, &n);
    if (seg == NULL)
        return;  /* no memory: the worker copies (io->copied stays false) */
    struct nitro_guard g;
    if (NITRO_GUARD_ENTER(&g, nitro_guard_covers_vq, b->r.vq)) {
        nitro_guard_leave(&g);
        free(heap);
        nitro_vq_set_fault(b->r.vq, NITRO_FAULT_MEMORY);
        __atomic_store_n(&io->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    bool whole = rbd_bl_to_guest(io, seg, n);
    nitro_guard_leave(&g);
    free(heap);
    if (!whole)
        __atomic_store_n(&io->failed, 1, __ATOMIC_RELAXED);
    io->copied = true;
}

/* A guard on this thread needs SIGBUS deliverable: where it is blocked a
 * fault gets the default action whatever the handler (the daemon dies).
 * Ceph's own Thread class blocks signals; the threads librbd completes on
 * here inherit the mask of the thread that connected. Looked at once per
 * thread: where SIGBUS is blocked, the worker copies as before. */
static bool rbd_thread_guardable(void)
{
    static __thread signed char guardable = -1;
    if (guardable < 0) {
        sigset_t mask;
        guardable = pthread_sigmask(SIG_BLOCK, NULL, &mask) == 0 && !sigismember(&mask, SIGBUS);
    }
    return guardable;
}

/* librbd's thread, a plain read that succeeded: its data from librbd's
 * buffers into the guest, here rather than on the worker after its
 * wake-up, which the answer then waits for less. bench.rbd, 128 KiB
 * reads QD8, alternated builds (when librbd still copied into nitro's
 * buffer on this thread first): median 0.97 of qsd on the worker
 * (0.96-1.02), 0.99 here (0.99-1.03). An encrypted read is decrypted on
 * the worker, whose cipher contexts these are. Guest memory can vanish under the copy as
 * under any other (nitro_guard.h): a fault breaks the queue and fails
 * this request, never the daemon. */
static void rbd_read_deliver(struct rbd_io *io)
{
    struct rbd_ring *b = io->ring;
    if (io->d.op != NITRO_BLK_OP_IN || __atomic_load_n(&io->failed, __ATOMIC_RELAXED) ||
        !rbd_thread_guardable())
        return;
    /* Claimed first: an orphan's ring may outlive its queue and params. */
    int sent = RBD_IO_SENT;
    if (!__atomic_compare_exchange_n(&io->state, &sent, RBD_IO_COPYING, false,
                                     __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return;  /* orphaned: answered, its buffers the guest's again */
    /* The worker decrypts (the cipher contexts are its own); a broken queue
     * is left alone. */
    if (b->p->xts == NULL && nitro_vq_fault(b->r.vq) == NITRO_FAULT_NONE)
        rbd_copy_guarded(b, io);
    __atomic_store_n(&io->state, RBD_IO_SENT, __ATOMIC_RELEASE);
}

/* librbd's thread: the last completion of a request hands it over. */
static void rbd_done(rbd_completion_t c, void *arg)
{
    struct rbd_io *io = arg;
    ssize_t rv = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    if (rv < 0)
        __atomic_store_n(&io->failed, 1, __ATOMIC_RELAXED);
    if (__atomic_sub_fetch(&io->pending, 1, __ATOMIC_ACQ_REL) == 0) {
        rbd_read_deliver(io);
        rbd_io_complete(io);
    }
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

static void rbd_io_free(struct rbd_io *io)
{
    free(io->giov);
    free(io->buf);
    nitro_rbd_bl_free(io->bl);
    free(io);
}

/* A free slot, allocated if the ring owns fewer than its size; NULL: none
 * now (every slot in use, or no memory: the guest's requests wait). */
static struct rbd_io *rbd_slot(struct rbd_ring *b)
{
    if (b->free == NULL && b->nslots < b->num) {
        struct rbd_io *io = calloc(1, sizeof(*io));
        if (io != NULL) {
            io->ring = b;
            b->free = io;
            b->nslots++;
        }
    }
    return b->free;
}

static void rbd_io_release(struct rbd_io *io)
{
    struct rbd_ring *b = io->ring;
    if (b->touching == io)
        b->touching = NULL;
    free(io->giov);
    io->giov = NULL;
    if (io->bl != NULL)
        nitro_rbd_bl_clear(io->bl);  /* the reply's buffers back to librbd */
    if (io->cap > BUF_KEEP_BYTES) {
        free(io->buf);
        io->buf = NULL;
        io->cap = 0;
    }
    io->next = b->free;
    b->free = io;
    b->in_flight--;
}

/* ---- the awaited list and io_timeout ------------------------------------ */

static void rbd_await(struct rbd_ring *b, struct rbd_io *io)
{
    io->newer = NULL;
    io->older = b->newest;
    if (b->newest != NULL)
        b->newest->newer = io;
    else
        b->oldest = io;
    b->newest = io;
}

static void rbd_unawait(struct rbd_ring *b, struct rbd_io *io)
{
    if (io->older != NULL)
        io->older->newer = io->newer;
    else
        b->oldest = io->newer;
    if (io->newer != NULL)
        io->newer->older = io->older;
    else
        b->newest = io->older;
    io->older = io->newer = NULL;
}

/* io leaves the awaited list and the ring's slots for good (librbd still
 * holds it); false, and nothing changes, while librbd's thread is copying
 * its data into the guest: it completes next. Whoever waits for that (an
 * expiry, a drain) keeps the worker polling meanwhile: the ring's timer
 * stays due, or its drain not done. */
static bool rbd_orphan(struct rbd_ring *b, struct rbd_io *io)
{
    int sent = RBD_IO_SENT;
    if (!__atomic_compare_exchange_n(&io->state, &sent, RBD_IO_ORPHAN, false,
                                     __ATOMIC_ACQUIRE, __ATOMIC_ACQUIRE))
        return false;
    rbd_unawait(b, io);
    free(io->giov);
    io->giov = NULL;
    b->in_flight--;
    b->nslots--;
    return true;
}

/* Whether librbd's buffers each hold whole sectors of the cipher's, and
 * the request's bytes in all: so each can be decrypted where it lies. An
 * image's objects are whole sectors, and so are a sparse read's extents
 * on the stores seen here (their allocation units); the check is for any
 * that are not. */
static bool rbd_bl_in_sectors(const struct rbd_io *io, const struct iovec *seg, int n,
                              uint32_t unit)
{
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        if (seg[i].iov_len % unit != 0)
            return false;
        total += seg[i].iov_len;
    }
    return total == io->d.bytes;
}

/* Decrypted from the request's buffer, gathered there first from librbd's
 * buffers (a copy more): where a buffer holds part of a sector. */
static bool rbd_bl_gather_decrypt(struct rbd_ring *b, struct rbd_io *io,
                                  const struct iovec *seg, int n)
{
    struct iovec *g = io->giov;
    int gc = io->gcnt;
    return rbd_buf_get(io, io->d.bytes) &&
           nitro_iov_to_buf(seg, n, io->buf, io->d.bytes) == io->d.bytes &&
           nitro_xts_iov_buf(b->p->xts, b->lane, io->buf, &g, &gc, io->d.bytes, io->off,
                             false) == NITRO_OK;
}

/* An encrypted read: librbd's buffers (ciphertext) decrypted into the
 * guest's, each where it lies (its sectors' IVs from its place in the
 * request). */
static bool rbd_bl_decrypt(struct rbd_ring *b, struct rbd_io *io)
{
    struct iovec stack[BL_SEGS], *heap;
    int n;
    const struct iovec *seg = rbd_bl_get(io, stack, &heap, &n);
    if (seg == NULL)
        return false;
    bool ok = true;
    if (!rbd_bl_in_sectors(io, seg, n, nitro_xts_sector_size(b->p->xts))) {
        ok = rbd_bl_gather_decrypt(b, io, seg, n);
    } else {
        struct iovec *g = io->giov;
        int gc = io->gcnt;
        uint64_t done = 0;
        for (int i = 0; i < n && ok; i++) {
            ok = nitro_xts_iov_buf(b->p->xts, b->lane, seg[i].iov_base, &g, &gc,
                                   seg[i].iov_len, io->off + done, false) == NITRO_OK;
            done += seg[i].iov_len;
        }
    }
    free(heap);
    return ok;
}

/* A read's data from librbd's buffers into the guest (decrypted on the way). */
static uint8_t rbd_copy_out(struct rbd_ring *b, struct rbd_io *io)
{
    bool ok;
    if (b->p->xts != NULL)
        ok = rbd_bl_decrypt(b, io);
    else  /* copied on librbd's thread, unless the queue had faulted then */
        ok = io->copied || rbd_bl_copy(io);
    return ok ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
}

/* The worker: complete io's chain with its status (a read's data copied
 * into the guest first). */
static void rbd_io_answer(struct rbd_io *io, uint8_t status)
{
    struct rbd_ring *b = io->ring;
    if (status == VIRTIO_BLK_S_OK && io->d.op == NITRO_BLK_OP_IN)
        status = rbd_copy_out(b, io);
    io->d.status = status;
    blk_finish(&b->q, io->head, io->resubmitted, io->status, &io->d, io->start);
    blk_calls_answer(&b->calls, io->d.bytes);
}

/* Every awaited request past its deadline gets IOERR and is orphaned:
 * the guest sees the error io_timeout after sending, whatever librbd
 * (which retries for as long as the cluster is away) does with it. One
 * whose data librbd's thread is copying in is left to complete: the timer
 * stays due, so the worker looks again at once. */
static void rbd_expire(struct rbd_ring *b, uint64_t now)
{
    struct rbd_io *io, *next;
    for (io = b->oldest; io != NULL && io->deadline != 0 && io->deadline <= now; io = next) {
        next = io->newer;
        /* Out of every list before the answer, which writes guest memory:
         * a fault there leaves no orphan among the awaited. */
        if (!rbd_orphan(b, io))
            continue;
        nitro_stat_add(&b->s->timeouts, 1);
        rbd_io_answer(io, VIRTIO_BLK_S_IOERR);
    }
    b->r.timer_ns = b->oldest != NULL ? b->oldest->deadline : 0;
}

/* Finish every request librbd completed (touching the guest only if
 * `live`: a broken ring's memory may be gone); how many. They are taken
 * off the done stack onto `reaping` first, and each off that before it
 * is answered, so a fault mid-way loses none (abandon, the next drain). */
static uint32_t rbd_reap(struct rbd_ring *b, bool live)
{
    struct rbd_io *io = __atomic_exchange_n(&b->done, NULL, __ATOMIC_ACQUIRE);
    if (io != NULL) {
        struct rbd_io *last = io;
        while (last->next != NULL)
            last = last->next;
        last->next = b->reaping;
        b->reaping = io;
    }
    uint32_t n = 0;
    while ((io = b->reaping) != NULL) {
        b->reaping = io->next;  /* before the guest is touched */
        if (__atomic_load_n(&io->state, __ATOMIC_RELAXED) == RBD_IO_ORPHAN) {
            rbd_io_free(io);
            continue;
        }
        rbd_unawait(b, io);
        if (live) {
            b->touching = io;
            rbd_io_answer(io, __atomic_load_n(&io->failed, __ATOMIC_RELAXED)
                                  ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK);
        } else {
            blk_queue_uncount(&b->q);
        }
        rbd_io_release(io);
        n++;
    }
    return n;
}

/* ---- starting a request -------------------------------------------------- */

typedef int (*rbd_submit_fn)(struct rbd_io *io, rbd_completion_t c, uint64_t off,
                             uint64_t len);

/* off is in the data segment: every submit_* adds the segment's offset. */
static uint64_t image_off(const struct rbd_io *io, uint64_t off)
{
    return io->ring->p->data_offset + off;
}

static int submit_read(struct rbd_io *io, rbd_completion_t c, uint64_t off, uint64_t len)
{
    return nitro_rbd_aio_read_bl(io->ring->v->image, image_off(io, off), len, io->bl, c);
}

static int submit_write(struct rbd_io *io, rbd_completion_t c, uint64_t off, uint64_t len)
{
    return rbd_aio_write(io->ring->v->image, image_off(io, off), len, (const char *)io->buf, c);
}

static int submit_flush(struct rbd_io *io, rbd_completion_t c, uint64_t off, uint64_t len)
{
    (void)off;
    (void)len;
    return rbd_aio_flush(io->ring->v->image, c);
}

static int submit_discard(struct rbd_io *io, rbd_completion_t c, uint64_t off, uint64_t len)
{
    return rbd_aio_discard(io->ring->v->image, image_off(io, off), len, c);
}

static int submit_zeroes(struct rbd_io *io, rbd_completion_t c, uint64_t off, uint64_t len)
{
    return rbd_aio_write_zeroes(io->ring->v->image, image_off(io, off), len, c, 0, 0);
}

/* io is about to go to librbd as `calls` aio calls: all counted before
 * the first, so none can complete it early; the ring stays alive for it. */
static void rbd_send(struct rbd_io *io, int calls)
{
    struct rbd_ring *b = io->ring;
    b->touching = NULL;  /* librbd's now, and awaited */
    io->pending = calls;
    __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED);
    rbd_await(b, io);
}

/* One aio call for io (counted by rbd_send). A call librbd refuses counts
 * as a failed completion. */
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
            rbd_io_complete(io);
    }
}

static struct rbd_io *rbd_io_take(struct rbd_ring *b, const struct nitro_chain *c,
                                  const struct blk_req *rq, uint64_t start, int op)
{
    struct rbd_io *io = b->free;
    b->free = io->next;
    b->in_flight++;
    b->touching = io;  /* until sent or released: a write's copy-in reads the guest */
    io->next = NULL;
    io->head = c->head;
    io->resubmitted = c->resubmitted;
    io->start = start;
    /* From the send: time QoS held the request back is not the cluster's. */
    io->deadline = b->p->io_timeout_ns != 0 ? nitro_now_ns() + b->p->io_timeout_ns : 0;
    io->status = rq->status;
    io->d = (struct blk_done){.op = op, .used_len = 1};
    io->copied = false;
    io->state = RBD_IO_SENT;
    io->failed = 0;
    io->pending = 0;
    return io;
}

/* A write's data from the guest into io->buf (encrypted on the way):
 * what librbd sends, again if it resends, is what was there now. */
static bool rbd_copy_in(struct rbd_io *io, const struct blk_req *rq, uint64_t len)
{
    const struct rbd_ring *b = io->ring;
    if (b->p->xts == NULL) {
        nitro_iov_to_buf(rq->rd, rq->n_rd, io->buf, len);
        return true;
    }
    struct iovec *g = rq->rd;
    int gc = rq->n_rd;
    return nitro_xts_iov_buf(b->p->xts, b->lane, io->buf, &g, &gc, len, io->off,
                             true) == NITRO_OK;
}

/* A read or write: a write's data through io->buf, a read's through
 * librbd's buffers (io->bl). False: no memory (or the cipher failed). */
static bool rbd_start_rw(struct rbd_io *io, const struct blk_req *rq)
{
    bool write = io->d.op == NITRO_BLK_OP_OUT;
    uint64_t len = write ? rq->rd_len : rq->wr_len;
    io->off = rq->sector << SECTOR_SHIFT;
    if (write) {
        if (!rbd_buf_get(io, len > 0 ? len : 1) || !rbd_copy_in(io, rq, len))
            return false;
    } else {
        /* librbd's buffers hold the data (the slot keeps its list) */
        if (io->bl == NULL && (io->bl = nitro_rbd_bl_new()) == NULL)
            return false;
        io->giov = malloc((size_t)rq->n_wr * sizeof(struct iovec));
        if (io->giov == NULL && rq->n_wr > 0)
            return false;
        memcpy(io->giov, rq->wr, (size_t)rq->n_wr * sizeof(struct iovec));
        io->gcnt = rq->n_wr;
        io->d.used_len = (uint32_t)len + 1;
    }
    io->d.bytes = len;
    rbd_send(io, 1);
    rbd_submit(io, write ? submit_write : submit_read, io->off, len);
    return true;
}

/* DISCARD / WRITE_ZEROES: one aio call per non-empty segment. *started:
 * io went to librbd (it may even be complete already: do not touch it). */
static uint8_t rbd_start_segments(struct rbd_ring *b, struct rbd_io *io,
                                  const struct blk_req *rq, bool zeroes, bool *started)
{
    struct segment seg[BLK_SEGMENTS_CAP];
    int count = 0;
    uint8_t st = blk_segments(b->p, rq, zeroes, seg, &count);
    if (st != VIRTIO_BLK_S_OK)
        return st;
    int calls = 0;
    for (int i = 0; i < count; i++) {
        calls += seg[i].num_sectors > 0;
        io->d.bytes += (uint64_t)seg[i].num_sectors << SECTOR_SHIFT;
    }
    if (calls == 0)
        return VIRTIO_BLK_S_OK;
    rbd_send(io, calls);
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
        rbd_send(io, 1);
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
    blk_finish(&b->q, c->head, c->resubmitted, rq->status, &d, start);
    b->calls.due = true;  /* not librbd's answer: signalled at once */
}

/* ---- the ring ------------------------------------------------------------ */

/* Call the guest for published answers, or let the call wait (answer
 * moderation); the ring's timer then covers it too. */
static void rbd_ring_signal(struct rbd_ring *b)
{
    blk_calls_signal(&b->calls, b->r.vq, b->in_flight);
    b->r.timer_ns = blk_calls_timer(&b->calls, b->oldest != NULL ? b->oldest->deadline : 0);
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
    uint32_t done = rbd_reap(b, true);
    rbd_expire(b, nitro_now_ns());
    int rc = 0;
    uint32_t popped = 0;
    while (popped < budget && !blk_queue_waiting(&b->q) && rbd_slot(b) != NULL) {
        struct nitro_chain *c;
        struct blk_req rq = {0};  /* set by blk_queue_next; gcc cannot always see it */
        uint64_t start;
        rc = blk_queue_next(&b->q, &c, &rq, &start);
        if (rc <= 0)
            break;
        popped++;
        rbd_start(b, c, &rq, start);
    }
    rbd_ring_signal(b);
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

/* Slots are allocated as requests need them, up to the ring's size. */
static int rbd_ring_attach(struct nitro_ring *r)
{
    struct rbd_ring *b = (struct rbd_ring *)r;
    if (nitro_vq_fault(r->vq) != NITRO_FAULT_NONE)
        return NITRO_ERR_GUEST;
    b->num = nitro_vq_num(r->vq);
    while (b->nslots > b->num && b->free != NULL) {
        struct rbd_io *io = b->free;
        b->free = io->next;
        rbd_io_free(io);
        b->nslots--;
    }
    r->aux_events = EPOLLIN;
    b->calls = (struct blk_calls){0};
    if (b->p->xts != NULL && b->lane == NULL) {
        b->lane = nitro_xts_lane_get(b->p->xts);
        if (b->lane == NULL)
            return NITRO_ERR_NOMEM;
    }
    return NITRO_OK;
}

/* A request QoS held back points into guest memory that may be replaced
 * before the next attach: send it now, over the budget (detaching is
 * rare); a broken ring's is dropped with the ring. */
static void rbd_release_held(struct rbd_ring *b, bool live)
{
    struct nitro_chain *c;
    struct blk_req rq;
    uint64_t start;
    int rc = blk_queue_release_held(&b->q, live && rbd_slot(b) != NULL, &c, &rq, &start);
    if (rc > 0)
        rbd_start(b, c, &rq, start);
    else if (rc < 0)
        b->calls.due = true;
}

/* Being detached (nitro_ring.h, drain): every request the guest awaits
 * is answered first, by librbd or, at the latest, at its deadline (so a
 * cluster that is gone keeps it draining io_timeout at most); what librbd
 * still holds then is orphaned. A broken ring's requests are orphaned at
 * once, unanswered. The worker calls this on its passes, woken by the
 * ring's eventfd (its aux fd) and timer_ns, until nothing is awaited. */
static int rbd_ring_drain(struct nitro_ring *r)
{
    struct rbd_ring *b = (struct rbd_ring *)r;
    bool live = r->status == NITRO_OK;
    if (r->aux_revents) {
        /* Drained before reaping: a completion after the reap writes it again. */
        r->aux_revents = 0;
        nitro_eventfd_drain(b->efd);
    }
    rbd_reap(b, live);
    rbd_release_held(b, live);  /* nothing once the first call sent it */
    if (live) {
        rbd_expire(b, nitro_now_ns());
        blk_calls_flush(&b->calls, r->vq);
        return b->oldest != NULL;
    }
    bool copying = false;
    for (struct rbd_io *io = b->oldest, *next; io != NULL; io = next) {
        next = io->newer;
        if (rbd_orphan(b, io))
            blk_queue_uncount(&b->q);
        else
            copying = true;  /* its completion wakes this drain again */
    }
    if (copying)
        return 1;
    r->timer_ns = 0;
    b->calls = (struct blk_calls){0};
    return 0;
}

/* A fault cut a copy to or from guest memory short (the ring is broken,
 * nothing more is answered): the slot it was for is in no list; let it
 * go. Requests the cut reap had not reached stay on `reaping` for the
 * drain. */
static void rbd_ring_abandon(struct nitro_ring *r)
{
    struct rbd_ring *b = (struct rbd_ring *)r;
    struct rbd_io *io = b->touching;
    b->calls = (struct blk_calls){0};
    if (io != NULL) {
        blk_queue_uncount(&b->q);
        rbd_io_release(io);
    }
}

/* The worker lets go; drain() found nothing awaited. */
static void rbd_ring_detach(struct nitro_ring *r)
{
    struct rbd_ring *b = (struct rbd_ring *)r;
    r->timer_ns = 0;
    nitro_eventfd_drain(b->efd);
    /* Every answer (and decryption) is done: orphans complete unanswered. */
    nitro_xts_lane_put(b->lane);
    b->lane = NULL;
}

static void rbd_io_free_list(struct rbd_io *io)
{
    while (io != NULL) {
        struct rbd_io *next = io->next;
        rbd_io_free(io);
        io = next;
    }
}

static void rbd_ring_destroy(struct rbd_ring *b)
{
    rbd_io_free_list(__atomic_exchange_n(&b->done, NULL, __ATOMIC_ACQUIRE));
    rbd_io_free_list(b->reaping);
    struct rbd_io *io;
    while ((io = b->free) != NULL) {
        b->free = io->next;
        rbd_io_free(io);
    }
    close(b->efd);
    free(b);
}

/* Detached: nothing the guest awaits is left. Orphans librbd still holds
 * keep the ring (its done stack and eventfd) until they complete. */
static void rbd_ring_free(struct nitro_ring *r)
{
    struct rbd_ring *b = (struct rbd_ring *)r;
    blk_queue_forget(&b->q);
    rbd_ring_put(b);
}

static const struct nitro_ring_ops rbd_ring_ops = {
    .poll = rbd_ring_poll,
    .arm = rbd_ring_arm,
    .disarm = nitro_ring_disarm_vq,
    .attach = rbd_ring_attach,
    .detach = rbd_ring_detach,
    .free = rbd_ring_free,
    .drain = rbd_ring_drain,
    .abandon = rbd_ring_abandon,
};

struct nitro_ring *nitro_ring_blk_rbd_new(struct nitro_vq *vq, struct nitro_rbd *v,
                                          const struct nitro_blk_params *params,
                                          struct nitro_blk_stats *stats)
{
    if (vq == NULL || v == NULL || params == NULL || stats == NULL)
        return NULL;
    /* The data segment lies inside the image. */
    if (!blk_params_ok(params) || params->data_offset > v->size ||
        params->capacity > (v->size - params->data_offset) >> SECTOR_SHIFT)
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
    b->refs = 1;
    b->v = v;
    b->p = params;
    b->s = stats;
    b->q = blk_queue_of(&b->r, params, stats);
    return &b->r;
}
