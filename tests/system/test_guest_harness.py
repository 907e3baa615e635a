"""The guest harness itself, proven against third-party backends.

qemu-storage-daemon (QEMU's own vhost-user-blk export) is the reference
backend here, so a failure in this file is a harness failure, never nitro's.
Each boot costs ~6-10 s under TCG: the tests share boots where they can.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio

from tests.guest.qemu import GuestProcess, GuestTimeout, mac_address, run_guest

pytestmark = pytest.mark.system

MiB = 1024 * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_slice(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def make_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # sparse
    return path


def values(output: str) -> dict[str, str]:
    """KEY=value lines the guest script printed (the last one wins)."""
    return dict(re.findall(r"^([A-Z][A-Z0-9_]+)=(\S*)\s*$", output, re.M))


# The guest reads a pattern the host wrote, writes one of its own with
# O_DIRECT (busybox dd has iflag=direct / oflag=direct), reads it back, and
# makes an ext2 filesystem (busybox mke2fs; ext4.ko mounts it) on the second
# disk. -b 4096: mke2fs picks 1 KiB blocks on small disks otherwise.
BOOT1 = r"""
set -e
echo "VDA_SECTORS=$(cat /sys/block/vda/size)"
echo "VDB_SECTORS=$(cat /sys/block/vdb/size)"
echo "VDA_QUEUES=$(ls /sys/block/vda/mq | wc -l)"
echo "HOST_PATTERN_SHA=$(dd if=/dev/vda bs=64k skip=128 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/pattern bs=64k count=64 2>/dev/null
echo "GUEST_PATTERN_SHA=$(sha256sum < /tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=/dev/vda bs=64k seek=256 count=64 oflag=direct conv=fsync 2>/dev/null
echo "READBACK_SHA=$(dd if=/dev/vda bs=64k skip=256 count=64 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
mke2fs -b 4096 /dev/vdb > /tmp/mke2fs.log 2>&1 || { cat /tmp/mke2fs.log; exit 1; }
mount -t ext2 /dev/vdb /mnt
dd if=/dev/urandom of=/mnt/payload bs=4k count=64 2>/dev/null
echo "FILE_SHA=$(sha256sum < /mnt/payload | cut -d' ' -f1)"
umount /mnt
echo BOOT1_DONE
"""

# Second boot, same daemons (qemu-storage-daemon takes a new connection):
# the file survives; a plain -drive disk (the oracle path) takes vfat.
BOOT2 = r"""
set -e
mount -t ext2 -o ro /dev/vdb /mnt
echo "FILE_SHA=$(sha256sum < /mnt/payload | cut -d' ' -f1)"
umount /mnt
echo "VDC_SECTORS=$(cat /sys/block/vdc/size)"
mkdosfs /dev/vdc > /dev/null
mount -t vfat /dev/vdc /mnt
echo nitro-vfat-payload > /mnt/hello.txt
echo "VFAT_READ=$(cat /mnt/hello.txt)"
umount /mnt
echo BOOT2_DONE
"""


def test_blk_data_path_and_persistence(guest_image, qemu_storage_daemon, short_tmp_path):
    disk_a = make_image(short_tmp_path / "a.img", 64 * MiB)
    disk_b = make_image(short_tmp_path / "b.img", 48 * MiB)
    disk_c = make_image(short_tmp_path / "c.img", 16 * MiB)
    host_pattern = os.urandom(1 * MiB)
    with open(disk_a, "r+b") as f:
        f.seek(8 * MiB)
        f.write(host_pattern)
    qsd_a = qemu_storage_daemon(disk_a, num_queues=2)
    qsd_b = qemu_storage_daemon(disk_b, num_queues=2)
    sockets = [qsd_a.socket, qsd_b.socket]

    # cpus=2: virtio_blk uses min(num-queues, guest CPUs) queues.
    first = run_guest(guest_image, BOOT1, blk_sockets=sockets, blk_num_queues=2, cpus=2, timeout=120)
    assert first.returncode == 0 and "BOOT1_DONE" in first.output, first.describe()
    assert first.qemu_exit == 0, first.describe()
    got = values(first.script_output)
    assert got["VDA_SECTORS"] == str(64 * MiB // 512), first.describe()
    assert got["VDB_SECTORS"] == str(48 * MiB // 512), first.describe()
    assert got["VDA_QUEUES"] == "2", first.describe()
    assert got["HOST_PATTERN_SHA"] == sha256(host_pattern), "guest read other bytes than the host wrote"
    assert got["READBACK_SHA"] == got["GUEST_PATTERN_SHA"], first.describe()
    # After QEMU exits, the image file holds exactly what the guest wrote.
    assert sha256(image_slice(disk_a, 16 * MiB, 4 * MiB)) == got["GUEST_PATTERN_SHA"]
    assert qsd_a.running() and qsd_b.running(), qsd_a.output() + qsd_b.output()

    second = run_guest(guest_image, BOOT2, blk_sockets=sockets, blk_num_queues=2, plain_disk=disk_c, timeout=120)
    assert second.returncode == 0 and "BOOT2_DONE" in second.output, second.describe()
    again = values(second.script_output)
    assert again["FILE_SHA"] == got["FILE_SHA"], second.describe()
    assert again["VDC_SECTORS"] == str(16 * MiB // 512), second.describe()
    assert again["VFAT_READ"] == "nitro-vfat-payload", second.describe()
    assert b"nitro-vfat-payload" in disk_c.read_bytes()  # plain disk written through


def test_exit_status_and_streaming(guest_image, start_guest):
    """A failing script's status comes back; GuestProcess sees output as it appears."""
    script = "echo phase-1\nsleep 2\necho phase-2\nexit 7\n"
    guest = start_guest(guest_image, script)
    first = guest.wait_for(r"^phase-1$", timeout=60)
    assert "phase-2" not in guest.output()[first.end() :]

    async def follow() -> None:
        await guest.wait_for_async(r"^phase-2$", timeout=30, start=first.end())
        result = await guest.wait_async(timeout=30)
        assert result.returncode == 7, result.describe()

    trio.run(follow)
    result = guest.wait(timeout=1)
    assert result.returncode == 7 and result.qemu_exit == 0 and not result.timed_out, result.describe()
    assert result.script_output == "phase-1\nphase-2\n", result.describe()


