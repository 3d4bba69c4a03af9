"""``import nqkv_core`` loads only torch and numpy: scipy, triton, transformers, matplotlib and torch's
compiler stack are imported by the functions that need them, on first use."""

import subprocess
import sys

HEAVY = ("scipy", "triton", "transformers", "matplotlib", "torch._dynamo", "torch._inductor", "nqkv_core.lab")


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_loads_no_heavy_module():
    assert _loaded_after("import nqkv_core") == []


def test_quantizing_a_tensor_loads_none_of_them():
    # quantizing a tensor needs none of them either (the NF codebook's quantiles are built once)
    loaded = _loaded_after(
        "import torch, nqkv_core; x = nqkv_core.NQTensor.from_float(torch.randn(2, 64), block=64, bits=4)")
    assert "transformers" not in loaded and "matplotlib" not in loaded and "nqkv_core.lab" not in loaded


def test_cache_is_imported_on_first_use():
    assert "transformers" in _loaded_after("import nqkv_core; nqkv_core.NQKVCache")
