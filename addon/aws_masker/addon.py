"""The mitmproxy glue: options, host selection, masking requests, restoring replies, failing closed.

Hooks stay short; the work happens in rules/scanner/masking/store/streaming.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from mitmproxy import addonmanager, ctx, exceptions, http, tls

from .errors import Blocked, error_response
from .masking import BodyMasker
from .placeholders import restore_bytes
from .rules import RuleError, check_examples, load_rules
from .scanner import Scanner
from .store import MemoryStore, Store, StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_HOSTS = (
    "api.anthropic.com",
    "api.openai.com",
    "generativelanguage.googleapis.com",
    "api.mistral.ai",
    "api.cohere.com",
    "api.groq.com",
    "api.deepseek.com",
    "api.x.ai",
    "api.together.xyz",
    "openrouter.ai",
)
ENVS = ("production", "development")


@dataclass
class FlowState:
    """What the addon remembers about one masked flow until its reply is done."""

    mapping: dict[bytes, bytes]
    rule_counts: Counter[str]
    masked: int
    mask_ms: float
    restored: int = 0
    restored_rules: Counter[str] = field(default_factory=Counter)
    _json_mapping: dict[bytes, bytes] | None = None

    def json_mapping(self) -> dict[bytes, bytes]:
        """Originals escaped for use inside JSON strings."""
        if self._json_mapping is None:
            self._json_mapping = {
                p: json.dumps(o.decode("utf-8", "surrogateescape"), ensure_ascii=False)[1:-1].encode(
                    "utf-8", "surrogateescape")
                for p, o in self.mapping.items()
            }
        return self._json_mapping


_HOSTNAME = re.compile(r"^[a-z0-9_*](?:[a-z0-9_.-]*[a-z0-9_])?$")


def _parse_hosts(entries: Sequence[str]) -> tuple[frozenset[str], frozenset[tuple[str, int]]]:
    """Split ``host`` and ``host:port`` entries (IPv6 as ``[addr]`` or ``[addr]:port``)."""
    hosts: set[str] = set()
    host_ports: set[tuple[str, int]] = set()
    for raw in entries:
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        host, port = entry, ""
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else rest
            ok = _is_ip(host) and (port == "" or port.isdigit())
        elif entry.count(":") > 1:
            ok = _is_ip(entry)  # a bare IPv6 address
        else:
            host, _, port = entry.partition(":")
            ok = bool(_HOSTNAME.match(host)) and (port == "" or port.isdigit()) and not entry.endswith(":")
        if not ok or (port and not 0 < int(port) < 65536):
            raise exceptions.OptionsError(f"masker_hosts: {raw!r} is not a host, host:port or [ipv6]:port")
        if port:
            host_ports.add((host, int(port)))
        else:
            hosts.add(host)
    return frozenset(hosts), frozenset(host_ports)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class AwsMasker:
    def __init__(self) -> None:
        self.scanner: Scanner | None = None
        self.body_masker: BodyMasker | None = None
        self.store: Store = MemoryStore()
        self.hosts: frozenset[str] = frozenset()
        self.host_ports: frozenset[tuple[str, int]] = frozenset()
        self.flows: dict[str, FlowState] = {}
        self.fail_open_count = 0

    # -- options -------------------------------------------------------------------------------------

    def load(self, loader: addonmanager.Loader) -> None:
        loader.add_option(
            "masker_hosts", Sequence[str], list(DEFAULT_HOSTS),
            "Hosts (host or host:port) whose requests are masked and replies restored. Connections to "
            "every other host are tunnelled without TLS interception and never modified.",
        )
        loader.add_option(
            "masker_rules", Sequence[str], [],
            "Extra rule files or folders (YAML, same format as the built-in rules/) loaded on top of "
            "the built-in catalog.",
        )
        loader.add_option(
            "masker_max_body", int, 8 * 1024 * 1024,
            "Largest request body (bytes, before and after decompression) that is masked; larger ones "
            "are refused with 413. Larger non-streamed replies are restored while streaming.",
        )
        loader.add_option(
            "masker_fail_open", bool, False,
            "When masking fails, forward the request UNMASKED (with a warning in the log each time) "
            "instead of answering it with an error. Off by default: nothing leaves unmasked.",
        )
        loader.add_option(
            "masker_env", str, "production",
            "production or development: how much detail logs carry (development adds placeholders "
            "and rule hits per flow). Originals never appear in logs in either.",
        )

    def configure(self, updated: set[str]) -> None:
        if self.scanner is None:  # first call: everything counts as updated
            updated = updated | {"masker_env", "masker_max_body", "masker_hosts", "masker_rules"}
        if "masker_env" in updated and ctx.options.masker_env not in ENVS:
            raise exceptions.OptionsError(
                f"masker_env: {ctx.options.masker_env!r} is not one of {', '.join(ENVS)}")
        if "masker_max_body" in updated and ctx.options.masker_max_body <= 0:
            raise exceptions.OptionsError(
                f"masker_max_body: {ctx.options.masker_max_body} must be a positive number of bytes")
        if "masker_hosts" in updated:
            self.hosts, self.host_ports = _parse_hosts(ctx.options.masker_hosts)
        if "masker_rules" in updated:
            self._load_rules(ctx.options.masker_rules)

    def _load_rules(self, extra: Sequence[str]) -> None:
        try:
            rules = load_rules(extra)
        except RuleError as e:
            raise exceptions.OptionsError(f"masker_rules: {e}") from None
        # The built-in catalog is checked by the test suite; users' rules are checked here, at startup.
        builtin = _builtin_sources()
        problems = check_examples(
            [r for r in rules if r.source not in builtin],
            lambda rule, data: Scanner([rule], "python").scan_values(data),
        )
        if problems:
            raise exceptions.OptionsError("masker_rules: a rule fails its own examples: " + problems[0])
        self.scanner = Scanner(rules)
        self.body_masker = BodyMasker(self.scanner)
        log.info("aws-masker: %d rules loaded (%s engine)", len(rules), self.scanner.engine)

    # -- which traffic is ours -----------------------------------------------------------------------

    def is_masked_host(self, host: str | None, port: int | None) -> bool:
        if not host:
            return False
        host = host.lower().rstrip(".")
        return host in self.hosts or (port is not None and (host, port) in self.host_ports)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        address = data.context.server.address
        host, port = (address[0], address[1]) if address else (None, None)
        sni = data.client_hello.sni
        if not (self.is_masked_host(host, port) or self.is_masked_host(sni, port)):
            data.ignore_connection = True

    def _ours(self, flow: http.HTTPFlow) -> bool:
        return self.is_masked_host(flow.request.host, flow.request.port)

    # -- requests ------------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._ours(flow):
            return
        # Masking needs the whole body: never let stream_large_bodies stream a request to a masked host.
        flow.request.stream = False
        length = flow.request.headers.get("content-length", "")
        if length.isdigit() and int(length) > ctx.options.masker_max_body:
            self._block(flow, Blocked(413, f"request body of {length} bytes is larger than masker_max_body "
                                           f"({ctx.options.masker_max_body} bytes)"))

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not self._ours(flow):
            return
        started = time.perf_counter()
        try:
            state = await self._mask(flow)
        except Blocked as b:
            self._block(flow, b)
            return
        except StoreUnavailable as e:
            self._block(flow, Blocked(503, f"mapping store unavailable: {e}"))
            return
        except Exception as e:
            log.exception("aws-masker: internal error while masking %s", flow.request.path)
            self._block(flow, Blocked(500, f"internal error while masking ({type(e).__name__})"))
            return
        if state is None:
            return
        state.mask_ms = (time.perf_counter() - started) * 1000
        self.flows[flow.id] = state
        flow.request.anticomp()
        if state.masked:
            flow.comment = "aws-masker: masked " + _summary(state.rule_counts)
            if ctx.options.masker_env == "development":
                log.info("aws-masker: %s %s masked %s -> %s", flow.id[:8], flow.request.path,
                         _summary(state.rule_counts), b", ".join(sorted(state.mapping)).decode())

    async def _mask(self, flow: http.HTTPFlow) -> FlowState | None:
        assert self.body_masker is not None
        req = flow.request
        limit = ctx.options.masker_max_body
        raw = req.raw_content
        if raw is None:
            raise Blocked(413, "request body was streamed, it cannot be masked")
        if len(raw) > limit:
            raise Blocked(413, f"request body of {len(raw)} bytes is larger than masker_max_body "
                               f"({limit} bytes)")
        try:
            content = req.get_content(strict=True) or b""
        except ValueError:
            enc = req.headers.get("content-encoding", "")
            raise Blocked(415, f"request body with Content-Encoding {enc!r} cannot be decoded") from None
        if len(content) > limit:
            raise Blocked(413, f"decompressed request body of {len(content)} bytes is larger than "
                               f"masker_max_body ({limit} bytes)")
        plan = self.body_masker.plan(content, req.headers.get("content-type", ""))
        if not plan.items:
            return FlowState({}, plan.rule_counts, 0, 0.0)
        placeholders = await self.store.placeholders_for(plan.items)
        new_content, mapping = plan.render(placeholders)
        req.content = new_content
        return FlowState(mapping, plan.rule_counts, plan.count, 0.0)

    def _block(self, flow: http.HTTPFlow, blocked: Blocked) -> None:
        if ctx.options.masker_fail_open:
            self.fail_open_count += 1
            log.warning("aws-masker: FAIL-OPEN: forwarding %s %s UNMASKED (%d so far): %s",
                        flow.request.method, flow.request.pretty_url, self.fail_open_count, blocked.reason)
            return
        log.warning("aws-masker: blocked %s %s with %d: %s", flow.request.method, flow.request.pretty_url,
                    blocked.status, blocked.reason)
        flow.response = error_response(blocked.status, blocked.reason)
        flow.marked = ":no_entry:"
        flow.comment = f"aws-masker: blocked ({blocked.status}): {blocked.reason}"

    # -- replies -------------------------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        state = self.flows.pop(flow.id, None)
        if state is None or flow.response is None or not state.mapping:
            return
        resp = flow.response
        try:
            content = resp.get_content(strict=True)
        except ValueError:
            log.warning("aws-masker: reply with Content-Encoding %r cannot be decoded; placeholders stay",
                        resp.headers.get("content-encoding", ""))
            return
        if not content:
            return
        is_json = "json" in resp.headers.get("content-type", "").lower()
        restored, n = restore_bytes(content, state.json_mapping() if is_json else state.mapping)
        if n:
            resp.content = restored
        state.restored = n
        flow.comment = (flow.comment + "; " if flow.comment else "aws-masker: ") + f"restored {n}"

    def error(self, flow: http.HTTPFlow) -> None:
        self.flows.pop(flow.id, None)

    def done(self) -> None:
        self.flows.clear()


def _builtin_sources() -> set[str]:
    from .rules import BUILTIN_RULES_DIR, rule_files

    return {str(p) for p in rule_files(BUILTIN_RULES_DIR)} if BUILTIN_RULES_DIR.is_dir() else set()


def _summary(counts: Counter[str]) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{rule} {n}" for rule, n in counts.most_common())
    return f"{total} ({parts})" if parts else str(total)
