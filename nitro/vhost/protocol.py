"""vhost-user wire vocabulary, named as in QEMU's docs/interop/vhost-user.rst.

Pure data, no I/O and no state: request and feature numbers, the header,
one dataclass per payload layout ("Message Specification" section), and the
tables the codec checks every message against (which payload a request
carries, how many file descriptors may come with it, whether it has a reply
of its own).

Each payload class has ``decode(data)`` (syntax only: sizes, counts and
reserved bits; never meaning) raising :class:`PayloadError`, and
``encode()``. Grep the spec for any name here: ``Request.SET_VRING_KICK`` is
``VHOST_USER_SET_VRING_KICK``, ``ProtocolFeature.REPLY_ACK`` is
``VHOST_USER_PROTOCOL_F_REPLY_ACK``.

Byte order: the spec says "machine native byte order". nitro only runs on
little-endian hosts (x86_64, aarch64), so every layout here is explicitly
little-endian: the wire format is then the same whatever Python's host.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Protocol, Self

# -- header ("Message Specification" > "Header") ------------------------------
HEADER_SIZE = 12
VERSION = 0x1        # "Lower 2 bits are the version (currently 0x01)"
VERSION_MASK = 0x3
REPLY = 0x4          # "Bit 2 is the reply flag"
NEED_REPLY = 0x8     # "Bit 3 is the need_reply flag" (QEMU: VHOST_USER_NEED_REPLY_MASK)

# The largest payload nitro accepts. The spec sets no limit; the largest
# layout nitro uses is far below it (SET_MEM_TABLE: 8 + 8 * 32 bytes).
# rust-vmm uses the same 4 KiB bound. A header announcing more is rejected
# before its payload is read.
MAX_PAYLOAD_SIZE = 4096

# "Communication": the reserved virtio feature bit reused for vhost-user.
VHOST_USER_F_PROTOCOL_FEATURES = 30

# "Memory regions description": region0 ... region7.
VHOST_MEMORY_BASELINE_NREGIONS = 8

# SET_VRING_KICK/CALL/ERR u64: "Bits (0-7) of the payload contain the vring
# index. Bit 8 is the invalid FD flag." (QEMU's names for the masks.)
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x100

# "Migration": the vring address flag asking for used-ring write logging.
VHOST_VRING_F_LOG = 0

# "Virtio device config space" flags (QEMU's names).
VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1


class Request(enum.IntEnum):
    """Front-end message types ("Front-end message types"), minus VHOST_USER_."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    SET_SLAVE_REQ_FD = 21  # the spec's name before QEMU 8.1; an alias
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits ("Protocol features"), minus VHOST_USER_PROTOCOL_F_."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    SLAVE_REQ = 1 << 5       # older spec text; an alias
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    SLAVE_SEND_FD = 1 << 10  # older spec text; an alias
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


class PayloadError(ValueError):
    """A payload does not match its layout (size, count or reserved bits)."""


def _expect_size(what: str, data: bytes, size: int) -> None:
    if len(data) != size:
        raise PayloadError(f"{what} is {size} bytes, got {len(data)}")


_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_MEMORY_HEAD = struct.Struct("<II")
_SINGLE_REGION = struct.Struct("<QQQQQ")
_CONFIG_HEAD = struct.Struct("<III")
_INFLIGHT = struct.Struct("<QQHH")
_INFLIGHT_PADDED = 24  # sizeof(VhostUserInflight) in C: 8-byte alignment


@dataclass(frozen=True)
class Header:
    """The 12-byte header: request, flags, size ("Header"). No validation here."""

    request: int
    flags: int
    size: int

    @classmethod
    def decode(cls, data: bytes) -> Header:
        _expect_size("a header", data, HEADER_SIZE)
        return cls(*_HEADER.unpack(data))

    def encode(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, self.size)


@dataclass(frozen=True)
class U64:
    """"A single 64-bit integer"."""

    value: int

    @classmethod
    def decode(cls, data: bytes) -> U64:
        _expect_size("a u64 payload", data, _U64.size)
        return cls(*_U64.unpack(data))

    def encode(self) -> bytes:
        return _U64.pack(self.value)


