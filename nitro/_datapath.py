"""The one module that talks to the C datapath (``nitro._nitro_c``).

Every C return code goes through :func:`_check`, which turns it into a typed
exception. Objects own their C memory: ``close()`` frees it (twice is fine),
and the garbage collector frees it if ``close()`` was never called.

Lifetimes the C side relies on, which callers must respect:
- a :class:`Virtqueue` points into the :class:`GuestMemory` it was given; it
  keeps a reference, but closing that memory while the queue may still be
  served is a use-after-free;
- never ``close()`` a queue, params or stats object while ``blk_serve`` runs
  on it in another thread: ``stop()`` it and wait for the thread first.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from nitro._nitro_c import ffi, lib


def _names(table: Any, count: int) -> tuple[str, ...]:
    """A C name table (cffi_build/nitro_names.c), indexed by code."""
    names = tuple(ffi.string(table[i]).decode() if table[i] else "" for i in range(count))
    if not all(names):
        raise ImportError(f"nitro._nitro_c: a code has no name in {names}")
    return names


#: Guest fault kinds by NITRO_FAULT_* code (0, "none", is left out).
FAULT_NAMES: Final[dict[int, str]] = {
    code: name for code, name in enumerate(_names(lib.nitro_fault_names, lib.NITRO_FAULT_KINDS))
    if code != lib.NITRO_FAULT_NONE}
#: The fault of a frontend whose kick or call eventfd would block a thread
#: (cffi_build/nitro_efd.h): it did it on purpose, so a reset does not revive it.
FAULT_EVENTFD: Final[str] = FAULT_NAMES[lib.NITRO_FAULT_EVENTFD]
#: virtio-blk operations by NITRO_BLK_OP_* code: the ``op`` label values.
OP_NAMES: Final[tuple[str, ...]] = _names(lib.nitro_blk_op_names, lib.NITRO_BLK_OPS)
#: Why the switch dropped a frame, by NITRO_NET_DROP_* code.
NET_DROP_REASONS: Final[tuple[str, ...]] = _names(lib.nitro_net_drop_names,
                                                  lib.NITRO_NET_DROP_KINDS)
# Histogram upper bounds in seconds; C marks the +Inf bucket with UINT64_MAX.
LATENCY_BOUNDS: Final[tuple[float, ...]] = tuple(
    math.inf if b == 2**64 - 1 else b / 1e9 for b in lib.nitro_lat_bounds_ns
)


class DatapathError(Exception):
    """A C datapath call failed; ``code`` is the NITRO_ERR_* value."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class FrontendError(DatapathError):
    """NITRO_ERR_ARG: a value from the control plane (usually the vhost-user
    frontend) was rejected. Refuse the request that carried it."""


class LimitError(FrontendError):
    """NITRO_ERR_LIMIT: granting the request would exceed a configured cap
    (``[daemon] max_guest_memory``). Refuse the request that asked."""


class HostError(DatapathError):
    """NITRO_ERR_SYS: a host system call failed (``errno``, ``strerror``)."""

    def __init__(self, code: int, message: str, err: int) -> None:
        super().__init__(code, f"{message}: {os.strerror(err)}")
        self.errno = err
        self.strerror = os.strerror(err)


class GuestFault(DatapathError):
    """NITRO_ERR_GUEST: the guest broke the ring; ``kind`` names how (one of
    FAULT_NAMES). The queue stays broken until ``Virtqueue.reset()``; mark the
    device NEEDS_RESET rather than retrying."""

    def __init__(self, code: int, message: str, kind: str) -> None:
        super().__init__(code, f"{message}: guest fault {kind}")
        self.kind = kind


def _check(rc: int, what: str, vq: Any = None) -> int:
    """Return rc if it is not an error code, else raise the matching error.
    ``vq`` (a nitro_vq cdata) lets a guest fault say which kind it was."""
    if rc >= 0:
        return rc
    if rc == lib.NITRO_ERR_ARG:
        raise FrontendError(rc, f"{what}: invalid argument")
    if rc == lib.NITRO_ERR_SYS:
        raise HostError(rc, what, ffi.errno)
    if rc == lib.NITRO_ERR_GUEST:
        code = lib.nitro_vq_fault(vq) if vq is not None else 0
        raise GuestFault(rc, what, FAULT_NAMES.get(code, "unknown"))
    if rc == lib.NITRO_ERR_NOMEM:
        raise DatapathError(rc, f"{what}: out of memory")
    if rc == lib.NITRO_ERR_LIMIT:
        raise LimitError(rc, f"{what}: over the configured limit")
    raise DatapathError(rc, f"{what}: unexpected return code {rc}")


class _Owned:
    """Holds one cdata freed by ffi.release (an ffi.gc or ffi.new object)."""

    _cdata: Any

    def __init__(self, cdata: Any) -> None:
        if cdata == ffi.NULL:
            raise MemoryError("nitro: C allocation failed")
        self._cdata = cdata

    @property
    def ptr(self) -> Any:
        """The C pointer; ValueError once closed (C must never see it)."""
        if self._cdata is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._cdata

    def close(self) -> None:
        if self._cdata is not None:
            cdata, self._cdata = self._cdata, None
            ffi.release(cdata)


class GuestMemory(_Owned):
    """The guest memory table (vhost-user SET_MEM_TABLE / ADD_MEM_REG)."""

    def __init__(self) -> None:
        raw = lib.nitro_mem_new()
        super().__init__(ffi.NULL if raw == ffi.NULL else ffi.gc(raw, lib.nitro_mem_free))

    def add_region(self, fd: int, guest_phys_addr: int, memory_size: int,
                   userspace_addr: int, mmap_offset: int) -> None:
        """mmap fd (which stays the caller's) and record the region."""
        _check(lib.nitro_mem_add(self.ptr, fd, guest_phys_addr, memory_size,
                                 userspace_addr, mmap_offset), "nitro_mem_add")

    def remove_region(self, guest_phys_addr: int, memory_size: int) -> None:
        _check(lib.nitro_mem_remove(self.ptr, guest_phys_addr, memory_size),
               "nitro_mem_remove")

    def read(self, guest_phys_addr: int, length: int) -> bytes | None:
        """A copy of guest memory at a guest-physical address, or None when
        the range is not wholly inside one region (debugging and tests)."""
        return self._copy(lib.nitro_mem_gpa_to_host(self.ptr, guest_phys_addr, length), length)

    def read_uaddr(self, userspace_addr: int, length: int) -> bytes | None:
        """The same for a frontend virtual address (as SET_VRING_ADDR uses)."""
        return self._copy(lib.nitro_mem_uaddr_to_host(self.ptr, userspace_addr, length), length)

    @staticmethod
    def _copy(host: Any, length: int) -> bytes | None:
        return None if host == ffi.NULL else ffi.buffer(host, length)[:]

    def __len__(self) -> int:
        return int(lib.nitro_mem_count(self.ptr))

    @property
    def sealed(self) -> int:
        """How many regions' files are sealed against shrinking (F_SEAL_SHRINK)."""
        return int(lib.nitro_mem_sealed(self.ptr))


NO_LIMIT: Final[int] = 2**64 - 1
_guest_memory_limit: int | None = None


def set_guest_memory_limit(limit: int | None) -> None:
    """Cap the bytes every GuestMemory of the process maps together (None:
    no cap); a region past it raises LimitError. Lowering it below what is
    mapped refuses only new regions."""
    global _guest_memory_limit
    lib.nitro_mem_set_limit(NO_LIMIT if limit is None else limit)
    _guest_memory_limit = limit


def guest_memory_limit() -> int | None:
    """The cap set_guest_memory_limit set; None: none."""
    return _guest_memory_limit


def guest_memory_mapped() -> int:
    """Bytes every GuestMemory of the process maps now."""
    return int(lib.nitro_mem_mapped_bytes())


