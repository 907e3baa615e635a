/*
 * nitro_rbd.h: virtio-blk volumes on Ceph RBD images (librbd's C API),
 * part of the C ABI (also a cffi cdef, see nitro.h).
 *
 * nitro_rbd_open connects to the cluster (librados), opens pool/image and,
 * unless read-only, takes the image's exclusive lock for good
 * (rbd_lock_acquire: unlike librbd's cooperative default, another client
 * asking for it is refused while this one lives), so two daemons never
 * write one volume. The ring (nitro_ring_blk_rbd_new) puts every request
 * in flight with librbd's aio calls from the worker; librbd completes them
 * on its own threads, which queue them and write an eventfd (the ring's
 * aux fd in the worker's epoll set); the worker writes the status and the
 * used ring. Data goes through a buffer of the request's own: librbd
 * itself never writes guest memory, which may vanish under it. nitro's
 * completion callback copies a plain read's data from that buffer into the
 * guest, guarded, and only while the request is still the guest's
 * (nitro_rbd.c, rbd_read_deliver).
 *
 * Failures: librbd's write-back cache is off (a write is acknowledged once
 * the OSDs have it). While the cluster is away librbd waits and resends on
 * its own; the ring answers IOERR for a request still unanswered
 * params->io_timeout_ns after it was sent, keeps its buffer until librbd
 * completes it, and gives the guest's queue a new slot meanwhile. Detach
 * waits for the guest's requests at most until their deadlines.
 */
#ifndef NITRO_RBD_H
#define NITRO_RBD_H

#include <stdint.h>

#include "nitro.h"

/* Which step of nitro_rbd_open failed (nitro_rbd_open's return value). */
#define NITRO_RBD_OK 0
#define NITRO_RBD_STAGE_CREATE 1   /* rados_create2 (the user name) */
#define NITRO_RBD_STAGE_CONF 2     /* reading ceph_conf, setting keyring */
#define NITRO_RBD_STAGE_CONNECT 3  /* rados_connect (mons, auth) */
#define NITRO_RBD_STAGE_POOL 4     /* rados_ioctx_create */
#define NITRO_RBD_STAGE_IMAGE 5    /* rbd_open */
#define NITRO_RBD_STAGE_LOCK 6     /* rbd_lock_acquire (exclusive) */
#define NITRO_RBD_STAGE_SIZE 7     /* rbd_get_size */
#define NITRO_RBD_STAGES 8
extern const char *const nitro_rbd_stage_names[NITRO_RBD_STAGES];

struct nitro_rbd;

#define NITRO_RBD_OWNER_MAX 128

/* Open pool/image as client `user` (e.g. "admin") with the cluster named
 * by `conf` (a ceph.conf path) and `keyring` (NULL or "": the conf's).
 * Returns NITRO_RBD_OK with *out set, or the NITRO_RBD_STAGE_* that failed
 * with *err the negative errno librados/librbd gave (-EBUSY/-EROFS at
 * STAGE_LOCK: another client holds the image's lock). `stale_owner` (NULL
 * or "": none) is the nitro_rbd_lock_owner of a previous daemon of this
 * volume that died: if it still holds the lock, the lock is broken (and
 * that client blocklisted) at once instead of after its watch times out.
 * Blocks (network): call it off the trio thread. */
int nitro_rbd_open(const char *conf, const char *user, const char *keyring,
                   const char *pool, const char *image, uint32_t readonly,
                   const char *stale_owner, struct nitro_rbd **out, int *err);
/* The image's size in bytes, read at open. */
uint64_t nitro_rbd_size(const struct nitro_rbd *v);
/* This client as the exclusive lock's owner ("ADDRESS" as librbd names
 * it); "" if read-only. */
const char *nitro_rbd_lock_owner(const struct nitro_rbd *v);
/* rbd_flush: every write acknowledged so far is on the OSDs; 0 or -errno. */
int nitro_rbd_flush(struct nitro_rbd *v);
/* Synchronous I/O for the control plane (a LUKS2 header: backends/luks.py),
 * never on a worker: read len bytes at byte off of the image into buf, or
 * write them and flush. 0, or -errno (-EINVAL: the range leaves the image;
 * -EIO: a short transfer). Blocks (network). */
int nitro_rbd_read(struct nitro_rbd *v, uint64_t off, uint64_t len, void *buf);
int nitro_rbd_write(struct nitro_rbd *v, uint64_t off, uint64_t len, const void *buf);
/* Release the lock, close the image, disconnect. No ring may use it. */
void nitro_rbd_close(struct nitro_rbd *v);

/* A virtio-blk ring on image v (params: limits, serial, and for an
 * encrypted volume xts and data_offset, where its data segment starts in
 * the image; fd unused). NULL if out of memory or an argument is invalid
 * (the segment must lie inside the image). */
struct nitro_ring *nitro_ring_blk_rbd_new(struct nitro_vq *vq, struct nitro_rbd *v,
                                          const struct nitro_blk_params *params,
                                          struct nitro_blk_stats *stats);

#endif
