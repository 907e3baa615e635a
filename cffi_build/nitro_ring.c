/*
 * nitro_ring.c: what every engine ring shares (nitro_ring.h): notification
 * arming on its virtqueue and the ABI getters. Kept apart from the workers
 * (nitro_engine.c) so a device's ring code links without them (fuzzers).
 */
#include "nitro_ring.h"

int nitro_ring_arm_vq(struct nitro_ring *r)
{
    return nitro_vq_enable_notify(r->vq);
}

void nitro_ring_disarm_vq(struct nitro_ring *r)
{
    nitro_vq_disable_notify(r->vq);
}

void nitro_ring_free(struct nitro_ring *r)
{
    if (r != NULL && r->worker < 0)
        r->ops->free(r);
}

int nitro_ring_status(const struct nitro_ring *r)
{
    return __atomic_load_n(&r->status, __ATOMIC_ACQUIRE);
}

int nitro_ring_errno(const struct nitro_ring *r)
{
    return r->sys_errno;
}

int32_t nitro_ring_worker(const struct nitro_ring *r)
{
    return __atomic_load_n(&r->worker, __ATOMIC_ACQUIRE);
}

uint32_t nitro_ring_in_flight(const struct nitro_ring *r)
{
    return r->ops->in_flight ? r->ops->in_flight(r) : 0;
}
