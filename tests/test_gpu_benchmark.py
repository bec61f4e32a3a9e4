"""benchmarks/gpu.py, the one prepared GPU script, checked on the CPU: --smoke runs every section in under a minute."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.cli
def test_gpu_benchmark_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"machine", "settings", "hvp", "train", "lanczos", "surface", "complete", "seconds"} <= set(report)
    assert report["complete"] and report["settings"]["smoke"] and report["settings"]["device"] == "cpu"
    rows = report["hvp"]["rows"]
    from landscape.engine import hvp_paths

    compiled = getattr(hvp_paths, "COMPILED_HVP", None)  # every Objective path, the torch.compile'd one too
    paths = [*hvp_paths.HVP_METHODS, *([compiled] if compiled and compiled not in hvp_paths.HVP_METHODS else [])]
    assert [r["path"] for r in rows] == [*paths, "pyhessian"] == [*report["settings"]["hvp_paths"], "pyhessian"]
    for row in rows:  # each path measured, or its failure or skip recorded as a string
        assert "hvp_over_gradient" in row or isinstance(row.get("error") or row.get("skipped"), str), row
    measured = [r for r in rows if "hvp_over_gradient" in r]
    assert measured and all(r["hvp_s"] > 0 and r["peak_mb"] > 0 for r in measured)
    train = report["train"]["rows"]  # every method × AMP mode measured (a finite loss), or skipped by the guard
    assert [(r["method"], r["amp"]) for r in train] == [(m, a) for m in ("sgd", "sam") for a in ("none", "bf16", "fp16")]
    assert all(("step_s" in r and r["loss"] == r["loss"] and r["over_sgd_float32"] > 0) or "skipped" in r for r in train), train
    lanczos = report["lanczos"]  # run, or skipped by the time guard on a very busy machine; never an error
    assert lanczos == "skipped: time budget" or ("seconds" in lanczos and lanczos["n_matvecs"] >= 5), lanczos
    surface = report["surface"]
    assert "rows" in surface and "error" not in surface, surface
    plane = surface["plane"]  # the smoke run's 5×5 plane (51×51 ResNet-20 on a GPU), or skipped by the time guard
    assert plane == {"skipped": "time budget"} or (plane["grid"] == [5, 5] and plane["points_per_second"] > 0), plane
    assert not (ROOT / "benchmarks" / "results" / "gpu.json.tmp").exists()
