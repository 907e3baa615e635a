"""The vhost-user dispatcher, driven as QEMU drives it, on fake memory and queues.

``Frontend`` plays both QEMU and the trio layer: it encodes each request,
passes it (with real fds) through the codec, stops the rings
``affected_vrings`` names, applies it and starts the rings whose
``should_run`` became true. The fake C queue asserts that nothing changes
under a ring while it is being served.
"""

from __future__ import annotations

import fcntl
import os
import struct
import tempfile
from types import SimpleNamespace

import pytest

from nitro import _datapath
from nitro.vhost.backend import (
    MAX_MEM_SLOTS,
    SUPPORTED_PROTOCOL_FEATURES,
    BackendError,
    VhostUserBackend,
)
from nitro.vhost.codec import NEED_DATA, FrontendConnection, Message, ProtocolError, ReplyWithFds
from nitro.vhost.protocol import (
    NEED_REPLY,
    REPLY,
    REQUESTS_WITH_REPLY,
    U64,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    DeviceConfig,
    Header,
    Inflight,
    MemoryRegion,
    MemoryTable,
    Opaque,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    VringAddr,
    VringFd,
    VringState,
)
from nitro.vhost.vring import Vring

R = Request
PF = ProtocolFeature
F_PROTOCOL_FEATURES = 1 << VHOST_USER_F_PROTOCOL_FEATURES
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ = (
    1 << 2, 1 << 6, 1 << 9, 1 << 12)
# virtio 1.2 2.1 device status
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8

GUEST_RAM = 0x7F00_0000_0000   # QEMU's mapping of the memfd guest RAM
QUEUE_SIZE = 128               # vhost-user-blk-pci queue-size default


# -- fakes -------------------------------------------------------------------------
class FakeDatapathError(Exception):
    """Stands in for nitro._datapath.DatapathError."""


class FakeMemory:
    sealed = 0  # regions whose file cannot shrink (test memfds are not sealed)

    def __init__(self) -> None:
        self.regions: list[tuple[int, int, int, int]] = []
        self.closed = False

    def add_region(self, fd, guest_phys_addr, memory_size, userspace_addr, mmap_offset):
        os.fstat(fd)  # mmap needs an open fd: it must not be closed yet
        for gpa, size, _, _ in self.regions:
            if gpa < guest_phys_addr + memory_size and guest_phys_addr < gpa + size:
                raise FakeDatapathError("overlapping memory region")
        if memory_size == 0:
            raise FakeDatapathError("empty memory region")
        self.regions.append((guest_phys_addr, memory_size, userspace_addr, mmap_offset))

    def remove_region(self, guest_phys_addr, memory_size):
        for r in self.regions:
            if r[:2] == (guest_phys_addr, memory_size):
                self.regions.remove(r)
                return
        raise FakeDatapathError("no such memory region")

    def maps_uaddr(self, uaddr: int) -> bool:
        return any(u <= uaddr < u + size for _, size, u, _ in self.regions)

    def __len__(self) -> int:
        return len(self.regions)

    def close(self) -> None:
        assert not self.closed, "memory table freed twice"
        self.closed = True


class FakeVq:
    def __init__(self, index: int) -> None:
        self.index = index
        self.serving = False   # the fake trio layer sets it while a worker "runs"
        self.num = 0
        self.mem = None
        self.rings = None
        self._base = 0
        self.fds = (-1, -1)
        self.features = 0
        self.resets = 0
        self.closed = False
        self.fault = None
        self.inflight = None

    def _idle(self) -> None:
        assert not self.serving, f"vq {self.index} changed while being served"

    @property
    def base(self) -> int:
        return self._base

    @base.setter
    def base(self, value: int) -> None:
        self._idle()
        self._base = value

    def set_num(self, num):
        self._idle()
        self.num = num

    def set_addr(self, mem, desc, avail, used):
        self._idle()
        self.mem, self.rings = mem, None
        for a in (desc, avail, used):
            if not mem.maps_uaddr(a):
                raise FakeDatapathError(f"ring address 0x{a:x} is not in guest memory")
        self.rings = (desc, avail, used)

    def set_mem(self, mem):
        self._idle()
        self.mem = mem
        if self.rings and not all(mem.maps_uaddr(a) for a in self.rings):
            self.rings = None
            raise FakeDatapathError("ring addresses not in the new memory table")

    def set_fds(self, kick, call):
        self._idle()
        self.fds = (kick, call)

    def set_features(self, bits):
        self._idle()
        self.features = bits

    def set_inflight(self, region, offset=0, size=0):
        self._idle()
        if region is not None and self.num and size < 16 + 16 * self.num:
            raise FakeDatapathError("inflight region too small for the ring")
        self.inflight = None if region is None else (region, offset, size)

    def reset(self):
        self._idle()
        self.resets += 1
        self.rings, self._base, self.inflight = None, 0, None

    def stop(self):
        pass

    def clear_stop(self):
        pass

    def stats(self):
        return {"kicks": 0, "calls": 0, "chains": 0}

    def close(self):
        self.closed = True


class FakeBlkDevice:
    """The backend contract of docs/architecture.md, as BlkDevice offers it."""

    def __init__(self, *, num_queues=2, protocol_features=None) -> None:
        self.device_features = (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
                                | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_BLK_F_SEG_MAX
                                | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_MQ)
        self.protocol_features = int(
            PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.STATUS
            | PF.RESET_DEVICE) if protocol_features is None else int(protocol_features)
        self.num_queues = num_queues
        self.max_queue_size = 256
        self.config = bytes(range(60))
        self.written: list[tuple[int, bytes]] = []
        self.acked: int | None = None
        self.resets = 0

    def get_config(self, offset, size):
        if offset + size > len(self.config):
            raise ValueError(f"config window {offset}+{size} beyond {len(self.config)} bytes")
        return self.config[offset:offset + size]

    def set_config(self, offset, data):
        self.written.append((offset, data))

    def set_features(self, acked):
        self.acked = acked

    def reset(self):
        self.resets += 1


