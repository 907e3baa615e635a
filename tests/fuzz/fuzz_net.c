/*
 * fuzz_net.c: libFuzzer harness for the virtio-net TX path of the VPC switch
 * (nitro_pkt.c, nitro_switch.c, nitro_net_queue.c): tx_header/tx_gso,
 * classify, TSO segmentation, checksum completion, delivery into RX rings
 * (MRG_RXBUF or not), the uplink and the punt queue.
 *
 * The harness plays a well-behaved driver (the ring walker has its own
 * target, fuzz_ring.c): it writes valid descriptor chains, so what is fuzzed
 * is what a guest puts *in* them: the virtio_net_hdr and frame bytes of TX
 * chains and how they are cut into descriptors, the sizes of the RX buffers
 * the peers post, the features each port negotiated, the MTU, and which
 * ports/uplink/limits exist.
 *
 * Switch: VPC 0 (gateway 10.0.0.1), port 0 (sender, 52:54:00:00:00:0a,
 * 10.0.0.10) whose TX ring is served, port 1 (..:0b, 10.0.0.11) and
 * optionally port 2 (..:0c, 10.0.0.12, in VPC 0 or in VPC 1) with one RX
 * ring each; optionally an uplink (a non-blocking AF_UNIX datagram
 * socketpair standing in for the TAP, MAC 02:00:00:00:00:fe).
 *
 * Input (little-endian):
 *   header (6 bytes)
 *     u8  setup  bit0 port 2 exists, bit1 port 2 in VPC 1, bit2 uplink,
 *                bit3 port 0 pps limit (50/s), bit4 port 0 bw_out limit
 *                (1 MB/s), bit5 port 1 bw_in limit (1 MB/s), bit6 rings
 *                use EVENT_IDX, bit7 port 1 starts without an RX ring
 *     u16 mtu    (< 68: 1500)
 *     u8  f0, f1, f2  features of ports 0..2 (FEAT_BITS below)
 *   then ops until the input ends (op byte mod OPS):
 *     0 FRAME  u16 head_len, head_len bytes, u16 fill_len, u8 fill,
 *              u8 ndesc (mod 8, +1), u16 cut
 *              a TX chain of head || fill x fill_len (virtio_net_hdr +
 *              frame; at most TX_SLOT bytes), cut into ndesc descriptors:
 *              the first cut bytes (mod the length), the rest evenly.
 *              With TX_SLOTS chains pending, the ring is served first.
 *     1 SERVE                                 nitro_net_tx_serve, then
 *              the harness checks and drains RX rings, punt queue, uplink
 *     2 RXBUF  u8 port, u8 count, u16 size, u16 cut
 *              post count RX buffers of size bytes (mod RX_SLOT, +1) to
 *              port 1 + (port & 1), each cut in two descriptors at cut
 *              (mod size; 0: one descriptor)
 *     3 FEAT   u8 port, u8 features           set_port_features (mod ports)
 *     4 RXRESET u8 port                       detach, reset, re-attach an
 *              empty ring (a guest that reset its device)
 *   and a final SERVE.
 *
 * Guest memory: one memfd [guard][R][guard][T][guard][X][guard], three
 * regions: R the rings, T the TX buffers (TX_SLOTS slots of TX_SLOT
 * bytes), X the RX buffers (RX_SLOTS slots of RX_SLOT bytes per RX port).
 * Guards hold CANARY and are mapped by nitro too (regions are mapped from
 * file offset 0), so a write outside a region is caught after each op.
 *
 * Oracles, besides ASan/UBSan: guards intact; the TX serve takes every
 * pending chain and returns their number; every used RX element is a
 * posted, outstanding head with len <= its buffer; every delivered frame
 * is whole (num_buffers elements, 1 without MRG_RXBUF), at least an
 * Ethernet header long, from port 0's MAC and (IPv4) address, untagged,
 * with a header whose flags are NEEDS_CSUM at most (none for a receiver
 * without GUEST_CSUM), at most
 * MTU + 14 bytes unless it is a super-frame, and a super-frame only for a
 * receiver with GUEST_CSUM and the matching GUEST_TSO4/6; punted frames
 * and uplink datagrams are 14..2048 / 14..MTU+14 bytes, from port 0 alike.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nitro_net.h"
#include "nitro_vring.h"
#define FUZZ_TARGET "fuzz_net"
#include "fuzz_common.h"

#define GUARD FUZZ_GUARD
#define RING_SLOT 4096u             /* one ring (num 64) per 4 KiB */
#define NRINGS 3                    /* TX of port 0, RX of ports 1 and 2 */
#define R_LEN (NRINGS * RING_SLOT)
#define TX_SLOTS 8
#define TX_SLOT 69632u              /* 68 KiB: > header + NITRO_NET_MAX_FRAME */
#define T_LEN (TX_SLOTS * TX_SLOT)
#define RX_SLOTS 32                 /* chains per RX ring, 2 descriptors each */
#define RX_SLOT 8192u
#define X_LEN (2 * RX_SLOTS * RX_SLOT)
#define OFF_R GUARD
#define OFF_T (OFF_R + R_LEN + GUARD)
#define OFF_X (OFF_T + T_LEN + GUARD)
#define FILE_LEN (OFF_X + X_LEN + GUARD)
#define GPA_R 0x10000ull
#define GPA_T 0x100000ull
#define GPA_X 0x400000ull
#define UADDR 0x7f0000000000ull     /* + gpa */
#define NUM 64
#define OPS 5
#define MAX_OPS 4096
#define MAX_SERVES 32
#define HDR NITRO_NET_HDR_LEN
#define ETH_HLEN 14
#define F_VERSION_1 (1ull << 32)

