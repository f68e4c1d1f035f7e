"""The first-frame fix (DESIGN §5-6): frame 0 of a briefly trained tokenizer is reconstructed
within a fraction of a dB of the later frames on shapes clips, and trails them less than with
one channel per GroupNorm group.

With one channel per GroupNorm group (the old `tiny`), per-frame normalisation erases each
channel's mean colour and frame 0, which sees only causal padding as its past, came out flat.
"""

from __future__ import annotations

import torch

from walt_cli.data.shapes import ShapesDataset
from walt_cli.losses.perceptual import psnr
from walt_cli.models.tokenizer import CausalVideoTokenizer


def _fit(tok: CausalVideoTokenizer, clips: torch.Tensor, steps: int) -> None:
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3, betas=(0.9, 0.99))
    for _ in range(steps):
        loss = (tok.decode(tok.encode(clips)) - clips).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _frame_zero_deficit(seed: int, **preset) -> tuple[float, float]:
    """(dB by which frame 0 trails the worst later frame, mean PSNR) after a short fit of a
    fresh tiny tokenizer on 4 shapes clips (5 frames, 32x32)."""
    torch.manual_seed(0)
    data = ShapesDataset(num_items=4, num_frames=5, height=32, width=32, seed=seed)
    clips = torch.stack([data[i]["video"] for i in range(4)])  # (4, 3, 5, 32, 32)
    tok = CausalVideoTokenizer.from_preset("tiny", **preset)
    _fit(tok, clips, steps=80)
    with torch.no_grad():
        recon = tok.decode(tok.encode(clips))
    per_frame = torch.stack(
        [psnr(recon[:, :, j : j + 1], clips[:, :, j : j + 1]).mean() for j in range(5)]
    )
    return float(per_frame[1:].min() - per_frame[0]), float(per_frame.mean())


def test_frame_zero_trails_less_than_with_one_channel_per_group():
    # Measured (torch 2.13.0+cpu, Intel Xeon), frame 0's deficit on data seeds 11, 5, 3 after
    # 80 steps: the preset's groups 0.67, 0.06, 0.66 dB (mean 0.46) with 2 threads and 0.35,
    # 0.04, 0.58 with 1; one channel per group (num_groups=32) 1.72, 1.11, 1.15 (mean 1.33) and
    # 1.70, 1.29, 1.16. Fits of 40 steps were too short to tell: one channel per group had not
    # left flat grey on seed 5, and the thread count alone moved seed 11 by 0.9 dB, so the test
    # failed under OMP_NUM_THREADS=1. The mean over three seeds is compared.
    fixed = [_frame_zero_deficit(seed) for seed in (11, 5, 3)]
    old = [_frame_zero_deficit(seed, num_groups=32) for seed in (11, 5, 3)]
    mean_fixed = sum(d for d, _ in fixed) / 3
    mean_old = sum(d for d, _ in old) / 3
    assert mean_fixed < mean_old - 0.3, (fixed, old)
    assert all(d < 1.0 for d, _ in fixed), fixed  # frame 0 within 1 dB (issue 15's bar)
    assert all(p > 14.0 for _, p in fixed), fixed  # it did learn (flat grey is ~10.5 dB)
