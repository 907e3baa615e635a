/*
 * fuzz_ring.c: libFuzzer harness for the ring walkers, split and packed
 * (nitro_vring.c, nitro_vring_packed.c, nitro_mem.c), and the virtio-blk
 * request parser (nitro_blk.c).
 *
 * The C files are compiled straight into the fuzzer (tests/fuzz/Makefile);
 * the same source builds two targets:
 *   fuzz_vring  (-DFUZZ_BLK=0) pops chains with nitro_vq_pop() and checks
 *               every iovec lies inside guest memory, then pushes them;
 *   fuzz_blk    (-DFUZZ_BLK=1) runs nitro_blk_serve() with kick_fd -1, so it
 *               serves whatever is available and returns.
 *
 * The input is a small program (docs/reliability.md "Fuzzing", and
 * tests/fuzz/ringfmt.py, which builds seeds and replays inputs through the
 * Python API). Little-endian throughout.
 *
 *   header (16 bytes)
 *     u8  flags   bit0 INDIRECT_DESC, bit1 EVENT_IDX, bit2 ring addresses
 *                 used unaligned as given, bit3 read-only disk, bits 4-6
 *                 the memory layout (LAYOUTS below), bit7 packed ring
 *                 (VIRTIO_F_RING_PACKED: desc/avail/used are then the
 *                 descriptor ring and the driver/device event areas)
 *     u8  log2 of the ring size (mod 11: 1..1024)
 *     u16 base (SET_VRING_BASE: split last_avail_idx; packed, position in
 *                 bits 0-14 and wrap counter in bit 15, used = avail)
 *     u16 desc, avail, used: ring offsets in the 64 KiB guest span
 *     u16 capacity in sectors (mod 256; bit 8: fuzz_blk serves through a
 *                 mapping of the disk, nitro_blk_map_image, as the daemon
 *                 does a local image); u16 max_discard, u16 max_wz
 *                 (each mod 33: write-zeroes falls back to writing zeros
 *                 on a memfd, and bigger limits only make cases slower)
 *   then ops until the input ends (op byte mod OPS):
 *     0 WRITE  u16 span offset, u8 len, len bytes      guest writes memory
 *     1 SERVE                                          the device runs
 *              (at most MAX_SERVES - 1 times; later SERVEs are no-ops)
 *     2 SETMEM u8 layout                               SET_MEM_TABLE: a new
 *              table is swapped in between serve calls, the old one freed
 *     3 RESET  u16 base                                reconnect: reset the
 *              queue, set num/addr/base/features again
 *     4 NUM    u8 log2                                 SET_VRING_NUM
 *     5 DESCS  u16 table offset, u8 count, u64 addr, u32 len, u16 flags:
 *              count descriptors, descriptor i's next = i + 1 (long chains
 *              and loops without long inputs); packed: id = i + 1 and the
 *              flags as given (long lists when they carry AVAIL and NEXT)
 *     6 FILL   u16 offset, u16 len, u8 byte            memset
 *     7 INFLIGHT u16 offset, u8 len, len bytes         the frontend writes
 *              the inflight region (offset mod its size, which holds 1024
 *              entries of either layout), then SET_INFLIGHT_FD: the queue
 *              (re)attaches it
 *              and its next pop repairs and resubmits from it
 *   and a final SERVE.
 *
 * Guest memory: one memfd laid out [guard][region A][guard][region B][guard],
 * each region 32 KiB; the "span" offset o means region A + o for o < 32 KiB,
 * else region B + (o - 32 KiB). The guards hold CANARY and are mapped too
 * (nitro_mem_add maps from file offset 0), so any write outside a region is
 * caught after each op. Anything else wrong is an ASan/UBSan report.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "nitro_vring.h"
#define FUZZ_TARGET "fuzz_ring"
#include "fuzz_common.h"

#ifndef FUZZ_BLK
#define FUZZ_BLK 0
#endif

#define GUARD FUZZ_GUARD
#define REGION 32768u
#define SPAN (2 * REGION)
#define FILE_LEN (3 * GUARD + 2 * REGION)
#define OFF_A GUARD
#define OFF_B (2 * GUARD + REGION)
#define UADDR 0x7f0000000000ull
#define DISK_LEN (256u * 512u)
#define OPS 8
/* One queue's inflight region (vhost-user "Inflight I/O tracking") for the
 * largest ring in either layout: packed is the larger, a 32-byte header and
 * 32 bytes per entry. */
