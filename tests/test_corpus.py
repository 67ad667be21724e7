"""Measure the built-in rule catalog on the labelled corpus of AWS texts (kept outside the repository).

The corpus is located through ``AWS_MASKER_CORPUS`` or, by default, ``shared/corpus/aws_dev.jsonl`` in the
folder that holds the repository. Each line has ``text``, ``expect`` (values to mask, ``required`` or not)
and ``must_keep`` (substrings that must survive). A value counts as masked when every byte of every one of
its occurrences lies inside masked spans; a ``must_keep`` string counts as kept when it is still present
verbatim after each masked span is replaced by a placeholder. Measured twice: by the rules alone (the
scanner) and as the proxy masks a text body (which also reads escapes and masks repeats of names).

Run ``python tests/test_corpus.py`` for a full report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from aws_masker.masking import BodyMasker
from aws_masker.rules import load_rules
from aws_masker.scanner import Hit, Scanner

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "aws_dev.jsonl"
MIN_KEEP_RATE = 0.99


def corpus_path() -> Path:
    env = os.environ.get("AWS_MASKER_CORPUS")
    return Path(env) if env else DEFAULT_CORPUS


def load_corpus(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mask(data: bytes, hits: list[Hit]) -> bytes:
    """Replace every hit by a dummy placeholder of its kind (what the LLM would see)."""
    out, pos = [], 0
    for h in hits:
        out += [data[pos:h.start], b"AWS_%s_0001" % h.kind.encode()]
        pos = h.end
    out.append(data[pos:])
    return b"".join(out)


def is_masked(data: bytes, value: bytes, hits: list[Hit]) -> bool:
    covered = bytearray(len(data))
    for h in hits:
        covered[h.start:h.end] = b"\x01" * (h.end - h.start)
    start = data.find(value)
    if start < 0:
        return False
    while start >= 0:
        if not all(covered[start:start + len(value)]):
            return False
        start = data.find(value, start + 1)
    return True


@dataclass
class Report:
    required: int = 0
    required_masked: int = 0
    optional: int = 0
    optional_masked: int = 0
    keep: int = 0
    kept: int = 0
    missed: list[str] = field(default_factory=list)
    missed_optional: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)

    @property
    def keep_rate(self) -> float:
        return self.kept / self.keep if self.keep else 1.0


def evaluate(find: Callable[[bytes], list[Hit]], records: list[dict]) -> Report:
    rep = Report()
    for rec in records:
        data = rec["text"].encode("utf-8")
        hits = find(data)
        masked = mask(data, hits)
        for exp in rec.get("expect", []):
            ok = is_masked(data, exp["value"].encode("utf-8"), hits)
            line = f"{rec['id']}: {exp['type']} {exp['value']!r}"
            if exp.get("required"):
                rep.required += 1
                rep.required_masked += ok
                if not ok:
                    rep.missed.append(line)
            else:
                rep.optional += 1
                rep.optional_masked += ok
                if not ok:
                    rep.missed_optional.append(line)
        for keep in rec.get("must_keep", []):
            rep.keep += 1
            if keep.encode("utf-8") in masked:
                rep.kept += 1
            else:
                rep.damaged.append(f"{rec['id']}: {keep!r} -> {masked.decode('utf-8', 'replace')[:300]!r}")
    return rep


def finders() -> dict[str, Callable[[bytes], list[Hit]]]:
    """How the corpus is masked: by the rules alone, and as the proxy masks a text body."""
    scanner = Scanner(load_rules())
    masker = BodyMasker(scanner)
    return {"rules": scanner.scan, "proxy": lambda data: masker.plan(data, "text/plain").segments[0].hits}


@pytest.fixture(scope="module", params=["rules", "proxy"])
def report(request: pytest.FixtureRequest) -> Report:
    path = corpus_path()
    if not path.is_file():
        pytest.skip(f"labelled corpus not found at {path} (set AWS_MASKER_CORPUS to its path)")
    return evaluate(finders()[request.param], load_corpus(path))


def test_every_required_value_is_masked(report: Report) -> None:
    assert report.required > 0
    assert not report.missed, (f"{len(report.missed)} of {report.required} required values not masked:\n"
                               + "\n".join(report.missed))


def test_must_keep_strings_survive(report: Report) -> None:
    assert report.keep > 0
    assert report.keep_rate >= MIN_KEEP_RATE, (
        f"only {report.kept}/{report.keep} must_keep strings kept:\n" + "\n".join(report.damaged))


if __name__ == "__main__":  # pragma: no cover - manual report
    for name, find in finders().items():
        r = evaluate(find, load_corpus(corpus_path()))
        print(f"{name}: required: {r.required_masked}/{r.required}  "
              f"optional: {r.optional_masked}/{r.optional}  must_keep: {r.kept}/{r.keep} ({r.keep_rate:.2%})")
        for title, items in (("missed required", r.missed), ("missed optional", r.missed_optional),
                             ("damaged must_keep", r.damaged)):
            if items:
                print(f"-- {title}:")
                print("\n".join(items))
