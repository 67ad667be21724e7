"""A local fake LLM upstream speaking the Anthropic and OpenAI wire formats.

``FakeUpstream`` is a tiny HTTP/1.1 server (asyncio raw streams, own event loop in a
background thread) on ``127.0.0.1:<free port>``.  It records every request and answers:

* ``POST /v1/messages``          Anthropic Messages (JSON or SSE when ``"stream": true``)
* ``POST /v1/chat/completions``  OpenAI Chat Completions (JSON or ``chat.completion.chunk`` SSE)
* ``POST /v1/responses``         OpenAI Responses API (JSON or ``response.*`` SSE events)
* ``POST /v2/chat``               Cohere v2 chat (JSON or ``content-delta`` … SSE events)
* ``POST /v1beta/models/<model>:generateContent`` and ``:streamGenerateContent?alt=sse``
                                 Google Gemini (JSON, or SSE of ``GenerateContentResponse`` chunks)
* ``POST /api/chat``              Ollama chat (JSON with ``"stream": false``, else NDJSON: an object a line)
* anything else                  echoes the raw request body byte-for-byte (same content-type)

The "model" echoes: its reply text is ``expected_reply_text(request_json)`` — the system
prompt(s) plus the text of the last user (or tool-result) message, joined with newlines.
When the request has ``tools`` the reply additionally contains one tool call to the first
tool whose input is ``{"text": <reply text>}`` (``expected_tool_input``).

Behaviour knobs — request headers (per request) or ``FakeUpstream.set_knobs`` (defaults):

====================  ===================  =====================================================
header                knob                 meaning
====================  ===================  =====================================================
x-fake-delta-chars    delta_chars          characters per text / arguments delta (default 16)
x-fake-pause-ms       pause_ms             sleep between two writes of a stream (default 0)
x-fake-encoding       encoding             response Content-Encoding: gzip, deflate, br, zstd
x-fake-status         status               reply with this status + error body echoing the text
x-fake-reset-after    reset_after          SSE: TCP RST after N events; other bodies: after N bytes
x-fake-chunk-bytes    chunk_bytes          re-cut the (encoded) body into writes of N bytes
x-fake-error-after    error_after          SSE: send the API's in-stream error event after N events
====================  ===================  =====================================================

Streams use ``Transfer-Encoding: chunked`` (one HTTP chunk per write); everything else uses
``Content-Length`` (also written in ``chunk_bytes`` pieces when that knob is set).
Client-side helpers (``SSEParser``, ``parse_sse``, ``reassemble_stream``, ``reply_parts``)
turn a reply back into text + tool arguments so tests can compare with the expectations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from typing import Any

try:
    import brotli
except ImportError:  # pragma: no cover
    brotli = None

try:
    from backports import zstd
except ImportError:  # pragma: no cover
    try:
        from compression import zstd  # type: ignore[no-redef]  # Python >= 3.14
    except ImportError:
        zstd = None

ANTHROPIC = "anthropic"
OPENAI_CHAT = "openai-chat"
RESPONSES = "responses"
GEMINI = "gemini"
COHERE = "cohere"
OLLAMA = "ollama"

ROUTES = {
    "/v1/messages": ANTHROPIC,
    "/v1/chat/completions": OPENAI_CHAT,
    "/v1/responses": RESPONSES,
    "/v2/chat": COHERE,
    "/api/chat": OLLAMA,
}

DEFAULT_MODEL = "fake-echo-1"
EMPTY_REPLY = "(empty)"

KNOB_HEADERS = {
    "delta_chars": "x-fake-delta-chars",
    "pause_ms": "x-fake-pause-ms",
    "encoding": "x-fake-encoding",
    "status": "x-fake-status",
    "reset_after": "x-fake-reset-after",
    "chunk_bytes": "x-fake-chunk-bytes",
    "error_after": "x-fake-error-after",
}


_GEMINI_ROUTE = re.compile(r"^/v1(?:beta)?/models/[^/:]+:(generateContent|streamGenerateContent)$")


def api_for_path(path: str) -> str | None:
    """Return ANTHROPIC / OPENAI_CHAT / RESPONSES / GEMINI / COHERE for an LLM route, None for echo paths."""
    route = path.split("?", 1)[0].rstrip("/") or "/"
    return GEMINI if _GEMINI_ROUTE.match(route) else ROUTES.get(route)


def gemini_path(model: str = "gemini-test", *, stream: bool = False) -> str:
    """The Gemini route for ``model``: generateContent, or streamGenerateContent as SSE."""
    return f"/v1beta/models/{model}:" + ("streamGenerateContent?alt=sse" if stream else "generateContent")


def is_stream_request(api: str, route: str, payload: dict[str, Any]) -> bool:
    """Gemini streams by route; Ollama unless ``"stream": false``; the others by ``"stream": true``."""
    if api == GEMINI:
        return route.endswith(":streamGenerateContent")
    if api == OLLAMA:
        return payload.get("stream", True) is not False
    return bool(payload.get("stream"))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------
# The echo "model"
# --------------------------------------------------------------------------------------


def _content_texts(content: Any) -> list[str]:
    """Texts of a message content: a string or a list of text-ish blocks / tool results."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for block in content:
            if isinstance(block, str):
                out.append(block)
            elif isinstance(block, dict):
                kind = block.get("type")
                if kind in ("text", "input_text", "output_text") and isinstance(block.get("text"), str):
                    out.append(block["text"])
                elif kind == "tool_result":  # Anthropic tool result inside a user message
                    out.extend(_content_texts(block.get("content")))
    return out


