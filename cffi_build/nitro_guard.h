/*
 * nitro_guard.h: surviving guest memory that vanishes (internal, not ABI).
 *
 * Guest RAM is a file the frontend owns (a memfd, a hugetlbfs file) mapped
 * MAP_SHARED. Its size is checked when it is mapped, but a frontend that
 * does not seal the file (F_SEAL_SHRINK) can truncate it afterwards, and
 * even a sealed file can fail to supply a page (hugetlbfs out of huge
 * pages, a hardware memory error): the next access to such a page raises
 * SIGBUS, whose default action kills nitro and every other tenant with it.
 *
 * So every piece of C that touches guest memory runs inside a guard: a
 * recovery point (sigsetjmp) plus what it answers for (a queue's memory,
 * or every ring of a worker) pushed on a thread-local stack. One process-
 * wide SIGBUS handler (nitro_guard_install) looks at the faulting address:
 * if a guard on the faulting thread's stack covers it, the handler jumps
 * back to the innermost guard's recovery point; anything else (a SIGBUS in
 * nitro's own memory, a kill -BUS) gets the previous disposition, that is
 * a crash as before.
 *
 * A jump skips the rest of the guarded code, so each guard's recovery path
 * must leave its data consistent. The rules:
 * - A lock taken inside a guard is recorded with nitro_guard_hold() right
 *   after it is taken and forgotten with nitro_guard_drop() right before it
 *   is released; the recovery path (nitro_guard_leave/rethrow) unlocks it.
 * - The innermost guard always catches the fault first. If the faulting
 *   address is its own memory (nitro_guard_mine) it breaks its queue
 *   (NITRO_FAULT_MEMORY) and carries on. If not, it undoes what it did and
 *   passes the fault on to the guard that owns the address
 *   (nitro_guard_rethrow), as an exception unwinds.
 * - Locals changed after sigsetjmp and read in the recovery path must be
 *   volatile (C11 7.13.2.1).
 * - sigsetjmp(jb, 0) does not save the signal mask (no system call per
 *   guard); the handler is installed SA_NODEFER, so SIGBUS is not blocked
 *   when a jump leaves it.
 */
#ifndef NITRO_GUARD_H
#define NITRO_GUARD_H

#include <pthread.h>
#include <setjmp.h>
#include <stdbool.h>

#include "nitro_vring.h"

struct nitro_guard {
    sigjmp_buf jb;
    struct nitro_guard *outer;
    /* Whether addr is memory this guard answers for; async-signal-safe. */
    bool (*covers)(const void *ctx, const void *addr);
    const void *ctx;
    pthread_mutex_t *lock;    /* held inside the guard, or NULL */
    /* Set by the handler before it jumps here. */
    const void *fault_addr;
    const struct nitro_guard *owner;  /* the guard covering fault_addr */
};

/* Install the SIGBUS handler (once per process; later calls do nothing). */
NITRO_INTERNAL void nitro_guard_install(void);

NITRO_INTERNAL void nitro_guard_push(struct nitro_guard *g,
                                     bool (*covers)(const void *, const void *),
                                     const void *ctx);
/* Enter a guard: 0 now, nonzero when a fault jumped back here (the guard
 * is then still the innermost one: finish with leave or rethrow). A macro:
 * sigsetjmp must run in the frame that stays live while the guard is. */
#define NITRO_GUARD_ENTER(g, covers, ctx) \
    (nitro_guard_push((g), (covers), (ctx)), sigsetjmp((g)->jb, 0))
/* Pop g (the innermost guard); after a fault, unlock the lock it held. */
NITRO_INTERNAL void nitro_guard_leave(struct nitro_guard *g);
/* After a fault: did it hit g's own memory? */
NITRO_INTERNAL bool nitro_guard_mine(const struct nitro_guard *g);
/* After a fault in an outer guard's memory: leave g, jump to the outer. */
NITRO_INTERNAL _Noreturn void nitro_guard_rethrow(struct nitro_guard *g);
NITRO_INTERNAL void nitro_guard_hold(struct nitro_guard *g,
                                     pthread_mutex_t *lock);
NITRO_INTERNAL void nitro_guard_drop(struct nitro_guard *g);

/* covers() for a guard over one queue: its memory table and its inflight
 * region (ctx: the struct nitro_vq). */
NITRO_INTERNAL bool nitro_guard_covers_vq(const void *vq, const void *addr);
/* covers() for a guard over one memory table (ctx: struct nitro_mem). */
NITRO_INTERNAL bool nitro_guard_covers_mem(const void *mem, const void *addr);

/* Is addr inside one of mem's mappings? Async-signal-safe (plain reads). */
NITRO_INTERNAL bool nitro_mem_covers(const struct nitro_mem *mem,
                                     const void *addr);
/* The same for a queue: its memory table or its inflight region. */
NITRO_INTERNAL bool nitro_vq_covers(const struct nitro_vq *vq,
                                    const void *addr);

#endif
