/*
 * nitro_xts_aesni.c: AES-XTS (IEEE 1619, no ciphertext stealing) on the
 * CPU's AES instructions, many data units per call.
 *
 * Why not OpenSSL's XTS: it takes one data unit per call, and each call pays
 * for the tweak (one AES block encrypted serially, ~60 cycles of latency)
 * and a short tail after its six-block loop: OpenSSL 3.0 runs 512-byte
 * units at 0.75 of its 4096-byte speed, and dm-crypt's 512-byte sectors are
 * one unit each. Here the tweaks of up to eight sectors are encrypted
 * together, and each sector goes through an interleaved pipeline: eight
 * blocks in flight with AES-NI (128-bit), sixteen with VAES (two blocks per
 * 256-bit instruction; OpenSSL 3.0's XTS does not use VAES). 512 and 4096
 * are whole multiples of sixteen blocks, so there is no tail. The block
 * cipher is the CPU's own; only the mode is nitro's. nitro_xts.c checks
 * both widths against OpenSSL's XTS at key load and uses neither unless it
 * matches; tests/unit/test_crypto_xts.py checks them against OpenSSL and the
 * IEEE 1619 vectors.
 *
 * Compiled with per-function target attributes, so the rest of the
 * extension keeps the baseline ISA and this code only runs after
 * nitro_xts_aesni_usable() / nitro_xts_vaes_usable() said yes.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <immintrin.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "nitro_xts_internal.h"

#define AESNI __attribute__((target("aes,sse2")))
#define VAES __attribute__((target("vaes,avx2,aes")))
#define VAES512 __attribute__((target("vaes,vpclmulqdq,avx512f,avx512bw,aes")))
#define BLOCK 16
#define LANES 8            /* registers of blocks (and sector tweaks) in flight */
/* Software prefetch of the input, so the AES rounds overlap the memory
 * reads. Input is often cold in the CPU's caches (an image's pages in the
 * page cache, read straight from its mapping), and the hardware's stream
 * prefetch stops at every 4 KiB page. Each batch of blocks prefetches the
 * lines PREFETCH_AHEAD bytes on; a call first prefetches its first
 * PREFETCH_HEAD bytes. Never past the call's input: a 4 KiB random read
 * ran slower when its batches fetched lines beyond it. Measured on a cold
 * 1 GiB mapping, one core: 128 KiB decrypts 5.9 -> 8.3 GB/s, 4 KiB
 * 3.6 -> 3.7 GB/s (memcpy of the same: 10.3 and 6.8). */
#define PREFETCH_AHEAD 2048
#define PREFETCH_HEAD 2048
#define CACHE_LINE 64

bool nitro_xts_aesni_usable(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("aes") && __builtin_cpu_supports("sse2");
}

/* VAES (AES on 256-bit registers) also needs the OS to save AVX state,
 * which the compiler runtime's avx2 check includes. CPUID directly for VAES
 * itself: clang 14 (the fuzz build) has no name for it. */
bool nitro_xts_vaes_usable(void)
{
    unsigned int a, b, c, d;
    return nitro_xts_aesni_usable() && __builtin_cpu_supports("avx2") &&
           __get_cpuid_count(7, 0, &a, &b, &c, &d) && (c & bit_VAES);
}

/* VAES on 512-bit registers: AVX-512 F and BW (the byte shifts), whose
 * check includes the OS saving the registers, and VPCLMULQDQ (the tweaks'
 * reduction; CPUID 7.0 ECX bit 10, by number: clang 14 has no name). */
bool nitro_xts_vaes512_usable(void)
{
    unsigned int a, b, c, d;
    return nitro_xts_vaes_usable() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") &&
           __get_cpuid_count(7, 0, &a, &b, &c, &d) && (c & (1u << 10));
}

/* ---- key schedules (FIPS-197 5.2 through AESKEYGENASSIST) --------------- */

/* w[i..i+3] of the next round key from the previous one and the assist
 * word already broadcast into every lane. */
