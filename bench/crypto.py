"""At-rest encryption cost: nitro's C AES-XTS path and encrypted volumes.

    python -m bench.crypto [--seconds 3] [--rounds 3] [--runtime 5]

The targets of issue 9 ("Encryption that keeps up") can be read off one run:

1. Raw XTS throughput, one core: nitro's C sector cipher (nitro_xts_crypt,
   1 MiB per call, plain64 IVs exactly as the datapath uses them) at
   4096- and 512-byte sectors against `openssl speed -evp aes-256-xts
   -bytes 4096` and `-bytes 512`, all pinned to the same CPU, alternated
   in every round, medians. Both are bytes per CPU second (openssl's
   default). "nitro" is the path nitro picks on this machine (its own XTS
   on VAES where the CPU has it, 512-bit with AVX-512, nitro_xts_aesni.c);
   nitro also runs forced onto its 256-bit VAES XTS ("vaes", CPUs with
   VAES but no AVX-512), its 128-bit AES-NI XTS ("aesni", CPUs without
   VAES) and onto
   OpenSSL's XTS one sector per call ("evp", the path before its own XTS
   and the one without AES-NI) for comparison. Targets: nitro 4096 >= 0.90
   of openssl 4096; nitro 512 >= 0.75 of openssl (printed against both
   openssl 4096 and openssl 512).
2. I/O through the real daemon: tools/bin/vublk (the frontend bench/blk.py
   uses) against `nitro run` serving a plain raw image and LUKS2 volumes of
   the same size (4096- and 512-byte sectors), alternated per round, images
   in tmpfs. Targets: LUKS2/plain IOPS >= 0.90 for 4 KiB random read and
   write, >= 0.75 for 128 KiB sequential reads. Also printed: nitro's CPU
   time per request (all its threads, io_uring's io-wq workers included).
   It includes the engine's busy-polling, so it is an upper bound on the
   work per request, not the work itself (docs/encryption.md has a perf
   breakdown without the polling).

Machines here have slow periods: read the ratios of medians (and the
median of the per-round ratios), not absolutes.
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
    pick_workloads,
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

def openssl_speed(cpu: int, seconds: int, block: int, cipher: str = "aes-256-xts") -> float:
    """`cipher` bytes/s at `block`-byte blocks, as `openssl speed -evp` reports."""
    r = subprocess.run(["taskset", "-c", str(cpu), "openssl", "speed", "-evp", cipher,
                        "-bytes", str(block), "-seconds", str(seconds)],
                       capture_output=True, text=True, check=True)
    m = re.search(rf"^{cipher}\s+([\d.]+)k\s*$", r.stdout, re.MULTILINE | re.IGNORECASE)
    if not m:
        sys.exit(f"bench.crypto: cannot parse openssl speed output:\n{r.stdout}")
    return float(m.group(1)) * 1000


def nitro_xts_speed(cpu: int, seconds: float, sector: int, impl: str | None = None,
                    key_bytes: int = 64) -> float:
    """nitro_xts_crypt bytes per CPU second, in a child pinned to `cpu`.
    CPU time, not wall time, because that is what `openssl speed` divides
    by (without -elapsed): both figures then survive a busy machine."""
    code = f"""
import os, time
from nitro import _datapath as dp
r, w = os.pipe(); os.write(w, os.urandom({key_bytes})); os.close(w)
s = dp.Secret(64); s.read_fd(r, False); os.close(r)
x = dp.XtsCipher(s, {sector}); s.close()
if {impl!r} is not None:
    x.impl = {impl!r}
buf = bytearray(os.urandom(1 << 20))
n, t0 = 0, time.thread_time()
while time.thread_time() - t0 < {seconds}:
    x.crypt_into(buf, buf, n % (1 << 30), True); n += len(buf)
