"""Real-time monitoring events: what the proxy masked, restored or blocked, published to Redis.

Event (a JSON object; one per Pub/Sub message, or ``{"type": "batch", "count": N, "events": [...]}`` when
``batch_size`` > 1)::

    type         "mask" | "unmask" | "block"
    ts           epoch seconds (float)
    flow_id      mitmproxy flow id (the mask and unmask events of a flow share it)
    host, path   request host and path (the query string is cut off: it could hold anything)
    count        identifiers replaced (mask) or restored (unmask)
    rules        {rule id: count}
    duration_ms  time spent masking / restoring
    bytes        body size (request body for mask, reply body for unmask)
    streamed     unmask only: the reply was restored while streaming
    reason       block only: why the request was answered by the proxy
    status       block only: the HTTP status it was answered with
    placeholders optional (the addon adds it in ``development`` only): placeholders used in the flow

Originals never appear: the addon never hands them over, and the publisher keeps only the fields above,
cuts the query string off ``path`` and keeps only ``placeholders`` entries that are placeholder tokens.

Design
------
* ``emit(event)`` is synchronous and O(1): it updates the in-memory statistics, applies sampling and
  appends to a bounded deque. It never awaits, never touches the network, never raises. A full queue
  drops the event (``dropped`` counts it). The caller hands the dict over: it must not change it later.
* One background task (``start()``) drains the queue. Each flush sends everything it takes in ONE
  pipeline (PUBLISH per message, XADD per event when a stream is set, HINCRBY/EXPIRE for the statistics)
  = one round trip on ONE pooled connection, whatever the number of events. With ``batch_size`` 1 each
  event is its own message and the task flushes as soon as something is queued (events that arrive
  while a flush is in flight go out together in the next one). With ``batch_size`` > 1 messages hold at
  most ``batch_size`` events and a flush happens when a batch is full or the oldest queued event is
  ``flush_ms`` old.
* Redis down, slow or paused only ever delays the task: events wait in the queue (overflow dropped and
  counted), a failed flush puts its events back and the task retries with exponential backoff
  (``backoff_min`` 0.5 s doubling to ``backoff_max`` 30 s). One warning is logged when Redis goes away,
  one info when it is back. A flush that takes longer than ``flush_timeout`` counts as failed.
  Delivery is at least once: a flush that failed half-way may be sent again.
* Sampling is per flow: ``sampled(flow_id)`` compares a BLAKE2b hash of the flow id with the rate, so
  the mask and unmask events of a flow are both published or both dropped, on every proxy and across
  restarts. Block events are always published.
* Statistics count EVERY event, sampled out or dropped from a full queue included (the ``stats_only``
  path: emit() counts a sampled-out event and returns). They are aggregated in memory per UTC hour and
  written by the next flush (at least once a second while only statistics are pending) into the hash
  ``{namespace}:stats:{YYYYMMDDHH}`` with ``EXPIRE`` ``stats_ttl_days`` days. Fields:
  ``events``, ``type:<type>``, ``ids:<type>`` (identifiers masked / restored), ``bytes:<type>``,
  ``rule:<id>`` (identifiers masked per rule), ``restored:<id>`` (restored per rule),
  ``block:<status>``. A failed flush keeps them for the next one.
* With an empty channel and an empty stream nothing is queued; only statistics are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .placeholders import TOKEN_RE

if TYPE_CHECKING:  # redis is imported when a publisher is made: a proxy without Redis does not load it
    from redis.asyncio import Redis

COALESCE_S = 0.002  # batch size 1: the events of 2 ms share one pipeline (still one message each)
COALESCE_MAX = 64
log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "aws-masker:events"
DEFAULT_STREAM = ""
DEFAULT_STREAM_MAXLEN = 100_000
DEFAULT_SAMPLE_RATE = "1.0"
DEFAULT_BATCH_SIZE = 1
DEFAULT_FLUSH_MS = 1000
DEFAULT_NAMESPACE = "aws-masker"
EVENT_TYPES = ("mask", "unmask", "block")
_TYPES = frozenset(EVENT_TYPES)
MAX_BATCH_SIZE = 1000
MAX_FLUSH_MS = 600_000
STATS_FLUSH_S = 1.0  # statistics alone are written at most this long after they were counted
MAX_FLUSH_MESSAGES = 500  # messages per pipeline (x batch_size events)

_FIELDS = ("type", "ts", "flow_id", "host", "path", "count", "rules", "duration_ms", "bytes")
_TOKEN = re.compile(TOKEN_RE.pattern.decode() + r"\Z")
_BAD_NAME = re.compile(r"[\x00-\x20\x7f]")


# -- option parsing ------------------------------------------------------------------------------------------

def _int(option: str, value: object, lo: int, hi: int, what: str) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        n = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"{option}: {value!r} is not an integer ({what})") from None
    if not lo <= n <= hi:
        raise ValueError(f"{option}: {value!r} is out of range ({what})")
    return n


def _name(option: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{option}: {value!r} is not a string")
    name = value.strip()
    if _BAD_NAME.search(name) or len(name) > 256:
        raise ValueError(f"{option}: {value!r} is not a valid Redis key or channel name "
                         "(no spaces or control characters, at most 256 characters)")
    return name


def parse_events_channel(value: object) -> str:
    """``masker_events_channel``: Pub/Sub channel name; empty disables Pub/Sub."""
    return _name("masker_events_channel", value)


def parse_events_stream(value: object) -> str:
    """``masker_events_stream``: Redis Stream name; empty (the default) disables the stream."""
    return _name("masker_events_stream", value)


def parse_stream_maxlen(value: object) -> int:
    """``masker_events_stream_maxlen``: approximate MAXLEN of the stream, 1 .. 10**9."""
    return _int("masker_events_stream_maxlen", value, 1, 10**9, "1 .. 1000000000 entries")


def parse_sample_rate(value: object) -> float:
    """``masker_event_sample_rate``: a number from 0 to 1 (given as a string, e.g. "0.1")."""
    option = "masker_event_sample_rate"
    try:
        if isinstance(value, bool):
            raise ValueError
        rate = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{option}: {value!r} is not a number between 0 and 1") from None
    if not math.isfinite(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{option}: {value!r} is not a number between 0 and 1")
    return rate


def parse_batch_size(value: object) -> int:
    """``masker_event_batch_size``: events per Pub/Sub message, 1 .. 1000."""
    return _int("masker_event_batch_size", value, 1, MAX_BATCH_SIZE, f"1 .. {MAX_BATCH_SIZE}")


def parse_flush_ms(value: object) -> int:
    """``masker_event_flush_ms``: longest wait of an event for its batch, 0 .. 600000 ms."""
    return _int("masker_event_flush_ms", value, 0, MAX_FLUSH_MS, f"0 .. {MAX_FLUSH_MS} ms")


@dataclass(frozen=True)
class EventOptions:
    channel: str = DEFAULT_CHANNEL
    stream: str = DEFAULT_STREAM
    stream_maxlen: int = DEFAULT_STREAM_MAXLEN
    sample_rate: float = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE
    flush_ms: int = DEFAULT_FLUSH_MS


def parse_event_options(channel: object = DEFAULT_CHANNEL, stream: object = DEFAULT_STREAM,
                        stream_maxlen: object = DEFAULT_STREAM_MAXLEN,
                        sample_rate: object = DEFAULT_SAMPLE_RATE, batch_size: object = DEFAULT_BATCH_SIZE,
                        flush_ms: object = DEFAULT_FLUSH_MS) -> EventOptions:
    """All event options at once; ``ValueError`` names the first bad option and its value."""
    return EventOptions(parse_events_channel(channel), parse_events_stream(stream),
                        parse_stream_maxlen(stream_maxlen), parse_sample_rate(sample_rate),
                        parse_batch_size(batch_size), parse_flush_ms(flush_ms))


# -- sampling --------------------------------------------------------------------------------------------

def sample_point(flow_id: str) -> float:
    """A number in [0, 1) that depends only on ``flow_id`` (stable across processes and restarts)."""
    digest = hashlib.blake2b(flow_id.encode("utf-8", "surrogatepass"), digest_size=8,
                             person=b"aws-masker-ev").digest()
    return int.from_bytes(digest, "big") / 18446744073709551616.0


def sampled(flow_id: str, rate: float) -> bool:
    """Whether the events of ``flow_id`` are published at sample ``rate``."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return sample_point(flow_id) < rate


