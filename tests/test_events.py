"""Monitoring events (EventPublisher) and the monitor CLI against a real redis-server (no mocks)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from aws_masker import events as ev_mod
from aws_masker.events import (
    EventPublisher,
    block_event,
    mask_event,
    parse_batch_size,
    parse_event_options,
    parse_events_channel,
    parse_flush_ms,
    parse_sample_rate,
    parse_stream_maxlen,
    sample_point,
    sampled,
    stats_key,
    unmask_event,
)
from aws_masker.redis_store import make_redis_client
from conftest import run
from redisproc import RedisServer

RULES = {"aws-arn": 3, "aws-ec2-instance-id": 9}


@pytest.fixture
def name() -> str:
    """A fresh channel / namespace / stream name per test."""
    return "t-" + uuid.uuid4().hex[:12]


def flow_ids(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def sample_events(n: int, seed: int = 7) -> list[dict[str, Any]]:
    out = []
    for i, fid in enumerate(flow_ids(n, seed)):
        kind = i % 3
        if kind == 0:
            out.append(mask_event(fid, "api.anthropic.com", "/v1/messages", 12, RULES, 0.21, 16400,
                                  placeholders=["AWS_ACCOUNT_0001", "AWS_EC2_INSTANCE_0002"]))
        elif kind == 1:
            out.append(unmask_event(fid, "api.anthropic.com", "/v1/messages", 12, RULES, 0.05, 2100,
                                    streamed=True))
        else:
            out.append(block_event(fid, "api.openai.com", "/v1/chat/completions", 503,
                                   "mapping store unavailable: redis timeout"))
    return out


async def subscribe(url: str, channel: str) -> tuple[Redis, PubSub]:
    client = Redis.from_url(url)
    ps = client.pubsub(ignore_subscribe_messages=True)
    await ps.subscribe(channel)
    return client, ps


async def collect(ps: PubSub, n_events: int, timeout: float = 5.0) -> list[Any]:
    """Messages (parsed JSON) until they hold ``n_events`` events in all."""
    messages: list[Any] = []
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < n_events and time.monotonic() < deadline:
        m = await ps.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if m is None:
            continue
        obj = json.loads(m["data"])
        messages.append(obj)
        seen += obj["count"] if obj.get("type") == "batch" else 1
    return messages


def unpacked(messages: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        out.extend(m["events"] if m.get("type") == "batch" else [m])
    return out


async def wait_until(cond: Any, timeout: float = 5.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return bool(cond())


# -- options -------------------------------------------------------------------------------------------------

def test_option_parsers() -> None:
    assert parse_sample_rate("1.0") == 1.0
    assert parse_sample_rate(" 0.25 ") == 0.25
    assert parse_sample_rate("0") == 0.0
    for bad in ("1.5", "-0.1", "nan", "inf", "abc", "", None):
        with pytest.raises(ValueError, match=r"masker_event_sample_rate: .* between 0 and 1") as e:
            parse_sample_rate(bad)
        assert repr(bad) in str(e.value)
    assert parse_batch_size(1) == 1 and parse_batch_size("1000") == 1000
    for bad_n in (0, 1001, "x", 2.5, True):
        with pytest.raises(ValueError, match=r"masker_event_batch_size: "):
            parse_batch_size(bad_n)
    assert parse_flush_ms(0) == 0 and parse_flush_ms(1000) == 1000
    with pytest.raises(ValueError, match=r"masker_event_flush_ms: -1 "):
        parse_flush_ms(-1)
    with pytest.raises(ValueError, match=r"masker_events_stream_maxlen: 0 "):
        parse_stream_maxlen(0)
    assert parse_events_channel("") == ""
    with pytest.raises(ValueError, match=r"masker_events_channel: 'a b' "):
        parse_events_channel("a b")
    opts = parse_event_options()
    assert (opts.channel, opts.stream, opts.stream_maxlen) == ("aws-masker:events", "", 100_000)
    assert (opts.sample_rate, opts.batch_size, opts.flush_ms) == (1.0, 1, 1000)
    with pytest.raises(ValueError, match=r"masker_events_stream: "):
        parse_event_options(stream="x\ny")


# -- publishing ----------------------------------------------------------------------------------------------

def test_events_arrive_with_all_fields(server: RedisServer, name: str) -> None:
    async def body() -> None:
        sub, ps = await subscribe(server.url, name)
        client = make_redis_client(server.url)
        pub = EventPublisher(client, name, "", 1000, 1.0, 1, 1000, namespace=name)
        pub.start()
        sent = sample_events(60)
        for e in sent:
            pub.emit(e)
        messages = await collect(ps, len(sent))
        await pub.aclose()
        await ps.aclose()
        await sub.aclose()
        await client.aclose()
        assert all(m["type"] != "batch" for m in messages)  # batch size 1: one event per message
        assert len(messages) == len(sent) == pub.published == pub.messages
        assert [m["flow_id"] for m in messages] == [e["flow_id"] for e in sent]  # in order
        common = {"type", "ts", "flow_id", "host", "path", "count", "rules", "duration_ms", "bytes"}
        for m in messages:
            assert common <= set(m), m
            assert isinstance(m["ts"], float) and abs(m["ts"] - time.time()) < 60
            if m["type"] == "mask":
                assert m["rules"] == RULES and m["count"] == 12 and m["bytes"] == 16400
                assert m["placeholders"] == ["AWS_ACCOUNT_0001", "AWS_EC2_INSTANCE_0002"]
            elif m["type"] == "unmask":
                assert m["streamed"] is True and m["duration_ms"] == 0.05
            else:
                assert m["type"] == "block"
                assert (m["status"], m["reason"]) == (503, "mapping store unavailable: redis timeout")
        assert pub.dropped == 0 and pub.connected

    run(body())


def test_originals_never_published(server: RedisServer, name: str) -> None:
    """Defensive: whatever a buggy caller adds, only the documented fields and placeholder tokens go out."""
    original = "123456789012"
    arn = f"arn:aws:iam::{original}:role/Admin"

    async def body() -> None:
        sub, ps = await subscribe(server.url, name)
        client = make_redis_client(server.url)
        pub = EventPublisher(client, name, name + ":stream", 1000, 1.0, 1, 1000, namespace=name)
        pub.start()
        e = mask_event("f1", "api.anthropic.com", f"/v1/messages?account={original}#{arn}", 2,
                       {"aws-arn": 2}, 0.1, 100, placeholders=["AWS_ACCOUNT_0001", arn, original])
        e["original"] = arn
        e["mapping"] = {"AWS_ACCOUNT_0001": original}
        pub.emit(e)
        [m] = await collect(ps, 1)
        entries = await client.xrange(name + ":stream")
        await pub.aclose()
        await ps.aclose()
        await sub.aclose()
        await client.aclose()
        for raw in (json.dumps(m), repr(entries)):
            assert original not in raw and "arn:aws" not in raw
        assert m["path"] == "/v1/messages"
        assert m["placeholders"] == ["AWS_ACCOUNT_0001"]
        assert "original" not in m and "mapping" not in m

    run(body())


def test_batches(server: RedisServer, name: str) -> None:
    async def body() -> None:
        sub, ps = await subscribe(server.url, name)
        client = make_redis_client(server.url)
        pub = EventPublisher(client, name, "", 1000, 1.0, 10, 300, namespace=name)
        pub.start()
        sent = sample_events(95)
        for e in sent:
            pub.emit(e)
        messages = await collect(ps, 95)
        assert all(m["type"] == "batch" and 1 <= m["count"] == len(m["events"]) <= 10 for m in messages)
        got = unpacked(messages)
        assert sorted(e["flow_id"] for e in got) == sorted(e["flow_id"] for e in sent)
        assert sum(1 for m in messages if m["count"] == 10) >= 9
        # a lone event waits for company at most flush_ms
        t0 = time.monotonic()
        pub.emit(mask_event("lone", "api.anthropic.com", "/v1/messages", 1, {"aws-arn": 1}, 0.1, 10))
        [m] = await collect(ps, 1)
        waited = time.monotonic() - t0
        assert m["count"] == 1 and m["events"][0]["flow_id"] == "lone"
        assert 0.2 <= waited < 0.8, waited
        # a full batch goes at once
        t0 = time.monotonic()
        for e in sample_events(10):
            pub.emit(e)
        [m] = await collect(ps, 10)
        assert m["count"] == 10 and time.monotonic() - t0 < 0.2
        await pub.aclose()
        await ps.aclose()
        await sub.aclose()
        await client.aclose()

    run(body())


def test_aclose_flushes_partial_batches(server: RedisServer, name: str) -> None:
    async def body() -> None:
        sub, ps = await subscribe(server.url, name)
        client = make_redis_client(server.url)
        pub = EventPublisher(client, name, "", 1000, 1.0, 10, 60_000, namespace=name)
        pub.start()
        for e in sample_events(25):
            pub.emit(e)
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await pub.aclose()
        assert time.monotonic() - t0 < 0.5
        messages = await collect(ps, 25, timeout=2)
        assert len(unpacked(messages)) == 25 and pub.published == 25 and pub.dropped == 0
        await ps.aclose()
        await sub.aclose()
        await client.aclose()

    run(body())


def test_stream_receives_every_event_and_is_trimmed(server: RedisServer, name: str) -> None:
    stream = name + ":stream"

    async def body() -> None:
        client = make_redis_client(server.url)
        pub = EventPublisher(client, "", stream, 200, 1.0, 10, 50, namespace=name)
        pub.start()
        sent = sample_events(30)
        for e in sent:
            pub.emit(e)
        assert await wait_until(lambda: pub.published == 30)
        entries = await client.xrange(stream)
        assert len(entries) == 30
        got = [json.loads(fields[b"event"]) for _id, fields in entries]
        assert [g["flow_id"] for g in got] == [e["flow_id"] for e in sent]
        assert [fields[b"type"].decode() for _id, fields in entries] == [e["type"] for e in sent]
        for e in sample_events(3000, seed=3):
            pub.emit(e)
        assert await wait_until(lambda: pub.published == 3030)
        n = await client.xlen(stream)
        assert 200 <= n <= 400, n  # MAXLEN ~ 200: trimmed by whole stream nodes (100 entries each)
        await pub.aclose()
        await client.aclose()

    run(body())


# -- sampling ------------------------------------------------------------------------------------------------

def test_sampling_is_deterministic_per_flow_and_within_bounds(server: RedisServer, name: str) -> None:
    ids = flow_ids(300, seed=11)
    picked = [f for f in ids if sampled(f, 0.1)]
    assert 12 <= len(picked) <= 52, len(picked)  # Binomial(300, 0.1): mean 30, sd 5.2
    assert picked == [f for f in ids if sampled(f, 0.1)]
    assert all(0.0 <= sample_point(f) < 1.0 for f in ids)
    assert all(sampled(f, 1.0) for f in ids) and not any(sampled(f, 0.0) for f in ids)
    # the same in another process (a restarted proxy): hashing does not depend on PYTHONHASHSEED
    code = ("import sys, json; from aws_masker.events import sampled; "
            "print(json.dumps([f for f in json.load(sys.stdin) if sampled(f, 0.1)]))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True, timeout=30).stdout
    assert json.loads(out) == picked

    async def body() -> None:
        sub, ps = await subscribe(server.url, name)
        client = make_redis_client(server.url)
        pub = EventPublisher(client, name, "", 1000, 0.1, 1, 1000, namespace=name)
        assert all(pub.sampled(f) == (f in picked) for f in ids)
        pub.start()
        for f in ids:
            pub.emit(mask_event(f, "h", "/", 1, {"aws-arn": 1}, 0.1, 10))
            pub.emit(unmask_event(f, "h", "/", 1, {"aws-arn": 1}, 0.1, 10, streamed=False))
            pub.emit(block_event(f, "h", "/", 502, "upstream"))  # never sampled out
        expected = 2 * len(picked) + len(ids)
        got = unpacked(await collect(ps, expected))
        await asyncio.sleep(0.2)
        got += unpacked(await collect(ps, 1, timeout=0.2))  # nothing more arrives
        assert len(got) == expected
        by_type: dict[str, list[str]] = {}
        for e in got:
            by_type.setdefault(e["type"], []).append(e["flow_id"])
        assert by_type["mask"] == picked and by_type["unmask"] == picked  # both or neither, per flow
        assert by_type["block"] == ids
        assert pub.sampled_out == 2 * (len(ids) - len(picked))
        # the statistics count every event, sampled out or not
        await pub.aclose()
        hour = int(time.time() // 3600)
        stats = {k.decode(): int(v) for k, v in (await client.hgetall(stats_key(name, hour))).items()}
        assert stats["events"] == 900 and stats["type:mask"] == 300 and stats["rule:aws-arn"] == 300
        assert stats["restored:aws-arn"] == 300 and stats["block:502"] == 300
        await ps.aclose()
        await sub.aclose()
        await client.aclose()

    run(body())


def test_stats_hashes_expire(server: RedisServer, name: str) -> None:
    async def body() -> None:
        client = make_redis_client(server.url)
        pub = EventPublisher(client, "", "", 1000, 1.0, 1, 1000, stats_ttl_days=2, namespace=name)
        assert not pub.publishing
        pub.start()
        for e in sample_events(30):
            pub.emit(e)
        key = stats_key(name, int(time.time() // 3600))
        assert await wait_until(lambda: pub.pending == 0 and not pub._stats, timeout=3)
        await asyncio.sleep(0.05)
        stats = {k.decode(): int(v) for k, v in (await client.hgetall(key)).items()}
        ttl = await client.ttl(key)
        await pub.aclose()
        await client.aclose()
        assert re.fullmatch(rf"{name}:stats:\d{{10}}", key)
        assert stats == {"events": 30, "type:mask": 10, "type:unmask": 10, "type:block": 10,
                         "ids:mask": 120, "ids:unmask": 120, "bytes:mask": 164000, "bytes:unmask": 21000,
                         "rule:aws-arn": 30, "rule:aws-ec2-instance-id": 90, "restored:aws-arn": 30,
                         "restored:aws-ec2-instance-id": 90, "block:503": 10}
        assert 2 * 86400 - 60 < ttl <= 2 * 86400

    run(body())


def test_emit_never_raises_on_bad_events(server: RedisServer, name: str) -> None:
    async def body() -> None:
        client = make_redis_client(server.url)
        pub = EventPublisher(client, name, "", 1000, 1.0, 1, 1000, namespace=name)
        sub, ps = await subscribe(server.url, name)
        for bad in ({}, {"type": "mask", "ts": "x"}, {"type": "mask", "rules": 5}, {"type": "bogus"}, None):
            pub.emit(bad)  # type: ignore[arg-type, unused-ignore]
        assert pub.emit_errors == 5 and pub.pending == 0
        loop: list[Any] = []
        loop.append(loop)
        pub.emit({"type": "mask", "flow_id": loop})  # cannot be encoded: dropped, not retried forever
        pub.emit(mask_event("good", "h", "/", 1, {}, 0.1, 1))
        pub.start()
        [m] = await collect(ps, 1)
        assert m["flow_id"] == "good" and pub.emit_errors == 6 and pub.dropped == 1
        assert await wait_until(lambda: pub.connected)
        await pub.aclose()
        await ps.aclose()
        await sub.aclose()
        await client.aclose()

    run(body())


# -- Redis away, slow or paused ------------------------------------------------------------------------------

def test_redis_down_emit_stays_fast_queue_bounded_and_recovers(own_server: RedisServer, name: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    stream = name + ":stream"
    caplog.set_level(logging.INFO, logger=ev_mod.__name__)

    async def body() -> None:
        client = make_redis_client(own_server.url)
        pub = EventPublisher(client, name, stream, 1000, 1.0, 1, 1000, queue_size=100, namespace=name,
                             backoff_max=0.5)
        pub.start()
        pub.emit(mask_event("before", "h", "/", 1, {}, 0.1, 1))
        assert await wait_until(lambda: pub.published == 1)
        own_server.stop()
        worst = 0.0
        for i, e in enumerate(sample_events(500)):
            t0 = time.perf_counter()
            pub.emit(e)
            worst = max(worst, time.perf_counter() - t0)
            if i % 50 == 0:
                await asyncio.sleep(0.02)  # let the publisher try (and fail) meanwhile
        assert worst < 0.02, worst  # a queue put; room for a GC pause on a busy machine, not for I/O
        assert await wait_until(lambda: pub.failed_flushes >= 2, timeout=3)
        assert pub.pending <= 100
        assert pub.dropped >= 400
        assert pub.published == 1 and not pub.connected
        own_server.start()
        assert await wait_until(lambda: pub.pending == 0 and pub.connected, timeout=5)
        assert pub.published + pub.dropped == 501  # queued events went out once Redis was back
        pub.emit(mask_event("after", "h", "/", 1, {}, 0.1, 1))
        assert await wait_until(lambda: pub.published + pub.dropped == 502, timeout=2)
        entries = await client.xrange(stream)  # the restarted server started empty
        assert len(entries) == pub.published - 1
        assert json.loads(entries[-1][1][b"event"])["flow_id"] == "after"
        await pub.aclose()
        await client.aclose()

    run(body())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "back" in r.getMessage()]
    assert len(warnings) == 1 and "Redis unavailable" in warnings[0].getMessage()
    assert len(infos) == 1


def test_client_pause_does_not_slow_emit(own_server: RedisServer, name: str) -> None:
    async def body() -> None:
        client = make_redis_client(own_server.url)
        pub = EventPublisher(client, name, name + ":s", 1000, 1.0, 1, 1000, namespace=name, backoff_max=0.5)
        pub.start()
        pub.emit(mask_event("warm", "h", "/", 1, {}, 0.1, 1))
        assert await wait_until(lambda: pub.published == 1)
        own_server.pause(1500)
        worst_emit = worst_lag = 0.0
        t_end = time.monotonic() + 1.2
        n = 1
        while time.monotonic() < t_end:
            for e in sample_events(20, seed=n):
                t0 = time.perf_counter()
                pub.emit(e)
                worst_emit = max(worst_emit, time.perf_counter() - t0)
                n += 1
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            worst_lag = max(worst_lag, time.perf_counter() - t0 - 0.01)
        # Waiting for the paused Redis would take the rest of its 1.5 s pause; the bounds only leave room
        # for a busy machine (GC, other tests), not for a round trip to Redis.
        assert worst_emit < 0.1, worst_emit
        assert worst_lag < 0.5, worst_lag  # the event loop never waited for Redis
        assert pub.published == 1  # nothing got through during the pause
        assert await wait_until(lambda: pub.published == n and pub.pending == 0, timeout=6)
        await pub.aclose()
        await client.aclose()

    run(body())


def test_shared_pool_uses_at_most_two_connections(own_server: RedisServer, name: str) -> None:
    """The publisher uses ONE connection of the shared pool; with the store's traffic the proxy has <= 2."""
    seen: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        with own_server.client() as admin:
            while not stop.is_set():
                seen.append(sum(1 for c in admin.client_list() if c.get("name") == "aws-masker"))
                time.sleep(0.002)

    async def body() -> tuple[int, int]:
        client = make_redis_client(own_server.url, max_connections=2)
        pub = EventPublisher(client, name, name + ":s", 1000, 1.0, 1, 1000, namespace=name)
        pub.start()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()

        # publisher alone
        for i, e in enumerate(sample_events(1000)):
            pub.emit(e)
            if i % 50 == 0:
                await asyncio.sleep(0.001)
        assert await wait_until(lambda: pub.published == 1000, timeout=5)
        await asyncio.sleep(0.02)
        alone = max(seen)

        async def store_load() -> None:  # the store's traffic on the same client
            for i in range(50):
                await client.set(f"{name}:k{i % 5}", i)
                await client.get(f"{name}:k{i % 5}")

        loads = [asyncio.create_task(store_load()) for _ in range(8)]
        for i, e in enumerate(sample_events(1000, seed=2)):
            pub.emit(e)
            if i % 50 == 0:
                await asyncio.sleep(0.001)
        await asyncio.gather(*loads)
        assert await wait_until(lambda: pub.published == 2000, timeout=5)
        await asyncio.sleep(0.02)
        stop.set()
        poller.join(2)
        await pub.aclose()
        await client.aclose()
        return alone, max(seen)

    alone, shared = run(body())
    assert alone == 1, alone
    assert 1 <= shared <= 2, shared


