"""Encrypted volumes: a LUKS2 volume (aes-xts-plain64) served decrypted,
on any source: an image file, an NBD export or an RBD image.

The guest sees the data segment only, as a plain disk whose logical block
size is the encryption sector size; every byte the datapath writes to the
file or sends to the server is ciphertext (cffi_build/nitro_xts.c; the NBD
and RBD rings encrypt into, and decrypt out of, their requests' own
buffers). The header is read once, at open, through libcryptsetup
(nitro/crypto/luks.py); the volume key goes from libcryptsetup straight
into C memory and on into OpenSSL contexts, and the intermediate copy is
wiped before open returns.

A remote volume's metadata is copied into a memfd first (the headers and
keyslot areas only, planned with hard bounds by nitro/crypto/luks_header.py:
it comes from the network) and libcryptsetup unlocks that copy; the
server keeps the only real header. `format_remote` is the reverse, for
`nitro volume create --encrypt`: libcryptsetup formats a sparse memfd of
the remote's size and its metadata is written to the remote.

Opening never writes to the volume: every failure (key, header, geometry)
is a VolumeError naming the image or source, raised before the device
exists.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from nitro import _datapath
from nitro.config import EncryptionConfig
from nitro.crypto import keys, luks, luks_header
from nitro.devices.blk.backends.raw import (
    SECTOR_SIZE,
    UNREACHABLE,
    RawImage,
    SourceUnavailableError,
    VolumeError,
)

if TYPE_CHECKING:
    from nitro.devices.blk.backends.nbd import NbdVolume
    from nitro.devices.blk.backends.rbd import RbdVolume

    Inner = RawImage | NbdVolume | RbdVolume


T = TypeVar("T")


class BlockIO(Protocol):
    """Synchronous reads and durable writes on a remote volume, by byte
    offset (NbdHandle, rbd.RbdBlockIO): the control plane's, never a ring's."""

    def pread(self, count: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes, offset: int) -> None: ...


class RemoteVolume(Protocol):
    """What a remote backend offers besides the volume interface."""
    size: int

    @property
    def path(self) -> Any: ...

    def block_io(self) -> AbstractContextManager[BlockIO]: ...

    def close(self) -> None: ...


class LuksVolume:
    """The volume interface of RawImage (see BlkDevice), for the data
    segment of a LUKS2 volume on an inner volume (a RawImage, NbdVolume or
    RbdVolume). Everything about the storage (path, fd, lock, size, the
    ring) is the inner volume's; everything about the segment is the
    header's."""

    # A hole or a zeroed range of ciphertext does not read back as zeros,
    # and which blocks the guest freed is itself a leak (dm-crypt refuses
    # discards by default too): never offer DISCARD or WRITE_ZEROES.
    supports_discard = False

    def __init__(self, inner: Inner, info: luks.LuksInfo, xts: _datapath.XtsCipher) -> None:
        self.raw, self.info, self.xts = inner, info, xts
        # A remote inner volume's connection counters (`nitro status`, the
        # device's "remote"): present exactly when the inner volume has them.
        if hasattr(inner, "statistics"):
            self.statistics = inner.statistics

    @classmethod
    def open(cls, path: Path, enc: EncryptionConfig, *, size: int | None,
             readonly: bool) -> LuksVolume:
        """The LUKS2 image file at `path`."""
        if not path.exists():
            raise VolumeError(f"{path}: no such encrypted volume; create it with "
                              "`nitro volume create --encrypt`")
        raw = RawImage.open(path, size=None, readonly=readonly)  # takes the flock
        return cls._unlocked(raw, str(path), lambda: _unlock(path, enc, str(path)), size)

    @classmethod
    def on_remote(cls, inner: RemoteVolume, enc: EncryptionConfig) -> LuksVolume:
        """The LUKS2 volume on an open NBD export or RBD image (closed if
        this fails)."""
        name = str(inner.path)

        def unlock() -> tuple[luks.LuksInfo, _datapath.XtsCipher]:
            with inner.block_io() as io, _metadata_copy(io, inner.size, name) as (copy, plan):
                info, xts = _unlock(copy, enc, name)
            if info.data_offset != plan.data_offset:  # libcryptsetup took the other header
                xts.close()
                raise luks.LuksError(f"{name}: the two LUKS2 headers disagree on the data "
                                     "offset; repair the volume (cryptsetup repair)")
            return info, xts

        return cls._unlocked(inner, name, unlock, None)

    @classmethod
    def _unlocked(cls, inner: Any, name: str,
                  unlock: Callable[[], tuple[luks.LuksInfo, _datapath.XtsCipher]],
                  size: int | None) -> LuksVolume:
        """Unlock and check the segment; any failure closes `inner` and is
        a VolumeError naming the volume."""
        try:
            info, xts = unlock()
            try:
                _fit_segment(inner, info, size)
            except BaseException:
                xts.close()
                raise
        except keys.KeyMaterialError as e:
            inner.close()
            raise VolumeError(f"{name}: {e}") from None
        except luks.LuksError as e:
            inner.close()
            raise VolumeError(str(e)) from None
        except BaseException:
            inner.close()
            raise
        return cls(inner, info, xts)

    @property
    def path(self) -> Any:
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

    def flush(self, timeout: float | None = None) -> None:
        self.raw.flush(timeout)

    def close(self) -> None:
        """Wipe the key (OpenSSL contexts cleansed) and drop the flock."""
        self.xts.close()
        self.raw.close()


