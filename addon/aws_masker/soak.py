"""Soak test: steady mixed traffic through a real mitmdump with the addon, for minutes or hours (not in CI).

    scripts/soak --minutes 10 [--rate 20] [--concurrency 16] [--id-pool 300] [--tls] [--set k=v ...]

Starts its own fake upstream (``tests/fake_upstream.py``) and a ``mitmdump`` with the addon
(``tests/proxyproc.py``), then sends ``--rate`` requests per second (at most ``--concurrency`` in flight):
the three API shapes (Anthropic Messages, OpenAI Chat Completions, OpenAI Responses), non-streamed and
streamed, with and without tools, every prompt full of AWS identifiers. Every reply is checked to be exact
(the originals restored, nothing else changed), and every request the upstream received is checked to hold
no original. Every 30 s one line: elapsed time, requests, errors, mismatches, leaks, req/s, proxy RSS. At
the end a table per API and mode (latency percentiles) and whether the proxy's memory stayed flat after
warm-up (RSS at 25 % of the run against the end).

Identifiers come from a pool of ``--id-pool`` sets (10 identifiers each), used in turn, so the mapping store
is full after the first pool-size requests and later growth is not the store (``--id-pool 0``: a fresh set
for every request; the store then grows on purpose). Exit status 0 when there were no errors, mismatches or
leaks and memory was flat.

The helpers ``identifiers``, ``prompt`` and ``make_request`` are also used by the load tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"

ANTHROPIC, OPENAI_CHAT, RESPONSES = "anthropic", "openai-chat", "responses"  # as in tests/fake_upstream.py
APIS = (ANTHROPIC, OPENAI_CHAT, RESPONSES)
PATHS = {ANTHROPIC: "/v1/messages", OPENAI_CHAT: "/v1/chat/completions", RESPONSES: "/v1/responses"}
SYSTEM = "You are an AWS assistant. Be precise; region us-east-1, instance type m5.large stay as they are."
REPORT_EVERY = 30.0
SAMPLE_EVERY = 5.0
SOAK_HEADER = "x-soak-n"

_HEX = "0123456789abcdef"
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


# -- traffic -----------------------------------------------------------------------------------------------


def identifiers(n: int) -> dict[str, str]:
    """A deterministic set of AWS identifiers for request ``n``; different ``n`` give different values."""
    r = random.Random(n)

    def hx(k: int) -> str:
        return "".join(r.choice(_HEX) for _ in range(k))

    acct = f"{r.randrange(10**11, 10**12):012d}"
    return {
        "account": acct,
        "role": f"DeployRole-{n:06d}",
        "instance": f"i-0{hx(16)}",
        "sg": f"sg-0{hx(16)}",
        "subnet": f"subnet-{hx(8)}",
        "vpc": f"vpc-0{hx(16)}",
        "key": "AKIA" + "".join(r.choice(_B32) for _ in range(16)),
        "ip": f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}",
        "bucket": f"team-logs-{n}-{hx(6)}",
        "host": f"ec2-54-{r.randrange(256)}-{r.randrange(256)}-{r.randrange(256)}.compute-1.amazonaws.com",
    }


def originals(ids: dict[str, str]) -> list[str]:
    """Values that must never reach the upstream."""
    return list(ids.values())


def prompt(ids: dict[str, str]) -> str:
    return (f"Why can't arn:aws:iam::{ids['account']}:role/{ids['role']} reach {ids['instance']}?\n"
            f"It sits in {ids['sg']} / {ids['subnet']} ({ids['vpc']}) at {ids['ip']}, key {ids['key']}, "
            f"logs in s3://{ids['bucket']}/app, host {ids['host']}. Account {ids['account']} — "
            "\"quoted\" \\ ünïcødé ✓")


def make_request(api: str, text: str, *, tools: bool = False, stream: bool = False,
                 system: str = SYSTEM) -> dict[str, Any]:
    """A request body of ``api`` whose echo reply is ``system + "\\n" + text``."""
    builder = _test_module("fake_upstream").request_for
    return builder(api, text, system=system, tools=tools, stream=stream)


def _test_module(name: str) -> Any:
    """A helper module from tests/ (fake_upstream, proxyproc, tlsutil)."""
    if not TESTS.is_dir():
        raise SystemExit(f"soak: {TESTS} not found (run from a checkout of the repository)")
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module(name)


def check_reply(fu: Any, api: str, req: dict[str, Any], body: bytes) -> str | None:
    """None when ``body`` is exactly the echo reply to ``req`` (originals restored), else what differs."""
    want_text = fu.expected_reply_text(req)
    want_input = fu.expected_tool_input(req)
    try:
        if req.get("stream"):
            parts = fu.reassemble_stream(api, fu.parse_sse(body))
            if not parts.complete:
                return "stream incomplete"
            if parts.error is not None:
                return "error event in stream"
        else:
            parts = fu.reply_parts(api, json.loads(body))
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        return f"unparsable reply ({type(e).__name__})"
    if parts.text != want_text:
        return "text differs" + (" (placeholder left)" if "AWS_" in parts.text else "")
    if want_input is not None and parts.tool_input != want_input:
        return "tool input differs"
    return None


# -- the run -----------------------------------------------------------------------------------------------


@dataclass
class Stats:
    requests: int = 0
    errors: int = 0
    mismatches: int = 0
    leaks: int = 0
    checked_upstream: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    mismatch_kinds: Counter[str] = field(default_factory=Counter)
    latencies: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    per_kind: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (api, mode, outcome)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (elapsed s, MiB)


class Soak:
    def __init__(self, args: argparse.Namespace, proxy: Any, upstream: Any, fu: Any, proxyproc: Any) -> None:
        self.args = args
        self.proxy = proxy
        self.upstream = upstream
        self.fu = fu
        self.proxyproc = proxyproc
        self.stats = Stats()
        self.started = 0.0
        self.stop = asyncio.Event()
        self.last_report = (0.0, 0)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rss_mib(self) -> float:
        try:
            return float(self.proxy.rss_kib()) / 1024
        except (OSError, self.proxyproc.MitmProxyError):
            return float("nan")

    async def one(self, client: Any, n: int) -> None:
        rng = random.Random(n * 7919 + 1)
        api = rng.choice(APIS)
        stream = rng.random() < 0.5
        tools = rng.random() < 0.3
        pool = self.args.id_pool
        ids = identifiers(n % pool if pool else n)
        req = make_request(api, prompt(ids), tools=tools, stream=stream)
        headers = {SOAK_HEADER: str(n), "x-fake-delta-chars": str(rng.choice((1, 3, 8, 16, 64)))}
        mode = "stream" if stream else "json"
        st = self.stats
        st.requests += 1
        t0 = time.perf_counter()
        try:
            r = await client.post(self.upstream.url_for(PATHS[api]), json=req, headers=headers)
        except Exception as e:
            st.errors += 1
            st.error_kinds[type(e).__name__] += 1
            st.per_kind[api, mode, "error"] += 1
            return
        st.latencies[api, mode].append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            st.errors += 1
            st.error_kinds[f"HTTP {r.status_code}"] += 1
            st.per_kind[api, mode, "error"] += 1
            return
        problem = check_reply(self.fu, api, req, r.content)
        if problem is not None:
            st.mismatches += 1
            st.mismatch_kinds[problem] += 1
            st.per_kind[api, mode, "mismatch"] += 1
        else:
            st.per_kind[api, mode, "ok"] += 1

    def check_upstream(self) -> None:
        """Every request the upstream received since the last check: no original of its identifier set."""
        up = self.upstream
        with up._lock:  # take and forget what arrived so far (the soak must not grow itself)
            recorded = list(up._requests)
            up._requests.clear()
        pool = self.args.id_pool
        for rec in recorded:
            n_header = rec.header(SOAK_HEADER)
            if n_header is None:
                continue
            n = int(n_header)
            body = rec.content
            self.stats.checked_upstream += 1
            if any(o.encode() in body for o in originals(identifiers(n % pool if pool else n))):
                self.stats.leaks += 1
        if up.errors:
            self.stats.error_kinds["fake upstream handler error"] += len(up.errors)
            self.stats.errors += len(up.errors)
            up.errors.clear()

    def report_line(self) -> None:
        now, st = self.elapsed(), self.stats
        t_prev, n_prev = self.last_report
        rate = (st.requests - n_prev) / max(now - t_prev, 1e-9)
        self.last_report = (now, st.requests)
        print(f"[{_clock(now)}] requests {st.requests:7d}  errors {st.errors:4d}  "
              f"mismatches {st.mismatches:4d}  leaks {st.leaks:3d}  {rate:6.1f} req/s  "
              f"proxy RSS {self.rss_mib():6.1f} MiB", flush=True)

    async def monitor(self, duration: float) -> None:
        next_sample = 0.0
        next_report = REPORT_EVERY
        while not self.stop.is_set():
            now = self.elapsed()
            if now >= next_sample:
                self.stats.rss.append((now, self.rss_mib()))
                self.check_upstream()
                next_sample += SAMPLE_EVERY
            if now >= next_report:
                self.report_line()
                next_report += REPORT_EVERY
            if not self.proxy.running:
                print("soak: mitmdump died; last output:\n" + self.proxy.output()[-3000:], file=sys.stderr)
                self.stop.set()
                break
            if now >= duration:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), min(next_sample, next_report, duration) - now)

    async def run(self) -> float:
        import httpx

        args = self.args
        duration = args.minutes * 60
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        sem = asyncio.Semaphore(args.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        self.started = time.monotonic()
        monitor = asyncio.create_task(self.monitor(duration))
        async with self.proxyproc.proxied_async_client(self.proxy, timeout=60, limits=limits) as client:
            interval = 1.0 / args.rate
            next_at = time.monotonic()
            n = 0
            while not self.stop.is_set() and self.elapsed() < duration:
                await sem.acquire()
                task = asyncio.create_task(self.one(client, n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _t: sem.release())
                n += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), delay)
                elif delay < -1.0:  # saturated (concurrency limit): do not burst to catch up
                    next_at = time.monotonic()
            if tasks:
                await asyncio.wait(tasks, timeout=90)
        ran = self.elapsed()
        self.stop.set()
        await monitor
        self.stats.rss.append((ran, self.rss_mib()))
        self.check_upstream()
        return ran


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:3d}:{s:02d}"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def rss_at(samples: list[tuple[float, float]], t: float) -> float:
    """The RSS sample taken closest to elapsed time ``t``."""
    return min(samples, key=lambda s: abs(s[0] - t))[1]


def memory_verdict(samples: list[tuple[float, float]], ran: float, tolerance_mib: float = 10.0,
                   tolerance_pct: float = 10.0) -> tuple[bool, str]:
    """Flat when RSS at the end exceeds RSS at 25 % of the run by at most max(tolerance MiB, tolerance %)."""
    good = [s for s in samples if s[1] == s[1]]  # drop NaN
    if len(good) < 2:
        return False, "not enough RSS samples"
    at25, end = rss_at(good, ran * 0.25), good[-1][1]
    growth = end - at25
    limit = max(tolerance_mib, at25 * tolerance_pct / 100)
    flat = growth <= limit
    return flat, (f"{'yes' if flat else 'NO'} — RSS at 25 % {at25:.1f} MiB, at end {end:.1f} MiB, "
                  f"growth {growth:+.1f} MiB ({growth / at25 * 100:+.1f} %, limit {limit:.1f} MiB)")


def summary(soak: Soak, ran: float) -> tuple[str, bool]:
    st = soak.stats
    rate = st.requests / max(ran, 1e-9)
    lines = ["", f"soak summary: {ran:.0f} s, {st.requests} requests ({rate:.1f} req/s), "
                 f"{st.errors} errors, {st.mismatches} mismatches, {st.leaks} leaks "
                 f"({st.checked_upstream} upstream requests checked)", ""]
    head = f"{'api':<12} {'mode':<7} {'requests':>8} {'ok':>8} {'errors':>7} {'mismatch':>8} " \
           f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    lines += [head, "-" * len(head)]
    for api in APIS:
        for mode in ("json", "stream"):
            lat = st.latencies.get((api, mode), [])
            ok, err, mis = (st.per_kind[api, mode, k] for k in ("ok", "error", "mismatch"))
            lines.append(f"{api:<12} {mode:<7} {ok + err + mis:>8} {ok:>8} {err:>7} {mis:>8} "
                         f"{_pct(lat, 50):>8.1f} {_pct(lat, 95):>8.1f} {_pct(lat, 99):>8.1f} "
                         f"{(max(lat) if lat else float('nan')):>8.1f}")
    all_lat = [v for vs in st.latencies.values() for v in vs]
    lines.append("-" * len(head))
    lines.append(f"{'total':<12} {'':<7} {st.requests:>8} {st.requests - st.errors - st.mismatches:>8} "
                 f"{st.errors:>7} {st.mismatches:>8} {_pct(all_lat, 50):>8.1f} {_pct(all_lat, 95):>8.1f} "
                 f"{_pct(all_lat, 99):>8.1f} {(max(all_lat) if all_lat else float('nan')):>8.1f}")
    if st.error_kinds:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in st.error_kinds.most_common()))
    if st.mismatch_kinds:
        lines.append("mismatches: " + ", ".join(f"{k} {v}" for k, v in st.mismatch_kinds.most_common()))
    good = [s for s in st.rss if s[1] == s[1]]
    if good:
        marks = ", ".join(f"{label} {rss_at(good, ran * q):.1f}" for label, q in
                          (("start", 0), ("25%", .25), ("50%", .5), ("75%", .75), ("end", 1)))
        lines.append(f"proxy RSS MiB: {marks}, max {max(v for _, v in good):.1f}")
    flat, verdict = memory_verdict(st.rss, ran)
    lines.append(f"memory flat after warm-up: {verdict}")
    clean = flat and not st.errors and not st.mismatches and not st.leaks
    lines.append("result: " + ("PASS" if clean else "FAIL"))
    return "\n".join(lines), clean


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="how long to send traffic")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    p.add_argument("--concurrency", type=int, default=16, help="most requests in flight (default 16)")
    p.add_argument("--id-pool", type=int, default=300,
                   help="identifier sets used in turn (default 300; 0: a fresh set per request)")
    p.add_argument("--tls", action="store_true", help="the fake upstream speaks HTTPS (verified by mitmdump)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="NAME=VALUE",
                   help="extra mitmproxy / addon option for the proxy (repeatable)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.concurrency < 1 or args.id_pool < 0:
        p.error("--minutes and --rate must be positive, --concurrency at least 1, --id-pool not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fu = _test_module("fake_upstream")
    proxyproc = _test_module("proxyproc")
    with contextlib.ExitStack() as stack:
        ssl_context = None
        options: dict[str, Any] = {}
        if args.tls:
            tlsutil = _test_module("tlsutil")
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-ca-"))
            ca = tlsutil.make_test_ca(Path(folder))
            ssl_context = ca.server_context()
            options["ssl_verify_upstream_trusted_ca"] = str(ca.ca_path)
        upstream = stack.enter_context(fu.FakeUpstream(ssl_context=ssl_context))
        options["masker_hosts"] = upstream.host_port
        for item in args.options:
            name, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"soak: --set {item!r} is not NAME=VALUE")
            options[name] = value
        proxy = stack.enter_context(proxyproc.MitmProxy(options=options))
        print(f"soak: {args.minutes:g} min at {args.rate:g} req/s (concurrency {args.concurrency}, "
              f"id pool {args.id_pool or 'fresh'}), upstream {upstream.url}, mitmdump pid {proxy.pid} "
              f"on {proxy.url}, RSS {float(proxy.rss_kib()) / 1024:.1f} MiB", flush=True)
        soak = Soak(args, proxy, upstream, fu, proxyproc)
        ran = asyncio.run(soak.run())
        text, clean = summary(soak, ran)
        print(text, flush=True)
        if not proxy.running:
            clean = False
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
