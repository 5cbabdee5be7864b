"""A W&B-compatible server on this machine, and a proxy that breaks it on demand.

The server is openwandb (https://pypi.org/project/openwandb/, non-commercial
licence: used by the tests and benchmarks only, never by wandbtune itself). It
speaks W&B's GraphQL and file-stream protocols well enough for the real wandb
client, and keeps runs, config, summary and history rows in one SQLite file,
which ``Store`` reads directly (openwandb answers few of W&B's public-API
queries).

``openwandb_executable()`` installs it into ``<repo>/.venv-openwandb`` when it
is missing (a fresh CI machine), once, under a file lock.

One compatibility fix is applied when the server starts (``resume_fix``): W&B
answers a resuming client's ``wandbConfig(keys: ["t"])`` from the run's
``_wandb`` config, and gives the run's ``historyTail`` and ``eventsTail``;
openwandb answers ``{}`` and nothing, so the client never sees a run as
resumed (``run.resumed`` stays False, the summary is not restored, and the
step starts at 0 again). With the first alone, the client sees a resumed run
and fails to start it ("no events tail found"). The fix gives all three
answers as W&B does. Two more, always: openwandb rejects the empty
``operationName`` that wandb 0.31 sends with public-API queries (W&B ignores
it), and sets a run's state to "running" on any upsertBucket that names no
state (W&B keeps it): the best trial's tag goes through both.

``FaultProxy`` sits between the client and the server and can add latency,
answer 429 (with Retry-After), 5xx or 401, or stop answering altogether.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
OPENWANDB_VERSION = "0.5.25"
#: Where the tests install openwandb if it is not there (in .gitignore).
VENV = ROOT / ".venv-openwandb"
#: Set to an ``openwandb`` executable to use that one instead.
OVERRIDE_ENV_VAR = "WANDBTUNE_OPENWANDB"

#: An API key of W&B's shape; openwandb takes unknown keys as its admin's.
FAKE_KEY = "local-" + hashlib.sha1(b"wandbtune online tests").hexdigest()


# --- installing openwandb --------------------------------------------------------


def openwandb_executable(timeout: float = 900.0) -> Path:
    """The ``openwandb`` executable, installed into VENV first if missing.

    Two processes (pytest-xdist, two checkouts' CI) wait for each other on a
    lock file in the temp directory; a half-built venv is built again.
    """
    override = os.environ.get(OVERRIDE_ENV_VAR)
    if override:
        return Path(override)
    exe = VENV / "bin" / "openwandb"
    marker = VENV / ".wandbtune-installed"

    def ready() -> bool:
        return (
            exe.exists()
            and marker.exists()
            and marker.read_text().strip() == OPENWANDB_VERSION
        )

    if ready():
        return exe
    digest = hashlib.sha1(str(VENV).encode()).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"wandbtune-openwandb-{digest}.lock"
    deadline = time.monotonic() + timeout
    with open(lock_path, "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process holds {lock_path} (installing openwandb "
                        f"into {VENV}) for more than {timeout:.0f} s"
                    ) from None
                time.sleep(0.5)
        try:
            if ready():  # the other process installed it
                return exe
            _install(deadline)
            marker.write_text(OPENWANDB_VERSION)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if not ready():
        raise RuntimeError(f"openwandb is not in {VENV} after installing it")
    return exe


def _install(deadline: float) -> None:
    import shutil

    shutil.rmtree(VENV, ignore_errors=True)  # a half-built one
    log = Path(tempfile.gettempdir()) / f"wandbtune-openwandb-install-{os.getpid()}.log"
    steps = [
        # The python running the tests; without pip in the venv if this Python
        # has no ensurepip (pip is then installed from PyPI via the tests' pip).
        [sys.executable, "-m", "venv", str(VENV)],
        [
            str(VENV / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            f"openwandb=={OPENWANDB_VERSION}",
        ],
    ]
    with open(log, "w") as out:
        for step in steps:
            left = max(10.0, deadline - time.monotonic())
            done = subprocess.run(
                step, stdout=out, stderr=subprocess.STDOUT, timeout=left, check=False
            )
            if done.returncode != 0:
                out.flush()
                tail = log.read_text()[-3000:]
                raise RuntimeError(
                    f"installing openwandb failed: {' '.join(step)} exited with "
                    f"{done.returncode}:\n{tail}"
                )


# --- the server --------------------------------------------------------------------

#: Runs openwandb's CLI in its own venv, with the resume fix when asked. The
#: data directory, host and port come in the environment (openwandb's config
#: reads them at import).
_LAUNCHER = r"""
import json, os, sys

if os.environ.get("WANDBTUNE_RESUME_FIX") == "1":
    import openwandb.graphql_schema as schema
    from openwandb.config import FILES_DIR

    original = schema._run_to_type

    def _run_to_type(run):
        answer = original(run)
        try:
            config = json.loads(answer._config_json or "{}")
            own = (config.get("_wandb") or {}).get("value") or {}
            if isinstance(own, dict):
                # wandbConfig(keys) reads the run's _wandb config, as W&B's does
                answer._config_json = json.dumps({**own, **config})
            history = (
                FILES_DIR / answer._entity_name / answer._project_name
                / answer.name / "wandb-history.jsonl"
            )
            lines = []
            if history.exists():
                lines = [x for x in history.read_text().splitlines() if x.strip()]
            answer.history_line_count = len(lines)
            answer.history_tail = json.dumps(lines[-1:])
            answer.events_tail = json.dumps([])  # W&B's client needs one
        except Exception as exc:  # the unfixed answer, as openwandb gives it
            print("resume fix failed:", repr(exc), file=sys.stderr)
        return answer

    schema._run_to_type = _run_to_type

# Two more differences from W&B's server, for the public API's calls (the
# best trial's tag): wandb 0.31 sends ``"operationName": ""`` with every
# public-API query, which W&B ignores and strawberry (openwandb's GraphQL)
# rejects; and openwandb sets a run's state to "running" on every
# upsertBucket that names no state, where W&B leaves the state as it is.
import strawberry.http as strawberry_http

_request_init = strawberry_http.GraphQLRequestData.__init__


def _request_data_init(self, *args, **kwargs):
    _request_init(self, *args, **kwargs)
    if self.operation_name == "":
        object.__setattr__(self, "operation_name", None)


strawberry_http.GraphQLRequestData.__init__ = _request_data_init

import openwandb.graphql_schema as schema_module
from openwandb import database

(_upsert,) = [
    f for f in schema_module.Mutation.__strawberry_definition__.fields
    if f.python_name == "upsert_bucket"
]
_upsert_bucket = _upsert.base_resolver.wrapped_func


def _upsert_bucket_keeping_state(*args, **kwargs):
    given = kwargs.get("input")
    run_id = kwargs.get("name") or kwargs.get("id")
    state = kwargs.get("state")
    if given is not None:
        run_id = given.name or given.id or run_id
        state = given.state or state
    before = database.get_run(run_id) if run_id and not state else None
    answer = _upsert_bucket(*args, **kwargs)
    if before is not None:
        with database.get_db() as conn:
            conn.execute(
                "UPDATE runs SET state = ? WHERE run_id = ?", (before["state"], run_id)
            )
    return answer


_upsert.base_resolver.wrapped_func = _upsert_bucket_keeping_state

from openwandb.cli import main

sys.argv = ["openwandb", *sys.argv[1:]]
main()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class StoredRun:
    """One run as the server stored it."""

    run_id: str
    project: str
    name: str
    state: str
    #: the run's config without W&B's own ``_wandb`` entry, values unwrapped
    config: dict[str, Any]
    summary: dict[str, Any]
    tags: list[str] = field(default_factory=list)
    #: when the server created the run (its clock, seconds since the epoch)
    created_at: float = 0.0


class Store:
    """Reads what reached the server from its SQLite file."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(str(self.db_path), timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    def runs(self, project: Optional[str] = None) -> dict[str, StoredRun]:
        """Every run (of ``project``), by run id."""
        query = (
            "SELECT r.*, p.name AS project FROM runs r "
            "JOIN projects p ON p.id = r.project_id"
        )
        args: tuple[Any, ...] = ()
        if project is not None:
            query += " WHERE p.name = ?"
            args = (project,)
        with self._db() as conn:
            rows = conn.execute(query + " ORDER BY r.id", args).fetchall()
        return {row["run_id"]: _stored_run(row) for row in rows}

    def run(self, run_id: str) -> Optional[StoredRun]:
        with self._db() as conn:
            row = conn.execute(
                "SELECT r.*, p.name AS project FROM runs r "
                "JOIN projects p ON p.id = r.project_id WHERE r.run_id = ?",
                (run_id,),
            ).fetchone()
        return _stored_run(row) if row is not None else None

    def rows(self, run_id: str) -> list[dict[str, Any]]:
        """The run's history rows as they arrived, each with its ``_step``.

        The server keeps numeric values only (one database row per value); a
        history row is the values that arrived together at one step. A row
        sent twice for the same step comes back twice.
        """
        with self._db() as conn:
            values = conn.execute(
                "SELECT key, step, value FROM metrics WHERE run_id = ? ORDER BY id",
                (run_id,),
            ).fetchall()
        rows: list[dict[str, Any]] = []
        current: dict[str, Any] = {}
        for value in values:
            if current and (
                current["_step"] != value["step"] or value["key"] in current
            ):
                rows.append(current)
                current = {}
            current.setdefault("_step", value["step"])
            current[value["key"]] = value["value"]
        if current:
            rows.append(current)
        return rows

    def column(self, run_id: str, key: str) -> list[Any]:
        """One value's history, in the order it arrived."""
        return [row[key] for row in self.rows(run_id) if key in row]


def _stored_run(row: sqlite3.Row) -> StoredRun:
    config = {
        key: value.get("value") if isinstance(value, dict) else value
        for key, value in json.loads(row["config_json"] or "{}").items()
        if key != "_wandb"
    }
    return StoredRun(
        run_id=row["run_id"],
        project=row["project"],
        name=row["display_name"],
        state=row["state"],
        config=config,
        summary=json.loads(row["summary_json"] or "{}"),
        tags=json.loads(row["tags_json"] or "[]"),
        created_at=datetime.datetime.fromisoformat(
            row["created_at"].replace("Z", "+00:00")
        ).timestamp(),
    )


class OpenWandbServer:
    """openwandb serving ``data_dir`` on a free port of 127.0.0.1."""

    def __init__(self, data_dir: Path, *, resume_fix: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.resume_fix = resume_fix
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = Store(self.data_dir / "openwandb.db")
        self.log_path = self.data_dir / "server.log"
        self._process: Optional[subprocess.Popen[bytes]] = None

    def start(self, timeout: float = 60.0) -> OpenWandbServer:
        exe = openwandb_executable()
        python = exe.parent / "python"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "OPENWANDB_DATA_DIR": str(self.data_dir),
            "OPENWANDB_HOST": "127.0.0.1",
            "OPENWANDB_PORT": str(self.port),
            "OPENWANDB_LOG_LEVEL": "WARNING",
            "OPENWANDB_ALLOW_REGISTRATION": "false",
            "WANDBTUNE_RESUME_FIX": "1" if self.resume_fix else "0",
        }
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(var, None)  # the tests' own, not openwandb's venv's
        with open(self.log_path, "ab") as log:
            init = subprocess.run(
                [str(exe), "init", "--data-dir", str(self.data_dir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
            if init.returncode != 0:
                log.flush()
                raise RuntimeError(
                    f"openwandb init exited with {init.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            self._process = subprocess.Popen(
                [
                    str(python),
                    "-c",
                    _LAUNCHER,
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                ]
                + ["--host", "127.0.0.1", "-p", str(self.port)]
                + ["--log-level", "warning"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, killed in stop()
            )
        try:
            self._wait_until_up(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"openwandb exited with {self._process.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/api/v1/viewer")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"openwandb did not answer within {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def __enter__(self) -> OpenWandbServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the proxy ---------------------------------------------------------------------

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


@dataclass
class Seen:
    """One request that reached the proxy, and what it was answered."""

    method: str
    path: str
    #: the status the client got (None: the proxy never answered)
    status: Optional[int] = None
    #: the API key in its Authorization header, if any
    key: Optional[str] = None
    #: for a file-stream request: ``complete`` and ``exitcode`` as sent
    complete: Optional[bool] = None
    exitcode: Optional[int] = None


@dataclass
class _Rule:
    status: int
    remaining: Optional[int]  # None: for ever
    path: Optional[re.Pattern[str]]
    retry_after: Optional[float]
    body: bytes = b'{"error": "injected by the test proxy"}'


@dataclass
class _Faults:
    latency_s: float = 0.0
    reject_all: bool = False
    silent: bool = False
    silent_path: Optional[re.Pattern[str]] = None  # None: every path
    rules: list[_Rule] = field(default_factory=list)


class FaultProxy:
    """An HTTP proxy in front of ``upstream`` (a base URL) on 127.0.0.1.

    Faults apply to requests arriving after they are set, until ``reset()``:
    ``latency_s`` each way; ``answer(status, n)`` (429 with Retry-After, 5xx,
    ...) for the next ``n`` requests or every one matching a path pattern;
    ``reject_all()`` (401: a rejected key); ``stop_answering()`` (requests
    are read, never answered; their connections are closed at ``reset`` or
    ``stop``). ``seen`` lists every request. Bounded: at most
    ``max_connections`` at once (more are closed at once), upstream calls time
    out after ``upstream_timeout`` s, and ``stop()`` ends it all.
    """

    def __init__(
        self,
        upstream: str,
        *,
        max_connections: int = 64,
        upstream_timeout: float = 60.0,
    ) -> None:
        match = re.fullmatch(r"http://([^:/]+):(\d+)/?", upstream)
        if not match:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (match.group(1), int(match.group(2)))
        self.upstream_timeout = upstream_timeout
        self.seen: list[Seen] = []
        self._faults = _Faults()
        self._lock = threading.Lock()
        self._release = threading.Event()  # set: silent requests are dropped
        self._slots = threading.BoundedSemaphore(max_connections)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: Optional[threading.Thread] = None

    # --- faults ---

    def set_latency(self, seconds: float) -> None:
        with self._lock:
            self._faults.latency_s = seconds

    def answer(
        self,
        status: int,
        n: Optional[int] = None,
        *,
        path: Optional[str] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        """Answer ``status`` instead of the server to the next ``n`` requests
        (every one if None) whose path matches the regex ``path``."""
        rule = _Rule(
            status=status,
            remaining=n,
            path=re.compile(path) if path else None,
            retry_after=retry_after,
        )
        with self._lock:
            self._faults.rules.append(rule)

    def throttle(
        self,
        n: Optional[int] = None,
        *,
        retry_after: float = 1,
        path: Optional[str] = None,
    ) -> None:
        """429 Too Many Requests with Retry-After."""
        self.answer(429, n, path=path, retry_after=retry_after)

    def reject_all(self) -> None:
        """401 for every request, as for a rejected API key."""
        with self._lock:
            self._faults.reject_all = True

    def stop_answering(self, path: Optional[str] = None) -> None:
        """From now on accept and read requests (whose path matches the regex
        ``path``, if given), and never answer them."""
        with self._lock:
            self._release.clear()
            self._faults.silent = True
            self._faults.silent_path = re.compile(path) if path else None

    def reset(self) -> None:
        """No faults; requests left unanswered get their connection closed."""
        with self._lock:
            self._faults = _Faults()
            self._release.set()
            self.seen.clear()

    # --- what was seen ---

    def count(self, path: Optional[str] = None, status: Any = ...) -> int:
        """Requests seen (whose path matches ``path``; answered ``status``)."""
        pattern = re.compile(path) if path else None
        with self._lock:
            return sum(
                1
                for s in self.seen
                if (pattern is None or pattern.search(s.path))
                and (status is ... or s.status == status)
            )

    def keys_seen(self) -> set[str]:
        """The API keys requests to W&B's API (GraphQL, file streams)
        carried; "" for one without a key. Others carry none by design: file
        uploads (signed URLs on W&B's servers), wandb-core's telemetry."""
        with self._lock:
            return {
                s.key or ""
                for s in self.seen
                if s.path.startswith("/graphql") or s.path.endswith("/file_stream")
            }

    # --- life ---

    def start(self) -> FaultProxy:
        self._release.set()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="fault-proxy",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.closing = True
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()
        self._server.close_open_connections()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- in the handler threads ---

    def _record(self, seen: Seen) -> None:
        with self._lock:
            if len(self.seen) < 100_000:
                self.seen.append(seen)

    def _decide(self, path: str) -> tuple[Optional[_Rule], bool, float]:
        """(rule to answer with, stay silent, latency) for one request."""
        with self._lock:
            faults = self._faults
            if faults.reject_all:
                return (
                    _Rule(401, None, None, None, b'{"errors": ["unauthorized"]}'),
                    (False),
                    faults.latency_s,
                )
            if faults.silent and (
                faults.silent_path is None or faults.silent_path.search(path)
            ):
                return None, True, faults.latency_s
            for rule in faults.rules:
                if rule.path is not None and not rule.path.search(path):
                    continue
                if rule.remaining is None:
                    return rule, False, faults.latency_s
                if rule.remaining > 0:
                    rule.remaining -= 1
                    return rule, False, faults.latency_s
            return None, False, faults.latency_s


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's listen backlog is 5: a burst of connections (runs
    # finishing together upload their files side by side) overflowed it, and
    # the kernel dropped the extra SYNs, which clients resend only after 1 s.
    # Measured: the experiment run's finish took 1.4 s instead of 0.4 s in
    # about half the benchmark's fits. A W&B server's backlog is far larger.
    request_queue_size = 1024
    proxy: FaultProxy
    closing = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.closing or not self.proxy._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the bound: closed at once
            return
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)
            self.proxy._slots.release()

    def close_open_connections(self) -> None:
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away; nothing to report


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection is closed after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        seen = Seen(method=self.command, path=self.path, key=_key(self.headers))
        if self.path.endswith("/file_stream"):
            seen.complete, seen.exitcode = _file_stream_end(body, self.headers)
        proxy._record(seen)
        rule, silent, latency = proxy._decide(self.path)
        if silent:
            # Read, never answered: the client waits until it gives up, or
            # until the test resets the proxy, which closes the connection.
            proxy._release.wait()
            self.close_connection = True
            return
        if latency:
            time.sleep(latency)
        if rule is not None:
            extra = {}
            if rule.retry_after is not None:
                extra["Retry-After"] = f"{rule.retry_after:g}"
            self._reply(
                rule.status, [("Content-Type", "application/json")], rule.body, extra
            )
            seen.status = rule.status
            return
        try:
            status, headers, answer = self._forward(body)
        except OSError as exc:
            status, headers = 502, [("Content-Type", "text/plain")]
            answer = f"test proxy: upstream failed: {exc!r}".encode()
        if latency:
            time.sleep(latency)
        self._reply(status, headers, answer, {})
        seen.status = status

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(
            *proxy.upstream, timeout=proxy.upstream_timeout
        )
        try:
            # The Host header stays the proxy's: openwandb builds upload URLs
            # from it, so uploads come through the proxy too.
            conn.putrequest(
                self.command, self.path, skip_host=True, skip_accept_encoding=True
            )
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            answer = response.read()
            headers = [
                (k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP
            ]
            return response.status, headers, answer
        finally:
            conn.close()

    def _reply(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        extra: dict[str, str],
    ) -> None:
        self.send_response(status)
        for name, value in [*headers, *extra.items()]:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()


def _key(headers: Any) -> Optional[str]:
    auth = headers.get("Authorization", "")
    if auth.startswith("Basic "):
        try:
            user_key = base64.b64decode(auth[6:]).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        return user_key.split(":", 1)[1] if ":" in user_key else None
    if auth.startswith("Bearer "):
        return auth[7:].strip() or None
    return headers.get("X-Wandb-Api-Key") or None


def _file_stream_end(body: bytes, headers: Any) -> tuple[Optional[bool], Optional[int]]:
    try:
        if "gzip" in headers.get("Content-Encoding", "").lower():
            import gzip

            body = gzip.decompress(body)
        payload = json.loads(body or b"{}")
    except (ValueError, OSError):
        return None, None
    if not isinstance(payload, dict):
        return None, None
    exitcode = payload.get("exitcode")
    return bool(payload.get("complete")), exitcode if isinstance(
        exitcode, int
    ) else None


# --- what openwandb keeps beside its columns ---------------------------------------


@dataclass
class StoredRunFiles:
    """A run's tags and notes (database columns ``Store.run`` leaves out) and
    the files openwandb keeps for it on disk: the history lines as the file
    stream sent them (every value, not only the numbers of ``Store.rows``),
    the uploaded ``wandb-summary.json`` (nested values too, unlike the
    summary column, which keeps top-level scalars) and uploaded media."""

    tags: list[str]
    notes: str
    #: the run's directory under the server's data directory
    files_dir: Path

    def history(self) -> list[dict[str, Any]]:
        """Each line of ``wandb-history.jsonl``, in the order it arrived."""
        path = self.files_dir / "wandb-history.jsonl"
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def summary(self) -> Optional[dict[str, Any]]:
        """The uploaded ``wandb-summary.json``, or None if none was uploaded."""
        path = self.files_dir / "wandb-summary.json"
        if not path.exists():
            return None
        return dict(json.loads(path.read_text(encoding="utf-8")))

    def file(self, name: str) -> Optional[bytes]:
        """An uploaded file (``media/images/...``), or None."""
        path = self.files_dir / name
        return path.read_bytes() if path.is_file() else None


def stored_run_files(store: Store, run_id: str) -> Optional[StoredRunFiles]:
    """Tags, notes and files of the run ``run_id`` as ``store``'s server keeps
    them (files under ``<data dir>/files/<entity>/<project>/<run id>``)."""
    with store._db() as conn:
        row = conn.execute(
            "SELECT r.tags_json, r.notes, p.name AS project, t.name AS entity "
            "FROM runs r JOIN projects p ON p.id = r.project_id "
            "JOIN teams t ON t.id = p.team_id WHERE r.run_id = ?",
            (run_id,),
        ).fetchone()
    if row is None:
        return None
    files_dir = store.db_path.parent / "files" / row["entity"] / row["project"]
    return StoredRunFiles(
        tags=list(json.loads(row["tags_json"] or "[]")),
        notes=row["notes"] or "",
        files_dir=files_dir / run_id,
    )
