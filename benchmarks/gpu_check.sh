#!/usr/bin/env bash
# GPU check in under 8 minutes on one CUDA device (H100 / H200):
#   kernel  benchmarks/gpu_decode_check.py: device and versions; the grouped decode kernel (the CUDA
#           decode path of the presets' 4-bit layout), with and without the RoPE-centre key bias it
#           computes itself, against the torch reference; a streaming-read kernel over the same bytes
#           (achievable GB/s); under CUDA graphs the grouped kernel (also with that key bias, in the
#           kernel and as a dense mask), the split-K kernel it replaces and fp16 flash SDPA at
#           (batch, kv heads, group, head_dim, tokens) = (1,3,3,64,{16k,32k}), (8,3,3,64,32k),
#           (1,8,4,128,{32k,64k}), (8,8,4,128,32k);
#   tests   tests/test_triton_kernels.py compiled for the GPU (every kernel against its reference,
#           the register lookup, opcheck with fake/AOT checks), and the traced step's attention over
#           the tokens present through the grouped kernel (against the whole-body path; captured in
#           a CUDA graph and replayed at other lengths without a host sync);
#   eager   benchmarks/bench_gpu_decode.py, eager steps only: SmolLM2-135M's architecture (bf16, random
#           weights) at 16k tokens, NQKV eager (the step's Triton launches) vs DynamicCache eager.
# Longer optional stages (not in the 8 minutes): sweep (benchmarks/sweep_triton_decode.py, launch
# configurations of the split-K kernel), decode (benchmarks/bench_gpu_decode.py, SmolLM2-135M's
# architecture end to end), cuda_tests (tests/test_cuda.py: compiled decode steps, minutes).
# Results go to the first argument, else $OUT, else /tmp/nqkv_gpu_check: gpu_check.json and
# gpu_check.md (stage exit codes and the kernel figures), gpu_decode_check.json / .md, tests.log,
# eager/decode.md, gpu_check.log.
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (STAGES="kernel tests eager sweep decode cuda_tests")
#   STAGES=kernel KERNEL_ARGS=--dry-run bash benchmarks/gpu_check.sh /tmp/check   (CPU: checks the script)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT_DIR=${1:-${OUT:-/tmp/nqkv_gpu_check}}
STAGES=${STAGES:-"kernel tests eager"}  # (run in this order whatever the order here)
DECODE_ARGS=${DECODE_ARGS:-"--contexts 4096 16384 32768 --batches 1 8 --compiled-contexts 16384 --steps 10"}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NQKV_NATIVE=0  # (the native kernels are CPU-only)
unset TRITON_INTERPRET
KERNEL_RC=skipped TESTS_RC=skipped EAGER_RC=skipped SWEEP_RC=skipped DECODE_RC=skipped CUDA_TESTS_RC=skipped

{
echo "== environment $(date -u +%H:%M:%S)"
$PY - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
PY

if [[ $STAGES == *kernel* ]]; then
  echo "== grouped decode kernel $(date -u +%H:%M:%S)"
  timeout ${KERNEL_TIMEOUT:-270} $PY benchmarks/gpu_decode_check.py --out "$OUT_DIR" ${KERNEL_ARGS:-}
  KERNEL_RC=$?
  echo "kernel exit code: $KERNEL_RC"
fi

if [[ $STAGES == *tests* ]]; then
  echo "== kernel tests $(date -u +%H:%M:%S)"
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")  # (compiling the kernels dominates: in parallel)
  timeout ${TESTS_TIMEOUT:-150} $PY -m pytest -q -p no:cacheprovider $XDIST tests/test_triton_kernels.py \
    "tests/test_cache_compiled.py::test_kernel_path_matches_the_whole_body_path" \
    "tests/test_cache_compiled.py::test_kernel_path_captures_in_a_cuda_graph" > "$OUT_DIR/tests.log" 2>&1
  TESTS_RC=$?
  echo "tests exit code: $TESTS_RC"
  tail -15 "$OUT_DIR/tests.log"
fi

if [[ $STAGES == *eager* ]]; then
  echo "== eager decode steps $(date -u +%H:%M:%S)"
  timeout ${EAGER_TIMEOUT:-60} $PY benchmarks/bench_gpu_decode.py --contexts 16384 --batches 1 --dtype bfloat16 \
    --steps 10 --variants "DynamicCache eager" "NQKV eager" --out "$OUT_DIR/eager" 2>&1 \
    | grep -v -e FutureWarning -e "return forward_call"
  EAGER_RC=${PIPESTATUS[0]}
  echo "eager exit code: $EAGER_RC"
fi

if [[ $STAGES == *sweep* ]]; then
  echo "== split-K kernel sweep $(date -u +%H:%M:%S)"
  timeout ${SWEEP_TIMEOUT:-150} $PY benchmarks/sweep_triton_decode.py --out "$OUT_DIR"
  SWEEP_RC=$?
  echo "sweep exit code: $SWEEP_RC"
fi

if [[ $STAGES == *decode* ]]; then
  echo "== model decode $(date -u +%H:%M:%S)"
  timeout ${DECODE_TIMEOUT:-300} $PY benchmarks/bench_gpu_decode.py $DECODE_ARGS --out "$OUT_DIR" 2>&1 \
    | grep -v -e FutureWarning -e "return forward_call"
  DECODE_RC=${PIPESTATUS[0]}
  echo "decode exit code: $DECODE_RC"
fi

if [[ $STAGES == *cuda_tests* ]]; then
  echo "== CUDA tests $(date -u +%H:%M:%S)"
  timeout ${CUDA_TESTS_TIMEOUT:-600} $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    > "$OUT_DIR/cuda_tests.log" 2>&1
  CUDA_TESTS_RC=$?
  echo "CUDA tests exit code: $CUDA_TESTS_RC"
  tail -15 "$OUT_DIR/cuda_tests.log"
fi

# -- summary: stage exit codes (124: timed out) and the kernel figures, as JSON and Markdown --
OUT_DIR="$OUT_DIR" KERNEL_RC=$KERNEL_RC TESTS_RC=$TESTS_RC EAGER_RC=$EAGER_RC SWEEP_RC=$SWEEP_RC DECODE_RC=$DECODE_RC \
CUDA_TESTS_RC=$CUDA_TESTS_RC $PY - <<'PY'
import json, os, pathlib
out = pathlib.Path(os.environ["OUT_DIR"])
stages = {s: os.environ[f"{s.upper()}_RC"] for s in ("kernel", "tests", "eager", "sweep", "decode", "cuda_tests")}
tests = out / "tests.log"
summary = dict(stages=stages, tests_summary=tests.read_text().strip().splitlines()[-1] if tests.exists() else None)
kernel = out / "gpu_decode_check.json"
if kernel.exists():
    summary["kernel"] = json.loads(kernel.read_text())
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
md = ["# GPU check", "", "| stage | exit code |", "|---|---|"] + [f"| {k} | {v} |" for k, v in stages.items()]
if summary["tests_summary"]:
    md += ["", f"Kernel tests: {summary['tests_summary']}"]
kernel_md = out / "gpu_decode_check.md"
if kernel_md.exists():
    md += ["", kernel_md.read_text()]
eager_md = out / "eager" / "decode.md"
if eager_md.exists():
    md += ["", "## Eager decode steps", "", eager_md.read_text()]
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
PY

echo "== done $(date -u +%H:%M:%S)"
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
