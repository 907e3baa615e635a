/*
 * nitro_qos.h: what the blk rings use of a volume's QoS beyond the ABI
 * (nitro.h "Volume QoS"). Internal, not part of the cdef.
 */
#ifndef NITRO_QOS_H
#define NITRO_QOS_H

#include <stdint.h>

#include "nitro.h"
#include "nitro_vring.h"

/* Bumped by every nitro_qos_set: a queue waiting for a deadline computed
 * under older limits looks again. */
NITRO_INTERNAL uint32_t nitro_qos_generation(const struct nitro_qos *q);
/* A queue's count of requests held back changed by delta. */
NITRO_INTERNAL void nitro_qos_queued_add(struct nitro_qos *q, int64_t delta);

#endif
