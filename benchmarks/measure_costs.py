"""What each measure of `landscape measure` costs at its defaults: the products and passes it reports, and seconds.

One checkpoint: the default digits MLP (64-100-100-10, 17,610 parameters) trained 5 epochs by Adam (so it keeps
the optimizer state preconditioned sharpness reads), measured on 1,000 training samples in batches of 250, in
float32 on one CPU thread. Every registered measure runs at its defaults through `measure()`, the function the
CLI calls, --rounds times interleaved over the measures (a burst of load on this shared machine hits them all
alike); seconds are the median over rounds, and the cost column is the one the measure's own table row reports
(HVPs, forwards, gradients). The process's peak resident memory is reported once for the whole run (measures
share one process; `landscape measure` prints each run's own peak).

Writes benchmarks/results/measure_costs.json. Usage: python benchmarks/measure_costs.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import rss_bytes, write_results  # noqa: E402

from analysis.measures.measurement import measure  # noqa: E402
from analysis.measures.options import MetricSpec  # noqa: E402
from analysis.measures.registry import MEASURES  # noqa: E402
from landscape.engine.from_checkpoint import objective_from_checkpoint  # noqa: E402
from landscape.inputs.checkpoints import load_checkpoint  # noqa: E402
from landscape.inputs.data import MeasurementSet  # noqa: E402
from landscape.training.loop import TrainConfig, train  # noqa: E402


def checkpoint(folder: Path) -> str:
    config = TrainConfig(data="digits", model="mlp", optimizer="adam", lr=0.003, epochs=5, batch_size=64, seed=0)
    return str(train(config, folder, progress=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="runs per measure, interleaved; medians reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = checkpoint(Path(folder))
        objective = objective_from_checkpoint(
            load_checkpoint(path), measurement=MeasurementSet("train", n_samples=1000, batch_size=250)
        )
        seconds: dict[str, list[float]] = {name: [] for name in MEASURES}
        costs: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for name, record in MEASURES.items():
                spec = replace(MetricSpec(), metrics=(name,))
                start = time.perf_counter()
                found = measure(objective, spec, path)
                seconds[name].append(time.perf_counter() - start)
                rows = record.rows(found.metrics[name], name, "HVPs")
                costs[name] = [row[2] for row in rows if row[2]]
    table = {
        name: {"seconds": statistics.median(times), "all_seconds": times, "reported_cost": costs[name]}
        for name, times in seconds.items()
    }
    out = write_results(
        "measure_costs",
        {
            "setup": "digits MLP 64-100-100-10 (17,610 parameters), Adam 5 epochs; 1,000 train samples in batches of "
            "250; float32, one thread; every measure at its defaults through measure()",
            "rounds": args.rounds,
            "measures": table,
            "peak_rss_bytes": rss_bytes("VmHWM"),
        },
    )
    print("| measure | cost it reports | seconds (median) |\n|---|---|---|")
    for name, row in table.items():
        print(f"| `{name}` | {'; '.join(row['reported_cost'])} | {row['seconds']:.2f} |")
    print(f"peak resident memory {rss_bytes('VmHWM') / 2**20:.0f} MiB; wrote {out}")


if __name__ == "__main__":
    main()