# -- a QEMU-like front-end plus the trio layer's loop ---------------------------------------
def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def memfd() -> int:
    return os.memfd_create("guest-ram")


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def fake_datapath(**over: object) -> SimpleNamespace:
    """What VhostUserBackend builds its C objects from, faked (the real
    InflightRegion and cap figures: they touch no C queue)."""
    names = dict(GuestMemory=FakeMemory, Virtqueue=FakeVq, DatapathError=FakeDatapathError,
                 InflightRegion=_datapath.InflightRegion, LimitError=_datapath.LimitError,
                 guest_memory_limit=_datapath.guest_memory_limit,
                 guest_memory_mapped=_datapath.guest_memory_mapped)
    return SimpleNamespace(**{**names, **over})


class Frontend:
    def __init__(self, device=None) -> None:
        self.device = device or FakeBlkDevice()
        self.codec = FrontendConnection()
        self.backend = VhostUserBackend(self.device, datapath=fake_datapath())
        self.running: set[int] = set()
        self.stopped_by: dict[Request, set[int]] = {}
        self.fds: list[int] = []

    def close(self) -> None:
        """End the session and check that every fd handed over was closed."""
        self.backend.close()
        self.codec.close()
        leaked = [fd for fd in self.fds if not is_closed(fd)]
        assert not leaked, f"fds not closed at the end of the session: {leaked}"

    def send(self, request, payload=None, fds=(), *, need_reply=False) -> bytes | None:
        """One request through codec and dispatcher; the raw reply bytes."""
        self.fds += fds
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        self.codec.receive_data(Message(request, flags, payload).encode(), fds)
        msg = self.codec.next_event()
        assert msg is not NEED_DATA
        self._quiesce(msg)
        try:
            return self.backend.handle(msg)
        finally:
            self._reconcile()

    def call(self, request, payload=None, fds=(), *, need_reply=False, raw=False):
        """send(), then the reply's payload: an int for a u64, else (or if raw) bytes."""
        data = self.send(request, payload, fds, need_reply=need_reply)
        assert data is not None, f"{request.name}: no reply"
        head = Header.decode(data[:12])
        assert (head.request, head.flags, head.size) == (request, VERSION | REPLY, len(data) - 12)
        body = data[12:]
        return U64.decode(body).value if len(body) == 8 and not raw else body

    def _quiesce(self, msg) -> None:
        affected = self.backend.affected_vrings(msg)
        stop = set(self.running) if affected == "all" else self.running & affected
        self.stopped_by[msg.request] = stop
        for i in stop:
            self.backend.vrings[i].vq.serving = False
        self.running -= stop

    def _reconcile(self) -> None:
        for v in self.backend.vrings:
            if v.should_run and v.index not in self.running:
                v.vq.serving = True
                self.running.add(v.index)


@pytest.fixture
def fe():
    frontend = Frontend()
    yield frontend
    frontend.close()


QEMU_PROTOCOL_MASK = (1 << 17) - 1  # VHOST_USER_PROTOCOL_FEATURE_MASK in QEMU 7.2
LOW = MemoryRegion(0x0, 0xA0000, GUEST_RAM, 0x0)
HIGH = MemoryRegion(0xC0000, 0xFF40000, GUEST_RAM + 0xC0000, 0xC0000)


def ring_addr(index: int) -> VringAddr:
    base = GUEST_RAM + 0x100000 + index * 0x10000
    return VringAddr(index, 0, base, base + 0x1000 + 0x200, base + 0x1000, 0)


def qemu_connect(fe: Frontend) -> int:
    """vhost_user_blk realize: vhost_dev_init + vhost_user_backend_init, GET_CONFIG."""
    offered = fe.call(R.GET_FEATURES)
    assert offered == fe.device.device_features | F_PROTOCOL_FEATURES
    protocol = fe.call(R.GET_PROTOCOL_FEATURES)
    assert protocol == fe.device.protocol_features & SUPPORTED_PROTOCOL_FEATURES
    assert fe.send(R.SET_PROTOCOL_FEATURES, U64(protocol & QEMU_PROTOCOL_MASK)) is None
    assert fe.call(R.GET_QUEUE_NUM) == fe.device.num_queues
    if protocol & PF.CONFIGURE_MEM_SLOTS:
        assert fe.call(R.GET_MAX_MEM_SLOTS) == 32
    assert fe.send(R.SET_OWNER) is None
    assert fe.call(R.GET_FEATURES) == offered
    masked = []  # vhost_virtqueue_init: the masked notifier as call fd
    for i in range(fe.device.num_queues):
        fd = eventfd()
        masked.append(fd)
        assert fe.send(R.SET_VRING_CALL, VringFd(i), [fd]) is None
        assert fe.backend.vrings[i].call_fd == fd
    config = fe.call(R.GET_CONFIG, DeviceConfig(0, 60, 0, bytes(60)))
    assert DeviceConfig.decode(config) == DeviceConfig(0, 60, 0, fe.device.config)
    assert not any(v.should_run for v in fe.backend.vrings)
    return offered


def qemu_start(fe: Frontend, offered: int) -> None:
    """vhost_user_blk_start -> vhost_dev_start, the driver having set DRIVER_OK."""
    status_ok = bool(fe.backend.acked_protocol_features & PF.STATUS)
    acked = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_MQ
    assert fe.send(R.SET_FEATURES, U64(acked | F_PROTOCOL_FEATURES)) is None
    assert fe.device.acked == acked
    if status_ok:  # vhost_user_add_status(FEATURES_OK)
        assert fe.call(R.GET_STATUS) == 0
        assert fe.call(R.SET_STATUS, U64(FEATURES_OK), need_reply=True) == 0
    mem_fds = [memfd(), memfd()]
    if fe.backend.acked_protocol_features & PF.CONFIGURE_MEM_SLOTS:
        for region, fd in zip((LOW, HIGH), mem_fds):
            single = SingleMemoryRegion(region.guest_address, region.size,
                                        region.user_address, region.mmap_offset)
            assert fe.call(R.ADD_MEM_REG, single, [fd], need_reply=True) == 0
            assert is_closed(fd), "region fd must be closed once mapped"
    else:
        assert fe.call(R.SET_MEM_TABLE, MemoryTable((LOW, HIGH)), mem_fds, need_reply=True) == 0
        assert all(is_closed(fd) for fd in mem_fds)
    assert len(fe.backend.memory) == 2
    for i, vring in enumerate(fe.backend.vrings):
        old_call = vring.call_fd
        assert fe.send(R.SET_VRING_NUM, VringState(i, QUEUE_SIZE)) is None
        assert fe.send(R.SET_VRING_BASE, VringState(i, 0)) is None
        assert fe.send(R.SET_VRING_ADDR, ring_addr(i)) is None
        kick, call = eventfd(), eventfd()
        assert fe.send(R.SET_VRING_KICK, VringFd(i), [kick]) is None
        assert vring.started and not vring.enabled and not vring.should_run
        assert fe.send(R.SET_VRING_CALL, VringFd(i), [call]) is None
        assert is_closed(old_call), "a replaced call fd is closed"
        assert vring.vq.fds == (kick, call)
        assert vring.vq.num == QUEUE_SIZE and vring.vq.rings is not None
        assert vring.vq.features == acked
    for i in range(fe.device.num_queues):
        assert fe.send(R.SET_VRING_ENABLE, VringState(i, 1)) is None
        assert fe.backend.vrings[i].should_run
    if status_ok:  # vhost_user_dev_start(true)
        assert fe.call(R.GET_STATUS) == FEATURES_OK
        running = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        assert fe.call(R.SET_STATUS, U64(running), need_reply=True) == 0
        assert fe.backend.status == running


