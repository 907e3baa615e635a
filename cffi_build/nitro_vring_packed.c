/*
 * nitro_vring_packed.c: the device side of a packed virtqueue (virtio 1.2
 * section 2.8) behind the same internal API as split rings (nitro_vring.h):
 * nitro_vring.c dispatches here when VIRTIO_F_RING_PACKED was negotiated.
 *
 * One ring of num 16-byte descriptors is written by both sides. The driver
 * makes a descriptor available by setting its AVAIL flag to its wrap
 * counter and USED to the inverse; a chain is consecutive descriptors
 * linked by NEXT whose first one is made available last (2.8.6), so once
 * the head is seen the whole chain is there. The device writes one used
 * descriptor per chain (buffer id, written length, AVAIL = USED = its own
 * wrap counter) at its used position, in completion order, and then skips
 * as many slots as the chain had descriptors (2.8.2). Positions are kept as
 * vhost-user encodes them: slot in bits 0-14, wrap counter in bit 15.
 *
 * The same rules as split rings: every guest value is loaded once and
 * checked, a bad one is a typed fault (NITRO_FAULT_*), and each barrier
 * says what it orders. What the guest can get wrong here:
 * - the descriptor after a NEXT is not available: AVAIL_IDX (the ring's
 *   state is inconsistent, as a split avail->idx that jumps);
 * - more descriptors in flight than the ring holds: AVAIL_IDX;
 * - a list longer than the ring (2.8.17): DESC_LOOP;
 * - a buffer id >= num, or one already in flight: DESC_INDEX;
 * - INDIRECT chained or inside a list, not negotiated, or a bad table
 *   (2.8.19, 2.8.20): INDIRECT.
 * Event suppression (2.8.10, 2.8.14) uses the driver area (read: when to
 * call) and the device area (written: when to kick).
 *
 * Inflight I/O tracking uses vhost-user.rst's packed layout
 * (QueueRegionPacked / DescStatePacked): each fetched chain's descriptors
 * are copied into entries taken from a free list, because used
 * descriptors written out of order overwrite ring slots of chains still in
 * flight; completions return the entries, and old_* fields let a restart
 * either commit or roll back a batch torn by a crash. We keep private
 * copies of everything we wrote (free list links, entry of each id), so
 * the region is only read when (re)starting.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "nitro_vring_internal.h"

/* 2.8.1, 2.8.6: descriptor flags beyond the split ones. */
#define VIRTQ_DESC_F_AVAIL (1u << 7)
#define VIRTQ_DESC_F_USED (1u << 15)
/* struct pvirtq_desc (2.8.13), as byte offsets. */
#define PDESC_LEN 8
#define PDESC_ID 12
#define PDESC_FLAGS 14
/* struct pvirtq_event_suppress (2.8.14), as byte offsets, and its flags. */
#define EVENT_OFF_WRAP 0
#define EVENT_FLAGS 2
#define RING_EVENT_FLAGS_ENABLE 0x0
#define RING_EVENT_FLAGS_DISABLE 0x1
#define RING_EVENT_FLAGS_DESC 0x2
#define WRAP_BIT 0x8000u

struct pvirtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};

/* vhost-user.rst "Inflight I/O tracking", packed virtqueue. */
struct inflight_pdesc {
    uint8_t inflight;
    uint8_t padding;
    uint16_t next;
    uint16_t last;
    uint16_t num;
    uint64_t counter;
    uint16_t id;
    uint16_t flags;
    uint32_t len;
    uint64_t addr;
};

struct inflight_pregion {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t free_head;
    uint16_t old_free_head;
    uint16_t used_idx;
    uint16_t old_used_idx;
    uint8_t used_wrap_counter;
    uint8_t old_used_wrap_counter;
    uint8_t padding[7];
    struct inflight_pdesc desc[];
};

#define INFLIGHT_VERSION 1

_Static_assert(sizeof(struct inflight_pdesc) == 32, "DescStatePacked is 32 bytes");
_Static_assert(sizeof(struct inflight_pregion) == 32, "QueueRegionPacked header is 32 bytes");

/* A chain found in flight at restart: its descriptors were copied out of
 * the region into resubmit_desc[first, first + count). */