class InflightRegion:
    """The shared inflight buffer (SET_INFLIGHT_FD) mapped MAP_SHARED.

    ``fd`` stays the caller's (the mapping outlives it). Queues point into
    the mapping through :meth:`Virtqueue.set_inflight`: detach them (or
    reset them) before ``close()``, which unmaps."""

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        self.size = size
        self._mm: mmap.mmap | None = mmap.mmap(
            fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=offset)
        self._buf: Any = ffi.from_buffer("uint8_t[]", self._mm, require_writable=True)

    def pointer(self, offset: int, size: int) -> Any:
        """A C pointer to [offset, offset + size) of the mapping."""
        if self._mm is None:
            raise ValueError("InflightRegion is closed")
        if offset < 0 or size <= 0 or offset + size > self.size:
            raise ValueError(f"[{offset}, +{size}) is outside the {self.size}-byte region")
        return self._buf + offset

    def read(self, offset: int, size: int) -> bytes:
        """A copy of part of the region (debugging and tests)."""
        data: bytes = ffi.buffer(self.pointer(offset, size), size)[:]
        return data

    def close(self) -> None:
        if self._mm is not None:
            ffi.release(self._buf)
            self._mm.close()
            self._mm = None


class Virtqueue(_Owned):
    """One virtqueue's C state (nitro_vq): split, or packed once
    VIRTIO_F_RING_PACKED is among the features set."""

    def __init__(self, index: int) -> None:
        raw = lib.nitro_vq_new(index)
        super().__init__(ffi.NULL if raw == ffi.NULL else ffi.gc(raw, lib.nitro_vq_free))
        self.index = index
        self._mem: GuestMemory | None = None
        self._inflight: InflightRegion | None = None

    def set_num(self, num: int) -> None:
        _check(lib.nitro_vq_set_num(self.ptr, num), "nitro_vq_set_num")

    def set_addr(self, mem: GuestMemory, desc: int, avail: int, used: int) -> None:
        """Ring addresses as frontend virtual addresses (SET_VRING_ADDR)."""
        _check(lib.nitro_vq_set_addr(self.ptr, mem.ptr, desc, avail, used),
               "nitro_vq_set_addr", self.ptr)
        self._mem = mem

    def set_mem(self, mem: GuestMemory) -> None:
        """Swap the memory table (queue stopped); re-translates the rings."""
        self._mem = None
        _check(lib.nitro_vq_set_mem(self.ptr, mem.ptr), "nitro_vq_set_mem")
        self._mem = mem

    @property
    def base(self) -> int:
        """SET_VRING_BASE / GET_VRING_BASE: split, last_avail_idx; packed,
        avail position and wrap counter in bits 0-15, used ones in 16-31."""
        return int(lib.nitro_vq_get_base(self.ptr))

    @base.setter
    def base(self, value: int) -> None:
        """FrontendError when it does not fit the layout or the ring size."""
        if not 0 <= value <= 0xFFFF_FFFF:
            raise FrontendError(lib.NITRO_ERR_ARG, f"ring base {value} is not a u32")
        _check(lib.nitro_vq_set_base(self.ptr, value), "nitro_vq_set_base")

    def set_fds(self, kick: int, call: int) -> None:
        """Kick and call eventfds, -1 for none; they stay the caller's."""
        lib.nitro_vq_set_fds(self.ptr, kick, call)

    def set_features(self, bits: int) -> None:
        """The negotiated bits; VIRTIO_F_RING_PACKED (34) picks the layout.
        FrontendError when ring addresses already set do not fit a changed
        layout (C forgets them)."""
        _check(lib.nitro_vq_set_features(self.ptr, bits), "nitro_vq_set_features")

    def set_inflight(self, region: InflightRegion | None, offset: int = 0,
                     size: int = 0) -> None:
        """Track this queue's chains in [offset, offset + size) of region
        (nitro_vq_set_inflight); None detaches. FrontendError when the part
        cannot hold the ring size's entries."""
        if region is None:
            _check(lib.nitro_vq_set_inflight(self.ptr, ffi.NULL, 0), "nitro_vq_set_inflight")
            self._inflight = None
            return
        _check(lib.nitro_vq_set_inflight(self.ptr, region.pointer(offset, size), size),
               "nitro_vq_set_inflight")
        self._inflight = region

    @property
    def fault(self) -> str | None:
        code = int(lib.nitro_vq_fault(self.ptr))
        return FAULT_NAMES.get(code, "unknown") if code else None

    def reset(self) -> None:
        """Forget the fault, ring addresses, base and inflight region."""
        lib.nitro_vq_reset(self.ptr)
        self._mem = None
        self._inflight = None

    def stop(self) -> None:
        """Make a serving loop return soon; safe from any thread."""
        lib.nitro_vq_stop(self.ptr)

    def clear_stop(self) -> None:
        lib.nitro_vq_clear_stop(self.ptr)

    def stats(self) -> dict[str, Any]:
        s = ffi.new("struct nitro_vq_stats *")
        _check(lib.nitro_vq_stats(self.ptr, s), "nitro_vq_stats")
        return {
            "kicks": int(s.kicks),
            "calls": int(s.calls),
            "chains": int(s.chains),
            "faults": {name: int(s.faults[code]) for code, name in FAULT_NAMES.items()},
        }

    def close(self) -> None:
        super().close()
        self._mem = None
        self._inflight = None


SECRET_MAX: Final[int] = lib.NITRO_SECRET_MAX


class Secret(_Owned):
    """Key material in C memory (nitro_secret): mlock'd where RLIMIT_MEMLOCK
    allows, never in core dumps, wiped on close. Python never holds a copy:
    bytes go in by fd (``read_fd``) or by a C library writing to ``address``."""

    def __init__(self, capacity: int) -> None:
        out = ffi.new("struct nitro_secret **")
        _check(lib.nitro_secret_new(capacity, out), "nitro_secret_new")
        super().__init__(ffi.gc(out[0], lib.nitro_secret_free))

    def __enter__(self) -> Secret:
        return self

    def __exit__(self, *exc: object) -> None:
        """Wipe and free it as the ``with`` block ends, however it ends."""
        self.close()

    def read_fd(self, fd: int, strip_newline: bool) -> int:
        """Replace the contents with everything read from fd (the caller's).
        FrontendError when it is empty or larger than the capacity."""
        return _check(lib.nitro_secret_read_fd(self.ptr, fd, int(strip_newline)),
                      "reading a secret")

    @property
    def address(self) -> int:
        """The buffer's address, for another cffi library (libcryptsetup)."""
        return int(ffi.cast("uintptr_t", lib.nitro_secret_data(self.ptr)))

    @property
    def capacity(self) -> int:
        return int(lib.nitro_secret_capacity(self.ptr))

    def __len__(self) -> int:
        return int(lib.nitro_secret_len(self.ptr))

    def set_len(self, n: int) -> None:
        _check(lib.nitro_secret_set_len(self.ptr, n), "nitro_secret_set_len")

    @property
    def locked(self) -> bool:
        """True when the pages are mlock'd (cannot be swapped out)."""
        return bool(lib.nitro_secret_locked(self.ptr))

    def __repr__(self) -> str:  # never the contents
        return f"<Secret {len(self) if self._cdata is not None else 'closed'} bytes>"


