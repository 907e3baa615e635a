/*
 * nitro_net.h: the C ABI of nitro's virtio-net datapath and VPC switch.
 *
 * Like nitro.h this is both a header and a cffi cdef (build.py adds it when
 * it exists): fixed-width ints, plain structs, opaque pointers, integer
 * #defines only.
 *
 * Model. One nitro_switch holds every VPC and every interface ("port") the
 * daemon serves. Python builds the tables at start-up (add_vpc, add_port,
 * set_uplink) and never changes them while traffic flows; after that it only
 * attaches/detaches RX rings (under each RX slot's lock) and reads counters.
 *
 * Per TX chain (virtio 1.2 5.1.6.2): the chain is copied out of guest memory
 * once into a scratch buffer of the port, the 12-byte virtio_net_hdr checked
 * (and replaced by a fresh one: receivers never see the sender's header),
 * the frame classified (anti-spoofing: source MAC and IPv4 source must be the
 * port's own; VLAN tags are refused; VPC; destination MAC) and then copied
 * into the destination's RX ring under that ring's lock, written to the VPC's
 * uplink TAP, or punted (ARP requests, DHCP, ICMP echo requests to the
 * gateway) to Python through a bounded queue whose eventfd Python waits on.
 * Python answers by nitro_switch_inject. Other IPv4 to the gateway address
 * is dropped here (NITRO_NET_DROP_TO_GATEWAY).
 *
 * Byte order: MAC and IPv4 addresses are passed as bytes in wire order.
 */
#ifndef NITRO_NET_H
#define NITRO_NET_H
#include <stdint.h>

#define NITRO_NET_HDR_LEN 12         /* struct virtio_net_hdr_v1 (VERSION_1) */
#define NITRO_NET_MAX_PORTS 256
#define NITRO_NET_MAX_VPCS 64
#define NITRO_NET_MAX_PAIRS 16
#define NITRO_NET_MAX_FRAME 65550    /* 64 KiB payload + Ethernet header */
#define NITRO_NET_PUNT_MAX_FRAME 2048
#define NITRO_NET_PUNT_SLOTS 256
/* Most punt queue entries one port may hold at once: a port flooding its
 * link-local services overflows its own share, never the others'. */
#define NITRO_NET_PUNT_PORT_SLOTS 16

/* Drop reasons (index into nitro_port_stats.drops). */
#define NITRO_NET_DROP_NO_RX_BUFFER 0        /* destination ring absent/full */
#define NITRO_NET_DROP_SPOOFED_SOURCE 1      /* source MAC/IP not the port's */
#define NITRO_NET_DROP_UNKNOWN_DESTINATION 2 /* no such MAC in the VPC */
#define NITRO_NET_DROP_BAD_HEADER 3          /* virtio_net_hdr, frame, VLAN tag */
#define NITRO_NET_DROP_MTU 4                 /* frame longer than the VPC MTU */
#define NITRO_NET_DROP_PUNT_OVERFLOW 5       /* control queue to Python full */
#define NITRO_NET_DROP_TO_GATEWAY 6          /* IPv4 the gateway does not answer */
#define NITRO_NET_DROP_KINDS 7
extern const char *const nitro_net_drop_names[NITRO_NET_DROP_KINDS];

/* "in" is towards the guest (its RX ring), "out" is from the guest. */
struct nitro_port_stats {
    uint64_t packets_in;
    uint64_t bytes_in;
    uint64_t packets_out;
    uint64_t bytes_out;
    uint64_t drops[NITRO_NET_DROP_KINDS];
    uint64_t bw_in_allowance_exceeded;
    uint64_t bw_out_allowance_exceeded;
    uint64_t pps_allowance_exceeded;
    /* Frames to the card's own services (ARP requests, DHCP, ICMP echo to
     * the gateway: everything punted) over linklocal_pps (ENA's name). */
    uint64_t linklocal_allowance_exceeded;
    uint64_t punted;
};

struct nitro_port_params {
    uint32_t vpc;            /* index given to nitro_switch_add_vpc */
    uint8_t mac[6];
    uint8_t ip[4];
    uint64_t bw_in_bytes_per_sec;   /* 0: unlimited */
    uint64_t bw_out_bytes_per_sec;
    uint64_t pps;                   /* packets in + out per second */
    uint64_t linklocal_pps;         /* frames punted per second; 0: unlimited */
};

struct nitro_switch;
struct nitro_vq;

