/*
 * nitro_tunnel.c: Geneve (RFC 8926) in ESP (RFC 4303) with AES-256-GCM
 * (RFC 4106) between nitro hosts; the wire format is in nitro_tunnel.h and
 * docs/fleet.md.
 *
 * Per packet the work is one GCM pass and a few header bytes: the outer
 * headers are written straight into the caller's slot, the frame is
 * encrypted from where it lies into the slot behind them (no copy before
 * the cipher), and received packets are decrypted in place. Every SA keeps
 * one OpenSSL context keyed once; only the nonce changes per packet.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include "nitro.h"
#include "nitro_crypto.h"
#include "nitro_pkt.h"
#include "nitro_tunnel.h"
#include "nitro_vring.h"  /* nitro_now_ns */

#define IP4_HLEN 20
#define UDP_HLEN 8
#define GENEVE_HLEN 8
#define ESP_HLEN 8
#define ESP_IV_LEN 8
#define ESP_TRAILER 2             /* pad length, next header */
#define IPPROTO_ESP_ 50
#define IP4_DF 0x4000
#define IP4_MF 0x2000
#define IP4_OFFSET 0x1fff
#define OUTER_TTL 64
#define GENEVE_O 0x80             /* OAM: a control message, not a frame */
#define GENEVE_C 0x40             /* critical options present */
#define KEY_LEN 32
#define SALT_LEN 4
/* The replay bitmap (RFC 6479's layout: a ring of words, no shifting) is
 * twice the window, so the word being cleared for a new top is never one
 * the window still needs. */
#define REPLAY_BITS (2 * NITRO_TUNNEL_REPLAY_WINDOW)
#define REPLAY_WORDS (REPLAY_BITS / 64)
#define SEQ_MAX 0xffffffffu
/* Open addressing, at most half full. */
#define SPI_SLOTS (2 * NITRO_TUNNEL_MAX_INBOUND)
#define IP_SLOTS (2 * NITRO_TUNNEL_MAX_PEERS)
#define VNI_SLOTS (2 * NITRO_TUNNEL_MAX_VNIS)
#define EMPTY UINT16_MAX

struct esp_sa {
    pthread_mutex_t lock;
    EVP_CIPHER_CTX *ctx;
    uint32_t spi;
    uint32_t epoch;
    uint16_t peer;
    uint8_t salt[SALT_LEN];
    uint64_t seq;                 /* out: last sent; in: highest authenticated */
    uint64_t packets;
    uint64_t created_ns;
    uint64_t window[REPLAY_WORDS];
};

struct counters {
    uint64_t packets_out, bytes_out, packets_in, bytes_in;
    uint64_t drops[NITRO_TUNNEL_DROP_KINDS];
};

struct peer {
    bool in_use;
    uint8_t ip[4];
    struct esp_sa *out;
    struct counters c;
};

/* A u32 -> u16 map, rebuilt from its owner's arrays on every change. */
struct map {
    uint32_t keys[SPI_SLOTS];
    uint16_t vals[SPI_SLOTS];
    uint32_t mask;
};

struct nitro_tunnel {
    pthread_rwlock_t lock;       /* tables: read per batch, write per change */
    uint8_t local_ip[4];
    uint32_t mtu;
    bool encrypt;
    EVP_CIPHER *gcm;
    struct peer peers[NITRO_TUNNEL_MAX_PEERS];
    struct esp_sa *in[NITRO_TUNNEL_MAX_INBOUND];
    uint32_t n_in;
    uint32_t vnis[NITRO_TUNNEL_MAX_VNIS];
    uint16_t vpcs[NITRO_TUNNEL_MAX_VNIS];
    uint32_t n_vnis;
    struct map by_spi;            /* -> index into in[] */
    struct map by_ip;             /* -> peer slot (plain mode's receive) */
    struct map by_vni;            /* -> index into vnis[] */
    struct counters c;
};

/* ---- small helpers ----------------------------------------------------- */

static uint32_t hash32(uint32_t k)
{
    k ^= k >> 16;
    k *= 0x7feb352d;
    k ^= k >> 15;
    k *= 0x846ca68b;
    return k ^ (k >> 16);
}

static void map_clear(struct map *m, uint32_t slots)
{
    m->mask = slots - 1;
    for (uint32_t i = 0; i < slots; i++)
        m->vals[i] = EMPTY;
}

static void map_put(struct map *m, uint32_t key, uint16_t val)
{
    uint32_t i = hash32(key) & m->mask;
    while (m->vals[i] != EMPTY)
        i = (i + 1) & m->mask;
    m->keys[i] = key;
    m->vals[i] = val;
}

static uint16_t map_get(const struct map *m, uint32_t key)
{
    for (uint32_t i = hash32(key) & m->mask;; i = (i + 1) & m->mask) {
        if (m->vals[i] == EMPTY || m->keys[i] == key)
            return m->vals[i];
    }
}

static uint32_t ip_key(const uint8_t *ip)
{
    uint32_t k;
    memcpy(&k, ip, 4);
    return k;
}

