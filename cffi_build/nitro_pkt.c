/*
 * nitro_pkt.c: packet maths of the virtio-net datapath (see nitro_pkt.h):
 * RFC 1071 checksums, the check and rewrite of a sender's virtio_net_hdr,
 * and TCP segmentation of TSO super-frames.
 */
#include <string.h>

#include "nitro_pkt.h"

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
 * TCP, so nitro_pkt_csum_complete or the receiver finishes it. */
static void tcp_set_pseudo(uint8_t *frame, uint32_t l4, bool v6, uint32_t tcplen)
{
    const uint8_t *ip = frame + ETH_HLEN;
    uint32_t sum = v6 ? csum_add(0, ip + 8, 32) : csum_add(0, ip + 12, 8);
    sum += IPPROTO_TCP_ + (tcplen >> 16) + (tcplen & 0xffff);
    st16be(frame + l4 + TCP_OFF_CHECK, csum_fold(sum));
}

uint32_t nitro_pkt_l3_end(const uint8_t *frame, uint32_t flen)
{
    uint16_t type = ld16be(frame + 12);
    uint32_t end = flen;
    if (type == ETH_P_IP && flen >= ETH_HLEN + 20)
        end = ETH_HLEN + (uint32_t)ld16be(frame + ETH_HLEN + 2);
    else if (type == ETH_P_IPV6 && flen >= ETH_HLEN + IP6_HLEN)
        end = ETH_HLEN + IP6_HLEN + (uint32_t)ld16be(frame + ETH_HLEN + 4);
    return end < flen ? end : flen;
}

/* RFC 8200 extension header numbers. */
#define IP6_HOPOPTS 0
#define IP6_ROUTING 43
#define IP6_FRAGMENT 44
#define IP6_AH 51
#define IP6_DSTOPTS 60
/* More extension headers than any sane sender uses (RFC 8200 4.1 orders
 * at most 8 kinds); past this the datagram is refused. */
#define IP6_MAX_EXT 8

int nitro_pkt_ip6_upper(const uint8_t *frame, uint32_t flen, uint8_t *proto,
                        uint32_t *off)
{
    const uint8_t *ip = frame + ETH_HLEN;
    if (flen < ETH_HLEN + IP6_HLEN || (ip[0] >> 4) != 6)
        return NITRO_ERR_ARG;
    uint32_t end = ETH_HLEN + IP6_HLEN + (uint32_t)ld16be(ip + 4);
    if (end > flen)
        return NITRO_ERR_ARG;
    uint8_t nh = ip[6];
    uint32_t at = ETH_HLEN + IP6_HLEN;
    for (int n = 0; n <= IP6_MAX_EXT; n++) {
        uint32_t len;
        if (nh == IP6_HOPOPTS || nh == IP6_ROUTING || nh == IP6_DSTOPTS)
            len = at + 2 <= end ? ((uint32_t)frame[at + 1] + 1) * 8 : 0;
        else if (nh == IP6_AH)  /* RFC 4302 2.2: in 4-byte units, minus 2 */
            len = at + 2 <= end ? ((uint32_t)frame[at + 1] + 2) * 4 : 0;
        else if (nh == IP6_FRAGMENT)
            len = 8;
        else {
            *proto = nh;
            *off = at;
            return 1;
        }
        if (len == 0 || at + len > end)
            return NITRO_ERR_ARG;
        /* A fragment with a nonzero offset: the upper header is elsewhere. */
        if (nh == IP6_FRAGMENT && (ld16be(frame + at + 2) & 0xfff8) != 0)
            return 0;
        nh = frame[at];
        at += len;
    }
    return NITRO_ERR_ARG;
}

