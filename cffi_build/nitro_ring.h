/*
 * nitro_ring.h: internal (non-ABI) contract between the engine's workers
 * (nitro_engine.c) and the device code that serves one kind of ring
 * (nitro_blk.c, nitro_net.c). Not part of the cdef.
 *
 * A worker owns a set of rings and calls each ring's poll() in turn. poll()
 * never blocks on the guest: it does at most `budget` chains of work and
 * returns how many it did; slow host I/O goes through the worker's io_uring
 * (struct nitro_io), whose completions the worker hands back to the ring
 * that submitted them. When nothing moved for a while the worker arms every
 * ring (re-enables guest notifications) and sleeps on one epoll set holding
 * every ring's kick fd, the io_uring's eventfd and its own wake-up eventfd,
 * at most until the earliest wake_ns of its rings (a ring that is waiting
 * for a rate limit says until when with it).
 *
 * A ring is touched only by its owning worker between attach and detach:
 * the control plane (Python) hands rings over with synchronous commands
 * (nitro_engine_attach/detach), never by sharing them. The one exception is
 * delivery into a virtio-net RX ring by other workers, which the switch does
 * under that ring's slot lock (nitro_net.c).
 */
#ifndef NITRO_RING_H
#define NITRO_RING_H

#include <liburing.h>
#include <stdbool.h>
#include <stdint.h>

#include "nitro.h"
#include "nitro_vring.h"

/* A worker's asynchronous I/O: one io_uring shared by its blk rings. */
struct nitro_io {
    struct io_uring uring;
    bool ready;            /* io_uring_queue_init succeeded */
    uint32_t unsubmitted;  /* SQEs prepared since the last submit */
    uint32_t pending;      /* SQEs prepared whose CQE was not reaped yet */
};

/* Every io_uring request's user_data points at one of these; the worker
 * calls complete(op, res) when its CQE arrives. */
struct nitro_io_op {
    void (*complete)(struct nitro_io_op *op, int32_t res);
};

/* A free SQE, submitting what is queued first if the SQ is full; NULL only
 * if the kernel refuses the submit (then the caller falls back to sync I/O). */
NITRO_INTERNAL struct io_uring_sqe *nitro_io_sqe(struct nitro_io *io);
/* Set up an io_uring of `entries`; io->ready tells whether it worked. */
NITRO_INTERNAL void nitro_io_init(struct nitro_io *io, uint32_t entries);
NITRO_INTERNAL void nitro_io_exit(struct nitro_io *io);
/* Submit what was prepared; returns how many the kernel took. */
NITRO_INTERNAL uint32_t nitro_io_submit(struct nitro_io *io);
/* Hand every available completion to its op; returns how many. */
NITRO_INTERNAL uint32_t nitro_io_reap(struct nitro_io *io);
/* Block until at least one completion is available (then reap it). */
NITRO_INTERNAL void nitro_io_wait(struct nitro_io *io);
/* Submit, then block until a completion is available; reap nothing. */
NITRO_INTERNAL void nitro_io_wait_cqe(struct nitro_io *io);

struct nitro_ring;

struct nitro_ring_ops {
    /* Serve up to budget chains; >= 0 chains done, or NITRO_ERR_* (the ring
     * then stops: ERR_GUEST means the guest broke it). */
    int (*poll)(struct nitro_ring *r, struct nitro_io *io, uint32_t budget);
    /* Before the worker sleeps: re-enable notifications; 1 if work arrived
     * meanwhile (do not sleep), 0, or NITRO_ERR_GUEST. */
    int (*arm)(struct nitro_ring *r);
    /* Woken (or about to poll again): suppress notifications. */
    void (*disarm)(struct nitro_ring *r);
    /* Optional: requests submitted to the worker's io_uring and not yet
     * completed. NULL: the ring never uses it (its I/O, if any, is its own
     * to finish: net rings, the remote-volume rings, the underlay). */
    uint32_t (*in_flight)(const struct nitro_ring *r);
    /* The worker takes or gives up the ring (its thread: per-thread state
     * such as a cipher lane lives from attach to detach). */
    int (*attach)(struct nitro_ring *r);
    void (*detach)(struct nitro_ring *r);
    void (*free)(struct nitro_ring *r);
    /* Optional. A fault in guest memory (nitro_guard.h) cut a call short
     * and broke the ring: drop state that call left half done (it still
     * points into that memory). Runs outside any guard. */
    void (*abandon)(struct nitro_ring *r);
    /* Optional: a ring with no virtqueue (the underlay's socket) names
     * the fd its worker waits on instead of a kick fd. Readable means
     * "poll me": the worker never reads it (poll() does). */
    int (*wait_fd)(const struct nitro_ring *r);
    /* Optional: memory besides the guest's that poll() reads and that can
     * vanish under it (an encrypted volume's image mapping, which SIGBUSes
     * if the file is truncated): a fault there breaks the ring too. */
    bool (*covers)(const struct nitro_ring *r, const void *addr);
    /* Optional (the remote-volume rings, whose answers may take up to
     * their io_timeout): the ring is being detached. Take no new chain;
     * send what QoS holds; service what the guest still awaits (the
     * connection, answers, io_timeout, notifications) as poll() does, and
     * set aux_fd/aux_events and timer_ns as poll() does. Returns 0 once
     * nothing is outstanding (detach() then finds nothing left), > 0
     * while something is. The worker calls it at the detach command, then
     * on each of its passes between its other rings (woken by the aux fd
     * and timer_ns, never by kicks) until it returns 0: a drain never
     * holds the worker. On a broken ring (status != NITRO_OK) it answers
     * nothing into guest memory, but must still reach 0. */
    int (*drain)(struct nitro_ring *r);
};

