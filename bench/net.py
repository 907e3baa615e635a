"""virtio-net switching: nitro's VPC switch against DPDK's vhost PMD, no guest.

    python -m bench.net --seconds 10 --rounds 2 [--mode loop|split]

Backends under test, each on its own CPU (taskset / testpmd --lcores):
- nitro: two [[net]] interfaces in one VPC; the C switch copies TX -> RX;
- DPDK:  one dpdk-testpmd forwarding between two net_vhost ports (`io`).

Frontends (dpdk-testpmd net_virtio_user, busy-polling), the same for both:
- `loop` (default with fewer than 3 CPUs): ONE testpmd on the other CPU owns
  both virtio-user ports and bounces a burst of frames between them
  (`--port-topology=loop --forward-mode=5tswap --tx-first`: each port sends
  back what it received with MAC, IP and ports swapped, so every frame is
  legal from the port it leaves and passes nitro's anti-spoofing). The rate
  is frames received per second on both ports together = frames switched.
  Two busy pollers on two CPUs: frontend and backend each own one.
- `split` (the issue's layout, needs 3 CPUs): a `txonly` generator and an
  `rxonly` sink, each on its own CPU; the rate is the sink's.
Per frame size (64, 1518 B) the backends alternate A, B, A, B (--rounds) and
the ratio of the median rates is reported (field notes: the machines have
slow periods; compare ratios in one run, not absolutes). For nitro the
switch's own totals are printed too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import testpmd
from bench.proc import ChildError, Nitro

TX_MAC, RX_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


def _placement() -> tuple[int, int, int]:
    """CPUs for (sink, generator, backend under test) in split mode; in loop
    mode the frontend uses the first and the backend the last. Each
    testpmd's main lcore shares its forwarding lcore's CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("bench.net needs at least 2 CPUs")
    return cpus[0], cpus[1 % len(cpus)], cpus[min(2, len(cpus) - 1)]


SINK_CPU, GEN_CPU, BACKEND_CPU = _placement()
SPLIT_POSSIBLE = len(os.sched_getaffinity(0)) >= 3
BURST = 64          # frames the loop frontend puts in flight (--tx-first)
QUEUE_SIZE = 1024   # virtio-user and nitro ring size: room for the burst
MODE = "loop"       # set by --mode
_PPS = re.compile(r"Rx-pps:\s+(\d+)")

NITRO_CONFIG = f"""
[[vpc]]
id = "bench"
cidr = "198.18.0.0/24"
gateway = "198.18.0.254"
[[net]]
id = "src"
vpc = "bench"
mac = "{TX_MAC}"
ip = "198.18.0.1"
queue_size = {QUEUE_SIZE}
[[net]]
id = "dst"
vpc = "bench"
mac = "{RX_MAC}"
ip = "198.18.0.2"
queue_size = {QUEUE_SIZE}
"""


def _wait_path(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.1)


def _rx_rates_text(text: str) -> list[int]:
    return [int(x) for x in _PPS.findall(text)]


def _rx_rates(log: Path) -> list[int]:
    return _rx_rates_text(log.read_text(errors="replace"))


def _wait_log(log: Path, ok, what: str, timeout: float = 90) -> None:
    """Wait until ok(text of log) holds. Start-up is slow and uneven on a
    small machine (a --no-huge testpmd builds its mempool, the backend maps
    1 GiB of frontend memory while busy-polling lcores hold the CPUs), so
    wait for the event instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while not ok(log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:.0f} s; see {log}")
        time.sleep(0.25)


def _sample(log: Path, ports: int, seconds: float) -> float:
    """Median over `seconds` stats periods of the Rx pps summed over the
    testpmd's `ports` (it prints one Rx-pps per port per period, port 0
    first). Counts samples rather than sleeping: testpmd's stats loop is
    late when the CPUs are busy, and each sample is exact (testpmd divides
    by its own TSC interval). The period in progress is not used."""
    _wait_log(log, lambda t: any(_rx_rates_text(t)), "no frame arrived")
    first = len(_rx_rates(log)) // ports + 1
    want = max(1, math.ceil(seconds))
    _wait_log(log, lambda t: len(_rx_rates_text(t)) >= (first + want) * ports,
              f"testpmd printed fewer than {want} samples", timeout=30 + 4 * want)
    rates = _rx_rates(log)[first * ports:(first + want) * ports]
    return statistics.median(sum(rates[i:i + ports]) for i in range(0, len(rates), ports))


def _vdev(n: int, sock: Path, mac: str) -> str:
    return f"net_virtio_user{n},path={sock},mac={mac},queue_size={QUEUE_SIZE}"


def _frontends(tmp: Path, a: Path, b: Path, size: int, seconds: float) -> float:
    return (_split_frontends if MODE == "split" else _loop_frontend)(tmp, a, b, size, seconds)


def _loop_frontend(tmp: Path, a: Path, b: Path, size: int, seconds: float) -> float:
    """One testpmd, both ports, frames bounced between them; frames/s
    switched. --tx-ip is port a's (its first burst is legal; b's first
    burst carries a's source and nitro drops it as spoofed, once)."""
    log = tmp / "loop.log"
    fe = testpmd.start("bnloop", f"0@{SINK_CPU},1@{SINK_CPU}", [_vdev(0, a, TX_MAC), _vdev(1, b, RX_MAC)],
                  ["--port-topology=loop", "--forward-mode=5tswap", "--tx-first", f"--burst={BURST}",
                   f"--eth-peer=0,{RX_MAC}", f"--eth-peer=1,{TX_MAC}", "--tx-ip=198.18.0.1,198.18.0.2",
                   f"--txpkts={size - 4}"], log)
    try:
        return _sample(log, 2, seconds)
    finally:
        testpmd.interrupt(fe)


