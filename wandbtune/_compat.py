"""Everything wandbtune takes from Ray's and W&B's private APIs, in one place
(but for the node actor's few W&B calls, in ``_node_actor``).

Ray moves these often (Train V2 became the default in 2.5x and made
``ray.train.report`` raise inside Tune). This module checks the installed
versions against the supported range and resolves each private name once, at
import, so an unsupported Ray or W&B fails ``import wandbtune`` with a message
that names the versions, instead of a trial failing deep inside.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Optional

import ray

#: The oldest versions wandbtune supports, and the newest it was tested with.
#: The floor is where a needed API first exists (see the README's "Supported
#: versions"); newer versions are accepted while the private API below is
#: still there.
RAY_MIN = (2, 30)
WANDB_MIN = (0, 19, 10)
RAY_TESTED = "2.60.0"
WANDB_TESTED = "0.31.0"


class UnsupportedVersionError(ImportError):
    """The installed Ray or W&B is outside what wandbtune supports."""


def _release(version: str) -> tuple[int, ...]:
    """``"2.30.0rc1"`` -> ``(2, 30, 0)``; () if it does not start with digits."""
    found = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in found.group().split(".")) if found else ()


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def supported_range() -> str:
    return (
        f"ray[tune] >= {_dotted(RAY_MIN)} (tested up to {RAY_TESTED}) and "
        f"wandb >= {_dotted(WANDB_MIN)} (tested up to {WANDB_TESTED})"
    )


def check_versions(ray_version: str, wandb_version: Optional[str]) -> None:
    """Raise UnsupportedVersionError unless both versions are supported."""
    installed = f"ray {ray_version}, wandb {wandb_version or '(not installed)'}"
    problems = []
    if wandb_version is None:
        problems.append(
            f'wandb is not installed: pip install "wandb>={_dotted(WANDB_MIN)}"'
        )
    elif _release(wandb_version) < WANDB_MIN:
        problems.append(f'pip install "wandb>={_dotted(WANDB_MIN)}"')
    if _release(ray_version) < RAY_MIN:
        problems.append(f'pip install "ray[tune]>={_dotted(RAY_MIN)}"')
    if problems:
        raise UnsupportedVersionError(
            f"wandbtune supports {supported_range()}; installed: {installed}. "
            f"Fix: {'; '.join(problems)}."
        )


def wandb_at_least(version: tuple[int, ...]) -> bool:
    """True if the installed wandb is ``version`` or newer (without importing
    it)."""
    installed = _installed_wandb()
    return installed is not None and _release(installed) >= version


def _installed_wandb() -> Optional[str]:
    try:
        return metadata.version("wandb")  # without importing wandb (~0.3 s)
    except metadata.PackageNotFoundError:
        return None


check_versions(ray.__version__, _installed_wandb())


def _private_api_missing(what: str, error: BaseException) -> UnsupportedVersionError:
    return UnsupportedVersionError(
        f"wandbtune cannot use this Ray: {what} is not what it expects "
        f"({type(error).__name__}: {error}). wandbtune supports "
        f"{supported_range()}; installed: ray {ray.__version__}. If this Ray is "
        "newer than the tested one, install the newest wandbtune or ray[tune]=="
        f"{RAY_TESTED}."
    )


try:
    from ray import tune as _tune
    from ray.train._internal import session as _session_mod
    from ray.tune.result import RESULT_DUPLICATE
    from ray.tune.trainable.function_trainable import wrap_function as _wrap_function

    _session_mod.get_session  # noqa: B018 - resolved here, used per trial
    if "__mixins__" not in _wrap_function.__code__.co_names:
        raise AttributeError("wrap_function no longer reads __mixins__")
except (ImportError, AttributeError) as _error:
    raise _private_api_missing("Ray Tune's function trainable API", _error) from None

__all__ = [
    "RESULT_DUPLICATE",
    "get_session",
    "train_api_forwarded_to_tune",
]


def get_session() -> Any:
    """The current trial's session, or None outside a Tune trial."""
    return _session_mod.get_session()


logger = logging.getLogger("wandbtune")


def world_rank() -> Optional[int]:
    """This worker's rank in a Ray Train run (V1 or V2), None elsewhere."""
    session = get_session()
    if session is not None and session.world_rank is not None:
        return int(session.world_rank)
    try:  # Train V2 workers hold their context here instead
        from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils

        return int(get_train_fn_utils().get_context().get_world_rank())
    except Exception:  # noqa: BLE001 - not a Train V2 worker (or not that Ray)
        return None


def is_function_trainable(trainable: Any) -> bool:
    """True for the actor of a Tune function trainable (its function runs in
    a thread of its own), False for a ``tune.Trainable`` subclass."""
    from ray.tune.trainable import FunctionTrainable

    return isinstance(trainable, FunctionTrainable)


def in_tune_function_trial() -> bool:
    """True inside a Tune function trainable (not a Ray Train worker)."""
    session = get_session()
    return session is not None and session.world_rank is None


