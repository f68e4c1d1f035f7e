"""Window attention vs full attention in the W.A.L.T denoiser: CPU forward+backward time and peak
memory, side by side, at latent grids 5x16x16, 5x32x32 and 9x32x56.

    python bench/bench_transformer.py            # prints a markdown table (~3-5 min, 1 thread)
    python bench/bench_transformer.py --quick    # smallest grid only
    python bench/bench_transformer.py --threads 0 --reps 3   # torch's thread count, 3 steps

Three builds of the same network (same layers, width, heads, conditioning):
- windowed: the shipped model, SW windows 1 x 16 x 16 and STW windows T x 8 x 8 (the paper's
  defaults, SPEC §2.2), scaled to 1 x 16 x 28 and T x 8 x 14 on the 9:16 grid 32x56 as in the
  paper's fine-tune (SPEC Table 6), with the Swin relative position bias. On CPU, training with a
  learned bias runs SDPA's math kernel (the fused CPU kernel gives no gradient for the bias), which
  materialises each window's attention matrix;
- windowed, no bias: the same windows with `relative_position_bias=False` (fused kernel);
- full: `full_attention=True`, every window is the whole grid (SW: a full frame, STW: the whole
  clip), without the bias (a dense N x N bias at 9x32x56 would take ~1 GiB per head and layer),
  so SDPA runs its fused kernel with no mask.
The speed-up and memory ratios are full / windowed (> 1: windows are cheaper).

Model size: a CPU-sized W.A.L.T (the presets' widths do not fit a 2-core CPU at 9x32x56):
4 layers (2 SW + 2 STW), width 256, 4 heads of 64 (walt-l's head size), AdaLN-LoRA r = 2,
class-conditional, p = 1, batch 1, fp32, one thread by default (on a shared 2-core machine,
two OpenMP threads competing with other jobs make wall times swing several-fold; the ratios are
the figure). Each measurement runs in a fresh process: time is the best of `--reps` steps after
a warm-up step; peak memory is the process's peak resident set
during the steps minus its resident set just before them (activations, gradients, workspace).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GRIDS = [(5, 16, 16), (5, 32, 32), (9, 32, 56)]
MODEL = dict(depth=4, width=256, heads=4, adaln_lora_rank=2, num_classes=101, patch_size=1)


def windows_for(grid: tuple[int, int, int]) -> dict[str, tuple[int, int]]:
    _, h, w = grid
    if w > h:  # 9:16 grid: the paper scales both windows with the width
        return dict(spatial_window=(16, 28), st_window=(8, 14))
    return dict(spatial_window=(16, 16), st_window=(8, 8))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(spec: dict) -> dict:
    """Build one model, time forward+backward, report seconds and peak memory (one process)."""
    import torch

    from walt_cli.models.transformer import WALT, Conditioning, describe_windows

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    grid = tuple(spec["grid"])
    kwargs = dict(MODEL, latent_size=grid, **windows_for(grid))
    if spec["variant"] == "full":
        kwargs.update(full_attention=True, relative_position_bias=False)
    elif spec["variant"] == "windowed-nobias":
        kwargs.update(relative_position_bias=False)
    net = WALT(**kwargs).train()
    x = torch.randn(1, net.in_channels, *grid)
    t = torch.rand(1)
    cond = Conditioning(labels=torch.tensor([3]))

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(x, t, cond).square().mean().backward()

    rss0 = _rss_bytes()
    step()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(spec["reps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    return dict(
        seconds=min(times),
        peak_mib=peak / 2**20,
        windows=describe_windows(net),
        backends=net.attention_backends(training=True),
        params=net.num_parameters,
        threads=torch.get_num_threads(),
    )


def run(grid: tuple[int, int, int], variant: str, reps: int, threads: int) -> dict:
    spec = json.dumps(dict(grid=list(grid), variant=variant, reps=reps, threads=threads))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(f"benchmark child failed for {grid} {variant}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2, help="timed steps per model (best kept)")
    parser.add_argument("--quick", action="store_true", help="only the 5x16x16 grid")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable timings on a shared machine; 0 = torch's choice)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    grids = GRIDS[:1] if args.quick else GRIDS
    variants = ("windowed", "windowed-nobias", "full")
    rows = []
    for grid in grids:
        rows.append((grid, *(run(grid, v, args.reps, args.threads) for v in variants)))
        print(f"  measured {'x'.join(map(str, grid))}", file=sys.stderr, flush=True)

    _, first, nobias, full = rows[0]
    print(
        f"W.A.L.T window vs full attention: CPU fp32, {first['threads']} threads, batch 1, one "
        f"training step (forward+backward), best of {args.reps} after a warm-up. Model: "
        f"{MODEL['depth']} layers (SW/STW alternating), width {MODEL['width']}, {MODEL['heads']} "
        f"heads of {MODEL['width'] // MODEL['heads']}, AdaLN-LoRA r = {MODEL['adaln_lora_rank']}, "
        f"{first['params'] / 1e6:.1f}M parameters. SDPA kernel in training: windowed "
        f"{first['backends']['spatiotemporal']}, windowed without bias "
        f"{nobias['backends']['spatiotemporal']}, full {full['backends']['spatiotemporal']}.\n"
    )
    print(
        "| latent grid | tokens | windows | windowed s | windowed, no bias s | full s "
        "| full / windowed time | windowed MiB | windowed, no bias MiB | full MiB "
        "| full / windowed memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for grid, w, nb, f in rows:
        tokens = grid[0] * grid[1] * grid[2]
        print(
            f"| {'x'.join(map(str, grid))} | {tokens} | {w['windows']} | {w['seconds']:.3f} "
            f"| {nb['seconds']:.3f} | {f['seconds']:.3f} | {f['seconds'] / w['seconds']:.2f}x "
            f"(no bias: {f['seconds'] / nb['seconds']:.2f}x) | {w['peak_mib']:.0f} "
            f"| {nb['peak_mib']:.0f} | {f['peak_mib']:.0f} "
            f"| {f['peak_mib'] / w['peak_mib']:.2f}x (no bias: {f['peak_mib'] / nb['peak_mib']:.2f}x) |"
        )


if __name__ == "__main__":
    main()
