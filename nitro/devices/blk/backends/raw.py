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

SECTOR_SIZE = 512


class VolumeError(Exception):
    """The image cannot be served (missing, wrong size, locked). The device
    does not start; nothing was written to the image."""


class RawImage:
    # The volume interface BlkDevice uses; an encrypted volume
    # (backends/luks.py) overrides these.
    block_size = SECTOR_SIZE  # the guest's logical block size
    data_offset = 0           # bytes of the file before sector 0
    xts = None                # the C sector cipher; None: plain

    def __init__(self, path: Path, fd: int, size: int, readonly: bool) -> None:
        self.path, self.fd, self.size, self.readonly = path, fd, size, readonly

    @classmethod
    def open(cls, path: Path, *, size: int | None, readonly: bool) -> RawImage:
        """Open (and when `size` is given, create sparse or grow) an image."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if size is not None and not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise VolumeError(f"{path}: cannot open: {e.strerror}") from None
        try:
            _lock(fd, path, readonly)
            actual = _fit_size(fd, path, size, readonly)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, actual, readonly)

    @property
    def capacity_sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def flush(self) -> None:
        if self.fd >= 0 and not self.readonly:
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also drops the flock
            self.fd = -1


def create_sparse(path: Path, size: int) -> None:
    """`nitro volume create` without encryption: a sparse raw file."""
    RawImage.open(path, size=size, readonly=False).close()


def _lock(fd: int, path: Path, readonly: bool) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise VolumeError(f"{path}: in use by another process (locked)") from None
        raise VolumeError(f"{path}: cannot lock: {e.strerror}") from None


def _fit_size(fd: int, path: Path, size: int | None, readonly: bool) -> int:
    """Grow a short image to `size`; never shrink one (that would lose data)."""
    actual = os.fstat(fd).st_size
    if size is not None and actual < size and not readonly:
        os.ftruncate(fd, size)
        actual = size
    elif size is not None and actual > size:
        raise VolumeError(
            f"{path}: image is {actual} bytes, larger than the configured size {size}; "
            "refusing to shrink it (raise the size or remove the key)")
    if actual == 0 or actual % SECTOR_SIZE:
        raise VolumeError(f"{path}: size {actual} is not a positive multiple of {SECTOR_SIZE} bytes")
    return actual
