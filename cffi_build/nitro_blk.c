/*
 * nitro_blk.c: virtio-blk request handling (virtio 1.2 section 5.2) with
 * I/O straight between the backing fd and mapped guest memory (encrypted
 * volumes: through the cipher's bounce buffer, see blk_rw_xts), and reads
 * in the page cache copied from a mapping of the image (blk_mapped_read).
 *
 * A request is a chain: a 16-byte virtio_blk_outhdr at the start of the
 * device-readable part (possibly split over descriptors), data, and the
 * status byte as the last byte of the device-writable part. A chain with no
 * room for the header or the status is a guest fault (the queue breaks);
 * everything else completes with a status byte, as the spec requires.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "nitro_blk_internal.h"
#include "nitro_guard.h"
#include "nitro_iov.h"
#include "nitro_qos.h"
#include "nitro_ring.h"
#include "nitro_vring.h"
#include "nitro_xts_internal.h"

const uint64_t nitro_lat_bounds_ns[NITRO_LAT_BUCKETS] = {
    25000,     50000,     100000,     250000,    500000,
    1000000,   2500000,   5000000,    10000000,  25000000,
    50000000,  100000000, 250000000,  1000000000, UINT64_MAX,
};

/* ---- parsing ----------------------------------------------------------- */

/* Does the chain respect the seg_max / size_max the device offered? The
 * header and the status byte are descriptors of their own, or share one
 * with the data (ANY_LAYOUT): they are not data segments. */
static bool blk_within_limits(const struct nitro_blk_params *p,
                              const struct nitro_chain *c)
{
    if (p->seg_max == 0 || p->size_max == 0)
        return true;
    uint64_t data = c->out_len + c->in_len - OUTHDR_LEN - 1;
    return c->n_desc <= (uint64_t)p->seg_max + 2 &&
           c->max_desc_len <= (uint64_t)p->size_max + OUTHDR_LEN + 1 &&
           data <= (uint64_t)p->seg_max * p->size_max;
}

/* struct virtio_blk_outhdr's type and sector, from a copy of it (never
 * from guest memory, which the guest may change between two reads). */
static void blk_hdr_decode(const uint8_t hdr[OUTHDR_LEN], uint32_t *type, uint64_t *sector)
{
    uint32_t t;
    uint64_t s;
    memcpy(&t, hdr, sizeof(t));
    memcpy(&s, hdr + 8, sizeof(s));
    *type = le32toh(t);
    *sector = le64toh(s);
}

int blk_parse(struct nitro_vq *vq, const struct nitro_blk_params *p,
              struct nitro_chain *c, struct blk_req *rq)
{
    /* Without a header we cannot know the request; without a status byte
     * we cannot complete it. Either way the driver is broken. */
    if (c->out_len < OUTHDR_LEN || c->in_len < 1)
        return nitro_vq_set_fault(vq, NITRO_FAULT_REQUEST);
    uint8_t hdr[OUTHDR_LEN];
    nitro_iov_to_buf(c->iov, (int)c->n_out, hdr, sizeof(hdr));
    blk_hdr_decode(hdr, &rq->type, &rq->sector);
    rq->oversize = !blk_within_limits(p, c);

    rq->rd = c->iov;
    rq->n_rd = (int)c->n_out;
    nitro_iov_advance(&rq->rd, &rq->n_rd, OUTHDR_LEN);
    rq->rd_len = c->out_len - OUTHDR_LEN;

    /* Every iovec is non-empty, so the status is the last byte of the last
     * one; trimming it leaves the data part. */
    rq->wr = c->iov + c->n_out;
    rq->n_wr = (int)c->n_in;
    struct iovec *last = &rq->wr[rq->n_wr - 1];
    rq->status = (uint8_t *)last->iov_base + last->iov_len - 1;
    if (--last->iov_len == 0)
        rq->n_wr--;
    rq->wr_len = c->in_len - 1;
    return NITRO_OK;
}

/* Is [sector, sector + len bytes) whole logical blocks inside the disk?
 * The one alignment check: on an encrypted volume a logical block is a
 * whole number of encryption sectors (blk_params_ok), so the cipher never
 * sees a partial one. Written so nothing overflows; blk_params_ok made every
 * byte offset inside the disk, plus data_offset, fit off_t. */
bool blk_range_ok(const struct nitro_blk_params *p, uint64_t sector,
                  uint64_t len)
{
    /* sector << 9 may wrap, but only its low bits matter here. */
    if (((sector << SECTOR_SHIFT) | len) & (p->block_size - 1))
        return false;
    uint64_t nsec = len >> SECTOR_SHIFT;
    return sector <= p->capacity && nsec <= p->capacity - sector;
}

/* ---- I/O --------------------------------------------------------------- */

/* Move every byte of iov at file offset off, looping over short transfers
 * and IOV_MAX. A read at EOF zero-fills the rest: a file shorter than the
 * capacity is a sparse tail. Returns 0 or -errno. */
static int blk_rw(int fd, struct iovec *iov, int cnt, uint64_t off, bool write)
{
    while (cnt > 0) {
        int batch = cnt < IOV_MAX ? cnt : IOV_MAX;
        ssize_t n = write ? pwritev(fd, iov, batch, (off_t)off)
                          : preadv(fd, iov, batch, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0 && write)
            return -EIO;  /* no progress: do not spin */
        if (n == 0) {
            nitro_iov_zero(iov, cnt);
            return 0;
        }
        off += (uint64_t)n;
        nitro_iov_advance(&iov, &cnt, (uint64_t)n);
    }
    return 0;
}

/* Read or write all of buf at off; a read past EOF zero-fills. 0 or -errno. */
static int blk_rw_buf(int fd, uint8_t *buf, uint64_t len, uint64_t off,
                      bool write)
{
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    return blk_rw(fd, &iov, 1, off, write);
}

/* Encrypted I/O: NITRO_XTS_BOUNCE bytes at a time through the lane's bounce
 * buffer, which holds only ciphertext. Writes encrypt guest plaintext into
 * it, then pwrite; reads pread into it, then decrypt out of place into
 * guest memory. Never decrypt in guest memory: the guest could replace the
 * ciphertext between the read and the decryption and have any ciphertext
 * of its choosing decrypted. `off` is the byte offset in the data segment,
 * which is also what the IVs count from; blk_range_ok checked alignment. */
static int blk_rw_xts(const struct nitro_blk_params *p,
                      struct nitro_xts_lane *lane, struct iovec *iov, int cnt,
                      uint64_t off, uint64_t len, bool write)
{
    uint8_t *bounce = nitro_xts_lane_bounce(lane);
    while (len > 0) {
        uint64_t n = len < NITRO_XTS_BOUNCE ? len : NITRO_XTS_BOUNCE;
        uint64_t pos = p->data_offset + off;
        int rc;
        if (write) {
            rc = nitro_xts_iov(p->xts, lane, &iov, &cnt, n, off, true);
            if (rc == 0)
                rc = blk_rw_buf(p->fd, bounce, n, pos, true);
        } else {
            rc = blk_rw_buf(p->fd, bounce, n, pos, false);
            if (rc == 0)
                rc = nitro_xts_iov(p->xts, lane, &iov, &cnt, n, off, false);
        }
        if (rc != 0)
            return rc;
        off += n;
        len -= n;
    }
    return 0;
}

/* Move a request's payload: plain straight to/from guest memory, or
 * through the cipher. `sector` is in 512-byte units. */
