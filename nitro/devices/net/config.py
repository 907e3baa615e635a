"""virtio-net feature bits and config space (virtio 1.2 5.1.3, 5.1.4). Sans-IO."""

from __future__ import annotations

import struct

from nitro.devices.base import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)

# Every VIRTIO_NET_F_* bit up to 23; only those in device_features() are
# offered.
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

#: The bits above by name, minus VIRTIO_NET_F_ (`nitro status`).
FEATURE_NAMES: dict[int, str] = {
    VIRTIO_NET_F_CSUM: "CSUM",
    VIRTIO_NET_F_GUEST_CSUM: "GUEST_CSUM",
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: "CTRL_GUEST_OFFLOADS",
    VIRTIO_NET_F_MTU: "MTU",
    VIRTIO_NET_F_MAC: "MAC",
    VIRTIO_NET_F_GUEST_TSO4: "GUEST_TSO4",
    VIRTIO_NET_F_GUEST_TSO6: "GUEST_TSO6",
    VIRTIO_NET_F_GUEST_ECN: "GUEST_ECN",
    VIRTIO_NET_F_GUEST_UFO: "GUEST_UFO",
    VIRTIO_NET_F_HOST_TSO4: "HOST_TSO4",
    VIRTIO_NET_F_HOST_TSO6: "HOST_TSO6",
    VIRTIO_NET_F_HOST_ECN: "HOST_ECN",
    VIRTIO_NET_F_HOST_UFO: "HOST_UFO",
    VIRTIO_NET_F_MRG_RXBUF: "MRG_RXBUF",
    VIRTIO_NET_F_STATUS: "STATUS",
    VIRTIO_NET_F_CTRL_VQ: "CTRL_VQ",
    VIRTIO_NET_F_CTRL_RX: "CTRL_RX",
    VIRTIO_NET_F_CTRL_VLAN: "CTRL_VLAN",
    VIRTIO_NET_F_GUEST_ANNOUNCE: "GUEST_ANNOUNCE",
    VIRTIO_NET_F_MQ: "MQ",
    VIRTIO_NET_F_CTRL_MAC_ADDR: "CTRL_MAC_ADDR",
}

VIRTIO_NET_S_LINK_UP = 1
CONFIG_SIZE = 12  # mac[6], status, max_virtqueue_pairs, mtu (le16 each)


# virtio 1.2 5.1.3.1: an offload the driver acks only together with another.
# (The control-queue ones are left to the frontend: QEMU and DPDK's
# virtio-user keep the control queue themselves.)
FEATURE_REQUIRES: dict[int, int] = {
    VIRTIO_NET_F_GUEST_TSO4: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO6: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN: VIRTIO_NET_F_GUEST_TSO4,  # or GUEST_TSO6; not offered
    VIRTIO_NET_F_GUEST_UFO: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4: VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO6: VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_ECN: VIRTIO_NET_F_HOST_TSO4,  # or HOST_TSO6; not offered
    VIRTIO_NET_F_HOST_UFO: VIRTIO_NET_F_CSUM,
}


def device_features() -> int:
    """What nitro offers. TSO both ways (HOST_TSO4/6: the guest may send TCP
    super-frames of up to 64 KiB; GUEST_TSO4/6: nitro may deliver them);
    no ECN or UFO (see docs/network.md)."""
    bits = (VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ,
            VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED)
    return sum(1 << b for b in bits)


def missing_dependency(acked: int) -> tuple[int, int] | None:
    """The first (feature, required feature) pair of 5.1.3.1 that ``acked``
    breaks, or None. ECN depends on either TSO bit."""
    for bit, needs in FEATURE_REQUIRES.items():
        if not acked >> bit & 1:
            continue
        if bit == VIRTIO_NET_F_GUEST_ECN:
            ok = acked & (1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6)
        elif bit == VIRTIO_NET_F_HOST_ECN:
            ok = acked & (1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6)
        else:
            ok = acked >> needs & 1
        if not ok:
            return bit, needs
    return None


def config_space(mac: bytes, pairs: int, mtu: int, link_up: bool = True) -> bytes:
    """struct virtio_net_config up to mtu (little-endian, VERSION_1)."""
    return mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP if link_up else 0, pairs, mtu)
