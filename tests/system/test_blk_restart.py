"""nitro dies (SIGKILL) or is stopped (SIGTERM) under a writing guest and
comes back; QEMU (reconnect=1) re-attaches and the guest goes on.

Every block the guest saw acknowledged must be on the image afterwards, and
the guest must see no I/O error. Without inflight tracking this relies on
QEMU rewinding the ring to the used index on reconnect and nitro completing
requests in order per queue (so a request is either used or resubmitted).
"""

from __future__ import annotations

import hashlib
import random
import re
import time

import pytest

from tests.nitro_proc import Nitro

pytestmark = pytest.mark.system

CONFIG = '[[blk]]\nid = "vol0"\nsize = "64M"\n'
BLOCKS = 1000
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


@pytest.mark.parametrize("sig", ["KILL", "TERM"])
def test_guest_writes_survive_nitro_restarts(short_tmp_path, guest_image, start_guest, sig):
    rng = random.Random(42)
    n = Nitro(short_tmp_path, CONFIG)
    guest = start_guest(guest_image, WRITER % {"blocks": BLOCKS},
                        blk_sockets=[short_tmp_path / "vol0.sock"])
    restarts = 0
    during_writes = 0
    try:
        guest.wait_for(r"ACK 5\b", timeout=120)
        for _ in range(3):
            time.sleep(rng.uniform(0.2, 1.5))
            during_writes += "WRITER-DONE" not in guest.output()
            if sig == "KILL":
                n.proc.kill()
                n.proc.wait()
            else:
                assert n.stop() == 0, n.stderr()
            n.log.close()
            time.sleep(rng.uniform(0.0, 0.5))
            n = Nitro(short_tmp_path, CONFIG)
            restarts += 1
        result = guest.wait(timeout=300)
    finally:
        n.kill()
    out = result.output
    assert during_writes >= 2, "the guest finished before nitro was restarted: test proves nothing"
    assert "IOERROR" not in out, result.describe()
    assert "WRITER-DONE" in out, result.describe()
    acked = {int(m) for m in re.findall(r"^ACK (\d+)", out, re.M)}
    assert acked == set(range(BLOCKS))
    image = (short_tmp_path / "vol0.img").read_bytes()
    bad = [i for i in sorted(acked) if image[i * 4096:(i + 1) * 4096] != _block(i)]
    assert not bad, f"acknowledged blocks missing or torn after {restarts} restarts: {bad[:10]}"
    assert hashlib.sha256(image[: BLOCKS * 4096]).digest()  # the whole range was read
