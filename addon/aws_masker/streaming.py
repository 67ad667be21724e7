"""Restore placeholders in streamed replies, chunk by chunk (no mitmproxy dependency).

``StreamRestorer`` is the callable the glue sets as ``flow.response.stream``. It receives raw bytes cut
anywhere, returns a list holding at most one ``bytes`` (``[]`` while it holds bytes back, never ``b""``) and
is called a last time with ``b""`` at the end of the stream, when it flushes everything it still holds.

* ``text/event-stream``: events are parsed incrementally and placeholders are restored inside the fields
  that carry model text (Anthropic Messages, OpenAI Chat Completions and the APIs compatible with it,
  OpenAI Responses, Google Gemini, Cohere v2 chat); other events are restored over their raw data text.
  Events that need no change pass through byte-identical; changed ones are re-serialised with their other
  fields, line terminator style and order untouched.
* A JSON body that is an array (Gemini's ``streamGenerateContent`` without ``alt=sse`` sends its chunks as
  one array, element by element): each object of the array goes through the same handlers as an SSE
  event's data, hold-back included; what is held goes out as elements of their own before the ``]``.
* JSON Lines (``application/x-ndjson``: Ollama's native API streams an object a line): each line goes
  through the same handlers, with Ollama's ``message.content`` / ``message.thinking`` / ``response`` /
  ``thinking`` as text channels; what is held goes out in a line of its own, or in the line with
  ``"done": true``.
* Other text / JSON bodies: restored over the raw byte stream (originals JSON-escaped for JSON bodies).
* Unknown binary content types and unknown content encodings pass through untouched.

Hold-back: a placeholder may be cut across two or more deltas. Each text channel (Anthropic content block,
Chat Completions choice / tool call, Responses output item / content part, Gemini candidate text and
thoughts, Cohere content / tool plan / tool call, Ollama content / thinking) holds back only the tail that
could still be the start of a placeholder of this flow's mapping (``placeholders.tail_to_hold``), so held
text never exceeds the longest placeholder. A delta whose text is held entirely is not emitted (Gemini,
Ollama: it goes out with an empty text); its text goes out at the front of the channel's next delta, or in
a delta event synthesised just before the event that ends the channel (content_block_stop, finish_reason /
finishReason, content-end, ``[DONE]``, ``*.done``, ``"done": true``, end of stream).

The callable never raises: an internal error is logged once, counted in ``errors``, and from then on the
bytes pass through unrestored (a placeholder reaching the user is not a leak).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
import traceback
import zlib
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from .placeholders import TOKEN_RE, glued_split, restore_bytes, tail_to_hold

log = logging.getLogger(__name__)

_TOKEN_STR_RE = re.compile(TOKEN_RE.pattern.decode("ascii"))
# End of an SSE event: a line terminator followed by an empty line. A lone "\r" must not be the first half
# of a "\r\n" (the caller waits for more bytes when the buffer ends with "\r").
_JSON_STRUCTURE_RE = re.compile(rb'["\\{}\[\]]')  # what a JSON array stream is split by
_EVENT_END_RE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_RE = re.compile(rb"\r\n|\r|\n")
# An event that matches neither can neither hold a placeholder nor end with the start of one.
_MAYBE_RE = re.compile(rb'AWS_|A(?:WS?)?["\r\n]')
_BOM = b"\xef\xbb\xbf"
MAX_EVENT = 16 << 20  # an SSE event longer than this is passed through unrestored

# How an original is inserted: into decoded JSON string text, into the text of a JSON document carried in
# a string (partial_json / arguments: JSON-escaped), into plain text (bytes kept exactly).
TEXT, DOC, PLAIN = 0, 1, 2

_AN_DELTAS = {
    "text_delta": ("text", TEXT),
    "thinking_delta": ("thinking", TEXT),
    "input_json_delta": ("partial_json", DOC),
}
_CC_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")
_CC_DROPPABLE_KEYS = frozenset({*_CC_TEXT_FIELDS, "tool_calls", "role"})
_CC_TEXT_KEYS = frozenset(_CC_TEXT_FIELDS)  # a delta's text channels (when they are strings)
_NO_KEYS: frozenset[str] = frozenset()
# Responses API delta events: type -> (name of the sub index, kind).
_RS_DELTAS = {
    "response.output_text.delta": ("content_index", TEXT),
    "response.refusal.delta": ("content_index", TEXT),
    "response.reasoning_text.delta": ("content_index", TEXT),
    "response.reasoning_summary_text.delta": ("summary_index", TEXT),
    "response.function_call_arguments.delta": (None, DOC),
    "response.mcp_call_arguments.delta": (None, DOC),
    "response.custom_tool_call_input.delta": (None, TEXT),
    "response.code_interpreter_call_code.delta": (None, TEXT),
}
_RS_END = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Cohere v2 chat delta events: type -> (path of the text under "delta", kind).
_CO_DELTAS = {
    "content-delta": (("message", "content", "text"), TEXT),
    "tool-plan-delta": (("message", "tool_plan"), TEXT),
    "tool-call-delta": (("message", "tool_calls", "function", "arguments"), DOC),
}
_CO_ENDS = {"content-end": "content-delta", "tool-call-end": "tool-call-delta"}
# Ollama (NDJSON): where its text channels are in a line (chat: under "message"; generate: at the top).
_OL_PATHS = (("message", "content"), ("message", "thinking"), ("response",), ("thinking",))
_NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                           "application/x-jsonl", "application/jsonlines", "application/x-jsonlines"})
_DOC_KEYS = frozenset({"arguments", "partial_json"})
_OPAQUE_KEYS = frozenset({"signature", "encrypted_content", "thoughtSignature", "thought_signature"})
_MISS = object()

Key = tuple[Any, ...]


def _dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (a pair cut across deltas upstream): keep them escaped
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


# --------------------------------------------------------------------------------------------- decoding


class _ZlibDecoder:
    def __init__(self, wbits: int | None) -> None:
        self._wbits = wbits  # None: deflate, decided from the first two bytes (zlib-wrapped or raw)
        self._pending = b""
        self._d: Any = zlib.decompressobj(wbits) if wbits is not None else None

    def decode(self, data: bytes) -> bytes:
        if self._d is None:
            data = self._pending + data
            if len(data) < 2:
                self._pending = data
                return b""
            self._pending = b""
            zlib_wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._wbits = 15 if zlib_wrapped else -15
            self._d = zlib.decompressobj(self._wbits)
        out = []
        while data:
            out.append(self._d.decompress(data))
            if not self._d.eof:
                break
            data = self._d.unused_data  # another gzip member follows
            self._d = zlib.decompressobj(self._wbits or 47)
        return b"".join(out)

    def flush(self) -> bytes:
        if self._d is None:
            return self.decode(b"") if not self._pending else zlib.decompress(self._pending, -15)
        return bytes(self._d.flush())


class _ZstdDecoder:
    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._d = factory()

    def decode(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._d.decompress(data))
            if not self._d.eof:
                break
            data = self._d.unused_data  # another frame follows
            self._d = self._factory()
        return b"".join(out)

    def flush(self) -> bytes:
        return b""


class _BrotliDecoder:
    def __init__(self, brotli: Any) -> None:
        self._d = brotli.Decompressor()

    def decode(self, data: bytes) -> bytes:
        return bytes(self._d.process(data)) if data else b""

    def flush(self) -> bytes:
        return b""


def _make_decoder(encoding: str) -> Any:
    """An incremental decoder for ``encoding``, or None when it is unknown or its module is missing."""
    if encoding in ("gzip", "x-gzip"):
        return _ZlibDecoder(47)
    if encoding == "deflate":
        return _ZlibDecoder(None)
    if encoding == "br":
        try:
            import brotli
        except ImportError:
            return None
        return _BrotliDecoder(brotli)
    if encoding == "zstd":
        for name in ("compression.zstd", "backports.zstd"):  # Python 3.14 stdlib, or its backport
            try:
                return _ZstdDecoder(importlib.import_module(name).ZstdDecompressor)
            except ImportError:
                continue
        return None
    return None


# ------------------------------------------------------------------------------------------------ SSE


class _Event:
    """One parsed SSE event: its non-empty lines (terminators stripped), terminator style and data."""

    __slots__ = ("data", "etype", "lines", "raw", "space", "term")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        m = _LINE_RE.search(raw)
        self.term = m.group(0) if m else b"\n"
        body = raw[3:] if raw.startswith(_BOM) else raw
        self.lines = [ln for ln in _LINE_RE.split(body) if ln]
        parts: list[bytes] = []
        self.etype = b""
        self.space = True
        for ln in self.lines:
            name, _, val = ln.partition(b":")
            if not name:
                continue  # comment
            if val[:1] == b" ":
                val = val[1:]
            elif name == b"data" and not parts:
                self.space = False
            if name == b"data":
                parts.append(val)
            elif name == b"event":
                self.etype = val
        self.data = b"\n".join(parts) if parts else None

    def build(self, data: bytes) -> bytes:
        """This event with its data replaced (one data line per line of ``data``); other lines untouched."""
        out: list[bytes] = []
        lead = b"data: " if self.space else b"data:"
        done = False
        for ln in self.lines:
            if ln.partition(b":")[0] == b"data":
                if not done:
                    out.extend(lead + part for part in data.split(b"\n"))
                    done = True
            else:
                out.append(ln)
        term = self.term
        return term.join(out) + term + term

    synth = build  # a new event built like this one


class _Element:
    """One element of a JSON array streamed element by element (Gemini's ``streamGenerateContent``
    without ``alt=sse``): the bytes before it (``[`` or ``,`` and blanks) and the element itself."""

    __slots__ = ("data", "etype", "lead", "raw")

    def __init__(self, raw: bytes, lead: int) -> None:
        self.raw = raw
        self.lead = raw[:lead]
        self.data: bytes | None = raw[lead:]
        self.etype = b""

    def build(self, data: bytes) -> bytes:
        return self.lead + data

    def synth(self, data: bytes) -> bytes:
        """A new element after this one (flushes come after at least one element went out)."""
        return b"," + data


class _Prefixes:
    """``x in p``: is ``x`` a non-empty prefix of a placeholder (full ones included)?

    Answers like the set of every prefix that ``tail_to_hold`` takes, from one sorted list of placeholders:
    that set costs ~3 ms to build for 1,500 placeholders (per flow), this a sort and a bisect per lookup.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Any) -> None:
        self._keys: list[bytes] = sorted(keys)

    def __contains__(self, x: object) -> bool:
        if not isinstance(x, bytes) or not x:
            return False
        keys = self._keys
        i = bisect_left(keys, x)  # the keys that start with x, if any, begin here
        return i < len(keys) and keys[i].startswith(x)


