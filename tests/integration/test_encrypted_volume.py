"""Encrypted (LUKS2) volumes on the real daemon and the `nitro volume` CLI,
checked against real cryptsetup on the host.

Host cryptsetup can format, dump and test passphrases on plain files but
cannot open dm-crypt here (no device-mapper), so on the host the oracle is
the volume key cryptsetup itself dumps (--dump-volume-key) plus an
independent plain64 reference (tests/unit/test_crypto_xts.py). The dm-crypt
judge is tests/system/test_encrypted_guest.py.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from pathlib import Path

import pytest

from bench.proc import run_cli
from nitro._datapath import XtsCipher
from tests.integration.frontend import GPA_BASE, Frontend
from tests.integration.test_qos import metric
from tests.ringlayout import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    blk_header,
    dwz_segment,
)
from tests.unit.test_crypto_xts import reference_xts, secret_of

pytestmark = pytest.mark.integration
FAST_PBKDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
VIRTIO_BLK_F_DISCARD = 13


def nitro_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    r = run_cli(*args)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def cryptsetup(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["cryptsetup", "--batch-mode", *map(str, args)],
                       capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def key_file(tmp: Path, name: str = "vol.key", data: bytes | None = None) -> Path:
    p = tmp / name
    p.write_bytes(os.urandom(64) if data is None else data)
    p.chmod(0o600)
    return p


def volume_key(image: Path, key: Path) -> bytes:
    """The volume key, as cryptsetup (not nitro) reads it from the header."""
    out = key.with_suffix(".vk")
    cryptsetup("luksDump", "--dump-volume-key", "--volume-key-file", out, "--key-file", key, image)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def luks_format(image: Path, key: Path, size: int, *extra: str) -> None:
    """A volume made by cryptsetup itself on a plain file."""
    with open(image, "wb") as f:
        f.truncate((16 << 20) + size)
    cryptsetup("luksFormat", "--type", "luks2", *FAST_PBKDF, "--key-file", key, *extra, image)


def encrypted_cfg(dev: str = "vol0", key: str = "vol.key", kind: str = "key_file") -> str:
    return f'[[blk]]\nid = "{dev}"\nimage = "{dev}.img"\nencryption = {{ {kind} = "{key}" }}\n'


def run_daemon_expect_failure(tmp: Path, cfg_text: str) -> subprocess.CompletedProcess:
    cfg = tmp / "nitro.toml"
    cfg.write_text(cfg_text)
    return run_cli("run", "--config", cfg, "--runtime-dir", tmp, "--state-dir", tmp)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- nitro serves what cryptsetup made, and writes what cryptsetup reads ---

@pytest.mark.parametrize(("key_bits", "sector"), [(256, 512), (512, 4096)])
def test_cryptsetup_volume_served_and_ciphertext_matches_its_key(nitro, short_tmp_path, key_bits, sector):
    img, key = short_tmp_path / "vol0.img", key_file(short_tmp_path)
    luks_format(img, key, 8 << 20, "--key-size", str(key_bits), "--sector-size", str(sector))
    vk = volume_key(img, key)
    assert len(vk) * 8 == key_bits
    n = nitro(encrypted_cfg())
    payload = os.urandom(64 << 10)
    with Frontend(short_tmp_path / "vol0.sock") as fe:
        features = fe.start()
        assert not features >> VIRTIO_BLK_F_DISCARD & 1
        cfg = fe.get_config()
        assert struct.unpack_from("<Q", cfg, 0)[0] == (8 << 20) // 512
        assert struct.unpack_from("<I", cfg, 20)[0] == sector  # blk_size
        assert fe.blk_request(VIRTIO_BLK_T_OUT, 2048, data=payload)[0] == 0
        status, got = fe.blk_request(VIRTIO_BLK_T_IN, 2048, read_len=len(payload))
        assert status == 0 and got == payload
        assert fe.blk_request(VIRTIO_BLK_T_DISCARD, 0, data=dwz_segment(0, 8, 0))[0] == 2  # UNSUPP
        if sector == 4096:  # half a 4 KiB sector: the guest ignored blk_size
            assert fe.blk_request(VIRTIO_BLK_T_IN, 1, read_len=4096)[0] == 1
    # The status names the XTS path: the one a cipher with this key picks here.
    picked = XtsCipher(secret_of(vk), sector).impl
    assert f"(file, LUKS2: {sector}-byte sectors, {picked} XTS; through its mapping" in n.status()
    assert metric(n, "nitro_blk_cipher_info", device="vol0", sector_size=str(sector), impl=picked) == 1
    assert n.stop() == 0
    data_offset = 16 << 20
    on_disk = img.read_bytes()[data_offset + 2048 * 512: data_offset + 2048 * 512 + len(payload)]
    assert on_disk == reference_xts(vk, payload, 2048 * 512, sector)
    assert on_disk != payload


def test_sectors_straddling_descriptors(nitro, short_tmp_path):
    """A 4 KiB encryption sector split over three guest buffers at odd
    boundaries goes through the C path's bounce copy."""
    img, key = short_tmp_path / "vol0.img", key_file(short_tmp_path)
    luks_format(img, key, 4 << 20, "--sector-size", "4096")
    nitro(encrypted_cfg())
    payload = os.urandom(8192)
    cuts = [0, 1000, 5000, 8192]
    with Frontend(short_tmp_path / "vol0.sock") as fe:
        fe.start()
        for rtype, flags in ((VIRTIO_BLK_T_OUT, 0), (VIRTIO_BLK_T_IN, VRING_DESC_F_WRITE)):
            base = GPA_BASE + fe.data
            fe.write(base, blk_header(rtype, 64))
            fe.write(base + 4096 + 8192 + 64, b"\xee")
            fe.write_desc(0, base, 16, VRING_DESC_F_NEXT, 1)
            for i in range(3):
                addr = base + 4096 + cuts[i] + 16 * i  # gaps: not one flat buffer
                if rtype == VIRTIO_BLK_T_OUT:
                    fe.write(addr, payload[cuts[i]:cuts[i + 1]])
                else:
                    fe.write(addr, bytes(cuts[i + 1] - cuts[i]))
                fe.write_desc(1 + i, addr, cuts[i + 1] - cuts[i], VRING_DESC_F_NEXT | flags, 2 + i)
            fe.write_desc(4, base + 4096 + 8192 + 64, 1, VRING_DESC_F_WRITE)
            fe.publish(0)
            fe.wait_used(1)
            assert fe.read(base + 4096 + 8192 + 64, 1) == b"\x00"
        got = b"".join(fe.read(base + 4096 + cuts[i] + 16 * i, cuts[i + 1] - cuts[i]) for i in range(3))
        assert got == payload
        status, flat = fe.blk_request(VIRTIO_BLK_T_IN, 64, read_len=8192)
        assert status == 0 and flat == payload


