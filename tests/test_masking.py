"""Masking and restoring bodies, without a proxy: formats, edge cases, and the round-trip property."""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import json
import random
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aws_masker.masking import BodyMasker, UnreadableBody
from aws_masker.placeholders import TOKEN_RE, format_placeholder, restore_bytes
from aws_masker.rules import load_rules, parse_rule
from aws_masker.scanner import Scanner
from aws_masker.store import MemoryStore

RULES = load_rules()
SCANNER = Scanner(RULES)
MASKER = BodyMasker(SCANNER)

IDS = [
    "i-0a1b2c3d4e5f60718",
    "i-0123abcd",
    "arn:aws:iam::123456789012:role/DeployRole",
    "arn:aws-us-gov:s3:::gov-bucket-logs",
]
IDENTIFYING = ["i-0a1b2c3d4e5f60718", "i-0123abcd", "123456789012", "DeployRole", "gov-bucket-logs"]
BARE = ["123456789012", "gov-bucket-logs"]  # names of the ARNs above, on their own: masked as repeats


def mask(content: bytes, ctype: str = "",
         store: MemoryStore | None = None) -> tuple[bytes, dict[bytes, bytes]]:
    store = store or MemoryStore()
    plan = MASKER.plan(content, ctype)
    placeholders = asyncio.run(store.placeholders_for(plan.items))
    return plan.render(placeholders)


def test_json_strings_masked_at_any_depth_keys_and_numbers_stay() -> None:
    doc = {
        "model": "claude",
        "max_tokens": 1024,
        "temperature": 0.5,
        "system": "You help with i-0a1b2c3d4e5f60718",
        "messages": [{"role": "user", "content": [{"type": "tool_result", "content": [
            {"type": "text", "text": "role arn:aws:iam::123456789012:role/DeployRole"}]}]}],
        "i-0123abcd": ["nested", {"deeper": ["x i-0123abcd y"]}],
    }
    out, mapping = mask(json.dumps(doc).encode(), "application/json")
    masked = json.loads(out)
    assert masked["model"] == "claude" and masked["max_tokens"] == 1024 and masked["temperature"] == 0.5
    assert "i-0123abcd" in masked  # keys stay
    for ident in IDENTIFYING[:4]:
        assert ident.encode() not in out.replace(b'"i-0123abcd":', b"")
    text = masked["messages"][0]["content"][0]["content"][0]["text"]
    assert text.startswith("role arn:aws:iam::AWS_ACCOUNT_")
    restored, n = restore_bytes(out, mapping)
    assert json.loads(restored) == doc
    assert n == 4


def test_json_keys_are_masked_only_when_asked() -> None:
    doc = {"input": {"i-0123456789abcdef0": {"action": "stop", "sg-0123456789abcdef0": "keep"},
                     "plain": "vpc-0123456789abcdef0", "vpc-0123456789abcdef0": "its own key"}}
    body = json.dumps(doc).encode()
    out, _ = mask(body, "application/json")
    assert list(json.loads(out)["input"]) == list(doc["input"])  # default: keys stay
    masker = BodyMasker(SCANNER)
    masker.mask_keys = True
    plan = masker.plan(body, "application/json")
    out, mapping = plan.render(asyncio.run(MemoryStore().placeholders_for(plan.items)))
    masked = json.loads(out)["input"]
    assert [re.sub(r"_\d+$", "_N", k) for k in masked] == ["AWS_EC2_INSTANCE_N", "plain", "AWS_VPC_N"]
    assert masked[next(iter(masked))] == {"action": "stop", "AWS_SECURITY_GROUP_0001": "keep"}
    assert masked["AWS_VPC_0001"] == "its own key" and masked["plain"] == "AWS_VPC_0001"  # same placeholder
    for original in (b"i-0123456789abcdef0", b"sg-0123456789abcdef0", b"vpc-0123456789abcdef0"):
        assert original not in out
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == doc


def test_same_original_same_placeholder_different_originals_differ() -> None:
    store = MemoryStore()
    out1, _ = mask(b"a i-0123abcd b i-0123abcd c i-89abcdef", store=store)
    out2, _ = mask(b"later i-0123abcd", store=store)
    tokens1 = TOKEN_RE.findall(out1)
    assert tokens1[0] == tokens1[1] != tokens1[2]
    assert TOKEN_RE.findall(out2) == [tokens1[0]]


def test_text_glued_before_an_identifier_that_reads_as_part_of_its_placeholder_is_restored() -> None:
    """"AWS_" glued to an ID is masked as AWS_AWS_EC2_INSTANCE_0001: the token grammar reads both as one token
    (greedy, like a longer placeholder). Restore sets the glued text apart again."""
    text = b"env AWS_i-0123456789abcdef0, MY_AWS_X_sg-0123456789abcdef0 and AWS_AKIAIOSFODNN7EXAMPLE"
    out, mapping = mask(text, "text/plain")
    assert b"AWS_AWS_EC2_INSTANCE_0001" in out and b"i-0123456789abcdef0" not in out
    assert restore_bytes(out, mapping) == (text, len(TOKEN_RE.findall(out)))
    body = json.dumps({"content": text.decode()}).encode()
    out, mapping = mask(body, "application/json")
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == json.loads(body)
    # a longer placeholder that is known wins over the one it ends in
    both = {b"AWS_ARN_AWS_MARKETPLACE_0001": b"arn:aws:aws-marketplace:x", b"AWS_MARKETPLACE_0001": b"m"}
    assert restore_bytes(b"(AWS_ARN_AWS_MARKETPLACE_0001)", both)[0] == b"(arn:aws:aws-marketplace:x)"
    assert restore_bytes(b"AWS_AWS_UNKNOWN_0001", mapping) == (b"AWS_AWS_UNKNOWN_0001", 0)
    # glued text that does not end in "_": a stream cut after "AWS_AW" restores the placeholder, so the
    # whole reply does too (the same reply, however it is cut)
    one = {b"AWS_ACCOUNT_0001": b"111122223333"}
    assert restore_bytes(b"AWS_AWAWS_ACCOUNT_0001 AWS_XY9AWS_ACCOUNT_0001", one) == \
        (b"AWS_AW111122223333 AWS_XY9111122223333", 2)
    # ... but not where the number goes on
    assert restore_bytes(b"AWS_AWAWS_ACCOUNT_00012", one) == (b"AWS_AWAWS_ACCOUNT_00012", 0)


def test_a_huge_token_costs_memory_in_proportion_to_its_length() -> None:
    """A token of n bytes has up to n/5 tails that start with AWS_ (n^2/10 bytes): every one was made, so a
    112 KB token in a request (tokens_in) or a reply (restore) cost 900 MB and ~1 s, 1 MB of them ~90 GB.
    Now only tails that can be a placeholder of the caller's are made (of the kinds to mint; no longer than
    the longest placeholder of the mapping)."""
    import tracemalloc

    from aws_masker.placeholders import tokens_in

    huge = b"AWS_X" + b"AWAWS_X" * 4000 + b"_0001"  # 28 KB: 56 MB of tails
    glued = b"AWS_X" + b"AWAWS_X" * 4000 + b"AWS_ACCOUNT_0001"
    one = {b"AWS_ACCOUNT_0001": b"111122223333", b"AWS_X_0001": b"x"}
    tracemalloc.start()
    try:
        avoid = tokens_in(huge + b" " + glued, {"ACCOUNT", "X"})
        restored = restore_bytes(b"(" + huge + b") " + glued, one)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert avoid == {huge, glued, b"AWS_X_0001", b"AWS_ACCOUNT_0001"}
    assert restored == (b"(" + huge[:-10] + b"x) " + glued[:-16] + b"111122223333", 2)
    assert peak < 2_000_000, peak  # (56 MB before)
    # the tails of other kinds do not matter: a new placeholder is of a kind to mint
    assert tokens_in(b"AWS_AAWS_EC2_0001", {"ACCOUNT"}) == {b"AWS_AAWS_EC2_0001"}
    assert tokens_in(b"AWS_AAWS_EC2_0001") == {b"AWS_AAWS_EC2_0001", b"AWS_EC2_0001"}


def test_text_without_identifiers_is_returned_unchanged() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "deploy m5.large in us-east-1a"}]},
                      indent=2).encode()
    out, mapping = mask(body, "application/json")
    assert out is body and mapping == {}


def test_form_bodies_are_decoded_masked_and_reencoded() -> None:
    body = b"q=instance+i-0123abcd&x=%22arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2FDeployRole%22&empty="
    out, mapping = mask(body, "application/x-www-form-urlencoded")
    assert b"i-0123abcd" not in out and b"123456789012" not in out and b"DeployRole" not in out
    assert out.endswith(b"&empty=")
    from urllib.parse import parse_qsl

    pairs = parse_qsl(out.decode(), keep_blank_values=True)
    restored = [(k, restore_bytes(v.encode(), mapping)[0].decode()) for k, v in pairs]
    assert restored == parse_qsl(body.decode(), keep_blank_values=True)


# Values recognisable only by their label: in structured JSON (a tool call's input object) the label is the
# key, not part of the string. Fake values; every one must be masked and restored exactly.
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SECRET2 = "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"


