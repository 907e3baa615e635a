"""Open vSwitch with DPDK as a child process: the second reference of
bench/net.py and tests/integration/test_net_ovs.py (as bench/testpmd.py is
the first).

``Switch`` starts a private OVS in one directory: its own ovsdb-server and
ovs-vswitchd-dpdk (Debian's openvswitch-switch-dpdk), every run-time file
there (``OVS_RUNDIR``), one userspace bridge (``datapath_type=netdev``) with
one ``dpdkvhostuser`` port per name. OVS is the vhost-user socket server
(``<dir>/<port>``); the frontends connect to it as clients, as they do to
nitro and to testpmd's net_vhost. ``stop`` deletes the bridge (its PMD
thread busy-polls while the bridge exists) and ends both processes by PID.

DPDK without hugepages (field notes): ``--no-huge`` needs ``--legacy-mem``
(otherwise OVS adds ``--in-memory``, which DPDK refuses with --no-huge), and
``-m 2048`` (OVS sizes its mbuf pool for 262144 mbufs; with 1024 MB the pool
fails and the ports are never polled).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from bench.proc import Child, ChildError, tail

VSWITCHD = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
BRIDGE = "br0"
PACKAGE = "openvswitch-switch-dpdk"
_FLOW_PACKETS = re.compile(r"n_packets=(\d+).*?priority=(\d+),?(\S*)\s+actions=(\S+)")


class Switch:
    """A private OVS-DPDK in `tmp` (keep the path short: the vhost-user
    sockets live there), every thread of it on CPU `cpu` (taskset, the PMD
    with pmd-cpu-mask, DPDK's main lcore with dpdk-lcore-mask). One vhost
    port per name in `ports`, OpenFlow port numbers 1, 2, ... in that order.
    Forwards with the NORMAL action until ``set_flows``. Ready (sockets
    listening, PMD polling them) when the constructor returns."""

    def __init__(self, tmp: Path, cpu: int, ports: Sequence[str], *, file_prefix: str,
                 timeout: float = 90) -> None:
        if not Path(VSWITCHD).exists() or shutil.which("ovsdb-server") is None:
            raise ChildError(f"{VSWITCHD} not found: install the Debian package {PACKAGE} "
                             "(tools/install-deps.sh)")
        tmp.mkdir(exist_ok=True)
        self.tmp, self.ports = tmp, list(ports)
        self.env = {"OVS_RUNDIR": str(tmp), "OVS_LOGDIR": str(tmp), "OVS_DBDIR": str(tmp)}
        self.db = f"unix:{tmp / 'db.sock'}"
        self._children: list[Child] = []
        try:
            self._start(cpu, file_prefix, timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, cpu: int, file_prefix: str, timeout: float) -> None:
        conf = self.tmp / "conf.db"
        conf.unlink(missing_ok=True)
        subprocess.run(["ovsdb-tool", "create", str(conf), str(SCHEMA)], check=True, capture_output=True)
        taskset = ["taskset", "-c", str(cpu)]
        self.ovsdb = self._spawn([*taskset, "ovsdb-server", str(conf), f"--remote=p{self.db}",
                                  f"--pidfile={self.tmp / 'ovsdb-server.pid'}", "--no-chdir"], "ovsdb-server")
        self.ovsdb.wait_for(self.tmp / "db.sock", timeout)
        mask = hex(1 << cpu)
        self.vsctl("--no-wait", "init")
        self.vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:dpdk-init=true",
                   f"other_config:dpdk-lcore-mask={mask}", f"other_config:pmd-cpu-mask={mask}",
                   "other_config:dpdk-extra=--no-huge -m 2048 --legacy-mem --no-pci "
                   f"--file-prefix={file_prefix}")
        self.vswitchd = self._spawn([*taskset, VSWITCHD, self.db, "--no-chdir",
                                     f"--pidfile={self.tmp / 'ovs-vswitchd.pid'}",
                                     f"--unixctl={self.tmp / 'ovs-vswitchd.ctl'}"], "ovs-vswitchd")
        self._wait_vsctl(timeout, "wait-until", "Open_vSwitch", ".", "dpdk_initialized=true")
        add = ["add-br", BRIDGE, "--", "set", "Bridge", BRIDGE, "datapath_type=netdev"]
        for n, name in enumerate(self.ports, 1):
            add += ["--", "add-port", BRIDGE, name, "--", "set", "Interface", name,
                    "type=dpdkvhostuser", f"ofport_request={n}"]
        self._wait_vsctl(timeout, *add)  # returns once ovs-vswitchd applied it
        for name in self.ports:
            self.vswitchd.wait_for(self.socket(name), timeout)
            error = self.vsctl("get", "Interface", name, "error").strip()
            if error not in ("[]", '""'):
                raise ChildError(f"OVS port {name}: {error}\n{tail(self.vswitchd.output())}")
        self._check_polled()

    def _spawn(self, argv: list[str], name: str) -> Child:
        child = Child(argv, self.tmp / f"{name}.log", env=self.env)
        self._children.append(child)
        return child

    def _wait_vsctl(self, timeout: float, *args: str) -> str:
        """ovs-vsctl that waits for ovs-vswitchd; a ChildError with its log
        if it does not answer in time or died."""
        try:
            return self.vsctl(f"--timeout={timeout:.0f}", *args, timeout=timeout + 10)
        except ChildError as e:
            state = "running" if self.vswitchd.running() else f"exited {self.vswitchd.proc.returncode}"
            raise ChildError(f"ovs-vsctl {' '.join(args[:3])}: {e} (ovs-vswitchd {state}):\n"
                             f"{tail(self.vswitchd.output())}") from e

    def _check_polled(self) -> None:
        """Every port's receive queue is assigned to the PMD: a port whose
        mempool failed exists but is never polled."""
        shown = self.appctl("dpif-netdev/pmd-rxq-show")
        missing = [p for p in self.ports if f"port: {p} " not in shown]
        if missing:
            raise ChildError(f"OVS PMD does not poll {missing}:\n{shown}\n{tail(self.vswitchd.output())}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, argv: list[str], timeout: float) -> str:
        """`argv` (an OVS CLI) against this switch; ChildError if it fails."""
        try:
            return subprocess.run(argv, env={**os.environ, **self.env}, capture_output=True, text=True,
                                  check=True, timeout=timeout).stdout
        except subprocess.CalledProcessError as e:
            raise ChildError(f"{' '.join(argv[:4])} exited {e.returncode}: {e.stderr.strip()}") from e
        except subprocess.TimeoutExpired as e:
            raise ChildError(f"{' '.join(argv[:4])} did not answer in {timeout:.0f} s") from e

    def vsctl(self, *args: str, timeout: float = 30) -> str:
        return self._run(["ovs-vsctl", f"--db={self.db}", *args], timeout)

    def appctl(self, *args: str, timeout: float = 30) -> str:
        return self._run(["ovs-appctl", "-t", str(self.tmp / "ovs-vswitchd.ctl"), *args], timeout)

    def ofctl(self, *args: str, timeout: float = 30) -> str:
        return self._run(["ovs-ofctl", *args], timeout)

    def socket(self, port: str) -> Path:
        """The vhost-user socket of `port` (OVS listens, the frontend connects)."""
        return self.tmp / port

    def set_flows(self, flows: Sequence[str]) -> None:
        """Replace the bridge's OpenFlow table (NORMAL) with `flows`."""
        self.ofctl("del-flows", BRIDGE)
        path = self.tmp / "flows.txt"
        path.write_text("\n".join(flows) + "\n")
        self.ofctl("add-flows", BRIDGE, str(path))

    def flow_packets(self) -> dict[str, int]:
        """n_packets of every OpenFlow rule, keyed "priority=P,MATCH actions=A"."""
        out = self.ofctl("--no-names", "dump-flows", BRIDGE)
        return {f"priority={p}{',' + m if m else ''} actions={a}": int(n)
                for n, p, m, a in _FLOW_PACKETS.findall(out)}

    def stop(self) -> None:
        """Delete the bridge (its PMD spins while it exists), then end
        ovs-vswitchd and ovsdb-server by PID (SIGTERM, SIGKILL after 30 s)."""
        vswitchd = getattr(self, "vswitchd", None)
        if vswitchd is not None and vswitchd.running():
            try:
                self.vsctl("--timeout=20", "--if-exists", "del-br", BRIDGE, timeout=30)
            except ChildError:
                pass  # stopping it ends the PMD as well
        for child in reversed(self._children):
            child.stop()
        self._children.clear()


def anti_spoof_flows(ports: Sequence[tuple[int, str, str]]) -> list[str]:
    """OpenFlow rules doing what nitro's anti-spoofing does between two
    ports given as (ofport, MAC, IPv4): a frame entering port p goes to the
    other port only if its source MAC and source IP (ARP: sender MAC and
    IP) are p's own; anything else is dropped."""
    assert len(ports) == 2, "two ports: each forwards to the other"
    flows = []
    for (port, mac, ip), (peer, _, _) in zip(ports, reversed(ports), strict=True):
        flows.append(f"priority=100,in_port={port},dl_src={mac},ip,nw_src={ip},actions=output:{peer}")
        flows.append(f"priority=100,in_port={port},dl_src={mac},arp,arp_sha={mac},arp_spa={ip},"
                     f"actions=output:{peer}")
    flows.append("priority=0,actions=drop")
    return flows
