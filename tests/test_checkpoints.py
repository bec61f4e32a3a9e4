"""Checkpoints: safe loading, foreign formats, and one clear error per kind of bad file."""

import pytest
import torch

from landscape.inputs.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from landscape.inputs.models import model_for_data
from tests.helpers import bad_files


@pytest.fixture
def mlp_and_spec():
    torch.manual_seed(0)
    return model_for_data("mlp", (1, 8, 8), num_classes=10, hidden=(16,))


def test_round_trip_is_weights_only_loadable(tmp_path, mlp_and_spec):
    model, spec = mlp_and_spec
    path = save_checkpoint(
        tmp_path / "a.pt",
        model,
        model_spec=spec,
        data_spec={"spec": "digits", "seed": 0},
        meta={"epoch": 3, "metrics": {"test_accuracy": 0.9}},
    )
    raw = torch.load(path, weights_only=True)  # no pickled code inside
    assert raw["format"] == "landscape-checkpoint" and raw["version"] == 1
    ckpt = load_checkpoint(path)
    assert ckpt.is_native and ckpt.meta["epoch"] == 3 and ckpt.data_spec["spec"] == "digits"
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(ckpt.build_model().eval()(x), model.eval()(x))
    assert not (tmp_path / "a.pt.tmp").exists()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 7},
        lambda sd: {"model": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
)
def test_foreign_state_dicts_load_with_a_model_spec(tmp_path, mlp_and_spec, wrap):
    model, spec = mlp_and_spec
    torch.save(wrap(model.state_dict()), tmp_path / "foreign.pt")
    ckpt = load_checkpoint(tmp_path / "foreign.pt")
    assert not ckpt.is_native
    with pytest.raises(CheckpointError, match="pass model=NAME"):
        ckpt.build_model()
    rebuilt = ckpt.build_model(spec)
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)


def test_full_pickles_need_trust(tmp_path, mlp_and_spec):
    model, _ = mlp_and_spec
    torch.save(model, tmp_path / "whole.pt")  # pickles the nn.Module class itself
    with pytest.raises(CheckpointError, match="pass trust=True only if you trust it"):
        load_checkpoint(tmp_path / "whole.pt")
    ckpt = load_checkpoint(tmp_path / "whole.pt", trust=True)
    assert set(ckpt.state_dict) == set(model.state_dict())
    built = ckpt.build_model()  # the pickled model is its own spec, never "a bare state dict" needing --model
    assert built is not model and all(torch.equal(built.state_dict()[k], v) for k, v in model.state_dict().items())


def test_every_bad_file_gets_its_own_message(tmp_path, mlp_and_spec):
    for name, message in bad_files(tmp_path, *mlp_and_spec).items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)


def test_a_checkpoint_cut_anywhere_is_truncated_not_an_os_error(tmp_path, mlp_and_spec):
    """torch's zip reader fails on some cuts with a bare OSError ("[Errno 22] Invalid argument"): said in words."""
    data = save_checkpoint(tmp_path / "good.pt", mlp_and_spec[0], model_spec=mlp_and_spec[1]).read_bytes()
    for cut in range(64, len(data), max(1, len(data) // 64)):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / "cut.pt")
        assert "cut.pt is truncated or corrupt" in str(info.value) and "Errno" not in str(info.value), cut


def test_weights_that_do_not_fit_are_named(tmp_path, mlp_and_spec):
    model, spec = mlp_and_spec
    sd = model.state_dict()
    wrong = dict(sd)
    missing = next(k for k in sd if k.endswith("bias"))
    del wrong[missing]
    wrong["extra.weight"] = torch.zeros(2)
    first_weight = next(k for k in sd if k.endswith("weight"))
    wrong[first_weight] = torch.zeros(3, 3)
    torch.save(wrong, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "w.pt").build_model(spec)
    text = str(info.value)
    assert f"missing keys: {missing}" in text and "extra.weight" in text and f"{first_weight} (3, 3)" in text


def test_non_finite_weights_are_refused(tmp_path, mlp_and_spec):
    model, spec = mlp_and_spec
    name = next(k for k in model.state_dict() if k.endswith("weight"))
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", model, model_spec=spec)
    with pytest.raises(CheckpointError, match=f"non-finite.*{name}"):
        load_checkpoint(tmp_path / "nan.pt").build_model()


def test_newer_format_and_unwritable_path(tmp_path, mlp_and_spec):
    model, spec = mlp_and_spec
    path = save_checkpoint(tmp_path / "new.pt", model, model_spec=spec)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="newer landscape"):
        load_checkpoint(path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write"):
        save_checkpoint(tmp_path / "file" / "sub" / "c.pt", model, model_spec=spec)