def test_values_recognised_by_their_key_in_structured_json() -> None:
    tool_input = {
        "aws_secret_access_key": SECRET,
        "AccountId": "444455556666",
        "OwnerId": "123456789012",
        "Credentials": {"SecretAccessKey": SECRET2},
        "Principal": {"AWS": ["arn:aws:iam::111122223333:root", "777788889999", ["210987654321"]]},
        "note": "plain words stay",
    }
    doc = {"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "aws", "input": tool_input}]}]}
    body = json.dumps(doc).encode()
    out, mapping = mask(body, "application/json")
    for original in (SECRET, SECRET2, "444455556666", "123456789012", "111122223333", "777788889999",
                     "210987654321"):
        assert original.encode() not in out, original
    masked = json.loads(out)["messages"][0]["content"][0]["input"]
    assert masked["aws_secret_access_key"].startswith("AWS_SECRET_ACCESS_KEY_")
    assert masked["AccountId"].startswith("AWS_ACCOUNT_")
    assert masked["note"] == "plain words stay"
    assert "aws_secret_access_key" in masked and "SecretAccessKey" in masked["Credentials"]  # keys stay
    restored, _ = restore_bytes(out, mapping, in_json=True)
    assert json.loads(restored) == doc


def test_names_recognised_by_their_aws_key_in_structured_json() -> None:
    tool_input = {"clusterName": "payments-prod", "UserName": "ci-deployer", "ApiId": "k7x2m9qa01",
                  "ClientId": "4example5abcdefghij6klmnop", "QueueName": "orders-dlq",
                  "SecretId": "prod/orders/db", "clusterNameHint": "payments-${ENV}"}
    doc = {"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "aws", "input": tool_input}]}]}
    body = json.dumps(doc).encode()
    out, mapping = mask(body, "application/json")
    masked = json.loads(out)["messages"][0]["content"][0]["input"]
    assert masked["clusterName"].startswith("AWS_ARN_EKS_") and masked["UserName"].startswith("AWS_IAM_USER_")
    assert masked["ApiId"].startswith("AWS_API_GATEWAY_")
    assert masked["ClientId"].startswith("AWS_COGNITO_CLIENT_")
    assert masked["QueueName"].startswith("AWS_SQS_QUEUE_")
    assert masked["SecretId"].startswith("AWS_ARN_SECRETSMANAGER_")
    assert masked["clusterNameHint"] == "payments-${ENV}"
    restored, _ = restore_bytes(out, mapping, in_json=True)
    assert json.loads(restored) == doc


def test_a_key_only_adds_hits_and_never_masks_a_value_that_does_not_need_it() -> None:
    doc = {"AccountId": "not an id", "Amount": "123456789012", "Owner": "team payments",
           "aws_secret_access_key": "short", "InstanceId": "i-0123abcd", "AWS": ["us-east-1"],
           "arn:aws:iam::123456789012:root": "a key that is an ARN stays"}
    body = json.dumps(doc).encode()
    out, mapping = mask(body, "application/json")
    masked = json.loads(out)
    assert masked["InstanceId"].startswith("AWS_EC2_INSTANCE_")  # found alone, as before
    assert {k: v for k, v in masked.items() if k != "InstanceId"} == \
        {k: v for k, v in doc.items() if k != "InstanceId"}
    assert len(mapping) == 1


def test_a_rule_running_from_the_key_into_the_value_does_not_hide_the_values_own_hits() -> None:
    # A (user) rule whose match starts in the key's context and runs into the value would, on the scan with
    # the context, swallow the instance ID; the value's own scan still finds it.
    team = parse_rule({"id": "team-label", "description": "a label and what follows it",
                       "regex": r'TEAM": "[\w -]+', "placeholder": "TEAM", "examples": ['TEAM": "a b']},
                      "test", 0)
    masker = BodyMasker(Scanner([team, *RULES]))
    store = MemoryStore()
    plan = masker.plan(json.dumps({"TEAM": "abc i-0123abcd"}).encode(), "application/json")
    out, _ = plan.render(asyncio.run(store.placeholders_for(plan.items)))
    assert json.loads(out) == {"TEAM": "abc AWS_EC2_INSTANCE_0001"}


def test_form_values_are_recognised_by_their_key() -> None:
    body = f"AWSAccountId=444455556666&aws_secret_access_key={SECRET.replace('/', '%2F')}&q=hello".encode()
    out, mapping = mask(body, "application/x-www-form-urlencoded")
    assert b"444455556666" not in out and SECRET.encode() not in out
    assert SECRET.replace("/", "%2F").encode() not in out
    assert out.endswith(b"&q=hello")
    from urllib.parse import parse_qsl

    restored = [(k, restore_bytes(v.encode(), mapping)[0].decode()) for k, v in parse_qsl(out.decode())]
    assert restored == parse_qsl(body.decode())


def test_identifiers_after_escaped_newlines_in_json_lines_are_masked() -> None:
    # A JSON Lines body (OpenAI batch input) is not one JSON document: it is masked as text, where "\n" is a
    # backslash and the letter n, right before the identifier.
    texts = ["Instances:\ni-0123456789abcdef0\tsg-0123456789abcdef0\r\nAccount\n123456789012",
             "C:\\nat-0123456789abcdef0"]
    body = b"".join(json.dumps({"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": t}]}})
                    .encode() + b"\n" for i, t in enumerate(texts))
    out, mapping = mask(body, "application/jsonl")
    for original in (b"i-0123456789abcdef0", b"sg-0123456789abcdef0", b"123456789012",
                     b"nat-0123456789abcdef0"):
        assert original not in out, original
    first = json.loads(out.splitlines()[0])
    assert first["body"]["messages"][0]["content"].startswith("Instances:\nAWS_EC2_INSTANCE_")
    assert restore_bytes(out, mapping)[0] == body


def test_identifiers_in_json_encoded_tool_results_are_masked() -> None:
    # Tool results and arguments are often JSON text inside a JSON string: escapes twice over.
    result = json.dumps({"Reservations": "InstanceId\ni-0123456789abcdef0\n\tPrivateIp\t10.1.2.3"})
    arguments = json.dumps({"cmd": "describe\nvpc-0123456789abcdef0"})
    doc = {"messages": [{"role": "tool", "tool_call_id": "c1", "content": result},
                        {"role": "assistant", "tool_calls": [{"id": "c2", "type": "function", "function": {
                            "name": "aws", "arguments": arguments}}]}]}
    body = json.dumps(doc).encode()
    out, mapping = mask(body, "application/json")
    for original in (b"i-0123456789abcdef0", b"10.1.2.3", b"vpc-0123456789abcdef0"):
        assert original not in out, original
    restored, _ = restore_bytes(out, mapping, in_json=True)
    assert json.loads(restored) == doc


def test_identifiers_after_escaped_non_ascii_quotes_are_masked() -> None:
    # json.dumps escapes every non-ASCII character by default: the curly quote is "\u201c", its last hex
    # digit a word character right before the ID.
    result = json.dumps({"result": "Instance \u201ci-0123456789abcdef0\u201d at \u00ab10.1.2.3\u00bb"})
    assert "\\u201ci-0123456789abcdef0" in result
    body = json.dumps({"messages": [{"role": "tool", "content": result}]}).encode()
    out, mapping = mask(body, "application/json")
    assert b"i-0123456789abcdef0" not in out and b"10.1.2.3" not in out
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == json.loads(body)


def test_identifiers_in_percent_encoded_urls_are_masked() -> None:
    url = ("https://s3.console.aws.amazon.com/s3/buckets/logs?prefix=AWSLogs%2F123456789012%2Fvpcflowlogs%2F"
           "&next=%2Fi-0123456789abcdef0%2F&sure=100%25")
    doc = {"messages": [{"role": "user", "content": f"Open {url} please"}], "metadata": {"link": url}}
    body = json.dumps(doc).encode()
    out, mapping = mask(body, "application/json")
    for original in (b"123456789012", b"i-0123456789abcdef0"):
        assert original not in out, original
    assert b"AWSLogs%2FAWS_ACCOUNT_" in out and b"%2FAWS_EC2_INSTANCE_" in out and b"sure=100%25" in out
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == doc
    text_out, text_mapping = mask(url.encode(), "text/plain")
    assert b"123456789012" not in text_out and restore_bytes(text_out, text_mapping)[0] == url.encode()


def test_identifiers_glued_to_an_underscore_are_masked() -> None:
    # "_" is a word character: a leading word boundary fails after it; a second scan reads it as a space
    text = ("ls: web_i-0123456789abcdef0.log backup_vol-0123456789abcdef0.tar role_arn:aws:iam::123456789012:"
            "role/Deploy key_AKIAIOSFODNN7EXAMPLE; snake_case_names and multi_line stay")
    out, mapping = mask(text.encode(), "text/plain")
    for original in (b"i-0123456789abcdef0", b"vol-0123456789abcdef0", b"123456789012",
                     b"AKIAIOSFODNN7EXAMPLE"):
        assert original not in out, original
    assert b"web_AWS_EC2_INSTANCE_" in out and b"snake_case_names and multi_line stay" in out
    assert restore_bytes(out, mapping)[0] == text.encode()


