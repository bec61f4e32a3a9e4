"""GGN and empirical Fisher operators against dense matrices built independently of the Objective.

Dense GGN: Σ_b (n_b/N)·J_bᵀ H_b J_b from the output Jacobian (torch.autograd.functional.jacobian) and the
loss-output Hessian (torch.autograd.functional.hessian). Dense Fisher: (1/N) Σ_i g_i g_iᵀ from the per-sample
gradients. BatchNorm's train mode is built here by setting only the BN modules to train mode.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from analysis.cli import build_parser, main
from analysis.cli.measure import build_objective
from analysis.cli.specs import ObjectiveSpec
from landscape.curvature.density import slq_density
from landscape.curvature.spectrum import lanczos
from landscape.curvature.trace import xtrace
from landscape.engine import distributed as ranks
from landscape.engine.gauss_newton import CurvatureError, _cross_entropy_hessian_product, output_hessian_product
from landscape.engine.objective import Objective, cross_entropy
from landscape.engine.operators import FisherOperator, GGNOperator, HessianOperator, curvature_operator
from landscape.engine.params import FlatLayout
from tests.ground_truth import dense_hessian, rel_err
from tests.helpers import classification_batches, digits_mlp_checkpoint, tiny_convnet_bn, tiny_mlp
from tests.model_zoo import ZOO, CustomFunctionResidual, zoo_batches
from tests.process_groups import run_on_ranks

PROBLEMS = {"mlp": (tiny_mlp, (12,), 4, [20, 20, 10]), "convnet-bn": (tiny_convnet_bn, (1, 4, 4), 3, [16, 16, 8])}


def _problem(name):
    factory, shape, classes, sizes = PROBLEMS[name]
    _, _, batches = classification_batches(sum(sizes), shape, classes, sizes)
    return factory(), batches


def dense_outputs(model: nn.Module, mode: str):
    """(outputs of a batch as a function of flat float64 weights, the checkpoint's flat weights)."""
    net = copy.deepcopy(model).double().eval()
    if mode == "train":
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    params = dict(net.named_parameters())
    layout = FlatLayout.of(params)
    buffers = {n: b.detach().clone() for n, b in net.named_buffers()}

    def outputs(w, x):
        current = {n: b.clone() for n, b in buffers.items()}  # train-mode BN updates its running stats in place
        return functional_call(net, {**layout.unflatten(w), **current}, (x.double(),))

    return outputs, layout.flatten({n: p.detach() for n, p in params.items()})


def dense_ggn(model, batches, mode):
    outputs, w0 = dense_outputs(model, mode)
    total = sum(len(y) for _, y in batches)
    G = torch.zeros(len(w0), len(w0), dtype=torch.float64)
    for x, y in batches:
        J = jacobian(lambda w: outputs(w, x), w0).reshape(-1, len(w0))
        out = outputs(w0, x).detach()
        H = hessian(lambda f: F.cross_entropy(f, y), out).reshape(out.numel(), out.numel())
        G += len(y) / total * J.T @ H @ J
    return G


def dense_fisher(model, batches, mode):
    outputs, w0 = dense_outputs(model, mode)
    total = sum(len(y) for _, y in batches)
    grads = [jacobian(lambda w: F.cross_entropy(outputs(w, x), y, reduction="none"), w0) for x, y in batches]
    G = torch.cat(grads)  # (N, P): row i is the gradient of sample i's loss within its batch
    assert G.shape[0] == total
    return G.T @ G / total


def as_matrix(op):
    return op.products(torch.eye(op.shape[0], dtype=torch.float64))


def _objective(model, batches, mode="eval", **kwargs):
    return Objective(model, batches, mode=mode, dtype=torch.float64, device="cpu", **kwargs)


# ---------------------------------------------------------------------- the loss Hessian in output space
@pytest.mark.parametrize("n", [5, 300])  # 300: the default loss's transposed log-softmax for few classes on a CPU
def test_output_hessian_of_cross_entropy_is_diag_p_minus_ppT(n):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    U = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
    p = logits.softmax(dim=1)
    blocks = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / n  # (n, 4, 4)
    want = torch.einsum("nij,knj->kni", blocks, U)
    assert rel_err(output_hessian_product(cross_entropy, logits, y, U), want) <= 1e-12  # any loss: jvp of its gradient
    assert rel_err(_cross_entropy_hessian_product(logits, U), want) <= 1e-12  # the closed form GGNOperator uses
    wrong = torch.einsum("nij,knj->kni", torch.diag_embed(p) / n, U)  # diag(p) alone: the check can tell
    assert rel_err(wrong, want) > 0.1


# ---------------------------------------------------------------------------- operators against dense
@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("keep", [True, False])
def test_ggn_and_fisher_match_dense_matrices(name, mode, keep):
    """Uneven batches (…, 10 or 8 samples), weighted by their sizes; BN in both modes; linearizations kept or not."""
    model, batches = _problem(name)
    objective = _objective(model, batches, mode)
    V = torch.randn(3, objective.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for op, dense in (
        (GGNOperator(objective, keep=keep), dense_ggn(model, batches, mode)),
        (FisherOperator(objective, keep=keep), dense_fisher(model, batches, mode)),
    ):
        for repeat in range(2):  # a kept linearization gives the same answer every time
            assert rel_err(op.matvec(V[repeat]), dense @ V[repeat]) <= 1e-10, (type(op).__name__, repeat)
        assert rel_err(op.products(V), V @ dense.T) <= 1e-10, type(op).__name__
        assert op.n_matvecs == 5
    if name == "convnet-bn":  # the modes define different matrices: train mode is not eval mode relabelled
        other = "train" if mode == "eval" else "eval"
        assert rel_err(dense_ggn(model, batches, other), dense_ggn(model, batches, mode)) > 0.05


ZOO_CASES = [(name, mode) for name, idiom in ZOO.items() for mode in (("eval", "train") if idiom.has_batchnorm else ("eval",))]


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", ZOO_CASES + [("custom-function-inplace", "eval")])
def test_every_model_idiom(name, mode):
    """In-place adds and ReLUs, tied weights, written buffers, norms, a custom Function (with `out += h`: not
    functionalizable, so its jvp runs eagerly): kept linearizations give the dense GGN and Fisher, product after product."""
    model = CustomFunctionResidual((6,), 3) if name == "custom-function-inplace" else ZOO[name].build()
    batches = zoo_batches("custom-function" if name == "custom-function-inplace" else name)
    objective = _objective(model, batches, mode)
    V = torch.randn(3, objective.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for op, dense in (
        (GGNOperator(objective, keep=True), dense_ggn(model, batches, mode)),
        (FisherOperator(objective, keep=True), dense_fisher(model, batches, mode)),
    ):
        for repeat in range(2):
            assert rel_err(op.matvec(V[0]), dense @ V[0]) <= 1e-10, (type(op).__name__, repeat)
        assert rel_err(op.products(V), V @ dense.T) <= 1e-10, type(op).__name__


@pytest.mark.slow
def test_weights_are_batch_sizes_not_batch_means(conv_problem):
    """Eval mode: 16 + 16 + 8 samples in three batches give the one-big-batch GGN and Fisher; equal weights per batch would not."""
    model, x, y, batches = conv_problem
    split, whole = _objective(model, batches), _objective(model, [(x, y)])
    for kind in ("ggn", "fisher"):
        a, b = as_matrix(curvature_operator(split, kind)), as_matrix(curvature_operator(whole, kind))
        assert rel_err(a, b) <= 1e-12, kind
        per_batch = [as_matrix(curvature_operator(_objective(model, [batch]), kind)) for batch in batches]
        assert rel_err(sum(per_batch) / len(per_batch), b) > 1e-3, kind  # a mean of batch means differs


# ------------------------------------------------------------------------------- structure checks
def test_ggn_equals_hessian_for_a_model_linear_in_its_weights(mlp_problem):
    _, _, _, batches = mlp_problem
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    H = dense_hessian(linear, batches, "eval")
    assert rel_err(as_matrix(GGNOperator(_objective(linear, batches))), H) <= 1e-12
    model = tiny_mlp()  # the check can fail: with a tanh layer the GGN drops a term of the Hessian
    assert rel_err(as_matrix(GGNOperator(_objective(model, batches))), dense_hessian(model, batches, "eval")) > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_ggn_and_fisher_are_psd_where_the_hessian_is_not(name):
    model, batches = _problem(name)
    objective = _objective(model, batches, "train")
    H = as_matrix(HessianOperator(objective))
    assert torch.linalg.eigvalsh((H + H.T) / 2)[0] < -1e-4  # indefinite, so the test below can fail
    for op in (GGNOperator(objective), FisherOperator(objective)):
        A = as_matrix(op)
        assert rel_err(A, A.T) <= 1e-12
        assert torch.linalg.eigvalsh((A + A.T) / 2)[0] >= -1e-10 * torch.linalg.matrix_norm(A, 2)


def test_estimators_run_unchanged_on_ggn_and_fisher(mlp_problem):
    """Lanczos equals numpy's eigh of the dense GGN; XTrace is exact on the rank-≤50 Fisher; SLQ's nodes lie in the spectrum."""
    model, _, _, batches = mlp_problem
    objective = _objective(model, batches)
    G = dense_ggn(model, batches, "eval").numpy()
    exact = np.linalg.eigh((G + G.T) / 2)[0][::-1]
    top = lanczos(GGNOperator(objective), 4, tol=1e-10, seed=0)
    np.testing.assert_allclose(top.values, exact[:4], rtol=1e-8)
    Fd = dense_fisher(model, batches, "eval")
    assert objective.n_params == 140 and objective.n_samples == 50
    trace = xtrace(FisherOperator(objective), 120, seed=0)  # 60 test vectors > rank F ≤ 50: exact
    assert trace.estimate == pytest.approx(float(Fd.trace()), rel=1e-10)
    density = slq_density(GGNOperator(objective), n_runs=2, n_steps=20, seed=0)
    nodes = np.asarray(density.nodes)[np.asarray(density.weights) > 1e-12]
    assert nodes.min() >= exact[-1] - 1e-8 and nodes.max() <= exact[0] + 1e-8


# --------------------------------------------------------------------------------- loss functions
def test_fisher_of_a_custom_loss_uses_per_sample_losses(mlp_problem):
    model, _, _, batches = mlp_problem
    reference = as_matrix(FisherOperator(_objective(model, batches)))
    custom = _objective(model, batches, loss_fn=lambda f, y: -(f.log_softmax(dim=1).gather(1, y[:, None])).mean())
    assert rel_err(as_matrix(FisherOperator(custom)), reference) <= 1e-12  # evaluated one sample at a time
    summed = _objective(model, batches, loss_fn=lambda f, y: F.cross_entropy(f, y, reduction="sum"))
    with pytest.raises(CurvatureError, match="mean over samples"):
        FisherOperator(summed)
    opaque = _objective(model, batches, loss_fn=lambda f, y: F.cross_entropy(f, y) * float(f.sum().item() != 0))
    with pytest.raises(CurvatureError, match="per-sample losses"):
        FisherOperator(opaque)
    per_sample = FisherOperator(opaque, per_sample_loss=lambda f, y: F.cross_entropy(f, y, reduction="none"))
    assert rel_err(as_matrix(per_sample), reference) <= 1e-12


def test_ggn_of_a_squared_error_loss(mlp_problem):
    """Any loss: H_ℓ comes from the loss itself; for ½‖f − t‖²/n it is I/n, so G = (1/N) Σ JᵀJ."""
    model, _, _, batches = mlp_problem
    targets = [(x, torch.nn.functional.one_hot(y, 4).double()) for x, y in batches]
    objective = _objective(model, targets, loss_fn=lambda f, t: 0.5 * ((f - t) ** 2).sum(dim=1).mean())
    outputs, w0 = dense_outputs(model, "eval")
    J = torch.cat([jacobian(lambda w: outputs(w, x), w0).reshape(-1, len(w0)) for x, _ in targets])
    assert rel_err(as_matrix(GGNOperator(objective)), J.T @ J / 50) <= 1e-10


# ------------------------------------------------------------------------------------ distributed
def _sharded_products(distributed: bool) -> dict:
    _, _, batches = classification_batches(45, (1, 4, 4), 3, [10, 10, 10, 10, 5], seed=1)
    out = {}
    for mode in ("eval", "train"):
        objective = Objective(
            tiny_convnet_bn(),
            ranks.shard(batches) if distributed else batches,
            mode=mode,
            dtype=torch.float64,
            device="cpu",
            distributed=distributed,
        )
        V = torch.randn(3, objective.n_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        out[f"{mode}-ggn"] = GGNOperator(objective, keep=False).products(V)
        out[f"{mode}-fisher"] = FisherOperator(objective, keep=False).products(V)
    return out


def _sharded_on_a_rank() -> dict:
    return _sharded_products(distributed=True)


@pytest.mark.distributed
def test_two_ranks_give_the_one_process_products(tmp_path):
    """Batches sharded 3 + 2 over two gloo ranks: the all-reduced products equal one process's, on every rank."""
    single = _sharded_products(distributed=False)
    for rank, products in enumerate(run_on_ranks(_sharded_on_a_rank, tmp_path)):
        for key, value in single.items():
            assert rel_err(products[key], value) <= 1e-12, (rank, key)


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return digits_mlp_checkpoint(tmp_path_factory.mktemp("ckpt"), hidden=(8,))


MEASURE = [
    "--dtype",
    "float64",
    "--n-samples",
    "100",
    "--batch-size",
    "40",
    "--k",
    "2",
    "--tol",
    "1e-10",
    "--metrics",
    "eig,trace",
    "--trace-method",
    "hutchinson",
    "--probes",
    "4",
    "--quiet",
]


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_measure_reports_the_chosen_curvature(checkpoint, curvature, capsys):
    """λ1, λ2 of `landscape measure --curvature` are the operator's (not the Hessian's); the JSON and table say which."""
    assert main(["measure", str(checkpoint), "--curvature", curvature, "--json", *MEASURE]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["setup"]["curvature"] == curvature
    args = build_parser().parse_args(["measure", str(checkpoint), *MEASURE])
    objective = build_objective(str(checkpoint), ObjectiveSpec.from_args(args))
    exact = {}
    for kind in (curvature, "hessian"):
        A = as_matrix(curvature_operator(objective, kind))
        exact[kind] = torch.linalg.eigvalsh((A + A.T) / 2).flip(0)[:2].tolist()
    assert report["metrics"]["eig"]["values"] == pytest.approx(exact[curvature], rel=1e-8)
    assert exact["hessian"] != pytest.approx(exact[curvature], rel=1e-2)
    assert main(["measure", str(checkpoint), "--curvature", curvature, *MEASURE]) == 0
    table = capsys.readouterr().out
    name, products = {"ggn": ("generalized Gauss-Newton", "GGN products"), "fisher": ("empirical Fisher", "Fisher products")}[
        curvature
    ]
    assert f"curvature: {name}" in table and products in table and "HVPs" not in table.split("curvature:")[1]


def test_compare_refuses_another_curvature_in_one_line(checkpoint, capsys):
    assert main(["compare", str(checkpoint), "--curvature", "ggn", "--out", str(checkpoint.parent / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--curvature ggn" in err[0] and "landscape measure --curvature ggn" in err[0]
