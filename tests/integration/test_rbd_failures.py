"""An RBD volume while its cluster fails: like EBS, latency, not errors,
until io_timeout (docs/volumes.md "RBD").

The cluster is bluestore (bench/ceph.py), so a killed OSD comes back with
its objects. vublk writes its verify pattern while the OSD is SIGKILLed
and restarted: every request waits for it (librbd resends) and succeeds,
the read-back and the cluster's own copy (`rbd export`) hold every block.
With the OSD gone for good and io_timeout = 3 s, requests fail with IOERR
about 3 s after they were sent, the daemon keeps serving (GET_ID, a new
frontend after one that left requests stuck in librbd, and I/O again once
the OSD is back), and it still stops cleanly while the cluster is away
(flush and close bounded by io_timeout).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ceph import CephCluster, ceph_cluster
from bench.proc import Nitro, free_port, run_cli
from tests.integration.test_nbd_volume import until_writing
from tests.integration.test_qos import metric
from tests.integration.test_vublk_reference import pattern, run_vublk

pytestmark = pytest.mark.integration

IMAGE_MIB = 64
REGION = 32 << 20
SEED = 11
IO_TIMEOUT = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[CephCluster]:
    with ceph_cluster(objectstore="bluestore", store_bytes=2 << 30) as c:
        yield c


def _config(c: CephCluster, image: str, io_timeout: float | None = None) -> str:
    return c.blk_config(image, extra=f"io_timeout = {io_timeout}\n" if io_timeout is not None else "")


def _vublk(vublk: Path, sock: Path, *args: str) -> tuple[int, dict | None, str]:
    return run_vublk(vublk, "--socket", str(sock), *args, timeout=300)


def test_osd_restart_under_writes_loses_nothing(cluster: CephCluster, vublk: Path,
                                                short_tmp_path: Path) -> None:
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/restart")
    with Nitro(short_tmp_path, _config(cluster, "restart")) as daemon:
        out: list[tuple[int, dict | None, str]] = []
        writer = threading.Thread(target=lambda: out.append(_vublk(
            vublk, short_tmp_path / "vol0.sock", "--rw", "verify", "--bs", "4k", "--iodepth", "32",
            "--size", str(REGION), "--seed", str(SEED), "--timeout", "120")))
        writer.start()
        # The kill must land on live I/O: a fixed sleep missed it once the
        # whole verify run (32 MiB written, read back) took under 1.5 s.
        until_writing(daemon, 64, device="vol0")
        killed = time.monotonic()
        cluster.stop_osd(kill=True)
        cluster.restart_osd()
        away = time.monotonic() - killed
        writer.join(300)
        (rc, res, err), = out
        assert rc == 0 and res is not None, err
        assert res["errors"] == 0 and res["mismatches"] == 0, res
        # The kill landed on live I/O: some request waited out the restart.
        assert res["lat_max_us"] > 1e6, (res, away)
        assert daemon.stop() == 0, daemon.output()
    data = cluster.rbd("export", f"{cluster.pool}/restart", "-")
    assert data[:REGION] == pattern(SEED, 0, REGION)


def test_osd_gone_fails_requests_after_io_timeout(cluster: CephCluster, vublk: Path,
                                                  short_tmp_path: Path) -> None:
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/gone")
    sock = short_tmp_path / "vol0.sock"
    with Nitro(short_tmp_path, _config(cluster, "gone", IO_TIMEOUT)) as daemon:
        cluster.stop_osd(kill=True)
        try:
            rc, res, err = _vublk(vublk, sock, "--rw", "randwrite", "--bs", "4k", "--iodepth", "8",
                                  "--ios", "8", "--timeout", "30")
            assert rc == 1 and res is not None, err
            assert res["errors"] == 8, res
            # Each failed once its io_timeout ran out, not before, not much later.
            assert IO_TIMEOUT * 0.95 <= res["seconds"] < IO_TIMEOUT + 2, res
            assert IO_TIMEOUT * 0.95e6 <= res["lat_max_us"] < (IO_TIMEOUT + 2) * 1e6, res
            # Counted as timeouts, which an operator can alert on.
            assert metric(daemon, "nitro_blk_timeouts_total", device="vol0") == 8
            assert metric(daemon, "nitro_blk_volume_info", device="vol0", backend="rbd",
                          volume=f"rbd:{cluster.pool}/gone", encrypted="false") == 1
            assert "remote:      timed out 8" in daemon.status()
            # The daemon goes on serving what needs no cluster.
            rc, res, err = _vublk(vublk, sock, "--check-id")
            assert rc == 0 and res is not None and res["id"] == "vol0", err
            # A frontend that gives up (vublk's 1 s timeout) leaves its
            # requests stuck in librbd: detaching its ring waits for them
            # at most until their deadline, then the next frontend is served.
            rc, res, err = _vublk(vublk, sock, "--rw", "randwrite", "--bs", "4k", "--iodepth", "8",
                                  "--ios", "8", "--timeout", "1")
            assert rc == 3, (rc, res, err)
            left = time.monotonic()
            rc, res, err = _vublk(vublk, sock, "--check-id", "--timeout", "30")
            assert rc == 0 and res is not None and res["id"] == "vol0", err
            assert time.monotonic() - left < IO_TIMEOUT + 3
            assert daemon.running()
        finally:
            cluster.restart_osd()
        # Back: the same daemon serves I/O again (the timed-out writes' slots
        # were replaced while librbd held them).
        rc, res, err = _vublk(vublk, sock, "--rw", "verify", "--bs", "64k", "--size", "4M",
                              "--seed", str(SEED), "--timeout", "60")
        assert rc == 0 and res is not None and res["errors"] == 0, err
        assert daemon.stop() == 0, daemon.output()
    assert cluster.rbd("export", f"{cluster.pool}/gone", "-")[:4 << 20] == pattern(SEED, 0, 4 << 20)


def test_daemon_stops_while_cluster_is_away(cluster: CephCluster, vublk: Path,
                                            short_tmp_path: Path) -> None:
    """Three volumes, each written, then the OSD gone: each flush waits
    for it. Side by side, bounded from the drain's start, the stop takes
    about one io_timeout; one after another it took three (9.4 s here;
    90 s with the default 30 s, past the unit's TimeoutStopSec)."""
    images = ["away0", "away1", "away2"]
    config = ""
    for i, image in enumerate(images):
        cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/{image}")
        config += _config(cluster, image, IO_TIMEOUT).replace("vol0", f"vol{i}") + "\n"
    with Nitro(short_tmp_path, config) as daemon:
        for i in range(len(images)):
            rc, res, err = _vublk(vublk, short_tmp_path / f"vol{i}.sock", "--rw", "verify-write",
                                  "--bs", "64k", "--size", "1M", "--timeout", "30")
            assert rc == 0, err
        cluster.stop_osd(kill=True)
        try:
            started = time.monotonic()
            assert daemon.stop(timeout=8 * IO_TIMEOUT) == 0, daemon.output()
            took = time.monotonic() - started
            # One io_timeout for the three flushes (3.1 s measured; one after
            # another, 3 s and the 1 s floor twice); the closes did not wait again.
            assert took < IO_TIMEOUT + 2, f"the stop took {took:.1f} s"
            assert daemon.output().count("cluster unreachable") == len(images), daemon.output()
        finally:
            cluster.restart_osd()


def test_daemon_stops_under_busy_frontends_while_cluster_is_away(
        cluster: CephCluster, vublk: Path, short_tmp_path: Path) -> None:
    """Two volumes of two queues each, a frontend writing to every queue
    when the OSD dies. A ring takes requests until its own detach starts
    (the frontend resends each one that failed), so rings taken back one
    after another waited io_timeout each in turn (12.6 s here); side by
    side, with no ring moved between workers meanwhile, the stop takes
    about one (4.0 s)."""
    config = ""
    for i in range(2):
        cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/busy{i}")
        entry = cluster.blk_config(f"busy{i}", extra=f"io_timeout = {IO_TIMEOUT}\nqueues = 2\n")
        config += entry.replace("vol0", f"vol{i}") + "\n"
    with Nitro(short_tmp_path, config) as daemon:
        writers = [subprocess.Popen([str(vublk), "--socket", str(short_tmp_path / f"vol{i}.sock"),
                                     "--rw", "randwrite", "--bs", "4k", "--iodepth", "8",
                                     "--queues", "2", "--runtime", "60", "--timeout", "60"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for i in range(2)]
        try:
            for i in range(2):
                _until(lambda i=i: metric(daemon, "nitro_blk_requests_total", device=f"vol{i}",
                                          op="out") >= 100)
            cluster.stop_osd(kill=True)
            time.sleep(0.5)
            started = time.monotonic()
            assert daemon.stop(timeout=8 * IO_TIMEOUT) == 0, daemon.output()
            took = time.monotonic() - started
            assert took < 1.5 * IO_TIMEOUT + 1, f"the stop took {took:.1f} s"
        finally:
            for w in writers:
                w.kill()
                w.wait()
            cluster.restart_osd()


def _until(ok, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def test_cluster_unreachable_at_start_waits_and_attaches(cluster: CephCluster, vublk: Path,
                                                         short_tmp_path: Path) -> None:
    """No monitor answers when the daemon starts (its ceph.conf names a dead
    address): the daemon starts anyway, the volume waits without a socket,
    and it attaches on a later attempt once the monitors answer (here: the
    operator fixes ceph.conf, re-read at each attempt)."""
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/late")
    conf = short_tmp_path / "ceph.conf"
    real = Path(cluster.conf).read_text()
    dead = free_port()
    conf.write_text("\n".join(f"mon host = [v2:127.0.0.1:{dead}]" if line.startswith("mon host") else line
                              for line in real.splitlines()) + "\n")
    config = _config(cluster, "late").replace(f'ceph_conf = "{cluster.conf}"', f'ceph_conf = "{conf}"')
    with Nitro(short_tmp_path, config, timeout=60) as daemon:
        sock = short_tmp_path / "vol0.sock"
        assert not sock.exists()
        assert "vol0  blk  WAITING for its remote source" in daemon.status()
        assert "Connection timed out" in daemon.status()
        # Limits set while it waits are the ones it opens with.
        r = run_cli("volume", "qos", "vol0", "--iops", "5000", "--control", daemon.control, timeout=30)
        assert r.returncode == 0, r.stderr
        conf.write_text(real)
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline, daemon.status()
            time.sleep(0.5)
        rc, res, err = _vublk(vublk, sock, "--rw", "verify", "--bs", "64k", "--size", "2M", "--timeout", "60")
        assert rc == 0 and res is not None and res["errors"] == 0, err
        assert "qos:         5000 IOPS" in daemon.status(), daemon.status()
        assert daemon.stop() == 0, daemon.output()


def test_osd_away_at_start_holds_neither_the_start_nor_the_image(cluster: CephCluster, vublk: Path,
                                                                 short_tmp_path: Path) -> None:
    """The monitors answer and the OSD is away: librbd's open waits for
    the OSD without bound. The daemon starts anyway once the start-up's
    30 s budget is spent (before, it never did), the volume waits; when
    the OSD is back, the open left behind closes its image again (its lock
    released) and the background retry attaches the volume."""
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/osdaway")
    cluster.stop_osd(kill=True)
    back = False
    try:
        with Nitro(short_tmp_path, _config(cluster, "osdaway"), timeout=90) as daemon:
            sock = short_tmp_path / "vol0.sock"
            status = daemon.status()
            assert "vol0  blk  WAITING for its remote source" in status, status
            assert "no answer within 30 s" in status, status
            cluster.restart_osd()
            back = True
            deadline = time.monotonic() + 120
            while not sock.exists():
                assert time.monotonic() < deadline, daemon.status()
                time.sleep(0.5)
            rc, res, err = _vublk(vublk, sock, "--rw", "verify", "--bs", "64k", "--size", "2M",
                                  "--timeout", "60")
            assert rc == 0 and res is not None and res["errors"] == 0, err
            assert daemon.stop() == 0, daemon.output()
    finally:
        if not back:
            cluster.restart_osd()
