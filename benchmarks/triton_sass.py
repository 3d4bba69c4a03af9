"""What the Triton decode kernels compile to on a GPU, read on any machine (no GPU needed).

Runs each decode launcher on CPU tensors with its launches intercepted, compiles the split kernel
for a CUDA target (default sm_90, an H100/H200) with Triton's own compiler, and reads the cubin
with ``cuobjdump`` (shipped with Triton's NVIDIA backend): registers, spilled stack bytes,
instruction counts of the whole kernel and of its key loop (the longest backward-branch body), the
4-byte gathers left in that loop, and its commonest opcodes. Paths, over 4-bit K/V in blocks along
head_dim: the split-K kernel (``triton_decode``) general, in lane order (nibble_lanes), and in lane
order with the register lookup (register_lut); the grouped kernel (``triton_decode_grouped``),
without and with (grouped+bias) the RoPE-centre key bias it computes itself.
``default`` is the path ``nqkv::attention`` takes for the shape.

``instructions_per_element`` = key-loop instructions x threads per program / (K and V elements one
loop iteration decodes: 2 x keys per tile x head_dim): SASS instructions issued per decoded element.

These are static counts, a proxy for where time goes, not a timing: what a kernel costs is only
known from a GPU run (``benchmarks/gpu_check.sh``).

    python benchmarks/triton_sass.py                    # (batch, kv heads, group, head_dim, tokens, block)
                                                        # = (1, 8, 4, 128, 32k, 64) and (1, 3, 3, 64, 32k, 64)
    python benchmarks/triton_sass.py --json             # the same, then one JSON object as the last line
    python benchmarks/triton_sass.py --shape 1,3,3,64,16384,64 --sass /tmp/sass
"""

from __future__ import annotations

import argparse
import collections
import json
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
from nqkv_core.ops import triton_decode, triton_decode_grouped  # noqa: E402
from nqkv_core.quantize import E5M3  # noqa: E402

PATHS = {  # name -> DECODE_CONFIG overrides of the split-K kernel, or None: the grouped kernel
    "general": dict(nibble_lanes=False, register_lut=False),
    "lanes": dict(nibble_lanes=True, register_lut=False),
    "lanes+lut": dict(nibble_lanes=True, register_lut=True),
    "grouped": None,
    "grouped+bias": None,
}
SHAPES = ((1, 8, 4, 128, 32768, 64), (1, 3, 3, 64, 32768, 64))  # (batch, kv heads, group, head_dim, tokens, block)


SCALES = {"e5m3": E5M3, "fp16": torch.float16}  # the stored block scales: the 4-bit presets' one byte, or fp16


def _packed(b: int, hkv: int, group: int, d: int, tokens: int, dtype: torch.dtype, block: int,
            scales: torch.dtype = E5M3):
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(b, hkv, tokens, d, generator=gen) for _ in range(2))
    q = torch.randn(b, hkv * group, 1, d, generator=gen).to(dtype)
    return q, *(NQTensor.from_float(x, block=block, bits=4, scale_dtype=scales) for x in (k, v))


class _Recorder:
    """Stands in for ``wrap_triton``: records ``(kernel, args, kwargs)`` instead of launching."""

    def __init__(self, launches: list):
        self.launches = launches

    def __call__(self, kernel):
        launches = self.launches

        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, args, kwargs))

        return Launcher()


def capture_launches(module, call) -> list:
    """``(kernel, args, kwargs)`` of every launch ``call()`` makes through ``module.wrap_triton``."""
    launches = []
    saved = module.wrap_triton
    module.wrap_triton = _Recorder(launches)
    try:
        call()
    finally:
        module.wrap_triton = saved
    return launches


def _key_bias(q: torch.Tensor, tokens: int) -> tuple:
    """A RoPE-centre key bias ``(w, table, positions)`` for ``q`` over ``tokens`` keys (random weights)."""
    d = q.shape[-1]
    ang = torch.arange(tokens).float()[:, None] * 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    return torch.randn(q.shape), torch.cat([ang.cos(), ang.sin()], dim=-1), torch.arange(tokens)


