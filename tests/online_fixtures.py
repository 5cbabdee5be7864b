"""Fixtures for the online tests: a W&B-compatible server on this machine, the
fault proxy in front of it, and Ray started with the proxy's URL as
``WANDB_BASE_URL`` (see tests/wandb_server.py).

Import the fixtures into a test module with
``from tests.online_fixtures import *  # noqa: F401,F403``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.wandb_server import FAKE_KEY, FaultProxy, OpenWandbServer, Store

__all__ = ["Online", "online", "proxy", "wandb_server"]


@pytest.fixture(scope="module")
def wandb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenWandbServer]:
    """openwandb on a free port of 127.0.0.1 for the whole module (installed
    into .venv-openwandb first if missing); stopped at the end, even after a
    failure."""
    server = OpenWandbServer(tmp_path_factory.mktemp("openwandb"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Online:
    """What an online test has: the server (through the proxy) and its store."""

    server: OpenWandbServer
    proxy: FaultProxy
    #: the URL the trials use: the proxy's
    url: str
    store: Store
    key: str = FAKE_KEY


@pytest.fixture(scope="module")
def online(
    wandb_server: OpenWandbServer, request: pytest.FixtureRequest
) -> Iterator[Online]:
    """The server behind the fault proxy, and Ray started with
    ``WANDB_BASE_URL`` = the proxy in the driver's environment, as a user's
    ``export WANDB_BASE_URL=...`` before running a sweep script would set it
    (Ray's processes on this machine inherit it)."""
    import ray

    from tests.conftest import start_ray

    proxy = FaultProxy(wandb_server.url).start()
    before = os.environ.get("WANDB_BASE_URL")
    os.environ["WANDB_BASE_URL"] = proxy.url
    try:
        ray_started_before = ray.is_initialized()
        request.getfixturevalue("ray_session")  # the module's Ray, shut down last
        if ray_started_before:
            start_ray()  # Ray's processes take the environment as it is now
        yield Online(
            server=wandb_server, proxy=proxy, url=proxy.url, store=wandb_server.store
        )
    finally:
        proxy.stop()
        if before is None:
            os.environ.pop("WANDB_BASE_URL", None)
        else:
            os.environ["WANDB_BASE_URL"] = before


@pytest.fixture
def proxy(online: Online) -> Iterator[FaultProxy]:
    """The module's proxy, without faults and with nothing seen, for one test;
    faults are cleared again after it."""
    online.proxy.reset()
    try:
        yield online.proxy
    finally:
        online.proxy.reset()


def ray_worker_logs(pid: int) -> str:
    """What the Ray worker process ``pid`` wrote to its stdout and stderr."""
    import ray

    node = ray._private.worker._global_node  # where this Ray session logs
    logs = Path(node.get_logs_dir_path())
    return "".join(
        path.read_text(errors="replace")
        for pattern in (f"worker-*-{pid}.err", f"worker-*-{pid}.out")
        for path in sorted(logs.glob(pattern))
    )


def with_key(**kwargs: Any) -> dict[str, Any]:
    """Decorator/callback arguments for an online run with the tests' key."""
    return {"api_key": FAKE_KEY, "mode": "online", **kwargs}
