/*
 * nitro_net.c: virtio-net queues and the VPC switch (see nitro_net.h).
 *
 * Threads: one per TX ring (nitro_net_tx_serve), one per VPC uplink
 * (nitro_switch_uplink_serve), the trio thread (inject, attach/detach,
 * punt_pop_batch), RX ring workers (nitro_net_rx_serve: drain kicks, report a
 * fault) and metrics scrapes (stats). Tables (VPCs, ports, uplinks) are
 * written only before traffic starts. What is shared while traffic flows:
 * - an RX slot (port, pair): its vq pointer and the ring itself, guarded by
 *   the slot's mutex; every delivery and the attach/detach take it (the
 *   pointer is also peeked without the lock, so it is stored atomically);
 * - a port's attached pair count (rx_pairs): atomic, written by the trio
 *   thread on attach/detach;
 * - a port's TX scratch buffers: claimed one per TX worker (atomic bitmask);
 * - a port's token buckets: the port's bucket lock (short, no syscalls);
 * - the punt queue: its own mutex;
 * - counters: relaxed atomic adds (nitro_stat_add).
 * Lock order: a delivery holds at most one slot lock and never a bucket
 * lock at the same time, so there is no ordering to get wrong.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "nitro_iov.h"
#include "nitro_net.h"
#include "nitro_vring.h"

/* virtio 1.2 5.1.3 feature bits we look at. */
#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_MRG_RXBUF 15
/* 5.1.6 virtio_net_hdr flags and gso types. */
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_GSO_NONE 0

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_8021Q 0x8100   /* VLAN tags: not supported, refused */
#define ETH_P_8021AD 0x88a8
#define ETH_P_QINQ1 0x9100   /* pre-802.1ad QinQ, still emitted by some stacks */
#define IPPROTO_ICMP_ 1
#define IPPROTO_UDP_ 17
#define ICMP_ECHO_REQUEST 8
#define DHCP_SERVER_PORT 67
#define SCRATCH_LEN (NITRO_NET_HDR_LEN + NITRO_NET_MAX_FRAME)
#define TX_BATCH 64
#define MAX_RX_BUFS 64
#define DIRTY_MAX 32

struct bucket {
    uint64_t rate;      /* units per second; 0: unlimited */
    uint64_t burst;     /* bucket depth */
    uint64_t tokens;
    uint64_t last_ns;
};

struct rx_slot {
    pthread_mutex_t lock;
    struct nitro_vq *vq;  /* NULL while detached */
};

struct port {
    bool used;
    uint32_t vpc;
    uint8_t mac[6];
    uint8_t ip[4];
    uint64_t features;    /* atomic: set by the trio thread */
    pthread_mutex_t bucket_lock;
    struct bucket bw_in, bw_out, pps;
    struct rx_slot rx[NITRO_NET_MAX_PAIRS];
    uint32_t rx_pairs;    /* atomic: 1 + highest attached pair (0: none) */
    /* TX scratch buffers (SCRATCH_LEN each), allocated on first use and
     * kept: bit i of scratch_busy says a TX worker holds scratch[i]. */
    uint32_t scratch_busy;
    uint8_t *scratch[NITRO_NET_MAX_PAIRS];
    struct nitro_port_stats stats;
};

struct vpc {
    bool used;
    uint8_t gw_mac[6];
    uint8_t gw_ip[4];
    uint32_t mtu;
    uint32_t nports;
    uint16_t ports[NITRO_NET_MAX_PORTS];
    int uplink_fd;
    uint8_t uplink_mac[6];
    struct nitro_port_stats uplink_stats;
    uint8_t *uplink_buf;  /* scratch of the uplink thread */
};

struct punt_entry {
    uint32_t port;
    uint32_t len;
    uint8_t data[NITRO_NET_PUNT_MAX_FRAME];
};

struct nitro_switch {
    struct port ports[NITRO_NET_MAX_PORTS];
    struct vpc vpcs[NITRO_NET_MAX_VPCS];
    pthread_mutex_t punt_lock;
    uint32_t punt_head, punt_count;
    struct punt_entry *punt;
    int punt_fd;
};

/* The RX slots a TX batch delivered into: notified once at the batch end. */
struct dirty {
    uint32_t n;
    struct rx_slot *slot[DIRTY_MAX];
};


/* ---- helpers ------------------------------------------------------------ */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void bucket_init(struct bucket *b, uint64_t rate, uint64_t min_burst)
{
    b->rate = rate;
    /* 100 ms worth, at least one unit of the largest request. */
    b->burst = rate / 10 > min_burst ? rate / 10 : min_burst;
    b->tokens = b->burst;
    b->last_ns = now_ns();
}

/* Take n tokens if there are; refill by elapsed time first. Caller locks. */
static bool bucket_take(struct bucket *b, uint64_t n, uint64_t now)
{
    if (b->rate == 0)
        return true;
    if (now > b->last_ns) {
        uint64_t dt = now - b->last_ns;
        /* dt * rate may overflow for long idle gaps: cap dt at 1 s. */
        if (dt > 1000000000u)
            dt = 1000000000u;
        uint64_t add = dt * b->rate / 1000000000u;
        if (add > 0) {
            b->tokens = b->tokens + add > b->burst ? b->burst : b->tokens + add;
            b->last_ns = now;
        }
    }
    if (b->tokens < n)
        return false;
    b->tokens -= n;
    return true;
}