# ---- what nitro made, cryptsetup accepts ---------------------------------

def test_create_encrypted_is_luks2_that_cryptsetup_opens(short_tmp_path):
    img, key = short_tmp_path / "new.img", key_file(short_tmp_path)
    r = nitro_cli("volume", "create", img, "--size", "8M", "--encrypt", "--key-file", key,
                  "--key-size", "256", "--sector-size", "4096", *FAST_PBKDF)
    assert "LUKS2 aes-xts-plain64, 256-bit key, 4096-byte sectors" in r.stdout
    assert os.stat(img).st_mode & 0o777 == 0o600
    cryptsetup("isLuks", img)
    dump = cryptsetup("luksDump", img).stdout
    assert "Version:       \t2" in dump and "cipher: aes-xts-plain64" in dump
    assert "sector: 4096 [bytes]" in dump and "PBKDF:      pbkdf2" in dump
    cryptsetup("open", "--test-passphrase", "--key-file", key, img)
    assert len(volume_key(img, key)) == 32
    assert os.path.getsize(img) == (16 << 20) + (8 << 20)
    # The header and keyslot areas are written (wiped); the data area is sparse.
    assert os.stat(img).st_blocks * 512 <= (16 << 20) + (64 << 10)


def test_create_default_argon2id_with_passphrase_file(short_tmp_path):
    img, pw = short_tmp_path / "a.img", key_file(short_tmp_path, "pw", b"correct horse\n")
    nitro_cli("volume", "create", img, "--size", "4M", "--encrypt", "--passphrase-file", pw,
              "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32")
    assert "PBKDF:      argon2id" in cryptsetup("luksDump", img).stdout
    # The trailing newline is not part of the passphrase, as at a prompt.
    bare = key_file(short_tmp_path, "bare", b"correct horse")
    cryptsetup("open", "--test-passphrase", "--key-file", bare, img)


