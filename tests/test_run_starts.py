"""What wandb does at every run's start that wandbtune spares a process
starting its second run, or its first: the list of installed packages (each
run's ``requirements.txt``) is made once per process and again when a package
is installed; W&B Launch is not imported to apply Launch inputs nobody
staged, and inputs that were staged are applied. Real wandb, offline, in a
process of its own; runs started the way wandbtune starts them
(``_run.start_run``, as the callback does in the driver and a reused trial
actor does for each of its trials)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

CHILD = r"""
import pathlib
import sys

import wandb.util

listings = []
listed = wandb.util.working_set


def counting():
    listings.append(1)
    return listed()


wandb.util.working_set = counting  # wandb's own listing, counted

from wandbtune._run import start_run
from wandbtune._settings import Settings

root, site = sys.argv[1], pathlib.Path(sys.argv[2])
sys.path.insert(0, str(site))


def run(n):
    started = start_run(
        Settings(project="packages"), exclusive=False, trial_id=f"run{n}",
        trial_name=f"run{n}", experiment="packages", config={}, dir=root,
    )
    started.finish()
    print("LISTINGS", n, len(listings), flush=True)


launch = "wandb.sdk.launch.inputs.internal"
imported_before = launch in sys.modules  # by neither 0.19.10 nor 0.31
run(0)
print("LAUNCH", imported_before, launch in sys.modules, flush=True)
run(1)
# A package installed while the process runs: its directory's mtime changes.
info = site / "wandbtune_fake-1.2.3.dist-info"
info.mkdir()
(info / "METADATA").write_text(
    "Metadata-Version: 2.1\nName: wandbtune-fake\nVersion: 1.2.3\n"
)
run(2)
run(3)
# Launch inputs staged before a run's start are applied to it, as by wandb.
from wandb.sdk.launch.inputs import internal

applied = []
apply = internal.StagedLaunchInputs.apply


def recording(self, staged_for):
    applied.append(staged_for.id)
    apply(self, staged_for)


internal.StagedLaunchInputs.apply = recording
internal.handle_run_config_input(include=["lr"])
run(4)
print("APPLIED", *applied, flush=True)
"""


def _requirements(root: Path, run_id: str) -> list[str]:
    (path,) = root.glob(f"wandb/offline-run-*-{run_id}/files/requirements.txt")
    return path.read_text().split()


def test_a_later_run_lists_no_packages_and_a_run_imports_no_unused_launch(tmp_path):
    root, site = tmp_path / "runs", tmp_path / "site"
    root.mkdir()
    site.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_SERVICE", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(site)],
        check=True,
        cwd=tmp_path,  # sys.path[0] is the working directory: keep it still
        env=env,
        timeout=180,
        capture_output=True,
        text=True,
    ).stdout
    listings = [int(line.split()[2]) for line in out.splitlines() if "LISTINGS" in line]
    # Listed at the first run, not again at the second; again after the
    # install, not again after that. (Without the cache: 1, 2, 3, 4, 5.)
    assert listings == [1, 1, 2, 2, 2], out
    wandb = f"wandb=={metadata.version('wandb')}"
    ray = f"ray=={metadata.version('ray')}"
    runs = [_requirements(root, f"run{n}") for n in range(4)]
    assert all(wandb in packages and ray in packages for packages in runs), runs
    # A run's start did not import W&B Launch's inputs module.
    (launch,) = [line.split()[1:] for line in out.splitlines() if "LAUNCH" in line]
    assert launch == ["False", "False"], out
    # and staged Launch inputs reached the next run.
    (applied,) = [line.split()[1:] for line in out.splitlines() if "APPLIED" in line]
    assert applied == ["run4"], out
    fake = "wandbtune-fake==1.2.3"
    assert [fake in packages for packages in runs] == [False, False, True, True]
    # The cached list is the one wandb makes: the same packages each time.
    assert sorted(runs[0]) == sorted(runs[1])
    assert sorted(runs[2]) == sorted([*runs[1], fake])
