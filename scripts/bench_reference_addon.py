"""Reference addon for scripts/bench: what any addon that rewrites JSON request bodies must do, no more.

It decodes the request body, parses it as JSON, serialises it again (as aws-masker does after masking)
and sets it as the new body; it decodes the reply and sets it again (as a restore does). No scanning, no
placeholders. Its added latency is the floor of a Python addon that rewrites a JSON body: the part of the
latency budget that is gone before a single identifier is found.

    mitmdump -s scripts/bench_reference_addon.py    # used by scripts/bench, not meant for real traffic
"""

from __future__ import annotations

import json

from mitmproxy import http


class JsonRoundTrip:
    def request(self, flow: http.HTTPFlow) -> None:
        content = flow.request.get_content(strict=False)
        if not content:
            return
        doc = json.loads(content)
        flow.request.content = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        flow.request.anticomp()

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.raw_content:
            flow.response.content = flow.response.get_content(strict=False)


addons = [JsonRoundTrip()]
