"""Synthetic AWS-flavoured text for benchmarks and load tests (random, never real identifiers)."""

from __future__ import annotations

import json
import random


def _hex(rnd: random.Random, n: int) -> str:
    return "".join(rnd.choice("0123456789abcdef") for _ in range(n))


def _account(rnd: random.Random) -> str:
    return "".join(rnd.choice("0123456789") for _ in range(12))


def identifier(rnd: random.Random) -> str:
    """One random identifier of a common kind."""
    kind = rnd.randrange(8)
    if kind == 0:
        return f"i-{_hex(rnd, 17)}"
    if kind == 1:
        return f"sg-{_hex(rnd, 17)}"
    if kind == 2:
        return f"arn:aws:iam::{_account(rnd)}:role/app-{_hex(rnd, 6)}"
    if kind == 3:
        return f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
    if kind == 4:
        return f"subnet-{_hex(rnd, 17)}"
    if kind == 5:
        return "AKIA" + "".join(rnd.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    if kind == 6:
        return f"s3://data-{_hex(rnd, 8)}/logs/"
    return f"vol-{_hex(rnd, 17)}"


PROSE = (
    "The deployment pipeline failed after the last change to the network configuration. We looked at the "
    "load balancer health checks, the autoscaling group and the recent commits, but nothing obvious stood "
    "out. Can you explain why the service in us-east-1 times out while the one in eu-west-1 is fine? The "
    "instances are m5.large running version 2.14.3 of the agent, git commit 3f9c2a1. "
)


def mixed_text(size: int, seed: int = 1) -> str:
    """About ``size`` characters of logs, CLI JSON and prose; identifiers are a few percent of it."""
    rnd = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size:
        kind = rnd.randrange(3)
        if kind == 0:
            chunk = PROSE * rnd.randint(1, 3)
        elif kind == 1:
            lines = []
            for _ in range(12):
                target = " target=" + identifier(rnd) if rnd.random() < 0.25 else ""
                lines.append(f"2026-11-26T04:{rnd.randrange(60):02d}:{rnd.randrange(60):02d}Z INFO "
                             f"worker={rnd.randrange(64)} request completed in {rnd.randrange(900)} ms "
                             f"status=200 path=/api/v1/items/{rnd.randrange(10**6)}{target}\n")
            chunk = "".join(lines)
        else:
            chunk = json.dumps({"Reservations": [{"Instances": [{
                "InstanceId": identifier(rnd) if rnd.random() < 0.5 else f"i-{_hex(rnd, 17)}",
                "InstanceType": "t3.medium", "State": {"Name": "running"},
                "Placement": {"AvailabilityZone": "eu-west-1b"},
                "Tags": [{"Key": "Name", "Value": "web-frontend"}, {"Key": "team", "Value": "payments"}],
                "LaunchTime": "2026-11-20T10:00:00+00:00", "Monitoring": {"State": "disabled"},
            }]}]}, indent=2) + "\n"
        parts.append(chunk)
        total += len(chunk)
    return "".join(parts)[:size]


def request_body(n_identifiers: int = 100, size: int = 16 * 1024, seed: int = 2) -> bytes:
    """An Anthropic Messages request of about ``size`` bytes with ``n_identifiers`` identifiers."""
    rnd = random.Random(seed)
    ids = [identifier(rnd) for _ in range(n_identifiers)]
    filler = PROSE * (size // len(PROSE) + 1)
    per = max(1, (size - sum(len(i) for i in ids)) // (n_identifiers + 1))
    text = "".join(filler[k * per:(k + 1) * per] + " " + ident + " " for k, ident in enumerate(ids))
    rest = len(ids) * per
    text += filler[rest:rest + max(0, size - len(text))]  # fill up to size (all of it without identifiers)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": "You are an AWS expert.",
            "messages": [{"role": "user", "content": text}]}
    return json.dumps(body).encode()


def tools_request_body(n_tools: int = 30, params: int = 12) -> bytes:
    """An Anthropic request that is mostly tool schemas (~2,000 short strings), as coding agents send it."""
    tools = []
    for t in range(n_tools):
        props = {f"param_{i}": {"type": "string", "enum": ["alpha", "beta", "gamma"],
                                "description": f"The {i}th parameter of tool {t}, a short sentence."}
                 for i in range(params)}
        tools.append({"name": f"tool_{t}", "description": "A tool that does things. " * 5,
                      "input_schema": {"type": "object", "properties": props, "required": list(props)[:3]}})
    return json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 1024, "tools": tools,
                       "messages": [{"role": "user", "content": "hello i-0123456789abcdef0"}]}).encode()