/* Feature byte -> virtio-net feature bits (virtio 1.2 5.1.3). */
static const unsigned FEAT_BITS[8] = {
    0 /* CSUM */, 1 /* GUEST_CSUM */, 7 /* GUEST_TSO4 */, 8 /* GUEST_TSO6 */,
    11 /* HOST_TSO4 */, 12 /* HOST_TSO6 */, 15 /* MRG_RXBUF */,
    5 /* MAC: ignored by the switch */};

static const uint8_t GW_MAC[6] = {0x02, 0, 0, 0, 0, 0x01};
static const uint8_t GW_IP[4] = {10, 0, 0, 1};
static const uint8_t UPLINK_MAC[6] = {0x02, 0, 0, 0, 0, 0xfe};

static int guest_fd = -1, call_fd = -1, up_fd[2] = {-1, -1};
static uint8_t *guest;
static uint8_t punt_bufs[NITRO_NET_PUNT_SLOTS * NITRO_NET_PUNT_MAX_FRAME];
static uint8_t dgram[NITRO_NET_MAX_FRAME + 1];

static void setup_once(void)
{
    if (guest != NULL)
        return;
    guest = map_guest("fuzz-net-guest", FILE_LEN, &guest_fd);
    call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (call_fd < 0 ||
        socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, up_fd) < 0)
        die("setup failed");
}

static void check_guards(void)
{
    static const uint32_t offs[4] = {0, OFF_R + R_LEN, OFF_T + T_LEN, OFF_X + X_LEN};
    guards_intact_or_die(guest, offs, 4);
}

/* ---- a driver's side of one split ring (num NUM) in R ------------------- */

struct ring {
    struct nitro_vq *vq;
    uint32_t r;          /* ring index in R */
    uint16_t avail_idx;  /* next avail->idx the driver publishes */
    uint16_t used_seen;  /* used elements consumed */
    uint8_t *desc, *avail, *used;
    /* RX: per slot, 0 free or the buffer size posted. */
    uint32_t posted[RX_SLOTS];
    uint32_t port;       /* RX: the port it belongs to */
    int attached;
};

