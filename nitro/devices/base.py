"""What every virtio device served over vhost-user shares.

The transport/ring feature bits of virtio 1.2 section 6, the config-space
window read (VHOST_USER_GET_CONFIG may ask for any offset and size), and the
device contract of docs/architecture.md with its optional parts defaulted.
"""

from __future__ import annotations

VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32


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
