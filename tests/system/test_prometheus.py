"""A real Prometheus server scrapes a real nitro.

Debian's /usr/bin/prometheus (package `prometheus`) runs on a free loopback
port with its own temporary TSDB, scrapes nitro every second as job "nitro",
and loads contrib/prometheus/nitro-rules.yml. vublk writes a known number of
4 KiB blocks through nitro; the test then waits until Prometheus' HTTP API
reports the same request count that nitro's own /metrics shows, and until
the recording rules have evaluated on that data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.proc import Nitro, free_port

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "nitro-rules.yml"
WRITES = 300
BLOCK = 4096


class Prometheus:
    """A prometheus server scraping `target` every second; stop() by PID."""

    def __init__(self, tmp: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found: install the Debian package 'prometheus' (tools/install-deps.sh)")
        tmp.mkdir()
        config = tmp / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "nitro", "static_configs": [{"targets": [target]}]}],
        }))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, promql: str) -> list[dict]:
        """/api/v1/query: the instant vector's samples (empty until ready)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore $http_proxy
        with opener.open(url, timeout=5) as response:
            reply = json.load(response)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def wait_for(what: str, probe: Callable[[], object], timeout: float, context: Callable[[], str]) -> object:
    """Call probe() until it returns something true; connection errors
    (server still starting) count as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = probe()
        except OSError:
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}\n{context()}"
        time.sleep(0.25)


def nitro_value(n: Nitro, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", n.metrics(), re.M)
    assert match, f"{series} not in nitro's /metrics"
    return float(match.group(1))


def run_writes(vublk: Path, sock: Path) -> dict:
    r = subprocess.run([str(vublk), "--socket", str(sock), "--rw", "randwrite", "--bs", str(BLOCK),
                        "--iodepth", "4", "--ios", str(WRITES), "--size", "8m"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, f"vublk failed ({r.returncode}): {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_prometheus_scrapes_what_nitro_counts(nitro, short_tmp_path, vublk):
    n = nitro('[[blk]]\nid = "vol0"\nsize = "16M"\n')
    prom = Prometheus(short_tmp_path / "prometheus", f"127.0.0.1:{n.port}")
    try:
        def context() -> str:
            return f"--- prometheus log\n{prom.log()}\n--- nitro log\n{n.output()}"

        writes = 'nitro_blk_requests_total{device="vol0",op="out"}'
        # Scraped before any I/O: the series starts at 0 in Prometheus too.
        wait_for("the first scrape", lambda: prom.query(f"{writes} == 0"), 60, context)
        assert prom.query('up{job="nitro"}')[0]["value"][1] == "1"

        run_writes(vublk, short_tmp_path / "vol0.sock")
        local = nitro_value(n, writes)
        assert local == WRITES  # vublk issued exactly --ios writes, and nothing else
        assert nitro_value(n, 'nitro_blk_bytes_total{device="vol0",op="out"}') == WRITES * BLOCK

        scraped = wait_for(f"Prometheus to scrape {writes} == {WRITES}",
                           lambda: prom.query(f"{writes} == {WRITES}"), 30, context)
        assert float(scraped[0]["value"][1]) == local
        assert scraped[0]["metric"]["job"] == "nitro"
        assert scraped[0]["metric"]["instance"] == f"127.0.0.1:{n.port}"
        bytes_ = prom.query('nitro_blk_bytes_total{device="vol0",op="out"}')
        assert float(bytes_[0]["value"][1]) == WRITES * BLOCK

        # The shipped rules load and evaluate on real data: the write rate
        # (over 1m) is recorded, and the latency quantile is a real number.
        rate = wait_for("device_op:nitro_blk_requests:rate1m > 0",
                        lambda: prom.query('device_op:nitro_blk_requests:rate1m{device="vol0",op="out"} > 0'),
                        30, context)
        assert rate[0]["metric"]["instance"] == f"127.0.0.1:{n.port}"
        p99 = wait_for("the p99 latency rule", lambda: prom.query(
            'device:nitro_blk_request_duration_seconds:p99_5m{device="vol0"} > 0'), 30, context)
        assert float(p99[0]["value"][1]) < 10
        assert prom.query('ALERTS{alertname=~"NitroDown|NitroDeviceBroken|NitroBlkRequestsStuck"}') == []
    finally:
        prom.stop()
    assert n.stop() == 0
