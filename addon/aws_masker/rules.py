"""The rule catalog: loading, validating and self-checking YAML rule files.

A rule file holds ``rules:``, a list of mappings::

    rules:
      - id: aws-ec2-instance-id                # unique, [a-z0-9-]
        description: EC2 instance ID            # what it finds and why it is identifying
        regex: '\\bi-(?:[0-9a-f]{8}|[0-9a-f]{17})\\b'
        keywords: ["i-"]                        # optional: the rule only runs where one occurs (prefilter)
        placeholder: EC2_INSTANCE               # kind of the whole match, or of the group named `mask`
        groups: {account: ACCOUNT}              # optional: mask these named groups (kinds may use {group})
        validate: ipv4                          # optional: a named check on the masked value
        allow: ["i-00000000"]                   # optional: exact values never masked
        follows:                                # optional: only right after a hit of these rules, with
          rules: [aws-arn-iam]                  #   nothing but `gap` between (list elements: "…", "…")
          gap: '["'']?[ \\t]*,[ \\t]*["'']?'
        examples:                               # must match; `masked` lists the exact masked substrings
          - text: "instance i-0123456789abcdef0 is running"
            masked: ["i-0123456789abcdef0"]
          - "i-01234567"                        # shorthand: the whole text is masked
        counterexamples:                        # must not mask anything
          - "multi-line"

Regexes are Python ``re`` syntax applied to UTF-8 bytes. To run on the fast engine they must also be valid
Hyperscan once their look-arounds and word boundaries are set aside (Hyperscan only locates candidates; the
Python regex decides): no back-references, possessive quantifiers or conditionals (a rule that is not is
scanned with Python ``re`` instead and works the same, only slower).
"""

from __future__ import annotations

import ipaddress
import re
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .placeholders import valid_kind


def _builtin_rules_dir() -> Path:
    """rules/ of the checkout this package runs from, else the copy a wheel installs under
    <prefix>/share/aws-masker/rules."""
    checkout = Path(__file__).resolve().parent.parent.parent / "rules"
    if checkout.is_dir():
        return checkout
    return Path(sysconfig.get_paths()["data"]) / "share" / "aws-masker" / "rules"


BUILTIN_RULES_DIR = _builtin_rules_dir()

ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
TEMPLATE_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
KNOWN_KEYS = {
    "id", "description", "regex", "keywords", "placeholder", "groups", "validate", "allow",
    "examples", "counterexamples", "follows",
}


class RuleError(ValueError):
    """A rule file or rule is unusable; the message names the file, the rule and the problem."""


# --- validators: return False to leave a candidate unmasked --------------------------------------------

_OCTET = rb"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rb"\.".join([_OCTET] * 4))


def _ipv4(value: bytes) -> bool:
    """A dotted IPv4 address that identifies a host: not loopback, 0.0.0.0, multicast, reserved (240/4,
    broadcast included) or link-local (169.254/16, the instance metadata address among them). Octets have
    no leading zeros (010.1.1.1 is not an address)."""
    m = _IPV4.fullmatch(value)
    if m is None:
        return False
    a = int(m[1])
    return not (a == 127 or a >= 224 or (a == 169 and m[2] == b"254") or value == b"0.0.0.0")


def _ipv6(value: bytes) -> bool:
    try:
        ip = ipaddress.IPv6Address(value.decode("ascii"))
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local)


def _not_repeated(value: bytes) -> bool:
    """Reject values made of one repeated character (000000000000, xxxxxxxx...)."""
    return len(set(value)) > 1


VALIDATORS: dict[str, Callable[[bytes], bool]] = {
    "ipv4": _ipv4,
    "ipv6": _ipv6,
    "not_repeated": _not_repeated,
}


@dataclass(frozen=True)
class Example:
    text: str
    masked: tuple[str, ...]


# An inline flag group that turns case-insensitivity on: (?i:…), (?ai-m:…); may also match where a "(?i"
# is escaped (then keywords are only looked for more widely than needed).
_CASELESS_PART = re.compile(r"\(\?[aLmsux]*i")


