"""The mitmproxy glue: options, host selection, masking requests, restoring replies, failing closed.

Hooks stay short; the work happens in rules/scanner/masking/store/streaming.
"""

from __future__ import annotations

import asyncio
import difflib
import ipaddress
import logging
import re
import time
import traceback
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from mitmproxy import addonmanager, ctx, exceptions, http, tls

from .contentview import FlowMappings, install_view, uninstall_view
from .errors import Blocked, error_response
from .events import EventPublisher, block_event, mask_event, parse_event_options, unmask_event
from .guard import GUARD
from .masking import BodyMasker, UnreadableBody, merge_kept, repeats_in_url, text_codec
from .placeholders import PREFIX, TOKEN_RE, glued_suffixes, restore_bytes, tokens_in
from .rules import RuleError, check_examples, load_rules, with_followed
from .scanner import Scanner, release_freed_memory
from .store import MemoryStore, Store, StoreUnavailable
from .streaming import StreamRestorer

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
FORWARDED_UNMASKED = "aws_masker_fail_open"  # flow.metadata: masker_fail_open let this flow through
TEXT_LOG_LIMIT = 1 << 20  # development: restored text of a streamed reply kept for mitmweb
RECENT_LIMIT = 10_000  # namespace scope: placeholders kept for restoring streamed replies
MAX_GLUED_TAIL = 256  # namespace scope: longest placeholder looked up in the store at the end of a token
# Every this many finished flows the C allocator hands freed memory back to the OS (glibc's malloc_trim,
# ~0.1 ms, after the hook): the bodies, JSON trees and copies of each request are freed, but glibc keeps
# the pages in the middle of its heap, and the proxy's RSS grew ~7 MiB more than plain mitmdump's over
# 10,000 requests (scripts/bench: +19.1 to +20.8 MiB before, +12.8 to +13.2 MiB with it).
TRIM_EVERY = 1000
STORES = ("auto", "memory", "redis")
SCOPES = ("request", "namespace")
EVENT_OPTIONS = {"masker_events_channel", "masker_events_stream", "masker_events_stream_maxlen",
                 "masker_event_sample_rate", "masker_event_batch_size", "masker_event_flush_ms"}
STORE_OPTIONS = {"masker_store", "masker_redis_url", "masker_namespace", "masker_ttl", "masker_max_entries",
                 "masker_redis_remember",
                 "masker_store_key", "masker_store_old_keys"}


@dataclass
class FlowState:
    """What the addon remembers about one masked flow until its reply is done."""

    mapping: dict[bytes, bytes]  # placeholder -> original, this request's only
    rule_counts: Counter[str]  # rule id -> identifiers masked
    masked: int
    mask_ms: float
    placeholder_rules: dict[bytes, str] = field(default_factory=dict)
    restored: int = 0
    restored_placeholders: Counter[bytes] = field(default_factory=Counter)
    restore_ms: float = 0.0
    streamed: bool = False
    reply_bytes: int = 0
    restorer: StreamRestorer | None = None
    safe_path: str = ""  # the request path for logs and events, scrubbed (when they need it)


_HOSTNAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?$")


@dataclass(frozen=True)
class HostSet:
    """Which hosts are masked: exact names, and ``*.suffix`` wildcards (any subdomain of suffix, at any
    depth, not suffix itself), each with or without a port."""

    hosts: frozenset[str] = frozenset()
    host_ports: frozenset[tuple[str, int]] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".openai.azure.com" for *.openai.azure.com
    suffix_ports: frozenset[tuple[str, int]] = frozenset()

    def __contains__(self, host_port: tuple[str, int | None]) -> bool:
        host, port = host_port
        if host in self.hosts or (host, port) in self.host_ports or host.endswith(self.suffixes):
            return True
        return any(host.endswith(suffix) and port == p for suffix, p in self.suffix_ports)


