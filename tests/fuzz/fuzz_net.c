/*
 * fuzz_net.c: libFuzzer harness for the virtio-net datapath of the VPC
 * switch (nitro_pkt.c, nitro_switch.c, nitro_net_queue.c) from every side
 * a frame can come in by:
 * - guests' TX rings (nitro_net_tx_serve): tx_header/tx_gso, classify, TSO
 *   segmentation, checksum completion, the fast path, delivery into RX
 *   rings (MRG_RXBUF or not), the uplink and the punt queue;
 * - the uplink TAP (nitro_switch_uplink_serve, what the uplink reader thread
 *   calls): datagrams the harness writes into the socket standing in for it;
 * - the control plane (nitro_switch_inject: ARP/DHCP/ICMP replies);
 * and into RX rings of ports with several queue pairs, some of them laid
 * out by a hostile driver (split or packed).
 *
 * Two kinds of driver. A well-behaved one (TX rings, "good" RX rings) writes
 * valid split chains, so what is fuzzed is what a guest puts *in* them: the
 * virtio_net_hdr and frame bytes and how they are cut into descriptors, the
 * sizes of the RX buffers, the features, the MTU, which ports, pairs, uplink
 * and limits exist. A hostile one ("raw" RX rings) writes whatever the input
 * says into its ring and memory: descriptors outside guest memory or
 * straddling its end, loops, zero-length and too-short buffers, indirect
 * tables out of range, avail->idx jumps, a used ring outside memory, ring
 * parts inside its own receive buffers or in another device's TX buffers
 * (one VM with two NICs shares its memory), split or packed.
 *
 * Switch: VPC 0 (gateway 10.0.0.1) and VPC 1; ports 0..2 (52:54:00:00:00:0a
 * + port, 10.0.0.10 + port; port 2 only if setup bit0, in VPC 1 if bit1),
 * each with up to NPAIRS queue pairs: a TX ring per pair (port 0 pair 0 set
 * up from the start, the others on first use) and an RX ring per pair
 * (ports 1 and 2 start with a good ring on pair 0). Optionally an uplink on
 * VPC 0 (a non-blocking AF_UNIX datagram socketpair standing in for the
 * TAP, MAC 02:00:00:00:00:fe).
 *
 * Input (little-endian):
 *   header (6 bytes)
 *     u8  setup  bit0 port 2 exists, bit1 port 2 in VPC 1, bit2 uplink,
 *                bit3 port 0 pps limit (50/s), bit4 port 0 bw_out limit
 *                (1 MB/s), bit5 port 1 bw_in limit (1 MB/s), bit6 rings
 *                use EVENT_IDX, bit7 port 1 starts without an RX ring
 *     u16 mtu    (< 68: 1500)
 *     u8  f0, f1, f2  features of ports 0..2 (FEAT_BITS below)
 *   then ops until the input ends (op byte mod OPS). An RX ring is named
 *   by a byte rx (mod 6): 0, 1, 2 are pair 0 of ports 1, 2, 0 and 3, 4, 5
 *   pair 1 of ports 1, 2, 0 (a missing port: the op does nothing). A BLOB
 *   is u16 head_len, head_len bytes, u16 fill_len, u8 fill: the bytes
 *   head || fill x fill_len (capped per op).
 *     0 FRAME  BLOB, u8 ndesc (mod 8, +1), u16 cut
 *              a TX chain on the selected TX ring (TXSEL; at first port 0
 *              pair 0): virtio_net_hdr + frame, at most TX_SLOT bytes, cut
 *              into ndesc descriptors: the first cut bytes (mod the
 *              length), the rest evenly. With TX_SLOTS chains pending (all
 *              rings), SERVE runs first.
 *     1 SERVE  nitro_net_tx_serve on every TX ring with chains pending
 *              (and port 0 pair 0 always), each followed by the checks
 *     2 RXBUF  u8 rx, u8 count, u16 size, u16 cut
 *              post count buffers of size bytes (mod RX_SLOT, +1) to a good
 *              ring, each cut in two descriptors at cut (mod size; 0: one)
 *     3 FEAT   u8 port, u8 features           set_port_features (mod ports)
 *     4 RXRESET u8 rx                         detach, reset, attach an empty
 *              good ring (a guest that reset its device)
 *     5 TXSEL  u8 sel                         FRAME goes to port (sel & 3) %
 *              ports, pair (sel >> 2) % NPAIRS
 *     6 RXDETACH u8 rx                        detach (the pair stops)
 *     7 UPLINK BLOB (at most NITRO_NET_MAX_FRAME bytes)
 *              one datagram into the uplink socket (UP_SLOTS pending at
 *              most: UPSERVE first)
 *     8 UPSERVE                               nitro_switch_uplink_serve(0 ms)
 *     9 INJECT u8 port (mod ports + 1: the last one does not exist), BLOB
 *              (at most INJECT_MAX bytes)    nitro_switch_inject
 *    10 RAWRING u8 rx, u8 mode, u8 log2 num (mod 11), u16 d, u16 a, u16 u
 *              replace the ring by a hostile one in the ring's own buffer
 *              region (zeroed): mode bit0 packed, bit1 INDIRECT_DESC, bit2
 *              EVENT_IDX, bits 3-4 placement: 0 descriptors at 16*d, avail
 *              (packed: driver area) at 2*a, used (device area) at 4*u,
 *              all mod the region; 1 the used ring in the hole after the
 *              region; 2 the used ring in the region's last 4 bytes; 3 the
 *              descriptors and avail ring at d and a in the last TX buffer
 *              (a frame written there overwrites them). Attached only
 *              if nitro_vq_set_num/set_addr accept it (as the daemon does).
 *    11 RAWDESC u8 rx, u16 index, u8 count, u8 kind, u32 off, u32 len,
 *              u16 flags, u16 next
 *              count descriptors from index (mod num; index bit15: at
 *              16 * (index & 0x7fff) in the region instead, an indirect
 *              table), descriptor i at address where(kind, off + i * len),
 *              next (packed: id) = next + i, flags as given (packed: AVAIL
 *              and USED too). where: kind 0 the ring's region + off, 1 the
 *              TX buffers + off, 2 off bytes before the region's end, 3
 *              outside guest memory (low, or at the top of the space)
 *    12 RAWAVAIL u8 rx, u16 head, u16 delta
 *              split: avail->ring[idx] = head, then avail->idx += delta;
 *              packed: the driver event suppression area = head | delta << 16
 *    13 RAWWRITE u8 rx, u16 off, u8 len, len bytes  into the ring's region
 *              at 4 * off
 *   and a final SERVE and UPSERVE.
 *
 * Guest memory: one memfd [guard][R][guard][T][guard][X0][guard]..[X5]
 * [guard]: R the rings of the good driver, T the TX buffers (TX_SLOTS
 * slots of TX_SLOT bytes, shared by the TX rings), Xa the buffers of RX
 * ring a (RX_SLOTS slots of RX_SLOT bytes), each its own region with holes
 * between them in guest-physical space. Good rings translate through a
 * memory table of all of them; a hostile ring through one of its own
 * region and T only (raw_mem()), so its buffers reach nothing else, also
 * when it makes addresses out of its own indexes: never R or a good ring's
 * buffers, whose contents the oracles read. R and T are zeroed per input,
 * Xa when a hostile ring takes it: a case does not depend on the ones
 * before it. The guards hold CANARY and are checked after each op.
 *
 * Oracles, besides ASan/UBSan, the canaries and libFuzzer's timeout. Every
 * producing op (a TX ring's serve, UPSERVE, INJECT) is followed by reading
 * back everything it produced, checked against where it came from:
 * - a TX serve takes every pending chain and completes it;
 *   nitro_switch_uplink_serve reads exactly the datagrams written (or is
 *   ERR_ARG without an uplink); inject returns ERR_ARG exactly for a
 *   missing port or a length outside 14..2048, else 0 or 1, and 1 is one
 *   frame in the port's first attached ring (when that ring is good);
 * - every used element of a good RX ring is a posted, outstanding head with
 *   len <= its buffer; a frame is whole (num_buffers elements, 1 without
 *   MRG_RXBUF), 14..65550 bytes, its header's flags NEEDS_CSUM at most
 *   (none without GUEST_CSUM), a super-frame only for GUEST_CSUM +
 *   GUEST_TSO4/6, at most MTU + 14 otherwise (inject excepted); unless
 *   injected, it is for the receiver's MAC or a group address, untagged;
 * - from a TX ring: the receiver is another port of the sender's VPC and
 *   the frame (all of it, reassembled from its buffers) is from the
 *   sender's MAC and IPv4 address (or 0.0.0.0), IPv6 from its link-local
 *   address (or ::), no router advertisement or redirect (also behind
 *   extension headers: the harness walks them itself); punted frames
 *   (14..2048 bytes) and uplink datagrams (14..MTU+14) alike, and only a
 *   VPC 0 sender reaches the uplink;
 * - from the uplink: the receiver is in VPC 0, the header is all zero and
 *   the frame is byte for byte one of the datagrams written; from inject:
 *   the receiver is the port and the frame is the one injected; neither
 *   punts nor writes to the uplink;
 * - an RX ring (good or hostile) that a delivery broke has its kick fd
 *   signalled (the worker must wake to report it) and nitro_net_rx_serve
 *   then returns NITRO_ERR_GUEST; a healthy one returns 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
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
#define NPORTS 3
#define NPAIRS 2
#define NRX (NPORTS * NPAIRS)
#define RING_SLOT 4096u             /* one good ring (num 64) per 4 KiB */
#define R_LEN (2 * NRX * RING_SLOT) /* a TX and an RX ring per port and pair */
#define TX_SLOTS 8
#define TX_SLOT 69632u              /* 68 KiB: > header + NITRO_NET_MAX_FRAME */
#define T_LEN (TX_SLOTS * TX_SLOT)
#define RX_SLOTS 32                 /* chains per good RX ring, 2 descriptors each */
#define RX_SLOT 8192u
#define AREA (RX_SLOTS * RX_SLOT)   /* one RX ring's region */
#define OFF_R GUARD
#define OFF_T (OFF_R + R_LEN + GUARD)
#define OFF_X (OFF_T + T_LEN + GUARD)
#define OFF_AREA(a) (OFF_X + (a) * (AREA + GUARD))
#define FILE_LEN OFF_AREA(NRX)
#define GPA_R 0x10000ull
#define GPA_T 0x100000ull
#define GPA_X 0x1000000ull
#define GPA_AREA(a) (GPA_X + (uint64_t)(a) * 0x100000ull)  /* holes between */
#define UADDR 0x7f0000000000ull     /* + gpa */
#define NUM 64
#define OPS 14
#define MAX_OPS 4096
#define MAX_SERVES 32
#define UP_SLOTS 4
#define INJECT_MAX (NITRO_NET_PUNT_MAX_FRAME + 16)
#define HDR NITRO_NET_HDR_LEN
#define ETH_HLEN 14
#define F_VERSION_1 (1ull << 32)
#define F_RING_PACKED (1ull << 34)
#define PACKED_BASE 0x8000u         /* position 0, wrap counter 1 */

