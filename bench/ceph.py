"""A throwaway single-host Ceph cluster as child processes (tests and benches).

``ceph_cluster()`` starts one ceph-mon, one ceph-osd and one ceph-mgr from
Debian's 16.2 packages with a generated ceph.conf, cephx keyrings and data in
a new directory under /tmp: no systemd, no cephadm, nothing written to
/etc/ceph, /var/lib/ceph or /var/log/ceph (every path Ceph defaults there is
set in the conf). It yields a ``CephCluster`` once the OSD is up and in, an
RBD pool is initialised and the mgr is active; on exit it stops every daemon
by PID (SIGTERM, then SIGKILL; OSD first, it tells the mon it is going) and
removes the directory.

The OSD keeps objects in memory (memstore, bounded by ``store_bytes``)
unless ``objectstore="bluestore"``: then a sparse file of that size holds
them, and they survive the OSD being killed and restarted (``stop_osd``,
``restart_osd``). Pool size 1 (one OSD: no replicas), the warnings about it
off; the mgr loads only rbd_support and status.

Measured on the 2-core CI machine (bench figures in the test's docstring):
memstore ready in about 5 s, bluestore in about 10 s (its mkfs); RSS about
40 MB mon, 130 MB OSD (memstore, before data) or 80-100 MB (bluestore),
65 MB mgr.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.proc import Child, ChildError, free_port, tail

MON, MGR, OSD_ID = "a", "x", 0
# Every module of ceph-mgr-modules-core 16.2 but rbd_support (RBD's tasks,
# trash and mirror snapshot schedules) and status (`ceph fs status`, cheap).
MGR_UNUSED_MODULES = ("alerts", "balancer", "crash", "devicehealth", "diskprediction_local", "influx",
                      "insights", "iostat", "localpool", "mirroring", "nfs", "orchestrator",
                      "osd_perf_query", "osd_support", "pg_autoscaler", "progress", "prometheus",
                      "restful", "selftest", "snap_schedule", "stats", "telegraf", "telemetry",
                      "test_orchestrator", "volumes", "zabbix")
# Ceph CLI calls are bounded: a cluster that stops answering fails the test.
CLI_TIMEOUT = 60


def _conf(tmp: Path, fsid: str, port: int, objectstore: str, store_bytes: int) -> str:
    """ceph.conf: every default path under /etc, /var/lib, /var/log and
    /var/run moved into `tmp`; one OSD, no replicas; small caches."""
    store = {
        "memstore": f"memstore device bytes = {store_bytes}\n",
        # The block file is created sparse at mkfs; small caches keep the
        # OSD near the memstore one's footprint.
        "bluestore": (f"bluestore block path = {tmp}/osd/$cluster-$id.block\n"
                      "bluestore block create = true\n"
                      f"bluestore block size = {store_bytes}\n"
                      "bluestore cache autotune = false\n"
                      "bluestore cache size = 67108864\n"
                      "osd memory target = 939524096\n"),
    }[objectstore]
    return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{port}]
mon initial members = {MON}
public network = 127.0.0.1/32
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {tmp}/keyring
run dir = {tmp}/run
admin socket = {tmp}/run/$name.asok
log file = {tmp}/log/$name.log
mon cluster log file = {tmp}/log/$cluster.$channel.log
mon debug dump location = {tmp}/log/$name.tdump
crash dir = {tmp}/crash
mon data = {tmp}/mon/$cluster-$id
osd data = {tmp}/osd/$cluster-$id
mgr data = {tmp}/mgr/$cluster-$id
osd objectstore = {objectstore}
{store}osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# A test machine's shared disk may be fuller than Ceph's 30 % warning.
mon data avail warn = 1
paxos propose interval = 0.1
paxos min wait = 0.01
[client]
# Clients (the CLI, nitro, qemu-storage-daemon) may run side by side.
admin socket = {tmp}/run/$name.$pid.asok
[osd]
keyring = {tmp}/osd/$cluster-$id/keyring
[mgr]
keyring = {tmp}/mgr/$cluster-$id/keyring
# Only the modules RBD uses: loading all of them takes the mgr ~20 s of CPU.
mgr disabled modules = {" ".join(MGR_UNUSED_MODULES)}
"""


