"""A VPC across hosts: cross-host switching, encrypted and plain, against
switching on one host (issue 12's benchmark; docs/fleet.md "Benchmarks").

    python -m bench.fleet [--seconds 10] [--rounds 3] [--frontend loop|split] [--burst 512]

One run, three modes alternated in every round (same, plain, enc, same, ...):
- same:  one nitro, both interfaces in one VPC (bench/net.py's nitro):
         frames are switched from one guest's ring into the other's;
- plain: two hosts (network namespaces on an underlay bridge, one etcd, the
         VPC made once with `nitro vpc create`: bench/netns.py), each with its
         own `nitro run` and `[fleet] encrypt = false`: the first interface
         on host 1, the second on host 2; frames cross as Geneve in UDP;
- enc:   the same two hosts with the default, ESP with AES-256-GCM.
Both hosts are started afresh for each cross-host run (encrypt is read at
start-up) and measured once each sees the other's interface.

Frontends (dpdk-testpmd net_virtio_user, busy-polling), the same in every
mode; frames of 1518 bytes (1514 without the CRC: a 1500-byte IP packet,
the VPC's MTU), each legal for the switch (source MAC and IP of the
interface it leaves, destination the other interface's IP and the MAC
ARP gives for it: nitro's responder answers a remote interface's own):
- `loop` (default with fewer than 3 CPUs): ONE testpmd owns both
  interfaces (one socket on each host) and bounces LOOP_BURST frames
  between them (bench/net.py's loop, 5tswap): every frame crosses from
  host 1 to host 2 and back, both directions at once. The rate is frames
  received on both ports together.
- `split` (the issue's layout; needs 3 CPUs): a `txonly` generator on the
  first interface, sending to the second's IP and MAC, and an `rxonly`
  sink counting on the second, each on a CPU of its own. On 2 CPUs the two
  busy-polling testpmds would share one CPU, and a sink descheduled for a
  time slice lets its ring overflow: a smoke run measured the scheduler
  (the sink got 2 % of what nitro switched), not nitro.

CPUs, on a 2-CPU machine: every nitro (both hosts' daemons, each with
`workers = 1`, its control plane too) is pinned to the first CPU, the loop
frontend (main and forwarding lcore) to the second. The cross-host modes
thus run two daemons, and the kernel's veth/bridge/IP work of their
sendmmsg and recvmmsg (done in their context, so counted as their CPU
time), on the one CPU the same-host nitro has to itself; each frame costs
both a sender and a receiver daemon a wake-up. The rates compare what one
CPU does, not two real hosts, which would each have their own cores and a
NIC instead of a veth pair and a bridge.

Printed per round: Mpps and Gbit/s (1518-byte frames, as bench/net.py
counts) and nitro's CPU time per second of the sampling window (all
nitro processes of the mode), with where the frames went (each
interface's frames, each host's frames to and from the other, drops by
reason); then the medians, nitro's CPU nanoseconds per frame, and the
ratios enc/plain (target >= 0.70) and enc/same (target >= 0.50): of the
rates, per round and their median, and of CPU time per frame. Machines
here have slow periods: read ratios within a run, not absolutes
(docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import net, testpmd
from bench.etcd import Etcd
from bench.netns import WIRE_ADDRESS, Underlay, exec_prefix
from bench.proc import ChildError, Nitro, nitro_argv

FRAME = 1518             # bytes on the wire with the CRC; testpmd sends FRAME - 4
VPC, VNI = "bench", 100
VPC_MTU = 1500           # the guests': a 1514-byte frame carries a 1500-byte IP packet
UNDERLAY_MTU = 9000      # the veths' and [fleet] underlay_mtu: 1514 + 73 bytes of ESP needs > 1500
QUEUE_SIZE = net.QUEUE_SIZE
SRC, DST = ("src", net.TX_MAC, net.TX_IP), ("dst", net.RX_MAC, net.RX_IP)
VISIBLE_WITHIN = 20.0    # seconds for two fresh hosts to map each other's interface


def _placement() -> tuple[int, int, int]:
    """CPUs for (nitro, the loop frontend or the generator, the sink)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("bench.fleet needs at least 2 CPUs")
    return cpus[0], cpus[1], cpus[min(2, len(cpus) - 1)]


NITRO_CPU, FRONTEND_CPU, SINK_CPU = _placement()
SPLIT_POSSIBLE = len(os.sched_getaffinity(0)) >= 3
FRONTEND = "loop"        # set by --frontend
# Frames in flight in the loop (testpmd's largest burst; the rings hold
# 1024): a loop through two daemons waits for two wake-ups per trip, and
# bench/net.py's 64 left them asleep most of the time.
LOOP_BURST = 512
BURST = LOOP_BURST       # set by --burst
PIN = ["taskset", "-c", str(NITRO_CPU)]
DAEMON = f"[daemon]\nworkers = 1\ncpus = \"{NITRO_CPU}\"\n"


