"""``NQTensor``: a quantized tensor that stays packed through the ops a KV cache needs.

A traceable wrapper subclass in the style of torchao's v2 tensors: the inner tensors and the
attributes are declared once (``tensor_data_names`` / ``tensor_attribute_names``) and flattening,
``repr`` and the plumbing ops follow from them. Ops are looked up in two tables filled by small
``implements`` functions: ``_ATEN_OPS`` for ``__torch_dispatch__`` and ``_TORCH_FUNCTIONS`` for
``__torch_function__`` (where the attention op registers ``F.scaled_dot_product_attention``). Any
other op raises ``NotImplementedError``: nothing is ever dequantized behind the caller's back.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from nqkv_core.codebook import CodebookKind, check_args, check_codebook, get_codebook
from nqkv_core.packed import Packed
from nqkv_core.packing import codes_per_row_multiple
from nqkv_core.quantize import E5M3, FLOAT_DTYPES, SCALE_DTYPES, dequantize_blockwise, quantize_blockwise

aten = torch.ops.aten
_ATEN_OPS: dict[Any, Callable] = {}
_TORCH_FUNCTIONS: dict[Callable, Callable] = {}


def implements(ops: list) -> Callable:
    """Register the decorated function as the ``NQTensor`` implementation of aten ``ops``."""

    def register(fn: Callable) -> Callable:
        for op in ops:
            _ATEN_OPS[op] = fn
        return fn

    return register


def implements_torch_function(funcs: list) -> Callable:
    """Register the decorated function for torch-level ``funcs`` (before decomposition)."""

    def register(fn: Callable) -> Callable:
        for f in funcs:
            _TORCH_FUNCTIONS[f] = fn
        return fn

    return register


class NQTensor(torch.Tensor):
    """A tensor quantized in blocks with a normal-quantile codebook.

    Inner tensors, for a logical tensor of shape ``shape`` quantized in blocks of ``block`` along
    ``axis`` with ``bits``-bit codes:

    * ``codes``: uint8, ``shape`` with the last axis ``* bits / 8`` -- codes packed along the last
      axis (layout in :mod:`nqkv_core.packing`).
    * ``absmax``: fp16 or fp32, ``shape`` with ``axis`` divided by ``block`` -- one scale per block.
    * ``codebook``: float32, ``(2**bits,)`` -- ascending levels in ``[-1, 1]`` (a little beyond
      for an unbiased codebook, :mod:`nqkv_core.codebook`).

    Attributes: ``block`` (int), ``axis`` (int, non-negative), and the logical ``shape`` and
    ``dtype`` (what :meth:`dequantize` returns by default). An element decodes to
    ``codebook[code] * absmax[block]``. :attr:`packed` gives the five layout fields as one
    :class:`~nqkv_core.packed.Packed` (axis counted from the end), :meth:`from_packed` the reverse.
    """

    tensor_data_names = ["codes", "absmax", "codebook"]
    tensor_attribute_names = ["block", "axis"]

    codes: torch.Tensor
    absmax: torch.Tensor
    codebook: torch.Tensor
    block: int
    axis: int

    @staticmethod
    def __new__(cls, codes, absmax, codebook, block, axis, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=codes.device, requires_grad=False
        )

    def __init__(self, codes, absmax, codebook, block, axis, shape, dtype):
        self.codes = codes
        self.absmax = absmax
        self.codebook = codebook
        self.block = block
        self.axis = axis

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_float(
        cls,
        x: torch.Tensor,
        block: int = 64,
        bits: int = 4,
        axis: int = -1,
        codebook: CodebookKind | torch.Tensor = "nf",
        scale_dtype: torch.dtype = torch.float16,
        unbiased: bool = False,
        fit_scale: bool = False,
    ) -> "NQTensor":
        """Quantize ``x`` in blocks of ``block`` elements along ``axis`` with ``bits``-bit codes.

        Args:
            x: floating-point tensor (fp32, fp16, bf16), finite; its dtype is the logical dtype.
            block: elements per block (>= 8, dividing ``x.shape[axis]``).
            bits: 2, 3, 4 or 8.
            axis: blocked axis: -1 for blocks along a token's head_dim, -2 for blocks of tokens
                per channel of a ``(batch, heads, tokens, head_dim)`` tensor.
            codebook: ``"nf"`` (normal-float levels), ``"lloyd"`` (block-size-aware Lloyd-Max
                levels) or a ready codebook tensor of ``2**bits`` levels.
            scale_dtype: dtype of the per-block absmax: fp16, fp32, or one byte
                (:data:`~nqkv_core.quantize.E5M3`).
            unbiased: with a codebook kind, decode with the unbiased levels (the kind's levels
                times :func:`nqkv_core.codebook.unbiased_gain`, so that the decoded values are not
                shrunk on average); the codes are chosen against the plain levels.
            fit_scale: store fitted scales instead of absmax ones (best of a few clipped scales,
                refitted so that each block decodes unbiased; see
                :func:`nqkv_core.quantize.quantize_blockwise`). Excludes ``unbiased``.

        Raises:
            TypeError: ``x`` not a floating tensor, ``bits`` / ``block`` / ``axis`` not ints.
            ValueError: a bad codebook (:func:`nqkv_core.codebook.check_codebook`), and see
                :func:`nqkv_core.quantize.quantize_blockwise`.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(x).__name__}")
        check_args(bits=bits, block=block, axis=axis)
        decode = None
        if fit_scale and unbiased:
            raise ValueError("fit_scale=True already makes each block unbiased; pass unbiased=False with it")
        if isinstance(codebook, str):
            if unbiased:
                decode = get_codebook(codebook, bits, block, device=x.device, unbiased=True)
            codebook = get_codebook(codebook, bits, block, device=x.device)
        elif unbiased:
            raise ValueError("unbiased=True needs a codebook kind ('nf' or 'lloyd'), not a codebook tensor")
        else:
            check_codebook(codebook, bits)
        codes, absmax = quantize_blockwise(x, codebook, block, axis, scale_dtype, fit_scale=fit_scale)
        return cls(codes, absmax, codebook if decode is None else decode, block, axis % x.dim(), x.shape, x.dtype)

    @classmethod
    def from_packed(cls, packed: Packed, dtype: torch.dtype = torch.float32) -> "NQTensor":
        """An NQTensor over ``packed``'s tensors (shared, not copied), of logical ``dtype``.

        Raises:
            TypeError, ValueError: pieces that do not fit together (:func:`check_pieces`).
        """
        packed = Packed.of(packed)
        shape, axis = packed.shape, packed.axis + packed.codes.dim()
        check_pieces(packed.codes, packed.absmax, packed.codebook, packed.block, axis, shape, dtype)
        return cls(packed.codes, packed.absmax, packed.codebook, packed.block, axis, shape, dtype)

    @property
    def packed(self) -> Packed:
        """The codes, scales, codebook, block and axis as one :class:`~nqkv_core.packed.Packed`."""
        return Packed(self.codes, self.absmax, self.codebook, self.block, self.axis)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision tensor these codes stand for, in ``dtype`` (default: ``self.dtype``).

        Values beyond the finite range of ``dtype`` saturate to its largest finite magnitude
        (:func:`nqkv_core.quantize.dequantize_blockwise`).

        Raises:
            TypeError: ``dtype`` is not float16, bfloat16, float32 or float64.
        """
        return dequantize_blockwise(
            self.codes, self.absmax, self.codebook, self.block, self.axis, dtype or self.dtype
        )

    # -- properties ----------------------------------------------------------------------------

    @property
    def bits(self) -> int:
        return self.packed.bits

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        """Bytes of codes and scales (the codebook is shared between tensors and not counted)."""
        return self.codes.nbytes + self.absmax.nbytes

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / max(self.numel(), 1)

    # -- tracing and serialization ----------------------------------------------------------------

    def __tensor_flatten__(self):
        return self.tensor_data_names, (*(getattr(self, a) for a in self.tensor_attribute_names), self.dtype)

    @classmethod
    def __tensor_unflatten__(cls, inner_tensors, context, outer_size, outer_stride):
        """Rebuild from :meth:`__tensor_flatten__`'s pieces. Real (not traced) pieces are checked to
        fit the shape (:func:`check_pieces`; shapes and dtypes only), so the rebuild path of a
        compiled graph's outputs costs no host read."""
        *attributes, dtype = context
        pieces = [inner_tensors[n] for n in cls.tensor_data_names]
        if all(type(t) is torch.Tensor for t in pieces) and not torch.compiler.is_compiling():
            check_pieces(*pieces, *attributes, outer_size, dtype, levels=False)
        return cls(*pieces, *attributes, outer_size, dtype)

    def _stable_hash_for_caching(self) -> str:
        """A deterministic key for torch.compile's AOT autograd cache: the logical shape and dtype,
        ``block``, ``axis`` and each inner tensor's shape, stride, dtype and device (not values:
        the inner tensors are graph inputs)."""
        parts: list = [tuple(self.shape), str(self.dtype), self.block, self.axis, self.requires_grad]
        for n in self.tensor_data_names:
            t = getattr(self, n)
            parts.append((n, tuple(t.shape), tuple(t.stride()), str(t.dtype), str(t.device)))
        return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()

    def _rebuild(self, codes=None, absmax=None, codebook=None, shape=None, dtype=None) -> "NQTensor":
        """A new NQTensor sharing everything not given."""
        return NQTensor(
            self.codes if codes is None else codes,
            self.absmax if absmax is None else absmax,
            self.codebook if codebook is None else codebook,
            self.block,
            self.axis,
            self.shape if shape is None else shape,
            self.dtype if dtype is None else dtype,
        )

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``(tensors, metadata)``: plain tensors and string metadata, e.g. for safetensors."""
        tensors = {n: getattr(self, n) for n in self.tensor_data_names}
        metadata = {
            "block": str(self.block),
            "axis": str(self.axis),
            "shape": ",".join(map(str, self.shape)),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        return tensors, metadata

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "NQTensor":
        """Inverse of :meth:`state_dict`; validates that the pieces fit together."""
        missing = [n for n in cls.tensor_data_names if n not in tensors] + [
            k for k in ("block", "axis", "shape", "dtype") if k not in metadata
        ]
        if missing:
            raise ValueError(f"NQTensor state is missing {missing}")
        shape = torch.Size(int(s) for s in metadata["shape"].split(",") if s)
        dtype = getattr(torch, metadata["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {metadata['dtype']!r} in NQTensor state")
        block, axis = int(metadata["block"]), int(metadata["axis"])
        codes, absmax, codebook = (tensors[n] for n in cls.tensor_data_names)
        check_pieces(codes, absmax, codebook, block, axis, shape, dtype)
        return cls(codes, absmax, codebook, block, axis, shape, dtype)

    def __reduce_ex__(self, protocol):
        # Pickle (torch.save) as the plain pieces so that torch.load(weights_only=True) can rebuild
        # it through the allow-listed _nqtensor_from_pieces.
        pieces = (*(getattr(self, n) for n in self.tensor_data_names), self.block, self.axis)
        return _nqtensor_from_pieces, (*pieces, tuple(self.shape), self.dtype)

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"NQTensor(shape={tuple(self.shape)}, dtype={self.dtype}, bits={self.bits},"
            f" block={self.block}, axis={self.axis},"
            f" scale_dtype={'E5M3 (torch.uint8)' if self.absmax.dtype == E5M3 else self.absmax.dtype},"
            f" device={self.device}, bits_per_element={self.bits_per_element:.3f})"
        )

    # -- op routing -------------------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TORCH_FUNCTIONS:
            return _TORCH_FUNCTIONS[func](func, types, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ATEN_OPS:
            return _ATEN_OPS[func](func, args, kwargs)
        raise NotImplementedError(
            f"NQTensor does not implement {func}: it keeps data packed and never dequantizes"
            " implicitly. Call .dequantize() first to get a regular tensor."
        )


def _nqtensor_from_pieces(codes, absmax, codebook, block, axis, shape, dtype) -> NQTensor:
    """The unpickling constructor (``torch.load``, ``weights_only`` included): checks the pieces."""
    check_pieces(codes, absmax, codebook, block, axis, shape, dtype)
    return NQTensor(codes, absmax, codebook, block, axis, torch.Size(shape), dtype)


def check_pieces(codes, absmax, codebook, block, axis, shape, dtype, levels: bool = True) -> None:
    """Check that an NQTensor's inner tensors fit its claimed layout.

    Args:
        codes, absmax, codebook, block, axis, shape, dtype: as the :class:`NQTensor` fields
            (``axis`` non-negative).
        levels: also read the codebook's levels (:func:`nqkv_core.codebook.check_codebook`);
            otherwise only shapes and dtypes are looked at.

    Raises:
        TypeError: a piece of the wrong type.
        ValueError: pieces that do not fit together (shapes, dtypes, devices, block, axis).
    """
    for name, t in (("codes", codes), ("absmax", absmax), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"NQTensor {name} must be a tensor, got {type(t).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"NQTensor dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    if codes.dtype != torch.uint8 or absmax.dtype not in SCALE_DTYPES:
        raise ValueError(f"NQTensor codes must be uint8 and absmax one of {SCALE_DTYPES}, got {codes.dtype}"
                         f" and {absmax.dtype}")
    if not codes.device == absmax.device == codebook.device:
        raise ValueError(f"NQTensor pieces are on different devices: {codes.device}, {absmax.device},"
                         f" {codebook.device}")
    bits = check_codebook(codebook, levels=levels)
    shape = tuple(shape)
    check_args(block=block, axis=axis, ndim=len(shape))
    if not shape or axis < 0 or shape[axis] % block or shape[-1] % codes_per_row_multiple(bits):
        raise ValueError(
            f"NQTensor layout does not fit shape {shape}: {bits}-bit codes in blocks of {block} along axis"
            f" {axis} need a non-negative axis, a block dividing its size and a last axis of whole bytes"
        )
    expected_codes = (*shape[:-1], shape[-1] * bits // 8)
    expected_absmax = tuple(s // block if i == axis else s for i, s in enumerate(shape))
    if tuple(codes.shape) != expected_codes or tuple(absmax.shape) != expected_absmax:
        raise ValueError(
            f"NQTensor data does not fit its shape: codes {tuple(codes.shape)} (expected"
            f" {expected_codes}), absmax {tuple(absmax.shape)} (expected {expected_absmax}) for shape {shape}"
        )


# -- op table ---------------------------------------------------------------------------------------


def _map_inner(t: NQTensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> NQTensor:
    return t._rebuild(*(fn(getattr(t, n)) for n in NQTensor.tensor_data_names))


@implements([aten.detach.default, aten.alias.default])
def _detach(func, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, _map_inner(args[0], lambda x: func(x)))


@implements([aten.clone.default])
def _clone(func, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, _map_inner(args[0], lambda x: func(x, **kwargs)))


@implements([aten._to_copy.default])
def _to_copy(func, args, kwargs):
    # Device moves keep codes packed; a dtype change only changes what dequantize() returns.
    t: NQTensor = args[0]
    device = kwargs.get("device")
    moved = _map_inner(t, lambda x: x.to(device=device) if device is not None else x.clone())
    dtype = kwargs.get("dtype")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"an NQTensor's logical dtype must be floating point {FLOAT_DTYPES}, got {dtype}")
    return moved._rebuild(dtype=dtype or t.dtype)


def _check_token_axis(t: NQTensor, dim: int, what: str) -> int:
    dim = dim % t.dim()
    if dim == t.dim() - 1:
        raise NotImplementedError(
            f"NQTensor cannot {what} along its last axis, where codes are packed; dequantize() first"
        )
    return dim


@implements([aten.slice.Tensor])
def _slice(func, args, kwargs):
    t: NQTensor = args[0]
    dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1 :])[:4]
    dim = _check_token_axis(t, dim, "be sliced")
    size = t.shape[dim]
    start, end, _ = slice(start, end, step).indices(size)
    end = max(end, start)
    if dim == t.axis:
        if step != 1 or start % t.block or (end % t.block and end != size):
            raise NotImplementedError(
                f"slicing the blocked axis {dim} must keep whole blocks of {t.block}"
                f" (step 1, block-aligned bounds); got [{start}:{end}:{step}]"
            )
        scale_slice = (start // t.block, -(-end // t.block), 1)
    else:
        scale_slice = (start, end, step)
    codes = aten.slice.Tensor(t.codes, dim, start, end, step)
    absmax = aten.slice.Tensor(t.absmax, dim, *scale_slice)
    shape = list(t.shape)
    shape[dim] = len(range(start, end, step))
    return t._rebuild(codes, absmax, shape=torch.Size(shape))


@implements([aten.select.int])
def _select(func, args, kwargs):
    t: NQTensor = args[0]
    dim = _check_token_axis(t, args[1], "select")
    if dim == t.axis:
        raise NotImplementedError(f"cannot select a single index along the blocked axis {dim}")
    index = args[2]
    shape = list(t.shape)
    del shape[dim]
    out = NQTensor(
        func(t.codes, dim, index), func(t.absmax, dim, index), t.codebook, t.block,
        t.axis - (dim < t.axis), torch.Size(shape), t.dtype,
    )
    return out


_CAT_MISMATCH = "torch.cat needs NQTensors with the same codebook, block, axis, dtype and scale dtype"


def _same_levels(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two codebooks of one shape hold the same levels. While tracing the answer is not
    known, so the graph gets a runtime assertion instead of a data-dependent branch: a compiled
    graph given different codebooks raises RuntimeError with the same message when it runs."""
    if a is b:
        return True
    if torch._subclasses.fake_tensor.is_fake(a) or torch.compiler.is_compiling():
        torch._assert_async(torch.eq(a, b).all(), _CAT_MISMATCH)
        return True
    return torch.equal(a, b)


@implements([aten.cat.default])
def _cat(func, args, kwargs):
    tensors = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    first = tensors[0]
    if not all(isinstance(t, NQTensor) for t in tensors):
        raise NotImplementedError("torch.cat of NQTensors with plain tensors: quantize them first")
    layout = (first.block, first.axis, first.dtype, first.absmax.dtype, first.codebook.shape, first.codebook.dtype)
    for t in tensors[1:]:
        if (t.block, t.axis, t.dtype, t.absmax.dtype, t.codebook.shape, t.codebook.dtype) != layout or not _same_levels(
            t.codebook, first.codebook
        ):
            raise ValueError(_CAT_MISMATCH)
    dim = _check_token_axis(first, dim, "be concatenated")
    codes = func([t.codes for t in tensors], dim)
    absmax = func([t.absmax for t in tensors], dim)
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return first._rebuild(codes, absmax, shape=torch.Size(shape))


torch.serialization.add_safe_globals([NQTensor, _nqtensor_from_pieces])
