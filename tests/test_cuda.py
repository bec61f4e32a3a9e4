"""The toolkit on a CUDA device, checked against float64 CPU references.

Every test here is marked `cuda` and skipped without a CUDA device: they run in a session lent a GPU,
through benchmarks/gpu_session.sh (`python -m pytest -m cuda tests/test_cuda.py`).

- every HVP path of landscape.engine.hvp_paths.HVP_METHODS, float64 and float32, BN eval and train mode, on a small
  MLP, a small ConvNet with BN and ResNet-20, against an independent float64 CPU Hessian-vector product
  (tests/ground_truth.py); float32 on CUDA must be as accurate as float32 on the CPU (TF32 would not be);
- GGN and empirical Fisher products, Lanczos, Hutchinson/Hutch++/XTrace and SLQ on CUDA against the CPU;
- 1-D and 2-D surfaces (HDF5 included, BN re-estimation) on CUDA against the CPU;
- `landscape measure --device cuda` in-process against `--device cpu`;
- a CUDA out-of-memory error mid-run is one line on stderr, not a traceback.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from torch import nn

from landscape.curvature.density import slq_density
from landscape.curvature.spectrum import lanczos
from landscape.curvature.trace import hutchinson, hutchpp, xtrace
from landscape.engine import hvp_paths
from landscape.engine.hvp_paths import HVP_METHODS
from landscape.engine.objective import Objective
from landscape.engine.operators import DenseOperator, FisherOperator, GGNOperator, HessianOperator
from tests.ground_truth import dense_hessian, dense_reference, rel_err
from tests.helpers import classification_batches, digits_mlp_checkpoint, tiny_convnet_bn, tiny_mlp
from tests.model_zoo import _randomize_norms

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = "cuda"
CPU = "cpu"


# ---------------------------------------------------------------------------------------------- problems
def _resnet20() -> nn.Module:
    from landscape.inputs.models import model_for_data

    torch.manual_seed(0)
    net, _ = model_for_data("resnet20", (3, 32, 32), num_classes=10)
    return _randomize_norms(net)  # running statistics that differ from batch statistics: eval ≠ train


PROBLEMS = {  # name → (model factory, input shape, classes, batch sizes)
    "mlp": (tiny_mlp, (12,), 4, [20, 20, 10]),
    "convnet-bn": (tiny_convnet_bn, (1, 4, 4), 3, [16, 16, 8]),
    "resnet20": (_resnet20, (3, 32, 32), 10, [8, 8]),
}


@functools.cache
def problem(name: str):
    """(model, batches) of a named problem, built once per session."""
    factory, shape, classes, sizes = PROBLEMS[name]
    _, _, batches = classification_batches(sum(sizes), shape, classes, sizes, seed=1)
    return factory(), batches


@functools.cache
def reference_hvp(name: str, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probe v, H v, H roll(v)) in float64 on the CPU, from tests/ground_truth.py's independent loss (no Objective)."""
    model, batches = problem(name)
    loss, w0 = dense_reference(model, batches, mode)
    v = torch.randn(w0.numel(), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _, hv = torch.autograd.functional.hvp(loss, w0, v)
    _, hv_roll = torch.autograd.functional.hvp(loss, w0, torch.roll(v, 1))
    return v, hv, hv_roll


@functools.cache
def cpu_float32_error(name: str, mode: str) -> float:
    """How far float32 on the CPU (double backward) is from the float64 reference: float32's own rounding here."""
    model, batches = problem(name)
    v, hv, _ = reference_hvp(name, mode)
    objective = Objective(model, batches, mode=mode, device=CPU, dtype=torch.float32, hvp_method="double-backward")
    return rel_err(objective.hvp(v.float()).double(), hv)


# every path of HVP_METHODS, ResNet-20 in float32 only (its float64 CPU reference is the slow part); the
# torch.compile'd path, where the Objective has one, on three cases (each compiles for tens of seconds)
COMPILED = getattr(hvp_paths, "COMPILED_HVP", None)
HVP_CASES = [
    (name, mode, path, dtype)
    for name in PROBLEMS
    for mode in ("eval", "train")
    for path in HVP_METHODS
    for dtype in (("float32",) if name == "resnet20" else ("float64", "float32"))
]
if COMPILED and COMPILED not in HVP_METHODS:
    HVP_CASES += [
        ("mlp", "eval", COMPILED, "float64"),
        ("convnet-bn", "train", COMPILED, "float32"),
        ("resnet20", "eval", COMPILED, "float32"),
    ]


# ------------------------------------------------------------------------------------------------- HVPs
@pytest.mark.parametrize("name, mode, path, dtype", HVP_CASES, ids=["-".join(c) for c in HVP_CASES])
def test_hvp_on_cuda_matches_the_float64_cpu_reference(name, mode, path, dtype):
    """H v and a block of probes on CUDA equal the float64 CPU product: to 1e-9 in float64; in float32 within 50× the
    CPU's own float32 error (TF32 convolutions or matmuls, ~1e-3, would fail this)."""
    model, batches = problem(name)
    v, hv, hv_roll = reference_hvp(name, mode)
    torch_dtype = getattr(torch, dtype)
    objective = Objective(model, batches, mode=mode, device=CUDA, dtype=torch_dtype, hvp_method=path)
    assert objective.device.type == "cuda" and all(t.is_cuda for b in objective.batches for t in b)
    product = objective.hvp(v.to(torch_dtype))
    assert product.is_cuda and product.dtype == torch_dtype
    V = torch.stack([v, -2 * v, torch.roll(v, 1)]).to(torch_dtype)
    block = objective.hvp_batched(V)
    if dtype == "float64":
        tolerance = 1e-9
    else:
        tolerance = max(50 * cpu_float32_error(name, mode), 1e-5)
    error = rel_err(product.double().cpu(), hv)
    assert error <= tolerance, (
        f"{path} on CUDA ({dtype}, {mode}): {error:.2e} from the float64 CPU reference, "
        f"tolerance {tolerance:.1e} (TF32: torch.backends.cudnn.allow_tf32="
        f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32})"
    )
    for row, expected in zip(block.double().cpu(), (hv, -2 * hv, hv_roll)):
        assert rel_err(row, expected) <= tolerance
    check = objective.hvp_check_result
    assert check is None or check.passed, f"the run-time self-check replaced {path} on CUDA: {check}"


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_ggn_and_fisher_products_on_cuda_match_the_cpu(curvature):
    model, batches = problem("convnet-bn")
    kind = {"ggn": GGNOperator, "fisher": FisherOperator}[curvature]
    ops = [kind(Objective(model, batches, device=device, dtype=torch.float64)) for device in (CPU, CUDA)]
    V = torch.randn(3, ops[0].shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    on_cpu, on_cuda = ops[0].products(V), ops[1].products(V.to(CUDA))
    assert on_cuda.is_cuda
    assert rel_err(on_cuda.cpu(), on_cpu) <= 1e-10


# --------------------------------------------------------------------------------------------- estimators
@functools.cache
def dense_spectrum(name: str) -> np.ndarray:
    model, batches = problem(name)
    h = dense_hessian(model, batches, "eval")
    return np.linalg.eigvalsh(((h + h.T) / 2).numpy())[::-1]


def hessian_operators(name: str, dtype=torch.float64) -> dict[str, HessianOperator]:
    model, batches = problem(name)
    return {device: HessianOperator(Objective(model, batches, device=device, dtype=dtype)) for device in (CPU, CUDA)}


@pytest.mark.parametrize("name", ["mlp", "convnet-bn"])
def test_lanczos_on_cuda_matches_the_cpu_and_the_dense_spectrum(name):
    exact = dense_spectrum(name)
    ops = hessian_operators(name)
    results = {device: lanczos(op, 4, tol=1e-10, seed=0, return_vectors=True) for device, op in ops.items()}
    for device, result in results.items():
        assert result.converged, device
        np.testing.assert_allclose(result.values, exact[:4], rtol=1e-7, atol=1e-9, err_msg=device)
    assert results[CUDA].vectors.is_cuda
    np.testing.assert_allclose(results[CUDA].values, results[CPU].values, rtol=1e-7, atol=1e-9)
    smallest = lanczos(ops[CUDA], 2, which="SA", tol=1e-10, seed=1)
    np.testing.assert_allclose(smallest.values, exact[::-1][:2], rtol=1e-6, atol=1e-8)


def test_lanczos_float32_on_cuda_agrees_with_the_cpu_on_resnet20():
    """Top-3 of ResNet-20's Hessian in float32: CUDA and CPU agree to Lanczos's own tolerance."""
    ops = hessian_operators("resnet20", torch.float32)
    values = {device: lanczos(op, 3, tol=1e-4, seed=0, max_matvecs=200) for device, op in ops.items()}
    for device, result in values.items():
        assert result.converged, device
    np.testing.assert_allclose(values[CUDA].values, values[CPU].values, rtol=2e-3)


def test_trace_estimators_on_cuda_match_the_cpu_and_the_dense_trace():
    """Hutch++ with a sketch of the whole space is exact on both devices; Hutchinson and XTrace (their probes are drawn
    on each device, so they differ) agree with the exact trace within their standard errors; per-block traces too."""
    name = "convnet-bn"
    exact = float(dense_spectrum(name).sum())
    ops = hessian_operators(name)
    n = ops[CPU].shape[0]
    model, _ = problem(name)
    blocks = ops[CUDA].objective.layout.slices()
    for device, op in ops.items():
        full = hutchpp(op, 3 * n + 3, seed=0)
        assert abs(full.estimate - exact) <= 1e-8 * max(1.0, abs(exact)), device
        for method in (hutchinson, xtrace):
            result = method(op, 60, seed=0, blocks=blocks)
            assert abs(result.estimate - exact) <= 5 * result.stderr + 1e-8, (device, method.__name__)
            assert set(result.blocks) == {p for p, _ in model.named_parameters()}
    a = hutchinson(ops[CPU], 200, seed=3)
    b = hutchinson(ops[CUDA], 200, seed=3)
    assert abs(a.estimate - b.estimate) <= 5 * (a.stderr**2 + b.stderr**2) ** 0.5


def test_slq_density_on_cuda_matches_the_cpu_on_a_dense_matrix():
    """SLQ with the whole Krylov space: the quadrature nodes are the eigenvalues on either device."""
    eigenvalues = np.linspace(-1.0, 3.0, 12)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((12, 12)))
    a = torch.tensor((q * eigenvalues) @ q.T, dtype=torch.float64)
    for device in (CPU, CUDA):
        spectrum = slq_density(DenseOperator(a.to(device)), n_runs=2, n_steps=12, seed=0)
        np.testing.assert_allclose(np.sort(spectrum.nodes[0]), eigenvalues, atol=1e-8)
        assert abs(np.trapezoid(spectrum.density, spectrum.grid) - 1) < 0.05


