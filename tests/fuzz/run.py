"""Run the fuzz targets: ``make fuzz`` (long) and the short runs in test_fuzz.py.

    python tests/fuzz/run.py [--runs N | --seconds S] [--seed N] [target ...]

Targets: vring, blk, net (libFuzzer binaries built by tests/fuzz/Makefile
into build/fuzz/) and vhost (atheris, tests/fuzz/fuzz_vhost.py). Each run starts
from tests/fuzz/corpus/<target>/ plus tests/fuzz/regressions/<target>/ and
keeps what it finds in build/fuzz/work/<target>/ (the repo corpus is never
written). Crashes land in build/fuzz/artifacts/ as <target>-crash-<sha1>;
copy one to tests/fuzz/regressions/<target>/ and add a unit test.
Exit status 1 if any target failed; a summary line per target is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD = ROOT / "build" / "fuzz"
TARGETS = ("vring", "blk", "vhost", "net")
MAX_LEN = 8192


@dataclass
class Result:
    target: str
    ok: bool
    cases: int
    seconds: float
    crashes: list[str]
    log: Path

    def line(self) -> str:
        state = "ok" if self.ok else "FAILED"
        crashes = ", ".join(self.crashes) or "none"
        return (f"fuzz {self.target}: {state}: {self.cases} cases in {self.seconds:.0f} s; "
                f"crashes: {crashes}; log {self.log}")


def build() -> None:
    subprocess.run(["make", "-s", "-C", str(HERE), f"OUT={BUILD}"], check=True)


def command(target: str, work: Path, limit: list[str], seed: int) -> list[str]:
    corpora = [str(work), str(HERE / "corpus" / target)]
    regress = HERE / "regressions" / target
    if regress.is_dir():
        corpora.append(str(regress))
    flags = [*limit, f"-seed={seed}", "-timeout=10", f"-max_len={MAX_LEN}",
             "-print_final_stats=1", f"-artifact_prefix={BUILD / 'artifacts'}/{target}-"]
    if target == "vhost":
        return [sys.executable, str(HERE / "fuzz_vhost.py"), *corpora, *flags]
    return [str(BUILD / f"fuzz_{target}"), *corpora, *flags]


def run(target: str, limit: list[str], seed: int) -> Result:
    work = BUILD / "work" / target
    work.mkdir(parents=True, exist_ok=True)
    (BUILD / "artifacts").mkdir(parents=True, exist_ok=True)
    log = BUILD / f"{target}.log"
    before = set((BUILD / "artifacts").glob(f"{target}-*"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.run(command(target, work, limit, seed), stdout=out,
                            stderr=subprocess.STDOUT, cwd=BUILD, env=env).returncode
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    cases = int(m[-1]) if m else 0
    if not m:  # atheris prints libFuzzer's "Done N runs" line
        done = re.findall(r"Done (\d+) (?:runs|in)", text)  # "Done N runs" / "Done N in S second(s)"
        cases = int(done[-1]) if done else 0
    crashes = sorted(p.name for p in set((BUILD / "artifacts").glob(f"{target}-*")) - before)
    return Result(target, rc == 0 and not crashes, cases, seconds, crashes, log)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--runs", type=int, help="cases per target")
    group.add_argument("--seconds", type=int, help="time per target")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("targets", nargs="*", default=list(TARGETS))
    args = ap.parse_args(argv)
    limit = ([f"-runs={args.runs}"] if args.runs else
             [f"-max_total_time={args.seconds or 15}"])
    if args.runs and "vhost" in args.targets:
        limit_vhost = [f"-atheris_runs={args.runs + 1}"]
    else:
        limit_vhost = limit
    build()
    failed = False
    for target in args.targets:
        r = run(target, limit_vhost if target == "vhost" else limit, args.seed)
        print(r.line(), flush=True)
        failed |= not r.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
