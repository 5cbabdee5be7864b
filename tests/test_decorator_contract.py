"""The decorator's contract: forms, stacking, pickling, errors, no leftovers."""

from __future__ import annotations

import functools
import inspect
import re

import pytest
import ray.train
from ray import cloudpickle, tune

import wandbtune
from tests.raycompat import HAS_TUNE_REPORT, report
from wandbtune import ConfigError, wandb_trainable
from wandbtune._compat import train_api_forwarded_to_tune, train_api_is_forwarded


def plain(config, data=None):
    """Docstring of plain."""
    report({"data": data if data is not None else -1})


def passthrough(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


# -- forms and metadata ---------------------------------------------------------


def test_bare_and_called_forms_keep_name_doc_and_signature():
    for decorated in (wandb_trainable(plain), wandb_trainable(project="p")(plain)):
        assert decorated.__name__ == "plain"
        assert decorated.__doc__ == "Docstring of plain."
        assert inspect.signature(decorated, follow_wrapped=False) == inspect.signature(
            plain
        )
        assert decorated.__wrapped__ is plain
        assert not hasattr(plain, "__mixins__")  # the user's function is untouched


def test_generator_functions_stay_generator_functions():
    def gen(config):
        yield {"a": 1}

    assert inspect.isgeneratorfunction(wandb_trainable(gen))


def test_tune_attributes_survive_in_any_order():
    resources = {"cpu": 1}
    under = tune.with_resources(wandb_trainable(project="p")(plain), resources)
    over = wandb_trainable(project="p")(tune.with_resources(plain, resources))
    for fn in (under, over):
        assert fn._resources is not None
        assert any(
            issubclass(m, wandbtune._mixin.WandbTrainableMixin) for m in fn.__mixins__
        )


def test_decorating_twice_is_an_error():
    with pytest.raises(TypeError, match="twice"):
        wandb_trainable(wandb_trainable(plain))


@pytest.mark.parametrize("by_value", [True, False])
def test_the_decorator_survives_cloudpickle(by_value):
    def local(config):
        return None

    fn = wandb_trainable(project="p")(local if by_value else plain)
    restored = cloudpickle.loads(cloudpickle.dumps(fn))
    (mixin,) = restored.__mixins__
    assert mixin._wandbtune_settings.project == "p"


# -- stacking in real sweeps ----------------------------------------------------

STACKS = {
    "with_parameters over": lambda: tune.with_parameters(
        wandb_trainable(project="stack")(plain), data=7
    ),
    "with_parameters under": lambda: wandb_trainable(project="stack")(
        tune.with_parameters(plain, data=7)
    ),
    "with_resources over": lambda: tune.with_resources(
        wandb_trainable(project="stack")(plain), {"cpu": 1}
    ),
    "with_resources under": lambda: wandb_trainable(project="stack")(
        tune.with_resources(plain, {"cpu": 1})
    ),
    "functools.wraps over": lambda: passthrough(
        wandb_trainable(project="stack")(plain)
    ),
    "functools.wraps under": lambda: wandb_trainable(project="stack")(
        passthrough(plain)
    ),
}


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_stacked_decorators_still_log_each_trial(sweep, stack):
    out = sweep(STACKS[stack]())
    (result,) = out.results
    assert result.error is None, result.error
    run = out.only_run()
    expected = -1 if "with_resources" in stack or "functools" in stack else 7
    assert run.column("data") == [expected]
    assert run.exit_code == 0


def test_a_wrapper_that_drops_the_mixin_fails_with_a_clear_error(sweep):
    decorated = wandb_trainable(project="lost")(plain)

    def careless(config):  # no functools.wraps: __mixins__ is lost
        return decorated(config)

    out = sweep(careless)
    (result,) = out.results
    assert "Put @wandb_trainable outermost" in str(result.error)


# -- misuse, caught at decoration time -------------------------------------------


def test_a_class_that_is_not_a_trainable_points_to_the_callback():
    class NotATrainable:
        pass

    with pytest.raises(TypeError, match="WandbLoggerCallback"):
        wandb_trainable(NotATrainable)


def test_a_trainable_class_is_decorated_as_a_subclass():
    class MyTrainable(tune.Trainable):
        """Doc."""

    decorated = wandb_trainable(project="p")(MyTrainable)
    assert issubclass(decorated, MyTrainable)
    assert decorated.__name__ == "MyTrainable" and decorated.__doc__ == "Doc."
    assert "_wandbtune_run" not in vars(MyTrainable)  # the original is untouched
    with pytest.raises(TypeError, match="twice"):
        wandb_trainable(decorated)


def test_a_signature_tune_cannot_call_is_rejected():
    def no_args():
        pass

    def keyword_only(*, config):
        pass

    for fn in (no_args, keyword_only):
        with pytest.raises(TypeError, match=r"def \w+\(config\)"):
            wandb_trainable(fn)


@pytest.mark.parametrize("bad", ["debug", [1], ("a", None), 3])
def test_excludes_must_be_a_list_of_strings(bad):
    with pytest.raises(ConfigError, match="excludes must be a list"):
        wandb_trainable(excludes=bad)


def test_a_misspelt_wandb_init_argument_is_named():
    with pytest.raises(TypeError, match="projekt"):
        wandb_trainable(projekt="x")


def test_arguments_wandbtune_sets_per_trial_are_refused():
    with pytest.raises(ConfigError, match="id= is set by wandbtune"):
        wandb_trainable(id="fixed")


def test_both_key_sources_at_once_are_refused():
    with pytest.raises(ConfigError, match="not both"):
        wandb_trainable(api_key="k", api_key_file="f")


def test_a_missing_project_fails_the_trial_before_training_with_the_fix(sweep):
    @wandb_trainable
    def no_project(config):
        report({"x": 1})

    out = sweep(no_project)
    (result,) = out.results
    message = str(result.error)
    assert "no W&B project" in message and "WANDB_PROJECT" in message
    assert "x" not in (result.metrics or {})  # it failed before training


@pytest.mark.parametrize(
    ("entry", "error", "message"),
    [
        (
            {"project": "p", "excludes": "debug"},
            ConfigError,
            ": excludes must be a list",
        ),
        ({"project": "p", "projekt": "q"}, TypeError, ": unknown argument(s) projekt"),
        ("p", ConfigError, " must be a dict of W&B settings"),
    ],
)
def test_a_bad_wandb_config_entry_fails_fit_on_the_driver(
    sweep, tmp_path, entry, error, message
):
    @wandb_trainable
    def fn(config):
        report({"x": 1})

    # Tune creates each trial on the driver and asks the trainable for its
    # resources with the trial's config: the check runs there, so fit() raises
    # before any trial starts rather than every trial failing in its worker.
    with pytest.raises(error, match=re.escape(f'config["wandb"]{message}')) as raised:
        sweep(fn, {"wandb": entry, "i": tune.grid_search(list(range(20)))})
    assert raised.type is error  # the error itself, not Tune's wrapper
    assert not [p for p in tmp_path.rglob("result.json") if p.stat().st_size]


# -- nothing stays patched -------------------------------------------------------


def test_ray_train_api_is_patched_only_inside_the_scope():
    # Where Ray has no tune.report, ray.train.report is Tune's own: no patch.
    patches = HAS_TUNE_REPORT
    original = ray.train.report
    assert not train_api_is_forwarded()
    with train_api_forwarded_to_tune():
        with train_api_forwarded_to_tune():  # overlapping entries
            assert train_api_is_forwarded() is patches
        assert train_api_is_forwarded() is patches
    assert ray.train.report is original
    with pytest.raises(RuntimeError), train_api_forwarded_to_tune():
        raise RuntimeError("leaves the scope")
    assert ray.train.report is original


def test_nothing_stays_patched_between_trials_of_one_worker(sweep):
    # Trials reuse one actor process; each is stopped early (its function is
    # blocked in report and released with SystemExit). A patch left over from
    # an earlier trial would show as a nesting depth above one.
    @wandb_trainable(project="patched")
    def probe(config):
        import os

        from wandbtune import _compat

        for _ in range(5):
            report({"depth": _compat._forward_depth, "worker": os.getpid()})

    out = sweep(
        probe,
        {"n": tune.grid_search([0, 1, 2])},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
        stop={"training_iteration": 2},
    )
    runs = list(out.runs.values())
    assert len(runs) == 3
    assert len({pid for run in runs for pid in run.column("worker")}) == 1
    depth = 1 if HAS_TUNE_REPORT else 0  # older Ray: nothing to patch
    assert all(run.column("depth") == [depth, depth] for run in runs)


# -- setup_wandb ------------------------------------------------------------------


def test_setup_wandb_reads_settings_from_config_and_never_logs_them(sweep):
    def holds_its_run(config):
        run = wandbtune.setup_wandb(config)
        for i in range(2):
            run.log({"i": i})
            report({"i": i})
        run.finish()

    secret = "k" * 40
    out = sweep(
        holds_its_run, {"lr": 0.1, "wandb": {"project": "held", "api_key": secret}}
    )
    (result,) = out.results
    assert result.error is None, result.error
    run = out.only_run()
    assert run.project == "held"
    assert run.run_id == result.metrics["trial_id"]
    assert run.group == "exp"
    assert run.config["lr"] == 0.1 and "wandb" not in run.config
    assert secret not in repr(run.config)
    assert run.column("i") == [0, 1]


def test_setup_wandb_keyword_arguments_win_over_defaults(sweep):
    def custom(config):
        run = wandbtune.setup_wandb(
            config, project="kw", name="custom-name", group="custom-group"
        )
        run.log({"x": 1})
        run.finish()
        report({"done_": 1})

    run = sweep(custom).only_run()
    assert (run.project, run.name, run.group) == ("kw", "custom-name", "custom-group")
