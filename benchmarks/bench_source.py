"""What is measured, on what: the wandbtune sources and the machine.

wandbtune is copied into the benchmark's temporary directory at the start and
imported from there by the driver and every Ray worker (``snapshot_package``),
so that edits to the working tree during a long run do not mix two versions
into one table. The report's header names the git commit, whether
``wandbtune/`` had uncommitted changes and a sha1 of the snapshot's sources.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def git_state() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "wandbtune"],
            cwd=os.path.dirname(HERE),
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"git {sha}" + (" + uncommitted changes in wandbtune/" if dirty else "")
    except Exception:  # noqa: BLE001
        return "git ?"


def package_dir() -> str:
    """The wandbtune package the current environment would import (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("wandbtune")
    if spec is None or not spec.origin:
        raise SystemExit("wandbtune is not installed: pip install -e . first")
    return os.path.dirname(spec.origin)


def fingerprint(pkg: str) -> str:
    """sha1 over the package's .py files (names and contents), 12 hex digits."""
    import hashlib

    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(pkg, "*.py"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:12]


def snapshot_package(pkg: str, tmp: str) -> str:
    """Copy wandbtune into ``tmp`` and import it from there, in this process and
    (through PYTHONPATH, set before ray.init) in every Ray worker: edits to the
    working tree during a long run do not mix two versions into one table."""
    root = os.path.join(tmp, "src")
    shutil.copytree(
        pkg,
        os.path.join(root, "wandbtune"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return root


def worker_import_path() -> str:
    """Where a Ray worker imports wandbtune from."""
    import ray

    @ray.remote(num_cpus=0)
    def where() -> str:
        import wandbtune

        return os.path.dirname(wandbtune.__file__)

    return ray.get(where.remote())


def describe_source(source: dict[str, Any], live: bool) -> str:
    """The header's words for where wandbtune came from."""
    if live:
        desc = f"{source['git']}, live tree"
        if source["sha1_end"] != source["sha1_start"]:
            desc += " (**changed during the run**)"
    else:
        desc = (
            f"{source['git']}, snapshot taken at start, "
            f"sources sha1 {source['sha1_start']}"
        )
        if source["sha1_end"] != source["sha1_start"]:
            desc += "; the working tree changed during the run, not the snapshot"
    return desc


def machine_line() -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = "?"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                    break
    except OSError:
        pass
    import ray
    import wandb

    import wandbtune

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "wandb": wandb.__version__,
        "wandbtune": wandbtune.__version__,
    }
