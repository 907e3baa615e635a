/*
 * nitro_underlay.c: the switch's side of a VPC across hosts (nitro_net.h
 * "the underlay", docs/fleet.md "Datapath"): the remote table; frames to
 * other hosts, staged by the TX worker, encapsulated per peer and sent with
 * one sendmmsg per batch; and the underlay ring, whose worker reads frames
 * from other hosts with recvmmsg, decapsulates them, checks them and
 * delivers them like local frames (one RX lock and publish per run of
 * frames to one destination).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nitro_pkt.h"
#include "nitro_ring.h"
#include "nitro_switch_internal.h"

#define REMOTE_SLOTS (2 * NITRO_NET_MAX_REMOTES)  /* at most half full */
#define IP4_HLEN 20
#define UDP_HLEN 8
#define UL_BATCH TX_BATCH
/* A receive slot holds the largest IPv4 packet, so nothing is truncated:
 * what is too big for the receiving VPC is dropped by its checks. */
#define UL_RX_STRIDE 65536
#define ALL_PEERS UINT32_MAX

static void ul_drop(struct underlay *u, uint32_t peer, unsigned reason)
{
    nitro_stat_add(&u->total.drops[reason], 1);
    if (peer < NITRO_TUNNEL_MAX_PEERS)
        nitro_stat_add(&u->peer[peer].drops[reason], 1);
}

static void ul_count(struct underlay *u, uint32_t peer, bool out, uint64_t bytes)
{
    struct nitro_underlay_stats *s[2] = {&u->total, &u->peer[peer]};
    for (int i = 0; i < 2; i++) {
        nitro_stat_add(out ? &s[i]->packets_out : &s[i]->packets_in, 1);
        nitro_stat_add(out ? &s[i]->bytes_out : &s[i]->bytes_in, bytes);
    }
}

int nitro_ul_init(struct nitro_switch *sw)
{
    struct underlay *u = &sw->ul;
    u->send_fd = -1;
    u->table = calloc(REMOTE_SLOTS, sizeof(*u->table));
    if (u->table == NULL)
        return NITRO_ERR_NOMEM;
    pthread_rwlock_init(&u->lock, NULL);
    return NITRO_OK;
}

void nitro_ul_fini(struct nitro_switch *sw)
{
    if (sw->ul.table == NULL)
        return;
    free(sw->ul.table);
    sw->ul.table = NULL;
    pthread_rwlock_destroy(&sw->ul.lock);
}

/* ---- the remote table ------------------------------------------------------ */

static uint32_t remote_home(uint32_t vpc, const uint8_t *ip)
{
    uint32_t k;
    memcpy(&k, ip, 4);
    k ^= vpc * 0x9e3779b9u;
    k ^= k >> 16;
    k *= 0x7feb352d;
    k ^= k >> 15;
    k *= 0x846ca68b;
    k ^= k >> 16;
    return k & (REMOTE_SLOTS - 1);
}

/* The entry's slot, or the empty slot where it would go (lock held). */
static uint32_t remote_slot(const struct underlay *u, uint32_t vpc, const uint8_t *ip)
{
    uint32_t i = remote_home(vpc, ip);
    while (u->table[i].used &&
           !(u->table[i].vpc == vpc && memcmp(u->table[i].ip, ip, 4) == 0))
        i = (i + 1) & (REMOTE_SLOTS - 1);
    return i;
}

static const struct remote *remote_find(const struct underlay *u, uint32_t vpc,
                                        const uint8_t *ip)
{
    const struct remote *r = &u->table[remote_slot(u, vpc, ip)];
    return r->used ? r : NULL;
}

/* Linear probing's deletion without tombstones (Knuth 6.4, algorithm R):
 * the entries after the hole move back into it when their home allows. */
static void remote_delete(struct underlay *u, uint32_t i)
{
    const uint32_t mask = REMOTE_SLOTS - 1;
    for (uint32_t j = (i + 1) & mask; u->table[j].used; j = (j + 1) & mask) {
        uint32_t home = remote_home(u->table[j].vpc, u->table[j].ip);
        /* j stays where it is when its home lies cyclically in (i, j]. */
        bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            u->table[i] = u->table[j];
            i = j;
        }
    }
    u->table[i].used = false;
}

/* Does a local port of v have this IP or MAC? (Ports are fixed before
 * traffic flows: no lock.) */
