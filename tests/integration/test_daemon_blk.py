"""The real daemon (`python -m nitro run`) on temporary sockets, driven by a
real vhost-user front-end over the real socket: data, config, hostile
messages and hostile descriptor chains, metrics, status, SIGTERM."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

from bench.proc import REPO, run_cli
from nitro.vhost.protocol import U64, ProtocolFeature, Request, VringFd
from tests.integration.frontend import GPA_BASE, Frontend
from tests.ringlayout import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    dwz_segment,
)

pytestmark = pytest.mark.integration


TWO_DEVICES = """
[[blk]]
id = "a"
size = "64M"
[[blk]]
id = "b"
size = "64M"
"""


def test_read_write_flush_getid_discard(nitro, short_tmp_path):
    n = nitro(TWO_DEVICES)
    with Frontend(short_tmp_path / "a.sock") as fe:
        features = fe.start()
        assert features >> 32 & 1  # VERSION_1
        cfg = fe.get_config()
        assert struct.unpack_from("<Q", cfg, 0)[0] == (64 << 20) // 512
        payload = os.urandom(64 << 10)
        assert fe.blk_request(VIRTIO_BLK_T_OUT, 2048, data=payload)[0] == 0
        status, got = fe.blk_request(VIRTIO_BLK_T_IN, 2048, read_len=len(payload))
        assert status == 0 and got == payload
        assert fe.blk_request(VIRTIO_BLK_T_FLUSH, 0)[0] == 0
        status, ident = fe.blk_request(VIRTIO_BLK_T_GET_ID, 0, read_len=20)
        assert status == 0 and ident.rstrip(b"\0") == b"a"
        # Out of range: IOERR, and the device keeps serving.
        assert fe.blk_request(VIRTIO_BLK_T_IN, (64 << 20) // 512, read_len=512)[0] == 1
        seg = dwz_segment(2048, 8, 0)
        assert fe.blk_request(VIRTIO_BLK_T_DISCARD, 0, data=seg)[0] == 0
        assert fe.blk_request(VIRTIO_BLK_T_IN, 2048, read_len=512)[1] == bytes(512)
    assert n.stop() == 0
    image = (short_tmp_path / "a.img").read_bytes()
    assert image[2048 * 512 + 65536 - 4096: 2048 * 512 + 65536] == payload[-4096:]
    assert image[2048 * 512: 2048 * 512 + 512] == bytes(512)


def test_garbage_message_drops_only_that_connection(nitro, short_tmp_path):
    n = nitro(TWO_DEVICES)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(short_tmp_path / "a.sock"))
        s.sendall(struct.pack("<III", 0xDEAD, 0x1, 8) + b"\0" * 8)  # unknown request
        s.settimeout(5)
        assert s.recv(100) == b""  # the daemon hung up on us
    with socket.socket(socket.AF_UNIX) as s:  # a payload far too large
        s.connect(str(short_tmp_path / "a.sock"))
        s.sendall(struct.pack("<III", int(Request.GET_FEATURES), 0x1, 1 << 30))
        s.settimeout(5)
        assert s.recv(100) == b""
    with Frontend(short_tmp_path / "a.sock") as fe:  # the socket still serves
        fe.start()
        assert fe.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"x" * 512)[0] == 0
    m = n.metrics()
    assert 'nitro_vhost_protocol_errors_total{device="a",kind="blk"} 2.0' in m
    assert n.proc.poll() is None
    assert n.stop() == 0


def _hostile_loop(fe: Frontend) -> None:
    fe.write_desc(0, GPA_BASE + 0x10000, 16, VRING_DESC_F_NEXT, 1)
    fe.write_desc(1, GPA_BASE + 0x11000, 512, VRING_DESC_F_NEXT, 0)  # back to 0
    fe.publish(0)


def _hostile_wild_address(fe: Frontend) -> None:
    fe.write_desc(0, 0xFFFF_FFFF_0000, 16, VRING_DESC_F_NEXT, 1)
    fe.write_desc(1, GPA_BASE + 0x11000, 1, VRING_DESC_F_WRITE)
    fe.publish(0)


def _hostile_bad_next(fe: Frontend) -> None:
    fe.write_desc(0, GPA_BASE + 0x10000, 16, VRING_DESC_F_NEXT, 999)
    fe.publish(0)


def _hostile_avail_jump(fe: Frontend) -> None:
    fe.set_avail_idx(fe.num + 5)
    os.eventfd_write(fe.kick, 1)


@pytest.mark.parametrize("attack, fault", [
    (_hostile_loop, "desc_loop"),
    (_hostile_wild_address, "desc_addr"),
    (_hostile_bad_next, "desc_index"),
    (_hostile_avail_jump, "avail_idx"),
])
def test_hostile_chain_breaks_only_its_device(nitro, short_tmp_path, attack, fault):
    n = nitro(TWO_DEVICES)
    with Frontend(short_tmp_path / "b.sock") as good:
        good.start()
        with Frontend(short_tmp_path / "a.sock") as evil:
            evil.start()
            attack(evil)
            want = f'nitro_guest_errors_total{{device="a",error="{fault}",kind="blk"}} 1.0'
            _wait_metric(n, want)
            # The worker counts the fault; the trio thread marks the device
            # broken when the engine reports the stopped ring, a moment later.
            _wait_metric(n, 'nitro_device_broken{device="a",kind="blk"} 1.0')
            assert f"BROKEN ({fault})" in n.status()
            # The other device on the same daemon is untouched.
            assert good.blk_request(VIRTIO_BLK_T_OUT, 8, data=b"g" * 4096)[0] == 0
        # A new frontend (guest reboot, QEMU restart) gets a working device.
        with Frontend(short_tmp_path / "a.sock") as fresh:
            fresh.start()
            assert fresh.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"y" * 512)[0] == 0
    # Counters survive the reconnect; the broken flag does not.
    assert want in n.metrics()
    assert 'nitro_device_broken{device="a",kind="blk"} 0.0' in n.metrics()
    assert n.stop() == 0


def _wait_metric(n, line: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while line not in n.metrics():
        assert time.monotonic() < deadline, n.metrics()
        time.sleep(0.1)


@pytest.mark.parametrize("reset", ["RESET_DEVICE", "RESET_OWNER", "SET_STATUS 0"])
def test_a_reset_revives_a_broken_device_on_the_same_connection(nitro, short_tmp_path, reset):
    """Issue 11 item 6: a driver reset or guest reboot arrives on the same
    connection (QEMU 7.2 sends SET_STATUS 0, others RESET_DEVICE or
    RESET_OWNER); it must serve the device again. The fault is signalled on
    the ring's SET_VRING_ERR eventfd first."""
    n = nitro(TWO_DEVICES)
    with Frontend(short_tmp_path / "a.sock") as fe:
        err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            fe.start(protocol_features=ProtocolFeature.STATUS)
            fe.send(Request.SET_VRING_ERR, VringFd(0), fds=[err])
            fe.get_config()  # a round trip: the err fd is in place
            _hostile_loop(fe)
            _wait_metric(n, 'nitro_device_broken{device="a",kind="blk"} 1.0')
            assert select.select([err], [], [], 5)[0] == [err]
            assert os.eventfd_read(err) == 1
        finally:
            os.close(err)
        if reset == "SET_STATUS 0":
            fe.send(Request.SET_STATUS, U64(0), need_reply=True)
            fe.ack(Request.SET_STATUS)
        else:
            fe.send(Request[reset], need_reply=True)
            fe.ack(Request[reset])
        fe.forget_ring()
        fe.start(protocol_features=ProtocolFeature.STATUS)
        assert fe.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"z" * 512)[0] == 0
        assert fe.blk_request(VIRTIO_BLK_T_IN, 0, read_len=512)[1] == b"z" * 512
        assert 'nitro_device_broken{device="a",kind="blk"} 0.0' in n.metrics()
        assert '"connections": 1' in n.status_json()
    assert n.stop() == 0


