"""The daemon's lifecycle: open volumes, listen, serve, reload, drain on SIGTERM.

Start-up creates the directories the config names, then opens every volume
before any socket listens, so a bad volume stops the daemon before a guest
can attach to half a configuration. With [fleet], an NBD volume's lock in
etcd is taken before its device opens (nitro/fleet/volume_lock.py); a
reload takes it for an added device and releases it for a removed one, and
at a clean stop the locks go with the fleet lease. READY is sent to systemd once every
socket listens. SIGTERM/SIGINT: stop accepting, stop fetching new
requests (each C loop completes the batch it holds), flush every volume,
tell systemd STOPPING, exit 0.

A remote volume (NBD, RBD) whose server cannot be reached at start-up does
not stop the daemon: that device waits, its socket not yet listening, while
the others serve, and is retried in the background until it opens
(`WaitingDevice`, docs/volumes.md "Failures"). Any other bad volume stops
start-up.

SIGHUP or the control socket's ``reload`` re-reads the config file and
applies what reload.plan() says: new [[blk]] devices are opened and then
listen, removed ones are shut down like a drain of that one device; nothing
else is touched. Reloads run one at a time, and not once a stop signal came.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from nitro import __version__, _datapath, metrics
from nitro import reload as reload_plan
from nitro.config import BlkConfig, ConfigError, DaemonConfig, parse_qos
from nitro.control.protocol import CommandRefused
from nitro.control.server import serve_control
from nitro.devices import blk
from nitro.devices.blk.backends.raw import SourceUnavailableError, VolumeError
from nitro.devices.blk.device import BlkDevice
from nitro.devices.blk.opening import Opening
from nitro.engine import Engine
from nitro.fleet.schema import VolumeLockRecord
from nitro.log import log_event
from nitro.sdnotify import Notifier, watchdog_loop
from nitro.vhost.server import VhostUserServer

if TYPE_CHECKING:
    from pathlib import Path

    from nitro.devices.base import VirtioBackend
    from nitro.devices.net.fabric import NetFabric
    from nitro.devices.net.underlay import Underlay
    from nitro.fleet.agent import FleetAgent
    from nitro.fleet.node import FleetNode
    from nitro.fleet.state import Change, FleetState

log = logging.getLogger("nitro.daemon")

# A waiting remote volume is tried again after RETRY_START seconds, the
# delay doubling up to RETRY_MAX.
RETRY_START = 1.0
RETRY_MAX = 30.0
# Start-up tries remote sources in the foreground for at most this long in
# all (an unreachable Ceph cluster takes librados' client_mount_timeout per
# volume); the rest wait in the background from the start, so an outage of
# the storage never holds READY past systemd's start timeout (90 s).
STARTUP_REMOTE_BUDGET = 30.0


def _gave_up(budget: float) -> str:
    return (f"no answer within {budget:.0f} s (the budget for opening a remote source in the "
            "foreground); the open goes on in the background")


@dataclass
class WaitingDevice:
    """A [[blk]] device whose remote source could not be reached: no socket
    yet, tried again in the background until its volume opens."""
    device_id: str
    error: str
    since: float = field(default_factory=time.time)
    attempts: int = 1
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    # An open that outlived its caller's budget: the retry waits for it.
    opening: Opening[BlkDevice] | None = None

    def statistics(self) -> dict[str, Any]:
        return {"id": self.device_id, "kind": "blk", "error": self.error,
                "waiting_seconds": round(time.time() - self.since, 1), "attempts": self.attempts}


class StartupError(Exception):
    """A device could not be set up; the daemon exits non-zero before serving."""


class ReloadError(CommandRefused):
    """A reload was refused or failed before changing anything (bad config
    file, a new volume that cannot be opened, no config file to re-read,
    daemon stopping). The running configuration stays; fix and reload again."""


@dataclass
class Daemon:
    cfg: DaemonConfig  # the running configuration (after reloads: what really runs)
    servers: list[VhostUserServer] = field(default_factory=list)
    version: str = __version__
    fabric: NetFabric | None = None  # when [[net]] (or a VPC uplink) is configured
    engine: Engine | None = None  # the C workers serving every ring (open_devices)
    fleet: FleetAgent | None = None  # with [fleet]: this host's link to etcd (open_devices)
    fleet_node: FleetNode | None = None  # with [fleet]: the agent, the tunnel and its SAs, the rekeys
    underlay: Underlay | None = None  # with [fleet] and [[net]] in a fleet VPC: frames to and from other hosts
    # Remote volumes whose source is unreachable, by device id (run() retries them).
    waiting: dict[str, WaitingDevice] = field(default_factory=dict)
    # Re-reads the config file with the command line's overrides; None when
    # the daemon runs on the embedded default (nothing to re-read).
    load_config: Callable[[], DaemonConfig] | None = None
    # Held by the metrics thread while it reads devices' C counters, and
    # here while a removed device is closed (its counters freed).
    devices_lock: threading.Lock = field(default_factory=threading.Lock)
    _nursery: trio.Nursery | None = field(default=None, init=False, repr=False)
    _reload_lock: trio.Lock = field(default_factory=trio.Lock, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)
    _drained: float | None = field(default=None, init=False, repr=False)  # seconds, once drained

    @property
    def devices(self) -> list[VhostUserServer]:
        return self.servers

    def status_sections(self) -> dict[str, Callable[[], Any]]:
        """Parts of a status reply beyond the devices (control.commands.DaemonView)."""
        sections: dict[str, Callable[[], Any]] = {}
        if self.engine is not None:
            sections["engine"] = self.engine.statistics
        if self.fabric is not None:
            sections["vpcs"] = self.vpc_statistics
        if self.fleet_node is not None:
            sections["fleet"] = self.fleet_node.statistics
        if self.waiting:
            sections["waiting"] = self.waiting_statistics
        return sections

    def waiting_statistics(self) -> list[dict[str, Any]]:
        """The devices waiting for their remote source; any thread."""
        return [w.statistics() for w in list(self.waiting.values())]

    def fleet_statistics(self) -> dict | None:
        """The fleet agent's state and the SAs; any thread (metrics)."""
        node = self.fleet_node
        return node.statistics() if node is not None else None

    async def fleet_rekey(self) -> dict:
        """`nitro fleet rekey`: this host moves to its next key epoch now."""
        if self.fleet_node is None:
            raise CommandRefused("this daemon has no [fleet]: there are no keys to renew")
        return await self.fleet_node.rekey_and_publish("manual")

    def _open_fleet(self) -> None:
        """[fleet]: read the fleet VPCs the interfaces name (before the
        switch is built from them) and make the agent (not started yet)."""
        from nitro.fleet import node

        try:
            cfg = node.resolve_vpcs(self.cfg)
            self.fleet_node = node.open_node(cfg, listener=self._fleet_changed)
        except node.FleetStartupError as e:
            raise StartupError(str(e)) from None
        self.fleet = self.fleet_node.agent
        self.cfg = cfg

    def _fleet_changed(self, changes: Sequence[Change], state: FleetState) -> None:
        # Called after fleet_node's TunnelSync applied the changes to the
        # tunnel and the switch (peers, SAs, VNIs, remote interfaces).
        for c in changes:
            log_event(log, logging.DEBUG, "fleet change", view=c.view, kind=c.kind, key=str(c.key))

    def _open_underlay(self) -> None:
        """[fleet] with a fleet VPC on the switch: the underlay sockets on
        [fleet] underlay, fed by the fleet node from now on (its ring is
        attached to a worker in run())."""
        from nitro.devices.net.underlay import Underlay, UnderlayError

        assert self.fleet_node is not None and self.fabric is not None and self.cfg.fleet is not None
        try:
            self.underlay = Underlay(self.fabric, self.fleet_node.tunnel, self.cfg.fleet.underlay)
        except UnderlayError as e:
            raise StartupError(str(e)) from None
        self.fleet_node.attach_underlay(self.underlay)
        log_event(log, logging.INFO, "underlay open", underlay=str(self.underlay.local),
                  encrypt=self.fleet_node.tunnel.encrypt)

    def _server(self, device, socket, device_id: str) -> VhostUserServer:
        assert self.engine is not None, "open_devices() starts the engine first"
        return VhostUserServer(device, socket, device_id=device_id, engine=self.engine)

    def _start_engine(self) -> None:
        e = self.cfg.engine
        _datapath.set_guest_memory_limit(e.max_guest_memory)
        try:
            self.engine = Engine(e.workers, e.worker_cpus(), e.poll_us, seccomp=e.seccomp)
        except (_datapath.DatapathError, ValueError) as err:
            raise StartupError(f"cannot start {e.workers} engine workers: {err}") from None
        log_event(log, logging.INFO, "engine started", workers=e.workers,
                  cpus=",".join(map(str, e.cpus)) if e.cpus else "any",
                  poll_us=e.poll_us if e.poll_us is not None else "adaptive",
                  blk_io=self.engine.statistics()["blk_io"], seccomp=e.seccomp,
                  max_guest_memory=e.max_guest_memory or "none")

    def engine_statistics(self) -> dict | None:
        """The engine's workers and their rings; any thread (metrics)."""
        engine = self.engine  # read once: close() clears it
        return engine.statistics() if engine is not None else None

    def vpc_statistics(self) -> dict:
        """Per-VPC control plane and uplink counters; any thread (metrics)."""
        fabric = self.fabric  # read once: close() clears it on the trio thread
        return fabric.statistics() if fabric is not None else {}

    def open_devices(self) -> None:
        """Open every volume and the network fabric, then start the engine
        and one server per device (a bad volume fails before any thread)."""
        opened: list[tuple[VirtioBackend, Path, str]] = []
        make_directories(self.cfg)
        if self.cfg.fleet is not None:
            self._open_fleet()
        remote_until = time.monotonic() + STARTUP_REMOTE_BUDGET
        for b in self.cfg.blk:
            if b.remote is not None and time.monotonic() > remote_until:
                self._wait_for_source(b.id, "not tried at start-up: other remote sources used "
                                      f"its {STARTUP_REMOTE_BUDGET:g} s budget")
                continue
            try:
                trio.run(self._lock_volume, b)  # before the device can serve
                if b.remote is None:
                    device = blk.open_device(b)
                else:  # a remote that never answers must not hold the start
                    opening = Opening.device(b)
                    budget = max(1.0, remote_until - time.monotonic())
                    got = opening.wait(budget)
                    if got is None:
                        self._wait_for_source(b.id, _gave_up(budget)).opening = opening
                        continue
                    device = got
            except SourceUnavailableError as e:
                self._wait_for_source(b.id, str(e))
                continue
            except VolumeError as e:
                self._close_opened(opened)
                raise StartupError(f"device {b.id}: {e}") from None
            opened.append((device, b.socket, b.id))
        if self.cfg.net or any(v.uplink for v in self.cfg.vpc):
            try:
                fabric = self._open_net()
            except StartupError:
                self._close_opened(opened)
                raise
            opened += [(d, n.socket, n.id) for n, d in zip(self.cfg.net, fabric.devices)]
        try:
            self._start_engine()
            if self.fleet_node is not None and self.fabric is not None and self.fleet_node.sync.served:
                self._open_underlay()
        except StartupError:
            self._close_opened(opened)
            raise
        self.servers = [self._server(*o) for o in opened]

    def _wait_for_source(self, device_id: str, error: str) -> WaitingDevice:
        w = self.waiting[device_id] = WaitingDevice(device_id, error)
        log_event(log, logging.WARNING, "remote source unreachable; the device waits for it "
                  "(no socket yet) and is retried in the background", device=device_id, error=error)
        return w

    def _blk_config(self, device_id: str) -> BlkConfig | None:
        return next((b for b in self.cfg.blk if b.id == device_id), None)

    async def _attach_when_reachable(self, w: WaitingDevice) -> None:
        """Retry a waiting device's volume with backoff until it opens, then
        make it listen as a reload adds a device. Cancelled (w.cancel) when a
        reload removes the device, and with the nursery at stop."""
        delay = RETRY_START
        try:
            with w.cancel:
                while True:
                    try:
                        cfg = await self._next_attempt(w, delay)
                        if cfg is None:
                            return  # removed: a pending open is left below
                        assert w.opening is not None
                        device = await w.opening.wait_async()
                    except VolumeError as e:  # the lock refused, or the open failed
                        w.opening = None
                        delay = min(delay * 2, RETRY_MAX)
                        self._still_waiting(w, str(e))
                        continue
                    w.opening = None
                    assert device is not None  # no budget: it waited for the end
                    device.set_qos(cfg.qos)  # as it runs now (a reload, `volume qos`)
                    with trio.CancelScope(shield=True):  # the device is ours to serve or close
                        await self._attach_opened(w, cfg, device)
                    return
        finally:
            if w.opening is not None:  # cancelled before it was waited for
                w.opening.leave()
                w.opening = None

    async def _next_attempt(self, w: WaitingDevice, delay: float) -> BlkConfig | None:
        """The config of the device's next open, w.opening started (or the
        one start-up or a reload left going); None: the device is gone."""
        if w.opening is None:
            await trio.sleep(delay)
        cfg = self._blk_config(w.device_id)  # as it runs now (a reload may change qos)
        if cfg is None or w.opening is not None:
            return cfg
        # Held elsewhere or etcd away: retried like an unreachable source.
        # Shielded (etcd calls time out): cancelled half way, etcd could
        # keep a record nobody knows of, and the reload that cancelled us
        # would find no lock to release.
        with trio.CancelScope(shield=True):
            await self._lock_volume(cfg, note=False)
        if self.waiting.get(w.device_id) is not w:
            await self._unlock_removed(w.device_id)
            return None
        w.opening = Opening.device(cfg)
        return cfg

    def _still_waiting(self, w: WaitingDevice, error: str) -> None:
        w.attempts += 1
        if error != w.error:  # log changes, not every attempt
            log_event(log, logging.WARNING, "remote source still unavailable", device=w.device_id,
                      error=error, attempts=w.attempts)
        w.error = error

    async def _attach_opened(self, w: WaitingDevice, cfg: BlkConfig, device: BlkDevice) -> None:
        async with self._reload_lock:
            if self._stopping or self.waiting.get(w.device_id) is not w:
                await trio.to_thread.run_sync(device.close)  # stopped, or removed by a reload
                if not self._stopping:  # at a stop the locks go with the lease
                    await self._unlock_removed(w.device_id)
                return
            assert self._nursery is not None
            server = self._server(device, cfg.socket, cfg.id)
            try:
                await self._nursery.start(server.serve)
            except OSError as e:
                # Closing a remote volume talks to its server: off the trio thread.
                await trio.to_thread.run_sync(device.close)
                del self.waiting[w.device_id]
                await self._unlock_volume(cfg.id)  # not served: no lock held for it
                log_event(log, logging.ERROR, "device not served: cannot listen", device=cfg.id,
                          socket=str(cfg.socket), error=str(e))
                return
            self.servers = [*self.servers, server]  # a new list: the metrics thread may hold the old
            del self.waiting[w.device_id]
        log_event(log, logging.INFO, "remote source reachable; device serving", device=cfg.id,
                  socket=str(cfg.socket), attempts=w.attempts, waited_s=round(time.time() - w.since, 1))

    def _close_opened(self, opened) -> None:
        for device, _, _ in opened:
            device.close()
        if self.fleet is not None and self.fleet.volume_locks:
            trio.run(self.fleet.revoke)  # the volume locks taken so far go with the lease
        self.close()

    async def _lock_volume(self, b: BlkConfig, *, note: bool = True) -> None:
        """Take the fleet lock an NBD volume needs before its device serves
        (docs/volumes.md "One host at a time"), unless held already (a
        device that waits for its source keeps it). Nothing for other
        volumes (an RBD image locks itself) and without [fleet] (the
        operator's job). VolumeError when it cannot be taken."""
        if b.nbd is None:
            return
        if self.fleet is None:
            if note:
                log_event(log, logging.INFO, "nbd volume not locked across hosts: no [fleet]",
                          device=b.id, volume=b.nbd.volume_name)
            return
        if b.id not in self.fleet.volume_locks:
            await self.fleet.lock_volume(VolumeLockRecord(b.nbd.volume_name, self.fleet.record.id, b.id))

    async def _unlock_volume(self, device_id: str) -> None:
        if self.fleet is not None:
            await self.fleet.unlock_volume(device_id)

    async def _unlock_removed(self, device_id: str) -> None:
        """A waiting device's retry took its lock while a reload removed the
        device (the reload found no lock yet): release it here, unless a
        later reload added a device of that id again (then it is that one's)."""
        if device_id in self.waiting or any(s.device_id == device_id for s in self.servers):
            return
        with trio.CancelScope(shield=True):  # the retry's scope is cancelled
            await self._unlock_volume(device_id)

    def _open_net(self) -> NetFabric:
        from nitro.devices.net.fabric import FabricError, NetFabric
        from nitro.devices.net.uplink import UplinkError

        try:
            self.fabric = NetFabric(self.cfg)
            self.fabric.open_uplinks()
        except (FabricError, UplinkError, _datapath.DatapathError) as e:
            self.close()
            raise StartupError(str(e)) from None
        return self.fabric

    async def run(self, notifier: Notifier) -> None:
        msrv = metrics.start_metrics_server(self.cfg.metrics_listen, lambda: self.devices,
                                            self.vpc_statistics, devices_lock=self.devices_lock,
                                            get_engine=self.engine_statistics,
                                            get_fleet=self.fleet_statistics,
                                            get_waiting=self.waiting_statistics)
        # SIGHUP is caught from here on and handled once the daemon serves:
        # the control socket exists before READY, and a SIGHUP sent as soon
        # as it does must wait, not kill the daemon (its default action).
        try:
            with trio.open_signal_receiver(signal.SIGHUP) as sighups:
                await self._serve(notifier, sighups)
        finally:
            # Both wait for other threads (the HTTP server's poll loop, the
            # uplink threads' poll timeout): never on the trio thread.
            with trio.CancelScope(shield=True):
                if msrv is not None:
                    await trio.to_thread.run_sync(msrv[0].shutdown)
                    msrv[0].server_close()
                await self._stop_uplinks()
                await self._stop_underlay()
            devices, waiting = len(self.servers), len(self.waiting)  # close() empties them
            self.close()
            if self._drained is not None:  # a stop signal's drain, not an error
                log_event(log, logging.INFO, "stopped", devices=devices, waiting=waiting,
                          drain_s=round(self._drained, 3))

    async def _serve(self, notifier: Notifier, sighups: AsyncIterator) -> None:
        """Serve until a stop signal, then drain (SIGHUPs reload meanwhile)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for s in self.servers:
                await nursery.start(s.serve)
            for w in self.waiting.values():
                nursery.start_soon(self._attach_when_reachable, w)
            await nursery.start(serve_control, self.cfg.control_socket, self)
            if self.engine is not None:
                nursery.start_soon(self.engine.watch)
            if self.underlay is not None:
                assert self.engine is not None
                await self.underlay.start(self.engine)  # before the agent feeds it remotes
            if self.fleet_node is not None:
                # Cancelled after the drain: the agent revokes its lease then.
                await nursery.start(self.fleet_node.run)
            if self.fabric is not None:
                nursery.start_soon(self.fabric.serve_punts)
                self.fabric.start_uplink_threads()
            nursery.start_soon(watchdog_loop, notifier)
            nursery.start_soon(self._reload_on_sighup, sighups)  # caught since run()
            notifier.ready()
            log_event(log, logging.INFO, "serving", devices=len(self.servers), waiting=len(self.waiting),
                      metrics=self.cfg.metrics_listen or "off",
                      control=str(self.cfg.control_socket))
            await _wait_for_stop_signal()
            self._stopping = True  # reloads from now on are refused
            notifier.stopping()
            async with self._reload_lock:  # a reload under way finishes first
                await self.drain()
            nursery.cancel_scope.cancel()

    # -- reload ------------------------------------------------------------
    async def reload(self) -> dict:
        """Re-read the config file and apply it (see reload.py for the rules).

        Returns the result as a control-socket reply body; raises
        ReloadError when nothing was changed because the reload was refused
        or failed. One reload at a time; none once a stop signal arrived."""
        if self._stopping:
            raise self._refuse("the daemon is stopping")
        if self.load_config is None:
            raise self._refuse("the daemon was started without --config, on the embedded default "
                               "config: there is no file to re-read (restart it with --config FILE)")
        async with self._reload_lock:
            if self._stopping:
                raise self._refuse("the daemon is stopping")
            return await self._reload_locked(self.load_config)

    def _with_running_fleet_vpcs(self, new: DaemonConfig) -> DaemonConfig:
        """A reloaded config's fleet VPCs as they run (resolved at start-up),
        else as the agent knows them now: the plan then sees only real
        [[net]] changes (which need a restart anyway)."""
        from nitro.config import with_fleet_vpcs
        from nitro.fleet.node import vpc_config

        assert self.fleet is not None
        running = {v.id: v for v in self.cfg.vpc if v.vni is not None}
        known = {name: vpc_config(r) for name, r in self.fleet.state.vpcs.items()}
        return with_fleet_vpcs(new, list({**known, **running}.values()))

    def _refuse(self, reason: str) -> ReloadError:
        log_event(log, logging.WARNING, "reload refused", config=self.cfg.source, error=reason)
        return ReloadError(reason)

    async def _reload_locked(self, load: Callable[[], DaemonConfig]) -> dict:
        log_event(log, logging.INFO, "reload", config=self.cfg.source)
        try:
            new = await trio.to_thread.run_sync(load)
            if self.fleet is not None and new.fleet_vpc_names():
                new = self._with_running_fleet_vpcs(new)
        except ConfigError as e:
            raise self._refuse(f"config {e}") from None
        plan = reload_plan.plan(self.cfg, new)
        for c in plan.needs_restart:
            log_event(log, logging.WARNING, "reload: not applied, needs a restart",
                      kind=c.kind, device=c.id, reason=c.reason)
        for c in plan.refused:
            log_event(log, logging.WARNING, "reload: device not added", device=c.id, reason=c.reason)
        added = await self._add_devices(plan.add)  # all or nothing: ReloadError changes nothing
        for b in plan.remove:
            if (w := self.waiting.pop(b.id, None)) is not None:
                w.cancel.cancel()  # never served: nothing to drain
                await self._unlock_volume(b.id)
                log_event(log, logging.INFO, "reload: waiting device removed", device=b.id)
                continue
            server = next(s for s in self.servers if s.device_id == b.id)
            await self._remove_server(server)
            log_event(log, logging.INFO, "reload: device removed", device=b.id, socket=str(b.socket))
        for s in added:
            log_event(log, logging.INFO, "reload: device added", device=s.device_id, socket=str(s.socket_path))
        for b in plan.qos:
            if b.id in self.waiting:
                continue  # opens with the new limits (self.cfg below)
            self._blk_device(b.id).set_qos(b.qos)
            log_event(log, logging.INFO, "reload: qos changed", device=b.id, **dataclasses.asdict(b.qos))
        for device_id in plan.unchanged:
            log_event(log, logging.DEBUG, "reload: device unchanged", device=device_id)
        self.cfg = plan.running
        log_event(log, logging.INFO, "reloaded", config=self.cfg.source, added=len(plan.add),
                  removed=len(plan.remove), unchanged=len(plan.unchanged),
                  needs_restart=len(plan.needs_restart), refused=len(plan.refused))
        return {"config": self.cfg.source,
                "added": [b.id for b in plan.add], "removed": [b.id for b in plan.remove],
                "qos": [b.id for b in plan.qos],
                "unchanged": list(plan.unchanged),
                "needs_restart": [c.as_dict() for c in plan.needs_restart],
                "refused": [c.as_dict() for c in plan.refused]}

    def _blk_device(self, device_id: str) -> BlkDevice:
        device = next(s for s in self.servers if s.device_id == device_id).device
        if not isinstance(device, BlkDevice):
            raise TypeError(f"device {device_id} is not a [[blk]] device")
        return device

    async def set_qos(self, device_id: str, values: dict) -> dict:
        """`nitro volume qos`: change some of a volume's QoS limits live
        (the keys of ``values``; the others stay). The running
        configuration records them, so a later reload applies the file's
        again. CommandRefused (nothing changed) for an unknown device or a
        bad value."""
        async with self._reload_lock:
            blks = {b.id: b for b in self.cfg.blk}
            if device_id not in blks:
                raise CommandRefused(f"no [[blk]] device {device_id!r} (have: {', '.join(blks) or 'none'})")
            try:
                qos = parse_qos(values, blks[device_id].qos, "volume qos")
            except ConfigError as e:
                raise CommandRefused(str(e)) from None
            if device_id not in self.waiting:  # else: opens with them
                self._blk_device(device_id).set_qos(qos)
            self.cfg = dataclasses.replace(self.cfg, blk=tuple(
                dataclasses.replace(b, qos=qos) if b.id == device_id else b for b in self.cfg.blk))
            log_event(log, logging.INFO, "qos changed", device=device_id, **dataclasses.asdict(qos))
            return {"device": device_id, "qos": dataclasses.asdict(qos)}

    async def _add_devices(self, cfgs) -> list[VhostUserServer]:
        """Open every new volume, then make each listen. If any fails, the
        ones already set up are shut down again and ReloadError is raised:
        either all additions happen or none."""
        assert self._nursery is not None, "reload before run()"
        started: list[VhostUserServer] = []
        waiting: list[WaitingDevice] = []
        try:
            for b in cfgs:
                try:
                    await self._lock_volume(b)
                    # Off the trio thread: creating or growing an image, or
                    # a LUKS key derivation, takes a while; a remote source
                    # may not answer at all (then the device waits).
                    if b.remote is None:
                        device = await trio.to_thread.run_sync(blk.open_device, b)
                    else:
                        opening = Opening.device(b)
                        got = await opening.wait_async(STARTUP_REMOTE_BUDGET)
                        if got is None:
                            w = self._wait_for_source(b.id, _gave_up(STARTUP_REMOTE_BUDGET))
                            w.opening = opening
                            waiting.append(w)
                            continue
                        device = got
                except SourceUnavailableError as e:
                    waiting.append(self._wait_for_source(b.id, str(e)))
                    continue
                except VolumeError as e:
                    await self._unlock_volume(b.id)
                    raise self._refuse(f"device {b.id}: {e}") from None
                server = self._server(device, b.socket, b.id)
                try:
                    await self._nursery.start(server.serve)
                except OSError as e:
                    await trio.to_thread.run_sync(device.close)
                    await self._unlock_volume(b.id)
                    raise self._refuse(f"device {b.id}: cannot listen on {b.socket}: {e}") from None
                started.append(server)
                self.servers = [*self.servers, server]  # a new list: the metrics thread may hold the old
        except BaseException:
            with trio.CancelScope(shield=True):
                for w in waiting:
                    del self.waiting[w.device_id]
                    if w.opening is not None:
                        w.opening.leave()
                    await self._unlock_volume(w.device_id)
                for server in reversed(started):
                    await self._remove_server(server)
            raise
        for w in waiting:
            self._nursery.start_soon(self._attach_when_reachable, w)
        return started

    async def _remove_server(self, server: VhostUserServer) -> None:
        """Shut one device down as a drain would: its frontend is
        disconnected, what C holds is completed, the volume flushed
        (remote storage waited for at most io_timeout in all, as at a stop)."""
        began = time.monotonic()
        await server.shutdown()
        self.servers = [s for s in self.servers if s is not server]
        try:
            await trio.to_thread.run_sync(server.device.flush, began)
        except OSError as e:  # still close it: the guest is gone either way
            log_event(log, logging.ERROR, "reload: flush of a removed device failed",
                      device=server.device_id, error=str(e))
        await trio.to_thread.run_sync(self._close_device, server)
        await self._unlock_volume(server.device_id)  # after the last write reached the volume
        try:
            server.socket_path.unlink()
        except OSError:
            pass

    def _close_device(self, server: VhostUserServer) -> None:
        """Close a device already out of self.servers. A scrape lists the
        devices under devices_lock, so once the lock was free after that,
        none still reads this one's counters: closing it (up to io_timeout
        for a remote volume whose storage is away) does not hold scrapes."""
        with self.devices_lock:
            pass
        server.device.close()

    async def _reload_on_sighup(self, sighups: AsyncIterator) -> None:
        async for _ in sighups:
            if self._stopping:
                log_event(log, logging.WARNING, "SIGHUP ignored: the daemon is stopping")
                continue
            try:
                await self.reload()
            except ReloadError:
                pass  # logged by _refuse

    async def drain(self) -> None:
        """Stop fetching new requests, complete what C holds, flush volumes.

        With remote storage away, each step would wait io_timeout. So
        every device drains side by side (its rings detached side by side,
        then its volume flushed, the flush bounded by io_timeout from the
        drain's start) and nothing is rebalanced meanwhile: a stop takes
        about the largest io_timeout, however many volumes wait (under
        the unit's TimeoutStopSec)."""
        log_event(log, logging.INFO, "draining")
        began = time.monotonic()
        await self._stop_uplinks()  # no more frames from the host TAPs into RX rings
        await self._stop_underlay()  # nor from other hosts
        if self.engine is not None:
            self.engine.stop_rebalancing()
        for s in self.servers:
            s.stop_accepting()
        # One thread per volume: trio's default limiter would queue some.
        limiter = trio.CapacityLimiter(max(1, len(self.servers)))
        async with trio.open_nursery() as nursery:
            for s in self.servers:
                nursery.start_soon(self._drain_device, s, began, limiter)
        self._drained = time.monotonic() - began

    @staticmethod
    async def _drain_device(s: VhostUserServer, began: float,
                            limiter: trio.CapacityLimiter) -> None:
        """Its rings back, then its volume flushed: a healthy volume's
        flush does not wait for another's outage."""
        await s.stop_all_workers()
        try:
            await trio.to_thread.run_sync(s.device.flush, began, limiter=limiter)
        except OSError as e:  # a remote volume's storage is away: stop anyway
            log_event(log, logging.ERROR, "drain: flush failed", device=s.device_id, error=str(e))

    async def _stop_uplinks(self) -> None:
        if self.fabric is not None:
            await trio.to_thread.run_sync(self.fabric.stop)

    async def _stop_underlay(self) -> None:
        if self.underlay is not None:
            await self.underlay.stop()

    def close(self) -> None:
        """Release everything. Synchronous: by now run() has stopped the
        uplink threads off the trio thread (or they never started), so the
        fabric's stop() here has nothing left to join. Under devices_lock:
        a scrape that began before the metrics server's shutdown may still
        be reading the C counters freed here."""
        with self.devices_lock:
            self._close()

    def _close(self) -> None:
        for w in self.waiting.values():  # opens still going: closed when they end
            if w.opening is not None:
                w.opening.leave()
        if self.fabric is not None:
            self.fabric.stop()  # uplink threads first: they deliver into RX rings
        close_devices([s.device for s in self.servers])
        for s in self.servers:
            try:
                s.socket_path.unlink()
            except OSError:
                pass
        self.servers = []
        if self.underlay is not None:  # its ring was detached by run(); the switch is still there
            if self.fleet_node is not None:
                self.fleet_node.detach_underlay()
            self.underlay.close()
            self.underlay = None
        if self.fabric is not None:
            self.fabric.close()
            self.fabric = None
        if self.engine is not None:  # every ring was detached by now
            self.engine.close()
            self.engine = None
        if self.fleet_node is not None:  # after the underlay and the engine: they send through its tunnel
            self.fleet_node.close()
            self.fleet_node = None


def make_directories(cfg: DaemonConfig) -> None:
    """Create the runtime and state directories and the directories of the
    control socket and every device socket, whatever the config says: on a
    fresh machine none exists (systemd creates /run/nitro and /var/lib/nitro
    only for its unit), and a config may put each of them anywhere.
    Existing directories are left as they are. StartupError naming the
    directory when one cannot be created."""
    wanted = [(cfg.runtime_dir, "runtime directory", 0o755),
              (cfg.state_dir, "state directory", 0o750),  # images: as the unit's StateDirectoryMode
              (cfg.control_socket.parent, "control socket's directory", 0o755)]
    sockets = [(d.id, d.socket) for d in cfg.blk] + [(d.id, d.socket) for d in cfg.net]
    wanted += [(socket.parent, f"directory of device {dev}'s socket", 0o755) for dev, socket in sockets]
    for path, what, mode in wanted:
        try:
            path.mkdir(mode=mode, parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"cannot create the {what} {path}: {e.strerror}") from None


def close_devices(devices: list) -> None:
    """Close every device, side by side: closing a remote volume whose
    storage is away waits its io_timeout, and one after another those
    waits would add up past the unit's TimeoutStopSec. The first error
    is raised once all are closed."""
    errors: list[BaseException] = []

    def close(device) -> None:
        try:
            device.close()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others
            errors.append(e)

    threads = [threading.Thread(target=close, args=(d,), name=f"close {i}")
               for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


async def _wait_for_stop_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log_event(log, logging.INFO, "stop signal", signal=signal.Signals(signum).name)
            return
