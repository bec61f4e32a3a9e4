"""A Krylov basis that can take fresh random vectors: the engine under `lanczos`'s certified eigenvalues.

`AugmentedKrylov` runs the Lanczos recurrence with full reorthogonalization, and at any step can
take a fresh vector instead of the next Lanczos vector (after a breakdown, or to check that the
space has not missed an eigenvalue). The basis is then the union of several Krylov sequences, and
the projection H = VᵀAV is no longer tridiagonal, so it is kept whole (it is small: one row and
column per matvec, float64 on the host). Every entry of H comes from the Gram–Schmidt coefficients
the reorthogonalization computes anyway, so H costs no extra products.

Residuals stay exact. For each basis vector v_j that A has been applied to, the part of A v_j
outside the span of those vectors, g_j = (I − VVᵀ) A v_j, is nonzero only for the last vector of
each sequence (for the others A v_j lies in the span of v_{j−1}, v_j, v_{j+1}). Those few g_j are
kept, orthogonalized as the basis grows, so a Ritz pair (θ, Vs) has the residual
‖AVs − θVs‖ = ‖Σ_j s_j g_j‖ exactly, as in plain Lanczos where it is |β_m s_m|.
"""

from __future__ import annotations

import numpy as np
import torch

from landscape.engine.operators import LinearOperator

INITIAL_CAPACITY = 32  # basis rows allocated up front; doubled as the basis grows
BREAKDOWN_ULPS = 100  # ‖g‖ ≤ this many machine epsilons of ‖H‖: an invariant subspace was found


def orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n,) minus its components along the orthonormal rows of basis (m, n), twice (classical Gram–Schmidt).

    Returns the orthogonalized vector and the coefficients removed (m,), summed over both passes."""
    coefficients = torch.zeros(basis.shape[0], dtype=w.dtype, device=w.device)
    for _ in range(2):
        c = basis @ w
        w = w - c @ basis
        coefficients += c
    return w, coefficients


class AugmentedKrylov:
    """Lanczos with full reorthogonalization on a basis that fresh vectors can join (see the module docstring).

    `apply()` spends one product on the newest basis vector; `follow()` then makes the next basis vector the
    Lanczos one (the normalized remainder of that product), `inject(v)` makes it v orthogonalized against the
    basis instead. `ritz()` gives the Rayleigh–Ritz pairs of the vectors A has been applied to and their
    exact residual norms.
    """

    def __init__(self, op: LinearOperator, start: torch.Tensor, max_steps: int) -> None:
        self.op, self.n, self.max_steps = op, op.shape[0], max_steps
        self.basis = start.new_zeros(min(max_steps + 1, INITIAL_CAPACITY), self.n)
        self.basis[0] = start / start.norm()
        self.size = 1  # basis vectors; the last one is waiting for its product
        self.applied = 0  # basis vectors A has been applied to (= products spent)
        self.h = np.zeros((self.basis.shape[0], self.basis.shape[0]))
        self.remainders: dict[int, torch.Tensor] = {}  # j -> g_j = (I − VVᵀ) A v_j, where nonzero
        self.owner = [0]  # the Krylov sequence each basis vector belongs to
        self.ends: list[int | None] = [None]  # per sequence: its last applied basis vector
        self.norm_estimate = 0.0  # max column norm of H seen so far: a lower estimate of ‖A‖
        self.tiny = BREAKDOWN_ULPS * torch.finfo(start.dtype).eps

    @property
    def full(self) -> bool:
        """No room for another product: the budget is spent or the basis spans the whole space."""
        return self.applied >= self.max_steps or self.applied >= self.n

    def apply(self) -> None:
        """One product: A v for the newest basis vector v, recorded in H and in v's remainder."""
        j = self.applied
        v = self.basis[j]
        w = self.op.products(v[None])[0]
        remainder, coefficients = orthogonalize(w, self.basis[: self.size])
        column = coefficients.double().cpu().numpy()
        self.h[: self.size, j] = column
        self.h[j, : self.size] = column
        for i, g in self.remainders.items():  # v is no longer outside the span: take it out of the others
            self.remainders[i] = g - (v @ g) * v
        self.remainders[j] = remainder
        self.ends[self.owner[j]] = j
        self.applied += 1
        self.norm_estimate = max(self.norm_estimate, float(np.linalg.norm(column)) + float(remainder.norm()))
        self._drop_negligible()

    @property
    def sequences(self) -> int:
        """Krylov sequences in the basis: the start, and one per fresh vector injected."""
        return len(self.ends)

    @property
    def last(self) -> int:
        """The sequence of the last product."""
        return self.owner[self.applied - 1]

    def follow(self, sequence: int | None = None) -> bool:
        """The next basis vector continues a sequence (default: the last product's) by its Lanczos vector, the
        normalized remainder of that sequence's last product, orthogonalized against every sequence's vectors
        (alternating sequences this way is block Lanczos, one vector at a time).

        Returns False (and adds nothing) on a breakdown: that remainder is negligible, the span is invariant."""
        sequence = self.last if sequence is None else sequence
        end = self.ends[sequence]
        g = None if end is None else self.remainders.get(end)
        if g is None:
            return False
        # orthogonal to the applied vectors already; a fresh pass keeps it so to rounding
        g, _ = orthogonalize(g, self.basis[: self.size])
        norm = g.norm()
        if float(norm) <= self.tiny * max(self.norm_estimate, torch.finfo(g.dtype).tiny):
            return False
        self._add(g / norm, sequence)
        return True

    def inject(self, v: torch.Tensor) -> bool:
        """The next basis vector is v orthogonalized against the basis: a new Krylov sequence starts.

        Returns False if v lies in the span of the basis (nothing is added)."""
        norm_before = v.norm()
        v, _ = orthogonalize(v, self.basis[: self.size])
        norm = v.norm()
        if float(norm) <= 1e-6 * float(norm_before):
            return False
        self.ends.append(None)
        self._add(v / norm, len(self.ends) - 1)
        return True

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), H's eigenvectors (columns) and each pair's exact residual norm ‖Ay − θy‖."""
        m = self.applied
        theta, s = np.linalg.eigh(self.h[:m, :m])
        if not self.remainders:
            return theta, s, np.zeros(m)
        rows = sorted(self.remainders)
        g = torch.stack([self.remainders[i] for i in rows]).double()
        gram = (g @ g.T).cpu().numpy()
        weights = s[rows]  # (len(rows), m): the coefficients of the kept remainders in each Ritz vector
        residuals = np.sqrt(np.maximum(np.einsum("im,ij,jm->m", weights, gram, weights), 0.0))
        return theta, s, residuals

    def vectors(self, s: np.ndarray) -> torch.Tensor:
        """Ritz vectors, one per row, for the columns of s (coefficients over the applied basis vectors)."""
        coefficients = torch.as_tensor(s.T, dtype=self.basis.dtype, device=self.basis.device)
        return coefficients @ self.basis[: self.applied]

    def _add(self, v: torch.Tensor, sequence: int) -> None:
        if self.size >= self.basis.shape[0]:
            capacity = min(2 * self.basis.shape[0], self.max_steps + 1)
            grown = self.basis.new_zeros(capacity, self.n)
            grown[: self.size] = self.basis[: self.size]
            self.basis = grown
            h = np.zeros((capacity, capacity))
            h[: self.size, : self.size] = self.h[: self.size, : self.size]
            self.h = h
        self.basis[self.size] = v
        self.owner.append(sequence)
        self.size += 1

    def _drop_negligible(self) -> None:
        """Forget remainders that the basis has absorbed (in plain Lanczos, all but the last one)."""
        scale = self.tiny * max(self.norm_estimate, torch.finfo(self.basis.dtype).tiny)
        for i in [i for i, g in self.remainders.items() if float(g.norm()) <= scale]:
            del self.remainders[i]