# Identifiers between separators, inside the wrappers text goes through before it reaches an LLM.
_SEPARATED = {
    "i-0123456789abcdef0": b"i-0123456789abcdef0",
    "arn:aws:iam::123456789012:role/Deploy": b"123456789012",
    "AKIAIOSFODNN7EXAMPLE": b"AKIAIOSFODNN7EXAMPLE",
    "10.20.30.40": b"10.20.30.40",
    "s3://my-data-bucket-77/logs/": b"my-data-bucket-77",
    "sg-0123456789abcdef0": b"sg-0123456789abcdef0",
}
_LEFT = list(" \n\t,;([\'\"=:/|_*`>{#\u201c")
_RIGHT = list(" \n\t,;)]\'\":/|*`<}?&\u201d")
_WRAPPERS = {
    "text": lambda t: (t, "text/plain"),
    "json": lambda t: (json.dumps({"messages": [{"role": "user", "content": t}]}), "application/json"),
    "json-in-json": lambda t: (json.dumps({"messages": [{"role": "tool", "content": json.dumps({"t": t})}]}),
                               "application/json"),
    "percent-encoded": lambda t: (quote(t, safe=""), "text/plain"),
    "percent-encoded-twice": lambda t: (quote(quote(t, safe=""), safe=""), "text/plain"),
    "form-entry-without-value": lambda t: (quote_plus(t), "application/x-www-form-urlencoded"),
}


@pytest.mark.parametrize("wrapper", _WRAPPERS)
def test_identifiers_between_any_separators_in_any_wrapper_never_leak(wrapper: str) -> None:
    leaks = []
    for ident, secret in _SEPARATED.items():
        for left, right in itertools.product(_LEFT, _RIGHT):
            body, ctype = _WRAPPERS[wrapper](f"see{left}{ident}{right}end")
            out, mapping = mask(body.encode(), ctype)
            if secret in out:
                leaks.append((left, ident, right))
            restored = restore_bytes(out, mapping, in_json=ctype == "application/json")[0]
            if ctype == "application/json":
                assert json.loads(restored) == json.loads(body)
            elif "form" in ctype:
                assert parse_qsl(restored.decode(), keep_blank_values=True) == \
                    parse_qsl(body, keep_blank_values=True)
            else:
                assert restored == body.encode()
    assert not leaks, leaks[:10]


def test_log_group_in_a_cloudwatch_console_link_is_masked() -> None:
    # The console writes "%" as "$25" there: $252F is a twice-encoded "/".
    link = ("https://us-east-1.console.aws.amazon.com/cloudwatch/home?region=us-east-1#logsV2:log-groups/"
            "log-group/$252Faws$252Flambda$252Fpayments-prod-handler/log-events")
    body = json.dumps({"messages": [{"role": "user", "content": link}]}).encode()
    out, mapping = mask(body, "application/json")
    assert b"payments-prod-handler" not in out and b"$252Flambda$252FAWS_LAMBDA_FUNCTION_" in out
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0])["messages"][0]["content"] == link


def test_text_documents_sent_as_base64_are_masked_inside() -> None:
    text = b"instance i-0123456789abcdef0 in 10.1.2.3\naccount 123456789012\n"
    b64 = base64.b64encode(text).decode()
    image = base64.b64encode(b"\x89PNG i-0123456789abcdef0").decode()
    doc = {"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": b64}},
        {"type": "file", "file": {"file_data": "data:text/csv;charset=utf-8;base64," + b64}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
        {"type": "text", "text": "data: not base64 but i-0123456789abcdef0", "data": "!!not base64!!"},
        {"inlineData": {"mimeType": "text/markdown", "data": b64}}]}]}
    out, mapping = mask(json.dumps(doc).encode(), "application/json")
    content = json.loads(out)["messages"][0]["content"]
    document = base64.b64decode(content[0]["source"]["data"])
    assert document == b"instance AWS_EC2_INSTANCE_0001 in AWS_IPV4_0001\naccount AWS_ACCOUNT_0001\n"
    prefix, payload = content[1]["file"]["file_data"].split(",", 1)
    assert prefix == "data:text/csv;charset=utf-8;base64" and base64.b64decode(payload) == document
    assert content[2]["source"]["data"] == image  # binary media types are not decoded
    assert "AWS_EC2_INSTANCE_0001" in content[3]["text"]
    assert base64.b64decode(content[4]["inlineData"]["data"]) == document  # Gemini
    assert restore_bytes(document, mapping)[0] == text


def test_text_without_escapes_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    scanner = Scanner(RULES)
    real = scanner.remembered
    monkeypatch.setattr(scanner, "remembered", lambda data: calls.append(data) or real(data))
    BodyMasker(scanner).plan(b"plain text i-0123456789abcdef0 with a path C:\\dir", "text/plain")
    assert len(calls) == 1


def test_malformed_json_is_masked_as_text() -> None:
    body = b'{"messages": [ "i-0123abcd" ,, }'
    out, mapping = mask(body, "application/json")
    assert b"i-0123abcd" not in out
    assert restore_bytes(out, mapping)[0] == body


def test_json_nested_deeper_than_the_parser_allows_is_masked_as_text() -> None:
    body = b'{"a":' * 5000 + b'"i-0123abcd"' + b"}" * 5000
    out, mapping = mask(body, "application/json")
    assert b"i-0123abcd" not in out
    assert restore_bytes(out, mapping)[0] == body


def test_invalid_utf8_is_masked_bytewise() -> None:
    body = b"\xff\xfe broken \xc3 i-0123abcd \x80 arn:aws:iam::123456789012:role/DeployRole"
    out, mapping = mask(body, "text/plain")
    assert b"i-0123abcd" not in out and b"123456789012" not in out
    assert restore_bytes(out, mapping)[0] == body


TEXT = "instance i-0a1b2c3d4e5f60718 runs as arn:aws:iam::123456789012:role/DeployRole"


@pytest.mark.parametrize(("ctype", "codec"), [
    ("text/plain; charset=utf-16", "utf-16"),  # declared, with a byte order mark
    ("text/plain; charset=UTF-16LE", "utf-16-le"),  # declared, without one
    ('text/plain; charset="utf-32"', "utf-32"),
    ("text/plain", "utf-16"),  # not declared: the byte order mark tells
    ("text/plain", "utf-16-be"),  # neither: the zero bytes beside ASCII characters tell
    ("", "utf-32"),
    ("text/plain; charset=cp500", "cp500"),  # EBCDIC: no zero bytes, but no ASCII either
    ("application/json; charset=utf-16", "utf-16"),
    ("application/x-www-form-urlencoded; charset=utf-16", "utf-16"),
])
def test_bodies_in_charsets_that_do_not_write_ascii_as_ascii_are_masked(ctype: str, codec: str) -> None:
    """A byte scan sees nothing in UTF-16 (i\\x00-\\x000\\x00...): such a body is read as text, masked and
    written back in its own charset."""
    if "json" in ctype:
        text = json.dumps({"messages": [{"role": "user", "content": TEXT}]}, separators=(",", ":"))
    elif "form" in ctype:
        text = "q=" + quote_plus(TEXT)
    else:
        text = TEXT
    out, mapping = mask(text.encode(codec), ctype)
    masked = out.decode(codec)
    for ident in IDENTIFYING[:1] + IDENTIFYING[2:4]:
        assert ident not in masked
    assert "AWS_EC2_INSTANCE_" in masked
    restored, n = restore_bytes(masked.encode(), mapping)
    assert n == 3 and restored.decode() == text


def test_a_body_in_a_charset_that_cannot_be_read_is_refused() -> None:
    with pytest.raises(UnreadableBody, match="unknown charset 'klingon'"):
        MASKER.plan(b"i-0123abcd", "text/plain; charset=klingon")
    with pytest.raises(UnreadableBody, match="unknown charset 'base64'"):  # a codec, but not of text
        MASKER.plan(b"i-0123abcd", "text/plain; charset=base64")
    with pytest.raises(UnreadableBody, match="not valid utf-16"):
        MASKER.plan("i-0123abcd".encode("utf-16") + b"\x00\xd8", "text/plain; charset=utf-16")


def test_identifiers_both_in_the_bytes_and_in_the_declared_charset_are_refused() -> None:
    """An upstream may read the declared charset or ignore it: each reading holds an identifier, and one
    body cannot be masked both ways."""
    body = b"i-0123abcd  " + " i-89abcdef".encode("utf-16-le")
    assert MASKER.plan(body, "text/plain").items == [("EC2_INSTANCE", b"i-0123abcd")]  # no charset: bytes
    with pytest.raises(UnreadableBody, match="both as bytes and as utf-16-le text"):
        MASKER.plan(body, "text/plain; charset=utf-16le")


def test_a_wrong_guess_of_utf16_still_masks_the_bytes() -> None:
    body = b"\xff\xfe" + b"log: i-0123abcd and arn:aws:iam::123456789012:role/DeployRole\n"  # FF FE: a BOM?
    assert len(body) % 2 == 0  # decodes as UTF-16 (to nonsense) without an error
    out, mapping = mask(body, "text/plain")
    assert b"i-0123abcd" not in out and b"123456789012" not in out
    assert restore_bytes(out, mapping)[0] == body


