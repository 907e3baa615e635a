"""One hostile tenant must not hurt another (issue 11, the headline test).

A victim QEMU guest (TCG) runs fio on its nitro disk and pings nitro's
gateway while an attacker on the same daemon, a Python vhost-user frontend
(tests/integration/attacker.py: much cheaper than a second TCG guest),
attacks in turn. After every attack the daemon is up and the attacker's
counter moved; at the end the victim's fio finished without an error and
its ping kept answering.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.guest.qemu import mac_address
from tests.integration import attacker as at

pytestmark = pytest.mark.system

VICTIM_MAC = mac_address(0)
ATTACKER_MAC, ATTACKER_IP = at.ATTACKER_MAC, at.ATTACKER_IP
CONFIG = at.tenant_config(VICTIM_MAC)

# fio and a ping to the gateway (answered by nitro's trio thread, the path
# a link-local flood competes for) for RUNTIME seconds, started together.
VICTIM = r"""
ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -T 2 -s /usr/share/udhcpc/default.script >/dev/null 2>&1 || { echo DHCP-FAILED; exit 1; }
fio --name=victim --filename=/dev/vda --rw=randrw --bs=4k --size=32M --direct=1 --ioengine=psync \
    --time_based --runtime={runtime} --verify=crc32c --verify_fatal=1 \
    --output-format=terse --terse-version=3 > /tmp/fio.out 2>/tmp/fio.err &
fio=$!
ping -c {runtime} 10.0.0.1 > /tmp/ping.out 2>&1 &
ping=$!
echo VICTIM-READY
wait $fio; echo "FIO_RC=$?"
wait $ping
echo "FIO_ERR=$(cut -d';' -f5 /tmp/fio.out) FIO_IOS=$(cut -d';' -f6 /tmp/fio.out)"
cat /tmp/fio.err
grep 'packets transmitted' /tmp/ping.out
"""


def _value(n, name: str, **labels: str) -> float:
    return at.counter_of(n.metrics(), name, **labels)


def _start_victim(nitro, guest_image_fio, short_tmp_path, start_guest, runtime: int):
    n = nitro(CONFIG)
    guest = start_guest(guest_image_fio, VICTIM.replace("{runtime}", str(runtime)),
                        blk_sockets=[short_tmp_path / "vvol.sock"],
                        net_sockets=[short_tmp_path / "vnet.sock"], mem_mb=512)
    guest.wait_for("VICTIM-READY|DHCP-FAILED", timeout=120)
    assert "DHCP-FAILED" not in guest.output(), guest.output()
    return n, guest


def _broken_or_dead(n, device: str) -> bool:
    try:
        return _value(n, "nitro_device_broken", device=device) == 1
    except OSError:  # no metrics: the daemon is gone (let it be reaped)
        n.proc.wait(timeout=10)
        return True


def _check_victim(n, guest, runtime: int) -> None:
    result = guest.wait(timeout=runtime + 120)
    out = result.script_output
    assert result.returncode == 0, result.describe()
    assert "FIO_RC=0" in out and re.search(r"FIO_ERR=0 FIO_IOS=\d+", out), out
    sent, got = map(int, re.search(r"(\d+) packets transmitted, (\d+) packets received", out).groups())
    # One reply may still be on its way when ping -c gives up on the last.
    assert sent == runtime and got >= sent - 1, out
    assert _value(n, "nitro_device_broken", device="vvol", kind="blk") == 0
    assert _value(n, "nitro_device_broken", device="vnet", kind="net") == 0
    assert _value(n, "nitro_guest_errors_total", device="vvol") == 0
    assert _value(n, "nitro_guest_errors_total", device="vnet") == 0
    assert _value(n, "nitro_blk_request_errors_total", device="vvol") == 0
    assert _value(n, "nitro_blk_requests_total", device="vvol", op="out") > 0
    assert n.proc.poll() is None


def _attack(n, what, name: str, labels: dict[str, str], *args, least: float = 1) -> None:
    """Run one attack; the daemon stays up and the attacker's counter moves."""
    before = _value(n, name, **labels)
    what(*args)
    assert n.proc.poll() is None, f"the daemon died during {what.__name__}"
    moved = _value(n, name, **labels) - before
    assert moved >= least, f"{what.__name__}: {name}{labels} moved by {moved}"


def test_one_hostile_tenant_does_not_hurt_another(nitro, guest_image_fio, short_tmp_path, start_guest):
    runtime = 45
    n, guest = _start_victim(nitro, guest_image_fio, short_tmp_path, start_guest, runtime)
    started = time.monotonic()
    anet, avol = short_tmp_path / "anet.sock", short_tmp_path / "avol.sock"
    # ARP/DHCP to nitro's own services: throttled at linklocal_pps (1024/s).
    _attack(n, at.flood_link_local, "nitro_net_linklocal_allowance_exceeded_total", {"interface": "anet"},
            anet, ATTACKER_MAC, ATTACKER_IP, 6, least=1000)
    # TSO super-frames of mss 1 to the victim: refused before any segmenting.
    _attack(n, at.tiny_mss_tso, "nitro_net_drops_total", {"interface": "anet", "reason": "bad_header"},
            anet, ATTACKER_MAC, ATTACKER_IP, VICTIM_MAC, at.VICTIM_IP, 5, least=100)
    # Kicks with nothing behind them: counted, served as empty passes.
    _attack(n, at.kick_storm, "nitro_virtqueue_kicks_total", {"device": "avol", "queue": "0"}, avol, 5)
    # A blocking call eventfd one below saturation: its requests still complete.
    _attack(n, at.blocking_call_eventfd, "nitro_blk_requests_total", {"device": "avol", "op": "out"},
            avol, least=3)
    # ... and one made blocking again after the hand-over: the write is cut
    # short (cffi_build/nitro_efd.h) and the attacker's device breaks.
    _attack(n, at.jammed_call_eventfd, "nitro_guest_errors_total", {"device": "avol", "error": "eventfd"},
            avol)
    assert time.monotonic() - started < runtime, "the attacks outlasted the victim's workload"
    _check_victim(n, guest, runtime)
    assert n.stop() == 0


def test_a_tenant_truncating_its_memory_hurts_only_itself(nitro, guest_image_fio, short_tmp_path, start_guest):
    """The attacker shrinks its shared guest memory under a started queue:
    the worker's next access is a SIGBUS. The worker must recover (the
    device breaks, fault `memory`), the daemon and the victim go on: the
    SIGBUS guards of cffi_build/nitro_guard.c; without them the daemon dies."""
    runtime = 20
    n, guest = _start_victim(nitro, guest_image_fio, short_tmp_path, start_guest, runtime)
    broken = at.truncate_memory(short_tmp_path / "avol.sock", until=lambda: _broken_or_dead(n, "avol"))
    assert n.proc.poll() is None, f"the daemon died of the attacker's truncated memory: {n.proc.returncode}"
    assert broken
    _check_victim(n, guest, runtime)
    assert n.stop() == 0
