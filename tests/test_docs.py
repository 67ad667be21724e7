"""The README's configuration reference lists exactly the options the addon declares, with their defaults."""

from __future__ import annotations

import re
from pathlib import Path

from mitmproxy.test import taddons

from aws_masker.addon import AwsMasker

README = Path(__file__).resolve().parent.parent / "README.md"


def documented_options() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `(masker_\w+)` \| ([^|]*) \|", section,
                                                               re.MULTILINE)}


def declared_options() -> dict[str, object]:
    addon = AwsMasker()
    with taddons.context(addon) as tctx:
        return {name: tctx.options._options[name].default for name in tctx.options.keys()
                if name.startswith("masker_")}


def render(default: object) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, (list, tuple)):
        return ", ".join(default) if default else "(none)"
    if default == "":
        return "(empty)"
    return str(default)


def test_every_declared_option_is_documented_with_its_default() -> None:
    documented = documented_options()
    declared = declared_options()
    assert sorted(documented) == sorted(declared), "README configuration table and declared options differ"
    for name, default in declared.items():
        assert documented[name] == render(default), f"{name}: README says {documented[name]!r}"


def test_readme_shows_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "scripts/run" in text and "scripts/test" in text
    for doc in ("docs/security.md", "docs/operations.md"):
        assert doc in text and (README.parent / doc).exists()
