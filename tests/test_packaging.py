"""What a user downloads works: tox commands point at real files, the sdist carries the tests,
docs and example project they need, the license is there, the first install line works today."""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_every_path_a_tox_env_runs_exists() -> None:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    envs = [s for s in tox.sections() if s == "testenv" or s.startswith("testenv:")]
    assert {"testenv", "testenv:django", "testenv:lint"} <= set(envs)
    checked = 0
    for env in envs:
        commands = tox.get(env, "commands", fallback="")
        # "{posargs: a b}" holds the default arguments: check them as paths too
        text = re.sub(r"\{posargs:?([^}]*)\}", r"\1", commands)
        for token in shlex.split(text):
            if "/" in token or token in ("celery_partitioning", "tests", "benchmarks",
                                         "example_project", "scripts"):
                assert (ROOT / token).exists(), f"[{env}] runs {token}, which does not exist"
                checked += 1
    assert checked >= 9


def test_the_license_is_mit_and_declared() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) celery-partitioning contributors\n")
    metadata = _setup_cfg()["metadata"]
    assert metadata["license"] == "MIT"
    # the SPDX expression alone: setuptools deprecates license classifiers beside it
    assert "License ::" not in metadata["classifiers"]


def test_no_extra_duplicates_a_hard_requirement() -> None:
    options = _setup_cfg()
    required = {re.split(r"[<>=\[]", line.strip())[0]
                for line in options["options"]["install_requires"].splitlines() if line.strip()}
    for extra, value in options["options.extras_require"].items():
        if extra == "test":
            continue
        names = {re.split(r"[<>=\[]", line.strip())[0] for line in value.splitlines() if line.strip()}
        assert not names & required, f"extra [{extra}] only repeats {names & required}"


def test_the_first_install_line_of_the_readme_works_from_a_checkout() -> None:
    first = next(line for line in (ROOT / "README.md").read_text().splitlines()
                 if line.startswith("pip install"))
    assert first.split("#")[0].split() in (["pip", "install", "."], ["pip", "install", "-e", "."])


def test_the_sdist_carries_the_tests_docs_and_example_project(tmp_path: Path) -> None:
    # Built with the PEP 517 hook of the setuptools at hand (no download, no isolation)
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    archive = tmp_path / result.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {"LICENSE", "README.md", "Makefile", "tox.ini", "ruff.toml", "setup.cfg",
              "pyproject.toml", "celery_partitioning/py.typed", "docs/testing.md",
              "docs/monitoring.md", "scripts/prometheus_status.py",
              "deploy/prometheus/celery-partitioning-alerts.yaml",
              "deploy/grafana/celery-partitioning.json"}
    for folder in ("tests", "example_project", "celery_partitioning", "benchmarks"):
        wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")
                   if "__pycache__" not in p.parts}
    wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / "celery_partitioning").rglob("*.lua")}
    assert wanted - names == set()
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".sqlite3"))]
