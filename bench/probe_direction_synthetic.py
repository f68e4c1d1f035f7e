"""Can a base stage learn a direction of motion from its condition at all? A synthetic control.

    python bench/probe_direction_synthetic.py --steps 3000
    python bench/probe_direction_synthetic.py --steps 800 base.p_self_cond=0 base.lr=3e-4
    python bench/probe_direction_synthetic.py --steps 600 --net full_attention=true \
        --net relative_position_bias=false --net qk_norm=false --net adaln_lora_rank=0

The shapes base has not learnt the direction word (README, "Quality"), and neither has a control
conditioned on class labels. This script takes the data out of the question: it trains the
recipe's base network (its preset, depth, width, heads, windows, AdaLN, optimiser settings and
loss) on synthetic latents where the direction is the only thing to learn from the condition.
Each clip is a constant background vector plus one Gaussian blob (sigma `--sigma` latent cells)
carrying an object vector, starting anywhere its path fits and moving `--speed` latent cells
per latent frame in one of eight directions, on the recipe's latent grid. The class label is the
direction. Frame 0 is always given (frame prediction, the path of `walt animate`), so at t = 1
the clip is fully determined by frame 0 and the label.

Every `--eval-every` steps it prints the t = 1 loss on 64 fixed clips (frame 0 given): with the
true label, a wrong label and the null label, each as the share above the true label's loss,
once without self-conditioning (the sampler's first step) and once with the estimate of that
first pass fed back (its later steps). Beside them, the references (same loss, frames 1..):
- `background only`: every later frame is frame 0's background (the object dropped);
- `blind ideal`: the best prediction that ignores the label, the average over the directions
  whose path fits from frame 0's start, weighted by how likely each one put the object there;
- the ideal with the label is 0.
A model that reads the label loses with a wrong one (a positive gap); a loss below the blind
ideal can only come from reading it.

Training runs on the CPU (44 min for 3000 steps of the shapes recipe's base on 2 cores);
recipe overrides (`base.KEY=VALUE`) change the network or the optimiser, and `--net KEY=VALUE`
sets a `WALT` constructor keyword the recipe does not expose (the last example above is a
DiT-like control: full attention, no relative bias, no qk-norm, a full AdaLN per layer). There
is no EMA: the probe reads the weights being trained.
"""

from __future__ import annotations

import argparse
import platform
import time

from walt_cli.data.shapes_vocab import DIRECTIONS as _NAMED

# Unit steps (x right, y down); label k is the k-th direction word of the shapes vocabulary.
DIRECTIONS = tuple(_NAMED.values())
EVAL_CLIPS = 64


def _bounds(direction: int, size: tuple[int, int], travel: float) -> tuple[float, ...]:
    """(lo_x, hi_x, lo_y, hi_y): the starts (cell units) from which the whole path fits, one cell
    from the edge."""
    ux, uy = DIRECTIONS[direction]
    h, w = size
    return (
        1 - min(ux, 0) * travel,
        w - 1 - max(ux, 0) * travel,
        1 - min(uy, 0) * travel,
        h - 1 - max(uy, 0) * travel,
    )


def render(bg, obj, start, direction: int, grid, *, speed: float, sigma: float):
    """One clip (c, T, h, w): background vector `bg` (c,) plus a blob of `obj` (c,) whose centre
    starts at `start` (x, y) and moves `speed` cells per latent frame along `direction`."""
    import torch

    frames, h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    ux, uy = DIRECTIONS[direction]
    k = torch.arange(frames, dtype=torch.float32)[:, None, None]
    cx, cy = start[0] + ux * speed * k, start[1] + uy * speed * k  # (T, 1, 1)
    blob = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))  # (T, h, w)
    return bg[:, None, None, None] + obj[:, None, None, None] * blob[None]


def make_clips(n: int, grid, channels: int, generator, *, speed: float, sigma: float):
    """n clips (n, c, T, h, w), their labels (n,) and (bg, obj, start) per clip."""
    import torch

    travel = speed * (grid[0] - 1)
    labels = torch.randint(len(DIRECTIONS), (n,), generator=generator)
    bg = torch.randn(n, channels, generator=generator) * 0.5
    obj = torch.randn(n, channels, generator=generator) * 1.5
    clips, starts = [], []
    for i in range(n):
        lo_x, hi_x, lo_y, hi_y = _bounds(int(labels[i]), grid[1:], travel)
        u = torch.rand(2, generator=generator)
        start = (lo_x + (hi_x - lo_x) * float(u[0]), lo_y + (hi_y - lo_y) * float(u[1]))
        starts.append(start)
        clips.append(render(bg[i], obj[i], start, int(labels[i]), grid, speed=speed, sigma=sigma))
    return torch.stack(clips), labels, (bg, obj, starts)