#define INFLIGHT_LEN (32u + 32u * 1024u)
#define F_PACKED 0x80
#define CAPACITY_MAPPED 0x100  /* in the capacity field: see the header above */
#define RING_PACKED_BIT 34
#define MAX_OPS 4096
#define MAX_SERVES 16  /* per input, the final one included */

/* Where regions A and B sit, guest-physically and in the frontend's
 * address space. The rings are given as frontend addresses, so a layout
 * that moves the uaddrs makes set_mem re-translate them elsewhere. */
struct layout {
    uint64_t gpa_a, gpa_b, ua_a, ua_b;
    int has_b;
};
static const struct layout LAYOUTS[] = {
    /* 0: A and B adjacent in both spaces: buffers may span them */
    {0x10000, 0x10000 + REGION, UADDR, UADDR + REGION, 1},
    /* 1: a hole between A and B */
    {0x10000, 0x80000, UADDR, UADDR + 0x100000, 1},
    /* 2: B below A, adjacent: the same gpas now mean other memory */
    {0x10000 + REGION, 0x10000, UADDR, UADDR + REGION, 1},
    /* 3: B removed */
    {0x10000, 0, UADDR, 0, 0},
    /* 4: uaddrs moved by 4 KiB: the rings land elsewhere */
    {0x10000, 0x10000 + REGION, UADDR + 4096, UADDR + REGION + 4096, 1},
    /* 5: A at gpa 0, B at the top of the 64-bit space */
    {0, UINT64_MAX - REGION, UADDR, UADDR + REGION, 1},
};
#define NLAYOUTS (sizeof(LAYOUTS) / sizeof(LAYOUTS[0]))

static int guest_fd = -1, disk_fd = -1, call_fd = -1;
static uint8_t *guest;  /* our own view of the whole memfd */
static uint8_t inflight[INFLIGHT_LEN] __attribute__((aligned(64)));

static void setup_once(void)
{
    if (guest != NULL)
        return;
    guest = map_guest("fuzz-guest", FILE_LEN, &guest_fd);
    disk_fd = memfd_create("fuzz-disk", MFD_CLOEXEC);
    call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (disk_fd < 0 || call_fd < 0)
        die("setup failed");
}

static void check_guards(void)
{
    static const uint32_t offs[3] = {0, OFF_A + REGION, OFF_B + REGION};
    guards_intact_or_die(guest, offs, 3);
}

static uint8_t *span_ptr(uint32_t off)
{
    off %= SPAN;
    return guest + (off < REGION ? OFF_A + off : OFF_B + off - REGION);
}

static uint64_t span_uaddr(uint32_t off)
{
    off %= SPAN;
    return off < REGION ? UADDR + off : UADDR + REGION + (off - REGION);
}

/* Copy n bytes into the span at off; stops at the end of the span. */
static void span_write(uint32_t off, const uint8_t *src, uint32_t n, int fill)
{
    for (uint32_t i = 0; i < n && off + i < SPAN; i++)
        *span_ptr(off + i) = fill >= 0 ? (uint8_t)fill : src[i];
}

static struct nitro_mem *make_mem(unsigned which, const uint8_t *host[2])
{
    const struct layout *l = &LAYOUTS[which % NLAYOUTS];
    struct nitro_mem *m = nitro_mem_new();
    if (m == NULL)
        die("nitro_mem_new");
    if (nitro_mem_add(m, guest_fd, l->gpa_a, REGION, l->ua_a, OFF_A) != NITRO_OK)
        die("nitro_mem_add A");
    if (l->has_b &&
        nitro_mem_add(m, guest_fd, l->gpa_b, REGION, l->ua_b, OFF_B) != NITRO_OK)
        die("nitro_mem_add B");
    host[0] = nitro_mem_uaddr_to_host(m, l->ua_a, REGION);
    host[1] = l->has_b ? nitro_mem_uaddr_to_host(m, l->ua_b, REGION) : NULL;
    return m;
}

/* ---- the queue under test --------------------------------------------- */

struct state {
    struct nitro_mem *mem;
    const uint8_t *host[2];  /* where mem maps regions A and B */
    struct nitro_vq *vq;
    uint64_t features;
    int raw_addr;
    uint32_t desc, avail, used;
    struct nitro_blk_params params;
    struct nitro_blk_stats stats;
};

