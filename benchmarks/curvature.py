"""Curvature estimators against ground truth and peers: HVPs to reach 1e-3 on λ1..λ5, trace error per budget.

Counts Hessian-vector products (HVPs) and errors, not wall time. Problems (CPU, eval mode):
digits networks trained briefly with plain SGD (float64, 512 training samples in one batch):
the default MLP (100, 100) (n = 17,610), a small MLP (32, 32) and a small BN ConvNet (4, 8)
whose Hessians are dense-able; an untrained ResNet-20 on 64 random CIFAR-shaped inputs with
random labels (float32: float64 HVPs are ~7x slower); and a dense synthetic matrix with a
network-like spectrum for the trace. Runs single-threaded (see main) in about 8-9 minutes.

(a) Eigenvalues. Reference λ1..λ5: numpy eigh of the dense Hessian, or Lanczos at tol 1e-10
    (1e-5 in float32) with the rigorous residual rule. Each method runs at its own tolerance
    1e-3 over 3 seeds: HVPs used and the max relative error over λ1 and over λ1..λ5. "Oracle"
    HVPs: the fewest at which the method's estimates are all within 1e-3 of the reference
    (replayed prefixes of the same deterministic run; for power iteration, PyHessian's update
    stopped per eigenvalue by the reference). Peers run on the SAME operator as ours
    (PyHessian's HVP function and eigenthings' LambdaOperator are fed our matvec) and, as a
    cross-check, once end-to-end on the model. Ghosts: spurious extra copies of λ1.
(b) Trace, against tr(H) from n HVPs: relative error at 10 / 30 / 100 matvecs over 20 seeds
    (mean = bias, RMS, std) for landscape's hutchinson / hutchpp / xtrace, PyHessian's trace,
    curvlinops' hutchinson_trace / hutchpp_trace / xtrace and hessian-eigenthings'
    hutchinson / hutch_plus_plus.

Usage: python benchmarks/curvature.py [--problems mlp,mlp-small,convnet-small,resnet20] [--skip-synthetic]
Writes benchmarks/results/curvature.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from landscape.curvature.spectrum import STOPS, lanczos, power_iteration  # noqa: E402
from landscape.curvature.trace import hutchinson, hutchpp, xtrace  # noqa: E402
from landscape.engine.objective import Objective  # noqa: E402
from landscape.engine.operators import DenseOperator, HessianOperator, LinearOperator  # noqa: E402
from landscape.inputs.data import MeasurementSet, load_data  # noqa: E402
from landscape.inputs.models import model_for_data  # noqa: E402
from landscape.results import to_jsonable  # noqa: E402

K, TOL = 5, 1e-3
EIG_SEEDS = range(3)
TRACE_SEEDS = range(20)
BUDGETS = (10, 30, 100)
SWEEP = 120  # largest Krylov dimension tried when sweeping for oracle / self-certified HVP counts
POWER_CAP = 300  # per-eigenvalue cap of the oracle-stopped power iteration
DENSE_MATVEC_MAX_N = 2000  # above this a dense float64 matvec is slower than an MLP's HVP on 512 samples

# truth: "dense" (n HVPs, numpy eigh: exact eigenvalues and trace; iterative methods then run on that
# matrix, or on the HessianOperator where that is cheaper), "diagonal" (Lanczos at tol 1e-10 for the eigenvalues, tr(H) from n HVPs summed on the
# diagonal; methods run on the HessianOperator) or "lanczos" (eigenvalues only). "chunk": HVP columns
# per block when sweeping the identity. "reduced": skip the costly baselines (see eigen_benchmark).
PROBLEMS = {
    "mlp": {"model": "mlp", "kwargs": {}, "truth": "diagonal", "chunk": 64},  # default hidden (100, 100)
    "mlp-small": {"model": "mlp", "kwargs": {"hidden": [32, 32]}, "truth": "dense", "chunk": 128},
    "convnet-small": {"model": "convnet", "kwargs": {"channels": [4, 8]}, "truth": "dense", "chunk": 32},  # BN
    "resnet20": {"model": "resnet20", "kwargs": {}, "truth": "lanczos", "dtype": torch.float32, "reduced": True},
}
NOT_RUN = {
    "convnet (default channels 16, 32; n = 9,978)": "not run: a float64 HVP on 512 samples takes ≈ 0.2 s here "
    "(0.4 s by double backward), so its dense Hessian (n HVPs) and the power-iteration baselines would take "
    "tens of minutes on 2 shared cores; channels (4, 8) is measured instead",
    "resnet20 in float64": "an HVP takes ≈ 3 s (float32: ≈ 0.45 s), so resnet20 runs in float32 with a reduced "
    "method set: no power iteration (ours or PyHessian's), no oracle power iteration, no ghost run, 1 eigsh seed",
}


# ----------------------------------------------------------------------------- problems


def train(model: torch.nn.Module, data, *, epochs: int = 5, lr: float = 0.1, batch_size: int = 32, seed: int = 0) -> dict:
    """A few epochs of plain SGD on the training split, so the spectrum looks like a trained net's."""
    x, y = data.split("train")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
    return {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "train_loss": F.cross_entropy(out, y).item(),
        "train_accuracy": (out.argmax(1) == y).double().mean().item(),
    }


