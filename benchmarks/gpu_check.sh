#!/usr/bin/env bash
# GPU check, end to end in a few minutes on one CUDA device:
#   1. the CUDA tests: Triton kernels against their torch references (compiled for the GPU, opcheck
#      with fake/AOT checks), the cache generating through them, compiled decode under CUDA graphs;
#   2. the kernel alone (benchmarks/sweep_triton_decode.py): launch configurations and decode paths
#      (general, lane order, lane order with the register lookup) of the Triton split-K decode
#      kernel over a 4-bit cache (the best goes into triton_decode.DECODE_CONFIG), against torch
#      SDPA in fp16 (flash) on the unquantized cache, GPU time under CUDA graphs;
#   3. decode on SmolLM2-135M's architecture (benchmarks/bench_gpu_decode.py): NQKVCache vs
#      DynamicCache / StaticCache in fp16, eager and compiled, at 4k-32k tokens, batch 1 and 8
#      (last: compiling the NQKV step takes minutes).
# Results go to $OUT (if set): gpu_check.log, tests.log, decode.csv / decode.md, sweep.md /
# sweep.csv / decode_config.json.
#   bash benchmarks/gpu_check.sh            (STAGES="tests sweep" picks stages)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT_DIR=${OUT:-/tmp/nqkv_gpu_check}
STAGES=${STAGES:-"tests sweep decode"}  # (run in this order whatever the order here)
DECODE_ARGS=${DECODE_ARGS:-"--contexts 4096 16384 32768 --batches 1 8 --compiled-contexts 16384 --steps 10"}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NQKV_NATIVE=0  # (the native kernels are CPU-only)
unset TRITON_INTERPRET

{
echo "== environment $(date -u +%H:%M:%S)"
$PY - <<'PY'
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
PY

if [[ $STAGES == *tests* ]]; then
  echo "== tests $(date -u +%H:%M:%S)"
  timeout ${TESTS_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider -n 4 tests/test_triton_kernels.py tests/test_cuda.py \
    > "$OUT_DIR/tests.log" 2>&1
  echo "tests exit code: $?"
  tail -25 "$OUT_DIR/tests.log"
fi

if [[ $STAGES == *sweep* ]]; then
  echo "== kernel sweep $(date -u +%H:%M:%S)"
  timeout ${SWEEP_TIMEOUT:-150} $PY benchmarks/sweep_triton_decode.py --out "$OUT_DIR"
  echo "sweep exit code: $?"
fi

if [[ $STAGES == *decode* ]]; then
  echo "== model decode $(date -u +%H:%M:%S)"
  timeout ${DECODE_TIMEOUT:-300} $PY benchmarks/bench_gpu_decode.py $DECODE_ARGS --out "$OUT_DIR" 2>&1 \
    | grep -v -e FutureWarning -e "return forward_call"
  echo "decode exit code: $?"
fi

echo "== done $(date -u +%H:%M:%S)"
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