@pytest.mark.parametrize(("body", "ctype", "secret"), [
    (b'{"Destination": {"Bucket": "arn:aws:s3:::dest-bucket-aaa"}}', "application/json",
     [b"dest-bucket-aaa"]),
    (b"aws s3api get-object --bucket arn:aws:s3:us-west-2:123456789012:accesspoint/my-ap --key k out",
     "text/plain", [b"123456789012", b"my-ap"]),
    (b'bucket = "arn:aws:s3:::dest-bucket-aaa"', "text/plain", [b"dest-bucket-aaa"]),
    (b'{"RoleName": "arn:aws:iam::123456789012:role/DeployRole"}', "application/json",
     [b"123456789012", b"DeployRole"]),
])
def test_an_arn_as_the_value_of_a_name_field_is_masked_whole(body: bytes, ctype: str,
                                                             secret: list[bytes]) -> None:
    """A field rule (Bucket, RoleName, LogGroupName) must not take the first word of an ARN as the name:
    it would win over the ARN rule (it starts earlier) and leave the account and the name unmasked."""
    out, mapping = mask(body, ctype)
    assert not [s for s in secret if s in out], out
    assert b'"arn:aws:' in out or b" arn:aws:" in out  # the ARN's structure stays readable
    restored = restore_bytes(out, mapping, in_json="json" in ctype)[0]
    assert (json.loads(restored) == json.loads(body)) if "json" in ctype else restored == body


@pytest.mark.parametrize(("name", "body", "ctype", "secret"), [
    # JSON inside a JSON string (a CloudTrail policyDocument, a tool call's arguments): \" around the keys
    ("escaped quotes, list of principals",
     b'{"content":"{\\"policyDocument\\":\\"{\\\\\\"AWS\\\\\\":[\\\\\\"arn:aws:iam::111122223333:root\\\\\\",'
     b'\\\\\\"444455556666\\\\\\"]}\\"}"}', "application/json", [b"111122223333", b"444455556666"]),
    ("escaped quotes, field", b'{\\"RoleName\\": \\"DeployerRoleX\\"}', "text/plain", [b"DeployerRoleX"]),
    ("escaped quotes, list", b'{\\"accountIds\\": [\\"111111111111\\", \\"222222222222\\"]}', "text/plain",
     [b"111111111111", b"222222222222"]),
    ("escaped newlines, YAML list", b'"account_ids:\\n  - 444444444441\\n  - 444444444442\\n"', "text/plain",
     [b"444444444441", b"444444444442"]),
    # \/ (PHP, .NET) inside an ARN and an S3 URI
    ("escaped slash, ARN", b'{"c":"{\\"Arn\\":\\"arn:aws:iam::123456789012:role\\\\/AdminRoleXyz\\"}"}',
     "application/json", [b"123456789012", b"AdminRoleXyz"]),
    ("escaped slash, S3 URI", b'{"c":"{\\"uri\\":\\"s3:\\\\/\\\\/acme-ledger-dev\\\\/raw\\\\/\\"}"}',
     "application/json", [b"acme-ledger-dev"]),
    # \u00XX of ASCII punctuation (Go: \u003c \u003e \u0026, .NET: \u0022, Gson: \u003d)
    ("escaped ASCII",
     b'{"content":"{\\"out\\":\\"\\\\u0022i-0123456789abcdef0\\\\u0022 \\\\u003c10.0.1.5\\\\u003e\\"}"}',
     "application/json", [b"i-0123456789abcdef0", b"10.0.1.5"]),
    # terminal colours (grep --color, loggers) end in a letter: no word boundary before the ID
    ("ANSI colours", b"health check failed for \x1b[01;31m\x1b[Ki-0123456789abcdef0\x1b[m\x1b[K",
     "text/plain", [b"i-0123456789abcdef0"]),
    ("ANSI colours, JSON-escaped",
     b'{"content":"\\u001b[35marn:aws:iam::123456789012:role/AdminRoleXyz\\u001b[0m"}', "application/json",
     [b"123456789012", b"AdminRoleXyz"]),
    # Claude Code's Read tool shows files with a line-number gutter
    ("line-number gutter", "     1\u2192AWS:\n     2\u2192  - arn:aws:iam::111122223333:user/alice\n"
     "     3\u2192  - 444455556666\n".encode(), "text/plain", [b"111122223333", b"444455556666"]),
    ("no-break space after a label", "Account ID:\u00a0123456789012".encode(), "text/plain",
     [b"123456789012"]),
    ("no-break space, JSON value", json.dumps({"note": "Account ID:\u00a0123456789012"}).encode(),
     "application/json", [b"123456789012"]),
    # HTML/XML character references: a page's source, an XML test report, a wiki export
    ("HTML-escaped JSON", b'<pre>{&quot;OwnerId&quot;: &quot;123456789012&quot;, '
     b'&quot;SecretAccessKey&quot;: &quot;wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY&quot;}</pre>', "text/html",
     [b"123456789012", b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]),
    ("numeric references", b'<failure message="{&#34;Account&#34;:&#x22;444455556666&#x22;,&#34;Arn&#34;:'
     b'&#34;arn:aws:iam::444455556666:role&#x2F;AdminRoleXyz&#34;}"/>', "application/xml",
     [b"444455556666", b"AdminRoleXyz"]),
    ("references twice (&amp;quot;)", b"&amp;quot;OwnerId&amp;quot;: &amp;quot;123456789012&amp;quot;",
     "text/plain", [b"123456789012"]),
    ("references in a JSON value", json.dumps({
        "html": "&quot;AccountId&quot;:&quot;123456789012&quot;",
        "k": "&quot;RoleName&quot;: &quot;DeployerRoleX&quot;"}).encode(),
     "application/json", [b"123456789012", b"DeployerRoleX"]),
    # both at once: a page's source JSON-encoded into a string (a tool's result, a function call's arguments)
    ("references and backslash escapes", json.dumps({"content": json.dumps({
        "body": "<pre>Role:\narn:aws:iam::111122223333:role&#x2F;deploy-bot\n</pre>"})}).encode(),
     "application/json", [b"111122223333", b"deploy-bot"]),
    ("references and backslash escapes, a CLI text row", json.dumps({"content": json.dumps({
        "page": "<td>\nVPCS\t10.42.0.0&#x2F;16\tdefault\t209384756102\tvpc&#x2D;0a1b2c3d4e5f67890</td>",
    })}).encode(),
     "application/json", [b"209384756102", b"0a1b2c3d4e5f67890"]),
])
def test_identifiers_behind_escapes_colours_and_gutters_are_masked(name: str, body: bytes, ctype: str,
                                                                  secret: list[bytes]) -> None:
    out, mapping = mask(body, ctype)
    assert not [s for s in secret if s in out], out
    restored = restore_bytes(out, mapping, in_json="json" in ctype)[0]
    assert (json.loads(restored) == json.loads(body)) if "json" in ctype else restored == body


@pytest.mark.parametrize("text", [
    b"Tom &amp; Jerry &lt;b&gt; &unknownentity; &#xD800; &#0; &#99999999; & i-ab & 100&#37;",
    b"&quot;AccountId&quot;: &quot;12345&quot; (&amp; nothing that identifies)",
])
def test_character_references_without_identifiers_change_nothing(text: bytes) -> None:
    assert mask(text, "text/plain") == (text, {})


def test_a_key_given_twice_does_not_send_its_first_value_unscanned() -> None:
    """json.loads keeps the last value of a repeated key: the first is never scanned. Forwarding the body
    as it came (nothing else to mask) would send it; the body is written anew instead, each key once."""
    body = b'{"messages":[{"role":"user","content":"box i-0123456789abcdef0","content":"hi"}]}'
    out, _ = mask(body, "application/json")
    assert b"i-0123456789abcdef0" not in out
    assert json.loads(out) == json.loads(body)  # what a JSON parser reads is unchanged
    clean = b'{"messages":[{"role":"user","content":"say \\"hi\\""}]}'
    assert mask(clean, "application/json")[0] == clean  # no repeated key: forwarded byte for byte


def test_a_lone_surrogate_stays_valid_json() -> None:
    body = b'{"content":"cut emoji \\ud83d at i-0123456789abcdef0"}'
    out, mapping = mask(body, "application/json")
    out.decode("utf-8")  # valid UTF-8: the surrogate is written as an escape again
    assert b"\\ud83d" in out and b"i-0123456789abcdef0" not in out
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == json.loads(body)


@pytest.mark.parametrize(("source", "encoded"), [
    ({"type": "base64", "media_type": "text/plain; charset=utf-8"}, base64.b64encode),  # with parameters
    ({"type": "base64", "media_type": "text/plain"}, base64.encodebytes),  # wrapped at 76 columns
    ({"type": "base64", "media_type": "text/plain"}, lambda b: base64.b64encode(b).rstrip(b"=")),  # unpadded
    ({"type": "base64", "media_type": "text/plain"}, base64.urlsafe_b64encode),
])
def test_text_documents_in_other_base64_forms_are_masked_inside(source: dict[str, Any],
                                                                encoded: Callable[[bytes], bytes]) -> None:
    text = b"host i-0123456789abcdef0 in account 123456789012 -- ~~~??? " * 3 + b"."  # ~?: + / (or - _), "."
    assert len(text) % 3  # so it has padding to drop
    doc = {"type": "document", "source": {**source, "data": encoded(text).decode()}}
    out, mapping = mask(json.dumps({"messages": [{"role": "user", "content": [doc]}]}).encode(),
                        "application/json")
    data = json.loads(out)["messages"][0]["content"][0]["source"]["data"]
    masked = base64.b64decode(data)
    assert b"i-0123456789abcdef0" not in masked and b"123456789012" not in masked
    assert restore_bytes(masked, mapping)[0] == text


