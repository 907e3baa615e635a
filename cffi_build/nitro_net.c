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
#include "nitro_ring.h"
#include "nitro_vring.h"

/* virtio 1.2 5.1.3 feature bits we look at. */
#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_GUEST_TSO4 7
#define VIRTIO_NET_F_GUEST_TSO6 8
#define VIRTIO_NET_F_HOST_TSO4 11
#define VIRTIO_NET_F_HOST_TSO6 12
#define VIRTIO_NET_F_MRG_RXBUF 15
/* 5.1.6 virtio_net_hdr flags and gso types. */
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_GSO_NONE 0
#define VIRTIO_NET_HDR_GSO_TCPV4 1
#define VIRTIO_NET_HDR_GSO_TCPV6 4

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_IPV6 0x86dd
#define ETH_P_8021Q 0x8100   /* VLAN tags: not supported, refused */
#define ETH_P_8021AD 0x88a8
#define ETH_P_QINQ1 0x9100   /* pre-802.1ad QinQ, still emitted by some stacks */
#define IPPROTO_ICMP_ 1
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define TCP_OFF_CHECK 16     /* checksum field in the TCP header */
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80
#define ICMP_ECHO_REQUEST 8
#define DHCP_SERVER_PORT 67
#define FRAME_BUF_LEN (NITRO_NET_HDR_LEN + NITRO_NET_MAX_FRAME)
/* A TX worker's scratch: the chain (header + frame up to 64 KiB, a TSO
 * super-frame included), then room for one segment cut from it (at most
 * the VPC MTU + Ethernet header, itself at most NITRO_NET_MAX_FRAME). */
#define SCRATCH_LEN (2 * FRAME_BUF_LEN)
#define TX_BATCH 64
#define MAX_RX_BUFS 64
#define DIRTY_MAX 32

struct bucket {
    uint64_t rate;      /* units per second; 0: unlimited */
    uint64_t burst;     /* bucket depth */
    int64_t tokens;     /* < 0: debt of a request larger than burst */
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
    b->tokens = (int64_t)b->burst;
    b->last_ns = now_ns();
}

/* Take n tokens if there are; refill by elapsed time first. Caller locks.
 * A request larger than the bucket (a TSO super-frame counted as its
 * segments) goes when the bucket is full and leaves it in debt, so the
 * long-run rate holds and such a request is never refused forever. */
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
            int64_t t = b->tokens + (int64_t)add;
            b->tokens = t > (int64_t)b->burst ? (int64_t)b->burst : t;
            b->last_ns = now;
        }
    }
    uint64_t need = n < b->burst ? n : b->burst;
    if (b->tokens < (int64_t)need)
        return false;
    b->tokens -= (int64_t)n;
    return true;
}

/* Admission of pkts packets (wire segments) of len bytes in all, in
 * direction in/out; counts the ENA-style allowance counter that refused it. */
