"""Eigenvalues of a symmetric operator: Lanczos and power iteration (the spectral density, SLQ, is in density.py).

Vectors stay torch tensors on the operator's device; only the small Lanczos tridiagonal
goes to numpy in float64.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from landscape.curvature.krylov import AugmentedKrylov, orthogonalize
from landscape.engine.checks import check_int
from landscape.engine.inner import InnerProduct
from landscape.engine.operators import LinearOperator
from landscape.engine.probes import rademacher, seeded_generator
from landscape.engine.progress import Progress
from landscape.results import Result

WHICH = ("LA", "SA", "LM")
STOPS = ("certified", "residual", "error")
GUARD_VALUES = 3  # Ritz values beyond the k wanted that the space must hold before a check starts
ROUNDING_ULPS = 1000  # reported bounds are at least this many machine epsilons of ‖A‖ (the products' own rounding)
CHECK_MISS = 1e-3  # the fresh vector may miss an eigenvector only with share below CHECK_MISS/N (`_Check`)
CHECK_VECTORS = 4  # n-vectors `_DeflatedCheck`'s recurrence holds: its start, its last two vectors and a product
OPEN_DIRECTIONS = 3  # remainder directions `max_vectors` leaves room for: two sequences and what a check found
CHECK_ROOM = 16  # basis slots a check needs free to start in a bounded basis; fewer: restart to the guards first
BASIS_BYTES = 2 * 2**30  # the default Lanczos budget stops growing where its stored basis would pass this


@dataclass(frozen=True)
class EigResult(Result):
    """Eigenvalue estimates with their error bounds, cost and provenance.

    `residuals` are rigorous: some eigenvalue of A lies within r_i of θ_i. `error_bounds` are what the
    stop tested: with stop="certified" or "residual" the residuals, widened over clusters of overlapping
    intervals (`_cluster_bounds`); with "error" the gap-refined ESTIMATES min(r_i, r_i²/gap_i). Only a
    `certified` result claims that values[i] is the i-th eigenvalue within error_bounds[i] (see `lanczos`);
    otherwise the residual bounds the distance to SOME eigenvalue, and for "LA" θ_i ≤ λ_i still holds
    (a lower bound; an upper bound for "SA"). Power iteration reports its residuals and is never certified.
    """

    values: np.ndarray  # float64, ordered: largest first ("LA"), smallest first ("SA"), by |.| ("LM")
    residuals: np.ndarray  # ‖Ay − θy‖ per value: some eigenvalue of A lies within it of θ (rigorous)
    error_bounds: np.ndarray  # min(r, r²/gap) per value, gap from the Ritz values: an ESTIMATE of |θ − λ|
    vectors: torch.Tensor | None  # (k, n) unit eigenvector estimates if requested, one per row (as `values`)
    n_matvecs: int
    converged: bool
    seconds: float
    method: str  # "lanczos" / "power_iteration"
    seed: int
    which: str  # "LA", "SA" or "LM": which end of the spectrum `values` come from
    certified: bool = False  # evidence that values[i] is the i-th eigenvalue, within error_bounds[i] (`lanczos`)
    stop: str = "residual"  # the stopping rule that ran ("certified", "residual", "error"; power iteration's own)
    sequences: int = 1  # Krylov sequences in the basis at the end: the start and the vectors the checks added
    restarts: int = 0  # thick restarts the bounded basis took (0: the whole Krylov space was kept)
    stored_vectors: int = 0  # the most n-vectors held at once: basis, remainder directions and the check's


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the k wanted Ritz values in output order."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")[:k]
    if which == "SA":
        return np.argsort(theta, kind="stable")[:k]
    return np.argsort(-np.abs(theta), kind="stable")[:k]


def _error_bounds(theta: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """min(r_i, r_i²/gap_i): the gap-refined error estimate of each Ritz value (Parlett 1998, Thm 11.7.1).

    Kato–Temple: if no eigenvalue other than λ lies within gap of θ, |θ − λ| ≤ r²/gap. The
    unknown eigenvalue gap is estimated from the other Ritz values: θ_j's interval
    [θ_j − r_j, θ_j + r_j] holds an eigenvalue, so gap_i = min_{j≠i} |θ_i − θ_j| − r_j (an
    unconverged neighbour thus shrinks the gap instead of inflating it). An eigenvalue the
    Krylov space has not found yet is invisible here, so this is an estimate, not a bound.
    With no positive gap (a single Ritz value, overlapping intervals) it is the residual.
    """
    if len(theta) < 2:
        return residuals.copy()
    distance = np.abs(theta[:, None] - theta[None, :]) - residuals[None, :]
    np.fill_diagonal(distance, np.inf)
    gap = distance.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        refined = np.where(gap > 0, residuals**2 / gap, np.inf)
    return np.minimum(residuals, refined)


def _check_common(op: LinearOperator, k: int, tol: float, max_matvecs: int) -> int:
    """Validate shared arguments; return k clipped to the operator size."""
    check_int("k", k, 1)
    check_int("max_matvecs", max_matvecs, 1)
    if not tol >= 0:
        raise ValueError(f"tol must be ≥ 0, got {tol!r}")
    k = min(k, op.shape[0])
    if max_matvecs < k:
        raise ValueError(f"max_matvecs={max_matvecs} cannot produce k={k} eigenvalues; give at least k")
    return k


def default_max_matvecs(n: int, k: int) -> int:
    """Lanczos's default budget for k eigenvalues of an n×n operator: max(300, 60k) matvecs, at most n."""
    check_int("n", n, 1)
    check_int("k", k, 1)
    return min(n, max(300, 60 * k))


