"""etcd v3's JSON gateway, sans-IO: request bodies out, typed results in.

The gateway (etcd 3.4, grpc-gateway) maps each gRPC call of etcd's
``rpc.proto`` to ``POST /v3/<service>/<call>`` with the request message as a
JSON body, in proto field names. Keys and values are ``bytes`` and travel
base64-encoded; int64 fields come back as strings; fields at their zero
value are left out (a PUT event has no ``"type"``, a failed txn no
``"succeeded"``, an expired lease's keepalive no ``"TTL"``). An error is
``{"error": ..., "message": ..., "code": <gRPC status>}`` with a non-2xx
status. ``/v3/watch`` streams newline-separated ``{"result": WatchResponse}``
objects (or ``{"error": ...}``) on one response.

Nothing here opens a socket: nitro/fleet/etcd.py sends these bodies.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "Compare",
    "EtcdCompacted",
    "EtcdError",
    "EtcdLeaseNotFound",
    "EtcdRequestError",
    "EtcdUnavailable",
    "EventType",
    "KeyValue",
    "RangeResult",
    "TxnResult",
    "WatchEvent",
    "WatchResponse",
    "decode_error",
    "decode_range",
    "decode_txn",
    "decode_watch_line",
    "prefix_end",
]

# gRPC status codes etcd uses (google.golang.org/grpc/codes).
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_FAILED_PRECONDITION = 9
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14


class EtcdError(Exception):
    """etcd refused a request or could not be reached. The subclasses say
    which; a plain EtcdError is an answer nitro did not expect."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered (connection refused or reset, timeout, etcd has
    no leader). Retry later: the client's callers back off and reconnect."""


class EtcdRequestError(EtcdError):
    """etcd answered that the request itself is wrong (gRPC
    INVALID_ARGUMENT and the like): retrying it will not help."""


class EtcdCompacted(EtcdError):
    """The revision asked for was compacted away (a watch or a range at an
    old revision). Reload everything at the current revision."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class EtcdLeaseNotFound(EtcdError):
    """The lease expired or was revoked: grant a new one and put again what
    it held."""


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with prefix
    (etcd's clientv3.GetPrefixRangeEnd): the prefix with its last byte below
    0xff incremented and what follows it dropped."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # all keys


def _int(v: Any) -> int:
    return int(v) if v is not None else 0


@dataclasses.dataclass(frozen=True)
class KeyValue:
    """mvccpb.KeyValue."""
    key: bytes
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0

    @classmethod
    def from_json(cls, d: dict) -> KeyValue:
        return cls(unb64(d.get("key")), unb64(d.get("value")), _int(d.get("create_revision")),
                   _int(d.get("mod_revision")), _int(d.get("version")), _int(d.get("lease")))


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """mvccpb.Event: ``kv`` after the change (for a DELETE: key and
    mod_revision only), ``prev_kv`` before it when the watch asked for it."""
    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclasses.dataclass(frozen=True)
class WatchResponse:
    """etcdserverpb.WatchResponse. ``revision`` is the header's: after a
    batch of events, every event up to it has been sent."""
    revision: int
    watch_id: int = 0
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    events: tuple[WatchEvent, ...] = ()

    @property
    def is_progress(self) -> bool:
        return not (self.created or self.canceled or self.events)


@dataclasses.dataclass(frozen=True)
class RangeResult:
    revision: int
    kvs: tuple[KeyValue, ...]
    count: int
    more: bool = False


@dataclasses.dataclass(frozen=True)
class TxnResult:
    revision: int
    succeeded: bool
    responses: tuple[dict, ...]  # ResponseOp, as decoded JSON

    def ranges(self) -> list[RangeResult]:
        """The results of the range operations of the branch that ran."""
        return [decode_range({"header": {"revision": self.revision}, **r["response_range"]})
                for r in self.responses if "response_range" in r]


# -- requests -------------------------------------------------------------------

def _with_set(body: dict, **fields: Any) -> dict:
    """``body`` plus the fields not at their zero value (as proto3 JSON leaves them out)."""
    body.update((k, v) for k, v in fields.items() if v)
    return body


def range_request(key: bytes, *, prefix: bool = False, range_end: bytes | None = None,
                  revision: int = 0, limit: int = 0, count_only: bool = False,
                  keys_only: bool = False) -> dict:
    body: dict[str, Any] = {"key": b64(key)}
    end = prefix_end(key) if prefix else range_end
    if end is not None:
        body["range_end"] = b64(end)
    return _with_set(body, revision=revision, limit=limit, count_only=count_only, keys_only=keys_only)
    return body


def put_request(key: bytes, value: bytes, *, lease: int = 0) -> dict:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return body


def delete_request(key: bytes, *, prefix: bool = False) -> dict:
    body: dict[str, Any] = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key))
    return body


@dataclasses.dataclass(frozen=True)
class Compare:
    """etcdserverpb.Compare on one key, or on every key of a prefix (then it
    holds when it holds for each key: "no key under P" is
    ``Compare.version(P, 0, prefix=True)``)."""
    target: str  # VERSION | CREATE | MOD | VALUE
    key: bytes
    value: Any
    result: str = "EQUAL"  # EQUAL | GREATER | LESS | NOT_EQUAL
    prefix: bool = False

    _FIELDS = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision", "VALUE": "value"}

    @classmethod
    def version(cls, key: bytes, version: int, *, prefix: bool = False) -> Compare:
        return cls("VERSION", key, version, prefix=prefix)

    @classmethod
    def missing(cls, key: bytes) -> Compare:
        """The key does not exist."""
        return cls("CREATE", key, 0)

    @classmethod
    def mod_revision(cls, key: bytes, revision: int) -> Compare:
        return cls("MOD", key, revision)

    def to_json(self) -> dict:
        value = b64(self.value) if self.target == "VALUE" else str(self.value)
        body = {"target": self.target, "result": self.result, "key": b64(self.key),
                self._FIELDS[self.target]: value}
        if self.prefix:
            body["range_end"] = b64(prefix_end(self.key))
        return body


def op_put(key: bytes, value: bytes, *, lease: int = 0) -> dict:
    return {"request_put": put_request(key, value, lease=lease)}


def op_delete(key: bytes, *, prefix: bool = False) -> dict:
    return {"request_delete_range": delete_request(key, prefix=prefix)}


def op_range(key: bytes, *, prefix: bool = False, count_only: bool = False) -> dict:
    return {"request_range": range_request(key, prefix=prefix, count_only=count_only)}


def txn_request(compare: Sequence[Compare], success: Iterable[dict], failure: Iterable[dict] = ()) -> dict:
    return {"compare": [c.to_json() for c in compare], "success": list(success), "failure": list(failure)}


def watch_request(key: bytes, *, prefix: bool = True, start_revision: int = 0,
                  prev_kv: bool = False, progress_notify: bool = False) -> dict:
    create: dict[str, Any] = {"key": b64(key)}
    if prefix:
        create["range_end"] = b64(prefix_end(key))
    _with_set(create, start_revision=start_revision, prev_kv=prev_kv, progress_notify=progress_notify)
    return {"create_request": create}


# -- responses ----------------------------------------------------------------------

def header_revision(body: dict) -> int:
    """The store revision in a response's header."""
    return _int((body.get("header") or {}).get("revision"))


