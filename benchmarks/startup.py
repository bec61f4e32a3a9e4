"""Start-up wall time of the `landscape` command, with `import torch` alone for reference.

Each command runs as a fresh subprocess, --rounds times interleaved over the commands (so a burst
of load on a shared machine hits them all alike); each number is the median over the rounds.
Writes benchmarks/results/startup.json. Usage: python benchmarks/startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LANDSCAPE = [sys.executable, "-c", "import sys; from analysis.cli import main; sys.exit(main())"]  # the console script
COMMANDS = {
    "landscape --help": [*LANDSCAPE, "--help"],
    "landscape --version": [*LANDSCAPE, "--version"],
    "landscape measure --help": [*LANDSCAPE, "measure", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def wall_seconds(command: list[str]) -> float:
    """Wall time of one run of `command` from the repository root; it must exit 0."""
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="runs per command, interleaved; medians reported")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            times[name].append(wall_seconds(command))
    rows = [
        {"command": name, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "rounds": len(t)}
        for name, t in times.items()
    ]
    for row in rows:
        print(f"{row['command']:<28} {row['median_s']:6.2f} s  (min {row['min_s']:.2f}, max {row['max_s']:.2f})")
    print("wrote", write_results("startup", {"rows": rows}))


if __name__ == "__main__":
    main()
