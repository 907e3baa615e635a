"""Reads and writes straight through a mapping of the image (nitro_blk.c,
blk_mapped_read and blk_mapped_write), plain and encrypted: on an engine
worker, a read whose pages are in memory is copied (decrypted) from the
mapping with no io_uring I/O, a write whose pages are is copied
(encrypted) into it with no pwrite; others (a hole, a truncated image) go
through io_uring or pwrite as before. The datapath tests in
test_datapath_blk.py run on both paths too (their `params` and
`enc_params` fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from nitro import _datapath
from nitro._datapath import BlkParams, BlkStats, Ring, XtsCipher
from tests.ringlayout import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
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

    def run(self, reqs: list[BlkReq], status: int = VIRTIO_BLK_S_OK) -> None:
        """Submit the requests, wait for all, check each ended with `status`."""
        for q in reqs:
            self.ring.add_chain(q.bufs)
        self.ring.kick()
        wait_used(self.ring, len(reqs))
        assert [virtq.status_of(self.guest, q) for q in reqs] == [status] * len(reqs)

    def io(self) -> dict[str, int]:
        """I/O the worker put through io_uring (`submitted`); reads and
        writes the mapping served (`mapped`, `mapped_writes`)."""
        snap = self.stats.snapshot()
        return {"submitted": self.engine.worker_stats(0)["io_submitted"],
                "mapped": snap["mapped_reads"], "mapped_writes": snap["mapped_writes"]}


@contextmanager
def served(image: int, mapped: bool, encrypted: bool, readonly: bool = False) -> Iterator[Served]:
    xts = None
    if encrypted:
        key = secret_of(KEY)
        xts = XtsCipher(key, 512)
        key.close()
    params = BlkParams(image, CAPACITY, readonly=readonly, xts=xts, data_offset=DATA_OFFSET)
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
    assert io == {"submitted": 0, "mapped": len(sectors), "mapped_writes": 0}  # no io_uring I/O
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
    assert io == {"submitted": 1, "mapped": 0, "mapped_writes": 0}


@pytest.mark.parametrize("sector", [64, WRITTEN + 64], ids=["in-memory", "hole"])
def test_a_write_is_seen_by_the_next_mapped_read(image: int, encrypted: bool, sector: int) -> None:
    """A write lands in the page cache the mapping shows, whichever path
    took it (the mapping in memory, pwrite in a hole): a read after an
    acknowledged write returns the new data."""
    new = fill(4096, seed=77)
    with served(image, mapped=True, encrypted=encrypted) as v:
        v.run([blk_req(v.guest, VIRTIO_BLK_T_OUT, sector=sector, out=new)])
        after = blk_req(v.guest, VIRTIO_BLK_T_IN, sector=sector, in_len=4096)
        v.run([after])
        assert v.guest.read(after.data_gpa, 4096) == new
        assert v.io()["mapped"] == 1
        assert v.io()["mapped_writes"] == (1 if sector < WRITTEN else 0)


def on_disk(image: int, sector: int, length: int) -> bytes:
    return os.pread(image, length, DATA_OFFSET + sector * 512)


@pytest.mark.parametrize("length", [4096, 64 * 1024])
def test_writes_in_memory_go_through_the_mapping(image: int, encrypted: bool, length: int) -> None:
    """A write whose pages are in the page cache is copied (encrypted)
    into the mapping: no io_uring I/O, no pwrite, and the file holds
    exactly what a pwrite would have put there (the ciphertext of the
    data at its sector's IVs)."""
    sectors = [0, 256, 776, WRITTEN - length // 512]  # apart: no two overlap
    data = {s: fill(length, seed=s + 1) for s in sectors}
    with served(image, mapped=True, encrypted=encrypted) as v:
        v.run([blk_req(v.guest, VIRTIO_BLK_T_OUT, sector=s, out=data[s]) for s in sectors])
        assert v.io() == {"submitted": 0, "mapped": 0, "mapped_writes": len(sectors)}
    for s in sectors:
        want = reference_xts(KEY, data[s], s * 512, 512) if encrypted else data[s]
        assert on_disk(image, s, length) == want


def test_a_write_to_a_hole_goes_by_pwrite(image: int, encrypted: bool) -> None:
    """The hole has no page to write into: mincore says so, and the worker
    writes it the old way (a write there through the mapping would
    allocate the page on the worker, or fault on a full filesystem)."""
    data = fill(4096, seed=5)
    sector = WRITTEN + 8
    with served(image, mapped=True, encrypted=encrypted) as v:
        v.run([blk_req(v.guest, VIRTIO_BLK_T_OUT, sector=sector, out=data)])
        assert v.io()["mapped_writes"] == 0
    assert on_disk(image, sector, 4096) == (reference_xts(KEY, data, sector * 512, 512)
                                            if encrypted else data)


def test_a_read_only_volume_maps_read_only(image: int, encrypted: bool) -> None:
    """A read-only volume's mapping cannot be written: writes fail as
    before (IOERR) and the image keeps its bytes."""
    with served(image, mapped=True, encrypted=encrypted, readonly=True) as v:
        v.run([blk_req(v.guest, VIRTIO_BLK_T_OUT, sector=8, out=fill(4096, seed=3))],
              status=VIRTIO_BLK_S_IOERR)
        assert v.io()["mapped_writes"] == 0
    assert on_disk(image, 8, 4096) == stored(PLAIN, encrypted)[8 * 512:8 * 512 + 4096]


def test_an_image_opened_read_only_maps_read_only(tmp_path: Path) -> None:
    """A writable volume whose fd cannot write (an operator's read-only
    file) still maps for reads; writes take pwrite, which refuses them."""
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(DATA_OFFSET + CAPACITY * 512))
    fd = os.open(path, os.O_RDONLY)
    try:
        params = BlkParams(fd, CAPACITY, data_offset=DATA_OFFSET)
        params.map_image()
        assert params.image_mapped and not params.image_map_writable
        params.close()
    finally:
        os.close(fd)


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


def test_residency_is_asked_again_after_its_time(image: int, encrypted: bool) -> None:
    """mincore's answers are kept about 50 ms per span of 64 pages
    (nitro_blk.c, blk_span_resident): a hole filled behind the ring's back
    (another writer) is read through io_uring, correctly, while the ring
    still believes it empty, and from the mapping once it asks again."""
    sector = WRITTEN + 256  # a hole, its own span
    new = fill(4096, seed=11)
    with served(image, mapped=True, encrypted=encrypted) as v:
        first = blk_req(v.guest, VIRTIO_BLK_T_IN, sector=sector, in_len=4096)
        v.run([first])
        asked = time.monotonic()
        assert v.io()["mapped"] == 0  # the hole: io_uring, and remembered
        os.pwrite(image, reference_xts(KEY, new, sector * 512, 512) if encrypted else new,
                  DATA_OFFSET + sector * 512)
        soon = blk_req(v.guest, VIRTIO_BLK_T_IN, sector=sector, in_len=4096)
        v.run([soon])
        assert v.guest.read(soon.data_gpa, 4096) == new
        mapped_soon = v.io()["mapped"]
        if time.monotonic() - asked < 0.03:  # a stalled machine may pass the 50 ms
            assert mapped_soon == 0
        time.sleep(0.2)
        later = blk_req(v.guest, VIRTIO_BLK_T_IN, sector=sector, in_len=4096)
        v.run([later])
        assert v.guest.read(later.data_gpa, 4096) == new
        assert v.io()["mapped"] == mapped_soon + 1


def shrunk_image_faults_one_request() -> None:
    """The image shrinks while the ring still holds mincore's answer that
    its pages are in memory (an operator's mistake, inside the 50 ms an
    answer is kept): the next mapped copy faults (SIGBUS, past the end of
    the file). Its guard fails that request alone with IOERR; the ring,
    not broken, serves the next one. Prints what happened: the timing
    decides which case a slow machine sees."""
    with disk_file(DATA_OFFSET + CAPACITY * 512) as fd:
        os.pwrite(fd, PLAIN, DATA_OFFSET)
        params = BlkParams(fd, CAPACITY, data_offset=DATA_OFFSET)
        params.map_image()
        stats, e = BlkStats(), _datapath.Engine(1)
        with virtq.guarded_guest(GPA, 8 * virtq.MiB) as guest, SplitRing(guest, num=16) as ring:
            r = Ring.blk(ring.vq, params, stats)
            e.attach(r, 0)

            def read(sector: int) -> int:
                q = blk_req(guest, VIRTIO_BLK_T_IN, sector=sector, in_len=4096)
                ring.add_chain(q.bufs)
                ring.kick()
                wait_used(ring, 1)
                return virtq.status_of(guest, q)

            assert read(8) == VIRTIO_BLK_S_OK  # its span's answer: in memory
            t = time.monotonic()
            os.ftruncate(fd, DATA_OFFSET)
            faulted = read(16)  # same span, now past the end of the file
            quick = time.monotonic() - t < 0.03
            after = read(24)
            mapped = stats.snapshot()["mapped_reads"]
            e.detach(r)
            r.close()
        e.close()
        params.close()
    print(f"faulted={faulted} quick={quick} after={after} mapped={mapped}")


def test_a_fault_in_the_mapping_fails_one_request_not_the_device() -> None:
    code = "from tests.unit.test_blk_mapped import shrunk_image_faults_one_request as f; f()"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)  # no SIGBUS death
    got = dict(kv.split("=") for kv in p.stdout.split())
    if got["quick"] == "True":  # inside the answer's 50 ms: the copy faulted
        assert got["faulted"] == str(VIRTIO_BLK_S_IOERR), got
        assert got["mapped"] in ("2", "3"), got
    else:  # a stalled machine: mincore was asked again, io_uring read zeros
        assert got["faulted"] == str(VIRTIO_BLK_S_OK), got
    assert got["after"] in (str(VIRTIO_BLK_S_OK), str(VIRTIO_BLK_S_IOERR)), got  # still served
