"""Host uplink TAP devices for VPCs.

The TAP is created by opening /dev/net/tun (TUNSETIFF, IFF_TAP|IFF_NO_PI):
it exists as long as nitro holds the fd, so a crashed daemon leaves nothing
behind. pyroute2 then sets its address, MTU and brings it up. Frames carry no
virtio header on the TAP side: the switch completes partial checksums before
writing (nitro_switch.c ``to_uplink``).

The host takes no IPv6 configuration from the VPC: router advertisements,
address autoconfiguration and redirects are off on the TAP (guests may not
send RAs or redirects anyway, the switch drops them), while IPv6 link-local
traffic keeps working.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from nitro.config import UplinkConfig

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IPV6_CONF = Path("/proc/sys/net/ipv6/conf")
# Per-interface sysctls set to 0 before the TAP goes up (ip-sysctl.rst).
IPV6_OFF = ("accept_ra", "autoconf", "accept_redirects")


class UplinkError(Exception):
    """The TAP could not be created or configured (needs CAP_NET_ADMIN)."""


class Tap:
    def __init__(self, cfg: UplinkConfig, mtu: int) -> None:
        self.cfg = cfg
        self.name = cfg.name
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise UplinkError(f"uplink {cfg.name}: cannot open /dev/net/tun: {e.strerror}") from None
        try:
            ifr = struct.pack("16sH22x", cfg.name.encode(), IFF_TAP | IFF_NO_PI)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            self.mac = self._configure(mtu)
        except Exception as e:
            os.close(self.fd)
            raise UplinkError(f"uplink {cfg.name}: {e}") from None

    def _configure(self, mtu: int) -> bytes:
        """MTU, address, up; returns the TAP's MAC (the kernel picked it)."""
        from pyroute2 import IPRoute

        self._ipv6_from_guests_off()
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)[0]
            ipr.link("set", index=index, mtu=mtu)
            ipr.addr("add", index=index, address=str(self.cfg.address.ip),
                     prefixlen=self.cfg.address.network.prefixlen)
            ipr.link("set", index=index, state="up")
            (link,) = ipr.link("get", index=index)
            mac = link.get_attr("IFLA_ADDRESS")
        if not mac:
            raise OSError(f"no IFLA_ADDRESS for {self.name}")
        return bytes.fromhex(mac.replace(":", ""))

    def _ipv6_from_guests_off(self) -> None:
        conf = IPV6_CONF / self.name
        if not conf.is_dir():
            return  # IPv6 is disabled on this host
        for key in IPV6_OFF:
            (conf / key).write_text("0\n")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
