/*
 * nitro_blk_internal.h: what nitro_blk.c shares with the remote virtio-blk
 * rings (nitro_nbd.c, a volume on an NBD export; nitro_rbd.c, one on
 * librbd): the request vocabulary, parsing, the checks before any I/O,
 * GET_ID, and completing a request. Internal, not ABI.
 */
#ifndef NITRO_BLK_INTERNAL_H
#define NITRO_BLK_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "nitro.h"
#include "nitro_ring.h"
#include "nitro_vring.h"
#include "nitro_xts_internal.h"

/* virtio 1.2 5.2.6 */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_ID_BYTES 20
#define VIRTIO_BLK_WZ_FLAG_UNMAP 1u

#define SECTOR_SHIFT 9
#define SECTOR_SIZE (1u << SECTOR_SHIFT)
#define OUTHDR_LEN 16
#define SEGMENT_LEN 16
/* Most discard/write-zeroes segments per request: what the config space
 * advertises as max_discard_seg and max_write_zeroes_seg (DWZ_SEG_MAX in
 * nitro/devices/blk/config.py). One segment of at most max_discard_sectors
 * (1 GiB) bounds the work one request can ask of the filesystem. */
#define MAX_SEGMENTS 1
/* The segments a caller's array for blk_segments holds (> MAX_SEGMENTS). */
#define BLK_SEGMENTS_CAP 16
_Static_assert(MAX_SEGMENTS <= BLK_SEGMENTS_CAP, "blk_segments' callers hold them all");

/* A parsed request: views into the chain's iovecs (edited in place). */
struct blk_req {
    uint32_t type;
    uint64_t sector;
    struct iovec *rd;   /* device-readable payload after the header */
    int n_rd;
    uint64_t rd_len;
    struct iovec *wr;   /* device-writable data before the status byte */
    int n_wr;
    uint64_t wr_len;
    uint8_t *status;
    bool oversize;      /* beyond seg_max / size_max: IOERR, no I/O */
};

/* What a request did, for the used ring and the stats. */
struct blk_done {
    int op;             /* NITRO_BLK_OP_* */
    uint8_t status;
    uint64_t bytes;     /* payload bytes moved */
    uint32_t used_len;  /* bytes written into the device-writable part */
};

