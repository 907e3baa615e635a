/*
 * nitro_vring.c: the device side of a virtqueue: ring setup from vhost-user
 * messages for both layouts, and the split layout (virtio 1.2 section 2.7):
 * chain walking with indirect tables, the used ring, and notification
 * suppression (EVENT_IDX or the NO_NOTIFY / NO_INTERRUPT flags). The packed
 * layout (2.8) is nitro_vring_packed.c; the entry points of nitro_vring.h
 * dispatch to it when VIRTIO_F_RING_PACKED was negotiated.
 *
 * The rings live in memory the guest can rewrite at any moment. Rules:
 * - every guest value is loaded exactly once (relaxed atomics for ring
 *   fields, one copy per descriptor) and checked before use;
 * - a bad value marks the queue broken (vq->fault) rather than asserting;
 *   only nitro_vq_reset() repairs it;
 * - each memory barrier states what it orders.
 *
 * Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking", split
 * layout) lives at the end of this file: a queue with a region records each
 * head it fetches and each batch it completes there, and on (re)start
 * repairs the region and resubmits what was still in flight. The region is
 * shared with the frontend and must make sense after we are SIGKILLed at
 * any instruction, so its stores are ordered with release fences.
 *
 * Descriptors that cross from one memory region into an adjacent one are
 * split into one iovec per region (guest-physically contiguous buffers may
 * straddle DIMMs). Indirect tables, which we index as an array, must lie in
 * one region.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "nitro_efd.h"
#include "nitro_guard.h"
#include "nitro_iov.h"
#include "nitro_vring_internal.h"

__thread uint64_t nitro_batch_ns;

/* Split ring layout (2.7.5-2.7.8), as byte offsets. */
#define AVAIL_FLAGS 0
#define AVAIL_IDX 2
#define AVAIL_RING(i) (4 + 2 * (size_t)(i))
#define USED_FLAGS 0
#define USED_IDX 2
#define USED_RING(i) (4 + 8 * (size_t)(i))

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* vhost-user.rst "Inflight I/O tracking": QueueRegionSplit and its
 * DescStateSplit entries, 16 bytes each, little-endian like the host. */
struct inflight_desc {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

struct inflight_region {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct inflight_desc desc[];
};

#define INFLIGHT_HEADER sizeof(struct inflight_region)
#define INFLIGHT_DESC sizeof(struct inflight_desc)
#define INFLIGHT_VERSION 1

_Static_assert(sizeof(struct inflight_desc) == 16, "DescStateSplit is 16 bytes");
_Static_assert(sizeof(struct inflight_region) == 16, "QueueRegionSplit header is 16 bytes");

/* Copy descriptor i out of a table once. Indirect tables may be unaligned,
 * hence memcpy; the compiler barrier stops it from dropping the copy and
 * re-reading guest memory (which may have changed) at each later use. */
static void read_desc(const uint8_t *table, uint32_t i, struct vring_desc *d)
{
    memcpy(d, table + (size_t)i * DESC_SIZE, sizeof(*d));
    __asm__ __volatile__("" ::: "memory");
    d->addr = le64toh(d->addr);
    d->len = le32toh(d->len);
    d->flags = le16toh(d->flags);
    d->next = le16toh(d->next);
}


/* ---- lifecycle and control-plane setters ------------------------------- */

struct nitro_vq *nitro_vq_new(uint32_t index)
{
    struct nitro_vq *vq = calloc(1, sizeof(*vq));
    if (vq == NULL)
        return NULL;
    vq->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (vq->stop_fd < 0) {
        free(vq);
        return NULL;
    }
    vq->index = index;
    vq->kick_fd = -1;
    vq->call_fd = -1;
    atomic_init(&vq->stop, false);
    return vq;
}

void nitro_vq_free(struct nitro_vq *vq)
{
    if (vq == NULL)
        return;
    close(vq->stop_fd);
    free(vq->pk);
    free(vq);
}

struct ring_ptrs {
    const uint8_t *desc;
    const uint8_t *avail;
    uint8_t *used;
};

static bool host_overlap(const void *a, uint64_t alen, const void *b, uint64_t blen)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + blen && y < x + alen;
}

/* Translate and check the three ring parts for a ring of num entries.
 * Split (2.7): alignment 16/2/4, sizes 16*num, 6+2*num, 6+8*num. Packed
 * (2.8.10): descriptor ring 16*num aligned 16, then the driver and device
 * event suppression structures, 4 bytes aligned 4 each. */
static int translate_rings(const struct nitro_mem *mem, uint32_t num,
                           bool packed, uint64_t desc, uint64_t avail,
                           uint64_t used, struct ring_ptrs *out)
{
    uint64_t desc_len = (uint64_t)DESC_SIZE * num;
    uint64_t avail_len = packed ? 4 : 6 + 2 * (uint64_t)num;
    uint64_t used_len = packed ? 4 : 6 + 8 * (uint64_t)num;
    uint64_t avail_align = packed ? 4 : 2;
    if (mem == NULL || num == 0 || desc % 16 || avail % avail_align ||
        used % 4)
        return NITRO_ERR_ARG;
    out->desc = nitro_mem_uaddr_to_host(mem, desc, desc_len);
    out->avail = nitro_mem_uaddr_to_host(mem, avail, avail_len);
    out->used = nitro_mem_uaddr_to_host(mem, used, used_len);
    if (out->desc == NULL || out->avail == NULL || out->used == NULL)
        return NITRO_ERR_ARG;
    /* Ring fields are accessed with aligned atomics; a region whose
     * mmap_offset disagrees with its uaddr alignment would break that. */
    if ((uintptr_t)out->desc % 16 || (uintptr_t)out->avail % avail_align ||
        (uintptr_t)out->used % 4)
        return NITRO_ERR_ARG;
    /* The used ring (packed: the device event suppression) is a part only
     * the device writes. Over the avail ring every completion would also
     * bump avail->idx, a request the guest never made, and the device
     * would serve its own writes forever; over the descriptor table it
     * would rewrite chains. A driver that lays the rings out like that is
     * broken: refuse the layout (fuzz finding). A packed descriptor ring
     * is written by both sides by design. */
    if (host_overlap(out->used, used_len, out->avail, avail_len) ||
        host_overlap(out->used, used_len, out->desc, desc_len))
        return NITRO_ERR_ARG;
    return NITRO_OK;
}