struct resubmit {
    uint64_t counter;
    uint16_t entry;
    uint16_t id;
    uint16_t first;
    uint16_t count;
};

struct nitro_vq_packed {
    /* By buffer id: ring descriptors of its chain while in flight, else 0. */
    uint16_t ndescs[NITRO_MAX_QUEUE_SIZE];
    /* For unpop: the avail position before each pop since the last push,
     * and the id it gave. */
    uint16_t pop_pos[NITRO_MAX_QUEUE_SIZE];
    uint16_t pop_id[NITRO_MAX_QUEUE_SIZE];
    /* The ring descriptors of the chain being popped, copied once. */
    struct pvirtq_desc descs[NITRO_MAX_QUEUE_SIZE];
    /* Inflight tracking: our copies of the region's free list links and
     * free_head, and by buffer id the entries holding its first and last
     * descriptor. */
    uint16_t next[NITRO_MAX_QUEUE_SIZE];
    uint16_t free_head;
    uint16_t entry[NITRO_MAX_QUEUE_SIZE];
    uint16_t last[NITRO_MAX_QUEUE_SIZE];
    uint16_t done_entry[NITRO_MAX_QUEUE_SIZE];  /* head entries of a push */
    uint32_t resubmit_n, resubmit_pos;
    struct resubmit resubmit[NITRO_MAX_QUEUE_SIZE];
    struct pvirtq_desc resubmit_desc[NITRO_MAX_QUEUE_SIZE];
};

int nitro_vq_packed_init(struct nitro_vq *vq)
{
    if (vq->pk == NULL)
        vq->pk = calloc(1, sizeof(*vq->pk));
    return vq->pk == NULL ? NITRO_ERR_NOMEM : NITRO_OK;
}

void nitro_vq_packed_clear(struct nitro_vq *vq)
{
    if (vq->pk == NULL)
        return;
    memset(vq->pk->ndescs, 0, sizeof(vq->pk->ndescs));
    vq->pk->resubmit_n = vq->pk->resubmit_pos = 0;
}

uint64_t nitro_vq_packed_region_size(uint32_t n)
{
    return sizeof(struct inflight_pregion) +
           (uint64_t)n * sizeof(struct inflight_pdesc);
}

/* ---- positions ---------------------------------------------------------- */

static inline uint16_t slot_of(uint16_t pw)
{
    return pw & 0x7FFF;
}

static inline bool wrap_of(uint16_t pw)
{
    return pw & WRAP_BIT;
}

/* pw moved on by k <= num slots, flipping the wrap counter past the end. */
static uint16_t advance(const struct nitro_vq *vq, uint16_t pw, uint32_t k)
{
    uint32_t slot = slot_of(pw) + k;
    uint16_t wrap = pw & WRAP_BIT;
    while (slot >= vq->num) {
        slot -= vq->num;
        wrap ^= WRAP_BIT;
    }
    return (uint16_t)slot | wrap;
}

/* (slot, wrap) as a point on the circle of 2*num such pairs, so that
 * distances and event windows are plain modular arithmetic. */
static uint32_t linear(const struct nitro_vq *vq, uint16_t pw)
{
    return slot_of(pw) + (wrap_of(pw) ? 0 : vq->num);
}

static uint32_t distance(const struct nitro_vq *vq, uint16_t from, uint16_t to)
{
    uint32_t m = 2 * vq->num;
    return (linear(vq, to) + m - linear(vq, from)) % m;
}

/* 2.8.1: available for the driver's lap `wrap` when AVAIL matches it and
 * USED does not. */
static inline bool is_avail(uint16_t flags, bool wrap)
{
    return !!(flags & VIRTQ_DESC_F_AVAIL) == wrap &&
           !!(flags & VIRTQ_DESC_F_USED) != wrap;
}

static inline uint16_t ring_flags(const struct nitro_vq *vq, uint16_t slot)
{
    return guest_ld16(vq->desc + (size_t)slot * DESC_SIZE + PDESC_FLAGS);
}

