"""RBD volumes: nitro's librbd ring against qemu-storage-daemon's rbd driver.

    python -m bench.rbd [--runtime 10] [--rounds 2] [--objectstore memstore]

One throwaway single-host cluster (bench/ceph.py), one image, written
through once (`rbd bench --io-type write`) so reads hit real objects. The
same vublk front-end drives each back-end in turn:
- nitro: `source = "rbd:POOL/IMAGE"` (cffi_build/nitro_rbd.c), one queue;
- qemu-storage-daemon: `--blockdev driver=rbd,...,cache.direct=on` exported
  as vhost-user-blk, one queue. cache.direct=on turns librbd's write-back
  cache off, as nitro always does (a write is acknowledged once the OSD
  has it): both acknowledge the same thing.
nitro runs with `poll_us = 0` (--poll-us): here the OSD shares the two
cores, and a worker busy-polling for completions that arrive by eventfd
anyway takes CPU from the storage server (measured before the adaptive
window learnt to shrink when the worker is preempted: randread 4 KiB about
7.5k IOPS adaptive against 12.9k with 0; since then, adaptive is a few
percent under 0 here, docs/volumes.md), which a host whose cluster is
elsewhere does not pay. Workloads: 4 KiB random read and write at QD32, 128 KiB sequential read and
write at QD8. Per workload the back-ends alternate nitro, qsd, nitro, qsd...
(--rounds); the ratio is nitro's median over qsd's (IOPS; MB/s is the same
ratio at one size). Both back-ends are clients of the same OSD on the same
two cores, which does most of the work: the ratio compares client paths
under that load, not nitro's ceiling.

Results: a table on stdout and build/bench/rbd-<timestamp>.json.
Exit status: 0 when every run succeeded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.blk import OUT_DIR, VUBLK, Workload, build_vublk, geomean, pick_workloads
from bench.ceph import CephCluster, ceph_cluster
from bench.proc import Child, ChildError, Nitro, tail

WORKLOADS = [
    Workload("randread-4k", "randread", 4096, 32),
    Workload("randwrite-4k", "randwrite", 4096, 32),
    Workload("read-128k", "read", 128 * 1024, 8),
    Workload("write-128k", "write", 128 * 1024, 8),
]
IMAGE = "bench"
BACKENDS = ("nitro", "qsd")


def qsd_argv(c: CephCluster, sock: Path) -> list[str]:
    return ["qemu-storage-daemon",
            "--blockdev", (f"driver=rbd,node-name=disk0,pool={c.pool},image={IMAGE},conf={c.conf},"
                           f"user={c.user},cache.direct=on"),
            "--export", (f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
                         "writable=on,num-queues=1")]


def vublk(sock: Path, wl: Workload, runtime: float, seed: int) -> dict:
    argv = [str(VUBLK), "--socket", str(sock), "--wait", "10", "--timeout", "30", "--seed", str(seed),
            "--runtime", f"{runtime:g}", *wl.vublk_args()]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120, check=False)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise ChildError(f"vublk exited {r.returncode}: {tail(r.stderr)}")
    return json.loads(lines[-1])


def nitro_daemon(poll_us: str) -> str:
    return "" if poll_us == "adaptive" else f"[daemon]\npoll_us = {int(poll_us)}\n"


def run_one(c: CephCluster, backend: str, wl: Workload, runtime: float, seed: int, work: Path,
            poll_us: str) -> dict:
    """A fresh back-end on the image (the previous one gone: nitro holds
    the image's exclusive lock), one vublk run, the back-end stopped."""
    d = work / f"{backend}-{wl.name}-{seed}"
    d.mkdir()
    sock = d / "vol0.sock"
    # Stopped, not killed: a killed client keeps the image's lock until its
    # watch times out on the OSD (30 s), and the next back-end would wait.
    q = (Nitro(d, nitro_daemon(poll_us) + c.blk_config(IMAGE), metrics=False, timeout=60)
         if backend == "nitro" else Child(qsd_argv(c, sock), d / "qsd.log"))
    try:
        q.wait_for(sock, 60)
        return vublk(sock, wl, runtime, seed)
    finally:
        q.stop(timeout=20)


def summarize(runs: list[dict], workloads: list[Workload]) -> dict:
    out: dict[str, dict] = {}
    for wl in workloads:
        med = {b: statistics.median(r["iops"] for r in runs if r["workload"] == wl.name and r["backend"] == b)
               for b in BACKENDS}
        out[wl.name] = {"label": wl.label, "nitro_iops": med["nitro"], "qsd_iops": med["qsd"],
                        "nitro_mbps": med["nitro"] * wl.bs / 1e6, "qsd_mbps": med["qsd"] * wl.bs / 1e6,
                        "ratio": med["nitro"] / med["qsd"] if med["qsd"] else float("nan")}
    return out


def print_table(summary: dict) -> None:
    print(f"{'workload':<18}{'nitro IOPS':>12}{'qsd IOPS':>12}{'nitro MB/s':>12}{'qsd MB/s':>12}{'ratio':>8}")
    for s in summary.values():
        print(f"{s['label']:<18}{s['nitro_iops']:>12.0f}{s['qsd_iops']:>12.0f}{s['nitro_mbps']:>12.1f}"
              f"{s['qsd_mbps']:>12.1f}{s['ratio']:>7.2f}x")
    print(f"geometric mean of the ratios: {geomean([s['ratio'] for s in summary.values()]):.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=10, help="seconds per run (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per back-end and workload (default 2)")
    ap.add_argument("--image-mib", type=int, default=512, help="image size (default 512)")
    ap.add_argument("--objectstore", choices=("memstore", "bluestore"), default="memstore")
    ap.add_argument("--poll-us", default="0",
                    help="nitro's [daemon] poll_us: 0 (default, see above) or a number, or adaptive")
    ap.add_argument("--workloads", default="",
                    help="comma-separated subset of " + ",".join(w.name for w in WORKLOADS))
    args = ap.parse_args(argv)
    try:
        workloads = pick_workloads(args.workloads, WORKLOADS)
    except ValueError as e:
        ap.error(str(e))
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is not installed (qemu-system-common, qemu-block-extra)")
        return 1
    build_vublk()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nitro-rbd-", dir="/tmp"))
    runs: list[dict] = []
    try:
        with ceph_cluster(objectstore=args.objectstore, store_bytes=(args.image_mib + 512) << 20) as c:
            c.rbd("create", "--size", f"{args.image_mib}M", f"{c.pool}/{IMAGE}")
            c.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-pattern", "seq",
                  "--io-total", f"{args.image_mib}M", f"{c.pool}/{IMAGE}", timeout=600)
            for wl in workloads:
                for rnd in range(args.rounds):
                    for backend in BACKENDS:
                        res = run_one(c, backend, wl, args.runtime, rnd + 1, work, args.poll_us)
                        runs.append({"workload": wl.name, "backend": backend, "round": rnd, **res})
                        print(f"{wl.label:<18} round {rnd} {backend:<6} {res['iops']:>9.0f} IOPS "
                              f"errors {res['errors']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs, workloads)
    print_table(summary)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (OUT_DIR / f"rbd-{stamp}.json").write_text(json.dumps({"args": vars(args), "summary": summary,
                                                           "runs": runs}, indent=2))
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
