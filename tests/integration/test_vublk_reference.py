"""vublk (tools/vublk.c) proven against the reference back-end.

vublk is the userspace vhost-user-blk front-end that the benchmarks and the
nitro integration tests use instead of a (slow, TCG) guest. Before it may judge
nitro it has to be right against qemu-storage-daemon, QEMU's own
vhost-user-blk export: a failure in this file is a vublk failure, never
nitro's.

The data check does not trust vublk's own verify alone: the bytes vublk wrote
through the back-end are read from the image file on the host and compared
with the pattern computed here, independently, from the definition printed in
`vublk --help`.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.proc import Child, ChildError

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
IMAGE_SIZE = 64 * MiB

VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

# --------------------------------------------------------------------------
# the verify pattern, as documented in `vublk --help`

_M64 = (1 << 64) - 1
_SECTOR = struct.Struct("<64Q")


def mix64(z: int) -> int:
    """The splitmix64 finaliser."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def pattern(seed: int, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the verify pattern for `seed`.

    Sector s (512 bytes at s*512) holds 64 little-endian u64 words; word i is
    mix64(seed ^ ((s << 6) | i)).
    """
    assert offset % 512 == 0 and length % 512 == 0
    seed &= _M64
    out = bytearray()
    for s in range(offset // 512, (offset + length) // 512):
        base = s << 6
        out += _SECTOR.pack(*[mix64(seed ^ (base | i)) for i in range(64)])
    return bytes(out)


def test_pattern_reference_values() -> None:
    """Pin the Python pattern so a change to either side is noticed."""
    first = pattern(7, 0, 512)
    assert struct.unpack_from("<Q", first, 0)[0] == mix64(7)
    assert first[:8].hex() == "d70d3259e4e1cb63"
    assert pattern(7, 512, 512) != first


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def qsd_binary() -> str:
    path = shutil.which("qemu-storage-daemon")
    if path is None:
        pytest.fail(
            "qemu-storage-daemon is not installed; it is the reference "
            "vhost-user-blk back-end these tests need "
            "(apt-get install qemu-system-common, or qemu-system-x86)"
        )
    return path


@pytest.fixture
def workdir() -> Iterator[Path]:
    # short path: unix socket paths are limited to 107 bytes
    d = Path(tempfile.mkdtemp(prefix="vublk-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Qsd(Child):
    """qemu-storage-daemon serving a fresh sparse image (reads as zeros)."""

    def __init__(self, binary: str, workdir: Path, num_queues: int = 1,
                 aio: str = "threads", size: int = IMAGE_SIZE) -> None:
        self.image = workdir / f"disk-{num_queues}.img"
        self.socket = workdir / f"qsd-{num_queues}.sock"
        with open(self.image, "wb") as f:
            f.truncate(size)
        argv = [
            binary,
            "--blockdev",
            f"driver=file,node-name=file0,filename={self.image},aio={aio},cache.direct=off",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export",
            (
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                f"addr.path={self.socket},writable=on,num-queues={num_queues}"
            ),
        ]
        super().__init__(argv, workdir / f"qsd-{num_queues}.log")
        try:
            self.wait_for(self.socket, 10)
        except ChildError as e:
            self.stop(timeout=10)
            pytest.fail(str(e))


@pytest.fixture
def qsd(qsd_binary: str, workdir: Path) -> Iterator[Qsd]:
    d = Qsd(qsd_binary, workdir)
    try:
        yield d
    finally:
        d.stop()


def run_vublk(vublk: Path, *args: str, timeout: float = 60) -> tuple[int, dict | None, str]:
    r = subprocess.run([str(vublk), *args], capture_output=True, text=True,
                       timeout=timeout, check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    result = json.loads(lines[-1]) if lines else None
    if result is not None:
        assert len(lines) == 1, f"vublk printed more than one stdout line: {r.stdout!r}"
    return r.returncode, result, r.stderr


def read_image(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def check_common(res: dict) -> None:
    features = int(res["backend_features"], 16)
    acked = int(res["acked_features"], 16)
    assert features & VIRTIO_F_VERSION_1
    assert acked & VIRTIO_F_VERSION_1 and acked & VHOST_USER_F_PROTOCOL_FEATURES
    assert acked & ~features == 0, "acked a feature the back-end did not offer"
    assert res["capacity_bytes"] == IMAGE_SIZE
    assert res["errors"] == 0
    assert res["len_mismatch"] == 0


# --------------------------------------------------------------------------
# data path against qemu-storage-daemon


def test_verify_writes_the_documented_pattern(vublk: Path, qsd: Qsd) -> None:
    seed, offset, size = 0x5EED1234, 1 * MiB, 8 * MiB
    rc, res, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", "verify",
                             "--bs", "4096", "--iodepth", "32", "--offset", str(offset),
                             "--size", str(size), "--seed", str(seed))
    assert rc == 0, err
    assert res is not None
    check_common(res)
    assert res["rw"] == "verify"
    assert res["mismatches"] == 0
    assert res["verified_bytes"] == size
    assert res["flushed"] is True
    assert res["ios"] == 2 * size // 4096  # every block written once and read once
    assert qsd.running()

    # the host's view of the image: pattern exactly where vublk wrote, zeros around
    assert read_image(qsd.image, offset, size) == pattern(seed, offset, size)
    assert read_image(qsd.image, 0, offset) == bytes(offset)
    assert read_image(qsd.image, offset + size, MiB) == bytes(MiB)


def test_verify_read_catches_wrong_data(vublk: Path, qsd: Qsd) -> None:
    """The compare really compares: host-written data, then a corruption."""
    seed, size = 99, 2 * MiB
    with open(qsd.image, "r+b") as f:
        f.write(pattern(seed, 0, size))
    rc, res, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", "verify-read",
                             "--size", str(size), "--seed", str(seed), "--bs", "65536")
    assert rc == 0, err
    assert res is not None and res["mismatches"] == 0

    with open(qsd.image, "r+b") as f:
        f.seek(1_000_003)
        f.write(b"\x00")
    rc, res, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", "verify-read",
                             "--size", str(size), "--seed", str(seed), "--bs", "65536")
    assert rc == 1, err
    assert res is not None and res["mismatches"] == 1
    assert "verify mismatch at byte offset 1000000 " in err  # word-aligned report

    rc, res, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", "verify-read",
                             "--size", str(size), "--seed", str(seed + 1))
    assert rc == 1
    assert res is not None and res["mismatches"] == size // 512


def test_verify_multiqueue_large_blocks(vublk: Path, qsd_binary: str, workdir: Path) -> None:
    d = Qsd(qsd_binary, workdir, num_queues=2)
    try:
        seed, size = 4242, 16 * MiB
        rc, res, err = run_vublk(vublk, "--socket", str(d.socket), "--rw", "verify",
                                 "--queues", "2", "--iodepth", "8", "--bs", "128k",
                                 "--size", str(size), "--seed", str(seed), "--poll")
        assert rc == 0, err
        assert res is not None
        check_common(res)
        assert res["queues"] == 2 and res["mismatches"] == 0
        assert read_image(d.image, 0, size) == pattern(seed, 0, size)
    finally:
        d.stop()


@pytest.mark.parametrize("bs,seg", [("128k", "4096"), ("64k", "1000"), ("4k", "512")])
def test_verify_scattered_segments(vublk: Path, qsd: Qsd, bs: str, seg: str) -> None:
    """Data split over many descriptors laid out in reverse order in memory,
    like a guest's scattered pages: a back-end must follow the chain."""
    seed, size = 777 + int(seg), 4 * MiB
    rc, res, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", "verify",
                             "--bs", bs, "--seg-size", seg, "--iodepth", "8",
                             "--size", str(size), "--seed", str(seed))
    assert rc == 0, err
    assert res is not None
    check_common(res)
    assert res["mismatches"] == 0
    bs_bytes = int(bs[:-1]) * 1024
    assert res["descs_per_req"] == 2 + -(-bs_bytes // int(seg))
    assert read_image(qsd.image, 0, size) == pattern(seed, 0, size)


@pytest.mark.parametrize("rw", ["randread", "randwrite"])
@pytest.mark.parametrize("mode", ["interrupt", "poll", "no-event-idx"])
def test_random_io(vublk: Path, qsd: Qsd, rw: str, mode: str) -> None:
    extra = {"interrupt": [], "poll": ["--poll"], "no-event-idx": ["--no-event-idx"]}[mode]
    rc, res, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", rw, "--bs", "4096",
                             "--iodepth", "32", "--ios", "2000", "--seed", "3", *extra)
    assert rc == 0, err
    assert res is not None
    check_common(res)
    assert res["rw"] == rw and res["bs"] == 4096 and res["iodepth"] == 32
    assert res["ios"] == 2000
    assert 0 < res["seconds"] < 30
    assert res["iops"] == pytest.approx(2000 / res["seconds"], rel=1e-3)
    assert res["mbps"] == pytest.approx(res["iops"] * 4096 / 1e6, rel=1e-3)
    assert 0 < res["lat_p50_us"] <= res["lat_p99_us"] <= res["lat_max_us"] * 1.07
    assert res["event_idx"] is (mode != "no-event-idx")
    assert res["poll"] is (mode == "poll")
    assert res["kicks"] >= 1
    if mode == "poll":
        assert res["calls"] == 0
    else:
        assert res["calls"] >= 1
    assert qsd.running()