/* Copy descriptor i of a table once (see read_desc in nitro_vring.c). */
static void read_pdesc(const uint8_t *table, uint32_t i, struct pvirtq_desc *d)
{
    memcpy(d, table + (size_t)i * DESC_SIZE, sizeof(*d));
    __asm__ __volatile__("" ::: "memory");
    d->addr = le64toh(d->addr);
    d->len = le32toh(d->len);
    d->id = le16toh(d->id);
    d->flags = le16toh(d->flags);
}

/* ---- chains ------------------------------------------------------------- */

/* Copy the list starting at `start` (whose flags were loaded and found
 * available) into pk->descs; *n = its length. */
static int read_list(struct nitro_vq *vq, uint16_t start, uint16_t flags,
                     uint32_t *n)
{
    uint16_t pw = start;
    for (uint32_t k = 0;; k++) {
        struct pvirtq_desc *d = &vq->pk->descs[k];
        read_pdesc(vq->desc, slot_of(pw), d);
        d->flags = flags;  /* the value we checked, not a second read */
        if (!(flags & VRING_DESC_F_NEXT)) {
            *n = k + 1;
            return NITRO_OK;
        }
        /* 2.8.17: a list longer than the ring cannot be (it would run into
         * its own head, or into descriptors already consumed). */
        if (k + 1 == vq->num)
            return nitro_vq_set_fault(vq, NITRO_FAULT_DESC_LOOP);
        pw = advance(vq, pw, 1);
        flags = ring_flags(vq, slot_of(pw));
        /* 2.8.6: the driver makes the first descriptor of a list available
         * after all the others, and we read the head with acquire. */
        if (!is_avail(flags, wrap_of(pw)))
            return nitro_vq_set_fault(vq, NITRO_FAULT_AVAIL_IDX);
    }
}

/* 2.8.19: an indirect table of len / 16 pvirtq_desc, walked in order; only
 * WRITE counts in its entries (the other flags and the id are reserved). */
static int walk_indirect(struct nitro_vq *vq, const struct pvirtq_desc *d,
                         struct nitro_chain *c)
{
    if (!has_feature(vq, VIRTIO_RING_F_INDIRECT_DESC) || d->len == 0 ||
        d->len % DESC_SIZE != 0 || d->len / DESC_SIZE > NITRO_MAX_QUEUE_SIZE)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INDIRECT);
    const uint8_t *table = nitro_mem_gpa_to_host(vq->mem, d->addr, d->len);
    if (table == NULL)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INDIRECT);
    bool seen_write = false;
    for (uint32_t i = 0; i < d->len / DESC_SIZE; i++) {
        struct pvirtq_desc e;
        read_pdesc(table, i, &e);
        int rc = nitro_chain_add(vq, c, e.addr, e.len,
                                 e.flags & VRING_DESC_F_WRITE, &seen_write);
        if (rc != NITRO_OK)
            return rc;
    }
    return NITRO_OK;
}

/* The iovecs of a list of n ring descriptors (copies). */
static int walk_list(struct nitro_vq *vq, const struct pvirtq_desc *d,
                     uint32_t n, struct nitro_chain *c)
{
    chain_reset(c, 0);
    /* 2.8.20: an indirect descriptor stands alone, never in a list. */
    if (d[0].flags & VRING_DESC_F_INDIRECT) {
        if (n != 1)
            return nitro_vq_set_fault(vq, NITRO_FAULT_INDIRECT);
        return walk_indirect(vq, &d[0], c);
    }
    bool seen_write = false;
    for (uint32_t k = 0; k < n; k++) {
        if (d[k].flags & VRING_DESC_F_INDIRECT)
            return nitro_vq_set_fault(vq, NITRO_FAULT_INDIRECT);
        int rc = nitro_chain_add(vq, c, d[k].addr, d[k].len,
                                 d[k].flags & VRING_DESC_F_WRITE, &seen_write);
        if (rc != NITRO_OK)
            return rc;
    }
    return NITRO_OK;
}

static int inflight_restart(struct nitro_vq *vq);
static int inflight_fetched(struct nitro_vq *vq, uint16_t id, uint32_t n);