enum { RX_NONE, RX_GOOD, RX_RAW };
enum { SRC_TX, SRC_UPLINK, SRC_INJECT };
enum { OP_FRAME, OP_SERVE, OP_RXBUF, OP_FEAT, OP_RXRESET, OP_TXSEL, OP_RXDETACH,
       OP_UPLINK, OP_UPSERVE, OP_INJECT, OP_RAWRING, OP_RAWDESC, OP_RAWAVAIL,
       OP_RAWWRITE };

/* Feature byte -> virtio-net feature bits (virtio 1.2 5.1.3). */
static const unsigned FEAT_BITS[8] = {
    0 /* CSUM */, 1 /* GUEST_CSUM */, 7 /* GUEST_TSO4 */, 8 /* GUEST_TSO6 */,
    11 /* HOST_TSO4 */, 12 /* HOST_TSO6 */, 15 /* MRG_RXBUF */,
    5 /* MAC: ignored by the switch */};

static const uint8_t GW_MAC[6] = {0x02, 0, 0, 0, 0, 0x01};
static const uint8_t GW_IP[4] = {10, 0, 0, 1};
static const uint8_t UPLINK_MAC[6] = {0x02, 0, 0, 0, 0, 0xfe};

static int guest_fd = -1, call_fd = -1, up_fd[2] = {-1, -1}, kick_fd[NRX];
static uint8_t *guest;
static uint8_t punt_bufs[NITRO_NET_PUNT_SLOTS * NITRO_NET_PUNT_MAX_FRAME];
static uint8_t dgram[NITRO_NET_MAX_FRAME + 1];
static uint8_t rx_frame[HDR + NITRO_NET_MAX_FRAME];   /* a frame reassembled */
static uint8_t up_frames[UP_SLOTS][NITRO_NET_MAX_FRAME];
static uint8_t inject_buf[INJECT_MAX];

