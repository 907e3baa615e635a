"""TCP segmentation offload with real guests (TCG, vectors=0): the Linux
virtio_net driver acks HOST_TSO4/GUEST_TSO4 when nitro offers them and then
sends TCP super-frames of up to 64 KiB. A large file goes guest -> guest
(super-frames passed through to a GUEST_TSO receiver) and guest -> host
over the uplink TAP (cut into MTU-sized segments by the switch); both
copies must hash like the original."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request

import pytest

from nitro.devices.net import config as netcfg

pytestmark = pytest.mark.system

MAC = {"srv": "52:54:00:00:7a:11", "cli": "52:54:00:00:7a:12"}


def config(tap: str) -> str:
    return f"""
[[vpc]]
id = "tso"
cidr = "10.78.0.0/24"
gateway = "10.78.0.1"
uplink = {{ name = "{tap}", address = "10.78.0.254/24" }}

[[net]]
id = "srv"
vpc = "tso"
mac = "{MAC['srv']}"
ip = "10.78.0.11"

[[net]]
id = "cli"
vpc = "tso"
mac = "{MAC['cli']}"
ip = "10.78.0.12"
"""


DHCP = r"""
ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -T 2 -s /usr/share/udhcpc/default.script >/dev/null 2>&1 || { echo DHCP-FAILED; exit 1; }
"""

SERVER = DHCP + r"""
mkdir -p /www
dd if=/dev/urandom of=/www/big bs=1024 count=6144 2>/dev/null
echo "SRV-MD5 $(md5sum /www/big | cut -d' ' -f1)"
httpd -p 80 -h /www
echo GUEST-READY
sleep 300
"""

CLIENT = DHCP + r"""
ok=0
for i in $(seq 1 90); do
    if wget -q -O /tmp/big http://10.78.0.11/big 2>/dev/null; then ok=1; break; fi
    sleep 1
done
[ $ok = 1 ] && echo "CLI-MD5 $(md5sum /tmp/big | cut -d' ' -f1)" || echo CLI-FETCH-FAILED
echo CLI-DONE
sleep 300
"""


def _line(out: str, tag: str) -> str:
    for line in out.splitlines():
        if line.startswith(tag + " "):
            return line.split()[1]
    raise AssertionError(f"no {tag} in:\n{out}")


def test_large_tcp_transfers_with_tso_between_guests_and_to_the_host(
        nitro, guest_image, short_tmp_path, start_guest):
    tap = f"nttso{os.getpid() % 100000}"
    n = nitro(config(tap))
    srv = start_guest(guest_image, SERVER, net_sockets=[short_tmp_path / "srv.sock"],
                      net_macs=[MAC["srv"]])
    srv.wait_for("GUEST-READY", 180)
    want = _line(srv.output(), "SRV-MD5")

    # Guest -> host through the uplink TAP: the switch segments.
    with urllib.request.urlopen("http://10.78.0.11/big", timeout=120) as r:
        assert hashlib.md5(r.read()).hexdigest() == want

    # Guest -> guest: both ack TSO, super-frames pass through.
    cli = start_guest(guest_image, CLIENT, net_sockets=[short_tmp_path / "cli.sock"],
                      net_macs=[MAC["cli"]])
    cli.wait_for("CLI-DONE", 300)
    assert _line(cli.output(), "CLI-MD5") == want

    # Both drivers are still up: their acked features prove the negotiation
    # (Linux turns TSO on by default once HOST_TSO4 is acked).
    reply = json.loads(n.status_json())
    dev = {d["id"]: d for d in reply["devices"]}
    for name in ("srv", "cli"):
        acked = dev[name]["features"]
        for bit in (netcfg.VIRTIO_NET_F_HOST_TSO4, netcfg.VIRTIO_NET_F_GUEST_TSO4,
                    netcfg.VIRTIO_NET_F_CSUM, netcfg.VIRTIO_NET_F_GUEST_CSUM):
            assert acked >> bit & 1, (name, hex(acked), bit)
    srv_net = dev["srv"]["net"]
    assert srv_net["drops"]["bad_header"] == 0 and srv_net["drops"]["mtu"] == 0, srv_net
    # Two copies of 6 MiB left srv, counted as MTU-sized wire segments.
    assert srv_net["bytes_out"] > 2 * 6 * 2**20 and srv_net["packets_out"] > 2 * 6 * 2**20 // 1500
    assert reply["vpcs"]["tso"]["uplink"]["packets_in"] > 6 * 2**20 // 1500
    assert n.stop() == 0