struct nitro_switch *nitro_switch_new(void);
void nitro_switch_free(struct nitro_switch *sw);
/* VPC number vpc (0..MAX_VPCS-1): its gateway's MAC and IPv4, and MTU (L3). */
int nitro_switch_add_vpc(struct nitro_switch *sw, uint32_t vpc,
                         const uint8_t *gateway_mac, const uint8_t *gateway_ip,
                         uint32_t mtu);
/* Port number port (0..MAX_PORTS-1), in params->vpc. */
int nitro_switch_add_port(struct nitro_switch *sw, uint32_t port,
                          const struct nitro_port_params *params);
/* The VPC's uplink TAP (IFF_TAP|IFF_NO_PI, non-blocking) and its MAC; the fd
 * stays the caller's; -1 removes it. Only while no traffic flows. */
int nitro_switch_set_uplink(struct nitro_switch *sw, uint32_t vpc, int fd,
                            const uint8_t *mac);
/* Negotiated virtio-net features of the port's current frontend. */
int nitro_switch_set_port_features(struct nitro_switch *sw, uint32_t port,
                                   uint64_t features);
/* Make a started RX ring (queue pair `pair`) reachable by other ports'
 * deliveries, or unreachable again; detach returns only when no delivery
 * into it is in progress. */
int nitro_switch_attach_rx(struct nitro_switch *sw, uint32_t port,
                           uint32_t pair, struct nitro_vq *vq);
int nitro_switch_detach_rx(struct nitro_switch *sw, uint32_t port,
                           uint32_t pair);

/* Serve a TX ring of `port` (as nitro_blk_serve serves a blk queue): returns
 * frames taken when idle for idle_ms or stopped, NITRO_ERR_GUEST/ARG. */
int64_t nitro_net_tx_serve(struct nitro_switch *sw, uint32_t port,
                           struct nitro_vq *vq, int idle_ms);
/* RX rings are filled by other threads; their worker only drains kicks.
 * NITRO_ERR_GUEST once a delivery found the ring broken (the delivering
 * thread kicks the worker awake to report it), else 0. */
int64_t nitro_net_rx_serve(struct nitro_vq *vq);

/* Punted control frames: an eventfd readable exactly while any wait
 * (nitro_switch_punt_fd: the fd, owned by the switch, or NITRO_ERR_ARG).
 * pop_batch takes up to n frames at once into bufs (n slots of
 * NITRO_NET_PUNT_MAX_FRAME bytes), their ports and lengths, and returns how
 * many (0: empty). */
int nitro_switch_punt_fd(const struct nitro_switch *sw);
int32_t nitro_switch_punt_pop_batch(struct nitro_switch *sw, uint32_t *ports,
                                    uint32_t *lens, uint8_t *bufs, uint32_t n);
/* Deliver an Ethernet frame (no virtio header) to a port's RX ring:
 * 1 delivered, 0 dropped (counted), NITRO_ERR_ARG. */
int nitro_switch_inject(struct nitro_switch *sw, uint32_t port,
                        const uint8_t *frame, uint32_t len);
/* Read frames from the VPC's uplink TAP (waiting up to timeout_ms) and
 * deliver them; returns frames read, NITRO_ERR_SYS. */
int64_t nitro_switch_uplink_serve(struct nitro_switch *sw, uint32_t vpc,
                                  int timeout_ms);

/* Snapshot of the counters (atomic loads). */
int nitro_switch_port_stats(const struct nitro_switch *sw, uint32_t port,
                            struct nitro_port_stats *out);
/* The uplink's counters: "in" = written to the TAP, "out" = read from it. */
int nitro_switch_uplink_stats(const struct nitro_switch *sw, uint32_t vpc,
                              struct nitro_port_stats *out);

/* ---- the underlay: VPCs across hosts (docs/fleet.md "Datapath") ---------
 *
 * A frame from a guest whose destination lives on another host (a unicast
 * IPv4 frame whose destination MAC is no local port's and whose destination
 * IP the VPC's remote table maps to that MAC) is staged by the TX worker,
 * encapsulated per peer (nitro_tunnel_encap, one batch per run of frames to
 * one peer) and sent by the same worker with sendmmsg on the underlay's send
 * socket, non-blocking: a full socket buffer drops and counts, never waits.
 * Frames from other hosts arrive on an engine ring of their own
 * (nitro_ring_underlay_new): the worker reads them in batches (recvmmsg),
 * decapsulates them, checks them as strictly as local frames (the inner
 * source must be an interface the remote table places on the sending
 * host) and delivers them like local frames, batched per destination.
 *
 * The remote table and the underlay may change while traffic flows (a
 * read-write lock: TX lookups and RX batches read, changes write). */
