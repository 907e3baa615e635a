"""`make demo`: nitro serving a real QEMU guest its disk and its network.

Writes a demo config to build/demo/nitro.toml: the embedded default's disk
(`[[blk]] vol0`, sparse 1 GiB) plus one VPC (`[[vpc]] demo`, 10.0.0.0/24,
gateway 10.0.0.1) with one interface (`[[net]] eth0`). Starts `nitro run`
on it (runtime directory /tmp/nitro-demo, state directory build/demo/state,
so the demo leaves the host alone) and boots the test guest under TCG with
vhost-user-blk on vol0.sock and virtio-net (vhost-user, `vectors=0`: QEMU 7.2
TCG needs it) on eth0.sock. The guest makes a filesystem, writes and reads a
file, then gets its address from nitro's DHCP responder with busybox udhcpc,
prints the lease (address/prefix, router, DNS, MTU) and pings the gateway
three times. The host then shows `nitro status` (the disk and the
interface with its counters and lease) and a metrics scrape (disk requests,
interface packets in/out and drops), stops nitro with SIGTERM and checks it
exited 0.

Exits non-zero, loudly, if anything fails: the disk check, DHCP, the ping,
the interface's counters, or nitro's exit status.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.guest.build import build_initramfs  # noqa: E402
from tests.guest.qemu import GuestProcess, GuestTimeout  # noqa: E402

MAC = "52:54:00:de:00:11"
IP = "10.0.0.11"
GATEWAY = "10.0.0.1"
GUEST_IDLE_S = 8  # the guest stays attached this long after its ping

CONFIG = f"""\
# tools/demo.py: the embedded default's disk plus one VPC with one interface.
[metrics]
listen = "127.0.0.1:{{port}}"

[[blk]]
id = "vol0"
socket = "vol0.sock"
image = "vol0.img"
size = "1G"
queues = 1

[[vpc]]
id = "demo"
cidr = "10.0.0.0/24"
gateway = "{GATEWAY}"
dns = ["10.0.0.53"]
mtu = 1500
lease_seconds = 3600

[[net]]
id = "eth0"
socket = "eth0.sock"
vpc = "demo"
mac = "{MAC}"
ip = "{IP}"
"""

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

driver=$(basename "$(readlink /sys/class/net/eth0/device/driver)")
echo "guest: eth0 is $(cat /sys/class/net/eth0/address), driver $driver"
ip link set eth0 up
if ! udhcpc -i eth0 -n -q -t 10 -T 2 -s /usr/share/udhcpc/default.script >/dev/null 2>&1; then
    echo "guest: DHCP-FAILED: no lease from nitro"; exit 1
fi
echo "guest: udhcpc lease: $(cat /tmp/dhcp-eth0)"
addr=$(ip -4 -o addr show dev eth0 | awk '{print $4}')
router=$(ip route | awk '/^default/ {print $3}')
dns=$(awk '/^nameserver/ {print $2}' /etc/resolv.conf | tr '\n' ' ')
echo "guest: address $addr, router $router, DNS ${dns}MTU $(cat /sys/class/net/eth0/mtu)"
if ping -c 3 -W 2 10.0.0.1 > /tmp/ping 2>&1; then
    sed 's/^/guest: /' /tmp/ping
else
    sed 's/^/guest: /' /tmp/ping
    echo "guest: PING-FAILED: the gateway did not answer"; exit 1
fi
# Stay up (still attached) while the host reads nitro status and the metrics.
echo "guest: NET-DONE; idle for %(idle)d s while the host looks" && sleep %(idle)d
"""


