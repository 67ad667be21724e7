"""End to end through a real mitmdump with the addon: masking, exact restore, pass-through, fail-closed.

The fake upstream records what reaches it (it must never see an original) and echoes the request's text back,
so the client must get its originals back exactly.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import socket
import ssl
import zlib

import httpx
import pytest

from conftest import masker_options, proxied_client
from fake_upstream import (
    ANTHROPIC,
    COHERE,
    GEMINI,
    OPENAI_CHAT,
    RESPONSES,
    FakeUpstream,
    expected_reply_text,
    gemini_path,
    reply_parts,
    request_for,
)
from proxyproc import REPO, MitmProxyError
from tlsutil import make_test_ca

pytestmark = pytest.mark.mitm

PATHS = {ANTHROPIC: "/v1/messages", OPENAI_CHAT: "/v1/chat/completions", RESPONSES: "/v1/responses",
         GEMINI: gemini_path(), COHERE: "/v2/chat"}
STREAM_PATHS = {**PATHS, GEMINI: gemini_path(stream=True)}  # Gemini streams by route, the others by body
ORIGINALS = [
    "123456789012",
    "i-0a1b2c3d4e5f60718",
    "DeployRole",
    "sg-0123456789abcdef0",
    "AKIAIOSFODNN7EXAMPLE",
    "10.20.30.40",
    "subnet-0f0e0d0c0b0a09080",
]
TEXT = ("Why can't arn:aws:iam::123456789012:role/DeployRole reach i-0a1b2c3d4e5f60718?\n"
        "It sits in sg-0123456789abcdef0 / subnet-0f0e0d0c0b0a09080 at 10.20.30.40, "
        "key AKIAIOSFODNN7EXAMPLE. "
        "Region us-east-1, type m5.large — \"quoted\" ünïcødé ✓")
SYSTEM = "You help with account 123456789012 in us-east-1."


def make_request(api: str, text: str = TEXT, *, tools: bool = False) -> dict:
    return request_for(api, text, system=SYSTEM, tools=tools)


def assert_no_original(upstream: FakeUpstream, originals: list[str] = ORIGINALS) -> None:
    for rec in upstream.requests:
        raw = rec.body + rec.content
        leaked = [o for o in originals if o.encode() in raw]
        assert not leaked, f"originals reached the upstream: {leaked}"


@pytest.fixture(scope="module")
def proxy(start_proxy_module, fake_upstream_module):
    return start_proxy_module(**masker_options(fake_upstream_module))


@pytest.fixture
def client(proxy):
    with proxied_client(proxy) as c:
        yield c


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
@pytest.mark.parametrize("api", [ANTHROPIC, OPENAI_CHAT, RESPONSES, GEMINI, COHERE])
def test_non_streamed_round_trip_is_exact(client, fake_upstream, api, tools) -> None:
    req = make_request(api, tools=tools)
    r = client.post(fake_upstream.url_for(PATHS[api]), json=req)
    assert r.status_code == 200, r.text
    assert_no_original(fake_upstream)
    sent = fake_upstream.last_request.json()
    assert "AWS_ACCOUNT_" in json.dumps(sent) and "AWS_EC2_INSTANCE_" in json.dumps(sent)
    assert "us-east-1" in json.dumps(sent) and "m5.large" in json.dumps(sent)
    parts = reply_parts(api, r.json())
    assert parts.text == expected_reply_text(req)
    if tools:
        assert parts.tool_input == {"text": expected_reply_text(req)}


def test_structured_tool_input_values_are_masked_by_their_keys(client, fake_upstream) -> None:
    """A tool call's input object: a secret key and account IDs recognisable only by their keys."""
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    tool_input = {"aws_secret_access_key": secret, "AccountId": "444455556666",
                  "Principal": {"AWS": ["arn:aws:iam::111122223333:root", "777788889999"]}}
    req = make_request(ANTHROPIC)
    req["messages"] += [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "aws",
                                           "input": tool_input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"}]},
    ]
    r = client.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=req)
    assert r.status_code == 200, r.text
    assert_no_original(fake_upstream, [*ORIGINALS, secret, "444455556666", "111122223333", "777788889999"])
    sent = fake_upstream.last_request.json()["messages"][1]["content"][0]["input"]
    assert sent["AccountId"].startswith("AWS_ACCOUNT_")
    assert sent["Principal"]["AWS"][1].startswith("AWS_ACCOUNT_")
    assert reply_parts(ANTHROPIC, r.json()).text == expected_reply_text(req)


