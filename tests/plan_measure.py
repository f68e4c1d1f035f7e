"""Measured peak memory of real training steps on the CPU, for tests/test_plan.py.

    python tests/plan_measure.py RECIPE STAGE:BATCH:CKPT [...] -> one JSON line of bytes

Each case builds the stage's real training system on the CPU (the recipe's networks, its EMA
and its optimizers from `configure_optimizers`), and runs three steps in the order the
systems' `training_step` runs them (loss forward, zero_grad(set_to_none=True), backward, clip,
optimizer step, EMA update; the tokenizer's discriminator step with its r1 term every step).
Measured = the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before
the case) minus its resident set before the system was built: what the operating system saw.

Run with MALLOC_MMAP_THRESHOLD_ fixed (the test does), so glibc returns freed tensors to the
system at once instead of keeping them in its heap; a warm-up case per stage first takes the
one-off costs (kernel caches, thread pools) out of the measured ones.
"""

from __future__ import annotations

import gc
import json
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _system(recipe, stage: str):
    """(the training system, its optimizers, a batch maker, the step)."""
    import torch

    from walt_cli.plan import _tokenizer_shape
    from walt_cli.systems.common import DiffusionSystem, section_kwargs

    if stage in ("tokenizer", "decoder"):
        from walt_cli.models.tokenizer import CausalVideoTokenizer
        from walt_cli.systems.tokenizer import TokenizerSystem

        k, d = recipe.tokenizer, recipe.data
        system = TokenizerSystem(
            CausalVideoTokenizer.from_preset(k.preset),
            stage_dir="unused",
            **{**section_kwargs(k, TokenizerSystem), "freeze_encoder": stage == "decoder"},
        ).train()
        opt_g, opt_d = system.configure_optimizers()[0]
        gen = [p for p in system.tokenizer.parameters() if p.requires_grad]

        def make_batch(b: int):
            return torch.rand(b, 3, d.num_frames, *d.resolution) * 2 - 1

        def step(x) -> None:
            system.discriminator.requires_grad_(False)
            terms, recons = system.generator_losses([x], True)
            opt_g.zero_grad(set_to_none=True)
            terms["g_loss"].backward()
            torch.nn.utils.clip_grad_norm_(system.tokenizer.parameters(), 1.0)
            opt_g.step()
            system.discriminator.requires_grad_(True)
            system.ema.update_parameters(system.tokenizer)
            for p in gen:  # what toggle_optimizer(opt_d) does; a frozen encoder stays frozen
                p.requires_grad_(False)
            d_terms = system.discriminator_losses([x], recons, True)
            opt_d.zero_grad(set_to_none=True)
            d_terms["d_loss"].backward()
            torch.nn.utils.clip_grad_norm_(system.discriminator.parameters(), 1.0)
            opt_d.step()
            for p in gen:
                p.requires_grad_(True)

        return system, make_batch, step

    from walt_cli.config import stage_resolution
    from walt_cli.systems.common import build_network

    n = 0 if stage == "base" else int(stage[2:])
    s = recipe.base if n == 0 else recipe.sr[n - 1]
    tok = _tokenizer_shape(recipe)
    h, w = (x // tok.spatial_factor for x in stage_resolution(recipe, n))
    frames, c = tok.num_latent_frames(recipe.data.num_frames), tok.latent_channels
    shared = dict(
        stage_dir="unused",
        latent_mean=[0.0] * c,
        latent_std=[1.0] * c,
        tokenizer_hash="test",
        **section_kwargs(s, DiffusionSystem),
    )
    if n == 0:
        from walt_cli.systems.base import BaseSystem

        net = build_network(s, (frames, h, w), c)
        system = BaseSystem(net, **section_kwargs(s, BaseSystem), **shared)
    else:
        from walt_cli.systems.sr import SRSystem

        net = build_network(s, (frames, h, w), c, lowres_factor=s.factor, noise_level_cond=True)
        system = SRSystem(
            net,
            stage=n,
            factor=s.factor,
            resolution=list(s.resolution),
            lowres_mean=[0.0] * c,
            lowres_std=[1.0] * c,
            **shared,
        )
    system.train()
    opt = system.configure_optimizers()[0][0]
    text_len = recipe.text_encoder.max_length

    def make_batch(b: int) -> dict:
        batch = {
            "latent": torch.randn(b, c, frames, h, w),
            "label": torch.randint(0, max(1, s.num_classes), (b,)),
            "is_image": torch.zeros(b, dtype=torch.bool),
        }
        if n:
            batch["lowres"] = torch.randn(b, c, frames, h // s.factor, w // s.factor)
        if s.text_dim:
            batch["text"] = torch.randn(b, text_len, s.text_dim)
            batch["text_mask"] = torch.ones(b, text_len, dtype=torch.bool)
        return batch

    def step(batch) -> None:
        out, _ = system.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if system.ema is not None:
            system.ema.update_parameters(net)

    return system, make_batch, step


def measure(recipe, stage: str, batch: int, steps: int = 3) -> int:
    import torch

    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    torch.manual_seed(0)
    system, make_batch, step = _system(recipe, stage)
    for _ in range(steps):
        step(make_batch(batch))
    peak = _status("VmHWM") - before
    del system, make_batch, step
    gc.collect()
    return peak


def main(argv: list[str]) -> None:
    import torch

    from walt_cli.config import load_recipe

    torch.set_num_threads(1)
    recipe_path, cases = argv[0], argv[1:]
    results = {}
    warmed: set[str] = set()
    for case in cases:
        stage, batch, ckpt = case.split(":")
        overrides = []
        if stage not in ("tokenizer", "decoder"):
            key = "base" if stage == "base" else f"sr.{int(stage[2:]) - 1}"
            overrides.append(f"{key}.gradient_checkpointing={ckpt == '1'}")
        recipe = load_recipe(recipe_path, overrides)
        if stage not in warmed:
            measure(recipe, stage, 1, steps=2)
            warmed.add(stage)
        results[case] = measure(recipe, stage, int(batch))
        del recipe
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
