"""A wheel install (not a checkout) carries the built-in rule catalog and finds it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*cmd: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, check=False,
                          **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Without build isolation: setuptools comes from the dev environment, nothing is downloaded.
    r = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, REPO)
    assert r.returncode == 0, r.stderr
    [whl] = out.glob("aws_masker-*.whl")
    return whl


def test_wheel_ships_every_rule_file(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    where = "/share/aws-masker/rules/"
    shipped = sorted(n.split(where, 1)[1] for n in names if where in n)
    assert shipped == sorted(str(p.relative_to(REPO / "rules")) for p in (REPO / "rules").rglob("*.yaml"))
    assert "optional/bare-account-ids.yaml" in shipped


def test_installed_wheel_loads_the_catalog(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    python = venv / "bin" / "python"
    r = run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel)
    assert r.returncode == 0, r.stderr
    # The dependencies (pyyaml, hyperscan...) from this environment; the package itself from the wheel.
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import aws_masker.rules as r; print(r.__file__); print(r.BUILTIN_RULES_DIR); "
            "print(len(r.load_rules())); import aws_masker.script as s; print(type(s.addons[0]).__name__)")
    r = run(python, "-c", code, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    module, rules_dir, count, addon = r.stdout.split()
    assert addon == "AwsMasker"  # the entry script for mitmdump -s
    assert Path(module).is_relative_to(venv) and Path(rules_dir).is_relative_to(venv)
    assert int(count) == len(__import__("aws_masker.rules").rules.load_rules())
    masked = run(venv / "bin" / "aws-masker-mask", "-", input="instance i-0123456789abcdef0 in 10.1.2.3\n",
                 cwd=tmp_path, env=env)
    assert masked.returncode == 0, masked.stderr
    assert masked.stdout == "instance AWS_EC2_INSTANCE_0001 in AWS_IPV4_0001\n"