def test_a_text_document_sent_as_base64_is_masked_inside(client, fake_upstream) -> None:
    secret = "i-0a1b2c3d4e5f60718 behind 10.20.30.40"
    req = make_request(ANTHROPIC)
    req["messages"][0]["content"].insert(0, {"type": "document", "source": {
        "type": "base64", "media_type": "text/plain", "data": base64.b64encode(secret.encode()).decode()}})
    r = client.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=req)
    assert r.status_code == 200, r.text
    assert_no_original(fake_upstream)
    sent = fake_upstream.last_request.json()["messages"][0]["content"][0]["source"]["data"]
    assert re.fullmatch(rb"AWS_EC2_INSTANCE_\d{4,} behind AWS_IPV4_\d{4,}", base64.b64decode(sent))


def test_gzip_reply_is_restored(client, fake_upstream) -> None:
    req = make_request(ANTHROPIC)
    r = client.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=req, headers={"x-fake-encoding": "gzip"})
    assert r.status_code == 200
    assert reply_parts(ANTHROPIC, r.json()).text == expected_reply_text(req)


def test_error_reply_with_placeholders_is_restored(client, fake_upstream) -> None:
    req = make_request(ANTHROPIC)
    r = client.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=req, headers={"x-fake-status": "400"})
    assert r.status_code == 400
    assert "i-0a1b2c3d4e5f60718" in r.json()["error"]["message"]
    assert "AWS_" not in r.text


def test_same_identifier_same_placeholder_across_requests(client, fake_upstream) -> None:
    for _ in range(2):
        client.post(fake_upstream.url_for("/echo"), content=b"ping i-0a1b2c3d4e5f60718",
                    headers={"content-type": "text/plain"})
    first, second = (r.body for r in fake_upstream.requests)
    assert first == second and b"AWS_EC2_INSTANCE_" in first


def test_hosts_outside_masker_hosts_pass_byte_for_byte(client, fake_upstream) -> None:
    with FakeUpstream() as other:
        body = json.dumps(make_request(ANTHROPIC)).encode()
        r = client.post(other.url_for("/echo"), content=body,
                        headers={"content-type": "application/json", "x-custom": "i-0a1b2c3d4e5f60718"})
        assert r.status_code == 200 and r.content == body
        rec = other.last_request
        assert rec.body == body and rec.header("x-custom") == "i-0a1b2c3d4e5f60718"
    assert fake_upstream.requests == []


def test_https_to_other_hosts_is_tunnelled_without_interception(proxy, tmp_path) -> None:
    """TLS to a host that is not masked is not intercepted: the client, which trusts only the upstream's own
    CA (not mitmproxy's), sees the upstream's certificate, and the body arrives as sent."""
    ca = make_test_ca(tmp_path)
    with FakeUpstream(ssl_context=ca.server_context()) as other, \
            httpx.Client(proxy=proxy.url, verify=ssl.create_default_context(cafile=ca.ca_path),
                         trust_env=False, timeout=10) as c:
        body = b"hello i-0a1b2c3d4e5f60718 raw bytes"
        r = c.post(other.url_for("/echo"), content=body, headers={"content-type": "text/plain"})
        assert r.status_code == 200 and r.content == body
        assert other.last_request.body == body


# ---- bodies that are hard to mask ------------------------------------------------------------


def post_raw(client: httpx.Client, upstream: FakeUpstream, body: bytes, **headers: str) -> httpx.Response:
    return client.post(upstream.url_for("/echo"), content=body, headers=headers)


def test_gzip_request_body_is_decoded_masked_and_reencoded(client, fake_upstream) -> None:
    body = json.dumps(make_request(ANTHROPIC)).encode()
    r = post_raw(client, fake_upstream, gzip.compress(body), **{"content-type": "application/json",
                                                               "content-encoding": "gzip"})
    assert r.status_code == 200
    rec = fake_upstream.last_request
    assert rec.header("content-encoding") == "gzip"
    assert_no_original(fake_upstream)
    assert json.loads(gzip.decompress(rec.body))["system"].startswith("You help with account AWS_ACCOUNT_")