struct state {
    struct nitro_switch *sw;
    struct nitro_mem *mem;
    uint64_t vq_features;
    uint32_t nports, mtu;
    uint64_t features[3];
    uint8_t mac[3][6];
    struct ring tx, rx[2];   /* rx[i]: port i + 1 */
    uint32_t tx_pending;
    int uplink;
    int serves;
};

static void ring_init(struct state *s, struct ring *g)
{
    uint64_t base = GPA_R + (uint64_t)g->r * RING_SLOT;
    g->desc = guest + OFF_R + g->r * RING_SLOT;
    g->avail = g->desc + 16 * NUM;
    g->used = g->desc + 2048;
    memset(g->desc, 0, RING_SLOT);
    g->avail_idx = g->used_seen = 0;
    memset(g->posted, 0, sizeof(g->posted));
    if (nitro_vq_set_num(g->vq, NUM) != NITRO_OK ||
        nitro_vq_set_addr(g->vq, s->mem, UADDR + base, UADDR + base + 16 * NUM,
                          UADDR + base + 2048) != NITRO_OK)
        die("ring setup refused");
    nitro_vq_set_features(g->vq, s->vq_features);
    nitro_vq_set_base(g->vq, 0);
    nitro_vq_set_fds(g->vq, -1, call_fd);
}

static void put_desc(struct ring *g, uint32_t i, uint64_t gpa, uint32_t len,
                     uint16_t flags, uint16_t next)
{
    uint8_t *d = g->desc + 16 * i;
    memcpy(d, &gpa, 8);
    memcpy(d + 8, &len, 4);
    memcpy(d + 12, &flags, 2);
    memcpy(d + 14, &next, 2);
}

static void publish(struct ring *g, uint16_t head)
{
    memcpy(g->avail + 4 + 2 * (g->avail_idx % NUM), &head, 2);
    g->avail_idx++;
    __atomic_store_n((uint16_t *)(g->avail + 2), g->avail_idx, __ATOMIC_RELEASE);
}

static uint16_t used_idx(const struct ring *g)
{
    return __atomic_load_n((const uint16_t *)(g->used + 2), __ATOMIC_ACQUIRE);
}

static void used_elem(const struct ring *g, uint16_t k, uint32_t *id, uint32_t *len)
{
    memcpy(id, g->used + 4 + 8 * (k % NUM), 4);
    memcpy(len, g->used + 8 + 8 * (k % NUM), 4);
}

/* ---- RX side ------------------------------------------------------------ */

static bool from_port0(const struct state *s, const uint8_t *f, uint64_t len);

static uint64_t rx_gpa(const struct ring *g, uint32_t slot)
{
    return GPA_X + ((uint64_t)(g->port - 1) * RX_SLOTS + slot) * RX_SLOT;
}

static uint8_t *rx_host(const struct ring *g, uint32_t slot)
{
    return guest + OFF_X + ((g->port - 1) * RX_SLOTS + slot) * RX_SLOT;
}

static void rx_post(struct ring *g, uint32_t count, uint32_t size, uint32_t cut)
{
    cut %= size;
    for (uint32_t slot = 0; slot < RX_SLOTS && count > 0; slot++) {
        if (g->posted[slot])
            continue;
        uint64_t gpa = rx_gpa(g, slot);
        uint16_t head = (uint16_t)(2 * slot);
        uint16_t w = VRING_DESC_F_WRITE;
        if (cut == 0) {
            put_desc(g, head, gpa, size, w, 0);
        } else {
            put_desc(g, head, gpa, cut, w | VRING_DESC_F_NEXT, head + 1);
            put_desc(g, head + 1, gpa + cut, size - cut, w, 0);
        }
        g->posted[slot] = size;
        publish(g, head);
        count--;
    }
}

static bool has(uint64_t features, unsigned bit)
{
    return (features >> bit) & 1;
}

