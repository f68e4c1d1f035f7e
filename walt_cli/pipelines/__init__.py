"""Generation (DESIGN §3): the one path from conditions to pixels, used by `walt sample`,
`walt animate`, `walt eval-fvd --model` and the training previews.

    from walt_cli.pipelines import Pipeline
    pipe = Pipeline.from_bundle("runs/shapes")        # a run dir, an exported bundle, or "default"
    video = pipe.generate(labels=[3], seeds=[0], num_frames=29)   # uint8 (B, T, H, W, 3)
"""

from walt_cli.pipelines.bundle import BundleIndex, export_bundle, read_bundle
from walt_cli.pipelines.cascade import Pipeline, Progress, Stage, valid_frame_counts

__all__ = [
    "BundleIndex",
    "Pipeline",
    "Progress",
    "Stage",
    "export_bundle",
    "read_bundle",
    "valid_frame_counts",
]
