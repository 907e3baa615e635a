"""virtio-net switching: nitro's VPC switch against DPDK's vhost PMD, no guest.

    python -m bench.net --seconds 10 --rounds 2

Both sides are driven by the same two dpdk-testpmd net_virtio_user frontends
(one `txonly` generator, one `rxonly` sink, each busy-polling one lcore):
- nitro: two [[net]] interfaces in one VPC; the switch copies tx -> rx;
- DPDK:  one dpdk-testpmd with two net_vhost ports forwarding in `io` mode.
Per frame size (64, 1518 B) the backends alternate A, B, A, B (--rounds) and
the ratio of the median receive rates is reported (field notes: the machines
have slow periods; compare ratios in one run, not absolutes). For nitro the
switch's own totals are printed too (frames out of src, into dst's ring,
dropped at dst for want of RX buffers), to tell a slow sink from a slow
switch. CPU placement: see _placement() (a 2-CPU machine cannot give the
polling reference a core of its own).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TX_MAC, RX_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
EAL = ["--no-huge", "-m", "1024", "--no-pci"]


def _placement() -> tuple[int, int, int]:
    """CPUs for (sink, generator, backend under test); each testpmd's main
    lcore shares its forwarding lcore's CPU. With 3+ CPUs each gets its own.
    With 2 the backend (all of nitro, or the reference testpmd) shares the
    generator's CPU, the same for both sides, but that is not a fair fight:
    the reference busy-polls and only runs when the scheduler rotates the two
    pollers, while nitro's worker sleeps on the kick eventfd and is woken
    (and preferred) as soon as the generator kicks. See docs/performance.md."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 3:
        return cpus[0], cpus[1], cpus[2]
    if len(cpus) == 2:
        return cpus[0], cpus[1], cpus[1]
    raise SystemExit("bench.net needs at least 2 CPUs")


SINK_CPU, GEN_CPU, BACKEND_CPU = _placement()
_PPS = re.compile(r"Rx-pps:\s+(\d+)")

NITRO_CONFIG = f"""
[metrics]
listen = ""
[[vpc]]
id = "bench"
cidr = "198.18.0.0/24"
gateway = "198.18.0.254"
[[net]]
id = "src"
vpc = "bench"
mac = "{TX_MAC}"
ip = "198.18.0.1"
[[net]]
id = "dst"
vpc = "bench"
mac = "{RX_MAC}"
ip = "198.18.0.2"
"""


def _testpmd(prefix: str, lcores: str, vdevs: list[str], args: list[str], log: Path) -> subprocess.Popen:
    """Start a non-interactive testpmd. ``--stats-period`` matters beyond the
    numbers: without it testpmd waits for "Press enter to exit" on stdin and,
    with stdin at EOF, stops forwarding right after the first burst (which
    is what once looked like a stalled switch). It runs until SIGINT."""
    argv = ["stdbuf", "-oL", "dpdk-testpmd", *EAL, "--lcores", lcores, "--file-prefix", prefix]
    for v in vdevs:
        argv += ["--vdev", v]
    argv += ["--", "--auto-start", "--stats-period", "1", "--total-num-mbufs=16384", *args]
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


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


def _frontends(tmp: Path, tx_sock: Path, rx_sock: Path, size: int, seconds: float) -> float:
    """Run sink and generator; return the sink's median Rx pps over
    `seconds` one-second samples once frames flow."""
    rx_log, tx_log = tmp / "rx.log", tmp / "tx.log"
    rx = _testpmd("bnrx", f"0@{SINK_CPU},1@{SINK_CPU}", [f"net_virtio_user0,path={rx_sock},mac={RX_MAC}"],
                  ["--forward-mode=rxonly"], rx_log)
    tx = None
    try:
        _wait_log(rx_log, lambda t: "Rx-pps" in t, "the sink did not start forwarding")
        # --tx-ip must be the interfaces' addresses: nitro drops spoofed sources.
        tx = _testpmd("bntx", f"0@{GEN_CPU},1@{GEN_CPU}", [f"net_virtio_user0,path={tx_sock},mac={TX_MAC}"],
                      ["--forward-mode=txonly", f"--eth-peer=0,{RX_MAC}", "--tx-ip=198.18.0.1,198.18.0.2",
                       f"--txpkts={size - 4}"], tx_log)
        _wait_log(rx_log, lambda t: any(_rx_rates_text(t)), "no frame reached the sink")
        # Count samples rather than sleep: testpmd's stats loop is late when
        # the CPUs are busy. Each sample is exact (testpmd divides by its
        # own TSC interval); the first, still ramping, is not used.
        first = len(_rx_rates(rx_log))
        want = max(1, math.ceil(seconds))
        _wait_log(rx_log, lambda t: len(_rx_rates_text(t)) >= first + 1 + want,
                  f"the sink printed fewer than {want} samples", timeout=30 + 4 * want)
    finally:
        if tx is not None:
            _stop(tx)
        _stop(rx)
    return statistics.median(_rx_rates(rx_log)[first + 1:first + 1 + want])


def run_dpdk(tmp: Path, size: int, seconds: float) -> float:
    a, b = tmp / "va.sock", tmp / "vb.sock"
    for p in (a, b):
        p.unlink(missing_ok=True)
    ref = _testpmd("bnref", f"0@{BACKEND_CPU},1@{BACKEND_CPU}",
                   [f"net_vhost0,iface={a},queues=1", f"net_vhost1,iface={b},queues=1"],
                   ["--forward-mode=io"], tmp / "ref.log")
    try:
        _wait_path(a)
        _wait_path(b)
        return _frontends(tmp, a, b, size, seconds)
    finally:
        _stop(ref)


def _print_switch_totals(tmp: Path) -> None:
    """Where the frames went: switched out of src, written into dst's ring,
    or dropped at dst because the sink's ring was full (no_rx_buffer)."""
    out = subprocess.run([sys.executable, "-m", "nitro", "status", "--json",
                          "--control", str(tmp / "control.sock")],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        print(f"         (nitro status failed: {out.stderr.strip()})")
        return
    net = {d["id"]: d["net"] for d in json.loads(out.stdout)["devices"]}
    src, dst = net["src"], net["dst"]
    print(f"         nitro: src out {src['packets_out']}, dst in {dst['packets_in']}, "
          f"dst no_rx_buffer {dst['drops']['no_rx_buffer']}", flush=True)


def run_nitro(tmp: Path, size: int, seconds: float) -> float:
    cfg = tmp / "nitro.toml"
    cfg.write_text(NITRO_CONFIG)
    log = open(tmp / "nitro.log", "w")
    proc = subprocess.Popen(["taskset", "-c", str(BACKEND_CPU),
                             sys.executable, "-m", "nitro", "run", "--config", str(cfg),
                             "--runtime-dir", str(tmp), "--state-dir", str(tmp)],
                            cwd=REPO, stderr=log)
    try:
        _wait_path(tmp / "src.sock")
        _wait_path(tmp / "dst.sock")
        pps = _frontends(tmp, tmp / "src.sock", tmp / "dst.sock", size, seconds)
        _print_switch_totals(tmp)
        return pps
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sizes", default="64,1518")
    args = ap.parse_args()
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
