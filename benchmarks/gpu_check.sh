#!/usr/bin/env bash
# GPU check, end to end in a few minutes on one CUDA device:
#   1. the CUDA tests: Triton kernels against their torch references (compiled for the GPU, opcheck
#      with fake/AOT checks), the cache generating through them, compiled decode under CUDA graphs;
#   2. decode on SmolLM2-135M's architecture (benchmarks/bench_gpu_decode.py): NQKVCache vs
#      DynamicCache / StaticCache in fp16, eager and compiled, at 4k-32k tokens, batch 1 and 8;
#   3. the kernel alone: nqkv's Triton split-K decode over a 4-bit cache vs torch SDPA in fp16
#      (flash) on the unquantized cache, 4k-128k tokens, with the achieved memory bandwidth of each.
# Results go to $OUT (if set): gpu_check.log, tests.log, decode.csv / decode.md, kernel.csv.
#   bash benchmarks/gpu_check.sh            (STAGES="tests decode kernel" picks stages)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT_DIR=${OUT:-/tmp/nqkv_gpu_check}
STAGES=${STAGES:-"tests decode kernel"}
DECODE_ARGS=${DECODE_ARGS:-"--contexts 4096 16384 32768 --batches 1 8 --compiled-contexts 16384"}
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

if [[ $STAGES == *decode* ]]; then
  echo "== model decode $(date -u +%H:%M:%S)"
  timeout ${DECODE_TIMEOUT:-300} $PY benchmarks/bench_gpu_decode.py $DECODE_ARGS --out "$OUT_DIR" 2>&1 \
    | grep -v -e FutureWarning -e "return forward_call"
  echo "decode exit code: $?"
fi

if [[ $STAGES == *kernel* ]]; then
echo "== kernel decode timing $(date -u +%H:%M:%S)"
OUT_DIR="$OUT_DIR" timeout ${KERNEL_TIMEOUT:-120} $PY - <<'PY'
import os, torch, torch.nn.functional as F
import nqkv_core.ops
from nqkv_core import NQTensor
from nqkv_core.ops import triton_decode
from torch.nn.attention import sdpa_kernel, SDPBackend

def timed(fn, reps=20):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2] / 1e3

rows = ["tokens,batch,kv_heads,head_dim,nqkv_ms,nqkv_GBps,sdpa_fp16_ms,sdpa_GBps,speedup,max_abs_err"]
b, hkv, g, d = 1, 8, 4, 128
for t in (4096, 16384, 65536, 131072):
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16)
    q = torch.randn(b, hkv * g, 1, d, device="cuda", dtype=torch.float16)
    K, V = NQTensor.from_float(k, block=64, bits=4), NQTensor.from_float(v, block=64, bits=4)
    args = (q, K.codes, K.absmax, K.codebook, 64, 3, V.codes, V.absmax, V.codebook, 64, 3, None, None, None, d ** -0.5, False)
    nq = timed(lambda: torch.ops.nqkv.flash_decode(*args))
    qf = q.view(b, hkv, g, d)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fp = timed(lambda: F.scaled_dot_product_attention(qf, k, v))
    except RuntimeError:
        fp = timed(lambda: F.scaled_dot_product_attention(qf, k, v))
    ref = F.scaled_dot_product_attention(q.float(), K.dequantize(torch.float32), V.dequantize(torch.float32), enable_gqa=True)
    err = (torch.ops.nqkv.flash_decode(*args).float() - ref).abs().max().item()
    qbytes, fbytes = K.nbytes + V.nbytes, k.nbytes + v.nbytes
    rows.append(f"{t},{b},{hkv},{d},{nq*1e3:.3f},{qbytes/nq/1e9:.0f},{fp*1e3:.3f},{fbytes/fp/1e9:.0f},{fp/nq:.2f},{err:.2e}")
    print(rows[-1], flush=True)
open(os.path.join(os.environ["OUT_DIR"], "kernel.csv"), "w").write("\n".join(rows) + "\n")
PY
echo "kernel timing exit code: $?"
fi
echo "== done $(date -u +%H:%M:%S)"
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
