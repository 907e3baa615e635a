"""bench/net.py's ratios: per round, and at a bimodal frame size only over
the rounds where both backends ran in the same mode (field notes: the
1518 B loop has a fast and a slow mode ~2x apart for every backend)."""

from __future__ import annotations

import math

from bench.net import modes, round_order, same_mode_ratio


def test_modes_are_relative_to_the_backends_best_run() -> None:
    assert modes([2.0, 0.9, 1.9], 1518) == ["fast", "slow", "fast"]
    assert modes([1.0, 1.0], 1518) == ["fast", "fast"]
    assert modes([2.0, 0.9], 64) == ["-", "-"]  # 64 B is not bimodal: every round counts


def test_ratio_uses_only_rounds_in_the_same_mode() -> None:
    dpdk = [2.0, 1.0, 2.0]
    nitro = [1.8, 1.8, 0.8]  # round 2: nitro fast, dpdk slow; round 3 the other way
    assert same_mode_ratio(nitro, dpdk, 1518) == (0.9, 1)
    ratio, rounds = same_mode_ratio(nitro, dpdk, 64)
    assert rounds == 3 and math.isclose(ratio, 0.9)  # median of 0.9, 1.8, 0.4


def test_no_round_in_the_same_mode_is_nan() -> None:
    ratio, rounds = same_mode_ratio([1.0, 2.0], [2.0, 1.0], 1518)
    assert rounds == 0 and math.isnan(ratio)


def test_each_round_starts_one_backend_later() -> None:
    names = ["dpdk", "ovs-normal", "ovs-flows", "nitro"]
    orders = [round_order(names, r) for r in range(5)]
    assert orders[0] == names
    assert orders[1] == ["ovs-normal", "ovs-flows", "nitro", "dpdk"]
    assert orders[4] == names
    # Over len(names) rounds every backend runs in every position once.
    assert all(sorted(o[i] for o in orders[:4]) == sorted(names) for i in range(4))
