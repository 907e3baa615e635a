"""virtio-blk request handling (nitro_blk.c) against a temporary file."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from nitro._datapath import (
    LATENCY_BOUNDS,
    BlkParams,
    BlkStats,
    FrontendError,
    XtsCipher,
    blk_serve,
)
from tests.ringlayout import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    blk_header,
    desc_table_size,
    dwz_segment,
)
from tests.unit.test_crypto_xts import HERE, reference_xts, secret_of
from tests.unit.virtq import (
    CAPACITY,
    MAX_DWZ,
    SERIAL,
    BlkReq,
    Buf,
    FakeGuest,
    SplitRing,
    blk_params,
    blk_req,
    disk_file,
    fill,
    status_of,
)

DISK_SEED = 3  # the `disk` fixture (tests/unit/conftest.py) starts as fill(..., seed=3)


@pytest.fixture(params=[False, True], ids=["uring", "mapped"])
def params(request: pytest.FixtureRequest, disk: int, capacity: int) -> Iterator[BlkParams]:
    """The plain volume every test here serves (tests/unit/conftest.py's),
    with reads through io_uring, or (mapped) copied from a mapping of the
    image where its pages are in memory."""
    p = blk_params(disk, capacity)
    if request.param:
        p.map_image()
        assert p.image_mapped
    yield p
    p.close()


def run_one(ring: SplitRing, bufs: list[Buf], params: BlkParams, stats: BlkStats,
            indirect: bool = False) -> int:
    """Submit one chain, serve it, and return its used length."""
    head = ring.add_chain(bufs, indirect=indirect)
    assert blk_serve(ring.vq, params, stats, 0) == 1
    [(used_id, used_len)] = ring.take_used()
    assert used_id == head
    return used_len


def file_bytes(fd: int, sector: int, length: int) -> bytes:
    return os.pread(fd, length, sector * 512)


# -- IN / OUT ------------------------------------------------------------------

def test_in_reads_file_into_guest(guest: FakeGuest, ring: SplitRing, disk: int,
                                  params: BlkParams, stats: BlkStats) -> None:
    req = blk_req(guest, VIRTIO_BLK_T_IN, sector=8, in_len=4096)
    assert run_one(ring, req.bufs, params, stats) == 4097
    assert status_of(guest, req) == VIRTIO_BLK_S_OK
    assert req.data_gpa is not None
    assert guest.read(req.data_gpa, 4096) == file_bytes(disk, 8, 4096)
    assert stats.snapshot()["mapped_reads"] == (1 if params.image_mapped else 0)


def test_out_writes_guest_data_to_file(guest: FakeGuest, ring: SplitRing, disk: int,
                                       params: BlkParams, stats: BlkStats) -> None:
    data = fill(8192, seed=9)
    req = blk_req(guest, VIRTIO_BLK_T_OUT, sector=100, out=data)
    assert run_one(ring, req.bufs, params, stats) == 1
    assert status_of(guest, req) == VIRTIO_BLK_S_OK
    assert file_bytes(disk, 100, 8192) == data
    assert file_bytes(disk, 99, 512) == fill(CAPACITY * 512, seed=3)[99 * 512:100 * 512]


def test_round_trip_through_indirect_table(guest: FakeGuest, disk: int, params: BlkParams,
                                           stats: BlkStats) -> None:
    with SplitRing(guest, num=4, features=VIRTIO_RING_F_INDIRECT_DESC) as r:
        data = fill(2048, seed=5)
        assert run_one(r, blk_req(guest, VIRTIO_BLK_T_OUT, 40, out=data).bufs, params,
                       stats, indirect=True) == 1
        back = blk_req(guest, VIRTIO_BLK_T_IN, 40, in_len=2048)
        assert run_one(r, back.bufs, params, stats, indirect=True) == 2049
        assert back.data_gpa is not None
        assert guest.read(back.data_gpa, 2048) == data


def test_header_and_data_split_anywhere(guest: FakeGuest, ring: SplitRing, disk: int,
                                        params: BlkParams, stats: BlkStats) -> None:
    # Header in three pieces, the last also carrying the first data bytes.
    data = fill(1024, seed=11)
    blob = blk_header(VIRTIO_BLK_T_OUT, 20) + data
    base = guest.alloc(len(blob))
    guest.write(base, blob)
    status = guest.alloc(1, align=1)
    bufs = [Buf(base, 5), Buf(base + 5, 7), Buf(base + 12, 300), Buf(base + 312, len(blob) - 312),
            Buf(status, 1, True)]
    assert run_one(ring, bufs, params, stats) == 1
    assert guest.read(status, 1)[0] == VIRTIO_BLK_S_OK
    assert file_bytes(disk, 20, 1024) == data


def test_header_and_data_in_one_descriptor(guest: FakeGuest, ring: SplitRing, disk: int,
                                           params: BlkParams, stats: BlkStats) -> None:
    data = fill(512, seed=12)
    blob = blk_header(VIRTIO_BLK_T_OUT, 3) + data
    base = guest.alloc(len(blob))
    guest.write(base, blob)
    status = guest.alloc(1, align=1)
    assert run_one(ring, [Buf(base, len(blob)), Buf(status, 1, True)], params, stats) == 1
    assert file_bytes(disk, 3, 512) == data


def test_status_in_the_same_descriptor_as_data(guest: FakeGuest, ring: SplitRing, disk: int,
                                               params: BlkParams, stats: BlkStats) -> None:
    hdr = guest.alloc(16)
    guest.write(hdr, blk_header(VIRTIO_BLK_T_IN, 2))
    buf = guest.alloc(1025)
    # Data split unevenly over two descriptors, the second ending in the status.
    assert run_one(ring, [Buf(hdr, 16), Buf(buf, 700, True), Buf(buf + 700, 325, True)],
                   params, stats) == 1025
    assert guest.read(buf, 1024) == file_bytes(disk, 2, 1024)
    assert guest.read(buf + 1024, 1)[0] == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("type_", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
def test_chain_with_more_buffers_than_iov_max(guest: FakeGuest, disk: int, params: BlkParams,
                                              stats: BlkStats, type_: int) -> None:
    # The longest chain: 1023 direct descriptors plus a 1024-entry indirect
    # table, so the data part is 2045 iovecs and preadv/pwritev are batched.
    n_direct, n_table = 1022, 1024
    sizes = [8] * (n_direct + n_table - 2) + [32]  # 16384 bytes: 32 sectors
    assert sum(sizes) == 16384
    write = VRING_DESC_F_WRITE if type_ == VIRTIO_BLK_T_IN else 0
    data = fill(16384, seed=31)
    with SplitRing(guest, num=1024, features=VIRTIO_RING_F_INDIRECT_DESC) as r:
        hdr = guest.alloc(16)
        guest.write(hdr, blk_header(type_, 7))
        buf = guest.alloc(16384)
        guest.write(buf, data if type_ == VIRTIO_BLK_T_OUT else bytes(16384))
        status = guest.alloc(1, align=1)
        table = guest.alloc(16 * n_table)
        r.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1)
        off = 0
        for i, size in enumerate(sizes):
            if i < n_direct:
                r.write_desc(1 + i, buf + off, size, write | VRING_DESC_F_NEXT, 2 + i)
            else:
                r.write_desc(i - n_direct, buf + off, size, write | VRING_DESC_F_NEXT,
                             i - n_direct + 1, table)
            off += size
        r.write_desc(n_table - 1, status, 1, VRING_DESC_F_WRITE, 0, table)
        r.write_desc(1 + n_direct, table, desc_table_size(n_table), VRING_DESC_F_INDIRECT)
        r.publish(0)
        assert blk_serve(r.vq, params, stats, 0) == 1
        used_len = 16385 if type_ == VIRTIO_BLK_T_IN else 1
        assert r.take_used() == [(0, used_len)]
        assert guest.read(status, 1)[0] == VIRTIO_BLK_S_OK
        if type_ == VIRTIO_BLK_T_IN:
            assert guest.read(buf, 16384) == file_bytes(disk, 7, 16384)
        else:
            assert file_bytes(disk, 7, 16384) == data


def test_read_past_end_of_short_file_returns_zeros(guest: FakeGuest, ring: SplitRing,
                                                   disk: int, params: BlkParams,
                                                   stats: BlkStats) -> None:
    os.ftruncate(disk, 1000 * 512 + 100)  # capacity stays 2048 sectors
    req = blk_req(guest, VIRTIO_BLK_T_IN, sector=999, in_len=2048)
    assert run_one(ring, req.bufs, params, stats) == 2049
    assert status_of(guest, req) == VIRTIO_BLK_S_OK
    assert req.data_gpa is not None
    got = guest.read(req.data_gpa, 2048)
    assert got[:612] == file_bytes(disk, 999, 612)
    assert got[612:] == bytes(2048 - 612)


def test_last_sector_is_readable(guest: FakeGuest, ring: SplitRing, params: BlkParams,
                                 stats: BlkStats) -> None:
    req = blk_req(guest, VIRTIO_BLK_T_IN, sector=CAPACITY - 1, in_len=512)
    run_one(ring, req.bufs, params, stats)
    assert status_of(guest, req) == VIRTIO_BLK_S_OK


@pytest.mark.parametrize(("type_", "sector", "length"), [
    (VIRTIO_BLK_T_IN, CAPACITY, 512),
    (VIRTIO_BLK_T_IN, CAPACITY - 1, 1024),
    (VIRTIO_BLK_T_IN, 2**64 - 1, 512),
    (VIRTIO_BLK_T_IN, 2**55, 512),  # byte offset overflows 64 bits
    (VIRTIO_BLK_T_IN, 0, 100),  # not whole sectors
    (VIRTIO_BLK_T_OUT, CAPACITY, 512),
    (VIRTIO_BLK_T_OUT, 2**64 - 2, 1024),
    (VIRTIO_BLK_T_OUT, 0, 513),
])
def test_out_of_range_or_partial_sectors_are_ioerr(
        guest: FakeGuest, ring: SplitRing, disk: int, params: BlkParams, stats: BlkStats,
        type_: int, sector: int, length: int) -> None:
    before = os.pread(disk, CAPACITY * 512 + 4096, 0)
    if type_ == VIRTIO_BLK_T_IN:
        req = blk_req(guest, type_, sector, in_len=length)
    else:
        req = blk_req(guest, type_, sector, out=fill(length))
    assert run_one(ring, req.bufs, params, stats) == 1
    assert status_of(guest, req) == VIRTIO_BLK_S_IOERR
    assert os.pread(disk, CAPACITY * 512 + 4096, 0) == before
    op = "in" if type_ == VIRTIO_BLK_T_IN else "out"
    assert stats.snapshot()["ops"][op] == {"requests": 1, "bytes": 0, "errors": 1}


def test_readonly_refuses_writes_but_reads(guest: FakeGuest, ring: SplitRing, disk: int,
                                           stats: BlkStats) -> None:
    before = os.pread(disk, CAPACITY * 512, 0)
    p = blk_params(disk, readonly=True)
    try:
        reqs = [
            blk_req(guest, VIRTIO_BLK_T_OUT, 0, out=fill(512, seed=77)),
            blk_req(guest, VIRTIO_BLK_T_DISCARD, out=dwz_segment(0, 8)),
            blk_req(guest, VIRTIO_BLK_T_WRITE_ZEROES, out=dwz_segment(0, 8)),
        ]
        for req in reqs:
            run_one(ring, req.bufs, p, stats)
            assert status_of(guest, req) == VIRTIO_BLK_S_IOERR
        read = blk_req(guest, VIRTIO_BLK_T_IN, 0, in_len=512)
        run_one(ring, read.bufs, p, stats)
        assert status_of(guest, read) == VIRTIO_BLK_S_OK
    finally:
        p.close()
    assert os.pread(disk, CAPACITY * 512, 0) == before


# -- FLUSH, GET_ID, unsupported ------------------------------------------------

def test_flush(guest: FakeGuest, ring: SplitRing, params: BlkParams, stats: BlkStats) -> None:
    req = blk_req(guest, VIRTIO_BLK_T_FLUSH)
    assert run_one(ring, req.bufs, params, stats) == 1
    assert status_of(guest, req) == VIRTIO_BLK_S_OK
    assert stats.snapshot()["ops"]["flush"]["requests"] == 1


@pytest.mark.parametrize(("buf_len", "expect"), [
    (20, SERIAL), (8, SERIAL[:8]), (64, SERIAL), (0, b""),
])
def test_get_id(guest: FakeGuest, ring: SplitRing, params: BlkParams, stats: BlkStats,
                buf_len: int, expect: bytes) -> None:
    req = blk_req(guest, VIRTIO_BLK_T_GET_ID, in_len=buf_len)
    assert run_one(ring, req.bufs, params, stats) == len(expect) + 1
    assert status_of(guest, req) == VIRTIO_BLK_S_OK
    if buf_len:
        assert req.data_gpa is not None
        assert guest.read(req.data_gpa, len(expect)) == expect


def test_get_id_pads_short_serial_with_nul(guest: FakeGuest, ring: SplitRing, disk: int,
                                           stats: BlkStats) -> None:
    p = BlkParams(disk, CAPACITY, serial=b"abc")
    try:
        req = blk_req(guest, VIRTIO_BLK_T_GET_ID, in_len=20)
        run_one(ring, req.bufs, p, stats)
    finally:
        p.close()
    assert req.data_gpa is not None
    assert guest.read(req.data_gpa, 20) == b"abc" + bytes(17)


@pytest.mark.parametrize("type_", [2, 3, 5, 9, 10, 14, 0x8000_0000, 2**32 - 1])
def test_unsupported_types(guest: FakeGuest, ring: SplitRing, params: BlkParams,
                           stats: BlkStats, type_: int) -> None:
    req = blk_req(guest, type_, in_len=512)
    assert run_one(ring, req.bufs, params, stats) == 1
    assert status_of(guest, req) == VIRTIO_BLK_S_UNSUPP
    assert stats.snapshot()["ops"]["unsupported"] == {"requests": 1, "bytes": 0, "errors": 1}


# -- DISCARD / WRITE_ZEROES ----------------------------------------------------

def blocks(fd: int) -> int:
    return os.fstat(fd).st_blocks


def test_discard_punches_holes(guest: FakeGuest, ring: SplitRing, disk: int,
                               params: BlkParams, stats: BlkStats) -> None:
    size, before = os.fstat(disk).st_size, blocks(disk)
    req = blk_req(guest, VIRTIO_BLK_T_DISCARD, out=dwz_segment(0, 256))
    assert run_one(ring, req.bufs, params, stats) == 1
    assert status_of(guest, req) == VIRTIO_BLK_S_OK
    assert blocks(disk) < before
    assert os.fstat(disk).st_size == size
    assert file_bytes(disk, 0, 256 * 512) == bytes(256 * 512)
    assert file_bytes(disk, 256, 512) != bytes(512)  # untouched neighbour
    assert stats.snapshot()["ops"]["discard"] == {"requests": 1, "bytes": 256 * 512,
                                                  "errors": 0}


def test_write_zeroes_without_unmap(guest: FakeGuest, ring: SplitRing, disk: int,
                                    params: BlkParams, stats: BlkStats) -> None:
    size = os.fstat(disk).st_size
    req = blk_req(guest, VIRTIO_BLK_T_WRITE_ZEROES, out=dwz_segment(10, 100))
    assert run_one(ring, req.bufs, params, stats) == 1
    assert status_of(guest, req) == VIRTIO_BLK_S_OK
    assert file_bytes(disk, 10, 100 * 512) == bytes(100 * 512)
    assert file_bytes(disk, 9, 512) != bytes(512)
    assert file_bytes(disk, 110, 512) != bytes(512)
    assert os.fstat(disk).st_size == size


def test_write_zeroes_with_unmap_deallocates(guest: FakeGuest, ring: SplitRing, disk: int,
                                             params: BlkParams, stats: BlkStats) -> None:
    before = blocks(disk)
    req = blk_req(guest, VIRTIO_BLK_T_WRITE_ZEROES, out=dwz_segment(0, 256, flags=1))
    assert run_one(ring, req.bufs, params, stats) == 1
    assert status_of(guest, req) == VIRTIO_BLK_S_OK
    assert file_bytes(disk, 0, 256 * 512) == bytes(256 * 512)
    assert blocks(disk) < before


@pytest.mark.parametrize(("type_", "payload", "status"), [
    (VIRTIO_BLK_T_DISCARD, dwz_segment(0, 8, flags=1), VIRTIO_BLK_S_UNSUPP),  # unmap on discard
    (VIRTIO_BLK_T_DISCARD, dwz_segment(0, 8, flags=2), VIRTIO_BLK_S_UNSUPP),
    (VIRTIO_BLK_T_WRITE_ZEROES, dwz_segment(0, 8, flags=3), VIRTIO_BLK_S_UNSUPP),
    (VIRTIO_BLK_T_DISCARD, dwz_segment(0, MAX_DWZ + 1), VIRTIO_BLK_S_IOERR),
    (VIRTIO_BLK_T_WRITE_ZEROES, dwz_segment(0, MAX_DWZ + 1), VIRTIO_BLK_S_IOERR),
    (VIRTIO_BLK_T_DISCARD, dwz_segment(CAPACITY - 4, 8), VIRTIO_BLK_S_IOERR),
    (VIRTIO_BLK_T_WRITE_ZEROES, dwz_segment(2**64 - 4, 8), VIRTIO_BLK_S_IOERR),
    (VIRTIO_BLK_T_DISCARD, dwz_segment(0, 8)[:15], VIRTIO_BLK_S_IOERR),  # partial segment
    (VIRTIO_BLK_T_DISCARD, b"", VIRTIO_BLK_S_IOERR),  # no segment
    (VIRTIO_BLK_T_DISCARD, dwz_segment(0, 8) * 2, VIRTIO_BLK_S_IOERR),  # more than max_discard_seg
    (VIRTIO_BLK_T_WRITE_ZEROES, dwz_segment(0, 8) * 256, VIRTIO_BLK_S_IOERR),
    # A bad segment after a good one: nothing is done at all.
    (VIRTIO_BLK_T_WRITE_ZEROES, dwz_segment(0, 8) + dwz_segment(CAPACITY, 1),
     VIRTIO_BLK_S_IOERR),
])
def test_bad_discard_or_write_zeroes(guest: FakeGuest, ring: SplitRing, disk: int,
                                     params: BlkParams, stats: BlkStats, type_: int,
                                     payload: bytes, status: int) -> None:
    before = os.pread(disk, CAPACITY * 512, 0)
    req = blk_req(guest, type_, out=payload)
    assert run_one(ring, req.bufs, params, stats) == 1
    assert status_of(guest, req) == status
    assert os.pread(disk, CAPACITY * 512, 0) == before


def test_discard_not_offered_is_unsupp(guest: FakeGuest, ring: SplitRing, disk: int,
                                       stats: BlkStats) -> None:
    p = blk_params(disk, max_discard_sectors=0, max_write_zeroes_sectors=0)
    try:
        for type_ in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            req = blk_req(guest, type_, out=dwz_segment(0, 8))
            run_one(ring, req.bufs, p, stats)
            assert status_of(guest, req) == VIRTIO_BLK_S_UNSUPP
    finally:
        p.close()


# -- parameters ----------------------------------------------------------------

INT64_MAX = 2**63 - 1


@pytest.mark.parametrize("kw", [
    {"block_size": 0},
    {"block_size": 256},
    {"block_size": 1536},                        # not a power of two
    {"capacity_sectors": 2**54},                 # the last byte is past 2**63 - 1
    {"data_offset": INT64_MAX - CAPACITY * 512 + 1},
    {"data_offset": 2**64 - 512},                # would wrap
])
def test_invalid_params_are_refused(guest: FakeGuest, ring: SplitRing, disk: int,
                                    stats: BlkStats, kw: dict) -> None:
    args = {"capacity_sectors": CAPACITY, **kw}
    p = BlkParams(disk, **args)
    try:
        req = blk_req(guest, VIRTIO_BLK_T_IN, 0, in_len=512)
        ring.add_chain(req.bufs)
        with pytest.raises(FrontendError):
            blk_serve(ring.vq, p, stats, 0)
    finally:
        p.close()
    assert ring.take_used() == []


def test_disk_ending_at_int64_max_is_served(guest: FakeGuest, ring: SplitRing, disk: int,
                                            stats: BlkStats) -> None:
    p = BlkParams(disk, CAPACITY, data_offset=INT64_MAX - CAPACITY * 512)
    try:
        req = blk_req(guest, VIRTIO_BLK_T_IN, CAPACITY - 1, in_len=512)
        run_one(ring, req.bufs, p, stats)
    finally:
        p.close()
    assert status_of(guest, req) == VIRTIO_BLK_S_OK  # far past EOF: zeros
    assert req.data_gpa is not None
    assert guest.read(req.data_gpa, 512) == bytes(512)


@pytest.mark.parametrize(("type_", "sector", "length", "status"), [
    (VIRTIO_BLK_T_IN, 8, 8192, VIRTIO_BLK_S_OK),
    (VIRTIO_BLK_T_IN, 1, 4096, VIRTIO_BLK_S_IOERR),      # offset inside a block
    (VIRTIO_BLK_T_IN, 8, 512, VIRTIO_BLK_S_IOERR),       # part of a block
    (VIRTIO_BLK_T_OUT, 8, 4096 + 512, VIRTIO_BLK_S_IOERR),
    (VIRTIO_BLK_T_OUT, 4, 4096, VIRTIO_BLK_S_IOERR),
    (VIRTIO_BLK_T_OUT, 16, 4096, VIRTIO_BLK_S_OK),
])
def test_requests_must_be_whole_logical_blocks(guest: FakeGuest, ring: SplitRing, disk: int,
                                               stats: BlkStats, type_: int, sector: int,
                                               length: int, status: int) -> None:
    p = blk_params(disk, block_size=4096)
    data = fill(length, seed=41)
    try:
        if type_ == VIRTIO_BLK_T_IN:
            req = blk_req(guest, type_, sector, in_len=length)
        else:
            req = blk_req(guest, type_, sector, out=data)
        run_one(ring, req.bufs, p, stats)
    finally:
        p.close()
    assert status_of(guest, req) == status
    if type_ == VIRTIO_BLK_T_OUT:
        assert (file_bytes(disk, sector, length) == data) == (status == VIRTIO_BLK_S_OK)


# -- encrypted volumes -----------------------------------------------------------

DATA_OFFSET = 64 * 1024  # where the encrypted segment starts in the file
XTS_KEY = bytes(range(64))


@pytest.fixture
def enc_disk() -> Iterator[int]:
    with disk_file(DATA_OFFSET + CAPACITY * 512) as fd:
        yield fd


# Sector size x how sectors are encrypted, of the paths this machine offers:
# nitro's own XTS (VAES 512- and 256-bit, AES-NI), several sectors per call
# where the guest's buffers allow, and OpenSSL's, one sector per call.
@pytest.fixture(params=[(s, i) for i in HERE if i != "evp-init" for s in (512, 4096)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def xts(request: pytest.FixtureRequest) -> Iterator[XtsCipher]:
    sector, impl = request.param
    key = secret_of(XTS_KEY)
    x = XtsCipher(key, sector)
    x.impl = impl
    key.close()
    yield x
    x.close()


@pytest.fixture(params=[False, True], ids=["copy", "mapped"])
def enc_params(request: pytest.FixtureRequest, enc_disk: int, xts: XtsCipher) -> Iterator[BlkParams]:
    """Reads decrypted from a copy of the ciphertext, or (mapped) straight
    from a mapping of the image where its pages are in memory."""
    p = BlkParams(enc_disk, CAPACITY, serial=SERIAL, xts=xts, data_offset=DATA_OFFSET,
                  block_size=xts.sector_size)
    if request.param:
        p.map_image()
        assert p.image_mapped
    yield p
    p.close()


def segment_bytes(fd: int, sector: int, length: int) -> bytes:
    return os.pread(fd, length, DATA_OFFSET + sector * 512)


def split(base: int, total: int, cuts: list[int], writable: bool) -> list[Buf]:
    """Buffers covering [base, base + total) cut at the given offsets."""
    edges = [0, *cuts, total]
    return [Buf(base + a, b - a, writable) for a, b in zip(edges, edges[1:])]


def test_encrypted_round_trip_across_straddling_buffers(
        guest: FakeGuest, ring: SplitRing, enc_disk: int, xts: XtsCipher,
        enc_params: BlkParams, stats: BlkStats) -> None:
    """Sectors split over guest buffers at odd places: written as dm-crypt
    would (plain64 IVs from the segment start), read back to plaintext."""
    data = fill(3 * 4096, seed=51)
    cuts = [100, 4000, 4097, 9000]
    hdr, buf, status = guest.alloc(16), guest.alloc(len(data)), guest.alloc(1, align=1)
    guest.write(hdr, blk_header(VIRTIO_BLK_T_OUT, 16))
    guest.write(buf, data)
    out = [Buf(hdr, 16), *split(buf, len(data), cuts, False), Buf(status, 1, True)]
    assert run_one(ring, out, enc_params, stats) == 1
    assert guest.read(status, 1)[0] == VIRTIO_BLK_S_OK
    assert guest.read(buf, len(data)) == data  # the guest's plaintext untouched
    on_disk = segment_bytes(enc_disk, 16, len(data))
    assert on_disk == reference_xts(XTS_KEY, data, 16 * 512, xts.sector_size)

    guest.write(hdr, blk_header(VIRTIO_BLK_T_IN, 16))
    guest.write(buf, bytes(len(data)))
    back = [Buf(hdr, 16), *split(buf, len(data), cuts, True), Buf(status, 1, True)]
    assert run_one(ring, back, enc_params, stats) == len(data) + 1
    assert guest.read(status, 1)[0] == VIRTIO_BLK_S_OK
    assert guest.read(buf, len(data)) == data


def test_encrypted_read_never_decrypts_guest_memory(
        guest: FakeGuest, ring: SplitRing, enc_disk: int, xts: XtsCipher,
        enc_params: BlkParams, stats: BlkStats) -> None:
    """The guest must not choose what gets decrypted. Here two descriptors
    of one read alias the same guest buffer, so anything that read into
    guest memory and decrypted there would decrypt bytes the guest's buffer
    held, not the disk's ciphertext: the buffer would end as garbage. Done
    right, each sector is decrypted from host memory, and the buffer ends
    holding the last sector's plaintext."""
    n = xts.sector_size
    data = fill(2 * n, seed=52)
    os.pwrite(enc_disk, reference_xts(XTS_KEY, data, 8 * 512, n), DATA_OFFSET + 8 * 512)
    hdr, buf, status = guest.alloc(16), guest.alloc(n), guest.alloc(1, align=1)
    guest.write(hdr, blk_header(VIRTIO_BLK_T_IN, 8))
    bufs = [Buf(hdr, 16), Buf(buf, n, True), Buf(buf, n, True), Buf(status, 1, True)]
    assert run_one(ring, bufs, enc_params, stats) == 2 * n + 1
    assert guest.read(status, 1)[0] == VIRTIO_BLK_S_OK
    assert guest.read(buf, n) == data[n:]


def test_encrypted_reads_larger_than_the_bounce_buffer(
        guest: FakeGuest, ring: SplitRing, enc_disk: int, xts: XtsCipher,
        enc_params: BlkParams, stats: BlkStats) -> None:
    data = fill(640 * 1024, seed=53)  # 2.5 bounce buffers
    os.pwrite(enc_disk, reference_xts(XTS_KEY, data, 0, xts.sector_size), DATA_OFFSET)
    req = blk_req(guest, VIRTIO_BLK_T_IN, 0, in_len=len(data))
    assert run_one(ring, req.bufs, enc_params, stats) == len(data) + 1
    assert status_of(guest, req) == VIRTIO_BLK_S_OK
    assert req.data_gpa is not None
    assert guest.read(req.data_gpa, len(data)) == data


def test_encrypted_misaligned_request_is_ioerr(guest: FakeGuest, ring: SplitRing,
                                               enc_disk: int, stats: BlkStats) -> None:
    key = secret_of(XTS_KEY)
    x = XtsCipher(key, 4096)
    key.close()
    p = BlkParams(enc_disk, CAPACITY, xts=x, data_offset=DATA_OFFSET, block_size=4096)
    before = os.pread(enc_disk, DATA_OFFSET + CAPACITY * 512, 0)
    try:
        read = blk_req(guest, VIRTIO_BLK_T_IN, 1, in_len=4096)
        run_one(ring, read.bufs, p, stats)
        write = blk_req(guest, VIRTIO_BLK_T_OUT, 8, out=fill(512))
        run_one(ring, write.bufs, p, stats)
    finally:
        p.close()
        x.close()
    assert status_of(guest, read) == status_of(guest, write) == VIRTIO_BLK_S_IOERR
    assert read.data_gpa is not None
    assert guest.read(read.data_gpa, 4096) == b"\xff" * 4096  # nothing delivered
    assert os.pread(enc_disk, DATA_OFFSET + CAPACITY * 512, 0) == before


def test_block_size_smaller_than_the_encryption_sector_is_refused(
        ring: SplitRing, enc_disk: int, stats: BlkStats) -> None:
    key = secret_of(XTS_KEY)
    x = XtsCipher(key, 4096)
    key.close()
    p = BlkParams(enc_disk, CAPACITY, xts=x, data_offset=DATA_OFFSET, block_size=512)
    try:
        with pytest.raises(FrontendError):
            blk_serve(ring.vq, p, stats, 0)
    finally:
        p.close()
        x.close()


# -- the serving loop ----------------------------------------------------------

class Server:
    """blk_serve in a worker thread, as the trio layer runs it."""

    def __init__(self, ring: SplitRing, params: BlkParams, stats: BlkStats,
                 idle_ms: int) -> None:
        self.result: int | Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(ring, params, stats, idle_ms))
        self.thread.start()

    def _run(self, ring: SplitRing, params: BlkParams, stats: BlkStats, idle_ms: int) -> None:
        try:
            self.result = blk_serve(ring.vq, params, stats, idle_ms)
        except Exception as e:  # noqa: BLE001 -- handed to the test by join()
            self.result = e

    def join(self, timeout: float = 5.0) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "serve loop did not return"
        assert isinstance(self.result, int), self.result
        return self.result


