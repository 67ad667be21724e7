"""Load and faults through a real mitmdump with the addon: many concurrent streams, upstream resets, clients
that go away, error replies, slow upstreams, and a Redis that stalls or dies.

Every test is bounded in time and request count. A small probe addon (written to a temp dir and loaded with a
second ``-s``) answers ``http://aws-masker-probe.invalid/`` with the addon's internal state, so the tests can
check that no per-flow state is left behind. Each request carries ``x-soak-n: <n>``: its identifiers are
``aws_masker.soak.identifiers(n)``, so every request the upstream received is checked for its originals.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import fake_upstream as fu
from aws_masker.soak import (
    ANTHROPIC,
    APIS,
    OPENAI_CHAT,
    PATHS,
    RESPONSES,
    SOAK_HEADER,
    check_reply,
    identifiers,
    make_request,
    originals,
    prompt,
)
from conftest import masker_options, proxied_async_client, proxied_client
from fake_upstream import (
    FakeUpstream,
    expected_error_message,
    expected_reply_text,
    parse_sse,
    reassemble_stream,
)
from proxyproc import MitmProxy
from redisproc import RedisServer, redis_server_fixture

pytestmark = pytest.mark.mitm

PROBE_HOST = "aws-masker-probe.invalid"
PROBE_ADDON = f'''
"""Test probe: GET http://{PROBE_HOST}/ answers with the aws-masker addon's per-flow state."""
import asyncio
import gc
import json

from mitmproxy import ctx, http


def _masker():
    m = ctx.master.addons.get("awsmasker")
    if m is None:
        m = next((o for o in gc.get_objects() if type(o).__name__ == "AwsMasker"), None)
    return m


class Probe:
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.request.pretty_host != "{PROBE_HOST}":
            return
        m = _masker()
        state = {{"flows": len(m.flows), "tasks": len(m._tasks), "recent": len(m.recent),
                 "asyncio_tasks": len(asyncio.all_tasks())}}
        flow.response = http.Response.make(200, json.dumps(state), {{"content-type": "application/json"}})


