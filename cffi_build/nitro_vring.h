/*
 * nitro_vring.h: internal (non-ABI) interface between the ring walkers
 * (nitro_vring.c for split rings, nitro_vring_packed.c for packed ones,
 * nitro_mem.c) and device code (nitro_blk.c, nitro_net_queue.c,
 * nitro_switch.c). The layout is the queue's business: the same calls serve
 * both. Not part of the cffi cdef; Python never sees these symbols.
 *
 * Nothing below locks: the caller serialises every call that walks or
 * writes a ring (pop, unpop, push, notify, enable/disable_notify). A blk or
 * TX queue is served by one thread at a time (nitro.h: "from one thread per
 * queue"). A virtio-net RX ring is different: it is popped and pushed by
 * several threads (peers' TX workers, the uplink thread, the trio thread
 * injecting control replies), each holding the switch's RX slot lock
 * (nitro_switch.c), while its own worker only drains kicks and reads the fault.
 * nitro_vq_stop()/nitro_vq_wake()/nitro_vq_fault() and the stats may be used
 * from any thread: they are atomics or eventfd writes.
 */
#ifndef NITRO_VRING_H
#define NITRO_VRING_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "nitro.h"

#define NITRO_INTERNAL __attribute__((visibility("hidden")))

/* Feature bits (virtio 1.2 section 6) and descriptor/ring flags (2.7). */
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

/* A chain has at most num direct descriptors plus one indirect table of at
 * most NITRO_MAX_QUEUE_SIZE entries; a descriptor that crosses from one
 * memory region into the next becomes one iovec per region, and the slack
 * below absorbs those splits. */
#define NITRO_VQ_MAX_IOV (2 * NITRO_MAX_QUEUE_SIZE + NITRO_MAX_MEM_REGIONS)

/* One popped chain; head is the split head index or the packed buffer id,
 * which push takes back. iov[0, n_out) are device-readable, then
 * iov[n_out, n_out + n_in) device-writable; every iovec is non-empty and
 * points into guest memory. */
struct nitro_chain {
    uint16_t head;
    bool resubmitted;  /* from the inflight region, not the avail ring */
    uint32_t n_out;
    uint32_t n_in;
    uint64_t out_len;
    uint64_t in_len;
    uint32_t n_desc;        /* data descriptors (not indirect tables) */
    uint64_t max_desc_len;  /* the longest of them */
    struct iovec iov[NITRO_VQ_MAX_IOV];
};

/* nitro_vq_wait_kick() results. */
#define NITRO_VQ_WAIT_TIMEOUT 0
#define NITRO_VQ_WAIT_KICK 1
#define NITRO_VQ_WAIT_STOP 2

/* Host pointer for gpa and the number of bytes from there to the end of its
 * region (*span), or NULL when gpa is in no region. */
NITRO_INTERNAL void *nitro_mem_gpa_span(const struct nitro_mem *mem,
                                        uint64_t gpa, uint64_t *span);

/* Rings translated, size set, memory attached. */
NITRO_INTERNAL bool nitro_vq_ready(const struct nitro_vq *vq);
NITRO_INTERNAL uint32_t nitro_vq_num(const struct nitro_vq *vq);
/* Chains known to wait in the avail ring after the last pop, without
 * reading guest memory (split: from the avail->idx last read; packed: 0). */
NITRO_INTERNAL uint32_t nitro_vq_backlog(const struct nitro_vq *vq);
NITRO_INTERNAL int nitro_vq_kick_fd(const struct nitro_vq *vq);
NITRO_INTERNAL bool nitro_vq_stopping(const struct nitro_vq *vq);
/* Mark the queue broken (first fault wins); returns NITRO_ERR_GUEST. */
NITRO_INTERNAL int nitro_vq_set_fault(struct nitro_vq *vq, uint32_t kind);
/* 1 and *out = the next chain (valid until the next pop), 0 when the ring
 * is empty, NITRO_ERR_GUEST when the guest broke it. */
NITRO_INTERNAL int nitro_vq_pop(struct nitro_vq *vq, struct nitro_chain **out);
/* Most chains nitro_vq_prefetch() looks ahead at. */
#define NITRO_VQ_PREFETCH_MAX 64
/* A hint before popping up to n chains: start loading the descriptors
 * and the first lines of the first buffers of the next available chains
 * (written by the driver's CPU, so each would otherwise be a cache miss
 * the walk waits for, one after the other). Consumes and checks nothing;
 * split rings only (a packed ring returns at once). */
NITRO_INTERNAL void nitro_vq_prefetch(struct nitro_vq *vq, uint32_t n);
/* Where the first buffer of the next available chain is in host memory
 * (guest memory: read it inside the ring's guard, and copy what you read
 * once), and *len of its bytes there: a prefetch hint, so a device can
 * start loading what that request will need while it serves this one.
 * Only a chain already known to wait (avail->idx is not read again), a
 * device-readable first buffer, an indirect table only as the walk would
 * enter it, split rings in the steady state; NULL otherwise. Consumes
 * nothing: nitro_vq_pop() walks and checks the chain. */