# --- ray.train.* inside Tune ---------------------------------------------------
#
# With Train V2 (the default on current Ray), ``ray.train.report``,
# ``get_checkpoint`` and ``get_context`` raise when called inside a Tune trial.
# The documentation our users copy calls ``train.report`` in Tune trainables, so
# while a decorated trainable runs, those names on the ``ray.train`` module
# forward to their ``ray.tune`` equivalents. Only the module attributes are
# patched (``from ray import train; train.report(...)`` and
# ``ray.train.report(...)``): patching Tune's ``_in_tune_session`` predicate
# instead would break Ray Train trainers launched from a Tune trial.


#: Recent Ray has ``ray.tune.report``; where it has not (2.30), ``ray.train.report``
#: is Tune's own API and needs no forwarding.
TUNE_HAS_REPORT = hasattr(_tune, "report")


def _forward_report(metrics: Any, checkpoint: Any = None, **options: Any) -> None:
    import ray.tune

    given = sorted(k for k, v in options.items() if v not in (None, False))
    if given and not _warned_options.intersection(given):
        _warned_options.update(given)
        logger.warning(
            "wandbtune: ray.train.report(%s=...) is a Ray Train option that Tune's "
            "report does not have; it is ignored in this Tune trial.",
            ", ".join(given),
        )
    ray.tune.report(metrics, checkpoint=checkpoint)


_warned_options: set[str] = set()


def _forward_get_checkpoint() -> Any:
    import ray.tune

    return ray.tune.get_checkpoint()


def _forward_get_context() -> Any:
    import ray.tune

    return ray.tune.get_context()


_FORWARDS: dict[str, Callable[..., Any]] = {
    "report": _forward_report,
    "get_checkpoint": _forward_get_checkpoint,
    "get_context": _forward_get_context,
}


def _forwarding(name: str) -> Callable[..., Any]:
    forward = _FORWARDS[name]

    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if in_tune_function_trial():
            return forward(*args, **kwargs)
        return wrapped(*args, **kwargs)

    return wrapper


_forward_lock = threading.Lock()
_forward_depth = 0
_forward_saved: list[tuple[Any, str, Any]] = []


@contextmanager
def train_api_forwarded_to_tune() -> Iterator[None]:
    """Make ``ray.train.report`` (and get_checkpoint/get_context) work in Tune.

    Patches on entry and restores the originals on exit (resolve, then apply,
    as wrapt does), even when entries overlap: the originals come back when
    the last one leaves. Outside a Tune function trial the patched names call
    the originals.
    """
    global _forward_depth
    import wrapt

    if not TUNE_HAS_REPORT:  # older Ray: ray.train.report works in Tune as it is
        yield
        return
    with _forward_lock:
        if _forward_depth == 0:
            for name in _FORWARDS:
                parent, attribute, original = wrapt.resolve_path("ray.train", name)
                _forward_saved.append((parent, attribute, original))
                wrapt.apply_patch(
                    parent,
                    attribute,
                    wrapt.FunctionWrapper(original, _forwarding(name)),
                )
        _forward_depth += 1
    try:
        yield
    finally:
        with _forward_lock:
            _forward_depth -= 1
            if _forward_depth == 0:
                while _forward_saved:
                    parent, attribute, original = _forward_saved.pop()
                    setattr(parent, attribute, original)


def train_api_is_forwarded() -> bool:
    """True while ``ray.train`` calls are forwarded to Tune (for tests)."""
    import ray.train
    import wrapt

    return isinstance(ray.train.report, wrapt.FunctionWrapper)


def storage_trial_dir(storage: Any) -> Optional[str]:
    """The trial's directory in experiment storage (a Tune ``StorageContext``),
    or None when that storage is not on the local filesystem."""
    if storage is None:
        return None
    import pyarrow.fs

    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return str(storage.trial_fs_path)
    return None


def trial_result_files(storage: Any) -> tuple[str, ...]:
    """Where this node can read Tune's ``result.json`` for the trial (a Tune
    ``StorageContext``), the driver's copy first. The driver's callback
    writes each result, flushed, to the trial's staging directory on the
    driver's node (``trial_driver_staging_path``, under Ray's session
    directory); Tune copies that directory to experiment storage only when it
    saves the experiment's state (by default every 10 s or more), so the copy
    in storage (if local) may lag. When a trial (re)starts, Tune copies
    storage's back over the staging one if storage has one: then both are
    the same, and the staging copy is ahead only while storage has none yet.
    After a killed driver, storage's is the only one left."""
    if storage is None:
        return ()
    files = []
    try:
        files.append(os.path.join(storage.trial_driver_staging_path, "result.json"))
    except Exception:  # noqa: BLE001 - no trial dir or Ray session (yet)
        pass
    stored = storage_trial_dir(storage)
    if stored is not None:
        files.append(os.path.join(stored, "result.json"))
    return tuple(files)


def trainable_storage(trainable: Any) -> Any:
    """A Tune trainable's ``StorageContext`` (None outside Tune)."""
    return getattr(trainable, "_storage", None)


def experiment_name(storage: Any) -> Optional[str]:
    return getattr(storage, "experiment_dir_name", None)


# --- Tune's driver: what tune.run was given (the experiment run reads it) ----------


