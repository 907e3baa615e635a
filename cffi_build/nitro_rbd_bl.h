/*
 * nitro_rbd_bl.h: reads from librbd into a bufferlist (nitro_rbd_bl.cpp).
 *
 * librbd's C API reads into a caller's buffer or iovec, which it fills by
 * copying the OSD's reply out of the messenger's buffers. nitro cannot
 * hand it guest memory (a request answered at io_timeout goes back to the
 * guest while librbd may still write into it), so a plain read was two
 * copies: librbd's into the request's buffer, nitro's into the guest.
 * librbd's C++ API can instead move the reply's buffers into a bufferlist
 * (ReadResult's Bufferlist case: no copy), which nitro owns until it lets
 * go; the one copy left is nitro's, into the guest, the same count as
 * qemu-storage-daemon's rbd driver (rbd_aio_readv: librbd's copy).
 *
 * Internal to the extension (built with -fvisibility=hidden); C callers
 * see an opaque handle.
 */
#ifndef NITRO_RBD_BL_H
#define NITRO_RBD_BL_H

#include <rbd/librbd.h>
#include <stdint.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

struct nitro_rbd_bl;

/* An empty bufferlist; NULL: no memory. */
struct nitro_rbd_bl *nitro_rbd_bl_new(void);
void nitro_rbd_bl_free(struct nitro_rbd_bl *bl);  /* NULL: nothing */
/* Let go of the buffers it holds (the OSD reply's), keeping the list. */
void nitro_rbd_bl_clear(struct nitro_rbd_bl *bl);
/* rbd_aio_read's equivalent: len bytes at off into bl (replacing what it
 * held) when c completes. 0, or a negative errno. */
int nitro_rbd_aio_read_bl(rbd_image_t image, uint64_t off, uint64_t len,
                          struct nitro_rbd_bl *bl, rbd_completion_t c);
/* Its bytes, as segments: how many it has, of which the first `max` are
 * stored in seg (a caller whose array is too small calls again with one
 * of that size). One buffer per object a read spans, and more where the
 * OSD answered a sparse read (holes are buffers of zeros). */
int nitro_rbd_bl_segments(const struct nitro_rbd_bl *bl, struct iovec *seg, int max);

#ifdef __cplusplus
}
#endif

#endif