static bool local_interface(const struct nitro_switch *sw, const struct vpc *v,
                            const uint8_t *ip, const uint8_t *mac)
{
    for (uint32_t i = 0; i < v->nports; i++) {
        const struct port *p = &sw->ports[v->ports[i]];
        if (memcmp(p->ip, ip, 4) == 0 || memcmp(p->mac, mac, 6) == 0)
            return true;
    }
    return false;
}

int nitro_switch_set_remote(struct nitro_switch *sw, uint32_t vpc,
                            const uint8_t *ip, const uint8_t *mac, uint32_t peer)
{
    if (sw == NULL || ip == NULL || mac == NULL || vpc >= NITRO_NET_MAX_VPCS ||
        !sw->vpcs[vpc].used || (mac[0] & 1) || peer >= NITRO_TUNNEL_MAX_PEERS ||
        local_interface(sw, &sw->vpcs[vpc], ip, mac))
        return NITRO_ERR_ARG;
    struct underlay *u = &sw->ul;
    pthread_rwlock_wrlock(&u->lock);
    uint32_t i = remote_slot(u, vpc, ip);
    int rc = NITRO_OK;
    if (!u->table[i].used && u->count == NITRO_NET_MAX_REMOTES) {
        rc = NITRO_ERR_LIMIT;
    } else {
        if (!u->table[i].used)
            u->count++;
        struct remote *r = &u->table[i];
        r->used = true;
        memcpy(r->ip, ip, 4);
        memcpy(r->mac, mac, 6);
        r->vpc = (uint16_t)vpc;
        r->peer = (uint16_t)peer;
    }
    pthread_rwlock_unlock(&u->lock);
    return rc;
}

int nitro_switch_remove_remote(struct nitro_switch *sw, uint32_t vpc, const uint8_t *ip)
{
    if (sw == NULL || ip == NULL || vpc >= NITRO_NET_MAX_VPCS)
        return NITRO_ERR_ARG;
    struct underlay *u = &sw->ul;
    pthread_rwlock_wrlock(&u->lock);
    uint32_t i = remote_slot(u, vpc, ip);
    bool found = u->table[i].used;
    if (found) {
        remote_delete(u, i);
        u->count--;
    }
    pthread_rwlock_unlock(&u->lock);
    return found ? NITRO_OK : NITRO_ERR_ARG;
}

uint32_t nitro_switch_remote_count(const struct nitro_switch *sw)
{
    return sw == NULL ? 0 : __atomic_load_n(&sw->ul.count, __ATOMIC_RELAXED);
}

int nitro_switch_set_underlay(struct nitro_switch *sw, struct nitro_tunnel *t, int send_fd)
{
    if (sw == NULL || (t != NULL && send_fd < 0))
        return NITRO_ERR_ARG;
    /* The write lock waits out every flush and RX batch using the old one. */
    pthread_rwlock_wrlock(&sw->ul.lock);
    sw->ul.tunnel = t;
    sw->ul.send_fd = t != NULL ? send_fd : -1;
    pthread_rwlock_unlock(&sw->ul.lock);
    return NITRO_OK;
}

int nitro_switch_set_vni(struct nitro_switch *sw, uint32_t vpc, uint32_t vni)
{
    if (sw == NULL || vpc >= NITRO_NET_MAX_VPCS || !sw->vpcs[vpc].used ||
        (vni != UINT32_MAX && vni >= 1u << 24))
        return NITRO_ERR_ARG;
    __atomic_store_n(&sw->vpcs[vpc].vni, vni, __ATOMIC_RELAXED);
    return NITRO_OK;
}

int nitro_switch_underlay_stats(const struct nitro_switch *sw, uint32_t peer,
                                struct nitro_underlay_stats *out)
{
    if (sw == NULL || out == NULL || (peer != ALL_PEERS && peer >= NITRO_TUNNEL_MAX_PEERS))
        return NITRO_ERR_ARG;
    nitro_stats_copy(out, peer == ALL_PEERS ? &sw->ul.total : &sw->ul.peer[peer],
                     sizeof(*out));
    return NITRO_OK;
}

/* ---- to other hosts (a TX worker) -------------------------------------------- */