def decode_error(status: int, body: Any) -> EtcdError:
    """The typed error of a non-2xx answer (or of an ``{"error": ...}``
    object on a stream)."""
    if isinstance(body, dict):
        message = str(body.get("message") or body.get("error") or body)
        code = body.get("code")
    else:
        message, code = str(body)[:200], None
    text = f"etcd: {message}"
    if code == GRPC_OUT_OF_RANGE and "compacted" in message:
        return EtcdCompacted(text)
    if code == GRPC_NOT_FOUND and "lease" in message:
        return EtcdLeaseNotFound(text)
    if code == GRPC_UNAVAILABLE or status in (502, 503, 504):
        return EtcdUnavailable(text)
    if code in (GRPC_INVALID_ARGUMENT, GRPC_FAILED_PRECONDITION) or status == 400:
        return EtcdRequestError(text)
    return EtcdError(f"{text} (HTTP {status}, code {code})")


def decode_range(body: dict) -> RangeResult:
    kvs = tuple(KeyValue.from_json(kv) for kv in body.get("kvs") or ())
    return RangeResult(header_revision(body), kvs, _int(body.get("count")), bool(body.get("more")))


def decode_txn(body: dict) -> TxnResult:
    return TxnResult(header_revision(body), bool(body.get("succeeded")), tuple(body.get("responses") or ()))


def decode_lease_grant(body: dict) -> tuple[int, int]:
    """(lease id, TTL seconds)."""
    if body.get("error"):
        raise EtcdError(f"etcd: lease grant failed: {body['error']}")
    return _int(body.get("ID")), _int(body.get("TTL"))


def decode_keepalive(body: dict) -> int:
    """The lease's renewed TTL; EtcdLeaseNotFound when it is gone (etcd
    answers a keepalive of an expired lease with no TTL)."""
    result = body.get("result", body)
    if "error" in body:
        raise decode_error(200, body["error"])
    ttl = _int(result.get("TTL"))
    if ttl <= 0:
        raise EtcdLeaseNotFound(f"etcd: lease {_int(result.get('ID')):x} expired or revoked")
    return ttl


def _event(d: dict) -> WatchEvent:
    prev = d.get("prev_kv")
    return WatchEvent(EventType(d.get("type", "PUT")), KeyValue.from_json(d.get("kv") or {}),
                      KeyValue.from_json(prev) if prev else None)


def decode_watch_line(line: str | bytes) -> WatchResponse:
    """One line of the /v3/watch stream -> a WatchResponse. A compacted
    start revision is not an exception here: the response says
    ``canceled`` with ``compact_revision``; the caller decides. A stream
    error object raises its typed EtcdError; a malformed line EtcdError."""
    try:
        msg = json.loads(line)
    except ValueError as e:
        raise EtcdError(f"etcd: malformed watch stream line: {e}") from None
    if not isinstance(msg, dict):
        raise EtcdError("etcd: malformed watch stream line: not an object")
    if "error" in msg:
        err = msg["error"]
        raise decode_error(200, err if isinstance(err, dict) else msg)
    r = msg.get("result")
    if not isinstance(r, dict):
        raise EtcdError("etcd: malformed watch stream line: no result")
    return WatchResponse(
        revision=header_revision(r), watch_id=_int(r.get("watch_id")), created=bool(r.get("created")),
        canceled=bool(r.get("canceled")), compact_revision=_int(r.get("compact_revision")),
        cancel_reason=str(r.get("cancel_reason") or ""),
        events=tuple(_event(e) for e in r.get("events") or ()))