static int blk_payload(const struct nitro_blk_params *p,
                       struct nitro_xts_lane *lane, struct iovec *iov, int cnt,
                       uint64_t sector, uint64_t len, bool write)
{
    uint64_t off = sector << SECTOR_SHIFT;
    if (p->xts != NULL)
        return blk_rw_xts(p, lane, iov, cnt, off, len, write);
    return blk_rw(p->fd, iov, cnt, p->data_offset + off, write);
}

static int blk_fallocate(int fd, int mode, uint64_t off, uint64_t len)
{
    int rc;
    do
        rc = fallocate(fd, mode, (off_t)off, (off_t)len);
    while (rc < 0 && errno == EINTR);
    return rc < 0 ? -errno : 0;
}

/* Write zeros by hand, for files whose filesystem cannot zero a range. */
static int blk_write_zeros(int fd, uint64_t off, uint64_t len)
{
    static const uint8_t zeros[64 * 1024];
    struct iovec iov[16];
    while (len > 0) {
        int cnt = 0;
        uint64_t chunk = 0;
        for (; cnt < 16 && chunk < len; cnt++) {
            uint64_t n = len - chunk < sizeof(zeros) ? len - chunk : sizeof(zeros);
            iov[cnt] = (struct iovec){.iov_base = (void *)zeros, .iov_len = n};
            chunk += n;
        }
        int rc = blk_rw(fd, iov, cnt, off, true);
        if (rc < 0)
            return rc;
        off += chunk;
        len -= chunk;
    }
    return 0;
}

static bool unsupported(int err)
{
    return err == -EOPNOTSUPP || err == -ENOSYS;
}

/* 5.2.6.2: after WRITE_ZEROES reads return zeros; UNMAP allows doing it by
 * deallocating. Try the cheapest way the backing file supports. */
static int blk_zero_range(int fd, uint64_t off, uint64_t len, bool unmap)
{
    int rc = -EOPNOTSUPP;
    if (unmap)
        rc = blk_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           off, len);
    if (unsupported(rc))
        rc = blk_fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                           off, len);
    if (unsupported(rc))
        rc = blk_write_zeros(fd, off, len);
    return rc;
}

/* ---- operations -------------------------------------------------------- */

/* A read every path may serve: within seg_max/size_max, used_len's 32 bits
 * (a chain is capped at 2^32 bytes, 2.7.5.2) and the disk. */
static bool blk_read_ok(const struct nitro_blk_params *p, const struct blk_req *rq)
{
    return !rq->oversize && rq->wr_len < UINT32_MAX &&
           blk_range_ok(p, rq->sector, rq->wr_len);
}

static uint8_t blk_in(const struct nitro_blk_params *p,
                      struct nitro_xts_lane *lane, struct blk_req *rq,
                      struct blk_done *d)
{
    if (!blk_read_ok(p, rq))
        return VIRTIO_BLK_S_IOERR;
    if (blk_payload(p, lane, rq->wr, rq->n_wr, rq->sector, rq->wr_len, false) < 0)
        return VIRTIO_BLK_S_IOERR;
    d->bytes = rq->wr_len;
    d->used_len = (uint32_t)rq->wr_len + 1;
    return VIRTIO_BLK_S_OK;
}

static uint8_t blk_out(const struct nitro_blk_params *p,
                       struct nitro_xts_lane *lane, struct blk_req *rq,
                       struct blk_done *d)
{
    if (rq->oversize || p->readonly || !blk_range_ok(p, rq->sector, rq->rd_len))
        return VIRTIO_BLK_S_IOERR;
    if (blk_payload(p, lane, rq->rd, rq->n_rd, rq->sector, rq->rd_len, true) < 0)
        return VIRTIO_BLK_S_IOERR;
    d->bytes = rq->rd_len;
    return VIRTIO_BLK_S_OK;
}

static uint8_t blk_flush(const struct nitro_blk_params *p)
{
    int rc;
    do
        rc = fdatasync(p->fd);
    while (rc < 0 && errno == EINTR);
    return rc < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
}

uint8_t blk_get_id(const struct nitro_blk_params *p, struct blk_req *rq,
                   struct blk_done *d)
{
    size_t n = rq->wr_len < VIRTIO_BLK_ID_BYTES ? rq->wr_len
                                                : VIRTIO_BLK_ID_BYTES;
    d->bytes = nitro_buf_to_iov(rq->wr, rq->n_wr, p->serial, n);
    d->used_len = (uint32_t)d->bytes + 1;
    return VIRTIO_BLK_S_OK;
}

/* Copy all segments out of guest memory once and check every one before
 * touching the disk (parse, then act). Returns a VIRTIO_BLK_S_* status. */
uint8_t blk_segments(const struct nitro_blk_params *p,
                     const struct blk_req *rq, bool zeroes,
                     struct segment *seg, int *count)
{
    /* A zero limit means the feature is not offered to the driver (an
     * encrypted volume offers neither: the control plane's decision). */
    if ((zeroes ? p->max_write_zeroes_sectors : p->max_discard_sectors) == 0)
        return VIRTIO_BLK_S_UNSUPP;
    if (p->readonly)
        return VIRTIO_BLK_S_IOERR;
    if (rq->rd_len == 0 || rq->rd_len % SEGMENT_LEN != 0 ||
        rq->rd_len / SEGMENT_LEN > MAX_SEGMENTS)
        return VIRTIO_BLK_S_IOERR;
    uint8_t raw[BLK_SEGMENTS_CAP * SEGMENT_LEN];
    nitro_iov_to_buf(rq->rd, rq->n_rd, raw, rq->rd_len);
    *count = (int)(rq->rd_len / SEGMENT_LEN);
    uint32_t max = zeroes ? p->max_write_zeroes_sectors : p->max_discard_sectors;
    for (int i = 0; i < *count; i++) {
        const uint8_t *r = raw + i * SEGMENT_LEN;
        memcpy(&seg[i].sector, r, 8);
        memcpy(&seg[i].num_sectors, r + 8, 4);
        memcpy(&seg[i].flags, r + 12, 4);
        seg[i].sector = le64toh(seg[i].sector);
        seg[i].num_sectors = le32toh(seg[i].num_sectors);
        seg[i].flags = le32toh(seg[i].flags);
        /* 5.2.6.2: unknown flags, or UNMAP on a discard, are UNSUPP. */
        if ((seg[i].flags & ~VIRTIO_BLK_WZ_FLAG_UNMAP) ||
            (!zeroes && seg[i].flags))
            return VIRTIO_BLK_S_UNSUPP;
        if (seg[i].num_sectors > max ||
            !blk_range_ok(p, seg[i].sector,
                          (uint64_t)seg[i].num_sectors << SECTOR_SHIFT))
            return VIRTIO_BLK_S_IOERR;
    }
    return VIRTIO_BLK_S_OK;
}

static uint8_t blk_discard_zeroes(const struct nitro_blk_params *p,
                                  const struct blk_req *rq, bool zeroes,
                                  struct blk_done *d)
{
    struct segment seg[BLK_SEGMENTS_CAP];
    int count = 0;
    uint8_t st = blk_segments(p, rq, zeroes, seg, &count);
    if (st != VIRTIO_BLK_S_OK)
        return st;
    for (int i = 0; i < count; i++) {
        uint64_t off = p->data_offset + (seg[i].sector << SECTOR_SHIFT);
        uint64_t len = (uint64_t)seg[i].num_sectors << SECTOR_SHIFT;
        int rc = 0;
        if (len == 0)
            continue;
        if (zeroes)
            rc = blk_zero_range(p->fd, off, len,
                                seg[i].flags & VIRTIO_BLK_WZ_FLAG_UNMAP);
        else
            rc = blk_fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                               off, len);
        /* Discard is advisory ("MAY deallocate"): unsupported is fine. */
        if (rc < 0 && !(!zeroes && unsupported(rc)))
            return VIRTIO_BLK_S_IOERR;
        d->bytes += len;
    }
    return VIRTIO_BLK_S_OK;
}

