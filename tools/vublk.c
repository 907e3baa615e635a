/*
 * vublk - a userspace vhost-user-blk front-end (driver) for benchmarks and
 * correctness tests.
 *
 * vublk plays the role QEMU plays towards a vhost-user-blk back-end: it
 * connects to the back-end's unix socket, negotiates features, shares one
 * memfd as "guest memory" and then drives virtio-blk split virtqueues itself
 * (no guest, no emulation), so a back-end's own throughput can be measured and
 * its data path checked.
 *
 * Written from QEMU docs/interop/vhost-user.rst and the VIRTIO 1.2 spec
 * (2.7 split virtqueues, 2.7.7/2.7.10 notification suppression, 5.2 block
 * device).  Little-endian hosts only (virtio 1.x rings are little-endian and
 * vhost-user messages are host-endian; this tool checks at compile time).
 *
 * Exit status: 0 ok; 1 I/O error status or verify mismatch; 2 usage error;
 * 3 connection/protocol error or timeout.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vublk supports little-endian hosts only"
#endif

#define EXIT_IOERR 1
#define EXIT_USAGE 2
#define EXIT_PROTO 3

/* ------------------------------------------------------------------------ */
/* vhost-user wire vocabulary (docs/interop/vhost-user.rst)                 */

enum {
    VU_GET_FEATURES = 1,
    VU_SET_FEATURES = 2,
    VU_SET_OWNER = 3,
    VU_RESET_OWNER = 4,
    VU_SET_MEM_TABLE = 5,
    VU_SET_LOG_BASE = 6,
    VU_SET_LOG_FD = 7,
    VU_SET_VRING_NUM = 8,
    VU_SET_VRING_ADDR = 9,
    VU_SET_VRING_BASE = 10,
    VU_GET_VRING_BASE = 11,
    VU_SET_VRING_KICK = 12,
    VU_SET_VRING_CALL = 13,
    VU_SET_VRING_ERR = 14,
    VU_GET_PROTOCOL_FEATURES = 15,
    VU_SET_PROTOCOL_FEATURES = 16,
    VU_GET_QUEUE_NUM = 17,
    VU_SET_VRING_ENABLE = 18,
    VU_GET_CONFIG = 24,
    VU_SET_CONFIG = 25,
};

#define VU_FLAG_VERSION 0x1u
#define VU_FLAG_VERSION_MASK 0x3u
#define VU_FLAG_REPLY 0x4u
#define VU_FLAG_NEED_REPLY 0x8u

#define VU_VRING_NOFD (1u << 8)
#define VU_MAX_REGIONS 8
#define VU_MAX_FDS 8

#define VU_PROTO_MQ 0
#define VU_PROTO_REPLY_ACK 3
#define VU_PROTO_CONFIG 9

#define VHOST_USER_F_PROTOCOL_FEATURES 30

struct vu_hdr {
    uint32_t request;
    uint32_t flags;
    uint32_t size;
} __attribute__((packed));

struct vu_state {
    uint32_t index;
    uint32_t num;
} __attribute__((packed));

struct vu_addr {
    uint32_t index;
    uint32_t flags;
    uint64_t desc;
    uint64_t used;
    uint64_t avail;
    uint64_t log;
} __attribute__((packed));

struct vu_region {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t mmap_offset;
} __attribute__((packed));

struct vu_memory {
    uint32_t nregions;
    uint32_t padding;
    struct vu_region regions[VU_MAX_REGIONS];
} __attribute__((packed));

#define VU_CONFIG_MAX 256
struct vu_config {
    uint32_t offset;
    uint32_t size;
    uint32_t flags;
    uint8_t payload[VU_CONFIG_MAX];
} __attribute__((packed));

/* ------------------------------------------------------------------------ */
/* virtio vocabulary (VIRTIO 1.2)                                           */

#define VIRTIO_F_RING_INDIRECT_DESC 28
#define VIRTIO_F_RING_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_GEOMETRY 4
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_TOPOLOGY 10
#define VIRTIO_BLK_F_CONFIG_WCE 11
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_ID_BYTES 20
#define SECTOR 512u

/* offsets in struct virtio_blk_config */
#define CFG_CAPACITY 0
#define CFG_SIZE_MAX 8
#define CFG_SEG_MAX 12
#define CFG_BLK_SIZE 20
#define CFG_WRITEBACK 32
#define CFG_NUM_QUEUES 34
#define CFG_REQUEST_SIZE 60 /* up to and including unused1[3] */

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[]; /* then: le16 used_event */
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[]; /* then: le16 avail_event */
};

struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

/* ------------------------------------------------------------------------ */
/* options                                                                  */

enum rw_mode {
    RW_NONE,
    RW_RANDREAD,
    RW_RANDWRITE,
    RW_READ,
    RW_WRITE,
    RW_VERIFY,
    RW_VERIFY_WRITE,
    RW_VERIFY_READ,
};

static const char *const rw_names[] = {
    [RW_NONE] = "none",
    [RW_RANDREAD] = "randread",
    [RW_RANDWRITE] = "randwrite",
    [RW_READ] = "read",
    [RW_WRITE] = "write",
    [RW_VERIFY] = "verify",
    [RW_VERIFY_WRITE] = "verify-write",
    [RW_VERIFY_READ] = "verify-read",
};

static struct {
    const char *socket;
    enum rw_mode rw;
    uint32_t bs;
    uint32_t iodepth;
    double runtime;
    bool runtime_set;
    uint64_t ios;
    uint32_t queues;
    uint64_t size;
    uint64_t offset;
    uint64_t seed;
    bool poll;
    bool event_idx;
    bool check_id;
    double timeout;
    uint32_t queue_size;
    uint32_t seg_size;
    uint64_t mem;
    double wait;
    int verbose;
} opt = {
    .rw = RW_NONE,
    .bs = 4096,
    .iodepth = 32,
    .runtime = 10.0,
    .queues = 1,
    .seed = 1,
    .event_idx = true,
    .timeout = 5.0,
};

static const char *prog = "vublk";

/* ------------------------------------------------------------------------ */
/* errors                                                                   */

static void __attribute__((noreturn, format(printf, 2, 3)))
die(int code, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(code);
}

#define die_usage(...) die(EXIT_USAGE, __VA_ARGS__)
#define die_proto(...) die(EXIT_PROTO, __VA_ARGS__)

