/*
 * nitro_guard.c: the SIGBUS handler and the guard stack (nitro_guard.h).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>

#include "nitro_guard.h"

/* The innermost guard of this thread. initial-exec: the handler must not
 * reach __tls_get_addr, which may allocate on a thread's first access (a
 * SIGBUS inside malloc would then deadlock instead of crash). One pointer
 * fits the static TLS glibc reserves for dlopen'ed objects. */
static __thread struct nitro_guard *guard_top
    __attribute__((tls_model("initial-exec")));

static struct sigaction previous;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;

static const struct nitro_guard *owner_of(const struct nitro_guard *top,
                                          const void *addr)
{
    for (const struct nitro_guard *g = top; g != NULL; g = g->outer)
        if (g->covers(g->ctx, addr))
            return g;
    return NULL;
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    struct nitro_guard *top = guard_top;
    /* BUS_ADRERR: a page past the end of the file (truncated, or a full
     * tmpfs/hugetlbfs); BUS_MCEERR_AR: a poisoned page we touched. Both
     * are synchronous faults of this thread's own access. */
    if (top != NULL && (si->si_code == BUS_ADRERR || si->si_code == BUS_MCEERR_AR)) {
        const struct nitro_guard *owner = owner_of(top, si->si_addr);
        if (owner != NULL) {
            top->fault_addr = si->si_addr;
            top->owner = owner;
            siglongjmp(top->jb, 1);
        }
    }
    /* Not guest memory: whatever SIGBUS did before us (a crash, Python's
     * faulthandler). A fault re-executes the access and lands there; a
     * sent signal is sent again. */
    (void)uc;
    sigaction(sig, &previous, NULL);
    if (si->si_code <= 0)
        raise(sig);
}

static void install(void)
{
    struct sigaction sa = {.sa_sigaction = on_sigbus,
                           .sa_flags = SA_SIGINFO | SA_NODEFER};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &previous);
}

void nitro_guard_install(void)
{
    pthread_once(&install_once, install);
}

void nitro_guard_push(struct nitro_guard *g,
                      bool (*covers)(const void *, const void *),
                      const void *ctx)
{
    g->covers = covers;
    g->ctx = ctx;
    g->lock = NULL;
    g->fault_addr = NULL;
    g->owner = NULL;
    g->outer = guard_top;
    /* The handler runs on this thread: a compiler barrier orders for it. */
    atomic_signal_fence(memory_order_seq_cst);
    guard_top = g;
    atomic_signal_fence(memory_order_seq_cst);
}

void nitro_guard_leave(struct nitro_guard *g)
{
    atomic_signal_fence(memory_order_seq_cst);
    guard_top = g->outer;
    atomic_signal_fence(memory_order_seq_cst);
    if (g->lock != NULL) {  /* only after a fault: else dropped already */
        pthread_mutex_t *lock = g->lock;
        g->lock = NULL;
        pthread_mutex_unlock(lock);
    }
}

bool nitro_guard_mine(const struct nitro_guard *g)
{
    return g->owner == g;
}

void nitro_guard_rethrow(struct nitro_guard *g)
{
    struct nitro_guard *outer = g->outer;
    const void *addr = g->fault_addr;
    const struct nitro_guard *owner = g->owner;
    nitro_guard_leave(g);
    outer->fault_addr = addr;
    outer->owner = owner;
    siglongjmp(outer->jb, 1);
}

void nitro_guard_hold(struct nitro_guard *g, pthread_mutex_t *lock)
{
    atomic_signal_fence(memory_order_seq_cst);
    g->lock = lock;
    atomic_signal_fence(memory_order_seq_cst);
}

void nitro_guard_drop(struct nitro_guard *g)
{
    atomic_signal_fence(memory_order_seq_cst);
    g->lock = NULL;
    atomic_signal_fence(memory_order_seq_cst);
}

bool nitro_guard_covers_vq(const void *vq, const void *addr)
{
    return vq != NULL && nitro_vq_covers(vq, addr);
}

bool nitro_guard_covers_mem(const void *mem, const void *addr)
{
    return nitro_mem_covers(mem, addr);
}
