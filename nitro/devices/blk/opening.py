"""A remote volume being opened on a thread of its own.

Opening a remote volume talks to its storage: librbd waits without bound
for an OSD that is away, and a start-up, a reload, a stop or a `nitro
volume` command must not wait with it. So the open runs on a thread of its own from the moment an
`Opening` is made, and its caller waits as long as it can afford
(`wait`, `wait_async`): a caller whose wait ran out may keep the
`Opening` and wait again later (the background retry of a waiting device
takes it over, instead of racing it for an RBD image's lock with a second
open), or `leave` it. A volume that opens after its caller left is closed
on that thread (an RBD image's lock released), never leaked.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import trio

from nitro.devices import blk

if TYPE_CHECKING:
    from nitro.config import BlkConfig
    from nitro.devices.blk.device import BlkDevice


class _Closable(Protocol):
    def close(self) -> None: ...


T = TypeVar("T", bound=_Closable)


class Opening(Generic[T]):
    """`opener()` (blocking, returning something to close()) on a thread
    of its own, started at once; `name` names the threads."""

    def __init__(self, opener: Callable[[], T], name: str) -> None:
        self.name = name
        self._call = opener
        self._lock = threading.Lock()
        self._left = False
        self._device: T | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        threading.Thread(target=self._open, name=f"open {name}", daemon=True).start()

    @classmethod
    def device(cls, cfg: BlkConfig) -> Opening[BlkDevice]:
        """The device of a [[blk]] entry (blk.open_device)."""
        return Opening(lambda: blk.open_device(cfg), cfg.id)

    def _open(self) -> None:
        device = None
        try:
            device = self._call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._error = e
        with self._lock:
            if not self._left:
                self._device = device
                device = None
        self._done.set()  # also wakes a waiter that was left behind
        if device is not None:
            device.close()  # its caller has gone

    def leave(self) -> None:
        """Nobody will take the volume: if it opened already, or opens
        later, it is closed (off the caller's thread)."""
        with self._lock:
            self._left = True
            device, self._device = self._device, None
        if device is not None:
            threading.Thread(target=device.close, name=f"close {self.name}", daemon=True).start()

    def _result(self) -> T:
        if self._error is not None:
            raise self._error
        assert self._device is not None, "taken after leave()"
        return self._device

    def wait(self, timeout: float) -> T | None:
        """Blocking: the device, None if the open has not ended after
        `timeout` s (it goes on), or the open's error (VolumeError)."""
        try:
            if not self._done.wait(timeout):
                return None
        except BaseException:
            self.leave()
            raise
        return self._result()

    async def wait_async(self, budget: float = math.inf) -> T | None:
        """wait()'s result after at most `budget` s; cancelled (a stop, a
        reload removing the device), it leaves at once."""
        try:
            with trio.move_on_after(budget):
                # A limiter of its own: a long wait holds no thread of trio's pool.
                await trio.to_thread.run_sync(self._done.wait, abandon_on_cancel=True,
                                              limiter=trio.CapacityLimiter(1))
        except BaseException:
            self.leave()
            raise
        if not self._done.is_set():
            return None
        return self._result()
