"""At-rest encryption cost: nitro's C AES-XTS path and encrypted volumes.

    python -m bench.crypto [--seconds 3] [--rounds 3] [--runtime 5]

1. Raw XTS throughput, one core: nitro's C sector cipher (nitro_xts_crypt,
   1 MiB per call, 4096- and 512-byte sectors, an IV set per sector exactly
   as the datapath does) against `openssl speed -evp aes-256-xts -bytes
   4096`, both pinned to the same CPU, alternated A, B, A, B, both as bytes
   per CPU second (openssl's default). Target: nitro >= 80% of openssl at
   4 KiB.
2. Guest-visible I/O: tools/bin/vublk (the same userspace frontend as
   bench/blk.py) against nitro serving a plain raw image and a LUKS2 volume
   of the same size (4096- and 512-byte sectors), alternated. Target:
   encrypted >= 90% of plain IOPS for 4 KiB random reads.

Machines here have slow periods: read the ratios of medians, not absolutes.
Results: stdout and build/bench/crypto-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.blk import (
    OUT_DIR,
    REPO,
    VUBLK,
    Backend,
    MiB,
    Workload,
    _toml_str,
    build_vublk,
    nitro_backend_cmd,
    pick_cpus,
    run_one,
)
from bench.proc import run_cli

WORKLOADS = [
    Workload("randread-4k", "randread", 4096, 32),
    Workload("randwrite-4k", "randwrite", 4096, 32),
    Workload("read-128k", "read", 128 * 1024, 8),
]
FAST_PBKDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


# ---- 1. raw XTS ------------------------------------------------------------

def openssl_speed(cpu: int, seconds: int) -> float:
    """AES-256-XTS bytes/s at 4 KiB blocks, as `openssl speed` reports."""
    r = subprocess.run(["taskset", "-c", str(cpu), "openssl", "speed", "-evp", "aes-256-xts",
                        "-bytes", "4096", "-seconds", str(seconds)],
                       capture_output=True, text=True, check=True)
    m = re.search(r"^aes-256-xts\s+([\d.]+)k\s*$", r.stdout, re.MULTILINE | re.IGNORECASE)
    if not m:
        sys.exit(f"bench.crypto: cannot parse openssl speed output:\n{r.stdout}")
    return float(m.group(1)) * 1000


def nitro_xts_speed(cpu: int, seconds: float, sector: int, key_bytes: int = 64) -> float:
    """nitro_xts_crypt bytes per CPU second, in a child pinned to `cpu`.
    CPU time, not wall time, because that is what `openssl speed` divides
    by (without -elapsed): both figures then survive a busy machine."""
    code = f"""
import os, time
from nitro import _datapath as dp
r, w = os.pipe(); os.write(w, os.urandom({key_bytes})); os.close(w)
s = dp.Secret(64); s.read_fd(r, False); os.close(r)
x = dp.XtsCipher(s, {sector}); s.close()
buf = bytearray(os.urandom(1 << 20))
n, t0 = 0, time.thread_time()
while time.thread_time() - t0 < {seconds}:
    x.crypt_into(buf, buf, n % (1 << 30), True); n += len(buf)