/* What each input did (FUZZ_NET_STATS=1): to check a seed takes its path. */
static struct {
    uint64_t ops[OPS];
    uint64_t tx_chains, rx_frames[3], up_read, inject_rc[3];
    uint64_t raw_attached, raw_refused, rx_faults[NITRO_FAULT_KINDS];
} seen;

static void setup_once(void)
{
    if (guest != NULL)
        return;
    guest = map_guest("fuzz-net-guest", FILE_LEN, &guest_fd);
    call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (call_fd < 0 ||
        socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, up_fd) < 0)
        die("setup failed");
    for (int i = 0; i < NRX; i++)
        if ((kick_fd[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
            die("setup failed");
}

static void check_guards(void)
{
    uint32_t offs[3 + NRX] = {0, OFF_R + R_LEN, OFF_T + T_LEN};
    for (int a = 0; a < NRX; a++)
        offs[3 + a] = OFF_AREA(a) + AREA;
    guards_intact_or_die(guest, offs, 3 + NRX);
}

/* ---- the driver's side of a ring ----------------------------------------- */

struct ring {
    struct nitro_vq *vq;
    uint32_t port, pair;
    uint32_t r;          /* good rings: their slot in R */
    uint32_t area;       /* RX: its region X<area> and kick fd */
    int kind;            /* RX: RX_*; TX: RX_GOOD once set up */
    uint16_t avail_idx;  /* next avail->idx the driver publishes */
    uint16_t used_seen;  /* used elements consumed */
    uint8_t *desc, *avail, *used;
    uint32_t posted[RX_SLOTS];  /* good RX: per slot, 0 free or its size */
    uint32_t pending;    /* TX: chains published, not served */
    /* hostile RX: ring size and layout, and whether its fault was seen */
    uint32_t num;
    int packed, fault_seen;
    struct nitro_mem *raw_mem;  /* hostile RX: its memory table (raw_mem()) */
};

struct source {
    int kind;            /* SRC_* */
    uint32_t port;       /* SRC_TX: the sender; SRC_INJECT: the target */
    uint32_t n;          /* SRC_UPLINK: datagrams in up_frames */
    const uint32_t *lens;
    uint32_t len;        /* SRC_INJECT */
};

struct state {
    struct nitro_switch *sw;
    struct nitro_mem *mem;
    uint64_t vq_features;
    uint32_t nports, mtu;
    uint32_t vpc[NPORTS];
    uint64_t features[NPORTS];
    uint8_t mac[NPORTS][6];
    struct ring tx[NPORTS][NPAIRS], rx[NPORTS][NPAIRS];
    struct ring *txsel;
    uint32_t tx_pending;  /* TX slots in use (all rings) */
    int uplink;
    int serves, up_serves;
    uint32_t up_n, up_len[UP_SLOTS];
};

static uint8_t *area_host(uint32_t a)
{
    return guest + OFF_AREA(a);
}

/* A 16-byte descriptor: addr, len, then split flags and next, or packed
 * buffer id and flags (virtio 1.2 2.7.5, 2.8.13). */
static void put_desc(uint8_t *d, uint64_t gpa, uint32_t len, uint16_t at12,
                     uint16_t at14)
{
    memcpy(d, &gpa, 8);
    memcpy(d + 8, &len, 4);
    memcpy(d + 12, &at12, 2);
    memcpy(d + 14, &at14, 2);
}

static void put_split_desc(struct ring *g, uint32_t i, uint64_t gpa, uint32_t len,
                           uint16_t flags, uint16_t next)
{
    put_desc(g->desc + 16 * i, gpa, len, flags, next);
}

static void ring_init(struct state *s, struct ring *g)
{
    uint64_t base = GPA_R + (uint64_t)g->r * RING_SLOT;
    g->desc = guest + OFF_R + g->r * RING_SLOT;
    g->avail = g->desc + 16 * NUM;
    g->used = g->desc + 2048;
    memset(g->desc, 0, RING_SLOT);
    g->avail_idx = g->used_seen = 0;
    g->pending = 0;
    memset(g->posted, 0, sizeof(g->posted));
    nitro_vq_set_features(g->vq, s->vq_features);
    if (nitro_vq_set_num(g->vq, NUM) != NITRO_OK ||
        nitro_vq_set_addr(g->vq, s->mem, UADDR + base, UADDR + base + 16 * NUM,
                          UADDR + base + 2048) != NITRO_OK)
        die("ring setup refused");
    nitro_vq_set_base(g->vq, 0);
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

/* ---- input helpers --------------------------------------------------------- */

struct blob {
    const uint8_t *head;
    uint32_t head_len, fill_len;
    uint8_t fill;
};

/* BLOB: u16 head_len, the bytes, u16 fill_len, u8 fill; at most cap bytes. */
static struct blob take_blob(struct in *in, uint32_t cap)
{
    struct blob b;
    b.head_len = (uint32_t)take(in, 2);
    if (b.head_len > in->n)
        b.head_len = (uint32_t)in->n;
    if (b.head_len > cap)
        b.head_len = cap;
    b.head = in->p;
    in->p += b.head_len;
    in->n -= b.head_len;
    b.fill_len = (uint32_t)take(in, 2);
    b.fill = (uint8_t)take(in, 1);
    if (b.fill_len > cap - b.head_len)
        b.fill_len = cap - b.head_len;
    return b;
}

static uint32_t blob_write(const struct blob *b, uint8_t *out)
{
    memcpy(out, b->head, b->head_len);
    memset(out + b->head_len, b->fill, b->fill_len);
    return b->head_len + b->fill_len;
}

static bool has(uint64_t features, unsigned bit)
{
    return (features >> bit) & 1;
}

/* ---- oracles on frames ------------------------------------------------------- */

/* IPv6 from port: its link-local source (or ::), and no router
 * advertisement or redirect right after the fixed header. */
/* The offset of an IPv6 frame's upper-layer header and its protocol in
 * *nh, past extension headers (RFC 8200 4: hop-by-hop 0, routing 43 and
 * destination options 60 in 8-byte units, AH 51 in 4-byte units less 2,
 * fragment 44 of 8 bytes); 0 when it is not in the frame (a later
 * fragment, a chain running past it). The harness's own walk, so the
 * oracle does not share nitro_pkt_ip6_upper(). */
static uint32_t ip6_upper(const uint8_t *f, uint64_t len, uint8_t *nh)
{
    uint64_t at = 54;
    *nh = f[20];
    for (int n = 0; n < 16; n++) {
        uint64_t ext;
        if (*nh == 0 || *nh == 43 || *nh == 60)
            ext = at + 2 <= len ? ((uint64_t)f[at + 1] + 1) * 8 : 0;
        else if (*nh == 51)
            ext = at + 2 <= len ? ((uint64_t)f[at + 1] + 2) * 4 : 0;
        else if (*nh == 44)
            ext = at + 4 <= len && (f[at + 2] << 8 | (f[at + 3] & 0xf8)) == 0 ? 8 : 0;
        else
            return (uint32_t)at;
        if (ext == 0 || at + ext > len)
            return 0;
        *nh = f[at];
        at += ext;
    }
    return 0;
}

static bool ip6_from(const struct state *s, uint32_t port, const uint8_t *f,
                     uint64_t len)
{
    const uint8_t *m = s->mac[port];
    const uint8_t ll[16] = {0xfe, 0x80, 0, 0, 0, 0, 0, 0,
                            m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]};
    static const uint8_t any6[16];
    if (len < 14 + 24)
        return true;
    if (memcmp(f + 22, ll, 16) != 0 && memcmp(f + 22, any6, 16) != 0)
        return false;
    uint8_t nh;
    uint32_t up = len > 54 ? ip6_upper(f, len, &nh) : 0;
    return up == 0 || up >= len || nh != 58 || (f[up] != 134 && f[up] != 137);
}

static bool vlan(uint16_t type)
{
    return type == 0x8100 || type == 0x88a8 || type == 0x9100;
}

/* Anti-spoofing holds for what left the switch: the frame (len bytes) is
 * from port's MAC, untagged, and an IPv4 frame has the port's source
 * address (or 0.0.0.0, DHCP), an IPv6 one its link-local address (or ::). */
static bool from_port(const struct state *s, uint32_t port, const uint8_t *f,
                      uint64_t len)
{
    const uint8_t ip[4] = {10, 0, 0, (uint8_t)(10 + port)};
    static const uint8_t any[4];
    if (len < 14)
        return len < 12 || memcmp(f + 6, s->mac[port], 6) == 0;
    uint16_t type = (uint16_t)(f[12] << 8 | f[13]);
    if (memcmp(f + 6, s->mac[port], 6) != 0 || vlan(type))
        return false;
    if (type == 0x86dd)
        return ip6_from(s, port, f, len);
    return type != 0x0800 || len < 30 || memcmp(f + 26, ip, 4) == 0 ||
           memcmp(f + 26, any, 4) == 0;
}

static bool all_zero(const uint8_t *p, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

/* A whole frame (virtio header included, total bytes) delivered to g. */
static void check_rx_frame(const struct state *s, const struct ring *g,
                           const struct source *src, const uint8_t *buf,
                           uint64_t total)
{
    uint64_t feat = s->features[g->port];
    if (total < HDR + ETH_HLEN || total > HDR + NITRO_NET_MAX_FRAME)
        die("rx: frame length out of range");
    const uint8_t *f = buf + HDR;
    uint64_t flen = total - HDR;
    uint8_t flags = buf[0], gso = buf[1];
    if (flags & ~1u)
        die("rx: header flags other than NEEDS_CSUM");
    if ((flags & 1) && !has(feat, 1))
        die("rx: partial checksum for a receiver without GUEST_CSUM");
    if (gso == 0) {
        if (flen > (uint64_t)s->mtu + ETH_HLEN && src->kind != SRC_INJECT)
            die("rx: frame longer than the MTU");
    } else if (gso == 1 || gso == 4) {
        if (!has(feat, 1) || !has(feat, gso == 1 ? 7 : 8))
            die("rx: super-frame for a receiver without GUEST_TSO");
    } else {
        die("rx: unknown gso_type");
    }
    if (!all_zero(buf, 10) && src->kind != SRC_TX)
        die("rx: a frame from the uplink or inject with a header");
    if (src->kind == SRC_INJECT) {  /* the control plane's frame, as it is */
        if (g->port != src->port || flen != src->len || memcmp(f, inject_buf, flen) != 0)
            die("rx: not the frame injected, or not where");
        return;
    }
    if (!(f[0] & 1) && memcmp(f, s->mac[g->port], 6) != 0)
        die("rx: unicast frame for another MAC");
    if (vlan((uint16_t)(f[12] << 8 | f[13])))
        die("rx: tagged frame");
    if (src->kind == SRC_TX) {
        if (g->port == src->port || s->vpc[g->port] != s->vpc[src->port])
            die("rx: frame delivered to its sender or out of its VPC");
        if (!from_port(s, src->port, f, flen))
            die("rx: frame not from the sender's MAC and address");
        return;
    }
    if (s->vpc[g->port] != 0)
        die("rx: uplink frame outside the uplink's VPC");
    for (uint32_t i = 0; i < src->n; i++)
        if (src->lens[i] == flen && memcmp(up_frames[i], f, flen) == 0)
            return;
    die("rx: frame not one of the datagrams written to the uplink");
}

/* ---- RX rings ---------------------------------------------------------------- */

static uint64_t rx_gpa(const struct ring *g, uint32_t slot)
{
    return GPA_AREA(g->area) + (uint64_t)slot * RX_SLOT;
}

static uint8_t *rx_host(const struct ring *g, uint32_t slot)
{
    return area_host(g->area) + slot * RX_SLOT;
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
            put_split_desc(g, head, gpa, size, w, 0);
        } else {
            put_split_desc(g, head, gpa, cut, w | VRING_DESC_F_NEXT, head + 1);
            put_split_desc(g, head + 1, gpa + cut, size - cut, w, 0);
        }
        g->posted[slot] = size;
        publish(g, head);
        count--;
    }
}

/* Take used element k of a good ring: its slot, checked and freed. */
static uint32_t rx_take(struct ring *g, uint32_t *len, bool first)
{
    uint32_t id;
    used_elem(g, g->used_seen, &id, len);
    if (id % 2 || id / 2 >= RX_SLOTS || !g->posted[id / 2])
        die("rx: used id is not an outstanding head");
    uint32_t slot = id / 2;
    if (*len > g->posted[slot] || (first ? *len < HDR : *len == 0))
        die("rx: used len exceeds its buffer or misses the header");
    g->posted[slot] = 0;
    g->used_seen++;
    return slot;
}

/* Consume every frame the device published on a good ring; returns how many. */
static uint32_t rx_drain(struct state *s, struct ring *g, const struct source *src)
{
    uint16_t end = used_idx(g);
    if ((uint16_t)(end - g->used_seen) > NUM)
        die("rx: used index ran ahead of the ring");
    bool mrg = has(s->features[g->port], 15);
    uint32_t frames = 0;
    while (g->used_seen != end) {
        uint16_t left = (uint16_t)(end - g->used_seen);
        uint32_t len;
        uint32_t slot = rx_take(g, &len, true);
        memcpy(rx_frame, rx_host(g, slot), len);
        uint16_t nb = (uint16_t)(rx_frame[10] | rx_frame[11] << 8);
        if (nb == 0 || nb > left || (!mrg && nb != 1))
            die("rx: num_buffers does not match the used elements");
        uint64_t total = len;
        for (uint16_t b = 1; b < nb; b++) {
            slot = rx_take(g, &len, false);
            if (total + len > sizeof(rx_frame))
                die("rx: merged frame longer than the largest frame");
            memcpy(rx_frame + total, rx_host(g, slot), len);
            total += len;
        }
        check_rx_frame(s, g, src, rx_frame, total);
        frames++;
    }
    return frames;
}

/* A ring a delivery broke must have been kicked (its worker reports the
 * fault: nitro_net_rx_serve says so); a healthy one serves 0. */
static void rx_check_fault(struct ring *g)
{
    uint32_t fault = nitro_vq_fault(g->vq);
    struct pollfd p = {.fd = kick_fd[g->area], .events = POLLIN};
    bool kicked = poll(&p, 1, 0) == 1;
    int64_t rc = nitro_net_rx_serve(g->vq);
    if (fault >= NITRO_FAULT_KINDS)
        die("rx: unknown fault kind");
    if (fault == NITRO_FAULT_NONE) {
        if (rc != 0)
            die("rx_serve failed on a healthy ring");
        return;
    }
    if (rc != NITRO_ERR_GUEST)
        die("rx_serve did not report the ring's fault");
    if (!g->fault_seen && !kicked)
        die("a delivery broke an RX ring without waking its worker");
    if (!g->fault_seen)
        seen.rx_faults[fault]++;
    g->fault_seen = 1;
}

/* ---- what a producing op left behind -------------------------------------- */

/* Check and consume everything src produced: frames in the RX rings, punted
 * frames, uplink datagrams; returns the frames in good RX rings. */
static uint32_t drain(struct state *s, const struct source *src)
{
    uint32_t frames = 0;
    for (uint32_t p = 0; p < s->nports; p++)
        for (uint32_t k = 0; k < NPAIRS; k++) {
            struct ring *g = &s->rx[p][k];
            if (g->kind == RX_GOOD)
                frames += rx_drain(s, g, src);
            if (g->kind != RX_NONE)
                rx_check_fault(g);
        }
    seen.rx_frames[src->kind] += frames;
    bool guest = src->kind == SRC_TX;
    uint32_t ports[64], lens[64];
    int32_t got;
    while ((got = nitro_switch_punt_pop_batch(s->sw, ports, lens, punt_bufs, 64)) > 0)
        for (int32_t i = 0; i < got; i++)
            if (!guest || ports[i] != src->port || lens[i] < ETH_HLEN ||
                lens[i] > NITRO_NET_PUNT_MAX_FRAME ||
                !from_port(s, src->port, punt_bufs + (size_t)i * NITRO_NET_PUNT_MAX_FRAME,
                           lens[i]))
                die("punt: bad entry");
    if (got < 0)
        die("punt_pop_batch failed");
    ssize_t n;
    while ((n = recv(up_fd[1], dgram, sizeof(dgram), 0)) >= 0)
        if (!guest || s->vpc[src->port] != 0 || n < ETH_HLEN ||
            (uint64_t)n > (uint64_t)s->mtu + ETH_HLEN ||
            !from_port(s, src->port, dgram, (uint64_t)n))
            die("uplink: bad frame");
    uint64_t v;
    (void)!read(call_fd, &v, sizeof(v));
    return frames;
}

/* ---- TX ------------------------------------------------------------------------ */

static void tx_setup(struct state *s, struct ring *g)
{
    if (g->kind)
        return;
    g->vq = nitro_vq_new(2 * g->pair + 1);
    if (g->vq == NULL)
        die("nitro_vq_new");
    ring_init(s, g);
    nitro_vq_set_fds(g->vq, -1, call_fd);
    g->kind = RX_GOOD;
}

static void serve_tx(struct state *s, struct ring *g)
{
    uint16_t before = used_idx(g);
    int64_t rc = nitro_net_tx_serve(s->sw, g->port, g->vq, 0);
    if (rc != (int64_t)g->pending)
        die("tx_serve did not take exactly the pending chains");
    if ((uint16_t)(used_idx(g) - before) != g->pending)
        die("tx_serve did not complete every chain");
    seen.tx_chains += g->pending;
    g->used_seen = used_idx(g);
    g->pending = 0;
    drain(s, &(struct source){.kind = SRC_TX, .port = g->port});
}

static void serve(struct state *s)
{
    if (++s->serves > MAX_SERVES)
        return;
    for (uint32_t p = 0; p < s->nports; p++)
        for (uint32_t k = 0; k < NPAIRS; k++) {
            struct ring *g = &s->tx[p][k];
            if (g->kind && (g->pending || (p == 0 && k == 0)))
                serve_tx(s, g);
        }
    s->tx_pending = 0;
}

static void tx_frame(struct state *s, struct in *in)
{
    struct blob b = take_blob(in, TX_SLOT);
    uint32_t ndesc = (uint32_t)take(in, 1) % 8 + 1;
    uint32_t cut = (uint32_t)take(in, 2);
    if (b.head_len + b.fill_len == 0)
        b.fill_len = 1;  /* descriptors are never empty */
    if (s->tx_pending == TX_SLOTS)
        serve(s);
    if (s->serves >= MAX_SERVES)
        return;  /* no serve left to take it: do not queue it */
    struct ring *g = s->txsel;
    tx_setup(s, g);
    uint32_t slot = s->tx_pending++;
    g->pending++;
    uint32_t total = blob_write(&b, guest + OFF_T + slot * TX_SLOT);
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
        put_split_desc(g, d0 + i, gpa + off, len, flags, (uint16_t)(d0 + i + 1));
        off += len;
    }
    publish(g, (uint16_t)d0);
}