def _parse_hosts(entries: Sequence[str]) -> HostSet:
    """Parse ``host``, ``host:port``, ``*.domain`` and ``*.domain:port`` entries (IPv6 as ``[addr]`` or
    ``[addr]:port``)."""
    hosts: set[str] = set()
    host_ports: set[tuple[str, int]] = set()
    suffixes: set[str] = set()
    suffix_ports: set[tuple[str, int]] = set()
    for raw in entries:
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        host, port = entry, ""
        wildcard = entry.startswith("*.")
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else rest
            ok = _is_ip(host) and (port == "" or port.isdigit())
        elif entry.count(":") > 1:
            ok = _is_ip(entry)  # a bare IPv6 address
        else:
            host, _, port = entry.removeprefix("*.").partition(":")
            ok = bool(_HOSTNAME.match(host)) and (port == "" or port.isdigit()) and not entry.endswith(":")
            ok = ok and (not wildcard or "." in host)  # *.com would mask every .com host
        if not ok or (port and not 0 < int(port) < 65536):
            several = " (give one --set masker_hosts=… per host)" if "," in entry or " " in entry else ""
            raise exceptions.OptionsError(
                f"masker_hosts: {raw!r} is not a host, host:port, *.domain (every subdomain) or "
                f"[ipv6]:port{several}")
        if wildcard:
            if port:
                suffix_ports.add(("." + host, int(port)))
            else:
                suffixes.add("." + host)
        elif port:
            host_ports.add((host, int(port)))
        else:
            hosts.add(host)
    return HostSet(frozenset(hosts), frozenset(host_ports), tuple(sorted(suffixes)), frozenset(suffix_ports))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class _Metered:
    """The stream callable: the restorer, plus the time it takes and the bytes it sees."""

    __slots__ = ("restorer", "state")

    def __init__(self, restorer: StreamRestorer, state: FlowState) -> None:
        self.restorer = restorer
        self.state = state

    def __call__(self, chunk: bytes) -> list[bytes]:
        t0 = time.perf_counter()
        out = self.restorer(chunk)
        state = self.state
        state.restore_ms += (time.perf_counter() - t0) * 1000
        state.reply_bytes += len(chunk)
        return out


