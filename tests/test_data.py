"""Data specs and measurement sets: shapes, layouts, normalization, determinism, and one clear error per mistake."""

import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from landscape.inputs import data as data_module
from landscape.inputs.data import BatchSet, DataError, Dataset, MeasurementSet, load_data
from tests.cifar_files import fake_cifar10, write_cifar_batch
from tests.helpers import Exploit


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.ndim) if d != 1]
    return x.double().mean(dims).float(), x.double().std(dims, unbiased=False).float()


# ---------------------------------------------------------------- digits


def test_digits_shapes_and_train_normalization():
    data = load_data("digits")
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert (len(data.y_train), len(data.y_test)) == (1437, 360)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    mean, std = channel_stats(data.x_train)
    assert torch.allclose(mean, torch.zeros(1), atol=1e-5) and torch.allclose(std, torch.ones(1), atol=1e-5)
    assert abs(channel_stats(data.x_test)[0].item()) > 1e-4  # test split uses the train statistics, not its own
    raw = load_data("digits", normalize=False)
    assert raw.normalization is None and raw.x_train.min() == 0 and raw.x_train.max() == 1
    m, s = data.normalization["mean"][0], data.normalization["std"][0]
    assert torch.allclose((raw.x_test - m) / s, data.x_test, atol=1e-5)
    d = data.describe()
    assert json.loads(json.dumps(d)) == d and d["n_train"] == 1437 and d["input_shape"] == [1, 8, 8]


def test_digits_split_is_seeded_and_stratified():
    a, b, c = load_data("digits", seed=0), load_data("digits", seed=0), load_data("digits", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 360 test samples spread ~36 per class


# ---------------------------------------------------------------- mnist1d


def test_mnist1d_shapes_cache_and_global_rng_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path))  # an empty cache: the generator runs here
    monkeypatch.setattr(data_module, "_MEMORY_CACHE", {})
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    data = load_data("mnist1d")
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert data.num_classes == 10 and data.normalization is None
    assert abs(data.x_train.mean().item()) < 0.05 and abs(data.x_train.std().item() - 1) < 0.05
    again = load_data("mnist1d")
    assert torch.equal(again.x_train, data.x_train)
    again.x_train.zero_()  # the cache hands out copies
    assert torch.equal(load_data("mnist1d").x_train, data.x_train)