static void blk_execute(const struct nitro_blk_params *p,
                        struct nitro_xts_lane *lane, struct blk_req *rq,
                        struct blk_done *d)
{
    switch (rq->type) {
    case VIRTIO_BLK_T_IN:
        d->op = NITRO_BLK_OP_IN;
        d->status = blk_in(p, lane, rq, d);
        break;
    case VIRTIO_BLK_T_OUT:
        d->op = NITRO_BLK_OP_OUT;
        d->status = blk_out(p, lane, rq, d);
        break;
    case VIRTIO_BLK_T_FLUSH:
        d->op = NITRO_BLK_OP_FLUSH;
        d->status = blk_flush(p);
        break;
    case VIRTIO_BLK_T_GET_ID:
        d->op = NITRO_BLK_OP_GET_ID;
        d->status = blk_get_id(p, rq, d);
        break;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
        bool zeroes = rq->type == VIRTIO_BLK_T_WRITE_ZEROES;
        d->op = zeroes ? NITRO_BLK_OP_WRITE_ZEROES : NITRO_BLK_OP_DISCARD;
        d->status = blk_discard_zeroes(p, rq, zeroes, d);
        break;
    }
    default:
        d->op = NITRO_BLK_OP_UNSUPPORTED;
        d->status = VIRTIO_BLK_S_UNSUPP;
    }
}

/* ---- accounting -------------------------------------------------------- */

static void blk_account(struct nitro_blk_stats *s, const struct blk_done *d,
                        uint64_t ns)
{
    nitro_stat_add(&s->requests[d->op], 1);
    nitro_stat_add(&s->bytes[d->op], d->bytes);
    if (d->status != VIRTIO_BLK_S_OK)
        nitro_stat_add(&s->errors[d->op], 1);
    int b = 0;
    while (ns > nitro_lat_bounds_ns[b])  /* the last bound is UINT64_MAX */
        b++;
    nitro_stat_add(&s->latency_buckets[d->op][b], 1);
    nitro_stat_add(&s->latency_sum_ns[d->op], ns);
}

/* ---- synchronous requests ------------------------------------------------ */

/* Write the status byte, complete the chain, account. */
void blk_finish(struct blk_queue *q, uint16_t head, bool resubmitted,
                uint8_t *status, const struct blk_done *done, uint64_t start)
{
    struct nitro_blk_stats *s = q->s;
    struct blk_done failed;
    const struct blk_done *d = done;
    if (done->status != VIRTIO_BLK_S_OK) {
        /* A failed request delivered nothing but the status byte. */
        failed = (struct blk_done){.op = done->op, .status = done->status,
                                   .used_len = 1};
        d = &failed;
    }
    /* Guest memory: one untorn store. nitro_vq_push() orders it before
     * the used->idx update. */
    __atomic_store_n(status, d->status, __ATOMIC_RELAXED);
    nitro_vq_push(q->r->vq, head, d->used_len);
    blk_queue_uncount(q);
    if (resubmitted)
        nitro_stat_add(&s->resubmitted, 1);
    uint64_t now = nitro_batch_now();
    blk_account(s, d, now > start ? now - start : 0);
}

/* Serve one request on the calling thread; returns the bytes it moved. */
uint64_t blk_handle_sync(struct blk_queue *q, struct nitro_chain *c,
                         struct nitro_xts_lane *lane, struct blk_req *rq,
                         uint64_t start)
{
    struct blk_done d = {.status = VIRTIO_BLK_S_IOERR, .used_len = 1};
    blk_execute(q->p, lane, rq, &d);
    nitro_batch_refresh();  /* its I/O took time: the answer's, the next pop's */
    blk_finish(q, c->head, c->resubmitted, rq->status, &d, start);
    return d.status == VIRTIO_BLK_S_OK ? d.bytes : 0;
}

int blk_pop_request(struct blk_queue *q, struct nitro_chain **c,
                    struct blk_req *rq, uint64_t *start)
{
    struct nitro_vq *vq = q->r->vq;
    int rc = nitro_vq_pop(vq, c);
    if (rc <= 0)
        return rc;
    *start = nitro_batch_now();
    /* Counted before the parse reads guest memory: a fault there leaves
     * it in q->counted, for blk_queue_forget. */
    q->counted++;
    nitro_stat_add(&q->s->inflight, 1);
    if (blk_parse(vq, q->p, *c, rq) != NITRO_OK) {
        blk_queue_uncount(q);
        return NITRO_ERR_GUEST;
    }
    return 1;
}

/* ---- the engine's blk ring: many requests in flight through io_uring ----- */

/* Bytes of synchronous I/O after which a pass over the ring ends early:
 * the worker then serves its other rings and its commands (a detach)
 * before this ring's next request, so a guest queueing many large writes
 * (served inline), encrypted or >IOV_MAX requests holds the worker for
 * one such batch (milliseconds), not for its whole ring. */
#define SYNC_PASS_BYTES (8u << 20)
/* Within such a pass, the guest is called after every SYNC_CALL_BYTES of
 * synchronous I/O, so it refills its ring while the worker writes on
 * instead of waiting for the whole pass (the early completions of the
 * io_uring path, below, for writes served inline). Measured on tmpfs,
 * 4 KiB random writes at QD32: plain 375-385k -> 624-626k IOPS, LUKS2
 * 318-334k -> 411-414k. */
#define SYNC_CALL_BYTES (64u << 10)

/* Bytes of io_uring I/O after which a pass over the ring ends early, so
 * the worker submits them (a cached read is copied within the submit),
 * and the next pass tells the guest they are done before it takes more:
 * the frontend handles the first completions while the worker copies the
 * rest, instead of the two taking turns over a whole queue's worth (the
 * switch's early batches, docs/performance.md). 64 KiB: sixteen 4 KiB
 * requests or one 128 KiB request a pass. Measured with bench.blk on an
 * idle machine, alternated with qsd: 4 KiB randread 1.40-1.44x qsd without
 * it, 1.79-2.01x with it; 128 KiB reads 0.92-0.97x -> 0.99-1.26x. */
#define ASYNC_PASS_BYTES (64u << 10)

/* An encrypted request needs a ciphertext buffer of its size while in
 * flight; above this it is served synchronously through the lane's. */
#define ASYNC_MAX_CRYPT_BYTES (1u << 20)
#define INLINE_IOV 8
/* Ciphertext buffers stay with their request slot for the next request, up
 * to this many bytes per ring: a buffer malloc'd and freed per request came
 * back from the kernel every time (glibc returns large blocks with munmap
 * or MADV_DONTNEED), so each 128 KiB read took 32 page faults, zeroing and
 * memcg charging, on the io_uring worker that copies into it. They only
 * ever hold ciphertext, so keeping them is safe. */
#define BOUNCE_KEEP_BYTES (4u << 20)

enum blk_io_kind { IO_READ, IO_FLUSH };

struct blk_ring;

