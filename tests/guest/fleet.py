"""A fleet of simulated hosts whose guests are real TCG guests (issue 12,
docs/fleet.md "Running a fleet by hand"): `make demo-fleet`
(tools/demo_fleet.py) and tests/system/test_fleet_guests.py.

``Fleet(tmp, prefix, hosts=2)`` builds the underlay (bench/netns.py:
namespaces ``<prefix>-w``, ``<prefix>-1`` .. ``-n`` on a bridge), starts one
etcd in the wire namespace, and then:

- ``create_vpc(FleetVpc)``: ``nitro vpc create`` against that etcd;
- ``start_host(i, [FleetNic, ...])``: ``nitro run`` inside host i's
  namespace, runtime and state in ``<tmp>/h<i>`` (its vhost-user sockets
  are paths there, so QEMU runs in the caller's namespace and reaches them);
- ``restart_host(i)``: SIGKILL host i's nitro (a crash: its guests stay
  up, QEMU reconnects: -chardev reconnect=1) and start it again on the
  same config, runtime and state (its key file and host index);
- ``boot(image, i, nic, script)``: a TCG guest on that interface (its MAC);
  with ``control=True`` also a second serial port the host writes a line
  to (``release``), so a guest script can wait for the host's go
  (``CONTROL_OPEN`` first, then ``wait_for_host``);
- ``close()``: every guest, nitro and etcd it started is stopped by its PID
  (guests SIGKILL, nitro SIGTERM then SIGKILL, etcd SIGTERM), and the
  namespaces are deleted, also after a failed start.

The rest are busybox sh pieces the guest scripts are made of (DHCP, ping a
peer until it answers, send and receive a file over TCP with busybox nc)
and the lines they print, which the host parses.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.etcd import Etcd
from bench.netns import WIRE_ADDRESS, Underlay, exec_prefix, in_netns
from bench.proc import REPO, Nitro, nitro_argv

from .build import GuestImage
from .qemu import GuestProcess

__all__ = [
    "CONTROL_OPEN",
    "Fleet",
    "FleetNic",
    "FleetVpc",
    "Transfer",
    "dhcp",
    "make_file",
    "metric_value",
    "ping_until",
    "receive_file",
    "send_file",
    "transfers",
    "wait_for_host",
    "wait_until",
]

MAPPED_WITHIN = 60.0  # seconds for hosts to map each other's interfaces (a loaded 2-core machine)
NITRO_START_S = 60.0  # `nitro run` until its control socket exists


@dataclass(frozen=True)
class FleetVpc:
    """A VPC of the fleet, as `nitro vpc create` takes it. The default MTU
    is what a 1500-byte underlay carries (docs/fleet.md "Wire format")."""

    name: str
    cidr: str
    vni: int
    mtu: int = 1413
    dns: str = ""


@dataclass(frozen=True)
class FleetNic:
    """One [[net]] entry of a host: a guest interface in a fleet VPC."""

    id: str
    vpc: str
    mac: str
    ip: str


def host_config(etcd_url: str, i: int, nics: Sequence[FleetNic]) -> str:
    """Host i's nitro.toml (without [metrics]: bench.proc.Nitro adds it)."""
    nets = "".join(f'[[net]]\nid = "{n.id}"\nvpc = "{n.vpc}"\nmac = "{n.mac}"\nip = "{n.ip}"\n' for n in nics)
    return (f'[daemon]\nworkers = 1\n[fleet]\netcd = ["{etcd_url}"]\nhost = "h{i}"\n'
            f'underlay = "{Underlay.address(i)}"\n{nets}')


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sample `name{labels}` (labels sorted, as nitro writes them) of a scrape."""
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "} "
    for line in text.splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    raise KeyError(want.strip())


class Fleet:
    def __init__(self, tmp: Path, prefix: str, hosts: int = 2) -> None:
        self.tmp = tmp
        self.nitros: dict[int, Nitro] = {}
        self._nics: dict[int, list[FleetNic]] = {}
        self.guests: list[GuestProcess] = []
        self._control: dict[str, socket.socket] = {}
        self.etcd: Etcd | None = None
        self.underlay = Underlay(prefix, hosts)
        try:
            self.etcd = Etcd(tmp, host=WIRE_ADDRESS, netns=self.underlay.wire).start(timeout=60)
        except BaseException:
            self.close()
            raise

    @property
    def etcd_url(self) -> str:
        assert self.etcd is not None
        return self.etcd.url

    def host_dir(self, i: int) -> Path:
        return self.tmp / f"h{i}"

    def create_vpc(self, vpc: FleetVpc) -> str:
        """`nitro vpc create` (in the wire namespace, where etcd listens);
        returns its output."""
        argv = nitro_argv("vpc", "create", vpc.name, "--cidr", vpc.cidr, "--vni", str(vpc.vni),
                          "--mtu", str(vpc.mtu), "--etcd", self.etcd_url,
                          *(["--dns", vpc.dns] if vpc.dns else []))
        r = subprocess.run([*exec_prefix(self.underlay.wire), *argv], cwd=REPO, capture_output=True,
                           text=True, timeout=120, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"nitro vpc create {vpc.name}: {r.stderr.strip()}")
        return r.stdout

    def start_host(self, i: int, nics: Sequence[FleetNic]) -> Nitro:
        """Host i's nitro, inside its namespace; returns once its control
        socket exists (all its device sockets listen)."""
        d = self.host_dir(i)
        d.mkdir(parents=True, exist_ok=True)
        nitro = Nitro(d, host_config(self.etcd_url, i, nics), prefix=exec_prefix(self.underlay.hosts[i - 1]),
                      timeout=NITRO_START_S)
        self.nitros[i] = nitro
        self._nics[i] = list(nics)
        return nitro

    def restart_host(self, i: int) -> Nitro:
        """SIGKILL host i's nitro, then `start_host` on the same config. The
        killed daemon's log is kept as nitro.before-restart.log."""
        self.nitros[i].kill()
        log = self.host_dir(i) / "nitro.log"
        log.replace(log.with_name("nitro.before-restart.log"))
        return self.start_host(i, self._nics[i])

    def status(self, i: int) -> dict:
        """`nitro status --json` of host i (its control socket is a path)."""
        return json.loads(self.nitros[i].status_json())

    def metrics(self, i: int) -> str:
        """A scrape of host i's metrics (they listen on its own loopback)."""
        return in_netns(self.underlay.hosts[i - 1], self.nitros[i].metrics)

    def wait_mapped(self, remotes: dict[int, int], timeout: float = MAPPED_WITHIN) -> None:
        """Until host i's underlay is up with remotes[i] remote interfaces, for each i."""
        def mapped(i: int) -> bool:
            dp = self.status(i).get("fleet", {}).get("datapath") or {}
            return dp.get("state") == "up" and dp.get("remote_interfaces") == remotes[i]
        wait_until(lambda: all(mapped(i) for i in remotes), timeout, f"hosts mapping remote interfaces {remotes}")

    def wait_etcd(self, state: str, timeout: float = MAPPED_WITHIN) -> None:
        """Until every host's nitro says etcd is `state` ("up", "down")."""
        wait_until(lambda: all(self.status(i)["fleet"]["etcd"] == state for i in self.nitros), timeout,
              f"every host saying etcd {state}")

    def boot(self, image: GuestImage, i: int, nic: FleetNic, script: str, *, control: bool = False) -> GuestProcess:
        """A TCG guest on host i's interface `nic`. ``control``: its ttyS1
        is a unix socket QEMU listens on (``release`` writes to it)."""
        ctl = self.host_dir(i) / f"{nic.id}.ctl"
        extra = ["-chardev", f"socket,id=ctl,path={ctl},server=on,wait=off", "-serial", "chardev:ctl"]
        guest = GuestProcess(image, script, net_sockets=[self.host_dir(i) / f"{nic.id}.sock"],
                             net_macs=[nic.mac], extra_args=extra if control else ())
        self.guests.append(guest)
        guest.start()
        if not control:
            return guest
        wait_until(ctl.exists, 30, f"QEMU listening on {ctl}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(ctl))
        self._control[nic.id] = s  # open until close(): the guest reads at its own pace
        return guest

    def release(self, nic: str) -> None:
        """One line to the guest on `nic`'s ttyS1: its ``wait_for_host`` returns."""
        self._control[nic].sendall(b"go\n")

    def close(self) -> None:
        for guest in self.guests:
            guest.kill()
        for s in self._control.values():
            s.close()
        for nitro in self.nitros.values():
            nitro.stop(timeout=30)
        if self.etcd is not None:
            self.etcd.stop()
        self.underlay.delete()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


# ---- guest script pieces (busybox sh) ---------------------------------------------------------

# The host's go arrives on ttyS1 (Fleet.boot, release). The port is opened
# first thing: the 8250 driver flushes its FIFO when the port is opened,
# so a line sent before would be lost; the tty keeps what arrives after.
CONTROL_OPEN = "exec 3</dev/ttyS1 && stty -echo <&3 && echo CONTROL-OPEN\n"


def wait_for_host(what: str, timeout: int = 600) -> str:
    return (f'echo "WAITING {what}"\n'
            f'read -t {timeout} -r go <&3 || {{ echo "NO-GO {what}"; exit 1; }}\n')


def dhcp(tries: int = 20) -> str:
    """udhcpc on eth0; prints ``DHCP event=bound ip=... mtu=...`` or fails the script."""
    return (
        "ip link set eth0 up\n"
        f"udhcpc -i eth0 -n -q -t {tries} -T 3 -s /usr/share/udhcpc/default.script >/dev/null 2>&1"
        " || { echo DHCP-FAILED; exit 1; }\n"
        'echo "DHCP $(cat /tmp/dhcp-eth0)"\n'
    )


def ping_until(peer: str, tries: int = 90) -> str:
    """Ping `peer` until it answers (it may still be booting), then three
    more, their summary printed; ``PEER-OK``/``PEER-FAIL``."""
    return f"""
ok=0
for i in $(seq 1 {tries}); do
    if ping -c 1 -W 2 {peer} >/dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] || {{ echo "PEER-FAIL {peer}"; exit 1; }}
echo "PEER-OK {peer} (answered at try $i)"
ping -c 3 -W 3 {peer} | tail -n 2
"""


def make_file(path: str, mib: int, marker: str) -> str:
    """`path`: 64 KiB of `marker` lines, then `mib` MiB of random bytes."""
    return (f"yes '{marker}' | head -c 65536 > {path}\n"
            f"dd if=/dev/urandom bs=65536 count={16 * mib} 2>/dev/null >> {path}\n")


def send_file(path: str, peer: str, port: int, tries: int = 30) -> str:
    """busybox nc to `peer` (retried until its listener is up); prints
    ``SENT <bytes> <sha256>``."""
    return f"""
ok=0
for i in $(seq 1 {tries}); do
    if nc -w 10 {peer} {port} < {path}; then ok=1; break; fi
    sleep 2
done
[ $ok = 1 ] || {{ echo "SEND-FAIL {peer}:{port}"; exit 1; }}
echo "SENT $(wc -c < {path}) $(sha256sum {path} | cut -d' ' -f1)"
"""


def receive_file(path: str, port: int, timeout: int = 400) -> tuple[str, str]:
    """(start, finish): start a busybox nc listener in the background that
    writes one connection's bytes to `path`; finish waits for it and prints
    ``RECEIVED <bytes> <sha256>``. nc -e hands the connection to cat, which
    ends at the sender's EOF (plain ``nc -l`` would also shut its own
    sending half at once, on the script's empty stdin)."""
    start = (f"printf '#!/bin/sh\\ncat > {path}\\n' > /tmp/recv.sh && chmod +x /tmp/recv.sh\n"
             f"timeout {timeout} nc -l -p {port} -e /tmp/recv.sh &\nreceiver=$!\n")
    finish = (f'wait $receiver || {{ echo "RECEIVE-FAIL port {port}"; exit 1; }}\n'
              f'echo "RECEIVED $(wc -c < {path}) $(sha256sum {path} | cut -d" " -f1)"\n')
    return start, finish


@dataclass(frozen=True)
class Transfer:
    size: int
    sha256: str


def transfers(output: str, kind: str) -> list[Transfer]:
    """The ``SENT``/``RECEIVED`` lines (kind) a guest printed."""
    return [Transfer(int(m.group(1)), m.group(2))
            for m in re.finditer(rf"^{kind} (\d+) ([0-9a-f]{{64}})\s*$", output, re.M)]
