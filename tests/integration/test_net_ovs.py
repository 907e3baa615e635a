"""Open vSwitch with DPDK, the second reference of bench/net.py, works here.

A private OVS-DPDK (bench/ovs.py: its own ovsdb-server, a netdev bridge,
two dpdkvhostuser ports, no hugepages) between one dpdk-testpmd that owns
both ports as virtio-user clients and bounces frames between them (the
bench's loop frontend) for a few seconds, with the NORMAL action and with
the anti-spoofing flows bench/net.py measures. Proves the reference starts
and forwards on a fresh machine; says nothing about speed.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from bench import ovs, testpmd

pytestmark = pytest.mark.integration

A_MAC, B_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
A_IP, B_IP = "198.18.0.10", "198.18.0.11"
BURST = 32
RUN_SECONDS = 2
FLOWS = ovs.anti_spoof_flows([(1, A_MAC, A_IP), (2, B_MAC, B_IP)])


def _run_loop(sw: ovs.Switch, tmp: Path, cpu: int) -> dict[int, dict[str, int]]:
    """The loop for RUN_SECONDS once frames flow; testpmd's final
    statistics per port. b's first burst is legal, a's carries b's source."""
    log = tmp / "loop.log"
    fe = testpmd.start_loop("ovsloop", cpu, (sw.socket("a"), A_MAC), (sw.socket("b"), B_MAC), log,
                            tx_ip=(B_IP, A_IP), burst=BURST)
    try:
        # OVS's main thread maps testpmd's memory for each port while the
        # PMD spins on the same CPU: frames may take seconds to flow.
        deadline = time.monotonic() + 60
        while not re.search(r"Rx-pps:\s+[1-9]", log.read_text(errors="replace")):
            assert fe.poll() is None, f"testpmd exited:\n{log.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, f"no frame arrived:\n{log.read_text(errors='replace')[-3000:]}"
            time.sleep(0.2)
        time.sleep(RUN_SECONDS)
    finally:
        assert testpmd.interrupt(fe, timeout=30), "testpmd ignored SIGINT"
    text = log.read_text(errors="replace")
    return {port: testpmd.forward_stats(text, port) for port in (0, 1)}


def _cpus() -> tuple[int, int]:
    """(frontend CPU, OVS CPU): two busy pollers, one CPU each when there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[-1]


@pytest.mark.parametrize("forwarding", ["normal", "flows"])
def test_ovs_dpdk_forwards_between_vhost_ports(short_tmp_path: Path, forwarding: str) -> None:
    fe_cpu, ovs_cpu = _cpus()
    with ovs.Switch(short_tmp_path / "ovs", ovs_cpu, ["a", "b"], file_prefix="ovstest") as sw:
        if forwarding == "flows":
            sw.set_flows(FLOWS)
        stats = _run_loop(sw, short_tmp_path, fe_cpu)
        rules = sw.flow_packets() if forwarding == "flows" else {}
        log = sw.vswitchd.output()
    # Frames went round for seconds through OVS, both ways.
    assert stats[0]["RX-packets"] > 2000 and stats[1]["RX-packets"] > 2000, (stats, log[-3000:])
    if forwarding == "flows":
        ip_rules = {rule: n for rule, n in rules.items() if ",ip," in rule}
        assert len(ip_rules) == 2 and all(n > 2000 for n in ip_rules.values()), rules
        # a's spoofed first burst, and nothing else, hit the drop rule.
        assert rules["priority=0 actions=drop"] == BURST, rules
