/*
 * nitro_tunnel.h: frames between nitro hosts (ABI; also a cdef).
 *
 * Wire format (docs/fleet.md "Wire format" has the byte diagram):
 *   encrypted:  IPv4 (protocol 50) | ESP SPI, Sequence Number (RFC 4303 2) |
 *               IV (8 bytes, = be64(sequence number), RFC 4106 3.1) |
 *               AES-256-GCM( UDP (dst 6081) | Geneve (RFC 8926 3.4, no
 *               options, protocol 0x6558) | inner Ethernet frame |
 *               padding 1,2,3.. | pad length | next header 17 ) | ICV (16)
 *   plain:      IPv4 (protocol 17) | UDP (dst 6081) | Geneve | frame
 * i.e. ESP in transport mode protecting the UDP/Geneve datagram. GCM's
 * nonce is salt || IV (RFC 4106 4), its AAD SPI || sequence number (RFC
 * 4106 5, no extended sequence numbers), the ICV its 16-byte tag.
 *
 * One nitro_tunnel is one host's end: its underlay address, the underlay
 * MTU, whether it encrypts, the VNIs it serves, its peers (slots chosen by
 * the caller, each with an underlay address) and their security
 * associations: one outbound SA per peer, several inbound SAs per peer
 * (the receiver keeps the neighbouring key epochs so that a rekey loses
 * nothing). An SA's key material (NITRO_TUNNEL_KEYMAT_LEN bytes: the
 * AES-256 key then the 4-byte salt, as RFC 4106 8.1 lays out KEYMAT)
 * comes from a nitro_secret; the expanded key then lives only in the SA's
 * OpenSSL contexts (one per direction, keyed once, reused for every
 * packet) and is cleansed when the SA goes.
 *
 * Tables may change while traffic flows: encap/decap hold the tunnel's
 * read lock for a batch, table changes take the write lock, so an SA is
 * freed only when no batch uses it. Several threads may encap and decap at
 * once; each SA serialises its packets under its own lock (one batch to one
 * peer takes its outbound SA's lock once).
 *
 * Addresses are bytes in wire order; VNIs are 24-bit numbers.
 */
#ifndef NITRO_TUNNEL_H
#define NITRO_TUNNEL_H
#include <stdint.h>

#define NITRO_TUNNEL_GENEVE_PORT 6081    /* RFC 8926 3.3 */
#define NITRO_TUNNEL_PROTO_TEB 0x6558    /* Transparent Ethernet Bridging */
#define NITRO_TUNNEL_KEYMAT_LEN 36       /* AES-256 key || salt */
#define NITRO_TUNNEL_X25519_LEN 32
#define NITRO_TUNNEL_ICV_LEN 16
/* Sequence numbers an inbound SA still accepts below the highest one seen
 * (RFC 4303 3.4.3). */
#define NITRO_TUNNEL_REPLAY_WINDOW 1024
#define NITRO_TUNNEL_MAX_PEERS 256
#define NITRO_TUNNEL_MAX_INBOUND 1024    /* inbound SAs, all peers together */
#define NITRO_TUNNEL_MAX_VNIS 64
/* Outer bytes around an inner Ethernet frame. Plain: IPv4 20 + UDP 8 +
 * Geneve 8. Encrypted, at most: IPv4 20 + ESP 8 + IV 8 + UDP 8 + Geneve 8 +
 * padding 3 + pad length and next header 2 + ICV 16. */
#define NITRO_TUNNEL_PLAIN_OVERHEAD 36
#define NITRO_TUNNEL_ESP_OVERHEAD 73
/* Without extended sequence numbers a counter must not cycle (RFC 4303
 * 3.3.3): an outbound SA that sent 2^32 - 1 packets sends no more
 * (NITRO_TUNNEL_DROP_NO_SA). Past this many nitro_tunnel_peer_sa says it
 * wants a new epoch. */
#define NITRO_TUNNEL_SEQ_SOFT_LIMIT 0x80000000

/* Why a packet was dropped (index into nitro_tunnel_stats.drops). */
#define NITRO_TUNNEL_DROP_MALFORMED 0   /* truncated; not IPv4/ESP/UDP 6081/
                                         * Geneve v0 carrying Ethernet; a
                                         * fragment; OAM or critical options;
                                         * bad ESP padding or next header */
