"""Encrypted (LUKS2) volumes on an NBD export: `nitro volume create
--encrypt nbd://...`, the real daemon serving it, the key commands
(`add-key`, `remove-key`, `erase`, `info`) on the export, and the
server's data judged by real cryptsetup.

The export is nbdkit's file plugin on a local file, so the test can read
what the server holds. The oracle is cryptsetup's: it dumps the header and
the volume key of what nitro formatted, and with that key (plain64 IVs,
tests/unit/test_crypto_xts.reference_xts) the ciphertext on the server
decrypts to exactly what the guest wrote, while the guest's plaintext is
nowhere in it. The RBD twin is in test_rbd_volume.py (its cluster fixture).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.nbd import PSK_USER, NbdKit, QemuNbd, write_psk
from bench.proc import run_cli
from tests.integration.frontend import Frontend
from tests.integration.test_encrypted_volume import FAST_PBKDF, cryptsetup, key_file, volume_key
from tests.integration.test_vublk_reference import pattern, run_vublk
from tests.ringlayout import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from tests.unit.test_crypto_xts import reference_xts

pytestmark = pytest.mark.integration

MiB = 1 << 20
DATA_OFFSET = 16 * MiB  # libcryptsetup's default LUKS2 metadata size
REGION = 4 * MiB        # what vublk writes, from the start of the data segment
SEED = 11
MARK = b"NITRO-PLAINTEXT!"  # a recognisable plaintext the guest writes
MARK_SECTOR = 24 * 2048     # 24 MiB into the data segment
MARK_LEN = 64 << 10      # one request (size_max)


def create_encrypted(source: str, key: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("volume", "create", source, "--encrypt", "--key-file", key, *FAST_PBKDF, *extra)


def write_as_guest(vublk: Path, sock: Path) -> None:
    """vublk's verify pattern over REGION, then MARK repeated, each read back."""
    rc, res, err = run_vublk(vublk, "--socket", str(sock), "--rw", "verify", "--bs", "64k",
                             "--size", str(REGION), "--iodepth", "16", "--seed", str(SEED),
                             "--timeout", "30", timeout=120)
    assert rc == 0 and res is not None and res["errors"] == 0 and res["mismatches"] == 0, err
    payload = MARK * (MARK_LEN // len(MARK))
    with Frontend(sock) as fe:
        fe.start()
        assert fe.blk_request(VIRTIO_BLK_T_OUT, MARK_SECTOR, data=payload)[0] == 0
        status, got = fe.blk_request(VIRTIO_BLK_T_IN, MARK_SECTOR, read_len=MARK_LEN)
        assert status == 0 and got == payload


def check_server_holds_ciphertext(image: Path, key: Path, sector: int) -> None:
    """`image` is the server's data, byte for byte: a LUKS2 volume cryptsetup
    reads, whose data segment holds the guest's writes encrypted with the
    volume key cryptsetup dumps, and none of the guest's plaintext."""
    dump = cryptsetup("luksDump", image).stdout
    assert f"offset: {DATA_OFFSET} [bytes]" in dump and f"sector: {sector} [bytes]" in dump, dump
    cryptsetup("open", "--test-passphrase", "--key-file", key, image)
    vk = volume_key(image, key)
    data = image.read_bytes()
    assert MARK[:12] not in data  # the guest's plaintext, searched at every byte offset
    plain = pattern(SEED, 0, REGION)
    sectors = {data[o:o + 512] for o in range(0, len(data), 512)}
    assert not any(plain[o:o + 512] in sectors for o in range(0, REGION, 512))
    region = data[DATA_OFFSET:DATA_OFFSET + REGION]
    assert reference_xts(vk, region, 0, sector, encrypt=False) == plain
    mark_off = MARK_SECTOR * 512
    ct = data[DATA_OFFSET + mark_off:DATA_OFFSET + mark_off + MARK_LEN]
    assert reference_xts(vk, ct, mark_off, sector, encrypt=False) == MARK * (MARK_LEN // len(MARK))


def blk(url: str, key: Path) -> str:
    return f'[[blk]]\nid = "r0"\nsource = "{url}"\nencryption = {{ key_file = "{key}" }}\n'


def test_create_serve_and_the_server_holds_only_ciphertext(nitro, vublk, short_tmp_path):
    image, key = short_tmp_path / "export.img", key_file(short_tmp_path)
    image.write_bytes(b"")
    os.truncate(image, 64 * MiB)
    with NbdKit(short_tmp_path, ["file", str(image)]) as server:
        r = create_encrypted(server.url(), key, "--sector-size", "4096")
        assert r.returncode == 0, r.stderr
        assert f"formatted {server.url()} ({48 * MiB} bytes of data" in r.stdout, r.stdout
        n = nitro(blk(server.url(), key))
        write_as_guest(vublk, short_tmp_path / "r0.sock")
        dev = json.loads(n.status_json())["devices"][0]
        assert dev["capacity_bytes"] == 48 * MiB and dev["remote"]["connects"] >= 1, dev
        assert n.stop() == 0, n.output()
    check_server_holds_ciphertext(image, key, 4096)


def test_serves_a_volume_cryptsetup_formatted(nitro, vublk, short_tmp_path):
    """Interop the other way: cryptsetup's own LUKS2 (argon2id keyslot, the
    export's file formatted on the host) unlocked through the network."""
    image, key = short_tmp_path / "export.img", key_file(short_tmp_path)
    image.write_bytes(b"")
    os.truncate(image, 64 * MiB)
    cryptsetup("luksFormat", "--type", "luks2", "--pbkdf-force-iterations", "4",
               "--pbkdf-memory", "32", "--sector-size", "512", "--key-file", key, image)
    with NbdKit(short_tmp_path, ["file", str(image)]) as server:
        n = nitro(blk(server.url(), key))
        write_as_guest(vublk, short_tmp_path / "r0.sock")
        assert n.stop() == 0, n.output()
    check_server_holds_ciphertext(image, key, 512)


def test_over_tls(nitro, vublk, short_tmp_path):
    """nbds://: the header and the ciphertext both go through TLS; the
    CLI takes the TLS keys as options named as in [[blk]]."""
    psk, key = write_psk(short_tmp_path / "keys.psk"), key_file(short_tmp_path)
    with NbdKit(short_tmp_path, ["memory", "32M"], tls_psk=psk) as server:
        url = server.url().replace("nbd://", "nbds://")
        tls = ["--tls-psk-file", str(psk), "--tls-username", PSK_USER]
        r = create_encrypted(url, key, *tls)
        assert r.returncode == 0 and f"formatted {url}" in r.stdout, r.stderr
        n = nitro(blk(url, key) + f'tls_psk_file = "{psk}"\ntls_username = "{PSK_USER}"\n')
        rc, res, err = run_vublk(vublk, "--socket", str(short_tmp_path / "r0.sock"), "--rw",
                                 "verify", "--bs", "16k", "--size", "2m", timeout=120)
        assert rc == 0 and res is not None and res["errors"] == 0 and res["mismatches"] == 0, err
        assert res["capacity_bytes"] == 16 * MiB
        assert n.stop() == 0, n.output()


def test_wrong_key_fails_the_start_naming_the_source(short_tmp_path):
    image, key = short_tmp_path / "export.img", key_file(short_tmp_path)
    image.write_bytes(b"")
    os.truncate(image, 32 * MiB)
    with NbdKit(short_tmp_path, ["file", str(image)]) as server:
        assert create_encrypted(server.url(), key).returncode == 0
        before = hashlib.sha256(image.read_bytes()).hexdigest()
        key_file(short_tmp_path)  # another random key in the same file
        cfg = short_tmp_path / "nitro.toml"
        cfg.write_text(blk(server.url(), key))
        r = run_cli("run", "--config", cfg, "--runtime-dir", short_tmp_path,
                    "--state-dir", short_tmp_path)
    assert r.returncode == 1, r.stderr
    # One error line (log lines, such as the NBD lock notice, aside).
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("ts=")]
    assert len(lines) == 1 and server.url() in lines[0] and "no keyslot opens" in lines[0], r.stderr
    assert not (short_tmp_path / "r0.sock").exists()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("content", ["luks", "data"])
def test_create_never_overwrites_a_volume(short_tmp_path, content):
    image, key = short_tmp_path / "export.img", key_file(short_tmp_path)
    image.write_bytes(b"")
    os.truncate(image, 32 * MiB)
    if content == "luks":
        cryptsetup("luksFormat", "--type", "luks2", *FAST_PBKDF, "--key-file", key, image)
    else:  # a filesystem's superblock, say, well past the binary header
        with open(image, "r+b") as f:
            f.seek(1 * MiB)
            f.write(b"\x53\xef" * 512)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    with NbdKit(short_tmp_path, ["file", str(image)]) as server:
        r = create_encrypted(server.url(), key)
    assert r.returncode == 1, r.stdout
    want = "already holds a LUKS volume" if content == "luks" else "already holds data"
    assert want in r.stderr and "refusing to overwrite" in r.stderr, r.stderr
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_not_luks_is_refused(short_tmp_path):
    image, key = short_tmp_path / "export.img", key_file(short_tmp_path)
    image.write_bytes(b"")
    os.truncate(image, 32 * MiB)
    with NbdKit(short_tmp_path, ["file", str(image)]) as server:
        cfg = short_tmp_path / "nitro.toml"
        cfg.write_text(blk(server.url(), key))
        r = run_cli("run", "--config", cfg, "--runtime-dir", short_tmp_path,
                    "--state-dir", short_tmp_path)
    assert r.returncode == 1 and "not a LUKS volume" in r.stderr and server.url() in r.stderr, r.stderr


def test_keys_rotated_and_erased_on_an_export(nitro, vublk, short_tmp_path):
    """`nitro volume add-key / remove-key / erase / info` on an NBD export,
    judged by cryptsetup on the server's file: the new key opens it and
    the old no longer does, the guest's data reads back under the new
    key, and after an erase nothing opens it (its keyslot material is
    overwritten, not only unlisted)."""
    image, old = short_tmp_path / "export.img", key_file(short_tmp_path)
    new = key_file(short_tmp_path, "new.key")
    image.write_bytes(b"")
    os.truncate(image, 64 * MiB)
    with NbdKit(short_tmp_path, ["file", str(image)]) as server:
        url = server.url()
        assert create_encrypted(url, old).returncode == 0
        n = nitro(blk(url, old))
        write_as_guest(vublk, short_tmp_path / "r0.sock")
        assert n.stop() == 0, n.output()

        r = run_cli("volume", "add-key", url, "--key-file", old, "--new-key-file", new, *FAST_PBKDF)
        assert r.returncode == 0 and f"{url}: added keyslot 1" in r.stdout, r.stderr
        r = run_cli("volume", "remove-key", url, "--key-file", old)
        assert r.returncode == 0 and f"{url}: removed keyslot 0" in r.stdout, r.stderr
        r = run_cli("volume", "info", url)
        assert r.returncode == 0 and "keyslots:    1 (pbkdf2)" in r.stdout, r.stdout + r.stderr
        cryptsetup("open", "--test-passphrase", "--key-file", new, image)
        denied = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", old,
                                 str(image)], capture_output=True, check=False)
        assert denied.returncode != 0
        # The data is the guest's still, under the new key.
        n = nitro(blk(url, new))
        rc, res, err = run_vublk(vublk, "--socket", str(short_tmp_path / "r0.sock"), "--rw",
                                 "verify-read", "--bs", "64k", "--size", str(REGION), "--seed",
                                 str(SEED), "--timeout", "30", timeout=120)
        assert rc == 0 and res is not None and res["mismatches"] == 0, err
        assert n.stop() == 0, n.output()

        slot1 = keyslot_area(image, 1)
        r = run_cli("volume", "erase", url, "--yes")
        assert r.returncode == 0 and "destroyed keyslots 1" in r.stdout, r.stderr
        assert "Keyslots:\nTokens:" in cryptsetup("luksDump", image).stdout
        assert keyslot_area_bytes(image, slot1) != slot1[2]
        r = run_cli("volume", "info", url)
        assert "keyslots:    none (erased)" in r.stdout, r.stdout + r.stderr


