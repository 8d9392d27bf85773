#!/usr/bin/env bash
# The prepared GPU run of issue #19 (Triton kernels): one command, sized to finish inside a 10-minute call.
#
#   bash scripts/gpu_check.sh            # from the repository root, on a machine with one CUDA GPU
#
# (With a lent device machine: one call of this command with a 600 s limit, carrying .whl/ if prepared; the
# phases' limits below add up to about 9 minutes, and the reports also come back under $OUT.)
#
# 1. the Triton tests compiled for the GPU (no TRITON_INTERPRET): exact/block-sparse attention fwd/bwd,
#    split-KV decode (contiguous and paged), the linear chunk and recurrent kernels and their front ends;
# 2. `python -m effattn bench linear --device cuda`: effattn torch vs triton vs fla chunk kernels (gated delta
#    rule, simple GLA), bf16, B*T = 16k tokens, H = 16, D = 64 and 128, T = 1k..32k;
# 3. `python -m effattn bench attention --device cuda`: triton vs flash_attn (FA2) vs SDPA (and SDPA held to
#    its FA2 backend) vs compiled FlexAttention, dense causal and 1/16-dense block-sparse (one BlockMask).
#
# Reports: docs/results/linear_cuda/ (linear_gpu.{md,json}, triton_tests.log) and docs/results/attention_cuda/
# (attention_gpu.{md,json}, triton_tests.log), plus docs/results/attention_cuda/gpu_check.log (GPU, versions,
# each phase's exit status, the benchmarks' output). Each benchmark rewrites its report after every row, so a phase cut by its time
# limit keeps what it measured. Where $OUT is set (the device tool's output folder) the reports are copied
# there too. Targets (docs/exact.md, docs/linear.md): triton >= 0.8x FA2 fwd+bwd on dense causal, >= Flex on
# block-sparse at 1/16 density, chunk gated delta rule >= 0.8x fla.
#
# Installs nothing. Needs python with torch (CUDA) and triton; effattn is taken from src/ when it is not
# installed. Optional baselines are used when importable: flash_attn, and fla. fla is pure Python and can
# travel as wheels to a machine without network (from the repository root, where pip works; .whl/ is ignored
# by git):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0
# this script then adds them with `pip install --no-index --no-deps --target /tmp/effattn_site .whl/*.whl`.
#
# Time limits per phase (seconds; override by environment): TESTS_EXACT_S, TESTS_LINEAR_S, BENCH_LINEAR_S,
# BENCH_ATTN_S; LENGTHS (comma-separated, default the issue's 1k..32k), REPEATS (default 5), WORKERS (pytest
# workers for the compile-heavy tests, default 8). DRY_RUN=1 only prints the phases (a check of the script on a
# machine without a GPU; writes the log under docs/results/attention_cuda/).
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi
TESTS_EXACT_S=${TESTS_EXACT_S:-150}
TESTS_LINEAR_S=${TESTS_LINEAR_S:-75}
BENCH_LINEAR_S=${BENCH_LINEAR_S:-140}
BENCH_ATTN_S=${BENCH_ATTN_S:-180}
LENGTHS=${LENGTHS:-1024,2048,4096,8192,16384,32768}
REPEATS=${REPEATS:-5}
WORKERS=${WORKERS:-8}
ATT=docs/results/attention_cuda
LIN=docs/results/linear_cuda
LOG=$ATT/gpu_check.log
mkdir -p "$ATT" "$LIN"
rm -f "$ATT/triton_tests.log" "$LIN/triton_tests.log"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels on the GPU, not the interpreter

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/effattn_site .whl/*.whl \
        && export PYTHONPATH="/tmp/effattn_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import effattn" 2>/dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

copy_out() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/attention_cuda" "$OUT/linear_cuda"
        cp "$ATT"/attention_gpu.* "$ATT"/*.log "$OUT/attention_cuda/" 2>/dev/null
        cp "$LIN"/linear_gpu.* "$LIN"/*.log "$OUT/linear_cuda/" 2>/dev/null
    fi
    return 0
}

phase() {  # phase NAME SECONDS LOGFILE COMMAND...: run with a time limit, record the exit status
    local name=$1 secs=$2 log=$3
    shift 3
    local t0=$SECONDS
    echo "== $name (limit ${secs}s): $*" | tee -a "$LOG"
    set -o pipefail
    if [ -n "${DRY_RUN:-}" ]; then
        echo "dry run: $*" | tee -a "$log"
    else
        timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$log"
    fi
    local rc=$?
    set +o pipefail
    echo "== $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit: partial)')" | tee -a "$LOG"
    copy_out
}

{
    echo "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi -L 2>&1 || echo "nvidia-smi: not found"
    "$PY" - <<'EOF'
import importlib.util
import torch
print(f"python {__import__('sys').version.split()[0]}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "flash_attn", "fla", "effattn"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(f"{name}: not importable")
        continue
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'version unknown')} ({spec.origin})")
    except Exception as e:  # noqa: BLE001 - report, go on
        print(f"{name}: import failed: {type(e).__name__}: {e}")
EOF
} 2>&1 | tee "$LOG"

if [ -z "${DRY_RUN:-}" ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA GPU visible to $PY: nothing measured" | tee -a "$LOG"
    copy_out
    exit 1
fi

XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$WORKERS")  # parallel workers compile kernels in parallel
phase "triton tests: exact attention and decode" "$TESTS_EXACT_S" "$ATT/triton_tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} --maxfail=25 -rfE \
    tests/exact/test_triton.py tests/exact/test_triton_decode.py
phase "triton tests: linear kernels and front ends" "$TESTS_LINEAR_S" "$LIN/triton_tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} --maxfail=25 -rfE \
    tests/linear/test_triton_linear.py tests/linear/test_triton_frontends.py
phase "bench linear --device cuda" "$BENCH_LINEAR_S" "$LOG" \
    "$PY" -m effattn bench linear --device cuda --lengths "$LENGTHS" --repeats "$REPEATS" --out "$LIN"
phase "bench attention --device cuda" "$BENCH_ATTN_S" "$LOG" \
    "$PY" -m effattn bench attention --device cuda --lengths "$LENGTHS" --repeats "$REPEATS" --out "$ATT"
echo "done; reports in $ATT and $LIN" | tee -a "$LOG"
copy_out