/* ---- the uplink and inject ------------------------------------------------------- */

static void up_serve(struct state *s)
{
    int64_t rc = nitro_switch_uplink_serve(s->sw, 0, 0);
    if (!s->uplink) {
        if (rc != NITRO_ERR_ARG)
            die("uplink_serve without an uplink");
        while (recv(up_fd[0], dgram, sizeof(dgram), 0) >= 0)
            ;
    } else {
        if (rc != (int64_t)s->up_n)
            die("uplink_serve did not read exactly the datagrams written");
        seen.up_read += s->up_n;
        drain(s, &(struct source){.kind = SRC_UPLINK, .n = s->up_n, .lens = s->up_len});
    }
    s->up_n = 0;
}

static void up_write(struct state *s, struct in *in)
{
    struct blob b = take_blob(in, NITRO_NET_MAX_FRAME);
    if (s->up_serves >= MAX_SERVES)
        return;
    if (s->up_n == UP_SLOTS) {
        s->up_serves++;
        up_serve(s);
    }
    uint32_t len = blob_write(&b, up_frames[s->up_n]);
    ssize_t n = send(up_fd[1], up_frames[s->up_n], len, MSG_DONTWAIT);
    if (n < 0 && errno == EAGAIN) {  /* the socket's buffer is full */
        s->up_serves++;
        up_serve(s);
        len = blob_write(&b, up_frames[0]);
        n = send(up_fd[1], up_frames[0], len, MSG_DONTWAIT);
    }
    if (n != (ssize_t)len)
        die("uplink: cannot write a datagram");
    s->up_len[s->up_n++] = len;
}