/* Check a delivered frame: its first buffer and its length (header included). */
static void check_rx_frame(const struct state *s, const struct ring *g,
                           const uint8_t *first, uint64_t total)
{
    uint64_t feat = s->features[g->port];
    if (total < HDR + ETH_HLEN || total > HDR + NITRO_NET_MAX_FRAME)
        die("rx: frame length out of range");
    /* first holds at least the header (fill_ring refuses smaller); the
     * frame may continue in other buffers, so only look at what is here. */
    uint8_t flags = first[0], gso = first[1];
    if (flags & ~1u)
        die("rx: header flags other than NEEDS_CSUM");
    if ((flags & 1) && !has(feat, 1))
        die("rx: partial checksum for a receiver without GUEST_CSUM");
    if (gso == 0) {
        if (total - HDR > (uint64_t)s->mtu + ETH_HLEN)
            die("rx: frame longer than the MTU");
    } else if (gso == 1 || gso == 4) {
        if (!has(feat, 1) || !has(feat, gso == 1 ? 7 : 8))
            die("rx: super-frame for a receiver without GUEST_TSO");
    } else {
        die("rx: unknown gso_type");
    }
}

/* Consume every used element the device published on an RX ring. */
static void rx_drain(struct state *s, struct ring *g)
{
    if (!g->attached)
        return;
    uint16_t end = used_idx(g);
    uint16_t avail_n = (uint16_t)(end - g->used_seen);
    if (avail_n > NUM)
        die("rx: used index ran ahead of the ring");
    bool mrg = has(s->features[g->port], 15);
    while (g->used_seen != end) {
        uint32_t id, len;
        used_elem(g, g->used_seen, &id, &len);
        if (id % 2 || id / 2 >= RX_SLOTS || !g->posted[id / 2])
            die("rx: used id is not an outstanding head");
        uint32_t slot = id / 2;
        if (len > g->posted[slot] || len < HDR)
            die("rx: used len exceeds its buffer or misses the header");
        const uint8_t *first = rx_host(g, slot);
        uint16_t nb = (uint16_t)(first[10] | first[11] << 8);
        if (nb == 0 || nb > (uint16_t)(end - g->used_seen) || (!mrg && nb != 1))
            die("rx: num_buffers does not match the used elements");
        uint64_t total = len;
        uint32_t first_len = len;
        g->posted[slot] = 0;
        g->used_seen++;
        for (uint16_t b = 1; b < nb; b++) {
            used_elem(g, g->used_seen, &id, &len);
            if (id % 2 || id / 2 >= RX_SLOTS || !g->posted[id / 2] ||
                len > g->posted[id / 2] || len == 0)
                die("rx: bad used element inside a merged frame");
            total += len;
            g->posted[id / 2] = 0;
            g->used_seen++;
        }
        check_rx_frame(s, g, first, total);
        /* The frame may continue in the next buffer: check what is here. */
        if (!from_port0(s, first + HDR, first_len - HDR))
            die("rx: frame not from port 0's MAC and IPv4 address");
    }
}

/* ---- TX side ------------------------------------------------------------ */

/* IPv6 from port 0: its link-local source (or ::), and no router
 * advertisement or redirect right after the fixed header. */
static bool ip6_from_port0(const uint8_t *f, uint64_t len)
{
    static const uint8_t ll0[16] = {0xfe, 0x80, 0, 0, 0, 0, 0, 0,
                                    0x50, 0x54, 0x00, 0xff, 0xfe, 0, 0, 0x0a};
    static const uint8_t any6[16];
    if (len < 14 + 24)
        return true;
    if (memcmp(f + 22, ll0, 16) != 0 && memcmp(f + 22, any6, 16) != 0)
        return false;
    return len <= 54 || f[20] != 58 || (f[54] != 134 && f[54] != 137);
}

/* Anti-spoofing holds for what left the switch: frame (len bytes, or its
 * first len bytes) is from port 0's MAC, untagged, and an IPv4 frame has
 * port 0's source address (or 0.0.0.0, DHCP), an IPv6 one its link-local
 * address (or ::). */