class XtsCipher(_Owned):
    """AES-XTS with dm-crypt's plain64 IVs (nitro_xts). The expanded key
    lives only in C (OpenSSL contexts and nitro's AES-NI key schedules);
    ``close()`` cleanses them."""

    def __init__(self, key: Secret, sector_size: int, iv_offset: int = 0) -> None:
        if len(key) not in (32, 64) or sector_size not in (512, 4096):
            raise ValueError("XTS needs a 32- or 64-byte key and 512- or 4096-byte sectors")
        out = ffi.new("struct nitro_xts **")
        rc = lib.nitro_xts_new(key.ptr, sector_size, iv_offset, out)
        if rc == lib.NITRO_ERR_ARG:
            raise ValueError("OpenSSL refused the XTS key (equal halves?)")
        _check(rc, "nitro_xts_new")
        super().__init__(ffi.gc(out[0], lib.nitro_xts_free))
        self.sector_size = sector_size

    IMPLS = {"evp-init": 0, "evp-iv": 1, "aesni": 2, "vaes": 3, "vaes512": 4}  # NITRO_XTS_*

    @property
    def impl(self) -> str:
        """How sectors are encrypted: "vaes512", "vaes" or "aesni" (nitro's
        XTS on the CPU's AES instructions, 512-, 256- or 128-bit wide,
        several sectors per call), "evp-iv" (OpenSSL's XTS, IV written in place) or
        "evp-init" (OpenSSL's XTS, IV through EVP_CipherInit_ex2): the fastest
        that nitro_xts_new proved to work on this machine."""
        return {v: k for k, v in self.IMPLS.items()}[lib.nitro_xts_impl(self.ptr)]

    @impl.setter
    def impl(self, name: str) -> None:
        """Tests and benchmarks only, before the cipher is in use. ValueError
        for a path that did not prove to work here."""
        if lib.nitro_xts_set_impl(self.ptr, self.IMPLS[name]) == lib.NITRO_ERR_ARG:
            raise ValueError(f"XTS path {name!r} is not available on this machine")

    def crypt_into(self, out: Any, data: Any, offset: int, encrypt: bool) -> None:
        """En-/decrypt the buffer ``data`` into the writable buffer ``out``
        (same length, may be the same object) as the sectors at byte
        ``offset`` of the data segment. The GIL is released while it runs."""
        src = ffi.from_buffer(data)
        dst = ffi.from_buffer(out, require_writable=True)
        if len(dst) != len(src):
            raise ValueError("in and out differ in length")
        _check(lib.nitro_xts_crypt(self.ptr, ffi.cast("uint8_t *", dst),
                                   ffi.cast("uint8_t *", src), len(src), offset,
                                   int(encrypt)), "nitro_xts_crypt")

    def encrypt(self, data: bytes, offset: int) -> bytes:
        out = bytearray(len(data))
        self.crypt_into(out, data, offset, True)
        return bytes(out)

    def decrypt(self, data: bytes, offset: int) -> bytes:
        out = bytearray(len(data))
        self.crypt_into(out, data, offset, False)
        return bytes(out)


class Qos(_Owned):
    """struct nitro_qos: one volume's QoS limits, shared by its queues (the
    rings of every queue whose BlkParams name it). Unlimited until
    ``set``; ``set`` again at any time changes the limits live. Times are
    CLOCK_MONOTONIC nanoseconds (``time.monotonic_ns()``); ``now`` is for
    tests that drive the buckets with a clock of their own."""

    def __init__(self) -> None:
        raw = lib.nitro_qos_new()
        super().__init__(ffi.NULL if raw == ffi.NULL else ffi.gc(raw, lib.nitro_qos_free))

    def set(self, iops: int = 0, throughput: int = 0, burst_iops: int = 0, burst_seconds: int = 0,
            now: int | None = None) -> None:
        """FrontendError for limits C refuses (see nitro.h nitro_qos_set)."""
        limits = ffi.new("struct nitro_qos_limits *", {
            "iops": iops, "throughput": throughput, "burst_iops": burst_iops,
            "burst_seconds": burst_seconds})
        _check(lib.nitro_qos_set(self.ptr, limits, _now(now)), "nitro_qos_set")

    def admit(self, nbytes: int, now: int, retry: bool = False) -> int | None:
        """Admit one request of ``nbytes`` data bytes at ``now``: None when
        admitted (and charged), else the time it would be."""
        ready = ffi.new("uint64_t *")
        if lib.nitro_qos_admit(self.ptr, nbytes, now, int(retry), ready):
            return None
        return int(ready[0])

    def statistics(self, now: int | None = None) -> dict[str, int]:
        out = ffi.new("struct nitro_qos_stats *")
        _check(lib.nitro_qos_stats(self.ptr, _now(now), out), "nitro_qos_stats")
        return {name: int(getattr(out, name)) for name in (
            "exceeded_iops_ns", "exceeded_throughput_ns", "credits", "credits_max", "queued", "delayed")}


def _now(now: int | None) -> int:
    return time.monotonic_ns() if now is None else now


class BlkParams(_Owned):
    """struct nitro_blk_params: the backing fd (the caller's) and limits.
    ``block_size`` is the guest's logical block size (every request must be
    whole blocks); a zero discard/write-zeroes limit means not offered.
    With ``xts`` the payload is encrypted (kept alive here as long as the
    params are); ``data_offset`` is where sector 0 starts in the file.
    ``seg_max``/``size_max`` (0: none) are the limits offered to the driver:
    a request beyond them completes with IOERR.
    ``blk_serve`` refuses (FrontendError) a block size that is not a power of
    two >= 512 (and whole encryption sectors), or a disk whose last byte,
    plus data_offset, is past 2**63 - 1.
    ``qos`` (kept alive here too) limits every ring made with these params
    together. ``io_timeout_ns`` (remote volumes; 0: never): a request
    unanswered that long after it was sent completes with IOERR."""

    def __init__(self, fd: int, capacity_sectors: int, readonly: bool = False,
                 max_discard_sectors: int = 0, max_write_zeroes_sectors: int = 0,
                 serial: bytes = b"", xts: XtsCipher | None = None,
                 data_offset: int = 0, block_size: int = 512,
                 seg_max: int = 0, size_max: int = 0, qos: Qos | None = None,
                 io_timeout_ns: int = 0) -> None:
        if len(serial) > 20:
            raise ValueError("virtio-blk serial is at most 20 bytes")
        super().__init__(ffi.new("struct nitro_blk_params *", {
            "fd": fd,
            "readonly": int(readonly),
            "capacity": capacity_sectors,
            "block_size": block_size,
            "max_discard_sectors": max_discard_sectors,
            "max_write_zeroes_sectors": max_write_zeroes_sectors,
            "seg_max": seg_max,
            "size_max": size_max,
            "xts": xts.ptr if xts is not None else ffi.NULL,
            "data_offset": data_offset,
            "qos": qos.ptr if qos is not None else ffi.NULL,
            "io_timeout_ns": io_timeout_ns,
        }))
        ffi.memmove(self._cdata.serial, serial, len(serial))
        self._xts = xts
        self._qos = qos

    def map_image(self) -> None:
        """Map the image, so reads and writes of pages in the page cache
        are copied (encrypted: decrypted, encrypted) straight from and into
        it (nitro_blk_map_image): read-write unless the volume is read-only
        or the fd refuses. OSError if it cannot be mapped at all: the params
        then serve as before."""
        rc = lib.nitro_blk_map_image(self.ptr)
        if rc == lib.NITRO_ERR_SYS:
            raise OSError(ffi.errno, os.strerror(ffi.errno))
        if rc != 0:
            raise ValueError(f"nitro_blk_map_image: {rc}")

    @property
    def image_mapped(self) -> bool:
        return bool(self.ptr.image_map != ffi.NULL)

    @property
    def image_map_writable(self) -> bool:
        return bool(self.ptr.image_map_writable)

    def close(self) -> None:
        if self._cdata is not None:
            lib.nitro_blk_unmap_image(self._cdata)
        super().close()


