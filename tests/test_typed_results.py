"""Results stay typed until rendered: every measure's result survives JSON and back (a resumed results file, a
figures cache), quantities carry their labels, and the specs built from the command line are what the library takes."""

import dataclasses
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from analysis.cli import build_parser
from analysis.cli.measure import measure_checkpoint
from analysis.cli.specs import CompareSpec, MeasureSpec
from analysis.measures.measurement import Measurement
from analysis.measures.options import MetricSpec
from analysis.measures.registry import MEASURES as METRICS
from analysis.measures.registry import metric_quantities, revive
from analysis.measures.text import noise_increase_label
from analysis.report.checkpoint_table import format_measurement
from landscape.results import Quantity, to_jsonable
from tests.helpers import digits_mlp_checkpoint

# one cheap setting of every metric, on a 300-sample digits MLP: every result type measure returns
OPTIONS = [
    "--n-samples",
    "300",
    "--k",
    "2",
    "--probes",
    "8",
    "--noise-samples",
    "8",
    "--radius",
    "0.01,0.02",
    "--restarts",
    "1",
    "--eps-iters",
    "2",
    "--ascent-steps",
    "2",
    "--m",
    "100",
    "--density-runs",
    "2",
    "--density-steps",
    "8",
    "--device",
    "cpu",
    "--dtype",
    "float64",
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    path = digits_mlp_checkpoint(tmp_path_factory.mktemp("typed"), (8,), adam_state=True)
    args = build_parser().parse_args(["measure", str(path), "--metrics", ",".join(METRICS), *OPTIONS])
    spec = MeasureSpec.from_args(args)
    return path, spec, measure_checkpoint(str(path), spec)


@pytest.mark.slow
def test_every_result_type_survives_json_and_back(measured):
    _, _, measurement = measured
    report = measurement.to_dict()
    assert set(report["metrics"]) == set(METRICS)
    for name, stored in report["metrics"].items():
        text = json.loads(json.dumps(stored))  # what a results file holds
        result = revive(name, text)
        assert type(result) is METRICS[name].result
        assert to_jsonable(result) == text, name  # nothing lost or changed on the way back
        for field in dataclasses.fields(result):  # arrays come back as arrays, not lists
            value = getattr(result, field.name)
            if field.type in ("np.ndarray", "np.ndarray | None") and value is not None:
                assert isinstance(value, np.ndarray), (name, field.name)


@pytest.mark.slow
def test_quantities_are_labelled_values_with_their_uncertainty(measured):
    _, spec, measurement = measured
    metrics = measurement.to_dict()["metrics"]
    eig = metric_quantities("eig", metrics["eig"])
    assert list(eig) == ["λ1", "λ2"] and eig["λ1"].value == metrics["eig"]["values"][0]
    assert eig["λ1"].stderr == metrics["eig"]["residuals"][0] and eig["λ1"].metric == "eig"
    curve = metric_quantities("sharpness-curve", metrics["sharpness-curve"])
    assert list(curve) == [noise_increase_label(a) for a in spec.metrics.radius] == ["ΔL a=0.01", "ΔL a=0.02"]
    point = metrics["sharpness-curve"]["points"][1]
    q = curve["ΔL a=0.02"]
    assert q.value == point["increase"] and q.stderr == point["stderr"]
    assert np.mean(q.samples) == pytest.approx(q.value, rel=1e-9)  # the paired draws average to the value
    assert metric_quantities("density", metrics["density"]) == {}
    assert Quantity.from_dict(json.loads(json.dumps(to_jsonable(q)))) == q


@pytest.mark.slow
def test_the_table_reads_a_resumed_report_as_it_reads_a_fresh_one(measured):
    _, _, report = measured
    stored = Measurement.from_dict(json.loads(json.dumps(report.to_dict())))
    assert all(type(stored.metrics[n]) is type(r) for n, r in report.metrics.items())  # every result typed again
    for name in ("hvp_check", "hvp_memory", "memory"):  # the HVP path's check, its plan and the process's memory too
        assert type(getattr(stored, name)) is type(getattr(report, name)) and getattr(report, name) is not None, name
    assert stored.to_dict() == report.to_dict()
    assert format_measurement(stored) == format_measurement(report)


def test_non_finite_values_come_back_as_floats():
    stored = to_jsonable(Quantity("λ1", math.nan, math.inf))
    assert stored["value"] == "nan"
    back = Quantity.from_dict(stored)
    assert math.isnan(back.value) and back.stderr == math.inf


def test_specs_hold_each_commands_defaults_and_typed_options():
    args = build_parser().parse_args(["compare", "a.pt", "b.pt", "--radius", "0.01,0.03", "--labels", "x,y"])
    spec = CompareSpec.from_args(args)
    assert spec.measure.metrics.radius == (0.01, 0.03) and spec.labels == ("x", "y")
    assert spec.measure.metrics.k == 3 and spec.measure.metrics.metrics == ("eig", "trace", "sharpness-curve", "surface")
    measure = MeasureSpec.from_args(build_parser().parse_args(["measure", "a.pt"]))
    assert measure.metrics == MetricSpec() and measure.objective.whole("test").split == "test"
    assert measure.settings()["radius"] == "0.001,0.005,0.01"  # recorded in its command-line spelling
    with pytest.raises(dataclasses.FrozenInstanceError):
        measure.metrics.k = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown metric expected-loss"):  # compare refuses it, in one line
        CompareSpec.from_args(build_parser().parse_args(["compare", "a.pt", "b.pt", "--metrics", "expected-loss"]))


def test_a_spec_is_not_a_namespace():
    """The library functions take specs: passing the Namespace itself fails loudly rather than half-working."""
    args = build_parser().parse_args(["measure", "a.pt"])
    with pytest.raises(AttributeError):
        measure_checkpoint("a.pt", args)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_cached_comparison_renders_as_the_fresh_one(tmp_path):
    """figures caches compare's result as JSON: read back and typed again, its tables are the same text."""
    from analysis.cli.compare import COMPARE_DEFAULTS, compare, comparison_tables
    from analysis.cli.specs import ObjectiveSpec
    from analysis.report.comparison import Comparison

    paths = [str(digits_mlp_checkpoint(tmp_path / f"run{seed}", (8,), seed=seed)) for seed in (0, 1)]
    metrics = replace(COMPARE_DEFAULTS, metrics=("eig", "trace", "sharpness-curve"), k=1, probes=8, noise_samples=8)
    spec = CompareSpec(MeasureSpec(ObjectiveSpec(n_samples=200, device="cpu"), metrics), out=tmp_path / "cmp", labels=("a", "b"))
    fresh = compare(paths, spec)
    cached = Comparison.from_dict(json.loads(json.dumps(fresh.to_dict())))
    assert comparison_tables(cached) == comparison_tables(fresh)
    assert cached.differences["b"]["λ1"] == fresh.differences["b"]["λ1"]  # a Difference, field for field
    assert type(cached.checkpoints[0].results["sharpness-curve"]) is type(fresh.checkpoints[0].results["sharpness-curve"])
    assert cached.to_dict() == fresh.to_dict()  # nothing lost on the way through JSON


def test_probes_set_the_sharpness_curves_prediction_too():
    """--probes is the HVP budget of every trace estimate, the sharpness curve's ½·tr(ΣH) included."""
    from landscape.examples import quadratic

    curve = METRICS["sharpness-curve"].run(quadratic(), MetricSpec(probes=6, noise_samples=4, radius=(0.01,)))
    assert curve.trace.n_matvecs == 6