static void setup_queue(struct state *s, uint32_t num, uint16_t base)
{
    uint64_t d = span_uaddr(s->desc), a = span_uaddr(s->avail),
             u = span_uaddr(s->used);
    if (!s->raw_addr) {
        d &= ~15ull;
        a &= ~1ull;
        u &= ~3ull;
    }
    /* Refusals are fine: the serve calls must then refuse too. */
    nitro_vq_set_num(s->vq, num);
    nitro_vq_set_features(s->vq, s->features);
    nitro_vq_set_addr(s->vq, s->mem, d, a, u);
    nitro_vq_set_base(s->vq, base);
    nitro_vq_set_fds(s->vq, -1, call_fd);
}

#if !FUZZ_BLK
/* Does [b, b + len) lie wholly inside one region of the current table? */
static int inside_guest(const struct state *s, const uint8_t *b, size_t len)
{
    for (int r = 0; r < 2; r++) {
        const uint8_t *h = s->host[r];
        if (h != NULL && b >= h && len <= REGION && (size_t)(b - h) <= REGION - len)
            return 1;
    }
    return 0;
}

/* Every iovec of a popped chain must be non-empty and lie wholly inside one
 * region of the current table; the counts and lengths must add up. */
static void check_chain(const struct state *s, const struct nitro_chain *c)
{
    if (c->n_out + c->n_in > NITRO_VQ_MAX_IOV)
        die("chain: too many iovecs");
    uint64_t out = 0, in = 0;
    for (uint32_t i = 0; i < c->n_out + c->n_in; i++) {
        const uint8_t *b = c->iov[i].iov_base;
        size_t len = c->iov[i].iov_len;
        if (len == 0)
            die("chain: empty iovec");
        if (!inside_guest(s, b, len))
            die("chain: an iovec leaves guest memory");
        if (i < c->n_out)
            out += len;
        else
            in += len;
    }
    if (out != c->out_len || in != c->in_len)
        die("chain: lengths do not add up");
}

/* nitro_vq_peek_next's answer, taken just before a pop: inside one region
 * of the table, and, when that pop yields a chain, its first device-
 * readable buffer (or the part of it in that region). */
static void check_peek(const struct state *s, const uint8_t *h, uint32_t len,
                       const struct nitro_chain *c)
{
    if (!inside_guest(s, h, len))
        die("peek: the buffer leaves guest memory");
    if (c != NULL && len > 0 &&
        (c->n_out == 0 || c->iov[0].iov_base != h || c->iov[0].iov_len != len))
        die("peek: not the first buffer of the chain popped next");
}
#endif