def interface(nic: tuple[str, str, str]) -> str:
    nid, mac, ip = nic
    return f'[[net]]\nid = "{nid}"\nvpc = "{VPC}"\nmac = "{mac}"\nip = "{ip}"\nqueue_size = {QUEUE_SIZE}\n'


SAME_HOST_CONFIG = (DAEMON + f'[[vpc]]\nid = "{VPC}"\ncidr = "198.18.0.0/24"\ngateway = "198.18.0.254"\n'
                    + interface(SRC) + interface(DST))


def host_config(etcd: str, i: int, nic: tuple[str, str, str], encrypt: bool) -> str:
    return (DAEMON + f'[fleet]\netcd = ["{etcd}"]\nhost = "h{i}"\nunderlay = "{Underlay.address(i)}"\n'
            f"encrypt = {'true' if encrypt else 'false'}\nunderlay_mtu = {UNDERLAY_MTU}\n" + interface(nic))


@dataclass
class Run:
    pps: float
    cpu: float  # nitro CPU seconds per second of the sampling window, all its processes


# ---- the frontends ------------------------------------------------------------------------

def frontends(tmp: Path, a: Path, b: Path, seconds: float, nitros: list[Nitro]) -> Run:
    """The frontends on a (SRC's socket) and b (DST's), all on FRONTEND_CPU:
    Rx pps (median over `seconds` stats periods) and the nitros' CPU time
    over the same window."""
    log = tmp / "frontend.log"
    procs, ports = (_loop if FRONTEND == "loop" else _split)(a, b, log)
    try:
        net._wait_log(log, lambda t: any(net._rx_rates_text(t)), "no frame arrived")
        cpu0, t0 = sum(cpu_seconds(n) for n in nitros), time.monotonic()
        pps = net._sample(log, ports, seconds)
        cpu = (sum(cpu_seconds(n) for n in nitros) - cpu0) / (time.monotonic() - t0)
        return Run(pps, cpu)
    finally:
        for p in reversed(procs):
            testpmd.interrupt(p)


def _loop(a: Path, b: Path, log: Path) -> tuple[list[subprocess.Popen], int]:
    """One testpmd owning both ports bounces BURST frames between them
    (bench/net.py's loop): each frame crosses nitro (or both hosts) once
    per trip, both directions at once. b starts last and its first burst
    is the legal one (from DST to SRC: a's carries DST's source and is
    dropped once, as spoofed). Rate: both ports' Rx together."""
    fe = testpmd.start_loop("bfloop", FRONTEND_CPU, (a, SRC[1]), (b, DST[1]), log, tx_ip=(DST[2], SRC[2]),
                            frame=FRAME, burst=BURST, queue_size=QUEUE_SIZE)
    return [fe], 2


def _split(a: Path, b: Path, log: Path) -> tuple[list[subprocess.Popen], int]:
    """An rxonly sink on b (its log is `log`), then a txonly generator on a
    sending to DST's IP and MAC; each on a CPU of its own. Rate: the sink's."""
    rx = testpmd.start("bfrx", f"0@{SINK_CPU},1@{SINK_CPU}", [net._vdev(0, b, DST[1])],
                       ["--forward-mode=rxonly"], log)
    try:
        net._wait_log(log, lambda t: "Rx-pps" in t, "the sink did not start forwarding")
        tx = testpmd.start("bftx", f"0@{FRONTEND_CPU},1@{FRONTEND_CPU}", [net._vdev(0, a, SRC[1])],
                           ["--forward-mode=txonly", f"--eth-peer=0,{DST[1]}", f"--tx-ip={SRC[2]},{DST[2]}",
                            f"--txpkts={FRAME - 4}"], log.with_suffix(".tx.log"))
    except BaseException:
        testpmd.interrupt(rx)
        raise
    return [rx, tx], 1


def cpu_seconds(n: Nitro) -> float:
    s = n.cpu_seconds()
    if s is None:
        raise ChildError(f"nitro exited during the run; see {n.log}")
    return s


# ---- the modes ------------------------------------------------------------------------------

def run_same(tmp: Path, seconds: float, fleet: Fleet) -> Run:
    d = tmp / "same"
    d.mkdir(exist_ok=True)
    with Nitro(d, SAME_HOST_CONFIG, prefix=PIN, metrics=False) as n:
        run = frontends(tmp, d / "src.sock", d / "dst.sock", seconds, [n])
        print_same_totals(n)
        n.stop()
        return run