def dense_hessian(op: LinearOperator, chunk: int) -> np.ndarray:
    """The rows H e_i, `chunk` at a time: Hᵀ, H for a symmetric operator (not yet symmetrized: the caller records
    the asymmetry)."""
    eye = torch.eye(op.shape[0], dtype=op.dtype)
    return torch.cat([op.products(eye[i : i + chunk]) for i in range(0, op.shape[0], chunk)]).numpy()


def network(name: str, spec: dict, data) -> tuple[torch.nn.Module, list, dict]:
    """(model, batches, info): a digits network trained briefly on 512 training samples, or an untrained
    ResNet-20 on one batch of 64 random CIFAR-shaped inputs with random labels."""
    torch.manual_seed(0)
    if spec["model"] == "resnet20":
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        model, _ = model_for_data("resnet20", (3, 32, 32), num_classes=10)
        return model.eval(), [(x, y)], {"training": "untrained (random init), random inputs and labels", "n_samples": 64}
    model, _ = model_for_data(spec["model"], data, **spec["kwargs"])
    info = {"training": train(model, data), "n_samples": 512}
    return model, MeasurementSet("train", 512, 512, seed=0).batches(data), info


def build_problem(name: str, data) -> dict:
    """The network's HessianOperator (eval mode) and its ground truth: top-5 eigenvalues, and tr(H) if affordable."""
    spec = PROBLEMS[name]
    dtype = spec.get("dtype", torch.float64)
    model, batches, info = network(name, spec, data)
    hessian = HessianOperator(Objective(model, batches, dtype=dtype, device="cpu"))
    problem = {
        "name": name,
        "model": model,
        "batches": batches,
        "n": hessian.shape[0],
        "reduced": spec.get("reduced", False),
        "info": {
            "model": spec["model"],
            "kwargs": spec["kwargs"],
            "n_params": hessian.shape[0],
            "dtype": str(dtype),
            "mode": "eval",
            "hvp_method": hessian.objective.hvp_method,
            **info,
        },
    }
    start = time.perf_counter()
    if spec["truth"] == "dense":
        h = dense_hessian(hessian, spec["chunk"])
        asymmetry = float(np.abs(h - h.T).max() / np.abs(h).max())
        h = (h + h.T) / 2
        eigenvalues = np.linalg.eigvalsh(h)[::-1]
        # the methods run on whichever is cheaper per matvec: the dense matrix (small n) or exact HVPs
        op = DenseOperator(torch.from_numpy(h)) if problem["n"] <= DENSE_MATVEC_MAX_N else hessian
        problem.update(op=op, top=eigenvalues[:K], trace=float(np.trace(h)))
        problem["info"].update(
            reference="dense Hessian (n HVPs) + numpy eigh",
            asymmetry=asymmetry,
            top10=eigenvalues[:10],
            smallest=eigenvalues[-1],
            operator=f"{type(op).__name__} (the same for every method)",
        )
    else:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        ref = lanczos(hessian, 10, tol=tol, max_matvecs=400, stop="residual")
        problem.update(op=hessian, top=ref.values[:K])
        problem["info"].update(
            reference=f"lanczos k=10, tol {tol:g}, stop='residual' (converged={ref.converged}, {ref.n_matvecs} HVPs)",
            top10=ref.values,
            operator="HessianOperator (exact HVPs)",
        )
        if dtype == torch.float64:
            arpack = spla.eigsh(hessian.to_scipy(), k=K, which="LA", tol=1e-10, v0=np.ones(problem["n"]))[0][::-1]
            problem["info"]["eigsh_tol1e-10_max_rel_diff"] = float(np.max(np.abs(arpack - problem["top"]) / problem["top"]))
        if spec["truth"] == "diagonal":
            problem["trace"] = exact_trace(hessian, spec["chunk"])
    if "trace" in problem:
        problem["info"]["trace"] = problem["trace"]
    problem["info"]["reference_seconds"] = time.perf_counter() - start
    print(f"\n{name}: n = {problem['n']}, {info['training']}, reference in {time.perf_counter() - start:.0f} s", flush=True)
    return problem