@dataclass
class CephCluster:
    """A running cluster: what a client needs (conf, keyring, user, pool)
    and its daemons."""

    tmp: Path
    conf: Path
    keyring: Path
    pool: str
    user: str = "admin"
    daemons: dict[str, Child] = field(default_factory=dict)

    def run(self, tool: str, *args: str, timeout: float = CLI_TIMEOUT,
            input: bytes | None = None) -> bytes:
        """`ceph`/`rbd`/`rados` on this cluster; stdout, or ChildError with
        the tool's stderr."""
        argv = [tool, "-c", str(self.conf), "--id", self.user, *args]
        r = subprocess.run(argv, capture_output=True, timeout=timeout, input=input, check=False)
        if r.returncode != 0:
            raise ChildError(f"{' '.join(argv)} exited {r.returncode}:\n"
                             f"{tail(r.stderr.decode(errors='replace'))}")
        return r.stdout

    def ceph_json(self, *args: str) -> object:
        return json.loads(self.run("ceph", *args, "--format", "json"))

    def rbd(self, *args: str, timeout: float = CLI_TIMEOUT) -> bytes:
        return self.run("rbd", *args, timeout=timeout)

    def blk_config(self, image: str, *, extra: str = "") -> str:
        """A nitro [[blk]] entry "vol0" (socket vol0.sock) serving
        pool/image of this cluster; `extra`: more keys, one per line."""
        return (f'[[blk]]\nid = "vol0"\nsocket = "vol0.sock"\nsource = "rbd:{self.pool}/{image}"\n'
                f'ceph_conf = "{self.conf}"\nuser = "{self.user}"\nkeyring = "{self.keyring}"\n{extra}')

    def pids(self) -> dict[str, int]:
        """Each daemon's PID (name -> pid), for tests and RSS figures."""
        return {name: child.proc.pid for name, child in self.daemons.items()}

    def osd_up_from(self) -> int | None:
        """The osdmap epoch since which osd.0 is up (and in), None if it
        is not."""
        dump = self.ceph_json("osd", "dump")
        assert isinstance(dump, dict)
        for osd in dump["osds"]:
            if osd["osd"] == OSD_ID and osd["up"] == 1 and osd["in"] == 1:
                return int(osd["up_from"])
        return None

    def wait_osd(self, timeout: float = 60, *, after: int = 0) -> None:
        """Return once osd.0 is up and in since an epoch newer than `after`
        (the mon notices a killed OSD late: with no peer to report it, a
        restarted OSD's boot is what shows the new incarnation); ChildError
        after `timeout` s or if the OSD process exits."""
        _wait(lambda: (self.osd_up_from() or 0) > after, timeout, self.daemons["osd"], "osd.0 up and in")

    def mgr_available(self) -> bool:
        stat = self.ceph_json("mgr", "stat")
        assert isinstance(stat, dict)
        return bool(stat["available"])

    def wait_mgr(self, timeout: float = 60) -> None:
        _wait(self.mgr_available, timeout, self.daemons["mgr"], "an active mgr")

    def stop_osd(self, *, kill: bool = False) -> None:
        """Stop the OSD (SIGKILL with `kill`: a crash); restart_osd brings
        it back with the objects it had (bluestore; memstore loses them
        when killed)."""
        if kill:
            self.daemons["osd"].kill()
        else:
            self.daemons["osd"].stop()

    def restart_osd(self, timeout: float = 60) -> None:
        """Start the stopped OSD again; return once it is back up and every
        placement group is active again (up is not enough: until the PGs
        have peered, I/O waits, and a test with a short io_timeout would
        see its first requests fail on a busy machine)."""
        before = self.osd_up_from() or 0
        self.daemons["osd"] = _daemon(self.tmp, "ceph-osd", "-i", str(OSD_ID))
        self.wait_osd(timeout, after=before)
        if "mgr" in self.daemons:  # PG states come from the mgr (a cluster without one has none)
            _wait(self.pgs_active, timeout, self.daemons["osd"], "every PG active")

    def pgs_active(self) -> bool:
        """Every placement group is in an active state (`ceph pg stat`)."""
        stat = self.ceph_json("pg", "stat")
        assert isinstance(stat, dict)
        summary = stat.get("pg_summary", stat)
        states = summary.get("num_pg_by_state", [])
        active = sum(s["num"] for s in states if "active" in s["name"].split("+"))
        return active == summary.get("num_pgs", -1) and active > 0

    def stop(self) -> None:
        """Every daemon, OSD first (it tells the mon it is going), by PID."""
        for name in ("osd", "mgr", "mon"):
            child = self.daemons.get(name)
            if child is not None:
                child.stop(timeout=20)


