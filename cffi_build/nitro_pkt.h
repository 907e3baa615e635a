/*
 * nitro_pkt.h: packet maths of the virtio-net datapath (nitro_pkt.c):
 * checksums, the sender's virtio_net_hdr and frame headers, TCP
 * segmentation. Internal, not part of the cdef. Nothing here knows the
 * switch's tables; every function works on one buffer.
 *
 * A "buf" is a virtio_net_hdr_v1 (NITRO_NET_HDR_LEN bytes) followed by the
 * Ethernet frame, as a TX chain carries it and an RX chain gets it.
 */
#ifndef NITRO_PKT_H
#define NITRO_PKT_H

#include <stdbool.h>
#include <stdint.h>

#include "nitro_net.h"
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
#define IPPROTO_ICMPV6_ 58
#define IP6_HLEN 40
#define TCP_OFF_CHECK 16     /* checksum field in the TCP header */
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80
#define ICMP_ECHO_REQUEST 8
#define ND_ROUTER_ADVERT 134  /* RFC 4861 4.2 */
#define ND_REDIRECT 137       /* RFC 4861 4.5 */
#define DHCP_SERVER_PORT 67

/* nitro_pkt_tx_header() result for a frame that may go on. */
#define NITRO_PKT_TX_OK (-1)

static inline uint16_t ld16be(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint16_t ld16le(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static inline void st16le(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void st16be(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline uint32_t ld32be(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void st32be(uint8_t *p, uint32_t v)
{
    st16be(p, (uint16_t)(v >> 16));
    st16be(p + 2, (uint16_t)v);
}

/* NEEDS_CSUM (5.1.6.2): the field at csum_start + csum_offset holds the
 * pseudo-header sum; fold in everything from csum_start to the datagram's
 * end (nitro_pkt_l3_end: not the Ethernet padding) and store it.
 * buf is hdr + frame; returns false if the offsets are out of the frame
 * (nitro_pkt_tx_header has checked them for guest frames; this stays
 * defensive). */
NITRO_INTERNAL bool nitro_pkt_csum_complete(uint8_t *buf, uint32_t len);

/* Check the sender's virtio_net_hdr (5.1.6.2) at buf and replace it by the
 * header receivers get (see nitro_pkt.c). flen: the frame's length (after
 * the header); feat: the sender's negotiated features; mtu: its VPC's.
 * Returns NITRO_PKT_TX_OK or the NITRO_NET_DROP_* reason. */
NITRO_INTERNAL int nitro_pkt_tx_header(uint8_t *buf, uint32_t flen,
                                       uint64_t feat, uint32_t mtu);

/* Where an IPv4 or IPv6 datagram in frame ends (the Ethernet header plus
 * its total / payload length), at most flen: Ethernet pads short frames,
 * and the padding is no part of the datagram or its checksum. flen for
 * anything else. */
NITRO_INTERNAL uint32_t nitro_pkt_l3_end(const uint8_t *frame, uint32_t flen);

/* The upper-layer header of the IPv6 datagram in frame (RFC 8200 4):
 * extension headers (hop-by-hop, routing, fragment, destination options,
 * AH) are skipped. Returns 1 with *proto and *off (its offset in frame;
 * *off may equal the datagram's end when it is empty), 0 when it is not in
 * this frame (a later fragment) and NITRO_ERR_ARG when the datagram is
 * not well formed: shorter than its header, a version other than 6, a
 * payload length past the frame, or an extension header chain that runs
 * past the datagram or is longer than nitro follows. */
NITRO_INTERNAL int nitro_pkt_ip6_upper(const uint8_t *frame, uint32_t flen,
                                       uint8_t *proto, uint32_t *off);

/* ---- TCP segmentation offload ------------------------------------------- */

/* A super-frame as nitro_pkt_tx_header left it: its header is normalised
 * (gso_type, hdr_len = the real Ethernet + IP + TCP header length,
 * gso_size, csum_start = the TCP header, csum_offset 16) and its headers
 * checked, so these fields can be trusted. */
struct nitro_pkt_gso {
    bool v6;
    uint32_t l4, hlen, mss, paylen, segs;
};

NITRO_INTERNAL void nitro_pkt_gso_get(const uint8_t *buf, uint32_t len,
                                      struct nitro_pkt_gso *g);
/* Bytes the segments of a super-frame of flen bytes put on the wire. */
NITRO_INTERNAL uint64_t nitro_pkt_gso_wire_bytes(const struct nitro_pkt_gso *g,
                                                 uint32_t flen);
/* Cut segment i of the super-frame buf into seg (header + frame) and
 * return its length, header included. */
NITRO_INTERNAL uint32_t nitro_pkt_gso_cut(const uint8_t *buf,
                                          const struct nitro_pkt_gso *g,
                                          uint32_t i, uint8_t *seg);

#endif
