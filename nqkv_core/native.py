"""Native CPU kernels: build, load and call ``csrc/cpu_kernels.cpp``.

The kernels are plain C functions on raw pointers. On first use the source is compiled with the
system C++ compiler (``-O3 -march=native -fopenmp``, a few seconds; no torch headers) into a cache
directory keyed by the source, the compiler, the flags and this CPU, and loaded with :mod:`ctypes`,
the way Inductor loads the C++ it generates. Every argument is checked here before a pointer is passed.

A cached library is loaded only if its bytes match the SHA-256 recorded next to it when it was built,
every function resolves and it reports the build key it was compiled for; otherwise it is rebuilt
(a damaged shared object would kill the process when mapped or called, beyond any exception handler).

When no compiler is found, the build fails, or ``NQKV_NATIVE=0`` is set, :func:`available` is False
and callers take their plain-torch paths, which compute the same results (the tests compare them).
A failure is reported once, in a warning that quotes the compiler's last lines and names the log
kept in the cache directory.

Threads: each call uses ``torch.get_num_threads()`` OpenMP threads. The library links the same
``libgomp`` torch's CPU build has loaded, so both share one thread pool.

Environment: ``NQKV_NATIVE=0`` (torch paths only), ``NQKV_CACHE_DIR`` (default
``~/.cache/nqkv``), ``NQKV_MARCH`` (``-march``, default ``native``), ``CXX`` (the compiler).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from nqkv_core.packed import Packed

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
# NQKV_MARCH picks the target CPU (default: this one); e.g. NQKV_MARCH=x86-64 builds the portable
# scalar version and NQKV_MARCH=haswell the AVX2 one, as the tests do to check them.
FLAGS = ["-O3", f"-march={os.environ.get('NQKV_MARCH', 'native')}", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
         "-fno-math-errno"]


def _cache_dir() -> Path:
    root = os.environ.get("NQKV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nqkv"
    )
    return Path(root)


def _cpu_signature() -> str:
    # -march=native code runs only on CPUs with the same features: key the build on them.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


class _PackedArg(ctypes.Structure):  # one packed K or V as the C kernels take it
    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("cs_b", ctypes.c_int64), ("cs_h", ctypes.c_int64), ("cs_t", ctypes.c_int64),
        ("absmax", ctypes.c_void_p),
        ("as_b", ctypes.c_int64), ("as_h", ctypes.c_int64), ("as_t", ctypes.c_int64),
        ("scale_format", ctypes.c_int),
        ("codebook", ctypes.c_void_p),
        ("bits", ctypes.c_int),
        ("block", ctypes.c_int64),
    ]


LIB_NAME = "libnqkv_cpu"
# every function native.py calls; a library lacking one is not this one (or not this version)
SYMBOLS = ("nqkv_build_key", "nqkv_vector_bits", "nqkv_quantize_rows", "nqkv_dequantize_rows",
           "nqkv_attention_decode", "nqkv_decode_step")


def _build_dir(cxx: str) -> tuple[Path, str]:
    """The cache directory of the build with ``cxx`` and the build's key (a hash of the source, the
    compiler, the flags and this CPU), which the library returns from ``nqkv_build_key``."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + cxx.encode() + " ".join(FLAGS).encode() + _cpu_signature().encode()
    ).hexdigest()
    return _cache_dir() / key[:16], key


def _verified(out_dir: Path) -> Optional[Path]:
    # The checksum file names the library and its SHA-256 (sha256sum's format). A library whose bytes
    # do not match -- truncated, overwritten, replaced -- is never loaded: mapping a damaged shared
    # object can kill the process (SIGBUS, SIGTRAP), which no exception handler catches.
    try:
        digest, name = (out_dir / f"{LIB_NAME}.sha256").read_text().split()
        lib = out_dir / name
        if lib.parent == out_dir and hashlib.sha256(lib.read_bytes()).hexdigest() == digest:
            return lib
    except (OSError, ValueError):
        pass
    return None


