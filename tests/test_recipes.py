"""The training recipes of `landscape demo` and `landscape figures`: the methods' documented epochs (docs/methods.md), noise sizes, run names."""

import pytest

from analysis.cli.train import NOISE_OPTION
from analysis.experiments.recipes import CONVERGED, DEMO, LARGE, METHODS, SMALL, config, run_name
from landscape.inputs.models import model_for_data
from landscape.training.optim import make_optimizer


def test_the_converged_recipe_is_methods_md_and_the_demo_a_third():
    assert CONVERGED.epochs == {SMALL: 60, LARGE: 600} and DEMO.epochs == {SMALL: 20, LARGE: 200}
    run = config("sgd", SMALL, 2)
    assert (run.epochs, run.lr, run.batch_size, run.seed, run.recipe) == (60, 0.01, 32, 2, "converged")
    assert config("sgd", LARGE, 0).epochs // config("sgd", LARGE, 0).save_every == 60  # enough to match train losses
    assert config("sgd", LARGE, 0, recipe=DEMO).recipe == "demo"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_with_its_default_and_a_chosen_noise_size(method):
    model, _ = model_for_data("mlp", (40,), 10)
    for noise in (None, 0.03):
        run = config(method, LARGE, 0, noise=None if method == "sgd" else noise)
        make_optimizer(run.optimizer, model, lr=run.lr, **run.optimizer_kwargs)  # a wrong option name raises
    if method != "sgd":
        assert config(method, LARGE, 0, noise=0.03).optimizer_kwargs == {NOISE_OPTION[method]: 0.03}
    assert config("smoothout", SMALL, 0).optimizer_kwargs == {"a": 0.02}  # SmoothOut's default (docs/methods.md)


def test_run_names_differ_whenever_the_runs_do():
    runs = [
        config("smoothout", SMALL, 0),
        config("smoothout", SMALL, 0, noise=0.04),
        config("smoothout", SMALL, 1),
        config("smoothout", LARGE, 0),
        config("smoothout", SMALL, 0, recipe=DEMO),
        config("smoothout", SMALL, 0, validation=500),
        config("sgd", SMALL, 0),
    ]
    names = [run_name(r) for r in runs]
    assert len(set(names)) == len(names)
    assert names[0] == "smoothout-a0.02-b32-e60-seed0" and names[-1] == "sgd-b32-e60-seed0"
