/*
 * nitro_engine.c: a fixed set of worker threads that serve every ring of
 * every device (the shape of SPDK's reactors and OVS-DPDK's PMD threads).
 *
 * A worker loops over its rings calling poll(); while anything moves it
 * keeps looping, when nothing does it busy-polls for poll_us (fixed, or
 * adaptive as KVM's halt-polling: grow the window when a wake-up came soon
 * after falling asleep, shrink it when the sleep was long), then arms its
 * rings and sleeps in epoll_wait on their kick fds (and aux fds, see
 * nitro_ring.h), its io_uring's eventfd and its command eventfd. A ring
 * waiting for a rate limit (blk QoS) sets its wake_ns (nitro_ring.h): it
 * is not armed, and the worker sleeps at most until the earliest such
 * deadline (epoll_pwait2: nanoseconds, as a millisecond timeout would
 * sleep past a limit of thousands per second). A remote volume's ring
 * sets timer_ns for its requests' io_timeout: the worker sleeps past it
 * neither, but arms that ring as usual (new requests keep coming).
 *
 * Commands (attach, detach, quit) are synchronous: the caller fills the
 * worker's one command slot under its mutex, writes the command eventfd and
 * waits on a condition variable until the worker executed it between two
 * loop iterations. So a ring changes owner only while no poll() of it runs.
 *
 * Draining. A remote volume's ring (ops->drain) may hold requests its
 * server answers only at their io_timeout (an outage). Its detach command
 * takes it off its kick fd and returns at once; the ring stays on the
 * worker, *draining*: each pass calls its drain() instead of poll() (the
 * connection, answers, timeouts, notifications; no new chain), its aux fd
 * and timer_ns still wake the worker, and when drain() finds nothing left
 * the worker finishes the detach and signals `drained`. The detach caller
 * waits on that with the command slot and the engine's call_lock free, so
 * the worker serves its other rings and other callers attach and detach
 * meanwhile. A quit waits for the worker's drains (each ends by its
 * io_timeout at the latest).
 *
 * Every call that touches a ring's guest memory (poll, arm, disarm, the
 * detach hand-off, completions) runs inside a guard (nitro_guard.h): if
 * the memory is gone (SIGBUS: a frontend truncated its memfd) the ring
 * breaks with NITRO_FAULT_MEMORY and the worker goes on with its other
 * rings. A ring's guard also covers memory of its own that can vanish the
 * same way (ops->covers: an encrypted volume's image mapping, should the
 * file shrink under it). What a jump out of such a call can leave behind, and why each is
 * safe:
 * - chains popped and never completed: the ring is broken for good; a
 *   device reset (nitro_vq_reset) forgets them;
 * - a blk completion cut short (its request never freed, in_flight never
 *   decremented): detaching a broken ring waits until this worker has no
 *   SQE in the kernel at all (io.pending), not for the ring's count; the
 *   next attach rebuilds the request slots;
 * - blk requests counted in the device's inflight gauge and never
 *   answered: the ring's blk_queue counts them and gives them back when
 *   the ring is freed (blk_queue_forget);
 * - a lock: only the switch's RX slot locks are taken around guest memory,
 *   inside guards of their own that release them (nitro_switch.c);
 * - a TX batch half switched: the ring's abandon() drops it.
 * Workers block every asynchronous signal (Python's handlers run on its
 * own threads); SIGBUS and the other synchronous ones stay deliverable.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "nitro_efd.h"
#include "nitro_guard.h"
#include "nitro_ring.h"

/* Chains one poll() may serve before the worker moves to its next ring:
 * small enough that a busy ring cannot starve the others for long, large
 * enough to amortise the call. */
#define RING_BUDGET 64
#define MAX_RINGS_PER_WORKER 1024
#define EPOLL_BATCH 64
#define URING_ENTRIES 256
#define ADAPTIVE_START_US 0
#define ADAPTIVE_GROW_FROM_US 10
/* The adaptive window's ceiling: KVM's halt_poll_ns default (200 us). A
 * wake-up later than this is not worth a core spinning for it. */
#define ADAPTIVE_MAX_US 200
/* Kick storms. A driver kicks after it published chains, and only while
 * notifications are on; a kick whose ring then holds nothing is rare and
 * harmless once. A frontend that writes its kick eventfd in a loop would
 * wake the worker at every attempt to sleep, so it spins for good: a core
 * taken from every ring on it. A ring whose kicks keep finding nothing
 * (MUTE_AFTER of them, halved by each poll that found work) has its kick
 * fd taken out of the wake-up set; the worker then polls it on waking and
 * at least every MUTED_POLL_MS, and gives it its kicks back when a poll
 * finds work. Only for rings whose kick is the only news of work (blk,
 * net TX); an RX ring's kick says "buffers added", which a poll does not
 * count as chains. */
#define MUTE_AFTER 64
#define MUTED_POLL_MS 1