@pytest.mark.parametrize("mem_slots", [True, False], ids=["ADD_MEM_REG", "SET_MEM_TABLE"])
def test_qemu_7_2_vhost_user_blk_start(mem_slots):
    device = FakeBlkDevice()
    if not mem_slots:
        device.protocol_features &= ~PF.CONFIGURE_MEM_SLOTS
    fe = Frontend(device)
    try:
        qemu_start(fe, qemu_connect(fe))
        assert fe.running == {0, 1}
        assert all(v.should_run for v in fe.backend.vrings)
        # every message that touched a ring found it stopped: FakeVq asserts it
    finally:
        fe.close()
    assert all(v.vq.closed for v in fe.backend.vrings)
    assert fe.backend.memory is None


def test_qemu_stop_then_restart(fe):
    qemu_start(fe, qemu_connect(fe))
    for v in fe.backend.vrings:
        v.vq._base = 40 + v.index  # the C loop consumed requests
    for i in range(2):  # vhost_dev_stop: disable, then GET_VRING_BASE
        assert fe.send(R.SET_VRING_ENABLE, VringState(i, 0)) is None
        assert fe.stopped_by[R.SET_VRING_ENABLE] == {i}
        assert not fe.backend.vrings[i].should_run
        assert VringState.decode(fe.call(R.GET_VRING_BASE, VringState(i, 0), raw=True)) == VringState(i, 40 + i)
        assert not fe.backend.vrings[i].started
    assert fe.running == set()
    assert fe.call(R.SET_STATUS, U64(0), need_reply=True) == 0  # vhost_user_dev_start(false)
    assert fe.device.resets == 1
    assert all(v.kick_fd is None and v.call_fd is None and v.num == 0 for v in fe.backend.vrings)
    assert len(fe.backend.memory) == 2, "the memory table survives a device reset"
    assert fe.backend.acked_protocol_features & PF.REPLY_ACK, "so do protocol features"
    # The next start re-sends features and rings; QEMU's shadow memory table
    # says the regions are already there, so no ADD_MEM_REG this time.
    fe.send(R.SET_FEATURES, U64(VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES))
    for i in range(2):
        fe.send(R.SET_VRING_NUM, VringState(i, QUEUE_SIZE))
        fe.send(R.SET_VRING_BASE, VringState(i, 40 + i))
        fe.send(R.SET_VRING_ADDR, ring_addr(i))
        fe.send(R.SET_VRING_KICK, VringFd(i), [eventfd()])
        fe.send(R.SET_VRING_CALL, VringFd(i), [eventfd()])
        fe.send(R.SET_VRING_ENABLE, VringState(i, 1))
        assert fe.backend.vrings[i].base == 40 + i
    assert fe.running == {0, 1}


def test_get_vring_base_stops_only_that_ring(fe):
    qemu_start(fe, qemu_connect(fe))
    assert fe.backend.affected_vrings(Message(R.GET_VRING_BASE, payload=VringState(1, 0))) == {1}
    fe.call(R.GET_VRING_BASE, VringState(1, 0))
    assert fe.running == {0}
    vring = fe.backend.vrings[1]
    assert not vring.started and not vring.should_run
    assert vring.kick_fd is not None and not is_closed(vring.kick_fd), "fds stay until replaced"
    fe.send(R.SET_VRING_KICK, VringFd(1), [eventfd()])
    assert fe.running == {0, 1}


def test_changes_to_a_running_ring_stop_it_first(fe):
    qemu_start(fe, qemu_connect(fe))
    fe.send(R.SET_VRING_CALL, VringFd(0), [eventfd()])
    assert fe.stopped_by[R.SET_VRING_CALL] == {0}
    assert fe.running == {0, 1}  # and restarted after
    fe.call(R.ADD_MEM_REG, SingleMemoryRegion(0x100000000, 0x1000000, GUEST_RAM + 0x10000000, 0),
            [memfd()], need_reply=True)
    assert fe.stopped_by[R.ADD_MEM_REG] == {0, 1}
    assert all(v.vq.mem is fe.backend.memory for v in fe.backend.vrings)
    assert fe.running == {0, 1}


# -- enable semantics ("Ring states") --------------------------------------------------------
def test_without_protocol_features_a_started_ring_is_enabled(fe):
    fe.call(R.GET_FEATURES)
    fe.send(R.SET_FEATURES, U64(VIRTIO_F_VERSION_1))
    fe.send(R.SET_MEM_TABLE, MemoryTable((LOW, HIGH)), [memfd(), memfd()])
    fe.send(R.SET_VRING_NUM, VringState(0, 64))
    fe.send(R.SET_VRING_ADDR, ring_addr(0))
    vring = fe.backend.vrings[0]
    assert not vring.enabled and not vring.should_run
    fe.send(R.SET_VRING_KICK, VringFd(0), [eventfd()])
    assert vring.enabled and vring.should_run and fe.running == {0}