AESNI static inline __m128i expand_step(__m128i k, __m128i assist)
{
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, assist);
}

/* The immediate of AESKEYGENASSIST must be a constant: one macro per round. */
#define EXP128(i, rcon)                                                     \
    rk[i] = expand_step(rk[i - 1], _mm_shuffle_epi32(                        \
        _mm_aeskeygenassist_si128(rk[i - 1], rcon), 0xff))

AESNI static void expand128(__m128i rk[15], const uint8_t *key)
{
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    EXP128(1, 0x01); EXP128(2, 0x02); EXP128(3, 0x04); EXP128(4, 0x08);
    EXP128(5, 0x10); EXP128(6, 0x20); EXP128(7, 0x40); EXP128(8, 0x80);
    EXP128(9, 0x1b); EXP128(10, 0x36);
}

/* AES-256: even round keys take RotWord+SubWord+Rcon of the previous odd
 * one (lane 3), odd ones SubWord alone of the previous even one (lane 2). */
#define EXP256(i, rcon)                                                     \
    rk[i] = expand_step(rk[i - 2], _mm_shuffle_epi32(                        \
        _mm_aeskeygenassist_si128(rk[i - 1], rcon), 0xff));                  \
    if (i < 14)                                                             \
        rk[i + 1] = expand_step(rk[i - 1], _mm_shuffle_epi32(                \
            _mm_aeskeygenassist_si128(rk[i], 0), 0xaa))

AESNI static void expand256(__m128i rk[15], const uint8_t *key)
{
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    rk[1] = _mm_loadu_si128((const __m128i *)(key + BLOCK));
    EXP256(2, 0x01); EXP256(4, 0x02); EXP256(6, 0x04); EXP256(8, 0x08);
    EXP256(10, 0x10); EXP256(12, 0x20); EXP256(14, 0x40);
}

AESNI static void expand(__m128i rk[15], const uint8_t *key, uint32_t half)
{
    if (half == 32)
        expand256(rk, key);
    else
        expand128(rk, key);
}

/* The Equivalent Inverse Cipher's schedule (FIPS-197 5.3.5) for AESDEC. */
AESNI static void invert(__m128i dk[15], const __m128i rk[15], uint32_t nr)
{
    dk[0] = rk[nr];
    for (uint32_t r = 1; r < nr; r++)
        dk[r] = _mm_aesimc_si128(rk[nr - r]);
    dk[nr] = rk[0];
}

AESNI void nitro_xts_aesni_init(struct nitro_xts_aesni *k, const uint8_t *key,
                                uint32_t key_len)
{
    uint32_t half = key_len / 2;
    __m128i rk[15], dk[15], tk[15];
    k->rounds = half == 32 ? 14 : 10;
    expand(rk, key, half);
    expand(tk, key + half, half);
    invert(dk, rk, k->rounds);
    memcpy(k->enc, rk, sizeof(k->enc));
    memcpy(k->dec, dk, sizeof(k->dec));
    memcpy(k->tweak, tk, sizeof(k->tweak));
    /* The schedules are secrets: no copies left on the stack. */
    explicit_bzero(rk, sizeof(rk));
    explicit_bzero(dk, sizeof(dk));
    explicit_bzero(tk, sizeof(tk));
}

/* ---- the mode ----------------------------------------------------------- */

/* T * alpha^k in GF(2^128) (1 <= k <= 57), the 16 bytes read as a
 * little-endian number (IEEE 1619 5.2): shift left by k; the k bits that
 * leave bit 127 fold back multiplied by x^7 + x^2 + x + 1 (0x87), a
 * carry-less product that fits in the low 64 bits. Per 128-bit lane, so
 * it works on one tweak (X) or two (Y). k = 1 is the standard's step from
 * block to block; the VAES loop takes each register's tweaks straight from
 * the batch's first (k = 2..14) and jumps a whole batch (k = 16), so no
 * tweak waits on a chain of steps. */