static bool ul_tx_alloc(struct nitro_ul_tx *ul, uint32_t mtu)
{
    nitro_ul_tx_free(ul);
    ul->inner = malloc((size_t)UL_BATCH * mtu);
    ul->outer = malloc((size_t)UL_BATCH * mtu);
    if (ul->inner == NULL || ul->outer == NULL) {
        nitro_ul_tx_free(ul);
        return false;
    }
    ul->stride = mtu;
    return true;
}

void nitro_ul_tx_free(struct nitro_ul_tx *ul)
{
    free(ul->inner);
    free(ul->outer);
    ul->inner = ul->outer = NULL;
    ul->stride = 0;
}

/* Copy one frame (hdr + frame: the header is not sent) into the stage. */
static void ul_stage(struct nitro_ul_tx *ul, uint8_t *buf, uint32_t len,
                     uint16_t peer, uint32_t vni, uint32_t mtu)
{
    struct underlay *u = &ul->sw->ul;
    uint32_t flen = len - NITRO_NET_HDR_LEN;
    /* The receiver gets a plain frame: no partial checksum crosses. */
    if (!nitro_pkt_csum_complete(buf, len)) {
        ul_drop(u, peer, NITRO_UNDERLAY_DROP_BAD_FRAME);
        return;
    }
    if (flen > mtu) {  /* could never fit an outer packet: no slot for it */
        ul_drop(u, peer, NITRO_UNDERLAY_DROP_MTU);
        return;
    }
    if (ul->n == UL_BATCH || (ul->stride < mtu && ul->n > 0))
        nitro_ul_tx_flush(ul);
    if (ul->stride < mtu && !ul_tx_alloc(ul, mtu)) {
        ul_drop(u, peer, NITRO_UNDERLAY_DROP_SEND_ERROR);  /* out of memory */
        return;
    }
    uint32_t k = ul->n++;
    memcpy(ul->inner + (size_t)k * ul->stride, buf + NITRO_NET_HDR_LEN, flen);
    ul->lens[k] = flen;
    ul->peer[k] = peer;
    ul->vni[k] = vni;
}

bool nitro_ul_tx_remote(struct nitro_switch *sw, uint32_t vpc, uint8_t *buf,
                        uint32_t len, uint8_t *seg, struct dirty *dirty)
{
    const uint8_t *frame = buf + NITRO_NET_HDR_LEN;
    /* Only IPv4 crosses: ARP is answered on each host (nitro's responder
     * knows the remote interfaces too), so is DHCP; broadcasts stay local.
     * classify() has checked the IPv4 header, so its addresses are there. */
    if (len - NITRO_NET_HDR_LEN < ETH_HLEN + IP4_HLEN || ld16be(frame + 12) != ETH_P_IP)
        return false;
    struct underlay *u = &sw->ul;
    pthread_rwlock_rdlock(&u->lock);
    const struct remote *r = remote_find(u, vpc, frame + ETH_HLEN + 16);
    struct remote e = r != NULL ? *r : (struct remote){0};
    uint32_t mtu = u->tunnel != NULL ? nitro_tunnel_mtu(u->tunnel) : 0;
    pthread_rwlock_unlock(&u->lock);
    if (!e.used || memcmp(e.mac, frame, 6) != 0)
        return false;
    uint32_t vni = __atomic_load_n(&sw->vpcs[vpc].vni, __ATOMIC_RELAXED);
    if (mtu == 0 || vni == UINT32_MAX || dirty->ul == NULL) {
        ul_drop(u, e.peer, NITRO_UNDERLAY_DROP_NO_UNDERLAY);
        return true;
    }
    if (buf[1] == VIRTIO_NET_HDR_GSO_NONE) {
        ul_stage(dirty->ul, buf, len, e.peer, vni, mtu);
        return true;
    }
    if (seg == NULL) {
        ul_drop(u, e.peer, NITRO_UNDERLAY_DROP_BAD_FRAME);
        return true;
    }
    /* A TSO super-frame crosses as the segments it stands for. */
    struct nitro_pkt_gso g;
    nitro_pkt_gso_get(buf, len, &g);
    for (uint32_t i = 0; i < g.segs; i++)
        ul_stage(dirty->ul, seg, nitro_pkt_gso_cut(buf, &g, i, seg), e.peer, vni, mtu);
    return true;
}