/* The first attached ring a delivery to port with hint tries (deliver_one). */
static struct ring *first_rx(struct state *s, uint32_t port, uint32_t hint)
{
    uint32_t pairs = 0;
    for (uint32_t k = 0; k < NPAIRS; k++)
        if (s->rx[port][k].kind != RX_NONE)
            pairs = k + 1;
    for (uint32_t k = 0; k < pairs; k++) {
        struct ring *g = &s->rx[port][(hint + k) % pairs];
        if (g->kind != RX_NONE)
            return g;
    }
    return NULL;
}

static void inject(struct state *s, struct in *in)
{
    uint32_t port = (uint32_t)take(in, 1) % (s->nports + 1);
    struct blob b = take_blob(in, INJECT_MAX);
    uint32_t len = blob_write(&b, inject_buf);
    int rc = nitro_switch_inject(s->sw, port, inject_buf, len);
    bool bad = port >= s->nports || len < ETH_HLEN || len > NITRO_NET_PUNT_MAX_FRAME;
    if (bad ? rc != NITRO_ERR_ARG : rc != 0 && rc != 1)
        die("inject: unexpected return code");
    seen.inject_rc[bad ? 2 : rc]++;
    uint32_t got = drain(s, &(struct source){.kind = SRC_INJECT, .port = port, .len = len});
    struct ring *first = bad ? NULL : first_rx(s, port, 0);
    if (got != (rc == 1 && first != NULL && first->kind == RX_GOOD ? 1u : 0u))
        die("inject: delivered frames disagree with its return code");
}