def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_stop_wakes_a_loop_waiting_forever(ring: SplitRing, params: BlkParams,
                                           stats: BlkStats) -> None:
    server = Server(ring, params, stats, idle_ms=-1)
    time.sleep(0.1)
    assert server.thread.is_alive()
    t0 = time.monotonic()
    ring.vq.stop()
    assert server.join() == 0
    assert time.monotonic() - t0 < 1.0
    # Still stopped: returns at once until cleared.
    assert blk_serve(ring.vq, params, stats, 10_000) == 0
    ring.vq.clear_stop()
    assert blk_serve(ring.vq, params, stats, 0) == 0


def test_idle_timeout_returns(ring: SplitRing, params: BlkParams, stats: BlkStats) -> None:
    t0 = time.monotonic()
    assert blk_serve(ring.vq, params, stats, 100) == 0
    elapsed = time.monotonic() - t0
    assert 0.09 <= elapsed < 2.0


def test_kick_wakes_the_loop(guest: FakeGuest, ring: SplitRing, disk: int,
                             params: BlkParams, stats: BlkStats) -> None:
    server = Server(ring, params, stats, idle_ms=10_000)
    time.sleep(0.05)
    data = fill(4096, seed=21)
    ring.add_chain(blk_req(guest, VIRTIO_BLK_T_OUT, 64, out=data).bufs)
    ring.kick()
    wait_for(lambda: ring.used_idx() == 1)
    ring.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
    ring.kick()
    wait_for(lambda: ring.used_idx() == 2)
    ring.vq.stop()
    assert server.join() == 2
    assert file_bytes(disk, 64, 4096) == data
    assert ring.vq.stats()["kicks"] >= 1
    assert ring.calls() >= 1


