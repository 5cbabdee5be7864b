"""What the user asked for: the decorator's arguments, checked, and merged
with a trial's ``config["wandb"]``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from wandbtune import _compat

#: The key of the trial config that holds per-trial settings.
CONFIG_KEY = "wandb"

#: Arguments that are ours, not ``wandb.init``'s.
_OWN = (
    "project",
    "group",
    "api_key_file",
    "api_key",
    "excludes",
    "log_config",
    "upload_checkpoints",
    "strict",
    "all_ranks",
)

#: ``wandb.init`` arguments that wandbtune sets itself, per trial.
_MANAGED = ("id", "name", "config", "resume", "reinit")

PROJECT_ENV_VARS = ("WANDB_PROJECT_NAME", "WANDB_PROJECT")
GROUP_ENV_VAR = "WANDB_GROUP_NAME"

#: W&B settings users put in the driver's environment, shipped to the trials
#: with the trainable: a worker started before they were set has not got them.
#: Never the API key (the pickled trainable may be written to storage).
#: WANDB_DIR is created on each node that runs a trial.
SHIPPED_ENV_VARS = (
    *PROJECT_ENV_VARS,
    GROUP_ENV_VAR,
    "WANDB_MODE",
    "WANDB_ENTITY",
    "WANDB_DIR",
    "WANDB_BASE_URL",
)


def _pop_settings_key(kwargs: dict[str, Any]) -> Any:
    """Take an API key out of a ``settings=`` argument, so that it is handled
    (and kept out of pickles) like ``api_key=``."""
    user = kwargs.get("settings")
    if isinstance(user, Mapping) and user.get("api_key"):
        kwargs["settings"] = {k: v for k, v in user.items() if k != "api_key"}
        return user["api_key"]
    if user is not None and getattr(user, "api_key", None):
        kwargs["settings"] = user.model_copy(update={"api_key": None})
        return user.api_key
    return None


def _shipped_environ() -> dict[str, str]:
    return {k: os.environ[k] for k in SHIPPED_ENV_VARS if os.environ.get(k)}


class ConfigError(ValueError):
    """Bad wandbtune settings; the message says how to fix them."""


@dataclass(frozen=True)
class Settings:
    """Validated settings for one decorated trainable (or one trial)."""

    project: str | None = None
    group: str | None = None
    api_key_file: str | None = None
    api_key: str | None = field(default=None, repr=False)
    excludes: tuple[str, ...] = ()
    log_config: bool = False
    upload_checkpoints: bool = False
    #: Fail the trial when W&B cannot start a run (default: log a warning and
    #: train on without W&B for that trial).
    strict: bool = False
    #: Ray Train: every rank joins rank 0's run (W&B's shared mode, online),
    #: labelled by rank, with its system metrics and console.
    all_ranks: bool = False
    init_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: The driver's SHIPPED_ENV_VARS, captured when the trainable is pickled
    #: for the workers; they win over the worker's own environment.
    environ: Mapping[str, str] = field(default_factory=dict)

    #: Capture the environment when pickled (False for the callback, which
    #: runs in the driver and is pickled only into the experiment's state).
    ship_environ: bool = True

    def __getstate__(self) -> dict[str, Any]:
        # Settings are pickled with the decorated trainable: on the driver,
        # where the code that warns a Train V1 rank 0 of an interrupt starts.
        from wandbtune import _node_service, _train_v1_notices

        _train_v1_notices.on_pickled()
        state = dict(self.__dict__)
        if self.ship_environ:
            # ... and where the experiment gets one W&B service per node.
            _node_service.on_pickled()
            state["environ"] = {**_shipped_environ(), **self.environ}
        if self.api_key:
            # The key travels through the Ray cluster's own store, not in the
            # pickle: Ray writes some pickles to storage (Ray 2.30's
            # trainer.pkl holds a Train loop). Without a Ray cluster, inline.
            token = _compat.key_to_cluster(self.api_key)
            if token is not None:
                state["api_key"] = None
                state["_api_key_token"] = token
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # ... and unpickled where they run: in a Train V1 trainer's trial
        # actor, where the trial's stop must wait for rank 0 (see there).
        from wandbtune import _train_v1_notices

        _train_v1_notices.on_unpickled()
        state = dict(state)
        token = state.pop("_api_key_token", None)
        if token is not None:
            state["api_key"] = _compat.key_from_cluster(token)
        self.__dict__.update(state)

    def env(self, name: str) -> str | None:
        """An environment setting: the driver's if shipped, else this process's."""
        return self.environ.get(name) or os.environ.get(name) or None

    @classmethod
    def from_arguments(cls, where: str, **kwargs: Any) -> Settings:
        """Check arguments as given to the decorator or in ``config["wandb"]``."""
        own = {k: kwargs.pop(k) for k in _OWN if k in kwargs}
        for name in _MANAGED:
            if name in kwargs:
                raise ConfigError(
                    f"{where}: {name}= is set by wandbtune for each trial "
                    f"(id = trial id, name = trial name, config = trial config, "
                    f"resume = 'allow'); remove it."
                )
        for key in ("project", "group", "api_key_file", "api_key"):
            value = own.get(key)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(
                    f"{where}: {key} must be a string, got {type(value).__name__}."
                )
        if own.get("api_key") and own.get("api_key_file"):
            raise ConfigError(f"{where}: give api_key or api_key_file, not both.")
        excludes = own.get("excludes", ())
        if (
            isinstance(excludes, str)
            or not isinstance(excludes, Sequence)
            or not all(isinstance(e, str) for e in excludes)
        ):
            raise ConfigError(
                f"{where}: excludes must be a list of metric names (strings), "
                f"e.g. excludes=['debug'], got {excludes!r}."
            )
        for key in ("log_config", "upload_checkpoints", "strict", "all_ranks"):
            if key in own and not isinstance(own[key], bool):
                raise ConfigError(
                    f"{where}: {key} must be True or False, got {own[key]!r}."
                )
        api_key_file = own.get("api_key_file")
        key_in_settings = _pop_settings_key(kwargs)
        if key_in_settings:
            if own.get("api_key") or api_key_file:
                raise ConfigError(f"{where}: give the API key once, not twice.")
            own["api_key"] = key_in_settings
        return cls(
            project=own.get("project"),
            group=own.get("group"),
            api_key_file=os.fspath(api_key_file) if api_key_file else None,
            api_key=own.get("api_key"),
            excludes=tuple(excludes),
            log_config=own.get("log_config", False),
            upload_checkpoints=own.get("upload_checkpoints", False),
            strict=own.get("strict", False),
            all_ranks=own.get("all_ranks", False),
            init_kwargs=dict(kwargs),
        )

    def merged(self, trial_config: Mapping[str, Any]) -> Settings:
        """These settings overridden by the trial's ``config["wandb"]``."""
        overrides = trial_config.get(CONFIG_KEY) if trial_config else None
        if overrides is None:
            return self
        if not isinstance(overrides, Mapping):
            raise ConfigError(
                f'config["{CONFIG_KEY}"] must be a dict of W&B settings, got '
                f"{type(overrides).__name__}."
            )
        given = Settings.from_arguments(f'config["{CONFIG_KEY}"]', **dict(overrides))
        keys = set(overrides)
        if "api_key" in keys or "api_key_file" in keys:
            # A key source given per trial replaces the decorator's.
            base = replace(self, api_key=None, api_key_file=None)
        else:
            base = self
        return replace(
            base,
            **{k: getattr(given, k) for k in _OWN if k in keys},
            init_kwargs={**self.init_kwargs, **given.init_kwargs},
        )

    def check_trial_config(self, trial_config: Mapping[str, Any]) -> Settings:
        """On the driver, as Tune creates a trial: raise for a bad
        ``config["wandb"]`` before any trial starts, and warn once about an
        API key in it (Tune writes the trial config to its result files).
        Returns the trial's settings (``merged``)."""
        overrides = trial_config.get(CONFIG_KEY) if trial_config else None
        if isinstance(overrides, Mapping) and overrides.get("api_key"):
            _warn_key_in_config()
        merged = self.merged(trial_config)
        if merged is not self:
            merged.check_init_kwargs(f'config["{CONFIG_KEY}"]')
            merged.check_all_ranks(f'config["{CONFIG_KEY}"]')
        return merged

    def check_init_kwargs(self, where: str) -> None:
        """Name a misspelt ``wandb.init`` argument now, not in every trial."""
        if not self.init_kwargs:
            return
        import inspect

        import wandb

        accepted = inspect.signature(wandb.init).parameters
        unknown = sorted(set(self.init_kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"{where}: unknown argument(s) {', '.join(unknown)}. Other than "
                "project, group, api_key_file, api_key, excludes, log_config, "
                "upload_checkpoints, strict and all_ranks, arguments go to "
                "wandb.init, which "
                "takes: "
                f"{', '.join(sorted(accepted))}."
            )

    def check_all_ranks(self, where: str) -> None:
        """``all_ranks`` needs W&B's shared mode: online only."""
        if self.all_ranks and self.offline():
            raise ConfigError(
                f"{where}: all_ranks=True needs W&B online: every rank writes to "
                "rank 0's run through W&B's shared mode, which offline and "
                f"disabled runs do not have (mode is {self.mode()!r}). Remove "
                "all_ranks, or log online."
            )

    def resolved_project(self) -> str | None:
        if self.project:
            return self.project
        for var in PROJECT_ENV_VARS:
            if self.env(var):
                return self.env(var)
        return None

    def mode(self) -> str | None:
        """W&B's mode: ``mode=``, ``settings=...(mode=)``, else WANDB_MODE."""
        user_settings = self.init_kwargs.get("settings")
        if isinstance(user_settings, Mapping):
            from_settings = user_settings.get("mode")
        else:
            from_settings = getattr(user_settings, "mode", None)
            # wandb.Settings has a default mode; only an explicit one counts
            fields_set = getattr(user_settings, "model_fields_set", ())
            from_settings = from_settings if "mode" in fields_set else None
        mode = self.init_kwargs.get("mode") or from_settings or self.env("WANDB_MODE")
        return str(mode) if mode else None

    def offline(self) -> bool:
        return self.mode() in ("offline", "dryrun", "disabled")

    def read_api_key(self) -> str | None:
        """The API key these settings name, if any; never stored anywhere."""
        if self.api_key:
            return self.api_key
        if not self.api_key_file:
            return None
        path = os.path.expanduser(self.api_key_file)
        try:
            with open(path, encoding="utf-8") as fh:
                key = fh.readline().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the W&B API key file {path!r} ({exc.strerror}). "
                "Create it with your key from https://wandb.ai/authorize, or "
                "set WANDB_API_KEY, or run offline with WANDB_MODE=offline."
            ) from None
        if not key:
            raise ConfigError(f"the W&B API key file {path!r} is empty.")
        return key


_warned_key_in_config = False


def _warn_key_in_config() -> None:
    global _warned_key_in_config
    if _warned_key_in_config:
        return
    _warned_key_in_config = True
    logging.getLogger("wandbtune").warning(
        'wandbtune: config["%s"]["api_key"] is part of the trial config, which '
        "Tune writes to params.json, result.json and its experiment state in the "
        "storage path. wandbtune keeps it out of W&B, but not out of Tune's files: "
        "pass api_key_file=... or set WANDB_API_KEY on every node instead.",
        CONFIG_KEY,
    )