addons = [Probe()]
'''
PLACEHOLDER_RE = re.compile(rb"AWS_[A-Z0-9]+(?:_[A-Z0-9]+)*_\d{4,}")
_numbers = itertools.count(1_000_000)  # identifier set numbers, fresh for every request of the module
USED: list[int] = []


def run[T](coro: Awaitable[T]) -> T:
    async def wrapped() -> T:
        return await coro

    return asyncio.run(wrapped())


def new_request(api: str, *, stream: bool, tools: bool = False) -> tuple[int, dict[str, Any]]:
    n = next(_numbers)
    USED.append(n)
    return n, make_request(api, prompt(identifiers(n)), tools=tools, stream=stream)


def headers_for(n: int, **knobs: str | int) -> dict[str, str]:
    return {SOAK_HEADER: str(n), **{"x-fake-" + k.replace("_", "-"): str(v) for k, v in knobs.items()}}


def assert_upstream_clean(upstream: FakeUpstream) -> None:
    """No request the upstream received holds an original of its identifier set."""
    for rec in upstream.requests:
        n = rec.header(SOAK_HEADER)
        if n is None:
            continue
        body = rec.body + rec.content
        leaked = [o for o in originals(identifiers(int(n))) if o.encode() in body]
        assert not leaked, f"request {n}: originals reached the upstream: {leaked}"


def assert_log_clean(proxy: MitmProxy, used: list[int] | None = None) -> None:
    out = proxy.output()
    for n in USED if used is None else used:
        leaked = [o for o in originals(identifiers(n)) if o in out]
        assert not leaked, f"originals in the proxy log: {leaked}"


def probe(proxy: MitmProxy) -> dict[str, int]:
    with proxied_client(proxy, timeout=5) as c:
        r = c.get(f"http://{PROBE_HOST}/")
    assert r.status_code == 200, r.text
    return r.json()


def wait_idle(proxy: MitmProxy, timeout: float = 10.0) -> dict[str, int]:
    """Wait until the addon holds no per-flow state; returns the last probe."""
    deadline = time.monotonic() + timeout
    while True:
        state = probe(proxy)
        if state["flows"] == 0 and state["tasks"] == 0:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"addon state not cleaned up: {state}")
        time.sleep(0.1)


def round_trip_ok(proxy: MitmProxy, upstream: FakeUpstream, api: str = ANTHROPIC,
                  stream: bool = True) -> None:
    n, req = new_request(api, stream=stream, tools=True)
    with proxied_client(proxy, timeout=10) as c:
        r = c.post(upstream.url_for(PATHS[api]), json=req, headers=headers_for(n, delta_chars=5))
    assert r.status_code == 200, r.text
    assert check_reply(fu, api, req, r.content) is None


@pytest.fixture(scope="module")
def probe_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe_addon.py"
    path.write_text(PROBE_ADDON)
    return path


@pytest.fixture(scope="module")
def proxy(start_proxy_module: Any, fake_upstream_module: FakeUpstream, probe_script: Path) -> MitmProxy:
    return start_proxy_module(extra_args=("-s", str(probe_script)), **masker_options(fake_upstream_module))


@pytest.fixture(autouse=True)
def _after_each(request: pytest.FixtureRequest) -> Iterator[None]:
    mark = len(USED)
    yield
    if "proxy" in request.fixturenames:
        proxy = request.getfixturevalue("proxy")
        assert proxy.running, "mitmdump died"
        assert_log_clean(proxy, USED[mark:])


# ---- load ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_200_concurrent_streams_are_all_exact(proxy: MitmProxy, fake_upstream: FakeUpstream) -> None:
    """200 streamed requests at once (each its own identifiers, each stream lasting 0.3-3 s): every reply is
    exact and most of them were at the upstream at the same time."""
    total = 200
    started = time.perf_counter()
    finished: dict[int, float] = {}  # n -> wall clock time the client had the whole reply

    async def body() -> list[Any]:
        limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
        async with proxied_async_client(proxy, timeout=60, limits=limits) as client:
            async def one(i: int) -> tuple[str, dict[str, Any], httpx.Response]:
                api = APIS[i % 3]
                n, req = new_request(api, stream=True, tools=i % 4 == 0)
                r = await client.post(fake_upstream.url_for(PATHS[api]), json=req,
                                      headers=headers_for(n, delta_chars=1 + i % 9, pause_ms=10))
                finished[n] = time.time()
                return api, req, r

            return await asyncio.gather(*(one(i) for i in range(total)), return_exceptions=True)

    results = run(body())
    elapsed = time.perf_counter() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of {total} failed, first: {errors[0]!r}"
    bad = []
    for api, req, r in results:
        assert r.status_code == 200, r.text
        problem = check_reply(fu, api, req, r.content)
        if problem:
            bad.append((api, problem))
    assert not bad, f"{len(bad)} replies not exact: {bad[:5]}"
    recorded = fake_upstream.requests
    assert len(recorded) == total
    assert_upstream_clean(fake_upstream)
    # streams open at once: arrived at the upstream, reply not yet complete at the client
    spans = [(rec.received_at, finished[int(rec.header(SOAK_HEADER) or 0)]) for rec in recorded]
    peak = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    # Served one by one, the peak would be a handful; half of them at once leaves room for a slow machine
    # (the masking of 200 requests arriving together is CPU work done one after the other: 140 seen once).
    assert peak >= total // 2, f"only {peak} streams were open at once"
    assert elapsed < 60, f"{total} streams took {elapsed:.1f}s"
    wait_idle(proxy)


# ---- upstream faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reset_after", [9, 13, 17])
@pytest.mark.parametrize("api", APIS)
def test_upstream_reset_mid_stream(proxy: MitmProxy, fake_upstream: FakeUpstream, api: str,
                                   reset_after: int) -> None:
    """The upstream sends a few events, then a TCP RST, while placeholders are being streamed (cut across
    deltas): the client sees an error or a truncated stream holding a prefix of the original text and no
    placeholder (not even part of one), and the proxy goes on serving."""
    n = next(_numbers)
    USED.append(n)
    req = make_request(api, prompt(identifiers(n)), stream=True, system="S")
    received = b""
    failed = None
    with proxied_client(proxy, timeout=10) as c:
        try:
            with c.stream("POST", fake_upstream.url_for(PATHS[api]), json=req,
                          headers=headers_for(n, reset_after=reset_after, delta_chars=3)) as r:
                assert r.status_code == 200
                for chunk in r.iter_raw():
                    received += chunk
        except httpx.HTTPError as e:
            failed = e
    parts = reassemble_stream(api, parse_sse(received, strict=False), check=False)
    assert failed is not None or not parts.complete, "a reset stream looked complete"
    assert parts.text and expected_reply_text(req).startswith(parts.text), parts.text
    assert b"AWS_" not in received, "a placeholder reached the client"
    assert_upstream_clean(fake_upstream)
    wait_idle(proxy)
    round_trip_ok(proxy, fake_upstream, api)


def test_upstream_reset_mid_body(proxy: MitmProxy, fake_upstream: FakeUpstream) -> None:
    n, req = new_request(ANTHROPIC, stream=False)
    with proxied_client(proxy, timeout=10) as c:
        try:
            r = c.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=req,
                       headers=headers_for(n, reset_after=40))
        except httpx.HTTPError:
            pass
        else:
            assert r.status_code == 502, r.text
            assert not PLACEHOLDER_RE.search(r.content)
    assert_upstream_clean(fake_upstream)
    wait_idle(proxy)
    round_trip_ok(proxy, fake_upstream, ANTHROPIC, stream=False)


@pytest.mark.parametrize("status", [400, 429, 500, 529])
@pytest.mark.parametrize("api", APIS)
def test_error_reply_is_restored(proxy: MitmProxy, fake_upstream: FakeUpstream, api: str,
                                 status: int) -> None:
    n, req = new_request(api, stream=False)
    with proxied_client(proxy) as c:
        r = c.post(fake_upstream.url_for(PATHS[api]), json=req, headers=headers_for(n, status=status))
    assert r.status_code == status
    assert r.json()["error"]["message"] == expected_error_message(req)
    assert b"AWS_" not in r.content
    assert_upstream_clean(fake_upstream)


@pytest.mark.parametrize("api", APIS)
def test_in_stream_error_event_is_restored(proxy: MitmProxy, fake_upstream: FakeUpstream, api: str) -> None:
    n, req = new_request(api, stream=True)
    with proxied_client(proxy) as c:
        r = c.post(fake_upstream.url_for(PATHS[api]), json=req, headers=headers_for(n, error_after=7,
                                                                                    delta_chars=3))
    assert r.status_code == 200
    parts = reassemble_stream(api, parse_sse(r.content), check=False)
    assert parts.error is not None and parts.error["message"] == expected_error_message(req)
    assert expected_reply_text(req).startswith(parts.text)
    assert b"AWS_" not in r.content
    assert_upstream_clean(fake_upstream)
    wait_idle(proxy)


def test_slow_upstream_does_not_hold_up_other_requests(proxy: MitmProxy, fake_upstream: FakeUpstream) -> None:
    """Five streams trickle for ~3 s each; meanwhile 40 other requests are served at normal speed."""

    async def body() -> None:
        async with proxied_async_client(proxy, timeout=30) as client:
            first_bytes = asyncio.Event()
            slow_done: list[float] = []

            async def slow() -> tuple[dict[str, Any], bytes]:
                n, req = new_request(ANTHROPIC, stream=True)
                req["messages"][0]["content"][0]["text"] = f"slow {identifiers(n)['instance']} " + "z" * 40
                req["system"] = "s"
                data = b""
                async with client.stream("POST", fake_upstream.url_for(PATHS[ANTHROPIC]), json=req,
                                         headers=headers_for(n, pause_ms=100, delta_chars=2)) as r:
                    async for chunk in r.aiter_raw():
                        data += chunk
                        first_bytes.set()
                slow_done.append(time.perf_counter())
                return req, data

            slow_tasks = [asyncio.create_task(slow()) for _ in range(5)]
            await asyncio.wait_for(first_bytes.wait(), 5)
            sem = asyncio.Semaphore(10)
            latencies: list[float] = []

            async def quick(i: int) -> None:
                api = APIS[i % 3]
                n, req = new_request(api, stream=i % 2 == 0)
                async with sem:
                    t0 = time.perf_counter()
                    r = await client.post(fake_upstream.url_for(PATHS[api]), json=req, headers=headers_for(n))
                    latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200 and check_reply(fu, api, req, r.content) is None

            await asyncio.gather(*(quick(i) for i in range(40)))
            quick_done = time.perf_counter()
            assert not slow_done, "the slow streams ended before the quick requests: not concurrent"
            assert (await asyncio.to_thread(probe, proxy))["flows"] >= 5  # the probe sees live flows
            assert max(latencies) < 2.0, f"a quick request took {max(latencies):.2f}s"
            for req, data in await asyncio.gather(*slow_tasks):
                assert reassemble_stream(ANTHROPIC, parse_sse(data)).text == expected_reply_text(req)
            assert min(slow_done) > quick_done

    run(body())
    assert_upstream_clean(fake_upstream)
    wait_idle(proxy)


# ---- client faults -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_clients_disconnecting_mid_stream_leave_no_state(proxy: MitmProxy,
                                                         fake_upstream: FakeUpstream) -> None:
    """50 clients read the start of a slow stream and hang up: the proxy stays up, drops the flows' state and
    its memory does not jump."""
    for api in APIS:  # warm-up, so the baseline includes what the first requests allocate
        for _ in range(3):
            round_trip_ok(proxy, fake_upstream, api)
    baseline = proxy.rss_kib()

    async def body() -> int:
        cut = 0
        sem = asyncio.Semaphore(10)
        async with proxied_async_client(proxy, timeout=15) as client:
            async def one(i: int) -> None:
                nonlocal cut
                api = APIS[i % 3]
                n, req = new_request(api, stream=True, tools=True)
                async with sem, client.stream("POST", fake_upstream.url_for(PATHS[api]), json=req,
                                              headers=headers_for(n, pause_ms=50, delta_chars=2)) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_raw():
                        cut += 1
                        break  # leave the block: httpx closes the connection mid-stream

            await asyncio.gather(*(one(i) for i in range(50)))
        return cut

    assert run(body()) == 50
    state = wait_idle(proxy, timeout=15)
    grown_mib = (proxy.rss_kib() - baseline) / 1024
    round_trip_ok(proxy, fake_upstream, OPENAI_CHAT)
    round_trip_ok(proxy, fake_upstream, RESPONSES, stream=False)
    assert grown_mib < 25, f"RSS grew by {grown_mib:.1f} MiB after 50 abandoned streams ({state})"
    assert_upstream_clean(fake_upstream)


# ---- Redis faults ----------------------------------------------------------------------------------------


@pytest.fixture
def redis_srv() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


def _assert_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    err = r.json()
    assert err["type"] == "error" and "store unavailable" in err["error"]["message"]
    assert b"AWS_" not in r.content


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_redis_paused_or_killed_fails_closed(start_proxy: Any, fake_upstream: FakeUpstream,
                                             probe_script: Path, redis_srv: RedisServer) -> None:
    """Redis store proxy: requests that need the store get 503 while Redis is paused or dead and nothing
    reaches the upstream; streams already in flight finish exactly; it recovers when Redis is back. A memory
    store proxy that only sends events to the same Redis keeps serving throughout."""
    extra = ("-s", str(probe_script))
    store_proxy = start_proxy(extra_args=extra,
                              **masker_options(fake_upstream, masker_redis_url=redis_srv.url))
    events_proxy = start_proxy(extra_args=extra, **masker_options(fake_upstream, masker_store="memory",
                                                                  masker_redis_url=redis_srv.url))
    mark = len(USED)
    blocked: list[int] = []

    async def phase(fault: str) -> None:
        async with proxied_async_client(store_proxy, timeout=20) as sc, \
                proxied_async_client(events_proxy, timeout=20) as ec:

            async def send(client: httpx.AsyncClient, api: str, stream: bool, **knobs: Any
                           ) -> tuple[int, dict[str, Any], httpx.Response, float]:
                n, req = new_request(api, stream=stream)
                t0 = time.perf_counter()
                r = await client.post(fake_upstream.url_for(PATHS[api]), json=req,
                                      headers=headers_for(n, **knobs))
                return n, req, r, time.perf_counter() - t0

            # streams already masked and in flight when the fault starts (~2 s each)
            in_flight = [asyncio.create_task(send(c, api, True, pause_ms=60, delta_chars=8))
                         for c in (sc, ec) for api in APIS]
            await asyncio.sleep(0.3)
            if fault == "pause":
                redis_srv.pause(3000)
            else:
                redis_srv.stop()
            during = await asyncio.gather(*(send(c, APIS[i % 3], i % 2 == 0)
                                            for c in (sc, ec) for i in range(8)))
            for n, _req, r, _secs in during[:8]:  # the Redis store proxy: fail closed
                _assert_503(r)
                blocked.append(n)
            for _n, req, r, secs in during[8:]:  # memory store, events only: unaffected
                api = _api_of(req)
                assert r.status_code == 200, r.text
                assert check_reply(fu, api, req, r.content) is None
                assert secs < 2.0, f"memory store proxy took {secs:.2f}s while Redis was {fault}d"
            for _n, req, r, _ in await asyncio.gather(*in_flight):
                assert r.status_code == 200, r.text
                assert check_reply(fu, _api_of(req), req, r.content) is None
        if fault == "kill":
            redis_srv.start()  # same port, empty data set

    for fault in ("pause", "kill"):
        run(phase(fault))
        # recovered (pause over, or Redis restarted): the Redis store proxy masks again
        deadline = time.monotonic() + 10
        while True:
            n, req = new_request(ANTHROPIC, stream=True)
            with proxied_client(store_proxy) as c:
                r = c.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=req, headers=headers_for(n))
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            blocked.append(n)
            time.sleep(0.2)
        assert r.status_code == 200 and check_reply(fu, ANTHROPIC, req, r.content) is None

    seen = {int(rec.header(SOAK_HEADER) or -1) for rec in fake_upstream.requests}
    assert not seen & set(blocked), "a request answered with 503 reached the upstream"
    assert_upstream_clean(fake_upstream)
    for p in (store_proxy, events_proxy):
        assert p.running
        wait_idle(p)
        assert_log_clean(p, USED[mark:])
    assert store_proxy.find_log(r"blocked .* 503")


def _api_of(req: dict[str, Any]) -> str:
    if "input" in req:
        return RESPONSES
    return ANTHROPIC if "max_tokens" in req else OPENAI_CHAT

