/*
 * nitro_switch_internal.h: the VPC switch's tables, shared by the switch
 * (nitro_switch.c: tables, classify, delivery, punt, inject, uplink,
 * counters) and the virtio-net queue servers (nitro_net_queue.c). Internal,
 * not part of the cdef; the ABI is nitro_net.h.
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
#ifndef NITRO_SWITCH_INTERNAL_H
#define NITRO_SWITCH_INTERNAL_H

#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <stdbool.h>
#include <stdint.h>

#include "nitro_bucket.h"
#include "nitro_net.h"
#include "nitro_tunnel.h"
#include "nitro_vring.h"

#define FRAME_BUF_LEN (NITRO_NET_HDR_LEN + NITRO_NET_MAX_FRAME)
/* A TX worker's scratch: the chain (header + frame up to 64 KiB, a TSO
 * super-frame included), then room for one segment cut from it (at most
 * the VPC MTU + Ethernet header, itself at most NITRO_NET_MAX_FRAME). */
#define SCRATCH_LEN (2 * FRAME_BUF_LEN)
/* Chains a TX ring hands to the switch at a time, and what a batch may
 * hold. Each batch ends by publishing to its receivers. While the ring
 * holds about a burst (at most TX_BATCH chains), batches are of
 * TX_BATCH_EARLY: the receiving side (a guest's or a frontend's CPU)
 * starts on the burst's first frames while this worker switches the next
 * ones, where one batch of the whole burst made the two sides take turns.
 * When more waits, the sender is far ahead and publishing that often only
 * costs: full batches. Measured with bench/net.py's loop on 2 CPUs (64
 * frames in flight), 64 B: one batch per burst ran at 0.50 of DPDK's io
 * forwarding, 32 at 0.72, 16 at 1.35, 8 at 0.91; bench/fleet.py's same-host
 * loop (512 in flight, 1518 B) lost a fifth with batches of 16 always
 * (docs/performance.md "Early batches"). DPDK and OVS take 32. */
#define TX_BATCH 64
#define TX_BATCH_EARLY 16
#define DIRTY_MAX 32

struct rx_slot {
    pthread_mutex_t lock;
    struct nitro_vq *vq;  /* NULL while detached */
};

struct port {
    bool used;
    uint32_t vpc;
    uint8_t mac[6];
    uint8_t ip[4];
    uint8_t ip6_ll[16];   /* its IPv6 link-local address (from mac) */
    uint64_t features;    /* atomic: set by the trio thread */
    pthread_mutex_t bucket_lock;
    struct nitro_bucket bw_in, bw_out, pps, linklocal;
    uint32_t punt_queued; /* its entries in the punt queue (punt_lock) */
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
    uint32_t vni;         /* atomic: its VNI across hosts, UINT32_MAX none */
};

struct punt_entry {
    uint32_t port;
    uint32_t len;
    uint8_t data[NITRO_NET_PUNT_MAX_FRAME];
};

/* One interface on another host (nitro_underlay.c's table). */
struct remote {
    bool used;
    uint8_t ip[4];
    uint8_t mac[6];
    uint16_t vpc;
    uint16_t peer;        /* the tunnel's peer slot of its host */
};

/* The switch's side of the underlay (nitro_net.h): guarded by lock, read
 * by TX lookups and flushes and by RX batches, written by the trio thread. */
struct underlay {
    pthread_rwlock_t lock;
    struct nitro_tunnel *tunnel;  /* NULL: frames stay on this host */
    int send_fd;
    uint32_t count;
    struct remote *table;         /* REMOTE_SLOTS, open addressing */
    struct nitro_underlay_stats total;
    struct nitro_underlay_stats peer[NITRO_TUNNEL_MAX_PEERS];
};

struct nitro_switch {
    struct port ports[NITRO_NET_MAX_PORTS];
    struct vpc vpcs[NITRO_NET_MAX_VPCS];
    pthread_mutex_t punt_lock;
    uint32_t punt_head, punt_count;
    struct punt_entry *punt;
    int punt_fd;
    struct underlay ul;
};

/* Frames of a TX ring for other hosts, staged until the batch ends (or
 * the stage fills): then encapsulated per peer and sent in one sendmmsg.
 * Buffers are allocated on first use, sized for the tunnel's MTU. */
struct nitro_ul_tx {
    struct nitro_switch *sw;
    uint32_t n;
    uint32_t stride;              /* bytes per slot of inner[] and outer[] */
    uint8_t *inner;               /* TX_BATCH staged frames (no virtio header) */
    uint8_t *outer;               /* TX_BATCH outer packets */
    uint32_t lens[TX_BATCH];
    uint32_t vni[TX_BATCH];
    uint16_t peer[TX_BATCH];
    const uint8_t *frames[TX_BATCH];
    struct nitro_tunnel_pkt pkts[TX_BATCH];
    uint16_t sent_peer[TX_BATCH];  /* per outer packet queued for sendmmsg */
    uint32_t sent_len[TX_BATCH];
    struct mmsghdr msgs[TX_BATCH];
    struct iovec iov[TX_BATCH];
    struct sockaddr_in addr[TX_BATCH];
};

/* The RX slots a TX batch delivered into: notified once at the batch end;
 * and (ul, NULL for senders that never reach other hosts: the uplink
 * thread) the frames it staged for other hosts, sent at the same time. */