def test_readonly_device_rejects_writes(nitro, short_tmp_path):
    (short_tmp_path / "ro.img").write_bytes(b"r" * (1 << 20))
    n = nitro('[[blk]]\nid = "ro"\nreadonly = true\n')
    with Frontend(short_tmp_path / "ro.sock") as fe:
        features = fe.start()
        assert features >> 5 & 1  # VIRTIO_BLK_F_RO
        assert fe.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"w" * 512)[0] == 1
        assert fe.blk_request(VIRTIO_BLK_T_IN, 0, read_len=512)[1] == b"r" * 512
    assert n.stop() == 0
    assert (short_tmp_path / "ro.img").read_bytes() == b"r" * (1 << 20)


def test_get_vring_base_and_reconnect_resume(nitro, short_tmp_path):
    n = nitro(TWO_DEVICES)
    with Frontend(short_tmp_path / "a.sock") as fe:
        fe.start()
        for i in range(3):
            assert fe.blk_request(VIRTIO_BLK_T_OUT, i, data=bytes([i]) * 512)[0] == 0
        assert fe.get_vring_base() == 3
    assert n.proc.poll() is None
    assert "connections 1" in n.status() or '"connections": 1' in n.status()
    assert n.stop() == 0


def test_status_json_is_one_document_with_the_text_s_content(nitro, short_tmp_path):
    n = nitro(TWO_DEVICES)
    with Frontend(short_tmp_path / "a.sock") as fe:
        fe.start()
        doc = json.loads(n.status_json())  # the whole stdout is one document
        text = n.status()
    devices = {d["id"]: d for d in doc["devices"]}
    assert sorted(devices) == ["a", "b"]
    a, b = devices["a"], devices["b"]
    assert a["kind"] == "blk" and a["socket"] == str(short_tmp_path / "a.sock")
    assert a["state"] == "connected" and b["state"] == "waiting"
    assert "VERSION_1" in a["feature_names"] and b["feature_names"] == []
    assert f"features:    {a['features']:#x} {' '.join(a['feature_names'])}" in text
    assert n.stop() == 0


