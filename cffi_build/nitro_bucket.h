/*
 * nitro_bucket.h: the token bucket behind the switch's rate limits
 * (nitro_bucket.c). Internal, not part of the cdef. A bucket does not
 * lock: the switch holds the port's bucket lock around every call.
 */
#ifndef NITRO_BUCKET_H
#define NITRO_BUCKET_H

#include <stdbool.h>
#include <stdint.h>

#include "nitro_vring.h"

struct nitro_bucket {
    uint64_t rate;      /* units per second; 0: unlimited */
    uint64_t burst;     /* bucket depth */
    int64_t tokens;     /* < 0: debt of a request larger than burst */
    uint64_t last_ns;   /* when tokens were last refilled */
};

/* rate units per second (0: unlimited), full, 100 ms deep but at least
 * min_burst (the largest single request). */
NITRO_INTERNAL void nitro_bucket_init(struct nitro_bucket *b, uint64_t rate,
                                      uint64_t min_burst);
/* Refill for the time up to now (CLOCK_MONOTONIC ns), then take n tokens
 * if there are: true, or false and nothing taken. */
NITRO_INTERNAL bool nitro_bucket_take(struct nitro_bucket *b, uint64_t n,
                                      uint64_t now);

#endif
