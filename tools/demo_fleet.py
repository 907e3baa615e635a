"""`make demo-fleet`: one VPC across two nitro hosts, with real guests.

docs/fleet.md "Running a fleet by hand", done by a script: the underlay
(network namespaces <p>-w with a bridge and etcd, <p>-1 and <p>-2 the
hosts, bench/netns.py), one etcd, the VPC `blue` created once with
`nitro vpc create`, and on each host its own `nitro run` (inside the
host's namespace) serving one guest interface in blue. Two TCG guests, one
per host (QEMU in this namespace: a host's vhost-user socket is a path),
each get their fleet address from their own host's DHCP, ping each other,
and vm1 sends vm2 a 4 MiB file over TCP (busybox nc) that starts with a
marker line; both print the file's SHA-256.

Meanwhile dumpcap (Debian's tshark package) captures host 1's underlay
port. Afterwards the capture is checked: every packet between the hosts
is ESP (IP protocol 50), together they carry at least the file's size,
the only other frames are host 1's etcd client, ARP and IPv6 link-local,
and the marker appears nowhere in it. Then tshark, given the SA keys as
docs/fleet.md "Key schedule" derives them, decrypts the same capture
down to the TCP stream, where the marker is: the plain-text check looked
at the right packets.

Prints a summary and exits 0 only if all of that held. Every process it
started (guests, both nitro, dumpcap, etcd) is stopped by its PID and the
namespaces are deleted, also on failure or Ctrl-C. Needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import ARP  # noqa: E402
from scapy.utils import rdpcap  # noqa: E402

from bench.netns import WIRE_ADDRESS, Underlay, exec_prefix  # noqa: E402
from bench.proc import Child, tail  # noqa: E402
from tests.guest import fleet as fl  # noqa: E402
from tests.guest.build import build_initramfs  # noqa: E402
from tests.guest.qemu import GuestResult  # noqa: E402
from tests.unit.test_fleet_tunnel import documented_keymat, documented_spi  # noqa: E402

WORK = Path("/tmp/nitro-demo-fleet")  # short: unix socket paths max out at 107 bytes
BLUE = fl.FleetVpc("blue", "10.1.0.0/24", vni=100, dns="10.1.0.2")
VM1 = fl.FleetNic("vm1", "blue", "52:54:00:00:01:0a", "10.1.0.10")
VM2 = fl.FleetNic("vm2", "blue", "52:54:00:00:02:0b", "10.1.0.11")
PORT = 5001
MIB = 4
MARKER = "NITRO-FLEET-DEMO-MARKER-never-in-clear-on-the-underlay"
GUEST_S = 600  # a guest's whole script, TCG on a loaded 2-core machine

VM1_SCRIPT = ("echo \"vm1: eth0 $(cat /sys/class/net/eth0/address)\"\n" + fl.make_file("/tmp/blob", MIB, MARKER)
              + fl.dhcp() + fl.ping_until(VM2.ip) + f"ip neigh show {VM2.ip}\n"
              + fl.send_file("/tmp/blob", VM2.ip, PORT))
_RECV_START, _RECV_FINISH = fl.receive_file("/tmp/got", PORT)
VM2_SCRIPT = ("echo \"vm2: eth0 $(cat /sys/class/net/eth0/address)\"\n" + _RECV_START + fl.dhcp()
              + fl.ping_until(VM1.ip) + f"ip neigh show {VM1.ip}\n" + _RECV_FINISH
              + f"grep -c '{MARKER}' /tmp/got | sed 's/^/marker lines received: /'\n")


class DemoFailed(Exception):
    pass


def main() -> int:
    if os.geteuid() != 0:
        print("demo-fleet: needs root (network namespaces)", file=sys.stderr)
        return 1
    # SIGTERM (or a closed terminal) unwinds like Ctrl-C: the cleanup runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    print("== building the test guest (Debian kernel + busybox initramfs)")
    image = build_initramfs(Path(os.environ.get("NITRO_GUEST_CACHE", REPO / "build" / "guest")))
    fleet: fl.Fleet | None = None
    capture: Child | None = None
    summary: list[str] = []
    try:
        fleet = fl.Fleet(WORK, f"nfd{os.getpid()}")
        net = fleet.underlay
        print(f"== underlay: namespace {net.wire} (bridge br0 192.0.2.254/24), hosts {net.hosts[0]}"
              f" (192.0.2.1) and {net.hosts[1]} (192.0.2.2)")
        print(f"== etcd (pid {fleet.etcd.pid if fleet.etcd else '?'}) at {fleet.etcd_url}")
        print(f"== nitro vpc create blue --cidr {BLUE.cidr} --vni {BLUE.vni} --mtu {BLUE.mtu}")
        print("   " + fleet.create_vpc(BLUE).strip())
        for i, nic in ((1, VM1), (2, VM2)):
            n = fleet.start_host(i, [nic])
            print(f"== host h{i}: nitro run (pid {n.proc.pid}) in {net.hosts[i - 1]}, underlay"
                  f" {Underlay.address(i)}; serves {nic.id} {nic.mac} -> {nic.ip} at {n.tmp / (nic.id + '.sock')}")
        fleet.wait_mapped({1: 1, 2: 1})
        print("== each host maps the other's interface (from etcd)")
        pcap = WORK / "underlay.pcap"
        capture = Child([*exec_prefix(net.wire), "dumpcap", "-i", "p1", "-P", "-w", str(pcap)],
                        WORK / "dumpcap.log")
        capture.wait_for(pcap, 30)
        print(f"== capturing host 1's underlay port p1: dumpcap (pid {capture.proc.pid}) -> {pcap}")
        print("== booting vm1 on h1 and vm2 on h2 (QEMU TCG, vhost-user virtio-net, vectors=0)")
        g1 = fleet.boot(image, 1, VM1, VM1_SCRIPT)
        g2 = fleet.boot(image, 2, VM2, VM2_SCRIPT)
        results = {"vm1": g1.wait(GUEST_S), "vm2": g2.wait(GUEST_S)}
        for name, r in results.items():
            print(f"== {name}'s console (script part)")
            print("\n".join(f"   {ln}" for ln in r.script_output.strip().splitlines()))
        print("== nitro status, host h1 (fleet part)")
        print(_fleet_part(fleet.nitros[1].status()))
        capture.stop()
        summary += _check_guests(results)
        summary += _check_capture(fleet, pcap, capture)
        summary += _check_counters(fleet)
    except (DemoFailed, TimeoutError, RuntimeError) as e:
        print(f"demo-fleet: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if capture is not None:
            capture.stop()
        if fleet is not None:
            stopped = _stop(fleet)
            print(f"== stopped by PID: {stopped}; namespaces deleted")
    print("== summary")
    print("\n".join(f"   {ln}" for ln in summary))
    print("demo-fleet: OK")
    return 0


def _stop(fleet: fl.Fleet) -> str:
    """fleet.close(), saying what it stopped and how nitro exited."""
    parts = [f"guest pid {g.pid}" for g in fleet.guests]
    nitros = dict(fleet.nitros)
    etcd_pid = fleet.etcd.pid if fleet.etcd is not None and fleet.etcd.child is not None else None
    fleet.close()
    parts += [f"nitro h{i} pid {n.proc.pid} (exit {n.proc.returncode})" for i, n in nitros.items()]
    if etcd_pid is not None:
        parts.append(f"etcd pid {etcd_pid}")
    return ", ".join(parts)


def _fleet_part(status: str) -> str:
    lines = status.splitlines()
    start = next((k for k, ln in enumerate(lines) if ln.startswith("fleet")), 0)
    return "\n".join(f"   {ln}" for ln in lines[start:])


def _check_guests(results: dict[str, GuestResult]) -> list[str]:
    for name, r in results.items():
        if r.returncode != 0:
            raise DemoFailed(f"{name}'s script failed:\n{r.describe()}")
    out = {name: r.script_output for name, r in results.items()}
    lines = []
    for name, nic in (("vm1", VM1), ("vm2", VM2)):
        m = re.search(r"^DHCP event=bound ip=(\S+) subnet=(\S+) router=(\S+) mtu=(\S+)", out[name], re.M)
        if not m or m.group(1) != nic.ip:
            raise DemoFailed(f"{name} did not get {nic.ip} from DHCP:\n{out[name]}")
        lines.append(f"DHCP: {name} got {m.group(1)}/{m.group(2)}, router {m.group(3)}, MTU {m.group(4)}"
                     f" from its own host's nitro")
    for src, dst in (("vm1", VM2), ("vm2", VM1)):
        m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out[src])
        if f"PEER-OK {dst.ip}" not in out[src] or not m or m.group(2) == "0":
            raise DemoFailed(f"{src} could not ping {dst.ip}:\n{out[src]}")
        lines.append(f"ping: {src} -> {dst.id} ({dst.ip}): {m.group(2)}/{m.group(1)} replies;"
                     f" ARP for it answered with {dst.mac}" if dst.mac in out[src] else
                     f"ping: {src} -> {dst.id} ({dst.ip}): {m.group(2)}/{m.group(1)} replies")
    sent, got = fl.transfers(out["vm1"], "SENT"), fl.transfers(out["vm2"], "RECEIVED")
    if len(sent) != 1 or sent != got:
        raise DemoFailed(f"the TCP transfer does not match: sent {sent}, received {got}")
    lines.append(f"TCP: vm1 sent vm2 {sent[0].size} bytes over busybox nc; SHA-256 on both sides"
                 f" {sent[0].sha256[:16]}...: MATCH")
    return lines


@dataclass
class _Capture:
    frames: int
    esp: int  # IPv4 between the hosts, all of which must be ESP
    esp_bytes: int
    etcd: int  # h1's etcd client (TCP with the wire's address): the control plane
    arp: int
    ipv6: int  # the veth's own link-local chatter (neighbour discovery)
    unexpected: list[str]  # anything else: fails the demo


def _read_capture(pcap: Path, etcd_port: int) -> _Capture:
    hosts = {Underlay.address(1), Underlay.address(2)}
    c = _Capture(0, 0, 0, 0, 0, 0, [])
    for e in rdpcap(str(pcap)):
        c.frames += 1
        if IP in e and {e[IP].src, e[IP].dst} == hosts and e[IP].proto == 50:
            c.esp += 1
            c.esp_bytes += len(e[IP].payload)
        elif IP in e and WIRE_ADDRESS in (e[IP].src, e[IP].dst) and TCP in e \
                and etcd_port in (e[TCP].sport, e[TCP].dport):
            c.etcd += 1
        elif ARP in e:
            c.arp += 1
        elif IPv6 in e:
            c.ipv6 += 1
        else:
            c.unexpected.append(e.summary())
    return c


def _check_capture(fleet: fl.Fleet, pcap: Path, capture: Child) -> list[str]:
    assert fleet.etcd is not None
    c = _read_capture(pcap, fleet.etcd.client_port)
    raw = pcap.read_bytes()
    marker_in_clear = raw.count(MARKER.encode())
    print("== the capture, as tshark sees it (protocol hierarchy, no keys)")
    phs = _tshark(["-r", str(pcap), "-q", "-z", "io,phs"]).stdout
    print("\n".join(f"   {ln}" for ln in phs.strip().splitlines()))
    if c.unexpected:
        raise DemoFailed(f"{len(c.unexpected)} frames on p1 are neither ESP between the hosts nor h1's etcd"
                         f" client, ARP or IPv6 link-local: {c.unexpected[:5]}")
    if c.esp_bytes < MIB << 20:
        raise DemoFailed(f"only {c.esp_bytes} bytes of ESP between the hosts: the transfer was not captured")
    if marker_in_clear:
        raise DemoFailed(f"the marker is in the capture {marker_in_clear} times: inner bytes in clear")
    decrypted = _decrypted_marker_count(fleet, pcap)
    if decrypted == 0:
        raise DemoFailed("decrypted with the SA keys, the capture does not hold the marker either")
    dropped = re.findall(r"dropped on interface '\S+': \d+/(\d+)", capture.output())
    return [f"underlay (dumpcap on host 1's bridge port p1, dropped {'/'.join(dropped) or '?'}): {c.frames} frames;"
            f" between the hosts {c.esp} packets, all ESP (IP protocol 50), {c.esp_bytes} bytes;"
            f" the rest: {c.etcd} TCP of h1's etcd client, {c.arp} ARP, {c.ipv6} IPv6 link-local",
            f"marker: {marker_in_clear} times in the capture's bytes; {decrypted} TCP segments hold it once"
            " tshark decrypts h1 -> h2 with the documented SA keys"]


def _tshark(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_CONFIG_HOME=str(WORK), HOME=str(WORK))  # no user's preferences
    r = subprocess.run(["tshark", "-n", *args], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    if r.returncode != 0:
        raise DemoFailed(f"tshark {' '.join(args)}: {tail(r.stderr)}")
    return r


def _decrypted_marker_count(fleet: fl.Fleet, pcap: Path) -> int:
    """TCP segments from vm1 to vm2 that contain the marker, decrypted by
    tshark given only h1 -> h2's SA as docs/fleet.md derives it."""
    f = fleet.status(1)["fleet"]
    key = {i: X25519PrivateKey.from_private_bytes((fleet.host_dir(i) / "fleet.key").read_bytes())
           for i in (1, 2)}
    km = documented_keymat(key[1], key[2].public_key().public_bytes_raw(), "h1", "h2", f["epoch"])
    sa = (f'"IPv4","{Underlay.address(1)}","{Underlay.address(2)}",'
          f'"0x{documented_spi(f["index"], f["epoch"]):08x}","AES-GCM with 16 octet ICV [RFC4106]",'
          f'"0x{km.hex()}","NULL",""')
    r = _tshark(["-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE", "-o", f"uat:esp_sa:{sa}",
                 "-Y", f'geneve.vni == {BLUE.vni} && tcp.dstport == {PORT} && tcp contains "{MARKER}"',
                 "-T", "fields", "-e", "frame.number"])
    return len(r.stdout.split())


def _check_counters(fleet: fl.Fleet) -> list[str]:
    lines = []
    for i, peer in ((1, "h2"), (2, "h1")):
        text = fleet.metrics(i)
        out, into = (fl.metric_value(text, "nitro_fleet_peer_packets_total", host=f"h{i}", peer=peer,
                                     direction=d) for d in ("out", "in"))
        if out == 0 or into == 0:
            raise DemoFailed(f"h{i}'s counters show no traffic with {peer}")
        lines.append(f"h{i} metrics: nitro_fleet_peer_packets_total to {peer} {out:.0f}, from {peer} {into:.0f}")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
