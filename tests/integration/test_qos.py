"""Volume QoS on the real daemon, driven by vublk: a limited volume delays
requests and never fails them (the throttled-seconds counter moves), and its
limits change live, by `nitro volume qos` and by `nitro reload`, while the
frontend stays connected. Counts only: never how fast the machine is,
except the one bound the limit guarantees (never more than it allows)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bench.proc import Nitro, run_cli
from tests.integration.test_reload import finish_io

pytestmark = pytest.mark.integration

VOL0 = '[[blk]]\nid = "vol0"\nsize = "64M"\nqueues = 2\n'


def qos_line(qos: str) -> str:
    return VOL0 + f"qos = {{ {qos} }}\n"


def metric(n: Nitro, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in n.metrics().splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    raise AssertionError(f"no {name}{{{want}}} in the metrics")


def reads(vublk: Path, sock: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(vublk), "--socket", str(sock), "--rw", "randread", "--bs", "4096",
                             "--iodepth", "16", "--queues", "2", "--size", "16m", "--timeout", "30", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    res = finish_io(proc)
    assert res["errors"] == 0 and res["len_mismatch"] == 0, res
    return res


def volume_qos(n: Nitro, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("volume", "qos", "vol0", *args, "--control", n.control, timeout=30)


def test_a_limited_volume_is_delayed_not_failed(nitro, short_tmp_path, vublk):
    n = nitro(qos_line("iops = 200"))
    sock = short_tmp_path / "vol0.sock"
    res = finish(reads(vublk, sock, "--ios", "400"))
    assert res["ios"] == 400
    # The limit's guarantee: at most the 20 of the bucket plus 200 a second.
    assert res["ios"] <= 20 + 200 * res["seconds"] + 2, res
    assert metric(n, "nitro_blk_qos_exceeded_iops_seconds_total", device="vol0") > 0
    assert metric(n, "nitro_blk_qos_exceeded_throughput_seconds_total", device="vol0") == 0
    assert metric(n, "nitro_blk_qos_delayed_requests_total", device="vol0") >= 400 - 20 - 2 * 16
    assert metric(n, "nitro_blk_qos_queue_length", device="vol0") == 0
    assert metric(n, "nitro_blk_request_errors_total", device="vol0", op="in") == 0
    assert metric(n, "nitro_blk_request_duration_seconds_count", device="vol0", op="in") == 400
    assert metric(n, "nitro_blk_qos_limit", device="vol0", limit="iops") == 200


def test_volume_qos_command_and_reload_change_limits_live(nitro, short_tmp_path, vublk):
    n = nitro(qos_line("iops = 100"))
    sock = short_tmp_path / "vol0.sock"
    # One frontend for the whole test: it must never see an error or a reconnect.
    io = reads(vublk, sock, "--runtime", "12")
    try:
        r = volume_qos(n, "--iops", "300", "--throughput", "2M")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "vol0: iops=300 throughput=2000000 burst_iops=0 burst_seconds=0"
        assert metric(n, "nitro_blk_qos_limit", device="vol0", limit="iops") == 300
        # Options not given stay; bad values change nothing.
        r = volume_qos(n, "--burst-iops", "200", "--burst-seconds", "5")
        assert r.returncode == 1 and "above iops (300)" in r.stderr, r.stderr
        r = run_cli("volume", "qos", "nope", "--iops", "1", "--control", n.control)
        assert r.returncode == 1 and "no [[blk]] device 'nope'" in r.stderr, r.stderr
        r = volume_qos(n, "--burst-iops", "600", "--burst-seconds", "5", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["qos"] == {"iops": 300, "throughput": 2_000_000, "burst_iops": 600,
                                               "burst_seconds": 5}
        assert metric(n, "nitro_blk_qos_burst_credits_max", device="vol0") == 300 * 5

        # The file still says 100: a reload puts it back, live.
        r = n.reload()
        assert r.returncode == 0, r.stderr
        assert "qos changed: vol0" in r.stdout, r.stdout
        assert metric(n, "nitro_blk_qos_limit", device="vol0", limit="iops") == 100
        assert metric(n, "nitro_blk_qos_limit", device="vol0", limit="burst_iops") == 0

        n.write_config(qos_line('iops = 150, throughput = "1M"'))
        r = n.reload()
        assert r.returncode == 0, r.stderr
        assert "qos changed: vol0" in r.stdout and "needs restart" not in r.stdout, r.stdout
        assert metric(n, "nitro_blk_qos_limit", device="vol0", limit="iops") == 150
        assert metric(n, "nitro_blk_qos_limit", device="vol0", limit="throughput") == 1_000_000
        r = n.reload()
        assert "unchanged: vol0" in r.stdout, r.stdout

        assert io.poll() is None, "the frontend finished before the last change: the test proves less"
        res = finish(io)
        assert res["ios"] > 0
        status = json.loads(n.status_json())["devices"][0]
        assert status["connections"] == 1, "the frontend was reconnected"
        assert status["qos"]["delayed"] > 0
    finally:
        io.kill()
        io.wait()
    log = n.output()
    assert 'msg="qos changed" device=vol0' in log
    assert 'msg="reload: qos changed" device=vol0' in log
