"""`make demo`: nitro serving a real QEMU guest its disk, start to finish.

Starts `nitro run` with its embedded default config (runtime and state
directories under build/demo so the demo leaves the host alone), boots the
test guest under TCG attached to vol0.sock, lets the guest make a filesystem,
write and read a file, shows `nitro status` and a metrics scrape, then stops
nitro with SIGTERM and checks it exited 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.guest.build import build_initramfs  # noqa: E402
from tests.guest.qemu import run_guest  # noqa: E402

GUEST_SCRIPT = r"""
set -e
echo "guest: disk is $(cat /sys/block/vda/size) sectors, serial $(cat /sys/block/vda/serial)"
mke2fs -F -b 4096 /dev/vda >/dev/null 2>&1 && echo "guest: made ext2 on /dev/vda"
mkdir -p /mnt && mount -t ext2 /dev/vda /mnt
echo "hello from a nitro-backed disk" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/blob bs=1M count=8 2>/dev/null
sync
sum1=$(sha256sum /mnt/blob | cut -d' ' -f1)
umount /mnt && mount -t ext2 /dev/vda /mnt
sum2=$(sha256sum /mnt/blob | cut -d' ' -f1)
echo "guest: read back: $(cat /mnt/hello.txt)"
[ "$sum1" = "$sum2" ] && echo "guest: 8 MiB blob checksum matches after remount ($sum1)"
umount /mnt
"""


def main() -> int:
    work = REPO / "build" / "demo"
    shutil.rmtree(work, ignore_errors=True)
    run_dir = Path("/tmp/nitro-demo")  # short: unix socket paths max out at 107 bytes
    shutil.rmtree(run_dir, ignore_errors=True)
    print("== building the test guest (Debian kernel + busybox initramfs)")
    image = build_initramfs(REPO / "build" / "guest")
    print("== starting: nitro run  (embedded default config)")
    nitro = subprocess.Popen(
        [sys.executable, "-m", "nitro", "run", "--runtime-dir", str(run_dir),
         "--state-dir", str(work / "state")], cwd=REPO)
    try:
        sock = run_dir / "vol0.sock"
        _wait_for(lambda: sock.exists(), 15, "nitro did not create its socket")
        print(f"== nitro serves {sock}; image {work / 'state' / 'vol0.img'} (sparse 1 GiB)")
        print("== booting a QEMU guest (TCG) with -device vhost-user-blk-pci on that socket")
        result = run_guest(image, GUEST_SCRIPT, blk_sockets=[sock], timeout=180)
        print(result.script_output)
        if result.returncode != 0:
            print(result.describe())
            return 1
        print("== nitro status")
        subprocess.run([sys.executable, "-m", "nitro", "status", "--runtime-dir", str(run_dir)],
                       check=True)
        print("== metrics at http://127.0.0.1:9180/metrics (excerpt)")
        body = urllib.request.urlopen("http://127.0.0.1:9180/metrics", timeout=5).read().decode()
        for line in body.splitlines():
            if line.startswith(("nitro_blk_requests_total", "nitro_vhost_connections_total")):
                print("  " + line)
    finally:
        nitro.send_signal(signal.SIGTERM)
        rc = nitro.wait(30)
        print(f"== nitro stopped on SIGTERM with exit status {rc}")
    st = os.stat(work / "state" / "vol0.img")
    print(f"== image: {st.st_size} bytes apparent, {st.st_blocks * 512} bytes allocated")
    return 0 if rc == 0 else 1


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {what} within {timeout}s")
        time.sleep(0.1)


if __name__ == "__main__":
    raise SystemExit(main())
