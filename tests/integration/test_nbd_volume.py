"""Volumes on an NBD export: the real daemon, real NBD servers (nbdkit's
memory and file plugins, nbdkit --tls=require with a PSK file, qemu-nbd)
and the vublk front-end. Servers run on free loopback ports in the test's
directory and are stopped by PID (bench/nbd.py's launchers)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench.nbd import PSK_USER, NbdKit, QemuNbd, write_psk
from bench.proc import run_cli, tail
from tests.integration.frontend import GPA_BASE, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, Frontend
from tests.integration.test_hostile_tenant import wait_for
from tests.integration.test_qos import finish, metric, reads
from tests.ringlayout import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, blk_header

pytestmark = pytest.mark.integration

MiB = 1 << 20
SYS_PIDFD_GETFD = 438  # x86-64


def blk(url: str, extra: str = "") -> str:
    return f'[[blk]]\nid = "r0"\nsource = "{url}"\n{extra}'


def vublk_run(vublk: Path, sock: Path, *args: str, timeout: float = 90) -> tuple[int, dict | None, str]:
    r = subprocess.run([str(vublk), "--socket", str(sock), *args], capture_output=True,
                       text=True, timeout=timeout, check=False)
    out = json.loads(r.stdout) if r.stdout.strip() else None
    return r.returncode, out, r.stderr


def verify(vublk: Path, sock: Path, *args: str) -> dict:
    rc, res, err = vublk_run(vublk, sock, "--rw", "verify", *args)
    assert rc == 0 and res is not None, err
    assert res["errors"] == 0 and res["mismatches"] == 0, res
    return res


GUEST_WRITES = "nitro_blk_remote_guest_memory_writes_total"


def test_nbdkit_memory_data_and_discard(nitro, vublk, short_tmp_path):
    with NbdKit(short_tmp_path, ["memory", "64M"]) as server:
        n = nitro(blk(server.url(), "queues = 2\n"))
        sock = short_tmp_path / "r0.sock"
        res = verify(vublk, sock, "--size", "16m", "--bs", "64k", "--queues", "2")
        assert res["capacity_bytes"] == 64 * MiB
        # the memory plugin trims and zeroes: both offered to the driver
        assert int(res["backend_features"], 16) >> 13 & 3 == 3
        # a guest's scattered pages, unaligned to the request size: copied
        # into one NBD command each, none sent from guest memory
        sent = metric(n, GUEST_WRITES, device="r0")
        assert sent > 0  # the 64 KiB writes above: one buffer each
        verify(vublk, sock, "--size", "8m", "--offset", "20m", "--bs", "128k",
               "--seg-size", "4k", "--seed", "7", "--iodepth", "7",
               "--queue-size", "256")
        assert metric(n, GUEST_WRITES, device="r0") == sent
        # 256 KiB in four 64 KiB descriptors, laid out in reverse (vublk):
        # four NBD commands from guest memory, each at its own offset
        verify(vublk, sock, "--size", "8m", "--offset", "40m", "--bs", "256k", "--seed", "9")
        assert metric(n, GUEST_WRITES, device="r0") >= sent + 8 * MiB // (256 << 10)


def test_nbdkit_restart_under_writes_loses_no_acked_write(nitro, vublk, short_tmp_path):
    """The server goes away while a writer writes: requests wait, nitro
    reconnects and resends, the writer sees no error, and every block it
    got an ack for reads back (the file plugin keeps the data across the
    restart; the read-back is through the restarted server)."""
    image = short_tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "128M", str(image)], check=True)
    server = NbdKit(short_tmp_path, ["file", str(image)])
    n = nitro(blk(server.url(), "io_timeout = 20\n"))
    writer = subprocess.Popen([str(vublk), "--socket", str(short_tmp_path / "r0.sock"), "--rw",
                               "verify", "--size", "128m", "--bs", "4k", "--timeout", "25"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Started and stopped from this thread: nbdkit exits when the thread
    # that started it ends. The kill must land among the writes, which take
    # about half a second here: a fixed sleep landed after them, on the
    # flush between vublk's phases, as often as not.
    until_writing(n, 1000)
    # SIGKILL: the server vanishes mid-request (nbdkit's SIGTERM waits for
    # its clients to leave: that is a hung server, not a gone one).
    server.kill()
    time.sleep(1.0)
    with NbdKit(short_tmp_path, ["file", str(image)], port=server.port):
        out, err = writer.communicate(timeout=90)
    res = json.loads(out) if out.strip() else None
    assert writer.returncode == 0 and res is not None, f"{err}\nnitro:\n{tail(n.output())}"
    assert res["errors"] == 0 and res["mismatches"] == 0, res
    assert res["verified_bytes"] == 128 * MiB
    remote = json.loads(n.status_json())["devices"][0]["remote"]
    assert remote["disconnects"] >= 1 and remote["connects"] >= 2, remote
    assert remote["timeouts"] == 0, remote
    assert res["lat_max_us"] > 500_000, "the writer never waited: the restart missed it"


def until_writing(n, writes: int, timeout: float = 20, device: str = "r0") -> None:
    """Return once the daemon completed `writes` writes (its metrics)."""
    deadline = time.monotonic() + timeout
    while metric(n, "nitro_blk_requests_total", device=device, op="out") < writes:
        assert time.monotonic() < deadline, f"fewer than {writes} writes in {timeout} s"
        time.sleep(0.005)


def test_tls_psk_required(nitro, vublk, short_tmp_path):
    psk = write_psk(short_tmp_path / "keys.psk")
    with NbdKit(short_tmp_path, ["memory", "32M"], tls_psk=psk) as server:
        url = server.url().replace("nbd://", "nbds://")
        n = nitro(blk(url, f'tls_psk_file = "{psk}"\ntls_username = "{PSK_USER}"\n'))
        verify(vublk, short_tmp_path / "r0.sock", "--size", "8m", "--bs", "32k")
        # GnuTLS reads a payload in user space, where a guest's truncated
        # page would fault: over TLS every write is copied first.
        assert metric(n, GUEST_WRITES, device="r0") == 0


def test_tls_required_refuses_plaintext(nitro, short_tmp_path):
    psk = write_psk(short_tmp_path / "keys.psk")
    with NbdKit(short_tmp_path, ["memory", "32M"], tls_psk=psk) as server:
        with pytest.raises(Exception) as e:
            nitro(blk(server.url()))
        assert "cannot connect" in str(e.value)


def test_a_wrong_psk_fails_the_start(nitro, short_tmp_path):
    """Over TLS a wrong key looks like a server hanging up mid-handshake;
    unlike a plaintext server that hangs up (tests/integration/
    test_remote_waiting.py), it will not pass by itself: a start-up error."""
    psk = write_psk(short_tmp_path / "keys.psk")
    wrong = short_tmp_path / "wrong.psk"
    wrong.write_text(f"{PSK_USER}:{bytes(32).hex()}\n")
    wrong.chmod(0o600)
    with NbdKit(short_tmp_path, ["memory", "32M"], tls_psk=psk) as server:
        url = server.url().replace("nbd://", "nbds://")
        with pytest.raises(Exception) as e:
            nitro(blk(url, f'tls_psk_file = "{wrong}"\ntls_username = "{PSK_USER}"\n'))
        assert "cannot connect" in str(e.value) and "gnutls" in str(e.value), str(e.value)
        assert f"does {wrong} hold its key for user {PSK_USER}?" in str(e.value), str(e.value)


def test_qemu_nbd(nitro, vublk, short_tmp_path):
    image = short_tmp_path / "q.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    with QemuNbd(short_tmp_path, image) as server:
        nitro(blk(server.url()))
        verify(vublk, short_tmp_path / "r0.sock", "--size", "16m", "--bs", "16k")
    # what the guest wrote is in the image qemu-nbd served
    assert image.read_bytes()[:512] != bytes(512)


def test_io_timeout_turns_an_outage_into_ioerr(nitro, vublk, short_tmp_path):
    server = NbdKit(short_tmp_path, ["memory", "32M"])
    n = nitro(blk(server.url(), "io_timeout = 2\n"))
    sock = short_tmp_path / "r0.sock"
    verify(vublk, sock, "--size", "1m")  # connected and serving
    assert metric(n, "nitro_blk_remote_connections_up", device="r0") == 1
    assert metric(n, "nitro_blk_volume_info", device="r0", volume=server.url(), backend="nbd",
                  encrypted="false") == 1
    server.kill()
    t0 = time.monotonic()
    rc, res, err = vublk_run(vublk, sock, "--rw", "randwrite", "--ios", "4", "--iodepth", "4",
                             "--timeout", "20")
    waited = time.monotonic() - t0
    assert rc == 1 and "IOERR" in err, (rc, err)
    assert 1.9 <= waited < 10, f"the error came after {waited:.1f} s, io_timeout is 2 s"
    # What an operator sees: the four writes timed out, the link is down.
    assert res is not None and res["errors"] == 4, res
    assert metric(n, "nitro_blk_timeouts_total", device="r0") == 4
    assert metric(n, "nitro_blk_request_errors_total", device="r0", op="out") == 4
    assert metric(n, "nitro_blk_remote_connections_up", device="r0") == 0
    assert metric(n, "nitro_blk_remote_disconnects_total", device="r0") >= 1
    text = n.status()
    assert f"volume:      {server.url()} (nbd)" in text, text
    assert "remote:      connections 0/1 up; connects 1, " in text, text
    assert "; timed out 4\n" in text, text


def test_a_daemon_stops_while_its_nbd_server_hangs(nitro, vublk, short_tmp_path):
    """A server that hangs without closing the connection (SIGSTOP) under
    an attached, idle frontend: the drain's flush gets no answer. It gives
    up after io_timeout and hangs the connection up, and the daemon stops;
    before, it waited in nbd_flush for ever (past the unit's
    TimeoutStopSec, to a SIGKILL)."""
    server = NbdKit(short_tmp_path, ["memory", "32M"])
    n = nitro(blk(server.url(), "io_timeout = 2\n"))
    frontend = subprocess.Popen([str(vublk), "--socket", str(short_tmp_path / "r0.sock"), "--rw",
                                 "randwrite", "--runtime", "60", "--iodepth", "4"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until_writing(n, 100)
        frontend.send_signal(signal.SIGSTOP)  # attached, its last writes answered
        deadline = time.monotonic() + 10
        while metric(n, "nitro_blk_inflight_requests", device="r0") != 0:
            assert time.monotonic() < deadline, "the frozen frontend's writes never completed"
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert n.stop(timeout=30) == 0, tail(n.output())
        took = time.monotonic() - t0
        assert took < 2 + 3, f"the stop took {took:.1f} s, io_timeout is 2 s"
        assert "no answer to a flush in time (io_timeout 2 s); hung up" in n.output(), tail(n.output())
    finally:
        frontend.kill()
        frontend.wait()
        server.proc.send_signal(signal.SIGCONT)
        server.kill()


def read_past_slow_reads(nitro, vublk, tmp: Path, size: int, slow_below: int, iodepth: int) -> dict:
    """vublk reads 4 KiB blocks in order for 2 s at `iodepth` from an
    export of `size` bytes whose reads below offset `slow_below` take 4 s
    and all others are answered at once (poll_us = 0: the worker sleeps
    between passes, so nothing but kicks, answers and timers wakes it)."""
    plugin = ["eval", f"get_size=echo {size}", "thread_model=echo parallel",
              f'pread=if [ "$4" -lt {slow_below} ]; then sleep 4; fi; head -c "$3" /dev/zero']
    with NbdKit(tmp, plugin) as server:
        nitro("[daemon]\npoll_us = 0\n" + blk(server.url(), "readonly = true\n"))
        rc, res, err = vublk_run(vublk, tmp / "r0.sock", "--rw", "read", "--bs", "4k",
                                 "--iodepth", str(iodepth), "--runtime", "2", "--timeout", "10")
    assert rc == 0 and res is not None, err
    assert res["errors"] == 0, res
    return res


def test_new_requests_do_not_wait_for_a_slow_one(nitro, vublk, short_tmp_path):
    """A request the server is slow on holds the ring's wake_ns (its
    io_timeout) but not the queue: the ring stays armed, so a request the
    guest adds while the worker sleeps kicks it. Without that, every read
    here waits for the slow one (the read at offset 0)."""
    res = read_past_slow_reads(nitro, vublk, short_tmp_path, size=MiB, slow_below=1, iodepth=2)
    # the 255 other blocks of the 1 MiB export pass the slow read at offset 0
    assert res["ios"] >= 100, res


def test_a_deferred_answer_is_signalled_without_more_answers(nitro, vublk, short_tmp_path):
    """Answer moderation (cffi_build/nitro_nbd.c): with four or more
    requests at the server, the call for an answer waits for more answers
    or 20 us. Here the four reads in the first 16 KiB stay at the server
    for 4 s and every other one is answered at once, so each fast answer is
    deferred with nothing else to come: only the ring's timer signals it.
    Without that, vublk would see no answer until the slow ones return."""
    res = read_past_slow_reads(nitro, vublk, short_tmp_path, size=64 * MiB, slow_below=16384,
                               iodepth=5)
    assert res["ios"] >= 100, res


def test_qos_limits_an_nbd_volume_and_changes_live(nitro, vublk, short_tmp_path):
    """The NBD ring applies the volume's limits like every blk ring
    (blk_queue): requests are delayed, never failed, and `nitro volume
    qos` changes them live."""
    with NbdKit(short_tmp_path, ["memory", "32M"]) as server:
        n = nitro(blk(server.url(), "queues = 2\nqos = { iops = 200 }\n"))
        sock = short_tmp_path / "r0.sock"
        res = finish(reads(vublk, sock, "--ios", "400"))
        assert res["ios"] == 400
        assert res["ios"] <= 20 + 200 * res["seconds"] + 2, res  # the bucket plus 200 a second
        assert metric(n, "nitro_blk_qos_exceeded_iops_seconds_total", device="r0") > 0
        assert metric(n, "nitro_blk_qos_delayed_requests_total", device="r0") >= 100
        r = run_cli("volume", "qos", "r0", "--iops", "0", "--control", n.control, timeout=30)
        assert r.returncode == 0, r.stderr
        delayed = metric(n, "nitro_blk_qos_delayed_requests_total", device="r0")
        assert finish(reads(vublk, sock, "--ios", "2000"))["ios"] == 2000
        # Unlimited now: none of these was held back.
        assert metric(n, "nitro_blk_qos_delayed_requests_total", device="r0") == delayed
        assert metric(n, "nitro_blk_qos_limit", device="r0", limit="iops") == 0
        assert metric(n, "nitro_blk_request_errors_total", device="r0", op="in") == 0



def test_a_guest_truncating_a_write_sent_from_its_memory_breaks_only_its_device(
        nitro, short_tmp_path):
    """A plain write goes to the server from guest memory, read by the
    kernel's send(2): a guest that truncates those pages gets EFAULT there,
    not SIGBUS in libnbd. nitro takes it as the guest's memory fault, as
    its own guarded copy would: the device breaks, unanswered, and lets its
    requests go at once (no reconnecting and resending until io_timeout);
    the daemon, the server and another NBD device served by the same
    worker thread go on, and the guest's next connection works."""
    with NbdKit(short_tmp_path, ["memory", "32M"]) as server, \
            NbdKit(short_tmp_path, ["memory", "32M"], name="other") as other:
        n = nitro("[daemon]\nworkers = 1\n"
                  + blk(server.url(), "io_timeout = 60\n").replace('"r0"', '"a"')
                  + blk(other.url()).replace('"r0"', '"b"'))
        with Frontend(short_tmp_path / "a.sock") as evil:
            evil.start()
            # Answered: the queue holds a connection, so writes go from memory.
            assert evil.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"e" * 4096)[0] == 0
            sent = metric(n, GUEST_WRITES, device="a")
            assert sent == 1
            # Header and status in the page the guest keeps, 64 KiB of data
            # past the end it truncates the memory to.
            hdr = GPA_BASE + evil.data
            status, data = hdr + 512, hdr + (1 << 20)
            evil.write(hdr, blk_header(VIRTIO_BLK_T_OUT, 8))
            evil.write(status, b"\xee")
            evil.write(data, b"x" * (64 << 10))
            evil.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1)
            evil.write_desc(1, data, 64 << 10, VRING_DESC_F_NEXT, 2)
            evil.write_desc(2, status, 1, VRING_DESC_F_WRITE)
            os.ftruncate(evil.memfd, evil.data + 4096)
            evil.publish(0)
            wait_for(n, 'nitro_guest_errors_total{device="a",error="memory",kind="blk"} 1.0')
            wait_for(n, 'nitro_device_broken{device="a",kind="blk"} 1.0')
            assert metric(n, GUEST_WRITES, device="a") == sent + 1
            assert evil.read(status, 1) == b"\xee"  # never answered
            # The send's EFAULT broke it (not a guard's SIGBUS): the
            # connection died of it, and no new one was asked for.
            assert metric(n, "nitro_blk_remote_disconnects_total", device="a") == 1
            assert metric(n, "nitro_blk_remote_connects_total", device="a") == 1
            assert n.proc.poll() is None
            with Frontend(short_tmp_path / "b.sock") as good:
                good.start()
                for i in range(4):
                    assert good.blk_request(VIRTIO_BLK_T_OUT, 8 * i, data=bytes([i]) * 4096)[0] == 0
        # The broken device let go at once (the detach did not wait out
        # io_timeout), and its next connection reads what was acked.
        t0 = time.monotonic()
        with Frontend(short_tmp_path / "a.sock") as fresh:
            fresh.start()
            assert fresh.blk_request(VIRTIO_BLK_T_IN, 0, read_len=4096)[1] == b"e" * 4096
        assert time.monotonic() - t0 < 30
        assert metric(n, "nitro_blk_timeouts_total", device="a") == 0
        # One connection for the new session; none while broken.
        assert metric(n, "nitro_blk_remote_connects_total", device="a") == 2
    assert n.stop() == 0