static int resubmit_next(struct nitro_vq *vq, struct nitro_chain **out)
{
    struct nitro_vq_packed *pk = vq->pk;
    const struct resubmit *r = &pk->resubmit[pk->resubmit_pos];
    int rc = walk_list(vq, &pk->resubmit_desc[r->first], r->count, &vq->chain);
    if (rc != NITRO_OK)
        return rc;
    pk->resubmit_pos++;
    vq->chain.head = r->id;
    vq->chain.resubmitted = true;
    *out = &vq->chain;
    return 1;
}

int nitro_vq_packed_pop(struct nitro_vq *vq, struct nitro_chain **out)
{
    struct nitro_vq_packed *pk = vq->pk;
    if (vq->inflight != NULL && vq->inflight_check) {
        int rc = inflight_restart(vq);
        if (rc != NITRO_OK)
            return rc;
    }
    if (pk->resubmit_pos < pk->resubmit_n)
        return resubmit_next(vq, out);
    uint16_t start = vq->last_avail_idx;
    /* A base for a bigger ring (the size changed after SET_VRING_BASE). */
    if (slot_of(start) >= vq->num || slot_of(vq->used_idx) >= vq->num)
        return nitro_vq_set_fault(vq, NITRO_FAULT_AVAIL_IDX);
    uint16_t flags = ring_flags(vq, slot_of(start));
    if (!is_avail(flags, wrap_of(start)))
        return 0;
    /* Acquire: the list and its buffers, written before the head's flags,
     * must not be read ahead of them. */
    atomic_thread_fence(memory_order_acquire);
    uint32_t n = 0;
    int rc = read_list(vq, start, flags, &n);
    if (rc != NITRO_OK)
        return rc;
    /* Chains consumed and not yet used occupy the slots from used_idx on:
     * never more than the ring holds. */
    if (distance(vq, vq->used_idx, start) + n > vq->num)
        return nitro_vq_set_fault(vq, NITRO_FAULT_AVAIL_IDX);
    /* 2.8.6: the buffer id is in the last descriptor of the list. */
    uint16_t id = pk->descs[n - 1].id;
    if (id >= vq->num || pk->ndescs[id] != 0)
        return nitro_vq_set_fault(vq, NITRO_FAULT_DESC_INDEX);
    rc = walk_list(vq, pk->descs, n, &vq->chain);
    if (rc != NITRO_OK)
        return rc;
    if (vq->inflight != NULL && (rc = inflight_fetched(vq, id, n)) != NITRO_OK)
        return rc;
    vq->chain.head = id;
    vq->chain.resubmitted = false;
    pk->ndescs[id] = (uint16_t)n;
    if (vq->unpushed < vq->num) {
        pk->pop_pos[vq->unpushed] = start;
        pk->pop_id[vq->unpushed] = id;
        vq->unpushed++;
    }
    vq->last_avail_idx = advance(vq, start, n);
    *out = &vq->chain;
    return 1;
}

void nitro_vq_packed_unpop(struct nitro_vq *vq, uint16_t n)
{
    /* The caller clamped n to the chains popped since the last push. */
    struct nitro_vq_packed *pk = vq->pk;
    if (n == 0)
        return;
    for (uint16_t k = vq->unpushed - n; k < vq->unpushed; k++)
        pk->ndescs[pk->pop_id[k]] = 0;
    vq->unpushed -= n;
    vq->last_avail_idx = pk->pop_pos[vq->unpushed];
}

/* ---- used descriptors ---------------------------------------------------- */

static void inflight_batch_links(struct nitro_vq *vq, const uint16_t *ids,
                                 uint32_t n);
static void inflight_batch_used(struct nitro_vq *vq);
static void inflight_batch_end(struct nitro_vq *vq, uint32_t done);

static bool was_popped(const struct nitro_vq *vq, uint16_t id)
{
    return id < vq->num && vq->pk->ndescs[id] != 0;
}