static void attach_rings(struct nitro_vq *vq, const struct ring_ptrs *p)
{
    vq->desc = p->desc;
    vq->avail = p->avail;
    vq->used = p->used;
}

int nitro_vq_set_num(struct nitro_vq *vq, uint32_t num)
{
    if (vq == NULL || num == 0 || num > NITRO_MAX_QUEUE_SIZE ||
        (num & (num - 1)) != 0)
        return NITRO_ERR_ARG;
    if (vq->inflight != NULL &&
        num > nitro_vq_inflight_capacity(vq, vq->inflight_size))
        return NITRO_ERR_ARG;
    if (vq->addr_set) {
        /* The rings were checked for the old size; check them again. */
        struct ring_ptrs p;
        int rc = translate_rings(vq->mem, num, vq->packed, vq->desc_uaddr,
                                 vq->avail_uaddr, vq->used_uaddr, &p);
        if (rc != NITRO_OK)
            return rc;
        attach_rings(vq, &p);
    }
    vq->num = num;
    return NITRO_OK;
}

int nitro_vq_set_addr(struct nitro_vq *vq, const struct nitro_mem *mem,
                      uint64_t desc_uaddr, uint64_t avail_uaddr,
                      uint64_t used_uaddr)
{
    if (vq == NULL)
        return NITRO_ERR_ARG;
    struct ring_ptrs p;
    int rc = translate_rings(mem, vq->num, vq->packed, desc_uaddr,
                             avail_uaddr, used_uaddr, &p);
    if (rc != NITRO_OK)
        return rc;
    /* used->idx is ours to write; after a reconnect the value in guest
     * memory is where the previous backend stopped. Read on the control
     * plane's thread, before any worker looks at the ring: memory the
     * frontend truncated breaks the queue here, not the daemon. */
    struct nitro_guard g;
    if (NITRO_GUARD_ENTER(&g, nitro_guard_covers_mem, mem)) {
        nitro_guard_leave(&g);
        return nitro_vq_set_fault(vq, NITRO_FAULT_MEMORY);
    }
    uint16_t used_idx = guest_ld16(p.used + USED_IDX);
    nitro_guard_leave(&g);
    attach_rings(vq, &p);
    vq->mem = mem;
    vq->desc_uaddr = desc_uaddr;
    vq->avail_uaddr = avail_uaddr;
    vq->used_uaddr = used_uaddr;
    vq->addr_set = true;
    /* A packed ring keeps no used index in memory: SET_VRING_BASE carries it. */
    if (!vq->packed)
        vq->used_idx = used_idx;
    vq->inflight_check = true;
    return NITRO_OK;
}

bool nitro_vq_covers(const struct nitro_vq *vq, const void *addr)
{
    if (nitro_mem_covers(vq->mem, addr))
        return true;
    uintptr_t off = (uintptr_t)addr - (uintptr_t)vq->inflight;
    return vq->inflight != NULL && off < vq->inflight_size;
}

int nitro_vq_set_mem(struct nitro_vq *vq, const struct nitro_mem *mem)
{
    if (vq == NULL || mem == NULL)
        return NITRO_ERR_ARG;
    if (vq->addr_set) {
        struct ring_ptrs p;
        int rc = translate_rings(mem, vq->num, vq->packed, vq->desc_uaddr,
                                 vq->avail_uaddr, vq->used_uaddr, &p);
        if (rc != NITRO_OK) {
            /* The old table is going away: never keep pointers into it. */
            vq->addr_set = false;
            attach_rings(vq, &(struct ring_ptrs){0});
            vq->mem = NULL;
            return rc;
        }
        attach_rings(vq, &p);
    }
    vq->mem = mem;
    return NITRO_OK;
}

/* The ring's starting state: the base of a fresh ring for the layout. */
#define PACKED_BASE_INITIAL 0x8000u  /* position 0, wrap counter 1 (2.8.1) */

static void start_at(struct nitro_vq *vq, uint16_t avail, uint16_t used)
{
    vq->last_avail_idx = vq->shadow_avail_idx = avail;
    if (vq->packed) {
        vq->used_idx = used;
        nitro_vq_packed_clear(vq);
    }
    vq->unpushed = 0;
    vq->signalled_used_valid = false;
    vq->unsignalled = 0;
    vq->inflight_check = true;
}

int nitro_vq_set_base(struct nitro_vq *vq, uint32_t base)
{
    if (vq == NULL)
        return NITRO_ERR_ARG;
    if (!vq->packed) {
        if (base > 0xFFFF)
            return NITRO_ERR_ARG;
        start_at(vq, (uint16_t)base, vq->used_idx);
        return NITRO_OK;
    }
    /* vhost-user "Vring descriptor indices for packed virtqueues": avail
     * position and wrap counter in bits 0-15, used ones in bits 16-31.
     * DPDK's virtio-user (and the older spec text) send only bits 0-15;
     * at a clean start nothing is in flight and used equals avail. */
    uint16_t avail = (uint16_t)base, used = (uint16_t)(base >> 16);
    if (used == 0)
        used = avail;
    if (vq->num != 0 && ((avail & 0x7FFF) >= vq->num ||
                         (used & 0x7FFF) >= vq->num))
        return NITRO_ERR_ARG;
    start_at(vq, avail, used);
    return NITRO_OK;
}