def minimum_vectors(k: int) -> int:
    """The fewest n-vectors a restarted Lanczos run for k eigenvalues can work in: the wanted values and their
    guards, four to grow, and OPEN_DIRECTIONS remainder directions."""
    return k + GUARD_VALUES + 4 + OPEN_DIRECTIONS


def default_max_vectors(
    n: int, k: int, max_matvecs: int, dtype: torch.dtype = torch.float32, free_bytes: int | None = None
) -> int:
    """How many n-vectors `lanczos` keeps by default: all it can use (no restart) where they fit in half of
    `free_bytes` (the memory the operator's products leave free, as a memory plan predicts it) or, where that is not
    known, in BASIS_BYTES (2 GiB); else as many as fit there, and never fewer than 2k + 10 (the run then restarts;
    its result counts the restarts)."""
    check_int("n", n, 1)
    room = BASIS_BYTES if free_bytes is None else free_bytes // 2
    fit = room // (n * torch.finfo(dtype).bits // 8)
    return min(_vectors_without_restart(n, max_matvecs), max(fit, 2 * k + 10, minimum_vectors(k)))


def _vectors_without_restart(n: int, max_matvecs: int) -> int:
    """The most n-vectors a run can store when it never restarts: one basis vector per product and one waiting,
    the remainder directions, and one free for a new sequence's."""
    return min(max_matvecs, n) + 2 + OPEN_DIRECTIONS


