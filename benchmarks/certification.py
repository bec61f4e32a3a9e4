"""The eigenvalue coverage suite under each Lanczos stopping rule: how many values each rule reports outside its stated
bound of the true i-th eigenvalue, how many runs the certified rule declines to certify, and the products each spends.

The problems are tests/lanczos_coverage.py's (controlled spectra at n = 300 and n = 1,500, and three real networks'
dense Hessians at initialization, mid-training and trained; k = 1, 3, 5, cold and warm-started from the next
eigenvector), tol 1e-3; the certified rule also with the basis bounded to 2k + 10 vectors. A miss of a cheaper rule ("residual", "error": never certified) counts every converged run as
a claim, as its table used to print it.

Usage: python benchmarks/certification.py. Writes benchmarks/results/certification.json (about 5 minutes, 1 thread).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_results  # noqa: E402  (also sets one thread per process)

from landscape.curvature.spectrum import STOPS  # noqa: E402
from tests.lanczos_coverage import network_hessians, network_problems, run, synthetic_problems  # noqa: E402

STAGES = {"at initialization": 0, "mid-training": 10, "trained": 100}
SUITES = {
    "synthetic n=300 (4 matrices per spectrum, 3 Lanczos seeds)": lambda: (synthetic_problems(seeds=range(4)), range(3)),
    "synthetic n=1500 (1 matrix per spectrum, 2 Lanczos seeds)": lambda: (synthetic_problems(n=1500, seeds=range(1)), range(2)),
}


def main() -> None:
    began = time.perf_counter()
    hessians = network_hessians(STAGES)
    suites = {**SUITES, "real networks (9 Hessians, 5 Lanczos seeds)": lambda: (network_problems(hessians), range(5))}
    results = {}
    for name, make in suites.items():
        results[name] = {}
        for stop in (*STOPS, "certified, 2k+10 vectors"):
            problems, seeds = make()
            bounded = stop.endswith("vectors")  # the certified rule in a bounded basis (thick restarts)
            tally = run(problems, seeds, stop="certified" if bounded else stop, bounded=bounded).to_dict()
            tally["misses_count"], tally["uncertified_count"] = len(tally["misses"]), len(tally["uncertified"])
            tally["misses"] = tally["misses"][:20]  # the first few, as examples
            results[name][stop] = tally
            print(
                f"{name:55s} {stop:24s} runs {tally['runs']:4d}  outside bound {tally['misses_count']:4d}  "
                f"not certified {tally['uncertified_count']:3d}  products median {tally['matvecs_median']:.0f} "
                f"max {tally['matvecs_max']}",
                flush=True,
            )
    payload = {"tol": 1e-3, "suites": results, "seconds": time.perf_counter() - began}
    print(f"wrote {write_results('certification', payload)} in {payload['seconds']:.0f} s")


if __name__ == "__main__":
    main()
