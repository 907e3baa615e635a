"""An NBD volume is attached on one host at a time (nitro/fleet/volume_lock.py):
two daemons as two fleet hosts (two configs, host ids host-a and host-b,
runtime and state directories of their own, one network namespace) on one
nbdkit export, with a real etcd (bench/etcd.py) holding the lock. Every
server is started and stopped by PID."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.etcd import Etcd
from bench.nbd import NbdKit
from bench.proc import ChildError, Nitro, free_port
from nitro.fleet import schema

pytestmark = pytest.mark.integration

LEASE_TTL = 2  # seconds: [fleet] lease_ttl's minimum, so a dead host's lock goes soon


@pytest.fixture
def etcd(short_tmp_path: Path) -> Iterator[Etcd]:
    with Etcd(short_tmp_path) as server:
        yield server


@pytest.fixture
def export(short_tmp_path: Path) -> Iterator[NbdKit]:
    with NbdKit(short_tmp_path, ["memory", "16M"]) as server:
        yield server


def config(etcd: Etcd, host: str, url: str | None) -> str:
    blk = f'[[blk]]\nid = "r0"\nsource = "{url}"\n' if url else ""
    return (f'[daemon]\nworkers = 1\n[fleet]\netcd = ["{etcd.url}"]\nhost = "{host}"\n'
            f'underlay = "127.0.2.1"\nlease_ttl = {LEASE_TTL}\n{blk}')


class Hosts:
    """host-a and host-b: a Nitro each in a directory of its own."""

    def __init__(self, tmp: Path, etcd: Etcd) -> None:
        self.tmp, self.etcd = tmp, etcd
        self.running: list[Nitro] = []

    def start(self, host: str, url: str | None) -> Nitro:
        d = self.tmp / host
        d.mkdir(exist_ok=True)
        n = Nitro(d, config(self.etcd, host, url))
        self.running.append(n)
        deadline = time.monotonic() + 10
        while 'msg=serving' not in n.output():  # its SIGTERM handler is installed
            assert time.monotonic() < deadline and n.running(), n.output()
            time.sleep(0.05)
        return n

    def refused(self, host: str, url: str) -> str:
        """Start a host that must not start; its error."""
        with pytest.raises(ChildError) as e:
            self.start(host, url)
        return str(e.value)


@pytest.fixture
def hosts(short_tmp_path: Path, etcd: Etcd) -> Iterator[Hosts]:
    h = Hosts(short_tmp_path, etcd)
    yield h
    for n in h.running:
        n.kill()


def lock_holder(etcd: Etcd, url: str) -> dict | None:
    """The lock record in etcd (read with plain urllib, no nitro code)."""
    key = schema.volume_key(url)  # nbdkit's url() is the canonical form: nbd://127.0.0.1:PORT/
    kvs = etcd.call("kv/range", {"key": base64.b64encode(key).decode()}).get("kvs") or []
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


def wait_for_no_lock(etcd: Etcd, url: str, timeout: float) -> None:
    start = time.monotonic()
    while lock_holder(etcd, url) is not None:
        assert time.monotonic() - start < timeout, f"the lock stayed longer than {timeout} s"
        time.sleep(0.1)


def test_a_second_host_is_refused_until_the_first_stops(hosts: Hosts, etcd: Etcd, export: NbdKit):
    url = export.url()
    a = hosts.start("host-a", url)
    assert lock_holder(etcd, url) == {"version": 1, "volume": url, "host": "host-a", "device": "r0"}
    assert f"volume lock: {url} (device r0)" in a.status()
    err = hosts.refused("host-b", url)
    assert f"device r0: {url}: attached on host host-a (device r0)" in err, err
    assert a.running()  # the refused attach changed nothing on host-a
    a.halt("TERM")  # a clean stop releases the lock (the lease is revoked)
    assert lock_holder(etcd, url) is None
    hosts.start("host-b", url)
    assert lock_holder(etcd, url)["host"] == "host-b"


def test_a_killed_hosts_lock_goes_with_its_lease(hosts: Hosts, etcd: Etcd, export: NbdKit):
    url = export.url()
    a = hosts.start("host-a", url)
    a.halt("KILL")
    # host-a itself restarts at once: its own record, still under the dead lease, is taken over.
    a = hosts.start("host-a", url)
    a.halt("KILL")
    assert "attached on host host-a" in hosts.refused("host-b", url)
    wait_for_no_lock(etcd, url, timeout=LEASE_TTL + 3)  # with the lease: nobody released it
    hosts.start("host-b", url)
    assert lock_holder(etcd, url)["host"] == "host-b"


def test_reload_adds_only_a_free_volume_and_releases_a_removed_one(hosts: Hosts, etcd: Etcd, export: NbdKit):
    url = export.url()
    b = hosts.start("host-b", url)
    a = hosts.start("host-a", None)
    a.write_config(config(etcd, "host-a", url))
    r = a.reload()
    assert r.returncode != 0 and "attached on host host-b (device r0)" in r.stderr, r.stderr
    assert lock_holder(etcd, url)["host"] == "host-b"
    b.write_config(config(etcd, "host-b", None))
    assert b.reload().returncode == 0
    assert lock_holder(etcd, url) is None  # released as the device was removed, host-b still runs
    r = a.reload()
    assert r.returncode == 0, r.stderr
    assert lock_holder(etcd, url)["host"] == "host-a"
    assert "volume lock" not in b.status()


def test_etcd_unreachable_the_device_waits_for_its_lock(hosts: Hosts, etcd: Etcd, export: NbdKit):
    """etcd away at start-up: the volume is not attached (no socket), the
    daemon serves, and once etcd answers the lock is taken and the device
    listens."""
    url = export.url()
    hosts.start("host-a", None).halt("TERM")  # host-a has its host index in its state directory now
    etcd.stop()
    a = hosts.start("host-a", url)
    text = a.status()
    assert "r0" in text and "WAITING" in text, text
    assert f"{url}: cannot take its lock in etcd, so nothing proves no other host writes it" in text
    sock = a.tmp / "r0.sock"
    assert not sock.exists()
    etcd.start()
    deadline = time.monotonic() + 40  # the retries' backoff: 1 s doubling
    while not sock.exists():
        assert time.monotonic() < deadline, a.output()
        time.sleep(0.2)
    assert lock_holder(etcd, url) == {"version": 1, "volume": url, "host": "host-a", "device": "r0"}


def test_a_lock_gone_with_the_lease_is_taken_back_or_reported(hosts: Hosts, etcd: Etcd, export: NbdKit):
    """The host's lease ends under it (revoked here; etcd away longer than
    lease_ttl does the same): the agent registers again and takes its lock
    back; if another host's record is there by then, it is a conflict the
    status shows."""
    url = export.url()
    a = hosts.start("host-a", url)
    key = base64.b64encode(schema.volume_key(url)).decode()

    def lease() -> int:
        return int(etcd.call("kv/range", {"key": key})["kvs"][0].get("lease", 0))

    etcd.call("lease/revoke", {"ID": str(lease())})
    deadline = time.monotonic() + 10
    while lock_holder(etcd, url) is None or lease() == 0:
        assert time.monotonic() < deadline, a.output()
        time.sleep(0.1)
    assert lock_holder(etcd, url)["host"] == "host-a"

    # Another host's record (no lease: it outlives host-a's), then host-a's lease ends.
    old = lease()
    theirs = json.dumps({"version": 1, "volume": url, "host": "host-b", "device": "d1"}).encode()
    etcd.call("kv/put", {"key": key, "value": base64.b64encode(theirs).decode()})
    etcd.call("lease/revoke", {"ID": str(old)})
    deadline = time.monotonic() + 10
    while "lock was lost" not in (text := a.status()):
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
    assert f"conflict:    {schema.volume_key(url).decode()} is held by host host-b" in text
    assert lock_holder(etcd, url)["host"] == "host-b"  # never overwritten


def test_a_device_waiting_for_its_server_holds_its_lock_until_removed(hosts: Hosts, etcd: Etcd):
    url = f"nbd://127.0.0.1:{free_port()}/"  # nothing listens: the device waits for its server
    a = hosts.start("host-a", url)
    assert "WAITING" in a.status()
    assert lock_holder(etcd, url)["host"] == "host-a"  # nobody else attaches it meanwhile
    assert "attached on host host-a" in hosts.refused("host-b", url)
    a.write_config(config(etcd, "host-a", None))
    assert a.reload().returncode == 0
    assert lock_holder(etcd, url) is None
