"""`nitro run` under a systemd-like supervisor: sd_notify READY once the
sockets listen, WATCHDOG pings from the trio loop, STOPPING on SIGTERM; and
every system call nitro makes allowed by the unit's SystemCallFilter=.

PID 1 here is not systemd, so the test plays systemd's part: it binds the
$NOTIFY_SOCKET datagram socket and reads what the daemon sends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from bench.proc import Nitro
from tests.integration.frontend import GPA_BASE
from tests.integration.test_daemon_net import A_MAC, B_MAC, NetFrontend
from tests.integration.test_encrypted_volume import encrypted_cfg, key_file, luks_format
from tests.ringlayout import VRING_DESC_F_WRITE
from tests.unit.test_systemd_unit import UNIT, allowed_syscalls

pytestmark = pytest.mark.integration


def _messages(sock: socket.socket, until: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while until not in got:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no {until!r} within {timeout}s; got {got}") from None
        got += data.splitlines()
    return got


@contextlib.contextmanager
def supervised(tmp: Path, **env: str):
    """nitro started the way systemd would: $NOTIFY_SOCKET bound by us."""
    notify = tmp / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sup:
        sup.bind(str(notify))
        n = Nitro(tmp, '[[blk]]\nid = "v"\nsize = "1M"\n', env={"NOTIFY_SOCKET": str(notify), **env})
        try:
            yield sup, n
        finally:
            n.kill()


def test_ready_watchdog_stopping(short_tmp_path):
    with supervised(short_tmp_path, WATCHDOG_USEC="400000") as (sup, n):
        _messages(sup, "READY=1", 20)
        # READY only after every socket listens: a guest may attach now.
        assert (short_tmp_path / "v.sock").exists() and (short_tmp_path / "control.sock").exists()
        pings = _messages(sup, "WATCHDOG=1", 5)
        assert "WATCHDOG=1" in pings
        # Pings keep coming at about half the watchdog period.
        t0 = time.monotonic()
        _messages(sup, "WATCHDOG=1", 2)
        assert time.monotonic() - t0 < 1.0
        n.proc.send_signal(signal.SIGTERM)
        _messages(sup, "STOPPING=1", 20)
        assert n.proc.wait(30) == 0
        # The journal's last word says the stop finished, after the drain.
        lines = n.output().splitlines()
        assert "msg=stopped" in lines[-1] and "devices=1 waiting=0" in lines[-1], lines[-3:]
        assert any("msg=draining" in line for line in lines[:-1]), lines


def test_watchdog_pid_mismatch_sends_no_pings(short_tmp_path):
    # The watchdog is meant for another process (PID 1).
    with supervised(short_tmp_path, WATCHDOG_USEC="200000", WATCHDOG_PID="1") as (sup, n):
        _messages(sup, "READY=1", 20)
        sup.settimeout(1.0)
        with pytest.raises(TimeoutError):
            while True:
                assert "WATCHDOG=1" not in sup.recv(4096).decode()
        assert n.stop() == 0


# -- the unit's SystemCallFilter against what nitro really calls -------------

def _strace_config(tmp: Path) -> str:
    """Everything whose system calls differ: a plain and a LUKS volume, two
    interfaces in a VPC with a host uplink TAP (a /24 of 198.18.0.0/15, the
    benchmarking range, picked per process so parallel runs do not clash)."""
    key_file(tmp)
    luks_format(tmp / "enc.img", tmp / "vol.key", 4 << 20)
    net = 1 + os.getpid() % 250
    return f"""
