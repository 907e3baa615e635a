"""RBD volumes: a Ceph RBD image served through librbd (cffi_build/nitro_rbd.c).

`source = "rbd:POOL/IMAGE"` with `ceph_conf`, `user` and `keyring`. Opening
connects to the cluster, opens the image and takes its exclusive lock (the
RBD exclusive-lock feature, held until close), so a second daemon attaching
the same image gets a VolumeLockedError instead of writing beside the first.
The guest sees the image byte for byte, 512-byte sectors, with DISCARD and
WRITE_ZEROES mapped to librbd's; or, with `encryption`, the data segment of
the LUKS2 volume on it (backends/luks.py; the ring encrypts and decrypts).

A cluster that is away makes librbd wait and resend without bound; the
ring fails a request io_timeout after it was sent (cffi_build/nitro_rbd.c),
and flush and close here give up after io_timeout too, so a daemon whose
cluster is gone still stops (docs/volumes.md "RBD").
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from nitro import _datapath
from nitro.config import DEFAULT_IO_TIMEOUT, RbdSource
from nitro.devices.blk.backends.raw import (
    MIN_REMOTE_WAIT_S,
    UNREACHABLE,
    SourceUnavailableError,
    VolumeError,
    VolumeLockedError,
)
from nitro.devices.blk.config import SECTOR_SIZE
from nitro.log import log_event

log = logging.getLogger("nitro.blk")


class RbdVolume:
    """The volume interface of RawImage (see BlkDevice) for an RBD image."""

    block_size = SECTOR_SIZE
    data_offset = 0
    xts = None
    fd = -1                   # no file: the ring does its I/O through `rbd`
    supports_discard = True   # rbd_aio_discard / rbd_aio_write_zeroes

    def __init__(self, src: RbdSource, rbd: _datapath.RbdImage, readonly: bool,
                 io_timeout: float = DEFAULT_IO_TIMEOUT) -> None:
        self.src, self.rbd, self.readonly, self.io_timeout = src, rbd, readonly, io_timeout
        self.size = rbd.size
        self.unreachable = False  # a flush found the cluster away
        # A drain's flush sets when close() must be done by (time.monotonic()):
        # the stop's bound covers the close too.
        self._close_by: float | None = None

    @classmethod
    def open(cls, src: RbdSource, *, readonly: bool, io_timeout: float = DEFAULT_IO_TIMEOUT,
             owner_file: Path | None = None) -> RbdVolume:
        """Connect and open (blocking: call off the trio thread).

        `owner_file` (in the daemon's state directory) records this client
        as the lock's owner; a daemon restarted after a crash (kill -9)
        finds its dead predecessor there and takes the lock over at once,
        instead of after the dead client's watch times out (30 s)."""
        name = f"rbd:{src.pool}/{src.image}"
        stale = _read_owner(owner_file, name)
        try:
            rbd = _datapath.RbdImage(str(src.ceph_conf), src.user, str(src.keyring or ""), src.pool,
                                     src.image, readonly, stale)
        except _datapath.RbdOpenError as e:
            if e.stage == "lock" and e.errno in (errno.EBUSY, errno.EROFS, errno.EAGAIN):
                raise VolumeLockedError(f"{name}: attached elsewhere (another client holds the "
                                        "image's exclusive lock)") from None
            # librados' connect times out when no monitor answers within the
            # 10 s client_mount_timeout nitro_rbd.c sets.
            error = SourceUnavailableError if e.stage == "connect" and e.errno in UNREACHABLE else VolumeError
            raise error(f"{name}: cannot open ({e}; ceph_conf {src.ceph_conf}, "
                        f"user {src.user}){_auth_hint(e, src)}") from None
        if rbd.size == 0 or rbd.size % SECTOR_SIZE:
            rbd.close()
            raise VolumeError(f"{name}: size {rbd.size} is not a positive multiple of {SECTOR_SIZE} bytes")
        if owner_file is not None and rbd.lock_owner:
            _write_owner(owner_file, name, rbd.lock_owner)
        return cls(src, rbd, readonly, io_timeout)

    @property
    def path(self) -> Path:
        """What messages name the volume by."""
        return Path(f"rbd:{self.src.pool}/{self.src.image}")

    @property
    def capacity_sectors(self) -> int:
        return self.size // SECTOR_SIZE

    @contextlib.contextmanager
    def block_io(self) -> Iterator[RbdBlockIO]:
        """Synchronous reads and writes on the open image (a LUKS2 header,
        backends/luks.py), each bounded by io_timeout."""
        yield RbdBlockIO(self.rbd, self.io_timeout)

    def make_ring(self, vq: _datapath.Virtqueue, params: _datapath.BlkParams,
                  stats: _datapath.BlkStats, index: int) -> _datapath.Ring:
        """Queue `index`'s ring: librbd's aio on the image."""
        return _datapath.Ring.blk_rbd(vq, self.rbd, params, stats)

    def flush(self, timeout: float | None = None) -> None:
        """Every acknowledged write on the OSDs; TimeoutError after
        `timeout` s (default io_timeout: the cluster is away). A drain's
        `timeout` bounds the close that follows too."""
        if timeout is not None:
            self._close_by = time.monotonic() + timeout
        if self.readonly:
            return
        try:
            self.rbd.flush(self.io_timeout if timeout is None else timeout)
        except TimeoutError:
            self.unreachable = True
            raise

    def close(self) -> None:
        """Release the lock, close the image, disconnect: at most io_timeout
        (after a drain's flush, what is left of its bound, at least
        MIN_REMOTE_WAIT_S), and not at all once a flush found the cluster away
        (each call would wait for it); the image's lock then expires on the
        cluster with this client's watch."""
        timeout = self.io_timeout
        if self._close_by is not None:
            timeout = min(timeout, max(MIN_REMOTE_WAIT_S, self._close_by - time.monotonic()))
        if self.unreachable:
            self.rbd.abandon()
        else:
            try:
                self.rbd.close(timeout)
                return
            except TimeoutError:
                pass
        log_event(log, logging.WARNING, "rbd: cluster unreachable, image left open",
                  volume=str(self.path), io_timeout=self.io_timeout)


@dataclasses.dataclass(frozen=True)
class RbdBlockIO:
    """backends/luks.py's BlockIO on an open image."""
    rbd: _datapath.RbdImage
    timeout: float

    def pread(self, count: int, offset: int) -> bytes:
        return self.rbd.pread(count, offset, self.timeout)

    def pwrite(self, data: bytes, offset: int) -> None:
        self.rbd.pwrite(data, offset, self.timeout)


def _read_owner(path: Path | None, name: str) -> str:
    """The lock owner a previous daemon recorded for volume `name`; ""."""
    try:
        rec = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return ""
    return rec.get("owner", "") if isinstance(rec, dict) and rec.get("volume") == name else ""


def _write_owner(path: Path, name: str, owner: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"volume": name, "owner": owner}) + "\n")
    tmp.replace(path)


def _auth_hint(e: _datapath.RbdOpenError, src: RbdSource) -> str:
    """What librados' bare errno at connect most likely means (as seen
    with Ceph 16): EIO when the keyring's key cannot be loaded (not a
    cephx key), EACCES when the monitors refused the key (or the user has
    none there)."""
    if e.stage != "connect":
        return ""
    keyring = f"keyring {src.keyring}" if src.keyring else "the keyring ceph_conf names"
    if e.errno == errno.EIO:
        return f": is the key of client.{src.user} in {keyring} a valid cephx key?"
    if e.errno == errno.EACCES:
        return (f": the cluster refused the key of client.{src.user} in {keyring} "
                "(a wrong key, or no such user)")
    return ""