enum cmd { CMD_NONE, CMD_ATTACH, CMD_DETACH, CMD_QUIT, CMD_SECCOMP,
           CMD_TEST_SYSCALL };

struct worker {
    struct nitro_engine *engine;
    uint32_t id;
    int32_t cpu;
    pthread_t thread;
    bool started;
    int epfd;
    int cmd_fd;       /* eventfd: a command is waiting */
    int uring_fd;     /* eventfd registered with the io_uring, -1: none */
    struct nitro_io io;
    struct nitro_ring *rings[MAX_RINGS_PER_WORKER];
    uint32_t nrings;
    uint32_t poll_us;   /* current busy-poll window */
    long nivcsw;        /* involuntary context switches at the last look */
    uint32_t wakes;     /* sleeps since then */
    bool contended;     /* preempted between the last two looks */
    uint32_t nmuted;    /* rings muted for kick storms */
    /* The command slot. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    atomic_bool cmd_pending;
    enum cmd cmd;
    struct nitro_ring *cmd_ring;
    int64_t cmd_arg;
    int64_t cmd_rc;
    bool cmd_done;
    /* Draining rings (see the top): how many, a quit waiting for them,
     * the detach callers waiting for them (counted by the worker, so the
     * worker's memory outlives each: worker_fini waits for none left),
     * and the condition (with `lock`) a drain's end is broadcast on. */
    uint32_t ndraining;
    bool quitting;
    uint32_t drain_waiters;
    pthread_cond_t drained;
    struct nitro_worker_stats stats;
};

struct nitro_engine {
    uint32_t nworkers;
    int32_t poll_us;        /* configured: fixed, or NITRO_ENGINE_POLL_ADAPTIVE */
    uint32_t flags;
    int event_fd;           /* a ring stopped on an error */
    pthread_mutex_t call_lock;  /* one command in flight per engine */
    struct worker workers[];
};

/* ---- io_uring (nitro_io.c) ---------------------------------------------- */

static void io_submit(struct worker *w)
{
    nitro_stat_add(&w->stats.io_submitted, nitro_io_submit(&w->io));
}

static void ring_memory_fault(struct worker *w, struct nitro_ring *r);
static bool worker_covers(const void *ctx, const void *addr);
static struct nitro_ring *ring_covering(const struct worker *w,
                                        const void *addr);

/* Reap completions inside a guard over every ring of the worker; false
 * when a fault cut it short (the faulting ring is broken by then). */
static bool io_reap_guarded(struct worker *w, uint32_t *n)
{
    struct nitro_guard g;
    uint64_t outer = nitro_batch_ns;
    if (NITRO_GUARD_ENTER(&g, worker_covers, w)) {
        const void *addr = g.fault_addr;
        nitro_guard_leave(&g);
        nitro_batch_ns = outer;
        ring_memory_fault(w, ring_covering(w, addr));
        (*n)++;  /* a completion was handled, if only in part */
        return false;
    }
    nitro_batch_ns = nitro_now_ns();  /* one read for every CQE here */
    *n += nitro_io_reap(&w->io);
    nitro_batch_ns = outer;
    nitro_guard_leave(&g);
    return true;
}

static uint32_t io_reap(struct worker *w)
{
    uint32_t n = 0;
    /* No SQE in the kernel, so no CQE to come: a worker serving only net
     * rings skips the guard and the CQ look twice per pass. */
    if (w->io.pending == 0)
        return 0;
    while (!io_reap_guarded(w, &n))
        continue;  /* the CQEs after the faulting one */
    return n;
}

static void io_init(struct worker *w, bool sync_io)
{
    w->uring_fd = -1;
    if (sync_io)
        return;
    nitro_io_init(&w->io, URING_ENTRIES);
    if (!w->io.ready)
        return;
    w->uring_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->uring_fd < 0 ||
        io_uring_register_eventfd(&w->io.uring, w->uring_fd) < 0) {
        if (w->uring_fd >= 0)
            close(w->uring_fd);
        w->uring_fd = -1;
        nitro_io_exit(&w->io);
        return;
    }
    w->stats.uring = 1;
}

/* ---- rings on a worker --------------------------------------------------- */

static void ring_stop(struct worker *w, struct nitro_ring *r, int rc)
{
    if (r->status != NITRO_OK)
        return;
    r->sys_errno = rc == NITRO_ERR_SYS ? errno : 0;
    __atomic_store_n(&r->status, rc, __ATOMIC_RELEASE);
    nitro_eventfd_signal(w->engine->event_fd);
}

/* A guard (nitro_guard.h) caught a fault in r's guest memory. */
static void ring_memory_fault(struct worker *w, struct nitro_ring *r)
{
    if (r->vq != NULL)  /* a ring without one (the underlay) covers no memory */
        nitro_vq_set_fault(r->vq, NITRO_FAULT_MEMORY);
    if (r->ops->abandon)
        r->ops->abandon(r);
    ring_stop(w, r, NITRO_ERR_GUEST);
}

