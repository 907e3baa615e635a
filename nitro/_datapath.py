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

import math
import os
from typing import Any, Final

from nitro._nitro_c import ffi, lib

FAULT_NAMES: Final[dict[int, str]] = {
    1: "avail_idx",
    2: "desc_index",
    3: "desc_addr",
    4: "desc_loop",
    5: "indirect",
    6: "desc_order",
    7: "request",
}
OP_NAMES: Final[tuple[str, ...]] = (
    "in", "out", "flush", "get_id", "discard", "write_zeroes", "unsupported",
)
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


class Virtqueue(_Owned):
    """One split virtqueue's C state (nitro_vq)."""

    def __init__(self, index: int) -> None:
        raw = lib.nitro_vq_new(index)
        super().__init__(ffi.NULL if raw == ffi.NULL else ffi.gc(raw, lib.nitro_vq_free))
        self.index = index
        self._mem: GuestMemory | None = None

    def set_num(self, num: int) -> None:
        _check(lib.nitro_vq_set_num(self.ptr, num), "nitro_vq_set_num")

    def set_addr(self, mem: GuestMemory, desc: int, avail: int, used: int) -> None:
        """Ring addresses as frontend virtual addresses (SET_VRING_ADDR)."""
        _check(lib.nitro_vq_set_addr(self.ptr, mem.ptr, desc, avail, used),
               "nitro_vq_set_addr")
        self._mem = mem

    def set_mem(self, mem: GuestMemory) -> None:
        """Swap the memory table (queue stopped); re-translates the rings."""
        self._mem = None
        _check(lib.nitro_vq_set_mem(self.ptr, mem.ptr), "nitro_vq_set_mem")
        self._mem = mem

    @property
    def base(self) -> int:
        """last_avail_idx (SET_VRING_BASE / GET_VRING_BASE)."""
        return int(lib.nitro_vq_get_base(self.ptr))

    @base.setter
    def base(self, last_avail_idx: int) -> None:
        lib.nitro_vq_set_base(self.ptr, last_avail_idx)

    def set_fds(self, kick: int, call: int) -> None:
        """Kick and call eventfds, -1 for none; they stay the caller's."""
        lib.nitro_vq_set_fds(self.ptr, kick, call)

    def set_features(self, bits: int) -> None:
        lib.nitro_vq_set_features(self.ptr, bits)

    @property
    def fault(self) -> str | None:
        code = int(lib.nitro_vq_fault(self.ptr))
        return FAULT_NAMES.get(code, "unknown") if code else None

    def reset(self) -> None:
        """Forget the fault, ring addresses and base."""
        lib.nitro_vq_reset(self.ptr)
        self._mem = None

    def stop(self) -> None:
        """Make a serving loop return soon; safe from any thread."""
        lib.nitro_vq_stop(self.ptr)

    def clear_stop(self) -> None:
        lib.nitro_vq_clear_stop(self.ptr)

    def stats(self) -> dict[str, Any]:
        s = lib.nitro_vq_stats(self.ptr)
        return {
            "kicks": int(s.kicks),
            "calls": int(s.calls),
            "chains": int(s.chains),
            "faults": {name: int(s.faults[code]) for code, name in FAULT_NAMES.items()},
        }

    def close(self) -> None:
        super().close()
        self._mem = None


class BlkParams(_Owned):
    """struct nitro_blk_params: the backing fd (the caller's) and limits."""

    def __init__(self, fd: int, capacity_sectors: int, readonly: bool = False,
                 max_discard_sectors: int = 0, max_write_zeroes_sectors: int = 0,
                 serial: bytes = b"") -> None:
        if len(serial) > 20:
            raise ValueError("virtio-blk serial is at most 20 bytes")
        super().__init__(ffi.new("struct nitro_blk_params *", {
            "fd": fd,
            "readonly": int(readonly),
            "capacity": capacity_sectors,
            "max_discard_sectors": max_discard_sectors,
            "max_write_zeroes_sectors": max_write_zeroes_sectors,
        }))
        ffi.memmove(self._cdata.serial, serial, len(serial))


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
            "latency_buckets": [(b, int(s.latency_buckets[i]))
                                for i, b in enumerate(LATENCY_BOUNDS)],
            "latency_sum_seconds": s.latency_sum_ns / 1e9,
            "inflight": int(s.inflight),
        }


def blk_serve(vq: Virtqueue, params: BlkParams, stats: BlkStats, idle_ms: int) -> int:
    """Serve a virtio-blk queue until idle for idle_ms (<0: until stopped) or
    stopped; returns requests completed. Blocks with the GIL released: call
    it from a worker thread. Raises GuestFault when the guest broke the ring."""
    ptr = vq.ptr
    return _check(lib.nitro_blk_serve(ptr, params.ptr, stats.ptr, idle_ms),
                  "nitro_blk_serve", ptr)