/* Queue outer packet k of the stage as message q of the sendmmsg. */
static void ul_queue(struct nitro_ul_tx *ul, uint32_t q, uint32_t k)
{
    uint8_t *pkt = ul->outer + (size_t)k * ul->stride;
    ul->iov[q] = (struct iovec){.iov_base = pkt, .iov_len = ul->pkts[k].len};
    ul->addr[q] = (struct sockaddr_in){.sin_family = AF_INET};
    memcpy(&ul->addr[q].sin_addr, pkt + 16, 4);  /* the outer destination */
    ul->msgs[q] = (struct mmsghdr){.msg_hdr = {
        .msg_name = &ul->addr[q], .msg_namelen = sizeof(ul->addr[q]),
        .msg_iov = &ul->iov[q], .msg_iovlen = 1}};
    ul->sent_peer[q] = ul->peer[k];
    ul->sent_len[q] = ul->lens[k];
}

/* Send the q queued packets without ever blocking: a full socket buffer
 * (or device queue) drops what is left, any other error the one packet. */
static void ul_send(struct nitro_ul_tx *ul, struct underlay *u, uint32_t q)
{
    uint32_t done = 0;
    while (done < q) {
        int r = sendmmsg(u->send_fd, ul->msgs + done, q - done, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR)
            continue;
        if (r > 0) {
            for (uint32_t i = done; i < done + (uint32_t)r; i++)
                ul_count(u, ul->sent_peer[i], true, ul->sent_len[i]);
            done += (uint32_t)r;
            continue;
        }
        int err = r < 0 ? errno : EIO;
        if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) {
            for (; done < q; done++)
                ul_drop(u, ul->sent_peer[done], NITRO_UNDERLAY_DROP_SOCKET_FULL);
            return;
        }
        ul_drop(u, ul->sent_peer[done], err == EMSGSIZE ? NITRO_UNDERLAY_DROP_MTU
                                                        : NITRO_UNDERLAY_DROP_SEND_ERROR);
        done++;
    }
}

void nitro_ul_tx_flush(struct nitro_ul_tx *ul)
{
    if (ul->n == 0)
        return;
    struct underlay *u = &ul->sw->ul;
    pthread_rwlock_rdlock(&u->lock);
    struct nitro_tunnel *t = u->tunnel;
    if (t == NULL || nitro_tunnel_mtu(t) > ul->stride) {
        /* The underlay went (or came back bigger) since these were staged. */
        for (uint32_t i = 0; i < ul->n; i++)
            ul_drop(u, ul->peer[i], NITRO_UNDERLAY_DROP_NO_UNDERLAY);
    } else {
        uint32_t q = 0;
        for (uint32_t i = 0; i < ul->n;) {
            uint32_t j = i + 1;
            while (j < ul->n && ul->peer[j] == ul->peer[i] && ul->vni[j] == ul->vni[i])
                j++;
            for (uint32_t k = i; k < j; k++)
                ul->frames[k] = ul->inner + (size_t)k * ul->stride;
            /* The tunnel counts its drops (mtu, no_sa, unknown_peer). */
            nitro_tunnel_encap(t, ul->peer[i], ul->vni[i], ul->frames + i, ul->lens + i,
                               j - i, ul->outer + (size_t)i * ul->stride, ul->stride,
                               ul->pkts + i);
            for (uint32_t k = i; k < j; k++)
                if (ul->pkts[k].drop < 0)
                    ul_queue(ul, q++, k);
            i = j;
        }
        ul_send(ul, u, q);
    }
    pthread_rwlock_unlock(&u->lock);
    ul->n = 0;
}

/* ---- from other hosts: the underlay ring --------------------------------------- */

struct ul_ring {
    struct nitro_ring r;
    struct nitro_switch *sw;
    int fd;
    uint32_t mode;
    uint8_t *slots;              /* UL_BATCH * UL_RX_STRIDE */
    uint32_t lens[UL_BATCH];
    struct nitro_tunnel_pkt pkts[UL_BATCH];
    struct mmsghdr msgs[UL_BATCH];
    struct iovec iov[UL_BATCH];
    struct sockaddr_in from[UL_BATCH];
    struct nitro_sw_fast fast[UL_BATCH];
    struct dirty dirty;
};