/* ---- RX ring setup -------------------------------------------------------------- */

/* rx byte -> ring: 0..2 pair 0 of ports 1, 2, 0; 3..5 pair 1 of the same. */
static struct ring *rx_sel(struct state *s, uint8_t b)
{
    uint32_t i = b % NRX, port = (i % 3 + 1) % 3;
    return port < s->nports ? &s->rx[port][i / 3] : NULL;
}

static void rx_unplug(struct state *s, struct ring *g)
{
    if (g->kind != RX_NONE && nitro_switch_detach_rx(s->sw, g->port, g->pair) != NITRO_OK)
        die("detach_rx");
    g->kind = RX_NONE;
    nitro_vq_reset(g->vq);
    uint64_t v;
    (void)!read(kick_fd[g->area], &v, sizeof(v));
}

static void rx_attach(struct state *s, struct ring *g, int kind)
{
    nitro_vq_set_fds(g->vq, kick_fd[g->area], call_fd);
    if (nitro_switch_attach_rx(s->sw, g->port, g->pair, g->vq) != NITRO_OK)
        die("attach_rx");
    g->kind = kind;
    g->fault_seen = 0;
}

static void rx_good(struct state *s, struct ring *g)
{
    rx_unplug(s, g);
    ring_init(s, g);
    rx_attach(s, g, RX_GOOD);
}

/* ---- hostile RX rings ------------------------------------------------------------ */

static void *gpa_host(const struct ring *g, uint64_t gpa)
{
    if (gpa >= GPA_T && gpa < GPA_T + T_LEN)
        return guest + OFF_T + (gpa - GPA_T);
    return area_host(g->area) + (gpa - GPA_AREA(g->area));
}

/* RAWDESC addresses: the ring's region, the TX buffers, its region's end
 * (a long buffer runs into the hole after it), or no memory at all. */
static uint64_t raw_where(const struct ring *g, uint8_t kind, uint32_t off)
{
    switch (kind % 4) {
    case 0:
        return GPA_AREA(g->area) + off % AREA;
    case 1:
        return GPA_T + off % T_LEN;
    case 2:
        return GPA_AREA(g->area) + AREA - off % 4096;
    default:
        return off & 1 ? UINT64_MAX - (off >> 1) % 65536 : (off >> 1) % GPA_R;
    }
}

/* Guest memory tables: regions of the one memfd, each at UADDR + its gpa. */
static struct nitro_mem *mem_new(void)
{
    struct nitro_mem *m = nitro_mem_new();
    if (m == NULL)
        die("guest memory setup");
    return m;
}

static void mem_add(struct nitro_mem *m, uint64_t gpa, uint64_t len, uint64_t off)
{
    if (nitro_mem_add(m, guest_fd, gpa, len, UADDR + gpa, off) != NITRO_OK)
        die("guest memory setup");
}

/* A hostile ring's memory table: its own region and T, nothing else. A
 * driver that lays its own ring parts over each other makes buffer
 * addresses out of its indexes (an avail ring on its descriptor table turns
 * avail->idx 1 into address 0x10000), and with R or another region in its
 * table that could be a good ring, whose contents the oracles read. Made
 * on first use: most inputs have no hostile ring. */
static struct nitro_mem *raw_mem(struct ring *g)
{
    if (g->raw_mem == NULL) {
        g->raw_mem = mem_new();
        mem_add(g->raw_mem, GPA_T, T_LEN, OFF_T);
        mem_add(g->raw_mem, GPA_AREA(g->area), AREA, OFF_AREA(g->area));
    }
    return g->raw_mem;
}

