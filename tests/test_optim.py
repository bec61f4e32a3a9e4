"""Flat-minimum optimizers: each step is the base step at w with the method's gradient, recomputed independently."""

import copy
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.training.optim import DISTRIBUTIONS, METHODS, TO_UNIT_STD, draw, kl_divergence, make_optimizer, smoothout_noise

LR = 0.1


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*[m for m in layers if bn or not isinstance(m, nn.BatchNorm1d)])


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))


def batch(n=32, shape=(6,), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grad_at(model, x, y, deltas=None, train=True):
    """∇ cross-entropy of a private copy of `model` at w + deltas (by name), plus the copy's buffers after the pass."""
    net = copy.deepcopy(model).train(train)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if deltas and n in deltas:
                p.add_(deltas[n])
    F.cross_entropy(net(x), y).backward()
    return {n: p.grad for n, p in net.named_parameters()}, {n: b for n, b in net.named_buffers()}


def assert_base_step(model, before, momentum=0.0, weight_decay=0.0):
    """The weights are bitwise what torch.optim.SGD does from `before` given the gradient the method left in p.grad."""
    twins = {n: nn.Parameter(w.clone()) for n, w in before.items()}
    for n, p in model.named_parameters():
        twins[n].grad = p.grad.clone()
    torch.optim.SGD(list(twins.values()), lr=LR, momentum=momentum, weight_decay=weight_decay).step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), twins[n].detach()), n


def assert_grads(model, expected, rtol=1e-5, atol=1e-7):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=rtol, atol=atol, msg=n)


def assert_differ(a, b):
    assert any(not torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6) for n in a)


# ---------------------------------------------------------------- SmoothOut / AdaSmoothOut


@pytest.mark.parametrize(
    "name, scale, net", [("smoothout", "absolute", "mlp"), ("smoothout", "weight", "mlp"), ("adasmoothout", "filter", "conv")]
)
def test_smoothout_gradient_is_taken_at_w_plus_u_and_step_at_w(name, scale, net):
    model = mlp(bn=True) if net == "mlp" else convnet()
    x, y = batch() if net == "mlp" else batch(shape=(2, 4, 4))
    options = {} if name == "adasmoothout" else {"scale": scale}  # AdaSmoothOut is filter noise by default
    opt = make_optimizer(name, model, lr=LR, momentum=0.9, weight_decay=1e-3, a=0.05, seed=3, **options)
    assert opt.config()["scale"] == scale
    before, ref = weights(model), copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    noise = {n: smoothout_noise(before[n], 0.05, scale, gen) for n in opt.config()["perturbed"]}
    loss, logits = opt.step(model, x, y, F.cross_entropy)
    expected, _ = grad_at(ref, x, y, noise)
    assert_grads(model, expected, rtol=1e-6)
    assert_differ(expected, grad_at(ref, x, y)[0])  # the noise mattered
    assert_base_step(model, before, momentum=0.9, weight_decay=1e-3)
    assert logits.shape == (32, 3) and loss.shape == ()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_drift_with_zero_learning_rate(name):
    model = mlp(bn=True)
    before = weights(model)
    opt = make_optimizer(name, model, lr=0.0, **({"ghost_batch_size": 10} if name == "smoothout" else {}))
    x, y = batch()
    for _ in range(20):
        opt.step(model, x, y, F.cross_entropy)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_without_denoising_the_noise_stays():
    model = mlp()
    before = weights(model)
    opt = make_optimizer("smoothout", model, lr=0.0, a=0.05, denoise=False)
    opt.step(model, *batch(), F.cross_entropy)
    gen = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n] + smoothout_noise(before[n], 0.05, "absolute", gen)), n


def test_noise_statistics():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200_000, generator=gen)
    a = 0.3
    n = smoothout_noise(w, a, "absolute", gen)
    assert n.abs().max() <= a and abs(float(n.mean())) < 3e-3
    assert float(n.var()) == pytest.approx(a * a / 3, rel=0.02)
    n = smoothout_noise(w, a, "weight", gen)
    assert torch.all(n.abs() <= a * w.abs()) and float((n.abs() / (a * w.abs())).mean()) == pytest.approx(0.5, rel=0.02)
    for distribution in ("uniform", "gaussian"):
        conv = torch.randn(8, 3, 3, 3, generator=gen)
        rows = smoothout_noise(conv, a, "filter", gen, distribution).reshape(8, -1).norm(dim=1)
        torch.testing.assert_close(rows, a * conv.reshape(8, -1).norm(dim=1), rtol=1e-5, atol=0)
        bias = torch.randn(50, generator=gen)
        torch.testing.assert_close(smoothout_noise(bias, a, "filter", gen, distribution).abs(), a * bias.abs(), rtol=1e-6, atol=0)
    for distribution in DISTRIBUTIONS:  # NSO's unit-variance noise
        u = draw(distribution, w, gen) * TO_UNIT_STD[distribution]
        assert float(u.var()) == pytest.approx(1.0, rel=0.03), distribution
    assert set(draw("rademacher", w, gen).unique().tolist()) == {-1.0, 1.0}
    assert float(draw("sphere", w, gen).norm()) == pytest.approx(math.sqrt(w.numel()), rel=1e-5)


