"""Watch the proxy's monitoring events live, or print the hourly statistics.

    python -m aws_masker.monitor                       # Pub/Sub channel aws-masker:events on local Redis
    python -m aws_masker.monitor --redis redis://:pw@host:6379/0 --json
    python -m aws_masker.monitor --stream aws-masker:events-stream --group ops
    python -m aws_masker.monitor --stats --hours 48

One line per event (batches are unpacked), e.g.::

  04:31:12 mask    api.anthropic.com /v1/messages  12 ids (aws-arn 3, aws-ec2-instance-id 9)  0.21 ms  16.4 kB
  04:31:13 unmask  api.anthropic.com /v1/messages  12 ids (aws-arn 3, ...)  streamed  0.05 ms  2.1 kB
  04:31:14 block   api.anthropic.com /v1/messages  503 mapping store unavailable: redis timeout

``--json`` prints each event as one JSON line instead. At most ``--max-per-sec`` lines are printed per
second (0: no limit); each second in which events were skipped ends with ``… skipped N events`` (on
stderr with ``--json``, so stdout stays JSON lines). With ``--stream`` the Redis Stream is read through a
consumer group (created with MKSTREAM when missing; monitors sharing a group share the events, give each
its own ``--group`` to see everything). The monitor survives Redis restarts: it reconnects with backoff
and says so on stderr. Ctrl-C (or SIGTERM) ends it with a summary line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .events import DEFAULT_CHANNEL, DEFAULT_NAMESPACE, stats_key

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_GROUP = "aws-masker-monitor"
BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0
POLL_S = 0.25


# -- formatting ----------------------------------------------------------------------------------------------

def human_bytes(n: Any) -> str:
    try:
        n = int(n)
    except (TypeError, ValueError):
        return "? B"
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1_000_000:.1f} MB"


def format_event(ev: dict[str, Any]) -> str:
    """The readable line of one event."""
    try:
        clock = time.strftime("%H:%M:%S", time.localtime(float(ev.get("ts") or time.time())))
    except (TypeError, ValueError, OverflowError):
        clock = "??:??:??"
    etype = str(ev.get("type", "?"))
    head = f"{clock} {etype:<7} {ev.get('host', '?')} {ev.get('path', '')}"
    if etype == "block":
        return f"{head}  {ev.get('status', '?')} {ev.get('reason', '')}"
    rules = ev.get("rules") or {}
    detail = ""
    if isinstance(rules, dict) and rules:
        detail = " (" + ", ".join(f"{r} {n}" for r, n in sorted(rules.items())) + ")"
    parts = [f"{ev.get('count', 0)} ids{detail}"]
    if etype == "unmask" and ev.get("streamed"):
        parts.append("streamed")
    try:
        parts.append(f"{float(ev.get('duration_ms') or 0):.2f} ms")
    except (TypeError, ValueError):
        pass
    parts.append(human_bytes(ev.get("bytes", 0)))
    phs = ev.get("placeholders")
    if isinstance(phs, list) and phs:
        more = f" +{len(phs) - 5}" if len(phs) > 5 else ""
        parts.append("[" + ", ".join(map(str, phs[:5])) + more + "]")
    return f"{head}  " + "  ".join(parts)


def unpack(data: bytes | str) -> list[dict[str, Any]]:
    """The events of one message (a single event or a batch); raises ValueError when it is not one."""
    obj = json.loads(data)
    if isinstance(obj, dict) and obj.get("type") == "batch":
        events = obj.get("events")
        if not isinstance(events, list):
            raise ValueError("batch without events")
        return [e for e in events if isinstance(e, dict)]
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return [obj]


class Printer:
    """Prints events, at most ``max_per_sec`` lines a second, and counts what it skipped."""

    def __init__(self, max_per_sec: int, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.max_per_sec = max_per_sec
        self.as_json = as_json
        self.out = out
        self.err = err
        self.seen = 0
        self.skipped = 0
        self.bad = 0
        self._window: float | None = None  # start of the current one-second window; None while idle
        self._printed = 0
        self._skipped_now = 0

    def _end_window(self) -> None:
        if self._skipped_now:
            print(f"… skipped {self._skipped_now} events", file=self.err if self.as_json else self.out,
                  flush=True)
        self._window = None
        self._printed = 0
        self._skipped_now = 0

    def tick(self, force: bool = False) -> None:
        """Close the current window when its second is over (or ``force``): prints the skipped line."""
        if self._window is not None and (force or time.monotonic() - self._window >= 1.0):
            self._end_window()

    def message(self, data: bytes | str) -> None:
        try:
            events = unpack(data)
        except ValueError:  # JSONDecodeError is one
            self.bad += 1
            if self.bad == 1:
                print("aws-masker-monitor: ignoring a message that is not an event", file=self.err,
                      flush=True)
            return
        for ev in events:
            self.event(ev)

    def event(self, ev: dict[str, Any]) -> None:
        self.seen += 1
        self.tick()
        if self._window is None:  # a window starts with the first event after a quiet second
            self._window = time.monotonic()
        if self.max_per_sec and self._printed >= self.max_per_sec:
            self._skipped_now += 1
            self.skipped += 1
            return
        self._printed += 1
        line = json.dumps(ev, separators=(",", ":"), ensure_ascii=False) if self.as_json else format_event(ev)
        print(line, file=self.out, flush=True)

    def summary(self) -> str:
        return f"aws-masker-monitor: {self.seen} events seen, {self.skipped} skipped"


# -- reading -------------------------------------------------------------------------------------------------

def _client(url: str) -> redis.Redis:
    # No retries inside redis-py: a lost connection surfaces here and we reconnect (and say so) ourselves.
    return redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10, health_check_interval=10,
                                retry=Retry(NoBackoff(), 0), client_name="aws-masker-monitor")


class Monitor:
    def __init__(self, args: argparse.Namespace, printer: Printer) -> None:
        self.args = args
        self.printer = printer
        self.err = printer.err
        self.consumer = args.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._down_since: float | None = None

    def run(self) -> None:
        backoff = BACKOFF_MIN
        first = True
        while True:
            client = _client(self.args.redis)
            try:
                if self.args.stream:
                    self._read_stream(client, first)
                else:
                    self._read_pubsub(client, first)
            except redis.AuthenticationError as e:
                raise SystemExit(f"aws-masker-monitor: Redis refused the credentials: {e}") from None
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    print(f"aws-masker-monitor: Redis connection lost ({type(e).__name__}: {str(e)[:120]}); "
                          "reconnecting with backoff", file=self.err, flush=True)
                self._sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            else:
                return
            finally:
                first = False
                try:
                    client.close()
                except Exception:
                    pass
            if self._down_since is None:
                backoff = BACKOFF_MIN

    def _connected(self, first: bool, what: str) -> None:
        if first:
            print(f"aws-masker-monitor: {what}", file=self.err, flush=True)
        elif self._down_since is not None:
            away = time.monotonic() - self._down_since
            print(f"aws-masker-monitor: reconnected after {away:.1f} s; {what}", file=self.err, flush=True)
        self._down_since = None

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, POLL_S))
            self.printer.tick()

    def _read_pubsub(self, client: redis.Redis, first: bool) -> None:
        ps = client.pubsub(ignore_subscribe_messages=True)
        try:
            ps.subscribe(self.args.channel)
            # the subscription is confirmed by the first reply; read it so a dead server shows up here
            ps.get_message(timeout=1.0)
            self._connected(first, f"listening on channel {self.args.channel}")
            while True:
                msg = ps.get_message(timeout=POLL_S)
                if msg is not None and msg.get("type") in ("message", "pmessage"):
                    self.printer.message(msg["data"])
                self.printer.tick()
        finally:
            try:
                ps.close()
            except Exception:
                pass

    def _ensure_group(self, client: redis.Redis) -> None:
        try:
            client.xgroup_create(self.args.stream, self.args.group, id="$", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _read_stream(self, client: redis.Redis, first: bool) -> None:
        stream, group = self.args.stream, self.args.group
        self._ensure_group(client)
        self._connected(first, f"reading stream {stream} as {self.consumer} in group {group}")
        try:
            while True:
                try:
                    resp = client.xreadgroup(group, self.consumer, {stream: ">"}, count=200,
                                             block=int(POLL_S * 1000))
                except redis.ResponseError as e:
                    if "NOGROUP" in str(e):  # Redis lost its data (restart without persistence)
                        self._ensure_group(client)
                        continue
                    raise
                ids: list[Any] = []
                for entries in _stream_entries(resp):
                    for entry_id, fields in entries:
                        ids.append(entry_id)
                        data = fields.get(b"event") if isinstance(fields, dict) else None
                        if data is not None:
                            self.printer.message(data)
                if ids:
                    client.xack(stream, group, *ids)
                self.printer.tick()
        except KeyboardInterrupt:
            try:
                client.xgroup_delconsumer(stream, group, self.consumer)
            except Exception:
                pass
            raise


def _stream_entries(resp: Any) -> Iterable[Any]:
    if not resp:
        return []
    if isinstance(resp, dict):  # RESP3
        return [v[0] if v and isinstance(v[0], list) else v for v in resp.values()]
    return [entries for _name, entries in resp]


# -- statistics ----------------------------------------------------------------------------------------------

def print_stats(url: str, namespace: str, hours: int, out: TextIO) -> int:
    now_hour = int(time.time() // 3600)
    hour_list = list(range(now_hour - hours + 1, now_hour + 1))
    with redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10) as client:
        pipe = client.pipeline(transaction=False)
        for h in hour_list:
            pipe.hgetall(stats_key(namespace, h))
        rows = pipe.execute()
    totals: Counter[str] = Counter()
    per_hour: list[tuple[int, Counter[str]]] = []
    for h, row in zip(hour_list, rows, strict=True):
        c: Counter[str] = Counter({k.decode(): int(v) for k, v in row.items()})
        if c:
            per_hour.append((h, c))
            totals.update(c)

    def hour_name(h: int) -> str:
        return time.strftime("%Y-%m-%d %H:00", time.gmtime(h * 3600))

    print(f"aws-masker statistics, last {hours} h (namespace {namespace}; UTC {hour_name(hour_list[0])} .. "
          f"{hour_name(hour_list[-1])})", file=out)
    if not totals:
        print("no events recorded", file=out)
        return 0
    types = ", ".join(f"{t} {totals[f'type:{t}']}" for t in ("mask", "unmask", "block"))
    print(f"events: {totals['events']} ({types}); identifiers masked {totals['ids:mask']}, "
          f"restored {totals['ids:unmask']}; bytes masked {human_bytes(totals['bytes:mask'])}", file=out)
    sections = (("rule:", "identifiers masked per rule"), ("restored:", "identifiers restored per rule"),
                ("block:", "blocked requests per status"))
    for prefix, title in sections:
        items = sorted(((k[len(prefix):], n) for k, n in totals.items() if k.startswith(prefix)),
                       key=lambda kv: (-kv[1], kv[0]))
        if items:
            print(f"{title}:", file=out)
            width = max(len(k) for k, _ in items)
            for k, n in items:
                print(f"  {k:<{width}}  {n:>10}", file=out)
    print("busiest hours (UTC):", file=out)
    for h, c in sorted(per_hour, key=lambda hc: (-hc[1]["events"], -hc[0]))[:5]:
        print(f"  {hour_name(h)}  {c['events']:>8} events  {c['ids:mask']:>9} masked  "
              f"{c['type:block']:>6} blocked", file=out)
    return 0


# -- command line --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="aws-masker-monitor",
        description="Show aws-masker's monitoring events live, or its hourly statistics.")
    p.add_argument("--redis", default=DEFAULT_REDIS, metavar="URL",
                   help=f"Redis URL (default {DEFAULT_REDIS})")
    p.add_argument("--channel", default=DEFAULT_CHANNEL,
                   help=f"Pub/Sub channel (default {DEFAULT_CHANNEL})")
    p.add_argument("--stream", metavar="NAME", default="",
                   help="read this Redis Stream through a consumer group instead of Pub/Sub")
    p.add_argument("--group", default=DEFAULT_GROUP,
                   help=f"consumer group for --stream (default {DEFAULT_GROUP})")
    p.add_argument("--consumer", default="", help="consumer name for --stream (default <host>-<pid>)")
    p.add_argument("--max-per-sec", type=int, default=20, metavar="N",
                   help="print at most N events a second, count the rest (default 20; 0: no limit)")
    p.add_argument("--json", action="store_true", help="print raw JSON lines, one per event")
    p.add_argument("--stats", action="store_true",
                   help="print per-rule totals and the busiest hours, then exit")
    p.add_argument("--hours", type=int, default=24, help="hours --stats looks back (default 24)")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                   help=f"namespace of the statistics keys (default {DEFAULT_NAMESPACE})")
    args = p.parse_args(argv)
    if args.max_per_sec < 0:
        p.error("--max-per-sec must be 0 or more")
    if not 1 <= args.hours <= 24 * 366:
        p.error("--hours must be between 1 and 8784")
    if not args.stream and not args.channel:
        p.error("--channel is empty and no --stream given")
    return args


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stats:
        try:
            return print_stats(args.redis, args.namespace, args.hours, sys.stdout)
        except redis.RedisError as e:
            print(f"aws-masker-monitor: cannot read statistics: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    signal.signal(signal.SIGTERM, _sigterm)
    printer = Printer(args.max_per_sec, args.json, sys.stdout, sys.stderr)
    try:
        Monitor(args, printer).run()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # e.g. piped into head
        try:
            sys.stdout = open(os.devnull, "w")  # silences the flush at exit
        except OSError:
            pass
    finally:
        try:
            printer.tick(force=True)
        except OSError:
            pass
        print(printer.summary(), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
