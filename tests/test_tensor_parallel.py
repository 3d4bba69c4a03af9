"""Tensor parallelism: transformers' ``tp_plan="auto"`` under ``torchrun`` (gloo, 2 CPU ranks).

Each rank's attention holds its own KV heads, so each rank's NQKV cache stores only those (the
layer takes its heads from the keys it is given); the generated tokens equal one process's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")

WORKER = r'''
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import torch
from transformers import AutoModelForCausalLM
import nqkv_core

model_dir, out = sys.argv[1], sys.argv[2]
kw = dict(tp_plan="auto") if "WORLD_SIZE" in os.environ else {}
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
nq = nqkv_core.enable(model, bits=4)
ids = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(1))
kwargs = nq.generate_kwargs()
tokens = model.generate(ids, **kwargs, max_new_tokens=16, do_sample=False, pad_token_id=0)
cache = next(v for v in kwargs.values() if isinstance(v, nqkv_core.NQKVCache))
rank = int(os.environ.get("RANK", 0))
with open(f"{out}.{rank}.json", "w") as f:
    json.dump({"tokens": tokens.tolist(), "kv_heads": [layer.num_heads for layer in cache.layers]}, f)
'''


@pytest.mark.slow
def test_two_ranks_generate_the_tokens_of_one_process(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torrun is None:
        pytest.skip("torchrun not found beside the interpreter")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model = str(tmp_path / "model")
    one = subprocess.run([sys.executable, str(worker), model, str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([torrun, "--standalone", "--nproc-per-node", "2", str(worker), model,
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    single = json.loads((tmp_path / "one.0.json").read_text())
    ranks = [json.loads((tmp_path / f"two.{r}.json").read_text()) for r in (0, 1)]
    assert single["kv_heads"] == [2, 2]
    assert all(r["kv_heads"] == [1, 1] for r in ranks)  # each rank stores its own KV head
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == single["tokens"]
