/*
 * nitro_mem.c: the guest memory table (vhost-user SET_MEM_TABLE,
 * ADD_MEM_REG, REM_MEM_REG) and guest-physical / frontend-virtual address
 * translation.
 *
 * Every address that reaches this file may come from the guest, so ranges
 * are compared by offsets and remaining lengths, never by computing an end
 * address that could wrap.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nitro_guard.h"

struct nitro_region {
    uint64_t gpa;     /* guest physical address of the first byte */
    uint64_t uaddr;   /* the frontend's (QEMU's) virtual address of it */
    uint64_t size;
    uint8_t *host;    /* our address of it: map + (mmap_offset - map_off) */
    void *map;        /* what mmap returned, for munmap */
    size_t map_len;
    bool sealed;      /* the file cannot shrink (F_SEAL_SHRINK) */
};

/* Every table's mappings together, against [daemon] max_guest_memory:
 * bytes mapped now, and the most that may be (UINT64_MAX: no cap). */
static uint64_t mapped_total;
static uint64_t mapped_limit = UINT64_MAX;

struct nitro_mem {
    uint32_t count;
    struct nitro_region regions[NITRO_MAX_MEM_REGIONS];
};

struct nitro_mem *nitro_mem_new(void)
{
    /* Guest memory exists from here on: so must the SIGBUS recovery. */
    nitro_guard_install();
    return calloc(1, sizeof(struct nitro_mem));
}

static void region_unmap(struct nitro_region *r)
{
    munmap(r->map, r->map_len);
    __atomic_fetch_sub(&mapped_total, r->map_len, __ATOMIC_RELAXED);
}

void nitro_mem_free(struct nitro_mem *mem)
{
    if (mem == NULL)
        return;
    for (uint32_t i = 0; i < mem->count; i++)
        region_unmap(&mem->regions[i]);
    free(mem);
}

void nitro_mem_set_limit(uint64_t bytes)
{
    __atomic_store_n(&mapped_limit, bytes, __ATOMIC_RELAXED);
}

uint64_t nitro_mem_mapped_bytes(void)
{
    return __atomic_load_n(&mapped_total, __ATOMIC_RELAXED);
}

uint32_t nitro_mem_sealed(const struct nitro_mem *mem)
{
    uint32_t n = 0;
    for (uint32_t i = 0; mem != NULL && i < mem->count; i++)
        n += mem->regions[i].sealed;
    return n;
}

/* Count len bytes against the cap; false (nothing counted) past it. */
static bool reserve(uint64_t len)
{
    uint64_t cur = __atomic_load_n(&mapped_total, __ATOMIC_RELAXED);
    do {
        uint64_t limit = __atomic_load_n(&mapped_limit, __ATOMIC_RELAXED);
        if (len > limit || cur > limit - len)
            return false;
    } while (!__atomic_compare_exchange_n(&mapped_total, &cur, cur + len, true,
                                          __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return true;
}

uint32_t nitro_mem_count(const struct nitro_mem *mem)
{
    return mem == NULL ? 0 : mem->count;
}

/* [a, a + alen) and [b, b + blen) share a byte; lengths are nonzero and
 * neither range wraps (checked by the caller), so inclusive ends are safe. */
static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a <= b + (blen - 1) && b <= a + (alen - 1);
}

static bool region_args_ok(const struct nitro_mem *mem, uint64_t gpa,
                           uint64_t size, uint64_t uaddr, uint64_t mmap_offset)
{
    if (size == 0 || mem->count >= NITRO_MAX_MEM_REGIONS)
        return false;
    /* Ends must stay representable: a region ending at 2^64 would make
     * "next byte after the region" wrap to 0 during descriptor splitting. */
    if (size > UINT64_MAX - gpa || size > UINT64_MAX - uaddr)
        return false;
    if (size > SIZE_MAX - mmap_offset || mmap_offset + size > (uint64_t)INT64_MAX)
        return false;
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct nitro_region *r = &mem->regions[i];
        /* Overlaps would make translation ambiguous in either space. */
        if (ranges_overlap(gpa, size, r->gpa, r->size) ||
            ranges_overlap(uaddr, size, r->uaddr, r->size))
            return false;
    }
    return true;
}

/* A mapping past the end of a regular file faults with SIGBUS on first
 * touch, which a guest could trigger at will: refuse it up front. */
static int check_file_size(int fd, uint64_t len)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return NITRO_ERR_SYS;
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < len)
        return NITRO_ERR_ARG;
    return NITRO_OK;
}

