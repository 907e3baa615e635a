/*
 * nitro_xts.c: secrets in locked memory and the AES-XTS sector cipher that
 * nitro_blk.c runs on encrypted volumes (IV rules in nitro_crypto.h).
 *
 * Where the CPU has AES-NI, sectors go through nitro_xts_aesni.c (XTS on
 * the AES instructions, several sectors per call: OpenSSL 3.0 has no
 * multi-unit XTS and pays a fixed cost per 512-byte sector); elsewhere
 * through OpenSSL's XTS, one sector per call. nitro's own XTS is proved
 * against OpenSSL's at key load (choose_impl) and otherwise not used.
 *
 * An OpenSSL cipher context is stateful (it carries the IV), so each
 * serving thread takes a "lane": its own encrypt and decrypt contexts,
 * copied from the templates made at key load (no key expansion per
 * request), and its own bounce buffer. Both directions go through the
 * bounce buffer, which only ever holds ciphertext: writes are encrypted
 * from guest memory into it, reads land in it and are decrypted out of
 * place into guest memory. Never decrypt in guest memory: the guest could
 * swap in chosen ciphertext between the read and the decryption and so use
 * nitro as a decryption oracle.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "nitro.h"
#include "nitro_iov.h"
#include "nitro_xts_internal.h"

#define IV_UNIT_SHIFT 9  /* plain64 counts 512-byte units */
#define MAX_SECTOR 4096

/* ---- secrets ------------------------------------------------------------ */

struct nitro_secret {
    uint32_t capacity;
    uint32_t len;
    uint32_t locked;
    size_t map_len;
    uint8_t data[];
};