@dataclass(frozen=True)
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: vring index (bits 0-7) and the
    invalid FD flag (bit 8: no fd in the ancillary data). Other bits must be 0."""

    index: int
    invalid: bool = False

    @classmethod
    def decode(cls, data: bytes) -> VringFd:
        _expect_size("a vring fd payload", data, _U64.size)
        (value,) = _U64.unpack(data)
        reserved = value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK)
        if reserved:
            raise PayloadError(f"reserved bits 0x{reserved:x} set in vring fd payload 0x{value:x}")
        return cls(value & VHOST_USER_VRING_IDX_MASK, bool(value & VHOST_USER_VRING_NOFD_MASK))

    def encode(self) -> bytes:
        if not 0 <= self.index <= VHOST_USER_VRING_IDX_MASK:
            raise ValueError(f"vring index {self.index} does not fit in bits 0-7")
        return _U64.pack(self.index | (VHOST_USER_VRING_NOFD_MASK if self.invalid else 0))


@dataclass(frozen=True)
class VringState:
    """"A vring state description": index, num."""

    index: int
    num: int

    @classmethod
    def decode(cls, data: bytes) -> VringState:
        _expect_size("a vring state description", data, _STATE.size)
        return cls(*_STATE.unpack(data))

    def encode(self) -> bytes:
        return _STATE.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    """"A vring address description" (struct vhost_vring_addr). The spec's
    table shows a "size" column that neither its field list nor the struct has."""

    index: int
    flags: int
    descriptor: int
    used: int
    available: int
    log: int

    @classmethod
    def decode(cls, data: bytes) -> VringAddr:
        _expect_size("a vring address description", data, _ADDR.size)
        return cls(*_ADDR.unpack(data))

    def encode(self) -> bytes:
        return _ADDR.pack(self.index, self.flags, self.descriptor, self.used,
                          self.available, self.log)


@dataclass(frozen=True)
class MemoryRegion:
    """One region of "Memory regions description"."""

    guest_address: int
    size: int
    user_address: int
    mmap_offset: int

    @classmethod
    def decode(cls, data: bytes) -> MemoryRegion:
        _expect_size("a memory region", data, _REGION.size)
        return cls(*_REGION.unpack(data))

    def encode(self) -> bytes:
        return _REGION.pack(self.guest_address, self.size, self.user_address,
                            self.mmap_offset)


@dataclass(frozen=True)
class MemoryTable:
    """"Memory regions description": num regions, padding, up to 8 regions.
    Front-ends send only the regions in use: size = 8 + 32 * num regions."""

    regions: tuple[MemoryRegion, ...]

    @classmethod
    def decode(cls, data: bytes) -> MemoryTable:
        if len(data) < _MEMORY_HEAD.size:
            raise PayloadError(f"a memory regions description is at least 8 bytes, got {len(data)}")
        count, _padding = _MEMORY_HEAD.unpack_from(data)
        if count > VHOST_MEMORY_BASELINE_NREGIONS:
            raise PayloadError(f"{count} regions, at most {VHOST_MEMORY_BASELINE_NREGIONS} allowed")
        _expect_size(f"a memory regions description of {count} regions", data,
                     _MEMORY_HEAD.size + count * _REGION.size)
        return cls(tuple(MemoryRegion(*r) for r in _REGION.iter_unpack(data[_MEMORY_HEAD.size:])))

    def encode(self) -> bytes:
        if len(self.regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise ValueError(f"{len(self.regions)} regions, at most {VHOST_MEMORY_BASELINE_NREGIONS}")
        head = _MEMORY_HEAD.pack(len(self.regions), 0)
        return head + b"".join(r.encode() for r in self.regions)


@dataclass(frozen=True)
class SingleMemoryRegion:
    """"Single memory region description": padding, then one region."""

    guest_address: int
    size: int
    user_address: int
    mmap_offset: int

    @classmethod
    def decode(cls, data: bytes) -> SingleMemoryRegion:
        _expect_size("a single memory region description", data, _SINGLE_REGION.size)
        return cls(*_SINGLE_REGION.unpack(data)[1:])

    def encode(self) -> bytes:
        return _SINGLE_REGION.pack(0, self.guest_address, self.size, self.user_address,
                                   self.mmap_offset)


@dataclass(frozen=True)
class DeviceConfig:
    """"Virtio device config space": offset, size, flags, then size bytes."""

    offset: int
    size: int
    flags: int
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.payload) != self.size:
            raise ValueError(f"config payload is {len(self.payload)} bytes, size says {self.size}")

    @classmethod
    def decode(cls, data: bytes) -> DeviceConfig:
        if len(data) < _CONFIG_HEAD.size:
            raise PayloadError(f"a device config space payload is at least 12 bytes, got {len(data)}")
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        _expect_size(f"a device config space payload of size {size}", data,
                     _CONFIG_HEAD.size + size)
        return cls(offset, size, flags, bytes(data[_CONFIG_HEAD.size:]))

    def encode(self) -> bytes:
        return _CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.payload


@dataclass(frozen=True)
class Inflight:
    """"Inflight description" (GET_INFLIGHT_FD / SET_INFLIGHT_FD): mmap_size,
    mmap_offset, num_queues, queue_size. QEMU sends its C struct, padded to
    24 bytes; 20 is accepted too, 24 is sent."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    @classmethod
    def decode(cls, data: bytes) -> Inflight:
        if len(data) not in (_INFLIGHT.size, _INFLIGHT_PADDED):
            raise PayloadError(f"an inflight description is {_INFLIGHT_PADDED} bytes "
                               f"(or {_INFLIGHT.size} unpadded), got {len(data)}")
        return cls(*_INFLIGHT.unpack_from(data))

    def encode(self) -> bytes:
        raw = _INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)
        return raw + bytes(_INFLIGHT_PADDED - len(raw))


