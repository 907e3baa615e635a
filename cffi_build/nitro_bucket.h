/*
 * nitro_bucket.h: the token bucket behind the switch's rate limits and blk
 * QoS (nitro_bucket.c). Internal, not part of the cdef. A bucket does not
 * lock: its owner (the switch's port bucket lock, a volume's QoS lock)
 * holds a lock around every call.
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
    uint64_t last_ns;   /* tokens are refilled up to this time */
};

/* rate units per second (0: unlimited), full, 100 ms deep but at least
 * min_burst (the largest single request). */
NITRO_INTERNAL void nitro_bucket_init(struct nitro_bucket *b, uint64_t rate,
                                      uint64_t min_burst);
/* Refill for the time up to now (CLOCK_MONOTONIC ns), then take n tokens
 * if there are: true, or false and nothing taken. */
NITRO_INTERNAL bool nitro_bucket_take(struct nitro_bucket *b, uint64_t n,
                                      uint64_t now);

/* The parts of take, for a caller that takes from several buckets at once
 * (blk QoS) or wants to know when to come back. */
/* Refill for the time up to now; returns the tokens that did not fit
 * because the bucket was full (blk QoS turns them into burst credits). */
NITRO_INTERNAL uint64_t nitro_bucket_refill(struct nitro_bucket *b,
                                            uint64_t now);
/* Would n tokens be taken now (after a refill)? A request larger than the
 * bucket needs a full one and leaves it in debt. */
NITRO_INTERNAL bool nitro_bucket_has(const struct nitro_bucket *b, uint64_t n);
/* Take n tokens, into debt if need be (after nitro_bucket_has). */
NITRO_INTERNAL void nitro_bucket_charge(struct nitro_bucket *b, uint64_t n);
/* The time (CLOCK_MONOTONIC ns) at which nitro_bucket_has(b, n) becomes
 * true if nothing else is taken; at most last_ns when it is already. */
NITRO_INTERNAL uint64_t nitro_bucket_ready_at(const struct nitro_bucket *b,
                                              uint64_t n);
/* Change the rate (and the 100 ms depth with it) keeping the tokens, cut
 * to the new depth; refill at the old rate up to now first. */
NITRO_INTERNAL void nitro_bucket_set_rate(struct nitro_bucket *b,
                                          uint64_t rate, uint64_t min_burst,
                                          uint64_t now);

#endif