int nitro_secret_new(uint32_t capacity, struct nitro_secret **out)
{
    if (out == NULL || capacity == 0 || capacity > NITRO_SECRET_MAX)
        return NITRO_ERR_ARG;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t want = sizeof(struct nitro_secret) + capacity;
    size_t map_len = (want + page - 1) / page * page;
    void *m = mmap(NULL, map_len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return NITRO_ERR_SYS;
    /* Keep secrets out of swap and core dumps; mlock may be refused by
     * RLIMIT_MEMLOCK for an unprivileged daemon, which we report, not fail. */
    bool locked = mlock(m, map_len) == 0;
    (void)madvise(m, map_len, MADV_DONTDUMP);
    (void)madvise(m, map_len, MADV_DONTFORK);
    struct nitro_secret *s = m;
    s->capacity = capacity;
    s->map_len = map_len;
    s->locked = locked;
    *out = s;
    return NITRO_OK;
}

void nitro_secret_free(struct nitro_secret *s)
{
    if (s == NULL)
        return;
    size_t map_len = s->map_len;
    explicit_bzero(s, map_len);
    munlock(s, map_len);
    munmap(s, map_len);
}

static void strip_newline(struct nitro_secret *s)
{
    if (s->len > 0 && s->data[s->len - 1] == '\n')
        s->data[--s->len] = 0;
    if (s->len > 0 && s->data[s->len - 1] == '\r')
        s->data[--s->len] = 0;
}

int nitro_secret_read_fd(struct nitro_secret *s, int fd, uint32_t strip)
{
    if (s == NULL || fd < 0)
        return NITRO_ERR_ARG;
    explicit_bzero(s->data, s->capacity);
    s->len = 0;
    for (;;) {
        /* Read one byte past the capacity to tell "full" from "too big". */
        uint8_t extra;
        bool full = s->len == s->capacity;
        ssize_t n = full ? read(fd, &extra, 1)
                         : read(fd, s->data + s->len, s->capacity - s->len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return NITRO_ERR_SYS;
        if (n == 0)
            break;
        if (full) {
            explicit_bzero(&extra, 1);
            explicit_bzero(s->data, s->capacity);
            s->len = 0;
            return NITRO_ERR_ARG;
        }
        s->len += (uint32_t)n;
    }
    if (strip)
        strip_newline(s);
    return s->len == 0 ? NITRO_ERR_ARG : (int)s->len;
}

uint8_t *nitro_secret_data(struct nitro_secret *s) { return s->data; }
uint32_t nitro_secret_len(const struct nitro_secret *s) { return s->len; }
uint32_t nitro_secret_capacity(const struct nitro_secret *s) { return s->capacity; }
uint32_t nitro_secret_locked(const struct nitro_secret *s) { return s->locked; }

int nitro_secret_set_len(struct nitro_secret *s, uint32_t len)
{
    if (s == NULL || len > s->capacity)
        return NITRO_ERR_ARG;
    s->len = len;
    return NITRO_OK;
}

/* ---- the cipher --------------------------------------------------------- */

/*
 * Setting the IV per sector is most of the cost of small sectors: through
 * EVP_CipherInit_ex2 every call asks the provider for the IV length by
 * name (OSSL_PARAM lookups, strcmp): about 50 ns on the build machines,
 * more than half of what encrypting a 512-byte sector costs. OpenSSL's XTS reads the IV from its context on
 * every EVP_CipherUpdate and never changes it, and OSSL_CIPHER_PARAM_
 * UPDATED_IV hands out a pointer to those 16 bytes: writing the sector's IV
 * there costs nothing. That is OpenSSL's behaviour, not its promise, so
 * nitro_xts_new proves it on the key's own contexts (direct_iv_works) and
 * otherwise keeps the EVP_CipherInit_ex2 path.
 */
struct xts_ctx {
    EVP_CIPHER_CTX *ctx;
    uint8_t *iv;           /* OpenSSL's IV bytes in ctx (NULL: not found) */
};

struct nitro_xts_lane {
    int busy;              /* atomic: owned by one thread while nonzero */
    struct xts_ctx enc;
    struct xts_ctx dec;
    uint8_t *bounce;       /* NITRO_XTS_BOUNCE bytes, ciphertext only */
};

struct nitro_xts {
    uint32_t sector_size;
    uint32_t impl;         /* NITRO_XTS_*: the path in use */
    uint32_t impl_ok;      /* bit per NITRO_XTS_* that proved to work */
    uint64_t iv_offset;
    EVP_CIPHER_CTX *tmpl_enc;  /* keyed templates the lanes copy */
    EVP_CIPHER_CTX *tmpl_dec;
    struct nitro_xts_aesni aesni;  /* schedules, for AESNI and VAES */
    struct nitro_xts_lane lanes[NITRO_XTS_LANES];
};

static const uint8_t zero_iv[16];

static int keyed_ctx(const EVP_CIPHER *cipher, const uint8_t *key, int enc,
                     EVP_CIPHER_CTX **out)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NITRO_ERR_NOMEM;
    /* OpenSSL refuses an XTS key whose two halves are equal. An IV now, so
     * that a copy can encrypt as soon as its IV bytes are written. */
    if (!EVP_CipherInit_ex2(ctx, cipher, key, zero_iv, enc, NULL)) {
        EVP_CIPHER_CTX_free(ctx);
        return NITRO_ERR_ARG;
    }
    EVP_CIPHER_CTX_set_padding(ctx, 0);
    *out = ctx;
    return NITRO_OK;
}

/* The 16 IV bytes inside ctx's provider context, or NULL. */
static uint8_t *iv_bytes(EVP_CIPHER_CTX *ctx)
{
    void *iv = NULL;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_octet_ptr(OSSL_CIPHER_PARAM_UPDATED_IV, &iv, 16),
        OSSL_PARAM_construct_end(),
    };
    if (!EVP_CIPHER_CTX_get_params(ctx, params) ||
        params[0].return_size != 16)
        return NULL;
    return iv;
}

static int ctx_copy(const EVP_CIPHER_CTX *tmpl, struct xts_ctx *out)
{
    out->ctx = EVP_CIPHER_CTX_new();
    if (out->ctx == NULL || !EVP_CIPHER_CTX_copy(out->ctx, tmpl)) {
        EVP_CIPHER_CTX_free(out->ctx);
        out->ctx = NULL;
        return NITRO_ERR_NOMEM;
    }
    out->iv = iv_bytes(out->ctx);
    return NITRO_OK;
}

static bool update(EVP_CIPHER_CTX *ctx, uint8_t *out, const uint8_t *in,
                   int len)
{
    int outl = 0;
    return EVP_CipherUpdate(ctx, out, &outl, in, len) && outl == len;
}

/* Does writing the IV bytes in place set the IV, exactly as
 * EVP_CipherInit_ex2 does? Two different IVs, each compared with a context
 * that went the documented way: a write that OpenSSL ignored, or copied
 * away, gives a different block. */
