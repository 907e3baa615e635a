"""Guard for tools/build-sanitized.sh: the tests it runs must really import
the ASan build of the extension, and replay every corpus and regression
input through it (the fuzzers found them with the C compiled in directly;
here the same inputs go through cffi)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzz.ringfmt import replay
from tests.fuzz.vhost_target import run_one

HERE = Path(__file__).resolve().parent
EXPECT = os.environ.get("NITRO_EXPECT_EXTENSION")


def test_the_extension_under_test_is_the_expected_one():
    import nitro._nitro_c as ext

    if EXPECT:  # set by tools/build-sanitized.sh
        assert Path(ext.__file__).resolve().parent == Path(EXPECT).resolve(), ext.__file__


def _inputs(kind: str) -> list[Path]:
    return sorted(p for d in ("corpus", "regressions")
                  for p in (HERE / d / kind).glob("*") if p.is_file())


@pytest.mark.parametrize("target", ["vring", "blk"])
def test_ring_inputs_replay_through_cffi(target):
    files = _inputs(target)
    assert files
    for p in files:
        assert replay(p.read_bytes()).guards_intact, p


def test_vhost_inputs_replay_through_cffi():
    fd = os.memfd_create("fuzz-disk", os.MFD_CLOEXEC)
    os.ftruncate(fd, 128 * 512)
    try:
        files = _inputs("vhost")
        assert files
        for p in files:
            run_one(p.read_bytes(), fd)
    finally:
        os.close(fd)
