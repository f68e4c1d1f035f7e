"""Tiny cascades for the generation tests: a run directory with a tiny tokenizer, a tiny base
(3 latent frames = 9 pixel frames at 32x32) and optionally a tiny x2 SR stage (64x64), saved
with the metadata the training commands write, plus a fake text encoder with the API of
walt_cli.models.text."""

from __future__ import annotations

from pathlib import Path

import torch

from walt_cli.data.latents import file_hash
from walt_cli.models.tokenizer import CausalVideoTokenizer
from walt_cli.models.transformer import WALT

TEXT_DIM = 16


def _perturb(net: torch.nn.Module, seed: int) -> None:
    """Move the adaLN-Zero weights off zero so the untrained net's output depends on its input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _stats(c: int, seed: int, tok_hash: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "mean": (torch.randn(c, generator=g) * 0.1).tolist(),
        "std": (0.5 + torch.rand(c, generator=g)).tolist(),
        "tokenizer": tok_hash,
    }


class FakeTextEncoder:
    """The contract's text-encoder API (dim, max_length, hash, encode) without weights: each
    word hashes to a fixed vector; "" gives an all-False mask."""

    dim = TEXT_DIM
    max_length = 8
    hash = "fake-text-0001"

    def encode(self, prompts):
        b = len(prompts)
        states = torch.zeros(b, self.max_length, self.dim)
        mask = torch.zeros(b, self.max_length, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(prompt.split()[: self.max_length]):
                g = torch.Generator().manual_seed(sum(map(ord, word)))
                states[i, j] = torch.randn(self.dim, generator=g)
                mask[i, j] = True
        return states, mask


def make_run(
    root: Path,
    *,
    sr: bool = True,
    text: bool = False,
    num_classes: int = 10,
    frame_pred: float = 0.5,
    sample: str = "steps: [3, 2]",
    sr_cond: bool = True,
    latent_frames: int = 3,
    text_encoder: dict | None = None,
) -> Path:
    """runs/<name> layout: recipe.yaml, tokenizer/, base/, sr1/ (see the module docstring).

    `latent_frames` 5 makes 17-frame clips (what FVD's 16-frame protocols need); `text_encoder`
    (a real encoder's `describe()`, with `text=True`) replaces the fake one, so that the
    command line, which loads the encoder the bundle names, can sample the run."""
    torch.manual_seed(0)
    tok = CausalVideoTokenizer.from_preset("tiny")
    tok_file = root / "tokenizer" / "tokenizer.safetensors"
    tok.save(tok_file)
    th = file_hash(tok_file)
    spec = text_encoder or {"name": "fake", "path": None, "max_length": 8, "dtype": "float32",
                            "hash": FakeTextEncoder.hash}  # fmt: skip
    cond = (
        {"num_classes": 0, "text_dim": int(spec.get("dim", TEXT_DIM))}
        if text
        else {"num_classes": num_classes, "text_dim": None}
    )
    text_extra = {"text_encoder": spec} if text else {}
    lt = latent_frames
    base = WALT.from_preset(
        "tiny", latent_size=(lt, 4, 4), spatial_window=(4, 4), st_window=(2, 2), **cond
    )
    _perturb(base, 1)
    base.save(
        root / "base" / "base.safetensors",
        extra={"step": 1, "ema": True, "latent_stats": _stats(8, 1, th),
               "p_frame_pred": frame_pred, **text_extra},
    )  # fmt: skip
    if sr:
        net = WALT.from_preset(
            "tiny", latent_size=(lt, 8, 8), spatial_window=(8, 8), st_window=(4, 4),
            lowres_factor=2, noise_level_cond=True,
            **(cond if sr_cond else {"num_classes": 0, "text_dim": None}),
        )  # fmt: skip
        _perturb(net, 2)
        net.save(
            root / "sr1" / "sr1.safetensors",
            extra={"step": 1, "ema": True, "stage": 1, "factor": 2, "resolution": [64, 64],
                   "lowres_resolution": [32, 32], "t_max": 0.3, "noise_level": 0.1,
                   "latent_stats": _stats(8, 2, th), "lowres_latent_stats": _stats(8, 3, th),
                   **text_extra},
        )  # fmt: skip
    (root / "recipe.yaml").write_text(
        f"name: {root.name}\ndata:\n  source: shapes\n  num_frames: {1 + 4 * (lt - 1)}\n  fps: 8\n"
        f"sample:\n  {sample}\n"
    )
    return root