static bool direct_iv_works(const EVP_CIPHER_CTX *tmpl)
{
    struct xts_ctx a = {0}, b = {0};
    bool ok = ctx_copy(tmpl, &a) == NITRO_OK && ctx_copy(tmpl, &b) == NITRO_OK &&
              a.iv != NULL;
    for (uint8_t i = 1; ok && i <= 2; i++) {
        uint8_t iv[16] = {i, 0x5a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, i};
        uint8_t in[32] = {0}, x[32], y[32];
        memcpy(a.iv, iv, sizeof(iv));
        ok = update(a.ctx, x, in, sizeof(in)) &&
             EVP_CipherInit_ex2(b.ctx, NULL, NULL, iv, -1, NULL) &&
             update(b.ctx, y, in, sizeof(in)) && memcmp(x, y, sizeof(x)) == 0;
    }
    EVP_CIPHER_CTX_free(a.ctx);
    EVP_CIPHER_CTX_free(b.ctx);
    return ok;
}

/* Does nitro's AES-NI XTS give OpenSSL's ciphertext, both ways, for a run
 * of sectors (tweaks batched and not) at a far sector number? Guards
 * against a miscompiled or misdetected build, never a slow path. */
static bool aesni_works(struct nitro_xts *x, uint32_t width)
{
    enum { N = 9, SECTOR = 512 };
    uint8_t in[N * SECTOR], ours[N * SECTOR], theirs[N * SECTOR],
        back[N * SECTOR];
    struct xts_ctx c = {0};
    for (size_t i = 0; i < sizeof(in); i++)
        in[i] = (uint8_t)(i * 131 + (i >> 8));
    uint64_t first = 0x00fedcba98765432ull;
    bool ok = ctx_copy(x->tmpl_enc, &c) == NITRO_OK;
    for (int s = 0; ok && s < N; s++) {
        uint8_t iv[16] = {0};
        uint64_t n = htole64(first + (uint64_t)s);
        memcpy(iv, &n, sizeof(n));
        ok = EVP_CipherInit_ex2(c.ctx, NULL, NULL, iv, -1, NULL) &&
             update(c.ctx, theirs + s * SECTOR, in + s * SECTOR, SECTOR);
    }
    EVP_CIPHER_CTX_free(c.ctx);
    if (!ok)
        return false;
    ok = nitro_xts_aesni_crypt(&x->aesni, ours, in, N, SECTOR, first, 1, true,
                               width) == 0 &&
         nitro_xts_aesni_crypt(&x->aesni, back, ours, N, SECTOR, first, 1,
                               false, width) == 0 &&
         memcmp(ours, theirs, sizeof(ours)) == 0 &&
         memcmp(back, in, sizeof(in)) == 0;
    OPENSSL_cleanse(ours, sizeof(ours));
    OPENSSL_cleanse(theirs, sizeof(theirs));
    return ok;
}

/* Which paths work here; the fastest becomes x->impl. */
static void choose_impl(struct nitro_xts *x, const uint8_t *key, uint32_t len)
{
    x->impl_ok = 1u << NITRO_XTS_EVP_INIT;
    if (direct_iv_works(x->tmpl_enc) && direct_iv_works(x->tmpl_dec))
        x->impl_ok |= 1u << NITRO_XTS_EVP_IV;
    if (nitro_xts_aesni_usable()) {
        nitro_xts_aesni_init(&x->aesni, key, len);
        if (aesni_works(x, 1))
            x->impl_ok |= 1u << NITRO_XTS_AESNI;
        if (nitro_xts_vaes_usable() && aesni_works(x, 2))
            x->impl_ok |= 1u << NITRO_XTS_VAES;
        if (nitro_xts_vaes512_usable() && aesni_works(x, 4))
            x->impl_ok |= 1u << NITRO_XTS_VAES512;
        if (!(x->impl_ok & (1u << NITRO_XTS_AESNI | 1u << NITRO_XTS_VAES |
                            1u << NITRO_XTS_VAES512)))
            OPENSSL_cleanse(&x->aesni, sizeof(x->aesni));
    }
    /* The highest-numbered path that works: the NITRO_XTS_* are in order
     * of speed. */
    x->impl = 31u - (uint32_t)__builtin_clz(x->impl_ok);
}