def test_a_write_whose_descriptors_split_sectors_is_copied(nitro, vublk, short_tmp_path):
    """Descriptors may end mid-sector; runs sent from guest memory must be
    whole blocks of the server's (here 512 bytes, stated, and unaligned
    requests refused by it): such a write is copied into one command."""
    policy = ["--filter=blocksize-policy", "memory", "32M", "blocksize-minimum=512",
              "blocksize-error-policy=error"]
    with NbdKit(short_tmp_path, policy) as server:
        n = nitro(blk(server.url()))
        sock = short_tmp_path / "r0.sock"
        verify(vublk, sock, "--size", "1m", "--bs", "4k")  # connected, one run each
        sent = metric(n, GUEST_WRITES, device="r0")
        assert sent > 0
        # 128 KiB in runs of 40000 bytes (average 32 KiB): not whole sectors
        verify(vublk, sock, "--size", "4m", "--offset", "4m", "--bs", "128k",
               "--seg-size", "40000", "--seed", "5")
        assert metric(n, GUEST_WRITES, device="r0") == sent
        # runs of 32 KiB: whole sectors, sent from guest memory
        verify(vublk, sock, "--size", "4m", "--offset", "8m", "--bs", "128k",
               "--seg-size", "32k", "--seed", "6")
        assert metric(n, GUEST_WRITES, device="r0") >= sent + 32