def test_a_saturated_blocking_call_eventfd_does_not_hang_the_queue(nitro, short_tmp_path):
    """A frontend hands a blocking call eventfd one below saturation: C's
    write of 1 after the first completion would block its worker forever
    (no further request served, no drain). nitro makes the fd O_NONBLOCK
    when it takes it; the write then fails with EAGAIN and the queue goes on."""
    n = nitro(TWO_DEVICES)
    with Frontend(short_tmp_path / "a.sock") as fe:
        os.close(fe.call)
        fe.call = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, as the frontend chose
        os.eventfd_write(fe.call, 0xFFFF_FFFF_FFFF_FFFE)
        fe.start()
        fe.get_config()  # a round trip: SET_VRING_CALL has been applied
        assert not os.get_blocking(fe.call)  # one file description, shared with nitro
        for i in range(3):
            assert fe.blk_request(VIRTIO_BLK_T_OUT, i, data=bytes([i]) * 512)[0] == 0
    assert n.stop() == 0


ONE_WORKER = "[daemon]\nworkers = 1\n" + TWO_DEVICES


def test_a_call_eventfd_made_blocking_again_breaks_only_its_device(nitro, short_tmp_path):
    """Issue 11 item 1, the rest of it: the frontend shares the call fd's
    file description, so it can clear the O_NONBLOCK nitro set and park the
    counter at 2^64-2. nitro's next call then sleeps in write(): before the
    watchdog (cffi_build/nitro_efd.h) that hung the one worker serving both
    devices for good. Now the write is cut short, the jamming device breaks
    with fault "eventfd", the other device on the same worker goes on, and
    a reset does not revive the jammer (a reconnect does)."""
    n = nitro(ONE_WORKER)
    with Frontend(short_tmp_path / "b.sock") as good, Frontend(short_tmp_path / "a.sock") as evil:
        good.start()
        evil.start()
        evil.get_config()  # a round trip: nitro holds the call fd
        os.set_blocking(evil.call, True)  # for nitro's copy too
        os.eventfd_write(evil.call, 0xFFFF_FFFF_FFFF_FFFE)
        assert evil.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"e" * 512)[0] == 0  # used ring first
        _wait_metric(n, 'nitro_device_broken{device="a",kind="blk"} 1.0')
        assert "BROKEN (eventfd)" in n.status()
        for i in range(4):
            assert good.blk_request(VIRTIO_BLK_T_OUT, 8 * i, data=bytes([i]) * 512)[0] == 0
        evil.send(Request.RESET_OWNER, need_reply=True)
        evil.ack(Request.RESET_OWNER)
        assert 'nitro_device_broken{device="a",kind="blk"} 1.0' in n.metrics()
    with Frontend(short_tmp_path / "a.sock") as fresh:
        fresh.start()
        assert fresh.blk_request(VIRTIO_BLK_T_IN, 0, read_len=512)[1] == b"e" * 512
    assert n.proc.poll() is None
    assert n.stop() == 0


