/*
 * fuzz_common.h: what the libFuzzer harnesses (fuzz_ring.c, fuzz_net.c)
 * share: the input reader, and guest memory in a memfd whose guard pages
 * hold a canary that must survive every operation. An input is read front
 * to back as little-endian integers; past its end every byte reads as 0, so
 * any prefix is a program. A harness defines _GNU_SOURCE (memfd_create) and
 * FUZZ_TARGET ("fuzz_net") before including it.
 */
#ifndef NITRO_FUZZ_COMMON_H
#define NITRO_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define FUZZ_GUARD 4096u
#define FUZZ_CANARY 0xA5

static inline void die(const char *why)
{
    fprintf(stderr, "%s: %s\n", FUZZ_TARGET, why);
    abort();
}

/* A memfd of `len` bytes mapped shared, every byte the canary. */
static inline uint8_t *map_guest(const char *name, size_t len, int *fd)
{
    *fd = memfd_create(name, MFD_CLOEXEC);
    if (*fd < 0 || ftruncate(*fd, (off_t)len) < 0)
        die("guest memfd");
    uint8_t *guest = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
    if (guest == MAP_FAILED)
        die("mmap failed");
    memset(guest, FUZZ_CANARY, len);
    return guest;
}

/* Abort unless the FUZZ_GUARD bytes at each of the n offsets still hold the
 * canary: C wrote outside guest memory otherwise. */
static inline void guards_intact_or_die(const uint8_t *guest, const uint32_t *offs, int n)
{
    static uint8_t canaries[FUZZ_GUARD];
    if (canaries[0] != FUZZ_CANARY)
        memset(canaries, FUZZ_CANARY, sizeof(canaries));
    for (int g = 0; g < n; g++)
        if (memcmp(guest + offs[g], canaries, FUZZ_GUARD) != 0)
            die("C wrote outside guest memory (guard canary changed)");
}

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
