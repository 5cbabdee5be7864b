"""``setup_wandb``: a drop-in for Ray's, for users who hold the run themselves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional

from wandbtune import _compat, _init_guard
from wandbtune._run import start_run
from wandbtune._settings import Settings

__all__ = ["setup_wandb"]


def setup_wandb(
    config: Optional[Mapping[str, Any]] = None,
    *,
    api_key: Optional[str] = None,
    api_key_file: Optional[str] = None,
    rank_zero_only: bool = True,
    **wandb_init_kwargs: Any,
) -> Any:
    """Start a W&B run for the current Tune trial (or Train worker) and return it.

    Like ``ray.air.integrations.wandb.setup_wandb``: the run's id, name and
    group default to the trial's id, name and experiment; ``config`` is logged
    as the run config; keyword arguments go to ``wandb.init`` and win over the
    defaults (``trial_id``/``trial_name`` are accepted as Ray's aliases for
    ``id``/``name``). Unlike it, settings in ``config["wandb"]`` (project, group,
    api_key_file, ...) are used and never logged, no deprecated ``wandb.init``
    arguments are passed, and it works on current Ray. You finish the run
    (``run.finish()``) yourself.

    With ``rank_zero_only`` (the default), Ray Train workers other than rank 0
    get a disabled run, so a distributed run is logged once.
    """
    import wandb

    from wandbtune._mixin import active_run

    if rank_zero_only and _compat.world_rank() not in (None, 0):
        return wandb.init(mode="disabled")
    active = active_run()
    if active is not None:
        # Inside @wandb_trainable the trial has its run already: the same one
        # (its finish() left to wandbtune, which finishes it with the trial).
        return _init_guard.TrialRunView(active.run)
    session = _compat.get_session()

    config = dict(config or {})
    overrides = dict(wandb_init_kwargs)
    for alias, name in (("trial_id", "id"), ("trial_name", "name")):
        if alias in overrides:
            overrides.setdefault(name, overrides.pop(alias))
    managed: dict[str, Any] = {
        k: overrides.pop(k)
        for k in ("id", "name", "resume", "reinit")
        if k in overrides
    }
    if "config" in overrides:
        raise TypeError("setup_wandb: pass the config as the first argument.")
    settings = Settings.from_arguments(
        "setup_wandb", api_key=api_key, api_key_file=api_key_file, **overrides
    ).merged(config)
    if managed:
        settings = replace(settings, init_kwargs={**settings.init_kwargs, **managed})

    info = getattr(session, "trial_info", None)
    return start_run(
        settings,
        require_project=False,  # as Ray's: W&B's default project
        trial_id=getattr(info, "id", None),
        trial_name=getattr(info, "name", None),
        experiment=getattr(info, "experiment_name", None),
        config=config,  # run_config leaves out config["wandb"]
        dir=_compat.storage_trial_dir(getattr(session, "storage", None)),
    )
