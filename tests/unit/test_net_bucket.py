"""The switch's token bucket (cffi_build/nitro_bucket.c) driven with chosen
clock values, which the Switch API cannot do, plus a 1e12 B/s limit through
the switch. The bucket is internal C, so a small driver is compiled against
it with the system C compiler (the one that builds the extension)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.unit.test_net_switch import Net, icmp

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "cffi_build"
MAX_RATE = 10**12  # config.MAX_RATE: the largest limit a config may set

# Each line: rate, tokens before, dt (ns), n -> "ok tokens_after".
DRIVER = r"""
#include <inttypes.h>
#include <stdio.h>
#include "nitro_bucket.h"

int main(void)
{
    uint64_t rate, dt, n;
    int64_t tokens;
    while (scanf("%" SCNu64 " %" SCNd64 " %" SCNu64 " %" SCNu64,
                 &rate, &tokens, &dt, &n) == 4) {
        struct nitro_bucket b;
        nitro_bucket_init(&b, rate, 1514);
        b.tokens = tokens;
        b.last_ns = 1000;
        int ok = nitro_bucket_take(&b, n, 1000 + dt);
        printf("%d %" PRId64 "\n", ok, b.tokens);
    }
    return 0;
}
"""


def take(tmp_path: Path, cases: list[tuple[int, int, int, int]]) -> list[tuple[bool, int]]:
    src = tmp_path / "bucket_driver.c"
    src.write_text(DRIVER)
    exe = tmp_path / "bucket_driver"
    subprocess.run([os.environ.get("CC", "cc"), "-std=gnu11", "-O1", "-Wall", "-Werror", f"-I{SRC}",
                    str(src), str(SRC / "nitro_bucket.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], input="".join(f"{' '.join(map(str, c))}\n" for c in cases),
                         capture_output=True, text=True, check=True).stdout
    return [(ok == "1", int(tokens)) for ok, tokens in (line.split() for line in out.splitlines())]


def test_refill_at_1e12_per_second_does_not_overflow(tmp_path):
    """dt * rate passed 2**64 above ~1.8e10 units/s: 50 ms at 1e12 B/s is
    5e10 bytes, but the 64-bit product wrapped to ~1.3e10."""
    burst = MAX_RATE // 10
    got = take(tmp_path, [
        (MAX_RATE, 0, 50_000_000, 20 * 10**9),      # 50 ms refills 5e10
        (MAX_RATE, 0, 1_000_000_000, burst),         # a second refills it all
        (MAX_RATE, 0, 5_000_000_000, burst),         # a long gap: full, no more
        (MAX_RATE, -10**5, 1_000, 10**6 - 10**5),    # 1 us: 1e6, debt paid first
        (MAX_RATE, 0, 1_000, 10**6 + 1),              # 1 us is not enough for more
        (2**64 - 1, 0, 1_000_000_000, 2**62),        # any u64 rate; more than the burst: debt
    ])
    assert got == [
        (True, 5 * 10**10 - 20 * 10**9),
        (True, 0),
        (True, 0),
        (True, 0),
        (False, 10**6),
        (True, (2**64 - 1) // 10 - 2**62),
    ]


def test_slow_rates_refill_as_before(tmp_path):
    got = take(tmp_path, [(10, 0, 100_000_000, 1), (10, 0, 99_999_999, 1), (20_000, 0, 10**9, 1514)])
    assert got == [(True, 0), (False, 0), (True, 2000 - 1514)]


def test_a_1e12_byte_and_packet_limit_lets_traffic_through():
    n = Net(bw_in=MAX_RATE, bw_out=MAX_RATE, pps=MAX_RATE)
    try:
        n.attach_rx(1, bufs=64)
        for _ in range(50):
            assert n.send(icmp(size=1000)) == 1
        s = n.sw.port_stats(0)
        assert s["packets_out"] == 50 and s["pps_allowance_exceeded"] == 0
        assert s["bw_out_allowance_exceeded"] == 0
        assert n.sw.port_stats(1)["packets_in"] == 50
    finally:
        n.close()