def test_info_add_remove_key_and_erase(nitro, short_tmp_path):
    img, k1 = short_tmp_path / "vol0.img", key_file(short_tmp_path, "vol.key")
    k2 = key_file(short_tmp_path, "second.key")
    nitro_cli("volume", "create", img, "--size", "4M", "--encrypt", "--key-file", k1, *FAST_PBKDF)
    nitro_cli("volume", "add-key", img, "--key-file", k1, "--new-key-file", k2, *FAST_PBKDF)
    cryptsetup("open", "--test-passphrase", "--key-file", k2, img)
    info = nitro_cli("volume", "info", img).stdout
    assert "keyslots:    0 (pbkdf2), 1 (pbkdf2)" in info and "attached:    no" in info
    vk = volume_key(img, k1).hex()
    assert vk not in info and k1.read_bytes().hex() not in info

    # While a daemon serves it: info says so, erase refuses, nothing changes.
    n = nitro(encrypted_cfg())
    assert "attached:    yes" in nitro_cli("volume", "info", img).stdout
    r = nitro_cli("volume", "erase", img, "--yes", check=False)
    assert r.returncode == 1 and "attached to a running nitro" in r.stderr
    assert vk not in n.output() and vk not in n.metrics() and vk not in n.status()
    assert n.stop() == 0

    nitro_cli("volume", "remove-key", img, "--key-file", k1)
    assert cryptsetup("open", "--test-passphrase", "--key-file", k1, img, check=False).returncode != 0
    r = nitro_cli("volume", "remove-key", img, "--key-file", k2, check=False)
    assert r.returncode == 1 and "last one" in r.stderr
    r = nitro_cli("volume", "erase", img, check=False)
    assert r.returncode == 2 and "--yes" in r.stderr
    slot1 = img.read_bytes()[32768 + 258048:32768 + 2 * 258048]  # k2's keyslot area
    assert slot1 != bytes(len(slot1))
    nitro_cli("volume", "erase", img, "--yes")
    assert img.read_bytes()[32768 + 258048:32768 + 2 * 258048] != slot1
    assert cryptsetup("open", "--test-passphrase", "--key-file", k2, img, check=False).returncode != 0
    assert "Keyslots:\nTokens:" in cryptsetup("luksDump", img).stdout.replace("\n\n", "\n")
    assert "none (erased)" in nitro_cli("volume", "info", img).stdout


# ---- bad input: one line naming the volume, device not started, image untouched

def _expect_refusal(tmp: Path, img: Path, cfg: str, *needles: str) -> None:
    before = sha(img) if img.exists() else None
    r = run_daemon_expect_failure(tmp, cfg)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(img) in lines[0] or img.name in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp / "vol0.sock").exists()
    if before is not None:
        assert sha(img) == before


def test_wrong_key_is_refused(short_tmp_path):
    img, key = short_tmp_path / "vol0.img", key_file(short_tmp_path)
    luks_format(img, key, 4 << 20)
    key_file(short_tmp_path, "vol.key")  # replaced by another random key
    _expect_refusal(short_tmp_path, img, encrypted_cfg(), "no keyslot opens")