# -- building events ---------------------------------------------------------------------------------------

def mask_event(flow_id: str, host: str, path: str, count: int, rules: Mapping[str, int], duration_ms: float,
               nbytes: int, placeholders: list[str] | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": "mask", "ts": time.time(), "flow_id": flow_id, "host": host, "path": path,
                          "count": count, "rules": dict(rules), "duration_ms": round(duration_ms, 3),
                          "bytes": nbytes}
    if placeholders is not None:
        ev["placeholders"] = placeholders
    return ev


def unmask_event(flow_id: str, host: str, path: str, count: int, rules: Mapping[str, int],
                 duration_ms: float, nbytes: int, streamed: bool,
                 placeholders: list[str] | None = None) -> dict[str, Any]:
    ev = mask_event(flow_id, host, path, count, rules, duration_ms, nbytes, placeholders)
    ev["type"] = "unmask"
    ev["streamed"] = bool(streamed)
    return ev


def block_event(flow_id: str, host: str, path: str, status: int, reason: str, duration_ms: float = 0.0,
                nbytes: int = 0, count: int = 0, rules: Mapping[str, int] | None = None) -> dict[str, Any]:
    ev = mask_event(flow_id, host, path, count, rules or {}, duration_ms, nbytes)
    ev["type"] = "block"
    ev["status"] = int(status)
    ev["reason"] = reason
    return ev


