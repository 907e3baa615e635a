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

import os
from pathlib import Path

from nitro import _datapath
from nitro.config import EncryptionConfig
from nitro.crypto import keys, luks
from nitro.devices.blk.backends.raw import RawImage, VolumeError


class LuksVolume:
    def __init__(self, raw: RawImage, info: luks.LuksInfo, xts: _datapath.XtsCipher,
                 size: int) -> None:
        self.raw, self.info, self.xts = raw, info, xts
        self.path, self.fd, self.readonly = raw.path, raw.fd, raw.readonly
        self.size = size                  # the data segment, in bytes
        self.data_offset = info.data_offset
        self.block_size = info.sector_size

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
                data_size = _data_size(raw, info, size)
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
        return cls(raw, info, xts, data_size)

    @property
    def capacity_sectors(self) -> int:
        return self.size // 512

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        """Wipe the key (OpenSSL contexts cleansed) and drop the flock."""
        self.xts.close()
        self.raw.close()


def _unlock(path: Path, enc: EncryptionConfig) -> tuple[luks.LuksInfo, _datapath.XtsCipher]:
    source = enc.key_file or enc.passphrase_file
    assert source is not None  # config.py guarantees exactly one
    keys.harden_process()  # before any key material is in memory
    secret = keys.read_secret(source, passphrase=enc.key_file is None)
    try:
        info, volume_key = luks.unlock(path, secret)
    finally:
        secret.close()
    try:
        return info, _datapath.XtsCipher(volume_key, info.sector_size, info.iv_tweak)
    except ValueError as e:
        raise luks.UnsupportedVolumeError(f"{path}: {e}") from None
    finally:
        volume_key.close()


def _data_size(raw: RawImage, info: luks.LuksInfo, want: int | None) -> int:
    """The guest-visible size: the segment's, or for a "dynamic" segment the
    rest of the file (grown to `want` when configured, never shrunk)."""
    file_size = raw.size
    ss = info.sector_size
    if file_size < info.data_offset + ss:
        raise VolumeError(f"{raw.path}: {file_size} bytes is smaller than its LUKS2 header "
                          f"and data offset ({info.data_offset} bytes) plus one sector")
    size = info.data_size if info.data_size is not None else file_size - info.data_offset
    if want is not None and want != size:
        size = _resize(raw, info, want, size)
    if size % ss or info.data_offset + size > max(file_size, raw.size):
        raise VolumeError(f"{raw.path}: data segment of {size} bytes is not a whole number of "
                          f"{ss}-byte sectors inside the file")
    return size


def _resize(raw: RawImage, info: luks.LuksInfo, want: int, size: int) -> int:
    if want < size or want % info.sector_size or info.data_size is not None or raw.readonly:
        raise VolumeError(f"{raw.path}: configured size {want} differs from the encrypted data "
                          f"segment ({size} bytes); nitro only grows dynamic segments")
    os.ftruncate(raw.fd, info.data_offset + want)  # dm-crypt grows the same way
    raw.size = info.data_offset + want
    return want
