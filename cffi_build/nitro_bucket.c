/*
 * nitro_bucket.c: token buckets for the switch's bandwidth and packet rate
 * limits (see nitro_bucket.h).
 */
#include "nitro_bucket.h"

#define NS_PER_SEC 1000000000u

void nitro_bucket_init(struct nitro_bucket *b, uint64_t rate,
                       uint64_t min_burst)
{
    b->rate = rate;
    /* 100 ms worth, at least one unit of the largest request. */
    b->burst = rate / 10 > min_burst ? rate / 10 : min_burst;
    b->tokens = (int64_t)b->burst;
    b->last_ns = nitro_now_ns();
}

/* A request larger than the bucket (a TSO super-frame counted as its
 * segments) goes when the bucket is full and leaves it in debt, so the
 * long-run rate holds and such a request is never refused forever. */
bool nitro_bucket_take(struct nitro_bucket *b, uint64_t n, uint64_t now)
{
    if (b->rate == 0)
        return true;
    if (now > b->last_ns) {
        /* A second refills any bucket (it is 100 ms deep): no longer gap
         * matters. dt * rate needs 128 bits: with dt at 1 s it passes
         * 2^64 from 1.8e10 units/s, and config allows 1e12. */
        uint64_t dt = now - b->last_ns < NS_PER_SEC ? now - b->last_ns : NS_PER_SEC;
        unsigned __int128 add = (unsigned __int128)dt * b->rate / NS_PER_SEC;
        if (add > 0) {
            /* tokens <= burst < 2^63, so the room to full fits 64 bits. */
            uint64_t room = (uint64_t)((int64_t)b->burst - b->tokens);
            b->tokens = add >= room ? (int64_t)b->burst : b->tokens + (int64_t)add;
            b->last_ns = now;
        }
    }
    uint64_t need = n < b->burst ? n : b->burst;
    if (b->tokens < (int64_t)need)
        return false;
    b->tokens -= (int64_t)n;
    return true;
}
