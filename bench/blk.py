"""vhost-user-blk throughput: nitro against qemu-storage-daemon, no guest.

    python -m bench.blk --backend qsd|nitro|both --runtime 10

A TCG guest caps 4 KiB I/O far below what a back-end can serve, so this drives
the back-ends with tools/bin/vublk, a userspace vhost-user-blk front-end that
speaks the protocol like QEMU and keeps the virtqueue full itself.

Method
- one 1 GiB raw image, fully written (no holes), so reads hit real blocks.
  It sits in the host page cache: the figures measure the vhost-user path and
  the back-end's overhead, not a disk. By default it lives in build/bench
  (ext4 here): buffered 4 KiB random writes then cost ext4 ~30 us each in the
  kernel (about 30k IOPS, whatever the back-end), which compresses the
  randwrite ratio towards 1. `--image-dir /dev/shm` (tmpfs) removes the
  filesystem from the measurement and shows back-end overhead alone.
- each run starts a fresh back-end on a temporary socket, runs one vublk
  workload against it, stops it. The back-end is pinned to one CPU and vublk
  to another (taskset) when the machine has two.
- qemu-storage-daemon runs with aio=threads and aio=io_uring (both
  cache.direct=off). Per workload, the faster of the two (median IOPS) is the
  reference the nitro ratio is taken against: neither wins everywhere here
  (io_uring wins 4 KiB random reads by ~1.3-1.6x, threads tends to win writes),
  and a single overall pick flips from run to run, so nitro is held to qsd's
  best per workload. The table marks the pick; the io_uring/threads ratios and
  their geometric mean are printed too.
- per workload the back-ends alternate A, B, A, B, ... (--rounds, at least 2):
  the machines have slow periods of seconds to minutes, so compare the ratio
  of medians, never one-off absolute numbers.

Results: a table on stdout and build/bench/blk-<timestamp>.json with every run.
Exit status: 0 when every run of every available back-end succeeded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.proc import REPO, Child, ChildError, nitro_argv, tail

TOOLS = REPO / "tools"
VUBLK = TOOLS / "bin" / "vublk"
OUT_DIR = REPO / "build" / "bench"

GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------
# workloads


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: int
    iodepth: int

    def vublk_args(self) -> list[str]:
        return ["--rw", self.rw, "--bs", str(self.bs), "--iodepth", str(self.iodepth)]

    @property
    def label(self) -> str:
        size = f"{self.bs // 1024}k" if self.bs % 1024 == 0 else str(self.bs)
        return f"{self.rw} {size} QD{self.iodepth}"


WORKLOADS = [
    Workload("randread-4k", "randread", 4096, 32),
    Workload("randwrite-4k", "randwrite", 4096, 32),
    Workload("read-128k", "read", 128 * 1024, 8),
    Workload("write-128k", "write", 128 * 1024, 8),
]


# --------------------------------------------------------------------------
# back-ends


def nitro_backend_cmd(image: Path, socket: Path, blk_extra: str = "") -> list[str]:
    """argv that serves `image` as a vhost-user-blk device on `socket`;
    `blk_extra` is more TOML for the [[blk]] table (e.g. encryption).

    Writes the nitro config next to the socket. This is the one place to
    change when nitro's config format changes (its command line is
    bench/proc.py's).
    """
    cfg = socket.parent / f"{socket.stem}.toml"
    # runtime_dir/state_dir: nitro's control socket and state stay in the
    # bench's work directory (the defaults, /run/nitro and /var/lib/nitro,
    # need not exist)
    cfg.write_text(
        "[daemon]\n"
        f"runtime_dir = {_toml_str(socket.parent)}\n"
        f"state_dir = {_toml_str(socket.parent)}\n"
        "\n"
        "[[blk]]\n"
        'id = "bench0"\n'
        f"socket = {_toml_str(socket)}\n"
        f"image = {_toml_str(image)}\n"
        "queues = 1\n"
        f"{blk_extra}"
        "\n"
        "[metrics]\n"
        'listen = ""\n'
    )
    return nitro_argv("run", "--config", cfg)


def qsd_backend_cmd(image: Path, socket: Path, aio: str) -> list[str]:
    return [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,node-name=file0,filename={image},aio={aio},cache.direct=off",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--export",
        (
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={socket},writable=on,num-queues=1"
        ),
    ]


def _toml_str(p: Path) -> str:
    # JSON string escapes are valid TOML basic-string escapes
    return json.dumps(str(p))


@dataclass
class Backend:
    name: str          # key in results: qsd-threads, qsd-io_uring, nitro
    family: str        # qsd | nitro
    description: str
    start_timeout: float = 10.0
    unavailable: str | None = None  # why it is skipped (only "not installed")
    failed: str | None = None       # why it stopped being run

    def command(self, image: Path, socket: Path) -> list[str]:
        if self.family == "nitro":
            return nitro_backend_cmd(image, socket)
        aio = self.name.split("-", 1)[1]
        return qsd_backend_cmd(image, socket, aio)


def make_backends(which: str, qsd_aio: str) -> list[Backend]:
    out: list[Backend] = []
    if which in ("qsd", "both"):
        aios = ["threads", "io_uring"] if qsd_aio == "auto" else [qsd_aio]
        for aio in aios:
            b = Backend(f"qsd-{aio}", "qsd", f"qemu-storage-daemon aio={aio} cache.direct=off")
            if shutil.which("qemu-storage-daemon") is None:
                b.unavailable = "qemu-storage-daemon is not installed (qemu-system-common)"
            out.append(b)
    if which in ("nitro", "both"):
        b = Backend("nitro", "nitro", "nitro run (vhost-user-blk, raw image)", start_timeout=30.0)
        b.unavailable = _nitro_import_problem()
        out.append(b)
    return out


def _nitro_import_problem() -> str | None:
    """Interim: nitro may not be importable yet; say why, or None if it is."""
    r = subprocess.run(
        [sys.executable, "-c", "import nitro.cli"],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"nitro is not importable yet ({last})"


def nitro_config_check(image: Path, socket: Path) -> str | None:
    """`nitro run --check` on the bench config: an error text or None."""
    argv = nitro_backend_cmd(image, socket) + ["--check"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO,
                           check=False)
    except subprocess.TimeoutExpired:
        return "`nitro run --check` did not finish within 60 s"
    if r.returncode != 0:
        return (f"`{' '.join(argv)}` exited {r.returncode}:\n"
                f"{tail(r.stdout + r.stderr)}")
    return None


# --------------------------------------------------------------------------
# running


def pick_cpus() -> tuple[list[str], list[str], str]:
    """taskset prefixes for the back-end and for vublk, and a note."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    if len(cpus) < 2:
        return [], [], f"not pinned: only {len(cpus)} CPU available"
    if shutil.which("taskset") is None:
        return [], [], "not pinned: taskset is not installed (util-linux)"
    b, c = cpus[0], cpus[1]
    return (["taskset", "-c", str(b)], ["taskset", "-c", str(c)],
            f"back-end pinned to CPU {b}, vublk to CPU {c}")