/* Called with the write lock held after any table change. */
static void rebuild_maps(struct nitro_tunnel *t)
{
    map_clear(&t->by_spi, SPI_SLOTS);
    for (uint32_t i = 0; i < t->n_in; i++)
        map_put(&t->by_spi, t->in[i]->spi, (uint16_t)i);
    map_clear(&t->by_ip, IP_SLOTS);
    for (uint32_t p = 0; p < NITRO_TUNNEL_MAX_PEERS; p++)
        if (t->peers[p].in_use)
            map_put(&t->by_ip, ip_key(t->peers[p].ip), (uint16_t)p);
    map_clear(&t->by_vni, VNI_SLOTS);
    for (uint32_t i = 0; i < t->n_vnis; i++)
        map_put(&t->by_vni, t->vnis[i], (uint16_t)i);
}

static void count_drop(struct nitro_tunnel *t, struct peer *p, int reason)
{
    __atomic_fetch_add(&t->c.drops[reason], 1, __ATOMIC_RELAXED);
    if (p != NULL)
        __atomic_fetch_add(&p->c.drops[reason], 1, __ATOMIC_RELAXED);
}

static void count_pass(struct counters *c, bool out, uint64_t pkts, uint64_t bytes)
{
    __atomic_fetch_add(out ? &c->packets_out : &c->packets_in, pkts, __ATOMIC_RELAXED);
    __atomic_fetch_add(out ? &c->bytes_out : &c->bytes_in, bytes, __ATOMIC_RELAXED);
}

/* RFC 791 header checksum over a 20-byte header whose checksum is 0. */
static uint16_t ip4_checksum(const uint8_t *h)
{
    uint32_t sum = 0;
    for (int i = 0; i < IP4_HLEN; i += 2)
        sum += ld16be(h + i);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* ---- keys --------------------------------------------------------------- */

static EVP_PKEY *x25519_private(const struct nitro_secret *key)
{
    if (key == NULL || nitro_secret_len(key) != NITRO_TUNNEL_X25519_LEN)
        return NULL;
    return EVP_PKEY_new_raw_private_key(
        EVP_PKEY_X25519, NULL,
        nitro_secret_data((struct nitro_secret *)key), NITRO_TUNNEL_X25519_LEN);
}

int nitro_tunnel_public_key(const struct nitro_secret *private_key, uint8_t *pub)
{
    EVP_PKEY *k = x25519_private(private_key);
    size_t len = NITRO_TUNNEL_X25519_LEN;
    int rc = k != NULL && pub != NULL &&
             EVP_PKEY_get_raw_public_key(k, pub, &len) && len == NITRO_TUNNEL_X25519_LEN
                 ? NITRO_OK : NITRO_ERR_ARG;
    EVP_PKEY_free(k);
    return rc;
}

static bool x25519(const struct nitro_secret *private_key, const uint8_t *peer_public,
                   uint8_t *shared)
{
    EVP_PKEY *k = x25519_private(private_key);
    EVP_PKEY *peer = peer_public == NULL ? NULL
        : EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, peer_public,
                                      NITRO_TUNNEL_X25519_LEN);
    EVP_PKEY_CTX *ctx = k == NULL ? NULL : EVP_PKEY_CTX_new(k, NULL);
    size_t len = NITRO_TUNNEL_X25519_LEN;
    /* OpenSSL fails the derivation when the result is all zeros. */
    bool ok = ctx != NULL && peer != NULL && EVP_PKEY_derive_init(ctx) > 0 &&
              EVP_PKEY_derive_set_peer(ctx, peer) > 0 &&
              EVP_PKEY_derive(ctx, shared, &len) > 0 && len == NITRO_TUNNEL_X25519_LEN;
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(peer);
    EVP_PKEY_free(k);
    return ok;
}

static bool hkdf_sha256(const uint8_t *ikm, size_t ikm_len, const uint8_t *salt,
                        size_t salt_len, const uint8_t *info, size_t info_len,
                        uint8_t *out, size_t out_len)
{
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    EVP_KDF_CTX *ctx = kdf == NULL ? NULL : EVP_KDF_CTX_new(kdf);
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, "SHA256", 0),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)ikm, ikm_len),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, salt_len),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info, info_len),
        OSSL_PARAM_construct_end(),
    };
    bool ok = ctx != NULL && EVP_KDF_derive(ctx, out, out_len, params) > 0;
    EVP_KDF_CTX_free(ctx);
    EVP_KDF_free(kdf);
    return ok;
}

int nitro_tunnel_derive(const struct nitro_secret *private_key,
                        const uint8_t *peer_public, const uint8_t *salt,
                        uint32_t salt_len, const uint8_t *info,
                        uint32_t info_len, struct nitro_secret *out)
{
    if (out == NULL || nitro_secret_capacity(out) < NITRO_TUNNEL_KEYMAT_LEN ||
        (salt == NULL && salt_len) || (info == NULL && info_len))
        return NITRO_ERR_ARG;
    uint8_t shared[NITRO_TUNNEL_X25519_LEN];
    bool ok = x25519(private_key, peer_public, shared) &&
              hkdf_sha256(shared, sizeof(shared), salt, salt_len, info, info_len,
                          nitro_secret_data(out), NITRO_TUNNEL_KEYMAT_LEN);
    explicit_bzero(shared, sizeof(shared));
    nitro_secret_set_len(out, ok ? NITRO_TUNNEL_KEYMAT_LEN : 0);
    return ok ? NITRO_OK : NITRO_ERR_ARG;
}

/* ---- security associations -------------------------------------------- */