NITRO_INTERNAL const uint8_t *nitro_vq_peek_next(struct nitro_vq *vq, uint32_t *len);
/* Chains known to wait (a split ring's copy of avail->idx, read again once
 * used up): a batch size hint, nothing is consumed, nothing breaks the
 * ring (nitro_vq_pop() does). 0 for a packed or broken ring and for an
 * avail->idx the ring cannot hold. */
NITRO_INTERNAL uint32_t nitro_vq_waiting_hint(struct nitro_vq *vq);
/* Append (head, len) to the used ring and publish used->idx. */
NITRO_INTERNAL void nitro_vq_push(struct nitro_vq *vq, uint16_t head,
                                  uint32_t len);
/* Give back the last n popped chains: they will be popped again. For
 * receive paths that pop several buffers and then find the frame does not
 * fit (virtio-net MRG_RXBUF). Only chains popped since the last push can be
 * given back; a larger n is clamped to that. */
NITRO_INTERNAL void nitro_vq_unpop(struct nitro_vq *vq, uint16_t n);
/* Append n used elements, then publish used->idx once, so the driver sees
 * them all together (MRG_RXBUF: num_buffers counts them). */
NITRO_INTERNAL void nitro_vq_push_batch(struct nitro_vq *vq,
                                        const uint16_t *heads,
                                        const uint32_t *lens, uint32_t n);
/* Signal the call fd if the driver asked for it (EVENT_IDX / NO_INTERRUPT). */
NITRO_INTERNAL void nitro_vq_notify(struct nitro_vq *vq);
NITRO_INTERNAL void nitro_vq_disable_notify(struct nitro_vq *vq);
/* Re-enable kicks, then re-check the ring: 1 if chains arrived meanwhile
 * (the caller must process them, no kick will come), 0 if empty,
 * NITRO_ERR_GUEST on a bad avail->idx. */
NITRO_INTERNAL int nitro_vq_enable_notify(struct nitro_vq *vq);
/* Wait for a kick (drained and counted), a stop or the timeout (<0: none).
 * NITRO_VQ_WAIT_* or NITRO_ERR_SYS. */
NITRO_INTERNAL int nitro_vq_wait_kick(struct nitro_vq *vq, int timeout_ms);
/* Make the queue's worker look at it: write its kick eventfd (a spurious
 * kick). For a thread other than the worker that found the ring broken
 * (net RX deliveries): the worker's next serve call then reports the fault.
 * Safe from any thread while the kick fd cannot change (the caller holds
 * what keeps the queue attached). */
NITRO_INTERNAL void nitro_vq_wake(struct nitro_vq *vq);
/* Count a kick the engine drained from the kick fd on the queue's behalf. */
NITRO_INTERNAL void nitro_vq_count_kick(struct nitro_vq *vq);

/* Counters are read by other threads (metrics scrapes) and a blk stats
 * struct may be shared by several queue threads: add atomically. */
static inline void nitro_stat_add(uint64_t *counter, uint64_t n)
{
    __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

static inline void nitro_stat_sub(uint64_t *counter, uint64_t n)
{
    __atomic_fetch_sub(counter, n, __ATOMIC_RELAXED);
}

/* Copy a stats struct made only of uint64_t counters (size bytes) for a
 * *_stats getter: atomic loads, so no counter is read torn. */
static inline void nitro_stats_copy(void *dst, const void *src, size_t size)
{
    const uint64_t *from = src;
    uint64_t *to = dst;
    for (size_t i = 0; i < size / sizeof(uint64_t); i++)
        to[i] = __atomic_load_n(&from[i], __ATOMIC_RELAXED);
}

/* Add 1 to an eventfd (a kick, a wake-up). EAGAIN is fine: the counter
 * is saturated, so the fd is readable anyway. */
static inline void nitro_eventfd_signal(int fd)
{
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(fd, &one, sizeof(one));
    while (n < 0 && errno == EINTR);
}

/* Consume an eventfd's counter so it stops being readable. Only for fds
 * that cannot block here: our own non-blocking ones, or one that poll()
 * or epoll just reported readable. */
static inline void nitro_eventfd_drain(int fd)
{
    uint64_t v;
    ssize_t n;
    do
        n = read(fd, &v, sizeof(v));
    while (n < 0 && errno == EINTR);
}

/* CLOCK_MONOTONIC in nanoseconds: latencies and rate-limit refills. */
static inline uint64_t nitro_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* One clock read an engine worker shares among the requests of a batch
 * (a pass over its rings, a reap of its completions), 0 outside one. A
 * 4 KiB read used to read the clock twice (taken, answered): 5 % of the
 * worker's CPU at 500k IOPS in a VM (docs/performance.md). Code that
 * takes time inside a batch (a synchronous request's I/O) refreshes it. */
NITRO_INTERNAL extern __thread uint64_t nitro_batch_ns;

/* The batch's time, or the clock outside a batch. */
static inline uint64_t nitro_batch_now(void)
{
    return nitro_batch_ns != 0 ? nitro_batch_ns : nitro_now_ns();
}

/* After work that took time inside a batch: the batch's time is now. */
static inline void nitro_batch_refresh(void)
{
    if (nitro_batch_ns != 0)
        nitro_batch_ns = nitro_now_ns();
}

#endif
