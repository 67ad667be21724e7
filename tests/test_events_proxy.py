"""Monitoring events end to end: a real mitmdump with the addon publishing to a real redis-server (no mocks).

A redis client subscribes before any request is sent; the tests check what arrives on the channel and the
stream: one mask and one unmask event per flow with every field, sampling, batches, block events, that no
original ever appears, that a Redis that is down or paused does not slow requests down, and that the proxy
never holds more than two connections to Redis.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
import redis

from conftest import masker_options, proxied_client
from fake_upstream import FakeUpstream, parse_sse
from proxyproc import MitmProxy
from redisproc import RedisServer

pytestmark = pytest.mark.mitm

OBSERVER = "test-observer"  # CLIENT SETNAME of the test's own Redis connections
MASK_FIELDS = {"type", "ts", "flow_id", "host", "path", "count", "rules", "duration_ms", "bytes"}
UNMASK_FIELDS = MASK_FIELDS | {"streamed"}
BLOCK_FIELDS = MASK_FIELDS | {"reason", "status"}
THREADS = 6


# -- traffic -----------------------------------------------------------------------------------------------

def originals(i: int) -> dict[str, str]:
    """Identifiers unique to request ``i``."""
    return {
        "account": f"{210987654321 + i * 7919:012d}",
        "instance": f"i-0{0x5a17c0de00000000 + i * 104729:016x}",
        "role": f"Deploy{i:03d}Role",
    }


def request_text(i: int) -> str:
    o = originals(i)
    return (f"Why can't arn:aws:iam::{o['account']}:role/{o['role']} reach {o['instance']}? "
            f"Region us-east-1, account {o['account']}.")


def anthropic_body(i: int, *, stream: bool = False, pad: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "claude-test", "max_tokens": 50,
                            "messages": [{"role": "user", "content": request_text(i) + " " * pad}]}
    if stream:
        body["stream"] = True
    return body


@dataclass
class Sent:
    """What the test sent: the originals in it, and how it was answered."""

    originals: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)


class Traffic:
    """Requests through the proxy from a few threads, each with its own client."""

    def __init__(self, proxy: MitmProxy, upstream: FakeUpstream) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.sent = Sent()
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()

    def client(self) -> httpx.Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = proxied_client(self.proxy, timeout=10)
            with self._lock:
                self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def post(self, i: int, *, stream: bool = False, pad: int = 0, query: bool = False) -> httpx.Response:
        o = originals(i)
        with self._lock:
            self.sent.originals.extend(o.values())
        path = "/v1/messages" + (f"?account={o['account']}&id={o['instance']}" if query else "")
        r = self.client().post(self.upstream.url_for(path), json=anthropic_body(i, stream=stream, pad=pad))
        with self._lock:
            self.sent.statuses[r.status_code] += 1
        if r.status_code == 200:
            if stream:
                assert r.headers["content-type"].startswith("text/event-stream")
                text = "".join(e.json().get("delta", {}).get("text", "") for e in parse_sse(r.content)
                               if e.event == "content_block_delta")
            else:
                text = r.json()["content"][0]["text"]
            assert o["instance"] in text and "AWS_" not in text  # restored
        return r

    def echo(self, i: int) -> httpx.Response:
        """The cheapest masked request: a text body the fake upstream echoes back."""
        o = originals(i)
        with self._lock:
            self.sent.originals.extend(o.values())
        r = self.client().post(self.upstream.url_for(f"/echo/{o['instance']}"),
                               content=request_text(i).encode(), headers={"content-type": "text/plain"})
        with self._lock:
            self.sent.statuses[r.status_code] += 1
        assert r.status_code == 200 and r.content == request_text(i).encode()
        return r

    def run(self, jobs: list[Callable[[], Any]], threads: int = THREADS) -> None:
        with ThreadPoolExecutor(threads) as pool:
            for fut in [pool.submit(job) for job in jobs]:
                fut.result()

    def assert_upstream_saw_no_original(self) -> None:
        leaked = {o for rec in self.upstream.requests for o in self.sent.originals
                  if o.encode() in rec.body + rec.content}
        assert not leaked, f"originals reached the upstream: {sorted(leaked)[:5]}"


# -- the listening side --------------------------------------------------------------------------------------

class Subscriber:
    """A Pub/Sub subscription read by a background thread (subscribed before it returns)."""

    def __init__(self, srv: RedisServer, channel: str) -> None:
        self.client = srv.client(client_name=OBSERVER)
        self.ps = self.client.pubsub(ignore_subscribe_messages=True)
        self.ps.subscribe(channel)
        deadline = time.monotonic() + 5
        while self.client.pubsub_numsub(channel)[0][1] < 1:
            assert time.monotonic() < deadline, "subscription not active"
            time.sleep(0.01)
        self.raw: list[bytes] = []
        self.last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"subscriber-{channel}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = self.ps.get_message(ignore_subscribe_messages=True, timeout=0.05)
            except redis.RedisError:  # the server was stopped
                return
            if m is not None and m["type"] == "message":
                with self._lock:
                    self.raw.append(m["data"])
                    self.last = time.monotonic()

    def payloads(self) -> list[bytes]:
        with self._lock:
            return list(self.raw)

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(d) for d in self.payloads()]

    def events(self) -> list[dict[str, Any]]:
        return unpacked(self.messages())

    def wait_events(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(evs := self.events()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return evs

    def wait_quiet(self, quiet: float = 1.0, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Events once nothing has arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last < quiet and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.events()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.ps.close()
        self.client.close()


def unpacked(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        out.extend(m["events"] if m.get("type") == "batch" else [m])
    return out


def by_type(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"mask": [], "unmask": [], "block": []}
    for ev in events:
        out[ev["type"]].append(ev)
    return out


def assert_no_original_in(payloads: list[bytes], sent: list[str]) -> None:
    assert payloads and sent
    leaked = {o for p in payloads for o in sent if o.encode() in p}
    assert not leaked, f"originals in event payloads: {sorted(leaked)[:5]}"


def proxy_connections(observer: Any, baseline: set[int]) -> list[dict[str, Any]]:
    """Connections to Redis that are neither the test's own nor there before the proxy started."""
    return [c for c in observer.client_list()
            if c.get("name") != OBSERVER and int(c["id"]) not in baseline]


