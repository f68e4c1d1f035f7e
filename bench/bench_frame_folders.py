"""Reading a folder of PNG frames (what `walt eval-fvd --model` writes its samples as): one ffmpeg
process for the folder (`walt_cli.data.video.read_images`) against one per file (`read_image`).

    python bench/bench_frame_folders.py [--frames 17] [--size 128] [--reps 5]

Prints the median of `--reps` interleaved repetitions of each and their ratio; both must
return the same pixels (checked).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import numpy as np

    from walt_cli.data.shapes import ShapesDataset
    from walt_cli.data.video import read_image, read_images, tensor_to_frames
    from walt_cli.pipelines.evaluation import write_frame_folder

    ds = ShapesDataset(num_items=1, num_frames=args.frames, height=args.size, width=args.size)
    clip = tensor_to_frames(ds[0]["video"])
    with tempfile.TemporaryDirectory() as tmp:
        paths = sorted(write_frame_folder(Path(tmp) / "clip", clip).glob("*.png"))
        one, per = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            a = read_images(paths)
            one.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = np.stack([read_image(p) for p in paths])
            per.append(time.perf_counter() - t)
            if not (np.array_equal(a, b) and np.array_equal(a, clip)):
                raise SystemExit("the two readers disagree")
    m1, m2 = statistics.median(one), statistics.median(per)
    print(
        f"| reader | {args.frames} PNG frames {args.size}x{args.size}, s (median of {args.reps}) |"
    )
    print("| --- | ---: |")
    print(f"| one ffmpeg process (read_images) | {m1:.3f} |")
    print(f"| one process per file (read_image) | {m2:.3f} |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nratio {m2 / m1:.1f}x ({platform.machine()}, load average {load})")


if __name__ == "__main__":
    main()
