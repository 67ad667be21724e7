"""The built-in rule catalog (rules/*.yaml): self-checks, engine parity, cross-rule cases, loader errors."""

from __future__ import annotations

import itertools
import json
import random
import re
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aws_masker.rules import (
    BUILTIN_RULES_DIR,
    Rule,
    RuleError,
    check_examples,
    load_file,
    load_rules,
    with_followed,
)
from aws_masker.scanner import HAVE_HYPERSCAN, Hit, Scanner

ENGINES = [
    pytest.param("hyperscan", marks=pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")),
    "python",
]


@cache
def catalog() -> tuple[Rule, ...]:
    return tuple(load_rules())


@cache
def full_scanner(engine: str) -> Scanner:
    return Scanner(catalog(), engine)


def scan(text: str, engine: str = "auto") -> list[tuple[str, str]]:
    """(masked value, kind) pairs for ``text`` with the whole catalog."""
    data = text.encode("utf-8")
    scanner = full_scanner("hyperscan" if HAVE_HYPERSCAN and engine == "auto" else
                           "python" if engine == "auto" else engine)
    return [(data[h.start:h.end].decode("utf-8"), h.kind) for h in scanner.scan(data)]


def kinds_of(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for value, kind in scan(text):
        out.setdefault(value, set()).add(kind)
    return out


# --- the catalog itself ---------------------------------------------------------------------------------

def test_catalog_is_split_over_commented_topic_files() -> None:
    files = sorted(BUILTIN_RULES_DIR.glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert path.read_text(encoding="utf-8").startswith("#"), f"{path} lacks a comment header"
        assert load_file(path), f"{path} holds no rules"


def test_every_rule_is_documented_and_exemplified() -> None:
    rules = catalog()
    assert len({r.id for r in rules}) == len(rules)
    for rule in rules:
        assert len(rule.description) >= 20, rule.id
        assert rule.keywords, f"{rule.id} has no keywords"
        assert sum(1 for ex in rule.examples if ex.masked) >= 2, f"{rule.id} needs several examples"
        assert len(rule.counterexamples) >= 2, f"{rule.id} needs hard negatives"


@pytest.mark.parametrize("engine", ENGINES)
def test_examples_and_counterexamples_hold(engine: str) -> None:
    scanners: dict[str, Scanner] = {}

    def scan_one(rule: Rule, data: bytes) -> list[bytes]:
        if rule.id not in scanners:
            scanners[rule.id] = Scanner(with_followed(rule, catalog()), engine)
        return scanners[rule.id].scan_values(data)

    problems = check_examples(catalog(), scan_one)
    assert not problems, "\n".join(problems)


OPTIONAL = sorted((BUILTIN_RULES_DIR / "optional").glob("*.yaml"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", OPTIONAL, ids=[p.name for p in OPTIONAL])
def test_optional_rules_hold_their_examples_and_are_not_loaded_by_default(path: Path, engine: str) -> None:
    rules = load_file(path)
    assert rules and not {r.id for r in rules} & {r.id for r in catalog()}
    problems = check_examples(rules, lambda r, d: Scanner(with_followed(r, rules), engine).scan_values(d))
    assert not problems, "\n".join(problems)
    assert [r.id for r in load_rules([path])][-len(rules):] == [r.id for r in rules]  # loads on top


def test_bare_account_ids_in_a_cost_report_need_the_optional_rule() -> None:
    csv = b"identity/LineItemId,lineItem/UsageAccountId,lineItem/UnblendedCost\nabc,123456789012,12.5\n"
    assert b"123456789012" not in full_scanner("python").scan_values(csv)
    strict = Scanner(load_rules([BUILTIN_RULES_DIR / "optional" / "bare-account-ids.yaml"]))
    assert strict.scan_values(csv) == [b"123456789012"]


@pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")
def test_builtin_catalog_compiles_entirely_in_hyperscan() -> None:
    scanner = full_scanner("hyperscan")
    assert scanner.engine == "hyperscan"
    assert scanner._python_rules == [], [catalog()[i].id for i in scanner._python_rules]


def test_long_bounded_repeats_are_open_ended_only_in_the_end_database() -> None:
    from aws_masker.scanner import LONG_REPEAT, _end_pattern, _long_repeats_unbounded

    assert LONG_REPEAT == 16
    assert _long_repeats_unbounded(rb"x[\w-]{2,1224}y{1,15}z{16,16}") == rb"x[\w-]{2,}y{1,15}z{16,}"
    # escapes and classes are left alone: a literal brace, a brace inside a class
    assert _long_repeats_unbounded(rb"\{1,99\}[{1,99}]a{0,99}") == rb"\{1,99\}[{1,99}]a{0,}"
    assert _long_repeats_unbounded(rb"a{32}b{3,}") == rb"a{32}b{3,}"  # exact and open repeats stay
    # ... and so do repeats of a group: open-ended, (?:[^\t]*\t){0,40}? reported an end in every row of more
    # than 40 columns, each searched again 64 KiB back (0.3 s per MB of such rows instead of 0.003 s)
    assert _long_repeats_unbounded(rb"^X\t(?:[^\t\r\n]*\t){0,40}?(\d{12})(?:a|b){0,99}\){0,99}") == \
        rb"^X\t(?:[^\t\r\n]*\t){0,40}?(\d{12})(?:a|b){0,99}\){0,}"
    assert _end_pattern(rb"--external-id (?P<x>[\w+=,.@:/-]{2,1224})(?![\w])", 1024)[0] == \
        rb"--external-id (?P<x>[\w+=,.@:/-]{2,})"


@pytest.mark.parametrize("engine", ENGINES)
def test_values_longer_than_the_old_bound_are_not_taken_and_shorter_ones_are(engine: str) -> None:
    # The end database reports ends past a long repeat's bound now; the rule's regex still decides.
    scanner = Scanner(catalog(), engine)
    ok = b"aws sts assume-role --external-id " + b"e" * 1224 + b" --role-session-name jdoe-1\n"
    too_long = b"aws sts assume-role --external-id " + b"e" * 1225 + b"\n"
    kinds = [h[2] for h in scanner.scan(ok)]
    assert kinds == ["EXTERNAL_ID", "IAM_SESSION"], kinds
    assert [h[2] for h in scanner.scan(too_long)] == []


_RSS_OF_A_FRESH_CATALOG = """
import sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
from aws_masker.rules import load_rules
from aws_masker.scanner import Scanner
rules = load_rules()
before = rss()
scanner = Scanner(rules)
print(scanner.engine, rss() - before)
"""


@pytest.mark.skipif(not HAVE_HYPERSCAN or not Path("/proc/self/status").exists(),
                    reason="needs Hyperscan and Linux")
def test_compiling_the_catalog_gives_the_compilers_working_memory_back() -> None:
    # The Hyperscan compiler needs ~15 MiB to build ~1 MiB of databases; glibc kept it, and the proxy's
    # RSS stayed that much higher for its whole life (the 20 MB budget after 10,000 requests was broken).
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_OF_A_FRESH_CATALOG], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out[0] == "hyperscan"
    assert int(out[1]) < 10 * 1024, f"building the scanner added {int(out[1]) / 1024:.1f} MiB of RSS"


_SCAN_STDIN = """
import sys
from aws_masker.rules import load_rules
from aws_masker.scanner import Scanner
print(Scanner(load_rules(), sys.argv[1]).scan_values(sys.stdin.buffer.read()))
"""


def _scan_in_a_child(engine: str, text: bytes) -> str:
    """The values ``engine`` masks in ``text``, scanned by a child process that must finish within 60 s (a
    regex that backtracks badly would hang the test run itself)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _SCAN_STDIN, engine], input=text, capture_output=True,
                          check=True, timeout=60).stdout.decode().strip()


@pytest.mark.parametrize("engine", ENGINES)
def test_the_s3_host_rules_take_linear_time_on_runs_of_dashes(engine: str) -> None:
    # "(?:[.-][a-z0-9-]+)*" splits a run of dashes in 2^n ways when what follows fails: 40 dashes after
    # ".s3" took the Python regex 28 s (both engines run it: Hyperscan only finds where to look), 60 hung
    # the proxy (found by a differential fuzz of the scanner).
    dashes = b"-" * 60
    text = (b"see abcd.s3.us" + dashes + b" and s3" + dashes + b"! then my-bucket.s3.amazonaws.com and "
            b"https://s3.us-east-1.amazonaws.com/other-bucket/key")
    assert _scan_in_a_child(engine, text) == "[b'my-bucket', b'other-bucket']"


@pytest.mark.parametrize("engine", ENGINES)
def test_line_rules_take_linear_time_on_a_long_indent(engine: str) -> None:
    # "^[ \\t]*-?[ \\t]*CreationDate" split n blanks at a line start in n^2/2 ways before it failed: 64 KiB of
    # blanks cost 2.3 s per window (both engines), 400 KB with the Python engine minutes (found by fuzzing).
    text = (b"\n" + b" " * 400_000 + b"x\nBuckets:\n- CreationDate: '2024-01-01T00:00:00+00:00'\n"
            b"  Name: acme.logs.eu\nRoots:\n  - Id: r-ab12\n")
    assert _scan_in_a_child(engine, text) == "[b'acme.logs.eu', b'r-ab12']"


# --- a generated mixed text: engine parity and what gets masked -----------------------------------------

def _mixed_text(seed: int = 20260101) -> tuple[str, list[str], list[str]]:
    """Realistic text in many formats; returns (text, values that must be masked, strings that must stay)."""
    rng = random.Random(seed)

    def hx(n: int) -> str:
        return "".join(rng.choice("0123456789abcdef") for _ in range(n))

    def b32(n: int) -> str:
        return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(n))

    def b64(n: int) -> str:
        return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
                       for _ in range(n))

    def word() -> str:
        return rng.choice(["orders", "billing", "media", "search", "ledger", "ingest"])

    regions = ["us-east-1", "eu-west-1", "ap-southeast-2", "us-gov-west-1", "sa-east-1"]
    parts: list[str] = []
    secret: list[str] = []
    keep = ["m5.large", "t3.micro", "v1.29.3-eks-ae9a62a", "aws-cli/2.15.30", "127.0.0.1:8080", "0.0.0.0/0",
            "s3.amazonaws.com", "lambda.amazonaws.com", "arn:aws:iam::aws:policy/ReadOnlyAccess",
            "the bucket list", "2026-03-01T10:00:00Z", "python3.12"]
    for n in range(25):
        region = rng.choice(regions)
        acct = str(rng.randrange(10**11, 10**12))
        inst, sg, vpc, eni = f"i-{hx(17)}", f"sg-{hx(rng.choice((8, 17)))}", f"vpc-{hx(17)}", f"eni-{hx(8)}"
        tail = f"{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        priv, pub = f"10.{tail}", f"{rng.choice((3, 18, 34, 52))}.{tail}"
        bucket = f"{word()}-{word()}-bucket-{n}"
        role, fn, queue = f"{word()}-role-{n}", f"{word()}_fn_{n}", f"{word()}-queue-{n}"
        key_id = f"{hx(8)}-{hx(4)}-4{hx(3)}-a{hx(3)}-{hx(12)}"
        akid, sak, tok = "AKIA" + b32(16), b64(40), "FwoGZXIvYXdz" + b64(120)
        ipv6 = f"2600:1f18:{hx(4)}:{hx(4)}::{hx(2)}"
        rds = f"{word()}-db.{hx(12)}.{region}.rds.amazonaws.com"
        secret += [acct, inst, sg, vpc, eni, priv, pub, bucket, role, fn, queue, key_id, akid, sak, tok,
                   ipv6, rds]
        parts.append(json.dumps({"Reservations": [{"OwnerId": acct, "Instances": [{
            "InstanceId": inst, "InstanceType": "m5.large", "Placement": {"AvailabilityZone": region + "a"},
            "PrivateIpAddress": priv, "PublicIpAddress": pub, "VpcId": vpc, "Ipv6Address": ipv6,
            "SecurityGroups": [{"GroupId": sg, "GroupName": "frontend"}],
            "NetworkInterfaces": [{"NetworkInterfaceId": eni}]}]}]}, indent=2))
        parts.append(f"2 {acct} {eni} {priv} {pub} 443 {rng.randrange(1024, 65535)} 6 20 4249 "
                     f"1700000000 1700000060 ACCEPT OK")
        parts.append(f'resource "aws_s3_bucket" "b{n}" {{\n  bucket = "{bucket}"\n}}\n'
                     f'resource "aws_instance" "w{n}" {{\n  instance_type = "t3.micro"\n'
                     f'  vpc_security_group_ids = ["{sg}"]\n  kms_key_id = '
                     f'"arn:aws:kms:{region}:{acct}:key/{key_id}"\n}}')
        parts.append(f"{n}: aws-cli/2.15.30 at 2026-03-01T10:00:00Z: User: arn:aws:sts::{acct}:assumed-role/"
                     f"{role}/session-{n} is not authorized to perform lambda:InvokeFunction on "
                     f"arn:aws:lambda:{region}:{acct}:function:{fn}; retry via "
                     f"https://sqs.{region}.amazonaws.com/{acct}/{queue} (see /aws/lambda/{fn}).")
        parts.append(f"[profile p{n}]\naws_access_key_id = {akid}\naws_secret_access_key = {sak}\n"
                     f"aws_session_token = {tok}\nregion = {region}")
        parts.append(f"Node v1.29.3-eks-ae9a62a on python3.12 reached {rds}:5432 and s3://{bucket}/x.csv; "
                     f"health 127.0.0.1:8080 ok, egress 0.0.0.0/0, events from s3.amazonaws.com and "
                     f"lambda.amazonaws.com, policy arn:aws:iam::aws:policy/ReadOnlyAccess, the bucket list.")
    rng.shuffle(parts)
    return "\n\n".join(parts), secret, keep


@pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")
def test_both_engines_give_identical_hits_on_mixed_text() -> None:
    text = _mixed_text()[0].encode("utf-8")
    hs_hits = full_scanner("hyperscan").scan(text)
    py_hits = full_scanner("python").scan(text)
    assert len(hs_hits) > 300
    assert hs_hits == py_hits


def test_assertions_are_dropped_only_where_they_are_assertions() -> None:
    from aws_masker.scanner import _without_assertions as relax

    assert relax(rb"(?i)\b(?:[0-9a-f]{1,4}:){3}\B") == rb"(?i)(?:[0-9a-f]{1,4}:){3}"
    assert relax(rb"[\b]x") == rb"[\b]x"  # backspace in a class
    assert relax(rb"a\\b") == rb"a\\b"  # an escaped backslash, then the letter b
    assert relax(rb"[]\b]\bq[^]\b]\b") == rb"[]\b]q[^]\b]"
    assert relax(rb"(?<![\w.)])(?P<x>\d+)(?=[)(]|(a))(?!\))z") == rb"(?P<x>\d+)z"


@pytest.mark.parametrize("engine", ENGINES)
def test_identifiers_in_the_context_a_rule_reads_are_masked_too(engine: str) -> None:
    """A rule masks a group after context it reads (the columns before an account ID in a --output text
    row); an identifier inside that context is another rule's hit, not hidden by the match around it."""
    row = b"SECURITYGROUPS\tweb tier\tsg-0123456789abcdef0\tweb\t210987654321\tvpc-0a1b2c3d4e5f60718\n"
    found = {data for data in full_scanner(engine).scan_values(row)}
    assert found == {b"sg-0123456789abcdef0", b"210987654321", b"vpc-0a1b2c3d4e5f60718"}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_hit_inside_a_rules_context_does_not_break_the_list_it_is_in(engine: str) -> None:
    # the instance ID in the role's path is found inside the ARN's unmasked part; the next element of the
    # principal list still follows the ARN
    data = b'"AWS": ["arn:aws:iam::111122223333:role/ops/i-0123456789abcdef0/Admin", "444455556666"]'
    assert full_scanner(engine).scan_values(data) == [b"111122223333", b"i-0123456789abcdef0", b"Admin",
                                                      b"444455556666"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_match_that_starts_inside_a_hit_and_runs_past_it_is_masked_past_it(engine: str) -> None:
    """A bucket name may end in ".arn": in an ARN glued to a bucket ARN by a dot, the bucket took the "arn"
    of the next ARN, whose account and role were then skipped (found by a differential fuzzer: the two engines
    disagreed on what followed)."""
    data = b"arn:aws:s3:::acme-logs-prod.arn:aws:iam::123456789012:role/DeployRole and"
    assert full_scanner(engine).scan_values(data) == [b"acme-logs-prod.arn", b"123456789012", b"DeployRole"]
    data = b"arn:aws:s3:::d.arn:aws:m::123456789012:arn:aws:s::111122223333:"
    assert full_scanner(engine).scan_values(data) == [b"d.arn", b"123456789012", b"aws:s::111122223333"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_group_that_starts_inside_a_hit_and_runs_past_it_is_masked_past_it(engine: str) -> None:
    """Of such a match, a group that starts before the hit ends (an IPv6 address whose first group the bucket
    of an s3:// URI took; an IP address whose first octet ends a queue name) is masked after the hit: it was
    skipped whole and its other groups were forwarded (found by fuzzing the two engines)."""
    data = b"see s3://2600:1f18:24c5:de00:a1b2:c3d4:e5f6:789a now"
    assert full_scanner(engine).scan_values(data) == [b"2600", b":1f18:24c5:de00:a1b2:c3d4:e5f6:789a"]
    data = b"https://queue.amazonaws.com/210987654321/legacy_jobs_10.0.0.12\tfailed"
    assert full_scanner(engine).scan_values(data) == [b"210987654321", b"legacy_jobs_10", b".0.0.12"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_match_that_starts_inside_a_hit_and_runs_into_its_context_is_masked_there(engine: str) -> None:
    """A Session Manager session ID is NAME-17 hex, and only NAME is masked: a VPC endpoint service ID written
    there gave its "vpce-svc" to NAME, and its 17 hex digits, the part that identifies it, were forwarded."""
    data = b"SessionId: vpce-svc-0a1b2c3d4e5f67890\n"
    assert full_scanner(engine).scan_values(data) == [b"vpce-svc", b"-0a1b2c3d4e5f67890"]
    # an identifier wholly inside the unmasked context is masked whole, as before
    data = b"SessionId: jdoe-0a1b2c3d4e5f67890 for i-0123456789abcdef0\n"
    assert full_scanner(engine).scan_values(data) == [b"jdoe", b"i-0123456789abcdef0"]


@pytest.mark.parametrize("engine", ENGINES)
def test_line_anchored_rules_are_found_far_into_a_text(engine: str) -> None:
    # Hyperscan lost a (?m)^ match more than ~60 bytes in when its database held two such patterns
    line = b"aws_iam_role.deploy: Refreshing state... [id=deploy-bot]\n"
    for lead in (b"", b"x" * 80 + b"\n", b"log line\n" * 40):
        assert full_scanner(engine).scan_values(lead + line) == [b"deploy-bot"], lead[:20]


def test_an_opening_look_behind_and_a_closing_look_ahead_become_part_of_the_match() -> None:
    from aws_masker.scanner import _consume_lookarounds as consume
    from aws_masker.scanner import _end_pattern

    assert consume(rb"(?<![\w.])(?:\d{12}):(?=/[\w.#-])") == (rb"(?<![\w.])(?:\d{12}):(?:/[\w.#-])", True)
    assert consume(rb"(?i)(?<=[\s\"',])\d{12}\b") == (rb"(?i)(?:[\s\"',])\d{12}\b", False)
    assert consume(rb"a(?=b)c") == (rb"a(?=b)c", False)  # not the last: c must match where b does
    assert consume(rb"x[)](?=y)") == (rb"x[)](?:y)", True)  # a ")" in a class closes nothing
    assert consume(rb"(a)(?=b(c))") == (rb"(a)(?:b(c))", True)
    assert consume(rb"a(?=b)", ahead=False) == (rb"a(?=b)", False)
    # unbounded rules keep their look-ahead dropped: their search checks each reported end is a match's end
    assert _end_pattern(rb"\w+(?=z)", 1 << 20) == (rb"\w+", False)


@pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")
def test_engines_agree_on_rules_whose_look_arounds_are_part_of_the_located_match() -> None:
    parts = [
        "111122223333  arn:aws:iam::111122223333:role/Admin",  # before-arn (look-ahead)
        "111122223333 | arn:aws:sts::444455556666:assumed-role/R/s",
        "fields @log | 123456789012:/aws/lambda/fn",  # log-insights (look-ahead)
        '"AWS": ["arn:aws:iam::111122223333:root", "444455556666", \'555566667777\']',  # list-next
        "AWS:\n  - arn:aws:iam::111122223333:user/alice\n  - 444455556666\n",
        "arn:aws:iam::111122223333:root,444455556666",
        "123456789012:", "123456789012 ", "arn:aws:iam::123456789012:role/x 123456789012",
    ]
    rnd = random.Random(5)
    for _ in range(200):
        text = "".join(rnd.choice(parts) + rnd.choice(["", " ", "\n", ",", "\t", "::"]) for _ in range(6))
        data = text.encode()
        assert full_scanner("hyperscan").scan(data) == full_scanner("python").scan(data), text
    for cut in range(1, 60):  # a look-ahead that runs past the end of the text
        data = parts[0].encode()[:cut]
        assert full_scanner("hyperscan").scan(data) == full_scanner("python").scan(data), data


@pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")
def test_engines_agree_where_dropped_boundaries_report_extra_ends() -> None:
    # Hyperscan locates rules without a literal prefix by their match ends, with their word boundaries
    # dropped: such text gives it ends that the rules' own regexes must then reject.
    text = (b"xab:cd:ef:12 zz2600:1f18:abc:de00::12 2600:1f18:abc:de00::12 _10.1.2.3 a10.1.2.3 10.1.2.3x "
            b"10.1.2.3 ABCmy-db.abcdefghijkl.eu-west-1.rds.amazonaws.com my-db.abcdefghijkl.eu-west-1.rds."
            b"amazonaws.com foo_eu-west-1_AbCdEfGhI eu-west-1_AbCdEfGhI 1.2.3.4.5 fd12:3456:789a::/48 "
            b"123456789012\tarn:aws:iam::123456789012:user/ci 1234567890123 arn:aws:iam::123456789012:root "
            b"111122223333  arn:aws:sts::111122223333:assumed-role/r/s 99999999999999999999999 fd00::1") * 3
    hs_hits = full_scanner("hyperscan").scan(text)
    assert hs_hits == full_scanner("python").scan(text)
    values = {text[h.start:h.end] for h in hs_hits}
    assert {b"2600:1f18:abc:de00::12", b"10.1.2.3", b"eu-west-1_AbCdEfGhI", b"fd12:3456:789a::",
            b"fd00::1", b"111122223333"} <= values
    assert not values & {b"ab:cd:ef:12", b"2.3.4.5", b"1234567890123", b"234567890123"}
    first_column = text.index(b"123456789012\t")
    assert any(h.start == first_column for h in hs_hits)  # get-caller-identity's account column


@pytest.mark.parametrize("engine", ENGINES)
def test_mixed_text_is_masked_and_keeps_ordinary_values(engine: str) -> None:
    text, secret, keep = _mixed_text(seed=7)
    data = text.encode("utf-8")
    hits = full_scanner(engine).scan(data)
    assert all(a.end <= b.start for a, b in itertools.pairwise(hits)), "hits overlap or are unsorted"
    covered = bytearray(len(data))
    for h in hits:
        covered[h.start:h.end] = b"\x01" * (h.end - h.start)
    leaked = [v for v in secret
              if any(not all(covered[m.start():m.end()]) for m in re.finditer(re.escape(v.encode()), data))]
    assert not leaked
    masked = bytearray(data)
    for h in reversed(hits):
        masked[h.start:h.end] = b"AWS_%s_0001" % h.kind.encode()
    assert [k for k in keep if k.encode() not in masked] == []


# --- cross-rule behaviour ------------------------------------------------------------------------------

def test_account_inside_an_arn_is_masked_once_with_the_arn_structure_kept() -> None:
    text = '"Arn": "arn:aws:iam::123456789012:role/service-role/Deployer", "Account": "123456789012"'
    hits = scan(text)
    assert hits == [("123456789012", "ACCOUNT"), ("Deployer", "IAM_ROLE"), ("123456789012", "ACCOUNT")]


def test_instance_id_in_an_instance_arn_gets_the_instance_kind() -> None:
    assert scan("arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0") == [
        ("123456789012", "ACCOUNT"), ("i-0123456789abcdef0", "EC2_INSTANCE")]
    assert scan("image arn:aws:ec2:eu-west-1::image/ami-0123abcd") == [("ami-0123abcd", "AMI")]


def test_regions_zones_instance_types_and_service_names_are_untouched() -> None:
    text = ("Launch m5.large, t3.micro, c6g.xlarge and r6i.2xlarge in us-east-1 (us-east-1a, use1-az4), "
            "eu-west-2b, ap-northeast-2c and us-gov-west-1 with EC2, S3, RDS, EKS, Lambda, KMS and IAM; "
            "endpoints ec2.us-east-1.amazonaws.com, s3.amazonaws.com, sts.amazonaws.com, "
            "monitoring.rds.amazonaws.com; actions s3:GetObject, sts:AssumeRole.")
    assert scan(text) == []


def test_non_aws_identifiers_are_untouched() -> None:
    text = ("commit 810862b39995505d64512780763397225eb8519c, uid 38210026-3594-10d1-d15f-686845b14832, "
            "image @sha256:1385934497377809816104f7da734c32987752002263600153630d45295d1456, "
            "Order #042204844176, boto3 1.35.40, v2.14.0-rc.1, at 03:12 UTC, mac 00:1a:2b:3c:4d:5e, "
            "std::vector<int>, the i-beam icon, multi-line, api-6u1c4q4i2-y4xdb, #4821")
    assert scan(text) == []


def test_an_identifier_gets_the_same_kind_wherever_it_appears() -> None:
    text = "\n".join([
        "aws s3 cp x s3://acme-reports/x", "arn:aws:s3:::acme-reports/*", '"Bucket": "acme-reports"',
        "https://acme-reports.s3.eu-west-1.amazonaws.com/k", "aws s3api head-bucket --bucket acme-reports",
        "arn:aws:iam::123456789012:role/app-role", "arn:aws:sts::123456789012:assumed-role/app-role/s1",
        '"RoleName": "app-role"', "aws iam get-role --role-name app-role",
        "https://sqs.us-east-1.amazonaws.com/123456789012/jobs", "arn:aws:sqs:us-east-1:123456789012:jobs",
        "arn:aws:lambda:us-east-1:123456789012:function:resize", "aws logs tail /aws/lambda/resize",
        '"KeyId": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"',
        "arn:aws:kms:us-east-1:123456789012:key/0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b",
        "2 123456789012 eni-0a1b2c3d4e5f60718 10.0.0.1 10.0.0.2 443 1 6 1 1 1 1 ACCEPT OK",
        '"NetworkInterfaceId": "eni-0a1b2c3d4e5f60718"', "123456789012.dkr.ecr.us-east-1.amazonaws.com/app",
    ])
    kinds = kinds_of(text)
    assert kinds["acme-reports"] == {"S3_BUCKET"}
    assert kinds["app-role"] == {"IAM_ROLE"}
    assert kinds["jobs"] == {"SQS_QUEUE"}
    assert kinds["resize"] == {"LAMBDA_FUNCTION"}
    assert kinds["0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"] == {"KMS_KEY"}
    assert kinds["eni-0a1b2c3d4e5f60718"] == {"ENI"}
    assert kinds["123456789012"] == {"ACCOUNT"}


def test_template_kinds_do_not_leak_between_arns() -> None:
    scanner = Scanner(catalog(), "python")
    data = (b"arn:aws:iam::123456789012:role/admin arn:aws:iam::123456789012:user/admin "
            b"arn:aws:dynamodb:us-east-1:123456789012:table/orders "
            b"arn:aws:rds:us-east-1:123456789012:db:orders")
    kinds = [h.kind for h in scanner.scan(data) if h.kind != "ACCOUNT"]
    assert kinds == ["IAM_ROLE", "IAM_USER", "ARN_DYNAMODB", "ARN_RDS"]


def test_kms_uuid_needs_kms_context() -> None:
    uuid = "38209668-328d-0334-5916-090625408296"
    assert scan(f"request {uuid} done") == []
    assert scan(f"kms_key_id = \"{uuid}\"") == [(uuid, "KMS_KEY")]


def test_twelve_digits_need_account_context() -> None:
    assert scan("invoice 123456789012 paid") == []
    assert scan("account 123456789012 paid") == [("123456789012", "ACCOUNT")]


def test_hit_kinds_and_rules_are_well_formed() -> None:
    rule_ids = {r.id for r in catalog()}
    hits: list[Hit] = full_scanner("python").scan(_mixed_text(seed=3)[0].encode())
    assert hits
    for h in hits:
        assert h.rule in rule_ids
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(?:_[A-Z][A-Z0-9]*)*", h.kind), h.kind


# --- loader errors --------------------------------------------------------------------------------------

GOOD_RULE = """\
  - id: {id}
    description: test rule that finds widgets
    regex: '{regex}'
    keywords: ["w-"]
    placeholder: WIDGET
    {extra}
    examples:
      - "w-1234"
    counterexamples:
      - "w-"
"""


def _rule_file(tmp_path: Path, name: str, *rules: dict[str, str]) -> Path:
    body = "".join(GOOD_RULE.format(**{"id": "widget", "regex": r"\bw-\d{4}\b", "extra": "", **r})
                   for r in rules)
    path = tmp_path / name
    path.write_text("rules:\n" + body, encoding="utf-8")
    return path


@pytest.mark.parametrize("engine", ENGINES)
def test_a_rule_whose_group_is_its_whole_match_scans(tmp_path: Path, engine: str) -> None:
    """A group that is an ID of its own (a prefix and hex digits) is looked up by the other rules, to take
    their kind; a rule whose group is the whole of its match found that match again, endlessly
    (RecursionError: an SSO instance or permission set ID rule of two groups)."""
    path = tmp_path / "ids.yaml"
    path.write_text("""rules:
  - id: widget-ids
    description: test rule with a group per kind of widget ID
    regex: '(?<![\\w-])(?:(?P<a>wa-[0-9a-f]{16})|wb-(?P<b>[0-9a-f]{8}))(?![\\w-])'
    keywords: ["wa-", "wb-"]
    groups: {a: WIDGET_A, b: WIDGET_B}
    examples:
      - text: "wa-0123456789abcdef and wb-01234567"
        masked: ["wa-0123456789abcdef", "01234567"]
    counterexamples:
      - "wa-0123"
      - "xwa-0123456789abcdef"
""", encoding="utf-8")
    scanner = Scanner(load_rules([path], builtin=False), engine)
    hits = scanner.scan(b"id wa-0123456789abcdef, wb-01234567")
    assert [(h.kind, h.end - h.start) for h in hits] == [("WIDGET_A", 19), ("WIDGET_B", 8)]


def test_a_valid_extra_rule_file_loads(tmp_path: Path) -> None:
    path = _rule_file(tmp_path, "ok.yaml", {})
    rules = load_rules([path], builtin=False)
    assert [r.id for r in rules] == ["widget"]
    assert check_examples(rules, lambda r, d: Scanner([r], "python").scan_values(d)) == []


def test_broken_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("rules:\n  - id: widget\n    regex: '[unclosed\n", encoding="utf-8")
    with pytest.raises(RuleError, match=re.escape(str(path)) + ".*not valid YAML"):
        load_rules([path], builtin=False)


def test_missing_field_names_file_and_rule(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    path.write_text("rules:\n  - id: widget\n    description: no regex here\n    placeholder: WIDGET\n"
                    "    examples: ['w-1234']\n", encoding="utf-8")
    with pytest.raises(RuleError, match=re.escape(str(path)) + ".*'widget'.*regex is missing"):
        load_rules([path], builtin=False)


def test_bad_regex_names_file_and_rule(tmp_path: Path) -> None:
    path = _rule_file(tmp_path, "badre.yaml", {"regex": r"\bw-(\d{4}"})
    with pytest.raises(RuleError, match=re.escape(str(path)) + ".*'widget'.*regex does not compile"):
        load_rules([path], builtin=False)


def test_duplicate_id_names_both_files_and_the_rule(tmp_path: Path) -> None:
    first = _rule_file(tmp_path, "a.yaml", {})
    second = _rule_file(tmp_path, "b.yaml", {})
    with pytest.raises(RuleError) as err:
        load_rules([tmp_path], builtin=False)
    message = str(err.value)
    assert str(second) in message and str(first) in message and "'widget'" in message


def test_extra_rule_cannot_redefine_a_builtin_id(tmp_path: Path) -> None:
    path = _rule_file(tmp_path, "clash.yaml", {"id": "aws-arn"})
    with pytest.raises(RuleError, match=re.escape(str(path)) + ".*'aws-arn'.*already defined"):
        load_rules([path])


def test_unknown_validator_names_file_and_rule(tmp_path: Path) -> None:
    path = _rule_file(tmp_path, "validator.yaml", {"extra": "validate: luhn"})
    with pytest.raises(RuleError, match=re.escape(str(path)) + ".*'widget'.*validate 'luhn' is unknown"):
        load_rules([path], builtin=False)


def test_follows_names_an_unknown_rule(tmp_path: Path) -> None:
    path = _rule_file(tmp_path, "follows.yaml", {"extra": "follows: {rules: [no-such-rule], gap: ', '}"})
    expected = re.escape(str(path)) + ".*'widget'.*follows names rule 'no-such-rule', which is not loaded"
    with pytest.raises(RuleError, match=expected):
        load_rules([path], builtin=False)


@pytest.mark.parametrize("spec, problem", [
    ("follows: [widget]", "follows must be a mapping"),
    ("follows: {rules: [], gap: ', '}", "follows.rules is empty"),
    ("follows: {rules: [widget], gap: '(,'}", "follows.gap does not compile"),
])
def test_broken_follows_names_file_rule_and_problem(tmp_path: Path, spec: str, problem: str) -> None:
    path = _rule_file(tmp_path, "follows.yaml", {"extra": spec})
    with pytest.raises(RuleError, match=re.escape(str(path)) + ".*'widget'.*" + re.escape(problem)):
        load_rules([path], builtin=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_following_rule_counts_only_right_after_the_rules_it_follows(tmp_path: Path, engine: str) -> None:
    path = _rule_file(tmp_path, "chain.yaml", {}, {
        "id": "widget-next", "regex": r"\b\d{4}\b",
        "extra": "follows: {rules: [widget, widget-next], gap: ',[ ]*'}"})
    rules = load_rules([path], builtin=False)
    scanner = Scanner(rules, engine)
    assert scanner.scan_values(b"w-1234, 5678,9012 ; 3456, 7890") == [b"w-1234", b"5678", b"9012"]
    assert scanner.scan_values(b"5678, 9012") == []
    assert Scanner(with_followed(rules[1], rules), engine).scan_values(b"w-1111,2222") == [b"w-1111", b"2222"]


_DESCRIBE_TEXT = "\n".join([  # aws ec2 describe-vpcs / -security-groups / -images / -snapshots --output text
    "VPCS\t10.0.0.0/16\tdopt-0a1b2c3d\tdefault\tFalse\t111122223333\tavailable\tvpc-0a1b2c3d4e5f67890",
    "CIDRBLOCKASSOCIATIONSET\tvpc-cidr-assoc-0a1b2c3d\t10.0.0.0/16",
    "SECURITYGROUPS\tdefault VPC security group\tsg-0123456789abcdef0\tdefault\t111122223333\t"
    "vpc-0a1b2c3d4e5f67890",
    "IPPERMISSIONS\t-1",
    "USERIDGROUPPAIRS\tsg-0123456789abcdef0\t444455556666",
    "IMAGES\tx86_64\t2024-01-01T00:00:00.000Z\tTrue\txen\tami-0123456789abcdef0\tbase/v3\tmachine\tv3\t"
    "777788889999\tLinux/UNIX\tFalse\t/dev/xvda\tebs\tsimple\tavailable\thvm",
    "SNAPSHOTS\tCreated by CreateImage\tFalse\t222233334444\t100%\tsnap-0123456789abcdef0\t"
    "2024-01-01T00:00:00.000Z\tcompleted\tvol-0123456789abcdef0\t8",
    "TRANSITGATEWAYATTACHMENTS\t2024-01-01T00:00:00.000Z\tvpc-0a1b2c3d4e5f67890\t555566667777\tvpc\tavailable\t"
    "tgw-attach-0a1b2c3d4e5f67890\ttgw-0a1b2c3d4e5f67890\t888899990000",
    # aws s3api list-objects-v2 / aws dynamodb describe-table --output text: 12-digit sizes, not accounts
    "CONTENTS\t\"d41d8cd98f00b204e9800998ecf8427e\"\tlake/part-0001.parquet\t2024-01-01T00:00:00.000Z\t"
    "123456789012\tSTANDARD",
    "TABLE\t2024-01-01T00:00:00.000000+00:00\tFalse\t987654321\torders\t210987654321\tACTIVE",
])


@pytest.mark.parametrize("engine", ENGINES)
def test_cli_text_rows_mask_their_owner_columns_and_keep_sizes(engine: str) -> None:
    found = {text.decode() for text in full_scanner(engine).scan_values(_DESCRIBE_TEXT.encode())}
    assert {"111122223333", "444455556666", "777788889999", "222233334444", "555566667777",
            "888899990000"} <= found
    assert not found & {"123456789012", "210987654321", "987654321"}


_KMS_TEXT = "\n".join([  # aws kms list-aliases / list-keys --output text, and a --query of both columns
    "ALIASES\tarn:aws:kms:us-east-1:111122223333:alias/aws/ebs\talias/aws/ebs\t2024-01-01T00:00:00.000000+00:00\t"
    "2024-01-01T00:00:00.000000+00:00\t0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e",
    "ALIASES\tarn:aws:kms:us-east-1:111122223333:alias/orders-prod\talias/orders-prod\t"
    "2024-01-01T00:00:00.000000+00:00\t2024-01-01T00:00:00.000000+00:00\t1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d",
    "KEYS\tarn:aws:kms:us-east-1:111122223333:key/2b3c4d5e-6f7a-8b9c-0d1e-2f3a4b5c6d7e\t"
    "2b3c4d5e-6f7a-8b9c-0d1e-2f3a4b5c6d7e",
    "alias/billing/pii\t3c4d5e6f-7a8b-9c0d-1e2f-3a4b5c6d7e8f",
    "alias/payments-signing\talias/aws/s3",
])


@pytest.mark.parametrize("engine", ENGINES)
def test_kms_keys_and_aliases_in_cli_text_rows_are_masked(engine: str) -> None:
    data = _KMS_TEXT.encode()
    hits = full_scanner(engine).scan(data)
    values = {data[h.start:h.end].decode(): h.kind for h in hits}
    for key in ("0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e", "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d",
                "2b3c4d5e-6f7a-8b9c-0d1e-2f3a4b5c6d7e", "3c4d5e6f-7a8b-9c0d-1e2f-3a4b5c6d7e8f"):
        assert values.get(key) == "KMS_KEY", key
    covered = bytearray(len(data))
    for h in hits:
        covered[h.start:h.end] = b"\x01" * (h.end - h.start)
    for alias in (b"orders-prod", b"billing/pii", b"payments-signing"):  # every occurrence
        at = [m.start() for m in re.finditer(re.escape(alias), data)]
        assert at and all(all(covered[i:i + len(alias)]) for i in at), alias
    masked = {data[h.start:h.end] for h in hits}
    assert not masked & {b"aws/ebs", b"aws/s3", b"ebs", b"s3"}


_ELB_LOG = "\n".join([  # ALB, Classic and NLB access log lines of IPv6 clients and targets (address:port)
    'h2 2026-09-10T23:55:00.361692Z app/web-alb/50dc6c495c0c9188 '
    '2001:db8:4538:1:bcf4:5264:e01c:f215:50718 10.0.0.12:80 0.000 0.003 0.000 401 401 29 805 "GET '
    'https://api.example.com:443/v1 HTTP/2.0" "okhttp/4.11" ECDHE-RSA-AES128-GCM-SHA256 TLSv1.2 - '
    '"Root=1-64fe5754-33ecd7461b3736944677bb97" "api.example.com" "session-reused" 11 '
    '2026-09-10T23:55:00.358000Z "forward" "-" "-" "10.0.0.12:80" "401" "-" "-"',
    'https 2026-09-10T23:55:01.000000Z app/web-alb/50dc6c495c0c9188 2001:db8:85a3::8a2e:51744 '
    '2001:db8:c0de:7c01:63c:b510:129f:89f1:8080 0.001 0.010 0.000 200 200 120 512 "GET / HTTP/1.1" '
    '"curl/8" - - - "Root=1-64fe5754-33ecd7461b3736944677bb98" "-" "-" 0 '
    '2026-09-10T23:55:00.990000Z "forward" "-" "-" "2001:db8:c0de:7c01:63c:b510:129f:89f1:8080" '
    '"200" "-" "-"',
    '2026-09-10T23:55:02.000000Z classic-elb 2001:db8:abcd:12::5:443 10.0.1.7:80 0.000052 0.006129 '
    '0.000037 200 200 0 0 "GET https://www.example.com/ HTTP/1.1" "Mozilla/5.0" '
    'ECDHE-RSA-AES128-SHA256 TLSv1.2',
    'tls 2.0 2026-09-10T07:46:43 net/my-nlb/50dc6c495c0c9188 0123456789abcdef '
    '2001:db8:1d0c:29b7:c9b2:7b5a:e7d0:2380:55932 2001:db8:138:7c01:63c:b510:129f:89f2:443 35040 '
    '48 2150 1726 - - - TLS_AES_128_GCM_SHA256 tlsv13',
    'proxy on ::1:8080, peer fe80::1ff:fe23:4567:890a:51000',
])


@pytest.mark.parametrize("engine", ENGINES)
def test_ipv6_client_and_target_addresses_of_elb_logs_are_masked_without_their_ports(engine: str) -> None:
    data = _ELB_LOG.encode()
    hits = full_scanner(engine).scan(data)
    found = [data[h.start:h.end].decode() for h in hits if h.kind == "IPV6"]
    assert found == [
        "2001:db8:4538:1:bcf4:5264:e01c:f215", "2001:db8:85a3::8a2e", "2001:db8:c0de:7c01:63c:b510:129f:89f1",
        "2001:db8:c0de:7c01:63c:b510:129f:89f1",
        "2001:db8:abcd:12::5:443",  # ambiguous: itself an address, masked whole (the port with it)
        "2001:db8:1d0c:29b7:c9b2:7b5a:e7d0:2380", "2001:db8:138:7c01:63c:b510:129f:89f2"]
    masked = bytearray(data)
    for h in reversed(hits):
        masked[h.start:h.end] = b"AWS_%s_0001" % h.kind.encode()
    assert b"AWS_IPV6_0001:50718 " in masked and b"::1:8080" in masked and b"fe80::" in masked


_STATEMENTS = "".join(
    "                {\n"
    "                    Action    = \"sts:AssumeRole\"\n"
    "                    Effect    = \"Allow\"\n"
    f"                    Principal = {{ Service = \"svc{i}.amazonaws.com\" }}\n"
    "                },\n" for i in range(12))  # a trust policy long enough to put `id` 1 KiB past the header
_TERRAFORM = f"""\
  # aws_iam_role.deploy will be updated in-place
  ~ resource "aws_iam_role" "deploy" {{
        id                    = "deploy-bot"
        name                  = "deploy-bot"
      ~ max_session_duration  = 3600 -> 7200
        tags                  = {{}}
        # (8 unchanged attributes hidden)
    }}

  # aws_s3_bucket.logs must be replaced
-/+ resource "aws_s3_bucket" "logs" {{
      ~ bucket                      = "acme-logs-prod" -> "acme-logs-prod-eu" # forces replacement
      ~ id                          = "acme-logs-prod" -> (known after apply)
    }}

 <= data "aws_region" "current" {{
      + id   = (known after apply)
      + name = "us-east-1"
    }}

# aws_iam_role.ci:
resource "aws_iam_role" "ci" {{
    arn                   = "arn:aws:iam::111122223333:role/ci-runner"
    assume_role_policy    = jsonencode(
        {{
            Statement = [
{_STATEMENTS}            ]
            Version   = "2012-10-17"
        }}
    )
    id                    = "ci-runner"
    max_session_duration  = 3600
    name                  = "ci-runner"

    inline_policy {{
        name   = "inline-not-a-role"
        policy = jsonencode({{}})
    }}
}}

# aws_dynamodb_table.orders:
resource "aws_dynamodb_table" "orders" {{
    hash_key     = "pk"
    id           = "orders-table-prod"
    name         = "orders-table-prod"

    attribute {{
        name = "pk"
        type = "S"
    }}
}}
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_names_in_terraform_plan_and_state_attribute_lists_are_masked(engine: str) -> None:
    data = _TERRAFORM.encode()
    header = data.index(b'resource "aws_iam_role" "ci"')
    assert data.index(b'id                    = "ci-runner"') - header > 1024
    hits = full_scanner(engine).scan(data)
    found = [(data[h.start:h.end].decode(), h.kind) for h in hits]
    for value, kind in [("deploy-bot", "IAM_ROLE"), ("acme-logs-prod", "S3_BUCKET"),
                        ("acme-logs-prod-eu", "S3_BUCKET"), ("ci-runner", "IAM_ROLE"),
                        ("orders-table-prod", "DYNAMODB_TABLE")]:
        assert found.count((value, kind)) >= _TERRAFORM.count(f'"{value}"'), value
    values = {value for value, _ in found}
    assert not values & {"us-east-1", "pk", "inline-not-a-role", "deploy", "logs", "ci", "orders"}


_FLOW_LOGS = """\
version vpc-id subnet-id instance-id interface-id account-id type srcaddr dstaddr srcport dstport action
5 vpc-0a1b2c3d4e5f67890 subnet-0a1b2c3d4e5f67890 i-0123456789abcdef0 eni-0123456789abcdef0 111122223333 IPv4 \
10.0.1.5 10.0.2.7 443 49152 ACCEPT
3 eni-1a2b3c4d 444455556666 10.0.1.5 10.0.2.8 443 49152 6 REJECT OK
vpc-0a1b2c3d4e5f67890 777788889999 eni-0123456789abcdef0 - - - - - - - 1431280876 1431280934 - NODATA
eni-0123456789abcdef0 sent 123456789012 bytes
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_account_ids_in_custom_flow_log_formats_are_masked(engine: str) -> None:
    found = {v.decode() for v in full_scanner(engine).scan_values(_FLOW_LOGS.encode())}
    assert {"111122223333", "444455556666", "777788889999"} <= found
    assert "123456789012" not in found


def test_principal_lists_mixing_arns_and_account_ids_leak_no_account() -> None:
    policy = json.dumps({"Statement": [{"Effect": "Allow", "Principal": {"AWS": [
        "arn:aws:iam::111122223333:root", "444455556666", "arn:aws:iam::777788889999:role/ops/Admin",
        "222233334444", "arn:aws:sts::555566667777:assumed-role/Deploy/session-1", "888899990000"]}}]},
        indent=4).encode()
    found = set(full_scanner("python").scan_values(policy))
    for account in (b"111122223333", b"444455556666", b"777788889999", b"222233334444", b"555566667777",
                    b"888899990000"):
        assert account in found


# Pieces that put identifiers next to each other and next to characters that matter to word boundaries,
# look-arounds and windows: the fast engine locates without the assertions, so the two engines must still
# agree wherever the pieces fall.
_PIECES = [
    "i-0123456789abcdef0", "i-0123abcd", "sg-0a1b2c3d", "vpc-0123456789abcdef0", "10.1.2.3", "172.16.0.10",
    "1.2.3.4.5", "fd00::1", "2600:1f18:abc:de00::12", "ab:cd:ef:12", "123456789012", "1234567890123",
    "arn:aws:iam::123456789012:role/deploy", "arn:aws:sts::210987654321:assumed-role/r/s",
    "arn:aws:s3:::my-bucket/key", "AKIAIOSFODNN7EXAMPLE", "s3://my-bucket/logs/", "eu-west-1_AbCdEfGhI",
    "db.abcdefghijkl.eu-west-1.rds.amazonaws.com", "123456789012.dkr.ecr.us-east-1.amazonaws.com",
    "Account", "OwnerId", '"Account": "', "arn:aws", "AWSLogs/", "us-east-1", "m5.large", "v1.2.3",
    # what a differential fuzzer found the engines disagreeing on: a match its rule rejects (a code reference,
    # an AWS-managed alias) with one of the same rule inside it; labels in another case than the keywords;
    # a name longer than the search window
    "KmsKeyId: alias/aws/", "log_group_name = aws_cloudwatch_log_group.app.", "StackName: AWS::",
    "bucket = local.", "loggroupname=", "keypairid = ", "rootid: ", "sessionid: ", "clientid: ",
    "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b", "payments-api", "K2JCJMDEHXQW5F", "r-ab12",
    "jdoe-0a1b2c3d4e5f67890", "1h2j3k4l5m6n7o8p9q0r1s2t3u", "a" * 1100,
    "web.abcdefghij.eu-west-1.elb.amazonaws.com",
]
_GLUE = [" ", ".", ":", "-", "_", "\t", "\n", "/", '"', ",", "", "x", "0", " | ", "=", "\t|  "]


@pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")
@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_PIECES), st.sampled_from(_GLUE)), min_size=1, max_size=14))
def test_engines_agree_on_identifiers_glued_together(parts: list[tuple[str, str]]) -> None:
    text = "".join(p + g for p, g in parts).encode()
    assert full_scanner("hyperscan").scan(text) == full_scanner("python").scan(text)


# A match its rule rejects (a code reference, an AWS-managed alias) right before a label and a value: the
# value's match starts inside the rejected one. Labels are written in cases their rules' keywords are not.
_REJECTED = ["", "KmsKeyId: alias/aws/", "log_group_name = aws_cloudwatch_log_group.app.", "StackName: AWS::",
             "bucket = local.", "bucket = var.", "logGroupName: props."]
_LABELS = ["KmsKeyId=", "kmskeyid: ", "log_group_name=", "loggroupname=", "StackName=", "stackname: ",
           "bucket=", "BUCKET=", "keypairid = ", "KEYPAIRID=", "rootid: ", "parentid=", "sessionid: ",
           "clientid: ", "logGroup: "]
_VALUES = ["0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b", "payments-api", "orders-prod", "acme-data-prod",
           "K2JCJMDEHXQW5F", "r-ab12", "jdoe-0a1b2c3d4e5f67890", "1h2j3k4l5m6n7o8p9q0r1s2t3u"]


@pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_REJECTED), st.sampled_from(_LABELS), st.sampled_from(_VALUES),
                          st.sampled_from(_GLUE)), min_size=1, max_size=6))
def test_engines_agree_on_values_after_a_match_their_rule_rejects(parts: list[tuple[str, ...]]) -> None:
    text = "".join("".join(p) for p in parts).encode()
    assert full_scanner("hyperscan").scan(text) == full_scanner("python").scan(text)


@pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")
def test_a_match_longer_than_the_window_is_found_beside_a_short_one() -> None:
    # Two ends of one rule close together: the first belongs to a match that starts more than a window
    # before it (an overlong bucket name), the second to a short match. Both must be found.
    text = b"https://s3.amazonaws.com/" + b"x" * 1500 + b"/logs s3.amazonaws.com/bucket-name/key"
    hits = full_scanner("hyperscan").scan(text)
    assert hits == full_scanner("python").scan(text)
    assert [text[h.start:h.end] for h in hits] == [b"x" * 1500, b"bucket-name"]


def _agreed_values(data: bytes) -> list[bytes]:
    """The values both engines mask in ``data`` (asserting they return the same hits)."""
    hits = full_scanner("python").scan_keys_once(data)[0]
    if HAVE_HYPERSCAN:
        assert full_scanner("hyperscan").scan_keys_once(data)[0] == hits, data[:80]
    return [data[h.start:h.end] for h in hits]


@pytest.mark.parametrize("text, masked", [
    ("keypairid = K2JCJMDEHXQW5F", b"K2JCJMDEHXQW5F"),
    ("rootid: r-ab12", b"r-ab12"),
    ("sessionid: jdoe-0a1b2c3d4e5f67890", b"jdoe"),
    ("clientid: 1h2j3k4l5m6n7o8p9q0r1s2t3u", b"1h2j3k4l5m6n7o8p9q0r1s2t3u"),
])
def test_keywords_of_a_rule_ignoring_case_in_part_are_found_in_any_case(text: str, masked: bytes) -> None:
    """A rule whose regex ignores case only in a group, (?i:key[-_]?pair[-_]?id), matches "keypairid"; its
    keywords (KeyPairId, …) were looked for as written, so the Python engine skipped it where Hyperscan (no
    keyword prefilter) masked the value (found by a differential fuzzer)."""
    assert _agreed_values(text.encode()) == [masked]


@pytest.mark.parametrize("text, masked", [
    # Hyperscan locates this rule by its match ends: both engines missed the key
    ("KmsKeyId: alias/aws/KmsKeyId=0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b",
     b"0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"),
    # ... and these by a literal at their start, tried at every occurrence: the Python engine missed them
    ("log_group_name = aws_cloudwatch_log_group.app.log_group_name=payments-api", b"payments-api"),
    ("StackName: AWS::StackName=orders-prod", b"orders-prod"),
    ("bucket = local.bucket=acme-data-prod", b"acme-data-prod"),
])
def test_a_match_that_starts_inside_a_match_its_rule_rejects_is_found(text: str, masked: bytes) -> None:
    """A rule's match it does not accept (a code reference, an AWS-managed alias) hid a match of the same rule
    that starts inside it: the search went on after its end (found by a differential fuzzer)."""
    assert _agreed_values(text.encode()) == [masked]


def test_rules_whose_matches_cannot_start_inside_one_another_are_told() -> None:
    from aws_masker.scanner import _no_inner_start

    # no match starts after a digit or a dot; all it takes but its last byte is digits and dots
    assert _no_inner_start(re.compile(rb"(?<![0-9.])\d+(?:\.\d+)*(?:[^0-9.]|$)"))
    assert _no_inner_start(re.compile(rb"(?i)(?<![\w:])[0-9a-f:]+\d{1,5}(?![\w:])"))
    assert not _no_inner_start(re.compile(rb"(?<![0-9.])\d+ \d+"))  # a match may start after the space
    assert not _no_inner_start(re.compile(rb"\b\d+"))  # no look-behind
    assert not _no_inner_start(re.compile(rb"(?<![0-9])\d+(?:x|yz)"))  # y is no last byte


@pytest.mark.parametrize("lead", [b"", b"see ", b"x" * 2000 + b" "])
def test_a_match_longer_than_the_window_that_starts_with_no_word_boundary_in_it_is_masked_whole(
        lead: bytes) -> None:
    """Hyperscan reports where a hostname ends; its rule then runs over the 1 KiB before that end. A first
    label of 1,000 characters puts the window's start inside it, where \\b fails: the match found started
    after the next "-", far into the window, so it was taken for a whole one and the 1,000 characters before
    it were forwarded (found by a differential fuzzer; the Python engine masked the whole name)."""
    host = b"a" * 1000 + b"-web.abcdefghij.eu-west-1.elb.amazonaws.com"
    assert _agreed_values(lead + host + b" ok") == [host]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_run_of_dashes_after_an_s3_endpoint_costs_no_exponential_backtracking(engine: str) -> None:
    """(?:[.-][a-z0-9-]+)* after "s3" splits a run of dashes in 2**n ways before "\\.amazonaws" fails: 34
    dashes took seconds (the fuzzer's 1,000, forever), also on Hyperscan, whose window for the S3 URL that
    follows takes them in."""
    import time

    data = b"see s3.us-east-1.amazonaws.com." + b"-" * 34 + b" and s3.amazonaws.com/bucket-name/key"
    scanner = full_scanner(engine)
    started = time.perf_counter()
    assert scanner.scan_values(data) == [b"bucket-name"]
    assert time.perf_counter() - started < 0.5


# --- a recall hunt over texts developers paste: each sample leaked before its rule ------------------------

def _leaks(text: str, secrets: list[str], engine: str) -> list[str]:
    """The values of ``secrets`` that some occurrence of in ``text`` is not entirely covered by hits."""
    data = text.encode("utf-8")
    hits = full_scanner(engine).scan(data)
    covered = bytearray(len(data))
    for h in hits:
        covered[h.start:h.end] = b"\x01" * (h.end - h.start)
    return [v for v in secrets
            if v.encode() not in data
            or any(not all(covered[m.start():m.end()]) for m in re.finditer(re.escape(v.encode()), data))]


def _kept(text: str, keep: list[str], engine: str) -> list[str]:
    """The strings of ``keep`` that no longer stand in ``text`` once its hits are replaced."""
    data = bytearray(text.encode("utf-8"))
    for h in reversed(full_scanner(engine).scan(bytes(data))):
        data[h.start:h.end] = b"AWS_%s_0001" % h.kind.encode()
    return [k for k in keep if k.encode() not in data]


SIGNED_URLS_AND_TOKENS = "".join((
    "$ aws s3 presign s3://amzn-s3-demo-bucket/report.pdf   # an old SDK still signing with Sig"
    "V2\n",
    "https://amzn-s3-demo-bucket.s3.amazonaws.com/report.pdf?AWSAccessKeyId=AKIAIOSFODNN7EXAMPL"
    "E&Expires=1732636800&Signature=vjbyPxybdZaNmGa%2ByT272YEAiv4%3D\n",
    "> Authorization: AWS AKIAIOSFODNN7EXAMPLE:frJIUN8DYpKDtOLCwo//yllqDzg=\n",
    "https://d111111abcdef8.cloudfront.net/intro.mp4?Expires=1732636800&Signature=nitfHRCrtziwO"
    "2HwPfWw~yYDhUF5EwRunQA-j19DzZrvDh6hQ73lDx~-ar3UocvvRQVw6EkC~GdpGQyyOSKQim-TxAnW7d8F5Kkai9H"
    "Vx0FIu-5jcQb0UEmatEXAMPLE3ReXySpLSMj0yCd3ZAB4UcBCAqEijkytL6f3fVYNGQI6&Key-Pair-Id=K2JCJMDE"
    "HXQW5F\n",
    "Set-Cookie: CloudFront-Policy=eyJTdGF0ZW1lbnQiOlt7IlJlc291cmNlIjoiaHR0cHM6Ly9kMTExMTExYWJj"
    "ZGVmOC5jbG91ZGZyb250Lm5ldC8qIn1dfQ__; Path=/; Secure\n",
    "Set-Cookie: CloudFront-Signature=dGhpc2lzYW5leGFtcGxlc2lnbmF0dXJlZm9yY2xvdWRmcm9udGNvb2tpZ"
    "XNvbmx5~ZXhhbXBsZQ__; Path=/\n",
    "Set-Cookie: CloudFront-Key-Pair-Id=K2JCJMDEHXQW5F; Path=/\n",
    "$ aws eks get-token --cluster-name demo\n",
    '{"kind": "ExecCredential", "apiVersion": "client.authentication.k8s.io/v1beta1", "spec": {'
    '}, "status": {"expirationTimestamp": "2026-11-26T16:14:00Z", "token": "k8s-aws-v1.aHR0cHM6'
    "Ly9zdHMuZXUtd2VzdC0xLmFtYXpvbmF3cy5jb20vP0FjdGlvbj1HZXRDYWxsZXJJZGVudGl0eSZWZXJzaW9uPTIwMT"
    'EtMDYtMTU"}}\n',
    "$ aws ecr get-login-password --region us-east-1\n",
    "eyJwYXlsb2FkIjoiWmFVWGVyeE9XMjVrU0dsaVRVcDhNakkwT1dObU4wUXhPREV6TlRsbE1qRXlORFpsT0RZd1pUaz"
    "VNVFUzTnpobU1EZ3laVEEwWlRWbFpqQXpPVEUwTVRneE5EYz0iLCJ2ZXJzaW9uIjoiMiJ9\n",
    "$ cat ~/.docker/config.json\n",
    '{"auths": {"111122223333.dkr.ecr.us-east-1.amazonaws.com": {"auth": "QVdTOmV5SndZWGxzYjJGa'
    "0lqb2lXbUZWV0dWeWVFOVhNalZyVTBkc2FWUlZjRGhOYWtrd1QxZE9iVTR3VVhoUFJFVjZUbFJzYkUxcVJYbE9SRnB"
    'z"}}}\n',
    "$ cat ~/.aws/sso/cache/6f1e2c3d4b5a69788796a5b4c3d2e1f0a9b8c7d6.json\n",
    '{"startUrl": "https://d-9067c2a1b3.awsapps.com/start", "region": "us-east-1", "accessToken'
    '": "aoaAAAAAGdExampleAccessTokenValue0123456789abcdefghijklmnop:MGUCMQDexample", "expiresA'
    't": "2026-11-26T20:00:00Z", "clientId": "exampleClientId", "clientSecret": "eyJraWQiOiJrZX'
    'ktMTU2NDAyODA5OSIsImFsZyI6IkhTMzg0In0.eyJzZXJpYWxpemVkIjoiZXhhbXBsZSJ9.exampleSignature", '
    '"refreshToken": "aorAAAAAGdExampleRefreshToken0123456789abcdefghijkl"}\n',
))


@pytest.mark.parametrize("engine", ENGINES)
def test_signatures_and_short_lived_tokens_pasted_from_real_tools_are_masked(engine: str) -> None:
    secrets = ["vjbyPxybdZaNmGa%2ByT272YEAiv4%3D", "frJIUN8DYpKDtOLCwo//yllqDzg=", "K2JCJMDEHXQW5F",
               "nitfHRCrtziwO2HwPfWw~yYDhUF5EwRunQA-j19DzZrvDh6hQ73lDx~",
               "eyJTdGF0ZW1lbnQiOlt7IlJlc291cmNlIjoiaHR0cHM6Ly9kMTExMTExYWJjZGVmOC5jbG91ZGZyb250Lm5ldC8qIn1dfQ__",
               "dGhpc2lzYW5leGFtcGxlc2lnbmF0dXJlZm9yY2xvdWRmcm9udGNvb2tpZXNvbmx5~ZXhhbXBsZQ__",
               "aHR0cHM6Ly9zdHMuZXUtd2VzdC0xLmFtYXpvbmF3cy5jb20vP0FjdGlvbj1HZXRDYWxsZXJJZGVudGl0eSZWZXJzaW9uPTIwMTEtMDYtMTU",
               "eyJwYXlsb2FkIjoiWmFVWGVyeE9XMjVrU0dsaVRVcDhNakkwT1dObU4wUXhPREV6TlRsbE1qRXlORFpsT0RZd1pUazVNVFUzTnpobU1EZ3laVEEwWlRWbFpqQXpPVEUwTVRneE5EYz0iLCJ2ZXJzaW9uIjoiMiJ9",
               "QVdTOmV5SndZWGxzYjJGa0lqb2lXbUZWV0dWeWVFOVhNalZyVTBkc2FWUlZjRGhOYWtrd1QxZE9iVTR3VVhoUFJFVjZUbFJzYkUxcVJYbE9SRnBz",
               "aoaAAAAAGdExampleAccessTokenValue0123456789abcdefghijklmnop:MGUCMQDexample",
               "aorAAAAAGdExampleRefreshToken0123456789abcdefghijkl", "eyJzZXJpYWxpemVkIjoiZXhhbXBsZSJ9"]
    assert _leaks(SIGNED_URLS_AND_TOKENS, secrets, engine) == []
    assert _kept(SIGNED_URLS_AND_TOKENS, ["Expires=1732636800", "k8s-aws-v1.", "Path=/; Secure",
                                          '"expiresAt": "2026-11-26T20:00:00Z"'], engine) == []


CLOUDFORMATION_DEPLOY = "\n".join((
    "$ sam deploy",
    "\tDeploying with following values",
    "\t===============================",
    "\tStack name                   : orders-service-prod",
    "\tRegion                       : us-east-1",
    "\tConfirm changeset            : True",
    "Successfully created/updated stack - orders-service-prod in us-east-1",
    "$ aws cloudformation describe-stacks --stack-name orders-service-prod",
    '{"Stacks": [{"StackId": "arn:aws:cloudformation:us-east-1:111122223333:stack/orders-service-prod/'
    '8b2f1a30-ab12-11ef-9c1d-0affd3c5e2b9", "StackName": "orders-service-prod",',
    '  "Parameters": [{"ParameterKey": "Stage", "ParameterValue": "prod"}],',
    '  "StackStatus": "UPDATE_COMPLETE",',
    '  "Tags": [{"Key": "aws:cloudformation:stack-name", "Value": "orders-service-prod"}]}]}',
    "$ cdk deploy",
    "Stack ARN:",
    "arn:aws:cloudformation:us-east-1:111122223333:stack/network-baseline/"
    "1f2e3d4c-ab12-11ef-9c1d-0affd3c5e2b9",
    "$ serverless deploy --stage prod",
    "✔ Service deployed to stack orders-api-prod (112s)",
    "  Value: !Sub '${AWS::StackName}-vpc'",
    "",
))


@pytest.mark.parametrize("engine", ENGINES)
def test_cloudformation_stack_names_are_masked_in_arns_and_deploy_output(engine: str) -> None:
    secrets = ["orders-service-prod", "network-baseline", "orders-api-prod", "111122223333",
               "8b2f1a30-ab12-11ef-9c1d-0affd3c5e2b9"]
    assert _leaks(CLOUDFORMATION_DEPLOY, secrets, engine) == []
    assert _kept(CLOUDFORMATION_DEPLOY, ["UPDATE_COMPLETE", "${AWS::StackName}-vpc", "us-east-1",
                                         '"Key": "aws:cloudformation:stack-name"'], engine) == []


CONFIGS_AND_MANIFESTS = "\n".join((
    "$ cat ~/.aws/config",
    "[profile prod-deploy]",
    "role_arn = arn:aws:iam::777788889999:role/OrganizationAccountAccessRole",
    "source_profile = dev-admin",
    "role_session_name = jdoe-deploy",
    "external_id = acme-ext-4f9a2c",
    "$ kubectl -n kube-system get configmap aws-auth -o yaml",
    "data:",
    "  mapAccounts: |",
    '    - "444455556666"',
    '    - "555566667777"',
    "kind: ConfigMap",
    "$ aws ecs describe-task-definition --task-definition checkout-api:42",
    '"environment": [',
    '    {"name": "ASSETS_BUCKET", "value": "acme-checkout-assets"},',
    '    {"name": "STAGE", "value": "prod"}',
    "],",
    "$ aws lambda get-function-configuration --function-name orders-sync",
    '{"FunctionName": "orders-sync", "Runtime": "python3.12", "Handler": "app.handler"}',
    "$ aws dynamodb describe-table --table-name orders-prod",
    '{"Table": {"TableName": "orders-prod", "TableStatus": "ACTIVE"}}',
    "terraform {",
    '  backend "s3" {',
    '    dynamodb_table = "acme-terraform-locks"',
    "  }",
    "}",
    "$ aws sns subscribe ... # the alarm that fired",
    '{"AlarmName": "orders-5xx-high", "Trigger": {"Dimensions": [{"value": "app/shop-alb/50dc6c495c0c9188",'
    ' "name": "LoadBalancer"}, {"value": "targetgroup/shop-tg/73e2d6bc24d8a067", "name": "TargetGroup"}]}}',
    "",
))


@pytest.mark.parametrize("engine", ENGINES)
def test_names_in_configs_and_manifests_are_masked(engine: str) -> None:
    secrets = ["jdoe-deploy", "acme-ext-4f9a2c", "444455556666", "555566667777", "acme-checkout-assets",
               "orders-sync", "orders-prod", "acme-terraform-locks", "shop-alb/50dc6c495c0c9188",
               "shop-tg/73e2d6bc24d8a067"]
    assert _leaks(CONFIGS_AND_MANIFESTS, secrets, engine) == []
    assert _kept(CONFIGS_AND_MANIFESTS, ["source_profile = dev-admin", '"value": "prod"', "python3.12",
                                         "app.handler", '"TableStatus": "ACTIVE"', "LoadBalancer"],
                 engine) == []


ERROR_MESSAGES = "\n".join((
    "Traceback (most recent call last):",
    '  File "sync.py", line 42, in <module>',
    "botocore.errorfactory.NoSuchEntityException: An error occurred (NoSuchEntity) when calling the GetRole"
    " operation: The role with name payments-lambda-exec cannot be found.",
    "botocore.errorfactory.ResourceNotFoundException: An error occurred (ResourceNotFoundException) when"
    " calling the DescribeTable operation: Requested resource not found: Table: orders-prod not found",
    "An error occurred (ValidationError) when calling the DescribeStacks operation: Stack with id"
    " orders-service-prod does not exist",
    "An error occurred (RepositoryNotFoundException) when calling the DescribeImages operation: The"
    " repository with name 'payments/checkout-api' does not exist in the registry with id '111122223333'",
    "$ terraform apply",
    "│ Error: creating IAM Role (orders-lambda-exec): operation error IAM: CreateRole, https response error"
    " StatusCode: 409, RequestID: 2f4e6d8c-1a3b-5c7d-9e0f-a1b2c3d4e5f6, EntityAlreadyExists: Role with name"
    " orders-lambda-exec already exists.",
    "│ Error: reading S3 Bucket (acme-logs-missing): operation error S3: HeadBucket, https response error"
    " StatusCode: 404",
    "│ Error: creating DynamoDB Table (orders-ledger-prod): ResourceInUseException: Table already exists:"
    " orders-ledger-prod",
    "│ Error: creating EKS Cluster (payments-prod): ResourceInUseException: Cluster already exists with"
    " name: payments-prod",
    "│ Error: waiting for EC2 Instance (i-0123456789abcdef0) create: timeout while waiting for state",
    "│   with aws_iam_role.lambda,",
    '│   on main.tf line 12, in resource "aws_iam_role" "lambda":',
    "",
))


@pytest.mark.parametrize("engine", ENGINES)
def test_names_in_aws_and_terraform_error_messages_are_masked(engine: str) -> None:
    secrets = ["payments-lambda-exec", "orders-prod", "orders-service-prod", "payments/checkout-api",
               "111122223333", "orders-lambda-exec", "acme-logs-missing", "orders-ledger-prod",
               "payments-prod", "i-0123456789abcdef0"]
    assert _leaks(ERROR_MESSAGES, secrets, engine) == []
    assert _kept(ERROR_MESSAGES, ["GetRole operation", "StatusCode: 409", "aws_iam_role.lambda",
                                  "main.tf line 12", "EC2 Instance ("], engine) == []


CLI_OUTPUT_WITHOUT_ARNS = "\n".join((
    "$ aws s3api list-buckets",
    "{",
    '    "Buckets": [',
    "        {",
    '            "Name": "acme-logs-archive",',
    '            "CreationDate": "2024-01-01T00:00:00+00:00"',
    "        }",
    "    ],",
    '    "Owner": {"DisplayName": "ops",',
    '              "ID": "79a59df900b949e55d96a1e698fbacedfd6e09d98eacf8f8d5218e7cd47ef2be"}',
    "}",
    "$ aws s3api list-buckets --output text",
    "BUCKETS\t2024-02-01T00:00:00+00:00\tacme-web-prod",
    "OWNER\tops\t0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9",
    "$ aws ssm get-parameter --name /acme/prod/db/password --with-decryption",
    '{"Parameter": {"Name": "/acme/prod/db/password", "Type": "SecureString", "Value": "s3cr3t-Pa55w0rd!",',
    '  "Version": 3}}',
    "$ aws secretsmanager get-secret-value --secret-id prod/orders/db",
    '{"Name": "prod/orders/db", "SecretString": "{\\"username\\":\\"orders_admin\\",\\"password\\":'
    '\\"EXAMPLE-PASSWORD\\"}", "VersionStages": ["AWSCURRENT"]}',
    "$ aws ssm start-session --target i-0123456789abcdef0",
    "Starting session with SessionId: jane.doe@example.com-0a1b2c3d4e5f67890",
    "$ aws identitystore list-users --identity-store-id d-9067c2a1b3",
    '{"Users": [{"UserName": "jane", "IdentityStoreId": "d-9067c2a1b3"}]}',
    "$ aws rds describe-db-instances",
    '{"DBInstances": [{"DBInstanceIdentifier": "orders-db-primary", "DBInstanceClass": "db.r6g.large"}]}',
    "",
))


@pytest.mark.parametrize("engine", ENGINES)
def test_names_and_secrets_in_cli_output_without_arns_are_masked(engine: str) -> None:
    secrets = ["acme-logs-archive", "acme-web-prod",
               "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9",
               "79a59df900b949e55d96a1e698fbacedfd6e09d98eacf8f8d5218e7cd47ef2be", "s3cr3t-Pa55w0rd!",
               "EXAMPLE-PASSWORD", "orders_admin", "jane.doe@example.com", "d-9067c2a1b3",
               "orders-db-primary", "i-0123456789abcdef0"]
    assert _leaks(CLI_OUTPUT_WITHOUT_ARNS, secrets, engine) == []
    keep = ['"Type": "SecureString"', '"VersionStages": ["AWSCURRENT"]', "db.r6g.large",
            '"DisplayName": "ops"', "2024-01-01T00:00:00+00:00"]
    assert _kept(CLI_OUTPUT_WITHOUT_ARNS, keep, engine) == []


NAMES_AFTER_FLAGS_AND_KEYS = "\n".join((
    "$ aws eks describe-nodegroup \\",
    "    --cluster-name payments-prod \\",
    "    --nodegroup-name ng-general-1",
    "{",
    '    "nodegroup": {',
    '        "nodegroupName": "ng-general-1",',
    '        "clusterName": "payments-prod",',
    '        "version": "1.29",',
    '        "status": "ACTIVE"',
    "    }",
    "}",
    "$ aws ecs execute-command --cluster orders-cluster --task 0123456789abcdef0123456789abcdef --interactive"
    " --command /bin/sh",
    "$ aws ecs describe-services --cluster default --services web",
    '{"events": [{"message": "(service orders-api) has started 1 tasks: (task'
    ' 0123456789abcdef0123456789abcdef)."}]}',
    '{"logStreamName": "ecs/app/0123456789abcdef0123456789abcdef"}',
    "$ aws iam list-access-keys --user-name ci-deployer",
    '{"AccessKeyMetadata": [{"UserName": "ci-deployer", "AccessKeyId": "AKIAIOSFODNN7EXAMPLE",'
    ' "Status": "Active"}]}',
    "$ aws apigateway get-stages --rest-api-id a1b2c3d4e5",
    '{"Items": [{"ApiId": "k7x2m9qa01", "RouteKey": "GET /pets"}]}',
    "$ aws cognito-idp describe-user-pool-client --user-pool-id us-east-1_aB3dE5fG7 --client-id"
    " 4example5abcdefghij6klmnop",
    "[profile acme-prod]",
    "sso_account_id = 111122223333",
    "sso_role_name = PaymentsAdmin",
    "[profile acme-audit]",
    "sso_role_name = ReadOnlyAccess",
    "$ aws sqs get-queue-url --queue-name orders-dlq.fifo",
    "$ aws kinesis describe-stream-summary --stream-name clickstream-prod",
    "$ aws secretsmanager get-secret-value --secret-id prod/orders/db --query SecretString",
    "$ aws ssm describe-parameters",
    "{",
    '    "Parameters": [',
    "        {",
    '            "Name": "/acme/prod/feature-flags",',
    '            "Type": "StringList",',
    '            "Version": 1',
    "        }",
    "    ]",
    "}",
    "$ aws ecr describe-images --repository-name payments/checkout-api",
    '{"imageDetails": [{"registryId": "111122223333", "repositoryName": "payments/checkout-api",'
    ' "imageTags": ["1.4.2"]}]}',
    "$ docker pull 111122223333.dkr.ecr.us-east-1.amazonaws.com/billing-api:2.0.1",
    "$ aws glue start-job-run --job-name nightly-orders-etl",
    "$ aws codebuild start-build --project-name orders-api-build",
    '{"Records": [{"s3": {"bucket": {"name": "amzn-s3-demo-bucket", "ownerIdentity": {"principalId":'
    ' "A3NL1KOZZKExample"}}}}]}',
    "$ docker compose --project-name orders up -d",
    "",
))


@pytest.mark.parametrize("engine", ENGINES)
def test_names_after_aws_flags_and_keys_are_masked_without_an_arn(engine: str) -> None:
    secrets = ["payments-prod", "orders-cluster", "0123456789abcdef0123456789abcdef", "orders-api",
               "ci-deployer", "a1b2c3d4e5", "k7x2m9qa01", "4example5abcdefghij6klmnop", "PaymentsAdmin",
               "orders-dlq.fifo", "clickstream-prod", "prod/orders/db", "acme/prod/feature-flags",
               "payments/checkout-api", "billing-api", "nightly-orders-etl", "orders-api-build",
               "A3NL1KOZZKExample", "111122223333", "ng-general-1"]
    assert _leaks(NAMES_AFTER_FLAGS_AND_KEYS, secrets, engine) == []
    kinds = {value: kind for value, kind in scan(NAMES_AFTER_FLAGS_AND_KEYS, engine)}
    assert kinds["payments-prod"] == "ARN_EKS" and kinds["orders-cluster"] == "ARN_ECS"
    assert kinds["ci-deployer"] == "IAM_USER" and kinds["acme/prod/feature-flags"] == "ARN_SSM"
    keep = ["--cluster default",
            "sso_role_name = ReadOnlyAccess", '"RouteKey": "GET /pets"', '"Type": "StringList"',
            "--project-name orders up", '"imageTags": ["1.4.2"]', "/bin/sh"]
    assert _kept(NAMES_AFTER_FLAGS_AND_KEYS, keep, engine) == []


ARNS_AT_A_SENTENCES_END = [
    ("arn:aws:events:us-east-1:111122223333:rule/orders-bus/nightly-orders",
     [b"111122223333", b"orders-bus", b"nightly-orders"]),
    ("arn:aws:glue:us-east-1:111122223333:table/sales_db/orders_2026",
     [b"111122223333", b"sales_db", b"orders_2026"]),
    ("arn:aws:dynamodb:us-east-1:111122223333:table/orders-table", [b"111122223333", b"orders-table"]),
    ("arn:aws:kinesis:us-east-1:111122223333:stream/orders-stream", [b"111122223333", b"orders-stream"]),
    ("arn:aws:secretsmanager:us-east-1:111122223333:secret:prod/db-password-AbCdEf",
     [b"111122223333", b"prod/db-password"]),
    ("arn:aws:execute-api:us-east-1:111122223333:abcdefghij/prod/GET/orders",
     [b"111122223333", b"abcdefghij", b"prod/GET/orders"]),
    ("arn:aws:codepipeline:us-east-1:111122223333:orders-pipeline", [b"111122223333", b"orders-pipeline"]),
    ("arn:aws:scheduler:us-east-1:111122223333:schedule/orders-group/orders-nightly",
     [b"111122223333", b"orders-group", b"orders-nightly"]),
    ("arn:aws:states:us-east-1:111122223333:stateMachine:orders-flow", [b"111122223333", b"orders-flow"]),
    ("arn:aws:sqs:us-east-1:111122223333:orders-queue", [b"111122223333", b"orders-queue"]),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("arn", "values"), ARNS_AT_A_SENTENCES_END)
@pytest.mark.parametrize("after", ["", ".", ". Next", ": failed", ":", "\n"])
def test_an_arn_before_a_full_stop_or_colon_masks_the_same_names(engine: str, arn: str, values: list[bytes],
                                                                  after: str) -> None:
    """A full stop or colon after an ARN (the end of a sentence, "ARN: error") is no part of its last name:
    the ARN rules of Glue, DynamoDB, EventBridge... took "name." for the name (so "name" elsewhere was not a
    repeat) or did not match at all, and the generic rule then forwarded a pipeline's name or an API's ID
    (read as the resource type before ":")."""
    assert full_scanner(engine).scan_values(f"See {arn}{after}".encode()) == values


# (fragment, values masked in each, bytes of it on one line)
LONG_LINES = [
    # a path that took ":" and "," ran on over every execute-api ARN after it: quadratic (22 s for 200 KB)
    (b"arn:aws:execute-api:us-east-1:111122223333:abcdefghij/a.", 3, 600_000),
    # --service then --cluster: each --service within 400 bytes searched 400 bytes for a --cluster (5.5 s
    # for 200 KB, so minutes for 1.2 MB)
    (b"aws ecs x --service a ", None, 1_200_000),
    (b"aws ecs x --cluster a ", None, 1_200_000),
    (b"aws ecs x --services a b c ", None, 600_000),  # the values after --services
    # ARNs joined by "," ";" "|" "." or ":" (a list in one argument): the generic rule's resource and an S3
    # ARN's key ran on over every later ARN, so each start of "arn:" was matched to the end of the line
    # (Hyperscan: 3-8 s for 200 KB) and the buckets after the first were forwarded
    (b"arn:aws:sqs:us-east-1:111122223333:orders-q,", 2, 600_000),
    (b"arn:aws:s3:::bucket-a/k,", 1, 600_000),
    (b"arn:aws:s3:::bucket-a/k|", 1, 600_000),
    (b"arn:aws:iam::111122223333:role/x:", 2, 600_000),
]
_COUNT_EACH = """
import sys
from aws_masker.rules import load_rules
from aws_masker.scanner import Scanner
scanner = Scanner(load_rules(), sys.argv[1])
print([len(scanner.scan_values(text)) for text in sys.stdin.buffer.read().split(b"\\0")])
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_long_lines_of_almost_matches_scan_in_linear_time(engine: str) -> None:
    """Hundreds of KB of one fragment on a line: scanned in seconds, or in minutes if a rule is quadratic on
    it (one child process scans them all and is given 120 s; no timing is asserted)."""
    import ast
    import subprocess
    import sys

    texts = [fragment * (size // len(fragment)) for fragment, _, size in LONG_LINES]
    out = subprocess.run([sys.executable, "-c", _COUNT_EACH, engine], input=b"\0".join(texts),
                         capture_output=True, check=True, timeout=120).stdout
    counts = ast.literal_eval(out.decode())
    for (fragment, values, size), count in zip(LONG_LINES, counts, strict=True):
        if values is not None:
            assert count == values * (size // len(fragment)), fragment


@pytest.mark.parametrize("engine", ENGINES)
def test_every_bucket_of_a_list_of_s3_arns_is_masked(engine: str) -> None:
    text = b"--resources arn:aws:s3:::bucket-a/k,arn:aws:s3:::bucket-bbb/k;arn:aws:s3:::bucket-ccc/*"
    assert full_scanner(engine).scan_values(text) == [b"bucket-a", b"bucket-bbb", b"bucket-ccc"]