class BlkStats(_Owned):
    """A zeroed struct nitro_blk_stats that C counts into while serving."""

    def __init__(self) -> None:
        super().__init__(ffi.new("struct nitro_blk_stats *"))


    def snapshot(self) -> dict[str, Any]:
        s = self.ptr
        return {
            "ops": {
                name: {"requests": int(s.requests[i]), "bytes": int(s.bytes[i]),
                       "errors": int(s.errors[i])}
                for i, name in enumerate(OP_NAMES)
            },
            # Per operation, as NITRO_BLK_OP_* (the ``op`` label values).
            "latency": {
                name: {"buckets": [(b, int(s.latency_buckets[o][i])) for i, b in enumerate(LATENCY_BOUNDS)],
                       "sum_seconds": s.latency_sum_ns[o] / 1e9}
                for o, name in enumerate(OP_NAMES)
            },
            "inflight": int(s.inflight),
            "resubmitted": int(s.resubmitted),
            "timeouts": int(s.timeouts),
            "mapped_reads": int(s.mapped_reads),
            "mapped_writes": int(s.mapped_writes),
        }


#: nitro_rbd_open's failing step by NITRO_RBD_STAGE_* code.
RBD_STAGES: Final[tuple[str, ...]] = _names(lib.nitro_rbd_stage_names, lib.NITRO_RBD_STAGES)


class RbdOpenError(OSError):
    """nitro_rbd_open failed: ``stage`` (one of RBD_STAGES: "connect",
    "image", "lock"...) says which step, ``errno`` what librados/librbd
    said. At "lock", another client holds the image's exclusive lock."""

    def __init__(self, stage: str, err: int) -> None:
        super().__init__(err, f"{stage}: {os.strerror(err)}")
        self.stage = stage


class RbdImage(_Owned):
    """An open RBD image (struct nitro_rbd), its exclusive lock held unless
    read-only. Opening blocks on the network: not on the trio thread."""

    def __init__(self, conf: str, user: str, keyring: str, pool: str, image: str,
                 readonly: bool, stale_owner: str = "") -> None:
        out = ffi.new("struct nitro_rbd **")
        err = ffi.new("int *")
        stage = lib.nitro_rbd_open(conf.encode(), user.encode(), keyring.encode(), pool.encode(),
                                   image.encode(), int(readonly), stale_owner.encode(), out, err)
        if stage != lib.NITRO_RBD_OK:
            raise RbdOpenError(RBD_STAGES[stage], -int(err[0]))
        super().__init__(ffi.gc(out[0], lib.nitro_rbd_close))

    @property
    def size(self) -> int:
        return int(lib.nitro_rbd_size(self.ptr))

    @property
    def lock_owner(self) -> str:
        """This client as the lock's owner (librbd's name); "" if read-only."""
        owner: bytes = ffi.string(lib.nitro_rbd_lock_owner(self.ptr))
        return owner.decode()

    def flush(self, timeout: float | None = None) -> None:
        """rbd_flush; TimeoutError after `timeout` s (the cluster is away:
        librbd waits for it without bound, and so does a thread left in it)."""
        rc = _bounded(lambda: int(lib.nitro_rbd_flush(self.ptr)), timeout, "rbd flush")
        if rc < 0:
            raise OSError(-rc, f"rbd flush: {os.strerror(-rc)}")

    def pread(self, count: int, offset: int, timeout: float | None = None) -> bytes:
        """`count` bytes at `offset` (NbdHandle.pread's shape; the control
        plane's, for a LUKS2 header); OSError, TimeoutError after `timeout` s."""
        buf = ffi.new("uint8_t[]", count)
        rc = _bounded(lambda: int(lib.nitro_rbd_read(self.ptr, offset, count, buf)), timeout,
                      "rbd read")
        if rc < 0:
            raise OSError(-rc, f"rbd read: {os.strerror(-rc)}")
        return bytes(ffi.buffer(buf, count))

    def pwrite(self, data: bytes, offset: int, timeout: float | None = None) -> None:
        """Write and flush (a header must be durable before it is used)."""
        rc = _bounded(lambda: int(lib.nitro_rbd_write(self.ptr, offset, len(data), data)), timeout,
                      "rbd write")
        if rc < 0:
            raise OSError(-rc, f"rbd write: {os.strerror(-rc)}")

    def close(self, timeout: float | None = None) -> None:
        """Release the lock, close, disconnect; TimeoutError after `timeout`
        s, the image then left to a thread still in librbd (its lock expires
        with this client's watch on the cluster)."""
        if self._cdata is None:
            return
        cdata, self._cdata = self._cdata, None
        ffi.gc(cdata, None)  # closed once, here, not again by the collector
        _bounded(lambda: lib.nitro_rbd_close(cdata), timeout, "rbd close")

    def abandon(self) -> None:
        """Forget the image without a call into librbd (a cluster that is
        away): nothing is released; the process exits soon."""
        if self._cdata is not None:
            ffi.gc(self._cdata, None)
            self._cdata = None


def _bounded(call: Callable[[], Any], timeout: float | None, what: str) -> Any:
    """call() (which releases the GIL in C), or TimeoutError after
    `timeout` s, leaving it to finish in a daemon thread."""
    if timeout is None:
        return call()
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(call()), name=what, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(errno.ETIMEDOUT, f"{what}: no answer within {timeout:.3g} s")
    if not result:
        raise OSError(errno.EIO, f"{what} failed")
    return result[0]


def blk_serve(vq: Virtqueue, params: BlkParams, stats: BlkStats, idle_ms: int) -> int:
    """Serve a virtio-blk queue until idle for idle_ms (<0: until stopped) or
    stopped; returns requests completed. Blocks with the GIL released: call
    it from a worker thread. Raises GuestFault when the guest broke the ring."""
    ptr = vq.ptr
    return _check(lib.nitro_blk_serve(ptr, params.ptr, stats.ptr, idle_ms),
                  "nitro_blk_serve", ptr)


# ---------------------------------------------------------------------------
# virtio-net and the VPC switch (cffi_build/nitro_net.h)
# ---------------------------------------------------------------------------


#: The switch's table sizes (nitro_net.h NITRO_NET_MAX_*): config.py refuses more.
NET_MAX_VPCS: Final[int] = lib.NITRO_NET_MAX_VPCS
NET_MAX_PORTS: Final[int] = lib.NITRO_NET_MAX_PORTS
NET_MAX_PAIRS: Final[int] = lib.NITRO_NET_MAX_PAIRS
NET_PUNT_PORT_SLOTS: Final[int] = lib.NITRO_NET_PUNT_PORT_SLOTS


def _addr(value: bytes, size: int, what: str) -> bytes:
    """A MAC (6) or IPv4 (4) address as wire-order bytes of exactly size."""
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, got {value!r}")
    return bytes(value)


def _net_stats_dict(s: Any) -> dict[str, Any]:
    return {
        "packets_in": int(s.packets_in), "bytes_in": int(s.bytes_in),
        "packets_out": int(s.packets_out), "bytes_out": int(s.bytes_out),
        "drops": {name: int(s.drops[i]) for i, name in enumerate(NET_DROP_REASONS)},
        "bw_in_allowance_exceeded": int(s.bw_in_allowance_exceeded),
        "bw_out_allowance_exceeded": int(s.bw_out_allowance_exceeded),
        "pps_allowance_exceeded": int(s.pps_allowance_exceeded),
        "linklocal_allowance_exceeded": int(s.linklocal_allowance_exceeded),
        "punted": int(s.punted),
    }


#: Why the switch dropped a frame to or from another host, by NITRO_UNDERLAY_DROP_* code.
UNDERLAY_DROP_REASONS: Final[tuple[str, ...]] = _names(lib.nitro_underlay_drop_names,
                                                       lib.NITRO_UNDERLAY_DROP_KINDS)
NET_MAX_REMOTES: Final[int] = lib.NITRO_NET_MAX_REMOTES
#: How the underlay ring's socket delivers datagrams (nitro_ring_underlay_new).
UNDERLAY_RAW: Final[int] = lib.NITRO_UNDERLAY_RAW
UNDERLAY_UDP: Final[int] = lib.NITRO_UNDERLAY_UDP
UNDERLAY_NO_VNI: Final[int] = 0xFFFF_FFFF
_ALL_PEERS: Final[int] = 0xFFFF_FFFF