int nitro_xts_new(const struct nitro_secret *key, uint32_t sector_size,
                  uint64_t iv_offset, struct nitro_xts **out)
{
    if (key == NULL || out == NULL || (key->len != 32 && key->len != 64) ||
        (sector_size != 512 && sector_size != 4096))
        return NITRO_ERR_ARG;
    /* NULL when this OpenSSL has no such cipher: the key cannot be used. */
    EVP_CIPHER *cipher = EVP_CIPHER_fetch(
        NULL, key->len == 64 ? "AES-256-XTS" : "AES-128-XTS", NULL);
    if (cipher == NULL)
        return NITRO_ERR_ARG;
    struct nitro_xts *x = calloc(1, sizeof(*x));
    int rc = x == NULL ? NITRO_ERR_NOMEM : NITRO_OK;
    if (rc == NITRO_OK) {
        x->sector_size = sector_size;
        x->iv_offset = iv_offset;
        rc = keyed_ctx(cipher, key->data, 1, &x->tmpl_enc);
    }
    if (rc == NITRO_OK)
        rc = keyed_ctx(cipher, key->data, 0, &x->tmpl_dec);
    EVP_CIPHER_free(cipher);
    if (rc == NITRO_OK)
        choose_impl(x, key->data, key->len);
    if (rc != NITRO_OK) {
        nitro_xts_free(x);
        return rc;
    }
    *out = x;
    return NITRO_OK;
}

void nitro_xts_free(struct nitro_xts *x)
{
    if (x == NULL)
        return;
    for (int i = 0; i < NITRO_XTS_LANES; i++) {
        EVP_CIPHER_CTX_free(x->lanes[i].enc.ctx);  /* cleanses the key schedule */
        EVP_CIPHER_CTX_free(x->lanes[i].dec.ctx);
        free(x->lanes[i].bounce);
    }
    EVP_CIPHER_CTX_free(x->tmpl_enc);
    EVP_CIPHER_CTX_free(x->tmpl_dec);
    OPENSSL_cleanse(x, sizeof(*x));
    free(x);
}

uint32_t nitro_xts_sector_size(const struct nitro_xts *x) { return x->sector_size; }

uint32_t nitro_xts_impl(const struct nitro_xts *x) { return x->impl; }

int nitro_xts_set_impl(struct nitro_xts *x, uint32_t impl)
{
    if (x == NULL || impl > NITRO_XTS_VAES512 || !(x->impl_ok & (1u << impl)))
        return NITRO_ERR_ARG;
    x->impl = impl;
    return NITRO_OK;
}

static bool lane_ready(struct nitro_xts *x, struct nitro_xts_lane *l)
{
    if (l->enc.ctx != NULL)
        return true;
    l->bounce = malloc(NITRO_XTS_BOUNCE);
    if (l->bounce != NULL && ctx_copy(x->tmpl_enc, &l->enc) == NITRO_OK &&
        ctx_copy(x->tmpl_dec, &l->dec) == NITRO_OK)
        return true;
    EVP_CIPHER_CTX_free(l->enc.ctx);
    EVP_CIPHER_CTX_free(l->dec.ctx);
    free(l->bounce);
    *l = (struct nitro_xts_lane){.busy = l->busy};
    return false;
}

