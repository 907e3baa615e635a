"""Daemon.drain's shape at a stop: every device drains side by side (its
rings taken back, then its volume flushed), so with remote storage away a
stop waits about one io_timeout, not one per device and step, and a
healthy device's flush never waits for another device's outage. Fake
servers stand in for VhostUserServer; the real thing is in
tests/integration/test_rbd_failures.py and test_nbd_volume.py."""

from __future__ import annotations

import threading
import time
import types

import trio

from nitro.config import from_dict
from nitro.daemon import Daemon

WAIT = 10.0  # a bound that only a wrong shape reaches


class FakeDevice:
    def __init__(self, flushes: threading.Barrier, flushed: threading.Event) -> None:
        self.flushes, self.flushed = flushes, flushed
        self.began: float | None = None

    def flush(self, began: float | None = None) -> None:
        self.began = began
        self.flushed.set()
        self.flushes.wait(timeout=WAIT)  # BrokenBarrierError: flushed one by one


class FakeServer:
    def __init__(self, device_id: str, device: FakeDevice, detach_until: threading.Event | None,
                 detaching: list[str]) -> None:
        self.device_id, self.device = device_id, device
        self.detach_until, self.detaching = detach_until, detaching
        self.accepting = True

    def stop_accepting(self) -> None:
        self.accepting = False

    async def stop_all_workers(self) -> None:
        self.detaching.append(self.device_id)
        deadline = time.monotonic() + WAIT
        while self.detach_until is not None and not self.detach_until.is_set():
            assert time.monotonic() < deadline, f"{self.device_id}: waited for another's flush"
            await trio.sleep(0.01)


def test_devices_drain_side_by_side_and_a_healthy_flush_does_not_wait(tmp_path) -> None:
    cfg = from_dict({"daemon": {"runtime_dir": str(tmp_path / "run"),
                                "state_dir": str(tmp_path / "state")}}, "test")
    flushes = threading.Barrier(2)
    healthy_flushed, slow_flushed = threading.Event(), threading.Event()
    detaching: list[str] = []
    # "slow" is a volume whose storage is away: its rings come back only
    # once the healthy volume has been flushed.
    healthy = FakeServer("healthy", FakeDevice(flushes, healthy_flushed), None, detaching)
    slow = FakeServer("slow", FakeDevice(flushes, slow_flushed), healthy_flushed, detaching)
    daemon = Daemon(cfg=cfg, servers=[slow, healthy])  # type: ignore[list-item]
    before = time.monotonic()
    trio.run(daemon.drain)
    assert not slow.accepting and not healthy.accepting
    assert sorted(detaching) == ["healthy", "slow"]
    assert slow_flushed.is_set() and healthy_flushed.is_set()
    # One bound for both, from the drain's start.
    assert slow.device.began == healthy.device.began
    assert healthy.device.began is not None and healthy.device.began >= before


def test_a_removed_device_is_closed_outside_the_devices_lock(tmp_path) -> None:
    """A reload's close of a remote volume whose storage is away takes up
    to io_timeout: scrapes must not wait for it (the device left the list
    scrapes read before, and the lock is passed once for those in flight)."""
    cfg = from_dict({"daemon": {"runtime_dir": str(tmp_path / "run"),
                                "state_dir": str(tmp_path / "state")}}, "test")
    daemon = Daemon(cfg=cfg)
    held: list[bool] = []

    class Device:
        def close(self) -> None:
            held.append(daemon.devices_lock.locked())

    daemon._close_device(types.SimpleNamespace(device=Device()))  # type: ignore[arg-type]
    assert held == [False]
