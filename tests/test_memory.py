"""Memory: sizes, free memory under a real address-space limit, the predicted peak of each HVP path against
the measured one at ResNet-20 size, exact products when only some gradient graphs fit, and the one-line refusal of a
real `landscape measure` process that cannot fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape.engine.memory import GRAPH_OVERHEAD, available_bytes, format_size, parse_size
from landscape.engine.objective import Objective
from landscape.inputs.checkpoints import save_checkpoint
from landscape.inputs.models import model_for_data
from tests.ground_truth import rel_err
from tests.model_zoo import CifarResNet

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_sizes_read_and_written_for_people():
    assert parse_size("8GiB") == 8 * 2**30 and parse_size("512MB") == 512 * 10**6 and parse_size("2G") == 2 * 2**30
    assert parse_size("1e9") == 10**9 and parse_size(4096) == 4096 and parse_size("1.5 KiB") == 1536
    with pytest.raises(ValueError, match="cannot read '8 apples' as a memory size"):
        parse_size("8 apples")
    assert format_size(3 * 2**30) == "3.0 GiB" and format_size(340 * 2**20) == "340 MiB" and format_size(12) == "12 B"


@pytest.mark.cli
def test_free_memory_respects_the_address_space_limit():
    """Under `ulimit -v`, what a process may still map is the limit less its size, not the machine's free memory."""
    script = (
        "import resource; from landscape.engine.memory import available_bytes, _mapped_bytes; "
        "print(available_bytes('cpu'), _mapped_bytes(), resource.getrlimit(resource.RLIMIT_AS)[0])"
    )
    limit_kib = 6 * 2**20
    out = subprocess.run(
        ["bash", "-c", f'ulimit -v {limit_kib}; {sys.executable} -c "{script}"'],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    free, mapped, limit = map(int, out.stdout.split())
    assert limit == limit_kib * 1024 and 0 < free <= limit - mapped + 2**20
    assert available_bytes("cpu") > 0


def test_products_stay_exact_when_only_some_graphs_fit():
    """At real size (ResNet-20, in-place residual adds): one batch's graph kept and two streamed, against double backward."""
    torch.manual_seed(0)
    model = CifarResNet()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    reference = Objective(model, batches, device="cpu", hvp_method="double-backward")
    budget = 1.5 * GRAPH_OVERHEAD["kept"] * reference._graph_bytes(batches[0])
    partial = Objective(model, batches, device="cpu", graph_memory_budget=budget)
    assert partial.hvp_method == "reuse" and partial.memory_plan.kept_batches == 1
    V = torch.randn(2, reference.n_params, generator=g)
    expected = reference.hvp_batched(V)
    for _ in range(2):
        assert rel_err(partial.hvp_batched(V), expected) <= 1e-4
    assert partial.hvp_check_result.passed


PEAK_SCRIPT = """
import gc, json, sys, torch
torch.set_num_threads(1)
from landscape.inputs.models import model_for_data
from landscape.engine.memory import GRAPH_OVERHEAD
from landscape.engine.objective import Objective
path, keep = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model, _ = model_for_data("resnet20", (3, 32, 32), num_classes=10)
g = torch.Generator().manual_seed(0)
batches = [(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(3)]
probe = Objective(model, batches, device="cpu", hvp_method="double-backward", hvp_check=False)
budget = (keep + 0.5) * GRAPH_OVERHEAD["kept"] * probe._graph_bytes(batches[0]) if path == "reuse" else None
del probe
objective = Objective(model, batches, device="cpu", hvp_method=path, hvp_check=False, graph_memory_budget=budget)
def rss(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
gc.collect()
base = rss("VmRSS")
v = torch.randn(2, objective.n_params, generator=g)
for _ in range(2):
    objective.hvp_batched(v)
print(json.dumps({"kept": objective.memory_plan.kept_batches, "predicted": objective.memory_plan.predicted_peak_bytes,
                  "measured": rss("VmHWM") - base}))
"""


@pytest.mark.cli
@pytest.mark.parametrize("path, keep", [("reuse", 1), ("reuse", 3), ("double-backward", 0)])
def test_predicted_peak_is_within_30_percent_of_the_measured_one(path, keep):
    """ResNet-20 on 3 batches of 64 CIFAR-shaped images, each path in its own process, peak resident memory measured."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, path, str(keep)], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kept"] == keep
    assert 0.7 <= result["measured"] / result["predicted"] <= 1.3, result


DATA_MODULE = """
import torch

def cifar_shaped():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
    return x, y, x[:16], y[:16]
"""


@pytest.mark.cli
def test_a_measurement_that_cannot_fit_is_refused_at_once_in_one_line(tmp_path):
    """A real `landscape measure` process under an address-space limit: ResNet-20 on batches of 512 images needs
    ~4 GiB for one batch's gradient graph; it stops before any product with one line naming the need, what is
    free and a batch size that fits, and the same command with that batch size runs."""
    (tmp_path / "cifar_shaped_data.py").write_text(DATA_MODULE)
    torch.manual_seed(0)
    model, spec = model_for_data("resnet20", (3, 32, 32), num_classes=10)
    checkpoint = save_checkpoint(
        tmp_path / "resnet20.pt",
        model,
        model_spec=spec,
        data_spec={"spec": "cifar_shaped_data:cifar_shaped", "seed": 0, "normalize": None},
    )
    env = {**ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    sized = subprocess.run(
        [
            sys.executable,
            "-c",
            "import analysis.cli.measure, landscape.engine.from_checkpoint, landscape.engine.memory as m; print(m._mapped_bytes())",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    limit_kib = (int(sized.stdout.strip()) + 1200 * 2**20) // 1024  # start-up, the data, and ~1 GiB to spare
    command = f"{sys.executable} -m analysis.cli measure {checkpoint} --metrics eig --k 1 --max-matvecs 4 --quiet"
    out = subprocess.run(
        ["bash", "-c", f"ulimit -v {limit_kib}; {command} --batch-size 512"], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("landscape measure: error: not enough memory on cpu: HVPs by reuse need about ")
    assert "GiB but " in line and " is free; use --batch-size " in line
    fitting = int(line.split("--batch-size ")[1].split()[0])
    assert 8 <= fitting < 512
    ran = subprocess.run(
        ["bash", "-c", f"ulimit -v {limit_kib}; {command} --batch-size {fitting} --n-samples 128 --json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)[0]
    plan, process = report["hvp_memory"], report["memory"]
    assert plan["path"] == "reuse" and plan["predicted_peak_bytes"] <= plan["available_bytes"]
    assert 0.7 <= process["measured_over_predicted"] <= 1.3, process  # the whole process, as the kernel counts it


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.2 GiB total capacity)\nmore"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)"
        ),
    ],
)
def test_running_out_of_memory_mid_run_is_one_line(tmp_path, monkeypatch, capsys, error):
    """An allocation that fails inside a product (CUDA, or a CPU allocator refused) ends the command with one line
    naming the options that need less memory, not a traceback."""
    from analysis.cli import main

    torch.manual_seed(0)
    model, spec = model_for_data("mlp", (1, 8, 8), num_classes=10)
    checkpoint = save_checkpoint(
        tmp_path / "mlp.pt", model, model_spec=spec, data_spec={"spec": "digits", "seed": 0, "normalize": None}
    )

    def fails(self, V):
        raise error

    monkeypatch.setattr(Objective, "hvp_batched", fails)
    assert main(["measure", str(checkpoint), "--metrics", "eig", "--n-samples", "64", "--quiet"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("landscape measure: error: out of memory (")
    assert line.endswith("use a smaller --batch-size, --hvp double-backward or fewer --n-samples")


COMPILED_SCRIPT = """
import torch
from landscape.engine.objective import Objective
from tests.ground_truth import dense_hessian
from tests.helpers import classification_batches, tiny_convnet_bn, tiny_mlp
cases = [(tiny_mlp(), (12,), 4, [20, 20, 10], "eval"), (tiny_convnet_bn(), (1, 4, 4), 3, [16, 16, 8], "train")]
for model, shape, classes, sizes, mode in cases:  # the second model recompiles in the same process
    _, _, batches = classification_batches(sum(sizes), shape, classes, sizes)
    H = dense_hessian(model, batches, mode)
    objective = Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method="compiled", mode=mode)
    V = torch.randn(2, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        error = float((objective.hvp_batched(V) - V @ H).norm() / (V @ H).norm())
        assert error <= 1e-10, error
    assert objective.hvp_check_result.passed and objective.hvp_method == "compiled"
print("ok")
"""


@pytest.mark.cli
def test_the_compiled_path_equals_the_dense_hessian():
    """`--hvp compiled` (torch.compile'd forward-over-reverse, meant for GPUs) in a fresh process, against dense
    Hessians: an MLP, then a BN ConvNet in train mode (a recompile, which went to dynamic shapes and failed before
    compilation was made static), each twice (the second call replays the compiled graph)."""
    out = subprocess.run([sys.executable, "-c", COMPILED_SCRIPT], capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_lanczos_vectors_follow_the_memory_the_hvps_leave():
    """--max-vectors' default takes half the memory the HVP graph leaves; too little for even 2k + 10 vectors, or a
    --max-vectors that does not fit, is one line naming what would."""
    from dataclasses import replace

    from analysis.measures.options import MetricSpec
    from analysis.measures.solver_memory import SOLVER_TEMPORARIES, lanczos_vectors
    from landscape.engine.memory import InsufficientMemory
    from tests.helpers import classification_batches, tiny_mlp

    objective = Objective(tiny_mlp(), classification_batches(16, (12,), 4, [16])[2], device="cpu")
    n, size = objective.n_params, objective.n_params * 4

    def with_free(vectors: float) -> None:  # room for `vectors` beside Lanczos's temporaries
        plan = objective.memory_plan
        available = plan.predicted_peak_bytes + (vectors + SOLVER_TEMPORARIES) * size
        objective.memory_plan = replace(plan, available_bytes=int(available))

    def vectors(spec: MetricSpec, length: int | None = None) -> int:
        return lanczos_vectors(objective, n, torch.float32, spec.k, spec.max_matvecs, spec.max_vectors, length)

    spec = MetricSpec(k=1)
    with_free(1000)
    assert vectors(spec) == min(300, n) + 5  # every vector it can use: no restart
    with_free(60)
    assert vectors(spec) == 30
    # a rank holding half of every vector (--shard over two ranks): (60 + 8) whole vectors' bytes are 136 halves,
    # 128 of them beside the temporaries, and the default takes half of those
    assert vectors(spec, length=n // 2) == 64
    with_free(14)
    assert vectors(spec) == 12  # never fewer than 2k + 10
    with_free(11)
    with pytest.raises(
        InsufficientMemory,
        match=rf"Lanczos holds 12 vectors of {n} parameters .* use a smaller --k, a smaller --batch-size or a larger device$",
    ):
        vectors(spec)
    with_free(20)
    with pytest.raises(InsufficientMemory, match=r"use --max-vectors 18 \(more restarts\), a smaller --batch-size or"):
        vectors(replace(spec, max_vectors=40))


@pytest.mark.cli
def test_a_bounded_lanczos_basis_says_how_often_it_restarted(tmp_path):
    """A real `landscape measure --max-vectors`: the eigenvalues of the full basis, and the table and JSON say so."""
    from tests.helpers import digits_mlp_checkpoint, run_cli

    checkpoint = digits_mlp_checkpoint(tmp_path, (32,))
    common = ["measure", str(checkpoint), "--metrics", "eig", "--k", "3", "--n-samples", "256", "--quiet"]
    full = json.loads(run_cli(*common, "--json").stdout)[0]["metrics"]["eig"]
    bounded_run = run_cli(*common, "--max-vectors", "16")
    assert bounded_run.returncode == 0, bounded_run.stderr
    assert " restarts in " in bounded_run.stdout and " vectors" in bounded_run.stdout
    bounded = json.loads(run_cli(*common, "--max-vectors", "16", "--json").stdout)[0]["metrics"]["eig"]
    assert full["restarts"] == 0 < bounded["restarts"] and bounded["stored_vectors"] <= 16 and bounded["certified"]
    np.testing.assert_allclose(bounded["values"], full["values"], rtol=2e-3)
    refused = run_cli(*common, "--max-vectors", "5")
    assert (
        refused.returncode == 2
        and "--max-vectors 5 leaves Lanczos no room to restart for --k 3; give at least 13" in refused.stderr
    )