#define NITRO_TUNNEL_DROP_UNKNOWN_SPI 1 /* no inbound SA has this SPI */
#define NITRO_TUNNEL_DROP_REPLAY 2      /* seen, or older than the window */
#define NITRO_TUNNEL_DROP_AUTH 3        /* the ICV did not verify */
#define NITRO_TUNNEL_DROP_WRONG_VNI 4   /* a VNI this host does not serve */
#define NITRO_TUNNEL_DROP_MTU 5         /* outer packet over the underlay MTU */
#define NITRO_TUNNEL_DROP_NO_SA 6       /* no outbound SA for the peer, or used up */
#define NITRO_TUNNEL_DROP_POLICY 7      /* plain Geneve while encrypting, or ESP while not */
#define NITRO_TUNNEL_DROP_UNKNOWN_PEER 8 /* no such peer slot; plain: source not a peer */
#define NITRO_TUNNEL_DROP_KINDS 9
extern const char *const nitro_tunnel_drop_names[NITRO_TUNNEL_DROP_KINDS];

/* "out" is encapsulated towards a peer, "in" decapsulated from it. */
struct nitro_tunnel_stats {
    uint64_t packets_out;
    uint64_t bytes_out;     /* inner frame bytes */
    uint64_t packets_in;
    uint64_t bytes_in;
    uint64_t drops[NITRO_TUNNEL_DROP_KINDS];
};

/* One packet of a batch, as encap/decap report it. */
struct nitro_tunnel_pkt {
    uint32_t offset;  /* decap: where the inner frame starts in the slot */
    uint32_t len;     /* encap: outer packet; decap: inner frame; 0: dropped */
    uint32_t vni;     /* decap */
    uint16_t vpc;     /* decap: the number nitro_tunnel_add_vni gave the VNI */
    uint16_t peer;    /* decap: the sending peer's slot */
    int32_t drop;     /* -1: passed; else NITRO_TUNNEL_DROP_* */
};

/* An SA's state, for metrics and the rekey decision. */
struct nitro_tunnel_sa_info {
    uint32_t spi;
    uint32_t epoch;
    uint64_t seq;       /* outbound: last sent; inbound: highest authenticated */
    uint64_t packets;   /* packets through the SA (inbound: authenticated) */
    uint64_t age_ns;    /* since it was installed (CLOCK_MONOTONIC) */
    uint32_t rekey;     /* outbound: past NITRO_TUNNEL_SEQ_SOFT_LIMIT */
};

struct nitro_secret;
struct nitro_tunnel;

/* ---- keys ------------------------------------------------------------- */

/* The X25519 public key (32 bytes into pub) of a 32-byte private key.
 * NITRO_ERR_ARG when private_key is not 32 bytes. */
int nitro_tunnel_public_key(const struct nitro_secret *private_key, uint8_t *pub);
/* keymat = HKDF-SHA256(IKM = X25519(private_key, peer_public), salt, info)
 * (RFC 7748 5, RFC 5869), NITRO_TUNNEL_KEYMAT_LEN bytes into out (whose
 * capacity must hold them; its length is set). The shared secret never
 * leaves this call. NITRO_ERR_ARG for a bad key, including a peer key whose
 * shared secret is all zeros (a low-order point, RFC 7748 6.1). */
int nitro_tunnel_derive(const struct nitro_secret *private_key,
                        const uint8_t *peer_public, const uint8_t *salt,
                        uint32_t salt_len, const uint8_t *info,
                        uint32_t info_len, struct nitro_secret *out);

/* ---- the tunnel ------------------------------------------------------- */

/* local_ip: this host's underlay IPv4; mtu: the underlay's (the largest
 * outer IPv4 packet, 576..65535); encrypt: 1 ESP, 0 plain Geneve. NULL
 * only when memory could not be had or an argument is bad. */
struct nitro_tunnel *nitro_tunnel_new(const uint8_t *local_ip, uint32_t mtu,
                                      uint32_t encrypt);
