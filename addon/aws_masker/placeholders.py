"""Placeholder format: ``AWS_<KIND>_<NNNN>``.

* typed and readable: ``AWS_ACCOUNT_0001``, ``AWS_EC2_INSTANCE_0012``;
* the counter is zero-padded to four digits and grows beyond that (``AWS_ACCOUNT_12345``);
* a token is always read greedily to its last digit, so ``AWS_ACCOUNT_1000`` is never read as
  ``AWS_ACCOUNT_100`` followed by ``0``;
* text glued before a placeholder that reads as part of it (``AWS_`` in ``AWS_i-0abc…``, masked as
  ``AWS_AWS_EC2_INSTANCE_0001``) is set apart again on restore: a token that is not a known placeholder but
  ends in one is restored as its start plus that placeholder's original;
* the number is a per-kind counter kept by the store, so nothing about the original can be derived from it.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable

PREFIX = b"AWS_"
KIND_RE = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z][A-Z0-9]*)*$")
# A placeholder token. Kind segments start with a letter; the counter is the final run of >= 4 digits.
TOKEN_RE = re.compile(rb"AWS_[A-Z][A-Z0-9]*(?:_[A-Z][A-Z0-9]*)*_[0-9]{4,}")
_TOKEN_SPLIT = re.compile(b"(" + TOKEN_RE.pattern + b")")


def format_placeholder(kind: str, number: int) -> bytes:
    """Return the placeholder for the ``number``-th identifier of ``kind`` (numbers start at 1)."""
    return _kind_prefix(kind) + b"%04d" % number


@functools.lru_cache(maxsize=4096)
def _kind_prefix(kind: str) -> bytes:
    return b"AWS_%s_" % kind.encode("ascii")


def valid_kind(kind: str) -> bool:
    return bool(KIND_RE.match(kind))


_JSON_SPECIAL = re.compile(rb'[\x00-\x1f"\\]')
_JSON_ESCAPES = {c: b"\\u%04x" % c for c in range(0x20)} | {
    0x22: b'\\"', 0x5C: b"\\\\", 0x08: b"\\b", 0x0C: b"\\f", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t",
}


def json_escape(original: bytes) -> bytes:
    """``original`` as it must appear inside a JSON string (other bytes, UTF-8 included, are kept; most
    originals need no escaping at all)."""
    if not _JSON_SPECIAL.search(original):
        return original
    return _JSON_SPECIAL.sub(lambda m: _JSON_ESCAPES[m.group(0)[0]], original)


def glued_suffixes(token: bytes, longest: int | None = None) -> list[bytes]:
    """The placeholders ``token`` could end in, longest first: its tails that start with ``AWS_``
    (``AWS_AWS_EC2_INSTANCE_0001`` -> ``AWS_EC2_INSTANCE_0001``; also ``AWS_XAWS_EC2_INSTANCE_0001``: a
    stream cut after ``AWS_X`` restores that placeholder, so the whole reply must too); with ``longest``
    only those of at most that many bytes (a longer one is no placeholder of the caller's: a token of n
    bytes has up to n/5 tails, n^2/10 bytes in all, and a reply or request may hold a huge one)."""
    out = []
    start = 1 if longest is None else max(1, len(token) - longest)
    i = token.find(PREFIX, start)
    while i >= 0:
        out.append(token[i:])
        i = token.find(PREFIX, i + 1)
    return out


def tokens_in(data: bytes, kinds: Iterable[str] | None = None) -> set[bytes]:
    """The placeholder tokens ``data`` holds as text, and those they may end in (as a reply is restored):
    what a new identifier must not get (see ``Store.placeholders_for``).

    With ``kinds`` (those of the identifiers to be given placeholders) only the tails of those kinds: a new
    placeholder is of one of them, and a token's tails are quadratic in its length (a 112 KB token had
    900 MB of them); each is then checked with one ``endswith`` per kind."""
    if data.find(PREFIX) < 0:
        return set()
    tokens = set(TOKEN_RE.findall(data))
    if kinds is None:
        return tokens.union(*map(glued_suffixes, tokens))
    heads = [_kind_prefix(k) for k in set(kinds)]
    out = set(tokens)
    for t in tokens:
        digits = t[t.rindex(b"_") + 1:]
        for head in heads:
            tail = head + digits
            if len(tail) < len(t) and t.endswith(tail):
                out.add(tail)
    return out


def glued_split(token: bytes, mapping: dict[bytes, bytes],
                longest: int | None = None) -> tuple[bytes, bytes] | None:
    """(the text glued before it, the placeholder) for a ``token`` that is no placeholder of ``mapping``
    but ends in one (the longest such); None when it does not. ``longest``: that of ``mapping``'s keys
    (computed when not given)."""
    if longest is None:
        longest = max(map(len, mapping), default=0)
    for tail in glued_suffixes(token, longest):
        if tail in mapping:
            return token[:len(token) - len(tail)], tail
    return None


def restore_bytes(data: bytes, mapping: dict[bytes, bytes], seen: Counter[bytes] | None = None,
                  in_json: bool = False) -> tuple[bytes, int]:
    """Replace every placeholder of ``mapping`` in ``data`` by its original.

    Tokens that look like placeholders but are not in ``mapping`` stay as they are. With ``in_json`` the
    originals are JSON-escaped (the placeholders sit inside JSON strings). Returns the new bytes and the
    number of replacements; ``seen``, when given, counts the placeholders restored.
    """
    if not mapping or data.find(PREFIX) < 0:  # find(): `bytes in bytes` costs ~0.25 µs more
        return data, 0
    # split() and list comprehensions keep the per-placeholder work in C: no Python call per token.
    parts = _TOKEN_SPLIT.split(data)
    tokens = parts[1::2]
    known = [t for t in tokens if t in mapping]
    if len(known) < len(tokens):  # text glued before a placeholder?
        longest = max(map(len, mapping))
        glued = {t: g for t in tokens
                 if t not in mapping and (g := glued_split(t, mapping, longest)) is not None}
        if glued:
            for k, t in enumerate(tokens):
                if t in glued:  # the glued text goes back as text, before the placeholder's original
                    parts[2 * k] += glued[t][0]
            tokens = [glued[t][1] if t in glued else t for t in tokens]
            known = [t for t in tokens if t in mapping]
    if not known:
        return data, 0
    if seen is not None:
        seen.update(known)
    get = mapping.get
    values = [get(t, t) for t in tokens]
    if in_json and _JSON_SPECIAL.search(b"".join(values)):
        values = [json_escape(v) if t in mapping else v for t, v in zip(tokens, values, strict=True)]
    parts[1::2] = values
    return b"".join(parts), len(known)


def tail_to_hold(data: bytes, prefixes: frozenset[bytes] | set[bytes], longest: int) -> int:
    """Offset from which ``data`` must be held back because it could still become a placeholder.

    ``prefixes`` holds every non-empty prefix of every placeholder that may be restored (the full
    placeholders included: more digits could still follow). Returns ``len(data)`` when nothing has to wait.
    """
    n = len(data)
    start = max(0, n - longest)
    i = data.find(b"A", start)
    while i != -1:
        if data[i:] in prefixes:
            return i
        i = data.find(b"A", i + 1)
    return n
