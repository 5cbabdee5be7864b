"""The version gate: outside the supported range, ``import wandbtune`` fails
with a message naming the installed and supported versions and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
