"""Streamed replies through a real mitmdump with the addon: restored exactly, chunk by chunk, at once."""

from __future__ import annotations

import json
import time

import pytest

from conftest import masker_options, proxied_client
from fake_upstream import (
    ANTHROPIC,
    COHERE,
    GEMINI,
    OLLAMA,
    OPENAI_CHAT,
    RESPONSES,
    SSEEvent,
    SSEParser,
    expected_reply_text,
    parse_sse,
    reassemble_ndjson,
    reassemble_stream,
    reply_parts,
    request_for,
)
from test_proxy import ORIGINALS, PATHS, STREAM_PATHS, SYSTEM, TEXT, assert_no_original, make_request

pytestmark = pytest.mark.mitm


@pytest.fixture(scope="module")
def proxy(start_proxy_module, fake_upstream_module):
    return start_proxy_module(**masker_options(fake_upstream_module))


@pytest.fixture
def client(proxy):
    with proxied_client(proxy, timeout=30) as c:
        yield c


def stream(client, upstream, api: str, req: dict, **headers: str):
    if api != GEMINI:
        req = {**req, "stream": True}
    r = client.post(upstream.url_for(STREAM_PATHS[api]), json=req, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return req, r


@pytest.mark.parametrize("delta", [1, 3, 16])
@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
@pytest.mark.parametrize("api", [ANTHROPIC, OPENAI_CHAT, RESPONSES, GEMINI, COHERE])
def test_streamed_round_trip_is_exact(client, fake_upstream, api, tools, delta) -> None:
    req, r = stream(client, fake_upstream, api, make_request(api, tools=tools),
                    **{"x-fake-delta-chars": str(delta), "x-fake-chunk-bytes": "7"})
    assert_no_original(fake_upstream)
    parts = reassemble_stream(api, parse_sse(r.content))
    assert parts.text == expected_reply_text(req)
    if tools:
        assert parts.tool_input == {"text": expected_reply_text(req)}
    assert "AWS_" not in r.text


@pytest.mark.parametrize("delta", [1, 3])
def test_gemini_stream_without_sse_is_restored_exactly(client, fake_upstream, delta) -> None:
    """streamGenerateContent without alt=sse answers with one JSON array, element by element: a placeholder
    cut between two elements is restored all the same."""
    req = make_request(GEMINI, tools=True)
    r = client.post(fake_upstream.url_for(STREAM_PATHS[GEMINI].split("?", 1)[0]), json=req,
                    headers={"x-fake-delta-chars": str(delta), "x-fake-chunk-bytes": "7"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert_no_original(fake_upstream)
    chunks = r.json()  # one valid JSON array
    parts = reassemble_stream(GEMINI, [SSEEvent(None, json.dumps(c)) for c in chunks])
    assert parts.text == expected_reply_text(req) and "AWS_" not in r.text
    assert parts.tool_input == {"text": expected_reply_text(req)}


@pytest.mark.parametrize("delta", [1, 3])
@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
def test_ollama_ndjson_stream_is_restored_exactly(client, fake_upstream, tools, delta) -> None:
    """Ollama's /api/chat streams a JSON object a line: a placeholder cut between two lines is restored."""
    req = request_for(OLLAMA, TEXT, system=SYSTEM, tools=tools, stream=True)
    r = client.post(fake_upstream.url_for("/api/chat"), json=req,
                    headers={"x-fake-delta-chars": str(delta), "x-fake-chunk-bytes": "7"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    assert_no_original(fake_upstream)
    parts = reassemble_ndjson(r.content)  # every line one JSON object, the last one done
    assert parts.text == expected_reply_text(req) and "AWS_" not in r.text
    if tools:
        assert parts.tool_input == {"text": expected_reply_text(req)}


@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_compressed_stream_is_restored(client, fake_upstream, encoding) -> None:
    req, r = stream(client, fake_upstream, ANTHROPIC, make_request(ANTHROPIC),
                    **{"x-fake-encoding": encoding, "x-fake-delta-chars": "5"})
    assert reassemble_stream(ANTHROPIC, parse_sse(r.content)).text == expected_reply_text(req)


def test_first_delta_arrives_long_before_a_slow_stream_ends(proxy, fake_upstream) -> None:
    req = {**make_request(ANTHROPIC, "short text with i-0a1b2c3d4e5f60718 in it"), "stream": True}
    with proxied_client(proxy, timeout=30) as c:
        started = time.perf_counter()
        first = None
        parser = SSEParser()
        events = []
        with c.stream("POST", fake_upstream.url_for(PATHS[ANTHROPIC]), json=req,
                      headers={"x-fake-pause-ms": "150", "x-fake-delta-chars": "4"}) as r:
            for chunk in r.iter_raw():
                got = parser.feed(chunk)
                if got and first is None and any(e.event == "content_block_delta" for e in got):
                    first = time.perf_counter() - started
                events.extend(got)
        total = time.perf_counter() - started
    assert reassemble_stream(ANTHROPIC, events).text == expected_reply_text(req)
    assert first is not None and total > 2.0
    assert first < total / 4, f"first delta after {first:.2f}s of {total:.2f}s"


def test_1500_identifiers_of_one_kind_all_restored(client, fake_upstream) -> None:
    ids = [f"i-{n:017x}" for n in range(1, 1501)]
    text = " ".join(ids)
    _, r = stream(client, fake_upstream, ANTHROPIC, {"model": "m", "max_tokens": 10,
                                                        "messages": [{"role": "user", "content": text}]},
                    **{"x-fake-delta-chars": "7"})
    sent = fake_upstream.last_request.body
    assert not any(i.encode() in sent for i in ids[:20] + ids[-20:])
    assert b"AWS_EC2_INSTANCE_1500" in sent or b"AWS_EC2_INSTANCE_" in sent
    assert reassemble_stream(ANTHROPIC, parse_sse(r.content)).text == text


def test_large_or_unsized_non_streamed_reply_is_streamed_and_restored(start_proxy, fake_upstream) -> None:
    proxy = start_proxy(**masker_options(fake_upstream, masker_max_body="1200"))
    req = make_request(ANTHROPIC, (ORIGINALS[1] + " padding ") * 30)
    assert len(json.dumps(req)) < 1200
    with proxied_client(proxy) as c:
        r = c.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=req)
        assert r.status_code == 200 and len(r.content) > 1200
        assert reply_parts(ANTHROPIC, r.json()).text == expected_reply_text(req)
        body = b"echo " + ORIGINALS[1].encode() + b" " + b"x" * 500
        r = c.post(fake_upstream.url_for("/echo"), content=body,
                   headers={"content-type": "text/plain", "x-fake-chunk-bytes": "9"})
        assert r.content == body


def test_upstream_error_mid_stream_and_next_request_works(client, fake_upstream) -> None:
    req = make_request(OPENAI_CHAT)
    with pytest.raises(Exception):  # noqa: B017 - httpx raises RemoteProtocolError or ReadError
        stream(client, fake_upstream, OPENAI_CHAT, req, **{"x-fake-reset-after": "3"})
    req, r = stream(client, fake_upstream, OPENAI_CHAT, make_request(OPENAI_CHAT))
    assert reassemble_stream(OPENAI_CHAT, parse_sse(r.content)).text == expected_reply_text(req)
