"""`landscape demo`: train SGD and SmoothOut at small and large batch on mnist1d, compare them, write a report.

The setting is the seed papers' small-scale check (an MLP on mnist1d, Keskar et al. 2017's small- vs
large-batch contrast, SmoothOut of Wen et al. 2018), shortened to run in a few minutes on a
laptop CPU. Training runs are cached in the output folder, so a second run only re-measures.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from analysis.cli.compare import COMPARE_DEFAULTS, build_report, compare, comparison_tables, format_difference
from analysis.cli.output import print_json
from analysis.cli.specs import CompareSpec, MeasureSpec, ObjectiveSpec
from analysis.experiments.recipes import DEMO, LARGE, SMALL, train_runs
from analysis.measures.text import eigenvalue_label, noise_increase_label
from analysis.report.comparison import Comparison
from analysis.report.differences import Difference, difference, holm, holm_family, verdict
from analysis.report.document import Report
from analysis.report.tables import format_table
from landscape.engine import distributed as ranks

RUNS = [("sgd", SMALL), ("sgd", LARGE), ("smoothout", SMALL), ("smoothout", LARGE)]
CLAIMS = (  # (question, baseline, other)
    ("Is large-batch SGD sharper than small-batch SGD?", f"sgd B={SMALL}", f"sgd B={LARGE}"),
    ("Does SmoothOut flatten the large-batch minimum?", f"sgd B={LARGE}", f"smoothout B={LARGE}"),
    ("Does SmoothOut flatten the small-batch minimum?", f"sgd B={SMALL}", f"smoothout B={SMALL}"),
)
MEASURED = ("eig", "trace", "sharpness-curve", "surface", "surface2d")  # compare's other options at its defaults
NOISE = noise_increase_label(0.02)  # SmoothOut's own a: the demo's expected-loss quantity
SHARPNESS = (eigenvalue_label(1), "trace", NOISE, "test accuracy")
HEADLINE = (CLAIMS[0], NOISE)  # the finding CI checks: large-batch SGD sharper in expected loss, clearing the seed spread
ALPHA = 0.05
HEADERS = (
    "quantity",
    "difference [95% CI] (relative)",
    "p / Holm p (all questions' tests)",
    f"established? (Holm p < {ALPHA:g})",
)
SETUP = (
    "landscape demo: an MLP 40-100-100-10 on mnist1d (4000 train / 1000 test), SGD with momentum 0.9 at batch "
    f"{SMALL} (lr 0.01, {DEMO.epochs[SMALL]} epochs) and {LARGE} (lr 0.1, {DEMO.epochs[LARGE]} epochs), and SmoothOut "
    "(uniform weight noise a = 0.02, de-noised) with the same settings; {seeds} training seed(s) per method. λ1: top "
    "Hessian eigenvalue; trace: Hessian trace (XTrace); ΔL a=0.02: expected increase of the train loss under uniform "
    "weight noise of radius 0.02 (SmoothOut's own training objective at its own a, so this metric favours it). "
    f"The recipe: {DEMO.note}; `landscape figures` trains the full recipe."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="landscape-demo", help="folder for the runs, the report and its figures")
    parser.add_argument(
        "--seeds", type=int, default=3, help="training seeds per method (default 3: differences must clear the seed spread)"
    )


def question_title(claim: tuple[str, str, str]) -> str:
    question, base, other = claim
    return f"{question} ({other} vs {base})"


def findings(result: Comparison) -> dict[str, dict[str, Difference]]:
    """For each question, the differences (with intervals, seed verdicts and Holm-adjusted p) that answer it."""
    groups = result.members()
    answers = {}
    for claim in CLAIMS:
        _, base, other = claim
        diffs = {name: difference(groups[base], groups[other], name) for name in SHARPNESS}
        answers[question_title(claim)] = {name: d for name, d in diffs.items() if d is not None}
    keys = [(q, name) for q, diffs in answers.items() for name in diffs]
    adjusted = holm([answers[q][name].p_value for q, name in keys])  # every question's tests are one family
    for (q, name), p in zip(keys, adjusted):
        answers[q][name] = replace(answers[q][name], holm_p=p)
    return answers


def findings_caption(answers: dict[str, dict[str, Difference]]) -> str:
    """Which tests the findings' Holm p is over: all questions' together, not the Differences table's rows."""
    family = (
        f"every row of the {len(answers)} question tables at the top ({', '.join(SHARPNESS)} where measured), "
        "not the Differences table below, which corrects over its own rows"
    )
    return holm_family(sum(len(diffs) for diffs in answers.values()), family) + "."


def finding_rows(diffs: dict[str, Difference]) -> list[list[str]]:
    rows = []
    for name, d in diffs.items():
        called = verdict(d) if not d.seeds else "yes" if d.holm_p < ALPHA else "no"
        rows.append([name, format_difference(d), f"{d.p_value:.2g} / {d.holm_p:.2g}", called])
    return rows


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = Path(args.out)
    paths, labels = train_runs(RUNS, args.seeds, out / "runs", recipe=DEMO, progress=args.progress)
    trained = time.perf_counter() - start
    measure = MeasureSpec(ObjectiveSpec(batch_size=1000), replace(COMPARE_DEFAULTS, metrics=MEASURED, progress=args.progress))
    result = compare(paths, CompareSpec(measure, out=out / "report", labels=tuple(labels)))
    if not ranks.is_main():  # under torchrun rank 0 alone writes the report
        return
    report = build_report(result, out / "report")
    answers = findings(result)
    findings_first = Report(report.title)  # the set-up and the answers above the measured tables
    findings_first.paragraph(SETUP.format(seeds=args.seeds))
    for question, diffs in answers.items():
        findings_first.heading(question)
        findings_first.table(HEADERS, finding_rows(diffs), findings_caption(answers))
    report.prepend(findings_first)
    md, page = report.write(out / "report")
    seconds = time.perf_counter() - start
    if args.json:
        claim, quantity = HEADLINE
        headline = {"question": question_title(claim), "quantity": quantity, **answers[question_title(claim)][quantity].to_dict()}
        print_json(
            {
                "findings": answers,
                "headline": headline,
                "groups": result.groups,
                "report": [str(md), str(page)],
                "train_seconds": trained,
                "measure_seconds": seconds - trained,
            }
        )
        return
    h1, r1, _, _ = comparison_tables(result)
    print(format_table(h1, r1))
    for question, diffs in answers.items():
        print(f"\n{question}\n" + format_table(HEADERS, finding_rows(diffs)))
    print(f"\ntrained {len(paths)} runs in {trained:.0f}s, measured them in {seconds - trained:.0f}s")
    print(f"report: {md}\n        {page}\nfigures and surface files: {out / 'report'}/")
