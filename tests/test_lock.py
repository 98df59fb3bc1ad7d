"""The development environment is locked: `.venv` holds exactly what requirements/dev.txt names."""

from __future__ import annotations

import configparser
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "dev.txt"


def _locked() -> dict[str, str]:
    """name → version of every line of the lock whose marker holds on this interpreter."""
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        requirement, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        name, _, version = requirement.strip().partition("==")
        assert version, f"{LOCK.name}: {line!r} is not pinned with =="
        pins[canonicalize_name(name)] = version.strip()
    return pins


def test_the_lock_pins_every_requirement_of_setup_cfg() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    options = config["options"]
    lines = options["install_requires"].splitlines()
    for value in config["options.extras_require"].values():
        lines += value.splitlines()
    locked = _locked()
    for line in filter(None, (line.strip() for line in lines)):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is required by setup.cfg but not in {LOCK.name}: run make lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={locked[name]}, outside setup.cfg's {requirement.specifier}: "
            "run make lock")


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="checks the project's own .venv (make install); this interpreter is another")
def test_the_venv_holds_exactly_the_locked_versions() -> None:
    wrong = []
    for name, version in sorted(_locked().items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: locked {version}, not installed")
            continue
        if canonicalize_name(installed) != canonicalize_name(version) and installed != version:
            wrong.append(f"{name}: locked {version}, installed {installed}")
    assert not wrong, "the .venv differs from the lock (run make install):\n" + "\n".join(wrong)


def test_the_lock_names_the_tools_that_broke_a_fresh_clone() -> None:
    locked = _locked()
    for name in ("mypy", "ruff", "redis", "celery", "kombu", "django", "pytest", "pip", "setuptools"):
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", locked.get(name, "")), f"{name} is not locked"
