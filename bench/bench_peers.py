"""W.A.L.T against its peers in diffusers, side by side in one process: a transformer training step
and 50-step sampling, at matched width, heads, depth and patch size, and the `paper` tokenizer's
encode and decode against CogVideoX's VAE (CPU, fp32).

    pip install -e .[bench]                  # brings diffusers (never a runtime dependency)
    python bench/bench_peers.py              # training and sampling (~10 min on 2 loaded cores)
    python bench/bench_peers.py --only train --grids 5x16x16 --reps 5
    python bench/bench_peers.py --only tokenizer --threads 2   # ~20 min on 2 idle cores
    python bench/bench_peers.py --compile    # adds walt with regional torch.compile (slow start)
    WALT_CPU_ALLOCATOR=system python bench/bench_peers.py   # glibc's malloc defaults
    python bench/bench_peers.py --only train --precision bf16-mixed   # both under bf16 autocast

Peer: `diffusers.LatteTransformer3DModel` built from config kwargs with random weights (Latte
alternates spatial blocks, full attention over a frame with cross-attention to a caption, and
temporal blocks, attention over the frames at each position) and `DDIMScheduler` with the
same schedule walt samples with (1000 linear betas, zero terminal SNR, trailing spacing).
Tokenizer: `diffusers.AutoencoderKLCogVideoX` with its default config (CogVideoX's released VAE:
216M parameters, 16 latent channels, 4x8x8 compression, frames in batches of 8 with a
convolution cache) against walt's `paper` preset (370M, 8 channels, same compression), one
1x3x17x128x128 clip, `inference_mode`, each model's default path (walt unchunked, as `walt
tokenize encode` runs; the mean of CogVideoX's posterior). The models differ in size, so the
table compares time per parameter (issue 14's yardstick) and the FLOPs each op counts
(`torch.utils.flop_counter`, in the warm-up call).

Training step: zero_grad, forward, mean-square loss, backward, AdamW step; both models get
the optimizer walt's training system builds (`walt_cli.systems.common.adamw`, fused AdamW).
walt: class-conditional (101 classes), AdaLN-LoRA r = 2, SW windows 1x16x16, STW windows
T x 8 x 8; Latte: an 8-token caption of width 32 (it cannot run without one).

Timing: every model is timed in turn inside each repetition (interleaved), `--reps` times after
a warm-up; the median is kept and the ratios are of medians. Times are CPU seconds of the
process (robust to other jobs on a shared machine); tokens/s = batch x T x h x w / CPU time.
Memory: the peak bytes PyTorch's CPU allocator holds during one step above what it held before
(activations, gradients, optimizer state, workspace), from the profiler's allocation events.
`--precision bf16-mixed` runs both models' training steps and sampling under bf16 autocast (fp32
weights and optimizer, as `trainer.precision=bf16-mixed` trains): faster than fp32 only on a CPU
with native bf16 matrix units (AMX, AVX512-BF16).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN = dict(depth=8, width=256, heads=4, batch=2)
SAMPLE = dict(depth=4, width=64, heads=4, batch=2, grid=(5, 16, 16), steps=50)
CAPTION = (8, 32)  # Latte's caption: tokens, width


def build(kind: str, grid, depth: int, width: int, heads: int):
    """(model, step inputs) for "walt" or "latte" at a latent grid (T, h, w)."""
    import torch

    torch.manual_seed(0)
    if kind.startswith("walt"):
        from walt_cli.models.transformer import WALT

        return WALT(
            depth=depth,
            width=width,
            heads=heads,
            adaln_lora_rank=2,
            num_classes=101,
            patch_size=1,
            latent_channels=8,
            latent_size=grid,
            spatial_window=(min(16, grid[1]), min(16, grid[2])),
            st_window=(min(8, grid[1]), min(8, grid[2])),
        )
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=8,
        out_channels=8,
        num_layers=depth // 2,  # a spatial and a temporal block per layer
        cross_attention_dim=width,
        sample_size=grid[1],
        patch_size=1,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=CAPTION[1],
        video_length=grid[0],
    )


def train_step_fn(kind: str, grid, batch: int, **size):
    """A closure running one training step of `kind`, and the model."""
    import torch

    from walt_cli.models.transformer import Conditioning
    from walt_cli.systems.common import adamw

    net = build(kind, grid, **size).train()
    if kind == "walt-compiled":
        net.compile_blocks()
    opt = adamw(list(net.parameters()), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    if kind.startswith("walt"):
        x = torch.randn(batch, net.in_channels, *grid, generator=g)
        t, cond = torch.rand(batch, generator=g), Conditioning(labels=torch.arange(batch))

        def forward():
            return net(x, t, cond)
    else:
        x = torch.randn(batch, 8, *grid, generator=g)
        text = torch.randn(batch, *CAPTION, generator=g)
        steps = torch.randint(0, 1000, (batch,), generator=g)

        def forward():
            return net(x, encoder_hidden_states=text, timestep=steps, return_dict=False)[0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        forward().square().mean().backward()
        opt.step()

    return step, net


def sample_fn(kind: str):
    """A closure generating one batch with 50 DDIM steps, and the model."""
    import torch

    s = SAMPLE
    net = build(kind, s["grid"], s["depth"], s["width"], s["heads"]).eval()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(s["batch"], 8, *s["grid"], generator=g)
    if kind == "walt":
        from walt_cli.diffusion.samplers import sample
        from walt_cli.diffusion.schedules import make_schedule
        from walt_cli.models.transformer import Conditioning

        schedule, cond = make_schedule(), Conditioning(labels=torch.arange(s["batch"]))

        def run() -> None:
            sample(net, noise, cond, schedule, num_steps=s["steps"])
    else:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="linear",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            prediction_type="v_prediction",
            clip_sample=False,
        )
        text = torch.randn(s["batch"], *CAPTION, generator=g)

        @torch.no_grad()
        def run() -> None:
            sched.set_timesteps(s["steps"])
            x = noise
            for step in sched.timesteps:
                t = step.expand(s["batch"])
                v = net(x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
                x = sched.step(v, step, x).prev_sample

    return run, net


def tokenizer_fns(size: int = 128, frames: int = 17) -> tuple[dict, dict, dict]:
    """Closures {"walt encode", "CogVideoX encode", "walt decode", "CogVideoX decode"}, the
    parameter count of each op's model, and a dict the closures fill with each op's FLOPs on
    their first (warm-up) call."""
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from torch.utils.flop_counter import FlopCounterMode

    from walt_cli.models.tokenizer import CausalVideoTokenizer

    torch.manual_seed(0)
    walt = CausalVideoTokenizer.from_preset("paper").eval()
    cog = AutoencoderKLCogVideoX().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1
    t_lat = walt.num_latent_frames(frames)
    z_walt = torch.randn(1, walt.latent_channels, t_lat, size // 8, size // 8, generator=g)
    z_cog = torch.randn(1, cog.config.latent_channels, t_lat, size // 8, size // 8, generator=g)
    ops = {
        "walt encode": lambda: walt.encode(x),
        "CogVideoX encode": lambda: cog.encode(x).latent_dist.mode(),
        "walt decode": lambda: walt.decode(z_walt),
        "CogVideoX decode": lambda: cog.decode(z_cog).sample,
    }
    flops: dict[str, float] = {}

    def timed(name: str):
        def run() -> None:
            with torch.inference_mode():
                if name in flops:
                    ops[name]()
                    return
                counter = FlopCounterMode(display=False)
                with counter:
                    ops[name]()
                flops[name] = float(counter.get_total_flops())

        return run

    counts = {"walt": walt.num_parameters(), "CogVideoX": sum(p.numel() for p in cog.parameters())}
    params = {name: float(counts[name.split()[0]]) for name in ops}
    return {name: timed(name) for name in ops}, params, flops


def autocast(fn, precision: str):
    """`fn` run under CPU bf16 autocast for "bf16-mixed"; `fn` itself for "32-true"."""
    if precision == "32-true":
        return fn
    import torch

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn()

    return run


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median CPU seconds of each closure, timed in turn within each of `reps` rounds.

    CPU time of this process (`time.process_time`, all its threads), not wall time: on a
    machine shared with other jobs a wall-clock step mostly measures the scheduler, while the
    CPU time a step consumes is its work."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_mib(fn) -> float:
    """Peak MiB held by PyTorch's CPU allocator during one call of `fn` above what it held
    before (activations, gradients, optimizer state, workspace)."""
    from walt_cli.profiling import peak_cpu_bytes

    return peak_cpu_bytes(fn) / 2**20


def _size() -> dict:
    return {k: TRAIN[k] for k in ("depth", "width", "heads")}


def machine(threads: int) -> str:
    import os

    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {threads} thread(s), load average at start {load}"
    )


def parse_grid(text: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in text.split("x"))  # type: ignore[return-value]


def tokenizer_table(args: argparse.Namespace) -> None:
    fns, params, flops = tokenizer_fns()
    med = interleaved(fns, args.reps)
    mem = {name: float("nan") for name in fns}
    if not args.no_memory:
        mem = {name: peak_mib(fn) for name, fn in fns.items()}
    print(
        "Tokenizer encode / decode of one 1x3x17x128x128 clip (latents 5x16x16), fp32, "
        "inference mode: walt's `paper` preset against `AutoencoderKLCogVideoX()`.\n"
    )
    print(
        "| op | walt params | CogVideoX params | walt CPU s | CogVideoX CPU s "
        "| walt / CogVideoX parameters per CPU s | walt GFLOP | CogVideoX GFLOP "
        "| walt GFLOP/CPU s | CogVideoX GFLOP/CPU s | walt peak MiB | CogVideoX peak MiB |"
    )
    print("|---" * 12 + "|")
    for op in ("encode", "decode"):
        w, c = f"walt {op}", f"CogVideoX {op}"
        per_param = (med[c] / params[c]) / (med[w] / params[w])
        print(
            f"| {op} | {params[w] / 1e6:.1f}M | {params[c] / 1e6:.1f}M | {med[w]:.1f} "
            f"| {med[c]:.1f} | **{per_param:.2f}x** | {flops[w] / 1e9:.0f} | {flops[c] / 1e9:.0f} "
            f"| {flops[w] / 1e9 / med[w]:.0f} | {flops[c] / 1e9 / med[c]:.0f} "
            f"| {mem[w]:.0f} | {mem[c]:.0f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=("train", "sample", "tokenizer"),
        help="one table only (the tokenizer table runs only when asked for: ~20 min)",
    )
    parser.add_argument("--grids", nargs="+", default=["5x16x16", "5x32x32"])
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--compile", action="store_true", help="also time regional compile")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory children")
    parser.add_argument(
        "--precision",
        choices=("32-true", "bf16-mixed"),
        default="32-true",
        help="bf16-mixed: training steps and sampling under bf16 autocast (not the tokenizer)",
    )
    args = parser.parse_args()
    import importlib.util

    from walt_cli.runtime import keep_freed_cpu_memory

    kept = keep_freed_cpu_memory()  # as `walt` does, for the whole process: both models
    import torch

    if importlib.util.find_spec("diffusers") is None:
        print("bench_peers: skipped, diffusers is not installed (pip install -e .[bench])")
        return
    torch.set_num_threads(args.threads)
    memory = "kept for reuse (walt_cli.runtime)" if kept else "glibc's defaults"
    print(
        f"Machine: {machine(args.threads)}. Median of {args.reps} interleaved repetitions. "
        f"Freed CPU memory: {memory}, for both models.\n"
    )
    if args.only == "tokenizer":
        tokenizer_table(args)
        return
    if args.only != "sample":
        kinds = ["walt", "latte"] + (["walt-compiled"] if args.compile else [])
        print(
            f"Training step (forward + backward + fused AdamW), batch {TRAIN['batch']}, width "
            f"{TRAIN['width']}, {TRAIN['heads']} heads, {TRAIN['depth']} attention blocks, "
            f"patch 1, {args.precision}.\n"
        )
        print(
            "| latent grid | walt params | Latte params | walt tokens/s | Latte tokens/s "
            "| walt / Latte tokens/s | walt peak MiB | Latte peak MiB | walt / Latte memory |"
            + (" compiled walt tokens/s | compiled / eager |" if args.compile else "")
        )
        print("|---" * (9 + 2 * args.compile) + "|")
        for text in args.grids:
            grid = parse_grid(text)
            fns, nets = {}, {}
            for kind in kinds:
                fns[kind], nets[kind] = train_step_fn(kind, grid, TRAIN["batch"], **_size())
                fns[kind] = autocast(fns[kind], args.precision)
            med = interleaved(fns, args.reps)
            tokens = TRAIN["batch"] * grid[0] * grid[1] * grid[2]
            rate = {k: tokens / v for k, v in med.items()}
            params = {k: sum(p.numel() for p in n.parameters()) / 1e6 for k, n in nets.items()}
            mem = {"walt": float("nan"), "latte": float("nan")}
            if not args.no_memory:
                for kind in ("walt", "latte"):
                    nets[kind].zero_grad(set_to_none=True)  # gradients are part of the peak
                    mem[kind] = peak_mib(fns[kind])
            row = (
                f"| {text} | {params['walt']:.2f}M | {params['latte']:.2f}M | {rate['walt']:.0f} "
                f"| {rate['latte']:.0f} | **{rate['walt'] / rate['latte']:.2f}x** "
                f"| {mem['walt']:.0f} | {mem['latte']:.0f} | {mem['walt'] / mem['latte']:.2f}x |"
            )
            if args.compile:
                c = rate["walt-compiled"]
                row += f" {c:.0f} | {c / rate['walt']:.2f}x |"
            print(row, flush=True)
        print()
    if args.only != "train":
        s = SAMPLE
        fns, nets = {}, {}
        for kind in ("walt", "latte"):
            fns[kind], nets[kind] = sample_fn(kind)
            fns[kind] = autocast(fns[kind], args.precision)
        med = interleaved(fns, args.reps)
        params = {k: sum(p.numel() for p in n.parameters()) / 1e6 for k, n in nets.items()}
        print(
            f"{s['steps']}-step DDIM sampling, batch {s['batch']}, latent "
            f"{'x'.join(map(str, s['grid']))}, width {s['width']}, {s['heads']} heads, "
            f"{s['depth']} attention blocks (walt: self-conditioning on, as it samples; Latte: "
            f"diffusers' DDIMScheduler), {args.precision}.\n"
        )
        print("| walt params | Latte params | walt CPU s | Latte CPU s | Latte / walt time |")
        print("|---|---|---|---|---|")
        print(
            f"| {params['walt']:.2f}M | {params['latte']:.2f}M | {med['walt']:.2f} "
            f"| {med['latte']:.2f} | **{med['latte'] / med['walt']:.2f}x** |"
        )


if __name__ == "__main__":
    main()