def test_with_protocol_features_rings_start_disabled(fe):
    fe.send(R.SET_FEATURES, U64(VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES))
    fe.send(R.SET_MEM_TABLE, MemoryTable((HIGH,)), [memfd()])
    fe.send(R.SET_VRING_NUM, VringState(0, 64))
    fe.send(R.SET_VRING_ADDR, ring_addr(0))
    fe.send(R.SET_VRING_KICK, VringFd(0), [eventfd()])
    vring = fe.backend.vrings[0]
    assert vring.started and not vring.enabled and not vring.should_run
    fe.send(R.SET_VRING_ENABLE, VringState(0, 1))
    assert vring.should_run
    fe.send(R.SET_VRING_ENABLE, VringState(0, 0))
    assert not vring.should_run and fe.running == set()


def test_a_broken_ring_does_not_run(fe):
    qemu_start(fe, qemu_connect(fe))
    vring = fe.backend.vrings[0]
    vring.broken = "desc_loop"  # the trio layer saw a guest fault
    assert not vring.should_run
    fe.call(R.RESET_DEVICE, need_reply=True)
    assert vring.broken is None


# -- REPLY_ACK ------------------------------------------------------------------------------
def negotiate(fe: Frontend, protocol=None) -> None:
    offered = fe.call(R.GET_PROTOCOL_FEATURES)
    fe.send(R.SET_PROTOCOL_FEATURES, U64(offered if protocol is None else int(protocol)))


def test_reply_ack_success_and_failure(fe):
    negotiate(fe)
    assert fe.call(R.SET_OWNER, need_reply=True) == 0
    assert fe.send(R.SET_OWNER) is None
    # a failure is answered, not fatal, when it can be acknowledged
    assert fe.call(R.SET_VRING_NUM, VringState(0, 100), need_reply=True) == 1
    assert fe.call(R.SET_VRING_NUM, VringState(0, 64), need_reply=True) == 0
    # ... and the datapath's errors too (ring outside guest memory)
    fe.send(R.SET_MEM_TABLE, MemoryTable((LOW,)), [memfd()])
    bad = VringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0)
    assert fe.call(R.SET_VRING_ADDR, bad, need_reply=True) == 1
    assert fe.backend.vrings[0].addr is None
    with pytest.raises(BackendError, match=r"SET_VRING_ADDR: ring address 0x1000 is not in guest memory"):
        fe.send(R.SET_VRING_ADDR, bad)


def test_requests_with_a_reply_of_their_own_get_only_that(fe):
    negotiate(fe)
    data = fe.send(R.GET_FEATURES, need_reply=True)
    assert len(data) == 12 + 8
    assert Header.decode(data[:12]).size == 8
    state = fe.call(R.GET_VRING_BASE, VringState(0, 0), need_reply=True, raw=True)
    assert VringState.decode(state) == VringState(0, 0)


def test_need_reply_without_reply_ack_negotiated_gets_nothing(fe):
    negotiate(fe, PF.MQ | PF.CONFIG)
    assert fe.send(R.SET_OWNER, need_reply=True) is None
    with pytest.raises(BackendError):
        fe.send(R.SET_VRING_NUM, VringState(0, 3), need_reply=True)


def test_failure_without_need_reply_raises_a_protocol_error(fe):
    negotiate(fe)
    with pytest.raises(BackendError) as info:
        fe.send(R.SET_VRING_NUM, VringState(0, 512))
    assert isinstance(info.value, ProtocolError)
    assert str(info.value) == "SET_VRING_NUM: vring 0: size 512 is not a power of two from 1 to 256"


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("request_,payload,nfds", [
    (R.SET_VRING_NUM, VringState(2, 64), 0),
    (R.SET_VRING_ADDR, VringAddr(7, 0, 0, 0, 0, 0), 0),
    (R.SET_VRING_BASE, VringState(2, 0), 0),
    (R.GET_VRING_BASE, VringState(255, 0), 0),
    (R.SET_VRING_KICK, VringFd(2), 1),
    (R.SET_VRING_CALL, VringFd(200), 1),
    (R.SET_VRING_ERR, VringFd(2), 1),
    (R.SET_VRING_ENABLE, VringState(2, 1), 0),
], ids=lambda p: getattr(p, "name", None))
def test_vring_index_out_of_range(fe, request_, payload, nfds):
    negotiate(fe)
    fds = [eventfd() for _ in range(nfds)]
    msg = Message(request_, VERSION, payload)
    assert fe.backend.affected_vrings(msg) == set()
    with pytest.raises(BackendError, match=rf"{request_.name}: vring index {payload.index} out of "
                                           r"range \(the device has 2 queues\)"):
        fe.send(request_, payload, fds)
    assert all(is_closed(fd) for fd in fds)


def test_features_not_offered_are_refused(fe):
    offered = fe.call(R.GET_FEATURES)
    with pytest.raises(BackendError, match=r"SET_FEATURES: feature bits 0x4000000 were not offered"):
        fe.send(R.SET_FEATURES, U64(offered | 1 << 26))  # VHOST_F_LOG_ALL
    assert fe.device.acked is None and fe.backend.acked_features == 0


def test_protocol_features_not_offered_are_dropped():
    device = FakeBlkDevice(protocol_features=PF.MQ | PF.REPLY_ACK | PF.LOG_SHMFD | PF.PAGEFAULT)
    fe = Frontend(device)
    try:
        offered = fe.call(R.GET_PROTOCOL_FEATURES)
        assert offered == PF.MQ | PF.REPLY_ACK, "what the dispatcher cannot do is never offered"
        fe.send(R.SET_PROTOCOL_FEATURES, U64(0x1FFFF))
        assert fe.backend.acked_protocol_features == PF.MQ | PF.REPLY_ACK
        with pytest.raises(BackendError, match="GET_CONFIG: protocol feature CONFIG was not negotiated"):
            fe.send(R.GET_CONFIG, DeviceConfig(0, 4, 0, bytes(4)))
    finally:
        fe.close()