def exact_trace(op: LinearOperator, chunk: int) -> float:
    """tr(H) = Σ_i e_iᵀHe_i from n HVPs, `chunk` at a time, without storing H."""
    n, total = op.shape[0], 0.0
    for i in range(0, n, chunk):
        coordinates = torch.arange(i, min(i + chunk, n))
        block = torch.zeros(len(coordinates), n, dtype=op.dtype)  # row j: e_(i+j)
        block[torch.arange(len(coordinates)), coordinates] = 1
        total += float(op.products(block)[torch.arange(len(coordinates)), coordinates].sum())
    return total


def synthetic_problem(n: int = 500, seed: int = 0) -> dict:
    """A dense matrix with a network-like spectrum: 10 large outliers over a bulk of small, mostly positive values."""
    rng = np.random.default_rng(seed)
    outliers = np.sort(rng.uniform(5, 50, 10))[::-1]
    bulk = np.where(rng.random(n - 10) < 0.8, np.abs(rng.normal(0, 0.5, n - 10)), -np.abs(rng.normal(0, 0.2, n - 10)))
    eigenvalues = np.concatenate([outliers, bulk])
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (q * eigenvalues) @ q.T
    a = (a + a.T) / 2
    return {
        "name": "synthetic",
        "op": DenseOperator(torch.from_numpy(a)),
        "n": n,
        "trace": float(np.trace(a)),
        "shapes": [(n,)],
        "info": {
            "n": n,
            "outliers": outliers,
            "bulk_sum": float(bulk.sum()),
            "trace": float(np.trace(a)),
            "frobenius": float(np.linalg.norm(eigenvalues)),
        },
    }


# ----------------------------------------------------------------------------- helpers


class Replay(LinearOperator):
    """Memoizes a deterministic run's matvecs, so re-running it with a larger budget only pays for the new ones.

    Call i of a run returns the cached product when its input equals the cached input i
    (torch.equal); `rewind()` starts a new run. `n_real` counts the HVPs actually computed.
    """

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.cache, self.position, self.n_real = op, [], 0, 0

    def rewind(self) -> Replay:
        self.position, self.n_matvecs = 0, 0
        return self

    def products(self, V: torch.Tensor) -> torch.Tensor:
        out = []
        for v in V:
            i, self.position = self.position, self.position + 1
            if i < len(self.cache) and torch.equal(self.cache[i][0], v):
                out.append(self.cache[i][1])
                continue
            del self.cache[i:]
            product = self.op.matvec(v.clone())
            self.cache.append((v.clone(), product))
            self.n_real += 1
            out.append(product)
        self.n_matvecs += V.shape[0]
        return torch.stack(out)


def errors(values, reference: np.ndarray) -> tuple[float, float]:
    """Max relative error over λ1 and over λ1..λ5 of the sorted (descending) estimates (inf if fewer than 5)."""
    values = np.sort(np.asarray(values, dtype=float))[::-1][:K]
    rel = np.abs(values - reference[: len(values)]) / np.abs(reference[: len(values)])
    return float(rel[0]), float(rel.max()) if len(values) == K else float("inf")


def ghosts(values, reference: np.ndarray) -> int:
    """Estimates within 1e-3 of λ1 beyond those the true spectrum has there: spurious copies of λ1."""
    near = lambda v: int(np.sum(np.abs(np.asarray(v, dtype=float) - reference[0]) <= TOL * abs(reference[0])))  # noqa: E731
    return max(0, near(values) - near(reference))


def run_record(values, hvps: int, reference: np.ndarray, **extra) -> dict:
    err1, err5 = errors(values, reference)
    return {
        "hvps": int(hvps),
        "err_l1": err1,
        "err_l1_5": err5,
        "ghosts": ghosts(values, reference),
        "values": np.sort(np.asarray(values, dtype=float))[::-1],
        **extra,
    }


