"""nitro.crypto: key files and the libcryptsetup wrapper, on plain files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nitro.crypto import keys, luks

FAST = luks.Pbkdf("pbkdf2", iterations=1000)


def write_key(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_file_with_group_or_world_bits_is_refused(tmp_path, mode):
    k = write_key(tmp_path / "k", b"x" * 32, mode)
    with pytest.raises(keys.KeyMaterialError, match="chmod 600"):
        keys.read_secret(k, passphrase=False)


def test_missing_and_empty_key_files(tmp_path):
    with pytest.raises(keys.KeyMaterialError, match="cannot open"):
        keys.read_secret(tmp_path / "nope", passphrase=False)
    with pytest.raises(keys.KeyMaterialError, match="empty"):
        keys.read_secret(write_key(tmp_path / "e", b""), passphrase=True)


def test_format_unlock_and_wrong_key(tmp_path):
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(20 << 20)
    k = keys.read_secret(write_key(tmp_path / "k", os.urandom(32)), passphrase=False)
    info = luks.format_volume(img, k, key_bits=256, sector_size=4096, pbkdf=FAST)
    assert (info.cipher, info.key_bits, info.sector_size) == ("aes-xts-plain64", 256, 4096)
    assert info.data_offset == 16 << 20 and info.data_size is None
    got, vk = luks.unlock(img, k)
    assert len(vk) == 32 and got.uuid == info.uuid
    vk.close()
    wrong = keys.read_secret(write_key(tmp_path / "w", b"wrong"), passphrase=False)
    with pytest.raises(luks.WrongKeyError, match=str(img)):
        luks.unlock(img, wrong)


def test_not_luks_names_the_volume(tmp_path):
    img = tmp_path / "raw.img"
    img.write_bytes(bytes(1 << 20))
    with pytest.raises(luks.LuksError, match=f"{img}: not a LUKS volume"):
        luks.read_info(img)


def test_format_rejects_unsupported_geometry(tmp_path):
    k = keys.read_secret(write_key(tmp_path / "k", b"pw"), passphrase=False)
    with pytest.raises(luks.LuksError, match="--key-size"):
        luks.format_volume(tmp_path / "x", k, key_bits=384, pbkdf=FAST)
    with pytest.raises(luks.LuksError, match="--sector-size"):
        luks.format_volume(tmp_path / "x", k, sector_size=1024, pbkdf=FAST)


def test_fifo_key_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "k"
    os.mkfifo(fifo, 0o600)  # no writer: a blocking open would hang here
    with pytest.raises(keys.KeyMaterialError, match="not a regular file"):
        keys.read_secret(fifo, passphrase=False)


def test_read_key_takes_the_one_given(tmp_path):
    k = write_key(tmp_path / "k", b"secret\n")
    with keys.read_key(key_file=k, passphrase_file=None) as s:
        assert len(s) == 7  # byte for byte
    with keys.read_key(key_file=None, passphrase_file=k) as s:
        assert len(s) == 6  # the newline dropped
    with pytest.raises(keys.KeyMaterialError):
        keys.read_key(key_file=None, passphrase_file=None)


def test_secret_as_context_manager_is_closed_after(tmp_path):
    k = write_key(tmp_path / "k", b"x" * 32)
    with keys.read_secret(k, passphrase=False) as s:
        assert len(s) == 32
    with pytest.raises(ValueError):
        len(s)


def test_not_luks_versus_damaged_luks(tmp_path):
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(20 << 20)
    k = keys.read_secret(write_key(tmp_path / "k", os.urandom(32)), passphrase=False)
    luks.format_volume(img, k, key_bits=256, pbkdf=FAST)
    with open(img, "r+b") as f:
        f.truncate(8192)
    with pytest.raises(luks.LuksError, match="corrupt or truncated") as e:
        luks.read_info(img)
    assert not isinstance(e.value, luks.NotLuksError)
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(1 << 20))
    with pytest.raises(luks.NotLuksError):
        luks.read_info(zeros)
