"""A [[blk]] volume on a Ceph RBD image (source = "rbd:POOL/IMAGE").

The daemon serves an image of a throwaway cluster (bench/ceph.py) to
vublk, which writes its verify pattern, flushes and reads it back; the
cluster's own view of the image (`rbd export`) must hold exactly that
pattern (the data really went to RADOS, not to a local file). While the
first daemon holds the image, a second daemon configured with the same
image must refuse to start, naming the lock, and must not have written.
An encrypted image (LUKS2, made by `nitro volume create --encrypt`) holds
only ciphertext on the cluster.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ceph import CephCluster, ceph_cluster
from bench.proc import ChildError, Nitro, run_cli
from tests.integration.frontend import Frontend
from tests.integration.test_encrypted_remote import (
    check_server_holds_ciphertext,
    create_encrypted,
    write_as_guest,
)
from tests.integration.test_encrypted_volume import FAST_PBKDF, key_file
from tests.integration.test_qos import finish, metric, reads, volume_qos
from tests.integration.test_vublk_reference import pattern, run_vublk
from tests.ringlayout import VIRTIO_BLK_T_IN

pytestmark = pytest.mark.integration

IMAGE_MIB = 64
REGION = 8 << 20  # what vublk writes and the test checks (pattern() is pure Python)
SEED = 7


@pytest.fixture(scope="module")
def cluster() -> Iterator[CephCluster]:
    with ceph_cluster() as c:
        yield c


def _config(c: CephCluster, image: str) -> str:
    return c.blk_config(image, extra="queues = 2\n")


def _export(c: CephCluster, image: str) -> bytes:
    return c.rbd("export", f"{c.pool}/{image}", "-")


def test_vublk_verify_lands_in_rados(cluster: CephCluster, vublk: Path, short_tmp_path: Path) -> None:
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/verify")
    with Nitro(short_tmp_path, _config(cluster, "verify")) as daemon:
        rc, res, err = run_vublk(vublk, "--socket", str(short_tmp_path / "vol0.sock"), "--rw", "verify",
                                 "--bs", "64k", "--size", str(REGION), "--iodepth", "16",
                                 "--queues", "2", "--seed", str(SEED), "--timeout", "30", timeout=120)
        assert rc == 0, err
        assert res is not None and res["errors"] == 0, res
        assert daemon.stop() == 0, daemon.output()
    data = _export(cluster, "verify")
    assert len(data) == IMAGE_MIB << 20
    assert data[:REGION] == pattern(SEED, 0, REGION)
    assert data[REGION:] == bytes(len(data) - REGION)


@pytest.mark.parametrize(("encrypted", "bs", "seg"),
                         [(False, "192k", "12k"), (True, "192k", "12k"), (False, "1m", "20k"),
                          (True, "1m", "20k")],
                         ids=["plain", "luks2", "plain-17-objects", "luks2-17-objects"])
def test_reads_across_objects_into_scattered_pages(cluster: CephCluster, vublk: Path,
                                                   short_tmp_path: Path, encrypted: bool, bs: str,
                                                   seg: str) -> None:
    """A read spanning several RADOS objects comes back from librbd as
    several buffers (nitro_rbd_bl.cpp hands them over as they are), and
    each must land, copied or decrypted, at its own place in guest buffers
    scattered over memory: 64 KiB objects, requests starting mid-object,
    so a 192 KiB read spans four objects and a 1 MiB one seventeen (more
    buffers than nitro keeps room for on its stack), in 12 or 20 KiB
    descriptors, so the objects' seams fall inside descriptors. Plain:
    then a read of the first object, a never-written half (zeros, or a
    hole librbd fills) and the written data after it."""
    image = f"striped-{int(encrypted)}-{bs}"
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", "--object-size", "64K", f"{cluster.pool}/{image}")
    extra = ""
    if encrypted:
        key = key_file(short_tmp_path)
        r = create_encrypted(f"rbd:{cluster.pool}/{image}", key, "--ceph-conf", str(cluster.conf),
                             "--user", cluster.user, "--keyring", str(cluster.keyring))
        assert r.returncode == 0, r.stderr
        extra = f'encryption = {{ key_file = "{key}" }}\n'
    region, offset = 3 << 20, 32 << 10
    sock = short_tmp_path / "vol0.sock"
    with Nitro(short_tmp_path, _config(cluster, image) + extra) as daemon:
        rc, res, err = run_vublk(vublk, "--socket", str(sock), "--rw", "verify", "--bs", bs,
                                 "--seg-size", seg, "--offset", str(offset), "--size", str(region),
                                 "--iodepth", "2", "--seed", str(SEED), "--timeout", "30", timeout=120)
        assert rc == 0, err
        assert res is not None and res["errors"] == 0 and res["mismatches"] == 0, res
        assert res["verified_bytes"] == region and res["len_mismatch"] == 0, res
        if not encrypted:
            with Frontend(sock) as fe:
                fe.start()
                status, got = fe.blk_request(VIRTIO_BLK_T_IN, 0, read_len=64 << 10)
            assert status == 0 and got == bytes(offset) + pattern(SEED, offset, (64 << 10) - offset)
        assert daemon.stop() == 0, daemon.output()
    if not encrypted:
        data = _export(cluster, image)
        assert data[offset:offset + region] == pattern(SEED, offset, region)
        assert data[:offset] == bytes(offset)
        assert data[offset + region:] == bytes(len(data) - offset - region)


def test_second_attach_is_refused(cluster: CephCluster, vublk: Path, short_tmp_path: Path) -> None:
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/locked")
    (short_tmp_path / "a").mkdir()
    (short_tmp_path / "b").mkdir()
    with Nitro(short_tmp_path / "a", _config(cluster, "locked")):
        with pytest.raises(ChildError) as refused:
            Nitro(short_tmp_path / "b", _config(cluster, "locked"), timeout=60).kill()
        assert "attached elsewhere" in str(refused.value), refused.value
        # The first daemon still serves the image.
        rc, res, err = run_vublk(vublk, "--socket", str(short_tmp_path / "a" / "vol0.sock"), "--rw",
                                 "verify", "--bs", "4k", "--size", "1M", "--seed", str(SEED),
                                 "--timeout", "30", timeout=120)
        assert rc == 0 and res is not None and res["errors"] == 0, err
    # Once it is gone, the image is free again: the lock went with it.
    with Nitro(short_tmp_path / "b", _config(cluster, "locked"), timeout=60) as again:
        assert again.running()


def test_qos_limits_an_rbd_volume(cluster: CephCluster, vublk: Path, short_tmp_path: Path) -> None:
    """The volume's QoS applies to the librbd ring as to a file's: requests
    delayed, none failed, across both queues, and changed live."""
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/qos")
    with Nitro(short_tmp_path, _config(cluster, "qos") + "qos = { iops = 200 }\n") as daemon:
        sock = short_tmp_path / "vol0.sock"
        res = finish(reads(vublk, sock, "--ios", "400"))
        assert res["ios"] == 400
        # At most the bucket's 20 plus 200 a second: 400 take 1.9 s at least.
        assert res["ios"] <= 20 + 200 * res["seconds"] + 2, res
        assert metric(daemon, "nitro_blk_qos_exceeded_iops_seconds_total", device="vol0") > 0
        assert volume_qos(daemon, "--iops", "100").returncode == 0
        res = finish(reads(vublk, sock, "--ios", "200"))
        assert res["ios"] <= 10 + 100 * res["seconds"] + 2, res


def test_encrypted_image_holds_only_ciphertext(cluster: CephCluster, vublk: Path,
                                               short_tmp_path: Path) -> None:
    """`nitro volume create --encrypt rbd:...` formats the image; nitro
    serves it; the cluster's copy (`rbd export`) is a LUKS2 volume that
    cryptsetup reads, its data the guest's writes encrypted under the key
    cryptsetup dumps, with none of the guest's plaintext."""
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/enc")
    key = key_file(short_tmp_path)
    source = f"rbd:{cluster.pool}/enc"
    r = create_encrypted(source, key, "--ceph-conf", str(cluster.conf), "--user", cluster.user,
                         "--keyring", str(cluster.keyring))
    assert r.returncode == 0, r.stderr
    enc = f'encryption = {{ key_file = "{key}" }}\n'
    with Nitro(short_tmp_path, _config(cluster, "enc") + enc) as daemon:
        write_as_guest(vublk, short_tmp_path / "vol0.sock")
        assert daemon.stop() == 0, daemon.output()
    exported = short_tmp_path / "enc.img"
    exported.write_bytes(_export(cluster, "enc"))
    check_server_holds_ciphertext(exported, key, 512)
    # A second create finds the header and writes nothing.
    r = create_encrypted(source, key, "--ceph-conf", str(cluster.conf), "--user", cluster.user,
                         "--keyring", str(cluster.keyring))
    assert r.returncode == 1 and "already holds a LUKS volume" in r.stderr, r.stderr
    assert _export(cluster, "enc") == exported.read_bytes()