static void __attribute__((format(printf, 1, 2))) warnx(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: warning: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static void __attribute__((format(printf, 1, 2))) trace(const char *fmt, ...)
{
    va_list ap;
    if (!opt.verbose)
        return;
    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------------ */
/* the verify pattern                                                       */

/* splitmix64 finaliser */
static inline uint64_t mix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The 64-bit little-endian word i (0..63) of 512-byte sector `sector`. */
static inline uint64_t pattern_word(uint64_t seed, uint64_t sector, unsigned i)
{
    return mix64(seed ^ ((sector << 6) | i));
}

static void pattern_fill(uint8_t *buf, uint64_t seed, uint64_t sector, uint32_t len)
{
    uint64_t *w = (uint64_t *)buf;
    for (uint32_t s = 0; s < len / SECTOR; s++)
        for (unsigned i = 0; i < SECTOR / 8; i++)
            w[s * 64 + i] = htole64(pattern_word(seed, sector + s, i));
}

/* ------------------------------------------------------------------------ */
/* device state                                                             */

struct slot {
    uint16_t head;     /* first descriptor index of this slot's chain */
    bool busy;
    uint32_t type;
    uint64_t sector;
    uint32_t len;      /* data bytes */
    uint64_t t_submit;
    uint8_t *hdr;      /* 16-byte out header, then status byte at +16 */
    uint8_t *status;
    uint8_t *data;
    uint64_t hdr_gpa, status_gpa, data_gpa;
};

struct vq {
    unsigned index;
    uint16_t size;
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    uint64_t desc_off, avail_off, used_off; /* offsets in guest memory */
    volatile uint16_t *used_event;  /* in the avail ring (driver writes) */
    volatile uint16_t *avail_event; /* in the used ring (device writes) */
    int kickfd, callfd;
    uint16_t avail_idx;  /* next free avail slot (shadow) */
    uint16_t published;  /* avail->idx last published */
    uint16_t last_used;
    unsigned inflight;
    struct slot *slots;
    unsigned nslots;
    uint64_t kicks, calls;
};

static struct {
    int sock;
    uint64_t features;       /* offered */
    uint64_t acked;          /* SET_FEATURES */
    uint64_t proto;          /* offered protocol features */
    uint64_t proto_acked;
    bool reply_ack;
    uint64_t max_queues;     /* GET_QUEUE_NUM, 0 if not asked */
    uint8_t config[CFG_REQUEST_SIZE];
    uint64_t capacity;       /* sectors */
    uint32_t size_max, seg_max, blk_size;
    uint16_t num_queues;
    uint8_t writeback;
    bool event_idx;

    int memfd;
    uint8_t *mem;
    uint64_t mem_size;

    struct vq *vqs;
    unsigned nvqs;

    uint32_t seg_limit;      /* max bytes per data descriptor */
    unsigned nseg;           /* data descriptors per request */
    unsigned chain;          /* descriptors per slot */
    uint32_t stride;         /* data bytes reserved per slot */
    uint8_t *scratch;        /* one request's data, logically contiguous */
} D = { .sock = -1, .memfd = -1 };

static inline bool has(uint64_t features, unsigned bit)
{
    return (features >> bit) & 1;
}

/* ------------------------------------------------------------------------ */
/* vhost-user messaging                                                     */

static const char *req_name(uint32_t r)
{
    switch (r) {
    case VU_GET_FEATURES: return "GET_FEATURES";
    case VU_SET_FEATURES: return "SET_FEATURES";
    case VU_SET_OWNER: return "SET_OWNER";
    case VU_RESET_OWNER: return "RESET_OWNER";
    case VU_SET_MEM_TABLE: return "SET_MEM_TABLE";
    case VU_SET_LOG_BASE: return "SET_LOG_BASE";
    case VU_SET_LOG_FD: return "SET_LOG_FD";
    case VU_SET_VRING_NUM: return "SET_VRING_NUM";
    case VU_SET_VRING_ADDR: return "SET_VRING_ADDR";
    case VU_SET_VRING_BASE: return "SET_VRING_BASE";
    case VU_GET_VRING_BASE: return "GET_VRING_BASE";
    case VU_SET_VRING_KICK: return "SET_VRING_KICK";
    case VU_SET_VRING_CALL: return "SET_VRING_CALL";
    case VU_SET_VRING_ERR: return "SET_VRING_ERR";
    case VU_GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES";
    case VU_SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
    case VU_GET_QUEUE_NUM: return "GET_QUEUE_NUM";
    case VU_SET_VRING_ENABLE: return "SET_VRING_ENABLE";
    case VU_GET_CONFIG: return "GET_CONFIG";
    case VU_SET_CONFIG: return "SET_CONFIG";
    default: return "UNKNOWN";
    }
}

static void vu_send(uint32_t req, uint32_t flags, const void *payload, uint32_t size,
                    const int *fds, int nfds)
{
    struct vu_hdr h = { .request = req, .flags = VU_FLAG_VERSION | flags, .size = size };
    struct iovec iov[2] = {
        { .iov_base = &h, .iov_len = sizeof(h) },
        { .iov_base = (void *)payload, .iov_len = size },
    };
    union {
        char buf[CMSG_SPACE(sizeof(int) * VU_MAX_FDS)];
        struct cmsghdr align;
    } cbuf;
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = size ? 2 : 1 };

    if (nfds > VU_MAX_FDS)
        die_proto("internal: too many fds for %s", req_name(req));
    if (nfds > 0) {
        memset(&cbuf, 0, sizeof(cbuf));
        m.msg_control = cbuf.buf;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    trace("-> %s (%u) flags=0x%x size=%u fds=%d", req_name(req), req, h.flags, size, nfds);

    size_t left = sizeof(h) + size;
    while (left > 0) {
        ssize_t n = sendmsg(D.sock, &m, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                die_proto("timed out sending %s to the back-end", req_name(req));
            if (errno == EPIPE || errno == ECONNRESET)
                die_proto("back-end closed the connection (sending %s)", req_name(req));
            die_proto("sending %s: %s", req_name(req), strerror(errno));
        }
        left -= (size_t)n;
        /* fds went with the first byte; advance the iovecs for a partial send */
        m.msg_control = NULL;
        m.msg_controllen = 0;
        while (n > 0 && m.msg_iovlen > 0) {
            if ((size_t)n >= m.msg_iov[0].iov_len) {
                n -= (ssize_t)m.msg_iov[0].iov_len;
                m.msg_iov++;
                m.msg_iovlen--;
            } else {
                m.msg_iov[0].iov_base = (char *)m.msg_iov[0].iov_base + n;
                m.msg_iov[0].iov_len -= (size_t)n;
                n = 0;
            }
        }
    }
}

/* Read exactly len bytes; the back-end must not send fds in replies. */
static void recv_exact(void *buf, size_t len, uint32_t req)
{
    size_t got = 0;
    while (got < len) {
        union {
            char buf[CMSG_SPACE(sizeof(int) * VU_MAX_FDS)];
            struct cmsghdr align;
        } cbuf;
        struct iovec iov = { .iov_base = (char *)buf + got, .iov_len = len - got };
        struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1,
                            .msg_control = cbuf.buf, .msg_controllen = sizeof(cbuf.buf) };
        ssize_t n = recvmsg(D.sock, &m, MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                die_proto("timed out after %.1f s waiting for the reply to %s",
                          opt.timeout, req_name(req));
            die_proto("reading the reply to %s: %s", req_name(req), strerror(errno));
        }
        if (n == 0)
            die_proto("back-end closed the connection while we waited for the reply to %s",
                      req_name(req));
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int nf = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                int fds[VU_MAX_FDS];
                memcpy(fds, CMSG_DATA(c), sizeof(int) * (nf < VU_MAX_FDS ? nf : VU_MAX_FDS));
                for (int i = 0; i < nf && i < VU_MAX_FDS; i++)
                    close(fds[i]);
                die_proto("reply to %s carried %d unexpected file descriptor(s)",
                          req_name(req), nf);
            }
        }
        if (m.msg_flags & MSG_CTRUNC)
            die_proto("reply to %s carried truncated ancillary data", req_name(req));
        got += (size_t)n;
    }
}

/* Receive the reply to `req`; checks type, version and REPLY flag. Returns payload size. */
static uint32_t vu_recv_reply(uint32_t req, void *payload, uint32_t maxsize)
{
    struct vu_hdr h;
    recv_exact(&h, sizeof(h), req);
    trace("<- %s (%u) flags=0x%x size=%u", req_name(h.request), h.request, h.flags, h.size);
    if (h.request != req)
        die_proto("expected the reply to %s (%u), got message type %s (%u)",
                  req_name(req), req, req_name(h.request), h.request);
    if ((h.flags & VU_FLAG_VERSION_MASK) != VU_FLAG_VERSION)
        die_proto("reply to %s has protocol version %u (flags 0x%x), expected 1",
                  req_name(req), h.flags & VU_FLAG_VERSION_MASK, h.flags);
    if (!(h.flags & VU_FLAG_REPLY))
        die_proto("reply to %s lacks the REPLY flag (flags 0x%x)", req_name(req), h.flags);
    if (h.size > maxsize)
        die_proto("reply to %s has payload size %u, at most %u expected",
                  req_name(req), h.size, maxsize);
    if (h.size)
        recv_exact(payload, h.size, req);
    return h.size;
}

static uint64_t vu_get_u64(uint32_t req)
{
    uint64_t v = 0;
    vu_send(req, 0, NULL, 0, NULL, 0);
    uint32_t n = vu_recv_reply(req, &v, sizeof(v));
    if (n != sizeof(v))
        die_proto("reply to %s has payload size %u, expected 8", req_name(req), n);
    return le64toh(v);
}

/* A request without a reply of its own: with REPLY_ACK, ask for and check the ack. */
static void vu_request(uint32_t req, const void *payload, uint32_t size, const int *fds, int nfds)
{
    bool ack = D.reply_ack;
    vu_send(req, ack ? VU_FLAG_NEED_REPLY : 0, payload, size, fds, nfds);
    if (ack) {
        uint64_t v = 0;
        uint32_t n = vu_recv_reply(req, &v, sizeof(v));
        if (n != sizeof(v))
            die_proto("REPLY_ACK for %s has payload size %u, expected 8", req_name(req), n);
        if (v != 0)
            die_proto("back-end rejected %s (REPLY_ACK status %" PRIu64 ")", req_name(req), v);
    }
}

static void vu_request_u64(uint32_t req, uint64_t v, const int *fds, int nfds)
{
    uint64_t le = htole64(v);
    vu_request(req, &le, sizeof(le), fds, nfds);
}

static void vu_request_state(uint32_t req, uint32_t index, uint32_t num)
{
    struct vu_state s = { .index = index, .num = num };
    vu_request(req, &s, sizeof(s), NULL, 0);
}

/* ------------------------------------------------------------------------ */
/* connection and negotiation                                               */

