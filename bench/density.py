"""Many busy rings on one daemon: nitro against qemu-storage-daemon.

    python -m bench.density --devices 64 --queues 4 --runtime 6 --rounds 2

One back-end process serves D devices with Q queues each (64 x 4 = 256
rings by default); D vublk front-ends, one per device, all start together
and keep QD requests in flight on every queue of their device (4 KiB
random reads of a sparse image) for the same time. Reported per back-end:
- aggregate IOPS, and the slowest device's IOPS as a share of the mean
  device's (fairness; 1.0 = all equal);
- for nitro also the slowest *ring's* share of the mean ring (from
  nitro_virtqueue_chains in its /metrics; qsd exports no per-queue count);
- the back-end's thread count and RSS at the end of the run.
Back-ends alternate per round (A, B, A, B): compare ratios, not absolutes.

Exit status 0 when every run succeeded. Results: stdout and
build/bench/density-<timestamp>.json.
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
import time
import urllib.request
from pathlib import Path

from bench.blk import OUT_DIR, VUBLK, _toml_str, build_vublk

MiB = 1024**2


def nitro_cmd(workdir: Path, images: list[Path], socks: list[Path], queues: int, port: int) -> list[str]:
    cfg = workdir / "nitro.toml"
    text = (f"[daemon]\nruntime_dir = {_toml_str(workdir)}\nstate_dir = {_toml_str(workdir)}\n\n"
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    for i, (img, sock) in enumerate(zip(images, socks)):
        text += (f'\n[[blk]]\nid = "d{i}"\nsocket = {_toml_str(sock)}\nimage = {_toml_str(img)}\n'
                 f"queues = {queues}\n")
    cfg.write_text(text)
    return [sys.executable, "-m", "nitro", "run", "--config", str(cfg)]


def qsd_cmd(images: list[Path], socks: list[Path], queues: int) -> list[str]:
    argv = ["qemu-storage-daemon"]
    for i, (img, sock) in enumerate(zip(images, socks)):
        argv += ["--blockdev", f"driver=file,node-name=f{i},filename={img},aio=io_uring,cache.direct=off",
                 "--blockdev", f"driver=raw,node-name=d{i},file=f{i}",
                 "--export", f"type=vhost-user-blk,id=e{i},node-name=d{i},addr.type=unix,"
                             f"addr.path={sock},writable=on,num-queues={queues}"]
    return argv


def proc_info(pid: int) -> dict:
    threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return {"threads": threads, "rss_bytes": rss}


def ring_chains(port: int) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("nitro_virtqueue_chains_total{"):
            labels, value = line[len("nitro_virtqueue_chains_total{"):].split("} ")
            kv = dict(p.split("=", 1) for p in labels.split(","))
            out[(kv["device"].strip('"'), kv["queue"].strip('"'))] = float(value)
    return out


def wait_sockets(socks: list[Path], proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(s.exists() for s in socks):
        if proc.poll() is not None:
            raise RuntimeError(f"back-end exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("back-end sockets did not appear")
        time.sleep(0.05)


def run_one(kind: str, args: argparse.Namespace, workdir: Path, images: list[Path], rnd: int) -> dict:
    socks = [workdir / f"{kind}-{i}.sock" for i in range(args.devices)]
    port = 19180 + rnd
    argv = (nitro_cmd(workdir, images, socks, args.queues, port) if kind == "nitro"
            else qsd_cmd(images, socks, args.queues))
    log = open(workdir / f"{kind}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    clients: list[subprocess.Popen] = []
    try:
        wait_sockets(socks, proc)
        before = ring_chains(port) if kind == "nitro" else {}
        for i, sock in enumerate(socks):
            clients.append(subprocess.Popen(
                [str(VUBLK), "--socket", str(sock), "--rw", "randread", "--bs", "4096",
                 "--iodepth", str(args.iodepth), "--queues", str(args.queues), "--runtime", str(args.runtime),
                 "--timeout", "30", "--seed", str(i + 1)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(args.runtime * 0.8)
        info = proc_info(proc.pid)
        results = []
        for c in clients:
            out, err = c.communicate(timeout=args.runtime + 60)
            if c.returncode != 0:
                raise RuntimeError(f"vublk exited {c.returncode}: {err.strip()}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        after = ring_chains(port) if kind == "nitro" else {}
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    iops = [r["iops"] for r in results]
    mean = statistics.mean(iops)
    out = {"backend": kind, "round": rnd, "aggregate_iops": sum(iops),
           "slowest_device_share": min(iops) / mean if mean else 0.0, **info}
    if after:
        per_ring = [after[k] - before.get(k, 0.0) for k in after]
        ring_mean = statistics.mean(per_ring)
        out["rings"] = len(per_ring)
        out["slowest_ring_share"] = min(per_ring) / ring_mean if ring_mean else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--queues", type=int, default=4)
    ap.add_argument("--iodepth", type=int, default=4)
    ap.add_argument("--runtime", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--image-mib", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)
    build_vublk()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    runs = []
    workdir = Path(tempfile.mkdtemp(prefix="nitro-density-"))
    try:
        images = []
        for i in range(args.devices):
            img = workdir / f"img{i}.raw"
            with open(img, "wb") as f:
                f.truncate(args.image_mib * MiB)  # sparse: reads cost the path, not a disk
            images.append(img)
        for rnd in range(args.rounds):
            for kind in ("qsd", "nitro"):
                r = run_one(kind, args, workdir, images, rnd)
                runs.append(r)
                print(json.dumps(r), flush=True)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = {}
    for kind in ("qsd", "nitro"):
        mine = [r for r in runs if r["backend"] == kind]
        summary[kind] = {k: statistics.median(r[k] for r in mine)
                         for k in mine[0] if isinstance(mine[0][k], int | float) and k != "round"}
    ratio = summary["nitro"]["aggregate_iops"] / summary["qsd"]["aggregate_iops"]
    print(f"\n{args.devices} devices x {args.queues} queues = {args.devices * args.queues} rings, "
          f"QD{args.iodepth} per queue, {args.runtime:.0f} s, medians of {args.rounds} rounds")
    print(f"{'':8} {'IOPS':>10} {'slowest dev':>12} {'slowest ring':>13} {'threads':>8} {'RSS MiB':>8}")
    for kind in ("qsd", "nitro"):
        s = summary[kind]
        ring = f"{s['slowest_ring_share']:.2f}" if "slowest_ring_share" in s else "-"
        print(f"{kind:8} {s['aggregate_iops']:>10.0f} {s['slowest_device_share']:>12.2f} {ring:>13} "
              f"{s['threads']:>8.0f} {s['rss_bytes'] / MiB:>8.1f}")
    print(f"nitro / qsd aggregate IOPS: {ratio:.2f}")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (OUT_DIR / f"density-{stamp}.json").write_text(json.dumps({"args": vars(args), "runs": runs,
                                                               "summary": summary, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
