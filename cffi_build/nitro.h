/*
 * nitro.h: the core of the C ABI of nitro's datapath: return codes, guest
 * memory, split virtqueues, virtio-blk. The whole ABI is four headers,
 * nitro.h, nitro_crypto.h (keys, AES-XTS), nitro_net.h (virtio-net and
 * the VPC switch) and nitro_tunnel.h (Geneve/ESP between hosts):
 * build.py's ABI_HEADERS. Every other header in
 * cffi_build/ is internal to the C files.
 *
 * Each ABI header is both a C header and a cffi cdef (cffi_build/build.py
 * feeds it to ffi.cdef() after dropping preprocessor lines other than
 * integer #defines), so it must stay inside what cffi's parser accepts:
 * fixed-width integer types, plain structs, opaque pointers, integer
 * #defines, arrays sized by those #defines.
 *
 * Conventions: every symbol is nitro_-prefixed. Functions return an int
 * code (NITRO_OK, a count, or a negative NITRO_ERR_*) unless they are pure
 * getters; a constructor (*_new) returns the object, or NULL only when
 * memory or a file descriptor could not be had; anything else that can
 * fail returns a code. Counters are copied out (atomic loads) into a stats
 * struct the caller passes, or counted into one the caller owns
 * (nitro_blk_serve). The caller owns file descriptors (C never closes an fd
 * it was given); C owns the objects it returns from *_new(). Each set of
 * codes has a table of names (nitro_*_names, nitro_names.c), the one place
 * they are spelled, indexed by the code.
 *
 * Vocabulary follows the virtio 1.2 spec (sections 2.7 "Split Virtqueues"
 * and 2.8 "Packed Virtqueues") and QEMU's docs/interop/vhost-user.rst
 * (memory regions, vring addresses).
 */
#ifndef NITRO_H
#define NITRO_H
#include <stdint.h>

/* ---- return codes ------------------------------------------------------ */
#define NITRO_OK 0
#define NITRO_ERR_ARG -1    /* bad argument from the control plane (frontend) */
#define NITRO_ERR_SYS -2    /* a host system call failed; errno is kept */
#define NITRO_ERR_GUEST -3  /* the guest broke the ring; see nitro_vq_fault() */
#define NITRO_ERR_NOMEM -4  /* allocation failed */
#define NITRO_ERR_LIMIT -5  /* a configured cap would be exceeded */

/* ---- limits ------------------------------------------------------------ */
#define NITRO_MAX_MEM_REGIONS 32   /* VHOST_USER_GET_MAX_MEM_SLOTS answer */
#define NITRO_MAX_QUEUE_SIZE 1024  /* largest ring (split or packed) we accept */

/* ---- guest faults: why a queue was marked broken ------------------------ */
#define NITRO_FAULT_NONE 0
/* avail->idx moved by more than the ring size; packed: more descriptors in
 * flight than the ring holds, or one after a NEXT is not available */
#define NITRO_FAULT_AVAIL_IDX 1
/* a head or next index >= the ring size; packed: a buffer id >= the ring
 * size or already in flight */
#define NITRO_FAULT_DESC_INDEX 2
#define NITRO_FAULT_DESC_ADDR 3   /* a buffer not inside one mapped region */
#define NITRO_FAULT_DESC_LOOP 4   /* chain longer than the ring: a cycle */
#define NITRO_FAULT_INDIRECT 5    /* bad indirect table (nested, size, NEXT) */
#define NITRO_FAULT_DESC_ORDER 6  /* device-readable after device-writable */
#define NITRO_FAULT_REQUEST 7     /* request without room for header/status */
#define NITRO_FAULT_INFLIGHT 8    /* the inflight region disagrees with the ring */
/* Guest memory raised SIGBUS when touched: the frontend truncated the file
 * behind it, or the file could not supply a page (nitro_guard.h). */
#define NITRO_FAULT_MEMORY 9
/* A read or write of the frontend's kick or call eventfd would not end:
 * the frontend made it blocking and parked its counter (nitro_efd.h). */
#define NITRO_FAULT_EVENTFD 10
#define NITRO_FAULT_KINDS 11
extern const char *const nitro_fault_names[NITRO_FAULT_KINDS];

/* ---- guest memory table (SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG) ----- */
struct nitro_mem;

