"""The SmoothOut paper's CIFAR recipes (landscape.training.presets) and `landscape figures --paper DIR` (analysis.experiments.paper)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.cli import build_parser, main
from analysis.cli.train import config_from_args
from analysis.experiments.paper import caveat, cifar_specs, recipes_for, shortened
from landscape.inputs.checkpoints import load_checkpoint
from landscape.training.loop import TrainConfig, _lr_factor, build_optimizer
from landscape.training.presets import PRESETS, apply_preset, get_preset
from tests.cifar_files import fake_cifar10, synthetic_cifar
from tests.helpers import run_cli

RESNET, RESNET_LARGE = "smoothout-resnet44-cifar10", "smoothout-resnet44-cifar10-large"
C3, C3_LARGE = "smoothout-c3-cifar100", "smoothout-c3-cifar100-large"
DATA = {RESNET: "cifar10:/data", RESNET_LARGE: "cifar10:/data", C3: "cifar100:/data", C3_LARGE: "cifar100:/data"}


def recipe_config(name: str, **given) -> TrainConfig:
    return TrainConfig(**apply_preset(name, {"data": DATA[name], **given}))


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate the trainer sets for `epoch` (0-based), as landscape.training.loop.train does."""
    return config.scaled_lr * _lr_factor(config, epoch)


RESNET_REGIME = [(0, 0.1), (80, 0.1), (81, 0.01), (121, 0.01), (122, 1e-3), (163, 1e-3), (164, 1e-4), (199, 1e-4)]
C3_REGIME = [(0, 1e-3), (59, 1e-3), (60, 0.01), (119, 0.01), (120, 1e-3), (179, 1e-3), (180, 1e-4), (199, 1e-4)]


@pytest.mark.parametrize(
    "name, batch, model, lr, wd, milestones, regime",
    [
        (RESNET, 128, "resnet44", 0.1, 1e-4, (81, 122, 164), RESNET_REGIME),  # models/resnet.py's CIFAR regime
        (RESNET_LARGE, 4096, "resnet44", 0.1, 1e-4, (81, 122, 164), RESNET_REGIME),
        (C3, 128, "c3", 0.01, 5e-4, (120, 180), C3_REGIME),  # models/cifar_shallow.py's regime, its 60 epochs at 0.001 too
        (C3_LARGE, 4096, "c3", 0.01, 5e-4, (120, 180), C3_REGIME),
    ],
)
def test_recipe_settings_equal_the_documented_schedule(name, batch, model, lr, wd, milestones, regime):
    config = recipe_config(name)
    assert (config.model, config.batch_size, config.epochs, config.lr, config.weight_decay) == (model, batch, 200, lr, wd)
    assert (config.optimizer, config.base, config.momentum, config.recipe) == ("smoothout", "sgd", 0.9, name)
    assert (config.lr_schedule, config.lr_milestones, config.lr_gamma) == ("step", milestones, 0.1)
    assert (config.lr_scaling, config.lr_reference_batch) == ("sqrt", 128)
    assert (config.accumulate, config.amp) == (1, "none")
    scale = math.sqrt(batch / 128)  # the reference's --lr_bb_fix: every regime lr × sqrt(B/128)
    assert config.scaled_lr == pytest.approx(lr * scale)
    for epoch, expected in regime:  # the reference regime's learning rate at each epoch
        assert lr_at(config, epoch) == pytest.approx(expected * scale), epoch
    options = config.optimizer_kwargs
    assert options["ghost_batch_size"] == 128 and options["clip_grad_norm"] == 5.0
    assert options["distribution"] == "uniform" and options["denoise"] and options["exclude_bn"] and not options["exclude_bias"]
    assert options["scale"] == "absolute" and "a" not in options  # SmoothOut's default a: unconfirmed for CIFAR
    assert get_preset(name).data_kind == DATA[name].split(":")[0]


def test_the_recipes_reuse_the_reference_trainers_rules():
    reference = get_preset("smoothout-reference")
    for name in DATA:
        preset = get_preset(name)
        assert {k: preset.settings[k] for k in reference.settings} == dict(reference.settings)
        assert {**preset.optimizer_kwargs, **preset.method_options["smoothout"]} == dict(reference.optimizer_kwargs)
    assert [p.name for p in recipes_for("cifar10")] == [RESNET, RESNET_LARGE]
    assert [p.name for p in recipes_for("cifar100")] == [C3, C3_LARGE]


@pytest.mark.parametrize(
    "name, data",
    [
        (RESNET, None),
        (RESNET, "digits"),
        (RESNET, "cifar100:/data"),
        (RESNET, "cifar10:"),
        (C3_LARGE, "cifar10:/data"),
        (C3, "npz:/data/cifar100.npz"),
    ],
)
def test_a_recipe_for_other_data_is_a_one_line_error(name, data):
    kind = DATA[name].split(":")[0]
    with pytest.raises(ValueError) as error:
        apply_preset(name, {} if data is None else {"data": data})
    message = str(error.value)
    assert "\n" not in message and repr(name) in message and f"data='{kind}:DIR'" in message and "--" not in message
    assert (f"data={data!r}" if data else "no data=...") in message