/* Admission of one packet of len bytes in direction in/out; counts the
 * ENA-style allowance counter that refused it. */
static bool port_admit(struct port *p, uint64_t len, bool in)
{
    struct bucket *bw = in ? &p->bw_in : &p->bw_out;
    if (bw->rate == 0 && p->pps.rate == 0)
        return true;
    uint64_t now = now_ns();
    bool ok_pps, ok_bw = true;
    pthread_mutex_lock(&p->bucket_lock);
    ok_pps = bucket_take(&p->pps, 1, now);
    if (ok_pps) {
        ok_bw = bucket_take(bw, len, now);
        if (!ok_bw && p->pps.rate)
            p->pps.tokens++;  /* the packet does not go: give its slot back */
    }
    pthread_mutex_unlock(&p->bucket_lock);
    if (!ok_pps)
        nitro_stat_add(&p->stats.pps_allowance_exceeded, 1);
    else if (!ok_bw)
        nitro_stat_add(in ? &p->stats.bw_in_allowance_exceeded
                          : &p->stats.bw_out_allowance_exceeded, 1);
    return ok_pps && ok_bw;
}

static void drop(struct nitro_port_stats *s, unsigned reason)
{
    nitro_stat_add(&s->drops[reason], 1);
}

static uint16_t ld16be(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static uint16_t ld16le(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static void st16le(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

/* RFC 1071 sum of [p, p+len) folded to 16 bits (not complemented). */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t len)
{
    while (len > 1) {
        sum += (uint32_t)(p[0] << 8 | p[1]);
        p += 2;
        len -= 2;
    }
    if (len)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

/* NEEDS_CSUM (5.1.6.2): the field at csum_start + csum_offset holds the
 * pseudo-header sum; fold in everything from csum_start and store it.
 * buf is hdr + frame; returns false if the offsets are out of the frame
 * (tx_header has checked them for guest frames; this stays defensive). */
static bool complete_csum(uint8_t *buf, uint32_t len)
{
    if (!(buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM))
        return true;
    uint8_t *frame = buf + NITRO_NET_HDR_LEN;
    uint32_t flen = len - NITRO_NET_HDR_LEN;
    uint32_t start = ld16le(buf + 6), off = ld16le(buf + 8);
    if (start >= flen || (uint64_t)start + off + 2 > flen)
        return false;
    uint32_t sum = csum_add(0, frame + start, flen - start);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    uint16_t c = (uint16_t)~sum;
    /* UDP: a computed 0 is sent as 0xffff (RFC 768). */
    if (c == 0)
        c = 0xffff;
    frame[start + off] = (uint8_t)(c >> 8);
    frame[start + off + 1] = (uint8_t)c;
    buf[0] &= (uint8_t)~VIRTIO_NET_HDR_F_NEEDS_CSUM;
    return true;
}

/* ---- switch tables ------------------------------------------------------- */

struct nitro_switch *nitro_switch_new(void)
{
    struct nitro_switch *sw = calloc(1, sizeof(*sw));
    if (sw == NULL)
        return NULL;
    sw->punt = calloc(NITRO_NET_PUNT_SLOTS, sizeof(*sw->punt));
    sw->punt_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (sw->punt == NULL || sw->punt_fd < 0) {
        if (sw->punt_fd >= 0)
            close(sw->punt_fd);
        free(sw->punt);
        free(sw);
        return NULL;
    }
    pthread_mutex_init(&sw->punt_lock, NULL);
    for (uint32_t i = 0; i < NITRO_NET_MAX_PORTS; i++) {
        pthread_mutex_init(&sw->ports[i].bucket_lock, NULL);
        for (uint32_t q = 0; q < NITRO_NET_MAX_PAIRS; q++)
            pthread_mutex_init(&sw->ports[i].rx[q].lock, NULL);
    }
    for (uint32_t v = 0; v < NITRO_NET_MAX_VPCS; v++)
        sw->vpcs[v].uplink_fd = -1;
    return sw;
}

void nitro_switch_free(struct nitro_switch *sw)
{
    if (sw == NULL)
        return;
    for (uint32_t v = 0; v < NITRO_NET_MAX_VPCS; v++)
        free(sw->vpcs[v].uplink_buf);
    for (uint32_t i = 0; i < NITRO_NET_MAX_PORTS; i++)
        for (uint32_t q = 0; q < NITRO_NET_MAX_PAIRS; q++)
            free(sw->ports[i].scratch[q]);
    close(sw->punt_fd);
    free(sw->punt);
    free(sw);
}

int nitro_switch_add_vpc(struct nitro_switch *sw, uint32_t vpc,
                         const uint8_t *gateway_mac, const uint8_t *gateway_ip,
                         uint32_t mtu)
{
    if (sw == NULL || vpc >= NITRO_NET_MAX_VPCS || sw->vpcs[vpc].used ||
        mtu < 68 || mtu > NITRO_NET_MAX_FRAME - ETH_HLEN)
        return NITRO_ERR_ARG;
    struct vpc *v = &sw->vpcs[vpc];
    v->used = true;
    memcpy(v->gw_mac, gateway_mac, 6);
    memcpy(v->gw_ip, gateway_ip, 4);
    v->mtu = mtu;
    return NITRO_OK;
}

int nitro_switch_add_port(struct nitro_switch *sw, uint32_t port,
                          const struct nitro_port_params *params)
{
    if (sw == NULL || params == NULL || port >= NITRO_NET_MAX_PORTS ||
        sw->ports[port].used || params->vpc >= NITRO_NET_MAX_VPCS ||
        !sw->vpcs[params->vpc].used || (params->mac[0] & 1))
        return NITRO_ERR_ARG;
    struct port *p = &sw->ports[port];
    struct vpc *v = &sw->vpcs[params->vpc];
    p->used = true;
    p->vpc = params->vpc;
    memcpy(p->mac, params->mac, 6);
    memcpy(p->ip, params->ip, 4);
    uint64_t frame_max = v->mtu + ETH_HLEN;
    bucket_init(&p->bw_in, params->bw_in_bytes_per_sec, frame_max);
    bucket_init(&p->bw_out, params->bw_out_bytes_per_sec, frame_max);
    bucket_init(&p->pps, params->pps, 1);
    v->ports[v->nports++] = (uint16_t)port;
    return NITRO_OK;
}

int nitro_switch_set_uplink(struct nitro_switch *sw, uint32_t vpc, int fd,
                            const uint8_t *mac)
{
    if (sw == NULL || vpc >= NITRO_NET_MAX_VPCS || !sw->vpcs[vpc].used)
        return NITRO_ERR_ARG;
    struct vpc *v = &sw->vpcs[vpc];
    if (fd >= 0 && v->uplink_buf == NULL) {
        v->uplink_buf = malloc(NITRO_NET_HDR_LEN + NITRO_NET_MAX_FRAME);
        if (v->uplink_buf == NULL)
            return NITRO_ERR_NOMEM;
    }
    v->uplink_fd = fd;
    if (mac != NULL)
        memcpy(v->uplink_mac, mac, 6);
    return NITRO_OK;
}

static struct port *get_port(struct nitro_switch *sw, uint32_t port)
{
    if (sw == NULL || port >= NITRO_NET_MAX_PORTS || !sw->ports[port].used)
        return NULL;
    return &sw->ports[port];
}

int nitro_switch_set_port_features(struct nitro_switch *sw, uint32_t port,
                                   uint64_t features)
{
    struct port *p = get_port(sw, port);
    if (p == NULL)
        return NITRO_ERR_ARG;
    __atomic_store_n(&p->features, features, __ATOMIC_RELAXED);
    return NITRO_OK;
}

/* Deliveries spread senders over pairs [0, rx_pairs). Attach and detach
 * come from one thread (trio), so recomputing after each is enough; a
 * delivery that reads a stale count skips detached slots or misses a new
 * pair for a moment, both harmless. */
static void update_rx_pairs(struct port *p)
{
    uint32_t n = 0;
    for (uint32_t q = 0; q < NITRO_NET_MAX_PAIRS; q++)
        if (__atomic_load_n(&p->rx[q].vq, __ATOMIC_RELAXED) != NULL)
            n = q + 1;
    __atomic_store_n(&p->rx_pairs, n, __ATOMIC_RELAXED);
}

static void set_rx(struct port *p, uint32_t pair, struct nitro_vq *vq)
{
    /* Taking the lock waits out a delivery in progress. */
    pthread_mutex_lock(&p->rx[pair].lock);
    /* Deliveries take RX buffers when a frame comes and drop it when there
     * are none; nothing waits for the driver to add buffers, so its kicks
     * would only wake the worker for nothing (a polling driver such as
     * DPDK's kicks on every refill). With EVENT_IDX avail_event is simply
     * never advanced, which has the same effect. */
    if (vq != NULL && nitro_vq_ready(vq))
        nitro_vq_disable_notify(vq);
    __atomic_store_n(&p->rx[pair].vq, vq, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&p->rx[pair].lock);
    update_rx_pairs(p);
}

int nitro_switch_attach_rx(struct nitro_switch *sw, uint32_t port,
                           uint32_t pair, struct nitro_vq *vq)
{
    struct port *p = get_port(sw, port);
    if (p == NULL || pair >= NITRO_NET_MAX_PAIRS || vq == NULL)
        return NITRO_ERR_ARG;
    set_rx(p, pair, vq);
    return NITRO_OK;
}

int nitro_switch_detach_rx(struct nitro_switch *sw, uint32_t port,
                           uint32_t pair)
{
    struct port *p = get_port(sw, port);
    if (p == NULL || pair >= NITRO_NET_MAX_PAIRS)
        return NITRO_ERR_ARG;
    set_rx(p, pair, NULL);
    return NITRO_OK;
}

/* ---- delivery into an RX ring -------------------------------------------- */

/* Call the guest behind a slot if it is still attached. */
static void slot_notify(struct rx_slot *slot)
{
    pthread_mutex_lock(&slot->lock);
    /* A ring re-attached meanwhile gets a spurious call: harmless. */
    if (slot->vq != NULL)
        nitro_vq_notify(slot->vq);
    pthread_mutex_unlock(&slot->lock);
}

static void mark_dirty(struct dirty *d, struct rx_slot *slot)
{
    for (uint32_t i = 0; i < d->n; i++)
        if (d->slot[i] == slot)
            return;
    if (d->n < DIRTY_MAX) {
        d->slot[d->n++] = slot;
        return;
    }
    slot_notify(slot);
}

static void flush_dirty(struct dirty *d)
{
    for (uint32_t i = 0; i < d->n; i++)
        slot_notify(d->slot[i]);
    d->n = 0;
}

/* Host address of byte `off` of a chain's writable iovecs (NULL past the
 * end): a driver may split virtio_net_hdr over descriptors (2.6.4). */
static uint8_t *iov_byte(const struct iovec *iov, uint32_t cnt, uint64_t off)
{
    for (uint32_t i = 0; i < cnt; i++) {
        if (off < iov[i].iov_len)
            return (uint8_t *)iov[i].iov_base + off;
        off -= iov[i].iov_len;
    }
    return NULL;
}

/* Copy hdr+frame (buf, len) into one ring; caller holds slot->lock.
 * Returns 1 delivered, 0 no room, NITRO_ERR_GUEST. */
static int fill_ring(struct nitro_vq *vq, bool mrg, const uint8_t *buf,
                     uint32_t len)
{
    uint16_t heads[MAX_RX_BUFS];
    uint32_t lens[MAX_RX_BUFS];
    uint8_t *nb_lo = NULL, *nb_hi = NULL;  /* num_buffers in the 1st buffer */
    uint32_t n = 0, done = 0;
    while (done < len) {
        struct nitro_chain *c;
        int rc = n < MAX_RX_BUFS ? nitro_vq_pop(vq, &c) : 0;
        if (rc <= 0) {
            nitro_vq_unpop(vq, (uint16_t)n);
            return rc;
        }
        /* RX buffers are device-writable only (5.1.6.3) and the first one
         * holds at least the header (with MRG_RXBUF every one must). */
        if (c->n_out != 0 || c->n_in == 0 ||
            (n == 0 && c->in_len < NITRO_NET_HDR_LEN)) {
            nitro_vq_unpop(vq, (uint16_t)(n + 1));
            return nitro_vq_set_fault(vq, NITRO_FAULT_REQUEST);
        }
        uint64_t room = c->in_len < len - done ? c->in_len : len - done;
        if (n == 0) {
            /* num_buffers: le16 at offset 10 of virtio_net_hdr_v1. The
             * chain's iovecs are gone after the next pop: keep where. */
            nb_lo = iov_byte(c->iov, c->n_in, 10);
            nb_hi = iov_byte(c->iov, c->n_in, 11);
        }
        nitro_buf_to_iov(c->iov, (int)c->n_in, buf + done, room);
        heads[n] = c->head;
        lens[n] = (uint32_t)room;
        n++;
        done += (uint32_t)room;
        if (!mrg && done < len) {
            nitro_vq_unpop(vq, (uint16_t)n);
            return 0;  /* one buffer must hold the whole frame */
        }
    }
    *nb_lo = (uint8_t)n;
    *nb_hi = (uint8_t)(n >> 8);
    nitro_vq_push_batch(vq, heads, lens, n);
    return 1;
}

/* Deliver hdr+frame to port dst. `hint` spreads senders over the
 * destination's queue pairs. If the destination did not negotiate
 * GUEST_CSUM a partial checksum is completed first (in buf, which the
 * caller may reuse). dirty NULL: call the guest now, else once per batch. */
static bool deliver(struct port *dst, uint8_t *buf, uint32_t len,
                    uint32_t hint, struct dirty *dirty)
{
    uint32_t flen = len - NITRO_NET_HDR_LEN;
    if (!port_admit(dst, flen, true))
        return false;
    uint64_t feat = __atomic_load_n(&dst->features, __ATOMIC_RELAXED);
    if (!((feat >> VIRTIO_NET_F_GUEST_CSUM) & 1) && !complete_csum(buf, len)) {
        drop(&dst->stats, NITRO_NET_DROP_BAD_HEADER);
        return false;
    }
    bool mrg = (feat >> VIRTIO_NET_F_MRG_RXBUF) & 1;
    uint32_t pairs = __atomic_load_n(&dst->rx_pairs, __ATOMIC_RELAXED);
    for (uint32_t k = 0; k < pairs; k++) {
        struct rx_slot *slot = &dst->rx[(hint + k) % pairs];
        /* Unlocked peek: a detached slot is skipped cheaply. */
        if (__atomic_load_n(&slot->vq, __ATOMIC_RELAXED) == NULL)
            continue;
        pthread_mutex_lock(&slot->lock);
        struct nitro_vq *vq = slot->vq;
        int rc = 0;
        if (vq != NULL) {
            bool healthy = nitro_vq_fault(vq) == NITRO_FAULT_NONE;
            rc = fill_ring(vq, mrg, buf, len);
            /* This delivery broke the ring: its worker sleeps on the kick
             * fd, so kick it to report the fault (Python then stops the
             * device and detaches the ring). */
            if (rc < 0 && healthy)
                nitro_vq_wake(vq);
            if (rc == 1 && dirty == NULL)
                nitro_vq_notify(vq);
        }
        pthread_mutex_unlock(&slot->lock);
        if (vq == NULL)
            continue;
        if (rc == 1) {
            if (dirty != NULL)
                mark_dirty(dirty, slot);
            nitro_stat_add(&dst->stats.packets_in, 1);
            nitro_stat_add(&dst->stats.bytes_in, flen);
            return true;
        }
        break;  /* ring full or broken: drop, do not spill to another ring */
    }
    drop(&dst->stats, NITRO_NET_DROP_NO_RX_BUFFER);
    return false;
}

static void to_uplink(struct vpc *v, uint8_t *buf, uint32_t len)
{
    if (!complete_csum(buf, len)) {
        drop(&v->uplink_stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    ssize_t n;
    do
        n = write(v->uplink_fd, buf + NITRO_NET_HDR_LEN, len - NITRO_NET_HDR_LEN);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        drop(&v->uplink_stats, NITRO_NET_DROP_NO_RX_BUFFER);
        return;
    }
    nitro_stat_add(&v->uplink_stats.packets_in, 1);
    nitro_stat_add(&v->uplink_stats.bytes_in, len - NITRO_NET_HDR_LEN);
}

/* Forward hdr+frame by destination MAC inside VPC v. src is the sending
 * port (NULL: the uplink). Returns true if anyone got it. */
static bool forward(struct nitro_switch *sw, struct vpc *v, struct port *src,
                    uint8_t *buf, uint32_t len, uint32_t hint,
                    struct dirty *dirty)
{
    const uint8_t *dmac = buf + NITRO_NET_HDR_LEN;
    struct nitro_port_stats *ss = src ? &src->stats : &v->uplink_stats;
    if (dmac[0] & 1) {  /* broadcast / multicast: flood the VPC */
        bool any = false;
        for (uint32_t i = 0; i < v->nports; i++) {
            struct port *p = &sw->ports[v->ports[i]];
            if (p != src)
                any |= deliver(p, buf, len, hint, dirty);
        }
        if (src != NULL && v->uplink_fd >= 0) {
            to_uplink(v, buf, len);
            any = true;
        }
        return any;
    }
    for (uint32_t i = 0; i < v->nports; i++) {
        struct port *p = &sw->ports[v->ports[i]];
        if (memcmp(p->mac, dmac, 6) == 0) {
            if (p == src)
                break;
            return deliver(p, buf, len, hint, dirty);
        }
    }
    if (src != NULL && v->uplink_fd >= 0 && memcmp(v->uplink_mac, dmac, 6) == 0) {
        to_uplink(v, buf, len);
        return true;
    }
    drop(ss, NITRO_NET_DROP_UNKNOWN_DESTINATION);
    return false;
}

/* ---- punt queue ------------------------------------------------------------ */

/* The eventfd is readable exactly while the queue is non-empty: written on
 * empty -> non-empty, drained on non-empty -> empty, both under punt_lock,
 * so a busy queue costs no syscalls per frame. */
static void punt(struct nitro_switch *sw, uint32_t port, struct port *p,
                 const uint8_t *frame, uint32_t flen)
{
    if (flen > NITRO_NET_PUNT_MAX_FRAME) {
        drop(&p->stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    pthread_mutex_lock(&sw->punt_lock);
    bool full = sw->punt_count == NITRO_NET_PUNT_SLOTS;
    if (!full) {
        struct punt_entry *e =
            &sw->punt[(sw->punt_head + sw->punt_count) % NITRO_NET_PUNT_SLOTS];
        e->port = port;
        e->len = flen;
        memcpy(e->data, frame, flen);
        if (sw->punt_count++ == 0) {
            uint64_t one = 1;
            ssize_t n = write(sw->punt_fd, &one, sizeof(one));
            (void)n;  /* cannot fail: the counter was drained at empty */
        }
    }
    pthread_mutex_unlock(&sw->punt_lock);
    if (full) {
        drop(&p->stats, NITRO_NET_DROP_PUNT_OVERFLOW);
        return;
    }
    nitro_stat_add(&p->stats.punted, 1);
}

int nitro_switch_punt_fd(const struct nitro_switch *sw)
{
    return sw == NULL ? -1 : sw->punt_fd;
}

/* Take the oldest entry into buf (at most cap bytes); caller holds the
 * lock and has checked punt_count > 0. */
static uint32_t punt_take(struct nitro_switch *sw, uint32_t *port, uint8_t *buf)
{
    struct punt_entry *e = &sw->punt[sw->punt_head];
    uint32_t len = e->len;  /* at most NITRO_NET_PUNT_MAX_FRAME (punt checks) */
    memcpy(buf, e->data, len);
    *port = e->port;
    sw->punt_head = (sw->punt_head + 1) % NITRO_NET_PUNT_SLOTS;
    if (--sw->punt_count == 0) {
        uint64_t v;
        ssize_t r = read(sw->punt_fd, &v, sizeof(v));
        (void)r;
    }
    return len;
}

int32_t nitro_switch_punt_pop_batch(struct nitro_switch *sw, uint32_t *ports,
                                    uint32_t *lens, uint8_t *bufs, uint32_t n)
{
    if (sw == NULL || ports == NULL || lens == NULL || bufs == NULL ||
        n > NITRO_NET_PUNT_SLOTS)
        return NITRO_ERR_ARG;
    uint32_t got = 0;
    pthread_mutex_lock(&sw->punt_lock);
    while (got < n && sw->punt_count > 0) {
        lens[got] = punt_take(sw, &ports[got], bufs + (size_t)got * NITRO_NET_PUNT_MAX_FRAME);
        got++;
    }
    pthread_mutex_unlock(&sw->punt_lock);
    return (int32_t)got;
}

int nitro_switch_inject(struct nitro_switch *sw, uint32_t port,
                        const uint8_t *frame, uint32_t len)
{
    struct port *p = get_port(sw, port);
    if (p == NULL || len < ETH_HLEN || len > NITRO_NET_PUNT_MAX_FRAME)
        return NITRO_ERR_ARG;
    uint8_t buf[NITRO_NET_HDR_LEN + NITRO_NET_PUNT_MAX_FRAME];
    memset(buf, 0, NITRO_NET_HDR_LEN);
    memcpy(buf + NITRO_NET_HDR_LEN, frame, len);
    return deliver(p, buf, len + NITRO_NET_HDR_LEN, 0, NULL) ? 1 : 0;
}

/* ---- TX classification ----------------------------------------------------- */

enum verdict { FORWARD, PUNT, DROP };

static enum verdict drop_as(struct port *p, unsigned reason)
{
    drop(&p->stats, reason);
    return DROP;
}

/* Anti-spoofing and control-plane classification of one frame from port p.
 * frame/flen exclude the virtio header; flen >= ETH_HLEN. */
static enum verdict classify(struct vpc *v, struct port *p,
                             const uint8_t *frame, uint32_t flen)
{
    if (memcmp(frame + 6, p->mac, 6) != 0)
        return drop_as(p, NITRO_NET_DROP_SPOOFED_SOURCE);
    uint16_t type = ld16be(frame + 12);
    /* A tag would hide the real ethertype (and an IPv4 source) from the
     * checks below while a receiver with a VLAN device decodes it. */
    if (type == ETH_P_8021Q || type == ETH_P_8021AD || type == ETH_P_QINQ1)
        return drop_as(p, NITRO_NET_DROP_BAD_HEADER);
    if (type == ETH_P_ARP) {
        /* Ethernet/IPv4 ARP only (RFC 826): htype 1, ptype IPv4, hlen 6,
         * plen 4, so the sender MAC is at 22 and the sender IP at 28. */
        if (flen < ETH_HLEN + 28 || ld16be(frame + 14) != 1 ||
            ld16be(frame + 16) != ETH_P_IP || frame[18] != 6 || frame[19] != 4)
            return drop_as(p, NITRO_NET_DROP_BAD_HEADER);
        static const uint8_t zero[4];
        const uint8_t *sha = frame + 22, *spa = frame + 28;
        if (memcmp(sha, p->mac, 6) != 0 ||
            (memcmp(spa, p->ip, 4) != 0 && memcmp(spa, zero, 4) != 0))
            return drop_as(p, NITRO_NET_DROP_SPOOFED_SOURCE);
        /* Requests are answered by nitro (gateway, VPC peers, uplink). */
        if (ld16be(frame + 20) == 1)
            return PUNT;
        return FORWARD;
    }
    if (type == ETH_P_IP) {
        const uint8_t *ip = frame + ETH_HLEN;
        if (flen < ETH_HLEN + 20 || (ip[0] >> 4) != 4)
            return drop_as(p, NITRO_NET_DROP_BAD_HEADER);
        /* RFC 791: header length >= 20 and inside the frame; total length
         * covers the header and fits the frame (Ethernet may pad). */
        uint32_t ihl = (uint32_t)(ip[0] & 0xf) * 4;
        uint32_t tot = ld16be(ip + 2);
        if (ihl < 20 || ETH_HLEN + ihl > flen || tot < ihl ||
            ETH_HLEN + tot > flen)
            return drop_as(p, NITRO_NET_DROP_BAD_HEADER);
        const uint8_t *src = ip + 12, *dst = ip + 16, *l4 = ip + ihl;
        uint32_t l4len = tot - ihl;
        uint16_t frag = ld16be(ip + 6);
        bool first = (frag & 0x1fff) == 0;   /* offset 0: has the L4 header */
        bool whole = (frag & 0x3fff) == 0;   /* and no more fragments */
        uint8_t proto = ip[9];
        bool dhcp = proto == IPPROTO_UDP_ && first && l4len >= 8 &&
                    ld16be(l4 + 2) == DHCP_SERVER_PORT;
        static const uint8_t any[4];
        if (memcmp(src, p->ip, 4) != 0 && !(dhcp && memcmp(src, any, 4) == 0))
            return drop_as(p, NITRO_NET_DROP_SPOOFED_SOURCE);
        if (dhcp)
            return PUNT;
        if (memcmp(dst, v->gw_ip, 4) == 0) {
            /* The gateway answers ICMP echo and nothing else: the rest
             * would only be thrown away on the trio thread. */
            if (proto == IPPROTO_ICMP_ && whole && l4len >= 8 &&
                l4[0] == ICMP_ECHO_REQUEST)
                return PUNT;
            return drop_as(p, NITRO_NET_DROP_TO_GATEWAY);
        }
        return FORWARD;
    }
    return FORWARD;  /* IPv6 and others: source MAC checked above */
}

/* Check the sender's virtio_net_hdr (5.1.6.2) and replace it by the header
 * receivers get: only NEEDS_CSUM and its offsets survive, gso NONE,
 * num_buffers 0 (fill_ring sets it). Bad offsets are the sender's fault,
 * so they are refused here once, not by each receiver. */
static bool tx_header(uint8_t *hdr, uint32_t flen)
{
    uint8_t flags = hdr[0];
    /* No HOST_TSO/UFO offered: a GSO header is a driver bug; DATA_VALID
     * and RSC_INFO are device -> driver only. */
    if ((flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM) != 0 ||
        hdr[1] != VIRTIO_NET_HDR_GSO_NONE)
        return false;
    uint16_t start = 0, off = 0;
    if (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        start = ld16le(hdr + 6);
        off = ld16le(hdr + 8);
        if ((uint32_t)start + off + 2 > flen)
            return false;
    }
    memset(hdr, 0, NITRO_NET_HDR_LEN);
    hdr[0] = flags;
    st16le(hdr + 6, start);
    st16le(hdr + 8, off);
    return true;
}

struct tx_ctx {
    struct nitro_switch *sw;
    uint32_t port_id;
    struct port *p;
    struct vpc *v;
    uint32_t hint;
    uint8_t *buf;  /* SCRATCH_LEN */
    struct dirty dirty;
};

static void tx_one(struct tx_ctx *t, const struct nitro_chain *c)
{
    struct port *p = t->p;
    if (c->out_len < NITRO_NET_HDR_LEN + ETH_HLEN ||
        c->out_len > NITRO_NET_HDR_LEN + NITRO_NET_MAX_FRAME) {
        drop(&p->stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    uint32_t len = (uint32_t)c->out_len;
    nitro_iov_to_buf(c->iov, (int)c->n_out, t->buf, len);
    uint8_t *frame = t->buf + NITRO_NET_HDR_LEN;
    uint32_t flen = len - NITRO_NET_HDR_LEN;
    if (!tx_header(t->buf, flen)) {
        drop(&p->stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    if (flen > t->v->mtu + ETH_HLEN) {
        drop(&p->stats, NITRO_NET_DROP_MTU);
        return;
    }
    if (!port_admit(p, flen, false))
        return;
    enum verdict vd = classify(t->v, p, frame, flen);
    if (vd == DROP)
        return;
    nitro_stat_add(&p->stats.packets_out, 1);
    nitro_stat_add(&p->stats.bytes_out, flen);
    if (vd == PUNT) {
        /* Python parses plain frames: complete a partial checksum. */
        if (!complete_csum(t->buf, len)) {
            drop(&p->stats, NITRO_NET_DROP_BAD_HEADER);
            return;
        }
        punt(t->sw, t->port_id, p, frame, flen);
        return;
    }
    forward(t->sw, t->v, p, t->buf, len, t->hint, &t->dirty);
}

static int64_t tx_batch(struct tx_ctx *t, struct nitro_vq *vq)
{
    uint16_t heads[TX_BATCH];
    uint32_t lens[TX_BATCH];
    uint32_t n = 0;
    int rc = 0;
    while (n < TX_BATCH) {
        struct nitro_chain *c;
        rc = nitro_vq_pop(vq, &c);
        if (rc <= 0)
            break;
        tx_one(t, c);
        heads[n] = c->head;
        lens[n] = 0;  /* TX buffers are device-readable: nothing written */
        n++;
    }
    /* Also when the guest broke the ring mid-batch: the chains taken so far
     * were switched, so they are completed and their receivers called. */
    nitro_vq_push_batch(vq, heads, lens, n);
    if (n > 0)
        nitro_vq_notify(vq);
    flush_dirty(&t->dirty);
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
    struct port *p = get_port(sw, port);
    if (p == NULL || vq == NULL || !nitro_vq_ready(vq))
        return NITRO_ERR_ARG;
    if (nitro_vq_fault(vq) != NITRO_FAULT_NONE)
        return NITRO_ERR_GUEST;
    struct tx_ctx t = {.sw = sw, .port_id = port, .p = p,
                       .v = &sw->vpcs[p->vpc], .hint = port};
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

int64_t nitro_net_ctrl_serve(struct nitro_vq *vq, uint32_t max_pairs,
                             int idle_ms)
{
    if (vq == NULL || !nitro_vq_ready(vq))
        return NITRO_ERR_ARG;
    int64_t total = 0;
    for (;;) {
        struct nitro_chain *c;
        int rc;
        uint32_t pushed = 0;
        while ((rc = nitro_vq_pop(vq, &c)) == 1) {
            if (c->n_in == 0) {
                rc = nitro_vq_set_fault(vq, NITRO_FAULT_REQUEST);
                break;
            }
            uint8_t ack = ctrl_answer(c, max_pairs);
            /* The ack is the last writable byte (5.1.6.5). */
            const struct iovec *last = &c->iov[c->n_out + c->n_in - 1];
            ((uint8_t *)last->iov_base)[last->iov_len - 1] = ack;
            nitro_vq_push(vq, c->head, 1);
            pushed++;
            total++;
        }
        if (pushed > 0)
            nitro_vq_notify(vq);
        if (rc < 0)
            return rc;
        int e = nitro_vq_enable_notify(vq);
        if (e < 0)
            return e;
        if (e > 0)
            continue;
        if (nitro_vq_kick_fd(vq) < 0 || nitro_vq_stopping(vq))
            return total;
        e = nitro_vq_wait_kick(vq, idle_ms);
        if (e < 0)
            return e;
        if (e != NITRO_VQ_WAIT_KICK)
            return total;
    }
}

/* ---- uplink (TAP) ------------------------------------------------------------ */

int64_t nitro_switch_uplink_serve(struct nitro_switch *sw, uint32_t vpc,
                                  int timeout_ms)
{
    if (sw == NULL || vpc >= NITRO_NET_MAX_VPCS || sw->vpcs[vpc].uplink_fd < 0)
        return NITRO_ERR_ARG;
    struct vpc *v = &sw->vpcs[vpc];
    struct pollfd pfd = {.fd = v->uplink_fd, .events = POLLIN};
    int r = poll(&pfd, 1, timeout_ms);
    if (r < 0)
        return errno == EINTR ? 0 : NITRO_ERR_SYS;
    if (r == 0)
        return 0;
    struct dirty dirty = {0};
    int64_t total = 0;
    uint8_t *buf = v->uplink_buf;
    for (int i = 0; i < TX_BATCH; i++) {
        ssize_t n = read(v->uplink_fd, buf + NITRO_NET_HDR_LEN, NITRO_NET_MAX_FRAME);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            break;  /* EAGAIN: drained */
        total++;
        uint16_t type = n >= ETH_HLEN ? ld16be(buf + NITRO_NET_HDR_LEN + 12) : 0;
        if (n < ETH_HLEN || type == ETH_P_8021Q || type == ETH_P_8021AD ||
            type == ETH_P_QINQ1) {
            drop(&v->uplink_stats, NITRO_NET_DROP_BAD_HEADER);
            continue;
        }
        if ((uint32_t)n > v->mtu + ETH_HLEN) {
            drop(&v->uplink_stats, NITRO_NET_DROP_MTU);
            continue;
        }
        memset(buf, 0, NITRO_NET_HDR_LEN);
        nitro_stat_add(&v->uplink_stats.packets_out, 1);
        nitro_stat_add(&v->uplink_stats.bytes_out, (uint64_t)n);
        forward(sw, v, NULL, buf, (uint32_t)n + NITRO_NET_HDR_LEN, 0, &dirty);
    }
    flush_dirty(&dirty);
    return total;
}

/* ---- counters ------------------------------------------------------------------ */

static void snapshot(const struct nitro_port_stats *s, struct nitro_port_stats *out)
{
    const uint64_t *src = (const uint64_t *)s;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*s) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

int nitro_switch_port_stats(const struct nitro_switch *sw, uint32_t port,
                            struct nitro_port_stats *out)
{
    if (sw == NULL || out == NULL || port >= NITRO_NET_MAX_PORTS ||
        !sw->ports[port].used)
        return NITRO_ERR_ARG;
    snapshot(&sw->ports[port].stats, out);
    return NITRO_OK;
}

int nitro_switch_uplink_stats(const struct nitro_switch *sw, uint32_t vpc,
                              struct nitro_port_stats *out)
{
    if (sw == NULL || out == NULL || vpc >= NITRO_NET_MAX_VPCS ||
        !sw->vpcs[vpc].used)
        return NITRO_ERR_ARG;
    snapshot(&sw->vpcs[vpc].uplink_stats, out);
    return NITRO_OK;
}