def test_timeout_kills_the_guest(guest_image):
    """A script that outlives the timeout: the harness returns what it has, no hang."""
    started = time.monotonic()
    # 30 s: a TCG boot takes ~7 s on a quiet machine, 3x that on a busy one.
    result = run_guest(guest_image, "echo going-to-sleep\nsleep 600\n", timeout=30)
    elapsed = time.monotonic() - started
    assert result.timed_out and result.returncode is None, result.describe()
    assert result.qemu_exit == -9, result.describe()
    assert "going-to-sleep" in result.output, result.describe()
    assert elapsed < 35, f"took {elapsed:.1f}s"

    with GuestProcess(guest_image, "exit 0\n").start() as guest:
        with pytest.raises(GuestTimeout) as excinfo:
            guest.wait_for("never-printed", timeout=60)  # QEMU exits first: raises at once
    assert "NITRO-GUEST-EXIT=0" in excinfo.value.output


def test_fio_and_dm_crypt_in_guest(build_guest_image, qemu_storage_daemon, short_tmp_path):
    """The optional tools work: cryptsetup opens a host-made LUKS2 volume, fio verifies through it."""
    image = build_guest_image(fio=True, cryptsetup=True)
    cryptsetup = shutil.which("cryptsetup")
    assert cryptsetup, "cryptsetup not found on the host: apt-get install cryptsetup-bin"
    volume = make_image(short_tmp_path / "luks.img", 40 * MiB)
    keyfile = short_tmp_path / "key"
    keyfile.write_text("nitro-test-passphrase")
    # pbkdf2 with few iterations: argon2's default memory cost is slow under TCG.
    subprocess.run(
        [cryptsetup, "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--key-file", str(keyfile), str(volume)],
        check=True, capture_output=True,
    )  # fmt: skip
    qsd = qemu_storage_daemon(volume)
    script = r"""
set -e
printf nitro-test-passphrase > /tmp/key
cryptsetup open --key-file /tmp/key /dev/vda secure
fio --name=verify --filename=/dev/mapper/secure --rw=write --bs=64k --size=8M \
    --direct=1 --ioengine=psync --verify=pattern --verify_pattern=0x6e6974726f --do_verify=1 \
    --output-format=terse --terse-version=3 > /tmp/fio.out
echo "FIO_ERR=$(cut -d';' -f5 /tmp/fio.out)"
cryptsetup close secure
echo FIO_VERSION=$(fio --version)
"""
    result = run_guest(image, script, blk_sockets=[qsd.socket], timeout=150)
    assert result.returncode == 0, result.describe()
    got = values(result.script_output)
    assert got["FIO_ERR"] == "0", result.describe()
    assert got["FIO_VERSION"].startswith("fio-"), result.describe()
    # The header magic is on disk; the plaintext pattern is not.
    data = volume.read_bytes()
    assert data.startswith(b"LUKS\xba\xbe")
    assert b"nitronitro" not in data