/* One request in flight. */
struct blk_io {
    struct nitro_io_op op;      /* user_data of its SQEs */
    struct blk_ring *ring;
    struct blk_io *next_free;
    enum blk_io_kind kind;
    uint16_t head;
    bool resubmitted;
    uint64_t start;
    uint8_t *status;
    struct blk_done d;
    /* The guest buffers (a copy of the chain's iovecs: the chain is reused
     * by the next pop) and the transfer cursor over them or the bounce. */
    struct iovec inline_iov[INLINE_IOV];
    struct iovec *giov;
    int gcnt;
    struct iovec *iov;          /* what the next SQE moves */
    int cnt;
    struct iovec bounce_iov;
    uint8_t *bounce;            /* ciphertext only (NULL: plain volume) */
    size_t bounce_cap;          /* its size; it outlives the request */
    uint64_t off;               /* byte offset in the data segment (IVs) */
    uint64_t pos;               /* file offset of the next SQE */
    uint64_t left;              /* bytes the next SQE still has to move */
};

struct blk_ring {
    struct nitro_ring r;
    const struct nitro_blk_params *p;
    struct nitro_blk_stats *s;
    struct nitro_xts_lane *lane;
    struct nitro_io *io;        /* the owner's, set by each poll */
    struct blk_io *ios;
    uint32_t nios;
    struct blk_io *free;
    size_t bounce_bytes;        /* held by all slots, see BOUNCE_KEEP_BYTES */
    uint32_t in_flight;
    bool notify;                /* completions since the last call */
    uint32_t mapped_bytes;      /* copied since the clock was read (blk_mapped_refresh) */
    struct blk_resident *resident;  /* mincore's answers (blk_resident_new), or NULL */
    uint32_t resident_slots;        /* a power of two */
    struct blk_queue q;         /* the next request, through QoS */
};

static void blk_bounce_free(struct blk_ring *b, struct blk_io *io)
{
    free(io->bounce);
    b->bounce_bytes -= io->bounce_cap;
    io->bounce = NULL;
    io->bounce_cap = 0;
}

/* io->bounce = a buffer of at least len bytes, the slot's own if it fits. */
static bool blk_bounce_get(struct blk_ring *b, struct blk_io *io, size_t len)
{
    if (io->bounce_cap >= len)
        return true;
    blk_bounce_free(b, io);
    io->bounce = malloc(len);
    if (io->bounce == NULL)
        return false;
    io->bounce_cap = len;
    b->bounce_bytes += len;
    return true;
}

static void blk_io_release(struct blk_io *io)
{
    struct blk_ring *b = io->ring;
    if (io->giov != io->inline_iov)
        free(io->giov);
    io->giov = NULL;
    if (b->bounce_bytes > BOUNCE_KEEP_BYTES)
        blk_bounce_free(b, io);
    io->next_free = b->free;
    b->free = io;
    b->in_flight--;
}

static void blk_io_finish(struct blk_io *io, uint8_t status)
{
    struct blk_ring *b = io->ring;
    io->d.status = status;
    blk_finish(&b->q, io->head, io->resubmitted, io->status, &io->d, io->start);
    b->notify = true;
    blk_io_release(io);
}

/* Queue the SQE that moves what is left; false if no SQE could be had. */
static bool blk_io_queue(struct blk_io *io)
{
    struct io_uring_sqe *sqe = nitro_io_sqe(io->ring->io);
    if (sqe == NULL)
        return false;
    int fd = io->ring->p->fd;
    if (io->kind == IO_FLUSH)
        io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    else
        io_uring_prep_readv(sqe, fd, io->iov, (unsigned)io->cnt, io->pos);
    io_uring_sqe_set_data(sqe, &io->op);
    return true;
}

/* The transfer is done: decrypt a read out of the bounce into the guest. */
static uint8_t blk_io_done(struct blk_io *io)
{
    struct blk_ring *b = io->ring;
    if (io->kind != IO_READ || b->p->xts == NULL)
        return VIRTIO_BLK_S_OK;
    struct iovec *g = io->giov;
    int gc = io->gcnt;
    int rc = nitro_xts_iov_buf(b->p->xts, b->lane, io->bounce, &g, &gc,
                               io->d.bytes, io->off, false);
    return rc == NITRO_OK ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
}