def first_within(run, reference: np.ndarray, start: int = 1, stop: int = SWEEP) -> dict:
    """Oracle: the smallest budget m whose estimates (run(m), min(m, 5) values) reach 1e-3 on λ1 and on λ1..λ5."""
    found = {"oracle_l1": None, "oracle_l1_5": None}
    for m in range(start, stop + 1):
        err1, err5 = errors(run(m), reference)
        if found["oracle_l1"] is None and err1 <= TOL:
            found["oracle_l1"] = m
        if err5 <= TOL:
            found["oracle_l1_5"] = m
            found["oracle_l1"] = found["oracle_l1"] or m
            break
    return found


def flat(tensors, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).to(dtype)


def unflat(v: torch.Tensor, shapes) -> list[torch.Tensor]:
    sizes = [int(np.prod(s)) for s in shapes]
    return [part.reshape(s) for part, s in zip(torch.split(v, sizes), shapes)]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """PyHessian draws its probes with the default dtype; make it the operator's."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def pyhessian_on(op: LinearOperator | None):
    """PyHessian with its hessian_vector_product counted and, if `op` is given, replaced by op's matvec
    (otherwise it runs end to end on a float64 model)."""
    module = importlib.import_module("pyhessian.hessian")  # the package re-exports the class under this name
    original = module.hessian_vector_product
    counter = {"hvps": 0}

    def hvp(grads, params, v):
        counter["hvps"] += 1
        if op is None:
            return original(grads, params, v)
        return unflat(op.matvec(flat(v, op.dtype)), [p.shape for p in params])

    module.hessian_vector_product = hvp
    try:
        with default_dtype(torch.float64 if op is None else op.dtype):
            yield counter
    finally:
        module.hessian_vector_product = original


def pyhessian_shell(shapes, dtype: torch.dtype):
    """A pyhessian.hessian object without a model graph: only its `params` shapes are used once the HVP is patched."""
    module = importlib.import_module("pyhessian.hessian")
    shell = object.__new__(module.hessian)
    shell.model, shell.full_dataset, shell.device, shell.gradsH = torch.nn.Module(), False, "cpu", None
    shell.params = [torch.zeros(s, dtype=dtype) for s in shapes]
    return shell


def param_shapes(problem: dict):
    return problem.get("shapes") or [p.shape for p in problem["model"].parameters()]


# ----------------------------------------------------------------------------- (a) eigenvalues


def eig_landscape(problem: dict, seed: int) -> dict:
    replay = Replay(problem["op"])
    ref = problem["top"]
    out = {}
    # today's certified rule beside the two cheaper, uncertified ones, and in a bounded basis (2k + 10 vectors)
    for label in (*STOPS, "bounded"):
        for k in (K, 1):
            bounded = {"stop": "certified", "max_vectors": 2 * k + 10} if label == "bounded" else {"stop": label}
            r = lanczos(replay.rewind(), k, tol=TOL, seed=seed, max_matvecs=SWEEP, **bounded)
            out[f"lanczos-{label}" + ("" if k == K else " k=1")] = run_record(
                r.values,
                r.n_matvecs,
                ref,
                converged=r.converged,
                certified=r.certified,
                outside_bound=int(np.sum(np.abs(r.values - ref[:k]) > r.error_bounds * (1 + 1e-9))),
                max_error_bound=float(np.max(r.error_bounds / np.abs(r.values))),
                max_residual=float(np.max(r.residuals / np.abs(r.values))),
                restarts=r.restarts,
                stored_vectors=r.stored_vectors,
            )
    oracle = first_within(lambda m: lanczos(replay.rewind(), min(K, m), tol=0.0, seed=seed, max_matvecs=m).values, ref)
    for stop in (*STOPS, "bounded"):
        out[f"lanczos-{stop}"].update(oracle)
    if not problem["reduced"]:
        before = problem["op"].n_matvecs
        r = power_iteration(problem["op"], K, tol=TOL, max_matvecs=100 * K, seed=seed)
        out["power_iteration"] = run_record(r.values, problem["op"].n_matvecs - before, ref, converged=r.converged)
    return out


def eig_pyhessian(problem: dict, seed: int) -> dict:
    """PyHessian's eigenvalues() (power iteration + deflation, maxIter=100 per eigenvalue) on our operator."""
    with pyhessian_on(problem["op"]) as counter:
        torch.manual_seed(seed)
        values, _ = pyhessian_shell(param_shapes(problem), problem["op"].dtype).eigenvalues(maxIter=100, tol=TOL, top_n=K)
    record = run_record(values, counter["hvps"], problem["top"])
    if not problem["reduced"]:
        record.update(oracle_power(problem, seed))
    return record


