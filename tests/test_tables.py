"""Cells of AWS CLI ``--output table`` tables, read after the header row (or key/value row) that names them.

The tables are the AWS CLI's own rendering (awscli's TableFormatter) of fake data."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aws_masker import tables
from aws_masker.masking import BodyMasker, MaskPlan
from aws_masker.placeholders import restore_bytes
from aws_masker.rules import load_rules
from aws_masker.scanner import Scanner
from aws_masker.store import MemoryStore

MASKER = BodyMasker(Scanner(load_rules()))

# The brief's example, as written by hand (column widths of any size)
SSO_BY_HAND = """\
-----------------------------------------------------
|                  ListAccounts                     |
+---------------------------------------------------+
||                   accountList                   ||
|+---------------+------------------+--------------+|
||   accountId   |   accountName    | emailAddress ||
|+---------------+------------------+--------------+|
||  111122223333 |  acme-payments   |  a@b.com     ||
||  444455556666 |  acme-logs       |  c@b.com     ||
|+---------------+------------------+--------------+|
"""

# aws sso list-accounts --output table: an account ID fills its column (no padding before the next "|")
SSO = """\
------------------------------------------------------------------
|                          ListAccounts                          |
+----------------------------------------------------------------+
||                          accountList                         ||
|+--------------+-----------------+-----------------------------+|
||   accountId  |   accountName   |        emailAddress         ||
|+--------------+-----------------+-----------------------------+|
||  111122223333|  acme-payments  |  aws+payments@acme.example  ||
||  444455556666|  acme-logs      |  aws+logs@acme.example      ||
|+--------------+-----------------+-----------------------------+|
"""

# aws organizations list-accounts --query 'Accounts[].{OwnerAccount:Id,Name:Name,Status:Status}'
ORGANIZATIONS = """\
----------------------------------------------------
|                   ListAccounts                   |
+-----------------+-----------------+--------------+
|      Name       |  OwnerAccount   |   Status     |
+-----------------+-----------------+--------------+
|  acme-payments  |  111122223333   |  ACTIVE      |
|  acme-logs      |  444455556666   |  ACTIVE      |
|  acme-sandbox   |  777788889999   |  SUSPENDED   |
+-----------------+-----------------+--------------+
"""

# aws ec2 describe-instances --output table: sections nested three deep, several header rows
EC2 = """\
------------------------------------------------------------------------------------------
|                                    DescribeInstances                                   |
+----------------------------------------------------------------------------------------+
||                                     Reservations                                     ||
|+----------------------------------+---------------------------------------------------+|
||              OwnerId             |                   ReservationId                   ||
|+----------------------------------+---------------------------------------------------+|
||  111122223333                    |  r-0a1b2c3d4e5f60718                              ||
|+----------------------------------+---------------------------------------------------+|
|||                                      Instances                                     |||
||+------------------------+-----------------------+---------------+-------------------+||
|||         ImageId        |      InstanceId       | InstanceType  | PrivateIpAddress  |||
||+------------------------+-----------------------+---------------+-------------------+||
|||  ami-0abcdef1234567890 |  i-0a1b2c3d4e5f60718  |  t3.micro     |  10.0.1.23        |||
||+------------------------+-----------------------+---------------+-------------------+||
||||                                       State                                      ||||
|||+---------------------------------+------------------------------------------------+|||
||||              Code               |                     Name                       ||||
|||+---------------------------------+------------------------------------------------+|||
||||  16                             |  running                                       ||||
|||+---------------------------------+------------------------------------------------+|||
||                                     Reservations                                     ||
|+----------------------------------+---------------------------------------------------+|
||              OwnerId             |                   ReservationId                   ||
|+----------------------------------+---------------------------------------------------+|
||  210987654321                    |  r-0f1e2d3c4b5a69788                              ||
|+----------------------------------+---------------------------------------------------+|
"""

# The same, too wide for the terminal: every one-row section is printed as key/value rows
EC2_NARROW = """\
---------------------------------------------------
|                DescribeInstances                |
+-------------------------------------------------+
||                 Reservations                  ||
|+-------------------+---------------------------+|
||  OwnerId          |  111122223333             ||
||  ReservationId    |  r-0a1b2c3d4e5f60718      ||
|+-------------------+---------------------------+|
|||                  Instances                  |||
||+-------------------+-------------------------+||
|||  ImageId          |  ami-0abcdef1234567890  |||
|||  InstanceId       |  i-0a1b2c3d4e5f60718    |||
|||  InstanceType     |  t3.micro               |||
|||  PrivateIpAddress |  10.0.1.23              |||
||+-------------------+-------------------------+||
"""

# aws lambda get-function --output table: a one-row section, printed as key/value rows
FUNCTION = """\
--------------------------------------------------------------------------
|                               GetFunction                              |
+------------------------------------------------------------------------+
||                             Configuration                            ||
|+--------------+-------------------------------------------------------+|
||  FunctionName|  orders-handler                                       ||
||  Handler     |  app.handler                                          ||
||  MemorySize  |  512                                                  ||
||  Role        |  arn:aws:iam::111122223333:role/orders-handler-role   ||
||  Runtime     |  python3.12                                           ||
|+--------------+-------------------------------------------------------+|
"""

# aws iam list-users --output table, aws lambda list-functions --query …: names the catalog masks after
# their key (UserName, FunctionName)
USERS = """\
---------------------------------------------------------------------------------
|                                   ListUsers                                   |
+-------------------------------------------------------------------------------+
||                                    Users                                    ||
|+----------------------------+-------+-------------------------+--------------+|
||         CreateDate         | Path  |         UserId          |  UserName    ||
|+----------------------------+-------+-------------------------+--------------+|
||  2024-01-03T10:11:12+00:00 |  /    |  AIDAZYMLOPIFQYF7M2NX1  |  alice.admin ||
||  2024-02-03T10:11:12+00:00 |  /ci/ |  AIDAQ3EGQ7WXYZ1234567  |  deploy-bot  ||
|+----------------------------+-------+-------------------------+--------------+|
"""
FUNCTIONS = """\
--------------------------------------------------
|                  ListFunctions                 |
+------------------+--------------+--------------+
|   FunctionName   | MemorySize   |   Runtime    |
+------------------+--------------+--------------+
|  orders-handler  |  512         |  python3.12  |
|  invoice-renderer|  1024        |  nodejs20.x  |
+------------------+--------------+--------------+
"""

# aws ec2 describe-volumes --output table: 12-digit sizes in a column that names no account
VOLUMES = """\
--------------------------------------------------------------------
|                          DescribeVolumes                         |
+------------------------------------------------------------------+
||                             Volumes                            ||
|+-------+---------------+-------------------------+--------------+|
|| Iops  |     Size      |        VolumeId         | VolumeType   ||
|+-------+---------------+-------------------------+--------------+|
||  3000 |  123456789012 |  vol-0a1b2c3d4e5f60718  |  gp3         ||
||  64000|  210987654321 |  vol-0f1e2d3c4b5a69788  |  io2         ||
|+-------+---------------+-------------------------+--------------+|
"""


def plan_and_mask(content: bytes, ctype: str = "text/plain") -> tuple[MaskPlan, bytes, dict[bytes, bytes]]:
    plan = MASKER.plan(content, ctype)
    out, mapping = plan.render(asyncio.run(MemoryStore().placeholders_for(plan.items)))
    return plan, out, mapping


def masked_text(text: str) -> tuple[set[str], str]:
    """The originals masked in ``text`` (as a text body), and the masked text; checks the restore is exact
    and that no hit takes a table's structure (a "|", a line break, padding)."""
    data = text.encode()
    plan, out, mapping = plan_and_mask(data)
    assert restore_bytes(out, mapping)[0] == data
    for h in plan.segments[0].hits:
        original = data[h.start:h.end]
        assert b"|" not in original and b"\n" not in original and b"\r" not in original
        assert original == original.strip(), original
    return {o.decode() for o in mapping.values()}, out.decode()