def main() -> int:
    work = REPO / "build" / "demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run_dir = Path("/tmp/nitro-demo")  # short: unix socket paths max out at 107 bytes
    shutil.rmtree(run_dir, ignore_errors=True)
    port = _metrics_port()
    cfg = work / "nitro.toml"
    cfg.write_text(CONFIG.replace("{port}", str(port)))
    print("== building the test guest (Debian kernel + busybox initramfs)")
    image = build_initramfs(REPO / "build" / "guest")
    print(f"== starting: nitro run --config {cfg.relative_to(REPO)}  (disk vol0 + VPC demo, interface eth0)")
    nitro = subprocess.Popen(
        [sys.executable, "-m", "nitro", "run", "--config", str(cfg), "--runtime-dir", str(run_dir),
         "--state-dir", str(work / "state")], cwd=REPO)
    ok = False
    try:
        blk_sock, net_sock = run_dir / "vol0.sock", run_dir / "eth0.sock"
        _wait_for(lambda: blk_sock.exists() and net_sock.exists(), 15, "nitro did not create its sockets")
        print(f"== nitro serves {blk_sock} (image {work / 'state' / 'vol0.img'}, sparse 1 GiB)")
        print(f"== nitro serves {net_sock} (VPC demo 10.0.0.0/24, gateway {GATEWAY}; {MAC} -> {IP})")
        print("== booting a QEMU guest (TCG): vhost-user-blk-pci on vol0.sock,"
              " virtio-net-pci (vhost-user, vectors=0) on eth0.sock")
        guest = GuestProcess(image, GUEST_SCRIPT % {"idle": GUEST_IDLE_S}, blk_sockets=[blk_sock],
                             net_sockets=[net_sock], net_macs=[MAC]).start()
        try:
            try:
                guest.wait_for(r"NET-DONE|NITRO-GUEST-EXIT=", 240)
            except GuestTimeout:
                pass
            running = "NET-DONE" in guest.output()
            if running:  # while the guest is still attached: connected, features, live counters
                print("\n".join(_script_part(guest.output())))
                _show_nitro(cfg, run_dir, port)
            result = guest.wait(GUEST_IDLE_S + 60)
        finally:
            guest.kill()
        if not running:
            print(result.script_output)
        if result.returncode != 0:
            print(result.describe())
            raise SystemExit("the guest script failed (see above)")
        _check_guest(result.script_output)
        ok = True
    except SystemExit as e:
        print(f"demo: FAILED: {e}", file=sys.stderr)
    finally:
        nitro.send_signal(signal.SIGTERM)
        rc = nitro.wait(30)
        print(f"== nitro stopped on SIGTERM with exit status {rc}")
    if not ok:
        return 1
    st = os.stat(work / "state" / "vol0.img")
    print(f"== image: {st.st_size} bytes apparent, {st.st_blocks * 512} bytes allocated")
    if rc != 0:
        print(f"demo: FAILED: nitro exited {rc} on SIGTERM", file=sys.stderr)
        return 1
    return 0


def _script_part(console: str) -> list[str]:
    """The guest script's lines so far (after the start marker)."""
    return console.partition("NITRO-GUEST-START\n")[2].splitlines()


def _show_nitro(cfg: Path, run_dir: Path, port: int) -> None:
    print("== nitro status  (guest still attached)")
    subprocess.run([sys.executable, "-m", "nitro", "status", "--config", str(cfg),
                    "--runtime-dir", str(run_dir)], cwd=REPO, check=True)
    _check_status(cfg, run_dir)
    print(f"== metrics at http://127.0.0.1:{port}/metrics (excerpt)")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in _metrics_excerpt(body):
        print("  " + line)


def _check_guest(out: str) -> None:
    """What the guest printed: the fixed address from DHCP and three replies."""
    if f"ip={IP} subnet=255.255.255.0 router={GATEWAY}" not in out:
        raise SystemExit(f"demo: the guest's lease is not {IP}/24 via {GATEWAY}")
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    if not m or m.group(2) != "3":
        raise SystemExit("demo: the guest did not get 3 ping replies from the gateway")


def _check_status(cfg: Path, run_dir: Path) -> None:
    """The interface's C counters agree with what the guest did."""
    reply = json.loads(subprocess.run(
        [sys.executable, "-m", "nitro", "status", "--json", "--config", str(cfg),
         "--runtime-dir", str(run_dir)], cwd=REPO, capture_output=True, text=True, check=True).stdout)
    eth0 = next(d for d in reply["devices"] if d["id"] == "eth0")
    net = eth0["net"]
    if not (eth0["mac"] == MAC and eth0["ip"] == IP and net["packets_out"] >= 5 and net["packets_in"] >= 5):
        raise SystemExit(f"demo: nitro status does not show eth0's traffic: {eth0}")


def _metrics_excerpt(body: str) -> list[str]:
    keep = ("nitro_blk_requests_total", "nitro_vhost_connections_total", "nitro_net_packets_total",
            "nitro_net_bytes_total", "nitro_net_punted_total")
    lines = [ln for ln in body.splitlines() if ln.startswith(keep)]
    drops = [ln for ln in body.splitlines() if ln.startswith("nitro_net_drops_total{")]
    shown = [ln for ln in drops if 'reason="no_rx_buffer"' in ln or float(ln.rsplit(" ", 1)[1]) != 0]
    lines += shown
    zero = sum(float(ln.rsplit(" ", 1)[1]) == 0 for ln in drops if ln not in shown)
    lines.append(f"(nitro_net_drops_total: the other {len(drops) - len(shown)} reasons, {zero} at 0)")
    return lines


def _metrics_port() -> int:
    """9180 (the default) when free, else any free port: never collide with a running nitro."""
    for port in (9180, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise SystemExit("demo: no free TCP port for metrics")


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {what} within {timeout}s")
        time.sleep(0.1)


if __name__ == "__main__":
    raise SystemExit(main())
