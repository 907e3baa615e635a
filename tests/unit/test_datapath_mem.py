"""GuestMemory: region table and address translation (nitro_mem.c)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from nitro._datapath import FrontendError, GuestMemory, HostError
from tests.unit.virtq import GPA, UADDR_BASE, FakeGuest, MiB

SIZE = 1 * MiB
U64 = 2**64


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("nitro-test-mem", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * MiB)
    yield fd
    os.close(fd)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory()
    yield m
    m.close()


def test_translation_sees_the_same_bytes_by_gpa_and_uaddr() -> None:
    with FakeGuest([(GPA, SIZE)]) as g:
        g.write(GPA + 100, b"hello")
        assert g.mem.read(GPA + 100, 5) == b"hello"
        assert g.mem.read_uaddr(g.uaddr(GPA + 100), 5) == b"hello"
        assert len(g.mem) == 1


def test_unaligned_mmap_offset(memfd: int, mem: GuestMemory) -> None:
    os.pwrite(memfd, b"xyz", 1000)
    mem.add_region(memfd, GPA, SIZE, UADDR_BASE, 1000)
    assert mem.read(GPA, 3) == b"xyz"


@pytest.mark.parametrize(("offset", "length", "inside"), [
    (0, SIZE, True),
    (SIZE - 4, 4, True),
    (SIZE - 4, 5, False),
    (-1, 1, False),
    (SIZE, 0, False),
    (0, 0, True),
    (SIZE - 1, U64 - 1, False),  # length that wraps the address space
    (0, U64 - 1, False),
])
def test_bounds(offset: int, length: int, inside: bool) -> None:
    with FakeGuest([(GPA, SIZE)]) as g:
        got = g.mem.read(GPA + offset, length)
        assert (got is not None) == inside
        got = g.mem.read_uaddr(g.uaddr(GPA) + offset, length)
        assert (got is not None) == inside


def test_address_near_top_of_address_space(memfd: int, mem: GuestMemory) -> None:
    top = U64 - SIZE - 4096
    mem.add_region(memfd, top, SIZE, UADDR_BASE, 0)
    assert mem.read(top + SIZE - 1, 1) is not None
    assert mem.read(top + SIZE - 1, 2) is None
    assert mem.read(U64 - 1, 1) is None
    assert mem.read(U64 - 1, U64 - 1) is None


def test_region_ending_at_2_pow_64_is_refused(memfd: int, mem: GuestMemory) -> None:
    with pytest.raises(FrontendError):
        mem.add_region(memfd, U64 - SIZE, SIZE, UADDR_BASE, 0)
    with pytest.raises(FrontendError):
        mem.add_region(memfd, GPA, SIZE, U64 - SIZE, 0)


def test_range_spanning_two_adjacent_regions_is_not_translated() -> None:
    with FakeGuest([(GPA, SIZE), (GPA + SIZE, SIZE)]) as g:
        assert g.mem.read(GPA + SIZE - 8, 8) is not None
        assert g.mem.read(GPA + SIZE, 8) is not None
        assert g.mem.read(GPA + SIZE - 8, 16) is None


def test_each_region_maps_its_own_file_range() -> None:
    with FakeGuest([(GPA, SIZE), (0x8000_0000, SIZE)]) as g:
        g.write(GPA, b"first")
        g.write(0x8000_0000, b"second")
        assert g.mem.read(GPA, 5) == b"first"
        assert g.mem.read(0x8000_0000, 6) == b"second"
        assert g.mem.read(GPA + SIZE, 1) is None  # the hole between them


@pytest.mark.parametrize(("gpa", "size", "uaddr"), [
    (GPA + SIZE // 2, SIZE, UADDR_BASE + 8 * MiB),  # gpa overlaps
    (GPA - SIZE + 1, SIZE, UADDR_BASE + 8 * MiB),  # gpa overlaps from below
    (GPA + 8 * MiB, SIZE, UADDR_BASE + 4096),  # uaddr overlaps
    (GPA + 8 * MiB, 0, UADDR_BASE + 8 * MiB),  # empty
])
def test_overlapping_or_empty_regions_are_refused(
        memfd: int, mem: GuestMemory, gpa: int, size: int, uaddr: int) -> None:
    mem.add_region(memfd, GPA, SIZE, UADDR_BASE, 0)
    with pytest.raises(FrontendError):
        mem.add_region(memfd, gpa, size, uaddr, 0)
    assert len(mem) == 1


def test_at_most_32_regions(memfd: int, mem: GuestMemory) -> None:
    for i in range(32):
        mem.add_region(memfd, GPA + i * 4096, 4096, UADDR_BASE + i * 4096, i * 4096)
    with pytest.raises(FrontendError):
        mem.add_region(memfd, GPA + 32 * 4096, 4096, UADDR_BASE + 32 * 4096, 0)
    assert len(mem) == 32


def test_region_beyond_end_of_file_is_refused(memfd: int, mem: GuestMemory) -> None:
    # Touching such a mapping would SIGBUS the daemon.
    with pytest.raises(FrontendError):
        mem.add_region(memfd, GPA, 4 * MiB, UADDR_BASE, 4096)


def test_bad_fds(mem: GuestMemory) -> None:
    with pytest.raises(FrontendError):
        mem.add_region(-1, GPA, SIZE, UADDR_BASE, 0)
    r, w = os.pipe()
    try:
        with pytest.raises(HostError) as info:
            mem.add_region(r, GPA, SIZE, UADDR_BASE, 0)
        assert info.value.errno != 0
    finally:
        os.close(r)
        os.close(w)
    assert len(mem) == 0


def test_remove_region(memfd: int, mem: GuestMemory) -> None:
    mem.add_region(memfd, GPA, SIZE, UADDR_BASE, 0)
    mem.add_region(memfd, GPA + SIZE, SIZE, UADDR_BASE + SIZE, SIZE)
    with pytest.raises(FrontendError):
        mem.remove_region(GPA, SIZE - 4096)  # size must match too
    mem.remove_region(GPA, SIZE)
    assert len(mem) == 1
    assert mem.read(GPA, 1) is None
    assert mem.read(GPA + SIZE, 1) is not None
    with pytest.raises(FrontendError):
        mem.remove_region(GPA, SIZE)
    # The freed range can be reused.
    mem.add_region(memfd, GPA, SIZE, UADDR_BASE, 0)
    assert len(mem) == 2


def test_close_is_idempotent_and_final() -> None:
    m = GuestMemory()
    m.close()
    m.close()
    with pytest.raises(ValueError):
        len(m)
