"""bench.crypto's I/O summary: ratios against plain, CPU and front-end wake-ups per request."""

from __future__ import annotations

import math

from bench import crypto


def run(iops: float, calls: int, ios: int = 1000, util: float = 1.0) -> dict:
    # the fields bench.crypto keeps of one vublk run (its JSON line) and the back-end's CPU
    return {"iops": iops, "ios": ios, "calls": calls, "nitro_cpu_util": util}


def test_summary_gives_ratio_cpu_and_wakes_per_request(capsys):
    results = {"randread-4k": {
        "plain": [run(1000.0, 400), run(1200.0, 600)],
        "luks-4096": [run(700.0, 500), run(900.0, 700)],
    }}
    s = crypto._io_summary(results, "test")
    plain, luks = s["randread-4k/plain"], s["randread-4k/luks-4096"]
    assert plain["frontend_wakes_per_io"] == 0.5            # median of 0.4 and 0.6
    assert luks["frontend_wakes_per_io"] == 0.6
    assert luks["ratio"] == 800.0 / 1100.0
    assert luks["target"] == 0.90 and plain["target"] is None
    assert math.isclose(plain["nitro_cpu_us_per_io"], (1e6 / 1000 + 1e6 / 1200) / 2)
    out = capsys.readouterr().out
    assert "wakes/IO" in out and "MISSED" in out


def test_a_run_without_counts_has_no_wakes_figure():
    assert math.isnan(crypto._wakes_per_io({"iops": 5.0}))
    assert math.isnan(crypto._wakes_per_io({"iops": 5.0, "ios": 0, "calls": 3}))
