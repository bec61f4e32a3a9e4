"""Every HVP path on every model idiom of the zoo equals the dense Hessian, in both BatchNorm modes.

Each product is taken twice with the same probe and once as a block: the linearized path once
returned a right first product and wrong ones after it on `out += h`.
"""

import warnings

import pytest
import torch

from landscape.engine.hvp_paths import HVP_METHODS
from landscape.engine.objective import Objective
from tests.ground_truth import dense_hessian, rel_err
from tests.model_zoo import ZOO, CifarResNet, zoo_batches

PATHS = [m for m in HVP_METHODS if m != "auto"]
CASES = [(name, mode) for name, idiom in ZOO.items() for mode in (("eval", "train") if idiom.has_batchnorm else ("eval",))]


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", CASES)
def test_every_path_matches_the_dense_hessian(name, mode):
    model, batches = ZOO[name].build(), zoo_batches(name)
    H = dense_hessian(model, batches, mode)
    V = torch.randn(3, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for path in PATHS:
        objective = Objective(model, batches, mode=mode, dtype=torch.float64, device="cpu", hvp_method=path, hvp_check=False)
        assert objective.n_params == H.shape[0]
        for repeat in range(2):
            assert rel_err(objective.hvp(V[0]), H @ V[0]) <= 1e-10, (path, repeat)
        assert rel_err(objective.hvp_batched(V), V @ H) <= 1e-10, path
        assert objective.hvp_method == path  # no silent fallback: the path itself is right


@pytest.mark.parametrize("name, mode", CASES)
def test_the_default_path_passes_its_self_check_on_every_idiom(name, mode):
    """`auto` plus the run-time check: no false alarm (a warning is an error here) and the right products."""
    model, batches = ZOO[name].build(), zoo_batches(name)
    objective = Objective(model, batches, mode=mode, dtype=torch.float64, device="cpu")
    v = torch.randn(objective.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hv = objective.hvp(v)
    assert objective.hvp_check_result is not None and objective.hvp_check_result.passed
    assert rel_err(hv, dense_hessian(model, batches, mode) @ v) <= 1e-10


@pytest.mark.slow
def test_full_size_resnet20_with_inplace_residual_adds():
    """At real size (270k parameters, float32, CIFAR-shaped): the default path's successive products equal double backward.

    Released behaviour: λ1 after 3 matvecs was 12,021-13,008 on such a ResNet-20 against 4,486 by double backward.
    """
    torch.manual_seed(0)
    model = CifarResNet()
    assert sum(p.numel() for p in model.parameters()) == 269_722
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))]  # tracing dominates
    fast = Objective(model, batches, device="cpu", hvp_method="linearize", hvp_check=False)
    reference = Objective(model, batches, device="cpu", hvp_method="double-backward")
    v = torch.randn(fast.n_params, generator=g)
    expected = reference.hvp(v)
    for _ in range(3):
        v_next = fast.hvp(v)
        assert rel_err(v_next, expected) <= 1e-4