class StubNetBackend:
    """Just enough vhost-user-net (vhost-user.rst) to let QEMU start a guest NIC.

    Answers the GET_* requests, records every request and never touches the
    rings: it checks the harness's -netdev/-device arguments (mq, vectors=0,
    MAC), not a data path. There is no packaged vhost-user-net backend here
    besides DPDK's, which is not installed.
    """

    GET_FEATURES, GET_VRING_BASE, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM = 1, 11, 15, 17
    FEATURES = (1 << 32) | (1 << 30) | (1 << 22)  # VERSION_1, PROTOCOL_FEATURES, NET_F_MQ
    PROTOCOL_F_MQ = 1 << 0

    def __init__(self, path: Path, queue_pairs: int) -> None:
        self.queue_pairs = queue_pairs
        self.requests: list[int] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(60)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            while True:
                try:
                    header, fds, _, _ = socket.recv_fds(conn, 12, 8)
                except OSError:
                    return
                for fd in fds:
                    os.close(fd)
                if len(header) < 12:
                    return
                request, _flags, size = struct.unpack("<III", header)
                payload = b""
                while len(payload) < size:
                    chunk = conn.recv(size - len(payload))
                    if not chunk:
                        return
                    payload += chunk
                self.requests.append(request)
                reply = {
                    self.GET_FEATURES: struct.pack("<Q", self.FEATURES),
                    self.GET_PROTOCOL_FEATURES: struct.pack("<Q", self.PROTOCOL_F_MQ),
                    self.GET_QUEUE_NUM: struct.pack("<Q", self.queue_pairs),
                    self.GET_VRING_BASE: payload[:4] + struct.pack("<I", 0),
                }.get(request)
                if reply is not None:
                    conn.sendall(struct.pack("<III", request, 0x1 | 0x4, len(reply)) + reply)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)


def test_net_device_arguments(guest_image, short_tmp_path):
    """net_sockets gives the guest eth0 with the harness MAC and 2 queue pairs, and QEMU survives (vectors=0)."""
    backend = StubNetBackend(short_tmp_path / "net.sock", queue_pairs=2)
    try:
        script = "cat /sys/class/net/eth0/address\nip link set eth0 up\nls /sys/class/net/eth0/queues\n"
        result = run_guest(
            guest_image, script, net_sockets=[short_tmp_path / "net.sock"], net_queues=2, cpus=2, timeout=60
        )
    finally:
        backend.close()
    assert result.returncode == 0 and result.qemu_exit == 0, result.describe()
    assert mac_address(0) in result.script_output, result.describe()
    assert "rx-1" in result.script_output and "tx-1" in result.script_output, result.describe()
    assert 18 in backend.requests, f"no SET_VRING_ENABLE: {backend.requests}"  # the guest set DRIVER_OK