void nitro_vq_packed_push_batch(struct nitro_vq *vq, const uint16_t *ids,
                                const uint32_t *lens, uint32_t n)
{
    struct nitro_vq_packed *pk = vq->pk;
    /* The descriptor ring is written by the device too (2.8). */
    uint8_t *ring = (uint8_t *)vq->desc;
    uint8_t *first = NULL;
    uint16_t first_flags = 0;
    uint32_t done = 0;
    if (vq->inflight != NULL)
        inflight_batch_links(vq, ids, n);
    for (uint32_t i = 0; i < n; i++) {
        if (!was_popped(vq, ids[i]))
            continue;  /* not ours to complete: nothing to write */
        uint8_t *d = ring + (size_t)slot_of(vq->used_idx) * DESC_SIZE;
        guest_st32(d + PDESC_LEN, lens[i]);
        guest_st16(d + PDESC_ID, ids[i]);
        /* 2.8.1: AVAIL = USED = our wrap counter; 2.8.4: WRITE when
         * something was written into the buffer. */
        uint16_t flags = (wrap_of(vq->used_idx)
                              ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0) |
                         (lens[i] != 0 ? VRING_DESC_F_WRITE : 0);
        /* 2.8.11: the driver polls the first slot; it reads on only once
         * that one is used, so it is published last (one release below). */
        if (first == NULL) {
            first = d;
            first_flags = flags;
        } else {
            guest_st16(d + PDESC_FLAGS, flags);
        }
        vq->used_idx = advance(vq, vq->used_idx, pk->ndescs[ids[i]]);
        vq->unsignalled += pk->ndescs[ids[i]];
        pk->ndescs[ids[i]] = 0;
        /* At most num: ids in flight are distinct, a repeat is skipped. */
        pk->done_entry[done++] = pk->entry[ids[i]];
    }
    vq->unpushed = 0;
    if (first == NULL)
        return;
    if (vq->inflight != NULL)
        inflight_batch_used(vq);
    /* Release: the other used descriptors and the data/status bytes
     * written into the buffers before the flags that expose them. */
    atomic_thread_fence(memory_order_release);
    guest_st16(first + PDESC_FLAGS, first_flags);
    if (vq->inflight != NULL)
        inflight_batch_end(vq, done);
    nitro_stat_add(&vq->stats.chains, done);
}

/* ---- notifications (2.8.10, 2.8.14, 2.8.21) ------------------------------- */

bool nitro_vq_packed_wants_call(struct nitro_vq *vq)
{
    uint16_t old = vq->signalled_used;
    bool valid = vq->signalled_used_valid;
    uint32_t moved = vq->unsignalled;
    vq->signalled_used = vq->used_idx;
    vq->signalled_used_valid = true;
    vq->unsignalled = 0;
    uint16_t flags = guest_ld16(vq->avail + EVENT_FLAGS) & 3;
    if (flags == RING_EVENT_FLAGS_DISABLE)
        return false;
    /* ENABLE, the reserved value, or DESC without EVENT_IDX: call (a
     * spurious call costs little, a missed one hangs the driver). */
    if (flags != RING_EVENT_FLAGS_DESC ||
        !has_feature(vq, VIRTIO_RING_F_EVENT_IDX))
        return true;
    /* After set_base we do not know what the driver last saw; after two
     * laps the window below would wrap. */
    if (!valid || moved >= 2 * vq->num)
        return true;
    uint16_t off_wrap = guest_ld16(vq->avail + EVENT_OFF_WRAP);
    if (slot_of(off_wrap) >= vq->num)
        return true;
    /* Call when the descriptor the driver named was used since the last
     * call, i.e. lies in [old, new) on the 2*num circle (2.7.10's
     * vring_need_event with wrap counters). */
    uint32_t m = 2 * vq->num;
    uint32_t event = linear(vq, off_wrap), now = linear(vq, vq->used_idx);
    return (now + m - event - 1) % m < (now + m - linear(vq, old)) % m;
}

void nitro_vq_packed_disable_notify(struct nitro_vq *vq)
{
    guest_st16(vq->used + EVENT_FLAGS, RING_EVENT_FLAGS_DISABLE);
}