def data_segments_out(port: int) -> int:
    """TCP data segments the daemon's one connection to `port` sent so
    far (the kernel's tcpi_data_segs_out, through ss)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    counts = [int(w.split(":")[1]) for w in out.split() if w.startswith("data_segs_out:")]
    assert len(counts) == 1, out
    return counts[0]


@pytest.mark.parametrize("rw", ["randwrite", "randread"])
def test_a_batch_of_requests_leaves_in_a_few_segments(nitro, vublk, short_tmp_path, rw):
    """The guest makes 32 requests available at once: the worker issues
    them with the socket corked, so they leave together (uncorked, each
    4 KiB write or read request was about a segment of its own: 33 and 37
    data segments for the 32 writes, 19 and 32 for the reads, in runs of
    the build before)."""
    with NbdKit(short_tmp_path, ["memory", "16M"]) as server:
        nitro(blk(server.url()))
        sock = short_tmp_path / "r0.sock"
        verify(vublk, sock, "--size", "1m", "--bs", "64k")  # connected; reads move data
        before = data_segments_out(server.port)
        rc, res, err = vublk_run(vublk, sock, "--rw", rw, "--bs", "4k", "--iodepth", "32",
                                 "--ios", "32", "--size", "1m")
        assert rc == 0 and res is not None and res["errors"] == 0, err
        sent = data_segments_out(server.port) - before
        assert 1 <= sent <= 8, sent


def tcp_cork_of(pid: int, port: int) -> list[bool]:
    """TCP_CORK on each of process `pid`'s sockets connected to
    127.0.0.1:`port` (libnbd's and the worker's duplicate of it), read
    through copies of its fds (pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    corks = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            with socket.socket(fileno=fd) as s:
                if s.family != socket.AF_INET or s.type != socket.SOCK_STREAM:
                    continue
                try:
                    if s.getpeername() != ("127.0.0.1", port):
                        continue
                except OSError:
                    continue
                corks.append(bool(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)))
    finally:
        os.close(pidfd)
    return corks


