"""SLQ in bounded memory: the three-term recurrence (reorthogonalize="none") against full reorthogonalization and
against the exact spectral measure of each probe, on dense matrices and a network Hessian, where orthogonality
is really lost (ghost Ritz values present)."""

import gc

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid

from landscape.curvature.density import Spectrum, default_reorthogonalize, held_vectors, slq_density
from landscape.engine.objective import Objective
from landscape.engine.operators import DenseOperator, HessianOperator, LinearOperator
from landscape.engine.probes import rademacher, seeded_generator
from tests.helpers import dense

# a bulk in [-1, 3] and 15 outliers in [40, 50]: the outliers converge within ~30 steps, after which the plain
# recurrence loses orthogonality against them and repeats them (ghosts)
OUTLIERS = np.concatenate([np.random.default_rng(4).uniform(40, 50, 15), np.random.default_rng(5).uniform(-1, 3, 285)])


def probes(op, n_runs, seed):
    """The unit start vectors `slq_density` draws, as float64 numpy rows."""
    z = rademacher(seeded_generator(op.device, seed), (n_runs, op.shape[0]), op).double().numpy()
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def quadrature_moments(spectrum, powers, scale=1.0):
    """Σ_j w_j (θ_j/scale)^p per run, for each p: (len(powers), n_runs)."""
    return np.array([(spectrum.weights * (spectrum.nodes / scale) ** p).sum(1) for p in powers])


def product_moments(op, q, powers, scale=1.0):
    """qᵀ(A/scale)^p q per run by repeated products with the operator itself: (len(powers), n_runs)."""
    start = torch.as_tensor(q, dtype=op.dtype)
    v, out = start, {}
    for p in range(max(powers) + 1):
        out[p] = (start * v).sum(1).double().numpy()
        v = op.products(v) / scale if p < max(powers) else v
    return np.array([out[p] for p in powers])


def ghost_pairs(spectrum, scale, tol=1e-6):
    """Adjacent Ritz values of one run closer than tol·scale: copies of one eigenvalue (an unreduced tridiagonal has
    distinct eigenvalues, so in exact arithmetic these would be distinct eigenvalues of A that close)."""
    return int(sum(np.sum(np.diff(np.sort(nodes)) < tol * scale) for nodes in spectrum.nodes))


def l1(a, b):
    return trapezoid(np.abs(a.density - np.interp(a.grid, b.grid, b.density)), a.grid)


def both(op, **options):
    return (slq_density(op, reorthogonalize="full", **options), slq_density(op, reorthogonalize="none", **options))


def test_moments_are_exact_up_to_degree_two_steps_minus_one():
    """Gauss quadrature with k nodes integrates polynomials of degree ≤ 2k − 1 exactly: with 3 steps the moments
    p = 0..5 are qᵀA^p q for both recurrences (to rounding), and p = 6 is not (the check can tell)."""
    a, op = dense(OUTLIERS)
    q = probes(op, 4, seed=3)
    scale = np.abs(np.linalg.eigvalsh(a)).max()
    exact = product_moments(op, q, range(7), scale)
    for spectrum in both(op, n_runs=4, n_steps=3, seed=3):
        moments = quadrature_moments(spectrum, range(7), scale)
        np.testing.assert_allclose(moments[:6], exact[:6], rtol=0, atol=1e-12)
        assert np.all(np.abs(moments[6] - exact[6]) > 1e-6)


