"""Raw image backend: sparse create, grow, never shrink, locking."""

import os

import pytest

from nitro.devices.blk.backends.raw import RawImage, VolumeError, create_sparse


def test_create_is_sparse(tmp_path):
    p = tmp_path / "v.img"
    create_sparse(p, 1 << 30)
    st = os.stat(p)
    assert st.st_size == 1 << 30 and st.st_blocks == 0


def test_grows_but_never_shrinks(tmp_path):
    p = tmp_path / "v.img"
    p.write_bytes(b"x" * 4096)
    img = RawImage.open(p, size=8192, readonly=False)
    assert img.size == 8192 and img.capacity_sectors == 16
    img.close()
    assert p.read_bytes()[:4096] == b"x" * 4096
    with pytest.raises(VolumeError, match="refusing to shrink"):
        RawImage.open(p, size=4096, readonly=False)
    assert p.stat().st_size == 8192


def test_exclusive_lock(tmp_path):
    p = tmp_path / "v.img"
    a = RawImage.open(p, size=4096, readonly=False)
    with pytest.raises(VolumeError, match="in use"):
        RawImage.open(p, size=4096, readonly=False)
    a.close()
    RawImage.open(p, size=None, readonly=False).close()


@pytest.mark.parametrize("content, match", [(b"", "not a positive multiple"),
                                            (b"x" * 1000, "not a positive multiple")])
def test_bad_sizes(tmp_path, content, match):
    p = tmp_path / "v.img"
    p.write_bytes(content)
    with pytest.raises(VolumeError, match=match):
        RawImage.open(p, size=None, readonly=False)


def test_missing_readonly_image(tmp_path):
    with pytest.raises(VolumeError, match="cannot open"):
        RawImage.open(tmp_path / "none.img", size=None, readonly=True)
