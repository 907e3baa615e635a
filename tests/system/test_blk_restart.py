"""nitro dies (SIGKILL) or is stopped (SIGTERM) under a writing guest and
comes back; QEMU (reconnect=1) re-attaches and the guest goes on.

Every block the guest saw acknowledged must be on the image afterwards, and
the guest must see no I/O error. QEMU negotiates inflight I/O tracking
(INFLIGHT_SHMFD, docs/reliability.md "Inflight tracking"): a request nitro
had taken off the ring when it died is resubmitted from the shared inflight
buffer by the next nitro. Whether a kill lands inside a request is chance,
so the test asserts that tracking was negotiated every time and reports how
many requests were resubmitted, without requiring any.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
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


INFLIGHT_SHMFD = 1 << 12  # VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD


def _device(n: Nitro) -> dict | None:
    """vol0's `nitro status --json`; None while the control socket is not up yet."""
    try:
        return json.loads(n.status_json())["devices"][0]
    except subprocess.CalledProcessError:
        return None


def _connected_device(n: Nitro, timeout: float = 60) -> dict:
    """vol0's status once QEMU has (re)connected and negotiated."""
    deadline = time.monotonic() + timeout
    while True:
        dev = _device(n)
        if dev and dev.get("connected") and dev.get("protocol_features"):
            return dev
        assert time.monotonic() < deadline, f"QEMU did not reconnect: {dev}\n{n.stderr()}"
        time.sleep(0.2)


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
    resubmitted = []
    try:
        guest.wait_for(r"ACK 5\b", timeout=120)
        assert "nitro_blk_resubmitted_requests_total" in n.metrics()
        for _ in range(3):
            dev = _connected_device(n)
            assert dev["protocol_features"] & INFLIGHT_SHMFD, "QEMU did not negotiate inflight tracking"
            time.sleep(rng.uniform(0.2, 1.5))
            # QEMU handed its buffer (back) to this nitro: SET_INFLIGHT_FD.
            deadline = time.monotonic() + 20
            while 'msg="inflight buffer mapped"' not in n.stderr():
                assert time.monotonic() < deadline, n.stderr()
                time.sleep(0.1)
            during_writes += "WRITER-DONE" not in guest.output()
            resubmitted.append((_device(n) or {}).get("resubmitted", 0))
            if sig == "KILL":
                n.proc.kill()
                n.proc.wait()
            else:
                assert n.stop() == 0, n.stderr()
            n.log.close()
            time.sleep(rng.uniform(0.0, 0.5))
            n = Nitro(short_tmp_path, CONFIG)
            restarts += 1
        dev = _connected_device(n)
        assert dev["protocol_features"] & INFLIGHT_SHMFD, "QEMU did not negotiate inflight tracking"
        result = guest.wait(timeout=300)
    finally:
        n.kill()
    # Not asserted (chance decides): shown with -s, and in a failure's output.
    print(f"requests resubmitted by each nitro before it was stopped ({sig}): {resubmitted}")
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