def request_texts(req: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(system texts, last-user-message texts) of an Anthropic / OpenAI Chat / Responses request.

    System: Anthropic ``system``, Responses ``instructions``, and every message / input item
    with role ``system`` or ``developer``.  User: the last message with role ``user`` or
    ``tool`` (OpenAI tool result), or for Responses the last ``user`` item or
    ``function_call_output`` (a plain string ``input`` is the user text).
    """
    system: list[str] = []
    user: list[str] = []
    if isinstance(req.get("contents"), list):  # Gemini
        instruction = req.get("systemInstruction") or req.get("system_instruction") or {}
        system = [p["text"] for p in instruction.get("parts", []) if isinstance(p.get("text"), str)]
        for item in req["contents"]:
            if isinstance(item, dict) and item.get("role", "user") == "user":
                texts = [p["text"] for p in item.get("parts", []) if isinstance(p.get("text"), str)]
                if texts or not any("functionResponse" in p for p in item.get("parts", [])):
                    user = texts
                else:  # a tool result: the response object's text
                    user = [json.dumps(p["functionResponse"].get("response"), ensure_ascii=False)
                            for p in item["parts"] if "functionResponse" in p]
        return system, user
    if "system" in req:
        system.extend(_content_texts(req["system"]))
    if isinstance(req.get("instructions"), str):
        system.append(req["instructions"])
    items: Any = req.get("messages")
    if items is None:
        items = req.get("input")
    if isinstance(items, str):
        return system, [items]
    if not isinstance(items, list):
        return system, user
    for item in items:
        if not isinstance(item, dict):
            continue
        role = item.get("role")
        kind = item.get("type")
        if role in ("system", "developer"):
            system.extend(_content_texts(item.get("content")))
        elif role in ("user", "tool"):
            user = _content_texts(item.get("content"))
        elif kind == "function_call_output":
            out = item.get("output")
            user = [out] if isinstance(out, str) else _content_texts(out)
    return system, user


def expected_reply_text(req: dict[str, Any]) -> str:
    """The text the echo model answers to ``req`` (any of the three APIs)."""
    system, user = request_texts(req)
    text = "\n".join(t for t in [*system, *user] if t)
    return text or EMPTY_REPLY


def has_tools(req: dict[str, Any]) -> bool:
    return bool(req.get("tools"))


def tool_name(req: dict[str, Any]) -> str:
    for tool in req.get("tools") or []:
        if isinstance(tool, dict):
            declarations = tool.get("functionDeclarations") or [{}]  # Gemini
            name = tool.get("name") or (tool.get("function") or {}).get("name") or declarations[0].get("name")
            if name:
                return str(name)
    return "echo"


def expected_tool_input(req: dict[str, Any]) -> dict[str, Any] | None:
    """The tool input / arguments object of the echo model's tool call (None without tools)."""
    return {"text": expected_reply_text(req)} if has_tools(req) else None


def expected_tool_arguments(req: dict[str, Any]) -> str | None:
    """Serialized tool arguments exactly as the fake sends them (JSON with default separators)."""
    obj = expected_tool_input(req)
    return None if obj is None else json.dumps(obj, ensure_ascii=False)


def expected_error_message(req: dict[str, Any]) -> str:
    """``error.message`` of the error body sent for ``x-fake-status`` (all APIs)."""
    return "fake upstream error: " + expected_reply_text(req)


def split_text(text: str, size: int) -> list[str]:
    size = max(1, size)
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


# --------------------------------------------------------------------------------------
# Knobs and recorded requests
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Knobs:
    delta_chars: int = 16
    pause_ms: float = 0
    encoding: str | None = None
    status: int | None = None
    reset_after: int | None = None
    chunk_bytes: int | None = None
    error_after: int | None = None

    def with_headers(self, req: RecordedRequest) -> Knobs:
        k = dataclasses.replace(self)
        for field, header in KNOB_HEADERS.items():
            value = req.header(header)
            if value is None or value == "":
                continue
            if field == "encoding":
                k.encoding = None if value.lower() in ("identity", "none") else value.lower()
            elif field == "pause_ms":
                k.pause_ms = float(value)
            else:
                setattr(k, field, int(value))
        return k


@dataclasses.dataclass
class RecordedRequest:
    index: int
    method: str
    target: str  # request-target exactly as received (origin-form or absolute-form)
    path: str  # origin-form path incl. query
    http_version: str
    headers: list[tuple[str, str]]  # order and case as received
    body: bytes  # raw body as received (de-chunked, still content-encoded)
    chunked: bool
    client: tuple[str, int] | None
    received_at: float

    @property
    def route(self) -> str:
        return self.path.split("?", 1)[0]

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def header_names(self) -> list[str]:
        return [k for k, _ in self.headers]

    @property
    def content(self) -> bytes:
        """Body with the request's Content-Encoding removed."""
        return decode_body(self.body, self.header("content-encoding"))

    def json(self) -> Any:
        return json.loads(self.content)

    def text(self) -> str:
        return self.content.decode("utf-8")


def decode_body(data: bytes, encoding: str | None) -> bytes:
    if not encoding:
        return data
    for enc in reversed([e.strip().lower() for e in encoding.split(",") if e.strip()]):
        if enc in ("gzip", "x-gzip"):
            data = zlib.decompress(data, 47)
        elif enc == "deflate":
            try:
                data = zlib.decompress(data)
            except zlib.error:
                data = zlib.decompress(data, -15)
        elif enc == "br":
            assert brotli is not None
            data = brotli.decompress(data)
        elif enc == "zstd":
            assert zstd is not None
            data = zstd.decompress(data)
        elif enc != "identity":
            raise ValueError(f"unsupported content-encoding {enc!r}")
    return data


def encode_body(data: bytes, encoding: str | None) -> bytes:
    enc = _Encoder(encoding)
    return enc.chunk(data) + enc.finish()


class _Encoder:
    """Incremental Content-Encoding; every chunk is flushed so it is decodable on its own."""

    def __init__(self, name: str | None):
        self.name = name
        if name in (None, "identity"):
            self._c = None
        elif name == "gzip":
            self._c = zlib.compressobj(wbits=31)
        elif name == "deflate":
            self._c = zlib.compressobj(wbits=15)
        elif name == "br":
            if brotli is None:
                raise ValueError("brotli not installed")
            self._c = brotli.Compressor()
        elif name == "zstd":
            if zstd is None:
                raise ValueError("zstd not available")
            self._c = zstd.ZstdCompressor()
        else:
            raise ValueError(f"unknown encoding {name!r}")

    def chunk(self, data: bytes) -> bytes:
        c = self._c
        if c is None:
            return data
        if self.name == "br":
            return c.process(data) + c.flush()
        if self.name == "zstd":
            return c.compress(data) + c.flush(zstd.ZstdCompressor.FLUSH_BLOCK)
        return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        c = self._c
        if c is None:
            return b""
        if self.name == "br":
            return c.finish()
        return c.flush()


# --------------------------------------------------------------------------------------
# Reply builders (pure functions: request json -> response object / SSE events)
# --------------------------------------------------------------------------------------

SSE = tuple[str | None, Any]  # (event name or None, data: dict or raw str)


@dataclasses.dataclass
class _Ctx:
    req: dict[str, Any]
    n: int  # request index, used for deterministic ids
    delta_chars: int

    @property
    def text(self) -> str:
        return expected_reply_text(self.req)

    @property
    def model(self) -> str:
        m = self.req.get("model")
        return m if isinstance(m, str) and m else DEFAULT_MODEL

    @property
    def tools(self) -> bool:
        return has_tools(self.req)

    @property
    def args(self) -> str:
        return expected_tool_arguments(self.req) or ""

    @property
    def in_tokens(self) -> int:
        system, user = request_texts(self.req)
        return _tokens("".join(system + user))

    def id(self, prefix: str) -> str:
        return f"{prefix}{self.n:020d}"


def anthropic_message(c: _Ctx) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": c.text}]
    if c.tools:
        content.append(
            {"type": "tool_use", "id": c.id("toolu_fake"), "name": tool_name(c.req),
             "input": expected_tool_input(c.req)}
        )
    return {
        "id": c.id("msg_fake"),
        "type": "message",
        "role": "assistant",
        "model": c.model,
        "content": content,
        "stop_reason": "tool_use" if c.tools else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": c.in_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": _tokens(c.text + c.args),
            "service_tier": "standard",
        },
    }