struct nitro_mem *nitro_mem_new(void);
/* Unmaps every region. */
void nitro_mem_free(struct nitro_mem *mem);
/* mmap(fd) MAP_SHARED [mmap_offset, mmap_offset + memory_size) (from the
 * page holding mmap_offset) and record the region; fd stays the caller's.
 * Overlapping or empty regions, or a file too short: ERR_ARG. ERR_LIMIT
 * when every table's mappings together would exceed nitro_mem_set_limit. */
int nitro_mem_add(struct nitro_mem *mem, int fd, uint64_t guest_phys_addr,
                  uint64_t memory_size, uint64_t userspace_addr,
                  uint64_t mmap_offset);
/* Unmap the region with this guest_phys_addr and size; ERR_ARG if none. */
int nitro_mem_remove(struct nitro_mem *mem, uint64_t guest_phys_addr,
                     uint64_t memory_size);
uint32_t nitro_mem_count(const struct nitro_mem *mem);
/* How many of the regions' files are sealed against shrinking. */
uint32_t nitro_mem_sealed(const struct nitro_mem *mem);
/* The cap on the bytes all memory tables of the process map together
 * ([daemon] max_guest_memory); UINT64_MAX (the default) is no cap. A
 * lower cap than what is mapped already refuses only new regions. */
void nitro_mem_set_limit(uint64_t bytes);
/* Bytes all memory tables of the process map now. */
uint64_t nitro_mem_mapped_bytes(void);
/* Host pointer for [gpa, gpa+len) if wholly inside one region, else NULL. */
void *nitro_mem_gpa_to_host(const struct nitro_mem *mem, uint64_t gpa,
                            uint64_t len);
/* The same for a frontend (QEMU) virtual address, as SET_VRING_ADDR uses. */
void *nitro_mem_uaddr_to_host(const struct nitro_mem *mem, uint64_t uaddr,
                              uint64_t len);

/* ---- virtqueues (split, or packed when VIRTIO_F_RING_PACKED) ------------- */
struct nitro_vq_stats {
    uint64_t kicks;    /* kick eventfd wake-ups seen by the serving loop */
    uint64_t calls;    /* call eventfd signals sent */
    uint64_t chains;   /* descriptor chains completed */
    uint64_t faults[NITRO_FAULT_KINDS];
};

struct nitro_vq;

struct nitro_vq *nitro_vq_new(uint32_t index);
void nitro_vq_free(struct nitro_vq *vq);
/* Ring size: a power of two, 1..NITRO_MAX_QUEUE_SIZE. */
int nitro_vq_set_num(struct nitro_vq *vq, uint32_t num);
/* Ring addresses are frontend virtual addresses (vhost-user SET_VRING_ADDR);
 * they are translated now and again on nitro_vq_set_mem(). Each ring part
 * must lie wholly inside one region and be aligned as the spec requires.
 * Packed rings: desc is the descriptor ring, avail the driver and used the
 * device event suppression structure (4 bytes each). */
int nitro_vq_set_addr(struct nitro_vq *vq, const struct nitro_mem *mem,
                      uint64_t desc_uaddr, uint64_t avail_uaddr,
                      uint64_t used_uaddr);
/* Swap the memory table (after the queue was stopped); re-translates. */
int nitro_vq_set_mem(struct nitro_vq *vq, const struct nitro_mem *mem);
/* SET_VRING_BASE / GET_VRING_BASE. Split: last_avail_idx (ERR_ARG above
 * 0xFFFF). Packed (vhost-user "Vring descriptor indices for packed
 * virtqueues"): the avail position in bits 0-14 and its wrap counter in bit
 * 15, the used position and wrap counter in bits 16-31; bits 16-31 all zero
 * mean "the same as the avail half" (what DPDK's virtio-user sends).
 * ERR_ARG when a position is outside the ring size set. */
int nitro_vq_set_base(struct nitro_vq *vq, uint32_t base);
uint32_t nitro_vq_get_base(const struct nitro_vq *vq);
/* -1 means none. The fds stay the caller's. */
void nitro_vq_set_fds(struct nitro_vq *vq, int kick_fd, int call_fd);
/* Negotiated virtio feature bits (INDIRECT_DESC = 28, EVENT_IDX = 29,
 * RING_PACKED = 34). RING_PACKED chooses the layout; changing it starts
 * the ring afresh (base 0, or position 0 with wrap counters 1) and checks
 * ring addresses already set again: ERR_ARG (and the addresses are
 * forgotten) when they do not fit the new layout, ERR_NOMEM when the
 * packed state cannot be allocated. */
