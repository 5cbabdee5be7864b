"""One W&B service per node that outlives the trials: a trial's end never
waits for W&B's uploads.

Each node gets one Ray actor (``_node_actor.NodeService``) that owns a W&B service
process. Trial processes of the decorator connect to it (``WANDB_SERVICE``)
instead of starting their own; at a trial's end the trial hands its run over
(``hand_over``: one round trip, then it lets go) and the node's actor
finishes it in the background: uploads done, or on disk for ``wandb sync``.

- **Who starts them.** The driver, when Tune's controller schedules the
  first trial of an experiment whose trainable is decorated (the hook is
  installed where the decorator's settings are pickled, on the driver): one
  actor per alive node, owned by the driver (they die with it: nothing is
  left running if the driver is killed). Before each later trial actor is
  scheduled, the driver starts one on nodes that joined since (at most
  every NEW_NODES_EVERY_S).
- **The end of the experiment.** Tune's cleanup of its trials, on the driver,
  waits until every handed-over run is finished (``drain``), then stops the
  actors: ``fit()`` returns with every run uploaded or on disk.
- **A killed trial.** Its process is gone, its run still open in the
  service: the actor watches the processes of its open runs and finishes a
  dead one's run as failed (exit code 1). A retried attempt first asks every
  node's actor to let go of its run id (``release``): the service would
  refuse a second stream under the same id, and the earlier attempt's end
  must reach W&B before the new attempt resumes the run.
- **A trial moved on.** With ``reuse_actors`` Tune resets a paused trial's
  actor for another trial, which hands the run over in the background, and
  may resume the paused trial in another actor meanwhile. Its start waits
  (``release``, bounded) until the live process has handed the run over;
  a hand-over from a process the run has since moved away from is ignored.
  The other way round, a segment whose start came round only after the
  trial had ended there and gone on elsewhere (a loaded machine: W&B's
  first start in a process can take longer than the segment) does not take
  the run again (``moved_on``): the later segment has filled in, from
  Tune's ``result.json``, what the earlier one could not log.
- **Where it is not used** (each trial process runs its own W&B service, as
  before): a wandb whose service API differs (``_compat.wandb_can_hand_over``),
  a node that joined after the experiment started, an actor that did not
  answer in time, Ray Train workers and the driver-side callback.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, Optional

from wandbtune import _compat
from wandbtune._node_actor import CANCEL_WAIT_S, DEAD_GRACE_S

logger = logging.getLogger("wandbtune")

__all__ = [
    "NAMESPACE",
    "connect",
    "current",
    "disconnect",
    "drain_all",
    "forget",
    "hand_over",
    "moved_on",
    "on_pickled",
    "register",
    "release",
    "start_all",
    "start_on_new_nodes",
]

#: wandb 0.19's service API cannot take runs over (trials check the installed
#: wandb with ``_compat.wandb_can_hand_over``): no actor is started for it.
HAND_OVER_MIN = (0, 20)
#: The Ray namespace of the node actors (named per job and node).
NAMESPACE = "wandbtune"
#: How long a trial waits for its node's actor to give the service's address
#: (it starts with the experiment; a trial that waits longer starts its own).
CONNECT_TIMEOUT_S = 20.0
#: How long the end of an experiment waits for W&B to finish uploading the
#: runs (as ``_run.TEARDOWN_TIMEOUT_S`` for a trial's own service); then the
#: uploads are stopped and what is left is written to disk.
DRAIN_WAIT_S = 30.0
#: How long a retried trial waits for its earlier attempt's run to end.
RELEASE_WAIT_S = 30.0
#: How long the service takes to shut down once its runs are finished.
STOP_WAIT_S = 10.0
#: How often, at most, the driver looks for nodes that joined the cluster
#: during the experiment (before a trial actor is scheduled: ``ray.nodes()``).
NEW_NODES_EVERY_S = 1.0


def _name(job_id: str, node_id: str) -> str:
    return f"wandb-service-{job_id}-{node_id}"


# --- on the driver -----------------------------------------------------------------

#: The node actors started, by node id.
_started: dict[str, Any] = {}
#: The Ray job and cluster the actors in ``_started`` belong to (a fresh
#: local cluster after ``ray.shutdown()`` numbers its jobs from 1 again).
_started_job: Optional[str] = None
_started_cluster: Optional[str] = None
#: When the driver last looked for nodes without an actor.
_nodes_seen_at = -math.inf
_users = 0
_driver_lock = threading.Lock()


def on_pickled() -> None:
    """A decorated trainable's settings are pickled (on the driver, when the
    experiment is set up): its experiment gets a W&B service per node."""
    # Not wandb_can_hand_over() here: it imports wandb (≈ 1 s) in the driver,
    # which has no other use for it; trials check.
    if _compat.in_ray_worker() or not _compat.wandb_at_least(HAND_OVER_MIN):
        return
    try:
        _compat.around_tune_experiment(start_all, drain_all, start_on_new_nodes)
    except Exception as exc:  # noqa: BLE001 - then a service per trial process
        logger.debug("wandbtune: no W&B service per node: %r", exc)


def start_all(trainable: Any) -> bool:
    """When an experiment of a decorated trainable starts its first trial:
    start a node actor on every alive node; True if it did. Actors of an
    experiment running beside this one in the driver are shared."""
    global _users, _started_job, _started_cluster, _nodes_seen_at
    if getattr(trainable, "_wandbtune_settings", None) is None:
        return False
    job = _compat.ray_job_id()
    if job is None:
        return False
    cluster = _compat.ray_cluster_id()
    nodes = _alive_nodes()
    with _driver_lock:
        if _started and (_started_job != job or _started_cluster != cluster):
            # Left from another Ray session (ray.shutdown() and ray.init()
            # between fits, or a fit that ended without Tune's cleanup).
            _started.clear()
            _users = 0
        _users += 1
        if _started:
            return True
        _started_job = job
        _started_cluster = cluster
        _nodes_seen_at = time.monotonic()
        _start_on(nodes, job)
    return True


def start_on_new_nodes() -> None:
    """Before each later trial actor of the experiment is scheduled: start a
    node actor on nodes that joined the cluster since (an autoscaler's),
    looked for at most every NEW_NODES_EVERY_S."""
    global _nodes_seen_at
    with _driver_lock:
        job = _started_job
        if not _started or time.monotonic() - _nodes_seen_at < NEW_NODES_EVERY_S:
            return
        _nodes_seen_at = time.monotonic()
    nodes = _alive_nodes()
    with _driver_lock:
        if _started and _started_job == job and job is not None:
            _start_on([node for node in nodes if node not in _started], job)


def _alive_nodes() -> list[str]:
    import ray

    return [node["NodeID"] for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]


def _start_on(nodes: list[str], job: str) -> None:
    """Start the actor on each of ``nodes`` (under _driver_lock)."""
    if not nodes:
        return
    import ray
    from ray import cloudpickle
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from wandbtune import _node_actor

    # By value: the actor's process then imports neither wandbtune nor Tune.
    cloudpickle.register_pickle_by_value(_node_actor)  # type: ignore[no-untyped-call]
    actor_class = ray.remote(num_cpus=0, max_concurrency=64)(  # type: ignore[call-overload]
        _node_actor.NodeService
    )
    for node_id in nodes:
        try:
            handle = actor_class.options(  # type: ignore[attr-defined]
                name=_name(job, node_id),
                namespace=NAMESPACE,
                get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote()
        except Exception as exc:  # noqa: BLE001 - trials start their own
            logger.debug("wandbtune: no W&B service on node %s: %r", node_id, exc)
            continue
        _started[node_id] = handle


def drain_all() -> None:
    """At the end of an experiment (Tune's cleanup of its trials): wait until
    every run handed over to a node's W&B service is finished, then stop the
    actors."""
    global _users
    import ray

    with _driver_lock:
        _users = max(0, _users - 1)
        handles = list(_started.values())
        last = _users == 0
    if not handles:
        return
    late: list[str] = []
    # With another experiment still running on the actors, only the runs
    # already handed over or of dead trial processes are waited for. Each
    # actor's answer on its own: an actor whose node is gone (an
    # autoscaler's, idle) must not cut the wait for the others short.
    try:
        asked = [h.drain.remote(DRAIN_WAIT_S, last) for h in handles]
        answered, silent = ray.wait(
            asked,
            num_returns=len(asked),
            timeout=DRAIN_WAIT_S + DEAD_GRACE_S + CANCEL_WAIT_S + 10.0,
        )
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        logger.warning(
            "wandbtune: W&B's node services did not answer at the end of the "
            "experiment (%s); what they hold is on disk for `wandb sync`.",
            f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
        )
        answered, silent = [], []
    for ref in answered:
        try:
            late += ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - its node is gone: nothing to wait for
            logger.debug("wandbtune: a node's W&B service is gone: %r", exc)
    if silent:
        logger.warning(
            "wandbtune: %d of W&B's node services did not answer at the end of "
            "the experiment; what they hold is on disk for `wandb sync`.",
            len(silent),
        )
    if late:
        logger.warning(
            "wandbtune: W&B did not finish uploading %d run(s) in time (%s); "
            "what they hold is on disk for `wandb sync`.",
            len(late),
            ", ".join(late[:10]),
        )
    with _driver_lock:
        if _users == 0 and _started:  # no experiment started meanwhile
            try:
                ray.wait(
                    [h.stop.remote() for h in _started.values()],
                    num_returns=len(_started),
                    timeout=STOP_WAIT_S,
                )
            except Exception:  # noqa: BLE001 - killed below all the same
                logger.debug("wandbtune: node W&B service stop", exc_info=True)
            for handle in _started.values():
                try:
                    ray.kill(handle)
                except Exception:  # noqa: BLE001
                    pass
            _started.clear()


# --- in a trial process --------------------------------------------------------------

#: The node's actor this process's W&B is connected to (None: its own service).
_node: Optional[Any] = None


def connect() -> Optional[Any]:
    """Before a trial's ``wandb.init``: point this process's W&B at its node's
    service, unless W&B is connected already; the node's actor, or None when
    W&B runs its own service in this process."""
    global _node
    if _compat.wandb_service_connected():
        return _node
    _node = None
    # A token inherited from the driver (its own W&B run) is not the node's:
    # a killed trial's run would stay open in the driver's service.
    os.environ.pop("WANDB_SERVICE", None)
    if not _compat.wandb_can_hand_over():
        return None
    try:
        import ray

        job = _compat.ray_job_id()
        if job is None:
            return None
        node_id = ray.get_runtime_context().get_node_id()
        handle = ray.get_actor(_name(job, node_id), namespace=NAMESPACE)
        token = ray.get(handle.token.remote(), timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - no node service: our own
        logger.debug("wandbtune: no node W&B service: %r", exc)
        return None
    if not token:
        return None
    os.environ["WANDB_SERVICE"] = token
    _node = handle
    return handle


def disconnect() -> None:
    """This process's node service is gone: forget it and its address (the
    caller tears this process's W&B down); the next run starts a W&B service
    of this process's own."""
    global _node
    _node = None
    os.environ.pop("WANDB_SERVICE", None)


def current() -> Optional[Any]:
    """The node's actor this process's W&B is connected to, if any."""
    return _node if _compat.wandb_service_connected() else None


def release(run_id: str) -> None:
    """Before an attempt of ``run_id`` starts: have every node's actor end
    what an earlier attempt left open (bounded). Nothing to ask where this
    wandb cannot hand a run over: no trial uses the actors then."""
    try:
        handles = _all_actors()
        if handles:
            import ray

            ray.get(
                [
                    h.release.remote(run_id, RELEASE_WAIT_S, os.getpid())
                    for h in handles
                ],
                timeout=RELEASE_WAIT_S + 5.0,
            )
    except Exception as exc:  # noqa: BLE001 - the start goes on
        logger.debug("wandbtune: earlier attempt not released: %r", exc)


def moved_on(run_id: str, since: float) -> bool:
    """Whether another trial process started ``run_id`` on some node for a
    segment of the trial that began after ``since`` (wall-clock time; when
    this process's segment began): the trial went on in another actor before
    this process's start of its segment came round (``_run.RunMovedOn``)."""
    try:
        handles = _all_actors()
        if not handles:
            return False
        import ray

        started = ray.get(
            [h.started_elsewhere.remote(run_id, os.getpid(), since) for h in handles],
            timeout=CONNECT_TIMEOUT_S,
        )
        return any(started)
    except Exception as exc:  # noqa: BLE001 - the start goes on as before
        logger.debug("wandbtune: could not ask who started run %s: %r", run_id, exc)
        return False


def _all_actors() -> list[Any]:
    """This job's node actors (none where this wandb cannot hand a run over:
    no trial uses the actors then)."""
    if not _compat.wandb_can_hand_over():
        return []
    job = _compat.ray_job_id()
    if job is None:
        return []
    import ray

    prefix = _name(job, "")
    return [
        ray.get_actor(name, namespace=NAMESPACE)
        for name in _compat.named_actors(NAMESPACE)
        if name.startswith(prefix)
    ]


def register(node: Any, run_id: str, began: Optional[float] = None) -> None:
    """Tell the node's actor this process logs to ``run_id`` (it finishes the
    run as failed if the process dies without handing it over), for the
    trial's segment that began at ``began`` (wall-clock time)."""
    import ray

    try:
        ray.get(
            node.register.remote(run_id, os.getpid(), began),
            timeout=CONNECT_TIMEOUT_S,
        )
    except Exception as exc:  # noqa: BLE001 - the run is handed over all the same
        logger.debug("wandbtune: run %s not registered: %r", run_id, exc)


def forget(node: Any, run_id: str, opened: bool = True) -> None:
    """Tell the node's actor this process finished ``run_id`` itself
    (``opened``), or could not open it."""
    try:
        node.forget.remote(run_id, os.getpid(), opened)
    except Exception as exc:  # noqa: BLE001
        logger.debug("wandbtune: run %s not forgotten: %r", run_id, exc)


def hand_over(node: Any, run: Any, exit_code: int) -> bool:
    """At a trial's end: hand ``run`` to the node's actor, which finishes it;
    True if it took it (else finish it here)."""
    import ray

    if not _compat.wandb_hand_over(run, timeout=CONNECT_TIMEOUT_S):
        return False
    ray.get(
        node.finish.remote(str(run.id), exit_code, os.getpid()),
        timeout=CONNECT_TIMEOUT_S,
    )
    return True
