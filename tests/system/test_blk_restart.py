"""Soak: nitro dies (SIGKILL) or is stopped (SIGTERM) again and again under a
writing guest and comes back; QEMU (reconnect=1) re-attaches and the guest
goes on as if nothing happened.

The guest writes an endless stream of numbered 4 KiB blocks with O_DIRECT,
block `seq` landing at position `seq % POSITIONS`, and prints "ACK seq" only
after dd returned. The test kills nitro at random moments, each time only
once the guest has been seen writing again after the previous restart (so
every kill lands on a live writer, never on a stalled one). At the end the
guest is stopped, then nitro (gracefully), and the image must hold, at every
position, the newest acknowledged block for it: intact, or (for the single
write that was in flight when the guest was stopped) the next one.

QEMU negotiates inflight I/O tracking (INFLIGHT_SHMFD, docs/reliability.md
"Inflight tracking"): a request nitro had taken off the ring when it died is
resubmitted from the shared inflight buffer by the next nitro. Whether a kill
lands inside a request is chance, so every cycle asserts that tracking was
negotiated and the buffer handed back, and the test reports how many
requests were resubmitted without requiring any.

`NITRO_SOAK_CYCLES` sets the number of SIGKILL cycles: 20 in `make test`
(CI), `make soak` runs 200.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.proc import Nitro

pytestmark = pytest.mark.system

CONFIG = '[[blk]]\nid = "vol0"\nsize = "64M"\n'
POSITIONS = 1024
BLOCK = 4096
WRITER = r"""
i=0
while :; do
  # Block i: its number repeated, so the host can tell which write it sees.
  yes "seq-$i" | head -c 4096 > /tmp/b
  if ! dd if=/tmp/b of=/dev/vda bs=4096 seek=$((i %% %(positions)d)) count=1 oflag=direct 2>/tmp/err; then
    echo "IOERROR $i $(cat /tmp/err)"; exit 1
  fi
  echo "ACK $i"
  i=$((i+1))
done
"""
CYCLES = {"KILL": int(os.environ.get("NITRO_SOAK_CYCLES", "20")), "TERM": 5}
INFLIGHT_SHMFD = 1 << 12  # VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD


def block(seq: int) -> bytes:
    return ((f"seq-{seq}\n".encode()) * BLOCK)[:BLOCK]


def acked(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"^ACK (\d+)", output, re.M)]


def check_image(image: bytes, acks: list[int]) -> list[str]:
    """Positions whose content is not the newest acknowledged write there
    (nor the one write possibly in flight when the guest was stopped)."""
    last = max(acks)
    newest: dict[int, int] = {}
    for seq in acks:
        newest[seq % POSITIONS] = max(seq, newest.get(seq % POSITIONS, -1))
    bad = []
    for pos, seq in sorted(newest.items()):
        got = image[pos * BLOCK:(pos + 1) * BLOCK]
        allowed = [block(seq)]
        if (last + 1) % POSITIONS == pos:
            allowed.append(block(last + 1))
        if got not in allowed:
            bad.append(f"position {pos}: expected seq {seq}, found {got[:16]!r}")
    return bad


def assert_acked_writes_kept(out: str, image: bytes, restarts: int) -> list[int]:
    """The guest saw no I/O error, its ACKs have no gap, and `image` holds
    every acknowledged write (check_image); the ACKs."""
    assert "IOERROR" not in out, out[-3000:]
    assert not re.search(r"I/O error|blk_update_request|Buffer I/O", out), out[-3000:]
    acks = acked(out)
    assert acks == list(range(len(acks))), "the guest's stream of ACKs has a gap or a repeat"
    bad = check_image(image, acks)
    assert not bad, f"{len(bad)} positions lost their acknowledged write after {restarts} restarts: {bad[:5]}"
    return acks


def _device(n: Nitro) -> dict | None:
    """vol0's `nitro status --json`; None while the control socket is not up yet."""
    try:
        return json.loads(n.status_json())["devices"][0]
    except subprocess.CalledProcessError:
        return None


def attached_with_inflight(n: Nitro, timeout: float = 60) -> dict:
    """vol0's status once QEMU has (re)connected, negotiated inflight
    tracking and handed its inflight buffer to this nitro (SET_INFLIGHT_FD)."""
    deadline = time.monotonic() + timeout
    while True:
        dev = _device(n)
        if dev and dev.get("connected") and 'msg="inflight buffer mapped"' in n.output():
            assert dev["protocol_features"] & INFLIGHT_SHMFD, "QEMU did not negotiate inflight tracking"
            return dev
        assert time.monotonic() < deadline, f"QEMU did not reconnect: {dev}\n{n.output()}"
        time.sleep(0.2)


