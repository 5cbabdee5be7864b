"""Online: a W&B-compatible server on this machine, reached through a slow proxy.

``Online`` starts openwandb (``tests/wandb_server.py``'s ``OpenWandbServer``:
installed into ``.venv-openwandb`` if missing, or the ``openwandb`` named by
``WANDBTUNE_OPENWANDB``) and, in a process of its own, that file's
``FaultProxy`` in front of it, adding a latency to each request and to each
answer (a server across a network). The proxy runs in its own process so that
its threads take no GIL time from the Tune driver being measured. The trials
reach the proxy through ``WANDB_BASE_URL``, set by the benchmark before
``ray.init``.

``check_server_runs`` reads the server's store (its SQLite file): a run is
complete when it is there with state ``finished``, the trial's config, and a
row for every reported ``step``.

The proxy is this file run as a script::

    python bench_online.py --_proxy UPSTREAM_URL --latency SECONDS

It prints ``port N`` once listening; then answers each ``count`` line on its
stdin with one JSON line (requests seen so far, by answer), and stops at the
end of its stdin (so also when the benchmark dies).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
WANDB_SERVER_PY = os.path.join(os.path.dirname(HERE), "tests", "wandb_server.py")
DEFAULT_LATENCY_S = 0.04


def wandb_server_module() -> ModuleType:
    """``tests/wandb_server.py``, loaded from its file.

    Not imported as ``tests.wandb_server``: that would need the repository
    root on ``sys.path``, where its ``wandbtune/`` would shadow the snapshot
    the benchmark imports. The file imports only the standard library."""
    name = "bench_wandb_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, WANDB_SERVER_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Online:
    """The server (a child process of the benchmark) and the proxy process."""

    def __init__(self, data_dir: str, latency_s: float = DEFAULT_LATENCY_S) -> None:
        self.data_dir = data_dir
        self.latency_s = latency_s
        ws = wandb_server_module()
        self.key: str = ws.FAKE_KEY
        self.server = ws.OpenWandbServer(data_dir)
        self.store = self.server.store
        self.proxy: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> Online:
        try:
            self.server.start()
            self.proxy = subprocess.Popen(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--_proxy",
                    self.server.url,
                    "--latency",
                    str(self.latency_s),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.proxy.stdout is not None
            line = self.proxy.stdout.readline().split()
            if len(line) != 2 or line[0] != "port":
                raise RuntimeError(f"the proxy did not start: {line!r}")
            self.url = f"http://127.0.0.1:{int(line[1])}"
        except BaseException:
            self.stop()
            raise
        return self

    def requests(self) -> dict[str, int]:
        """Requests the proxy has seen so far: ``total`` and by answer."""
        if self.proxy is None or self.proxy.poll() is not None:
            return {"total": -1}
        assert self.proxy.stdin is not None and self.proxy.stdout is not None
        self.proxy.stdin.write("count\n")
        self.proxy.stdin.flush()
        counts: dict[str, int] = json.loads(self.proxy.stdout.readline())
        return counts

    def describe(self) -> dict[str, Any]:
        return {
            "server": "openwandb",
            "server_executable": str(wandb_server_module().openwandb_executable()),
            "server_url": self.server.url,
            "proxy_url": self.url,
            "latency_ms_each_way": self.latency_s * 1000,
        }

    def stop(self) -> None:
        """Stop the proxy (end of its stdin, then kill) and the server."""
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            try:
                if proxy.stdin is not None:
                    proxy.stdin.close()
                proxy.wait(timeout=15)
            except Exception:  # noqa: BLE001 - a broken pipe, a timeout
                proxy.kill()
                proxy.wait(timeout=10)
        self.server.stop()


def requests_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0)
        for k in sorted(set(before) | set(after))
        if after.get(k, 0) - before.get(k, 0)
    }


# --------------------------------------------------------------------------
# What reached the server
# --------------------------------------------------------------------------


def check_server_runs(
    store: Any, trials: dict[str, dict[str, Any]], reports: int
) -> dict[str, Any]:
    """Judge the server's run of every trial (trial id -> trial config).

    Complete: the run is there, its state is ``finished``, its config has the
    trial's ``n`` and ``x``, and its rows hold every ``step`` 0..reports-1."""
    out: dict[str, Any] = {
        "runs_expected": len(trials),
        "runs_found": 0,
        "runs_complete": 0,
        "runs_finished": 0,
        "runs_config_ok": 0,
        "missing_rows": 0,
        "duplicate_rows": 0,
        "states": {},
        "incomplete": [],
    }
    states: collections.Counter[str] = collections.Counter()
    for tid, config in sorted(trials.items()):
        run = store.run(tid)
        if run is None:
            out["missing_rows"] += reports
            states["(no run)"] += 1
            out["incomplete"].append({"trial_id": tid, "run": None})
            continue
        out["runs_found"] += 1
        states[run.state] += 1
        steps = [int(s) for s in store.column(tid, "step")]
        missing = sorted(set(range(reports)) - set(steps))
        duplicates = len(steps) - len(set(steps))
        config_ok = all(run.config.get(k) == config.get(k) for k in ("n", "x"))
        finished = run.state == "finished"
        out["runs_finished"] += finished
        out["runs_config_ok"] += config_ok
        out["missing_rows"] += len(missing)
        out["duplicate_rows"] += duplicates
        if finished and config_ok and not missing:
            out["runs_complete"] += 1
        else:
            out["incomplete"].append(
                {
                    "trial_id": tid,
                    "state": run.state,
                    "rows": len(steps),
                    "missing_steps": len(missing),
                    "config_ok": config_ok,
                }
            )
    out["states"] = dict(states)
    return out


# --------------------------------------------------------------------------
# The proxy process
# --------------------------------------------------------------------------


def proxy_main(upstream: str, latency_s: float) -> None:
    proxy = wandb_server_module().FaultProxy(upstream).start()
    try:
        proxy.set_latency(latency_s)
        print(f"port {proxy.port}", flush=True)
        for line in sys.stdin:
            if line.strip() == "count":
                seen = list(proxy.seen)
                by: collections.Counter[str] = collections.Counter(
                    "not_answered_yet" if s.status is None else f"http_{s.status}"
                    for s in seen
                )
                print(json.dumps({"total": len(seen), **by}), flush=True)
    finally:
        proxy.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the benchmark's latency proxy")
    parser.add_argument("--_proxy", required=True, help="the server's base URL")
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY_S)
    args = parser.parse_args(argv)
    proxy_main(args._proxy, args.latency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