static void sa_free(struct esp_sa *sa)
{
    if (sa == NULL)
        return;
    EVP_CIPHER_CTX_free(sa->ctx);  /* cleanses the key schedule */
    pthread_mutex_destroy(&sa->lock);
    OPENSSL_cleanse(sa, sizeof(*sa));
    free(sa);
}

static int sa_new(const struct nitro_tunnel *t, const struct nitro_secret *keymat,
                  uint32_t spi, uint32_t epoch, uint32_t peer, bool encrypt,
                  struct esp_sa **out)
{
    if (keymat == NULL || nitro_secret_len(keymat) != NITRO_TUNNEL_KEYMAT_LEN || spi == 0)
        return NITRO_ERR_ARG;
    struct esp_sa *sa = calloc(1, sizeof(*sa));
    if (sa == NULL)
        return NITRO_ERR_NOMEM;
    const uint8_t *km = nitro_secret_data((struct nitro_secret *)keymat);
    pthread_mutex_init(&sa->lock, NULL);
    sa->spi = spi;
    sa->epoch = epoch;
    sa->peer = (uint16_t)peer;
    sa->created_ns = nitro_now_ns();
    memcpy(sa->salt, km + KEY_LEN, SALT_LEN);
    sa->ctx = EVP_CIPHER_CTX_new();
    if (sa->ctx == NULL ||
        !EVP_CipherInit_ex2(sa->ctx, t->gcm, km, NULL, encrypt, NULL)) {
        sa_free(sa);
        return NITRO_ERR_NOMEM;
    }
    *out = sa;
    return NITRO_OK;
}

static void sa_info(const struct esp_sa *sa, struct nitro_tunnel_sa_info *out, bool outbound)
{
    out->spi = sa->spi;
    out->epoch = sa->epoch;
    out->seq = __atomic_load_n(&sa->seq, __ATOMIC_RELAXED);
    out->packets = __atomic_load_n(&sa->packets, __ATOMIC_RELAXED);
    out->age_ns = nitro_now_ns() - sa->created_ns;
    out->rekey = outbound && out->seq >= NITRO_TUNNEL_SEQ_SOFT_LIMIT;
}

/* ---- anti-replay (RFC 4303 3.4.3; checked before decrypting, updated
 * only once the ICV verified) ---------------------------------------------- */

static bool replay_check(const struct esp_sa *sa, uint32_t seq)
{
    if (seq == 0)
        return false;  /* never sent: the first packet is number 1 */
    if (seq > sa->seq)
        return true;
    if (sa->seq - seq >= NITRO_TUNNEL_REPLAY_WINDOW)
        return false;
    uint32_t bit = seq % REPLAY_BITS;
    return !(sa->window[bit / 64] >> (bit % 64) & 1);
}

static void replay_update(struct esp_sa *sa, uint32_t seq)
{
    if (seq > sa->seq) {
        uint64_t from = sa->seq / 64 + 1, to = (uint64_t)seq / 64;
        if (to - from + 1 >= REPLAY_WORDS)
            memset(sa->window, 0, sizeof(sa->window));
        else
            for (uint64_t w = from; w <= to; w++)
                sa->window[w % REPLAY_WORDS] = 0;
        __atomic_store_n(&sa->seq, seq, __ATOMIC_RELAXED);
    }
    uint32_t bit = seq % REPLAY_BITS;
    sa->window[bit / 64] |= 1ull << (bit % 64);
}

/* ---- the tunnel --------------------------------------------------------- */

struct nitro_tunnel *nitro_tunnel_new(const uint8_t *local_ip, uint32_t mtu,
                                      uint32_t encrypt)
{
    if (local_ip == NULL || mtu < 576 || mtu > 65535)
        return NULL;
    struct nitro_tunnel *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    t->gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    if (t->gcm == NULL) {
        free(t);
        return NULL;
    }
    pthread_rwlock_init(&t->lock, NULL);
    memcpy(t->local_ip, local_ip, 4);
    t->mtu = mtu;
    t->encrypt = encrypt != 0;
    rebuild_maps(t);
    return t;
}

void nitro_tunnel_free(struct nitro_tunnel *t)
{
    if (t == NULL)
        return;
    for (uint32_t p = 0; p < NITRO_TUNNEL_MAX_PEERS; p++)
        sa_free(t->peers[p].out);
    for (uint32_t i = 0; i < t->n_in; i++)
        sa_free(t->in[i]);
    EVP_CIPHER_free(t->gcm);
    pthread_rwlock_destroy(&t->lock);
    OPENSSL_cleanse(t, sizeof(*t));
    free(t);
}

static int vni_index(const struct nitro_tunnel *t, uint32_t vni)
{
    uint16_t i = map_get(&t->by_vni, vni);
    return i == EMPTY ? -1 : i;
}

int nitro_tunnel_add_vni(struct nitro_tunnel *t, uint32_t vni, uint32_t vpc)
{
    if (t == NULL || vni >= 1u << 24 || vpc >= EMPTY)
        return NITRO_ERR_ARG;
    pthread_rwlock_wrlock(&t->lock);
    int i = vni_index(t, vni), rc = NITRO_OK;
    if (i >= 0) {
        t->vpcs[i] = (uint16_t)vpc;
    } else if (t->n_vnis == NITRO_TUNNEL_MAX_VNIS) {
        rc = NITRO_ERR_LIMIT;
    } else {
        t->vnis[t->n_vnis] = vni;
        t->vpcs[t->n_vnis++] = (uint16_t)vpc;
        rebuild_maps(t);
    }
    pthread_rwlock_unlock(&t->lock);
    return rc;
}