uint32_t nitro_vq_get_base(const struct nitro_vq *vq)
{
    if (vq == NULL)
        return 0;
    if (vq->packed)
        return vq->last_avail_idx | (uint32_t)vq->used_idx << 16;
    return vq->last_avail_idx;
}

void nitro_vq_set_fds(struct nitro_vq *vq, int kick_fd, int call_fd)
{
    if (vq == NULL)
        return;
    vq->kick_fd = kick_fd;
    vq->call_fd = call_fd;
}

int nitro_vq_set_features(struct nitro_vq *vq, uint64_t features)
{
    if (vq == NULL)
        return NITRO_ERR_ARG;
    bool packed = (features >> VIRTIO_F_RING_PACKED) & 1;
    if (packed && nitro_vq_packed_init(vq) != NITRO_OK)
        return NITRO_ERR_NOMEM;
    vq->features = features;
    if (packed == vq->packed)
        return NITRO_OK;
    /* A new layout: the base and the ring parts mean something else now. */
    vq->packed = packed;
    start_at(vq, packed ? PACKED_BASE_INITIAL : 0,
             packed ? PACKED_BASE_INITIAL : 0);
    if (!vq->addr_set)
        return NITRO_OK;
    struct ring_ptrs p;
    int rc = translate_rings(vq->mem, vq->num, packed, vq->desc_uaddr,
                             vq->avail_uaddr, vq->used_uaddr, &p);
    if (rc != NITRO_OK) {
        vq->addr_set = false;
        attach_rings(vq, &(struct ring_ptrs){0});
        return rc;
    }
    attach_rings(vq, &p);
    if (!packed)
        vq->used_idx = guest_ld16(vq->used + USED_IDX);
    return NITRO_OK;
}

uint32_t nitro_vq_fault(const struct nitro_vq *vq)
{
    return vq == NULL ? NITRO_FAULT_NONE
                      : __atomic_load_n(&vq->fault, __ATOMIC_RELAXED);
}

void nitro_vq_reset(struct nitro_vq *vq)
{
    if (vq == NULL)
        return;
    __atomic_store_n(&vq->fault, NITRO_FAULT_NONE, __ATOMIC_RELAXED);
    vq->addr_set = false;
    vq->desc_uaddr = vq->avail_uaddr = vq->used_uaddr = 0;
    attach_rings(vq, &(struct ring_ptrs){0});
    vq->mem = NULL;
    uint16_t base = vq->packed ? PACKED_BASE_INITIAL : 0;
    start_at(vq, base, base);
    vq->used_idx = base;
    vq->used_flags = 0;
    vq->inflight = NULL;
    vq->inflight_size = 0;
    vq->inflight_check = false;
    vq->resubmit_n = vq->resubmit_pos = 0;
}

void nitro_vq_stop(struct nitro_vq *vq)
{
    if (vq == NULL)
        return;
    atomic_store(&vq->stop, true);
    uint64_t one = 1;
    /* Wakes a poll() in progress. Failure can only be EAGAIN (counter
     * full), and then the eventfd is readable anyway. */
    ssize_t n = write(vq->stop_fd, &one, sizeof(one));
    (void)n;
}

void nitro_vq_clear_stop(struct nitro_vq *vq)
{
    if (vq == NULL)
        return;
    atomic_store(&vq->stop, false);
    /* Drain so the next poll() does not wake at once (non-blocking:
     * EAGAIN just means no stop was pending). */
    nitro_eventfd_drain(vq->stop_fd);
}

int nitro_vq_stats(const struct nitro_vq *vq, struct nitro_vq_stats *out)
{
    if (vq == NULL || out == NULL)
        return NITRO_ERR_ARG;
    nitro_stats_copy(out, &vq->stats, sizeof(*out));
    return NITRO_OK;
}

/* ---- internal helpers for device code --------------------------------- */

bool nitro_vq_ready(const struct nitro_vq *vq)
{
    return vq->addr_set && vq->mem != NULL && vq->num != 0;
}

uint32_t nitro_vq_num(const struct nitro_vq *vq)
{
    return vq->num;
}

uint32_t nitro_vq_backlog(const struct nitro_vq *vq)
{
    if (vq->packed)
        return 0;  /* counting would walk the descriptor flags */
    return (uint16_t)(vq->shadow_avail_idx - vq->last_avail_idx);
}

int nitro_vq_kick_fd(const struct nitro_vq *vq)
{
    return vq->kick_fd;
}

bool nitro_vq_stopping(const struct nitro_vq *vq)
{
    return atomic_load(&vq->stop);
}

int nitro_vq_set_fault(struct nitro_vq *vq, uint32_t kind)
{
    /* A compare-and-swap: other threads fault a queue too (deliveries into
     * an RX ring, librbd's completions), and the first fault must win. */
    uint32_t none = NITRO_FAULT_NONE;
    if (kind != NITRO_FAULT_NONE && kind < NITRO_FAULT_KINDS &&
        __atomic_compare_exchange_n(&vq->fault, &none, kind, false, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED))
        nitro_stat_add(&vq->stats.faults[kind], 1);
    return NITRO_ERR_GUEST;
}

/* ---- chain walking ---------------------------------------------------- */

/* Number of chains waiting (0..num), or -1 when avail->idx claims more
 * than the ring holds. avail->idx is only re-read once everything seen
 * last time is consumed. */