int nitro_vq_packed_enable_notify(struct nitro_vq *vq)
{
    uint16_t start = vq->last_avail_idx;
    if (slot_of(start) >= vq->num)
        return nitro_vq_set_fault(vq, NITRO_FAULT_AVAIL_IDX);
    if (has_feature(vq, VIRTIO_RING_F_EVENT_IDX)) {
        /* Kick when the descriptor we will read next is made available. */
        guest_st16(vq->used + EVENT_OFF_WRAP, start);
        /* Release: the offset before the flags that make it count. */
        atomic_thread_fence(memory_order_release);
        guest_st16(vq->used + EVENT_FLAGS, RING_EVENT_FLAGS_DESC);
    } else {
        guest_st16(vq->used + EVENT_FLAGS, RING_EVENT_FLAGS_ENABLE);
    }
    /* Full barrier: the store above must be visible before we re-read the
     * next descriptor's flags; otherwise the driver may make it available,
     * read the stale suppression and skip the kick while we read stale
     * flags and sleep. */
    atomic_thread_fence(memory_order_seq_cst);
    return is_avail(ring_flags(vq, slot_of(start)), wrap_of(start)) ? 1 : 0;
}

/* ---- inflight I/O tracking, packed layout ---------------------------------- */

static struct inflight_pregion *region(const struct nitro_vq *vq)
{
    return vq->inflight;
}

/* "When receiving available buffers": copy the n descriptors into entries
 * taken from the free list, head entry first; mark the head in flight;
 * then commit with old_free_head. A crash before that commit leaves the
 * chain to be fetched again from the ring (restart rolls free_head back
 * and clears the flags of free entries). */
static int inflight_fetched(struct nitro_vq *vq, uint16_t id, uint32_t n)
{
    struct nitro_vq_packed *pk = vq->pk;
    struct inflight_pregion *r = region(vq);
    uint16_t head = pk->free_head, e = head, last = head;
    for (uint32_t k = 0; k < n; k++) {
        /* Entries in use never exceed the descriptors in flight (<= num):
         * only a region the frontend rewrote under us gets here. */
        if (e >= vq->num)
            return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
        struct inflight_pdesc *d = &r->desc[e];
        const struct pvirtq_desc *s = &pk->descs[k];
        region_st64(&d->addr, s->addr);
        region_st32(&d->len, s->len);
        region_st16(&d->id, s->id);
        region_st16(&d->flags, s->flags);
        last = e;
        e = pk->next[e];
    }
    struct inflight_pdesc *h = &r->desc[head];
    region_st16(&h->num, (uint16_t)n);
    region_st16(&h->last, last);
    region_st64(&h->counter, ++vq->inflight_counter);
    /* Release: the copies and the head's fields before its flag, and the
     * flag before the free list moves past the chain. */
    __atomic_store_n(&h->inflight, 1, __ATOMIC_RELEASE);
    atomic_thread_fence(memory_order_release);
    region_st16(&r->free_head, e);
    region_st16(&r->old_free_head, e);
    pk->free_head = e;
    pk->entry[id] = head;
    pk->last[id] = last;
    return NITRO_OK;
}

/* "When supplying used buffers", steps 1-4: give each chain's entries back
 * to the free list (the chain's last entry links to the old free head). */
static void inflight_batch_links(struct nitro_vq *vq, const uint16_t *ids,
                                 uint32_t n)
{
    struct nitro_vq_packed *pk = vq->pk;
    struct inflight_pregion *r = region(vq);
    for (uint32_t i = 0; i < n; i++) {
        if (!was_popped(vq, ids[i]))
            continue;
        uint16_t e = pk->entry[ids[i]], l = pk->last[ids[i]];
        region_st16(&r->desc[l].next, pk->free_head);
        pk->next[l] = pk->free_head;
        pk->free_head = e;
    }
    region_st16(&r->free_head, pk->free_head);
}

/* Step 5, before the used descriptors are published: the new used index.
 * A crash from here to the end of inflight_batch_end() leaves used_idx !=
 * old_used_idx, and restart looks at the first slot of the batch to know
 * whether the driver could see it. */
static void inflight_batch_used(struct nitro_vq *vq)
{
    struct inflight_pregion *r = region(vq);
    region_st16(&r->used_idx, slot_of(vq->used_idx));
    region_st8(&r->used_wrap_counter, wrap_of(vq->used_idx));
}