def oracle_power(problem: dict, seed: int) -> dict:
    """PyHessian's update (normalize Hv, orthonormalize against found vectors) stopped when the Rayleigh
    quotient of the current eigenvalue is within 1e-3 of the reference: the HVPs a perfect stopping rule needs."""
    op, ref, shapes = problem["op"], problem["top"], param_shapes(problem)
    with default_dtype(op.dtype):
        torch.manual_seed(seed)
        found, hvps, reached, first = [], 0, True, None
        for i in range(K):
            v = flat([torch.randn(s) for s in shapes], op.dtype)
            v = v / v.norm()
            for _ in range(POWER_CAP):
                for u in found:
                    v = v - (u @ v) * u
                v = v / v.norm()
                hv = op.matvec(v)
                hvps += 1
                theta = float(v @ hv)
                if abs(theta - ref[i]) <= TOL * abs(ref[i]):
                    break
                v = hv / hv.norm()
            else:
                reached = False
            first = hvps if first is None else first
            found.append(v)
    return {"oracle_l1": first, "oracle_l1_5": hvps if reached else None, "oracle_capped_at": None if reached else POWER_CAP * K}


def eig_eigenthings(problem: dict, seed: int) -> dict:
    """hessian-eigenthings' lanczos on our operator (a LambdaOperator). It runs a fixed max_iter (default 2k)
    and only flags convergence (residual < tol·|λ|), so the self-certified count is the smallest max_iter
    whose flags are all set, found by sweeping; reorthogonalization on, as its docs advise."""
    from hessian_eigenthings import LambdaOperator
    from hessian_eigenthings import lanczos as he_lanczos

    ref, replay = problem["top"], Replay(problem["op"])
    peer = LambdaOperator(lambda v: replay.matvec(v), problem["n"], dtype=replay.dtype)

    def run(m, **kwargs):
        replay.rewind()
        return he_lanczos(peer, k=min(K, m), max_iter=m, tol=TOL, which="LA", seed=seed, **kwargs)

    default = run(2 * K)
    out = {
        "default (max_iter=2k)": run_record(
            default.eigenvalues.numpy(), replay.n_matvecs, ref, converged=bool(default.converged.all())
        )
    }
    certified = None
    for m in range(K, SWEEP + 1):  # its converged flags are only meaningful once it returns all k values
        r = run(m, reorthogonalize=True)
        if bool(r.converged.all()):
            certified = run_record(r.eigenvalues.numpy(), m, ref, converged=True)
            break
    out["self-certified (sweep max_iter)"] = certified or {"hvps": None}
    out["self-certified (sweep max_iter)"].update(first_within(lambda m: run(m, reorthogonalize=True).eigenvalues.numpy(), ref))
    if not problem["reduced"]:
        long = run(80)  # its default for max_iter > 50: no reorthogonalization
        out["max_iter=80, default reorth (off)"] = run_record(long.eigenvalues.numpy(), 80, ref)
    return out


def eig_eigsh(problem: dict, seed: int) -> dict:
    op = problem["op"]
    before = op.n_matvecs
    v0 = np.random.default_rng(seed).standard_normal(problem["n"])
    values = spla.eigsh(op.to_scipy(), k=K, which="LA", tol=TOL, v0=v0, return_eigenvectors=False)
    return run_record(values, op.n_matvecs - before, problem["top"])


def end_to_end(problem: dict) -> dict:
    """PyHessian and hessian-eigenthings on the model itself (seed 0), against the same-operator runs."""
    from hessian_eigenthings import HessianOperator as HEOperator
    from hessian_eigenthings import lanczos as he_lanczos
    from hessian_eigenthings import supervised_loss
    from pyhessian import hessian

    model = problem["model"].double().eval()
    x, y = problem["batches"][0]
    x = x.double()
    with pyhessian_on(None) as counter:
        torch.manual_seed(0)
        values, _ = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False).eigenvalues(
            maxIter=100, tol=TOL, top_n=K
        )
    out = {"pyhessian": run_record(values, counter["hvps"], problem["top"])}
    peer = HEOperator(model, [(x, y)], supervised_loss(torch.nn.CrossEntropyLoss()))
    r = he_lanczos(peer, k=K, max_iter=20, tol=TOL, which="LA", seed=0, reorthogonalize=True)
    out["eigenthings max_iter=20"] = run_record(r.eigenvalues.detach().numpy(), 20, problem["top"])
    problem["model"].float()
    return out