def _wait(ready: Callable[[], bool], timeout: float, child: Child, what: str) -> None:
    """Poll `ready` until true; ChildError if `child` exits first or after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if not child.running():
            raise ChildError(f"{child.argv[0]} exited with {child.proc.returncode} before {what}:\n"
                             f"{tail(child.output())}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise ChildError(f"no {what} within {timeout:.0f} s:\n{tail(child.output())}")
        time.sleep(0.25)


def _daemon(tmp: Path, binary: str, *args: str) -> Child:
    """A Ceph daemon in the foreground (-f) on the cluster's conf."""
    name = binary.removeprefix("ceph-")
    return Child([binary, "-c", str(tmp / "ceph.conf"), *args, "-f"], tmp / f"{name}.out")


def _tool(*argv: str | Path) -> None:
    r = subprocess.run(list(map(str, argv)), capture_output=True, timeout=CLI_TIMEOUT, check=False)
    if r.returncode != 0:
        raise ChildError(f"{argv[0]} exited {r.returncode}:\n{tail(r.stderr.decode(errors='replace'))}")


def _make_mon(tmp: Path, port: int, fsid: str) -> None:
    keyring = tmp / "keyring"
    _tool("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
    _tool("ceph-authtool", keyring, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
          "--cap", "osd", "allow *", "--cap", "mgr", "allow *", "--cap", "mds", "allow *")
    _tool("monmaptool", "--create", "--addv", MON, f"[v2:127.0.0.1:{port}]", "--fsid", fsid, tmp / "monmap")
    _tool("ceph-mon", "-c", tmp / "ceph.conf", "--mkfs", "-i", MON, "--monmap", tmp / "monmap",
          "--keyring", keyring)


def _make_osd(cluster: CephCluster) -> None:
    """`ceph osd new` registers osd.0; --mkfs --mkkey creates its store and
    key (--no-mon-config: the key is not registered yet); auth add
    registers the key."""
    osd_uuid = str(uuid.uuid4())
    cluster.run("ceph", "osd", "new", osd_uuid, str(OSD_ID))
    (cluster.tmp / "osd" / f"ceph-{OSD_ID}").mkdir(parents=True)
    _tool("ceph-osd", "-c", cluster.conf, "-i", str(OSD_ID), "--mkfs", "--mkkey", "--osd-uuid", osd_uuid,
          "--no-mon-config")
    cluster.run("ceph", "auth", "add", f"osd.{OSD_ID}", "osd", "allow *", "mon", "allow profile osd",
                "mgr", "allow profile osd", "-i", str(cluster.tmp / "osd" / f"ceph-{OSD_ID}" / "keyring"))


def _start_mgr(cluster: CephCluster) -> Child:
    mgr_dir = cluster.tmp / "mgr" / f"ceph-{MGR}"
    mgr_dir.mkdir(parents=True)
    cluster.run("ceph", "auth", "get-or-create", f"mgr.{MGR}", "mon", "allow profile mgr", "osd", "allow *",
                "mds", "allow *", "-o", str(mgr_dir / "keyring"))
    return _daemon(cluster.tmp, "ceph-mgr", "-i", MGR)


@contextmanager
def ceph_cluster(*, pool: str = "rbd", mgr: bool = True, objectstore: str = "memstore",
                 store_bytes: int = 1 << 30, timeout: float = 60) -> Iterator[CephCluster]:
    """Start the cluster in a new directory under /tmp (short: admin socket
    paths are unix socket paths), yield it with `pool` initialised for RBD;
    on exit stop every daemon and remove the directory."""
    tmp = Path(tempfile.mkdtemp(prefix="nitro-ceph-", dir="/tmp"))
    for sub in ("run", "log", "crash", "mon"):
        (tmp / sub).mkdir()
    fsid, port = str(uuid.uuid4()), free_port()
    conf = tmp / "ceph.conf"
    conf.write_text(_conf(tmp, fsid, port, objectstore, store_bytes))
    cluster = CephCluster(tmp=tmp, conf=conf, keyring=tmp / "keyring", pool=pool)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        stack.callback(cluster.stop)
        _make_mon(tmp, port, fsid)
        cluster.daemons["mon"] = _daemon(tmp, "ceph-mon", "-i", MON)
        _make_osd(cluster)  # its `ceph` calls wait for the mon's quorum
        cluster.daemons["osd"] = _daemon(tmp, "ceph-osd", "-i", str(OSD_ID))
        if mgr:
            cluster.daemons["mgr"] = _start_mgr(cluster)
        cluster.wait_osd(timeout)
        cluster.run("ceph", "osd", "pool", "create", pool, "8")
        cluster.rbd("pool", "init", pool)
        if mgr:
            cluster.wait_mgr(timeout)
        yield cluster