def tune_run_arguments() -> dict[str, Any]:
    """The local variables of the ``ray.tune.tune.run`` call up the stack
    (its arguments: ``metric``, ``mode``, ``scheduler``, ``search_alg``,
    ``experiments``), or {} if there is none. Tune tells a callback's
    ``setup`` only the stop criteria and sample counts."""
    frame = _tune_run_frame(sys._getframe(1), depth=40)
    return dict(frame.f_locals) if frame is not None else {}


def _tune_run_frame(frame: Any, depth: int) -> Any:
    """The ``ray.tune.tune.run`` frame at or below ``frame`` (at most
    ``depth`` frames down), or None."""
    for _ in range(depth):
        if frame is None:
            break
        code = frame.f_code
        if code.co_name == "run" and frame.f_globals.get("__name__") == "ray.tune.tune":
            return frame
        frame = frame.f_back
    return None


def tune_runs_in_main_thread() -> bool:
    """True while the main thread is inside ``tune.run`` (``Tuner.fit()``,
    a Train V1 trainer's ``fit()``)."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    return _tune_run_frame(frame, depth=200) is not None


def scheduler_mode(scheduler: Any) -> Any:
    """A Tune scheduler's mode ("max"/"min"; None if it has none)."""
    return getattr(scheduler, "_mode", None)


def scheduler_budget(scheduler: Any) -> tuple[Any, Any]:
    """(time attribute, max_t) of ASHA or HyperBand; (None, None) otherwise."""
    time_attr = getattr(scheduler, "_time_attr", None)
    max_t = getattr(scheduler, "_max_t", None)  # ASHA
    if max_t is None:
        max_t = getattr(scheduler, "_max_t_attr", None)  # HyperBand
    return time_attr, max_t


def stopper_parts(stopper: Any) -> list[Any]:
    """The stoppers a ``CombinedStopper`` combines."""
    parts = getattr(stopper, "_stoppers", None)
    return list(parts) if isinstance(parts, (list, tuple)) else []


def experiment_location(storage: Any) -> Optional[str]:
    """Where an experiment is stored (``<filesystem>:<path>``), from a Tune
    ``StorageContext``; None without one."""
    if storage is None:
        return None
    fs = getattr(getattr(storage, "storage_filesystem", None), "type_name", "")
    return f"{fs}:{getattr(storage, 'experiment_fs_path', None)}"


# --- W&B private API -------------------------------------------------------------


def _wandb_setup() -> Any:
    """W&B's process-wide setup object, None before W&B is set up here."""
    import sys

    return getattr(sys.modules.get("wandb.sdk.wandb_setup"), "_singleton", None)


def wandb_wait_for_a_new_run_dir(root: Optional[str], run_id: Optional[str]) -> None:
    """Before ``wandb.init`` of a run that may have started before (a
    retried, restored or PBT-resumed trial): on a wandb that names a run's
    local directory ``<mode>-<start second>-<id>`` and does not check that it
    is free (0.19; later ones add a ``-1`` suffix, ``x_sync_dir_suffix``),
    wait until the second changes if the run's directory for this second
    exists already. Another process starting the same run in the same second
    would otherwise write over that directory's run log."""
    if not root or not run_id or wandb_has_setting("x_sync_dir_suffix"):
        return
    import datetime
    import time

    for _ in range(3):
        now = datetime.datetime.now()
        second = now.strftime("%Y%m%d_%H%M%S")
        taken = any(
            os.path.exists(os.path.join(root, stage, f"{mode}-{second}-{run_id}"))
            for stage in ("wandb", ".wandb")  # wandb's own choice of the two
            for mode in ("offline-run", "run")
        )
        if not taken:
            return
        time.sleep(1.0 - now.microsecond / 1e6 + 0.01)


def wandb_list_packages_once() -> None:
    """Make wandb list the installed packages once per process, not at every
    run's start.

    ``Run._on_start`` sends W&B the installed distributions (the run's
    ``requirements.txt``) from ``wandb.util.working_set()``, which reads every
    distribution's metadata: 0.08 s of CPU with 72 of them here, more in a
    larger environment, at each run of a reused trial actor and each run the
    callback starts in the driver. The list is kept for the process and
    listed again when ``sys.path``, or the modification time of one of its
    entries (a package installed, upgraded or removed there), changes: as
    ``importlib.metadata`` itself caches each entry's listing. Not seen, as
    there: metadata rewritten in place in an existing ``*.egg-info``, or a
    finder added to ``sys.meta_path``. Both 0.19.10 and 0.31 import the name
    from ``wandb.util`` when the run starts, so replacing it is enough; the
    user's own runs in the process get the same list."""
    try:
        from wandb import util
    except Exception:  # noqa: BLE001 - another wandb: it lists them itself
        return
    listed = getattr(util, "working_set", None)
    if listed is None or getattr(listed, "_wandbtune", False):
        return
    # This wrapper's own: another wrapper put around it later (a user's
    # mock, say) has a list of its own, and listing outside the lock never
    # waits for itself.
    kept: dict[tuple[tuple[str, int], ...], list[Any]] = {}
    lock = threading.Lock()

    @functools.wraps(listed)
    def working_set() -> Iterator[Any]:
        key = tuple((entry, _modified(entry)) for entry in sys.path)
        with lock:
            packages = kept.get(key)
        if packages is None:
            packages = list(listed())
            with lock:
                kept.clear()
                kept[key] = packages
        return iter(packages)

    working_set._wandbtune = True  # type: ignore[attr-defined]
    util.working_set = working_set


