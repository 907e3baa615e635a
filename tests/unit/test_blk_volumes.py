"""Volume backends as BlkDevice sees them: RawImage, LuksVolume, and the
one place DISCARD/WRITE_ZEROES are decided (the volume's supports_discard)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nitro.config import BlkConfig, EncryptionConfig
from nitro.crypto import keys
from nitro.devices.base import VirtioBackend
from nitro.devices.blk import config as blkcfg
from nitro.devices.blk.backends.luks import LuksVolume
from nitro.devices.blk.backends.raw import MIN_REMOTE_WAIT_S, RawImage, VolumeError, VolumeLockedError
from nitro.devices.blk.device import BlkDevice
from tests.unit.test_volume_cli import luks_volume


def bit(features: int, b: int) -> bool:
    return bool(features >> b & 1)


def blk_cfg(image: Path, **kw) -> BlkConfig:
    return BlkConfig(id="vol0", socket=image.with_suffix(".sock"), image=image, size=None, **kw)


@pytest.fixture
def luks_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, EncryptionConfig]:
    monkeypatch.setattr(keys, "harden_process", lambda: True)  # not the test runner
    img = luks_volume(tmp_path, key_bits=512, sector_size=4096)
    return img, EncryptionConfig(key_file=tmp_path / "k")


def test_grow_extends_sparse_and_never_shrinks(tmp_path: Path) -> None:
    img = RawImage.open(tmp_path / "v.img", size=4096, readonly=False)
    try:
        img.grow(1 << 20)
        assert img.size == os.path.getsize(img.path) == 1 << 20
        img.grow(8192)
        assert img.size == os.path.getsize(img.path) == 1 << 20
    finally:
        img.close()
    ro = RawImage.open(tmp_path / "v.img", size=None, readonly=True)
    try:
        with pytest.raises(VolumeError, match="read-only"):
            ro.grow(2 << 20)
    finally:
        ro.close()


def test_lock_contention_is_its_own_error(tmp_path: Path) -> None:
    a = RawImage.open(tmp_path / "v.img", size=4096, readonly=False)
    try:
        with pytest.raises(VolumeLockedError, match="in use"):
            RawImage.open(a.path, size=None, readonly=False)
    finally:
        a.close()


def test_raw_device_offers_discard_and_write_zeroes(tmp_path: Path) -> None:
    img = tmp_path / "v.img"
    dev = BlkDevice(blk_cfg(img), RawImage.open(img, size=1 << 20, readonly=False))
    try:
        assert bit(dev.device_features, blkcfg.VIRTIO_BLK_F_DISCARD)
        assert bit(dev.device_features, blkcfg.VIRTIO_BLK_F_WRITE_ZEROES)
        assert dev.config_space.max_discard_sectors == blkcfg.MAX_DISCARD_SECTORS
        assert dev.config_space.max_write_zeroes_sectors == blkcfg.MAX_DISCARD_SECTORS
        assert isinstance(dev, VirtioBackend)  # the backend contract, every member present
    finally:
        dev.close()


def test_feature_bits_follow_the_limits() -> None:
    f = blkcfg.device_features(readonly=False, num_queues=1, max_discard_sectors=0,
                               max_write_zeroes_sectors=8)
    assert not bit(f, blkcfg.VIRTIO_BLK_F_DISCARD)
    assert bit(f, blkcfg.VIRTIO_BLK_F_WRITE_ZEROES)
    ro = blkcfg.device_features(readonly=True, num_queues=1)
    assert not bit(ro, blkcfg.VIRTIO_BLK_F_DISCARD)
    assert not bit(ro, blkcfg.VIRTIO_BLK_F_WRITE_ZEROES)


def test_luks_volume_derives_from_its_image(luks_image) -> None:
    img, enc = luks_image
    vol = LuksVolume.open(img, enc, size=None, readonly=False)
    assert not vol.supports_discard
    assert (vol.path, vol.fd, vol.readonly) == (vol.raw.path, vol.raw.fd, False)
    assert vol.size == 1 << 20 and vol.data_offset == 16 << 20
    assert vol.block_size == 4096 and vol.capacity_sectors == (1 << 20) // 512
    vol.close()
    assert vol.fd == -1  # not a stale copy of a closed descriptor


def test_luks_volume_grows_a_dynamic_segment(luks_image) -> None:
    img, enc = luks_image
    vol = LuksVolume.open(img, enc, size=2 << 20, readonly=False)
    try:
        assert vol.size == 2 << 20 and vol.capacity_sectors == (2 << 20) // 512
        assert os.path.getsize(img) == (16 << 20) + (2 << 20)
    finally:
        vol.close()
    with pytest.raises(VolumeError, match="only grows dynamic segments"):
        LuksVolume.open(img, enc, size=1 << 20, readonly=False)


def test_encrypted_device_offers_neither_discard_nor_write_zeroes(luks_image) -> None:
    img, enc = luks_image
    dev = BlkDevice(blk_cfg(img, encryption=enc),
                    LuksVolume.open(img, enc, size=None, readonly=False))
    try:
        assert not bit(dev.device_features, blkcfg.VIRTIO_BLK_F_DISCARD)
        assert not bit(dev.device_features, blkcfg.VIRTIO_BLK_F_WRITE_ZEROES)
        assert dev.config_space.max_discard_sectors == 0
        assert dev.config_space.max_write_zeroes_sectors == 0
        assert dev.config_space.blk_size == 4096
    finally:
        dev.close()


class _Volume(RawImage):
    """A raw image that records the flush bound it was given."""
    flushed: list[float | None]

    def flush(self, timeout: float | None = None) -> None:
        self.flushed.append(timeout)
        super().flush(timeout)


def test_a_drains_flush_waits_at_most_io_timeout_from_the_drains_start(tmp_path: Path) -> None:
    vol = _Volume.open(tmp_path / "v.img", size=1 << 20, readonly=False)
    vol.flushed = []
    dev = BlkDevice(blk_cfg(vol.path, io_timeout=20.0), vol)
    try:
        dev.flush()  # not a drain: the volume's own bound
        began = time.monotonic()
        dev.flush(began)
        dev.flush(began - 19.5)  # the rings' detach took most of it
        dev.flush(began - 60)
    finally:
        dev.close()
    assert vol.flushed[0] is None
    assert 19 < vol.flushed[1] <= 20
    assert vol.flushed[2] == MIN_REMOTE_WAIT_S  # under the floor: the floor
    assert vol.flushed[3] == MIN_REMOTE_WAIT_S