@pytest.mark.parametrize("text", [SSO_BY_HAND, SSO])
def test_account_ids_under_an_account_id_header_are_masked(text: str) -> None:
    masked, out = masked_text(text)
    assert {"111122223333", "444455556666"} <= masked
    assert "111122223333" not in out and "444455556666" not in out
    assert "acme-payments" in out and ("@acme.example" in out or "a@b.com" in out)  # nor in JSON
    assert out.count("|") == text.count("|") and out.count("+") == text.count("+")


def test_organizations_accounts_under_a_query_header_are_masked() -> None:
    masked, out = masked_text(ORGANIZATIONS)
    assert masked == {"111122223333", "444455556666", "777788889999"}
    assert "ACTIVE" in out and "acme-sandbox" in out


def test_ec2_describe_instances_nested_sections_with_several_header_rows() -> None:
    masked, out = masked_text(EC2)
    assert {"111122223333", "210987654321", "r-0a1b2c3d4e5f60718", "r-0f1e2d3c4b5a69788",
            "ami-0abcdef1234567890", "i-0a1b2c3d4e5f60718", "10.0.1.23"} <= masked
    for kept in ("t3.micro", "running", "  16  ", "OwnerId", "PrivateIpAddress", "Reservations"):
        assert kept in out


def test_key_value_sections_are_read_like_json() -> None:
    """A section too wide for the terminal: its rows are key/value rows; read as one JSON object, the
    names the catalog masks after their key are masked too (not only what a key/value row gives)."""
    masked, out = masked_text(EC2_NARROW)
    assert {"111122223333", "i-0a1b2c3d4e5f60718", "10.0.1.23", "r-0a1b2c3d4e5f60718"} <= masked
    assert "t3.micro" in out
    masked, out = masked_text(FUNCTION)
    assert masked == {"orders-handler", "111122223333", "orders-handler-role"}
    assert "app.handler" in out and "python3.12" in out


