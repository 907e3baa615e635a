"""The engine's control side: which C worker serves which ring.

The C workers (``_datapath.Engine``, cffi_build/nitro_engine.c) do every
per-chain thing; this module only decides. A ring is attached to the worker
serving the fewest rings; when a ring leaves and the workers differ by more
than one ring, one ring moves from the busiest to the idlest (SPDK assigns
a device's queues to reactors the same way; OVS-DPDK rebalances rxqs by
load). Attach and detach wait for the worker, so they run in a thread of
their own, never on the trio thread. A remote volume's ring may take up to
its io_timeout to detach (it drains on its worker: nitro_engine.c): that
wait holds neither the worker nor the lock other attaches and detaches take.

A ring that stops on an error (a guest fault, a host error) is reported by
C through one eventfd; ``watch()`` reads it and calls the ring's owner back.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from nitro import _datapath
from nitro.log import log_event

log = logging.getLogger("nitro.engine")

OnError = Callable[[_datapath.DatapathError], None]


@dataclass
class _Assignment:
    ring: _datapath.Ring
    worker: int
    on_error: OnError
    label: str
    reported: bool = False
    moving: trio.Event | None = None  # set once _rebalance's move of it ended


class Engine:
    """Assigns rings to a fixed set of C worker threads and watches them."""

    def __init__(self, workers: int, cpus: list[int] | None = None,
                 poll_us: int | None = None, *, sync_io: bool = False,
                 seccomp: bool = False) -> None:
        self._c = _datapath.Engine(workers, cpus,
                                   _datapath.POLL_ADAPTIVE if poll_us is None else poll_us,
                                   sync_io=sync_io, seccomp=seccomp)
        self.workers = self._c.workers
        self.cpus = cpus
        self.poll_us = poll_us
        self.seccomp = seccomp
        self._assigned: dict[int, _Assignment] = {}  # id(ring) -> where it runs
        # One thread per call in progress. C serialises its commands and
        # _lock orders attaches, but a detach waits in its thread for a
        # remote ring's whole drain (up to io_timeout during an outage):
        # a bounded pool would let draining rings hold back every other
        # device's attach and detach. Bounded in practice by the rings
        # being detached at once.
        self._limiter = trio.CapacityLimiter(math.inf)
        # Attach and the bookkeeping of detach and rebalancing one at a
        # time: a ring in _assigned is attached or being moved (then
        # detach() waits for the move), its queue left alone by its server
        # (a server changes a queue only after detach() returned). The C
        # detach calls, which may drain, run outside it.
        self._lock = trio.Lock()
        # Set at a stop: every ring is leaving, and moving one (a detach
        # that may drain a remote ring for io_timeout) would only delay it.
        self._rebalancing = True

    def stop_rebalancing(self) -> None:
        """The daemon is stopping: detaches no longer move other rings."""
        self._rebalancing = False

    # -- assignment ----------------------------------------------------------
    def load(self) -> list[int]:
        """Rings per worker."""
        counts = [0] * self.workers
        for a in self._assigned.values():
            counts[a.worker] += 1
        return counts

    def _least_loaded(self) -> int:
        counts = self.load()
        return counts.index(min(counts))

    async def attach(self, ring: _datapath.Ring, on_error: OnError, label: str = "") -> int:
        """Hand ring to the least loaded worker; returns the worker. Raises
        the DatapathError of nitro_engine_attach (e.g. GuestFault if the
        queue was broken already)."""
        async with self._lock:
            worker = self._least_loaded()
            await self._call(self._c.attach, ring, worker)
            assignment = _Assignment(ring, worker, on_error, label)
            self._assigned[id(ring)] = assignment
        # The ring may have stopped before it was recorded here, its event
        # already consumed by watch(): look at it now (only it: the others
        # were looked at when their event came).
        self._report(assignment)
        return worker

    async def detach(self, ring: _datapath.Ring) -> None:
        """Take ring back (its in-flight I/O completes first), then even out
        the workers. Shielded: the caller is about to unmap what the ring
        points into, so it must not return before C let go."""
        with trio.CancelScope(shield=True):
            async with self._lock:
                # Out of the record first: no rebalancing moves it from now.
                a = self._assigned.pop(id(ring), None)
                moving = a.moving if a is not None else None
            if moving is not None:
                await moving.wait()  # the mover leaves it detached
            # Outside the lock: a remote ring drains here, up to its
            # io_timeout, while other rings attach and detach.
            await self._call(self._c.detach, ring)
            await self._rebalance()

    async def _call(self, fn: Callable[..., None], *args: object) -> None:
        await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _rebalance(self) -> None:
        """Move rings from the busiest worker to the idlest until they differ
        by at most one. A ring that cannot be re-attached (its queue broke
        meanwhile) is reported to its owner, never to whoever triggered this.
        A move's detach may drain (a remote ring): outside the lock."""
        while self._rebalancing:
            async with self._lock:
                counts = self.load()
                busiest, idlest = counts.index(max(counts)), counts.index(min(counts))
                if counts[busiest] - counts[idlest] <= 1:
                    return
                a = next((a for a in self._assigned.values()
                          if a.worker == busiest and not a.reported and a.moving is None), None)
                if a is None:
                    return
                # Counted where it goes: a rebalance running meanwhile
                # (another ring left) does not move a second one for it.
                a.worker = idlest
                a.moving = moving = trio.Event()
            try:
                await self._call(self._c.detach, a.ring)
                async with self._lock:
                    if self._assigned.get(id(a.ring)) is a:  # else detach() has it
                        await self._reattach(a)
            finally:
                a.moving = None
                moving.set()

    async def _reattach(self, a: _Assignment) -> None:
        """The second half of a move: a.ring to a.worker."""
        try:
            await self._call(self._c.attach, a.ring, a.worker)
        except _datapath.DatapathError as e:
            del self._assigned[id(a.ring)]
            a.on_error(e)
            return
        log_event(log, logging.DEBUG, "ring moved", ring=a.label, worker=a.worker)

    def worker_of(self, ring: _datapath.Ring) -> int | None:
        """The worker serving ring (Python's record: safe from any thread)."""
        a = self._assigned.get(id(ring))
        return a.worker if a is not None else None

    # -- errors ----------------------------------------------------------------
    async def watch(self) -> None:
        """Forever: report each ring that stopped on an error, once."""
        fd = self._c.event_fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                os.read(fd, 8)
            except BlockingIOError:
                pass
            self.report_errors()

    def report_errors(self) -> None:
        for a in list(self._assigned.values()):
            self._report(a)

    @staticmethod
    def _report(a: _Assignment) -> None:
        """Call a's owner back once if its ring stopped on an error."""
        if a.reported:
            return
        try:
            a.ring.check()
        except _datapath.DatapathError as e:
            a.reported = True
            a.on_error(e)

    # -- observation -------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        """Per worker: its rings (by label) and counters; any thread."""
        workers = []
        for w in range(self.workers):
            rings = sorted(a.label for a in list(self._assigned.values()) if a.worker == w)
            workers.append({"id": w, "cpu": self.cpus[w] if self.cpus else None,
                            "ring_labels": rings, **self._c.worker_stats(w)})
        io = "io_uring" if workers and all(w["uring"] for w in workers) else "sync"
        return {"workers": workers, "blk_io": io,
                "poll_us": "adaptive" if self.poll_us is None else self.poll_us,
                "seccomp": self.seccomp,
                "guest_memory_bytes": _datapath.guest_memory_mapped(),
                "max_guest_memory": _datapath.guest_memory_limit()}

    def close(self) -> None:
        """Stop the worker threads; every ring must be detached."""
        self._c.close()
