"""The etcd gateway codec (sans-IO) and the client's endpoint handling over
httpx's MockTransport (no socket). The bodies decoded here are the ones
etcd 3.4's gateway sent when asked by hand (curl), field for field."""

from __future__ import annotations

import base64
import json
import random

import httpx
import pytest
import trio

from nitro.fleet import etcd_codec as codec
from nitro.fleet.etcd import Backoff, EtcdClient
from nitro.fleet.etcd_codec import (
    Compare,
    EtcdCompacted,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdRequestError,
    EtcdUnavailable,
    EventType,
)

HEADER = {"cluster_id": "15118495548433857066", "member_id": "13668033151171901709", "raft_term": "2"}


def b(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_prefix_end_is_etcds():
    assert codec.prefix_end(b"/nitro/") == b"/nitro0"
    assert codec.prefix_end(b"a\xff") == b"b"
    assert codec.prefix_end(b"\xff\xff") == b"\0"


def test_requests_leave_zero_fields_out():
    assert codec.range_request(b"/nitro/", prefix=True) == {"key": b("/nitro/"), "range_end": b("/nitro0")}
    assert codec.range_request(b"k", revision=7, count_only=True) == {"key": b("k"), "revision": 7,
                                                                       "count_only": True}
    assert codec.put_request(b"k", b"v") == {"key": b("k"), "value": b("v")}
    assert codec.put_request(b"k", b"v", lease=0x1234)["lease"] == str(0x1234)
    w = codec.watch_request(b"/nitro/", start_revision=5, prev_kv=True)
    assert w == {"create_request": {"key": b("/nitro/"), "range_end": b("/nitro0"), "start_revision": 5,
                                    "prev_kv": True}}


def test_txn_compare_bodies():
    body = codec.txn_request([Compare.missing(b"a"), Compare.version(b"p/", 0, prefix=True),
                              Compare.mod_revision(b"m", 9)],
                             [codec.op_put(b"a", b"1")], [codec.op_range(b"a")])
    assert body["compare"] == [
        {"target": "CREATE", "result": "EQUAL", "key": b("a"), "create_revision": "0"},
        {"target": "VERSION", "result": "EQUAL", "key": b("p/"), "version": "0", "range_end": b("p0")},
        {"target": "MOD", "result": "EQUAL", "key": b("m"), "mod_revision": "9"}]
    assert body["success"] == [{"request_put": {"key": b("a"), "value": b("1")}}]
    assert body["failure"] == [{"request_range": {"key": b("a")}}]


def test_decode_range_and_txn():
    r = codec.decode_range({"header": {**HEADER, "revision": "2"}, "count": "1", "kvs": [
        {"key": "Zm9v", "create_revision": "2", "mod_revision": "2", "version": "1", "value": "YmFy"}]})
    assert (r.revision, r.count, r.kvs[0].key, r.kvs[0].value, r.kvs[0].mod_revision) == (2, 1, b"foo", b"bar", 2)
    empty = codec.decode_range({"header": {**HEADER, "revision": "2"}})
    assert empty.kvs == () and empty.count == 0
    failed = codec.decode_txn({"header": {**HEADER, "revision": "6"}, "responses": [{"response_range": {
        "header": {"revision": "6"}, "kvs": [{"key": "L25pdHJvLw==", "mod_revision": "6", "value": "eA=="}],
        "count": "1"}}]})
    assert not failed.succeeded  # etcd leaves "succeeded": false out
    assert failed.ranges()[0].kvs[0].value == b"x"


def test_decode_watch_stream_lines():
    created = codec.decode_watch_line(json.dumps({"result": {"header": {**HEADER, "revision": "2"},
                                                             "created": True}}))
    assert created.created and created.revision == 2 and not created.events
    put = codec.decode_watch_line(json.dumps({"result": {"header": {**HEADER, "revision": "4"}, "events": [
        {"kv": {"key": "L25pdHJvL2E=", "create_revision": "3", "mod_revision": "4", "version": "2",
                "value": "Mg=="},
         "prev_kv": {"key": "L25pdHJvL2E=", "mod_revision": "3", "value": "MQ=="}}]}}))
    (e,) = put.events
    assert (e.type, e.kv.key, e.kv.value, e.revision, e.prev_kv.value) == (EventType.PUT, b"/nitro/a", b"2", 4, b"1")
    deleted = codec.decode_watch_line(json.dumps({"result": {"header": {**HEADER, "revision": "5"}, "events": [
        {"type": "DELETE", "kv": {"key": "L25pdHJvL2E=", "mod_revision": "5"}}]}}))
    assert deleted.events[0].type is EventType.DELETE and deleted.events[0].kv.value == b""
    compacted = codec.decode_watch_line(json.dumps({"result": {"header": HEADER, "canceled": True,
                                                               "compact_revision": "5"}}))
    assert compacted.canceled and compacted.compact_revision == 5


@pytest.mark.parametrize("line", [b"{not json", b"[1]", b'{"nothing": 1}'])
def test_malformed_watch_line_is_an_etcd_error(line):
    with pytest.raises(EtcdError):
        codec.decode_watch_line(line)


@pytest.mark.parametrize(("status", "body", "kind"), [
    (400, {"error": "etcdserver: mvcc: required revision has been compacted", "code": 11}, EtcdCompacted),
    (404, {"error": "etcdserver: requested lease not found", "code": 5}, EtcdLeaseNotFound),
    (503, {"error": "etcdserver: no leader", "code": 14}, EtcdUnavailable),
    (400, {"error": "etcdserver: key is not provided", "code": 3}, EtcdRequestError),
    (500, "<html>proxy error</html>", EtcdError),
])
def test_errors_are_typed(status, body, kind):
    err = codec.decode_error(status, body)
    assert type(err) is kind and str(err).startswith("etcd: ")


def test_keepalive_of_an_expired_lease():
    assert codec.decode_keepalive({"result": {"header": HEADER, "ID": "7", "TTL": "10"}}) == 10
    with pytest.raises(EtcdLeaseNotFound):
        codec.decode_keepalive({"result": {"header": HEADER, "ID": "7"}})  # etcd: no TTL = gone


def test_backoff_grows_with_jitter_and_resets():
    bo = Backoff(initial=0.1, maximum=1.0, rng=random.Random(1))
    delays = [bo.next_delay() for _ in range(8)]
    nominal = [min(1.0, 0.1 * 2 ** i) for i in range(8)]
    assert all(n / 2 <= d <= n for d, n in zip(delays, nominal))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed ladder
    bo.reset()
    assert bo.next_delay() <= 0.1


def _client(handler, endpoints=("http://a:1", "http://b:2")) -> EtcdClient:
    return EtcdClient(list(endpoints), transport=httpx.MockTransport(handler))


def test_failover_to_the_next_endpoint_and_stay_there():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "a":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"header": {"revision": "3"}})

    async def main():
        async with _client(handler) as etcd:
            assert await etcd.put(b"k", b"v") == 3
            assert etcd.endpoint == "http://b:2"
            await etcd.put(b"k", b"v")

    trio.run(main)
    assert seen == ["a", "b", "b"]


