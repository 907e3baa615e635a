"""The throwaway Ceph cluster of bench/ceph.py works here and cleans up.

One mon, one mgr and one OSD as children of the test: an RBD image written
with `rbd import` reads back the same through `rbd export`; the cluster
starts within the bound the RBD tests rely on and fits a CI machine; once
the context exits, no daemon of it is left and its directory is gone. With
bluestore, the data survives the OSD being SIGKILLed and restarted (what
the remote-failure tests do to it).

Measured here (2 cores, quiet): memstore ready in 5-6 s with ~240 MB RSS
for the three daemons; bluestore in ~10 s.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench.ceph import CephCluster, ceph_cluster

pytestmark = pytest.mark.integration

# Bounds, not figures: a loaded 2-core machine is several times slower.
START_SECONDS = 45
RSS_BYTES = 1 << 30


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _processes_naming(text: str) -> list[int]:
    """PIDs whose command line contains `text` (the cluster's conf path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # exited meanwhile
            if text.encode() in cmdline:
                found.append(int(entry.name))
    return found


def _roundtrip(cluster: CephCluster, tmp_path: Path, image: str, data: bytes) -> bytes:
    """Write `data` as a new image with `rbd import`; what `rbd export` reads."""
    src = tmp_path / f"{image}.in"
    src.write_bytes(data)
    cluster.rbd("import", str(src), f"{cluster.pool}/{image}")
    return cluster.rbd("export", f"{cluster.pool}/{image}", "-")


def test_cluster_serves_rbd_and_leaves_nothing_behind(tmp_path: Path) -> None:
    started = time.monotonic()
    with ceph_cluster() as cluster:
        assert time.monotonic() - started < START_SECONDS
        pids = cluster.pids()
        assert set(pids) == {"mon", "mgr", "osd"}
        assert sum(map(_rss, pids.values())) < RSS_BYTES
        status = cluster.ceph_json("status")
        assert isinstance(status, dict)
        assert status["osdmap"]["num_up_osds"] == status["osdmap"]["num_in_osds"] == 1
        assert status["mgrmap"]["available"]
        data = os.urandom(8 << 20)
        assert _roundtrip(cluster, tmp_path, "img", data) == data
        conf, tmp = str(cluster.conf), cluster.tmp
    assert not _processes_naming(conf)
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists()
    assert not tmp.exists()


def test_bluestore_keeps_data_across_an_osd_kill(tmp_path: Path) -> None:
    with ceph_cluster(objectstore="bluestore", mgr=False) as cluster:
        data = os.urandom(4 << 20)
        assert _roundtrip(cluster, tmp_path, "img", data) == data
        killed = cluster.pids()["osd"]
        cluster.stop_osd(kill=True)
        cluster.restart_osd()
        assert cluster.pids()["osd"] != killed
        assert cluster.rbd("export", f"{cluster.pool}/img", "-") == data
