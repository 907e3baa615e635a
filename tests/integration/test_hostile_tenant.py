"""One hostile tenant must not hurt another (docs/security.md), against the
real daemon: a frontend that truncates its guest RAM mid-I/O, frontends
asking for more guest memory than the daemon may map, and the engine
workers' seccomp filter."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

from tests.integration.attacker import kick_storm
from tests.integration.frontend import GPA_BASE, MEM_SIZE, Frontend
from tests.integration.test_daemon_blk import TWO_DEVICES
from tests.ringlayout import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, blk_header


def wait_for(n, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (m := n.metrics()):
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    return m


def queue_reads(fe: Frontend, count: int, size: int = 64 << 10) -> None:
    """count 3-descriptor reads published and kicked, not waited for."""
    for k in range(count):
        base = fe.data + k * (size + 4096)
        d = 3 * k
        fe.write(fe_gpa(fe, base), blk_header(VIRTIO_BLK_T_IN, k * (size // 512)))
        fe.write_desc(d, fe_gpa(fe, base), 16, 1, d + 1)            # NEXT
        fe.write_desc(d + 1, fe_gpa(fe, base + 16), size, 3, d + 2)  # NEXT | WRITE
        fe.write_desc(d + 2, fe_gpa(fe, base + 16 + size), 1, 2)     # WRITE
        fe.publish(d)


def fe_gpa(fe: Frontend, off: int) -> int:
    return GPA_BASE + off


def test_a_frontend_truncating_its_memory_mid_io_breaks_only_its_device(nitro, short_tmp_path):
    n = nitro(TWO_DEVICES)
    with Frontend(short_tmp_path / "b.sock") as good:
        good.start()
        with Frontend(short_tmp_path / "a.sock") as evil:
            evil.start()
            assert evil.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"e" * 4096)[0] == 0
            queue_reads(evil, 16)
            os.ftruncate(evil.memfd, 0)  # the guest's RAM is gone under nitro
            os.eventfd_write(evil.kick, 1)
            wait_for(n, 'nitro_guest_errors_total{device="a",error="memory",kind="blk"} 1.0')
            # Marked broken by the trio thread a moment after the worker counts the fault.
            wait_for(n, 'nitro_device_broken{device="a",kind="blk"} 1.0')
            assert "BROKEN (memory)" in n.status()
            assert n.proc.poll() is None
            # The other tenant on the same daemon and worker goes on.
            for i in range(8):
                assert good.blk_request(VIRTIO_BLK_T_OUT, 8 * i, data=bytes([i]) * 4096)[0] == 0
        # The truncating frontend's next connection (with memory) works.
        with Frontend(short_tmp_path / "a.sock") as fresh:
            fresh.start()
            assert fresh.blk_request(VIRTIO_BLK_T_IN, 0, read_len=4096)[1] == b"e" * 4096
    assert n.stop() == 0


def test_guest_memory_past_the_cap_is_refused_by_name(nitro, short_tmp_path):
    cap = MEM_SIZE + MEM_SIZE // 2
    n = nitro(f"[daemon]\nmax_guest_memory = {cap}\n" + TWO_DEVICES)
    with Frontend(short_tmp_path / "a.sock") as first:
        first.start()
        assert first.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"1" * 512)[0] == 0
        status = n.status()
        assert f"guest memory mapped: {MEM_SIZE >> 20} MiB of max_guest_memory {cap >> 20} MiB" in status
        value = re.search(r"^nitro_guest_memory_mapped_bytes (\S+)$", n.metrics(), re.M)
        assert value and float(value.group(1)) == MEM_SIZE
        with Frontend(short_tmp_path / "b.sock") as second:
            try:
                second.start()
            except AssertionError as e:
                assert "SET_MEM_TABLE failed: 1" in str(e)
            else:
                raise AssertionError("the second guest's memory was mapped past the cap")
        deadline = time.monotonic() + 10
        while "[daemon] max_guest_memory" not in n.output():
            assert time.monotonic() < deadline, n.output()
            time.sleep(0.1)
        line = next(x for x in n.output().splitlines() if "[daemon] max_guest_memory" in x)
        assert "device=b" in line or "SET_MEM_TABLE" in line, line
        assert f"max_guest_memory is {cap} bytes" in line, line
        # The first tenant is untouched.
        assert first.blk_request(VIRTIO_BLK_T_OUT, 8, data=b"2" * 512)[0] == 0
    assert n.stop() == 0


def _worker_seccomp_modes(pid: int) -> dict[str, int]:
    modes = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        comm = (task / "comm").read_text().strip()
        mode = re.search(r"^Seccomp:\s+(\d)", (task / "status").read_text(), re.M)
        modes[comm] = int(mode.group(1)) if mode else -1
    return modes


def test_the_daemons_engine_workers_run_under_seccomp(nitro, short_tmp_path):
    n = nitro(TWO_DEVICES)
    with Frontend(short_tmp_path / "a.sock") as fe:
        fe.start()
        assert fe.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"s" * 4096)[0] == 0
        modes = _worker_seccomp_modes(n.proc.pid)
    workers = {k: v for k, v in modes.items() if k.startswith("nitro-w")}
    assert workers and set(workers.values()) == {2}, modes  # SECCOMP_MODE_FILTER
    # The main (trio) thread, which opens images and sockets, is not confined.
    assert re.search(r"^Seccomp:\s+0", Path(f"/proc/{n.proc.pid}/status").read_text(), re.M)
    assert ", seccomp" in n.status()
    assert n.stop() == 0


def test_seccomp_can_be_turned_off_for_debugging(nitro, short_tmp_path):
    n = nitro("[daemon]\nseccomp = false\n" + TWO_DEVICES)
    modes = _worker_seccomp_modes(n.proc.pid)
    workers = {k: v for k, v in modes.items() if k.startswith("nitro-w")}
    assert workers and set(workers.values()) == {0}, modes
    assert n.stop() == 0


def _worker_counter(n, name: str) -> float:
    return sum(float(line.split()[-1]) for line in n.metrics().splitlines()
               if line.startswith(name + "{"))


def test_a_kick_storm_gets_its_ring_muted_not_a_spinning_worker(nitro, short_tmp_path):
    """A frontend writing its kick eventfd in a loop would wake the worker at
    every attempt to sleep: a core spinning for nothing, taken from every
    ring on that worker. After MUTE_AFTER empty kicks the engine stops waking
    for that ring (nitro_engine_kick_mutes_total) and polls it every
    millisecond instead; a request the stormer does publish is still served,
    and so is the other tenant."""
    n = nitro("[daemon]\nworkers = 1\n" + TWO_DEVICES)
    storm = threading.Thread(target=kick_storm, args=(short_tmp_path / "a.sock", 3.0))
    storm.start()
    try:
        deadline = time.monotonic() + 10
        while _worker_counter(n, "nitro_engine_kick_mutes_total") < 1:
            assert time.monotonic() < deadline and storm.is_alive(), n.metrics()
            time.sleep(0.1)
        with Frontend(short_tmp_path / "b.sock") as good:
            good.start()
            for i in range(8):
                assert good.blk_request(VIRTIO_BLK_T_OUT, 8 * i, data=bytes([i]) * 4096)[0] == 0
    finally:
        storm.join()
    # The stormer's next connection is served at once (its ring unmuted by work).
    with Frontend(short_tmp_path / "a.sock") as fe:
        fe.start()
        for _ in range(200):
            os.eventfd_write(fe.kick, 1)
        assert fe.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"k" * 4096)[0] == 0
    assert n.proc.poll() is None
    assert n.stop() == 0