def test_bad_config_exits_2_with_one_line(short_tmp_path):
    cfg = short_tmp_path / "bad.toml"
    cfg.write_text('[[blk]]\nid = "x"\nqueues = 99\n')
    r = run_cli("run", "--config", cfg, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"nitro: error: config {cfg}: blk[0].queues: expected an integer in 1..16, got 99")


def test_missing_image_fails_before_listening(short_tmp_path):
    cfg = short_tmp_path / "c.toml"
    cfg.write_text('[metrics]\nlisten = ""\n[[blk]]\nid = "x"\n')
    r = run_cli("run", "--config", cfg, "--runtime-dir", short_tmp_path, "--state-dir", short_tmp_path,
                timeout=30)
    assert r.returncode == 1 and "device x:" in r.stderr and "cannot open" in r.stderr
    assert not (short_tmp_path / "x.sock").exists()


def test_print_capabilities():
    r = run_cli("--print-capabilities", timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '{"type": "block", "features": []}'


def test_own_config_on_a_fresh_machine_comes_up(short_tmp_path):
    """`nitro run --config F` where F names a runtime directory that does
    not exist yet and puts its blk socket elsewhere: nothing else creates
    the control socket's directory, and the daemon used to fail with
    "cannot listen on control socket ...: No such file or directory"."""
    from nitro.control.client import query

    run_dir, state_dir = short_tmp_path / "run/nitro", short_tmp_path / "lib/nitro"
    sock = short_tmp_path / "vm/a.sock"
    cfg = short_tmp_path / "x.toml"
    cfg.write_text(f'[daemon]\nruntime_dir = "{run_dir}"\nstate_dir = "{state_dir}"\n'
                   f'[metrics]\nlisten = ""\n'
                   f'[[blk]]\nid = "a"\nsocket = "{sock}"\nimage = "a.img"\nsize = "1M"\n')
    control = run_dir / "control.sock"
    with open(short_tmp_path / "nitro.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nitro", "run", "--config", str(cfg)],
                                cwd=REPO, stderr=log)
        try:
            deadline = time.monotonic() + 20
            while not control.exists():
                assert proc.poll() is None, (short_tmp_path / "nitro.log").read_text()
                assert time.monotonic() < deadline, "no control socket"
                time.sleep(0.05)
            assert query(control, {"cmd": "ping"})["ok"] is True
            status = query(control, {"cmd": "status"})
            assert [d["id"] for d in status["devices"]] == ["a"]
            assert sock.exists() and (state_dir / "a.img").stat().st_size == 1 << 20
            proc.terminate()
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_directory_that_cannot_be_created_is_one_line(short_tmp_path):
    (short_tmp_path / "file").write_text("")
    cfg = short_tmp_path / "x.toml"
    cfg.write_text(f'[daemon]\nruntime_dir = "{short_tmp_path}/file/run"\nstate_dir = "{short_tmp_path}"\n'
                   '[metrics]\nlisten = ""\n[[blk]]\nid = "a"\nsize = "1M"\n')
    r = subprocess.run([sys.executable, "-m", "nitro", "run", "--config", str(cfg)],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"nitro: error: cannot create the runtime directory "
                                f"{short_tmp_path}/file/run: Not a directory")


def test_kick_without_fd_is_refused(nitro, short_tmp_path):
    n = nitro(TWO_DEVICES)
    with Frontend(short_tmp_path / "a.sock") as fe:
        fe.call_u64(Request.GET_FEATURES)
        fe.send(Request.SET_VRING_KICK, VringFd(0, invalid=True))
        fe.sock.settimeout(5)
        assert fe.sock.recv(1) == b""
    assert n.proc.poll() is None and n.stop() == 0
