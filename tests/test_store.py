"""The in-memory mapping store: stable placeholders, bounded (LRU), TTL, numbers never reused."""

from __future__ import annotations

import asyncio

from aws_masker.store import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_same_original_same_placeholder_and_kinds_count_separately() -> None:
    store = MemoryStore()
    first = store.lookup([("EC2_INSTANCE", b"i-1"), ("ACCOUNT", b"123"), ("EC2_INSTANCE", b"i-2")])
    assert first == [b"AWS_EC2_INSTANCE_0001", b"AWS_ACCOUNT_0001", b"AWS_EC2_INSTANCE_0002"]
    assert store.lookup([("EC2_INSTANCE", b"i-2")]) == [b"AWS_EC2_INSTANCE_0002"]
    got = asyncio.run(store.originals_for([b"AWS_ACCOUNT_0001", b"AWS_ACCOUNT_0009"]))
    assert got == {b"AWS_ACCOUNT_0001": b"123"}


def test_bounded_least_recently_used_go_first_and_numbers_are_not_reused() -> None:
    store = MemoryStore(max_entries=3)
    store.lookup([("K", b"a"), ("K", b"b"), ("K", b"c")])
    store.lookup([("K", b"a")])  # a is now the most recently used
    store.lookup([("K", b"d")])  # evicts b
    assert len(store) == 3
    got = store.lookup([("K", b"a"), ("K", b"c"), ("K", b"d")])
    assert got == [b"AWS_K_0001", b"AWS_K_0003", b"AWS_K_0004"]
    # b comes back with a new number: 0002 is never handed to another original.
    assert store.lookup([("K", b"b")]) == [b"AWS_K_0005"]


def test_mappings_expire_after_ttl_and_use_refreshes_them() -> None:
    store = MemoryStore(ttl=10)
    clock = Clock()
    store._now = clock
    store.lookup([("K", b"a"), ("K", b"b")])
    clock.now += 8
    store.lookup([("K", b"a")])  # refreshed
    clock.now += 5  # b is 13 s old, a 5 s
    assert asyncio.run(store.originals_for([b"AWS_K_0001", b"AWS_K_0002"])) == {b"AWS_K_0001": b"a"}
    assert store.lookup([("K", b"a"), ("K", b"b")]) == [b"AWS_K_0001", b"AWS_K_0003"]


def test_a_new_placeholder_is_never_one_the_request_holds_as_text() -> None:
    store = MemoryStore()
    avoid = {b"AWS_ACCOUNT_0001", b"AWS_ACCOUNT_0003"}
    got = store.lookup([("ACCOUNT", b"111122223333"), ("ACCOUNT", b"444455556666")], avoid)
    assert got == [b"AWS_ACCOUNT_0002", b"AWS_ACCOUNT_0004"]  # the numbers the request holds are skipped
    assert store.lookup([("ACCOUNT", b"777788889999")]) == [b"AWS_ACCOUNT_0005"]  # and never handed out
    # an original that already has one keeps it, even when the request also holds it as text
    assert store.lookup([("ACCOUNT", b"111122223333")], {b"AWS_ACCOUNT_0002"}) == [b"AWS_ACCOUNT_0002"]
