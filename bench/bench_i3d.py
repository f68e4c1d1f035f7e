"""Benchmark the I3D feature extractor (the FVD network): clips per second.

    python bench/bench_i3d.py                              # CPU, batch 8 of 16x224x224
    python bench/bench_i3d.py --device cuda --batch 32 --dtype bf16
    WALT_CPU_ALLOCATOR=system python bench/bench_i3d.py    # glibc's malloc defaults

Times `i3d_features` (protocol preprocessing + I3D forward to the 400-d logits) on random clips
already at 224x224, after one warm-up batch; reports the best and median of `--repeats` runs.
The weights are the real ones (found as `walt eval-fvd` finds them).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--detector", default=None, help="I3D weights (default: the usual lookup)")
    args = parser.parse_args()

    from walt_cli.runtime import keep_freed_cpu_memory

    kept = keep_freed_cpu_memory()  # as `walt eval-fvd` does (WALT_CPU_ALLOCATOR=system: not)
    import torch

    from walt_cli.metrics.fvd import i3d_features
    from walt_cli.metrics.i3d import load_i3d

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    net = load_i3d(args.detector, device=args.device).to(dtype)
    gen = torch.Generator().manual_seed(0)
    clips = torch.randint(
        0, 256, (args.batch, 3, args.frames, args.size, args.size), generator=gen, dtype=torch.uint8
    ).to(args.device)

    def run() -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        i3d_features(clips, net, "magvit", num_frames=args.frames, batch_size=args.batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run()  # warm-up
    times = [run() for _ in range(args.repeats)]
    best, median = min(times), statistics.median(times)
    where = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"freed memory {'kept' if kept else 'returned'}"
    )
    print("| device | dtype | batch | clip | s/batch (best) | s/batch (median) | clips/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.device} ({where}) | {args.dtype} | {args.batch} | "
        f"{args.frames}x{args.size}x{args.size} | {best:.2f} | {median:.2f} | "
        f"{args.batch / best:.2f} |"
    )


if __name__ == "__main__":
    main()
