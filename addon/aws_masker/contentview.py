"""The "aws-masker" content view for mitmproxy / mitmweb: a masked request body with its placeholders marked.

It shows the body (pretty-printed when it is JSON) with every placeholder marked as ``⟦AWS_ACCOUNT_0001⟧``
and appends a summary of the placeholders per kind, as YAML comments (the view uses mitmproxy's YAML
highlighter, which JSON satisfies). In ``development`` it also lists placeholder → original for THAT flow
only; in ``production`` originals are never shown.

The view is chosen automatically (``render_priority`` above the JSON view's 1) only for the request of a
flow the addon masked; for every other message its priority is 0, so it never takes over other flows (it
can still be picked by hand).

Wiring (addon.py): ``install_view(lookup)`` in ``load()`` registers the one view of the process once (a
script reload only swaps the lookup), ``uninstall_view(lookup)`` in ``done()`` detaches it (mitmproxy 12
has no API to unregister a view). ``lookup(flow_id)`` returns that flow's placeholder → original mapping
or None; the addon fills a ``FlowMappings`` (the last ``FLOW_LIMIT`` flows) in development only.
"""

from __future__ import annotations

import json
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping

from mitmproxy import contentviews, ctx, http
from mitmproxy.contentviews import Contentview, Metadata, SyntaxHighlight

from .placeholders import TOKEN_RE

VIEW_NAME = "aws-masker"
PRIORITY = 2.0  # above the JSON view (1) and raw (0.1)
FLOW_LIMIT = 1000
MASKED_COMMENT = "aws-masker: masked "  # the addon's flow comment for a masked request
OPEN, CLOSE = "⟦", "⟧"

_TOKEN_STR = re.compile(TOKEN_RE.pattern.decode())

FlowLookup = Callable[[str], Mapping[bytes, bytes] | None]


class FlowMappings:
    """placeholder → original of the last ``limit`` masked flows, for the content view (development only)."""

    def __init__(self, limit: int = FLOW_LIMIT) -> None:
        self.limit = limit
        self._flows: OrderedDict[str, dict[bytes, bytes]] = OrderedDict()

    def remember(self, flow_id: str, mapping: Mapping[bytes, bytes]) -> None:
        self._flows[flow_id] = dict(mapping)
        self._flows.move_to_end(flow_id)
        while len(self._flows) > self.limit:
            self._flows.popitem(last=False)

    def get(self, flow_id: str) -> dict[bytes, bytes] | None:
        return self._flows.get(flow_id)

    def clear(self) -> None:
        self._flows.clear()

    def __len__(self) -> int:
        return len(self._flows)


def _development() -> bool:
    try:
        return bool(ctx.options.masker_env == "development")
    except Exception:  # no master, or the option is not there: never show originals
        return False


def kind_of(placeholder: str) -> str:
    """``AWS_EC2_INSTANCE_0012`` -> ``AWS_EC2_INSTANCE``."""
    return placeholder.rsplit("_", 1)[0]


class AwsMaskerView(Contentview):
    def __init__(self, lookup: FlowLookup | None = None,
                 development: Callable[[], bool] = _development) -> None:
        self.lookup = lookup
        self.development = development

    @property
    def name(self) -> str:
        return VIEW_NAME

    @property
    def syntax_highlight(self) -> SyntaxHighlight:
        return "yaml"

    def set_flow_lookup(self, lookup: FlowLookup | None) -> None:
        self.lookup = lookup

    # -- choosing the view ---------------------------------------------------------------------------

    def _mapping(self, flow: object) -> Mapping[bytes, bytes] | None:
        """This flow's mapping, in development only."""
        if self.lookup is None or not isinstance(flow, http.HTTPFlow) or not self.development():
            return None
        try:
            return self.lookup(flow.id)
        except Exception:
            return None

    def masked(self, flow: object) -> bool:
        """Whether the addon masked this flow's request."""
        if not isinstance(flow, http.HTTPFlow):
            return False
        return flow.comment.startswith(MASKED_COMMENT) or bool(self._mapping(flow))

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        flow = metadata.flow
        if not data or not isinstance(flow, http.HTTPFlow) or metadata.http_message is not flow.request:
            return 0
        if not self.masked(flow) or TOKEN_RE.search(data) is None:
            return 0
        return PRIORITY

    # -- rendering ----------------------------------------------------------------------------------

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        text = data.decode("utf-8", "backslashreplace")
        try:
            text = json.dumps(json.loads(data), indent=2, ensure_ascii=False)
        except ValueError:
            pass
        counts: Counter[str] = Counter(_TOKEN_STR.findall(text))
        body = _TOKEN_STR.sub(lambda m: OPEN + m.group(0) + CLOSE, text)
        lines = [body.rstrip("\n"), "", *summary_lines(counts)]
        if self.development():
            mapping = self._mapping(metadata.flow)
            lines.append("#")
            if mapping:
                lines.append("# placeholder -> original (this flow only; development)")
                width = max(len(p) for p in mapping)
                for p, o in sorted(mapping.items()):
                    original = json.dumps(o.decode("utf-8", "backslashreplace"), ensure_ascii=False)
                    lines.append(f"#   {p.decode('ascii', 'replace'):<{width}}  {original}")
            else:
                lines.append("# (no mapping kept for this flow)")
        return "\n".join(lines) + "\n"


def summary_lines(counts: Counter[str]) -> list[str]:
    """``# aws-masker: ...`` lines: placeholders per kind (distinct placeholders and occurrences)."""
    if not counts:
        return ["# aws-masker: no placeholders"]
    kinds: dict[str, list[int]] = {}
    for p, n in counts.items():
        k = kinds.setdefault(kind_of(p), [0, 0])
        k[0] += 1
        k[1] += n
    out = [f"# aws-masker: {sum(counts.values())} placeholders, {len(counts)} distinct, {len(kinds)} kinds"]
    width = max(len(k) for k in kinds)
    for kind, (distinct, total) in sorted(kinds.items(), key=lambda kv: (-kv[1][1], kv[0])):
        out.append(f"#   {kind:<{width}}  {distinct} distinct, {total} occurrences")
    return out


VIEW: AwsMaskerView = AwsMaskerView()


def install_view(lookup: FlowLookup | None) -> AwsMaskerView:
    """Register the view once per process (a script reload only swaps the lookup) and set its lookup."""
    VIEW.set_flow_lookup(lookup)
    if contentviews.registry.get(VIEW_NAME) is not VIEW:
        contentviews.add(VIEW)
    return VIEW


def uninstall_view(lookup: FlowLookup | None) -> None:
    """Detach ``lookup`` if it is still the view's (mitmproxy 12 cannot unregister a view)."""
    if VIEW.lookup == lookup:
        VIEW.set_flow_lookup(None)
