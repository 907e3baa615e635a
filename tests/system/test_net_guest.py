"""Real QEMU guests (TCG, vectors=0) on nitro's VPC switch.

Guests boot concurrently (each TCG boot is ~7 s). Every guest gets its
address from nitro's DHCP responder with busybox udhcpc, then pings; the
host reads the C counters through `nitro status --json` and /metrics.
"""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.system

MAC = {"g1": "52:54:00:00:0a:11", "g2": "52:54:00:00:0a:12", "g3": "52:54:00:00:0b:13"}

TWO_VPCS = """
[[vpc]]
id = "blue"
cidr = "10.0.0.0/24"
gateway = "10.0.0.1"
dns = ["10.0.0.53"]
mtu = 1400
lease_seconds = 600

[[vpc]]
id = "red"
cidr = "10.0.0.0/24"
gateway = "10.0.0.1"

[[net]]
id = "g1"
vpc = "blue"
mac = "52:54:00:00:0a:11"
ip = "10.0.0.11"

[[net]]
id = "g2"
vpc = "blue"
mac = "52:54:00:00:0a:12"
ip = "10.0.0.12"

[[net]]
id = "g3"
vpc = "red"
mac = "52:54:00:00:0b:13"
ip = "10.0.0.13"
"""

DHCP = r"""
ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -T 2 -s /usr/share/udhcpc/default.script >/dev/null 2>&1 || { echo DHCP-FAILED; exit 1; }
cat /tmp/dhcp-eth0
echo "MTU $(cat /sys/class/net/eth0/mtu)"
"""

# Ping until the peer answers (it boots concurrently), at most ~60 s.
PING_PEER = r"""
ok=0
for i in $(seq 1 60); do
    if ping -c 1 -W 1 {peer} >/dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] && echo "PEER-OK {peer}" || echo "PEER-FAIL {peer}"
"""


def _ok(result):
    assert result.returncode == 0, result.describe()
    return result.script_output


def _status(n) -> dict:
    reply = json.loads(n.status_json())
    return {d["id"]: d for d in reply["devices"]} | {"_vpcs": reply.get("vpcs", {})}


def test_two_guests_dhcp_ping_isolation_and_spoofing(nitro, guest_image, short_tmp_path, start_guest):
    n = nitro(TWO_VPCS)
    sock = {k: short_tmp_path / f"{k}.sock" for k in MAC}
    g1_script = DHCP + r"""
ping -c 2 -W 2 10.0.0.1 && echo GATEWAY-OK
""" + PING_PEER.format(peer="10.0.0.12") + r"""
# Spoofing: a second address nitro did not assign. Its ARP and IP are dropped.
ip addr add 10.0.0.99/24 dev eth0
if ping -c 2 -W 1 -I 10.0.0.99 10.0.0.12 >/dev/null 2>&1; then echo SPOOF-PASSED; else echo SPOOF-BLOCKED; fi
ip addr del 10.0.0.99/24 dev eth0
sleep 3
"""
    g2_script = DHCP + r"""
ping -c 2 -W 2 10.0.0.1 && echo GATEWAY-OK
""" + PING_PEER.format(peer="10.0.0.11") + "sleep 8\n"
    g3_script = DHCP + r"""
ping -c 2 -W 2 10.0.0.1 && echo GATEWAY-OK
if ping -c 2 -W 1 10.0.0.11 >/dev/null 2>&1; then echo CROSS-VPC-REACHED; else echo CROSS-VPC-BLOCKED; fi
# Even with the peer's MAC known, the red switch has no such port.
arp -i eth0 -s 10.0.0.11 52:54:00:00:0a:11 && echo STATIC-ARP-SET
if ping -c 2 -W 1 10.0.0.11 >/dev/null 2>&1; then echo CROSS-VPC-L2-REACHED; else echo CROSS-VPC-L2-BLOCKED; fi
"""
    guests = {
        name: start_guest(guest_image, script, net_sockets=[sock[name]], net_macs=[MAC[name]])
        for name, script in (("g1", g1_script), ("g2", g2_script), ("g3", g3_script))
    }
    out = {name: _ok(g.wait(240)) for name, g in guests.items()}

    for name, ip in (("g1", "10.0.0.11"), ("g2", "10.0.0.12"), ("g3", "10.0.0.13")):
        assert f"ip={ip} subnet=255.255.255.0 router=10.0.0.1" in out[name], out[name]
        assert "GATEWAY-OK" in out[name], out[name]
    assert "mtu=1400 dns=10.0.0.53 lease=600" in out["g1"]
    assert "MTU 1400" in out["g1"]
    assert "PEER-OK 10.0.0.12" in out["g1"] and "PEER-OK 10.0.0.11" in out["g2"]
    assert "SPOOF-BLOCKED" in out["g1"]
    assert "CROSS-VPC-BLOCKED" in out["g3"] and "CROSS-VPC-L2-BLOCKED" in out["g3"]
    assert "STATIC-ARP-SET" in out["g3"], out["g3"]

    st = _status(n)
    g1, g3 = st["g1"]["net"], st["g3"]["net"]
    assert g1["drops"]["spoofed_source"] >= 1, g1
    assert g3["drops"]["unknown_destination"] >= 1, g3
    assert g1["packets_out"] > 0 and g1["packets_in"] > 0
    assert st["g1"]["lease"]["state"] == "bound"
    blue = st["_vpcs"]["blue"]["counters"]
    assert blue["dhcp_acks"] >= 2 and blue["arp_replies"] >= 2 and blue["icmp_echo_replies"] >= 4
    metrics = n.metrics()
    m = re.search(r'nitro_net_drops_total\{interface="g1",reason="spoofed_source"\} (\S+)', metrics)
    assert m and float(m.group(1)) >= 1, metrics
    human = n.status()
    assert "spoofed_source=" in human and "vpc blue" in human
    assert n.stop() == 0