def test_without_kick_fd_serves_what_is_there(guest: FakeGuest, params: BlkParams,
                                              stats: BlkStats) -> None:
    with SplitRing(guest, num=8, kick=False) as r:
        for _ in range(3):
            r.add_chain(blk_req(guest, VIRTIO_BLK_T_FLUSH).bufs)
        assert blk_serve(r.vq, params, stats, 10_000) == 3



def test_encrypted_request_slot_reuses_its_buffer_across_sizes(
        guest: FakeGuest, ring: SplitRing, enc_disk: int, xts: XtsCipher,
        enc_params: BlkParams, stats: BlkStats) -> None:
    """One request at a time on one serving ring, so each takes the slot
    (and the ciphertext buffer it kept) the one before left: a 128 KiB
    write, then reads smaller than the kept buffer and larger (it must
    grow), checked against the plaintext and dm-crypt's ciphertext. (A kept
    buffer too small would not show here: the kernel and libcrypto write
    past its end unseen by ASan and the data still round-trips.)"""
    expect = bytearray(fill(256 * 1024, seed=54))  # the device's plaintext
    os.pwrite(enc_disk, reference_xts(XTS_KEY, bytes(expect), 0, xts.sector_size), DATA_OFFSET)
    data = fill(256 * 1024, seed=55)
    server = Server(ring, enc_params, stats, idle_ms=10_000)
    steps = [("out", 0, 128 * 1024), ("in", 8, 4096), ("in", 0, 256 * 1024),
             ("out", 256, 64 * 1024), ("in", 0, 128 * 1024)]
    try:
        for n, (kind, sector, length) in enumerate(steps, start=1):
            off = sector * 512
            if kind == "out":
                req = blk_req(guest, VIRTIO_BLK_T_OUT, sector, out=data[off:off + length])
                expect[off:off + length] = data[off:off + length]
            else:
                req = blk_req(guest, VIRTIO_BLK_T_IN, sector, in_len=length)
            ring.add_chain(req.bufs)
            ring.kick()
            wait_for(lambda n=n: ring.used_idx() == n)
            assert status_of(guest, req) == VIRTIO_BLK_S_OK, (kind, sector, length)
            if kind == "in":
                assert req.data_gpa is not None
                assert guest.read(req.data_gpa, length) == bytes(expect[off:off + length])
    finally:
        ring.vq.stop()
        assert server.join() == len(steps)
    on_disk = segment_bytes(enc_disk, 0, len(expect))
    assert on_disk == reference_xts(XTS_KEY, bytes(expect), 0, xts.sector_size)


