/*
 * fuzz_input.h: the input reader shared by the libFuzzer harnesses
 * (fuzz_ring.c, fuzz_net.c). An input is read front to back as little-endian
 * integers; past its end every byte reads as 0, so any prefix is a program.
 */
#ifndef NITRO_FUZZ_INPUT_H
#define NITRO_FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>

struct in {
    const uint8_t *p;
    size_t n;
};

/* The next `bytes` (1..8) bytes as a little-endian integer. */
static inline uint64_t take(struct in *in, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) {
        uint64_t b = 0;
        if (in->n > 0) {
            b = *in->p++;
            in->n--;
        }
        v |= b << (8 * i);
    }
    return v;
}

#endif