static void raw_ring(struct state *s, struct ring *g, struct in *in)
{
    uint8_t mode = (uint8_t)take(in, 1);
    uint32_t num = 1u << (take(in, 1) % 11);
    uint32_t d = (uint32_t)take(in, 2) * 16, a = (uint32_t)take(in, 2) * 2;
    uint32_t u = (uint32_t)take(in, 2) * 4;
    if (g == NULL)
        return;
    rx_unplug(s, g);
    g->packed = mode & 1;
    uint64_t feat = F_VERSION_1 | (g->packed ? F_RING_PACKED : 0) |
                    ((uint64_t)((mode >> 1) & 1) << VIRTIO_RING_F_INDIRECT_DESC) |
                    ((uint64_t)((mode >> 2) & 1) << VIRTIO_RING_F_EVENT_IDX);
    memset(area_host(g->area), 0, AREA);
    uint64_t base = GPA_AREA(g->area);
    uint64_t dg = base + d % AREA, ag = base + a % AREA, ug = base + u % AREA;
    switch ((mode >> 3) & 3) {
    case 1:
        ug = base + AREA + u % 4096;  /* in the hole after the region */
        break;
    case 2:
        ug = base + AREA - 4;          /* fits a packed device area only */
        break;
    case 3:
        dg = GPA_T + (TX_SLOTS - 1) * TX_SLOT + d % TX_SLOT;
        ag = GPA_T + (TX_SLOTS - 1) * TX_SLOT + a % TX_SLOT;
        break;
    }
    if (nitro_vq_set_features(g->vq, feat) != NITRO_OK ||
        nitro_vq_set_num(g->vq, num) != NITRO_OK ||
        nitro_vq_set_addr(g->vq, raw_mem(g), UADDR + dg, UADDR + ag, UADDR + ug) != NITRO_OK ||
        nitro_vq_set_base(g->vq, g->packed ? PACKED_BASE : 0) != NITRO_OK) {
        seen.raw_refused++;
        return;  /* the daemon never starts a ring it could not set up */
    }
    g->num = num;
    g->desc = gpa_host(g, dg);
    g->avail = gpa_host(g, ag);
    g->avail_idx = 0;
    rx_attach(s, g, RX_RAW);
    seen.raw_attached++;
}

static void raw_desc(struct ring *g, struct in *in)
{
    uint32_t index = (uint32_t)take(in, 2), count = (uint32_t)take(in, 1);
    uint8_t kind = (uint8_t)take(in, 1);
    uint32_t off = (uint32_t)take(in, 4), len = (uint32_t)take(in, 4);
    uint16_t flags = (uint16_t)take(in, 2), next = (uint16_t)take(in, 2);
    if (g == NULL || g->kind != RX_RAW)
        return;
    for (uint32_t i = 0; i < count; i++) {
        uint8_t *at = index & 0x8000
                          ? area_host(g->area) + (16 * ((index & 0x7fff) + i)) % AREA
                          : g->desc + 16 * ((index + i) % g->num);
        uint64_t gpa = raw_where(g, kind, off + i * len);
        if (g->packed)
            put_desc(at, gpa, len, (uint16_t)(next + i), flags);
        else
            put_desc(at, gpa, len, flags, (uint16_t)(next + i));
    }
}

static void raw_avail(struct ring *g, struct in *in)
{
    uint16_t head = (uint16_t)take(in, 2), delta = (uint16_t)take(in, 2);
    if (g == NULL || g->kind != RX_RAW)
        return;
    if (g->packed) {
        memcpy(g->avail, &head, 2);
        memcpy(g->avail + 2, &delta, 2);
        return;
    }
    memcpy(g->avail + 4 + 2 * (g->avail_idx % g->num), &head, 2);
    g->avail_idx += delta;
    __atomic_store_n((uint16_t *)(g->avail + 2), g->avail_idx, __ATOMIC_RELEASE);
}

static void raw_write(struct ring *g, struct in *in)
{
    uint32_t off = (uint32_t)take(in, 2) * 4 % AREA, len = (uint32_t)take(in, 1);
    if (len > in->n)
        len = (uint32_t)in->n;
    if (g != NULL && g->kind == RX_RAW)
        memcpy(area_host(g->area) + off, in->p, off + len > AREA ? AREA - off : len);
    in->p += len;
    in->n -= len;
}

/* ---- FUZZ_NET_STATS=1 ./fuzz_net seed...: what each input did -------------------- */

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
    /* One line of key=value: tests/fuzz/test_fuzz.py reads it. */
    fprintf(stderr, "harness tx_chains=%lu rx_tx=%lu rx_uplink=%lu rx_inject=%lu "
            "up_read=%lu inject_0=%lu inject_1=%lu inject_arg=%lu raw_attached=%lu "
            "raw_refused=%lu", (unsigned long)seen.tx_chains,
            (unsigned long)seen.rx_frames[SRC_TX], (unsigned long)seen.rx_frames[SRC_UPLINK],
            (unsigned long)seen.rx_frames[SRC_INJECT], (unsigned long)seen.up_read,
            (unsigned long)seen.inject_rc[0], (unsigned long)seen.inject_rc[1],
            (unsigned long)seen.inject_rc[2], (unsigned long)seen.raw_attached,
            (unsigned long)seen.raw_refused);
    for (int f = 1; f < NITRO_FAULT_KINDS; f++)
        fprintf(stderr, " fault_%d=%lu", f, (unsigned long)seen.rx_faults[f]);
    for (uint32_t i = 0; i < s->nports; i++)
        if (nitro_switch_port_stats(s->sw, i, &st) == NITRO_OK)
            fprintf(stderr, " in_%u=%lu", i, (unsigned long)st.packets_in);
    for (int i = 0; i < OPS; i++)
        fprintf(stderr, " op_%d=%lu", i, (unsigned long)seen.ops[i]);
    fprintf(stderr, "\n");
}

/* ---- setup ------------------------------------------------------------------------- */

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
    struct nitro_mem *m = mem_new();
    mem_add(m, GPA_R, R_LEN, OFF_R);
    mem_add(m, GPA_T, T_LEN, OFF_T);
    for (uint32_t a = 0; a < NRX; a++)
        mem_add(m, GPA_AREA(a), AREA, OFF_AREA(a));
    return m;
}

static void set_features(struct state *s, uint32_t port, uint8_t b)
{
    s->features[port] = features_of(b);
    if (nitro_switch_set_port_features(s->sw, port, s->features[port]) != NITRO_OK)
        die("set_port_features");
}