def _chat_match(ci: Any, present: set[Key]) -> Callable[[Key], bool]:
    return lambda k: k[0] == "cc" and k[1] == ci and k not in present


def _gemini_match(ci: Any, present: set[Key]) -> Callable[[Key], bool]:
    return lambda k: k[0] == "gm" and k[1] == ci and k not in present


class _Chan:
    """Hold-back state of one text channel and the last delta event seen on it (template for flushes)."""

    __slots__ = ("held", "info", "kind", "obj", "tmpl")

    def __init__(self, kind: int) -> None:
        self.kind = kind
        self.held = ""
        self.tmpl: _Event | _Element | None = None
        self.obj: Any = None
        self.info: Any = None


def _next_event_end(buf: bytes, pos: int, final: bool) -> int:
    """Where the SSE event that ``pos`` is in ends (after its blank line), or -1."""
    m = _EVENT_END_RE.search(buf, pos)
    if m is None:
        return -1
    end = m.end()
    if end == len(buf) and buf[-1] == 0x0D and not final:
        return -1  # "\r" may be the first half of "\r\n"
    return end


def _next_line_end(buf: bytes, pos: int, final: bool) -> int:
    """Where the line that ``pos`` is in ends (after its newline), or -1."""
    end = buf.find(b"\n", pos)
    return end + 1 if end >= 0 else -1


