"""benchmarks/train_parallel.py, checked quickly: one round on 256 samples, then the accumulation memory rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.cli
@pytest.mark.slow
@pytest.mark.distributed
def test_train_parallel_benchmark_quick_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_parallel.py"), "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    throughput, memory = rows[0], rows[1:]
    assert throughput["samples_per_s_1"] > 0 and throughput["samples_per_s_2"] > 0
    assert throughput["peak_rss_mb_1"] > 100 and throughput["peak_rss_mb_2"] > 100  # the processes were seen
    assert [r["accumulate"] for r in memory] == [1, 2, 4, 8]
    assert memory[-1]["step_peak_mb"] < memory[0]["step_peak_mb"]  # micro-batches hold less at once
