"""A remote volume's LUKS2 metadata: the bounded plan of what to copy
(nitro/crypto/luks_header.py) and the copy, unlock and format on a fake
remote (backends/luks.py: on_remote, format_remote)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from nitro.config import EncryptionConfig
from nitro.crypto import keys, luks
from nitro.crypto import luks_header as lh
from nitro.devices.blk.backends.luks import LuksVolume, change_remote, format_remote, remote_info
from nitro.devices.blk.backends.raw import VolumeError
from tests.unit.test_crypto_luks import FAST, write_key

MiB = 1 << 20
HDR = 16 << 10


def binary(magic: bytes = lh.MAGIC_PRIMARY, version: int = 2, hdr_size: int = HDR) -> bytes:
    return struct.pack(">6sHQ", magic, version, hdr_size).ljust(lh.BINARY_HEADER, b"\0")


def meta(keyslots_size: object = str(16 * MiB - 2 * HDR), offset: object = str(16 * MiB),
         areas: tuple[tuple[object, object], ...] = (("32768", "258048"),)) -> dict:
    return {"config": {"json_size": str(HDR - 4096), "keyslots_size": keyslots_size},
            "segments": {"0": {"type": "crypt", "offset": offset, "size": "dynamic"}},
            "keyslots": {str(i): {"area": {"offset": o, "size": s}} for i, (o, s) in enumerate(areas)}}


def headers(primary: dict | bytes, secondary: dict | bytes | None = None, hdr_size: int = HDR) -> bytes:
    def one(m: dict | bytes, magic: bytes) -> bytes:
        text = m if isinstance(m, bytes) else json.dumps(m).encode()
        return (binary(magic, hdr_size=hdr_size) + text).ljust(hdr_size, b"\0")[:hdr_size]
    return one(primary, lh.MAGIC_PRIMARY) + one(primary if secondary is None else secondary,
                                                lh.MAGIC_SECONDARY)


def test_plan_of_a_default_header() -> None:
    p = lh.plan(headers(meta()), 64 * MiB, "nbd://h/e")
    assert (p.hdr_size, p.metadata_size, p.data_offset) == (HDR, 16 * MiB, 16 * MiB)
    assert p.ranges() == [(0, 2 * HDR), (32768, 258048)]


def test_secondary_areas_are_copied_too_and_a_damaged_one_is_ignored() -> None:
    two = meta(areas=(("32768", "258048"), ("290816", "258048")))
    p = lh.plan(headers(meta(), two), 64 * MiB, "v")
    assert p.keyslot_areas == ((32768, 2 * 258048),)  # merged: each byte read once
    assert lh.plan(headers(meta(), b"{not json"), 64 * MiB, "v").keyslot_areas == ((32768, 258048),)


@pytest.mark.parametrize(("buf", "error", "needle"), [
    (b"", lh.HeaderError, "truncated"),
    (b"LUKS\xba", lh.HeaderError, "truncated"),
    (binary(magic=b"XFSB\0\0"), luks.NotLuksError, "not a LUKS volume"),
    (bytes(4096), luks.NotLuksError, "not a LUKS volume"),
    (binary(version=1), lh.HeaderError, "LUKS version 1"),
    (binary(hdr_size=1 << 40), lh.HeaderError, "header size"),
    (binary(hdr_size=HDR + 512), lh.HeaderError, "header size"),
    (binary(hdr_size=8 << 20), lh.HeaderError, "header size"),  # LUKS2's largest is 4 MiB
])
def test_binary_header_bounds(buf: bytes, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle) as e:
        lh.parse_binary(buf, "nbd://h/e")
    assert str(e.value).startswith("nbd://h/e: ")


@pytest.mark.parametrize(("blob", "needle"), [
    (headers(meta())[:HDR + 100], "truncated"),
    (headers(b"{\"config\": "), "does not parse"),
    (headers(b"\xff\xfe"), "does not parse"),
    (headers(b"[]"), "no 'config' object"),
    (headers(meta(keyslots_size=str(1 << 40))), "over nitro's 64 MiB bound"),
    (headers(meta(keyslots_size=str(64 * MiB))), "over nitro's 64 MiB bound"),
    (headers(meta(keyslots_size=16744448)), "not a decimal string"),  # a JSON number
    (headers(meta(keyslots_size="-1")), "not a decimal string"),
    (headers(meta(keyslots_size="1" * 40)), "not a decimal string"),
    (headers(meta(offset="\u0661\u0662")), "not a decimal string"),  # Arabic-Indic digits
    (headers(meta(offset=str(4 * MiB))), "overlaps the LUKS2 metadata"),
    (headers(meta(offset=str(1 << 40))), "too small for its LUKS2 data segment"),
    (headers(meta(areas=(("0", "4096"),))), "outside the keyslots area"),
    (headers(meta(areas=(("32768", str(1 << 40)),))), "outside the keyslots area"),
    (headers(meta(areas=(("32768", None),))), "keyslots.0.area.size"),
    (headers({**meta(), "segments": {}}), "no '0' object"),
])
def test_json_bounds(blob: bytes, needle: str) -> None:
    with pytest.raises(lh.HeaderError, match=needle):
        lh.plan(blob, 64 * MiB, "v")


# ---- the copy, unlock and format on a fake remote ------------------------

class FakeRemote:
    """A remote volume in memory, counting the bytes read from it."""

    def __init__(self, data: bytearray, name: str = "nbd://127.0.0.1:1/e") -> None:
        self.data, self.size, self.path = data, len(data), name
        self.read_bytes = 0
        self.closed = False
        self.writes: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def block_io(self) -> Iterator[FakeRemote]:
        yield self

    def pread(self, count: int, offset: int) -> bytes:
        self.read_bytes += count
        return bytes(self.data[offset:offset + count])

    def pwrite(self, data: bytes, offset: int) -> None:
        self.writes.append((offset, len(data)))
        self.data[offset:offset + len(data)] = data

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return write_key(tmp_path / "k", os.urandom(32))


def formatted(key: Path, size: int = 32 * MiB, sector: int = 4096) -> FakeRemote:
    remote = FakeRemote(bytearray(size))
    with keys.read_secret(key, passphrase=False) as secret:
        info = format_remote(remote, secret, key_bits=512, sector_size=sector, pbkdf=FAST)
    assert info.data_offset == 16 * MiB and remote.data[:6] == lh.MAGIC_PRIMARY
    return remote


def test_format_then_unlock_reads_only_the_metadata(key: Path) -> None:
    remote = formatted(key)
    remote.read_bytes = 0
    vol = LuksVolume.on_remote(remote, EncryptionConfig(key_file=key))
    try:
        assert (vol.size, vol.block_size, vol.data_offset) == (16 * MiB, 4096, 16 * MiB)
        assert vol.capacity_sectors == 16 * MiB // 512 and not vol.supports_discard
        assert vol.xts is not None and vol.path == remote.path
        assert not hasattr(vol, "statistics")  # the fake has no connection counters
    finally:
        vol.close()
    assert remote.closed
    # binary header, both headers, one keyslot area: not the 16 MiB of metadata
    assert remote.read_bytes == 4096 + 2 * HDR + 258048


def test_wrong_key_names_the_remote_and_closes_it(key: Path, tmp_path: Path) -> None:
    remote = formatted(key)
    other = write_key(tmp_path / "other", os.urandom(32))
    with pytest.raises(VolumeError, match=r"^nbd://127.0.0.1:1/e: no keyslot opens"):
        LuksVolume.on_remote(remote, EncryptionConfig(key_file=other))
    assert remote.closed


@pytest.mark.parametrize(("size", "needle"), [
    (20 << 10, "too small for its LUKS2 metadata"),  # the secondary header cut off
    (1 * MiB, "too small for its LUKS2 data segment"),
])
def test_volume_smaller_than_its_metadata(key: Path, size: int, needle: str) -> None:
    remote = formatted(key)
    short = FakeRemote(remote.data[:size])
    with pytest.raises(VolumeError, match=needle):
        LuksVolume.on_remote(short, EncryptionConfig(key_file=key))
    assert short.closed


def test_format_refuses_a_volume_with_data_and_writes_nothing(key: Path) -> None:
    data = bytearray(32 * MiB)
    data[5 * MiB] = 1
    remote = FakeRemote(data)
    with keys.read_secret(key, passphrase=False) as secret, \
            pytest.raises(VolumeError, match="already holds data"):
        format_remote(remote, secret, key_bits=512, sector_size=512, pbkdf=FAST)
    assert remote.data.count(0) == 32 * MiB - 1


@pytest.mark.parametrize(("size", "error", "needle"), [
    (16 * MiB, VolumeError, "do not hold the LUKS2 header"),  # no data sector
    (8 * MiB, VolumeError, "do not hold the LUKS2 header"),   # libcryptsetup formats that
    (16 * MiB + 6144, luks.LuksError, "not aligned to requested sector size"),
])
def test_format_refuses_a_volume_with_no_whole_sector(key: Path, size: int, error: type,
                                                      needle: str) -> None:
    remote = FakeRemote(bytearray(size))
    with keys.read_secret(key, passphrase=False) as secret, pytest.raises(error, match=needle):
        format_remote(remote, secret, key_bits=512, sector_size=4096, pbkdf=FAST)
    assert not any(remote.data)


# ---- keyslot changes on a remote: what is written back, and in which order -----

def test_changed_runs_are_keyslots_first_then_the_secondary_then_the_primary() -> None:
    before = bytes(4 * HDR)
    after = bytearray(before)
    after[10] = 1                        # primary header
    after[HDR + 5000] = 2                # secondary header, its second block
    after[2 * HDR:2 * HDR + 8192] = b"\3" * 8192  # two keyslot blocks: one run
    after[3 * HDR + 100] = 4             # another keyslot block, apart
    runs = lh.changed_runs(before, bytes(after), HDR)
    assert [(off, len(data)) for off, data in runs] == [
        (2 * HDR, 8192), (3 * HDR, 4096), (HDR + 4096, 4096), (0, 4096)]
    assert all(data == bytes(after[off:off + len(data)]) for off, data in runs)
    assert lh.changed_runs(before, before, HDR) == []


def test_keys_added_removed_and_erased_on_a_remote(key: Path, tmp_path: Path) -> None:
    remote = formatted(key)
    remote.writes.clear()  # the format's
    new = write_key(tmp_path / "new", os.urandom(32))
    with keys.read_secret(key, passphrase=False) as old, \
            keys.read_secret(new, passphrase=False) as fresh:
        slot = change_remote(remote, lambda p, n: luks.add_key(p, old, fresh, FAST, name=n))
    assert slot == 1 and [k.slot for k in remote_info(remote).keyslots] == [0, 1]
    # The new slot's material went out before any header named it.
    offsets = [off for off, _ in remote.writes]
    assert offsets[-1] == 0 and offsets[0] >= 2 * HDR and HDR <= offsets[-2] < 2 * HDR
    LuksVolume.on_remote(remote, EncryptionConfig(key_file=new)).close()

    remote.writes.clear()
    with keys.read_secret(key, passphrase=False) as old:
        assert change_remote(remote, lambda p, n: luks.remove_key(p, old, name=n)) == 0
    with pytest.raises(VolumeError, match="no keyslot opens"):
        LuksVolume.on_remote(remote, EncryptionConfig(key_file=key))
    LuksVolume.on_remote(remote, EncryptionConfig(key_file=new)).close()

    # A change that fails writes nothing.
    remote.writes.clear()
    with keys.read_secret(new, passphrase=False) as last, pytest.raises(luks.LuksError,
                                                                         match="the last one"):
        change_remote(remote, lambda p, n: luks.remove_key(p, last, name=n))
    assert remote.writes == []

    area = bytes(remote.data[2 * HDR:16 * MiB])
    assert change_remote(remote, lambda p, n: luks.destroy_all_keyslots(p, name=n)) == [1]
    assert remote_info(remote).keyslots == ()
    assert bytes(remote.data[2 * HDR:16 * MiB]) != area  # the material itself is gone
    with pytest.raises(VolumeError, match="no keyslot opens"):
        LuksVolume.on_remote(remote, EncryptionConfig(key_file=new))


def _cut_short(remote: FakeRemote, change) -> tuple[list[bytearray], list[int]]:
    """The volume as it would be after each prefix of the change's writes
    (a crash, a lost connection): [nothing written, one run, ..., all],
    and the runs' offsets."""
    original = bytearray(remote.data)
    remote.writes.clear()
    change_remote(remote, change)
    runs = [(off, bytes(remote.data[off:off + n])) for off, n in remote.writes]
    states = []
    for k in range(len(runs) + 1):
        state = bytearray(original)
        for off, data in runs[:k]:
            state[off:off + len(data)] = data
        states.append(state)
    return states, [off for off, _ in runs]


