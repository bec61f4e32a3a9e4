"""Cost of the Objective's run-time HVP self-check, beside the Lanczos run it guards.

The check takes two extra products on the first call: one by the chosen path (a repeat) and one by
double backward (the reference). Per problem: the check's seconds, and a top-5 Lanczos run's
seconds and matvecs on the same Objective (check excluded), in interleaved rounds; medians.
Writes benchmarks/results/hvp_check.json. Usage: python benchmarks/hvp_check.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from hvp import problem  # noqa: E402

from landscape.curvature.spectrum import lanczos  # noqa: E402
from landscape.engine.objective import Objective  # noqa: E402
from landscape.engine.operators import HessianOperator  # noqa: E402

PROBLEMS = ["mlp-digits", "convnet-digits", "resnet20"]


def one_run(name: str) -> dict:
    model, batches = problem(name)
    objective = Objective(model, batches, device="cpu")
    start = time.perf_counter()
    result = lanczos(HessianOperator(objective), 5, tol=1e-3, seed=0)
    total = time.perf_counter() - start
    check = objective.hvp_check_result
    return {
        "path": objective.hvp_method,
        "check_seconds": check.seconds,
        "passed": check.passed,
        "lanczos_seconds": total - check.seconds,
        "lanczos_matvecs": result.n_matvecs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    args = parser.parse_args()
    names = args.problems.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    warnings.simplefilter("ignore", UserWarning)
    for _ in range(args.rounds):  # interleaved: each round visits every problem once
        for name in names:
            runs[name].append(one_run(name))
            print(name, runs[name][-1], flush=True)
    rows = {}
    for name, values in runs.items():
        check = statistics.median(v["check_seconds"] for v in values)
        run = statistics.median(v["lanczos_seconds"] for v in values)
        rows[name] = {
            "path": values[0]["path"],
            "all_passed": all(v["passed"] for v in values),
            "check_seconds": check,
            "lanczos_seconds": run,
            "lanczos_matvecs": statistics.median(v["lanczos_matvecs"] for v in values),
            "check_over_lanczos": check / run,
        }
    path = write_results(
        "hvp_check",
        {
            "rounds": args.rounds,
            "problems": rows,
            "note": "Lanczos top-5, tol 1e-3, seed 0; lanczos_seconds exclude the check; "
            "the first call also pays the path's set-up (tracing), counted in lanczos_seconds",
        },
    )
    for name, row in rows.items():
        print(
            f"{name:16s} {row['path']:16s} check {row['check_seconds']:.3f}s  lanczos {row['lanczos_seconds']:.2f}s "
            f"({row['lanczos_matvecs']:.0f} HVPs)  check/lanczos {row['check_over_lanczos']:.1%}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