def test_no_endpoint_answers():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(503, json={"error": "etcdserver: no leader", "code": 14})

    async def main():
        async with _client(handler) as etcd:
            with pytest.raises(EtcdUnavailable, match="tried http://a:1, http://b:2.*no leader"):
                await etcd.range(b"k")

    trio.run(main)


def test_a_refused_request_is_not_retried_elsewhere():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        return httpx.Response(400, json={"error": "etcdserver: key is not provided", "code": 3})

    async def main():
        async with _client(handler) as etcd:
            with pytest.raises(EtcdRequestError):
                await etcd.put(b"", b"")

    trio.run(main)
    assert calls == ["a"]


def test_watch_stream_decodes_lines_across_chunks_and_reports_the_end():
    lines = [{"result": {"header": {"revision": "2"}, "created": True}},
             {"result": {"header": {"revision": "3"}, "events": [{"kv": {"key": b("/nitro/x"),
                                                                         "mod_revision": "3",
                                                                         "value": b("1")}}]}}]
    data = b"".join(json.dumps(m).encode() + b"\n" for m in lines)

    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self):
            for i in range(0, len(data), 7):  # lines split across chunks
                yield data[i:i + 7]

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["create_request"]["start_revision"] == 2
        return httpx.Response(200, stream=Chunks())

    async def main():
        async with _client(handler) as etcd:
            stream = await etcd.watch(b"/nitro/", start_revision=2)
            got = []
            with pytest.raises(EtcdUnavailable, match="closed the watch stream"):
                async for response in stream:
                    got.append(response)
            await stream.aclose()
        return got

    got = trio.run(main)
    assert got[0].created and got[1].events[0].kv.key == b"/nitro/x"