print(n / (time.thread_time() - t0))
"""
    r = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-c", code],
                       capture_output=True, text=True, check=True, cwd=REPO)
    return float(r.stdout.strip())


# (series, what runs it); every round runs them all, in this order.
XTS_SERIES = [
    ("openssl-4096", lambda cpu, sec: openssl_speed(cpu, sec, 4096)),
    ("nitro-4096", lambda cpu, sec: nitro_xts_speed(cpu, sec, 4096)),
    ("openssl-512", lambda cpu, sec: openssl_speed(cpu, sec, 512)),
    ("nitro-512", lambda cpu, sec: nitro_xts_speed(cpu, sec, 512)),
    ("nitro-vaes-4096", lambda cpu, sec: nitro_xts_speed(cpu, sec, 4096, "vaes")),
    ("nitro-vaes-512", lambda cpu, sec: nitro_xts_speed(cpu, sec, 512, "vaes")),
    ("nitro-aesni-4096", lambda cpu, sec: nitro_xts_speed(cpu, sec, 4096, "aesni")),
    ("nitro-aesni-512", lambda cpu, sec: nitro_xts_speed(cpu, sec, 512, "aesni")),
    ("nitro-evp-4096", lambda cpu, sec: nitro_xts_speed(cpu, sec, 4096, "evp-iv")),
    ("nitro-evp-512", lambda cpu, sec: nitro_xts_speed(cpu, sec, 512, "evp-iv")),
]
# (label, numerator, denominator, target or None)
XTS_RATIOS = [
    ("nitro 4096 / openssl 4096", "nitro-4096", "openssl-4096", 0.90),
    ("nitro 512 / openssl 4096", "nitro-512", "openssl-4096", 0.75),
    ("nitro 512 / openssl 512", "nitro-512", "openssl-512", 0.75),
    ("vaes 4096 / openssl 4096", "nitro-vaes-4096", "openssl-4096", None),
    ("vaes 512 / openssl 4096", "nitro-vaes-512", "openssl-4096", None),
    ("aesni 4096 / openssl 4096", "nitro-aesni-4096", "openssl-4096", None),
    ("aesni 512 / openssl 4096", "nitro-aesni-512", "openssl-4096", None),
    ("evp 4096 / openssl 4096", "nitro-evp-4096", "openssl-4096", None),
    ("evp 512 / openssl 4096", "nitro-evp-512", "openssl-4096", None),
]


def bench_xts(args: argparse.Namespace) -> dict:
    return run_series("AES-256-XTS", XTS_SERIES, XTS_RATIOS, args.rounds, args.seconds)


def run_series(title: str, series: list, ratio_specs: list, rounds: int, seconds: float) -> dict:
    """Run every series once per round, in order, on one CPU; print the
    medians and the ratios (label, numerator, denominator, target)."""
    cpu = min(os.sched_getaffinity(0))
    runs: dict[str, list[float]] = {name: [] for name, _ in series}
    for _ in range(rounds):
        for name, measure in series:
            runs[name].append(measure(cpu, seconds))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\n{title}, one core (CPU {cpu}), median of {rounds} alternated rounds")
    for name, _ in series:
        print(f"  {name:<16} {med[name] / 1e9:6.2f} GB/s   "
              f"rounds: {' '.join(f'{v / 1e9:.2f}' for v in runs[name])}")
    ratios = {}
    print(f"  {'ratio':<30} {'of medians':>10} {'per-round median':>17}  target")
    for label, num, den, target in ratio_specs:
        of_medians = med[num] / med[den]
        per_round = statistics.median(a / b for a, b in zip(runs[num], runs[den], strict=True))
        ratios[label] = {"of_medians": of_medians, "per_round_median": per_round,
                         "target": target}
        mark = "" if target is None else f">= {target:.2f} {'met' if of_medians >= target else 'MISSED'}"
        print(f"  {label:<30} {of_medians:>10.2f} {per_round:>17.2f}  {mark}")
    return {"cpu": cpu, "runs": runs, "median": med, "ratios": ratios}


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
    base = args.image_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    with tempfile.TemporaryDirectory(prefix="nitro-crypto-", dir=base) as d:
        workdir = Path(d)
        vols = make_volumes(workdir, size)
        fill(vols, workdir, args, size)
        results: dict = {}
        for wl in args.workload_list:
            per: dict[str, list[dict]] = {be.name: [] for be, _ in vols}
            for rnd in range(args.rounds):
                for be, img in vols:
                    run = run_one(be, wl, rnd, args, workdir, img, pin_b, pin_c)
                    if not run.ok:
                        sys.exit(f"bench.crypto: {be.name} {wl.name}: {run.error}")
                    per[be.name].append({**run.result, "nitro_cpu_util": run.backend_cpu_util})
            results[wl.name] = per
    return _io_summary(results, note)


# Issue 9's targets for LUKS2/plain IOPS.
IO_TARGETS = {"randread-4k": 0.90, "randwrite-4k": 0.90, "read-128k": 0.75}


def _median(rs: list[dict], key: str) -> float:
    return statistics.median(float(r.get(key) or 0) for r in rs)


def _cpu_us_per_io(r: dict) -> float:
    """nitro's CPU time (all threads, busy-polling included) per request, us."""
    return (r.get("nitro_cpu_util") or 0) / r["iops"] * 1e6 if r.get("iops") else float("nan")