int nitro_tunnel_remove_vni(struct nitro_tunnel *t, uint32_t vni)
{
    if (t == NULL)
        return NITRO_ERR_ARG;
    pthread_rwlock_wrlock(&t->lock);
    int i = vni_index(t, vni);
    if (i >= 0) {
        t->n_vnis--;
        t->vnis[i] = t->vnis[t->n_vnis];
        t->vpcs[i] = t->vpcs[t->n_vnis];
        rebuild_maps(t);
    }
    pthread_rwlock_unlock(&t->lock);
    return i >= 0 ? NITRO_OK : NITRO_ERR_ARG;
}

int nitro_tunnel_set_peer(struct nitro_tunnel *t, uint32_t peer, const uint8_t *ip)
{
    if (t == NULL || peer >= NITRO_TUNNEL_MAX_PEERS || ip == NULL)
        return NITRO_ERR_ARG;
    pthread_rwlock_wrlock(&t->lock);
    uint16_t other = map_get(&t->by_ip, ip_key(ip));
    int rc = other != EMPTY && other != peer ? NITRO_ERR_ARG : NITRO_OK;
    if (rc == NITRO_OK) {
        t->peers[peer].in_use = true;
        memcpy(t->peers[peer].ip, ip, 4);
        rebuild_maps(t);
    }
    pthread_rwlock_unlock(&t->lock);
    return rc;
}

/* Remove in[i] (write lock held); the maps are rebuilt by the caller. */
static void drop_inbound(struct nitro_tunnel *t, uint32_t i)
{
    sa_free(t->in[i]);
    t->in[i] = t->in[--t->n_in];
    t->in[t->n_in] = NULL;
}

int nitro_tunnel_remove_peer(struct nitro_tunnel *t, uint32_t peer)
{
    if (t == NULL || peer >= NITRO_TUNNEL_MAX_PEERS)
        return NITRO_ERR_ARG;
    pthread_rwlock_wrlock(&t->lock);
    struct peer *p = &t->peers[peer];
    int rc = p->in_use ? NITRO_OK : NITRO_ERR_ARG;
    if (rc == NITRO_OK) {
        sa_free(p->out);
        for (uint32_t i = t->n_in; i-- > 0;)
            if (t->in[i]->peer == peer)
                drop_inbound(t, i);
        memset(p, 0, sizeof(*p));
        rebuild_maps(t);
    }
    pthread_rwlock_unlock(&t->lock);
    return rc;
}

int nitro_tunnel_set_outbound(struct nitro_tunnel *t, uint32_t peer,
                              const struct nitro_secret *keymat, uint32_t spi,
                              uint32_t epoch)
{
    if (t == NULL || peer >= NITRO_TUNNEL_MAX_PEERS)
        return NITRO_ERR_ARG;
    struct esp_sa *sa = NULL;
    if (keymat != NULL) {
        int rc = sa_new(t, keymat, spi, epoch, peer, true, &sa);
        if (rc < 0)
            return rc;
    }
    pthread_rwlock_wrlock(&t->lock);
    struct peer *p = &t->peers[peer];
    int rc = p->in_use ? NITRO_OK : NITRO_ERR_ARG;
    struct esp_sa *old = sa;
    if (rc == NITRO_OK) {
        old = p->out;
        p->out = sa;
    }
    pthread_rwlock_unlock(&t->lock);
    sa_free(old);  /* no batch holds it: they run under the read lock */
    return rc;
}

int nitro_tunnel_add_inbound(struct nitro_tunnel *t, uint32_t peer,
                             const struct nitro_secret *keymat, uint32_t spi,
                             uint32_t epoch)
{
    if (t == NULL || peer >= NITRO_TUNNEL_MAX_PEERS)
        return NITRO_ERR_ARG;
    struct esp_sa *sa;
    int rc = sa_new(t, keymat, spi, epoch, peer, false, &sa);
    if (rc < 0)
        return rc;
    pthread_rwlock_wrlock(&t->lock);
    if (!t->peers[peer].in_use || map_get(&t->by_spi, spi) != EMPTY)
        rc = NITRO_ERR_ARG;
    else if (t->n_in == NITRO_TUNNEL_MAX_INBOUND)
        rc = NITRO_ERR_LIMIT;
    if (rc == NITRO_OK) {
        t->in[t->n_in++] = sa;
        rebuild_maps(t);
    }
    pthread_rwlock_unlock(&t->lock);
    if (rc != NITRO_OK)
        sa_free(sa);
    return rc;
}

int nitro_tunnel_remove_inbound(struct nitro_tunnel *t, uint32_t spi)
{
    if (t == NULL)
        return NITRO_ERR_ARG;
    pthread_rwlock_wrlock(&t->lock);
    uint16_t i = map_get(&t->by_spi, spi);
    if (i != EMPTY) {
        drop_inbound(t, i);
        rebuild_maps(t);
    }
    pthread_rwlock_unlock(&t->lock);
    return i != EMPTY ? NITRO_OK : NITRO_ERR_ARG;
}