@pytest.mark.parametrize("dtype, tol, apart", [(torch.float64, 1e-12, 1e-7), (torch.float32, 1e-6, 1e-4)])
def test_bounded_slq_where_orthogonality_is_lost(dtype, tol, apart):
    """150 steps on 300×300: the three-term recurrence repeats the converged outliers (ghost Ritz values, absent with
    full reorthogonalization), yet each run's quadrature, its moments and mass above 20, matches the probe's exact
    spectral measure (Σ_i (u_iᵀq)² δ(λ_i)), and the two densities agree."""
    a, op = dense(OUTLIERS, dtype=dtype)
    eigenvalues, u = np.linalg.eigh(a)
    q = probes(op, 8, seed=1)
    shares = (q @ u) ** 2  # the probe's weight on each eigenvalue
    full, none = both(op, n_runs=8, n_steps=150, seed=1)
    assert (full.reorthogonalization, none.reorthogonalization) == ("full", "none")
    assert (full.stored_vectors, none.stored_vectors) == (8 * 153, 8 * 4)
    assert ghost_pairs(full, 50) == 0 and ghost_pairs(none, 50) >= 8 * 10  # the regime where it could fail
    powers = [0, 1, 2, 3, 4, 12, 30]  # exact to 2·150 − 1 in exact arithmetic
    exact = np.array([(shares * (eigenvalues / 50) ** p).sum(1) for p in powers])
    for spectrum in (full, none):
        np.testing.assert_allclose(spectrum.weights.sum(1), 1, atol=tol)
        np.testing.assert_allclose(quadrature_moments(spectrum, powers, 50), exact, rtol=0, atol=tol)
        mass = (spectrum.weights * (spectrum.nodes > 20)).sum(1)
        np.testing.assert_allclose(mass, shares[:, eigenvalues > 20].sum(1), atol=tol)
        assert abs(trapezoid(spectrum.density, spectrum.grid) - 1) < 1e-2
    assert l1(full, none) < apart
    outlier_mass = (none.weights * (none.nodes > 20)).sum(1)
    assert abs(outlier_mass.mean() - 15 / 300) < 4 * outlier_mass.std(ddof=1) / np.sqrt(8)  # the eigenvalue fraction


def test_bounded_slq_on_a_network_hessian(mlp_problem):
    """A tiny MLP's Hessian (n = 140), 100 steps: moments p = 0..4 against qᵀH^p q from repeated HVPs, the mass above
    the widest gap of the top of the spectrum against the exact eigenvector shares, and the two densities."""
    model, _, _, batches = mlp_problem
    op = HessianOperator(Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method="double-backward"))
    h = op.products(torch.eye(op.shape[0], dtype=torch.float64)).numpy()
    eigenvalues, u = np.linalg.eigh((h + h.T) / 2)
    scale = np.abs(eigenvalues).max()
    q = probes(op, 3, seed=2)
    shares = (q @ u) ** 2
    top = eigenvalues[eigenvalues > np.median(eigenvalues)]
    widest = int(np.argmax(np.diff(top)))
    threshold = (top[widest] + top[widest + 1]) / 2
    full, none = both(op, n_runs=3, n_steps=100, seed=2)
    assert ghost_pairs(none, scale) > ghost_pairs(full, scale)
    exact = product_moments(op, q, range(5), scale)
    for spectrum in (full, none):
        np.testing.assert_allclose(quadrature_moments(spectrum, range(5), scale), exact, rtol=0, atol=1e-10)
        assert spectrum.nodes.max() <= eigenvalues[-1] + 1e-10 * scale and spectrum.nodes.min() >= eigenvalues[0] - 1e-10 * scale
        mass = (spectrum.weights * (spectrum.nodes > threshold)).sum(1)
        np.testing.assert_allclose(mass, shares[:, eigenvalues > threshold].sum(1), atol=1e-8)
    assert l1(full, none) < 1e-6


