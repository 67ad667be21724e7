"""The Redis mapping store end to end: real redis-server processes and real mitmdump subprocesses, no mocks.

Several proxies share one Redis: they agree on placeholders (also after a restart and under concurrent
first use), keep their namespaces apart, never put an original into a key name (nor, with
masker_store_key, into a value), give every mapping a TTL, and fail closed (503, nothing forwarded) while
Redis is down, killed, restarting or paused, recovering by themselves when it is back.

One redis-server serves the module (FLUSHALL before each test); the fault tests use a second one of their
own. Fresh random identifiers per test keep tests independent of each other's mappings.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from aws_masker.placeholders import TOKEN_RE
from conftest import masker_options, proxied_client
from fake_upstream import (
    RESPONSES,
    FakeUpstream,
    expected_reply_text,
    parse_sse,
    reassemble_stream,
    reply_parts,
)
from proxyproc import MitmProxy
from redisproc import RedisServer, redis_server_fixture, require_redis_server
from test_proxy import ORIGINALS, PATHS, SYSTEM, TEXT, assert_no_original, make_request

pytestmark = [pytest.mark.mitm, pytest.mark.timeout(120)]

SECRET = "redis-proxy-test store secret 0001"
FILE_SECRET = "another store secret, read from a file"
TTL_AB = 3600
TTL_N = 7200
NS_AB, NS_N, NS_E = "aws-masker", "team-b", "team-enc"
FAULT_LIMIT_S = 3.0  # a request must be answered (503) this fast while Redis is down or paused
RECOVER_S = 10.0  # ... and succeed again within this long once Redis is back

SENT: set[str] = set()  # every original sent in this module, for the final log check
ALL_PROXIES: list[MitmProxy] = []


def fresh_ids(n: int, prefixes: tuple[str, ...] = ("i-", "sg-", "vol-")) -> list[str]:
    """``n`` never-seen identifiers, cycling through ``prefixes`` (17 hex digits each)."""
    out = [f"{prefixes[i % len(prefixes)]}{secrets.token_hex(9)[:17]}" for i in range(n)]
    SENT.update(out)
    return out


def echo(client: httpx.Client, upstream: FakeUpstream, text: str) -> httpx.Response:
    """POST ``text`` as text/plain to the echo endpoint (the upstream sends the masked body back)."""
    return client.post(upstream.url_for("/echo"), content=text.encode(),
                       headers={"content-type": "text/plain"})


def masked_via(proxy: MitmProxy, upstream: FakeUpstream, text: str) -> str:
    """What the upstream receives when ``text`` goes through ``proxy`` (and check the reply is restored)."""
    upstream.clear()
    with proxied_client(proxy) as c:
        r = echo(c, upstream, text)
    assert r.status_code == 200, r.text
    assert r.text == text
    return upstream.last_request.text()


def tokens(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [t.decode() for t in TOKEN_RE.findall(data)]


def assert_logs_clean(proxies: list[MitmProxy], originals: set[str] | list[str]) -> None:
    for p in proxies:
        leaked = [line for line in p.log_lines for o in originals if o in line]
        assert not leaked, f"an original appears in the proxy log: {leaked[:3]}"


def all_keys(srv: RedisServer) -> list[bytes]:
    with srv.client() as c:
        return sorted(c.scan_iter(count=1000))


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@pytest.fixture(autouse=True)
def _flush(request: pytest.FixtureRequest) -> None:
    if "proxies" in request.fixturenames:  # the fault tests have a Redis of their own
        with request.getfixturevalue("redis_srv").client() as c:
            c.flushall()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store-key") / "masker.key"
    path.write_text(FILE_SECRET + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Proxies:
    a: MitmProxy  # namespace aws-masker, no store key (shared generated HMAC key, plain values)
    b: MitmProxy  # the same namespace and options as a
    n: MitmProxy  # namespace team-b, unmask scope namespace, store key from a file
    e: MitmProxy  # namespace team-enc, store key given as the secret itself


@pytest.fixture(scope="module")
def proxies(start_proxy_module, fake_upstream_module, redis_srv, key_file) -> Proxies:
    # These tests check what Redis holds after each request, with Redis flushed between tests (as if it lost
    # its data): the proxies ask Redis every time. What a proxy remembers is tested with the fault proxy.
    common = masker_options(fake_upstream_module, masker_redis_url=redis_srv.url, masker_redis_remember=0)
    configs = [
        dict(common, masker_ttl=TTL_AB, masker_env="development"),
        dict(common, masker_ttl=TTL_AB),
        dict(common, masker_namespace=NS_N, masker_ttl=TTL_N, masker_unmask_scope="namespace",
             masker_store_key=str(key_file), masker_env="development"),
        dict(common, masker_namespace=NS_E, masker_store_key=SECRET),
    ]
    with ThreadPoolExecutor(len(configs)) as pool:  # each start compiles the catalog: do it in parallel
        started = list(pool.map(lambda opts: start_proxy_module(**opts), configs))
    ALL_PROXIES.extend(started)
    return Proxies(*started)


# ---- shared placeholders ------------------------------------------------------------------------------


def test_two_proxies_give_the_same_placeholder(proxies, fake_upstream) -> None:
    req = make_request("anthropic")
    bodies = []
    for proxy in (proxies.a, proxies.b, proxies.a):
        with proxied_client(proxy) as c:
            r = c.post(fake_upstream.url_for(PATHS["anthropic"]), json=req)
        assert r.status_code == 200, r.text
        assert reply_parts("anthropic", r.json()).text == expected_reply_text(req)
        bodies.append(fake_upstream.last_request.json())
    assert_no_original(fake_upstream)
    assert bodies[0] == bodies[1] == bodies[2]
    assert len(set(tokens(json.dumps(bodies[0])))) == 7  # one placeholder per original of TEXT
    # the other way round: an identifier new to both, first seen by b
    ids = fresh_ids(3)
    text = "check " + " ".join(ids)
    assert masked_via(proxies.b, fake_upstream, text) == masked_via(proxies.a, fake_upstream, text)
    SENT.update(ORIGINALS)
    assert_logs_clean([proxies.a, proxies.b], SENT)


def test_restarted_proxy_keeps_placeholders(proxies, fake_upstream) -> None:
    """The restart comes after Redis lost its data (the FLUSHALL before this test, like a Redis restart
    without persistence) while both proxies kept running: the restarted proxy must still agree with b."""
    ids = fresh_ids(4)
    text = "instances " + ", ".join(ids)
    before_a = masked_via(proxies.a, fake_upstream, text)
    before_b = masked_via(proxies.b, fake_upstream, text)
    assert before_a == before_b and len(set(tokens(before_a))) == 4
    old_pid = proxies.a.pid
    proxies.a.restart()
    assert proxies.a.pid != old_pid
    assert masked_via(proxies.a, fake_upstream, text) == before_a
    # an identifier the restarted proxy mints is known to b as well
    more = fresh_ids(2)
    text2 = " and ".join(more)
    assert masked_via(proxies.a, fake_upstream, text2) == masked_via(proxies.b, fake_upstream, text2)
    assert_logs_clean([proxies.a, proxies.b], SENT)


def test_concurrent_first_use_mints_once(proxies, fake_upstream, redis_srv) -> None:
    """12 clients over two proxies send the same 30 new identifiers at the same moment: one masking."""
    ids = fresh_ids(30)
    text = "Inventory:\n" + "\n".join(f"{n:02d}: {i}" for n, i in enumerate(ids))
    req = make_request("anthropic", text)
    nclients = 12
    barrier = threading.Barrier(nclients)

    def client(k: int) -> httpx.Response:
        proxy = proxies.a if k % 2 == 0 else proxies.b
        with proxied_client(proxy) as c:
            barrier.wait()
            return c.post(fake_upstream.url_for(PATHS["anthropic"]), json=req)

    with ThreadPoolExecutor(nclients) as pool:
        replies = list(pool.map(client, range(nclients)))
    for r in replies:
        assert r.status_code == 200, r.text
        assert reply_parts("anthropic", r.json()).text == expected_reply_text(req)
    assert len(fake_upstream.requests) == nclients
    assert_no_original(fake_upstream, ids)
    seen = []
    for rec in fake_upstream.requests:
        user_text = rec.json()["messages"][0]["content"][0]["text"]
        toks = tokens(user_text)
        assert len(toks) == 30 and len(set(toks)) == 30
        seen.append(toks)
    assert all(t == seen[0] for t in seen), "two placeholders for one identifier"
    with redis_srv.client() as c:  # exactly one number minted per identifier (+ the account in SYSTEM)
        counters = {k.decode(): int(c.get(k)) for k in c.scan_iter(match=f"{NS_AB}:ctr:*")}
        assert sum(1 for _ in c.scan_iter(match=f"{NS_AB}:fwd:*")) == 31
        assert sum(1 for _ in c.scan_iter(match=f"{NS_AB}:rev:*")) == 31
    assert counters == {f"{NS_AB}:ctr:{kind}": n for kind, n in
                        (("EC2_INSTANCE", 10), ("SECURITY_GROUP", 10), ("EBS_VOLUME", 10), ("ACCOUNT", 1))}
    assert_logs_clean([proxies.a, proxies.b], ids)


# ---- what Redis holds -----------------------------------------------------------------------------------


def test_redis_holds_no_original_in_key_names_and_every_mapping_expires(proxies, fake_upstream,
                                                                         redis_srv) -> None:
    ids = fresh_ids(6)
    originals = [*ORIGINALS, *ids]
    text = TEXT + "\nalso " + " ".join(ids)
    for proxy in (proxies.a, proxies.b, proxies.n, proxies.e):
        masked_via(proxy, fake_upstream, text)
    assert_no_original(fake_upstream, originals)
    keys = all_keys(redis_srv)
    assert keys
    leaked = [k for k in keys for o in originals if o.encode() in k]
    assert not leaked, f"originals in key names: {leaked}"
    ttl_limit = {NS_AB: TTL_AB, NS_N: TTL_N, NS_E: 604800}
    mapping_keys = 0
    with redis_srv.client() as c:
        for k in keys:
            ns, kind = k.decode().split(":")[:2]
            if kind in ("fwd", "rev"):
                mapping_keys += 1
                assert 0 < c.ttl(k) <= ttl_limit[ns], (k, c.ttl(k))
            elif kind == "ctr":
                assert c.ttl(k) == -1  # counters never expire (numbers are never handed out twice)
        # 7 + 6 identifiers, forward and reverse, in each of the three namespaces
        assert mapping_keys == 3 * 2 * 13
        plain = b"".join(c.get(k) or b"" for k in keys if k.startswith(f"{NS_AB}:rev:".encode()))
        # without masker_store_key the originals are stored as they are (the check below has teeth)
        assert all(o.encode() in plain for o in originals)
        for k in keys:
            if not k.startswith((f"{NS_N}:".encode(), f"{NS_E}:".encode())):
                continue
            kind = c.type(k)
            if kind == b"string":
                values = [c.get(k) or b""]
            elif kind == b"hash":
                values = [b"".join(x for kv in c.hgetall(k).items() for x in kv)]
            else:
                values = []
            bad = [o for v in values for o in originals if o.encode() in v]
            assert not bad, f"{k!r} holds originals {bad} although masker_store_key is set"
    assert_logs_clean([proxies.a, proxies.b, proxies.n, proxies.e], originals)


def test_namespaces_use_disjoint_key_prefixes(proxies, fake_upstream, redis_srv) -> None:
    x, y = fresh_ids(2, ("i-",))
    assert masked_via(proxies.a, fake_upstream, f"host {x}") == "host AWS_EC2_INSTANCE_0001"
    keys_a = set(all_keys(redis_srv))
    assert keys_a and all(k.startswith(f"{NS_AB}:".encode()) for k in keys_a)
    # team-b counts on its own: the same number, for another original
    assert masked_via(proxies.n, fake_upstream, f"host {y}") == "host AWS_EC2_INSTANCE_0001"
    keys_n = set(all_keys(redis_srv)) - keys_a
    assert keys_n and all(k.startswith(f"{NS_N}:".encode()) for k in keys_n)
    # the same original in team-b gets team-b's own mapping, under team-b's keys
    assert masked_via(proxies.n, fake_upstream, f"host {x}") == "host AWS_EC2_INSTANCE_0002"
    assert all(k.startswith(f"{NS_N}:".encode()) for k in set(all_keys(redis_srv)) - keys_a)
    # team-b (namespace scope) restores its own AWS_EC2_INSTANCE_0001 (y), never aws-masker's (x)
    with proxied_client(proxies.n) as c:
        assert echo(c, fake_upstream, "was AWS_EC2_INSTANCE_0001").text == f"was {y}"
    assert_logs_clean([proxies.a, proxies.n], [x, y])


# ---- unmask scope ---------------------------------------------------------------------------------------


def test_namespace_scope_restores_placeholders_of_earlier_requests(proxies, fake_upstream) -> None:
    (x,) = fresh_ids(1, ("i-",))
    (p,) = tokens(masked_via(proxies.n, fake_upstream, f"look at {x}"))
    with proxied_client(proxies.n) as c:
        # echo: the reply mentions p, which this request does not contain
        fake_upstream.clear()
        r = echo(c, fake_upstream, f"status of {p}?")
        assert fake_upstream.last_request.text() == f"status of {p}?"  # a typed placeholder is sent as is
        assert r.text == f"status of {x}?"
        # Responses API, non-streamed and streamed (the stream uses the placeholders this proxy minted)
        req = make_request(RESPONSES, f"Is {p} healthy?")
        want = SYSTEM + f"\nIs {x} healthy?"
        r = c.post(fake_upstream.url_for(PATHS[RESPONSES]), json=req)
        assert r.status_code == 200 and reply_parts(RESPONSES, r.json()).text == want
        r = c.post(fake_upstream.url_for(PATHS[RESPONSES]), json={**req, "stream": True})
        assert r.status_code == 200 and reassemble_stream(RESPONSES, parse_sse(r.content)).text == want
    SENT.update(ORIGINALS)
    assert_logs_clean([proxies.n], SENT)


def test_request_scope_leaves_placeholders_of_earlier_requests(proxies, fake_upstream) -> None:
    (x,) = fresh_ids(1, ("i-",))
    (p,) = tokens(masked_via(proxies.a, fake_upstream, f"look at {x}"))
    with proxied_client(proxies.a) as c:
        assert echo(c, fake_upstream, f"status of {p}?").text == f"status of {p}?"
        req = make_request(RESPONSES, f"Is {p} healthy?")
        r = c.post(fake_upstream.url_for(PATHS[RESPONSES]), json=req)
        assert r.status_code == 200
        assert reply_parts(RESPONSES, r.json()).text == SYSTEM + f"\nIs {p} healthy?"
    # nor does a namespace-scope proxy restore a placeholder of another namespace
    (v,) = fresh_ids(1, ("vpc-",))
    (pv,) = tokens(masked_via(proxies.a, fake_upstream, f"in {v}"))
    with proxied_client(proxies.n) as c:
        assert echo(c, fake_upstream, f"in {pv}").text == f"in {pv}"
    assert_logs_clean([proxies.a, proxies.n], [x, v])


# ---- faults -----------------------------------------------------------------------------------------


@dataclass
class Fault:
    srv: RedisServer  # not running when the proxy starts
    proxy: MitmProxy


@pytest.fixture(scope="module")
def fault(start_proxy_module, fake_upstream_module) -> Iterator[Fault]:
    require_redis_server()
    srv = RedisServer()
    try:
        proxy = start_proxy_module(**masker_options(fake_upstream_module, masker_redis_url=srv.url))
        ALL_PROXIES.append(proxy)
        yield Fault(srv, proxy)
    finally:
        srv.close()


def timed_echo(proxy: MitmProxy, upstream: FakeUpstream, text: str) -> tuple[httpx.Response, float]:
    with proxied_client(proxy) as c:
        t0 = time.perf_counter()
        r = echo(c, upstream, text)
        return r, time.perf_counter() - t0


def assert_fails_closed(f: Fault, upstream: FakeUpstream, needle: str = "store unavailable") -> None:
    upstream.clear()
    (x,) = fresh_ids(1)
    r, took = timed_echo(f.proxy, upstream, f"ping {x}")
    assert r.status_code == 503, r.text
    assert needle in r.json()["error"]["message"]
    assert took < FAULT_LIMIT_S, f"the 503 took {took:.2f}s"
    assert upstream.requests == [], "a request reached the upstream while the store was unavailable"


def wait_until_ok(f: Fault, upstream: FakeUpstream, timeout: float = RECOVER_S) -> float:
    """Poll until a request with an identifier goes through; returns how long it took."""
    t0 = time.monotonic()
    while True:
        upstream.clear()
        (x,) = fresh_ids(1)
        r, _ = timed_echo(f.proxy, upstream, f"ping {x}")
        if r.status_code == 200:
            assert r.text == f"ping {x}" and x.encode() not in upstream.last_request.body
            return time.monotonic() - t0
        assert r.status_code == 503 and "store unavailable" in r.json()["error"]["message"], r.text
        assert upstream.requests == []
        assert time.monotonic() - t0 < timeout, f"still 503 after {timeout}s: {r.text}"
        time.sleep(0.2)


def test_redis_down_at_start_fails_closed(fault, fake_upstream) -> None:
    fault.srv.stop()
    assert_fails_closed(fault, fake_upstream)
    # a request with nothing to mask needs no store
    r, _ = timed_echo(fault.proxy, fake_upstream, "hello, nothing to mask")
    assert r.status_code == 200
    fault.srv.start()
    wait_until_ok(fault, fake_upstream)
    assert_logs_clean([fault.proxy], SENT)


def test_redis_killed_mid_run_then_restarted_on_the_same_port(fault, fake_upstream) -> None:
    fault.srv.start()
    wait_until_ok(fault, fake_upstream)
    starts, pid = fault.proxy.starts, fault.proxy.pid
    fault.srv.stop(kill=True)
    assert_fails_closed(fault, fake_upstream)
    assert_fails_closed(fault, fake_upstream)  # and again, with the pool's connection gone
    fault.srv.start()  # same port, empty data set
    took = wait_until_ok(fault, fake_upstream)
    assert took < RECOVER_S
    assert (fault.proxy.starts, fault.proxy.pid) == (starts, pid), "the proxy was restarted"
    assert fault.proxy.find_log(r"blocked .* 503")
    assert_logs_clean([fault.proxy], SENT)


def test_redis_client_pause_fails_fast_then_recovers(fault, fake_upstream) -> None:
    fault.srv.start()
    wait_until_ok(fault, fake_upstream)
    fault.srv.pause(2500)
    paused_at = time.monotonic()
    assert_fails_closed(fault, fake_upstream, "redis timeout")
    took = wait_until_ok(fault, fake_upstream)
    assert time.monotonic() - paused_at < 2.5 + RECOVER_S, took
    assert_logs_clean([fault.proxy], SENT)


def test_a_proxy_remembers_mappings_no_round_trip_and_masks_while_redis_is_down(fault, fake_upstream) -> None:
    """A conversation resends its identifiers every turn: the proxy (masker_redis_remember, 60 s by default)
    answers the mappings it got from Redis without asking again, so such a request costs no round trip and
    is masked even while Redis is down; a new identifier still needs Redis (503 without it)."""
    fault.srv.start()
    wait_until_ok(fault, fake_upstream)
    ids = fresh_ids(5)
    text = "turn: " + " ".join(ids)
    first = masked_via(fault.proxy, fake_upstream, text)
    assert len(set(tokens(first))) == 5

    def scripts_run() -> int:
        with fault.srv.client() as c:
            return int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    before = scripts_run()
    assert masked_via(fault.proxy, fake_upstream, text) == first
    assert scripts_run() == before, "a request of remembered identifiers went to Redis"
    fault.srv.stop()
    assert masked_via(fault.proxy, fake_upstream, text) == first
    assert_fails_closed(fault, fake_upstream)  # a fresh identifier
    fault.srv.start()
    wait_until_ok(fault, fake_upstream)
    assert_logs_clean([fault.proxy], SENT)


# ---- logs -------------------------------------------------------------------------------------------------


def test_no_proxy_log_line_holds_an_original() -> None:
    """Over everything this module sent through every proxy (development mode on two of them)."""
    if not ALL_PROXIES:
        pytest.skip("no proxy ran in this module")
    assert_logs_clean(ALL_PROXIES, SENT | set(ORIGINALS))
    assert sum(len(p.log_lines) for p in ALL_PROXIES) > 0
