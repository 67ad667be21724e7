"""The mitmproxy glue, driven with mitmproxy's own test helpers (taddons, tflow): options and hooks."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from aws_masker.addon import AwsMasker
from aws_masker.store import StoreUnavailable

SECRET_ID = b"i-0123456789abcdef0"
BODY = {"model": "m", "messages": [{"role": "user", "content": "why is i-0123456789abcdef0 down?"}]}


def make_flow(body: bytes, host: str = "api.anthropic.com", headers: dict[str, str] | None = None):
    req = tutils.treq(host=host, port=443, scheme=b"https", path=b"/v1/messages", content=body)
    req.headers["content-type"] = "application/json"
    for k, v in (headers or {}).items():
        req.headers[k] = v
    return tflow.tflow(req=req)


def run(coro):
    return asyncio.get_event_loop().run_until_complete(coro)


@pytest.fixture
def masker():
    addon = AwsMasker()
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        yield addon, tctx


def test_paths_in_logs_and_events_hide_identifiers_also_percent_encoded(masker) -> None:
    addon, _ = masker
    f = make_flow(b"{}")
    f.request.path = ("/v1/files/logs%2Fi-0123456789abcdef0/sg-0123456789abcdef0/content"
                      "?key=vol-0123456789abcdef0")
    safe = addon._safe_path(f)
    assert safe == "/v1/files/logs%2F***/***/content"


def test_masker_json_keys_reaches_the_masker_and_survives_a_rules_reload(masker, tmp_path: Path) -> None:
    addon, tctx = masker
    body = json.dumps({"input": {"i-0123456789abcdef0": "stop"}}).encode()
    f = make_flow(body)
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert b"i-0123456789abcdef0" in f.request.content  # default: keys stay
    tctx.configure(addon, masker_json_keys=True)
    rules = tmp_path / "team.yaml"
    rules.write_text("rules:\n  - id: team-host\n    description: internal hosts of the team\n"
                     "    regex: '\\bdb[0-9]+\\.corp\\.example\\b'\n    placeholder: TEAM_HOST\n"
                     "    examples: ['db1.corp.example']\n")
    tctx.configure(addon, masker_rules=[str(rules)])  # a new BodyMasker: the option must still hold
    f = make_flow(body)
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert b"i-0123456789abcdef0" not in f.request.content
    assert next(iter(json.loads(f.request.content)["input"])).startswith("AWS_EC2_INSTANCE_")


def test_request_masked_and_reply_restored(masker) -> None:
    addon, tctx = masker
    f = make_flow(json.dumps(BODY).encode())
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is None
    assert b"i-0123456789abcdef0" not in f.request.content
    token = json.loads(f.request.content)["messages"][0]["content"].split()[2]
    assert token.startswith("AWS_EC2_INSTANCE_")
    assert f.request.headers["accept-encoding"] == "identity"
    f.response = tutils.tresp(content=json.dumps({"content": [{"text": f"{token} is down"}]}).encode())
    f.response.headers["content-type"] = "application/json"
    tctx.master.event_loop.run_until_complete(addon.response(f))
    assert json.loads(f.response.content) == {"content": [{"text": "i-0123456789abcdef0 is down"}]}
    assert "masked 1" in f.comment and "restored 1" in f.comment
    assert addon.flows == {}


def test_freed_memory_goes_back_to_the_os_every_so_many_flows(masker, monkeypatch) -> None:
    """glibc keeps the pages of the bodies and JSON trees each request frees; every TRIM_EVERY finished flows
    they are handed back (scripts/bench measures the RSS this saves), after the hook, not inside it."""
    import aws_masker.addon as glue

    addon, tctx = masker
    trims: list[int] = []
    monkeypatch.setattr(glue, "TRIM_EVERY", 3)
    monkeypatch.setattr(glue, "release_freed_memory", lambda: trims.append(addon.finished) or True)
    loop = tctx.master.event_loop
    for _ in range(7):
        f = make_flow(json.dumps(BODY).encode())
        loop.run_until_complete(addon.request(f))
        f.response = tutils.tresp(content=b'{"content": []}')
        f.response.headers["content-type"] = "application/json"
        loop.run_until_complete(addon.response(f))
    loop.run_until_complete(asyncio.sleep(0))
    assert trims == [3, 6]


@pytest.mark.parametrize("kind", ["base64 document", "utf-16"])
def test_a_placeholder_held_as_text_in_decoded_text_is_never_minted(masker, kind: str) -> None:
    """The placeholders a request holds as text are looked for in what the model reads: also in a text
    document sent as base64 and in a UTF-16 body, whose bytes do not show them (the new instance got the
    very token the document held, and the reply restored both as the instance)."""
    addon, tctx = masker
    text = "the doc says AWS_EC2_INSTANCE_0001 is fine; i-0123456789abcdef0 is down"
    if kind == "utf-16":
        f = make_flow(text.encode("utf-16"), headers={"content-type": "text/plain; charset=utf-16"})
    else:
        doc = {"type": "document", "source": {"type": "base64", "media_type": "text/plain",
                                              "data": base64.b64encode(text.encode()).decode()}}
        f = make_flow(json.dumps({"model": "m", "messages": [{"role": "user", "content": [doc]}]}).encode())
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is None
    state = addon.flows[f.id]
    assert state.mapping == {b"AWS_EC2_INSTANCE_0002": b"i-0123456789abcdef0"}, state.mapping


def test_other_hosts_are_untouched(masker) -> None:
    addon, tctx = masker
    body = json.dumps(BODY).encode()
    f = make_flow(body, host="example.com")
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.request.content == body and f.response is None


def test_unknown_encoding_blocked_with_415(masker) -> None:
    addon, tctx = masker
    f = make_flow(b"\x00garbage", headers={"content-encoding": "snappy"})
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is not None and f.response.status_code == 415
    err = json.loads(f.response.content)
    assert err["type"] == "error" and err["error"]["message"].startswith("aws-masker: ")
    assert "snappy" in err["error"]["message"] and f.marked


def test_gzip_request_is_decoded_masked_and_reencoded(masker) -> None:
    addon, tctx = masker
    f = make_flow(b"", headers={"content-encoding": "gzip"})
    f.request.raw_content = gzip.compress(json.dumps(BODY).encode())
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is None and f.request.headers["content-encoding"] == "gzip"
    assert b"i-0123456789abcdef0" not in gzip.decompress(f.request.raw_content)


def test_too_large_blocked_with_413(masker) -> None:
    addon, tctx = masker
    tctx.configure(addon, masker_max_body=100)
    f = make_flow(json.dumps({"x": "a" * 200}).encode())
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is not None and f.response.status_code == 413


def test_store_unavailable_blocked_with_503_or_forwarded_when_fail_open(masker) -> None:
    addon, tctx = masker

    class DeadStore:
        name = "dead"

        async def placeholders_for(self, items, avoid=()):
            raise StoreUnavailable("connection refused")

    addon.store = DeadStore()
    f = make_flow(json.dumps(BODY).encode())
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is not None and f.response.status_code == 503
    assert "connection refused" in json.loads(f.response.content)["error"]["message"]

    tctx.configure(addon, masker_fail_open=True)
    f = make_flow(json.dumps(BODY).encode())
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is None and addon.fail_open_count == 1


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("masker_env", "staging", "masker_env: 'staging'"),
    ("masker_max_body", 0, "masker_max_body: 0"),
    ("masker_redis_remember", -1, "masker_redis_remember: -1"),
    ("masker_hosts", ["api.anthropic.com", "bad:host:"], "masker_hosts"),
])
def test_bad_options_name_option_and_value(masker, option, value, needle) -> None:
    addon, tctx = masker
    with pytest.raises(exceptions.OptionsError, match=needle):
        tctx.configure(addon, **{option: value})


@pytest.mark.parametrize("bad", ["api.*.com", "*foo.example.com", "*.com", "*", "*.example.com:0"])
def test_bad_wildcard_hosts_are_refused(masker, bad: str) -> None:
    addon, tctx = masker
    with pytest.raises(exceptions.OptionsError, match=re.escape(f"masker_hosts: {bad!r}")):
        tctx.configure(addon, masker_hosts=[bad])


def test_wildcard_hosts_mask_every_subdomain_and_nothing_else(masker) -> None:
    addon, tctx = masker
    tctx.configure(addon, masker_hosts=["*.openai.azure.com", "*.corp.example:8443", "api.anthropic.com"])
    masked = [("myres.openai.azure.com", 443), ("a.b.openai.azure.com", 443),
              ("MyRes.OpenAI.Azure.com.", 443), ("llm.corp.example", 8443), ("api.anthropic.com", 443)]
    passed = [("openai.azure.com", 443), ("evilopenai.azure.com", 443),
              ("myres.openai.azure.com.evil.io", 443), ("llm.corp.example", 443), ("corp.example", 8443),
              ("api.openai.com", 443)]
    for host, port in masked:
        assert addon.is_masked_host(host, port), host
    for host, port in passed:
        assert not addon.is_masked_host(host, port), host


def test_broken_rule_file_names_file_rule_and_problem(masker, tmp_path: Path) -> None:
    addon, tctx = masker
    bad = tmp_path / "team.yaml"
    bad.write_text("rules:\n  - id: team-host\n    description: d\n    regex: '(unclosed'\n"
                   "    placeholder: TEAM_HOST\n    examples: ['x']\n")
    with pytest.raises(exceptions.OptionsError) as e:
        tctx.configure(addon, masker_rules=[str(bad)])
    assert str(bad) in str(e.value) and "team-host" in str(e.value) and "does not compile" in str(e.value)


def test_user_rule_failing_its_examples_is_refused(masker, tmp_path: Path) -> None:
    addon, tctx = masker
    rule = tmp_path / "team.yaml"
    rule.write_text("rules:\n  - id: team-host\n    description: internal hosts\n"
                    "    regex: '\\b[a-z]+\\.corp\\.example\\b'\n    placeholder: TEAM_HOST\n"
                    "    examples: ['db1.corp.example']\n")
    with pytest.raises(exceptions.OptionsError, match=r"team-host.*db1"):
        tctx.configure(addon, masker_rules=[str(rule)])
    rule.write_text(rule.read_text().replace("[a-z]+", "[a-z0-9]+"))
    tctx.configure(addon, masker_rules=[str(rule)])
    f = make_flow(json.dumps({"messages": [{"role": "user", "content": "ssh db1.corp.example"}]}).encode())
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert b"db1.corp.example" not in f.request.content and b"AWS_TEAM_HOST_0001" in f.request.content


def test_sigv4_signed_body_with_identifiers_is_not_rewritten(masker) -> None:
    addon, tctx = masker
    signed = {"authorization": "AWS4-HMAC-SHA256 Credential=x/20261126/us-east-1/bedrock/aws4_request, "
                               "SignedHeaders=host;x-amz-date, Signature=abc"}
    f = make_flow(json.dumps(BODY).encode(), headers=signed)
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is not None and f.response.status_code == 400
    assert "SigV4" in json.loads(f.response.content)["error"]["message"]
    hello = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode()
    clean = make_flow(hello, headers=signed)
    tctx.master.event_loop.run_until_complete(addon.request(clean))
    assert clean.response is None
    # A Bedrock inference profile is invoked by its ARN in the (signed) path: not rewritten either.
    by_arn = make_flow(hello, headers=signed)
    by_arn.request.path = ("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3A"
                           "application-inference-profile%2Fa1b2c3d4e5f6/converse")
    tctx.master.event_loop.run_until_complete(addon.request(by_arn))
    assert by_arn.response is not None and by_arn.response.status_code == 400


def test_identifiers_in_the_path_alone_are_masked_and_restored(masker) -> None:
    addon, tctx = masker
    f = make_flow(b"")
    f.request.method = "GET"
    f.request.path = "/v1/files?purpose=logs-of-i-0123456789abcdef0&n=1"
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is None and "i-0123456789abcdef0" not in f.request.path
    placeholder = f.request.query["purpose"].removeprefix("logs-of-")
    assert placeholder.startswith("AWS_EC2_INSTANCE_") and f.request.query["n"] == "1"
    f.response = tutils.tresp(content=json.dumps({"data": [{"purpose": placeholder}]}).encode())
    f.response.headers["content-type"] = "application/json"
    tctx.master.event_loop.run_until_complete(addon.response(f))
    assert json.loads(f.response.content) == {"data": [{"purpose": "i-0123456789abcdef0"}]}


def test_a_name_the_body_gave_away_is_masked_in_the_url_too(masker) -> None:
    addon, tctx = masker
    body = {"model": "m", "messages": [{"role": "user", "content": "list s3://acme-invoices-2026/reports/"}]}
    f = make_flow(json.dumps(body).encode())
    f.request.path = "/v1/messages?tag=acme-invoices-2026"
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is None
    assert b"acme-invoices-2026" not in f.request.content and "acme-invoices-2026" not in f.request.path
    placeholder = f.request.query["tag"]
    assert placeholder.startswith("AWS_S3_BUCKET_") and placeholder.encode() in f.request.content
    assert addon.flows[f.id].rule_counts["repeat"] == 1
    # percent-encoded in the URL, as a query value must write a secret's "/" and "+"
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    body = {"model": "m", "messages": [{"role": "user", "content": f"SecretAccessKey: {secret}"}]}
    f = make_flow(json.dumps(body).encode())
    f.request.path = "/v1/messages?k=" + secret.replace("/", "%2F")
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert "EXAMPLEKEY" not in f.request.path and f.request.query["k"].startswith("AWS_SECRET_ACCESS_KEY_")


@pytest.mark.parametrize("env", ["development", "production"])
def test_streamed_reply_is_restored_and_inspectable_in_mitmweb(masker, env) -> None:
    addon, tctx = masker
    tctx.configure(addon, masker_env=env)
    f = make_flow(json.dumps(BODY).encode())
    tctx.master.event_loop.run_until_complete(addon.request(f))
    token = json.loads(f.request.content)["messages"][0]["content"].split()[2]
    f.response = tutils.tresp(content=b"")
    f.response.headers["content-type"] = "text/event-stream"
    f.response.headers["content-length"] = "999"
    addon.responseheaders(f)
    assert callable(f.response.stream) and "content-length" not in f.response.headers
    event = json.dumps({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": f"down: {token}."}})
    raw = f"event: content_block_delta\ndata: {event}\n\n".encode()
    out = b"".join(b"".join(f.response.stream(raw[k:k + 5])) for k in range(0, len(raw), 5))
    out += b"".join(f.response.stream(b""))
    assert b"i-0123456789abcdef0" in out and token.encode() not in out
    f.response.raw_content = None  # what mitmproxy keeps of a streamed body
    tctx.master.event_loop.run_until_complete(addon.response(f))
    assert "restored 1" in f.comment
    if env == "development":
        assert f.response.content == out
    else:
        assert not f.response.raw_content


def test_internal_error_is_500_and_the_log_never_quotes_the_error_text(masker, caplog) -> None:
    addon, tctx = masker

    class Broken:  # fails at its first use (the URL's scan), and at every other
        def scan_text(self, data):
            raise KeyError(("EC2_INSTANCE", SECRET_ID))  # what a real bug could raise

        plan = scan_text

    addon.body_masker = Broken()
    f = make_flow(json.dumps(BODY).encode())
    with caplog.at_level("DEBUG"):
        tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is not None and f.response.status_code == 500
    assert "KeyError" in json.loads(f.response.content)["error"]["message"]
    assert "internal error" in caplog.text and SECRET_ID.decode() not in caplog.text
    # The broken masker cannot scrub the path for the log line either: the block stands, the path is withheld.
    assert "(path withheld)" in caplog.text


def test_what_a_redis_store_remembers_is_bounded_by_the_options(masker) -> None:
    # masker_max_entries bounds the memory store; a proxy using Redis remembers at most 20,000 (~6 MB)
    addon, tctx = masker
    tctx.configure(addon, masker_redis_url="redis://127.0.0.1:1/0", masker_events_channel="")
    assert addon.store.name == "redis"
    assert (addon.store.remember, addon.store._remember_entries) == (60, 20_000)
    tctx.configure(addon, masker_max_entries=50, masker_redis_remember=0)
    assert (addon.store.remember, addon.store._remember_entries) == (0, 50)