# "Inflight I/O tracking". Split virtqueue: a QueueRegionSplit header (u64
# features, u16 version, desc_num, last_batch_head, used_idx) and one
# 16-byte DescStateSplit per ring entry. Packed virtqueue: a 32-byte
# QueueRegionPacked header and one 32-byte DescStatePacked per entry. Each
# queue's region is padded to 64 bytes, as QEMU's libvhost-user and DPDK lay
# the buffer out.
INFLIGHT_REGION_HEADER = 16
INFLIGHT_DESC_SIZE = 16
INFLIGHT_PACKED_REGION_HEADER = 32
INFLIGHT_PACKED_DESC_SIZE = 32
INFLIGHT_REGION_ALIGN = 64


def inflight_queue_region_size(queue_size: int, packed: bool = False) -> int:
    """Bytes of one queue's region in the inflight buffer, in the layout of
    the ring format negotiated (VIRTIO_F_RING_PACKED: ``packed``)."""
    if packed:
        n = INFLIGHT_PACKED_REGION_HEADER + INFLIGHT_PACKED_DESC_SIZE * queue_size
    else:
        n = INFLIGHT_REGION_HEADER + INFLIGHT_DESC_SIZE * queue_size
    return -(-n // INFLIGHT_REGION_ALIGN) * INFLIGHT_REGION_ALIGN


@dataclass(frozen=True)
class Opaque:
    """A payload kept as bytes: requests nitro never accepts (logging, IOTLB,
    crypto sessions), whose layouts need no parsing to be
    refused. Only the header's size limit applies."""

    data: bytes

    @classmethod
    def decode(cls, data: bytes) -> Opaque:
        return cls(bytes(data))

    def encode(self) -> bytes:
        return self.data


class Payload(Protocol):
    """What every payload class above is: bytes in (a syntax-only check
    raising PayloadError), bytes out."""

    @classmethod
    def decode(cls, data: bytes) -> Self: ...

    def encode(self) -> bytes: ...


# Request -> payload class; None: "request payload: N/A" (size must be 0).
PAYLOAD_TYPES: dict[Request, type[Payload] | None] = {
    Request.GET_FEATURES: None,
    Request.SET_FEATURES: U64,
    Request.SET_OWNER: None,
    Request.RESET_OWNER: None,
    Request.SET_MEM_TABLE: MemoryTable,
    Request.SET_LOG_BASE: Opaque,  # spec: u64; QEMU sends a log description
    Request.SET_LOG_FD: None,
    Request.SET_VRING_NUM: VringState,
    Request.SET_VRING_ADDR: VringAddr,
    Request.SET_VRING_BASE: VringState,
    Request.GET_VRING_BASE: VringState,
    Request.SET_VRING_KICK: VringFd,
    Request.SET_VRING_CALL: VringFd,
    Request.SET_VRING_ERR: VringFd,
    Request.GET_PROTOCOL_FEATURES: None,
    Request.SET_PROTOCOL_FEATURES: U64,
    Request.GET_QUEUE_NUM: None,
    Request.SET_VRING_ENABLE: VringState,
    Request.SEND_RARP: U64,
    Request.NET_SET_MTU: U64,
    Request.SET_BACKEND_REQ_FD: None,
    Request.IOTLB_MSG: Opaque,
    Request.SET_VRING_ENDIAN: VringState,
    Request.GET_CONFIG: DeviceConfig,
    Request.SET_CONFIG: DeviceConfig,
    Request.CREATE_CRYPTO_SESSION: Opaque,
    Request.CLOSE_CRYPTO_SESSION: U64,
    Request.POSTCOPY_ADVISE: None,
    Request.POSTCOPY_LISTEN: None,
    Request.POSTCOPY_END: None,
    Request.GET_INFLIGHT_FD: Inflight,
    Request.SET_INFLIGHT_FD: Inflight,
    Request.GPU_SET_SOCKET: None,
    Request.RESET_DEVICE: None,
    Request.VRING_KICK: VringState,
    Request.GET_MAX_MEM_SLOTS: None,
    Request.ADD_MEM_REG: SingleMemoryRegion,
    Request.REM_MEM_REG: SingleMemoryRegion,
    Request.SET_STATUS: U64,
    Request.GET_STATUS: None,
}

# Requests whose payload starts with a vring index (state, address or fd u64).
VRING_REQUESTS = frozenset({
    Request.SET_VRING_NUM, Request.SET_VRING_ADDR, Request.SET_VRING_BASE,
    Request.GET_VRING_BASE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
    Request.SET_VRING_ERR, Request.SET_VRING_ENABLE, Request.SET_VRING_ENDIAN,
    Request.VRING_KICK,
})

# Requests answered with a payload of their own ("Communication" plus each
# request's "reply payload"); REPLY_ACK's u64 never applies to these.
REQUESTS_WITH_REPLY = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS, Request.SET_LOG_BASE, Request.GET_INFLIGHT_FD,
    Request.IOTLB_MSG, Request.CREATE_CRYPTO_SESSION, Request.POSTCOPY_ADVISE,
    Request.POSTCOPY_END,
})

