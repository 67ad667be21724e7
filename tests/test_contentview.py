"""The "aws-masker" content view, with mitmproxy's own test helpers (taddons, tflow) and the real addon."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from mitmproxy import contentviews
from mitmproxy.contentviews import Metadata
from mitmproxy.test import taddons, tflow, tutils

from aws_masker import contentview as cv
from aws_masker.addon import AwsMasker

ACCOUNT = "123456789012"
INSTANCE = "i-0123456789abcdef0"
OTHER_INSTANCE = "i-0fedcba9876543210"
TEXT = f"why is {INSTANCE} in arn:aws:iam::{ACCOUNT}:role/Deploy down? account {ACCOUNT}"


def make_flow(text: str = TEXT, host: str = "api.anthropic.com"):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    req = tutils.treq(host=host, port=443, scheme=b"https", path=b"/v1/messages", content=body)
    req.headers["content-type"] = "application/json"
    return tflow.tflow(req=req)


def meta(f, message=None) -> Metadata:
    msg = f.request if message is None else message
    return Metadata(flow=f, http_message=msg, content_type="application/json")


@pytest.fixture
def masker(request) -> Iterator[tuple[AwsMasker, taddons.context]]:
    """The real addon; production unless parametrized indirectly with "development"."""
    addon = AwsMasker()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, masker_env=getattr(request, "param", "production"))
        yield addon, tctx
        addon.done()


def masked_flow(masker, text: str = TEXT):
    addon, tctx = masker
    f = make_flow(text)
    tctx.master.event_loop.run_until_complete(addon.request(f))
    assert f.response is None
    return f


def render(f, message=None) -> str:
    """What mitmproxy shows for the message with the view picked automatically."""
    msg = f.request if message is None else message
    result = contentviews.prettify_message(msg, f, "auto")
    assert result.view_name == cv.VIEW_NAME, result.view_name
    return result.text


def test_registered_once(masker) -> None:
    view: cv.AwsMaskerView = cv.VIEW
    assert contentviews.registry[cv.VIEW_NAME] == view  # identity
    n = len(contentviews.registry)
    second = AwsMasker()  # a script reload: a new addon instance loads again
    with taddons.context(second):
        assert len(contentviews.registry) == n and contentviews.registry[cv.VIEW_NAME] == view  # identity
        assert view.lookup == second.view_flows.get  # the new instance's flows
        second.done()
    assert view.lookup is None


def test_placeholders_highlighted_and_summary(masker) -> None:
    f = masked_flow(masker)
    text = render(f)
    body = json.loads(f.request.content)["messages"][0]["content"]
    tokens = cv._TOKEN_STR.findall(body)
    assert len(tokens) == 4  # instance, account twice, role
    for t in set(tokens):
        assert f"⟦{t}⟧" in text
    # every placeholder is marked: none stands outside its brackets
    assert re.search(r"(?<!⟦)" + cv._TOKEN_STR.pattern, text) is None
    assert text.count("⟦") == 4 and text.count("⟧") == 4
    assert "# aws-masker: 4 placeholders, 3 distinct, 3 kinds" in text
    lines = {ln.split()[1]: ln for ln in text.splitlines() if ln.startswith("#   AWS_")}
    assert "1 distinct, 2 occurrences" in lines["AWS_ACCOUNT"]
    assert "1 distinct, 1 occurrences" in lines["AWS_EC2_INSTANCE"]
    # pretty-printed JSON, still valid once the marks are gone
    body_part = text.split("\n\n# aws-masker")[0]
    assert json.loads(body_part.replace("⟦", "").replace("⟧", "")) == json.loads(f.request.content)
    assert "\n  " in body_part


def test_summary_counts_direct() -> None:
    view = cv.AwsMaskerView(development=lambda: False)
    data = b"AWS_ACCOUNT_0001 AWS_ACCOUNT_0002 AWS_ACCOUNT_0001 AWS_S3_BUCKET_0007 AWS_X_12345"
    text = view.prettify(data, Metadata())
    assert text.startswith("⟦AWS_ACCOUNT_0001⟧ ⟦AWS_ACCOUNT_0002⟧ ⟦AWS_ACCOUNT_0001⟧ ⟦AWS_S3_BUCKET_0007⟧ "
                           "⟦AWS_X_12345⟧")
    assert "# aws-masker: 5 placeholders, 4 distinct, 3 kinds" in text
    assert "#   AWS_ACCOUNT    2 distinct, 3 occurrences" in text
    assert "#   AWS_S3_BUCKET  1 distinct, 1 occurrences" in text
    assert "#   AWS_X          1 distinct, 1 occurrences" in text
    assert "no placeholders" in view.prettify(b"nothing here", Metadata())


def test_production_never_shows_originals(masker) -> None:
    addon, _ = masker
    f = masked_flow(masker)
    assert len(addon.view_flows) == 0  # nothing kept in production
    text = render(f)
    assert ACCOUNT not in text and INSTANCE not in text and "Deploy" not in text
    assert "original" not in text
    # even a lookup that would hand out originals is never asked in production
    view = cv.AwsMaskerView(lambda fid: {b"AWS_ACCOUNT_0001": ACCOUNT.encode()}, development=lambda: False)
    assert ACCOUNT not in view.prettify(f.request.content, meta(f))


@pytest.mark.parametrize("masker", ["development"], indirect=True)
def test_development_shows_the_table_of_that_flow_only(masker) -> None:
    addon, _ = masker
    f1 = masked_flow(masker)
    f2 = masked_flow(masker, f"only {OTHER_INSTANCE} here")
    t1, t2 = render(f1), render(f2)
    assert "# placeholder -> original (this flow only; development)" in t1
    table1 = t1.split("# placeholder -> original")[1]
    table2 = t2.split("# placeholder -> original")[1]
    assert f'"{ACCOUNT}"' in table1 and f'"{INSTANCE}"' in table1 and '"Deploy"' in table1
    assert OTHER_INSTANCE not in t1
    assert f'"{OTHER_INSTANCE}"' in table2
    assert ACCOUNT not in t2 and INSTANCE not in t2
    # each table row is one of the flow's own placeholders
    mapping1 = addon.view_flows.get(f1.id)
    assert mapping1 is not None
    rows = [ln.split()[1] for ln in table1.splitlines() if ln.startswith("#   ")]
    assert sorted(rows) == sorted(p.decode() for p in mapping1)


def test_development_mappings_are_bounded() -> None:
    fm = cv.FlowMappings(limit=3)
    for i in range(5):
        fm.remember(f"f{i}", {b"AWS_ACCOUNT_0001": str(i).encode()})
    assert len(fm) == 3 and fm.get("f0") is None and fm.get("f4") == {b"AWS_ACCOUNT_0001": b"4"}


def test_priority_only_for_masked_requests(masker) -> None:
    addon, tctx = masker
    view = cv.VIEW
    f = masked_flow(masker)
    assert view.render_priority(f.request.content, meta(f)) == cv.PRIORITY
    assert cv.PRIORITY > contentviews.registry["json"].render_priority(f.request.content, meta(f))

    # an unrelated flow (not a masked host): untouched, priority 0, another view is picked
    other = make_flow(host="example.com")
    tctx.master.event_loop.run_until_complete(addon.request(other))
    assert view.render_priority(other.request.content, meta(other)) == 0
    assert contentviews.prettify_message(other.request, other, "auto").view_name != cv.VIEW_NAME

    # a masked host but nothing to mask, even with a typed placeholder
    plain = masked_flow(masker, "hello AWS_ACCOUNT_0001")
    assert view.render_priority(plain.request.content, meta(plain)) == 0

    # the reply of a masked flow, and messages without a flow
    f.response = tutils.tresp(content=b'{"text": "AWS_ACCOUNT_0001"}')
    assert view.render_priority(f.response.content, meta(f, f.response)) == 0
    assert view.render_priority(f.request.content, Metadata()) == 0
    assert view.render_priority(b"", meta(f)) == 0
    assert view.render_priority(b"x", Metadata(flow=tflow.ttcpflow())) == 0


def test_picked_by_hand_on_any_flow(masker) -> None:
    f = make_flow("AWS_ACCOUNT_0001 typed by the user")  # not through the addon
    result = contentviews.prettify_message(f.request, f, cv.VIEW_NAME)
    assert result.view_name == cv.VIEW_NAME and "⟦AWS_ACCOUNT_0001⟧" in result.text
    assert "original" not in result.text
