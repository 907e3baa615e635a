"""virtio-net feature bits and config space (virtio 1.2 5.1.3, 5.1.4). Sans-IO."""

from __future__ import annotations

import struct

from nitro.devices.base import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

# Every VIRTIO_NET_F_* bit up to 23 (the names `nitro status` prints); only
# those in device_features() are offered.
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

VIRTIO_NET_S_LINK_UP = 1
CONFIG_SIZE = 12  # mac[6], status, max_virtqueue_pairs, mtu (le16 each)


def device_features() -> int:
    """What nitro offers. No HOST_/GUEST_TSO*: the switch moves frames of at
    most the VPC MTU, so a guest must segment itself (see docs/network.md)."""
    bits = (VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ, VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC)
    return sum(1 << b for b in bits)


def config_space(mac: bytes, pairs: int, mtu: int, link_up: bool = True) -> bytes:
    """struct virtio_net_config up to mtu (little-endian, VERSION_1)."""
    return mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP if link_up else 0, pairs, mtu)