def _wakes_per_io(r: dict) -> float:
    """vublk's `calls` per request: the times it read its call eventfd,
    which it does only after finding nothing to reap and waiting. So: how
    often the front-end slept and a call from the back-end woke it (a
    cross-CPU wake-up), not how many calls the back-end sent (an eventfd
    read takes any number of them at once)."""
    return r["calls"] / r["ios"] if r.get("ios") and "calls" in r else float("nan")


def _io_summary(results: dict, note: str) -> dict:
    print(f"\nvublk -> nitro, plain vs LUKS2 aes-xts-plain64 (512-bit key); {note}")
    print(f"  {'workload':<14} {'volume':<10} {'IOPS':>9} {'MB/s':>8} {'CPU us/IO':>11}"
          f" {'wakes/IO':>9}  {'ratio':>5} {'per-round':>9}  target")
    summary: dict = {}
    for wl, per in results.items():
        plain = _median(per["plain"], "iops")
        bs = next(w.bs for w in WORKLOADS if w.name == wl)
        for name, rs in per.items():
            iops = _median(rs, "iops")
            cpu_us = statistics.median(_cpu_us_per_io(r) for r in rs)
            wakes = statistics.median(_wakes_per_io(r) for r in rs)
            ratio = iops / plain if plain else float("nan")
            per_round = statistics.median(
                r["iops"] / q["iops"] for r, q in zip(rs, per["plain"], strict=True))
            target = IO_TARGETS.get(wl) if name != "plain" else None
            summary[f"{wl}/{name}"] = {"iops": iops, "mb_s": iops * bs / 1e6, "ratio": ratio,
                                       "per_round_ratio": per_round,
                                       "nitro_cpu_us_per_io": cpu_us,
                                       "frontend_wakes_per_io": wakes, "target": target,
                                       "rounds_iops": [r["iops"] for r in rs]}
            mark = "" if target is None else f">= {target:.2f} {'met' if ratio >= target else 'MISSED'}"
            print(f"  {wl:<14} {name:<10} {iops:>9.0f} {iops * bs / 1e6:>8.1f} {cpu_us:>11.1f}"
                  f" {wakes:>9.2f}  {ratio:>5.2f} {per_round:>9.2f}  {mark}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=3, help="per raw XTS measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=5, help="seconds per vublk run")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--skip-io", action="store_true")
    p.add_argument("--skip-xts", action="store_true", help="only the I/O part")
    p.add_argument("--workloads", default="",
                   help="comma-separated subset of " + ",".join(w.name for w in WORKLOADS))
    p.add_argument("--poll", action="store_true", help="vublk busy-polls (see bench.blk)")
    p.add_argument("--image-dir", default=None,
                   help="where the images live (default /dev/shm, tmpfs; e.g. /var/tmp for ext4's "
                        "page cache, as bench.blk)")
    args = p.parse_args(argv)
    try:
        args.workload_list = pick_workloads(args.workloads, WORKLOADS)
    except ValueError as e:
        p.error(str(e))
    if not VUBLK.parent.exists():
        VUBLK.parent.mkdir(parents=True)
    report = {} if args.skip_xts else {"xts": bench_xts(args)}
    if not args.skip_io:
        report["io"] = bench_io(args)
    save_report("crypto", report)
    return 0


def save_report(name: str, report: dict) -> None:
    """build/bench/<name>-<timestamp>.json, with the time of the run."""
    report = {"when": _dt.datetime.now().isoformat(timespec="seconds"), **report}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    sys.exit(main())