class Switch(_Owned):
    """The VPC switch (struct nitro_switch). Tables (add_vpc, add_port,
    set_uplink) are filled before traffic flows; MAC/IP arguments are bytes
    in wire order. Close it only after every serving thread has returned."""

    def __init__(self) -> None:
        raw = lib.nitro_switch_new()
        super().__init__(ffi.NULL if raw == ffi.NULL else ffi.gc(raw, lib.nitro_switch_free))
        self._batch: tuple[Any, Any, Any] | None = None
        self._tunnel: Tunnel | None = None  # C points at it while set

    def add_vpc(self, vpc: int, gateway_mac: bytes, gateway_ip: bytes, mtu: int) -> None:
        _check(lib.nitro_switch_add_vpc(self.ptr, vpc, _addr(gateway_mac, 6, "gateway MAC"),
                                        _addr(gateway_ip, 4, "gateway IPv4"), mtu),
               "nitro_switch_add_vpc")

    def add_port(self, port: int, vpc: int, mac: bytes, ip: bytes, *, bw_in: int = 0,
                 bw_out: int = 0, pps: int = 0, linklocal_pps: int = 0) -> None:
        params = ffi.new("struct nitro_port_params *", {
            "vpc": vpc, "mac": list(_addr(mac, 6, "MAC")), "ip": list(_addr(ip, 4, "IPv4")),
            "bw_in_bytes_per_sec": bw_in, "bw_out_bytes_per_sec": bw_out, "pps": pps,
            "linklocal_pps": linklocal_pps})
        _check(lib.nitro_switch_add_port(self.ptr, port, params), "nitro_switch_add_port")

    def set_uplink(self, vpc: int, fd: int, mac: bytes | None) -> None:
        _check(lib.nitro_switch_set_uplink(
            self.ptr, vpc, fd, _addr(mac, 6, "uplink MAC") if mac is not None else ffi.NULL),
            "nitro_switch_set_uplink")

    def set_port_features(self, port: int, features: int) -> None:
        _check(lib.nitro_switch_set_port_features(self.ptr, port, features),
               "nitro_switch_set_port_features")

    def attach_rx(self, port: int, pair: int, vq: Virtqueue) -> None:
        _check(lib.nitro_switch_attach_rx(self.ptr, port, pair, vq.ptr), "nitro_switch_attach_rx")

    def detach_rx(self, port: int, pair: int) -> None:
        _check(lib.nitro_switch_detach_rx(self.ptr, port, pair), "nitro_switch_detach_rx")

    @property
    def punt_fd(self) -> int:
        return _check(lib.nitro_switch_punt_fd(self.ptr), "nitro_switch_punt_fd")

    def punt_pop(self) -> tuple[int, bytes] | None:
        """The next punted (port, frame), or None when the queue is empty."""
        got = self.punt_pop_batch(1)
        return got[0] if got else None

    def punt_pop_batch(self, limit: int = 64) -> list[tuple[int, bytes]]:
        """Up to ``limit`` punted (port, frame) pairs in one C call, oldest
        first; empty when the queue is empty (the punt fd is then not
        readable)."""
        limit = max(1, min(limit, lib.NITRO_NET_PUNT_SLOTS))
        if self._batch is None or len(self._batch[0]) < limit:
            self._batch = (ffi.new("uint32_t[]", limit), ffi.new("uint32_t[]", limit),
                           ffi.new("uint8_t[]", limit * lib.NITRO_NET_PUNT_MAX_FRAME))
        ports, lens, bufs = self._batch
        n = _check(lib.nitro_switch_punt_pop_batch(self.ptr, ports, lens, bufs, limit),
                   "nitro_switch_punt_pop_batch")
        size = lib.NITRO_NET_PUNT_MAX_FRAME
        view = ffi.buffer(bufs)
        return [(int(ports[i]), view[i * size:i * size + lens[i]]) for i in range(n)]

    def inject(self, port: int, frame: bytes) -> bool:
        """Deliver an Ethernet frame into the port's RX ring; False if dropped."""
        return bool(_check(lib.nitro_switch_inject(self.ptr, port, frame, len(frame)),
                           "nitro_switch_inject"))

    def uplink_serve(self, vpc: int, timeout_ms: int) -> int:
        """Move frames from the VPC's TAP into the switch (blocking, GIL released)."""
        return _check(lib.nitro_switch_uplink_serve(self.ptr, vpc, timeout_ms),
                      "nitro_switch_uplink_serve")

    def port_stats(self, port: int) -> dict[str, Any]:
        out = ffi.new("struct nitro_port_stats *")
        _check(lib.nitro_switch_port_stats(self.ptr, port, out), "nitro_switch_port_stats")
        return _net_stats_dict(out)

    def uplink_stats(self, vpc: int) -> dict[str, Any]:
        out = ffi.new("struct nitro_port_stats *")
        _check(lib.nitro_switch_uplink_stats(self.ptr, vpc, out), "nitro_switch_uplink_stats")
        return _net_stats_dict(out)

    # -- the underlay: VPCs across hosts (nitro_net.h "the underlay") ----------
    def set_underlay(self, tunnel: Tunnel | None, send_fd: int = -1) -> None:
        """Frames to other hosts go through ``tunnel`` and out on ``send_fd``
        (a raw IPv4 socket with IP_HDRINCL, still the caller's); None removes
        it, returning once no worker uses it. The switch keeps the tunnel
        alive while it is set."""
        _check(lib.nitro_switch_set_underlay(self.ptr, tunnel.ptr if tunnel is not None else ffi.NULL,
                                             send_fd), "nitro_switch_set_underlay")
        self._tunnel = tunnel

    def set_vni(self, vpc: int, vni: int | None) -> None:
        """The VNI the VPC's frames carry between hosts; None: none."""
        _check(lib.nitro_switch_set_vni(self.ptr, vpc, UNDERLAY_NO_VNI if vni is None else vni),
               "nitro_switch_set_vni")

    def set_remote(self, vpc: int, ip: bytes, mac: bytes, peer: int) -> None:
        """(ip, mac) of VPC vpc lives on the host in tunnel peer slot peer.
        FrontendError for a multicast MAC or a local interface's address,
        LimitError past NET_MAX_REMOTES."""
        _check(lib.nitro_switch_set_remote(self.ptr, vpc, _addr(ip, 4, "IPv4"), _addr(mac, 6, "MAC"),
                                           peer), "nitro_switch_set_remote")

    def remove_remote(self, vpc: int, ip: bytes) -> None:
        _check(lib.nitro_switch_remove_remote(self.ptr, vpc, _addr(ip, 4, "IPv4")),
               "nitro_switch_remove_remote")

    @property
    def remote_count(self) -> int:
        return int(lib.nitro_switch_remote_count(self.ptr))

    def underlay_stats(self, peer: int | None = None) -> dict[str, Any]:
        """Frames sent to / delivered from one tunnel peer slot (None: all),
        and the switch's drops of them by UNDERLAY_DROP_REASONS."""
        out = ffi.new("struct nitro_underlay_stats *")
        _check(lib.nitro_switch_underlay_stats(self.ptr, _ALL_PEERS if peer is None else peer, out),
               "nitro_switch_underlay_stats")
        return {"packets_out": int(out.packets_out), "bytes_out": int(out.bytes_out),
                "packets_in": int(out.packets_in), "bytes_in": int(out.bytes_in),
                "drops": {name: int(out.drops[i]) for i, name in enumerate(UNDERLAY_DROP_REASONS)}}


