"""Encrypted volumes: a LUKS2 image (aes-xts-plain64) served decrypted.

The guest sees the data segment only, as a plain disk whose logical block
size is the encryption sector size; every byte the datapath writes to the
file is ciphertext (cffi_build/nitro_xts.c). The header is read once, at
open, through libcryptsetup (nitro/crypto/luks.py); the volume key goes from
libcryptsetup straight into C memory and on into OpenSSL contexts, and the
intermediate copy is wiped before open() returns.

Opening never writes to the image: every failure (key, header, geometry)
is a VolumeError naming the image, raised before the device exists.
"""

from __future__ import annotations

from pathlib import Path

from nitro import _datapath
from nitro.config import EncryptionConfig
from nitro.crypto import keys, luks
from nitro.devices.blk.backends.raw import SECTOR_SIZE, RawImage, VolumeError


class LuksVolume:
    """The volume interface of RawImage (see BlkDevice), for the data
    segment of a LUKS2 image. Everything about the file (path, fd, lock,
    size) is the RawImage's; everything about the segment is the header's."""

    # A hole or a zeroed range of ciphertext does not read back as zeros,
    # and which blocks the guest freed is itself a leak (dm-crypt refuses
    # discards by default too): never offer DISCARD or WRITE_ZEROES.
    supports_discard = False

    def __init__(self, raw: RawImage, info: luks.LuksInfo, xts: _datapath.XtsCipher) -> None:
        self.raw, self.info, self.xts = raw, info, xts

    @classmethod
    def open(cls, path: Path, enc: EncryptionConfig, *, size: int | None,
             readonly: bool) -> LuksVolume:
        if not path.exists():
            raise VolumeError(f"{path}: no such encrypted volume; create it with "
                              "`nitro volume create --encrypt`")
        raw = RawImage.open(path, size=None, readonly=readonly)  # takes the flock
        try:
            info, xts = _unlock(path, enc)
            try:
                _fit_segment(raw, info, size)
            except BaseException:
                xts.close()
                raise
        except keys.KeyMaterialError as e:
            raw.close()
            raise VolumeError(f"{path}: {e}") from None
        except luks.LuksError as e:
            raw.close()
            raise VolumeError(str(e)) from None
        except BaseException:
            raw.close()
            raise
        return cls(raw, info, xts)

    @property
    def path(self) -> Path:
        return self.raw.path

    @property
    def fd(self) -> int:
        return self.raw.fd

    @property
    def readonly(self) -> bool:
        return self.raw.readonly

    @property
    def size(self) -> int:
        """The data segment in bytes: what the guest sees."""
        return _segment_size(self.raw, self.info)

    @property
    def data_offset(self) -> int:
        return self.info.data_offset

    @property
    def block_size(self) -> int:
        """The guest's logical block size: the encryption sector size."""
        return self.info.sector_size

    @property
    def capacity_sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def make_ring(self, vq: _datapath.Virtqueue, params: _datapath.BlkParams,
                  stats: _datapath.BlkStats, index: int) -> _datapath.Ring:
        return self.raw.make_ring(vq, params, stats, index)

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        """Wipe the key (OpenSSL contexts cleansed) and drop the flock."""
        self.xts.close()
        self.raw.close()


def _unlock(path: Path, enc: EncryptionConfig) -> tuple[luks.LuksInfo, _datapath.XtsCipher]:
    keys.harden_process()  # before any key material is in memory
    with keys.read_key(key_file=enc.key_file, passphrase_file=enc.passphrase_file) as secret:
        info, volume_key = luks.unlock(path, secret)
    with volume_key:
        try:
            return info, _datapath.XtsCipher(volume_key, info.sector_size, info.iv_tweak)
        except ValueError as e:
            raise luks.UnsupportedVolumeError(f"{path}: {e}") from None


def _segment_size(raw: RawImage, info: luks.LuksInfo) -> int:
    """A fixed segment's size, or a "dynamic" one's: the rest of the file."""
    return info.data_size if info.data_size is not None else raw.size - info.data_offset


def _fit_segment(raw: RawImage, info: luks.LuksInfo, want: int | None) -> None:
    """Check the segment lies in the file, growing a dynamic one to `want`
    bytes when configured (never shrinking it)."""
    ss = info.sector_size
    if raw.size < info.data_offset + ss:
        raise VolumeError(f"{raw.path}: {raw.size} bytes is smaller than its LUKS2 header "
                          f"and data offset ({info.data_offset} bytes) plus one sector")
    size = _segment_size(raw, info)
    if want is not None and want != size:
        if want < size or want % ss or info.data_size is not None or raw.readonly:
            raise VolumeError(f"{raw.path}: configured size {want} differs from the encrypted "
                              f"data segment ({size} bytes); nitro only grows dynamic segments")
        raw.grow(info.data_offset + want)  # dm-crypt sees a grown device the same way
        size = want
    if size % ss or info.data_offset + size > raw.size:
        raise VolumeError(f"{raw.path}: data segment of {size} bytes is not a whole number of "
                          f"{ss}-byte sectors inside the file")