int nitro_vq_set_features(struct nitro_vq *vq, uint64_t features);
/* NITRO_FAULT_* that broke the queue, NITRO_FAULT_NONE while healthy. */
uint32_t nitro_vq_fault(const struct nitro_vq *vq);
/* Forget the fault, addresses and base (device reset / new frontend). */
void nitro_vq_reset(struct nitro_vq *vq);
/* Ask a serving loop to return after its current batch; safe from any
 * thread. nitro_vq_clear_stop() re-arms the queue before serving again. */
void nitro_vq_stop(struct nitro_vq *vq);
void nitro_vq_clear_stop(struct nitro_vq *vq);
/* Copy the queue's counters into *out (atomic loads; safe from any thread). */
int nitro_vq_stats(const struct nitro_vq *vq, struct nitro_vq_stats *out);

/* Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking"; protocol
 * feature INFLIGHT_SHMFD). region is this queue's part of the shared
 * inflight buffer, in the layout of the features set (so set them first):
 * split, a QueueRegionSplit (16-byte header, then 16-byte DescStateSplit
 * entries); packed, a QueueRegionPacked (32-byte header, then 32-byte
 * DescStatePacked entries). size is its length in bytes; NULL detaches.
 * The mapping stays the caller's and must outlive the queue's use of it
 * (detach, or nitro_vq_reset(), before unmapping). ERR_ARG when region is
 * not 8-byte aligned or size cannot hold the ring size's entries (also
 * checked again by nitro_vq_set_num(), and at the next pop for a layout
 * changed since: a fault then).
 * With a region attached, the next pop first repairs a torn last batch,
 * then resubmits the chains still marked in flight (oldest counter first).
 * Split: last_avail_idx becomes used->idx plus their number. Packed: the
 * used position is the region's (the frontend's base is stale after a
 * crash), the avail position that plus the descriptors in flight. A
 * version-0 region is initialised instead. A region the ring contradicts
 * is a guest fault (NITRO_FAULT_INFLIGHT). Queues that give chains back
 * (nitro_vq_unpop: virtio-net RX) must not use it. */
int nitro_vq_set_inflight(struct nitro_vq *vq, void *region, uint64_t size);

/* ---- virtio-blk (virtio 1.2 section 5.2) -------------------------------- */
#define NITRO_BLK_OP_IN 0
#define NITRO_BLK_OP_OUT 1
#define NITRO_BLK_OP_FLUSH 2
#define NITRO_BLK_OP_GET_ID 3
#define NITRO_BLK_OP_DISCARD 4
#define NITRO_BLK_OP_WRITE_ZEROES 5
#define NITRO_BLK_OP_UNSUPPORTED 6
#define NITRO_BLK_OPS 7
extern const char *const nitro_blk_op_names[NITRO_BLK_OPS];

/* Request latency histogram: bucket i counts requests that took at most
 * nitro_lat_bounds_ns[i]; the last bucket is +Inf. */
#define NITRO_LAT_BUCKETS 15
extern const uint64_t nitro_lat_bounds_ns[NITRO_LAT_BUCKETS];

struct nitro_blk_stats {
    uint64_t requests[NITRO_BLK_OPS];  /* completed requests by operation */
    uint64_t bytes[NITRO_BLK_OPS];     /* payload bytes moved by operation */
    uint64_t errors[NITRO_BLK_OPS];    /* completed with a non-OK status */
    /* Per operation: from the pop (so time held back by QoS counts) to
     * the used ring. */
    uint64_t latency_buckets[NITRO_BLK_OPS][NITRO_LAT_BUCKETS];
    uint64_t latency_sum_ns[NITRO_BLK_OPS];
    uint64_t inflight;                 /* fetched but not yet completed */
    /* Requests found in flight in the inflight region on (re)start and
     * served again (vhost-user inflight I/O tracking). */
    uint64_t resubmitted;
    /* Remote volumes: requests the storage left unanswered past
     * io_timeout, completed with IOERR (also in errors[]). */
    uint64_t timeouts;
    /* File volumes: reads copied (or decrypted) straight from the image's
     * mapping because their pages were in the page cache (no io_uring
     * submission; also in requests[]), and writes copied (or encrypted)
     * straight into it (no pwrite). */
    uint64_t mapped_reads;
    uint64_t mapped_writes;
};

/* nitro_crypto.h: an AES-XTS key with its per-thread cipher contexts. */
struct nitro_xts;

