"""Where placeholder <-> original mappings live.

A store mints placeholders: the same (kind, original) always gets the same placeholder while the mapping
lives, different originals get different placeholders, and numbers are never reused for another original.
All calls of one request are batched: one ``placeholders_for`` call with every identifier of the request.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Protocol

from .placeholders import format_placeholder


class StoreUnavailable(Exception):
    """The store cannot answer now (connection refused, timeout, auth). Requests that need it fail closed."""


class Store(Protocol):
    name: str

    async def placeholders_for(self, items: Sequence[tuple[str, bytes]],
                               avoid: Collection[bytes] = ()) -> list[bytes]:
        """Placeholders for unique ``(kind, original)`` items, minting missing ones; refreshes their TTL. A
        new one is never one of ``avoid`` (placeholders the request holds as text: the number is skipped)."""
        ...

    async def originals_for(self, placeholders: Sequence[bytes]) -> dict[bytes, bytes]:
        """Originals for known placeholders (for namespace-wide restore); unknown ones are left out."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """In-process store: bounded (least recently used entries go first) and with a TTL per mapping."""

    name = "memory"

    def __init__(self, max_entries: int = 100_000, ttl: float = 604_800.0,
                 ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._now = time.monotonic
        self._by_original: OrderedDict[tuple[str, bytes], tuple[bytes, float]] = OrderedDict()
        self._by_placeholder: dict[bytes, tuple[str, bytes]] = {}
        self._counters: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_original)

    def _drop(self, key: tuple[str, bytes]) -> None:
        placeholder, _ = self._by_original.pop(key)
        self._by_placeholder.pop(placeholder, None)

    def lookup(self, items: Sequence[tuple[str, bytes]], avoid: Collection[bytes] = ()) -> list[bytes]:
        now = self._now()
        expires = now + self.ttl
        out = []
        entries = self._by_original
        by_placeholder = self._by_placeholder
        counters = self._counters
        touch = entries.move_to_end
        for key in items:
            entry = entries.get(key)
            if entry is not None and entry[1] > now:
                placeholder = entry[0]
                touch(key)
            else:
                if entry is not None:
                    self._drop(key)
                kind = key[0]
                n = counters.get(kind, 0) + 1
                placeholder = format_placeholder(kind, n)
                while placeholder in avoid:  # the request holds this text itself: the number is skipped
                    n += 1
                    placeholder = format_placeholder(kind, n)
                counters[kind] = n
                by_placeholder[placeholder] = key
            entries[key] = (placeholder, expires)
            out.append(placeholder)
        while len(entries) > self.max_entries:
            self._drop(next(iter(entries)))
        return out

    async def placeholders_for(self, items: Sequence[tuple[str, bytes]],
                               avoid: Collection[bytes] = ()) -> list[bytes]:
        return self.lookup(items, avoid)

    async def originals_for(self, placeholders: Sequence[bytes]) -> dict[bytes, bytes]:
        now = self._now()
        out = {}
        for p in placeholders:
            key = self._by_placeholder.get(p)
            if key is None:
                continue
            entry = self._by_original.get(key)
            if entry is None or entry[1] <= now:
                continue
            out[p] = key[1]
        return out

    async def close(self) -> None:
        return None
