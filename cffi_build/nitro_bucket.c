/*
 * nitro_bucket.c: token buckets for the switch's bandwidth and packet rate
 * limits and for blk QoS (see nitro_bucket.h).
 */
#include "nitro_bucket.h"

#define NS_PER_SEC 1000000000u

static uint64_t depth(uint64_t rate, uint64_t min_burst)
{
    /* 100 ms worth, at least one unit of the largest request. */
    return rate / 10 > min_burst ? rate / 10 : min_burst;
}

void nitro_bucket_init(struct nitro_bucket *b, uint64_t rate,
                       uint64_t min_burst)
{
    b->rate = rate;
    b->burst = depth(rate, min_burst);
    b->tokens = (int64_t)b->burst;
    b->last_ns = nitro_now_ns();
}

uint64_t nitro_bucket_refill(struct nitro_bucket *b, uint64_t now)
{
    if (b->rate == 0 || now <= b->last_ns)
        return 0;
    /* dt * rate needs 128 bits: with dt at 1 s it passes 2^64 from 1.8e10
     * units/s, and config allows 1e12; any dt of 64 bits fits. */
    unsigned __int128 add = (unsigned __int128)(now - b->last_ns) * b->rate / NS_PER_SEC;
    if (add == 0)
        return 0;
    /* tokens <= burst < 2^63, so the room to full fits 64 bits. */
    uint64_t room = (uint64_t)((int64_t)b->burst - b->tokens);
    if (add >= room) {
        b->tokens = (int64_t)b->burst;
        b->last_ns = now;
        unsigned __int128 over = add - room;
        return over > UINT64_MAX ? UINT64_MAX : (uint64_t)over;
    }
    b->tokens += (int64_t)add;
    /* Advance by the time those whole tokens took, not to now: the part of
     * a token earned since stays earned. (Moving to now lost up to a token
     * per refill: at 2,000/s, refilled every 0.9 ms, nearly half.) */
    b->last_ns += (uint64_t)(add * NS_PER_SEC / b->rate);
    return 0;
}

static uint64_t need(const struct nitro_bucket *b, uint64_t n)
{
    return n < b->burst ? n : b->burst;
}

bool nitro_bucket_has(const struct nitro_bucket *b, uint64_t n)
{
    return b->rate == 0 || b->tokens >= (int64_t)need(b, n);
}

void nitro_bucket_charge(struct nitro_bucket *b, uint64_t n)
{
    if (b->rate != 0)
        b->tokens -= (int64_t)n;
}

uint64_t nitro_bucket_ready_at(const struct nitro_bucket *b, uint64_t n)
{
    if (nitro_bucket_has(b, n))
        return b->last_ns;
    /* The fraction earned since last_ns counts: from there, exactly. */
    unsigned __int128 missing = (unsigned __int128)((int64_t)need(b, n) - b->tokens);
    unsigned __int128 ns = (missing * NS_PER_SEC + b->rate - 1) / b->rate;
    return b->last_ns + (uint64_t)ns;
}

void nitro_bucket_set_rate(struct nitro_bucket *b, uint64_t rate,
                           uint64_t min_burst, uint64_t now)
{
    nitro_bucket_refill(b, now);
    if (b->rate == 0) {
        /* Unlimited until now: start full, as a new bucket. */
        b->burst = depth(rate, min_burst);
        b->tokens = (int64_t)b->burst;
    } else {
        b->burst = depth(rate, min_burst);
        if (b->tokens > (int64_t)b->burst)
            b->tokens = (int64_t)b->burst;
    }
    b->rate = rate;
    b->last_ns = now;
}

/* A request larger than the bucket (a TSO super-frame counted as its
 * segments) goes when the bucket is full and leaves it in debt, so the
 * long-run rate holds and such a request is never refused forever. */
bool nitro_bucket_take(struct nitro_bucket *b, uint64_t n, uint64_t now)
{
    nitro_bucket_refill(b, now);
    if (!nitro_bucket_has(b, n))
        return false;
    nitro_bucket_charge(b, n);
    return true;
}