static int avail_count(struct nitro_vq *vq)
{
    if (vq->shadow_avail_idx == vq->last_avail_idx) {
        uint16_t idx = guest_ld16(vq->avail + AVAIL_IDX);
        /* The driver cannot have more than num chains outstanding. */
        if ((uint16_t)(idx - vq->last_avail_idx) > vq->num)
            return -1;
        vq->shadow_avail_idx = idx;
        /* Acquire: ring entries and descriptors the driver wrote before
         * bumping avail->idx must not be read ahead of the idx itself. */
        atomic_thread_fence(memory_order_acquire);
    }
    return (uint16_t)(vq->shadow_avail_idx - vq->last_avail_idx);
}

/* avail_count(), a bad avail->idx breaking the ring: NITRO_ERR_GUEST. */
static int avail_pending(struct nitro_vq *vq)
{
    int n = avail_count(vq);
    return n < 0 ? nitro_vq_set_fault(vq, NITRO_FAULT_AVAIL_IDX) : n;
}

/* Where the walk is: the table being indexed and how many more descriptors
 * it may yield before the chain must be a loop. */
struct walk {
    const uint8_t *table;
    uint32_t size;
    uint32_t budget;
    bool indirect;
    bool seen_write;
};

/* The indirect table a top-level descriptor d points at, or NULL if the
 * spec forbids it. 2.7.5.3.1: only when negotiated, never chained, a
 * whole number of descriptors, and the table in guest memory. */
static const uint8_t *indirect_table(const struct nitro_vq *vq, const struct vring_desc *d)
{
    if (!has_feature(vq, VIRTIO_RING_F_INDIRECT_DESC) || (d->flags & VRING_DESC_F_NEXT) ||
        d->len == 0 || d->len % DESC_SIZE != 0 || d->len / DESC_SIZE > NITRO_MAX_QUEUE_SIZE)
        return NULL;
    return nitro_mem_gpa_to_host(vq->mem, d->addr, d->len);
}

static int enter_indirect(struct nitro_vq *vq, struct walk *w,
                          const struct vring_desc *d)
{
    /* One level deep only (2.7.5.3.1). */
    const uint8_t *table = w->indirect ? NULL : indirect_table(vq, d);
    if (table == NULL)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INDIRECT);
    *w = (struct walk){
        .table = table,
        .size = d->len / DESC_SIZE,
        .budget = d->len / DESC_SIZE,
        .indirect = true,
        .seen_write = w->seen_write,
    };
    return NITRO_OK;
}

int nitro_chain_add(struct nitro_vq *vq, struct nitro_chain *c, uint64_t gpa,
                    uint32_t len, bool writable, bool *seen_write)
{
    /* 2.7.4.2, 2.8.7: all device-readable descriptors come first. */
    if (!writable && *seen_write)
        return nitro_vq_set_fault(vq, NITRO_FAULT_DESC_ORDER);
    *seen_write |= writable;
    /* What seg_max / size_max bound (virtio 1.2 5.2.3): blk checks them. */
    c->n_desc++;
    if (len > c->max_desc_len)
        c->max_desc_len = len;
    uint64_t left = len;
    while (left > 0) {
        uint64_t span;
        uint8_t *host = nitro_mem_gpa_span(vq->mem, gpa, &span);
        if (host == NULL)
            return nitro_vq_set_fault(vq, NITRO_FAULT_DESC_ADDR);
        /* Only reachable by splitting at region boundaries over and over:
         * treat as an over-long chain. */
        if (c->n_out + c->n_in == NITRO_VQ_MAX_IOV)
            return nitro_vq_set_fault(vq, NITRO_FAULT_DESC_LOOP);
        uint64_t n = left < span ? left : span;
        c->iov[c->n_out + c->n_in] =
            (struct iovec){.iov_base = host, .iov_len = n};
        if (writable) {
            c->n_in++;
            c->in_len += n;
        } else {
            c->n_out++;
            c->out_len += n;
        }
        /* gpa + n stays <= the region's end, which fits in 64 bits. */
        gpa += n;
        left -= n;
    }
    return NITRO_OK;
}

/* A chain of one direct descriptor inside one memory region: nearly every
 * virtio-net frame and RX buffer. What nitro_chain_add() would build for
 * it, without the walk's loop and calls; false (c untouched) for anything
 * else: an empty descriptor, one that crosses into the next region or
 * lies outside guest memory goes the general way, which also faults it. */
static inline bool chain_single(struct nitro_vq *vq, struct nitro_chain *c,
                                uint16_t head, const struct vring_desc *d)
{
    if ((d->flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT)) || d->len == 0)
        return false;
    uint64_t span;
    uint8_t *host = nitro_mem_gpa_span(vq->mem, d->addr, &span);
    if (host == NULL || d->len > span)
        return false;
    bool writable = d->flags & VRING_DESC_F_WRITE;
    c->head = head;
    c->iov[0] = (struct iovec){.iov_base = host, .iov_len = d->len};
    c->n_out = !writable;
    c->n_in = writable;
    c->out_len = writable ? 0 : d->len;
    c->in_len = writable ? d->len : 0;
    c->n_desc = 1;
    c->max_desc_len = d->len;
    return true;
}

