"""The daemon's lifecycle: open volumes, listen, serve, drain on SIGTERM.

Start-up opens every volume before any socket listens, so a bad volume stops
the daemon before a guest can attach to half a configuration. READY is sent
to systemd once every socket listens. SIGTERM/SIGINT: stop accepting, stop
fetching new requests (each C loop completes the batch it holds), flush
every volume, tell systemd STOPPING, exit 0.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from nitro import __version__, _datapath, control, metrics
from nitro.config import DaemonConfig
from nitro.devices import blk
from nitro.devices.blk.backends.raw import VolumeError
from nitro.log import log_event
from nitro.sdnotify import Notifier, watchdog_loop
from nitro.vhost.server import VhostUserServer

if TYPE_CHECKING:
    from nitro.devices.net.fabric import NetFabric

log = logging.getLogger("nitro.daemon")


class StartupError(Exception):
    """A device could not be set up; the daemon exits non-zero before serving."""


@dataclass
class Daemon:
    cfg: DaemonConfig
    servers: list[VhostUserServer] = field(default_factory=list)
    version: str = __version__
    fabric: NetFabric | None = None  # when [[net]] (or a VPC uplink) is configured

    @property
    def devices(self) -> list[VhostUserServer]:
        return self.servers

    def status_sections(self) -> dict[str, Callable[[], Any]]:
        """Parts of a status reply beyond the devices (control.DaemonView)."""
        return {"vpcs": self.vpc_statistics} if self.fabric is not None else {}

    def vpc_statistics(self) -> dict:
        """Per-VPC control plane and uplink counters; any thread (metrics)."""
        fabric = self.fabric  # read once: close() clears it on the trio thread
        return fabric.statistics() if fabric is not None else {}

    def open_devices(self) -> None:
        for b in self.cfg.blk:
            try:
                device = blk.open_device(b)
            except VolumeError as e:
                self.close()
                raise StartupError(f"device {b.id}: {e}") from None
            self.servers.append(VhostUserServer(device, b.socket, device_id=b.id))
        if self.cfg.net or any(v.uplink for v in self.cfg.vpc):
            self._open_net()

    def _open_net(self) -> None:
        from nitro.devices.net.fabric import FabricError, NetFabric
        from nitro.devices.net.uplink import UplinkError

        try:
            self.fabric = NetFabric(self.cfg)
            self.fabric.open_uplinks()
        except (FabricError, UplinkError, _datapath.DatapathError) as e:
            self.close()
            raise StartupError(str(e)) from None
        for n, device in zip(self.cfg.net, self.fabric.devices):
            self.servers.append(VhostUserServer(device, n.socket, device_id=n.id))

    async def run(self, notifier: Notifier) -> None:
        msrv = metrics.start_metrics_server(self.cfg.metrics_listen, lambda: self.devices,
                                            self.vpc_statistics)
        try:
            async with trio.open_nursery() as nursery:
                for s in self.servers:
                    await nursery.start(s.serve)
                await nursery.start(control.serve_control, self.cfg.control_socket, self)
                if self.fabric is not None:
                    nursery.start_soon(self.fabric.serve_punts)
                    self.fabric.start_uplink_threads()
                nursery.start_soon(watchdog_loop, notifier)
                notifier.ready()
                log_event(log, logging.INFO, "serving", devices=len(self.servers),
                          metrics=self.cfg.metrics_listen or "off",
                          control=str(self.cfg.control_socket))
                await _wait_for_stop_signal()
                notifier.stopping()
                await self.drain()
                nursery.cancel_scope.cancel()
        finally:
            # Both wait for other threads (the HTTP server's poll loop, the
            # uplink threads' poll timeout): never on the trio thread.
            with trio.CancelScope(shield=True):
                if msrv is not None:
                    await trio.to_thread.run_sync(msrv[0].shutdown)
                    msrv[0].server_close()
                await self._stop_uplinks()
            self.close()

    async def drain(self) -> None:
        """Stop fetching new requests, complete what C holds, flush volumes."""
        log_event(log, logging.INFO, "draining")
        await self._stop_uplinks()  # no more frames from the host TAPs into RX rings
        for s in self.servers:
            s.stop_accepting()
            await s.stop_all_workers()
        for s in self.servers:
            await trio.to_thread.run_sync(s.device.flush)

    async def _stop_uplinks(self) -> None:
        if self.fabric is not None:
            await trio.to_thread.run_sync(self.fabric.stop)

    def close(self) -> None:
        """Release everything. Synchronous: by now run() has stopped the
        uplink threads off the trio thread (or they never started), so the
        fabric's stop() here has nothing left to join."""
        if self.fabric is not None:
            self.fabric.stop()  # uplink threads first: they deliver into RX rings
        for s in self.servers:
            s.device.close()
            try:
                s.socket_path.unlink()
            except OSError:
                pass
        self.servers = []
        if self.fabric is not None:
            self.fabric.close()
            self.fabric = None


async def _wait_for_stop_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log_event(log, logging.INFO, "stop signal", signal=signal.Signals(signum).name)
            return
