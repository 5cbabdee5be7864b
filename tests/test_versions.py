"""The version gate: outside the supported range, ``import wandbtune`` fails
with a message naming the installed and supported versions and the fix. And the
supported versions are the same in every place that states them: pyproject.toml,
the gate, the README and the oldest set's pins (constraints/oldest.txt)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from wandbtune import _compat
from wandbtune._compat import UnsupportedVersionError, check_versions


@pytest.mark.parametrize(
    ("ray_version", "wandb_version"),
    [
        ("2.30.0", "0.19.10"),  # the oldest supported
        (_compat.RAY_TESTED, _compat.WANDB_TESTED),  # the newest tested
        ("2.61.0rc1", "0.32.0.dev1"),  # newer: accepted while the private API holds
        ("3.0.0", "1.0.0"),
    ],
)
def test_supported_versions_pass(ray_version, wandb_version):
    check_versions(ray_version, wandb_version)


@pytest.mark.parametrize(
    ("ray_version", "wandb_version", "fix"),
    [
        ("2.29.1", "0.31.0", 'pip install "ray[tune]>=2.30"'),
        ("2.9.3", "0.31.0", 'pip install "ray[tune]>=2.30"'),  # 2.9 < 2.30
        ("2.60.0", "0.19.9", 'pip install "wandb>=0.19.10"'),
        ("2.60.0", "0.18.7", 'pip install "wandb>=0.19.10"'),
        ("2.60.0", None, "wandb is not installed"),
        ("unknown", "0.31.0", 'pip install "ray[tune]>=2.30"'),
    ],
)
def test_unsupported_versions_name_installed_supported_and_fix(
    ray_version, wandb_version, fix
):
    with pytest.raises(UnsupportedVersionError) as raised:
        check_versions(ray_version, wandb_version)
    message = str(raised.value)
    assert f"ray {ray_version}" in message
    assert "ray[tune] >= 2.30 (tested up to" in message
    assert "wandb >= 0.19.10 (tested up to" in message
    assert fix in message
    assert isinstance(raised.value, ImportError)


def _import_wandbtune_after(prelude: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", prelude + "\nimport wandbtune"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_old_ray_fails_the_import_not_a_trial():
    done = _import_wandbtune_after("import ray; ray.__version__ = '2.24.0'")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("wandbtune._compat.UnsupportedVersionError:")
    assert "installed: ray 2.24.0" in last
    assert 'pip install "ray[tune]>=2.30"' in last


def test_a_ray_whose_private_api_moved_fails_the_import_naming_it():
    done = _import_wandbtune_after(
        "import ray.train._internal.session as s; del s.get_session"
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "UnsupportedVersionError: wandbtune cannot use this Ray" in last
    assert "get_session" in last
    assert f"installed: ray {_import_version()}" in last


def _import_version() -> str:
    import ray

    return ray.__version__


# The supported versions are written in several places; these tests fail when
# one of them moves without the others.

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _floor(specifier: str) -> Version:
    """The version of the one ``>=`` in a specifier set such as ``">=2.30"``."""
    floors = [s.version for s in SpecifierSet(specifier) if s.operator == ">="]
    assert len(floors) == 1, f"expected one >= in {specifier!r}"
    return Version(floors[0])


def _pyproject_floors() -> dict[str, Version]:
    floors = {}
    for line in _pyproject()["project"]["dependencies"]:
        requirement = Requirement(line)
        floors[canonicalize_name(requirement.name)] = _floor(str(requirement.specifier))
    return floors


def _oldest_pins() -> dict[str, Version]:
    pins = {}
    text = (ROOT / "constraints" / "oldest.txt").read_text(encoding="utf-8")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (pin,) = requirement.specifier
            assert pin.operator == "==", f"not a pin: {line!r}"
            pins[canonicalize_name(requirement.name)] = Version(pin.version)
    return pins


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _readme_summary() -> dict[str, str]:
    """The first paragraph's "Works with Ray 2.30 to 2.60 and wandb ..."."""
    text = re.sub(r"\s+", " ", _readme())
    found = re.search(
        r"Works with Ray (?P<ray_oldest>[\d.]+) to (?P<ray_newest>[\d.]+) and "
        r"wandb (?P<wandb_oldest>[\d.]+) to (?P<wandb_newest>[\d.]+) on "
        r"Python (?P<python_oldest>[\d.]+)\+",
        text,
    )
    assert found, "README's first paragraph no longer says 'Works with Ray ...'"
    return found.groupdict()


def _readme_table() -> dict[str, tuple[str, str]]:
    """The "Supported versions" table: row name -> (oldest, newest tested)."""
    lines = _readme().splitlines()
    start = lines.index("## Supported versions")
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and cells[1][:1].isdigit():
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def _assert_all_the_same(found: dict[str, Version]) -> None:
    places = "; ".join(f"{place}: {version}" for place, version in found.items())
    assert len(set(found.values())) == 1, f"the places disagree: {places}"


@pytest.mark.parametrize(
    ("package", "gate_floor", "readme_row"),
    [
        ("ray", _compat.RAY_MIN, "ray[tune]"),
        ("wandb", _compat.WANDB_MIN, "wandb"),
    ],
)
def test_the_oldest_ray_and_wandb_are_the_same_in_every_place_that_names_them(
    package, gate_floor, readme_row
):
    found = {
        "pyproject.toml dependencies": _pyproject_floors()[package],
        "wandbtune/_compat.py gate": Version(".".join(map(str, gate_floor))),
        "README first paragraph": Version(_readme_summary()[f"{package}_oldest"]),
        "README Supported versions": Version(_readme_table()[readme_row][0]),
        "constraints/oldest.txt pin": _oldest_pins()[package],
    }
    _assert_all_the_same(found)


@pytest.mark.parametrize(
    ("package", "gate_tested", "readme_row"),
    [
        ("ray", _compat.RAY_TESTED, "ray[tune]"),
        ("wandb", _compat.WANDB_TESTED, "wandb"),
    ],
)
def test_the_newest_tested_ray_and_wandb_in_the_readme_are_those_of_the_gate(
    package, gate_tested, readme_row
):
    found = {
        "wandbtune/_compat.py tested": Version(gate_tested),
        "README first paragraph": Version(_readme_summary()[f"{package}_newest"]),
        "README Supported versions": Version(_readme_table()[readme_row][1]),
    }
    _assert_all_the_same(found)


def test_the_oldest_python_is_the_same_in_every_place_that_names_it():
    pyproject = _pyproject()
    ruff_target = re.fullmatch(r"py3(\d+)", pyproject["tool"]["ruff"]["target-version"])
    assert ruff_target, pyproject["tool"]["ruff"]["target-version"]
    # "Python 3.10+" in the first paragraph and in "Set up"
    readme_mentions = re.findall(r"Python (3\.\d+)\+", _readme())
    assert len(readme_mentions) >= 2
    found = {
        "pyproject.toml requires-python": _floor(
            pyproject["project"]["requires-python"]
        ),
        "ruff target-version": Version(f"3.{ruff_target.group(1)}"),
        "mypy python_version": Version(pyproject["tool"]["mypy"]["python_version"]),
        "README Supported versions": Version(_readme_table()["Python"][0]),
        **{
            f"README 'Python {mention}+' ({n})": Version(mention)
            for n, mention in enumerate(readme_mentions, 1)
        },
    }
    _assert_all_the_same(found)