static void setup_switch(struct state *s, uint8_t setup)
{
    s->sw = nitro_switch_new();
    s->mem = make_mem();
    if (s->sw == NULL ||
        nitro_switch_add_vpc(s->sw, 0, GW_MAC, GW_IP, s->mtu) != NITRO_OK ||
        nitro_switch_add_vpc(s->sw, 1, GW_MAC, GW_IP, s->mtu) != NITRO_OK)
        die("switch setup");
    for (uint32_t i = 0; i < s->nports; i++) {
        struct nitro_port_params pp = {0};
        pp.vpc = s->vpc[i] = i == 2 && (setup & 2) ? 1 : 0;
        memcpy(pp.mac, (uint8_t[6]){0x52, 0x54, 0, 0, 0, (uint8_t)(0x0a + i)}, 6);
        memcpy(pp.ip, (uint8_t[4]){10, 0, 0, (uint8_t)(10 + i)}, 4);
        if (i == 0) {
            pp.pps = setup & 8 ? 50 : 0;
            pp.bw_out_bytes_per_sec = setup & 16 ? 1000000 : 0;
        } else if (i == 1) {
            pp.bw_in_bytes_per_sec = setup & 32 ? 1000000 : 0;
        }
        memcpy(s->mac[i], pp.mac, 6);
        if (nitro_switch_add_port(s->sw, i, &pp) != NITRO_OK)
            die("add_port");
    }
}

static void setup_rings(struct state *s, uint8_t setup)
{
    for (uint32_t p = 0; p < s->nports; p++)
        for (uint32_t k = 0; k < NPAIRS; k++) {
            struct ring *t = &s->tx[p][k], *g = &s->rx[p][k];
            t->port = g->port = p;
            t->pair = g->pair = k;
            t->r = p * NPAIRS + k;
            g->r = NRX + p * NPAIRS + k;
            g->area = p * NPAIRS + k;
            g->vq = nitro_vq_new(2 * k);
            if (g->vq == NULL)
                die("nitro_vq_new");
            if (k == 0 && p > 0 && !(p == 1 && (setup & 128)))
                rx_good(s, g);
        }
    s->txsel = &s->tx[0][0];
    tx_setup(s, s->txsel);
}

static void teardown(struct state *s)
{
    for (uint32_t p = 0; p < s->nports; p++)
        for (uint32_t k = 0; k < NPAIRS; k++) {
            rx_unplug(s, &s->rx[p][k]);
            nitro_vq_free(s->rx[p][k].vq);
            nitro_vq_free(s->tx[p][k].vq);
            nitro_mem_free(s->rx[p][k].raw_mem);
        }
    nitro_switch_free(s->sw);
    nitro_mem_free(s->mem);
}

static void run_op(struct state *s, struct in *in)
{
    uint8_t op = (uint8_t)(take(in, 1) % OPS);
    seen.ops[op]++;
    switch (op) {
    case OP_FRAME:
        tx_frame(s, in);
        break;
    case OP_SERVE:
        serve(s);
        break;
    case OP_RXBUF: {
        struct ring *g = rx_sel(s, (uint8_t)take(in, 1));
        uint32_t count = (uint32_t)take(in, 1);
        uint32_t sz = (uint32_t)take(in, 2) % RX_SLOT + 1;
        uint32_t cut = (uint32_t)take(in, 2);
        if (g != NULL && g->kind == RX_GOOD)
            rx_post(g, count, sz, cut);
        break;
    }
    case OP_FEAT: {
        uint32_t port = (uint32_t)take(in, 1) % s->nports;
        set_features(s, port, (uint8_t)take(in, 1));
        break;
    }
    case OP_RXRESET: {
        struct ring *g = rx_sel(s, (uint8_t)take(in, 1));
        if (g != NULL)
            rx_good(s, g);
        break;
    }
    case OP_TXSEL: {
        uint8_t b = (uint8_t)take(in, 1);
        s->txsel = &s->tx[(b & 3) % s->nports][(b >> 2) % NPAIRS];
        break;
    }
    case OP_RXDETACH: {
        struct ring *g = rx_sel(s, (uint8_t)take(in, 1));
        if (g != NULL)
            rx_unplug(s, g);
        break;
    }
    case OP_UPLINK:
        up_write(s, in);
        break;
    case OP_UPSERVE:
        if (s->up_serves++ < MAX_SERVES)
            up_serve(s);
        break;
    case OP_INJECT:
        inject(s, in);
        break;
    case OP_RAWRING:
        raw_ring(s, rx_sel(s, (uint8_t)take(in, 1)), in);
        break;
    case OP_RAWDESC:
        raw_desc(rx_sel(s, (uint8_t)take(in, 1)), in);
        break;
    case OP_RAWAVAIL:
        raw_avail(rx_sel(s, (uint8_t)take(in, 1)), in);
        break;
    case OP_RAWWRITE:
        raw_write(rx_sel(s, (uint8_t)take(in, 1)), in);
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup_once();
    struct in in = {data, size};
    struct state s = {0};
    memset(&seen, 0, sizeof(seen));
    uint8_t setup = (uint8_t)take(&in, 1);
    s.mtu = (uint32_t)take(&in, 2);
    if (s.mtu < 68)
        s.mtu = 1500;
    s.nports = setup & 1 ? 3 : 2;
    s.uplink = (setup >> 2) & 1;
    s.vq_features = F_VERSION_1 | ((uint64_t)((setup >> 6) & 1) << VIRTIO_RING_F_EVENT_IDX);
    memset(guest + OFF_R, 0, R_LEN);
    memset(guest + OFF_T, 0, T_LEN);
    setup_switch(&s, setup);
    for (uint32_t i = 0; i < 3; i++) {
        uint8_t b = (uint8_t)take(&in, 1);
        if (i < s.nports)
            set_features(&s, i, b);
    }
    if (s.uplink && nitro_switch_set_uplink(s.sw, 0, up_fd[0], UPLINK_MAC) != NITRO_OK)
        die("set_uplink");
    setup_rings(&s, setup);

    for (int ops = 0; in.n > 0 && ops < MAX_OPS; ops++) {
        run_op(&s, &in);
        check_guards();
    }
    s.serves = 0;  /* the final serves always run: nothing stays pending */
    serve(&s);
    up_serve(&s);
    check_guards();
    if (getenv("FUZZ_NET_STATS") != NULL)
        print_stats(&s);
    teardown(&s);
    return 0;
}