class Diagonal(LinearOperator):
    """diag(d), recording at its products the n-vectors alive in the process that were not alive before it was built
    (tensors whose last axis is n, counted by storage)."""

    def __init__(self, d: torch.Tensor) -> None:
        super().__init__(len(d), d.dtype, d.device)
        self.d, self.alive = d, []
        self.before = set(self._storages())  # alive (so not reusable) throughout: d's and other tests' leftovers

    def _storages(self) -> dict[int, int]:
        n, found = self.shape[0], {}
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor) and obj.ndim and obj.shape[-1] == n and obj.dtype == self.dtype:
                storage = obj.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
        return found

    def products(self, V):
        self.n_matvecs += 1
        if self.n_matvecs % 3 == 2:  # a scan of every object is slow: every third product (the 2nd, 5th, ...)
            new = {ptr: size for ptr, size in self._storages().items() if ptr not in self.before}
            self.alive.append(sum(new.values()) // (self.shape[0] * self.d.element_size()))
        return V * self.d


def test_the_bounded_recurrence_holds_a_few_vectors_per_run_whatever_the_steps():
    """The n-vectors alive at each product: four runs of the three-term recurrence hold their two Lanczos vectors per
    run at 8 and at 40 steps alike; full reorthogonalization holds its whole basis. Neither exceeds `stored_vectors`."""
    d = torch.linspace(-1.0, 5.0, 400, dtype=torch.float64)
    held = {}
    for steps in (8, 40):
        for reorthogonalize in ("full", "none"):
            op = Diagonal(d)
            spectrum = slq_density(op, n_runs=4, n_steps=steps, reorthogonalize=reorthogonalize)
            assert max(op.alive) <= spectrum.stored_vectors == held_vectors(4, steps, 400, reorthogonalize)
            held[steps, reorthogonalize] = max(op.alive)
    assert held[8, "none"] == held[40, "none"] == 8
    assert held[40, "full"] == 4 * 41 > held[8, "full"]


def test_the_default_chooses_by_memory_and_says_so():
    _, op = dense(OUTLIERS)  # float64, n = 300: 4·(60 + 3) vectors are 605 kB
    assert default_reorthogonalize(300, 4, 60, torch.float64) == "full"
    assert default_reorthogonalize(2_000_000, 4, 60) == "full"  # 252 vectors of 8 MB: 2.0 GB ≤ 2 GiB
    assert default_reorthogonalize(2_200_000, 4, 60) == "none"  # 2.2 GB
    assert default_reorthogonalize(300, 4, 60, torch.float64, free_bytes=2 * 63 * 4 * 300 * 8) == "full"
    assert default_reorthogonalize(300, 4, 60, torch.float64, free_bytes=2 * 63 * 4 * 300 * 8 - 1) == "none"
    assert slq_density(op, n_steps=60).reorthogonalization == "full"
    bounded = slq_density(op, n_steps=60, free_bytes=10**5)
    assert (bounded.reorthogonalization, bounded.stored_vectors) == ("none", 16)
    stored = bounded.to_dict()
    assert (Spectrum.from_dict(stored).reorthogonalization, Spectrum.from_dict(stored).stored_vectors) == ("none", 16)
    del stored["reorthogonalization"], stored["stored_vectors"]  # a result stored before these fields
    assert Spectrum.from_dict(stored).reorthogonalization == "full"


@pytest.mark.parametrize(
    "options", [{"reorthogonalize": "selective"}, {"reorthogonalize": "Full"}, {"free_bytes": -1}, {"free_bytes": 1.5}]
)
def test_bad_memory_options_raise_value_error(options):
    with pytest.raises(ValueError):
        slq_density(dense(OUTLIERS[:20])[1], **options)


def test_runs_that_break_down_early_are_dropped_and_the_others_go_on():
    """An eigenvector (1, −1, 1, −1, 0, 0)/2 that 3 of 8 Rademacher probes miss: those runs find an invariant
    subspace after 5 steps and stop (the running rows are compacted), the others take all 6; in both recurrences every
    run's quadrature is the probe's exact measure: nodes the eigenvalues it sees, weights its squared components."""
    eigenvalues = np.array([-2.0, 0.5, 1.0, 3.0, 4.0, 7.0])
    basis = np.random.default_rng(0).standard_normal((6, 6))
    basis[:, 0] = [1, -1, 1, -1, 0, 0]
    u, _ = np.linalg.qr(basis)
    op = DenseOperator(torch.tensor((u * eigenvalues) @ u.T))
    shares = (probes(op, 8, seed=0) @ u) ** 2
    missed = shares[:, 0] < 1e-20
    assert missed.sum() == 3
    for reorthogonalize in ("full", "none"):
        spectrum = slq_density(op, n_runs=8, n_steps=6, seed=0, reorthogonalize=reorthogonalize)
        assert spectrum.n_matvecs == 3 * 5 + 5 * 6
        for nodes, weights, share, early in zip(spectrum.nodes, spectrum.weights, shares, missed):
            seen = eigenvalues[1:] if early else eigenvalues
            np.testing.assert_allclose(nodes[: len(seen)], seen, atol=1e-10)
            np.testing.assert_allclose(weights[: len(seen)], share[1:] if early else share, atol=1e-10)
            assert np.all(weights[len(seen) :] == 0)