def build_vublk() -> None:
    r = subprocess.run(["make", "-C", str(TOOLS)], capture_output=True, text=True, check=False)
    if r.returncode != 0 or not VUBLK.exists():
        sys.exit(f"bench.blk: building vublk failed:\n{r.stdout}{r.stderr}")


def create_image(path: Path, size: int) -> None:
    """A fully written (not sparse) image, flushed so its pages are clean."""
    chunk = 4 * MiB
    t0 = time.monotonic()
    with open(path, "wb") as f:
        f.writelines(os.urandom(chunk) for _ in range(size // chunk))
        f.flush()
        os.fsync(f.fileno())
    print(f"image: {path} ({size // MiB} MiB of random data, {time.monotonic() - t0:.1f} s; "
          "in the page cache)", flush=True)


@dataclass
class Run:
    workload: str
    backend: str
    round: int
    ok: bool
    result: dict | None = None
    error: str | None = None
    vublk_argv: list[str] = field(default_factory=list)
    backend_argv: list[str] = field(default_factory=list)
    backend_cpu_util: float | None = None  # CPU seconds per second of the run
    client_cpu_util: float | None = None   # the same for vublk


def run_one(backend: Backend, wl: Workload, rnd: int, args: argparse.Namespace,
            workdir: Path, image: Path, pin_backend: list[str], pin_client: list[str],
            runtime: float | None = None, ios: int | None = None) -> Run:
    sock = workdir / f"{backend.name}.sock"
    log = workdir / f"{backend.name}.log"
    argv = pin_backend + backend.command(image, sock)
    bp = Child(argv, log)
    vargv = pin_client + [str(VUBLK), "--socket", str(sock), "--wait", "10",
                          "--timeout", "10", "--seed", str(rnd + 1), *wl.vublk_args()]
    if ios is not None:
        vargv += ["--ios", str(ios)]
    else:
        vargv += ["--runtime", str(runtime if runtime is not None else args.runtime)]
    if args.poll:
        vargv.append("--poll")
    run = Run(wl.name, backend.name, rnd, False, vublk_argv=vargv, backend_argv=argv)
    try:
        try:
            bp.wait_for(sock, backend.start_timeout)
        except ChildError as e:
            run.error = f"{backend.name}: {e}"
            return run
        limit = (runtime or args.runtime) + 60
        cpu0, t0 = bp.cpu_seconds(), time.monotonic()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            r = subprocess.run(vargv, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            run.error = f"vublk did not finish within {limit:.0f} s"
            return run
        cpu1, t1 = bp.cpu_seconds(), time.monotonic()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        run.client_cpu_util = ((ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
                               / max(t1 - t0, 1e-9))
        if cpu0 is not None and cpu1 is not None and t1 > t0:
            # includes vublk's connect/teardown (~ms): a slight underestimate
            run.backend_cpu_util = (cpu1 - cpu0) / (t1 - t0)
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        if lines:
            try:
                run.result = json.loads(lines[-1])
            except json.JSONDecodeError:
                pass
        if r.returncode != 0 or run.result is None:
            run.error = (f"vublk exited {r.returncode}: {r.stderr.strip()}\n"
                         f"back-end log:\n{tail(bp.output())}")
            return run
        if run.result.get("errors", 0):
            run.error = f"{run.result['errors']} request(s) failed: {r.stderr.strip()}"
            return run
        run.ok = True
        return run
    finally:
        early = bp.proc.poll()
        bp.stop(timeout=10)
        sock.unlink(missing_ok=True)
        if early is not None and run.ok:
            run.ok = False
            run.error = f"{backend.name} exited on its own with {early}:\n{tail(bp.output())}"


# --------------------------------------------------------------------------
# summary


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def pick_workloads(spec: str, known: list[Workload]) -> list[Workload]:
    """The workloads a comma-separated --workloads names, in that order;
    all of `known` if it names none. ValueError for a name that is not one
    of `known`."""
    by_name = {w.name: w for w in known}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown workload {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names] if names else list(known)


def summarize(runs: list[Run], backends: list[Backend], workloads: list[Workload]) -> dict:
    summary: dict = {"workloads": {}}
    for wl in workloads:
        per: dict = {}
        for b in backends:
            ok = [r.result for r in runs
                  if r.workload == wl.name and r.backend == b.name and r.ok and r.result]
            if not ok:
                continue
            iops = [x["iops"] for x in ok]
            mbps = [x["mbps"] for x in ok]
            med = statistics.median(iops)
            per[b.name] = {
                "runs": len(ok),
                "iops_median": med,
                "mbps_median": statistics.median(mbps),
                "iops_all": iops,
                "spread_pct": 100.0 * (max(iops) - min(iops)) / med if med else 0.0,
                "lat_p50_us_median": statistics.median(x["lat_p50_us"] for x in ok),
                "lat_p99_us_median": statistics.median(x["lat_p99_us"] for x in ok),
            }
            cpu = [r.backend_cpu_util for r in runs
                   if r.workload == wl.name and r.backend == b.name and r.ok
                   and r.backend_cpu_util is not None]
            if cpu:
                per[b.name]["backend_cpu_util_median"] = statistics.median(cpu)
                per[b.name]["iops_per_cpu_second"] = med / max(statistics.median(cpu), 1e-9)
            ccpu = [r.client_cpu_util for r in runs
                    if r.workload == wl.name and r.backend == b.name and r.ok
                    and r.client_cpu_util is not None]
            if ccpu:
                per[b.name]["vublk_cpu_util_median"] = statistics.median(ccpu)
        summary["workloads"][wl.name] = per

    # the reference: per workload, the faster qsd variant (median IOPS)
    qsd_names = [b.name for b in backends if b.family == "qsd"]
    refs: dict[str, str] = {}
    for wl in workloads:
        per = summary["workloads"][wl.name]
        have = [n for n in qsd_names if n in per]
        if have:
            refs[wl.name] = max(have, key=lambda n: per[n]["iops_median"])
    summary["reference"] = refs
    if len(qsd_names) == 2:
        a, b = qsd_names  # threads, io_uring
        ratios = {w.name: summary["workloads"][w.name][b]["iops_median"] /
                  summary["workloads"][w.name][a]["iops_median"]
                  for w in workloads
                  if a in summary["workloads"][w.name] and b in summary["workloads"][w.name]}
        summary["qsd_io_uring_vs_threads"] = ratios
        if ratios:
            summary["qsd_io_uring_vs_threads_geomean"] = geomean(list(ratios.values()))

    for wl in workloads:
        per = summary["workloads"][wl.name]
        ref = refs.get(wl.name)
        if ref is None:
            continue
        for b in backends:
            if b.family == "qsd" or b.name not in per:
                continue
            per[b.name]["reference"] = ref
            per[b.name]["ratio_vs_reference"] = (
                per[b.name]["iops_median"] / per[ref]["iops_median"])
            # paired: the same round, adjacent in time
            pairs = []
            for r1 in runs:
                if r1.workload != wl.name or r1.backend != b.name or not r1.ok:
                    continue
                for r2 in runs:
                    if (r2.workload == wl.name and r2.backend == ref and r2.ok
                            and r2.round == r1.round):
                        pairs.append(r1.result["iops"] / r2.result["iops"])
            per[b.name]["paired_ratios"] = pairs
    return summary


def print_table(summary: dict, backends: list[Backend], workloads: list[Workload]) -> None:
    names = [b.name for b in backends
             if any(b.name in summary["workloads"][w.name] for w in workloads)]
    qsd = [b.name for b in backends if b.family == "qsd" and b.name in names]
    others = [n for n in names if n not in qsd]
    refs = summary.get("reference", {})
    both_qsd = len(qsd) == 2
    head = f"{'workload':<20}" + "".join(f" | {n:>25}" for n in names)
    if both_qsd:
        head += f" | {'io_uring/threads':>16}"
    for n in others:
        head += f" | {n + '/qsd':>10} {'(ref)':<13}"
    print()
    print(head)
    sub = f"{'':<20}" + "".join(f" | {'IOPS':>9} {'MB/s':>8} {'±%':>5} " for _ in names)
    if both_qsd:
        sub += f" | {'':>16}"
    sub += "".join(f" | {'IOPS':>10} {'':<13}" for _ in others)
    print(sub)
    print("-" * len(head))
    for wl in workloads:
        per = summary["workloads"][wl.name]
        ref = refs.get(wl.name)
        line = f"{wl.label:<20}"
        for n in names:
            if n in per:
                p = per[n]
                star = "*" if n == ref and others else " "
                line += f" | {p['iops_median']:>9.0f} {p['mbps_median']:>8.1f} " \
                        f"{p['spread_pct']:>5.1f}{star}"
            else:
                line += f" | {'failed':>25}"
        if both_qsd:
            r = summary.get("qsd_io_uring_vs_threads", {}).get(wl.name)
            line += f" | {r:>16.3f}" if r is not None else f" | {'-':>16}"
        for n in others:
            r = per.get(n, {}).get("ratio_vs_reference")
            reftxt = f"({ref})" if ref else ""
            line += f" | {r:>10.3f} {reftxt:<13}" if r is not None else \
                    f" | {'-':>10} {'':<13}"
        print(line)
    print()
    cpu_head = f"{'CPU':<20}" + "".join(f" | {n:>31}" for n in names)
    print(cpu_head)
    print(f"{'':<20}" + "".join(f" | {'cores':>9} {'IOPS/core-s':>12} {'vublk':>8}"
                                for _ in names))
    for wl in workloads:
        per = summary["workloads"][wl.name]
        line = f"{wl.label:<20}"
        for n in names:
            p = per.get(n, {})
            if "backend_cpu_util_median" in p:
                line += f" | {p['backend_cpu_util_median']:>9.2f} " \
                        f"{p['iops_per_cpu_second']:>12.0f} " \
                        f"{p.get('vublk_cpu_util_median', float('nan')):>8.2f}"
            else:
                line += f" | {'-':>31}"
        print(line)
    print()
    print("medians over rounds; ±% = (max-min)/median of IOPS; cores = back-end CPU "
          "seconds per second (a busy-polling back-end shows ~1.0); vublk = the same for "
          "the front-end (near 1.0: the front-end may be the limit, try --poll)"
          + ("; * = the qsd variant nitro is compared with" if others else ""))


# --------------------------------------------------------------------------


def _fstype(path: Path) -> str:
    """Filesystem type of `path` (from /proc/mounts, longest matching mount)."""
    best, fstype = "", "unknown"
    real = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) \
                        and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def host_info() -> dict:
    info: dict = {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "python": platform.python_version()}
    try:
        r = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                           text=True, timeout=10, check=False)
        info["qemu_storage_daemon"] = r.stdout.splitlines()[0] if r.stdout else None
    except (OSError, subprocess.TimeoutExpired):
        info["qemu_storage_daemon"] = None
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10, check=False)
        info["git"] = r.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["git"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.blk", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["qsd", "nitro", "both"], default="both")
    ap.add_argument("--runtime", type=float, default=10.0, help="seconds per run (default 10)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="A,B alternations per workload (default 2, minimum 2)")
    ap.add_argument("--qsd-aio", choices=["auto", "threads", "io_uring"], default="auto",
                    help="auto: run both and use the faster as the reference (default)")
    ap.add_argument("--workloads", default="",
                    help="comma-separated subset of: " + ", ".join(w.name for w in WORKLOADS) + " (default: all)")
    ap.add_argument("--image-size", type=int, default=1024, help="MiB (default 1024)")
    ap.add_argument("--image-dir", type=Path, default=None,
                    help="where the image goes (default build/bench; /dev/shm for tmpfs)")
    ap.add_argument("--poll", action="store_true",
                    help="vublk busy-polls the used ring (default: waits on the call fd, "
                         "like a guest)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (image, logs)")
    ap.add_argument("--out", type=Path, help="JSON results (default build/bench/blk-<ts>.json)")
    args = ap.parse_args(argv)

    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (alternate A,B,A,B)")
    if args.runtime <= 0:
        ap.error("--runtime must be positive")
    try:
        workloads = pick_workloads(args.workloads, WORKLOADS)
    except ValueError as e:
        ap.error(str(e))

    build_vublk()
    backends = make_backends(args.backend, args.qsd_aio)
    skipped = {b.name: b.unavailable for b in backends if b.unavailable}
    for name, why in skipped.items():
        print(f"bench.blk: skipping {name}: {why}", flush=True)
    backends = [b for b in backends if not b.unavailable]
    if not backends:
        print("bench.blk: no back-end to run", file=sys.stderr)
        return 1

    pin_b, pin_c, pin_note = ([], [], "not pinned (--no-pin)") if args.no_pin else pick_cpus()
    print(f"bench.blk: {pin_note}", flush=True)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = args.out or OUT_DIR / f"blk-{stamp}.json"
    workdir = Path(tempfile.mkdtemp(prefix="work-", dir=OUT_DIR))
    runs: list[Run] = []
    failures: list[str] = []
    image_dir = Path(tempfile.mkdtemp(prefix="img-", dir=args.image_dir)) \
        if args.image_dir else workdir
    image_fs = _fstype(image_dir)
    try:
        image = image_dir / "disk.img"
        create_image(image, args.image_size * MiB)
        print(f"bench.blk: image filesystem: {image_fs}", flush=True)

        # preflight: every back-end must serve a short run before the real ones
        for b in backends:
            if b.family == "nitro":
                err = nitro_config_check(image, workdir / f"{b.name}.sock")
                if err:
                    b.failed = f"config check failed: {err}"
            if not b.failed:
                r = run_one(b, WORKLOADS[0], -1, args, workdir, image, pin_b, pin_c, ios=20000)
                if not r.ok:
                    b.failed = f"preflight run failed: {r.error}"
            if b.failed:
                failures.append(f"{b.name}: {b.failed}")
                print(f"bench.blk: {b.name} FAILED: {b.failed}", file=sys.stderr, flush=True)
        active = [b for b in backends if not b.failed]

        total = len(workloads) * args.rounds * len(active)
        eta = total * (args.runtime + 0.5)
        print(f"bench.blk: {total} runs of {args.runtime:g} s "
              f"({', '.join(b.name for b in active)}), about {eta / 60:.1f} min", flush=True)
        n = 0
        for wl in workloads:
            for rnd in range(args.rounds):
                for b in active:
                    n += 1
                    r = run_one(b, wl, rnd, args, workdir, image, pin_b, pin_c)
                    runs.append(r)
                    if r.ok:
                        res = r.result
                        cpu = "" if r.backend_cpu_util is None else \
                            f" CPU back-end {r.backend_cpu_util:>4.2f}"
                        if r.client_cpu_util is not None:
                            cpu += f" vublk {r.client_cpu_util:>4.2f}"
                        print(f"[{n:>3}/{total}] {wl.label:<22} {b.name:<13} round {rnd + 1}: "
                              f"{res['iops']:>10.0f} IOPS {res['mbps']:>9.1f} MB/s "
                              f"p99 {res['lat_p99_us']:>8.1f} us{cpu}", flush=True)
                    else:
                        failures.append(f"{b.name} {wl.name} round {rnd + 1}: {r.error}")
                        print(f"[{n:>3}/{total}] {wl.label:<22} {b.name:<13} round {rnd + 1}: "
                              f"FAILED: {r.error}", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"bench.blk: kept {workdir} {image_dir if image_dir != workdir else ''}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            if image_dir != workdir:
                shutil.rmtree(image_dir, ignore_errors=True)

    summary = summarize(runs, backends, workloads)
    print_table(summary, backends, workloads)
    refs = summary.get("reference", {})
    if "qsd_io_uring_vs_threads_geomean" in summary:
        g = summary["qsd_io_uring_vs_threads_geomean"]
        print(f"qsd aio=io_uring vs aio=threads: geometric mean of IOPS ratios {g:.3f} "
              f"({'io_uring' if g > 1 else 'threads'} faster overall)")
    if refs:
        print("qsd reference per workload (faster variant): "
              + ", ".join(f"{w} -> {r}" for w, r in refs.items()))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")

    doc = {
        "timestamp": stamp,
        "host": host_info(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pinning": pin_note,
        "image_bytes": args.image_size * MiB,
        "image_note": "fully written raw image, in the host page cache",
        "image_filesystem": image_fs,
        "workloads": [w.__dict__ | {"label": w.label} for w in workloads],
        "backends": {b.name: {"description": b.description, "failed": b.failed}
                     for b in backends},
        "skipped": skipped,
        "reference": refs,
        "runs": [r.__dict__ for r in runs],
        "summary": summary,
        "failures": failures,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {out_path}")
    if failures:
        print(f"bench.blk: {len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
