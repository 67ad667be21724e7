"""Mask a file (or stdin) with the rule catalog, without a proxy: ``scripts/mask FILE``.

    scripts/mask notes.txt > notes.masked.txt       # masked text on stdout, summary per rule on stderr
    terraform show | scripts/mask                   # stdin
    scripts/mask --json request.json                # a JSON body: string values are masked, as the proxy does
    scripts/mask --rules team-rules.yaml --show-mapping notes.txt    # tune a custom rule (prints ORIGINALS)
    scripts/mask --check docs/*.md                  # CI / pre-commit: exit 1 when anything would be masked

Placeholders are minted by an in-memory store that lives for this one run: the numbering is the same as a
fresh proxy would give, not that of any running proxy or Redis.

Exit codes: 0 nothing to mask (or masked text written), 1 ``--check`` found identifiers, 2 bad usage, an
unreadable input, or a broken rule file (the message names the file, the rule and the problem).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .masking import BodyMasker, MaskPlan, UnreadableBody
from .placeholders import tokens_in
from .rules import BUILTIN_RULES_DIR, Rule, RuleError, check_examples, load_rules, rule_files, with_followed
from .scanner import Scanner
from .store import MemoryStore

PROG = "aws-masker-mask"
# --engine auto: below this many input bytes the Python engine (no compile, ~0.5 s/MB) beats Hyperscan
# (~1.5-2 s to compile the catalog, then ~30 ms/MB).
AUTO_HYPERSCAN_BYTES = 2 << 20


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Mask AWS identifiers in FILE (or stdin) the way the aws-masker proxy does, without a "
                    "proxy: the masked text goes to stdout, a summary per rule to stderr.",
        epilog="Exit codes: 0 ok, 1 --check found something to mask, 2 usage error, unreadable input or "
               "broken rule file.",
    )
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="input files (default, or '-': stdin); several files share one placeholder "
                        "numbering and are written one after the other")
    p.add_argument("--rules", action="append", default=[], metavar="PATH",
                   help="extra rule file or folder, loaded on top of the built-in catalog like "
                        "masker_rules (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="treat the input as a JSON request body: mask inside string values and re-serialise "
                        "like the proxy (input that is not valid JSON is masked as text, with a note)")
    p.add_argument("--show-mapping", action="store_true",
                   help="also print the placeholder -> original table to stderr, to tune custom rules "
                        "locally. WARNING: this prints the ORIGINALS; do not use it where stderr is logged")
    p.add_argument("--check", action="store_true",
                   help="write no masked text; exit 1 when anything would be masked, 0 otherwise "
                        "(for CI and pre-commit hooks)")
    p.add_argument("--engine", choices=("auto", "hyperscan", "python"), default="auto",
                   help="scan engine; both find the same identifiers. auto (default): Python regexes for "
                        "inputs under 2 MiB (Hyperscan takes ~1.5 s to compile the catalog), Hyperscan "
                        "above when installed")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    return p.parse_args(argv)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def build_scanner(extra: Sequence[str], engine: str) -> Scanner:
    """The built-in catalog plus ``extra``; users' rules must pass their own examples (as at proxy start)."""
    rules = load_rules(extra)
    builtin = {str(p) for p in rule_files(BUILTIN_RULES_DIR)} if BUILTIN_RULES_DIR.is_dir() else set()
    user: list[Rule] = [r for r in rules if r.source not in builtin]
    problems = check_examples(
        user, lambda rule, data: Scanner(with_followed(rule, rules), "python").scan_values(data))
    if problems:
        raise RuleError("a rule fails its own examples: " + problems[0])
    return Scanner(rules, engine)


