"""The Objective's loss, gradient and every HVP path against dense ground truth."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landscape.engine.hvp_paths import HVP_METHODS
from landscape.engine.memory import GRAPH_OVERHEAD
from landscape.engine.objective import Objective, ObjectiveError, cross_entropy
from landscape.engine.operators import HessianOperator
from landscape.engine.params import FlatLayout, select_parameters

EXACT_METHODS = [m for m in HVP_METHODS if m != "auto"]


def dense_reference(model, batches, mode, selection="all"):
    """Loss function of flat weights on a plain nn.Module in `mode` (independent of Objective)."""
    net = copy.deepcopy(model).double()
    net.train(mode == "train")
    names = select_parameters(net, selection)
    params = dict(net.named_parameters())
    layout = FlatLayout.of({n: params[n] for n in names})
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    total = sum(len(y) for _, y in batches)

    def loss(w):
        state = {**fixed, **layout.unflatten(w)}
        buffers = {n: b.clone() for n, b in net.named_buffers()}  # train mode updates running stats in place
        return sum(
            len(y) / total * F.cross_entropy(functional_call(net, {**state, **buffers}, (x.double(),)), y) for x, y in batches
        )

    w0 = layout.flatten({n: params[n].detach() for n in names})
    return loss, w0


def dense_hessian(model, batches, mode, selection="all"):
    loss, w0 = dense_reference(model, batches, mode, selection)
    return torch.autograd.functional.hessian(loss, w0)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["mlp_problem", "conv_problem"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_hvp_path_matches_dense_hessian(problem, mode, request):
    model, _, _, batches = request.getfixturevalue(problem)
    H = dense_hessian(model, batches, mode)
    V = torch.randn(3, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for method in EXACT_METHODS:
        obj = Objective(model, batches, mode=mode, dtype=torch.float64, device="cpu", hvp_method=method)
        assert rel_err(obj.hvp(V[0]), H @ V[0]) <= 1e-10, method
        assert rel_err(obj.hvp_batched(V), V @ H) <= 1e-10, method


def test_train_mode_hessian_differs_from_eval_mode(conv_problem):
    """The two modes define different objectives; eval mode is not a stand-in (PyHessian's mistake)."""
    model, _, _, batches = conv_problem
    H_eval = dense_hessian(model, batches, "eval")
    H_train = dense_hessian(model, batches, "train")
    assert rel_err(H_eval, H_train) > 0.1
    obj = Objective(model, batches, mode="train", dtype=torch.float64, device="cpu")
    v = torch.randn(H_train.shape[0], dtype=torch.float64)
    assert rel_err(obj.hvp(v), H_train @ v) <= 1e-10


def test_uneven_batches_equal_one_big_batch(conv_problem):
    model, x, y, batches = conv_problem
    split = Objective(model, batches, dtype=torch.float64, device="cpu")
    whole = Objective(model, [(x, y)], dtype=torch.float64, device="cpu")
    assert [len(b[1]) for b in batches] == [16, 16, 8]
    assert split.loss() == pytest.approx(whole.loss(), rel=1e-12)
    assert rel_err(split.grad(), whole.grad()) <= 1e-12
    v = torch.randn(split.n_params, dtype=torch.float64)
    assert rel_err(split.hvp(v), whole.hvp(v)) <= 1e-12


def test_gradient_and_accuracy_against_reference(mlp_problem):
    model, x, y, batches = mlp_problem
    obj = Objective(model, batches, dtype=torch.float64, device="cpu")
    loss, w0 = dense_reference(model, batches, "eval")
    assert obj.loss() == pytest.approx(float(loss(w0)), rel=1e-12)
    assert rel_err(obj.grad(), torch.func.grad(loss)(w0)) <= 1e-12
    expected_acc = float((model.double()(x.double()).argmax(1) == y).double().mean())
    assert obj.evaluate().accuracy == pytest.approx(expected_acc)
    w = obj.w + 0.1
    assert obj.loss(w) == pytest.approx(float(loss(w)), rel=1e-12)


def test_parameter_selection_gives_the_hessian_block(conv_problem):
    model, _, _, batches = conv_problem
    H_sub = dense_hessian(model, batches, "eval", "no-bn-bias")
    obj = Objective(model, batches, params="no-bn-bias", dtype=torch.float64, device="cpu")
    assert obj.n_params == H_sub.shape[0] == sum(p.numel() for n, p in model.named_parameters() if p.ndim > 1)
    v = torch.randn(obj.n_params, dtype=torch.float64)
    assert rel_err(obj.hvp(v), H_sub @ v) <= 1e-10


def test_measuring_never_changes_the_model(conv_problem):
    model, _, _, batches = conv_problem
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = Objective(model, batches, mode="train", device="cpu")
    obj.hvp(torch.randn(obj.n_params))
    obj.grad(obj.w + 1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training  # the caller's module keeps its own mode


@pytest.mark.parametrize("change", ["optimizer step", "load_state_dict", "train-mode forward"])
def test_an_objective_refuses_once_its_model_trained_on_instead_of_measuring_the_old_weights(conv_problem, change):
    """Built before more training, an Objective would answer for the weights it copied: it refuses."""
    model, x, _, batches = conv_problem
    obj = Objective(model, batches, device="cpu")
    lambda_before = obj.hvp(torch.ones(obj.n_params))
    model.eval()
    with torch.no_grad():
        model(x)  # an eval-mode forward writes nothing
    assert torch.equal(obj.hvp(torch.ones(obj.n_params)), lambda_before)
    if change == "optimizer step":
        model(x).sum().backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    elif change == "load_state_dict":
        model.load_state_dict(copy.deepcopy(model).state_dict())  # the same values, written in place
    else:
        model.train()(x)  # moves the BatchNorm running statistics
    for call in (obj.loss, obj.grad, lambda: obj.hvp(torch.ones(obj.n_params)), obj.restricted(batches[:1]).loss):
        with pytest.raises(ObjectiveError, match="the model changed in place since this Objective copied it"):
            call()
    Objective(model, batches, device="cpu").loss()  # a fresh one measures the model as it is now


def test_data_the_model_cannot_take_is_one_line_naming_the_model_and_the_input_shape(tmp_path):
    """The framework's "expected 4D input (got 3D input)" named neither: the Objective and the CLI's data check say both."""
    from landscape.engine.from_checkpoint import check_data_fits
    from landscape.inputs.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
    from landscape.inputs.data import load_data
    from landscape.inputs.models import model_for_data

    net, spec = model_for_data("convnet", (1, 8, 8), 10)  # Conv2d + BatchNorm2d: BN raises the ValueError
    x, y = torch.randn(20, 8, 8), torch.randint(0, 10, (20,))  # the channel axis missing
    with pytest.raises(ObjectiveError) as info:
        Objective(net, [(x, y)], device="cpu")
    message = str(info.value)
    assert message.startswith("the model (ConvNet) cannot take the data's inputs of shape (8, 8) (batches of 20): ")
    assert "\n" not in message
    np.savez(tmp_path / "flat.npz", x=x.numpy(), y=y.numpy())
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "net.pt", net, model_spec=spec))
    with pytest.raises(CheckpointError, match=r"gives inputs of shape \(8, 8\) but the model in .*net.pt \(convnet\) expects"):
        check_data_fits(net, load_data(f"npz:{tmp_path / 'flat.npz'}"), checkpoint, spec)


