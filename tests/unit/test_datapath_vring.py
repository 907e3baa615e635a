"""Split virtqueue (nitro_vring.c) driven through nitro_blk_serve: setup
checks, every guest fault kind, notification suppression, and a property
test with hostile descriptor tables."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nitro._datapath import (
    FAULT_NAMES,
    BlkParams,
    BlkStats,
    FrontendError,
    GuestFault,
    Virtqueue,
    blk_serve,
)
from tests.unit.virtq import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    Buf,
    FakeGuest,
    MiB,
    SplitRing,
    blk_header,
    blk_req,
    disk_file,
    guarded_guest,
    status_of,
)

GPA = 0x1000_0000
NUM = 8
CAPACITY = 128  # sectors
U64 = 2**64


@pytest.fixture
def disk() -> Iterator[int]:
    with disk_file(CAPACITY * 512) as fd:
        yield fd


@pytest.fixture
def guest() -> Iterator[FakeGuest]:
    with guarded_guest(GPA, 2 * MiB) as g:
        yield g


@pytest.fixture
def params(disk: int) -> Iterator[BlkParams]:
    p = BlkParams(disk, CAPACITY, max_discard_sectors=CAPACITY,
                  max_write_zeroes_sectors=CAPACITY, serial=b"vring-test")
    yield p
    p.close()


def make_ring(guest: FakeGuest, features: int = 0, **kw: object) -> SplitRing:
    return SplitRing(guest, num=NUM, features=features, **kw)  # type: ignore[arg-type]


# -- setup checks --------------------------------------------------------------

@pytest.mark.parametrize("num", [0, 3, 2048, 100])
def test_set_num_rejects_bad_sizes(num: int) -> None:
    vq = Virtqueue(0)
    with pytest.raises(FrontendError):
        vq.set_num(num)
    vq.close()


def test_set_addr_checks(guest: FakeGuest) -> None:
    vq = Virtqueue(1)
    u = guest.uaddr(GPA)
    with pytest.raises(FrontendError):  # no size yet
        vq.set_addr(guest.mem, u, u + 4096, u + 8192)
    vq.set_num(NUM)
    for desc, avail, used in [
        (u + 8, u + 4096, u + 8192),  # desc not 16-aligned
        (u, u + 4097, u + 8192),  # avail not 2-aligned
        (u, u + 4096, u + 8194),  # used not 4-aligned
        (u + 2 * MiB - 16, u + 4096, u + 8192),  # desc table leaves memory
        (u, u + 4096, u + 2 * MiB - 8),  # used ring leaves memory
        (0, u + 4096, u + 8192),  # not a frontend address at all
        (u, u + 4096, u + 4096),  # used over avail: completions would be requests
        (u, u + 4096, u + 4096 + 4 + 2 * NUM),  # used starts inside avail's tail
        (u, u + 4096, u),  # used over the descriptor table
        (u, u + 4096, u + 16 * NUM - 8),  # used starts inside the table's end
    ]:
        with pytest.raises(FrontendError):
            vq.set_addr(guest.mem, desc, avail, used)
    vq.set_addr(guest.mem, u, u + 4096, u + 8192)
    vq.close()
    vq.close()


def test_serve_requires_a_configured_queue(params: BlkParams, stats: BlkStats) -> None:
    vq = Virtqueue(0)
    with pytest.raises(FrontendError):
        blk_serve(vq, params, stats, 0)
    vq.close()


def test_base_round_trip_and_reset(guest: FakeGuest, params: BlkParams,
                                   stats: BlkStats) -> None:
    with make_ring(guest) as r:
        r.vq.base = 65535
        assert r.vq.base == 65535
        r.vq.reset()
        assert r.vq.base == 0
        with pytest.raises(FrontendError):  # addresses forgotten
            blk_serve(r.vq, params, stats, 0)


def test_set_mem_retranslates(guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    with make_ring(guest) as r:
        req = blk_req(guest, VIRTIO_BLK_T_FLUSH)
        r.add_chain(req.bufs)
        r.vq.set_mem(guest.mem)
        assert blk_serve(r.vq, params, stats, 0) == 1
        with FakeGuest([(GPA, MiB)], uaddr_base=0x5000_0000_0000) as other, \
                pytest.raises(FrontendError):  # rings are not in that table
            r.vq.set_mem(other.mem)
        with pytest.raises(FrontendError):  # and the queue forgot the old one
            blk_serve(r.vq, params, stats, 0)


# -- completing chains ---------------------------------------------------------

def test_chains_complete_across_index_wrap(
        guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    with make_ring(guest) as r:
        r.rebase(65533)
        reqs = [blk_req(guest, VIRTIO_BLK_T_FLUSH) for _ in range(4)]  # 8 descriptors
        heads = [r.add_chain(q.bufs) for q in reqs]
        assert blk_serve(r.vq, params, stats, 0) == 4
        # In flight together (io_uring): any completion order is the device's right.
        assert sorted(r.take_used()) == sorted((h, 1) for h in heads)
        assert r.used_idx() == (65533 + 4) & 0xFFFF
        assert r.vq.base == r.used_idx()
        assert all(status_of(guest, q) == VIRTIO_BLK_S_OK for q in reqs)
        assert r.vq.stats()["chains"] == 4


def test_indirect_chain(guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    with make_ring(guest, VIRTIO_RING_F_INDIRECT_DESC) as r:
        req = blk_req(guest, VIRTIO_BLK_T_IN, 0, in_len=1024)
        head = r.add_chain(req.bufs, indirect=True)
        assert blk_serve(r.vq, params, stats, 0) == 1
        assert r.take_used() == [(head, 1025)]
        assert status_of(guest, req) == VIRTIO_BLK_S_OK


def test_direct_descriptors_then_indirect_table(
        guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    # 2.7.5.3.2: zero or more direct descriptors, then one indirect.
    with make_ring(guest, VIRTIO_RING_F_INDIRECT_DESC) as r:
        req = blk_req(guest, VIRTIO_BLK_T_IN, 0, in_len=512)
        table = guest.alloc(32)
        r.write_desc(0, req.bufs[1].gpa, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1, table)
        r.write_desc(1, req.status_gpa, 1, VRING_DESC_F_WRITE, 0, table)
        r.write_desc(0, req.bufs[0].gpa, 16, VRING_DESC_F_NEXT, 1)
        r.write_desc(1, table, 32, VRING_DESC_F_INDIRECT)
        r.publish(0)
        assert blk_serve(r.vq, params, stats, 0) == 1
        assert r.take_used() == [(0, 513)]


def test_zero_length_descriptors_are_skipped(
        guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    with make_ring(guest) as r:
        req = blk_req(guest, VIRTIO_BLK_T_FLUSH)
        bufs = [req.bufs[0], Buf(0xDEAD_0000, 0), req.bufs[1], Buf(0, 0, writable=True)]
        r.add_chain(bufs)
        assert blk_serve(r.vq, params, stats, 0) == 1
        assert status_of(guest, req) == VIRTIO_BLK_S_OK


def test_descriptor_spanning_adjacent_regions_is_split(
        disk: int, params: BlkParams, stats: BlkStats) -> None:
    # Two regions contiguous in guest-physical space but not in the file.
    with FakeGuest([(GPA, MiB), (GPA + MiB, MiB)]) as g, make_ring(g) as r:
        os.pwrite(disk, bytes(range(256)) * 4, 0)
        hdr = g.alloc(16)
        g.write(hdr, blk_header(VIRTIO_BLK_T_IN, 0))
        data = GPA + MiB - 512  # 512 bytes in region 0, 512 in region 1
        status = g.alloc(1, align=1)
        r.add_chain([Buf(hdr, 16), Buf(data, 1024, True), Buf(status, 1, True)])
        assert blk_serve(r.vq, params, stats, 0) == 1
        assert g.read(data, 512) + g.read(GPA + MiB, 512) == bytes(range(256)) * 4
        assert g.read(status, 1) == b"\0"
        assert g.guards_intact()


# -- guest faults --------------------------------------------------------------

Hostile = Callable[[SplitRing, FakeGuest], None]


def _flush_descs(r: SplitRing, g: FakeGuest) -> tuple[int, int]:
    """gpa of a FLUSH header and of a status byte."""
    req = blk_req(g, VIRTIO_BLK_T_FLUSH)
    return req.bufs[0].gpa, req.status_gpa


def avail_idx_too_far(r: SplitRing, g: FakeGuest) -> None:
    r.set_avail_idx(r.avail_idx + NUM + 1)


def avail_idx_backwards(r: SplitRing, g: FakeGuest) -> None:
    r.set_avail_idx(r.avail_idx - 1)


def head_out_of_range(r: SplitRing, g: FakeGuest) -> None:
    r.publish(NUM)


def next_out_of_range(r: SplitRing, g: FakeGuest) -> None:
    hdr, _ = _flush_descs(r, g)
    r.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, NUM)
    r.publish(0)


def buffer_outside_memory(r: SplitRing, g: FakeGuest) -> None:
    hdr, _ = _flush_descs(r, g)
    r.add_chain([Buf(hdr, 16), Buf(0x9000_0000, 1, True)])


def buffer_running_off_region(r: SplitRing, g: FakeGuest) -> None:
    hdr, _ = _flush_descs(r, g)
    r.add_chain([Buf(hdr, 16), Buf(GPA + 2 * MiB - 8, 16, True)])


def buffer_wrapping_address_space(r: SplitRing, g: FakeGuest) -> None:
    hdr, _ = _flush_descs(r, g)
    r.add_chain([Buf(hdr, 16), Buf(U64 - 8, 16, True)])


def chain_cycle(r: SplitRing, g: FakeGuest) -> None:
    hdr, _ = _flush_descs(r, g)
    r.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1)
    r.write_desc(1, hdr, 16, VRING_DESC_F_NEXT, 0)
    r.publish(0)


def chain_self_loop(r: SplitRing, g: FakeGuest) -> None:
    hdr, _ = _flush_descs(r, g)
    r.write_desc(3, hdr, 16, VRING_DESC_F_NEXT, 3)
    r.publish(3)


def _indirect(r: SplitRing, g: FakeGuest, length: int | None = None, flags: int = 0,
              table: int | None = None, entries: int = 2) -> int:
    """A FLUSH request in an indirect table; returns the table's gpa."""
    hdr, status = _flush_descs(r, g)
    if table is None:
        table = g.alloc(16 * max(entries, 2))
        r.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1, table)
        r.write_desc(1, status, 1, VRING_DESC_F_WRITE, 0, table)
    r.write_desc(0, table, 32 if length is None else length, VRING_DESC_F_INDIRECT | flags)
    r.publish(0)
    return table


