"""`landscape measure`: load each checkpoint, build its Objective, run the chosen estimators."""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch

from analysis.cli.key_values import parse_options
from analysis.cli.output import OptionNote, ResumeNote, print_json
from analysis.cli.results_file import ResultsFile
from analysis.cli.specs import MeasureSpec, MetricSpec, ObjectiveSpec
from analysis.report.checkpoint_table import CURVATURE_NAMES, as_per_layer, format_measurement
from landscape.curvature.blocks import GROUPINGS, parameter_blocks, per_layer
from landscape.curvature.density import slq_density
from landscape.curvature.spectrum import default_max_matvecs, default_max_vectors, lanczos, minimum_vectors
from landscape.curvature.trace import HUTCHINSON_BLOCK, hutchinson, hutchpp, trace_vectors, xtrace
from landscape.engine import distributed as ranks
from landscape.engine.finite_difference import FiniteDifferenceErrors
from landscape.engine.from_checkpoint import objective_from_checkpoint
from landscape.engine.gauss_newton import CURVATURES
from landscape.engine.inner import LOCAL
from landscape.engine.memory import InsufficientMemory, format_size, parse_size, peak_resident_bytes
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator, curvature_operator
from landscape.inputs.batches import resolve_loss
from landscape.inputs.checkpoints import load_checkpoint
from landscape.inputs.data import MeasurementSet
from landscape.inputs.precision import DTYPES, parse_dtype
from landscape.results import Result
from landscape.sharpness.balls import (
    DEFAULT_AVERAGE_RHO,
    DEFAULT_RHO,
    average_case,
    m_sharpness,
    worst_case,
)
from landscape.sharpness.box import METHODS as EPS_METHODS
from landscape.sharpness.box import epsilon_sharpness
from landscape.sharpness.perturb import expected_loss, sharpness_curve

# n-vectors a solver allocates beside the vectors it counts: Lanczos's product, its remainder and a second
# Gram–Schmidt pass; its check's recurrence (start, last two vectors, product, its projection) and the deflation's
# temporaries. Measured peaks: tests/test_solver_memory.py
SOLVER_TEMPORARIES = 8
TRACE_METHODS = {"xtrace": xtrace, "hutchpp": hutchpp, "hutchinson": hutchinson}


def run(args: argparse.Namespace) -> None:
    """`landscape measure`: every checkpoint's metrics, printed (or as JSON), saved as they finish with --out."""
    if getattr(args, "per_layer_figure", None) and not args.per_layer:
        raise ValueError("--per-layer-figure draws --per-layer results: pass --per-layer eig,trace too")
    results = measure_all(
        args.checkpoints, MeasureSpec.from_args(args), out=args.out, resume=args.resume, add_checkpoints=args.add_checkpoint
    )
    if args.per_layer_figure and ranks.is_main():
        from analysis.report.charts import plot_block_spectra, plot_per_layer, save

        labels = [f"{i}: {r['checkpoint']}" if len(results) > 1 else r["checkpoint"] for i, r in enumerate(results, 1)]
        found = {label: as_per_layer(r["per_layer"]) for label, r in zip(labels, results)}
        if any("density" in r.metrics for r in found.values()):  # one density panel per block, λ1 and trace above
            figure = plot_block_spectra(found, curvature=CURVATURE_NAMES[getattr(args, "curvature", "hessian")][0])
        else:
            figure = plot_per_layer(found)
        save(figure, args.per_layer_figure)
    if args.json:
        print_json(results)
    else:
        print("\n\n".join(format_measurement(r) for r in results))


