"""NetFabric: the daemon's one C switch, its VPCs and their control plane.

Built once at start-up from the [[vpc]] and [[net]] tables: VPC i of the
config is switch VPC i, interface j is switch port j. Interfaces exist in the
switch whether or not a frontend is connected, so a guest or QEMU restart
finds the same port, MAC and address (only the RX rings come and go).

Threads: ``serve_punts`` runs on the trio thread and answers the frames C
punted (ARP, DHCP, gateway ICMP) through the sans-IO responders; each uplink
TAP has one plain thread running ``Switch.uplink_serve`` (C, GIL released).
``statistics()`` may run on any thread (control socket, metrics scrapes).

Stopping an uplink thread: it checks ``_stop`` between ``uplink_serve``
calls, so ``stop()`` waits up to UPLINK_POLL_MS for it (call it off the trio
thread). A prompt wake needs C: ``nitro_switch_uplink_serve`` polls only the
TAP fd; it should also poll a per-switch stop eventfd (closing the TAP fd
does not wake a poll() on Linux and would let C read a reused fd number).
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
PUNT_BATCH = 256  # frames answered per wake-up before yielding to other tasks


class FabricError(Exception):
    """The switch could not be built from the config (e.g. more VPCs or
    interfaces than the C switch has room for). One line, names the entry."""


class NetFabric:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        try:
            self.switch = _datapath.Switch()
        except (MemoryError, _datapath.DatapathError) as e:
            raise FabricError(f"cannot create the VPC switch: {e}") from None
        self.responders: dict[str, VpcResponder] = {}      # by VPC id
        self._port_responder: dict[int, VpcResponder] = {}  # every port added to the switch
        self.devices: list[NetDevice] = []
        self.taps: dict[int, Tap] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._uplink_errors: dict[int, str] = {}  # VPC index -> why its uplink thread ended
        self._stop = threading.Event()
        # Punted frames whose answer raised, by VPC id (trio thread writes).
        self.punt_errors: dict[str, int] = {v.id: 0 for v in cfg.vpc}
        self._punt_errors_logged: set[tuple[str, str, int]] = set()
        vpc_index: dict[str, int] = {}
        for i, v in enumerate(cfg.vpc):
            r = VpcResponder(v.id, v.cidr, v.gateway, mtu=v.mtu, dns=v.dns,
                             lease_seconds=v.lease_seconds)
            try:
                self.switch.add_vpc(i, r.gateway_mac, v.gateway.packed, v.mtu)
            except _datapath.DatapathError as e:
                raise FabricError(f"vpc {v.id}: cannot add it to the switch as VPC {i}: {e}") from None
            self.responders[v.id] = r
            vpc_index[v.id] = i
        for port, n in enumerate(cfg.net):
            vi = vpc_index[n.vpc]
            mac = pk.mac_bytes(n.mac)
            try:
                self.switch.add_port(port, vi, mac, n.ip.packed, bw_in=n.bw_in_bytes_per_sec,
                                     bw_out=n.bw_out_bytes_per_sec, pps=n.pps,
                                     linklocal_pps=n.linklocal_pps)
            except _datapath.DatapathError as e:
                raise FabricError(f"net {n.id}: cannot add it to the switch as port {port}: {e}") from None
            responder = self.responders[n.vpc]
            responder.add_interface(port, mac, n.ip)
            self._port_responder[port] = responder
            self.devices.append(NetDevice(n, self.switch, port, cfg.vpc[vi].mtu, responder))

    def open_uplinks(self) -> None:
        """Create the TAPs (raises UplinkError); call before serving."""
        for i, v in enumerate(self.cfg.vpc):
            if v.uplink is None:
                continue
            tap = Tap(v.uplink, v.mtu)
            self.taps[i] = tap
            self.switch.set_uplink(i, tap.fd, tap.mac)
            self.responders[v.id].set_uplink(v.uplink.address.ip, tap.mac)

    # -- uplink threads ----------------------------------------------------------
    def start_uplink_threads(self) -> None:
        for i, tap in self.taps.items():
            t = threading.Thread(target=self._uplink_loop, args=(i,), name=f"uplink-{tap.name}",
                                 daemon=True)
            self._threads[i] = t
            t.start()

    def _uplink_loop(self, vpc: int) -> None:
        try:
            while not self._stop.is_set():
                self.switch.uplink_serve(vpc, UPLINK_POLL_MS)
        except Exception as e:
            # Not a guest's doing (poll/read on our own TAP failed): the
            # uplink stays down until restart; status and metrics say so.
            self._uplink_errors[vpc] = f"{type(e).__name__}: {e}"
            tap = self.taps.get(vpc)
            log_event(log, logging.ERROR, "uplink down", vpc=self.cfg.vpc[vpc].id,
                      uplink=tap.name if tap is not None else "", error=f"{type(e).__name__}: {e}")

    def _uplink_state(self, vpc: int) -> dict:
        error = self._uplink_errors.get(vpc)
        if error is not None:
            return {"state": "down", "error": error}
        thread = self._threads.get(vpc)
        return {"state": "up" if thread is not None and thread.is_alive() else "stopped"}

    def stop(self) -> None:
        """Stop and join the uplink threads. Blocks up to about UPLINK_POLL_MS:
        call it in a worker thread from trio."""
        self._stop.set()
        threads, self._threads = dict(self._threads), {}
        for i, t in threads.items():
            t.join(2 * UPLINK_POLL_MS / 1000 + 1)
            if t.is_alive():
                log_event(log, logging.WARNING, "uplink thread did not stop", vpc=self.cfg.vpc[i].id)

    # -- control plane (trio thread) ---------------------------------------------
    async def serve_punts(self) -> None:
        """Answer punted control frames until cancelled (trio thread)."""
        fd = self.switch.punt_fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            for port, frame in self.switch.punt_pop_batch(PUNT_BATCH):
                self.answer(port, frame)
            await trio.lowlevel.checkpoint()

    def answer(self, port: int, frame: bytes) -> None:
        """Answer one punted frame from ``port``. The frame is the guest's:
        whatever it makes the responder or the injection raise is logged
        (once per distinct error), counted and dropped. Raising here would
        end the daemon's main nursery, and every device with it."""
        responder = self._port_responder[port]  # C punts only from ports added in __init__
        try:
            for reply in responder.handle(port, frame):
                self.switch.inject(port, reply)
        except Exception as exc:
            self.punt_errors[responder.vpc_id] += 1
            self._log_punt_error(responder.vpc_id, port, exc)

    def _log_punt_error(self, vpc: str, port: int, exc: Exception) -> None:
        # Distinct = exception type and the line that raised it; the message
        # may carry guest bytes, so it does not make an error "new".
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("", 0)
        key = (type(exc).__name__, *where)
        first = key not in self._punt_errors_logged
        self._punt_errors_logged.add(key)
        fields = {"vpc": vpc, "interface": self.cfg.net[port].id, "error": f"{type(exc).__name__}: {exc}"}
        if first:
            log.error("punted frame dropped: answering it failed (logged once per error)",
                      exc_info=exc, extra={"fields": fields})
        else:
            log_event(log, logging.DEBUG, "punted frame dropped: answering it failed", **fields)

    # -- observation (any thread) ------------------------------------------------
    def statistics(self) -> dict:
        """Per VPC id: responder counters, leases by interface id, punt
        errors, and the uplink (name, state, C counters) if it has one."""
        out = {}
        ports = {port: n.id for port, n in enumerate(self.cfg.net)}
        taps = dict(self.taps)
        for i, v in enumerate(self.cfg.vpc):
            s = self.responders[v.id].statistics()
            s["leases"] = {ports[port]: lease for port, lease in s["leases"].items()}
            s["punt_errors"] = self.punt_errors.get(v.id, 0)
            tap = taps.get(i)
            if tap is not None:
                s["uplink"] = {"name": tap.name, **self._uplink_state(i), **self.switch.uplink_stats(i)}
            out[v.id] = s
        return out

    def close(self) -> None:
        """Stop the uplinks and close the TAPs. The NetDevices are closed by
        their owner (the daemon closes every served device)."""
        self.stop()
        for i, tap in self.taps.items():
            self.switch.set_uplink(i, -1, None)
            tap.close()
        self.taps = {}