@pytest.mark.cli
def test_built_in_sets_are_cached_on_disk_and_read_back_without_scikit_learn(tmp_path, monkeypatch):
    """The digits split is computed once by scikit-learn (whose import costs ~1 s of every start); later processes
    read identical tensors from the cache; a damaged cache file is rebuilt and an unwritable cache is skipped."""
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_module, "_MEMORY_CACHE", {})
    first = load_data("digits", seed=2)
    assert (tmp_path / "cache" / "digits-seed2.npz").is_file()
    script = (
        "import sys, torch; from landscape.inputs.data import load_data; d = load_data('digits', seed=2); "
        "torch.save((d.x_train, d.y_train, d.x_test, d.y_test), sys.argv[1]); print('sklearn' in sys.modules)"
    )
    env = {**os.environ, "LANDSCAPE_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "read.pt")], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    for a, b in zip(torch.load(tmp_path / "read.pt"), (first.x_train, first.y_train, first.x_test, first.y_test)):
        assert torch.equal(a, b)
    stored = (tmp_path / "cache" / "digits-seed2.npz").read_bytes()
    for damaged in (b"not an npz", stored[: len(stored) // 2]):  # foreign, and truncated (a broken zip)
        (tmp_path / "cache" / "digits-seed2.npz").write_bytes(damaged)
        monkeypatch.setattr(data_module, "_MEMORY_CACHE", {})
        assert torch.equal(load_data("digits", seed=2).x_train, first.x_train)
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")  # the cache folder cannot be made
    monkeypatch.setattr(data_module, "_MEMORY_CACHE", {})
    assert torch.equal(load_data("digits", seed=2).x_test, first.x_test)


# ---------------------------------------------------------------- CIFAR


def test_cifar10_layout_labels_and_normalization(tmp_path):
    batches = fake_cifar10(tmp_path)
    data1, _ = batches["data_batch_1"]
    data1[1, 1 * 1024 + 5 * 32 + 7] = 200  # sample 1, channel G, row 5, column 7
    write_cifar_batch(tmp_path / "data_batch_1", data1, batches["data_batch_1"][1], b"labels")
    raw = load_data(f"cifar10:{tmp_path}", normalize=False)
    assert raw.x_train.shape == (20, 3, 32, 32) and raw.x_test.shape == (4, 3, 32, 32) and raw.num_classes == 10
    assert raw.x_train[1, 1, 5, 7].item() == pytest.approx(200 / 255)
    assert raw.x_train[6, 2, 31, 0].item() == pytest.approx(batches["data_batch_2"][0][2, 2 * 1024 + 31 * 32] / 255)
    assert raw.y_train.tolist() == sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert raw.y_test.tolist() == batches["test_batch"][1]
    data = load_data(f"cifar10:{tmp_path}")
    mean, std = channel_stats(data.x_train)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5) and torch.allclose(std, torch.ones(3), atol=1e-5)
    assert len(data.normalization["mean"]) == 3


def test_cifar100_from_parent_folder_and_legacy_numpy_name(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(3 * 3072, dtype=np.int64).astype(np.uint8).reshape(3, 3072)
    write_cifar_batch(folder / "train", data, [0, 57, 99], b"fine_labels")
    # the original files were pickled by numpy < 2, which names the module numpy.core.multiarray
    blob = pickle.dumps({b"data": data[:1], b"fine_labels": [42], b"coarse_labels": [3]}, protocol=2)
    (folder / "test").write_bytes(blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    loaded = load_data(f"cifar100:{tmp_path}", normalize=False)
    assert loaded.num_classes == 100 and loaded.y_train.tolist() == [0, 57, 99] and loaded.y_test.tolist() == [42]
    assert loaded.x_train[2, 0, 0, 5].item() == pytest.approx(((2 * 3072 + 5) % 256) / 255)


def test_cifar_missing_file_names_it(tmp_path):
    fake_cifar10(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(DataError, match="missing .*data_batch_3"):
        load_data(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="not found"):
        load_data(f"cifar100:{tmp_path / 'nowhere'}")


def test_malicious_pickle_is_refused(tmp_path):
    fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Exploit(marker), b"labels": [1]}, f, protocol=2)
    with pytest.raises(DataError, match="refused global .*system"):
        load_data(f"cifar10:{tmp_path}")
    assert not marker.exists()


# ---------------------------------------------------------------- npz


def test_npz_with_test_arrays_used_as_stored(tmp_path):
    x, y = np.random.default_rng(0).normal(size=(10, 5)) * 3 + 1, np.arange(10) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:4], y_test=np.array([0, 1, 2, 4]))
    data = load_data(f"npz:{tmp_path / 'd.npz'}")
    assert data.normalization is None and torch.allclose(data.x_train, torch.tensor(x, dtype=torch.float32))
    assert data.num_classes == 5 and data.test_source == "provided" and data.y_train.dtype == torch.int64
    normed = load_data(f"npz:{tmp_path / 'd.npz'}", normalize=True)
    mean, std = channel_stats(normed.x_train)  # 2-D inputs: per feature
    assert (
        mean.shape == (5,) and torch.allclose(mean, torch.zeros(5), atol=1e-5) and torch.allclose(std, torch.ones(5), atol=1e-5)
    )


def test_npz_without_test_arrays_holds_out_20_percent(tmp_path):
    x = np.arange(50, dtype=np.float64).reshape(25, 2)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(25) % 4)
    a, b = (load_data(f"npz:{tmp_path / 'd.npz'}", seed=s) for s in (0, 1))
    assert (len(a.y_train), len(a.y_test)) == (20, 5) and "hold-out" in a.describe()["test_source"]
    assert sorted(a.x_train[:, 0].tolist() + a.x_test[:, 0].tolist()) == list(range(0, 50, 2))  # a partition
    assert not torch.equal(a.y_test, b.y_test)
    assert torch.equal(a.x_test, load_data(f"npz:{tmp_path / 'd.npz'}", seed=0).x_test)


