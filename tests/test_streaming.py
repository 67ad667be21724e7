"""Streaming restore (addon/aws_masker/streaming.py) against recorded-style streams of the real wire formats.

Streams are generated from a masked model text / tool input (placeholders) and the same content with the
originals, so every check compares what a client reassembles from the restored stream with the ORIGINAL.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import re
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from aws_masker.placeholders import format_placeholder, restore_bytes
from aws_masker.streaming import StreamRestorer

DATA = Path(__file__).parent / "data" / "streams"

# ----------------------------------------------------------------------------------------- the mapping

ORIGINALS: list[tuple[str, str]] = [
    ("ACCOUNT", "123456789012"),
    ("ACCOUNT", "210987654321"),
    ("IAM_ROLE_ARN", "arn:aws:iam::123456789012:role/Admin-Role"),
    ("S3_ARN", "arn:aws:s3:::données-de-prod-桶"),  # non-ASCII
    ("EC2_INSTANCE", "i-0abcdef1234567890"),
    ("EC2_INSTANCE", "i-0fedcba9876543210"),
    ("ACCESS_KEY", "AKIAIOSFODNN7EXAMPLE"),
    ("SECRET_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("SECRET", 'pa"ss\\word\twith "quotes"'),  # needs JSON escaping
    ("KMS_KEY_ARN", "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"),
]


def build_mapping() -> tuple[dict[bytes, bytes], dict[str, str]]:
    """placeholder -> original (bytes, as the glue passes it) and name -> placeholder for templates."""
    counters: dict[str, int] = {}
    mapping: dict[bytes, bytes] = {}
    names: dict[str, str] = {}
    for i, (kind, orig) in enumerate(ORIGINALS):
        counters[kind] = counters.get(kind, 0) + 1
        ph = format_placeholder(kind, counters[kind])
        mapping[ph] = orig.encode()
        names[f"o{i}"] = ph.decode()
    # Greedy traps: _1000 and _10000 both exist; _0100 too.
    for n, orig in ((100, "100100100100"), (1000, "100010001000"), (10000, "999900009999")):
        ph = format_placeholder("ACCOUNT", n)
        mapping[ph] = orig.encode()
        names[f"acct{n}"] = ph.decode()
    # Filler so the mapping is big, as in a real session.
    for n in range(1, 1501):
        mapping[format_placeholder("LOG_GROUP", n)] = f"/aws/lambda/function-{n}".encode()
    return mapping, names


MAPPING, NAMES = build_mapping()
ORIG_OF = {ph.decode(): orig.decode() for ph, orig in MAPPING.items()}
LONGEST = max(map(len, MAPPING))

TEXT_TEMPLATE = (
    "Account {o0} (and {o1}) owns role {o2}; the bucket {o3} is encrypted with {o9}.\n"
    "Instances: {o4},{o5}; back to back: {o0}{o1}. Keys: {o6} / {o7}.\n"
    'The secret is "{o8}". Accounts {acct100}, {acct1000} and {acct10000} differ.\n'
    "Unknown tokens stay: AWS_ACCOUNT_9999, AWS_ACCOUNT_10001, AWS_, AWS_ACCOUNT_, AWS_EC2_INSTANCE_00.\n"
    "Glued before a placeholder: AWS_{o4}, MY_AWS_X_{o5}, AWS_AW{o0} and AWS_AWS_{o0}.\n"
    "Almost-placeholders: AWS_ACCOUNT_000 then A, AW, AWS and a trailing {o4}"
)
THINKING_TEMPLATE = "The user asks about {o0}; I should describe {o4} in {o2}. Also {acct1000}."


def fill(template: str, original: bool) -> str:
    return template.format(**{k: (ORIG_OF[v] if original else v) for k, v in NAMES.items()})


def tool_input(original: bool) -> dict[str, Any]:
    f = (lambda n: ORIG_OF[NAMES[n]]) if original else (lambda n: NAMES[n])
    return {
        "account_id": f("o0"),
        "role_arn": f("o2"),
        "instance_ids": [f("o4"), f("o5")],
        "filters": {"secret": f("o8"), "bucket": f("o3"), "note": "AWS_ACCOUNT_9999 unchanged"},
        "region": "eu-west-1",
    }


MASKED_TEXT, ORIG_TEXT = fill(TEXT_TEMPLATE, False), fill(TEXT_TEMPLATE, True)
MASKED_THINK, ORIG_THINK = fill(THINKING_TEMPLATE, False), fill(THINKING_TEMPLATE, True)
MASKED_TOOL = json.dumps(tool_input(False), ensure_ascii=False)
ORIG_TOOL = json.dumps(tool_input(True), ensure_ascii=False)


class Content(NamedTuple):
    """What the model streams (masked) and what the client must reassemble (original)."""

    text: str
    orig_text: str
    think: str
    orig_think: str
    tool: str
    orig_tool: str


FULL = Content(MASKED_TEXT, ORIG_TEXT, MASKED_THINK, ORIG_THINK, MASKED_TOOL, ORIG_TOOL)
# Smaller streams for the every-byte-offset cuts.
_SHORT_TEXT = 'Role {o2} of {o0}{o1}; secret "{o8}", bucket {o3}, {acct1000}/{acct10000}, AWS_ACCOUNT_10001.'
_SHORT_TOOL = {"account_id": "o0", "secret": "o8", "bucket": "o3"}
SHORT = Content(
    fill(_SHORT_TEXT, False),
    fill(_SHORT_TEXT, True),
    "See {o4}".format(o4=NAMES["o4"]),
    "See " + ORIG_OF[NAMES["o4"]],
    json.dumps({k: NAMES[v] for k, v in _SHORT_TOOL.items()}, ensure_ascii=False),
    json.dumps({k: ORIG_OF[NAMES[v]] for k, v in _SHORT_TOOL.items()}, ensure_ascii=False),
)


def test_fixture_sanity() -> None:
    assert MASKED_TEXT != ORIG_TEXT and ORIG_TEXT.count("AWS_") == 6 + 5  # unknown / partial / glued
    # restore_bytes of the whole text is the reference the streamed result has to match
    assert restore_bytes(MASKED_TEXT.encode(), MAPPING)[0].decode() == ORIG_TEXT
    assert json.loads(ORIG_TOOL) == tool_input(True)


# ----------------------------------------------------------------------------------- stream generators


def pieces(text: str, size: int | list[int]) -> list[str]:
    """``text`` cut into deltas of ``size`` characters (a list cycles through sizes)."""
    sizes = itertools.cycle(size if isinstance(size, list) else [size])
    out, i = [], 0
    while i < len(text):
        n = next(sizes)
        out.append(text[i : i + n])
        i += n
    return out


def sse(event: str | None, data: Any, term: str = "\n") -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}{term}" if event else ""
    return f"{head}data: {payload}{term}{term}"


def anthropic_stream(
    size: int | list[int] = 5, term: str = "\n", comments: bool = False, c: Content = FULL
) -> bytes:
    ev: list[str] = []

    def add(name: str, data: Any) -> None:
        ev.append(sse(name, data, term))
        if comments:
            ev.append(f": keep-alive{term}{term}")

    add(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "claude-sonnet-4-5-20250929",
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 472, "output_tokens": 2},
            },
        },
    )
    add(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""},
        },
    )
    ev.append(sse("ping", '{"type": "ping"}', term))
    for p in pieces(c.think, size):
        add(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": p}},
        )
    add(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {
                "type": "signature_delta",
                "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxAWS_ACCOUNT_0001mZt9==",
            },
        },
    )
    add("content_block_stop", {"type": "content_block_stop", "index": 0})
    add(
        "content_block_start",
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    )
    for p in pieces(c.text, size):
        add(
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": p}},
        )
    add("content_block_stop", {"type": "content_block_stop", "index": 1})
    add(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {
                "type": "tool_use",
                "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                "name": "describe_instances",
                "input": {},
            },
        },
    )
    add(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": ""},
        },
    )
    for p in pieces(c.tool, size):
        add(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": p},
            },
        )
    add("content_block_stop", {"type": "content_block_stop", "index": 2})
    add(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 89},
        },
    )
    add("message_stop", {"type": "message_stop"})
    return "".join(ev).encode()


def chat_stream(size: int | list[int] = 5, two_choices: bool = False, c: Content = FULL) -> bytes:
    base = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "service_tier": "default",
        "system_fingerprint": "fp_eb9dce56a8",
    }

    def chunk(ci: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": ci, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse(None, {**base, "choices": [choice], "usage": None, **extra})

    ev: list[str] = []
    cis = [0, 1] if two_choices else [0]
    for ci in cis:
        ev.append(chunk(ci, {"role": "assistant", "content": "", "refusal": None}))
    parts = pieces(c.text, size)
    for p in parts:
        for ci in cis:  # choices interleaved
            ev.append(chunk(ci, {"content": p}))
    ev.append(
        chunk(
            0,
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                        "type": "function",
                        "function": {"name": "describe_instances", "arguments": ""},
                    }
                ]
            },
        )
    )
    for p in pieces(c.tool, size):
        ev.append(chunk(0, {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}))
    ev.append(chunk(0, {}, "tool_calls"))
    if two_choices:
        ev.append(chunk(1, {}, "stop"))
    ev.append(
        sse(
            None,
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99},
            },
        )
    )
    ev.append(sse(None, "[DONE]"))
    return "".join(ev).encode()


def responses_stream(size: int | list[int] = 5, c: Content = FULL, term: str = "\n") -> bytes:
    seq = itertools.count()
    ev: list[str] = []

    def add(data: dict[str, Any]) -> None:
        ev.append(
            sse(
                data["type"],
                {
                    "type": data["type"],
                    "sequence_number": next(seq),
                    **{k: v for k, v in data.items() if k != "type"},
                },
                term,
            )
        )

    resp = {
        "id": "resp_67c9fdcecf488190bdd9a0409de3a1ec",
        "object": "response",
        "created_at": 1741290958,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": "You are an AWS assistant. Default account: " + NAMES["o0"],
        "max_output_tokens": None,
        "model": "gpt-4.1-2025-04-14",
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": {},
    }
    add({"type": "response.created", "response": resp})
    add({"type": "response.in_progress", "response": resp})
    msg_id, fc_id = "msg_67c9fdcf37fc8190ba82116e33fb28c5", "fc_67c9fdd0a3e88190b7a5e8a8a3c5e4f1"
    add(
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {
                "id": msg_id,
                "type": "message",
                "status": "in_progress",
                "content": [],
                "role": "assistant",
            },
        }
    )
    add(
        {
            "type": "response.content_part.added",
            "item_id": msg_id,
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
        }
    )
    for p in pieces(c.text, size):
        add(
            {
                "type": "response.output_text.delta",
                "item_id": msg_id,
                "output_index": 0,
                "content_index": 0,
                "delta": p,
                "logprobs": [],
                "obfuscation": "Zx9",
            }
        )
    add(
        {
            "type": "response.output_text.done",
            "item_id": msg_id,
            "output_index": 0,
            "content_index": 0,
            "text": c.text,
            "logprobs": [],
        }
    )
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": c.text}
    add(
        {
            "type": "response.content_part.done",
            "item_id": msg_id,
            "output_index": 0,
            "content_index": 0,
            "part": part,
        }
    )
    msg = {"id": msg_id, "type": "message", "status": "completed", "content": [part], "role": "assistant"}
    add({"type": "response.output_item.done", "output_index": 0, "item": msg})
    fc = {
        "id": fc_id,
        "type": "function_call",
        "status": "in_progress",
        "arguments": "",
        "call_id": "call_XBpCkbRDRz3i8xJsSfDB3mOX",
        "name": "describe_instances",
    }
    add({"type": "response.output_item.added", "output_index": 1, "item": fc})
    for p in pieces(c.tool, size):
        add(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": fc_id,
                "output_index": 1,
                "delta": p,
                "obfuscation": "q1",
            }
        )
    add(
        {
            "type": "response.function_call_arguments.done",
            "item_id": fc_id,
            "output_index": 1,
            "arguments": c.tool,
        }
    )
    fc_done = {**fc, "status": "completed", "arguments": c.tool}
    add({"type": "response.output_item.done", "output_index": 1, "item": fc_done})
    add(
        {
            "type": "response.completed",
            "response": {
                **resp,
                "status": "completed",
                "output": [msg, fc_done],
                "usage": {
                    "input_tokens": 36,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 87,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 123,
                },
            },
        }
    )
    return "".join(ev).encode()


def gemini_stream(size: int | list[int] = 5, c: Content = FULL) -> bytes:
    """Gemini ``streamGenerateContent?alt=sse``: thought chunks, text chunks, then the function call (sent
    whole, as an object) with finishReason; CRLF line ends as Google sends them."""
    base = {"modelVersion": "gemini-2.5-flash", "responseId": "mKzEaJ3lA8uPxN8P2vSbmQo"}
    usage = {"promptTokenCount": 41, "candidatesTokenCount": 5, "totalTokenCount": 46}

    def chunk(parts: list[dict[str, Any]], finish: str | None = None) -> str:
        cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        return sse(None, {"candidates": [cand], "usageMetadata": usage, **base}).replace("\n", "\r\n")

    ev = [chunk([{"text": p, "thought": True}]) for p in pieces(c.think, size)]
    ev += [chunk([{"text": p}]) for p in pieces(c.text, size)]
    call = {"functionCall": {"name": "describe_instances", "args": json.loads(c.tool)},
            "thoughtSignature": "CiQBAWS_ACCOUNT_0001VKc0x=="}
    ev.append(chunk([call], "STOP"))
    return "".join(ev).encode()


def check_gemini(out: bytes, src: bytes, c: Content = FULL) -> None:
    events = valid_events(out)
    think = text = ""
    call: dict[str, Any] = {}
    finishes = 0
    for _, data in events:
        d = json.loads(data)
        assert d["modelVersion"] == "gemini-2.5-flash" and "usageMetadata" in d
        for cand in d["candidates"]:
            for part in cand["content"]["parts"]:
                if "text" in part:
                    if part.get("thought"):
                        think += part["text"]
                    else:
                        text += part["text"]
                else:
                    call = part
            finishes += "finishReason" in cand
    assert think == c.orig_think
    assert text == c.orig_text
    assert call["functionCall"]["args"] == json.loads(c.orig_tool)
    assert call["thoughtSignature"] == "CiQBAWS_ACCOUNT_0001VKc0x=="  # opaque, untouched
    assert finishes == 1 and "finishReason" in events[-1][1]
    assert b"\r\n\r\n" in out and b"\n\n" not in out.replace(b"\r\n", b"")


def cohere_stream(size: int | list[int] = 5, c: Content = FULL) -> bytes:
    """Cohere v2 chat (``POST /v2/chat``, ``"stream": true``): a tool plan, a tool call whose arguments are
    streamed, then the text; every event named after its type."""
    def ev(data: dict[str, Any]) -> str:
        return sse(data["type"], data)

    out = [ev({"id": "c0a8e2f4-5d0b-4c1e-9f0e-5b2c8e1d7a11", "type": "message-start", "delta": {"message": {
        "role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}}})]
    out += [ev({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": p}}})
            for p in pieces(c.think, size)]
    out.append(ev({"type": "tool-call-start", "index": 0, "delta": {"message": {"tool_calls": {
        "id": "describe_instances_q8h4x2k9v7ab", "type": "function",
        "function": {"name": "describe_instances", "arguments": ""}}}}}))
    out += [ev({"type": "tool-call-delta", "index": 0,
                "delta": {"message": {"tool_calls": {"function": {"arguments": p}}}}})
            for p in pieces(c.tool, size)]
    out.append(ev({"type": "tool-call-end", "index": 0}))
    out.append(ev({"type": "content-start", "index": 0,
                   "delta": {"message": {"content": {"type": "text", "text": ""}}}}))
    out += [ev({"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": p}}},
                "logprobs": None}) for p in pieces(c.text, size)]
    out.append(ev({"type": "content-end", "index": 0}))
    out.append(ev({"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": {
        "billed_units": {"input_tokens": 31, "output_tokens": 58}, "tokens": {"input_tokens": 1002,
                                                                              "output_tokens": 58}}}}))
    return "".join(out).encode()


def check_cohere(out: bytes, src: bytes, c: Content = FULL) -> None:
    events = valid_events(out)
    plan = args = text = ""
    for name, data in events:
        d = json.loads(data)
        assert name == d["type"]
        msg = d.get("delta", {}).get("message", {})
        if name == "tool-plan-delta":
            assert msg["tool_plan"], "empty delta emitted"
            plan += msg["tool_plan"]
        elif name == "tool-call-delta":
            assert msg["tool_calls"]["function"]["arguments"], "empty delta emitted"
            args += msg["tool_calls"]["function"]["arguments"]
        elif name == "content-delta":
            assert msg["content"]["text"], "empty delta emitted"
            text += msg["content"]["text"]
    assert plan == c.orig_think and args == c.orig_tool and text == c.orig_text
    # everything but the deltas: same events in the same order, and each delta kind stays in its place
    assert [n for n, _ in events if not n.endswith("-delta")] == [n for n, _ in parse_sse(src)
                                                                   if not n.endswith("-delta")]
    names = [n for n, _ in events]
    assert max(i for i, n in enumerate(names) if n == "tool-plan-delta") < names.index("tool-call-start")
    assert max(i for i, n in enumerate(names) if n == "tool-call-delta") < names.index("tool-call-end")
    assert max(i for i, n in enumerate(names) if n == "content-delta") < names.index("content-end")


# ----------------------------------------------------------------------------------- client-side parse


def parse_sse(raw: bytes) -> list[tuple[str, str]]:
    """A spec-following SSE client: (event type, data) of every dispatched event."""
    events: list[tuple[str, str]] = []
    etype, data = "", []
    for line in re.split(r"\r\n|\r|\n", raw.decode("utf-8")):
        if line == "":
            if data:
                events.append((etype or "message", "\n".join(data)))
            etype, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            etype = value
    return events


def run(
    raw: bytes,
    cuts: list[int] | int | None = None,
    r: StreamRestorer | None = None,
    content_type: str = "text/event-stream",
    encoding: str = "",
    whole_events: bool = True,
) -> tuple[bytes, list[bytes], StreamRestorer]:
    """Feed ``raw`` cut at ``cuts`` (offsets) or into pieces of ``cuts`` bytes; returns output and parts."""
    r = r or StreamRestorer(MAPPING, content_type, encoding)
    if cuts is None:
        chunks = [raw]
    elif isinstance(cuts, int):
        chunks = [raw[i : i + cuts] for i in range(0, len(raw), cuts)]
    else:
        bounds = [0, *cuts, len(raw)]
        chunks = [raw[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    parts: list[bytes] = []
    for c in [*chunks, b""]:
        res = r(c)
        assert isinstance(res, list)
        assert all(isinstance(p, bytes) and p for p in res), "never b'' in the output list"
        if content_type == "text/event-stream" and whole_events:
            for p in res:  # only complete events go out
                assert p.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")), p[-40:]
        parts.extend(res)
    assert r.errors == 0
    return b"".join(parts), parts, r


def valid_events(raw: bytes) -> list[tuple[str, str]]:
    events = parse_sse(raw)
    for _, data in events:
        if data != "[DONE]":
            json.loads(data)
    return events


def client_text(provider: str, events: list[tuple[str, str]]) -> str:
    """The model text a client reassembles from the (main) text deltas of a parsed stream."""
    if provider == "anthropic":
        return "".join(
            json.loads(d)["delta"].get("text", "") for n, d in events if n == "content_block_delta"
        )
    if provider == "chat":
        chunks = [json.loads(d) for _, d in events if d != "[DONE]"]
        return "".join(c["delta"].get("content") or "" for ch in chunks for c in ch["choices"])
    if provider == "gemini":
        return "".join(p["text"] for _, d in events for cand in json.loads(d)["candidates"]
                       for p in cand["content"]["parts"] if "text" in p and not p.get("thought"))
    return "".join(json.loads(d)["delta"] for n, d in events if n == "response.output_text.delta")


def check_anthropic(out: bytes, src: bytes, c: Content = FULL) -> None:
    events = valid_events(out)
    blocks: dict[int, dict[str, str]] = {}
    for name, data in events:
        d = json.loads(data)
        assert name == d["type"]
        if name == "content_block_delta":
            delta = d["delta"]
            field = {
                "text_delta": "text",
                "thinking_delta": "thinking",
                "input_json_delta": "partial_json",
                "signature_delta": "signature",
            }[delta["type"]]
            assert delta[field] or field == "partial_json", f"empty delta emitted: {data}"
            b = blocks.setdefault(d["index"], {})
            b[field] = b.get(field, "") + delta[field]
    assert blocks[0]["thinking"] == c.orig_think
    assert blocks[0]["signature"].endswith("AWS_ACCOUNT_0001mZt9==")  # opaque, untouched
    assert blocks[1]["text"] == c.orig_text
    assert blocks[2]["partial_json"] == c.orig_tool
    assert json.loads(blocks[2]["partial_json"]) == json.loads(c.orig_tool)

    def non_delta(evs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [e for e in evs if e[0] != "content_block_delta" or "signature_delta" in e[1]]

    assert non_delta(events) == non_delta(parse_sse(src))  # same events, same order, byte-identical data


def check_chat(out: bytes, src: bytes, c: Content = FULL, n_choices: int = 1) -> None:
    events = valid_events(out)
    assert events[-1] == ("message", "[DONE]")
    content: dict[int, str] = {}
    args = ""
    non_delta = []
    for _, data in events[:-1]:
        d = json.loads(data)
        assert d["object"] == "chat.completion.chunk" and d["id"].startswith("chatcmpl-")
        is_delta = False
        for ch in d["choices"]:
            delta = ch["delta"]
            if delta.get("content"):
                content[ch["index"]] = content.get(ch["index"], "") + delta["content"]
                is_delta = True
            for tc in delta.get("tool_calls", []):
                args += tc["function"]["arguments"]
                is_delta = is_delta or set(tc) == {"index", "function"}
                if set(tc) == {"index", "function"}:
                    assert set(tc["function"]) == {"arguments"} and tc["function"]["arguments"]
        if not is_delta:
            non_delta.append(data)
    assert content == dict.fromkeys(range(n_choices), c.orig_text)
    assert args == c.orig_tool
    src_non_delta = [
        data
        for _, data in parse_sse(src)[:-1]
        if not (('"content":"' in data and '"content":""' not in data) or '"function":{"arguments"' in data)
    ]
    assert non_delta == src_non_delta


def check_responses(out: bytes, src: bytes, c: Content = FULL) -> None:
    events = valid_events(out)
    text_acc, args_acc = "", ""
    last_seq = -1
    for name, data in events:
        d = json.loads(data)
        assert name == d["type"]
        assert d["sequence_number"] >= last_seq
        last_seq = d["sequence_number"]
        if name == "response.output_text.delta":
            assert d["delta"]
            text_acc += d["delta"]
        elif name == "response.function_call_arguments.delta":
            assert d["delta"]
            args_acc += d["delta"]
        elif name == "response.output_text.done":
            assert text_acc == d["text"] == c.orig_text
        elif name == "response.function_call_arguments.done":
            assert args_acc == d["arguments"] == c.orig_tool
        elif name == "response.content_part.done":
            assert d["part"]["text"] == c.orig_text
        elif name == "response.output_item.done" and d["output_index"] == 1:
            assert d["item"]["arguments"] == c.orig_tool
        elif name == "response.completed":
            assert d["response"]["output"][0]["content"][0]["text"] == c.orig_text
            assert d["response"]["output"][1]["arguments"] == c.orig_tool
            assert d["response"]["instructions"].endswith(ORIG_OF[NAMES["o0"]])
    assert text_acc == c.orig_text and args_acc == c.orig_tool

    def non_delta(evs: list[tuple[str, str]]) -> list[str]:
        return [e[0] for e in evs if not e[0].endswith(".delta")]

    assert non_delta(events) == non_delta(parse_sse(src))


PROVIDERS = {
    "anthropic": (anthropic_stream, check_anthropic),
    "chat": (chat_stream, check_chat),
    "responses": (responses_stream, check_responses),
    "gemini": (gemini_stream, check_gemini),
    "cohere": (cohere_stream, check_cohere),
}


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("provider", PROVIDERS)
def test_whole_stream_restored(provider: str) -> None:
    make, check = PROVIDERS[provider]
    src = make()
    out, _, r = run(src)
    check(out, src)
    assert r.restored > 0 and not r.drops_content_encoding and r.held == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_two_piece_cut(provider: str) -> None:
    make, check = PROVIDERS[provider]
    src = make([13, 21, 9], c=SHORT)
    ref, _, _ = run(src)
    check(ref, src, SHORT)
    for i in range(1, len(src)):
        out, _, _ = run(src, [i])
        assert out == ref, f"cut at {i}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_small_pieces(provider: str, piece: int) -> None:
    make, check = PROVIDERS[provider]
    src = make([3, 1, 8])
    ref, _, _ = run(src)
    out, parts, _ = run(src, piece)
    assert out == ref
    check(out, src)
    if piece == 1:
        assert len(parts) > 50  # events go out as soon as they are complete, not at the end


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 9, 11, 16, 23, 40, [1, 2], [2, 5, 1, 3]])
def test_delta_sizes(provider: str, size: int | list[int]) -> None:
    """Placeholders split across 2..many deltas, at every position."""
    make, check = PROVIDERS[provider]
    src = make(size)
    out, _, _ = run(src, 64)
    check(out, src)


def test_chat_two_interleaved_choices() -> None:
    for size in (1, 3, 5):
        src = chat_stream(size, two_choices=True)
        out, _, _ = run(src, 5)
        check_chat(out, src, n_choices=2)


@pytest.mark.parametrize("term", ["\r\n", "\r"])
def test_crlf_cr_and_comments(term: str) -> None:
    src = anthropic_stream([6, 11], term=term, comments=True, c=SHORT)
    ref, _, _ = run(src)
    check_anthropic(ref, src, SHORT)
    assert ref.count(b": keep-alive" + term.encode()) == src.count(b": keep-alive" + term.encode())
    assert b"\n\n" not in ref if term == "\r" else b"\n\n" not in ref.replace(b"\r\n", b"")
    for piece in (1, 2, 3, 7):
        assert run(src, piece)[0] == ref
    for i in range(1, len(src)):
        assert run(src, [i])[0] == ref


def test_crlf_responses() -> None:
    src = responses_stream([1, 4], term="\r\n")
    out, _, _ = run(src, 3)
    check_responses(out, src)
    assert out.count(b"\r\n\r\n") == len(parse_sse(out))


def test_unchanged_events_byte_identical() -> None:
    """An event with no "A" while nothing is held goes out at once, byte-identical, in the same call."""
    r = StreamRestorer(MAPPING, "text/event-stream")
    n = 0
    for e in re.split(rb"(?<=\n\n)", anthropic_stream(5))[:-1]:
        held = r.held
        res = r(e)
        if b"A" not in e and not held:
            assert res == [e]
            n += 1
    assert n > 50


def test_multiline_data_and_extra_fields() -> None:
    """data: split over several lines, id:/retry: fields and a comment inside an event."""
    d1 = json.dumps(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "see AWS_ACC"}}
    ).replace(', "delta"', ',\ndata: "delta"')
    d2 = json.dumps(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "OUNT_0001!"}}
    )
    src = (
        "retry: 3000\n\n"
        f"event: content_block_delta\nid: 1\n: note\ndata: {d1}\n\n"
        f"event: content_block_delta\nid: 2\ndata:{d2}\n\n"
        'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    ).encode()
    for piece in (None, 1, 5):
        out, _, _ = run(src, piece)
        events = parse_sse(out)
        texts = [json.loads(d)["delta"]["text"] for n, d in events if n == "content_block_delta"]
        assert "".join(texts) == "see 123456789012!"
        assert b"id: 1\n: note\n" in out and b"id: 2\ndata:{" in out and out.startswith(b"retry: 3000\n\n")


def test_plain_text_sse_data() -> None:
    src = b"".join(b"event: chunk\ndata: %s\n\n" % t for t in (b"acct AWS_ACC", b"OUNT_0001 and AWS_", b"x"))
    for piece in (None, 1, 4):
        out, _, _ = run(src, piece)
        assert "".join(d for _, d in parse_sse(out)) == "acct 123456789012 and AWS_x"


def test_gemini_chunk_with_two_text_parts_of_one_candidate() -> None:
    ph = NAMES["o4"]
    chunk = {"candidates": [{"content": {"parts": [{"text": "see " + ph[:7]}, {"text": ph[7:] + " ok"}],
                                         "role": "model"}, "index": 0}]}
    last = {"candidates": [{"content": {"parts": [{"text": "."}], "role": "model"}, "index": 0,
                            "finishReason": "STOP"}]}
    src = (sse(None, chunk) + sse(None, last)).encode()
    for piece in (None, 1, 5):
        out, _, _ = run(src, piece)
        assert client_text("gemini", parse_sse(out)) == "see " + ORIG_OF[ph] + " ok."


def test_unknown_json_event_restored_in_place() -> None:
    ev = {"kind": "segment", "output": {"segments": [{"text": "acct AWS_ACCOUNT_0001 key " + NAMES["o8"]}]}}
    src = sse(None, ev).encode()
    out, _, _ = run(src, 3)
    got = json.loads(parse_sse(out)[0][1])
    assert got["output"]["segments"][0]["text"] == "acct 123456789012 key " + ORIG_OF[NAMES["o8"]]


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> str:
    return sse(None, {"id": "c", "object": "chat.completion.chunk",
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def test_chat_empty_finish_reason_is_not_the_end() -> None:
    """Some OpenAI-compatible servers send "finish_reason": "" on every chunk: hold-back must stay on."""
    ph = NAMES["o4"]
    src = (chat_chunk({"content": "see " + ph[:7]}, "") + chat_chunk({"content": ph[7:] + " ok"}, "")
           + chat_chunk({}, "stop") + "data: [DONE]\n\n").encode()
    for piece in (None, 1, 7):
        out, _, _ = run(src, piece)
        assert client_text("chat", parse_sse(out)) == "see " + ORIG_OF[ph] + " ok"


@pytest.mark.parametrize("delta", [
    {"function_call": {"name": "lookup", "arguments": json.dumps({"id": "AWS_ACCOUNT_0001"})}},  # legacy
    {"audio": {"id": "a1", "transcript": "Account AWS_ACCOUNT_0001"}},
    {"reasoning_details": [{"type": "reasoning.text", "text": "use AWS_ACCOUNT_0001"}]},  # OpenRouter
    {"content": [{"type": "text", "text": "AWS_ACCOUNT_0001"}]},  # content as parts
    {"tool_calls": [{"index": 0, "id": "AWS_ACCOUNT_0001", "function": {"arguments": ""}}]},
])
def test_chat_placeholders_in_other_delta_fields_are_restored(delta: dict[str, Any]) -> None:
    src = (chat_chunk(delta) + chat_chunk({}, "stop") + "data: [DONE]\n\n").encode()
    out, _, r = run(src, 5)
    first = json.loads(parse_sse(out)[0][1])["choices"][0]["delta"]
    assert "AWS_ACCOUNT_0001" not in json.dumps(first) and "123456789012" in json.dumps(first)
    assert r.restored == 1


@pytest.mark.parametrize("provider", ["chat", "gemini"])
def test_held_text_goes_out_before_an_error_event(provider: str) -> None:
    """OpenAI's and Gemini's mid-stream {"error": ...}: SDKs raise on it and never read what follows."""
    if provider == "chat":
        first = chat_chunk({"content": "Deploy to USA"})
    else:
        first = sse(None, {"candidates": [{"content": {"parts": [{"text": "Region: USA"}], "role": "model"},
                                           "index": 0}]})
    src = (first + sse(None, {"error": {"message": "overloaded", "code": 503}})).encode()
    out, _, _ = run(src)
    events = parse_sse(out)
    assert "error" in json.loads(events[-1][1])
    assert client_text(provider, events[:-1]).endswith("USA")


def gemini_array(size: int | list[int] = 5, c: Content = FULL) -> bytes:
    """Gemini ``streamGenerateContent`` without ``alt=sse``: the same chunks as one JSON array, sent element
    by element (``[{…}\\n,\\r\\n{…}\\n]`` as Google sends it)."""
    datas = [data for _, data in parse_sse(gemini_stream(size, c))]
    return ("[" + "\n,\r\n".join(datas) + "\n]").encode()


def check_gemini_array(out: bytes, c: Content) -> None:
    chunks = json.loads(out)  # still one valid JSON array
    think = "".join(p["text"] for d in chunks for cand in d["candidates"] for p in cand["content"]["parts"]
                    if "text" in p and p.get("thought"))
    text = "".join(p["text"] for d in chunks for cand in d["candidates"] for p in cand["content"]["parts"]
                   if "text" in p and not p.get("thought"))
    calls = [p for d in chunks for cand in d["candidates"] for p in cand["content"]["parts"]
             if "text" not in p]
    assert think == c.orig_think and text == c.orig_text
    assert calls[-1]["functionCall"]["args"] == json.loads(c.orig_tool)
    assert calls[-1]["thoughtSignature"] == "CiQBAWS_ACCOUNT_0001VKc0x=="  # opaque, untouched
    assert "finishReason" in chunks[-1]["candidates"][0]


def test_placeholders_in_the_keys_of_a_streamed_object_are_restored_as_in_a_whole_reply() -> None:
    """A function call's arguments keyed by an identifier ({"tags": {"AWS_ACCOUNT_0001": "prod"}}): the
    whole reply restored its keys (restore_bytes), the stream left them masked (found by a differential fuzz
    of whole vs streamed replies)."""
    o0, o4, glued = NAMES["o0"], NAMES["o4"], "AWS_X" + NAMES["o1"]
    tool = json.dumps({"tags": {o0: "prod", o4: [o4, {glued: 1}]}, "note": "AWS_ACCOUNT_9999"})
    want = json.loads(restore_bytes(tool.encode(), MAPPING, in_json=True)[0])
    assert ORIG_OF[o0] in want["tags"] and "AWS_X" + ORIG_OF[NAMES["o1"]] in want["tags"][ORIG_OF[o4]][1]
    src = gemini_stream(7, c=SHORT._replace(tool=tool))
    for cuts in (None, 1, 50):
        out, _, _ = run(src, cuts)
        calls = [p["functionCall"]["args"] for _, d in valid_events(out)
                 for cand in json.loads(d)["candidates"] for p in cand["content"]["parts"]
                 if "functionCall" in p]
        assert calls == [want], cuts


def test_gemini_json_array_stream_every_cut() -> None:
    """Without alt=sse Gemini streams a JSON array: a placeholder cut between two of its elements is held
    back and restored as between two SSE events, wherever the reads are cut."""
    src = gemini_array([13, 21, 9], c=SHORT)
    ref, _, _ = run(src, content_type="application/json")
    check_gemini_array(ref, SHORT)
    for i in range(1, len(src)):
        out, _, _ = run(src, [i], content_type="application/json")
        assert out == ref, f"cut at {i}"


@pytest.mark.parametrize("size", [1, 2, 7])
def test_gemini_json_array_stream_delta_sizes(size: int) -> None:
    src = gemini_array(size)
    out, parts, _ = run(src, 3, content_type="application/json")
    check_gemini_array(out, FULL)
    assert len(parts) > 20  # elements go out as they complete


def ollama_stream(size: int | list[int] = 5, c: Content = FULL, generate: bool = False) -> bytes:
    """Ollama's native API: one JSON object a line (``application/x-ndjson``). /api/chat: thinking and text
    in ``message``, the tool call whole, then a last line with ``"done": true``; /api/generate: ``response``
    (and ``thinking``) at the top level."""
    base = {"model": "qwen3:8b", "created_at": "2026-11-26T10:00:00.123456Z"}
    lines: list[dict[str, Any]] = []
    if generate:
        lines += [{**base, "response": "", "thinking": p, "done": False} for p in pieces(c.think, size)]
        lines += [{**base, "response": p, "done": False} for p in pieces(c.text, size)]
        lines.append({**base, "response": "", "done": True, "done_reason": "stop", "context": [1, 2, 3]})
    else:
        msg = {"role": "assistant", "content": ""}
        lines += [{**base, "message": {**msg, "thinking": p}, "done": False} for p in pieces(c.think, size)]
        lines += [{**base, "message": {**msg, "content": p}, "done": False} for p in pieces(c.text, size)]
        call = {"function": {"name": "describe_instances", "arguments": json.loads(c.tool)}}
        lines.append({**base, "message": {**msg, "tool_calls": [call]}, "done": False})
        lines.append({**base, "message": msg, "done": True, "done_reason": "stop", "eval_count": 42})
    return b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines)


def check_ollama(out: bytes, c: Content, generate: bool = False) -> None:
    assert out.endswith(b"\n")
    objs = [json.loads(line) for line in out.split(b"\n")[:-1]]  # every line one JSON object
    assert objs[-1]["done"] is True and not any(o["done"] for o in objs[:-1])
    assert all(o["model"] == "qwen3:8b" for o in objs)
    if generate:
        assert "".join(o.get("thinking", "") for o in objs) == c.orig_think
        assert "".join(o["response"] for o in objs) == c.orig_text
        assert objs[-1]["context"] == [1, 2, 3]
        return
    assert "".join(o["message"].get("thinking", "") for o in objs) == c.orig_think
    assert "".join(o["message"]["content"] for o in objs) == c.orig_text
    calls = [t for o in objs for t in o["message"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["function"]["arguments"] == json.loads(c.orig_tool)


@pytest.mark.parametrize("generate", [False, True])
def test_ollama_ndjson_stream_every_cut(generate: bool) -> None:
    """Ollama streams a JSON object a line: a placeholder cut between two lines is held back and restored
    as between two SSE events, wherever the reads are cut."""
    src = ollama_stream([13, 21, 9], c=SHORT, generate=generate)
    ref, _, _ = run(src, content_type="application/x-ndjson")
    check_ollama(ref, SHORT, generate)
    for i in range(1, len(src)):
        out, _, _ = run(src, [i], content_type="application/x-ndjson")
        assert out == ref, f"cut at {i}"


@pytest.mark.parametrize("size", [1, 2, 7])
def test_ollama_ndjson_stream_delta_sizes(size: int) -> None:
    src = ollama_stream(size)
    out, parts, r = run(src, 3, content_type="application/x-ndjson; charset=utf-8")
    check_ollama(out, FULL)
    assert len(parts) > 20 and r.held <= LONGEST  # lines go out as they complete, little is held


def test_held_text_goes_out_before_an_ollama_error_line() -> None:
    held = NAMES["o0"][:9]  # the start of a placeholder, held back
    src = (json.dumps({"model": "m", "message": {"role": "assistant", "content": "x " + held}, "done": False})
           + "\n" + json.dumps({"error": "model runner stopped"}) + "\n").encode()
    out, _, _ = run(src, content_type="application/x-ndjson")
    lines = out.split(b"\n")[:-1]
    assert json.loads(lines[-1]) == {"error": "model runner stopped"}
    assert "".join(json.loads(line)["message"]["content"] for line in lines[:-1]) == "x " + held


def test_ollama_stream_cut_without_a_last_newline_keeps_every_line_json() -> None:
    held = NAMES["o2"][:10]  # thinking ends with the start of a placeholder; the next lines have no thinking
    src = (json.dumps({"model": "m", "response": "", "thinking": "about " + held, "done": False}) + "\n"
           + json.dumps({"model": "m", "response": "Hello", "done": False})).encode()  # cut: no done line
    out, _, _ = run(src, content_type="application/x-ndjson")
    objs = [json.loads(line) for line in out.split(b"\n") if line]  # every line one JSON object
    assert "".join(o.get("thinking", "") for o in objs) == "about " + held
    assert "".join(o["response"] for o in objs) == "Hello"


def test_ollama_flushed_line_carries_no_log_probabilities() -> None:
    held = NAMES["o0"][:8]
    lines = [{"model": "m", "message": {"role": "assistant", "content": "", "thinking": "about " + held},
              "done": False, "logprobs": [{"token": "about "}, {"token": held}]},
             {"model": "m", "message": {"role": "assistant", "content": "Answer"}, "done": False,
              "logprobs": [{"token": "Answer"}]},
             {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True}]
    src = b"".join(json.dumps(o).encode() + b"\n" for o in lines)
    out, _, _ = run(src, content_type="application/x-ndjson")
    objs = [json.loads(line) for line in out.split(b"\n")[:-1]]
    assert [t["token"] for o in objs for t in o.get("logprobs", [])] == ["about ", held, "Answer"]
    assert "".join(o["message"].get("thinking", "") for o in objs) == "about " + held
    assert objs[-1]["done"] is True


def test_ollama_line_with_a_line_separator_stays_one_line() -> None:
    # U+2028 is valid JSON inside a string, but line readers (httpx's iter_lines) end a line there
    text = "a\u2028b " + NAMES["o4"]
    first = {"model": "m", "message": {"role": "assistant", "content": text}, "done": False}
    src = (json.dumps(first, ensure_ascii=False) + '\n{"model": "m", "done": true}\n').encode()
    assert b"\xe2\x80\xa8" in src
    out, _, _ = run(src, content_type="application/x-ndjson")
    assert b"\xe2\x80\xa8" not in out  # written as \u2028
    objs = [json.loads(line) for line in out.decode().splitlines()]  # str.splitlines ends lines at U+2028 too
    restored = "".join(o.get("message", {}).get("content", "") for o in objs)
    assert restored == "a\u2028b " + ORIG_OF[NAMES["o4"]]


def test_held_text_goes_out_before_a_done_line_without_text_fields() -> None:
    held = NAMES["o0"][:8]
    src = (json.dumps({"model": "m", "response": "x " + held, "done": False}) + "\n"
           + json.dumps({"model": "m", "done": True, "done_reason": "stop"}) + "\n").encode()
    out, _, _ = run(src, content_type="application/x-ndjson")
    objs = [json.loads(line) for line in out.split(b"\n")[:-1]]
    assert objs[-1] == {"model": "m", "done": True, "done_reason": "stop"}
    assert "".join(o.get("response", "") for o in objs) == "x " + held


def test_a_json_object_reply_streamed_stays_raw() -> None:
    src = json.dumps({"content": [{"type": "text", "text": "acct AWS_ACCOUNT_0001 ok"}]}).encode()
    out, _, r = run(src, 4, content_type="application/json")
    assert json.loads(out)["content"][0]["text"] == "acct 123456789012 ok" and r.restored == 1


# ------------------------------------------------------------------------------------ many identifiers


def test_1500_instances_one_reply() -> None:
    mapping = {format_placeholder("EC2_INSTANCE", n): f"i-{n:017x}".encode() for n in range(1, 1501)}
    order = list(range(1500, 0, -1)) + list(range(1, 1501))  # _1000.._1500 next to _100.._150 both ways
    masked = " ".join(format_placeholder("EC2_INSTANCE", n).decode() for n in order) + ","
    masked += "".join(format_placeholder("EC2_INSTANCE", n).decode() for n in (150, 1500, 100, 1000, 15))
    expected = restore_bytes(masked.encode(), mapping)[0].decode()
    assert "AWS_" not in expected
    for provider, size in (("anthropic", [1, 2, 3, 5, 7]), ("chat", [2, 3]), ("responses", [3, 4])):
        make, _ = PROVIDERS[provider]
        src = make(size, c=FULL._replace(text=masked))
        r = StreamRestorer(mapping, "text/event-stream")
        out, _, r = run(src, 4096, r)
        text = client_text(provider, valid_events(out))
        assert text == expected, provider
        assert text.count("i-") == 3005
        assert r.held == 0


# ---------------------------------------------------------------------------------------- hold-back


def delta_event(text: str, index: int = 0) -> bytes:
    return sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}},
    ).encode()


def texts_of(parts: list[bytes]) -> list[str]:
    return [
        json.loads(d)["delta"]["text"] for p in parts for n, d in parse_sse(p) if n == "content_block_delta"
    ]


def test_hold_back_bound_and_release() -> None:
    src = anthropic_stream([1, 2, 3])
    r = StreamRestorer(MAPPING, "text/event-stream")
    max_held = 0
    for ev in re.split(rb"(?<=\n\n)", src):
        r(ev)
        max_held = max(max_held, r.held)
        assert r.held <= LONGEST
    assert max_held > 10  # placeholders were really held across deltas
    r(b"")
    assert r.held == 0


def test_no_prefix_goes_out_at_once() -> None:
    r = StreamRestorer(MAPPING, "text/event-stream")
    ev = delta_event("no placeholder here, nothing to hold")
    assert r(ev) == [ev]  # the call that receives it returns it, byte-identical
    assert texts_of(r(delta_event("Hello AWS_ACC"))) == ["Hello "]
    assert texts_of(r(delta_event("OUNT_0001 x"))) == ["123456789012 x"]
    assert r(delta_event("AWS_")) == []  # entirely held: no event with empty text
    assert texts_of(r(delta_event("AW"))) == ["AWS_"]  # "AWS_AW" cannot be a placeholder, "AW" can
    # no "A" in the next delta, but it decides: released at once, prepended to this delta
    assert texts_of(r(delta_event("xyz"))) == ["AWxyz"]
    assert r(delta_event("AWS_ACCOUNT_1000")) == []  # complete, but more digits could follow
    assert texts_of(r(delta_event("0 ok"))) == ["999900009999 ok"]  # greedy: _10000, not _1000 + "0"
    assert r(delta_event("AWS_ACCOUNT_1000")) == []
    assert texts_of(r(delta_event("1"))) == ["AWS_ACCOUNT_10001"]  # not in mapping: untouched
    assert r(delta_event("end AWS_ACCOUNT_0001")) and r.held == len("AWS_ACCOUNT_0001")
    stop = sse("content_block_stop", {"type": "content_block_stop", "index": 0}).encode()
    flushed = r(stop)
    assert texts_of(flushed) == ["123456789012"] and flushed[0].endswith(stop)  # flushed before the stop
    assert r(b"") == []


def test_hold_state_is_per_block() -> None:
    r = StreamRestorer(MAPPING, "text/event-stream")
    assert texts_of(r(delta_event("a AWS_ACC", 0))) == ["a "]
    assert texts_of(r(delta_event("b AWS_EC2_INST", 1))) == ["b "]
    assert texts_of(r(delta_event("OUNT_0002 ", 0))) == ["210987654321 "]
    assert texts_of(r(delta_event("ANCE_0002.", 1))) == ["i-0fedcba9876543210."]


def test_held_tail_flushed_at_end_of_stream() -> None:
    r = StreamRestorer(MAPPING, "text/event-stream")
    assert r(delta_event("x AWS_ACCOUNT_0001")) and r.held
    assert texts_of(r(b"")) == ["123456789012"]


# ---------------------------------------------------------------------------------- content encoding


def _deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


def _brotli(data: bytes) -> bytes:
    brotli = pytest.importorskip("brotli")
    return bytes(brotli.compress(data))


def _zstd(data: bytes) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        zstd = pytest.importorskip("backports.zstd")
    return bytes(zstd.compress(data[:1000]) + zstd.compress(data[1000:]))  # two frames


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("gzip", lambda d: gzip.compress(d[:999]) + gzip.compress(d[999:])),  # two members
        ("deflate", zlib.compress),
        ("deflate", _deflate_raw),
        ("br", _brotli),
        ("zstd", _zstd),
    ],
)
def test_compressed_stream(encoding: str, compress: Any) -> None:
    src = anthropic_stream([2, 3])
    ref, _, _ = run(src)
    body = compress(src)
    for piece in (1, 7, 100, len(body)):
        r = StreamRestorer(MAPPING, "text/event-stream", encoding)
        assert r.drops_content_encoding
        out, _, r = run(body, piece, r, encoding=encoding)
        assert out == ref
    check_anthropic(ref, src)


def test_unknown_encoding_and_binary_types_pass_through() -> None:
    src = anthropic_stream()
    for ct, enc in (
        ("text/event-stream", "compress"),
        ("application/vnd.amazon.eventstream", ""),
        ("application/octet-stream", "gzip"),
    ):
        r = StreamRestorer(MAPPING, ct, enc)
        assert not r.drops_content_encoding
        out, parts, _ = run(src, 100, r, whole_events=False)
        assert out == src and parts[0] == src[:100]
    r = StreamRestorer({}, "text/event-stream", "gzip")  # nothing to restore: untouched
    body = gzip.compress(src)
    assert not r.drops_content_encoding and run(body, 50, r, whole_events=False)[0] == body


# ------------------------------------------------------------------------------------- raw bodies


@pytest.mark.parametrize(
    ("ct", "escape"),
    [("application/json", True), ("application/x-ndjson", True), ("text/plain; charset=utf-8", False)],
)
def test_raw_bodies(ct: str, escape: bool) -> None:
    body = json.dumps({"text": MASKED_TEXT, "input": tool_input(False)}, ensure_ascii=False).encode()
    ref = restore_bytes(
        body,
        {
            k: json.dumps(v.decode(), ensure_ascii=False)[1:-1].encode() if escape else v
            for k, v in MAPPING.items()
        },
    )[0]
    for cuts in [*([i] for i in range(1, len(body), 5)), 1, 2, 3, 7]:
        out, _, r = run(body, cuts, content_type=ct)
        assert out == ref
    if escape:
        assert json.loads(out) == {"text": ORIG_TEXT, "input": tool_input(True)}
    r = StreamRestorer(MAPPING, ct)
    if ct == "application/x-ndjson":  # JSON Lines: a line goes out once it is complete
        assert r(b"abc AWS_ACC") == [] and r(b"OUNT_0001") == []
        assert r(b" \nde") == [b"abc 123456789012 \n"] and r(b"") == [b"de"]
        return
    assert r(b"abc AWS_ACC") == [b"abc "] and r.held == 7
    assert r(b"OUNT_0001") == [] and r(b" ") == [b"123456789012 "] and r(b"") == []


# ---------------------------------------------------------------------------------- internal errors


def test_internal_error_passes_bytes_through(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(StreamRestorer, "_step", boom)
    src = anthropic_stream(4)
    r = StreamRestorer(MAPPING, "text/event-stream")
    parts = []
    with caplog.at_level(logging.ERROR, logger="aws_masker.streaming"):
        for c in [src[i : i + 50] for i in range(0, len(src), 50)] + [b""]:
            res = r(c)
            assert all(res)
            parts.extend(res)
    assert b"".join(parts) == src  # unrestored, nothing lost or duplicated
    assert r.errors == 1
    assert len([rec for rec in caplog.records if rec.name == "aws_masker.streaming"]) == 1


@pytest.mark.parametrize("provider", ["anthropic", "chat", "responses"])
@pytest.mark.parametrize("fail_at", [1, 5, 40, 90, 200])
def test_internal_error_mid_stream_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, provider: str, fail_at: int
) -> None:
    real = StreamRestorer._step
    calls = itertools.count(1)

    def flaky(self: StreamRestorer, *a: Any) -> Any:
        if next(calls) == fail_at:
            raise ValueError("boom")
        return real(self, *a)

    monkeypatch.setattr(StreamRestorer, "_step", flaky)
    src = PROVIDERS[provider][0]([1, 3])
    r = StreamRestorer(MAPPING, "text/event-stream")
    parts = [p for c in [*(src[i : i + 37] for i in range(0, len(src), 37)), b""] for p in r(c)]
    assert r.errors == 1 and all(parts)
    text = client_text(provider, valid_events(b"".join(parts)))
    # placeholders after the error reach the client unrestored, but no text is lost or duplicated
    assert restore_bytes(text.encode(), MAPPING)[0].decode() == ORIG_TEXT


def test_internal_error_raw_body(monkeypatch: pytest.MonkeyPatch) -> None:
    from aws_masker import streaming

    body = json.dumps({"text": MASKED_TEXT}).encode()
    r = StreamRestorer(MAPPING, "application/json")
    first = r(body[:100])
    held = r.held
    monkeypatch.setattr(streaming, "restore_bytes", lambda *a: 1 / 0)
    rest = [p for c in (body[100:200], body[200:], b"") for p in r(c)]
    assert r.errors == 1 and all(rest)
    assert first == [restore_bytes(body[: 100 - held], MAPPING)[0]]
    assert b"".join(rest) == body[100 - held :]  # the held tail and the rest, unrestored


def test_oversized_event_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    from aws_masker import streaming

    monkeypatch.setattr(streaming, "MAX_EVENT", 200)
    big = delta_event("x" * 300 + " AWS_ACCOUNT_0001 ")
    src = delta_event("a AWS_ACC") + big + delta_event("AWS_ACCOUNT_0002 b")
    for piece in (1, 64):
        out, _, _ = run(src, piece, whole_events=False)
        assert big in out  # unrestored, but whole and in place
        assert texts_of([out]) == ["a ", "AWS_ACC", "x" * 300 + " AWS_ACCOUNT_0001 ", "210987654321 b"]


def test_corrupt_gzip_does_not_raise() -> None:
    body = gzip.compress(anthropic_stream())
    bad = body[:40] + b"\x00garbage\xff" * 10 + body[40:]
    r = StreamRestorer(MAPPING, "text/event-stream", "gzip")
    parts = [p for c in [bad[i : i + 64] for i in range(0, len(bad), 64)] + [b""] for p in r(c)]
    assert r.errors == 1 and all(parts)


def test_text_log_is_capped() -> None:
    r = StreamRestorer(MAPPING, "text/event-stream", text_log_limit=300)
    out, _, r = run(anthropic_stream(), 500, r)
    assert r.text_log is not None and bytes(r.text_log) == out[:300]
    assert StreamRestorer(MAPPING, "text/event-stream").text_log is None


# ------------------------------------------------------------------------------------- recorded samples


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.txt")) if DATA.exists() else [])
def test_recorded_samples(name: str) -> None:
    """Hand-written samples in the exact wire format; ``# expect:`` lines give the reassembled text."""
    raw = (DATA / name).read_bytes()
    header, _, body = raw.partition(b"\n---\n")
    meta = dict(
        ln.split(": ", 1) for ln in header.decode().splitlines() if ln.startswith(("# mapping", "# expect"))
    )
    mapping = {k.encode(): v.encode() for k, v in json.loads(meta["# mapping"]).items()}
    expect = json.loads(meta["# expect"])
    for piece in (None, 1, 2, 3, 7):
        out, _, _ = run(body, piece, StreamRestorer(mapping, "text/event-stream"))
        got: dict[str, str] = {}
        for _, data in valid_events(out):
            if data == "[DONE]":
                continue
            d = json.loads(data)
            for path, key in (
                (("delta", "text"), "text"),
                (("delta", "partial_json"), "json"),
                (("delta", "thinking"), "thinking"),
                (("choices", 0, "delta", "content"), "text"),
                (("choices", 0, "delta", "tool_calls", 0, "function", "arguments"), "json"),
            ):
                v: Any = d
                for p in path:
                    try:
                        v = v[p]
                    except (KeyError, IndexError, TypeError):
                        v = None
                        break
                if isinstance(v, str):
                    got[key] = got.get(key, "") + v
            if d.get("type") == "response.output_text.delta":
                got["text"] = got.get("text", "") + d["delta"]
        assert got == expect