# -- statistics ----------------------------------------------------------------

def test_stats_snapshot(guest: FakeGuest, ring: SplitRing, params: BlkParams,
                        stats: BlkStats) -> None:
    run_one(ring, blk_req(guest, VIRTIO_BLK_T_IN, 0, in_len=4096).bufs, params, stats)
    run_one(ring, blk_req(guest, VIRTIO_BLK_T_OUT, 0, out=fill(1024)).bufs, params, stats)
    run_one(ring, blk_req(guest, VIRTIO_BLK_T_OUT, CAPACITY, out=fill(512)).bufs, params, stats)
    run_one(ring, blk_req(guest, VIRTIO_BLK_T_GET_ID, in_len=20).bufs, params, stats)
    run_one(ring, blk_req(guest, 77).bufs, params, stats)
    snap = stats.snapshot()
    ops = snap["ops"]
    assert ops["in"] == {"requests": 1, "bytes": 4096, "errors": 0}
    assert ops["out"] == {"requests": 2, "bytes": 1024, "errors": 1}
    assert ops["get_id"] == {"requests": 1, "bytes": 20, "errors": 0}
    assert ops["unsupported"] == {"requests": 1, "bytes": 0, "errors": 1}
    assert ops["flush"] == ops["discard"] == ops["write_zeroes"] == {
        "requests": 0, "bytes": 0, "errors": 0}
    latency = snap["latency"]
    assert all([b for b, _ in h["buckets"]] == list(LATENCY_BOUNDS) for h in latency.values())
    assert LATENCY_BOUNDS[-1] == float("inf")
    # One histogram per operation: each request in its own.
    assert {op: sum(n for _, n in h["buckets"]) for op, h in latency.items()} == {
        "in": 1, "out": 2, "flush": 0, "get_id": 1, "discard": 0, "write_zeroes": 0, "unsupported": 1}
    assert 0 < sum(h["sum_seconds"] for h in latency.values()) < 5
    assert latency["flush"]["sum_seconds"] == 0
    assert snap["inflight"] == 0
    assert ring.vq.stats()["chains"] == 5


