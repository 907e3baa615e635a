"""NetFabric: the daemon's one C switch, its VPCs and their control plane.

Built once at start-up from the [[vpc]] and [[net]] tables: VPC i of the
config is switch VPC i, interface j is switch port j. Interfaces exist in the
switch whether or not a frontend is connected, so a guest or QEMU restart
finds the same port, MAC and address (only the RX rings come and go).

Threads: ``serve_punts`` runs on the trio thread and answers the frames C
punted (ARP, DHCP, gateway ICMP) through the sans-IO responders; each uplink
TAP has one plain thread running ``Switch.uplink_serve`` (C, GIL released).
"""

from __future__ import annotations

import logging
import threading

import trio
import trio.lowlevel

from nitro import _datapath
from nitro.config import DaemonConfig
from nitro.devices.net.device import NetDevice
from nitro.devices.net.uplink import Tap
from nitro.log import log_event
from nitro.vpc import VpcResponder
from nitro.vpc import packets as pk

log = logging.getLogger("nitro.net")
UPLINK_POLL_MS = 200


class NetFabric:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.switch = _datapath.Switch()
        self.responders: dict[str, VpcResponder] = {}
        self.vpc_index: dict[str, int] = {}
        self.devices: list[NetDevice] = []
        self.taps: dict[int, Tap] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        for i, v in enumerate(cfg.vpc):
            r = VpcResponder(v.id, v.cidr, v.gateway, mtu=v.mtu, dns=v.dns,
                             lease_seconds=v.lease_seconds)
            self.switch.add_vpc(i, r.gateway_mac, v.gateway.packed, v.mtu)
            self.responders[v.id] = r
            self.vpc_index[v.id] = i
        for port, n in enumerate(cfg.net):
            vi = self.vpc_index[n.vpc]
            mac = pk.mac_bytes(n.mac)
            self.switch.add_port(port, vi, mac, n.ip.packed, bw_in=n.bw_in_bytes_per_sec,
                                 bw_out=n.bw_out_bytes_per_sec, pps=n.pps)
            self.responders[n.vpc].add_interface(port, mac, n.ip)
            self.devices.append(NetDevice(n, self.switch, port, cfg.vpc[vi].mtu, fabric=self))

    def open_uplinks(self) -> None:
        """Create the TAPs (raises UplinkError); call before serving."""
        for i, v in enumerate(self.cfg.vpc):
            if v.uplink is None:
                continue
            tap = Tap(v.uplink, v.mtu)
            self.taps[i] = tap
            self.switch.set_uplink(i, tap.fd, tap.mac)
            self.responders[v.id].set_uplink(v.uplink.address.ip, tap.mac)

    def start_uplink_threads(self) -> None:
        for i, tap in self.taps.items():
            t = threading.Thread(target=self._uplink_loop, args=(i,), name=f"uplink-{tap.name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _uplink_loop(self, vpc: int) -> None:
        while not self._stop.is_set():
            try:
                self.switch.uplink_serve(vpc, UPLINK_POLL_MS)
            except _datapath.DatapathError as e:
                log_event(log, logging.ERROR, "uplink failed", vpc=self.cfg.vpc[vpc].id, error=str(e))
                return

    async def serve_punts(self) -> None:
        """Answer punted control frames until cancelled (trio thread)."""
        fd = self.switch.punt_fd
        port_vpc = {port: n.vpc for port, n in enumerate(self.cfg.net)}
        while True:
            await trio.lowlevel.wait_readable(fd)
            for _ in range(256):
                got = self.switch.punt_pop()
                if got is None:
                    break
                port, frame = got
                vpc = port_vpc.get(port)
                if vpc is None:
                    continue
                for reply in self.responders[vpc].handle(port, frame):
                    self.switch.inject(port, reply)
            await trio.lowlevel.checkpoint()

    def lease_of(self, vpc: str, port: int) -> dict | None:
        r = self.responders.get(vpc)
        return r.statistics()["leases"].get(port) if r else None

    def statistics(self) -> dict:
        out = {}
        for i, v in enumerate(self.cfg.vpc):
            s = self.responders[v.id].statistics()
            if i in self.taps:
                s["uplink"] = {"name": self.taps[i].name, **self.switch.uplink_stats(i)}
            out[v.id] = s
        return out

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2 * UPLINK_POLL_MS / 1000 + 1)
        self._threads = []

    def close(self) -> None:
        self.stop()
        for i, tap in self.taps.items():
            self.switch.set_uplink(i, -1, None)
            tap.close()
        self.taps = {}
        for d in self.devices:
            d.close()
