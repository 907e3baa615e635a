"""dm-crypt is the judge: encrypted volumes served by nitro, cross-read by
the Linux kernel's dm-crypt through plain (non-decrypting) virtio disks.

Two boots cover every case (TCG boots are the expensive part):
  boot 1: nitro serves A and B decrypted (vda, vdb), the guest writes P1;
          C and D are plain disks (vdc, vdd), dm-crypt writes P2 into them.
  boot 2: nitro serves C and D (vda, vdb), the guest must read P2;
          A and B are plain disks (vdc, vdd), dm-crypt must read P1.
A and C were made by host cryptsetup luksFormat, B and D by
`nitro volume create --encrypt`; between them they cover 256/512-bit keys
and 512/4096-byte sectors in both directions.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from pathlib import Path

import pytest

from bench.proc import REPO, nitro_argv
from tests.guest.qemu import run_guest

pytestmark = pytest.mark.system
FAST_PBKDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
SIZE = 24 << 20
# name: (made by, key bits, sector size)
VOLUMES = {
    "a": ("cryptsetup", 256, 512),
    "b": ("nitro", 512, 4096),
    "c": ("cryptsetup", 512, 4096),
    "d": ("nitro", 256, 512),
}


def make_volume(tmp: Path, name: str) -> str:
    """Create volume `name`; returns its (ASCII) key, also in <name>.key."""
    maker, bits, sector = VOLUMES[name]
    key = secrets.token_hex(24)
    kf, img = tmp / f"{name}.key", tmp / f"{name}.img"
    kf.write_text(key)
    kf.chmod(0o600)
    if maker == "cryptsetup":
        with open(img, "wb") as f:
            f.truncate((16 << 20) + SIZE)
        cmd = ["cryptsetup", "--batch-mode", "luksFormat", "--type", "luks2", *FAST_PBKDF,
               "--key-size", str(bits), "--sector-size", str(sector), "--key-file", str(kf), str(img)]
    else:
        cmd = nitro_argv("volume", "create", img, "--size", str(SIZE), "--encrypt", "--key-file", kf,
                         "--key-size", str(bits), "--sector-size", str(sector), *FAST_PBKDF)
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, timeout=120)
    return key


def served(names: list[str]) -> str:
    return "".join(f'[[blk]]\nid = "{n}"\nimage = "{n}.img"\nencryption = {{ key_file = "{n}.key" }}\n'
                   for n in names)


# In the guest: nitro's devices are vda, vdb; the plain disks vdc, vdd.
GUEST_FUNCS = r"""
set -e
mkdir -p /run/cryptsetup
pattern() { dd if=/dev/urandom of=/tmp/$1 bs=1M count=4 2>/dev/null; }
put() { dd if=/tmp/$1 of=$2 bs=1M seek=$3 oflag=direct conv=fsync 2>/dev/null; }
sum() { dd if=$1 bs=1M skip=$2 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1; }
luks() { printf '%s' "$2" > /tmp/k; cryptsetup open --key-file /tmp/k $1 $3; }
"""


def _sums(out: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=([0-9a-f]{64})\s*$", out, re.MULTILINE))


def _boot(image, script: str, tmp: Path, names_nitro: list[str], names_plain: list[str]) -> dict:
    result = run_guest(image, GUEST_FUNCS + script,
                       blk_sockets=[tmp / f"{n}.sock" for n in names_nitro],
                       plain_disks=[tmp / f"{n}.img" for n in names_plain], timeout=240)
    assert result.returncode == 0, result.describe()
    return _sums(result.script_output)


def test_dm_crypt_reads_what_nitro_wrote_and_the_other_way_round(
        nitro, guest_image_crypt, short_tmp_path):
    tmp = short_tmp_path
    keys = {n: make_volume(tmp, n) for n in VOLUMES}

    n1 = nitro(served(["a", "b"]))
    w = _boot(guest_image_crypt, f"""
[ "$(cat /sys/block/vda/size)" = {SIZE // 512} ] && [ "$(cat /sys/block/vdb/size)" = {SIZE // 512} ]
[ "$(cat /sys/block/vda/queue/logical_block_size)" = 512 ]
[ "$(cat /sys/block/vdb/queue/logical_block_size)" = 4096 ]
pattern p1; pattern p2
put p1 /dev/vda 4; put p1 /dev/vdb 12
dd if=/dev/zero of=/dev/vda bs=1M seek=20 count=2 oflag=direct 2>/dev/null
dd if=/dev/zero of=/dev/vdb bs=1M seek=20 count=2 oflag=direct 2>/dev/null
echo P1=$(sha256sum /tmp/p1 | cut -d' ' -f1)
echo NITRO_A=$(sum /dev/vda 4)
echo NITRO_B=$(sum /dev/vdb 12)
luks /dev/vdc '{keys["c"]}' c; luks /dev/vdd '{keys["d"]}' d
put p2 /dev/mapper/c 8; put p2 /dev/mapper/d 16
echo P2=$(sha256sum /tmp/p2 | cut -d' ' -f1)
cryptsetup close c; cryptsetup close d
""", tmp, ["a", "b"], ["c", "d"])
    assert w["P1"] == w["NITRO_A"] == w["NITRO_B"], w
    assert n1.stop() == 0
    (tmp / "control.sock").unlink(missing_ok=True)

    # Every byte nitro wrote is ciphertext: 2 MiB of zeros written through it
    # must not be zeros in the image (nor the plaintext of anything else).
    for name in ("a", "b"):
        data = (tmp / f"{name}.img").read_bytes()
        assert data.startswith(b"LUKS\xba\xbe")
        region = data[(16 << 20) + (20 << 20): (16 << 20) + (22 << 20)]
        assert region.count(0) < len(region) // 128, f"{name}: zeros written in the clear"

    n2 = nitro(served(["c", "d"]))
    r = _boot(guest_image_crypt, f"""
[ "$(cat /sys/block/vda/queue/logical_block_size)" = 4096 ]
echo NITRO_C=$(sum /dev/vda 8)
echo NITRO_D=$(sum /dev/vdb 16)
luks /dev/vdc '{keys["a"]}' a; luks /dev/vdd '{keys["b"]}' b
echo DM_A=$(sum /dev/mapper/a 4)
echo DM_B=$(sum /dev/mapper/b 12)
cryptsetup close a; cryptsetup close b
""", tmp, ["c", "d"], ["a", "b"])
    assert n2.stop() == 0
    assert r["DM_A"] == r["DM_B"] == w["P1"], (r, w)
    assert r["NITRO_C"] == r["NITRO_D"] == w["P2"], (r, w)
