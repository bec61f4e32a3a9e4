"""A Krylov basis that can take fresh random vectors and restart in bounded memory: the engine under `lanczos`.

`AugmentedKrylov` runs the Lanczos recurrence with full reorthogonalization, and at any step can
take a fresh vector instead of the next Lanczos vector (after a breakdown, or to add a vector that a
check found the space had missed). The basis is then the union of several Krylov sequences, and
the projection H = VᵀAV is no longer tridiagonal, so it is kept whole (it is small: one row and
column per basis vector, float64 on the host). Every entry of H comes from the Gram–Schmidt coefficients
the reorthogonalization computes anyway, so H costs no extra products.

Residuals stay exact. The part of A V outside the basis is kept in factored form, A V = V H + Qᵀ B:
the rows of Q (s × n) are orthonormal and orthogonal to V, and B (s × m) holds their coefficients. In
plain Lanczos only the last vector's product leaves the span, so s = 1 and B's one nonzero entry is
β_m; each further Krylov sequence adds one row. A Ritz pair (θ, Vs) then has the residual
‖AVs − θVs‖ = ‖B s‖ exactly.

Memory is bounded by `capacity`, the most n-vectors kept at once (basis and Q), and allocated once: one buffer
of `capacity` rows holds the basis from the front and Q from the back, so neither grows into a copy of itself (on a
CPU the rows not yet written take no memory). When they are all used,
`restart` keeps only the Ritz vectors Y = V S of the wanted end: Yᵀ A Y = diag(θ) and A Y = Y diag(θ) +
Qᵀ (B S), so the factorization keeps its form and the recurrence continues from Q's directions. This
is thick-restart Lanczos (Wu & Simon 2000), which is equivalent to implicitly restarted Lanczos with
exact shifts (Sorensen 1992) and needs no tridiagonal structure.
"""

from __future__ import annotations

import numpy as np
import torch

from landscape.engine.inner import LOCAL, InnerProduct
from landscape.engine.operators import LinearOperator

BREAKDOWN_ULPS = 100  # ‖g‖ ≤ this many machine epsilons of ‖H‖: an invariant subspace was found
REORTHOGONALIZE = 2**-0.5  # a Gram–Schmidt pass that leaves less than this share of the norm is repeated