@dataclass
class Rule:
    id: str
    description: str
    regex: str
    placeholder: str
    source: str
    keywords: tuple[bytes, ...] = ()
    groups: dict[str, str] = field(default_factory=dict)
    validate: Callable[[bytes], bool] | None = None
    allow: frozenset[bytes] = frozenset()
    examples: tuple[Example, ...] = ()
    counterexamples: tuple[str, ...] = ()
    follows: tuple[str, ...] = ()  # ids of the rules whose hit must come right before this rule's
    gap: re.Pattern[bytes] | None = None  # ... with only this between them (matched whole)
    compiled: re.Pattern[bytes] = field(init=False, repr=False)
    # the regex ignores case, all of it or a part (?i:…): its keywords are then looked for ignoring case too
    case_insensitive: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.compiled = re.compile(self.regex.encode("utf-8"))
        self.case_insensitive = bool(self.compiled.flags & re.IGNORECASE) or \
            _CASELESS_PART.search(self.regex) is not None

    def targets(self) -> dict[str, str]:
        """Group name (``""`` for the whole match) -> placeholder kind (possibly a ``{group}`` template)."""
        if self.groups:
            return dict(self.groups)
        if "mask" in self.compiled.groupindex:
            return {"mask": self.placeholder}
        return {"": self.placeholder}


def _fail(source: str, rule_id: str | None, problem: str) -> RuleError:
    where = f"{source}: rule {rule_id!r}" if rule_id else source
    return RuleError(f"{where}: {problem}")


def _as_str_list(value: object, what: str, source: str, rid: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, rid, f"{what} must be a list of strings")
    return list(value)


