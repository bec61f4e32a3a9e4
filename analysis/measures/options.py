"""The metric options, each defined once: its default, its help, its allowed values and its smallest value.

`MetricSpec` is the typed configuration every measure reads. Each field carries its command-line help in its
metadata (`option`), so the flags of measure, compare, track and correlate, their `--help`, the integer
minimums checked before any work and a results file's settings are all derived from this one class.
Fields marked `flag=False` are set another way (--metrics and --per-layer are parsed lists; the seed is an
objective option; progress and warm starts are run-time handles, not settings of the numbers).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import Field, dataclass, field, fields
from typing import Any

from landscape.curvature.diagonal import DIAGONAL_METHODS
from landscape.curvature.relative import EXACT_MATVECS
from landscape.curvature.relative import METHODS as RELATIVE_FLATNESS_METHODS
from landscape.curvature.trace import TRACE_MATVEC_MINIMUMS
from landscape.engine.gauss_newton import CURVATURES
from landscape.sharpness.balls import DEFAULT_AVERAGE_RHO, DEFAULT_RHO
from landscape.sharpness.box import METHODS as EPS_METHODS
from landscape.sharpness.perturb import MIN_ANTITHETIC_SAMPLES

RUNTIME = {"setting": False, "flag": False}  # a run-time handle or output choice, not a setting of the numbers


def option(
    default: Any,
    help: str,
    *,
    choices: Iterable[str] | None = None,
    minimum: int | None = None,
    metavar: str | None = None,
    flag: bool = True,
) -> Any:
    """A MetricSpec field with its command-line flag: `help` may use %(default)s; `minimum` for integers."""
    metadata = {"help": help, "choices": None if choices is None else tuple(choices), "minimum": minimum}
    return field(default=default, metadata={**metadata, "metavar": metavar, "flag": flag})


def _radii_help(radii: dict) -> str:
    names = {("2", False): "ℓ2", ("2", True): "adaptive ℓ2", ("inf", False): "ℓ∞", ("inf", True): "adaptive ℓ∞"}
    return ", ".join(f"{names[key]} {rho:g}" for key, rho in radii.items())


def setting_text(value: object) -> object:
    """A setting in its command-line spelling: (0.005, 0.01) → "0.005,0.01"; ("eig", "trace") → "eig,trace"."""
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return value


def settings_of(spec: object) -> dict[str, object]:
    """Every field of a spec that changes a number, in its command-line spelling (what a results file records)."""
    return {f.name: setting_text(getattr(spec, f.name)) for f in fields(spec) if f.metadata.get("setting", True)}


@dataclass(frozen=True)
class MetricSpec:
    """Which metrics, with which options. `seed` seeds every probe, noise draw and random start."""

    metrics: tuple[str, ...] = option(("eig", "trace"), "", flag=False)
    curvature: str = option(
        "hessian",
        "the matrix eig, trace and density measure: hessian (default), ggn (generalized Gauss-Newton "
        "JᵀH_ℓJ, positive semi-definite) or fisher (empirical Fisher (1/N)·Σ gᵢgᵢᵀ, gᵢ a sample's "
        "gradient within its batch); the other metrics ignore it (the sharpness curve's ½·tr(ΣH) stays the Hessian's)",
        choices=CURVATURES,
    )
    k: int = option(5, "number of eigenvalues (default %(default)s)", minimum=1)
    which: str = option("LA", "largest, smallest or largest-magnitude eigenvalues", choices=("LA", "SA", "LM"))
    tol: float = option(1e-3, "relative Ritz residual tolerance of Lanczos (default %(default)s)")
    max_matvecs: int | None = option(
        None,
        "Lanczos budget of Hessian-vector products (default: max(300, 60·k), at most the parameter "
        "count); a run that spends it is marked not converged",
        minimum=1,
    )
    max_vectors: int | None = option(
        None,
        "parameter-sized vectors Lanczos may hold at once (default: every one it can use where they fit in half "
        "the memory the HVPs leave free, else as many as fit, at least 2·k + 10); fewer make it restart (thick "
        "restarts, certified the same way), and the table says how often",
        minimum=1,
    )
    trace_method: str = option(
        "xtrace",
        "xtrace (default: lowest error per matvec in benchmarks/curvature.py), hutchpp, hutchinson",
        choices=TRACE_MATVEC_MINIMUMS,
    )
    probes: int = option(
        100, "matvec budget of the trace estimate, and of sharpness-curve's second-order prediction (default %(default)s)"
    )
    diagonal_method: str = option(
        "xdiag",
        "hessian-diagonal's estimator: xdiag (default; low-rank + Hutchinson, Epperly et al. 2024), hutchinson, or "
        "exact (--curvature ggn with cross-entropy: N·C backward passes; fisher: N)",
        choices=DIAGONAL_METHODS,
    )
    density_runs: int = option(4, "SLQ runs (default %(default)s)", minimum=1)
    density_steps: int = option(60, "Lanczos steps per SLQ run (default %(default)s)", minimum=1)
    radius: tuple[float, ...] = option(
        (0.001, 0.005, 0.01), "weight-noise radii a (default %(default)s); expected-loss takes the largest"
    )
    distribution: str = option("uniform", "U[-a,a] or N(0,a²) noise", choices=("uniform", "gaussian"))
    scale: str = option(
        "absolute",
        "noise per coordinate (absolute), ∝|w| (weight) or per filter ∝‖w_filter‖ (filter, AdaSmoothOut)",
        choices=("absolute", "weight", "filter"),
    )
    noise_samples: int = option(100, "perturbed forward passes per radius (default %(default)s)")
    bn_recalibration: int | None = option(
        None, "re-estimate BN statistics from K batches at each perturbed point", minimum=1, metavar="K"
    )
    pac_bayes_target: float = option(
        0.1,
        "mean loss increase E L(w+u) − L(w) that defines σ′ of pac-bayes and pac-bayes-mag: the largest σ that keeps "
        "it (default %(default)s, Jiang et al. 2020's); --noise-samples caps the forwards at each σ",
    )
    eps: float = option(5e-4, "box size of Keskar's ε-sharpness (default %(default)s)")
    subspace_dim: int | None = option(None, "ε-sharpness in a random p-dim subspace (default: full space)", minimum=1)
    restarts: int = option(
        2, "ε-sharpness random starts besides z = 0 and the corner b·sign(∇L) (default %(default)s)", minimum=0
    )
    eps_method: str = option(
        "sign-ascent",
        "ε-sharpness maximizer: sign-ascent (default: projected sign ascent, higher φ per pass than L-BFGS-B "
        "on mnist1d MLPs, benchmarks/epsilon_sharpness.py) or lbfgsb (Keskar's)",
        choices=EPS_METHODS,
    )
    eps_iters: int = option(20, "ε-sharpness ascent iterations per start (default %(default)s)", minimum=1)
    rho: float | None = option(
        None,
        "radius ρ of worst-case, m- and average-case sharpness (default per measure: worst case "
        f"{_radii_help(DEFAULT_RHO)}: SAM's 0.05 (Foret et al. 2021), ASAM's 0.5 on CIFAR-10 (Kwon et al. "
        "2021), ℓ∞ within Andriushchenko et al. (2023)'s grids; average case "
        f"{_radii_help(DEFAULT_AVERAGE_RHO)})",
    )
    p: str = option(
        "2",
        "ball of worst-case, m- and average-case sharpness: 2 (ℓ2, average case "
        "δ ~ N(0, ρ²I)) or inf (ℓ∞ box, average case U[−ρ, ρ]^d) (default %(default)s)",
    )
    m: int = option(
        128,
        "samples per batch of m-sharpness (default %(default)s, Andriushchenko et al.'s); each batch's own "
        "maximum is averaged; samples after the last whole batch are left out",
        minimum=1,
    )
    ascent_steps: int = option(
        20, "APGD iterations per start of worst-case and m-sharpness (default %(default)s, as Andriushchenko et al.)", minimum=1
    )
    ascent_restarts: int = option(
        1, "worst-case and m-sharpness random starts besides the gradient direction (default %(default)s)", minimum=0
    )
    optimizer_state: str | None = option(
        None,
        "file holding the torch optimizer state_dict (Adam, AdamW, RMSprop, Adagrad) whose preconditioner P "
        "preconditioned-sharpness reads: a torch.save of optimizer.state_dict() or a checkpoint keeping one "
        "(default: the measured checkpoint's own; `landscape train` keeps Adam's)",
        metavar="FILE",
    )
    eta: float = option(0.0, "adaptive ball T = |w| + η (default %(default)s, as Andriushchenko et al.; ASAM uses 0.01)")
    logit_normalization: bool = option(
        False,
        "worst- and average-case sharpness of the loss of normalized logits (centred over the classes, divided by "
        "their ℓ2 norm; Andriushchenko et al. 2023), so scaling the logits cannot change it",
    )
    fold_bn: bool = option(
        False,
        "worst- and average-case sharpness with eval-mode BatchNorm folded into the weights (into the conv or linear "
        "layer before it, else into its own scale and shift; Andriushchenko et al. 2023): the same function, whose "
        "parameters, the ones perturbed and adaptively scaled, are the weights the network applies",
    )
    relative_flatness_layer: str | None = option(
        None,
        "the weight W of relative-flatness, by parameter name (e.g. 4.weight): the layer that takes the representation "
        "φ, one row per neuron (default: the last nn.Linear weight, so φ is the penultimate layer's output)",
        metavar="NAME",
    )
    relative_flatness_method: str = option(
        "auto",
        f"relative-flatness exactly (rank(WWᵀ)·m HVPs for W of d×m), estimated (--trace-method with --probes HVPs), "
        f"or auto (exact up to {EXACT_MATVECS} HVPs or --probes, whichever is more) (default %(default)s)",
        choices=RELATIVE_FLATNESS_METHODS,
    )
    per_layer: tuple[str, ...] = option((), "", flag=False)
    # the blocks --per-layer measures: one per module, or one per role (attention, mlp, ...)
    per_layer_by: str = option("module", "", flag=False)
    seed: int = option(0, "", flag=False)
    progress: bool | str = field(default=False, metadata=RUNTIME, compare=False)
    warm_start: Any = field(default=None, metadata=RUNTIME, compare=False)  # a spectrum.WarmStart (`landscape track`)

    @classmethod
    def from_args(cls, args: argparse.Namespace, choices: Iterable[str] | None = None) -> MetricSpec:
        """The metric options of `args`; --metrics must name metrics of `choices` (default: the command's, which
        its parser records as `metric_choices`)."""
        choices = getattr(args, "metric_choices", ()) if choices is None else choices
        values: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values["progress"] = getattr(args, "progress", False)
        if getattr(args, "metrics", None) is not None:
            values["metrics"] = tuple(parse_metrics(args.metrics, tuple(choices)))
        if getattr(args, "radius", None) is not None:
            values["radius"] = tuple(parse_radii(args.radius))
        per_layer = getattr(args, "per_layer", None)
        values["per_layer"] = tuple(per_layer_names(per_layer)) if per_layer else ()
        return cls(**{k: v for k, v in values.items() if k != "warm_start"})

    def settings(self) -> dict[str, object]:
        return settings_of(self)

    def help_default(self, name: str) -> str:
        """Field `name` as --help and the parser's default spell it."""
        return str(setting_text(getattr(self, name)))


