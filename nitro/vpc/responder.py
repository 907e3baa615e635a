"""VpcResponder: nitro's answers for one VPC (sans-IO).

What the switch punts here (cffi_build/nitro_switch.c ``classify``):
- ARP requests from a guest: answered for the gateway address, for every
  other interface of the VPC (nitro knows them all, so guests never see each
  other's ARP broadcasts), for the VPC's interfaces on other hosts (the
  fleet's mapping, :meth:`set_remote`: no broadcast crosses hosts) and for
  the uplink's host address; requests for
  the sender's own address (duplicate address detection) or unknown ones get
  no answer;
- DHCP (UDP to port 67): DISCOVER -> OFFER, REQUEST -> ACK or NAK, RELEASE,
  INFORM -> ACK, DECLINE ignored. Every interface has exactly one address,
  fixed in the config, so the "lease" only records state for ``nitro
  status``; renewals (unicast REQUEST with ciaddr) are ACKed the same way.
  ``ciaddr`` is the guest's word: a message whose ciaddr is neither 0.0.0.0
  nor the interface's own address is NAKed (REQUEST) or ignored, so a reply
  is only ever unicast to the interface's own address;
- IPv4 to the gateway address: ICMP echo requests are answered, the rest is
  dropped and counted.

The anti-spoofing check already happened in C: a punted frame's source MAC
and IPv4 source (or 0.0.0.0 for DHCP) are the interface's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import struct
import time
from collections.abc import Callable

from nitro.vpc import packets as pk

_NO_ADDRESS = b"\0" * 4


def gateway_mac(vpc_id: str) -> bytes:
    """A stable, locally administered unicast MAC for a VPC's gateway."""
    return b"\x02" + hashlib.sha256(b"nitro-gw:" + vpc_id.encode()).digest()[:5]


@dataclasses.dataclass(frozen=True)
class Interface:
    port: int
    mac: bytes
    ip: ipaddress.IPv4Address


@dataclasses.dataclass
class Lease:
    state: str  # "offered", "bound", "released"
    expires: float