#define NITRO_NET_MAX_REMOTES 16384   /* remote interfaces, all VPCs together */

/* Why the switch dropped a frame to or from another host (index into
 * nitro_underlay_stats.drops); the tunnel counts its own (nitro_tunnel.h). */
#define NITRO_UNDERLAY_DROP_SPOOFED_SOURCE 0     /* inner source not an interface the
                                                  * remote table places on the sender */
#define NITRO_UNDERLAY_DROP_UNKNOWN_DESTINATION 1 /* no local port has the destination
                                                  * MAC in the VPC (or no such VPC) */
#define NITRO_UNDERLAY_DROP_BAD_FRAME 2          /* inner frame not plain IPv4 */
#define NITRO_UNDERLAY_DROP_MTU 3                /* over the VPC MTU, over what the
                                                  * tunnel carries, or EMSGSIZE */
#define NITRO_UNDERLAY_DROP_SOCKET_FULL 4        /* send buffer or queue full */
#define NITRO_UNDERLAY_DROP_SEND_ERROR 5         /* any other send error */
#define NITRO_UNDERLAY_DROP_NO_UNDERLAY 6        /* a remote destination, no underlay set */
#define NITRO_UNDERLAY_DROP_KINDS 7
extern const char *const nitro_underlay_drop_names[NITRO_UNDERLAY_DROP_KINDS];

/* How the underlay ring's socket delivers datagrams. */
#define NITRO_UNDERLAY_RAW 0   /* a raw IPv4 socket (IPPROTO_ESP): outer IPv4 header first */
#define NITRO_UNDERLAY_UDP 1   /* a UDP socket bound to 6081: the Geneve payload only */

/* Per peer slot of the tunnel: "out" sent on the underlay socket, "in"
 * delivered to a local port (bytes: inner frames). */
struct nitro_underlay_stats {
    uint64_t packets_out;
    uint64_t bytes_out;
    uint64_t packets_in;
    uint64_t bytes_in;
    uint64_t drops[NITRO_UNDERLAY_DROP_KINDS];
};

struct nitro_tunnel;
struct nitro_ring;

/* Frames to other hosts go through tunnel t and out on send_fd (a raw
 * IPv4 socket with IP_HDRINCL: the tunnel writes whole outer packets; the
 * fd stays the caller's). t NULL removes it and returns once no worker
 * uses it any more. */
int nitro_switch_set_underlay(struct nitro_switch *sw, struct nitro_tunnel *t,
                              int send_fd);
/* The VNI frames of VPC vpc carry across hosts (< 2^24); -1 (0xffffffff):
 * none, its frames stay on this host. */
int nitro_switch_set_vni(struct nitro_switch *sw, uint32_t vpc, uint32_t vni);
/* The interface (ip, mac) of VPC vpc lives on the host in the tunnel's
 * peer slot `peer`; again for the same (vpc, ip) replaces it.
 * NITRO_ERR_LIMIT past NITRO_NET_MAX_REMOTES, NITRO_ERR_ARG for a
 * multicast MAC, a VPC that does not exist or an IP a local port of the
 * VPC has. */
int nitro_switch_set_remote(struct nitro_switch *sw, uint32_t vpc,
                            const uint8_t *ip, const uint8_t *mac,
                            uint32_t peer);
/* NITRO_ERR_ARG when there is no such entry. */
int nitro_switch_remove_remote(struct nitro_switch *sw, uint32_t vpc,
                               const uint8_t *ip);
/* Remote entries now (all VPCs). */
uint32_t nitro_switch_remote_count(const struct nitro_switch *sw);
/* Counters of one peer slot (< NITRO_TUNNEL_MAX_PEERS), or of all peers
 * together with peer = 0xffffffff. */
int nitro_switch_underlay_stats(const struct nitro_switch *sw, uint32_t peer,
                                struct nitro_underlay_stats *out);
/* The engine ring that receives from other hosts on fd (mode
 * NITRO_UNDERLAY_RAW or _UDP; the fd, non-blocking, stays the caller's).
 * Its worker waits for fd to be readable instead of a kick. */
struct nitro_ring *nitro_ring_underlay_new(struct nitro_switch *sw, int fd,
                                           uint32_t mode);

#endif