def test_noise_schedules():
    model, T, a = mlp(), 100, 0.1
    tanh = make_optimizer("smoothout", model, lr=LR, a=a, schedule="tanh", total_steps=T)
    assert tanh.noise_scale(0) == pytest.approx(a * (math.tanh(-5) + 1) / 2) and tanh.noise_scale(0) < 1e-5
    assert tanh.noise_scale(T // 2) == pytest.approx(a / 2)
    assert tanh.noise_scale(T) == pytest.approx(a * (math.tanh(5) + 1) / 2) and tanh.noise_scale(T) > 0.9999 * a
    anneal = make_optimizer("smoothout", model, lr=LR, a=a, schedule="anneal")
    assert anneal.noise_scale(0) == a
    assert anneal.noise_scale(99) == pytest.approx(a * 100**-0.275)
    assert make_optimizer("smoothout", model, lr=LR, a=a).noise_scale(10_000) == a
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer("smoothout", model, lr=LR, schedule="tanh")
    # the step uses the scale of its own step number: at lr=0 the noise seen by the forward pass is a_t·u
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(m[0].weight.detach().clone()))
    w0 = model[0].weight.detach().clone()
    x, y = batch()
    anneal.base.param_groups[0]["lr"] = 0.0
    for _ in range(3):
        anneal.step(model, x, y, F.cross_entropy)
    gen = torch.Generator().manual_seed(0)
    for t in range(3):
        expected = [smoothout_noise(p.detach(), anneal.noise_scale(t), "absolute", gen) for p in model.parameters()][0]
        assert torch.equal(seen[t], w0 + expected)


def test_bn_parameters_excluded_and_biases_perturbed_by_default():
    def seen_in_forward(**options):
        model, captured = mlp(bn=True), {}
        model[1].register_forward_pre_hook(lambda m, inp: captured.update(bn=m.weight.detach().clone()))
        model[0].register_forward_pre_hook(lambda m, inp: captured.update(bias=m.bias.detach().clone()))
        opt = make_optimizer("smoothout", model, lr=LR, a=0.05, **options)
        before = weights(model)
        opt.step(model, *batch(), F.cross_entropy)
        return opt, torch.equal(captured["bn"], before["1.weight"]), torch.equal(captured["bias"], before["0.bias"])

    opt, bn_clean, bias_clean = seen_in_forward()
    assert bn_clean and not bias_clean
    assert opt.config()["perturbed"] == ["0.weight", "0.bias", "3.weight", "3.bias"] and opt.config()["exclude_bn"]
    _, bn_clean, bias_clean = seen_in_forward(exclude_bn=False, exclude_bias=True)
    assert not bn_clean and bias_clean