def test_a_key_change_cut_short_leaves_a_volume_that_opens(key: Path, tmp_path: Path) -> None:
    new = write_key(tmp_path / "new", os.urandom(32))
    remote = formatted(key)
    with keys.read_secret(key, passphrase=False) as old, \
            keys.read_secret(new, passphrase=False) as fresh:
        states, _ = _cut_short(remote, lambda p, n: luks.add_key(p, old, fresh, FAST, name=n))
    assert len(states) >= 3
    for state in states:  # the old key opens whatever was written; the new one once all was
        LuksVolume.on_remote(FakeRemote(state), EncryptionConfig(key_file=key)).close()
    LuksVolume.on_remote(FakeRemote(states[-1]), EncryptionConfig(key_file=new)).close()


def test_an_erase_cut_before_the_headers_already_destroyed_the_key(key: Path) -> None:
    remote = formatted(key)
    states, offsets = _cut_short(remote, lambda p, n: luks.destroy_all_keyslots(p, name=n))
    slots_written = sum(1 for off in offsets if off >= 2 * HDR)
    assert 0 < slots_written < len(offsets) and all(off >= 2 * HDR for off in offsets[:slots_written])
    # Only the keyslot material overwritten, the headers not yet: the key
    # opens nothing any more.
    with pytest.raises(VolumeError, match="no keyslot opens"):
        LuksVolume.on_remote(FakeRemote(states[slots_written]), EncryptionConfig(key_file=key))
