/*
 * nitro_nbd.h: virtio-blk volumes on an NBD export (libnbd). Part of the
 * ABI (a cdef, like nitro.h); the C lives in nitro_nbd.c.
 *
 * A volume has one connection object per queue (struct nitro_nbd); the
 * queue's ring (nitro_ring_nbd_new) does its I/O through the libnbd handle
 * the object holds, asynchronously on the ring's engine worker. Connecting
 * blocks (DNS, TCP, TLS handshake), so it is never done by a worker: the
 * control plane connects (nitro_nbd_connect, on a thread of its own) and
 * offers the connected handle; the worker takes it at its next poll. When
 * the connection dies the worker keeps the requests (they wait), retires
 * the handle for the control plane to close, and asks for a new one by
 * writing want_fd; after the new handle arrives it sends them again. A
 * request that has waited io_timeout_ns since the guest made it completes
 * with VIRTIO_BLK_S_IOERR.
 */
#ifndef NITRO_NBD_H
#define NITRO_NBD_H

#include <stddef.h>
#include <stdint.h>

struct nbd_handle;
struct nitro_nbd;
struct nitro_ring;
struct nitro_vq;
struct nitro_blk_params;
struct nitro_blk_stats;

/* What the server offers on a connected handle. */
struct nitro_nbd_info {
    uint64_t size;            /* bytes */
    uint32_t readonly;
    uint32_t can_flush;
    uint32_t can_trim;
    uint32_t can_zero;
    uint32_t can_multi_conn;  /* connections share one cache (flush covers all) */
    uint32_t can_fua;
    uint32_t min_block;       /* the server's block size constraints (0: none) */
    uint32_t max_block;
};

/* A connection's counters (the worker counts; read any time). */
struct nitro_nbd_stats {
    uint64_t connected;       /* 1 while the worker holds a live handle */
    uint64_t connects;        /* handles taken */
    uint64_t disconnects;     /* handles found dead (or hung up on) */
    uint64_t resent;          /* requests sent again on a new connection */
    uint64_t timeouts;        /* requests failed after io_timeout */
    uint64_t guest_writes;    /* writes sent from guest memory, not copied */
};

/* Connect (blocking) to an nbd:// or nbds:// URI with the TLS material
 * given (NULL: none), the handshake done within timeout_ns. NULL on
 * failure, with libnbd's message in err (errnum ETIMEDOUT: no answer in
 * time, the connection hung up). */
struct nbd_handle *nitro_nbd_connect(const char *uri, const char *tls_psk_file,
                                     const char *tls_username,
                                     const char *tls_certificates, uint64_t timeout_ns,
                                     char *err, size_t errlen, int *errnum);
int nitro_nbd_info(struct nbd_handle *h, struct nitro_nbd_info *out);
/* Blocking reads and writes on a handle the caller owns (headers of an
 * encrypted volume), each command answered within timeout_ns or the
 * connection hung up. 0, or -1 (failed) or -2 (no answer in time, hung
 * up) with the message in err. */
int nitro_nbd_pread(struct nbd_handle *h, void *buf, size_t count, uint64_t offset,
                    uint64_t timeout_ns, char *err, size_t errlen);
int nitro_nbd_pwrite(struct nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                     uint64_t timeout_ns, char *err, size_t errlen);
void nitro_nbd_close(struct nbd_handle *h);

/* One queue's connection. want_fd (the caller's eventfd) is written when
 * it needs a handle, or has one to close; io_timeout_ns > 0. NULL when out
 * of memory (or no eventfd). */
struct nitro_nbd *nitro_nbd_new(int want_fd, uint64_t io_timeout_ns);
/* Closes every handle it holds; its ring must be detached and freed. */
void nitro_nbd_free(struct nitro_nbd *c);
/* Hand over a connected handle (ownership passes). NITRO_ERR_ARG when one
 * is offered already. */
int nitro_nbd_offer(struct nitro_nbd *c, struct nbd_handle *h);
/* 1 when it has no live handle and none is offered. */
int nitro_nbd_wants(const struct nitro_nbd *c);
/* Close the handle the worker retired, if any. */
void nitro_nbd_reap(struct nitro_nbd *c);
/* Only while its ring is detached: flush the live handle (blocking, at
 * most timeout_ns). 0, 1 when there is no live handle, -1 (the server
 * failed it: libnbd's message in err), or -2: no answer in time, and the
 * connection is hung up. */
int nitro_nbd_flush(struct nitro_nbd *c, uint64_t timeout_ns, char *err, size_t errlen);
void nitro_nbd_stats(const struct nitro_nbd *c, struct nitro_nbd_stats *out);

/* A virtio-blk ring (kind NITRO_RING_BLK) whose I/O goes to c's export:
 * params as for nitro_ring_blk_new except fd (unused); data_offset is
 * where sector 0 is in the export. NULL: bad params or out of memory. */
struct nitro_ring *nitro_ring_nbd_new(struct nitro_vq *vq,
                                      const struct nitro_blk_params *params,
                                      struct nitro_blk_stats *stats,
                                      struct nitro_nbd *c);

#endif