def _split_frontends(tmp: Path, tx_sock: Path, rx_sock: Path, size: int, seconds: float) -> float:
    """Sink and generator, one CPU each; the sink's Rx pps."""
    rx_log, tx_log = tmp / "rx.log", tmp / "tx.log"
    rx = testpmd.start("bnrx", f"0@{SINK_CPU},1@{SINK_CPU}", [_vdev(0, rx_sock, RX_MAC)],
                  ["--forward-mode=rxonly"], rx_log)
    tx = None
    try:
        _wait_log(rx_log, lambda t: "Rx-pps" in t, "the sink did not start forwarding")
        # --tx-ip must be the interfaces' addresses: nitro drops spoofed sources.
        tx = testpmd.start("bntx", f"0@{GEN_CPU},1@{GEN_CPU}", [_vdev(0, tx_sock, TX_MAC)],
                      ["--forward-mode=txonly", f"--eth-peer=0,{RX_MAC}", "--tx-ip=198.18.0.1,198.18.0.2",
                       f"--txpkts={size - 4}"], tx_log)
        return _sample(rx_log, 1, seconds)
    finally:
        if tx is not None:
            testpmd.interrupt(tx)
        testpmd.interrupt(rx)


def run_dpdk(tmp: Path, size: int, seconds: float) -> float:
    a, b = tmp / "va.sock", tmp / "vb.sock"
    for p in (a, b):
        p.unlink(missing_ok=True)
    ref = testpmd.start("bnref", f"0@{BACKEND_CPU},1@{BACKEND_CPU}",
                   [f"net_vhost0,iface={a},queues=1", f"net_vhost1,iface={b},queues=1"],
                   ["--forward-mode=io"], tmp / "ref.log")
    try:
        _wait_path(a)
        _wait_path(b)
        return _frontends(tmp, a, b, size, seconds)
    finally:
        testpmd.interrupt(ref)


def _print_switch_totals(n: Nitro) -> None:
    """Where the frames went: switched out of src, written into dst's ring,
    or dropped at dst because the sink's ring was full (no_rx_buffer)."""
    try:
        status = json.loads(n.status_json())
    except ChildError as e:
        print(f"         ({e})")
        return
    net = {d["id"]: d["net"] for d in status["devices"]}
    src, dst = net["src"], net["dst"]
    print(f"         nitro: src out {src['packets_out']}, dst in {dst['packets_in']}, "
          f"dst no_rx_buffer {dst['drops']['no_rx_buffer']}", flush=True)


def run_nitro(tmp: Path, size: int, seconds: float) -> float:
    # Nitro returns once the control socket exists: both vhost sockets
    # listen by then.
    with Nitro(tmp, NITRO_CONFIG, prefix=["taskset", "-c", str(BACKEND_CPU)], metrics=False) as n:
        pps = _frontends(tmp, tmp / "src.sock", tmp / "dst.sock", size, seconds)
        _print_switch_totals(n)
        n.stop()
        return pps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sizes", default="64,1518")
    ap.add_argument("--mode", choices=("loop", "split"), default="split" if SPLIT_POSSIBLE else "loop")
    args = ap.parse_args()
    global MODE
    MODE = args.mode
    print(f"mode {MODE}: frontend CPU {SINK_CPU}" + (f", generator CPU {GEN_CPU}" if MODE == "split" else "")
          + f", backend CPU {BACKEND_CPU}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnet-", dir="/tmp") as d:
        tmp = Path(d)
        for size in (int(s) for s in args.sizes.split(",")):
            res: dict[str, list[float]] = {"dpdk": [], "nitro": []}
            for _ in range(max(2, args.rounds)):
                for name, fn in (("dpdk", run_dpdk), ("nitro", run_nitro)):
                    pps = fn(tmp, size, args.seconds)
                    res[name].append(pps)
                    print(f"  {size:5d} B  {name:5s}  {pps / 1e6:7.3f} Mpps", flush=True)
            d_m, n_m = statistics.median(res["dpdk"]), statistics.median(res["nitro"])
            rows.append((size, d_m, n_m))
    print(f"\n{'size':>6} {'DPDK Mpps':>10} {'nitro Mpps':>11} {'ratio':>7} {'DPDK Gb/s':>10} {'nitro Gb/s':>11}")
    for size, d_m, n_m in rows:
        ratio = n_m / d_m if d_m else float("nan")
        print(f"{size:6d} {d_m / 1e6:10.3f} {n_m / 1e6:11.3f} {ratio:7.2f} "
              f"{d_m * size * 8 / 1e9:10.2f} {n_m * size * 8 / 1e9:11.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