def wandb_apply_launch_inputs_only_if_staged() -> None:
    """Spare a run's start the import of W&B Launch where no Launch input can
    have been staged.

    ``Run._on_ready`` imports ``wandb.sdk.launch.inputs.internal`` at every
    start to apply inputs staged by ``wandb.sdk.launch.manage_config_file``
    / ``manage_wandb_config`` before ``wandb.init``. On wandb 0.31 that
    import pulls in W&B Launch and the public API: about 0.3 s of a fresh
    trial process's first start (0.47–0.60 s of CPU against 0.21–0.24 s).
    Inputs can only be staged through that module (those functions import
    it when called), so while it is not imported there is nothing to apply
    and the call is skipped; once it is, wandb's own method runs as before.
    (wandb 0.19.10 imports W&B Launch with ``import wandb`` already, though
    not that module: little is saved there.) A job run by a Launch agent
    gets its inputs through ``WANDB_CONFIG`` and the launch config file,
    which ``wandb.init`` reads elsewhere."""
    try:
        from wandb.sdk.wandb_run import Run
    except Exception:  # noqa: BLE001 - another wandb: as it is
        return
    apply = getattr(Run, "_detect_and_apply_job_inputs", None)
    if apply is None or getattr(apply, "_wandbtune", False):
        return

    @functools.wraps(apply)
    def _detect_and_apply_job_inputs(self: Any) -> None:
        if "wandb.sdk.launch.inputs.internal" in sys.modules:
            apply(self)

    _detect_and_apply_job_inputs._wandbtune = True  # type: ignore[attr-defined]
    Run._detect_and_apply_job_inputs = _detect_and_apply_job_inputs  # type: ignore[method-assign]


def _modified(path: str) -> int:
    try:
        return os.stat(path or ".").st_mtime_ns
    except OSError:
        return -1


def wandb_has_setting(name: str) -> bool:
    """True if this wandb's ``Settings`` has the field ``name``."""
    import wandb

    return name in wandb.Settings.model_fields


def wandb_use_key(key: str) -> None:
    """Make ``wandb.init`` log in with ``key`` (given in its settings), without
    writing the key anywhere.

    Newer wandb logs in with the key in ``wandb.init``'s settings. Older wandb
    (0.19) logs in with the process's global settings only, and would save a
    key given to ``wandb.login`` in ``~/.netrc``: there the key goes into the
    global settings, in memory. Its client-side API calls (logging a
    ``wandb.Table`` asks the server about artifact types) read neither: they
    take a thread-local key, set here for the calling thread, the one that
    logs (else they went out with no key at all).
    """
    import inspect

    from wandb.sdk import wandb_login

    if "update_api_key" in inspect.signature(wandb_login._login).parameters:
        return
    import wandb
    from wandb.sdk.internal.thread_local_settings import _thread_local_api_settings

    wandb.setup(settings=wandb.Settings(api_key=key))
    _thread_local_api_settings.api_key = key


def wandb_api_graphql(api: Any, query: str, variables: dict[str, Any]) -> Any:
    """Run one GraphQL operation through a public ``wandb.Api``; returns its
    ``data``. Newer wandb sends it through its service (``_service_api``),
    older wandb (0.19) through ``api.client`` and its vendored ``gql``."""
    service = getattr(api, "_service_api", None)
    if service is not None:
        return service.execute_graphql(query, variables)
    from wandb_gql import gql  # type: ignore[import-not-found,unused-ignore]

    return api.client.execute(gql(query), variable_values=variables)


def wandb_own_service() -> None:
    """Have this trial process start its own W&B service.

    A W&B service running in the driver when ``ray.init()`` was called (the
    user's own run there) passes its token, ``WANDB_SERVICE``, to every Ray
    worker. A trial using it would outlive its own process there: the run of a
    killed trial stays open in the driver's service, and the retried attempt,
    with the same run id, gets no run. Forget an inherited token before W&B is
    first set up in this process.
    """
    import os

    if _wandb_setup() is None:
        os.environ.pop("WANDB_SERVICE", None)


def wandb_setup() -> Any:
    """W&B's setup object of this process (None before W&B is set up)."""
    return _wandb_setup()


def wandb_kill_service(setup: Any = None) -> bool:
    """Kill this process's W&B service (its child process); True if done.

    For a service that does not exit when asked (wandb 0.19 waits for network
    retries that never end while W&B is unreachable). ``setup``: W&B's setup
    object as it was before ``wandb.teardown()``, which forgets it at once.
    """

    setup = setup or _wandb_setup()
    connection = getattr(setup, "_connection", None)
    service = getattr(connection, "_proc", None)
    # The service's Popen: ``_internal_proc`` on wandb 0.19, ``_process`` on
    # newer wandb.
    process = getattr(service, "_internal_proc", None) or getattr(
        service, "_process", None
    )
    kill = getattr(process, "kill", None)
    if not callable(kill):
        return False
    _kill_children(getattr(process, "pid", None))  # wandb 0.19: its wandb-core
    try:
        kill()
    except OSError:
        return False
    return True


