"""The generic vhost-user dispatcher: one handler per front-end request.

Sans-IO: :meth:`VhostUserBackend.handle` takes a decoded
:class:`~nitro.vhost.codec.Message` and returns the reply bytes (or None).
The trio layer (``server.py``) owns the socket and the vring workers and
follows "quiesce, apply, reconcile" for every message:

1. stop the running vrings :meth:`~VhostUserBackend.affected_vrings` names,
2. ``handle(message)`` and send the reply,
3. start every vring whose ``should_run`` became true.

REPLY_ACK (vhost-user.rst "VHOST_USER_PROTOCOL_F_REPLY_ACK") is handled
here once: if it was negotiated and the request has NEED_REPLY set and no
reply payload of its own, the answer is u64 0 on success, 1 on failure.

Errors, and who closes the connection:

* The codec's RemoteProtocolError: malformed bytes. The caller closes.
* :class:`BackendError`: a well-formed request nitro refuses or cannot
  apply (feature not offered, vring index out of range, ring size not a
  power of two, ...). So is any ``nitro._datapath.DatapathError`` raised
  while applying a request (an mmap that fails, ring addresses outside
  guest memory). If the failure can be acknowledged (REPLY_ACK as above) it
  is answered with u64 1, logged, and the session goes on: the front-end
  decides (QEMU stops the device). Otherwise ``handle`` raises
  BackendError (a RemoteProtocolError, hence a ProtocolError) and the caller
  closes the connection: the front-end would never learn of the failure and
  the device would silently not work.
* GET_CONFIG failures are answered with an empty payload, as the spec's
  GET_CONFIG section prescribes; the session goes on.

Every fd a message carries is either kept (by a Vring) or closed before
``handle`` returns, whatever the outcome.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from nitro import _datapath
from nitro.devices.base import VIRTIO_F_RING_PACKED, VirtioBackend
from nitro.vhost.codec import (
    Message,
    RemoteProtocolError,
    ReplyWithFds,
    close_fds,
    encode_reply,
)
from nitro.vhost.protocol import (
    REQUESTS_WITH_REPLY,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    VRING_REQUESTS,
    DeviceConfig,
    Inflight,
    ProtocolFeature,
    Request,
    VringState,
    inflight_queue_region_size,
)
from nitro.vhost.vring import Vring

log = logging.getLogger("nitro.vhost")

MAX_MEM_SLOTS = 32  # NITRO_MAX_MEM_REGIONS (cffi_build/nitro.h): GET_MAX_MEM_SLOTS
MAX_SPLIT_RING_BASE = 0xFFFF  # a split ring's last_avail_idx is 16 bits
# A packed ring's base is 32 bits: avail and used positions with their wrap
# counters (vhost-user "Vring descriptor indices for packed virtqueues").
MAX_PACKED_RING_BASE = 0xFFFF_FFFF

_PF = ProtocolFeature
# The protocol features this dispatcher implements; a device's offer is
# masked with it, so nothing is offered that would then be refused.
SUPPORTED_PROTOCOL_FEATURES = (_PF.MQ | _PF.REPLY_ACK | _PF.CONFIG | _PF.RESET_DEVICE
                               | _PF.CONFIGURE_MEM_SLOTS | _PF.STATUS | _PF.INFLIGHT_SHMFD)

# Optional requests: the protocol feature gating each, and whether the spec
# wants it negotiated (True) or only offered by the back-end (False).
_GATES: dict[Request, tuple[ProtocolFeature, bool]] = {
    Request.GET_QUEUE_NUM: (_PF.MQ, False),              # "set in queried protocol features"
    Request.RESET_DEVICE: (_PF.RESET_DEVICE, False),     # "set by the back-end"
    Request.GET_CONFIG: (_PF.CONFIG, True),
    Request.SET_CONFIG: (_PF.CONFIG, True),
    Request.GET_MAX_MEM_SLOTS: (_PF.CONFIGURE_MEM_SLOTS, True),
    Request.ADD_MEM_REG: (_PF.CONFIGURE_MEM_SLOTS, True),
    Request.REM_MEM_REG: (_PF.CONFIGURE_MEM_SLOTS, True),
    Request.SET_STATUS: (_PF.STATUS, True),
    Request.GET_STATUS: (_PF.STATUS, True),
    Request.GET_INFLIGHT_FD: (_PF.INFLIGHT_SHMFD, True),
    Request.SET_INFLIGHT_FD: (_PF.INFLIGHT_SHMFD, True),
}

_NO_LOGGING = "dirty page logging (live migration) is not supported"
_NO_POSTCOPY = "postcopy migration (protocol feature PAGEFAULT) is not offered"
_UNSUPPORTED: dict[Request, str] = {
    Request.SET_LOG_BASE: _NO_LOGGING,
    Request.SET_LOG_FD: _NO_LOGGING,
    Request.SEND_RARP: "protocol feature RARP is not offered",
    Request.NET_SET_MTU: "protocol feature MTU is not offered",
    Request.SET_BACKEND_REQ_FD: "protocol feature BACKEND_REQ is not offered",
    Request.IOTLB_MSG: "no IOMMU support (VIRTIO_F_IOMMU_PLATFORM is not offered)",
    Request.SET_VRING_ENDIAN: "protocol feature CROSS_ENDIAN is not offered",
    Request.CREATE_CRYPTO_SESSION: "protocol feature CRYPTO_SESSION is not offered",
    Request.CLOSE_CRYPTO_SESSION: "protocol feature CRYPTO_SESSION is not offered",
    Request.POSTCOPY_ADVISE: _NO_POSTCOPY,
    Request.POSTCOPY_LISTEN: _NO_POSTCOPY,
    Request.POSTCOPY_END: _NO_POSTCOPY,
    Request.GPU_SET_SOCKET: "not a GPU device",
    Request.VRING_KICK: "protocol feature INBAND_NOTIFICATIONS is not offered",
}

# Requests that change what every ring sees (memory, features, reset).
_STOPS_ALL = frozenset({Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.REM_MEM_REG,
                        Request.SET_FEATURES, Request.RESET_OWNER, Request.RESET_DEVICE,
                        Request.SET_INFLIGHT_FD})

# The memfd GET_INFLIGHT_FD hands out can neither shrink nor grow (a
# truncated mapping would SIGBUS the datapath) and its seals are final.
_INFLIGHT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class BackendError(RemoteProtocolError):
    """A well-formed request nitro refuses or cannot apply; the text names the
    request and why. Raised by ``handle`` only when the failure cannot be
    answered with REPLY_ACK: close the connection then."""


@dataclass
class _WithFds:
    """A handler's reply payload plus fds to send with it (owned until sent)."""

    payload: object
    fds: list[int] = field(default_factory=list)


