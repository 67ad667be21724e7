"""Tests of the integration-test harness itself (fake upstream + mitmdump runner).

They run against plain mitmdump (no addon), so they pass independently of the addon.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fake_upstream import (
    ANTHROPIC,
    EMPTY_REPLY,
    OPENAI_CHAT,
    RESPONSES,
    SSEParser,
    decode_body,
    expected_error_message,
    expected_reply_text,
    expected_tool_arguments,
    expected_tool_input,
    parse_sse,
    reassemble_stream,
    reply_parts,
    request_for,
)
from proxyproc import MitmProxy, MitmProxyError, option_args, proxied_client

PATHS = {ANTHROPIC: "/v1/messages", OPENAI_CHAT: "/v1/chat/completions", RESPONSES: "/v1/responses"}
SECRET = "arn:aws:iam::123456789012:role/Admin AKIAIOSFODNN7EXAMPLE"
USER_TEXT = f"Please check {SECRET} — ünïcødé ✓ \"quoted\"\nsecond line"
SYSTEM_TEXT = "You are a helpful bot for account 123456789012."


def make_request(api: str, *, stream: bool = False, tools: bool = False, text: str = USER_TEXT) -> dict:
    req = request_for(api, text, system=SYSTEM_TEXT, tools=tools, stream=stream)
    if api == ANTHROPIC:  # earlier turns: the echo model answers the LAST user message only
        req["messages"][:0] = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"}]
    return req


@pytest.fixture(scope="module")
def streaming_proxy(start_proxy_module) -> MitmProxy:
    """Plain mitmdump that streams bodies (stream_large_bodies=1) instead of buffering them."""
    return start_proxy_module(script=None, stream_large_bodies="1")


@pytest.fixture(params=["direct", "proxy"])
def client(request, plain_proxy) -> Iterator[httpx.Client]:
    with proxied_client(plain_proxy if request.param == "proxy" else None) as c:
        yield c


def stream_events(client: httpx.Client, url: str, req: dict, headers: dict | None = None) -> list:
    r = client.post(url, json=req, headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["transfer-encoding"] == "chunked"
    return parse_sse(r.content)


# ---- the echo model ---------------------------------------------------------------------


def test_expected_reply_text_rules():
    assert expected_reply_text(make_request(ANTHROPIC)) == f"{SYSTEM_TEXT}\n{USER_TEXT}"
    assert expected_reply_text(make_request(OPENAI_CHAT)) == f"{SYSTEM_TEXT}\n{USER_TEXT}"
    assert expected_reply_text(make_request(RESPONSES)) == f"{SYSTEM_TEXT}\n{USER_TEXT}"
    anthropic_tool_result = {"system": [{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}],
                             "messages": [{"role": "user", "content": "old"},
                                          {"role": "user", "content": [
                                              {"type": "tool_result", "tool_use_id": "t",
                                               "content": [{"type": "text", "text": "R"}]},
                                              {"type": "text", "text": "T"}]}]}
    assert expected_reply_text(anthropic_tool_result) == "S1\nS2\nR\nT"
    openai_tool = {"messages": [{"role": "developer", "content": "D"}, {"role": "user", "content": "U"},
                                {"role": "assistant", "content": None}, {"role": "tool", "content": "X"}]}
    assert expected_reply_text(openai_tool) == "D\nX"
    assert expected_reply_text({"input": "plain"}) == "plain"
    responses_tool = {"input": [{"role": "user", "content": "u"},
                                {"type": "function_call_output", "call_id": "c", "output": "O"}]}
    assert expected_reply_text(responses_tool) == "O"
    assert expected_reply_text({"messages": []}) == EMPTY_REPLY
    assert expected_tool_input(make_request(ANTHROPIC)) is None
    assert expected_tool_input(make_request(ANTHROPIC, tools=True)) == {"text": f"{SYSTEM_TEXT}\n{USER_TEXT}"}


# ---- endpoints, direct and through plain mitmdump ------------------------------------------


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
@pytest.mark.parametrize("api", [ANTHROPIC, OPENAI_CHAT, RESPONSES])
def test_non_streamed_reply(client, fake_upstream, api, tools):
    req = make_request(api, tools=tools)
    r = client.post(fake_upstream.url + PATHS[api], json=req)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    obj = r.json()
    assert obj["model"] == req["model"]
    assert {ANTHROPIC: "message", OPENAI_CHAT: "chat.completion", RESPONSES: "response"}[api] == (
        obj.get("type") if api == ANTHROPIC else obj["object"])
    parts = reply_parts(api, obj)
    assert parts.text == expected_reply_text(req)
    assert parts.tool_arguments == expected_tool_arguments(req)
    if tools:
        assert parts.tool_name == "lookup"
        assert parts.tool_input == expected_tool_input(req)
    recorded = fake_upstream.last_request
    assert recorded.json() == req
    assert recorded.path == PATHS[api]


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
@pytest.mark.parametrize("api", [ANTHROPIC, OPENAI_CHAT, RESPONSES])
def test_streamed_reply(client, fake_upstream, api, tools):
    req = make_request(api, stream=True, tools=tools)
    events = stream_events(client, fake_upstream.url + PATHS[api], req)
    parts = reassemble_stream(api, events)
    assert parts.complete and parts.error is None
    assert parts.text == expected_reply_text(req)
    assert parts.tool_arguments == expected_tool_arguments(req)
    if tools:
        assert parts.tool_name == "lookup"
    expected_first_last = {
        ANTHROPIC: ("message_start", "message_stop"),
        OPENAI_CHAT: ("chat.completion.chunk", "[DONE]"),
        RESPONSES: ("response.created", "response.completed"),
    }[api]
    assert (parts.event_types[0], parts.event_types[-1]) == expected_first_last
    if api == ANTHROPIC:
        assert "ping" in parts.event_types
        assert parts.event_types.count("content_block_start") == (2 if tools else 1)


def test_openai_include_usage(fake_upstream):
    req = make_request(OPENAI_CHAT, stream=True) | {"stream_options": {"include_usage": True}}
    with proxied_client(None) as c:
        events = stream_events(c, fake_upstream.url + PATHS[OPENAI_CHAT], req)
    assert events[-1].data == "[DONE]"
    assert events[-2].json()["choices"] == [] and events[-2].json()["usage"]["total_tokens"] > 0


# ---- knobs ------------------------------------------------------------------------------


@pytest.mark.parametrize("api", [ANTHROPIC, OPENAI_CHAT, RESPONSES])
def test_delta_chars_splits_text(client, fake_upstream, api):
    req = make_request(api, stream=True)
    events = stream_events(client, fake_upstream.url + PATHS[api], req, {"x-fake-delta-chars": "3"})
    deltas = []
    for ev in events:
        if ev.data == "[DONE]":
            continue
        d = ev.json()
        if api == ANTHROPIC and d["type"] == "content_block_delta":
            deltas.append(d["delta"]["text"])
        elif api == OPENAI_CHAT and d["choices"] and d["choices"][0]["delta"].get("content"):
            deltas.append(d["choices"][0]["delta"]["content"])
        elif api == RESPONSES and d["type"] == "response.output_text.delta":
            deltas.append(d["delta"])
    text = expected_reply_text(req)
    assert "".join(deltas) == text
    assert len(deltas) == math.ceil(len(text) / 3)
    assert all(len(d) == 3 for d in deltas[:-1])


def test_knob_attributes_and_clear(fake_upstream):
    req = make_request(ANTHROPIC, stream=True, text="abcdef")
    fake_upstream.set_knobs(delta_chars=1)
    with proxied_client(None) as c:
        events = stream_events(c, fake_upstream.url + "/v1/messages", req)
        n_deltas = sum(ev.event == "content_block_delta" for ev in events)
        assert n_deltas == len(expected_reply_text(req))
        # a header overrides the attribute
        events = stream_events(c, fake_upstream.url + "/v1/messages", req, {"x-fake-delta-chars": "1000"})
        assert sum(ev.event == "content_block_delta" for ev in events) == 1
        fake_upstream.clear()
        assert fake_upstream.requests == [] and fake_upstream.knobs.delta_chars == 16


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "zstd"])
def test_content_encoding(client, fake_upstream, encoding, stream):
    req = make_request(ANTHROPIC, stream=stream)
    with client.stream("POST", fake_upstream.url + "/v1/messages", json=req,
                       headers={"x-fake-encoding": encoding, "x-fake-delta-chars": "5"}) as r:
        assert r.status_code == 200
        assert r.headers["content-encoding"] == encoding
        raw = b"".join(r.iter_raw())
    body = decode_body(raw, encoding)  # the proxy must have left the encoded bytes untouched
    if stream:
        parts = reassemble_stream(ANTHROPIC, parse_sse(body))
    else:
        assert int(r.headers["content-length"]) == len(raw)
        parts = reply_parts(ANTHROPIC, json.loads(body))
    assert parts.text == expected_reply_text(req)


def test_httpx_decodes_gzip_stream(client, fake_upstream):
    req = make_request(RESPONSES, stream=True)
    events = stream_events(client, fake_upstream.url + "/v1/responses", req,
                           {"x-fake-encoding": "gzip", "x-fake-delta-chars": "2"})
    assert reassemble_stream(RESPONSES, events).text == expected_reply_text(req)


@pytest.mark.parametrize("api,status", [(ANTHROPIC, 429), (OPENAI_CHAT, 400), (RESPONSES, 500)])
def test_status_error_body(client, fake_upstream, api, status):
    req = make_request(api, stream=True)
    r = client.post(fake_upstream.url + PATHS[api], json=req, headers={"x-fake-status": str(status)})
    assert r.status_code == status
    body = r.json()
    assert body["error"]["message"] == expected_error_message(req)
    assert SECRET in body["error"]["message"]
    if api == ANTHROPIC:
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("api", [ANTHROPIC, OPENAI_CHAT, RESPONSES])
def test_error_event_mid_stream(client, fake_upstream, api):
    req = make_request(api, stream=True)
    events = stream_events(client, fake_upstream.url + PATHS[api], req,
                           {"x-fake-error-after": "5", "x-fake-delta-chars": "4"})
    assert len(events) == 6
    parts = reassemble_stream(api, events)
    assert not parts.complete
    assert parts.error["message"] == expected_error_message(req)
    assert expected_reply_text(req).startswith(parts.text)


def _time_first_delta(client: httpx.Client, url: str, req: dict, headers: dict) -> tuple[float, float, str]:
    parser = SSEParser()
    first = None
    text = []
    t0 = time.monotonic()
    with client.stream("POST", url, json=req, headers=headers) as r:
        for chunk in r.iter_bytes():
            for ev in parser.feed(chunk):
                if ev.event == "content_block_delta":
                    first = first if first is not None else time.monotonic() - t0
                    text.append(ev.json()["delta"]["text"])
    assert first is not None
    return first, time.monotonic() - t0, "".join(text)


@pytest.mark.parametrize("via", ["direct", "streaming-proxy"])
def test_pause_first_delta_arrives_early(fake_upstream, streaming_proxy, via):
    req = make_request(ANTHROPIC, stream=True, text="0123456789abcdefghij")
    headers = {"x-fake-pause-ms": "60", "x-fake-delta-chars": "3"}
    with proxied_client(streaming_proxy if via != "direct" else None) as c:
        first, total, text = _time_first_delta(c, fake_upstream.url + "/v1/messages", req, headers)
    assert text == expected_reply_text(req)
    assert total > 0.6  # ~20 writes with 60 ms pauses
    assert first < total - 0.4, (first, total)


def test_buffering_proxy_delivers_stream_at_once(fake_upstream, plain_proxy):
    """Documents mitmdump's default: without stream_large_bodies the whole SSE body is buffered."""
    req = make_request(ANTHROPIC, stream=True, text="0123456789")
    with proxied_client(plain_proxy) as c:
        first, total, text = _time_first_delta(c, fake_upstream.url + "/v1/messages", req,
                                               {"x-fake-pause-ms": "50", "x-fake-delta-chars": "2"})
    assert text == expected_reply_text(req)
    assert first > total - 0.1 and total > 0.3


