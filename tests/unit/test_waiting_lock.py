"""A device waiting for its remote source takes its NBD volume lock in etcd
before it opens (nitro/daemon.py _attach_when_reachable). A reload that
removes the device while that lock is being taken must not leave the lock
behind: the reload finds no lock to release yet, so the retry releases it.

The fleet agent here is a stand-in (etcd itself is exercised by
tests/integration/test_nbd_lock.py): its lock "reaches etcd" before the
answer comes back, which is when a cancelled request leaves a record that
nobody knows of."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from nitro import daemon as daemon_mod
from nitro.config import from_dict
from nitro.daemon import Daemon, WaitingDevice
from nitro.fleet.schema import VolumeLockRecord

URL = "nbd://127.0.0.1:10999/"


class SlowFleet:
    """lock_volume writes the record into `held` (etcd applied it), then
    waits for `answer` before recording it, as FleetAgent does."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}  # the "etcd" keys: volume -> device
        self.volume_locks: dict[str, VolumeLockRecord] = {}
        self.started = trio.Event()
        self.answer = trio.Event()

    async def lock_volume(self, record: VolumeLockRecord) -> None:
        self.held[record.volume] = record.device
        self.started.set()
        await self.answer.wait()
        self.volume_locks[record.device] = record

    async def unlock_volume(self, device: str) -> None:
        record = self.volume_locks.pop(device, None)
        if record is not None:
            self.held.pop(record.volume, None)

    class record:  # noqa: N801 - the attribute the daemon reads
        id = "host-a"


def make_daemon(tmp: Path) -> tuple[Daemon, SlowFleet]:
    cfg = from_dict({"blk": [{"id": "r0", "source": URL}]}, "t.toml", runtime_dir=tmp, state_dir=tmp)
    d = Daemon(cfg)
    fleet = SlowFleet()
    d.fleet = fleet  # type: ignore[assignment]
    return d, fleet


async def remove_as_a_reload_does(d: Daemon, device_id: str) -> None:
    """What Daemon.reload does for a removed waiting device."""
    w = d.waiting.pop(device_id)
    w.cancel.cancel()
    await d._unlock_volume(device_id)


async def within(fn) -> None:
    with trio.fail_after(10):
        await fn()


@pytest.fixture
def quick_retry(monkeypatch):
    monkeypatch.setattr(daemon_mod, "RETRY_START", 0.01)


def test_a_reload_removing_a_device_while_its_lock_is_taken_leaves_no_lock(tmp_path, quick_retry):
    d, fleet = make_daemon(tmp_path)
    w = d.waiting["r0"] = WaitingDevice("r0", "Connection refused")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d._attach_when_reachable, w)
            await fleet.started.wait()  # the lock is in etcd, its answer not yet back
            await remove_as_a_reload_does(d, "r0")
            assert fleet.held == {URL: "r0"}  # the reload had nothing to release yet
            fleet.answer.set()
        assert fleet.held == {} and fleet.volume_locks == {}

    trio.run(within, main)


def test_a_device_added_again_keeps_the_lock_its_retry_took(tmp_path, quick_retry):
    """Removed and added again before the first retry's lock came back: the
    lock belongs to the device now configured, not released under it."""
    d, fleet = make_daemon(tmp_path)
    w = d.waiting["r0"] = WaitingDevice("r0", "Connection refused")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d._attach_when_reachable, w)
            await fleet.started.wait()
            await remove_as_a_reload_does(d, "r0")
            again = d.waiting["r0"] = WaitingDevice("r0", "Connection refused")
            fleet.answer.set()
            await trio.sleep(0.1)
            assert fleet.held == {URL: "r0"} and "r0" in fleet.volume_locks
            again.cancel.cancel()  # its own retry is not running here

    trio.run(within, main)