/* Where a decapsulated frame of VPC pkt->vpc from peer pkt->peer goes, or
 * why it is dropped. As strict as a frame from a local port: plain IPv4
 * whose source MAC and IP are an interface the remote table places on the
 * sending host, to a local port of the VPC. Read lock held. */
static int ul_rx_check(const struct nitro_switch *sw, const struct nitro_tunnel_pkt *pkt,
                       const uint8_t *f, struct port **dst)
{
    if (pkt->vpc >= NITRO_NET_MAX_VPCS || !sw->vpcs[pkt->vpc].used)
        return NITRO_UNDERLAY_DROP_UNKNOWN_DESTINATION;
    const struct vpc *v = &sw->vpcs[pkt->vpc];
    uint32_t len = pkt->len;
    if (len > v->mtu + ETH_HLEN)
        return NITRO_UNDERLAY_DROP_MTU;
    if (len < ETH_HLEN + IP4_HLEN || ld16be(f + 12) != ETH_P_IP)
        return NITRO_UNDERLAY_DROP_BAD_FRAME;
    const uint8_t *ip = f + ETH_HLEN;
    uint32_t ihl = (uint32_t)(ip[0] & 0xf) * 4, tot = ld16be(ip + 2);
    if (ip[0] >> 4 != 4 || ihl < IP4_HLEN || tot < ihl || ETH_HLEN + tot > len)
        return NITRO_UNDERLAY_DROP_BAD_FRAME;
    const struct remote *r = remote_find(&sw->ul, pkt->vpc, ip + 12);
    if (r == NULL || r->peer != pkt->peer || memcmp(r->mac, f + 6, 6) != 0)
        return NITRO_UNDERLAY_DROP_SPOOFED_SOURCE;
    if (!(f[0] & 1))
        for (uint32_t i = 0; i < v->nports; i++) {
            struct port *p = (struct port *)&sw->ports[v->ports[i]];
            if (memcmp(p->mac, f, 6) == 0) {
                *dst = p;
                return -1;
            }
        }
    return NITRO_UNDERLAY_DROP_UNKNOWN_DESTINATION;
}

/* A UDP socket gives the Geneve payload only: put the outer IPv4 and UDP
 * headers it came with back in front of it (the tunnel knows a plain-mode
 * peer by its source address). */
static void ul_udp_headers(uint8_t *b, uint32_t payload, const struct sockaddr_in *from)
{
    memset(b, 0, IP4_HLEN + UDP_HLEN);
    b[0] = 0x45;
    st16be(b + 2, (uint16_t)(IP4_HLEN + UDP_HLEN + payload));
    b[8] = 64;
    b[9] = IPPROTO_UDP_;
    memcpy(b + 12, &from->sin_addr, 4);
    st16be(b + IP4_HLEN, ntohs(from->sin_port));
    st16be(b + IP4_HLEN + 2, NITRO_TUNNEL_GENEVE_PORT);
    st16be(b + IP4_HLEN + 4, (uint16_t)(UDP_HLEN + payload));
}

/* Deliver the frames of x->fast[0, n) to dst (one lock, one publish). */
static void ul_rx_flush(struct ul_ring *x, struct port *dst, uint32_t n, uint32_t hint)
{
    if (n > 0)
        nitro_sw_deliver_fast(dst, x->fast, n, hint, &x->dirty);
}

