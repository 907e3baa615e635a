"""Packed virtqueues (virtio 1.2 section 2.8, nitro_vring_packed.c) behind
the same ring API as split ones: blk requests served by blk_serve and by an
engine worker, wrap counters over many laps, out-of-order completion,
indirect tables, event suppression both ways, every guest fault kind, the
vhost-user base encoding, and unpop through a net RX delivery."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator

import pytest

from nitro import _datapath
from nitro._datapath import (
    FrontendError,
    GuestFault,
    Ring,
    Virtqueue,
    blk_serve,
)
from nitro.vpc import gateway_mac
from nitro.vpc import packets as pk
from tests.ringlayout import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_F_RING_PACKED,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from tests.unit.test_engine import wait_used
from tests.unit.test_net_switch import A_IP, B_IP, F_MRG, HDR, A, B, icmp, ip4
from tests.unit.virtq import (
    Buf,
    FakeGuest,
    MiB,
    PackedRing,
    blk_header,
    blk_req,
    fill,
    guarded_guest,
    status_of,
)

GPA = 0x1000_0000

WRAP = 1 << 15


@pytest.fixture
def guest() -> Iterator[FakeGuest]:
    with guarded_guest(GPA, 4 * MiB) as g:
        yield g


def write_req(guest: FakeGuest, sector: int):
    return blk_req(guest, VIRTIO_BLK_T_OUT, sector=sector, out=fill(512, seed=sector))


# -- serving ---------------------------------------------------------------------

@pytest.mark.parametrize("num", [4, 8])
def test_requests_are_served_over_many_laps_of_the_ring(guest, params, stats, disk, num):
    """3-descriptor lists on rings of 4 and 8: the lists straddle the end of
    the ring and the wrap counters flip at every lap, on both sides."""
    with PackedRing(guest, num=num) as ring:
        done = 0
        for _ in range(40):
            batch = [write_req(guest, done + k) for k in range(num // 4)]
            ids = [ring.add_chain(r.bufs) for r in batch]
            assert blk_serve(ring.vq, params, stats, 0) == len(batch)
            used = ring.take_used()
            assert sorted(i for i, _ in used) == sorted(ids)
            assert all(length == 1 for _, length in used)  # the status byte
            assert all(status_of(guest, r) == VIRTIO_BLK_S_OK for r in batch)
            done += len(batch)
        assert done * 3 > 10 * num  # many laps
        for s in range(done):
            assert os.pread(disk, 512, s * 512) == fill(512, seed=s)
        # GET_VRING_BASE: avail and used positions (with wrap counters) agree.
        pos = (done * 3) % num | (WRAP if (done * 3 // num) % 2 == 0 else 0)
        assert ring.vq.base == pos | pos << 16
        assert ring.vq.stats()["chains"] == done


def test_a_read_lands_in_guest_memory_and_get_id_is_answered(guest, params, stats, disk):
    os.pwrite(disk, fill(4096, seed=3), 8 * 512)
    with PackedRing(guest, num=16) as ring:
        read = blk_req(guest, VIRTIO_BLK_T_IN, sector=8, in_len=4096)
        get_id = blk_req(guest, VIRTIO_BLK_T_GET_ID, in_len=20)
        ids = [ring.add_chain(read.bufs), ring.add_chain(get_id.bufs)]
        assert blk_serve(ring.vq, params, stats, 0) == 2
        assert sorted(ring.take_used()) == sorted([(ids[0], 4097), (ids[1], 21)])
        assert guest.read(read.data_gpa, 4096) == fill(4096, seed=3)


def test_out_of_order_completion_on_an_engine_worker(guest, params, stats):
    """The 32 KiB read goes to io_uring, the GET_ID is answered in the same
    pass (within its 64 KiB of io_uring I/O): its used descriptor is written
    first, at the read's slot, and the driver skips by each id's list size to
    find the next one."""
    e = _datapath.Engine(1)
    ring = PackedRing(guest, num=16)
    read = blk_req(guest, VIRTIO_BLK_T_IN, sector=0, in_len=32 * 1024)
    get_id = blk_req(guest, VIRTIO_BLK_T_GET_ID, in_len=20)
    read_id, id_id = ring.add_chain(read.bufs), ring.add_chain(get_id.bufs)
    r = Ring.blk(ring.vq, params, stats)
    e.attach(r, 0)
    try:
        assert [i for i, _ in wait_used(ring, 2)] == [id_id, read_id]
        for k in range(20):  # and it keeps serving kicked requests
            w = write_req(guest, k)
            i = ring.add_chain(w.bufs)
            ring.kick()
            assert wait_used(ring, 1) == [(i, 1)]
    finally:
        e.detach(r)
        r.close()
        e.close()
        ring.close()


def test_indirect_tables(guest, params, stats, disk):
    with PackedRing(guest, num=4, features=VIRTIO_RING_F_INDIRECT_DESC) as ring:
        for k in range(6):  # more requests than ring slots: laps with one slot each
            w = write_req(guest, 20 + k)
            i = ring.add_chain(w.bufs, indirect=True)
            assert blk_serve(ring.vq, params, stats, 0) == 1
            assert ring.take_used() == [(i, 1)]
            assert os.pread(disk, 512, (20 + k) * 512) == fill(512, seed=20 + k)


def test_buffer_ids_come_from_the_last_descriptor_of_a_list(guest, params, stats):
    """2.8.6: the id is in the last descriptor; others may hold anything."""
    with PackedRing(guest, num=8) as ring:
        req = blk_req(guest, VIRTIO_BLK_T_FLUSH)
        i = ring.add_chain(req.bufs, id_=5)
        addr, length, _, flags = ring.read_desc(0)
        ring.write_desc(0, addr, length, 0x7777, 0)  # head's id is junk
        ring.guest.write(ring.desc + 14, struct.pack("<H", flags))
        assert blk_serve(ring.vq, params, stats, 0) == 1
        assert ring.take_used() == [(i, 1)]


# -- event suppression -------------------------------------------------------------

def flush_reqs(guest: FakeGuest, n: int):
    return [blk_req(guest, VIRTIO_BLK_T_FLUSH) for _ in range(n)]  # 2 descriptors each


def test_the_device_asks_for_kicks_at_its_next_descriptor_with_event_idx(guest, params, stats):
    with PackedRing(guest, num=4, features=VIRTIO_RING_F_EVENT_IDX) as ring:
        for k, req in enumerate(flush_reqs(guest, 5)):
            ring.add_chain(req.bufs)
            assert blk_serve(ring.vq, params, stats, 0) == 1
            ring.take_used()
            pos = 2 * (k + 1)
            assert ring.device_event() == (pos % 4 | (WRAP if (pos // 4) % 2 == 0 else 0),
                                           RING_EVENT_FLAGS_DESC)


def test_without_event_idx_kicks_are_simply_enabled(guest, params, stats):
    with PackedRing(guest, num=4) as ring:
        ring.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        assert blk_serve(ring.vq, params, stats, 0) == 1
        assert ring.device_event()[1] == RING_EVENT_FLAGS_ENABLE


def test_driver_flags_enable_and_disable_calls(guest, params, stats):
    with PackedRing(guest, num=8) as ring:
        ring.set_driver_event(RING_EVENT_FLAGS_DISABLE)
        for req in flush_reqs(guest, 3):
            ring.add_chain(req.bufs)
            blk_serve(ring.vq, params, stats, 0)
        assert ring.calls() == 0 and len(ring.take_used()) == 3
        ring.set_driver_event(RING_EVENT_FLAGS_ENABLE)
        ring.add_chain(flush_reqs(guest, 1)[0].bufs)
        blk_serve(ring.vq, params, stats, 0)
        assert ring.calls() == 1


@pytest.mark.parametrize("event,called_after", [
    ((4, 1), [1, 3]),      # slot 4 of the first lap: used by the 3rd request
    ((0, 0), [1, 5]),      # slot 0 of the second lap (wrap counter 0): the 5th
    ((6, 1), [1, 4]),      # slot 6: inside the 4th request's list (slots 6-7)
])
def test_a_descriptor_specific_event_calls_when_that_slot_is_used(
        guest, params, stats, event, called_after):
    """RING_EVENT_FLAGS_DESC with EVENT_IDX (2.8.10): one call when the used
    position passes (off, wrap); the first call after a start is always made
    (the device cannot know what the driver saw)."""
    with PackedRing(guest, num=8, features=VIRTIO_RING_F_EVENT_IDX) as ring:
        ring.set_driver_event(RING_EVENT_FLAGS_DESC, *event)
        called = []
        for k, req in enumerate(flush_reqs(guest, 6), start=1):
            ring.add_chain(req.bufs)
            assert blk_serve(ring.vq, params, stats, 0) == 1
            ring.take_used()
            if ring.calls():
                called.append(k)
        assert called == called_after


# -- guest faults -------------------------------------------------------------------

def _continuation_not_available(ring: PackedRing, guest: FakeGuest) -> None:
    ring.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs, publish=False)
    addr, length, id_, _ = ring.read_desc(1)
    ring.write_desc(1, addr, length, id_, 0)  # never made available
    ring.publish()


def _more_in_flight_than_the_ring(ring: PackedRing, guest: FakeGuest) -> None:
    # SET_VRING_BASE: the used half a lap and one slot behind the avail half.
    ring.vq.base = 2 | WRAP | 1 << 16
    ring.avail_pos = 2
    ring.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)


def _id_out_of_range(ring: PackedRing, guest: FakeGuest) -> None:
    ring.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs, id_=ring.num)


def _id_already_in_flight(ring: PackedRing, guest: FakeGuest) -> None:
    ring.add_chain(blk_req(guest, VIRTIO_BLK_T_IN, in_len=4096).bufs, id_=3)
    ring.sizes.pop(3)
    ring.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs, id_=3)


def _list_longer_than_the_ring(ring: PackedRing, guest: FakeGuest) -> None:
    buf = guest.alloc(16)
    ring.place([(buf, 16, VRING_DESC_F_NEXT)] * ring.num)


def _buffer_outside_memory(ring: PackedRing, guest: FakeGuest) -> None:
    ring.place([(0xDEAD_0000, 16, 0)])


def _indirect_not_negotiated(ring: PackedRing, guest: FakeGuest) -> None:
    ring.vq.set_features(VIRTIO_F_RING_PACKED)
    ring.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs, indirect=True)


def _indirect_chained(ring: PackedRing, guest: FakeGuest) -> None:
    table = guest.alloc(32)
    ring.place([(table, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT),
                (guest.alloc(1), 1, VRING_DESC_F_WRITE)])


def _indirect_inside_a_list(ring: PackedRing, guest: FakeGuest) -> None:
    ring.place([(guest.alloc(16), 16, VRING_DESC_F_NEXT),
                (guest.alloc(32), 32, VRING_DESC_F_INDIRECT)])


def _indirect_table_of_odd_size(ring: PackedRing, guest: FakeGuest) -> None:
    ring.place([(guest.alloc(32), 24, VRING_DESC_F_INDIRECT)])


def _readable_after_writable(ring: PackedRing, guest: FakeGuest) -> None:
    ring.place([(guest.alloc(16), 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT),
                (guest.alloc(16), 16, 0)])


def _request_without_status(ring: PackedRing, guest: FakeGuest) -> None:
    hdr = guest.alloc(16)
    guest.write(hdr, blk_header(VIRTIO_BLK_T_IN))
    ring.place([(hdr, 16, 0)])


FAULTS: list[tuple[Callable[[PackedRing, FakeGuest], None], str]] = [
    (_continuation_not_available, "avail_idx"),
    (_more_in_flight_than_the_ring, "avail_idx"),
    (_id_out_of_range, "desc_index"),
    (_id_already_in_flight, "desc_index"),
    (_list_longer_than_the_ring, "desc_loop"),
    (_buffer_outside_memory, "desc_addr"),
    (_indirect_not_negotiated, "indirect"),
    (_indirect_chained, "indirect"),
    (_indirect_inside_a_list, "indirect"),
    (_indirect_table_of_odd_size, "indirect"),
    (_readable_after_writable, "desc_order"),
    (_request_without_status, "request"),
]


@pytest.mark.parametrize("corrupt,kind", FAULTS, ids=[f.__name__.strip("_") for f, _ in FAULTS])
def test_every_guest_fault_kind_on_a_packed_ring(guest, params, stats, corrupt, kind):
    with PackedRing(guest, num=8, features=VIRTIO_RING_F_INDIRECT_DESC) as ring:
        corrupt(ring, guest)
        with pytest.raises(GuestFault) as e:
            blk_serve(ring.vq, params, stats, 0)
        assert e.value.kind == kind and ring.vq.fault == kind
        assert ring.vq.stats()["faults"][kind] == 1
        with pytest.raises(GuestFault):  # broken until reset
            blk_serve(ring.vq, params, stats, 0)


def test_every_fault_kind_is_reachable_on_a_packed_ring():
    # inflight: test_datapath_inflight_packed.py; memory (a truncated memfd,
    # either layout): test_guest_memory.py; eventfd (a jammed kick or call
    # fd, either layout): tests/integration/test_daemon_blk.py
    kinds = {k for _, k in FAULTS} | {"inflight", "memory", "eventfd"}
    assert kinds == set(_datapath.FAULT_NAMES.values())


# -- control plane: base encoding, layout changes ---------------------------------------

def test_base_carries_both_positions_and_wrap_counters():
    vq = Virtqueue(0)
    try:
        vq.set_features(VIRTIO_F_RING_PACKED)
        assert vq.base == WRAP | WRAP << 16  # a fresh packed ring: slot 0, wrap 1
        vq.set_num(8)
        vq.base = 5 | (3 | WRAP) << 16
        assert vq.base == 5 | (3 | WRAP) << 16
        vq.base = 6 | WRAP  # DPDK's virtio-user: 16 bits, used = avail
        assert vq.base == (6 | WRAP) * 0x10001
        for bad in (8, 2 | 9 << 16, 1 << 32):
            with pytest.raises(FrontendError):
                vq.base = bad
        vq.set_features(0)  # back to split: the base starts over
        assert vq.base == 0
        with pytest.raises(FrontendError):
            vq.base = 0x10000
    finally:
        vq.close()


def test_a_layout_change_checks_the_ring_addresses_again(guest, params, stats):
    with PackedRing(guest, num=8) as ring:
        odd = guest.alloc(32, align=4) + 2  # fine for a split avail ring, not for packed
        vq = Virtqueue(1)
        try:
            vq.set_num(8)
            vq.set_addr(guest.mem, guest.uaddr(ring.desc), guest.uaddr(odd),
                        guest.uaddr(guest.alloc(6 + 8 * 8, align=4)))
            with pytest.raises(FrontendError):
                vq.set_features(VIRTIO_F_RING_PACKED)
            with pytest.raises(FrontendError):  # the addresses were forgotten
                blk_serve(vq, params, stats, 0)
        finally:
            vq.close()


# -- net: RX delivery (push_batch for merged buffers, unpop, disable_notify) -------------

class PackedNet:
    """Ports A (0) and B (1); B's RX ring is packed."""

    def __init__(self, guest: FakeGuest) -> None:
        from tests.unit.virtq import SplitRing
        self.guest = guest
        self.sw = _datapath.Switch()
        self.sw.add_vpc(0, gateway_mac("blue"), ip4("10.0.0.1"), 1500)
        self.sw.add_port(0, 0, pk.mac_bytes(A), ip4(A_IP))
        self.sw.add_port(1, 0, pk.mac_bytes(B), ip4(B_IP))
        self.tx = SplitRing(guest, num=64)
        self.rx = PackedRing(guest, num=8)
        self.bufs: dict[int, int] = {}

    def add_rx(self, size: int) -> int:
        gpa = self.guest.alloc(size)
        i = self.rx.add_chain([Buf(gpa, size, writable=True)])
        self.bufs[i] = gpa
        return i

    def send(self, frame: bytes) -> None:
        gpa = self.guest.alloc(HDR + len(frame))
        self.guest.write(gpa, bytes(HDR) + frame)
        self.tx.add_chain([Buf(gpa, HDR + len(frame))])
        _datapath.net_tx_serve(self.sw, 0, self.tx.vq, 0)

    def close(self) -> None:
        self.sw.detach_rx(1, 0)
        self.tx.close()
        self.rx.close()
        self.sw.close()