static void serve(struct state *s)
{
#if FUZZ_BLK
    int64_t rc = nitro_blk_serve(s->vq, &s->params, &s->stats, 0);
    if (rc < 0 && rc != NITRO_ERR_GUEST && rc != NITRO_ERR_ARG)
        die("nitro_blk_serve: unexpected return code");
    if (s->stats.inflight != 0)
        die("nitro_blk_serve: requests left in flight");
#else
    if (!nitro_vq_ready(s->vq))
        return;
    uint32_t num = nitro_vq_num(s->vq);
    nitro_vq_disable_notify(s->vq);
    for (uint32_t k = 0; k < 2 * num + 2; k++) {
        struct nitro_chain *c;
        uint32_t peek_len = 0;
        const uint8_t *peek = nitro_vq_peek_next(s->vq, &peek_len);
        int rc = nitro_vq_pop(s->vq, &c);
        if (rc < 0 && nitro_vq_fault(s->vq) == NITRO_FAULT_NONE)
            die("pop failed without a fault");
        if (peek != NULL)
            check_peek(s, peek, peek_len, rc > 0 ? c : NULL);
        if (rc <= 0)
            break;
        check_chain(s, c);
        nitro_vq_push(s->vq, c->head, (uint32_t)c->in_len);
    }
    nitro_vq_notify(s->vq);
    nitro_vq_enable_notify(s->vq);
#endif
    uint64_t v;
    (void)!read(call_fd, &v, sizeof(v));  /* keep the eventfd from saturating */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup_once();
    /* Fresh guest memory and disk for every input: results must depend on
     * the input alone, or crashes would not reproduce. */
    memset(guest + OFF_A, 0, REGION);
    memset(guest + OFF_B, 0, REGION);
    memset(inflight, 0, sizeof(inflight));
    if (ftruncate(disk_fd, 0) < 0 || ftruncate(disk_fd, DISK_LEN) < 0)
        die("ftruncate disk");

    struct in in = {data, size};
    struct state s = {0};
    uint8_t flags = (uint8_t)take(&in, 1);
    uint32_t num = 1u << (take(&in, 1) % 11);
    uint16_t base = (uint16_t)take(&in, 2);
    s.desc = (uint32_t)take(&in, 2);
    s.avail = (uint32_t)take(&in, 2);
    s.used = (uint32_t)take(&in, 2);
    s.params.fd = disk_fd;
    uint16_t capacity = (uint16_t)take(&in, 2);
    s.params.capacity = capacity % 256;
    s.params.block_size = 512;
    s.params.max_discard_sectors = (uint32_t)(take(&in, 2) % 33);
    s.params.max_write_zeroes_sectors = (uint32_t)(take(&in, 2) % 33);
    s.params.readonly = (flags >> 3) & 1;
    memcpy(s.params.serial, "fuzz-serial-0123456", 20);
    s.features = ((uint64_t)(flags & 1) << VIRTIO_RING_F_INDIRECT_DESC) |
                 ((uint64_t)((flags >> 1) & 1) << VIRTIO_RING_F_EVENT_IDX) |
                 ((uint64_t)((flags & F_PACKED) != 0) << RING_PACKED_BIT);
    s.raw_addr = (flags >> 2) & 1;
#if FUZZ_BLK
    if ((capacity & CAPACITY_MAPPED) && nitro_blk_map_image(&s.params) != NITRO_OK)
        die("nitro_blk_map_image");
#endif
    s.mem = make_mem((flags >> 4) & 7, s.host);
    s.vq = nitro_vq_new(0);
    if (s.vq == NULL)
        die("nitro_vq_new");
    setup_queue(&s, num, base);

    int serves = 0;
    for (int ops = 0; in.n > 0 && ops < MAX_OPS; ops++) {
        switch (take(&in, 1) % OPS) {
        case 0: {
            uint32_t off = (uint32_t)take(&in, 2);
            uint32_t len = (uint32_t)take(&in, 1);
            if (len > in.n)
                len = (uint32_t)in.n;
            span_write(off, in.p, len, -1);
            in.p += len;
            in.n -= len;
            break;
        }
        case 1:
            if (++serves < MAX_SERVES)
                serve(&s);
            break;
        case 2: {
            struct nitro_mem *old = s.mem;
            s.mem = make_mem((unsigned)take(&in, 1), s.host);
            nitro_vq_set_mem(s.vq, s.mem);
            nitro_mem_free(old);
            break;
        }
        case 3:
            nitro_vq_reset(s.vq);
            nitro_vq_clear_stop(s.vq);
            setup_queue(&s, num, (uint16_t)take(&in, 2));
            break;
        case 4:
            nitro_vq_set_num(s.vq, 1u << (take(&in, 1) % 11));
            break;
        case 5: {
            uint32_t off = (uint32_t)take(&in, 2);
            uint32_t count = (uint32_t)take(&in, 1) + 1;
            uint64_t addr = take(&in, 8);
            uint32_t len = (uint32_t)take(&in, 4);
            uint16_t fl = (uint16_t)take(&in, 2);
            int packed = (s.features >> RING_PACKED_BIT) & 1;
            for (uint32_t i = 0; i < count; i++) {
                uint8_t d[16];
                uint16_t next = (uint16_t)(i + 1);
                memcpy(d, &addr, 8);
                memcpy(d + 8, &len, 4);
                memcpy(d + 12, packed ? &next : &fl, 2);
                memcpy(d + 14, packed ? &fl : &next, 2);
                span_write(off + 16 * i, d, 16, -1);
            }
            break;
        }
        case 6: {
            uint32_t off = (uint32_t)take(&in, 2);
            uint32_t len = (uint32_t)take(&in, 2);
            span_write(off, NULL, len, (int)take(&in, 1));
            break;
        }
        case 7: {
            uint32_t off = (uint32_t)take(&in, 2) % INFLIGHT_LEN;
            uint32_t len = (uint32_t)take(&in, 1);
            if (len > in.n)
                len = (uint32_t)in.n;
            if (len > INFLIGHT_LEN - off)
                len = INFLIGHT_LEN - off;
            memcpy(inflight + off, in.p, len);
            in.p += len;
            in.n -= len;
            if (nitro_vq_set_inflight(s.vq, inflight, INFLIGHT_LEN) != NITRO_OK)
                die("nitro_vq_set_inflight refused a region for 1024 entries");
            break;
        }
        }
        check_guards();
    }
    serve(&s);
    check_guards();
    nitro_vq_free(s.vq);
    nitro_mem_free(s.mem);
#if FUZZ_BLK
    nitro_blk_unmap_image(&s.params);  /* before the next input truncates the disk */
#endif
    return 0;
}
