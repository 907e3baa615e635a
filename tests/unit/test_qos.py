"""Volume QoS (cffi_build/nitro_qos.c over nitro_bucket.c): the bucket maths
driven with a clock of the test's own (exact counts, no timing), then the
blk rings holding requests back (delayed, never failed) on the real clock,
asserting only counts and ordering."""

from __future__ import annotations

import pytest

from nitro import _datapath
from nitro._datapath import BlkParams, BlkStats, FrontendError, Qos, Ring, blk_serve
from tests.ringlayout import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from tests.unit.test_engine import wait_used
from tests.unit.virtq import FakeGuest, SplitRing, blk_req, fill, status_of

NUM = 64  # the `ring` fixture: 8 requests of 3 descriptors
SEC = 10**9
T0 = 1000 * SEC  # any clock value: the buckets only see differences


@pytest.fixture
def qos():
    q = Qos()
    yield q
    q.close()


def greedy(q: Qos, start: int, end: int, nbytes: int = 0) -> list[int]:
    """A client that always has a request waiting: each is retried exactly
    when the previous refusal said. Returns the admission times in [start, end)."""
    now, admitted, retry = start, [], False
    while now < end:
        ready = q.admit(nbytes, now, retry)
        if ready is None:
            admitted.append(now)
            retry = False
        else:
            assert ready > now, "a refusal must name a later time"
            now, retry = ready, True
    return admitted


# -- the buckets, clock chosen by the test -------------------------------------

def test_unlimited_admits_everything_and_counts_nothing(qos) -> None:
    assert all(qos.admit(1 << 20, T0 + i) is None for i in range(1000))
    assert qos.statistics(T0) == {"exceeded_iops_ns": 0, "exceeded_throughput_ns": 0, "credits": 0,
                                  "credits_max": 0, "queued": 0, "delayed": 0}


def test_iops_baseline_is_exact_over_ten_seconds(qos) -> None:
    """1,000/s, a bucket 100 ms (100 I/Os) deep, full at the start: 100 at
    once, then one per millisecond, with no drift over 10 s."""
    qos.set(iops=1000, now=T0)
    got = greedy(qos, T0, T0 + 10 * SEC)
    assert got[:100] == [T0] * 100
    assert got[100] == T0 + SEC // 1000
    assert len(got) == 100 + 10 * 1000 - 1  # the one due at exactly 10 s is outside


def test_odd_rates_keep_the_fraction_of_a_token(qos) -> None:
    """3 I/Os per second is a token every 333.33 ms: whole-token refills
    that dropped the remainder would lose a third here."""
    qos.set(iops=3, now=T0)
    got = greedy(qos, T0, T0 + 30 * SEC)
    # depth 1 (a tenth of 3 rounds to 0, at least 1), then 3/s but the one due at 30 s
    assert len(got) == 1 + 89


def test_throughput_limits_bytes_and_a_large_request_leaves_debt(qos) -> None:
    qos.set(throughput=1_000_000, now=T0)  # 1 MB/s, 100 kB deep
    got = greedy(qos, T0, T0 + 10 * SEC, nbytes=4000)
    assert len(got) == 25 + 10 * 250 - 1
    # A request over the depth goes once the bucket is full, then its debt
    # holds the next back for the rest of its bytes.
    qos.set(throughput=1_000_000, now=T0)
    later = T0 + 100 * SEC  # long idle: full
    assert qos.admit(300_000, later) is None
    assert qos.admit(1, later) == later + 200_001 * 1000  # 200 kB of debt + 1 byte


def test_burst_drains_credits_at_burst_minus_baseline(qos) -> None:
    """iops 100, burst 300 for 10 s: 2,000 credits, spent at 200/s while the
    volume runs at 300/s, then back to the baseline."""
    qos.set(iops=100, burst_iops=300, burst_seconds=10, now=T0)
    assert qos.statistics(T0)["credits"] == qos.statistics(T0)["credits_max"] == 2000
    greedy(qos, T0, T0 + 5 * SEC)
    # The two 100 ms buckets (10 baseline + 30 burst I/Os) start full too.
    assert qos.statistics(T0 + 5 * SEC)["credits"] in range(2000 - 5 * 200 - 30, 2000 - 5 * 200 + 1)
    burst = greedy(qos, T0 + 5 * SEC, T0 + 15 * SEC)
    assert qos.statistics(T0 + 15 * SEC)["credits"] == 0
    baseline = greedy(qos, T0 + 15 * SEC, T0 + 25 * SEC)
    assert len(baseline) == 10 * 100
    # What ran above the baseline in the burst phase is what was left.
    assert len(burst) - 10 * 100 in range(2000 - 5 * 200 - 30, 2000 - 5 * 200 + 1)
    stats = qos.statistics(T0 + 25 * SEC)
    # Greedy for 25 s: throttled (waiting for a token) the whole time but
    # the instants it was admitted.
    # (up to the time the last refusal named, a little past 25 s)
    assert 24 * SEC < stats["exceeded_iops_ns"] <= 25 * SEC + SEC // 100
    assert stats["exceeded_throughput_ns"] == 0