def test_keys_of_an_encrypted_image(cluster: CephCluster, vublk: Path, short_tmp_path: Path) -> None:
    """`nitro volume info` describes an attached image (read-only, no
    lock); `add-key` is refused while a daemon holds the image's exclusive
    lock, and once it is stopped adds a key the next daemon opens it with."""
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/rekey")
    old, new = key_file(short_tmp_path), key_file(short_tmp_path, "new.key")
    source = f"rbd:{cluster.pool}/rekey"
    ceph = ["--ceph-conf", str(cluster.conf), "--user", cluster.user, "--keyring", str(cluster.keyring)]
    assert create_encrypted(source, old, *ceph).returncode == 0
    add = ["volume", "add-key", source, "--key-file", old, "--new-key-file", new, *FAST_PBKDF, *ceph]
    with Nitro(short_tmp_path, _config(cluster, "rekey") + f'encryption = {{ key_file = "{old}" }}\n'):
        r = run_cli("volume", "info", source, *ceph)
        assert r.returncode == 0 and "keyslots:    0 (pbkdf2)" in r.stdout, r.stdout + r.stderr
        r = run_cli(*add)
        assert r.returncode == 1 and "attached elsewhere" in r.stderr, r.stdout + r.stderr
    r = run_cli(*add)
    assert r.returncode == 0 and f"{source}: added keyslot 1" in r.stdout, r.stderr
    with Nitro(short_tmp_path, _config(cluster, "rekey") + f'encryption = {{ key_file = "{new}" }}\n'):
        rc, res, err = run_vublk(vublk, "--socket", str(short_tmp_path / "vol0.sock"), "--check-id")
        assert rc == 0, err


@pytest.mark.parametrize("key, hint", [
    # Not a cephx key at all: librados cannot load it (EIO).
    ("notakey", "is the key of client.admin in keyring {} a valid cephx key?"),
    # A well-formed key the cluster never issued: refused (EACCES).
    (base64.b64encode(struct.pack("<HIIH", 1, 0, 0, 16) + bytes(range(16))).decode(),
     "the cluster refused the key of client.admin in keyring {}"),
])
def test_a_bad_key_fails_the_start_saying_so(cluster: CephCluster, short_tmp_path: Path,
                                             key: str, hint: str) -> None:
    image = f"badkey{len(key)}"  # one per case
    cluster.rbd("create", "--size", f"{IMAGE_MIB}M", f"{cluster.pool}/{image}")
    keyring = short_tmp_path / "bad.keyring"
    keyring.write_text(f"[client.{cluster.user}]\n\tkey = {key}\n")
    config = _config(cluster, image).replace(str(cluster.keyring), str(keyring))
    with pytest.raises(ChildError) as refused:
        Nitro(short_tmp_path, config, timeout=60).kill()
    assert hint.format(keyring) in str(refused.value), refused.value
