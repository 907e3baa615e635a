/*
 * nitro_net_queue.c: serving virtio-net queues (virtio 1.2 5.1.6): TX rings
 * through the switch (nitro_switch.c), RX ring workers that only drain
 * kicks, and the control queue.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "nitro_iov.h"
#include "nitro_pkt.h"
#include "nitro_ring.h"
#include "nitro_switch_internal.h"

/* ---- TX rings --------------------------------------------------------------- */

struct tx_ctx {
    struct nitro_switch *sw;
    uint32_t port_id;
    struct port *p;
    uint32_t hint;
    uint8_t *buf;  /* SCRATCH_LEN: the chain, then room for one segment */
    struct dirty dirty;
    struct nitro_sw_tally out;  /* fast frames counted out, not yet added */
    /* Fast-path frames of the batch that go to one destination, in order. */
    struct port *group;
    uint32_t nfast;
    struct nitro_sw_fast fast[TX_BATCH];
};

static void tx_one(struct tx_ctx *t, const struct nitro_chain *c)
{
    if (c->out_len < NITRO_NET_HDR_LEN + ETH_HLEN ||
        c->out_len > NITRO_NET_HDR_LEN + NITRO_NET_MAX_FRAME) {
        nitro_sw_drop(&t->p->stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    uint32_t len = (uint32_t)c->out_len;
    nitro_iov_to_buf(c->iov, (int)c->n_out, t->buf, len);
    nitro_sw_tx_frame(t->sw, t->port_id, t->p, t->buf, len,
                      t->buf + FRAME_BUF_LEN, t->hint, &t->dirty);
}

/* Deliver the pending fast frames (all to t->group). */
static void tx_flush_group(struct tx_ctx *t)
{
    if (t->nfast > 0)
        nitro_sw_deliver_fast(t->group, t->fast, t->nfast, t->hint, &t->dirty);
    t->nfast = 0;
    t->group = NULL;
}

/* Copy chain c's head into the next fast slot and let the switch decide. */
static enum nitro_sw_fast_verdict tx_fast(struct tx_ctx *t,
                                          const struct nitro_chain *c,
                                          struct port **dst)
{
    if (c->n_out > NITRO_SW_FAST_IOV ||
        c->out_len < NITRO_NET_HDR_LEN + ETH_HLEN ||
        c->out_len > NITRO_NET_HDR_LEN + NITRO_NET_MAX_FRAME)
        return NITRO_SW_SLOW;
    struct nitro_sw_fast *f = &t->fast[t->nfast];
    f->len = (uint32_t)c->out_len;
    f->head_len = f->len < sizeof(f->head) ? f->len : (uint32_t)sizeof(f->head);
    /* One copy of what the switch checks: the guest cannot change it
     * after the checks (the rest it may: it is only its own payload). */
    nitro_iov_to_buf(c->iov, (int)c->n_out, f->head, f->head_len);
    f->cnt = (int)c->n_out;
    memcpy(f->iov, c->iov, c->n_out * sizeof(c->iov[0]));
    return nitro_sw_tx_fast(t->sw, t->p, f, dst, &t->out);
}

/* Switch one chain: runs of fast frames to one destination are delivered
 * together (one RX lock and publish), everything else as before, in order. */
static void tx_chain(struct tx_ctx *t, const struct nitro_chain *c)
{
    struct port *dst = NULL;
    uint32_t slot = t->nfast;  /* where tx_fast() puts the frame */
    enum nitro_sw_fast_verdict v = tx_fast(t, c, &dst);
    if (v == NITRO_SW_DONE)
        return;
    if (v == NITRO_SW_SLOW || dst != t->group)
        tx_flush_group(t);
    if (v == NITRO_SW_SLOW) {
        tx_one(t, c);
        return;
    }
    if (slot != t->nfast)  /* a new group starts with this frame */
        memcpy(&t->fast[t->nfast], &t->fast[slot], sizeof(t->fast[0]));
    t->group = dst;
    t->nfast++;
}

static int64_t tx_batch(struct tx_ctx *t, struct nitro_vq *vq)
{
    uint16_t heads[TX_BATCH];
    uint32_t lens[TX_BATCH];
    uint32_t n = 0;
    int rc = 0;
    uint32_t want = nitro_vq_waiting_hint(vq) > TX_BATCH ? TX_BATCH : TX_BATCH_EARLY;
    nitro_vq_prefetch(vq, want);
    while (n < want) {
        struct nitro_chain *c;
        rc = nitro_vq_pop(vq, &c);
        if (rc <= 0)
            break;
        tx_chain(t, c);
        heads[n] = c->head;
        lens[n] = 0;  /* TX buffers are device-readable: nothing written */
        n++;
    }
    /* The fast frames' payload is read out of these TX buffers: deliver
     * before giving them back. */
    tx_flush_group(t);
    nitro_sw_tally_flush(t->p, &t->out);
    /* Also when the guest broke the ring mid-batch: the chains taken so far
     * were switched, so they are completed and their receivers called. */
    nitro_vq_push_batch(vq, heads, lens, n);
    if (n > 0)
        nitro_vq_notify(vq);
    nitro_sw_flush_dirty(&t->dirty);
    return rc < 0 ? rc : (int64_t)n;
}

/* A scratch buffer of the port for one TX worker: kept across calls (one
 * per concurrently served TX ring), so a serve call does not allocate. */
static uint8_t *scratch_get(struct port *p, int *slot)
{
    for (int i = 0; i < NITRO_NET_MAX_PAIRS; i++) {
        uint32_t bit = 1u << i;
        if (__atomic_fetch_or(&p->scratch_busy, bit, __ATOMIC_ACQUIRE) & bit)
            continue;
        if (p->scratch[i] == NULL)
            p->scratch[i] = malloc(SCRATCH_LEN);
        if (p->scratch[i] == NULL) {
            __atomic_fetch_and(&p->scratch_busy, ~bit, __ATOMIC_RELEASE);
            return NULL;
        }
        *slot = i;
        return p->scratch[i];
    }
    *slot = -1;  /* more TX workers than pairs: not expected, still works */
    return malloc(SCRATCH_LEN);
}

static void scratch_put(struct port *p, int slot, uint8_t *buf)
{
    if (slot < 0)
        free(buf);
    else
        __atomic_fetch_and(&p->scratch_busy, ~(1u << slot), __ATOMIC_RELEASE);
}

int64_t nitro_net_tx_serve(struct nitro_switch *sw, uint32_t port,
                           struct nitro_vq *vq, int idle_ms)
{
    struct port *p = nitro_sw_port(sw, port);
    if (p == NULL || vq == NULL || !nitro_vq_ready(vq))
        return NITRO_ERR_ARG;
    if (nitro_vq_fault(vq) != NITRO_FAULT_NONE)
        return NITRO_ERR_GUEST;
    struct tx_ctx t = {.sw = sw, .port_id = port, .p = p, .hint = port};
    struct nitro_ul_tx ul = {.sw = sw};
    t.dirty.ul = &ul;
    int scratch_slot;
    t.buf = scratch_get(p, &scratch_slot);
    if (t.buf == NULL)
        return NITRO_ERR_NOMEM;
    int64_t total = 0, rc = 0;
    nitro_vq_disable_notify(vq);
    while (!nitro_vq_stopping(vq)) {
        int64_t n = tx_batch(&t, vq);
        if (n < 0) {
            rc = n;
            break;
        }
        total += n;
        if (n > 0)
            continue;
        int e = nitro_vq_enable_notify(vq);
        if (e < 0) {
            rc = e;
            break;
        }
        if (e == 0) {
            if (nitro_vq_kick_fd(vq) < 0)
                break;
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
    if (rc == 0 && nitro_vq_stopping(vq)) {
        int e = nitro_vq_enable_notify(vq);
        if (e < 0)
            rc = e;
    }
    scratch_put(p, scratch_slot, t.buf);
    nitro_ul_tx_free(&ul);
    return rc < 0 ? rc : total;
}

int64_t nitro_net_rx_serve(struct nitro_vq *vq)
{
    if (vq == NULL || !nitro_vq_ready(vq))
        return NITRO_ERR_ARG;
    if (nitro_vq_kick_fd(vq) >= 0) {
        int rc = nitro_vq_wait_kick(vq, 0);
        if (rc < 0)
            return rc;
    }
    /* After draining the kick: a delivery that broke the ring sets the
     * fault before it kicks (nitro_vq_wake), so either this sees the fault
     * or the kick fd is readable again and the next call does. */
    if (nitro_vq_fault(vq) != NITRO_FAULT_NONE)
        return NITRO_ERR_GUEST;
    return 0;
}

/* ---- control queue ---------------------------------------------------------- */

#define VIRTIO_NET_CTRL_RX 0
#define VIRTIO_NET_CTRL_MAC 1
#define VIRTIO_NET_CTRL_MQ 4
#define VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0
#define VIRTIO_NET_OK 0
#define VIRTIO_NET_ERR 1

static uint8_t ctrl_answer(const struct nitro_chain *c, uint32_t max_pairs)
{
    uint8_t cmd[4] = {0};
    if (c->out_len < 2)
        return VIRTIO_NET_ERR;
    nitro_iov_to_buf(c->iov, (int)c->n_out, cmd, c->out_len < 4 ? c->out_len : 4);
    if (cmd[0] == VIRTIO_NET_CTRL_RX || cmd[0] == VIRTIO_NET_CTRL_MAC)
        return VIRTIO_NET_OK;
    if (cmd[0] == VIRTIO_NET_CTRL_MQ && cmd[1] == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET &&
        c->out_len >= 4) {
        uint16_t pairs = ld16le(cmd + 2);
        return pairs >= 1 && pairs <= max_pairs ? VIRTIO_NET_OK : VIRTIO_NET_ERR;
    }
    return VIRTIO_NET_ERR;
}

/* Answer one control command: the ack is the last writable byte (5.1.6.5). */
static void ctrl_complete(struct nitro_vq *vq, const struct nitro_chain *c,
                          uint32_t max_pairs)
{
    uint8_t ack = ctrl_answer(c, max_pairs);
    const struct iovec *last = &c->iov[c->n_out + c->n_in - 1];
    ((uint8_t *)last->iov_base)[last->iov_len - 1] = ack;
    nitro_vq_push(vq, c->head, 1);
}

/* ---- engine rings (nitro_ring.h) -------------------------------------------- */

/* A TX ring as an engine worker serves it: up to budget chains a poll, the
 * scratch buffer held from attach to detach. */
struct net_tx_ring {
    struct nitro_ring r;
    int scratch_slot;
    struct tx_ctx t;
    struct nitro_ul_tx ul;  /* frames for other hosts (nitro_underlay.c) */
};

static int tx_ring_poll(struct nitro_ring *r, struct nitro_io *io,
                        uint32_t budget)
{
    (void)io;
    struct net_tx_ring *x = (struct net_tx_ring *)r;
    uint32_t done = 0;
    while (done < budget) {
        int64_t n = tx_batch(&x->t, r->vq);
        if (n < 0)
            return (int)n;
        if (n == 0)
            break;
        done += (uint32_t)n;
    }
    return (int)done;
}

static int tx_ring_attach(struct nitro_ring *r)
{
    struct net_tx_ring *x = (struct net_tx_ring *)r;
    if (nitro_vq_fault(r->vq) != NITRO_FAULT_NONE)
        return NITRO_ERR_GUEST;
    x->t.buf = scratch_get(x->t.p, &x->scratch_slot);
    return x->t.buf == NULL ? NITRO_ERR_NOMEM : NITRO_OK;
}

static void tx_ring_detach(struct nitro_ring *r)
{
    struct net_tx_ring *x = (struct net_tx_ring *)r;
    if (x->t.buf != NULL)
        scratch_put(x->t.p, x->scratch_slot, x->t.buf);
    x->t.buf = NULL;
}

/* A fault in guest memory cut a batch short: its fast frames point into
 * memory that is gone (the sender's, or they were headed for a receiver
 * whose ring broke); the receivers already filled still get their call. */
static void tx_ring_abandon(struct nitro_ring *r)
{
    struct net_tx_ring *x = (struct net_tx_ring *)r;
    x->t.nfast = 0;
    x->t.group = NULL;
    nitro_sw_tally_flush(x->t.p, &x->t.out);  /* they were switched out */
    nitro_sw_flush_dirty(&x->t.dirty);
}

static void ring_free_plain(struct nitro_ring *r)
{
    free(r);
}

static void tx_ring_free(struct nitro_ring *r)
{
    nitro_ul_tx_free(&((struct net_tx_ring *)r)->ul);
    free(r);
}

static const struct nitro_ring_ops tx_ring_ops = {
    .poll = tx_ring_poll,
    .arm = nitro_ring_arm_vq,
    .disarm = nitro_ring_disarm_vq,
    .attach = tx_ring_attach,
    .detach = tx_ring_detach,
    .free = tx_ring_free,
    .abandon = tx_ring_abandon,
};

struct nitro_ring *nitro_ring_net_tx_new(struct nitro_switch *sw,
                                         uint32_t port, struct nitro_vq *vq)
{
    struct port *p = sw != NULL ? nitro_sw_port(sw, port) : NULL;
    if (p == NULL || vq == NULL)
        return NULL;
    struct net_tx_ring *x = calloc(1, sizeof(*x));
    if (x == NULL)
        return NULL;
    x->r = nitro_ring_detached(&tx_ring_ops, vq, NITRO_RING_NET_TX);
    x->t = (struct tx_ctx){.sw = sw, .port_id = port, .p = p, .hint = port};
    x->ul.sw = sw;
    x->t.dirty.ul = &x->ul;
    return &x->r;
}

/* An RX ring is filled by other workers under its slot lock; its owner only
 * reports a fault a delivery found (the deliverer kicks it awake). Its kicks
 * (new buffers) need no action, and it never asks the guest to stop them. */
static int rx_ring_poll(struct nitro_ring *r, struct nitro_io *io,
                        uint32_t budget)
{
    (void)io;
    (void)budget;
    return nitro_vq_fault(r->vq) != NITRO_FAULT_NONE ? NITRO_ERR_GUEST : 0;
}

static int rx_ring_arm(struct nitro_ring *r)
{
    return nitro_vq_fault(r->vq) != NITRO_FAULT_NONE ? NITRO_ERR_GUEST : 0;
}

static void rx_ring_disarm(struct nitro_ring *r)
{
    (void)r;
}

static const struct nitro_ring_ops rx_ring_ops = {
    .poll = rx_ring_poll,
    .arm = rx_ring_arm,
    .disarm = rx_ring_disarm,
    .free = ring_free_plain,
};

struct nitro_ring *nitro_ring_net_rx_new(struct nitro_vq *vq)
{
    if (vq == NULL)
        return NULL;
    struct nitro_ring *r = calloc(1, sizeof(*r));
    if (r != NULL)
        *r = nitro_ring_detached(&rx_ring_ops, vq, NITRO_RING_NET_RX);
    return r;
}

struct net_ctrl_ring {
    struct nitro_ring r;
    uint32_t max_pairs;
};

static int ctrl_ring_poll(struct nitro_ring *r, struct nitro_io *io,
                          uint32_t budget)
{
    (void)io;
    struct net_ctrl_ring *x = (struct net_ctrl_ring *)r;
    uint32_t done = 0;
    int rc = 0;
    struct nitro_chain *c;
    while (done < budget && (rc = nitro_vq_pop(r->vq, &c)) == 1) {
        if (c->n_in == 0) {
            rc = nitro_vq_set_fault(r->vq, NITRO_FAULT_REQUEST);
            break;
        }
        ctrl_complete(r->vq, c, x->max_pairs);
        done++;
    }
    if (done > 0)
        nitro_vq_notify(r->vq);
    return rc < 0 ? rc : (int)done;
}

static const struct nitro_ring_ops ctrl_ring_ops = {
    .poll = ctrl_ring_poll,
    .arm = nitro_ring_arm_vq,
    .disarm = nitro_ring_disarm_vq,
    .free = ring_free_plain,
};

struct nitro_ring *nitro_ring_net_ctrl_new(struct nitro_vq *vq,
                                           uint32_t max_pairs)
{
    if (vq == NULL)
        return NULL;
    struct net_ctrl_ring *x = calloc(1, sizeof(*x));
    if (x == NULL)
        return NULL;
    x->r = nitro_ring_detached(&ctrl_ring_ops, vq, NITRO_RING_NET_CTRL);
    x->max_pairs = max_pairs;
    return &x->r;
}
