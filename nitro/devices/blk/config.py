"""struct virtio_blk_config (virtio 1.2 section 5.2.4), packed sans-IO.

The frontend reads the config space with VHOST_USER_GET_CONFIG at any offset
and size; fields past what we fill read as zero, as the spec allows for
fields whose feature bit is not offered.
"""

from __future__ import annotations

import dataclasses
import struct

from nitro.devices.base import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    read_config_window,
)

# Feature bits (virtio 1.2 section 5.2.3) and the ring/transport bits we use.
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

#: Every virtio-blk feature bit of virtio 1.2 5.2.3 by name, minus
#: VIRTIO_BLK_F_ (`nitro status`); the bits without a constant above are
#: never offered.
FEATURE_NAMES: dict[int, str] = {
    VIRTIO_BLK_F_SIZE_MAX: "SIZE_MAX",
    VIRTIO_BLK_F_SEG_MAX: "SEG_MAX",
    4: "GEOMETRY",
    VIRTIO_BLK_F_RO: "RO",
    VIRTIO_BLK_F_BLK_SIZE: "BLK_SIZE",
    VIRTIO_BLK_F_FLUSH: "FLUSH",
    VIRTIO_BLK_F_TOPOLOGY: "TOPOLOGY",
    11: "CONFIG_WCE",
    VIRTIO_BLK_F_MQ: "MQ",
    VIRTIO_BLK_F_DISCARD: "DISCARD",
    VIRTIO_BLK_F_WRITE_ZEROES: "WRITE_ZEROES",
    15: "LIFETIME",
    16: "SECURE_ERASE",
}

SECTOR_SIZE = 512

# The most one request may move: every request a driver that respects
# seg_max and size_max makes fits (virtio-blk has no other transfer limit,
# so the two are chosen to multiply to it), and nitro completes anything
# larger with IOERR. 4 MiB is about a millisecond of copying or of XTS on
# one core: the longest one synchronous request holds an engine worker
# (and a detach waiting for it). Linux's default max_sectors_kb (1280)
# stays below it, so guests see no difference.
MAX_REQUEST_BYTES = 4 << 20
# Largest segment (VIRTIO_BLK_F_SIZE_MAX): 16 pages, so most direct I/O
# buffers are a few segments and the 64 KiB requests of the tests and
# benchmarks one.
SIZE_MAX = 64 << 10


def seg_max_for(queue_size: int) -> int:
    """VIRTIO_BLK_F_SEG_MAX: a chain of seg_max data buffers plus header and
    status must fit the ring (Linux requires seg_max <= queue size - 2), and
    seg_max * SIZE_MAX must not pass MAX_REQUEST_BYTES."""
    return max(1, min(queue_size - 2, MAX_REQUEST_BYTES // SIZE_MAX))

# Largest DISCARD / WRITE_ZEROES a single request may cover: 1 GiB.
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR_SIZE
#: max_discard_seg and max_write_zeroes_seg: C refuses more (MAX_SEGMENTS in
#: cffi_build/nitro_blk.c), so one request's work is bounded (issue 11 item 5).
DWZ_SEG_MAX = 1

# capacity, size_max, seg_max, geometry(c,h,s), blk_size,
# topology(physical_block_exp, alignment_offset, min_io_size, opt_io_size),
# writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, unused1[3], max_secure_erase_sectors,
# max_secure_erase_seg, secure_erase_sector_alignment
_LAYOUT = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")
CONFIG_SIZE = _LAYOUT.size


@dataclasses.dataclass(frozen=True)
class BlkConfigSpace:
    capacity_sectors: int
    seg_max: int
    num_queues: int
    blk_size: int = SECTOR_SIZE
    size_max: int = SIZE_MAX
    max_discard_sectors: int = MAX_DISCARD_SECTORS
    max_write_zeroes_sectors: int = MAX_DISCARD_SECTORS

    def pack(self) -> bytes:
        return _LAYOUT.pack(
            self.capacity_sectors, self.size_max, self.seg_max, 0, 0, 0, self.blk_size,
            0, 0, 0, 0,            # topology: nothing to advertise for a file
            0, 0, self.num_queues,
            self.max_discard_sectors, DWZ_SEG_MAX, 1,
            self.max_write_zeroes_sectors, DWZ_SEG_MAX, 1,
            0, 0, 0)

    def read(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: any window; bytes beyond the struct read as zero."""
        return read_config_window(self.pack(), offset, size)


def device_features(*, readonly: bool, num_queues: int,
                    max_discard_sectors: int = MAX_DISCARD_SECTORS,
                    max_write_zeroes_sectors: int = MAX_DISCARD_SECTORS) -> int:
    """The feature bits for a device with these config-space limits:
    DISCARD and WRITE_ZEROES are offered exactly when their limit is nonzero
    (and the disk is writable)."""
    bits = [VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_F_RING_PACKED, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH]
    if num_queues > 1:
        bits.append(VIRTIO_BLK_F_MQ)
    if readonly:
        bits.append(VIRTIO_BLK_F_RO)
    else:  # a read-only disk has nothing to discard or zero
        if max_discard_sectors:
            bits.append(VIRTIO_BLK_F_DISCARD)
        if max_write_zeroes_sectors:
            bits.append(VIRTIO_BLK_F_WRITE_ZEROES)
    return sum(1 << b for b in bits)