def test_randwrite_stays_in_region(vublk: Path, qsd: Qsd) -> None:
    offset, size = 4 * MiB, 1 * MiB
    rc, res, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", "randwrite",
                             "--offset", str(offset), "--size", str(size), "--ios", "2000")
    assert rc == 0, err
    assert res is not None and res["errors"] == 0
    data = read_image(qsd.image, 0, IMAGE_SIZE)
    assert data[:offset] == bytes(offset)
    assert data[offset + size:] == bytes(IMAGE_SIZE - offset - size)
    assert data[offset:offset + size] != bytes(size)


@pytest.mark.parametrize("extra", [[], ["--seg-size", "16"]])
def test_get_id(vublk: Path, qsd: Qsd, extra: list[str]) -> None:
    rc, res, err = run_vublk(vublk, "--socket", str(qsd.socket), "--check-id", *extra)
    assert rc == 0, err
    assert res is not None
    # QEMU 7.2's vhost-user-blk export answers GET_ID with this serial
    assert res["id"] == "vhost_user_blk"
    assert res["ios"] == 0


def test_sequential_runtime(vublk: Path, qsd: Qsd) -> None:
    rc, res, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", "read",
                             "--bs", "128k", "--iodepth", "8", "--runtime", "0.5")
    assert rc == 0, err
    assert res is not None
    check_common(res)
    assert 0.5 <= res["seconds"] < 5
    assert res["ios"] > 0