struct nitro_xts_lane *nitro_xts_lane_get(struct nitro_xts *x)
{
    for (int i = 0; i < NITRO_XTS_LANES; i++) {
        struct nitro_xts_lane *l = &x->lanes[i];
        int idle = 0;
        if (!__atomic_compare_exchange_n(&l->busy, &idle, 1, false,
                                         __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            continue;
        if (lane_ready(x, l))
            return l;
        __atomic_store_n(&l->busy, 0, __ATOMIC_RELEASE);
        return NULL;
    }
    return NULL;
}

void nitro_xts_lane_put(struct nitro_xts_lane *l)
{
    if (l != NULL)
        __atomic_store_n(&l->busy, 0, __ATOMIC_RELEASE);
}

uint8_t *nitro_xts_lane_bounce(struct nitro_xts_lane *l) { return l->bounce; }

/* One sector: dm-crypt's plain64 IV is the little-endian 512-byte-unit
 * number of the sector's first byte, zero-padded to 16 bytes. */
static int crypt_sector(const struct nitro_xts *x, const struct xts_ctx *c,
                        uint8_t *out, const uint8_t *in, uint64_t offset)
{
    uint8_t iv[16] = {0};
    uint64_t n = htole64((offset >> IV_UNIT_SHIFT) + x->iv_offset);
    memcpy(iv, &n, sizeof(n));
    if (x->impl == NITRO_XTS_EVP_IV && c->iv != NULL)
        memcpy(c->iv, iv, sizeof(iv));
    else if (!EVP_CipherInit_ex2(c->ctx, NULL, NULL, iv, -1, NULL))
        return NITRO_ERR_ARG;
    return update(c->ctx, out, in, (int)x->sector_size) ? NITRO_OK
                                                        : NITRO_ERR_ARG;
}

static bool aligned(const struct nitro_xts *x, uint64_t len, uint64_t offset)
{
    return len % x->sector_size == 0 && offset % x->sector_size == 0;
}

/* AES blocks a register on nitro's own XTS paths. */
static uint32_t impl_width(uint32_t impl)
{
    return impl == NITRO_XTS_VAES512 ? 4 : impl == NITRO_XTS_VAES ? 2 : 1;
}

/* len bytes of whole sectors, contiguous both sides. */
static int crypt_buf(struct nitro_xts *x, struct nitro_xts_lane *l,
                     uint8_t *out, const uint8_t *in, uint64_t len,
                     uint64_t offset, bool enc)
{
    if (x->impl >= NITRO_XTS_AESNI)
        return nitro_xts_aesni_crypt(&x->aesni, out, in, len / x->sector_size,
                                     x->sector_size,
                                     (offset >> IV_UNIT_SHIFT) + x->iv_offset,
                                     x->sector_size >> IV_UNIT_SHIFT, enc,
                                     impl_width(x->impl)) == 0
                   ? NITRO_OK
                   : NITRO_ERR_ARG;
    const struct xts_ctx *c = enc ? &l->enc : &l->dec;
    for (uint64_t done = 0; done < len; done += x->sector_size) {
        int rc = crypt_sector(x, c, out + done, in + done, offset + done);
        if (rc < 0)
            return rc;
    }
    return NITRO_OK;
}

int nitro_xts_crypt(struct nitro_xts *x, uint8_t *out, const uint8_t *in,
                    uint64_t len, uint64_t offset, uint32_t encrypt)
{
    if (x == NULL || out == NULL || in == NULL || !aligned(x, len, offset))
        return NITRO_ERR_ARG;
    struct nitro_xts_lane *l = nitro_xts_lane_get(x);
    if (l == NULL)
        return NITRO_ERR_NOMEM;
    int rc = crypt_buf(x, l, out, in, len, offset, encrypt != 0);
    nitro_xts_lane_put(l);
    return rc;
}

/* ---- scatter/gather between guest iovecs and the bounce buffer ---------- */

/* How many of the next len bytes of iov (whole sectors of n) lie in its
 * first iovec: 0 when the first sector straddles iovecs (then the caller
 * goes through a stack copy). */
static uint64_t iov_run(const struct iovec *iov, int cnt, uint32_t n,
                        uint64_t len)
{
    if (cnt <= 0)
        return 0;
    uint64_t run = iov->iov_len / n * n;
    return run < len ? run : len;
}

int nitro_xts_iov(struct nitro_xts *x, struct nitro_xts_lane *l,
                  struct iovec **iov, int *cnt, uint64_t len, uint64_t offset,
                  bool enc)
{
    if (len > NITRO_XTS_BOUNCE)
        return NITRO_ERR_ARG;
    return nitro_xts_iov_buf(x, l, l->bounce, iov, cnt, len, offset, enc);
}

int nitro_xts_iov_buf(struct nitro_xts *x, struct nitro_xts_lane *l,
                      uint8_t *bounce, struct iovec **iov, int *cnt,
                      uint64_t len, uint64_t offset, bool enc)
{
    uint32_t n = x->sector_size;
    uint8_t tmp[MAX_SECTOR];  /* plaintext of a sector that straddles iovecs */
    bool used_tmp = false;
    int rc = NITRO_OK;
    /* Runs of whole sectors inside one iovec in one call; a sector that
     * straddles iovecs alone, through tmp. */
    for (uint64_t done = 0, run; done < len && rc == NITRO_OK; done += run) {
        uint8_t *b = bounce + done;
        run = iov_run(*iov, *cnt, n, len - done);
        uint8_t *g = run > 0 ? (*iov)->iov_base : tmp;
        if (run == 0) {
            run = n;
            used_tmp = true;
            if (enc)
                nitro_iov_to_buf(*iov, *cnt, tmp, n);
        }
        rc = enc ? crypt_buf(x, l, b, g, run, offset + done, true)
                 : crypt_buf(x, l, g, b, run, offset + done, false);
        if (rc == NITRO_OK && !enc && g == tmp)
            nitro_buf_to_iov(*iov, *cnt, tmp, n);
        nitro_iov_advance(iov, cnt, run);
    }
    if (used_tmp)
        explicit_bzero(tmp, sizeof(tmp));
    return rc;
}