def net_tx_serve(switch: Switch, port: int, vq: Virtqueue, idle_ms: int) -> int:
    """Serve a virtio-net TX ring through the switch; like blk_serve."""
    ptr = vq.ptr
    return _check(lib.nitro_net_tx_serve(switch.ptr, port, ptr, idle_ms), "nitro_net_tx_serve", ptr)


def net_rx_serve(vq: Virtqueue) -> int:
    """An RX ring's worker: drain its kick (other threads fill the ring).
    Raises GuestFault once a delivery found the ring broken (the delivering
    thread kicks the ring's fd so that this call runs and reports it)."""
    ptr = vq.ptr
    return _check(lib.nitro_net_rx_serve(ptr), "nitro_net_rx_serve", ptr)


# ---------------------------------------------------------------------------
# Frames between hosts: Geneve in ESP (cffi_build/nitro_tunnel.h)
# ---------------------------------------------------------------------------

#: Why the tunnel dropped a packet, by NITRO_TUNNEL_DROP_* code.
TUNNEL_DROP_REASONS: Final[tuple[str, ...]] = _names(lib.nitro_tunnel_drop_names,
                                                     lib.NITRO_TUNNEL_DROP_KINDS)
TUNNEL_KEYMAT_LEN: Final[int] = lib.NITRO_TUNNEL_KEYMAT_LEN
TUNNEL_MAX_PEERS: Final[int] = lib.NITRO_TUNNEL_MAX_PEERS
TUNNEL_ESP_OVERHEAD: Final[int] = lib.NITRO_TUNNEL_ESP_OVERHEAD
TUNNEL_PLAIN_OVERHEAD: Final[int] = lib.NITRO_TUNNEL_PLAIN_OVERHEAD
TUNNEL_REPLAY_WINDOW: Final[int] = lib.NITRO_TUNNEL_REPLAY_WINDOW
X25519_LEN: Final[int] = lib.NITRO_TUNNEL_X25519_LEN


def x25519_public_key(private_key: Secret) -> bytes:
    """The X25519 public key of a 32-byte private key held in C."""
    out = ffi.new("uint8_t[]", X25519_LEN)
    _check(lib.nitro_tunnel_public_key(private_key.ptr, out), "nitro_tunnel_public_key")
    return bytes(ffi.buffer(out))


def derive_keymat(private_key: Secret, peer_public: bytes, salt: bytes, info: bytes) -> Secret:
    """HKDF-SHA256(X25519(private_key, peer_public), salt, info): an SA's
    36 bytes (AES-256 key || GCM salt), computed and kept in C. FrontendError
    for a malformed key or a low-order peer key."""
    if len(peer_public) != X25519_LEN:
        raise ValueError(f"an X25519 public key is {X25519_LEN} bytes")
    out = Secret(TUNNEL_KEYMAT_LEN)
    try:
        _check(lib.nitro_tunnel_derive(private_key.ptr, peer_public, salt, len(salt), info,
                                       len(info), out.ptr), "nitro_tunnel_derive")
    except BaseException:
        out.close()
        raise
    return out


class TunnelBatch:
    """Reusable C arrays for up to ``size`` packets of ``stride`` bytes:
    the frames to encapsulate (pointers into the caller's buffers, set by
    :meth:`set_frames`), the output or input slots, and the results."""

    def __init__(self, size: int, stride: int) -> None:
        self.size = size
        self.stride = stride
        self.frames = ffi.new("uint8_t *[]", size)
        self.lens = ffi.new("uint32_t[]", size)
        self.slots = ffi.new("uint8_t[]", size * stride)
        self.pkts = ffi.new("struct nitro_tunnel_pkt[]", size)
        self._keep: list[Any] = []

    def set_frames(self, frames: list[bytes]) -> int:
        """Point the frame array at ``frames`` (kept alive until the next call)."""
        if len(frames) > self.size:
            raise ValueError(f"at most {self.size} frames per batch")
        self._keep = [ffi.from_buffer(f) for f in frames]
        for i, buf in enumerate(self._keep):
            self.frames[i] = ffi.cast("uint8_t *", buf)
            self.lens[i] = len(frames[i])
        return len(frames)

    def set_packets(self, packets: list[bytes]) -> int:
        """Copy received outer packets into the slots (for decap)."""
        if len(packets) > self.size:
            raise ValueError(f"at most {self.size} packets per batch")
        for i, p in enumerate(packets):
            if len(p) > self.stride:
                raise ValueError(f"packet {i} is longer than a slot ({self.stride} bytes)")
            ffi.memmove(self.slots + i * self.stride, p, len(p))
            self.lens[i] = len(p)
        return len(packets)

    def slot(self, i: int, offset: int, length: int) -> bytes:
        data: bytes = ffi.buffer(self.slots + i * self.stride + offset, length)[:]
        return data


def _tunnel_stats_dict(s: Any) -> dict[str, Any]:
    return {
        "packets_out": int(s.packets_out), "bytes_out": int(s.bytes_out),
        "packets_in": int(s.packets_in), "bytes_in": int(s.bytes_in),
        "drops": {name: int(s.drops[i]) for i, name in enumerate(TUNNEL_DROP_REASONS)},
    }