/* Volume QoS (docs/volumes.md "QoS"): limits shared by every queue of one
 * volume, enforced by holding requests back (never failing them). IOPS
 * counts every request as one I/O; throughput counts the data bytes of
 * reads and writes. The baseline is a token bucket of `iops` per second
 * (100 ms deep); with burst_iops, tokens that do not fit in it become I/O
 * credits, up to (burst_iops - iops) * burst_seconds, and a request that
 * finds the baseline empty spends one credit, at most burst_iops requests
 * per second in all (a second bucket, 100 ms deep). So from a full bucket
 * a volume runs at burst_iops for burst_seconds, draining credits at
 * burst_iops - iops per second, and earns them back at iops - (its rate)
 * per second below the baseline. The credit bucket starts full. */
struct nitro_qos_limits {
    uint64_t iops;           /* I/O requests per second; 0: unlimited */
    uint64_t throughput;     /* data bytes per second; 0: unlimited */
    uint64_t burst_iops;     /* 0: no burst; else > iops (and iops > 0) */
    uint64_t burst_seconds;  /* with burst_iops: > 0 */
};

struct nitro_qos_stats {
    /* Time some request of the volume waited for the IOPS (baseline or
     * burst) or the throughput limit: EBS's exceeded_iops / _tp. */
    uint64_t exceeded_iops_ns;
    uint64_t exceeded_throughput_ns;
    uint64_t credits;       /* burst balance now, in I/Os */
    uint64_t credits_max;   /* (burst_iops - iops) * burst_seconds */
    /* Requests the guest queued that wait for the budget now: the one each
     * throttled queue holds, plus (split rings) those behind it in the
     * avail ring. */
    uint64_t queued;
    uint64_t delayed;       /* requests that had to wait, each counted once */
};

struct nitro_qos;

/* Unlimited until nitro_qos_set. NULL: out of memory. */
struct nitro_qos *nitro_qos_new(void);
/* Only once no ring whose params name it is attached. NULL is fine. */
void nitro_qos_free(struct nitro_qos *q);
/* New limits, effective at once for every queue (a queue waiting for the
 * old budget looks again within 100 ms); now_ns is CLOCK_MONOTONIC (Python:
 * time.monotonic_ns()). Buckets keep their fill, cut to the new depths; a
 * credit bucket that did not exist starts full. NITRO_ERR_ARG: burst_iops
 * not above iops, or without iops or burst_seconds; iops, throughput,
 * burst_iops above 10^12 or burst_seconds above 10^6. */
int nitro_qos_set(struct nitro_qos *q, const struct nitro_qos_limits *limits,
                  uint64_t now_ns);
/* Admit one request moving `bytes` of data at now_ns: 1 (charged), or 0
 * and *ready_ns = when it would be admitted if nothing else is. What the
 * blk rings call; exposed for tests with a chosen clock. `retry`: the same
 * request was refused before (counted in `delayed` only once). */
int nitro_qos_admit(struct nitro_qos *q, uint64_t bytes, uint64_t now_ns,
                    uint32_t retry, uint64_t *ready_ns);
/* The counters, with the credit balance brought up to now_ns. */
int nitro_qos_stats(struct nitro_qos *q, uint64_t now_ns,
                    struct nitro_qos_stats *out);

struct nitro_blk_params {
    int fd;                 /* the backing file, opened by Python */
    uint32_t readonly;      /* nonzero: OUT/DISCARD/WRITE_ZEROES -> IOERR */
    uint64_t capacity;      /* in 512-byte sectors */
    /* The logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE): a power of
     * two >= 512, and a multiple of the encryption sector size with xts.
     * Every request's offset and length must be whole blocks, else IOERR. */
    uint32_t block_size;
    /* Largest DISCARD / WRITE_ZEROES segment; 0: the feature is not offered
     * and such requests complete with UNSUPP. */
    uint32_t max_discard_sectors;
    uint32_t max_write_zeroes_sectors;
    /* VIRTIO_BLK_F_SEG_MAX / SIZE_MAX as offered: a request of more than
     * seg_max data descriptors (plus header and status), of a descriptor
     * longer than size_max (plus the header or status it may share), or
     * of more than seg_max * size_max data bytes completes with IOERR.
     * This bounds the work one request makes (a synchronous one holds its
     * worker). 0: no limit. */
    uint32_t seg_max;
    uint32_t size_max;
    uint8_t serial[20];     /* GET_ID answer, NUL-padded */
    struct nitro_xts *xts;  /* encrypted volumes (LUKS2); NULL: plain */
    /* Bytes: where sector 0 lives in fd. data_offset + capacity * 512 must
     * not exceed INT64_MAX. */
    uint64_t data_offset;
    struct nitro_qos *qos;  /* the volume's QoS, shared by its queues; NULL: none */
    /* Remote volumes (nitro_rbd.h): a request the storage has not answered
     * this long after it was sent completes with IOERR (the remote I/O
     * goes on; its buffer stays the ring's until it ends). 0: never. */
    uint64_t io_timeout_ns;
    /* File volumes (nitro_blk_map_image): fd mapped from offset 0,
     * image_map_len bytes. A read whose pages are all in the page cache
     * is copied (or, encrypted, decrypted) straight from it into the guest
     * on the worker: one pass, no io_uring submission. NULL: none. */
    const uint8_t *image_map;
    uint64_t image_map_len;
    /* Nonzero: the mapping is writable too (a writable volume whose fd
     * allows it), and a write whose pages are all in the page cache is
     * copied (encrypted) straight into it, with no pwrite. */
    uint32_t image_map_writable;
};

