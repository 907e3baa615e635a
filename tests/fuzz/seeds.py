"""Seed inputs for the ring fuzzers: each one reaches a guest-triggerable
state on purpose. ``python -m tests.fuzz.seeds`` (from the repo root)
rewrites tests/fuzz/corpus/{vring,blk}/seed-<name>; test_fuzz.py checks that
the files match this module and that each seed, replayed through the Python
API, ends with the fault named here.

Layout 0 unless said otherwise: region A is gpa 0x10000 + [0, 32 KiB), region
B follows it directly. Rings: desc at span 0x0000, avail 0x1000, used 0x2000.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.fuzz.ringfmt import (
    CAPACITY_MAPPED,
    F_EVENT_IDX,
    F_INDIRECT,
    F_PACKED,
    PACKED_BASE,
    REGION,
    Program,
    gpa,
)
from tests.ringlayout import (
    DESC,
    INFLIGHT_DESC,
    INFLIGHT_HEADER,
    U16,
    blk_header,
    dwz_segment,
    inflight_desc_offset,
    used_event_offset,
)
from tests.ringlayout import VIRTIO_BLK_T_DISCARD as T_DISCARD
from tests.ringlayout import VIRTIO_BLK_T_FLUSH as T_FLUSH
from tests.ringlayout import VIRTIO_BLK_T_GET_ID as T_GET_ID
from tests.ringlayout import VIRTIO_BLK_T_IN as T_IN
from tests.ringlayout import VIRTIO_BLK_T_OUT as T_OUT
from tests.ringlayout import VIRTIO_BLK_T_WRITE_ZEROES as T_WZ
from tests.ringlayout import VRING_DESC_F_INDIRECT as IND
from tests.ringlayout import VRING_DESC_F_NEXT as NEXT
from tests.ringlayout import VRING_DESC_F_WRITE as WRITE

HERE = Path(__file__).resolve().parent
ANY = object()  # the outcome is not the point (no crash, guards intact is)
REFUSED = object()  # SET_VRING_ADDR refuses the layout: the queue never serves

HDR, DATA, STATUS = 0x3000, 0x3100, 0x3F00


def request(p: Program, first: int, type_: int, data_len: int = 512, *, sector: int = 0,
            slot: int = 0, data_gpa: int | None = None, payload: bytes = b"") -> Program:
    """A 2- or 3-descriptor request from descriptor ``first`` on, its own
    header/status bytes at slot-dependent addresses."""
    h, st = HDR + 0x20 * slot, STATUS + slot
    p.write(h, blk_header(type_, sector))
    p.desc_at(first, gpa(h), 16, NEXT, first + 1)
    i = first + 1
    if payload:
        where = DATA + 0x1000 * slot
        p.write(where, payload)
        p.desc_at(i, gpa(where), len(payload), NEXT, i + 1)
        i += 1
    elif data_len:
        where = gpa(DATA + 0x1000 * slot) if data_gpa is None else data_gpa
        p.desc_at(i, where, data_len, NEXT | (WRITE if type_ != T_OUT else 0), i + 1)
        i += 1
    return p.desc_at(i, gpa(st), 1, WRITE)


def _blk_read() -> Program:
    return request(Program(), 0, T_IN).avail_ring([0]).serve()


def _blk_write_indirect() -> Program:
    p = Program(flags=F_INDIRECT)
    table = 0x4000
    p.write(HDR, blk_header(T_OUT, 8))
    p.write(DATA, bytes(range(256)) * 2)
    p.desc_at(0, gpa(HDR), 16, NEXT, 1, table=table)
    p.desc_at(1, gpa(DATA), 512, NEXT, 2, table=table)
    p.desc_at(2, gpa(STATUS), 1, WRITE, table=table)
    p.desc_at(0, gpa(table), 48, IND)
    return p.avail_ring([0]).serve()


def _blk_mixed() -> Program:
    p = Program(log2_num=4, max_discard=64, max_wz=64)
    request(p, 0, T_GET_ID, 20, slot=0)
    request(p, 3, T_FLUSH, 0, slot=1)
    request(p, 5, T_DISCARD, payload=dwz_segment(2, 4, 0), slot=2)
    request(p, 8, T_WZ, payload=dwz_segment(6, 2, 1), slot=3)
    request(p, 11, 99, 0, slot=4)
    return p.avail_ring([0, 3, 5, 8, 11]).serve()


def _blk_mapped() -> Program:
    # Served through a mapping of the disk: while serving each request the
    # device peeks at the next one's header (a prefetch hint): a read, a
    # write, a read past the disk's end, and a header too short to hold a
    # sector.
    p = Program(flags=F_INDIRECT, log2_num=4, capacity=64 | CAPACITY_MAPPED)
    request(p, 0, T_IN, 1024, sector=2, slot=0)
    request(p, 3, T_OUT, 512, sector=9, slot=1)
    request(p, 6, T_IN, 512, sector=200, slot=2)
    request(p, 9, T_IN, 512, sector=4, slot=3)
    p.desc_at(9, gpa(HDR + 0x60), 8, NEXT, 10)
    return p.avail_ring([0, 3, 6, 9]).serve()


def _blk_mapped_next_hostile() -> Program:
    # The next chain, peeked at while the first is served, is an indirect
    # descriptor whose table lies outside guest memory: the peek must not
    # follow it, and the pop must refuse it.
    p = Program(flags=F_INDIRECT, log2_num=3, capacity=64 | CAPACITY_MAPPED)
    request(p, 0, T_IN, 512, sector=1)
    p.desc_at(3, 0x900000, 48, IND)
    return p.avail_ring([0, 3]).serve()


def _blk_mapped_next_indirect_unnegotiated() -> Program:
    # The next chain is indirect though INDIRECT_DESC was not negotiated:
    # the peek must not enter its table (the walk would refuse it too).
    p = Program(log2_num=3, capacity=64 | CAPACITY_MAPPED)
    request(p, 0, T_IN, 512, sector=1)
    p.write(0x4000, DESC.pack(gpa(HDR), 16, NEXT, 1))
    p.desc_at(3, gpa(0x4000), 48, IND)
    return p.avail_ring([0, 3]).serve()


def _next_header_spans_regions() -> Program:
    # The second chain's first buffer runs from 8 bytes before the end of
    # region A into region B: the look-ahead (nitro_vq_peek_next) must
    # give only the part in A, as the pop's first iovec has it.
    p = Program(log2_num=3)
    request(p, 0, T_IN, 512)
    p.desc_at(3, gpa(REGION - 8), 16, NEXT, 4)
    p.desc_at(4, gpa(STATUS + 1), 1, WRITE)
    return p.avail_ring([0, 3]).serve()


def _desc_loop() -> Program:
    p = Program()
    p.desc_at(0, gpa(HDR), 16, NEXT, 1).desc_at(1, gpa(DATA), 16, NEXT, 0)
    return p.avail_ring([0]).serve()


def _chain_longer_than_ring() -> Program:
    # 64 descriptors each pointing at the next, the last back at the first.
    p = Program(log2_num=6)
    p.descs(0, 64, gpa(DATA), 16, NEXT)
    p.desc_at(63, gpa(DATA), 16, NEXT, 0)
    return p.avail_ring([0]).serve()


def _indirect_longer_than_ring() -> Program:
    # A legal indirect table of 32 entries behind a ring of 4.
    p = Program(flags=F_INDIRECT)
    table = 0x4000
    p.write(HDR, blk_header(T_IN))
    p.descs(table, 31, gpa(DATA), 512, NEXT | WRITE)
    p.desc_at(0, gpa(HDR), 16, NEXT, 1, table=table)
    p.desc_at(31, gpa(STATUS), 1, WRITE, table=table)
    p.desc_at(0, gpa(table), 32 * 16, IND)
    return p.avail_ring([0]).serve()


def _indirect_in_indirect() -> Program:
    p = Program(flags=F_INDIRECT)
    outer, inner = 0x4000, 0x4100
    request(p, 0, T_IN)  # a valid chain for the inner table to point at...
    p.desc_at(0, gpa(inner), 48, IND, table=outer)
    p.write(inner, bytes(48))
    p.desc_at(3, gpa(outer), 16, IND)  # ...but reached through two levels
    return p.avail_ring([3]).serve()


def _indirect_without_feature() -> Program:
    p = Program()
    p.desc_at(0, gpa(0x4000), 48, IND)
    return p.avail_ring([0]).serve()


def _indirect_bad_len() -> Program:
    p = Program(flags=F_INDIRECT)
    p.desc_at(0, gpa(0x4000), 24, IND)
    return p.avail_ring([0]).serve()


def _indirect_with_next() -> Program:
    p = Program(flags=F_INDIRECT)
    p.desc_at(0, gpa(0x4000), 32, IND | NEXT, 1)
    return p.avail_ring([0]).serve()


def _indirect_spans_regions() -> Program:
    p = Program(flags=F_INDIRECT)
    p.desc_at(0, gpa(REGION - 16), 32, IND)
    return p.avail_ring([0]).serve()


def _span_two_regions() -> Program:
    # A read whose data buffer starts 256 bytes before the end of region A.
    p = Program(log2_num=3)
    request(p, 0, T_IN, 1024, data_gpa=gpa(REGION - 256))
    request(p, 3, T_OUT, 512, data_gpa=gpa(REGION - 100), slot=1)
    return p.avail_ring([0, 3]).serve()


def _addr_outside_regions() -> Program:
    p = Program()
    request(p, 0, T_IN, 512, data_gpa=0x900000)
    return p.avail_ring([0]).serve()


def _addr_in_hole() -> Program:
    # Layout 1 leaves a hole after region A: a buffer running into it.
    p = Program(layout=1)
    request(p, 0, T_IN, 1024, data_gpa=gpa(REGION - 256))
    return p.avail_ring([0]).serve()


def _addr_wraps() -> Program:
    p = Program()
    request(p, 0, T_IN, 64, data_gpa=2**64 - 16)
    return p.avail_ring([0]).serve()


def _addr_top_of_space() -> Program:
    # Layout 5 puts region B at the very top of the 64-bit space (region A at
    # gpa 0): a buffer ending exactly at the last byte, then one past it.
    top = 2**64 - 1 - REGION
    p = Program(log2_num=3, layout=5)
    request(p, 0, T_IN, 512, data_gpa=top + REGION - 512)
    p.write(HDR + 0x20, blk_header(T_IN))
    p.desc_at(3, HDR + 0x20, 16, NEXT, 4)
    p.desc_at(4, top + REGION - 256, 512, NEXT | WRITE, 5)
    p.desc_at(5, STATUS + 1, 1, WRITE)
    # Layout 5 addresses: region A starts at gpa 0, so span offset = gpa.
    p.desc_at(0, HDR, 16, NEXT, 1).desc_at(2, STATUS, 1, WRITE)
    return p.avail_ring([0, 3]).serve()


def _avail_idx_jump() -> Program:
    p = request(Program(), 0, T_IN)
    return p.avail_ring([0], idx=5).serve()  # 5 > num 4


def _avail_idx_jump_wraps() -> Program:
    p = Program(base=0xFFFE)
    request(p, 0, T_IN)
    return p.avail_ring([0], idx=0x0010).serve()


def _head_out_of_range() -> Program:
    return request(Program(), 0, T_IN).avail_ring([7]).serve()


def _next_out_of_range() -> Program:
    p = Program()
    p.write(HDR, blk_header(T_IN))
    p.desc_at(0, gpa(HDR), 16, NEXT, 9)
    return p.avail_ring([0]).serve()


def _desc_order() -> Program:
    p = Program()
    p.write(HDR, blk_header(T_OUT))
    p.desc_at(0, gpa(STATUS), 1, WRITE | NEXT, 1).desc_at(1, gpa(HDR), 16)
    return p.avail_ring([0]).serve()


def _request_no_status() -> Program:
    p = Program()
    p.write(HDR, blk_header(T_IN))
    p.desc_at(0, gpa(HDR), 16)
    return p.avail_ring([0]).serve()


def _request_short_header() -> Program:
    p = Program()
    p.desc_at(0, gpa(HDR), 8, NEXT, 1).desc_at(1, gpa(STATUS), 1, WRITE)
    return p.avail_ring([0]).serve()


def _zero_length_descs() -> Program:
    p = Program()
    p.write(HDR, blk_header(T_IN))
    p.desc_at(0, gpa(HDR), 16, NEXT, 1).desc_at(1, gpa(DATA), 0, NEXT | WRITE, 2)
    p.desc_at(2, gpa(STATUS), 1, WRITE)
    return p.avail_ring([0]).serve()


def _used_over_desc() -> Program:
    # The used ring placed over the descriptor table: completing the first
    # chain rewrites descriptors the second one uses.
    p = Program(used=0x0000)
    request(p, 0, T_IN, 16)
    request(p, 1, T_GET_ID, 20, slot=1)
    return p.avail_ring([0, 0, 0, 0]).serve().serve()


def _used_over_avail() -> Program:
    # The used ring over the avail ring: each completion's used->idx store
    # is also an avail->idx bump, a request the driver never made. Served,
    # the device fed itself forever (a libFuzzer timeout in the blk target).
    p = Program(avail=0x1000, used=0x1000)
    request(p, 0, T_GET_ID, 20)
    return p.avail_ring([0]).serve()


def _rings_overlap() -> Program:
    p = Program(flags=F_EVENT_IDX, desc=0x0000, avail=0x0000, used=0x0000)
    p.desc_at(0, gpa(HDR), 16, NEXT, 1).desc_at(1, gpa(STATUS), 1, WRITE)
    return p.serve().serve()


def _set_mem_between_serves() -> Program:
    # Requests keep coming while the memory table is swapped under the queue.
    p = request(Program(), 0, T_IN).avail_ring([0]).serve()
    p.set_mem(2)  # the same uaddrs, the gpas of A and B exchanged
    request(p, 0, T_IN, data_gpa=gpa(REGION + 0x3100)).avail_ring([0], start=1).serve()
    p.set_mem(3)  # region B gone; the rings (in A) stay
    p.avail_ring([0], start=2).serve()
    p.set_mem(4)  # uaddrs moved by 4 KiB: the rings are read elsewhere now
    return p.serve().set_mem(0).serve()


def _set_mem_drops_ring() -> Program:
    # Rings in region B; a table without B cannot translate them any more.
    p = Program(desc=REGION, avail=REGION + 0x1000, used=REGION + 0x2000)
    request(p, 0, T_IN)
    p.desc_at(0, gpa(HDR), 16, NEXT, 1)
    p.avail_ring([0]).serve()
    return p.set_mem(3).serve().set_mem(0).serve()


def _ring_spans_regions() -> Program:
    return Program(desc=REGION - 32).serve()


def _reset_reconnect() -> Program:
    p = request(Program(), 0, T_IN).avail_ring([0]).serve()
    p.reset(base=1)
    return p.avail_ring([0], start=1).serve()


def _set_num_shrinks() -> Program:
    p = request(Program(log2_num=3), 0, T_IN).avail_ring([0]).serve()
    return p.set_num(0).serve().set_num(10).serve()


def _ring_of_1024() -> Program:
    p = Program(log2_num=10, desc=0x0000, avail=0x4000, used=0x5000)
    p.write(HDR + 0x4000, blk_header(T_IN))
    p.desc_at(0, gpa(HDR + 0x4000), 16, NEXT, 1023)
    p.desc_at(1023, gpa(0x6000), 1, WRITE)
    return p.avail_ring([0]).serve()


def _event_idx() -> Program:
    p = Program(flags=F_EVENT_IDX | F_INDIRECT)
    request(p, 0, T_IN).avail_ring([0])
    p.write(p.avail + used_event_offset(p.num), U16.pack(0))
    return p.serve()


def _discard_too_many_segments() -> Program:
    p = Program(max_discard=8)
    request(p, 0, T_DISCARD, payload=dwz_segment(0, 1, 0) * 257)
    return p.avail_ring([0]).serve()


def _fill_and_descs() -> Program:
    # Exercises FILL: a zeroed descriptor is an empty buffer, so the chain
    # has neither header nor status.
    return Program().fill(0, 64, 0).avail_ring([0]).serve()


def _inflight_resubmit() -> Program:
    # A request served with a fresh region attached (so it is initialised),
    # made available again, marked in flight, and the queue "restarted":
    # the next serve resubmits it from the region.
    p = request(Program(), 0, T_IN).inflight(0).avail_ring([0]).serve()
    p.avail_ring([0], start=1).reset(base=1)
    return p.inflight(inflight_desc_offset(0), INFLIGHT_DESC.pack(1, 0, 5)).serve()


def _inflight_head_out_of_range() -> Program:
    # A version-1 region marking entry 900 of a 16-entry ring.
    p = Program().inflight(0, INFLIGHT_HEADER.pack(0, 1, 16, 0, 0))
    return p.inflight(inflight_desc_offset(900), INFLIGHT_DESC.pack(1, 0, 1)).serve()


# -- packed rings (flags bit 7) --------------------------------------------------
def _packed_request(p: Program, slot: int, id_: int, type_: int, data_len: int = 512,
                    sub: int = 0) -> Program:
    """A 3-descriptor blk request as a packed list from ``slot``."""
    h, st, data = HDR + 0x20 * sub, STATUS + sub, DATA + 0x1000 * sub
    p.write(h, blk_header(type_, 8 * sub))
    write = WRITE if type_ == T_IN else 0
    return p.packed_list(slot, [(gpa(h), 16, NEXT), (gpa(data), data_len, NEXT | write),
                                (gpa(st), 1, WRITE)], id_)


def _packed_requests_over_laps() -> Program:
    # Ring of 4, 3-descriptor lists: the second one wraps (its last two
    # descriptors carry the flipped wrap counter).
    p = Program(flags=F_PACKED, base=PACKED_BASE)
    _packed_request(p, 0, 0, T_OUT).serve()
    p.write(HDR + 0x20, blk_header(T_IN, 8))
    p.packed_list(3, [(gpa(HDR + 0x20), 16, NEXT)], 1)
    p.packed_list(0, [(gpa(DATA + 0x1000), 512, NEXT | WRITE), (gpa(STATUS + 1), 1, WRITE)],
                  1, wrap=0)
    return p.serve()


def _packed_indirect() -> Program:
    p = Program(flags=F_PACKED | F_INDIRECT, base=PACKED_BASE)
    table = 0x4000
    p.write(HDR, blk_header(T_OUT, 8))
    for i, (addr, length, flags) in enumerate([(gpa(HDR), 16, 0), (gpa(DATA), 512, 0),
                                               (gpa(STATUS), 1, WRITE)]):
        p.write(table + 16 * i, DESC.pack(addr, length, 0, flags))
    return p.packed_list(0, [(gpa(table), 48, IND)], 2).serve()


def _packed_next_not_available() -> Program:
    p = Program(flags=F_PACKED, base=PACKED_BASE)
    _packed_request(p, 0, 0, T_IN)
    return p.write(16 * 1 + 14, b"\0\0").serve()  # descriptor 1 never made available


def _packed_id_out_of_range() -> Program:
    return _packed_request(Program(flags=F_PACKED, base=PACKED_BASE), 0, 9, T_IN).serve()


def _packed_list_longer_than_ring() -> Program:
    p = Program(flags=F_PACKED, base=PACKED_BASE)
    return p.packed_list(0, [(gpa(DATA), 16, NEXT)] * 4, 0).serve()


def _packed_inflight() -> Program:
    # A region attached to a packed ring: initialised, recorded, committed.
    p = Program(flags=F_PACKED, base=PACKED_BASE, log2_num=3).inflight(0)
    _packed_request(p, 0, 0, T_OUT)
    return _packed_request(p, 3, 1, T_IN, sub=1).serve()


SEEDS: dict[str, tuple[Callable[[], Program], object]] = {
    "packed-requests-over-laps": (_packed_requests_over_laps, None),
    "packed-indirect": (_packed_indirect, None),
    "packed-next-not-available": (_packed_next_not_available, "avail_idx"),
    "packed-id-out-of-range": (_packed_id_out_of_range, "desc_index"),
    "packed-list-longer-than-ring": (_packed_list_longer_than_ring, "desc_loop"),
    "packed-inflight": (_packed_inflight, None),
    "blk-read": (_blk_read, None),
    "inflight-resubmit": (_inflight_resubmit, None),
    "inflight-head-out-of-range": (_inflight_head_out_of_range, "inflight"),
    "blk-write-indirect": (_blk_write_indirect, None),
    "blk-mixed": (_blk_mixed, None),
    "blk-mapped": (_blk_mapped, "request"),
    "blk-mapped-next-hostile": (_blk_mapped_next_hostile, "indirect"),
    "blk-mapped-next-indirect-unnegotiated": (_blk_mapped_next_indirect_unnegotiated, "indirect"),
    "desc-loop": (_desc_loop, "desc_loop"),
    "chain-longer-than-ring": (_chain_longer_than_ring, "desc_loop"),
    "indirect-longer-than-ring": (_indirect_longer_than_ring, None),
    "indirect-in-indirect": (_indirect_in_indirect, "indirect"),
    "indirect-without-feature": (_indirect_without_feature, "indirect"),
    "indirect-bad-len": (_indirect_bad_len, "indirect"),
    "indirect-with-next": (_indirect_with_next, "indirect"),
    "indirect-spans-regions": (_indirect_spans_regions, "indirect"),
    "span-two-regions": (_span_two_regions, None),
    "next-header-spans-regions": (_next_header_spans_regions, None),
    "addr-outside-regions": (_addr_outside_regions, "desc_addr"),
    "addr-in-hole": (_addr_in_hole, "desc_addr"),
    "addr-wraps": (_addr_wraps, "desc_addr"),
    "addr-top-of-space": (_addr_top_of_space, "desc_addr"),
    "avail-idx-jump": (_avail_idx_jump, "avail_idx"),
    "avail-idx-jump-wraps": (_avail_idx_jump_wraps, "avail_idx"),
    "head-out-of-range": (_head_out_of_range, "desc_index"),
    "next-out-of-range": (_next_out_of_range, "desc_index"),
    "desc-order": (_desc_order, "desc_order"),
    "request-no-status": (_request_no_status, "request"),
    "request-short-header": (_request_short_header, "request"),
    "zero-length-descs": (_zero_length_descs, None),
    "used-over-desc": (_used_over_desc, REFUSED),
    "used-over-avail": (_used_over_avail, REFUSED),
    "rings-overlap": (_rings_overlap, REFUSED),
    "set-mem-between-serves": (_set_mem_between_serves, ANY),
    "set-mem-drops-ring": (_set_mem_drops_ring, None),
    "ring-spans-regions": (_ring_spans_regions, None),
    "reset-reconnect": (_reset_reconnect, None),
    "set-num-shrinks": (_set_num_shrinks, ANY),
    "ring-of-1024": (_ring_of_1024, None),
    "event-idx": (_event_idx, None),
    "discard-too-many-segments": (_discard_too_many_segments, None),
    "fill-zero-table": (_fill_and_descs, "request"),
}


def build() -> dict[str, bytes]:
    return {name: make().encode() for name, (make, _) in SEEDS.items()}


def main() -> None:
    for target in ("vring", "blk"):
        d = HERE / "corpus" / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        for name, data in build().items():
            (d / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    main()