static void connect_backend(void)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(opt.socket) >= sizeof(sa.sun_path))
        die_usage("socket path too long (%zu bytes, max %zu): %s", strlen(opt.socket),
                  sizeof(sa.sun_path) - 1, opt.socket);
    strcpy(sa.sun_path, opt.socket);

    /* Timeouts before connect: a unix connect() blocks while the listener's
     * backlog is full, and Linux bounds that wait by SO_SNDTIMEO. */
    struct timeval tv = { .tv_sec = (time_t)opt.timeout,
                          .tv_usec = (suseconds_t)((opt.timeout - (double)(time_t)opt.timeout) * 1e6) };
    uint64_t deadline = now_ns() + (uint64_t)(opt.wait * 1e9);
    for (;;) {
        D.sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (D.sock < 0)
            die_proto("socket: %s", strerror(errno));
        if (setsockopt(D.sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
            setsockopt(D.sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0)
            die_proto("setsockopt(SO_RCVTIMEO/SO_SNDTIMEO): %s", strerror(errno));
        if (connect(D.sock, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            break;
        int e = errno;
        close(D.sock);
        D.sock = -1;
        if ((e == ENOENT || e == ECONNREFUSED) && now_ns() < deadline) {
            usleep(20000);
            continue;
        }
        if (e == EAGAIN || e == EWOULDBLOCK || e == EINPROGRESS)
            die_proto("cannot connect to vhost-user socket %s: timed out after %.1f s "
                      "(the back-end is not accepting connections)", opt.socket, opt.timeout);
        die_proto("cannot connect to vhost-user socket %s: %s", opt.socket, strerror(e));
    }
    trace("connected to %s", opt.socket);
}

static uint32_t cfg32(unsigned off)
{
    uint32_t v;
    memcpy(&v, D.config + off, 4);
    return le32toh(v);
}

static void negotiate(void)
{
    D.features = vu_get_u64(VU_GET_FEATURES);
    trace("back-end features 0x%016" PRIx64, D.features);
    if (!has(D.features, VIRTIO_F_VERSION_1))
        die_proto("back-end does not offer VIRTIO_F_VERSION_1 (features 0x%" PRIx64
                  "); legacy devices are not supported", D.features);
    if (!has(D.features, VHOST_USER_F_PROTOCOL_FEATURES))
        die_proto("back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES (features 0x%" PRIx64
                  "); vublk needs the CONFIG protocol feature to read the disk size", D.features);

    D.proto = vu_get_u64(VU_GET_PROTOCOL_FEATURES);
    D.proto_acked = D.proto & ((1ull << VU_PROTO_MQ) | (1ull << VU_PROTO_REPLY_ACK) |
                               (1ull << VU_PROTO_CONFIG));
    trace("protocol features offered 0x%" PRIx64 ", acking 0x%" PRIx64, D.proto, D.proto_acked);
    if (!has(D.proto, VU_PROTO_CONFIG))
        die_proto("back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG (protocol features 0x%"
                  PRIx64 "); cannot read the virtio-blk config space", D.proto);
    /* REPLY_ACK takes effect only once negotiated: no NEED_REPLY on this one. */
    {
        uint64_t le = htole64(D.proto_acked);
        vu_send(VU_SET_PROTOCOL_FEATURES, 0, &le, sizeof(le), NULL, 0);
    }
    D.reply_ack = has(D.proto_acked, VU_PROTO_REPLY_ACK);

    /* GET_CONFIG: the reply must echo the size we asked for; size 0 means error. */
    {
        struct vu_config req = { .offset = 0, .size = CFG_REQUEST_SIZE, .flags = 0 };
        struct vu_config rep;
        uint32_t hdr = offsetof(struct vu_config, payload);
        vu_send(VU_GET_CONFIG, 0, &req, hdr + CFG_REQUEST_SIZE, NULL, 0);
        uint32_t n = vu_recv_reply(VU_GET_CONFIG, &rep, sizeof(rep));
        if (n == 0)
            die_proto("back-end reported an error for GET_CONFIG (empty reply payload)");
        if (n != hdr + CFG_REQUEST_SIZE)
            die_proto("GET_CONFIG reply has payload size %u, expected %u", n,
                      hdr + CFG_REQUEST_SIZE);
        if (rep.offset != 0 || rep.size != CFG_REQUEST_SIZE)
            die_proto("GET_CONFIG reply describes offset %u size %u, expected offset 0 size %u",
                      rep.offset, rep.size, CFG_REQUEST_SIZE);
        memcpy(D.config, rep.payload, CFG_REQUEST_SIZE);
        uint64_t cap;
        memcpy(&cap, D.config + CFG_CAPACITY, 8);
        D.capacity = le64toh(cap);
        D.size_max = cfg32(CFG_SIZE_MAX);
        D.seg_max = cfg32(CFG_SEG_MAX);
        D.blk_size = cfg32(CFG_BLK_SIZE);
        uint16_t nq;
        memcpy(&nq, D.config + CFG_NUM_QUEUES, 2);
        D.num_queues = le16toh(nq);
        D.writeback = D.config[CFG_WRITEBACK];
        trace("config: capacity=%" PRIu64 " sectors size_max=%u seg_max=%u blk_size=%u "
              "num_queues=%u writeback=%u", D.capacity, D.size_max, D.seg_max, D.blk_size,
              D.num_queues, D.writeback);
    }

    if (has(D.proto_acked, VU_PROTO_MQ)) {
        D.max_queues = vu_get_u64(VU_GET_QUEUE_NUM);
        trace("GET_QUEUE_NUM: %" PRIu64, D.max_queues);
    }

    vu_request(VU_SET_OWNER, NULL, 0, NULL, 0);

    uint64_t want = (1ull << VIRTIO_F_VERSION_1) | (1ull << VHOST_USER_F_PROTOCOL_FEATURES) |
                    (1ull << VIRTIO_BLK_F_SIZE_MAX) | (1ull << VIRTIO_BLK_F_SEG_MAX) |
                    (1ull << VIRTIO_BLK_F_BLK_SIZE) | (1ull << VIRTIO_BLK_F_FLUSH) |
                    (1ull << VIRTIO_BLK_F_RO);
    if (opt.event_idx)
        want |= 1ull << VIRTIO_F_RING_EVENT_IDX;
    if (opt.queues > 1)
        want |= 1ull << VIRTIO_BLK_F_MQ;
    D.acked = D.features & want;
    D.event_idx = has(D.acked, VIRTIO_F_RING_EVENT_IDX);
    trace("acking features 0x%016" PRIx64, D.acked);
    vu_request_u64(VU_SET_FEATURES, D.acked, NULL, 0);

    /* validate what the workload needs against what was negotiated */
    if (!has(D.acked, VIRTIO_BLK_F_BLK_SIZE) || D.blk_size == 0)
        D.blk_size = SECTOR;
    if (opt.queues > 1) {
        if (!has(D.acked, VIRTIO_BLK_F_MQ))
            die_proto("--queues %u needs VIRTIO_BLK_F_MQ, which the back-end does not offer",
                      opt.queues);
        if (D.num_queues < opt.queues)
            die_proto("--queues %u, but the back-end's config num_queues is %u", opt.queues,
                      D.num_queues);
        if (!has(D.proto_acked, VU_PROTO_MQ))
            die_proto("--queues %u needs VHOST_USER_PROTOCOL_F_MQ, which the back-end does not offer",
                      opt.queues);
    }
    if (D.max_queues && D.max_queues < opt.queues)
        die_proto("--queues %u, but GET_QUEUE_NUM says the back-end supports %" PRIu64,
                  opt.queues, D.max_queues);
}

/* ------------------------------------------------------------------------ */
/* guest memory, rings                                                      */

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

static void setup_memory_and_rings(void)
{
    const uint64_t page = 4096;

    /* segments per request */
    D.seg_limit = opt.bs;
    if (has(D.acked, VIRTIO_BLK_F_SIZE_MAX) && D.size_max > 0 && D.size_max < D.seg_limit) {
        D.seg_limit = D.size_max / SECTOR * SECTOR;
        if (D.seg_limit == 0)
            die_proto("back-end size_max %u is smaller than a sector", D.size_max);
    }
    if (opt.seg_size && opt.seg_size < D.seg_limit)
        D.seg_limit = opt.seg_size;
    D.nseg = (opt.bs + D.seg_limit - 1) / D.seg_limit;
    if (D.nseg == 0)
        D.nseg = 1;
    if (has(D.acked, VIRTIO_BLK_F_SEG_MAX) && D.seg_max > 0 && D.nseg > D.seg_max)
        die_usage("--bs %u needs %u segments of at most %u bytes, the back-end's seg_max is %u",
                  opt.bs, D.nseg, D.seg_limit, D.seg_max);
    if (VIRTIO_BLK_ID_BYTES > D.seg_limit * D.nseg)
        D.nseg = (VIRTIO_BLK_ID_BYTES + D.seg_limit - 1) / D.seg_limit;
    D.chain = D.nseg + 2;
    D.stride = (uint32_t)align_up(opt.bs > VIRTIO_BLK_ID_BYTES ? opt.bs : VIRTIO_BLK_ID_BYTES, page);
    D.scratch = aligned_alloc(page, D.stride);
    if (!D.scratch)
        die_proto("out of memory");

    uint32_t qsize = opt.queue_size;
    uint64_t need = (uint64_t)opt.iodepth * D.chain;
    if (!qsize) {
        qsize = 2;
        while (qsize < need)
            qsize <<= 1;
        if (qsize > 1024)
            die_usage("--iodepth %u x %u descriptors per request needs a %u-entry queue; "
                      "QEMU's limit is 1024 (pass --queue-size to insist)",
                      opt.iodepth, D.chain, qsize);
    } else if (need > qsize) {
        die_usage("--iodepth %u x %u descriptors per request does not fit --queue-size %u",
                  opt.iodepth, D.chain, qsize);
    }

    /* layout: per queue [desc][avail][used][headers+status][data] */
    uint64_t off = 0;
    D.nvqs = opt.queues;
    D.vqs = calloc(D.nvqs, sizeof(*D.vqs));
    if (!D.vqs)
        die_proto("out of memory");
    uint64_t meta_off[D.nvqs], data_off[D.nvqs];
    for (unsigned i = 0; i < D.nvqs; i++) {
        struct vq *q = &D.vqs[i];
        q->index = i;
        q->size = (uint16_t)qsize;
        q->desc_off = off;
        off += align_up(16ull * qsize, page);
        q->avail_off = off;
        off += align_up(6 + 2ull * qsize, page);
        q->used_off = off;
        off += align_up(6 + 8ull * qsize, page);
        meta_off[i] = off;
        off += align_up(32ull * opt.iodepth, page);
        data_off[i] = off;
        off += (uint64_t)D.stride * opt.iodepth;
    }
    D.mem_size = align_up(off, 2ull << 20);
    if (opt.mem > D.mem_size)
        D.mem_size = align_up(opt.mem, 2ull << 20);

    D.memfd = memfd_create("vublk-guest-ram", MFD_CLOEXEC);
    if (D.memfd < 0)
        die_proto("memfd_create: %s", strerror(errno));
    if (ftruncate(D.memfd, (off_t)D.mem_size) < 0)
        die_proto("ftruncate(memfd, %" PRIu64 "): %s", D.mem_size, strerror(errno));
    D.mem = mmap(NULL, D.mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, D.memfd, 0);
    if (D.mem == MAP_FAILED)
        die_proto("mmap(memfd, %" PRIu64 "): %s", D.mem_size, strerror(errno));

    /* guest physical address 0 == offset 0 of the memfd == D.mem */
    struct vu_memory m = { .nregions = 1 };
    m.regions[0].guest_phys_addr = 0;
    m.regions[0].memory_size = D.mem_size;
    m.regions[0].userspace_addr = (uint64_t)(uintptr_t)D.mem;
    m.regions[0].mmap_offset = 0;
    vu_request(VU_SET_MEM_TABLE, &m, offsetof(struct vu_memory, regions) + sizeof(struct vu_region),
               &D.memfd, 1);

    for (unsigned i = 0; i < D.nvqs; i++) {
        struct vq *q = &D.vqs[i];
        q->desc = (struct virtq_desc *)(D.mem + q->desc_off);
        q->avail = (struct virtq_avail *)(D.mem + q->avail_off);
        q->used = (struct virtq_used *)(D.mem + q->used_off);
        q->used_event = &q->avail->ring[qsize];
        q->avail_event = (volatile uint16_t *)&q->used->ring[qsize];
        q->nslots = opt.iodepth;
        q->slots = calloc(q->nslots, sizeof(*q->slots));
        if (!q->slots)
            die_proto("out of memory");
        for (unsigned s = 0; s < q->nslots; s++) {
            struct slot *sl = &q->slots[s];
            sl->head = (uint16_t)(s * D.chain);
            sl->hdr_gpa = meta_off[i] + 32ull * s;
            sl->status_gpa = sl->hdr_gpa + 16;
            sl->data_gpa = data_off[i] + (uint64_t)D.stride * s;
            sl->hdr = D.mem + sl->hdr_gpa;
            sl->status = D.mem + sl->status_gpa;
            sl->data = D.mem + sl->data_gpa;
        }
        /* rings are zero (fresh memfd): idx 0, flags 0 */
        q->avail->flags = htole16(opt.poll && !D.event_idx ? VIRTQ_AVAIL_F_NO_INTERRUPT : 0);
        if (D.event_idx)
            *q->used_event = htole16(opt.poll ? 0x8000 : 0);

        q->kickfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        q->callfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (q->kickfd < 0 || q->callfd < 0)
            die_proto("eventfd: %s", strerror(errno));

        vu_request_state(VU_SET_VRING_NUM, i, qsize);
        vu_request_state(VU_SET_VRING_BASE, i, 0);
        struct vu_addr a = {
            .index = i,
            .flags = 0,
            .desc = (uint64_t)(uintptr_t)q->desc,
            .used = (uint64_t)(uintptr_t)q->used,
            .avail = (uint64_t)(uintptr_t)q->avail,
            .log = 0,
        };
        vu_request(VU_SET_VRING_ADDR, &a, sizeof(a), NULL, 0);
        vu_request_u64(VU_SET_VRING_CALL, i, &q->callfd, 1);
        vu_request_u64(VU_SET_VRING_KICK, i, &q->kickfd, 1);
    }
    if (has(D.acked, VHOST_USER_F_PROTOCOL_FEATURES))
        for (unsigned i = 0; i < D.nvqs; i++)
            vu_request_state(VU_SET_VRING_ENABLE, i, 1);
    trace("guest memory %" PRIu64 " bytes, %u queue(s) of %u entries, %u descriptors per request",
          D.mem_size, D.nvqs, qsize, D.chain);
}

static void teardown(void)
{
    for (unsigned i = 0; i < D.nvqs; i++) {
        struct vq *q = &D.vqs[i];
        if (has(D.acked, VHOST_USER_F_PROTOCOL_FEATURES))
            vu_request_state(VU_SET_VRING_ENABLE, i, 0);
        struct vu_state s = { .index = i, .num = 0 }, r;
        vu_send(VU_GET_VRING_BASE, 0, &s, sizeof(s), NULL, 0);
        uint32_t n = vu_recv_reply(VU_GET_VRING_BASE, &r, sizeof(r));
        if (n != sizeof(r))
            die_proto("GET_VRING_BASE reply has payload size %u, expected 8", n);
        if (r.index != i)
            die_proto("GET_VRING_BASE reply is for queue %u, asked for %u", r.index, i);
        if ((uint16_t)r.num != q->avail_idx)
            die_proto("GET_VRING_BASE for queue %u says next avail index %u, but we made %u "
                      "buffers available and all completed", i, r.num, q->avail_idx);
        trace("queue %u stopped at avail index %u", i, r.num);
    }
    close(D.sock);
    D.sock = -1;
    for (unsigned i = 0; i < D.nvqs; i++) {
        close(D.vqs[i].kickfd);
        close(D.vqs[i].callfd);
    }
}

/* ------------------------------------------------------------------------ */
/* request engine                                                           */

#define LAT_SUB_BITS 4
#define LAT_SUB (1u << LAT_SUB_BITS)
#define LAT_BUCKETS (64 * LAT_SUB)

struct job;
typedef bool (*next_fn)(struct job *, struct vq *, struct slot *);
typedef void (*done_fn)(struct job *, struct vq *, struct slot *, uint8_t status, uint32_t len);

struct job {
    next_fn next;
    done_fn done;
    uint64_t submitted, completed, errors, len_mismatch, mismatches, bytes;
    uint64_t limit_ios;     /* 0 = none */
    uint64_t deadline;      /* now_ns() deadline, 0 = none */
    bool stop;
    bool measure;           /* keep latency histogram */
    uint64_t region_off, region_blocks, next_block;
    uint64_t rng;
    uint8_t id[VIRTIO_BLK_ID_BYTES];
    bool id_ok;
    uint8_t status;         /* last status, for single commands */
    uint64_t lat_hist[LAT_BUCKETS];
    uint64_t lat_sum, lat_max;
    unsigned errors_printed, mismatches_printed;
    bool len_warned;
};

static unsigned lat_bucket(uint64_t v)
{
    if (v < LAT_SUB)
        return (unsigned)v;
    unsigned msb = 63 - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - LAT_SUB_BITS;
    unsigned idx = (shift + 1) * LAT_SUB + (unsigned)((v >> shift) & (LAT_SUB - 1));
    return idx < LAT_BUCKETS ? idx : LAT_BUCKETS - 1;
}

static double lat_bucket_mid(unsigned idx)
{
    if (idx < LAT_SUB)
        return idx;
    unsigned shift = idx / LAT_SUB - 1;
    uint64_t lo = (uint64_t)(LAT_SUB + idx % LAT_SUB) << shift;
    return (double)lo + (double)(1ull << shift) / 2.0;
}

static double lat_percentile(const struct job *j, double p)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < LAT_BUCKETS; i++)
        n += j->lat_hist[i];
    if (!n)
        return 0;
    uint64_t want = (uint64_t)(p * (double)n);
    if (want >= n)
        want = n - 1;
    uint64_t acc = 0;
    for (unsigned i = 0; i < LAT_BUCKETS; i++) {
        acc += j->lat_hist[i];
        if (acc > want)
            return lat_bucket_mid(i);
    }
    return 0;
}

static uint64_t rng_next(uint64_t *s)
{
    *s += 0x9E3779B97F4A7C15ull;
    uint64_t z = *s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static const char *type_name(uint32_t t)
{
    switch (t) {
    case VIRTIO_BLK_T_IN: return "IN";
    case VIRTIO_BLK_T_OUT: return "OUT";
    case VIRTIO_BLK_T_FLUSH: return "FLUSH";
    case VIRTIO_BLK_T_GET_ID: return "GET_ID";
    default: return "?";
    }
}

static const char *status_name(uint8_t s)
{
    switch (s) {
    case VIRTIO_BLK_S_OK: return "OK";
    case VIRTIO_BLK_S_IOERR: return "IOERR";
    case VIRTIO_BLK_S_UNSUPP: return "UNSUPP";
    case 0xff: return "untouched by the back-end";
    default: return "invalid";
    }
}

/* Data segment k (0-based) of a request of len bytes: its length and its
 * offset in the slot's data buffer. With more than one segment they are laid
 * out in reverse order (the last segment at offset 0), so a device that
 * treats the data as one contiguous buffer reads or writes the wrong bytes. */
static uint32_t seg_len(uint32_t len, unsigned k)
{
    uint32_t start = k * D.seg_limit;
    uint32_t n = len - start;
    return n < D.seg_limit ? n : D.seg_limit;
}

static unsigned seg_count(uint32_t len)
{
    return (len + D.seg_limit - 1) / D.seg_limit;
}

static uint32_t seg_off(uint32_t len, unsigned k)
{
    unsigned n = seg_count(len);
    if (n <= 1)
        return 0;
    return len - k * D.seg_limit - seg_len(len, k); /* bytes of segments after k */
}

/* logical buffer -> the slot's (possibly scattered) data segments */
static void data_scatter(struct slot *s, const uint8_t *logical, uint32_t len)
{
    for (unsigned k = 0; k < seg_count(len); k++)
        memcpy(s->data + seg_off(len, k), logical + k * D.seg_limit, seg_len(len, k));
}

static void data_gather(const struct slot *s, uint8_t *logical, uint32_t len)
{
    for (unsigned k = 0; k < seg_count(len); k++)
        memcpy(logical + k * D.seg_limit, s->data + seg_off(len, k), seg_len(len, k));
}

/* Build the descriptor chain for a slot whose type/sector/len are set, and
 * put it on the avail ring (not yet published). */
static void vq_submit(struct vq *q, struct slot *s, bool measure)
{
    struct virtio_blk_outhdr *h = (struct virtio_blk_outhdr *)s->hdr;
    h->type = htole32(s->type);
    h->ioprio = 0;
    h->sector = htole64(s->sector);
    *s->status = 0xff; /* must be overwritten by the device */

    bool dev_writes = s->type == VIRTIO_BLK_T_IN || s->type == VIRTIO_BLK_T_GET_ID;
    uint16_t d = s->head;
    struct virtq_desc *desc = q->desc;
    desc[d].addr = htole64(s->hdr_gpa);
    desc[d].len = htole32(sizeof(*h));
    desc[d].flags = htole16(VIRTQ_DESC_F_NEXT);
    desc[d].next = htole16((uint16_t)(d + 1));
    d++;
    for (unsigned k = 0; k < seg_count(s->len); k++) {
        desc[d].addr = htole64(s->data_gpa + seg_off(s->len, k));
        desc[d].len = htole32(seg_len(s->len, k));
        desc[d].flags = htole16(VIRTQ_DESC_F_NEXT | (dev_writes ? VIRTQ_DESC_F_WRITE : 0));
        desc[d].next = htole16((uint16_t)(d + 1));
        d++;
    }
    desc[d].addr = htole64(s->status_gpa);
    desc[d].len = htole32(1);
    desc[d].flags = htole16(VIRTQ_DESC_F_WRITE);
    desc[d].next = 0;

    s->busy = true;
    if (measure)
        s->t_submit = now_ns();
    q->inflight++;
    q->avail->ring[q->avail_idx & (uint16_t)(q->size - 1)] = htole16(s->head);
    q->avail_idx++;
}

/* Publish new avail entries; kick unless the device suppressed notifications. */
static void vq_publish(struct vq *q)
{
    uint16_t old = q->published, new = q->avail_idx;
    if (old == new)
        return;
    __atomic_store_n(&q->avail->idx, htole16(new), __ATOMIC_RELEASE);
    q->published = new;
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* idx store before reading avail_event/flags */
    bool kick;
    if (D.event_idx) {
        uint16_t ev = le16toh(__atomic_load_n(q->avail_event, __ATOMIC_RELAXED));
        kick = (uint16_t)(new - ev - 1) < (uint16_t)(new - old);
    } else {
        kick = !(le16toh(__atomic_load_n(&q->used->flags, __ATOMIC_RELAXED)) &
                 VIRTQ_USED_F_NO_NOTIFY);
    }
    if (kick) {
        uint64_t one = 1;
        ssize_t n = write(q->kickfd, &one, sizeof(one));
        if (n != sizeof(one) && !(n < 0 && errno == EAGAIN))
            die_proto("writing kick eventfd of queue %u: %s", q->index,
                      n < 0 ? strerror(errno) : "short write");
        q->kicks++;
    }
}

static void job_complete(struct job *j, struct vq *q, struct slot *s, uint32_t len, uint64_t t)
{
    uint8_t st = *(volatile uint8_t *)s->status;
    s->busy = false;
    q->inflight--;
    j->completed++;
    if (j->measure) {
        uint64_t lat = t - s->t_submit;
        j->lat_hist[lat_bucket(lat)]++;
        j->lat_sum += lat;
        if (lat > j->lat_max)
            j->lat_max = lat;
    }
    if (st != VIRTIO_BLK_S_OK) {
        j->errors++;
        if (j->errors_printed++ < 10)
            fprintf(stderr, "%s: request failed: queue %u type %s sector %" PRIu64
                    " len %u: status %u (%s)\n", prog, q->index, type_name(s->type), s->sector,
                    s->len, st, status_name(st));
    } else if (s->type == VIRTIO_BLK_T_IN || s->type == VIRTIO_BLK_T_OUT) {
        j->bytes += s->len;
        uint32_t expect = s->type == VIRTIO_BLK_T_IN ? s->len + 1 : 1;
        if (len != expect) {
            j->len_mismatch++;
            if (!j->len_warned) {
                j->len_warned = true;
                warnx("used.len %u for a %s of %u bytes, expected %u (bytes written to the "
                      "device-writable buffers); counting as len_mismatch", len,
                      type_name(s->type), s->len, expect);
            }
        }
    }
    j->status = st;
    if (j->done)
        j->done(j, q, s, st, len);
    if (j->stop)
        return;
    if ((j->limit_ios && j->submitted >= j->limit_ios) || (j->deadline && t >= j->deadline)) {
        j->stop = true;
        return;
    }
    if (j->next(j, q, s)) {
        j->submitted++;
        vq_submit(q, s, j->measure);
    } else {
        j->stop = true;
    }
}

static unsigned vq_reap(struct job *j, struct vq *q)
{
    uint16_t idx = le16toh(__atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE));
    uint16_t n = (uint16_t)(idx - q->last_used);
    if (!n)
        return 0;
    if (n > q->inflight)
        die_proto("queue %u: used->idx moved from %u to %u (%u entries) but only %u requests "
                  "are in flight", q->index, q->last_used, idx, n, q->inflight);
    uint64_t t = j->measure ? now_ns() : 0;
    for (uint16_t k = 0; k < n; k++) {
        struct virtq_used_elem *e = &q->used->ring[(uint16_t)(q->last_used + k) &
                                                   (uint16_t)(q->size - 1)];
        uint32_t id = le32toh(e->id), len = le32toh(e->len);
        if (id >= q->size || id % D.chain != 0 || id / D.chain >= q->nslots)
            die_proto("queue %u: used element id %u is not the head of any chain we submitted",
                      q->index, id);
        struct slot *s = &q->slots[id / D.chain];
        if (!s->busy)
            die_proto("queue %u: used element id %u completes a chain that is not in flight",
                      q->index, id);
        job_complete(j, q, s, len, t);
    }
    q->last_used = idx;
    if (opt.poll && D.event_idx) /* keep used_event out of reach: no interrupts */
        *q->used_event = htole16((uint16_t)(q->last_used + 0x8000));
    return n;
}

static unsigned inflight_total(void)
{
    unsigned n = 0;
    for (unsigned i = 0; i < D.nvqs; i++)
        n += D.vqs[i].inflight;
    return n;
}

static unsigned reap_all(struct job *j)
{
    unsigned n = 0;
    for (unsigned i = 0; i < D.nvqs; i++)
        n += vq_reap(j, &D.vqs[i]);
    return n;
}

/* The back-end must not send anything unsolicited (we negotiate no back-end
 * channel); readable means EOF or garbage. */
static void check_socket(short revents)
{
    if (!revents)
        return;
    char c;
    ssize_t n = recv(D.sock, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0 || (revents & (POLLHUP | POLLERR)))
        die_proto("back-end closed the connection with %u request(s) in flight", inflight_total());
    if (n > 0)
        die_proto("back-end sent an unsolicited message on the vhost-user socket");
}

static void wait_completions(struct job *j)
{
    if (reap_all(j))
        return;
    uint64_t start = now_ns();
    uint64_t limit = (uint64_t)(opt.timeout * 1e9);
    if (opt.poll) {
        for (unsigned long spins = 1;; spins++) {
            if (reap_all(j))
                return;
            if ((spins & 63) == 0) {
                uint64_t t = now_ns();
                if (t - start > limit)
                    die_proto("no completion from the back-end within %.1f s (%u request(s) "
                              "in flight)", opt.timeout, inflight_total());
                if ((spins & 0xffff) == 0) {
                    struct pollfd p = { .fd = D.sock, .events = POLLIN };
                    if (poll(&p, 1, 0) > 0)
                        check_socket(p.revents);
                }
            }
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    }
    struct pollfd pfd[D.nvqs + 1];
    for (;;) {
        /* ask for an interrupt on the next used entry, then re-check */
        if (D.event_idx)
            for (unsigned i = 0; i < D.nvqs; i++)
                *D.vqs[i].used_event = htole16(D.vqs[i].last_used);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (reap_all(j))
            return;
        for (unsigned i = 0; i < D.nvqs; i++)
            pfd[i] = (struct pollfd){ .fd = D.vqs[i].callfd, .events = POLLIN };
        pfd[D.nvqs] = (struct pollfd){ .fd = D.sock, .events = POLLIN };
        uint64_t t = now_ns();
        if (t - start > limit)
            die_proto("no completion from the back-end within %.1f s (%u request(s) in flight)",
                      opt.timeout, inflight_total());
        int ms = (int)((limit - (t - start)) / 1000000) + 1;
        int r = poll(pfd, D.nvqs + 1, ms);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die_proto("poll: %s", strerror(errno));
        }
        check_socket(pfd[D.nvqs].revents);
        for (unsigned i = 0; i < D.nvqs; i++) {
            if (pfd[i].revents & POLLIN) {
                uint64_t v;
                if (read(pfd[i].fd, &v, sizeof(v)) == sizeof(v))
                    D.vqs[i].calls++;
            }
        }
        if (reap_all(j))
            return;
    }
}

static void run_job(struct job *j)
{
    for (unsigned i = 0; i < D.nvqs && !j->stop; i++) {
        struct vq *q = &D.vqs[i];
        for (unsigned s = 0; s < q->nslots && !j->stop; s++) {
            if (j->limit_ios && j->submitted >= j->limit_ios) {
                j->stop = true;
                break;
            }
            if (!j->next(j, q, &q->slots[s])) {
                j->stop = true;
                break;
            }
            j->submitted++;
            vq_submit(q, &q->slots[s], j->measure);
        }
    }
    for (unsigned i = 0; i < D.nvqs; i++)
        vq_publish(&D.vqs[i]);
    while (inflight_total() > 0) {
        wait_completions(j);
        for (unsigned i = 0; i < D.nvqs; i++)
            vq_publish(&D.vqs[i]);
    }
}

/* ---- workload generators ---- */

static bool next_random(struct job *j, struct vq *q, struct slot *s)
{
    (void)q;
    uint64_t blk = rng_next(&j->rng) % j->region_blocks;
    s->type = opt.rw == RW_RANDREAD ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
    s->sector = (j->region_off + blk * opt.bs) / SECTOR;
    s->len = opt.bs;
    return true;
}

static bool next_sequential(struct job *j, struct vq *q, struct slot *s)
{
    (void)q;
    uint64_t blk = j->next_block++;
    if (j->next_block >= j->region_blocks)
        j->next_block = 0;
    s->type = opt.rw == RW_READ ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
    s->sector = (j->region_off + blk * opt.bs) / SECTOR;
    s->len = opt.bs;
    return true;
}

static bool next_verify_write(struct job *j, struct vq *q, struct slot *s)
{
    (void)q;
    if (j->next_block >= j->region_blocks)
        return false;
    uint64_t blk = j->next_block++;
    s->type = VIRTIO_BLK_T_OUT;
    s->sector = (j->region_off + blk * opt.bs) / SECTOR;
    s->len = opt.bs;
    if (D.nseg > 1) {
        pattern_fill(D.scratch, opt.seed, s->sector, s->len);
        data_scatter(s, D.scratch, s->len);
    } else {
        pattern_fill(s->data, opt.seed, s->sector, s->len);
    }
    return true;
}

static bool next_verify_read(struct job *j, struct vq *q, struct slot *s)
{
    (void)q;
    if (j->next_block >= j->region_blocks)
        return false;
    uint64_t blk = j->next_block++;
    s->type = VIRTIO_BLK_T_IN;
    s->sector = (j->region_off + blk * opt.bs) / SECTOR;
    s->len = opt.bs;
    memset(s->data, 0xa5, s->len); /* poison: stale buffers must not pass */
    return true;
}

static void done_verify_read(struct job *j, struct vq *q, struct slot *s, uint8_t st, uint32_t len)
{
    (void)q;
    (void)len;
    if (st != VIRTIO_BLK_S_OK)
        return;
    const uint64_t *w = (const uint64_t *)s->data;
    if (D.nseg > 1) {
        data_gather(s, D.scratch, s->len);
        w = (const uint64_t *)D.scratch;
    }
    for (uint32_t sec = 0; sec < s->len / SECTOR; sec++) {
        for (unsigned i = 0; i < SECTOR / 8; i++) {
            uint64_t want = pattern_word(opt.seed, s->sector + sec, i);
            uint64_t got = le64toh(w[sec * 64 + i]);
            if (got != want) {
                j->mismatches++;
                if (j->mismatches_printed++ < 10)
                    fprintf(stderr, "%s: verify mismatch at byte offset %" PRIu64
                            " (sector %" PRIu64 ", word %u): expected 0x%016" PRIx64
                            ", read 0x%016" PRIx64 "\n", prog,
                            (s->sector + sec) * SECTOR + i * 8, s->sector + sec, i, want, got);
                break; /* count each mismatching sector once */
            }
        }
    }
}

static bool next_single(struct job *j, struct vq *q, struct slot *s)
{
    (void)q;
    if (j->submitted > 0)
        return false;
    s->type = (uint32_t)j->next_block; /* command type stashed by the caller */
    s->sector = 0;
    s->len = s->type == VIRTIO_BLK_T_GET_ID ? VIRTIO_BLK_ID_BYTES : 0;
    if (s->len)
        memset(s->data, 0, s->len);
    return true;
}

static void done_single(struct job *j, struct vq *q, struct slot *s, uint8_t st, uint32_t len)
{
    (void)q;
    (void)len;
    if (s->type == VIRTIO_BLK_T_GET_ID && st == VIRTIO_BLK_S_OK) {
        data_gather(s, j->id, VIRTIO_BLK_ID_BYTES);
        j->id_ok = true;
    }
}

/* Run one command (FLUSH or GET_ID) on queue 0 with nothing else in flight. */
static struct job single_command(uint32_t type)
{
    struct job j = { .next = next_single, .done = done_single, .limit_ios = 1 };
    j.next_block = type;
    unsigned saved = D.nvqs;
    D.nvqs = 1;
    run_job(&j);
    D.nvqs = saved;
    return j;
}

/* ------------------------------------------------------------------------ */
/* output                                                                   */

static void json_string(FILE *f, const uint8_t *s, size_t n)
{
    fputc('"', f);
    for (size_t i = 0; i < n && s[i]; i++) {
        uint8_t c = s[i];
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

/* ------------------------------------------------------------------------ */
/* command line                                                             */

static void usage(FILE *f)
{
    fprintf(f,
"usage: %s --socket PATH [--rw MODE] [options]\n"
"\n"
"A userspace vhost-user-blk front-end: connects to a vhost-user-blk back-end's\n"
"unix socket, negotiates like QEMU, shares one memfd as guest memory and drives\n"
"virtio-blk split virtqueues directly. Prints one JSON line on stdout.\n"
"\n"
"  --socket PATH       back-end vhost-user socket (required)\n"
"  --rw MODE           randread | randwrite | read | write | verify |\n"
"                      verify-write | verify-read   (default: none; only\n"
"                      negotiate, and GET_ID with --check-id)\n"
"  --bs BYTES          request size, multiple of 512 (default 4096)\n"
"  --iodepth N         requests kept in flight per queue (default 32)\n"
"  --runtime SEC       stop submitting after SEC seconds (default 10 unless --ios)\n"
"  --ios N             stop after N requests in total (with --runtime: first wins)\n"
"  --queues N          virtqueues to drive, one thread round-robin (default 1)\n"
"  --size BYTES        size of the region used (default: whole disk)\n"
"  --offset BYTES      start of the region (default 0)\n"
"  --seed N            seed for random offsets and the verify pattern (default 1)\n"
"  --poll              busy-poll the used ring instead of waiting on the call fd\n"
"  --no-event-idx      do not negotiate VIRTIO_F_RING_EVENT_IDX\n"
"  --check-id          issue VIRTIO_BLK_T_GET_ID and report it as \"id\"\n"
"  --timeout SEC       bound on every wait for a reply or completion (default 5)\n"
"  --wait SEC          retry connecting while the socket is absent (default 0)\n"
"  --queue-size N      virtqueue size (default: iodepth x descriptors per\n"
"                      request, rounded up to a power of two, max 1024)\n"
"  --seg-size BYTES    split each request's data into descriptors of at most\n"
"                      BYTES, laid out in reverse order in memory, like a\n"
"                      guest's scattered pages (default: one data descriptor,\n"
"                      or the back-end's size_max)\n"
"  --mem BYTES         minimum guest memory size (default: what is needed)\n"
"  -v, --verbose       trace the vhost-user conversation on stderr\n"
"  -h, --help\n"
"\n"
"Sizes accept k, m, g, t suffixes (powers of 1024).\n"
"\n"
"Each request is a descriptor chain: 16-byte header (device-readable), data\n"
"(split at size_max or --seg-size), 1-byte status (device-writable).\n"
"Every status byte must be 0 (it is preset to 0xff); failures are counted in\n"
"\"errors\". used.len is checked against the bytes the device had to write\n"
"(data+1 for reads, 1 for writes); differences are counted in \"len_mismatch\".\n"
"\n"
"verify: writes the pattern over the region with --bs requests, FLUSHes (if\n"
"the back-end offers VIRTIO_BLK_F_FLUSH), reads everything back and compares.\n"
"verify-write does only the write+flush, verify-read only the read+compare.\n"
"Pattern: every 512-byte sector s (absolute LBA, byte offset s*512) holds 64\n"
"little-endian 64-bit words; word i (0..63) is\n"
"    mix64((seed ^ ((s << 6) | i)) mod 2^64)\n"
"where mix64 is the splitmix64 finaliser, all arithmetic mod 2^64:\n"
"    z += 0x9E3779B97F4A7C15\n"
"    z  = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9\n"
"    z  = (z ^ (z >> 27)) * 0x94D049BB133111EB\n"
"    return z ^ (z >> 31)\n"
"\n"
"Output (one JSON line): rw, bs, iodepth, queues, ios, seconds, iops, mbps\n"
"(10^6 bytes/s), errors, len_mismatch, mismatches, lat_*_us, kicks, calls,\n"
"backend_features, acked_features, protocol_features, capacity_bytes, ...\n"
"\n"
"Exit status: 0 ok, 1 request errors or verify mismatch, 2 usage error,\n"
"3 connection/protocol error or timeout.\n",
            prog);
}

static uint64_t parse_size(const char *name, const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *s == '-')
        die_usage("invalid value for %s: '%s'", name, s);
    uint64_t mul = 1;
    switch (tolower((unsigned char)*end)) {
    case 'k': mul = 1ull << 10; end++; break;
    case 'm': mul = 1ull << 20; end++; break;
    case 'g': mul = 1ull << 30; end++; break;
    case 't': mul = 1ull << 40; end++; break;
    default: break;
    }
    if (mul > 1 && (*end == 'i' || *end == 'I'))
        end++;
    if (*end == 'b' || *end == 'B')
        end++;
    if (*end)
        die_usage("invalid value for %s: '%s'", name, s);
    if (v > UINT64_MAX / mul)
        die_usage("value for %s too large: '%s'", name, s);
    return v * mul;
}

static double parse_seconds(const char *name, const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= 0) || v > 1e7)
        die_usage("invalid value for %s: '%s'", name, s);
    return v;
}