def blind_ideal(parts, grid, *, speed: float, sigma: float):
    """(n, c, T, h, w): for each clip the mean over directions of its clip rendered that way,
    weighted by p(start | direction) (uniform on that direction's start box, 0 outside)."""
    import torch

    bg, obj, starts = parts
    travel = speed * (grid[0] - 1)
    out = []
    for i, (x, y) in enumerate(starts):
        weights, clips = [], []
        for d in range(len(DIRECTIONS)):
            lo_x, hi_x, lo_y, hi_y = _bounds(d, grid[1:], travel)
            if lo_x <= x <= hi_x and lo_y <= y <= hi_y:
                weights.append(1.0 / max((hi_x - lo_x) * (hi_y - lo_y), 1e-9))
                clips.append(render(bg[i], obj[i], (x, y), d, grid, speed=speed, sigma=sigma))
        w = torch.tensor(weights) / sum(weights)
        out.append((torch.stack(clips) * w[:, None, None, None, None]).sum(0))
    return torch.stack(out)


def later_frames_mse(pred, clips) -> float:
    """The t = 1 loss of an x0 prediction with frame 0 given (v = -x0 there): frames 1.."""
    return float(((pred[:, :, 1:] - clips[:, :, 1:]) ** 2).mean())


def parse_net_overrides(items: list[str]) -> dict:
    """`--net KEY=VALUE` items as WALT constructor keywords, each value read as YAML (true,
    0, [8, 8]); a key the constructor does not take raises ValueError."""
    import inspect

    import yaml

    from walt_cli.models.transformer import WALT

    allowed = set(inspect.signature(WALT.__init__).parameters) - {"self"}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise ValueError(
                f"--net {item!r}: expected KEY=VALUE with KEY one of {sorted(allowed)}"
            )
        out[key] = yaml.safe_load(value)
    return out


def _network(recipe, grid, channels: int, net_overrides: dict | None = None):
    from walt_cli.models.transformer import WALT
    from walt_cli.systems.common import build_network

    section = recipe.base
    section.num_classes, section.text_dim = len(DIRECTIONS), None
    if not net_overrides:
        return build_network(section, grid, channels)
    # The recipe's network with some constructor keywords changed, drawn from the same random
    # state as the recipe's own would have been.
    import torch

    with torch.random.fork_rng():
        config = build_network(section, grid, channels).config
    inits = dict(bias_init=section.bias_init, pos_init=section.pos_init)
    net = WALT(**{**inits, **config, **net_overrides})
    net.gradient_checkpointing = section.gradient_checkpointing
    return net


def _probe(net, schedule, clips, labels) -> dict[str, float]:
    """t = 1 losses, frame 0 given: {(variant, self_cond): loss}."""
    import torch

    from walt_cli.diffusion.losses import diffusion_loss
    from walt_cli.models.transformer import Conditioning

    n = clips.shape[0]
    wrong = (
        labels + 1 + torch.randint(7, labels.shape, generator=torch.Generator().manual_seed(5))
    ) % len(DIRECTIONS)
    variants = {"true": labels, "wrong": wrong, "null": torch.full_like(labels, -1)}
    out = {}
    net.eval()
    with torch.no_grad():
        for name, lab in variants.items():
            for p_self_cond in (0.0, 1.0):
                loss = diffusion_loss(
                    net,
                    clips,
                    Conditioning(labels=lab, is_image=torch.zeros(n, dtype=torch.bool)),
                    schedule,
                    p_self_cond=p_self_cond,
                    p_frame_pred=1.0,
                    num_cond_frames=(1,),
                    generator=torch.Generator().manual_seed(7),
                    step=torch.full((n,), schedule.num_steps - 1),
                )
                out[name, p_self_cond] = loss.loss.item()
    net.train()
    return out