def parse_rule(raw: object, source: str, index: int) -> Rule:
    if not isinstance(raw, dict):
        raise _fail(source, None, f"rule #{index + 1} is not a mapping")
    rid = raw.get("id")
    if not isinstance(rid, str) or not ID_RE.match(rid):
        raise _fail(source, None, f"rule #{index + 1}: id {rid!r} missing or not of the form [a-z0-9-]+")
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise _fail(source, rid, f"unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("description", "regex"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise _fail(source, rid, f"{key} is missing or empty")
    regex = raw["regex"]
    try:
        compiled = re.compile(regex.encode("utf-8"))
    except re.error as e:
        raise _fail(source, rid, f"regex does not compile: {e}") from None
    if compiled.match(b""):
        raise _fail(source, rid, "regex matches the empty string")

    groups = raw.get("groups") or {}
    if not isinstance(groups, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in groups.items()):
        raise _fail(source, rid, "groups must map group names to placeholder kinds")
    placeholder = raw.get("placeholder")
    if not groups and not isinstance(placeholder, str):
        raise _fail(source, rid, "placeholder (the kind, e.g. EC2_INSTANCE) is missing")
    kinds = dict(groups) if groups else {"": str(placeholder)}
    for gname, kind in kinds.items():
        if gname and gname not in compiled.groupindex:
            raise _fail(source, rid, f"groups names {gname!r}, which the regex does not define")
        for ref in TEMPLATE_RE.findall(kind):
            if ref not in compiled.groupindex:
                raise _fail(source, rid, f"kind {kind!r} refers to group {ref!r}, which the regex lacks")
        if not valid_kind(TEMPLATE_RE.sub("X", kind)):
            raise _fail(source, rid, f"placeholder kind {kind!r} must be UPPER_CASE like EC2_INSTANCE")

    validate = None
    if raw.get("validate") is not None:
        name = raw["validate"]
        if name not in VALIDATORS:
            raise _fail(source, rid, f"validate {name!r} is unknown (known: {', '.join(sorted(VALIDATORS))})")
        validate = VALIDATORS[name]

    follows: tuple[str, ...] = ()
    gap = None
    if raw.get("follows") is not None:
        spec = raw["follows"]
        if not isinstance(spec, dict) or set(spec) != {"rules", "gap"} or not isinstance(spec["gap"], str):
            raise _fail(source, rid, "follows must be a mapping with rules (a list of rule ids) and gap "
                                     "(a regex)")
        follows = tuple(_as_str_list(spec["rules"], "follows.rules", source, rid))
        if not follows:
            raise _fail(source, rid, "follows.rules is empty")
        try:
            gap = re.compile(spec["gap"].encode("utf-8"))
        except re.error as e:
            raise _fail(source, rid, f"follows.gap does not compile: {e}") from None

    examples = []
    for ex in raw.get("examples") or []:
        if isinstance(ex, str):
            examples.append(Example(ex, (ex,)))
        elif isinstance(ex, dict) and isinstance(ex.get("text"), str):
            examples.append(Example(ex["text"], tuple(_as_str_list(ex.get("masked"), "masked", source, rid))))
        else:
            raise _fail(source, rid, "each example is a string or {text: ..., masked: [...]}")
    if not examples:
        raise _fail(source, rid, "has no examples (at least one text it must mask)")

    return Rule(
        id=rid,
        description=raw["description"].strip(),
        regex=regex,
        placeholder=str(placeholder or ""),
        source=source,
        keywords=tuple(k.encode("utf-8") for k in _as_str_list(raw.get("keywords"), "keywords", source, rid)),
        groups=dict(groups),
        validate=validate,
        allow=frozenset(a.encode("utf-8") for a in _as_str_list(raw.get("allow"), "allow", source, rid)),
        examples=tuple(examples),
        counterexamples=tuple(_as_str_list(raw.get("counterexamples"), "counterexamples", source, rid)),
        follows=follows,
        gap=gap,
    )


def load_file(path: Path) -> list[Rule]:
    source = str(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RuleError(f"{source}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RuleError(f"{source}: not valid YAML: {e}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise RuleError(f"{source}: expected a mapping with a 'rules:' list")
    return [parse_rule(raw, source, i) for i, raw in enumerate(doc["rules"])]


def rule_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if path.is_file():
        return [path]
    raise RuleError(f"{path}: no such rule file or folder")


def load_rules(extra: Iterable[str | Path] = (), builtin: bool = True) -> list[Rule]:
    """Load the built-in catalog plus ``extra`` files/folders. Rule ids must be unique across all of them."""
    paths: list[Path] = []
    if builtin:
        paths.extend(rule_files(BUILTIN_RULES_DIR))
    for p in extra:
        paths.extend(rule_files(Path(p).expanduser()))
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for path in paths:
        for rule in load_file(path):
            if rule.id in seen:
                raise _fail(rule.source, rule.id, f"id already defined in {seen[rule.id]}")
            seen[rule.id] = rule.source
            rules.append(rule)
    for rule in rules:
        for other in rule.follows:
            if other not in seen:
                raise _fail(rule.source, rule.id, f"follows names rule {other!r}, which is not loaded")
    return rules


def with_followed(rule: Rule, rules: Sequence[Rule]) -> list[Rule]:
    """``rule`` and the rules it follows (from ``rules``, in their order): what its examples are checked
    with, since on its own it never matches."""
    return [r for r in rules if r.id in rule.follows and r is not rule] + [rule]


def check_examples(rules: Sequence[Rule], scan: Callable[[Rule, bytes], list[bytes]]) -> list[str]:
    """Run every rule alone on its examples; return a list of problems (empty when all hold)."""
    problems = []
    for rule in rules:
        for ex in rule.examples:
            got = sorted(v.decode("utf-8", "replace") for v in scan(rule, ex.text.encode("utf-8")))
            if got != sorted(ex.masked):
                problems.append(f"{rule.source}: rule {rule.id!r}: example {ex.text!r} masked {got}, "
                                f"expected {sorted(ex.masked)}")
        for cex in rule.counterexamples:
            got = [v.decode("utf-8", "replace") for v in scan(rule, cex.encode("utf-8"))]
            if got:
                problems.append(f"{rule.source}: rule {rule.id!r}: counterexample {cex!r} masked {got}")
    return problems
