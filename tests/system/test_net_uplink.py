"""A VPC with a host uplink TAP: host <-> guest traffic, and a rate-limited
interface that drops and counts (real QEMU guests, TCG)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

pytestmark = pytest.mark.system

BODY = "hello from a nitro guest"


def config(tap: str) -> str:
    return f"""
[[vpc]]
id = "up"
cidr = "10.77.0.0/24"
gateway = "10.77.0.1"
uplink = {{ name = "{tap}", address = "10.77.0.254/24" }}

[[net]]
id = "web"
vpc = "up"
mac = "52:54:00:00:77:11"
ip = "10.77.0.11"

[[net]]
id = "slow"
vpc = "up"
mac = "52:54:00:00:77:12"
ip = "10.77.0.12"
pps = 50
"""


DHCP = r"""
ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -T 2 -s /usr/share/udhcpc/default.script >/dev/null 2>&1 || { echo DHCP-FAILED; exit 1; }
"""


def test_host_reaches_guest_over_uplink_and_rate_limit_counts(nitro, guest_image, short_tmp_path, start_guest):
    tap = f"ntup{os.getpid() % 100000}"
    n = nitro(config(tap))
    web = start_guest(guest_image, DHCP + f"""
mkdir -p /www && echo "{BODY}" > /www/index.html
httpd -p 80 -h /www
ping -c 2 -W 2 10.77.0.254 && echo HOST-PING-OK
echo GUEST-READY
sleep 120
""", net_sockets=[short_tmp_path / "web.sock"], net_macs=["52:54:00:00:77:11"])
    slow = start_guest(guest_image, DHCP + "echo GUEST-READY\nsleep 120\n",
                       net_sockets=[short_tmp_path / "slow.sock"], net_macs=["52:54:00:00:77:12"])
    web.wait_for("GUEST-READY", 120)
    slow.wait_for("GUEST-READY", 120)
    assert "HOST-PING-OK" in web.output(), web.output()

    ping = subprocess.run(["busybox", "ping", "-c", "2", "-W", "2", "10.77.0.11"], capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    with urllib.request.urlopen("http://10.77.0.11/index.html", timeout=20) as r:
        assert r.read().decode().strip() == BODY

    # Flood the pps-limited guest from the host: the switch drops the excess.
    subprocess.run(["busybox", "ping", "-c", "1", "-W", "5", "10.77.0.12"], capture_output=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(2000):
            try:
                s.sendto(b"x" * 64, ("10.77.0.12", 9))
            except OSError:
                time.sleep(0.001)
    time.sleep(0.5)
    reply = json.loads(n.status_json())
    dev = {d["id"]: d for d in reply["devices"]}
    assert dev["slow"]["net"]["pps_allowance_exceeded"] > 0, dev["slow"]
    assert dev["web"]["net"]["pps_allowance_exceeded"] == 0
    assert reply["vpcs"]["up"]["uplink"]["packets_in"] > 0
    assert reply["vpcs"]["up"]["uplink"]["packets_out"] > 0
    assert 'nitro_net_pps_allowance_exceeded_total{interface="slow"}' in n.metrics()
    assert n.stop() == 0
    assert not os.path.exists(f"/sys/class/net/{tap}"), "the TAP outlives the daemon"
