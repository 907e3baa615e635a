"""Fixtures shared by the datapath unit tests (test_datapath_*.py).

  guest   a one-region FakeGuest at virtq.GPA whose guards must be intact
          when the test ends
  ring    a SplitRing of NUM entries in `guest`
  disk    an unlinked temporary disk image of CAPACITY sectors (fd)
  params  virtq.blk_params(disk, CAPACITY): discard/write zeroes offered
  stats   a zeroed BlkStats

A test module tunes them with the module-level constants its tests use
anyway (read through ``request.module``, pytest's way for a fixture to see
the requesting module):

  CAPACITY    disk size in 512-byte sectors      (default virtq.CAPACITY)
  GUEST_SIZE  bytes of the guest's one region    (default 4 MiB)
  NUM         entries of the `ring` fixture      (default 16)
  DISK_SEED   if set, the disk holds fill(CAPACITY * 512, DISK_SEED)
              instead of zeros
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nitro._datapath import BlkParams, BlkStats
from tests.unit import virtq
from tests.unit.virtq import FakeGuest, SplitRing


def _module_int(request: pytest.FixtureRequest, name: str, default: int) -> int:
    value = getattr(request.module, name, default)
    assert isinstance(value, int), f"{request.module.__name__}.{name} must be an int"
    return value


@pytest.fixture
def capacity(request: pytest.FixtureRequest) -> int:
    """The test module's CAPACITY (sectors)."""
    return _module_int(request, "CAPACITY", virtq.CAPACITY)


@pytest.fixture
def guest(request: pytest.FixtureRequest) -> Iterator[FakeGuest]:
    with virtq.guarded_guest(virtq.GPA, _module_int(request, "GUEST_SIZE", 4 * virtq.MiB)) as g:
        yield g


@pytest.fixture
def ring(request: pytest.FixtureRequest, guest: FakeGuest) -> Iterator[SplitRing]:
    with SplitRing(guest, num=_module_int(request, "NUM", 16)) as r:
        yield r


@pytest.fixture
def disk(request: pytest.FixtureRequest, capacity: int) -> Iterator[int]:
    size = capacity * 512
    seed = getattr(request.module, "DISK_SEED", None)
    with virtq.disk_file(size, None if seed is None else virtq.fill(size, seed)) as fd:
        yield fd


@pytest.fixture
def params(disk: int, capacity: int) -> Iterator[BlkParams]:
    p = virtq.blk_params(disk, capacity)
    yield p
    p.close()


@pytest.fixture
def stats() -> Iterator[BlkStats]:
    s = BlkStats()
    yield s
    s.close()
