"""Does the base stage listen to each word of a shapes caption? Its denoising loss on real clips
with the true caption beside the same caption with one attribute swapped. Prints a markdown table.

    python bench/probe_text_sensitivity.py --model default --num 128
    python bench/probe_text_sensitivity.py --model ~/.cache/walt/runs/shapes --split train

The clips are the first N items of a split of the recipe's shapes data (`heldout`: the 40
colour x shape x direction triples a model trained with `data.shapes.holdout: true` never saw,
one object each; `train`: training scenes with one object), rendered at the base stage's
resolution and length and encoded by the model's own tokenizer. For each clip the base stage's
v-prediction loss (walt_cli.diffusion.losses, no self-conditioning, no frame condition) is taken
with the true caption and with `metrics.adherence.swap_attribute` applied to one attribute (its
next vocabulary word), under the same diffusion times and noise; `shuffled` gives every clip
another clip's caption and `no caption` the empty (all-masked) one, as the far ends.
`--cond-frames K` gives the first K clean latent frames (frame prediction, the path of `walt
animate`): where the object starts is then known, and the direction decides where it goes.

Each cell is the gap: the mean of (swapped - true) over clips and draws as a share of the
true-caption loss, with its standard error, at each of `--times` ("random": uniform draws, the
training loss; a fixed t: that noise level alone, where t near 1 is where a sampler lays out
the scene from the caption). A model that ignores a word has a gap of zero there, whatever it
generates. It reads what the training objective learnt; `probe_text_adherence.py` reads what
the sampler makes of it.
`check_latent_tracks.py` gives the scale at t = 1: the gap an ideal prediction from the caption
alone would show for each swapped word, from the cached latents.

The last column says how far each variant moves what the base stage reads: the text encoder's
states, averaged over the caption's tokens, as the mean over clips of |swapped - true| / |true|.
A word the encoder barely tells apart from its swap gives the base little to learn from.

A class-conditioned shapes base (`base.num_classes=40`: labels name the first object's shape x
direction, `data.shapes.class_index`) is read the same way, each caption as its label: the
shape or the direction swapped, another clip's label, and the null class for `no caption`;
there is no text-states column. It is the control that tells an encoder that blurs a word
from a base that has not learnt what the word does.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ scripts, for the probe's split

from probe_text_adherence import shapes_clips  # noqa: E402


def _clips(args, frames: int, height: int, width: int):
    """(videos (N, 3, T, H, W) in [-1, 1], captions) of one-object scenes of the --split."""
    import torch

    if args.split == "heldout":
        ds = shapes_clips(args.recipe, args.num, frames, height, width)
        picked = range(args.num)
    else:
        ds = shapes_clips(args.recipe, args.num * 8, frames, height, width, split=args.split)
        picked = [i for i in range(len(ds)) if " and " not in ds.scene(i).caption][: args.num]
        if len(picked) < args.num:
            raise SystemExit(f"only {len(picked)} one-object clips in the first {len(ds)}")
    return torch.stack([ds[i]["video"] for i in picked]), [ds.scene(i).caption for i in picked]


def _losses(net, schedule, z0, conds, args, step: int | None):
    """(repeats, N): each clip's loss, conditioned on `conds[i]`, under `--repeats` seeded draws
    of the noise (and of the diffusion step, unless `step` fixes it)."""
    import torch

    from walt_cli.diffusion.losses import diffusion_loss

    k = args.cond_frames
    out = torch.empty(args.repeats, z0.shape[0])
    for r in range(args.repeats):
        for i in range(z0.shape[0]):  # one clip per call: the loss is a batch mean
            loss = diffusion_loss(
                net,
                z0[i : i + 1],
                conds[i],
                schedule,
                p_self_cond=0.0,
                p_frame_pred=1.0 if k else 0.0,
                num_cond_frames=(k,) if k else (1,),
                generator=torch.Generator().manual_seed(args.seed + r * 100_003 + i),
                step=None if step is None else torch.tensor([step]),
            )
            out[r, i] = loss.loss.item()
    return out


def _text_conds(pipe, captions: list[str], no_caption: bool):
    """(one Conditioning per caption, the states averaged over each caption's real tokens
    (N, D)); with `no_caption` every token is masked and the states are None."""
    import torch

    from walt_cli.models.transformer import Conditioning

    text, mask = pipe.text_encoder.encode(captions)
    pooled = None
    if no_caption:
        mask = torch.zeros_like(mask, dtype=torch.bool)  # what condition dropout trains
    else:
        m = mask.to(text.dtype)[..., None]
        pooled = (text * m).sum(1) / m.sum(1)
    mask, image = mask.bool(), torch.zeros(1, dtype=torch.bool)
    conds = [
        Conditioning(text=text[i : i + 1], text_mask=mask[i : i + 1], is_image=image)
        for i in range(len(captions))
    ]
    return conds, pooled


def _label_conds(captions: list[str] | None, n: int):
    """One Conditioning per caption with the shapes class label of its first object (shape x
    direction, `data.shapes.class_index`); None: the null label (condition dropout)."""
    import torch

    from walt_cli.data.shapes import class_index
    from walt_cli.metrics.adherence import parse_caption
    from walt_cli.models.transformer import Conditioning

    labels = [Conditioning.NULL_LABEL] * n
    if captions is not None:
        labels = [class_index(a.shape, a.direction) for a in map(parse_caption, captions)]
    image = torch.zeros(1, dtype=torch.bool)
    return [Conditioning(labels=torch.tensor([v]), is_image=image) for v in labels]


def _times(text: str) -> list[float | None]:
    """--times "random,0.5,0.9" -> [None, 0.5, 0.9]."""
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if tok == "random":
            out.append(None)
            continue
        t = float(tok)  # ValueError: main() turns it into a usage error
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{t} is outside [0, 1]")
        out.append(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help='a run dir, an exported bundle or "default"')
    ap.add_argument("--num", type=int, default=128, help="clips")
    ap.add_argument("--split", choices=("heldout", "train"), default="heldout")
    ap.add_argument("--repeats", type=int, default=4, help="draws of time and noise per clip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--times",
        default="random,0.5,0.8,0.95",
        help="diffusion times to take the loss at: 'random' (uniform draws, the training loss) "
        "and/or fixed t in [0, 1]",
    )
    ap.add_argument(
        "--cond-frames",
        type=int,
        default=0,
        help="give the first K clean latent frames (frame prediction, what `walt animate` does); "
        "the loss is then over the others",
    )
    ap.add_argument("--recipe", default="recipes/shapes.yaml", help="whose shapes data to use")
    args = ap.parse_args()
    if args.num < 2 or args.repeats < 1:
        ap.error("--num must be >= 2 and --repeats >= 1")
    try:
        times = _times(args.times)
    except ValueError as err:
        ap.error(f"--times {args.times!r}: {err} (want 'random' or t in [0, 1], comma-separated)")

    import torch

    from walt_cli.errors import WaltError
    from walt_cli.metrics.adherence import ATTRIBUTES, swap_attribute
    from walt_cli.pipelines import Pipeline

    began = time.time()
    # The losses of the fp32 weights on any device (on CUDA, "auto" would load them in bf16).
    pipe = Pipeline.from_bundle(args.model, precision="fp32")
    kind = pipe.conditioning
    if kind == "unconditional":
        raise WaltError(f"{args.model} is not conditioned on captions or labels")
    stage = pipe.stages[0]
    (h, w), frames = stage.resolution, pipe.clip_frames
    videos, captions = _clips(args, frames, h, w)
    # A class-conditioned shapes base reads a label naming the first object's shape and
    # direction only: the colour and the background are not in it, so they are not swapped.
    swaps = ATTRIBUTES if kind == "text" else ("shape", "direction")
    with torch.no_grad():
        z0 = stage.normalize(pipe.encode(videos))
        if not 0 <= args.cond_frames < z0.shape[2]:
            raise WaltError(
                f"--cond-frames must be in 0..{z0.shape[2] - 1}, got {args.cond_frames}"
            )
        variants = {"true caption": captions}
        variants |= {f"{a} swapped": [swap_attribute(c, a) for c in captions] for a in swaps}
        variants["shuffled (another clip's)"] = captions[1:] + captions[:1]
        variants["no caption"] = None
        steps = [None if t is None else round(t * (pipe.schedule.num_steps - 1)) for t in times]
        losses, pooled = {}, {}
        for name, caps in variants.items():
            if kind == "text":
                conds, states = _text_conds(pipe, caps or [""] * len(captions), caps is None)
                if states is not None:
                    pooled[name] = states
            else:
                conds = _label_conds(caps, len(captions))
            losses[name] = [
                _losses(stage.net, pipe.schedule, z0, conds, args, step) for step in steps
            ]
            print(f"{name}: done", file=sys.stderr)
    true = losses["true caption"]
    text = kind == "text"
    noun = "caption" if text else "label"
    heads = ["t random" if t is None else f"t = {t:g}" for t in times]
    heads += ["text states moved"] if text else []
    print(f"| {noun} | " + " | ".join(heads) + " |")
    print("| --- |" + " ---: |" * len(heads))
    cells = [f"{x.mean():.4f}" for x in true] + ([""] if text else [])
    print(f"| loss, true {noun} | " + " | ".join(cells) + " |")
    for name, per_time in list(losses.items())[1:]:
        cells = []
        for loss, ref in zip(per_time, true, strict=True):
            gap = (loss - ref).flatten() / ref.mean()
            cells.append(f"{gap.mean():+.1%} +- {gap.std() / math.sqrt(gap.numel()):.1%}")
        if text and name in pooled:
            ref_states = pooled["true caption"]
            moved = (pooled[name] - ref_states).norm(dim=-1) / ref_states.norm(dim=-1)
            cells.append(f"{moved.mean():.1%}")
        elif text:
            cells.append("masked")
        else:
            name = name.replace("no caption", "no label (null class)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        f"\nCells: mean of (loss - true-{noun} loss) over clips and draws, as a share of the mean "
        f"true-{noun} loss at that time, +- its standard error."
        + (
            " Text states moved: mean over clips of |pooled states - true caption's| / "
            "|true caption's|."
            if text
            else " Each caption is read as the class label of its first object (shape x direction)."
        )
    )
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(
        f"\n({args.num} {args.split} clips x {args.repeats} draws, {frames}x{h}x{w}, "
        f"{args.cond_frames} clean latent frames given, model `{args.model}`; "
        f"{time.time() - began:.0f} s on {machine})"
    )


if __name__ == "__main__":
    main()
