"""Fuzzing in the normal test suite (docs/reliability.md "Fuzzing").

- The seed corpus is what seeds.py / vhost_target.py / netseeds.py
  generate, and every
  ring and vhost seed reaches the guest- or frontend-triggerable state it
  is named for (replayed through the Python API, not just fed to a
  fuzzer); net seeds are only fed to the fuzzer (short run below).
- Every regression file replays cleanly through the Python API.
- A short fuzz run per target (fixed seed, seed corpus + regressions)
  finds no crash. These need clang and libFuzzer (tools/install-deps.sh);
  without them they fail rather than skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.fuzz import netseeds
from tests.fuzz import run as fuzz_run
from tests.fuzz import seeds as ring_seeds
from tests.fuzz.ringfmt import replay
from tests.fuzz.vhost_target import _seeds as vhost_seeds
from tests.fuzz.vhost_target import run_one

HERE = fuzz_run.HERE
SHORT_SECONDS = int(os.environ.get("NITRO_FUZZ_SHORT_SECONDS", "12"))


@pytest.fixture(scope="module")
def disk_fd():
    fd = os.memfd_create("fuzz-disk", os.MFD_CLOEXEC)
    os.ftruncate(fd, 128 * 512)
    yield fd
    os.close(fd)


# -- the corpus in the repo is the generated one ---------------------------------------
def test_ring_corpus_matches_seeds_py():
    want = {f"seed-{n}": d for n, d in ring_seeds.build().items()}
    for target in ("vring", "blk"):
        have = {p.name: p.read_bytes() for p in (HERE / "corpus" / target).glob("seed-*")}
        assert have == want, "run: python -m tests.fuzz.seeds"


def test_net_corpus_matches_netseeds_py():
    want = {f"seed-{n}": d for n, d in netseeds.build().items()}
    have = {p.name: p.read_bytes() for p in (HERE / "corpus" / "net").glob("seed-*")}
    assert have == want, "run: python -m tests.fuzz.netseeds"
    assert all(len(d) <= fuzz_run.MAX_LEN for d in want.values())  # or libFuzzer cuts them


def test_vhost_corpus_matches_vhost_target():
    want = {f"seed-{n}": d for n, d in vhost_seeds().items()}
    have = {p.name: p.read_bytes() for p in (HERE / "corpus" / "vhost").glob("seed-*")}
    assert have == want, "run: python -m tests.fuzz.vhost_target"


# -- each seed reaches its state ------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ring_seeds.SEEDS))
def test_ring_seed_reaches_its_state(name):
    make, expected = ring_seeds.SEEDS[name]
    out = replay(make().encode())
    assert out.guards_intact, "C wrote outside guest memory"
    if expected is ring_seeds.REFUSED:
        assert (out.fault, out.served) == (None, 0) and out.serve_errors, out
    elif expected is not ring_seeds.ANY:
        assert out.fault == expected, out


def test_ring_seeds_that_complete_requests_do(name="blk-mixed"):
    assert replay(ring_seeds.SEEDS[name][0]().encode()).served == 5
    out = replay(ring_seeds.SEEDS["set-mem-between-serves"][0]().encode())
    assert out.served >= 2, out  # served before and after a table swap
    out = replay(ring_seeds.SEEDS["inflight-resubmit"][0]().encode())
    assert out.served == 2 and out.fault is None, out  # the second one resubmitted
    for packed in ("packed-requests-over-laps", "packed-inflight"):
        out = replay(ring_seeds.SEEDS[packed][0]().encode())
        assert out.served == 2 and out.fault is None, out  # a packed ring, wrapping


VHOST_EXPECT = {
    "qemu-start-set-mem-table": ([(True, None)] * 2, 2, None),
    "qemu-start-add-mem-reg": ([(True, None)] * 2, 2, None),
    "set-mem-table-while-running": ([(True, None)] * 2, 1, None),
    # removing the region the rings are in drops their addresses
    "rem-mem-reg-while-running": ([(False, None)] * 2, 1, None),
    "reset-and-restart": ([(False, "avail_idx")] * 2, 2, None),
    "split-reads": ([(True, None)] * 2, 2, None),
    "garbage": ([(False, None)] * 2, 0, "unknown request 999"),
    "eof-mid-message": ([(False, None)] * 2, 0, "connection closed in the middle"),
}


@pytest.mark.parametrize("name", sorted(VHOST_EXPECT))
def test_vhost_seed_reaches_its_state(name, disk_fd):
    vrings, regions, error = VHOST_EXPECT[name]
    got = run_one(vhost_seeds()[name], disk_fd)
    assert got["vrings"] == vrings and got["regions"] == regions, got
    assert (got["error"] is None) if error is None else error in got["error"], got


# -- regressions replay through the Python API ---------------------------------------------
def _regressions(target):
    d = HERE / "regressions" / target
    return sorted(d.iterdir()) if d.is_dir() else []


def test_ring_regressions_replay():
    for path in _regressions("vring") + _regressions("blk"):
        assert replay(path.read_bytes()).guards_intact, path


def test_vhost_regressions_replay(disk_fd):
    for path in _regressions("vhost"):
        run_one(path.read_bytes(), disk_fd)


# -- short fuzz runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzzers():
    clang = shutil.which("clang-14") or shutil.which("clang")
    assert clang, "clang is missing: run tools/install-deps.sh (make deps)"
    fuzz_run.build()
    return fuzz_run.BUILD


def test_net_inputs_replay_through_the_fuzzer(fuzzers):
    """The net target has no Python replay: every seed and regression runs
    once through the fuzzer binary itself (each must end without a report)."""
    files = sorted(p for d in ("corpus", "regressions")
                   for p in (HERE / d / "net").glob("*") if p.is_file())
    assert files
    # Not gcc's libasan: tools/build-sanitized.sh preloads it for Python, and
    # the fuzzer carries clang's own runtime.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.run([str(fuzzers / "fuzz_net"), *map(str, files)],
                          capture_output=True, text=True, cwd=fuzzers, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _net_stats(fuzzers, files) -> dict[str, dict[str, int]]:
    """Run the net fuzzer once over files with FUZZ_NET_STATS=1: per file,
    the harness's counters (its "harness k=v ..." line)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"FUZZ_NET_STATS": "1"}
    proc = subprocess.run([str(fuzzers / "fuzz_net"), *map(str, files)],
                          capture_output=True, text=True, cwd=fuzzers, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats, last = {}, None
    for line in proc.stderr.splitlines():
        if line.startswith("harness "):
            last = {k: int(v) for k, v in (t.split("=") for t in line.split()[1:])}
            last["faults"] = sum(v for k, v in last.items() if k.startswith("fault_"))
        elif line.startswith("Executed ") and last is not None:
            stats[line.split()[1].rsplit("/", 1)[1]] = last
            last = None
    return stats


def test_net_seeds_reach_their_paths(fuzzers):
    """Each uplink, inject, queue-pair and hostile-ring seed does what it is
    named for (frames read back per source, faults by kind, refusals)."""
    names = sorted(netseeds.EXPECT)
    stats = _net_stats(fuzzers, [HERE / "corpus" / "net" / f"seed-{n}" for n in names])
    for name in names:
        got = stats[f"seed-{name}"]
        want = netseeds.EXPECT[name]
        assert {k: got[k] for k in want} == want, (name, got)


def test_every_net_op_is_in_a_seed(fuzzers):
    stats = _net_stats(fuzzers, sorted((HERE / "corpus" / "net").glob("seed-*")))
    ops = [k for k in next(iter(stats.values())) if k.startswith("op_")]
    assert len(ops) == 14
    assert [op for op in ops if not any(s[op] for s in stats.values())] == []


@pytest.mark.parametrize("target", fuzz_run.TARGETS)
def test_short_fuzz_run_finds_nothing(target, fuzzers):
    if target == "vhost":
        proc = subprocess.run([sys.executable, "-c", "import atheris"], capture_output=True)
        assert proc.returncode == 0, "atheris is missing: pip install -e '.[test]'"
    result = fuzz_run.run(target, [f"-max_total_time={SHORT_SECONDS}"], seed=1)
    assert result.cases > 0, result.line()
    assert result.ok, result.line() + "\n" + result.log.read_text(errors="replace")[-4000:]
