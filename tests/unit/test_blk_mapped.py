"""Encrypted reads straight from a mapping of the image (nitro_blk.c,
blk_mapped_read): on an engine worker, a read whose pages are in memory is
decrypted from the mapping with no io_uring I/O; one whose pages are not
(a hole, a truncated image) goes through io_uring as before. The
encrypted datapath tests in test_datapath_blk.py run on both paths too
(their `enc_params` fixture)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nitro import _datapath
from nitro._datapath import BlkParams, BlkStats, Ring, XtsCipher
from tests.ringlayout import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from tests.unit.test_crypto_xts import reference_xts, secret_of
from tests.unit.test_engine import wait_used
from tests.unit.virtq import MiB, SplitRing, blk_req, disk_file, fill, guarded_guest, status_of

GPA = 0x1000_0000
CAPACITY = 4096  # sectors: 2 MiB
WRITTEN = CAPACITY // 2  # sectors of ciphertext written; the rest is a hole
DATA_OFFSET = 64 * 1024
KEY = bytes(range(64))
PLAIN = fill(WRITTEN * 512, seed=9)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def image() -> Iterator[int]:
    with disk_file(DATA_OFFSET + CAPACITY * 512) as fd:
        os.pwrite(fd, reference_xts(KEY, PLAIN, 0, 512), DATA_OFFSET)
        yield fd


def reads(image: int, sectors: list[int], length: int, mapped: bool) -> tuple[list[bytes], int]:
    """Read `length` bytes at each sector on an engine worker: what the
    guest got, and how much I/O the worker put through io_uring."""
    key = secret_of(KEY)
    xts = XtsCipher(key, 512)
    key.close()
    params = BlkParams(image, CAPACITY, xts=xts, data_offset=DATA_OFFSET)
    if mapped:
        params.map_image()
        assert params.image_mapped
    stats, e = BlkStats(), _datapath.Engine(1)
    with guarded_guest(GPA, 8 * MiB) as guest, SplitRing(guest, num=64) as ring:
        r = Ring.blk(ring.vq, params, stats)
        e.attach(r, 0)
        try:
            reqs = [blk_req(guest, VIRTIO_BLK_T_IN, sector=s, in_len=length) for s in sectors]
            for q in reqs:
                ring.add_chain(q.bufs)
            ring.kick()
            wait_used(ring, len(reqs))
            assert all(status_of(guest, q) == VIRTIO_BLK_S_OK for q in reqs)
            got = [guest.read(q.data_gpa, length) for q in reqs]
            submitted = e.worker_stats(0)["io_submitted"]
        finally:
            e.detach(r)
            r.close()
            e.close()
    params.close()
    xts.close()
    return got, submitted


def expected(sector: int, length: int) -> bytes:
    return PLAIN[sector * 512:sector * 512 + length]


@pytest.mark.parametrize("length", [4096, 64 * 1024])
def test_reads_in_memory_are_decrypted_from_the_mapping(image: int, length: int) -> None:
    sectors = [0, 8, 520, WRITTEN - length // 512]
    got, submitted = reads(image, sectors, length, mapped=True)
    assert got == [expected(s, length) for s in sectors]
    assert submitted == 0  # no io_uring I/O: served from the mapping
    got, submitted = reads(image, sectors, length, mapped=False)
    assert got == [expected(s, length) for s in sectors]
    assert submitted >= len(sectors)  # the same reads, the other path


def test_pages_not_in_memory_go_through_io_uring(image: int) -> None:
    """The hole after the written half is in no page: mincore says so, and
    the worker reads it through io_uring instead of faulting it in."""
    sector = WRITTEN + 16
    got, submitted = reads(image, [sector], 4096, mapped=True)
    assert got == [reference_xts(KEY, bytes(4096), sector * 512, 512, encrypt=False)]
    assert submitted == 1


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
        with guarded_guest(GPA, 8 * MiB) as guest, SplitRing(guest, num=16) as ring:
            r = Ring.blk(ring.vq, params, stats)
            e.attach(r, 0)
            q = blk_req(guest, VIRTIO_BLK_T_IN, sector=8, in_len=4096)
            ring.add_chain(q.bufs)
            ring.kick()
            wait_used(ring, 1)
            assert status_of(guest, q) == VIRTIO_BLK_S_OK
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
