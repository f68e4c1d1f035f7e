"""The CPU training path's window-attention kernel (`attention.WindowAttentionFunction`): its
forward through ATen's fused CPU attention (output and row log-sum-exp in one kernel) against
the three-pass forward it replaced (logits, log-sum-exp, softmax times v), each followed by the
same hand-written backward, side by side in one process.

    python bench/bench_window_kernel.py            # ~1 min, 1 thread
    python bench/bench_window_kernel.py --reps 9 --threads 2

Shapes (B nW, heads, N, head_dim): the `shapes` recipe's base at batch 8 (SW windows of 8x8
tokens over 5 frames, STW windows of 5x4x4) and `bench_peers.py`'s training model at batch 2 on
5x16x16 latents (SW 1x16x16, STW 5x8x8). Times are milliseconds per forward + backward, median
of `--reps` interleaved repetitions of 10 calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

SHAPES = {
    "shapes base, SW": (40, 5, 64, 32),
    "shapes base, STW": (32, 5, 80, 32),
    "bench_peers 5x16x16, SW": (10, 4, 256, 64),
    "bench_peers 5x16x16, STW": (8, 4, 320, 64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from walt_cli.models import attention

    torch.set_num_threads(args.threads)
    fused_op = attention._CPU_FLASH
    if fused_op is None:
        raise SystemExit("this torch build has no fused CPU attention op: nothing to compare")

    def run(shape):
        torch.manual_seed(0)
        q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
        bias = (torch.randn(*shape[1:3], shape[2]) * 0.1).requires_grad_()
        grad = torch.randn(*shape)
        scale = shape[-1] ** -0.5

        def call() -> None:
            attention.WindowAttentionFunction.apply(q, k, v, bias, None, scale).backward(grad)

        return call

    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.reps}")
    print(
        "| layer | (B nW, heads, N, d) | fwd + bwd ms, fused forward | three-pass forward | speed-up |"
    )
    print("|---|---|---|---|---|")
    try:
        for name, shape in SHAPES.items():
            calls = {"fused": run(shape), "three-pass": run(shape)}
            times: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(args.reps):
                for key, call in calls.items():
                    attention._CPU_FLASH = fused_op if key == "fused" else None
                    call()  # warm
                    t0 = time.perf_counter()
                    for _ in range(10):
                        call()
                    times[key].append((time.perf_counter() - t0) / 10 * 1e3)
            fused, by_hand = (statistics.median(times[k]) for k in ("fused", "three-pass"))
            print(
                f"| {name} | {shape} | {fused:.2f} | {by_hand:.2f} | **{by_hand / fused:.2f}x** |"
            )
    finally:
        attention._CPU_FLASH = fused_op


if __name__ == "__main__":
    main()