class _Line:
    """One line of a JSON Lines stream: the line (``data``) and its terminator."""

    __slots__ = ("data", "etype", "json", "raw", "term")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.data: bytes | None = raw.rstrip(b"\r\n")
        self.term = raw[len(self.data):]
        self.etype = b""
        self.json = False  # the line is JSON (set once it parsed)

    def build(self, data: bytes) -> bytes:
        return (_line_safe(data) if self.json else data) + self.term

    def synth(self, data: bytes) -> bytes:
        """A new line (a line that went out without a terminator got one first: see ``_lines``)."""
        return _line_safe(data) + (self.term or b"\n")


def _line_safe(data: bytes) -> bytes:
    """A JSON line with U+2028 / U+2029 escaped: valid JSON as they are (only inside strings), but line
    readers (httpx's ``iter_lines``) end a line there. Go, Ollama's language, escapes them too."""
    if 0xE2 in data and (data.find(b"\xe2\x80\xa8") >= 0 or data.find(b"\xe2\x80\xa9") >= 0):
        return data.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")
    return data


class StreamRestorer:
    """Restore the placeholders of ``mapping`` in a streamed reply (see the module docstring)."""

    def restored_placeholders(self) -> Counter[bytes]:
        """How often each placeholder was restored so far."""
        out = Counter(self._seen_bytes)
        for tok, n in self._seen_str.items():
            out[tok.encode("ascii")] += n
        return out

    def __init__(
        self,
        mapping: dict[bytes, bytes],
        content_type: str,
        content_encoding: str = "",
        *,
        text_log_limit: int = 0,
    ) -> None:
        self.restored = 0
        self.errors = 0
        self._seen_str: Counter[str] = Counter()
        self._seen_bytes: Counter[bytes] = Counter()
        self.drops_content_encoding = False
        self.text_log: bytearray | None = bytearray() if text_log_limit > 0 else None
        self._log_limit = text_log_limit
        # Not copied (no per-flow cost): keys that are no placeholder are simply never matched by TOKEN_RE.
        self._map = mapping
        self._longest = max(map(len, self._map), default=0)
        self._prefixes: frozenset[bytes] | None = None  # a _Prefixes, built on first use
        self._scache: dict[str, Any] = {}

        ct = content_type.split(";", 1)[0].strip().lower()
        if not self._map:
            mode = "pass"
        elif ct == "text/event-stream":
            mode = "sse"
        elif ct in _NDJSON_TYPES:
            mode = "lines"
        elif "json" in ct:
            mode = "json"
        elif ct.startswith("text/") or ct in ("", "application/xml"):
            mode = "text"
        else:
            mode = "pass"  # binary framings (e.g. application/vnd.amazon.eventstream) must not change length
        self._decoder: Any = None
        enc = content_encoding.strip().lower()
        if mode != "pass" and enc not in ("", "identity"):
            self._decoder = _make_decoder(enc)
            if self._decoder is None:
                mode = "pass"
            else:
                self.drops_content_encoding = True
        self._mode = mode
        self._passthrough = mode == "pass"

        self._buf: bytes | bytearray = b""  # SSE: bytes of the event not yet complete
        self._skipping = False  # SSE: inside an event longer than MAX_EVENT
        self._raw_held = b""  # raw modes: held tail
        self._json_seen = False  # "json" mode: its first byte was seen (a "[" makes it an array stream)
        self._abuf: bytes | bytearray = b""  # array stream: bytes not yet out (an element not yet complete)
        self._ascan = 0  # ... and where in them to go on looking for structure
        self._adepth = 0
        self._ain_str = False
        self._chans: dict[Key, _Chan] = {}
        self._holding: set[Key] = set()
        # Progress of the current call, for salvage after an internal error.
        self._work: bytes | bytearray = b""
        self._pos = 0
        self._out: list[bytes] = []

    # ------------------------------------------------------------------------------------------ public

    @property
    def held(self) -> int:
        """Longest text currently held back by one channel (never more than the longest placeholder)."""
        n = len(self._raw_held)
        for key in self._holding:
            n = max(n, len(self._chans[key].held))
        return n

    def __call__(self, chunk: bytes) -> list[bytes]:
        final = not chunk
        if self._mode == "pass":
            return [chunk] if chunk else []
        self._out = out = []
        self._work, self._pos = b"", 0
        stage = "decode"
        try:
            data = chunk
            if self._decoder is not None:
                data = self._decoder.decode(chunk) if chunk else b""
                if final:
                    data += self._decoder.flush()
            stage = "restore"
            if self._passthrough:
                out.append(data)
            elif self._mode == "sse":
                self._sse(data, final)
            elif self._mode == "array":
                self._array(data, final)
            elif self._mode == "lines":
                self._lines(data, final)
            else:
                self._raw(data, final)
        except Exception:
            out = self._fail(stage, chunk)
        return self._emit(out)

    # -------------------------------------------------------------------------------------- plumbing

    def _emit(self, out: list[bytes]) -> list[bytes]:
        data = b"".join(out)
        if not data:
            return []
        if self.text_log is not None and len(self.text_log) < self._log_limit:
            self.text_log += data[: self._log_limit - len(self.text_log)]
        return [data]

    def _fail(self, stage: str, chunk: bytes) -> list[bytes]:
        """Log/count an internal error and return what has to go out instead; pass through from now on."""
        self.errors += 1
        if self.errors == 1:
            # Type and frames only: the exception's text could quote restored content (originals).
            exc = sys.exception()
            log.error("aws-masker: stream restore failed (%s: %s); passing the rest through unrestored\n%s",
                      stage, type(exc).__name__,
                      "".join(traceback.format_tb(exc.__traceback__ if exc else None)).rstrip())
        out = list(self._out)
        if stage == "decode":
            self._mode = "pass"  # the compressed stream cannot be decoded: raw bytes from now on
        for key in list(self._holding):
            try:
                out.append(self._synth(self._chans[key], self._chans[key].held))
            except Exception:
                pass
        out.append(self._raw_held)
        out.append(bytes(self._abuf))
        out.append(bytes(self._buf))
        out.append(bytes(self._work[self._pos :]))
        if stage == "decode":
            out.append(chunk)
        self._passthrough = True
        self._chans.clear()
        self._holding.clear()
        self._raw_held = self._buf = self._work = self._abuf = b""
        return out

    def _get_prefixes(self) -> frozenset[bytes]:
        if self._prefixes is None:
            self._prefixes = cast("frozenset[bytes]", _Prefixes(self._map))
        return self._prefixes

    def _hold_at(self, s: str) -> int:
        """Index of ``s`` from which it has to be held back (``len(s)``: nothing)."""
        tail = s[-self._longest :]
        if "A" not in tail:
            return len(s)
        tb = tail.encode("utf-8", "surrogatepass")
        # The held part is ASCII (a placeholder prefix): its length in bytes is its length in characters.
        return len(s) - (len(tb) - tail_to_hold(tb, self._get_prefixes(), self._longest))

    def _restore_str(self, s: str, kind: int) -> tuple[str, int]:
        if "AWS_" not in s:
            return s, 0
        cache, mapping, seen = self._scache, self._map, self._seen_str
        count = 0

        def sub(m: re.Match[str]) -> str:
            nonlocal count
            tok = m.group(0)
            ent = cache.get(tok, _MISS)
            if ent is _MISS:
                raw = tok.encode("ascii")
                orig, glued, placeholder = mapping.get(raw), "", tok
                if orig is None and (split := glued_split(raw, mapping, self._longest)) is not None:
                    glued, placeholder = split[0].decode("ascii"), split[1].decode("ascii")  # "AWS_" + it
                    orig = mapping[split[1]]
                if orig is None:
                    ent = None
                else:
                    text = orig.decode("utf-8", "replace")
                    ent = (
                        glued + text,
                        glued + json.dumps(text, ensure_ascii=False)[1:-1],
                        glued + orig.decode("utf-8", "surrogateescape"),
                        placeholder,
                    )
                cache[tok] = ent
            if ent is None:
                return tok
            count += 1
            seen[ent[3]] += 1
            return str(ent[kind])

        out = _TOKEN_STR_RE.sub(sub, s)
        return out, count

    def _step(self, key: Key, kind: int, text: str, final: bool) -> tuple[str, str, bool]:
        """Run ``text`` through channel ``key``: (text to emit now, new held tail, changed)."""
        ch = self._chans.get(key)
        held = ch.held if ch is not None else ""
        s = held + text if held else text
        h = len(s) if final else self._hold_at(s)
        head, tail = s[:h], s[h:]
        if "AWS_" in head:
            head, n = self._restore_str(head, kind)
            self.restored += n
        return head, tail, head != text

    def _commit(self, key: Key, kind: int, tail: str, ev: _Event | None, obj: Any, info: Any) -> None:
        ch = self._chans.get(key)
        if ch is None:
            ch = self._chans[key] = _Chan(kind)
        ch.held = tail
        if ev is not None:
            ch.tmpl, ch.obj, ch.info = ev, obj, info
        if tail:
            self._holding.add(key)
        else:
            self._holding.discard(key)

    # ---------------------------------------------------------------------------------------- raw mode

    def _raw(self, data: bytes, final: bool) -> None:
        if self._mode == "json" and not self._json_seen:
            first = (self._raw_held + data).lstrip()[:1]
            if first:
                self._json_seen = True
                if first == b"[":  # a JSON array sent element by element: restored element by element
                    self._mode = "array"
                    held, self._raw_held = self._raw_held, b""
                    self._array(held + data, final)
                    return
        s = self._raw_held + data if self._raw_held else data
        self._raw_held = b""
        self._work, self._pos = s, 0  # what goes out unrestored should this fail
        h = len(s)
        if not final and 0x41 in s[-self._longest :]:  # 0x41: "A"
            h = tail_to_hold(s, self._get_prefixes(), self._longest)
        head = s[:h]
        if head.find(b"AWS_") >= 0:
            head, n = restore_bytes(head, self._map, self._seen_bytes, in_json=self._mode == "json")
            self.restored += n
        self._raw_held = s[h:]
        self._work = b""
        self._out.append(head)

    def _array(self, data: bytes, final: bool) -> None:
        """A JSON array whose elements arrive one by one (Gemini without ``alt=sse``): each object at the top
        level goes through the same handlers as an SSE event's data, so a placeholder cut between two
        elements is held back and restored like one cut between two events."""
        buf: bytes | bytearray
        if self._abuf:  # an element still incomplete: added to in place (one large element in small reads)
            buf = self._abuf if isinstance(self._abuf, bytearray) else bytearray(self._abuf)
            buf += data
        else:
            buf = data
        self._abuf = b""
        self._work, self._pos = buf, 0
        i, depth, in_str = self._ascan, self._adepth, self._ain_str
        start = 0
        search = _JSON_STRUCTURE_RE.search
        while True:
            m = search(buf, i)
            if m is None:
                i = max(i, len(buf))  # all of it looked at (past it: an escaped byte still to come)
                break
            c = buf[m.start()]
            i = m.end()
            if in_str:
                if c == 0x5C:  # a backslash: the next byte is escaped
                    i += 1
                elif c == 0x22:
                    in_str = False
                continue
            if c == 0x22:
                in_str = True
            elif c == 0x7B or c == 0x5B:  # { [
                depth += 1
            else:
                depth -= 1
                if depth == 1 and c == 0x7D:  # an object of the top array is complete
                    self._element(bytes(buf[start:i]))
                    start = self._pos = i
                elif depth <= 0:  # the array ends: what is held goes out before "]"
                    self._flush(None, self._out)
                    self._pending(bytes(buf[start:i]))
                    start = self._pos = i
        if final:
            self._flush(None, self._out)
            self._pending(bytes(buf[start:]))
            start = self._pos = len(buf)
        elif len(buf) - start > MAX_EVENT:  # no end in sight: out unrestored but for whole placeholders
            self._pending(bytes(buf[start:]))
            start = self._pos = len(buf)
        self._abuf = buf[start:] if start else buf
        self._ascan, self._adepth, self._ain_str = max(0, i - start), depth, in_str
        self._work = b""
        self._pos = 0

    def _element(self, raw: bytes) -> None:
        if not self._holding and (0x41 not in raw or not _MAYBE_RE.search(raw)):
            self._out.append(raw)  # nothing to restore, nothing to hold, nothing to flush
            return
        ev = _Element(raw, raw.find(b"{"))
        try:
            obj = json.loads(ev.data or b"")
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            self._json_event(ev, obj)  # type: ignore[arg-type]  # _Element offers what _Event does
        else:
            self._generic(ev)  # type: ignore[arg-type]

    def _pending(self, raw: bytes) -> None:
        """Bytes of an array stream outside its objects (brackets, commas, other values)."""
        if raw.find(b"AWS_") >= 0:
            raw, n = restore_bytes(raw, self._map, self._seen_bytes, in_json=True)
            self.restored += n
        if raw:
            self._out.append(raw)

    def _lines(self, data: bytes, final: bool) -> None:
        """JSON Lines (Ollama's native API): each line goes through the handlers of an SSE event's data, so a
        placeholder cut between two lines is held back and restored like one cut between two events."""
        self._frames(data, final, _next_line_end, self._line, b"\n")

    def _line(self, raw: bytes) -> None:
        if not self._holding and (0x41 not in raw or not _MAYBE_RE.search(raw)):
            self._out.append(raw)  # nothing to restore, nothing to hold, nothing to flush
            return
        ev = _Line(raw)
        try:
            obj = json.loads(ev.data or b"")
            ev.json = True
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            if isinstance(obj.get("message"), dict) or "response" in obj or obj.get("done") is True:
                self._ollama_chunk(ev, obj)
            else:
                self._json_event(ev, obj)  # type: ignore[arg-type]  # _Line offers what _Event does
        else:
            self._generic(ev)  # type: ignore[arg-type]

    def _sse(self, data: bytes, final: bool) -> None:
        self._frames(data, final, _next_event_end, self._event, b"")

    def _frames(self, data: bytes, final: bool, next_end: Callable[[bytes, int, bool], int],
                unit: Callable[[bytes], None], gap: bytes) -> None:
        """Cut the stream into units (SSE events, lines) with ``next_end`` and pass each complete one to
        ``unit``; what is left waits for the next read (a unit longer than MAX_EVENT goes through unrestored).
        At the end of the stream, ``gap`` goes out before held text if the last unit had no end."""
        held = self._buf
        if held and not final and len(held) + len(data) <= MAX_EVENT and \
                next_end(bytes(held[-3:]) + data, 0, False) < 0:
            # Still no end of the unit (one large unit arriving in small reads): add to it in place, not
            # by copying all that is held on every read.
            if not isinstance(held, bytearray):
                self._buf = held = bytearray(held)
            held += data
            return
        buf = bytes(held) + data if held else data
        # The bytes already held had no end: an end (4 bytes at most) in the new data starts at most 3 bytes
        # before them.
        scan = max(0, len(self._buf) - 3)
        self._buf = b""
        self._work, self._pos = buf, 0
        n = len(buf)
        pos = 0
        while True:
            end = next_end(buf, max(pos, scan), final)
            if end < 0:
                break
            if self._skipping:  # the rest of an oversized unit: passed through as it is
                self._out.append(buf[pos:end])
                self._skipping = False
            else:
                unit(buf[pos:end])
            pos = self._pos = end
        if final:
            if pos < n:
                if self._skipping:
                    self._out.append(buf[pos:])
                else:
                    unit(buf[pos:])
                pos = self._pos = n
                if gap and self._holding:  # held text goes out as a unit of its own
                    self._out.append(gap)
            self._flush(None, self._out)
        elif n - pos > MAX_EVENT:
            # No end in sight: pass the bytes through unrestored rather than buffer without bound.
            self._flush(None, self._out)
            self._out.append(buf[pos:])
            self._skipping = True
            self._pos = n
        else:
            self._buf = buf[pos:]
        self._work = b""
        self._pos = 0

    def _event(self, raw: bytes) -> None:
        out = self._out
        # (an int needle and find(): `bytes in bytes` costs ~0.25 µs per test, every event)
        if not self._holding and (0x41 not in raw or not _MAYBE_RE.search(raw)):
            out.append(raw)  # fast path: nothing to restore, nothing to hold, nothing to flush
            return
        ev = _Event(raw)
        data = ev.data
        if data is None:
            out.append(raw)
            return
        if data == b"[DONE]":
            self._flush(None, out)
            out.append(raw)
            return
        if data.lstrip()[:1] in (b"{", b"["):
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                self._json_event(ev, obj)
                return
            self._generic(ev)
            return
        self._text_event(ev)

    def _generic(self, ev: _Event) -> None:
        """Restore over the raw data of an event of unknown shape (originals JSON-escaped)."""
        data = ev.data
        if data is not None and data.find(b"AWS_") >= 0:
            new, n = restore_bytes(data, self._map, self._seen_bytes, in_json=True)
            if n:
                self.restored += n
                self._out.append(ev.build(new))
                return
        self._out.append(ev.raw)

    def _walk_event(self, ev: _Event, obj: Any) -> None:
        """Restore every string of a JSON event (JSON documents in strings get JSON-escaped originals)."""
        if ev.data is not None and ev.data.find(b"AWS_") >= 0:
            n = self._walk(obj)
            if n:
                self.restored += n
                self._out.append(ev.build(_dumps(obj)))
                return
        self._out.append(ev.raw)

    def _walk(self, o: Any) -> int:
        n = 0
        if isinstance(o, dict) and any("AWS_" in k for k in o):
            # Keys too (a tool's arguments keyed by account: {"AWS_ACCOUNT_0001": "prod"}), as restore_bytes
            # restores them in a whole reply. Keys that become equal keep the first's place and the last's
            # value, as a JSON parser reads the whole reply.
            pairs = []
            for k, v in o.items():
                if "AWS_" in k:
                    k, c = self._restore_str(k, TEXT)
                    n += c
                pairs.append((k, v))
            if n:
                o.clear()
                for k, v in pairs:
                    o[k] = v
        items: Any = o.items() if isinstance(o, dict) else enumerate(o)
        for k, v in items:
            if isinstance(v, str):
                if "AWS_" in v and k not in _OPAQUE_KEYS:
                    new, c = self._restore_str(v, DOC if k in _DOC_KEYS else TEXT)
                    if c:
                        o[k] = new
                        n += c
            elif isinstance(v, (dict, list)):
                n += self._walk(v)
        return n

    def _json_event(self, ev: _Event, obj: dict[str, Any]) -> None:
        t = obj.get("type")
        out = self._out
        if t == "content_block_delta":
            self._anthropic_delta(ev, obj)
        elif isinstance(t, str) and t.startswith("response."):
            self._responses_event(ev, obj, t)
        elif isinstance(obj.get("choices"), list):
            self._chat_chunk(ev, obj)
        elif isinstance(obj.get("candidates"), list):
            self._gemini_chunk(ev, obj)
        elif isinstance(t, str) and t in _CO_DELTAS:
            self._cohere_delta(ev, obj, t)
        elif t in ("tool-call-start", "content-start"):  # the tool plan is over
            self._flush(lambda k: k[0] == "co" and k[1] == "tool-plan-delta", out)
            self._generic(ev)
        elif isinstance(t, str) and t in _CO_ENDS:
            self._flush(lambda k: k[0] == "co" and k[1] == _CO_ENDS[t] and k[2] == obj.get("index"), out)
            self._generic(ev)
        elif t == "message-end":
            self._flush(None, out)
            self._generic(ev)
        elif t in ("content_block_stop", "content_block_start"):
            self._flush(lambda k: k[0] == "an" and k[1] == obj.get("index"), out)
            self._generic(ev)
        elif t in ("message_delta", "message_stop", "error") or (t is None and "error" in obj):
            # an error mid-stream (OpenAI's and Gemini's {"error": …} too): SDKs raise on it, so what is
            # held goes out first
            self._flush(None, out)
            self._generic(ev)
        else:
            self._generic(ev)

    def _flush(self, match: Callable[[Key], bool] | None, out: list[bytes]) -> None:
        """Emit the held text of matching channels (all when ``match`` is None) as synthesised deltas."""
        for key in sorted((k for k in self._holding if match is None or match(k)), key=repr):
            ch = self._chans[key]
            text, _, _ = self._step(key, ch.kind, "", True)
            ev = self._synth(ch, text)
            self._commit(key, ch.kind, "", None, None, None)
            out.append(ev)

    def _synth(self, ch: _Chan, text: str) -> bytes:
        """A delta event carrying ``text`` on channel ``ch``, built from its last delta event."""
        tmpl, obj, info = ch.tmpl, ch.obj, ch.info
        assert tmpl is not None
        if info[0] == "an":
            new = dict(obj)
            new["delta"] = {"type": info[1], info[2]: text}
        elif info[0] == "cc":
            _, ci, field, ti = info
            delta: dict[str, Any]
            if field == "tool":
                delta = {"tool_calls": [{"index": ti, "function": {"arguments": text}}]}
            else:
                delta = {field: text}
            new = {}
            for k, v in obj.items():
                if k == "choices":
                    v = [{"index": ci, "delta": delta, "logprobs": None, "finish_reason": None}]
                elif k == "usage":
                    v = None
                new[k] = v
        elif info[0] == "rs":
            new = dict(obj)
            new["delta"] = text
            if "logprobs" in new:
                new["logprobs"] = []
        elif info[0] == "co":
            new = dict(obj)
            node = new["delta"] = dict(obj["delta"])
            path = info[1]
            for name in path[:-1]:
                node[name] = dict(node[name])
                node = node[name]
            node[path[-1]] = text
        elif info[0] == "ol":
            path = info[1]
            new = dict(obj)  # the line it was last seen in, with this text alone (and no log-probabilities)
            new.pop("logprobs", None)
            if len(path) == 2:  # chat
                role = obj["message"].get("role", "assistant")
                new["message"] = {"role": role, "content": "", path[1]: text}
            else:  # generate
                for k in ("response", "thinking"):
                    if k in new:
                        new[k] = ""
                new[path[0]] = text
        elif info[0] == "gm":
            _, ci, thought = info
            part: dict[str, Any] = {"text": text, "thought": True} if thought else {"text": text}
            new = {k: v for k, v in obj.items() if k != "candidates"}
            new["candidates"] = [{"content": {"parts": [part], "role": "model"}, "index": ci}]
        else:  # plain text data
            return tmpl.synth(text.encode("utf-8", "surrogateescape"))
        return tmpl.synth(_dumps(new))

    # ------------------------------------------------------------------------------ provider shapes

    def _anthropic_delta(self, ev: _Event, obj: dict[str, Any]) -> None:
        delta = obj.get("delta")
        dt = delta.get("type") if isinstance(delta, dict) else None
        spec = _AN_DELTAS.get(dt) if isinstance(dt, str) else None
        if spec is None or not isinstance(delta, dict) or not isinstance(delta.get(spec[0]), str):
            if dt == "signature_delta":
                self._out.append(ev.raw)  # opaque: never touched
            else:
                self._generic(ev)
            return
        field, kind = spec
        key: Key = ("an", obj.get("index"))
        head, tail, changed = self._step(key, kind, delta[field], False)
        if changed:
            delta[field] = head
        info = ("an", dt, field)
        if not changed:
            self._out.append(ev.raw)
        elif head:
            self._out.append(ev.build(_dumps(obj)))
        # else: held entirely -> the event is not emitted; its text leaves with the next delta or a flush
        self._commit(key, kind, tail, ev, obj, info)

    def _responses_event(self, ev: _Event, obj: dict[str, Any], t: str) -> None:
        spec = _RS_DELTAS.get(t)
        if spec is not None and isinstance(obj.get("delta"), str):
            sub_name, kind = spec
            key: Key = ("rs", obj.get("output_index"), sub_name, obj.get(sub_name) if sub_name else None, t)
            head, tail, changed = self._step(key, kind, obj["delta"], False)
            if not changed:
                self._out.append(ev.raw)
            else:
                obj["delta"] = head
                if head or obj.get("logprobs"):
                    self._out.append(ev.build(_dumps(obj)))
            self._commit(key, kind, tail, ev, obj, ("rs",))
            return
        if t in _RS_END:
            self._flush(None, self._out)
        elif t.endswith(".done") and "output_index" in obj:
            oi = obj["output_index"]
            sub = next((s for s in ("content_index", "summary_index") if s in obj), None)
            sv = obj.get(sub) if sub else None
            self._flush(
                lambda k: k[0] == "rs" and k[1] == oi and (sub is None or (k[2] == sub and k[3] == sv)),
                self._out,
            )
        self._walk_event(ev, obj)

    def _walk_skipping(self, o: dict[str, Any], strings: frozenset[str], container: str) -> int:
        """``_walk`` of a dict but for the string values under ``strings`` and the value under ``container``
        (channels of their own, handled apart)."""
        n = 0
        for k, v in o.items():
            if isinstance(v, str):
                if k not in strings and "AWS_" in v and k not in _OPAQUE_KEYS:
                    new, c = self._restore_str(v, DOC if k in _DOC_KEYS else TEXT)
                    if c:
                        o[k] = new
                        n += c
            elif isinstance(v, (dict, list)) and k != container:
                n += self._walk(v)
        return n

    def _chat_chunk(self, ev: _Event, obj: dict[str, Any]) -> None:
        choices = obj["choices"]
        has_token = (ev.data or b"").find(b"AWS_") >= 0
        commits: list[tuple[Key, int, str, Any]] = []
        changed_any = False
        kept: list[Any] = []
        removed = False
        for choice in choices:
            if not isinstance(choice, dict):
                kept.append(choice)
                continue
            ci = choice.get("index", 0)
            fin = bool(choice.get("finish_reason"))  # some servers send "" on every chunk: not finished
            delta = choice.get("delta")
            emptied = False
            nonempty = False
            droppable = not fin and choice.get("logprobs") is None and isinstance(delta, dict)
            present: set[Key] = set()
            if isinstance(delta, dict):
                for field in _CC_TEXT_FIELDS:
                    v = delta.get(field)
                    if isinstance(v, str) and v:
                        key: Key = ("cc", ci, field, None)
                        present.add(key)
                        head, tail, changed = self._step(key, TEXT, v, fin)
                        if changed:
                            delta[field] = head
                            changed_any = True
                        emptied |= not head
                        nonempty |= bool(head)
                        commits.append((key, TEXT, tail, ("cc", ci, field, None)))
                if any(k not in _CC_DROPPABLE_KEYS and delta[k] is not None for k in delta):
                    droppable = False
                calls = delta.get("tool_calls")
                for tc in calls if isinstance(calls, list) else ():
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if not isinstance(fn, dict):
                        continue
                    if set(tc) - {"index", "function", "type"} or set(fn) - {"arguments"}:
                        droppable = False
                    args = fn.get("arguments")
                    if isinstance(args, str) and args:
                        ti = tc.get("index", 0)
                        key = ("cc", ci, "tool", ti)
                        present.add(key)
                        head, tail, changed = self._step(key, DOC, args, fin)
                        if changed:
                            fn["arguments"] = head
                            changed_any = True
                        emptied |= not head
                        nonempty |= bool(head)
                        commits.append((key, DOC, tail, ("cc", ci, "tool", ti)))
            if isinstance(delta, dict) and has_token:
                # Whole placeholders anywhere else in the delta (the legacy function_call, audio transcripts,
                # OpenRouter's reasoning_details, content as a list of parts) are restored where they are.
                n = self._walk_skipping(delta, _CC_TEXT_KEYS, "tool_calls")
                for tc in calls if isinstance(calls, list) else ():
                    if isinstance(tc, dict):  # its function's arguments are a channel of their own
                        n += self._walk_skipping(tc, _NO_KEYS, "function")
                        if isinstance(tc.get("function"), dict):
                            n += self._walk_skipping(tc["function"], _DOC_KEYS, "")
                if n:
                    self.restored += n
                    changed_any = True
            if fin:  # held text of this choice's other channels goes out before this chunk
                self._flush(_chat_match(ci, present), self._out)
            if emptied and not nonempty and droppable:
                removed = True
            else:
                kept.append(choice)
        if not changed_any:
            out = [ev.raw]
        elif removed and not kept and obj.get("usage") is None:
            out = []  # held entirely: not emitted
        else:
            if removed:
                obj["choices"] = kept
            out = [ev.build(_dumps(obj))]
        for key, kind, tail, info in commits:
            self._commit(key, kind, tail, ev, obj, info)
        self._out.extend(out)

    def _cohere_delta(self, ev: _Event, obj: dict[str, Any], t: str) -> None:
        """Cohere v2 chat: content, tool plan and tool-call argument deltas; a channel per type and index."""
        path, kind = _CO_DELTAS[t]
        parent: Any = obj.get("delta")
        for name in path[:-1]:
            parent = parent.get(name) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or not isinstance(parent.get(path[-1]), str):
            self._generic(ev)
            return
        key: Key = ("co", t, obj.get("index"))
        head, tail, changed = self._step(key, kind, parent[path[-1]], False)
        if not changed:
            self._out.append(ev.raw)
        elif head:
            parent[path[-1]] = head
            self._out.append(ev.build(_dumps(obj)))
        # else: held entirely -> not emitted; its text leaves with the next delta or a flush
        self._commit(key, kind, tail, ev, obj, ("co", path))

    def _gemini_chunk(self, ev: _Event, obj: dict[str, Any]) -> None:
        """Gemini (``streamGenerateContent?alt=sse``): one text channel per candidate (and one for its
        thoughts); other parts (function calls) arrive whole and are restored where they are."""
        changed_any = False
        for cand in obj["candidates"]:
            if not isinstance(cand, dict):
                continue
            ci = cand.get("index", 0)
            fin = bool(cand.get("finishReason"))
            content = cand.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            present: set[Key] = set()
            for part in parts if isinstance(parts, list) else ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    thought = bool(part.get("thought"))
                    key: Key = ("gm", ci, thought)
                    present.add(key)
                    head, tail, changed = self._step(key, TEXT, part["text"], fin)
                    if changed:
                        part["text"] = head  # held entirely: an empty text part, its text goes out later
                        changed_any = True
                    # at once: a later part of the same channel in this chunk continues from this tail
                    self._commit(key, TEXT, tail, ev, obj, ("gm", ci, thought))
                elif isinstance(part, dict) and (ev.data or b"").find(b"AWS_") >= 0:
                    n = self._walk(part)
                    if n:
                        self.restored += n
                        changed_any = True
            if fin:  # held text of this candidate's other channel goes out before this chunk
                self._flush(_gemini_match(ci, present), self._out)
        self._out.append(ev.build(_dumps(obj)) if changed_any else ev.raw)

    def _ollama_chunk(self, ev: _Line, obj: dict[str, Any]) -> None:
        """Ollama (/api/chat, /api/generate): one text channel per field of ``_OL_PATHS``; tool calls arrive
        whole and are restored where they are; the line with ``"done": true`` ends every channel."""
        fin = obj.get("done") is True
        changed = False
        present: set[Key] = set()
        for path in _OL_PATHS:
            parent: Any = obj.get(path[0]) if len(path) == 2 else obj
            text = parent.get(path[-1]) if isinstance(parent, dict) else None
            if not isinstance(text, str):
                continue
            key: Key = ("ol", path)
            present.add(key)
            head, tail, step_changed = self._step(key, TEXT, text, fin)
            if step_changed:
                parent[path[-1]] = head  # held entirely: an empty text, its text goes out later
                changed = True
            self._commit(key, TEXT, tail, ev, obj, ("ol", path))  # type: ignore[arg-type]
        if (ev.data or b"").find(b"AWS_") >= 0:  # whole placeholders elsewhere (tool call arguments)
            n = self._walk_skipping(obj, frozenset({"response", "thinking"}), "message")
            message = obj.get("message")
            if isinstance(message, dict):
                n += self._walk_skipping(message, frozenset({"content", "thinking"}), "")
            if n:
                self.restored += n
                changed = True
        if fin:  # held text of channels not in this last line goes out before it
            self._flush(lambda k: k[0] == "ol" and k not in present, self._out)
        self._out.append(ev.build(_dumps(obj)) if changed else ev.raw)

    def _text_event(self, ev: _Event) -> None:
        """Data that is not JSON: one plain-text channel per event type, restored with hold-back."""
        assert ev.data is not None
        key: Key = ("tx", ev.etype)
        text = ev.data.decode("utf-8", "surrogateescape")
        head, tail, changed = self._step(key, PLAIN, text, False)
        if not changed:
            self._out.append(ev.raw)
        elif head:
            self._out.append(ev.build(head.encode("utf-8", "surrogateescape")))
        self._commit(key, PLAIN, tail, ev, None, ("tx",))