/* NEEDS_CSUM: see nitro_pkt.h. */
bool nitro_pkt_csum_complete(uint8_t *buf, uint32_t len)
{
    if (!(buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM))
        return true;
    uint8_t *frame = buf + NITRO_NET_HDR_LEN;
    /* The sum covers the datagram, not the Ethernet padding after it. */
    uint32_t end = nitro_pkt_l3_end(frame, len - NITRO_NET_HDR_LEN);
    uint32_t start = ld16le(buf + 6), off = ld16le(buf + 8);
    if (start >= end || (uint64_t)start + off + 2 > end)
        return false;
    uint32_t sum = csum_add(0, frame + start, end - start);
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

/* ---- TCP segmentation offload ------------------------------------------- */

void nitro_pkt_gso_get(const uint8_t *buf, uint32_t len, struct nitro_pkt_gso *g)
{
    g->v6 = buf[1] == VIRTIO_NET_HDR_GSO_TCPV6;
    g->hlen = ld16le(buf + 2);
    g->mss = ld16le(buf + 4);
    g->l4 = ld16le(buf + 6);
    g->paylen = len - NITRO_NET_HDR_LEN - g->hlen;
    g->segs = g->paylen == 0 ? 1 : (g->paylen + g->mss - 1) / g->mss;
}

uint64_t nitro_pkt_gso_wire_bytes(const struct nitro_pkt_gso *g, uint32_t flen)
{
    return flen + (uint64_t)(g->segs - 1) * g->hlen;
}

/* Cut segment i of the super-frame buf into seg (header + frame) and
 * return its length, header included: headers copied, then IPv4 total
 * length, ID (+i) and header checksum or IPv6 payload length, TCP sequence
 * number (+ offset), FIN/PSH kept on the last segment only and CWR on the
 * first only (RFC 3168 6.1.2), and the TCP checksum left partial
 * (NEEDS_CSUM) for the receiver's path to finish. */
uint32_t nitro_pkt_gso_cut(const uint8_t *buf, const struct nitro_pkt_gso *g,
                           uint32_t i, uint8_t *seg)
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

/* Linux's smallest TCP MSS (TCP_MIN_MSS): no stack sends smaller segments,
 * and a tiny gso_size would turn one 64 KiB chain into tens of thousands of
 * frames for every receiver. */
#define TSO_MIN_MSS 88

/* A TSO super-frame (gso_type TCPV4/TCPV6, 5.1.6.2): accepted only with
 * the matching HOST_TSO4/6 negotiated, to a unicast MAC (TCP is never
 * broadcast; a flood would be segmented once per port), NEEDS_CSUM on the
 * TCP checksum, gso_size >= TSO_MIN_MSS, the guest's hdr_len inside the
 * frame (it is only a hint:
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
    if (!(buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM) || mss < TSO_MIN_MSS ||
        hint_len > flen || (frame[0] & 1))
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
    return NITRO_PKT_TX_OK;
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

/* Where a NEEDS_CSUM checksum may go at the earliest in an IPv4/IPv6
 * frame whose L4 part starts at l4: past every byte the switch's
 * classify() reads there (IPv6 extension headers, an ICMP or ICMPv6 type
 * and code, UDP ports), so 2 bytes into an ICMP header (its checksum is at
 * 2) and 4 into any other. 0 when this frame has no upper-layer header. */
static uint32_t csum_floor(const uint8_t *frame, uint32_t flen, uint32_t l4)
{
    uint8_t proto;
    uint32_t upper = l4;
    if (ld16be(frame + 12) == ETH_P_IP)
        proto = frame[ETH_HLEN + 9];
    else if (nitro_pkt_ip6_upper(frame, flen, &proto, &upper) != 1)
        return 0;
    return upper + (proto == IPPROTO_ICMP_ || proto == IPPROTO_ICMPV6_ ? 2 : 4);
}

/* Check the sender's virtio_net_hdr (5.1.6.2) and replace it by the header
 * receivers get: only NEEDS_CSUM and its offsets survive, gso NONE,
 * num_buffers 0 (the RX delivery sets it); super-frames see tx_gso. Bad
 * offsets are the sender's fault, so they are refused here once, not by
 * each receiver. The checksum is completed after the switch classified the
 * frame (per receiver, or for the TAP/punt), and its 2 bytes land at
 * csum_start + csum_offset, with a value the guest chooses through the
 * payload. So csum_start must be at or past the L4 header of an IPv4/IPv6
 * frame, or the guest could rewrite its checked source MAC or IPv4 address
 * (or the destination) after the anti-spoofing checks; and the field must
 * lie past csum_floor(), or it could turn an echo request into a Router
 * Advertisement (type 134) or a datagram into one for the DHCP port.
 * Returns NITRO_PKT_TX_OK or the drop reason. */
int nitro_pkt_tx_header(uint8_t *hdr, uint32_t flen, uint64_t feat,
                        uint32_t mtu)
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
        const uint8_t *frame = hdr + NITRO_NET_HDR_LEN;
        uint32_t l4 = l4_offset(frame, flen);
        if ((uint32_t)start + off + 2 > nitro_pkt_l3_end(frame, flen) ||
            l4 == 0 || start < l4 || (uint32_t)start + off < csum_floor(frame, flen, l4))
            return NITRO_NET_DROP_BAD_HEADER;
    }
    if (flen > mtu + ETH_HLEN)
        return NITRO_NET_DROP_MTU;
    memset(hdr, 0, NITRO_NET_HDR_LEN);
    hdr[0] = flags;
    st16le(hdr + 6, start);
    st16le(hdr + 8, off);
    return NITRO_PKT_TX_OK;
}