enum ring_call { CALL_POLL, CALL_ARM, CALL_DISARM, CALL_DETACH, CALL_DRAIN };

/* r's guest memory, or other memory r's calls read that can vanish. */
static bool ring_covers(const void *ctx, const void *addr)
{
    const struct nitro_ring *r = ctx;
    return nitro_guard_covers_vq(r->vq, addr) ||
           (r->ops->covers != NULL && r->ops->covers(r, addr));
}

/* One call into r's device code, guarded by r's memory: a fault breaks r
 * (NITRO_ERR_GUEST) instead of the process. */
static int ring_call(struct worker *w, struct nitro_ring *r, enum ring_call c)
{
    struct nitro_guard g;
    if (NITRO_GUARD_ENTER(&g, ring_covers, r)) {
        nitro_guard_leave(&g);
        ring_memory_fault(w, r);
        return NITRO_ERR_GUEST;
    }
    int rc = 0;
    switch (c) {
    case CALL_POLL:
        rc = r->ops->poll(r, &w->io, RING_BUDGET);
        break;
    case CALL_ARM:
        rc = r->ops->arm(r);
        break;
    case CALL_DISARM:
        r->ops->disarm(r);
        break;
    case CALL_DETACH:
        if (r->ops->detach)
            r->ops->detach(r);
        break;
    case CALL_DRAIN:
        rc = r->ops->drain(r);
        break;
    }
    nitro_guard_leave(&g);
    return rc;
}

/* What a guard around completions answers for: any ring of the worker. */
static struct nitro_ring *ring_covering(const struct worker *w, const void *addr)
{
    for (uint32_t i = 0; i < w->nrings; i++)
        if (w->rings[i]->vq != NULL && nitro_vq_covers(w->rings[i]->vq, addr))
            return w->rings[i];
    return NULL;
}

static bool worker_covers(const void *ctx, const void *addr)
{
    return ring_covering(ctx, addr) != NULL;
}

static int epoll_watch(struct worker *w, struct nitro_ring *r)
{
    r->kick_fd = r->ops->wait_fd ? r->ops->wait_fd(r) : nitro_vq_kick_fd(r->vq);
    if (r->kick_fd < 0)
        return NITRO_OK;  /* the frontend polls: so do we, while busy */
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = r};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, r->kick_fd, &ev) < 0) {
        r->kick_fd = -1;
        return NITRO_ERR_SYS;
    }
    return NITRO_OK;
}

static void ring_set_muted(struct worker *w, struct nitro_ring *r, bool muted)
{
    struct epoll_event ev = {.events = muted ? 0 : EPOLLIN, .data.ptr = r};
    if (r->kick_fd < 0 || epoll_ctl(w->epfd, EPOLL_CTL_MOD, r->kick_fd, &ev) < 0)
        return;
    r->muted = muted;
    w->nmuted += muted ? 1 : (uint32_t)-1;
    __atomic_store_n(&w->stats.muted, w->nmuted, __ATOMIC_RELAXED);
    if (muted)
        nitro_stat_add(&w->stats.mutes, 1);
}

/* After r's poll found n chains: the kick storm rule (MUTE_AFTER). */
static void ring_count_kick(struct worker *w, struct nitro_ring *r, int n)
{
    if (n > 0) {
        r->empty_kicks /= 2;
        if (r->muted)
            ring_set_muted(w, r, false);
    } else if (r->kicked && ++r->empty_kicks >= MUTE_AFTER && !r->muted &&
               (r->kind == NITRO_RING_BLK || r->kind == NITRO_RING_NET_TX)) {
        ring_set_muted(w, r, true);
    }
    r->kicked = false;
}

/* epoll data of a ring's aux fd: the ring's address with the low bit set
 * (rings are at least 8-byte aligned), so a wake-up tells which fd of the
 * ring fired. */
#define AUX_TAG 1u

/* Bring the epoll set up to date with what r wants on its aux fd. */
static void aux_sync(struct worker *w, struct nitro_ring *r)
{
    int fd = (r->status == NITRO_OK || r->draining) && r->aux_events ? r->aux_fd : -1;
    uint32_t ev = fd >= 0 ? r->aux_events : 0;
    if (fd == r->aux_watched_fd && ev == r->aux_watched_events)
        return;
    if (r->aux_watched_fd >= 0 && fd != r->aux_watched_fd) {
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, r->aux_watched_fd, NULL);
        r->aux_watched_fd = -1;
    }
    if (fd >= 0) {
        struct epoll_event e = {.events = ev,
                                .data.ptr = (void *)((uintptr_t)r | AUX_TAG)};
        int op = r->aux_watched_fd == fd ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
        if (epoll_ctl(w->epfd, op, fd, &e) < 0) {
            /* Not watched: the ring is polled while busy anyway, and
             * stopping it here would fail requests a retry may serve. */
            fd = -1;
            ev = 0;
        }
    }
    r->aux_watched_fd = fd;
    r->aux_watched_events = ev;
}

