/*
 * nitro_xts_internal.h: the part of nitro_xts.c that nitro_blk.c uses while
 * serving. Internal (it takes struct iovec), not part of the cdef.
 */
#ifndef NITRO_XTS_INTERNAL_H
#define NITRO_XTS_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "nitro_crypto.h"

/* A serving thread's cipher contexts and NITRO_XTS_BOUNCE-byte bounce
 * buffer. The buffer only ever holds ciphertext. */
struct nitro_xts_lane;

/* The cipher's encryption sector size (512 or 4096). */
uint32_t nitro_xts_sector_size(const struct nitro_xts *x);

/* A free lane for the calling thread, or NULL (all busy, or no memory). */
struct nitro_xts_lane *nitro_xts_lane_get(struct nitro_xts *x);
/* Give the lane back. NULL is fine. */
void nitro_xts_lane_put(struct nitro_xts_lane *l);
uint8_t *nitro_xts_lane_bounce(struct nitro_xts_lane *l);

/* enc: len bytes of guest plaintext at *iov -> ciphertext in the bounce.
 * !enc: ciphertext in the bounce -> guest plaintext at *iov.
 * Out of place both ways: the bounce buffer, which the guest cannot touch,
 * is always the ciphertext side. len <= NITRO_XTS_BOUNCE and, like offset
 * (the byte offset in the data segment the IVs count from), a multiple of
 * the sector size: the caller checked that. The iovec cursor advances by
 * len. Returns NITRO_OK or NITRO_ERR_ARG. */
int nitro_xts_iov(struct nitro_xts *x, struct nitro_xts_lane *l,
                  struct iovec **iov, int *cnt, uint64_t len, uint64_t offset,
                  bool enc);
/* The same with a ciphertext buffer of the caller's (len bytes, any size):
 * the engine's in-flight requests each have their own. */
int nitro_xts_iov_buf(struct nitro_xts *x, struct nitro_xts_lane *l,
                      uint8_t *bounce, struct iovec **iov, int *cnt,
                      uint64_t len, uint64_t offset, bool enc);

/* ---- nitro_xts_aesni.c: the mode on AES-NI, many sectors per call ------ */

/* Expanded AES key schedules of an XTS key (read-only once made, so every
 * thread can share them). Secrets: wiped with the struct nitro_xts that
 * holds them. */
struct nitro_xts_aesni {
    _Alignas(16) uint8_t enc[15][16];    /* data key, encryption rounds */
    _Alignas(16) uint8_t dec[15][16];    /* data key, decryption rounds */
    _Alignas(16) uint8_t tweak[15][16];  /* tweak key, encryption rounds */
    uint32_t rounds;                     /* 10 (AES-128) or 14 (AES-256) */
};

/* The CPU has AES-NI: the only case where the two calls below may run. */
bool nitro_xts_aesni_usable(void);
/* It also has VAES (and AVX2): nitro_xts_aesni_crypt may take width 2. */
bool nitro_xts_vaes_usable(void);
/* And AVX-512 F and BW: width 4. */
bool nitro_xts_vaes512_usable(void);
/* key_len 32 (AES-128-XTS) or 64 (AES-256-XTS): key1 || key2. */
void nitro_xts_aesni_init(struct nitro_xts_aesni *k, const uint8_t *key,
                          uint32_t key_len);
/* units data units of unit_size bytes from in to out (may be equal); unit
 * i has the IV le64(first_iv + i * iv_step) || 0^8. width: AES blocks a
 * register, 1 (AES-NI), 2 (VAES, 256-bit) or 4 (VAES, 512-bit). unit_size
 * must be a multiple of 8 registers of at least two blocks (256 bytes; 512
 * for width 4: 512 and 4096 are; no ciphertext stealing), else -1 and
 * nothing is written; 0 when done. */
int nitro_xts_aesni_crypt(const struct nitro_xts_aesni *k, uint8_t *out,
                          const uint8_t *in, uint64_t units,
                          uint32_t unit_size, uint64_t first_iv,
                          uint64_t iv_step, bool enc, uint32_t width);

#endif
