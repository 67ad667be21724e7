"""scripts/mask (aws_masker.cli) as a subprocess: masked text on stdout, a summary per rule on stderr."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aws_masker.scanner import HAVE_HYPERSCAN
from proxyproc import REPO
from test_proxy import ORIGINALS, TEXT

SAMPLE = TEXT + "\nAgain: i-0a1b2c3d4e5f60718 in account 123456789012.\n"
CORP_RULES = """\
rules:
  - id: corp-db-host
    description: Internal database hostnames (db<N>.corp.example)
    regex: '\\bdb[0-9]+\\.corp\\.example\\b'
    keywords: [".corp.example"]
    placeholder: CORP_DB_HOST
    examples:
      - "db12.corp.example"
      - text: "connect to db3.corp.example:5432 now"
        masked: ["db3.corp.example"]
    counterexamples:
      - "db.corp.example.org"
"""


def mask(*args: str | Path, stdin: str | bytes | None = None, cwd: Path | None = None,
         ) -> subprocess.CompletedProcess[str]:
    data = stdin.decode() if isinstance(stdin, bytes) else stdin
    return subprocess.run([sys.executable, "-m", "aws_masker.cli", *map(str, args)], input=data or "",
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def assert_clean(text: str, originals: list[str] = ORIGINALS) -> None:
    leaked = [o for o in originals if o in text]
    assert not leaked, f"originals in the output: {leaked}"


def summary_rows(stderr: str) -> dict[tuple[str, str], int]:
    """(rule, kind) -> count from the summary table."""
    rows = {}
    for line in stderr.splitlines():
        m = re.fullmatch(r"([a-z0-9-]+)\s+([A-Z][A-Z0-9_]*)\s+(\d+)", line.strip())
        if m:
            rows[(m.group(1), m.group(2))] = int(m.group(3))
    return rows


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE, encoding="utf-8")
    return path


def test_file_is_masked_with_a_summary_per_rule(sample: Path) -> None:
    r = mask(sample)
    assert r.returncode == 0, r.stderr
    assert_clean(r.stdout)
    assert_clean(r.stderr)  # the summary never shows an original
    assert r.stdout.count("AWS_EC2_INSTANCE_0001") == 2 and "AWS_EC2_INSTANCE_0002" not in r.stdout
    assert "arn:aws:iam::AWS_ACCOUNT_0001:role/" in r.stdout and "\nAgain: " in r.stdout
    assert "us-east-1" in r.stdout and "ünïcødé ✓" in r.stdout
    rows = summary_rows(r.stderr)
    assert rows[("aws-ec2-instance-id", "EC2_INSTANCE")] == 2
    assert rows[("aws-ec2-security-group-id", "SECURITY_GROUP")] == 1
    assert rows[("aws-access-key-id", "ACCESS_KEY_ID")] == 1
    assert sum(n for (_, kind), n in rows.items() if kind == "ACCOUNT") == 2
    total = re.search(r"total: (\d+) identifiers, (\d+) distinct originals, (\d+) bytes, masked in [\d.]+ ms",
                      r.stderr)
    assert total, r.stderr
    assert int(total.group(1)) == sum(rows.values()) == 9
    assert int(total.group(2)) == 7 and int(total.group(3)) == len(SAMPLE.encode())


def test_stdin_and_dash_give_the_same_output(sample: Path) -> None:
    from_file = mask(sample)
    for args in ((), ("-",)):
        r = mask(*args, stdin=SAMPLE)
        assert r.returncode == 0, r.stderr
        assert r.stdout == from_file.stdout


def test_check_exit_codes(sample: Path, tmp_path: Path) -> None:
    r = mask("--check", sample)
    assert r.returncode == 1 and r.stdout == ""
    assert "9 identifiers would be masked" in r.stderr
    clean = tmp_path / "clean.md"
    clean.write_text("Nothing here: us-east-1, m5.large, i-am-not-an-id.\n")
    r = mask("--check", clean)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert "total: 0 identifiers" in r.stderr
    assert mask("--check", "-", stdin="i-0a1b2c3d4e5f60718").returncode == 1


def test_show_mapping_prints_originals_only_when_asked(sample: Path) -> None:
    r = mask("--show-mapping", sample)
    assert r.returncode == 0
    assert_clean(r.stdout)
    assert re.search(r"AWS_EC2_INSTANCE_0001\s+i-0a1b2c3d4e5f60718\s+\(aws-ec2-instance-id\)", r.stderr)
    assert all(o in r.stderr for o in ORIGINALS)
    assert "ORIGINALS" in mask("--help").stdout  # the help warns about it


def test_a_placeholder_the_input_holds_as_text_is_not_handed_to_an_identifier() -> None:
    r = mask("--show-mapping", stdin="AWS_EC2_INSTANCE_0001 was the old one; i-0a1b2c3d4e5f60718 is new\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "AWS_EC2_INSTANCE_0001 was the old one; AWS_EC2_INSTANCE_0002 is new\n"


def test_json_masks_string_values_like_the_proxy() -> None:
    body = {"model": "m", "i-0a1b2c3d4e5f60718": "a key stays",
            "messages": [{"role": "user", "content": "why is i-0a1b2c3d4e5f60718 in 10.20.30.40 down?"}],
            "n": 123456789012}
    r = mask("--json", stdin=json.dumps(body))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["messages"][0]["content"] == "why is AWS_EC2_INSTANCE_0001 in AWS_IPV4_0001 down?"
    assert out["i-0a1b2c3d4e5f60718"] == "a key stays"  # keys and numbers are not masked, as in the proxy
    assert out["n"] == 123456789012
    assert "not valid JSON" not in r.stderr
    r = mask("--json", stdin='{"broken": "i-0a1b2c3d4e5f60718",,}')
    assert r.returncode == 0 and "not valid JSON, masked as text" in r.stderr
    assert r.stdout == '{"broken": "AWS_EC2_INSTANCE_0001",,}'


def test_custom_rule_file_and_folder(tmp_path: Path) -> None:
    rules = tmp_path / "team" / "corp.yaml"
    rules.parent.mkdir()
    rules.write_text(CORP_RULES)
    text = "connect to db12.corp.example and db3.corp.example from i-0a1b2c3d4e5f60718\n"
    r = mask(stdin=text)
    assert "db12.corp.example" in r.stdout  # not masked by the built-in catalog
    for path in (rules, rules.parent):
        r = mask("--rules", path, "--show-mapping", stdin=text)
        assert r.returncode == 0, r.stderr
        assert r.stdout == ("connect to AWS_CORP_DB_HOST_0001 and AWS_CORP_DB_HOST_0002 from "
                            "AWS_EC2_INSTANCE_0001\n")
        assert summary_rows(r.stderr)[("corp-db-host", "CORP_DB_HOST")] == 2
        assert re.search(r"AWS_CORP_DB_HOST_0002\s+db3\.corp\.example\s+\(corp-db-host\)", r.stderr)


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("regex", CORP_RULES.replace("db[0-9]+", "db[0-9+"), "regex"),
    ("example", CORP_RULES.replace('"db12.corp.example"', '"db12.corp.example.org.x"'), "example"),
    ("field", CORP_RULES.replace("    placeholder: CORP_DB_HOST\n", ""), "placeholder"),
    ("yaml", "rules:\n  - id: corp-db-host\n    regex: [unclosed\n", "not valid YAML"),
])
def test_broken_rule_file_exits_2_naming_file_and_rule(tmp_path: Path, name: str, content: str,
                                                       needle: str) -> None:
    path = tmp_path / f"broken-{name}.yaml"
    path.write_text(content)
    r = mask("--rules", path, stdin="i-0a1b2c3d4e5f60718")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert str(path) in r.stderr and needle in r.stderr, r.stderr
    if name != "yaml":
        assert "corp-db-host" in r.stderr
    r = mask("--rules", tmp_path / "missing.yaml", stdin="x")
    assert r.returncode == 2 and "missing.yaml" in r.stderr


def test_unreadable_input_exits_2(tmp_path: Path) -> None:
    r = mask(tmp_path / "nope.txt")
    assert r.returncode == 2 and "cannot read" in r.stderr and r.stdout == ""


@pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")
def test_engines_agree(sample: Path) -> None:
    hs, py = mask("--engine", "hyperscan", sample), mask("--engine", "python", sample)
    assert hs.returncode == py.returncode == 0
    assert "hyperscan engine" in hs.stderr and "python engine" in py.stderr
    assert hs.stdout == py.stdout
    assert summary_rows(hs.stderr) == summary_rows(py.stderr)


def test_scripts_mask_wrapper(sample: Path) -> None:
    stamp, pyproject = REPO / ".venv" / ".aws-masker-installed", REPO / "pyproject.toml"
    if not stamp.exists() or stamp.stat().st_mtime <= pyproject.stat().st_mtime:
        pytest.skip("the venv is not set up (scripts/setup would install packages)")
    r = subprocess.run([str(REPO / "scripts" / "mask"), "--check", str(sample)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    r = subprocess.run([str(REPO / "scripts" / "mask")], input=SAMPLE, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout == mask(sample).stdout
