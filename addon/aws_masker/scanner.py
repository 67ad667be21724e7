"""Finding identifiers in bytes: Hyperscan passes over all rules at once, with a pure-Python fallback.

Hyperscan only *locates* candidates, in two passes over the text: the literal prefixes of the rules that
have a selective one (``arn:aws:iam::``, ``AKIA``, ``i-``), and the ends of the matches of the other rules
(hostnames, IP addresses), compiled with their word boundaries and look-arounds set aside — which can only
add candidates. Each rule's own Python regex then confirms a candidate (at the literal, or in a window that
ends at the reported end), finds its start and yields named groups. Overlapping candidates resolve
leftmost-first, longest at the same start, so an account ID inside an ARN is replaced once (by the ARN
rule's groups). Rules Hyperscan cannot compile, and every rule when Hyperscan is missing, run as Python
regexes behind their keyword prefilters; both engines return the same replacements (the tests compare them;
a match longer than the widest search window, 64 KiB, far beyond any real identifier, may be found in part).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import operator
import re
from collections.abc import Callable, Sequence
from re import _constants as _sre  # type: ignore[attr-defined]  # the regex parser's own names
from re import _parser as _sre_parse  # type: ignore[attr-defined]
from typing import Any, NamedTuple

from .rules import TEMPLATE_RE, Rule

log = logging.getLogger(__name__)

try:  # pragma: no cover - depends on the platform
    import hyperscan

    HAVE_HYPERSCAN = True
except ImportError:  # pragma: no cover
    hyperscan = None  # type: ignore[assignment]
    HAVE_HYPERSCAN = False

# The shape of EC2-style IDs (i-0123abcd, vpc-..., tgw-attach-...): group values worth a second look.
_ID_SHAPE = re.compile(rb"[a-z]+(?:-[a-z]+)*-[0-9a-f]{8,17}")
_NAMED_GROUP = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")


class Hit(NamedTuple):
    """One span of the input to replace, with the placeholder kind and the rule that found it."""

    start: int
    end: int
    kind: str
    rule: str


_new_hit = tuple.__new__  # Hit(...) without NamedTuple's Python-level __new__: hits are made per identifier


def _to_hyperscan(regex: str) -> bytes:
    return _NAMED_GROUP.sub("(?:", regex).encode("utf-8")


def _without_assertions(pattern: bytes) -> bytes:
    """``pattern`` without its word-boundary assertions (``\\b``, ``\\B``), line anchors (``^``, ``$``) and
    look-around groups (``(?=…)``, ``(?!…)``, ``(?<=…)``, ``(?<!…)``), outside character classes.

    For the database that only reports where matches END: dropping an assertion can only add matches, so
    every end of the real regex is still reported, and the rule's own regex (with its assertions) confirms
    each candidate. Hyperscan has no look-arounds, and word boundaries are costly in it (the IPv6 rule scans
    ~10x faster without its leading ``\\b``). Line anchors: Hyperscan 0.9's database lost matches of a
    ``(?m)^``-anchored pattern more than ~60 bytes into the text when it held a second such pattern (two
    Terraform rules); without the anchor it reports them."""
    out = bytearray()
    i, n = 0, len(pattern)
    skip_depth = 0  # > 0 while inside a dropped look-around group (counts its open parentheses)
    while i < n:
        c = pattern[i]
        if c == 0x5C and i + 1 < n:  # backslash: an escape, two bytes
            if skip_depth == 0 and pattern[i + 1] not in b"bB":
                out += pattern[i:i + 2]
            i += 2
            continue
        if c == 0x5B:  # [ starts a class
            j = _class_end(pattern, i)
            if skip_depth == 0:
                out += pattern[i:j]
            i = j
            continue
        if c == 0x28:  # (
            if skip_depth:
                skip_depth += 1
            elif pattern.startswith((b"(?=", b"(?!", b"(?<=", b"(?<!"), i):
                skip_depth = 1
            else:
                out.append(c)
            i += 1
            continue
        if c == 0x29 and skip_depth:  # )
            skip_depth -= 1
            i += 1
            continue
        if skip_depth == 0 and c not in (0x5E, 0x24):  # ^ and $ (outside classes): anchors, set aside too
            out.append(c)
        i += 1
    return bytes(out)


_LEADING_FLAGS = re.compile(rb"(?:\(\?[aiLmsux]+\))*")


def _group_end(pattern: bytes, i: int) -> int:
    """The index just past the group that opens at ``pattern[i]`` (a ``(``), or -1."""
    depth = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == 0x5C:  # an escape: two bytes
            i += 2
            continue
        if c == 0x5B:
            i = _class_end(pattern, i)
            continue
        if c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _consume_lookarounds(pattern: bytes, ahead: bool = True) -> tuple[bytes, bool]:
    r"""For the database that reports where matches END: a look-behind that opens the pattern and a
    look-ahead that closes it, made part of the match (``(?<=X)A(?=Y)`` → ``(?:X)A(?:Y)``), and whether the
    look-ahead was (an end is then reported up to its length past the real end).

    Every real match still yields a reported end, so no candidate is lost, and far fewer false ones are
    reported than with the look-arounds dropped (``\d{12}(?=[ \t]+arn:aws:iam::)`` no longer reports every
    account ID in every ARN). Look-arounds elsewhere are dropped by ``_without_assertions``; so is the
    closing look-ahead unless ``ahead``."""
    flags = _LEADING_FLAGS.match(pattern)
    head = flags.end() if flags else 0
    out = pattern
    if pattern.startswith(b"(?<=", head):
        end = _group_end(pattern, head)
        if end > 0:
            out = pattern[:head] + b"(?:" + pattern[head + 4:]
    consumed = False
    if ahead and out.endswith(b")"):
        # the group that the last ")" closes: scan groups at the top level from the start
        i, n = head, len(out)
        last_open = -1
        while i < n:
            c = out[i]
            if c == 0x5C:
                i += 2
                continue
            if c == 0x5B:
                i = _class_end(out, i)
                continue
            if c == 0x28:
                end = _group_end(out, i)
                if end < 0:
                    return out, False
                if end == n:
                    last_open = i
                i = end
                continue
            i += 1
        if last_open >= 0 and out.startswith(b"(?=", last_open):
            out = out[:last_open] + b"(?:" + out[last_open + 3:]
            consumed = True
    return out, consumed


def _class_end(pattern: bytes, i: int) -> int:
    """The index just past the character class that opens at ``pattern[i]`` (a ``[``; a ``]`` right after
    ``[`` or ``[^`` is a literal)."""
    n = len(pattern)
    i += 1
    if i < n and pattern[i] == 0x5E:
        i += 1
    if i < n and pattern[i] == 0x5D:
        i += 1
    while i < n and pattern[i] != 0x5D:
        i += 2 if pattern[i] == 0x5C else 1
    return i + 1


class Scanner:
    def __init__(self, rules: Sequence[Rule], engine: str = "auto") -> None:
        if engine not in ("auto", "hyperscan", "python"):
            raise ValueError(f"unknown engine {engine!r}")
        if engine == "hyperscan" and not HAVE_HYPERSCAN:
            raise RuntimeError("the hyperscan module is not installed")
        self.rules = list(rules)
        self._targets = [(r, list(r.targets().items())) for r in self.rules]
        self._widths = [_max_width(r.regex) for r in self.rules]
        self._ahead = [_lookahead_reach(r.regex) for r in self.rules]  # how far past a match it looks
        # how far past a match's end Hyperscan may report it (its closing look-ahead made part of it)
        self._past = [self._ahead[i] if _end_pattern(_to_hyperscan(r.regex), self._widths[i])[1] else 0
                      for i, r in enumerate(self.rules)]
        # per rule: (group, kind, groups its {template} names) of each part it masks
        self._expansions = [[(g or 0, k, _template_groups(k)) for g, k in t] for _, t in self._targets]
        # (kind, rule id) of rules whose hit is simply their whole match: no groups, checks or templates.
        self._plain: list[tuple[str, str] | None] = [
            (t[0][1], r.id) if t[0][0] == "" and not r.allow and r.validate is None and "{" not in t[0][1]
            and not r.follows else None for r, t in self._targets]
        # per rule: it accepts every match (no allow list or check, and a part it masks takes part in
        # every match), so no match hides one that starts inside it (see _find)
        self._accepts_all = [not r.allow and r.validate is None and (
            t[0][0] == "" or bool(_mandatory_groups(r.compiled) & {g for g, _ in t}))
            for r, t in self._targets]
        # ... or no match of it can start inside another (an IPv4 address: none starts after a digit or dot)
        self._one_at_a_time = [a or _no_inner_start(r.compiled) for r, a in zip(self.rules, self._accepts_all,
                                                                                strict=True)]
        # per rule that only counts right after certain rules' hits: (their ids, fullmatch of the gap)
        self._follows = [(frozenset(r.follows), r.gap.fullmatch) if r.follows and r.gap is not None else None
                         for r in self.rules]
        # per rule: the search method of a byte its regex never takes (None: it may take any)
        self._stoppers = [_stopper(r.regex) for r in self.rules]
        self._db: Any = None
        # remembered scans: (hits, (kind, matched bytes) of each hit)
        self._cache: dict[bytes, tuple[list[Hit], list[tuple[str, bytes]]]] = {}  # by 128-bit hash of a text
        self._small: dict[bytes, tuple[list[Hit], list[tuple[str, bytes]]]] = {}  # short texts as they are
        self._cached_hits = 0
        self._db_start: Any = None
        # literal id -> [(rule index, literal length, the rule's regex match method)]
        self._locators: list[list[tuple[int, int, Callable[[bytes, int], re.Match[bytes] | None]]]] = []
        self._python_rules: list[int] = list(range(len(self.rules)))
        if engine != "python" and HAVE_HYPERSCAN:
            self._compile_hyperscan()
        self.engine = "hyperscan" if self._db is not None or self._db_start is not None else "python"

    def _compile_hyperscan(self) -> None:
        patterns = tuple(_to_hyperscan(r.regex) for r in self.rules)
        cached = _HS_CACHE.get(patterns)
        if cached is None:
            cached = _build_databases(self.rules, patterns)
            release_freed_memory()  # the compiler's working memory (~15 MiB for the catalog) goes back
            if len(_HS_CACHE) >= 8:
                _HS_CACHE.pop(next(iter(_HS_CACHE)))
            _HS_CACHE[patterns] = cached
        self._db_start, locators, self._db, ok = cached
        self._locators = [[(rid, length, self.rules[rid].compiled.match) for rid, length in users]
                          for users in locators]
        self._python_rules = [i for i in range(len(self.rules)) if i not in ok]

    # -- candidates ------------------------------------------------------------------------------------

    def _candidates(self, data: bytes) -> list[tuple[int, int, int, re.Match[bytes]]]:
        """(start, -end, rule index, match) of every match of every rule (matches of one rule do not
        overlap)."""
        cands: list[tuple[int, int, int, re.Match[bytes]]] = []
        add = cands.append
        rules = self.rules
        if self._db_start is not None:
            # Rules that start with a literal (arn:, i-, AKIA, account, ...): Hyperscan finds those
            # literals, and each rule's regex is matched once where its literal starts.
            found_at: list[tuple[int, int]] = []
            found = found_at.append

            def on_literal(lid: int, start: int, end: int, flags: int, ctx: object) -> None:
                found((lid, end))

            self._db_start.scan(data, match_event_handler=on_literal)
            locators = self._locators
            if found_at:
                at_end = [0] * len(rules)  # per rule: the end of its match found last
            # Every start of a literal is tried, also inside a match of the same rule (which the Python
            # engine does not try): some match starts before the end of one of its rule found before it
            # (inside it, or before it: literals of several lengths, found in the order they end).
            crossed = False
            for lid, end in found_at:
                for rid, length, match in locators[lid]:
                    start = end - length
                    m = match(data, start)
                    if m is not None:
                        if start < at_end[rid]:
                            crossed = True
                        at_end[rid] = e = m.end()
                        add((start, -e, rid, m))
            if crossed:
                cands = self._one_pass(cands)
                add = cands.append
        if self._db is not None:
            # The other rules (a hostname is told by its suffix): Hyperscan reports where their matches
            # END; each rule's regex then runs over the windows that end there, reaching back as far as its
            # longest match; windows of one rule that overlap are merged.
            ends: list[tuple[int, int]] = []
            append = ends.append

            def on_end(rid: int, start: int, end: int, flags: int, ctx: object) -> None:
                append((rid, end))

            self._db.scan(data, match_event_handler=on_end)
            ends.sort()
            n = len(ends)
            i = 0
            widths = self._widths
            aheads = self._ahead
            past = self._past
            stoppers = self._stoppers
            size = len(data)
            while i < n:
                rid, end = ends[i]
                width = widths[rid] + past[rid]
                lo = end - width if end > width else 0
                hi = end
                first = i
                i += 1
                while i < n and ends[i][0] == rid and ends[i][1] - width <= hi:
                    hi = ends[i][1]
                    i += 1
                # The regex runs on data[:stop], which it takes for the whole text: stop lies past what its
                # trailing assertions inspect at hi (\b and $ look one byte on; $ also matches before a last
                # newline; a look-ahead looks `ahead` bytes on), unless it is the real end. Matches ending
                # after hi belong to a later window (or are none: Hyperscan reports every real end).
                stop = min(size, hi + aheads[rid] + 2)
                matches = self._find(rid, data, lo, stop)
                stopper = stoppers[rid]
                if lo and width == WINDOW and (
                        not matches or stopper is None or stopper(data, lo, matches[0].start()) is None
                        or not {e for _, e in ends[first:i]} <= {m.end() for m in matches}):
                    # An unbounded rule whose match may be longer than the window: the first match found
                    # may be a piece of one that starts before the window (every byte from the window's
                    # start to it is one the rule's regex can take: a hostname whose first label has 1,000
                    # characters), or an end Hyperscan reported is not explained by a match found in the
                    # window. Search again from much further back.
                    lo = max(0, hi - MAX_WINDOW, lo - MAX_WINDOW)
                    matches = self._find(rid, data, lo, stop)
                for m in matches:
                    if m.end() <= hi:
                        add((m.start(), -m.end(), rid, m))
        if self._python_rules:
            lowered: bytes | None = None
            for rid in self._python_rules:
                rule = self.rules[rid]
                if rule.keywords:
                    hay = data
                    if rule.case_insensitive:
                        if lowered is None:
                            lowered = data.lower()
                        hay = lowered
                        if not any(hay.find(k.lower()) >= 0 for k in rule.keywords):
                            continue
                    elif not any(hay.find(k) >= 0 for k in rule.keywords):  # find(): `in` costs more
                        continue
                for m in self._find(rid, data, 0, len(data)):
                    add((m.start(), -m.end(), rid, m))
        return cands

    def _find(self, rid: int, data: bytes, lo: int, stop: int) -> list[re.Match[bytes]]:
        """The matches of rule ``rid`` in ``data[lo:stop]``, as ``finditer`` finds them, except that the
        search after a match the rule does not accept (a code reference, ``bucket = local.x``; a value its
        check rejects) resumes one byte after its start, not at its end: a match that starts inside it is
        found too, as the literal locator finds it (it tries every start)."""
        compiled = self.rules[rid].compiled
        if self._one_at_a_time[rid]:
            return list(compiled.finditer(data, lo, stop))
        out: list[re.Match[bytes]] = []
        acceptable = self._acceptable
        while True:
            for m in compiled.finditer(data, lo, stop):
                out.append(m)
                if not acceptable(rid, m):
                    lo = m.start() + 1
                    break
            else:
                return out

    def _one_pass(self, cands: list[tuple[int, int, int, re.Match[bytes]]]) \
            -> list[tuple[int, int, int, re.Match[bytes]]]:
        """Of the literal locator's matches (every start of every rule), those ``_find`` finds: of one
        rule's, none that starts inside an earlier one it accepts."""
        cands.sort(key=_START_LONGEST_RULE)
        out: list[tuple[int, int, int, re.Match[bytes]]] = []
        barrier = [0] * len(self.rules)  # per rule: the end of its last match kept and accepted
        acceptable = self._acceptable
        accepts_all = self._accepts_all
        for cand in cands:
            start, neg_end, rid, m = cand
            if start < barrier[rid]:
                continue
            out.append(cand)
            if accepts_all[rid] or acceptable(rid, m):
                barrier[rid] = -neg_end
        return out

    # -- resolution ------------------------------------------------------------------------------------

    def scan(self, data: bytes) -> list[Hit]:
        """Return the non-overlapping replacements for ``data``, in order.

        Leftmost match first; at the same start the longest; on a tie the rule loaded first.

        Results are remembered: LLM clients send the whole conversation with every turn, so all but the
        newest message were scanned before; short strings (roles, model names, "Noted.") come again and
        again. Long texts are remembered by a 128-bit hash, short ones by themselves."""
        return list(self.remembered(data)[0])

    def scan_keys(self, data: bytes) -> tuple[list[Hit], list[tuple[str, bytes]]]:
        """``scan(data)`` and the (kind, matched bytes) of each hit, remembered with it."""
        hits, keys = self.remembered(data)
        return list(hits), list(keys)

    def remembered(self, data: bytes) -> tuple[list[Hit], list[tuple[str, bytes]]]:
        """``scan_keys(data)`` without the copies: the remembered lists themselves, which the caller must
        not change."""
        if len(data) < CACHE_MIN:
            small = self._small
            found = small.get(data)
            if found is None:
                found = self._scan_keys(data)
                if len(small) >= SMALL_ENTRIES:
                    small.clear()  # cheaper than keeping an order; refills with what still comes
                small[data] = found
            return found
        digest = hashlib.blake2b(data, digest_size=16).digest()
        cache = self._cache
        found = cache.pop(digest, None)  # re-inserted below: most recently used last
        if found is None:
            found = self._scan_keys(data)
            self._cached_hits += len(found[0])
            while cache and (len(cache) >= CACHE_ENTRIES or self._cached_hits > CACHE_HITS):
                self._cached_hits -= len(cache.pop(next(iter(cache)))[0])
        cache[digest] = found
        return found

    def scan_keys_once(self, data: bytes) -> tuple[list[Hit], list[tuple[str, bytes]]]:
        """``scan_keys(data)`` without remembering it (for a caller that remembers what it makes of it)."""
        return self._scan_keys(data)

    def _scan_keys(self, data: bytes) -> tuple[list[Hit], list[tuple[str, bytes]]]:
        hits = self._scan(data)
        return hits, [(h[2], data[h[0]:h[1]]) for h in hits]

    def clear_cache(self) -> None:
        """Forget remembered scan results (benchmarks measure cold scans)."""
        self._cache.clear()
        self._small.clear()
        self._cached_hits = 0

    def _scan(self, data: bytes) -> list[Hit]:
        cands = self._candidates(data)
        if not cands:
            return []
        # Leftmost first; at one start the longest first, then the rule loaded first: the first acceptable
        # candidate at a start wins, and every candidate that starts inside it is skipped — unless it lies
        # wholly in a part of it that is not masked (the context a rule reads before or between its groups:
        # the columns before an account ID in a `--output text` row can hold a security group ID).
        cands.sort(key=_START_LONGEST_RULE)
        hits: list[Hit] = []
        plain = self._plain
        follows = self._follows
        pos = 0
        pos_rule = -1  # the rule of the match that ends at pos
        gaps: list[tuple[int, int]] = []  # unmasked parts of the match accepted last
        gap_rule = -1  # ... and its rule (whose own later matches there the Python engine never sees)
        inner = 0  # end of the last candidate accepted in a gap
        last: Hit | None = None  # the hit that ends last (hits[-1] may be one accepted in a gap)
        parts: list[Hit] = []  # the masked parts of the match accepted last
        unsorted = False
        for start, neg_end, rid, m in cands:
            end = -neg_end
            if start == end:
                continue
            if start < pos:
                if not gaps or start < inner or rid == gap_rule or \
                        not any(gs <= start and end <= ge for gs, ge in gaps):
                    if end > pos and rid != pos_rule and plain[rid] is None and follows[rid] is None \
                            and self._acceptable(rid, m):
                        # A match that starts inside the last one and runs on past it (an ARN whose "arn"
                        # a bucket name ending in ".arn" took): its groups past it are masked, and of a group
                        # that starts before it ends (an IPv6 address whose first group a bucket took,
                        # s3://2600:1f18:…) the part after every hit so far.
                        done = last[1] if last is not None else start
                        beyond = [h if h[0] >= pos else _new_hit(Hit, (max(h[0], done), h[1], h[2], h[3]))
                                  for h in self._expand(rid, m) if h[1] > pos]
                        if beyond:
                            hits.extend(beyond)
                            parts = beyond
                            gaps = _gaps(pos, end, beyond)
                            gap_rule = pos_rule = rid
                            pos = end
                            if last is None or beyond[-1][1] > last[1]:
                                last = beyond[-1]
                    elif gaps and end > inner and rid != gap_rule and follows[rid] is None \
                            and any(p[0] <= start < p[1] for p in parts) and self._acceptable(rid, m):
                        # A match that starts inside a masked part of the last one and runs on into a part
                        # it does not mask (a VPC endpoint service ID taken for the user name of a Session
                        # Manager session ID, NAME-17 hex): its groups are masked there too.
                        simple = plain[rid]
                        pieces = _in_gaps([_new_hit(Hit, (start, end, *simple))] if simple is not None
                                          else self._expand(rid, m), gaps, inner)
                        if pieces:
                            hits.extend(pieces)
                            inner = end
                            unsorted = True
                            if last is None or pieces[-1][1] > last[1]:
                                last = pieces[-1]
                    continue
                if follows[rid] is not None or not self._acceptable(rid, m):
                    continue
                simple = plain[rid]
                found = [_new_hit(Hit, (start, end, *simple))] if simple is not None else self._expand(rid, m)
                hits.extend(found)
                inner = end
                unsorted = True
                if found and (last is None or found[-1][1] > last[1]):
                    last = found[-1]
                continue
            simple = plain[rid]
            if simple is not None:
                last = _new_hit(Hit, (start, end, *simple))
                hits.append(last)
                pos = end
                pos_rule = rid
                gaps = []
            elif self._acceptable(rid, m):
                after = follows[rid]
                if after is not None and not (last is not None and last[3] in after[0]
                                              and after[1](data, last[1], start) is not None):
                    continue  # not right after a hit of the rules it follows (the next list element)
                parts = self._expand(rid, m)
                hits.extend(parts)
                if parts:
                    last = parts[-1]
                pos = end
                gaps = _gaps(start, end, parts)
                gap_rule = pos_rule = rid
        if unsorted:
            hits.sort()
        return hits

    def _acceptable(self, rid: int, m: re.Match[bytes]) -> bool:
        rule, targets = self._targets[rid]
        if not rule.allow and rule.validate is None and targets[0][0] == "":
            return True  # the common case: the whole match, no checks
        seen = False
        for group, _kind in targets:
            value = m.group(group) if group else m.group(0)
            if value is None:
                continue
            seen = True
            if value in rule.allow or (rule.validate is not None and not rule.validate(value)):
                return False
        return seen

    def _expand(self, rid: int, m: re.Match[bytes]) -> list[Hit]:
        rule_id = self.rules[rid].id
        parts = self._expansions[rid]
        several = len(parts) > 1
        out = []
        for group, kind, names in parts:
            s, e = m.span(group)
            if s < 0 or s == e:
                continue
            if names:
                kind = _filled(kind, tuple(map(m.group, names)))
            if several:
                # A group that is on its own an identifier of another rule (the instance ID in an instance
                # ARN) takes that rule's kind, so it gets the same placeholder everywhere. (A group that is
                # the whole match is this rule's own: looking inside it finds this match again, endlessly.)
                if (s, e) != m.span():
                    kind = self._inner_kind(m.string[s:e], kind)
            out.append(_new_hit(Hit, (s, e, kind, rule_id)))
        if several:
            out.sort()
        return out

    def _inner_kind(self, value: bytes, kind: str) -> str:
        if not _ID_SHAPE.fullmatch(value):  # cheap test first: only prefix-hex IDs can be another rule's
            return kind
        inner = self.scan(value)
        if len(inner) == 1 and inner[0].start == 0 and inner[0].end == len(value):
            return inner[0].kind
        return kind

    def glued_pattern(self) -> re.Pattern[bytes] | None:
        """An underscore right before the literal a rule's match starts with after a word boundary
        (``web_i-0abc…``): the underscore is a word character, so the boundary fails there. None when no
        rule starts so."""
        # Their first 4 bytes are enough (a superset: it only costs a second scan now and then), as a trie.
        found = {lit[:4].lower() for rule in self.rules
                 for boundary, lit, _ in _literal_prefixes(rule.regex) or () if boundary}
        if not found:
            return None
        return re.compile(rb"_(?=(?i:" + _trie_regex(found) + rb"))")

    def standalone_rules(self) -> frozenset[str]:
        """Ids of the rules whose every example value is found again on its own, without the text around
        it (an instance ID, an IPv4 address, an AWS hostname): what they find, they find anywhere. Rules
        that need context (an account ID in an ARN, a bucket after ``s3://``) and rules without examples are
        not among them."""
        found = set()
        for rule in self.rules:
            values = [v.encode("utf-8") for ex in rule.examples for v in ex.masked]
            if values and all(self._whole(v) for v in values):
                found.add(rule.id)
        return frozenset(found)

    def line_starts(self) -> tuple[bytes, bytes]:
        """Where a rule demands a line start before its match (``(?m)^ROW-LABEL\\t…``, ``\\A``), what the
        match can start with: (a flag per first byte, a flag per first two bytes, ``b0 << 8 | b1``). A text
        scanned after context (a JSON value after its key) is no line start, so such a match at its start is
        only found by a scan of the text alone; this says when that scan can find something. All ones when
        a rule's start cannot be told."""
        one, two = bytearray(256), bytearray(65536)
        for rule in self.rules:
            starts = _anchored_starts(rule.compiled)
            if starts is None:
                return bytes([1]) * 256, bytes([1]) * 65536
            for p in starts:
                one[p[0]] = 1
                if len(p) == 1:  # the match may be one byte long: any second byte
                    two[p[0] << 8:(p[0] + 1) << 8] = bytes([1]) * 256
                else:
                    two[p[0] << 8 | p[1]] = 1
        return bytes(one), bytes(two)

    def _whole(self, value: bytes) -> bool:
        hits = self._scan(value)
        return len(hits) == 1 and hits[0][0] == 0 and hits[0][1] == len(value)

    def scan_values(self, data: bytes) -> list[bytes]:
        """The masked substrings of ``data`` (for rule examples and tools)."""
        return [data[h.start:h.end] for h in self.scan(data)]


_LINE_STARTS = {_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING}
_WORD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_SPACE = frozenset(b" \t\n\r\f\v")
_DIGIT = frozenset(b"0123456789")
_CATEGORIES = {_sre.CATEGORY_DIGIT: _DIGIT, _sre.CATEGORY_WORD: _WORD, _sre.CATEGORY_SPACE: _SPACE}
_NOT_CATEGORIES = {_sre.CATEGORY_NOT_DIGIT: _DIGIT, _sre.CATEGORY_NOT_WORD: _WORD,
                   _sre.CATEGORY_NOT_SPACE: _SPACE}
_ALL = frozenset(range(256))


def _anchored_starts(compiled: re.Pattern[bytes]) -> set[bytes] | None:
    """The first (up to two) bytes of the matches of ``compiled`` that a line anchor (``^``, ``\\A``)
    precedes; empty when no match starts at an anchor; None when they cannot be told (then assume any)."""
    try:
        tree = _sre_parse.parse(compiled.pattern, compiled.flags)
    except Exception:  # a pattern this reader does not know: assume anything
        return None
    return _anchored(list(tree), bool(compiled.flags & re.IGNORECASE))


def _icase(icase: bool, av: Any) -> bool:
    """Case-insensitivity inside a group ``(?i:…)`` / ``(?-i:…)`` (av: the group's parse tuple)."""
    return bool((icase or av[1] & re.IGNORECASE) and not av[2] & re.IGNORECASE)


_PREFIX = 2  # bytes of a match's start that are told apart
_PREFIXES_MAX = 20_000  # more possible starts than this: assume any


def _anchored(seq: list[Any], icase: bool) -> set[bytes] | None:
    """The starts of the paths through ``seq`` that begin (after zero-width items) with a line anchor."""
    for i, (op, av) in enumerate(seq):
        if op is _sre.AT:
            if av in _LINE_STARTS:
                starts = _prefixes(seq[i + 1:], icase)
                return None if starts is None or b"" in starts else starts
            continue  # \\b and the like: zero-width, look on
        if op in (_sre.ASSERT, _sre.ASSERT_NOT):
            continue
        if op is _sre.BRANCH:
            out: set[bytes] = set()
            for branch in av[1]:
                got = _anchored(list(branch) + seq[i + 1:], icase)
                if got is None:
                    return None
                out |= got
            return out
        if op is _sre.SUBPATTERN:  # (its flags apply inside it only)
            inner = _anchored(list(av[-1]), _icase(icase, av))
            if inner is None or inner:
                return inner
            empty = _prefixes(list(av[-1]), _icase(icase, av))
            return None if empty is None else _anchored(seq[i + 1:], icase) if b"" in empty else set()
        if op is _sre.ATOMIC_GROUP:
            return _anchored(list(av) + seq[i + 1:], icase)
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
            lo, _hi, item = av
            got = _anchored(list(item), icase)
            if got is None:
                return None
            if lo == 0:  # may be skipped: what follows may start the match too
                rest = _anchored(seq[i + 1:], icase)
                return None if rest is None else got | rest
            return got
        return set()  # a byte before any anchor: this path is no anchored start
    return set()


def _then(heads: set[bytes], tails: set[bytes]) -> set[bytes] | None:
    """Each of ``heads`` followed by each of ``tails``, cut to _PREFIX bytes."""
    out = {h for h in heads if len(h) >= _PREFIX}
    short = [h for h in heads if len(h) < _PREFIX]
    for h in short:
        out.update((h + t)[:_PREFIX] for t in tails)
        if len(out) > _PREFIXES_MAX:
            return None
    return out


def _prefixes(seq: list[Any], icase: bool) -> set[bytes] | None:
    """The starts (up to _PREFIX bytes; b"" if it can match nothing) of what ``seq`` matches."""
    out: set[bytes] | None = {b""}
    for op, av in seq:
        item = _item_prefixes(op, av, icase)
        if item is None:
            return None
        out = _then(out, item)  # type: ignore[arg-type]
        if out is None:
            return None
        if all(len(p) >= _PREFIX for p in out):
            break
    return out


def _item_prefixes(op: Any, av: Any, icase: bool) -> set[bytes] | None:
    if op is _sre.LITERAL:
        return {bytes([c]) for c in _folded({av}, icase)}
    if op is _sre.NOT_LITERAL:
        return {bytes([c]) for c in _ALL - _folded({av}, icase)}
    if op is _sre.ANY:
        return {bytes([c]) for c in _ALL}
    if op is _sre.IN:
        members = _in_set(av)
        return None if members is None else {bytes([c]) for c in _folded(members, icase)}
    if op in (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT):
        return {b""}  # zero-width
    if op is _sre.BRANCH:
        out: set[bytes] = set()
        for branch in av[1]:
            got = _prefixes(list(branch), icase)
            if got is None:
                return None
            out |= got
        return out
    if op is _sre.SUBPATTERN:
        return _prefixes(list(av[-1]), _icase(icase, av))
    if op is _sre.ATOMIC_GROUP:
        return _prefixes(list(av), icase)
    if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
        lo, hi, inner = av
        one = _prefixes(list(inner), icase)
        if one is None:
            return None
        res: set[bytes] = {b""} if lo == 0 else set()
        cur: set[bytes] | None = {b""}
        for n in range(1, min(hi, _PREFIX) + 1):  # more repetitions do not change the first bytes
            cur = _then(cur, one)  # type: ignore[arg-type]
            if cur is None:
                return None
            if n >= lo or n == _PREFIX:
                res |= cur
        return res
    return None  # a back-reference, a conditional: cannot be told


def _folded(found: set[int] | frozenset[int], icase: bool) -> set[int]:
    return set(found) | {c ^ 0x20 for c in found if 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A} if icase \
        else set(found)


def _in_set(items: list[Any]) -> set[int] | None:
    out: set[int] = set()
    negate = False
    for op, av in items:
        if op is _sre.NEGATE:
            negate = True
        elif op is _sre.LITERAL:
            out.add(av)
        elif op is _sre.RANGE:
            out.update(range(av[0], av[1] + 1))
        elif op is _sre.CATEGORY and av in _CATEGORIES:
            out |= _CATEGORIES[av]
        elif op is _sre.CATEGORY and av in _NOT_CATEGORIES:
            out |= _ALL - _NOT_CATEGORIES[av]
        else:
            return None
    return set(_ALL - out) if negate else out


def release_freed_memory() -> bool:
    """Hand memory that was freed but kept by the C allocator back to the OS (glibc's ``malloc_trim``).

    Compiling the catalog's Hyperscan databases needs ~15 MiB of working memory for ~1 MiB of databases;
    glibc keeps what was freed in its heap, so without this the proxy's RSS stays that much higher for
    its whole life. False where there is no glibc (macOS, musl): nothing to do there."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None

# Compiled databases by pattern tuple: building the same catalog again (reloads, tests) costs nothing.
_HS_CACHE: dict[tuple[bytes, ...], tuple[Any, list[list[tuple[int, int]]], Any, set[int]]] = {}


def _compile_hyperscan(patterns: tuple[bytes, ...], rule_ids: list[str], subset: list[int],
                       flags: int) -> tuple[Any, list[int]]:
    """Compile the patterns of ``subset`` that Hyperscan accepts into one database; return it and the
    indexes it covers."""
    assert hyperscan is not None

    def compile_db(ids: list[int]) -> Any:
        db = hyperscan.Database()
        db.compile(expressions=[patterns[i] for i in ids], ids=ids, elements=len(ids),
                   flags=[flags] * len(ids))
        return db

    if not subset:
        return None, []
    ok = list(subset)
    try:
        db = compile_db(ok)
    except hyperscan.error:
        # Find the rules Hyperscan cannot take; they run on Python re.
        ok = []
        for i in subset:
            try:
                compile_db([i])
            except hyperscan.error as e:
                log.info("rule %s runs on Python re (Hyperscan: %s)", rule_ids[i], e)
                continue
            ok.append(i)
        db = compile_db(ok) if ok else None
    return db, ok


def _build_databases(rules: Sequence[Rule], patterns: tuple[bytes, ...]) \
        -> tuple[Any, list[list[tuple[int, int]]], Any, set[int]]:
    """Two Hyperscan databases: the literal prefixes of rules that start with one, and the whole regexes
    of the others (matched without start-of-match tracking, which is several times faster)."""
    assert hyperscan is not None
    ids = [r.id for r in rules]
    literals: dict[tuple[bool, bytes, bool], list[tuple[int, int]]] = {}
    rest: list[int] = []
    for i, rule in enumerate(rules):
        prefixes = _literal_prefixes(rule.regex)
        if prefixes is None or _weak(prefixes):
            rest.append(i)
            continue
        for boundary, literal, caseless in prefixes:
            literals.setdefault((boundary, literal, caseless), []).append((i, len(literal)))
    lit_patterns: list[bytes] = []
    lit_flags: list[int] = []
    locators: list[list[tuple[int, int]]] = []  # literal id -> [(rule index, literal length)]
    for (boundary, literal, caseless), users in literals.items():
        lit_patterns.append((b"\\b" if boundary else b"") + b"".join(b"\\x%02x" % c for c in literal))
        lit_flags.append(hyperscan.HS_FLAG_CASELESS if caseless else 0)
        locators.append(users)
    db_start = None
    if lit_patterns:
        db_start = hyperscan.Database()
        db_start.compile(expressions=lit_patterns, ids=list(range(len(lit_patterns))),
                         elements=len(lit_patterns), flags=lit_flags)
    relaxed = tuple(_end_pattern(p, _max_width(r.regex))[0] for p, r in zip(patterns, rules, strict=True))
    db_end, ok_end = _compile_hyperscan(relaxed, ids, rest, 0)
    ok = {rid for users in locators for rid, _ in users} | set(ok_end)
    return db_start, locators, db_end, ok


MIN_LITERAL = 2  # a shorter literal prefix would be found everywhere: such rules are matched whole


def _weak(prefixes: list[tuple[bool, bytes, bool]]) -> bool:
    """Literal prefixes that are poor anchors in AWS text, so the rule is matched whole instead: many short
    alternatives (region prefixes such as ``us-``, found in every region name) or a short literal that is
    a common word on its own (``s3``). Short literals ending in ``-`` (``i-``, ``sg-``) stay: they are rare
    outside identifiers."""
    short = [lit for _, lit, _ in prefixes if len(lit) <= 3]
    return len(short) > 4 or any(not lit.endswith(b"-") and len(lit) <= 2 for lit in short)


MAX_PREFIXES = 32  # expanding optional parts and alternatives stops before it yields more literals


def _literal_prefixes(regex: str) -> list[tuple[bool, bytes, bool]] | None:
    """The literals every match of ``regex`` starts with: (preceded by \\b, literal, case-insensitive).

    Alternatives, optional parts and small character sets are expanded (``arn:aws(?:-cn)?:iam::`` gives
    ``arn:aws:iam::`` and ``arn:aws-cn:iam::``) as long as that yields few literals. None when some match may
    start otherwise (a character class, a repeat) or a literal would be shorter than MIN_LITERAL."""
    from re import _constants as sre  # type: ignore[attr-defined]

    try:
        parsed = re._parser.parse(regex.encode("utf-8"))  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - a private API; be safe
        return None
    caseless = [bool(parsed.state.flags & re.IGNORECASE)]
    Prefix = tuple[bool, bytes, bool]  # (\\b before it, literal so far, can still be extended)

    def seq(items: Any, prefixes: list[Prefix]) -> list[Prefix]:
        """Extend the open ``prefixes`` by the items; a prefix closes where an item is not literal."""
        for op, av in items:
            if not any(o for _, _, o in prefixes):
                break
            if op in (sre.ASSERT, sre.ASSERT_NOT):
                continue  # a look-around consumes nothing: the literal goes on after it
            if op is sre.AT:
                if av is sre.AT_BOUNDARY:
                    prefixes = [(b or (o and not lit), lit, o) for b, lit, o in prefixes]
                continue  # other assertions only narrow the matches: the literal still holds
            if op is sre.LITERAL:
                prefixes = [(b, lit + bytes((av,)), o) if o else (b, lit, o) for b, lit, o in prefixes]
                continue
            alternatives: list[Any] | None = None
            if op is sre.SUBPATTERN:
                if av[1] & re.IGNORECASE:
                    caseless[0] = True
                alternatives = [av[-1]]
            elif op is sre.BRANCH:
                alternatives = list(av[1])
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT) and av[0] == 0 and av[1] == 1:
                alternatives = [[], av[2]]
            elif op is sre.IN and len(av) <= 4 and all(o is sre.LITERAL for o, _ in av):
                alternatives = [[(sre.LITERAL, c)] for _, c in av]
            if alternatives is None:
                return [(b, lit, False) for b, lit, _ in prefixes]
            closed = [p for p in prefixes if not p[2]]
            opened = [p for p in prefixes if p[2]]
            extended: list[Prefix] = []
            for alternative in alternatives:
                extended.extend(seq(alternative, opened))
            if len(extended) + len(closed) > MAX_PREFIXES:
                return [(b, lit, False) for b, lit, _ in prefixes]
            prefixes = closed + extended
        return prefixes

    found = seq(parsed, [(False, b"", True)])
    if not found or any(len(lit) < MIN_LITERAL for _, lit, _ in found):
        return None
    return [(b, lit, caseless[0]) for b, lit in dict.fromkeys((b, lit) for b, lit, _ in found)]


def _gaps(start: int, end: int, parts: list[Hit]) -> list[tuple[int, int]]:
    """The spans of [start, end) that ``parts`` (sorted) do not cover, of at least MIN_GAP bytes."""
    out = []
    at = start
    for h in parts:
        if h[0] - at >= MIN_GAP:
            out.append((at, h[0]))
        at = max(at, h[1])
    if end - at >= MIN_GAP:
        out.append((at, end))
    return out


def _in_gaps(parts: list[Hit], gaps: list[tuple[int, int]], after: int) -> list[Hit]:
    """The pieces of ``parts`` (sorted) that lie in ``gaps`` and after ``after``."""
    out = []
    for h in parts:
        for gs, ge in gaps:
            s, e = max(h[0], gs, after), min(h[1], ge)
            if s < e:
                out.append(h if (s, e) == (h[0], h[1]) else _new_hit(Hit, (s, e, h[2], h[3])))
    return out


MIN_GAP = 7  # shorter unmasked context cannot hold an identifier (the shortest, an IPv4 address, has 7 bytes)
_START_LONGEST_RULE = operator.itemgetter(0, 1, 2)  # (start, -end, rule index): never the match itself


CACHE_MIN = 512  # texts at least this long have their scan results remembered by hash, shorter ones as such
SMALL_ENTRIES = 4096  # ... at most this many short ones (<= 2 MB)
CACHE_ENTRIES = 4096  # ... at most this many (least recently used go first)
CACHE_HITS = 20_000  # ... holding at most this many hits together (~4 MB with their keys)
WINDOW = 1024  # how far back from a match end a rule is searched first (its longest match if shorter)
MAX_WINDOW = 64 * 1024  # ... and at most, when a rule's matches may be longer than WINDOW


def _end_pattern(pattern: bytes, width: int) -> tuple[bytes, bool]:
    """The pattern of a rule for the database that reports where matches end, and whether an end may lie
    past the real one (see ``_consume_lookarounds``: not for rules whose matches may be longer than the
    window, whose search checks that every reported end is a match's end)."""
    consumed, past = _consume_lookarounds(pattern, ahead=width < WINDOW)
    return _long_repeats_unbounded(_without_assertions(consumed)), past


LONG_REPEAT = 16  # a bounded repeat allowing this many or more is compiled as open-ended for the end database
_BOUNDED = re.compile(rb"\{([0-9]+),([0-9]+)\}")


def _long_repeats_unbounded(pattern: bytes) -> bytes:
    r"""``pattern`` with every bounded repeat ``{m,n}`` of a single item (a character, a class, an escape)
    whose ``n`` is LONG_REPEAT or more made open-ended (``{m,}``), outside character classes and escapes.

    For the database that only reports where matches END: the pattern then matches more, so every end of
    the real regex is still reported (the rule's regex confirms each candidate, and its window reaches back
    as far as its own longest match). Hyperscan compiles long bounded repeats slowly and in much memory: the
    catalog took 1.1 s to build with them (an external ID's ``{2,1224}`` alone 0.4 s), ~0.5 s without; the
    scan is as fast and finds the same. Repeats of a group stay as they are: ``(?:[^\t\r\n]*\t){0,40}?``
    (the columns before an account ID in a text table) made open-ended reported an end, never a match, in
    every row of more than 40 columns, and each such end of a rule without a longest match is searched
    again 64 KiB back (table rows of 1.2 KB: 0.3 s per MB instead of 0.003 s)."""
    out = bytearray()
    i, n = 0, len(pattern)
    after_group = False  # the item before a repeat is a group
    while i < n:
        c = pattern[i]
        if c == 0x5C and i + 1 < n:  # an escape: two bytes (\{ is a literal brace)
            out += pattern[i:i + 2]
            i += 2
            after_group = False
        elif c == 0x5B:  # a class: as it is
            j = _class_end(pattern, i)
            out += pattern[i:j]
            i = j
            after_group = False
        elif c == 0x7B and (m := _BOUNDED.match(pattern, i)) is not None and int(m.group(2)) >= LONG_REPEAT \
                and not after_group:
            out += b"{%s,}" % m.group(1)
            i = m.end()
        else:
            out.append(c)
            i += 1
            after_group = c == 0x29
    return bytes(out)


def _max_width(regex: str) -> int:
    """The longest match ``regex`` can have in bytes, or WINDOW when that is more (or unbounded)."""
    try:
        width = re._parser.parse(regex.encode("utf-8")).getwidth()[1]  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - a private API; be safe
        return WINDOW
    return min(int(width), WINDOW)


def _mandatory_groups(compiled: re.Pattern[bytes]) -> set[str]:
    """The names of the groups of ``compiled`` that take part in every match (not inside an alternative, an
    optional part or a look-around)."""
    try:
        tree = _sre_parse.parse(compiled.pattern, compiled.flags)
    except Exception:  # pragma: no cover - a private API; be safe
        return set()
    found: set[int] = set()

    def walk(seq: Any) -> None:
        for op, av in seq:
            if op is _sre.SUBPATTERN:
                if av[0] is not None:
                    found.add(av[0])
                walk(av[-1])
            elif op is _sre.ATOMIC_GROUP:
                walk(av)
            elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT) and av[0] >= 1:
                walk(av[2])

    walk(tree)
    return {name for name, index in compiled.groupindex.items() if index in found}


def _stopper(regex: str) -> Callable[[bytes, int, int], re.Match[bytes] | None] | None:
    """The ``search`` method of a pattern that finds a byte no match of ``regex`` contains (outside its
    look-arounds), or None when a match may contain any byte (or that cannot be told)."""
    try:
        parsed = _sre_parse.parse(regex.encode("utf-8"))
    except Exception:  # pragma: no cover - a private API; be safe
        return None
    taken = _taken(list(parsed), bool(parsed.state.flags & re.IGNORECASE))
    if taken is None or taken == _ALL:
        return None
    return re.compile(b"[" + b"".join(re.escape(bytes([c])) for c in sorted(_ALL - taken)) + b"]").search


def _taken(seq: list[Any], icase: bool) -> set[int] | None:
    """The bytes that matches of ``seq`` may contain (None: cannot be told)."""
    out: set[int] = set()
    for op, av in seq:
        got: set[int] | None
        if op is _sre.LITERAL:
            got = _folded({av}, icase)
        elif op is _sre.NOT_LITERAL:
            got = set(_ALL - _folded({av}, icase))
        elif op is _sre.ANY:
            got = set(_ALL)
        elif op is _sre.IN:
            members = _in_set(av)
            got = None if members is None else _folded(members, icase)
        elif op in (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT):
            continue  # zero-width: what a look-around reads is no part of the match
        elif op is _sre.BRANCH:
            got = set()
            for branch in av[1]:
                one = _taken(list(branch), icase)
                if one is None:
                    return None
                got |= one
        elif op is _sre.SUBPATTERN:
            got = _taken(list(av[-1]), _icase(icase, av))
        elif op is _sre.ATOMIC_GROUP:
            got = _taken(list(av), icase)
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
            got = _taken(list(av[2]), icase)
        else:
            return None  # a back-reference, a conditional: anything
        if got is None:
            return None
        out |= got
    return out


_ZERO_WIDTH = (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT)


def _no_inner_start(compiled: re.Pattern[bytes]) -> bool:
    """Whether no match of ``compiled`` can start inside another: it opens with a one-byte look-behind
    ``(?<![B])`` and every byte of a match but its last is in B (an IPv4 address, ``(?<![0-9A-Za-z.])``, is
    digits and dots up to the byte after it). False when that cannot be told."""
    try:
        tree = list(_sre_parse.parse(compiled.pattern, compiled.flags))
    except Exception:  # pragma: no cover - a private API; be safe
        return False
    icase = bool(compiled.flags & re.IGNORECASE)
    if not tree or tree[0][0] is not _sre.ASSERT_NOT or tree[0][1][0] != -1:
        return False
    behind = list(tree[0][1][1])
    if len(behind) != 1:
        return False
    op, av = behind[0]
    if op is _sre.LITERAL:
        forbidden: set[int] | None = _folded({av}, icase)
    elif op is _sre.IN:
        members = _in_set(av)
        forbidden = None if members is None else _folded(members, icase)
    else:
        return False
    if not forbidden:
        return False

    def inside(seq: list[Any]) -> bool:
        """Every byte a match of ``seq`` takes, but its last, is forbidden after."""
        while seq and seq[-1][0] in _ZERO_WIDTH:
            seq = seq[:-1]
        if not seq:
            return True
        for item in seq[:-1]:
            taken = _taken([item], icase)
            if taken is None or not taken <= forbidden:
                return False
        op, av = seq[-1]
        taken = _taken([seq[-1]], icase)
        if taken is not None and taken <= forbidden:
            return True
        if op is _sre.SUBPATTERN:
            return inside(list(av[-1]))
        if op is _sre.BRANCH:
            return all(inside(list(alt)) for alt in av[1])
        try:
            return int(_sre_parse.SubPattern(_sre_parse.State(), [seq[-1]]).getwidth()[1]) <= 1
        except Exception:  # pragma: no cover
            return False

    return inside(tree[1:])


def _lookahead_reach(regex: str) -> int:
    """How far past the end of its match ``regex`` may look (its longest look-ahead), at most WINDOW."""
    from re import _constants as sre  # type: ignore[attr-defined]

    try:
        parsed = re._parser.parse(regex.encode("utf-8"))  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - a private API; be safe
        return WINDOW

    def reach(items: Any) -> int:
        best = 0
        for op, av in items:
            if op in (sre.ASSERT, sre.ASSERT_NOT) and av[0] == 1:
                best = max(best, int(av[1].getwidth()[1]), reach(av[1]))
            elif op is sre.SUBPATTERN:
                best = max(best, reach(av[-1]))
            elif op is sre.BRANCH:
                best = max([best, *(reach(alt) for alt in av[1])])
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
                best = max(best, reach(av[2]))
            elif op is sre.ATOMIC_GROUP:
                best = max(best, reach(av))
        return best

    return min(reach(parsed), WINDOW)


def _trie_regex(words: set[bytes]) -> bytes:
    """A regex matching any of ``words`` (or a longer text that starts with one), factored as a trie so
    that it costs a few steps per position, not one per word."""
    trie: dict[int | None, Any] = {}
    for word in words:
        node = trie
        for c in word:
            node = node.setdefault(c, {})
        node[None] = {}

    def build(node: dict[int | None, Any]) -> bytes:
        if None in node:
            return b""  # a word ends here: what follows does not matter
        alts = [re.escape(bytes([c])) + build(child) for c, child in sorted(node.items()) if c is not None]
        return alts[0] if len(alts) == 1 else b"(?:" + b"|".join(alts) + b")"

    return build(trie)


@functools.lru_cache(maxsize=256)
def _template_groups(kind: str) -> tuple[str, ...]:
    return tuple(TEMPLATE_RE.findall(kind))


@functools.lru_cache(maxsize=4096)
def _filled(kind: str, values: tuple[bytes | None, ...]) -> str:
    parts = iter(values)
    return TEMPLATE_RE.sub(lambda g: _kind_part(next(parts)), kind)


@functools.lru_cache(maxsize=1024)
def _kind_part(value: bytes | None) -> str:
    text = (value or b"").decode("ascii", "replace").upper()
    text = re.sub(r"[^A-Z0-9]+", "_", text).strip("_")
    text = re.sub(r"_(?=[0-9])", "", text)  # every segment must start with a letter
    return text if text[:1].isalpha() else "X" + text
