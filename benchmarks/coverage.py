"""Coverage of every stated 95% interval, with more seeds than tests/test_coverage.py.

Trace intervals (TraceResult.ci) of Hutchinson, Hutch++ and XTrace at a small and the default budget against the
exact trace of the dense Hessian of three briefly trained real networks (an MLP, a ConvNet with BatchNorm, a
torchvision-style residual block), XTrace's per-tensor traces too; the sharpness curve's CIs (each an expected-loss
CI) at two radii against a 2·10⁴-pair Monte Carlo, and its prediction ½a²·tr(SHS) ± t·stderr against the dense
Hessian; the expected loss on a quadratic against its closed form; correlate's bootstrap intervals of τ, ψ and Ψ
against a bivariate normal's τ = (2/π)·arcsin ρ. Each coverage comes with its 95% Clopper–Pearson interval.
Writes benchmarks/results/coverage.json. About 9 minutes on one thread.
Usage: python benchmarks/coverage.py [--seeds 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.interval_coverage, the suite's machinery
from common import write_results  # noqa: E402  (also sets one thread per process)

from tests.interval_coverage import (  # noqa: E402
    Coverage,
    curve_coverage,
    networks,
    pooled,
    quadratic_coverage,
    tau_coverage,
    trace_coverage,
)

BUDGETS = {"hutchinson": (30, 100), "hutchpp": (30, 102), "xtrace": (30, 100)}  # small, and the CLI's default
RADII = (0.05, 0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1000, help="seeds per trace problem (others: a fraction of it)")
    args = parser.parse_args()
    start = time.perf_counter()
    nets = networks()
    rows: list[Coverage] = []
    totals: list[Coverage] = []

    def record(found: list[Coverage], quantity: str) -> None:
        rows.extend(found)
        totals.append(pooled(found, quantity))
        print("\n".join(c.line() for c in [*found, totals[-1]]), flush=True)

    for method, budgets in BUDGETS.items():
        for budget in budgets:
            record([trace_coverage(method, net, budget, range(args.seeds))[0] for net in nets], f"trace {method} ({budget})")
    per_tensor = [trace_coverage("xtrace", net, 100, range(args.seeds // 5), blocks=True)[1] for net in nets]
    record(per_tensor, "trace xtrace (100), per tensor")  # ~0.2 s a seed: a fifth of the seeds
    curve_seeds = range(args.seeds * 3 // 10)
    curves = [c for net in nets for c in curve_coverage(net, RADII, curve_seeds, n_samples=100, n_probes=100)]
    for quantity in dict.fromkeys(c.quantity for c in curves):
        record([c for c in curves if c.quantity == quantity], quantity)
    record([quadratic_coverage(a, range(args.seeds)) for a in RADII], "expected loss, quadratic")
    taus = [c for n_runs in (8, 12, 20) for rho in (0.0, 0.6) for c in tau_coverage(n_runs, rho, range(args.seeds // 2))]
    for name in ("tau", "psi lr", "Psi"):
        record([c for c in taus if c.quantity == f"correlate {name} bootstrap"], f"correlate {name} bootstrap")
    payload = {
        "problems": {net.name: {"n_params": net.hessian.shape[0], "trace": float(net.hessian.trace())} for net in nets},
        "confidence": 0.95,
        "standard": [0.93, 0.97],
        "pooled": [c.to_dict() for c in totals],
        "rows": [c.to_dict() for c in rows],
        "seconds": time.perf_counter() - start,
    }
    print(f"wrote {write_results('coverage', payload)} in {payload['seconds']:.0f} s")


if __name__ == "__main__":
    main()