@pytest.mark.parametrize(("name", "body", "ctype"), [
    ("malformed-json", b'{"messages": [{"content": "' + TEXT.encode() + b'" ,, }', "application/json"),
    ("invalid-utf8", b"\xff\xfe" + TEXT.encode() + b"\xc3\x28 \x80", "text/plain"),
    ("form", ("q=" + TEXT).encode().replace(b" ", b"+"), "application/x-www-form-urlencoded"),
    ("deep-json", b'{"a":' * 5000 + json.dumps(TEXT).encode() + b"}" * 5000, "application/json"),
    ("no-content-type", TEXT.encode(), ""),
    # JSON Lines (a batch file): masked as text, every identifier right after an escaped newline
    ("json-lines", b"\n".join(json.dumps({"custom_id": str(i), "content": TEXT.replace(" ", "\n")}).encode()
                              for i in range(2)) + b"\n", "application/jsonl"),
])
def test_awkward_bodies_leak_nothing_and_proxy_survives(client, fake_upstream, name, body, ctype) -> None:
    headers = {"content-type": ctype} if ctype else {}
    r = post_raw(client, fake_upstream, body, **headers)
    assert r.status_code == 200, r.text
    assert_no_original(fake_upstream)
    # The echo endpoint sends the masked body back; the client gets its original body back (a JSON body
    # that was re-serialised may differ in escaping only).
    if name == "deep-json":
        assert json.loads(r.content) == json.loads(body)
    elif name != "form":
        assert r.content == body
    fake_upstream.clear()
    r = client.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=make_request(ANTHROPIC))
    assert r.status_code == 200


# ---- fail-closed --------------------------------------------------------------------------------


def assert_blocked(r: httpx.Response, status: int, needle: str, upstream: FakeUpstream) -> None:
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["message"].startswith("aws-masker: ")
    assert needle in err["error"]["message"]
    assert upstream.requests == [], "a blocked request reached the upstream"


@pytest.fixture(scope="module")
def small_proxy(start_proxy_module, fake_upstream_module):
    return start_proxy_module(**masker_options(fake_upstream_module, masker_max_body="2000"))


def test_too_large_body_is_refused_with_413(small_proxy, fake_upstream) -> None:
    with proxied_client(small_proxy) as c:
        body = b"x" * 3000 + b" i-0a1b2c3d4e5f60718"
        r = post_raw(c, fake_upstream, body, **{"content-type": "text/plain"})
        assert_blocked(r, 413, "masker_max_body", fake_upstream)


def test_decompression_bomb_is_refused_with_413(small_proxy, fake_upstream) -> None:
    with proxied_client(small_proxy) as c:
        bomb = gzip.compress(b"A" * 100_000 + b" i-0a1b2c3d4e5f60718")
        assert len(bomb) < 2000
        r = post_raw(c, fake_upstream, bomb, **{"content-type": "text/plain", "content-encoding": "gzip"})
        assert_blocked(r, 413, "decompressed", fake_upstream)


@pytest.mark.parametrize(("encoding", "body"), [
    ("snappy", b"i-0a1b2c3d4e5f60718"),
    ("gzip", b"\x1f\x8b not really gzip i-0a1b2c3d4e5f60718"),
    ("deflate", zlib.compress(b"i-0a1b2c3d4e5f60718")[:-6]),
])
def test_undecodable_body_is_refused_with_415(client, fake_upstream, encoding, body) -> None:
    r = post_raw(client, fake_upstream, body, **{"content-type": "text/plain", "content-encoding": encoding})
    assert_blocked(r, 415, encoding, fake_upstream)


def test_utf16_text_is_masked_in_its_charset_and_restored_in_the_reply(client, fake_upstream) -> None:
    """A byte scan sees nothing in UTF-16; the body is read in its charset, and so is the echoed reply."""
    text = ("instance i-0a1b2c3d4e5f60718 in sg-0123456789abcdef0 runs as "
            "arn:aws:iam::123456789012:role/DeployRole")
    ctype = "text/plain; charset=utf-16"
    r = post_raw(client, fake_upstream, text.encode("utf-16"), **{"content-type": ctype})
    assert r.status_code == 200
    sent = fake_upstream.last_request.body.decode("utf-16")
    assert "AWS_EC2_INSTANCE_" in sent and not [o for o in ORIGINALS if o in sent]
    assert r.content.decode("utf-16") == text  # the echo, restored, in UTF-16 again


