"""The underlay: this host's end of VPCs that span hosts (docs/fleet.md "Datapath").

:class:`Underlay` owns the underlay sockets and the underlay ring, and keeps
three things in step: the FleetTunnel's peers and SAs, the C switch's remote
table (which host each remote interface lives on) and the VPC responders
(ARP answers for remote interfaces, so no broadcast crosses hosts). The
fleet's control plane calls it on the trio thread, in this order::

    u = Underlay(fabric, fleet_tunnel, local)     # opens the sockets
    await u.start(engine)                          # the ring on a worker
    u.serve_vpc("blue", vni=100)                   # VNIs of the VPCs here
    u.set_peer(Peer(...))                          # a host before its interfaces
    u.set_remote("blue", ip, mac, "host-b")        # live, any time
    u.remove_remote("blue", ip); u.remove_peer("host-b"); u.set_epoch(e)
    await u.stop(engine)                           # then u.close()

Sockets. Encrypted: a raw IPPROTO_ESP socket bound to the local address
receives (the host kernel holds no SA for nitro's SPIs; a raw socket also
keeps it from answering "protocol unreachable"). Plain: a UDP socket bound
to local:6081, not a raw UDP socket (that one would see a copy of every UDP
datagram of the host, and the kernel would still answer "port unreachable"
without a bound socket). Sending, both modes: one raw IPPROTO_RAW socket
(IP_HDRINCL): the tunnel writes whole outer packets (DF set, the flow-hash
UDP source port of RFC 8926) and one socket serves every peer.

:func:`load_test_fleet` is a TEST-ONLY way to install peers and mappings
from a JSON file (``NITRO_TEST_FLEET``) until the etcd agent does it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nitro import _datapath
from nitro.fleet import keys
from nitro.fleet.tunnel import FleetTunnel, Peer
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
        raise UnderlayError(f"underlay {local}: cannot open its receive socket: {e.strerror}") from None
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
        self._worker: int | None = None

    # -- life cycle ------------------------------------------------------------
    async def start(self, engine: Engine) -> None:
        """Attach the underlay ring to an engine worker: frames from other
        hosts flow from now on."""
        self._worker = await engine.attach(self.ring, self._on_ring_error, label="underlay")

    def _on_ring_error(self, exc: _datapath.DatapathError) -> None:
        # Not a guest's doing: nothing on this ring touches a guest's rings
        # except through the switch's own guards.
        self.error = f"{type(exc).__name__}: {exc}"
        log_event(log, logging.ERROR, "underlay ring stopped", error=self.error)

    async def stop(self, engine: Engine) -> None:
        """Detach the ring (no more frames from other hosts)."""
        await engine.detach(self.ring)
        self._worker = None

    def close(self) -> None:
        """After stop(): take the underlay from the switch (waits for TX
        workers sending through it), close the sockets and the FleetTunnel
        (the Underlay owns it from its constructor on)."""
        self.switch.set_underlay(None)
        self.ring.close()
        self._recv.close()
        self._send.close()
        self.fleet.close()

    # -- what the control plane changes ------------------------------------------
    def _index(self, vpc: str) -> int:
        try:
            return self._vpc_index[vpc]
        except KeyError:
            raise UnderlayError(f"vpc {vpc} is not served on this host") from None

    def serve_vpc(self, vpc: str, vni: int) -> None:
        """Frames of VPC vpc cross hosts with VNI vni (RFC 8926 3.4)."""
        i = self._index(vpc)
        self.switch.set_vni(i, vni)
        self.fleet.serve_vni(vni, i)
        self._vnis[vpc] = vni

    def stop_serving_vpc(self, vpc: str) -> None:
        i = self._index(vpc)
        vni = self._vnis.pop(vpc, None)
        self.switch.set_vni(i, None)
        if vni is not None:
            self.fleet.stop_serving(vni)

    def set_peer(self, peer: Peer) -> int:
        """Add or update another host (its key, index, address, epoch); its
        tunnel slot."""
        return self.fleet.set_peer(peer)

    def remove_peer(self, host: str) -> None:
        """Forget a host and every interface mapped to it."""
        for (vpc, ip), (_, h) in list(self._remotes.items()):
            if h == host:
                self.remove_remote(vpc, ip)
        self.fleet.remove_peer(host)

    def set_epoch(self, epoch: int) -> None:
        """Send under a new key epoch (a rekey); publish it afterwards."""
        self.fleet.set_epoch(epoch)

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
        return {
            "host": self.fleet.host, "underlay": str(self.local), "encrypt": self.fleet.encrypt,
            "epoch": self.fleet.epoch, "state": "down" if self.error else "up",
            **({"error": self.error} if self.error else {}),
            "vnis": dict(self._vnis), "remote_interfaces": self.switch.remote_count,
            "drops": {"tunnel": tunnel.stats()["drops"], "switch": self.switch.underlay_stats()["drops"]},
            "peers": peers,
        }


# ---------------------------------------------------------------------------
# TEST ONLY: the fleet from a file, until the etcd agent installs it
# ---------------------------------------------------------------------------

def load_test_fleet(path: Path, fabric: NetFabric) -> Underlay:
    """An Underlay as the JSON file at path describes it (TEST ONLY; the
    etcd agent replaces this)::

        {"host": "h1", "index": 1, "private_key": "/k/h1.key",
         "underlay": "192.0.2.1", "mtu": 1500, "encrypt": true, "epoch": 7,
         "vpcs": {"blue": 100},
         "peers": [{"host": "h2", "index": 2, "public_key": "<hex>",
                    "underlay": "192.0.2.2", "epoch": 7}],
         "remotes": [{"vpc": "blue", "ip": "10.0.0.20", "mac": "52:54:...",
                      "host": "h2"}]}
    """
    spec = json.loads(path.read_text())
    local = ipaddress.IPv4Address(spec["underlay"])
    fleet = FleetTunnel.from_key_file(spec["host"], spec["index"], Path(spec["private_key"]), local.packed,
                                      spec.get("mtu", 1500), encrypt=spec.get("encrypt", True),
                                      epoch=spec.get("epoch", 0))
    try:
        u = Underlay(fabric, fleet, local)
    except BaseException:
        fleet.close()
        raise
    for vpc, vni in spec.get("vpcs", {}).items():
        u.serve_vpc(vpc, vni)
    for p in spec.get("peers", []):
        u.set_peer(Peer(keys.check_host_id(p["host"]), p["index"], bytes.fromhex(p["public_key"]),
                        ipaddress.IPv4Address(p["underlay"]).packed, p.get("epoch", 0)))
    for r in spec.get("remotes", []):
        u.set_remote(r["vpc"], r["ip"], r["mac"], r["host"])
    return u