class _LegacyScale(torch.autograd.Function):
    """An old-style autograd.Function (no setup_context): autograd runs it, torch.func cannot."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class _LegacyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(12, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.b(_LegacyScale.apply(self.a(x)))


def test_auto_uses_autograd_so_models_torch_func_cannot_trace_just_work(mlp_problem):
    _, _, _, batches = mlp_problem
    model = _LegacyNet()
    obj = Objective(model, batches, dtype=torch.float64, device="cpu")
    assert obj.hvp_method == "reuse"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hv = obj.hvp(torch.ones(obj.n_params, dtype=torch.float64))
    H = dense_hessian(model, batches, "eval")
    assert rel_err(hv, H @ torch.ones(H.shape[0], dtype=torch.float64)) <= 1e-10
    named = Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method="linearize")
    with pytest.raises(ObjectiveError, match="could not trace") as error:
        named.hvp(torch.ones(obj.n_params, dtype=torch.float64))
    assert "\n" not in str(error.value)


def test_auto_keeps_the_graphs_that_fit_and_streams_the_rest(mlp_problem):
    """Issue 15: a budget of one batch keeps one batch's gradient graph; none keeps none; the products stay exact."""
    model, _, _, batches = mlp_problem
    H = dense_hessian(model, batches, "eval")
    V = torch.randn(3, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = Objective(model, batches, dtype=torch.float64, device="cpu")
    assert full.memory_plan.kept_batches == 3 and full.memory_plan.streamed_batches == 0
    one_batch = GRAPH_OVERHEAD["kept"] * full._graph_bytes(batches[0])
    for budget, kept in [(1.0, 0), (one_batch * 1.01, 1), (one_batch * 2.5, 2), (None, 3)]:
        obj = Objective(model, batches, dtype=torch.float64, device="cpu", graph_memory_budget=budget)
        assert obj.memory_plan.kept_batches == kept, budget
        assert rel_err(obj.hvp_batched(V), V @ H) <= 1e-10
        assert rel_err(obj.hvp_batched(V), V @ H) <= 1e-10  # again, through the kept graph


def test_hessian_operator_and_scipy_view(mlp_problem):
    model, _, _, batches = mlp_problem
    obj = Objective(model, batches, dtype=torch.float64, device="cpu")
    H = dense_hessian(model, batches, "eval")
    op = HessianOperator(obj)
    V = torch.randn(4, H.shape[0], dtype=torch.float64)  # 4 probes, as rows
    assert rel_err(op.products(V), V @ H.T) <= 1e-10
    assert op.n_matvecs == 4
    x = V[0].numpy()
    assert rel_err(torch.as_tensor(op.to_scipy() @ x), H @ V[0]) <= 1e-10
    # scipy's own convention: columns in, columns out (the adapter transposes, once)
    assert rel_err(torch.as_tensor(op.to_scipy() @ V.T.numpy()), H @ V.T) <= 1e-10


def test_bad_inputs_raise_clear_errors(mlp_problem):
    model, _, _, batches = mlp_problem
    with pytest.raises(ObjectiveError, match="empty"):
        Objective(model, [], device="cpu")
    with pytest.raises(ObjectiveError, match="hvp_method"):
        Objective(model, batches, device="cpu", hvp_method="magic")
    obj = Objective(model, batches, device="cpu")
    with pytest.raises(ObjectiveError, match="shape"):
        obj.hvp_batched(torch.ones(2, 3))
    with pytest.raises(ObjectiveError, match="not finite"):
        obj.loss(torch.full_like(obj.w, float("nan")))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[1].weight[0, 0] = float("inf")
    with pytest.raises(ObjectiveError, match="1.weight"):
        Objective(broken, batches, device="cpu")


@pytest.mark.parametrize("hvp", ["double-backward", "reuse"])
def test_evaluate_first_merges_eval_batches_without_changing_the_loss(mlp_problem, hvp):
    """An explicit HVP path leaves the activation-size measurement to the first evaluate (under no_grad)."""
    model, x, y, batches = mlp_problem
    objective = Objective(model, batches, dtype=torch.float64, hvp_method=hvp)
    expected = torch.nn.functional.cross_entropy(model.double()(x.double()), y).item()
    assert objective.evaluate().loss == pytest.approx(expected, rel=1e-12)
    assert len(objective._forward_batches()) == 1  # three small batches, one forward call


@pytest.mark.parametrize("n, classes, soft", [(300, 10, False), (300, 20, False), (100, 10, False), (300, 10, True)])
def test_default_loss_is_cross_entropy_with_its_derivatives(n, classes, soft):
    """The sample-axis path (many samples, few classes) and the F.cross_entropy fallback: value, gradient, Hessian."""
    g = torch.Generator().manual_seed(n + classes)
    logits = 3 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    targets = (
        torch.softmax(torch.randn(n, classes, generator=g, dtype=torch.float64), 1)
        if soft
        else torch.randint(0, classes, (n,), generator=g)
    )
    ours, reference = (lambda z: cross_entropy(z, targets)), (lambda z: F.cross_entropy(z, targets))
    assert ours(logits).item() == pytest.approx(reference(logits).item(), rel=1e-13)
    torch.testing.assert_close(torch.func.grad(ours)(logits), torch.func.grad(reference)(logits), rtol=1e-12, atol=1e-15)
    v = torch.randn(n, classes, generator=g, dtype=torch.float64)  # a Hessian-vector product in logit space
    hvp_ours = torch.func.jvp(torch.func.grad(ours), (logits,), (v,))[1]
    hvp_reference = torch.func.jvp(torch.func.grad(reference), (logits,), (v,))[1]
    torch.testing.assert_close(hvp_ours, hvp_reference, rtol=1e-12, atol=1e-15)
    assert Objective(nn.Linear(classes, classes), [(logits, targets)], device="cpu").loss_fn is cross_entropy


@pytest.mark.parametrize("idiom", ["tied-weights", "shared-module", "mutated-buffers", "batchnorm2d", "channels-last"])
def test_direct_swap_is_functional_call(idiom):
    """The Objective puts its tensors into the model's slots itself (functional_call's per-call walk of the
    module tree cost 1-2% of a small model's gradient): same outputs and gradients as functional_call, tied names
    included, and the model's own tensors back in place afterwards, also when the forward raises."""
    from landscape.engine.objective import _forward
    from tests.model_zoo import ZOO

    spec = ZOO[idiom]
    x = torch.randn(5, *spec.in_shape, generator=torch.Generator().manual_seed(0))
    objective = Objective(spec.build(), [(x, torch.tensor([0, 1, 2, 0, 1]))], dtype=torch.float64, device="cpu")
    model, x = objective.model, x.double()
    tensors = lambda: {**dict(model.named_parameters()), **dict(model.named_buffers())}  # noqa: E731
    before = tensors()
    w = (objective.w + 0.1).requires_grad_(True)
    direct = _forward(model, objective._state(w), (x,), {}, objective._slots)
    with pytest.raises(RuntimeError):
        _forward(model, objective._state(w), (x[:, :1],), {}, objective._slots)  # wrong input width: raises mid-forward
    after = tensors()
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    # functional_call last: on a module registered twice (shared-module) it leaves the swapped-in tensors in place
    reference = functional_call(model, objective._state(w), (x,))
    torch.testing.assert_close(direct, reference, rtol=0, atol=0)
    (g_direct,) = torch.autograd.grad(direct.square().sum(), w)
    (g_reference,) = torch.autograd.grad(reference.square().sum(), w)
    torch.testing.assert_close(g_direct, g_reference, rtol=0, atol=0)