static bool from_port0(const struct state *s, const uint8_t *f, uint64_t len)
{
    static const uint8_t ip0[4] = {10, 0, 0, 10}, any[4];
    if (len < 14)
        return len < 12 || memcmp(f + 6, s->mac[0], 6) == 0;
    uint16_t type = (uint16_t)(f[12] << 8 | f[13]);
    if (memcmp(f + 6, s->mac[0], 6) != 0 || type == 0x8100 || type == 0x88a8 ||
        type == 0x9100)
        return false;
    if (type == 0x86dd)
        return ip6_from_port0(f, len);
    return type != 0x0800 || len < 30 || memcmp(f + 26, ip0, 4) == 0 ||
           memcmp(f + 26, any, 4) == 0;
}

static void serve(struct state *s)
{
    if (++s->serves > MAX_SERVES)
        return;
    uint16_t before = used_idx(&s->tx);
    int64_t rc = nitro_net_tx_serve(s->sw, 0, s->tx.vq, 0);
    if (rc != (int64_t)s->tx_pending)
        die("tx_serve did not take exactly the pending chains");
    if ((uint16_t)(used_idx(&s->tx) - before) != s->tx_pending)
        die("tx_serve did not complete every chain");
    s->tx.used_seen = used_idx(&s->tx);
    s->tx_pending = 0;
    for (int i = 0; i < 2; i++)
        rx_drain(s, &s->rx[i]);
    uint32_t ports[64], lens[64];
    int32_t got;
    while ((got = nitro_switch_punt_pop_batch(s->sw, ports, lens, punt_bufs, 64)) > 0)
        for (int32_t i = 0; i < got; i++)
            if (ports[i] != 0 || lens[i] < ETH_HLEN || lens[i] > NITRO_NET_PUNT_MAX_FRAME ||
                !from_port0(s, punt_bufs + (size_t)i * NITRO_NET_PUNT_MAX_FRAME, lens[i]))
                die("punt: bad entry");
    if (got < 0)
        die("punt_pop_batch failed");
    ssize_t n;
    while ((n = recv(up_fd[1], dgram, sizeof(dgram), 0)) >= 0)
        if (n < ETH_HLEN || (uint64_t)n > (uint64_t)s->mtu + ETH_HLEN ||
            !from_port0(s, dgram, (uint64_t)n))
            die("uplink: bad frame");
    uint64_t v;
    (void)!read(call_fd, &v, sizeof(v));
}

static void tx_frame(struct state *s, struct in *in)
{
    uint32_t head_len = (uint32_t)take(in, 2);
    if (head_len > in->n)
        head_len = (uint32_t)in->n;
    if (head_len > TX_SLOT)
        head_len = TX_SLOT;
    const uint8_t *head = in->p;
    in->p += head_len;
    in->n -= head_len;
    uint32_t fill_len = (uint32_t)take(in, 2);
    uint8_t fill = (uint8_t)take(in, 1);
    uint32_t ndesc = (uint32_t)take(in, 1) % 8 + 1;
    uint32_t cut = (uint32_t)take(in, 2);
    if (fill_len > TX_SLOT - head_len)
        fill_len = TX_SLOT - head_len;
    uint32_t total = head_len + fill_len;
    if (total == 0) {
        total = 1;  /* descriptors are never empty */
        fill_len = 1;
    }
    if (s->tx_pending == TX_SLOTS)
        serve(s);
    if (s->serves >= MAX_SERVES)
        return;  /* no serve left to take it: do not queue it */
    uint32_t slot = s->tx_pending++;
    uint8_t *buf = guest + OFF_T + slot * TX_SLOT;
    memcpy(buf, head, head_len);
    memset(buf + head_len, fill, fill_len);
    if (ndesc > total)
        ndesc = total;
    uint32_t first = ndesc == 1 ? total : cut % (total - ndesc + 1);
    if (first == 0)
        first = total / ndesc;
    uint32_t rest = total - first, each = ndesc > 1 ? rest / (ndesc - 1) : 0;
    uint64_t gpa = GPA_T + (uint64_t)slot * TX_SLOT;
    uint32_t d0 = slot * 8, off = 0;
    for (uint32_t i = 0; i < ndesc; i++) {
        uint32_t len = i == 0 ? first : i == ndesc - 1 ? total - off : each;
        uint16_t flags = i + 1 < ndesc ? VRING_DESC_F_NEXT : 0;
        put_desc(&s->tx, d0 + i, gpa + off, len, flags, (uint16_t)(d0 + i + 1));
        off += len;
    }
    publish(&s->tx, (uint16_t)d0);
}

