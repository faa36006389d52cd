#!/usr/bin/env bash
# The one script to run on a bare GPU machine (repository copied there, no internet):
#   versions -> build the extension in place (CUDA kernels for sm_90) -> GPU tests -> benchmark -> per-head
#   targets and linear + CE (python -m auxfuse bench) -> host overhead -> last, the table of issues #4 and #5's
#   targets, met or missed (gpu_bench.py --verdict).
#
#   bash benchmarks/gpu_check.sh                 # logs, junit and gpu_results.json go to $OUT when set
#   PYTHON=/path/to/python3 bash benchmarks/gpu_check.sh
#
# Wheels in .whl/ (if any) are installed first with --no-index (the only installs this script does).
# A failing step is reported and the later steps still run (a failed build leaves the tests and the
# benchmark to say which backends could not run); the exit status is that of the first failing step.
# Expected time on an H200: build ~1-2 min, GPU tests ~2-3 min, Triton tests 2 min at most (capped), benchmark
# ~3-4 min (no new measurement starts after AUXFUSE_BENCH_BUDGET_S, default 130 s; torch.compile warm-ups
# dominate), per-head and linear + CE 2 min at most (capped), host overhead ~30 s.
set -euo pipefail
export PYTHONUNBUFFERED=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-}"
if [[ -n "$OUT_DIR" ]]; then
  mkdir -p "$OUT_DIR"
fi
# Test locations run with -m gpu; add more directories or files here. The Triton tests (tests/triton) run on
# CUDA tensors in a step of their own (they carry no gpu mark: on CPU they run in Triton's interpreter).
TEST_TARGETS=(tests --ignore=tests/triton)
# Wall-clock caps per step (seconds), so that the whole script fits one lease.
TESTS_TIMEOUT_S="${AUXFUSE_TESTS_TIMEOUT_S:-170}"
TRITON_CORE_TIMEOUT_S="${AUXFUSE_TRITON_CORE_TIMEOUT_S:-50}"
TRITON_TIMEOUT_S="${AUXFUSE_TRITON_TIMEOUT_S:-80}"
BENCH_TIMEOUT_S="${AUXFUSE_BENCH_TIMEOUT_S:-200}"
BENCH_ARGS=(--budget-s "${AUXFUSE_BENCH_BUDGET_S:-130}")

STATUS=0
note_failure() {  # note_failure STEP CODE
  echo "!! step '$1' failed with status $2" >&2
  if [[ "$STATUS" -eq 0 ]]; then STATUS="$2"; fi
}
log_to() {  # log_to NAME [LINES]: with $OUT, the whole log to $OUT/NAME and its last LINES here; else all here
  if [[ -n "$OUT_DIR" ]]; then
    if [[ -n "${2:-}" ]]; then tee "$OUT_DIR/$1" | tail -n "$2"; else tee "$OUT_DIR/$1"; fi
  else
    cat
  fi
}
section() { echo; echo "=================== $* ($(date -u +%H:%M:%S) UTC)"; }

section "machine"
nvidia-smi || echo "nvidia-smi failed"
"$PY" - <<'EOF' || note_failure versions $?
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB")
for name in ("triton", "numpy", "pytest", "setuptools", "ninja", "liger_kernel"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "not importable:", type(error).__name__)
EOF