def clean_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event as published: known fields only, no query string, placeholder tokens only."""
    out: dict[str, Any] = {}
    for k in _FIELDS:
        if k in event:
            out[k] = event[k]
    path = out.get("path")
    if isinstance(path, str):
        out["path"] = path.split("?", 1)[0].split("#", 1)[0]
    rules = out.get("rules")
    if isinstance(rules, Mapping):
        out["rules"] = {str(r): int(n) for r, n in rules.items()}
    else:
        out["rules"] = {}
    t = out.get("type")
    if t == "unmask":
        out["streamed"] = bool(event.get("streamed", False))
    elif t == "block":
        out["reason"] = str(event.get("reason", ""))
        out["status"] = event.get("status")
    phs = event.get("placeholders")
    if isinstance(phs, list | tuple):
        out["placeholders"] = [p for p in (x.decode() if isinstance(x, bytes) else x for x in phs)
                               if isinstance(p, str) and _TOKEN.match(p)]
    return out


def stats_key(namespace: str, hour: int) -> str:
    """``{namespace}:stats:{YYYYMMDDHH}`` for the UTC hour ``hour`` (= epoch seconds // 3600)."""
    return f"{namespace}:stats:{time.strftime('%Y%m%d%H', time.gmtime(hour * 3600))}"


def _describe(e: BaseException) -> str:
    from redis import exceptions as rexc

    if isinstance(e, rexc.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(e, rexc.ConnectionError | OSError):
        return f"{type(e).__name__}: {str(e)[:160]}"
    return type(e).__name__


type ClientSource = Redis | Callable[[], Redis]


class EventPublisher:
    """Publishes monitoring events to Redis from a bounded in-process queue; see the module docstring."""

    def __init__(self, client_factory_or_client: ClientSource, channel: str = DEFAULT_CHANNEL,
                 stream: str = DEFAULT_STREAM, stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
                 sample_rate: float = 1.0, batch_size: int = DEFAULT_BATCH_SIZE,
                 flush_ms: int = DEFAULT_FLUSH_MS, queue_size: int = 10_000, stats_ttl_days: int = 30,
                 namespace: str = DEFAULT_NAMESPACE, *, backoff_min: float = 0.5, backoff_max: float = 30.0,
                 flush_timeout: float = 5.0) -> None:
        from redis.asyncio import Redis

        if isinstance(client_factory_or_client, Redis):
            self._client: Redis | None = client_factory_or_client
            self._factory: Callable[[], Redis] | None = None
        elif callable(client_factory_or_client):
            self._client = None
            self._factory = client_factory_or_client
        else:
            raise TypeError("EventPublisher needs a redis.asyncio.Redis client or a function returning one")
        self.channel = parse_events_channel(channel)
        self.stream = parse_events_stream(stream)
        self.stream_maxlen = parse_stream_maxlen(stream_maxlen)
        self.sample_rate = parse_sample_rate(sample_rate)
        self.batch_size = parse_batch_size(batch_size)
        self.flush_ms = parse_flush_ms(flush_ms)
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if stats_ttl_days < 1:
            raise ValueError("stats_ttl_days must be at least 1")
        if not namespace or _BAD_NAME.search(namespace) or "{" in namespace or "}" in namespace:
            raise ValueError(f"invalid namespace {namespace!r}")
        self.queue_size = int(queue_size)
        self.stats_ttl = int(stats_ttl_days) * 86_400
        self.namespace = namespace
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.flush_timeout = flush_timeout
        self.publishing = bool(self.channel or self.stream)

        self._queue: deque[tuple[float, dict[str, Any]]] = deque()
        self._stats: dict[int, Counter[str]] = {}
        self._max_stat_hours = int(stats_ttl_days) * 24
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_flush = 0.0
        self._down = False
        self._dropped_at_down = 0
        self._dropped_reported = 0
        self._drop_logged_at = 0.0
        self._error_codes: set[str] = set()

        # introspection
        self.emitted = 0  # events given to emit()
        self.published = 0  # events sent to Redis (Pub/Sub and/or stream)
        self.messages = 0  # Pub/Sub messages sent
        self.dropped = 0  # events lost: queue full, or still queued when closed
        self.sampled_out = 0  # events counted in the statistics only
        self.failed_flushes = 0
        self.command_errors = 0  # commands Redis refused (e.g. WRONGTYPE, OOM); their events are not retried
        self.emit_errors = 0  # malformed events emit() swallowed
        self.connected = False

    # -- producer side (request path) ---------------------------------------------------------------------

    def sampled(self, flow_id: str) -> bool:
        return sampled(flow_id, self.sample_rate)

    @property
    def pending(self) -> int:
        """Events waiting in the queue."""
        return len(self._queue)

    def emit(self, event: dict[str, Any]) -> None:
        """Count ``event`` in the statistics and queue it for publishing. Sync, O(1), never raises.

        Call it on the event loop thread (mitmproxy hooks run there). ``event`` is handed over.
        """
        try:
            self.emitted += 1
            etype = event["type"]
            if etype not in _TYPES:
                raise ValueError(etype)
            ts = event.get("ts")
            if ts is None:
                ts = event["ts"] = time.time()
            hour = int(ts // 3600)
            st = self._stats.get(hour)
            if st is None:
                st = self._stats[hour] = Counter()
                if len(self._stats) == 1:
                    self._wake.set()  # statistics pending again: the task writes them within a second
                elif len(self._stats) > self._max_stat_hours:
                    del self._stats[min(self._stats)]
            count = event.get("count") or 0
            st["events"] += 1
            st["type:" + etype] += 1
            st["ids:" + etype] += count
            st["bytes:" + etype] += event.get("bytes") or 0
            rules = event.get("rules")
            if rules:
                prefix = "rule:" if etype == "mask" else "restored:" if etype == "unmask" else None
                if prefix:
                    for rule, n in rules.items():
                        st[prefix + rule] += n
            if etype == "block":
                st[f"block:{event.get('status')}"] += 1
            elif self.sample_rate < 1.0 and not sampled(event.get("flow_id") or "", self.sample_rate):
                self.sampled_out += 1  # stats only
                return
            if not self.publishing:
                return
            q = self._queue
            n = len(q)
            if n >= self.queue_size:
                self.dropped += 1
                return
            q.append((time.monotonic(), event))
            if n == 0 or n + 1 >= self.batch_size:
                self._wake.set()
        except Exception:
            self.emit_errors += 1

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background task; call it from within the running event loop."""
        if self._task is not None and not self._task.done():
            return
        self._closing = False
        self._stopping.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="aws-masker-events")

    def stop(self) -> None:
        """Cancel the background task at once; queued events stay queued (``start()`` resumes)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Flush what is queued (best effort, at most ``timeout`` seconds), stop, close an owned client."""
        self._closing = True
        self._stopping.set()
        self._wake.set()
        task = self._task
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._run()) if self._queue or self._stats else None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except (TimeoutError, asyncio.CancelledError, Exception):
                pass
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._task = None
        if self._queue:
            self.dropped += len(self._queue)
            self._queue.clear()
        if self._factory is not None and self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- the background task ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self.backoff_min
        while True:
            try:
                await self._wait_ready()
                if not self._queue and not self._stats:
                    if self._closing:
                        return
                    continue
                items, encoded = self._encode(self._take())
                stats, self._stats = self._stats, {}
                try:
                    error = await self._flush(items, encoded, stats)
                except asyncio.CancelledError:  # stop() during a flush: keep its events (maybe sent twice)
                    self._requeue(items, stats)
                    raise
                self._last_flush = time.monotonic()
                if error is None:
                    backoff = self.backoff_min
                    self._report_up()
                    continue
                self._requeue(items, stats)
                self._report_down(error)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: keep the task alive (events stay bounded), say it once per backoff
                log.exception("aws-masker events: internal error in the publisher task")
            if self._closing:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self.backoff_max)

    async def _wait_ready(self) -> None:
        q = self._queue
        while not self._closing:
            now = time.monotonic()
            if q:
                if self.batch_size == 1:
                    # One event per message, but the messages of the next few milliseconds share one
                    # pipeline: under load that is one round trip for many events instead of one each.
                    if len(q) >= COALESCE_MAX:
                        return
                    timeout: float | None = COALESCE_S - (now - q[0][0])
                elif len(q) >= self.batch_size:
                    return
                else:
                    timeout = self.flush_ms / 1000 - (now - q[0][0])
            elif self._stats:
                timeout = self._last_flush + STATS_FLUSH_S - now
            else:
                timeout = None
            if timeout is not None and timeout <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _take(self) -> list[dict[str, Any]]:
        q = self._queue
        n = len(q)
        bs = self.batch_size
        if bs > 1 and not self._closing and n and time.monotonic() - q[0][0] < self.flush_ms / 1000:
            n -= n % bs  # only full batches while the oldest event may still wait
        n = min(n, MAX_FLUSH_MESSAGES * bs)
        return [q.popleft()[1] for _ in range(n)]

    def _requeue(self, items: list[dict[str, Any]], stats: dict[int, Counter[str]]) -> None:
        for hour, counts in stats.items():
            mine = self._stats.get(hour)
            if mine is None:
                self._stats[hour] = counts
            else:
                mine.update(counts)
        room = self.queue_size - len(self._queue)
        if room < len(items):
            self.dropped += len(items) - max(room, 0)
            items = items[len(items) - max(room, 0):]
        now = time.monotonic()
        self._queue.extendleft((now, ev) for ev in reversed(items))

    def _client_now(self) -> Redis:
        if self._client is None:
            assert self._factory is not None
            self._client = self._factory()
        return self._client

    def _encode(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
        """The events that can be published and their JSON; malformed ones are dropped (never retried)."""
        kept: list[dict[str, Any]] = []
        encoded: list[str] = []
        for ev in items:
            try:
                encoded.append(json.dumps(clean_event(ev), separators=(",", ":"), default=str))
            except Exception:
                self.emit_errors += 1
                self.dropped += 1
                continue
            kept.append(ev)
        return kept, encoded

    async def _flush(self, items: list[dict[str, Any]], encoded: list[str],
                     stats: dict[int, Counter[str]]) -> BaseException | None:
        """Send ``encoded`` and ``stats`` in one pipeline; the error if it failed, else None."""
        try:
            pipe = self._client_now().pipeline(transaction=False)
            if self.channel:
                if self.batch_size == 1:
                    for s in encoded:
                        pipe.publish(self.channel, s)
                else:
                    bs = self.batch_size
                    for i in range(0, len(encoded), bs):
                        chunk = encoded[i:i + bs]
                        pipe.publish(self.channel,
                                     f'{{"type":"batch","count":{len(chunk)},"events":[{",".join(chunk)}]}}')
            if self.stream:
                for ev, s in zip(items, encoded, strict=True):
                    pipe.xadd(self.stream, {"type": str(ev.get("type")), "event": s},
                              maxlen=self.stream_maxlen, approximate=True)
            for hour, counts in stats.items():
                key = stats_key(self.namespace, hour)
                for field, n in counts.items():
                    if n:
                        pipe.hincrby(key, field, n)
                pipe.expire(key, self.stats_ttl)
            if len(pipe) == 0:
                return None
            results = await asyncio.wait_for(pipe.execute(raise_on_error=False), self.flush_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return e
        from redis import exceptions as rexc

        for r in results:
            if isinstance(r, rexc.ResponseError):
                self.command_errors += 1
                code = str(r).split(" ", 1)[0][:20]
                if code not in self._error_codes:
                    self._error_codes.add(code)
                    log.warning("aws-masker events: Redis refused a command (%s); those events are lost",
                                code)
        if self.channel:
            self.messages += len(encoded) if self.batch_size == 1 else -(-len(encoded) // self.batch_size)
        self.published += len(items)
        return None

    def _report_down(self, error: BaseException) -> None:
        self.failed_flushes += 1
        self.connected = False
        if not self._down:
            self._down = True
            self._dropped_at_down = self.dropped
            log.warning("aws-masker events: Redis unavailable (%s); queueing events (at most %d, the rest "
                        "are dropped and counted) and retrying with backoff", _describe(error),
                        self.queue_size)

    def _report_up(self) -> None:
        self.connected = True
        if self._down:
            self._down = False
            log.info("aws-masker events: Redis is back; %d events dropped while it was away",
                     self.dropped - self._dropped_at_down)
            self._dropped_reported = self.dropped
        elif self.dropped > self._dropped_reported and time.monotonic() - self._drop_logged_at > 60:
            self._drop_logged_at = time.monotonic()
            log.warning("aws-masker events: queue full, %d events dropped so far (Redis too slow?)",
                        self.dropped)
            self._dropped_reported = self.dropped
