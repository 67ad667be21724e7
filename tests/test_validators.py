"""The fast IPv4 validator gives the same answers as the standard library's reading of the address."""

from __future__ import annotations

import ipaddress
import random

from aws_masker.rules import VALIDATORS


def reference(value: bytes) -> bool:
    try:
        ip = ipaddress.IPv4Address(value.decode())
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip.is_link_local)


def test_ipv4_validator_matches_ipaddress() -> None:
    rnd = random.Random(7)
    special = [0, 1, 10, 127, 169, 172, 192, 224, 239, 240, 254, 255, 256, 300]
    cases = [b"127.0.0.1", b"0.0.0.0", b"10.0.0.1", b"169.254.169.254", b"224.0.0.1", b"255.255.255.255",
             b"01.2.3.4", b"1.2.3.256", b"52.1.2.3", b"0.1.2.3", b"1.2.3", b"1.2.3.4.5", b"a.b.c.d"]
    for _ in range(20_000):
        cases.append(".".join(str(rnd.choice([rnd.randrange(256), rnd.choice(special)])) for _ in range(4))
                     .encode())
    wrong = [c for c in cases if VALIDATORS["ipv4"](c) != reference(c)]
    assert not wrong, wrong[:10]