def _add_region(datapath: Any, request: Request, memory: Any, fd: int, r: Any) -> None:
    """Map one region; the cap on mapped guest memory refused by name."""
    try:
        memory.add_region(fd, r.guest_address, r.size, r.user_address, r.mmap_offset)
    except datapath.LimitError as e:
        cap = datapath.guest_memory_limit()
        raise BackendError(
            f"{request.name}: region of {r.size} bytes refused: nitro maps "
            f"{datapath.guest_memory_mapped()} bytes of guest memory already and "
            f"[daemon] max_guest_memory is {cap} bytes") from e


def _log_unsealed(memory: Any) -> None:
    """Memory whose file can shrink is served all the same (a truncation
    breaks the device, nitro_guard.h); say so once per table."""
    unsealed = len(memory) - memory.sealed
    if unsealed:
        log.info("guest memory is not sealed against shrinking; a truncation by the "
                 "frontend breaks the device", extra={"fields": {"regions": unsealed}})


def _require_sealed_memfd(fd: int, where: str) -> None:
    """SET_INFLIGHT_FD's buffer must be a memfd that cannot shrink (what
    GET_INFLIGHT_FD hands out, nitro's or libvhost-user's): a file that can
    be truncated under the mapping would fault the datapath. An unsealed
    memfd that allows sealing is sealed here (a frontend must not resize
    the buffer anyway); anything else is refused."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise BackendError(f"{where}: the fd is not a memfd (no file seals); the inflight "
                           f"buffer must be the memfd GET_INFLIGHT_FD handed out") from None
    if seals & fcntl.F_SEAL_SHRINK:
        return
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError as e:
        raise BackendError(f"{where}: the memfd is not sealed against shrinking and cannot "
                           f"be sealed ({e.strerror})") from None


class VhostUserBackend:
    """Dispatches one session's requests to ``device`` and its vrings.

    ``datapath`` is what the session builds its C objects from: the
    ``nitro._datapath`` module by default (GuestMemory for SET_MEM_TABLE,
    Virtqueue per vring, InflightRegion for SET_INFLIGHT_FD, DatapathError
    for a refused request, LimitError and the guest memory figures for the
    mapped-memory cap); tests inject a fake with the same names.
    """

    def __init__(self, device: VirtioBackend, *, datapath: Any = _datapath) -> None:
        self.device = device
        self.datapath = datapath
        self.inflight: Any = None  # the mapped SET_INFLIGHT_FD buffer
        self._datapath_errors: tuple[type[BaseException], ...] = (datapath.DatapathError,)
        self.vrings: list[Vring] = [Vring(i, datapath.Virtqueue(i))
                                    for i in range(device.num_queues)]
        self.memory: Any = None
        self.owner = False
        self.acked_features = 0
        self.acked_protocol_features = ProtocolFeature(0)
        self.status = 0
        #: Device resets so far (RESET_DEVICE, RESET_OWNER, SET_STATUS 0):
        #: the trio layer revives a broken device when this moves.
        self.resets = 0

    # -- what we offer ---------------------------------------------------------
    @property
    def offered_features(self) -> int:
        """GET_FEATURES: the device's virtio bits plus VHOST_USER_F_PROTOCOL_FEATURES."""
        return self.device.device_features | 1 << VHOST_USER_F_PROTOCOL_FEATURES

    @property
    def offered_protocol_features(self) -> ProtocolFeature:
        return ProtocolFeature(self.device.protocol_features) & SUPPORTED_PROTOCOL_FEATURES

    # -- the trio layer's entry points -------------------------------------------
    def affected_vrings(self, message: Message) -> set[int] | Literal["all"]:
        """Which running vrings must be stopped before ``message`` is applied."""
        request = message.request
        if request in _STOPS_ALL:
            return "all"
        if request is Request.SET_STATUS and message.payload.value == 0:
            return "all"
        if request in VRING_REQUESTS:
            index = message.payload.index
            if 0 <= index < len(self.vrings):
                return {index}
        return set()

    def handle(self, message: Message) -> bytes | None:
        """Apply one request; return the reply bytes to send, or None.
        Raises BackendError when the request fails and REPLY_ACK cannot say so."""
        try:
            return self._reply(message, self._dispatch(message))
        except self._datapath_errors as e:
            return self._failed(message, BackendError(f"{message.request.name}: {e}"), e)
        except BackendError as e:
            return self._failed(message, e)
        finally:
            close_fds(message.fds)  # whatever no handler took
            message.fds.clear()

    def close(self) -> None:
        """End of session: close every vring (fds, C queue) and unmap memory."""
        for vring in self.vrings:
            vring.close()
        self._drop_inflight()
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # -- dispatch -------------------------------------------------------------------
    def _dispatch(self, message: Message) -> object:
        request = message.request
        if request in _UNSUPPORTED:
            raise BackendError(f"{request.name}: {_UNSUPPORTED[request]}")
        self._check_gate(request)
        return _HANDLERS[request](self, message)

    def _check_gate(self, request: Request) -> None:
        gate = _GATES.get(request)
        if gate is None:
            return
        feature, negotiated = gate
        have = self.acked_protocol_features if negotiated else self.offered_protocol_features
        if not have & feature:
            word = "negotiated" if negotiated else "offered"
            raise BackendError(f"{request.name}: protocol feature {feature.name} was not {word}")

    def _wants_ack(self, message: Message) -> bool:
        return bool(self.acked_protocol_features & _PF.REPLY_ACK and message.need_reply
                    and message.request not in REQUESTS_WITH_REPLY)

    def _reply(self, message: Message, result: object) -> bytes | None:
        if isinstance(result, _WithFds):
            try:
                return ReplyWithFds(encode_reply(message.request, result.payload), result.fds)
            except BaseException:
                close_fds(result.fds)
                raise
        if result is not None:
            return encode_reply(message.request, result)
        return encode_reply(message.request, U64(0)) if self._wants_ack(message) else None

    def _failed(self, message: Message, error: BackendError,
                cause: BaseException | None = None) -> bytes:
        if not self._wants_ack(message):
            raise error from cause
        log.warning("request failed; answered through REPLY_ACK",
                    extra={"fields": {"request": message.request.name, "error": str(error)}})
        return encode_reply(message.request, U64(1))

    def _vring(self, request: Request, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise BackendError(f"{request.name}: vring index {index} out of range "
                               f"(the device has {len(self.vrings)} queues)")
        return self.vrings[index]

    def _device_call(self, request: Request, fn: Callable[..., Any], *args: Any) -> Any:
        # Devices signal a front-end's bad argument (config offset...) with ValueError.
        try:
            return fn(*args)
        except ValueError as e:
            raise BackendError(f"{request.name}: {e}") from e

    def _reset(self) -> None:
        """Rings and device back to their initial state. Ownership, protocol
        features and the memory table stay: the front-end does not send them
        again (QEMU's CONFIGURE_MEM_SLOTS updates are relative to them)."""
        for vring in self.vrings:
            vring.reset()
        self._drop_inflight()  # the frontend sends a new one (SET_INFLIGHT_FD)
        self.acked_features = 0
        self.status = 0
        self.resets += 1
        self.device.reset()

    # -- features and session (spec: GET_FEATURES ... RESET_DEVICE) ---------------------
    def _handle_get_features(self, m: Message) -> U64:
        return U64(self.offered_features)

    def _handle_set_features(self, m: Message) -> None:
        """SET_FEATURES: a subset of what GET_FEATURES offered."""
        features = m.payload.value
        extra = features & ~self.offered_features
        if extra:
            raise BackendError(f"SET_FEATURES: feature bits 0x{extra:x} were not offered "
                               f"(offered 0x{self.offered_features:x})")
        virtio = features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self._device_call(m.request, self.device.set_features, virtio)
        self.acked_features = features
        for vring in self.vrings:
            vring.set_features(features)

    def _handle_get_protocol_features(self, m: Message) -> U64:
        return U64(int(self.offered_protocol_features))

    def _handle_set_protocol_features(self, m: Message) -> None:
        """Bits not offered are dropped, not refused."""
        acked = ProtocolFeature(m.payload.value)
        self.acked_protocol_features = acked & self.offered_protocol_features

    def _handle_set_owner(self, m: Message) -> None:
        self.owner = True

    def _handle_reset_owner(self, m: Message) -> None:
        """Deprecated; "use it to disable all rings". QEMU sends it in place of
        RESET_DEVICE when that is not negotiated, so it resets the same way."""
        self._reset()

    def _handle_reset_device(self, m: Message) -> None:
        """"disable all rings and reset all internal device state"."""
        self._reset()

    def _handle_get_queue_num(self, m: Message) -> U64:
        return U64(self.device.num_queues)

    # -- memory (SET_MEM_TABLE, GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG) --------------
    def _handle_set_mem_table(self, m: Message) -> None:
        """A new table from the regions and their fds (closed once mapped),
        swapped into every ring; the old table is freed."""
        memory = self.datapath.GuestMemory()
        try:
            for region, fd in zip(m.payload.regions, m.fds):
                _add_region(self.datapath, m.request, memory, fd, region)
        except BaseException:
            memory.close()
            raise
        _log_unsealed(memory)
        old, self.memory = self.memory, memory
        try:
            self._remap_vrings(m.request)
        finally:
            if old is not None:
                old.close()

    def _handle_get_max_mem_slots(self, m: Message) -> U64:
        return U64(MAX_MEM_SLOTS)

    def _handle_add_mem_reg(self, m: Message) -> None:
        r = m.payload
        if self.memory is None:
            self.memory = self.datapath.GuestMemory()
        if len(self.memory) >= MAX_MEM_SLOTS:
            raise BackendError(f"ADD_MEM_REG: all {MAX_MEM_SLOTS} memory slots are in use")
        _add_region(self.datapath, m.request, self.memory, m.fds[0], r)
        self._remap_vrings(m.request)

    def _handle_rem_mem_reg(self, m: Message) -> None:
        """The region is identified by guest address and size (mmap offset ignored)."""
        r = m.payload
        if self.memory is None:
            raise BackendError("REM_MEM_REG: no memory region was added")
        self.memory.remove_region(r.guest_address, r.size)
        self._remap_vrings(m.request)

    def _remap_vrings(self, request: Request) -> None:
        """Point every ring at ``self.memory``; C translates the addresses again."""
        failed = []
        for vring in self.vrings:
            try:
                vring.set_mem(self.memory)
            except self._datapath_errors as e:
                failed.append(f"vring {vring.index}: {e}")
        if failed:
            raise BackendError(f"{request.name}: ring addresses no longer in guest memory: "
                               + "; ".join(failed))

    # -- vrings (SET_VRING_* and GET_VRING_BASE) ---------------------------------------
    def _handle_set_vring_num(self, m: Message) -> None:
        """Split ring size: a power of two up to the device's max_queue_size."""
        state = m.payload
        vring = self._vring(m.request, state.index)
        num, limit = state.num, self.device.max_queue_size
        if num == 0 or num & (num - 1) or num > limit:
            raise BackendError(f"SET_VRING_NUM: vring {vring.index}: size {num} is not "
                               f"a power of two from 1 to {limit}")
        vring.set_num(num)

    def _handle_set_vring_addr(self, m: Message) -> None:
        addr = m.payload
        vring = self._vring(m.request, addr.index)
        where = f"SET_VRING_ADDR: vring {vring.index}"
        if addr.flags & (1 << VHOST_VRING_F_LOG):
            raise BackendError(f"{where}: VHOST_VRING_F_LOG set; {_NO_LOGGING}")
        if self.memory is None:
            raise BackendError(f"{where}: no memory table yet (SET_MEM_TABLE first)")
        if not vring.num:
            raise BackendError(f"{where}: ring size unknown (SET_VRING_NUM first)")
        vring.set_addr(addr, self.memory)

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was negotiated: every ring is packed."""
        return bool(self.acked_features >> VIRTIO_F_RING_PACKED & 1)

    def _handle_set_vring_base(self, m: Message) -> None:
        """Split: the 16-bit last_avail_idx. Packed: 32 bits (C checks the
        positions against the ring size)."""
        state = m.payload
        vring = self._vring(m.request, state.index)
        limit = MAX_PACKED_RING_BASE if self.packed else MAX_SPLIT_RING_BASE
        if state.num > limit:
            kind = "a packed ring's 32-bit" if self.packed else "a split ring's 16-bit"
            raise BackendError(f"SET_VRING_BASE: vring {vring.index}: base {state.num} "
                               f"does not fit {kind} index")
        vring.base = state.num

    def _handle_get_vring_base(self, m: Message) -> VringState:
        """Stops the ring ("Ring states") and returns where it stopped."""
        vring = self._vring(m.request, m.payload.index)
        vring.stop()
        return VringState(vring.index, vring.base)

    def _handle_set_vring_kick(self, m: Message) -> None:
        vring = self._vring(m.request, m.payload.index)
        if m.payload.invalid:
            raise BackendError(f"SET_VRING_KICK: vring {vring.index}: no kick fd; "
                               f"polling the ring is not supported")
        vring.set_kick(_take_eventfd(m, vring.index))

    def _handle_set_vring_call(self, m: Message) -> None:
        vring = self._vring(m.request, m.payload.index)
        vring.set_call(_take_eventfd(m, vring.index) if m.fds else None)

    def _handle_set_vring_err(self, m: Message) -> None:
        vring = self._vring(m.request, m.payload.index)
        vring.set_err(_take_eventfd(m, vring.index) if m.fds else None)

    def _handle_set_vring_enable(self, m: Message) -> None:
        state = m.payload
        vring = self._vring(m.request, state.index)
        if state.num not in (0, 1):
            raise BackendError(f"SET_VRING_ENABLE: vring {vring.index}: "
                               f"{state.num} is neither 0 nor 1")
        vring.set_enabled(bool(state.num))

    # -- inflight I/O tracking (vhost-user.rst "Inflight I/O tracking") --------------------
    def _inflight_layout(self, m: Message) -> tuple[Inflight, int]:
        """The request's description checked against the device; and the
        bytes of one queue's region, in the layout of the ring format
        negotiated (QEMU sends SET_FEATURES before GET_INFLIGHT_FD)."""
        i = m.payload
        where = m.request.name
        if not 1 <= i.num_queues <= len(self.vrings):
            raise BackendError(f"{where}: num_queues {i.num_queues} is not 1 to "
                               f"{len(self.vrings)} (the device's queues)")
        limit = self.device.max_queue_size
        if not 1 <= i.queue_size <= limit:
            raise BackendError(f"{where}: queue_size {i.queue_size} is not 1 to {limit}")
        return i, inflight_queue_region_size(i.queue_size, self.packed)

    def _handle_get_inflight_fd(self, m: Message) -> _WithFds:
        """A zeroed, sealed memfd for num_queues regions; the reply
        carries it and its size. QEMU keeps it across our restarts and gives
        it back with SET_INFLIGHT_FD."""
        i, per_queue = self._inflight_layout(m)
        size = i.num_queues * per_queue
        fd = os.memfd_create("nitro-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)  # zero-filled: every region is version 0
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _INFLIGHT_SEALS)
        except BaseException:
            os.close(fd)
            raise
        return _WithFds(Inflight(size, 0, i.num_queues, i.queue_size), [fd])

    def _handle_set_inflight_fd(self, m: Message) -> None:
        """Map the buffer and point the first num_queues rings at their
        regions; the other rings track nothing. Replaces an earlier buffer."""
        i, per_queue = self._inflight_layout(m)
        need = i.num_queues * per_queue
        where = "SET_INFLIGHT_FD"
        if i.mmap_size < need:
            raise BackendError(f"{where}: mmap_size {i.mmap_size} is less than the {need} bytes "
                               f"{i.num_queues} queues of {i.queue_size} entries need")
        if i.mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise BackendError(f"{where}: mmap_offset {i.mmap_offset} is not page-aligned")
        fd = m.fds[0]
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BackendError(f"{where}: the fd is not a memfd or regular file")
        if st.st_size < i.mmap_offset + need:
            raise BackendError(f"{where}: the fd holds {st.st_size} bytes, less than "
                               f"mmap_offset {i.mmap_offset} + {need}")
        _require_sealed_memfd(fd, where)
        try:
            region = self.datapath.InflightRegion(fd, need, i.mmap_offset)  # fd closed by handle()
        except (OSError, ValueError) as e:
            raise BackendError(f"{where}: cannot map the buffer: {e}") from e
        try:
            for vring in self.vrings:
                if vring.index < i.num_queues:
                    vring.set_inflight(region, vring.index * per_queue, per_queue)
                else:
                    vring.set_inflight(None)
        except BaseException:
            # No ring tracks anything now: the old buffer goes too.
            self._detach_inflight()
            region.close()
            self._drop_inflight()
            raise
        old, self.inflight = self.inflight, region
        if old is not None:
            old.close()
        log.info("inflight buffer mapped", extra={"fields": {
            "queues": i.num_queues, "queue_size": i.queue_size, "bytes": need}})

    def _detach_inflight(self) -> None:
        for vring in self.vrings:
            try:
                vring.set_inflight(None)
            except self._datapath_errors:
                pass  # detaching cannot fail in C; a closed queue has nothing

    def _drop_inflight(self) -> None:
        """Unmap the buffer. Only once no C queue points into it: the rings
        were reset, closed or detached."""
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None

    # -- config space and status ------------------------------------------------------------
    def _handle_get_config(self, m: Message) -> DeviceConfig | bytes:
        """An empty payload tells the front-end the read failed (spec GET_CONFIG)."""
        c = m.payload
        try:
            data = bytes(self.device.get_config(c.offset, c.size))
        except ValueError as e:
            log.warning("GET_CONFIG failed", extra={"fields": {"error": str(e)}})
            return b""
        if len(data) != c.size:
            return b""
        return DeviceConfig(c.offset, c.size, c.flags, data)

    def _handle_set_config(self, m: Message) -> None:
        """The device decides which fields are writable (it may ignore writes)."""
        c = m.payload
        self._device_call(m.request, self.device.set_config, c.offset, c.payload)

    def _handle_set_status(self, m: Message) -> None:
        """The virtio device status byte; 0 resets the device (virtio 1.2 2.1)."""
        status = m.payload.value
        if status > 0xFF:
            raise BackendError(f"SET_STATUS: status 0x{status:x} does not fit the 8-bit field")
        if status == 0:
            self._reset()
        self.status = status

    def _handle_get_status(self, m: Message) -> U64:
        return U64(self.status)


# One handler per request, as libvhost-user's vu_process_message() and
# rust-vmm's match: grep a request's name to find what it does. Requests
# nitro refuses are in _UNSUPPORTED with the reason.
_B = VhostUserBackend
_HANDLERS: dict[Request, Callable[[VhostUserBackend, Message], object]] = {
    Request.GET_FEATURES: _B._handle_get_features,
    Request.SET_FEATURES: _B._handle_set_features,
    Request.SET_OWNER: _B._handle_set_owner,
    Request.RESET_OWNER: _B._handle_reset_owner,
    Request.SET_MEM_TABLE: _B._handle_set_mem_table,
    Request.SET_VRING_NUM: _B._handle_set_vring_num,
    Request.SET_VRING_ADDR: _B._handle_set_vring_addr,
    Request.SET_VRING_BASE: _B._handle_set_vring_base,
    Request.GET_VRING_BASE: _B._handle_get_vring_base,
    Request.SET_VRING_KICK: _B._handle_set_vring_kick,
    Request.SET_VRING_CALL: _B._handle_set_vring_call,
    Request.SET_VRING_ERR: _B._handle_set_vring_err,
    Request.GET_PROTOCOL_FEATURES: _B._handle_get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: _B._handle_set_protocol_features,
    Request.GET_QUEUE_NUM: _B._handle_get_queue_num,
    Request.SET_VRING_ENABLE: _B._handle_set_vring_enable,
    Request.GET_CONFIG: _B._handle_get_config,
    Request.SET_CONFIG: _B._handle_set_config,
    Request.GET_INFLIGHT_FD: _B._handle_get_inflight_fd,
    Request.SET_INFLIGHT_FD: _B._handle_set_inflight_fd,
    Request.RESET_DEVICE: _B._handle_reset_device,
    Request.GET_MAX_MEM_SLOTS: _B._handle_get_max_mem_slots,
    Request.ADD_MEM_REG: _B._handle_add_mem_reg,
    Request.REM_MEM_REG: _B._handle_rem_mem_reg,
    Request.SET_STATUS: _B._handle_set_status,
    Request.GET_STATUS: _B._handle_get_status,
}
del _B


def check_dispatch(handlers: Mapping[Request, object], unsupported: Mapping[Request, str]) -> None:
    """Every Request is handled or refused with a reason, never both: a
    request added to protocol.py without a decision fails at import, as a
    non-exhaustive match fails to compile. Raises AssertionError (not an
    assert statement: python -O must not drop the check)."""
    missing = [r.name for r in Request if r not in handlers and r not in unsupported]
    both = [r.name for r in handlers if r in unsupported]
    if missing or both:
        raise AssertionError(f"vhost-user dispatch: no handler and not unsupported: {missing}; "
                             f"both handled and unsupported: {both}")


check_dispatch(_HANDLERS, _UNSUPPORTED)


def _take_eventfd(m: Message, index: int) -> int:
    """The message's kick, call or err fd, checked and made non-blocking.

    It must be an eventfd: a regular file or memfd would read as
    always-ready and spin a worker thread at 100% CPU (found by fuzzing).
    It is made O_NONBLOCK: the frontend chooses the flags, and a write to a
    blocking eventfd whose counter is at 0xfffffffffffffffe (or a read of
    one at 0) blocks until the frontend acts, that is forever for a hostile
    one, with a worker thread stuck in C where no stop reaches it. The flag
    belongs to the open file description the frontend shares, so it can
    clear it again: the C reads and writes must tolerate that as well."""
    fd = m.fds.pop()
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        kind = "?"
    if kind != "anon_inode:[eventfd]":
        os.close(fd)
        raise BackendError(f"{m.request.name}: vring {index}: fd is {kind}, not an eventfd")
    try:
        os.set_blocking(fd, False)
    except OSError as e:
        os.close(fd)
        raise BackendError(f"{m.request.name}: vring {index}: cannot make the eventfd "
                           f"non-blocking: {e.strerror}") from e
    return fd
