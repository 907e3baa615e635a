"""nitro dies (SIGKILL) again and again under a guest writing to an NBD
volume and comes back; every write the guest was told about is in the
export afterwards.

The soak of test_blk_restart.py (its writer, oracle and helpers) on
`source = "nbd://..."`: nbdkit's file plugin serves a file the test reads
at the end, through the delay filter, which holds each write 150 ms on the
server. A write is acknowledged to the guest only once nbdkit answered it,
and with the writer mostly waiting for that answer, a kill at a random
moment almost always lands while nitro has a write in flight: the next
nitro must resubmit it from QEMU's inflight buffer (INFLIGHT_SHMFD) over
its own new connection. The test requires that this happened at least once
(the chance that none of the kills found a write in flight is about 0.3^6),
and that the export holds, at every position, the newest acknowledged
block. nbdkit itself keeps running: what a dead client had sent is written
or not, and written again by the resubmission either way (writes are
idempotent; the guest does not write a position again before it got the
ack).
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from bench.nbd import NbdKit
from tests.system.test_blk_restart import BLOCK, POSITIONS, assert_acked_writes_kept, kill_soak

pytestmark = pytest.mark.system

CYCLES = int(os.environ.get("NITRO_NBD_SOAK_CYCLES", "6"))
WRITE_DELAY = "150ms"  # on the server: the guest's write is in flight most of the time
MAX_WINDOW_S = 20  # kill to the guest's next acknowledged write


def test_acknowledged_nbd_writes_survive_kill_cycles(short_tmp_path, guest_image, start_guest):
    rng = random.Random("nbd-soak")
    export = short_tmp_path / "export.img"
    subprocess.run(["truncate", "-s", "16M", str(export)], check=True)
    server = NbdKit(short_tmp_path, ["--filter=delay", "file", str(export), f"delay-write={WRITE_DELAY}"])
    config = f'[[blk]]\nid = "vol0"\nsource = "{server.url()}"\nio_timeout = 60\n'
    try:
        output, windows, resubmitted = kill_soak(short_tmp_path, config, guest_image, start_guest, CYCLES, rng)
    finally:
        server.stop()
    acks = assert_acked_writes_kept(output, export.read_bytes()[:POSITIONS * BLOCK], len(windows))
    assert max(windows) < MAX_WINDOW_S, windows
    assert sum(resubmitted) >= 1, f"no kill landed on a write in flight: {resubmitted}"
    print(f"\nnbd soak: {len(windows)} kills, {len(acks)} acknowledged writes, kill-to-next-write "
          f"max {max(windows):.2f}s, resubmitted from the inflight buffer: {sum(resubmitted)} "
          f"(by {sum(1 for r in resubmitted if r)} of {len(resubmitted)} daemons)")