/* Serve one virtio-blk queue: fetch every available chain (first those an
 * inflight region says were in flight, see nitro_vq_set_inflight), do its I/O on
 * params->fd directly from/to guest memory (through a per-thread bounce
 * buffer of ciphertext when encrypted), write the status byte, publish
 * to the used ring and signal the call fd (honouring EVENT_IDX). When the
 * ring is empty, re-enable notifications and wait up to idle_ms on the kick
 * fd. Returns the number of requests completed when idle or stopped,
 * NITRO_ERR_GUEST when the guest broke the ring (the queue stays broken),
 * NITRO_ERR_ARG when the queue is not set up or the params are invalid
 * (block_size, data_offset + capacity). Call it with the GIL released
 * (cffi does), from one thread per queue. */
int64_t nitro_blk_serve(struct nitro_vq *vq,
                        const struct nitro_blk_params *params,
                        struct nitro_blk_stats *stats, int idle_ms);

/* Map params->fd into image_map (above), up to the file's size now (I/O
 * past it, should the file grow, takes the other paths): read-write
 * unless params->readonly or the fd refuses, else read-only. Before
 * any ring uses the params. NITRO_ERR_SYS (errno set) if it cannot be
 * mapped at all: the params stay unmapped, and serve as before.
 * nitro_blk_unmap_image once no ring uses them. */
int nitro_blk_map_image(struct nitro_blk_params *params);
void nitro_blk_unmap_image(struct nitro_blk_params *params);

/* ---- the engine: worker threads that serve every ring ------------------- */
/* A fixed set of C worker threads (not one per ring). Each ring of each
 * device is attached to one worker, which polls all its rings in turn,
 * busy-polls for a while when they go quiet, then sleeps on one epoll set
 * covering all its kick fds. blk I/O goes through the worker's io_uring
 * (many requests in flight, completed out of order) unless io_uring is
 * unavailable or NITRO_ENGINE_SYNC_IO is given. The control plane decides
 * which worker serves which ring; attach and detach are synchronous
 * hand-offs to that worker. */
#define NITRO_ENGINE_MAX_WORKERS 64
#define NITRO_ENGINE_POLL_ADAPTIVE -1   /* poll_us: grow/shrink like halt-polling */
#define NITRO_ENGINE_POLL_MAX_US 1000   /* largest fixed poll_us (adaptive: at most 200) */
#define NITRO_ENGINE_SYNC_IO 1          /* flags: never use io_uring */
/* flags: each worker confines itself with a seccomp filter to the system
 * calls it makes (nitro_seccomp.c); any other call aborts the process. */
#define NITRO_ENGINE_SECCOMP 2

#define NITRO_RING_BLK 0
#define NITRO_RING_NET_TX 1
#define NITRO_RING_NET_RX 2
#define NITRO_RING_NET_CTRL 3
#define NITRO_RING_UNDERLAY 4   /* frames from other hosts (nitro_net.h) */

struct nitro_engine;
struct nitro_ring;
struct nitro_switch;