static int walk_chain(struct nitro_vq *vq, uint16_t head,
                      struct nitro_chain *c)
{
    struct walk w = {.table = vq->desc, .size = vq->num, .budget = vq->num};
    if (head >= w.size)
        return nitro_vq_set_fault(vq, NITRO_FAULT_DESC_INDEX);
    struct vring_desc d;
    read_desc(w.table, head, &d);
    if (chain_single(vq, c, head, &d))
        return NITRO_OK;
    chain_reset(c, head);
    for (;;) {
        /* More descriptors than the table holds means a cycle. */
        if (w.budget-- == 0)
            return nitro_vq_set_fault(vq, NITRO_FAULT_DESC_LOOP);
        int rc = (d.flags & VRING_DESC_F_INDIRECT)
                     ? enter_indirect(vq, &w, &d)
                     : nitro_chain_add(vq, c, d.addr, d.len,
                                       d.flags & VRING_DESC_F_WRITE,
                                       &w.seen_write);
        if (rc != NITRO_OK)
            return rc;
        uint32_t i;
        if (d.flags & VRING_DESC_F_INDIRECT) {
            i = 0;
        } else if (!(d.flags & VRING_DESC_F_NEXT)) {
            return NITRO_OK;
        } else {
            i = d.next;
            if (i >= w.size)
                return nitro_vq_set_fault(vq, NITRO_FAULT_DESC_INDEX);
        }
        read_desc(w.table, i, &d);
    }
}

/* Lines of a buffer nitro_vq_prefetch() asks for: a frame's head (the
 * virtio-net header and the headers the switch checks); the hardware
 * prefetcher follows a longer copy by itself. */
#define PREFETCH_LINES 2

/* Start loading the first buffer of a descriptor: for writing when the
 * device writes it (an RX buffer: the line comes over exclusive, so the
 * copy into it does not hold up the stores behind it), else for reading. */
/* Where d's buffer starts in host memory, and in *len how many of its
 * bytes lie in that region (a buffer may run into the next one); NULL if
 * it starts outside guest memory. The look-ahead hints' translation: it
 * checks nothing else. */
static const uint8_t *buffer_start(const struct nitro_vq *vq, const struct vring_desc *d,
                                   uint64_t *len)
{
    uint64_t span;
    const uint8_t *host = nitro_mem_gpa_span(vq->mem, d->addr, &span);
    if (host != NULL)
        *len = d->len < span ? d->len : span;
    return host;
}

static void prefetch_buffer(const struct nitro_vq *vq, const uint8_t *desc)
{
    struct vring_desc d;
    read_desc(desc, 0, &d);
    if (d.flags & VRING_DESC_F_INDIRECT)
        return;
    uint64_t len;
    const uint8_t *host = buffer_start(vq, &d, &len);
    if (host == NULL)
        return;
    uintptr_t line = (uintptr_t)host & ~(uintptr_t)(NITRO_CACHE_LINE - 1);
    uintptr_t end = (uintptr_t)host + len;
    for (int k = 0; k < PREFETCH_LINES && line < end; k++, line += NITRO_CACHE_LINE) {
        if (d.flags & VRING_DESC_F_WRITE)
            nitro_prefetch_for_write((const void *)line);
        else
            __builtin_prefetch((const void *)line, 0, 3);
    }
}

uint32_t nitro_vq_waiting_hint(struct nitro_vq *vq)
{
    if (vq->packed || nitro_vq_fault(vq) != NITRO_FAULT_NONE)
        return 0;
    /* A bad avail->idx is left to the next pop: a delivery wakes the RX
     * ring's worker (which reports the fault) only when its own pop
     * fails, and a hint before a batch it then refuses whole would break
     * the ring unseen. */
    int n = avail_count(vq);
    return n > 0 ? (uint32_t)n : 0;
}

/* The steady state the look-ahead hints are for: a split ring, not
 * broken, with no chains to serve again and no inflight region to check
 * first. */
static bool split_steady(const struct nitro_vq *vq)
{
    return !vq->packed && nitro_vq_fault(vq) == NITRO_FAULT_NONE &&
           !(vq->inflight != NULL && vq->inflight_check) &&
           vq->resubmit_pos >= vq->resubmit_n;
}

void nitro_vq_prefetch(struct nitro_vq *vq, uint32_t n)
{
    /* Chains to serve again, a region to check first, a packed or broken
     * ring (the hint's 0): not the steady state this is for. */
    if (!split_steady(vq))
        return;
    uint32_t pending = nitro_vq_waiting_hint(vq);
    if (pending == 0)
        return;
    if (n > pending)
        n = pending;
    if (n > NITRO_VQ_PREFETCH_MAX)
        n = NITRO_VQ_PREFETCH_MAX;
    /* Two passes, so the misses overlap: every descriptor is requested
     * before the first one is read. The heads and descriptors read here
     * only choose what to prefetch: nitro_vq_pop() reads and checks them
     * again, and a prefetch never faults. */
    const uint8_t *desc[NITRO_VQ_PREFETCH_MAX];
    uint32_t m = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t slot = (uint16_t)(vq->last_avail_idx + k) & (vq->num - 1);
        uint16_t head = guest_ld16(vq->avail + AVAIL_RING(slot));
        if (head >= vq->num)
            continue;
        desc[m] = vq->desc + (size_t)head * DESC_SIZE;
        __builtin_prefetch(desc[m], 0, 3);
        m++;
    }
    for (uint32_t k = 0; k < m; k++)
        prefetch_buffer(vq, desc[k]);
}

const uint8_t *nitro_vq_peek_next(struct nitro_vq *vq, uint32_t *len)
{
    if (!split_steady(vq) || vq->shadow_avail_idx == vq->last_avail_idx)
        return NULL;
    uint32_t slot = vq->last_avail_idx & (vq->num - 1);
    uint16_t head = guest_ld16(vq->avail + AVAIL_RING(slot));
    if (head >= vq->num)
        return NULL;
    struct vring_desc d;
    read_desc(vq->desc, head, &d);
    if (d.flags & VRING_DESC_F_INDIRECT) {
        /* Only a table the walk would enter, so the peek reads no guest
         * memory the pop would not: a fault there breaks the ring at the
         * same request either way. */
        const uint8_t *table = indirect_table(vq, &d);
        if (table == NULL)
            return NULL;
        read_desc(table, 0, &d);
        if (d.flags & VRING_DESC_F_INDIRECT)
            return NULL;
    }
    if (d.flags & VRING_DESC_F_WRITE)
        return NULL;
    uint64_t n;
    const uint8_t *host = buffer_start(vq, &d, &n);
    if (host != NULL)
        *len = (uint32_t)n;  /* at most d.len */
    return host;
}