def indirect_without_feature(r: SplitRing, g: FakeGuest) -> None:
    r.vq.set_features(0)
    _indirect(r, g)


def indirect_len_zero(r: SplitRing, g: FakeGuest) -> None:
    _indirect(r, g, length=0)


def indirect_len_not_multiple(r: SplitRing, g: FakeGuest) -> None:
    _indirect(r, g, length=17)


def indirect_with_next(r: SplitRing, g: FakeGuest) -> None:
    _indirect(r, g, flags=VRING_DESC_F_NEXT)


def indirect_outside_memory(r: SplitRing, g: FakeGuest) -> None:
    _indirect(r, g, table=0x9000_0000)


def indirect_too_large(r: SplitRing, g: FakeGuest) -> None:
    _indirect(r, g, length=16 * 1025, entries=1025)


def indirect_nested(r: SplitRing, g: FakeGuest) -> None:
    table = _indirect(r, g)
    r.write_desc(0, table, 32, VRING_DESC_F_INDIRECT, 0, table)


def indirect_cycle(r: SplitRing, g: FakeGuest) -> None:
    table = _indirect(r, g)
    hdr, _ = _flush_descs(r, g)
    r.write_desc(1, hdr, 16, VRING_DESC_F_NEXT, 0, table)
    r.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1, table)


