"""Raw image files: the volume is the file, byte for byte.

Created sparse (ftruncate) so a 1 TiB volume costs nothing until written;
DISCARD punches holes back. The file is locked (flock) so two daemons, or a
daemon and a careless operator's second config entry, never serve one image.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from nitro import _datapath
from nitro.devices.blk.config import SECTOR_SIZE


class VolumeError(Exception):
    """The image cannot be served (missing, wrong size, locked). The device
    does not start; nothing was written to the image."""


class SourceUnavailableError(VolumeError):
    """A remote source (NBD server, Ceph cluster) cannot be reached now.
    Unlike other VolumeErrors this may pass by itself: the daemon serves
    its other devices and keeps trying this one (docs/volumes.md)."""


#: The least any bounded wait on remote storage at a stop gets (a flush,
#: each NBD connection's flush, an RBD close), however little is left of
#: the drain's bound: a server that answers gets the chance to.
MIN_REMOTE_WAIT_S = 1.0

# Connect errnos that say the server is not there (yet): SourceUnavailableError.
# Any other (TLS refused, no such export, a refused key) is a configuration
# for the operator to fix.
UNREACHABLE = frozenset({errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                         errno.ENETUNREACH, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})


class VolumeLockedError(VolumeError):
    """Another process holds the image's lock: a daemon serving it, or a
    `nitro volume` command changing it."""


class RawImage:
    # The volume interface BlkDevice uses; an encrypted volume
    # (backends/luks.py) overrides these.
    block_size = SECTOR_SIZE  # the guest's logical block size
    data_offset = 0           # bytes of the file before sector 0
    xts = None                # the C sector cipher; None: plain
    supports_discard = True   # DISCARD punches holes, WRITE_ZEROES zeroes

    def __init__(self, path: Path, fd: int, size: int, readonly: bool) -> None:
        self.path, self.fd, self.size, self.readonly = path, fd, size, readonly

    @classmethod
    def open(cls, path: Path, *, size: int | None, readonly: bool) -> RawImage:
        """Open (and when `size` is given, create sparse or grow) an image
        to serve, holding its flock."""
        img = cls.locked(path, readonly=readonly, create=size is not None and not readonly)
        try:
            img._fit(size)
        except BaseException:
            img.close()
            raise
        return img

    @classmethod
    def locked(cls, path: Path, *, readonly: bool, create: bool = False) -> RawImage:
        """The image file opened and flocked (exclusive; shared when
        read-only), its size not checked: what `nitro volume` holds while it
        changes a header. VolumeLockedError when another process holds it."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise VolumeError(f"{path}: cannot open: {e.strerror}") from None
        img = cls(path, fd, 0, readonly)
        try:
            _lock(fd, path, readonly)
            img.size = os.fstat(fd).st_size
        except BaseException:
            img.close()
            raise
        return img

    @property
    def capacity_sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def make_ring(self, vq: _datapath.Virtqueue, params: _datapath.BlkParams,
                  stats: _datapath.BlkStats, index: int) -> _datapath.Ring:
        """Queue `index`'s ring: I/O on the file through the worker's io_uring."""
        return _datapath.Ring.blk(vq, params, stats)

    def grow(self, size: int) -> None:
        """Extend the file to `size` bytes (sparse: nothing is written); a
        file already that large is left alone. Never shrinks."""
        if self.readonly:
            raise VolumeError(f"{self.path}: read-only; cannot grow it to {size} bytes")
        if size > self.size:
            os.ftruncate(self.fd, size)
            self.size = size

    def flush(self, timeout: float | None = None) -> None:
        """fdatasync (`timeout`: remote volumes' bound; a local file has none)."""
        if self.fd >= 0 and not self.readonly:
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also drops the flock
            self.fd = -1

    def _fit(self, size: int | None) -> None:
        """Grow a short image to `size`; never shrink one (that would lose data)."""
        if size is not None and self.size > size:
            raise VolumeError(
                f"{self.path}: image is {self.size} bytes, larger than the configured size "
                f"{size}; refusing to shrink it (raise the size or remove the key)")
        if size is not None and not self.readonly:
            self.grow(size)
        if self.size == 0 or self.size % SECTOR_SIZE:
            raise VolumeError(f"{self.path}: size {self.size} is not a positive multiple of "
                              f"{SECTOR_SIZE} bytes")


def create_sparse(path: Path, size: int) -> None:
    """`nitro volume create` without encryption: a sparse raw file."""
    RawImage.open(path, size=size, readonly=False).close()


def _lock(fd: int, path: Path, readonly: bool) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise VolumeLockedError(f"{path}: in use by another process (locked)") from None
        raise VolumeError(f"{path}: cannot lock: {e.strerror}") from None