static int inflight_restart(struct nitro_vq *vq);
static void inflight_fetched(struct nitro_vq *vq, uint16_t head);

int nitro_vq_pop(struct nitro_vq *vq, struct nitro_chain **out)
{
    if (nitro_vq_fault(vq) != NITRO_FAULT_NONE)
        return NITRO_ERR_GUEST;
    if (vq->packed)
        return nitro_vq_packed_pop(vq, out);
    if (vq->inflight != NULL && vq->inflight_check) {
        int rc = inflight_restart(vq);
        if (rc != NITRO_OK)
            return rc;
    }
    if (vq->resubmit_pos < vq->resubmit_n) {
        /* Already marked in flight, with its counter: serve it again. */
        int rc = walk_chain(vq, vq->resubmit[vq->resubmit_pos], &vq->chain);
        if (rc != NITRO_OK)
            return rc;
        vq->resubmit_pos++;
        vq->chain.resubmitted = true;
        *out = &vq->chain;
        return 1;
    }
    int pending = avail_pending(vq);
    if (pending <= 0)
        return pending;
    uint32_t slot = vq->last_avail_idx & (vq->num - 1);
    uint16_t head = guest_ld16(vq->avail + AVAIL_RING(slot));
    int rc = walk_chain(vq, head, &vq->chain);
    if (rc != NITRO_OK)
        return rc;
    vq->chain.resubmitted = false;
    if (vq->inflight != NULL)
        inflight_fetched(vq, head);
    vq->last_avail_idx++;
    if (vq->unpushed < vq->num)
        vq->unpushed++;
    *out = &vq->chain;
    return 1;
}

/* ---- used ring and notifications --------------------------------------- */

void nitro_vq_push(struct nitro_vq *vq, uint16_t head, uint32_t len)
{
    nitro_vq_push_batch(vq, &head, &len, 1);
}

void nitro_vq_unpop(struct nitro_vq *vq, uint16_t n)
{
    /* Only what was popped since the last push is still ours to give back:
     * anything older may already be on the used ring. */
    if (n > vq->unpushed)
        n = vq->unpushed;
    if (vq->packed) {
        nitro_vq_packed_unpop(vq, n);
        return;
    }
    vq->last_avail_idx -= n;
    vq->unpushed -= n;
}

static void inflight_batch_begin(struct nitro_vq *vq, const uint16_t *heads,
                                 uint32_t n);
static void inflight_batch_end(struct nitro_vq *vq, const uint16_t *heads,
                               uint32_t n);

void nitro_vq_push_batch(struct nitro_vq *vq, const uint16_t *heads,
                         const uint32_t *lens, uint32_t n)
{
    if (n == 0)
        return;
    if (vq->packed) {
        nitro_vq_packed_push_batch(vq, heads, lens, n);
        return;
    }
    if (vq->inflight != NULL)
        inflight_batch_begin(vq, heads, n);
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *elem = vq->used + USED_RING((uint16_t)(vq->used_idx + i) &
                                             (vq->num - 1));
        guest_st32(elem, heads[i]);
        guest_st32(elem + 4, lens[i]);
    }
    vq->used_idx += n;
    vq->unpushed = 0;
    /* Release: the elements and the data/status bytes written into the
     * buffers must be visible before the driver can see the new idx. */
    atomic_thread_fence(memory_order_release);
    guest_st16(vq->used + USED_IDX, vq->used_idx);
    if (vq->inflight != NULL)
        inflight_batch_end(vq, heads, n);
    nitro_stat_add(&vq->stats.chains, n);
}

/* 2.7.7.2: with EVENT_IDX, interrupt when used->idx passed used_event
 * since the last interrupt. */