/* Steps 7-8, after publishing: clear the heads' flags, then commit. */
static void inflight_batch_end(struct nitro_vq *vq, uint32_t done)
{
    struct nitro_vq_packed *pk = vq->pk;
    struct inflight_pregion *r = region(vq);
    /* Release: the published flags before the entries are unmarked. */
    atomic_thread_fence(memory_order_release);
    for (uint32_t i = 0; i < done; i++)
        region_st8(&r->desc[pk->done_entry[i]].inflight, 0);
    /* Release: the flags before the commit that says they are right. */
    atomic_thread_fence(memory_order_release);
    region_st16(&r->old_free_head, pk->free_head);
    region_st16(&r->old_used_idx, slot_of(vq->used_idx));
    region_st8(&r->old_used_wrap_counter, wrap_of(vq->used_idx));
}

/* A region the frontend zeroed: take it over from the ring's base. */
static void inflight_init(struct nitro_vq *vq)
{
    struct nitro_vq_packed *pk = vq->pk;
    struct inflight_pregion *r = region(vq);
    for (uint32_t i = 0; i < vq->num; i++) {
        region_st8(&r->desc[i].inflight, 0);
        region_st16(&r->desc[i].next, (uint16_t)(i + 1));
        pk->next[i] = (uint16_t)(i + 1);
    }
    region_st64(&r->features, 0);
    region_st16(&r->desc_num, (uint16_t)vq->num);
    region_st16(&r->free_head, 0);
    region_st16(&r->old_free_head, 0);
    region_st16(&r->used_idx, slot_of(vq->used_idx));
    region_st16(&r->old_used_idx, slot_of(vq->used_idx));
    region_st8(&r->used_wrap_counter, wrap_of(vq->used_idx));
    region_st8(&r->old_used_wrap_counter, wrap_of(vq->used_idx));
    pk->free_head = 0;
    vq->inflight_counter = 0;
    /* Release: the fields above before the version that vouches for them. */
    atomic_thread_fence(memory_order_release);
    region_st16(&r->version, INFLIGHT_VERSION);
}

/* The committed state of the region's header, after "When reconnecting"
 * steps 1-2: commit a torn batch the driver could already see, else roll
 * back to old_*. Written back to the region; *used = slot | wrap. */
static int inflight_settle(struct nitro_vq *vq, uint16_t *used,
                           uint16_t *free_head)
{
    struct inflight_pregion *r = region(vq);
    uint16_t u = region_ld16(&r->used_idx), ou = region_ld16(&r->old_used_idx);
    uint8_t uw = region_ld8(&r->used_wrap_counter);
    uint8_t ouw = region_ld8(&r->old_used_wrap_counter);
    uint16_t f = region_ld16(&r->free_head), of = region_ld16(&r->old_free_head);
    if (u >= vq->num || ou >= vq->num || uw > 1 || ouw > 1 || f > vq->num ||
        of > vq->num)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
    /* The batch's first used descriptor goes to old_used_idx and is
     * published last: if it no longer looks available for that lap, the
     * driver may have seen the whole batch. */
    if ((u != ou || uw != ouw) && !is_avail(ring_flags(vq, ou), ouw)) {
        ou = u;
        ouw = uw;
        of = f;
        region_st16(&r->old_used_idx, ou);
        region_st8(&r->old_used_wrap_counter, ouw);
        region_st16(&r->old_free_head, of);
    }
    region_st16(&r->free_head, of);
    region_st16(&r->used_idx, ou);
    region_st8(&r->used_wrap_counter, ouw);
    *used = ou | (ouw ? WRAP_BIT : 0);
    *free_head = of;
    return NITRO_OK;
}

/* Copy the chain whose head entry is h into resubmit_desc, checking that it
 * is a well-formed list of entries no other chain and no free entry uses. */
