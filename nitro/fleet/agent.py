"""FleetAgent: this host's link to etcd (a trio task of the daemon).

One session, repeated after every failure:

1. register: keep the lease if it is still alive, else grant a new one
   (``lease_ttl`` seconds); put ``/nitro/hosts/<host>`` and this host's
   interfaces under it (so etcd deletes them when the host stops renewing);
   make sure ``/nitro/index/<n>`` still names this host (it has no lease;
   claimed at start-up: nitro/fleet/identity.py); take again the volume
   locks this host holds (nitro/fleet/volume_lock.py: they went with an
   expired lease);
2. load: the first time (or after a compaction), read every key under
   /nitro/ into the FleetState at one revision;
3. watch /nitro/ from the state's revision + 1 and apply each batch of
   events; meanwhile renew the lease every ``lease_ttl / 3`` seconds and
   put the host record again whenever :meth:`FleetAgent.set_epoch` changed
   it (a rekey).

Any EtcdError ends the session: the state is kept as it was (the datapath
keeps forwarding with it), ``etcd_state`` becomes "down", and the next
session starts after a Backoff delay. The watch resumes where it stopped,
so changes made while the host was away arrive as ordinary events; if etcd
compacted that revision meanwhile, the state is reloaded and the listener
gets the difference. A lease that expired meanwhile is replaced and the
keys are put again.

The listener (``on_change(changes, state)``) runs on the trio thread after
each load or batch; it must not block (the switch integration turns the
changes into C remote-table updates). One that raises is logged and
counted, never ends the agent.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence

import trio

from nitro.fleet import schema, volume_lock
from nitro.fleet.etcd import Backoff, EtcdClient
from nitro.fleet.etcd_codec import Compare, EtcdCompacted, EtcdError, EtcdLeaseNotFound, op_put, op_range
from nitro.fleet.schema import HostRecord, InterfaceRecord, RecordError, VolumeLockRecord
from nitro.fleet.state import Change, FleetState
from nitro.fleet.volume_lock import VolumeHeldElsewhere, VolumeLockUnavailable
from nitro.log import log_event

__all__ = ["FleetAgent", "OnChange"]

log = logging.getLogger("nitro.fleet")

OnChange = Callable[[Sequence[Change], FleetState], None]
REVOKE_TIMEOUT = 2.0  # seconds a stopping agent spends revoking its lease


class FleetAgent:
    """This host in the fleet. ``await nursery.start(agent.run)``; it runs
    until cancelled (then it revokes its lease unless ``revoke_on_exit``
    is False: peers then see the host go only when the lease expires)."""

    def __init__(self, *, endpoints: Sequence[str], host: str, underlay: ipaddress.IPv4Address,
                 public_key: bytes, index: int, epoch: int = 0,
                 interfaces: Sequence[InterfaceRecord] = (), lease_ttl: int = 10,
                 on_change: OnChange | None = None, timeout: float = 2.0,
                 backoff: Backoff | None = None) -> None:
        self.endpoints = list(endpoints)
        self.record = HostRecord(host, underlay, public_key, index, epoch)
        self.published: HostRecord | None = None  # the record etcd holds, as far as we know
        self.interfaces = list(interfaces)
        for i in self.interfaces:
            if i.host != host:
                raise ValueError(f"interface {i.vpc}/{i.ip} belongs to host {i.host}, not {host}")
        self.lease_ttl = lease_ttl
        self.on_change = on_change
        self.timeout = timeout
        self.backoff = backoff or Backoff(maximum=min(5.0, lease_ttl / 2))
        self.revoke_on_exit = True
        self.state = FleetState(host)
        self.lease = 0
        # "connecting" until the first watch is established or the first
        # failure, then "up" (watch open) or "down".
        self.etcd_state = "connecting"
        self.endpoint = ""
        self.last_error = ""
        self.disconnects = 0
        self.reloads = 0
        self.callback_errors = 0
        self.conflicts: dict[str, str] = {}  # interface or volume key -> the host that holds it
        self.volume_locks: dict[str, VolumeLockRecord] = {}  # device id -> its volume's lock
        self._unreleased: dict[bytes, VolumeLockRecord] = {}  # releases etcd did not answer
        self._running = False  # run() owns the lease from now on
        self._since = time.monotonic()  # when the state was last known current
        self._loaded = False
        self._up = trio.Event()
        self._record_changed = trio.Event()  # set (and replaced) by set_epoch
        self._record_published = trio.Event()  # set (and replaced) after each put of the record

    # -- observation (any thread) --------------------------------------------------
    def watch_lag_seconds(self) -> float:
        """How far behind etcd the state may be: 0 while the watch stream is
        open (etcd pushes each change as it commits), else the time since
        it was lost (or since the agent started, before the first watch)."""
        return 0.0 if self.etcd_state == "up" else time.monotonic() - self._since

    def statistics(self) -> dict:
        published = self.published
        return {"host": self.record.id, "underlay": str(self.record.underlay), "etcd": self.etcd_state,
                "index": self.record.index, "epoch": self.record.epoch,
                "published_epoch": published.epoch if published is not None else None,
                "endpoint": self.endpoint, "endpoints": list(self.endpoints),
                "watch_lag_seconds": round(self.watch_lag_seconds(), 3), "lease": f"{self.lease:x}",
                "disconnects": self.disconnects, "reloads": self.reloads,
                "callback_errors": self.callback_errors, "conflicts": dict(self.conflicts),
                "volume_locks": {d: r.volume for d, r in self.volume_locks.items()},
                "last_error": self.last_error, **self.state.statistics()}

    async def wait_up(self) -> None:
        """Return once the watch is established (the state is current)."""
        while self.etcd_state != "up":
            await self._up.wait()

    # -- this host's record ------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Publish a new sending epoch (after a rekey): the record is put
        again as soon as etcd answers. Trio thread only."""
        self.record = dataclasses.replace(self.record, epoch=epoch)
        self._record_changed.set()
        self._record_changed = trio.Event()

    @property
    def record_published(self) -> bool:
        """etcd holds the record as it is now (its epoch is known to peers
        that watch)."""
        return self.published == self.record

    async def wait_published(self) -> None:
        """Return once etcd holds the current record."""
        while not self.record_published:
            await self._record_published.wait()

    def _mark_published(self, record: HostRecord) -> None:
        self.published = record
        self._record_published.set()
        self._record_published = trio.Event()

    # -- the loop --------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        self._running = True
        try:
            while True:
                try:
                    async with EtcdClient(self.endpoints, timeout=self.timeout) as etcd:
                        await self._session(etcd)
                except* EtcdError as eg:
                    self._mark_down(eg.exceptions[0])
                await trio.sleep(self.backoff.next_delay())
        finally:
            with trio.CancelScope(shield=True):
                await self._revoke()

    async def _session(self, etcd: EtcdClient) -> None:
        await self._register(etcd)
        if not self._loaded:
            await self._reload(etcd)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive_loop, etcd)
            nursery.start_soon(self._record_loop, etcd)
            await self._watch_loop(etcd)

    async def _register(self, etcd: EtcdClient) -> None:
        if self.lease:
            try:
                await etcd.lease_keepalive(self.lease)
            except EtcdLeaseNotFound:
                log_event(log, logging.WARNING, "fleet lease expired while etcd was away; registering again",
                          host=self.record.id, lease=f"{self.lease:x}")
                self.lease = 0
        if not self.lease:
            self.lease = await etcd.lease_grant(self.lease_ttl)
        await self._put_record(etcd)
        await self._keep_index(etcd)
        for i in self.interfaces:
            await self._publish(etcd, i)
        await self._keep_volume_locks(etcd)
        log_event(log, logging.INFO, "fleet host registered", host=self.record.id,
                  underlay=str(self.record.underlay), lease=f"{self.lease:x}",
                  interfaces=len(self.interfaces), endpoint=etcd.endpoint)

    async def _put_record(self, etcd: EtcdClient) -> None:
        record = self.record
        await etcd.put(record.key, record.encode(), lease=self.lease)
        self._mark_published(record)

    async def _record_loop(self, etcd: EtcdClient) -> None:
        """Put the host record again each time set_epoch changes it."""
        while True:
            changed = self._record_changed  # set by any change from here on
            if not self.record_published:
                await self._put_record(etcd)
                log_event(log, logging.INFO, "fleet epoch published", host=self.record.id,
                          epoch=self.record.epoch)
                continue
            await changed.wait()

    async def _keep_index(self, etcd: EtcdClient) -> None:
        """/nitro/index/<n> names this host (claimed at start-up; put back
        if someone deleted it, e.g. an etcd restored from an old backup).
        Held by another host: a conflict, shown, never overwritten."""
        key = schema.index_key(self.record.index)
        r = await etcd.txn([Compare.missing(key)], [op_put(key, self.record.id.encode())], [op_range(key)])
        holders = [kv.value.decode(errors="replace") for rr in r.ranges() for kv in rr.kvs]
        if r.succeeded or holders == [self.record.id]:
            self.conflicts.pop(key.decode(), None)
            return
        self.conflicts[key.decode()] = holders[0] if holders else "?"
        log_event(log, logging.ERROR, "fleet host index held by another host; SPIs may collide",
                  index=self.record.index, holder=self.conflicts[key.decode()])

    async def _publish(self, etcd: EtcdClient, i: InterfaceRecord) -> None:
        """Put an interface under our lease unless another host holds its
        (vpc, ip): then it is a conflict, logged and shown, not overwritten."""
        put = op_put(i.key, i.encode(), lease=self.lease)
        r = await etcd.txn([Compare.missing(i.key)], [put], [op_range(i.key)])
        if r.succeeded:
            return
        held = [kv for rr in r.ranges() for kv in rr.kvs]
        owner = None
        if held:
            try:
                owner = InterfaceRecord.decode(i.vpc, i.ip, held[0].value).host
            except RecordError:
                owner = None  # unreadable: ours to repair
        if owner not in (None, self.record.id):
            self.conflicts[i.key.decode()] = owner
            log_event(log, logging.ERROR, "fleet interface held by another host; not published",
                      vpc=i.vpc, ip=str(i.ip), holder=owner)
            return
        self.conflicts.pop(i.key.decode(), None)
        rev = held[0].mod_revision if held else 0
        # Replace it only if nobody changed it since we looked.
        await etcd.txn([Compare.mod_revision(i.key, rev)], [put])

    # -- volume locks (nitro/fleet/volume_lock.py) -------------------------------------
    async def lock_volume(self, record: VolumeLockRecord) -> None:
        """Take the volume's lock under this host's lease before its device
        serves. Before run() (start-up) the lease is granted here and run()
        keeps it; afterwards only the running agent's lease is used.
        VolumeHeldElsewhere or VolumeLockUnavailable (both VolumeErrors)."""
        why = ""
        try:
            async with EtcdClient(self.endpoints, timeout=self.timeout) as etcd:
                if not self.lease and not self._running:
                    self.lease = await etcd.lease_grant(self.lease_ttl)
                if self.lease:
                    await volume_lock.acquire(etcd, record, self.lease)
                else:
                    why = f"this host is not registered in etcd yet: etcd {self.etcd_state} {self.last_error}"
        except EtcdLeaseNotFound:
            why = "this host's lease expired; the fleet agent registers again"
        except EtcdError as e:
            why = str(e)
        if why:
            raise VolumeLockUnavailable(f"{record.volume}: cannot take its lock in etcd, so nothing proves "
                                        f"no other host writes it; not attached yet ({why.strip()})")
        self._unreleased.pop(record.key, None)
        self.volume_locks[record.device] = record
        log_event(log, logging.INFO, "volume lock taken", volume=record.volume, device=record.device,
                  host=record.host, lease=f"{self.lease:x}")

    async def unlock_volume(self, device: str) -> None:
        """Release the lock of a device that stopped serving (a reload
        removed it). etcd away: retried at the next registration; the
        lock goes with the lease in any case."""
        record = self.volume_locks.pop(device, None)
        if record is None:
            return
        try:
            async with EtcdClient(self.endpoints, timeout=self.timeout) as etcd:
                await volume_lock.release(etcd, record)
        except EtcdError as e:
            self._unreleased[record.key] = record
            log_event(log, logging.WARNING, "volume lock not released yet; retried when etcd answers",
                      volume=record.volume, device=device, error=str(e))
            return
        log_event(log, logging.INFO, "volume lock released", volume=record.volume, device=device)

    async def _keep_volume_locks(self, etcd: EtcdClient) -> None:
        for key, record in list(self._unreleased.items()):
            await volume_lock.release(etcd, record)
            del self._unreleased[key]
        for record in list(self.volume_locks.values()):
            try:
                await volume_lock.acquire(etcd, record, self.lease)
            except (VolumeHeldElsewhere, VolumeLockUnavailable) as e:
                holder = getattr(e, "holder", None)
                self.conflicts[record.key.decode()] = holder.host if holder is not None else "?"
                # Another host attached it while this one was away from etcd
                # longer than the lease: both may write it now.
                log_event(log, logging.ERROR, "volume lock lost to another host while etcd was away",
                          volume=record.volume, device=record.device, error=str(e))
                continue
            self.conflicts.pop(record.key.decode(), None)

    async def _reload(self, etcd: EtcdClient) -> None:
        snapshot = await etcd.range(schema.PREFIX.encode(), prefix=True)
        self._loaded = True
        self.reloads += 1
        self._notify(self.state.load(snapshot.kvs, snapshot.revision))
        log_event(log, logging.INFO, "fleet state loaded", revision=snapshot.revision,
                  hosts=len(self.state.hosts), vpcs=len(self.state.vpcs),
                  interfaces=len(self.state.interfaces))

    async def _watch_loop(self, etcd: EtcdClient) -> None:
        """Never returns: a broken stream raises EtcdUnavailable."""
        while True:
            stream = await etcd.watch(schema.PREFIX.encode(), start_revision=self.state.revision + 1)
            try:
                async for response in stream:
                    if response.canceled:
                        if response.compact_revision:
                            raise EtcdCompacted("etcd: the watch's revision was compacted",
                                                response.compact_revision)
                        raise EtcdError(f"etcd canceled the watch: {response.cancel_reason or 'no reason'}")
                    if response.created:
                        self._mark_up(stream.endpoint)
                    if response.events:
                        self._notify(self.state.apply(response.events))
            except EtcdCompacted as e:
                log_event(log, logging.WARNING, "fleet watch revision compacted; reloading",
                          revision=self.state.revision + 1, compacted_to=e.compact_revision)
                await self._reload(etcd)
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _keepalive_loop(self, etcd: EtcdClient) -> None:
        while True:
            await trio.sleep(max(0.5, self.lease_ttl / 3))
            try:
                await etcd.lease_keepalive(self.lease)
            except EtcdLeaseNotFound:
                # Expired under us (etcd was slow, or someone revoked it).
                self.lease = 0
                await self._register(etcd)

    async def revoke(self) -> None:
        """Revoke the lease now (a start-up that failed after taking volume
        locks): everything it holds is deleted."""
        await self._revoke()

    async def _revoke(self) -> None:
        if not (self.revoke_on_exit and self.lease):
            return
        with trio.move_on_after(REVOKE_TIMEOUT):
            try:
                async with EtcdClient(self.endpoints, timeout=REVOKE_TIMEOUT) as etcd:
                    await etcd.lease_revoke(self.lease)
                log_event(log, logging.INFO, "fleet lease revoked", host=self.record.id)
                self.lease = 0
            except EtcdError as e:
                log_event(log, logging.WARNING, "fleet lease not revoked; it expires by itself",
                          host=self.record.id, error=str(e), lease_ttl=self.lease_ttl)

    # -- state transitions --------------------------------------------------------
    def _mark_up(self, endpoint: str) -> None:
        was = self.etcd_state
        self.etcd_state, self.endpoint, self.last_error = "up", endpoint, ""
        self.backoff.reset()
        self._up.set()
        self._up = trio.Event()
        if was != "up":
            log_event(log, logging.INFO, "fleet watch established", endpoint=endpoint,
                      revision=self.state.revision, was=was)

    def _mark_down(self, e: BaseException) -> None:
        if self.etcd_state == "up":
            self.disconnects += 1
            self._since = time.monotonic()
            log_event(log, logging.WARNING, "fleet lost etcd; keeping the last known state",
                      error=str(e), revision=self.state.revision)
        elif str(e) != self.last_error:
            log_event(log, logging.WARNING, "fleet cannot reach etcd", error=str(e))
        self.etcd_state = "down"
        self.last_error = str(e)

    def _notify(self, changes: list[Change]) -> None:
        if not changes or self.on_change is None:
            return
        try:
            self.on_change(changes, self.state)
        except Exception as exc:
            self.callback_errors += 1
            log.error("fleet change listener failed", exc_info=exc,
                      extra={"fields": {"changes": len(changes)}})

