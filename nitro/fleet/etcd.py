"""An etcd v3 client on trio: the JSON gateway over httpx.AsyncClient.

The bodies and the decoding are nitro/fleet/etcd_codec.py's (sans-IO); this
module only sends them. Several endpoints: a request goes to the endpoint
that answered last and fails over to the next on a transport error, a
timeout or an "unavailable" answer; :class:`EtcdUnavailable` once none
answered. Nothing here retries forever: callers that must keep going (the
fleet agent) wait :class:`Backoff` delays between attempts.

Why httpx: etcd's own Python clients are asyncio or a thread per watch;
the gateway speaks plain HTTP/1.1 JSON, httpx runs on trio (through
httpcore's trio backend), and a watch is one streamed response.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import httpx

from nitro.fleet import etcd_codec as codec
from nitro.fleet.etcd_codec import (
    Compare,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    RangeResult,
    TxnResult,
    WatchResponse,
)

__all__ = ["Backoff", "EtcdClient", "WatchStream"]

DEFAULT_TIMEOUT = 2.0  # seconds per request; a watch has no read timeout
MAX_WATCH_LINE = 64 << 20  # one watch response (a batch of events) as JSON


@dataclasses.dataclass
class Backoff:
    """Exponential backoff with jitter (sans-IO: it only computes delays).

    The n-th delay is drawn from [d/2, d] with d = min(maximum, initial *
    multiplier**n): hosts that lost etcd together do not come back in step,
    and the wait never drops below half the nominal delay."""
    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        nominal = min(self.maximum, self.initial * self.multiplier ** self.attempt)
        self.attempt += 1
        return nominal / 2 + self.rng.uniform(0, nominal / 2)

    def reset(self) -> None:
        self.attempt = 0


def _unavailable(endpoints: Sequence[str], why: object) -> EtcdUnavailable:
    tried = f" (tried {', '.join(endpoints)})" if len(endpoints) > 1 else ""
    return EtcdUnavailable(f"etcd unreachable{tried}: {why}")


def _transport_error(e: httpx.TransportError) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _request(http: httpx.AsyncClient, url: str, body: dict, timeout: httpx.Timeout | None = None) -> httpx.Request:
    if timeout is None:
        return http.build_request("POST", url, json=body)
    return http.build_request("POST", url, json=body, timeout=timeout)


class WatchStream:
    """One open /v3/watch: ``async for response in stream``. Ends with
    :class:`EtcdUnavailable` when the connection breaks; close it with
    :meth:`aclose` (``EtcdClient.watch`` does)."""

    def __init__(self, response: httpx.Response, endpoint: str) -> None:
        self._response = response
        self.endpoint = endpoint
        self._buffer = b""
        self._chunks = response.aiter_raw()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchResponse:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_WATCH_LINE:
                raise EtcdError(f"etcd: a watch response longer than {MAX_WATCH_LINE} bytes")
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                raise EtcdUnavailable(f"etcd at {self.endpoint} closed the watch stream") from None
            except httpx.TransportError as e:
                raise EtcdUnavailable(f"etcd at {self.endpoint}: watch stream broken: "
                                      f"{_transport_error(e)}") from None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return codec.decode_watch_line(line)

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]  # an async generator
        await self._response.aclose()


class EtcdClient:
    """``async with EtcdClient(["http://10.0.0.1:2379", ...]) as etcd:``.

    Every method raises :class:`EtcdUnavailable` when no endpoint answers
    within ``timeout`` seconds, :class:`EtcdRequestError` when etcd refuses
    the request, :class:`EtcdCompacted` for a revision compacted away,
    :class:`EtcdLeaseNotFound` for an expired lease."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._current = 0  # the endpoint that answered last
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

    async def call(self, path: str, body: dict) -> dict:
        """POST one request to ``/v3/<path>``; the decoded answer."""
        last: object = "no endpoint tried"
        for i in self._order():
            try:
                r = await self._http.send(_request(self._http, f"{self.endpoints[i]}/v3/{path}", body))
            except httpx.TransportError as e:
                last = f"{self.endpoints[i]}: {_transport_error(e)}"
                continue
            try:
                answer: Any = r.json()
            except ValueError:
                answer = r.text
            if r.status_code != 200 or not isinstance(answer, dict):
                err = codec.decode_error(r.status_code, answer)
                if isinstance(err, EtcdUnavailable):
                    last = f"{self.endpoints[i]}: {err}"
                    continue
                raise err
            self._current = i
            return answer
        raise _unavailable(self.endpoints, last)

    # -- kv ---------------------------------------------------------------------
    async def get(self, key: bytes) -> KeyValue | None:
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def range(self, key: bytes, *, prefix: bool = False, revision: int = 0,
                    count_only: bool = False) -> RangeResult:
        return codec.decode_range(await self.call(
            "kv/range", codec.range_request(key, prefix=prefix, revision=revision, count_only=count_only)))

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """The revision of the put."""
        return codec.header_revision(await self.call("kv/put", codec.put_request(key, value, lease=lease)))

    async def delete(self, key: bytes, *, prefix: bool = False) -> int:
        """How many keys were deleted."""
        answer = await self.call("kv/deleterange", codec.delete_request(key, prefix=prefix))
        return int(answer.get("deleted", 0))

    async def txn(self, compare: Sequence[Compare], success: Sequence[dict],
                  failure: Sequence[dict] = ()) -> TxnResult:
        return codec.decode_txn(await self.call("kv/txn", codec.txn_request(compare, success, failure)))

    async def compact(self, revision: int) -> None:
        await self.call("kv/compaction", {"revision": str(revision), "physical": True})

    # -- leases -------------------------------------------------------------------
    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        lease, _ = codec.decode_lease_grant(await self.call("lease/grant", {"TTL": str(ttl)}))
        return lease

    async def lease_keepalive(self, lease: int) -> int:
        """Renew the lease once; its TTL. EtcdLeaseNotFound when it expired."""
        return codec.decode_keepalive(await self.call("lease/keepalive", {"ID": str(lease)}))

    async def lease_revoke(self, lease: int) -> None:
        """Revoke the lease: every key it holds is deleted now."""
        await self.call("lease/revoke", {"ID": str(lease)})

    # -- watch ----------------------------------------------------------------------
    async def watch(self, key: bytes, *, start_revision: int = 0, prefix: bool = True,
                    prev_kv: bool = True) -> WatchStream:
        """Open a watch on ``key`` (every key under it with ``prefix``) from
        ``start_revision``; close the stream with ``aclose()``. Its first
        response says ``created`` (or ``canceled`` with ``compact_revision``
        when that revision is gone)."""
        body = codec.watch_request(key, prefix=prefix, start_revision=start_revision, prev_kv=prev_kv)
        timeout = httpx.Timeout(self.timeout, read=None)  # events come when they come
        last: object = "no endpoint tried"
        for i in self._order():
            request = _request(self._http, f"{self.endpoints[i]}/v3/watch", body, timeout)
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError as e:
                last = f"{self.endpoints[i]}: {_transport_error(e)}"
                continue
            if response.status_code != 200:
                text = await response.aread()
                await response.aclose()
                try:
                    err = codec.decode_error(response.status_code, json.loads(text))
                except ValueError:
                    err = codec.decode_error(response.status_code, text.decode(errors="replace"))
                if isinstance(err, EtcdUnavailable):
                    last = f"{self.endpoints[i]}: {err}"
                    continue
                raise err
            self._current = i
            return WatchStream(response, self.endpoints[i])
        raise _unavailable(self.endpoints, last)