# -- the monitor ---------------------------------------------------------------------------------------------

class MonitorProc:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "aws_masker.monitor", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.err.append), daemon=True).start()

    @staticmethod
    def _read(stream: Any, sink: Any) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def read(self, n: int, timeout: float = 5.0) -> list[str]:
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.lines.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                break
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            time.sleep(0.05)  # let the reader threads take the last lines


def wait_subscribed(srv: RedisServer, channel: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with srv.client() as c:
        while time.monotonic() < deadline:
            try:
                if dict(c.pubsub_numsub(channel)).get(channel.encode(), 0) >= 1:
                    return
            except Exception:
                pass
            time.sleep(0.02)
    raise AssertionError(f"nobody subscribed to {channel}")


def publish(srv: RedisServer, events: list[dict[str, Any]], channel: str = "", stream: str = "",
            batch_size: int = 1, namespace: str = "aws-masker") -> None:
    async def body() -> None:
        client = make_redis_client(srv.url)
        pub = EventPublisher(client, channel, stream, 1000, 1.0, batch_size, 50, namespace=namespace)
        pub.start()
        for e in events:
            pub.emit(e)
        await pub.aclose()
        await client.aclose()
        assert pub.published == (len(events) if pub.publishing else 0) and pub.dropped == 0

    run(body())


@pytest.mark.timeout(60)
def test_monitor_json_lines(server: RedisServer, name: str) -> None:
    mon = MonitorProc("--redis", server.url, "--channel", name, "--json", "--max-per-sec", "0")
    try:
        wait_subscribed(server, name)
        sent = sample_events(12)
        publish(server, sent, channel=name, batch_size=5)
        lines = mon.read(12)
        got = [json.loads(line) for line in lines]
        assert [g["flow_id"] for g in got] == [e["flow_id"] for e in sent]
        assert all(g["type"] in ("mask", "unmask", "block") for g in got)  # batches unpacked
        assert got[0]["rules"] == RULES
    finally:
        rc = mon.stop()
    assert rc == 0
    assert any("12 events seen, 0 skipped" in line for line in mon.err), mon.err


@pytest.mark.timeout(60)
def test_monitor_readable_lines_and_rate_limit(server: RedisServer, name: str) -> None:
    mon = MonitorProc("--redis", server.url, "--channel", name, "--max-per-sec", "5")
    try:
        wait_subscribed(server, name)
        publish(server, sample_events(40), channel=name, batch_size=10)
        lines = mon.read(6, timeout=4)
    finally:
        rc = mon.stop()
    assert rc == 0
    assert len(lines) == 6, lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d mask    api\.anthropic\.com /v1/messages  12 ids "
                        r"\(aws-arn 3, aws-ec2-instance-id 9\)  0\.21 ms  16\.4 kB  "
                        r"\[AWS_ACCOUNT_0001, AWS_EC2_INSTANCE_0002\]", lines[0]), lines[0]
    assert "unmask  api.anthropic.com /v1/messages  12 ids" in lines[1] and "streamed" in lines[1]
    assert lines[2].endswith("block   api.openai.com /v1/chat/completions  503 "
                             "mapping store unavailable: redis timeout"), lines[2]
    assert lines[5] == "… skipped 35 events"
    assert any("40 events seen, 35 skipped" in line for line in mon.err), mon.err