def anthropic_events(c: _Ctx) -> list[SSE]:
    msg = anthropic_message(c)
    start = dict(msg, content=[], stop_reason=None)
    start["usage"] = dict(msg["usage"], output_tokens=1)
    ev: list[SSE] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start",
         {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    for piece in split_text(c.text, c.delta_chars):
        ev.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": piece}}))
    ev.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if c.tools:
        block = dict(msg["content"][1], input={})
        ev.append(("content_block_start",
                   {"type": "content_block_start", "index": 1, "content_block": block}))
        for piece in ["", *split_text(c.args, c.delta_chars)]:
            ev.append(("content_block_delta", {"type": "content_block_delta", "index": 1,
                                               "delta": {"type": "input_json_delta", "partial_json": piece}}))
        ev.append(("content_block_stop", {"type": "content_block_stop", "index": 1}))
    ev.append(("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                                 "usage": {"output_tokens": msg["usage"]["output_tokens"]}}))
    ev.append(("message_stop", {"type": "message_stop"}))
    return ev


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
             500: "api_error", 529: "overloaded_error"}
    return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}


def openai_error(status: int, message: str) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def chat_completion(c: _Ctx) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None, "annotations": []}
    if c.tools:
        message["tool_calls"] = [{"id": c.id("call_fake"), "type": "function",
                                  "function": {"name": tool_name(c.req), "arguments": c.args}}]
    out_tokens = _tokens(c.text + c.args)
    return {
        "id": c.id("chatcmpl-fake"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": c.model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls" if c.tools else "stop"}],
        "usage": {"prompt_tokens": c.in_tokens, "completion_tokens": out_tokens,
                  "total_tokens": c.in_tokens + out_tokens},
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def chat_events(c: _Ctx) -> list[SSE]:
    full = chat_completion(c)
    base = {"id": full["id"], "object": "chat.completion.chunk", "created": full["created"],
            "model": c.model, "service_tier": "default", "system_fingerprint": "fp_fake"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> SSE:
        return (None, dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                           "finish_reason": finish}]))

    ev = [chunk({"role": "assistant", "content": "", "refusal": None})]
    ev += [chunk({"content": p}) for p in split_text(c.text, c.delta_chars)]
    if c.tools:
        call = full["choices"][0]["message"]["tool_calls"][0]
        ev.append(chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                         "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        ev += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
               for p in split_text(c.args, c.delta_chars)]
    ev.append(chunk({}, full["choices"][0]["finish_reason"]))
    if (c.req.get("stream_options") or {}).get("include_usage"):
        ev.append((None, dict(base, choices=[], usage=full["usage"])))
    ev.append((None, "[DONE]"))
    return ev