# -- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    return fake_upstream


def event_proxy(start: Callable[..., MitmProxy], srv: RedisServer, up: FakeUpstream, channel: str,
                **options: Any) -> MitmProxy:
    return start(**masker_options(up, masker_redis_url=srv.url, masker_events_channel=channel, **options))


# -- sample rate 1.0: every flow, every field, the stream, no originals -------------------------------------

N_FLOWS = 20
N_BLOCKED = 2
MAX_BODY = 2000


@dataclass
class Run:
    events: list[dict[str, Any]]
    raw: list[bytes]
    stream: list[tuple[bytes, dict[bytes, bytes]]]
    stats: list[bytes]
    sent: Sent
    streamed_ids: int
    started: float
    ended: float


@pytest.fixture(scope="module")
def full_run(start_proxy_module, server: RedisServer, fake_upstream_module: FakeUpstream) -> Run:
    """20 flows (half streamed, some with identifiers in the query) and 2 blocked ones at sample rate 1."""
    up = fake_upstream_module
    up.clear()
    stream_key = "t-events-stream"
    proxy = event_proxy(start_proxy_module, server, up, "t-full", masker_event_sample_rate="1.0",
                        masker_events_stream=stream_key, masker_max_body=MAX_BODY)
    sub = Subscriber(server, "t-full")
    traffic = Traffic(proxy, up)
    started = time.time()
    try:
        jobs: list[Callable[[], Any]] = [
            partial(traffic.post, i, stream=i % 2 == 1, query=i % 5 == 0) for i in range(N_FLOWS)]
        jobs += [partial(traffic.post, 1000 + i, pad=MAX_BODY) for i in range(N_BLOCKED)]
        traffic.run(jobs, threads=4)
        events = sub.wait_events(2 * N_FLOWS + N_BLOCKED)
        time.sleep(0.5)  # anything extra would arrive now
        events = sub.events()
        ended = time.time()
        traffic.assert_upstream_saw_no_original()
        with server.client(client_name=OBSERVER) as c:
            deadline = time.monotonic() + 5
            while c.xlen(stream_key) < len(events) and time.monotonic() < deadline:
                time.sleep(0.02)
            stream = c.xrange(stream_key)
            stats = [json.dumps({k.decode(): v.decode() for k, v in c.hgetall(key).items()}).encode()
                     for key in c.keys("aws-masker:stats:*")]
        raw = sub.payloads()
    finally:
        sub.close()
        traffic.close()
    assert traffic.sent.statuses == Counter({200: N_FLOWS, 413: N_BLOCKED})
    return Run(events, raw, stream, stats, traffic.sent, N_FLOWS // 2, started, ended)


def test_every_flow_gives_exactly_one_mask_and_one_unmask_event(full_run: Run) -> None:
    kinds = by_type(full_run.events)
    assert len(kinds["mask"]) == N_FLOWS and len(kinds["unmask"]) == N_FLOWS
    assert len(kinds["block"]) == N_BLOCKED
    assert len(full_run.events) == 2 * N_FLOWS + N_BLOCKED
    mask_ids = [e["flow_id"] for e in kinds["mask"]]
    assert len(set(mask_ids)) == N_FLOWS
    assert set(mask_ids) == {e["flow_id"] for e in kinds["unmask"]}
    assert not set(mask_ids) & {e["flow_id"] for e in kinds["block"]}
    assert all(m.get("type") != "batch" for m in map(json.loads, full_run.raw))  # batch size 1


def test_event_fields(full_run: Run) -> None:
    kinds = by_type(full_run.events)
    for ev in full_run.events:
        assert full_run.started - 1 <= ev["ts"] <= full_run.ended + 1
        assert ev["host"] == "127.0.0.1" and ev["path"] == "/v1/messages"  # the query string is cut off
        assert isinstance(ev["duration_ms"], int | float) and ev["duration_ms"] >= 0
        assert isinstance(ev["flow_id"], str) and len(ev["flow_id"]) == 36
    counts: Counter[int] = Counter()
    for ev in kinds["mask"]:
        assert set(ev) == MASK_FIELDS, ev
        # per request: the account twice, the role, the instance (and with the query, those two again)
        assert ev["count"] in (4, 6) and sum(ev["rules"].values()) == ev["count"], ev
        counts[ev["count"]] += 1
    assert counts == {4: N_FLOWS - N_FLOWS // 5, 6: N_FLOWS // 5}  # every 5th flow has the query
    for ev in kinds["mask"]:
        assert ev["bytes"] > 100
    unmask = {e["flow_id"]: e for e in kinds["unmask"]}
    for ev in kinds["unmask"]:
        assert set(ev) == UNMASK_FIELDS, ev
        assert ev["count"] >= 4 and sum(ev["rules"].values()) == ev["count"], ev
        assert ev["bytes"] > 100
    assert Counter(e["streamed"] for e in unmask.values()) == {True: full_run.streamed_ids,
                                                               False: N_FLOWS - full_run.streamed_ids}
    for ev in kinds["block"]:
        assert set(ev) == BLOCK_FIELDS, ev
        assert ev["status"] == 413 and "masker_max_body" in ev["reason"]
        assert ev["count"] == 0 and ev["rules"] == {}


def test_stream_receives_every_event(full_run: Run) -> None:
    assert len(full_run.stream) == len(full_run.events)
    entries = [json.loads(fields[b"event"]) for _, fields in full_run.stream]
    assert [f[b"type"].decode() for _, f in full_run.stream] == [e["type"] for e in entries]

    def key(e: dict[str, Any]) -> tuple[str, str]:
        return e["type"], e["flow_id"]

    assert sorted(map(key, entries)) == sorted(map(key, full_run.events))
    assert sorted(entries, key=key) == sorted(full_run.events, key=key)  # the same event, field for field


def test_no_original_in_any_payload(full_run: Run) -> None:
    assert len(full_run.sent.originals) == 3 * (N_FLOWS + N_BLOCKED)
    assert_no_original_in(full_run.raw, full_run.sent.originals)
    assert_no_original_in([b"".join(f.values()) for _, f in full_run.stream], full_run.sent.originals)
    assert_no_original_in(full_run.stats, full_run.sent.originals)


# -- sampling, batches, block events -------------------------------------------------------------------------

def test_sample_rate_within_binomial_bounds_and_pairs(start_proxy_module, server, upstream) -> None:
    n = 300
    proxy = event_proxy(start_proxy_module, server, upstream, "t-sampled", masker_event_sample_rate="0.1")
    sub = Subscriber(server, "t-sampled")
    traffic = Traffic(proxy, upstream)
    try:
        traffic.run([partial(traffic.echo, i) for i in range(n)])
        events = sub.wait_quiet(1.0)
    finally:
        sub.close()
        traffic.close()
    assert traffic.sent.statuses == Counter({200: n})
    kinds = by_type(events)
    mask_ids = {e["flow_id"] for e in kinds["mask"]}
    unmask_ids = {e["flow_id"] for e in kinds["unmask"]}
    # Binomial(300, 0.1): mean 30, sd 5.2; 12..52 is wider than +-3.4 sd
    assert 12 <= len(mask_ids) <= 52, len(mask_ids)
    assert mask_ids == unmask_ids  # a flow's events go together
    assert len(kinds["mask"]) == len(mask_ids) == len(kinds["unmask"]) and not kinds["block"]
    assert all(e["path"] == "/echo/***" for e in events)  # the instance in the path is not published
    assert_no_original_in(sub.payloads(), traffic.sent.originals)


def test_batches_hold_at_most_batch_size_events(start_proxy_module, server, upstream) -> None:
    n = 37
    proxy = event_proxy(start_proxy_module, server, upstream, "t-batched", masker_event_batch_size=10,
                        masker_event_flush_ms=300)
    sub = Subscriber(server, "t-batched")
    traffic = Traffic(proxy, upstream)
    try:
        traffic.run([partial(traffic.post, i, stream=i % 3 == 0) for i in range(n)])
        events = sub.wait_events(2 * n)
        time.sleep(0.6)  # > flush_ms: nothing more may come
        messages = sub.messages()
    finally:
        sub.close()
        traffic.close()
    assert messages and all(m["type"] == "batch" for m in messages)
    assert all(m["count"] == len(m["events"]) and 1 <= m["count"] <= 10 for m in messages)
    assert max(m["count"] for m in messages) == 10  # batching did happen
    events = unpacked(messages)
    assert len(events) == 2 * n
    kinds = by_type(events)
    assert len(kinds["mask"]) == len(kinds["unmask"]) == n
    assert {e["flow_id"] for e in kinds["mask"]} == {e["flow_id"] for e in kinds["unmask"]}
    assert_no_original_in(sub.payloads(), traffic.sent.originals)


def test_block_events_published_even_at_rate_zero(start_proxy_module, server, upstream) -> None:
    proxy = event_proxy(start_proxy_module, server, upstream, "t-rate0", masker_event_sample_rate="0",
                        masker_max_body=MAX_BODY)
    sub = Subscriber(server, "t-rate0")
    traffic = Traffic(proxy, upstream)
    try:
        jobs: list[Callable[[], Any]] = [partial(traffic.post, i, stream=i % 2 == 0) for i in range(10)]
        jobs += [partial(traffic.post, 100 + i, pad=MAX_BODY) for i in range(3)]
        traffic.run(jobs)
        events = sub.wait_events(3)
        time.sleep(0.5)
        events = sub.events()
    finally:
        sub.close()
        traffic.close()
    assert traffic.sent.statuses == Counter({200: 10, 413: 3})
    assert [e["type"] for e in events] == ["block"] * 3
    assert all(set(e) == BLOCK_FIELDS and e["status"] == 413 for e in events)
    assert_no_original_in(sub.payloads(), traffic.sent.originals)


# -- robustness: Redis down or paused does not slow requests; at most two connections -----------------------

LATENCY_REQUESTS = 30


def timed_requests(traffic: Traffic, start: int, n: int = LATENCY_REQUESTS) -> list[float]:
    out = []
    for i in range(start, start + n):
        t0 = time.perf_counter()
        traffic.post(i, stream=i % 2 == 1)
        out.append(time.perf_counter() - t0)
    return out


def test_latency_unchanged_when_event_redis_is_paused_or_down(start_proxy, own_server, upstream,
                                                              record_property) -> None:
    proxy = event_proxy(start_proxy, own_server, upstream, "t-latency", masker_store="memory")
    sub = Subscriber(own_server, "t-latency")
    traffic = Traffic(proxy, upstream)
    try:
        timed_requests(traffic, 0, 10)  # warm-up: connections, first-use costs
        up = timed_requests(traffic, 100)
        assert len(sub.wait_events(2 * (10 + LATENCY_REQUESTS))) == 2 * (10 + LATENCY_REQUESTS)

        mark = proxy.mark()
        own_server.pause(3000)
        paused_at = time.monotonic()
        paused = timed_requests(traffic, 200)
        paused_for = time.monotonic() - paused_at
        assert paused_for < 2.5, "the paused measurement must run while Redis is paused"
        proxy.wait_for_log(r"aws-masker events: Redis unavailable", timeout=5, since=mark)
        time.sleep(max(0.0, 3.2 - (time.monotonic() - paused_at)))

        own_server.stop()
        down = timed_requests(traffic, 300)
    finally:
        sub.close()
        traffic.close()
    assert traffic.sent.statuses == Counter({200: 10 + 3 * LATENCY_REQUESTS})
    medians = {name: statistics.median(v) * 1000 for name, v in (("up", up), ("paused", paused),
                                                                  ("down", down))}
    worst = {name: max(v) * 1000 for name, v in (("up", up), ("paused", paused), ("down", down))}
    print(f"\nlatency median ms: {medians}; max ms: {worst}")
    for name, value in {**medians, **{f"max_{k}": v for k, v in worst.items()}}.items():
        record_property(f"latency_{name}_ms", round(value, 2))
    assert medians["paused"] < medians["up"] + 50
    assert medians["down"] < medians["up"] + 50
    assert max(worst.values()) < 1000


def test_at_most_two_redis_connections(start_proxy, own_server, upstream, record_property) -> None:
    n = 100
    with own_server.client(client_name=OBSERVER) as observer:
        baseline = {int(c["id"]) for c in observer.client_list()}
        proxy = event_proxy(start_proxy, own_server, upstream, "t-conns", masker_store="redis")
        sub = Subscriber(own_server, "t-conns")
        traffic = Traffic(proxy, upstream)
        seen: list[int] = []
        names: dict[int, set[str]] = {}  # connection id -> names it was seen with
        stop = threading.Event()

        def poll() -> None:
            with own_server.client(client_name=OBSERVER) as c:
                while not stop.is_set():
                    conns = proxy_connections(c, baseline)
                    seen.append(len(conns))
                    for x in conns:  # unnamed only until its handshake (HELLO, CLIENT SETNAME) has run
                        names.setdefault(int(x["id"]), set()).add(str(x.get("name")))
                    time.sleep(0.005)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            traffic.run([partial(traffic.post, i, stream=i % 2 == 1) for i in range(n)], threads=8)
            events = sub.wait_events(2 * n)
        finally:
            stop.set()
            poller.join(5)
            sub.close()
            traffic.close()
        after = proxy_connections(observer, baseline)
    print(f"\nproxy connections to Redis: max {max(seen)} at once over {len(seen)} samples, "
          f"{len(names)} over the whole run, {len(after)} after")
    record_property("redis_connections_max", max(seen))
    assert traffic.sent.statuses == Counter({200: n})
    assert len(events) == 2 * n  # the store and the events share the pool, and both work
    assert len(seen) > 20 and 1 <= max(seen) <= 2
    assert 1 <= len(names) <= 2  # no more than two connections over the whole run, either
    assert all("aws-masker" in n for n in names.values())
    assert len(after) <= 2 and {c["name"] for c in after} <= {"aws-masker"}
    traffic.assert_upstream_saw_no_original()
