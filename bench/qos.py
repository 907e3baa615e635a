"""Volume QoS accuracy: a limited volume delivers its limit, and a burst
drains the credit bucket at the rate docs/volumes.md states.

    python -m bench.qos --seconds 30

Two runs against one daemon (vublk, 4 KiB random reads, far more demand
than the limits allow):
- accuracy: a volume with `iops = 2000` for --seconds: delivered IOPS (vublk's
  own count and clock) against 2,000 (target: within 3 %), and the error %
  (target: 0: QoS delays, never fails);
- burst: a volume with `iops = 500, burst_iops = 1500, burst_seconds = B`:
  the credit balance (nitro_blk_qos_burst_credits) sampled over a window
  while it bursts, its drain rate against the documented
  burst_iops - iops = 1,000 credits/s (target: within 3 %), and the IOPS
  delivered meanwhile against burst_iops.

Exit status 0 when every run succeeded (with --check: and met its target).
Results: stdout and build/bench/qos-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.blk import OUT_DIR, VUBLK, build_vublk
from bench.proc import Nitro

IOPS = 2000
BURST = {"iops": 500, "burst_iops": 1500}
TOLERANCE = 0.03


def config(burst_seconds: int) -> str:
    return (f'[[blk]]\nid = "steady"\nsize = "256M"\nqueues = 2\nqos = {{ iops = {IOPS} }}\n\n'
            f'[[blk]]\nid = "burst"\nsize = "256M"\nqueues = 2\n'
            f'qos = {{ iops = {BURST["iops"]}, burst_iops = {BURST["burst_iops"]}, '
            f'burst_seconds = {burst_seconds} }}\n')


def vublk(sock: Path, seconds: float) -> subprocess.Popen:
    """Demand well above any limit here: 2 queues x QD32."""
    return subprocess.Popen([str(VUBLK), "--socket", str(sock), "--rw", "randread", "--bs", "4096",
                             "--iodepth", "32", "--queues", "2", "--size", "128m", "--runtime", f"{seconds:g}",
                             "--timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"vublk exited {proc.returncode}: {err.strip()}")
    return json.loads(out.strip().splitlines()[-1])


def gauge(n: Nitro, name: str, device: str) -> float:
    m = re.search(rf'^{name}\{{device="{device}"\}} (\S+)$', n.metrics(), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no {name} for {device} in nitro's metrics")
    return float(m.group(1))


def accuracy(n: Nitro, tmp: Path, seconds: float) -> dict:
    res = finish(vublk(tmp / "steady.sock", seconds))
    delivered = res["ios"] / res["seconds"]
    return {"limit_iops": IOPS, "seconds": res["seconds"], "ios": res["ios"], "delivered_iops": delivered,
            "ratio": delivered / IOPS, "error_pct": 100 * res["errors"] / max(res["ios"], 1),
            "ok": abs(delivered / IOPS - 1) <= TOLERANCE and res["errors"] == 0}


def burst(n: Nitro, tmp: Path, burst_seconds: int, window: float) -> dict:
    """Sample the balance `window` seconds apart while the volume bursts
    (from when the balance first moved, well before the bucket is empty)."""
    documented = BURST["burst_iops"] - BURST["iops"]
    credits_max = gauge(n, "nitro_blk_qos_burst_credits_max", "burst")
    proc = vublk(tmp / "burst.sock", window + 3.0)
    deadline = time.monotonic() + 3.0
    while gauge(n, "nitro_blk_qos_burst_credits", "burst") > credits_max - 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the burst volume's credits did not move in 3 s")
        time.sleep(0.05)
    t0, c0 = time.monotonic(), gauge(n, "nitro_blk_qos_burst_credits", "burst")
    time.sleep(window)
    t1, c1 = time.monotonic(), gauge(n, "nitro_blk_qos_burst_credits", "burst")
    res = finish(proc)
    drain = (c0 - c1) / (t1 - t0)
    return {"credits_max": credits_max, "documented_drain_per_s": documented, "credits_start": c0,
            "credits_end": c1, "window_seconds": t1 - t0, "drain_per_s": drain, "ratio": drain / documented,
            "delivered_iops": res["ios"] / res["seconds"], "burst_iops": BURST["burst_iops"],
            "full_burst_seconds": credits_max / documented, "errors": res["errors"],
            "ok": abs(drain / documented - 1) <= TOLERANCE and res["errors"] == 0 and c1 > 0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30, help="length of the accuracy run (default 30)")
    ap.add_argument("--burst-window", type=float, default=None,
                    help="seconds the drain is measured over (default: min(10, --seconds))")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)
    window = args.burst_window or min(10.0, args.seconds)
    burst_seconds = int(window) * 2 + 2  # never empty within the window
    build_vublk()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="nitro-qos-"))
    try:
        with Nitro(tmp, config(burst_seconds)) as n:
            acc = accuracy(n, tmp, args.seconds)
            bur = burst(n, tmp, burst_seconds, window)
    finally:
        if args.keep:
            print(f"work directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"accuracy: limit {IOPS} IOPS, delivered {acc['delivered_iops']:.0f} over {acc['seconds']:.1f} s "
          f"({acc['ratio']:.3f}x; target 1 +- {TOLERANCE:.0%}), errors {acc['error_pct']:.2f} %: "
          f"{'PASS' if acc['ok'] else 'FAIL'}")
    print(f"burst: iops {BURST['iops']} burst_iops {BURST['burst_iops']} burst_seconds {burst_seconds}: credits "
          f"{bur['credits_start']:.0f} -> {bur['credits_end']:.0f} in {bur['window_seconds']:.1f} s = "
          f"{bur['drain_per_s']:.0f}/s (documented {bur['documented_drain_per_s']}/s, {bur['ratio']:.3f}x), "
          f"delivered {bur['delivered_iops']:.0f} IOPS: {'PASS' if bur['ok'] else 'FAIL'}")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (OUT_DIR / f"qos-{stamp}.json").write_text(json.dumps({"args": vars(args), "accuracy": acc, "burst": bur},
                                                          indent=2))
    return 1 if args.check and not (acc["ok"] and bur["ok"]) else 0


if __name__ == "__main__":
    sys.exit(main())