def test_names_under_their_key_are_masked() -> None:
    masked, _ = masked_text(USERS)
    assert {"alice.admin", "deploy-bot", "AIDAZYMLOPIFQYF7M2NX1"} <= masked
    masked, out = masked_text(FUNCTIONS)
    assert masked == {"orders-handler", "invoice-renderer"}
    assert "python3.12" in out and "  1024  " in out


# (header, value): a cell is masked exactly when the catalog masks the value after its field name
CELLS = [("accountId", "111122223333"), ("OwnerId", "111122223333"), ("Account", "1234-5678-9012"),
         ("Size", "123456789012"), ("Amount", "123456789012"), ("UserName", "alice.admin"),
         ("FunctionName", "orders-handler"), ("BucketName", "acme-logs-prod"), ("Name", "orders-db"),
         ("accountName", "acme-payments"), ("Status", "ACTIVE"), ("RoleName", "DeployRole"),
         ("StackName", "orders-stack"), ("QueueName", "orders-queue"), ("Region", "eu-west-1"),
         ("SecretAccessKey", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"), ("CreateDate", "2024-01-03")]


@pytest.mark.parametrize(("header", "value"), CELLS)
@pytest.mark.parametrize("depth", [0, 2])
def test_a_cell_is_masked_exactly_when_its_value_is_after_its_field_name(header: str, value: str,
                                                                         depth: int) -> None:
    bars = "|" * depth
    width = max(len(header), len(value)) + 4
    rule = f"{bars}+{'-' * 10}+{'-' * (width - 1)}+{bars}\n"
    table = (f"{rule}{bars}|{'Index':^10}|{header:^{width - 1}}|{bars}\n{rule}"
             f"{bars}|  7       |  {value:<{width - 3}}|{bars}\n{rule}")
    in_json = bool(plan_and_mask(json.dumps({header: value}).encode(), "application/json")[0].items)
    in_row = bool(plan_and_mask(f"||  {header}  |  {value}  ||\n".encode())[0].items)
    masked, _ = masked_text(table)
    assert (value in masked) == (in_json or in_row)


def test_sizes_and_other_numbers_stay() -> None:
    masked, out = masked_text(VOLUMES)
    assert masked == {"vol-0a1b2c3d4e5f60718", "vol-0f1e2d3c4b5a69788"}
    assert "123456789012" in out and "210987654321" in out


@pytest.mark.parametrize("text", [
    # Markdown: no line break of "+" and "-"
    "| Order | Amount |\n|---|---|\n| 123456789012 | 4 |\n| 210987654321 | 5 |\n",
    # ASCII art: boxes of one cell
    "+---------+     +-----------+\n| client  | --> |  proxy    |\n+---------+     +-----------+\n",
    "+--------------+\n|  Build 42    |\n+--------------+\n|  123456789012|\n+--------------+\n",
    # a table of numbers under headers that name no account
    "+-------+--------------+\n| Order | Total        |\n+-------+--------------+\n| 1     | 123456789012 |\n"
    "| 2     | 210987654321 |\n+-------+--------------+\n",
    # a diff and a line of "+-" that are no tables
    "@@ -1,2 +1,2 @@\n-| OwnerId |\n+|--------+---------+\n+| 123456789012 |\n",
])
def test_tables_without_a_field_the_catalog_knows_change_nothing(text: str) -> None:
    masked, out = masked_text(text)
    assert masked == set() and out == text


def test_a_table_in_an_anthropic_request_is_masked() -> None:
    body = json.dumps({"model": "claude", "max_tokens": 1024, "messages": [
        {"role": "user", "content": "Which accounts are these?\n" + SSO},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "bash", "input": {
            "command": "aws ec2 describe-instances --output table"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": EC2}]},
    ]}).encode()
    assert b"\\n||  111122223333|" in body  # the table is in a JSON string, its lines joined by \n escapes
    _, out, mapping = plan_and_mask(body, "application/json")
    for original in (b"111122223333", b"444455556666", b"210987654321"):
        assert original not in out
    masked_sso = re.sub(r"AWS_ACCOUNT_\d+", "AWS_ACCOUNT_N", json.loads(out)["messages"][0]["content"])
    assert masked_sso.endswith(re.sub(r"\b\d{12}\b", "AWS_ACCOUNT_N", SSO))
    assert json.loads(restore_bytes(out, mapping, in_json=True)[0]) == json.loads(body)


@pytest.mark.parametrize("wrap", ["json in json", "json lines", "short json string"])
def test_a_table_in_json_encoded_text_is_masked(wrap: str) -> None:
    """Its lines joined by \\n escapes in the text the masker reads: a tool result that is JSON text (an MCP
    tool's {"stdout": …}), a body that is not one JSON document."""
    if wrap == "json in json":
        inner = json.dumps({"stdout": SSO, "exit_code": 0})
        body = json.dumps({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": inner}]}]}).encode()
    elif wrap == "json lines":
        body = (json.dumps({"role": "user", "content": SSO}) + "\n" +
                json.dumps({"role": "user", "content": ORGANIZATIONS}) + "\n").encode()
    else:
        body = json.dumps({"content": "+---+\n| accountId |\n+---+\n| 111122223333 |\n"}).encode()
    _, out, mapping = plan_and_mask(body, "application/json")
    assert b"111122223333" not in out
    assert b"444455556666" not in out or wrap == "short json string"
    restored = restore_bytes(out, mapping, in_json=wrap != "json lines")[0]
    assert restored == body if wrap == "json lines" else json.loads(restored) == json.loads(body)


def test_tables_with_crlf_indentation_and_a_gutter_are_read() -> None:
    crlf = SSO.replace("\n", "\r\n")
    masked, out = masked_text(crlf)
    assert {"111122223333", "444455556666"} <= masked and out.count("\r\n") == crlf.count("\r\n")
    indented = "".join("    " + line for line in ORGANIZATIONS.splitlines(keepends=True))
    assert masked_text(indented)[0] == {"111122223333", "444455556666", "777788889999"}
    # Claude Code's Read tool shows a file with a line-number gutter
    gutter = "".join(f"{n:6d}→{line}\n" for n, line in enumerate(SSO.splitlines(), 1))
    assert {"111122223333", "444455556666"} <= masked_text(gutter)[0]


def test_empty_cells_and_cells_wider_than_their_column() -> None:
    text = """\
+------------+----------+---------+
|  accountId | OwnerId  | Size    |
+------------+----------+---------+
|  111122223333|        |  5      |
|            |  444455556666|  123456789012 |
|  777788889999|  888899990000|         |
+------------+----------+---------+
"""
    masked, out = masked_text(text)
    assert masked == {"111122223333", "444455556666", "777788889999", "888899990000"}
    assert "123456789012" in out


@pytest.mark.parametrize("bars", ["", "||"])
def test_a_value_holding_a_bar_is_split_at_the_columns_of_the_line_break(bars: str) -> None:
    text = """\
+---------------+------------------------+
|    OwnerId    |      Description       |
+---------------+------------------------+
|  111122223333 |  blue | green deploy   |
|  444455556666 |  plain                 |
|  777788889999 |  too | wide for its column |
+---------------+------------------------+
"""
    text = "".join(bars + line + bars + "\n" for line in text.splitlines())
    masked, out = masked_text(text)
    assert masked == {"111122223333", "444455556666"}  # a row that fits neither way is not read
    assert "blue | green deploy" in out


def test_a_row_cut_short_and_a_table_without_its_last_line() -> None:
    text = SSO.rsplit("\n", 2)[0] + "\n||  777788889999|  acme-sandb"  # output truncated mid-row
    masked, _ = masked_text(text)
    assert {"111122223333", "444455556666"} <= masked and "777788889999" not in masked


def test_text_without_a_table_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A text without a "|" and a "+---" costs two memchr-like checks; the reader never runs (nor for a long
    text with no line break that has a row under it)."""
    def boom(data: bytes, start: int = 0) -> None:
        raise AssertionError("read")

    monkeypatch.setattr(tables, "read", boom)
    masker = BodyMasker(MASKER.scanner)
    for text in (b"a | b | c\n|---|---|\n", b"+-----+ no bar", b"i-0123456789abcdef0 | grep x --+ y",
                 b"cat x | sort\n" * 100 + b"+------+ not under a break\n|  a  |\n"):  # long: not hashed
        masker.plan(text, "text/plain")
        masker.plan(json.dumps({"content": text.decode()}).encode(), "application/json")
    assert not tables.may_hold(b"x" * 10000 + b"|" + b"+" * 100 + b"-")
    assert tables.may_hold(b"|" + b"+ " * 100 + b"+---")  # many "+" first: the regex finds it


def test_read_tables_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    masker = BodyMasker(Scanner(load_rules()))
    calls = []
    real = tables.read

    def counting(data: bytes, start: int = 0) -> tables.View | None:
        calls.append(data)
        return real(data, start)

    monkeypatch.setattr(tables, "read", counting)
    for _ in range(3):
        plan = masker.plan(SSO.encode(), "text/plain")
        assert {k[1] for k in plan.items} == {b"111122223333", b"444455556666"}
    assert len(calls) == 1
    masker.clear_cache()
    masker.plan(SSO.encode(), "text/plain")
    assert len(calls) == 2


HEADERS = ["accountId", "OwnerId", "Size", "Name", "UserName", "Status", "Iops", "Description"]
VALUES = ["111122223333", "444455556666", "123456789012", "i-0a1b2c3d4e5f60718", "alice.admin", "ACTIVE",
          "", "a | b", "orders db", "10.0.1.23", "x"]
ACCOUNT_HEADERS = {"accountId", "OwnerId"}
NEUTRAL_HEADERS = {"Size", "Iops", "Status", "Description"}  # a 12-digit number under these: no account
SIZE = "123456789012"


@st.composite
def aws_tables(draw: st.DrawFn) -> tuple[str, set[str], bool]:
    """A table as the AWS CLI draws one (a header row or key/value rows, nested, cells wider than their
    column), with random line ends and indentation; the account IDs it holds under an account header (in a
    row that can be split into its cells); and whether it holds SIZE only under headers naming no
    account or name."""
    depth = draw(st.integers(0, 3))
    headers = draw(st.lists(st.sampled_from(HEADERS), min_size=1, max_size=4))
    rows = draw(st.lists(st.lists(st.sampled_from(VALUES), min_size=len(headers), max_size=len(headers)),
                         min_size=1, max_size=4))
    bars = "|" * depth
    accounts = set()
    if draw(st.booleans()):
        widths = [max(len(h) + 2, draw(st.integers(4, 18))) for h in headers]  # some cells overflow
        rule = bars + "+" + "+".join("-" * w for w in widths) + "+" + bars
        lines = [rule, bars + "|" + "|".join(f"{h:^{w}}" for h, w in zip(headers, widths, strict=True)) + "|"
                 + bars, rule]
        for row in rows:
            cells = [f"  {v}".ljust(w) for v, w in zip(row, widths, strict=True)]
            lines.append(bars + "|" + "|".join(cells) + "|" + bars)
            if "a | b" not in row or all(len(c) == w for c, w in zip(cells, widths, strict=True)):
                accounts |= {v for h, v in zip(headers, row, strict=True) if h in ACCOUNT_HEADERS and
                             v.isdigit()}
        pairs = [(h, v) for row in rows for h, v in zip(headers, row, strict=True)]
    else:  # key/value rows
        kw = max(map(len, headers)) + 4
        vw = max(len(v) for v in rows[0]) + 4
        rule = f"{bars}+{'-' * kw}+{'-' * vw}+{bars}"
        lines = [rule, *(f"{bars}|  {h:<{kw - 2}}|  {v:<{vw - 2}}|{bars}"
                         for h, v in zip(headers, rows[0], strict=True))]
        accounts = {v for h, v in zip(headers, rows[0], strict=True) if h in ACCOUNT_HEADERS and v.isdigit()}
        pairs = list(zip(headers, rows[0], strict=True))
    lines.append(rule)
    neutral = all(h in NEUTRAL_HEADERS for h, v in pairs if v == SIZE)
    indent = draw(st.sampled_from(["", "  ", "\t"]))
    end = draw(st.sampled_from(["\n", "\r\n"]))
    text = "prefix\n" + "".join(indent + line + end for line in lines) + draw(st.sampled_from(["", "tail"]))
    return text, accounts, neutral


@settings(max_examples=300, deadline=None)
@given(aws_tables())
def test_property_tables_restore_exactly_and_keep_their_structure(table: tuple[str, set[str], bool]) -> None:
    text, accounts, neutral = table
    masked, out = masked_text(text)  # restore, and the bounds of every hit, are checked there
    assert [line.count("|") for line in out.splitlines()] == [line.count("|") for line in text.splitlines()]
    assert accounts <= masked
    assert not neutral or SIZE not in masked


@pytest.mark.parametrize("text", [
    b"|" + b"+---" * 100_000 + b"x",  # a regex search for a line break tried each "+---" to the line's end
    b"+----+\n|a" + b" " * 400_000 + b"b|\n",  # a lazy regex for a cell tried each blank to the "|"
    b"+" + b"-" * 100_000 + b"+\n" + (b"|" + b" " * 100_000 + b"|\n") * 3 + b"| 1 | 2 |\n",
])
def test_the_reader_takes_linear_time(text: bytes) -> None:
    start = time.perf_counter()
    tables.read(text)
    MASKER.plan(text, "text/plain")
    assert time.perf_counter() - start < 2  # was minutes for the first two
