"""virtio-blk (virtio 1.2 section 5.2) served over vhost-user."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nitro.config import BlkConfig

if TYPE_CHECKING:
    from nitro.devices.blk.backends.luks import LuksVolume
    from nitro.devices.blk.backends.nbd import NbdVolume
    from nitro.devices.blk.backends.rbd import RbdVolume
    from nitro.devices.blk.device import BlkDevice


def open_device(cfg: BlkConfig) -> BlkDevice:
    """Open the volume behind a [[blk]] entry and wrap it in a BlkDevice.

    Raises VolumeError (nothing written to the image) when it cannot be served.
    """
    from nitro.devices.blk.backends.raw import RawImage, VolumeError
    from nitro.devices.blk.device import BlkDevice

    volume: RawImage | LuksVolume | NbdVolume | RbdVolume
    if cfg.nbd is not None:
        from nitro.devices.blk.backends.nbd import NbdVolume

        if cfg.encryption is not None:
            raise VolumeError(f"{cfg.nbd}: encrypted volumes on a remote source are not "
                              "served yet (docs/volumes.md)")
        volume = NbdVolume.open(cfg.nbd, queues=cfg.queues, io_timeout=cfg.io_timeout,
                                readonly=cfg.readonly)
    elif cfg.rbd is not None:
        from nitro.devices.blk.backends.rbd import RbdVolume

        volume = RbdVolume.open(cfg.rbd, readonly=cfg.readonly, io_timeout=cfg.io_timeout,
                                owner_file=cfg.image.with_name(f"{cfg.id}.rbd-owner"))
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