#define MUL_ALPHA(V, t, k)                                                   \
    ({                                                                       \
        V##_t h_ = V##_srli_epi64(V##_bsrli(t, 8), 64 - (k));                \
        V##_t c_ = V##_srli_epi64(V##_bslli(t, 8), 64 - (k));                \
        V##_t r_ = V##_xor(h_, V##_xor(V##_slli_epi64(h_, 1),                \
                   V##_xor(V##_slli_epi64(h_, 2), V##_slli_epi64(h_, 7))));  \
        V##_xor(V##_xor(V##_slli_epi64(t, k), c_), r_);                      \
    })
/* MUL_ALPHA on 512-bit registers, in as few shifts as it takes: the AES
 * rounds' port also runs every shift, and a 512-byte sector's tweaks are a
 * fifth of its work. The k top bits of each 64-bit half, shifted down once
 * (tops_), serve both ways: the high half's fold back into bit 0 as one
 * carry-less multiply by 0x87 (VPCLMULQDQ, another port; the product of k
 * <= 56 bits by 8 fits the low half), the low half's carry into bit 64 as
 * one byte shift (another port too). */
#define Z_MUL_ALPHA(t, k) Z_MUL_ALPHA_BY(t, _mm512_set1_epi64(k))
/* The same with k per 64-bit element (both halves of a 128-bit lane the
 * same; a lane's k may be 0: VPSRLVQ by 64 gives 0, so nothing folds). */
#define Z_MUL_ALPHA_BY(t, kv)                                                \
    ({                                                                       \
        __m512i tops_ = _mm512_srlv_epi64(t, _mm512_sub_epi64(_mm512_set1_epi64(64), kv)); \
        __m512i fold_ = _mm512_clmulepi64_epi128(tops_, _mm512_set1_epi64(0x87), 0x01); \
        _mm512_ternarylogic_epi64(_mm512_sllv_epi64(t, kv), _mm512_bslli_epi128(tops_, 8), \
                                  fold_, 0x96);                              \
    })
#define Y_MUL_ALPHA(t, k) MUL_ALPHA(Y, t, k)
/* The SSE2 and AVX2 spellings MUL_ALPHA needs. */
#define X_t __m128i
#define X_srli_epi64 _mm_srli_epi64
#define X_slli_epi64 _mm_slli_epi64
#define X_bsrli _mm_bsrli_si128
#define X_bslli _mm_bslli_si128
#define X_xor _mm_xor_si128
#define Y_t __m256i
#define Y_srli_epi64 _mm256_srli_epi64
#define Y_slli_epi64 _mm256_slli_epi64
#define Y_bsrli _mm256_bsrli_epi128
#define Y_bslli _mm256_bslli_epi128
#define Y_xor _mm256_xor_si256
#define Z_t __m512i
#define Z_srli_epi64 _mm512_srli_epi64
#define Z_slli_epi64 _mm512_slli_epi64
#define Z_bsrli _mm512_bsrli_epi128
#define Z_bslli _mm512_bslli_epi128
#define Z_xor _mm512_xor_si512

/* Prefetch len bytes from address p, stopping at end. Addresses as
 * integers: p may lie past the input, where no pointer may point. */
AESNI static inline void prefetch(uintptr_t p, uintptr_t len, const char *end)
{
    for (uintptr_t a = p; a < p + len && a < (uintptr_t)end; a += CACHE_LINE)
        _mm_prefetch((const char *)a, _MM_HINT_T0);
}

/* AES-encrypt n (<= LANES) blocks in place, interleaved. */
AESNI static void encrypt_blocks(const __m128i *rk, uint32_t nr, __m128i *b,
                                 int n)
{
    for (int i = 0; i < n; i++)
        b[i] = _mm_xor_si128(b[i], rk[0]);
    for (uint32_t r = 1; r < nr; r++)
        for (int i = 0; i < n; i++)
            b[i] = _mm_aesenc_si128(b[i], rk[r]);
    for (int i = 0; i < n; i++)
        b[i] = _mm_aesenclast_si128(b[i], rk[nr]);
}

