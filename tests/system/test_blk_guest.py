"""Real QEMU guests (TCG) using nitro's vhost-user-blk devices.

Each test boots the busybox initramfs guest from tests/guest with nitro's
sockets attached and runs a shell script inside; the host then checks the
image files nitro wrote, after the daemon stopped.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.guest.qemu import run_guest

pytestmark = pytest.mark.system

ONE_DISK = '[[blk]]\nid = "vol0"\nsize = "64M"\n'


def _ok(result):
    assert result.returncode == 0, result.describe()
    return result.script_output


def test_pattern_written_buffered_and_direct_lands_in_the_image(nitro, guest_image, short_tmp_path):
    n = nitro(ONE_DISK)
    script = r"""
set -e
[ "$(cat /sys/block/vda/size)" = 131072 ]
[ "$(cat /sys/block/vda/serial)" = vol0 ]
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=1M count=4 conv=fsync 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=64k seek=128 oflag=direct 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back1 bs=1M count=4 2>/dev/null
dd if=/dev/vda of=/tmp/back2 bs=64k skip=128 count=64 iflag=direct 2>/dev/null
cmp /tmp/pat /tmp/back1 && cmp /tmp/pat /tmp/back2
echo "PATTERN $(sha256sum /tmp/pat | cut -d' ' -f1)"
"""
    out = _ok(run_guest(guest_image, script, blk_sockets=[short_tmp_path / "vol0.sock"],
                        timeout=180))
    want = out.split("PATTERN ")[1].split()[0]
    assert n.stop() == 0
    image = (short_tmp_path / "vol0.img").read_bytes()
    assert hashlib.sha256(image[: 4 << 20]).hexdigest() == want
    assert hashlib.sha256(image[8 << 20: 12 << 20]).hexdigest() == want
    m_in = [line for line in n.output().splitlines() if "frontend connected" in line]
    assert m_in, n.output()


def test_filesystem_survives_qemu_restart_and_driver_reset(nitro, guest_image, short_tmp_path):
    n = nitro(ONE_DISK)
    sock = [short_tmp_path / "vol0.sock"]
    _ok(run_guest(guest_image, r"""
set -e
mke2fs -F -b 4096 /dev/vda >/dev/null 2>&1
mkdir -p /mnt && mount -t ext2 /dev/vda /mnt
seq 1 20000 > /mnt/numbers
sha256sum /mnt/numbers > /mnt/numbers.sum
umount /mnt
""", blk_sockets=sock, timeout=180))
    # A new QEMU process: a new vhost-user connection to the same socket.
    # Inside it, unloading and reloading virtio_blk resets the device the way
    # a guest reboot does (status 0, rings stopped, set up again).
    out = _ok(run_guest(guest_image, r"""
set -e
mkdir -p /mnt && mount -t ext2 /dev/vda /mnt
cd /mnt && sha256sum -c numbers.sum && cd /
umount /mnt
rmmod virtio_blk
insmod $(grep virtio_blk /etc/nitro/modules | awk '{print $NF}')
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done
mount -t ext2 /dev/vda /mnt && cd /mnt && sha256sum -c numbers.sum && echo AFTER-RESET-OK
""", blk_sockets=sock, timeout=180))
    assert "AFTER-RESET-OK" in out
    assert '"connections": 2' in n.status_json() or "connections 2" in n.status()
    assert n.stop() == 0


def test_discard_punches_holes_in_the_image(nitro, guest_image, short_tmp_path):
    n = nitro(ONE_DISK)
    img = short_tmp_path / "vol0.img"
    _ok(run_guest(guest_image, r"""
set -e
dd if=/dev/urandom of=/dev/vda bs=1M count=32 conv=fsync 2>/dev/null
""", blk_sockets=[short_tmp_path / "vol0.sock"], timeout=180))
    filled = os.stat(img).st_blocks * 512
    assert filled >= 32 << 20
    out = _ok(run_guest(guest_image, r"""
set -e
blkdiscard -o 0 -l 33554432 /dev/vda
dd if=/dev/vda bs=1M count=1 skip=5 2>/dev/null | od -An -tx1 | sort -u
""", blk_sockets=[short_tmp_path / "vol0.sock"], timeout=180))
    assert n.stop() == 0
    assert os.stat(img).st_blocks * 512 <= filled - (30 << 20), "discard did not free space"
    assert (img.read_bytes()[5 << 20: 6 << 20]) == bytes(1 << 20)
    assert "00 00 00" in out


def test_readonly_device_rejects_writes_in_the_guest(nitro, guest_image, short_tmp_path):
    (short_tmp_path / "ro.img").write_bytes(b"R" * (4 << 20))
    n = nitro('[[blk]]\nid = "ro"\nreadonly = true\n')
    out = _ok(run_guest(guest_image, r"""
[ "$(cat /sys/block/vda/ro)" = 1 ] && echo RO-FLAG
dd if=/dev/vda bs=4096 count=1 2>/dev/null | head -c 8; echo
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then echo WRITE-ACCEPTED; else echo WRITE-REFUSED; fi
true
""", blk_sockets=[short_tmp_path / "ro.sock"], timeout=180))
    assert "RO-FLAG" in out and "RRRRRRRR" in out and "WRITE-REFUSED" in out
    assert n.stop() == 0
    assert (short_tmp_path / "ro.img").read_bytes() == b"R" * (4 << 20)


def test_multiqueue_uses_every_queue(nitro, guest_image, short_tmp_path):
    n = nitro('[[blk]]\nid = "mq"\nsize = "64M"\nqueues = 2\n')
    out = _ok(run_guest(guest_image, r"""
set -e
ls /sys/block/vda/mq | wc -l
for cpu in 0 1; do
  taskset -c $cpu dd if=/dev/urandom of=/dev/vda bs=64k count=64 seek=$((cpu * 64)) oflag=direct 2>/dev/null
  taskset -c $cpu dd if=/dev/vda of=/dev/null bs=64k count=64 skip=$((cpu * 64)) iflag=direct 2>/dev/null
done
echo MQ-DONE
""", blk_sockets=[short_tmp_path / "mq.sock"], blk_num_queues=2, cpus=2, timeout=240))
    assert out.split()[0] == "2" and "MQ-DONE" in out
    chains = [line for line in n.metrics().splitlines()
              if line.startswith('nitro_virtqueue_chains_total{device="mq"')]
    assert len(chains) == 2 and all(float(c.split()[-1]) > 0 for c in chains), chains
    assert n.stop() == 0