/* A sealed file keeps the size check above true for good: it cannot
 * shrink under the mapping. Unsealed memory relies on the guards
 * (nitro_guard.h) alone, as does a sealed file that cannot supply a page. */
static bool shrink_sealed(int fd)
{
    int seals = fcntl(fd, F_GET_SEALS);
    return seals >= 0 && (seals & F_SEAL_SHRINK);
}

int nitro_mem_add(struct nitro_mem *mem, int fd, uint64_t guest_phys_addr,
                  uint64_t memory_size, uint64_t userspace_addr,
                  uint64_t mmap_offset)
{
    if (mem == NULL || fd < 0 ||
        !region_args_ok(mem, guest_phys_addr, memory_size, userspace_addr,
                        mmap_offset))
        return NITRO_ERR_ARG;
    int rc = check_file_size(fd, mmap_offset + memory_size);
    if (rc != NITRO_OK)
        return rc;
    /* Map from the page holding mmap_offset (which need not be aligned):
     * QEMU backs several regions with one file at growing offsets, and
     * mapping each from 0 would map (and count) the ones before it too. */
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t map_off = mmap_offset - mmap_offset % page;
    size_t len = (size_t)(mmap_offset - map_off + memory_size);
    if (!reserve(len))
        return NITRO_ERR_LIMIT;
    void *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                     (off_t)map_off);
    if (map == MAP_FAILED) {
        int saved = errno;
        __atomic_fetch_sub(&mapped_total, len, __ATOMIC_RELAXED);
        errno = saved;
        return NITRO_ERR_SYS;
    }
    mem->regions[mem->count++] = (struct nitro_region){
        .gpa = guest_phys_addr,
        .uaddr = userspace_addr,
        .size = memory_size,
        .host = (uint8_t *)map + (mmap_offset - map_off),
        .map = map,
        .map_len = len,
        .sealed = shrink_sealed(fd),
    };
    return NITRO_OK;
}

int nitro_mem_remove(struct nitro_mem *mem, uint64_t guest_phys_addr,
                     uint64_t memory_size)
{
    if (mem == NULL)
        return NITRO_ERR_ARG;
    for (uint32_t i = 0; i < mem->count; i++) {
        struct nitro_region *r = &mem->regions[i];
        if (r->gpa != guest_phys_addr || r->size != memory_size)
            continue;
        region_unmap(r);
        /* Keep the table dense; order carries no meaning. */
        *r = mem->regions[--mem->count];
        return NITRO_OK;
    }
    return NITRO_ERR_ARG;
}

/* Is addr inside [base, base + size)? Unsigned subtraction makes
 * addr < base wrap to a huge offset, so one comparison covers both ends. */
static bool offset_in(uint64_t addr, uint64_t base, uint64_t size,
                      uint64_t *off)
{
    *off = addr - base;
    return *off < size;
}

void *nitro_mem_gpa_span(const struct nitro_mem *mem, uint64_t gpa,
                         uint64_t *span)
{
    if (mem == NULL)
        return NULL;
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct nitro_region *r = &mem->regions[i];
        uint64_t off;
        if (offset_in(gpa, r->gpa, r->size, &off)) {
            *span = r->size - off;
            return r->host + off;
        }
    }
    return NULL;
}

void *nitro_mem_gpa_to_host(const struct nitro_mem *mem, uint64_t gpa,
                            uint64_t len)
{
    uint64_t span;
    void *host = nitro_mem_gpa_span(mem, gpa, &span);
    return host != NULL && len <= span ? host : NULL;
}

void *nitro_mem_uaddr_to_host(const struct nitro_mem *mem, uint64_t uaddr,
                              uint64_t len)
{
    if (mem == NULL)
        return NULL;
    for (uint32_t i = 0; i < mem->count; i++) {
        const struct nitro_region *r = &mem->regions[i];
        uint64_t off;
        if (offset_in(uaddr, r->uaddr, r->size, &off) && len <= r->size - off)
            return r->host + off;
    }
    return NULL;
}

bool nitro_mem_covers(const struct nitro_mem *mem, const void *addr)
{
    for (uint32_t i = 0; mem != NULL && i < mem->count; i++) {
        const struct nitro_region *r = &mem->regions[i];
        if ((uintptr_t)addr - (uintptr_t)r->map < r->map_len)
            return true;
    }
    return false;
}