class Tunnel(_Owned):
    """One host's end of the Geneve/ESP tunnels (struct nitro_tunnel).
    Peers are slots 0..TUNNEL_MAX_PEERS-1 the caller chooses; addresses are
    wire-order bytes. Tables may change while other threads encap/decap."""

    def __init__(self, local_ip: bytes, mtu: int, encrypt: bool = True) -> None:
        raw = lib.nitro_tunnel_new(_addr(local_ip, 4, "underlay IPv4"), mtu, int(encrypt))
        if raw == ffi.NULL:
            raise ValueError(f"nitro_tunnel_new refused MTU {mtu} (576..65535) or ran out of memory")
        super().__init__(ffi.gc(raw, lib.nitro_tunnel_free))
        self.mtu = mtu
        self.encrypt = encrypt

    def add_vni(self, vni: int, vpc: int) -> None:
        _check(lib.nitro_tunnel_add_vni(self.ptr, vni, vpc), "nitro_tunnel_add_vni")

    def remove_vni(self, vni: int) -> None:
        _check(lib.nitro_tunnel_remove_vni(self.ptr, vni), "nitro_tunnel_remove_vni")

    def set_peer(self, peer: int, ip: bytes) -> None:
        _check(lib.nitro_tunnel_set_peer(self.ptr, peer, _addr(ip, 4, "peer IPv4")),
               "nitro_tunnel_set_peer")

    def remove_peer(self, peer: int) -> None:
        _check(lib.nitro_tunnel_remove_peer(self.ptr, peer), "nitro_tunnel_remove_peer")

    def set_outbound(self, peer: int, keymat: Secret | None, spi: int = 0, epoch: int = 0) -> None:
        """The SA frames to ``peer`` go out with (None: none); sequence from 1."""
        _check(lib.nitro_tunnel_set_outbound(
            self.ptr, peer, keymat.ptr if keymat is not None else ffi.NULL, spi, epoch),
            "nitro_tunnel_set_outbound")

    def add_inbound(self, peer: int, keymat: Secret, spi: int, epoch: int) -> None:
        """FrontendError when the SPI is taken (or 0), LimitError when full."""
        _check(lib.nitro_tunnel_add_inbound(self.ptr, peer, keymat.ptr, spi, epoch),
               "nitro_tunnel_add_inbound")

    def remove_inbound(self, spi: int) -> None:
        _check(lib.nitro_tunnel_remove_inbound(self.ptr, spi), "nitro_tunnel_remove_inbound")

    def encap_batch(self, peer: int, vni: int, batch: TunnelBatch, n: int) -> int:
        """Encapsulate the batch's first n frames into its slots; how many
        passed (batch.pkts says which, and why the others were dropped).
        The GIL is released while C works."""
        return _check(lib.nitro_tunnel_encap(self.ptr, peer, vni, batch.frames, batch.lens, n,
                                             batch.slots, batch.stride, batch.pkts),
                      "nitro_tunnel_encap")

    def decap_batch(self, batch: TunnelBatch, n: int) -> int:
        """Decapsulate the batch's first n received packets in place."""
        return _check(lib.nitro_tunnel_decap(self.ptr, batch.slots, batch.lens, batch.stride, n,
                                             batch.pkts), "nitro_tunnel_decap")

    def encap(self, peer: int, vni: int, frames: list[bytes]) -> list[bytes | str]:
        """Each frame's outer IPv4 packet, or the name of its drop reason."""
        batch = TunnelBatch(max(1, len(frames)), self.mtu)
        self.encap_batch(peer, vni, batch, batch.set_frames(frames))
        return [batch.slot(i, 0, batch.pkts[i].len) if batch.pkts[i].drop < 0
                else TUNNEL_DROP_REASONS[batch.pkts[i].drop] for i in range(len(frames))]

    def decap(self, packets: list[bytes]) -> list[TunnelFrame | str]:
        """Each packet's inner frame with its VNI, VPC and peer, or the name
        of its drop reason."""
        batch = TunnelBatch(max(1, len(packets)), max([len(p) for p in packets] + [1]))
        self.decap_batch(batch, batch.set_packets(packets))
        out: list[TunnelFrame | str] = []
        for i in range(len(packets)):
            p = batch.pkts[i]
            out.append(TunnelFrame(batch.slot(i, p.offset, p.len), int(p.vni), int(p.vpc),
                                   int(p.peer)) if p.drop < 0
                       else TUNNEL_DROP_REASONS[p.drop])
        return out

    def stats(self) -> dict[str, Any]:
        """Every packet and drop of the tunnel."""
        out = ffi.new("struct nitro_tunnel_stats *")
        _check(lib.nitro_tunnel_stats(self.ptr, out), "nitro_tunnel_stats")
        return _tunnel_stats_dict(out)

    def peer_stats(self, peer: int) -> dict[str, Any]:
        out = ffi.new("struct nitro_tunnel_stats *")
        _check(lib.nitro_tunnel_peer_stats(self.ptr, peer, out), "nitro_tunnel_peer_stats")
        return _tunnel_stats_dict(out)

    def outbound_info(self, peer: int) -> dict[str, int] | None:
        """The peer's outbound SA (spi, epoch, seq, packets, age_ns, rekey), or None."""
        out = ffi.new("struct nitro_tunnel_sa_info *")
        if lib.nitro_tunnel_outbound_info(self.ptr, peer, out) < 0:
            return None
        return _sa_info_dict(out)

    def test_set_seq(self, peer: int, seq: int) -> None:
        """TEST ONLY: the last sequence number the outbound SA sent."""
        _check(lib.nitro_tunnel_test_set_seq(self.ptr, peer, seq), "nitro_tunnel_test_set_seq")

    def inbound_info(self, spi: int) -> dict[str, int] | None:
        out = ffi.new("struct nitro_tunnel_sa_info *")
        if lib.nitro_tunnel_inbound_info(self.ptr, spi, out) < 0:
            return None
        return _sa_info_dict(out)


class TunnelFrame(NamedTuple):
    """An inner Ethernet frame that passed decapsulation."""

    frame: bytes
    vni: int
    vpc: int
    peer: int


def _sa_info_dict(s: Any) -> dict[str, int]:
    return {f: int(getattr(s, f)) for f in ("spi", "epoch", "seq", "packets", "age_ns", "rekey")}


# ---------------------------------------------------------------------------
# The engine: C worker threads that serve every ring (nitro.h "the engine")
# ---------------------------------------------------------------------------

POLL_ADAPTIVE: Final[int] = lib.NITRO_ENGINE_POLL_ADAPTIVE
POLL_MAX_US: Final[int] = lib.NITRO_ENGINE_POLL_MAX_US
MAX_WORKERS: Final[int] = lib.NITRO_ENGINE_MAX_WORKERS
RING_KINDS: Final[dict[int, str]] = {
    lib.NITRO_RING_BLK: "blk",
    lib.NITRO_RING_NET_TX: "net_tx",
    lib.NITRO_RING_NET_RX: "net_rx",
    lib.NITRO_RING_NET_CTRL: "net_ctrl",
    lib.NITRO_RING_UNDERLAY: "underlay",
}
_WORKER_STAT_FIELDS: Final[tuple[str, ...]] = (
    "rings", "chains", "wakeups", "busy_ns", "poll_ns", "sleep_ns", "io_submitted",
    "poll_us", "uring", "muted", "mutes", "draining",
)


class Ring(_Owned):
    """One virtqueue as the engine serves it. The objects it names (the
    Virtqueue and the device's params/stats/switch) must outlive it; it is
    freed only while detached (``Engine.detach`` first)."""

    def __init__(self, cdata: Any, vq: Virtqueue | None, kind: str, keep: tuple[Any, ...]) -> None:
        super().__init__(ffi.gc(cdata, lib.nitro_ring_free))
        self.vq = vq
        self.kind = kind
        self._keep = keep  # what C points at: alive as long as the ring

    @classmethod
    def blk(cls, vq: Virtqueue, params: BlkParams, stats: BlkStats) -> Ring:
        return cls(lib.nitro_ring_blk_new(vq.ptr, params.ptr, stats.ptr), vq, "blk", (params, stats))

    @classmethod
    def nbd(cls, vq: Virtqueue, params: BlkParams, stats: BlkStats, conn: NbdConn) -> Ring:
        """A blk ring whose I/O goes to an NBD export through ``conn``."""
        return cls(lib.nitro_ring_nbd_new(vq.ptr, params.ptr, stats.ptr, conn.ptr), vq, "blk",
                   (params, stats, conn))

    @classmethod
    def blk_rbd(cls, vq: Virtqueue, image: RbdImage, params: BlkParams, stats: BlkStats) -> Ring:
        """A blk ring whose I/O is librbd's aio on `image`."""
        return cls(lib.nitro_ring_blk_rbd_new(vq.ptr, image.ptr, params.ptr, stats.ptr), vq, "blk",
                   (image, params, stats))

    @classmethod
    def net_tx(cls, switch: Switch, port: int, vq: Virtqueue) -> Ring:
        return cls(lib.nitro_ring_net_tx_new(switch.ptr, port, vq.ptr), vq, "net_tx", (switch,))

    @classmethod
    def net_rx(cls, vq: Virtqueue) -> Ring:
        return cls(lib.nitro_ring_net_rx_new(vq.ptr), vq, "net_rx", ())

    @classmethod
    def net_ctrl(cls, vq: Virtqueue, max_pairs: int) -> Ring:
        return cls(lib.nitro_ring_net_ctrl_new(vq.ptr, max_pairs), vq, "net_ctrl", ())

    @classmethod
    def underlay(cls, switch: Switch, fd: int, mode: int) -> Ring:
        """Frames from other hosts on socket fd (UNDERLAY_RAW or _UDP; the
        caller's, non-blocking): no virtqueue, its worker waits on fd."""
        return cls(lib.nitro_ring_underlay_new(switch.ptr, fd, mode), None, "underlay", (switch,))

    @property
    def _vq_ptr(self) -> Any:
        return self.vq.ptr if self.vq is not None else None

    @property
    def worker(self) -> int | None:
        w = int(lib.nitro_ring_worker(self.ptr))
        return None if w < 0 else w

    @property
    def in_flight(self) -> int:
        return int(lib.nitro_ring_in_flight(self.ptr))

    def check(self) -> None:
        """Raise the error that stopped the ring (GuestFault, HostError...),
        or return while it may serve."""
        rc = int(lib.nitro_ring_status(self.ptr))
        if rc == lib.NITRO_ERR_SYS:
            raise HostError(rc, "ring", int(lib.nitro_ring_errno(self.ptr)))
        _check(rc, "ring", self._vq_ptr)