static int worker_attach(struct worker *w, struct nitro_ring *r)
{
    if (w->nrings == MAX_RINGS_PER_WORKER)
        return NITRO_ERR_NOMEM;
    r->status = NITRO_OK;
    r->kicked = r->muted = false;
    r->empty_kicks = 0;
    r->wake_ns = r->timer_ns = 0;
    int rc = r->ops->attach ? r->ops->attach(r) : NITRO_OK;
    if (rc == NITRO_OK)
        rc = epoll_watch(w, r);
    if (rc != NITRO_OK) {
        if (r->ops->detach)
            r->ops->detach(r);
        return rc;
    }
    r->worker = (int32_t)w->id;
    w->rings[w->nrings++] = r;
    ring_call(w, r, CALL_DISARM);
    nitro_stat_add(&w->stats.rings, 1);
    return NITRO_OK;
}

/* Wait until every request r submitted has completed (other rings' may
 * complete meanwhile too: they are handed back as usual). A broken ring's
 * count may be wrong (a fault cut a completion short): then wait until
 * the worker has nothing in the kernel at all, so that no CQE can name
 * one of its requests after it is freed. */
static void ring_wait_idle(struct worker *w, struct nitro_ring *r)
{
    while (w->io.ready && (r->status == NITRO_OK ? nitro_ring_in_flight(r) > 0
                                                 : w->io.pending > 0)) {
        nitro_io_wait_cqe(&w->io);
        io_reap(w);
    }
}

/* What worker_detach returns for a ring left draining. */
#define DETACH_DRAINING 1

static void stat_draining(struct worker *w)
{
    __atomic_store_n(&w->stats.draining, w->ndraining, __ATOMIC_RELAXED);
}

/* One look at a draining ring: 0 when nothing is left, > 0 while it
 * awaits answers, < 0 when a fault cut the look short (the ring is broken
 * now: look again at once, its answers no longer go to the guest). */
static int ring_drain(struct worker *w, struct nitro_ring *r)
{
    int n = ring_call(w, r, CALL_DRAIN);
    aux_sync(w, r);
    return n;
}

/* The end of a detach: r leaves the epoll set and the worker (rings[i]). */
static void worker_release(struct worker *w, uint32_t i)
{
    struct nitro_ring *r = w->rings[i];
    if (r->aux_watched_fd >= 0)
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, r->aux_watched_fd, NULL);
    r->aux_watched_fd = -1;
    r->aux_watched_events = 0;
    /* Notifications on, so the next owner (or none) gets the next kick. */
    if (r->status == NITRO_OK)
        ring_call(w, r, CALL_ARM);
    /* A fault inside detach() (blk: its last call to the guest, whose
     * flag it clears first) leaves the rest undone: once more. */
    if (ring_call(w, r, CALL_DETACH) < 0)
        ring_call(w, r, CALL_DETACH);
    w->rings[i] = w->rings[--w->nrings];
    if (r->draining) {
        r->draining = false;
        w->ndraining--;
        stat_draining(w);
    }
    __atomic_store_n(&r->worker, -1, __ATOMIC_RELEASE);
    nitro_stat_sub(&w->stats.rings, 1);
}

/* The detach command: NITRO_OK once r is released, or DETACH_DRAINING
 * when it awaits answers (the caller then waits for `drained`). */
static int worker_detach(struct worker *w, struct nitro_ring *r)
{
    uint32_t i = 0;
    while (i < w->nrings && w->rings[i] != r)
        i++;
    if (i == w->nrings)  /* a drain another caller waited for ended */
        return r->worker < 0 ? NITRO_OK : NITRO_ERR_ARG;
    if (r->draining)
        return DETACH_DRAINING;  /* a second caller: wait with the first */
    ring_wait_idle(w, r);
    if (r->muted)
        ring_set_muted(w, r, false);
    if (r->kick_fd >= 0)
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, r->kick_fd, NULL);
    r->kick_fd = -1;
    if (r->ops->drain != NULL) {
        r->draining = true;
        r->wake_ns = 0;  /* drain() sends what QoS held: no rate wait left */
        if (ring_drain(w, r) != 0) {
            w->ndraining++;
            stat_draining(w);
            return DETACH_DRAINING;
        }
        r->draining = false;
    }
    worker_release(w, i);
    return NITRO_OK;
}

/* Between passes: look at every draining ring, release those that found
 * nothing left and wake their callers; how many looks were cut short. */
static uint32_t drain_rings(struct worker *w)
{
    uint32_t faults = 0;
    /* Downwards: worker_release moves the last ring into the freed slot. */
    for (uint32_t i = w->nrings; i-- > 0;) {
        struct nitro_ring *r = w->rings[i];
        if (!r->draining)
            continue;
        int n = ring_drain(w, r);
        faults += n < 0;
        if (n != 0)
            continue;
        pthread_mutex_lock(&w->lock);
        worker_release(w, i);
        pthread_cond_broadcast(&w->drained);
        pthread_mutex_unlock(&w->lock);
    }
    return faults;
}

