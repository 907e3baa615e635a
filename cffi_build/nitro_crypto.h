/*
 * nitro_crypto.h: at-rest encryption in the datapath (ABI; also a cdef).
 *
 * Sectors are encrypted with AES-XTS exactly as dm-crypt does for LUKS2
 * ("aes-xts-plain64"): each encryption sector (512 or 4096 bytes) of the data
 * segment has the 16-byte IV  le64(byte offset in the segment / 512 +
 * iv_offset) || 0^8.  The IV counts 512-byte units even with 4096-byte
 * sectors, because LUKS2 never sets dm-crypt's iv_large_sectors.
 *
 * Key material lives only in C memory: a nitro_secret is an mlock'd (where
 * RLIMIT_MEMLOCK allows), MADV_DONTDUMP mapping wiped with explicit_bzero on
 * free; a nitro_xts keeps the expanded key only inside OpenSSL cipher
 * contexts, which EVP_CIPHER_CTX_free cleanses, and (where the CPU has
 * AES-NI) in its own key schedules, which nitro_xts_free cleanses. Neither
 * can be read back.
 */
#ifndef NITRO_CRYPTO_H
#define NITRO_CRYPTO_H
#include <stdint.h>

#define NITRO_SECRET_MAX 8192      /* largest key file or passphrase */
#define NITRO_XTS_LANES 64         /* serving threads that may crypt at once */
#define NITRO_XTS_BOUNCE 262144    /* per-lane ciphertext buffer, bytes */

/* ---- secrets: key files, passphrases, volume keys ----------------------- */
struct nitro_secret;

/* *out = a zeroed secret of `capacity` (1..NITRO_SECRET_MAX) bytes, length
 * 0. NITRO_ERR_ARG for a bad capacity, NITRO_ERR_SYS if mmap failed. */
int nitro_secret_new(uint32_t capacity, struct nitro_secret **out);
/* Wipe, unlock and unmap. NULL is fine. */
void nitro_secret_free(struct nitro_secret *s);
/* Read all of fd (the caller's, left open) into s, replacing its contents;
 * with strip_newline, one trailing "\n" (or "\r\n") is dropped, as a
 * passphrase typed into a file has one. Returns the length, NITRO_ERR_ARG if
 * the file is empty or larger than the capacity, NITRO_ERR_SYS on a read
 * error. */
int nitro_secret_read_fd(struct nitro_secret *s, int fd, uint32_t strip_newline);
/* Where libcryptsetup may read or write the secret (capacity bytes). */
uint8_t *nitro_secret_data(struct nitro_secret *s);
uint32_t nitro_secret_len(const struct nitro_secret *s);
uint32_t nitro_secret_capacity(const struct nitro_secret *s);
/* Set the length after something wrote into nitro_secret_data(). */
int nitro_secret_set_len(struct nitro_secret *s, uint32_t len);
/* 1 when the pages are mlock'd, 0 when RLIMIT_MEMLOCK refused. */
uint32_t nitro_secret_locked(const struct nitro_secret *s);

/* ---- AES-XTS sector cipher ---------------------------------------------- */
struct nitro_xts;

/* *out = a cipher for key: 32 (AES-128-XTS) or 64 (AES-256-XTS) bytes,
 * which stay the caller's (wipe them once this returns); sector_size 512 or
 * 4096; iv_offset is LUKS2's segment iv_tweak (usually 0). NITRO_ERR_ARG on
 * a bad argument or when OpenSSL refuses the key (XTS rejects equal
 * halves), NITRO_ERR_NOMEM. */
int nitro_xts_new(const struct nitro_secret *key, uint32_t sector_size,
                  uint64_t iv_offset, struct nitro_xts **out);
/* Free every cipher context (cleansed) and bounce buffer. Only when no
 * thread serves with it. NULL is fine. */
void nitro_xts_free(struct nitro_xts *x);
/* En- or decrypt len bytes (whole sectors) from in to out (may be equal) as
 * the sectors at byte offset `offset` of the data segment (sector aligned).
 * For tests and benchmarks; the serving loop uses the same code. */
int nitro_xts_crypt(struct nitro_xts *x, uint8_t *out, const uint8_t *in,
                    uint64_t len, uint64_t offset, uint32_t encrypt);
/* How sectors are encrypted (nitro_xts.c): */
#define NITRO_XTS_EVP_INIT 0  /* OpenSSL's XTS, IV by EVP_CipherInit_ex2 */
#define NITRO_XTS_EVP_IV 1    /* OpenSSL's XTS, IV written in its context */
#define NITRO_XTS_AESNI 2     /* nitro's XTS on AES-NI, many sectors a call */
#define NITRO_XTS_VAES 3      /* the same, two AES blocks an instruction */
#define NITRO_XTS_VAES512 4   /* the same, four (AVX-512) */
/* The path in use: the fastest that proved to work at key load. */
uint32_t nitro_xts_impl(const struct nitro_xts *x);
/* For tests and benchmarks, before any thread crypts with x: choose a path;
 * NITRO_ERR_ARG unless it proved to work here. */
int nitro_xts_set_impl(struct nitro_xts *x, uint32_t impl);

#endif