# -- seg_max / size_max: the work of one request is bounded (issue 11 item 5) --

LIMITS = {"seg_max": 4, "size_max": 4096}


def _segmented(guest: FakeGuest, type_: int, sector: int, sizes: list[int],
               data: bytes = b"", same_buffer: bool = False) -> BlkReq:
    """header, one descriptor per size, status; same_buffer: every data
    descriptor points at one buffer (what a hostile driver may do)."""
    hdr = guest.alloc(16)
    guest.write(hdr, blk_header(type_, sector))
    bufs = [Buf(hdr, 16)]
    base = guest.alloc(max(sizes) if same_buffer else sum(sizes))
    if data:
        guest.write(base, data)
    off = 0
    for size in sizes:
        bufs.append(Buf(base + off, size, writable=type_ == VIRTIO_BLK_T_IN))
        off += 0 if same_buffer else size
    status = guest.alloc(1, align=1)
    guest.write(status, b"\xee")
    bufs.append(Buf(status, 1, writable=True))
    return BlkReq(bufs, status, base)


def test_a_request_within_seg_max_and_size_max_is_served(guest: FakeGuest, ring: SplitRing,
                                                         disk: int, stats: BlkStats) -> None:
    data = fill(4 * 4096, seed=41)
    p = blk_params(disk, **LIMITS)
    req = _segmented(guest, VIRTIO_BLK_T_OUT, 64, [4096] * 4, data)
    assert run_one(ring, req.bufs, p, stats) == 1
    assert status_of(guest, req) == VIRTIO_BLK_S_OK
    p.close()
    assert file_bytes(disk, 64, len(data)) == data