/* Returns false on CMD_QUIT. */
static bool worker_command(struct worker *w)
{
    pthread_mutex_lock(&w->lock);
    atomic_store(&w->cmd_pending, false);
    bool go_on = true;
    switch (w->cmd) {
    case CMD_ATTACH:
        w->cmd_rc = worker_attach(w, w->cmd_ring);
        break;
    case CMD_DETACH:
        w->cmd_rc = worker_detach(w, w->cmd_ring);
        if (w->cmd_rc == DETACH_DRAINING)
            w->drain_waiters++;  /* the caller's, until it saw the end */
        break;
    case CMD_QUIT:
        if (w->ndraining > 0) {
            /* Done when the last drain ends (worker_main calls again). */
            w->quitting = true;
            pthread_mutex_unlock(&w->lock);
            return true;
        }
        w->cmd_rc = NITRO_OK;
        go_on = false;
        break;
    case CMD_SECCOMP:
        w->cmd_rc = nitro_seccomp_worker();
        if (w->cmd_rc == NITRO_ERR_SYS)
            w->cmd_arg = errno;
        break;
    case CMD_TEST_SYSCALL: {
        /* The caller's {nr, a0, a1, a2}, on its stack while it waits. */
        const int64_t *a = (const int64_t *)(intptr_t)w->cmd_arg;
        long rc = syscall(a[0], a[1], a[2], a[3], 0, 0, 0);
        w->cmd_rc = rc < 0 ? -errno : rc;
        break;
    }
    case CMD_NONE:
        break;
    }
    if (w->cmd != CMD_NONE) {
        w->cmd = CMD_NONE;
        w->cmd_done = true;
        pthread_cond_broadcast(&w->cond);
    }
    pthread_mutex_unlock(&w->lock);
    return go_on;
}

/* ---- the loop ------------------------------------------------------------ */

static uint32_t poll_rings(struct worker *w)
{
    uint32_t work = io_reap(w);
    if (w->ndraining > 0)
        work += drain_rings(w);
    for (uint32_t i = 0; i < w->nrings; i++) {
        struct nitro_ring *r = w->rings[i];
        if (r->status != NITRO_OK || r->draining)
            continue;
        int n = ring_call(w, r, CALL_POLL);
        aux_sync(w, r);
        if (n < 0) {
            ring_stop(w, r, n);
            continue;
        }
        ring_count_kick(w, r, n);
        if (n > 0) {
            nitro_stat_add(&r->chains, (uint64_t)n);
            nitro_stat_add(&w->stats.chains, (uint64_t)n);
        }
        work += (uint32_t)n;
    }
    io_submit(w);
    work += io_reap(w);
    return work;
}

/* A ring with a hold still ahead waits for time, not for the guest: its
 * pending chains are not work, and no kick is needed to find them. */
static bool ring_waiting(const struct nitro_ring *r, uint64_t now)
{
    return r->wake_ns != 0 && r->wake_ns > now;
}

static uint64_t earliest(uint64_t a, uint64_t b)
{
    return a == 0 || (b != 0 && b < a) ? b : a;
}

/* The earliest wake_ns or timer_ns of w's serving and draining rings
 * (a broken ring still drains); 0: none. */
static uint64_t next_deadline(const struct worker *w)
{
    uint64_t first = 0;
    for (uint32_t i = 0; i < w->nrings; i++) {
        const struct nitro_ring *r = w->rings[i];
        if (r->status == NITRO_OK || r->draining)
            first = earliest(earliest(first, r->wake_ns), r->timer_ns);
    }
    return first;
}

/* Re-enable notifications everywhere (but on rings waiting for a deadline
 * after now); false if work arrived meanwhile. */
static bool arm_all(struct worker *w, uint64_t now)
{
    bool quiet = true;
    for (uint32_t i = 0; i < w->nrings; i++) {
        struct nitro_ring *r = w->rings[i];
        /* A draining ring waits on its aux fd and timer_ns only. */
        if (r->status != NITRO_OK || r->draining || ring_waiting(r, now))
            continue;
        int rc = ring_call(w, r, CALL_ARM);
        if (rc < 0)
            ring_stop(w, r, rc);
        else if (rc > 0)
            quiet = false;
        aux_sync(w, r);
    }
    return quiet;
}

static void disarm_all(struct worker *w)
{
    for (uint32_t i = 0; i < w->nrings; i++)
        if (w->rings[i]->status == NITRO_OK && !w->rings[i]->draining)
            ring_call(w, w->rings[i], CALL_DISARM);
}

/* Sleep until a kick, a completion, a command or the deadline (0: none);
 * true when the deadline ended it. */