[[blk]]
id = "plain"
size = "16M"
{encrypted_cfg("enc")}
[[vpc]]
id = "blue"
cidr = "198.18.{net}.0/24"
gateway = "198.18.{net}.1"
uplink = {{ name = "nsc{os.getpid() % 100000}", address = "198.18.{net}.254/24" }}
[[net]]
id = "a"
vpc = "blue"
mac = "{A_MAC}"
ip = "198.18.{net}.10"
[[net]]
id = "b"
vpc = "blue"
mac = "{B_MAC}"
ip = "198.18.{net}.11"
"""


def _drive_net(n: Nitro, tmp: Path, config: str) -> None:
    """a sends b a frame (switch, RX copy) and asks the gateway's MAC
    (punted to the VPC responder); the host sends b a datagram through the
    uplink TAP (the kernel ARPs for b first)."""
    a_ip, b_ip = re.findall(r'^ip = "(\S+)"$', config, re.M)
    with NetFrontend(tmp / "a.sock") as a, NetFrontend(tmp / "b.sock") as b:
        b.start_vring(0)
        b.write_desc(0, GPA_BASE + b.data, 4096, VRING_DESC_F_WRITE)
        b.publish(0)
        a.start_vring(1)
        gateway = re.search(r'^gateway = "(\S+)"$', config, re.M).group(1)
        frames = [Ether(src=A_MAC, dst=B_MAC) / IP(src=a_ip, dst=b_ip) / ICMP(),
                  Ether(src=A_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=A_MAC, psrc=a_ip, pdst=gateway)]
        deadline = time.monotonic() + 10
        slot = 0
        while b.used_idx() == 0:  # b's RX ring is attached just after its enable reply
            assert time.monotonic() < deadline, "no frame reached b"
            for frame in frames:
                gpa = GPA_BASE + a.data + 4096 * (slot % a.num)
                a.write(gpa, bytes(12) + bytes(frame))  # virtio_net_hdr_v1, then the frame
                a.write_desc(slot % a.num, gpa, 12 + len(frame), 0)
                a.publish(slot % a.num)
                a.wait_used(1)
                slot += 1
            time.sleep(0.05)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"to b", (b_ip, 9))
        read = re.compile(r'^nitro_vpc_uplink_packets_total\{direction="out",[^}]*\} [1-9]', re.M)
        deadline = time.monotonic() + 10
        while not read.search(n.metrics()):  # the host's ARP request for b
            assert time.monotonic() < deadline, n.metrics()
            time.sleep(0.1)


def _child_of(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + 10
    while not children.read_text().split():
        assert time.monotonic() < deadline, f"process {pid} started no child"
        time.sleep(0.05)
    return int(children.read_text().split()[0])


def test_every_system_call_is_allowed_by_the_unit(short_tmp_path, vublk):
    """nitro under `strace -f` through its whole life (start, blk and LUKS
    I/O, switching, punts, the uplink TAP, a scrape, status, SIGHUP reload,
    SIGTERM drain): every system call made, by any thread or child, is one
    that systemd/nitro.service's SystemCallFilter= allows."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace not found: install the Debian package 'strace' (tools/install-deps.sh)")
    trace = short_tmp_path / "strace.out"
    config = _strace_config(short_tmp_path)
    n = Nitro(short_tmp_path, config, prefix=[strace, "-f", "-qq", "-o", str(trace)])
    daemon = _child_of(n.proc.pid)  # signal nitro itself: strace would detach first
    try:
        for dev in ("plain", "enc"):
            r = subprocess.run([str(vublk), "--socket", str(short_tmp_path / f"{dev}.sock"), "--rw", "verify",
                                "--ios", "256", "--size", "1m"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        _drive_net(n, short_tmp_path, config)
        assert "nitro_net_packets_total" in n.metrics()
        assert "blue" in n.status()
        os.kill(daemon, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "msg=reloaded" not in n.output():
            assert time.monotonic() < deadline, n.output()
            time.sleep(0.1)
        os.kill(daemon, signal.SIGTERM)
        assert n.proc.wait(60) == 0, n.output()  # strace exits with nitro's status
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)
        n.kill()
    used = set(re.findall(r"^\d+ +(\w+)\(", trace.read_text(), re.M))
    # The trace saw the datapath, the key memory, the TAP and the drain.
    # Volume I/O goes through the engine workers' io_uring (no preadv/pwritev).
    assert {"io_uring_setup", "io_uring_enter", "epoll_wait", "mlock", "ioctl", "accept4", "recvmsg",
            "fdatasync", "exit_group"} <= used
    assert used - allowed_syscalls(UNIT.read_text()) == set()
