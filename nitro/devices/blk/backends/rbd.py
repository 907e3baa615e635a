"""RBD volumes: a Ceph RBD image served through librbd (cffi_build/nitro_rbd.c).

`source = "rbd:POOL/IMAGE"` with `ceph_conf`, `user` and `keyring`. Opening
connects to the cluster, opens the image and takes its exclusive lock (the
RBD exclusive-lock feature, held until close), so a second daemon attaching
the same image gets a VolumeLockedError instead of writing beside the first.
The guest sees the image byte for byte, 512-byte sectors, with DISCARD and
WRITE_ZEROES mapped to librbd's.
"""

from __future__ import annotations

import errno
from pathlib import Path

from nitro import _datapath
from nitro.config import RbdSource
from nitro.devices.blk.backends.raw import VolumeError, VolumeLockedError
from nitro.devices.blk.config import SECTOR_SIZE


class RbdVolume:
    """The volume interface of RawImage (see BlkDevice) for an RBD image."""

    block_size = SECTOR_SIZE
    data_offset = 0
    xts = None
    fd = -1                   # no file: the ring does its I/O through `rbd`
    supports_discard = True   # rbd_aio_discard / rbd_aio_write_zeroes

    def __init__(self, src: RbdSource, rbd: _datapath.RbdImage, readonly: bool) -> None:
        self.src, self.rbd, self.readonly = src, rbd, readonly
        self.size = rbd.size

    @classmethod
    def open(cls, src: RbdSource, *, readonly: bool) -> RbdVolume:
        """Connect and open (blocking: call off the trio thread)."""
        name = f"rbd:{src.pool}/{src.image}"
        try:
            rbd = _datapath.RbdImage(str(src.ceph_conf), src.user, str(src.keyring or ""), src.pool,
                                     src.image, readonly)
        except _datapath.RbdOpenError as e:
            if e.stage == "lock" and e.errno in (errno.EBUSY, errno.EROFS, errno.EAGAIN):
                raise VolumeLockedError(f"{name}: attached elsewhere (another client holds the "
                                        "image's exclusive lock)") from None
            raise VolumeError(f"{name}: cannot open ({e}; ceph_conf {src.ceph_conf}, "
                              f"user {src.user})") from None
        if rbd.size == 0 or rbd.size % SECTOR_SIZE:
            rbd.close()
            raise VolumeError(f"{name}: size {rbd.size} is not a positive multiple of {SECTOR_SIZE} bytes")
        return cls(src, rbd, readonly)

    @property
    def path(self) -> Path:
        """What messages name the volume by."""
        return Path(f"rbd:{self.src.pool}/{self.src.image}")

    @property
    def capacity_sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def make_ring(self, vq: _datapath.Virtqueue, params: _datapath.BlkParams,
                  stats: _datapath.BlkStats, index: int) -> _datapath.Ring:
        """Queue `index`'s ring: librbd's aio on the image."""
        return _datapath.Ring.blk_rbd(vq, self.rbd, params, stats)

    def flush(self) -> None:
        if not self.readonly:
            self.rbd.flush()

    def close(self) -> None:
        """Release the lock, close the image, disconnect."""
        self.rbd.close()
