#!/usr/bin/env bash
# The one command a session lent a GPU runs on the device machine: the CUDA tests, then
# benchmarks/gpu.py, in about 9 minutes; what they write comes back through $OUT.
#
# Here, once (optional: lets benchmarks/gpu.py time PyHessian's product too; the device has no PyHessian and no network):
#     bash benchmarks/gpu_session.sh --prepare
# Then, with the device tool (repository root; one call, ~10 minutes of the 15 a session has):
#     run(command="bash benchmarks/gpu_session.sh", timeout_s=600, carry=[".gpu_extra"])
# Back come, under files_at: env.txt, pytest.txt, pytest.xml, gpu.json, gpu.log.
#
# The device's image has its own python3 (/opt/torch/.venv, torch with CUDA, pytest, h5py, scipy, scikit-learn,
# matplotlib, tqdm): the project's code runs from this checkout on PYTHONPATH, nothing is installed.
set -u -o pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then  # here, not on the device: PyHessian (pure Python, MIT) from this venv
    here=python3; [ -x .venv/bin/python ] && here=.venv/bin/python
    source=$("$here" -c "import pyhessian, os; print(os.path.dirname(pyhessian.__file__))" 2>/dev/null) || {
        echo "PyHessian is not installed here (pip install pyhessian==0.1); the benchmark will mark it not installed"; exit 0; }
    rm -rf .gpu_extra && mkdir -p .gpu_extra && cp -r "$source" .gpu_extra/pyhessian
    grep -qx '/.gpu_extra/' .git/info/exclude 2>/dev/null || echo '/.gpu_extra/' >> .git/info/exclude
    echo "prepared .gpu_extra/pyhessian; pass carry=[\".gpu_extra\"] to the run"
    exit 0
fi

OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
PY=python3
[ -x /opt/torch/.venv/bin/python3 ] && PY=/opt/torch/.venv/bin/python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu_extra ] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_extra"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
began=$(date +%s)

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | head -3
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
print("tf32 cudnn", torch.backends.cudnn.allow_tf32, "matmul", torch.backends.cuda.matmul.allow_tf32)
for name in ("h5py", "scipy", "sklearn", "matplotlib", "tqdm", "pytest", "pyhessian", "pytest_timeout"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "ok"))
    except ImportError as error:
        print(name, "missing:", error)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. the CUDA tests (under 4 minutes; one test at most 120 s where pytest-timeout is there)
per_test=()
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)
timeout 220 "$PY" -m pytest -m cuda -q -p no:cacheprovider -rfEs ${per_test[@]+"${per_test[@]}"} --junitxml "$OUT/pytest.xml" \
    tests/test_cuda.py 2>&1 | tee "$OUT/pytest.txt"
tests=$?
echo "pytest exit $tests after $(( $(date +%s) - began )) s" | tee -a "$OUT/pytest.txt"

# 2. the benchmark (its own guard stops starting rows at --budget seconds; it rewrites its file after every row)
timeout 350 "$PY" benchmarks/gpu.py --device cuda --budget 300 --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
bench=$?
mkdir -p benchmarks/results && cp "$OUT/gpu.json" benchmarks/results/gpu.json 2>/dev/null
echo "benchmark exit $bench; session $(( $(date +%s) - began )) s" | tee -a "$OUT/gpu.log"
exit $(( tests != 0 || bench != 0 ))
