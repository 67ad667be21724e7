"""Finding identifiers in bytes: one Hyperscan pass over all rules, with a pure-Python fallback.

Hyperscan only *locates* candidates (rule, start offset) in a single pass; each candidate is then confirmed
with the rule's own Python regex anchored at that offset, which also yields named groups. Overlapping
candidates resolve leftmost-first, longest at the same start, so an account ID inside an ARN is replaced
once (by the ARN rule's groups). Rules Hyperscan cannot compile, and every rule when Hyperscan is missing,
run as Python regexes behind their keyword prefilters; both engines return the same replacements.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .rules import TEMPLATE_RE, Rule

log = logging.getLogger(__name__)

try:  # pragma: no cover - depends on the platform
    import hyperscan

    HAVE_HYPERSCAN = True
except ImportError:  # pragma: no cover
    hyperscan = None  # type: ignore[assignment]
    HAVE_HYPERSCAN = False

_NAMED_GROUP = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")


@dataclass(slots=True, frozen=True)
class Hit:
    """One span of the input to replace, with the placeholder kind and the rule that found it."""

    start: int
    end: int
    kind: str
    rule: str


def _to_hyperscan(regex: str) -> bytes:
    return _NAMED_GROUP.sub("(?:", regex).encode("utf-8")


class Scanner:
    def __init__(self, rules: Sequence[Rule], engine: str = "auto") -> None:
        if engine not in ("auto", "hyperscan", "python"):
            raise ValueError(f"unknown engine {engine!r}")
        if engine == "hyperscan" and not HAVE_HYPERSCAN:
            raise RuntimeError("the hyperscan module is not installed")
        self.rules = list(rules)
        self._targets = [(r, list(r.targets().items())) for r in self.rules]
        self._db: Any = None
        self._kind_cache: dict[tuple[bytes, str], str] = {}
        self._python_rules: list[int] = list(range(len(self.rules)))
        if engine != "python" and HAVE_HYPERSCAN:
            self._compile_hyperscan()
        self.engine = "hyperscan" if self._db is not None else "python"

    def _compile_hyperscan(self) -> None:
        patterns = tuple(_to_hyperscan(r.anchor or r.regex) for r in self.rules)
        cached = _HS_CACHE.get(patterns)
        if cached is None:
            cached = _compile_hyperscan(patterns, [r.id for r in self.rules])
            if len(_HS_CACHE) >= 8:
                _HS_CACHE.pop(next(iter(_HS_CACHE)))
            _HS_CACHE[patterns] = cached
        self._db, ok = cached
        hs = set(ok)
        self._python_rules = [i for i in range(len(self.rules)) if i not in hs]

    # -- candidates ------------------------------------------------------------------------------------

    def _candidates(self, data: bytes) -> list[tuple[int, int]]:
        cands: list[tuple[int, int]] = []
        if self._db is not None:
            append = cands.append

            def on_match(rid: int, start: int, end: int, flags: int, ctx: object) -> None:
                append((start, rid))

            self._db.scan(data, match_event_handler=on_match)
        if self._python_rules:
            lowered: bytes | None = None
            for i in self._python_rules:
                rule = self.rules[i]
                if rule.keywords:
                    hay = data
                    if rule.case_insensitive:
                        if lowered is None:
                            lowered = data.lower()
                        hay = lowered
                        if not any(k.lower() in hay for k in rule.keywords):
                            continue
                    elif not any(k in hay for k in rule.keywords):
                        continue
                for m in rule.compiled.finditer(data):
                    cands.append((m.start(), i))
        return cands

    # -- resolution ------------------------------------------------------------------------------------

    def scan(self, data: bytes) -> list[Hit]:
        """Return the non-overlapping replacements for ``data``, in order."""
        cands = self._candidates(data)
        if not cands:
            return []
        cands = sorted(set(cands))
        hits: list[Hit] = []
        pos = 0
        n = len(cands)
        i = 0
        while i < n:
            start = cands[i][0]
            best: re.Match[bytes] | None = None
            best_rule = -1
            while i < n and cands[i][0] == start:
                rid = cands[i][1]
                i += 1
                if start < pos:
                    continue
                m = self.rules[rid].compiled.match(data, start)
                if m is None or (best is not None and m.end() <= best.end()):
                    continue
                if self._acceptable(rid, m):
                    best, best_rule = m, rid
            if best is not None:
                hits.extend(self._expand(best_rule, best))
                pos = best.end()
        return hits

    def _acceptable(self, rid: int, m: re.Match[bytes]) -> bool:
        rule = self.rules[rid]
        seen = False
        for group, _kind in self._targets[rid][1]:
            value = m.group(group) if group else m.group(0)
            if value is None:
                continue
            seen = True
            if value in rule.allow or (rule.validate is not None and not rule.validate(value)):
                return False
        return seen

    def _expand(self, rid: int, m: re.Match[bytes]) -> list[Hit]:
        rule, targets = self._targets[rid]
        out = []
        for group, kind in targets:
            s, e = m.span(group) if group else m.span()
            if s < 0 or s == e:
                continue
            if len(targets) > 1:
                kind = self._group_kind(m.string[s:e], kind, m)
            elif "{" in kind:
                kind = _fill_template(kind, m)
            out.append(Hit(s, e, kind, rule.id))
        out.sort(key=lambda h: h.start)
        return out

    def _group_kind(self, value: bytes, kind: str, m: re.Match[bytes]) -> str:
        """A group that is on its own an identifier of another rule (the instance ID in an instance ARN)
        takes that rule's kind, so it gets the same placeholder everywhere."""
        if "{" in kind:
            kind = _fill_template(kind, m)  # the template depends on other groups of this match
        key = (value, kind)
        cached = self._kind_cache.get(key)
        if cached is None:
            inner = self.scan(value)
            if len(inner) == 1 and inner[0].start == 0 and inner[0].end == len(value):
                cached = inner[0].kind
            else:
                cached = kind
            if len(self._kind_cache) > 10_000:
                self._kind_cache.clear()
            self._kind_cache[key] = cached
        return cached

    def scan_values(self, data: bytes) -> list[bytes]:
        """The masked substrings of ``data`` (for rule examples and tools)."""
        return [data[h.start:h.end] for h in self.scan(data)]


