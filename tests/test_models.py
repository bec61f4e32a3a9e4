"""Models: forward shapes, sizes, spec round trips, torch.func compatibility, module:factory models."""

import json
import sys

import pytest
import torch
from torch.func import functional_call, jvp, vmap

from landscape.inputs.data import Dataset
from landscape.inputs.models import MODELS, build_model, model_for_data, model_from_spec
from landscape.inputs.user_code import UserCodeError, import_folder

# small settings per model so the whole file runs in seconds; each model on the input it is meant for
CASES = {
    "mlp": ((1, 40), {"hidden": [16, 8]}),
    "convnet": ((1, 8, 8), {"channels": [2, 3]}),
    "c3": ((3, 32, 32), {"channels": [4, 6], "hidden": [12, 8]}),
    "resnet20": ((3, 32, 32), {}),
    "resnet44": ((3, 16, 16), {}),
}


def test_every_registered_model_has_a_case():
    assert set(CASES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_shape_and_spec_round_trip(name):
    shape, kwargs = CASES[name]
    torch.manual_seed(0)
    model, spec = model_for_data(name, shape, num_classes=7, **kwargs)
    assert json.loads(json.dumps(spec)) == spec and spec["kwargs"]["input_shape"] == list(shape)
    x = torch.randn(3, *shape)
    out = model.eval()(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    torch.manual_seed(0)
    rebuilt = model_from_spec(json.loads(json.dumps(spec))).eval()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert torch.equal(rebuilt(x), out)  # same seed, same weights, same outputs


def test_convnet_takes_1d_signals_and_mlp_variants():
    model, _ = model_for_data("convnet", (1, 40), num_classes=10, channels=(4, 4))
    assert any(isinstance(m, torch.nn.Conv1d) for m in model.modules())
    assert model.eval()(torch.randn(2, 1, 40)).shape == (2, 10)
    mlp = build_model("mlp", input_shape=(1, 8, 8), num_classes=3, hidden=(5,), activation="tanh", batchnorm=True)
    assert [type(m).__name__ for m in mlp] == ["Flatten", "Linear", "BatchNorm1d", "Tanh", "Linear"]
    with pytest.raises(ValueError, match="unknown activation"):
        build_model("mlp", activation="gelu")


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sizes():
    assert 265_000 < count(build_model("resnet20")) < 280_000  # He et al. 2016: 0.27M
    assert 640_000 < count(build_model("resnet44")) < 680_000  # 0.66M
    assert count(build_model("resnet20", width=2)) > 3.5 * count(build_model("resnet20"))
    assert 3_000 < count(build_model("convnet")) < 20_000
    assert count(build_model("convnet", channels=(2, 3))) < 1_000  # dense-Hessian sized
    assert count(build_model("mlp")) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


def test_model_for_data_reads_the_dataset():
    x = torch.zeros(4, 2, 5)
    data = Dataset("toy", x, torch.tensor([0, 1, 2, 3]), x[:1], torch.tensor([0]), 4, None)
    model, spec = model_for_data("mlp", data, hidden=[3])
    assert spec == {"name": "mlp", "kwargs": {"input_shape": [2, 5], "num_classes": 4, "hidden": [3]}}
    assert model(x).shape == (4, 4)
    with pytest.raises(ValueError, match="needs num_classes"):
        model_for_data("mlp", (2, 5))


def test_unknown_model_lists_the_registry():
    with pytest.raises(ValueError, match="mlp, convnet, c3, resnet20, resnet44"):
        build_model("vgg16")


def test_convnet_under_functional_call_jvp_and_vmap():
    torch.manual_seed(0)
    model, _ = model_for_data("convnet", (1, 8, 8), num_classes=10, channels=(2, 3))
    model.eval().double()
    with torch.no_grad():  # non-trivial BN statistics; a nonzero BN bias also keeps dead-ReLU zeros off the kink
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(0.1, 0.3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)

    def f(p):
        return functional_call(model, p, (x,))

    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    out, dout = jvp(f, (params,), (tangent,))
    assert out.shape == dout.shape == (5, 10) and torch.isfinite(dout).all()
    eps = 1e-6
    plus, minus = ({k: params[k] + s * eps * tangent[k] for k in params} for s in (1, -1))
    assert torch.allclose((f(plus) - f(minus)) / (2 * eps), dout, atol=1e-6)  # jvp is the directional derivative
    per_sample = vmap(lambda xi: functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0))(x)
    assert torch.allclose(per_sample, out, atol=1e-10)


FACTORY_SOURCE = """
import torch

def make_tiny(input_shape, num_classes, hidden=4):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0] * input_shape[1], hidden),
                               torch.nn.Linear(hidden, num_classes))

def fixed():
    return torch.nn.Linear(3, 2)

def not_a_model(**kwargs):
    return "nope"

def raises(**kwargs):
    return {}["width"]
"""


def test_module_factory_models(tmp_path, monkeypatch):
    (tmp_path / "usermodels_tiny.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model, spec = model_for_data("usermodels_tiny:make_tiny", (2, 3), num_classes=5, hidden=6)
    assert spec == {
        "name": "usermodels_tiny:make_tiny",
        "kwargs": {"input_shape": [2, 3], "num_classes": 5, "hidden": 6},
        "import_path": str(tmp_path.resolve()),  # where the module was found: a checkpoint finds it again from any folder
    }
    assert model(torch.randn(7, 2, 3)).shape == (7, 5)
    torch.manual_seed(0)
    assert torch.equal(model_from_spec(spec)[1].weight, model[1].weight)
    fixed, spec = model_for_data("usermodels_tiny:fixed", (3,), num_classes=2)
    assert spec["kwargs"] == {} and isinstance(fixed, torch.nn.Linear)  # data-derived kwargs only when accepted
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        build_model("usermodels_tiny:not_a_model")
    with pytest.raises(ValueError, match="cannot import module"):
        build_model("usermodels_missing_xyz:make")
    with pytest.raises(UserCodeError, match=r"^usermodels_tiny:raises raised KeyError: 'width'$") as info:
        build_model("usermodels_tiny:raises")
    assert isinstance(info.value.__cause__, KeyError)  # chained: --debug shows the user's own traceback


def test_a_factory_module_is_found_where_the_spec_recorded_it(tmp_path, monkeypatch):
    """import_path: the folder above a package's modules; a spec rebuilds from it without sys.path holding it."""
    package = tmp_path / "code" / "usernets_pkg" / "sub"
    package.mkdir(parents=True)
    for folder in (package.parent, package):
        (folder / "__init__.py").write_text("")
    (package / "nets.py").write_text(FACTORY_SOURCE)
    (tmp_path / "code" / "usernets_broken.py").write_text("import torch\nundefined_name\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the folders import_callable adds go with the test
    for name in [m for m in sys.modules if m.startswith("usernets_")]:
        monkeypatch.delitem(sys.modules, name)
    spec = {"name": "usernets_pkg.sub.nets:fixed", "kwargs": {}, "import_path": str(tmp_path / "code")}
    assert isinstance(model_from_spec(spec), torch.nn.Linear)
    assert import_folder("usernets_pkg.sub.nets:fixed") == import_folder("usernets_pkg:x") == str((tmp_path / "code").resolve())
    with pytest.raises(UserCodeError, match=r"^importing usernets_broken \(for usernets_broken:f\) raised NameError"):
        build_model("usernets_broken:f")  # the folder is on sys.path now
    moved = {**spec, "name": "usernets_gone:fixed"}
    with pytest.raises(ValueError, match=f"it was in {tmp_path / 'code'} when the checkpoint was written"):
        model_from_spec(moved)


def test_c3_is_smoothouts_cifar_shallow_net():
    """The reference layout: conv → pool (no padding) → BN → ReLU twice, a 7x7 map, dropout in the classifier."""
    model, _ = model_for_data("c3", (3, 32, 32), num_classes=100)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"] * 2
    assert model.features[1].padding == 0 and model.classifier[0].in_features == 64 * 7 * 7
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.classifier) == 2
    expected = (3 * 64 + 64 * 64) * 25 + 2 * 2 * 64 + 3136 * 384 + 2 * 384 + 384 * 192 + 2 * 192 + 192 * 100 + 100
    assert sum(p.numel() for p in model.parameters()) == expected == 1_405_860
    old, _ = model_for_data("c3", (3, 32, 32), num_classes=100, layout="first-release")
    assert old.classifier[0].in_features == 64 * 8 * 8 and not any(isinstance(m, torch.nn.Dropout) for m in old.modules())
    with pytest.raises(ValueError, match="layout"):
        model_for_data("c3", (3, 32, 32), num_classes=10, layout="tf")