/* FUZZ_NET_STATS=1 ./fuzz_net seed...: what each input did, to check a
 * seed reaches the path it is named for. */
static void print_stats(const struct state *s)
{
    struct nitro_port_stats st;
    for (uint32_t i = 0; i <= s->nports; i++) {
        int up = i == s->nports;
        if (up ? nitro_switch_uplink_stats(s->sw, 0, &st)
               : nitro_switch_port_stats(s->sw, i, &st))
            continue;
        fprintf(stderr, "%s%u: out %lu/%lu in %lu/%lu punted %lu drops",
                up ? "uplink" : "port", up ? 0 : i,
                (unsigned long)st.packets_out, (unsigned long)st.bytes_out,
                (unsigned long)st.packets_in, (unsigned long)st.bytes_in,
                (unsigned long)st.punted);
        for (int d = 0; d < NITRO_NET_DROP_KINDS; d++)
            fprintf(stderr, " %lu", (unsigned long)st.drops[d]);
        fprintf(stderr, " limits %lu/%lu/%lu\n", (unsigned long)st.bw_in_allowance_exceeded,
                (unsigned long)st.bw_out_allowance_exceeded,
                (unsigned long)st.pps_allowance_exceeded);
    }
    for (int i = 0; i + 1 < (int)s->nports; i++)
        if (s->rx[i].attached && nitro_vq_fault(s->rx[i].vq) != NITRO_FAULT_NONE)
            fprintf(stderr, "port%d rx ring fault %u\n", i + 1, nitro_vq_fault(s->rx[i].vq));
}

/* ---- setup --------------------------------------------------------------- */

static uint64_t features_of(uint8_t b)
{
    uint64_t f = F_VERSION_1;
    for (int i = 0; i < 8; i++)
        if (b & (1u << i))
            f |= 1ull << FEAT_BITS[i];
    return f;
}

static struct nitro_mem *make_mem(void)
{
    struct nitro_mem *m = nitro_mem_new();
    if (m == NULL ||
        nitro_mem_add(m, guest_fd, GPA_R, R_LEN, UADDR + GPA_R, OFF_R) != NITRO_OK ||
        nitro_mem_add(m, guest_fd, GPA_T, T_LEN, UADDR + GPA_T, OFF_T) != NITRO_OK ||
        nitro_mem_add(m, guest_fd, GPA_X, X_LEN, UADDR + GPA_X, OFF_X) != NITRO_OK)
        die("guest memory setup");
    return m;
}

static void set_features(struct state *s, uint32_t port, uint8_t b)
{
    s->features[port] = features_of(b);
    if (nitro_switch_set_port_features(s->sw, port, s->features[port]) != NITRO_OK)
        die("set_port_features");
}

