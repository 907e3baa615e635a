"""Vring: the control-plane state of one virtqueue and its C queue.

A Vring records what the front-end told us about one ring (size, addresses,
eventfds, ring state) and pushes each value into the C ``nitro_vq`` as it
arrives. It never runs or stops a worker itself: the trio layer stops a
running ring before any message that touches it is applied
(``VhostUserBackend.affected_vrings``) and starts it once ``should_run``.

Ring states (vhost-user.rst "Ring states"): a ring is stopped until
SET_VRING_KICK gives it a kick fd (``started``) and stopped again by
GET_VRING_BASE. If VHOST_USER_F_PROTOCOL_FEATURES was negotiated a ring
starts disabled and SET_VRING_ENABLE switches it; otherwise it is enabled as
soon as it is started. nitro serves only started *and* enabled rings: a
block device has no way to process a disabled ring "without side effects".

File descriptors given to a Vring are owned by it: a replaced fd is closed
at once, the rest at ``reset()`` or ``close()``.
"""

from __future__ import annotations

from typing import Any

from nitro.vhost.codec import close_fds
from nitro.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, VringAddr

_PROTOCOL_FEATURES_BIT = 1 << VHOST_USER_F_PROTOCOL_FEATURES


class Vring:
    """One virtqueue: what the front-end configured, and its C queue ``vq``
    (a ``nitro._datapath.Virtqueue``, or a test's fake), which it owns."""

    def __init__(self, index: int, vq: Any) -> None:
        self.index = index
        self.vq = vq
        self.num = 0                      # SET_VRING_NUM; 0: not set
        self.addr: VringAddr | None = None  # SET_VRING_ADDR, once translated by C
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.started = False
        self.broken: str | None = None    # set by the trio layer on a guest fault
        self._enabled = False             # the last SET_VRING_ENABLE
        self._protocol_features = False   # VHOST_USER_F_PROTOCOL_FEATURES negotiated
        self._closed = False

    # -- state ---------------------------------------------------------------
    @property
    def base(self) -> int:
        """The next available ring index to process (C keeps it current);
        packed rings: both positions and wrap counters (32 bits)."""
        base: int = self.vq.base
        return base

    @base.setter
    def base(self, value: int) -> None:
        self.vq.base = value

    @property
    def enabled(self) -> bool:
        """"Ring states": SET_VRING_ENABLE decides only if
        VHOST_USER_F_PROTOCOL_FEATURES was negotiated; else enabled when started."""
        return self._enabled if self._protocol_features else self.started

    @property
    def should_run(self) -> bool:
        """True when a worker may serve this ring now."""
        return (self.started and self.enabled and self.num > 0 and self.addr is not None
                and self.kick_fd is not None and self.broken is None)

    # -- what the front-end sets -----------------------------------------------
    def set_features(self, features: int) -> None:
        """SET_FEATURES: the negotiated bits, as acked (bit 30 included).
        VIRTIO_F_RING_PACKED switches the C queue's layout; ring addresses
        set already that do not fit the new layout are forgotten."""
        self._protocol_features = bool(features & _PROTOCOL_FEATURES_BIT)
        try:
            self.vq.set_features(features & ~_PROTOCOL_FEATURES_BIT)
        except BaseException:
            self.addr = None
            raise

    def set_num(self, num: int) -> None:
        """SET_VRING_NUM. C checks addresses already set against the new
        size and refuses a size they do not fit (nitro_vq_set_num)."""
        self.vq.set_num(num)
        self.num = num

    def set_addr(self, addr: VringAddr, memory: Any) -> None:
        """SET_VRING_ADDR: C translates the front-end addresses in ``memory``."""
        self.addr = None
        self.vq.set_addr(memory, addr.descriptor, addr.available, addr.used)
        self.addr = addr

    def set_mem(self, memory: Any) -> None:
        """A new or changed memory table. If C cannot translate this ring's
        addresses in it, the ring forgets them (a new SET_VRING_ADDR is needed)."""
        try:
            self.vq.set_mem(memory)
        except BaseException:
            self.addr = None
            raise

    def set_inflight(self, region: Any, offset: int = 0, size: int = 0) -> None:
        """SET_INFLIGHT_FD: track this ring's chains in [offset, offset + size)
        of the mapped inflight buffer; None detaches. C refuses a part too
        small for the ring size (and a later SET_VRING_NUM that outgrows it)."""
        self.vq.set_inflight(region, offset, size)

    def set_kick(self, fd: int | None) -> None:
        """SET_VRING_KICK: a kick fd starts the ring ("Ring states")."""
        old, self.kick_fd = self.kick_fd, fd
        self._push_fds()
        _close_unless(old, fd)
        self.started = fd is not None

    def set_call(self, fd: int | None) -> None:
        """SET_VRING_CALL; None: the front-end polls the used ring."""
        old, self.call_fd = self.call_fd, fd
        self._push_fds()
        _close_unless(old, fd)

    def set_err(self, fd: int | None) -> None:
        """SET_VRING_ERR: the trio layer signals it when this ring breaks
        (the front-end logs it; QEMU: "Guest says index ... is available")."""
        old, self.err_fd = self.err_fd, fd
        _close_unless(old, fd)

    def set_enabled(self, enabled: bool) -> None:
        """SET_VRING_ENABLE."""
        self._enabled = enabled

    def stop(self) -> None:
        """GET_VRING_BASE: "stop ring upon receiving VHOST_USER_GET_VRING_BASE".
        The fds stay until replaced: unlike libvhost-user nothing is closed,
        so a front-end that restarts without resending the call fd still works."""
        self.started = False

    # -- lifecycle -------------------------------------------------------------
    def reset(self) -> None:
        """RESET_DEVICE / RESET_OWNER / SET_STATUS 0: back to the initial state
        (the C queue forgets its inflight region too)."""
        self.vq.set_fds(-1, -1)  # before closing: C never holds a closed fd
        self._close_fds()
        self.vq.reset()
        self.num, self.addr, self.started, self.broken = 0, None, False, None
        self._enabled = self._protocol_features = False

    def close(self) -> None:
        """The session is over: close the fds and free the C queue (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.vq.close()
        self._close_fds()
        self.started = False

    def statistics(self) -> dict[str, Any]:
        """Control-plane state plus the C counters (``vq.stats()``)."""
        return {"index": self.index, "num": self.num, "started": self.started,
                "enabled": self.enabled, "broken": self.broken, **self.vq.stats()}

    # -- internals -------------------------------------------------------------
    def _close_fds(self) -> None:
        close_fds(fd for fd in (self.kick_fd, self.call_fd, self.err_fd) if fd is not None)
        self.kick_fd = self.call_fd = self.err_fd = None

    def _push_fds(self) -> None:
        self.vq.set_fds(-1 if self.kick_fd is None else self.kick_fd,
                        -1 if self.call_fd is None else self.call_fd)


def _close_unless(old: int | None, new: int | None) -> None:
    if old is not None and old != new:
        close_fds([old])
