"""What every virtio device served over vhost-user shares.

The transport/ring feature bits of virtio 1.2 section 6, the config-space
window read (VHOST_USER_GET_CONFIG may ask for any offset and size), and the
device contract of docs/architecture.md with its optional parts defaulted.
"""

from __future__ import annotations

VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

#: Every reserved (device-independent) feature bit of virtio 1.2 section 6 by
#: name, minus VIRTIO_F_; the ring bits as RING_*. Most are never offered:
#: they are named so that `nitro status` can show what a frontend acked.
FEATURE_NAMES: dict[int, str] = {
    24: "NOTIFY_ON_EMPTY",
    27: "ANY_LAYOUT",
    VIRTIO_RING_F_INDIRECT_DESC: "RING_INDIRECT_DESC",
    VIRTIO_RING_F_EVENT_IDX: "RING_EVENT_IDX",
    VIRTIO_F_VERSION_1: "VERSION_1",
    33: "ACCESS_PLATFORM",
    34: "RING_PACKED",
    35: "IN_ORDER",
    36: "ORDER_PLATFORM",
    37: "SR_IOV",
    38: "NOTIFICATION_DATA",
    39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET",
}


def read_config_window(space: bytes, offset: int, size: int) -> bytes:
    """Any window of a config space; bytes past its end read as zero, as
    for fields whose feature bit is not offered."""
    window = space[offset:offset + size] if offset >= 0 else b""
    return window + bytes(max(0, size - len(window)))


class VirtioDevice:
    """Defaults for the optional parts of the backend contract."""

    def set_config(self, offset: int, data: bytes) -> None:
        # Nothing writable is offered: the spec lets a device ignore writes
        # to read-only config fields.
        return None

    def on_vring_start(self, vring) -> None:
        """Before the vring's worker starts (on the trio thread)."""
        return None

    def on_vring_stop(self, vring) -> None:
        """Before the vring's worker is stopped (on the trio thread)."""
        return None

    def flush(self) -> None:
        """Make completed writes durable (drain on shutdown)."""
        return None
