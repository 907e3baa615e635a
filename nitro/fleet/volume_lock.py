"""Volume locks in etcd: a volume is attached on one host at a time.

An RBD image carries its own lock (the exclusive-lock feature,
backends/rbd.py); an NBD export has none, so with [fleet] nitro keeps an
advisory one in etcd (docs/volumes.md "One host at a time"):

    /nitro/volumes/<nbd://host:port/export, escaped>  VolumeLockRecord (host, device)

- :func:`acquire` creates the key in a transaction only if it is absent
  (create_revision 0), under this host's lease: a host that dies loses its
  locks when its lease expires (``[fleet] lease_ttl``). A record that names
  this host already (a restart while the dead process's lease still runs;
  the agent registering again after its lease expired) is taken over: put
  again under the current lease, if nobody changed it since it was read.
  A record of another host, or of another device of this same daemon,
  refuses the attach with :class:`VolumeHeldElsewhere`.
- :func:`release` deletes the key only if it still holds this host's
  record (the value is compared in the transaction).

etcd errors pass through; the agent (FleetAgent.lock_volume) turns them
into :class:`VolumeLockUnavailable`: without an answer from etcd nitro
cannot prove that nobody else writes the volume, so it does not attach it
yet. Like an unreachable source this may pass by itself: the device waits
(no socket) and the daemon tries again in the background (daemon.py).
"""

from __future__ import annotations

from nitro.devices.blk.backends.raw import SourceUnavailableError, VolumeLockedError
from nitro.fleet.etcd import EtcdClient
from nitro.fleet.etcd_codec import Compare, KeyValue, TxnResult, op_delete, op_put, op_range
from nitro.fleet.schema import RecordError, VolumeLockRecord

__all__ = ["VolumeHeldElsewhere", "VolumeLockUnavailable", "acquire", "acquire_txn", "release",
           "release_txn"]

MAX_ATTEMPTS = 4  # each retry means the key changed between our read and our write


class VolumeHeldElsewhere(VolumeLockedError):
    """Another host (or another device of this daemon) holds the volume's
    lock: the device is not attached. Detach it there first; a host that
    died loses its lock when its lease expires."""

    def __init__(self, volume: str, holder: VolumeLockRecord | None, *, same_host: bool = False) -> None:
        if holder is None:
            who = "an unreadable lock record (delete it with etcdctl if no host uses the volume)"
        elif same_host:
            who = f"this host already, as device {holder.device}"
        else:
            who = f"host {holder.host} (device {holder.device})"
        super().__init__(f"{volume}: attached on {who}; a volume is attached on one host at a time")
        self.holder = holder


class VolumeLockUnavailable(SourceUnavailableError):
    """etcd did not answer (or this host's lease is gone and not renewed
    yet): nitro cannot prove nobody else writes the volume, so it is not
    attached now; the device waits like one whose source is unreachable,
    and is tried again."""


def acquire_txn(record: VolumeLockRecord, lease: int) -> tuple[list[Compare], list[dict], list[dict]]:
    """The transaction that takes a free lock: (compare, success, failure)."""
    return ([Compare.missing(record.key)], [op_put(record.key, record.encode(), lease=lease)],
            [op_range(record.key)])


def release_txn(record: VolumeLockRecord) -> tuple[list[Compare], list[dict]]:
    """The transaction that deletes the lock if it is still this record."""
    return [Compare("VALUE", record.key, record.encode())], [op_delete(record.key)]


def _held(r: TxnResult) -> KeyValue | None:
    return next((kv for rr in r.ranges() for kv in rr.kvs), None)


def _holder(volume: str, kv: KeyValue) -> VolumeLockRecord | None:
    try:
        return VolumeLockRecord.decode(volume, kv.value)
    except RecordError:
        return None


async def acquire(etcd: EtcdClient, record: VolumeLockRecord, lease: int) -> None:
    """Take (or take over) the volume's lock under ``lease``.
    VolumeHeldElsewhere when another host or device holds it; EtcdError
    when etcd fails; VolumeLockUnavailable if the key kept changing."""
    compare, success, failure = acquire_txn(record, lease)
    for _ in range(MAX_ATTEMPTS):
        r = await etcd.txn(compare, success, failure)
        if r.succeeded:
            return
        held = _held(r)
        if held is None:
            continue  # deleted between the compare and the read: try again
        holder = _holder(record.volume, held)
        if holder is None or holder.host != record.host:
            raise VolumeHeldElsewhere(record.volume, holder)
        if holder.device != record.device and held.lease == lease:
            raise VolumeHeldElsewhere(record.volume, holder, same_host=True)
        # Ours, from before (a restart, or a lease that expired): move it to this lease.
        if (await etcd.txn([Compare.mod_revision(record.key, held.mod_revision)], success)).succeeded:
            return
    raise VolumeLockUnavailable(f"{record.volume}: its lock in etcd changed {MAX_ATTEMPTS} times while "
                                "being taken; not attached")


async def release(etcd: EtcdClient, record: VolumeLockRecord) -> bool:
    """Delete the lock if it is still ``record``; whether it was."""
    compare, success = release_txn(record)
    return (await etcd.txn(compare, success)).succeeded