# The fd whitelist ("Communication": messages sent with file descriptors).
# Anything not listed here or below carries none.
_ONE = range(1, 2)
_FDS: dict[Request, range] = {
    Request.ADD_MEM_REG: _ONE,
    Request.SET_LOG_BASE: range(2),  # one "if VHOST_USER_PROTOCOL_F_LOG_SHMFD"
    Request.SET_LOG_FD: _ONE,
    Request.SET_BACKEND_REQ_FD: _ONE,
    Request.SET_INFLIGHT_FD: _ONE,
    Request.GPU_SET_SOCKET: _ONE,
    # REM_MEM_REG: "the back-end MAY accept messages with one file
    # descriptor. If a file descriptor is passed, the back-end MUST close it".
    Request.REM_MEM_REG: range(2),
}
_VRING_FD_REQUESTS = frozenset({Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                Request.SET_VRING_ERR})

# Requests whose fds are closed on arrival rather than handed on.
FDS_TO_DISCARD = frozenset({Request.REM_MEM_REG})


def allowed_fds(request: Request, payload: Any) -> range:
    """How many fds may come with this (already decoded) request."""
    if request is Request.SET_MEM_TABLE:
        # "The size and ordering of the fds matches the number and ordering
        # of memory regions."
        n = len(payload.regions)
        return range(n, n + 1)
    if request in _VRING_FD_REQUESTS:
        return range(1) if payload.invalid else _ONE
    return _FDS.get(request, range(1))