@pytest.mark.parametrize("request_,payload,nfds,text", [
    (R.SET_LOG_BASE, Opaque(struct.pack("<QQ", 4096, 0)), 1, "SET_LOG_BASE: dirty page logging"),
    (R.SET_LOG_FD, None, 1, "SET_LOG_FD: dirty page logging"),
    (R.SET_BACKEND_REQ_FD, None, 1, "SET_BACKEND_REQ_FD: protocol feature BACKEND_REQ is not offered"),
    (R.VRING_KICK, VringState(0, 0), 0, "VRING_KICK: protocol feature INBAND_NOTIFICATIONS"),
    (R.POSTCOPY_ADVISE, None, 0, "POSTCOPY_ADVISE: postcopy migration"),
    (R.IOTLB_MSG, Opaque(bytes(32)), 0, "IOTLB_MSG: no IOMMU support"),
], ids=lambda p: getattr(p, "name", None))
def test_unsupported_requests_are_refused_and_their_fds_closed(fe, request_, payload, nfds, text):
    negotiate(fe)
    fds = [eventfd() for _ in range(nfds)]
    with pytest.raises(BackendError, match=text):
        fe.send(request_, payload, fds)
    assert all(is_closed(fd) for fd in fds)
    fds = [eventfd() for _ in range(nfds)]
    if request_ in REQUESTS_WITH_REPLY:  # the failure cannot be acknowledged
        with pytest.raises(BackendError, match=text):
            fe.send(request_, payload, fds, need_reply=True)
    else:
        assert fe.call(request_, payload, fds, need_reply=True) == 1
    assert all(is_closed(fd) for fd in fds)


def test_polling_kick_is_refused_but_polling_call_is_fine(fe):
    with pytest.raises(BackendError, match="SET_VRING_KICK: vring 0: no kick fd; polling"):
        fe.send(R.SET_VRING_KICK, VringFd(0, invalid=True))
    fe.send(R.SET_VRING_CALL, VringFd(0), [eventfd()])
    old = fe.backend.vrings[0].call_fd
    fe.send(R.SET_VRING_CALL, VringFd(0, invalid=True))
    assert fe.backend.vrings[0].call_fd is None and is_closed(old)
    assert fe.backend.vrings[0].vq.fds == (-1, -1)


def test_ring_setup_order_and_values_are_checked(fe):
    negotiate(fe)
    with pytest.raises(BackendError, match="SET_VRING_ADDR: vring 0: no memory table yet"):
        fe.send(R.SET_VRING_ADDR, ring_addr(0))
    fe.send(R.SET_MEM_TABLE, MemoryTable((LOW, HIGH)), [memfd(), memfd()])
    with pytest.raises(BackendError, match=r"SET_VRING_ADDR: vring 0: ring size unknown"):
        fe.send(R.SET_VRING_ADDR, ring_addr(0))
    fe.send(R.SET_VRING_NUM, VringState(0, 256))
    with pytest.raises(BackendError, match="VHOST_VRING_F_LOG"):
        fe.send(R.SET_VRING_ADDR, VringAddr(0, 1, GUEST_RAM, GUEST_RAM, GUEST_RAM, 0))
    with pytest.raises(BackendError, match="SET_VRING_BASE: vring 0: base 65536"):
        fe.send(R.SET_VRING_BASE, VringState(0, 65536))
    with pytest.raises(BackendError, match="SET_VRING_ENABLE: vring 0: 2 is neither"):
        fe.send(R.SET_VRING_ENABLE, VringState(0, 2))
    for bad in (0, 3, 512):
        assert fe.call(R.SET_VRING_NUM, VringState(0, bad), need_reply=True) == 1


# -- memory -----------------------------------------------------------------------------------
def test_set_mem_table_swaps_and_frees_the_old_table(fe):
    tables = []
    fe.backend.datapath.GuestMemory = lambda: tables.append(FakeMemory()) or tables[-1]
    fe.send(R.SET_MEM_TABLE, MemoryTable((LOW,)), [memfd()])
    fe.send(R.SET_MEM_TABLE, MemoryTable((LOW, HIGH)), [memfd(), memfd()])
    assert [t.closed for t in tables] == [True, False]
    assert all(v.vq.mem is tables[1] for v in fe.backend.vrings)


def test_a_failed_set_mem_table_keeps_the_old_table_and_closes_the_fds(fe):
    negotiate(fe)
    fe.send(R.SET_MEM_TABLE, MemoryTable((LOW,)), [memfd()])
    before = fe.backend.memory
    fds = [memfd(), memfd()]
    assert fe.call(R.SET_MEM_TABLE, MemoryTable((LOW, LOW)), fds, need_reply=True) == 1
    assert fe.backend.memory is before and not before.closed
    assert all(is_closed(fd) for fd in fds)


def test_memory_that_no_longer_holds_a_ring_drops_its_addresses(fe):
    negotiate(fe)
    qemu_start(fe, qemu_connect(fe))
    assert fe.call(R.SET_MEM_TABLE, MemoryTable((LOW,)), [memfd()], need_reply=True) == 1
    assert fe.backend.memory.regions == [(0, 0xA0000, GUEST_RAM, 0)]
    assert all(v.addr is None and not v.should_run for v in fe.backend.vrings)
    assert fe.running == set()


