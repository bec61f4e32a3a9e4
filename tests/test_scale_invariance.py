"""Scale invariance: the measures flagged `scale_invariant` give the same value when a ReLU layer is scaled by α and
the next by 1/α, which leaves the network's function as it is, while λ1 moves (so the check is not vacuous); the flag,
the table's mark and the JSON's list name exactly the measures checked here.

A measure that becomes scale-invariant is added to SCALE_INVARIANT (with its tolerance) and flagged in its record."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.cli import build_parser
from analysis.cli.measure import measure_checkpoint
from analysis.cli.specs import MeasureSpec
from analysis.measures.measurement import Measurement
from analysis.measures.options import MetricSpec
from analysis.measures.registry import MEASURES, scale_invariant_names
from analysis.report.checkpoint_table import format_measurement
from landscape.engine.objective import Objective
from landscape.inputs.data import load_data
from tests.helpers import bias_free_relu_mlp, digits_mlp_checkpoint

ALPHA = 4.0  # a power of two: the rescaled weights, and the products they make, are exact in floating point
# measure → relative tolerance between the two parameterizations. The sampled ones draw their starts and noise in
# the rescaled coordinates δ' of T⊙δ', T = |w|, with the same seed, so they match as closely as the exact ones.
SCALE_INVARIANT = {
    "relative-flatness": 1e-8,
    "fisher-rao": 1e-8,
    "adaptive-worst-case": 1e-8,
    "adaptive-m-sharpness": 1e-8,
    "adaptive-average-case": 1e-8,
    # N(0, σ²w_i² + ε²): the ε = 1e-3 floor is not rescaled, so only nearly; its bracket's decisions come out the same
    "pac-bayes-mag": 1e-6,
}
# cheap settings of the measures above (and of eig, which must change)
SPEC = MetricSpec(k=1, ascent_steps=3, ascent_restarts=1, m=32, noise_samples=8, probes=8)


def _network(rescaled: bool) -> nn.Sequential:
    """A bias-free ReLU MLP on digits, briefly trained; `rescaled`: its second layer × α and the head × 1/α."""
    torch.manual_seed(0)
    model = bias_free_relu_mlp((64, 16, 12, 10))
    x, y = _data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    if rescaled:
        with torch.no_grad():
            model[2].weight.mul_(ALPHA)
            model[4].weight.div_(ALPHA)
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data("digits")
    return data.x_train[:128].reshape(128, -1).double(), data.y_train[:128]


def _objective(model: nn.Module) -> Objective:
    x, y = _data()
    return Objective(model, [(x[:64], y[:64]), (x[64:], y[64:])], dtype=torch.float64, device="cpu")


@pytest.fixture(scope="module")
def pair() -> tuple[Objective, Objective]:
    original, rescaled = _network(False), _network(True)
    x, _ = _data()
    with torch.no_grad():
        assert not torch.equal(original[2].weight, rescaled[2].weight)
        torch.testing.assert_close(rescaled(x), original(x), rtol=1e-12, atol=1e-12)  # the same function
    return _objective(original), _objective(rescaled)


def _value(name: str, objective: Objective) -> float:
    record = MEASURES[name]
    return record.quantities(record.run(objective, SPEC), name)[0].value


@pytest.mark.parametrize("name", list(SCALE_INVARIANT))
def test_a_flagged_measure_keeps_its_value(pair, name):
    original, rescaled = pair
    before, after = _value(name, original), _value(name, rescaled)
    assert before != 0 and after == pytest.approx(before, rel=SCALE_INVARIANT[name])


def test_the_largest_eigenvalue_moves(pair):
    """λ1 is not invariant: the same rescaling moves it by far more than any tolerance above."""
    original, rescaled = pair
    before, after = _value("eig", original), _value("eig", rescaled)
    assert max(before / after, after / before) > 2


def test_the_flag_names_exactly_the_measures_checked_here():
    assert set(scale_invariant_names()) == set(SCALE_INVARIANT)


def _measured(folder, metrics: str, *options: str) -> Measurement:
    checkpoint = digits_mlp_checkpoint(folder, (8,))
    argv = ["measure", str(checkpoint), "--metrics", metrics, "--n-samples", "100", "--device", "cpu", *options]
    return measure_checkpoint(str(checkpoint), MeasureSpec.from_args(build_parser().parse_args(argv)))


def test_the_table_marks_them_and_the_json_lists_them(tmp_path):
    found = _measured(tmp_path, "eig,fisher-rao,adaptive-worst-case", "--k", "1", "--ascent-steps", "2")
    stored = found.to_dict()
    assert stored["scale_invariant"] == ["fisher-rao", "adaptive-worst-case"]
    back = Measurement.from_dict(json.loads(json.dumps(stored)))
    assert "scale_invariant" not in back.context and back.to_dict() == stored  # derived again, not carried along
    table = format_measurement(found).splitlines()
    assert [line.split()[0] for line in table if "scale-invariant" in line] == ["adaptive", "Fisher–Rao"]  # registry order
    with_eta = _measured(tmp_path, "adaptive-worst-case", "--eta", "0.01", "--ascent-steps", "2")
    assert with_eta.to_dict()["scale_invariant"] == []  # T = |w| + η does not scale with w
