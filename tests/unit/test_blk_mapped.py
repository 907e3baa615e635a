"""Reads straight from a mapping of the image (nitro_blk.c,
blk_mapped_read), plain and encrypted: on an engine worker, a read whose
pages are in memory is copied (decrypted) from the mapping with no
io_uring I/O; one whose pages are not (a hole, a truncated image) goes
through io_uring as before. The datapath tests in test_datapath_blk.py
run on both paths too (their `params` and `enc_params` fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nitro import _datapath
from nitro._datapath import BlkParams, BlkStats, Ring, XtsCipher
from tests.ringlayout import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from tests.unit import virtq
from tests.unit.test_crypto_xts import reference_xts, secret_of
from tests.unit.test_engine import wait_used
from tests.unit.virtq import BlkReq, FakeGuest, SplitRing, blk_req, disk_file, fill

GPA = 0x1000_0000
CAPACITY = 4096  # sectors: 2 MiB
WRITTEN = CAPACITY // 2  # sectors of ciphertext written; the rest is a hole
DATA_OFFSET = 64 * 1024
KEY = bytes(range(64))
PLAIN = fill(WRITTEN * 512, seed=9)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[True, False], ids=["luks", "plain"])
def encrypted(request: pytest.FixtureRequest) -> bool:
    return request.param


def stored(plain: bytes, encrypted: bool) -> bytes:
    """What the image holds for `plain` at offset 0 of the volume."""
    return reference_xts(KEY, plain, 0, 512) if encrypted else plain


@pytest.fixture
def image(encrypted: bool) -> Iterator[int]:
    with disk_file(DATA_OFFSET + CAPACITY * 512) as fd:
        os.pwrite(fd, stored(PLAIN, encrypted), DATA_OFFSET)
        yield fd


@dataclass
class Served:
    """A volume on an engine worker, one guest and one ring."""
    guest: FakeGuest
    ring: SplitRing
    stats: BlkStats
    engine: _datapath.Engine

    def run(self, reqs: list[BlkReq]) -> None:
        """Submit the requests, wait for all, check they succeeded."""
        for q in reqs:
            self.ring.add_chain(q.bufs)
        self.ring.kick()
        wait_used(self.ring, len(reqs))
        assert all(virtq.status_of(self.guest, q) == VIRTIO_BLK_S_OK for q in reqs)

    def io(self) -> dict[str, int]:
        """I/O the worker put through io_uring (`submitted`); reads the
        mapping served (`mapped`)."""
        return {"submitted": self.engine.worker_stats(0)["io_submitted"],
                "mapped": self.stats.snapshot()["mapped_reads"]}


@contextmanager
def served(image: int, mapped: bool, encrypted: bool) -> Iterator[Served]:
    xts = None
    if encrypted:
        key = secret_of(KEY)
        xts = XtsCipher(key, 512)
        key.close()
    params = BlkParams(image, CAPACITY, xts=xts, data_offset=DATA_OFFSET)
    if mapped:
        params.map_image()
        assert params.image_mapped
    stats, e = BlkStats(), _datapath.Engine(1)
    with virtq.guarded_guest(GPA, 8 * virtq.MiB) as guest, SplitRing(guest, num=64) as ring:
        r = Ring.blk(ring.vq, params, stats)
        e.attach(r, 0)
        try:
            yield Served(guest, ring, stats, e)
        finally:
            e.detach(r)
            r.close()
            e.close()
    params.close()
    if xts is not None:
        xts.close()


def reads(image: int, sectors: list[int], length: int, mapped: bool,
          encrypted: bool) -> tuple[list[bytes], dict[str, int]]:
    """Read `length` bytes at each sector on an engine worker: what the
    guest got, and the I/O it took (Served.io)."""
    with served(image, mapped, encrypted) as v:
        reqs = [blk_req(v.guest, VIRTIO_BLK_T_IN, sector=s, in_len=length) for s in sectors]
        v.run(reqs)
        return [v.guest.read(q.data_gpa, length) for q in reqs], v.io()


def expected(sector: int, length: int) -> bytes:
    return PLAIN[sector * 512:sector * 512 + length]


@pytest.mark.parametrize("length", [4096, 64 * 1024])
def test_reads_in_memory_are_served_from_the_mapping(image: int, encrypted: bool, length: int) -> None:
    sectors = [0, 8, 520, WRITTEN - length // 512]
    got, io = reads(image, sectors, length, mapped=True, encrypted=encrypted)
    assert got == [expected(s, length) for s in sectors]
    assert io == {"submitted": 0, "mapped": len(sectors)}  # no io_uring I/O
    got, io = reads(image, sectors, length, mapped=False, encrypted=encrypted)
    assert got == [expected(s, length) for s in sectors]
    assert io["submitted"] >= len(sectors) and io["mapped"] == 0  # the same reads, the other path


def test_pages_not_in_memory_go_through_io_uring(image: int, encrypted: bool) -> None:
    """The hole after the written half is in no page: mincore says so, and
    the worker reads it through io_uring instead of faulting it in."""
    sector = WRITTEN + 16
    got, io = reads(image, [sector], 4096, mapped=True, encrypted=encrypted)
    zeros = bytes(4096)
    assert got == [reference_xts(KEY, zeros, sector * 512, 512, encrypt=False) if encrypted else zeros]
    assert io == {"submitted": 1, "mapped": 0}


def test_a_write_is_seen_by_the_next_mapped_read(image: int, encrypted: bool) -> None:
    """Writes go through io_uring into the page cache the mapping shows:
    a read after an acknowledged write returns the new data."""
    new = fill(4096, seed=77)
    with served(image, mapped=True, encrypted=encrypted) as v:
        before = blk_req(v.guest, VIRTIO_BLK_T_IN, sector=64, in_len=4096)
        v.run([before])
        v.run([blk_req(v.guest, VIRTIO_BLK_T_OUT, sector=64, out=new)])
        after = blk_req(v.guest, VIRTIO_BLK_T_IN, sector=64, in_len=4096)
        v.run([after])
        assert v.guest.read(before.data_gpa, 4096) == expected(64, 4096)
        assert v.guest.read(after.data_gpa, 4096) == new
        assert v.io()["mapped"] == 2


def truncated_image_still_served() -> None:
    """The image shrinks under a mapped volume (an operator's mistake): its
    pages are gone, mincore sees it, and the reads go through io_uring
    (zeros past the end, as for any short file) instead of a SIGBUS."""
    with disk_file(DATA_OFFSET + CAPACITY * 512) as fd:
        os.pwrite(fd, reference_xts(KEY, PLAIN, 0, 512), DATA_OFFSET)
        key = secret_of(KEY)
        xts = XtsCipher(key, 512)
        params = BlkParams(fd, CAPACITY, xts=xts, data_offset=DATA_OFFSET)
        params.map_image()
        os.ftruncate(fd, DATA_OFFSET)
        stats, e = BlkStats(), _datapath.Engine(1)
        with virtq.guarded_guest(GPA, 8 * virtq.MiB) as guest, SplitRing(guest, num=16) as ring:
            r = Ring.blk(ring.vq, params, stats)
            e.attach(r, 0)
            q = blk_req(guest, VIRTIO_BLK_T_IN, sector=8, in_len=4096)
            ring.add_chain(q.bufs)
            ring.kick()
            wait_used(ring, 1)
            assert virtq.status_of(guest, q) == VIRTIO_BLK_S_OK
            assert guest.read(q.data_gpa, 4096) == reference_xts(KEY, bytes(4096), 8 * 512, 512,
                                                                 encrypt=False)
            assert e.worker_stats(0)["io_submitted"] == 1
            e.detach(r)
            r.close()
        e.close()
        params.close()
    print("survived")


def test_a_truncated_image_is_read_through_io_uring_not_faulted() -> None:
    code = "from tests.unit.test_blk_mapped import truncated_image_still_served as f; f()"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "survived" in p.stdout, (p.returncode, p.stdout, p.stderr)
