"""The official SDKs (anthropic, openai) and curl, end to end over HTTPS through a real mitmdump with the
addon.

Nothing here is insecure: the fake upstream serves TLS with its own test CA (``make_test_ca``), which
mitmdump trusts through ``ssl_verify_upstream_trusted_ca``; the clients trust only mitmproxy's CA from the
test confdir. Every reply must carry the ORIGINAL identifiers exactly, the SDK's own SSE parser and stream
accumulators must accept every restored stream, and the fake upstream must never see an original.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pydantic
import pytest

from conftest import cleared, masker_options
from fake_upstream import RESPONSES, FakeUpstream, build_reply, expected_reply_text, expected_tool_arguments
from proxyproc import MitmProxy
from test_proxy import ORIGINALS as PROXY_ORIGINALS
from tlsutil import make_test_ca

pytestmark = pytest.mark.mitm

ORIGINALS = [*PROXY_ORIGINALS, "vpc-0a1b2c3d4e5f67890"]
TEXT = ("Why can't arn:aws:iam::123456789012:role/DeployRole reach i-0a1b2c3d4e5f60718?\n"
        "It sits in sg-0123456789abcdef0 / subnet-0f0e0d0c0b0a09080 (vpc-0a1b2c3d4e5f67890) at 10.20.30.40, "
        "key AKIAIOSFODNN7EXAMPLE. Region us-east-1, type m5.large — \"quoted\" \\ ünïcødé ✓")
SYSTEM = "You help with account 123456789012 in us-east-1."

ANTHROPIC_TOOL = {"name": "lookup", "description": "Look a resource up",
                  "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}}
CHAT_TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a resource up",
                                              "parameters": {"type": "object",
                                                             "properties": {"text": {"type": "string"}}}}}
RESPONSES_TOOL = {"type": "function", "name": "lookup", "description": "Look a resource up", "strict": False,
                  "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_upstream_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeUpstream, Path]]:
    ca = make_test_ca(tmp_path_factory.mktemp("upstream-ca"))
    with FakeUpstream(ssl_context=ca.server_context()) as upstream:
        yield upstream, ca.ca_path


@pytest.fixture
def upstream(tls_upstream_module: tuple[FakeUpstream, Path]) -> Iterator[FakeUpstream]:
    yield from cleared(tls_upstream_module[0])


@pytest.fixture(scope="module")
def proxy(start_proxy_module: Any, tls_upstream_module: tuple[FakeUpstream, Path]) -> MitmProxy:
    up, ca_path = tls_upstream_module
    assert up.scheme == "https"
    return start_proxy_module(**masker_options(up, ssl_verify_upstream_trusted_ca=str(ca_path)))


@pytest.fixture(scope="module")
def mitm_ca(proxy: MitmProxy) -> ssl.SSLContext:
    """Trusts mitmproxy's CA only (not the upstream's test CA, not the system roots)."""
    assert proxy.ca_cert_path.exists()
    return ssl.create_default_context(cafile=str(proxy.ca_cert_path))


@pytest.fixture
def claude(proxy: MitmProxy, mitm_ca: ssl.SSLContext,
           tls_upstream_module: tuple[FakeUpstream, Path]) -> Iterator[anthropic.Anthropic]:
    """Strict response validation (the SDK's pydantic models must accept every reply and event)."""
    up = tls_upstream_module[0]
    http = anthropic.DefaultHttpxClient(proxy=proxy.url, verify=mitm_ca, trust_env=False)
    with anthropic.Anthropic(base_url=up.url, api_key="test", http_client=http, max_retries=0,
                             timeout=30, _strict_response_validation=True) as client:
        yield client


def _fake_responses_pass_strict_validation() -> bool:
    """Whether the fake upstream's Responses object has every field this SDK version requires.

    openai 3.57 requires ``usage.input_tokens_details.cache_write_tokens``, which tests/fake_upstream.py
    does not send yet; until it does, the Responses tests use the SDK's default (lenient) parsing.
    Anthropic and Chat Completions replies are always validated strictly.
    """
    try:
        openai.types.responses.Response.model_validate(build_reply(RESPONSES, responses_req(tools=True)))
    except pydantic.ValidationError:
        return False
    return True


@pytest.fixture(scope="module")
def strict_responses() -> bool:
    return _fake_responses_pass_strict_validation()


@pytest.fixture
def gpt(request: pytest.FixtureRequest, proxy: MitmProxy, mitm_ca: ssl.SSLContext,
        tls_upstream_module: tuple[FakeUpstream, Path], strict_responses: bool) -> Iterator[openai.OpenAI]:
    """Strict response validation (the SDK's pydantic models must accept every reply and event)."""
    up = tls_upstream_module[0]
    strict = strict_responses or "responses" not in request.node.name
    http = openai.DefaultHttpxClient(proxy=proxy.url, verify=mitm_ca, trust_env=False)
    with openai.OpenAI(base_url=up.url + "/v1", api_key="test", http_client=http, max_retries=0,
                       timeout=30, _strict_response_validation=strict) as client:
        yield client


# ---- helpers ----------------------------------------------------------------------------------


def assert_masked_upstream(up: FakeUpstream, n: int = 1) -> None:
    """``n`` requests reached the upstream, masked: no original, placeholders instead."""
    assert len(up.requests) == n, [r.path for r in up.requests]
    for rec in up.requests:
        raw = rec.body + rec.content
        leaked = [o for o in ORIGINALS if o.encode() in raw]
        assert not leaked, f"originals reached the upstream: {leaked}"
        assert b"AWS_ACCOUNT_" in rec.content and b"AWS_EC2_INSTANCE_" in rec.content
        assert rec.header("authorization") or rec.header("x-api-key")


def assert_exact(text: str, req: dict[str, Any]) -> None:
    expected = expected_reply_text(req)
    assert text == expected
    assert "AWS_" not in text and all(o in text for o in ORIGINALS)


def anthropic_req(tools: bool = False) -> dict[str, Any]:
    req: dict[str, Any] = {"model": "claude-test", "max_tokens": 200, "system": SYSTEM,
                           "messages": [{"role": "user", "content": [{"type": "text", "text": TEXT}]}]}
    if tools:
        req["tools"] = [ANTHROPIC_TOOL]
    return req


def chat_req(tools: bool = False) -> dict[str, Any]:
    req: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "system", "content": SYSTEM},
                                                             {"role": "user", "content": TEXT}]}
    if tools:
        req["tools"] = [CHAT_TOOL]
    return req


