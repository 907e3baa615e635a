"""The storage goes away under a writing guest and comes back: like EBS, the
guest sees latency, never an error, and every write it was told about is on
the storage afterwards (docs/volumes.md "Failures", "Failure behaviour").

The guest is test_blk_restart.py's writer (numbered 4 KiB blocks, O_DIRECT,
"ACK seq" after each). Here nitro stays up and the server dies instead:
nbdkit (file plugin: the data outlives it) is SIGKILLed and started again on
its port, or the Ceph OSD (bluestore: the objects outlive it) is SIGKILLed
and restarted. Each cycle waits until the guest is seen writing again
after the server came back, so every outage lands on a live writer. At the
end the storage must hold, at every position, the newest acknowledged
block.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Iterator

import pytest

from bench.ceph import CephCluster, ceph_cluster
from bench.nbd import NbdKit
from bench.proc import Nitro
from tests.system.test_blk_restart import (
    BLOCK,
    POSITIONS,
    WRITER,
    acked,
    assert_acked_writes_kept,
    wait_for_new_ack,
)

pytestmark = pytest.mark.system

CYCLES = 3
# Well under io_timeout: an outage this long must cost latency only.
IO_TIMEOUT = 60


def _outage_cycles(guest, n: Nitro, down, up, rng: random.Random) -> list[float]:
    """`down()` the storage at a random moment while the guest writes,
    keep it away a moment, `up()` it; the guest must write again each time.
    Returns the outage-to-next-write windows."""
    windows = []
    for _ in range(CYCLES):
        time.sleep(rng.uniform(0.2, 1.0))
        t0 = time.monotonic()
        down()
        last = max(acked(guest.output()), default=-1) + 1
        time.sleep(rng.uniform(0.5, 2.0))
        up()
        wait_for_new_ack(guest, last, timeout=120)
        windows.append(time.monotonic() - t0)
        assert n.running(), n.output()
    return windows


def _remote(n: Nitro) -> dict:
    return json.loads(n.status_json())["devices"][0]["remote"]


def test_nbdkit_killed_under_a_writing_guest_loses_nothing(short_tmp_path, guest_image, start_guest):
    rng = random.Random("nbd-outage")
    image = short_tmp_path / "export.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    servers = [NbdKit(short_tmp_path, ["file", str(image)])]
    port = servers[0].port
    config = (f'[[blk]]\nid = "vol0"\nsource = "nbd://127.0.0.1:{port}/"\n'
              f"io_timeout = {IO_TIMEOUT}\n")
    n = Nitro(short_tmp_path, config)
    guest = start_guest(guest_image, WRITER % {"positions": POSITIONS},
                        blk_sockets=[short_tmp_path / "vol0.sock"])
    try:
        wait_for_new_ack(guest, -1, timeout=180)
        windows = _outage_cycles(
            guest, n, lambda: servers[-1].kill(),
            lambda: servers.append(NbdKit(short_tmp_path, ["file", str(image)], port=port)), rng)
        remote = _remote(n)
        guest.kill()
        assert n.stop() == 0, n.output()
    finally:
        n.kill()
        guest.kill()
        for s in servers:
            s.kill()
    assert remote["connects"] >= CYCLES + 1 and remote["timeouts"] == 0, remote
    acks = assert_acked_writes_kept(guest.output(), image.read_bytes()[:POSITIONS * BLOCK], len(windows))
    print(f"\nnbd outages: {len(windows)}, {len(acks)} acknowledged writes, outage-to-next-write "
          f"max {max(windows):.2f}s, requests resent {remote['resent']}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[CephCluster]:
    with ceph_cluster(objectstore="bluestore", store_bytes=2 << 30) as c:
        yield c


def test_osd_killed_under_a_writing_guest_loses_nothing(cluster, short_tmp_path, guest_image, start_guest):
    rng = random.Random("osd-outage")
    cluster.rbd("create", "--size", "64M", f"{cluster.pool}/outage")
    n = Nitro(short_tmp_path, cluster.blk_config("outage", extra=f"io_timeout = {IO_TIMEOUT}\n"), timeout=60)
    guest = start_guest(guest_image, WRITER % {"positions": POSITIONS},
                        blk_sockets=[short_tmp_path / "vol0.sock"])
    try:
        wait_for_new_ack(guest, -1, timeout=180)
        windows = _outage_cycles(guest, n, lambda: cluster.stop_osd(kill=True), cluster.restart_osd, rng)
        guest.kill()
        assert n.stop() == 0, n.output()
    finally:
        n.kill()
        guest.kill()
    image = cluster.rbd("export", f"{cluster.pool}/outage", "-")[:POSITIONS * BLOCK]
    acks = assert_acked_writes_kept(guest.output(), image, len(windows))
    print(f"\nosd outages: {len(windows)}, {len(acks)} acknowledged writes, outage-to-next-write "
          f"max {max(windows):.2f}s")