struct nitro_worker_stats {
    uint64_t rings;       /* rings attached now */
    uint64_t chains;      /* chains served */
    uint64_t wakeups;     /* returns from epoll_wait */
    uint64_t busy_ns;     /* time in loop iterations that did work */
    uint64_t poll_ns;     /* time busy-polling with nothing to do */
    uint64_t sleep_ns;    /* time asleep in epoll_wait */
    uint64_t io_submitted;   /* io_uring requests submitted */
    uint64_t poll_us;     /* the current busy-poll window */
    uint64_t uring;       /* 1: this worker does blk I/O through io_uring */
    uint64_t muted;       /* rings whose kicks are ignored now (kick storms) */
    uint64_t mutes;       /* times a ring was muted */
    uint64_t draining;    /* rings being detached that wait for their answers */
};

/* workers: 1..NITRO_ENGINE_MAX_WORKERS threads; cpus: one CPU number per
 * worker to pin it to (-1: not pinned), or NULL; poll_us: 0..POLL_MAX_US or
 * NITRO_ENGINE_POLL_ADAPTIVE. NULL when a thread cannot be started (errno). */
struct nitro_engine *nitro_engine_new(uint32_t workers, const int32_t *cpus,
                                      int32_t poll_us, uint32_t flags);
/* Stops and joins every worker; every ring must have been detached (a
 * worker still draining a ring quits once that drain ended). */
void nitro_engine_free(struct nitro_engine *e);
uint32_t nitro_engine_workers(const struct nitro_engine *e);
/* An eventfd that becomes readable when a ring stops on an error (read
 * nitro_ring_status of the attached rings, then drain the fd). */
int nitro_engine_event_fd(const struct nitro_engine *e);
/* Hand r to worker `worker` and wait until it serves it; NITRO_ERR_ARG if r
 * is attached already or the queue is not set up. */
int nitro_engine_attach(struct nitro_engine *e, struct nitro_ring *r,
                        uint32_t worker);
/* Take r back and wait until its worker let go of it: its in-flight I/O has
 * completed (and been pushed to the used ring) and notifications are
 * re-enabled. No-op for a detached ring. A remote volume's ring whose
 * requests await their server (up to io_timeout) drains on its worker
 * between the worker's other rings: the wait then holds neither the worker
 * nor other callers' attach/detach. */
int nitro_engine_detach(struct nitro_engine *e, struct nitro_ring *r);
int nitro_engine_worker_stats(const struct nitro_engine *e, uint32_t worker,
                              struct nitro_worker_stats *out);
/* TEST ONLY (tests/unit/test_seccomp.py): make worker `worker` issue the
 * raw system call nr with arguments a0, a1, a2 (the rest 0), and wait for
 * it. Proves that the filter is active and what it lets through: a call
 * outside it never returns (the process aborts).
 * Returns what the call returned (-errno on failure). Nothing in nitro
 * calls it. */
int64_t nitro_engine_test_syscall(struct nitro_engine *e, uint32_t worker,
                                  int64_t nr, int64_t a0, int64_t a1, int64_t a2);

/* Rings. The objects they name (vq, params, stats, switch) are the caller's
 * and must outlive the ring. NULL if out of memory or an argument is NULL. */
struct nitro_ring *nitro_ring_blk_new(struct nitro_vq *vq,
                                      const struct nitro_blk_params *params,
                                      struct nitro_blk_stats *stats);
struct nitro_ring *nitro_ring_net_tx_new(struct nitro_switch *sw,
                                         uint32_t port, struct nitro_vq *vq);
struct nitro_ring *nitro_ring_net_rx_new(struct nitro_vq *vq);
/* Control queue (virtio 1.2 5.1.6.5): ACK MQ_VQ_PAIRS_SET (1..max_pairs),
 * RX and MAC class commands; others get VIRTIO_NET_ERR. */
struct nitro_ring *nitro_ring_net_ctrl_new(struct nitro_vq *vq,
                                           uint32_t max_pairs);
/* Only for a detached ring. NULL is fine. */
void nitro_ring_free(struct nitro_ring *r);
/* NITRO_OK while it may serve; else the NITRO_ERR_* that stopped it
 * (ERR_GUEST: see nitro_vq_fault). Cleared by the next attach. */
int nitro_ring_status(const struct nitro_ring *r);
/* The errno behind NITRO_ERR_SYS. */
int nitro_ring_errno(const struct nitro_ring *r);
/* Worker serving it, -1 when detached. */
int32_t nitro_ring_worker(const struct nitro_ring *r);
/* Requests submitted and not yet completed (blk); 0 for others. */
uint32_t nitro_ring_in_flight(const struct nitro_ring *r);

#endif
