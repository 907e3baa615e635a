/*
 * nitro_vring_internal.h: what the two ring layouts share inside the ring
 * code, and nothing else includes: struct nitro_vq itself, the guest
 * memory accessors, and the chain builder. nitro_vring.c holds the split
 * layout (virtio 1.2 section 2.7), the control-plane setters and the
 * layout-independent parts; nitro_vring_packed.c the packed layout (2.8).
 * Device code and the engine see only nitro_vring.h: which layout a queue
 * uses is decided by VIRTIO_F_RING_PACKED at SET_FEATURES time and
 * dispatched inside nitro_vq_pop, push, unpop, notify and the notify switches.
 */
#ifndef NITRO_VRING_INTERNAL_H
#define NITRO_VRING_INTERNAL_H

#include <endian.h>
#include <stdatomic.h>
#include <string.h>

#include "nitro_vring.h"

#define VIRTIO_F_RING_PACKED 34
#define DESC_SIZE 16

/* The packed-ring state a split queue does not need (about 40 KiB),
 * allocated the first time a queue negotiates VIRTIO_F_RING_PACKED. */
struct nitro_vq_packed;

struct nitro_vq {
    uint32_t index;
    uint32_t num;
    uint64_t features;
    bool packed;                /* VIRTIO_F_RING_PACKED negotiated */
    bool addr_set;
    uint64_t desc_uaddr, avail_uaddr, used_uaddr;
    const struct nitro_mem *mem;
    /* Split: descriptor table, avail ring, used ring. Packed: descriptor
     * ring, driver event suppression (read), device event suppression
     * (written): SET_VRING_ADDR's desc, avail and used. */
    const uint8_t *desc;
    const uint8_t *avail;
    uint8_t *used;
    /* Split: free-running 16-bit indices. Packed: ring position in bits
     * 0-14 and the wrap counter in bit 15 (vhost-user's encoding). */
    uint16_t last_avail_idx;    /* next avail slot we will consume */
    uint16_t shadow_avail_idx;  /* split: last avail->idx read and checked */
    uint16_t used_idx;          /* next used slot we will fill */
    uint16_t unpushed;          /* chains popped since the last push */
    uint16_t signalled_used;    /* used_idx at the last call (EVENT_IDX) */
    bool signalled_used_valid;
    uint16_t used_flags;        /* split: our copy: the guest must not own them */
    uint32_t unsignalled;       /* packed: descriptors used since the last call */
    int kick_fd, call_fd;
    int stop_fd;                /* eventfd that wakes poll() on stop */
    atomic_bool stop;
    uint32_t fault;
    struct nitro_vq_stats stats;
    /* Inflight tracking: the region (NULL: none) and its size, whether the
     * next pop must first check it (after a new region, base, ring address
     * or layout), the fetch counter, and (split) the heads to serve again
     * before the avail ring, oldest first. */
    void *inflight;
    uint64_t inflight_size;
    bool inflight_check;
    uint64_t inflight_counter;
    uint32_t resubmit_n, resubmit_pos;
    uint16_t resubmit[NITRO_MAX_QUEUE_SIZE];
    struct nitro_vq_packed *pk;
    struct nitro_chain chain;   /* scratch for nitro_vq_pop() */
};

/* ---- guest memory accessors ------------------------------------------- */

static inline uint16_t guest_ld16(const uint8_t *p)
{
    return le16toh(__atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED));
}

static inline void guest_st16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, htole16(v), __ATOMIC_RELAXED);
}

static inline void guest_st32(uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, htole32(v), __ATOMIC_RELAXED);
}

/* Inflight regions: written by us, read back after a crash; single untorn
 * stores and loads (vhost-user "Inflight I/O tracking"). */
static inline void region_st8(uint8_t *p, uint8_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline void region_st16(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, htole16(v), __ATOMIC_RELAXED);
}

static inline void region_st32(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, htole32(v), __ATOMIC_RELAXED);
}

static inline void region_st64(uint64_t *p, uint64_t v)
{
    __atomic_store_n(p, htole64(v), __ATOMIC_RELAXED);
}

static inline uint8_t region_ld8(const uint8_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline uint16_t region_ld16(const uint16_t *p)
{
    return le16toh(__atomic_load_n(p, __ATOMIC_RELAXED));
}

static inline uint32_t region_ld32(const uint32_t *p)
{
    return le32toh(__atomic_load_n(p, __ATOMIC_RELAXED));
}

static inline uint64_t region_ld64(const uint64_t *p)
{
    return le64toh(__atomic_load_n(p, __ATOMIC_RELAXED));
}

static inline bool has_feature(const struct nitro_vq *vq, unsigned bit)
{
    return (vq->features >> bit) & 1;
}

/* Reset a chain's header before a walk (the iovec array is overwritten). */
static inline void chain_reset(struct nitro_chain *c, uint16_t head)
{
    c->head = head;
    c->n_out = c->n_in = 0;
    c->out_len = c->in_len = 0;
    c->n_desc = 0;
    c->max_desc_len = 0;
}

/* Append one data descriptor (gpa, len) to the chain as one iovec per
 * memory region; *seen_write enforces "device-readable first" (2.7.4.2,
 * 2.8.7). 0 or NITRO_ERR_GUEST (the fault is set). */
NITRO_INTERNAL int nitro_chain_add(struct nitro_vq *vq, struct nitro_chain *c,
                                   uint64_t gpa, uint32_t len, bool writable,
                                   bool *seen_write);

/* ---- the packed layout (nitro_vring_packed.c) ---------------------------- */

/* 0, or NITRO_ERR_NOMEM: the packed state for a queue that negotiated it. */
NITRO_INTERNAL int nitro_vq_packed_init(struct nitro_vq *vq);
/* Forget the chains in flight (new base, reset). */
NITRO_INTERNAL void nitro_vq_packed_clear(struct nitro_vq *vq);
NITRO_INTERNAL int nitro_vq_packed_pop(struct nitro_vq *vq,
                                       struct nitro_chain **out);
NITRO_INTERNAL void nitro_vq_packed_unpop(struct nitro_vq *vq, uint16_t n);
NITRO_INTERNAL void nitro_vq_packed_push_batch(struct nitro_vq *vq,
                                               const uint16_t *ids,
                                               const uint32_t *lens,
                                               uint32_t n);
NITRO_INTERNAL bool nitro_vq_packed_wants_call(struct nitro_vq *vq);
NITRO_INTERNAL void nitro_vq_packed_disable_notify(struct nitro_vq *vq);
NITRO_INTERNAL int nitro_vq_packed_enable_notify(struct nitro_vq *vq);
/* Bytes of a packed inflight region holding n entries. */
NITRO_INTERNAL uint64_t nitro_vq_packed_region_size(uint32_t n);
/* Entries a region of size bytes holds in the queue's layout. */
NITRO_INTERNAL uint64_t nitro_vq_inflight_capacity(const struct nitro_vq *vq,
                                                   uint64_t size);

#endif