def _kill_children(pid: Optional[int]) -> None:
    """Kill the processes a W&B service started (wandb 0.19's Python service
    runs wandb-core as its child)."""
    if not isinstance(pid, int):
        return
    try:
        import psutil

        children = psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - gone already, or no psutil
        return
    for child in children:
        try:
            child.kill()
        except Exception:  # noqa: BLE001
            continue


def wandb_current_step(run: Any) -> Optional[int]:
    """W&B's current step for ``run`` without a round trip to its service.

    ``run.step`` asks the service and waits; ``_local_step`` is what
    ``run.log`` itself compares against.
    """
    step = getattr(run, "_local_step", None)
    if not isinstance(step, int):
        step = getattr(run, "_step", None)  # wandb 0.19 keeps it here
    return step if isinstance(step, int) else None


def training_thread() -> Optional[threading.Thread]:
    """The thread running the current trial's function, if started."""
    session = get_session()
    if session is None or not getattr(session, "training_started", False):
        return None
    thread = getattr(session, "training_thread", None)
    return thread if isinstance(thread, threading.Thread) else None


def wandb_open_runs() -> Optional[int]:
    """How many W&B runs are open in this process (None if unknown).

    ``wandb.run`` misses runs made with ``reinit="create_new"``; W&B's setup
    singleton tracks them all.
    """

    setup = _wandb_setup()
    runs = getattr(setup, "_active_runs", None)
    return len(runs) if isinstance(runs, list) else None


# --- One W&B service per node (see _node_service) ---------------------------------
#
# W&B's service can serve several processes (``WANDB_SERVICE`` holds its
# address). A trial hands its run over to its node's service and exits; the
# node's actor then finishes the run on its own connection: attach to the
# run's stream, send the exit, wait for it (uploads done, or W&B's
# ``finish_timeout``), and tell the service the stream is done (which writes
# its file). Only wandb whose service API has these shapes (0.31 is the one
# tested; 0.19 differs) is used this way; elsewhere each trial process runs
# its own service as before. The actor's side of these calls is in
# ``_node_actor``, the one exception to this module: Ray ships that module by
# value so that the actor's process does not import wandbtune.


@functools.cache
def wandb_inits_side_by_side() -> bool:
    """True if this wandb can start runs on several threads of one process at
    once: its setup singleton locks the connection to its service (0.31; 0.19
    starts the service without a lock and keeps the key process-wide)."""
    try:
        from wandb.sdk.wandb_setup import _WandbSetup

        return "_connection_lock" in _WandbSetup.__init__.__code__.co_names
    except Exception:  # noqa: BLE001 - then one at a time, as always safe
        return False


@functools.cache
def wandb_can_hand_over() -> bool:
    """True if this wandb's service API is the one the hand-over uses."""
    try:
        import inspect

        from wandb.sdk.interface.interface import InterfaceBase
        from wandb.sdk.lib.service.service_connection import ServiceConnection
        from wandb.sdk.wandb_run import Run

        needed = (
            ServiceConnection.inform_attach,
            ServiceConnection.inform_finish,
            InterfaceBase.deliver_exit,
            InterfaceBase.deliver_get_summary,
            Run._console_stop,
        )
        annotation = str(
            inspect.signature(ServiceConnection.inform_attach).return_annotation
        )
        return all(callable(each) for each in needed) and "tuple" in annotation
    except Exception:  # noqa: BLE001 - another wandb: the per-process service
        return False


def wandb_service_gone(exc: BaseException) -> bool:
    """True if ``exc`` says this process's W&B service is gone or cannot be
    reached (its process died): not W&B's server, whose trouble wandb raises
    as its own errors."""
    if isinstance(exc, ConnectionError):  # reset, refused, broken pipe
        return True
    gone: list[type] = []
    try:
        from wandb.sdk.lib.service.service_token import WandbServiceConnectionError

        gone.append(WandbServiceConnectionError)
    except ImportError:  # not in older wandb
        pass
    try:
        # The connection's reader closes the mailbox when the service's end
        # of the socket is gone: a request then raises MailboxClosedError,
        # and one already waiting HandleAbandonedError.
        from wandb.sdk.mailbox import HandleAbandonedError, MailboxClosedError

        gone += [MailboxClosedError, HandleAbandonedError]
    except ImportError:  # another wandb
        pass
    return isinstance(exc, tuple(gone))


def wandb_drop_run() -> None:
    """Forget ``wandb.run`` and the module's other run globals (of a run whose
    finish failed: its service is gone)."""
    try:
        from wandb.sdk.lib import module

        module.unset_globals()  # type: ignore[no-untyped-call]
    except Exception:  # noqa: BLE001 - another wandb
        pass


def wandb_service_connected() -> bool:
    """True once this process's W&B is connected to a service."""
    return getattr(_wandb_setup(), "_connection", None) is not None