def test_a_data_url_without_a_media_type_is_text() -> None:
    url = "data:;base64," + base64.b64encode(b"see i-0123456789abcdef0").decode()  # RFC 2397: text/plain
    out, _ = mask(json.dumps({"file_data": url}).encode(), "application/json")
    assert b"i-0123456789abcdef0" not in base64.b64decode(json.loads(out)["file_data"].split(",", 1)[1])


def test_utf16_without_a_byte_order_mark_or_a_content_type_is_masked() -> None:
    body = json.dumps({"c": "i-0123456789abcdef0"}).encode("utf-16-be")
    out, _ = mask(body, "")
    assert "i-0123456789abcdef0".encode("utf-16-be") not in out and b"i-0123456789abcdef0" not in out


@pytest.mark.parametrize("body", [
    b"upload failed\\nmy-data-bucket.s3.amazonaws.com: 403",  # a pasted JSON log line
    b'{"c":"{\\"err\\":\\"timeout\\\\nmy-data-bucket.s3.amazonaws.com\\"}"}',  # JSON in a JSON string
])
def test_the_letter_of_an_escape_is_not_taken_into_a_hostname(body: bytes) -> None:
    """A hostname or bucket has no word boundary before it: in the bytes, "\nmy-bucket" reads as
    "nmy-bucket". The decoded reading wins: the escape stays whole and the bucket gets one placeholder."""
    out, mapping = mask(body, "application/json" if body.startswith(b"{") else "text/plain")
    assert list(mapping.values()) == [b"my-data-bucket"]
    assert b"\\nAWS_S3_BUCKET_" in out
    restored = restore_bytes(out, mapping, in_json=body.startswith(b"{"))[0]
    assert (json.loads(restored) == json.loads(body)) if body.startswith(b"{") else restored == body


@pytest.mark.parametrize("text", [
    "SECURITYGROUPS\tweb tier\tsg-0123456789abcdef0\tweb\t123456789013\tvpc-0123456789abcdef0\n",
    "USERIDGROUPPAIRS\tsg-0123456789abcdef0\t111122223333\n",
    "2025-03-04 05:06:07 cdk-hnb659fds-assets-123456789012-us-east-1",
    "ALIASES\tarn:aws:kms:us-east-1:111122223333:alias/aws/ebs\talias/aws/ebs\t2024-01-01T00:00:00.000000+00:00"
    "\t0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e\n",
])
def test_a_line_anchored_rule_matches_the_first_line_of_a_short_json_string(text: str) -> None:
    """A tool result is often just a command's output: its first line (a --output text row, an ``aws s3 ls``
    line) starts the string. Short strings (up to CONTEXT_VALUE_MAX) are scanned once, after their key, and
    the rules anchored at a line start (``(?m)^ROW-LABEL\t…``) then saw the key's quote before the row, not a
    line start: the row's account ID / bucket / key leaked, while the same text as a longer string, as the
    second line, or as a text body was masked. A value that starts with a byte such a rule can start with
    is now scanned alone too."""
    secret = [m for m in (b"123456789013", b"111122223333", b"cdk-hnb659fds-assets-123456789012-us-east-1",
                          b"0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e") if m in text.encode()]
    assert secret and not [s for s in secret if s in mask(text.encode(), "text/plain")[0]]  # as a text body
    body = json.dumps({"role": "user", "content": [{"type": "tool_result", "content": text}]}).encode()
    out, _ = mask(body, "application/json")
    assert not [s for s in secret if s in out], out
    form = b"out=" + quote_plus(text).encode()  # a form value is scanned after its key too
    out, _ = mask(form, "application/x-www-form-urlencoded")
    assert not [s for s in secret if quote_plus(s.decode()).encode() in out], out


def test_the_bytes_line_anchored_rules_start_with() -> None:
    from aws_masker.scanner import _anchored_starts
    cases = {rb"(?m)^abc": {b"ab"}, rb"(?i)(?m)^ab": {b"ab", b"aB", b"Ab", b"AB"},
             rb"x|(?m:^(?i:q)z)": {b"qz", b"Qz"}, rb"\bfoo(?m:^x)": set(), rb"(?m)^\s*$": None,
             rb"(?m)^[0-1]\d": {b"%d%d" % (a, b) for a in range(2) for b in range(10)},
             rb"(?m)(?:^|,)(?:AB|C)?D": {b"AB", b"CD", b"D"}, rb"(?m)^a\tb": {b"a\t"},
             rb"\A-?x": {b"-x", b"x"}}
    for pattern, want in cases.items():
        assert _anchored_starts(re.compile(pattern)) == want, pattern
    one, two = SCANNER.line_starts()
    assert one[ord("U")] and one[ord("2")] and not one[ord("x")]
    assert two[ord("U") << 8 | ord("S")] and not two[ord("T") << 8 | ord("h")]  # USERIDGROUPPAIRS, not "The"


def test_remembered_decoded_scans_do_not_depend_on_the_first_callers_hits() -> None:
    """The hits of a text read with its escapes decoded are remembered by the text; which of them a caller
    already has depends on the context it scanned the text after, so the first caller's must not be
    left out of what the next one gets."""
    masker = BodyMasker(SCANNER)
    data = b'{\\"RoleName\\": \\"DeployerRoleX\\"}'
    found = masker._unescaped(data, set())
    assert [data[h[0]:h[1]] for h, _ in found] == [b"DeployerRoleX"]
    masker.clear_cache()
    assert masker._unescaped(data, {found[0][0]}) == []  # this caller had it already
    assert masker._unescaped(data, set()) == found  # the next one, without it, still gets it


def test_a_value_is_recognised_by_the_name_beside_it() -> None:
    """Container environments ({"name": …, "value": …}) and tags ({"Key": …, "Value": …}) label a value
    with a sibling, not with its key."""
    env = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},
           {"name": "ASSETS_BUCKET", "value": "contoso-checkout-assets"},
           {"name": "LOG_LEVEL", "value": "debug"}]
    body = json.dumps({"containerDefinitions": [{"environment": env}],
                       "Tags": [{"Key": "OwnerAccount", "Value": "123456789012"}]}).encode()
    out, mapping = mask(body, "application/json")
    for secret in (b"wJalrXUtnFEMI/K7MDENG", b"contoso-checkout-assets", b"123456789012"):
        assert secret not in out
    assert b'"value":"debug"' in out
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == json.loads(body)


