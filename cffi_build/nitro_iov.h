/*
 * nitro_iov.h: scatter/gather helpers shared by the device datapaths
 * (nitro_blk.c, nitro_xts.c, nitro_switch.c, nitro_net_queue.c). Internal,
 * not part of the cdef.
 *
 * The iovecs come from nitro_vq_pop(): every entry already points inside
 * guest memory and lengths are checked, so these only move bytes.
 */
#ifndef NITRO_IOV_H
#define NITRO_IOV_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#define NITRO_CACHE_LINE 64u

/* Ask for a line we are about to write. x86-64's baseline (what this is
 * built for) has no PREFETCHW, so GCC turns a write prefetch into a read
 * one; the instruction itself exists on every x86-64 CPU that matters
 * (AMD since K8, Intel since Broadwell; older ones execute it as a NOP). */
static inline void nitro_prefetch_for_write(const void *p)
{
#if defined(__x86_64__)
    __asm__ __volatile__("prefetchw %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 1, 3);
#endif
}

/* Drop the first n bytes of *iov (n <= its total), editing in place. */
static inline void nitro_iov_advance(struct iovec **iov, int *cnt, uint64_t n)
{
    while (n > 0 && *cnt > 0) {
        if (n < (*iov)->iov_len) {
            (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + n;
            (*iov)->iov_len -= n;
            return;
        }
        n -= (*iov)->iov_len;
        (*iov)++;
        (*cnt)--;
    }
}

/* Copy up to len bytes from the start of iov into buf; returns bytes copied. */
static inline size_t nitro_iov_to_buf(const struct iovec *iov, int cnt,
                                      void *buf, size_t len)
{
    uint8_t *out = buf;
    size_t done = 0;
    for (int i = 0; i < cnt && done < len; i++) {
        size_t n = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        memcpy(out + done, iov[i].iov_base, n);
        done += n;
    }
    return done;
}

/* Copy up to len bytes of buf into the start of iov; returns bytes copied. */
static inline size_t nitro_buf_to_iov(const struct iovec *iov, int cnt,
                                      const void *buf, size_t len)
{
    const uint8_t *in = buf;
    size_t done = 0;
    for (int i = 0; i < cnt && done < len; i++) {
        size_t n = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        memcpy(iov[i].iov_base, in + done, n);
        done += n;
    }
    return done;
}

/* A position in an iovec array: element i, byte off in it. */
struct nitro_iov_at {
    int i;
    size_t off;
};

/* Copy len bytes of buf into iov from *at on, moving *at past them;
 * returns bytes copied (fewer where iov ends first). Successive calls
 * fill iov from several sources in turn. */
static inline size_t nitro_buf_to_iov_at(const struct iovec *iov, int cnt,
                                         struct nitro_iov_at *at, const void *buf,
                                         size_t len)
{
    const uint8_t *in = buf;
    size_t done = 0;
    while (done < len && at->i < cnt) {
        size_t room = iov[at->i].iov_len - at->off;
        size_t n = room < len - done ? room : len - done;
        memcpy((uint8_t *)iov[at->i].iov_base + at->off, in + done, n);
        done += n;
        at->off += n;
        if (at->off == iov[at->i].iov_len) {
            at->i++;
            at->off = 0;
        }
    }
    return done;
}

static inline void nitro_iov_zero(const struct iovec *iov, int cnt)
{
    for (int i = 0; i < cnt; i++)
        memset(iov[i].iov_base, 0, iov[i].iov_len);
}

#endif