def test_the_cli_names_the_recipe_and_the_data_it_needs(tmp_path, capsys):
    assert main(["train", "--recipe", RESNET, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and RESNET in err[0] and "--data cifar10:DIR" in err[0] and not (tmp_path / "run").exists()


def test_sgd_under_a_recipe_is_the_baseline_with_the_same_schedule():
    smoothout, sgd = recipe_config(RESNET_LARGE), recipe_config(RESNET_LARGE, optimizer="sgd")
    assert sgd.optimizer_kwargs == {"ghost_batch_size": 128, "clip_grad_norm": 5.0}  # no SmoothOut option
    differ = {k for k, v in smoothout.to_dict().items() if sgd.to_dict()[k] != v}
    assert differ == {"optimizer", "optimizer_kwargs"}
    ada = recipe_config(C3, optimizer="adasmoothout")
    assert ada.optimizer_kwargs["exclude_bn"] and "scale" not in ada.optimizer_kwargs  # AdaSmoothOut keeps its filter scale
    parsed = config_from_args(
        build_parser().parse_args(
            ["train", "--recipe", RESNET, "--data", "cifar10:/data", "--optimizer", "sgd", "--out", "unused"]
        )
    )
    assert parsed == recipe_config(RESNET, optimizer="sgd")
    with pytest.raises(ValueError, match="--noise has no meaning for optimizer 'sgd'"):
        config_from_args(
            build_parser().parse_args(
                ["train", "--recipe", RESNET, "--data", "cifar10:/data", "--optimizer", "sgd", "--noise", "0.1", "--out", "u"]
            )
        )
    with pytest.raises(ValueError, match=r"trains with optimizer 'smoothout' \(or adasmoothout, sgd\), not 'sam'"):
        recipe_config(RESNET, optimizer="sam")

    # the baseline is the reference trainer without noise: one step equals SmoothOut's at a = 0 (ghost batches, clip)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 6, generator=g) * 30, torch.randint(0, 3, (300,), generator=g)
    after = {}
    for config, extra in ((sgd, {}), (smoothout, {"a": 0.0})):
        model.load_state_dict(start)
        opt = build_optimizer(config, model, **extra)
        assert opt.config()["clip_grad_norm"] == 5.0 and opt.config()["ghost_batch_size"] == 128
        opt.step(model, x, y, F.cross_entropy)
        after[config.optimizer] = {k: v.clone() for k, v in model.state_dict().items()}
    for k in start:
        torch.testing.assert_close(after["sgd"][k], after["smoothout"][k], msg=k)
    assert not torch.equal(after["sgd"]["0.weight"], start["0.weight"])


def test_paper_folder_layouts_and_a_folder_without_cifar(tmp_path):
    synthetic_cifar(tmp_path / "both", "cifar10", 10, 5)
    synthetic_cifar(tmp_path / "both", "cifar100", 10, 5)
    assert cifar_specs(tmp_path / "both") == {
        "cifar10": f"cifar10:{tmp_path / 'both' / 'cifar-10-batches-py'}",
        "cifar100": f"cifar100:{tmp_path / 'both' / 'cifar-100-python'}",
    }
    (tmp_path / "flat").mkdir()
    fake_cifar10(tmp_path / "flat")  # the archive's files in DIR itself
    assert cifar_specs(tmp_path / "flat") == {"cifar10": f"cifar10:{tmp_path / 'flat'}"}
    (tmp_path / "empty").mkdir()
    for folder, what in ((tmp_path / "empty", "no CIFAR python batches"), (tmp_path / "nowhere", "no such folder")):
        with pytest.raises(ValueError, match=what) as error:
            cifar_specs(folder)
        assert "\n" not in str(error.value)


def test_an_epoch_fraction_scales_the_schedule_and_says_it_is_not_the_paper():
    assert shortened(get_preset(RESNET), 0.5) == {
        "epochs": 100,
        "lr_milestones": (40, 61, 82),
        "lr_warmup_epochs": 0,
        "save_every": 5,
    }
    assert shortened(get_preset(RESNET), 0.005) == {"epochs": 1, "lr_milestones": (), "lr_warmup_epochs": 0, "save_every": 1}
    assert shortened(get_preset(C3), 1.0)["lr_milestones"] == (120, 180)
    assert shortened(get_preset(C3), 0.5)["lr_warmup_epochs"] == 30  # the first phase scales with the epochs too
    assert "NOT the paper's result" in caveat(0.005, {}) and "NOT" not in caveat(1.0, {})
    assert "model c3 instead" in caveat(1.0, {"model": "c3"})


def test_figures_help_describes_paper(capsys):
    with pytest.raises(SystemExit):
        main(["figures", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--paper DIR" in text and "cifar-10-batches-py" in text and "not the paper's result" in text
    assert main(["figures", "--model", "c3", "--out", "unused"]) == 2
    assert "--model only applies with --paper DIR" in capsys.readouterr().err


def test_every_recipe_is_listed_in_train_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{name}:" in text for name in PRESETS)


@pytest.mark.cli
@pytest.mark.slow
def test_cli_trains_a_recipe_on_cifar_files(tmp_path):
    synthetic_cifar(tmp_path / "data", "cifar10", 256, 64)
    done = run_cli(
        "train",
        "--recipe",
        RESNET,
        "--data",
        f"cifar10:{tmp_path / 'data'}",
        "--epochs",
        "1",
        "--out",
        tmp_path / "run",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    meta = load_checkpoint(tmp_path / "run" / "final.pt").meta
    train, opt = meta["train"], meta["optimizer"]
    assert train["recipe"] == RESNET and train["model"] == "resnet44" and train["epochs"] == 1
    assert train["lr_milestones"] == [81, 122, 164] and train["weight_decay"] == 1e-4
    assert opt["method"] == "smoothout" and opt["ghost_batch_size"] == 128 and opt["clip_grad_norm"] == 5.0
    assert opt["exclude_bn"] and opt["base_hyperparameters"]["lr"] == pytest.approx(0.1)
    assert opt["base_hyperparameters"]["momentum"] == 0.9 and opt["base_hyperparameters"]["weight_decay"] == 1e-4

    synthetic_cifar(tmp_path / "data", "cifar100", 256, 64, n_classes=100)
    done = run_cli(
        "train",
        "--recipe",
        C3_LARGE,
        "--data",
        f"cifar100:{tmp_path / 'data'}",
        "--optimizer",
        "sgd",
        "--epochs",
        "1",
        "--out",
        tmp_path / "sgd",
        "--quiet",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)["config"]
    assert config["recipe"] == C3_LARGE and config["optimizer"] == "sgd" and config["model"] == "c3"
    opt = load_checkpoint(tmp_path / "sgd" / "final.pt").meta["optimizer"]
    assert opt["method"] == "sgd" and opt["ghost_batch_size"] == 128 and "exclude_bn" not in opt
    assert opt["base_hyperparameters"]["lr"] == pytest.approx(0.01 * math.sqrt(4096 / 128))


@pytest.mark.cli
@pytest.mark.slow
def test_figures_paper_quick_end_to_end(tmp_path):
    synthetic_cifar(tmp_path / "data", "cifar10", 300, 100)
    synthetic_cifar(tmp_path / "data", "cifar100", 300, 100, n_classes=100)
    out = tmp_path / "out"
    done = run_cli(
        "figures",
        "--paper",
        tmp_path / "data",
        "--quick",
        "--model",
        "c3",
        "--model-opt",
        "channels=(4,4)",
        "--model-opt",
        "hidden=(16,)",
        "--out",
        out,
        "--cache",
        tmp_path / "cache",
        "--quiet",
        "--json",
        timeout=1800,  # ~1 CPU-minute alone; several times that on a loaded two-core CI machine
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary == json.loads((out / "paper.json").read_text())
    report = (out / "paper.md").read_text()
    assert "NOT the paper's result" in report and "Not regenerated" in report
    for kind, recipes in (("cifar10", [RESNET, RESNET_LARGE]), ("cifar100", [C3, C3_LARGE])):
        part = summary["recipes"][kind]
        assert part["recipes"] == recipes and f"recipes {recipes[0]} and {recipes[1]}" in report
        runs = part["runs"]  # 2 batch sizes × 2 methods × 2 seeds, one epoch each, every one under its recipe
        assert [(r["recipe"], r["batch_size"], r["optimizer"], r["seed"]) for r in runs] == [
            (recipe, batch, method, seed)
            for recipe, batch in zip(recipes, (128, 4096))
            for method in ("sgd", "smoothout")
            for seed in (0, 1)
        ]
        assert all(r["epochs"] == 1 and r["model"] == "c3" and r["optimizer_kwargs"]["clip_grad_norm"] == 5.0 for r in runs)
        assert all(("exclude_bn" in r["optimizer_kwargs"]) == (r["optimizer"] == "smoothout") for r in runs)
        assert set(part["groups"]) == {"sgd B=128", "smoothout B=128", "sgd B=4096", "smoothout B=4096"}
        assert {"SmoothOut vs SGD at batch 128", "SmoothOut vs SGD at batch 4096", "large vs small batch"} == set(
            part["families"]
        )
        assert all("paired over 2 shared training seeds" in t["basis"] for ts in part["families"].values() for t in ts)
        assert len(part["interpolation"]["train"]["loss_at_0"]) == 2
        for name in ("interpolation.png", "sharpness.png", "surface-1d.png", "report.md"):
            assert (out / f"c3-{kind}" / name).exists(), (kind, name)
        assert (out / f"c3-{kind}" / "interpolation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the interpolation's α = 0 end is each seed's small-batch SGD run, measured on the same training subset
        assert part["groups"]["sgd B=128"]["train loss"]["n"] == 2
        assert sum(part["interpolation"]["train"]["loss_at_0"]) / 2 == pytest.approx(
            part["groups"]["sgd B=128"]["train loss"]["mean"], rel=1e-4
        )