def test_the_setup_line_says_when_the_toolkit_held_out_part_of_the_users_samples(tmp_path):
    """npz with x and y only: the train split is 80% of them, said in the measurement record and the setup line."""
    from analysis.measures.measurement import Measurement
    from analysis.report.checkpoint_table import format_measurement
    from analysis.report.setup_text import batching, norm_mode
    from landscape.engine.objective import Objective
    from tests.helpers import tiny_convnet_bn, tiny_mlp

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(25, 12)), y=np.arange(25) % 4)
    data = load_data(f"npz:{tmp_path / 'd.npz'}")
    train = MeasurementSet("train", batch_size=8)
    origin = train.describe(data)["origin"]
    assert origin.startswith("20 of the 25 samples in x/y; the other 5 are the test split") and "give x_test" in origin
    assert "held out as the test split" in MeasurementSet("test").describe(data)["origin"]
    np.savez(tmp_path / "given.npz", x=rng.normal(size=(25, 12)), y=np.arange(25) % 4, x_test=np.zeros((2, 12)), y_test=[0, 1])
    assert "origin" not in train.describe(load_data(f"npz:{tmp_path / 'given.npz'}"))  # measured as given

    objective = Objective(tiny_mlp(), train.batches(data), device="cpu", metadata={"measurement": train.describe(data)})
    setup = {**objective.describe(), "data": {"spec": data.spec}}
    report = {"checkpoint": "net.pt", "setup": setup, "n_params": objective.n_params, "loss": 1.0, "accuracy": 0.5}
    lines = format_measurement(Measurement(**report, grad_norm=1.0)).splitlines()
    assert "20 samples in 3 batches of ≤8 (seed 0), no BatchNorm," in lines[1]
    assert lines[2] == f"  the train split: {origin}"
    with_bn = Objective(tiny_convnet_bn(), [(torch.randn(4, 1, 4, 4), torch.arange(4) % 3)], device="cpu", mode="train")
    assert norm_mode(with_bn.describe()) == "BN train mode"
    own = {"measurement": {"batch_size": None}, "n_batches": 2, "batch_sizes": [3, 8]}  # a module:callable's own batches
    assert batching(own) == "2 batches of 3–8, as the data gives them"


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((3, 2))}, "no array 'y'"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4, dtype=int)}, "x has 3 samples but y has 4"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.0, 1.5, 2.0])}, "integer class indices"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3, dtype=int), "x_test": np.zeros((1, 2))}, "both x_test and y_test"),
        (
            {"x": np.zeros((3, 2)), "y": np.zeros(3, dtype=int), "x_test": np.zeros((1, 3)), "y_test": np.zeros(1, dtype=int)},
            "x_test samples have shape",
        ),
    ],
)
def test_npz_errors_name_the_problem(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_data(f"npz:{tmp_path / 'bad.npz'}")


def test_missing_npz_and_unknown_spec(tmp_path):
    with pytest.raises(DataError, match="missing.npz not found"):
        load_data(f"npz:{tmp_path / 'missing.npz'}")
    with pytest.raises(ValueError, match="digits, mnist1d, cifar10:DIR"):
        load_data("imagenet")


# ---------------------------------------------------------------- module:callable

MODULE_SOURCE = """
import numpy as np
import torch
from landscape.inputs.data import Dataset

def with_seed(seed):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.normal(size=(8, 3)), "y_train": np.arange(8) % 2,
            "x_test": rng.normal(size=(2, 3)), "y_test": [0, 1], "num_classes": 3}

def as_tuple():
    return torch.ones(4, 2), torch.tensor([0, 1, 1, 0]), torch.zeros(2, 2), torch.tensor([1, 0])

def as_dataset():
    return Dataset("inner", torch.ones(2, 1), torch.tensor([0, 1]), torch.ones(1, 1), torch.tensor([1]), 2, None)

def wrong():
    return [1, 2, 3]


def as_batches():
    return [(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)), (torch.zeros(2, 2), torch.ones(2, dtype=torch.long))]
"""


def test_module_callable_forms(tmp_path, monkeypatch):
    (tmp_path / "userdata_forms.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    a, b = load_data("userdata_forms:with_seed", seed=0), load_data("userdata_forms:with_seed", seed=1)
    assert a.spec == "userdata_forms:with_seed" and a.num_classes == 3 and a.input_shape == (3,)
    assert not torch.equal(a.x_train, b.x_train)
    t = load_data("userdata_forms:as_tuple")
    assert t.num_classes == 2 and t.x_train.dtype == torch.float32
    d = load_data("userdata_forms:as_dataset")
    assert isinstance(d, Dataset) and d.spec == "userdata_forms:as_dataset" and len(d.y_train) == 2
    with pytest.raises(DataError, match="train batch 0 is a int; a batch is an"):  # a list is read as batches
        load_data("userdata_forms:wrong")
    batches = load_data("userdata_forms:as_batches")  # a callable's own batches: the measurement set as given
    assert isinstance(batches, BatchSet) and len(batches.batches("train")) == 2 and batches.describe()["n_train"] == 5
    with pytest.raises(DataError, match="has no test batches"):
        batches.batches("test")
    with pytest.raises(DataError, match="has no attribute 'nothing'"):
        load_data("userdata_forms:nothing")
    with pytest.raises(DataError, match="cannot import module 'no_such_module_xyz'"):
        load_data("no_such_module_xyz:make")


# ---------------------------------------------------------------- measurement set


def small_dataset(n_train=10, n_test=3) -> Dataset:
    x = torch.arange(n_train, dtype=torch.float32).unsqueeze(1)
    return Dataset("toy", x, torch.arange(n_train) % 2, torch.zeros(n_test, 1), torch.zeros(n_test, dtype=torch.int64), 2, None)


def test_measurement_set_subset_is_seeded_sorted_and_without_replacement():
    data = small_dataset()
    ms = MeasurementSet("train", n_samples=7, batch_size=3, seed=5)
    idx = ms.indices(data)
    assert idx.dtype == torch.int64 and len(idx) == 7 and len(set(idx.tolist())) == 7
    assert torch.equal(idx, idx.sort().values) and torch.equal(idx, ms.indices(data))
    others = {tuple(MeasurementSet("train", 7, 3, seed=s).indices(data).tolist()) for s in range(6)}
    assert len(others) > 1
    batches = ms.batches(data)
    assert [len(y) for _, y in batches] == [3, 3, 1]  # uneven last batch kept
    assert torch.cat([x for x, _ in batches]).squeeze(1).long().tolist() == idx.tolist()


def test_measurement_set_whole_split_and_describe_round_trip():
    data = small_dataset()
    full = MeasurementSet("test", batch_size=2)
    assert full.indices(data).tolist() == [0, 1, 2] and [len(y) for _, y in full.batches(data)] == [2, 1]
    d = full.describe(data)
    assert d == {"split": "test", "n_samples": 3, "subset": False, "batch_size": 2, "seed": 0, "n_batches": 2, "data": "toy"}
    assert MeasurementSet.from_dict(json.loads(json.dumps(d))) == full
    sub = MeasurementSet("train", 4, 3, seed=2)
    assert MeasurementSet.from_dict(sub.describe(data)).indices(data).tolist() == sub.indices(data).tolist()


def test_measurement_set_errors():
    data = small_dataset()
    with pytest.raises(DataError, match="n_samples=11 .* has 10 samples"):
        MeasurementSet("train", n_samples=11).indices(data)
    with pytest.raises(DataError, match="batch_size"):
        MeasurementSet(batch_size=0)
    with pytest.raises(DataError, match="'train' or 'test'"):
        MeasurementSet("val")
    with pytest.raises(DataError, match="'train' or 'test'"):
        data.split("validation")