def keyslot_area(image: Path, slot: int) -> tuple[int, int, bytes]:
    """(offset, length, bytes) of a keyslot's area, as cryptsetup dumps it."""
    dump = cryptsetup("luksDump", "--dump-json-metadata", image).stdout
    area = json.loads(dump)["keyslots"][str(slot)]["area"]
    off, size = int(area["offset"]), int(area["size"])
    return off, size, keyslot_area_bytes(image, (off, size, b""))


def keyslot_area_bytes(image: Path, area: tuple[int, int, bytes]) -> bytes:
    with open(image, "rb") as f:
        f.seek(area[0])
        return f.read(area[1])


def test_a_server_for_one_client_at_a_time(nitro, vublk, short_tmp_path):
    """qemu-nbd's default serves one client at a time (--shared=1): the key
    commands and the daemon's unlock use the one connection that opens the
    volume, not a second one the server would leave unanswered."""
    image, key = short_tmp_path / "q.img", key_file(short_tmp_path)
    new = key_file(short_tmp_path, "new.key")
    image.write_bytes(b"")
    os.truncate(image, 48 * MiB)
    with QemuNbd(short_tmp_path, image, shared=1) as server:
        url = server.url()
        r = create_encrypted(url, key)
        assert r.returncode == 0, r.stderr
        r = run_cli("volume", "add-key", url, "--key-file", key, "--new-key-file", new, *FAST_PBKDF)
        assert r.returncode == 0 and f"{url}: added keyslot 1" in r.stdout, r.stderr
        r = run_cli("volume", "info", url)
        assert r.returncode == 0 and "keyslots:    0 (pbkdf2), 1 (pbkdf2)" in r.stdout, r.stderr
        n = nitro(blk(url, new))
        rc, res, err = run_vublk(vublk, "--socket", str(short_tmp_path / "r0.sock"), "--rw",
                                 "verify", "--bs", "16k", "--size", "2m", timeout=120)
        assert rc == 0 and res is not None and res["errors"] == 0 and res["mismatches"] == 0, err
        assert n.stop() == 0, n.output()
    cryptsetup("open", "--test-passphrase", "--key-file", new, image)