def print_same_totals(n: Nitro) -> None:
    status = json.loads(n.status_json())
    print("         nitro: " + "; ".join(interface_totals(status, nid) for nid in (SRC[0], DST[0])), flush=True)


def interface_totals(status: dict, nid: str) -> str:
    """An interface's frames out (from its guest) and in (into its RX
    ring), and in-frames dropped for want of an RX buffer."""
    d = {d["id"]: d["net"] for d in status["devices"]}[nid]
    return f"{nid} out {d['packets_out']} in {d['packets_in']} no_rx_buffer {d['drops']['no_rx_buffer']}"


class Fleet:
    """The underlay (two host namespaces on a bridge with UNDERLAY_MTU),
    one etcd in the wire namespace, and the VPC, made once for the run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.net = Underlay(f"bf{os.getpid()}", mtu=UNDERLAY_MTU)
        try:
            self.plain_bridge()
            self.etcd = Etcd(tmp, host=WIRE_ADDRESS, netns=self.net.wire).start()
        except BaseException:
            self.net.delete()
            raise

    def plain_bridge(self) -> None:
        """The wire's bridge forwards without calling iptables (br_netfilter,
        when loaded, makes every bridged packet walk the netfilter hooks: a
        tenth of the CPU of a cross-host run, measured): an underlay switch
        does not run the hosts' firewall. The setting is the wire
        namespace's own; nothing outside it changes."""
        knobs = [f"net.bridge.bridge-nf-call-{t}=0" for t in ("iptables", "ip6tables", "arptables")]
        if Path("/proc/sys/net/bridge").exists():
            subprocess.run([*exec_prefix(self.net.wire), "sysctl", "-qw", *knobs], check=True, timeout=30)

    def create_vpc(self) -> None:
        r = subprocess.run([*exec_prefix(self.net.wire), *nitro_argv(
            "vpc", "create", VPC, "--cidr", "198.18.0.0/24", "--gateway", "198.18.0.254", "--vni", str(VNI),
            "--mtu", str(VPC_MTU), "--etcd", self.etcd.url)],
            capture_output=True, text=True, timeout=60, check=False, cwd=Path(__file__).resolve().parent.parent)
        if r.returncode != 0:
            raise ChildError(f"nitro vpc create: {r.stderr.strip()}")

    @contextmanager
    def hosts(self, encrypt: bool) -> Iterator[tuple[Nitro, Nitro]]:
        """Host 1 (the generator's interface) and host 2 (the sink's), each
        its own nitro in its namespace, once each maps the other's
        interface; both stopped by PID afterwards."""
        started: list[Nitro] = []
        try:
            for i, nic in ((1, SRC), (2, DST)):
                d = self.tmp / f"h{i}"
                d.mkdir(exist_ok=True)
                started.append(Nitro(d, host_config(self.etcd.url, i, nic, encrypt),
                                     prefix=[*exec_prefix(self.net.hosts[i - 1]), *PIN], metrics=False))
            wait_for("each host maps the other's interface", lambda: all(map(sees_its_peer, started)))
            yield started[0], started[1]
            for n in reversed(started):
                if n.stop() != 0:
                    raise ChildError(f"nitro exited {n.proc.returncode}; see {n.log}")
        finally:
            for n in started:
                n.kill()

    def close(self) -> None:
        self.etcd.stop()
        self.net.delete()


def sees_its_peer(n: Nitro) -> bool:
    dp = json.loads(n.status_json())["fleet"].get("datapath") or {}
    return dp.get("state") == "up" and dp.get("remote_interfaces") == 1