/* ---- encapsulation ------------------------------------------------------ */

/* RFC 8926 3.3: the UDP source port SHOULD carry entropy from the inner
 * flow (so underlay ECMP spreads flows), in the dynamic range. FNV-1a over
 * the Ethernet addresses and, for IPv4, addresses, protocol and ports. */
static uint16_t flow_port(const uint8_t *f, uint32_t len)
{
    uint32_t h = 2166136261u;
    uint32_t n = 12;
    if (len >= ETH_HLEN + IP4_HLEN && ld16be(f + 12) == ETH_P_IP) {
        uint32_t ihl = (f[ETH_HLEN] & 0xfu) * 4;
        uint8_t proto = f[ETH_HLEN + 9];
        bool ports = (proto == IPPROTO_TCP_ || proto == IPPROTO_UDP_) &&
                     len >= ETH_HLEN + ihl + 4 &&
                     !(ld16be(f + ETH_HLEN + 6) & (IP4_MF | IP4_OFFSET));
        for (uint32_t i = ETH_HLEN + 12; i < ETH_HLEN + 20; i++)
            h = (h ^ f[i]) * 16777619u;
        h = (h ^ proto) * 16777619u;
        for (uint32_t i = 0; ports && i < 4; i++)
            h = (h ^ f[ETH_HLEN + ihl + i]) * 16777619u;
    }
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ f[i]) * 16777619u;
    return (uint16_t)(49152 + ((h ^ h >> 16) & 0x3fff));
}

static void put_ip4(const struct nitro_tunnel *t, const struct peer *p, uint8_t *h,
                    uint32_t total, uint8_t proto)
{
    h[0] = 0x45;
    h[1] = 0;
    st16be(h + 2, (uint16_t)total);
    st16be(h + 4, 0);            /* DF set: the ID is unused (RFC 6864 4.1) */
    st16be(h + 6, IP4_DF);       /* never fragmented (RFC 8926 4.1.1) */
    h[8] = OUTER_TTL;
    h[9] = proto;
    st16be(h + 10, 0);
    memcpy(h + 12, t->local_ip, 4);
    memcpy(h + 16, p->ip, 4);
    st16be(h + 10, ip4_checksum(h));
}

/* UDP (checksum 0: allowed over IPv4, RFC 8926 3.3; under ESP the ICV
 * covers it anyway) and the 8-byte Geneve header without options. */
static void put_udp_geneve(uint8_t *h, const uint8_t *frame, uint32_t len, uint32_t vni)
{
    st16be(h, flow_port(frame, len));
    st16be(h + 2, NITRO_TUNNEL_GENEVE_PORT);
    st16be(h + 4, (uint16_t)(UDP_HLEN + GENEVE_HLEN + len));
    st16be(h + 6, 0);
    h[8] = 0;                    /* version 0, no options */
    h[9] = 0;                    /* not OAM, no critical options */
    st16be(h + 10, NITRO_TUNNEL_PROTO_TEB);
    st32be(h + 12, vni << 8);    /* VNI, reserved 0 */
}

static bool gcm_update(EVP_CIPHER_CTX *ctx, uint8_t *out, const uint8_t *in, int len)
{
    int outl;
    return EVP_CipherUpdate(ctx, out, &outl, in, len) && outl == len;
}

/* Sequence number and IV, then [UDP Geneve frame padding trailer] under
 * GCM, then the ICV. Returns the outer length, 0 when OpenSSL failed. */
static uint32_t esp_seal(struct esp_sa *sa, uint8_t *o, const uint8_t *frame,
                         uint32_t len, uint32_t vni)
{
    uint32_t seq = (uint32_t)++sa->seq;
    uint8_t *esp = o + IP4_HLEN, *iv = esp + ESP_HLEN, *ct = iv + ESP_IV_LEN;
    uint32_t body = UDP_HLEN + GENEVE_HLEN + len;
    uint32_t pad = (4 - (body + ESP_TRAILER) % 4) % 4;
    st32be(esp, sa->spi);
    st32be(esp + 4, seq);
    st32be(iv, 0);               /* IV = be64(sequence number) */
    st32be(iv + 4, seq);
    uint8_t nonce[SALT_LEN + ESP_IV_LEN];
    memcpy(nonce, sa->salt, SALT_LEN);
    memcpy(nonce + SALT_LEN, iv, ESP_IV_LEN);
    put_udp_geneve(ct, frame, len, vni);
    uint8_t *tr = ct + body;
    for (uint32_t i = 0; i < pad; i++)
        tr[i] = (uint8_t)(i + 1);  /* RFC 4303 2.4 default padding */
    tr[pad] = (uint8_t)pad;
    tr[pad + 1] = IPPROTO_UDP_;
    uint32_t trailer = pad + ESP_TRAILER;
    int outl;
    bool ok = EVP_CipherInit_ex2(sa->ctx, NULL, NULL, nonce, 1, NULL) &&
              EVP_CipherUpdate(sa->ctx, NULL, &outl, esp, ESP_HLEN) &&
              gcm_update(sa->ctx, ct, ct, UDP_HLEN + GENEVE_HLEN) &&
              gcm_update(sa->ctx, ct + UDP_HLEN + GENEVE_HLEN, frame, (int)len) &&
              gcm_update(sa->ctx, tr, tr, (int)trailer) &&
              EVP_CipherFinal_ex(sa->ctx, tr + trailer, &outl) &&
              EVP_CIPHER_CTX_ctrl(sa->ctx, EVP_CTRL_AEAD_GET_TAG, NITRO_TUNNEL_ICV_LEN,
                                  tr + trailer) > 0;
    return ok ? IP4_HLEN + ESP_HLEN + ESP_IV_LEN + body + trailer + NITRO_TUNNEL_ICV_LEN : 0;
}