print(n / (time.thread_time() - t0))
"""
    r = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-c", code],
                       capture_output=True, text=True, check=True, cwd=REPO)
    return float(r.stdout.strip())


def bench_xts(args: argparse.Namespace) -> dict:
    cpu = min(os.sched_getaffinity(0))
    runs: dict[str, list[float]] = {"openssl": [], "nitro-4096": [], "nitro-512": []}
    for _ in range(args.rounds):
        runs["openssl"].append(openssl_speed(cpu, args.seconds))
        runs["nitro-4096"].append(nitro_xts_speed(cpu, args.seconds, 4096))
        runs["nitro-512"].append(nitro_xts_speed(cpu, args.seconds, 512))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\nAES-256-XTS, one core (CPU {cpu}), median of {args.rounds} alternated rounds")
    print(f"  openssl speed -evp aes-256-xts (4 KiB blocks) {med['openssl'] / 1e9:6.2f} GB/s")
    for k in ("nitro-4096", "nitro-512"):
        print(f"  nitro C path, {k.split('-')[1]:>4}-byte sectors           "
              f"{med[k] / 1e9:6.2f} GB/s   ratio {med[k] / med['openssl']:.2f}")
    return {"runs": runs, "median": med,
            "ratio_4096": med["nitro-4096"] / med["openssl"],
            "ratio_512": med["nitro-512"] / med["openssl"]}


# ---- 2. guest-visible I/O --------------------------------------------------

class NitroVolume(Backend):
    """nitro serving one image, plain or encrypted (key file next to it)."""

    def __init__(self, name: str, key: Path | None) -> None:
        super().__init__(name, "nitro", f"nitro, {name}", start_timeout=30.0)
        self.key = key

    def command(self, image: Path, socket: Path) -> list[str]:
        enc = f"encryption = {{ key_file = {_toml_str(self.key)} }}\n" if self.key else ""
        return nitro_backend_cmd(image, socket, enc)


def make_volumes(workdir: Path, size: int) -> list[tuple[NitroVolume, Path]]:
    key = workdir / "bench.key"
    key.write_bytes(os.urandom(64))
    key.chmod(0o600)
    plain = workdir / "plain.img"
    with open(plain, "wb") as f:
        f.truncate(size)
    out = [(NitroVolume("plain", None), plain)]
    for sector in (4096, 512):
        img = workdir / f"luks{sector}.img"
        r = run_cli("volume", "create", img, "--size", str(size), "--encrypt", "--key-file", key,
                    "--sector-size", str(sector), *FAST_PBKDF)
        if r.returncode != 0:
            sys.exit(f"bench.crypto: nitro volume create exited {r.returncode}: {r.stderr.strip()}")
        out.append((NitroVolume(f"luks-{sector}", key), img))
    return out


def fill(vols, workdir: Path, args: argparse.Namespace, size: int) -> None:
    """Write every block once through nitro, so reads hit real ciphertext."""
    wl = Workload("fill", "write", 1 << 20, 4)
    for be, img in vols:
        run = run_one(be, wl, 0, args, workdir, img, [], [], runtime=120, ios=size // (1 << 20))
        if not run.ok:
            sys.exit(f"bench.crypto: filling {be.name} failed: {run.error}")


def bench_io(args: argparse.Namespace) -> dict:
    build_vublk()
    pin_b, pin_c, note = pick_cpus()
    size = args.size_mib * MiB
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="nitro-crypto-", dir=base) as d:
        workdir = Path(d)
        vols = make_volumes(workdir, size)
        fill(vols, workdir, args, size)
        results: dict = {}
        for wl in WORKLOADS:
            per: dict[str, list[dict]] = {be.name: [] for be, _ in vols}
            for rnd in range(args.rounds):
                for be, img in vols:
                    run = run_one(be, wl, rnd, args, workdir, img, pin_b, pin_c)
                    if not run.ok:
                        sys.exit(f"bench.crypto: {be.name} {wl.name}: {run.error}")
                    per[be.name].append(run.result)
            results[wl.name] = per
    return _io_summary(results, note)


def _median(rs: list[dict], key: str) -> float:
    return statistics.median(float(r.get(key, 0)) for r in rs)


def _io_summary(results: dict, note: str) -> dict:
    print(f"\nvublk -> nitro, plain vs LUKS2 aes-xts-plain64 (512-bit key); {note}")
    print(f"  {'workload':<14} {'volume':<10} {'IOPS':>10} {'MB/s':>9}  ratio vs plain")
    summary: dict = {}
    for wl, per in results.items():
        plain = _median(per["plain"], "iops")
        for name, rs in per.items():
            iops = _median(rs, "iops")
            mbs = iops * next(w.bs for w in WORKLOADS if w.name == wl) / 1e6
            ratio = iops / plain if plain else float("nan")
            summary[f"{wl}/{name}"] = {"iops": iops, "mb_s": mbs, "ratio": ratio}
            print(f"  {wl:<14} {name:<10} {iops:>10.0f} {mbs:>9.1f}  {ratio:.2f}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=3, help="per raw XTS measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=5, help="seconds per vublk run")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--skip-io", action="store_true")
    p.add_argument("--poll", action="store_true", help="vublk busy-polls (see bench.blk)")
    args = p.parse_args(argv)
    if not VUBLK.parent.exists():
        VUBLK.parent.mkdir(parents=True)
    report = {"when": _dt.datetime.now().isoformat(timespec="seconds"), "xts": bench_xts(args)}
    if not args.skip_io:
        report["io"] = bench_io(args)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"crypto-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