# Compiled databases by pattern tuple: building the same catalog again (reloads, tests) costs nothing.
_HS_CACHE: dict[tuple[bytes, ...], tuple[Any, list[int]]] = {}


def _compile_hyperscan(patterns: tuple[bytes, ...], rule_ids: list[str]) -> tuple[Any, list[int]]:
    """Compile every pattern Hyperscan accepts into one database; return it and the ids it covers."""
    assert hyperscan is not None
    flags = hyperscan.HS_FLAG_SOM_LEFTMOST

    def compile_db(ids: list[int]) -> Any:
        db = hyperscan.Database()
        db.compile(expressions=[patterns[i] for i in ids], ids=ids, elements=len(ids),
                   flags=[flags] * len(ids))
        return db

    ok = list(range(len(patterns)))
    try:
        db = compile_db(ok)
    except hyperscan.error:
        # Find the rules Hyperscan cannot take; they run on Python re.
        ok = []
        for i, rule_id in enumerate(rule_ids):
            try:
                compile_db([i])
            except hyperscan.error as e:
                log.info("rule %s runs on Python re (Hyperscan: %s)", rule_id, e)
                continue
            ok.append(i)
        db = compile_db(ok) if ok else None
    return db, ok


def _fill_template(kind: str, m: re.Match[bytes]) -> str:
    return TEMPLATE_RE.sub(lambda g: _kind_part(m.group(g.group(1))), kind)


@functools.lru_cache(maxsize=1024)
def _kind_part(value: bytes | None) -> str:
    text = (value or b"").decode("ascii", "replace").upper()
    text = re.sub(r"[^A-Z0-9]+", "_", text).strip("_")
    text = re.sub(r"_(?=[0-9])", "", text)  # every segment must start with a letter
    return text if text[:1].isalpha() else "X" + text