static void parse_args(int argc, char **argv)
{
    enum { O_SOCKET = 256, O_RW, O_BS, O_IODEPTH, O_RUNTIME, O_IOS, O_QUEUES, O_SIZE, O_OFFSET,
           O_SEED, O_POLL, O_NO_EVENT_IDX, O_CHECK_ID, O_TIMEOUT, O_WAIT, O_QSIZE, O_MEM,
           O_SEG_SIZE };
    static const struct option lo[] = {
        { "socket", required_argument, 0, O_SOCKET },
        { "rw", required_argument, 0, O_RW },
        { "bs", required_argument, 0, O_BS },
        { "iodepth", required_argument, 0, O_IODEPTH },
        { "runtime", required_argument, 0, O_RUNTIME },
        { "ios", required_argument, 0, O_IOS },
        { "queues", required_argument, 0, O_QUEUES },
        { "size", required_argument, 0, O_SIZE },
        { "offset", required_argument, 0, O_OFFSET },
        { "seed", required_argument, 0, O_SEED },
        { "poll", no_argument, 0, O_POLL },
        { "no-event-idx", no_argument, 0, O_NO_EVENT_IDX },
        { "check-id", no_argument, 0, O_CHECK_ID },
        { "timeout", required_argument, 0, O_TIMEOUT },
        { "wait", required_argument, 0, O_WAIT },
        { "queue-size", required_argument, 0, O_QSIZE },
        { "mem", required_argument, 0, O_MEM },
        { "seg-size", required_argument, 0, O_SEG_SIZE },
        { "verbose", no_argument, 0, 'v' },
        { "help", no_argument, 0, 'h' },
        { 0, 0, 0, 0 },
    };
    bool ios_set = false;
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":vh", lo, NULL)) != -1) {
        switch (c) {
        case O_SOCKET: opt.socket = optarg; break;
        case O_RW: {
            bool found = false;
            for (unsigned i = RW_RANDREAD; i <= RW_VERIFY_READ; i++)
                if (!strcmp(optarg, rw_names[i])) {
                    opt.rw = (enum rw_mode)i;
                    found = true;
                }
            if (!found)
                die_usage("invalid --rw '%s' (randread|randwrite|read|write|verify|"
                          "verify-write|verify-read)", optarg);
            break;
        }
        case O_BS: {
            uint64_t v = parse_size("--bs", optarg);
            if (v == 0 || v % SECTOR || v > (64u << 20))
                die_usage("--bs must be a non-zero multiple of 512 up to 64 MiB, got %s", optarg);
            opt.bs = (uint32_t)v;
            break;
        }
        case O_IODEPTH: {
            uint64_t v = parse_size("--iodepth", optarg);
            if (v == 0 || v > 32768)
                die_usage("--iodepth must be 1..32768, got %s", optarg);
            opt.iodepth = (uint32_t)v;
            break;
        }
        case O_RUNTIME:
            opt.runtime = parse_seconds("--runtime", optarg);
            opt.runtime_set = true;
            break;
        case O_IOS:
            opt.ios = parse_size("--ios", optarg);
            ios_set = true;
            if (!opt.ios)
                die_usage("--ios must be > 0");
            break;
        case O_QUEUES: {
            uint64_t v = parse_size("--queues", optarg);
            if (v == 0 || v > 64)
                die_usage("--queues must be 1..64, got %s", optarg);
            opt.queues = (uint32_t)v;
            break;
        }
        case O_SIZE: opt.size = parse_size("--size", optarg); break;
        case O_OFFSET: opt.offset = parse_size("--offset", optarg); break;
        case O_SEED: opt.seed = parse_size("--seed", optarg); break;
        case O_POLL: opt.poll = true; break;
        case O_NO_EVENT_IDX: opt.event_idx = false; break;
        case O_CHECK_ID: opt.check_id = true; break;
        case O_TIMEOUT:
            opt.timeout = parse_seconds("--timeout", optarg);
            if (opt.timeout < 0.01)
                die_usage("--timeout must be at least 0.01 s");
            break;
        case O_WAIT: opt.wait = parse_seconds("--wait", optarg); break;
        case O_QSIZE: {
            uint64_t v = parse_size("--queue-size", optarg);
            if (v < 2 || v > 32768 || (v & (v - 1)))
                die_usage("--queue-size must be a power of two in 2..32768, got %s", optarg);
            opt.queue_size = (uint32_t)v;
            break;
        }
        case O_MEM: opt.mem = parse_size("--mem", optarg); break;
        case O_SEG_SIZE: {
            uint64_t v = parse_size("--seg-size", optarg);
            if (v < 16 || v > (64u << 20))
                die_usage("--seg-size must be 16 bytes .. 64 MiB, got %s", optarg);
            opt.seg_size = (uint32_t)v;
            break;
        }
        case 'v': opt.verbose++; break;
        case 'h': usage(stdout); exit(0);
        case ':': die_usage("option %s needs an argument (see --help)", argv[optind - 1]);
        default: die_usage("unknown option %s (see --help)", argv[optind - 1]);
        }
    }
    if (optind < argc)
        die_usage("unexpected argument '%s' (see --help)", argv[optind]);
    if (!opt.socket)
        die_usage("--socket PATH is required (see --help)");
    if (ios_set && !opt.runtime_set)
        opt.runtime = 0; /* --ios alone: no time limit */
    if (opt.offset % SECTOR)
        die_usage("--offset must be a multiple of 512");
}

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    parse_args(argc, argv);
    connect_backend();
    negotiate();

    uint64_t disk_bytes = D.capacity * SECTOR;
    bool writes = opt.rw == RW_RANDWRITE || opt.rw == RW_WRITE || opt.rw == RW_VERIFY ||
                  opt.rw == RW_VERIFY_WRITE;
    if (writes && has(D.acked, VIRTIO_BLK_F_RO))
        die_usage("--rw %s writes, but the back-end's disk is read-only (VIRTIO_BLK_F_RO)",
                  rw_names[opt.rw]);
    uint64_t region_off = opt.offset, region = 0;
    if (opt.rw != RW_NONE) {
        if (opt.bs % D.blk_size)
            die_usage("--bs %u is not a multiple of the back-end's block size %u", opt.bs,
                      D.blk_size);
        if (region_off % D.blk_size)
            die_usage("--offset %" PRIu64 " is not a multiple of the back-end's block size %u",
                      region_off, D.blk_size);
        if (region_off >= disk_bytes)
            die_usage("--offset %" PRIu64 " is beyond the disk (%" PRIu64 " bytes)", region_off,
                      disk_bytes);
        region = disk_bytes - region_off;
        if (opt.size) {
            if (opt.size > region)
                die_usage("--size %" PRIu64 " exceeds the disk (%" PRIu64 " bytes from offset %"
                          PRIu64 ")", opt.size, region, region_off);
            region = opt.size;
        }
        region = region / opt.bs * opt.bs;
        if (region == 0)
            die_usage("the region (%" PRIu64 " bytes) is smaller than --bs %u",
                      opt.size ? opt.size : disk_bytes - region_off, opt.bs);
    }

    if (opt.rw == RW_NONE) {
        /* only negotiation and single commands: one small slot is enough */
        opt.iodepth = 1;
        opt.bs = SECTOR;
    }
    setup_memory_and_rings();

    /* GET_ID */
    struct job idj = { 0 };
    if (opt.check_id)
        idj = single_command(VIRTIO_BLK_T_GET_ID);

    struct job j = { .measure = true, .rng = opt.seed, .region_off = region_off,
                     .region_blocks = region / opt.bs };
    uint64_t flush_errors = 0, t0 = 0, t1 = 0;
    bool flushed = false;
    if (opt.rw != RW_NONE) {
        /* prefill write buffers with something non-trivial */
        if (opt.rw == RW_RANDWRITE || opt.rw == RW_WRITE)
            for (unsigned i = 0; i < D.nvqs; i++)
                for (unsigned s = 0; s < D.vqs[i].nslots; s++) {
                    uint64_t *w = (uint64_t *)D.vqs[i].slots[s].data;
                    uint64_t st = opt.seed + i * 1000003ull + s;
                    for (uint32_t k = 0; k < opt.bs / 8; k++)
                        w[k] = rng_next(&st);
                }
        switch (opt.rw) {
        case RW_RANDREAD:
        case RW_RANDWRITE:
            j.next = next_random;
            break;
        case RW_READ:
        case RW_WRITE:
            j.next = next_sequential;
            break;
        default:
            break;
        }
        t0 = now_ns();
        if (j.next) {
            j.limit_ios = opt.ios;
            j.deadline = opt.runtime > 0 ? t0 + (uint64_t)(opt.runtime * 1e9) : 0;
            run_job(&j);
        } else {
            /* verify modes: whole region, ignore --ios/--runtime */
            if (opt.rw == RW_VERIFY || opt.rw == RW_VERIFY_WRITE) {
                j.next = next_verify_write;
                j.next_block = 0;
                j.stop = false;
                run_job(&j);
                if (has(D.acked, VIRTIO_BLK_F_FLUSH)) {
                    struct job f = single_command(VIRTIO_BLK_T_FLUSH);
                    flushed = true;
                    if (f.errors) {
                        flush_errors = f.errors;
                        fprintf(stderr, "%s: FLUSH failed with status %u (%s)\n", prog, f.status,
                                status_name(f.status));
                    }
                } else {
                    warnx("the back-end does not offer VIRTIO_BLK_F_FLUSH; not flushing");
                }
            }
            if (opt.rw == RW_VERIFY || opt.rw == RW_VERIFY_READ) {
                j.next = next_verify_read;
                j.done = done_verify_read;
                j.next_block = 0;
                j.stop = false;
                run_job(&j);
            }
        }
        t1 = now_ns();
    }

    teardown();

    double secs = (double)(t1 - t0) / 1e9;
    uint64_t nlat = j.completed;
    printf("{\"rw\":\"%s\",\"bs\":%u,\"iodepth\":%u,\"queues\":%u,\"ios\":%" PRIu64
           ",\"seconds\":%.6f,\"iops\":%.1f,\"mbps\":%.3f,\"errors\":%" PRIu64
           ",\"len_mismatch\":%" PRIu64,
           rw_names[opt.rw], opt.bs, opt.iodepth, opt.queues, j.completed, secs,
           secs > 0 ? (double)j.completed / secs : 0.0,
           secs > 0 ? (double)j.bytes / secs / 1e6 : 0.0, j.errors + flush_errors + idj.errors,
           j.len_mismatch);
    if (opt.rw == RW_VERIFY || opt.rw == RW_VERIFY_READ || opt.rw == RW_VERIFY_WRITE)
        printf(",\"mismatches\":%" PRIu64 ",\"verified_bytes\":%" PRIu64 ",\"flushed\":%s",
               j.mismatches, opt.rw == RW_VERIFY_WRITE ? 0 : region, flushed ? "true" : "false");
    if (opt.rw != RW_NONE)
        printf(",\"region_offset\":%" PRIu64 ",\"region_bytes\":%" PRIu64, region_off, region);
    printf(",\"lat_avg_us\":%.2f,\"lat_p50_us\":%.2f,\"lat_p99_us\":%.2f,\"lat_p999_us\":%.2f"
           ",\"lat_max_us\":%.2f",
           nlat ? (double)j.lat_sum / (double)nlat / 1e3 : 0.0, lat_percentile(&j, 0.50) / 1e3,
           lat_percentile(&j, 0.99) / 1e3, lat_percentile(&j, 0.999) / 1e3,
           (double)j.lat_max / 1e3);
    uint64_t kicks = 0, calls = 0;
    for (unsigned i = 0; i < D.nvqs; i++) {
        kicks += D.vqs[i].kicks;
        calls += D.vqs[i].calls;
    }
    printf(",\"kicks\":%" PRIu64 ",\"calls\":%" PRIu64, kicks, calls);
    printf(",\"poll\":%s,\"event_idx\":%s,\"queue_size\":%u,\"descs_per_req\":%u",
           opt.poll ? "true" : "false", D.event_idx ? "true" : "false",
           D.vqs[0].size, D.chain);
    printf(",\"backend_features\":\"0x%" PRIx64 "\",\"acked_features\":\"0x%" PRIx64
           "\",\"protocol_features\":\"0x%" PRIx64 "\",\"acked_protocol_features\":\"0x%"
           PRIx64 "\"",
           D.features, D.acked, D.proto, D.proto_acked);
    printf(",\"capacity_bytes\":%" PRIu64 ",\"blk_size\":%u,\"size_max\":%u,\"seg_max\":%u"
           ",\"num_queues\":%u",
           disk_bytes, D.blk_size, D.size_max, D.seg_max, D.num_queues);
    if (opt.check_id) {
        printf(",\"id\":");
        if (idj.id_ok)
            json_string(stdout, idj.id, VIRTIO_BLK_ID_BYTES);
        else
            printf("null");
    }
    printf("}\n");
    fflush(stdout);

    if (j.errors || flush_errors || idj.errors || j.mismatches)
        return EXIT_IOERR;
    if (opt.check_id && !idj.id_ok)
        return EXIT_IOERR;
    return 0;
}
