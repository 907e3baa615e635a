"""Inflight I/O tracking with packed virtqueues (vhost-user.rst "Inflight
I/O tracking", QueueRegionPacked): what a served ring leaves in the region,
hostile regions, and a backend SIGKILLed while it serves, restarted with the
stale base QEMU sends after a crash (a packed ring keeps no used index in
guest memory: the region is the truth)."""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Iterator

import pytest

from nitro._datapath import BlkParams, BlkStats, GuestFault, Virtqueue, blk_serve
from tests.ringlayout import (
    VIRTIO_BLK_S_OK,
    VIRTIO_F_RING_PACKED,
)
from tests.unit.test_datapath_inflight import CAPACITY, write_req
from tests.unit.virtq import (
    FakeGuest,
    InflightBuffer,
    MiB,
    PackedRing,
    crash,
    fill,
    fork_server,
    guarded_guest,
    status_of,
)

GPA = 0x1000_0000
NUM = 16
# QueueRegionPacked without desc[]: features, version, desc_num, free_head,
# old_free_head, used_idx, old_used_idx, used_wrap_counter, old_used_wrap_counter.
HEADER = struct.Struct("<QHHHHHHBB7x")
ENTRY = 32  # DescStatePacked
STALE_BASE = 0x8000_8000  # QEMU's view of a packed ring it never saw move


class PackedRegion(InflightBuffer):
    """A packed ring's inflight region (QueueRegionPacked)."""

    def __init__(self, queue_size: int = NUM) -> None:
        super().__init__(queue_size, packed=True)

    def header(self) -> dict[str, int]:
        names = ("features", "version", "desc_num", "free_head", "old_free_head",
                 "used_idx", "old_used_idx", "used_wrap", "old_used_wrap")
        return dict(zip(names, HEADER.unpack_from(self.mm, 0)))

    def set_header(self, **kw: int) -> None:
        h = self.header() | kw
        HEADER.pack_into(self.mm, 0, *h.values())

    def marked(self, num: int = NUM) -> list[int]:
        return [i for i in range(num) if self.mm[32 + ENTRY * i]]


@pytest.fixture
def guest() -> Iterator[FakeGuest]:
    with guarded_guest(GPA, 4 * MiB) as g:
        yield g


@pytest.fixture
def region() -> Iterator[PackedRegion]:
    r = PackedRegion()
    yield r
    r.close()


def restarted(ring: PackedRing, region: PackedRegion, base: int = STALE_BASE) -> Virtqueue:
    """A new backend's queue on the same ring and region, set up as QEMU
    does after a crash: features first, then size, base, addresses."""
    vq = Virtqueue(0)
    vq.set_features(VIRTIO_F_RING_PACKED)
    vq.set_num(ring.num)
    vq.base = base
    vq.set_addr(ring.guest.mem, ring.guest.uaddr(ring.desc), ring.guest.uaddr(ring.driver),
                ring.guest.uaddr(ring.device))
    vq.set_fds(ring.kick_fd, ring.call_fd)
    region.attach(vq)
    return vq


def test_a_served_ring_leaves_a_committed_region(guest, params, stats, region):
    with PackedRing(guest, num=NUM) as ring:
        region.attach(ring.vq)
        for k in range(7):  # 21 descriptors: past the end of the 16-slot ring
            ids = [ring.add_chain(write_req(guest, k).bufs)]
            assert blk_serve(ring.vq, params, stats, 0) == 1
            assert [i for i, _ in ring.take_used()] == ids
        h = region.header()
        assert (h["version"], h["desc_num"]) == (1, NUM)
        assert (h["used_idx"], h["used_wrap"]) == (21 % NUM, 0)
        assert (h["old_used_idx"], h["old_used_wrap"]) == (h["used_idx"], h["used_wrap"])
        assert h["free_head"] == h["old_free_head"] < NUM
        assert region.marked() == []
        # A clean restart with the base GET_VRING_BASE gave resubmits nothing.
        base = ring.vq.base
        vq = restarted(ring, region, base)
        try:
            assert blk_serve(vq, params, stats, 0) == 0
            assert vq.base == base and stats.snapshot()["resubmitted"] == 0
        finally:
            vq.close()


def _loop_the_free_list(region: PackedRegion) -> None:
    free = region.header()["free_head"]
    struct.pack_into("<H", region.mm, 32 + ENTRY * free + 2, free)  # next -> itself


@pytest.mark.parametrize("corrupt", [
    {"version": 7}, {"desc_num": NUM // 2}, {"used_idx": NUM}, {"used_wrap": 2},
    {"free_head": NUM + 1}, _loop_the_free_list,
], ids=lambda c: c.__name__.strip("_") if callable(c) else next(iter(c)))
def test_a_hostile_region_is_a_guest_fault(guest, params, stats, region, corrupt):
    with PackedRing(guest, num=NUM) as ring:
        region.attach(ring.vq)
        ring.add_chain(write_req(guest, 1).bufs)
        assert blk_serve(ring.vq, params, stats, 0) == 1
        if callable(corrupt):
            corrupt(region)
        else:
            region.set_header(**corrupt)
        vq = restarted(ring, region)
        try:
            with pytest.raises(GuestFault) as e:
                blk_serve(vq, params, stats, 0)
            assert e.value.kind == "inflight" and vq.fault == "inflight"
        finally:
            vq.close()


def test_sigkill_while_serving_loses_and_repeats_no_completion(guest, disk):
    """As the split test of the same name: a child serves a packed ring, the
    parent plays the driver (lists of 3 descriptors, at most 5 requests
    outstanding, completions out of order), the child is killed at a random
    moment and a new queue takes over with QEMU's stale base. Every request
    is completed exactly once, with its data on disk."""
    rng = random.Random(4321)
    ring = PackedRing(guest, num=64)
    slow = os.open(f"/proc/self/fd/{disk}", os.O_RDWR | os.O_DSYNC | os.O_CLOEXEC)
    params, stats = BlkParams(slow, CAPACITY), BlkStats()
    region = PackedRegion(queue_size=64)
    region.attach(ring.vq)
    outstanding: dict = {}
    done = sector = 0

    def submit_up_to_five() -> None:
        nonlocal sector
        while len(outstanding) < 5:
            req = write_req(guest, sector % CAPACITY)
            outstanding[ring.add_chain(req.bufs)] = (req, sector % CAPACITY)
            sector += 1

    def complete_used() -> int:
        n = 0
        for i, _ in ring.take_used():
            req, sec = outstanding.pop(i)  # KeyError: completed twice or never sent
            assert status_of(guest, req) == VIRTIO_BLK_S_OK
            assert os.pread(disk, 512, sec * 512) == fill(512, seed=sec)
            n += 1
        return n

    try:
        for _ in range(4):
            pid = fork_server(ring.vq, params, stats)
            target = done + rng.randint(1, 40)
            while done < target:
                submit_up_to_five()
                ring.kick()
                done += complete_used()
            submit_up_to_five()
            ring.kick()
            time.sleep(rng.random() * 0.001)
            crash(pid)
            done += complete_used()
            old, ring.vq = ring.vq, restarted(ring, region)
            old.close()
            assert blk_serve(ring.vq, params, stats, 0) == len(outstanding)
            done += complete_used()
            assert not outstanding and region.marked(64) == []
        assert done > 4 and stats.snapshot()["resubmitted"] <= 5 * 4
    finally:
        ring.close()
        region.close()
        params.close()
        stats.close()
        os.close(slow)
