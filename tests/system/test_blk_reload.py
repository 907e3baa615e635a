"""nitro is reloaded again and again (a second device added, then removed)
under a guest writing to vol0; vol0 must not notice.

Every block the guest saw acknowledged must be on the image afterwards, the
guest must see no I/O error, and vol0's frontend (QEMU) must never have been
disconnected: its connection count stays 1.
"""

from __future__ import annotations

import json
import random
import re
import time

import pytest

from bench.proc import Nitro

pytestmark = pytest.mark.system

VOL0 = '[[blk]]\nid = "vol0"\nsize = "64M"\n'
VOL1 = '[[blk]]\nid = "vol1"\nsize = "16M"\n'
BLOCKS = 1500  # about 11 s of writing in a TCG guest: longer than the reloads take
RELOADS = 6
WRITER = r"""
i=0
while [ $i -lt %(blocks)d ]; do
  # 4 KiB block i: its number repeated, so the host can check each one.
  yes "block-$i" | head -c 4096 > /tmp/b
  if ! dd if=/tmp/b of=/dev/vda bs=4096 seek=$i count=1 oflag=direct 2>/tmp/err; then
    echo "IOERROR $i $(cat /tmp/err)"; exit 1
  fi
  echo "ACK $i"
  i=$((i+1))
done
echo WRITER-DONE
"""


def _block(i: int) -> bytes:
    return ((f"block-{i}\n".encode()) * 4096)[:4096]


def _reload(n: Nitro, body: str) -> str:
    n.write_config(body)
    r = n.reload()
    assert r.returncode == 0, r.stderr
    return r.stdout


def _devices(n: Nitro) -> dict[str, dict]:
    return {d["id"]: d for d in json.loads(n.status_json())["devices"]}


def test_guest_writes_survive_reloads(short_tmp_path, guest_image, start_guest):
    rng = random.Random(7)
    n = Nitro(short_tmp_path, VOL0)
    guest = start_guest(guest_image, WRITER % {"blocks": BLOCKS},
                        blk_sockets=[short_tmp_path / "vol0.sock"])
    during_writes = 0
    try:
        guest.wait_for(r"ACK 5\b", timeout=120)
        for k in range(RELOADS):
            time.sleep(rng.uniform(0.2, 1.0))
            during_writes += "WRITER-DONE" not in guest.output()
            if k % 2 == 0:
                assert "added: vol1" in _reload(n, VOL0 + VOL1)
                assert (short_tmp_path / "vol1.sock").exists()
            else:
                assert "removed: vol1" in _reload(n, VOL0)
                assert not (short_tmp_path / "vol1.sock").exists()
            vol0 = _devices(n)["vol0"]
            if not vol0["connected"] and "WRITER-DONE" in guest.output():
                break  # the guest finished and powered off: its frontend left, as it should
            assert vol0["connections"] == 1 and vol0["connected"], vol0
        result = guest.wait(timeout=300)
        vol0 = _devices(n)["vol0"]
        assert n.stop() == 0, n.output()
    finally:
        n.kill()
    out = result.output
    assert during_writes >= RELOADS - 1, "the guest finished before the reloads: test proves nothing"
    assert "IOERROR" not in out, result.describe()
    assert "WRITER-DONE" in out, result.describe()
    assert vol0["connections"] == 1, "vol0's frontend was disconnected by a reload"
    assert vol0["broken"] is None and vol0["protocol_errors"] == 0
    acked = {int(m) for m in re.findall(r"^ACK (\d+)", out, re.M)}
    assert acked == set(range(BLOCKS))
    image = (short_tmp_path / "vol0.img").read_bytes()
    bad = [i for i in sorted(acked) if image[i * 4096:(i + 1) * 4096] != _block(i)]
    assert not bad, f"acknowledged blocks missing or torn after {RELOADS} reloads: {bad[:10]}"