def orthogonalize(w: torch.Tensor, basis: torch.Tensor, inner: InnerProduct = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """w (n,) minus its components along the orthonormal rows of basis (m, n) by classical Gram–Schmidt, with a
    second pass where the first removed most of w (‖w'‖ < ‖w‖/√2: the DGKS criterion, Daniel, Gragg, Kaufman &
    Stewart 1976), so "twice is enough" is paid for only when needed.

    Returns the orthogonalized vector and the coefficients removed (m,), summed over the passes. `inner` sums the
    products of sharded vectors over the ranks."""
    if basis.shape[0] == 0:
        return w, w.new_zeros(0)
    before = inner.norm(w)
    coefficients = inner.reduce(basis @ w)
    w = torch.addmv(w, basis.T, coefficients, alpha=-1)  # one new vector, no temporary for the product
    if inner.norm(w) < REORTHOGONALIZE * before:
        c = inner.reduce(basis @ w)
        w = torch.addmv(w, basis.T, c, alpha=-1)
        coefficients = coefficients + c
    return w, coefficients


def combine_rows_in_place(rows: torch.Tensor, coefficients: torch.Tensor, into: torch.Tensor) -> None:
    """into = coefficients @ rows for coefficients (k, m), where `into` (k rows) may share memory with `rows` (m
    rows of the same buffer): a block of columns at a time, so the temporary is one vector's size, not k vectors'
    (at 124M parameters k vectors are gigabytes)."""
    k = coefficients.shape[0]
    n = rows.shape[1]
    step = max(1, n // max(k, 1))
    for start in range(0, n, step):
        # the block's right side is computed whole before any of it is written
        into[:, start : start + step] = coefficients @ rows[:, start : start + step]


class AugmentedKrylov:
    """Lanczos with full reorthogonalization on a basis that fresh vectors can join (see the module docstring).

    `apply()` spends one product on the newest basis vector; `follow()` then makes the next basis vector the
    Lanczos one (the normalized remainder of that product), `inject(v)` makes it v orthogonalized against the
    basis instead. `ritz()` gives the Rayleigh–Ritz pairs of the vectors A has been applied to and their
    exact residual norms; `restart(s)` shrinks the basis to the Ritz vectors of the columns of s.

    `capacity` is the most n-vectors stored at once (None: every product's and a few more), the basis and the
    remainder directions Q (one per open Krylov sequence) together (`stored_vectors`); one is left free for a new
    sequence's remainder. They share one buffer of `capacity` rows (`basis`): the basis vectors are its first
    `size` rows and Q its last rows (`open`).
    """

    def __init__(self, op: LinearOperator, start: torch.Tensor, max_steps: int, capacity: int | None = None) -> None:
        self.op, self.n, self.max_steps = op, op.shape[0], max_steps
        self.inner, self.length = op.inner, op.length  # sharded: this rank's entries, products summed over the ranks
        self.capacity = max_steps + 5 if capacity is None else max(3, capacity)
        self.basis = start.new_empty(self.capacity, self.length)  # rows are written before they are read
        self.basis[0] = start / self.inner.norm(start)
        self.size = 1  # basis vectors; the last one is waiting for its product
        self.applied = 0  # basis vectors A has been applied to (columns of H)
        self.products = 0  # operator products spent, by the basis and by any check that counts here
        self.restarts = 0
        self.h = np.zeros((self.basis.shape[0], self.basis.shape[0]))
        self.remainders = 0  # rows of Q: orthonormal directions of A V outside the basis, the buffer's last rows
        self.coupling = np.zeros((0, self.basis.shape[0]))  # B: A V = V H + Qᵀ B
        self.owner = [0]  # the Krylov sequence each basis vector belongs to
        self.ends: list[int | None] = [None]  # per sequence: its last applied basis vector
        self.norm_estimate = 0.0  # max column norm of [H; B] seen so far: a lower estimate of ‖A‖
        self.tiny = BREAKDOWN_ULPS * torch.finfo(start.dtype).eps
        self.peak_vectors = self.stored_vectors

    @property
    def open(self) -> torch.Tensor:
        """Q: the remainder directions (rows), a view of the buffer's last rows."""
        return self.basis[self.capacity - self.remainders :]

    @property
    def stored_vectors(self) -> int:
        """n-vectors held now: the basis (with the one waiting for its product) and the remainder directions."""
        return self.size + self.remainders

    @property
    def full(self) -> bool:
        """No room for another product: the budget is spent or the basis spans the whole space."""
        return self.products >= self.max_steps or self.applied >= self.n

    @property
    def needs_restart(self) -> bool:
        """Another basis vector would leave no room for a new sequence's remainder: `restart` first."""
        return self.stored_vectors + 1 >= self.capacity

    def apply(self) -> None:
        """One product: A v for the newest basis vector v, recorded in H and in the remainder factorization."""
        j = self.applied
        v = self.basis[j]
        w = self.op.products(v[None])[0]
        self.products += 1
        remainder, coefficients = orthogonalize(w, self.basis[: self.size], self.inner)
        column = coefficients.double().cpu().numpy()
        self.h[: self.size, j] = column
        self.h[j, : self.size] = column
        self._leave_open(v)
        self.norm_estimate = max(self.norm_estimate, float(np.linalg.norm(column)) + float(self.inner.norm(remainder)))
        self._open_remainder(remainder, j)
        self.applied += 1
        self.ends[self.owner[j]] = j
        self.peak_vectors = max(self.peak_vectors, self.stored_vectors)

    @property
    def sequences(self) -> int:
        """Krylov sequences in the basis: the start, one per fresh vector injected (after a restart: the open ones)."""
        return len(self.ends)

    @property
    def last(self) -> int:
        """The sequence of the last product."""
        return self.owner[self.applied - 1]

    def remains(self, j: int | None) -> bool:
        """Whether basis vector j's product left a non-negligible remainder outside the basis."""
        return j is not None and j < self.coupling.shape[1] and float(np.linalg.norm(self.coupling[:, j])) > self._negligible

    def follow(self, sequence: int | None = None) -> bool:
        """The next basis vector continues a sequence (default: the last product's) by its Lanczos vector, the
        normalized remainder of that sequence's last product, orthogonalized against every sequence's vectors
        (alternating sequences this way is block Lanczos, one vector at a time).

        Returns False (and adds nothing) on a breakdown: that remainder is negligible, the span is invariant."""
        sequence = self.last if sequence is None else sequence
        end = self.ends[sequence]
        if end is None or self.open.shape[0] == 0:
            return False
        coefficients = torch.as_tensor(self.coupling[:, end], dtype=self.open.dtype, device=self.open.device)
        # orthogonal to the applied vectors already; a fresh pass keeps it so to rounding
        g, _ = orthogonalize(coefficients @ self.open, self.basis[: self.size], self.inner)
        norm = self.inner.norm(g)
        if float(norm) <= self._negligible:
            return False
        self._add(g / norm, sequence)
        return True

    def inject(self, v: torch.Tensor) -> bool:
        """The next basis vector is v orthogonalized against the basis: a new Krylov sequence starts.

        Returns False if v lies in the span of the basis (nothing is added)."""
        norm_before = self.inner.norm(v)
        v, _ = orthogonalize(v, self.basis[: self.size], self.inner)
        norm = self.inner.norm(v)
        if float(norm) <= 1e-6 * float(norm_before):
            return False
        self.ends.append(None)
        self._add(v / norm, len(self.ends) - 1)
        return True

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), H's eigenvectors (columns) and each pair's exact residual norm ‖Ay − θy‖."""
        m = self.applied
        theta, s = np.linalg.eigh(self.h[:m, :m])
        return theta, s, self.residuals(s)

    def residuals(self, s: np.ndarray) -> np.ndarray:
        """‖A V s − V s θ‖ per column of s (coefficients over the applied basis vectors, columns of H's eigenvectors)."""
        return np.linalg.norm(self.coupling[:, : s.shape[0]] @ s, axis=0) if len(self.coupling) else np.zeros(s.shape[1])

    def vectors(self, s: np.ndarray) -> torch.Tensor:
        """Ritz vectors, one per row, for the columns of s (coefficients over the applied basis vectors)."""
        coefficients = torch.as_tensor(s.T, dtype=self.basis.dtype, device=self.basis.device)
        return coefficients @ self.basis[: self.applied]

    def restart(self, s: np.ndarray, theta: np.ndarray) -> None:
        """Thick restart (Wu & Simon 2000): the basis becomes the Ritz vectors V s (columns of s, values theta).

        Their projection is diag(theta) and their remainders B s; every open direction of Q becomes a sequence of
        its own, ended by the kept vector whose remainder leans on it most, so `follow` continues from it."""
        if self.size != self.applied:
            raise RuntimeError("restart needs every basis vector applied")
        kept = s.shape[1]
        coefficients = torch.as_tensor(s.T, dtype=self.basis.dtype, device=self.basis.device)
        combine_rows_in_place(self.basis[: s.shape[0]], coefficients, self.basis[:kept])
        self.size = self.applied = kept
        self.h[:] = 0.0
        self.h[np.arange(kept), np.arange(kept)] = theta
        coupling = self.coupling[:, : s.shape[0]] @ s
        self.coupling = np.zeros((len(coupling), self.h.shape[0]))
        self.coupling[:, :kept] = coupling
        self.ends = _independent_columns(coupling, self._negligible) or [None]
        self.owner = [0] * kept
        for sequence, end in enumerate(self.ends):
            if end is not None:
                self.owner[end] = sequence
        self.restarts += 1

    def reset(self, v: torch.Tensor) -> None:
        """Explicit restart (Saad 2011, §7.1): a new Krylov space from the single vector v; products spent are kept.

        Where blocks of sequences have piled up, one start that mixes the Ritz vectors worth keeping (and any vector
        a check found) brings their count, and the open directions stored with them, back to one."""
        self.basis[0] = v / self.inner.norm(v)
        self.size, self.applied = 1, 0
        self.h[:] = 0.0
        self.remainders = 0
        self.coupling = np.zeros((0, self.h.shape[0]))
        self.owner, self.ends = [0], [None]
        self.restarts += 1

    @property
    def _negligible(self) -> float:
        return self.tiny * max(self.norm_estimate, torch.finfo(self.basis.dtype).tiny)

    def _leave_open(self, v: torch.Tensor) -> None:
        """v joined the applied basis: take its direction out of Q (its coefficients moved into H already)."""
        if self.remainders == 0:
            return
        # Q − p vᵀ (p = Q v) has Gram matrix I − p pᵀ = U D Uᵀ: its rows are Uᵀ-rotated to D^{1/2} Q' with Q'
        # orthonormal, so Qᵀ B becomes Q'ᵀ (D^{1/2} Uᵀ B); the direction v took (d ≈ 0) is dropped with its
        # coefficients. The kept rotated rows overwrite Q's last rows in place (none in plain Lanczos, where v is
        # Q's one row), and the outer product is added in place, never formed.
        p = self.inner.reduce(self.open @ v)
        p64 = p.double().cpu().numpy()
        d, u = np.linalg.eigh(np.eye(len(p64)) - np.outer(p64, p64))
        keep = d > BREAKDOWN_ULPS * torch.finfo(v.dtype).eps
        rotation = torch.as_tensor(u[:, keep].T / np.sqrt(d[keep])[:, None], dtype=v.dtype, device=v.device)
        kept = int(keep.sum())
        if kept:
            into = self.basis[self.capacity - kept :]
            combine_rows_in_place(self.open, rotation, into)
            into.addr_(rotation @ p, v, alpha=-1)
        self.remainders = kept
        self.coupling = (np.sqrt(d[keep])[:, None] * u[:, keep].T) @ self.coupling
        self._drop_negligible()

    def _open_remainder(self, g: torch.Tensor, j: int) -> None:
        """The new product's remainder g (orthogonal to the basis) as column j of B, adding a row of Q if needed."""
        if self.open.shape[0]:
            g, coefficients = orthogonalize(g, self.open, self.inner)
            self.coupling[:, j] = coefficients.double().cpu().numpy()
        norm = float(self.inner.norm(g))
        if norm > self._negligible:
            if self.stored_vectors >= self.capacity:
                raise RuntimeError("no room for a remainder direction: restart first")
            row = np.zeros((1, self.coupling.shape[1]))
            row[0, j] = norm
            self.remainders += 1
            torch.div(g, norm, out=self.basis[self.capacity - self.remainders])  # Q's new first row
            self.coupling = np.vstack([row, self.coupling])
        self._drop_negligible()

    def _drop_negligible(self) -> None:
        """Forget directions of Q whose coefficients are negligible (in plain Lanczos, all but the newest)."""
        keep = np.linalg.norm(self.coupling, axis=1) > self._negligible
        if not keep.all():
            # the kept rows move toward the buffer's end, the last first, so no row is overwritten before it moves
            first = self.capacity - self.remainders
            kept = np.flatnonzero(keep)
            for t in reversed(range(len(kept))):
                source, target = first + int(kept[t]), self.capacity - len(kept) + t
                if target != source:
                    self.basis[target] = self.basis[source]
            self.remainders = len(kept)
            self.coupling = self.coupling[keep]

    def _add(self, v: torch.Tensor, sequence: int) -> None:
        if self.stored_vectors >= self.capacity:
            raise RuntimeError("the basis is full: restart first")
        self.basis[self.size] = v
        self.owner.append(sequence)
        self.size += 1
        self.peak_vectors = max(self.peak_vectors, self.stored_vectors)


def _independent_columns(b: np.ndarray, negligible: float) -> list[int]:
    """Up to len(b) columns of b chosen greedily by the norm of what the chosen ones leave (pivoted Gram–Schmidt)."""
    chosen: list[int] = []
    rest = b.copy()
    for _ in range(len(b)):
        norms = np.linalg.norm(rest, axis=0)
        if not len(norms) or norms.max() <= negligible:
            break
        j = int(np.argmax(norms))
        chosen.append(j)
        u = rest[:, j] / norms[j]
        rest = rest - np.outer(u, u @ rest)
    return chosen