/* The engine's view of one ring; device code embeds it first in its own
 * struct and casts. */
struct nitro_ring {
    const struct nitro_ring_ops *ops;
    struct nitro_vq *vq;
    uint32_t kind;        /* NITRO_RING_* */
    int32_t worker;       /* owner, -1 while detached */
    int status;           /* NITRO_OK, or the error that stopped it */
    int sys_errno;        /* with NITRO_ERR_SYS */
    int kick_fd;          /* the fd in the owner's epoll set, -1: none */
    uint64_t chains;      /* chains served by poll() (atomic) */
    /* The owner's kick accounting (nitro_engine.c, "kick storms"). */
    bool kicked;          /* woken by this ring's kick since its last poll */
    bool muted;           /* kick fd out of the wake-up set: polled on a timer */
    uint32_t empty_kicks; /* kicks after which poll found nothing (decaying) */
    /* Set by poll() (CLOCK_MONOTONIC ns; 0: none): the ring holds work it
     * may not do before then (a rate limit: blk QoS). Until then the worker
     * neither arms the ring (its pending chains are not "work arrived")
     * nor sleeps past it; poll() is called again at the latest then. */
    uint64_t wake_ns;
    /* Set by poll() (CLOCK_MONOTONIC ns; 0: none): poll() wants to be
     * called again by then (a remote request's io_timeout), but unlike
     * wake_ns holds nothing back: the ring is armed and kicks wake the
     * worker as usual. The worker sleeps past neither deadline. */
    uint64_t timer_ns;
    /* Optional: one more fd the owner sleeps on (a remote volume's
     * socket), -1: none, and the EPOLLIN/EPOLLOUT it waits for (0: none).
     * The ring may change both in poll() and arm(); the worker brings its
     * epoll set up to date after each poll() and before it sleeps, and
     * ORs the events that woke it into aux_revents, which the ring clears
     * once it has looked. Between polls the worker removes the old fd from
     * its epoll set before the ring can let go of it (close it). */
    int aux_fd;
    uint32_t aux_events;
    uint32_t aux_revents;
    int aux_watched_fd;           /* the worker's: what its epoll set holds */
    uint32_t aux_watched_events;
    /* The owner's: detached but for its drain (ops->drain): off the kick
     * fd, polled through drain() only, finished when that returns 0. */
    bool draining;
};

/* Confine the calling thread (an engine worker) to the system calls
 * workers make (nitro_seccomp.c). NITRO_ERR_SYS (errno) if it cannot. */
NITRO_INTERNAL int nitro_seccomp_worker(void);

/* A detached ring of `kind` serving vq through ops (device constructors). */
static inline struct nitro_ring nitro_ring_detached(const struct nitro_ring_ops *ops,
                                                    struct nitro_vq *vq,
                                                    uint32_t kind)
{
    return (struct nitro_ring){.ops = ops, .vq = vq, .kind = kind,
                               .worker = -1, .kick_fd = -1, .aux_fd = -1,
                               .aux_watched_fd = -1};
}

/* Shared by blk and net rings: enable/disable notifications on the vq. */
NITRO_INTERNAL int nitro_ring_arm_vq(struct nitro_ring *r);
NITRO_INTERNAL void nitro_ring_disarm_vq(struct nitro_ring *r);

#endif
