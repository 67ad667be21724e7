"""RedisStore against a real redis-server subprocess (never the Redis on 6379; no mocks)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aws_masker.placeholders import format_placeholder
from aws_masker.redis_store import (
    LOOKUP_OR_MINT_SHA,
    RedisStore,
    keys_from_secret,
    load_store_key,
    make_redis_client,
)
from aws_masker.store import MemoryStore, StoreUnavailable
from conftest import run
from redisproc import RedisServer

SECRET = "correct horse battery staple 1"
KEYS = keys_from_secret(SECRET)


@pytest.fixture
def ns() -> str:
    return "t-" + uuid.uuid4().hex[:12]


def store(srv: RedisServer | str, ns: str, secret: str = SECRET, encrypt: bool = True,
          previous: tuple[str, ...] = (), **kw: Any) -> RedisStore:
    """A store that asks Redis for every call (most tests check what Redis holds and does); what a store
    remembers between calls is tested in its own section (remember=...)."""
    url = srv if isinstance(srv, str) else srv.url
    h, e = keys_from_secret(secret)
    kw.setdefault("remember", 0)
    return RedisStore.from_url(url, ns, hmac_key=h, enc_key=e if encrypt else None,
                               previous_keys=[keys_from_secret(p) for p in previous], **kw)


def accounts(n: int, base: int = 100000000000) -> list[tuple[str, bytes]]:
    return [("ACCOUNT", b"%012d" % (base + i)) for i in range(n)]


def ns_keys(srv: RedisServer, ns: str) -> list[bytes]:
    with srv.client() as c:
        return sorted(c.scan_iter(match=f"{ns}:*", count=1000))


async def with_stores[T](n: int, factory: Callable[[], RedisStore],
                      body: Callable[..., Awaitable[T]]) -> T:
    stores = [factory() for _ in range(n)]
    try:
        return await body(*stores)
    finally:
        for s in stores:
            await s.close()


# -- agreement -----------------------------------------------------------------------------------------------

def test_same_original_same_placeholder_across_stores_and_restart(server: RedisServer, ns: str) -> None:
    items = [("ACCOUNT", b"123456789012"), ("IAM_ROLE", b"arn:aws:iam::123456789012:role/Admin"),
             ("ACCOUNT", b"210987654321")]

    async def body(a: RedisStore, b: RedisStore) -> None:
        first = await a.placeholders_for(items)
        assert first == [b"AWS_ACCOUNT_0001", b"AWS_IAM_ROLE_0001", b"AWS_ACCOUNT_0002"]
        assert await b.placeholders_for(items[::-1]) == first[::-1]
        assert await a.placeholders_for(items) == first
        restarted = store(server, ns)  # a proxy that restarted: new store object and client
        try:
            assert await restarted.placeholders_for(items[1:2]) == first[1:2]
        finally:
            await restarted.close()

    run(with_stores(2, lambda: store(server, ns), body))


def test_different_originals_different_placeholders(server: RedisServer, ns: str) -> None:
    items = [*accounts(50), ("EC2_INSTANCE", b"i-0123456789abcdef0"),
             ("EC2_INSTANCE", b"i-0fedcba987654321f")]

    async def body(s: RedisStore) -> None:
        out = await s.placeholders_for(items)
        assert len(set(out)) == len(items)
        assert out[:50] == [format_placeholder("ACCOUNT", i) for i in range(1, 51)]
        assert out[50:] == [b"AWS_EC2_INSTANCE_0001", b"AWS_EC2_INSTANCE_0002"]
        assert await s.placeholders_for([]) == []
        with pytest.raises(ValueError):
            await s.placeholders_for([("bad kind", b"x")])

    run(with_stores(1, lambda: store(server, ns), body))


def test_script_formats_like_format_placeholder(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        with server.client() as c:
            for n in (9998, 99_999, 1_234_566):
                c.set(s.counter_key("S3_BUCKET"), n)
                out = await s.placeholders_for([("S3_BUCKET", b"bucket-%d" % n)])
                assert out == [format_placeholder("S3_BUCKET", n + 1)]

    run(with_stores(1, lambda: store(server, ns), body))


def test_concurrent_minting_agrees(server: RedisServer, ns: str) -> None:
    ids = [("ACCOUNT", b"%012d" % random.randrange(10**11, 10**12)) for _ in range(20)]
    ids += [("IAM_USER", b"arn:aws:iam::111122223333:user/u%d" % i) for i in range(10)]
    ids = list(dict.fromkeys(ids))
    assert len(ids) == 30

    async def body(a: RedisStore, b: RedisStore) -> None:
        async def task(i: int) -> dict[tuple[str, bytes], bytes]:
            mine = ids[:]
            random.Random(i).shuffle(mine)
            got: dict[tuple[str, bytes], bytes] = {}
            for lo in range(0, 30, 10):  # a few calls per task, so calls of different tasks interleave
                part = mine[lo:lo + 10]
                got.update(zip(part, await (a, b)[i % 2].placeholders_for(part), strict=True))
            return got

        results = await asyncio.gather(*(task(i) for i in range(12)))
        assert all(r == results[0] for r in results)
        assert len(set(results[0].values())) == 30
        with server.client() as c:
            assert int(c.get(a.counter_key("ACCOUNT"))) == 20
            assert int(c.get(a.counter_key("IAM_USER"))) == 10
        assert len([k for k in ns_keys(server, ns) if b":rev:" in k]) == 30

    run(with_stores(2, lambda: store(server, ns), body))


# -- round trips ---------------------------------------------------------------------------------------------

def test_one_round_trip_per_call(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        await s.ping()  # connect (HELLO/CLIENT SETNAME...) before watching
        for items, scripts in ((accounts(100), 1), (accounts(100, base=200000000000)[:50] + accounts(50), 1),
                               (accounts(2500, base=300000000000), 3)):
            with server.monitor() as lines:
                out = await s.placeholders_for(items)
            assert len(out) == len(items)
            client_cmds = [ln for ln in lines if "[0 lua]" not in ln]
            assert len(client_cmds) == scripts, client_cmds[:5]
            assert all('"evalsha"' in ln.lower() for ln in client_cmds)
        with server.monitor() as lines:
            got = await s.originals_for([format_placeholder("ACCOUNT", i) for i in range(1, 300)])
        assert len(got) == 299
        assert [ln.split('"')[1].lower() for ln in lines] == ["mget"]

    run(with_stores(1, lambda: store(server, ns, chunk_size=1000), body))


def test_a_new_placeholder_is_never_one_the_request_holds_as_text(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        avoid = {b"AWS_ACCOUNT_0001", b"AWS_ACCOUNT_0003", b"not a placeholder"}
        assert await s.placeholders_for(accounts(2), avoid) == [b"AWS_ACCOUNT_0002", b"AWS_ACCOUNT_0004"]
        assert await s.placeholders_for(accounts(3)) == [b"AWS_ACCOUNT_0002", b"AWS_ACCOUNT_0004",
                                                         b"AWS_ACCOUNT_0005"]
        # one already minted is kept even when the request also holds it as text
        assert await s.placeholders_for(accounts(1), {b"AWS_ACCOUNT_0002"}) == [b"AWS_ACCOUNT_0002"]

    run(with_stores(1, lambda: store(server, ns), body))


def test_noscript_falls_back_to_eval(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        before = await s.placeholders_for(accounts(3))
        with server.client() as c:
            c.script_flush()
        assert await s.placeholders_for(accounts(4)) == [*before, b"AWS_ACCOUNT_0004"]
        with server.client() as c:
            assert c.script_exists(LOOKUP_OR_MINT_SHA) == [True]
            c.script_flush()
        # several script calls in one pipeline (chunks of 2 items)
        chunked = store(server, ns, chunk_size=2)
        try:
            assert await chunked.placeholders_for(accounts(5)) == [format_placeholder("ACCOUNT", i)
                                                                  for i in range(1, 6)]
        finally:
            await chunked.close()

    run(with_stores(1, lambda: store(server, ns), body))


def test_server_error_reason_has_no_original(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        with server.client() as c:
            c.set(s.counter_key("ACCOUNT"), "not a number")
        for chunk in (1000, 1):  # single script call and pipeline
            s.chunk_size = chunk
            with pytest.raises(StoreUnavailable) as ei:
                await s.placeholders_for(ORIGINALS)
            assert str(ei.value) == "redis error ERR"
        # the store keeps working for other kinds
        assert await s.placeholders_for(ORIGINALS[1:2]) == [b"AWS_IAM_ROLE_0001"]

    run(with_stores(1, lambda: store(server, ns, encrypt=False), body))


# -- what Redis holds ----------------------------------------------------------------------------------------

ORIGINALS = [("ACCOUNT", b"123456789012"), ("IAM_ROLE", b"arn:aws:iam::123456789012:role/Deploy"),
             ("EC2_INSTANCE", b"i-0abc1234def567890"), ("S3_BUCKET", b"my-secret-bucket-name")]


def _assert_leaks_nothing(srv: RedisServer, ns: str, check_values: bool) -> None:
    keys = ns_keys(srv, ns)
    assert len(keys) == 2 * len(ORIGINALS) + 4  # fwd + rev per original, one counter per kind
    with srv.client() as c:
        for k in keys:
            for _, original in ORIGINALS:
                assert original not in k
                assert b"123456789012" not in k
                if check_values:
                    assert original not in c.get(k)
                    assert original not in c.dump(k)


def test_no_original_in_key_names_or_encrypted_values(server: RedisServer, ns: str) -> None:
    run(with_stores(1, lambda: store(server, ns), lambda s: s.placeholders_for(ORIGINALS)))
    _assert_leaks_nothing(server, ns, check_values=True)


def test_plain_mode_key_names_still_clean(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        out = await s.placeholders_for(ORIGINALS)
        assert await s.originals_for(out) == {p: o for p, (_, o) in zip(out, ORIGINALS, strict=True)}

    run(with_stores(1, lambda: store(server, ns, encrypt=False), body))
    _assert_leaks_nothing(server, ns, check_values=False)
    with server.client() as c:
        assert c.get(f"{ns}:rev:AWS_ACCOUNT_0001") == b"p123456789012"  # documented plain format


def test_every_mapping_has_ttl_and_use_refreshes_it(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        out = await s.placeholders_for(ORIGINALS)
        with server.client() as c:
            keys = ns_keys(server, ns)
            for k in keys:
                ttl = c.ttl(k)
                if b":ctr:" in k:
                    assert ttl == -1  # counters never expire (documented)
                else:
                    assert 0 < ttl <= 1000
                    c.expire(k, 5)
            assert await s.placeholders_for(ORIGINALS) == out
            for k in keys:
                if b":ctr:" not in k:
                    assert c.ttl(k) > 900

    run(with_stores(1, lambda: store(server, ns, ttl=1000), body))


def test_expired_mapping_is_reminted_with_new_number(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        assert await s.placeholders_for(accounts(2)) == [b"AWS_ACCOUNT_0001", b"AWS_ACCOUNT_0002"]
        with server.client() as c:
            c.delete(*[k for k in ns_keys(server, ns) if b":ctr:" not in k])
        # numbers are never reused, even after the mappings are gone
        assert await s.placeholders_for(accounts(1)) == [b"AWS_ACCOUNT_0003"]

    run(with_stores(1, lambda: store(server, ns), body))


def test_lost_counter_never_reuses_live_number(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        first = await s.placeholders_for(accounts(3))
        with server.client() as c:
            c.delete(s.counter_key("ACCOUNT"))  # e.g. evicted under a wrong maxmemory-policy
        new = await s.placeholders_for(accounts(1, base=500000000000))
        assert new == [b"AWS_ACCOUNT_0004"]
        assert await s.originals_for(first) == {p: o for p, (_, o) in zip(first, accounts(3), strict=True)}

    run(with_stores(1, lambda: store(server, ns), body))


def test_missing_reverse_mapping_is_repaired(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        [p] = await s.placeholders_for(ORIGINALS[:1])
        with server.client() as c:
            c.delete(s.reverse_key(p))
        assert await s.originals_for([p]) == {}
        assert await s.placeholders_for(ORIGINALS[:1]) == [p]
        assert await s.originals_for([p]) == {p: ORIGINALS[0][1]}

    run(with_stores(1, lambda: store(server, ns), body))


# -- restore -------------------------------------------------------------------------------------------------

def test_originals_for_namespace_scope(server: RedisServer, ns: str) -> None:
    async def body(a: RedisStore, b: RedisStore) -> None:
        out = await a.placeholders_for(ORIGINALS)
        expected = {p: o for p, (_, o) in zip(out, ORIGINALS, strict=True)}
        # another proxy of the namespace restores what this one minted; unknown and junk are left out
        assert await b.originals_for([*out, b"AWS_ACCOUNT_9999", b"not a placeholder", out[0]]) == expected
        assert await b.originals_for([]) == {}
        other = store(server, ns + "-other")
        try:
            assert await other.originals_for(out) == {}
            assert await other.placeholders_for(ORIGINALS[:1]) == [b"AWS_ACCOUNT_0001"]
        finally:
            await other.close()

    run(with_stores(2, lambda: store(server, ns), body))


# -- keys ----------------------------------------------------------------------------------------------------

def test_key_rotation(server: RedisServer, ns: str) -> None:
    old, new = "old secret 0123456789", "new secret 9876543210"

    async def body() -> None:
        s_old = store(server, ns, secret=old)
        minted = await s_old.placeholders_for(ORIGINALS)
        expected = {p: o for p, (_, o) in zip(minted, ORIGINALS, strict=True)}
        await s_old.close()

        rotated = store(server, ns, secret=new, previous=(old,))
        assert await rotated.originals_for(minted) == expected  # old values read with the previous key
        # using two of the mappings keeps their placeholders and moves them to the new key
        assert await rotated.placeholders_for(ORIGINALS[:2]) == minted[:2]
        await rotated.close()

        new_only = store(server, ns, secret=new)
        got = await new_only.originals_for(minted)
        assert got == {p: expected[p] for p in minted[:2]}  # untouched ones need the old key (or expire)
        assert await new_only.placeholders_for(ORIGINALS[:2]) == minted[:2]
        await new_only.close()

        wrong = store(server, ns, secret="some unrelated secret!!")
        assert await wrong.originals_for(minted) == {}
        await wrong.close()

    run(body())


def test_enabling_encryption_reseals_plain_values(server: RedisServer, ns: str) -> None:
    async def body() -> None:
        plain = store(server, ns, encrypt=False)
        minted = await plain.placeholders_for(ORIGINALS)
        await plain.close()
        enc = store(server, ns)
        assert await enc.placeholders_for(ORIGINALS) == minted
        assert await enc.originals_for(minted) == {p: o for p, (_, o) in zip(minted, ORIGINALS, strict=True)}
        await enc.close()

    run(body())
    _assert_leaks_nothing(server, ns, check_values=True)


def test_keys_from_secret_and_load_store_key(tmp_path: Any) -> None:
    h, e = keys_from_secret(SECRET)
    assert len(h) == len(e) == 32 and h != e
    assert keys_from_secret(SECRET) == (h, e)
    assert keys_from_secret(SECRET + "x") != (h, e)
    with pytest.raises(ValueError):
        keys_from_secret("short")
    assert load_store_key(SECRET) == SECRET
    f = tmp_path / "key"
    f.write_text(SECRET + "\n")
    os.chmod(f, 0o600)
    assert load_store_key(str(f)) == SECRET
    with pytest.raises(ValueError, match="cannot read"):
        load_store_key(str(tmp_path / "missing"))
    # A bare file name that is not there (run from another folder) is a missing file, not the secret.
    with pytest.raises(ValueError, match=r"cannot read store key file new-long-enough-name\.key"):
        load_store_key("new-long-enough-name.key")
    with pytest.raises(ValueError, match="if you meant a file"):
        keys_from_secret("new.ky")
    f.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_store_key(str(f))


# -- what a proxy remembers ----------------------------------------------------------------------------------

def _client_commands(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "[0 lua]" not in ln]


def test_remembered_mappings_need_no_round_trip(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore, other: RedisStore) -> None:
        await s.ping()
        first = await s.placeholders_for(accounts(100))
        with server.monitor() as lines:
            again = await s.placeholders_for(list(reversed(accounts(100))))
        assert again == list(reversed(first))
        assert _client_commands(lines) == []  # a conversation's next turn: nothing new, no round trip
        new = accounts(1, base=700000000000)
        with server.monitor() as lines:
            mixed = await s.placeholders_for(accounts(50) + new)
        client = _client_commands(lines)
        assert len(client) == 1 and '"evalsha"' in client[0].lower()  # only the new one is asked
        assert mixed[:50] == first[:50] and mixed[50] == format_placeholder("ACCOUNT", 101)
        # another proxy of the namespace gets the same placeholders from Redis
        assert await other.placeholders_for(accounts(50) + new) == mixed

    run(with_stores(2, lambda: store(server, ns, remember=60), body))


def test_a_remembered_mapping_is_asked_again_after_remember_seconds(server: RedisServer, ns: str) -> None:
    clock = [1000.0]

    async def body(s: RedisStore) -> None:
        s._now = lambda: clock[0]
        out = await s.placeholders_for(ORIGINALS)
        keys = [k for k in ns_keys(server, ns) if b":ctr:" not in k]
        with server.client() as c:
            for k in keys:
                c.expire(k, 500)
            clock[0] += 29
            assert await s.placeholders_for(ORIGINALS) == out
            assert all(c.ttl(k) <= 500 for k in keys)  # answered from memory: Redis untouched
            clock[0] += 2  # 31 s after Redis last answered: asked again, which refreshes the TTLs
            with server.monitor() as lines:
                assert await s.placeholders_for(ORIGINALS) == out
            assert len(_client_commands(lines)) == 1
            assert all(c.ttl(k) > 900 for k in keys)

    run(with_stores(1, lambda: store(server, ns, ttl=1000, remember=30), body))


def test_remembered_mappings_mask_while_redis_is_down_new_ones_fail_closed(own_server: RedisServer,
                                                                          ns: str) -> None:
    async def body(s: RedisStore) -> None:
        out = await s.placeholders_for(ORIGINALS)
        own_server.stop()
        assert await s.placeholders_for(ORIGINALS[1:]) == out[1:]
        with pytest.raises(StoreUnavailable) as ei:
            await s.placeholders_for(ORIGINALS[:1] + accounts(1, base=800000000000))
        _assert_clean_reason(ei.value)

    run(with_stores(1, lambda: store(own_server, ns, remember=60), body))


def test_what_a_store_remembers_is_bounded(server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        await s.ping()
        first = await s.placeholders_for(accounts(5))
        assert len(s._remembered) == 3
        with server.monitor() as lines:
            assert await s.placeholders_for(accounts(5)[2:]) == first[2:]  # the newest three
        assert _client_commands(lines) == []
        with server.monitor() as lines:
            assert await s.placeholders_for(accounts(5)[:1]) == first[:1]  # forgotten: asked again
        assert len(_client_commands(lines)) == 1

    run(with_stores(1, lambda: store(server, ns, remember=60, remember_entries=3), body))


def test_after_redis_lost_its_data_a_remembered_placeholder_is_never_shared_with_a_new_original(
        server: RedisServer, ns: str) -> None:
    # Redis restarted without persistence (or was flushed) while this proxy still remembers A -> 0001:
    # the counters start again, so Redis hands the next new original 0001 too. One request holding A and B
    # would have sent both as AWS_ACCOUNT_0001 (and the reply would restore both to one of them).
    a, b = accounts(1), accounts(1, base=900000000000)

    async def body(s: RedisStore, other: RedisStore) -> None:
        assert await s.placeholders_for(a) == [b"AWS_ACCOUNT_0001"]
        with server.client() as c:
            c.delete(*ns_keys(server, ns))
        both = await s.placeholders_for(a + b)
        assert len(set(both)) == 2, both
        # ... and what it answers is what Redis now holds, for every proxy of the namespace
        assert await other.placeholders_for(a + b) == both
        assert await s.originals_for(both) == {both[0]: a[0][1], both[1]: b[0][1]}
        # what it remembered before the loss is not answered any more
        assert await s.placeholders_for(a) == both[:1]

    run(with_stores(2, lambda: store(server, ns, remember=60), body))


def test_remember_is_at_most_half_the_ttl_and_never_negative(server: RedisServer, ns: str) -> None:
    s = store(server, ns, ttl=10, remember=60)
    assert s.remember == 5
    with pytest.raises(ValueError, match="remember"):
        store(server, ns, remember=-1)


# -- failures ------------------------------------------------------------------------------------------------

def _assert_clean_reason(exc: BaseException) -> None:
    for _, original in ORIGINALS:
        assert original.decode() not in str(exc)


def test_redis_down_fails_fast(own_server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        await s.placeholders_for(ORIGINALS)
        own_server.stop()
        for call in (lambda: s.placeholders_for(ORIGINALS), lambda: s.originals_for([b"AWS_ACCOUNT_0001"]),
                     s.ping):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as ei:
                await call()
            assert time.monotonic() - t0 < 2
            assert "connection" in str(ei.value)
            _assert_clean_reason(ei.value)

    run(with_stores(1, lambda: store(own_server, ns), body))


def test_never_started_fails_fast(ns: str) -> None:
    async def body(s: RedisStore) -> None:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await s.placeholders_for(ORIGINALS)
        assert time.monotonic() - t0 < 2

    from redisproc import free_port
    run(with_stores(1, lambda: store(f"redis://127.0.0.1:{free_port()}/0", ns), body))


def test_recovers_after_redis_restart(own_server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        assert len(await s.placeholders_for(accounts(10))) == 10
        own_server.stop()  # SIGKILL mid-run: pooled connections are now dead
        with pytest.raises(StoreUnavailable):
            await s.placeholders_for(accounts(10))
        own_server.start()  # same port, empty (no persistence), script cache empty
        t0 = time.monotonic()
        while True:
            try:
                out = await s.placeholders_for(accounts(10))
                break
            except StoreUnavailable:
                assert time.monotonic() - t0 < 5
                await asyncio.sleep(0.1)
        assert out == [format_placeholder("ACCOUNT", i) for i in range(1, 11)]
        assert time.monotonic() - t0 < 5
        # a restart while idle: the first call after it succeeds (stale connection replaced)
        own_server.restart()
        assert len(await s.placeholders_for(accounts(3))) == 3

    run(with_stores(1, lambda: store(own_server, ns), body))


def test_paused_redis_times_out(own_server: RedisServer, ns: str) -> None:
    async def body(s: RedisStore) -> None:
        await s.ping()
        own_server.pause(3000)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timeout"):
            await s.placeholders_for(ORIGINALS)
        assert time.monotonic() - t0 < 2

    run(with_stores(1, lambda: store(own_server, ns), body))


def test_password(ns: str) -> None:
    with RedisServer(password="s3cret-pw") as srv:
        async def body() -> None:
            good = store(srv.url, ns)
            assert len(await good.placeholders_for(ORIGINALS)) == len(ORIGINALS)
            await good.close()
            for url in (srv.url_with_password("wrong-pw"), srv.url_with_password(None)):
                bad = store(url, ns)
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable, match="auth") as ei:
                    await bad.placeholders_for(ORIGINALS)
                assert time.monotonic() - t0 < 2
                assert "pw" not in str(ei.value)
                await bad.close()

        run(body())


def test_tls_and_password(ns: str) -> None:
    with RedisServer(tls=True, password="tls-pw") as srv:
        assert srv.url.startswith("rediss://:tls-pw@")

        async def body(s: RedisStore) -> None:
            out = await s.placeholders_for(ORIGINALS)
            assert await s.originals_for(out) == {p: o for p, (_, o) in zip(out, ORIGINALS, strict=True)}

        run(with_stores(1, lambda: store(srv, ns), body))
        # plain TCP against the TLS port fails fast, without hanging on the handshake
        plain_url = srv.url.replace("rediss://", "redis://").split("?")[0]
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            run(with_stores(1, lambda: store(plain_url, ns), lambda s: s.placeholders_for(ORIGINALS)))
        assert time.monotonic() - t0 < 3


def test_at_most_two_connections(server: RedisServer, ns: str) -> None:
    async def body() -> None:
        client = make_redis_client(server.url, client_name=ns)
        s = RedisStore(client, ns, hmac_key=KEYS[0], enc_key=KEYS[1])
        try:
            outs = await asyncio.gather(*(s.placeholders_for(accounts(20, base=100000000000 + i))
                                          for i in range(60)))
            assert outs[0][1] == outs[1][0]
            await client.publish(ns + "-events", b"x")  # the event publisher shares the same client
            with server.client() as c:
                mine = [cl for cl in c.client_list() if cl.get("name") == ns]
            assert 1 <= len(mine) <= 2
            from_pool = RedisStore(client.connection_pool, ns, hmac_key=KEYS[0], enc_key=KEYS[1])
            # the same mapping through the shared pool (which request minted first is the scheduler's choice)
            assert await from_pool.placeholders_for(accounts(1)) == [outs[0][0]]
            await from_pool.close()  # does not close the shared pool
        finally:
            await s.close()  # does not close a client it was given
            await client.ping()
            await client.aclose()

    run(body())


# -- measurement ---------------------------------------------------------------------------------------------

def test_latency_vs_memory(server: RedisServer, ns: str, capsys: pytest.CaptureFixture[str]) -> None:
    rounds = 200
    counter = itertools.count(10**11)

    def batch(known: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return known[:50] + [("ACCOUNT", b"%012d" % next(counter)) for _ in range(50)]

    async def measure(s: Any) -> float:
        known = [("ACCOUNT", b"%012d" % next(counter)) for _ in range(50)]
        await s.placeholders_for(known)
        t0 = time.perf_counter()
        for _ in range(rounds):
            await s.placeholders_for(batch(known))
        return (time.perf_counter() - t0) / rounds

    async def body() -> tuple[float, float, float]:
        enc, plain = store(server, ns), store(server, ns + "-plain", encrypt=False)
        try:
            return await measure(enc), await measure(plain), await measure(MemoryStore())
        finally:
            await enc.close()
            await plain.close()

    enc_t, plain_t, mem_t = run(body())
    with capsys.disabled():
        print(f"\nplaceholders_for(100 items: 50 known, 50 new): redis+aes {enc_t * 1e3:.3f} ms, "
              f"redis plain {plain_t * 1e3:.3f} ms, memory {mem_t * 1e3:.3f} ms")
    assert enc_t < 0.05
