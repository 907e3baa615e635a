"""Which bytes of a remote volume hold its LUKS2 metadata (sans-IO).

A LUKS2 volume on an NBD export or an RBD image is unlocked from a local
copy of its metadata (backends/luks.py): libcryptsetup needs the two
binary headers, their JSON areas and the keyslot areas, nothing of the
data segment. Those bytes come from the network and are untrusted, so the
copy is planned here from the little that has to be parsed by hand, with
hard bounds, before anything large is read or allocated:

1. the primary binary header (``BINARY_HEADER`` bytes at 0):
   `parse_binary` checks the magic and version and returns ``hdr_size``
   (one of LUKS2's nine sizes, 16 KiB to 4 MiB);
2. the two headers, ``[0, 2 * hdr_size)``: `plan` parses each JSON area
   (the secondary's too: libcryptsetup picks the newer one) and returns
   the keyslot areas to fetch, the metadata size and the data segment's
   offset.

Layouts: cryptsetup's docs/on-disk-format-luks2.pdf, "LUKS2 binary header"
and "JSON area" (big-endian fields; offsets and sizes as decimal strings).
libcryptsetup checks the copy again, fully, when it loads it.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Final

from nitro.crypto.luks import LuksError, NotLuksError

BINARY_HEADER: Final = 4096
MAGIC_PRIMARY: Final = b"LUKS\xba\xbe"
MAGIC_SECONDARY: Final = b"SKUL\xba\xbe"
HDR_SIZES: Final = frozenset((16 << 10) << i for i in range(9))  # 16 KiB .. 4 MiB
# The metadata (both headers and the keyslots area) nitro copies at most:
# cryptsetup's default is 16 MiB, --luks2-keyslots-size allows up to 128 MiB.
MAX_METADATA: Final = 64 << 20
_VERSION: Final = 2
_HDR = struct.Struct(">6sHQ")  # magic, version, hdr_size


class HeaderError(LuksError):
    """The remote metadata is malformed or out of nitro's bounds."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to copy, from the parsed headers."""
    hdr_size: int
    metadata_size: int                    # both headers plus the keyslots area
    data_offset: int                      # segment 0's offset (bytes)
    keyslot_areas: tuple[tuple[int, int], ...]  # (offset, length), sorted, merged

    def ranges(self) -> list[tuple[int, int]]:
        """Every (offset, length) libcryptsetup reads to unlock."""
        return [(0, 2 * self.hdr_size), *self.keyslot_areas]


def parse_binary(buf: bytes, name: str, magic: bytes = MAGIC_PRIMARY) -> int:
    """A binary header's hdr_size. NotLuksError without the magic,
    HeaderError for anything else out of bounds."""
    if len(buf) < _HDR.size:
        raise HeaderError(f"{name}: LUKS2 header truncated ({len(buf)} bytes)")
    got, version, hdr_size = _HDR.unpack_from(buf)
    if got != magic:
        raise NotLuksError(f"{name}: not a LUKS volume (no LUKS magic at offset 0); "
                           "create one with `nitro volume create --encrypt`")
    if version != _VERSION:
        raise HeaderError(f"{name}: LUKS version {version}; nitro serves LUKS2 only")
    if hdr_size not in HDR_SIZES:
        raise HeaderError(f"{name}: LUKS2 header size {hdr_size} is not one of LUKS2's "
                          "(16 KiB to 4 MiB)")
    return hdr_size


def plan(headers: bytes, volume_size: int, name: str) -> Plan:
    """The copy plan from the two headers (``2 * hdr_size`` bytes). The
    primary must parse; a secondary that does not is left to libcryptsetup."""
    hdr_size = parse_binary(headers[:BINARY_HEADER], name)
    if len(headers) != 2 * hdr_size:
        raise HeaderError(f"{name}: LUKS2 headers truncated ({len(headers)} of "
                          f"{2 * hdr_size} bytes)")
    primary = _layout(headers[BINARY_HEADER:hdr_size], hdr_size, name)
    areas = set(primary.areas)
    try:
        if parse_binary(headers[hdr_size:hdr_size + BINARY_HEADER], name,
                        MAGIC_SECONDARY) == hdr_size:
            areas |= set(_layout(headers[hdr_size + BINARY_HEADER:], hdr_size, name).areas)
    except LuksError:
        pass  # damaged secondary: libcryptsetup uses (and repairs from) the primary
    if primary.data_offset >= volume_size:
        raise HeaderError(f"{name}: the volume ({volume_size} bytes) is too small for its "
                          f"LUKS2 data segment at {primary.data_offset}")
    return Plan(hdr_size, primary.metadata_size, primary.data_offset, _merge(areas))


