"""What every virtio device served over vhost-user shares.

The transport/ring feature bits of virtio 1.2 section 6, the config-space
window read (VHOST_USER_GET_CONFIG may ask for any offset and size), the
device contract of docs/architecture.md ("Backend contract") as a typing
Protocol, and a base class with its optional parts defaulted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from nitro._datapath import Ring
    from nitro.vhost.vring import Vring

VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34

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
    VIRTIO_F_RING_PACKED: "RING_PACKED",
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


@runtime_checkable
class VirtioBackend(Protocol):
    """What the vhost-user layer needs from a device (docs/architecture.md
    "Backend contract"). BlkDevice and NetDevice implement it; VirtioDevice
    below supplies the optional parts.

    Called on the trio thread unless noted. ``ValueError`` from
    ``set_features``, ``get_config`` or ``set_config`` means the front-end
    asked for something the device refuses; the dispatcher turns it into a
    failed request."""

    #: statistics()["kind"]: "blk", "net".
    kind: str
    #: Virtio feature bits offered (VERSION_1 and ring bits included).
    device_features: int
    #: vhost-user protocol feature bits offered (masked by the dispatcher
    #: with what it implements).
    protocol_features: int
    num_queues: int
    #: The largest ring size SET_VRING_NUM may ask for.
    max_queue_size: int

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: ``size`` bytes of the config space from ``offset``."""
        ...

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG: the device decides what is writable (it may ignore it)."""
        ...

    def set_features(self, acked: int) -> None:
        """SET_FEATURES: the negotiated virtio bits (vhost-user's bit 30 removed)."""
        ...

    def make_ring(self, vring: Vring) -> Ring:
        """The C ring (``_datapath.Ring``) an engine worker serves this
        started vring through; the server attaches and detaches it."""
        ...

    def on_vring_start(self, vring: Vring) -> None:
        """Before the vring's ring is attached to the engine."""
        ...

    def on_vring_stop(self, vring: Vring) -> None:
        """Before the vring's ring is detached from the engine."""
        ...

    def flush(self, began: float | None = None) -> None:
        """Make completed writes durable (drain); in a worker thread.
        `began`: time.monotonic() when the drain began (remote storage is
        waited for at most its io_timeout counted from then)."""
        ...

    def close(self) -> None:
        """Release everything; the device is not used again."""
        ...

    def reset(self) -> None:
        """The front-end went away or reset the device: back to negotiation."""
        ...

    def statistics(self) -> dict:
        """Counters for metrics and ``nitro status``; any thread."""
        ...


class VirtioDevice:
    """Defaults for the optional parts of the backend contract."""

    def set_config(self, offset: int, data: bytes) -> None:
        # Nothing writable is offered: the spec lets a device ignore writes
        # to read-only config fields.
        return None

    def on_vring_start(self, vring) -> None:
        """Before the vring's ring is attached to the engine (trio thread)."""
        return None

    def on_vring_stop(self, vring) -> None:
        """Before the vring's ring is detached from the engine (trio thread)."""
        return None

    def flush(self, began: float | None = None) -> None:
        """Make completed writes durable (drain on shutdown)."""
        return None