def _build(cxx: str, rebuild: bool = False) -> Path:
    """The path of a library whose bytes match its checksum file: the cached one, or (none cached,
    or ``rebuild``) a new build.

    A build is written under a temporary name and renamed to a name holding its checksum, then the
    checksum file is replaced the same way: concurrent processes (test workers) never see a
    half-written library and no library file is rewritten in place. A ``rebuild`` (after a library
    that matched its checksum failed to load) gets a name of its own: ``dlopen`` hands back the
    library it already loaded from a name, whatever the file there is now.

    Raises:
        RuntimeError: the compiler failed (the message holds the end of its output).
        OSError: the cache directory cannot be written or the compiler cannot be run.
    """
    out_dir, key = _build_dir(cxx)
    lib = None if rebuild else _verified(out_dir)
    if lib is not None:
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *FLAGS, f'-DNQKV_BUILD_KEY="{key}"', str(SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log = out_dir / "build.log"
            log.write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
            last = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
            raise RuntimeError(f"compiling {SOURCE.name} with {cxx} failed: {last} (the full log is in {log})")
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        unique = "-" + Path(tmp).stem.removeprefix(".build-") if rebuild else ""
        lib = out_dir / f"{LIB_NAME}-{digest[:16]}{unique}.so"
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fd, tmp = tempfile.mkstemp(prefix=".sha256-", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        f.write(f"{digest}  {lib.name}\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, out_dir / f"{LIB_NAME}.sha256")
    return lib


class _NotThisLibrary(Exception):
    pass


def _bind(lib: ctypes.CDLL, key: str) -> ctypes.CDLL:
    """Resolves every function and sets its signature; raises _NotThisLibrary when one is missing
    or the library was built from another source or with other flags."""
    try:
        fns = {name: getattr(lib, name) for name in SYMBOLS}
    except AttributeError as e:
        raise _NotThisLibrary(str(e)) from None
    fns["nqkv_build_key"].restype = ctypes.c_char_p
    fns["nqkv_build_key"].argtypes = []
    if fns["nqkv_build_key"]() != key.encode():
        raise _NotThisLibrary("the library's build key does not match this source, compiler and flags")
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.nqkv_quantize_rows.argtypes = [
        ptr, i32, i64, i64, i64, ptr, i32, i32, f32, ptr, ptr, i32, ptr, ptr, i32, ptr, i64,
    ]
    lib.nqkv_dequantize_rows.argtypes = [ptr, ptr, i32, ptr, i32, i64, i64, i64, ptr, i32, i32]
    lib.nqkv_attention_decode.argtypes = [
        ptr, _PackedArg, _PackedArg, i64, ptr, ptr, i64, ptr, i64, i64, i64, i32, ptr, ptr, ptr, i64, i32, i64, i64, i64,
        i64, i64, i64, ptr, i32, ptr, ptr,
    ]
    lib.nqkv_decode_step.argtypes = [
        ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64, _PackedArg,
        _PackedArg, i64, ptr, ptr, f32, i64, i64, i64, i64, ptr, ptr, i64, i64, f32, i64, i64, i64, i64, ptr, i32,
        ptr, i32, i32, ptr, ptr, i32,
    ]
    lib.nqkv_decode_step.restype = ctypes.c_int
    lib.nqkv_quantize_rows.restype = i64
    lib.nqkv_dequantize_rows.restype = None
    lib.nqkv_attention_decode.restype = ctypes.c_int
    lib.nqkv_vector_bits.argtypes = []
    lib.nqkv_vector_bits.restype = i32
    return lib


def _load(cxx: str) -> ctypes.CDLL:
    key, path = _build_dir(cxx)[1], _build(cxx)
    try:
        return _bind(ctypes.CDLL(str(path)), key)
    except (OSError, _NotThisLibrary):
        pass  # bytes that match their checksum file yet are not this library (both files replaced)
    return _bind(ctypes.CDLL(str(_build(cxx, rebuild=True))), key)


_ENABLED = [True]
_FIX = ("CPU kernels fall back to plain torch. Install g++ (or set CXX to a C++ compiler) to build them,"
        " or set NQKV_NATIVE=0 to use plain torch without this warning")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block every caller takes its plain-torch path (tests and benchmarks compare them)."""
    before, _ENABLED[0] = _ENABLED[0], False
    try:
        yield
    finally:
        _ENABLED[0] = before


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get("NQKV_NATIVE", "1") == "0":
        return None
    cxx = _compiler()
    if cxx is None:
        warnings.warn(f"nqkv: no C++ compiler found; {_FIX}", stacklevel=3)
        return None
    try:
        return _load(cxx)
    except (OSError, RuntimeError, _NotThisLibrary) as e:
        warnings.warn(f"nqkv: native CPU kernels unavailable ({e}); {_FIX}", stacklevel=3)
        return None


def available() -> bool:
    """Whether the native CPU kernels are built and loaded (builds them on the first call)."""
    return _ENABLED[0] and _library() is not None


def vector_isa() -> str:
    """Which code the CPU kernels run: ``"AVX-512"``, ``"AVX2"``, ``"scalar"`` (built for a CPU
    with neither, or ``NQKV_MARCH=x86-64``) or ``"none"`` (not built or disabled: plain torch)."""
    if not available():
        return "none"
    return {512: "AVX-512", 256: "AVX2"}.get(_library().nqkv_vector_bits(), "scalar")


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _usable(*tensors: Optional[Tensor]) -> bool:
    # Plain CPU tensors only: not inside a traced graph (checked first, so that tracing never reaches
    # the rest), not subclasses -- fake and functional tensors are subclasses, so the exact type
    # check excludes them too (cheaper than asking each whether it is fake).
    if torch.compiler.is_compiling():
        return False
    return all(t is None or (type(t) is Tensor and t.device.type == "cpu") for t in tensors)


def _whole_bytes(bits: int, block: int) -> bool:
    # a block's codes start on a byte boundary (3-bit rows are two planes: 8 codes per byte in one)
    return (block * bits) % 8 == 0 and (bits != 3 or block % 8 == 0)


def quantize_rows_supported(x: Tensor, bits: int, block: int) -> bool:
    """Blocks along a contiguous last axis, fp32/bf16 input, whole bytes per block."""
    return (
        _usable(x) and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous() and x.numel() > 0
        and _whole_bytes(bits, block) and available()
    )


# The stored scale formats the kernels read and write, as the integer they take.
_SCALE_FORMATS = {torch.float32: 0, torch.float16: 1, torch.uint8: 2}  # uint8: E5M3 bytes (nqkv_core.quantize)


def scale_format(dtype: torch.dtype) -> int:
    """The kernels' code of a stored scale dtype: 0 fp32, 1 fp16, 2 E5M3 bytes."""
    return _SCALE_FORMATS[dtype]


def quantize_rows(x: Tensor, thresholds: Tensor, bits: int, block: int, scale_fmt: int,
                  max_scale: float = float("inf"), fit: Optional[tuple[Tensor, Tensor]] = None,
                  feedback: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, int]:
    """Codes (packed, ``x.shape`` with last axis ``* bits / 8``), fp32 scales (last axis ``/ block``)
    and the number of blocks whose scale is NaN, Inf or above ``max_scale``.

    ``x`` contiguous fp32 or bf16 (see :func:`quantize_rows_supported`); ``thresholds`` the fp32
    midpoints between levels; ``scale_fmt`` (:func:`scale_format`) the stored scales' format. Without
    ``fit`` the scale is the absmax, rounded up to the fp16 grid (format 1), to the nearest E5M3
    byte's value (2) or kept (0); ``fit = (levels, ratios)`` (fp32) fits it as
    :func:`nqkv_core.quantize.quantize_blockwise` does with ``fit_scale=True`` (rounded to nearest);
    ``feedback = (levels, U)`` codes by error feedback, ``U`` ``x.shape[:-2] + (d, d)``, one matrix
    per leading index (as ``quantize_blockwise(..., feedback=U)``).
    """
    row_len = x.shape[-1]
    rows = x.numel() // row_len
    th = thresholds.float().contiguous()
    levels, ratios, fb = None, None, None
    if fit is not None:
        levels, ratios = fit[0].float().contiguous(), fit[1].float().contiguous()
    if feedback is not None:
        levels, fb = feedback[0].float().contiguous(), feedback[1].float().contiguous()
    codes = torch.empty(*x.shape[:-1], row_len * bits // 8, dtype=torch.uint8)
    absmax = torch.empty(*x.shape[:-1], row_len // block, dtype=torch.float32)
    bad = _library().nqkv_quantize_rows(
        x.data_ptr(), int(x.dtype == torch.bfloat16), rows, row_len, block, th.data_ptr(), bits,
        scale_fmt, max_scale, codes.data_ptr(), absmax.data_ptr(), torch.get_num_threads(),
        _ptr(levels), _ptr(ratios), 0 if ratios is None else ratios.numel(), _ptr(fb),
        x.shape[-2] if fb is not None else 1,
    )
    return codes, absmax, bad


def dequantize_rows_supported(codes: Tensor, absmax: Tensor, codebook: Tensor, bits: int, block: int,
                              dtype: torch.dtype) -> bool:
    """Codes and scales contiguous, blocked along the last axis; fp32/bf16 output."""
    return (
        _usable(codes, absmax, codebook) and dtype in (torch.float32, torch.bfloat16)
        and absmax.dtype in _SCALE_FORMATS and codes.is_contiguous() and absmax.is_contiguous()
        and codes.numel() > 0 and _whole_bytes(bits, block) and available()
    )


def dequantize_rows(codes: Tensor, absmax: Tensor, codebook: Tensor, bits: int, block: int,
                    dtype: torch.dtype) -> Tensor:
    """``codebook[code] * absmax`` for codes packed and blocked along the last axis."""
    row_len = codes.shape[-1] * 8 // bits
    rows = codes.numel() // codes.shape[-1]
    cb = codebook.float().contiguous()
    out = torch.empty(*codes.shape[:-1], row_len, dtype=dtype)
    _library().nqkv_dequantize_rows(
        codes.data_ptr(), absmax.data_ptr(), scale_format(absmax.dtype), cb.data_ptr(), bits, rows,
        row_len, block, out.data_ptr(), int(dtype == torch.bfloat16), torch.get_num_threads(),
    )
    return out


# -- decode attention ------------------------------------------------------------------------------


def attention_decode_supported(q: Tensor, k: Packed | tuple, v: Packed | tuple, k_tail: Optional[Tensor],
                               v_tail: Optional[Tensor], attn_mask: Optional[Tensor]) -> bool:
    """CPU tensors, blocks along head_dim for K and V with whole bytes per block."""
    k, v = Packed.of(k), Packed.of(v)
    for p in (k, v):
        if not p.per_token or not _whole_bytes(p.bits, p.block) or p.absmax.dtype not in _SCALE_FORMATS:
            return False
    return _usable(q, k.codes, k.absmax, k.codebook, v.codes, v.absmax, v.codebook, k_tail, v_tail, attn_mask) \
        and available()


def _packed(p: Packed, keep: list) -> _PackedArg:
    codes, absmax = p.codes, p.absmax
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    if absmax.stride(-1) != 1:
        absmax = absmax.contiguous()
    cb = p.codebook.float().contiguous()
    keep += [codes, absmax, cb]  # alive until the call returns
    cs, as_ = codes.stride(), absmax.stride()
    return _PackedArg(
        codes.data_ptr(), cs[0], cs[1], cs[2], absmax.data_ptr(), as_[0], as_[1], as_[2],
        scale_format(absmax.dtype), cb.data_ptr(), p.bits, p.block,
    )


def attention_decode(q: Tensor, k: Packed | tuple, v: Packed | tuple, k_tail: Optional[Tensor],
                     v_tail: Optional[Tensor], attn_mask: Optional[Tensor], scale: float, is_causal: bool,
                     key_bias: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
    """Same contract as :func:`nqkv_core.ops.cpu.attention_decode`, in one native call.

    ``q`` (B, Hq, Tq, D); ``k``/``v`` :class:`~nqkv_core.packed.Packed` (or its plain tuple) with
    blocks along head_dim;
    tails (B, Hkv, T_tail, D) or None; ``attn_mask`` boolean or additive, broadcastable to
    (B, Hq, Tq, Tk). Returns (B, Hq, Tq, Dv) in ``q.dtype``.

    ``key_bias = (w, table, positions)`` adds ``w[b, hq, i] . table[positions[j]]`` to the score of
    query ``i`` and key ``j`` (``w`` (B, Hq, Tq, D), ``table`` (P, D), ``positions`` (Tk,) in
    ``[0, P)``): the RoPE-centred cache's score offset (docs/design.md), computed inside the
    kernel instead of as a (B, Hq, Tq, Tk) mask. ``table`` may also be the same rows held compactly,
    a ``(starts (P / 16, D), offsets (D, 16))`` pair (:class:`~nqkv_core.transform.CompactRope`).

    Non-finite inputs give what torch's softmax and product give (docs/design.md, "Non-finite
    numbers in attention"): a query row whose scores include a NaN among the keys it sees -- a key
    hidden by causality or by ``False`` in a boolean mask is not seen, whatever it holds; an additive
    mask is added, so NaN + (-inf) is NaN -- has a NaN output row, as does a row with a +inf score;
    a row that sees no key has zeros. An infinite value element makes its output column inf or NaN
    in every row (its weight times inf; 0 * inf is NaN).

    Raises:
        ValueError: ``key_bias`` shapes that do not match, or a position outside ``[0, P)``.
    """
    k, v = Packed.of(k), Packed.of(v)
    b, hq, tq, d = q.shape
    hkv, th = k.codes.shape[1], k.codes.shape[2]
    g = hq // hkv
    dv = v.shape[-1]
    tt = 0 if k_tail is None else k_tail.shape[2]
    tk = th + tt
    keep: list = []
    qf = (q.float() * scale).contiguous()
    kt = None if not tt else k_tail.float().contiguous()
    vt = None if not tt else v_tail.float().contiguous()
    mask, ms, hides = None, (0, 0, 0), attn_mask is not None and attn_mask.dtype == torch.bool
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=torch.float32).masked_fill_(~m, -float("inf"))
        m = m.float().expand(b, hq, tq, tk)
        if m.stride(-1) != 1:
            m = m.contiguous()
        mask, ms = m, (m.stride(0), m.stride(1), m.stride(2))
    w = table = pos = starts = offsets = None
    rows = 0
    if key_bias is not None:
        w, table, pos = key_bias
        if isinstance(table, tuple):  # held compactly: (starts, offsets)
            starts, offsets = (t.float().contiguous() for t in table)
            table, rows = None, 16 * starts.shape[0]
            ok = starts.dim() == 2 and starts.shape[1] == d and tuple(offsets.shape) == (d, 16)
            shape = f"({tuple(starts.shape)}, {tuple(offsets.shape)})"
        else:
            table, rows = table.float().contiguous(), table.shape[0]
            ok, shape = table.dim() == 2 and table.shape[1] == d, str(tuple(table.shape))
        if w.shape != q.shape or not ok or pos.shape != (tk,):
            raise ValueError(
                f"key_bias shapes {tuple(w.shape)}, {shape}, {tuple(pos.shape)} do not match queries"
                f" {tuple(q.shape)} over {tk} keys (table (P, D), or (P / 16, D) starts and (D, 16) offsets)"
            )
        w, pos = w.float().contiguous(), pos.to(torch.int64).contiguous()
    out = torch.empty(b, hkv, g * tq, dv, dtype=torch.float32)
    status = _library().nqkv_attention_decode(
        qf.data_ptr(), _packed(k, keep), _packed(v, keep), th, _ptr(kt), _ptr(vt), tt,
        _ptr(mask), ms[0], ms[1], ms[2], int(hides), _ptr(w), _ptr(table), _ptr(pos), rows,
        int(is_causal and tq > 1), b, hkv, g, tq, d, dv, out.data_ptr(), torch.get_num_threads(), _ptr(starts),
        _ptr(offsets),
    )
    if status:
        raise ValueError(f"key_bias positions must lie in [0, {rows})")
    return out.view(b, hq, tq, dv).to(q.dtype)


# -- one decode step of a cache layer --------------------------------------------------------------


def decode_step_supported(*tensors: Optional[Tensor], formats: tuple = ()) -> bool:
    """Plain contiguous fp32 CPU tensors, packed bodies with whole bytes per block."""
    return (
        _usable(*tensors) and all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in tensors)
        and all(_whole_bytes(bits, block) for bits, block in formats) and available()
    )


class DecodeStep:
    """One cache layer's one-token decode step, in one native call, prepared once.

    The contract is the cache's folded step (nqkv_core/cache/step.py). What stays put from step to
    step -- the folded transform, the sink and ring buffers, the packed bodies, the coding
    thresholds, the RoPE table -- is checked and turned into call arguments here, once (a layer
    builds a new ``DecodeStep`` when one of them is replaced, e.g. a body that grew); a step then
    costs the call and the checks of its three new tensors instead of some forty Python-level checks
    and conversions on every step.

    ``query_heads`` Hq; ``rot_k`` (D, D) rotates keys and queries, ``rot_v`` values (None: no
    rotation); the transform vectors (B, Hkv, 1, D) or None (with ``mu_k_half`` set, a RoPE-aware
    centre: the kernel derives each query's bias weights from it and ``mu_k``); sink and ring
    buffers (B, Hkv, slots, D), fp32 or bf16 (all four alike; the new token is rounded as they
    store it), updated in place; ``k_body``/``v_body`` the packed bodies
    (:class:`~nqkv_core.packed.Packed`, blocks along head_dim); ``thresholds`` the K and V coding midpoints;
    ``rope``, the RoPE ``[cos | sin]`` table held compactly, ``(starts (P / 16, D), offsets (D, 16))``
    (:class:`~nqkv_core.transform.CompactRope`, a CPU cache's :class:`~nqkv_core.cache.format.RopeTable`),
    for a RoPE-aware centre; ``fit = (ratios, sides)``: the clipping ratios of fitted scales and the sides
    that fit them (bit 0 keys, bit 1 values; such a side's body codebook is also its coding one);
    ``k_feedback = (levels, U)``: keys coded by error feedback against their plain ``levels``, ``U``
    (B, Hkv, D, D). ``supported`` is False when the native kernels cannot take these tensors.
    """

    def __init__(
        self, query_heads: int, rot_k: Optional[Tensor], rot_v: Optional[Tensor], mu_k: Optional[Tensor],
        mu_k_half: Optional[Tensor], mu_v: Optional[Tensor], sinks: tuple[Tensor, Tensor], ring: tuple[Tensor, Tensor],
        k_body: Packed, v_body: Packed, thresholds: tuple[Tensor, Tensor], max_scale: float,
        rope: Optional[tuple[Tensor, Tensor]], fit: Optional[tuple[Tensor, int]] = None,
        k_feedback: Optional[tuple[Tensor, Tensor]] = None,
    ):
        fit_ratios, fit_sides = (None, 0) if fit is None else (fit[0].float().contiguous(), fit[1])
        k_levels, k_fb = (None, None) if k_feedback is None else (k_feedback[0].float().contiguous(),
                                                                   k_feedback[1].float().contiguous())
        # what the call reads, held so that the pointers below stay valid
        self._args = (rot_k, rot_v, mu_k, mu_k_half, mu_v, sinks, ring, k_body, v_body, thresholds, max_scale,
                      rope, fit_ratios, k_levels, k_fb)
        k_body, v_body = Packed.of(k_body), Packed.of(v_body)
        formats = ((k_body.bits, k_body.block), (v_body.bits, v_body.block))
        d, fp = sinks[0].shape[-1], sinks[0].dtype
        # the full-precision rows: all fp32 or all bf16, read and written by the kernel as stored
        rows_ok = fp in (torch.float32, torch.bfloat16) and all(
            t.dtype == fp and t.is_contiguous() for t in (*sinks, *ring)) and _usable(*sinks, *ring)
        rope = (None, None) if rope is None else tuple(rope)
        self.supported = rows_ok and decode_step_supported(
            rot_k, rot_v, mu_k, mu_k_half, mu_v, *thresholds, *rope, formats=formats,
        ) and all(r is None or r.numel() == d * d for r in (rot_k, rot_v))  # one (D, D) matrix each
        self.supported = self.supported and k_body.per_token and v_body.per_token
        self.supported = self.supported and (rope[0] is None or (
            rope[0].dim() == 2 and rope[0].shape[1] == d and tuple(rope[1].shape) == (d, 16)))
        if not self.supported:
            return
        self._keep: list = []
        self.rope_rows = 0 if rope[0] is None else rope[0].shape[0] * 16
        self.batch, self.hkv, self.hq, self.d = sinks[0].shape[0], sinks[0].shape[1], query_heads, sinks[0].shape[3]
        self._head = (_ptr(rot_k), _ptr(rot_v), _ptr(mu_k), _ptr(mu_k_half), _ptr(mu_v), sinks[0].data_ptr(),
                      sinks[1].data_ptr())
        self._sink_slots, self._ring_slots = sinks[0].shape[2], ring[0].shape[2]
        self._ring = (ring[0].data_ptr(), ring[1].data_ptr())
        self._bodies = (_packed(k_body, self._keep), _packed(v_body, self._keep))
        self._tail = (thresholds[0].data_ptr(), thresholds[1].data_ptr(), max_scale)
        self._rope = (_ptr(rope[0]), _ptr(rope[1]), self.rope_rows)
        self._fit = (_ptr(fit_ratios), 0 if fit_ratios is None else fit_ratios.numel(), fit_sides, _ptr(k_levels),
                     _ptr(k_fb), int(fp == torch.bfloat16))

    def __reduce__(self):
        # Copies and pickles of a cache drop the prepared step (its pointers are into the original's
        # tensors, and ctypes refuses to pickle them); the copy's layer prepares its own.
        return (type(None), ())

    def __call__(self, q: Tensor, k_new: Tensor, v_new: Tensor, n_sinks: int, n_ring: int, n_body: int,
                 leave_slot: int, body_slot: int, sink_slot: int, ring_slot: int, n_tokens: int,
                 scale: float) -> Tensor:
        """The step for ``q`` (B, Hq, 1, D) raw query and ``k_new``/``v_new`` (B, Hkv, 1, D) raw key/value
        (contiguous fp32): attention over ``[body[:n_body] | sinks[:n_sinks] | ring[:n_ring] | new]``
        (every slot holds a token), then the ring token ``leave_slot`` quantized into body slot
        ``body_slot`` (``leave_slot < 0``: none) and the new token stored in its sink or ring slot.
        The new token is at position ``n_tokens``. Returns the output (B, Hq, 1, D), original basis.

        Raises:
            ValueError: a new tensor the kernel cannot read, a position beyond the RoPE table, or a
                token leaving the window whose block scale is not finite or beyond ``max_scale``
                (nothing is stored then).
        """
        b = self.batch
        if not (decode_step_supported(q, k_new, v_new) and q.shape == (b, self.hq, 1, self.d)
                and k_new.shape == v_new.shape == (b, self.hkv, 1, self.d)):
            raise ValueError(
                f"decode step: q (B, Hq, 1, D) = ({b}, {self.hq}, 1, {self.d}) and k_new, v_new ({b}, {self.hkv}, 1,"
                f" {self.d}) must be contiguous fp32 CPU tensors of this layer's heads"
            )
        return self.run(q, k_new, v_new, n_sinks, n_ring, n_body, leave_slot, body_slot, sink_slot, ring_slot,
                        n_tokens, scale)

    def run(self, q: Tensor, k_new: Tensor, v_new: Tensor, n_sinks: int, n_ring: int, n_body: int, leave_slot: int,
            body_slot: int, sink_slot: int, ring_slot: int, n_tokens: int, scale: float) -> Tensor:
        """:meth:`__call__` for a caller that has checked ``q``, ``k_new`` and ``v_new`` itself."""
        b = self.batch
        out = torch.empty(b, self.hq, 1, self.d, dtype=torch.float32)
        status = _library().nqkv_decode_step(
            q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), *self._head, n_sinks, self._sink_slots,
            *self._ring, n_ring, self._ring_slots, *self._bodies, n_body, *self._tail,
            leave_slot, body_slot, sink_slot, ring_slot, *self._rope, n_tokens, scale, b, self.hkv,
            self.hq // self.hkv, self.d, out.data_ptr(), torch.get_num_threads(), *self._fit,
        )
        if status == 1:
            raise ValueError(f"the RoPE table has {self.rope_rows} positions; the step is at position {n_tokens}")
        if status == 2:
            raise ValueError(
                "a key or value leaving the full-precision window has a non-finite element (NaN or Inf) or a"
                " block absmax beyond the scale dtype's range; it cannot be quantized"
            )
        return out