def _read(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    return Path(name).read_bytes()


def _kinds(plan: MaskPlan) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for seg in plan.segments:
        for h in seg.hits:
            counts[(h.rule, h.kind)] += 1
    return counts


def _print_summary(out: TextIO, counts: Counter[tuple[str, str]], total: int, distinct: int, nbytes: int,
                   mask_ms: float, load_ms: float, engine: str, nfiles: int) -> None:
    if counts:
        width_rule = max(len("rule"), *(len(r) for r, _ in counts))
        width_kind = max(len("kind"), *(len(k) for _, k in counts))
        print(f"{'rule':<{width_rule}}  {'kind':<{width_kind}}  count", file=out)
        for (rule, kind), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"{rule:<{width_rule}}  {kind:<{width_kind}}  {n:5d}", file=out)
    files = f" in {nfiles} files" if nfiles > 1 else ""
    print(f"total: {total} identifiers, {distinct} distinct originals, {nbytes} bytes{files}, "
          f"masked in {mask_ms:.1f} ms (rules loaded in {load_ms:.0f} ms, {engine} engine)", file=out)


def _print_mapping(out: TextIO, mapping: dict[bytes, tuple[str, bytes]]) -> None:
    print("placeholder -> original (ORIGINALS below: keep this output private)", file=out)
    if not mapping:
        print("  (none)", file=out)
        return
    width = max(len(p) for p in mapping)
    for p, (rule, original) in mapping.items():
        shown = original.decode("utf-8", "backslashreplace")
        print(f"  {p.decode():<{width}}  {shown}  ({rule})", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.files or ["-"]
    if names.count("-") > 1:
        return _fail("stdin ('-') can be given only once")
    inputs: list[tuple[str, bytes]] = []
    for name in names:
        try:
            inputs.append((name, _read(name)))
        except OSError as e:
            return _fail(f"cannot read {name}: {e.strerror or e}")
    engine = args.engine
    if engine == "auto" and sum(len(c) for _, c in inputs) < AUTO_HYPERSCAN_BYTES:
        engine = "python"
    t0 = time.perf_counter()
    try:
        scanner = build_scanner(args.rules, engine)
    except RuleError as e:
        return _fail(str(e))
    except (RuntimeError, ValueError) as e:  # e.g. --engine hyperscan without the module
        return _fail(str(e))
    load_ms = (time.perf_counter() - t0) * 1000
    masker = BodyMasker(scanner)
    store = MemoryStore(max_entries=1 << 30)
    ctype = "application/json" if args.json else "text/plain"

    counts: Counter[tuple[str, str]] = Counter()
    mapping: dict[bytes, tuple[str, bytes]] = {}  # placeholder -> (rule, original), first seen first
    total = nbytes = 0
    mask_ms = 0.0
    stdout = sys.stdout.buffer
    for name, content in inputs:
        t1 = time.perf_counter()
        try:
            plan = masker.plan(content, ctype)
        except UnreadableBody as e:
            return _fail(f"{'stdin' if name == '-' else name}: {e}")
        # (a placeholder the input holds as text is never handed to a new identifier, as in the proxy)
        kinds = {kind for kind, _ in plan.items}
        avoid = tokens_in(content, kinds).union(*(tokens_in(t, kinds) for t in plan.decoded_texts))
        placeholders = store.lookup(plan.items, avoid)
        masked, _ = plan.render(placeholders)
        mask_ms += (time.perf_counter() - t1) * 1000
        if args.json and content and plan.format != "json":
            print(f"{PROG}: note: {'stdin' if name == '-' else name} is not valid JSON, masked as text",
                  file=sys.stderr)
        rules = plan.placeholder_rules(placeholders)
        for key, p in zip(plan.items, placeholders, strict=True):
            mapping.setdefault(p, (rules.get(p, "?"), key[1]))
        counts.update(_kinds(plan))
        total += plan.count
        nbytes += len(content)
        if not args.check:
            try:
                stdout.write(masked)
                stdout.flush()
            except BrokenPipeError:
                return 0
    if not args.quiet:
        _print_summary(sys.stderr, counts, total, len(mapping), nbytes, mask_ms, load_ms, scanner.engine,
                       len(names))
    if args.show_mapping:
        _print_mapping(sys.stderr, mapping)
    if args.check and total:
        if not args.quiet:
            print(f"{PROG}: --check: {total} identifiers would be masked", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