# --------------------------------------------------------------------------
# failures are clean and bounded


def test_nonexistent_socket(vublk: Path, workdir: Path) -> None:
    path = workdir / "nobody-listens.sock"
    t0 = time.monotonic()
    rc, res, err = run_vublk(vublk, "--socket", str(path), "--rw", "randread", timeout=20)
    assert rc == 3
    assert res is None
    assert "cannot connect" in err and str(path) in err
    assert time.monotonic() - t0 < 5


def test_usage_errors(vublk: Path, qsd: Qsd) -> None:
    rc, _, err = run_vublk(vublk, "--rw", "randread")
    assert rc == 2 and "--socket" in err
    rc, _, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", "bogus")
    assert rc == 2 and "bogus" in err
    rc, _, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", "randread",
                           "--size", "1G")
    assert rc == 2 and "exceeds the disk" in err
    rc, _, err = run_vublk(vublk, "--socket", str(qsd.socket), "--rw", "randread",
                           "--queues", "2")
    assert rc == 3 and "num_queues" in err
    r = subprocess.run([str(vublk), "--help"], capture_output=True, text=True,
                       timeout=10, check=False)
    assert r.returncode == 0 and "mix64" in r.stdout


def test_backend_dies_mid_run(vublk: Path, qsd: Qsd) -> None:
    p = subprocess.Popen([str(vublk), "--socket", str(qsd.socket), "--rw", "randread",
                          "--runtime", "20", "--timeout", "3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        qsd.proc.kill()
        _, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 3
    assert "closed the connection" in err or "no completion" in err


class FakeBackend:
    """A vhost-user 'back-end' that misbehaves in one chosen way."""

    def __init__(self, path: Path, behaviour: str) -> None:
        self.behaviour = behaviour
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.srv.settimeout(10)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                hdr = conn.recv(12, socket.MSG_WAITALL)
                req, _flags, _size = struct.unpack("<III", hdr)
                assert req == 1  # GET_FEATURES comes first
                feats = struct.pack("<Q", VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
                if self.behaviour == "wrong-type":
                    conn.sendall(struct.pack("<III", 2, 0x5, 8) + feats)
                elif self.behaviour == "no-reply-flag":
                    conn.sendall(struct.pack("<III", 1, 0x1, 8) + feats)
                elif self.behaviour == "bad-size":
                    conn.sendall(struct.pack("<III", 1, 0x5, 4) + feats[:4])
                elif self.behaviour == "silent":
                    conn.recv(1)  # until the front-end gives up
                elif self.behaviour == "hangup":
                    return  # closes the connection
                conn.recv(1)
            except OSError:
                pass

    def close(self) -> None:
        self.srv.close()
        self.thread.join(timeout=15)


@pytest.mark.parametrize(
    "behaviour,message",
    [
        ("wrong-type", "expected the reply to GET_FEATURES"),
        ("no-reply-flag", "lacks the REPLY flag"),
        ("bad-size", "payload size 4, expected 8"),
        ("silent", "timed out"),
        ("hangup", "closed the connection"),
    ],
)
def test_protocol_errors(vublk: Path, workdir: Path, behaviour: str, message: str) -> None:
    path = workdir / f"fake-{behaviour}.sock"
    fake = FakeBackend(path, behaviour)
    try:
        t0 = time.monotonic()
        rc, res, err = run_vublk(vublk, "--socket", str(path), "--rw", "randread",
                                 "--timeout", "1", timeout=20)
        elapsed = time.monotonic() - t0
    finally:
        fake.close()
    assert rc == 3, err
    assert res is None
    assert message in err, err
    assert elapsed < 5


def test_backend_not_accepting(vublk: Path, workdir: Path) -> None:
    """A listener whose backlog is full: connect() itself must be bounded."""
    path = workdir / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(0)
        fillers = []
        try:
            for _ in range(4):  # fill the backlog; never accept
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.setblocking(False)
                try:
                    c.connect(str(path))
                except BlockingIOError:
                    c.close()
                    break
                fillers.append(c)
            t0 = time.monotonic()
            rc, res, err = run_vublk(vublk, "--socket", str(path), "--timeout", "1",
                                     timeout=20)
            elapsed = time.monotonic() - t0
        finally:
            for c in fillers:
                c.close()
    assert rc == 3, err
    assert res is None
    assert "not accepting" in err or "timed out" in err, err
    assert elapsed < 5