def eigen_benchmark(problem: dict) -> dict:
    """Every method over the seeds. A "reduced" problem (slow HVPs) skips power iteration (ours), the oracle
    power iteration, the ghost run and the end-to-end runs, and runs PyHessian and eigsh for seed 0 only."""
    per_seed: dict[str, list] = {}
    reduced = problem["reduced"]
    for seed in EIG_SEEDS:
        runs = eig_landscape(problem, seed)
        for label, record in eig_eigenthings(problem, seed).items():
            runs[f"eigenthings lanczos {label}"] = record
        if not reduced or seed == 0:
            runs["pyhessian eigenvalues()"] = eig_pyhessian(problem, seed)
            runs["scipy eigsh (ARPACK)"] = eig_eigsh(problem, seed)
        for label, record in runs.items():
            per_seed.setdefault(label, []).append(record)
    return {
        "reference_top5": problem["top"],
        "methods": {label: summarize_eig(rs) for label, rs in per_seed.items()},
        "end_to_end_seed0": {} if reduced else end_to_end(problem),
    }


def summarize_eig(records: list[dict]) -> dict:
    """Means and maxima over seeds, keeping the per-seed records."""

    def stat(key, fn):
        values = [r.get(key) for r in records]
        return None if any(v is None for v in values) else float(fn(values))

    return {
        "hvps_mean": stat("hvps", np.mean),
        "err_l1_max": stat("err_l1", np.max),
        "err_l1_5_max": stat("err_l1_5", np.max),
        "oracle_l1_mean": stat("oracle_l1", np.mean),
        "oracle_l1_5_mean": stat("oracle_l1_5", np.mean),
        "ghosts_max": stat("ghosts", np.max),
        "outside_bound_total": None if records[0].get("outside_bound") is None else sum(r["outside_bound"] for r in records),
        "certified_runs": sum(bool(r.get("certified")) for r in records),
        "stored_vectors_max": max((r.get("stored_vectors") or 0 for r in records), default=0) or None,
        "oracle_capped_at": max((r.get("oracle_capped_at") or 0 for r in records), default=0) or None,
        "n_seeds": len(records),
        "per_seed": records,
    }


# ----------------------------------------------------------------------------- (b) trace


def curvlinops_view(op: LinearOperator):
    """Our operator as a curvlinops PyTorchLinearOperator (curvlinops is a benchmark-only import)."""
    from curvlinops._torch_base import PyTorchLinearOperator

    class View(PyTorchLinearOperator):
        SELF_ADJOINT = True
        device, dtype = op.device, op.dtype

        def _matmat(self, X):  # curvlinops hands columns (n, k): its convention met here, as scipy's in to_scipy
            return [op.products(X[0].T).T]

    return View([(op.shape[0],)], [(op.shape[0],)])


