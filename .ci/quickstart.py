"""The README's first steps against an installed nqkv (``make install-check`` runs this from an empty
directory in a fresh virtual environment): quantize a tensor, then enable the cache on a small random
Llama and generate. Exits non-zero on any failure."""

import os
import shutil
import sys
from pathlib import Path

import torch

import nqkv_core
from nqkv_core import NQTensor, native

here = Path(nqkv_core.__file__).resolve().parent
assert "site-packages" in here.parts, f"nqkv_core imported from {here}, not from the installed wheel"
assert (here / "csrc" / "cpu_kernels.cpp").is_file(), "the wheel lacks the CPU kernels' source"

k = torch.randn(1, 8, 256, 128, dtype=torch.bfloat16)
qk = NQTensor.from_float(k, block=64, bits=4)
err = float((qk.dequantize().float() - k.float()).norm() / k.float().norm())
assert qk.dequantize().dtype == torch.bfloat16 and err < 0.15, err
print(qk, f"relative error {err:.4f}")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(1, 128, (1, 48))
reference = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
nq = nqkv_core.enable(model, bits=4)
out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **nq.generate_kwargs())
assert out.shape == (1, 56) and torch.equal(out[:, :48], ids), out.shape
print(f"generated {out[0, 48:].tolist()} (full precision: {reference[0, 48:].tolist()})")

if os.environ.get("NQKV_NATIVE") != "0" and shutil.which(os.environ.get("CXX", "g++")):
    # with a compiler at hand the kernels must build from the installed source, into NQKV_CACHE_DIR
    isa = native.vector_isa()
    assert isa != "none", "the native CPU kernels did not build from the installed wheel"
    cache_dir = os.environ.get("NQKV_CACHE_DIR")
    assert not cache_dir or any(Path(cache_dir).rglob("*.so")), f"no compiled kernel under {cache_dir}"
    print(f"native CPU kernels: {isa}")
print("quickstart OK")
sys.exit(0)
