"""virtio-blk (virtio 1.2 section 5.2) served over vhost-user."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nitro.config import DEFAULT_IO_TIMEOUT, BlkConfig, RbdSource

if TYPE_CHECKING:
    from nitro.devices.blk.backends.luks import LuksVolume
    from nitro.devices.blk.backends.nbd import NbdSource, NbdVolume
    from nitro.devices.blk.backends.rbd import RbdVolume
    from nitro.devices.blk.device import BlkDevice


def open_device(cfg: BlkConfig) -> BlkDevice:
    """Open the volume behind a [[blk]] entry and wrap it in a BlkDevice.

    Raises VolumeError (nothing written to the image) when it cannot be served.
    """
    from nitro.devices.blk.backends.raw import RawImage
    from nitro.devices.blk.device import BlkDevice

    volume: RawImage | LuksVolume | NbdVolume | RbdVolume
    if cfg.remote is not None:
        owner = cfg.image.with_name(f"{cfg.id}.rbd-owner") if cfg.rbd is not None else None
        volume = open_remote(cfg.remote, queues=cfg.queues, io_timeout=cfg.io_timeout,
                             readonly=cfg.readonly, owner_file=owner)
        if cfg.encryption is not None:
            from nitro.devices.blk.backends.luks import LuksVolume

            volume = LuksVolume.on_remote(volume, cfg.encryption)
    elif cfg.encryption is not None:
        from nitro.devices.blk.backends.luks import LuksVolume

        volume = LuksVolume.open(cfg.image, cfg.encryption, size=cfg.size,
                                 readonly=cfg.readonly)
    else:
        volume = RawImage.open(cfg.image, size=cfg.size, readonly=cfg.readonly)
    try:
        return BlkDevice(cfg, volume)
    except BaseException:
        volume.close()
        raise


def open_remote(src: NbdSource | RbdSource, *, queues: int = 1,
                io_timeout: float = DEFAULT_IO_TIMEOUT, readonly: bool = False,
                owner_file: Path | None = None) -> NbdVolume | RbdVolume:
    """An NBD export or RBD image, connected (blocking: off the trio
    thread); `owner_file` is an RBD image's lock owner record."""
    if isinstance(src, RbdSource):
        from nitro.devices.blk.backends.rbd import RbdVolume

        return RbdVolume.open(src, readonly=readonly, io_timeout=io_timeout,
                              owner_file=owner_file)
    from nitro.devices.blk.backends.nbd import NbdVolume

    return NbdVolume.open(src, queues=queues, io_timeout=io_timeout, readonly=readonly)
