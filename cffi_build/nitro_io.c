/*
 * nitro_io.c: a worker's io_uring (struct nitro_io, nitro_ring.h): SQEs for
 * device code, submission once per worker loop pass, completions handed to
 * the op that submitted them. Shared by the engine's workers and the
 * single-queue serving loop that tests and fuzzers drive.
 */
#define _GNU_SOURCE
#include <errno.h>

#include "nitro_ring.h"

/* Completions reaped per io_uring_peek_batch_cqe call. */
#define REAP_BATCH 256

struct io_uring_sqe *nitro_io_sqe(struct nitro_io *io)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&io->uring);
    if (sqe != NULL) {
        io->unsubmitted++;
        io->pending++;
        return sqe;
    }
    /* The SQ is full: hand the kernel what is queued, then retry. */
    int rc = io_uring_submit(&io->uring);
    if (rc < 0)
        return NULL;
    io->unsubmitted = 0;
    sqe = io_uring_get_sqe(&io->uring);
    if (sqe != NULL) {
        io->unsubmitted++;
        io->pending++;
    }
    return sqe;
}

void nitro_io_init(struct nitro_io *io, uint32_t entries)
{
    io->ready = io_uring_queue_init(entries, &io->uring, 0) == 0;
    io->unsubmitted = 0;
    io->pending = 0;
}

void nitro_io_exit(struct nitro_io *io)
{
    if (io->ready)
        io_uring_queue_exit(&io->uring);
    io->ready = false;
}

uint32_t nitro_io_submit(struct nitro_io *io)
{
    if (!io->ready || io->unsubmitted == 0)
        return 0;
    int rc = io_uring_submit(&io->uring);
    if (rc <= 0)
        return 0;
    io->unsubmitted -= (uint32_t)rc < io->unsubmitted ? (uint32_t)rc
                                                      : io->unsubmitted;
    return (uint32_t)rc;
}

uint32_t nitro_io_reap(struct nitro_io *io)
{
    if (!io->ready)
        return 0;
    struct io_uring_cqe *cqes[REAP_BATCH];
    uint32_t total = 0;
    for (;;) {
        unsigned n = io_uring_peek_batch_cqe(&io->uring, cqes, REAP_BATCH);
        if (n == 0)
            return total;
        for (unsigned i = 0; i < n; i++) {
            struct nitro_io_op *op = io_uring_cqe_get_data(cqes[i]);
            int32_t res = cqes[i]->res;
            /* Seen before complete(): should a fault in guest memory cut
             * complete() short (nitro_guard.h), the CQE is not handed
             * out twice. */
            io_uring_cqe_seen(&io->uring, cqes[i]);
            io->pending--;
            /* complete() may queue a follow-up (a short read's rest). */
            op->complete(op, res);
        }
        total += n;
    }
}

void nitro_io_wait_cqe(struct nitro_io *io)
{
    nitro_io_submit(io);
    struct io_uring_cqe *cqe;
    int rc;
    do
        rc = io_uring_wait_cqe(&io->uring, &cqe);
    while (rc == -EINTR);
}

void nitro_io_wait(struct nitro_io *io)
{
    nitro_io_wait_cqe(io);
    nitro_io_reap(io);
}