def _unlock(path: Path, enc: EncryptionConfig,
            name: str) -> tuple[luks.LuksInfo, _datapath.XtsCipher]:
    keys.harden_process()  # before any key material is in memory
    with keys.read_key(key_file=enc.key_file, passphrase_file=enc.passphrase_file) as secret:
        info, volume_key = luks.unlock(path, secret, name=name)
    with volume_key:
        try:
            return info, _datapath.XtsCipher(volume_key, info.sector_size, info.iv_tweak)
        except ValueError as e:
            raise luks.UnsupportedVolumeError(f"{name}: {e}") from None


# ---- a remote volume's metadata ---------------------------------------------

@contextlib.contextmanager
def _memfd(size: int) -> Iterator[tuple[int, Path]]:
    """A sparse anonymous file of `size` bytes and a path libcryptsetup
    opens it by (it holds no key material: keyslots are encrypted)."""
    fd = os.memfd_create("nitro-luks-metadata", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        yield fd, Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _remote_read(io: BlockIO, count: int, offset: int, size: int, name: str) -> bytes:
    if offset + count > size:
        raise luks_header.HeaderError(
            f"{name}: the volume ({size} bytes) is too small for its LUKS2 metadata")
    try:
        data = io.pread(count, offset)
    except (OSError, _datapath.NbdError) as e:
        # A server that stopped answering (or an RBD read past io_timeout)
        # passes like any unreachable source: the device waits.
        error = SourceUnavailableError if e.errno in UNREACHABLE else VolumeError
        raise error(f"{name}: reading the LUKS2 header: {e}") from None
    if len(data) != count:
        raise VolumeError(f"{name}: reading the LUKS2 header: short read")
    return data


@contextlib.contextmanager
def _metadata_copy(io: BlockIO, size: int,
                   name: str) -> Iterator[tuple[Path, luks_header.Plan]]:
    """The remote's headers and keyslot areas, at their own offsets in a
    sparse memfd as large as the remote (libcryptsetup checks the geometry)."""
    head = _remote_read(io, luks_header.BINARY_HEADER, 0, size, name)
    hdr_size = luks_header.parse_binary(head, name)
    headers = _remote_read(io, 2 * hdr_size, 0, size, name)
    plan = luks_header.plan(headers, size, name)
    with _memfd(size) as (fd, path):
        _pwrite_all(fd, headers, 0)
        for off, count in plan.keyslot_areas:
            _pwrite_all(fd, _remote_read(io, count, off, size, name), off)
        yield path, plan


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def format_remote(inner: RemoteVolume, secret: _datapath.Secret, *, key_bits: int,
                  sector_size: int, pbkdf: luks.Pbkdf) -> luks.LuksInfo:
    """Write a new LUKS2 header to a remote volume (`nitro volume create
    --encrypt`). Refuses, writing nothing, unless every byte it would
    write over is zero: a volume's data is never destroyed silently."""
    name = str(inner.path)
    with inner.block_io() as io:
        # A volume that is LUKS already is refused before the PBKDF runs.
        _refuse_overwrite(_remote_read(io, min(luks_header.BINARY_HEADER, inner.size), 0,
                                       inner.size, name), name)
        with _memfd(inner.size) as (fd, path):
            info = luks.format_volume(path, secret, key_bits=key_bits, sector_size=sector_size,
                                      pbkdf=pbkdf, name=name)
            _check_geometry(inner.size, info, name)
            metadata = os.pread(fd, info.data_offset, 0)
        _refuse_overwrite(_remote_read(io, info.data_offset, 0, inner.size, name), name)
        try:
            io.pwrite(metadata, 0)
        except (OSError, _datapath.NbdError) as e:
            raise VolumeError(f"{name}: writing the LUKS2 header: {e}") from None
    return info


def remote_info(inner: RemoteVolume) -> luks.LuksInfo:
    """The LUKS2 header of a remote volume (`nitro volume info`);
    NotLuksError if it holds none."""
    name = str(inner.path)
    with inner.block_io() as io, _metadata_copy(io, inner.size, name) as (path, _):
        return luks.read_info(path, name=name)


def change_remote(inner: RemoteVolume, change: Callable[[Path, str], T]) -> T:
    """`change(path, name)` (libcryptsetup adding or destroying keyslots)
    on a local copy of a remote volume's metadata, then every block it
    changed written back to the volume, durably, in the order
    luks_header.changed_runs gives (`nitro volume add-key`, `remove-key`,
    `erase`). Nothing is written if `change` raises."""
    name = str(inner.path)
    # Compared up to the largest metadata a header may describe, not the
    # primary's: libcryptsetup may work from a newer secondary whose
    # keyslots area is larger.
    extent = min(inner.size, luks_header.MAX_METADATA)
    with inner.block_io() as io, _metadata_copy(io, inner.size, name) as (path, plan):
        before = _read_copy(path, extent)
        result = change(path, name)
        after = _read_copy(path, extent)
        changed = luks_header.plan(after[:2 * plan.hdr_size], inner.size, name)
        if changed.data_offset != plan.data_offset:
            raise VolumeError(f"{name}: the change moved the data segment ({plan.data_offset} -> "
                              f"{changed.data_offset}); nothing written (cryptsetup repair?)")
        for off, data in luks_header.changed_runs(before, after, plan.hdr_size):
            try:
                io.pwrite(data, off)
            except (OSError, _datapath.NbdError) as e:
                raise VolumeError(f"{name}: writing the LUKS2 metadata at {off}: {e}") from None
    return result


def _read_copy(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(size)
    if len(data) != size:
        raise VolumeError(f"{path}: short read of the LUKS2 metadata copy")
    return data


def _refuse_overwrite(current: bytes, name: str) -> None:
    if current.rstrip(b"\0"):
        what = "a LUKS volume" if current.startswith(luks_header.MAGIC_PRIMARY) else "data"
        raise VolumeError(f"{name}: already holds {what} in its first {len(current)} bytes, "
                          "where the LUKS2 header goes; refusing to overwrite it (give nitro "
                          "an empty volume)")


def _check_geometry(size: int, info: luks.LuksInfo, name: str) -> None:
    ss = info.sector_size
    if size < info.data_offset + ss or (size - info.data_offset) % ss:
        raise VolumeError(f"{name}: {size} bytes do not hold the LUKS2 header "
                          f"({info.data_offset} bytes) and a whole number of {ss}-byte sectors")


def _segment_size(raw: Inner, info: luks.LuksInfo) -> int:
    """A fixed segment's size, or a "dynamic" one's: the rest of the file."""
    return info.data_size if info.data_size is not None else raw.size - info.data_offset


def _fit_segment(raw: Inner, info: luks.LuksInfo, want: int | None) -> None:
    """Check the segment lies in the file, growing a dynamic one to `want`
    bytes when configured (never shrinking it)."""
    ss = info.sector_size
    if raw.size < info.data_offset + ss:
        raise VolumeError(f"{raw.path}: {raw.size} bytes is smaller than its LUKS2 header "
                          f"and data offset ({info.data_offset} bytes) plus one sector")
    size = _segment_size(raw, info)
    if want is not None and want != size:
        if (want < size or want % ss or info.data_size is not None or raw.readonly
                or not isinstance(raw, RawImage)):  # a remote's size is its server's
            raise VolumeError(f"{raw.path}: configured size {want} differs from the encrypted "
                              f"data segment ({size} bytes); nitro only grows dynamic segments")
        raw.grow(info.data_offset + want)  # dm-crypt sees a grown device the same way
        size = want
    if size % ss or info.data_offset + size > raw.size:
        raise VolumeError(f"{raw.path}: data segment of {size} bytes is not a whole number of "
                          f"{ss}-byte sectors inside the volume")
