"""`landscape measure`: load each checkpoint, build its Objective, run the chosen estimators."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence

from analysis.cli.key_values import parse_options
from analysis.cli.output import print_json
from analysis.cli.results_file import ResultsFile
from analysis.cli.specs import MeasureSpec, ObjectiveSpec
from analysis.measures.measurement import Measurement, check_fits, measure
from analysis.measures.options import MetricSpec, flag_fields
from analysis.measures.registry import MEASURES
from analysis.report.checkpoint_table import CURVATURE_NAMES, format_measurement
from landscape.curvature.blocks import GROUPINGS
from landscape.engine import distributed as ranks
from landscape.engine.from_checkpoint import objective_from_checkpoint
from landscape.engine.memory import parse_size
from landscape.engine.objective import Objective
from landscape.inputs.batches import resolve_loss
from landscape.inputs.checkpoints import load_checkpoint
from landscape.inputs.data import MeasurementSet
from landscape.inputs.precision import DTYPES, parse_dtype


def run(args: argparse.Namespace) -> None:
    """`landscape measure`: every checkpoint's metrics, printed (or as JSON), saved as they finish with --out."""
    if getattr(args, "per_layer_figure", None) and not args.per_layer:
        raise ValueError("--per-layer-figure draws --per-layer results: pass --per-layer eig,trace too")
    if getattr(args, "diagonal_figure", None) and "hessian-diagonal" not in args.metrics.split(","):
        raise ValueError("--diagonal-figure draws the hessian-diagonal measure: add it to --metrics")
    results = measure_all(
        args.checkpoints, MeasureSpec.from_args(args), out=args.out, resume=args.resume, add_checkpoints=args.add_checkpoint
    )
    if args.per_layer_figure and ranks.is_main():
        from analysis.report.charts import plot_block_spectra, plot_per_layer, save

        labels = [f"{i}: {r.checkpoint}" if len(results) > 1 else r.checkpoint for i, r in enumerate(results, 1)]
        found = {label: r.per_layer for label, r in zip(labels, results)}
        if any("density" in r.metrics for r in found.values()):  # one density panel per block, λ1 and trace above
            figure = plot_block_spectra(found, curvature=CURVATURE_NAMES[getattr(args, "curvature", "hessian")][0])
        else:
            figure = plot_per_layer(found)
        save(figure, args.per_layer_figure)
    if getattr(args, "diagonal_figure", None) and ranks.is_main():
        from analysis.report.charts import plot_diagonal, save

        labels = [f"{i}: {r.checkpoint}" if len(results) > 1 else r.checkpoint for i, r in enumerate(results, 1)]
        save(plot_diagonal({label: r.metrics["hessian-diagonal"] for label, r in zip(labels, results)}), args.diagonal_figure)
    if args.json:
        print_json([r.to_dict() for r in results])
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
    """The metric options shared by measure, compare, track and correlate, one flag per MetricSpec field (its help
    in the field's metadata); `metrics`: the names the command takes (default: every registered measure),
    `defaults`: its defaults (each command's in one place: measure's are MetricSpec's own)."""
    names = tuple(metrics or MEASURES)
    group = parser.add_argument_group("metrics")
    group.add_argument(
        "--metrics", default=defaults.help_default("metrics"), help=f"comma list of {', '.join(names)} (default %(default)s)"
    )
    parser.set_defaults(metric_choices=names)
    for f in flag_fields():
        kind = f.type if isinstance(f.type, type) else _flag_type(str(f.type))
        default = getattr(defaults, f.name)
        readers = [n for n in names if n in MEASURES and f.name in MEASURES[n].options]  # from each measure's record
        if kind is bool:  # an on/off option: a bare flag
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                action="store_true",
                default=default,
                help=f.metadata["help"] + (f" [{', '.join(readers)}]" if readers else ""),
            )
            continue
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=defaults.help_default(f.name) if isinstance(default, tuple) else default,
            choices=None if f.metadata["choices"] is None else list(f.metadata["choices"]),
            metavar=f.metadata["metavar"],
            help=f.metadata["help"] + (f" [{', '.join(readers)}]" if readers else ""),
        )


def _flag_type(annotation: str) -> type:
    """The argparse type of a MetricSpec annotation ("int | None" → int; tuples are parsed from their text later)."""
    for name, kind in (("tuple", str), ("int", int), ("float", float), ("bool", bool)):
        if annotation.startswith(name):
            return kind
    return str


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
    add_figure_arguments(parser)


def add_figure_arguments(parser: argparse.ArgumentParser) -> None:
    """Figures of single measures, drawn once every checkpoint is measured."""
    group = parser.add_argument_group("figures")
    group.add_argument(
        "--diagonal-figure",
        metavar="FILE.png",
        default=None,
        help="with --metrics hessian-diagonal: each parameter tensor's diagonal sum ± 1.96 stderr as horizontal bars, "
        "the checkpoints side by side",
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
        check_fits(metrics, spec.params, objective.n_params, objective.n_samples)
    return objective


def measure_checkpoint(
    path: str,
    spec: MeasureSpec,
    *,
    previous: Measurement | None = None,
    saved: Callable[[Measurement], None] | None = None,
    distributed: bool | None = None,
) -> Measurement:
    """Loss, accuracy, gradient norm and the chosen measures of the checkpoint at `path` (measures.measurement's
    `measure` on its Objective). `distributed`: data-parallel over the ranks (default: whenever a process group is
    active); False when the checkpoints themselves are split over the ranks."""
    objective = build_objective(
        path, spec.objective, distributed=ranks.active() if distributed is None else distributed, metrics=spec.metrics
    )
    return measure(objective, spec.metrics, path, previous=previous, saved=saved)


def measure_all(
    paths: Sequence[str], spec: MeasureSpec, *, out: str | None = None, resume: bool = False, add_checkpoints: bool = False
) -> list[Measurement]:
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