def responses_req(tools: bool = False) -> dict[str, Any]:
    req: dict[str, Any] = {"model": "gpt-test", "instructions": SYSTEM,
                           "input": [{"role": "user", "content": [{"type": "input_text", "text": TEXT}]}]}
    if tools:
        req["tools"] = [RESPONSES_TOOL]
    return req


DELTAS = {"x-fake-delta-chars": "3", "x-fake-chunk-bytes": "11"}  # placeholders cut across deltas and chunks


# ---- Anthropic --------------------------------------------------------------------------------


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
def test_anthropic_messages_create(claude: anthropic.Anthropic, upstream: FakeUpstream, tools: bool) -> None:
    req = anthropic_req(tools)
    msg = claude.messages.create(**req)
    assert_masked_upstream(upstream)
    assert msg.type == "message" and msg.stop_reason == ("tool_use" if tools else "end_turn")
    text = "".join(b.text for b in msg.content if b.type == "text")
    assert_exact(text, req)
    uses = [b for b in msg.content if b.type == "tool_use"]
    if tools:
        assert len(uses) == 1 and uses[0].name == "lookup"
        assert uses[0].input == {"text": expected_reply_text(req)}
    else:
        assert uses == []


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
def test_anthropic_messages_stream(claude: anthropic.Anthropic, upstream: FakeUpstream, tools: bool) -> None:
    req = anthropic_req(tools)
    json_parts: list[str] = []
    with claude.messages.stream(**req, extra_headers=DELTAS) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    for ev in final.content:
        if ev.type == "tool_use":
            json_parts.append(json.dumps(ev.input, ensure_ascii=False))
    assert_masked_upstream(upstream)
    assert_exact(text, req)
    assert_exact("".join(b.text for b in final.content if b.type == "text"), req)
    assert final.stop_reason == ("tool_use" if tools else "end_turn")
    uses = [b for b in final.content if b.type == "tool_use"]
    if tools:
        # the SDK's accumulator parsed the restored partial_json deltas into the tool input
        assert len(uses) == 1 and uses[0].name == "lookup"
        assert uses[0].input == {"text": expected_reply_text(req)}
        assert json_parts == [expected_tool_arguments(req)]
    else:
        assert uses == []


