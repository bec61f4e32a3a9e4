"""The public API: `from landscape import …` gives the engine, loaded on first use, and `import landscape` stays light."""

import importlib
import subprocess
import sys
from pathlib import Path

import landscape

ROOT = Path(__file__).resolve().parents[1]


def test_import_landscape_alone_does_not_import_torch():
    code = "import sys, landscape; print(landscape.__version__); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.split() == [landscape.__version__, "False"]


def test_every_export_is_the_object_its_module_defines():
    for name, module in landscape._EXPORTS.items():
        assert getattr(landscape, name) is getattr(importlib.import_module(module), name), name
    assert sorted(landscape.__all__) == sorted(["__version__", *landscape._EXPORTS])


def test_no_export_is_shadowed_by_a_submodule_of_the_same_name():
    """`landscape.X` becomes the submodule X as soon as anything imports it: an export must not share a module's name."""
    modules = {p.stem for p in (ROOT / "landscape").rglob("*.py")} | {
        p.name for p in (ROOT / "landscape").iterdir() if p.is_dir()
    }
    assert not set(landscape._EXPORTS) & modules


# which stage folders of landscape/ each folder may import (results.py, statistics.py and examples.py: any)
LAYERS = {
    "inputs": set(),
    "engine": {"inputs"},
    "curvature": {"engine", "inputs"},
    "sharpness": {"engine", "inputs", "curvature"},
    "surfaces": {"engine", "inputs", "curvature"},
    "training": {"engine", "inputs", "curvature", "sharpness"},
}


def _imported_stages(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "landscape" and len(parts) > 1 and parts[1] in LAYERS:
                found.add(parts[1])
    return found


def test_the_folders_are_the_stages_and_imports_go_downward():
    """inputs → engine → curvature | sharpness | surfaces; training apart (docs/architecture.md)."""
    assert {p.name for p in (ROOT / "landscape").iterdir() if (p / "__init__.py").exists()} == set(LAYERS)
    assert {p.name for p in (ROOT / "landscape").glob("*.py")} == {"__init__.py", "examples.py", "results.py", "statistics.py"}
    for stage, allowed in LAYERS.items():
        for path in (ROOT / "landscape" / stage).glob("*.py"):
            wrong = _imported_stages(path) - allowed - {stage}
            assert not wrong, f"{path.relative_to(ROOT)} imports landscape.{', landscape.'.join(sorted(wrong))}"
    for name in ("results.py", "statistics.py"):  # the results import no stage: every stage may import them
        assert not _imported_stages(ROOT / "landscape" / name), name


def test_a_measurement_through_the_public_names(tmp_path):
    """λ1 by Lanczos through the exported names equals the dense Hessian's largest eigenvalue."""
    import torch

    from landscape import HessianOperator, MeasurementSet, lanczos, load_checkpoint, objective_from_checkpoint
    from tests.ground_truth import dense_hessian
    from tests.helpers import digits_mlp_checkpoint

    checkpoint = load_checkpoint(digits_mlp_checkpoint(tmp_path, (8,)))
    measurement = MeasurementSet("train", n_samples=200, batch_size=100)
    objective = objective_from_checkpoint(checkpoint, measurement=measurement, dtype=torch.float64)
    top = lanczos(HessianOperator(objective), k=1, tol=1e-8)
    exact = torch.linalg.eigvalsh(dense_hessian(checkpoint.build_model().double(), objective.batches, "eval"))[-1]
    assert abs(top.values[0] - float(exact)) <= 1e-6 * abs(float(exact))