def responses_object(c: _Ctx, *, status: str = "completed") -> dict[str, Any]:
    output: list[dict[str, Any]] = [{
        "id": c.id("msg_fake"), "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": c.text, "annotations": [], "logprobs": []}],
    }]
    if c.tools:
        output.append({"id": c.id("fc_fake"), "type": "function_call", "status": "completed",
                       "arguments": c.args, "call_id": c.id("call_fake"), "name": tool_name(c.req)})
    out_tokens = _tokens(c.text + c.args)
    return {
        "id": c.id("resp_fake"),
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": c.req.get("instructions"),
        "max_output_tokens": c.req.get("max_output_tokens"),
        "model": c.model,
        "output": output if status == "completed" else [],
        "parallel_tool_calls": True,
        "previous_response_id": c.req.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": c.req.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": c.req.get("tools") or [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None if status != "completed" else {
            "input_tokens": c.in_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": out_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": c.in_tokens + out_tokens,
        },
        "user": None,
        "metadata": {},
    }


def responses_events(c: _Ctx) -> list[SSE]:
    full = responses_object(c)
    pending = responses_object(c, status="in_progress")
    msg = full["output"][0]
    part = msg["content"][0]
    raw: list[dict[str, Any]] = [
        {"type": "response.created", "response": pending},
        {"type": "response.in_progress", "response": pending},
        {"type": "response.output_item.added", "output_index": 0,
         "item": dict(msg, status="in_progress", content=[])},
        {"type": "response.content_part.added", "item_id": msg["id"], "output_index": 0, "content_index": 0,
         "part": dict(part, text="")},
    ]
    raw += [{"type": "response.output_text.delta", "item_id": msg["id"], "output_index": 0,
             "content_index": 0, "delta": p, "logprobs": []} for p in split_text(c.text, c.delta_chars)]
    raw += [
        {"type": "response.output_text.done", "item_id": msg["id"], "output_index": 0, "content_index": 0,
         "text": c.text, "logprobs": []},
        {"type": "response.content_part.done", "item_id": msg["id"], "output_index": 0, "content_index": 0,
         "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": msg},
    ]
    if c.tools:
        fc = full["output"][1]
        raw.append({"type": "response.output_item.added", "output_index": 1,
                    "item": dict(fc, status="in_progress", arguments="")})
        raw += [{"type": "response.function_call_arguments.delta", "item_id": fc["id"], "output_index": 1,
                 "delta": p} for p in split_text(c.args, c.delta_chars)]
        raw.append({"type": "response.function_call_arguments.done", "item_id": fc["id"], "output_index": 1,
                    "arguments": c.args})
        raw.append({"type": "response.output_item.done", "output_index": 1, "item": fc})
    raw.append({"type": "response.completed", "response": full})
    return [(e["type"], {"type": e["type"], "sequence_number": i,
                         **{k: v for k, v in e.items() if k != "type"}})
            for i, e in enumerate(raw)]


def error_body(api: str, status: int, message: str) -> dict[str, Any]:
    """The error body of ``api`` for ``status``."""
    if api == ANTHROPIC:
        return anthropic_error(status, message)
    if api == COHERE:
        return {"id": "err_fake", "message": message}
    if api == OLLAMA:
        return {"error": message}
    return gemini_error(status, message) if api == GEMINI else openai_error(status, message)


def gemini_error(status: int, message: str) -> dict[str, Any]:
    names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
             429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
    return {"error": {"code": status, "message": message, "status": names.get(status, "UNKNOWN")}}


def _gemini_usage(c: _Ctx) -> dict[str, Any]:
    out = _tokens(c.text + c.args)
    return {"promptTokenCount": c.in_tokens, "candidatesTokenCount": out,
            "totalTokenCount": c.in_tokens + out}


def gemini_response(c: _Ctx) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"text": c.text}]
    if c.tools:
        parts.append({"functionCall": {"name": tool_name(c.req), "args": expected_tool_input(c.req)}})
    candidate = {"content": {"parts": parts, "role": "model"}, "finishReason": "STOP", "index": 0}
    return {"candidates": [candidate], "usageMetadata": _gemini_usage(c), "modelVersion": c.model,
            "responseId": c.id("gem_fake")}


def gemini_events(c: _Ctx) -> list[SSE]:
    """Chunks of text, then the function call (Gemini sends it whole), the last chunk with finishReason."""
    base = {"usageMetadata": _gemini_usage(c), "modelVersion": c.model, "responseId": c.id("gem_fake")}
    pieces: list[dict[str, Any]] = [{"text": p} for p in split_text(c.text, c.delta_chars)]
    if c.tools:
        pieces.append({"functionCall": {"name": tool_name(c.req), "args": expected_tool_input(c.req)}})
    ev: list[SSE] = []
    for i, part in enumerate(pieces):
        cand: dict[str, Any] = {"content": {"parts": [part], "role": "model"}, "index": 0}
        if i == len(pieces) - 1:
            cand["finishReason"] = "STOP"
        ev.append((None, {"candidates": [cand], **base}))
    return ev


def _cohere_usage(c: _Ctx) -> dict[str, Any]:
    out = _tokens(c.text + c.args)
    return {"billed_units": {"input_tokens": c.in_tokens, "output_tokens": out},
            "tokens": {"input_tokens": c.in_tokens, "output_tokens": out}}


def cohere_response(c: _Ctx) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": [{"type": "text", "text": c.text}]}
    if c.tools:
        message["tool_calls"] = [{"id": c.id("call_fake"), "type": "function",
                                  "function": {"name": tool_name(c.req), "arguments": c.args}}]
    return {"id": c.id("co_fake"), "finish_reason": "TOOL_CALL" if c.tools else "COMPLETE",
            "message": message, "usage": _cohere_usage(c)}