def wait_for_new_ack(guest, after: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        acks = acked(guest.output())
        if acks and acks[-1] > after:
            return acks[-1]
        assert guest.running(), "guest stopped: " + guest.output()[-2000:]
        time.sleep(0.05)
    raise AssertionError(f"guest wrote nothing for {timeout}s after ACK {after}:\n" + guest.output()[-2000:])


def restart_cycles(n: Nitro, guest, restart: Callable[[], Nitro], sig: str, cycles: int,
                   rng: random.Random) -> tuple[Nitro, list[float], list[int]]:
    """Halt nitro with `sig` and restart() it `cycles` times under the
    writing guest, each time at a random moment once the guest was seen
    writing again. The nitro running at the end (all are killed if this
    fails), the kill-to-next-write windows, the requests each resubmitted."""
    windows: list[float] = []
    resubmitted: list[int] = []
    try:
        for _cycle in range(cycles):
            resubmitted.append(attached_with_inflight(n).get("resubmitted", 0))
            time.sleep(rng.uniform(0.0, 1.0))
            t0 = time.monotonic()
            n.halt(sig)
            # An ACK echoed late may be from a dd done before the kill; the
            # one after it needed the new nitro.
            last = max(acked(guest.output()), default=-1) + 1
            time.sleep(rng.uniform(0.0, 0.3))
            n = restart()
            wait_for_new_ack(guest, last, timeout=120)
            windows.append(time.monotonic() - t0)
        resubmitted.append(attached_with_inflight(n).get("resubmitted", 0))
    except BaseException:
        n.kill()
        raise
    return n, windows, resubmitted


def kill_soak(tmp: Path, config: str, guest_image, start_guest, cycles: int,
              rng: random.Random) -> tuple[str, list[float], list[int]]:
    """A nitro on `config` (device vol0) under the writing guest, killed
    `cycles` times (restart_cycles), then the guest stopped and nitro
    stopped cleanly: the guest's output, the windows, the resubmissions."""
    n = Nitro(tmp, config)
    guest = start_guest(guest_image, WRITER % {"positions": POSITIONS}, blk_sockets=[tmp / "vol0.sock"])
    try:
        wait_for_new_ack(guest, -1, timeout=180)
        n, windows, resubmitted = restart_cycles(n, guest, lambda: Nitro(tmp, config, timeout=60), "KILL",
                                                 cycles, rng)
        guest.kill()
        assert n.stop() == 0, n.output()
    finally:
        n.kill()
        guest.kill()
    return guest.output(), windows, resubmitted


@pytest.mark.parametrize("sig", ["KILL", "TERM"])
def test_acknowledged_writes_survive_restart_cycles(short_tmp_path, guest_image, start_guest, sig):
    rng = random.Random(f"soak-{sig}")
    n = Nitro(short_tmp_path, CONFIG)
    guest = start_guest(guest_image, WRITER % {"positions": POSITIONS},
                        blk_sockets=[short_tmp_path / "vol0.sock"])
    try:
        wait_for_new_ack(guest, -1, timeout=180)
        assert "nitro_blk_resubmitted_requests_total" in n.metrics()
        n, windows, resubmitted = restart_cycles(n, guest, lambda: Nitro(short_tmp_path, CONFIG), sig,
                                                 CYCLES[sig], rng)
        guest.kill()
        assert n.stop() == 0, n.output()
    finally:
        n.kill()
        guest.kill()
    acks = assert_acked_writes_kept(guest.output(), (short_tmp_path / "vol0.img").read_bytes(), len(windows))
    print(f"\nsoak {sig}: {len(windows)} restarts, {len(acks)} acknowledged writes, "
          f"kill-to-next-write median {sorted(windows)[len(windows) // 2]:.2f}s max {max(windows):.2f}s, "
          f"requests resubmitted from the inflight buffer: {sum(resubmitted)} "
          f"(by {sum(1 for r in resubmitted if r)} of {len(resubmitted)} daemons)")


def test_check_image_catches_a_lost_write():
    """The oracle itself: a position holding an older write is reported."""
    acks = list(range(POSITIONS + 3))
    image = bytearray(b"".join(block(s) for s in range(POSITIONS)))
    image[0:BLOCK] = block(POSITIONS)  # positions 0 newest; 1 and 2 still old
    image[BLOCK * 3:BLOCK * 4] = block(POSITIONS + 3)  # the in-flight write: allowed
    bad = check_image(bytes(image), acks)
    assert [b.split(":")[0] for b in bad] == ["position 1", "position 2"]