def test_ghost_batches_without_noise_equal_the_full_batch_step():
    x, y = batch(n=32)
    plain, ghost = mlp(), mlp()
    loss_plain, _ = make_optimizer("sgd", plain, lr=LR).step(plain, x, y, F.cross_entropy)
    loss_ghost, logits = make_optimizer("smoothout", ghost, lr=LR, a=0.0, ghost_batch_size=7).step(ghost, x, y, F.cross_entropy)
    assert logits.shape == (32, 3) and float(loss_ghost) == pytest.approx(float(loss_plain), rel=1e-6)
    for p, q in zip(plain.parameters(), ghost.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


def test_ghost_batches_draw_fresh_noise_per_chunk():
    model, ref = mlp(), mlp()
    x, y = batch(n=20)
    opt = make_optimizer("smoothout", model, lr=LR, a=0.05, ghost_batch_size=12, seed=5)
    before = weights(model)
    opt.step(model, x, y, F.cross_entropy)
    gen = torch.Generator().manual_seed(5)
    chunks = [(x[:12], y[:12]), (x[12:], y[12:])]
    expected = {n: 0 for n in before}
    for xc, yc in chunks:
        noise = {n: smoothout_noise(before[n], 0.05, "absolute", gen) for n in before}
        grads, _ = grad_at(ref, xc, yc, noise)
        expected = {n: expected[n] + len(yc) / 20 * grads[n] for n in before}
    assert_grads(model, expected)


# ---------------------------------------------------------------- S-SGD and NSO


def test_ssgd_gradient_is_the_symmetric_average():
    model, ref = mlp(bn=True), mlp(bn=True)
    x, y = batch()
    opt = make_optimizer("ssgd", model, lr=LR, sigma=0.05, seed=2)
    before = weights(model)
    gen = torch.Generator().manual_seed(2)
    delta = {n: 0.05 * draw("rademacher", w, gen) for n, w in before.items()}
    assert all(torch.all(d.abs() == 0.05) for d in delta.values())
    opt.step(model, x, y, F.cross_entropy)
    plus, _ = grad_at(ref, x, y, delta)
    minus, _ = grad_at(ref, x, y, {n: -d for n, d in delta.items()})
    assert_grads(model, {n: (plus[n] + minus[n]) / 2 for n in before})
    assert_differ(plus, minus)
    assert_base_step(model, before)


class Quadratic(nn.Module):
    """L(w) = ½ wᵀAw through the model interface: forward ignores x and returns w."""

    def __init__(self, n=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.A = m @ m.T + torch.eye(n, dtype=torch.float64)
        self.w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, x):
        return self.w

    def loss(self, out, y):
        return 0.5 * out @ self.A @ out


def test_ssgd_on_a_quadratic_recovers_the_clean_gradient():
    """Odd terms cancel: ½[A(w+δ) + A(w−δ)] = Aw, although each side is off by Aδ."""
    q = Quadratic()
    clean = (q.A @ q.w).detach()
    opt = make_optimizer("ssgd", q, lr=LR, sigma=0.5)
    opt.step(q, torch.zeros(1), torch.zeros(1), q.loss)
    torch.testing.assert_close(q.w.grad, clean, rtol=1e-12, atol=1e-12)
    assert float((q.A @ torch.full((5,), 0.5, dtype=torch.float64)).abs().min()) > 0.1  # one-sided error would show


def test_nso_combines_clean_and_two_point_gradients():
    model, ref = mlp(bn=True), mlp(bn=True)
    x, y = batch()
    lam, k, sigma = 0.3, 2, 0.05
    opt = make_optimizer("nso", model, lr=LR, sigma=sigma, k=k, clean_weight=lam, seed=4, distribution="laplace")
    before = weights(model)
    gen = torch.Generator().manual_seed(4)
    draws = [{n: draw("laplace", w, gen) * (sigma * TO_UNIT_STD["laplace"]) for n, w in before.items()} for _ in range(k)]
    opt.step(model, x, y, F.cross_entropy)
    clean, clean_buffers = grad_at(ref, x, y)
    expected = {n: lam * g for n, g in clean.items()}
    for u in draws:
        for sign in (1, -1):
            grads, _ = grad_at(ref, x, y, {n: sign * d for n, d in u.items()})
            expected = {n: expected[n] + (1 - lam) / (2 * k) * grads[n] for n in expected}
    assert_grads(model, expected)
    assert_base_step(model, before)
    for n, b in model.named_buffers():  # the clean pass alone updated the BN statistics
        assert torch.equal(b, clean_buffers[n]), n


def test_nso_clean_pass_moves_bn_statistics_even_at_weight_zero():
    """The authors' trainer runs the clean pass with running statistics on at λ = 0 too (their scripts' setting):
    after a step the statistics are those of a clean forward at W, the gradient is the two-point average alone."""
    x, y = batch()
    model = mlp(bn=True)
    opt = make_optimizer("nso", model, lr=LR, seed=2)  # defaults: λ = 0, bn_update="clean"
    assert opt.config()["bn_update"] == "clean"
    for _ in range(5):
        model.zero_grad()
        opt.step(model, x, y, F.cross_entropy)
    counts = [int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert counts and all(c == 5 for c in counts)  # was 0: the statistics never moved
    model, ref = mlp(bn=True), mlp(bn=True)
    opt = make_optimizer("nso", model, lr=LR, seed=2)
    before = weights(model)
    opt.step(model, x, y, F.cross_entropy)
    _, clean_buffers = grad_at(ref, x, y)
    for n, b in model.named_buffers():
        assert torch.equal(b, clean_buffers[n]), n
    gen = torch.Generator().manual_seed(2)
    u = {n: draw("gaussian", w, gen) * 0.01 for n, w in before.items()}
    plus, _ = grad_at(ref, x, y, u)
    minus, _ = grad_at(ref, x, y, {n: -d for n, d in u.items()})
    assert_grads(model, {n: 0.5 * (plus[n] + minus[n]) for n in plus})


def test_nso_bn_statistics_from_the_first_pass_on_request():
    x, y = batch()
    model, ref = mlp(bn=True), mlp(bn=True)
    make_optimizer("nso", model, lr=LR, seed=1, bn_update="first").step(model, x, y, F.cross_entropy)
    gen = torch.Generator().manual_seed(1)
    u = {n: draw("gaussian", p, gen) * 0.01 for n, p in ref.named_parameters()}
    _, first = grad_at(ref, x, y, u)  # default: the first pass, at W + U_1
    assert all(torch.equal(b, first[n]) for n, b in model.named_buffers())


# ---------------------------------------------------------------- SAM / ASAM


def test_sam_perturbs_by_rho_along_the_gradient_and_updates_bn_once():
    model, ref = mlp(bn=True), mlp(bn=True)
    x, y = batch()
    rho = 0.05
    opt = make_optimizer("sam", model, lr=LR, momentum=0.9)
    before = weights(model)
    opt.step(model, x, y, F.cross_entropy)
    g, clean_buffers = grad_at(ref, x, y)
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    eps = {n: rho * v / norm for n, v in g.items()}
    expected, _ = grad_at(ref, x, y, eps)
    assert_grads(model, expected)
    assert_base_step(model, before, momentum=0.9)
    assert float(torch.sqrt(sum((e**2).sum() for e in opt.ascent(list(g.values()))))) == pytest.approx(rho, rel=1e-6)
    for n, b in model.named_buffers():
        assert torch.equal(b, clean_buffers[n]), n


@pytest.mark.parametrize("rule", ["name", "ndim"])
def test_asam_perturbation_formula(rule):
    model = mlp(bn=True)
    opt = make_optimizer("asam", model, lr=LR, asam_rule=rule)
    assert opt.rho == 0.5 and opt.adaptive
    g, _ = grad_at(model, *batch())
    eta = 0.01
    scaled = {
        n: (p.detach().abs() + eta if (("weight" in n) if rule == "name" else p.ndim >= 2) else torch.ones_like(p))
        for n, p in model.named_parameters()
    }
    tg_norm = torch.sqrt(sum(((scaled[n] * g[n]) ** 2).sum() for n in g))
    for (n, _), e in zip(model.named_parameters(), opt.ascent(list(g.values()))):
        torch.testing.assert_close(e, 0.5 * scaled[n] ** 2 * g[n] / tg_norm, rtol=1e-5, atol=1e-8)
    assert rule == "ndim" or not torch.equal(scaled["1.weight"], torch.ones(8))  # BN scales are weights by name


# ---------------------------------------------------------------- NRS


def test_nrs_with_zero_alpha_is_plain_sgd():
    x, y = batch()
    plain, nrs = mlp(bn=True), mlp(bn=True)
    make_optimizer("sgd", plain, lr=LR).step(plain, x, y, F.cross_entropy)
    make_optimizer("nrs", nrs, lr=LR, alpha=0.0, radius=0.1).step(nrs, x, y, F.cross_entropy)
    for (n, p), q in zip(plain.named_parameters(), nrs.parameters()):
        assert torch.equal(p, q), n
    for (n, b), c in zip(plain.named_buffers(), nrs.buffers()):
        assert torch.equal(b, c), n  # the perturbed pass leaves BN statistics alone


@pytest.mark.parametrize("distribution", ["box", "ball", "gaussian"])
def test_nrs_kl_term(distribution):
    model = mlp(bn=True).eval()
    x, _ = batch()
    logits = model(x)
    opt = make_optimizer("nrs", model, lr=LR, radius=0.5, distribution=distribution)
    kls = [opt.regularizer(model, x, logits).item() for _ in range(5)]
    assert min(kls) > 0
    delta = opt.neighbour()
    size = torch.sqrt(sum((d**2).sum() for d in delta))
    bound = {"box": 0.5 * math.sqrt(sum(d.numel() for d in delta)), "ball": 0.5, "gaussian": 1.5}[distribution]
    assert 0 < float(size) <= bound and all(d.abs().max() <= 0.5 for d in delta if distribution == "box")
    zero = make_optimizer("nrs", model, lr=LR, radius=0.0, distribution=distribution)
    assert zero.regularizer(model, x, logits).item() == 0.0
    p, q = torch.randn(4, 3), torch.randn(4, 3)
    assert float(kl_divergence(p, q)) == pytest.approx(
        float((p.softmax(1) * (p.log_softmax(1) - q.log_softmax(1))).sum(1).mean())
    )


def test_nrs_gradient_includes_the_kl_term():
    x, y = batch()
    model, ref = mlp(), mlp()
    opt = make_optimizer("nrs", model, lr=LR, alpha=2.0, radius=0.2, kl_direction="reverse", seed=7)
    before = weights(model)
    opt.step(model, x, y, F.cross_entropy)
    gen = torch.Generator().manual_seed(7)
    delta = {n: draw("uniform", w, gen) * 0.2 for n, w in before.items()}
    logits = ref(x)
    moved_logits = torch.func.functional_call(ref, {n: p + delta[n] for n, p in ref.named_parameters()}, (x,))
    kl = (moved_logits.softmax(1) * (moved_logits.log_softmax(1) - logits.log_softmax(1))).sum(1).mean()
    (F.cross_entropy(logits, y) + 2.0 * kl).backward()
    assert_grads(model, {n: p.grad for n, p in ref.named_parameters()})
    assert_base_step(model, before)


# ---------------------------------------------------------------- shared machinery


@pytest.mark.parametrize(
    "name, options",
    [("smoothout", {"base": "adam", "ghost_batch_size": 10}), ("nso", {"k": 2, "clean_weight": 0.5}), ("nrs", {}), ("asam", {})],
)
def test_state_dict_round_trip_reproduces_the_next_step(name, options):
    x, y = batch()
    model = mlp(bn=True)
    opt = make_optimizer(name, model, lr=0.01, momentum=0.9, seed=11, **options)
    for _ in range(2):
        opt.step(model, x, y, F.cross_entropy)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin = copy.deepcopy(model)
    twin_opt = make_optimizer(name, twin, lr=0.01, momentum=0.9, seed=11, **options)
    twin_opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert twin_opt.steps == 2
    for m, o in ((model, opt), (twin, twin_opt)):
        o.step(m, x, y, F.cross_entropy)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
    other = make_optimizer(name, mlp(bn=True), lr=0.02, momentum=0.9, seed=11, **options)
    with pytest.raises(ValueError, match="lr|base_hyperparameters"):
        other.load_state_dict(opt.state_dict())


def test_gradient_clipping_and_config():
    x, y = batch()
    model = mlp()
    opt = make_optimizer("smoothout", model, lr=LR, clip_grad_norm=0.01)
    opt.step(model, x, y, F.cross_entropy)
    assert float(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))) == pytest.approx(0.01, rel=1e-4)
    for name in METHODS:
        config = json.loads(json.dumps(make_optimizer(name, mlp(bn=True), lr=LR).config()))
        assert config["method"] == name and config["base_hyperparameters"]["lr"] == LR
    assert make_optimizer("adam", model, lr=LR).base_name == "adam"
    assert make_optimizer("nso", model, lr=LR).config()["clean_weight"] == 0.0
    assert make_optimizer("smoothout", model, lr=LR, momentum=0.8, base="adam").config()["base_hyperparameters"]["betas"] == [
        0.8,
        0.999,
    ]
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", model, lr=LR)
    with pytest.raises(ValueError, match="no option rho"):
        make_optimizer("smoothout", model, lr=LR, rho=0.1)
    with pytest.raises(ValueError, match="plain adam"):
        make_optimizer("adam", model, lr=LR, base="sgd")
    with pytest.raises(ValueError, match="different model"):
        opt.step(mlp(), x, y, F.cross_entropy)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_a_toy_problem(name):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (64,), generator=g)
    x = torch.randn(64, 2, generator=g) * 0.5 + (2.0 * y - 1).unsqueeze(1)  # two separable blobs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    lr = 0.05 if name == "adam" else 0.1
    opt = make_optimizer(name, model, lr=lr, momentum=0.9, seed=0)
    with torch.no_grad():
        start = float(F.cross_entropy(model(x), y))
    for _ in range(50):
        opt.step(model, x, y, F.cross_entropy)
    with torch.no_grad():
        end = float(F.cross_entropy(model(x), y))
    assert end < 0.3 * start, (start, end)