# The CUDA toolkit for the build: $CUDA_HOME if set, else setup.py's choice (nvcc's folder when it has lib64,
# else /usr/local/cuda).
NVCC=""
if [[ -n "${CUDA_HOME:-}" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  NVCC=/usr/local/cuda/bin/nvcc
elif command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
fi
if [[ -n "$NVCC" && -x "$NVCC" ]]; then
  echo "nvcc: $NVCC (CUDA_HOME=${CUDA_HOME:-<setup.py decides>})"
  "$NVCC" --version | tail -2
else
  echo "!! no nvcc found (set CUDA_HOME): the CUDA kernels cannot be built" >&2
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  section "wheels from .whl/"
  "$PY" -m pip install --no-index --no-deps .whl/*.whl 2>&1 | log_to pip.log || note_failure wheels $?
fi

section "build (in place, sm_90)"
BUILD_START=$SECONDS
if AUXFUSE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16 "$PY" setup.py build_ext --inplace 2>&1 \
    | log_to build.log 40; then
  echo "build took $((SECONDS - BUILD_START)) s"
else
  note_failure build $?
fi
"$PY" -c "import auxfuse, json; print('available backends:', json.dumps(auxfuse.available_backends(), indent=1))" \
  || note_failure import $?

section "GPU tests: ${TEST_TARGETS[*]}"
JUNIT=()
if [[ -n "$OUT_DIR" ]]; then JUNIT=(--junitxml "$OUT_DIR/junit-gpu.xml"); fi
TEST_START=$SECONDS
timeout "$TESTS_TIMEOUT_S" "$PY" -m pytest "${TEST_TARGETS[@]}" -m gpu -q -ra --tb=short -p no:cacheprovider \
  "${JUNIT[@]}" 2>&1 | log_to pytest-gpu.log 150 || note_failure tests $?
echo "tests took $((SECONDS - TEST_START)) s"

# On a GPU each new kernel specialization is a JIT compile, so the whole file does not fit its cap (76 of its
# tests ran in 90 s on the H200): the core checks go first, then the rest in file order with what is left.
TRITON_CORE="invalid or torch_compile_fullgraph or deterministic or all_ignored or empty_batch or confident_bf16 \
or eager_call_fills_nothing or grad_in_forward_in_place or traced_forward_goes_through_the_op"
section "Triton tests on CUDA tensors: tests/triton (core first)"
TEST_START=$SECONDS
AUXFUSE_TRITON_AUTOTUNE=0 timeout "$TRITON_CORE_TIMEOUT_S" "$PY" -m pytest tests/triton -k "$TRITON_CORE" -q -ra \
  --tb=short -p no:cacheprovider 2>&1 | log_to pytest-triton-core.log 40 || note_failure triton-core-tests $?
echo "triton core tests took $((SECONDS - TEST_START)) s"
TEST_START=$SECONDS
AUXFUSE_TRITON_AUTOTUNE=0 timeout "$TRITON_TIMEOUT_S" "$PY" -m pytest tests/triton -k "not ($TRITON_CORE)" -q -ra \
  --tb=short -p no:cacheprovider 2>&1 | log_to pytest-triton.log 40 || note_failure triton-tests $?
echo "triton tests took $((SECONDS - TEST_START)) s"

section "benchmark"
RESULTS_JSON="${OUT_DIR:-${TMPDIR:-/tmp}}/gpu_results.json"
rm -f "$RESULTS_JSON"  # the verdict below must never read an older run's results
timeout "$BENCH_TIMEOUT_S" "$PY" benchmarks/gpu_bench.py "${BENCH_ARGS[@]}" --json "$RESULTS_JSON" 2>&1 \
  | log_to gpu_bench.log || note_failure bench $?

# Issues #18 and #19: one target per head (deep supervision, multi-token, multi-task) and the fused linear + CE,
# each against the naive loop and torch.compile of it, with max_memory_allocated per provider.
section "per-head targets and linear + CE: python -m auxfuse bench"
PER_HEAD_JSON="${OUT_DIR:-${TMPDIR:-/tmp}}/per_head_bench.json"
timeout "${AUXFUSE_PER_HEAD_BENCH_TIMEOUT_S:-120}" "$PY" -m auxfuse bench --device cuda \
  --shapes deep_supervision,multi_token,multi_task,linear --dtype bfloat16 --mode forward+backward --seconds 1.5 \
  --passes 1 --json "$PER_HEAD_JSON" --plot "" 2>&1 | log_to per_head_bench.log || note_failure per-head-bench $?

section "host overhead: benchmarks/test_bench_host.py"
HOST_JSON=()
if [[ -n "$OUT_DIR" ]]; then HOST_JSON=(--benchmark-json "$OUT_DIR/host_overhead.json"); fi
timeout "${AUXFUSE_HOST_TIMEOUT_S:-45}" "$PY" -m pytest benchmarks/test_bench_host.py --benchmark-only -q \
  -p no:cacheprovider "${HOST_JSON[@]}" 2>&1 | log_to host_overhead.log 8 || note_failure host-overhead $?

section "the targets of issues #4 and #5, from $RESULTS_JSON"
if [[ -f "$RESULTS_JSON" ]]; then
  "$PY" benchmarks/gpu_bench.py --verdict "$RESULTS_JSON" || note_failure verdict $?
else
  echo "no benchmark results"
fi

section "done: status $STATUS"
exit "$STATUS"
