"""Simulated hosts on one machine: network namespaces joined by an underlay
bridge (docs/fleet.md "Running a fleet by hand"; the fleet's tests and
demo). Needs root.

``Underlay(prefix, hosts=2)`` creates ``<prefix>-w`` (the wire: a bridge
``br0`` with 192.0.2.254/24, where etcd listens) and ``<prefix>-1`` ..
``<prefix>-n`` (the hosts: a veth ``u0`` on the bridge with 192.0.2.<i>/24,
and ``lo`` up for each host's metrics endpoint). Nothing is created in the
caller's namespace: each veth pair is made inside the wire namespace and
one end moved into its host's. ``mtu`` (default: the kernel's 1500) is set
on the bridge and every veth: bench/fleet.py carries 1518-byte guest
frames, whose outer packets need more. ``delete()`` removes every
namespace it created (their interfaces go with them), also after a failed
setup.

:func:`in_netns` runs a Python callable in a thread that entered a
namespace (setns(2)): sockets it opens live there. This is how a test
scrapes a host's metrics on its loopback or captures on the bridge.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
WIRE_ADDRESS = "192.0.2.254"
T = TypeVar("T")


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def in_netns(name: str, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread that entered network namespace `name`; its
    result, or its exception raised here."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {name}")
            finally:
                os.close(fd)
            out["result"] = fn(*args)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=run, name=f"netns-{name}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def exec_prefix(name: str) -> list[str]:
    """argv prefix that runs a command in namespace `name` (same PID: ip
    netns exec execs it)."""
    return ["ip", "netns", "exec", name]


class Underlay:
    def __init__(self, prefix: str, hosts: int = 2, *, mtu: int | None = None) -> None:
        self.wire = f"{prefix}-w"
        self.hosts = [f"{prefix}-{i}" for i in range(1, hosts + 1)]
        self.mtu = mtu
        self.created: list[str] = []
        try:
            self._create()
        except BaseException:
            self.delete()
            raise

    @staticmethod
    def address(i: int) -> str:
        """Host i's (1-based) underlay address."""
        return f"192.0.2.{i}"

    def _create(self) -> None:
        for ns in (self.wire, *self.hosts):
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.wire, "link", "add", "br0", "type", "bridge")
        mtu = ["mtu", str(self.mtu)] if self.mtu else []
        if mtu:
            ip("-n", self.wire, "link", "set", "br0", *mtu)
        ip("-n", self.wire, "addr", "add", f"{WIRE_ADDRESS}/24", "dev", "br0")
        ip("-n", self.wire, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts, 1):
            ip("-n", self.wire, "link", "add", f"p{i}", "type", "veth", "peer", "name", "u0", "netns", ns)
            ip("-n", self.wire, "link", "set", f"p{i}", "master", "br0", *mtu, "up")
            ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "u0")
            ip("-n", ns, "link", "set", "u0", *mtu, "up")

    def delete(self) -> None:
        """Delete every namespace created (processes still in one keep it
        alive until they exit: stop them first)."""
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30, check=False)
        self.created = []