def test_a_guest_fault_in_a_corked_batch_leaves_the_connection_uncorked(nitro, short_tmp_path):
    """The guest makes two requests available at once (the batch is issued
    corked) and the second one's header is in memory it truncated: the
    worker's guard ends the poll half way. The connection outlives the
    broken device and serves its next session, so the cork is taken off
    there (left on, the kernel would hold each lone request up to 200 ms)."""
    with NbdKit(short_tmp_path, ["memory", "32M"]) as server:
        n = nitro("[daemon]\nworkers = 1\n" + blk(server.url()))
        with Frontend(short_tmp_path / "r0.sock") as evil:
            evil.start()
            assert evil.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"e" * 4096)[0] == 0
            hdr = GPA_BASE + evil.data
            status, data, gone = hdr + 512, hdr + 4096, hdr + (1 << 20)
            evil.write(hdr, blk_header(VIRTIO_BLK_T_OUT, 8))
            evil.write(status, b"\xee")
            evil.write(data, b"g" * 4096)
            evil.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1)
            evil.write_desc(1, data, 4096, VRING_DESC_F_NEXT, 2)
            evil.write_desc(2, status, 1, VRING_DESC_F_WRITE)
            evil.write_desc(3, gone, 16, VRING_DESC_F_NEXT, 4)
            evil.write_desc(4, gone + 4096, 1, VRING_DESC_F_WRITE)
            os.ftruncate(evil.memfd, evil.data + 8192)
            evil.publish(0, 3)  # one index update: one batch
            wait_for(n, 'nitro_device_broken{device="r0",kind="blk"} 1.0')
            assert metric(n, "nitro_blk_remote_connects_total", device="r0") == 1
            corks = tcp_cork_of(n.proc.pid, server.port)
            assert corks and not any(corks), corks
        with Frontend(short_tmp_path / "r0.sock") as fresh:
            fresh.start()
            assert fresh.blk_request(VIRTIO_BLK_T_IN, 0, read_len=4096)[1] == b"e" * 4096
        assert metric(n, "nitro_blk_remote_connects_total", device="r0") == 1
    assert n.stop() == 0