/* One data unit, LANES registers of blocks at a time: V is X (one block a
 * register, AES-NI) or Y (two, VAES). TWEAKS fills tw[i] with the tweaks
 * of register i's blocks from t and moves t on by the batch; KEY(r) is
 * round key r in V's width. The last AES round xors its key in last, so
 * the closing tweak xor is folded into that key. in_end ends the call's
 * input (the prefetch's limit). */
#define UNIT_LOOP(V, load, store, KEY, ROUND, LAST, TWEAKS)                 \
    for (uint32_t j = 0; j < regs; j += LANES) {                             \
        V##_t b[LANES], tw[LANES];                                           \
        prefetch((uintptr_t)&src[j] + PREFETCH_AHEAD, sizeof(src[0]) * LANES, \
                 in_end);                                                    \
        TWEAKS;                                                              \
        _Pragma("GCC unroll 8")                                              \
        for (int i = 0; i < LANES; i++)                                      \
            b[i] = V##_xor(load(&src[j + i]), V##_xor(tw[i], KEY(0)));       \
        for (uint32_t r = 1; r < nr; r++) {                                  \
            V##_t key = KEY(r);                                              \
            _Pragma("GCC unroll 8")                                          \
            for (int i = 0; i < LANES; i++)                                  \
                b[i] = ROUND(b[i], key);                                     \
        }                                                                    \
        _Pragma("GCC unroll 8")                                              \
        for (int i = 0; i < LANES; i++)                                      \
            store(&dst[j + i], LAST(b[i], V##_xor(KEY(nr), tw[i])));         \
    }

/* AES-NI: 8 blocks in flight, tweaks by the standard's one-bit steps (the
 * cheapest form: the chain is short next to 8 x 15 AES rounds). */
#define X_KEY(r) k[r]
#define X_TWEAKS                                                             \
    _Pragma("GCC unroll 8")                                                  \
    for (int i = 0; i < LANES; i++) {                                        \
        tw[i] = t;                                                           \
        t = mul_alpha(t);                                                    \
    }

/* T * alpha, as MUL_ALPHA(X, t, 1) in fewer instructions: the top bit of
 * each 32-bit lane smeared, then lane 0 takes lane 3's (bit 127, folds back
 * as 0x87), lane 2 takes lane 1's (bit 63, carries into bit 64). */
AESNI static inline __m128i mul_alpha(__m128i t)
{
    const __m128i poly = _mm_set_epi32(0, 1, 0, 0x87);
    __m128i carry = _mm_shuffle_epi32(_mm_srai_epi32(t, 31), 0x13);
    return _mm_xor_si128(_mm_add_epi64(t, t), _mm_and_si128(carry, poly));
}

/* unit_enc and unit_dec: one data unit, AES-NI. */
#define X_UNIT(name, ROUND, LAST)                                            \
    AESNI static void name(const __m128i *k, uint32_t nr, __m128i t,         \
                           __m128i *dst, const __m128i *src, uint32_t blocks, \
                           const char *in_end)                               \
    {                                                                        \
        uint32_t regs = blocks;                                              \
        UNIT_LOOP(X, _mm_loadu_si128, _mm_storeu_si128, X_KEY, ROUND, LAST,  \
                  X_TWEAKS)                                                  \
    }
X_UNIT(unit_enc, _mm_aesenc_si128, _mm_aesenclast_si128)
X_UNIT(unit_dec, _mm_aesdec_si128, _mm_aesdeclast_si128)

/* VAES: 8 registers of two blocks, 16 in flight. t holds the tweaks of the
 * batch's first two blocks; register i's are t * alpha^(2i), each straight
 * from t (no chain), and the next batch starts at t * alpha^16. Round keys
 * are broadcast from the schedule as they are used (a load each, no copy
 * of the key on the stack). */
#define Y_KEY(r) _mm256_broadcastsi128_si256(_mm_load_si128(&k[r]))
/* The tweaks of a batch of registers of w blocks each: register i's are
 * t * alpha^(w * i), the next batch's t * alpha^(8w) (VAES: w 2 or 4). */
#define WIDE_TWEAKS(V, w)                                                    \
    tw[0] = t;                                                               \
    tw[1] = V##_MUL_ALPHA(t, 1 * (w));                                        \
    tw[2] = V##_MUL_ALPHA(t, 2 * (w));                                        \
    tw[3] = V##_MUL_ALPHA(t, 3 * (w));                                        \
    tw[4] = V##_MUL_ALPHA(t, 4 * (w));                                        \
    tw[5] = V##_MUL_ALPHA(t, 5 * (w));                                        \
    tw[6] = V##_MUL_ALPHA(t, 6 * (w));                                        \
    tw[7] = V##_MUL_ALPHA(t, 7 * (w));                                        \
    if (j + LANES < regs) /* not after the unit's last batch */              \
        t = V##_MUL_ALPHA(t, 8 * (w))
#define Y_TWEAKS WIDE_TWEAKS(Y, 2)

/* The first tweak register of a unit whose first tweak is t1: t1 * alpha^j
 * in its j-th 128-bit lane (two lanes for Y, four for Z). */
#define Y_FIRST(t1) _mm256_set_m128i(MUL_ALPHA(X, t1, 1), t1)
#define Z_FIRST(t1)                                                          \
    Z_MUL_ALPHA_BY(_mm512_broadcast_i32x4(t1), _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0))

/* One data unit on V's wide registers (Y: VAES on 256 bits, w = 2 blocks a
 * register; Z: on 512 bits, w = 4); t1 is the unit's tweak. */
#define WIDE_UNIT(V, ATTR, w, name, ROUND, LAST)                             \
    ATTR static void name(const __m128i *k, uint32_t nr, __m128i t1,         \
                          V##_t *dst, const V##_t *src, uint32_t blocks,      \
                          const char *in_end)                                 \
    {                                                                        \
        V##_t t = V##_FIRST(t1);                                             \
        uint32_t regs = blocks / (w);                                        \
        UNIT_LOOP(V, V##_LOAD, V##_STORE, V##_KEY, ROUND, LAST, V##_TWEAKS)  \
    }
#define Y_LOAD _mm256_loadu_si256
#define Y_STORE _mm256_storeu_si256
#define Z_LOAD _mm512_loadu_si512
#define Z_STORE _mm512_storeu_si512

/* unit_enc_wide and unit_dec_wide: VAES on 256-bit registers. */
WIDE_UNIT(Y, VAES, 2, unit_enc_wide, _mm256_aesenc_epi128, _mm256_aesenclast_epi128)
WIDE_UNIT(Y, VAES, 2, unit_dec_wide, _mm256_aesdec_epi128, _mm256_aesdeclast_epi128)

/* VAES on 512-bit registers: 8 registers of four blocks, 32 in flight
 * (measured here: 1.55x the AES rounds per second of the 256-bit form).
 * Register i's tweaks are t * alpha^(4i), the next batch starts at
 * t * alpha^32; a 512-byte sector is one batch. */
#define Z_KEY(r) _mm512_broadcast_i32x4(_mm_load_si128(&k[r]))
#define Z_TWEAKS WIDE_TWEAKS(Z, 4)

/* unit_enc_512 and unit_dec_512: VAES on 512-bit registers. */
WIDE_UNIT(Z, VAES512, 4, unit_enc_512, _mm512_aesenc_epi128, _mm512_aesenclast_epi128)
WIDE_UNIT(Z, VAES512, 4, unit_dec_512, _mm512_aesdec_epi128, _mm512_aesdeclast_epi128)

/* The tweaks of LANES units from unit number iv on, step apart, on 512-bit
 * registers: four sector numbers a register, encrypted together, a quarter
 * of the AES instructions of encrypt_blocks (whose 128-bit rounds would
 * take the port the 512-bit ones run on, once per 512-byte sector). */
VAES512 static void tweaks_512(const __m128i *k, uint32_t nr, uint64_t iv, uint64_t step,
                               __m128i tw[LANES])
{
    __m512i b[LANES / 4];
    for (int i = 0; i < LANES / 4; i++) {
        uint64_t u = iv + (uint64_t)(4 * i) * step;
        b[i] = _mm512_xor_si512(_mm512_set_epi64(0, (long long)(u + 3 * step), 0,
                                                 (long long)(u + 2 * step), 0,
                                                 (long long)(u + step), 0, (long long)u),
                                Z_KEY(0));
    }
    for (uint32_t r = 1; r < nr; r++)
        for (int i = 0; i < LANES / 4; i++)
            b[i] = _mm512_aesenc_epi128(b[i], Z_KEY(r));
    for (int i = 0; i < LANES / 4; i++)
        _mm512_storeu_si512(&tw[4 * i], _mm512_aesenclast_epi128(b[i], Z_KEY(nr)));
}

/* One unit, in the width asked for (blocks a register). */
AESNI static void unit(const __m128i *k, uint32_t nr, __m128i t, uint8_t *out,
                       const uint8_t *in, uint32_t blocks, bool enc, uint32_t width,
                       const char *in_end)
{
    if (width == 4 && enc)
        unit_enc_512(k, nr, t, (__m512i *)out, (const __m512i *)in, blocks, in_end);
    else if (width == 4)
        unit_dec_512(k, nr, t, (__m512i *)out, (const __m512i *)in, blocks, in_end);
    else if (width == 2 && enc)
        unit_enc_wide(k, nr, t, (__m256i *)out, (const __m256i *)in, blocks, in_end);
    else if (width == 2)
        unit_dec_wide(k, nr, t, (__m256i *)out, (const __m256i *)in, blocks, in_end);
    else if (enc)
        unit_enc(k, nr, t, (__m128i *)out, (const __m128i *)in, blocks, in_end);
    else
        unit_dec(k, nr, t, (__m128i *)out, (const __m128i *)in, blocks, in_end);
}

AESNI int nitro_xts_aesni_crypt(const struct nitro_xts_aesni *k, uint8_t *out,
                                const uint8_t *in, uint64_t units,
                                uint32_t unit_size, uint64_t first_iv,
                                uint64_t iv_step, bool enc, uint32_t width)
{
    /* Whole batches of LANES registers (of at least two blocks) only: no
     * ciphertext stealing, no tail. */
    uint32_t batch = (width > 2 ? width : 2) * LANES * BLOCK;
    if (unit_size == 0 || unit_size % batch != 0 || (width != 1 && width != 2 && width != 4))
        return -1;
    const __m128i *rk = (const __m128i *)(enc ? k->enc : k->dec);
    const __m128i *tk = (const __m128i *)k->tweak;
    uint32_t nr = k->rounds, blocks = unit_size / BLOCK;
    const char *in_end = (const char *)in + units * unit_size;
    prefetch((uintptr_t)in, PREFETCH_HEAD, in_end);
    for (uint64_t u = 0; u < units; u += LANES) {
        int n = units - u < LANES ? (int)(units - u) : LANES;
        __m128i tw[LANES];
        /* plain64: the IV is the 64-bit unit number, zero-extended; the
         * tweaks of up to LANES units are encrypted together. */
        if (width == 4) {
            tweaks_512(tk, nr, first_iv + u * iv_step, iv_step, tw);
        } else {
            for (int i = 0; i < n; i++)
                tw[i] = _mm_set_epi64x(0, (long long)(first_iv + (u + i) * iv_step));
            encrypt_blocks(tk, nr, tw, n);
        }
        for (int i = 0; i < n; i++) {
            uint64_t at = (u + i) * unit_size;
            unit(rk, nr, tw[i], out + at, in + at, blocks, enc, width, in_end);
        }
    }
    return 0;
}