REPEATS_TEXT = (
    "Why can't arn:aws:iam::123456789012:role/deploy-bot-prod assume it? The deploy-bot-prod role is new.\n"
    "Billing shows 123456789012 twice. Bucket s3://acme-invoices-2026/reports/; acme-invoices-2026.\n"
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    "pasted again: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
REPEATED = ["123456789012", "deploy-bot-prod", "acme-invoices-2026",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]


def test_a_name_found_by_its_context_is_masked_where_it_repeats_without_it() -> None:
    out, mapping = mask(REPEATS_TEXT.encode(), "text/plain")
    for original in REPEATED:
        assert original.encode() not in out, original
        placeholder = {o: p for p, o in mapping.items()}[original.encode()]
        assert out.count(placeholder) == 2, (original, out)  # one placeholder for both occurrences
    assert restore_bytes(out, mapping)[0] == REPEATS_TEXT.encode()
    plan = MASKER.plan(REPEATS_TEXT.encode(), "text/plain")
    assert plan.rule_counts["repeat"] == 4
    assert len(plan.items) == 4  # no new identifiers: the same four originals


ORG_ACCOUNTS_JSON = {"Accounts": [
    {"Id": "444455556666", "Arn": "arn:aws:organizations::111122223333:account/o-exampleorgid/444455556666",
     "Email": "dev@example.com", "Name": "acme-dev", "Status": "ACTIVE"},
    {"Id": "111122223333", "Arn": "arn:aws:organizations::111122223333:account/o-exampleorgid/111122223333",
     "Email": "root@example.com", "Name": "acme-management", "Status": "ACTIVE"}]}
ORG_ACCOUNTS_TABLE = """\
------------------------------------------------------------------------------------------------
|                                         ListAccounts                                         |
+----------------------------------------------------------------------------------------------+
||                                          Accounts                                          ||
|+---------------------------------------------------------------------------+----------------+|
||                                    Arn                                    |       Id       ||
|+---------------------------------------------------------------------------+----------------+|
||  arn:aws:organizations::111122223333:account/o-exampleorgid/444455556666  |  444455556666  ||
|+---------------------------------------------------------------------------+----------------+|
"""


@pytest.mark.parametrize("text", [json.dumps(ORG_ACCOUNTS_JSON, indent=4), ORG_ACCOUNTS_TABLE,
                                  "ACCOUNTS\tarn:aws:organizations::111122223333:account/o-exampleorgid/"
                                  "444455556666\tdev@example.com\t444455556666\tCREATED\tacme-dev\tACTIVE"])
def test_member_accounts_of_an_organization_are_masked_wherever_they_stand(text: str) -> None:
    # The member account's ID stands in its Organizations ARN (account/o-.../MEMBER) and again, bare, in
    # "Id", a table cell or a text column: the ARN's rule must give it as an account for the rest to follow.
    body = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
    out, mapping = mask(body, "application/json")
    for secret in (b"444455556666", b"111122223333", b"o-exampleorgid"):
        assert secret not in out
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == json.loads(body)


def test_names_inside_composite_arn_resources_are_masked_where_they_repeat() -> None:
    # ELB and ECS ARNs hold a name beside an ID (loadbalancer/app/NAME/ID, service/CLUSTER/SERVICE), Glue's a
    # table beside its database, DynamoDB's a stream beside its table: taken for one name, the name in
    # LoadBalancerName / serviceName / TargetGroupName / DatabaseName, or in a log line, was forwarded.
    doc = {"LoadBalancers": [{"LoadBalancerArn": "arn:aws:elasticloadbalancing:us-east-1:111122223333:"
                                                 "loadbalancer/app/orders-alb/50dc6c495c0c9188",
                              "LoadBalancerName": "orders-alb"}],
           "TargetGroups": [{"TargetGroupArn": "arn:aws:elasticloadbalancing:us-east-1:111122223333:"
                                               "targetgroup/orders-tg/73e2d6bc24d8a067",
                             "TargetGroupName": "orders-tg"}],
           "services": [{"serviceArn": "arn:aws:ecs:us-east-1:111122223333:service/orders-cluster/orders-api",
                         "serviceName": "orders-api",
                         "taskDefinition": "arn:aws:ecs:us-east-1:111122223333:"
                                           "task-definition/orders-task:42",
                         "events": [{"message": "(service orders-api) has reached a steady state."}]}],
           "nodegroup": {"nodegroupName": "orders-ng-spot",
                         "nodegroupArn": "arn:aws:eks:us-east-1:111122223333:nodegroup/orders-eks/"
                                         "orders-ng-spot/a2c2d3e4-1f2a-4b5c-8d9e-0a1b2c3d4e5f"},
           "execution": {"executionArn": "arn:aws:states:us-east-1:111122223333:execution:orders-pipeline:"
                                         "run-2026-12-07-a1", "name": "run-2026-12-07-a1"},
           "jobDefinitions": [{"jobDefinitionName": "orders-etl", "revision": 7,
                               "jobDefinitionArn": "arn:aws:batch:us-east-1:111122223333:"
                                                   "job-definition/orders-etl:7"}],
           "Table": {"Name": "orders_2026", "DatabaseName": "sales_db",
                     "arn": "arn:aws:glue:us-east-1:111122223333:table/sales_db/orders_2026"},
           "mapRun": {"mapRunArn": "arn:aws:states:us-east-1:111122223333:mapRun:orders-pipeline/"
                                   "ProcessOrders:2f1e5c3a-8b7d-4e6f-9a0b-1c2d3e4f5a6b",
                      "note": "the ProcessOrders map state of orders-pipeline"},
           "Records": [{"eventSourceARN": "arn:aws:dynamodb:us-east-1:111122223333:table/orders-table/stream/"
                                          "2026-01-01T00:00:00.000"}],
           "log": "processed 3 records of orders-table",
           "Consumers": [{"ConsumerARN": "arn:aws:kinesis:us-east-1:111122223333:stream/orders-stream/"
                                        "consumer/orders-consumer:1700000000"}],
           "Rules": [{"Arn": "arn:aws:events:us-east-1:111122223333:rule/orders-bus/nightly-orders"}],
           "question": "why does nightly-orders on orders-bus lag behind orders-stream?",
           "SecretList": [{"ARN": "arn:aws:secretsmanager:us-east-1:111122223333:secret:prod/orders/"
                                  "db-password-AbCdEf"}],
           "todo": "rotate prod/orders/db-password",
           # a pipeline's name, an API ID of letters only: the generic rule took them for a resource type
           "pipelineArn": "arn:aws:codepipeline:us-east-1:111122223333:orders-pipe/Deploy/DeployToProd",
           "methodArn": "arn:aws:execute-api:us-east-1:111122223333:abcdefghij/prod/GET/orders",
           "ServiceArn": "arn:aws:apprunner:us-east-1:111122223333:service/orders-svc/"
                         "0123456789abcdef0123456789abcdef",
           "status": "orders-svc is RUNNING"}
    body = json.dumps(doc).encode()
    out, mapping = mask(body, "application/json")
    for name in (b"orders-alb", b"orders-tg", b"orders-api", b"orders-cluster", b"orders-task",
                 b"orders-ng-spot", b"orders-eks", b"run-2026-12-07-a1", b"orders-etl", b"50dc6c495c0c9188",
                 b"111122223333", b"orders_2026", b"sales_db", b"ProcessOrders", b"orders-table",
                 b"orders-stream", b"orders-consumer", b"orders-bus", b"nightly-orders",
                 b"prod/orders/db-password", b"orders-pipe", b"DeployToProd", b"abcdefghij", b"orders-svc"):
        assert name not in out, name
    assert b"task-definition/AWS_ARN_ECS_" in out and b":42" in out  # the revision stays
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == doc


def test_repeats_in_other_json_strings_and_base64_documents_are_masked() -> None:
    doc = {"messages": [
        {"role": "user", "content": "assume arn:aws:iam::123456789012:role/deploy-bot-prod please"},
        {"role": "assistant", "content": "Which account is deploy-bot-prod in?"},  # no hit of its own
        {"role": "user", "content": [
            {"type": "text", "text": "this one: 123456789012"},
            {"type": "document", "source": {"type": "base64", "media_type": "text/plain",
                                            "data": base64.b64encode(b"owner 123456789012\n").decode()}}]}],
        "metadata": {"deploy-bot-prod": "key stays"}}
    body = json.dumps(doc).encode()
    out, mapping = mask(body, "application/json")
    masked = json.loads(out)
    assert b"123456789012" not in out and b"deploy-bot-prod" not in out.replace(b'"deploy-bot-prod":', b"")
    assert "deploy-bot-prod" in masked["metadata"]  # keys stay
    document = base64.b64decode(masked["messages"][2]["content"][1]["source"]["data"])
    assert b"123456789012" not in document and restore_bytes(document, mapping)[0] == b"owner 123456789012\n"
    restored = json.loads(restore_bytes(out, mapping, in_json=True)[0])
    restored["messages"][2]["content"][1] = doc["messages"][2]["content"][1]  # base64: compared above
    assert restored == doc


def test_repeats_are_found_when_the_client_escapes_slashes() -> None:
    # The secret's "/" written as "\/" in the raw body: counting it there cannot tell; strings are searched.
    body = (b'{"messages":[{"role":"user","content":"aws_secret_access_key = wJalrXUtnFEMI\\/K7MDENG\\/bPxRfi'
            b'CYEXAMPLEKEY"},{"role":"user","content":"again wJalrXUtnFEMI\\/K7MDENG\\/'
            b'bPxRfiCYEXAMPLEKEY"}]}')
    assert json.loads(body)["messages"][1]["content"].endswith("/bPxRfiCYEXAMPLEKEY")
    out, mapping = mask(body, "application/json")
    assert b"bPxRfiCYEXAMPLEKEY" not in out
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == json.loads(body)


@pytest.mark.parametrize("text", [
    "deploy-bot-prod-2 and xdeploy-bot-prod and deploy-bot_prod",  # other, longer names
    "deploy-bot-prod.example.com and api.deploy-bot-prod",  # a hostname that holds it
    "1234567890123 and 123456789012345",  # longer numbers
])
def test_a_repeat_inside_a_longer_name_is_not_masked(text: str) -> None:
    body = f"role arn:aws:iam::123456789012:role/deploy-bot-prod\n{text}".encode()
    out, _ = mask(body, "text/plain")
    assert out.endswith(text.encode())


PASTED_BY_A_DEVELOPER = "\n".join((
    # found leaking by a recall hunt on CLI output, Terraform, boto3 code and CI scripts
    'ddb = boto3.resource("dynamodb").Table("payments-ledger-prod")',
    "Processing 3 records from payments-ledger-prod",
    'resource "aws_instance" "bastion" {',
    '  key_name             = "acme-bastion"',
    '  iam_instance_profile = "acme-bastion-profile"',
    "}",
    "ssh -i ~/.ssh/acme-bastion.pem ec2-user@10.20.31.142",
    '{"DBInstanceIdentifier": "payments-prod-db", "MasterUsername": "payments_admin",'
    ' "DBSubnetGroup": {"DBSubnetGroupName": "payments-db-subnets"}}',
    '{"AutoScalingGroupName": "payments-asg-prod", "LaunchTemplateName": "payments-lt"}',
    '{"Instances": [{"InstanceArn": "arn:aws:sso:::instance/ssoins-0123456789abcdef"}]}',
    '{"Organization": {"MasterAccountId": "210987654321", "MasterAccountEmail": "aws-root@acme-corp.com"}}',
    '  + name          = "alias/payments-prod"',
    "aws ecs update-service --cluster payments --service payments-api --force-new-deployment",
    "why did payments-api fail to reach payments-ledger-prod?",
    "SessionId: vpce-svc-0a1b2c3d4e5f67890",
))


def test_what_a_recall_hunt_found_in_pasted_text_is_masked() -> None:
    body = PASTED_BY_A_DEVELOPER.encode()
    out, mapping = mask(body, "text/plain")
    for name in (b"payments-ledger-prod", b"acme-bastion", b"payments-prod-db", b"payments_admin",
                 b"payments-db-subnets", b"payments-asg-prod", b"payments-lt", b"ssoins-0123456789abcdef",
                 b"aws-root@acme-corp.com", b"payments-prod", b"payments-api", b"0a1b2c3d4e5f67890"):
        assert name not in out, name
    assert b"ec2-user@" in out and b"--force-new-deployment" in out  # the rest stays
    assert restore_bytes(out, mapping)[0] == body


@pytest.mark.parametrize("text", [
    "ssh -i ~/.ssh/deploy-bot-prod.pem ec2-user@host",
    "saved to deploy-bot-prod.tar.gz, see deploy-bot-prod.json.",
    "copy DEPLOY-KEY: deploy-bot-prod.PEM",
])
def test_a_repeat_before_a_files_extension_is_masked(text: str) -> None:
    body = f"role arn:aws:iam::123456789012:role/deploy-bot-prod\n{text}".encode()
    out, mapping = mask(body, "text/plain")
    assert b"deploy-bot-prod" not in out
    assert restore_bytes(out, mapping)[0] == body


def test_only_what_rules_find_by_context_is_searched_for_repeats() -> None:
    standalone = SCANNER.standalone_rules()
    assert {"aws-ec2-instance-id", "ipv4-address", "aws-access-key-id"} <= standalone  # found anywhere
    assert not {"aws-arn-iam", "aws-s3-uri", "aws-secret-access-key", "aws-account-id-field"} & standalone
    plan = MASKER.plan(b"i-0123456789abcdef0 10.1.2.3 arn:aws:iam::123456789012:role/deploy-bot",
                       "text/plain")
    assert plan.names == {b"123456789012": "ACCOUNT", b"deploy-bot": "IAM_ROLE"}


def test_short_names_of_letters_only_are_not_masked_everywhere() -> None:
    # A role named "admin" found in an ARN: masking every "admin" in the prompt would hide the word itself.
    out, _ = mask(b"arn:aws:iam::123456789012:role/admin\nthe admin team owns it", "text/plain")
    assert out.endswith(b"the admin team owns it")
    assert b"role/admin" not in out


def test_the_search_for_repeats_is_bounded_to_the_first_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import aws_masker.masking as masking

    text = REPEATS_TEXT.encode()
    monkeypatch.setattr(masking, "REPEAT_BUDGET", len(text))  # one name x this body: two names searched
    plan = MASKER.plan(text, "text/plain")
    assert list(plan.names) == [b"123456789012", b"deploy-bot-prod"] and plan.names_left >= 2
    out, mapping = mask(text, "text/plain")
    assert b"123456789012" not in out and b"deploy-bot-prod" not in out
    assert out.count(b"acme-invoices-2026") == 1  # its repeat was not searched
    assert restore_bytes(out, mapping)[0] == text


def test_a_repeat_written_with_ascii_escapes_is_found() -> None:
    # "deploy\u002dbot-prod" is "deploy-bot-prod": counting the name's bytes in the body cannot see it.
    body = (b'{"messages":[{"role":"user","content":"arn:aws:iam::123456789012:role/deploy-bot-prod"},'
            b'{"role":"user","content":"is deploy\\u002dbot-prod new?"}]}')
    assert json.loads(body)["messages"][1]["content"] == "is deploy-bot-prod new?"
    out, mapping = mask(body, "application/json")
    assert "deploy-bot-prod" not in json.loads(out)["messages"][1]["content"]
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == json.loads(body)


@pytest.mark.parametrize(("body", "ctype", "name"), [
    # counting the name's bytes in the raw body balanced out: its hit is written otherwise there
    (rb'{"a":"arn:aws:iam::12345678901\u0032:role/x","b":"see 123456789012"}', "application/json",
     b"123456789012"),
    (rb'{"SecretAccessKey":"wJalrXUtnFEMI\/K7MDENG\/bPxRfiCYEXAMPLEKEY",'
     rb'"b":"key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}', "application/json", b"bPxRfiCYEXAMPLEKEY"),
    (b"SecretAccessKey=wJalrXUtnFEMI%2FK7MDENG%2FbPxRfiCYEXAMPLEKEY&note=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "application/x-www-form-urlencoded", b"bPxRfiCYEXAMPLEKEY"),
    (b"arn=arn:aws:iam::123456789012:role/deploy-bot&note=the+deploy%2Dbot+role",
     "application/x-www-form-urlencoded", b"deploy"),
    # the letter of an escape or a terminal colour right before the repeat
    (b'arn:aws:iam::123456789012:role/deploy-bot {"note":"roles:\\ndeploy-bot\\tdeploy-bot '
     b'\\u201cdeploy-bot"}', "text/plain", b"deploy-bot"),
    (json.dumps({"a": "arn:aws:iam::123456789012:role/deploy-bot",
                 "arguments": json.dumps({"note": "roles:\ndeploy-bot"})}).encode(), "application/json",
     b"deploy-bot"),
    (b"arn:aws:iam::123456789012:role/deploy-bot\n\x1b[31mdeploy-bot\x1b[0m", "text/plain", b"deploy-bot"),
])
def test_repeats_found_by_an_adversarial_review(body: bytes, ctype: str, name: bytes) -> None:
    out, mapping = mask(body, ctype)
    assert name not in out, out
    restored = restore_bytes(out, mapping, in_json="json" in ctype)[0]
    if "json" in ctype:
        assert json.loads(restored) == json.loads(body)


COLOURED_TERRAFORM = ("\x1b[0m\x1b[1maws_iam_role.deploy: Refreshing state... [id=deploy-bot]\x1b[0m\n"
                      "    12\u2192aws_s3_bucket.logs: Refreshing state... [id=acme-logs-prod]\n"
                      "web_i-0123456789abcdef0 \x1b[31mweb_i-0fedcba9876543210\x1b[0m\n")


@pytest.mark.parametrize("wrap", ["text", "json", "json in json"])
def test_coloured_terraform_output_is_masked(wrap: str) -> None:
    """Terraform prints its progress lines in colour (ESC[1m before the address); reading the colours as
    blanks must not also read the underscores of aws_iam_role as glued to an identifier."""
    if wrap == "text":
        body, ctype = COLOURED_TERRAFORM.encode(), "text/plain"
    else:
        content = COLOURED_TERRAFORM if wrap == "json" else json.dumps({"stdout": COLOURED_TERRAFORM})
        body = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
        ctype = "application/json"
    out, mapping = mask(body, ctype)
    for original in (b"deploy-bot", b"acme-logs-prod", b"0123456789abcdef0", b"0fedcba9876543210"):
        assert original not in out, (original, out)
    restored = restore_bytes(out, mapping, in_json=wrap != "text")[0]
    assert (restored == body) if wrap == "text" else (json.loads(restored) == json.loads(body))


def test_a_name_that_starts_a_line_number_is_not_a_repeat() -> None:
    """Found by the property test: a line "1234567890120→" reads as a line-number gutter (blanks), so the
    account ID at its start looked as if it stood alone; masking it glued its placeholder to the "0" after
    it, and the reply could not be restored."""
    text = ("arn:aws:iam::123456789012:role/DeployRole\n1234567890120\u2192 next\n"
            "    7\u2192123456789012").encode()
    out, mapping = mask(text, "text/plain")
    assert b"\n1234567890120\xe2\x86\x92" in out  # a longer number: not the name
    assert out.endswith(b"7\xe2\x86\x92AWS_ACCOUNT_0001")  # after a real gutter: the name, masked
    assert restore_bytes(out, mapping)[0] == text


def test_repeats_in_form_bodies() -> None:
    body = b"q=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fdeploy-bot-prod&note=deploy-bot-prod+is+new"
    out, mapping = mask(body, "application/x-www-form-urlencoded")
    assert b"deploy-bot-prod" not in out and b"123456789012" not in out
    restored = [(k, restore_bytes(v.encode(), mapping)[0].decode()) for k, v in parse_qsl(out.decode())]
    assert restored == parse_qsl(body.decode())


@pytest.mark.parametrize(("body", "ctype"), [
    (b"which account is deploy-bot-prod in? 123456789012, I think", "text/plain"),
    (json.dumps({"messages": [{"role": "user", "content": "is deploy-bot-prod in 123456789012?"}]}).encode(),
     "application/json"),  # a JSON body with no hit of its own: its strings are searched
    (b"note=deploy-bot-prod+in+123456789012", "application/x-www-form-urlencoded"),
])
def test_names_the_url_gives_away_are_masked_where_they_repeat_in_the_body(body: bytes, ctype: str) -> None:
    url = b"/v1/messages?profile=arn:aws:iam::123456789012:role/deploy-bot-prod"
    url_hits, url_keys = MASKER.scan_text(url)
    assert sorted(k[1] for k in url_keys) == [b"123456789012", b"deploy-bot-prod"]
    assert not MASKER.plan(body, ctype).items  # on its own the body holds nothing a rule finds
    plan = MASKER.plan(body, ctype, also=list(zip(url_hits, url_keys, strict=True)))
    assert sorted(plan.items) == sorted(url_keys)  # the same keys, so the same placeholders as the URL's
    out, mapping = plan.render(asyncio.run(MemoryStore().placeholders_for(plan.items)))
    assert b"deploy-bot-prod" not in out and b"123456789012" not in out, out
    assert plan.rule_counts["repeat"] == 2
    restored = restore_bytes(out, mapping, in_json="json" in ctype)[0]
    if "form" in ctype:
        assert parse_qsl(restored.decode()) == parse_qsl(body.decode())
    else:
        assert restored == body if "json" not in ctype else json.loads(restored) == json.loads(body)
    assert not MASKER.plan(body, ctype).items  # nothing of the URL stays behind for the next request


def test_json_keys_that_would_collide_once_masked_are_refused() -> None:
    """masker_json_keys: a key the client wrote as the very placeholder another key gets (one value would be
    lost in the rewritten object) makes the body unmaskable, with a message naming only the placeholder."""
    masker = BodyMasker(SCANNER)
    masker.mask_keys = True
    body = json.dumps({"input": {"i-0123456789abcdef0": "stop", "AWS_EC2_INSTANCE_0001": "start"}}).encode()
    plan = masker.plan(body, "application/json")
    with pytest.raises(UnreadableBody, match="AWS_EC2_INSTANCE_0001") as e:
        plan.render([b"AWS_EC2_INSTANCE_0001"])
    assert "i-0123456789abcdef0" not in str(e.value) and "stop" not in str(e.value)
    out, _ = plan.render([b"AWS_EC2_INSTANCE_0002"])  # another placeholder: both keys stay, both values
    assert json.loads(out)["input"] == {"AWS_EC2_INSTANCE_0002": "stop", "AWS_EC2_INSTANCE_0001": "start"}


@pytest.mark.parametrize("body", [b"1", b"null", b"true", b"888880", b"-2.5e3"])
def test_a_json_document_that_is_a_number_or_a_constant_is_forwarded_as_it_is(body: bytes) -> None:
    assert mask(body, "application/json") == (body, {})


def test_bodies_found_by_the_fuzzer_in_other_charsets() -> None:
    # a JSON escape of a character the declared charset cannot write goes back as an escape
    out, _ = mask('"\\u20ac i-0123456789abcdef0"'.encode("cp500"), "application/json; charset=cp500")
    assert json.loads(out.decode("cp500")).startswith("\u20ac AWS_EC2_INSTANCE_")
    # UTF-16 without a byte order mark under a JSON type (invalid JSON, NDJSON)
    for body, ctype in (('{"a": i-0123456789abcdef0}'.encode("utf-16-le"), "application/json"),
                        ("i-0123456789abcdef0".encode("utf-16-le"), "application/x-ndjson")):
        out, _ = mask(body, ctype)
        assert "AWS_EC2_INSTANCE_" in out.decode("utf-16-le")
    # a JSON body under a declared charset other than UTF-8 is written back in ASCII (escapes)
    out, _ = mask(b'{"a": "\\u00e9 i-0123456789abcdef0"}', "application/json; charset=latin-1")
    assert out.isascii() and json.loads(out)["a"].startswith("\u00e9 AWS_EC2_INSTANCE_")
    out, _ = mask(b'{"a": "\\u00e9 i-0123456789abcdef0"}', "application/json; charset=utf-8")
    assert "\u00e9".encode() in out  # UTF-8: written as it is


def test_json_escapes_around_identifiers() -> None:
    doc = {"text": "line1\ni-0123abcd\t\"i-89abcdef\"\\é i-0a1b2c3d4e5f60718"}
    for ensure_ascii in (True, False):
        body = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
        out, mapping = mask(body, "application/json")
        for ident in ("i-0123abcd", "i-89abcdef", "i-0a1b2c3d4e5f60718"):
            assert ident.encode() not in out
        assert json.loads(restore_bytes(out, mapping)[0]) == doc


def test_gzip_bodies_are_the_callers_job_but_bytes_survive() -> None:
    # The addon decodes Content-Encoding before masking; masking compressed bytes finds nothing.
    raw = gzip.compress(b"i-0123abcd")
    assert MASKER.plan(raw, "application/octet-stream").items == []


def test_placeholder_counter_never_reads_as_a_shorter_one() -> None:
    mapping = {format_placeholder("EC2_INSTANCE", n): f"i-{n:08x}".encode() for n in range(1, 1201)}
    text = b" ".join(format_placeholder("EC2_INSTANCE", n) for n in (100, 1000, 10, 1, 1200))
    restored, _ = restore_bytes(text, mapping)
    assert restored == b"i-00000064 i-000003e8 i-0000000a i-00000001 i-000004b0"
    # A token that is not in this flow's mapping stays as typed.
    assert restore_bytes(b"AWS_EC2_INSTANCE_99999", mapping)[0] == b"AWS_EC2_INSTANCE_99999"


def test_placeholder_typed_by_the_client_is_not_restored_from_another_flow() -> None:
    store = MemoryStore()
    _, first = mask(b"i-0123abcd", store=store)
    token = next(iter(first))
    out, mapping = mask(b"the literal " + token, store=store)
    assert out == b"the literal " + token and mapping == {}
    assert restore_bytes(b"echo " + token, mapping)[0] == b"echo " + token


FILLER = st.lists(st.sampled_from([*" \n\t,.:;\"'()[]{}=/-_abcXYZ019é→", "&quot;", "&#x2F;", "&amp;", "&#47;",
                                   "%2F", "AWS_", "MY_AWS_X_"]),  # what decoded views read; a token's start
                  max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(FILLER, st.sampled_from(IDS + BARE + [""])), max_size=12), FILLER)
def test_property_restore_of_mask_is_identity(parts: list[tuple[str, str]], tail: str) -> None:
    text = ("".join(f + i for f, i in parts) + tail).encode()
    out, mapping = mask(text, "text/plain")
    assert restore_bytes(out, mapping)[0] == text


@pytest.mark.parametrize("seed", range(20))
def test_identifiers_at_every_position_never_leak(seed: int) -> None:
    rnd = random.Random(seed)
    words = ["deploy", "the", "stack", "us-east-1", "m5.large", "v1.2.3", "->", "(", ")", "'", '"']
    parts = []
    for _ in range(60):
        parts.append(rnd.choice(words + IDS + BARE))
        parts.append(rnd.choice([" ", "\n", ", ", " / ", ": ", "\t", "; "]))
    at = sorted(2 * rnd.randrange(61) for _ in range(2))  # before a word: where the ARNs that give away the
    for arn, k in zip(IDS[2:4], reversed(at), strict=True):  # names of BARE go (the later one first)
        parts.insert(k, arn + " ")
    text = "".join(parts).encode()
    out, mapping = mask(text)
    assert restore_bytes(out, mapping)[0] == text
    leaked = [i for i in IDENTIFYING if i.encode() in out]
    assert not leaked, (leaked, text)


def test_scan_results_of_long_texts_are_remembered_safely() -> None:
    scanner = Scanner(RULES)
    text = ("padding " * 100 + "i-0123abcd and arn:aws:iam::123456789012:role/DeployRole").encode()
    first = scanner.scan(text)
    first.append(first[0])  # a caller changing its list must not change what is remembered
    second = scanner.scan(text)
    assert second == first[:-1] and len(second) == 3
    scanner.clear_cache()
    assert scanner.scan(text) == second
    assert len(scanner.scan(text + b" i-89abcdef")) == 4  # a different text is scanned again
    for _ in range(2):  # the (kind, original) keys are remembered with the hits, and copied out too
        hits, keys = scanner.scan_keys(text)
        assert keys == [(h.kind, text[h.start:h.end]) for h in hits] and hits == second
        keys.clear()


def test_scan_results_of_short_texts_are_remembered_safely() -> None:
    scanner = Scanner(RULES)
    text = b"see i-0123abcd in 10.1.2.3"
    first = scanner.scan(text)
    assert [text[h.start:h.end] for h in first] == [b"i-0123abcd", b"10.1.2.3"]
    first.clear()  # a caller changing its list must not change what is remembered
    assert len(scanner.scan(text)) == 2
    for n in range(5000):  # more short texts than are kept: the oldest are forgotten, results stay right
        assert len(scanner.scan(b"vol-%08x" % n)) == 1
    assert len(scanner.scan(text)) == 2


@pytest.mark.parametrize("text", [
    "Launch it with --key-name jane-laptop. Then: ssh -i ~/.ssh/jane-laptop.pem ec2-user@host",
    '{"KeyName": "jane-laptop"}\nssh -i jane-laptop.pem host',
])
def test_a_key_pair_named_at_a_sentences_end_is_masked_in_its_pem_file_too(text: str) -> None:
    # "--key-name jane-laptop." took the full stop into the name, so "jane-laptop.pem" was no repeat of it
    body = text.encode()
    out, mapping = mask(body, "text/plain")
    assert b"jane-laptop" not in out
    assert restore_bytes(out, mapping)[0] == body
