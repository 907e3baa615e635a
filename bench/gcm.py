"""Encryption in transit: nitro's ESP/AES-256-GCM encapsulation vs OpenSSL.

    python -m bench.gcm [--seconds 3] [--rounds 3]

Issue 12's first benchmark target: nitro's C encapsulation
(nitro_tunnel_encap: outer IPv4, ESP header and IV, UDP and Geneve, the
frame encrypted from where it lies, ESP trailer, ICV; batches of 64
frames of 1500 bytes, one SA) against `openssl speed -evp aes-256-gcm
-bytes 1500`, both pinned to the same CPU, alternated in every round,
medians. Both are bytes per CPU second; nitro counts only the inner frame's
1500 bytes (it encrypts 18-21 more per packet and writes the headers).
Target: nitro >= 0.85 of openssl. The plain Geneve encapsulation (`encrypt
= false`: headers and a copy) is printed for comparison.

Machines here have slow periods: read the ratios of medians (and the
median of the per-round ratios), not absolutes.
Results: stdout and build/bench/gcm-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.blk import REPO
from bench.crypto import openssl_speed, run_series, save_report

FRAME = 1500
BATCH = 64


def nitro_encap_speed(cpu: int, seconds: float, encrypt: bool = True) -> float:
    """Inner-frame bytes per CPU second through nitro_tunnel_encap, in a
    child pinned to `cpu` (CPU time, as `openssl speed` divides by)."""
    code = f"""
import os, time
from nitro import _datapath as dp
r, w = os.pipe(); os.write(w, os.urandom(dp.TUNNEL_KEYMAT_LEN)); os.close(w)
key = dp.Secret(dp.TUNNEL_KEYMAT_LEN); key.read_fd(r, False); os.close(r)
t = dp.Tunnel(bytes([10, 0, 0, 1]), 9000, {encrypt})
t.set_peer(0, bytes([10, 0, 0, 2]))
t.set_outbound(0, key, 0x100, 0); key.close()
batch = dp.TunnelBatch({BATCH}, 9000)
batch.set_frames([os.urandom({FRAME}) for _ in range({BATCH})])
n, t0 = 0, time.thread_time()
while time.thread_time() - t0 < {seconds}:
    if t.encap_batch(0, 1, batch, {BATCH}) != {BATCH}:
        raise SystemExit("a frame was dropped")
    n += {BATCH} * {FRAME}
print(n / (time.thread_time() - t0))
"""
    r = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-c", code],
                       capture_output=True, text=True, check=True, cwd=REPO)
    return float(r.stdout.strip())


SERIES = [
    ("openssl-1500", lambda cpu, sec: openssl_speed(cpu, sec, FRAME, "aes-256-gcm")),
    ("nitro-esp-1500", lambda cpu, sec: nitro_encap_speed(cpu, sec)),
    ("nitro-plain-1500", lambda cpu, sec: nitro_encap_speed(cpu, sec, encrypt=False)),
]
RATIOS = [
    ("nitro ESP encap / openssl gcm", "nitro-esp-1500", "openssl-1500", 0.85),
    ("nitro ESP / plain Geneve encap", "nitro-esp-1500", "nitro-plain-1500", None),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=3, help="per measurement (openssl takes whole seconds)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    save_report("gcm", {"gcm": run_series("AES-256-GCM at 1500 B", SERIES, RATIOS, args.rounds,
                                          args.seconds)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