def test_identifiers_in_the_url_are_masked_too(client, fake_upstream) -> None:
    """The path and query string leave with the request as well (an ARN percent-encoded in a query)."""
    query = ("?profile=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2FDeployRole&host=10.20.30.40"
             "&x=sg-0123456789abcdef0")
    body = b"ping 10.20.30.40 from the host in the query"
    r = client.post(fake_upstream.url_for("/echo" + query), content=body,
                    headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.content == body  # the echo, restored
    rec = fake_upstream.last_request
    assert not [o for o in ORIGINALS if o in rec.path], rec.path
    assert rec.route == "/echo" and "x=AWS_SECURITY_GROUP_" in rec.path
    ip = re.search(rb"AWS_IPV4_\w+", rec.body)
    assert ip is not None and f"host={ip.group().decode()}&" in rec.path  # one original, one placeholder


def test_names_repeated_without_their_context_never_reach_the_upstream(client, fake_upstream) -> None:
    """A role, an account and a bucket named once in context (an ARN, an S3 URI) and again on their own."""
    text = ("arn:aws:iam::123456789012:role/deploy-bot-prod cannot write s3://acme-invoices-2026/x. "
            "Is deploy-bot-prod in 123456789012? acme-invoices-2026 has versioning.")
    r = client.post(fake_upstream.url_for("/echo?bucket=acme-invoices-2026"), content=text.encode(),
                    headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.content == text.encode()  # the echo, restored
    rec = fake_upstream.last_request
    for original in (b"deploy-bot-prod", b"123456789012", b"acme-invoices-2026"):
        assert original not in rec.body and original.decode() not in rec.path, original
    assert len(set(re.findall(rb"AWS_IAM_ROLE_\d+", rec.body))) == 1  # one placeholder for both


def test_names_the_url_gives_away_never_reach_the_upstream_in_the_body(client, fake_upstream) -> None:
    """The other direction: a role named by an ARN in the query string, and again on its own in the body."""
    text = b"why can url-only-role not read the bucket? it lives in account 123456789012"
    r = client.post(fake_upstream.url_for("/echo?profile=arn:aws:iam::123456789012:role/url-only-role"),
                    content=text, headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.content == text  # the echo, restored
    rec = fake_upstream.last_request
    for original in (b"url-only-role", b"123456789012"):
        assert original not in rec.body and original.decode() not in rec.path, (original, rec.path, rec.body)
    role = re.search(r"AWS_IAM_ROLE_\d+", rec.path)
    assert role is not None and role.group().encode() in rec.body  # the same placeholder in both


def test_a_placeholder_the_request_holds_as_text_is_never_minted_for_an_identifier(start_proxy,
                                                                                    fake_upstream) -> None:
    """A token the model invented (AWS_ACCOUNT_0001), back in the history, beside a new account: the account
    gets another number, so the model tells them apart and the reply restores each as it was."""
    proxy = start_proxy(**masker_options(fake_upstream))  # fresh: the first account would get _0001
    text = (b"you called it AWS_ACCOUNT_0001 before (and MY_AWS_X_AWS_ACCOUNT_0002, which reads as a longer "
            b"token); the real one is arn:aws:iam::123456789012:root")
    with proxied_client(proxy) as c:
        r = c.post(fake_upstream.url_for("/echo"), content=text, headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.content == text  # the echo: the literal token stays a token
    sent = fake_upstream.last_request.body
    assert b"AWS_ACCOUNT_0001 before" in sent and b"arn:aws:iam::AWS_ACCOUNT_0003:root" in sent, sent


def test_json_keys_that_would_collide_once_masked_are_refused_with_415(start_proxy, fake_upstream) -> None:
    proxy = start_proxy(**masker_options(fake_upstream, masker_json_keys="true"))
    with proxied_client(proxy) as c:
        # the instance gets AWS_EC2_INSTANCE_0001 in a first request (in the same one the client's key would
        # be avoided: the instance would get _0002); the client then wrote that as a key beside it
        r = c.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json={"input": {"i-0a1b2c3d4e5f60718": "stop"}})
        assert r.status_code == 200 and b"AWS_EC2_INSTANCE_0001" in fake_upstream.last_request.body
        fake_upstream.clear()
        doc = {"input": {"i-0a1b2c3d4e5f60718": "stop", "AWS_EC2_INSTANCE_0001": "start"}}
        r = c.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=doc)
        assert_blocked(r, 415, "AWS_EC2_INSTANCE_0001", fake_upstream)
        assert "i-0a1b2c3d4e5f60718" not in r.text and "stop" not in r.text


def test_a_body_in_an_unknown_charset_is_refused_with_415(client, fake_upstream) -> None:
    r = post_raw(client, fake_upstream, b"i-0a1b2c3d4e5f60718",
                 **{"content-type": "text/plain; charset=x-mac-klingon"})
    assert_blocked(r, 415, "unknown charset 'x-mac-klingon'", fake_upstream)


def test_websocket_upgrade_is_refused_with_501(client, fake_upstream) -> None:
    """WebSocket messages (OpenAI Realtime, Gemini Live) would pass frame by frame, unmasked."""
    r = client.get(fake_upstream.url_for("/v1/realtime"), headers={
        "connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert_blocked(r, 501, "WebSocket", fake_upstream)
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_store_unavailable_is_refused_with_503(start_proxy, fake_upstream) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = start_proxy(**masker_options(fake_upstream, masker_redis_url=f"redis://127.0.0.1:{dead}/0"))
    proxy.wait_for_log(f"Redis at redis://127.0.0.1:{dead}/0 does not answer", timeout=10)  # said at startup
    with proxied_client(proxy) as c:
        r = c.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=make_request(ANTHROPIC))
        assert_blocked(r, 503, "store unavailable", fake_upstream)
        # mitmdump's own line for the flow shows its URL: the path of a blocked request is scrubbed
        r = c.post(fake_upstream.url_for("/v1/messages?host=i-0a1b2c3d4e5f60718"), content=b"hi")
        assert_blocked(r, 503, "store unavailable", fake_upstream)
        proxy.wait_for_log(r"POST .*/v1/messages\?host=\*\*\*", timeout=5)
        # A request without identifiers needs no store and goes through.
        r = post_raw(c, fake_upstream, b"hello, nothing to mask here", **{"content-type": "text/plain"})
        assert r.status_code == 200
    assert any("blocked" in line and "503" in line for line in proxy.log_lines)
    assert not any(o in line for line in proxy.log_lines for o in ORIGINALS)


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("masker_max_body", "8MB", "not an integer: 8MB"),
    ("masker_fail_open", "maybe", 'boolean must be "true", "false"'),
    ("masker_host", "api.corp.example", "unknown option --set masker_host (did you mean masker_hosts?)"),
])
def test_a_set_value_mitmproxy_cannot_convert_stops_the_proxy(start_proxy, fake_upstream, option, value,
                                                               needle) -> None:
    """mitmproxy converts a script's --set values after loading it and, when one fails, drops the script
    without a word: the proxy would run on and forward everything unmasked. A misspelt name it ignores, also
    without a word. The addon stops the proxy instead."""
    with pytest.raises(MitmProxyError, match=r"exited") as e:
        start_proxy(**masker_options(fake_upstream, **{option: value}))
    out = str(e.value)
    assert "aws-masker: " in out and option in out and needle in out, out
    assert "code 1" in out


def test_fail_open_forwards_unmasked_with_a_warning(start_proxy, fake_upstream) -> None:
    proxy = start_proxy(**masker_options(fake_upstream, masker_fail_open="true", masker_max_body="100"))
    with proxied_client(proxy) as c:
        r = post_raw(c, fake_upstream, b"x" * 200 + b" i-0a1b2c3d4e5f60718", **{"content-type": "text/plain"})
    assert r.status_code == 200
    assert b"i-0a1b2c3d4e5f60718" in fake_upstream.last_request.body
    proxy.wait_for_log("FAIL-OPEN", timeout=5)
    assert len(proxy.find_log("FAIL-OPEN")) == 1 and "(1 so far)" in proxy.find_log("FAIL-OPEN")[0]


# ---- the addon unloaded while mitmproxy runs ----------------------------------------------------------

def test_a_failed_reload_of_the_script_blocks_instead_of_forwarding(start_proxy, fake_upstream,
                                                                    tmp_path) -> None:
    """mitmproxy reloads a changed script; if the new one fails to load it keeps running without the addon.
    The guard the addon left behind then refuses masked hosts until a reload succeeds."""
    good = (f"import sys\nsys.path.insert(0, {str(REPO / 'addon')!r})\n"
            "from aws_masker.addon import AwsMasker\naddons = [AwsMasker()]\n")
    script = tmp_path / "masker_copy.py"
    script.write_text(good)
    proxy = start_proxy(script=script, **masker_options(fake_upstream))

    def touch(text: str) -> None:  # a later mtime than the one mitmproxy saw, whatever the clock resolution
        script.write_text(text)
        stamp = script.stat().st_mtime + 5 + len(proxy.log_lines)
        os.utime(script, (stamp, stamp))

    with proxied_client(proxy) as c:
        r = c.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=make_request(ANTHROPIC))
        assert r.status_code == 200
        fake_upstream.clear()
        since = len(proxy.log_lines)
        touch("raise RuntimeError('a broken update')\n")
        proxy.wait_for_log("error in script", since=since, timeout=10)
        r = c.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=make_request(ANTHROPIC))
        assert_blocked(r, 503, "not loaded", fake_upstream)
        other = post_raw(c, fake_upstream, b"i-0a1b2c3d4e5f60718", **{"content-type": "text/plain"})
        assert other.status_code == 503 and fake_upstream.requests == []  # the echo path: same host, refused
        since = len(proxy.log_lines)
        touch(good)
        proxy.wait_for_log("rules loaded", since=since, timeout=10)
        r = c.post(fake_upstream.url_for(PATHS[ANTHROPIC]), json=make_request(ANTHROPIC))
        assert r.status_code == 200, r.text
        assert_no_original(fake_upstream)