def trace_methods(problem: dict) -> dict:
    """name → f(budget, seed) → estimate; each call's matvecs are counted on the operator."""
    import curvlinops
    from hessian_eigenthings import LambdaOperator, hutch_plus_plus
    from hessian_eigenthings import hutchinson as he_hutchinson

    op = problem["op"]
    view = curvlinops_view(op)
    peer = LambdaOperator(lambda v: op.matvec(v), problem["n"], dtype=op.dtype)

    def seeded(fn):
        def call(m, seed):
            torch.manual_seed(seed)
            return float(fn(m, seed))

        return call

    return {
        "landscape hutchinson": lambda m, s: hutchinson(op, m, seed=s).estimate,
        "landscape hutchpp": lambda m, s: hutchpp(op, m, seed=s).estimate,
        "landscape xtrace": lambda m, s: xtrace(op, m, seed=s).estimate,
        "curvlinops hutchinson_trace": seeded(lambda m, s: curvlinops.hutchinson_trace(view, m)),
        "curvlinops hutchpp_trace": seeded(lambda m, s: curvlinops.hutchpp_trace(view, 3 * (m // 3))),
        "curvlinops xtrace": seeded(lambda m, s: curvlinops.xtrace(view, 2 * (m // 2))),
        "eigenthings hutchinson": lambda m, s: he_hutchinson(peer, num_samples=m, seed=s).estimate,
        "eigenthings hutch_plus_plus": lambda m, s: hutch_plus_plus(peer, num_matvecs=m, seed=s).estimate,
    }


def pyhessian_traces(problem: dict, seed: int) -> dict[int, float]:
    """PyHessian's trace(maxIter=100, tol=0) on our operator: its running mean after 10 / 30 / 100 HVPs."""
    with pyhessian_on(problem["op"]) as counter:
        torch.manual_seed(seed)
        samples = pyhessian_shell(param_shapes(problem), problem["op"].dtype).trace(maxIter=max(BUDGETS), tol=0.0)
    assert counter["hvps"] == len(samples) == max(BUDGETS)
    return {m: float(np.mean(samples[:m])) for m in BUDGETS}


def trace_benchmark(problem: dict, budgets=BUDGETS) -> dict:
    """Relative error of every estimator at each budget over TRACE_SEEDS: mean (bias), RMS, std, bias z-score."""
    exact, op = problem["trace"], problem["op"]
    estimates: dict[str, dict[int, list]] = {}
    matvecs: dict[str, dict[int, list]] = {}
    for name, method in trace_methods(problem).items():
        for m in budgets:
            for seed in TRACE_SEEDS:
                before = op.n_matvecs
                estimates.setdefault(name, {}).setdefault(m, []).append(method(m, seed))
                matvecs.setdefault(name, {}).setdefault(m, []).append(op.n_matvecs - before)
    for seed in TRACE_SEEDS:
        values = pyhessian_traces(problem, seed)
        for m in budgets:
            estimates.setdefault("pyhessian trace", {}).setdefault(m, []).append(values[m])
            matvecs.setdefault("pyhessian trace", {}).setdefault(m, []).append(m)
    table = {}
    for name in estimates:
        for m in budgets:
            rel = (np.array(estimates[name][m]) - exact) / abs(exact)
            table.setdefault(name, {})[str(m)] = {
                "matvecs_mean": float(np.mean(matvecs[name][m])),
                "mean_rel_error": float(rel.mean()),
                "rms_rel_error": float(np.sqrt(np.mean(rel**2))),
                "std_rel_error": float(rel.std(ddof=1)),
                "bias_z": float(rel.mean() / (rel.std(ddof=1) / np.sqrt(len(rel)))),  # mean / its standard error
                "max_abs_rel_error": float(np.abs(rel).max()),
            }
    return {"exact_trace": exact, "n_seeds": len(TRACE_SEEDS), "methods": table}


# ----------------------------------------------------------------------------- report


def print_eigen(name: str, result: dict) -> None:
    print(f"\n== eigenvalues: {name}  λ1..λ5 = {np.round(result['reference_top5'], 4).tolist()}")
    print(f"{'method':52s} {'HVPs':>6s} {'err λ1':>9s} {'err λ1-5':>9s} {'oracle λ1':>9s} {'oracle λ1-5':>11s} {'ghosts':>6s}")
    for label, s in result["methods"].items():
        fmt = lambda v, f: ("—" if v is None else format(v, f)).rjust(int(f.split(".")[0]))  # noqa: E731
        oracle5 = f">{s['oracle_capped_at']}".rjust(11) if s["oracle_capped_at"] else fmt(s["oracle_l1_5_mean"], "11.1f")
        print(
            f"{label:52s} {fmt(s['hvps_mean'], '6.1f')} {fmt(s['err_l1_max'], '9.1e')} "
            f"{fmt(s['err_l1_5_max'], '9.1e')} {fmt(s['oracle_l1_mean'], '9.1f')} "
            f"{oracle5} {fmt(s['ghosts_max'], '6.0f')}" + ("" if s["n_seeds"] == len(EIG_SEEDS) else f"  ({s['n_seeds']} seed)")
        )
    for label, r in result["end_to_end_seed0"].items():
        print(f"  end-to-end on the model, seed 0: {label}: {r['hvps']} HVPs, err λ1-5 {r['err_l1_5']:.1e}")


def print_trace(name: str, result: dict) -> None:
    print(
        f"\n== trace: {name}  exact tr(H) = {result['exact_trace']:.6g}   RMS relative error (mean relative error) "
        f"over {result['n_seeds']} seeds; * = |mean| > 3 standard errors"
    )
    budgets = list(next(iter(result["methods"].values())))
    print(f"{'method':30s}" + "".join(f"{'@' + b:>22s}" for b in budgets))
    for label, row in result["methods"].items():
        print(
            f"{label:30s}"
            + "".join(
                f"{row[b]['rms_rel_error']:>11.2e} ({row[b]['mean_rel_error']:+.1e})"
                + ("*" if abs(row[b]["bias_z"]) > 3 else " ")
                for b in budgets
            )
        )


HEADLINE = {
    "landscape lanczos stop=error": "lanczos-error",
    "landscape lanczos stop=residual": "lanczos-residual",
    "landscape lanczos stop=certified": "lanczos-certified",
    "  ... in 2k + 10 vectors (restarts)": "lanczos-bounded",
    "eigenthings lanczos (self-certified)": "eigenthings lanczos self-certified (sweep max_iter)",
    "pyhessian eigenvalues()": "pyhessian eigenvalues()",
    "landscape power_iteration": "power_iteration",
    "scipy eigsh": "scipy eigsh (ARPACK)",
}


def print_headline(results: dict) -> None:
    """One cell per method and problem: mean HVPs at its own stop [worst error on λ1..λ5] / oracle HVPs for λ1..λ5."""
    problems = list(results["eigenvalues"])
    print("\n== HVPs for λ1..λ5 at tol 1e-3: own stop [max rel. error] / oracle (fewest HVPs within 1e-3)")
    print(f"{'':38s}" + "".join(f"{p:>26s}" for p in problems))
    for label, key in HEADLINE.items():
        cells = []
        for p in problems:
            s = results["eigenvalues"][p]["methods"].get(key)
            if s is None:
                cells.append("—")
                continue
            oracle = (
                f">{s['oracle_capped_at']}"
                if s["oracle_capped_at"]
                else "—"
                if s["oracle_l1_5_mean"] is None
                else f"{s['oracle_l1_5_mean']:.1f}"
            )
            cells.append(f"{s['hvps_mean']:.1f} [{s['err_l1_5_max']:.0e}] / {oracle}")
        print(f"{label:38s}" + "".join(f"{c:>26s}" for c in cells))
    print("\n== HVPs for λ1 alone (k = 1) at tol 1e-3 [max rel. error; values outside their stated bound]")
    print(f"{'':38s}" + "".join(f"{p:>26s}" for p in problems))
    for stop in (*STOPS, "bounded"):
        cells = []
        for p in problems:
            s = results["eigenvalues"][p]["methods"][f"lanczos-{stop} k=1"]
            cells.append(f"{s['hvps_mean']:.1f} [{s['err_l1_max']:.0e}; {s['outside_bound_total']}]")
        print(f"{'landscape lanczos stop=' + stop:38s}" + "".join(f"{c:>26s}" for c in cells))
    print(f"\n== trace, RMS relative error at {max(BUDGETS)} matvecs over {len(TRACE_SEEDS)} seeds")
    traces = list(results["trace"])
    print(f"{'':30s}" + "".join(f"{p:>15s}" for p in traces))
    for label in next(iter(results["trace"].values()))["methods"]:
        print(
            f"{label:30s}"
            + "".join(f"{results['trace'][p]['methods'][label][str(max(BUDGETS))]['rms_rel_error']:>15.2e}" for p in traces)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads oversubscribe: HVPs and training ran 10-100x slower
    start = time.perf_counter()
    data = load_data("digits")
    results = {
        "problems": {},
        "eigenvalues": {},
        "trace": {},
        "not_run": NOT_RUN,
        "settings": {
            "k": K,
            "tol": TOL,
            "eig_seeds": len(EIG_SEEDS),
            "trace_seeds": len(TRACE_SEEDS),
            "budgets": BUDGETS,
            "sweep": SWEEP,
            "power_oracle_cap_per_eigenvalue": POWER_CAP,
        },
    }
    for name in args.problems.split(","):
        t = time.perf_counter()
        problem = build_problem(name, data)
        results["problems"][name] = problem["info"]
        results["eigenvalues"][name] = eigen_benchmark(problem)
        print_eigen(name, results["eigenvalues"][name])
        if "trace" in problem:
            results["trace"][name] = trace_benchmark(problem)
            print_trace(name, results["trace"][name])
        results["problems"][name]["seconds"] = time.perf_counter() - t
        print(f"   ({name}: {time.perf_counter() - t:.0f} s)", flush=True)
    if not args.skip_synthetic:
        problem = synthetic_problem()
        results["problems"]["synthetic"] = problem["info"]
        results["trace"]["synthetic"] = trace_benchmark(problem)
        print_trace("synthetic (n=500, 10 outliers over a bulk)", results["trace"]["synthetic"])
    print_headline(results)
    results["seconds"] = time.perf_counter() - start
    print(f"\ntotal {results['seconds']:.0f} s; wrote", write_results("curvature", to_jsonable(results)))


if __name__ == "__main__":
    main()