def wandb_hand_over(run: Any, timeout: float) -> bool:
    """Let go of ``run`` in this process without finishing it, so another
    client of the same service can (``_node_actor.NodeService``); True if
    done. First one round trip on this process's connection: every row sent
    before is then in the run's stream, where an exit sent on another
    connection cannot overtake it. Then what ``Run.finish`` does locally,
    without its exit and its "finish" to the service."""
    import wandb
    from wandb.sdk.lib import module

    interface = getattr(run, "_interface", None)
    if interface is None or getattr(run, "_is_finished", True):
        return False
    checker = getattr(run, "_run_status_checker", None)
    if checker is not None:
        checker.stop()
    interface.deliver_get_summary().wait_or(timeout=timeout)
    hooks = list(getattr(run, "_teardown_hooks", []))
    for hook in hooks:
        if getattr(hook.stage, "name", "") == "EARLY":
            hook.call()
    run._is_finished = True
    run._wl.remove_active_run(run)
    run._console_stop()
    for hook in hooks:
        if getattr(hook.stage, "name", "") == "LATE":
            hook.call()
    run._teardown_hooks = []
    if wandb.run is run:
        module.unset_globals()  # type: ignore[no-untyped-call]
    return True


def in_ray_worker() -> bool:
    """True in a Ray worker process (a task or actor), not in a driver."""
    import ray._private.worker as ray_worker

    return (
        ray.is_initialized() and ray_worker.global_worker.mode == ray_worker.WORKER_MODE
    )


def named_actors(namespace: str) -> list[str]:
    """The names of the live named actors in ``namespace``."""
    from ray.util import list_named_actors

    return [
        each["name"]
        for each in list_named_actors(all_namespaces=True)
        if each.get("namespace") == namespace
    ]