def _row(step: int, secs: float, train: float, r: dict) -> str:
    """One table row: the true label's t = 1 loss and the others' gaps, without and with
    self-conditioning."""
    cells = [str(step), f"{secs:.0f}", f"{train:.4f}"]
    for sc in (0.0, 1.0):
        cells.append(f"{r['true', sc]:.4f}")
        cells += [f"{100 * (r[name, sc] / r['true', sc] - 1):+.1f}%" for name in ("wrong", "null")]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. base.lr=3e-4")
    parser.add_argument("--recipe", default="recipes/shapes.yaml")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--speed", type=float, default=1.0, help="latent cells per latent frame")
    parser.add_argument("--sigma", type=float, default=0.7, help="blob radius, latent cells")
    parser.add_argument("--p-frame-pred", type=float, default=1.0)
    parser.add_argument("--grid", default="5,8,8", help="latent T,h,w (the shapes base's)")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a WALT constructor keyword over the recipe's network, e.g. full_attention=true",
    )
    args = parser.parse_args(argv)
    try:
        net_overrides = parse_net_overrides(args.net)
    except ValueError as err:
        parser.error(str(err))

    import torch

    from walt_cli.config import load_recipe
    from walt_cli.diffusion.losses import diffusion_loss
    from walt_cli.diffusion.schedules import make_schedule
    from walt_cli.models.transformer import Conditioning
    from walt_cli.systems.base import BaseSystem
    from walt_cli.systems.common import DiffusionSystem, section_kwargs

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    grid = tuple(int(v) for v in args.grid.split(","))
    if args.speed * (grid[0] - 1) > min(grid[1:]) - 2:
        parser.error(f"--speed {args.speed}: a {grid[0]}-frame path leaves the {args.grid} grid")
    recipe = load_recipe(args.recipe, [*args.overrides, f"base.max_steps={args.steps}"])
    b = recipe.base
    net = _network(recipe, grid, args.channels, net_overrides)
    schedule = make_schedule()
    # The training system's own optimiser and learning-rate schedule for this section (the
    # latents are already normalised: mean 0, std 1).
    system = BaseSystem(
        net,
        stage_dir=".",
        latent_mean=[0.0] * args.channels,
        latent_std=[1.0] * args.channels,
        tokenizer_hash="synthetic",
        **{**section_kwargs(b, DiffusionSystem), "ema": False},
    )
    (opt,), (lr_schedule,) = system.configure_optimizers()
    draw = dict(speed=args.speed, sigma=args.sigma)

    clips, labels, parts = make_clips(
        EVAL_CLIPS, grid, args.channels, torch.Generator().manual_seed(123), **draw
    )
    background = parts[0][:, :, None, None, None].expand_as(clips)  # each clip's bg vector
    nets = [f"--net {item}" for item in args.net]
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads; recipe {' '.join([args.recipe, *args.overrides, *nets])}; "
        f"{net.num_parameters} parameters; "
        f"grid {grid}, speed {args.speed}, sigma {args.sigma}, batch {b.batch_size}"
    )
    print(
        f"# references at t = 1, frame 0 given: zeros {later_frames_mse(0 * clips, clips):.4f}, "
        f"background only {later_frames_mse(background, clips):.4f}, blind ideal "
        f"{later_frames_mse(blind_ideal(parts, grid, **draw), clips):.4f}, ideal with the label 0"
    )
    print("| step | s | train loss | t=1 true | wrong | null | self-cond: true | wrong | null |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    g = torch.Generator().manual_seed(args.seed + 1)
    start, running = time.perf_counter(), []
    for step in range(args.steps):
        z, lab, _ = make_clips(b.batch_size, grid, args.channels, g, **draw)
        out = diffusion_loss(
            net,
            z,
            Conditioning(labels=lab, is_image=torch.zeros(len(lab), dtype=torch.bool)),
            schedule,
            p_self_cond=b.p_self_cond,
            p_frame_pred=args.p_frame_pred,
            num_cond_frames=(1,),
            p_cond_drop=b.p_cond_drop,
            generator=g,
            time_shift=b.time_shift,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if b.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), b.grad_clip)
        opt.step()
        lr_schedule.step()
        running.append(out.loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            r = _probe(net, schedule, clips, labels)
            secs, train = time.perf_counter() - start, sum(running) / len(running)
            print(_row(step + 1, secs, train, r), flush=True)
            running = []


if __name__ == "__main__":
    main()
