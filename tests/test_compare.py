"""`landscape compare` and `landscape figures`: paired differences, seed aggregation, reports, refusal of mixed inputs."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch

from analysis.report.differences import aggregate, difference
from landscape.curvature.spectrum import lanczos
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
from landscape.inputs.checkpoints import load_checkpoint, save_checkpoint
from landscape.inputs.data import MeasurementSet, load_data
from landscape.inputs.models import model_for_data
from landscape.results import Quantity
from landscape.training.loop import TrainConfig, train
from tests.helpers import result_of, run_cli


def _member(value, stderr=0.0, samples=None, seed=None):
    quantity = Quantity("x", value, stderr, samples=None if samples is None else tuple(samples))
    return SimpleNamespace(quantities={"x": quantity}, seed=seed)


def test_seed_groups_use_welch_intervals():
    a, b = [1.0, 1.2, 0.9, 1.1], [1.7, 1.5, 1.9]
    d = difference([_member(v) for v in a], [_member(v) for v in b], "x")
    ci = scipy.stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert d.diff == pytest.approx(np.mean(b) - np.mean(a))
    assert d.diff - d.halfwidth == pytest.approx(ci.low, rel=1e-10)
    assert d.diff + d.halfwidth == pytest.approx(ci.high, rel=1e-10)
    assert d.significant and d.seeds
    agg = aggregate([_member(v) for v in b], "x")
    assert agg.n == 3 and agg.spread == pytest.approx(np.std(b, ddof=1))


def test_single_runs_pair_their_noise_draws():
    rng = np.random.default_rng(0)
    shared = rng.normal(1.0, 0.5, 50)  # the common noise draw dominates both runs' samples
    a, b = shared, shared + 0.05 + rng.normal(0, 0.02, 50)
    se = lambda s: s.std(ddof=1) / math.sqrt(len(s))  # noqa: E731
    d = difference([_member(a.mean(), se(a), a)], [_member(b.mean(), se(b), b)], "x")
    t = scipy.stats.t.ppf(0.975, 49)
    assert d.halfwidth == pytest.approx(t * se(b - a), rel=1e-12)
    assert d.unpaired_halfwidth == pytest.approx(t * math.hypot(se(a), se(b)), rel=1e-12)
    assert d.halfwidth < d.unpaired_halfwidth / 5
    assert d.significant and not d.seeds


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for seed, batch in ((0, 32), (1, 512)):
        config = TrainConfig(
            data="digits",
            model="mlp",
            model_kwargs={"hidden": (16,)},
            batch_size=batch,
            lr=0.05,
            epochs=3,
            seed=seed,
            save_every=100,
        )
        paths.append(train(config, root / f"b{batch}", progress=False))
    return paths


@pytest.mark.cli
def test_compare_writes_a_paired_report(two_runs, tmp_path):
    out = tmp_path / "cmp"
    result = run_cli(
        "compare",
        *two_runs,
        "--metrics",
        "eig,trace,sharpness-curve,surface",
        "--n-samples",
        "300",
        "--k",
        "2",
        "--probes",
        "20",
        "--noise-samples",
        "40",
        "--surface-range=-1:1:5",
        "--out",
        out,
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "report:" in result.stdout and "sgd B=32" in result.stdout
    results = json.loads((out / "results.json").read_text())
    # the table's λ1 is Lanczos on the same measurement set with the same seed
    ckpt = load_checkpoint(two_runs[0])
    objective = Objective(ckpt.build_model(), MeasurementSet("train", 300, 256).batches(load_data("digits")), device="cpu")
    expected = lanczos(HessianOperator(objective), 2, seed=0)
    assert results["groups"]["sgd B=32"]["λ1"]["mean"] == pytest.approx(float(expected.values[0]), rel=1e-4)
    # train loss and gradient norm stand beside the sharpness numbers
    assert results["groups"]["sgd B=32"]["gradient norm"]["mean"] == pytest.approx(float(objective.grad().norm()), rel=1e-4)
    assert results["groups"]["sgd B=32"]["train loss"]["mean"] == pytest.approx(objective.loss(), rel=1e-5)
    # common random numbers: every paired interval on the expected-loss difference beats independent runs
    diffs = results["differences"]["sgd B=512"]
    radii = [k for k in diffs if k.startswith("ΔL")]
    assert len(radii) == 3
    for k in radii:
        assert diffs[k]["halfwidth"] < diffs[k]["unpaired_halfwidth"], k
    for name in ("report.md", "report.html", "surface-1d.png", "sharpness.png"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and 'src="http' not in page
    md = (out / "report.md").read_text()
    assert "![" in md and "95%" in md and "300 samples" in md
    n_tests = sum(d is not None for diffs in results["differences"].values() for d in diffs.values())
    assert f"over a family of {n_tests} tests (Holm 1979): every row of this table" in md  # which family, how many
    assert "no BatchNorm" in md and "≤None" not in md  # an MLP: no BN mode to name


@pytest.mark.cli
def test_compare_refuses_mixed_architectures(two_runs, tmp_path):
    model, spec = model_for_data("convnet", (1, 8, 8), 10)
    other = save_checkpoint(tmp_path / "conv.pt", model, model_spec=spec, data_spec={"spec": "digits"})
    result = run_cli("compare", two_runs[0], other, "--out", tmp_path / "x")
    assert result.returncode == 2
    assert "differ in model" in result.stderr and "--allow-mixed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.cli
def test_figures_quick_writes_every_figure(tmp_path):
    from analysis.experiments.noise_sweep import GRID

    # the whole pipeline: ~1.5 CPU-minutes alone, but past 600 s on a loaded two-core CI machine
    result = run_cli(
        "figures", "--quick", "--out", tmp_path / "fig", "--cache", tmp_path / "cache", "--quiet", "--jobs", "2", timeout=1800
    )
    assert result.returncode == 0, result.stderr
    names = [
        "interpolation.png",
        "random-1d-small-batch.png",
        "random-1d-large-batch.png",
        "contours.png",
        "sharpness-small-batch.png",
        "sharpness-large-batch.png",
        "spectra.png",
        "correlation.png",
        "connectivity.png",
        "eigenvector-plane.png",
    ]
    for name in names:
        assert (tmp_path / "fig" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (tmp_path / "fig" / "methods.md").read_text()
    summary = json.loads((tmp_path / "fig" / "figures.json").read_text())
    for method in ("sgd", "smoothout", "adasmoothout", "ssgd", "nso", "nrs", "sam"):
        noise = "" if method == "sgd" else f"={summary['noise_sweep'][method]['chosen']:g}"
        for batch in (32, 2000):
            assert re.search(rf"\| {method} \| [a-z]*{re.escape(noise)} \| {batch} \|", table), (method, batch)
        if method != "sgd":  # the size chosen is one the sweep trained, the best on the validation split
            points = summary["noise_sweep"][method]["points"]
            assert summary["noise_sweep"][method]["chosen"] in GRID[method]
            assert max(p["validation_accuracy"] for p in points) == next(
                p["validation_accuracy"] for p in points if p["value"] == summary["noise_sweep"][method]["chosen"]
            )
    assert "matched train loss" in table and "Holm" in table
    for plane in summary["eigenvector_plane"].values():  # each panel's axes: two eigenvalues, largest first
        assert len(plane["eigenvalues"]) == 2 and plane["eigenvalues"][0] >= plane["eigenvalues"][1] > 0
    correlation = summary["correlation"]  # 2 methods × 2 batch sizes × 2 learning rates × 1 seed, ranked by their gaps
    assert len(correlation["runs"]) == 8 and correlation["axes"] == ["method", "batch_size", "lr"]
    assert {c["measure"] for c in correlation["correlations"]} == {
        "λ1",
        "trace",
        "ΔL a=0.02",
        "ε-sharpness",
        "adaptive-worst-case",
    }
    assert "granulated" in (tmp_path / "fig" / "correlation.md").read_text()
    for title, tests in summary["families"].items():
        assert tests and all(t["holm_p"] >= t["p_value"] for t in tests), title
        assert all("paired over 2 shared training seeds" in t["basis"] for t in tests), title
    data = load_data("mnist1d")
    for alpha, batch, epochs in (("loss_at_0", 32, 2), ("loss_at_1", 2000, 24)):  # the interpolation's ends
        for seed in (0, 1):
            model = load_checkpoint(tmp_path / "cache" / "runs" / f"sgd-b{batch}-e{epochs}-seed{seed}" / "final.pt").build_model()
            objective = Objective(model, MeasurementSet("train", 500, 1000).batches(data), device="cpu")
            assert summary["interpolation"]["train"][alpha][seed] == pytest.approx(objective.loss(), rel=1e-5), (alpha, seed)
    # a second run reuses every training run and measurement
    again = run_cli("figures", "--quick", "--out", tmp_path / "fig2", "--cache", tmp_path / "cache", "--quiet")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "fig2" / "figures.json").read_text())["families"] == summary["families"]


def test_figures_quick_never_writes_into_figures_unless_asked():
    from analysis.experiments.figures import output_folders

    assert output_folders(None, None, quick=False) == (Path("figures"), Path("runs/figures"))
    out, cache = output_folders(None, None, quick=True)
    assert Path("figures") not in (out, *out.parents) and out.parent == cache
    assert output_folders("figures", None, quick=True)[0] == Path("figures")


def test_each_method_is_compared_with_sgd_at_its_own_batch_size():
    from analysis.cli.compare import baselines

    def cfg(optimizer, batch):
        return {"optimizer": optimizer, "batch_size": batch}

    configs = {
        "sgd B=32": cfg("sgd", 32),
        "sgd B=2000": cfg("sgd", 2000),
        "smoothout B=32": cfg("smoothout", 32),
        "smoothout B=2000": cfg("smoothout", 2000),
        "sam B=512": cfg("sam", 512),
        "foreign": None,
    }
    assert baselines(configs) == {
        "sgd B=2000": "sgd B=32",
        "smoothout B=32": "sgd B=32",
        "smoothout B=2000": "sgd B=2000",
        "sam B=512": "sgd B=32",
        "foreign": "sgd B=32",
    }
    assert set(baselines(configs, "smoothout B=2000").values()) == {"smoothout B=2000"}
    with pytest.raises(ValueError, match="--baseline 'adam'"):
        baselines(configs, "adam")


def test_checkpoints_that_are_not_seeds_of_one_method_get_their_own_labels():
    from analysis.cli.compare import default_labels
    from analysis.measures.notes import OptionNote

    sgd = {"optimizer": "sgd", "batch_size": 32}
    seeds = [{"train": {**sgd, "seed": s}} for s in (0, 1)]
    assert default_labels(["r0/final.pt", "r1/final.pt"], seeds) == ["sgd B=32", "sgd B=32"]  # seeds: grouped, silently
    with pytest.warns(OptionNote, match="would share the label 'x' without being training seeds"):
        assert default_labels(["x/a.pt", "x/b.pt"], [{}, {}]) == ["a.pt", "b.pt"]  # bare state dicts in one folder
    same_seed = [{"train": {**sgd, "seed": 0}}] * 2
    with pytest.warns(OptionNote):
        labels = default_labels(["r0/final.pt", "r1/final.pt"], same_seed)
    assert labels == ["sgd B=32 (r0/final.pt)", "sgd B=32 (r1/final.pt)"]


def test_each_holm_p_says_which_family_of_tests_it_corrects_over():
    """The demo's question tables and compare's Differences table adjust over different families: each caption says so."""
    from analysis.experiments.demo import findings_caption

    answers = {"Is large-batch SGD sharper?": {"λ1": None, "trace": None}, "Does SmoothOut flatten it?": {"λ1": None}}
    caption = findings_caption(answers)
    assert caption.startswith("Holm-adjusted p controls the family-wise error over a family of 3 tests (Holm 1979): ")
    assert "every row of the 2 question tables at the top" in caption and "not the Differences table below" in caption


def test_two_bare_state_dicts_in_one_folder_are_compared_with_each_other(tmp_path):
    for i, name in enumerate("ab"):
        torch.manual_seed(i)
        torch.save(model_for_data("mlp", (1, 8, 8), 10, hidden=(8,))[0].state_dict(), tmp_path / f"{name}.pt")
    options = "--model mlp --model-opt hidden=(8,) --data digits --metrics eig --k 1 --n-samples 50 --json --quiet"
    done = run_cli("compare", tmp_path / "a.pt", tmp_path / "b.pt", *options.split(), "--out", tmp_path / "cmp")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [m["label"] for m in result["checkpoints"]] == ["a.pt", "b.pt"]
    assert result["differences"]["b.pt"]["λ1"] is not None
    assert "note: 2 checkpoints would share the label" in done.stderr


def test_sharpness_maxima_and_batch_measures_enter_the_comparison_paired():
    from analysis.measures.registry import metric_quantities
    from landscape.results import Quantity

    worst = {"value": 0.3, "spread": 0.02, "adaptive": True}
    q = metric_quantities("adaptive-worst-case", worst_case_result(**worst))["adaptive-worst-case"]
    assert q == Quantity("adaptive-worst-case", 0.3, 0.02, "adaptive-worst-case")  # the start spread stands in
    m = metric_quantities("m-sharpness", m_sharpness_result(value=0.2, stderr=0.01, batch_values=[0.1, 0.3]))["m-sharpness"]
    assert m.samples == (0.1, 0.3) and m.stderr == 0.01  # paired per batch
    average = expected_loss_result(increase=0.05, stderr=0.004, samples=[1.1, 1.0], clean_loss=1.0)
    a = metric_quantities("average-case", average)["average-case"]
    assert a.samples == pytest.approx((0.1, 0.0)) and a.value == 0.05  # paired per draw, as increases
    assert metric_quantities("expected-loss", average) == {}  # measure's row only; compare reads the sharpness curve


def worst_case_result(**given):
    from landscape.sharpness.balls import WorstCase

    return result_of(WorstCase, p="2", **given)


def m_sharpness_result(**given):
    from landscape.sharpness.balls import MSharpness

    return result_of(MSharpness, p="2", **given)


def expected_loss_result(**given):
    from landscape.sharpness.perturb import ExpectedLoss

    return result_of(ExpectedLoss, ci=[0, 0], increase_ci=[0, 0], **given)


def test_p_values_match_scipy_and_holm_controls_the_family():
    from analysis.report.differences import holm

    rng = np.random.default_rng(3)
    a, b = rng.normal(0.0, 1.0, 3), rng.normal(1.5, 0.5, 4)
    d = difference([_member(v) for v in a], [_member(v) for v in b], "x")
    assert d.p_value == pytest.approx(scipy.stats.ttest_ind(b, a, equal_var=False).pvalue, rel=1e-10)
    single = difference([_member(1.0, 0.3)], [_member(1.9, 0.4)], "x")
    assert single.p_value == pytest.approx(2 * scipy.stats.norm.sf(0.9 / 0.5), rel=1e-10)
    # Holm (1979): sorted p·(k − rank), made monotone, capped at 1
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == []


def _seeded(values, seeds):
    return [_member(v, seed=s) for v, s in zip(values, seeds)]


def test_shared_training_seeds_are_compared_paired():
    # seed-to-seed variation shared by both methods (same initial weights) dominates their difference
    base = [1.0, 2.0, 3.0, 4.0]
    other = [1.3, 2.25, 3.35, 4.3]
    d = difference(_seeded(base, [0, 1, 2, 3]), _seeded(other, [0, 1, 2, 3]), "x")
    ci = scipy.stats.ttest_rel(other, base).confidence_interval(0.95)
    assert d.diff - d.halfwidth == pytest.approx(ci.low, rel=1e-10)
    assert d.p_value == pytest.approx(scipy.stats.ttest_rel(other, base).pvalue, rel=1e-10)
    assert "paired over 4 shared training seeds" in d.basis and d.significant
    assert d.unpaired_halfwidth > 5 * d.halfwidth  # Welch would drown it in the seed spread
    # pairs are matched by seed, not by order
    shuffled = difference(_seeded(base, [0, 1, 2, 3]), _seeded(other[::-1], [3, 2, 1, 0]), "x")
    assert shuffled.halfwidth == pytest.approx(d.halfwidth, rel=1e-12)
    # different seed sets: unpaired Welch
    welch = difference(_seeded(base, [0, 1, 2, 3]), _seeded(other, [4, 5, 6, 7]), "x")
    assert welch.basis.startswith("seed spread (Welch") and not welch.significant


@pytest.mark.cli
def test_at_train_loss_picks_each_runs_checkpoint_closest_to_the_target(tmp_path):
    from analysis.cli.matched_loss import at_train_loss, parse_target, trajectory

    paths = []
    for name, lr in (("fast", 0.2), ("slow", 0.02)):
        config = TrainConfig(data="digits", model="mlp", model_kwargs={"hidden": (16,)}, batch_size=256, lr=lr, epochs=6, seed=0)
        paths.append(str(train(config, tmp_path / name, progress=False)))
    runs = [trajectory(p) for p in paths]
    assert [len(r) for r in runs] == [7, 7] and runs[0][0].epoch == 0
    target = max(min(p.train_loss for p in r) for r in runs)
    chosen, used = at_train_loss(paths, "matched")
    assert used == target
    for run, point in zip(runs, chosen):
        assert abs(point.train_loss - target) == min(abs(p.train_loss - target) for p in run)
        # the loss it recorded is the loss of those weights on the whole training split
        objective = Objective(
            load_checkpoint(point.path).build_model(),
            MeasurementSet("train", None, 1024).batches(load_data("digits")),
            device="cpu",
        )
        assert objective.loss() == pytest.approx(point.train_loss, rel=1e-5)
    assert chosen[0].epoch < 6  # the fast run is taken before its end
    assert at_train_loss(paths, 1e-9)[0][0] == min(runs[0], key=lambda p: p.train_loss)  # below every loss: the lowest
    with pytest.raises(ValueError, match="positive train loss or 'matched'"):
        parse_target("lowest")
    # through the CLI: the report says where each run was measured
    out = tmp_path / "cmp"
    result = run_cli(
        "compare",
        *paths,
        "--labels",
        "fast,slow",
        "--at-train-loss",
        "matched",
        "--metrics",
        "eig",
        "--k",
        "1",
        "--n-samples",
        "200",
        "--out",
        out,
        "--quiet",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    members = json.loads(result.stdout)["checkpoints"]
    assert [m["at_train_loss"]["epoch"] for m in members] == [p.epoch for p in chosen]
    assert "At matched train loss" in (out / "report.md").read_text()


@pytest.mark.cli
def test_at_train_loss_needs_a_trajectory(two_runs, tmp_path):
    lone = tmp_path / "lone" / "model.pt"
    lone.parent.mkdir()
    lone.write_bytes(Path(two_runs[0]).read_bytes())
    result = run_cli("compare", str(lone), two_runs[1], "--at-train-loss", "matched", "--out", tmp_path / "x")
    assert result.returncode != 0 and "no trajectory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_demo_calls_a_difference_only_after_holms_correction_over_all_its_questions():
    from analysis.experiments.demo import CLAIMS, SHARPNESS, finding_rows, findings
    from analysis.report.comparison import ComparedCheckpoint, Comparison

    checkpoints = []
    for label, shift, jitter in (
        ("sgd B=32", 0.0, (0, 0, 0)),
        ("sgd B=2000", 1.0, (0.1, -0.1, 0)),
        ("smoothout B=32", 0.04, (-0.01, 0.01, 0)),
        ("smoothout B=2000", 0.5, (0.1, -0.08, 0)),
    ):
        for seed in range(3):
            base = 1.0 + seed  # seed effects shared by every method: the paired test removes them
            quantities = {q: Quantity(q, base + shift + jitter[seed]) for q in SHARPNESS}
            checkpoints.append(ComparedCheckpoint(label, f"{label}/{seed}.pt", seed, None, {}, {}, quantities))
    answers = findings(Comparison(tuple(checkpoints), {}, "sgd B=32", {}, {}, (), None, {}))
    tests = [d for diffs in answers.values() for d in diffs.values()]
    assert len(tests) == len(CLAIMS) * len(SHARPNESS)
    assert all(d.holm_p >= d.p_value for d in tests)
    ranked = sorted(d.p_value for d in tests)
    assert min(d.holm_p for d in tests) == pytest.approx(min(1.0, len(tests) * ranked[0]))
    for diffs in answers.values():
        for row, d in zip(finding_rows(diffs), diffs.values()):
            assert row[-1] == ("yes" if d.holm_p < 0.05 else "no")
    small = next(diffs for q, diffs in answers.items() if "small-batch minimum" in q)
    assert all(row[-1] == "no" for row in finding_rows(small)) and any(d.p_value < 0.05 for d in small.values())