# ----------------------------------------------------------------------------------------------- surfaces
@pytest.mark.parametrize("dim", [1, 2])
def test_surface_on_cuda_matches_the_cpu(dim, tmp_path):
    """Directions are drawn on the CPU, so both devices walk the same grid: equal losses and accuracies, the CUDA run
    written to HDF5 and read back; the 2-D case re-estimates BN statistics at every point on the device."""
    from landscape.surfaces.directions import random_directions
    from landscape.surfaces.surface import compute_surface, grid_axis, read_surface

    model, batches = problem("convnet-bn")
    axes = [grid_axis(-1, 1, 5)] * dim
    recalibration = 1 if dim == 2 else None
    surfaces = {}
    for device in (CPU, CUDA):
        objective = Objective(model, batches, device=device, dtype=torch.float64)
        directions = random_directions(objective, dim, seed=0)
        assert directions.vectors.device.type == torch.device(device).type
        path = tmp_path / "surface.h5" if device == CUDA else None
        surfaces[device] = compute_surface(objective, directions, axes, path=path, bn_recalibration=recalibration)
    cpu, cuda = surfaces[CPU], surfaces[CUDA]
    assert cuda.complete
    np.testing.assert_allclose(cuda.loss["train"], cpu.loss["train"], rtol=1e-10)
    np.testing.assert_array_equal(cuda.accuracy["train"], cpu.accuracy["train"])
    stored = read_surface(tmp_path / "surface.h5")
    np.testing.assert_array_equal(stored.loss["train"], cuda.loss["train"])
    torch.testing.assert_close(stored.directions.vectors, cuda.directions.vectors.cpu())
    assert stored.metadata["splits"]["train"]["device"].startswith("cuda")