static uint32_t outer_len(const struct nitro_tunnel *t, uint32_t len)
{
    uint32_t body = UDP_HLEN + GENEVE_HLEN + len;
    if (!t->encrypt)
        return IP4_HLEN + body;
    uint32_t pad = (4 - (body + ESP_TRAILER) % 4) % 4;
    return IP4_HLEN + ESP_HLEN + ESP_IV_LEN + body + pad + ESP_TRAILER + NITRO_TUNNEL_ICV_LEN;
}

/* One frame into slot o; its outer length, or -(drop reason) - 1. */
static int64_t encap_one(struct nitro_tunnel *t, struct peer *p, struct esp_sa *sa,
                         uint32_t vni, const uint8_t *frame, uint32_t len, uint8_t *o)
{
    if (frame == NULL || len < ETH_HLEN)
        return -NITRO_TUNNEL_DROP_MALFORMED - 1;
    uint32_t total = outer_len(t, len);
    if (total > t->mtu)
        return -NITRO_TUNNEL_DROP_MTU - 1;
    if (!t->encrypt) {
        put_ip4(t, p, o, total, IPPROTO_UDP_);
        put_udp_geneve(o + IP4_HLEN, frame, len, vni);
        memcpy(o + IP4_HLEN + UDP_HLEN + GENEVE_HLEN, frame, len);
        return total;
    }
    if (sa == NULL || sa->seq >= SEQ_MAX)
        return -NITRO_TUNNEL_DROP_NO_SA - 1;
    put_ip4(t, p, o, total, IPPROTO_ESP_);
    if (esp_seal(sa, o, frame, len, vni) != total)
        return -NITRO_TUNNEL_DROP_NO_SA - 1;  /* OpenSSL refused: not seen so far */
    return total;
}

int nitro_tunnel_encap(struct nitro_tunnel *t, uint32_t peer, uint32_t vni,
                       const uint8_t *const *frames, const uint32_t *lens,
                       uint32_t n, uint8_t *out, uint32_t stride,
                       struct nitro_tunnel_pkt *pkts)
{
    if (t == NULL || (n && (frames == NULL || lens == NULL || out == NULL || pkts == NULL)) ||
        stride < t->mtu || vni >= 1u << 24)
        return NITRO_ERR_ARG;
    pthread_rwlock_rdlock(&t->lock);
    struct peer *p = peer < NITRO_TUNNEL_MAX_PEERS && t->peers[peer].in_use
                         ? &t->peers[peer] : NULL;
    struct esp_sa *sa = p != NULL && t->encrypt ? p->out : NULL;
    if (sa != NULL)
        pthread_mutex_lock(&sa->lock);
    uint32_t passed = 0;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        int64_t r = p == NULL ? -NITRO_TUNNEL_DROP_UNKNOWN_PEER - 1
                              : encap_one(t, p, sa, vni, frames[i], lens[i],
                                          out + (size_t)i * stride);
        pkts[i] = (struct nitro_tunnel_pkt){.peer = (uint16_t)peer, .vni = vni, .drop = -1};
        if (r < 0) {
            pkts[i].drop = (int32_t)(-r - 1);
            count_drop(t, p, pkts[i].drop);
            continue;
        }
        pkts[i].len = (uint32_t)r;
        passed++;
        bytes += lens[i];
    }
    if (sa != NULL) {
        __atomic_fetch_add(&sa->packets, passed, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&sa->lock);
    }
    if (p != NULL)
        count_pass(&p->c, true, passed, bytes);
    count_pass(&t->c, true, passed, bytes);
    pthread_rwlock_unlock(&t->lock);
    return (int)passed;
}

/* ---- decapsulation ------------------------------------------------------ */

struct rx {
    struct nitro_tunnel *t;
    struct esp_sa *locked;       /* the SA whose lock we hold, kept across packets */
    struct peer *peer;           /* who to blame for a drop, once known */
};

static void rx_lock(struct rx *rx, struct esp_sa *sa)
{
    if (rx->locked == sa)
        return;
    if (rx->locked != NULL)
        pthread_mutex_unlock(&rx->locked->lock);
    pthread_mutex_lock(&sa->lock);
    rx->locked = sa;
}

/* The UDP datagram at u (n bytes): Geneve carrying an Ethernet frame of a
 * served VNI. Fills pkt (offset relative to u); a drop reason or -1. */