def test_anthropic_raw_stream_events(claude: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    """``messages.create(stream=True)``: every raw event is parsed by the SDK, deltas concatenate exactly."""
    req = anthropic_req(tools=True)
    kinds: list[str] = []
    text: list[str] = []
    partial: list[str] = []
    with claude.messages.create(**req, stream=True, extra_headers={"x-fake-delta-chars": "1"}) as events:
        for ev in events:
            kinds.append(ev.type)
            if ev.type == "content_block_delta":
                if ev.delta.type == "text_delta":
                    text.append(ev.delta.text)
                elif ev.delta.type == "input_json_delta":
                    partial.append(ev.delta.partial_json)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert_exact("".join(text), req)
    assert "".join(partial) == expected_tool_arguments(req)


# ---- OpenAI Chat Completions ------------------------------------------------------------------


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
def test_openai_chat_create(gpt: openai.OpenAI, upstream: FakeUpstream, tools: bool) -> None:
    req = chat_req(tools)
    done = gpt.chat.completions.create(**req)
    assert_masked_upstream(upstream)
    msg = done.choices[0].message
    assert_exact(msg.content or "", req)
    if tools:
        assert msg.tool_calls and msg.tool_calls[0].function.arguments == expected_tool_arguments(req)


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
def test_openai_chat_create_stream(gpt: openai.OpenAI, upstream: FakeUpstream, tools: bool) -> None:
    req = chat_req(tools)
    text: list[str] = []
    args: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    finish = None
    usage = None
    stream = gpt.chat.completions.create(**req, stream=True, stream_options={"include_usage": True},
                                         extra_headers=DELTAS)
    with stream:
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    text.append(choice.delta.content)
                for call in choice.delta.tool_calls or []:
                    if call.function and call.function.name:
                        names[call.index] = call.function.name
                    if call.function and call.function.arguments is not None:
                        args.setdefault(call.index, []).append(call.function.arguments)
                finish = choice.finish_reason or finish
    assert_masked_upstream(upstream)
    assert_exact("".join(text), req)
    assert usage is not None and finish == ("tool_calls" if tools else "stop")
    if tools:
        assert names == {0: "lookup"}
        assert "".join(args[0]) == expected_tool_arguments(req)
        assert json.loads("".join(args[0])) == {"text": expected_reply_text(req)}
    else:
        assert args == {}


def test_openai_chat_stream_helper(gpt: openai.OpenAI, upstream: FakeUpstream) -> None:
    """``chat.completions.stream``: the SDK's own accumulator builds the final completion."""
    req = chat_req(tools=True)
    with gpt.chat.completions.stream(**req, extra_headers=DELTAS) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert_masked_upstream(upstream)
    msg = final.choices[0].message
    assert_exact(msg.content or "", req)
    assert msg.tool_calls and msg.tool_calls[0].function.arguments == expected_tool_arguments(req)


# ---- OpenAI Responses -------------------------------------------------------------------------


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
def test_openai_responses_create(gpt: openai.OpenAI, upstream: FakeUpstream, tools: bool) -> None:
    req = responses_req(tools)
    resp = gpt.responses.create(**req)
    assert_masked_upstream(upstream)
    assert_exact(resp.output_text, req)
    calls = [o for o in resp.output if o.type == "function_call"]
    if tools:
        assert len(calls) == 1 and calls[0].arguments == expected_tool_arguments(req)


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
def test_openai_responses_create_stream(gpt: openai.OpenAI, upstream: FakeUpstream, tools: bool) -> None:
    req = responses_req(tools)
    kinds: list[str] = []
    text: list[str] = []
    args: list[str] = []
    done_text = done_args = None
    completed = None
    with gpt.responses.create(**req, stream=True, extra_headers=DELTAS) as events:
        for ev in events:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text.append(ev.delta)
            elif ev.type == "response.output_text.done":
                done_text = ev.text
            elif ev.type == "response.function_call_arguments.delta":
                args.append(ev.delta)
            elif ev.type == "response.function_call_arguments.done":
                done_args = ev.arguments
            elif ev.type == "response.completed":
                completed = ev.response
    assert_masked_upstream(upstream)
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert_exact("".join(text), req)
    assert done_text == expected_reply_text(req)
    assert completed is not None
    assert_exact(completed.output_text, req)
    if tools:
        assert "".join(args) == done_args == expected_tool_arguments(req)
        calls = [o for o in completed.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].arguments == expected_tool_arguments(req)
    else:
        assert args == [] and done_args is None


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
def test_openai_responses_stream_helper(gpt: openai.OpenAI, upstream: FakeUpstream, tools: bool) -> None:
    """``responses.stream``: the SDK's accumulator checks the restored deltas against its snapshot."""
    req = responses_req(tools)
    text: list[str] = []
    with gpt.responses.stream(**req, extra_headers=DELTAS) as stream:
        for ev in stream:
            if ev.type == "response.output_text.delta":
                text.append(ev.delta)
        final = stream.get_final_response()
    assert_masked_upstream(upstream)
    assert_exact("".join(text), req)
    assert_exact(final.output_text, req)
    calls = [o for o in final.output if o.type == "function_call"]
    if tools:
        assert len(calls) == 1 and calls[0].arguments == expected_tool_arguments(req)
        assert json.loads(calls[0].arguments) == {"text": expected_reply_text(req)}
    else:
        assert calls == []


# ---- curl (the README's example shape) -------------------------------------------------------


def test_curl_readme_example(proxy: MitmProxy, upstream: FakeUpstream) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not found on PATH")
    text = "Repeat exactly: i-0123456789abcdef0 in arn:aws:iam::123456789012:role/Deploy"
    req = {"model": "claude-sonnet-4-5", "max_tokens": 200, "messages": [{"role": "user", "content": text}]}
    out = subprocess.run(
        [curl, "-sS", "--fail-with-body", "--max-time", "20", "--proxy", proxy.url,
         "--cacert", str(proxy.ca_cert_path), upstream.url_for("/v1/messages"),
         "-H", "x-api-key: test", "-H", "anthropic-version: 2023-06-01",
         "-H", "content-type: application/json",
         "-d", json.dumps(req)],
        capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert out.returncode == 0, out.stderr.decode(errors="replace") + out.stdout.decode(errors="replace")
    reply = json.loads(out.stdout)
    assert reply["content"][0]["text"] == expected_reply_text(req)
    assert "i-0123456789abcdef0" in reply["content"][0]["text"]
    sent = upstream.last_request.content
    assert b"i-0123456789abcdef0" not in sent and b"123456789012" not in sent
    assert b"AWS_EC2_INSTANCE_" in sent and b"arn:aws:iam::AWS_ACCOUNT_" in sent


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_curl_over_http2_round_trip(start_proxy: Any, upstream: FakeUpstream,
                                    tls_upstream_module: tuple[FakeUpstream, Path], stream: bool) -> None:
    """HTTP/2 between client and proxy (curl negotiates h2 when the proxy offers it; mitmproxy offers it when
    it does not first ask the upstream, which speaks HTTP/1.1 here): masked, restored, SSE included."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not found on PATH")
    proxy = start_proxy(**masker_options(upstream, ssl_verify_upstream_trusted_ca=str(tls_upstream_module[1]),
                                         connection_strategy="lazy", upstream_cert="false"))
    text = "Repeat exactly: i-0123456789abcdef0 in arn:aws:iam::123456789012:role/Deploy"
    req = {"model": "claude-sonnet-4-5", "max_tokens": 200, "stream": stream,
           "messages": [{"role": "user", "content": text}]}
    out = subprocess.run(
        [curl, "-sS", "--http2", "--fail-with-body", "--max-time", "20", "--proxy", proxy.url,
         "--cacert", str(proxy.ca_cert_path), upstream.url_for("/v1/messages"), "-w", "\n%{http_version}",
         "-H", "x-api-key: test", "-H", "content-type: application/json", "-d", json.dumps(req)],
        capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert out.returncode == 0, out.stderr.decode(errors="replace") + out.stdout.decode(errors="replace")
    body, _, version = out.stdout.rpartition(b"\n")
    assert version == b"2"
    if stream:
        deltas = [json.loads(line[5:])["delta"].get("text", "") for line in body.splitlines()
                  if line.startswith(b"data:") and b'"content_block_delta"' in line]
        assert "".join(deltas) == expected_reply_text(req)
    else:
        assert json.loads(body)["content"][0]["text"] == expected_reply_text(req)
    sent = upstream.last_request.content
    assert b"i-0123456789abcdef0" not in sent and b"123456789012" not in sent and b"AWS_ACCOUNT_" in sent


def test_upstream_certificate_is_verified(start_proxy: Any, upstream: FakeUpstream, mitm_ca: ssl.SSLContext,
                                          proxy: MitmProxy) -> None:
    """Control: a proxy that does not trust the upstream's test CA refuses the upstream (no ssl_insecure
    anywhere), so the passing tests above really ran over verified TLS on both legs."""
    untrusting = start_proxy(**masker_options(upstream))
    http = anthropic.DefaultHttpxClient(proxy=untrusting.url, verify=mitm_ca, trust_env=False)
    with anthropic.Anthropic(base_url=upstream.url, api_key="test", http_client=http, max_retries=0,
                             timeout=15) as client, pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(**anthropic_req())
    assert err.value.status_code == 502
    assert upstream.requests == []


def test_readme_environment_setup_for_python_sdks(proxy: MitmProxy, upstream: FakeUpstream,
                                                  tmp_path: Path) -> None:
    """The README's setup for Python SDKs, in a fresh process: HTTPS_PROXY plus SSL_CERT_FILE pointing at a
    bundle of the usual roots and mitmproxy's CA; the SDKs use their default HTTP clients."""
    import certifi

    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + proxy.ca_cert_path.read_bytes())
    req = anthropic_req()
    script = f"""
import json, sys, anthropic, openai
req = json.loads(sys.argv[1])
a = anthropic.Anthropic(base_url={upstream.url!r}, api_key="test", max_retries=0, timeout=20)
print(json.dumps(a.messages.create(**req).content[0].text))
o = openai.OpenAI(base_url={upstream.url + "/v1"!r}, api_key="test", max_retries=0, timeout=20)
text = req["messages"][0]["content"][0]["text"]
chunks = o.chat.completions.create(model="gpt-test", messages=[{{"role": "user", "content": text}}],
                                   stream=True)
print(json.dumps("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)))
"""
    env = {"PATH": "/usr/bin:/bin", "HTTPS_PROXY": proxy.url, "SSL_CERT_FILE": str(bundle),
           "REQUESTS_CA_BUNDLE": str(bundle), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(req)], capture_output=True, timeout=60,
                         env=env, check=False)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    first, second = (json.loads(line) for line in out.stdout.decode().splitlines())
    assert_exact(first, req)
    assert second == TEXT
    assert_masked_upstream(upstream, 2)