def indirect_next_out_of_table(r: SplitRing, g: FakeGuest) -> None:
    table = _indirect(r, g)
    hdr, _ = _flush_descs(r, g)
    r.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 2, table)


def readable_after_writable(r: SplitRing, g: FakeGuest) -> None:
    hdr, status = _flush_descs(r, g)
    r.add_chain([Buf(status, 1, True), Buf(hdr, 16)])


def readable_after_writable_via_indirect(r: SplitRing, g: FakeGuest) -> None:
    hdr, status = _flush_descs(r, g)
    table = g.alloc(16)
    r.write_desc(0, hdr, 16, 0, 0, table)
    r.write_desc(0, status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
    r.write_desc(1, table, 16, VRING_DESC_F_INDIRECT)
    r.publish(0)


def readable_after_empty_writable(r: SplitRing, g: FakeGuest) -> None:
    hdr, status = _flush_descs(r, g)
    r.add_chain([Buf(status, 0, True), Buf(hdr, 16), Buf(status, 1, True)])


def header_too_short(r: SplitRing, g: FakeGuest) -> None:
    hdr, status = _flush_descs(r, g)
    r.add_chain([Buf(hdr, 15), Buf(status, 1, True)])


def no_status_byte(r: SplitRing, g: FakeGuest) -> None:
    hdr, _ = _flush_descs(r, g)
    r.add_chain([Buf(hdr, 16)])


def no_header_at_all(r: SplitRing, g: FakeGuest) -> None:
    _, status = _flush_descs(r, g)
    r.add_chain([Buf(status, 1, True)])


@pytest.mark.parametrize(("hostile", "kind"), [
    (avail_idx_too_far, "avail_idx"),
    (avail_idx_backwards, "avail_idx"),
    (head_out_of_range, "desc_index"),
    (next_out_of_range, "desc_index"),
    (indirect_next_out_of_table, "desc_index"),
    (buffer_outside_memory, "desc_addr"),
    (buffer_running_off_region, "desc_addr"),
    (buffer_wrapping_address_space, "desc_addr"),
    (chain_cycle, "desc_loop"),
    (chain_self_loop, "desc_loop"),
    (indirect_cycle, "desc_loop"),
    (indirect_without_feature, "indirect"),
    (indirect_len_zero, "indirect"),
    (indirect_len_not_multiple, "indirect"),
    (indirect_with_next, "indirect"),
    (indirect_outside_memory, "indirect"),
    (indirect_too_large, "indirect"),
    (indirect_nested, "indirect"),
    (readable_after_writable, "desc_order"),
    (readable_after_writable_via_indirect, "desc_order"),
    (readable_after_empty_writable, "desc_order"),
    (header_too_short, "request"),
    (no_status_byte, "request"),
    (no_header_at_all, "request"),
])
def test_guest_fault_breaks_the_queue(guest: FakeGuest, params: BlkParams, stats: BlkStats,
                                      hostile: Hostile, kind: str) -> None:
    with make_ring(guest, VIRTIO_RING_F_INDIRECT_DESC) as r:
        # One good chain first: it must still complete and be signalled.
        good = blk_req(guest, VIRTIO_BLK_T_FLUSH)
        r.add_chain(good.bufs)
        assert blk_serve(r.vq, params, stats, 0) == 1
        r.take_used()
        r.calls()

        hostile(r, guest)
        with pytest.raises(GuestFault) as info:
            blk_serve(r.vq, params, stats, 0)
        assert info.value.kind == kind
        assert r.vq.fault == kind
        assert r.take_used() == []

        # Broken until reset: a good chain is not served, nor counted twice.
        r.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        with pytest.raises(GuestFault):
            blk_serve(r.vq, params, stats, 0)
        faults = r.vq.stats()["faults"]
        assert faults == {name: int(name == kind) for name in FAULT_NAMES.values()}
        assert r.take_used() == []
        assert stats.snapshot()["inflight"] == 0

        r.vq.reset()
        assert r.vq.fault is None


def test_chains_before_a_fault_complete_and_are_signalled(
        guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    with make_ring(guest) as r:
        good = blk_req(guest, VIRTIO_BLK_T_FLUSH)
        head = r.add_chain(good.bufs)
        r.publish(NUM + 3)  # bad head
        with pytest.raises(GuestFault):
            blk_serve(r.vq, params, stats, 0)
        assert r.take_used() == [(head, 1)]
        assert r.calls() == 1


# -- notifications -------------------------------------------------------------

def test_no_event_idx_honours_no_interrupt(
        guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    with make_ring(guest) as r:
        r.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        assert blk_serve(r.vq, params, stats, 0) == 1
        assert r.calls() == 1

        r.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
        r.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        assert blk_serve(r.vq, params, stats, 0) == 1
        assert r.calls() == 0
        assert r.vq.stats()["calls"] == 1
        # Returning idle leaves kicks enabled for whoever waits next.
        assert r.used_flags() & VRING_USED_F_NO_NOTIFY == 0


def test_one_call_per_batch(guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    # GET_ID completes while the ring is polled: the five are one batch (requests
    # in flight complete in whatever batches the kernel hands back).
    with SplitRing(guest, num=4 * NUM) as r:
        for _ in range(5):
            r.add_chain(blk_req(guest, VIRTIO_BLK_T_GET_ID, in_len=20).bufs)
        assert blk_serve(r.vq, params, stats, 0) == 5
        assert r.calls() == 1


def test_event_idx_suppression(guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    with make_ring(guest, VIRTIO_RING_F_EVENT_IDX) as r:
        r.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        assert blk_serve(r.vq, params, stats, 0) == 1
        assert r.calls() == 1  # first call after set_base is unconditional
        assert r.avail_event() == 1  # "kick me when you publish index 1"

        # The driver wants an interrupt only once used->idx passes 5.
        r.set_used_event(5)
        r.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        assert blk_serve(r.vq, params, stats, 0) == 1  # used idx 1 -> 2
        assert r.calls() == 0

        for _ in range(4):
            r.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        assert blk_serve(r.vq, params, stats, 0) == 4  # 2 -> 6 crosses 5
        assert r.calls() == 1
        assert r.avail_event() == 6

        r.set_used_event(5)  # already passed: no interrupt for 6 -> 7
        r.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        assert blk_serve(r.vq, params, stats, 0) == 1
        assert r.calls() == 0


def test_event_idx_ignores_no_interrupt_flag(
        guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    with make_ring(guest, VIRTIO_RING_F_EVENT_IDX) as r:
        r.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
        r.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        blk_serve(r.vq, params, stats, 0)
        assert r.calls() == 1


def test_no_call_fd_is_fine(guest: FakeGuest, params: BlkParams, stats: BlkStats) -> None:
    with make_ring(guest, call=False) as r:
        r.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        assert blk_serve(r.vq, params, stats, 0) == 1
        assert r.vq.stats()["calls"] == 0


# -- hostile rings never crash or escape guest memory -------------------------

HDR_AREA = GPA + 64 * 1024  # blk headers the descriptors may point at
TABLE_AREA = GPA + 128 * 1024  # an indirect table the descriptors may point at
BUF_AREA = GPA + 192 * 1024
REGION_END = GPA + MiB

addresses = st.one_of(
    st.sampled_from([HDR_AREA, HDR_AREA + 16, HDR_AREA + 40, TABLE_AREA, BUF_AREA,
                     BUF_AREA + 4095, REGION_END - 1, REGION_END - 512, REGION_END,
                     GPA - 1, 0, U64 - 1, U64 - 16]),
    st.integers(GPA, REGION_END + 64),
    st.integers(0, U64 - 1),
)
lengths = st.one_of(
    st.sampled_from([0, 1, 15, 16, 17, 32, 48, 511, 512, 513, 4096, 2**32 - 1]),
    st.integers(0, 8192),
)
flag_values = st.one_of(
    st.sampled_from([0, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                     VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT]),
    st.integers(0, 0xFFFF),
)
# (which descriptor table, entry, field, new value): applied to a valid layout.
mutations = st.lists(st.one_of(
    st.tuples(st.sampled_from(["ring", "table"]), st.integers(0, 15), st.just(0), addresses),
    st.tuples(st.sampled_from(["ring", "table"]), st.integers(0, 15), st.just(1), lengths),
    st.tuples(st.sampled_from(["ring", "table"]), st.integers(0, 15), st.just(2), flag_values),
    st.tuples(st.sampled_from(["ring", "table"]), st.integers(0, 15), st.just(3),
              st.integers(0, 20)),
    st.tuples(st.just("head"), st.integers(0, 15), st.just(0), st.integers(0, 20)),
), max_size=4)
headers = st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 2, 0x8000_0000]),
                    st.one_of(st.integers(0, CAPACITY + 2), st.just(U64 - 1)))


def _valid_layout(num: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Chains of header + (data and status) descriptors, and an indirect
    table holding one more such chain; every head is a valid chain."""
    ring = [[0, 0, 0, 0] for _ in range(16)]
    for c in range(max(num // 2, 1)):
        if num == 1:
            ring[0] = [TABLE_AREA, 32, VRING_DESC_F_INDIRECT, 0]
            break
        ring[2 * c] = [HDR_AREA + 16 * (c % 3), 16, VRING_DESC_F_NEXT, 2 * c + 1]
        ring[2 * c + 1] = [BUF_AREA + 1024 * c, 513, VRING_DESC_F_WRITE, 0]
    table = [[HDR_AREA, 16, VRING_DESC_F_NEXT, 1], [BUF_AREA + 20 * 1024, 513, VRING_DESC_F_WRITE, 0]]
    table += [[0, 0, 0, 0] for _ in range(14)]
    heads = [(2 * i) % num if num > 1 else 0 for i in range(16)]
    return ring, table, heads


@settings(max_examples=500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    num=st.sampled_from([1, 2, 4, 8, 16]),
    features=st.sampled_from([0, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX,
                              VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX]),
    muts=mutations,
    base=st.sampled_from([0, 1, 65530, 65535]),
    data=st.data(),
    hdrs=st.lists(headers, min_size=3, max_size=3),
    payload=st.binary(min_size=0, max_size=64),
)
def test_hostile_rings_complete_or_fault(
        num: int, features: int, muts: list[tuple[str, int, int, int]], base: int,
        data: st.DataObject, hdrs: list[tuple[int, int]], payload: bytes) -> None:
    # Mostly a plausible number of new chains, sometimes any avail->idx.
    pending = data.draw(st.one_of(st.integers(1, num), st.integers(1, num),
                                  st.integers(0, 65535)), label="pending")
    ring, table, heads = _valid_layout(num)
    for where, i, field, value in muts:
        if where == "head":
            heads[i] = value
        else:
            (ring if where == "ring" else table)[i][field] = value
    fd, path = tempfile.mkstemp(prefix="nitro-prop-")
    os.unlink(path)
    with FakeGuest([(GPA, MiB)]) as g, SplitRing(g, num=num, features=features) as r:
        params = BlkParams(fd, CAPACITY, max_discard_sectors=8, max_write_zeroes_sectors=8)
        stats = BlkStats()
        try:
            for i, (type_, sector) in enumerate(hdrs):
                g.write(HDR_AREA + 16 * i, blk_header(type_, sector))
            g.write(HDR_AREA + 48, payload)
            for i, desc in enumerate(ring[:num]):
                r.write_desc(i, *desc)
            for i, desc in enumerate(table):
                r.write_desc(i, *desc, table=TABLE_AREA)
            r.rebase(base)
            for i in range(num):
                g.write(r.avail + 4 + 2 * i, struct.pack("<H", heads[i]))
            r.set_avail_idx(base + pending)

            try:
                done = blk_serve(r.vq, params, stats, 0)
            except GuestFault as e:
                event(f"fault {e.kind}")
                assert r.vq.fault == e.kind
                assert sum(r.vq.stats()["faults"].values()) == 1
            else:
                event("completed" if done else "empty")
                assert pending <= num
                assert done == pending
                assert r.vq.fault is None
                assert r.vq.base == (base + pending) & 0xFFFF
            completed = r.vq.stats()["chains"]
            assert r.used_idx() == (base + completed) & 0xFFFF
            assert sum(op["requests"] for op in stats.snapshot()["ops"].values()) == completed
            assert stats.snapshot()["inflight"] == 0
            assert g.guards_intact()
            assert os.fstat(fd).st_size <= CAPACITY * 512
        finally:
            params.close()
            stats.close()
            os.close(fd)