def test_surface_float32_on_cuda_agrees_with_the_cpu_on_resnet20():
    from landscape.surfaces.directions import random_directions
    from landscape.surfaces.surface import compute_surface, grid_axis

    model, batches = problem("resnet20")
    losses = {}
    for device in (CPU, CUDA):
        objective = Objective(model, batches, device=device, dtype=torch.float32)
        losses[device] = compute_surface(objective, random_directions(objective, 1, seed=0), [grid_axis(-0.5, 0.5, 5)])
    np.testing.assert_allclose(losses[CUDA].loss["train"], losses[CPU].loss["train"], rtol=1e-4)


# -------------------------------------------------------------------------------------------- the CLI
MEASURE = [
    "--json",
    "--quiet",
    "--dtype",
    "float64",
    "--n-samples",
    "200",
    "--batch-size",
    "64",
    "--k",
    "3",
    "--tol",
    "1e-8",
    "--metrics",
    "eig,trace,density,expected-loss,eps-sharpness,worst-case,m-sharpness",
    "--density-steps",
    "10",
    "--noise-samples",
    "8",
    "--radius",
    "0.01",
    "--eps-iters",
    "3",
    "--restarts",
    "1",
    "--ascent-steps",
    "3",
    "--m",
    "64",
    "--per-layer",
    "eig,trace",
]