static int inflight_collect(struct nitro_vq *vq, uint16_t h, uint8_t *owner,
                            uint32_t *used_descs)
{
    struct nitro_vq_packed *pk = vq->pk;
    struct inflight_pregion *r = region(vq);
    uint16_t n = region_ld16(&r->desc[h].num);
    uint16_t last = region_ld16(&r->desc[h].last);
    if (n == 0 || *used_descs + n > vq->num)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
    struct resubmit *s = &pk->resubmit[pk->resubmit_n];
    *s = (struct resubmit){.counter = region_ld64(&r->desc[h].counter),
                           .entry = h, .first = (uint16_t)*used_descs,
                           .count = n};
    uint16_t e = h;
    for (uint16_t k = 0; k < n; k++) {
        if (e >= vq->num || owner[e])
            return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
        owner[e] = 1;
        struct pvirtq_desc *d = &pk->resubmit_desc[*used_descs + k];
        d->addr = region_ld64(&r->desc[e].addr);
        d->len = region_ld32(&r->desc[e].len);
        d->id = region_ld16(&r->desc[e].id);
        d->flags = region_ld16(&r->desc[e].flags);
        /* NEXT on every descriptor but the last, as fetched. */
        if (!!(d->flags & VRING_DESC_F_NEXT) != (k + 1 < n))
            return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
        if (k + 1 < n)
            e = pk->next[e];
    }
    s->id = pk->resubmit_desc[*used_descs + n - 1].id;
    if (e != last || s->id >= vq->num || pk->ndescs[s->id] != 0)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
    pk->ndescs[s->id] = n;
    pk->entry[s->id] = h;
    pk->last[s->id] = last;
    *used_descs += n;
    pk->resubmit_n++;
    return NITRO_OK;
}

static int cmp_resubmit(const void *a, const void *b)
{
    const struct resubmit *x = a, *y = b;
    if (x->counter != y->counter)
        return x->counter < y->counter ? -1 : 1;
    /* Equal counters only come from a bad region: keep it deterministic. */
    return (x->entry > y->entry) - (x->entry < y->entry);
}

/* "When reconnecting": settle the header, clear the free entries' flags,
 * collect the chains still in flight (each entry read once, into private
 * copies), oldest first; the ring then resumes at the region's used index,
 * with the avail position as many descriptors further as are in flight. A
 * region the ring contradicts is a fault, never a crash. */
static int inflight_restart(struct nitro_vq *vq)
{
    struct nitro_vq_packed *pk = vq->pk;
    struct inflight_pregion *r = region(vq);
    vq->inflight_check = false;
    nitro_vq_packed_clear(vq);
    if (vq->num > nitro_vq_inflight_capacity(vq, vq->inflight_size) ||
        slot_of(vq->used_idx) >= vq->num)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
    uint16_t version = region_ld16(&r->version);
    if (version == 0) {
        inflight_init(vq);
        return NITRO_OK;
    }
    if (version != INFLIGHT_VERSION || region_ld16(&r->desc_num) != vq->num)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
    uint16_t used = 0, free_head = 0;
    int rc = inflight_settle(vq, &used, &free_head);
    if (rc != NITRO_OK)
        return rc;
    for (uint32_t i = 0; i < vq->num; i++)
        pk->next[i] = region_ld16(&r->desc[i].next);
    uint8_t owner[NITRO_MAX_QUEUE_SIZE] = {0};
    uint32_t steps = 0;
    for (uint16_t e = free_head; e < vq->num; e = pk->next[e]) {
        if (owner[e] || steps++ == vq->num)
            return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
        owner[e] = 1;
        region_st8(&r->desc[e].inflight, 0);
    }
    uint32_t descs = 0;
    uint64_t top = 0;
    for (uint16_t h = 0; h < vq->num; h++) {
        if (owner[h] || region_ld8(&r->desc[h].inflight) == 0)
            continue;
        rc = inflight_collect(vq, h, owner, &descs);
        if (rc != NITRO_OK)
            return rc;
        uint64_t c = pk->resubmit[pk->resubmit_n - 1].counter;
        top = c > top ? c : top;
    }
    qsort(pk->resubmit, pk->resubmit_n, sizeof(pk->resubmit[0]), cmp_resubmit);
    if (top > vq->inflight_counter)
        vq->inflight_counter = top;
    pk->free_head = free_head;
    /* The frontend's SET_VRING_BASE is stale after a crash (a packed ring
     * keeps no used index in guest memory): the region is the truth. */
    vq->used_idx = used;
    vq->last_avail_idx = advance(vq, used, descs);
    vq->unpushed = 0;
    return NITRO_OK;
}