class NbdError(Exception):
    """libnbd refused: connecting, or a blocking read/write (the message is
    libnbd's, which names the server and the cause; ``errno`` is libnbd's
    errno for a failed connect, ETIMEDOUT for a read or write the server
    did not answer in time, else 0)."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


_NBD_INFO_FIELDS = ("size", "readonly", "can_flush", "can_trim", "can_zero",
                    "can_multi_conn", "can_fua", "min_block", "max_block")
_NBD_STAT_FIELDS = ("connected", "connects", "disconnects", "resent", "timeouts", "guest_writes")


def _nbd_call_error(rc: int, err: Any) -> NbdError:
    """A control-plane call's failure; errno ETIMEDOUT when the server did
    not answer in time (the caller may treat it as unreachable)."""
    message = ffi.string(err).decode(errors="replace")
    return NbdError(message, errno.ETIMEDOUT) if rc == -2 else NbdError(message)


class NbdHandle(_Owned):
    """A connected libnbd handle (cffi_build/nitro_nbd.h) the caller owns
    until ``NbdConn.offer`` takes it. Every call blocks: not on the trio
    thread."""

    def __init__(self, uri: str, *, tls_psk_file: str | None = None,
                 tls_username: str | None = None, tls_certificates: str | None = None,
                 timeout: float = 30.0) -> None:
        """Connected within `timeout` s, and every call answered within it
        (else NbdError, errno ETIMEDOUT for the connect: a server that hangs
        without closing the socket holds nobody for ever)."""
        self.timeout_ns = max(1, int(timeout * 1e9))
        err = ffi.new("char[]", 512)
        errnum = ffi.new("int *")
        h = lib.nitro_nbd_connect(uri.encode(), _cstr(tls_psk_file), _cstr(tls_username),
                                  _cstr(tls_certificates), self.timeout_ns, err, 512, errnum)
        if h == ffi.NULL:
            raise NbdError(ffi.string(err).decode(errors="replace"), int(errnum[0]))
        super().__init__(ffi.gc(h, lib.nitro_nbd_close))

    def info(self) -> dict[str, int]:
        out = ffi.new("struct nitro_nbd_info *")
        _check(lib.nitro_nbd_info(self.ptr, out), "nitro_nbd_info")
        return {f: int(getattr(out, f)) for f in _NBD_INFO_FIELDS}

    def pread(self, count: int, offset: int) -> bytes:
        buf = ffi.new("uint8_t[]", count)
        err = ffi.new("char[]", 512)
        rc = lib.nitro_nbd_pread(self.ptr, buf, count, offset, self.timeout_ns, err, 512)
        if rc < 0:
            raise _nbd_call_error(rc, err)
        return bytes(ffi.buffer(buf, count))

    def pwrite(self, data: bytes, offset: int) -> None:
        """Write and flush (a header must be durable before it is used)."""
        err = ffi.new("char[]", 512)
        rc = lib.nitro_nbd_pwrite(self.ptr, data, len(data), offset, self.timeout_ns, err, 512)
        if rc < 0:
            raise _nbd_call_error(rc, err)

    def detach(self) -> Any:
        """Give up ownership of the C handle (for NbdConn.offer)."""
        h = ffi.gc(self.ptr, None)
        self._cdata = None
        return h


def _cstr(value: str | None) -> Any:
    return value.encode() if value is not None else ffi.NULL


class NbdConn(_Owned):
    """One queue's NBD connection as an engine worker uses it: the control
    plane offers connected handles, the worker takes them and retires dead
    ones; ``want_fd`` (the caller's eventfd) turns readable when it needs
    a handle or has one to close (``reap``)."""

    def __init__(self, want_fd: int, io_timeout_ns: int) -> None:
        super().__init__(ffi.gc(lib.nitro_nbd_new(want_fd, io_timeout_ns), lib.nitro_nbd_free))

    def offer(self, handle: NbdHandle) -> None:
        h = handle.ptr
        _check(lib.nitro_nbd_offer(self.ptr, h), "nitro_nbd_offer")
        handle.detach()

    @property
    def wants(self) -> bool:
        return bool(lib.nitro_nbd_wants(self.ptr))

    def reap(self) -> None:
        lib.nitro_nbd_reap(self.ptr)

    def flush(self, timeout: float) -> bool:
        """Flush the live connection (ring detached; blocking). False when
        there is none; NbdError when the server failed the flush;
        TimeoutError when it did not answer within `timeout` s (the
        connection is hung up then, and the connector makes a new one)."""
        err = ffi.new("char[]", 512)
        rc = int(lib.nitro_nbd_flush(self.ptr, max(0, int(timeout * 1e9)), err, 512))
        if rc == -2:
            raise TimeoutError(errno.ETIMEDOUT, f"nbd flush: no answer within {timeout:.3g} s")
        if rc < 0:
            raise NbdError(ffi.string(err).decode(errors="replace") or "flush failed")
        return rc == 0

    def stats(self) -> dict[str, int]:
        out = ffi.new("struct nitro_nbd_stats *")
        lib.nitro_nbd_stats(self.ptr, out)
        return {f: int(getattr(out, f)) for f in _NBD_STAT_FIELDS}


class Engine(_Owned):
    """The C worker threads (nitro_engine_new). ``attach``/``detach`` block
    until the worker has taken or let go of the ring: call them off the
    trio thread. ``event_fd`` turns readable when a ring stops on an error."""

    def __init__(self, workers: int, cpus: list[int] | None = None,
                 poll_us: int = POLL_ADAPTIVE, sync_io: bool = False,
                 seccomp: bool = False) -> None:
        """``seccomp``: each worker confines itself to the system calls it
        makes (cffi_build/nitro_seccomp.c); any other aborts the process."""
        if cpus is not None and len(cpus) != workers:
            raise ValueError("one CPU per worker")
        c_cpus = ffi.new("int32_t[]", cpus) if cpus is not None else ffi.NULL
        flags = ((lib.NITRO_ENGINE_SYNC_IO if sync_io else 0)
                 | (lib.NITRO_ENGINE_SECCOMP if seccomp else 0))
        ptr = lib.nitro_engine_new(workers, c_cpus, poll_us, flags)
        if ptr == ffi.NULL:
            err = ffi.errno
            raise HostError(lib.NITRO_ERR_SYS, "nitro_engine_new", err)
        super().__init__(ffi.gc(ptr, lib.nitro_engine_free))
        self.workers = int(lib.nitro_engine_workers(ptr))

    @property
    def event_fd(self) -> int:
        return int(lib.nitro_engine_event_fd(self.ptr))

    def attach(self, ring: Ring, worker: int) -> None:
        _check(lib.nitro_engine_attach(self.ptr, ring.ptr, worker), "nitro_engine_attach", ring._vq_ptr)

    def detach(self, ring: Ring) -> None:
        _check(lib.nitro_engine_detach(self.ptr, ring.ptr), "nitro_engine_detach")

    def test_syscall(self, worker: int, nr: int, *args: int) -> int:
        """TEST ONLY: worker ``worker`` makes raw system call ``nr`` with up
        to three integer ``args`` (the rest 0); its result, -errno on
        failure. Under the seccomp filter a call outside it aborts the
        process (tests/unit/test_seccomp.py)."""
        if len(args) > 3:
            raise ValueError("test_syscall: at most three arguments")
        a = [*args, 0, 0, 0][:3]
        return int(lib.nitro_engine_test_syscall(self.ptr, worker, nr, *a))

    def worker_stats(self, worker: int) -> dict[str, int]:
        out = ffi.new("struct nitro_worker_stats *")
        _check(lib.nitro_engine_worker_stats(self.ptr, worker, out), "nitro_engine_worker_stats")
        return {f: int(getattr(out, f)) for f in _WORKER_STAT_FIELDS}