def around_tune_experiment(
    start: Callable[[Any], bool],
    end: Callable[[], None],
    each: Callable[[], None],
) -> None:
    """Call ``start(trainable_class)`` when Tune's controller schedules its
    experiment's first trial actor (on the driver, Ray running); if it
    returned True, ``each()`` before each later trial actor is scheduled, and
    ``end()`` when the controller has stopped the experiment's trials, before
    its callbacks' ``on_experiment_end`` (at the end of every
    ``tune.run``/``Tuner.fit``, interrupted or failed too). Installed once
    per process; none may raise into Tune."""
    from ray.tune.execution.tune_controller import TuneController

    if getattr(TuneController._schedule_trial_actor, "_wandbtune", False):
        return
    original_schedule = TuneController._schedule_trial_actor
    original_cleanup = TuneController._cleanup_trials

    # Per controller, not on it: Tune saves its controller's attributes with
    # the experiment's state, and Tuner.restore would bring them back.
    seen: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

    @functools.wraps(original_schedule)
    def _schedule_trial_actor(self: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
        if self not in seen:
            seen[self] = False
            try:
                seen[self] = start(trial.get_trainable_cls())
            except Exception:  # noqa: BLE001 - never stops Tune
                logger.debug("wandbtune: experiment start hook", exc_info=True)
        elif seen[self]:
            try:
                each()
            except Exception:  # noqa: BLE001 - never stops Tune
                logger.debug("wandbtune: trial start hook", exc_info=True)
        return original_schedule(self, trial, *args, **kwargs)

    @functools.wraps(original_cleanup)
    def _cleanup_trials(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original_cleanup(self, *args, **kwargs)  # type: ignore[no-untyped-call]
        finally:
            if seen.get(self):
                seen[self] = False
                try:
                    end()
                except Exception:  # noqa: BLE001 - never stops Tune
                    logger.debug("wandbtune: experiment end hook", exc_info=True)

    _schedule_trial_actor._wandbtune = True  # type: ignore[attr-defined]
    TuneController._schedule_trial_actor = _schedule_trial_actor  # type: ignore[method-assign]
    TuneController._cleanup_trials = _cleanup_trials  # type: ignore[method-assign]


# --- Ray Train workers (train_loop_per_worker) -----------------------------------
#
# Train V2 (current Ray) keeps a worker's context in
# ``ray.train.v2._internal.execution``; Train V1 (Ray 2.30) in the worker's
# ``_TrainSession``. Everything wandbtune reads there is resolved here.


def _train_v2_context() -> Any:
    """The V2 worker's TrainContext, None elsewhere (a V1 worker, Tune, none)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context()
    except Exception:  # noqa: BLE001 - not a Train V2 worker (or not that Ray)
        return None


def in_train_worker() -> bool:
    """True in a Ray Train worker's training loop (V1 or V2), not in Tune."""
    return not in_tune_function_trial() and world_rank() is not None


def train_reports_to_tune() -> bool:
    """True if this Train run reports rank 0's metrics into a Tune trial
    (Ray's ``TuneReportCallback`` in its RunConfig: Train inside Tune)."""
    context = _train_v2_context()
    run_config = getattr(
        getattr(context, "train_run_context", None), "run_config", None
    )
    for callback in getattr(run_config, "callbacks", None) or ():
        if type(callback).__name__ == "TuneReportCallback":
            return True
    return False


def train_run_identity() -> dict[str, Any]:
    """What names this Train run for W&B: ``run_id`` stable for its storage
    path and name (so a worker-group restart and a re-fit that resumes from
    the run's checkpoint continue one W&B run), ``name``, and ``dir`` (the
    run's directory in storage when it is on the local filesystem)."""
    import hashlib

    context = _train_v2_context()
    if context is not None:  # V2: the run is its name in its storage path
        storage = context.get_storage()
        fs = getattr(storage.storage_filesystem, "type_name", "")
        path = str(storage.experiment_fs_path)
        digest = hashlib.sha1(f"{fs}:{path}".encode()).hexdigest()[:16]
        return {
            "run_id": f"train-{digest}",
            "name": context.get_experiment_name(),
            "dir": storage_experiment_dir(storage),
        }
    session = get_session()  # V1: the trainer runs as one Tune trial
    info = getattr(session, "trial_info", None)
    storage = getattr(session, "storage", None)
    return {
        "run_id": getattr(info, "id", None),
        "name": getattr(info, "experiment_name", None) or getattr(info, "name", None),
        "dir": storage_trial_dir(storage),
    }


def storage_experiment_dir(storage: Any) -> Optional[str]:
    """The experiment's (Train V2: the run's) directory in a ``StorageContext``,
    or None when that storage is not on the local filesystem."""
    if storage is None:
        return None
    import pyarrow.fs

    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return str(storage.experiment_fs_path)
    return None


def train_report_owner() -> Any:
    """The object whose ``report`` every report path of this worker calls
    (``ray.train.report``, ``from ray.train import report``, ...): V2's
    TrainFnUtils (documented there as patchable), V1's session."""
    if _train_v2_context() is not None:
        from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils

        return get_train_fn_utils()
    return get_session()


def train_report_index() -> Optional[int]:
    """V2: how many reports this Train run has made (across worker-group
    restarts and re-fits, as Ray counts them); None on V1."""
    context = _train_v2_context()
    index = getattr(context, "report_call_index", None)
    return index if isinstance(index, int) else None


def train_on_worker_shutdown(callback: Callable[[], None]) -> bool:
    """Run ``callback`` when Ray Train shuts this worker down, before it kills
    it (V2 gives shutdown callbacks 5 s in all); False where not possible
    (V1). Ray Train kills a worker without running its ``finally`` or atexit
    handlers when another worker failed or ``fit()`` was interrupted."""
    try:
        import ray._private.worker
        from ray.train.v2._internal.execution.callback import WorkerCallback

        actor_id = ray.get_runtime_context().get_actor_id()
        actors = ray._private.worker.global_worker.actors
        worker = next(a for k, a in actors.items() if k.hex() == actor_id)
        callbacks = worker._callbacks
    except Exception:  # noqa: BLE001 - not a V2 worker
        return False

    class _BeforeShutdown(WorkerCallback):  # type: ignore[misc]
        def before_worker_shutdown(self) -> None:
            callback()

    callbacks.insert(0, _BeforeShutdown())  # first: the 5 s are shared
    return True


def trial_error_message(trial: Any) -> Optional[str]:
    """``Type: message`` of the error that failed a Tune trial (driver side),
    from the error file Tune writes; None if unknown."""
    try:
        path = getattr(trial, "error_file", None)
        if not path:
            return None
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except Exception:  # noqa: BLE001 - a guess, never a failure
        return None
    # Tune's error file ends with the traceback's last line: "Type: message".
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0].strip()
        if head and head.replace(".", "").replace("_", "").isalnum() and ":" in line:
            return line.strip()[:1000]
    return lines[-1][:1000] if lines else None


# --- an API key through the Ray cluster, never in a pickle ---------------------------

_KEY_NAMESPACE = "wandbtune"
#: Tokens by (cluster, key): a driver can start several Ray clusters in turn.
_key_tokens: dict[tuple[str, str], str] = {}


def key_to_cluster(key: str) -> Optional[str]:
    """Put ``key`` in the Ray cluster's key-value store (in the GCS's memory)
    and return a random token for it; None without a Ray cluster."""
    import uuid

    try:
        if _cluster_kv() is None:
            return None
        cluster = str(ray.get_runtime_context().gcs_address)
        token = _key_tokens.get((cluster, key))
        if token is None or key_from_cluster(token) != key:  # a new cluster
            token = _key_tokens[cluster, key] = f"api-key-{uuid.uuid4().hex}"
            if not cluster_put(token, key):
                return None
        return token
    except Exception:  # noqa: BLE001 - then the key goes inline, as before
        return None


def key_from_cluster(token: str) -> Optional[str]:
    """The key ``key_to_cluster`` stored under ``token``; None if this
    process is not in that cluster (a pickle read after it shut down)."""
    return cluster_get(token)


# --- Train V1: notices to rank 0 through the same store (_train_v1_notices) -----


def train_attempt_key() -> Optional[str]:
    """V1 only: a key naming this attempt of the training run, the same in
    each of its workers (the trainer's per-attempt ``run_id``); None on V2,
    which has a worker-shutdown hook instead, and outside Ray Train."""
    attempt = getattr(_train_v1_trial_info(), "run_id", None)
    return f"train-attempt-{attempt}" if attempt else None


def train_trial_id() -> Optional[str]:
    """V1 worker: the id of the Tune trial the trainer runs as."""
    trial = getattr(_train_v1_trial_info(), "id", None)
    return str(trial) if trial else None


def _train_v1_trial_info() -> Any:
    """A V1 worker's ``TrialInfo`` (the trainer's trial); None elsewhere."""
    if _train_v2_context() is not None:
        return None
    return getattr(get_session(), "trial_info", None)


def ray_job_id() -> Optional[str]:
    """This Ray job's id (the driver's, shared by its tasks and actors)."""
    try:
        if not ray.is_initialized():
            return None
        return str(ray.get_runtime_context().get_job_id())
    except Exception:  # noqa: BLE001
        return None


def ray_cluster_id() -> Optional[str]:
    """Which Ray cluster this process is connected to: the GCS's address and
    the driver's node (a new cluster on the same address has new nodes)."""
    try:
        if not ray.is_initialized():
            return None
        context = ray.get_runtime_context()
        return f"{context.gcs_address}/{context.get_node_id()}"
    except Exception:  # noqa: BLE001
        return None


def is_ray_driver() -> bool:
    """True in a connected Ray driver (the user's script), not in a worker."""
    import ray._private.worker as ray_worker

    return (
        ray.is_initialized() and ray_worker.global_worker.mode == ray_worker.SCRIPT_MODE
    )


def train_v1_possible() -> bool:
    """True where Ray Train runs as V1 (Ray 2.30; current Ray with
    ``RAY_TRAIN_V2_ENABLED=0``). Asked at every pickle of the settings."""
    is_v2_enabled = _train_v2_switch()
    return is_v2_enabled is None or not is_v2_enabled()


@functools.cache
def _train_v2_switch() -> Optional[Callable[[], bool]]:
    """Ray's ``is_v2_enabled``, or None on a Ray without Train V2 (imported
    once: a failed import searches ``sys.path`` again each time)."""
    try:
        from ray.train.v2._internal.constants import is_v2_enabled
    except ImportError:
        return None
    return is_v2_enabled  # type: ignore[no-any-return]


def sigint_handler() -> Any:
    """This process's SIGINT handler now."""
    import signal

    return signal.getsignal(signal.SIGINT)


def is_tune_sigint_handler(handler: Any) -> bool:
    """True for the SIGINT handler ``tune.run`` installs: on SIGINT it sets
    Tune's stop flag and puts back the handler it found (which may be an
    earlier ``tune.run``'s: Tune leaves its handler in place when a run
    ends normally). ``ray.tune.tune._setup_signal_catching``."""
    name = getattr(handler, "__qualname__", "")
    return name == "_setup_signal_catching.<locals>.signal_interrupt_tune_run"


_stop_hooks: list[Callable[[str, bool], None]] = []


def before_function_trial_stops(hook: Callable[[str, bool], None]) -> None:
    """Run ``hook(trial_id, ended)`` in this process when a function trial is
    stopped, before Tune frees the trial's resources (once per hook); ``ended``
    says the trial's function had already returned or raised (Tune stops a
    failed trial too). A V1 trainer's trial is one.

    Tune's stop of a function trial ends in its session's ``finish``
    (``FunctionTrainable.cleanup``); the session's class is the one place to
    hook it: the trial actor's ``FunctionTrainable`` may be a copy that Ray
    unpickled by value, not the class of the ``ray.tune`` module.
    """
    if hook in _stop_hooks:
        return
    _stop_hooks.append(hook)
    session_cls = _session_mod._TrainSession
    original = session_cls.finish
    if getattr(original, "_wandbtune_hooks", None) is _stop_hooks:
        return

    def finish(self: Any, *args: Any, **kwargs: Any) -> Any:
        trial_id = getattr(getattr(self, "trial_info", None), "id", None)
        if self.world_rank is None and isinstance(trial_id, str):
            thread = getattr(self, "training_thread", None)
            ended = bool(getattr(self, "training_started", False)) and not (
                thread is not None and thread.is_alive()
            )
            for each in list(_stop_hooks):
                try:
                    each(trial_id, ended)
                except Exception:  # noqa: BLE001 - never stops Tune's cleanup
                    logger.debug("wandbtune: trial stop hook", exc_info=True)
        return original(self, *args, **kwargs)

    finish._wandbtune_hooks = _stop_hooks  # type: ignore[attr-defined]
    session_cls.finish = finish  # type: ignore[method-assign]


def _cluster_kv() -> Any:
    """Ray's internal key-value store module, if this process is connected
    to a Ray cluster; else None."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():  # type: ignore[no-untyped-call]
        return None
    return internal_kv


def cluster_put(key: str, value: str, overwrite: bool = True) -> bool:
    """Put ``value`` under ``key`` in the Ray cluster's key-value store (with
    ``overwrite=False``, only if the key has no value yet: atomic)."""
    try:
        kv = _cluster_kv()
        if kv is None:
            return False
        kv._internal_kv_put(
            key, value.encode(), overwrite=overwrite, namespace=_KEY_NAMESPACE
        )
        return True
    except Exception:  # noqa: BLE001
        return False


def cluster_get(key: str) -> Optional[str]:
    """The value under ``key`` in the Ray cluster's key-value store."""
    try:
        kv = _cluster_kv()
        if kv is None:
            return None
        value = kv._internal_kv_get(key, namespace=_KEY_NAMESPACE)
        return value.decode() if value else None
    except Exception:  # noqa: BLE001
        return None
