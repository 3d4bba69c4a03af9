"""A model's rotary position embedding (RoPE), read from transformers rather than re-implemented.

The RoPE-aware key centre (:class:`nqkv_core.scheme.KVScheme` ``k_centre_rope``) needs the rotation
the model applies to its keys. :func:`rope_spec` obtains it from the model config through
transformers' own code: the inverse frequencies and attention scaling from
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (every scaled ``rope_type``: linear,
dynamic, yarn, longrope, llama3, ...) or the model's ``compute_default_rope_parameters`` for plain
RoPE, the rotary dimension from the length of those frequencies (``partial_rotary_factor``), and the
layout (rotate-half or interleaved pairs) from the model's own ``rotate_half``. :func:`apply_rope`
then rotates exactly as the model's ``apply_rotary_pos_emb`` does, and :func:`check_rope` says
whether :class:`~nqkv_core.cache.NQKVCache` can serve a model's RoPE.

Field names follow both transformers 5 (``config.rope_parameters``) and 4.x (``config.rope_theta`` /
``config.rope_scaling``, where ``ROPE_INIT_FUNCTIONS`` still holds ``"default"``).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass

import torch

__all__ = ["RopeSpec", "apply_rope", "check_rope", "head_dim_of", "rope_spec", "rotate_half", "rotate_half_order"]

# Config attributes that describe a rotary embedding outside the rope parameters (GPT-J, CodeGen).
_OTHER_ROTARY_FIELDS = ("rotary_dim", "rotary_pct", "rotary_emb_base")


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """The rotary embedding a model applies to its queries and keys.

    Attributes:
        inv_freq: ``(rotary_dim // 2,)`` float32 inverse frequencies; position ``p`` turns pair ``i``
            by the angle ``p * inv_freq[i]``.
        attention_scaling: factor on cos and sin (YaRN's and LongRoPE's attention factor; 1 for
            the others), so that the embedding scales a vector by it.
        interleaved: pairs are channels ``(2i, 2i + 1)`` (Cohere, GLM) instead of
            ``(i, i + rotary_dim / 2)`` (rotate-half: Llama, Qwen, Phi, GPT-NeoX, ...).
        rope_type: the config's ``rope_type`` (``"default"``, ``"llama3"``, ``"yarn"``, ...).
        max_len: ``inv_freq`` is what the model applies to a sequence of at most ``max_len``
            tokens; beyond it the model recomputes its frequencies from the sequence length
            (``"dynamic"``, and ``"longrope"``'s long factors). None: the same for every length.
    """

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    interleaved: bool = False
    rope_type: str = "default"
    max_len: int | None = None

    @property
    def rotary_dim(self) -> int:
        """Channels the embedding rotates: the first ``rotary_dim`` of each head, the rest pass through."""
        return 2 * self.inv_freq.shape[-1]


def rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """The pair partner of every channel with the sign of a quarter turn: ``(-x2, x1)`` per pair."""
    if interleaved:
        return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, spec: RopeSpec, inverse: bool = False) -> torch.Tensor:
    """RoPE of ``x`` ``(..., T, head_dim)`` at positions ``pos`` ``(T,)``, as the model applies it.

    The arithmetic is transformers': angles ``pos.float() * inv_freq``, cos and sin times
    ``attention_scaling`` in float32 then cast to ``x.dtype``, ``x * cos + rotate_half(x) * sin``
    on the first ``rotary_dim`` channels; the other channels are returned unchanged.
    ``inverse=True`` undoes it: the transposed rotation divided by ``attention_scaling``.

    Raises:
        ValueError: ``rotary_dim`` exceeds ``x``'s last dimension.
    """
    rd = spec.rotary_dim
    if rd > x.shape[-1]:
        raise ValueError(f"RoPE rotates {rd} channels but x has head_dim {x.shape[-1]}")
    ang = pos.float()[:, None] * spec.inv_freq.float().to(x.device)[None, :]
    ang = ang.repeat_interleave(2, dim=-1) if spec.interleaved else torch.cat([ang, ang], dim=-1)
    s = spec.attention_scaling
    xr, rest = x[..., :rd], x[..., rd:]
    if inverse:
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        out = xr * cos - rotate_half(xr, spec.interleaved) * sin
        out = out / s if s != 1.0 else out
    else:
        cos, sin = (ang.cos() * s).to(x.dtype), (ang.sin() * s).to(x.dtype)
        out = xr * cos + rotate_half(xr, spec.interleaved) * sin
    if not rest.shape[-1]:
        return out
    # x may be one vector (..., 1, d) rotated to T positions: its pass-through part broadcasts too
    return torch.cat([out, rest.expand(*out.shape[:-1], rest.shape[-1])], dim=-1)


def rotate_half_order(spec: RopeSpec, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A channel order in which ``spec``'s rotation is plain rotate-half RoPE over the whole head.

    Returns ``(perm, inv_freq)``: ``perm`` ``(head_dim,)`` puts each rotated pair at channels
    ``(i, i + head_dim / 2)`` (interleaved or partial pairs included) and pairs the pass-through
    channels likewise; ``inv_freq`` ``(head_dim / 2,)`` is ``spec.inv_freq`` followed by zeros (a zero
    angle leaves a pass-through pair unchanged). Then, without attention scaling,
    ``apply_rope(x, pos, spec)[..., perm] == apply_rope(x[..., perm], pos, RopeSpec(inv_freq))``:
    a cache whose tables pair ``i`` with ``i + head_dim / 2`` serves ``spec`` on channels in
    ``perm`` order.

    Raises:
        ValueError: ``head_dim`` is odd or smaller than ``spec.rotary_dim``.
    """
    rd = spec.rotary_dim
    if head_dim % 2 or head_dim < rd:
        raise ValueError(f"head_dim {head_dim} must be even and at least the rotary dim {rd}")
    idx = torch.arange(rd)
    lo, hi = (idx[0::2], idx[1::2]) if spec.interleaved else (idx[: rd // 2], idx[rd // 2:])
    rest = torch.arange(rd, head_dim)
    half = rest.shape[0] // 2
    perm = torch.cat([lo, rest[:half], hi, rest[half:]])
    inv_freq = torch.cat([spec.inv_freq.float().cpu(), torch.zeros(half)])
    return perm, inv_freq


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _rope_parameters(config, layer_type: str | None) -> tuple[dict | None, object, dict]:
    """``(params, config, kwargs)``: the RoPE parameters of ``layer_type``'s layers as one dict
    (transformers 5 ``rope_parameters``, per layer type if nested; or 4.x's ``rope_theta`` with
    ``rope_scaling``), None if the config has no RoPE; the config and keyword arguments to hand
    transformers' frequency function for them."""
    kind = config.model_type
    params = getattr(config, "rope_parameters", None)
    if params is not None:
        if not any(isinstance(v, dict) for v in params.values()):
            return dict(params), config, {}
        if layer_type is None:
            raise NotImplementedError(
                f"{kind}: RoPE parameters differ per layer type ({sorted(params)}); pass layer_type"
            )
        if not isinstance(params.get(layer_type), dict):
            raise ValueError(f"{kind} has RoPE parameters for layer types {sorted(params)}, not {layer_type!r}")
        return dict(params[layer_type]), config, {"layer_type": layer_type}
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        return None, config, {}
    local = getattr(config, "rope_local_base_freq", None)  # transformers 4.x Gemma 3: sliding layers' theta
    if local is not None:
        if layer_type is None:
            raise NotImplementedError(f"{kind}: RoPE parameters differ per layer type (rope_local_base_freq);"
                                      " pass layer_type")
        if layer_type == "sliding_attention":  # as 4.x Gemma 3 builds its local rotary embedding
            config = copy.copy(config)
            config.rope_theta, config.rope_scaling = local, {"rope_type": "default"}
            return {"rope_theta": local, "rope_type": "default"}, config, {}
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    return {"rope_theta": theta, **scaling}, config, {}


def _modeling_module(config):
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(config.model_type)
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return None


def _init_function(config, rope_type: str):
    """transformers' function computing ``(inv_freq, attention_scaling)`` for ``rope_type``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None and rope_type == "default":  # transformers 5: each model's rotary class holds it
        module = _modeling_module(config)
        for obj in vars(module).values() if module is not None else ():
            if (isinstance(obj, type) and obj.__name__.endswith("RotaryEmbedding")
                    and hasattr(obj, "compute_default_rope_parameters")):
                return obj.compute_default_rope_parameters
    if fn is None:
        raise NotImplementedError(
            f"{config.model_type}: RoPE type {rope_type!r} has no inverse-frequency function in this"
            " transformers version"
        )
    return fn


def _interleaved(config) -> bool:
    """Whether the model's own ``rotate_half`` pairs neighbouring channels (probed on 0..3)."""
    module = _modeling_module(config)
    rot = getattr(module, "rotate_half", None)
    if rot is None:
        return False
    out = rot(torch.arange(4.0)).tolist()
    if out == [-1.0, 0.0, -3.0, 2.0]:
        return True
    if out != [-2.0, -3.0, 0.0, 1.0]:
        raise NotImplementedError(f"{config.model_type}: its rotate_half is neither rotate-half nor interleaved")
    return False


def _max_len(config, params: dict) -> int | None:
    rope_type = params["rope_type"]
    if "dynamic" in rope_type:
        return config.max_position_embeddings
    if rope_type == "longrope":
        return params.get("original_max_position_embeddings",
                          getattr(config, "original_max_position_embeddings", config.max_position_embeddings))
    return None


def _refuse_unusual(config, params: dict) -> None:
    """RoPE variants one (inv_freq, layout) pair cannot describe."""
    kind = config.model_type
    if "mrope_section" in params:
        raise NotImplementedError(f"{kind}: multimodal RoPE (mrope_section) turns by 3-D positions")
    if getattr(config, "no_rope_layers", None) or getattr(config, "qk_rope_head_dim", None):
        raise NotImplementedError(f"{kind}: some layers or channels have no RoPE (no_rope_layers / qk_rope_head_dim)")
    if getattr(config, "rope_interleave", False):
        raise NotImplementedError(f"{kind}: rope_interleave re-orders channels before RoPE")


def rope_spec(config, device=None, layer_type: str | None = None) -> RopeSpec | None:
    """The RoPE a model applies, read from its config by transformers' own functions.

    Args:
        config: a transformers model config (a multimodal one's text config is used).
        device: device of ``inv_freq``.
        layer_type: the layers' type (``config.layer_types``, e.g. ``"sliding_attention"``), for a
            model whose RoPE parameters differ per layer type (Gemma 3); ignored otherwise.

    The layout is probed on the model's own ``rotate_half``; a model whose modeling module has
    none (e.g. one not in transformers) is taken as rotate-half.

    Returns:
        The :class:`RopeSpec`, or None for a model without RoPE (learned or sinusoidal absolute
        positions, ALiBi: OPT, GPT-2, Bloom, Falcon with ``alibi``).

    Raises:
        NotImplementedError: a rotary embedding one :class:`RopeSpec` cannot describe (RoPE
            parameters per layer type without ``layer_type``, multimodal RoPE, layers or channels
            without RoPE, GPT-J / CodeGen's ``rotary_dim`` outside the rope parameters, a
            ``rope_type`` transformers has no function for), naming the feature.
        ValueError: a ``layer_type`` the config has no RoPE parameters for.
    """
    config = _text_config(config)
    params, init_config, kwargs = _rope_parameters(config, layer_type)
    if params is None or getattr(config, "alibi", False):
        if params is None and any(getattr(config, f, None) is not None for f in _OTHER_ROTARY_FIELDS):
            raise NotImplementedError(
                f"{config.model_type}: its rotary embedding is not described by rope parameters"
                " (rotary_dim / rotary_pct without rope_theta)"
            )
        return None
    params.setdefault("rope_type", params.get("type", "default"))
    _refuse_unusual(config, params)
    init = _init_function(config, params["rope_type"])
    # ``device`` only where the function requires it (transformers 4.x); 5.17 deprecates passing it.
    # The frequencies move to ``device`` below either way.
    required = inspect.signature(init).parameters.get("device")
    if required is not None and required.default is inspect.Parameter.empty:
        kwargs = {**kwargs, "device": device}
    inv_freq, scaling = init(init_config, **kwargs)
    return RopeSpec(inv_freq.float().to(device), float(scaling), _interleaved(config), params["rope_type"],
                    _max_len(config, params))


def head_dim_of(config) -> int:
    """The attention head size of a model config (``head_dim``, else ``hidden_size / num_attention_heads``)."""
    config = _text_config(config)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_rope(config, device=None, layer_type: str | None = None) -> RopeSpec | None:
    """:func:`rope_spec` if :class:`~nqkv_core.cache.NQKVCache`'s RoPE-aware key centre can serve it.

    The cache subtracts ``R(p) mu`` from the key at position ``p`` and adds the score offset
    ``q . R(p) mu`` back, both from one table of cos/sin rows of ``inv_freq`` shared by all layers
    (pairing channel ``i`` with ``i + head_dim / 2``), so attention is exact for any frequencies;
    the centre only fits the keys well where they are the model's. Interleaved pairs and a partial
    rotary embedding are served by taking key and query channels in the order of
    :func:`rotate_half_order` (pass-through channels pair up with a zero frequency), which the
    exact transform applies first. ``attention_scaling`` needs no place in the table: the centre is
    measured through the unscaled rotation, which folds the scale into ``mu``. For ``dynamic`` and
    ``longrope`` (``spec.max_len`` set) the table holds the frequencies of sequences of up to
    ``max_len`` tokens: attention stays exact beyond, the centre fits less well.

    Returns:
        The :class:`RopeSpec` (of ``layer_type``'s layers, as :func:`rope_spec`), or None for a
        model without RoPE (use a plain centre, ``k_centre_rope=False``).

    Raises:
        ValueError: as :func:`rope_spec`.
        NotImplementedError: anything :func:`rope_spec` refuses, or pass-through channels that do
            not pair up (an odd ``head_dim - rotary_dim``); the message names the feature and the
            workaround: a scheme with ``k_centre_rope=False`` (a plain key centre, which needs
            no RoPE), e.g. ``nqkv_preset(4, rope_centre=False)``.
    """
    workaround = ("NQKVCache's RoPE-aware key centre cannot serve it: use a scheme with k_centre_rope=False,"
                  " e.g. nqkv_preset(4, rope_centre=False)")
    try:
        spec = rope_spec(config, device, layer_type)
    except NotImplementedError as e:
        raise NotImplementedError(f"{e}; {workaround}") from None
    head_dim = head_dim_of(config)
    if spec is not None and (head_dim % 2 or spec.rotary_dim > head_dim):
        raise NotImplementedError(f"{_text_config(config).model_type}: RoPE rotates {spec.rotary_dim} channels of a"
                                  f" head of {head_dim}, which leaves no even number of channels to pass through;"
                                  f" {workaround}")
    return spec
