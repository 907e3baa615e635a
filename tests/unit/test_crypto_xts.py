"""The C AES-XTS sector cipher (nitro_xts) and C-owned secrets.

The oracle is OpenSSL driven independently from Python (ctypes, a fresh
context and IV per sector, as dm-crypt's plain64 defines it); the end-to-end
judge is dm-crypt itself in tests/system/test_encrypted_guest.py.
"""

from __future__ import annotations

import ctypes
import os

import pytest

from nitro import _datapath as dp

_libcrypto = ctypes.CDLL("libcrypto.so.3")
_libcrypto.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
_libcrypto.EVP_aes_256_xts.restype = ctypes.c_void_p
_libcrypto.EVP_aes_128_xts.restype = ctypes.c_void_p


def reference_xts(key: bytes, data: bytes, offset: int, sector: int, encrypt: bool = True) -> bytes:
    """dm-crypt aes-xts-plain64: IV = le64(byte offset / 512) || 0^8 per sector."""
    cipher = _libcrypto.EVP_aes_256_xts() if len(key) == 64 else _libcrypto.EVP_aes_128_xts()
    out = bytearray()
    for i in range(0, len(data), sector):
        ctx = ctypes.c_void_p(_libcrypto.EVP_CIPHER_CTX_new())
        iv = ((offset + i) // 512).to_bytes(8, "little") + bytes(8)
        assert _libcrypto.EVP_CipherInit_ex(ctx, ctypes.c_void_p(cipher), None, key, iv, int(encrypt))
        buf, n = ctypes.create_string_buffer(sector), ctypes.c_int()
        assert _libcrypto.EVP_CipherUpdate(ctx, buf, ctypes.byref(n), data[i:i + sector], sector)
        out += buf.raw
        _libcrypto.EVP_CIPHER_CTX_free(ctx)
    return bytes(out)


def secret_of(data: bytes, strip: bool = False) -> dp.Secret:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    s = dp.Secret(dp.SECRET_MAX)
    try:
        s.read_fd(r, strip_newline=strip)
    finally:
        os.close(r)
    return s


# IVs count 512-byte units even for 4 KiB sectors; the far offset gives
# sector numbers with six nonzero bytes, so every IV byte is exercised.
@pytest.mark.parametrize("offset", [3 * 4096, 0x0123456789AB * 4096], ids=["near", "far"])
@pytest.mark.parametrize("direct_iv", [True, False], ids=["iv-in-place", "iv-by-init"])
@pytest.mark.parametrize("key_len", [32, 64])
@pytest.mark.parametrize("sector", [512, 4096])
def test_matches_plain64_reference(key_len, sector, direct_iv, offset):
    key = os.urandom(key_len)
    x = dp.XtsCipher(secret_of(key), sector)
    x.direct_iv = direct_iv
    data = os.urandom(4 * 4096)
    ct = x.encrypt(data, offset)
    assert ct == reference_xts(key, data, offset, sector)
    assert x.decrypt(ct, offset) == data
    assert reference_xts(key, ct, offset, sector, encrypt=False) == data


def test_fast_iv_path_is_taken_with_this_openssl():
    """The datapath writes IVs in place when the probe at key load passes;
    if a new OpenSSL stops allowing it, nitro stays correct but loses most
    of its 512-byte-sector speed: this says so instead of the benchmark."""
    for key_len in (32, 64):
        x = dp.XtsCipher(secret_of(os.urandom(key_len)), 512)
        assert x.direct_iv
        x.direct_iv = False
        assert not x.direct_iv


def test_iv_offset_shifts_the_sector_number():
    key = os.urandom(64)
    with_tweak = dp.XtsCipher(secret_of(key), 512, iv_offset=8)
    plain = dp.XtsCipher(secret_of(key), 512)
    data = os.urandom(512)
    assert with_tweak.encrypt(data, 0) == plain.encrypt(data, 8 * 512)


def test_rejects_misaligned_and_bad_keys():
    x = dp.XtsCipher(secret_of(os.urandom(64)), 4096)
    with pytest.raises(dp.FrontendError):
        x.encrypt(bytes(4096), 512)
    with pytest.raises(dp.FrontendError):
        x.encrypt(bytes(512), 0)
    with pytest.raises(ValueError):
        dp.XtsCipher(secret_of(os.urandom(48)), 512)
    with pytest.raises(ValueError):
        dp.XtsCipher(secret_of(os.urandom(64)), 1024)


def test_secret_read_strips_one_newline_only_for_passphrases():
    assert len(secret_of(b"hunter2\n", strip=True)) == 7
    assert len(secret_of(b"hunter2\r\n", strip=True)) == 7
    assert len(secret_of(b"hunter2\n", strip=False)) == 8
    assert "hunter2" not in repr(secret_of(b"hunter2"))


def test_secret_refuses_empty_and_oversized():
    with pytest.raises(dp.FrontendError):
        secret_of(b"")
    with pytest.raises(dp.FrontendError):
        secret_of(b"x" * (dp.SECRET_MAX + 1))
    assert len(secret_of(b"x" * dp.SECRET_MAX)) == dp.SECRET_MAX


def test_secret_close_twice_is_fine():
    s = secret_of(b"k" * 32)
    s.close()
    s.close()
    with pytest.raises(ValueError):
        len(s)
