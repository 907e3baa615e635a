"""BlkDevice: the virtio-blk device as the vhost-user layer sees it.

It owns the volume (a backend such as RawImage), the C request parameters,
the volume's QoS state (one for all its queues) and one C stats block per
queue. Each started queue becomes a C ring that
an engine worker serves (requests in flight through io_uring); nothing here
walks descriptors.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from nitro import _datapath
from nitro.config import BlkConfig, QosConfig
from nitro.devices.base import VirtioDevice
from nitro.devices.blk import config as blkcfg
from nitro.devices.blk.backends.raw import MIN_REMOTE_WAIT_S, RawImage
from nitro.log import log_event

if TYPE_CHECKING:
    from nitro.devices.blk.backends.luks import LuksVolume
    from nitro.devices.blk.backends.nbd import NbdVolume
    from nitro.devices.blk.backends.rbd import RbdVolume
from nitro.vhost.protocol import ProtocolFeature

log = logging.getLogger("nitro.blk")


class BlkDevice(VirtioDevice):
    kind = "blk"

    def __init__(self, cfg: BlkConfig, volume: RawImage | LuksVolume | NbdVolume | RbdVolume) -> None:
        self.cfg = cfg
        self.volume = volume
        self.num_queues = cfg.queues
        self.max_queue_size = cfg.queue_size
        # Whether DISCARD/WRITE_ZEROES make sense is the volume's call
        # (LuksVolume: no). A zero limit withholds the feature bits, and C
        # answers UNSUPP should the driver send one anyway.
        limit = blkcfg.MAX_DISCARD_SECTORS if volume.supports_discard else 0
        self.config_space = blkcfg.BlkConfigSpace(
            capacity_sectors=volume.capacity_sectors,
            seg_max=blkcfg.seg_max_for(cfg.queue_size),
            num_queues=cfg.queues,
            blk_size=volume.block_size,
            max_discard_sectors=limit,
            max_write_zeroes_sectors=limit)
        self.device_features = blkcfg.device_features(
            readonly=cfg.readonly, num_queues=cfg.queues,
            max_discard_sectors=self.config_space.max_discard_sectors,
            max_write_zeroes_sectors=self.config_space.max_write_zeroes_sectors)
        # INFLIGHT_SHMFD: requests in flight when nitro dies are served again
        # after the frontend reconnects (docs/reliability.md "Inflight tracking").
        self.protocol_features = int(
            ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
            | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.STATUS
            | ProtocolFeature.RESET_DEVICE | ProtocolFeature.INFLIGHT_SHMFD)
        self.acked_features = 0
        self.qos = _datapath.Qos()
        self.set_qos(cfg.qos)
        self.params = _datapath.BlkParams(
            fd=volume.fd, capacity_sectors=volume.capacity_sectors,
            readonly=cfg.readonly, block_size=volume.block_size,
            max_discard_sectors=self.config_space.max_discard_sectors,
            max_write_zeroes_sectors=self.config_space.max_write_zeroes_sectors,
            seg_max=self.config_space.seg_max, size_max=self.config_space.size_max,
            serial=cfg.serial.encode(),
            xts=volume.xts, data_offset=volume.data_offset, qos=self.qos,
            io_timeout_ns=round(cfg.io_timeout * 1e9) if cfg.rbd is not None else 0)
        # The XTS path is chosen at key load and never changes: read once,
        # not into C at every scrape, and statistics() needs no open cipher.
        xts = volume.xts
        self.cipher = None if xts is None else {"sector_size": xts.sector_size, "impl": xts.impl}
        self.stats = [_datapath.BlkStats() for _ in range(cfg.queues)]
        if cfg.remote is None:
            self._map_image()

    def _map_image(self) -> None:
        """An image file: reads and writes of pages in the page cache are
        copied (encrypted: decrypted, encrypted) straight from and into a
        mapping of it on the worker (cffi_build/nitro_blk.c,
        blk_mapped_read and blk_mapped_write), with no io_uring round trip
        and no pwrite. Without one, every read goes through io_uring and
        every write through pwrite."""
        try:
            self.params.map_image()
        except (OSError, ValueError) as e:
            log_event(log, logging.WARNING, "every read goes through io_uring: cannot map the image",
                      device=self.cfg.id, image=str(self.cfg.image), error=str(e))
            return
        if not self.cfg.readonly and not self.params.image_map_writable:
            log_event(log, logging.WARNING, "every write goes through pwrite: the image maps read-only",
                      device=self.cfg.id, image=str(self.cfg.image))

    def set_qos(self, qos: QosConfig) -> None:
        """New limits for every queue, live (docs/volumes.md "QoS")."""
        self.qos.set(qos.iops, qos.throughput, qos.burst_iops, qos.burst_seconds)
        self.qos_config = qos

    # -- backend contract ------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        return self.config_space.read(offset, size)

    def set_features(self, acked: int) -> None:
        self.acked_features = acked

    def make_ring(self, vring) -> _datapath.Ring:
        """The C ring an engine worker serves this queue through."""
        i = vring.index
        return self.volume.make_ring(vring.vq, self.params, self.stats[i], i)

    def reset(self) -> None:
        self.acked_features = 0

    def flush(self, began: float | None = None) -> None:
        """Make every completed write durable (drain on shutdown). A remote
        volume waits for its storage at most io_timeout counted from
        `began` (when the drain began: its rings' requests had the same
        bound), never under MIN_REMOTE_WAIT_S; so a stop with the storage away
        takes about io_timeout, not one more per step."""
        timeout = None
        if began is not None:
            timeout = max(MIN_REMOTE_WAIT_S, began + self.cfg.io_timeout - time.monotonic())
        self.volume.flush(timeout)

    def close(self) -> None:
        self.params.close()
        self.qos.close()
        for s in self.stats:
            s.close()
        self.volume.close()

    # -- observation -------------------------------------------------------
    def statistics(self) -> dict:
        ops: dict[str, dict[str, int]] = {}
        latency: dict[str, dict] = {}
        inflight = resubmitted = timeouts = mapped_reads = mapped_writes = 0
        for s in self.stats:
            snap = s.snapshot()
            for op, c in snap["ops"].items():
                tot = ops.setdefault(op, {"requests": 0, "bytes": 0, "errors": 0})
                for k in tot:
                    tot[k] += c[k]
            for op, h in snap["latency"].items():
                _add_histogram(latency.setdefault(op, {"buckets": [], "sum_seconds": 0.0}), h)
            inflight += snap["inflight"]
            resubmitted += snap["resubmitted"]
            timeouts += snap["timeouts"]
            mapped_reads += snap["mapped_reads"]
            mapped_writes += snap["mapped_writes"]
        every_op = {"buckets": [], "sum_seconds": 0.0}
        for h in latency.values():
            _add_histogram(every_op, h)
        return {
            "kind": self.kind,
            "readonly": self.cfg.readonly,
            "capacity_bytes": self.volume.size,
            **self.describe_volume(),
            "ops": ops,
            "latency_buckets": every_op["buckets"],
            "latency_sum_seconds": every_op["sum_seconds"],
            "latency": latency,
            "inflight": inflight,
            "resubmitted": resubmitted,
            "timeouts": timeouts,
            "mapped_reads": mapped_reads,
            "mapped_writes": mapped_writes,
            "qos": {**dataclasses.asdict(self.qos_config), **self.qos.statistics()},
            **({"remote": self.volume.statistics()} if hasattr(self.volume, "statistics") else {}),
        }

    def describe_volume(self) -> dict:
        """What the volume is: its image or remote source, which backend
        serves it (file, nbd, rbd), whether nitro encrypts it and how (the
        sector size and which XTS path this machine runs, so an operator
        sees a CPU without AES instructions)."""
        cfg = self.cfg
        backend = "nbd" if cfg.nbd is not None else "rbd" if cfg.rbd is not None else "file"
        cipher = {"cipher": self.cipher} if self.cipher is not None else {}
        return {"volume": str(cfg.remote or cfg.image), "backend": backend,
                "encrypted": cfg.encryption is not None, **cipher, "mapped": self.params.image_mapped,
                "mapped_writable": self.params.image_map_writable}


def _add_histogram(total: dict, h: dict) -> None:
    """Add histogram h ({"buckets": [(bound, n)...], "sum_seconds"}) into total."""
    if not total["buckets"]:
        total["buckets"] = [(b, 0) for b, _ in h["buckets"]]
    total["buckets"] = [(b, n + m) for (b, n), (_, m) in zip(total["buckets"], h["buckets"])]
    total["sum_seconds"] += h["sum_seconds"]
