"""The guest-side layouts every test driver writes and reads, in one place:

- the split virtqueue (virtio 1.2 section 2.7): descriptor table, available
  ring, used ring, their flags and sizes;
- the virtio-blk request that travels on it (section 5.2.6);
- the virtio-net header in front of every frame (section 5.1.6);
- vhost-user's inflight region for a split queue (vhost-user.rst "Inflight
  I/O tracking"), which a frontend hands the backend to resume after a
  crash.

Used by the unit tests' fake guest (tests/unit/virtq.py), the integration
frontend (tests/integration/frontend.py) and the fuzz seed builders
(tests/fuzz/ringfmt.py, seeds.py, netseeds.py). Written from the specs, not from nitro's
own code, so the tests stay an independent check of it. Flag names are the
ones nitro_vring.h and Linux's virtio_ring.h use (the spec's VIRTQ_ names
with a VRING_ prefix). Everything is little-endian (virtio 1.x).
"""

from __future__ import annotations

import struct

U16 = struct.Struct("<H")

# -- split virtqueue (2.7) -------------------------------------------------------
# struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
DESC = struct.Struct("<QIHH")
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
# Packed rings (2.8): a descriptor is addr, len, buffer id, flags; AVAIL and
# USED are flag bits whose values against the wrap counters say who owns it.
PDESC = struct.Struct("<QIHH")
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
VIRTIO_F_RING_PACKED = 1 << 34
# struct pvirtq_event_suppress (2.8.10): off_wrap, flags.
EVENT = struct.Struct("<HH")
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

# struct virtq_avail { le16 flags; le16 idx; le16 ring[num]; le16 used_event; }
# struct virtq_used  { le16 flags; le16 idx; struct virtq_used_elem ring[num]; le16 avail_event; }
RING_FLAGS = 0  # offset of flags in either ring
RING_IDX = 2  # offset of idx in either ring
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem { le32 id; le32 len; }

# Alignment of each part (2.7 table "Virtqueue Part Alignment").
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4

# Feature bits that change the ring (section 6), as masks.
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29


def desc_table_size(num: int) -> int:
    return DESC.size * num


def avail_size(num: int) -> int:
    return 4 + 2 * num + 2


def used_size(num: int) -> int:
    return 4 + USED_ELEM.size * num + 2


def avail_ring_offset(slot: int, num: int) -> int:
    """Offset of avail->ring[slot % num] from the start of the avail ring."""
    return 4 + 2 * (slot % num)


def used_event_offset(num: int) -> int:
    """Offset of avail->used_event (VIRTIO_RING_F_EVENT_IDX)."""
    return 4 + 2 * num


def used_ring_offset(slot: int, num: int) -> int:
    """Offset of used->ring[slot % num] from the start of the used ring."""
    return 4 + USED_ELEM.size * (slot % num)


def avail_event_offset(num: int) -> int:
    """Offset of used->avail_event (VIRTIO_RING_F_EVENT_IDX)."""
    return 4 + USED_ELEM.size * num


# -- virtio-blk requests (5.2.6) ------------------------------------------------------
# struct virtio_blk_req { le32 type; le32 reserved; le64 sector; u8 data[]; u8 status; }
BLK_HEADER = struct.Struct("<IIQ")
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
# struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; }
DWZ_SEGMENT = struct.Struct("<QII")


def blk_header(type_: int, sector: int = 0) -> bytes:
    return BLK_HEADER.pack(type_, 0, sector)


def dwz_segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    return DWZ_SEGMENT.pack(sector, num_sectors, flags)


# -- vhost-user inflight region, split queue ---------------------------------------------
# QueueRegionSplit { u64 features; u16 version; u16 desc_num;
#                    u16 last_batch_head; u16 used_idx; DescStateSplit desc[]; }
INFLIGHT_HEADER = struct.Struct("<QHHHH")
# DescStateSplit { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
INFLIGHT_DESC = struct.Struct("<B5xHQ")


def inflight_desc_offset(head: int) -> int:
    """Offset of desc[head] from the start of a queue's inflight region."""
    return INFLIGHT_HEADER.size + INFLIGHT_DESC.size * head


def inflight_region_size(num: int) -> int:
    """Bytes one queue of `num` entries needs (before any alignment)."""
    return inflight_desc_offset(num)


# -- virtio-net header (5.1.6) -------------------------------------------------------------
# struct virtio_net_hdr { u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size;
#                         le16 csum_start; le16 csum_offset; le16 num_buffers; }
# num_buffers is always there with VERSION_1 (or MRG_RXBUF): 12 bytes.
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_NUM_BUFFERS = 10  # offset of num_buffers


def net_hdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
            csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def num_buffers(buf: bytes) -> int:
    """num_buffers of the virtio-net header at the start of buf."""
    return int(U16.unpack_from(buf, NET_HDR_NUM_BUFFERS)[0])