@pytest.fixture
def net(guest) -> Iterator[PackedNet]:
    n = PackedNet(guest)
    yield n
    n.close()


def test_an_rx_ring_gets_kicks_disabled_and_frames_delivered(net):
    for _ in range(4):
        net.add_rx(2048)
    net.sw.set_port_features(1, 1 << 32)
    net.sw.attach_rx(1, 0, net.rx.vq)
    assert net.rx.device_event()[1] == RING_EVENT_FLAGS_DISABLE
    frame = icmp(size=100)
    for _ in range(10):  # more frames than buffers over time: laps
        net.send(frame)
        [(i, length)] = net.rx.take_used()
        assert net.guest.read(net.bufs[i] + HDR, length - HDR) == frame
        net.add_rx(2048)


def test_a_frame_that_does_not_fit_gives_its_buffer_back(net):
    """Without MRG_RXBUF one buffer must hold the frame: the device pops a
    small one, finds it too small and unpops it; the next frame fits it."""
    small = net.add_rx(200)
    net.sw.set_port_features(1, 1 << 32)
    net.sw.attach_rx(1, 0, net.rx.vq)
    net.send(icmp(size=400))
    assert net.rx.take_used() == []
    assert net.sw.port_stats(1)["drops"]["no_rx_buffer"] == 1
    frame = icmp(size=50)
    net.send(frame)
    assert net.rx.take_used() == [(small, HDR + len(frame))]


def test_merged_buffers_are_published_together(net):
    ids = [net.add_rx(512) for _ in range(4)]
    net.sw.set_port_features(1, 1 << 32 | F_MRG)
    net.sw.attach_rx(1, 0, net.rx.vq)
    frame = icmp(size=1200)
    net.send(frame)
    used = net.rx.take_used()
    assert [i for i, _ in used] == ids[:3]
    data = b"".join(net.guest.read(net.bufs[i], n) for i, n in used)
    assert data[HDR:] == frame and struct.unpack_from("<H", data, 10)[0] == 3