static bool port_admit(struct port *p, uint64_t pkts, uint64_t len, bool in)
{
    struct bucket *bw = in ? &p->bw_in : &p->bw_out;
    if (bw->rate == 0 && p->pps.rate == 0)
        return true;
    uint64_t now = now_ns();
    bool ok_pps, ok_bw = true;
    pthread_mutex_lock(&p->bucket_lock);
    ok_pps = bucket_take(&p->pps, pkts, now);
    if (ok_pps) {
        ok_bw = bucket_take(bw, len, now);
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

static void st16be(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static uint32_t ld32be(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void st32be(uint8_t *p, uint32_t v)
{
    st16be(p, (uint16_t)(v >> 16));
    st16be(p + 2, (uint16_t)v);
}

static uint16_t csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* RFC 791 header checksum of the IPv4 header at ip (ihl bytes). */
static void ip4_set_csum(uint8_t *ip, uint32_t ihl)
{
    ip[10] = ip[11] = 0;
    st16be(ip + 10, (uint16_t)~csum_fold(csum_add(0, ip, ihl)));
}

/* Leave in the TCP checksum field what NEEDS_CSUM asks for (5.1.6.2): the
 * folded pseudo-header sum (RFC 793 / RFC 8200 8.1) for tcplen bytes of
 * TCP, so complete_csum or the receiver finishes it. */
static void tcp_set_pseudo(uint8_t *frame, uint32_t l4, bool v6, uint32_t tcplen)
{
    const uint8_t *ip = frame + ETH_HLEN;
    uint32_t sum = v6 ? csum_add(0, ip + 8, 32) : csum_add(0, ip + 12, 8);
    sum += IPPROTO_TCP_ + (tcplen >> 16) + (tcplen & 0xffff);
    st16be(frame + l4 + TCP_OFF_CHECK, csum_fold(sum));
}

/* ---- TCP segmentation offload ---------------------------------------------- */

/* A super-frame as tx_gso left it: its header is normalised (gso_type,
 * hdr_len = the real Ethernet + IP + TCP header length, gso_size,
 * csum_start = the TCP header, csum_offset 16) and its headers checked,
 * so these fields can be trusted. */
struct gso {
    bool v6;
    uint32_t l4, hlen, mss, paylen, segs;
};

static void gso_get(const uint8_t *buf, uint32_t len, struct gso *g)
{
    g->v6 = buf[1] == VIRTIO_NET_HDR_GSO_TCPV6;
    g->hlen = ld16le(buf + 2);
    g->mss = ld16le(buf + 4);
    g->l4 = ld16le(buf + 6);
    g->paylen = len - NITRO_NET_HDR_LEN - g->hlen;
    g->segs = g->paylen == 0 ? 1 : (g->paylen + g->mss - 1) / g->mss;
}

/* Bytes the segments of a super-frame of flen bytes put on the wire. */
static uint64_t gso_wire_bytes(const struct gso *g, uint32_t flen)
{
    return flen + (uint64_t)(g->segs - 1) * g->hlen;
}

/* Cut segment i of the super-frame buf into seg (header + frame) and
 * return its length, header included: headers copied, then IPv4 total
 * length, ID (+i) and header checksum or IPv6 payload length, TCP sequence
 * number (+ offset), FIN/PSH kept on the last segment only and CWR on the
 * first only (RFC 3168 6.1.2), and the TCP checksum left partial
 * (NEEDS_CSUM) for the receiver's path to finish. */
static uint32_t gso_cut(const uint8_t *buf, const struct gso *g, uint32_t i,
                        uint8_t *seg)
{
    const uint8_t *f = buf + NITRO_NET_HDR_LEN;
    uint8_t *s = seg + NITRO_NET_HDR_LEN;
    uint32_t off = i * g->mss;
    uint32_t n = g->paylen - off < g->mss ? g->paylen - off : g->mss;
    memset(seg, 0, NITRO_NET_HDR_LEN);
    seg[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    st16le(seg + 6, (uint16_t)g->l4);
    st16le(seg + 8, TCP_OFF_CHECK);
    memcpy(s, f, g->hlen);
    memcpy(s + g->hlen, f + g->hlen + off, n);
    uint8_t *ip = s + ETH_HLEN, *tcp = s + g->l4;
    uint32_t tcplen = g->hlen - g->l4 + n;
    if (g->v6) {
        st16be(ip + 4, (uint16_t)tcplen);
    } else {
        uint32_t ihl = g->l4 - ETH_HLEN;
        st16be(ip + 2, (uint16_t)(ihl + tcplen));
        st16be(ip + 4, (uint16_t)(ld16be(f + ETH_HLEN + 4) + i));
        ip4_set_csum(ip, ihl);
    }
    st32be(tcp + 4, ld32be(f + g->l4 + 4) + off);
    if (off + n < g->paylen)
        tcp[13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
    if (i > 0)
        tcp[13] &= (uint8_t)~TCP_CWR;
    tcp_set_pseudo(s, g->l4, g->v6, tcplen);
    return NITRO_NET_HDR_LEN + g->hlen + n;
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
        v->uplink_buf = malloc(FRAME_BUF_LEN);
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
            nitro_stat_add(&dst->stats.packets_in, pkts);
            nitro_stat_add(&dst->stats.bytes_in, bytes);
            return true;
        }
        break;  /* ring full or broken: drop, do not spill to another ring */
    }
    drop(&dst->stats, NITRO_NET_DROP_NO_RX_BUFFER);
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
    struct gso g;
    gso_get(buf, len, &g);
    uint64_t feat = __atomic_load_n(&dst->features, __ATOMIC_RELAXED);
    unsigned tso = g.v6 ? VIRTIO_NET_F_GUEST_TSO6 : VIRTIO_NET_F_GUEST_TSO4;
    if (((feat >> VIRTIO_NET_F_GUEST_CSUM) & 1) && ((feat >> tso) & 1))
        return deliver_one(dst, buf, len, g.segs,
                           gso_wire_bytes(&g, len - NITRO_NET_HDR_LEN), hint, dirty);
    if (seg == NULL) {
        drop(&dst->stats, NITRO_NET_DROP_BAD_HEADER);
        return false;
    }
    bool any = false;
    for (uint32_t i = 0; i < g.segs; i++) {
        uint32_t sl = gso_cut(buf, &g, i, seg);
        any |= deliver_one(dst, seg, sl, 1, sl - NITRO_NET_HDR_LEN, hint, dirty);
    }
    return any;
}

/* Write one plain frame to the TAP (opened without IFF_VNET_HDR, so a
 * partial checksum is completed first). */
static void tap_write(struct vpc *v, uint8_t *buf, uint32_t len)
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

/* To the uplink TAP: a super-frame goes as its segments (the host stack
 * gets ordinary frames of at most the MTU, checksums complete). */
static void to_uplink(struct vpc *v, uint8_t *buf, uint32_t len, uint8_t *seg)
{
    if (buf[1] == VIRTIO_NET_HDR_GSO_NONE) {
        tap_write(v, buf, len);
        return;
    }
    if (seg == NULL) {
        drop(&v->uplink_stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    struct gso g;
    gso_get(buf, len, &g);
    for (uint32_t i = 0; i < g.segs; i++)
        tap_write(v, seg, gso_cut(buf, &g, i, seg));
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
    return deliver(p, buf, len + NITRO_NET_HDR_LEN, NULL, 0, NULL) ? 1 : 0;
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

#define TX_OK (-1)

/* A TSO super-frame (gso_type TCPV4/TCPV6, 5.1.6.2): accepted only with
 * the matching HOST_TSO4/6 negotiated, NEEDS_CSUM on the TCP checksum,
 * gso_size > 0, the guest's hdr_len inside the frame (it is only a hint:
 * the real header length is measured), and the frame really Ethernet +
 * IPv4 (options allowed, not a fragment) or IPv6 (no extension headers) +
 * TCP whose IP length is exactly the frame's. The MTU applies to a
 * segment (headers + gso_size), not to the super-frame. The header is then
 * normalised for receivers and the checksums are put in the state the
 * segmenter and a GUEST_TSO receiver expect (IPv4 header checksum
 * computed, TCP field = pseudo-header sum over the whole TCP length, as
 * Linux does), whatever convention the sending driver used. */
static int tx_gso(uint8_t *buf, uint32_t flen, uint64_t feat, uint32_t mtu)
{
    uint8_t *frame = buf + NITRO_NET_HDR_LEN;
    uint8_t type = buf[1];
    bool v6 = type == VIRTIO_NET_HDR_GSO_TCPV6;
    /* ECN, UDP and anything else: not offered. */
    if (!(type == VIRTIO_NET_HDR_GSO_TCPV4 && ((feat >> VIRTIO_NET_F_HOST_TSO4) & 1)) &&
        !(v6 && ((feat >> VIRTIO_NET_F_HOST_TSO6) & 1)))
        return NITRO_NET_DROP_BAD_HEADER;
    uint32_t hint_len = ld16le(buf + 2), mss = ld16le(buf + 4);
    uint32_t start = ld16le(buf + 6), off = ld16le(buf + 8);
    if (!(buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM) || mss == 0 || hint_len > flen)
        return NITRO_NET_DROP_BAD_HEADER;
    const uint8_t *ip = frame + ETH_HLEN;
    uint16_t etype = ld16be(frame + 12);
    uint32_t l4, ihl = 0;
    if (!v6) {
        if (etype != ETH_P_IP || flen < ETH_HLEN + 20 || (ip[0] >> 4) != 4)
            return NITRO_NET_DROP_BAD_HEADER;
        ihl = (uint32_t)(ip[0] & 0xf) * 4;
        if (ihl < 20 || ip[9] != IPPROTO_TCP_ || (ld16be(ip + 6) & 0x3fff) != 0 ||
            ETH_HLEN + (uint32_t)ld16be(ip + 2) != flen)
            return NITRO_NET_DROP_BAD_HEADER;
        l4 = ETH_HLEN + ihl;
    } else {
        if (etype != ETH_P_IPV6 || flen < ETH_HLEN + 40 || (ip[0] >> 4) != 6 ||
            ip[6] != IPPROTO_TCP_ || ETH_HLEN + 40 + (uint32_t)ld16be(ip + 4) != flen)
            return NITRO_NET_DROP_BAD_HEADER;
        l4 = ETH_HLEN + 40;
    }
    if (l4 + 20 > flen)
        return NITRO_NET_DROP_BAD_HEADER;
    uint32_t doff = (uint32_t)(frame[l4 + 12] >> 4) * 4;
    if (doff < 20 || l4 + doff > flen || start != l4 || off != TCP_OFF_CHECK)
        return NITRO_NET_DROP_BAD_HEADER;
    uint32_t hlen = l4 + doff, paylen = flen - hlen;
    if (hlen + (paylen < mss ? paylen : mss) > mtu + ETH_HLEN)
        return NITRO_NET_DROP_MTU;
    if (!v6)
        ip4_set_csum(frame + ETH_HLEN, ihl);
    tcp_set_pseudo(frame, l4, v6, flen - l4);
    memset(buf, 0, NITRO_NET_HDR_LEN);
    buf[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    buf[1] = type;
    st16le(buf + 2, (uint16_t)hlen);
    st16le(buf + 4, (uint16_t)mss);
    st16le(buf + 6, (uint16_t)l4);
    st16le(buf + 8, TCP_OFF_CHECK);
    return TX_OK;
}

/* Where the L4 header of an IPv4 or IPv6 frame starts (IPv4 options
 * included; IPv6 extension headers count as L4), or 0 for anything else or
 * an IPv4 header that does not fit. */
static uint32_t l4_offset(const uint8_t *frame, uint32_t flen)
{
    uint16_t type = ld16be(frame + 12);
    if (type == ETH_P_IP && flen >= ETH_HLEN + 20) {
        uint32_t ihl = (uint32_t)(frame[ETH_HLEN] & 0xf) * 4;
        return ihl >= 20 && ETH_HLEN + ihl <= flen ? ETH_HLEN + ihl : 0;
    }
    if (type == ETH_P_IPV6 && flen >= ETH_HLEN + 40)
        return ETH_HLEN + 40;
    return 0;
}

/* Check the sender's virtio_net_hdr (5.1.6.2) and replace it by the header
 * receivers get: only NEEDS_CSUM and its offsets survive, gso NONE,
 * num_buffers 0 (fill_ring sets it); super-frames see tx_gso. Bad offsets
 * are the sender's fault, so they are refused here once, not by each
 * receiver. The checksum is completed after classify (per receiver, or for
 * the TAP/punt), and its 2 bytes land at csum_start + csum_offset: so
 * csum_start must be at or past the L4 header of an IPv4/IPv6 frame, or a
 * guest could rewrite its checked source MAC or IPv4 address (or the
 * destination) after the anti-spoofing checks with a checksum it chose.
 * Returns TX_OK or the drop reason. */
static int tx_header(uint8_t *hdr, uint32_t flen, uint64_t feat, uint32_t mtu)
{
    uint8_t flags = hdr[0];
    /* DATA_VALID and RSC_INFO are device -> driver only. */
    if ((flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM) != 0)
        return NITRO_NET_DROP_BAD_HEADER;
    if (hdr[1] != VIRTIO_NET_HDR_GSO_NONE)
        return tx_gso(hdr, flen, feat, mtu);
    uint16_t start = 0, off = 0;
    if (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        start = ld16le(hdr + 6);
        off = ld16le(hdr + 8);
        uint32_t l4 = l4_offset(hdr + NITRO_NET_HDR_LEN, flen);
        if ((uint32_t)start + off + 2 > flen || l4 == 0 || start < l4)
            return NITRO_NET_DROP_BAD_HEADER;
    }
    if (flen > mtu + ETH_HLEN)
        return NITRO_NET_DROP_MTU;
    memset(hdr, 0, NITRO_NET_HDR_LEN);
    hdr[0] = flags;
    st16le(hdr + 6, start);
    st16le(hdr + 8, off);
    return TX_OK;
}

struct tx_ctx {
    struct nitro_switch *sw;
    uint32_t port_id;
    struct port *p;
    struct vpc *v;
    uint32_t hint;
    uint8_t *buf;  /* SCRATCH_LEN: the chain, then room for one segment */
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
    uint64_t feat = __atomic_load_n(&p->features, __ATOMIC_RELAXED);
    int bad = tx_header(t->buf, flen, feat, t->v->mtu);
    if (bad != TX_OK) {
        drop(&p->stats, (unsigned)bad);
        return;
    }
    /* Counted and rate-limited as the segments it puts on the wire. */
    uint64_t pkts = 1, wire = flen;
    bool gso = t->buf[1] != VIRTIO_NET_HDR_GSO_NONE;
    if (gso) {
        struct gso g;
        gso_get(t->buf, len, &g);
        pkts = g.segs;
        wire = gso_wire_bytes(&g, flen);
    }
    if (!port_admit(p, pkts, wire, false))
        return;
    enum verdict vd = classify(t->v, p, frame, flen);
    if (vd == DROP)
        return;
    if (vd == PUNT && gso) {  /* control frames are never TCP: defensive */
        drop(&p->stats, NITRO_NET_DROP_BAD_HEADER);
        return;
    }
    nitro_stat_add(&p->stats.packets_out, pkts);
    nitro_stat_add(&p->stats.bytes_out, wire);
    if (vd == PUNT) {
        /* Python parses plain frames: complete a partial checksum. */
        if (!complete_csum(t->buf, len)) {
            drop(&p->stats, NITRO_NET_DROP_BAD_HEADER);
            return;
        }
        punt(t->sw, t->port_id, p, frame, flen);
        return;
    }
    forward(t->sw, t->v, p, t->buf, len, t->buf + FRAME_BUF_LEN, t->hint,
            &t->dirty);
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

/* Answer one control command: the ack is the last writable byte (5.1.6.5). */
static void ctrl_complete(struct nitro_vq *vq, const struct nitro_chain *c,
                          uint32_t max_pairs)
{
    uint8_t ack = ctrl_answer(c, max_pairs);
    const struct iovec *last = &c->iov[c->n_out + c->n_in - 1];
    ((uint8_t *)last->iov_base)[last->iov_len - 1] = ack;
    nitro_vq_push(vq, c->head, 1);
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
            ctrl_complete(vq, c, max_pairs);
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
        forward(sw, v, NULL, buf, (uint32_t)n + NITRO_NET_HDR_LEN, NULL, 0, &dirty);
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

/* ---- engine rings (nitro_ring.h) -------------------------------------------- */

/* A TX ring as an engine worker serves it: up to budget chains a poll, the
 * scratch buffer held from attach to detach. */
struct net_tx_ring {
    struct nitro_ring r;
    int scratch_slot;
    struct tx_ctx t;
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

static uint32_t no_io_in_flight(const struct nitro_ring *r)
{
    (void)r;
    return 0;
}

static void ring_free_plain(struct nitro_ring *r)
{
    free(r);
}

static const struct nitro_ring_ops tx_ring_ops = {
    .poll = tx_ring_poll,
    .arm = nitro_ring_arm_vq,
    .disarm = nitro_ring_disarm_vq,
    .in_flight = no_io_in_flight,
    .attach = tx_ring_attach,
    .detach = tx_ring_detach,
    .free = ring_free_plain,
};

struct nitro_ring *nitro_ring_net_tx_new(struct nitro_switch *sw,
                                         uint32_t port, struct nitro_vq *vq)
{
    struct port *p = sw != NULL ? get_port(sw, port) : NULL;
    if (p == NULL || vq == NULL)
        return NULL;
    struct net_tx_ring *x = calloc(1, sizeof(*x));
    if (x == NULL)
        return NULL;
    x->r = (struct nitro_ring){.ops = &tx_ring_ops, .vq = vq,
                               .kind = NITRO_RING_NET_TX, .worker = -1,
                               .kick_fd = -1};
    x->t = (struct tx_ctx){.sw = sw, .port_id = port, .p = p,
                           .v = &sw->vpcs[p->vpc], .hint = port};
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
    .in_flight = no_io_in_flight,
    .free = ring_free_plain,
};

struct nitro_ring *nitro_ring_net_rx_new(struct nitro_vq *vq)
{
    if (vq == NULL)
        return NULL;
    struct nitro_ring *r = calloc(1, sizeof(*r));
    if (r != NULL)
        *r = (struct nitro_ring){.ops = &rx_ring_ops, .vq = vq,
                                 .kind = NITRO_RING_NET_RX, .worker = -1,
                                 .kick_fd = -1};
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
    .in_flight = no_io_in_flight,
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
    x->r = (struct nitro_ring){.ops = &ctrl_ring_ops, .vq = vq,
                               .kind = NITRO_RING_NET_CTRL, .worker = -1,
                               .kick_fd = -1};
    x->max_pairs = max_pairs;
    return &x->r;
}