static void ul_rx_batch(struct ul_ring *x, uint32_t n)
{
    struct underlay *u = &x->sw->ul;
    pthread_rwlock_rdlock(&u->lock);
    if (u->tunnel == NULL) {
        for (uint32_t i = 0; i < n; i++)
            ul_drop(u, ALL_PEERS, NITRO_UNDERLAY_DROP_NO_UNDERLAY);
        pthread_rwlock_unlock(&u->lock);
        return;
    }
    nitro_tunnel_decap(u->tunnel, x->slots, x->lens, UL_RX_STRIDE, n, x->pkts);
    struct port *group = NULL;
    uint32_t nf = 0, hint = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct nitro_tunnel_pkt *pkt = &x->pkts[i];
        if (pkt->drop >= 0)
            continue;  /* counted by the tunnel */
        uint8_t *frame = x->slots + (size_t)i * UL_RX_STRIDE + pkt->offset;
        struct port *dst = NULL;
        int why = ul_rx_check(x->sw, pkt, frame, &dst);
        if (why >= 0) {
            ul_drop(u, pkt->peer, (unsigned)why);
            continue;
        }
        if (dst != group) {
            ul_rx_flush(x, group, nf, hint);
            group = dst;
            nf = 0;
            hint = pkt->peer;
        }
        /* A fast frame: a zeroed virtio header and the checked head in
         * head[], the rest read from the slot (offsets count from the
         * header, which the decapsulated outer bytes leave room for). */
        struct nitro_sw_fast *f = &x->fast[nf++];
        f->len = pkt->len + NITRO_NET_HDR_LEN;
        f->head_len = f->len < sizeof(f->head) ? f->len : (uint32_t)sizeof(f->head);
        memset(f->head, 0, NITRO_NET_HDR_LEN);
        memcpy(f->head + NITRO_NET_HDR_LEN, frame, f->head_len - NITRO_NET_HDR_LEN);
        f->cnt = 1;
        f->iov[0] = (struct iovec){.iov_base = frame - NITRO_NET_HDR_LEN, .iov_len = f->len};
        ul_count(u, pkt->peer, false, pkt->len);
    }
    ul_rx_flush(x, group, nf, hint);
    pthread_rwlock_unlock(&u->lock);
    nitro_sw_flush_dirty(&x->dirty);
}

static int ul_ring_poll(struct nitro_ring *r, struct nitro_io *io, uint32_t budget)
{
    (void)io;
    struct ul_ring *x = (struct ul_ring *)r;
    uint32_t want = budget < UL_BATCH ? budget : UL_BATCH;
    uint32_t off = x->mode == NITRO_UNDERLAY_UDP ? IP4_HLEN + UDP_HLEN : 0;
    for (uint32_t i = 0; i < want; i++) {
        x->iov[i] = (struct iovec){.iov_base = x->slots + (size_t)i * UL_RX_STRIDE + off,
                                   .iov_len = UL_RX_STRIDE - off};
        x->msgs[i] = (struct mmsghdr){.msg_hdr = {
            .msg_name = &x->from[i], .msg_namelen = sizeof(x->from[i]),
            .msg_iov = &x->iov[i], .msg_iovlen = 1}};
    }
    int n = recvmmsg(x->fd, x->msgs, want, MSG_DONTWAIT, NULL);
    if (n <= 0)
        return 0;  /* EAGAIN: drained; anything else is the socket's, not a guest's */
    for (int i = 0; i < n; i++) {
        x->lens[i] = x->msgs[i].msg_len + off;
        if (off)
            ul_udp_headers(x->slots + (size_t)i * UL_RX_STRIDE, x->msgs[i].msg_len,
                           &x->from[i]);
    }
    ul_rx_batch(x, (uint32_t)n);
    return n;
}

static int ul_ring_arm(struct nitro_ring *r)
{
    (void)r;
    return 0;  /* epoll is level-triggered on the socket: nothing to re-enable */
}

static void ul_ring_disarm(struct nitro_ring *r)
{
    (void)r;
}

static int ul_ring_wait_fd(const struct nitro_ring *r)
{
    return ((const struct ul_ring *)r)->fd;
}

static void ul_ring_free(struct nitro_ring *r)
{
    struct ul_ring *x = (struct ul_ring *)r;
    free(x->slots);
    free(x);
}

static const struct nitro_ring_ops ul_ring_ops = {
    .poll = ul_ring_poll,
    .arm = ul_ring_arm,
    .disarm = ul_ring_disarm,
    .free = ul_ring_free,
    .wait_fd = ul_ring_wait_fd,
};

struct nitro_ring *nitro_ring_underlay_new(struct nitro_switch *sw, int fd, uint32_t mode)
{
    if (sw == NULL || fd < 0 || (mode != NITRO_UNDERLAY_RAW && mode != NITRO_UNDERLAY_UDP))
        return NULL;
    struct ul_ring *x = calloc(1, sizeof(*x));
    if (x == NULL)
        return NULL;
    x->slots = malloc((size_t)UL_BATCH * UL_RX_STRIDE);
    if (x->slots == NULL) {
        free(x);
        return NULL;
    }
    x->r = nitro_ring_detached(&ul_ring_ops, NULL, NITRO_RING_UNDERLAY);
    x->sw = sw;
    x->fd = fd;
    x->mode = mode;
    return &x->r;
}