struct dirty {
    uint32_t n;
    struct rx_slot *slot[DIRTY_MAX];
    struct nitro_ul_tx *ul;
};

/* The port numbered port, or NULL when there is none. */
static inline struct port *nitro_sw_port(struct nitro_switch *sw, uint32_t port)
{
    if (sw == NULL || port >= NITRO_NET_MAX_PORTS || !sw->ports[port].used)
        return NULL;
    return &sw->ports[port];
}

static inline void nitro_sw_drop(struct nitro_port_stats *s, unsigned reason)
{
    nitro_stat_add(&s->drops[reason], 1);
}

/* Switch one TX frame of port port_id (p): buf is the chain as the guest
 * wrote it (virtio_net_hdr + frame, len bytes, NITRO_NET_HDR_LEN + ETH_HLEN
 * .. FRAME_BUF_LEN), seg room for one segment (FRAME_BUF_LEN). Checks the
 * header, rate-limits, classifies, then punts or forwards; RX rings it
 * filled are added to dirty. Every outcome is counted. */
NITRO_INTERNAL void nitro_sw_tx_frame(struct nitro_switch *sw, uint32_t port_id,
                                      struct port *p, uint8_t *buf,
                                      uint32_t len, uint8_t *seg,
                                      uint32_t hint, struct dirty *dirty);
/* ---- the fast path: one copy from the TX chain into the RX chain ---------- */

/* Bytes of a frame the switch copies out of the sender's memory and checks
 * (IPv4 headers with options and the start of L4 fit); the rest of the
 * payload moves straight from the TX buffers into the receiver's. */
#define NITRO_SW_HEAD_COPY 128
#define NITRO_SW_FAST_IOV 8

/* A frame on the fast path: its checked virtio header and head, and the
 * sender's iovecs the rest of it still lives in. */
struct nitro_sw_fast {
    uint32_t len;        /* virtio header + frame */
    uint32_t head_len;   /* bytes of head[] that hold it */
    uint8_t head[NITRO_NET_HDR_LEN + NITRO_SW_HEAD_COPY];
    int cnt;
    struct iovec iov[NITRO_SW_FAST_IOV];
};

/* What a TX batch's fast frames add to the sender's packets_out and
 * bytes_out, added once per batch: an atomic add per frame would cost
 * about as much as the frame's classification. Also the batch's clock
 * for the sender's rate limits (0: not read yet). */
struct nitro_sw_tally {
    uint64_t packets;
    uint64_t bytes;
    uint64_t now;
};

enum nitro_sw_fast_verdict {
    NITRO_SW_SLOW,   /* use nitro_sw_tx_frame: nothing was done or counted */
    NITRO_SW_DONE,   /* dropped and counted */
    NITRO_SW_FAST,   /* checked, admitted, counted out: deliver to *dst */
};

/* Decide whether f (head filled, len set) can take the fast path: a plain
 * IPv4 unicast frame to another guest port of the VPC that takes it as it
 * is (no segmentation, no checksum to complete, nothing to punt). If so,
 * check and count it as nitro_sw_tx_frame would, its packets_out and
 * bytes_out in *out (the caller adds them with nitro_sw_tally_flush). */
NITRO_INTERNAL enum nitro_sw_fast_verdict
nitro_sw_tx_fast(struct nitro_switch *sw, struct port *p,
                 struct nitro_sw_fast *f, struct port **dst,
                 struct nitro_sw_tally *out);

/* Add a tally to p's counters and empty it (the next batch reads the
 * clock again). */
static inline void nitro_sw_tally_flush(struct port *p, struct nitro_sw_tally *t)
{
    if (t->packets != 0) {
        nitro_stat_add(&p->stats.packets_out, t->packets);
        nitro_stat_add(&p->stats.bytes_out, t->bytes);
    }
    *t = (struct nitro_sw_tally){0};
}
/* Deliver n fast frames to dst: one RX slot lock, one used->idx publish. */
NITRO_INTERNAL void nitro_sw_deliver_fast(struct port *dst,
                                          struct nitro_sw_fast *frames,
                                          uint32_t n, uint32_t hint,
                                          struct dirty *dirty);

/* Call the guests behind the dirty slots (once each) and empty the set;
 * send what d->ul staged. */
NITRO_INTERNAL void nitro_sw_flush_dirty(struct dirty *d);

/* ---- the underlay (nitro_underlay.c) -------------------------------------- */

NITRO_INTERNAL int nitro_ul_init(struct nitro_switch *sw);
NITRO_INTERNAL void nitro_ul_fini(struct nitro_switch *sw);
/* hdr+frame (buf, len) from a port of VPC vpc whose destination MAC is no
 * local port's: if the remote table says it lives on another host, stage
 * it in dirty->ul (a super-frame as its segments, cut in seg) or drop and
 * count it, and return true; false when it is not for another host. */
NITRO_INTERNAL bool nitro_ul_tx_remote(struct nitro_switch *sw, uint32_t vpc,
                                       uint8_t *buf, uint32_t len,
                                       uint8_t *seg, struct dirty *dirty);
/* Encapsulate and send what ul staged. */
NITRO_INTERNAL void nitro_ul_tx_flush(struct nitro_ul_tx *ul);
NITRO_INTERNAL void nitro_ul_tx_free(struct nitro_ul_tx *ul);

#endif