static bool sleep_on_epoll(struct worker *w, uint64_t deadline)
{
    struct epoll_event evs[EPOLL_BATCH];
    int n;
    /* Muted rings (kick storms) are polled at least every MUTED_POLL_MS. */
    if (w->nmuted) {
        uint64_t muted = nitro_now_ns() + MUTED_POLL_MS * 1000000ull;
        if (deadline == 0 || muted < deadline)
            deadline = muted;
    }
    do {
        struct timespec ts, *timeout = NULL;
        if (deadline != 0) {
            uint64_t now = nitro_now_ns();
            uint64_t left = deadline > now ? deadline - now : 0;
            ts = (struct timespec){.tv_sec = (time_t)(left / 1000000000u),
                                   .tv_nsec = (long)(left % 1000000000u)};
            timeout = &ts;
        }
        n = epoll_pwait2(w->epfd, evs, EPOLL_BATCH, timeout, NULL);
    } while (n < 0 && errno == EINTR);
    nitro_stat_add(&w->stats.wakeups, 1);
    for (int i = 0; i < n; i++) {
        struct nitro_ring *r = evs[i].data.ptr;
        if (r == NULL)
            continue;  /* the command or io_uring eventfd: drained below */
        if ((uintptr_t)r & AUX_TAG) {
            r = (struct nitro_ring *)((uintptr_t)r & ~(uintptr_t)AUX_TAG);
            r->aux_revents |= evs[i].events;  /* the ring drains its fd */
            continue;
        }
        if (r->ops->wait_fd)
            continue;  /* readable means "poll me": poll() reads it */
        /* A stuck read breaks the ring; its next poll reports it. */
        if (nitro_efd_drain(r->kick_fd) < 0)
            nitro_vq_set_fault(r->vq, NITRO_FAULT_EVENTFD);
        else
            nitro_vq_count_kick(r->vq);
        r->kicked = true;
    }
    if (w->uring_fd >= 0)
        nitro_eventfd_drain(w->uring_fd);
    return n == 0;
}

/* Was the worker preempted since the last look: did another thread want
 * this core while the worker had it? A system call, so looked at once
 * every CONTENTION_LOOK_EVERY sleeps (a worker serving 4 KiB reads sleeps
 * tens of thousands of times a second). */
#define CONTENTION_LOOK_EVERY 8

static bool worker_preempted(struct worker *w)
{
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) != 0)
        return false;
    bool preempted = ru.ru_nivcsw != w->nivcsw;
    w->nivcsw = ru.ru_nivcsw;
    return preempted;
}

/* halt-polling's rule: a wake-up within the ceiling means polling longer
 * would have caught it; a long sleep means polling was wasted. And, as
 * halt-polling stops when another task is runnable: a spin is free only
 * while nothing else wants the core. A worker the scheduler preempted
 * since the last look halves its window and does not grow it until a look
 * finds it was not preempted. The threads that wanted the core may be the
 * very ones the worker waits for: librbd's, or an OSD or NBD server on the
 * same host. bench.rbd (the OSD on the same two cores), poll_us adaptive,
 * 128 KiB reads: 0.73-0.81 of qsd without this rule (eight runs), 0.98 and
 * 1.11 with it (two runs; two full bench runs: 0.92, 0.94). */
static void adapt_poll(struct worker *w, uint64_t slept_ns)
{
    if (w->engine->poll_us != NITRO_ENGINE_POLL_ADAPTIVE)
        return;
    uint64_t ceiling = ADAPTIVE_MAX_US * 1000ull;
    if (++w->wakes >= CONTENTION_LOOK_EVERY) {
        w->wakes = 0;
        w->contended = worker_preempted(w);
        if (w->contended)
            w->poll_us /= 2;
    }
    if (slept_ns >= ceiling) {
        w->poll_us /= 2;
    } else if (!w->contended) {  /* no growth until a look finds the core free */
        uint32_t grown = w->poll_us ? w->poll_us * 2 : ADAPTIVE_GROW_FROM_US;
        w->poll_us = grown > ADAPTIVE_MAX_US ? ADAPTIVE_MAX_US : grown;
    }
    __atomic_store_n(&w->stats.poll_us, w->poll_us, __ATOMIC_RELAXED);
}

/* One idle pass: spin a little, or arm the rings and sleep. Returns the
 * time it last read (the start of the next pass). */
static uint64_t idle_step(struct worker *w, uint64_t *last_work)
{
    uint64_t t = nitro_now_ns();
    if (t - *last_work < (uint64_t)w->poll_us * 1000) {
        __builtin_ia32_pause();
        uint64_t now = nitro_now_ns();
        nitro_stat_add(&w->stats.poll_ns, now - t);
        return now;
    }
    /* In-flight I/O needs no kick: its CQE wakes the uring eventfd. */
    if (!arm_all(w, t)) {
        disarm_all(w);
        return t;
    }
    uint64_t deadline = next_deadline(w);
    if (atomic_load(&w->cmd_pending) ||
        (deadline != 0 && deadline <= nitro_now_ns())) {
        disarm_all(w);
        return t;
    }
    bool timed_out = sleep_on_epoll(w, deadline);
    uint64_t woke = nitro_now_ns();
    nitro_stat_add(&w->stats.sleep_ns, woke - t);
    /* A deadline that ended the sleep says nothing about when the guest
     * kicks: polling longer would not have caught it. */
    if (!timed_out)
        adapt_poll(w, woke - t);
    disarm_all(w);
    *last_work = woke;
    return woke;
}

