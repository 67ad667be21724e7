"""Masking request bodies: find identifiers, ask the store for placeholders once, rewrite the body.

Masking is split in two so the (possibly remote) store is called once per request with every identifier:

    plan = body_masker.plan(content, content_type)      # scan; nothing changed yet
    placeholders = await store.placeholders_for(plan.items)
    new_content = plan.render(placeholders)

JSON bodies are masked inside every string value at any depth (keys and other values stay); form bodies
value by value; anything else as bytes. A JSON body that does not parse (or is nested too deep for the JSON
parser) is masked as text, which still finds every identifier that is not itself JSON-escaped.

Many identifiers are only recognisable by what precedes them: a secret access key or a bare account ID
after a label naming it. In structured JSON (a tool call's input object, say) that label is the value's key,
not part of the string, so short values are scanned after their key, written the way it
would appear in text (``"SecretAccessKey": "`` for a value, ``"AWS": ["`` for a list element, ``key=`` in a
form); only hits inside the value count.

Text that is itself JSON (a JSON Lines body, a tool result or arguments JSON-encoded into a string, a body
that is not valid JSON) holds escapes: in ``"Instances:\\ni-0abc…"`` the identifier follows the letter
``n`` of ``\\n``, so no word boundary precedes it. Text with escapes that stand for separators — of control
characters (``\\n``, ``\\t``, ``\\r``, ``\\b``, ``\\f``) and ``\\uXXXX`` of characters that are not ASCII
(``json.dumps`` writes “i-0abc…” as ``\\u201ci-0abc…``) — is scanned a second time with each read as the
separator it stands for, and the hits of both scans are merged. So is an underscore glued to the start of an
identifier (``web_i-0abc…``: the underscore is a word character). Text with percent-encoding (a URL:
``?prefix=AWSLogs%2F123456789012%2F``) is scanned decoded as well; such a hit covers the escapes of its
characters, and its original is the encoded text. So is text with HTML/XML character references (a page's
source, an XML report: ``&quot;OwnerId&quot;: &quot;123456789012&quot;``, ``role&#x2F;deploy``), and text
with both references and backslash escapes (a page's source JSON-encoded into a string) with both decoded.
Text sent as base64 (a ``text/plain`` document, a ``data:text/csv;base64,`` URL) is decoded, masked and
encoded again; binary media types are not decoded.

A cell of an AWS CLI ``--output table`` table is named by the header row above it, not by its own line
(``||  111122223333 |`` under ``||   accountId   |``): text with a table (a ``|`` and a ``+---`` line break)
is also read as the JSON objects and key/value rows its tables stand for (tables.py), and the hits inside the
cells' values are mapped back to the table; a table in a JSON string is read with its escapes decoded.

A body in a charset that does not write ASCII as ASCII bytes (UTF-16, UTF-32, EBCDIC) is decoded, masked as
UTF-8 and encoded back; if its bytes read as they are also show identifiers, it is refused (UnreadableBody).

A name that a rule recognised by its context (an account ID in an ARN, a role's name after ``role/``) is
then masked wherever else it stands on its own in the request, with the same placeholder (rule id
``repeat``; see ``BodyMasker._repeats``).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import html.entities
import json
import operator
import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes, urlencode

from . import tables
from .placeholders import TOKEN_RE
from .scanner import Hit, Scanner

Key = tuple[str, bytes]  # (placeholder kind, original)
Decoded = tuple[bytes, list[int], list[int]]  # text decoded once, where each escape lands, shifts after each
Decoder = Callable[[bytes], Decoded | None]
Others = Callable[[dict[bytes, str], dict[bytes, str]], None]  # see BodyMasker._repeats


@dataclass
class Segment:
    data: bytes
    hits: list[Hit]
    keys: list[Key] = field(default_factory=list)  # (kind, original) of each hit
    hidden: bool = False  # its text is not in the body as it is (a base64 document, decoded)


@dataclass
class MaskPlan:
    """The identifiers found in one body and how to put the body back together with placeholders."""

    format: str  # "json", "form", "text" or "empty"
    segments: list[Segment] = field(default_factory=list)
    items: list[Key] = field(default_factory=list)  # unique, in order of first appearance
    item_rules: list[str] = field(default_factory=list)  # the rule that found each item first
    rule_counts: Counter[str] = field(default_factory=Counter)
    names: dict[bytes, str] = field(default_factory=dict)  # originals masked wherever they repeat -> kind
    names_left: int = 0  # at most this many names were not searched for repeats (see REPEAT_BUDGET)
    # text of the body that is not in its bytes as it is and holds "AWS_" (a base64 document, a UTF-16 body,
    # decoded): where the placeholders the request holds as text are looked for besides the body's bytes
    decoded_texts: list[bytes] = field(default_factory=list)
    _assemble: Callable[[list[bytes]], bytes] | None = None

    @property
    def count(self) -> int:
        return sum(self.rule_counts.values())

    def placeholder_rules(self, placeholders: Sequence[bytes]) -> dict[bytes, str]:
        """Placeholder -> id of the rule that found its original (the first, if several did)."""
        return dict(zip(placeholders, self.item_rules, strict=True))

    def render(self, placeholders: Sequence[bytes]) -> tuple[bytes, dict[bytes, bytes]]:
        """Return the masked body and the placeholder -> original mapping of this request."""
        by_key = dict(zip(self.items, placeholders, strict=True))
        mapping = {p: k[1] for k, p in by_key.items()}
        rendered = []
        for seg in self.segments:
            hits = seg.hits
            if not hits:
                rendered.append(seg.data)
                continue
            data = seg.data
            # The text between hits and the placeholders, interleaved: slicing and lookups run in C.
            gaps = map(slice, [0, *[h[1] for h in hits]], [*[h[0] for h in hits], len(data)])
            parts = [b""] * (2 * len(hits) + 1)
            parts[0::2] = map(data.__getitem__, gaps)
            parts[1::2] = map(by_key.__getitem__, seg.keys)
            rendered.append(b"".join(parts))
        assert self._assemble is not None
        return self._assemble(rendered), mapping


# Backslash escapes as JSON (and C, and Python) write them: \n before an ID, \" around a key, \/ inside an
# ARN, \u201c or \u0022 before an ID (json.dumps writes every non-ASCII character so; Go, Gson and .NET
# escape ASCII punctuation too).
_BACKSLASH_ESCAPE = re.compile(rb'\\(?:u([0-9a-fA-F]{4})|(["\\/bfnrt]))')
_SHORT_ESCAPES = {b'"': b'"', b"\\": b"\\", b"/": b"/", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r",
                  b"t": b"\t"}
# What sits between words and hides the boundary before an ID, read as blanks of the same length: terminal
# colours (grep --color, loggers: ESC[01;31m ends in a letter), a no-break space after a label (copied from
# a web page), the line-number gutter of a file as Claude Code's Read tool shows it ("    12→").
_BLANKS = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]{0,256}(?:\x07|\x1b\\)|\xc2\xa0|"
                     rb"(?m:^[ \t]*[0-9]+\xe2\x86\x92)")
_PERCENT = re.compile(rb"%[0-9A-Fa-f]{2}")  # what unquote_to_bytes decodes
CONTEXT_VALUE_MAX = 1024  # string values up to this long are scanned after their key
CONTEXT_KEY_MAX = 64  # ... of which the last this many bytes are used (rules look a few words back)
CONTEXT_ENTRIES = 4096  # contexts of this many keys are remembered
UNESCAPED_ENTRIES = 4096  # texts whose escapes were decoded and scanned, remembered with their hits
UNESCAPED_HITS_MAX = 256  # ... if they have at most this many
INLINE_ENTRIES = 4096  # short JSON values (with their key) whose hits are remembered (<= ~4.5 MB)
TABLES_ENTRIES = 1024  # texts whose tables were read (tables.py), remembered with the hits in their cells


class BodyMasker:
    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner
        self._value_context: dict[str, bytes] = {}  # JSON key -> b'"key": "' (keys repeat a lot)
        self._list_context: dict[bytes, bytes] = {}  # b'"key": [' -> b'"key": ["'
        self._glued = scanner.glued_pattern()  # "_" right before an ID's literal start: web_i-0abc…
        self.mask_keys = False  # also JSON object keys (masker_json_keys)
        # what _unescaped found, by text (short) or 128-bit hash (long)
        self._unescaped_seen: dict[bytes, list[tuple[Hit, Key]]] = {}
        # rules that find what they find anywhere: their originals need no search for repeats
        self._standalone = scanner.standalone_rules() | {REPEAT_RULE}
        self._also: Sequence[tuple[Hit, Key]] = ()  # see plan()
        self._line_one, self._line_two = scanner.line_starts()  # how matches anchored at a line start begin
        # context + short JSON value -> its hits: most strings of a request came in the last one too
        self._inline_seen: dict[bytes, tuple[tuple[Hit, ...], tuple[Key, ...]]] = {}
        self._tables_seen: dict[bytes, list[Hit]] = {}  # text (short) or its hash -> hits in its tables

    def _context_for(self, key: str) -> bytes:
        contexts = self._value_context
        if len(contexts) >= CONTEXT_ENTRIES:
            contexts.clear()
            self._list_context.clear()
        context = contexts[key] = _key_context(key, b'": "')
        return context

    def clear_cache(self) -> None:
        """Forget remembered scans (the scanner's and this masker's; benchmarks measure cold scans)."""
        self.scanner.clear_cache()
        self._inline_seen.clear()
        self._unescaped_seen.clear()
        self._tables_seen.clear()

    def scan_text(self, data: bytes) -> tuple[list[Hit], list[Key]]:
        """``scan_keys(data)``, plus what backslash escapes, percent-encoding and underscores glued to an
        identifier hide (see the module docstring)."""
        hits, keys = self.scanner.scan_keys(data)
        return self._with_decodings(data, hits, keys)

    def _with_decodings(self, data: bytes, hits: list[Hit], keys: list[Key]) -> tuple[list[Hit], list[Key]]:
        """``hits`` plus the hits of ``data`` read decoded: backslash escapes of separators as separators,
        percent-encoding decoded, an underscore glued to an identifier as a space. Each decoding that applies
        is one more scan (remembered like any other); most texts need none."""
        found: list[tuple[Hit, Key]] = []
        have = set(hits)
        entities = 0x26 in data and _ENTITY.search(data) is not None  # "&": HTML/XML character references
        if 0x5C in data and _BACKSLASH_ESCAPE.search(data):  # 0x5C: a backslash (an int needle: fast)
            decoded = self._unescaped(data, have)
            if entities:  # both (a page's source JSON-encoded into a string): read with both decoded too
                decoded = decoded + self._decoded_scan(data, have, (_unescape_once, _unentity_once), b"\\&")
            found += decoded
            # A name without a word boundary before it (a hostname, a bucket) takes the letter of an escape
            # into itself in the bytes ("\\nmy-bucket.s3..." reads as "nmy-bucket"): such a hit gives way to
            # the decoded text's hit over it.
            escaped = {k for k, h in enumerate(hits) if _after_escape(data, h[0])
                       and any(d[0] < h[1] and h[0] < d[1] for d, _ in decoded)}
            if escaped:
                hits = [h for k, h in enumerate(hits) if k not in escaped]
                keys = [x for k, x in enumerate(keys) if k not in escaped]
        if 0x1B in data or (0xC2 in data and data.find(b"\xc2\xa0") >= 0) or \
                (0xE2 in data and data.find(b"\xe2\x86\x92") >= 0):  # int needles first: memchr
            for alt in self._blanked(data):  # same length: every offset holds; originals are taken from data
                found += [(h, (h[2], data[h[0]:h[1]])) for h in self.scanner.remembered(alt)[0]
                          if h not in have]
        if 0x25 in data or (0x24 in data and data.find(b"$25") >= 0):  # "%", or the console's "$25"
            found += self._percent_encoded(data, have)
        if entities:
            found += self._decoded_scan(data, have, (_unentity_once,), b"&")
        if 0x5F in data and self._glued is not None and self._glued.search(data):  # "_" before an ID
            alt = self._glued.sub(b" ", data)  # same length
            found += [(h, (h[2], data[h[0]:h[1]])) for h in self.scanner.remembered(alt)[0] if h not in have]
        if 0x7C in data and (at := tables.find(data)) >= 0:  # "|", "+---": cells read after their header
            alt = _BLANKS.sub(_blank, data) if 0x1B in data or 0xC2 in data or 0xE2 in data else data
            found += [(h, (h[2], data[h[0]:h[1]])) for h in self._table_hits(alt, at) if h not in have]
        if not found:
            return hits, keys
        return _merge([*zip(hits, keys, strict=True), *found])

    def _blanked(self, data: bytes) -> list[bytes]:
        """``data`` with terminal colours, no-break spaces and line-number gutters as blanks; and that again
        with an underscore glued to an identifier as a space, if there is one (same length). Both: the
        second view would also cut names that hold an underscore before such a literal (``aws_iam_role``
        in coloured Terraform output)."""
        alt = _BLANKS.sub(_blank, data) if 0x1B in data or 0xC2 in data or 0xE2 in data else data
        if self._glued is not None and 0x5F in alt and self._glued.search(alt):
            return [alt, self._glued.sub(b" ", alt)]
        return [alt]

    def _unescaped(self, data: bytes, hits: set[Hit]) -> list[tuple[Hit, Key]]:
        """Hits in ``data`` with its backslash escapes decoded (up to three times: JSON inside a JSON string
        inside a JSON string), as spans of ``data``: a hit covers the escapes of its characters, and its
        original is the escaped text. Remembered: decoding costs ~1-2 µs per escape, and a conversation
        sends the same texts again with every turn."""
        key = data if len(data) < 512 else hashlib.blake2b(data, digest_size=16).digest()
        found = self._unescaped_seen.get(key)
        if found is None:
            # remembered whatever ``hits`` are: they depend on the context the text was scanned after
            found = self._decoded_scan(data, set(), (_unescape_once,), b"\\")
            if len(self._unescaped_seen) >= UNESCAPED_ENTRIES:
                self._unescaped_seen.clear()  # refills with what still comes
            if len(found) <= UNESCAPED_HITS_MAX:  # memory stays bounded (the scanner keeps the scan itself)
                self._unescaped_seen[key] = found
        return [x for x in found if x[0] not in hits] if hits else found

    def _decoded_scan(self, data: bytes, hits: set[Hit], decoders: Sequence[Decoder],
                      markers: bytes) -> list[tuple[Hit, Key]]:
        """Hits of ``data`` decoded by each of ``decoders`` in turn (up to three times, while one of
        ``markers`` — the bytes escapes start with — is left), mapped back to spans of ``data``."""
        rounds: list[tuple[list[int], list[int]]] = []  # per decoding: where escapes land, shift after each
        decoded = data
        for _ in range(3):
            done = len(rounds)
            for decode_once in decoders:
                once = decode_once(decoded)
                if once is not None:
                    decoded, landed, shifts = once
                    rounds.append((landed, shifts))
            if len(rounds) == done or not any(m in decoded for m in markers):
                break
        if not rounds:
            return []
        views = self._blanked(decoded)
        found = self.scanner.remembered(views[0])[0]
        if len(views) > 1:  # also with glued underscores as spaces: both views' hits, merged
            found = _merge([(h, (h[2], b"")) for v in views for h in self.scanner.remembered(v)[0]])[0]
        if (at := tables.find(decoded)) >= 0:  # a table in a JSON string: cells read after their header
            found = [*found, *self._table_hits(views[0], at)]
        out = []
        for h in found:
            s, e = h[0], h[1]
            for landed, shifts in reversed(rounds):  # back through each decoding, innermost first
                i = bisect_left(landed, s)
                s += shifts[i - 1] if i else 0
                i = bisect_left(landed, e)
                e += shifts[i - 1] if i else 0
            hit = Hit(s, e, h[2], h[3])
            if hit not in hits:
                out.append((hit, (h[2], data[s:e])))
        return out

    def _table_hits(self, data: bytes, at: int) -> list[Hit]:
        """Hits in the cells of the tables ``data`` holds from ``at`` (its first "+---") on, each cell read
        after the field name its header row (or its key/value row) gives it (see tables.py); only hits
        inside a cell's value count. Remembered: reading a table costs ~40 ns a byte (twice its scan), and a
        conversation sends the same tool results again with every turn. By the text from the line of ``at``
        on, and where that line starts (all the reader reads); a text with no line break that has a row
        under it is not hashed for it (hashing costs ~1-2 ms a MiB: more than looking)."""
        if len(data) < 512:
            key = data
        elif tables.holds(data, at):
            line = data.rfind(b"\n", 0, at) + 1
            key = b"%d:" % line + hashlib.blake2b(memoryview(data)[line:], digest_size=16).digest()
        else:
            return []
        found = self._tables_seen.get(key)
        if found is not None:
            return found
        found = []
        view = tables.read(data, at)
        if view is not None:
            for h in self.scanner.remembered(view[0])[0]:
                cell = tables.inside(view, h[0], h[1])
                if cell is not None:
                    found.append(Hit(cell, cell + h[1] - h[0], h[2], h[3]))
        if len(self._tables_seen) >= TABLES_ENTRIES:
            self._tables_seen.clear()  # refills with what still comes
        if len(found) <= UNESCAPED_HITS_MAX:  # memory stays bounded (the scanner keeps the view's scan)
            self._tables_seen[key] = found
        return found

    def _percent_encoded(self, data: bytes, hits: set[Hit]) -> list[tuple[Hit, Key]]:
        """Hits in ``data`` percent-decoded (a URL: ``prefix=AWSLogs%2F123456789012%2F``; up to three times,
        for URLs inside URLs), as spans of ``data``: a hit covers the escapes of its characters, and its
        original is the encoded text."""
        rounds: list[list[int]] = []  # per decoding, where each escape's character lands
        # The AWS console writes "%" as "$25" in some links (CloudWatch: log-group/$252Faws$252Flambda...).
        decoded = data.replace(b"$25", b"%25") if data.find(b"$25") >= 0 else data
        for _ in range(3):
            raw = [m.start() for m in _PERCENT.finditer(decoded)]
            if not raw:
                break
            rounds.append([p - 2 * k for k, p in enumerate(raw)])
            decoded = unquote_to_bytes(decoded)
        if not rounds:
            return []
        if self._glued is not None and 0x5F in decoded:
            decoded = self._glued.sub(b" ", decoded)  # and read an underscore glued to an ID as a space
        out = []
        for h in self.scanner.remembered(decoded)[0]:
            s, e = h[0], h[1]
            for landed in reversed(rounds):  # back through each decoding, innermost first
                s += 2 * bisect_left(landed, s)
                e += 2 * bisect_left(landed, e)
            hit = Hit(s, e, h[2], h[3])
            if hit not in hits:
                out.append((hit, (h[2], data[s:e])))
        return out

    def _scan_value(self, value: bytes, context: bytes) -> tuple[list[Hit], list[Key]]:
        """Hits in ``value`` (a JSON string or form value), those that need ``context`` — the value's key as
        it would appear in text — before them to be recognised included.

        A short value is scanned once, after its context (which ends in a separator: ``"``, ``["`` or ``=``,
        so it only adds what a label makes recognisable); only a rule whose match would run from the context
        into the value makes it scanned alone too, and the two results merged."""
        if not context or len(value) > CONTEXT_VALUE_MAX:
            return self.scan_text(value)
        chits, ckeys = self.scanner.remembered(context + value)  # shared lists: read only
        hits, keys = self._in_value(value, len(context), chits, ckeys)
        if value and (self._line_two[value[0] << 8 | value[1]] if len(value) > 1
                      else self._line_one[value[0]]):  # a rule anchored at a line start may match there
            hits, keys = self._at_line_start(value, hits, keys)
        if _may_hide(value):
            return self._with_decodings(value, hits, keys)
        return hits, keys

    def _inline_scan(self, data: bytes, n: int) -> tuple[tuple[Hit, ...], tuple[Key, ...]]:
        """The hits in a short JSON value (``data[n:]``) scanned after its context (``data[:n]``), shifted
        into the value, remembered by ``data`` (the value's hits and keys are the same whatever its key)."""
        value = data[n:]
        hits, keys = self._in_value(value, n, *self.scanner.scan_keys_once(data))
        if value and (self._line_two[value[0] << 8 | value[1]] if len(value) > 1
                      else self._line_one[value[0]]):  # a rule anchored at a line start may match there
            hits, keys = self._at_line_start(value, hits, keys)
        found = (tuple(hits), tuple(keys))
        seen = self._inline_seen
        if len(seen) >= INLINE_ENTRIES:
            seen.clear()  # refills with what still comes
        seen[data] = found
        return found

    def _at_line_start(self, value: bytes, hits: list[Hit], keys: list[Key]) -> tuple[list[Hit], list[Key]]:
        """``hits`` (of ``value`` scanned after its context) and what a rule anchored at a line start finds
        at the start of ``value``: after the context it is no line start (a tool result that is one command's
        output: ``USERIDGROUPPAIRS\tsg-…\t111122223333``), so ``value`` is scanned alone too."""
        vhits, vkeys = self.scanner.remembered(value)
        if not vhits:
            return hits, keys
        if not hits:
            return list(vhits), list(vkeys)
        return _merge([*zip(hits, keys, strict=True), *zip(vhits, vkeys, strict=True)])

    def _in_value(self, value: bytes, n: int, chits: list[Hit],
                  ckeys: list[Key]) -> tuple[list[Hit], list[Key]]:
        """The hits of a scan of context + value (``n`` bytes of context) that lie in the value, shifted."""
        if not chits or chits[-1][1] <= n:
            return [], []  # nothing in the value (hits of the key itself do not count: keys stay)
        if not any(h[0] < n < h[1] for h in chits):
            hits = [Hit(h[0] - n, h[1] - n, h[2], h[3]) for h in chits if h[0] >= n]
            return hits, [k for h, k in zip(chits, ckeys, strict=True) if h[0] >= n]
        # A hit across the boundary: take the value's own hits as well. Leftmost first, the longest at one
        # start (the one found with the context first), no overlaps.
        inside = [(Hit(h[0] - n, h[1] - n, h[2], h[3]), k) for h, k in zip(chits, ckeys, strict=True)
                  if h[0] >= n]
        hits, keys = self.scanner.scan_keys(value)
        return _merge([*inside, *zip(hits, keys, strict=True)])

    def plan(self, content: bytes, content_type: str = "", also: Sequence[tuple[Hit, Key]] = ()) -> MaskPlan:
        """Raises UnreadableBody for a body in a charset it cannot read, or one whose bytes and text in its
        charset both hold identifiers. ``also``: hits found elsewhere in the request (its URL), whose names
        are masked where they repeat in the body too."""
        if not content:
            return MaskPlan("empty", _assemble=lambda parts: content)
        self._also = also  # read by _repeats (plan runs start to end without yielding: no other flow sees it)
        try:
            return self._plan(content, content_type)
        finally:
            self._also = ()

    def _plan(self, content: bytes, content_type: str) -> MaskPlan:
        ctype = content_type.lower()
        codec, declared = _wide_codec(content, ctype)
        if codec is None:
            return self._plan_bytes(content, ctype)
        # UTF-16 and the like: read as text, masked as UTF-8, written back in the charset it came in.
        try:
            text = content.decode(codec)
        except UnicodeDecodeError as e:
            if not declared:  # only a guess (a byte order mark, zero bytes) and a wrong one
                return self._plan_bytes(content, ctype)
            raise UnreadableBody(f"request body is not valid {codec} ({e.reason} at byte {e.start})") \
                from None
        utf8 = text.encode("utf-8", "surrogatepass")
        wide = self._plan_bytes(utf8, _CHARSET.sub("", ctype))
        if utf8.find(b"AWS_") >= 0:
            wide.decoded_texts.append(utf8)
        # An upstream may also ignore the charset and read the bytes: what they show must not leak either.
        if not self.scan_text(content)[0]:
            inner = wide._assemble
            assert inner is not None
            # (a character the charset cannot write — from a JSON escape — goes back as an escape)
            wide._assemble = lambda parts: inner(parts).decode("utf-8", "surrogatepass").encode(
                codec, "backslashreplace")
            return wide
        if not wide.items:
            return self._plan_bytes(content, ctype)
        raise UnreadableBody(f"request body holds identifiers both as bytes and as {codec} text; it cannot "
                             "be masked both ways at once")

    def _plan_bytes(self, content: bytes, ctype: str) -> MaskPlan:
        if "json" in ctype or (not ctype and content.lstrip()[:1] in (b"{", b"[")):
            plan = self._plan_json(content, "charset" in ctype and not _UTF8_CHARSET.search(ctype))
            if plan is not None:
                return plan
        elif "application/x-www-form-urlencoded" in ctype:
            return self._plan_form(content)
        return self._plan_text(content)

    def _finish(self, plan: MaskPlan, content: bytes = b"", others: Others | None = None,
                hidden: bool = False, countable: bool = True) -> MaskPlan:
        """Count what the segments hold, after masking every repeat of a name found in ``content`` (the body
        its segments come from); ``others`` finds them in the strings that are not segments yet; ``hidden``:
        the body holds text that is not in ``content`` as it is (base64 documents); ``countable``: the
        segments' text is in ``content`` as it is (not so in a form, percent-encoded)."""
        for seg in plan.segments:
            if not seg.keys and seg.hits:
                data = seg.data
                seg.keys = [(h[2], data[h[0]:h[1]]) for h in seg.hits]
        if content and (plan.segments or self._also):
            self._repeats(plan, content, others, hidden, countable)
        keys: list[Key] = []
        rules: list[str] = []
        for seg in plan.segments:
            keys += seg.keys
            rules += [h[3] for h in seg.hits]
        plan.rule_counts.update(rules)
        # the rule of each key's first hit
        first_rule = dict(zip(reversed(keys), reversed(rules), strict=True))
        plan.items = list(dict.fromkeys(keys))
        plan.item_rules = list(map(first_rule.__getitem__, plan.items))
        return plan

    def _repeats(self, plan: MaskPlan, content: bytes, others: Others | None, hidden: bool,
                 countable: bool) -> None:
        """Mask the other occurrences of names found in the request by their context.

        An account ID is recognised in an ARN, a role's name after ``role/``, a bucket after ``s3://``, a
        secret key after its label; the same text written again elsewhere in the request (``the deploy-bot
        role``, an account ID in a table, the secret pasted twice) has no such context, and would leave. So
        every name found (see ``_repeatable``) is masked wherever it stands on its own in the request, with
        the same placeholder. Counting its occurrences in the body (C speed) tells whether any is left;
        only then are the strings searched for it. Text that is not in the body as it is (base64 documents)
        is searched for every name."""
        standalone = self._standalone
        found: list[Key] = [k for h, k in self._also if h[3] not in standalone]  # in the URL
        # (kind, original) of the hits of rules that need context
        for seg in plan.segments:
            found += [k for h, k in zip(seg.hits, seg.keys, strict=True) if h[3] not in standalone]
        if not found:
            return
        names: dict[bytes, str] = {}  # original -> kind of its first hit, in the order they came
        limit = REPEAT_BUDGET // len(content) + 1  # the work is bounded: the first names found are searched
        for kind, original in found:
            if original not in names and _repeatable(original):
                if len(names) == limit:
                    plan.names_left = len(set(map(_ORIGINAL, found))) - limit  # at most this many
                    break
                names[original] = kind
        plan.names = names
        if not names:
            return
        counts = Counter(o for o in map(_ORIGINAL, chain.from_iterable(
            seg.keys for seg in plan.segments if not seg.hidden)) if o in names)
        if countable and 0x5C in content and (_NAME_ESCAPE.search(content) or (
                content.find(b"\\/") >= 0 and any(0x2F in o for o in names))):
            countable = False  # a name's "-" written as \u002d, its "/" as \/: its bytes cannot be counted
        raw: dict[bytes, int] = {}  # occurrences in the body
        if countable:
            raw = {o: content.count(o) for o in names}
            wanted = {o: k for o, k in names.items() if raw[o] != counts[o]}
        else:
            wanted = names
        if not wanted and not hidden:
            return
        for seg in plan.segments:
            look = names if seg.hidden else wanted
            if look:
                more = repeats_in(seg.data, seg.hits, look)
                if more:
                    seg.hits, seg.keys = merge_kept(seg.hits, seg.keys, more)
        if others is None:
            return
        if raw and wanted:  # the other strings only need a look if the segments do not hold every occurrence
            visible = [seg.data for seg in plan.segments if not seg.hidden]
            wanted = {o: k for o, k in wanted.items() if sum(d.count(o) for d in visible) != raw[o]}
        others(wanted, names if hidden else {})

    def _plan_text(self, content: bytes) -> MaskPlan:
        hits, keys = self.scan_text(content)
        plan = MaskPlan("text", [Segment(content, hits, keys)], _assemble=lambda parts: parts[0])
        return self._finish(plan, content)

    def _plan_json(self, content: bytes, ascii_only: bool = False) -> MaskPlan | None:
        """``ascii_only``: the body declares a charset other than UTF-8; it is written back with every
        character that is not ASCII escaped."""
        try:
            doc = json.loads(content, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return None
        if not isinstance(doc, (dict, list, str)):  # a number, true, false, null: nothing to mask
            return self._finish(MaskPlan("json", [], _assemble=lambda parts: content))
        scan = self._scan_value
        value_context = self._value_context
        glued = self._glued.search if self._glued is not None else None
        list_context = self._list_context
        inline_seen = self._inline_seen
        segments: list[Segment] = []
        # (container, key, how the masked bytes become the new value: None = UTF-8 text) per string with hits
        slots: list[tuple[Any, Any, Callable[[bytes], str] | None]] = []
        if isinstance(doc, str):
            doc = [doc]
            unwrap = True
        else:
            unwrap = False
        # (container, the key it sits under as text: b'"AWS": [' for a list, b'' at the top)
        stack: list[tuple[Any, bytes]] = [(doc, b"")]
        strings = 0  # keys and string values: a raw body with more strings has duplicate keys
        hidden = False  # a text document in base64 was read
        plain64: list[tuple[Any, Any, str, bytes]] = []  # (container, key, prefix, text) of those with no hit
        seen64: set[tuple[int, Any]] = set()  # (id(container), key) of every one
        decoded_texts: list[bytes] = []  # those that hold "AWS_"
        while stack:  # iterative: deep nesting must not exhaust the Python stack
            node, under = stack.pop()
            in_dict = isinstance(node, dict)
            if in_dict:
                items: Any = node.items()
                context = b""
                strings += len(node)
            else:  # a list's strings are all scanned after the key the list sits under
                items = enumerate(node)
                context = list_context.get(under, b"") if under else b""
                if under and not context:
                    context = list_context[under] = under + b'"'
            if in_dict and self.mask_keys:
                for k in node:
                    if isinstance(k, str):
                        kb = k.encode("utf-8", "surrogatepass")
                        hits, keys = self.scan_text(kb)
                        if hits:
                            segments.append(Segment(kb, hits, keys))
                            slots.append((node, k, _as_key))
            for k, v in items:
                if isinstance(v, str):
                    strings += 1
                    if in_dict:
                        context = value_context.get(k) or self._context_for(k)
                        if k in _VALUE_KEYS:  # {"name": "AWS_SECRET_ACCESS_KEY", "value": …}: a label
                            label = next((node[n] for n in _NAME_KEYS if isinstance(node.get(n), str)), None)
                            if label:
                                context = self._context_for(label)
                    b = v.encode("utf-8", "surrogatepass")
                    if len(b) >= 16 and (k == "data" or b.startswith((b"data:", b"DATA:"))):
                        encoded = _base64_text(v, node if in_dict else None)
                        if encoded is not None:  # text sent as base64 (a document, a data: URL)
                            prefix, text = encoded
                            hidden = True
                            if text.find(b"AWS_") >= 0:
                                decoded_texts.append(text)
                            seen64.add((id(node), k))
                            hits, keys = self.scan_text(text)
                            if hits:
                                segments.append(Segment(text, hits, keys, hidden=True))
                                slots.append((node, k, _base64_wrapper(prefix)))
                            else:
                                plain64.append((node, k, prefix, text))
                            continue
                    if (not context or len(b) > CONTEXT_VALUE_MAX or 0x5C in b or 0x25 in b or 0x24 in b
                            or 0x1B in b or 0xC2 in b or 0xE2 in b  # escapes, "%", "$25", ESC, NBSP, "→"
                            or 0x26 in b  # "&": a character reference (&quot;)
                            or (0x7C in b and tables.may_hold(b))  # "|" and "+---": a table
                            or (0x5F in b and glued is not None and glued(b))):  # "_" glued to an ID
                        hits, keys = scan(b, context)
                    else:  # inline: most values are short and hold nothing, and come again and again
                        cb = context + b
                        found = inline_seen.get(cb)
                        if found is None:
                            found = self._inline_scan(cb, len(context))
                        if not found[0]:
                            continue
                        hits, keys = list(found[0]), list(found[1])
                    if hits:
                        segments.append(Segment(b, hits, keys))
                        slots.append((node, k, None))
                elif isinstance(v, dict):
                    stack.append((v, b""))
                elif isinstance(v, list):
                    stack.append((v, _key_context(k, b'": [') if in_dict else under))

        def assemble(parts: list[bytes]) -> bytes:
            if not slots and not duplicates:
                return content
            renames: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}
            for (node, k, wrap), part in zip(slots, parts, strict=True):
                if wrap is _as_key:  # a key: renamed below, once its value (if masked too) is in place
                    renames.setdefault(id(node), (node, {}))[1][k] = part.decode("utf-8", "surrogatepass")
                else:
                    node[k] = part.decode("utf-8", "surrogatepass") if wrap is None else wrap(part)
            for node, new_names in renames.values():
                entries = list(node.items())
                renamed = Counter(new_names.get(k, k) for k, _ in entries)
                if len(renamed) < len(entries):
                    # a key the client wrote as the very placeholder another key gets: one value would be lost
                    twice = min(k for k, n in renamed.items() if n > 1)
                    named = ", ".join(sorted({t.decode() for t in TOKEN_RE.findall(twice.encode(
                        "utf-8", "surrogatepass"))}))  # the key's placeholders only: no body text in errors
                    raise UnreadableBody(f"a JSON object would hold one key twice once its keys are masked "
                                         f"(the client wrote a key with the placeholder {named} that another "
                                         "key's identifier gets); it cannot be masked without losing a value")
                node.clear()
                node.update((new_names.get(k, k), v) for k, v in entries)  # the order of the keys stays
            out = doc[0] if unwrap else doc
            text = json.dumps(out, ensure_ascii=ascii_only, separators=(",", ":"))
            try:
                return text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800"): written as an escape, as it came
                return json.dumps(out, separators=(",", ":")).encode("ascii")

        # A key given twice: JSON parsers keep its last value, so the first was never scanned, and forwarding
        # the body as it is would send it (json.dumps writes each key once).
        duplicates = not slots and _string_tokens(content) != strings

        def others(wanted: dict[bytes, str], everywhere: dict[bytes, str]) -> None:
            """Repeats of ``wanted`` names in the strings that held no hit (so are no segment yet), and of the
            ``everywhere`` names in the base64 documents among them."""
            for node, k, prefix, text in plain64 if everywhere else ():
                more = repeats_in(text, [], everywhere)
                if more:
                    segments.append(Segment(text, [h for h, _ in more], [x for _, x in more], hidden=True))
                    slots.append((node, k, _base64_wrapper(prefix)))
            if not wanted:
                return
            done = {(id(node), k, wrap is _as_key) for node, k, wrap in slots}
            # which strings may hold a name, tested on the str (most hold none: a tool schema's thousands)
            holds = re.compile("|".join(re.escape(o.decode("ascii")) for o in wanted)).search  # names: ASCII
            stack: list[Any] = [doc]
            while stack:
                node = stack.pop()
                in_dict = isinstance(node, dict)
                if in_dict and self.mask_keys:
                    for k in node:
                        if isinstance(k, str) and holds(k) and (id(node), k, True) not in done:
                            kb = k.encode("utf-8", "surrogatepass")
                            more = repeats_in(kb, [], wanted)
                            if more:
                                segments.append(Segment(kb, [h for h, _ in more], [x for _, x in more]))
                                slots.append((node, k, _as_key))
                for k, v in (node.items() if in_dict else enumerate(node)):
                    if isinstance(v, str):
                        if not holds(v) or (id(node), k, False) in done or (id(node), k) in seen64:
                            continue  # no name, a segment already, or a base64 document (searched above)
                        b = v.encode("utf-8", "surrogatepass")
                        more = repeats_in(b, [], wanted)
                        if more:
                            segments.append(Segment(b, [h for h, _ in more], [x for _, x in more]))
                            slots.append((node, k, None))
                    elif isinstance(v, (dict, list)):
                        stack.append(v)

        plan = MaskPlan("json", segments, decoded_texts=decoded_texts, _assemble=assemble)
        return self._finish(plan, content, others, hidden)

    def _plan_form(self, content: bytes) -> MaskPlan:
        text = content.decode("utf-8", "surrogateescape")
        pairs = parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="surrogateescape")
        # key, value, key, value...: keys too (a form entry without "=" is all key), values after their key
        segments: list[Segment] = []
        for k, v in pairs:
            key = k.encode("utf-8", "surrogateescape")
            value = v.encode("utf-8", "surrogateescape")
            segments.append(Segment(key, *self.scan_text(key)))
            segments.append(Segment(value, *self._scan_value(value, key[-CONTEXT_KEY_MAX:] + b"=")))

        def assemble(parts: list[bytes]) -> bytes:
            if all(not s.hits for s in segments):
                return content
            new = [(k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                   for k, v in zip(parts[0::2], parts[1::2], strict=True)]
            return urlencode(new, encoding="utf-8", errors="surrogateescape").encode("ascii")

        # (its keys and values are all segments, decoded: searched for repeats, not counted in the raw body)
        return self._finish(MaskPlan("form", segments, _assemble=assemble), content, countable=False)


class UnreadableBody(ValueError):
    """A body in a charset that cannot be read: it cannot be masked with certainty."""


_UTF8_CHARSET = re.compile(r'charset\s*=\s*"?(?:utf-?8|us-ascii|ascii)"?\s*(?:;|$)')
_CHARSET = re.compile(r';\s*charset\s*=\s*"?([^";\s]*)"?')
# Identifiers and the words around them are ASCII: a charset that writes these as the same ASCII bytes
# (UTF-8, Latin-1, Windows-125x, Shift JIS, ...) is scanned as bytes; any other is decoded first.
_ASCII_PROBE = "AZaz09 \t\n\"'{}[]:,;=/\\-_.@%$&?#"
_WIDE: dict[str, str | None] = {}  # charset as declared -> codec to decode with, None: scan the bytes
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before UTF-16's: FF FE 00 00
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _wide_codec(content: bytes, ctype: str) -> tuple[str | None, bool]:
    """The codec of a body whose ASCII text is not ASCII bytes (UTF-16, UTF-32, EBCDIC, ...) — by the
    Content-Type's charset, else by a UTF-16/32 byte order mark, else (text/*, JSON or no type) by the zero
    bytes UTF-16/32 put beside ASCII characters; None when the bytes can be scanned as they are. And whether
    the charset was declared. Raises UnreadableBody for a charset Python does not know."""
    m = _CHARSET.search(ctype) if "charset" in ctype else None
    name = m.group(1) if m is not None else ""
    if not name:
        if content[:1] in (b"\xff", b"\xfe", b"\x00"):
            for bom, by_bom in _BOMS:
                if content.startswith(bom):
                    return by_bom, False
        if (not ctype or ctype.startswith("text/") or "json" in ctype) and 0 in content[:4]:
            guessed = json.detect_encoding(content[:4])  # UTF-16/32 without a byte order mark
            return (None if guessed == "utf-8" else guessed), False
        return None, False
    if name in _WIDE:
        return _WIDE[name], True
    try:
        found = codecs.lookup(name).name
        codec = None if _ASCII_PROBE.encode(found) == _ASCII_PROBE.encode("ascii") else found
    except LookupError:  # also a codec that is not a text encoding (base64, rot13)
        raise UnreadableBody(f"request body in an unknown charset {name!r}") from None
    except UnicodeError:  # a codec that cannot write even these characters: decode with it
        codec = found
    if len(_WIDE) < 64:
        _WIDE[name] = codec
    return codec, True


def text_codec(content: bytes, content_type: str) -> str | None:
    """For a reply: the codec its text must be decoded with before placeholders can be found in it (UTF-16
    and the like, see ``_wide_codec``); None when they can be found in the bytes (or it cannot be told)."""
    try:
        return _wide_codec(content, content_type.lower())[0]
    except UnreadableBody:
        return None


# Media types whose base64 payload is text worth scanning (documents, data: URLs); others (PDF, images) are
# not decoded (see docs/security.md).
_TEXT_MEDIA = re.compile(r"^(?:text/[\w.+-]+|application/(?:[\w.+-]*\+)?(?:json|jsonl|x-ndjson|ndjson|xml|"
                         r"yaml|x-yaml|csv|toml|sql|javascript|x-sh|x-python))$", re.IGNORECASE)
_DATA_URL = re.compile(r'^data:([\w.+/-]*)((?:;[\w.+-]+=(?:[\w.+-]+|"[\w.+-]+"))*);base64,', re.IGNORECASE)


def _base64_text(value: str, parent: dict[str, Any] | None) -> tuple[str, bytes] | None:
    """``(prefix, decoded text)`` of a string that is text sent as base64 — a ``data:text/...;base64,``
    URL, the ``data`` of a ``{"type": "base64", "media_type": "text/plain", "data": …}`` source (an
    Anthropic document) or of Gemini's ``{"mimeType": "text/plain", "data": …}`` — else None."""
    if value.startswith(("data:", "DATA:")):
        m = _DATA_URL.match(value)
        if m is None or not (m.group(1) == "" or _TEXT_MEDIA.match(m.group(1))):  # none: text/plain
            return None
        prefix, payload = value[:m.end()], value[m.end():]
    elif parent is not None and _TEXT_MEDIA.match(_media_type(parent).split(";", 1)[0].strip()):
        prefix, payload = "", value
    else:
        return None
    try:
        return prefix, base64.b64decode(payload, validate=True)
    except (ValueError, binascii.Error):
        pass
    # Wrapped at 76 columns (GNU base64, MIME), without its padding, or in the URL-safe alphabet
    compact = "".join(payload.split())
    compact += "=" * (-len(compact) % 4)
    try:
        if "-" in compact or "_" in compact:
            return prefix, base64.b64decode(compact.replace("-", "+").replace("_", "/"), validate=True)
        return prefix, base64.b64decode(compact, validate=True)
    except (ValueError, binascii.Error):
        return None


def _media_type(parent: dict[str, Any]) -> str:
    """The media type of base64 ``data`` in ``parent``: an Anthropic ``{"type": "base64", "media_type": …}``
    source, or Gemini's ``inlineData`` (``mimeType``)."""
    if parent.get("type") == "base64":
        media = parent.get("media_type")
    else:
        media = parent.get("mimeType", parent.get("mime_type"))
    return media if isinstance(media, str) else ""


def _as_key(masked: bytes) -> str:  # marks a slot that is a JSON object key (masker_json_keys)
    return masked.decode("utf-8", "surrogatepass")


def _base64_wrapper(prefix: str) -> Callable[[bytes], str]:
    return lambda masked: prefix + base64.b64encode(masked).decode("ascii")


def _unescape_once(data: bytes) -> tuple[bytes, list[int], list[int]] | None:
    """``data`` with its backslash escapes decoded, where the character of each escape lands in it, and how
    far the text after each escape moved (the bytes it lost, summed); None without escapes. Lists are built
    in C (a text of JSON holds thousands of escaped quotes)."""
    pieces = _BACKSLASH_ESCAPE.split(data)  # text, \u code or None, short escape or None, text, ...
    if len(pieces) == 1:
        return None
    texts = pieces[0::3]
    codes = pieces[1::3]
    chars: list[Any] = list(map(_SHORT_ESCAPES.get, pieces[2::3]))  # None where the escape is \uXXXX
    raw = [2] * len(chars)
    if any(codes):
        for k, code in enumerate(codes):
            if code is not None:
                chars[k] = chr(int(code, 16)).encode("utf-8", "surrogatepass")
                raw[k] = 6
    parts: list[bytes] = [b""] * (len(texts) + len(chars))
    parts[0::2] = texts
    parts[1::2] = chars
    char_lens = list(map(len, chars))
    # escape k lands after texts 0..k and chars 0..k-1
    landed = list(map(operator.add, accumulate(map(len, texts[:-1])), accumulate(char_lens, initial=0)))
    shifts = list(accumulate(map(operator.sub, raw, char_lens)))
    return b"".join(parts), landed, shifts


# HTML/XML character references: numeric (decimal, hex) and the named ones HTML5 knows, with their ";".
_ENTITY = re.compile(rb"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


def _entity_char(ref: bytes) -> bytes | None:
    if ref[:1] != b"#":
        named = html.entities.html5.get(ref.decode("ascii") + ";")
        return named.encode("utf-8") if named is not None else None
    code = int(ref[2:], 16) if ref[1:2] in b"xX" else int(ref[1:])
    if not 0 < code < 0x110000 or 0xD800 <= code < 0xE000:
        return None
    return chr(code).encode("utf-8")


def _unentity_once(data: bytes) -> tuple[bytes, list[int], list[int]] | None:
    """``data`` with its character references decoded, like ``_unescape_once`` (None without any)."""
    parts: list[bytes] = []
    landed: list[int] = []
    shifts: list[int] = []
    at = size = lost = 0  # where the text not yet copied starts; bytes written; bytes lost so far
    for m in _ENTITY.finditer(data):
        char = _entity_char(m.group(1))
        if char is None:  # not a reference HTML knows: the text as it is
            continue
        s, e = m.span()
        parts.append(data[at:s])
        size += s - at
        landed.append(size)
        parts.append(char)
        size += len(char)
        lost += (e - s) - len(char)
        shifts.append(lost)
        at = e
    if not landed:
        return None
    parts.append(data[at:])
    return b"".join(parts), landed, shifts


# Objects that pair a name with a value — container environment variables ({"name": …, "value": …}, ECS and
# Kubernetes), tags ({"Key": …, "Value": …}), SSM parameters: the value is scanned after its name.
_VALUE_KEYS = frozenset({"value", "Value"})
_NAME_KEYS = ("name", "Name", "key", "Key")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _string_tokens(content: bytes) -> int:
    """How many strings (keys and values) a valid JSON text holds (its quotes, halved, if none is escaped)."""
    if content.find(b'\\"') < 0:
        return content.count(b'"') // 2
    return len(_JSON_STRING.findall(content))


def _after_escape(data: bytes, start: int) -> bool:
    """Whether ``start`` is the letter of a backslash escape (at some level of JSON in JSON)."""
    return start > 0 and data[start - 1] == 0x5C and data[start] in _ESCAPE_LETTERS


_ESCAPE_LETTERS = frozenset(b'"\\/bfnrtu')


def _may_hide(value: bytes) -> bool:
    """Whether ``value`` has a byte of what ``_with_decodings`` reads: a backslash, "%", "_", "$" (the
    console's $25), "&", ESC, the first byte of a no-break space or of "→" (int needles: fast), or a table's
    "|" and "+---"."""
    return (0x5C in value or 0x25 in value or 0x5F in value or 0x24 in value or 0x1B in value
            or 0xC2 in value or 0xE2 in value or 0x26 in value or (0x7C in value and tables.may_hold(value)))


def _blank(m: re.Match[bytes]) -> bytes:
    return b" " * (m.end() - m.start())


def _merge(found: list[tuple[Hit, Key]]) -> tuple[list[Hit], list[Key]]:
    """Hits of several scans of one text as one list: leftmost first, the longest at one start (the first
    listed on a tie), no overlaps."""
    found.sort(key=lambda hk: (hk[0][0], -hk[0][1]))
    hits: list[Hit] = []
    keys: list[Key] = []
    pos = 0
    for h, k in found:
        if h[0] >= pos:
            hits.append(h)
            keys.append(k)
            pos = h[1]
    return hits, keys


# Repeats (BodyMasker._repeats): which originals are names worth masking wherever they stand again.
REPEAT_RULE = "repeat"  # the rule id of such hits (counted in events and the flow's comment like a rule)
# Counting a name in the body costs ~0.35 ns a byte (a regex pass for all names, ~17 ns a byte after ~25 µs
# a name compiling it, or splitting the body into words, ~25 ns a byte, would cost as much as the scan
# itself): at most this many names x body bytes are counted (~1.5 ms), the first names found first.
REPEAT_BUDGET = 4 << 20
# A JSON escape of a character a name may hold ([A-Za-z0-9._@=,+/-]; not Go's \u003c \u003e \u0026 of <>&)
_NAME_ESCAPE = re.compile(rb"\\u00(?:2[b-fB-F]|3[0-9dD]|4[0-9a-fA-F]|5[0-9aAfF]|6[1-9a-fA-F]|7[0-9aA])")
_ORIGINAL = operator.itemgetter(1)
_REPEATABLE = re.compile(rb"[A-Za-z0-9._@=,+/-]{5,256}")  # no quote, backslash, "%", colon or space
_NAME_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# A file's extension after a name (a key pair's "deploy-key.pem", a stack's "orders-stack.yaml", a bucket's
# "acme-logs.tar.gz", "KEY.PEM"): the name stands on its own there, unlike before a hostname's next label.
# A few are top-level domains too (.sh, .zip): a name before one in a hostname is masked, the safe side.
_FILE_SUFFIX = re.compile(rb"(?i:\.(?:pem|ppk|pub|key|crt|cer|p12|pfx|json|jsonl|csv|tsv|log|txt|ya?ml|toml|"
                          rb"tf|tfvars|tfstate|tfplan|hcl|zip|gz|tgz|bz2|xz|zst|tar|parquet|avro|orc|sh|ps1|sql|env|"
                          rb"ini|cfg|conf|out|err|bak|backup|dump|snap))+(?![A-Za-z0-9_-]|\.[A-Za-z0-9])")


def _repeatable(original: bytes) -> bool:
    """Whether other occurrences of ``original`` (found by a rule that needs context) in a request are
    masked too: a name at least 5 bytes long that is not only letters unless 12 or more (``deploy-bot``, an
    account ID, a secret key; not ``admin``, which would mask the word everywhere), written without
    escapes."""
    n = len(original)
    return (4 < n <= 256 and (n >= 12 or not original.isalpha())
            and _REPEATABLE.fullmatch(original) is not None)


def repeats_in(data: bytes, hits: Sequence[Hit], names: dict[bytes, str]) -> list[tuple[Hit, Key]]:
    """Where the ``names`` (original -> kind) stand on their own in ``data`` outside ``hits``: not inside a
    longer name (a letter, digit, ``_`` or ``-`` on either side, or a ``.`` that a letter or digit follows,
    as in a hostname — but not a file's extension: ``deploy-key.pem``). The letters of a backslash escape
    (``\\n``, ``\\u201c``: JSON in a JSON string) and terminal colours before or after a name are
    separators. Leftmost first, the longest at one start, no overlaps."""
    found: list[tuple[Hit, Key]] = []
    size = len(data)
    view = data  # where the bytes around a name are read: escapes and colours as blanks (same length)
    if 0x5C in data or 0x1B in data or 0xC2 in data or 0xE2 in data:
        view = _BLANKS.sub(_blank, _BACKSLASH_ESCAPE.sub(_blank, data) if 0x5C in data else data)
    for original, kind in names.items():
        i = data.find(original)
        while i >= 0:
            e = i + len(original)
            if (i == 0 or (view[i - 1] not in _NAME_BYTES and view[i - 1] != 0x2E)) and (
                    e == size or (view[e] not in _NAME_BYTES and not (
                        view[e] == 0x2E and e + 1 < size and view[e + 1] in _NAME_BYTES
                        and _FILE_SUFFIX.match(view, e) is None))) \
                    and (view is data or (view[i] == data[i] and view[e - 1] == data[e - 1])):
                # (a name that is itself read as blanks — the start of a line number "1234567890120→" — is
                # inside what was blanked, not beside it)
                found.append((Hit(i, e, kind, REPEAT_RULE), (kind, original)))
            i = data.find(original, i + 1)
    return _outside(found, hits)


def repeats_in_url(path: bytes, hits: Sequence[Hit], names: dict[bytes, str]) -> list[tuple[Hit, Key]]:
    """``repeats_in`` for a URL: also where a name is percent-encoded (``%2F`` for its ``/``), as a span of
    ``path``; its original is the name."""
    raw = [m.start() for m in _PERCENT.finditer(path)]
    if not raw:
        return repeats_in(path, hits, names)
    landed = [p - 2 * k for k, p in enumerate(raw)]  # where each escape's character lands when decoded
    found = []
    for h, key in repeats_in(unquote_to_bytes(path), (), names):
        s = h[0] + 2 * bisect_left(landed, h[0])
        e = h[1] + 2 * bisect_left(landed, h[1])
        found.append((Hit(s, e, h[2], h[3]), key))
    return _outside(found, hits)


def _outside(found: list[tuple[Hit, Key]], hits: Sequence[Hit]) -> list[tuple[Hit, Key]]:
    """``found`` but those overlapping ``hits``, and without overlaps among themselves."""
    if not found:
        return found
    if hits:
        starts = [h[0] for h in hits]
        kept = []
        for h, k in found:
            j = bisect_left(starts, h[1])  # hits that start before this one ends
            if j == 0 or hits[j - 1][1] <= h[0]:
                kept.append((h, k))
        found = kept
    kept_hits, kept_keys = _merge(found)
    return list(zip(kept_hits, kept_keys, strict=True))


def merge_kept(hits: list[Hit], keys: list[Key], more: list[tuple[Hit, Key]]) -> tuple[list[Hit], list[Key]]:
    """``hits`` and the non-overlapping ``more`` that overlap none of them, in order."""
    both = sorted([*zip(hits, keys, strict=True), *more], key=_hit_start)
    return [h for h, _ in both], [k for _, k in both]


def _hit_start(hk: tuple[Hit, Key]) -> int:
    return hk[0][0]


def _key_context(key: str, tail: bytes) -> bytes:
    """A JSON key as it would precede its value in text (``"SecretAccessKey": "``), at most
    CONTEXT_KEY_MAX bytes of it."""
    return b'"' + key.encode("utf-8", "surrogatepass")[-CONTEXT_KEY_MAX:] + tail


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON; re-serialising them would change the body. Mask such a body as text.
    raise ValueError(f"non-standard JSON constant {name}")
