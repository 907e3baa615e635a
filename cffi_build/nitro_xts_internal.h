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

#endif