def test_wrong_passphrase_is_refused(short_tmp_path):
    img, key = short_tmp_path / "vol0.img", key_file(short_tmp_path, "pw", b"right")
    luks_format(img, key, 4 << 20)
    key_file(short_tmp_path, "pw", b"wrong\n")
    _expect_refusal(short_tmp_path, img, encrypted_cfg(key="pw", kind="passphrase_file"),
                    "no keyslot opens")


def test_key_file_with_group_or_world_bits_is_refused(short_tmp_path):
    img, key = short_tmp_path / "vol0.img", key_file(short_tmp_path)
    luks_format(img, key, 4 << 20)
    key.chmod(0o640)
    _expect_refusal(short_tmp_path, img, encrypted_cfg(), "chmod 600")
    r = nitro_cli("volume", "create", short_tmp_path / "x.img", "--size", "4M", "--encrypt",
                  "--key-file", key, check=False)
    assert r.returncode == 1 and "chmod 600" in r.stderr
    assert not (short_tmp_path / "x.img").exists()


@pytest.mark.parametrize("damage", ["both-headers", "truncated", "not-luks"])
def test_corrupt_or_truncated_header_is_refused(short_tmp_path, damage):
    img, key = short_tmp_path / "vol0.img", key_file(short_tmp_path)
    luks_format(img, key, 4 << 20)
    with open(img, "r+b") as f:
        if damage == "both-headers":  # primary and secondary binary headers
            for off in (0, 16384):
                f.seek(off)
                f.write(b"garbage!")
        elif damage == "truncated":
            f.truncate(8192)
        else:
            f.write(bytes(64 << 10))
    _expect_refusal(short_tmp_path, img, encrypted_cfg(), "not a LUKS volume")


@pytest.mark.parametrize(("extra", "needle"), [
    (("--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"), "cipher aes-cbc-essiv:sha256"),
    (("--sector-size", "1024"), "sector size 1024"),
])
def test_unsupported_volume_is_refused(short_tmp_path, extra, needle):
    img, key = short_tmp_path / "vol0.img", key_file(short_tmp_path)
    luks_format(img, key, 4 << 20, *extra)
    _expect_refusal(short_tmp_path, img, encrypted_cfg(), needle)


@pytest.mark.parametrize(("extra", "needle"), [
    (("--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"), "cipher aes-cbc-essiv:sha256"),
    (("--sector-size", "1024"), "sector size 1024"),
])
def test_unsupported_volume_is_refused_before_any_keyslot_is_tried(short_tmp_path, extra, needle):
    """The header alone decides: even with a wrong key (so the PBKDF never
    gets to run) the refusal names the cipher or sector size."""
    img, key = short_tmp_path / "vol0.img", key_file(short_tmp_path)
    luks_format(img, key, 4 << 20, *extra)
    key_file(short_tmp_path, "vol.key")  # replaced by another random key
    _expect_refusal(short_tmp_path, img, encrypted_cfg(), needle)


@pytest.mark.parametrize(("size", "needle"), [
    (1 << 20, "too small"),  # libcryptsetup: the keyslot area is cut off
    (16 << 20, "smaller than its LUKS2 header"),  # header whole, no data sector
])
def test_volume_smaller_than_its_header_is_refused(short_tmp_path, size, needle):
    img, key = short_tmp_path / "vol0.img", key_file(short_tmp_path)
    luks_format(img, key, 4 << 20)
    with open(img, "r+b") as f:
        f.truncate(size)
    _expect_refusal(short_tmp_path, img, encrypted_cfg(), needle)


def test_missing_encrypted_volume_is_not_created(short_tmp_path):
    key_file(short_tmp_path)
    img = short_tmp_path / "vol0.img"
    _expect_refusal(short_tmp_path, img, encrypted_cfg() + 'size = "4M"\n', "nitro volume create --encrypt")
    assert not img.exists()