@pytest.mark.timeout(60)
def test_monitor_stream_consumer_group(server: RedisServer, name: str) -> None:
    stream, group = name + ":stream", "g-" + name
    mon = MonitorProc("--redis", server.url, "--stream", stream, "--group", group, "--json",
                      "--max-per-sec", "0")
    try:
        with server.client() as c:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    if any(g["name"] == group.encode() for g in c.xinfo_groups(stream)):
                        break
                except Exception:
                    pass
                time.sleep(0.02)
        sent = sample_events(15)
        publish(server, sent, stream=stream, batch_size=5)
        got = [json.loads(line) for line in mon.read(15)]
        assert [g["flow_id"] for g in got] == [e["flow_id"] for e in sent]
        time.sleep(0.3)
        with server.client() as c:
            assert c.xpending(stream, group)["pending"] == 0  # acknowledged
    finally:
        assert mon.stop() == 0


@pytest.mark.timeout(60)
def test_monitor_stats(server: RedisServer, name: str) -> None:
    publish(server, sample_events(30), namespace=name)
    out = subprocess.run([sys.executable, "-m", "aws_masker.monitor", "--redis", server.url, "--stats",
                          "--hours", "2", "--namespace", name], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "events: 30 (mask 10, unmask 10, block 10); identifiers masked 120, restored 120" in text, text
    assert re.search(r"identifiers masked per rule:\n  aws-ec2-instance-id +90\n  aws-arn +30\n", text), text
    assert re.search(r"blocked requests per status:\n  503 +10\n", text), text
    assert re.search(r"busiest hours \(UTC\):\n  \d{4}-\d\d-\d\d \d\d:00 +30 events", text), text


@pytest.mark.timeout(60)
def test_monitor_survives_redis_restart(own_server: RedisServer, name: str) -> None:
    mon = MonitorProc("--redis", own_server.url, "--channel", name, "--json")
    try:
        wait_subscribed(own_server, name)
        publish(own_server, [mask_event("one", "h", "/", 1, {"aws-arn": 1}, 0.1, 1)], channel=name)
        assert [json.loads(x)["flow_id"] for x in mon.read(1)] == ["one"]
        own_server.stop()
        time.sleep(0.3)
        own_server.start()
        wait_subscribed(own_server, name)
        publish(own_server, [mask_event("two", "h", "/", 1, {"aws-arn": 1}, 0.1, 1)], channel=name)
        assert [json.loads(x)["flow_id"] for x in mon.read(1)] == ["two"]
    finally:
        rc = mon.stop()
    assert rc == 0
    assert any("connection lost" in line for line in mon.err), mon.err
    assert any("reconnected" in line for line in mon.err), mon.err
    assert any("2 events seen" in line for line in mon.err), mon.err