class AwsMasker:
    def __init__(self) -> None:
        self.scanner: Scanner | None = None
        self.body_masker: BodyMasker | None = None
        self.store: Store = MemoryStore()
        self.hosts = HostSet()
        self.flows: dict[str, FlowState] = {}
        self.finished = 0  # flows whose reply was restored (see TRIM_EVERY)
        self.fail_open_count = 0
        self.redis: Any = None  # the one Redis client (and pool) of this process: store and events
        self._redis_url = ""
        self.events: EventPublisher | None = None
        self.recent: OrderedDict[bytes, bytes] = OrderedDict()  # placeholder -> original, namespace scope
        self._tasks: set[asyncio.Task[Any]] = set()
        self.view_flows = FlowMappings()  # development: mappings of recent flows for the content view
        self.dev = False  # masker_env == "development"
        self.max_body = 8 * 1024 * 1024  # masker_max_body
        self.namespace_scope = False  # masker_unmask_scope == "namespace"
        self.fail_open = False  # masker_fail_open

    # -- options -------------------------------------------------------------------------------------

    def load(self, loader: addonmanager.Loader) -> None:
        install_view(self.view_flows.get)
        loader.add_option(
            "masker_hosts", Sequence[str], list(DEFAULT_HOSTS),
            "Hosts (host on any port, host:port, [ipv6] or [ipv6]:port, or *.domain for every subdomain of "
            "domain, e.g. *.openai.azure.com; one --set per host) whose requests are masked and replies "
            "restored. Connections to every other host are tunnelled without TLS interception and never "
            "modified.",
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
            "masker_json_keys", bool, False,
            "Also mask identifiers in JSON object keys. Off by default (keys stay as the APIs expect them); "
            "turn it on when models write identifiers as keys of tool inputs ({\"i-0abc...\": \"stop\"}): "
            "restored in the reply, they would come back as originals in the next request's history.",
        )
        loader.add_option(
            "masker_store", str, "auto",
            "Where placeholder mappings live: auto (Redis when masker_redis_url is set, else memory), "
            "memory, or redis.",
        )
        loader.add_option(
            "masker_redis_url", str, "",
            "Redis for shared mappings and events, e.g. redis://host:6379/0, rediss://:password@host:6380/0.",
        )
        loader.add_option(
            "masker_namespace", str, "aws-masker",
            "Prefix of every Redis key, so several teams or environments can share one Redis.",
        )
        loader.add_option(
            "masker_ttl", int, 604800,
            "Seconds a mapping lives after its last use (default 7 days).",
        )
        loader.add_option(
            "masker_max_entries", int, 100000,
            "Most mappings the memory store keeps (least recently used go first); also the most a proxy "
            "using Redis remembers (see masker_redis_remember; 20,000 at most).",
        )
        loader.add_option(
            "masker_redis_remember", int, 60,
            "Seconds a proxy using the Redis store answers a mapping it got from Redis without asking "
            "again (a conversation sends the same identifiers every turn); then it asks again, which "
            "refreshes the mapping's TTL in Redis. 0: ask Redis for every request.",
        )
        loader.add_option(
            "masker_store_key", str, "",
            "Secret (at least 16 characters), or the path of a file holding it (a value starting with /, ./, "
            "../ or ~, or ending in .key, .pem, .txt or .secret, or naming an existing file), for the Redis "
            "store: keys the HMAC of Redis key names and encrypts stored originals with AES-GCM. Without it "
            "originals are stored as they are and the HMAC key is generated once and kept in Redis.",
        )
        loader.add_option(
            "masker_store_old_keys", Sequence[str], [],
            "Previous store secrets (or files), while rotating masker_store_key: mappings written under "
            "them stay readable and are moved to the current key as they are used.",
        )
        loader.add_option(
            "masker_unmask_scope", str, "request",
            "request: a reply is restored only with the mappings of its own request. namespace: any "
            "placeholder of the namespace (for stateful APIs such as OpenAI Responses with "
            "previous_response_id).",
        )
        loader.add_option(
            "masker_events_channel", str, "aws-masker:events",
            "Redis Pub/Sub channel for monitoring events (needs masker_redis_url); empty disables Pub/Sub.",
        )
        loader.add_option(
            "masker_events_stream", str, "",
            "Also append events to this Redis Stream (for consumers that must not miss events).",
        )
        loader.add_option(
            "masker_events_stream_maxlen", int, 100000,
            "Approximate MAXLEN of the events stream.",
        )
        loader.add_option(
            "masker_event_sample_rate", str, "1.0",
            "Share of flows whose events are published, 0 to 1 (per flow: a flow's mask and unmask events "
            "go together). Block events are always published.",
        )
        loader.add_option(
            "masker_event_batch_size", int, 1,
            "Events per Pub/Sub message (1 to 1000); above 1 events go out as batches.",
        )
        loader.add_option(
            "masker_event_flush_ms", int, 1000,
            "Longest time an event waits for its batch, in milliseconds.",
        )
        loader.add_option(
            "masker_env", str, "production",
            "production or development: how much detail logs, events and mitmweb carry. development adds "
            "a log line per masked flow with its placeholders and rule hits, placeholders in events, and "
            "the flow's placeholder -> original table in mitmweb's aws-masker view. Originals never appear "
            "in logs or events in either.",
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # loaded outside an event loop (tests): nobody to check
            return
        loop.call_soon(self._check_configured)  # runs once mitmproxy is done loading the script

    def _check_configured(self) -> None:
        """mitmproxy converts a script's ``--set`` values after ``load()``; one it cannot convert
        (``masker_max_body=8MB``, ``masker_fail_open=maybe``) makes it drop the script without a word,
        leaving an addon that is never configured nor called: requests would leave unmasked. A misspelt
        name (``masker_host=…``) it keeps aside, also without a word. Say which value or name is at fault,
        and stop the proxy."""
        if ctx.master.should_exit.is_set():
            return
        if self.scanner is not None:
            unknown = _unknown_options()  # mitmproxy keeps a misspelt --set name aside without a word
            if not unknown:
                return
            log.error("aws-masker: %s; the proxy stops (a misspelt masker_hosts or masker_rules would leave "
                      "identifiers unmasked)", "; ".join(unknown))
        else:
            log.error("aws-masker: not started, so the proxy stops (it would forward requests unmasked): %s",
                      "; ".join(_unreadable_options()) or "its options were never applied")
        errorcheck = ctx.master.addons.get("errorcheck")
        if errorcheck is not None:  # exits with status 1, as for any error logged during startup
            task = asyncio.get_running_loop().create_task(errorcheck.shutdown_if_errored())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            ctx.master.shutdown()

    def configure(self, updated: set[str]) -> None:
        first = self.scanner is None
        if first:  # first call: everything counts as updated
            updated = updated | {"masker_env", "masker_max_body", "masker_hosts", "masker_rules"}
        self._configure_store(updated, first)
        self._configure_events(updated, first)
        if "masker_env" in updated and ctx.options.masker_env not in ENVS:
            raise exceptions.OptionsError(
                f"masker_env: {ctx.options.masker_env!r} is not one of {', '.join(ENVS)}")
        if "masker_max_body" in updated and ctx.options.masker_max_body <= 0:
            raise exceptions.OptionsError(
                f"masker_max_body: {ctx.options.masker_max_body} must be a positive number of bytes")
        if "masker_hosts" in updated:
            self.hosts = _parse_hosts(ctx.options.masker_hosts)
            hosts = [h.strip() for h in ctx.options.masker_hosts if h.strip()]
            if hosts:
                log.info("aws-masker: masking requests to %s", ", ".join(hosts))
            else:
                log.warning("aws-masker: masker_hosts is empty: nothing is masked, every connection is "
                            "tunnelled")
            if GUARD.masker is self:
                GUARD.hosts = self.hosts
        if "masker_rules" in updated:
            self._load_rules(ctx.options.masker_rules)
        # Read by the hooks for every flow: kept as attributes once the options are valid.
        opts = ctx.options
        self.dev = opts.masker_env == "development"
        self.max_body = opts.masker_max_body
        self.namespace_scope = opts.masker_unmask_scope == "namespace"
        self.fail_open = opts.masker_fail_open
        if self.body_masker is not None:
            self.body_masker.mask_keys = opts.masker_json_keys

    def _configure_store(self, updated: set[str], first: bool) -> None:
        opts = ctx.options
        for name, allowed in (("masker_store", STORES), ("masker_unmask_scope", SCOPES)):
            if name in updated and getattr(opts, name) not in allowed:
                raise exceptions.OptionsError(
                    f"{name}: {getattr(opts, name)!r} is not one of {', '.join(allowed)}")
        for name in ("masker_ttl", "masker_max_entries"):
            if getattr(opts, name) < 1:
                raise exceptions.OptionsError(f"{name}: {getattr(opts, name)} must be at least 1")
        if opts.masker_redis_remember < 0:
            raise exceptions.OptionsError(
                f"masker_redis_remember: {opts.masker_redis_remember} must be 0 (off) or more seconds")
        if not first and not updated & STORE_OPTIONS:
            return
        kind = opts.masker_store
        if kind == "auto":
            kind = "redis" if opts.masker_redis_url else "memory"
        if kind == "memory":
            new_store: Store = MemoryStore(opts.masker_max_entries, opts.masker_ttl)
            if opts.masker_store_key or opts.masker_store_old_keys:
                log.warning("aws-masker: masker_store_key / masker_store_old_keys apply to the Redis store "
                            "only; the memory store ignores them (set masker_redis_url)")
        else:
            new_store = self._make_redis_store()
        old, self.store = self.store, new_store
        self._close_later(old)
        log.info("aws-masker: %s mapping store (namespace %s, ttl %ds, unmask scope %s)", new_store.name,
                 opts.masker_namespace, opts.masker_ttl, opts.masker_unmask_scope)

    def _redis_client(self) -> Any:
        """The one Redis client (and connection pool) of this process, shared by the store and events."""
        from .redis_store import make_redis_client  # only a proxy that uses Redis loads redis-py

        url = ctx.options.masker_redis_url
        if self.redis is None or self._redis_url != url:
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise exceptions.OptionsError(
                    f"masker_redis_url: {_redact_url(url)!r} is not a redis://, rediss:// or unix:// URL")
            self._close_later(self.redis)
            try:
                self.redis = make_redis_client(url)
            except ValueError as e:
                raise exceptions.OptionsError(f"masker_redis_url: {_redact_url(url)!r}: {e}") from None
            self._redis_url = url
        return self.redis

    def _make_redis_store(self) -> Store:
        from .redis_store import REMEMBER_ENTRIES, RedisStore, keys_from_secret, load_store_key

        opts = ctx.options
        if not opts.masker_redis_url:
            raise exceptions.OptionsError("masker_store: 'redis' needs masker_redis_url")
        hmac_key = enc_key = None
        if opts.masker_store_key:
            try:
                hmac_key, enc_key = keys_from_secret(load_store_key(opts.masker_store_key))
            except ValueError as e:
                raise exceptions.OptionsError(f"masker_store_key: {e}") from None
        previous: list[tuple[bytes, bytes | None]] = []
        for n, old in enumerate(opts.masker_store_old_keys, 1):
            try:
                previous.append(keys_from_secret(load_store_key(old)))
            except ValueError as e:
                raise exceptions.OptionsError(f"masker_store_old_keys: key #{n}: {e}") from None
        self._redis_client()
        try:
            return RedisStore(self.redis, opts.masker_namespace, opts.masker_ttl, hmac_key=hmac_key,
                              enc_key=enc_key, previous_keys=previous, remember=opts.masker_redis_remember,
                              remember_entries=min(opts.masker_max_entries, REMEMBER_ENTRIES))
        except ValueError as e:
            raise exceptions.OptionsError(f"masker_namespace: {opts.masker_namespace!r}: {e}") from None

    def _configure_events(self, updated: set[str], first: bool) -> None:
        opts = ctx.options
        try:
            ev = parse_event_options(opts.masker_events_channel, opts.masker_events_stream,
                                     opts.masker_events_stream_maxlen, opts.masker_event_sample_rate,
                                     opts.masker_event_batch_size, opts.masker_event_flush_ms)
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        if not first and not updated & (EVENT_OPTIONS | {"masker_redis_url", "masker_namespace"}):
            return
        old, self.events = self.events, None
        if old is not None:
            old.stop()
            self._close_later(old)
        if not opts.masker_redis_url or not (ev.channel or ev.stream):
            return
        self._redis_client()
        self.events = EventPublisher(self.redis, ev.channel, ev.stream, ev.stream_maxlen, ev.sample_rate,
                                     ev.batch_size, ev.flush_ms, namespace=opts.masker_namespace)
        try:
            self.events.start()
        except RuntimeError:  # no running loop yet: running() starts it
            pass

    def running(self) -> None:
        if self.events is not None:
            self.events.start()
        GUARD.arm(self)  # from now on, unloading this addon (a failed script reload) blocks, not leaks
        if self.redis is not None:
            task = asyncio.get_running_loop().create_task(self._probe_redis())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _probe_redis(self) -> None:
        """Say at startup when Redis does not answer (the store reconnects by itself, request by request)."""
        try:
            await asyncio.wait_for(self.redis.ping(), 2.0)
        except Exception as e:
            log.warning("aws-masker: Redis at %s does not answer (%s): requests with identifiers are refused "
                        "(503) until it does", _redact_url(self._redis_url), type(e).__name__)

    def _emit(self, event: dict[str, Any]) -> None:
        if self.events is not None:
            self.events.emit(event)

    def _close_later(self, thing: object) -> None:
        """Close a replaced store or Redis client in the background (configure() is synchronous)."""
        close = getattr(thing, "aclose", None) or getattr(thing, "close", None)
        if close is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _load_rules(self, extra: Sequence[str]) -> None:
        try:
            rules = load_rules(extra)
        except RuleError as e:
            raise exceptions.OptionsError(f"masker_rules: {e}") from None
        # The built-in catalog is checked by the test suite; users' rules are checked here, at startup.
        builtin = _builtin_sources()
        problems = check_examples(
            [r for r in rules if r.source not in builtin],
            lambda rule, data: Scanner(with_followed(rule, rules), "python").scan_values(data),
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
        return (host.lower().rstrip("."), port) in self.hosts

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
        if "websocket" in flow.request.headers.get("upgrade", "").lower():
            # Its messages would pass frame by frame, unmasked (OpenAI Realtime, Gemini Live): refuse it.
            self._block(flow, Blocked(501, "WebSocket connections cannot be masked (their messages would "
                                           "leave unmasked); use the HTTP API of this host"))
            return
        length = flow.request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            self._block(flow, Blocked(413, f"request body of {length} bytes is larger than masker_max_body "
                                           f"({self.max_body} bytes)"))

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not self._ours(flow) or flow.metadata.get(FORWARDED_UNMASKED):
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
            # The exception's message may quote body content (a KeyError of an original, say): log its type
            # and where it happened, never its text.
            log.error("aws-masker: internal error while masking %s%s: %s\n%s", flow.request.pretty_host,
                      flow.request.path.split("?", 1)[0], type(e).__name__,
                      "".join(traceback.format_tb(e.__traceback__)).rstrip())
            self._block(flow, Blocked(500, f"internal error while masking ({type(e).__name__})"))
            return
        if state is None:
            return
        state.mask_ms = (time.perf_counter() - started) * 1000
        self.flows[flow.id] = state
        flow.request.anticomp()
        dev = self.dev
        if not state.safe_path and (self.events is not None or (dev and state.masked)):
            state.safe_path = self._safe_path(flow)  # scrubbed once, for the log line and both events
        if state.masked:
            flow.comment = "aws-masker: masked " + _summary(state.rule_counts)
            if dev:
                log.info("aws-masker: %s %s masked %s -> %s", flow.id[:8], state.safe_path,
                         _summary(state.rule_counts), b", ".join(sorted(state.mapping)).decode())
                self.view_flows.remember(flow.id, state.mapping)
        if self.events is not None:
            self.events.emit(mask_event(
                flow.id, flow.request.pretty_host, state.safe_path, state.masked, state.rule_counts,
                state.mask_ms, len(flow.request.raw_content or b""),
                sorted(p.decode() for p in state.mapping) if dev else None))

    def _remember(self, mapping: dict[bytes, bytes]) -> None:
        recent = self.recent
        for p, o in mapping.items():
            recent[p] = o
            recent.move_to_end(p)
        while len(recent) > RECENT_LIMIT:
            recent.popitem(last=False)

    def _safe_path(self, flow: http.HTTPFlow) -> str:
        """The request path for logs and events: no query string, identifiers in it replaced by ***."""
        return self._scrubbed(flow.request.path.split("?", 1)[0])

    def _scrubbed(self, path: str) -> str:
        if self.body_masker is None:
            return path
        data = path.encode("utf-8", "surrogateescape")
        try:
            hits = self.body_masker.scan_text(data)[0]  # percent-encoded identifiers too
        except Exception:  # a log line or an event must never stop a block: withhold the path instead
            return "/(path withheld)"
        for h in reversed(hits):
            data = data[:h.start] + b"***" + data[h.end:]
        return data.decode("utf-8", "replace")

    async def _mask(self, flow: http.HTTPFlow) -> FlowState | None:
        assert self.body_masker is not None
        req = flow.request
        limit = self.max_body
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
        # The URL leaves too (a query parameter, a resource in the path): scanned like text, and a name it
        # gives away (a role in an ARN) is masked where it repeats in the body, and the other way round.
        path = req.path.encode("utf-8", "surrogateescape")
        path_hits, path_keys = self.body_masker.scan_text(path)
        try:
            plan = self.body_masker.plan(content, req.headers.get("content-type", ""),
                                         also=list(zip(path_hits, path_keys, strict=True)))
        except UnreadableBody as e:
            raise Blocked(415, str(e)) from None
        if plan.names_left and self.dev:
            log.info("aws-masker: %s repeats were searched for the first %d names only, up to %d more were "
                     "not (a %d-byte body; see docs/security.md)", flow.id[:8], len(plan.names),
                     plan.names_left, len(content))
        if plan.names:  # a name the body gave away, repeated in the URL
            more = repeats_in_url(path, path_hits, plan.names)
            if more:
                path_hits, path_keys = merge_kept(path_hits, path_keys, more)
        if not plan.items and not path_hits:
            return FlowState({}, plan.rule_counts, 0, 0.0)
        count = plan.count + len(path_hits)
        if req.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256"):
            # SigV4 signs the body and the path (Bedrock): a rewritten request fails the signature check.
            raise Blocked(400, f"request is SigV4-signed and holds {count} identifier(s); a signed request "
                               "cannot be rewritten, so it is not forwarded")
        items = plan.items
        if path_hits:
            known = set(items)
            items = [*items, *(k for k in dict.fromkeys(path_keys) if k not in known)]
        # Placeholders the request holds as text (one the model invented, come back in the history): a new
        # identifier must not get one of them, or the model would read both as one and the reply restore both.
        kinds = {kind for kind, _ in items}  # (a new placeholder is of one of them)
        avoid = tokens_in(content, kinds) | tokens_in(path, kinds)
        for text in plan.decoded_texts:  # a base64 document, a UTF-16 body: the text the model reads
            avoid |= tokens_in(text, kinds)
        placeholders = await self.store.placeholders_for(items, avoid)
        body_placeholders = placeholders[:len(plan.items)]
        rules = plan.placeholder_rules(body_placeholders)
        if plan.items:
            try:
                new_content, mapping = plan.render(body_placeholders)
            except UnreadableBody as e:
                raise Blocked(415, str(e)) from None
            req.content = new_content
        else:
            mapping = {}
        safe_path = ""
        if path_hits:
            by_key = dict(zip(items, placeholders, strict=True))
            scrubbed = path
            for h, key in zip(reversed(path_hits), reversed(path_keys), strict=True):
                p = by_key[key]
                path = path[:h.start] + p + path[h.end:]
                scrubbed = scrubbed[:h.start] + b"***" + scrubbed[h.end:]
                mapping[p] = key[1]
                rules.setdefault(p, h.rule)
                plan.rule_counts[h.rule] += 1
            req.path = path.decode("utf-8", "surrogateescape")
            # for logs and events, as _safe_path would have written the original path
            safe_path = scrubbed.split(b"?", 1)[0].decode("utf-8", "replace")
        if self.namespace_scope:
            self._remember(mapping)
        return FlowState(mapping, plan.rule_counts, count, 0.0, rules, safe_path=safe_path)

    def _block(self, flow: http.HTTPFlow, blocked: Blocked) -> None:
        if self.fail_open:
            if flow.metadata.get(FORWARDED_UNMASKED):
                return  # refused in requestheaders already (too large): warned about once
            flow.metadata[FORWARDED_UNMASKED] = True
            self.fail_open_count += 1
            log.warning("aws-masker: FAIL-OPEN: forwarding %s %s%s UNMASKED (%d so far): %s",
                        flow.request.method, flow.request.pretty_host, self._safe_path(flow),
                        self.fail_open_count, blocked.reason)
            return
        flow.response = error_response(blocked.status, blocked.reason)  # first: nothing below may undo it
        flow.marked = ":no_entry:"
        scrubbed = self._scrubbed(flow.request.path)  # mitmdump logs the URL of every flow: not an original
        if scrubbed != flow.request.path:
            flow.request.path = scrubbed
        flow.comment = f"aws-masker: blocked ({blocked.status}): {blocked.reason}"
        log.warning("aws-masker: blocked %s %s%s with %d: %s", flow.request.method, flow.request.pretty_host,
                    self._safe_path(flow), blocked.status, blocked.reason)
        if self.events is not None:
            self.events.emit(block_event(flow.id, flow.request.pretty_host, self._safe_path(flow),
                                         blocked.status, blocked.reason,
                                         nbytes=len(flow.request.raw_content or b"")))

    # -- replies -------------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream SSE replies and large or unsized ones, restoring as the bytes pass."""
        state = self.flows.get(flow.id)
        resp = flow.response
        if state is None or resp is None or flow.request.method == "HEAD" or resp.status_code in (204, 304):
            return
        ctype = resp.headers.get("content-type", "")
        length = resp.headers.get("content-length", "")
        sse = "text/event-stream" in ctype.lower()
        if not sse and length.isdigit() and int(length) <= self.max_body:
            return  # buffered; restored in response()
        mapping = self._stream_mapping(state)
        state.streamed = True
        if not mapping:
            resp.stream = True  # nothing to restore: stream it untouched rather than buffer it
            return
        keep = TEXT_LOG_LIMIT if self.dev else 0
        encoding = resp.headers.get("content-encoding", "")
        restorer = StreamRestorer(mapping, ctype, encoding, text_log_limit=keep)
        state.restorer = restorer
        resp.stream = _Metered(restorer, state)
        if restorer.drops_content_encoding:
            del resp.headers["content-encoding"]
        if "content-length" in resp.headers:
            del resp.headers["content-length"]
        if flow.request.http_version.startswith("HTTP/1") and \
                "chunked" not in resp.headers.get("transfer-encoding", "").lower():
            resp.headers["transfer-encoding"] = "chunked"

    def _stream_mapping(self, state: FlowState) -> dict[bytes, bytes]:
        """Mappings a streamed reply is restored with. A stream cannot wait for the store, so with namespace
        scope it also gets the placeholders this proxy minted or used recently."""
        if not self.namespace_scope or not self.recent:
            return state.mapping
        return {**self.recent, **state.mapping}

    async def response(self, flow: http.HTTPFlow) -> None:
        state = self.flows.pop(flow.id, None)
        if state is None or flow.response is None:
            return
        if state.streamed:
            self._finish_stream(flow, state)
            self._finish(flow, state)
            return
        started = time.perf_counter()
        content = self._decoded_reply(flow, state)
        if content:
            self._restore_buffered(flow, state, await self._reply_mapping(state, content), content)
        state.restore_ms += (time.perf_counter() - started) * 1000
        self._finish(flow, state)

    def _decoded_reply(self, flow: http.HTTPFlow, state: FlowState) -> bytes | None:
        """The reply body, decoded once, when placeholders may have to be restored in it; None otherwise."""
        resp = flow.response
        if resp is None or (not state.mapping and not self.namespace_scope):
            return None
        try:
            return resp.get_content(strict=True)
        except ValueError:
            log.warning("aws-masker: reply with Content-Encoding %r cannot be decoded; placeholders stay",
                        resp.headers.get("content-encoding", ""))
            return None

    def _restore_buffered(self, flow: http.HTTPFlow, state: FlowState, mapping: dict[bytes, bytes],
                          content: bytes) -> None:
        resp = flow.response
        assert resp is not None
        ctype = resp.headers.get("content-type", "")
        is_json = "json" in ctype.lower()
        seen: Counter[bytes] = Counter()
        restored, n = restore_bytes(content, mapping, seen, in_json=is_json)
        codec = text_codec(content, ctype) if not n else None
        if codec is not None:  # UTF-16 and the like: placeholders are in the text; written back as it came
            try:
                text = content.decode(codec).encode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                text = b""  # not that charset after all
            restored, n = restore_bytes(text, mapping, seen, in_json=is_json)
            if n:
                restored = restored.decode("utf-8", "surrogatepass").encode(codec)
        if n:
            resp.content = restored
        state.restored += n
        state.restored_placeholders.update(seen)

    def _finish_stream(self, flow: http.HTTPFlow, state: FlowState) -> None:
        restorer = state.restorer
        if restorer is None:
            return
        state.restored = restorer.restored
        state.restored_placeholders = restorer.restored_placeholders()
        if restorer.errors:
            log.warning("aws-masker: %d internal error(s) while restoring a streamed reply; the rest of it "
                        "was passed through unrestored", restorer.errors)
        resp = flow.response
        if resp is not None and restorer.text_log is not None and not resp.raw_content:
            # mitmweb shows streamed replies as "content missing": show the restored text instead.
            resp.headers.pop("content-encoding", None)
            resp.set_content(bytes(restorer.text_log))

    def _finish(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """Comment for mitmweb and the unmask event, once the reply is complete."""
        self.finished += 1
        if self.finished % TRIM_EVERY == 0:
            asyncio.get_running_loop().call_soon(release_freed_memory)  # after this hook, not in it
        seen = state.restored_placeholders
        # rule of each restored placeholder, counted in C (placeholders of other requests: "namespace")
        rules = Counter(map(state.placeholder_rules.get, seen.elements(), repeat("namespace")))
        if state.masked or state.restored:
            flow.comment = (flow.comment + "; " if flow.comment else "aws-masker: ") + \
                "restored " + _summary(rules)
        if self.events is not None and flow.response is not None:
            dev = self.dev
            path = state.safe_path or self._safe_path(flow)
            self.events.emit(unmask_event(
                flow.id, flow.request.pretty_host, path, state.restored, rules,
                state.restore_ms, state.reply_bytes or len(flow.response.raw_content or b""), state.streamed,
                sorted(p.decode() for p in state.restored_placeholders) if dev else None))

    async def _reply_mapping(self, state: FlowState, content: bytes) -> dict[bytes, bytes]:
        """This flow's mappings; with namespace scope also any other placeholder of the namespace."""
        if not self.namespace_scope or content.find(PREFIX) < 0:
            return state.mapping
        tokens = TOKEN_RE.findall(content)
        # (and what a token glued after other text may be: its tails up to MAX_GLUED_TAIL bytes, not all
        # of a huge token's, n^2/10 bytes)
        tails = [g for t in tokens for g in glued_suffixes(t, MAX_GLUED_TAIL)]
        unknown = [t for t in dict.fromkeys(tokens + tails) if t not in state.mapping]
        if not unknown:
            return state.mapping
        try:
            extra = await self.store.originals_for(unknown)
        except StoreUnavailable as e:
            log.warning("aws-masker: namespace restore skipped, store unavailable: %s", e)
            return state.mapping
        return {**state.mapping, **extra}

    def error(self, flow: http.HTTPFlow) -> None:
        self.flows.pop(flow.id, None)

    def done(self) -> None:
        GUARD.disarm(self)
        self.flows.clear()
        uninstall_view(self.view_flows.get)
        self.view_flows.clear()


def _unreadable_options() -> list[str]:
    """Why each ``--set masker_…`` value mitmproxy has not applied cannot be read (its own message)."""
    opts = ctx.options
    out = []
    for name, value in getattr(opts, "deferred", {}).items():
        if not name.startswith("masker_"):
            continue
        try:
            opts._parse_setval(opts._options[name], getattr(value, "val", value))
        except exceptions.OptionsError as e:
            out.append(str(e))
        except Exception:  # mitmproxy's internals changed: still name the option
            out.append(f"--set {name}: value not applied")
    return out


def _unknown_options() -> list[str]:
    """A message for each ``--set masker_…`` name that is not an option (with the closest that is)."""
    opts = ctx.options
    ours = [name for name in opts.keys() if name.startswith("masker_")]
    out = []
    for name in getattr(opts, "deferred", {}):
        if name.startswith("masker_") and name not in ours:
            close = difflib.get_close_matches(name, ours, n=1)
            out.append(f"unknown option --set {name}" + (f" (did you mean {close[0]}?)" if close else ""))
    return out


def _redact_url(url: str) -> str:
    """A Redis URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _builtin_sources() -> set[str]:
    from .rules import BUILTIN_RULES_DIR, rule_files

    return {str(p) for p in rule_files(BUILTIN_RULES_DIR)} if BUILTIN_RULES_DIR.is_dir() else set()


def _summary(counts: Counter[str]) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{rule} {n}" for rule, n in counts.most_common())
    return f"{total} ({parts})" if parts else str(total)