def add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that measures a checkpoint."""
    O = ObjectiveSpec()  # the defaults
    group = parser.add_argument_group("checkpoint and measurement set")
    group.add_argument("--model", help="model for a bare state dict: registry name or module:factory")
    group.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="option of --model, e.g. hidden=(64,64)")
    group.add_argument(
        "--data",
        help="data spec (digits, mnist1d, cifar10:DIR, cifar100:DIR, npz:FILE, module:callable); default: the checkpoint's",
    )
    group.add_argument(
        "--trust-checkpoint", action="store_true", help="allow checkpoints holding arbitrary pickled objects (runs their code)"
    )
    group.add_argument(
        "--split", default=O.split, choices=["train", "test"], help="which split to measure on (default %(default)s)"
    )
    group.add_argument("--n-samples", type=int, default=None, help="seeded random subset of the split (default: all of it)")
    group.add_argument(
        "--batch-size", type=int, default=O.batch_size, help="batch size of the measurement set (default %(default)s)"
    )
    group.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="token sequences cut to their first N tokens (dict batches with input_ids): attention's memory grows "
        "with the square of the length",
    )
    group.add_argument("--seed", type=int, default=O.seed, help="seed of the measurement subset and of every random probe")
    group.add_argument(
        "--mode",
        default=O.mode,
        choices=["eval", "train"],
        help="BatchNorm running statistics (eval) or batch statistics (train)",
    )
    group.add_argument(
        "--loss",
        default=None,
        metavar="NAME|module:callable",
        help="cross-entropy (default; class labels, reads .logits), token-cross-entropy (causal language "
        "models: shifted labels, -100 ignored), mse, or module:callable (model output, batch) → "
        "(sum of per-item losses, number of items)",
    )
    group.add_argument(
        "--params",
        default=O.params,
        help="parameter selection: all, weights, no-bn, no-bn-bias, re:PATTERN, glob:PATTERN[,PATTERN] "
        "(e.g. glob:*.attn.*), module:TYPE[,TYPE] (e.g. module:Linear,Conv2d); parameters with "
        "requires_grad=False are never measured, so a LoRA model measures its adapters",
    )
    group.add_argument(
        "--dtype",
        default=O.dtype,
        choices=list(DTYPES),
        help="the model's precision; bfloat16 and float16 run the model's forward and backward only, the solvers "
        "stay float32 (measured errors: docs/how-to/precision.md) (default %(default)s)",
    )
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    group.add_argument(
        "--hvp",
        default=O.hvp,
        help="HVP path: auto (= reuse), reuse (gradient graphs kept for as many batches as --hvp-memory "
        "holds, the rest rebuilt per product), double-backward (least memory), linearize, fwd-rev, "
        "compiled (torch.compile, for GPUs), finite-difference (central differences of first-order gradients: "
        "approximate, each product with an error estimate; for models without a second derivative) "
        "(default %(default)s)",
    )
    group.add_argument(
        "--hvp-memory",
        default=None,
        metavar="SIZE",
        help="memory the kept gradient graphs may take, e.g. 8GiB (default: half the free memory)",
    )
    group.add_argument(
        "--no-hvp-check",
        action="store_true",
        help="skip the run-time check of the HVP path against double backward (two extra products, once)",
    )


def add_metric_arguments(
    parser: argparse.ArgumentParser, metrics: Iterable[str] | None = None, defaults: MetricSpec = MetricSpec()
) -> None:
    """The metric options shared by measure, compare, track and correlate; `metrics`: the names the command takes,
    `defaults`: its defaults (each command's in one place: measure's are MetricSpec's own)."""
    D = defaults
    group = parser.add_argument_group("metrics")
    group.add_argument(
        "--metrics",
        default=D.help_default("metrics"),
        help=f"comma list of {', '.join(metrics or METRICS)} (default %(default)s)",
    )
    parser.set_defaults(metric_choices=tuple(metrics or METRICS))
    group.add_argument(
        "--curvature",
        default=D.curvature,
        choices=list(CURVATURES),
        help="the matrix eig, trace and density measure: hessian (default), ggn (generalized Gauss-Newton "
        "JᵀH_ℓJ, positive semi-definite) or fisher (empirical Fisher (1/N)·Σ gᵢgᵢᵀ, gᵢ a sample's "
        "gradient within its batch); the other metrics ignore it (the sharpness curve's ½·tr(ΣH) stays the Hessian's)",
    )
    group.add_argument("--k", type=int, default=D.k, help="number of eigenvalues (default %(default)s)")
    group.add_argument(
        "--which", default=D.which, choices=["LA", "SA", "LM"], help="largest, smallest or largest-magnitude eigenvalues"
    )
    group.add_argument(
        "--tol", type=float, default=D.tol, help="relative Ritz residual tolerance of Lanczos (default %(default)s)"
    )
    group.add_argument(
        "--max-matvecs",
        type=int,
        default=D.max_matvecs,
        help="Lanczos budget of Hessian-vector products (default: max(300, 60·k), at most the parameter "
        "count); a run that spends it is marked not converged",
    )
    group.add_argument(
        "--max-vectors",
        type=int,
        default=D.max_vectors,
        help="parameter-sized vectors Lanczos may hold at once (default: every one it can use where they fit in half "
        "the memory the HVPs leave free, else as many as fit, at least 2·k + 10); fewer make it restart (thick "
        "restarts, certified the same way), and the table says how often",
    )
    group.add_argument(
        "--trace-method",
        default=D.trace_method,
        choices=list(TRACE_METHODS),
        help="xtrace (default: lowest error per matvec in benchmarks/curvature.py), hutchpp, hutchinson",
    )
    group.add_argument(
        "--probes",
        type=int,
        default=D.probes,
        help="matvec budget of the trace estimate, and of sharpness-curve's second-order prediction (default %(default)s)",
    )
    group.add_argument("--density-runs", type=int, default=D.density_runs, help="SLQ runs (default %(default)s)")
    group.add_argument(
        "--density-steps", type=int, default=D.density_steps, help="Lanczos steps per SLQ run (default %(default)s)"
    )
    group.add_argument(
        "--radius",
        default=D.help_default("radius"),
        help="weight-noise radii a (default %(default)s); expected-loss takes the largest",
    )
    group.add_argument("--distribution", default=D.distribution, choices=["uniform", "gaussian"], help="U[-a,a] or N(0,a²) noise")
    group.add_argument(
        "--scale",
        default=D.scale,
        choices=["absolute", "weight", "filter"],
        help="noise per coordinate (absolute), ∝|w| (weight) or per filter ∝‖w_filter‖ (filter, AdaSmoothOut)",
    )
    group.add_argument(
        "--noise-samples", type=int, default=D.noise_samples, help="perturbed forward passes per radius (default %(default)s)"
    )
    group.add_argument(
        "--bn-recalibration",
        type=int,
        default=D.bn_recalibration,
        metavar="K",
        help="re-estimate BN statistics from K batches at each perturbed point",
    )
    group.add_argument("--eps", type=float, default=D.eps, help="box size of Keskar's ε-sharpness (default %(default)s)")
    group.add_argument(
        "--subspace-dim", type=int, default=D.subspace_dim, help="ε-sharpness in a random p-dim subspace (default: full space)"
    )
    group.add_argument(
        "--restarts",
        type=int,
        default=D.restarts,
        help="ε-sharpness random starts besides z = 0 and the corner b·sign(∇L) (default %(default)s)",
    )
    group.add_argument(
        "--eps-method",
        default=D.eps_method,
        choices=list(EPS_METHODS),
        help="ε-sharpness maximizer: sign-ascent (default: projected sign ascent, higher φ per pass than L-BFGS-B "
        "on mnist1d MLPs, benchmarks/epsilon_sharpness.py) or lbfgsb (Keskar's)",
    )
    group.add_argument(
        "--eps-iters", type=int, default=D.eps_iters, help="ε-sharpness ascent iterations per start (default %(default)s)"
    )
    group.add_argument(
        "--rho",
        type=float,
        default=D.rho,
        help="radius ρ of worst-case, m- and average-case sharpness (default per measure: worst case "
        f"{_radii_help(DEFAULT_RHO)}: SAM's 0.05 (Foret et al. 2021), ASAM's 0.5 on CIFAR-10 (Kwon et al. "
        "2021), ℓ∞ within Andriushchenko et al. (2023)'s grids; average case "
        f"{_radii_help(DEFAULT_AVERAGE_RHO)})",
    )
    group.add_argument(
        "--p",
        default=D.p,
        help="ball of worst-case, m- and average-case sharpness: 2 (ℓ2, average case "
        "δ ~ N(0, ρ²I)) or inf (ℓ∞ box, average case U[−ρ, ρ]^d) (default %(default)s)",
    )
    group.add_argument(
        "--m",
        type=int,
        default=D.m,
        help="samples per batch of m-sharpness (default %(default)s, Andriushchenko et al.'s); each batch's own "
        "maximum is averaged; samples after the last whole batch are left out",
    )
    group.add_argument(
        "--ascent-steps",
        type=int,
        default=D.ascent_steps,
        help="APGD iterations per start of worst-case and m-sharpness (default %(default)s, as Andriushchenko et al.)",
    )
    group.add_argument(
        "--ascent-restarts",
        type=int,
        default=D.ascent_restarts,
        help="worst-case and m-sharpness random starts besides the gradient direction (default %(default)s)",
    )
    group.add_argument(
        "--eta",
        type=float,
        default=D.eta,
        help="adaptive ball T = |w| + η (default %(default)s, as Andriushchenko et al.; ASAM uses 0.01)",
    )


def _radii_help(radii: dict) -> str:
    names = {("2", False): "ℓ2", ("2", True): "adaptive ℓ2", ("inf", False): "ℓ∞", ("inf", True): "adaptive ℓ∞"}
    return ", ".join(f"{names[key]} {rho:g}" for key, rho in radii.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`landscape measure`: the checkpoints, the objective and metric options, where results are saved as they
    finish, and resuming them."""
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT")
    add_objective_arguments(parser)
    parser.add_argument(
        "--shard",
        action="store_true",
        help="under torchrun: shard the parameters, their gradients and the solvers' vectors over the ranks "
        "(FSDP2 fully_shard), for a model one device cannot hold; HVPs by finite differences; metrics eig, "
        "trace and density (docs/how-to/sharded.md)",
    )
    parser.add_argument(
        "--shard-replicas",
        type=int,
        default=ObjectiveSpec.shard_replicas,
        metavar="R",
        help="with --shard: R data-parallel replicas, each sharded over WORLD_SIZE/R ranks (FSDP2 on an R × WORLD_SIZE/R "
        "mesh) (default %(default)s)",
    )
    parser.add_argument(
        "--shard-probes",
        default=ObjectiveSpec.shard_probes,
        choices=["whole", "pieces"],
        help="with --shard: draw each random probe whole on every rank and keep the rank's piece (one process's "
        "numbers), or draw only the pieces (no rank ever holds a whole vector; other, equally distributed "
        "probes) (default %(default)s)",
    )
    add_metric_arguments(parser)
    group = parser.add_argument_group("saving and resuming")
    group.add_argument(
        "--out",
        metavar="FILE.json",
        help="write the results to this JSON file as each metric finishes (atomically), so Ctrl-C or a "
        "killed run keeps every finished metric (default: no file, results on stdout only)",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue --out FILE.json: keep its finished metrics if the checkpoints' SHA-256 and every "
        "measurement option match (refused otherwise, naming the option), compute the rest",
    )
    group.add_argument(
        "--add-checkpoint",
        action="store_true",
        help="with --resume: add checkpoints that --out FILE.json holds no results of yet (without it a file "
        "written for other checkpoints is refused, so results of different checkpoints never mix unasked)",
    )
    group = parser.add_argument_group("per-layer curvature")
    group.add_argument(
        "--per-layer",
        metavar="eig,trace,density",
        default=None,
        help="also measure each block of parameters (--per-layer-by): eig = λ1 of the block's diagonal Hessian "
        "block (certified Lanczos on the restricted operator, --tol, --max-matvecs per block), trace = its trace "
        "(one --trace-method run of --probes matvecs, probes split by block), density = its SLQ spectral density "
        "(--density-runs, --density-steps per block); saved as per_layer",
    )
    group.add_argument(
        "--per-layer-by",
        default=MetricSpec().per_layer_by,
        choices=GROUPINGS,
        help="the --per-layer blocks: module = one per module that owns parameters directly (fc1: fc1.weight and "
        "fc1.bias); role = one per role across all layers, for a transformer embedding, attention, mlp, norm and "
        "head (where untied), for a CNN conv, norm and linear (default %(default)s)",
    )
    group.add_argument(
        "--per-layer-figure",
        metavar="FILE.png",
        default=None,
        help="with --per-layer: a bar chart of each block's λ1 and trace, the checkpoints side by side; with "
        "density among them, one panel per block with its spectral density, λ1 and trace",
    )


def build_objective(path: str, spec: ObjectiveSpec, *, distributed: bool = False, metrics: MetricSpec | None = None) -> Objective:
    """The Objective for one checkpoint (data-parallel over ranks if `distributed`); `metrics`' options that must fit
    the model (--k, --subspace-dim, --m) are checked against it."""
    checkpoint = load_checkpoint(path, trust=spec.trust_checkpoint)
    measurement = MeasurementSet(spec.split, spec.n_samples, spec.batch_size, spec.seed, spec.max_length)
    objective = objective_from_checkpoint(
        checkpoint,
        data=spec.data,
        model=spec.model,
        model_kwargs=parse_options(list(spec.model_opt)),
        measurement=measurement,
        params=spec.params,
        mode=spec.mode,
        dtype=parse_dtype(spec.dtype),
        device=spec.device,
        hvp_method=spec.hvp,
        distributed=distributed,
        hvp_check=not spec.no_hvp_check,
        graph_memory_budget=parse_size(spec.hvp_memory) if spec.hvp_memory else None,
        loss=resolve_loss(spec.loss),
        sharded=spec.shard,
        replicas=spec.shard_replicas,
        probes=spec.shard_probes,
    )
    if metrics is not None:
        metrics.check_fits(spec.params, objective.n_params, objective.n_samples)
    return objective


def _operator(objective: Objective, spec: MetricSpec):
    """The matrix eig, trace and density measure (--curvature; the Hessian where the option is absent)."""
    return curvature_operator(objective, spec.curvature)


def _eig(objective: Objective, spec: MetricSpec) -> Result:
    """Lanczos; warm-started from the last top eigenvector when `spec.warm_start` holds a WarmStart (`landscape track`)."""
    warm = spec.warm_start
    run = warm.lanczos if warm is not None else lanczos
    op = _operator(objective, spec)
    return run(
        op,
        spec.k,
        which=spec.which,
        tol=spec.tol,
        max_matvecs=spec.max_matvecs,
        seed=spec.seed,
        progress=spec.progress,
        max_vectors=lanczos_vectors(objective, op.shape[0], op.dtype, spec, length=op.length),
    )


def lanczos_vectors(objective: Objective, n: int, dtype, spec: MetricSpec, length: int | None = None) -> int:
    """How many n-vectors Lanczos may hold (--max-vectors, or what the memory plan leaves free); one line if even
    the fewest it can restart in do not fit beside the HVPs' own peak. `length`: the entries of each vector this
    process holds (sharded: its rank's share; default all n)."""
    size = (length or n) * torch.finfo(dtype).bits // 8
    k = min(spec.k, n)
    budget = spec.max_matvecs or default_max_matvecs(n, k)
    free = _free_for_vectors(objective, size)
    # default_max_vectors sizes a vector by all n entries: the free bytes scaled to match a rank's share
    vectors = spec.max_vectors or default_max_vectors(n, k, budget, dtype, max(free, 0) * n // (length or n))
    fit = int(0.9 * free) // size
    advice = f"--max-vectors {fit} (more restarts)" if fit >= minimum_vectors(k) else "a smaller --k"
    _refuse_unless_fits(objective, "Lanczos", vectors, n, size, advice)
    return vectors


def _vector_bytes(op) -> int:
    """Bytes one solver vector of `op` takes in this process (sharded: this rank's entries)."""
    return op.length * torch.finfo(op.dtype).bits // 8


def _free_for_vectors(objective: Objective, size: int) -> int:
    """Bytes left for a solver's counted n-vectors (of `size` bytes): what the HVPs' predicted peak leaves free, less
    the solver's temporaries."""
    return _free_beside_hvps(objective) - SOLVER_TEMPORARIES * size


def _refuse_unless_fits(objective: Objective, solver: str, vectors: int, n: int, size: int, advice: str) -> None:
    """One line (InsufficientMemory) if `vectors` n-vectors of `solver` do not fit beside the HVPs' own peak."""
    free = _free_for_vectors(objective, size)
    if vectors * size <= free:
        return
    raise InsufficientMemory(
        f"not enough memory on {objective.device}: {solver} holds {vectors} vectors of {n:,} parameters "
        f"({format_size(vectors * size)}) beside the HVPs' {format_size(objective.memory_plan.predicted_peak_bytes)}, "
        f"and {format_size(max(free, 0))} is left; use {advice}, a smaller --batch-size or a larger device"
    )


def hutchinson_block(objective: Objective, n: int, size: int, probes: int) -> int:
    """Probes per block of Hutchinson's estimator: HUTCHINSON_BLOCK, or fewer where the memory plan leaves less (said
    in a note: the probes are drawn a block at a time, so they differ from the default blocks')."""
    _refuse_unless_fits(objective, "Hutchinson's estimator", trace_vectors("hutchinson", 1, n), n, size, "fewer parameters")
    fit = max(_free_for_vectors(objective, size), 0) // size
    block = max(min(HUTCHINSON_BLOCK, probes, fit // trace_vectors("hutchinson", 1, n)), 1)
    if block < min(HUTCHINSON_BLOCK, probes):
        warnings.warn(
            OptionNote(
                f"Hutchinson's estimator takes blocks of {block} probes, not {HUTCHINSON_BLOCK}, to fit in memory; its "
                "probes, drawn a block at a time, differ from a run with the default blocks"
            ),
            stacklevel=2,
        )
    return block


def _trace(objective: Objective, spec: MetricSpec) -> Result:
    """The trace estimate, refused in one line where its vectors do not fit (Hutchinson's takes smaller blocks)."""
    op = _operator(objective, spec)
    n, size = op.shape[0], _vector_bytes(op)
    method, probes = spec.trace_method, spec.probes
    options = {}
    if method == "hutchinson":
        options["block_size"] = hutchinson_block(objective, n, size, probes)
    else:
        fit = max(_free_for_vectors(objective, size), 0) // size
        fewer = next((p for p in range(probes, 3, -1) if trace_vectors(method, p, n) <= fit), None)
        advice = f"--probes {fewer}" if fewer else "--trace-method hutchinson"
        _refuse_unless_fits(objective, f"{method} with {probes} probes", trace_vectors(method, probes, n), n, size, advice)
    return TRACE_METHODS[method](
        op,
        probes,
        **options,
        seed=spec.seed,
        blocks=None if _sharded(objective) else objective.layout.slices(),  # a rank holds no whole parameter
        progress=spec.progress,
    )


def _sharded(objective: Objective) -> bool:
    """Whether each rank holds only pieces of the parameters (--shard)."""
    return getattr(objective, "inner", LOCAL).sharded


def _per_layer(objective: Objective, spec: MetricSpec) -> Result:
    """--per-layer: λ1, trace and density of each block (by module or by role) of the curvature
    (landscape.curvature.blocks)."""
    return per_layer(
        _operator(objective, spec),
        parameter_blocks(objective.model, objective.layout, spec.per_layer_by),
        list(spec.per_layer),
        tol=spec.tol,
        max_matvecs=spec.max_matvecs,
        trace=TRACE_METHODS[spec.trace_method],
        n_probes=spec.probes,
        density_runs=spec.density_runs,
        density_steps=spec.density_steps,
        free_bytes=_free_beside_hvps(objective),
        seed=spec.seed,
        progress=spec.progress,
        grouping=spec.per_layer_by,
    )


def _density(objective: Objective, spec: MetricSpec) -> Result:
    """SLQ, keeping every Lanczos vector only where they fit in half of what the memory plan leaves free."""
    return slq_density(
        _operator(objective, spec),
        n_runs=spec.density_runs,
        n_steps=spec.density_steps,
        seed=spec.seed,
        progress=spec.progress,
        free_bytes=_free_beside_hvps(objective),
    )


def process_memory(objective: Objective, metrics: dict) -> dict:
    """The process's peak memory as the plan predicts it (what it held when planning, the HVPs' predicted peak, the
    most vectors a solver held and its temporaries) beside the peak measured so far (VmHWM; on CUDA the allocator's)."""
    plan = objective.memory_plan
    size = objective.n_params * torch.finfo(objective.dtype).bits // 8
    vectors = max((_held_vectors(m, objective.n_params) for m in metrics.values() if isinstance(m, dict)), default=0)
    solver = vectors * size
    predicted = plan.resident_bytes + plan.predicted_peak_bytes + solver
    measured = peak_resident_bytes(objective.device)
    return {
        "resident_at_plan_bytes": plan.resident_bytes,
        "solver_vectors": vectors,
        "predicted_peak_bytes": predicted,
        "measured_peak_bytes": measured,
        "measured_over_predicted": measured / predicted if predicted else None,
    }


def _held_vectors(metric: dict, n: int) -> int:
    """The most n-vectors a measured metric's solver held, temporaries included: its own count and
    SOLVER_TEMPORARIES, or a trace estimator's count (from its method and products), which includes its own."""
    if metric.get("stored_vectors"):
        return metric["stored_vectors"] + SOLVER_TEMPORARIES
    if metric.get("method") in TRACE_METHODS and metric.get("n_matvecs"):
        return trace_vectors(metric["method"], metric["n_matvecs"], n)
    return 0


def _free_beside_hvps(objective: Objective) -> int:
    """Memory the HVPs' predicted peak leaves free (the memory plan), for the solvers' vectors."""
    plan = objective.memory_plan
    return max(plan.available_bytes - plan.predicted_peak_bytes, 0)


def _expected_loss(objective: Objective, spec: MetricSpec) -> Result:
    radii = list(spec.radius)
    radius = max(radii)
    if len(radii) > 1 and spec.radius != MetricSpec.radius:  # the default's use is in --radius's help
        warnings.warn(
            OptionNote(f"expected-loss is measured at the largest --radius, {radius:g} (sharpness-curve measures every radius)"),
            stacklevel=2,
        )
    return expected_loss(objective, radius, **_weight_noise(spec))


def _weight_noise(spec: MetricSpec) -> dict:
    """The options expected-loss and the sharpness curve share: the noise, its draws and BN recalibration."""
    return dict(
        distribution=spec.distribution,
        scale=spec.scale,
        n_samples=spec.noise_samples,
        seed=spec.seed,
        bn_recalibration=spec.bn_recalibration,
        progress=spec.progress,
    )


def _sharpness_curve(objective: Objective, spec: MetricSpec) -> Result:
    block = hutchinson_block(objective, objective.n_params, _vector_bytes(HessianOperator(objective)), spec.probes)
    return sharpness_curve(objective, list(spec.radius), n_probes=spec.probes, probe_block=block, **_weight_noise(spec))


def _eps_sharpness(objective: Objective, spec: MetricSpec) -> Result:
    return epsilon_sharpness(
        objective,
        spec.eps,
        subspace_dim=spec.subspace_dim,
        max_iter=spec.eps_iters,
        restarts=spec.restarts,
        seed=spec.seed,
        method=spec.eps_method,
        progress=spec.progress,
    )


def _ascent(spec: MetricSpec, adaptive: bool) -> dict:
    """The options worst-case and m-sharpness share: the ball, its adaptive scaling, and APGD's budget."""
    eta = spec.eta if adaptive else 0.0
    return dict(
        p=spec.p,
        adaptive=adaptive,
        eta=eta,
        steps=spec.ascent_steps,
        restarts=spec.ascent_restarts,
        seed=spec.seed,
        progress=spec.progress,
    )


def _worst_case(objective: Objective, spec: MetricSpec, *, adaptive: bool = False) -> Result:
    return worst_case(objective, spec.rho, **_ascent(spec, adaptive))


def _m_sharpness(objective: Objective, spec: MetricSpec, *, adaptive: bool = False) -> Result:
    return m_sharpness(objective, spec.m, spec.rho, **_ascent(spec, adaptive))


def _average_case(objective: Objective, spec: MetricSpec, *, adaptive: bool = False) -> Result:
    return average_case(
        objective, spec.rho, p=spec.p, adaptive=adaptive, n_samples=spec.noise_samples, seed=spec.seed, progress=spec.progress
    )


# the sharpness measures every comparing command takes (compare and correlate add their own around them)
SHARPNESS_MEASURES = (
    "sharpness-curve",
    "eps-sharpness",
    "worst-case",
    "adaptive-worst-case",
    "m-sharpness",
    "adaptive-m-sharpness",
    "average-case",
    "adaptive-average-case",
)
METRICS: dict[str, Callable[[Objective, MetricSpec], Result]] = {
    "eig": _eig,
    "trace": _trace,
    "density": _density,
    "expected-loss": _expected_loss,
    "sharpness-curve": _sharpness_curve,
    "eps-sharpness": _eps_sharpness,
    "worst-case": _worst_case,
    "adaptive-worst-case": partial(_worst_case, adaptive=True),
    "m-sharpness": _m_sharpness,
    "adaptive-m-sharpness": partial(_m_sharpness, adaptive=True),
    "average-case": _average_case,
    "adaptive-average-case": partial(_average_case, adaptive=True),
}


def measure_checkpoint(
    path: str,
    spec: MeasureSpec,
    *,
    previous: dict | None = None,
    saved: Callable[[dict], None] | None = None,
    distributed: bool | None = None,
) -> dict:
    """Loss, accuracy, gradient norm and the chosen curvature metrics of one checkpoint.

    `previous` is this checkpoint's report from an interrupted run: its metrics are kept, only the
    missing ones computed. `saved(report)` is called once the loss is known and after each metric.
    `distributed`: data-parallel over the ranks (default: whenever a process group is active); False
    when the checkpoints themselves are split over the ranks.
    """
    metrics = spec.metrics.metrics
    start = time.perf_counter()
    objective = build_objective(
        path, spec.objective, distributed=ranks.active() if distributed is None else distributed, metrics=spec.metrics
    )
    if previous is None:
        evaluation = objective.evaluate()
        report = {
            "checkpoint": path,
            "setup": {**objective.describe(), "curvature": spec.metrics.curvature},
            "loss": evaluation.loss,
            "accuracy": evaluation.accuracy,
            "grad_norm": float(getattr(objective, "inner", LOCAL).norm(objective.grad())),
            "n_params": objective.n_params,
            "metrics": {},
            "seconds": 0.0,
        }
    else:
        report = {**previous, "metrics": dict(previous["metrics"])}
    spent = report["seconds"]  # by earlier, interrupted runs
    earlier = previous.get("hvp_error") if previous is not None else None  # their finite-difference errors

    def save() -> None:
        report["seconds"] = spent + time.perf_counter() - start
        if objective.hvp_check_result is not None:  # the path the HVPs took, after the run-time self-check
            report["setup"]["hvp_method"] = objective.hvp_method
            report["hvp_check"] = objective.hvp_check_result.to_dict()
            report["hvp_memory"] = {**objective.memory_plan.to_dict(), "summary": objective.memory_plan.describe()}
            report["memory"] = process_memory(objective, report["metrics"])
        if objective.hvp_error is not None:  # finite differences: the steps taken and the largest error estimated
            errors = objective.hvp_error
            errors = errors.combined(FiniteDifferenceErrors.from_dict(earlier)) if earlier else errors
            report["hvp_error"] = {**errors.to_dict(), "summary": errors.describe()}
        if saved is not None:
            saved(report)

    save()
    computed = []
    for name in metrics:
        if name not in report["metrics"]:
            report["metrics"][name] = METRICS[name](objective, spec.metrics).to_dict()
            computed.append(name)
            save()
    if spec.metrics.per_layer and "per_layer" not in report:
        report["per_layer"] = _per_layer(objective, spec.metrics).to_dict()
        computed.append("per_layer")
        save()
    if previous is not None:  # a resumed table looks like a fresh one: say which numbers are from the file
        kept = ["loss", *(n for n in (*metrics, *(["per_layer"] if spec.metrics.per_layer else [])) if n not in computed)]
        now = f"; computed now: {', '.join(computed)}" if computed else "; nothing recomputed"
        warnings.warn(ResumeNote(f"{path}: {', '.join(kept)} read back from the results file{now}"), stacklevel=2)
    report["metrics"] = {name: report["metrics"][name] for name in metrics}
    return report


def measure_all(
    paths: Sequence[str], spec: MeasureSpec, *, out: str | None = None, resume: bool = False, add_checkpoints: bool = False
) -> list[dict]:
    """`landscape measure`: every checkpoint, each finished metric saved at once to `out` (and kept by `resume`; a
    file written for other checkpoints is resumed only with `add_checkpoints`, which adds these to it).

    Ctrl-C raises KeyboardInterrupt with one line saying how many metrics are saved and where.
    """
    settings = spec.settings()
    if resume and not out:
        raise ValueError("--resume continues a results file: give it as --out FILE.json")
    if add_checkpoints and not resume:
        raise ValueError("--add-checkpoint adds to the file --resume continues: give both, with --out FILE.json")
    results = (
        ResultsFile.open(out, settings, resume=resume, checkpoints=paths, add_checkpoints=add_checkpoints)
        if out
        else ResultsFile(None, settings, [])
    )
    try:
        reports = [measure_checkpoint(path, spec, previous=results.previous(path), saved=results.save) for path in paths]
    except KeyboardInterrupt:
        total = len(paths) * len(spec.metrics.metrics)
        where = (
            f"saved to {results.path}; rerun with --resume"
            if results.path is not None
            else "finished, none saved (pass --out FILE.json to keep finished metrics)"
        )
        raise KeyboardInterrupt(f"{results.n_metrics} of {total} metrics {where}") from None
    results.complete = True
    results.write()
    return reports
