/*
 * nitro_switch.c: the VPC switch (see nitro_net.h for the model and
 * nitro_switch_internal.h for what is shared between threads): tables,
 * rate limits, TX classification (anti-spoofing, punt), delivery into RX
 * rings and the uplink TAP, the punt queue, inject, the uplink reader and
 * the counters. The rings' serving loops are in nitro_net_queue.c, the
 * packet maths in nitro_pkt.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "nitro_guard.h"
#include "nitro_iov.h"
#include "nitro_pkt.h"
#include "nitro_switch_internal.h"

#define MAX_RX_BUFS 64

/* ---- rate limits ----------------------------------------------------------- */

/* Admission of pkts packets (wire segments) of len bytes in all, in
 * direction in/out; counts the ENA-style allowance counter that refused it.
 * *now is the clock for the refill, read on first need (0: not yet): a
 * batch shares one reading, as a clock read costs about what a 64 B
 * frame's classification does. */
static bool port_admit_at(struct port *p, uint64_t pkts, uint64_t len,
                          bool in, uint64_t *now)
{
    struct nitro_bucket *bw = in ? &p->bw_in : &p->bw_out;
    if (bw->rate == 0 && p->pps.rate == 0)
        return true;
    if (*now == 0)
        *now = nitro_now_ns();
    bool ok_pps, ok_bw = true;
    pthread_mutex_lock(&p->bucket_lock);
    ok_pps = nitro_bucket_take(&p->pps, pkts, *now);
    if (ok_pps) {
        ok_bw = nitro_bucket_take(bw, len, *now);
        if (!ok_bw && p->pps.rate)
            p->pps.tokens += (int64_t)pkts;  /* it does not go: give back */
    }
    pthread_mutex_unlock(&p->bucket_lock);
    if (!ok_pps)
        nitro_stat_add(&p->stats.pps_allowance_exceeded, 1);
    else if (!ok_bw)
        nitro_stat_add(in ? &p->stats.bw_in_allowance_exceeded
                          : &p->stats.bw_out_allowance_exceeded, 1);
    return ok_pps && ok_bw;
}

/* port_admit_at for one frame on its own. */
static bool port_admit(struct port *p, uint64_t pkts, uint64_t len, bool in)
{
    uint64_t now = 0;
    return port_admit_at(p, pkts, len, in, &now);
}

/* The port's budget for frames to the card's own services (what is
 * punted to the trio thread): EC2 gives each ENI 1024 packets per second
 * and counts the excess as linklocal_allowance_exceeded. Without it one
 * guest's ARP/DHCP flood would take the trio thread (and the punt queue)
 * from every other guest. */
static bool port_admit_linklocal(struct port *p)
{
    if (p->linklocal.rate == 0)
        return true;
    pthread_mutex_lock(&p->bucket_lock);
    bool ok = nitro_bucket_take(&p->linklocal, 1, nitro_now_ns());
    pthread_mutex_unlock(&p->bucket_lock);
    if (!ok)
        nitro_stat_add(&p->stats.linklocal_allowance_exceeded, 1);
    return ok;
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
    for (uint32_t v = 0; v < NITRO_NET_MAX_VPCS; v++) {
        sw->vpcs[v].uplink_fd = -1;
        sw->vpcs[v].vni = UINT32_MAX;
    }
    if (nitro_ul_init(sw) != NITRO_OK) {
        nitro_switch_free(sw);
        return NULL;
    }
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
    nitro_ul_fini(sw);
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

/* fe80::/64 with the modified EUI-64 interface identifier of mac
 * (RFC 4291 2.5.1 and appendix A: the universal/local bit inverted,
 * ff:fe in the middle). */
static void set_link_local(uint8_t ll[16], const uint8_t mac[6])
{
    memset(ll, 0, 16);
    ll[0] = 0xfe;
    ll[1] = 0x80;
    ll[8] = mac[0] ^ 0x02;
    ll[9] = mac[1];
    ll[10] = mac[2];
    ll[11] = 0xff;
    ll[12] = 0xfe;
    ll[13] = mac[3];
    ll[14] = mac[4];
    ll[15] = mac[5];
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
    set_link_local(p->ip6_ll, p->mac);
    uint64_t frame_max = v->mtu + ETH_HLEN;
    nitro_bucket_init(&p->bw_in, params->bw_in_bytes_per_sec, frame_max);
    nitro_bucket_init(&p->bw_out, params->bw_out_bytes_per_sec, frame_max);
    nitro_bucket_init(&p->pps, params->pps, 1);
    nitro_bucket_init(&p->linklocal, params->linklocal_pps, 1);
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
        v->uplink_buf = malloc(FRAME_BUF_LEN);
        if (v->uplink_buf == NULL)
            return NITRO_ERR_NOMEM;
    }
    v->uplink_fd = fd;
    if (mac != NULL)
        memcpy(v->uplink_mac, mac, 6);
    return NITRO_OK;
}

