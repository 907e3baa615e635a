/*
 * nitro_qos.c: a volume's QoS limits (nitro.h "Volume QoS",
 * docs/volumes.md "QoS"), shared by all its queues, which may be served by
 * different engine workers: one small mutex around three token buckets
 * (nitro_bucket.c) and the credit balance, taken once per request. A
 * volume without limits never takes it (one relaxed load).
 *
 * The rings (nitro_blk.c) pop a request, ask nitro_qos_admit, and when it
 * is refused hold that request and set their wake_ns to the time the
 * budget allows it: requests are delayed, never failed.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#include "nitro_bucket.h"
#include "nitro_qos.h"

#define MAX_RATE 1000000000000ull   /* config.MAX_RATE */
#define MAX_BURST_SECONDS 1000000ull

struct nitro_qos {
    pthread_mutex_t lock;
    uint32_t limited;       /* atomic: any limit set */
    uint32_t generation;    /* atomic */
    struct nitro_qos_limits limits;
    struct nitro_bucket iops;    /* the baseline */
    struct nitro_bucket peak;    /* burst_iops, while credits last */
    struct nitro_bucket bytes;   /* throughput */
    uint64_t credits;
    uint64_t credits_max;
    /* The ends of the intervals counted as exceeded so far: overlapping
     * waits of several queues count once. */
    uint64_t iops_until;
    uint64_t tp_until;
    struct nitro_qos_stats stats;
};

struct nitro_qos *nitro_qos_new(void)
{
    struct nitro_qos *q = calloc(1, sizeof(*q));
    if (q != NULL)
        pthread_mutex_init(&q->lock, NULL);
    return q;
}

void nitro_qos_free(struct nitro_qos *q)
{
    if (q == NULL)
        return;
    pthread_mutex_destroy(&q->lock);
    free(q);
}

uint32_t nitro_qos_generation(const struct nitro_qos *q)
{
    return __atomic_load_n(&q->generation, __ATOMIC_RELAXED);
}

void nitro_qos_queued_add(struct nitro_qos *q, int64_t delta)
{
    __atomic_fetch_add(&q->stats.queued, (uint64_t)delta, __ATOMIC_RELAXED);
}

static bool burst(const struct nitro_qos *q)
{
    return q->limits.burst_iops != 0;
}

/* Bring every bucket up to now; baseline tokens that overflow become
 * credits (gp2: a volume below its baseline earns them). */
static void qos_refill(struct nitro_qos *q, uint64_t now)
{
    uint64_t over = nitro_bucket_refill(&q->iops, now);
    if (burst(q)) {
        nitro_bucket_refill(&q->peak, now);
        uint64_t room = q->credits_max - q->credits;
        q->credits += over < room ? over : room;
    }
    nitro_bucket_refill(&q->bytes, now);
}

static bool limits_ok(const struct nitro_qos_limits *l)
{
    if (l->iops > MAX_RATE || l->throughput > MAX_RATE || l->burst_iops > MAX_RATE)
        return false;
    if (l->burst_iops == 0)
        return l->burst_seconds == 0;
    return l->iops > 0 && l->burst_iops > l->iops && l->burst_seconds > 0 &&
           l->burst_seconds <= MAX_BURST_SECONDS;
}

int nitro_qos_set(struct nitro_qos *q, const struct nitro_qos_limits *l,
                  uint64_t now_ns)
{
    if (q == NULL || l == NULL || !limits_ok(l))
        return NITRO_ERR_ARG;
    pthread_mutex_lock(&q->lock);
    qos_refill(q, now_ns);
    nitro_bucket_set_rate(&q->iops, l->iops, 1, now_ns);
    nitro_bucket_set_rate(&q->peak, l->burst_iops, 1, now_ns);
    nitro_bucket_set_rate(&q->bytes, l->throughput, 1, now_ns);
    /* <= 1e12 * 1e6: fits. */
    uint64_t cmax = l->burst_iops ? (l->burst_iops - l->iops) * l->burst_seconds : 0;
    if (q->credits_max == 0 || q->credits > cmax)
        q->credits = cmax;
    q->credits_max = cmax;
    q->stats.credits_max = cmax;
    q->limits = *l;
    bool limited = l->iops || l->throughput;
    __atomic_store_n(&q->limited, limited, __ATOMIC_RELAXED);
    __atomic_fetch_add(&q->generation, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&q->lock);
    return NITRO_OK;
}

/* Count [now, until) as exceeded time, less what was counted already. */
static void exceeded(uint64_t *counted_until, uint64_t *total, uint64_t now,
                     uint64_t until)
{
    uint64_t from = *counted_until > now ? *counted_until : now;
    if (until > from) {
        *total += until - from;
        *counted_until = until;
    }
}

static uint64_t max_u64(uint64_t a, uint64_t b)
{
    return a > b ? a : b;
}

/* Locked. When IOPS would let the request go (0: now), else the time. */
static uint64_t iops_ready_at(const struct nitro_qos *q, bool *use_credit)
{
    *use_credit = false;
    uint64_t t = 0;
    if (!nitro_bucket_has(&q->iops, 1)) {
        if (burst(q) && q->credits >= 1)
            *use_credit = true;
        else
            t = nitro_bucket_ready_at(&q->iops, 1);
    }
    if (burst(q) && !nitro_bucket_has(&q->peak, 1))
        t = max_u64(t, nitro_bucket_ready_at(&q->peak, 1));
    return t;
}

int nitro_qos_admit(struct nitro_qos *q, uint64_t bytes, uint64_t now_ns,
                    uint32_t retry, uint64_t *ready_ns)
{
    if (q == NULL || !__atomic_load_n(&q->limited, __ATOMIC_RELAXED))
        return 1;
    pthread_mutex_lock(&q->lock);
    qos_refill(q, now_ns);
    bool use_credit;
    uint64_t iops_t = iops_ready_at(q, &use_credit);
    bool tp_ok = nitro_bucket_has(&q->bytes, bytes);
    if (iops_t == 0 && tp_ok) {
        if (use_credit)
            q->credits--;
        else
            nitro_bucket_charge(&q->iops, 1);
        if (burst(q))
            nitro_bucket_charge(&q->peak, 1);
        nitro_bucket_charge(&q->bytes, bytes);
        pthread_mutex_unlock(&q->lock);
        return 1;
    }
    uint64_t ready = now_ns;
    if (iops_t != 0) {
        exceeded(&q->iops_until, &q->stats.exceeded_iops_ns, now_ns, iops_t);
        ready = max_u64(ready, iops_t);
    }
    if (!tp_ok) {
        uint64_t t = nitro_bucket_ready_at(&q->bytes, bytes);
        exceeded(&q->tp_until, &q->stats.exceeded_throughput_ns, now_ns, t);
        ready = max_u64(ready, t);
    }
    if (!retry)
        q->stats.delayed++;
    pthread_mutex_unlock(&q->lock);
    if (ready_ns != NULL)
        *ready_ns = ready;
    return 0;
}

int nitro_qos_stats(struct nitro_qos *q, uint64_t now_ns,
                    struct nitro_qos_stats *out)
{
    if (q == NULL || out == NULL)
        return NITRO_ERR_ARG;
    pthread_mutex_lock(&q->lock);
    qos_refill(q, now_ns);
    q->stats.credits = q->credits;
    *out = q->stats;
    out->queued = __atomic_load_n(&q->stats.queued, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&q->lock);
    return NITRO_OK;
}