/* A DISCARD / WRITE_ZEROES segment (virtio_blk_discard_write_zeroes). */
struct segment {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

/* Parse chain c into rq; NITRO_ERR_GUEST (the ring breaks) if it has no
 * room for the header or the status byte. */
NITRO_INTERNAL int blk_parse(struct nitro_vq *vq, const struct nitro_blk_params *p,
                             struct nitro_chain *c, struct blk_req *rq);
struct blk_queue;
/* Pop q's next chain and parse it (counting it in q's inflight from
 * *start on): 1 with *c, *rq and *start set, 0 when the ring is empty, or
 * NITRO_ERR_GUEST (the guest broke the ring). */
NITRO_INTERNAL int blk_pop_request(struct blk_queue *q, struct nitro_chain **c,
                                   struct blk_req *rq, uint64_t *start);
/* [sector, sector + len bytes) is whole logical blocks inside the disk. */
NITRO_INTERNAL bool blk_range_ok(const struct nitro_blk_params *p, uint64_t sector,
                                 uint64_t len);
NITRO_INTERNAL uint8_t blk_get_id(const struct nitro_blk_params *p, struct blk_req *rq,
                                  struct blk_done *d);
/* Copy a DISCARD / WRITE_ZEROES request's segments out of guest memory
 * into seg (BLK_SEGMENTS_CAP entries) and check them all; a status
 * (UNSUPP if the feature is not offered, IOERR on a read-only disk). */
NITRO_INTERNAL uint8_t blk_segments(const struct nitro_blk_params *p,
                                    const struct blk_req *rq, bool zeroes,
                                    struct segment *seg, int *count);
/* Write the status byte, complete the chain, account. A failed request
 * (status not OK) is answered and counted as having delivered nothing but
 * the status byte, whatever d's bytes and used_len say. */
NITRO_INTERNAL void blk_finish(struct blk_queue *q, uint16_t head, bool resubmitted,
                               uint8_t *status, const struct blk_done *d, uint64_t start);
/* Serve one request on the calling thread (with p->fd); returns the
 * bytes it moved. The NBD ring uses it for GET_ID and for requests that
 * fail their checks, which touch no fd. */
NITRO_INTERNAL uint64_t blk_handle_sync(struct blk_queue *q, struct nitro_chain *c,
                                        struct nitro_xts_lane *lane, struct blk_req *rq,
                                        uint64_t start);
/* The block size, encryption sector and offset limits every request
 * check relies on (the fd is the caller's to check). */
NITRO_INTERNAL bool blk_params_ok(const struct nitro_blk_params *p);

/* The front of every blk ring: the next request, popped and parsed, or
 * the one the volume's QoS held back (with its chain: nothing else is
 * popped meanwhile) once its budget allows it. Holding sets r->wake_ns. */
struct blk_queue {
    struct nitro_ring *r;
    const struct nitro_blk_params *p;
    struct nitro_blk_stats *s;
    bool held;
    struct nitro_chain *held_chain;
    struct blk_req held_rq;
    uint64_t held_start;
    uint32_t held_queued;       /* what this ring adds to the qos' queued */
    uint32_t qos_generation;    /* of the limits wake_ns was computed under */
    /* Requests popped here and counted in s->inflight, not yet finished
     * or let go: what a fault that cut one short leaves counted, given
     * back when the ring is freed (blk_queue_forget). */
    uint32_t counted;
};

static inline struct blk_queue blk_queue_of(struct nitro_ring *r,
                                            const struct nitro_blk_params *p,
                                            struct nitro_blk_stats *s)
{
    return (struct blk_queue){.r = r, .p = p, .s = s};
}

/* A request of q's leaves without blk_finish (a broken ring lets its slot
 * go): no longer in flight. */
static inline void blk_queue_uncount(struct blk_queue *q)
{
    q->counted--;
    nitro_stat_sub(&q->s->inflight, 1);
}

/* The ring is being freed: the requests it still counts were cut short
 * by a guest memory fault (a status store, a copy, an answer), never to
 * be answered, so they are in flight no more: without this a hostile
 * guest would leave its device's inflight gauge, and the stuck-I/O alert
 * on it, up for good. */
static inline void blk_queue_forget(struct blk_queue *q)
{
    nitro_stat_sub(&q->s->inflight, q->counted);
    q->counted = 0;
}

/* Still before the QoS deadline of limits that did not change since? */
NITRO_INTERNAL bool blk_queue_waiting(struct blk_queue *q);
/* 1: *c, *rq (from *start) admitted, to serve now; 0: none (the ring is
 * empty, or QoS holds the request: r->wake_ns); NITRO_ERR_GUEST. */
NITRO_INTERNAL int blk_queue_next(struct blk_queue *q, struct nitro_chain **c,
                                  struct blk_req *rq, uint64_t *start);
/* Detaching: true with the held request, if any, to serve or drop now
 * (its chain points into guest memory that may be replaced before the
 * next attach); the queue's share of the QoS' queued count and wake_ns
 * go back to 0. */
NITRO_INTERNAL bool blk_queue_release(struct blk_queue *q, struct nitro_chain **c,
                                      struct blk_req *rq, uint64_t *start);
/* blk_queue_release for a ring that sends requests to a slot of its own
 * (NBD, RBD): 1 with the held request to start now (`room`: the ring has a
 * free slot); 0: none, or a broken ring's, dropped; -1: no room, so it was
 * answered IOERR (notify the guest). */
NITRO_INTERNAL int blk_queue_release_held(struct blk_queue *q, bool room,
                                          struct nitro_chain **c, struct blk_req *rq,
                                          uint64_t *start);

/* ---- calls of remote rings (NBD, RBD): answer moderation ---------------- */

/* A remote server's answers come one at a time, each waking the worker,
 * and a call per answer costs the guest a wake-up and the worker an
 * eventfd write (with a switch to the woken frontend on a busy host: a
 * quarter of the worker's CPU at 4 KiB, measured on NBD). So, as a NIC
 * moderates its interrupts: while at least BLK_CALL_DEFER_OUTSTANDING
 * requests are still with the server (more answers are coming), the call
 * for published server answers waits until BLK_CALL_BATCH of them are, or
 * BLK_CALL_DELAY_NS after the first (the ring's timer_ns wakes the worker
 * for it). With fewer in flight, as at queue depth 1, every answer is
 * signalled at once; so is one that is not the server's (GET_ID, a
 * request refused before it was sent), and so are answers that moved
 * BLK_CALL_BYTES between them: a call is cheap next to a large request,
 * and the wait is not (128 KiB reads from RBD at QD8, per-hop uprobes:
 * answers waited 53 us on average for their call, about 5 % of a
 * request's whole time). */
#define BLK_CALL_DELAY_NS 20000u
#define BLK_CALL_BATCH 16u
#define BLK_CALL_DEFER_OUTSTANDING 4u
#define BLK_CALL_BYTES (64u << 10)

struct blk_calls {
    bool due;          /* answers published and not yet signalled */
    uint32_t answers;  /* of them, the server's */
    uint64_t bytes;    /* and the bytes they moved */
    uint64_t by;       /* when the first server answer must be signalled; 0 */
};

/* A server's answer, moving `bytes`, was published: its call may wait. */
static inline void blk_calls_answer(struct blk_calls *k, uint64_t bytes)
{
    k->due = true;
    k->bytes += bytes;
    if (k->answers++ == 0)
        k->by = nitro_batch_now() + BLK_CALL_DELAY_NS;
}

/* Call now for what was published. */
static inline void blk_calls_flush(struct blk_calls *k, struct nitro_vq *vq)
{
    if (k->due) {
        *k = (struct blk_calls){0};
        nitro_vq_notify(vq);
    }
}

/* Call for what was published, or let it wait (above); `outstanding`:
 * requests still with the server. */
static inline void blk_calls_signal(struct blk_calls *k, struct nitro_vq *vq,
                                    uint32_t outstanding)
{
    if (k->due && outstanding >= BLK_CALL_DEFER_OUTSTANDING &&
        k->answers < BLK_CALL_BATCH && k->bytes < BLK_CALL_BYTES &&
        nitro_batch_now() < k->by)
        return;
    blk_calls_flush(k, vq);
}

/* The earlier of `deadline` (0: none) and a waiting call's: the ring's
 * timer_ns. */
static inline uint64_t blk_calls_timer(const struct blk_calls *k, uint64_t deadline)
{
    if (k->due && k->by != 0 && (deadline == 0 || k->by < deadline))
        return k->by;
    return deadline;
}

#endif