int nitro_switch_set_port_features(struct nitro_switch *sw, uint32_t port,
                                   uint64_t features)
{
    struct port *p = nitro_sw_port(sw, port);
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

/* ---- guest memory that vanishes under a delivery (nitro_guard.h) -------- */

/* What an RX slot's guard answers for: the memory of the ring attached to
 * it (stable: the guard's owner holds the slot lock). */
static bool slot_covers(const void *ctx, const void *addr)
{
    const struct rx_slot *slot = ctx;
    const struct nitro_vq *vq = __atomic_load_n(&slot->vq, __ATOMIC_RELAXED);
    return vq != NULL && nitro_vq_covers(vq, addr);
}

/* The recovery path of a slot's guard; the slot lock is held. A fault in
 * the receiver's memory breaks the receiver's ring (its worker is kicked
 * to report it) and the delivery ends: NITRO_ERR_GUEST. A fault in the
 * sender's memory (the fast path copies straight out of its TX buffers):
 * the RX buffers popped since the last publish are given back untouched
 * as far as the driver can tell (used->idx never covered them), the lock
 * is released, and the sender's guard breaks the sender's ring. */
static int slot_fault(struct nitro_guard *g, struct nitro_vq *vq)
{
    if (!nitro_guard_mine(g)) {
        if (vq != NULL)
            nitro_vq_unpop(vq, UINT16_MAX);
        nitro_guard_rethrow(g);
    }
    if (nitro_vq_fault(vq) == NITRO_FAULT_NONE) {
        nitro_vq_set_fault(vq, NITRO_FAULT_MEMORY);
        nitro_vq_wake(vq);
    }
    nitro_guard_leave(g);
    return NITRO_ERR_GUEST;
}

/* Lock a slot inside its guard (entered by the caller). */
static void slot_lock(struct nitro_guard *g, struct rx_slot *slot)
{
    pthread_mutex_lock(&slot->lock);
    nitro_guard_hold(g, &slot->lock);
}

static void slot_unlock(struct nitro_guard *g, struct rx_slot *slot)
{
    nitro_guard_drop(g);
    pthread_mutex_unlock(&slot->lock);
    nitro_guard_leave(g);
}

static void set_rx(struct port *p, uint32_t pair, struct nitro_vq *vq)
{
    struct rx_slot *slot = &p->rx[pair];
    struct nitro_guard g;
    /* Taking the lock waits out a delivery in progress. */
    if (NITRO_GUARD_ENTER(&g, slot_covers, slot)) {
        slot_fault(&g, __atomic_load_n(&slot->vq, __ATOMIC_RELAXED));
        update_rx_pairs(p);
        return;
    }
    slot_lock(&g, slot);
    /* Deliveries take RX buffers when a frame comes and drop it when there
     * are none; nothing waits for the driver to add buffers, so its kicks
     * would only wake the worker for nothing (a polling driver such as
     * DPDK's kicks on every refill). With EVENT_IDX avail_event is simply
     * never advanced, which has the same effect. The store comes first so
     * that the guard covers the ring's memory. */
    __atomic_store_n(&slot->vq, vq, __ATOMIC_RELAXED);
    if (vq != NULL && nitro_vq_ready(vq))
        nitro_vq_disable_notify(vq);
    slot_unlock(&g, slot);
    update_rx_pairs(p);
}

int nitro_switch_attach_rx(struct nitro_switch *sw, uint32_t port,
                           uint32_t pair, struct nitro_vq *vq)
{
    struct port *p = nitro_sw_port(sw, port);
    /* A ring without addresses would be walked from NULL by the first
     * delivery: the daemon attaches only started rings, and so must anyone. */
    if (p == NULL || pair >= NITRO_NET_MAX_PAIRS || vq == NULL || !nitro_vq_ready(vq))
        return NITRO_ERR_ARG;
    set_rx(p, pair, vq);
    return NITRO_OK;
}

int nitro_switch_detach_rx(struct nitro_switch *sw, uint32_t port,
                           uint32_t pair)
{
    struct port *p = nitro_sw_port(sw, port);
    if (p == NULL || pair >= NITRO_NET_MAX_PAIRS)
        return NITRO_ERR_ARG;
    set_rx(p, pair, NULL);
    return NITRO_OK;
}

/* ---- delivery into an RX ring -------------------------------------------- */

/* Call the guest behind a slot if it is still attached. */
static void slot_notify(struct rx_slot *slot)
{
    struct nitro_guard g;
    if (NITRO_GUARD_ENTER(&g, slot_covers, slot)) {
        slot_fault(&g, __atomic_load_n(&slot->vq, __ATOMIC_RELAXED));
        return;
    }
    slot_lock(&g, slot);
    /* A ring re-attached meanwhile gets a spurious call: harmless. */
    if (slot->vq != NULL)
        nitro_vq_notify(slot->vq);
    slot_unlock(&g, slot);
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

void nitro_sw_flush_dirty(struct dirty *d)
{
    for (uint32_t i = 0; i < d->n; i++)
        slot_notify(d->slot[i]);
    d->n = 0;
    if (d->ul != NULL)
        nitro_ul_tx_flush(d->ul);
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

/* Where a frame's bytes are: `head` holds the first head_len, the rest is
 * still in the sender's iovecs (which also hold the head: offsets count
 * from their start). A frame in one buffer is all head. */
struct frame_src {
    uint32_t len;
    const uint8_t *head;
    uint32_t head_len;
    const struct iovec *iov;
    int cnt;
};

/* Copy n bytes of the frame, from byte `from` on, into dst iovecs. On the
 * fast path this copies guest memory to guest memory, and the two may be
 * one: a VM with two NICs on the switch has one memory for both, so NIC B's
 * RX buffer can overlap NIC A's TX buffer. memcpy of overlapping ranges is
 * undefined behaviour: memmove (fuzz finding). */
static void src_copy(const struct frame_src *f, uint64_t from,
                     const struct iovec *dst, int dcnt, uint64_t n)
{
    int di = 0;
    uint64_t doff = 0, soff = from;
    while (n > 0 && di < dcnt) {
        const uint8_t *src;
        uint64_t avail;
        if (soff < f->head_len) {
            src = f->head + soff;
            avail = f->head_len - soff;
        } else {
            uint64_t skip = soff;
            int si = 0;
            while (si < f->cnt && skip >= f->iov[si].iov_len)
                skip -= f->iov[si++].iov_len;
            if (si == f->cnt)
                return;
            src = (const uint8_t *)f->iov[si].iov_base + skip;
            avail = f->iov[si].iov_len - skip;
        }
        uint64_t k = dst[di].iov_len - doff;
        if (k > avail)
            k = avail;
        if (k > n)
            k = n;
        memmove((uint8_t *)dst[di].iov_base + doff, src, k);
        n -= k;
        soff += k;
        doff += k;
        if (doff == dst[di].iov_len) {
            di++;
            doff = 0;
        }
    }
}

/* Copy a frame into RX buffers of vq without publishing them: their heads
 * and lengths are appended at heads/lens[*nb]. The caller holds the slot
 * lock. 1 delivered, 0 no room (nothing taken), NITRO_ERR_GUEST. */
static int fill_frame(struct nitro_vq *vq, bool mrg, const struct frame_src *f,
                      uint16_t *heads, uint32_t *lens, uint32_t *nb)
{
    uint8_t *nb_lo = NULL, *nb_hi = NULL;  /* num_buffers in the 1st buffer */
    uint32_t n = 0, done = 0;
    while (done < f->len) {
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
        uint64_t room = c->in_len < f->len - done ? c->in_len : f->len - done;
        if (n == 0) {
            /* num_buffers: le16 at offset 10 of virtio_net_hdr_v1. The
             * chain's iovecs are gone after the next pop: keep where. */
            nb_lo = iov_byte(c->iov, c->n_in, 10);
            nb_hi = iov_byte(c->iov, c->n_in, 11);
        }
        src_copy(f, done, c->iov, (int)c->n_in, room);
        heads[*nb + n] = c->head;
        lens[*nb + n] = (uint32_t)room;
        n++;
        done += (uint32_t)room;
        if (!mrg && done < f->len) {
            nitro_vq_unpop(vq, (uint16_t)n);
            return 0;  /* one buffer must hold the whole frame */
        }
    }
    *nb_lo = (uint8_t)n;
    *nb_hi = (uint8_t)(n >> 8);
    *nb += n;
    return 1;
}

/* Copy hdr+frame (buf, len) into one ring and publish it. */
static int fill_ring(struct nitro_vq *vq, bool mrg, const uint8_t *buf,
                     uint32_t len)
{
    uint16_t heads[MAX_RX_BUFS];
    uint32_t lens[MAX_RX_BUFS];
    uint32_t nb = 0;
    struct frame_src f = {.len = len, .head = buf, .head_len = len};
    int rc = fill_frame(vq, mrg, &f, heads, lens, &nb);
    if (rc == 1)
        nitro_vq_push_batch(vq, heads, lens, nb);
    return rc;
}

/* fill_ring under the slot lock; call the guest now if asked. */
static int fill_ring_locked(struct nitro_vq *vq, bool mrg, const uint8_t *buf,
                            uint32_t len, bool notify)
{
    bool healthy = nitro_vq_fault(vq) == NITRO_FAULT_NONE;
    int rc = fill_ring(vq, mrg, buf, len);
    /* This delivery broke the ring: its worker sleeps on the kick fd, so
     * kick it to report the fault (Python then stops the device and
     * detaches the ring). */
    if (rc < 0 && healthy)
        nitro_vq_wake(vq);
    if (rc == 1 && notify)
        nitro_vq_notify(vq);
    return rc;
}

/* Deliver hdr+frame to port dst as one frame, counted as pkts packets of
 * bytes bytes in all (a passed-through super-frame: its wire segments).
 * `hint` spreads senders over the destination's queue pairs. If the
 * destination did not negotiate GUEST_CSUM a partial checksum is completed
 * first (in buf, which the caller may reuse). dirty NULL: call the guest
 * now, else once per batch. */
static bool deliver_one(struct port *dst, uint8_t *buf, uint32_t len,
                        uint64_t pkts, uint64_t bytes, uint32_t hint,
                        struct dirty *dirty)
{
    if (!port_admit(dst, pkts, bytes, true))
        return false;
    uint64_t feat = __atomic_load_n(&dst->features, __ATOMIC_RELAXED);
    if (!((feat >> VIRTIO_NET_F_GUEST_CSUM) & 1) && !nitro_pkt_csum_complete(buf, len)) {
        nitro_sw_drop(&dst->stats, NITRO_NET_DROP_BAD_HEADER);
        return false;
    }
    bool mrg = (feat >> VIRTIO_NET_F_MRG_RXBUF) & 1;
    uint32_t pairs = __atomic_load_n(&dst->rx_pairs, __ATOMIC_RELAXED);
    for (uint32_t k = 0; k < pairs; k++) {
        struct rx_slot *slot = &dst->rx[(hint + k) % pairs];
        /* Unlocked peek: a detached slot is skipped cheaply. */
        if (__atomic_load_n(&slot->vq, __ATOMIC_RELAXED) == NULL)
            continue;
        struct nitro_guard g;
        struct nitro_vq *vq;
        int rc;
        if (NITRO_GUARD_ENTER(&g, slot_covers, slot)) {
            vq = __atomic_load_n(&slot->vq, __ATOMIC_RELAXED);
            rc = slot_fault(&g, vq);
        } else {
            slot_lock(&g, slot);
            vq = slot->vq;
            rc = vq != NULL ? fill_ring_locked(vq, mrg, buf, len, dirty == NULL) : 0;
            slot_unlock(&g, slot);
        }
        if (vq == NULL)
            continue;
        if (rc == 1) {
            if (dirty != NULL)
                mark_dirty(dirty, slot);
            nitro_stat_add(&dst->stats.packets_in, pkts);
            nitro_stat_add(&dst->stats.bytes_in, bytes);
            return true;
        }
        break;  /* ring full or broken: drop, do not spill to another ring */
    }
    nitro_sw_drop(&dst->stats, NITRO_NET_DROP_NO_RX_BUFFER);
    return false;
}

/* Deliver hdr+frame to port dst. A TSO super-frame goes over whole, its
 * header kept, to a guest that negotiated GUEST_CSUM and the matching
 * GUEST_TSO4/6 (5.1.6.4: it then must take such frames), else as
 * segments cut into seg (FRAME_BUF_LEN; NULL: frame not from a guest, so
 * never a super-frame). Returns true if anything was delivered. */
static bool deliver(struct port *dst, uint8_t *buf, uint32_t len, uint8_t *seg,
                    uint32_t hint, struct dirty *dirty)
{
    if (buf[1] == VIRTIO_NET_HDR_GSO_NONE)
        return deliver_one(dst, buf, len, 1, len - NITRO_NET_HDR_LEN, hint, dirty);
    struct nitro_pkt_gso g;
    nitro_pkt_gso_get(buf, len, &g);
    uint64_t feat = __atomic_load_n(&dst->features, __ATOMIC_RELAXED);
    unsigned tso = g.v6 ? VIRTIO_NET_F_GUEST_TSO6 : VIRTIO_NET_F_GUEST_TSO4;
    if (((feat >> VIRTIO_NET_F_GUEST_CSUM) & 1) && ((feat >> tso) & 1))
        return deliver_one(dst, buf, len, g.segs,
                           nitro_pkt_gso_wire_bytes(&g, len - NITRO_NET_HDR_LEN), hint, dirty);
    if (seg == NULL) {
        nitro_sw_drop(&dst->stats, NITRO_NET_DROP_BAD_HEADER);
        return false;
    }
    bool any = false;
    for (uint32_t i = 0; i < g.segs; i++) {
        uint32_t sl = nitro_pkt_gso_cut(buf, &g, i, seg);
        any |= deliver_one(dst, seg, sl, 1, sl - NITRO_NET_HDR_LEN, hint, dirty);
    }
    return any;
}

/* Write one plain frame to the TAP (opened without IFF_VNET_HDR, so a
 * partial checksum is completed first). */
static void tap_write(struct vpc *v, uint8_t *buf, uint32_t len)
{
    if (!nitro_pkt_csum_complete(buf, len)) {
        nitro_sw_drop(&v->uplink_stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    ssize_t n;
    do
        n = write(v->uplink_fd, buf + NITRO_NET_HDR_LEN, len - NITRO_NET_HDR_LEN);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        nitro_sw_drop(&v->uplink_stats, NITRO_NET_DROP_NO_RX_BUFFER);
        return;
    }
    nitro_stat_add(&v->uplink_stats.packets_in, 1);
    nitro_stat_add(&v->uplink_stats.bytes_in, len - NITRO_NET_HDR_LEN);
}

/* To the uplink TAP: a super-frame goes as its segments (the host stack
 * gets ordinary frames of at most the MTU, checksums complete). */
static void to_uplink(struct vpc *v, uint8_t *buf, uint32_t len, uint8_t *seg)
{
    if (buf[1] == VIRTIO_NET_HDR_GSO_NONE) {
        tap_write(v, buf, len);
        return;
    }
    if (seg == NULL) {
        nitro_sw_drop(&v->uplink_stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    struct nitro_pkt_gso g;
    nitro_pkt_gso_get(buf, len, &g);
    for (uint32_t i = 0; i < g.segs; i++)
        tap_write(v, seg, nitro_pkt_gso_cut(buf, &g, i, seg));
}

/* Forward hdr+frame by destination MAC inside VPC v. src is the sending
 * port (NULL: the uplink). seg: room to cut a super-frame's segments in
 * (see deliver). Returns true if anyone got it. */
static bool forward(struct nitro_switch *sw, struct vpc *v, struct port *src,
                    uint8_t *buf, uint32_t len, uint8_t *seg, uint32_t hint,
                    struct dirty *dirty)
{
    const uint8_t *dmac = buf + NITRO_NET_HDR_LEN;
    struct nitro_port_stats *ss = src ? &src->stats : &v->uplink_stats;
    if (dmac[0] & 1) {  /* broadcast / multicast: flood the VPC */
        bool any = false;
        for (uint32_t i = 0; i < v->nports; i++) {
            struct port *p = &sw->ports[v->ports[i]];
            if (p != src)
                any |= deliver(p, buf, len, seg, hint, dirty);
        }
        if (src != NULL && v->uplink_fd >= 0) {
            to_uplink(v, buf, len, seg);
            any = true;
        }
        return any;
    }
    for (uint32_t i = 0; i < v->nports; i++) {
        struct port *p = &sw->ports[v->ports[i]];
        if (memcmp(p->mac, dmac, 6) == 0) {
            if (p == src)
                break;
            return deliver(p, buf, len, seg, hint, dirty);
        }
    }
    if (src != NULL && v->uplink_fd >= 0 && memcmp(v->uplink_mac, dmac, 6) == 0) {
        to_uplink(v, buf, len, seg);
        return true;
    }
    /* A guest on another host (the uplink's frames stay on this host). */
    if (src != NULL &&
        nitro_ul_tx_remote(sw, (uint32_t)(v - sw->vpcs), buf, len, seg, dirty))
        return true;
    nitro_sw_drop(ss, NITRO_NET_DROP_UNKNOWN_DESTINATION);
    return false;
}

/* ---- punt queue ------------------------------------------------------------ */

/* The eventfd is readable exactly while the queue is non-empty: written on
 * empty -> non-empty, drained on non-empty -> empty, both under punt_lock,
 * so a busy queue costs no syscalls per frame. A port holds at most
 * NITRO_NET_PUNT_PORT_SLOTS entries: past that its own frames overflow,
 * and the queue keeps room for the ports below their share. */
static void punt(struct nitro_switch *sw, uint32_t port, struct port *p,
                 const uint8_t *frame, uint32_t flen)
{
    if (flen > NITRO_NET_PUNT_MAX_FRAME) {
        nitro_sw_drop(&p->stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    pthread_mutex_lock(&sw->punt_lock);
    bool full = sw->punt_count == NITRO_NET_PUNT_SLOTS ||
                p->punt_queued >= NITRO_NET_PUNT_PORT_SLOTS;
    if (!full) {
        p->punt_queued++;
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
        nitro_sw_drop(&p->stats, NITRO_NET_DROP_PUNT_OVERFLOW);
        return;
    }
    nitro_stat_add(&p->stats.punted, 1);
}

int nitro_switch_punt_fd(const struct nitro_switch *sw)
{
    return sw == NULL ? NITRO_ERR_ARG : sw->punt_fd;
}

/* Take the oldest entry into buf (at most cap bytes); caller holds the
 * lock and has checked punt_count > 0. */
static uint32_t punt_take(struct nitro_switch *sw, uint32_t *port, uint8_t *buf)
{
    struct punt_entry *e = &sw->punt[sw->punt_head];
    uint32_t len = e->len;  /* at most NITRO_NET_PUNT_MAX_FRAME (punt checks) */
    memcpy(buf, e->data, len);
    *port = e->port;
    sw->ports[e->port].punt_queued--;
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
    struct port *p = nitro_sw_port(sw, port);
    if (p == NULL || len < ETH_HLEN || len > NITRO_NET_PUNT_MAX_FRAME)
        return NITRO_ERR_ARG;
    uint8_t buf[NITRO_NET_HDR_LEN + NITRO_NET_PUNT_MAX_FRAME];
    memset(buf, 0, NITRO_NET_HDR_LEN);
    memcpy(buf + NITRO_NET_HDR_LEN, frame, len);
    return deliver(p, buf, len + NITRO_NET_HDR_LEN, NULL, 0, NULL) ? 1 : 0;
}

/* ---- TX classification ----------------------------------------------------- */

enum verdict { FORWARD, PUNT, DROP };

static enum verdict drop_as(struct port *p, unsigned reason)
{
    nitro_sw_drop(&p->stats, reason);
    return DROP;
}

/* IPv6 from port p. A port has no IPv6 address of its own in the VPC, so
 * its only legitimate sources are its link-local address (fe80::/64 and
 * the modified EUI-64 of its MAC, RFC 4291 2.5.6 and appendix A) and the
 * unspecified address (duplicate address detection, RFC 4862 5.4.2); the
 * kernel's default addr_gen_mode gives a Linux guest exactly that one.
 * Router Advertisements and Redirects would make peers and the host route
 * through the guest (RFC 6105 RA-Guard): refused, also behind extension
 * headers (RFC 7113), as spoofed sources, since the guest poses as a
 * router. */
static enum verdict classify_ip6(struct port *p, const uint8_t *frame,
                                 uint32_t flen)
{
    uint8_t proto;
    uint32_t off;
    int rc = nitro_pkt_ip6_upper(frame, flen, &proto, &off);
    if (rc < 0)
        return drop_as(p, NITRO_NET_DROP_BAD_HEADER);
    static const uint8_t unspecified[16];
    const uint8_t *src = frame + ETH_HLEN + 8;
    if (memcmp(src, p->ip6_ll, 16) != 0 && memcmp(src, unspecified, 16) != 0)
        return drop_as(p, NITRO_NET_DROP_SPOOFED_SOURCE);
    if (rc == 1 && proto == IPPROTO_ICMPV6_) {
        if (off >= nitro_pkt_l3_end(frame, flen))
            return drop_as(p, NITRO_NET_DROP_BAD_HEADER);
        if (frame[off] == ND_ROUTER_ADVERT || frame[off] == ND_REDIRECT)
            return drop_as(p, NITRO_NET_DROP_SPOOFED_SOURCE);
    }
    return FORWARD;
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
    if (type == ETH_P_IPV6)
        return classify_ip6(p, frame, flen);
    return FORWARD;  /* other ethertypes: source MAC checked above */
}

void nitro_sw_tx_frame(struct nitro_switch *sw, uint32_t port_id,
                       struct port *p, uint8_t *buf, uint32_t len,
                       uint8_t *seg, uint32_t hint, struct dirty *dirty)
{
    struct vpc *v = &sw->vpcs[p->vpc];
    uint8_t *frame = buf + NITRO_NET_HDR_LEN;
    uint32_t flen = len - NITRO_NET_HDR_LEN;
    uint64_t feat = __atomic_load_n(&p->features, __ATOMIC_RELAXED);
    int bad = nitro_pkt_tx_header(buf, flen, feat, v->mtu);
    if (bad != NITRO_PKT_TX_OK) {
        nitro_sw_drop(&p->stats, (unsigned)bad);
        return;
    }
    /* Counted and rate-limited as the segments it puts on the wire. */
    uint64_t pkts = 1, wire = flen;
    bool gso = buf[1] != VIRTIO_NET_HDR_GSO_NONE;
    if (gso) {
        struct nitro_pkt_gso g;
        nitro_pkt_gso_get(buf, len, &g);
        pkts = g.segs;
        wire = nitro_pkt_gso_wire_bytes(&g, flen);
    }
    if (!port_admit(p, pkts, wire, false))
        return;
    enum verdict vd = classify(v, p, frame, flen);
    if (vd == DROP)
        return;
    if (vd == PUNT && gso) {  /* control frames are never TCP: defensive */
        nitro_sw_drop(&p->stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    if (vd == PUNT && !port_admit_linklocal(p))
        return;
    nitro_stat_add(&p->stats.packets_out, pkts);
    nitro_stat_add(&p->stats.bytes_out, wire);
    if (vd == PUNT) {
        /* Python parses plain frames: complete a partial checksum. */
        if (!nitro_pkt_csum_complete(buf, len)) {
            nitro_sw_drop(&p->stats, NITRO_NET_DROP_BAD_HEADER);
            return;
        }
        punt(sw, port_id, p, frame, flen);
        return;
    }
    forward(sw, v, p, buf, len, seg, hint, dirty);
}

/* ---- the fast path ---------------------------------------------------------- */

/* The receiving guest port of a unicast frame inside VPC v that can take
 * it unchanged, or NULL (anything else goes the slow way). */
static struct port *fast_destination(struct nitro_switch *sw, struct vpc *v,
                                     struct port *src, const uint8_t *hdr)
{
    const uint8_t *dmac = hdr + NITRO_NET_HDR_LEN;
    if (dmac[0] & 1)
        return NULL;
    for (uint32_t i = 0; i < v->nports; i++) {
        struct port *p = &sw->ports[v->ports[i]];
        if (memcmp(p->mac, dmac, 6) != 0)
            continue;
        if (p == src)
            return NULL;
        uint64_t feat = __atomic_load_n(&p->features, __ATOMIC_RELAXED);
        bool csum_ok = !(hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM) ||
                       ((feat >> VIRTIO_NET_F_GUEST_CSUM) & 1);
        return csum_ok ? p : NULL;
    }
    return NULL;
}

/* Plain IPv4 whose checked part is all in the head copy and that classify()
 * can only forward or drop (never punt: no DHCP, nothing to the gateway). */
static bool fast_ipv4(const struct vpc *v, const struct nitro_sw_fast *f)
{
    const uint8_t *frame = f->head + NITRO_NET_HDR_LEN;
    uint32_t flen = f->len - NITRO_NET_HDR_LEN;
    uint32_t have = f->head_len - NITRO_NET_HDR_LEN;
    if (f->head[1] != VIRTIO_NET_HDR_GSO_NONE || flen < ETH_HLEN + 20 ||
        ld16be(frame + 12) != ETH_P_IP)
        return false;
    const uint8_t *ip = frame + ETH_HLEN;
    uint32_t ihl = (uint32_t)(ip[0] & 0xf) * 4;
    if (ETH_HLEN + ihl + 8 > have || memcmp(ip + 16, v->gw_ip, 4) == 0)
        return false;
    const uint8_t *l4 = ip + ihl;
    return !(ip[9] == IPPROTO_UDP_ && ld16be(l4 + 2) == DHCP_SERVER_PORT);
}

enum nitro_sw_fast_verdict nitro_sw_tx_fast(struct nitro_switch *sw,
                                            struct port *p,
                                            struct nitro_sw_fast *f,
                                            struct port **dst,
                                            struct nitro_sw_tally *out)
{
    struct vpc *v = &sw->vpcs[p->vpc];
    if (!fast_ipv4(v, f) || (*dst = fast_destination(sw, v, p, f->head)) == NULL)
        return NITRO_SW_SLOW;
    /* From here as nitro_sw_tx_frame, on the checked copy of the head. */
    uint32_t flen = f->len - NITRO_NET_HDR_LEN;
    uint64_t feat = __atomic_load_n(&p->features, __ATOMIC_RELAXED);
    int bad = nitro_pkt_tx_header(f->head, flen, feat, v->mtu);
    if (bad != NITRO_PKT_TX_OK) {
        nitro_sw_drop(&p->stats, (unsigned)bad);
        return NITRO_SW_DONE;
    }
    if (!port_admit_at(p, 1, flen, false, &out->now))
        return NITRO_SW_DONE;
    enum verdict vd = classify(v, p, f->head + NITRO_NET_HDR_LEN, flen);
    if (vd == DROP)
        return NITRO_SW_DONE;
    if (vd == PUNT) {  /* fast_ipv4() rules it out: defensive */
        nitro_sw_drop(&p->stats, NITRO_NET_DROP_BAD_HEADER);
        return NITRO_SW_DONE;
    }
    out->packets++;
    out->bytes += flen;
    return NITRO_SW_FAST;
}

/* The RX slot a delivery to dst uses (hint spreads senders over pairs). */
static struct rx_slot *fast_slot(struct port *dst, uint32_t hint)
{
    uint32_t pairs = __atomic_load_n(&dst->rx_pairs, __ATOMIC_RELAXED);
    for (uint32_t k = 0; k < pairs; k++) {
        struct rx_slot *slot = &dst->rx[(hint + k) % pairs];
        if (__atomic_load_n(&slot->vq, __ATOMIC_RELAXED) != NULL)
            return slot;
    }
    return NULL;
}

#define FAST_MAX_BUFS (TX_BATCH + MAX_RX_BUFS)

/* Fill frames[*i, n) into slot's ring, publishing as the batch grows;
 * the caller holds the slot lock. *i, *delivered and *bytes say how far it
 * got, also when a fault cuts it short (they live in the caller's frame:
 * volatile, C11 7.13.2.1). */
static void fast_fill(struct port *dst, struct nitro_vq *vq, bool mrg,
                      struct nitro_sw_fast *frames, uint32_t n,
                      volatile uint32_t *i, volatile uint32_t *delivered,
                      volatile uint64_t *bytes)
{
    uint16_t heads[FAST_MAX_BUFS];
    uint32_t lens[FAST_MAX_BUFS];
    uint32_t nb = 0;
    uint64_t now = 0;
    bool healthy = nitro_vq_fault(vq) == NITRO_FAULT_NONE;
    nitro_vq_prefetch(vq, n - *i);  /* one buffer per frame, most often */
    for (; *i < n; (*i)++) {
        struct nitro_sw_fast *f = &frames[*i];
        if (!port_admit_at(dst, 1, f->len - NITRO_NET_HDR_LEN, true, &now))
            continue;
        if (nb + MAX_RX_BUFS > FAST_MAX_BUFS) {  /* publish what we have */
            nitro_vq_push_batch(vq, heads, lens, nb);
            nb = 0;
        }
        struct frame_src src = {.len = f->len, .head = f->head,
                                .head_len = f->head_len, .iov = f->iov,
                                .cnt = f->cnt};
        int rc = fill_frame(vq, mrg, &src, heads, lens, &nb);
        if (rc < 0 && healthy)
            nitro_vq_wake(vq);  /* its owner reports the fault */
        if (rc != 1)
            break;  /* ring full or broken: the rest is dropped */
        (*delivered)++;
        *bytes += f->len - NITRO_NET_HDR_LEN;
    }
    nitro_vq_push_batch(vq, heads, lens, nb);
}

/* fast_fill into the ring of slot, locked and guarded. */
static void fast_fill_slot(struct port *dst, struct rx_slot *slot, bool mrg,
                           struct nitro_sw_fast *frames, uint32_t n,
                           volatile uint32_t *i, volatile uint32_t *delivered,
                           volatile uint64_t *bytes)
{
    struct nitro_guard g;
    if (NITRO_GUARD_ENTER(&g, slot_covers, slot)) {
        /* The receiver's memory: frames filled but not published are lost
         * with its ring; the caller drops the rest. */
        slot_fault(&g, __atomic_load_n(&slot->vq, __ATOMIC_RELAXED));
        return;
    }
    slot_lock(&g, slot);
    struct nitro_vq *vq = slot->vq;
    if (vq != NULL)
        fast_fill(dst, vq, mrg, frames, n, i, delivered, bytes);
    slot_unlock(&g, slot);
}

void nitro_sw_deliver_fast(struct port *dst, struct nitro_sw_fast *frames,
                           uint32_t n, uint32_t hint, struct dirty *dirty)
{
    uint64_t feat = __atomic_load_n(&dst->features, __ATOMIC_RELAXED);
    bool mrg = (feat >> VIRTIO_NET_F_MRG_RXBUF) & 1;
    struct rx_slot *slot = fast_slot(dst, hint);
    volatile uint32_t i = 0, delivered = 0;
    volatile uint64_t bytes = 0;
    if (slot != NULL)
        fast_fill_slot(dst, slot, mrg, frames, n, &i, &delivered, &bytes);
    if (delivered > 0) {
        mark_dirty(dirty, slot);
        nitro_stat_add(&dst->stats.packets_in, delivered);
        nitro_stat_add(&dst->stats.bytes_in, bytes);
    }
    /* Frames after a full or broken ring (or to a port with no RX ring). */
    for (uint32_t k = i; k < n; k++)
        nitro_sw_drop(&dst->stats, NITRO_NET_DROP_NO_RX_BUFFER);
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
            nitro_sw_drop(&v->uplink_stats, NITRO_NET_DROP_BAD_HEADER);
            continue;
        }
        if ((uint32_t)n > v->mtu + ETH_HLEN) {
            nitro_sw_drop(&v->uplink_stats, NITRO_NET_DROP_MTU);
            continue;
        }
        memset(buf, 0, NITRO_NET_HDR_LEN);
        nitro_stat_add(&v->uplink_stats.packets_out, 1);
        nitro_stat_add(&v->uplink_stats.bytes_out, (uint64_t)n);
        forward(sw, v, NULL, buf, (uint32_t)n + NITRO_NET_HDR_LEN, NULL, 0, &dirty);
    }
    nitro_sw_flush_dirty(&dirty);
    return total;
}

/* ---- counters ------------------------------------------------------------------ */

int nitro_switch_port_stats(const struct nitro_switch *sw, uint32_t port,
                            struct nitro_port_stats *out)
{
    if (sw == NULL || out == NULL || port >= NITRO_NET_MAX_PORTS ||
        !sw->ports[port].used)
        return NITRO_ERR_ARG;
    nitro_stats_copy(out, &sw->ports[port].stats, sizeof(*out));
    return NITRO_OK;
}

int nitro_switch_uplink_stats(const struct nitro_switch *sw, uint32_t vpc,
                              struct nitro_port_stats *out)
{
    if (sw == NULL || out == NULL || vpc >= NITRO_NET_MAX_VPCS ||
        !sw->vpcs[vpc].used)
        return NITRO_ERR_ARG;
    nitro_stats_copy(out, &sw->vpcs[vpc].uplink_stats, sizeof(*out));
    return NITRO_OK;
}