static void blk_io_complete(struct nitro_io_op *op, int32_t res)
{
    struct blk_io *io = (struct blk_io *)op;
    if (res == -EINTR || res == -EAGAIN) {
        if (!blk_io_queue(io))
            blk_io_finish(io, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (io->kind == IO_FLUSH || res < 0) {
        blk_io_finish(io, res < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK);
        return;
    }
    if (res == 0) {
        /* EOF: a file shorter than the capacity is a sparse tail. */
        nitro_iov_zero(io->iov, io->cnt);
        io->left = 0;
    } else {
        io->left -= (uint64_t)res;
        io->pos += (uint64_t)res;
        nitro_iov_advance(&io->iov, &io->cnt, (uint64_t)res);
    }
    if (io->left > 0) {
        /* A short transfer (a signal, or a page-cache boundary): the rest. */
        if (!blk_io_queue(io))
            blk_io_finish(io, VIRTIO_BLK_S_IOERR);
        return;
    }
    blk_io_finish(io, blk_io_done(io));
}

/* Can this request be put in flight? Reads and flushes are. Writes are
 * done on the worker itself (pwritev): the 6.1 kernels this runs on cannot
 * do a buffered ext4 or tmpfs write without blocking (no IOCB_NOWAIT), so
 * io_uring hands every one to an io-wq thread, and io-wq serialises writes
 * to one file behind a single thread: measured 0.6x of qemu-storage-daemon
 * that way, against 1.1-1.4x inline (docs/performance.md). Everything else
 * (errors, GET_ID, DISCARD, WRITE_ZEROES, huge encrypted or >IOV_MAX
 * transfers) is rare or cheap, and synchronous too. */
static bool blk_async_ok(const struct blk_ring *b, const struct blk_req *rq)
{
    const struct nitro_blk_params *p = b->p;
    if (rq->type == VIRTIO_BLK_T_FLUSH)
        return true;
    if (rq->type != VIRTIO_BLK_T_IN)
        return false;
    uint64_t len = rq->wr_len;
    if (len == 0 || rq->n_wr > IOV_MAX || !blk_read_ok(p, rq))
        return false;
    return p->xts == NULL || len <= ASYNC_MAX_CRYPT_BYTES;
}

static bool blk_io_setup_iov(struct blk_io *io, const struct iovec *iov, int cnt)
{
    io->giov = io->inline_iov;
    if (cnt > INLINE_IOV) {
        io->giov = malloc((size_t)cnt * sizeof(*iov));
        if (io->giov == NULL)
            return false;
    }
    memcpy(io->giov, iov, (size_t)cnt * sizeof(*iov));
    io->gcnt = cnt;
    io->iov = io->giov;
    io->cnt = cnt;
    return true;
}

/* Fill io for a read; an encrypted one reads into its own ciphertext
 * buffer and is decrypted out of it on completion. */
static bool blk_io_setup_read(struct blk_ring *b, struct blk_io *io,
                              const struct blk_req *rq)
{
    const struct nitro_blk_params *p = b->p;
    io->kind = IO_READ;
    io->d.op = NITRO_BLK_OP_IN;
    io->d.bytes = rq->wr_len;
    io->d.used_len = (uint32_t)rq->wr_len + 1;
    io->off = rq->sector << SECTOR_SHIFT;
    io->pos = p->data_offset + io->off;
    io->left = io->d.bytes;
    if (!blk_io_setup_iov(io, rq->wr, rq->n_wr))
        return false;
    if (p->xts == NULL)
        return true;
    if (!blk_bounce_get(b, io, io->d.bytes))
        return false;
    io->bounce_iov = (struct iovec){.iov_base = io->bounce,
                                    .iov_len = io->d.bytes};
    io->iov = &io->bounce_iov;
    io->cnt = 1;
    return true;
}

/* Start one parsed request in flight; false: serve it synchronously. */
static bool blk_start_async(struct blk_ring *b, struct nitro_chain *c,
                            struct blk_req *rq, uint64_t start)
{
    struct blk_io *io = b->free;
    b->free = io->next_free;
    b->in_flight++;
    uint8_t *bounce = io->bounce;  /* the slot keeps its buffer */
    size_t bounce_cap = io->bounce_cap;
    *io = (struct blk_io){.op.complete = blk_io_complete, .ring = b,
                          .head = c->head, .resubmitted = c->resubmitted,
                          .start = start, .status = rq->status,
                          .bounce = bounce, .bounce_cap = bounce_cap};
    bool ok;
    if (rq->type == VIRTIO_BLK_T_FLUSH) {
        io->kind = IO_FLUSH;
        io->d.op = NITRO_BLK_OP_FLUSH;
        io->d.used_len = 1;
        io->giov = io->inline_iov;
        ok = true;
    } else {
        ok = blk_io_setup_read(b, io, rq);
    }
    if (ok && blk_io_queue(io))
        return true;
    blk_io_release(io);
    return false;
}

/* ---- reads and writes through the image's mapping ------------------------ */

/* Larger requests take the other paths: one copy of more would hold the
 * worker's other rings too long. */
#define MAPPED_MAX (1u << 20)
#define MAPPED_PAGE 4096u

int nitro_blk_map_image(struct nitro_blk_params *p)
{
    if (p == NULL || p->fd < 0 || p->image_map != NULL || sysconf(_SC_PAGESIZE) != MAPPED_PAGE)
        return NITRO_ERR_ARG;
    struct stat st;
    if (fstat(p->fd, &st) < 0)
        return NITRO_ERR_SYS;
    uint64_t end = p->data_offset + (p->capacity << SECTOR_SHIFT);
    uint64_t len = (uint64_t)st.st_size < end ? (uint64_t)st.st_size : end;
    if (len == 0)
        return NITRO_OK;
    /* Read-write where the fd allows it (EACCES: opened read-only). */
    void *m = p->readonly ? MAP_FAILED
                          : mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, p->fd, 0);
    p->image_map_writable = m != MAP_FAILED;
    if (m == MAP_FAILED)
        m = mmap(NULL, len, PROT_READ, MAP_SHARED, p->fd, 0);
    if (m == MAP_FAILED)
        return NITRO_ERR_SYS;
    p->image_map = m;
    p->image_map_len = len;
    return NITRO_OK;
}

void nitro_blk_unmap_image(struct nitro_blk_params *p)
{
    if (p != NULL && p->image_map != NULL) {
        munmap((void *)p->image_map, p->image_map_len);
        p->image_map = NULL;
        p->image_map_len = 0;
        p->image_map_writable = 0;
    }
}

/* mincore's answers, kept a short while. One mincore call per request
 * was 7 % of a worker serving 4 KiB reads from the page cache (the system
 * call, the VMA lookup, the page-table walk); one per span of 64 pages,
 * kept about RESIDENT_TTL, costs a fraction of that. The price: a page
 * evicted within that time after the check is faulted in on the worker
 * (a disk read, as a synchronous pread on the worker would be), and a
 * span found not all resident is looked at again only after its time
 * (meanwhile its I/O takes the other paths: correct, only slower; the
 * ring's own writes through them forget their spans at once). Each ring
 * keeps its own table, direct-mapped by span number, sized to the image
 * up to RESIDENT_SLOTS_MAX (128 KiB: a 2 GiB image's every span). */
#define RESIDENT_SPAN_PAGES 64u   /* one uint64_t of answers */
#define RESIDENT_SPAN_BYTES ((uint64_t)RESIDENT_SPAN_PAGES * MAPPED_PAGE)
#define RESIDENT_SLOTS_MAX 8192u
#define RESIDENT_TICK_SHIFT 20    /* the table's clock: ns >> 20, about 1 ms */
#define RESIDENT_TTL 48u          /* ticks: about 50 ms */

struct blk_resident {
    uint32_t span;     /* span number + 1; 0: empty */
    uint32_t at;       /* when mincore said so, in ticks (wraps: compared by difference) */
    uint64_t pages;    /* bit i: page i of the span is in the page cache */
};

/* The table for a ring of a mapping of map_len bytes; NULL: none (no
 * memory, or a mapping too long for 32-bit span numbers). */
static struct blk_resident *blk_resident_new(uint64_t map_len, uint32_t *slots)
{
    uint64_t spans = (map_len + RESIDENT_SPAN_BYTES - 1) / RESIDENT_SPAN_BYTES;
    if (spans >= UINT32_MAX)
        return NULL;
    uint32_t n = 1;
    while (n < spans && n < RESIDENT_SLOTS_MAX)
        n <<= 1;
    *slots = n;
    return calloc(n, sizeof(struct blk_resident));
}

/* The answers for span `span` of the mapping. */
static uint64_t blk_span_resident(struct blk_ring *b, uint64_t span, uint32_t now)
{
    const struct nitro_blk_params *p = b->p;
    struct blk_resident *e = &b->resident[span & (b->resident_slots - 1)];
    if (e->span == span + 1 && now - e->at < RESIDENT_TTL)
        return e->pages;
    uint64_t start = span * RESIDENT_SPAN_BYTES;
    uint64_t len = p->image_map_len - start < RESIDENT_SPAN_BYTES
                       ? p->image_map_len - start : RESIDENT_SPAN_BYTES;
    unsigned char vec[RESIDENT_SPAN_PAGES];
    uint64_t pages = 0;
    if (mincore((void *)(p->image_map + start), len, vec) == 0)
        for (uint64_t i = 0; i < (len + MAPPED_PAGE - 1) / MAPPED_PAGE; i++)
            pages |= (uint64_t)(vec[i] & 1) << i;
    *e = (struct blk_resident){.span = (uint32_t)(span + 1), .at = now, .pages = pages};
    return pages;
}

/* After a write, discard or zeroing the other paths made: what the cache
 * says of its pages may be wrong now (a hole a pwrite filled, pages a
 * discard dropped), so it asks mincore again. */
static void blk_resident_forget(struct blk_ring *b, const struct blk_req *rq)
{
    if (b->resident == NULL)
        return;
    if (rq->type == VIRTIO_BLK_T_DISCARD || rq->type == VIRTIO_BLK_T_WRITE_ZEROES) {
        memset(b->resident, 0, b->resident_slots * sizeof(*b->resident));  /* rare */
        return;
    }
    if (rq->type != VIRTIO_BLK_T_OUT || rq->rd_len == 0 ||
        !blk_range_ok(b->p, rq->sector, rq->rd_len))
        return;  /* nothing written */
    uint64_t pos = b->p->data_offset + (rq->sector << SECTOR_SHIFT);
    uint64_t last = (pos + rq->rd_len - 1) / RESIDENT_SPAN_BYTES;
    for (uint64_t span = pos / RESIDENT_SPAN_BYTES; span <= last; span++) {
        struct blk_resident *e = &b->resident[span & (b->resident_slots - 1)];
        if (e->span == span + 1)
            e->span = 0;
    }
}

/* Is [pos, pos + len) of the mapping all in the page cache? A page that is
 * not would fault in from the disk on the worker, holding its other rings
 * (a write to it, too: the rest of its page is read first). */
static bool blk_mapped_resident(struct blk_ring *b, uint64_t pos, uint64_t len)
{
    uint32_t now = (uint32_t)(nitro_batch_now() >> RESIDENT_TICK_SHIFT);
    uint64_t first = pos / MAPPED_PAGE, last = (pos + len - 1) / MAPPED_PAGE;
    for (uint64_t page = first; page <= last;) {
        uint64_t span = page / RESIDENT_SPAN_PAGES, bit = page % RESIDENT_SPAN_PAGES;
        uint64_t n = RESIDENT_SPAN_PAGES - bit;  /* pages of the range in this span */
        if (n > last - page + 1)
            n = last - page + 1;
        uint64_t want = (n == 64 ? ~0ull : ((1ull << n) - 1)) << bit;
        if ((blk_span_resident(b, span, now) & want) != want)
            return false;
        page += n;
    }
    return true;
}

/* Where the mapping holds volume bytes [off, off + len), if it may serve
 * them: inside the mapping, at most MAPPED_MAX, every page in the page
 * cache. NULL: not such a range. The caller checked the range against
 * the volume (blk_range_ok), so no sum here overflows. */
static uint8_t *blk_mapped_at(struct blk_ring *b, uint64_t off, uint64_t len)
{
    const struct nitro_blk_params *p = b->p;
    uint64_t pos = p->data_offset + off;
    if (b->resident == NULL || len == 0 || len > MAPPED_MAX || pos + len > p->image_map_len ||
        !blk_mapped_resident(b, pos, len))
        return NULL;
    return (uint8_t *)p->image_map + pos;
}

/* May writes go through the mapping? Not on a read-only volume, nor
 * when the image could only be mapped read-only. */
static bool blk_map_writable(const struct nitro_blk_params *p)
{
    return p->image_map_writable && !p->readonly;
}

static bool blk_map_covers(const void *ctx, const void *addr)
{
    const struct nitro_blk_params *p = ctx;
    uintptr_t a = (uintptr_t)addr, m = (uintptr_t)p->image_map;
    return p->image_map != NULL && a >= m && a - m < p->image_map_len;
}

/* Copy a request's payload between guest memory and the mapping at map:
 * plain, or through the cipher (the mapping is the ciphertext side, so
 * ciphertext never enters the guest). A fault in the mapping (the image
 * shrank after mincore looked, a full filesystem refusing a block to a
 * written page, a memory error) fails this request with IOERR, as the
 * same error from pread or pwrite would, and the ring serves on. A fault
 * in guest memory is the ring's guard's to handle. */
static uint8_t blk_mapped_copy(struct blk_ring *b, uint8_t *map, struct iovec *iov,
                               int cnt, uint64_t off, uint64_t len, bool write)
{
    const struct nitro_blk_params *p = b->p;
    struct nitro_guard g;
    if (NITRO_GUARD_ENTER(&g, blk_map_covers, p)) {
        if (!nitro_guard_mine(&g))
            nitro_guard_rethrow(&g);
        nitro_guard_leave(&g);
        return VIRTIO_BLK_S_IOERR;
    }
    int rc = NITRO_OK;
    if (p->xts != NULL)
        rc = nitro_xts_iov_buf(p->xts, b->lane, map, &iov, &cnt, len, off, write);
    else if (write)
        nitro_iov_to_buf(iov, cnt, map, len);  /* the caller checked: iov holds len */
    else
        nitro_buf_to_iov(iov, cnt, map, len);
    nitro_guard_leave(&g);
    return rc == NITRO_OK ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
}

/* The batch's clock after a request served from the mapping: read again
 * after every MAPPED_CLOCK_BYTES copied, not after each request (a 4 KiB
 * copy takes well under a microsecond; the clock read was a tenth of it).
 * Latencies of small mapped requests are so up to that much early. */
#define MAPPED_CLOCK_BYTES (32u << 10)

static void blk_mapped_refresh(struct blk_ring *b, uint64_t len)
{
    b->mapped_bytes += len;
    if (b->mapped_bytes >= MAPPED_CLOCK_BYTES) {
        b->mapped_bytes = 0;
        nitro_batch_refresh();
    }
}

/* A read whose pages are in the page cache: copied (decrypted) straight
 * from the image's mapping into guest memory and answered, on the worker.
 * Cheaper than an io_uring read of the same pages, which copies them too
 * but costs a submission and a completion, and on some filesystems
 * (tmpfs) a hand-off to an io-wq thread. False: not such a read, left
 * for the other paths. */
static bool blk_mapped_read(struct blk_ring *b, struct nitro_chain *c,
                            struct blk_req *rq, uint64_t start)
{
    const struct nitro_blk_params *p = b->p;
    uint64_t len = rq->wr_len, off = rq->sector << SECTOR_SHIFT;
    if (p->image_map == NULL || rq->type != VIRTIO_BLK_T_IN || !blk_read_ok(p, rq))
        return false;
    uint8_t *map = blk_mapped_at(b, off, len);
    if (map == NULL)
        return false;
    struct blk_done d = {.op = NITRO_BLK_OP_IN, .bytes = len, .used_len = (uint32_t)len + 1};
    d.status = blk_mapped_copy(b, map, rq->wr, rq->n_wr, off, len, false);
    nitro_stat_add(&b->q.s->mapped_reads, 1);
    blk_mapped_refresh(b, len);
    blk_finish(&b->q, c->head, c->resubmitted, rq->status, &d, start);
    return true;
}

/* A write whose pages are in the page cache: copied (encrypted) straight
 * into the image's mapping, and answered, on the worker. No pwrite: no
 * system call, and encrypted, one pass (guest -> cipher -> page cache)
 * instead of a bounce buffer the kernel copies again. The pages are
 * dirty in the page cache as after a pwrite; FLUSH (fdatasync) writes
 * them back the same way. False: not such a write. */
static bool blk_mapped_write(struct blk_ring *b, struct nitro_chain *c,
                             struct blk_req *rq, uint64_t start)
{
    const struct nitro_blk_params *p = b->p;
    uint64_t len = rq->rd_len, off = rq->sector << SECTOR_SHIFT;
    if (!blk_map_writable(p) || rq->type != VIRTIO_BLK_T_OUT || rq->oversize ||
        !blk_range_ok(p, rq->sector, len))
        return false;
    uint8_t *map = blk_mapped_at(b, off, len);
    if (map == NULL)
        return false;
    struct blk_done d = {.op = NITRO_BLK_OP_OUT, .bytes = len, .used_len = 1};
    d.status = blk_mapped_copy(b, map, rq->rd, rq->n_rd, off, len, true);
    nitro_stat_add(&b->q.s->mapped_writes, 1);
    blk_mapped_refresh(b, len);
    blk_finish(&b->q, c->head, c->resubmitted, rq->status, &d, start);
    return true;
}

/* Start loading the image bytes the next request in the ring will read
 * or write through the mapping, while this one is served: its first
 * lines and, with them, its page's translation (a random page of a large
 * image is most likely a TLB miss whose page-table entries miss the
 * caches too: the gain is larger than the lines themselves explain; this
 * machine has no PMU counters to show it). A few lines are enough, more
 * is slower. bench.crypto, page cache on tmpfs, alternated builds:
 * - 4 KiB random reads, plain: none 673-707k IOPS; 128 to 768 bytes
 *   916k-1,046k; 1 KiB 716-775k; 2 KiB 709-768k (software prefetches
 *   then hold the line fill buffers the request being served needs).
 *   LUKS2, 4096-byte sectors: 621-644k -> 649-737k.
 * - 4 KiB random writes (PREFETCHW), plain 614-635k -> 661-670k; LUKS2
 *   627-634k -> 647-650k. */
#define MAPPED_PREFETCH 256u

/* Only a hint: the header is read again and checked when that request is
 * popped, a prefetch never faults, and a wrong guess costs a few lines. */
static void blk_prefetch_next(struct blk_ring *b)
{
    const struct nitro_blk_params *p = b->p;
    uint32_t len;
    const uint8_t *h = nitro_vq_peek_next(b->r.vq, &len);
    if (h == NULL || len < OUTHDR_LEN)
        return;
    uint8_t hdr[OUTHDR_LEN];
    memcpy(hdr, h, sizeof(hdr));
    __asm__ __volatile__("" ::: "memory");  /* one read of guest memory, decoded from the copy */
    uint32_t type;
    uint64_t sector;
    blk_hdr_decode(hdr, &type, &sector);
    bool write = type == VIRTIO_BLK_T_OUT;
    if ((type != VIRTIO_BLK_T_IN && !(write && blk_map_writable(p))) || sector >= p->capacity)
        return;
    /* blk_params_ok: every sector below capacity, plus data_offset, fits;
     * and `end` keeps every line inside the mapping. */
    uint64_t pos = p->data_offset + (sector << SECTOR_SHIFT);
    uint64_t end = pos + MAPPED_PREFETCH;
    if (end > p->image_map_len)
        end = p->image_map_len;
    for (uint64_t a = pos & ~(uint64_t)(NITRO_CACHE_LINE - 1); a < end; a += NITRO_CACHE_LINE) {
        if (write)
            nitro_prefetch_for_write(p->image_map + a);
        else
            __builtin_prefetch(p->image_map + a, 0, 3);
    }
}

/* The ring's guard covers the mapping too, though every copy has its own
 * (blk_mapped_copy): a fault there breaks the device, not the daemon. */
static bool blk_ring_covers(const struct nitro_ring *r, const void *addr)
{
    return blk_map_covers(((const struct blk_ring *)r)->p, addr);
}

static void blk_ring_notify(struct blk_ring *b)
{
    if (b->notify) {
        b->notify = false;
        nitro_vq_notify(b->r.vq);
    }
}

/* ---- the next request, through the volume's QoS (every blk ring) ------- */

/* The data bytes a request counts against the throughput limit. */
static uint64_t blk_qos_bytes(const struct blk_req *rq)
{
    if (rq->type == VIRTIO_BLK_T_IN)
        return rq->wr_len;
    if (rq->type == VIRTIO_BLK_T_OUT)
        return rq->rd_len;
    return 0;
}

/* A queue waiting for a deadline looks again at least this often, so a
 * limit raised live (nitro_qos_set) applies to a sleeping worker too. */
#define QOS_MAX_WAIT_NS 100000000ull

static void blk_qos_set_queued(struct blk_queue *q, uint32_t n)
{
    if (n != q->held_queued) {
        nitro_qos_queued_add(q->p->qos, (int64_t)n - (int64_t)q->held_queued);
        q->held_queued = n;
    }
}

/* Admit rq, or hold it (with its chain) and set the ring's deadline. */
static bool blk_qos_admit(struct blk_queue *q, struct nitro_chain *c,
                          const struct blk_req *rq, uint64_t start, bool retry)
{
    struct nitro_qos *qos = q->p->qos;
    uint32_t gen = nitro_qos_generation(qos);
    /* The batch's clock: a read of the clock per request was 3 % of a
     * worker serving 4 KiB reads, for volumes without limits too. */
    uint64_t now = nitro_batch_now(), ready = 0;
    if (nitro_qos_admit(qos, blk_qos_bytes(rq), now, retry, &ready)) {
        blk_qos_set_queued(q, 0);
        return true;
    }
    q->held = true;
    q->held_chain = c;
    q->held_rq = *rq;
    q->held_start = start;
    q->qos_generation = gen;
    q->r->wake_ns = ready < now + QOS_MAX_WAIT_NS ? ready : now + QOS_MAX_WAIT_NS;
    blk_qos_set_queued(q, 1 + nitro_vq_backlog(q->r->vq));
    return false;
}

bool blk_queue_waiting(struct blk_queue *q)
{
    if (q->r->wake_ns == 0)
        return false;
    if (nitro_now_ns() < q->r->wake_ns &&
        nitro_qos_generation(q->p->qos) == q->qos_generation)
        return true;
    q->r->wake_ns = 0;
    return false;
}

int blk_queue_next(struct blk_queue *q, struct nitro_chain **c, struct blk_req *rq,
                   uint64_t *start)
{
    bool retry = q->held;
    if (q->held) {
        q->held = false;
        *c = q->held_chain;
        *rq = q->held_rq;
        *start = q->held_start;
    } else {
        int rc = blk_pop_request(q, c, rq, start);
        if (rc <= 0)
            return rc;
    }
    if (q->p->qos != NULL && !blk_qos_admit(q, *c, rq, *start, retry))
        return 0;
    return 1;
}

bool blk_queue_release(struct blk_queue *q, struct nitro_chain **c, struct blk_req *rq,
                       uint64_t *start)
{
    bool held = q->held;
    if (held) {
        q->held = false;
        *c = q->held_chain;
        *rq = q->held_rq;
        *start = q->held_start;
    }
    if (q->p->qos != NULL)
        blk_qos_set_queued(q, 0);
    q->r->wake_ns = 0;
    return held;
}

int blk_queue_release_held(struct blk_queue *q, bool room, struct nitro_chain **c,
                           struct blk_req *rq, uint64_t *start)
{
    if (!blk_queue_release(q, c, rq, start))
        return 0;
    if (q->r->status != NITRO_OK) {  /* broken: dropped with the ring */
        blk_queue_uncount(q);
        return 0;
    }
    if (room)
        return 1;
    /* No slot for it (out of memory, or every one busy): answered, not lost. */
    struct blk_done d = {.op = NITRO_BLK_OP_UNSUPPORTED, .status = VIRTIO_BLK_S_IOERR,
                         .used_len = 1};
    blk_finish(q, (*c)->head, (*c)->resubmitted, rq->status, &d, *start);
    return -1;
}

static int blk_ring_poll(struct nitro_ring *r, struct nitro_io *io,
                         uint32_t budget)
{
    struct blk_ring *b = (struct blk_ring *)r;
    b->io = io;
    blk_ring_notify(b);  /* completions reaped since the last poll */
    if (blk_queue_waiting(&b->q))
        return 0;
    uint32_t done = 0;
    uint64_t sync_bytes = 0, async_bytes = 0;
    int rc = 0;
    while (done < budget && b->free != NULL && sync_bytes < SYNC_PASS_BYTES &&
           async_bytes < ASYNC_PASS_BYTES) {
        struct nitro_chain *c;
        struct blk_req rq = {0};  /* set by blk_queue_next; gcc cannot always see it */
        uint64_t start;
        rc = blk_queue_next(&b->q, &c, &rq, &start);
        if (rc <= 0)
            break;
        done++;
        if (b->resident != NULL)
            blk_prefetch_next(b);
        if (blk_mapped_read(b, c, &rq, start)) {
            async_bytes += rq.wr_len;  /* as quick: the same early answer */
            b->notify = true;
            continue;
        }
        if (io->ready && blk_async_ok(b, &rq) &&
            blk_start_async(b, c, &rq, start)) {
            async_bytes += blk_qos_bytes(&rq);
            continue;
        }
        uint64_t before = sync_bytes;
        if (blk_mapped_write(b, c, &rq, start)) {
            sync_bytes += rq.rd_len;  /* as a pwrite: the worker's own time */
        } else {
            sync_bytes += blk_handle_sync(&b->q, c, b->lane, &rq, start);
            blk_resident_forget(b, &rq);
        }
        b->notify = true;
        if (sync_bytes / SYNC_CALL_BYTES != before / SYNC_CALL_BYTES)
            blk_ring_notify(b);
    }
    blk_ring_notify(b);
    return rc < 0 ? rc : (int)done;
}

static void blk_bounces_free(struct blk_ring *b)
{
    for (uint32_t i = 0; i < b->nios; i++)
        blk_bounce_free(b, &b->ios[i]);
}

static uint32_t blk_ring_in_flight(const struct nitro_ring *r)
{
    return ((const struct blk_ring *)r)->in_flight;
}

/* One request slot per ring entry: the ring size bounds what the guest can
 * have outstanding. Sized at attach, when the ring size is final. */
static int blk_ring_attach(struct nitro_ring *r)
{
    struct blk_ring *b = (struct blk_ring *)r;
    if (nitro_vq_fault(r->vq) != NITRO_FAULT_NONE)
        return NITRO_ERR_GUEST;
    uint32_t num = nitro_vq_num(r->vq);
    if (b->nios != num) {
        blk_bounces_free(b);
        free(b->ios);
        b->ios = calloc(num, sizeof(*b->ios));
        b->nios = b->ios != NULL ? num : 0;
        if (b->ios == NULL)
            return NITRO_ERR_NOMEM;
    }
    b->free = NULL;
    for (uint32_t i = num; i-- > 0;) {
        b->ios[i].next_free = b->free;
        b->free = &b->ios[i];
    }
    b->in_flight = 0;
    if (b->p->xts != NULL) {
        b->lane = nitro_xts_lane_get(b->p->xts);
        if (b->lane == NULL)
            return NITRO_ERR_NOMEM;
    }
    return NITRO_OK;
}

static void blk_ring_detach(struct nitro_ring *r)
{
    struct blk_ring *b = (struct blk_ring *)r;
    /* A held request points into guest memory, which may be replaced
     * before the next attach: serve it now, over the budget (detaching is
     * rare). A broken ring's is dropped with the ring. */
    struct nitro_chain *c;
    struct blk_req rq;
    uint64_t start;
    if (blk_queue_release(&b->q, &c, &rq, &start)) {
        if (r->status == NITRO_OK)
            blk_handle_sync(&b->q, c, b->lane, &rq, start);
        else
            blk_queue_uncount(&b->q);
        b->notify = true;
    }
    blk_ring_notify(b);
    nitro_xts_lane_put(b->lane);
    b->lane = NULL;
}

static void blk_ring_free(struct nitro_ring *r)
{
    struct blk_ring *b = (struct blk_ring *)r;
    blk_queue_forget(&b->q);
    blk_bounces_free(b);
    free(b->ios);
    free(b->resident);
    free(b);
}

static const struct nitro_ring_ops blk_ring_ops = {
    .poll = blk_ring_poll,
    .arm = nitro_ring_arm_vq,
    .disarm = nitro_ring_disarm_vq,
    .in_flight = blk_ring_in_flight,
    .attach = blk_ring_attach,
    .detach = blk_ring_detach,
    .free = blk_ring_free,
    .covers = blk_ring_covers,
};

/* The parameters the request checks rely on: a power-of-two block size of
 * whole encryption sectors, and every byte of the disk at an offset in fd
 * that fits off_t (data_offset + capacity * 512 <= INT64_MAX). */
bool blk_params_ok(const struct nitro_blk_params *p)
{
    uint32_t bs = p->block_size;
    if (bs < SECTOR_SIZE || (bs & (bs - 1)) != 0)
        return false;
    if (p->xts != NULL && bs % nitro_xts_sector_size(p->xts) != 0)
        return false;
    uint64_t max = (uint64_t)INT64_MAX;
    return p->capacity <= max >> SECTOR_SHIFT &&
           p->data_offset <= max - (p->capacity << SECTOR_SHIFT);
}

struct nitro_ring *nitro_ring_blk_new(struct nitro_vq *vq,
                                      const struct nitro_blk_params *params,
                                      struct nitro_blk_stats *stats)
{
    if (vq == NULL || params == NULL || stats == NULL || params->fd < 0 ||
        !blk_params_ok(params))
        return NULL;
    struct blk_ring *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return NULL;
    b->r = nitro_ring_detached(&blk_ring_ops, vq, NITRO_RING_BLK);
    b->p = params;
    b->s = stats;
    b->q = blk_queue_of(&b->r, params, stats);
    if (params->image_map != NULL) {
        /* Without it (no memory), the mapping serves nothing: the other paths do. */
        b->resident = blk_resident_new(params->image_map_len, &b->resident_slots);
    }
    return &b->r;
}

/* ---- one queue on the calling thread (tests, fuzzing) --------------------- */

/* Drive a blk ring the way a worker does, alone, until idle_ms without a
 * kick or a stop; every request it took is complete when it returns. */
static int64_t blk_serve_loop(struct nitro_ring *r, struct nitro_io *io,
                              int idle_ms)
{
    struct nitro_vq *vq = r->vq;
    int64_t total = 0;
    int rc = NITRO_OK;
    nitro_vq_disable_notify(vq);
    while (!nitro_vq_stopping(vq)) {
        int n = blk_ring_poll(r, io, nitro_vq_num(vq));
        if (n < 0) {
            rc = n;
            break;
        }
        total += n;
        nitro_io_submit(io);
        uint32_t reaped = nitro_io_reap(io);
        if (n > 0 || reaped > 0)
            continue;
        if (blk_ring_in_flight(r) > 0) {
            nitro_io_wait(io);
            continue;
        }
        if (r->wake_ns != 0) {  /* QoS: the held request's time */
            struct timespec ts = {.tv_sec = (time_t)(r->wake_ns / 1000000000u),
                                  .tv_nsec = (long)(r->wake_ns % 1000000000u)};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            continue;
        }
        int e = nitro_vq_enable_notify(vq);
        if (e < 0) {
            rc = e;
            break;
        }
        if (e == 0 && nitro_vq_kick_fd(vq) < 0)
            break;
        if (e == 0) {
            e = nitro_vq_wait_kick(vq, idle_ms);
            if (e < 0) {
                rc = e;
                break;
            }
            if (e != NITRO_VQ_WAIT_KICK)
                break;  /* notifications stay enabled for the next waiter */
        }
        nitro_vq_disable_notify(vq);
    }
    while (blk_ring_in_flight(r) > 0)
        nitro_io_wait(io);
    blk_ring_notify((struct blk_ring *)r);
    if (rc == NITRO_OK && nitro_vq_stopping(vq))
        rc = nitro_vq_enable_notify(vq) < 0 ? NITRO_ERR_GUEST : NITRO_OK;
    return rc < 0 ? rc : total;
}

int64_t nitro_blk_serve(struct nitro_vq *vq,
                        const struct nitro_blk_params *params,
                        struct nitro_blk_stats *stats, int idle_ms)
{
    if (vq == NULL || params == NULL || stats == NULL || params->fd < 0 ||
        !blk_params_ok(params) || !nitro_vq_ready(vq))
        return NITRO_ERR_ARG;
    if (nitro_vq_fault(vq) != NITRO_FAULT_NONE)
        return NITRO_ERR_GUEST;
    struct nitro_ring *r = nitro_ring_blk_new(vq, params, stats);
    if (r == NULL)
        return NITRO_ERR_NOMEM;
    int64_t rc = blk_ring_attach(r);
    if (rc == NITRO_OK) {
        struct nitro_io io;
        nitro_io_init(&io, nitro_vq_num(vq));
        rc = blk_serve_loop(r, &io, idle_ms);
        nitro_io_exit(&io);
    }
    blk_ring_detach(r);
    blk_ring_free(r);
    return rc;
}