@dataclasses.dataclass(frozen=True)
class _Layout:
    metadata_size: int
    data_offset: int
    areas: tuple[tuple[int, int], ...]


def _layout(area: bytes, hdr_size: int, name: str) -> _Layout:
    """One JSON area's keyslots, keyslots size and segment offset."""
    text = area.split(b"\0", 1)[0]
    try:
        meta = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise HeaderError(f"{name}: LUKS2 JSON metadata does not parse") from None
    cfg, segs, slots = (_table(meta, k, name) for k in ("config", "segments", "keyslots"))
    keyslots_size = _number(cfg.get("keyslots_size"), "config.keyslots_size", name)
    metadata_size = 2 * hdr_size + keyslots_size
    if metadata_size > MAX_METADATA:
        raise HeaderError(f"{name}: LUKS2 metadata of {metadata_size} bytes is over nitro's "
                          f"{MAX_METADATA >> 20} MiB bound")
    seg = _table(segs, "0", name)
    data_offset = _number(seg.get("offset"), "segments.0.offset", name)
    if data_offset < metadata_size:
        raise HeaderError(f"{name}: data segment at {data_offset} overlaps the LUKS2 "
                          f"metadata ({metadata_size} bytes)")
    areas = []
    for slot in slots:
        where = f"keyslots.{slot}.area"
        a = _table(_table(slots, slot, name), "area", name)
        off = _number(a.get("offset"), f"{where}.offset", name)
        size = _number(a.get("size"), f"{where}.size", name)
        if off < 2 * hdr_size or off + size > metadata_size:
            raise HeaderError(f"{name}: {where} [{off}, {off + size}) is outside the "
                              "keyslots area")
        areas.append((off, size))
    return _Layout(metadata_size, data_offset, tuple(areas))


def _table(d: dict, key: str, name: str) -> dict:
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, dict):
        raise HeaderError(f"{name}: LUKS2 JSON metadata has no {key!r} object")
    return v


def _number(v: object, what: str, name: str) -> int:
    """A LUKS2 size or offset: a decimal string (JSON numbers lose bits)."""
    if not isinstance(v, str) or not (v.isascii() and v.isdigit()) or len(v) > 20:
        raise HeaderError(f"{name}: LUKS2 {what} is not a decimal string: {v!r}")
    n = int(v)
    if n > 1 << 62:
        raise HeaderError(f"{name}: LUKS2 {what} {n} is out of range")
    return n


def _merge(areas: set[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Overlapping or touching ranges as one (each byte is read once)."""
    out: list[list[int]] = []
    for off, size in sorted(areas):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + size - out[-1][0])
        elif size:
            out.append([off, size])
    return tuple((o, s) for o, s in out)


#: What a change to a copy of the metadata is written back in.
WRITE_BLOCK: Final = 4096


def changed_runs(before: bytes, after: bytes, hdr_size: int) -> list[tuple[int, bytes]]:
    """The (offset, bytes) runs of WRITE_BLOCK blocks that differ between
    two copies of a volume's metadata, in the order they must reach the
    volume: the keyslots area first, then the secondary header, the
    primary last. So a header on the volume never names keyslot material
    that is not there yet (a key added), and a keyslot's material is gone
    before the header stops naming it (a key removed, an erase: the
    crypto-erase holds even if the header write never happens)."""
    if len(before) != len(after) or len(before) < 2 * hdr_size:
        raise ValueError("the copies differ in size or hold no headers")
    parts = [(2 * hdr_size, len(after)), (hdr_size, 2 * hdr_size), (0, hdr_size)]
    runs: list[tuple[int, bytes]] = []
    for start, end in parts:
        run_start = None
        for off in range(start, end + WRITE_BLOCK, WRITE_BLOCK):
            blk = min(off + WRITE_BLOCK, end)
            differs = off < end and before[off:blk] != after[off:blk]
            if differs and run_start is None:
                run_start = off
            elif not differs and run_start is not None:
                runs.append((run_start, after[run_start:min(off, end)]))
                run_start = None
    return runs