/* Frees every SA (cleansed). Only when no thread encaps or decaps. */
void nitro_tunnel_free(struct nitro_tunnel *t);
/* Serve vni (< 2^24) as VPC number vpc: decap passes its frames with vpc.
 * Adding a served VNI again changes its vpc. */
int nitro_tunnel_add_vni(struct nitro_tunnel *t, uint32_t vni, uint32_t vpc);
int nitro_tunnel_remove_vni(struct nitro_tunnel *t, uint32_t vni);
/* Peer slot peer (< NITRO_TUNNEL_MAX_PEERS) at underlay address ip; again
 * for a slot in use changes the address (its SAs stay). Two peers may not
 * share an address (NITRO_ERR_ARG). */
int nitro_tunnel_set_peer(struct nitro_tunnel *t, uint32_t peer,
                          const uint8_t *ip);
/* Forget the peer and every SA of it. */
int nitro_tunnel_remove_peer(struct nitro_tunnel *t, uint32_t peer);
/* The peer's outbound SA becomes (keymat, spi, epoch), its sequence
 * number 0; the previous one is freed. keymat NULL removes it. */
int nitro_tunnel_set_outbound(struct nitro_tunnel *t, uint32_t peer,
                              const struct nitro_secret *keymat, uint32_t spi,
                              uint32_t epoch);
/* An inbound SA of the peer. NITRO_ERR_ARG when spi (0 is reserved) is in
 * use by any inbound SA, NITRO_ERR_LIMIT past NITRO_TUNNEL_MAX_INBOUND. */
int nitro_tunnel_add_inbound(struct nitro_tunnel *t, uint32_t peer,
                             const struct nitro_secret *keymat, uint32_t spi,
                             uint32_t epoch);
int nitro_tunnel_remove_inbound(struct nitro_tunnel *t, uint32_t spi);

/* Encapsulate n inner Ethernet frames (frames[i], lens[i] bytes) of VNI
 * vni for the peer: packet i is written at out + i * stride (stride >=
 * the MTU) as a whole outer IPv4 packet, pkts[i] says its length or why it
 * was dropped. Returns how many passed; NITRO_ERR_ARG. */
int nitro_tunnel_encap(struct nitro_tunnel *t, uint32_t peer, uint32_t vni,
                       const uint8_t *const *frames, const uint32_t *lens,
                       uint32_t n, uint8_t *out, uint32_t stride,
                       struct nitro_tunnel_pkt *pkts);
/* Decapsulate n received outer IPv4 packets (packet i at bufs + i * stride,
 * lens[i] bytes), in place: pkts[i] says where its inner frame is, of
 * which VNI, VPC and peer, or why it was dropped. Returns how many passed;
 * NITRO_ERR_ARG. */
int nitro_tunnel_decap(struct nitro_tunnel *t, uint8_t *bufs,
                       const uint32_t *lens, uint32_t stride, uint32_t n,
                       struct nitro_tunnel_pkt *pkts);

/* The underlay MTU the tunnel was made with (the largest outer packet). */
uint32_t nitro_tunnel_mtu(const struct nitro_tunnel *t);

/* Counters (atomic loads): of the whole tunnel (every drop, also those no
 * peer can be blamed for), or of one peer. */
int nitro_tunnel_stats(const struct nitro_tunnel *t,
                       struct nitro_tunnel_stats *out);
int nitro_tunnel_peer_stats(const struct nitro_tunnel *t, uint32_t peer,
                            struct nitro_tunnel_stats *out);
/* The peer's outbound SA (NITRO_ERR_ARG: none), or an inbound SA. */
int nitro_tunnel_outbound_info(struct nitro_tunnel *t, uint32_t peer,
                               struct nitro_tunnel_sa_info *out);
int nitro_tunnel_inbound_info(struct nitro_tunnel *t, uint32_t spi,
                              struct nitro_tunnel_sa_info *out);
/* TEST ONLY: the last sequence number the peer's outbound SA sent, so that
 * tests reach the soft limit and the end of the counter without sending
 * 2^31 packets. */
int nitro_tunnel_test_set_seq(struct nitro_tunnel *t, uint32_t peer, uint32_t seq);

#endif
