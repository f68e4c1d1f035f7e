"""Benchmark the causal 3D tokenizer on CPU: encode/decode time and peak memory, with and
without chunking over time. Prints a markdown table (BENCHMARKS.md).

    python bench/bench_tokenizer.py                      # paper preset, 1x3x17x128x128
    python bench/bench_tokenizer.py --preset tiny --size 64

Each measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its
own: the table gives the process peak and the part of it above the weights and input (the
activations). Weights are random (timing and memory do not depend on their values); latents for
decoding are standard normal.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    """One measurement: build the model and input, run the op `repeats` times, print JSON."""
    import torch

    from walt_cli.models.tokenizer import CausalVideoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = CausalVideoTokenizer.from_preset(args.preset).eval()
    f_s, f_t = tok.spatial_factor, tok.temporal_factor
    if args.op == "encode":
        x = torch.rand(1, 3, args.frames, args.size, args.size) * 2 - 1  # (B, 3, T, H, W)
        chunk = dict(chunk_frames=args.chunk or None)
        run = tok.encode
    else:
        t = tok.num_latent_frames(args.frames)
        x = torch.randn(1, tok.latent_channels, t, args.size // f_s, args.size // f_s)
        chunk = dict(chunk_latents=args.chunk // f_t or None)
        run = tok.decode
    base = _rss_mib()
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            y = run(x, **chunk)
            times.append(time.perf_counter() - start)
            del y
    print(
        json.dumps(
            dict(
                time_s=min(times),
                peak_mib=_rss_mib(),
                base_mib=base,
                params=tok.num_parameters(),
                threads=torch.get_num_threads(),
                torch=torch.__version__,
            )
        )
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--chunk-frames", type=int, default=4, help="chunk size in frames")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (the min is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--worker", nargs=2, metavar=("OP", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.op, args.chunk = args.worker[0], int(args.worker[1])
        worker(args)
        return

    cases = [
        ("encode", 0),
        ("encode", args.chunk_frames),
        ("decode", 0),
        ("decode", args.chunk_frames),
    ]
    rows, info = [], {}
    for op, chunk in cases:
        cmd = [sys.executable, __file__, "--worker", op, str(chunk), "--preset", args.preset,
               "--frames", str(args.frames), "--size", str(args.size),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        info = json.loads(done.stdout.strip().splitlines()[-1])
        chunking = f"{chunk} frames" + (f" ({chunk // 4} latent)" if op == "decode" else "")
        rows.append(
            f"| {op} | {chunking if chunk else 'none'} | {info['time_s']:.1f} | "
            f"{info['peak_mib']:.0f} | {info['peak_mib'] - info['base_mib']:.0f} |"
        )
        print(f"{op:6s} chunk={chunk}: {info['time_s']:.1f} s", file=sys.stderr)

    print(
        f"Tokenizer `{args.preset}` ({info['params'] / 1e6:.1f}M parameters), input "
        f"1x3x{args.frames}x{args.size}x{args.size}, fp32, torch {info['torch']}, "
        f"{info['threads']} threads, {_cpu_name()}; min of {args.repeats} run(s).\n"
    )
    print("| op | chunking | time (s) | peak RSS (MiB) | above weights + input (MiB) |")
    print("| --- | --- | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