static int geneve_in(struct rx *rx, const uint8_t *u, uint32_t n, struct nitro_tunnel_pkt *pkt)
{
    if (n < UDP_HLEN + GENEVE_HLEN || ld16be(u + 2) != NITRO_TUNNEL_GENEVE_PORT ||
        ld16be(u + 4) != n)
        return NITRO_TUNNEL_DROP_MALFORMED;
    const uint8_t *g = u + UDP_HLEN;
    uint32_t opts = (g[0] & 0x3fu) * 4;
    /* Version 0 only (RFC 8926 3.4); OAM frames are control messages, not
     * data; critical options are ones we do not understand, so MUST drop
     * (3.5.1). Non-critical options are skipped. */
    if (g[0] >> 6 != 0 || g[1] & (GENEVE_O | GENEVE_C) ||
        ld16be(g + 2) != NITRO_TUNNEL_PROTO_TEB ||
        n < UDP_HLEN + GENEVE_HLEN + opts + ETH_HLEN)
        return NITRO_TUNNEL_DROP_MALFORMED;
    uint32_t vni = ld32be(g + 4) >> 8;
    int v = vni_index(rx->t, vni);
    if (v < 0)
        return NITRO_TUNNEL_DROP_WRONG_VNI;
    pkt->vni = vni;
    pkt->vpc = rx->t->vpcs[v];
    pkt->offset = UDP_HLEN + GENEVE_HLEN + opts;
    pkt->len = n - pkt->offset;
    return -1;
}

/* ESP at e (n bytes, decrypted in place). */
static int esp_in(struct rx *rx, uint8_t *e, uint32_t n, struct nitro_tunnel_pkt *pkt)
{
    const uint32_t min = ESP_HLEN + ESP_IV_LEN + UDP_HLEN + GENEVE_HLEN + ESP_TRAILER +
                         NITRO_TUNNEL_ICV_LEN;
    if (n < min)
        return NITRO_TUNNEL_DROP_MALFORMED;
    uint16_t i = map_get(&rx->t->by_spi, ld32be(e));
    if (i == EMPTY)
        return NITRO_TUNNEL_DROP_UNKNOWN_SPI;
    struct esp_sa *sa = rx->t->in[i];
    rx->peer = &rx->t->peers[sa->peer];
    pkt->peer = sa->peer;
    rx_lock(rx, sa);
    uint32_t seq = ld32be(e + 4);
    if (!replay_check(sa, seq))
        return NITRO_TUNNEL_DROP_REPLAY;
    uint8_t nonce[SALT_LEN + ESP_IV_LEN];
    memcpy(nonce, sa->salt, SALT_LEN);
    memcpy(nonce + SALT_LEN, e + ESP_HLEN, ESP_IV_LEN);
    uint8_t *ct = e + ESP_HLEN + ESP_IV_LEN;
    uint32_t ct_len = n - ESP_HLEN - ESP_IV_LEN - NITRO_TUNNEL_ICV_LEN;
    int outl;
    bool ok = EVP_CipherInit_ex2(sa->ctx, NULL, NULL, nonce, 0, NULL) &&
              EVP_CipherUpdate(sa->ctx, NULL, &outl, e, ESP_HLEN) &&
              gcm_update(sa->ctx, ct, ct, (int)ct_len) &&
              EVP_CIPHER_CTX_ctrl(sa->ctx, EVP_CTRL_AEAD_SET_TAG, NITRO_TUNNEL_ICV_LEN,
                                  ct + ct_len) > 0 &&
              EVP_CipherFinal_ex(sa->ctx, ct + ct_len, &outl) > 0;
    if (!ok)
        return NITRO_TUNNEL_DROP_AUTH;
    replay_update(sa, seq);
    __atomic_fetch_add(&sa->packets, 1, __ATOMIC_RELAXED);
    /* Authentic from here on; the rest is the sender's framing. */
    uint32_t pad = ct[ct_len - 2];
    if (ct[ct_len - 1] != IPPROTO_UDP_ || pad + ESP_TRAILER > ct_len)
        return NITRO_TUNNEL_DROP_MALFORMED;
    uint32_t udp_len = ct_len - ESP_TRAILER - pad;
    for (uint32_t k = 0; k < pad; k++)
        if (ct[udp_len + k] != k + 1)  /* RFC 4303 2.4: receivers SHOULD check */
            return NITRO_TUNNEL_DROP_MALFORMED;
    int drop = geneve_in(rx, ct, udp_len, pkt);
    pkt->offset += ESP_HLEN + ESP_IV_LEN;
    return drop;
}

/* Plain mode: the sender is known only by its outer source address. */
static int plain_in(struct rx *rx, const uint8_t *ip, uint8_t *u, uint32_t n,
                    struct nitro_tunnel_pkt *pkt)
{
    uint16_t p = map_get(&rx->t->by_ip, ip_key(ip + 12));
    if (p == EMPTY)
        return NITRO_TUNNEL_DROP_UNKNOWN_PEER;
    rx->peer = &rx->t->peers[p];
    pkt->peer = p;
    return geneve_in(rx, u, n, pkt);
}

static int decap_one(struct rx *rx, uint8_t *b, uint32_t len, struct nitro_tunnel_pkt *pkt)
{
    /* The kernel checked the outer header's checksum before a raw socket
     * saw it; its fields are not authenticated in transport mode, so only
     * its shape matters here. */
    if (len < IP4_HLEN || b[0] >> 4 != 4)
        return NITRO_TUNNEL_DROP_MALFORMED;
    uint32_t ihl = (b[0] & 0xfu) * 4u, total = ld16be(b + 2);
    if (ihl < IP4_HLEN || total < ihl || total > len || ld16be(b + 6) & (IP4_MF | IP4_OFFSET))
        return NITRO_TUNNEL_DROP_MALFORMED;
    uint8_t proto = b[9];
    if (proto != IPPROTO_ESP_ && proto != IPPROTO_UDP_)
        return NITRO_TUNNEL_DROP_MALFORMED;
    if ((proto == IPPROTO_ESP_) != rx->t->encrypt)
        return NITRO_TUNNEL_DROP_POLICY;
    int drop = proto == IPPROTO_ESP_ ? esp_in(rx, b + ihl, total - ihl, pkt)
                                     : plain_in(rx, b, b + ihl, total - ihl, pkt);
    pkt->offset += ihl;
    return drop;
}

