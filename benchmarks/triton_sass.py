"""What the Triton decode kernel compiles to on a GPU, read on any machine (no GPU needed).

Runs ``triton_decode.flash_decode`` on CPU tensors with the launches intercepted, compiles the
split kernel for a CUDA target (default sm_90, an H100/H200) with Triton's own compiler, and reads
the cubin with ``cuobjdump`` (shipped with Triton's NVIDIA backend): registers, spilled stack
bytes, instruction counts of the whole kernel and of its key loop (the longest backward-branch
body), the codebook gathers left in that loop, and its commonest opcodes. For each decode path of
the 4-bit layout in blocks along head_dim: the general one, the lane-order one (nibble_lanes),
and the lane-order one with the register lookup (register_lut).

These are static counts, a proxy for where time goes, not a timing: what a kernel costs is only
known from ``benchmarks/sweep_triton_decode.py`` on a GPU.

    python benchmarks/triton_sass.py                      # SmolLM2's decode shape at 16k, fp16
    python benchmarks/triton_sass.py --head-dim 128 --block 64 --kv-heads 8 --group 4 --sass /tmp/sass
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernel, not the interpreter's

import triton  # noqa: E402

from nqkv_core import NQTensor  # noqa: E402
from nqkv_core.ops import triton_decode  # noqa: E402

PATHS = {  # name -> DECODE_CONFIG overrides
    "general": dict(nibble_lanes=False, register_lut=False),
    "lanes": dict(nibble_lanes=True, register_lut=False),
    "lanes+lut": dict(nibble_lanes=True, register_lut=True),
}


def capture_split_launch(b: int, hkv: int, group: int, d: int, tokens: int, dtype: torch.dtype, cfg: dict,
                         block: int | None = None):
    """(kernel, args, kwargs) of the split kernel's launch for one decode call of this shape, 4-bit
    codes in blocks of ``block`` (default: head_dim) along head_dim."""
    block = block or d
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(b, hkv, tokens, d, generator=gen) for _ in range(2))
    q = torch.randn(b, hkv * group, 1, d, generator=gen).to(dtype)
    K, V = NQTensor.from_float(k, block=block, bits=4), NQTensor.from_float(v, block=block, bits=4)
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    saved_wrap, saved_cfg = triton_decode.wrap_triton, dict(triton_decode.DECODE_CONFIG)
    triton_decode.wrap_triton = Recorder
    triton_decode.DECODE_CONFIG.update(cfg)
    try:
        triton_decode.flash_decode(q, K.codes, K.absmax, K.codebook, block, 3, V.codes, V.absmax, V.codebook, block, 3,
                                   None, None, None, d ** -0.5, False)
    finally:
        triton_decode.wrap_triton = saved_wrap
        triton_decode.DECODE_CONFIG.clear()
        triton_decode.DECODE_CONFIG.update(saved_cfg)
    return next(launch for launch in launches if launch[0] is triton_decode._decode_split_kernel)


def compile_for(kernel, args: tuple, kwargs: dict, arch: int):
    """Triton's compiled kernel for ``cuda:sm_<arch>`` (binding and specialising the arguments the
    way ``JITFunction.run`` does; Triton-internal API, written against Triton 3.4-3.9)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    source = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def cuobjdump() -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if found is None:
        raise SystemExit("cuobjdump not found: it ships with Triton's NVIDIA backend or the CUDA toolkit")
    return found


def sass_of(cubin: bytes) -> tuple[list[str], dict]:
    """Instruction lines (``/*0120*/ OPCODE operands``) and resource usage of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", ln)]
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED):(\d+)", res)}
    return lines, usage


def _address(line: str) -> int:
    return int(re.match(r"/\*([0-9a-f]+)\*/", line).group(1), 16)


def _opcode(line: str) -> str:
    body = re.sub(r"^/\*[0-9a-f]+\*/\s*", "", line).lstrip("{ ")
    body = re.sub(r"^@!?U?P[T0-9]+\s+", "", body)  # predicate guard
    return body.split()[0].split(".")[0].rstrip(";") if body else ""


def key_loop(lines: list[str]) -> list[str]:
    """The instructions of the longest loop: a branch to a lower address closes a loop body."""
    addr = [_address(ln) for ln in lines]
    best = []
    for i, ln in enumerate(lines):
        branch = re.search(r"\bBRA\s+0x([0-9a-f]+)", ln)
        dest = int(branch.group(1), 16) if branch else addr[i]
        if dest < addr[i]:
            body = [x for x, a in zip(lines, addr) if dest <= a <= addr[i]]
            best = body if len(body) > len(best) else best
    return best


def gathers(loop: list[str]) -> int:
    """4-byte asynchronous copies to shared memory: what Triton makes of a codebook gather per code
    (the codes themselves come in 8- or 16-byte copies)."""
    return sum(1 for ln in loop if "LDGSTS" in ln and not re.search(r"LDGSTS[.A-Z]*\.(64|128) ", ln))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--group", type=int, default=3, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--block", type=int, default=None, help="elements per scale along head_dim (default: head_dim)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    ap.add_argument("--top", type=int, default=8, help="opcodes listed per loop")
    ap.add_argument("--sass", type=Path, help="also write each path's SASS here")
    args = ap.parse_args()
    shape = (args.batch, args.kv_heads, args.group, args.head_dim, args.tokens)
    block = args.block or args.head_dim
    print(f"split kernel, 4-bit K/V in blocks of {block}, (batch, kv heads, group, head_dim, tokens) = {shape},"
          f" {args.dtype}, sm_{args.arch}; static counts, not timings")
    print("| path | registers | stack (spill) bytes | SASS total | key loop | 4-byte gathers in the loop | top loop opcodes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, cfg in PATHS.items():
        kernel, kargs, kkw = capture_split_launch(*shape, getattr(torch, args.dtype), cfg, block)
        lines, usage = sass_of(compile_for(kernel, kargs, kkw, args.arch).asm["cubin"])
        loop = key_loop(lines)
        top = collections.Counter(_opcode(ln) for ln in loop).most_common(args.top)
        print(f"| {name} | {usage.get('REG', 0)} | {usage.get('STACK', 0)} | {len(lines)} | {len(loop)} | {gathers(loop)} |"
              f" {', '.join(f'{op} {n}' for op, n in top)} |")
        if args.sass:
            args.sass.mkdir(parents=True, exist_ok=True)
            (args.sass / f"{name}.sass").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
