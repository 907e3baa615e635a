"""The underlay: this host's end of VPCs that span hosts (docs/fleet.md "Datapath").

:class:`Underlay` owns the underlay sockets and the underlay ring, and keeps
the switch's side of the fleet: the VNI each fleet VPC crosses hosts with,
the remote table (which peer each remote interface lives on) and the VPC
responders' ARP answers for remote interfaces (so no broadcast crosses
hosts). The peers and their SAs are the FleetTunnel's, which the FleetNode
owns and keeps (nitro/fleet/sync.py); the Underlay only borrows it (its C
tunnel to send through, a host's peer slot). One caller drives both, in
order (TunnelSync, on the trio thread)::

    u = Underlay(fabric, fleet_tunnel, local)     # opens the sockets
    await u.start(engine)                          # the ring on a worker
    u.serve_vpc("blue", vni=100)                   # frames of blue cross with VNI 100
    fleet_tunnel.set_peer(Peer(...))               # a host before its interfaces
    u.set_remote("blue", ip, mac, "host-b")        # live, any time
    u.remove_remote("blue", ip); u.forget_host("host-b")   # before the peer goes
    await u.stop(engine)                           # then u.close()

Sockets. Encrypted: a raw IPPROTO_ESP socket bound to the local address
receives (the host kernel holds no SA for nitro's SPIs; a raw socket also
keeps it from answering "protocol unreachable"). Plain: a UDP socket bound
to local:6081, not a raw UDP socket (that one would see a copy of every UDP
datagram of the host, and the kernel would still answer "port unreachable"
without a bound socket). Sending, both modes: one raw IPPROTO_RAW socket
(IP_HDRINCL): the tunnel writes whole outer packets (DF set, the flow-hash
UDP source port of RFC 8926) and one socket serves every peer.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Any

from nitro import _datapath
from nitro.fleet.tunnel import FleetTunnel
from nitro.log import log_event
from nitro.vpc import packets as pk

if TYPE_CHECKING:
    from nitro.devices.net.fabric import NetFabric
    from nitro.engine import Engine

log = logging.getLogger("nitro.fleet")
GENEVE_PORT = 6081
IPPROTO_ESP = 50
RCVBUF = 4 << 20  # a burst of 64 KiB frames from several peers


class UnderlayError(Exception):
    """The underlay cannot do what was asked: its sockets cannot be opened
    (needs CAP_NET_RAW and the local address on this host), or a VPC or
    host is unknown. The message names it."""


def open_receive_socket(local: ipaddress.IPv4Address, encrypt: bool) -> socket.socket:
    """The socket frames from other hosts arrive on (non-blocking): raw ESP
    bound to local, or UDP bound to local:6081 (module docstring)."""
    try:
        if encrypt:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ESP)
            s.bind((str(local), 0))
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((str(local), GENEVE_PORT))
    except OSError as e:
        raise UnderlayError(f"underlay {local}: cannot open its receive socket: {e.strerror} "
                            f"(it must be an address of this host)") from None
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    return s


def open_send_socket() -> socket.socket:
    """The raw IPv4 socket (IP_HDRINCL) whole outer packets leave on."""
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError as e:
        raise UnderlayError(f"underlay: cannot open its send socket: {e.strerror}") from None
    s.setblocking(False)
    return s


class Underlay:
    """See the module docstring. Not thread-safe: one control-plane task
    calls it; ``statistics()`` may run on any thread."""

    def __init__(self, fabric: NetFabric, fleet: FleetTunnel, local: ipaddress.IPv4Address | str) -> None:
        self.fleet = fleet
        self.local = ipaddress.IPv4Address(local)
        self.switch = fabric.switch
        self._responders = {v.id: fabric.responders[v.id] for v in fabric.cfg.vpc}
        self._vpc_index = {v.id: i for i, v in enumerate(fabric.cfg.vpc)}
        self._vnis: dict[str, int] = {}
        self._remotes: dict[tuple[str, ipaddress.IPv4Address], tuple[bytes, str]] = {}
        self.error: str | None = None  # why the ring stopped, if it did
        self._recv = open_receive_socket(self.local, fleet.encrypt)
        try:
            self._send = open_send_socket()
        except UnderlayError:
            self._recv.close()
            raise
        self.switch.set_underlay(fleet.tunnel, self._send.fileno())
        mode = _datapath.UNDERLAY_RAW if fleet.encrypt else _datapath.UNDERLAY_UDP
        self.ring = _datapath.Ring.underlay(self.switch, self._recv.fileno(), mode)
        self._engine: Engine | None = None

    # -- life cycle ------------------------------------------------------------
    async def start(self, engine: Engine) -> None:
        """Attach the underlay ring to an engine worker: frames from other
        hosts flow from now on."""
        await engine.attach(self.ring, self._on_ring_error, label="underlay")
        self._engine = engine

    def _on_ring_error(self, exc: _datapath.DatapathError) -> None:
        # Not a guest's doing: nothing on this ring touches a guest's rings
        # except through the switch's own guards.
        self.error = f"{type(exc).__name__}: {exc}"
        log_event(log, logging.ERROR, "underlay ring stopped", error=self.error)

    async def stop(self) -> None:
        """Detach the ring (no more frames from other hosts); again: nothing."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.detach(self.ring)

    def close(self) -> None:
        """After stop(): take the underlay from the switch (waits for TX
        workers sending through it) and close the sockets. The FleetTunnel
        is its owner's to close, after this."""
        assert self._engine is None, "stop() first: a worker polls the ring"
        self.switch.set_underlay(None)
        self.ring.close()
        self._recv.close()
        self._send.close()

    # -- what the control plane changes ------------------------------------------
    def _index(self, vpc: str) -> int:
        try:
            return self._vpc_index[vpc]
        except KeyError:
            raise UnderlayError(f"vpc {vpc} is not served on this host") from None

    def serve_vpc(self, vpc: str, vni: int) -> None:
        """Frames of VPC vpc leave this host with VNI vni (RFC 8926 3.4).
        Which VNIs are accepted on arrival is the tunnel's (serve_vni)."""
        self.switch.set_vni(self._index(vpc), vni)
        self._vnis[vpc] = vni

    def stop_serving_vpc(self, vpc: str) -> None:
        self.switch.set_vni(self._index(vpc), None)
        self._vnis.pop(vpc, None)

    def forget_host(self, host: str) -> None:
        """Remove every interface mapped to host: before its peer slot is
        freed (and maybe given to another host)."""
        for (vpc, ip), (_, h) in list(self._remotes.items()):
            if h == host:
                self.remove_remote(vpc, ip)

    def set_remote(self, vpc: str, ip: ipaddress.IPv4Address | str, mac: bytes | str, host: str) -> None:
        """Interface (ip, mac) of vpc lives on host (set_peer first)."""
        ip = ipaddress.IPv4Address(ip)
        mac = pk.mac_bytes(mac) if isinstance(mac, str) else bytes(mac)
        slot = self.fleet.slot(host)
        if slot is None:
            raise UnderlayError(f"host {host} is no peer of this host")
        i = self._index(vpc)
        try:
            self.switch.set_remote(i, ip.packed, mac, slot)
        except _datapath.FrontendError:
            raise UnderlayError(f"vpc {vpc}: {ip} ({pk.mac_text(mac)}) cannot be remote: a local "
                                f"interface has this address or MAC, or the MAC is multicast") from None
        self._responders[vpc].set_remote(ip, mac)
        self._remotes[(vpc, ip)] = (mac, host)

    def remove_remote(self, vpc: str, ip: ipaddress.IPv4Address | str) -> None:
        ip = ipaddress.IPv4Address(ip)
        if self._remotes.pop((vpc, ip), None) is None:
            return
        self.switch.remove_remote(self._index(vpc), ip.packed)
        self._responders[vpc].remove_remote(ip)

    # -- observation (any thread) ----------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        """This host's end and, per peer host, packets and bytes each way,
        drops by reason (the tunnel's and the switch's) and the outbound
        SA's epoch and age: for metrics and ``nitro status``."""
        tunnel = self.fleet.tunnel
        peers = {}
        for host, (peer, slot) in self.fleet.peers().items():
            sw = self.switch.underlay_stats(slot)
            tun = tunnel.peer_stats(slot)
            drops = dict(tun["drops"])
            for reason, n in sw["drops"].items():
                drops[reason] = drops.get(reason, 0) + n
            sa = tunnel.outbound_info(slot)
            peers[host] = {
                "slot": slot, "underlay": str(ipaddress.IPv4Address(peer.underlay)), "epoch": peer.epoch,
                **{k: sw[k] for k in ("packets_out", "bytes_out", "packets_in", "bytes_in")},
                "drops": drops,
                "sa": None if sa is None else {"spi": sa["spi"], "epoch": sa["epoch"], "seq": sa["seq"],
                                               "age_seconds": sa["age_ns"] / 1e9},
            }
        engine = self._engine
        return {
            "host": self.fleet.host, "underlay": str(self.local), "encrypt": self.fleet.encrypt,
            "epoch": self.fleet.epoch, "state": "down" if self.error else "up" if engine else "stopped",
            "worker": engine.worker_of(self.ring) if engine is not None else None,
            **({"error": self.error} if self.error else {}),
            "vnis": dict(self._vnis), "remote_interfaces": self.switch.remote_count,
            "drops": {"tunnel": tunnel.stats()["drops"], "switch": self.switch.underlay_stats()["drops"]},
            "peers": peers,
        }