@pytest.mark.parametrize("type_", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
@pytest.mark.parametrize("sizes", [[512] * 5, [8192]], ids=["seg_max+1", "size_max*2"])
def test_a_request_beyond_seg_max_or_size_max_is_ioerr(guest: FakeGuest, ring: SplitRing, disk: int,
                                                       stats: BlkStats, type_: int,
                                                       sizes: list[int]) -> None:
    before = file_bytes(disk, 64, 8192)
    p = blk_params(disk, **LIMITS)
    req = _segmented(guest, type_, 64, sizes, fill(sum(sizes), seed=42))
    assert run_one(ring, req.bufs, p, stats) == 1
    assert status_of(guest, req) == VIRTIO_BLK_S_IOERR
    p.close()
    assert file_bytes(disk, 64, 8192) == before
    op = "in" if type_ == VIRTIO_BLK_T_IN else "out"
    assert stats.snapshot()["ops"][op]["errors"] == 1


def test_many_descriptors_on_one_buffer_do_not_write_the_disk(guest: FakeGuest, disk: int,
                                                              stats: BlkStats) -> None:
    """The issue's case: a ring's worth of descriptors all pointing at one
    buffer made one write span the disk. Past seg_max it is IOERR at once."""
    before = file_bytes(disk, 0, 200 * 4096)
    p = blk_params(disk, seg_max=64, size_max=65536)
    with SplitRing(guest, num=256) as r:
        req = _segmented(guest, VIRTIO_BLK_T_OUT, 0, [4096] * 200, fill(4096, seed=43),
                         same_buffer=True)
        assert run_one(r, req.bufs, p, stats) == 1
        assert status_of(guest, req) == VIRTIO_BLK_S_IOERR
    p.close()
    assert file_bytes(disk, 0, 200 * 4096) == before