def capture_split_launch(b: int, hkv: int, group: int, d: int, tokens: int, dtype: torch.dtype, cfg: dict | None,
                         block: int | None = None, bias: bool = False, scales: torch.dtype = E5M3):
    """(kernel, args, kwargs) of the split kernel's launch for one decode call of this shape, 4-bit
    codes in blocks of ``block`` (default: head_dim) along head_dim with ``scales``: the split-K kernel with the
    ``DECODE_CONFIG`` overrides ``cfg``, or the grouped kernel for ``cfg=None`` (with ``bias``: with
    the RoPE-centre key bias computed in the kernel)."""
    block = block or d
    q, K, V = _packed(b, hkv, group, d, tokens, dtype, block, scales)
    saved_cfg = dict(triton_decode.DECODE_CONFIG)
    triton_decode.DECODE_CONFIG.update(cfg or {})
    try:
        if cfg is None:
            launches = capture_launches(triton_decode_grouped, lambda: triton_decode_grouped.launch(
                q, K.codes, K.absmax, K.codebook, block, V.codes, V.absmax, V.codebook, None, None, None, d ** -0.5,
                False, key_bias=_key_bias(q, tokens) if bias else None))
        else:
            launches = capture_launches(triton_decode, lambda: triton_decode.flash_decode(
                q, K.codes, K.absmax, K.codebook, block, 3, V.codes, V.absmax, V.codebook, block, 3, None, None,
                None, d ** -0.5, False))
    finally:
        triton_decode.DECODE_CONFIG.clear()
        triton_decode.DECODE_CONFIG.update(saved_cfg)
    split = (triton_decode._decode_split_kernel, triton_decode_grouped._grouped_split_kernel)
    return next(launch for launch in launches if launch[0] in split)


def default_path(b: int, hkv: int, group: int, d: int, tokens: int, dtype: torch.dtype, block: int) -> str:
    """The path ``nqkv::attention`` takes on a GPU for a one-token decode of this shape."""
    q, K, V = _packed(b, hkv, group, d, 1, dtype, block)
    k, v = (K.codes, K.absmax, K.codebook, block, 3), (V.codes, V.absmax, V.codebook, block, 3)
    if triton_decode_grouped.supports(q, k, v):
        return "grouped"
    cfg = triton_decode.DECODE_CONFIG
    if not cfg.get("nibble_lanes", True) or block < 2:
        return "general"
    return "lanes+lut" if cfg.get("register_lut") else "lanes"


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


def measure(launch: tuple, arch: int, top: int) -> tuple[dict, list[str]]:
    """Static figures of a captured split launch compiled for ``sm_<arch>``, and its SASS lines."""
    kernel, kargs, kkw = launch
    lines, usage = sass_of(compile_for(kernel, kargs, kkw, arch).asm["cubin"])
    loop = key_loop(lines)
    threads = 32 * kkw.get("num_warps", 4)
    elements = 2 * kkw["BLOCK_N"] * kkw["HEAD_DIM"]  # K and V elements decoded per loop iteration
    return dict(
        registers=usage.get("REG", 0), spill_bytes=usage.get("STACK", 0), sass_total=len(lines),
        loop_instructions=len(loop), threads=threads, elements_per_iteration=elements,
        instructions_per_element=round(len(loop) * threads / elements, 2), gathers=gathers(loop),
        top_opcodes=collections.Counter(_opcode(ln) for ln in loop).most_common(top),
    ), lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", default=None,
                    help="batch,kv_heads,group,head_dim,tokens,block (repeatable; default: the two of SHAPES)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--scales", choices=list(SCALES), default="e5m3", help="the block scales' format")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    ap.add_argument("--top", type=int, default=8, help="opcodes listed per loop")
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    ap.add_argument("--sass", type=Path, help="also write each path's SASS here")
    ap.add_argument("--json", action="store_true", help="print one JSON object with every figure as the last line")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else list(SHAPES)
    dtype = getattr(torch, args.dtype)
    report = dict(arch=args.arch, dtype=args.dtype, scales=args.scales,
                  shape_fields="batch,kv_heads,group,head_dim,tokens,block",
                  shapes={})
    for shape in shapes:
        b, hkv, group, d, tokens, block = shape
        print(f"\nsplit kernels, 4-bit K/V in blocks of {block}, (batch, kv heads, group, head_dim, tokens) ="
              f" {shape[:5]}, {args.dtype}, {args.scales} scales, sm_{args.arch}; static counts, not timings")
        print("| path | registers | stack (spill) bytes | SASS total | key loop | SASS per element |"
              " 4-byte gathers in the loop | top loop opcodes |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        figures = {}
        for name in args.paths:
            launch = capture_split_launch(b, hkv, group, d, tokens, dtype, PATHS[name], block, name == "grouped+bias",
                                          SCALES[args.scales])
            fig, lines = measure(launch, args.arch, args.top)
            figures[name] = fig
            print(f"| {name} | {fig['registers']} | {fig['spill_bytes']} | {fig['sass_total']} |"
                  f" {fig['loop_instructions']} | {fig['instructions_per_element']} | {fig['gathers']} |"
                  f" {', '.join(f'{op} {n}' for op, n in fig['top_opcodes'])} |")
            if args.sass:
                args.sass.mkdir(parents=True, exist_ok=True)
                (args.sass / f"{name}_{'x'.join(map(str, shape))}.sass").write_text("\n".join(lines) + "\n")
        default = default_path(b, hkv, group, d, tokens, dtype, block)
        print(f"default path: {default}")
        if default in figures:
            figures["default"] = dict(figures[default], path=default)
        report["shapes"][",".join(map(str, shape))] = figures
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