def lanczos(
    op: LinearOperator,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    progress: bool | str = False,
    stop: str = "certified",
    start: torch.Tensor | None = None,
    max_vectors: int | None = None,
) -> EigResult:
    """k extreme eigenvalues by Lanczos with full reorthogonalization (Lanczos 1950; Golub & Van Loan 2013, §10.1),
    each reported as the i-th only with evidence that it is the i-th.

    Each wanted Ritz value θ_i has the residual r_i = ‖Ay_i − θ_i y_i‖: some eigenvalue of A lies within
    r_i of θ_i (Parlett 1998, Thm 4.5.1), and where the intervals [θ_j − r_j, θ_j + r_j] overlap, as many
    eigenvalues as Ritz values lie within the cluster's √(Σ r_j²) of them (Kahan; Parlett 1998, Thm 11.5.1).
    By Cauchy interlacing θ_i ≤ λ_i always ("LA"; θ_i ≥ λ_i for "SA"). What no residual shows is WHICH
    eigenvalue θ_i approximates: a Krylov space whose start vector barely touches an eigenvector (a close
    pair not yet resolved, an exact multiplicity, a warm start from the wrong vector) converges to the next
    eigenvalue first and reports it as λ_i with a small residual (Parlett 1998, §13.2: "misconvergence").

    The default stop, "certified", therefore accepts a run only when:

    1. every wanted value's residual (cluster) bound is ≤ tol·|θ_i|: never a gap-refined estimate, whose
       gap may be to a neighbour the space has not found (Kato–Temple needs the TRUE gap);
    2. the space holds at least k + 3 Ritz values (the guard values below the wanted ones), and
    3. a fresh Gaussian vector, orthogonalized against the basis, has started a second Krylov sequence in
       the same basis and grown alone until an eigenvector it missed would have come to dominate it (`_Check`:
       a Chebyshev growth bound against the share a random vector gives it), while (1) still held and no
       wanted value moved by more than its bounds. A close partner or a second copy of a wanted eigenvalue,
       which one start cannot separate, has a share of the fresh vector of its own and pulls the values: the
       check then stops, every sequence grows in turn (block Lanczos, Golub & Van Loan 2013, §10.3.6) and a
       new check follows. The check's length adapts: a few products where the wanted values stand clear of
       the rest of the spectrum, more where it crowds them.

    In a bounded basis (`max_vectors` fewer than the run could use) the basis restarts when full, keeping the Ritz
    vectors of the wanted end (thick restart, Wu & Simon 2000; an explicit restart from a random mix of them where
    several sequences are open). The check of step 3 then runs in the basis where it fits, and otherwise outside it,
    on the operator deflated by the top Ritz vectors, in four vectors (`_DeflatedCheck`, the same growth test with
    the coupling of those vectors to the rest added to the bound).

    The start vector is Gaussian, and a caller's `start` (a warm start) is mixed with an equal share of one. The result's `certified` says whether 1–3 held; a run that spends
    its budget first returns converged=False and certified=False. Certification is probabilistic in the
    random vectors, as it must be for any method that sees A only through products: the coverage suite
    (tests/test_lanczos_coverage.py) holds it to zero misses over hundreds of hard problems. "residual" stops at (1) alone, and "error" on the former gap-refined
    estimates min(r, r²/gap) with gaps from the other Ritz values: both are cheaper and never certified.

    Args:
        op: a symmetric operator (HessianOperator, GGNOperator, FisherOperator, DenseOperator, ...).
        k: how many eigenvalues; k > n is clipped to n.
        which: "LA" largest algebraic (default), "SA" smallest algebraic, "LM" largest magnitude.
        tol: relative tolerance: stop when every wanted value's bound ≤ tol·max(|θ_i|, √eps·‖T‖).
        max_matvecs: budget of operator products, the checks' included; None: `default_max_matvecs`
            (max(300, 60k), at most n).
        seed: seed of the Gaussian start vector and of the check's fresh vectors.
        return_vectors: also return the unit Ritz vectors, the rows of a (k, n) block.
        progress: a progress bar (True, or a label), off by default.
        stop: "certified" (default), "residual" or "error" (see above).
        start: a first Krylov vector (n entries), e.g. the top eigenvector of the previous training
            checkpoint: mixed half and half with a Gaussian vector, it converges in fewer products where
            the wanted eigenvectors changed little.
        max_vectors: the most n-vectors held at once (basis and remainder directions); None:
            `default_max_vectors` (all a run can use where they fit in 2 GiB, never fewer than 2k + 10). A run that
            fills them restarts (thick restart, Wu & Simon 2000) and goes on in bounded memory; `restarts` counts it.

    Returns:
        EigResult: `values` in the order of `which`, their `residuals` and `error_bounds` (the bounds the
            stop tested), `vectors` if asked, `n_matvecs`, `converged`, `certified`, `seconds`.

    Raises:
        ValueError: an unknown `which` or `stop`, a non-positive k or budget, a budget below k, fewer
            `max_vectors` than `minimum_vectors(k)`, or a `start` of the wrong size, non-finite or zero.

    Examples:
        The two largest eigenvalues of a diagonal matrix, exact once the Krylov space holds it:

        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64)))
        >>> result = lanczos(op, k=2)
        >>> result.values.round(6), result.converged, result.certified, result.n_matvecs
        (array([5., 3.]), True, True, 4)
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if stop not in STOPS:
        raise ValueError(f"stop must be one of {STOPS}, got {stop!r}")
    if max_matvecs is None:
        check_int("k", k, 1)
        max_matvecs = default_max_matvecs(op.shape[0], k)
    k = _check_common(op, k, tol, max_matvecs)
    n = op.shape[0]
    if max_vectors is None:
        max_vectors = default_max_vectors(n, k, max_matvecs, op.dtype)
    check_int("max_vectors", max_vectors, 1)
    if max_vectors < min(minimum_vectors(k), _vectors_without_restart(n, max_matvecs)):
        raise ValueError(f"max_vectors={max_vectors} leaves no room to restart for k={k}: give at least {minimum_vectors(k)}")
    began = time.perf_counter()
    generator = seeded_generator(op.device, seed)
    first = _gaussian(generator, op) if start is None else _start_vector(start, op) + _gaussian(generator, op)
    krylov = AugmentedKrylov(op, first, max_steps=max_matvecs, capacity=max_vectors)
    eps = torch.finfo(op.dtype).eps
    floor = np.sqrt(eps)
    check = _Check(k + GUARD_VALUES, which)
    overflowed = False  # a check's fresh sequence filled a bounded basis: later checks run outside it
    bounded = max_vectors < _vectors_without_restart(n, max_matvecs)  # the basis cannot keep every product: it restarts
    far = [np.inf, -np.inf]  # the spectrum's ends as far as seen: min(θ − r), max(θ + r)
    block = False  # every sequence grows in turn once a check has found something
    certified = False
    with Progress(max_matvecs, "lanczos", "matvec", progress) as bar:
        while True:
            krylov.apply()
            bar.update(1)
            theta, s, residuals = krylov.ritz()
            wanted = _wanted(theta, k, which)
            scale = np.maximum(np.abs(theta[wanted]), floor * krylov.norm_estimate)
            tested = _error_bounds(theta, residuals) if stop == "error" else _cluster_bounds(theta, residuals)
            converged = len(wanted) == k and bool(np.all(tested[wanted] <= tol * scale))
            # the bounds reported: none below what the float arithmetic of the products and of H resolves
            bounds = tested if stop == "error" else np.maximum(tested, ROUNDING_ULPS * eps * krylov.norm_estimate)
            if stop != "certified" and converged:
                break  # the cheaper rules stop at their first test
            if converged and (krylov.applied >= n or check.passes(krylov, theta, residuals, wanted, bounds)):
                certified = True
                break  # (a basis that spans the space holds every eigenvalue)
            if krylov.full:
                break
            if check.running and not (converged and check.unmoved(theta[wanted], bounds[wanted])):
                check.stop()  # the fresh sequence found something: grow every sequence, then check again
                block = True
            far = [min(far[0], theta[0] - residuals[0]), max(far[1], theta[-1] + residuals[-1])]
            if converged and not check.running and krylov.applied >= min(check.minimum_values, n):
                outside = overflowed or (bounded and krylov.open.shape[0] > 1)  # no room for a sequence in the basis
                if outside:  # the check outside the basis, in four vectors
                    if not _restart(krylov, theta, s, k + GUARD_VALUES, which, generator):
                        continue  # blocks had piled up: a fresh start from the Ritz vectors, checked when converged
                    theta, s, residuals = krylov.ritz()
                    found = _DeflatedCheck(krylov, generator, which, k, tol, far, bar).run()
                    if found is True:
                        certified = True
                        wanted = _wanted(theta, k, which)
                        break
                    if found is None:
                        wanted = _wanted(theta, k, which)
                        break  # the budget ran out during the check
                    krylov.inject(found)  # what the check found beyond the wanted values joins the basis
                    block = True
                    continue
                if krylov.capacity - krylov.stored_vectors < CHECK_ROOM:  # a bounded basis: make room for the check first
                    if not _restart(krylov, theta, s, k + GUARD_VALUES, which, generator):
                        continue
                if krylov.inject(_gaussian(generator, op)):
                    check.start(krylov, theta[wanted], bounds[wanted])
                    continue
            if krylov.needs_restart:
                overflowed = overflowed or check.running
                check.stop()  # a restart keeps Ritz vectors only, not the check's fresh sequence
                if not _restart(
                    krylov, theta, s, (krylov.capacity - krylov.open.shape[0] + k + GUARD_VALUES) // 2, which, generator
                ):
                    continue
            _extend(krylov, generator, op, block=block and not check.running)
    vectors = krylov.vectors(s[:, wanted]) if return_vectors else None
    return EigResult(
        values=theta[wanted],
        residuals=residuals[wanted],
        error_bounds=bounds[wanted],
        vectors=vectors,
        n_matvecs=krylov.products,
        converged=converged,
        seconds=time.perf_counter() - began,
        method="lanczos",
        seed=int(seed),
        which=which,
        certified=certified,
        stop=stop,
        sequences=krylov.sequences,
        restarts=krylov.restarts,
        stored_vectors=krylov.peak_vectors,
    )


def _extend(krylov: AugmentedKrylov, generator: torch.Generator, op: LinearOperator, *, block: bool) -> None:
    """The next basis vector: the last sequence's Lanczos vector, or (`block`) the next sequence's in turn, so
    that every sequence keeps growing (block Lanczos); a fresh Gaussian vector where all have broken down."""
    first = (krylov.last + 1) % krylov.sequences if block else krylov.last
    order = [(first + i) % krylov.sequences for i in range(krylov.sequences)]
    if not any(krylov.follow(sequence) for sequence in order):  # an invariant subspace: go on from a fresh vector
        krylov.inject(_gaussian(generator, op))


def _restart(
    krylov: AugmentedKrylov, theta: np.ndarray, s: np.ndarray, keep: int, which: str, generator: torch.Generator
) -> bool:
    """Keep the `keep` Ritz vectors of the wanted end (at most what leaves room for two more vectors): a thick restart
    (Wu & Simon 2000) while at most two sequences are open, else an explicit restart from a random combination of them,
    so that the open directions stored beside the basis never pile up. Returns whether the restart was thick (the basis
    holds the Ritz vectors) rather than explicit (one vector waits for its product)."""
    keep = int(np.clip(keep, 1, krylov.capacity - krylov.open.shape[0] - 3))
    kept = np.sort(_wanted(theta, keep, which))
    if krylov.open.shape[0] <= OPEN_DIRECTIONS - 1:
        krylov.restart(s[:, kept], theta[kept])
        return True
    weights = torch.randn(keep, generator=generator, dtype=torch.float64, device=generator.device).cpu().numpy()
    krylov.reset(krylov.vectors(s[:, kept] @ weights[:, None])[0])
    return False


class _Check:
    """Step 3 of `lanczos`'s certified stop: a fresh random sequence, alone, long enough that an eigenvalue the
    basis missed would have shown.

    The fresh vector q is Gaussian in the complement of the basis, so a missed eigenvector u (with eigenvalue μ
    in the wanted region, beyond L) holds a share w ~ χ²₁/N of it, N the complement's dimension. After q products
    the sequence's Krylov space holds p(A)q for the Chebyshev polynomial p of degree q − 1 on [a, b], where b is the
    fresh sequence's own extreme Ritz value and a the far end of the spectrum: u's share grows by at least
    T_{q−1}(1 + 2(L − b)/(b − a))² against the rest (Saad 2011, §6.6; Kuczyński & Woźniakowski 1992 for the
    random start). The check passes once that growth exceeds N/CHECK_MISS, so u would now dominate the sequence's
    extreme Ritz vector unless w < CHECK_MISS/N (probability ≈ √(2·CHECK_MISS/π)), and the wanted values have
    not moved beyond their bounds. A missed eigenvalue instead pulls the fresh Ritz values into the wanted region
    and unsettles the wanted values: the check stops, every sequence grows in turn, and a new check follows."""

    def __init__(self, minimum_values: int, which: str) -> None:
        self.minimum_values = minimum_values  # the wanted values and their guards
        self.which = which
        self.began: int | None = None  # products spent when the running check's fresh vector joined
        self.sequence = -1
        self.values: np.ndarray | None = None
        self.bounds: np.ndarray | None = None

    @property
    def running(self) -> bool:
        return self.began is not None

    def start(self, krylov: AugmentedKrylov, values: np.ndarray, bounds: np.ndarray) -> None:
        self.began, self.sequence, self.values, self.bounds = krylov.applied, krylov.sequences - 1, values, bounds

    def stop(self) -> None:
        self.began = None

    def unmoved(self, values: np.ndarray, bounds: np.ndarray) -> bool:
        """Each wanted value within its old and new bounds of where it was when the check began."""
        return len(values) == len(self.values) and bool(np.all(np.abs(values - self.values) <= self.bounds + bounds))

    def passes(
        self, krylov: AugmentedKrylov, theta: np.ndarray, residuals: np.ndarray, wanted: np.ndarray, bounds: np.ndarray
    ) -> bool:
        if not self.running or not self.unmoved(theta[wanted], bounds[wanted]):
            return False
        fresh = [i for i in range(krylov.applied) if krylov.owner[i] == self.sequence]
        # a fresh sequence that broke down spans an invariant subspace: whatever share of a missed eigenvector it
        # had is in its own Ritz values already, exactly (unbounded growth)
        invariant = not krylov.remains(krylov.ends[self.sequence])
        if len(fresh) < 2 and not invariant:
            return False
        rho = np.linalg.eigvalsh(krylov.h[np.ix_(fresh, fresh)])
        low, high = theta[0] - residuals[0], theta[-1] + residuals[-1]  # the spectrum's ends, as far as seen
        complement = krylov.n - (krylov.applied - len(fresh))
        needed = np.log(complement / CHECK_MISS)  # ln of the growth T² that the missed share needs
        degree = len(fresh) - 1
        ends = []
        if self.which in ("LA", "LM"):
            ends.append((np.min(theta[wanted] - bounds[wanted]) if self.which == "LA" else None, rho[-1], low))
        if self.which in ("SA", "LM"):
            ends.append((np.max(theta[wanted] + bounds[wanted]) if self.which == "SA" else None, rho[0], high))
        for level, edge, far in ends:
            if level is None:  # "LM": the wanted region is |λ| ≥ min |θ_i| − bound, on either side
                magnitude = np.min(np.abs(theta[wanted]) - bounds[wanted])
                level = magnitude if edge >= far else -magnitude
            margin, width = abs(level - edge), abs(edge - far)
            if (level - edge) * (edge - far) <= 0 or width == 0:
                return False  # the fresh sequence already reaches the wanted region
            if not invariant and 2 * degree * np.arccosh(1 + 2 * margin / width) < needed:  # ln T² ≈ 2·degree·arccosh(x)
                return False
        return True


class _DeflatedCheck:
    """Step 3 of `lanczos`'s certified stop in a bounded basis: the fresh random sequence runs outside the basis, in
    four vectors, on the operator deflated by the top Ritz vectors.

    The basis has just been restarted to the wanted Ritz vectors and their guards. Of those, the first j (in the
    order of `which`, j ≥ k) are chosen where the gap below them is widest: Y = [y_1..y_j], with A Y = Y Θ + R and
    ‖R‖ ≤ ε = √(Σ r_i²). In the basis [Y, Z] A is [[Θ, YᵀAZ], [ZᵀAY, C]], C = ZᵀAZ, whose off-diagonal blocks have
    norm ≤ ε, so each eigenvalue of A lies within ε of one of Θ's or C's (Weyl). Let L be the lowest θ_i − bound_i of
    Y. If every eigenvalue of C lies below L − ε, at most j eigenvalues of A lie above L, and the j residual (cluster)
    intervals above L hold at least j (Kahan): the i-th value is the i-th eigenvalue, within its bound, for i ≤ j.
    Where Y's guards lie below L_k − ε, L_k the lowest point of the k wanted intervals, the same argument with L_k
    claims the wanted k only, and a guard's wide interval does not lower the level.

    That C has nothing above L − ε is checked as `_Check` does for the in-basis sequence: Lanczos on C (vectors
    orthogonalized against Y, and locally; Greenbaum 1989 for the extreme Ritz values of such a recurrence) from a
    Gaussian vector q ⟂ Y, until an eigenvector of C above the level with share w ≥ CHECK_MISS/N of q would have
    pulled the sequence's top Ritz value ρ past it: w·T_d(1 + 2(L' − ρ)/(ρ − a))²·(L' − ρ) > (ρ − a) for the
    Chebyshev polynomial T_d on [a, ρ], a the spectrum's far end (Saad 2011, §6.6; Kuczyński & Woźniakowski 1992).
    A sequence whose ρ reaches the level instead has found an eigenvalue the basis missed: its Ritz vector (kept if
    the basis had room for the sequence, else rebuilt by rerunning it) joins the basis."""

    def __init__(
        self,
        krylov: AugmentedKrylov,
        generator: torch.Generator,
        which: str,
        k: int,
        tol: float,
        far: list[float],
        bar: Progress,
    ) -> None:
        self.krylov, self.which, self.bar = krylov, which, bar
        # just restarted: the basis vectors are the Ritz vectors, H = diag(θ), and column i of B is y_i's residual
        theta = np.diag(krylov.h)[: krylov.applied].copy()
        residuals = krylov.residuals(np.eye(krylov.applied))
        order = _wanted(theta, len(theta), which)
        # in the frame of the wanted end: "SA" is "LA" of −A, and "LM" is "LA" of |θ| with both ends of C checked
        values = {"LA": theta, "SA": -theta, "LM": np.abs(theta)}[which][order]
        bounds = _cluster_bounds(theta, residuals)[order]
        eps = torch.finfo(krylov.basis.dtype).eps
        bounds = np.maximum(bounds, ROUNDING_ULPS * eps * krylov.norm_estimate)
        converged = bounds <= tol * np.maximum(np.abs(values), np.sqrt(eps) * krylov.norm_estimate)
        floor = float(np.min(values[:k] - bounds[:k]))  # the wanted intervals' lowest point
        best = None
        for j in range(k, len(values) + 1):  # Y = the first j Ritz vectors: the wanted ones and j − k guards
            coupling = float(np.sqrt(np.sum(residuals[order[:j]] ** 2)))
            if j == k or np.all(values[k:j] < floor - coupling):  # guards below the level: claim the wanted k
                level = floor - coupling
            elif converged[:j].all():  # claim the first j: each interval holds its own eigenvalue
                level = float(np.min(values[:j] - bounds[:j])) - coupling
            else:
                continue
            below = values[j] if j < len(values) else -np.inf  # C's top is at least about this
            if best is None or level - below > best[0] - best[2]:
                best = (level, j, below)
        self.level = best[0]
        # each side of C to check: its sign (the frame where that side is the top) and the far end there, as seen
        self.sides = {"LA": [(1.0, far[0])], "SA": [(-1.0, -far[1])], "LM": [(1.0, far[0]), (-1.0, -far[1])]}[which]
        rows = np.sort(order[: best[1]])
        contiguous = len(rows) and rows[-1] - rows[0] + 1 == len(rows)  # Y is a block at one end of the basis
        self.deflation = krylov.basis[rows[0] : rows[-1] + 1] if contiguous else krylov.basis[torch.as_tensor(rows)]
        self.copied = 0 if contiguous else len(rows)  # "LM" can want both ends: Y is then a copy beside the basis
        q, _ = orthogonalize(_gaussian(generator, krylov.op), self.deflation, krylov.inner)
        self.start_norm = float(krylov.inner.norm(q))
        self.start = q / max(self.start_norm, torch.finfo(q.dtype).tiny)
        self.needed = np.log(max(krylov.n - best[1], 1) / CHECK_MISS)  # ln of the growth a missed share needs

    def run(self) -> bool | torch.Tensor | None:
        """True: passed; a vector: the Ritz vector of something the basis missed; None: the budget ran out."""
        if self.start_norm <= 1e-6:
            return True  # Y spans the space to rounding
        krylov = self.krylov
        # the buffer's free rows keep the q_j, less as many as the recurrence's own vectors take beside it
        free = krylov.capacity - krylov.stored_vectors - CHECK_VECTORS - self.copied
        slots = krylov.basis[krylov.size : krylov.size + max(free, 0)]
        stored: int | None = 0  # how many are kept there (None: more than fit; `_rebuild` recomputes the Ritz vector)
        alphas: list[float] = []
        betas: list[float] = []
        for q, alpha, beta in self._recurrence():
            if q is None:
                return None
            alphas.append(alpha)
            if stored is not None:
                if stored < len(slots):
                    slots[stored] = q
                    stored += 1
                else:
                    stored = None
            held = CHECK_VECTORS + self.copied + (stored or 0)
            krylov.peak_vectors = max(krylov.peak_vectors, krylov.stored_vectors + held)
            rho, s = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
            passed = True
            for sign, seen in self.sides:  # `seen`: the far end of the spectrum in this frame
                frame = sign * rho  # this side of C is the top here
                top = int(np.argmax(frame))
                edge, far = frame[top], min(seen, float(frame.min()))
                if edge >= self.level:
                    weights = s[:, top]
                    if stored is not None:
                        return torch.as_tensor(weights, dtype=slots.dtype, device=slots.device) @ slots[:stored]
                    return self._rebuild(weights)
                margin, width = self.level - edge, edge - far
                degree = len(alphas) - 1
                # ln(T²·margin/width) against ln(N/CHECK_MISS)
                growth = 2 * degree * np.arccosh(1 + 2 * margin / width) + np.log(margin / width) if width > 0 else -np.inf
                passed = passed and degree >= 1 and growth >= self.needed
            if beta <= self.krylov._negligible or passed:
                return True  # (an invariant subspace of C: its Ritz values are exact, all below the level)
            betas.append(beta)

    def _recurrence(self):
        """Lanczos on the deflated operator from the start: yields (q_j, α_j, β_j), or (None, 0, 0) once the budget is
        spent."""
        q, previous, beta_previous = self.start, None, 0.0
        while True:
            if self.krylov.full:
                yield None, 0.0, 0.0
                return
            w = self.krylov.op.products(q[None])[0]
            self.krylov.products += 1
            self.bar.update(1)
            inner = self.krylov.inner
            w, _ = orthogonalize(w, self.deflation, inner)
            alpha = float(inner.reduce(q @ w))
            w.sub_(q, alpha=alpha)  # in place: each temporary here is an n-vector
            if previous is not None:
                w.sub_(previous, alpha=beta_previous)
            w.sub_(q, alpha=float(inner.reduce(q @ w)))  # local reorthogonalization against the last two vectors
            if previous is not None:
                w.sub_(previous, alpha=float(inner.reduce(previous @ w)))
            w, _ = orthogonalize(w, self.deflation, inner)
            beta = float(inner.norm(w))
            yield q, alpha, beta
            if beta == 0.0:
                return
            previous, beta_previous, q = q, beta, w / beta

    def _rebuild(self, weights: np.ndarray) -> torch.Tensor | None:
        """The Ritz vector Σ s_j q_j, by rerunning the recurrence (its vectors were not kept)."""
        y = torch.zeros_like(self.start)
        for j, (q, _, _) in zip(range(len(weights)), self._recurrence()):
            if q is None:
                return None
            y.add_(q, alpha=float(weights[j]))
        return y


def _gaussian(generator: torch.Generator, op: LinearOperator) -> torch.Tensor:
    """A random direction, uniform on the sphere (a normalized Gaussian), in the operator's dtype and device (a sharded
    operator's piece of it: landscape.engine.inner)."""
    g = op.inner.random(generator, lambda g, n: torch.randn(n, generator=g, dtype=op.dtype, device=op.device), op.shape[0])
    return g / op.inner.norm(g)


def _cluster_bounds(theta: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """Each Ritz value's residual bound, widened to √(Σ r_j²) over its cluster of overlapping residual intervals.

    Disjoint intervals each hold an eigenvalue of their own within r_i; overlapping ones may share, and then
    the cluster's m Ritz values lie within its √(Σ r_j²) of m distinct eigenvalues (Kahan's theorem for the
    residual block; Parlett 1998, Thm 11.5.1)."""
    order = np.argsort(theta)
    bounds = residuals.copy()
    cluster = [order[0]] if len(order) else []
    for previous, current in zip(order[:-1], order[1:]):
        if theta[current] - residuals[current] <= theta[previous] + residuals[previous]:
            cluster.append(current)
            continue
        bounds[cluster] = np.sqrt(np.sum(residuals[cluster] ** 2))
        cluster = [current]
    if cluster:
        bounds[cluster] = np.sqrt(np.sum(residuals[cluster] ** 2))
    return bounds


def _start_vector(start: torch.Tensor, op: LinearOperator) -> torch.Tensor:
    """A caller's first Krylov vector as a unit vector (n,) in the operator's dtype and device; finite and nonzero."""
    if not isinstance(start, torch.Tensor):
        raise ValueError(f"start must be a torch.Tensor or None, got {type(start).__name__}")
    n = op.length  # a sharded operator's start is this rank's piece
    if start.numel() != n:
        raise ValueError(f"start has {start.numel()} entries, the operator acts on vectors of {n}")
    row = start.detach().reshape(n).to(dtype=op.dtype, device=op.device)
    norm = op.inner.norm(row)
    if not torch.isfinite(norm) or not norm > 0:
        raise ValueError("start must be finite and nonzero")
    return row / norm


def power_iteration(
    op: LinearOperator, k: int = 1, *, tol: float = 1e-3, max_matvecs: int = 1000, seed: int = 0, return_vectors: bool = False
) -> EigResult:
    """Power iteration with deflation, the PyHessian baseline (Yao et al. 2020): top-|λ| eigenpairs one by one.

    Each pair gets max_matvecs // k matvecs and stops when the Rayleigh quotient's relative
    change |Δθ| < tol·(|θ| + 1e-6) (PyHessian's rule); residuals are ‖Av − θv‖.
    """
    k = _check_common(op, k, tol, max_matvecs)
    start = time.perf_counter()
    generator = seeded_generator(op.device, seed)
    n, inner = op.shape[0], op.inner
    found = torch.zeros(0, op.length, dtype=op.dtype, device=op.device)  # the eigenvectors found so far, as rows
    values, residuals, used, all_converged = [], [], 0, True
    for _ in range(k):
        v = _deflate(inner.random(generator, lambda g, m: rademacher(g, (m,), op), n), found, inner)
        v = v / inner.norm(v)
        theta, converged = None, False
        for _ in range(max_matvecs // k):
            av = op.matvec(v)
            used += 1
            previous, theta, vector = theta, float(inner.reduce(v @ av)), v
            residual = float(inner.norm(av - theta * v))
            converged = previous is not None and abs(theta - previous) < tol * (abs(previous) + 1e-6)
            following = _deflate(av, found, inner)
            norm = inner.norm(following)
            if converged or norm == 0:  # Av = 0 after deflation: v is an exact null vector
                converged = True
                break
            v = following / norm
        all_converged &= converged
        values.append(theta)
        residuals.append(residual)
        found = torch.cat([found, vector[None]])
    return EigResult(
        values=np.array(values),
        residuals=np.array(residuals),
        error_bounds=np.array(residuals),
        vectors=found if return_vectors else None,
        n_matvecs=used,
        converged=all_converged,
        seconds=time.perf_counter() - start,
        method="power_iteration",
        seed=int(seed),
        which="LM",
    )


def _deflate(v: torch.Tensor, found: torch.Tensor, inner: InnerProduct) -> torch.Tensor:
    """Remove the components along the already found (orthonormal) eigenvectors, the rows of `found`."""
    return v - inner.reduce(found @ v) @ found


@dataclass
class WarmStart:
    """Lanczos on a sequence of nearby matrices (training steps, trajectory checkpoints), each started from the
    previous top eigenvector: one home for the warm start of `landscape track`, `train --track-every` and
    `landscape.curvature.stability` (Cohen et al. 2021's edge of stability).

    The stop is `lanczos`'s certified rule: near the edge of stability λ1 and λ2 lie a few percent apart and
    swap, and the previous top vector is then the new λ2's, so a warm start alone is the most exposed start
    there is. `lanczos` mixes it with a Gaussian vector and checks the result with a fresh one.
    `enabled=False` starts every Lanczos cold (for comparisons), keeping everything else equal.
    """

    enabled: bool = True
    vector: torch.Tensor | None = None
    others: dict[str, WarmStart] = field(default_factory=dict, repr=False)

    def named(self, key: str) -> WarmStart:
        """The warm start of another sequence of matrices (e.g. P⁻¹H beside H), kept beside this one under `key`."""
        return self.others.setdefault(key, WarmStart(self.enabled))

    def lanczos(self, op: LinearOperator, k: int = 1, *, stop: str = "certified", **options) -> EigResult:
        result = lanczos(op, k, stop=stop, start=self.vector if self.enabled else None, return_vectors=True, **options)
        self.vector = result.vectors[0].detach().clone()
        return result