static bool vring_need_event(uint16_t event_idx, uint16_t new_idx,
                             uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

static bool driver_wants_call(struct nitro_vq *vq)
{
    if (vq->packed)
        return nitro_vq_packed_wants_call(vq);
    if (!has_feature(vq, VIRTIO_RING_F_EVENT_IDX))
        return !(guest_ld16(vq->avail + AVAIL_FLAGS) &
                 VRING_AVAIL_F_NO_INTERRUPT);
    uint16_t old = vq->signalled_used;
    bool valid = vq->signalled_used_valid;
    vq->signalled_used = vq->used_idx;
    vq->signalled_used_valid = true;
    /* After set_base we do not know what the driver last saw: call. */
    if (!valid)
        return true;
    uint16_t used_event = guest_ld16(vq->avail + AVAIL_RING(vq->num));
    return vring_need_event(used_event, vq->used_idx, old);
}

void nitro_vq_notify(struct nitro_vq *vq)
{
    /* Full barrier: our used->idx store must be visible before we read
     * used_event / flags, or a driver re-enabling interrupts and then
     * re-checking used->idx could miss both the entry and the call. */
    atomic_thread_fence(memory_order_seq_cst);
    if (!driver_wants_call(vq) || vq->call_fd < 0)
        return;
    int rc = nitro_efd_signal(vq->call_fd);
    if (rc == 1)
        nitro_stat_add(&vq->stats.calls, 1);
    else if (rc < 0)
        nitro_vq_set_fault(vq, NITRO_FAULT_EVENTFD);
}

void nitro_vq_disable_notify(struct nitro_vq *vq)
{
    if (vq->packed) {
        nitro_vq_packed_disable_notify(vq);
        return;
    }
    /* With EVENT_IDX, leaving avail_event behind is enough: the driver
     * kicks at most once more. */
    if (has_feature(vq, VIRTIO_RING_F_EVENT_IDX))
        return;
    vq->used_flags |= VRING_USED_F_NO_NOTIFY;
    guest_st16(vq->used + USED_FLAGS, vq->used_flags);
}

int nitro_vq_enable_notify(struct nitro_vq *vq)
{
    if (vq->packed)
        return nitro_vq_packed_enable_notify(vq);
    if (has_feature(vq, VIRTIO_RING_F_EVENT_IDX)) {
        guest_st16(vq->used + USED_RING(vq->num), vq->last_avail_idx);
    } else {
        vq->used_flags &= (uint16_t)~VRING_USED_F_NO_NOTIFY;
        guest_st16(vq->used + USED_FLAGS, vq->used_flags);
    }
    /* Full barrier: the store above must be visible before we re-read
     * avail->idx; otherwise the driver may add a chain, read the stale
     * suppression and skip the kick while we read a stale idx and sleep. */
    atomic_thread_fence(memory_order_seq_cst);
    int pending = avail_pending(vq);
    return pending < 0 ? pending : pending > 0;
}

/* ---- waiting for kicks ------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int poll_timeout(int64_t deadline)
{
    if (deadline < 0)
        return -1;
    int64_t left = deadline - now_ms();
    return left < 0 ? 0 : (int)left;
}

void nitro_vq_wake(struct nitro_vq *vq)
{
    if (vq->kick_fd >= 0 && nitro_efd_signal(vq->kick_fd) < 0)
        nitro_vq_set_fault(vq, NITRO_FAULT_EVENTFD);
}

void nitro_vq_count_kick(struct nitro_vq *vq)
{
    nitro_stat_add(&vq->stats.kicks, 1);
}

int nitro_vq_wait_kick(struct nitro_vq *vq, int timeout_ms)
{
    struct pollfd fds[2] = {
        {.fd = vq->kick_fd, .events = POLLIN},
        {.fd = vq->stop_fd, .events = POLLIN},
    };
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    for (;;) {
        /* The flag is set before the eventfd is written, so checking it
         * here and polling the eventfd below cannot miss a stop. */
        if (nitro_vq_stopping(vq))
            return NITRO_VQ_WAIT_STOP;
        int n = poll(fds, 2, poll_timeout(deadline));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return NITRO_ERR_SYS;
        if (n == 0)
            return NITRO_VQ_WAIT_TIMEOUT;
        if (fds[1].revents != 0 && !nitro_vq_stopping(vq))
            nitro_eventfd_drain(vq->stop_fd);  /* a stop already cleared */
        if (fds[0].revents & POLLIN) {
            if (nitro_efd_drain(vq->kick_fd) < 0)
                return nitro_vq_set_fault(vq, NITRO_FAULT_EVENTFD);
            nitro_stat_add(&vq->stats.kicks, 1);
            return NITRO_VQ_WAIT_KICK;
        }
        if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            errno = (fds[0].revents & POLLNVAL) ? EBADF : EIO;
            return NITRO_ERR_SYS;
        }
    }
}

/* ---- inflight I/O tracking ---------------------------------------------- */

/* Region fields are only ever written by us (the frontend zeroes a fresh
 * region and reads it after we are gone), but they survive a crash of this
 * process: every store below is a single untorn store, and the fences
 * order them as the recovery in inflight_restart() needs. */

uint64_t nitro_vq_inflight_capacity(const struct nitro_vq *vq, uint64_t size)
{
    uint64_t entries = 0;
    if (vq->packed) {
        uint64_t header = nitro_vq_packed_region_size(0);
        uint64_t entry = nitro_vq_packed_region_size(1) - header;
        entries = size < header ? 0 : (size - header) / entry;
    } else {
        entries = size < INFLIGHT_HEADER ? 0
                                         : (size - INFLIGHT_HEADER) / INFLIGHT_DESC;
    }
    return entries > NITRO_MAX_QUEUE_SIZE ? NITRO_MAX_QUEUE_SIZE : entries;
}

int nitro_vq_set_inflight(struct nitro_vq *vq, void *region, uint64_t size)
{
    if (vq == NULL)
        return NITRO_ERR_ARG;
    if (region == NULL) {
        vq->inflight = NULL;
        vq->inflight_size = 0;
        vq->resubmit_n = vq->resubmit_pos = 0;
        return NITRO_OK;
    }
    /* The counters are 64-bit fields accessed atomically. The layout is
     * the one negotiated now (QEMU sends SET_FEATURES first); a layout
     * changed later is checked again when the region is next used. */
    uint64_t entries = nitro_vq_inflight_capacity(vq, size);
    if ((uintptr_t)region % 8 != 0 || entries == 0)
        return NITRO_ERR_ARG;
    if (vq->num != 0 && vq->num > entries)
        return NITRO_ERR_ARG;
    vq->inflight = region;
    vq->inflight_size = size;
    vq->inflight_check = true;
    vq->resubmit_n = vq->resubmit_pos = 0;
    return NITRO_OK;
}

/* A fetched head: its counter, then the flag. The release store keeps the
 * counter before the flag (a crash in between leaves the entry unmarked:
 * the chain is fetched again from the avail ring), and the caller does no
 * I/O for it before we return. */
static void inflight_fetched(struct nitro_vq *vq, uint16_t head)
{
    struct inflight_region *r = vq->inflight;
    struct inflight_desc *d = &r->desc[head];
    region_st64(&d->counter, ++vq->inflight_counter);
    __atomic_store_n(&d->inflight, 1, __ATOMIC_RELEASE);
}

/* Before the used elements: link the batch from last_batch_head through
 * `next`, so that a crash after used->idx moved can find and clear it. */