int nitro_tunnel_decap(struct nitro_tunnel *t, uint8_t *bufs, const uint32_t *lens,
                       uint32_t stride, uint32_t n, struct nitro_tunnel_pkt *pkts)
{
    if (t == NULL || (n && (bufs == NULL || lens == NULL || pkts == NULL)))
        return NITRO_ERR_ARG;
    for (uint32_t i = 0; i < n; i++)
        if (lens[i] > stride)
            return NITRO_ERR_ARG;
    pthread_rwlock_rdlock(&t->lock);
    struct rx rx = {.t = t};
    uint32_t passed = 0;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct nitro_tunnel_pkt *pkt = &pkts[i];
        *pkt = (struct nitro_tunnel_pkt){.drop = -1};
        rx.peer = NULL;
        int drop = decap_one(&rx, bufs + (size_t)i * stride, lens[i], pkt);
        if (drop >= 0) {
            *pkt = (struct nitro_tunnel_pkt){.peer = pkt->peer, .drop = drop};
            count_drop(t, rx.peer, drop);
            continue;
        }
        passed++;
        bytes += pkt->len;
        count_pass(&rx.peer->c, false, 1, pkt->len);
    }
    if (rx.locked != NULL)
        pthread_mutex_unlock(&rx.locked->lock);
    count_pass(&t->c, false, passed, bytes);
    pthread_rwlock_unlock(&t->lock);
    return (int)passed;
}

/* ---- counters ----------------------------------------------------------- */

uint32_t nitro_tunnel_mtu(const struct nitro_tunnel *t)
{
    return t->mtu;  /* fixed at nitro_tunnel_new */
}

static void load_counters(const struct counters *c, struct nitro_tunnel_stats *out)
{
    out->packets_out = __atomic_load_n(&c->packets_out, __ATOMIC_RELAXED);
    out->bytes_out = __atomic_load_n(&c->bytes_out, __ATOMIC_RELAXED);
    out->packets_in = __atomic_load_n(&c->packets_in, __ATOMIC_RELAXED);
    out->bytes_in = __atomic_load_n(&c->bytes_in, __ATOMIC_RELAXED);
    for (int i = 0; i < NITRO_TUNNEL_DROP_KINDS; i++)
        out->drops[i] = __atomic_load_n(&c->drops[i], __ATOMIC_RELAXED);
}

int nitro_tunnel_stats(const struct nitro_tunnel *t, struct nitro_tunnel_stats *out)
{
    if (t == NULL || out == NULL)
        return NITRO_ERR_ARG;
    load_counters(&t->c, out);
    return NITRO_OK;
}

int nitro_tunnel_peer_stats(const struct nitro_tunnel *t, uint32_t peer,
                            struct nitro_tunnel_stats *out)
{
    if (t == NULL || out == NULL || peer >= NITRO_TUNNEL_MAX_PEERS)
        return NITRO_ERR_ARG;
    load_counters(&t->peers[peer].c, out);
    return NITRO_OK;
}

int nitro_tunnel_outbound_info(struct nitro_tunnel *t, uint32_t peer,
                               struct nitro_tunnel_sa_info *out)
{
    if (t == NULL || out == NULL || peer >= NITRO_TUNNEL_MAX_PEERS)
        return NITRO_ERR_ARG;
    pthread_rwlock_rdlock(&t->lock);
    const struct esp_sa *sa = t->peers[peer].out;
    if (sa != NULL)
        sa_info(sa, out, true);
    pthread_rwlock_unlock(&t->lock);
    return sa != NULL ? NITRO_OK : NITRO_ERR_ARG;
}

int nitro_tunnel_inbound_info(struct nitro_tunnel *t, uint32_t spi,
                              struct nitro_tunnel_sa_info *out)
{
    if (t == NULL || out == NULL)
        return NITRO_ERR_ARG;
    pthread_rwlock_rdlock(&t->lock);
    uint16_t i = map_get(&t->by_spi, spi);
    if (i != EMPTY)
        sa_info(t->in[i], out, false);
    pthread_rwlock_unlock(&t->lock);
    return i != EMPTY ? NITRO_OK : NITRO_ERR_ARG;
}

int nitro_tunnel_test_set_seq(struct nitro_tunnel *t, uint32_t peer, uint32_t seq)
{
    if (t == NULL || peer >= NITRO_TUNNEL_MAX_PEERS)
        return NITRO_ERR_ARG;
    pthread_rwlock_wrlock(&t->lock);
    struct esp_sa *sa = t->peers[peer].out;
    if (sa != NULL)
        sa->seq = seq;
    pthread_rwlock_unlock(&t->lock);
    return sa != NULL ? NITRO_OK : NITRO_ERR_ARG;
}