/* Asynchronous signals go to Python's threads; faults stay ours. */
static void worker_sigmask(void)
{
    sigset_t set;
    sigfillset(&set);
    static const int synchronous[] = {SIGBUS, SIGSEGV, SIGFPE, SIGILL,
                                      SIGSYS, SIGABRT, SIGTRAP};
    for (size_t i = 0; i < sizeof(synchronous) / sizeof(int); i++)
        sigdelset(&set, synchronous[i]);
    sigdelset(&set, nitro_efd_signo());  /* ends a stuck eventfd access */
    pthread_sigmask(SIG_SETMASK, &set, NULL);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    worker_sigmask();
    if (w->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(w->cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    if (w->engine->poll_us == NITRO_ENGINE_POLL_ADAPTIVE)
        worker_preempted(w);  /* from now: the thread's start is no contention */
    uint64_t last_work = nitro_now_ns();
    /* One clock read per pass: the end of a pass starts the next. */
    uint64_t t = last_work;
    for (;;) {
        if (atomic_load(&w->cmd_pending) || (w->quitting && w->ndraining == 0)) {
            if (!worker_command(w))
                break;
            t = nitro_now_ns();  /* a command's time is not a pass's */
        }
        nitro_batch_ns = t;  /* the pass's requests are taken at its start */
        uint32_t work = poll_rings(w);
        nitro_batch_ns = 0;
        if (work > 0) {
            last_work = nitro_now_ns();
            nitro_stat_add(&w->stats.busy_ns, last_work - t);
            t = last_work;
            continue;
        }
        t = idle_step(w, &last_work);
    }
    return NULL;
}

/* ---- commands ------------------------------------------------------------- */

static int64_t worker_call(struct nitro_engine *e, struct worker *w,
                           enum cmd c, struct nitro_ring *r, int64_t arg)
{
    pthread_mutex_lock(&e->call_lock);
    pthread_mutex_lock(&w->lock);
    w->cmd = c;
    w->cmd_ring = r;
    w->cmd_arg = arg;
    w->cmd_done = false;
    atomic_store(&w->cmd_pending, true);
    nitro_eventfd_signal(w->cmd_fd);
    while (!w->cmd_done)
        pthread_cond_wait(&w->cond, &w->lock);
    int64_t rc = w->cmd_rc;
    int err = (int)w->cmd_arg;
    nitro_eventfd_drain(w->cmd_fd);
    pthread_mutex_unlock(&w->lock);
    pthread_mutex_unlock(&e->call_lock);
    if (c == CMD_SECCOMP && rc == NITRO_ERR_SYS)
        errno = err;
    return rc;
}

int nitro_engine_attach(struct nitro_engine *e, struct nitro_ring *r,
                        uint32_t worker)
{
    if (e == NULL || r == NULL || worker >= e->nworkers || r->worker >= 0 ||
        (r->vq != NULL ? !nitro_vq_ready(r->vq) : r->ops->wait_fd == NULL))
        return NITRO_ERR_ARG;
    return (int)worker_call(e, &e->workers[worker], CMD_ATTACH, r, 0);
}

int nitro_engine_detach(struct nitro_engine *e, struct nitro_ring *r)
{
    if (e == NULL || r == NULL)
        return NITRO_ERR_ARG;
    int32_t owner = __atomic_load_n(&r->worker, __ATOMIC_ACQUIRE);
    if (owner < 0)
        return NITRO_OK;
    struct worker *w = &e->workers[owner];
    int rc = (int)worker_call(e, w, CMD_DETACH, r, 0);
    if (rc != DETACH_DRAINING)
        return rc;
    /* The worker drains r between its other rings; wait for the end with
     * its command slot and the engine's call_lock free for others. */
    pthread_mutex_lock(&w->lock);
    while (__atomic_load_n(&r->worker, __ATOMIC_ACQUIRE) >= 0)
        pthread_cond_wait(&w->drained, &w->lock);
    if (--w->drain_waiters == 0)
        pthread_cond_broadcast(&w->drained);  /* a worker_fini may wait */
    pthread_mutex_unlock(&w->lock);
    return NITRO_OK;
}

/* ---- life cycle ------------------------------------------------------------ */

static int worker_init(struct nitro_engine *e, uint32_t id, int32_t cpu)
{
    struct worker *w = &e->workers[id];
    w->engine = e;
    w->id = id;
    w->cpu = cpu;
    w->poll_us = e->poll_us == NITRO_ENGINE_POLL_ADAPTIVE ? ADAPTIVE_START_US
                                                          : (uint32_t)e->poll_us;
    w->stats.poll_us = w->poll_us;
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    pthread_cond_init(&w->drained, NULL);
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    w->cmd_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->epfd < 0 || w->cmd_fd < 0)
        return NITRO_ERR_SYS;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->cmd_fd, &ev) < 0)
        return NITRO_ERR_SYS;
    io_init(w, e->flags & NITRO_ENGINE_SYNC_IO);
    if (w->uring_fd >= 0 &&
        epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->uring_fd, &ev) < 0)
        return NITRO_ERR_SYS;
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0)
        return NITRO_ERR_SYS;
    w->started = true;
    /* Named, so top -H and /proc/PID/task/TID/comm show which is which. */
    char name[16];
    snprintf(name, sizeof(name), "nitro-w%hu", (unsigned short)id);
    pthread_setname_np(w->thread, name);
    return NITRO_OK;
}