def _measure(capsys, checkpoint, device: str) -> dict:
    from analysis.cli import main

    capsys.readouterr()
    code = main(["measure", str(checkpoint), "--device", device, *MEASURE])
    out, err = capsys.readouterr()
    assert code == 0, err
    (report,) = json.loads(out)
    return report


def test_measure_with_device_cuda_matches_the_cpu(tmp_path, capsys):
    checkpoint = digits_mlp_checkpoint(tmp_path, (16,))
    cpu, cuda = _measure(capsys, checkpoint, CPU), _measure(capsys, checkpoint, CUDA)
    assert cuda["setup"]["device"].startswith("cuda") and cpu["setup"]["device"] == "cpu"
    assert cuda["loss"] == pytest.approx(cpu["loss"], rel=1e-10)
    assert cuda["accuracy"] == cpu["accuracy"]
    assert cuda["grad_norm"] == pytest.approx(cpu["grad_norm"], rel=1e-8)
    metrics = cuda["metrics"]
    assert metrics["eig"]["values"] == pytest.approx(cpu["metrics"]["eig"]["values"], rel=1e-6)
    a, b = metrics["trace"], cpu["metrics"]["trace"]
    assert abs(a["estimate"] - b["estimate"]) <= 5 * (a["stderr"] ** 2 + b["stderr"] ** 2) ** 0.5 + 1e-9
    assert metrics["expected-loss"]["clean_loss"] == pytest.approx(cpu["metrics"]["expected-loss"]["clean_loss"], rel=1e-10)
    for name in ("density", "eps-sharpness", "worst-case", "m-sharpness"):
        assert name in metrics
    for name in ("eps-sharpness", "worst-case"):  # the starts that draw no random numbers ascend alike on both devices
        kinds, on_cuda, on_cpu = metrics[name]["start_kinds"], metrics[name]["values"], cpu["metrics"][name]["values"]
        fixed = [i for i, kind in enumerate(kinds) if kind != "random"]
        assert fixed and kinds == cpu["metrics"][name]["start_kinds"], kinds
        assert [on_cuda[i] for i in fixed] == pytest.approx([on_cpu[i] for i in fixed], rel=1e-6), name
    layers = {b["name"]: b for b in cuda["per_layer"]["blocks"]}
    for block in cpu["per_layer"]["blocks"]:
        assert layers[block["name"]]["lambda1"] == pytest.approx(block["lambda1"], rel=1e-4)


