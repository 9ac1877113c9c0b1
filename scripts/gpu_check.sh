#!/usr/bin/env bash
# GPU check for libnet-plugin, for a machine with a CUDA GPU. Run from anywhere:
#
#     scripts/gpu_check.sh            # or: PYTHON=/path/to/python scripts/gpu_check.sh
#
# 1. prints the GPU and the torch build;
# 2. runs every test marked @pytest.mark.gpu (they skip themselves without CUDA);
# 3. runs a short CIFAR-shaped benchmark of library construction and scoring (the Table 1 sweep of the
#    CIFAR-10 experiment: 40 libraries of a ResNet44) on CUDA and on the CPU, and prints the numbers;
# 4. runs the project's benchmark suite on CUDA (python -m benchmarks.run --device cuda --quick) when it is
#    there, writing its report to a temporary folder.
#
# Each step has its own time limit (180 + 170 + 100 s); the whole script stays under 8 minutes. Exit
# status: 0 when all steps passed, 1 when a step failed or ran out of time, 2 when there is no usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
start=$(date +%s)
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
if ! "$PY" -c '
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA build: {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(1)
print("GPU 0:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
'; then
    echo "no CUDA GPU is usable from $PY: nothing to check here (the CPU suite is 'make test')"
    exit 2
fi

status=0
echo
echo "== GPU tests (pytest -m gpu)"
timeout 180 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests integration_tests
rc=$?
if [ $rc -eq 5 ]; then
    echo "no test is marked gpu"
elif [ $rc -ne 0 ]; then
    echo "GPU tests FAILED (exit status $rc; 124 = time limit)"
    status=1
fi

echo
echo "== CIFAR-shaped benchmark: Table 1 sweep + scoring, CUDA vs CPU"
timeout 170 "$PY" scripts/bench_cifar_sweep.py --devices cuda cpu --n-train 2000 --n-test 500 \
    --scale-n-train 20000
rc=$?
if [ $rc -ne 0 ]; then
    echo "benchmark FAILED (exit status $rc; 124 = time limit)"
    status=1
fi

if [ -f benchmarks/run.py ]; then
    echo
    echo "== benchmark suite (python -m benchmarks.run --device cuda --quick)"
    bench_out="$(mktemp -d "${TMPDIR:-/tmp}/libnet-bench.XXXXXX")"
    timeout 100 "$PY" -m benchmarks.run --device cuda --quick --out "$bench_out"
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "benchmark suite FAILED (exit status $rc; 124 = time limit)"
        status=1
    elif [ -f "$bench_out/report.md" ]; then
        cat "$bench_out/report.md"
    fi
fi

echo
echo "== done in $(( $(date +%s) - start )) s, status $status"
exit $status