class VpcResponder:
    def __init__(self, vpc_id: str, cidr: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address, *,
                 mtu: int = 1500, dns: tuple[ipaddress.IPv4Address, ...] = (), lease_seconds: int = 3600,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.vpc_id = vpc_id
        self.cidr = cidr
        self.gateway = gateway
        self.gateway_mac = gateway_mac(vpc_id)
        self.mtu = mtu
        self.dns = dns
        self.lease_seconds = lease_seconds
        self.uplink: tuple[bytes, bytes] | None = None  # (IPv4 packed, MAC) of the host TAP
        self.clock = clock
        # Filled before traffic flows, never changed after: other threads
        # (metrics scrapes) may iterate them.
        self.interfaces: dict[int, Interface] = {}
        self._by_ip: dict[bytes, Interface] = {}
        # Interfaces on other hosts: IPv4 packed -> MAC. Changed live by the
        # fleet's control plane, on the trio thread like every lookup here.
        self._remote: dict[bytes, bytes] = {}
        # Written on the trio thread only; read elsewhere by single lookups.
        self.leases: dict[int, Lease] = {}
        self.counters = dict.fromkeys(
            ("arp_replies", "arp_ignored", "dhcp_offers", "dhcp_acks", "dhcp_naks", "dhcp_releases",
             "dhcp_ignored", "icmp_echo_replies", "gateway_ignored", "unknown"), 0)

    def add_interface(self, port: int, mac: bytes, ip: ipaddress.IPv4Address) -> None:
        iface = Interface(port, mac, ip)
        self.interfaces[port] = iface
        self._by_ip[ip.packed] = iface

    def set_uplink(self, ip: ipaddress.IPv4Address, mac: bytes) -> None:
        self.uplink = (ip.packed, mac)

    def set_remote(self, ip: ipaddress.IPv4Address, mac: bytes) -> None:
        """An interface of this VPC on another host: ARP for ip answers mac."""
        self._remote[ip.packed] = mac

    def remove_remote(self, ip: ipaddress.IPv4Address) -> None:
        self._remote.pop(ip.packed, None)

    # -- entry point ----------------------------------------------------------
    def handle(self, port: int, frame: bytes) -> list[bytes]:
        """One punted frame from ``port`` -> frames to deliver to ``port``."""
        iface = self.interfaces.get(port)
        if iface is None:
            self.counters["unknown"] += 1
            return []
        if (arp := pk.Arp.parse(frame)) is not None:
            return self._arp(iface, arp)
        if (ip := pk.Ipv4.parse(frame)) is not None:
            u = pk.parse_udp(ip)
            if u is not None and u[1] == pk.DHCP_SERVER_PORT:
                return self._dhcp(iface, u[2])
            if ip.dst == self.gateway.packed:
                return self._to_gateway(iface, ip)
        self.counters["unknown"] += 1
        return []

    # -- ARP --------------------------------------------------------------------
    def _who_has(self, target: bytes, asker: Interface) -> bytes | None:
        if target == self.gateway.packed:
            return self.gateway_mac
        if self.uplink is not None and target == self.uplink[0]:
            return self.uplink[1]
        other = self._by_ip.get(target)
        if other is not None and other.port != asker.port:
            return other.mac
        return self._remote.get(target)

    def _arp(self, iface: Interface, arp: pk.Arp) -> list[bytes]:
        if arp.op != 1:
            self.counters["arp_ignored"] += 1
            return []
        mac = self._who_has(arp.tpa, iface)
        if mac is None:
            self.counters["arp_ignored"] += 1
            return []
        self.counters["arp_replies"] += 1
        reply = pk.Arp(2, mac, arp.tpa, arp.sha, arp.spa)
        return [reply.build(arp.sha)]

    # -- ICMP to the gateway -------------------------------------------------------
    def _to_gateway(self, iface: Interface, ip: pk.Ipv4) -> list[bytes]:
        p = ip.payload
        if ip.proto != pk.IPPROTO_ICMP or len(p) < 8 or p[0] != 8 or pk.checksum(p) != 0:
            self.counters["gateway_ignored"] += 1
            return []
        body = b"\0\0\0\0" + p[4:]
        body = body[:2] + struct.pack("!H", pk.checksum(body)) + body[4:]
        reply = pk.Ipv4(self.gateway.packed, ip.src, pk.IPPROTO_ICMP, 64, body)
        self.counters["icmp_echo_replies"] += 1
        return [pk.ethernet(iface.mac, self.gateway_mac, pk.ETH_P_IP, reply.build())]

    # -- DHCP ------------------------------------------------------------------------
    def _dhcp(self, iface: Interface, data: bytes) -> list[bytes]:
        msg = pk.Dhcp.parse(data)
        if msg is None or msg.op != 1 or msg.chaddr != iface.mac:
            self.counters["dhcp_ignored"] += 1
            return []
        kind = msg.msg_type
        server_id = msg.options.get(pk.OPT_SERVER_ID)
        if server_id is not None and server_id != self.gateway.packed:
            self.counters["dhcp_ignored"] += 1  # the client chose another server
            return []
        if msg.ciaddr not in (_NO_ADDRESS, iface.ip.packed):
            # The guest claims an address that is not its own: tell a
            # renewing client to start over (NAKs are broadcast), drop the rest.
            if kind == pk.REQUEST:
                self.counters["dhcp_naks"] += 1
                return [self._reply(iface, msg, pk.NAK)]
            self.counters["dhcp_ignored"] += 1
            return []
        now = self.clock()
        if kind == pk.DISCOVER:
            self.leases[iface.port] = Lease("offered", now + 60)
            self.counters["dhcp_offers"] += 1
            return [self._reply(iface, msg, pk.OFFER)]
        if kind == pk.REQUEST:
            wanted = msg.options.get(pk.OPT_REQUESTED_IP) or msg.ciaddr
            if wanted != iface.ip.packed:
                self.counters["dhcp_naks"] += 1
                return [self._reply(iface, msg, pk.NAK)]
            self.leases[iface.port] = Lease("bound", now + self.lease_seconds)
            self.counters["dhcp_acks"] += 1
            return [self._reply(iface, msg, pk.ACK)]
        if kind == pk.INFORM:
            self.counters["dhcp_acks"] += 1
            return [self._reply(iface, msg, pk.ACK, inform=True)]
        if kind == pk.RELEASE:
            if iface.port in self.leases:
                self.leases[iface.port] = Lease("released", now)
            self.counters["dhcp_releases"] += 1
            return []
        self.counters["dhcp_ignored"] += 1
        return []

    def _options(self, kind: int, inform: bool) -> dict[int, bytes]:
        opts = {pk.OPT_MSG_TYPE: bytes([kind]), pk.OPT_SERVER_ID: self.gateway.packed}
        if kind == pk.NAK:
            return opts
        if not inform:
            lease = self.lease_seconds
            opts[pk.OPT_LEASE_TIME] = struct.pack("!I", lease)
            opts[pk.OPT_RENEWAL] = struct.pack("!I", lease // 2)
            opts[pk.OPT_REBINDING] = struct.pack("!I", lease * 7 // 8)
        opts[pk.OPT_SUBNET_MASK] = self.cidr.netmask.packed
        opts[pk.OPT_ROUTER] = self.gateway.packed
        opts[pk.OPT_MTU] = struct.pack("!H", self.mtu)
        if self.dns:
            opts[pk.OPT_DNS] = b"".join(d.packed for d in self.dns)
        return opts

    def _reply(self, iface: Interface, req: pk.Dhcp, kind: int, inform: bool = False) -> bytes:
        yiaddr = _NO_ADDRESS if kind == pk.NAK or inform else iface.ip.packed
        reply = pk.Dhcp(2, req.xid, req.flags, req.ciaddr if inform else _NO_ADDRESS, yiaddr,
                        req.chaddr, self._options(kind, inform))
        # RFC 2131 4.1: unicast to ciaddr when the client has one (renewal),
        # else broadcast (we do not know if it can take unicast yet).
        # NAKs are always broadcast. Only the interface's own address is
        # ever a unicast destination, whatever ciaddr says.
        if req.ciaddr == iface.ip.packed and kind != pk.NAK:
            dst = iface.ip.packed
        else:
            dst = b"\xff" * 4
        payload = pk.udp(self.gateway.packed, dst, pk.DHCP_SERVER_PORT, pk.DHCP_CLIENT_PORT,
                         reply.build(siaddr=self.gateway.packed))
        ip = pk.Ipv4(self.gateway.packed, dst, pk.IPPROTO_UDP, 64, payload)
        # Layer 2 always to the client's MAC: it is the only one on this port.
        return pk.ethernet(iface.mac, self.gateway_mac, pk.ETH_P_IP, ip.build())

    def lease(self, port: int) -> dict | None:
        """The DHCP state of one interface, or None before its first DISCOVER
        or REQUEST. Safe from any thread: one dict lookup, nothing iterated
        that the trio thread may be resizing."""
        lease = self.leases.get(port)
        if lease is None:
            return None
        return {"state": lease.state, "expires_in": max(0, int(lease.expires - self.clock()))}

    def statistics(self) -> dict:
        """Counters and leases by port. Safe from any thread (see :meth:`lease`;
        ``interfaces`` is not changed once traffic flows, the counters' keys
        never change)."""
        leases = {port: self.lease(port) for port in list(self.interfaces)}
        return {
            "id": self.vpc_id,
            "counters": dict(self.counters),
            "remote_interfaces": len(self._remote),
            "leases": {port: lease for port, lease in leases.items() if lease is not None},
        }