def _raw_chunks(port: int, request: bytes) -> tuple[bytes, list[bytes]]:
    """Send a raw HTTP/1.1 request, return (response head, list of chunk payloads)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        f = s.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += f.readline()
        chunks = []
        while True:
            size = int(f.readline().strip(), 16)
            if size == 0:
                f.readline()
                return head, chunks
            chunks.append(f.read(size))
            assert f.read(2) == b"\r\n"


def test_chunk_bytes_recuts_stream(fake_upstream):
    req = make_request(OPENAI_CHAT, stream=True)
    body = json.dumps(req).encode()
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"x-fake-chunk-bytes: 7\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    head, chunks = _raw_chunks(fake_upstream.port, raw)
    assert b"transfer-encoding: chunked" in head.lower()
    assert all(len(c) == 7 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 7
    stream = b"".join(chunks)
    assert reassemble_stream(OPENAI_CHAT, parse_sse(stream)).text == expected_reply_text(req)


def test_chunk_bytes_one_byte_through_proxy(client, fake_upstream):
    """1-byte writes split every multi-byte UTF-8 character; the client still reassembles exactly."""
    req = make_request(RESPONSES, stream=True, text="ünïcødé ✓ 🎉 " + SECRET)
    events = stream_events(client, fake_upstream.url + "/v1/responses", req,
                           {"x-fake-chunk-bytes": "1", "x-fake-delta-chars": "4"})
    assert reassemble_stream(RESPONSES, events).text == expected_reply_text(req)


def test_reset_after_direct(fake_upstream):
    req = make_request(ANTHROPIC, stream=True)
    parser = SSEParser()
    got = []
    with proxied_client(None) as c, pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        with c.stream("POST", fake_upstream.url + "/v1/messages", json=req,
                      headers={"x-fake-reset-after": "5"}) as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                got += parser.feed(chunk)
    assert [e.event for e in got] == ["message_start", "content_block_start", "ping",
                                      "content_block_delta", "content_block_delta"]


def test_reset_after_through_proxies(fake_upstream, plain_proxy, streaming_proxy):
    """Documents mitmdump: buffering -> 502 error page; streaming -> truncated chunked body."""
    req = make_request(ANTHROPIC, stream=True)
    headers = {"x-fake-reset-after": "5"}
    with proxied_client(plain_proxy) as c:
        r = c.post(fake_upstream.url + "/v1/messages", json=req, headers=headers)
        assert r.status_code == 502
    with proxied_client(streaming_proxy) as c, pytest.raises(httpx.RemoteProtocolError):
        with c.stream("POST", fake_upstream.url + "/v1/messages", json=req, headers=headers) as r:
            assert r.status_code == 200
            for _ in r.iter_bytes():
                pass


def test_reset_after_non_streamed_bytes(fake_upstream):
    with proxied_client(None) as c, pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        c.post(fake_upstream.url + "/v1/messages", json=make_request(ANTHROPIC),
               headers={"x-fake-reset-after": "10"})


# ---- echo / pass-through -----------------------------------------------------------------


def test_echo_roundtrips_bytes(client, fake_upstream):
    payload = bytes(range(256)) + os.urandom(64 * 1024) + SECRET.encode()
    r = client.post(fake_upstream.url + "/echo", content=payload,
                    headers={"content-type": "application/x-test; charset=latin-1"})
    assert r.status_code == 200
    assert r.content == payload
    assert r.headers["content-type"] == "application/x-test; charset=latin-1"
    assert fake_upstream.last_request.body == payload
    # JSON on an unknown path is echoed too, byte-for-byte (no re-serialization)
    doc = b'{"b": 1,   "a": "' + SECRET.encode() + b'"}'
    r = client.put(fake_upstream.url + "/v1/other?x=1", content=doc,
                   headers={"content-type": "application/json"})
    assert r.content == doc
    r = client.get(fake_upstream.url + "/anything")
    assert r.status_code == 200 and r.content == b""
    # GET on an LLM route is not the model either
    r = client.get(fake_upstream.url + "/v1/messages")
    assert r.content == b""


def test_echo_knobs(client, fake_upstream):
    payload = b"x" * 1000 + SECRET.encode()
    r = client.post(fake_upstream.url + "/echo", content=payload,
                    headers={"x-fake-chunk-bytes": "100", "x-fake-encoding": "gzip", "x-fake-status": "201"})
    assert r.status_code == 201
    assert r.headers["transfer-encoding"] == "chunked" and r.headers["content-encoding"] == "gzip"
    assert r.content == payload


def test_proxy_forwards_origin_form_and_same_headers(fake_upstream, plain_proxy):
    """What a plain-HTTP proxy request from httpx looks like after mitmdump: origin-form target,
    header names/order/case and body unchanged, nothing added (no Via / X-Forwarded-For)."""
    seen = []
    for proxy in (None, plain_proxy):
        with proxied_client(proxy) as c:
            c.post(fake_upstream.url + "/echo?q=1", content=b"body",
                   headers={"X-Mixed-Case": "v", "content-type": "text/plain"})
        seen.append(fake_upstream.last_request)
    direct, proxied = seen
    assert proxied.target == "/echo?q=1" and proxied.http_version == "HTTP/1.1"
    assert proxied.headers == direct.headers
    assert proxied.body == direct.body == b"body"


# ---- MitmProxy runner ----------------------------------------------------------------------


def test_option_args():
    assert option_args({"a": 1, "b": True, "hosts": ["h1", "h2:80"], "empty": []}) == [
        "--set", "a=1", "--set", "b=true", "--set", "hosts=h1", "--set", "hosts=h2:80", "--set", "empty"]


def test_mitmproxy_lifecycle(start_proxy, fake_upstream, tmp_path: Path):
    proxy = start_proxy(script=None)
    assert proxy.running and proxy.ca_cert_path.exists()
    assert proxy.find_log(rf"proxy listening at \*:{proxy.port}\.")
    assert proxy.rss_kib() > 10_000
    mark = proxy.mark()
    port = proxy.port
    with proxied_client(proxy) as c:
        assert c.post(fake_upstream.url + "/echo", content=b"hi").content == b"hi"
    assert "/echo" in proxy.wait_for_log(r"POST http://127\.0\.0\.1:\d+/echo", since=mark)
    proxy.restart()
    assert proxy.running and proxy.port == port and proxy.starts == 2
    with proxied_client(proxy) as c:
        assert c.post(fake_upstream.url + "/echo", content=b"again").content == b"again"
    assert proxy.stop() == 0 and not proxy.running
    with pytest.raises(TimeoutError):
        proxy.wait_for_log("never printed", timeout=0.2)


def test_mitmproxy_broken_script_fails_clearly(start_proxy, tmp_path: Path):
    script = tmp_path / "broken.py"
    script.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(MitmProxyError, match=r"(?s)exited during startup.*boom at import"):
        start_proxy(script=script)
