"""virtio-net switching: nitro's VPC switch against DPDK's vhost PMD, no guest.

    python -m bench.net --seconds 10 --rounds 2

Both sides are driven by the same two dpdk-testpmd net_virtio_user frontends
(one `txonly` generator, one `rxonly` sink, each busy-polling one lcore):
- nitro: two [[net]] interfaces in one VPC; the switch copies tx -> rx;
- DPDK:  one dpdk-testpmd with two net_vhost ports forwarding in `io` mode.
Per frame size (64, 1518 B) the backends alternate A, B, A, B (--rounds) and
the ratio of the median receive rates is reported (field notes: the machines
have slow periods; compare ratios in one run, not absolutes).
"""

from __future__ import annotations

import argparse
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
    argv = ["stdbuf", "-oL", "dpdk-testpmd", *EAL, "--lcores", lcores, "--file-prefix", prefix]
    for v in vdevs:
        argv += ["--vdev", v]
    argv += ["--", "--auto-start", "--total-num-mbufs=16384", *args]
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT,
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


def _frontends(tmp: Path, tx_sock: Path, rx_sock: Path, size: int, seconds: float) -> float:
    """Run sink and generator; return the sink's median Rx pps."""
    rx_log, tx_log = tmp / "rx.log", tmp / "tx.log"
    rx = _testpmd("bnrx", "0@1,1@0", [f"net_virtio_user0,path={rx_sock},mac={RX_MAC}"],
                  ["--forward-mode=rxonly", "--stats-period", "1"], rx_log)
    time.sleep(3)
    tx = _testpmd("bntx", "0@0,1@1", [f"net_virtio_user0,path={tx_sock},mac={TX_MAC}"],
                  ["--forward-mode=txonly", f"--eth-peer=0,{RX_MAC}", "--tx-ip=198.18.0.1,198.18.0.2",
                   f"--txpkts={size - 4}"], tx_log)
    time.sleep(3 + seconds)
    _stop(tx)
    _stop(rx)
    rates = [int(x) for x in _PPS.findall(rx_log.read_text(errors="replace"))]
    rates = [r for r in rates if r > 0][1:-1] or [0]
    return statistics.median(rates)


def run_dpdk(tmp: Path, size: int, seconds: float) -> float:
    a, b = tmp / "va.sock", tmp / "vb.sock"
    for p in (a, b):
        p.unlink(missing_ok=True)
    ref = _testpmd("bnref", "0@0,1@1", [f"net_vhost0,iface={a},queues=1", f"net_vhost1,iface={b},queues=1"],
                   ["--forward-mode=io"], tmp / "ref.log")
    try:
        _wait_path(a)
        _wait_path(b)
        return _frontends(tmp, a, b, size, seconds)
    finally:
        _stop(ref)


def run_nitro(tmp: Path, size: int, seconds: float) -> float:
    cfg = tmp / "nitro.toml"
    cfg.write_text(NITRO_CONFIG)
    log = open(tmp / "nitro.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "nitro", "run", "--config", str(cfg),
                             "--runtime-dir", str(tmp), "--state-dir", str(tmp)],
                            cwd=REPO, stderr=log)
    try:
        _wait_path(tmp / "src.sock")
        _wait_path(tmp / "dst.sock")
        return _frontends(tmp, tmp / "src.sock", tmp / "dst.sock", size, seconds)
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