def wait_for(what: str, ok: Callable[[], bool], timeout: float = VISIBLE_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise ChildError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def run_cross(tmp: Path, seconds: float, fleet: Fleet, encrypt: bool) -> Run:
    with fleet.hosts(encrypt) as (h1, h2):
        run = frontends(tmp, h1.tmp / "src.sock", h2.tmp / "dst.sock", seconds, [h1, h2])
        print_cross_totals(h1, h2)
        return run


def print_cross_totals(h1: Nitro, h2: Nitro) -> None:
    """Per host: its interface's frames, and frames sent to and received
    from the other host with the drops on the way (socket_full: the send
    socket was full; the receiver's reasons: docs/fleet.md)."""
    for n, nic, peer in ((h1, SRC[0], "h2"), (h2, DST[0], "h1")):
        status = json.loads(n.status_json())
        p = status["fleet"]["datapath"]["peers"][peer]
        drops = ", ".join(f"{k} {v}" for k, v in p["drops"].items() if v) or "none"
        print(f"         {status['fleet']['host']}: {interface_totals(status, nic)}; to {peer} {p['packets_out']}, "
              f"from {peer} {p['packets_in']}, drops: {drops}", flush=True)


MODES: dict[str, Callable[[Path, float, Fleet], Run]] = {
    "same": run_same,
    "plain": lambda tmp, s, f: run_cross(tmp, s, f, encrypt=False),
    "enc": lambda tmp, s, f: run_cross(tmp, s, f, encrypt=True),
}
RATIOS = [("enc", "plain", 0.70), ("enc", "same", 0.50), ("plain", "same", None)]


# ---- the report -------------------------------------------------------------------------------

def gbits(pps: float) -> float:
    return pps * FRAME * 8 / 1e9


def ns_per_frame(run: Run) -> float:
    return 1e9 * run.cpu / run.pps if run.pps else math.nan


def report(results: dict[str, list[Run]]) -> None:
    """Medians per mode; per-round rate ratios and their median (the loop
    at 1518 B is bimodal: only rounds where both modes ran in the same
    mode, as bench/net.py compares them); and the same ratios of nitro's
    CPU time per frame (inverted: what the rates would be if each mode
    kept nitro's CPU busy, which a latency-bound run does not)."""
    rounds = len(next(iter(results.values())))
    print(f"\n{FRAME} B, {FRONTEND} frontend" + (f" ({BURST} frames in flight)" if FRONTEND == "loop" else "")
          + f", medians of {rounds} rounds:")
    for name, runs in results.items():
        pps = statistics.median(r.pps for r in runs)
        cpu = statistics.median(r.cpu for r in runs)
        labels = " ".join(net.modes([r.pps for r in runs], FRAME)) if FRONTEND == "loop" else ""
        print(f"  {name:6s} {pps / 1e6:6.3f} Mpps  {gbits(pps):6.2f} Gbit/s  nitro CPU {cpu:4.2f} s/s"
              f"  {statistics.median(map(ns_per_frame, runs)):7,.0f} ns CPU per frame  {labels}")
    for num, den, target in RATIOS:
        if num not in results or den not in results:
            continue
        nums, dens = [r.pps for r in results[num]], [r.pps for r in results[den]]
        if FRONTEND == "loop":
            ratio, same = net.same_mode_ratio(nums, dens, FRAME)
        else:
            ratio, same = statistics.median(n / d for n, d in zip(nums, dens)), rounds
        verdict = ""
        if target is not None:
            met = "n/a" if math.isnan(ratio) else "met" if ratio >= target else "NOT met"
            verdict = f"  target >= {target:.2f}: {met}"
        per_round = " ".join(f"{n / d:.2f}" for n, d in zip(nums, dens))
        cost = statistics.median(ns_per_frame(d) / ns_per_frame(n) for n, d in zip(results[num], results[den]))
        print(f"  {num + '/' + den:12s} {ratio:5.2f}  (rounds: {per_round}; {same} of {rounds} comparable)"
              f"{verdict}\n  {'':12s} {cost:5.2f}  per CPU time (den's CPU ns per frame / num's)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10, help="stats periods sampled per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frontend", choices=("loop", "split"), default="split" if SPLIT_POSSIBLE else "loop")
    ap.add_argument("--burst", type=int, default=LOOP_BURST, help="loop: frames in flight (at most 512)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, run in this order each round")
    args = ap.parse_args()
    names = args.modes.split(",")
    if unknown := set(names) - set(MODES):
        ap.error(f"unknown modes {sorted(unknown)}")
    global FRONTEND, BURST
    FRONTEND, BURST = args.frontend, args.burst
    where = (f"loop frontend on CPU {FRONTEND_CPU}" if FRONTEND == "loop"
             else f"generator on CPU {FRONTEND_CPU}, sink on CPU {SINK_CPU}")
    print(f"nitro (every daemon, workers = 1) on CPU {NITRO_CPU}; {where}; {FRAME} B frames", flush=True)
    if FRONTEND == "split" and not SPLIT_POSSIBLE:
        print("warning: generator and sink share a CPU: the rates are the scheduler's (see --help)", flush=True)
    results: dict[str, list[Run]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bfleet-", dir="/tmp") as d:
        tmp = Path(d)
        fleet = Fleet(tmp)
        try:
            fleet.create_vpc()
            for r in range(max(1, args.rounds)):
                for name in names:
                    run = MODES[name](tmp, args.seconds, fleet)
                    results[name].append(run)
                    print(f"  round {r + 1}  {name:6s} {run.pps / 1e6:7.3f} Mpps  {gbits(run.pps):6.2f} Gbit/s"
                          f"  nitro CPU {run.cpu:4.2f} s/s", flush=True)
        finally:
            fleet.close()
    report(results)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
