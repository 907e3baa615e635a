"""virtio-blk config space layout (virtio 1.2 section 5.2.4) and features."""

import struct

from nitro.devices.blk import config as c


def test_layout_offsets_follow_the_spec():
    space = c.BlkConfigSpace(capacity_sectors=2097152, seg_max=254, num_queues=4)
    raw = space.pack()
    assert len(raw) == 72
    assert struct.unpack_from("<Q", raw, 0)[0] == 2097152          # capacity
    assert struct.unpack_from("<I", raw, 12)[0] == 254             # seg_max
    assert struct.unpack_from("<I", raw, 20)[0] == 512             # blk_size
    assert struct.unpack_from("<H", raw, 34)[0] == 4               # num_queues
    assert struct.unpack_from("<III", raw, 36) == (c.MAX_DISCARD_SECTORS, 1, 1)
    assert struct.unpack_from("<II", raw, 48) == (c.MAX_DISCARD_SECTORS, 1)
    assert raw[56] == 1                                            # write_zeroes_may_unmap


def test_read_window_pads_with_zeros():
    space = c.BlkConfigSpace(capacity_sectors=8, seg_max=126, num_queues=1)
    assert space.read(0, 8) == (8).to_bytes(8, "little")
    assert space.read(64, 16) == space.pack()[64:72] + bytes(8)
    assert space.read(200, 4) == bytes(4)


def test_features():
    rw = c.device_features(readonly=False, num_queues=1)
    ro = c.device_features(readonly=True, num_queues=2)
    assert rw >> c.VIRTIO_F_VERSION_1 & 1 and rw >> c.VIRTIO_BLK_F_DISCARD & 1
    assert not rw >> c.VIRTIO_BLK_F_RO & 1 and not rw >> c.VIRTIO_BLK_F_MQ & 1
    assert ro >> c.VIRTIO_BLK_F_RO & 1 and ro >> c.VIRTIO_BLK_F_MQ & 1
    assert not ro >> c.VIRTIO_BLK_F_DISCARD & 1


def test_seg_max_and_size_max_bound_a_request_to_max_request_bytes():
    """Issue 11 item 5: a driver that respects the offered limits never
    makes a request nitro refuses, and no request moves more than 4 MiB."""
    rw = c.device_features(readonly=False, num_queues=1)
    assert rw >> c.VIRTIO_BLK_F_SIZE_MAX & 1 and rw >> c.VIRTIO_BLK_F_SEG_MAX & 1
    for queue_size in (2, 4, 64, 128, 256, 1024):
        seg_max = c.seg_max_for(queue_size)
        assert 1 <= seg_max <= max(1, queue_size - 2)
        assert seg_max * c.SIZE_MAX <= c.MAX_REQUEST_BYTES
    raw = c.BlkConfigSpace(capacity_sectors=8, seg_max=c.seg_max_for(256), num_queues=1).pack()
    assert struct.unpack_from("<II", raw, 8) == (c.SIZE_MAX, 64)  # size_max, seg_max
