"""Real QEMU guests (TCG) whose vhost-user devices use packed virtqueues
(``packed=on``, virtio 1.2 section 2.8): the Linux drivers then drive
nitro's packed rings for virtio-blk and virtio-net."""

from __future__ import annotations

import hashlib

import pytest

from tests.guest.qemu import run_guest
from tests.system.test_net_guest import DHCP, MAC, PING_PEER, TWO_VPCS, _ok

pytestmark = pytest.mark.system

ONE_DISK = '[[blk]]\nid = "vol0"\nsize = "64M"\n'
# The guest's view of the negotiated features: one character per bit.
PACKED_BIT = 'echo "RING_PACKED $(cut -c35 /sys/bus/virtio/devices/virtio0/features)"\n'


def test_blk_io_over_a_packed_ring(nitro, guest_image, short_tmp_path):
    n = nitro(ONE_DISK)
    script = PACKED_BIT + r"""
set -e
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=1M count=8 conv=fsync 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=4k seek=4096 oflag=direct 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back1 bs=1M count=8 2>/dev/null
dd if=/dev/vda of=/tmp/back2 bs=4k skip=4096 count=2048 iflag=direct 2>/dev/null
cmp /tmp/pat /tmp/back1 && cmp /tmp/pat /tmp/back2
echo "PATTERN $(sha256sum /tmp/pat | cut -d' ' -f1)"
"""
    out = _ok(run_guest(guest_image, script, blk_sockets=[short_tmp_path / "vol0.sock"],
                        packed=True, timeout=240))
    assert "RING_PACKED 1" in out, out
    want = out.split("PATTERN ")[1].split()[0]
    assert n.stop() == 0
    image = (short_tmp_path / "vol0.img").read_bytes()
    assert hashlib.sha256(image[: 8 << 20]).hexdigest() == want
    assert hashlib.sha256(image[16 << 20: 24 << 20]).hexdigest() == want




def test_net_guests_on_packed_rings_get_dhcp_and_ping(nitro, guest_image, short_tmp_path,
                                                      start_guest):
    n = nitro(TWO_VPCS)  # g1 and g2 share VPC blue; g3 stays off
    macs = {name: MAC[name] for name in ("g1", "g2")}
    peers = {"g1": "10.0.0.12", "g2": "10.0.0.11"}
    guests = {
        name: start_guest(guest_image, PACKED_BIT + DHCP + PING_PEER.format(peer=peers[name])
                          + "ping -c 20 -i 0.2 -s 1400 -W 2 " + peers[name]
                          + " >/dev/null && echo BIG-PINGS-OK\nsleep 6\n",
                          net_sockets=[short_tmp_path / f"{name}.sock"], net_macs=[macs[name]],
                          packed=True)
        for name in macs
    }
    out = {name: _ok(g.wait(240)) for name, g in guests.items()}
    for name in macs:
        assert "RING_PACKED 1" in out[name], out[name]
        assert f"PEER-OK {peers[name]}" in out[name], out[name]
        assert "BIG-PINGS-OK" in out[name], out[name]
    assert n.stop() == 0
