"""nitro dies (SIGKILL) again and again under a guest writing to an RBD
volume and comes back; every write the guest was told about is on the
cluster afterwards.

The same soak as test_blk_restart.py (its writer, oracle and helpers), on
`source = "rbd:..."` instead of a local file: the guest writes numbered
4 KiB blocks with O_DIRECT and prints "ACK seq" after each; nitro is killed
at random moments while it writes. What a dead nitro had taken off the
ring comes back from QEMU's inflight buffer and is sent to librbd again by
the next one (INFLIGHT_SHMFD). A write is acknowledged only once the OSD
has it (librbd's cache is off), so nothing acknowledged can die with the
process; the cluster's copy (`rbd export`) must hold, at every position,
the newest acknowledged block. Each restarted nitro takes the image's
exclusive lock over from its dead predecessor at once (the owner recorded
in the state directory), not after the dead client's watch expires: the
test bounds the kill-to-next-write window well below that 30 s.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from bench.ceph import CephCluster, ceph_cluster
from tests.system.test_blk_restart import BLOCK, POSITIONS, assert_acked_writes_kept, kill_soak

pytestmark = pytest.mark.system

CYCLES = int(os.environ.get("NITRO_RBD_SOAK_CYCLES", "6"))
# Well below the 30 s librbd waits for a dead lock owner's watch to expire.
MAX_WINDOW_S = 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[CephCluster]:
    with ceph_cluster() as c:
        yield c


def test_acknowledged_rbd_writes_survive_kill_cycles(cluster, short_tmp_path, guest_image, start_guest):
    rng = random.Random("rbd-soak")
    cluster.rbd("create", "--size", "64M", f"{cluster.pool}/soak")
    output, windows, resubmitted = kill_soak(short_tmp_path, cluster.blk_config("soak"), guest_image,
                                             start_guest, CYCLES, rng)
    image = cluster.rbd("export", f"{cluster.pool}/soak", "-")[:POSITIONS * BLOCK]
    acks = assert_acked_writes_kept(output, image, len(windows))
    assert max(windows) < MAX_WINDOW_S, windows
    print(f"\nrbd soak: {len(windows)} kills, {len(acks)} acknowledged writes, kill-to-next-write "
          f"max {max(windows):.2f}s, resubmitted from the inflight buffer: {sum(resubmitted)}")