def test_credits_accrue_below_the_baseline_up_to_the_cap(qos) -> None:
    qos.set(iops=100, burst_iops=300, burst_seconds=10, now=T0)
    greedy(qos, T0, T0 + 20 * SEC)
    assert qos.statistics(T0 + 20 * SEC)["credits"] == 0
    # Idle for 3 s: the baseline bucket fills (10) and 290 overflow (plus
    # the fraction of a token the greedy client left at 20 s).
    assert qos.statistics(T0 + 23 * SEC)["credits"] in (290, 291)
    # 50/s for 4 s earns 50 credits a second.
    now = T0 + 23 * SEC
    for i in range(200):
        assert qos.admit(0, now + i * SEC // 50) is None
    assert qos.statistics(T0 + 27 * SEC)["credits"] in range(290 + 200 - 1, 290 + 200 + 3)
    assert qos.statistics(T0 + 10**6 * SEC)["credits"] == 2000


def test_delayed_counts_each_request_once_and_limits_change_live(qos) -> None:
    qos.set(iops=10, now=T0)
    assert qos.admit(0, T0) is None  # the bucket held 1
    ready = qos.admit(0, T0)
    assert ready == T0 + SEC // 10
    assert qos.admit(0, T0 + 1, retry=True) is not None
    assert qos.statistics(T0)["delayed"] == 1
    qos.set(iops=0, now=T0 + 2)  # unlimited from now on
    assert qos.admit(0, T0 + 2, retry=True) is None
    qos.set(iops=1000, burst_iops=2000, burst_seconds=1, now=T0 + 3)
    assert qos.statistics(T0 + 3)["credits"] == 1000  # a new credit bucket starts full
    qos.set(iops=1000, burst_iops=1500, burst_seconds=1, now=T0 + 4)
    assert qos.statistics(T0 + 4)["credits"] == 500  # cut to the smaller cap


@pytest.mark.parametrize("limits", [
    {"burst_iops": 100, "burst_seconds": 1},              # no baseline
    {"iops": 100, "burst_iops": 100, "burst_seconds": 1},  # not above it
    {"iops": 100, "burst_iops": 200},                      # no duration
    {"iops": 100, "burst_seconds": 5},                     # a duration of nothing
    {"iops": 10**12 + 1},
])
def test_limits_c_refuses(qos, limits) -> None:
    with pytest.raises(FrontendError):
        qos.set(**limits)


# -- the rings: delayed, never failed --------------------------------------------

def test_a_limited_queue_completes_every_request_in_order(guest: FakeGuest, ring: SplitRing,
                                                          disk: int) -> None:
    """blk_serve (the ring alone on this thread) with 20 I/Os per second
    (a bucket of 2): 8 requests are all served OK, 6 of them held back
    first; the throttled time is counted."""
    q = Qos()
    q.set(iops=20)
    params = BlkParams(disk, 2048, qos=q)
    stats = BlkStats()
    try:
        reqs = [blk_req(guest, VIRTIO_BLK_T_OUT, sector=k, out=fill(512, k)) for k in range(4)]
        reqs += [blk_req(guest, VIRTIO_BLK_T_IN, sector=k, in_len=512) for k in range(3)]
        reqs.append(blk_req(guest, VIRTIO_BLK_T_FLUSH))
        heads = [ring.add_chain(r.bufs) for r in reqs]
        assert blk_serve(ring.vq, params, stats, 0) == 8
        assert [h for h, _ in ring.take_used()] == heads
        assert all(status_of(guest, r) == VIRTIO_BLK_S_OK for r in reqs)
        assert [guest.read(r.data_gpa, 512) for r in reqs[4:7]] == [fill(512, k) for k in range(3)]
        s = q.statistics()
        assert s["delayed"] == 6 and s["queued"] == 0
        assert s["exceeded_iops_ns"] > 0 and s["exceeded_throughput_ns"] == 0
        snap = stats.snapshot()
        assert sum(c["errors"] for c in snap["ops"].values()) == 0
        assert snap["inflight"] == 0
        assert sum(n for _, n in snap["latency"]["out"]["buckets"]) == 4
        assert sum(n for _, n in snap["latency"]["in"]["buckets"]) == 3
        assert sum(n for _, n in snap["latency"]["flush"]["buckets"]) == 1
    finally:
        params.close()
        stats.close()
        q.close()


def test_a_worker_sleeps_until_the_budget_allows(guest: FakeGuest, disk: int) -> None:
    """On an engine worker, queues of one volume on two workers share the
    budget; requests held back wait in the ring while the worker sleeps
    until their time (it wakes about once per admitted request: a spinning
    worker would not sleep at all), and all complete."""
    q = Qos()
    q.set(iops=100)  # a bucket of 10, then one per 10 ms
    params = BlkParams(disk, 2048, qos=q)
    stats = [BlkStats(), BlkStats()]
    e = _datapath.Engine(2)
    rings = [SplitRing(guest, num=128), SplitRing(guest, num=128)]  # 30 chains of 3
    crings = [Ring.blk(r.vq, params, s) for r, s in zip(rings, stats)]
    try:
        for i, cr in enumerate(crings):
            e.attach(cr, i)
        reqs = [[blk_req(guest, VIRTIO_BLK_T_IN, sector=k, in_len=512) for k in range(30)] for _ in rings]
        for r, rs in zip(rings, reqs):
            for req in rs:
                r.add_chain(req.bufs)
            r.kick()
        for r in rings:
            wait_used(r, 30, timeout=30)
        assert all(status_of(guest, req) == VIRTIO_BLK_S_OK for rs in reqs for req in rs)
        s = q.statistics()
        assert s["delayed"] >= 60 - 10 - 2 and s["queued"] == 0  # 2: refilled while the first ran
        wakeups = [e.worker_stats(w)["wakeups"] for w in (0, 1)]
        # A worker slept until each held request's time (and woke for
        # completions too). One that armed its held ring (chains wait in
        # it: "work arrived") would spin instead (measured: 20 to 32 wakeups
        # for 50 held requests).
        assert sum(wakeups) >= s["delayed"], f"the workers slept {wakeups} times for {s['delayed']} held requests"
    finally:
        for cr in crings:
            e.detach(cr)
            cr.close()
        e.close()
        for r in rings:
            r.close()
        params.close()
        q.close()
        for s in stats:
            s.close()