def test_cuda_out_of_memory_mid_run_is_one_line(tmp_path, capsys):
    """ResNet-20 on one batch of 2,048 CIFAR-shaped images with the CUDA allocator held to ~1.5 GiB: the loss fits,
    the gradient does not. The CLI must say so in one line (exit code ≠ 0), not print a traceback."""
    from analysis.cli import main
    from landscape.inputs.checkpoints import save_checkpoint
    from landscape.inputs.models import model_for_data

    g = torch.Generator().manual_seed(0)
    data = tmp_path / "cifar-shaped.npz"
    np.savez(data, x=torch.randn(2048, 3, 32, 32, generator=g).numpy(), y=torch.randint(0, 10, (2048,), generator=g).numpy())
    torch.manual_seed(0)
    model, spec = model_for_data("resnet20", (3, 32, 32), num_classes=10)
    checkpoint = save_checkpoint(
        tmp_path / "resnet20.pt", model, model_spec=spec, data_spec={"spec": f"npz:{data}", "seed": 0, "normalize": None}
    )
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, 1.5 * 2**30 / total), 0)
    capsys.readouterr()
    try:
        code = main(
            [
                "measure",
                str(checkpoint),
                "--device",
                CUDA,
                "--batch-size",
                "2048",
                "--metrics",
                "eig",
                "--hvp",
                "double-backward",
                "--quiet",
                "--json",
            ]
        )
    except torch.cuda.OutOfMemoryError as error:
        pytest.fail(f"CUDA out-of-memory escaped the CLI as a traceback: {str(error).splitlines()[0]}")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("landscape measure: error:") and "memory" in lines[0].lower(), lines[0]


# ------------------------------------------------------------------------------ training on the GPU
@pytest.mark.parametrize("method", ["sgd", "sam", "smoothout", "nso", "nrs"])
def test_cuda_training_steps_match_the_cpu_in_float64(method):
    """One method's steps on the GPU equal the CPU's in float64 (noise methods: deterministic methods only, since the
    device generator's stream differs; the noisy ones must at least train and keep their weights finite)."""
    import torch.nn.functional as F

    from landscape.training.optim import make_optimizer

    results = {}
    for device in ("cpu", CUDA):
        torch.manual_seed(0)
        model = tiny_convnet_bn().double().to(device)
        g = torch.Generator().manual_seed(1)
        x, y = (
            torch.randn(32, 1, 4, 4, generator=g, dtype=torch.float64).to(device),
            torch.randint(0, 3, (32,), generator=g).to(device),
        )
        opt = make_optimizer(method, model, lr=0.1, momentum=0.9)
        losses = [float(opt.step(model, x, y, F.cross_entropy)[0]) for _ in range(5)]
        results[device] = (losses, [p.detach().cpu() for p in model.parameters()])
    assert all(np.isfinite(results[CUDA][0])) and results[CUDA][0][-1] < results[CUDA][0][0]
    if method in ("sgd", "sam"):
        for a, b in zip(results["cpu"][1], results[CUDA][1]):
            assert rel_err(b, a) < 1e-10


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_train_with_amp_and_accumulation_writes_a_trained_checkpoint(tmp_path, amp):
    from landscape.inputs.checkpoints import load_checkpoint
    from landscape.training.loop import TrainConfig, train

    config = TrainConfig(model="convnet", optimizer="sam", amp=amp, accumulate=2, epochs=2, batch_size=64)
    meta = load_checkpoint(train(config, tmp_path / amp, progress=False, device=CUDA)).meta
    first = load_checkpoint(tmp_path / amp / "trajectory" / "epoch_0000.pt").meta["metrics"]["train_loss"]
    assert meta["metrics"]["train_loss"] < 0.7 * first
    assert meta["optimizer"]["amp"] == amp