def cohere_events(c: _Ctx) -> list[SSE]:
    full = cohere_response(c)

    def ev(data: dict[str, Any]) -> SSE:
        return (data["type"], data)

    out = [ev({"id": full["id"], "type": "message-start", "delta": {"message": {
        "role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}}})]
    out.append(ev({"type": "content-start", "index": 0,
                   "delta": {"message": {"content": {"type": "text", "text": ""}}}}))
    out += [ev({"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": p}}}})
            for p in split_text(c.text, c.delta_chars)]
    out.append(ev({"type": "content-end", "index": 0}))
    if c.tools:
        call = full["message"]["tool_calls"][0]
        out.append(ev({"type": "tool-call-start", "index": 0, "delta": {"message": {"tool_calls": {
            "id": call["id"], "type": "function", "function": {"name": call["function"]["name"],
                                                               "arguments": ""}}}}}))
        out += [ev({"type": "tool-call-delta", "index": 0,
                    "delta": {"message": {"tool_calls": {"function": {"arguments": p}}}}})
                for p in split_text(c.args, c.delta_chars)]
        out.append(ev({"type": "tool-call-end", "index": 0}))
    out.append(ev({"type": "message-end", "delta": {"finish_reason": full["finish_reason"],
                                                    "usage": full["usage"]}}))
    return out


def ollama_response(c: _Ctx) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    if c.tools:  # Ollama's tool call arguments are an object, not a JSON text
        call = {"name": tool_name(c.req), "arguments": expected_tool_input(c.req)}
        message["tool_calls"] = [{"function": call}]
    return {"model": c.model, "created_at": "2026-11-26T10:00:00.000000Z", "message": message, "done": True,
            "done_reason": "stop", "total_duration": 1000, "prompt_eval_count": c.in_tokens,
            "eval_count": _tokens(c.text + c.args)}


def ollama_events(c: _Ctx) -> list[SSE]:
    """NDJSON lines: the text in pieces, the tool call whole, then a last line with ``"done": true``."""
    base = {"model": c.model, "created_at": "2026-11-26T10:00:00.000000Z"}
    out: list[SSE] = [(None, {**base, "message": {"role": "assistant", "content": p}, "done": False})
                      for p in split_text(c.text, c.delta_chars)]
    full = ollama_response(c)
    if c.tools:
        out.append((None, {**base, "message": {"role": "assistant", "content": "",
                                                "tool_calls": full["message"]["tool_calls"]}, "done": False}))
    last = {k: v for k, v in full.items() if k != "message"}
    out.append((None, {**last, "message": {"role": "assistant", "content": ""}}))
    return out


def stream_error_event(api: str, message: str, seq: int) -> SSE:
    if api == ANTHROPIC:
        return ("error", {"type": "error", "error": {"type": "overloaded_error", "message": message}})
    if api == OPENAI_CHAT:
        return (None, openai_error(500, message))
    if api == GEMINI:
        return (None, gemini_error(500, message))
    if api == OLLAMA:
        return (None, {"error": message})
    if api == COHERE:
        return ("error", {"type": "error", "message": message})
    return ("error", {"type": "error", "code": "server_error", "message": message, "param": None,
                      "sequence_number": seq})


def request_for(api: str, text: str, *, system: str = "", tools: bool = False,
                stream: bool = False) -> dict[str, Any]:
    """A minimal request body of ``api`` whose echo reply is ``system + "\\n" + text``."""
    req: dict[str, Any]
    if api == ANTHROPIC:
        req = {"model": "claude-test", "max_tokens": 500, "system": system,
               "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
        if tools:
            req["tools"] = [{"name": "lookup", "description": "d", "input_schema": {"type": "object"}}]
    elif api in (OPENAI_CHAT, COHERE, OLLAMA):  # Cohere v2 and Ollama chat take the same messages and tools
        req = {"model": {OPENAI_CHAT: "gpt-test", COHERE: "command-test", OLLAMA: "llama-test"}[api],
               "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}]}
        if tools:
            req["tools"] = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    elif api == RESPONSES:
        req = {"model": "gpt-test", "instructions": system,
               "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}]}
        if tools:
            req["tools"] = [{"type": "function", "name": "lookup", "parameters": {}}]
    elif api == GEMINI:  # streaming is the route's business (gemini_path), not the body's
        req = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
        if system:
            req["systemInstruction"] = {"parts": [{"text": system}]}
        if tools:
            req["tools"] = [{"functionDeclarations": [{"name": "lookup", "description": "d"}]}]
        return req
    else:
        raise ValueError(f"unknown api {api!r}")
    if stream or api == OLLAMA:  # Ollama streams unless told not to
        req["stream"] = stream
    return req


def build_reply(api: str, req: dict[str, Any], n: int = 0, delta_chars: int = 16) -> dict[str, Any]:
    """Non-streamed reply object the fake sends for ``req``."""
    c = _Ctx(req, n, delta_chars)
    return {ANTHROPIC: anthropic_message, OPENAI_CHAT: chat_completion, RESPONSES: responses_object,
            GEMINI: gemini_response, COHERE: cohere_response, OLLAMA: ollama_response}[api](c)


def build_events(api: str, req: dict[str, Any], n: int = 0, delta_chars: int = 16) -> list[SSE]:
    """SSE events (event name, data) the fake streams for ``req``."""
    c = _Ctx(req, n, delta_chars)
    return {ANTHROPIC: anthropic_events, OPENAI_CHAT: chat_events, RESPONSES: responses_events,
            GEMINI: gemini_events, COHERE: cohere_events, OLLAMA: ollama_events}[api](c)


def encode_sse(event: str | None, data: Any) -> bytes:
    payload = data if isinstance(data, str) else _dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


# --------------------------------------------------------------------------------------
# Client-side helpers: SSE parsing and reassembly
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SSEEvent:
    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class SSEParser:
    """Incremental SSE parser: ``feed(bytes)`` returns the events completed so far.

    Lines end in LF or CRLF (a lone CR is not supported); bytes are decoded per line so
    multi-byte UTF-8 characters may be split across feeds.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        out: list[SSEEvent] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            raw, self._buf = self._buf[:nl], self._buf[nl + 1 :]
            line = raw.removesuffix(b"\r").decode("utf-8")
            if line == "":
                if self._data or self._event is not None:
                    out.append(SSEEvent(self._event, "\n".join(self._data)))
                self._event, self._data = None, []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                self._event = value
            elif field == "data":
                self._data.append(value)
        return out

    @property
    def pending(self) -> bool:
        """True if bytes of an unfinished event are buffered."""
        return bool(self._buf) or bool(self._data) or self._event is not None


def parse_sse(raw: bytes | str, *, strict: bool = True) -> list[SSEEvent]:
    """Parse a whole SSE body; with ``strict`` a trailing unterminated event is an error."""
    p = SSEParser()
    events = p.feed(raw.encode() if isinstance(raw, str) else raw)
    if strict and p.pending:
        raise ValueError(f"SSE stream ends inside an event: {p._buf[:200]!r}")
    return events


@dataclasses.dataclass
class ReplyParts:
    text: str
    tool_arguments: str | None = None  # serialized JSON string as reassembled
    tool_name: str | None = None
    complete: bool = True  # stream reached its terminal event
    error: Any = None  # in-stream error payload, if any
    event_types: list[str] = dataclasses.field(default_factory=list)

    @property
    def tool_input(self) -> Any:
        return None if self.tool_arguments is None else json.loads(self.tool_arguments)


def reply_parts(api: str, obj: dict[str, Any]) -> ReplyParts:
    """Text and tool call of a non-streamed reply object."""
    if api == ANTHROPIC:
        text = "".join(b["text"] for b in obj["content"] if b["type"] == "text")
        tools = [b for b in obj["content"] if b["type"] == "tool_use"]
        if tools:
            return ReplyParts(text, json.dumps(tools[0]["input"], ensure_ascii=False), tools[0]["name"])
        return ReplyParts(text)
    if api == OPENAI_CHAT:
        msg = obj["choices"][0]["message"]
        calls = msg.get("tool_calls") or []
        if calls:
            return ReplyParts(msg.get("content") or "", calls[0]["function"]["arguments"],
                              calls[0]["function"]["name"])
        return ReplyParts(msg.get("content") or "")
    if api == COHERE:
        msg = obj["message"]
        text = "".join(b["text"] for b in msg["content"] if b["type"] == "text")
        calls = msg.get("tool_calls") or []
        if calls:
            return ReplyParts(text, calls[0]["function"]["arguments"], calls[0]["function"]["name"])
        return ReplyParts(text)
    if api == OLLAMA:
        msg = obj["message"]
        calls = msg.get("tool_calls") or []
        if calls:
            call = calls[0]["function"]
            return ReplyParts(msg["content"], json.dumps(call["arguments"], ensure_ascii=False), call["name"])
        return ReplyParts(msg["content"])
    if api == GEMINI:
        parts = obj["candidates"][0]["content"]["parts"]
        text = "".join(p["text"] for p in parts if "text" in p and not p.get("thought"))
        calls = [p["functionCall"] for p in parts if "functionCall" in p]
        if calls:
            return ReplyParts(text, json.dumps(calls[0]["args"], ensure_ascii=False), calls[0]["name"])
        return ReplyParts(text)
    text = "".join(p["text"] for item in obj["output"] if item["type"] == "message"
                   for p in item["content"] if p["type"] == "output_text")
    calls = [item for item in obj["output"] if item["type"] == "function_call"]
    if calls:
        return ReplyParts(text, calls[0]["arguments"], calls[0]["name"])
    return ReplyParts(text)


def reassemble_ndjson(raw: bytes) -> ReplyParts:
    """Text and tool call of an Ollama NDJSON stream (every line a JSON object, the last one ``done``)."""
    lines = raw.split(b"\n")
    assert lines[-1] == b"", "an NDJSON stream ends with a newline"
    objs = [json.loads(line) for line in lines[:-1]]
    assert objs and objs[-1].get("done") is True and not any(o.get("done") for o in objs[:-1]), objs[-2:]
    text = "".join(o["message"]["content"] for o in objs)
    calls = [c for o in objs for c in o["message"].get("tool_calls") or []]
    if calls:
        return ReplyParts(text, json.dumps(calls[0]["function"]["arguments"], ensure_ascii=False),
                          calls[0]["function"]["name"])
    return ReplyParts(text)


def reassemble_stream(api: str, events: Iterable[SSEEvent], *, check: bool = True) -> ReplyParts:
    """Concatenate the deltas of a streamed reply.

    With ``check`` it asserts the stream is self-consistent: ``event:`` names match the
    data ``type``, Responses ``*.done`` / ``response.completed`` texts equal the deltas, and
    Anthropic/Responses start with their start event.
    """
    text: list[str] = []
    args: list[str] | None = None
    name = None
    complete = False
    error = None
    types: list[str] = []
    for i, ev in enumerate(events):
        if api == GEMINI:
            d = ev.json()
            if "error" in d:
                error = d["error"]
                types.append("error")
                continue
            types.append("chunk")
            for cand in d.get("candidates", []):
                for part in (cand.get("content") or {}).get("parts", []):
                    if "text" in part and not part.get("thought"):
                        text.append(part["text"])
                    elif "functionCall" in part:
                        name = part["functionCall"]["name"]
                        args = [json.dumps(part["functionCall"]["args"], ensure_ascii=False)]
                if cand.get("finishReason"):
                    complete = True
            continue
        if api == COHERE:
            d = ev.json()
            kind = d["type"]
            types.append(kind)
            if check:
                assert ev.event == kind, f"event name {ev.event!r} != data type {kind!r}"
            msg = (d.get("delta") or {}).get("message") or {}
            if kind == "content-delta":
                text.append(msg["content"]["text"])
            elif kind == "tool-call-start":
                name = msg["tool_calls"]["function"]["name"]
                args = []
            elif kind == "tool-call-delta":
                args = (args or []) + [msg["tool_calls"]["function"]["arguments"]]
            elif kind == "message-end":
                complete = True
            elif kind == "error":
                error = d
            continue
        if api == OPENAI_CHAT:
            if ev.data == "[DONE]":
                types.append("[DONE]")
                complete = True
                continue
            d = ev.json()
            if "error" in d:
                error = d["error"]
                types.append("error")
                continue
            types.append(d["object"])
            for choice in d["choices"]:
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    text.append(delta["content"])
                for call in delta.get("tool_calls") or []:
                    fn = call.get("function") or {}
                    if fn.get("name"):
                        name = fn["name"]
                    if "arguments" in fn:
                        args = (args or []) + [fn["arguments"]]
            continue
        d = ev.json()
        kind = d.get("type")
        types.append(kind)
        if check:
            assert ev.event == kind, f"event name {ev.event!r} != data type {kind!r}"
            if i == 0:
                assert kind in ("message_start", "response.created"), f"first event is {kind!r}"
        if kind == "error":
            error = d.get("error", d)
        elif api == ANTHROPIC:
            if kind == "content_block_start" and d["content_block"]["type"] == "tool_use":
                name = d["content_block"]["name"]
                args = args or []
            elif kind == "content_block_delta":
                delta = d["delta"]
                if delta["type"] == "text_delta":
                    text.append(delta["text"])
                elif delta["type"] == "input_json_delta":
                    args = (args or []) + [delta["partial_json"]]
            elif kind == "message_stop":
                complete = True
        else:
            if kind == "response.output_text.delta":
                text.append(d["delta"])
            elif kind == "response.output_text.done" and check:
                assert d["text"] == "".join(text), "output_text.done text differs from the deltas"
            elif kind == "response.output_item.added" and d["item"]["type"] == "function_call":
                name = d["item"]["name"]
                args = []
            elif kind == "response.function_call_arguments.delta":
                args = (args or []) + [d["delta"]]
            elif kind == "response.function_call_arguments.done" and check:
                assert d["arguments"] == "".join(args or []), "arguments.done differs from the deltas"
            elif kind == "response.completed":
                complete = True
                if check:
                    final = reply_parts(RESPONSES, d["response"])
                    assert final.text == "".join(text), "response.completed text differs from the deltas"
    return ReplyParts("".join(text), None if args is None else "".join(args), name, complete, error, types)


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------


class _Reset(Exception):
    pass


class FakeUpstream:
    """Fake LLM API server in a background thread.  Use as a context manager or start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 ssl_context: ssl.SSLContext | None = None, **knobs: Any):
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._default_knobs = Knobs(**knobs)
        self.knobs = dataclasses.replace(self._default_knobs)
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._counter = 0
        self.errors: list[BaseException] = []  # unexpected handler exceptions
        self.connections = 0  # accepted TCP connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- lifecycle -----------------------------------------------------------------
    def start(self) -> FakeUpstream:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._handle, self.host, self.port, ssl=self.ssl_context, limit=1 << 20))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-upstream-{id(self):x}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        self._loop = self._thread = self._server = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- inspection ------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"

    @property
    def host_port(self) -> str:
        """``127.0.0.1:<port>`` — the form for ``masker_hosts``."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def url_for(self, path: str) -> str:
        return self.url + path

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            if not self._requests:
                raise AssertionError("fake upstream received no request")
            return self._requests[-1]

    def clear(self) -> None:
        """Forget recorded requests and errors, reset knobs to the constructor defaults."""
        with self._lock:
            self._requests.clear()
            self.errors.clear()
        self.knobs = dataclasses.replace(self._default_knobs)

    def set_knobs(self, **knobs: Any) -> None:
        """Change default knobs (request headers ``x-fake-*`` still override them)."""
        for k, v in knobs.items():
            if not hasattr(self.knobs, k):
                raise TypeError(f"unknown knob {k!r}")
            setattr(self.knobs, k, v)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        deadline = time.monotonic() + timeout
        while True:
            reqs = self.requests
            if len(reqs) >= n:
                return reqs
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected {n} requests, got {len(reqs)}")
            time.sleep(0.01)

    # ---- HTTP ------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        try:
            while True:
                req = await self._read_request(reader, peer)
                if req is None:
                    break
                with self._lock:
                    self._requests.append(req)
                keep = await self._respond(req, writer)
                if not keep:
                    break
        except _Reset:
            return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        except Exception as e:
            self.errors.append(e)
            with contextlib.suppress(Exception):
                body = _dumps(anthropic_error(500, f"fake upstream crashed: {e!r}")).encode()
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                             + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
                await writer.drain()
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader, peer: Any) -> RecordedRequest | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                raise
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
        lower = {k.lower(): v for k, v in headers}
        chunked = "chunked" in lower.get("transfer-encoding", "").lower()
        if chunked:
            parts = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        elif "content-length" in lower:
            body = await reader.readexactly(int(lower["content-length"]))
        else:
            body = b""
        path = target
        if "://" in target:  # absolute-form
            rest = target.split("://", 1)[1]
            path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        with self._lock:
            n = self._counter
            self._counter += 1
        return RecordedRequest(n, method, target, path, version, headers, body, chunked,
                               tuple(peer[:2]) if peer else None, time.time())

    async def _respond(self, req: RecordedRequest, writer: asyncio.StreamWriter) -> bool:
        knobs = self.knobs.with_headers(req)
        close = (req.header("connection") or "").lower() == "close" or req.http_version == "HTTP/1.0"
        api = api_for_path(req.route) if req.method == "POST" else None
        if api is None:
            ctype = req.header("content-type") or "application/octet-stream"
            headers = [("content-type", ctype)]
            body = req.body
            if knobs.encoding:
                body = encode_body(decode_body(body, req.header("content-encoding")), knobs.encoding)
            elif req.header("content-encoding"):
                headers.append(("content-encoding", req.header("content-encoding") or ""))
            return await self._send_body(writer, knobs.status or 200, headers, body, knobs, close)
        try:
            payload = req.json()
            if not isinstance(payload, dict):
                raise ValueError("request body is not a JSON object")
        except ValueError as e:
            err = error_body(api, 400, f"invalid JSON body: {e}")
            return await self._send_json(writer, 400, err, knobs, close, api)
        if knobs.status and knobs.status >= 300:
            err = error_body(api, knobs.status, expected_error_message(payload))
            return await self._send_json(writer, knobs.status, err, knobs, close, api)
        if is_stream_request(api, req.route, payload):
            events = build_events(api, payload, req.index, knobs.delta_chars)
            if api == GEMINI and "alt=sse" not in req.path:  # Gemini's other stream: one JSON array
                return await self._send_json_array(writer, api, events, knobs, close)
            if api == OLLAMA:
                return await self._send_ndjson(writer, api, payload, events, knobs, close)
            return await self._send_sse(writer, api, payload, events, knobs, close)
        reply = build_reply(api, payload, req.index, knobs.delta_chars)
        return await self._send_json(writer, knobs.status or 200, reply, knobs, close, api)

    @staticmethod
    def _status_line(status: int) -> bytes:
        from http import HTTPStatus

        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        return f"HTTP/1.1 {status} {reason}\r\n".encode()

    def _head(self, status: int, headers: list[tuple[str, str]], close: bool, api: str | None) -> bytes:
        hs = [*headers, ("date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
              ("server", "fake-upstream")]
        if api == ANTHROPIC:
            hs.append(("request-id", f"req_fake{self._counter:016d}"))
        elif api is not None:
            hs.append(("x-request-id", f"req_fake{self._counter:016d}"))
        if close:
            hs.append(("connection", "close"))
        return self._status_line(status) + "".join(f"{k}: {v}\r\n" for k, v in hs).encode() + b"\r\n"

    async def _send_json(self, writer: asyncio.StreamWriter, status: int, obj: Any, knobs: Knobs,
                         close: bool, api: str | None) -> bool:
        return await self._send_body(writer, status, [("content-type", "application/json")],
                                     _dumps(obj).encode(), knobs, close, api, encode=True)

    async def _send_body(self, writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]],
                         body: bytes, knobs: Knobs, close: bool, api: str | None = None,
                         encode: bool = False) -> bool:
        headers = list(headers)
        if encode and knobs.encoding:
            body = encode_body(body, knobs.encoding)
        if knobs.encoding:
            headers.append(("content-encoding", knobs.encoding))
        if knobs.chunk_bytes and api is None:
            # echo path with chunk_bytes: stream the body as chunked transfer encoding
            headers.append(("transfer-encoding", "chunked"))
            writer.write(self._head(status, headers, close, api))
            pieces = [body[i : i + knobs.chunk_bytes] for i in range(0, len(body), knobs.chunk_bytes)]
            return await self._write_chunks(writer, pieces, knobs, close, reset=False)
        headers.append(("content-length", str(len(body))))
        writer.write(self._head(status, headers, close, api))
        reset = knobs.reset_after is not None
        if reset:
            body = body[: knobs.reset_after]
        step = knobs.chunk_bytes or len(body) or 1
        for i in range(0, len(body), step):
            if i and knobs.pause_ms:
                await writer.drain()
                await asyncio.sleep(knobs.pause_ms / 1000)
            writer.write(body[i : i + step])
        await writer.drain()
        if reset:
            await self._reset(writer)
        return not close

    async def _send_sse(self, writer: asyncio.StreamWriter, api: str, payload: dict[str, Any],
                        events: list[SSE], knobs: Knobs, close: bool) -> bool:
        reset = False
        if knobs.error_after is not None:
            events = events[: knobs.error_after]
            events.append(stream_error_event(api, expected_error_message(payload), len(events)))
        if knobs.reset_after is not None:
            events = events[: knobs.reset_after]
            reset = True
        enc = _Encoder(knobs.encoding)
        pieces = [enc.chunk(encode_sse(name, data)) for name, data in events]
        if not reset:
            pieces.append(enc.finish())
        if knobs.chunk_bytes:
            blob = b"".join(pieces)
            pieces = [blob[i : i + knobs.chunk_bytes] for i in range(0, len(blob), knobs.chunk_bytes)]
        headers = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"),
                   ("transfer-encoding", "chunked")]
        if knobs.encoding:
            headers.append(("content-encoding", knobs.encoding))
        writer.write(self._head(200, headers, close, api))
        return await self._write_chunks(writer, pieces, knobs, close, reset)

    async def _send_json_array(self, writer: asyncio.StreamWriter, api: str, events: list[SSE], knobs: Knobs,
                               close: bool) -> bool:
        """``streamGenerateContent`` without ``alt=sse``: the chunks as one JSON array, an element per write
        (``[{…}\\n,\\r\\n{…}\\n]``, as Google sends it)."""
        datas = [data if isinstance(data, str) else _dumps(data) for _, data in events]
        pieces = [("[" if k == 0 else "\n,\r\n").encode() + d.encode() for k, d in enumerate(datas)]
        pieces.append(b"\n]")
        if knobs.chunk_bytes:
            blob = b"".join(pieces)
            pieces = [blob[i : i + knobs.chunk_bytes] for i in range(0, len(blob), knobs.chunk_bytes)]
        headers = [("content-type", "application/json; charset=UTF-8"), ("transfer-encoding", "chunked")]
        writer.write(self._head(200, headers, close, api))
        return await self._write_chunks(writer, pieces, knobs, close, reset=False)

    async def _send_ndjson(self, writer: asyncio.StreamWriter, api: str, payload: dict[str, Any],
                           events: list[SSE], knobs: Knobs, close: bool) -> bool:
        """Ollama's stream: one JSON object a line (``application/x-ndjson``), a line per write."""
        if knobs.error_after is not None:
            error = stream_error_event(api, expected_error_message(payload), 0)
            events = [*events[: knobs.error_after], error]
        enc = _Encoder(knobs.encoding)
        pieces = [enc.chunk((data if isinstance(data, str) else _dumps(data)).encode() + b"\n")
                  for _, data in events]
        pieces.append(enc.finish())
        if knobs.chunk_bytes:
            blob = b"".join(pieces)
            pieces = [blob[i : i + knobs.chunk_bytes] for i in range(0, len(blob), knobs.chunk_bytes)]
        headers = [("content-type", "application/x-ndjson"), ("transfer-encoding", "chunked")]
        if knobs.encoding:
            headers.append(("content-encoding", knobs.encoding))
        writer.write(self._head(200, headers, close, api))
        return await self._write_chunks(writer, pieces, knobs, close, reset=False)

    async def _write_chunks(self, writer: asyncio.StreamWriter, pieces: list[bytes], knobs: Knobs,
                            close: bool, reset: bool) -> bool:
        await writer.drain()
        first = True
        for piece in pieces:
            if not piece:
                continue  # a zero-size chunk would end the body
            if not first and knobs.pause_ms:
                await asyncio.sleep(knobs.pause_ms / 1000)
            first = False
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
        if reset:
            await self._reset(writer)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return not close

    @staticmethod
    async def _reset(writer: asyncio.StreamWriter) -> None:
        await writer.drain()
        await asyncio.sleep(0.05)  # let the peer read what was sent before the RST
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        raise _Reset


__all__ = [
    "ANTHROPIC", "COHERE", "GEMINI", "OLLAMA", "OPENAI_CHAT", "RESPONSES", "ROUTES", "FakeUpstream", "Knobs",
    "RecordedRequest", "ReplyParts", "SSEEvent", "SSEParser", "api_for_path", "build_events", "build_reply",
    "decode_body", "encode_body", "encode_sse", "expected_error_message", "expected_reply_text",
    "expected_tool_arguments", "expected_tool_input", "gemini_path", "is_stream_request", "parse_sse",
    "reassemble_ndjson", "reassemble_stream", "reply_parts", "request_texts", "split_text",
]