static void rx_attach(struct state *s, struct ring *g)
{
    ring_init(s, g);
    if (nitro_switch_attach_rx(s->sw, g->port, 0, g->vq) != NITRO_OK)
        die("attach_rx");
    g->attached = 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup_once();
    struct in in = {data, size};
    struct state s = {0};
    uint8_t setup = (uint8_t)take(&in, 1);
    s.mtu = (uint32_t)take(&in, 2);
    if (s.mtu < 68)
        s.mtu = 1500;
    s.nports = setup & 1 ? 3 : 2;
    s.uplink = (setup >> 2) & 1;
    s.vq_features = F_VERSION_1 | ((uint64_t)((setup >> 6) & 1) << VIRTIO_RING_F_EVENT_IDX);
    s.sw = nitro_switch_new();
    s.mem = make_mem();
    if (s.sw == NULL ||
        nitro_switch_add_vpc(s.sw, 0, GW_MAC, GW_IP, s.mtu) != NITRO_OK ||
        nitro_switch_add_vpc(s.sw, 1, GW_MAC, GW_IP, s.mtu) != NITRO_OK)
        die("switch setup");
    for (uint32_t i = 0; i < s.nports; i++) {
        struct nitro_port_params pp = {0};
        pp.vpc = i == 2 && (setup & 2) ? 1 : 0;
        memcpy(pp.mac, (uint8_t[6]){0x52, 0x54, 0, 0, 0, (uint8_t)(0x0a + i)}, 6);
        memcpy(pp.ip, (uint8_t[4]){10, 0, 0, (uint8_t)(10 + i)}, 4);
        if (i == 0) {
            pp.pps = setup & 8 ? 50 : 0;
            pp.bw_out_bytes_per_sec = setup & 16 ? 1000000 : 0;
        } else if (i == 1) {
            pp.bw_in_bytes_per_sec = setup & 32 ? 1000000 : 0;
        }
        memcpy(s.mac[i], pp.mac, 6);
        if (nitro_switch_add_port(s.sw, i, &pp) != NITRO_OK)
            die("add_port");
    }
    for (uint32_t i = 0; i < 3; i++) {
        uint8_t b = (uint8_t)take(&in, 1);
        if (i < s.nports)
            set_features(&s, i, b);
    }
    if (s.uplink && nitro_switch_set_uplink(s.sw, 0, up_fd[0], UPLINK_MAC) != NITRO_OK)
        die("set_uplink");

    memset(guest + OFF_R, 0, R_LEN);
    s.tx.vq = nitro_vq_new(1);
    s.tx.r = 0;
    if (s.tx.vq == NULL)
        die("nitro_vq_new");
    ring_init(&s, &s.tx);
    for (uint32_t i = 0; i + 1 < s.nports; i++) {
        struct ring *g = &s.rx[i];
        g->r = 1 + i;
        g->port = 1 + i;
        g->vq = nitro_vq_new(0);
        if (g->vq == NULL)
            die("nitro_vq_new");
        if (!(i == 0 && (setup & 128)))
            rx_attach(&s, g);
    }

    for (int ops = 0; in.n > 0 && ops < MAX_OPS; ops++) {
        switch (take(&in, 1) % OPS) {
        case 0:
            tx_frame(&s, &in);
            break;
        case 1:
            serve(&s);
            break;
        case 2: {
            struct ring *g = &s.rx[take(&in, 1) % (s.nports - 1)];
            uint32_t count = (uint32_t)take(&in, 1);
            uint32_t sz = (uint32_t)take(&in, 2) % RX_SLOT + 1;
            uint32_t cut = (uint32_t)take(&in, 2);
            if (g->attached)
                rx_post(g, count, sz, cut);
            break;
        }
        case 3: {
            uint32_t port = (uint32_t)take(&in, 1) % s.nports;
            set_features(&s, port, (uint8_t)take(&in, 1));
            break;
        }
        case 4: {
            struct ring *g = &s.rx[take(&in, 1) % (s.nports - 1)];
            if (g->attached && nitro_switch_detach_rx(s.sw, g->port, 0) != NITRO_OK)
                die("detach_rx");
            nitro_vq_reset(g->vq);
            rx_attach(&s, g);
            break;
        }
        }
        check_guards();
    }
    s.serves = 0;  /* the final serve always runs: nothing stays pending */
    serve(&s);
    check_guards();
    if (getenv("FUZZ_NET_STATS") != NULL)
        print_stats(&s);

    for (uint32_t i = 0; i + 1 < s.nports; i++) {
        if (s.rx[i].attached)
            nitro_switch_detach_rx(s.sw, s.rx[i].port, 0);
        nitro_vq_free(s.rx[i].vq);
    }
    nitro_vq_free(s.tx.vq);
    nitro_switch_free(s.sw);
    nitro_mem_free(s.mem);
    return 0;
}
