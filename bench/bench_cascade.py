"""The cascade's training costs: MiniLM prompts per second, and one SR training step.

    python bench/bench_cascade.py                    # CPU: MiniLM + the shapes SR stage, batch 8
    python bench/bench_cascade.py --stage t2v:1 --device cuda --precision bf16 --batch 8
                                                     # GPU: t2v SR1 steps/s and peak memory

MiniLM: the recipe's text encoder (all-MiniLM-L6-v2, max_length 32) over 256 shapes captions in
batches of 64, best of 3 passes after a warm-up. SR step: the recipe's SR stage network built as
`walt train-sr` builds it, random normalised latent pairs of the stage's shape (the data's frame
count), text states of the encoder's width, one full `SRSystem` loss (self-conditioning pass
included at the recipe's rate) + backward + AdamW step; the median of `--steps` steps after two
warm-ups, and the process CPU time per step (all threads; on an otherwise idle machine the wall
time is about CPU time / threads, which makes the CPU figure the one to read on a shared
machine). On CUDA, bf16 runs under autocast and peak memory is torch's max allocated.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def minilm_rate(threads: int) -> float:
    import torch

    from walt_cli.models.text import TextEncoder

    torch.set_num_threads(threads)
    captions = _captions(256)
    enc = TextEncoder.from_spec(name="minilm", max_length=32)
    enc.encode(captions[:64])
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(0, len(captions), 64):
            enc.encode(captions[i : i + 64])
        best = min(best, time.perf_counter() - t0)
    return len(captions) / best


def _captions(n: int) -> list[str]:
    from walt_cli.config import load_recipe
    from walt_cli.data.datasets import build_dataset

    recipe = load_recipe(REPO / "recipes" / "shapes.yaml", ["data.num_frames=1"])
    data = build_dataset(recipe.data, "train", augment=False)
    return [data[i]["caption"] for i in range(n)]


def sr_step(recipe_name: str, stage: int, batch: int, device: str, precision: str, steps: int):
    import torch

    from walt_cli.config import load_recipe
    from walt_cli.systems.common import build_network
    from walt_cli.systems.sr import SRSystem

    recipe = load_recipe(REPO / "recipes" / f"{recipe_name}.yaml")
    s = recipe.sr[stage - 1]
    frames = 1 + (recipe.data.num_frames - 1) // 4
    h, w = s.resolution[0] // 8, s.resolution[1] // 8
    torch.manual_seed(0)
    net = build_network(s, (frames, h, w), 8, lowres_factor=s.factor, noise_level_cond=True)
    system = SRSystem(
        net, stage=stage, factor=s.factor, resolution=list(s.resolution),
        lowres_mean=[0.0] * 8, lowres_std=[1.0] * 8, t_max=s.t_max, stage_dir="unused",
        latent_mean=[0.0] * 8, latent_std=[1.0] * 8, tokenizer_hash="bench", max_steps=1,
        p_self_cond=s.p_self_cond, p_cond_drop=s.p_cond_drop, ema=False,
    ).to(device)  # fmt: skip
    f = s.factor
    data = {
        "latent": torch.randn(batch, 8, frames, h, w, device=device),
        "lowres": torch.randn(batch, 8, frames, h // f, w // f, device=device),
        "is_image": torch.zeros(batch, dtype=torch.bool, device=device),
        "label": torch.zeros(batch, dtype=torch.long, device=device),
    }
    if s.text_dim:
        data["text"] = torch.randn(batch, recipe.text_encoder.max_length, s.text_dim, device=device)
        data["text_mask"] = torch.ones(data["text"].shape[:2], dtype=torch.bool, device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                              enabled=precision == "bf16")  # fmt: skip
    times, cpu = [], []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            out, _ = system.compute_loss(data)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return (
        net.num_parameters,
        (frames, h, w),
        statistics.median(times),
        statistics.median(cpu),
        peak,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="shapes:1", help="RECIPE:N, e.g. shapes:1 or t2v:1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not args.skip_minilm:
        print(f"MiniLM (max_length 32, batch 64, {args.threads} threads): "
              f"{minilm_rate(args.threads):.1f} prompts/s")  # fmt: skip
    name, stage = args.stage.split(":")
    params, grid, seconds, cpu, peak = sr_step(
        name, int(stage), args.batch, args.device, args.precision, args.steps
    )
    print(
        f"{name} SR stage {stage}: {params / 1e6:.2f}M parameters, latents {grid}, batch "
        f"{args.batch}, {args.precision} on {args.device}: {seconds:.3f} s/step "
        f"({1 / seconds:.2f} steps/s; process CPU time {cpu:.2f} s/step)"
        + (f", peak {peak:.1f} GiB" if peak is not None else "")
    )


if __name__ == "__main__":
    main()