class ShortReadServer:
    """A hand-made NBD server (fixed newstyle, structured replies, one
    export of `size` bytes in memory) that breaks the protocol on purpose:
    a read at or past `short_from` is answered with half its data and the
    DONE flag. nbdkit and qemu-nbd cannot be made to do that. A thread
    per client; close() stops taking new ones."""

    def __init__(self, size: int, short_from: int) -> None:
        self.data = bytearray(size)
        self.short_from = short_from
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        self.listener.close()
        self.thread.join(5)
        assert not self.thread.is_alive()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._handshake(conn)
                while self._command(conn):
                    pass
            except (OSError, EOFError):
                pass

    @staticmethod
    def _recv(conn: socket.socket, n: int) -> bytes:
        buf = conn.recv(n, socket.MSG_WAITALL)  # short only at EOF
        if len(buf) < n:
            raise EOFError
        return buf

    def _handshake(self, conn: socket.socket) -> None:
        conn.sendall(b"NBDMAGICIHAVEOPT" + struct.pack(">H", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        self._recv(conn, 4)  # the client's flags
        while True:
            _, opt, length = struct.unpack(">QII", self._recv(conn, 16))
            self._recv(conn, length)
            if opt == 8:  # NBD_OPT_STRUCTURED_REPLY
                conn.sendall(self._opt_reply(opt, 1))  # NBD_REP_ACK
            elif opt == 7:  # NBD_OPT_GO: NBD_INFO_EXPORT (size; HAS_FLAGS | SEND_FLUSH), ACK
                info = struct.pack(">HQH", 0, len(self.data), 1 | 4)
                conn.sendall(self._opt_reply(opt, 3, info) + self._opt_reply(opt, 1))
                return
            else:
                conn.sendall(self._opt_reply(opt, 0x80000001))  # NBD_REP_ERR_UNSUP

    @staticmethod
    def _opt_reply(opt: int, kind: int, data: bytes = b"") -> bytes:
        return struct.pack(">QIII", 0x3E889045565A9, opt, kind, len(data)) + data

    def _command(self, conn: socket.socket) -> bool:
        _, _, kind, cookie, off, length = struct.unpack(">IHHQQI", self._recv(conn, 28))
        if kind == 0:  # READ: one OFFSET_DATA chunk, DONE
            n = length // 2 if off >= self.short_from else length
            chunk = struct.pack(">Q", off) + bytes(self.data[off:off + n])
            conn.sendall(struct.pack(">IHHQI", 0x668E33EF, 1, 1, cookie, len(chunk)) + chunk)
            return True
        if kind == 1:  # WRITE
            self.data[off:off + length] = self._recv(conn, length)
        elif kind == 2:  # DISC
            return False
        conn.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie))  # simple reply, OK
        return True


def test_a_read_the_server_answers_short_fails_with_ioerr(nitro, short_tmp_path):
    """A server that answers a read with less data than asked (here half,
    flagged done) breaks the protocol: the guest gets IOERR for that read,
    not whatever was in the buffer, and the device and its connection go
    on serving."""
    server = ShortReadServer(16 * MiB, short_from=8 * MiB)
    try:
        n = nitro(blk(server.url()))
        with Frontend(short_tmp_path / "r0.sock") as g:
            g.start()
            assert g.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"a" * 4096)[0] == 0
            assert g.blk_request(VIRTIO_BLK_T_IN, 0, read_len=4096) == (0, b"a" * 4096)
            # the slot's buffer still holds that read's data: not returned
            assert g.blk_request(VIRTIO_BLK_T_IN, 8 * MiB // 512, read_len=4096)[0] == 1  # IOERR
            assert g.blk_request(VIRTIO_BLK_T_IN, 0, read_len=4096) == (0, b"a" * 4096)
        assert metric(n, "nitro_blk_remote_disconnects_total", device="r0") == 0
    finally:
        server.close()
