"""`nitro volume` in-process: what `info` says about locks and headers.
(The full commands against real cryptsetup are in
tests/integration/test_encrypted_volume.py.)"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nitro import cli
from nitro.crypto import keys, luks
from nitro.devices.blk.backends import raw
from nitro.devices.blk.backends.raw import RawImage

FAST = luks.Pbkdf("pbkdf2", iterations=1000)


def luks_volume(tmp_path: Path, **format_args) -> Path:
    """A 16 MiB LUKS2 volume v.img keyed by the 0600 key file k (fast PBKDF)."""
    key = tmp_path / "k"
    key.write_bytes(os.urandom(64))
    key.chmod(0o600)
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate((16 << 20) + (1 << 20))
    with keys.read_secret(key, passphrase=False) as secret:
        luks.format_volume(img, secret, pbkdf=FAST, **format_args)
    return img


def info(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(["volume", "info", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_raw_and_attached(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "raw.img"
    img.write_bytes(bytes(1 << 20))
    assert info(img, capsys) == (0, f"{img}: raw, {1 << 20} bytes, attached: no\n", "")
    held = RawImage.open(img, size=None, readonly=True)  # what a read-only daemon holds
    try:
        assert info(img, capsys)[1].endswith("attached: yes\n")
    finally:
        held.close()


def test_lock_errors_other_than_contention_are_not_attached(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "raw.img"
    img.write_bytes(bytes(4096))

    def flock(fd: int, op: int) -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(raw.fcntl, "flock", flock)
    rc, out, _ = info(img, capsys)
    assert rc == 0 and "attached: unknown" in out and "Permission denied" in out
    assert "attached: yes" not in out


def test_info_on_a_damaged_luks_header_is_an_error_not_raw(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = luks_volume(tmp_path)
    with open(img, "r+b") as f:
        f.truncate(8192)  # the magic is there, the rest of the header is not
    rc, out, err = info(img, capsys)
    assert rc == 1 and out == ""
    assert "not a LUKS volume, or its header is corrupt or truncated" in err


def test_info_when_libcryptsetup_fails_is_an_error_not_raw(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "raw.img"
    img.write_bytes(bytes(4096))

    def no_lib():
        raise luks.LuksError("cannot load libcryptsetup.so.12")

    monkeypatch.setattr(luks, "_load_lib", no_lib)
    rc, out, err = info(img, capsys)
    assert rc == 1 and "raw" not in out and "libcryptsetup" in err


def test_info_on_luks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = info(luks_volume(tmp_path), capsys)
    assert rc == 0 and "LUKS2" in out and "attached:    no" in out


def test_pbkdf_choices_are_the_ones_luks_supports(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["volume", "add-key", "--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(luks.PBKDFS) + "}" in out


@pytest.mark.parametrize(("args", "needle"), [
    (["nbd://127.0.0.1:1/e"], "formats one"),                       # no --encrypt
    (["nbd://127.0.0.1:1/e", "--encrypt", "--key-file", "k", "--size", "1G"], "its own"),
    (["nbd://127.0.0.1:1/e", "--encrypt"], "--key-file or --passphrase-file"),
    (["rbd:pool", "--encrypt", "--key-file", "k"], "rbd:POOL/IMAGE"),
    (["nbd://127.0.0.1:1/e", "--encrypt", "--key-file", "k", "--ceph-conf", "c"],
     "only with source"),
    (["v.img", "--size", "1G", "--user", "nitro"], "--user needs a remote source"),
    (["v.img"], "--size is required"),
])
def test_create_remote_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch, args: list[str],
                                    needle: str) -> None:
    """Refused before anything is contacted or created (port 1: nothing listens)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["volume", "create", *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "v.img").exists()


def test_a_remote_that_never_opens_is_a_clear_error_not_a_hang(monkeypatch, capsys):
    """librbd waits without bound for an OSD that is away: the command
    gives up after its open timeout with one line, and a volume that opens
    after that is closed, not leaked."""
    import threading

    from nitro import volume_cli
    from nitro.devices import blk

    release, closed = threading.Event(), threading.Event()

    class Late:
        def close(self) -> None:
            closed.set()

    def open_remote(src, *, readonly=False):
        release.wait(10)
        return Late()

    monkeypatch.setattr(blk, "open_remote", open_remote)
    monkeypatch.setattr(volume_cli, "_OPEN_TIMEOUT", 0.2)
    assert cli.main(["volume", "info", "nbd://127.0.0.1:1/"]) == 1
    assert capsys.readouterr().err.strip() == (
        "nitro: error: nbd://127.0.0.1:1/: no answer within 0 s (is the storage up?)")
    release.set()
    assert closed.wait(10)