static void worker_fini(struct nitro_engine *e, struct worker *w)
{
    if (w->started) {
        worker_call(e, w, CMD_QUIT, NULL, 0);
        pthread_join(w->thread, NULL);
        /* Detach callers woken by the last drains leave w first. */
        pthread_mutex_lock(&w->lock);
        while (w->drain_waiters > 0)
            pthread_cond_wait(&w->drained, &w->lock);
        pthread_mutex_unlock(&w->lock);
    }
    nitro_io_exit(&w->io);
    if (w->uring_fd >= 0)
        close(w->uring_fd);
    if (w->epfd >= 0)
        close(w->epfd);
    if (w->cmd_fd >= 0)
        close(w->cmd_fd);
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->cond);
    pthread_cond_destroy(&w->drained);
}

struct nitro_engine *nitro_engine_new(uint32_t workers, const int32_t *cpus,
                                      int32_t poll_us, uint32_t flags)
{
    if (workers == 0 || workers > NITRO_ENGINE_MAX_WORKERS ||
        poll_us > NITRO_ENGINE_POLL_MAX_US ||
        (poll_us < 0 && poll_us != NITRO_ENGINE_POLL_ADAPTIVE)) {
        errno = EINVAL;
        return NULL;
    }
    struct nitro_engine *e =
        calloc(1, sizeof(*e) + workers * sizeof(struct worker));
    if (e == NULL)
        return NULL;
    e->poll_us = poll_us;
    e->flags = flags;
    nitro_guard_install();
    if (nitro_efd_watch_start() != NITRO_OK) {
        free(e);
        return NULL;
    }
    pthread_mutex_init(&e->call_lock, NULL);
    for (uint32_t i = 0; i < workers; i++)
        e->workers[i].epfd = e->workers[i].cmd_fd = e->workers[i].uring_fd = -1;
    e->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int rc = e->event_fd < 0 ? NITRO_ERR_SYS : NITRO_OK;
    for (uint32_t i = 0; i < workers && rc == NITRO_OK; i++) {
        rc = worker_init(e, i, cpus ? cpus[i] : -1);
        e->nworkers = i + 1;
        /* Confined before it is handed any ring. */
        if (rc == NITRO_OK && (flags & NITRO_ENGINE_SECCOMP))
            rc = (int)worker_call(e, &e->workers[i], CMD_SECCOMP, NULL, 0);
    }
    if (rc != NITRO_OK) {
        int saved = errno;
        nitro_engine_free(e);
        errno = saved;
        return NULL;
    }
    return e;
}

void nitro_engine_free(struct nitro_engine *e)
{
    if (e == NULL)
        return;
    for (uint32_t i = 0; i < e->nworkers; i++)
        worker_fini(e, &e->workers[i]);
    if (e->event_fd >= 0)
        close(e->event_fd);
    pthread_mutex_destroy(&e->call_lock);
    free(e);
}

uint32_t nitro_engine_workers(const struct nitro_engine *e)
{
    return e->nworkers;
}

int nitro_engine_event_fd(const struct nitro_engine *e)
{
    return e->event_fd;
}

int nitro_engine_worker_stats(const struct nitro_engine *e, uint32_t worker,
                              struct nitro_worker_stats *out)
{
    if (e == NULL || out == NULL || worker >= e->nworkers)
        return NITRO_ERR_ARG;
    nitro_stats_copy(out, &e->workers[worker].stats, sizeof(*out));
    return NITRO_OK;
}

int64_t nitro_engine_test_syscall(struct nitro_engine *e, uint32_t worker,
                                  int64_t nr, int64_t a0, int64_t a1, int64_t a2)
{
    if (e == NULL || worker >= e->nworkers)
        return NITRO_ERR_ARG;
    int64_t call[4] = {nr, a0, a1, a2};
    return worker_call(e, &e->workers[worker], CMD_TEST_SYSCALL, NULL,
                       (int64_t)(intptr_t)call);
}