def test_add_and_remove_memory_regions(fe):
    negotiate(fe)
    assert fe.call(R.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS == 32
    fd = memfd()
    region = SingleMemoryRegion(0x0, 0x1000, GUEST_RAM, 0)
    assert fe.call(R.ADD_MEM_REG, region, [fd], need_reply=True) == 0
    assert is_closed(fd) and len(fe.backend.memory) == 1
    assert fe.call(R.REM_MEM_REG, region, need_reply=True) == 0
    assert len(fe.backend.memory) == 0
    assert fe.call(R.REM_MEM_REG, region, need_reply=True) == 1
    for i in range(MAX_MEM_SLOTS):
        r = SingleMemoryRegion(i * 0x1000, 0x1000, GUEST_RAM + i * 0x1000, 0)
        assert fe.call(R.ADD_MEM_REG, r, [memfd()], need_reply=True) == 0
    with pytest.raises(BackendError, match="all 32 memory slots are in use"):
        fe.send(R.ADD_MEM_REG, SingleMemoryRegion(1 << 40, 0x1000, 1 << 41, 0), [memfd()])


def test_mem_slot_requests_need_configure_mem_slots(fe):
    negotiate(fe, PF.REPLY_ACK)
    with pytest.raises(BackendError, match="GET_MAX_MEM_SLOTS: protocol feature CONFIGURE_MEM_SLOTS"):
        fe.send(R.GET_MAX_MEM_SLOTS)
    fd = memfd()
    assert fe.call(R.ADD_MEM_REG, SingleMemoryRegion(0, 0x1000, GUEST_RAM, 0), [fd],
                   need_reply=True) == 1
    assert is_closed(fd)


# -- config, status, reset ------------------------------------------------------------------
def test_config_space(fe):
    negotiate(fe)
    got = DeviceConfig.decode(fe.call(R.GET_CONFIG, DeviceConfig(8, 4, 0, bytes(4))))
    assert got == DeviceConfig(8, 4, 0, bytes([8, 9, 10, 11]))
    # "vhost-user back-end uses zero length of payload to indicate an error"
    assert fe.call(R.GET_CONFIG, DeviceConfig(56, 8, 0, bytes(8))) == b""
    assert fe.call(R.SET_CONFIG, DeviceConfig(0x20, 1, 0, b"\x01"), need_reply=True) == 0
    assert fe.device.written == [(0x20, b"\x01")]


def test_reset_device_resets_rings_and_device_but_keeps_the_session(fe):
    qemu_start(fe, qemu_connect(fe))
    fds = [fd for v in fe.backend.vrings for fd in (v.kick_fd, v.call_fd)]
    assert fe.backend.affected_vrings(Message(R.RESET_DEVICE)) == "all"
    assert fe.call(R.RESET_DEVICE, need_reply=True) == 0
    assert fe.running == set() and fe.device.resets == 1
    assert all(is_closed(fd) for fd in fds)
    assert all(v.vq.resets == 1 and not v.started and v.addr is None for v in fe.backend.vrings)
    assert fe.backend.acked_features == 0 and fe.backend.status == 0
    assert fe.backend.owner and fe.backend.memory is not None


def test_reset_owner_resets_like_reset_device(fe):
    qemu_start(fe, qemu_connect(fe))
    fe.send(R.RESET_OWNER)
    assert fe.device.resets == 1 and fe.running == set()


def test_status_is_stored_and_zero_resets(fe):
    negotiate(fe)
    msg = Message(R.SET_STATUS, payload=U64(0))
    assert fe.backend.affected_vrings(msg) == "all"
    assert fe.backend.affected_vrings(Message(R.SET_STATUS, payload=U64(DRIVER_OK))) == set()
    fe.call(R.SET_STATUS, U64(ACKNOWLEDGE | DRIVER), need_reply=True)
    assert fe.call(R.GET_STATUS) == ACKNOWLEDGE | DRIVER
    assert fe.call(R.SET_STATUS, U64(0x100), need_reply=True) == 1
    fe.call(R.SET_STATUS, U64(0), need_reply=True)
    assert fe.call(R.GET_STATUS) == 0 and fe.device.resets == 1


def test_affected_vrings(fe):
    b = fe.backend
    assert b.affected_vrings(Message(R.SET_VRING_ADDR, payload=ring_addr(1))) == {1}
    assert b.affected_vrings(Message(R.SET_VRING_KICK, payload=VringFd(0))) == {0}
    for r in (R.SET_MEM_TABLE, R.ADD_MEM_REG, R.REM_MEM_REG, R.SET_FEATURES, R.RESET_OWNER):
        assert b.affected_vrings(Message(r)) == "all"
    assert b.affected_vrings(Message(R.GET_CONFIG, payload=DeviceConfig(0, 0, 0, b""))) == set()


def test_the_dispatch_table_covers_every_request():
    from nitro.vhost import backend as mod

    for request in Request:
        handled, refused = request in mod._HANDLERS, request in mod._UNSUPPORTED
        assert handled != refused, request
        if handled:  # the handler for a request carries its name
            assert mod._HANDLERS[request].__name__ == f"_handle_{request.name.lower()}", request
    # A request without a decision is caught when the module is imported.
    partial = {r: h for r, h in mod._HANDLERS.items() if r is not R.SET_VRING_ERR}
    with pytest.raises(AssertionError, match=r"no handler and not unsupported: \['SET_VRING_ERR'\]"):
        mod.check_dispatch(partial, mod._UNSUPPORTED)
    with pytest.raises(AssertionError, match=r"both handled and unsupported: \['GET_FEATURES'\]"):
        mod.check_dispatch(mod._HANDLERS, {**mod._UNSUPPORTED, R.GET_FEATURES: "no"})
    mod.check_dispatch(mod._HANDLERS, mod._UNSUPPORTED)


def test_close_releases_everything(fe):
    qemu_start(fe, qemu_connect(fe))
    fds = [fd for v in fe.backend.vrings for fd in (v.kick_fd, v.call_fd)]
    memory = fe.backend.memory
    fe.backend.close()
    fe.backend.close()  # idempotent
    assert memory.closed and all(is_closed(fd) for fd in fds)
    assert all(v.vq.closed for v in fe.backend.vrings)


def test_vring_statistics():
    vring = Vring(3, FakeVq(3))
    assert vring.statistics() == {"index": 3, "num": 0, "started": False, "enabled": False,
                                  "broken": None, "kicks": 0, "calls": 0, "chains": 0}


@pytest.mark.parametrize("request_", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_kick_call_and_err_must_be_eventfds(fe, request_):
    """A memfd reads as always ready: as a kick fd it would spin a worker."""
    negotiate(fe)
    not_an_eventfd = memfd()
    with pytest.raises(ProtocolError, match="not an eventfd"):
        fe.send(request_, VringFd(0), [not_an_eventfd])
    assert is_closed(not_an_eventfd)


@pytest.mark.parametrize("request_, kept", [(R.SET_VRING_KICK, "kick_fd"), (R.SET_VRING_CALL, "call_fd"),
                                            (R.SET_VRING_ERR, "err_fd")])
def test_blocking_eventfds_are_made_non_blocking(fe, request_, kept):
    """A frontend may hand a blocking eventfd whose counter is one below
    saturation: a blocking write of 1 (C's call) would then wait forever."""
    negotiate(fe)
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking
    os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
    frontend_copy = os.dup(fd)  # the frontend keeps its end: the same file description
    try:
        assert os.get_blocking(frontend_copy)
        fe.send(request_, VringFd(0), [fd])
        taken = getattr(fe.backend.vrings[0], kept)
        assert taken == fd and not os.get_blocking(taken)
        assert not os.get_blocking(frontend_copy)
        with pytest.raises(BlockingIOError):  # what C's write now gets instead of hanging
            os.eventfd_write(taken, 1)
    finally:
        os.close(frontend_copy)


# -- inflight I/O tracking (GET_INFLIGHT_FD / SET_INFLIGHT_FD) -----------------------------
INFLIGHT_PF = PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.STATUS | PF.INFLIGHT_SHMFD
REGION_128 = 2112  # align64(16 + 16 * 128)


@pytest.fixture
def fei():
    frontend = Frontend(FakeBlkDevice(protocol_features=INFLIGHT_PF))
    negotiate(frontend)
    yield frontend
    frontend.close()


def get_inflight(fe: Frontend, num_queues=2, queue_size=QUEUE_SIZE) -> tuple[Inflight, int]:
    reply = fe.send(R.GET_INFLIGHT_FD, Inflight(0, 0, num_queues, queue_size))
    assert isinstance(reply, ReplyWithFds) and len(reply.fds) == 1
    head = Header.decode(reply[:12])
    assert (head.request, head.flags, head.size) == (R.GET_INFLIGHT_FD, VERSION | REPLY, 24)
    fe.fds += reply.fds  # the sender closes them; Frontend.close() checks that
    return Inflight.decode(reply[12:]), reply.fds[0]


def test_inflight_requests_need_the_feature_negotiated(fe):
    negotiate(fe)  # the default device does not offer INFLIGHT_SHMFD
    assert not fe.backend.offered_protocol_features & PF.INFLIGHT_SHMFD
    with pytest.raises(BackendError, match="GET_INFLIGHT_FD: protocol feature INFLIGHT_SHMFD "
                                           "was not negotiated"):
        fe.send(R.GET_INFLIGHT_FD, Inflight(0, 0, 2, QUEUE_SIZE))
    fd = memfd()
    assert fe.call(R.SET_INFLIGHT_FD, Inflight(4224, 0, 2, QUEUE_SIZE), [fd], need_reply=True) == 1
    assert is_closed(fd) and fe.backend.inflight is None


def test_inflight_offered_but_not_acked_is_refused():
    fe = Frontend(FakeBlkDevice(protocol_features=INFLIGHT_PF))
    try:
        negotiate(fe, PF.MQ | PF.REPLY_ACK)
        with pytest.raises(BackendError, match="INFLIGHT_SHMFD was not negotiated"):
            fe.send(R.GET_INFLIGHT_FD, Inflight(0, 0, 2, QUEUE_SIZE))
    finally:
        fe.close()


def test_get_inflight_fd_replies_with_a_zeroed_sealed_memfd(fei):
    info, fd = get_inflight(fei)
    assert info == Inflight(2 * REGION_128, 0, 2, QUEUE_SIZE)
    assert os.fstat(fd).st_size == info.mmap_size
    assert os.pread(fd, info.mmap_size, 0) == bytes(info.mmap_size)
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
    with pytest.raises(OSError):
        os.ftruncate(fd, 0)
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert fei.backend.inflight is None, "GET alone maps nothing"
    os.close(fd)


def test_set_inflight_fd_gives_each_ring_its_region_and_reset_drops_it(fei):
    info, fd = get_inflight(fei, num_queues=1)
    msg = Message(R.SET_INFLIGHT_FD, VERSION, info, [])
    assert fei.backend.affected_vrings(msg) == "all"
    assert fei.call(R.SET_INFLIGHT_FD, info, [fd], need_reply=True) == 0
    assert is_closed(fd), "the fd is closed once mapped"
    region = fei.backend.inflight
    assert region is not None and region.size == REGION_128
    v0, v1 = (v.vq for v in fei.backend.vrings)
    assert v0.inflight == (region, 0, REGION_128) and v1.inflight is None
    # Replacing it: both rings, the old buffer unmapped.
    info2, fd2 = get_inflight(fei, num_queues=2)
    fei.send(R.SET_INFLIGHT_FD, info2, [fd2])
    new = fei.backend.inflight
    assert v0.inflight == (new, 0, REGION_128) and v1.inflight == (new, REGION_128, REGION_128)
    with pytest.raises(ValueError, match="closed"):
        region.pointer(0, 16)
    # SET_STATUS 0 resets the device: rings detached, buffer unmapped.
    fei.send(R.SET_STATUS, U64(0))
    assert fei.backend.inflight is None and v0.inflight is None
    with pytest.raises(ValueError, match="closed"):
        new.pointer(0, 16)


def test_set_inflight_fd_region_smaller_than_a_ring_is_refused(fei):
    fei.send(R.SET_VRING_NUM, VringState(0, 256))
    info, fd = get_inflight(fei, queue_size=64)
    with pytest.raises(BackendError, match="SET_INFLIGHT_FD: inflight region too small"):
        fei.send(R.SET_INFLIGHT_FD, info, [fd])
    assert fei.backend.inflight is None
    assert all(v.vq.inflight is None for v in fei.backend.vrings)


def _sized_memfd(size: int) -> int:
    fd = memfd()
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("payload,make_fd,text", [
    (Inflight(4224, 0, 0, 128), lambda: _sized_memfd(4224), "num_queues 0 is not 1 to 2"),
    (Inflight(4224, 0, 3, 128), lambda: _sized_memfd(8192), "num_queues 3 is not 1 to 2"),
    (Inflight(4224, 0, 2, 0), lambda: _sized_memfd(4224), "queue_size 0 is not 1 to 256"),
    (Inflight(65536, 0, 2, 512), lambda: _sized_memfd(65536), "queue_size 512 is not 1 to 256"),
    (Inflight(4000, 0, 2, 128), lambda: _sized_memfd(4224), "mmap_size 4000 is less than the 4224"),
    (Inflight(4224, 100, 2, 128), lambda: _sized_memfd(8192), "mmap_offset 100 is not page-aligned"),
    (Inflight(4224, 4096, 2, 128), lambda: _sized_memfd(4224), "the fd holds 4224 bytes"),
    (Inflight(4224, 0, 2, 128), lambda: _sized_memfd(100), "the fd holds 100 bytes"),
    (Inflight(4224, 0, 2, 128), eventfd, "not a memfd or regular file"),
], ids=["no-queues", "too-many-queues", "empty-queue", "queue-too-big", "size-too-small",
        "offset-unaligned", "offset-beyond-fd", "fd-too-small", "eventfd"])
def test_set_inflight_fd_bad_descriptions_are_refused(fei, payload, make_fd, text):
    fd = make_fd()
    with pytest.raises(BackendError, match=f"SET_INFLIGHT_FD: .*{text}"):
        fei.send(R.SET_INFLIGHT_FD, payload, [fd])
    assert is_closed(fd) and fei.backend.inflight is None
    fd = make_fd()
    assert fei.call(R.SET_INFLIGHT_FD, payload, [fd], need_reply=True) == 1
    assert is_closed(fd)


def _regular_file(size: int) -> int:
    fd, path = tempfile.mkstemp(prefix="nitro-inflight-")
    os.unlink(path)
    os.ftruncate(fd, size)
    return fd


def _unsealable_memfd(size: int) -> int:
    fd = os.memfd_create("not-sealable", os.MFD_CLOEXEC)  # no MFD_ALLOW_SEALING
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("make_fd,text", [
    (_regular_file, "the fd is not a memfd"),
    (_unsealable_memfd, "the memfd is not sealed against shrinking and cannot be sealed"),
], ids=["regular-file", "unsealable-memfd"])
def test_set_inflight_fd_takes_only_a_memfd_that_cannot_shrink(fei, make_fd, text):
    """A file the frontend could truncate under the mapping is refused: the
    datapath would fault on the inflight region."""
    info = Inflight(REGION_128, 0, 1, QUEUE_SIZE)
    with pytest.raises(BackendError, match=f"SET_INFLIGHT_FD: {text}"):
        fei.send(R.SET_INFLIGHT_FD, info, [make_fd(REGION_128)])
    assert fei.backend.inflight is None


def test_set_inflight_fd_seals_a_sealable_memfd_against_shrinking(fei):
    fd = os.memfd_create("sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, REGION_128)
    keep = os.dup(fd)
    fei.send(R.SET_INFLIGHT_FD, Inflight(REGION_128, 0, 1, QUEUE_SIZE), [fd])
    assert fei.backend.inflight is not None
    assert fcntl.fcntl(keep, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    with pytest.raises(PermissionError):
        os.ftruncate(keep, 0)
    os.close(keep)


def test_get_inflight_fd_bad_descriptions_are_refused(fei):
    for bad, text in ((Inflight(0, 0, 5, 128), "num_queues 5"), (Inflight(0, 0, 1, 4096), "queue_size 4096")):
        with pytest.raises(BackendError, match=f"GET_INFLIGHT_FD: {text}"):
            fei.send(R.GET_INFLIGHT_FD, bad)


def test_set_inflight_fd_without_its_fd_is_a_protocol_error(fei):
    with pytest.raises(ProtocolError, match="SET_INFLIGHT_FD: 0 file descriptors attached, expected 1"):
        fei.send(R.SET_INFLIGHT_FD, Inflight(4224, 0, 2, 128))


def test_close_unmaps_the_inflight_buffer(fei):
    info, fd = get_inflight(fei)
    fei.send(R.SET_INFLIGHT_FD, info, [fd])
    region = fei.backend.inflight
    fei.backend.close()
    with pytest.raises(ValueError, match="closed"):
        region.pointer(0, 16)


def test_the_trio_layer_sends_a_replys_fds_and_closes_them():
    import socket

    import trio

    from nitro.vhost import server

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = memfd()
    os.ftruncate(fd, 4096)
    reply = ReplyWithFds(b"x" * 36, [fd])

    async def main():
        conn = trio.socket.from_stdlib_socket(a)
        await server._send_all(conn, reply, reply.fds)

    try:
        trio.run(main)
        assert is_closed(fd), "the sender closes the reply's fds"
        data, fds, _, _ = socket.recv_fds(b, 100, 4)
        assert data == b"x" * 36 and len(fds) == 1
        assert os.fstat(fds[0]).st_size == 4096
        os.close(fds[0])
    finally:
        a.close()
        b.close()


# -- packed virtqueues (VIRTIO_F_RING_PACKED) ------------------------------------------------
VIRTIO_F_RING_PACKED = 1 << 34
REGION_128_PACKED = 4160  # align64(32 + 32 * 128): QueueRegionPacked


def packed_frontend() -> Frontend:
    device = FakeBlkDevice(protocol_features=INFLIGHT_PF)
    device.device_features |= VIRTIO_F_RING_PACKED
    frontend = Frontend(device)
    negotiate(frontend)
    return frontend


def test_a_packed_ring_base_is_32_bits_and_a_split_one_16():
    fe = packed_frontend()
    try:
        fe.send(R.SET_FEATURES, U64(VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES))
        with pytest.raises(BackendError, match="split ring's 16-bit"):
            fe.send(R.SET_VRING_BASE, VringState(0, 0x8000_8000))
        fe.send(R.SET_FEATURES, U64(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED))
        assert fe.backend.vrings[0].vq.features & VIRTIO_F_RING_PACKED
        fe.send(R.SET_VRING_BASE, VringState(0, 0x8005_8007))
        assert fe.backend.vrings[0].vq.base == 0x8005_8007
        assert fe.call(R.GET_VRING_BASE, VringState(0, 0)) == 0x8005_8007 << 32  # index 0, num
    finally:
        fe.close()


def test_the_inflight_buffer_takes_the_packed_layout_once_negotiated():
    """QEMU sends SET_FEATURES before GET_INFLIGHT_FD (vhost_dev_prepare_inflight)
    so that the back-end knows which layout to size."""
    fe = packed_frontend()
    try:
        info, fd = get_inflight(fe, num_queues=2)
        assert info.mmap_size == 2 * REGION_128
        os.close(fd)
        fe.send(R.SET_FEATURES, U64(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED))
        info, fd = get_inflight(fe, num_queues=2)
        assert info.mmap_size == 2 * REGION_128_PACKED
        assert fe.call(R.SET_INFLIGHT_FD, info, [fd], need_reply=True) == 0
        assert fe.backend.vrings[1].vq.inflight[1:] == (REGION_128_PACKED, REGION_128_PACKED)
    finally:
        fe.close()