def flag_fields() -> list[Field]:
    """MetricSpec's fields that are command-line flags of the metrics group, in --help order."""
    return [f for f in fields(MetricSpec) if f.metadata.get("flag", True)]


def int_minimums() -> dict[str, int]:
    """The smallest value of each integer metric option (checked, naming the flag, before any work)."""
    return {f.name: f.metadata["minimum"] for f in fields(MetricSpec) if f.metadata.get("minimum") is not None}


def probe_minimum(trace_method: str) -> int:
    """The fewest matvecs --trace-method needs (the estimator's own minimum)."""
    return TRACE_MATVEC_MINIMUMS.get(trace_method, 2)


NOISE_SAMPLES_MINIMUM = MIN_ANTITHETIC_SAMPLES  # two antithetic pairs: the stderr needs at least two


def parse_radii(text: str) -> list[float]:
    """--radius as a list of finite radii > 0 (at least one): at radius 0 the loss increase is 0 by definition."""
    from landscape.engine.checks import check_number

    radii = []
    for item in (r.strip() for r in text.split(",")):
        if not item:
            continue
        try:
            radius = check_number("--radius", float(item), allow_zero=True)
        except ValueError:
            raise ValueError(
                f"--radius {text!r}: {item!r} is not a finite number > 0; give a comma list such as 0.005,0.01"
            ) from None
        if radius == 0:
            raise ValueError(
                f"--radius {text!r}: a radius of 0 perturbs nothing, so its loss increase is 0 by definition; "
                "give radii > 0, such as 0.005,0.01"
            )
        radii.append(radius)
    if not radii:
        raise ValueError(f"--radius {text!r} names no radius; give a comma list such as 0.005,0.01")
    return radii


def parse_metrics(text: str, choices: Iterable[str], option: str = "--metrics") -> list[str]:
    """--metrics (or `option`) as a list of names from `choices`; an empty list is an error, not a run that measures nothing."""
    choices = tuple(choices)
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError(f"{option} {text!r} names no metric; choose from {', '.join(choices)}")
    unknown = [m for m in names if m not in choices]
    if unknown:
        raise ValueError(f"{option}: unknown metric {', '.join(unknown)}; choose from {', '.join(choices)}")
    return names


def per_layer_names(text: str) -> list[str]:
    """--per-layer as a list of eig, trace and density (at least one)."""
    from landscape.curvature.blocks import PER_LAYER_METRICS

    return parse_metrics(text, PER_LAYER_METRICS, "--per-layer")
