"""FVD sanity table: does the metric grow with the damage? Prints a markdown table.

    python bench/fvd_sanity.py                         # both protocols, the shared clips
    python bench/fvd_sanity.py --protocols magvit --size 64

Real data: the 16-frame windows of the shared asset clips (assets/videos; clips of at least
64 frames give 4 non-overlapping windows each, alternately assigned to sets A and B), brought to
`--size` x `--size` (short-side resize + centre crop, the generator resolution of the protocols).
Rows:

* A vs B: two disjoint sets of windows of the same footage (the sampling floor at this N);
* A vs degraded copies of A: Gaussian blur (sigma in pixels), additive Gaussian noise (std in
  [0, 1] units), dropped frames (keep 1 frame in k and hold it: 50%, 75%, 87.5% dropped).

Features are computed per protocol with `walt_cli.metrics.fvd.i3d_features`; the distance uses
the protocol's covariance normalisation.
"""

from __future__ import annotations

import argparse
import math
import time


def _windows(size: int, per_clip: int, frames: int):
    """Sets A and B of uint8 (N, 3, T, size, size) windows from the shared clips."""
    import torch

    from walt_cli.assets import assets_dir
    from walt_cli.data.video import probe, read_frames
    from walt_cli.metrics.fvd import match_resolution

    root = assets_dir()
    if root is None:
        raise SystemExit("assets not found: set WALT_ASSETS")
    sets: tuple[list, list] = ([], [])
    names = []
    for path in sorted((root / "videos").iterdir()):
        total = probe(path).num_frames
        if total < per_clip * frames:
            continue
        names.append(path.name)
        stride = total // per_clip
        for k in range(per_clip):
            frames_np, _ = read_frames(path, list(range(k * stride, k * stride + frames)))
            x = torch.from_numpy(frames_np).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W)
            sets[k % 2].append(match_resolution(x, (size, size)))
    return torch.cat(sets[0]), torch.cat(sets[1]), names


def _blur(x, sigma: float):
    import torch
    import torch.nn.functional as F

    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    b, c, f, h, w = x.shape
    y = x.float().transpose(1, 2).reshape(b * f * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    y = y.reshape(b, f, c, h, w).transpose(1, 2)
    return y.round().clamp(0, 255).to(torch.uint8)


def _noise(x, std: float, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    y = x.float() + torch.randn(x.shape, generator=gen) * (std * 255)
    return y.round().clamp(0, 255).to(torch.uint8)


def _drop(x, keep_every: int):
    """Keep frames 0, k, 2k, ... and hold each until the next kept one (a stutter)."""
    idx = [(i // keep_every) * keep_every for i in range(x.shape[2])]
    return x[:, :, idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", default="magvit,stylegan-v")
    parser.add_argument("--size", type=int, default=128, help="generator resolution of the sets")
    parser.add_argument("--per-clip", type=int, default=4, help="windows per clip")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from walt_cli.metrics.frechet import FeatureStats, frechet_distance_from_stats
    from walt_cli.metrics.fvd import get_protocol, i3d_features
    from walt_cli.metrics.i3d import load_i3d

    t0 = time.perf_counter()
    a, b, names = _windows(args.size, args.per_clip, 16)
    net = load_i3d(device=args.device)
    cases = [("A vs B (disjoint windows)", "-", b)]
    for s in (1.0, 2.0, 4.0):
        cases.append(("A vs blurred A", f"sigma {s:g} px", _blur(a, s)))
    for s in (0.05, 0.1, 0.2):
        cases.append(("A vs noisy A", f"std {s:g}", _noise(a, s)))
    for k in (2, 4, 8):
        cases.append(("A vs A with dropped frames", f"{100 * (1 - 1 / k):g}% dropped", _drop(a, k)))

    rows = []
    for name in args.protocols.split(","):
        proto = get_protocol(name.strip())

        def stats(x, proto=proto):
            with torch.inference_mode():
                return FeatureStats.from_features(
                    i3d_features(x, net, proto, batch_size=args.batch).cpu()
                )

        sa = stats(a)
        for label, strength, other in cases:
            fvd = frechet_distance_from_stats(sa, stats(other), ddof=proto.ddof)
            rows.append((proto.name, label, strength, f"{len(a)}/{len(other)}", fvd))
    print(
        f"Sets: {len(a)} + {len(b)} windows of 16x{args.size}x{args.size} from {len(names)} "
        f"clips ({', '.join(names)}); {time.perf_counter() - t0:.0f} s on {args.device}.\n"
    )
    print("| protocol | comparison | strength | N (A/other) | FVD |")
    print("| --- | --- | --- | --- | --- |")
    for proto, label, strength, n, fvd in rows:
        print(f"| {proto} | {label} | {strength} | {n} | {fvd:.1f} |")


if __name__ == "__main__":
    main()
