"""GPU benchmark of the W.A.L.T denoiser: walt-l and walt-xl at a 5x16x16 latent grid in bf16,
eager against regional `torch.compile`, activation checkpointing off and on: training steps/s,
MFU, peak memory, and the time of 50-step DDIM sampling. Sized to finish within 8 minutes on
one H100/H200 (`--budget-s` skips what would run past it and says so).

    make bench-gpu                                   # = python bench/bench_gpu.py
    python bench/bench_gpu.py --models walt-l --batch 8
    python bench/bench_gpu.py --dry-run              # tiny preset on the CPU: checks the script

Training step: bf16 autocast forward, v-prediction MSE against a random target, backward,
fused AdamW (what `walt train-base` builds); class-conditional (101 classes), p = 1, SW
windows 1x16x16, STW windows 5x8x8, attention chosen automatically (SDPA on CUDA;
`WALT_ATTENTION=flex` for FlexAttention).

Last, the shipped default model through `walt sample`'s pipeline in fp32 and with bf16 weights
(what `--precision auto` loads on CUDA): the time of 4 prompts and the bf16 videos' PSNR against
fp32's, the check that bf16 weights are safe on that GPU.

MFU = model FLOPs per step x steps/s / peak bf16 FLOP/s of the GPU (dense: 989 TFLOP/s for
H100/H200 SXM, or `--peak-tflops`). Model FLOPs per step = 3 x forward FLOPs (the backward
pass costs twice the forward), forward FLOPs = tokens x sum over layers of
(24 d^2 [qkv 6d^2 + out 2d^2 + MLP 16d^2, 2 FLOPs per multiply-add] + 4 N_w d [q k^T and
P v over a window of N_w tokens]); embeddings, AdaLN and the final layer (< 1%) are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = (5, 16, 16)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def step_flops(net, batch: int) -> float:
    """Model FLOPs of one training step (formula in the module docstring)."""
    from walt_cli.models.attention import effective_window

    t, h, w = GRID
    tokens = batch * t * h * w
    d = net.width
    total = 0.0
    for block in net.blocks:
        wt, wh, ww = effective_window(GRID, block.attn.window, block.temporal)
        total += tokens * (24 * d * d + 4 * (wt * wh * ww) * d)
    return 3 * total


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def build(preset: str, device, dry: bool):
    from walt_cli.models.transformer import WALT

    kwargs = dict(latent_size=GRID, num_classes=101, spatial_window=(16, 16), st_window=(8, 8))
    if dry:
        kwargs.update(depth=2, width=64, heads=4)
    return WALT.from_preset(preset, **kwargs).to(device)


def train_case(args, preset, device, *, compiled: bool, ckpt: bool) -> dict:
    import torch

    from walt_cli.models.transformer import Conditioning
    from walt_cli.systems.common import adamw

    torch.manual_seed(0)
    net = build(preset, device, args.dry_run).train()
    net.gradient_checkpointing = ckpt
    if compiled:
        net.compile_blocks(**({"backend": "aot_eager"} if args.dry_run else {}))
    opt = adamw(list(net.parameters()), lr=1e-4)
    b = args.batch
    x = torch.randn(b, net.in_channels, *GRID, device=device)
    target = torch.randn(b, net.latent_channels, *GRID, device=device)
    t = torch.rand(b, device=device)
    cond = Conditioning(labels=torch.arange(b, device=device) % 101)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.dry_run)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = (net(x, t, cond).float() - target).square().mean()
        loss.backward()
        opt.step()

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    flops = step_flops(net, b)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dict(
        steps_per_s=1 / seconds,
        tflops=flops / seconds / 1e12,
        mfu=flops / seconds / (args.peak_tflops * 1e12) if args.peak_tflops else float("nan"),
        peak_gib=peak,
        warmup_s=warmup_s,
        params_m=net.num_parameters / 1e6,
    )


def sample_case(args, preset, device) -> dict:
    import torch

    from walt_cli.diffusion.samplers import sample
    from walt_cli.diffusion.schedules import make_schedule
    from walt_cli.models.transformer import Conditioning

    torch.manual_seed(0)
    net = build(preset, device, args.dry_run).eval()
    b = args.sample_batch
    noise = torch.randn(b, net.latent_channels, *GRID, device=device)
    cond = Conditioning(labels=torch.arange(b, device=device) % 101)
    schedule = make_schedule()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.dry_run)
    times = []
    for _ in range(2):  # the first includes FlexAttention's compilation
        sync(device)
        start = time.perf_counter()
        with autocast:
            sample(net, noise, cond, schedule, num_steps=args.sample_steps)
        sync(device)
        times.append(time.perf_counter() - start)
    return dict(seconds=times[-1], first_s=times[0])


PROMPTS = ("a red circle moving left", "a blue square moving up quickly on a black background",
           "a large green triangle moving right slowly", "a yellow star moving down-left")  # fmt: skip


def default_model_case(args, device) -> dict:
    """The shipped default model through `walt sample`'s pipeline in fp32 and in bf16 (the
    weights loaded in bf16, as `--precision auto` does on CUDA): seconds for 4 prompts (the
    second call of each), and the bf16 videos' PSNR against the fp32 ones."""
    import torch

    from walt_cli.pipelines import Pipeline

    steps = [2, 1] if args.dry_run else None  # None: the bundle's 50 + 25
    out, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        pipe = Pipeline.from_bundle(args.bundle, device=str(device), precision=precision)
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            out[precision] = pipe.generate(
                prompts=list(PROMPTS), seeds=list(range(len(PROMPTS))), steps=steps,
                output="float",
            ).cpu()  # fmt: skip
            sync(device)
            seconds[precision] = time.perf_counter() - start
    mse = ((out["bf16"] - out["fp32"]) ** 2).flatten(1).mean(1)  # pixels in [-1, 1]
    psnr = (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).tolist()
    return dict(fp32_s=seconds["fp32"], bf16_s=seconds["bf16"], psnr_db=psnr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["walt-l", "walt-xl"])
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU")
    parser.add_argument("--budget-s", type=float, default=420, help="skip cases past this")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--bundle", default="default", help="the bundle of the last case")
    parser.add_argument("--attention", default="auto", help="auto, sdpa, window or flex")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import torch

    from walt_cli.errors import WaltError
    from walt_cli.models.attention import set_attention_impl

    set_attention_impl(args.attention)
    if args.dry_run:
        device = torch.device("cpu")
        args.models = ["tiny"]
        args.batch, args.steps, args.warmup = 2, 1, 1
        args.sample_batch, args.sample_steps = 1, 2
        name = "CPU (dry run: tiny model, fp32; numbers mean nothing)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or use --dry-run to check the script")
        device = torch.device("cuda")
        name = torch.cuda.get_device_name()
        if args.peak_tflops is None:
            args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    began = time.perf_counter()
    rows, skipped, failed = [], [], []

    def attempt(case: str, run, *run_args, **run_kwargs):
        """run(*run_args, **run_kwargs), or None with the failure listed: one case that cannot
        compile on this GPU (FlexAttention for walt-l on an H200) no longer ends the run."""
        try:
            return run(*run_args, **run_kwargs)
        except Exception as err:  # noqa: BLE001 - any failure of one case is reported
            lines = [line for line in str(err).splitlines() if line.strip()]
            failed.append(f"{case}: {type(err).__name__}: {lines[0] if lines else ''}")
            print(f"  {case}: FAILED ({failed[-1]})", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    for preset in args.models:
        for compiled in (False, True):
            for ckpt in (False, True):
                case = (
                    f"{preset} {'compiled' if compiled else 'eager'} ckpt={'on' if ckpt else 'off'}"
                )
                if time.perf_counter() - began > args.budget_s:
                    skipped.append(f"{case} (past --budget-s)")
                    continue
                result = attempt(
                    case, train_case, args, preset, device, compiled=compiled, ckpt=ckpt
                )
                if result is not None:
                    rows.append((preset, compiled, ckpt, result))
                    print(f"  {case}: {json.dumps(result)}", file=sys.stderr, flush=True)
    samples = {}
    for preset in args.models:
        if time.perf_counter() - began > args.budget_s:
            skipped.append(f"{preset} sampling (past --budget-s)")
            continue
        result = attempt(f"{preset} sampling", sample_case, args, preset, device)
        if result is not None:
            samples[preset] = result
    default = None
    if time.perf_counter() - began > args.budget_s:
        skipped.append("default model fp32 / bf16 (past --budget-s)")
    else:
        try:
            default = default_model_case(args, device)
        except (ImportError, WaltError) as err:  # e.g. no MiniLM package on the GPU's image
            skipped.append(f"default model fp32 / bf16 ({err})")
    print(
        f"GPU: {name}; torch {torch.__version__}; attention {args.attention}; latent "
        f"{'x'.join(map(str, GRID))}, batch "
        f"{args.batch}, {'fp32' if args.dry_run else 'bf16 autocast'}, {args.steps} timed steps after {args.warmup}; peak "
        f"{args.peak_tflops} TFLOP/s for MFU; total {time.perf_counter() - began:.0f} s.\n"
    )
    print(
        "| model | params | mode | checkpointing | steps/s | model TFLOP/s | MFU | peak GiB "
        "| warm-up s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, compiled, ckpt, r in rows:
        print(
            f"| {preset} | {r['params_m']:.3g}M | {'compiled' if compiled else 'eager'} "
            f"| {'on' if ckpt else 'off'} | {r['steps_per_s']:.2f} | {r['tflops']:.1f} "
            f"| {r['mfu']:.1%} | {r['peak_gib']:.1f} | {r['warmup_s']:.0f} |"
        )
    print(f"\n{args.sample_steps}-step DDIM sampling, batch {args.sample_batch}:\n")
    print("| model | seconds | first call s (compiles) |")
    print("|---|---|---|")
    for preset, r in samples.items():
        print(f"| {preset} | {r['seconds']:.2f} | {r['first_s']:.2f} |")
    if default is not None:
        psnr = ", ".join(f"{v:.1f}" for v in default["psnr_db"])
        print(
            f"\nThe default model, `walt sample`'s pipeline, {len(PROMPTS)} prompts: fp32 "
            f"{default['fp32_s']:.2f} s, bf16 weights {default['bf16_s']:.2f} s; bf16 against "
            f"fp32, PSNR {psnr} dB"
        )
    if skipped:
        print(f"\nSkipped: {', '.join(skipped)}")
    for line in failed:
        print(f"\nFailed: {line}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": [dict(model=p, compiled=c, ckpt=k, **r) for p, c, k, r in rows],
                    "sampling": samples,
                    "default_model": default,
                    "skipped": skipped,
                    "failed": failed,
                    "attention": args.attention,
                    "device": name,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
