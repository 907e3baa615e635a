"""Fixtures shared by the datapath unit tests: a disk image, blk params on
it, and blk stats. Test modules with other needs define their own (a
module's fixture overrides these)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nitro._datapath import BlkParams, BlkStats
from tests.unit.virtq import disk_file

CAPACITY = 2048  # sectors: 1 MiB


@pytest.fixture
def disk() -> Iterator[int]:
    with disk_file(CAPACITY * 512) as fd:
        yield fd


@pytest.fixture
def params(disk: int) -> Iterator[BlkParams]:
    p = BlkParams(disk, CAPACITY)
    yield p
    p.close()


@pytest.fixture
def stats() -> Iterator[BlkStats]:
    s = BlkStats()
    yield s
    s.close()