static void inflight_batch_begin(struct nitro_vq *vq, const uint16_t *heads,
                                 uint32_t n)
{
    struct inflight_region *r = vq->inflight;
    for (uint32_t i = 0; i < n; i++) {
        if (heads[i] >= vq->num)
            continue;  /* never popped: nothing to track */
        region_st16(&r->desc[heads[i]].next, region_ld16(&r->last_batch_head));
        region_st16(&r->last_batch_head, heads[i]);
    }
    /* Release: the batch list must be complete before used->idx (written
     * by the caller after this) can move past region used_idx. */
    atomic_thread_fence(memory_order_release);
}

/* After used->idx was published: clear the flags, then record used_idx.
 * A crash before the last store leaves used_idx != used->idx, and
 * inflight_restart() clears this batch again. */
static void inflight_batch_end(struct nitro_vq *vq, const uint16_t *heads,
                               uint32_t n)
{
    struct inflight_region *r = vq->inflight;
    /* Release: used->idx before the flags; an entry unmarked while its
     * used element is not yet published would be lost by a crash. */
    atomic_thread_fence(memory_order_release);
    for (uint32_t i = 0; i < n; i++)
        if (heads[i] < vq->num)
            region_st8(&r->desc[heads[i]].inflight, 0);
    /* Release: the flags before used_idx, which says they are right. */
    atomic_thread_fence(memory_order_release);
    region_st16(&r->used_idx, vq->used_idx);
}

struct inflight_head {
    uint64_t counter;
    uint16_t head;
};

static int cmp_inflight(const void *a, const void *b)
{
    const struct inflight_head *x = a, *y = b;
    if (x->counter != y->counter)
        return x->counter < y->counter ? -1 : 1;
    /* Equal counters (a frontend or a crash cannot produce them, a bad
     * region can): the head index keeps the order deterministic. */
    return (x->head > y->head) - (x->head < y->head);
}

/* A region the frontend zeroed: take it over. */
static void inflight_init(struct nitro_vq *vq, uint16_t used)
{
    struct inflight_region *r = vq->inflight;
    uint64_t entries = nitro_vq_inflight_capacity(vq, vq->inflight_size);
    for (uint32_t i = 0; i < entries; i++)
        region_st8(&r->desc[i].inflight, 0);
    region_st64(&r->features, 0);
    region_st16(&r->desc_num, (uint16_t)vq->num);
    region_st16(&r->last_batch_head, 0);
    region_st16(&r->used_idx, used);
    vq->inflight_counter = 0;
    /* Release: the fields above before the version that vouches for them. */
    atomic_thread_fence(memory_order_release);
    region_st16(&r->version, INFLIGHT_VERSION);
}

/* "When reconnecting": repair the last batch if a crash tore it, then
 * collect the heads still in flight. The region is the frontend's and
 * used->idx the guest's: any disagreement is a fault, never a crash. */
static int inflight_restart(struct nitro_vq *vq)
{
    struct inflight_region *r = vq->inflight;
    uint16_t used = guest_ld16(vq->used + USED_IDX);
    vq->inflight_check = false;
    vq->resubmit_n = vq->resubmit_pos = 0;
    vq->used_idx = used;
    if (vq->num > nitro_vq_inflight_capacity(vq, vq->inflight_size))
        return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
    uint16_t version = region_ld16(&r->version);
    if (version == 0) {
        inflight_init(vq, used);
        return NITRO_OK;
    }
    if (version != INFLIGHT_VERSION)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);

    uint16_t batch = (uint16_t)(used - region_ld16(&r->used_idx));
    if (batch > vq->num)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
    uint16_t i = region_ld16(&r->last_batch_head);
    for (uint16_t k = 0; k < batch; k++) {
        if (i >= vq->num)
            return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
        region_st8(&r->desc[i].inflight, 0);
        i = region_ld16(&r->desc[i].next);
    }
    /* Release: the cleared flags before used_idx says they are right. */
    atomic_thread_fence(memory_order_release);
    region_st16(&r->used_idx, used);

    struct inflight_head found[NITRO_MAX_QUEUE_SIZE];
    uint32_t n = 0;
    uint64_t top = 0;
    uint64_t entries = nitro_vq_inflight_capacity(vq, vq->inflight_size);
    for (uint32_t h = 0; h < entries; h++) {
        if (region_ld8(&r->desc[h].inflight) == 0)
            continue;
        /* A head outside the ring cannot have been fetched. */
        if (h >= vq->num)
            return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
        uint64_t c = region_ld64(&r->desc[h].counter);
        found[n++] = (struct inflight_head){.counter = c, .head = (uint16_t)h};
        if (c > top)
            top = c;
    }
    /* The chains in flight were made available after used->idx and not
     * yet used: the driver cannot have fewer outstanding (nor more than
     * the ring holds). avail_pending() checks the idx again later. */
    uint16_t outstanding = (uint16_t)(guest_ld16(vq->avail + AVAIL_IDX) - used);
    if (outstanding > vq->num || outstanding < n)
        return nitro_vq_set_fault(vq, NITRO_FAULT_INFLIGHT);
    /* Acquire: the descriptors of those chains are read after the idx. */
    atomic_thread_fence(memory_order_acquire);
    qsort(found, n, sizeof(found[0]), cmp_inflight);
    for (uint32_t k = 0; k < n; k++)
        vq->resubmit[k] = found[k].head;
    vq->resubmit_n = n;
    if (top > vq->inflight_counter)
        vq->inflight_counter = top;
    /* The frontend set base to used->idx after we crashed; the chains in
     * flight were taken from the avail ring right after it. */
    vq->last_avail_idx = vq->shadow_avail_idx = (uint16_t)(used + n);
    vq->unpushed = 0;
    return NITRO_OK;
}
