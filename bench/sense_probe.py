"""Can a bundle's model learn a circle's sense? Train it on a few loop groups alone and watch the word's effect.

    python bench/sense_probe.py [BUNDLE] [--groups 1] [--start 2400] [--steps 200] [--lr 3e-4] [--every 25]
                                [--text-dropout P] [--seed 0]

A loop group holds "clockwise", "counterclockwise" and "stays in place" on the same keyframes (training clips
``start`` .. ``start + 3 * groups - 1`` of a loop-only training set). The DiT and the two encoders train on the
groups' two circles (first-last mode, shift 3, AdamW, clipping 1.0), each group's pair with one draw of noise,
sigma and mode. Every ``--every`` steps the first group is measured: the model's prediction of the clip from
pure noise (sigma 1, one fixed noise) for each caption, and the distance between two captions' predictions over
the distance between their true latents (0: the word changes nothing; 1: it moves the prediction as far as the
clips differ). ``--text-dropout`` sets the text encoder's dropout while it trains (default: its config's).

It prints one markdown table row per measurement (stdout); progress goes to stderr. Nothing is saved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from segue.data.synthetic import SyntheticVideos
from segue.loader import load
from segue.train.flow import (
    FLF2VObjective,
    clip_frames,
    conditioning_from_given,
    encode_captions,
    encode_clip_frames,
    set_dropout,
)

CIRCLES = ("circle_cw", "circle_ccw")


def loop_group(data: SyntheticVideos, start: int) -> dict[str, dict]:
    """The items of the chunk at ``start`` by path (circle_cw, circle_ccw, still)."""
    group = {it["path"]: it for it in (data[start + j] for j in range(3))}
    if sorted(group) != ["circle_ccw", "circle_cw", "still"]:
        raise ValueError(f"training clips {start}..{start + 2} are not a loop group: {sorted(group)}")
    return group


@torch.no_grad()
def sense_ratios(pipe, group: dict[str, dict], noise_seed: int = 1) -> tuple[float, float]:
    """(cw vs ccw, cw vs still): one-step prediction distance over true latent distance, first-last mode."""
    names = ["circle_cw", "circle_ccw", "still"]
    video = torch.stack([group[n]["video"] for n in names])  # [3, 3, F, H, W]
    vae, dit = pipe.vae, pipe.dit
    x0 = vae.encode(video)  # [3, z, T, h, w]
    given = torch.zeros(3, video.shape[2], dtype=torch.bool)
    given[:, 0] = given[:, -1] = True
    y = conditioning_from_given(vae.encode, video, given, vae.cfg.temporal_factor, vae.cfg.spatial_factor)
    context = encode_captions(pipe.text_encoder, [group[n]["caption"] for n in names], dit.cfg.text_len)
    frames = torch.cat([clip_frames(v, g, 2) for v, g in zip(video, given)])
    clip = encode_clip_frames(pipe.image_encoder, frames, torch.ones(3, dtype=torch.bool))
    noise = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(noise_seed)).expand_as(x0)
    pred = noise - dit(noise, torch.full((3,), 1000.0), context, clip, y)  # x0 = noise - v at sigma 1
    ratio = [float((pred[0] - pred[k]).norm() / (x0[0] - x0[k]).norm()) for k in (1, 2)]
    return ratio[0], ratio[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, nargs="?", default=None, help="a segue bundle (default: the built-in one)")
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--start", type=int, default=2400, help="first training clip (a multiple of 3)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--text-dropout", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.groups < 1 or args.steps < 0 or args.every < 1 or args.start < 0 or args.start % 3:
        p.error(f"need --groups >= 1, --steps >= 0, --every >= 1 and --start a multiple of 3 >= 0; got "
                f"{args.groups}, {args.steps}, {args.every}, {args.start}")  # fmt: skip

    torch.manual_seed(args.seed)
    pipe = load(args.bundle)
    d = pipe.config.defaults
    side = int(round(np.sqrt(d.max_area)))
    data = SyntheticVideos("train", length=args.start + 3 * args.groups, frames=d.frames, size=(side, side),
                           ambiguous_fraction=1.0, loop_groups=1.0)  # fmt: skip
    groups = [loop_group(data, args.start + 3 * k) for k in range(args.groups)]
    pairs = [g[n] for g in groups for n in CIRCLES]
    video = torch.stack([it["video"] for it in pairs])
    captions = [it["caption"] for it in pairs]
    parts = {"dit": pipe.dit, "text": pipe.text_encoder, "image": pipe.image_encoder}
    params = [q for m in parts.values() for q in m.requires_grad_(True).parameters()]
    if args.text_dropout is not None:
        set_dropout(pipe.text_encoder, args.text_dropout)
    objective = FLF2VObjective(vae=pipe.vae, shift=3.0, modes={"first_last": 1.0})
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    print(f"bundle {args.bundle or 'built-in'}; {args.groups} loop group(s) from training clip {args.start}; "
          f"lr {args.lr:g}, text dropout {'config' if args.text_dropout is None else args.text_dropout}\n")  # fmt: skip
    print("| step | loss | cw vs ccw | cw vs still |")
    print("|---:|---:|---:|---:|")
    t0, loss = time.perf_counter(), float("nan")
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            for m in parts.values():
                m.eval()
            ccw, still = sense_ratios(pipe, groups[0])
            print(f"| {step} | {loss:.4f} | {ccw:.3f} | {still:.3f} |", flush=True)
            print(f"[sense_probe] step {step}/{args.steps}  {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        if step == args.steps:
            break
        for m in parts.values():
            m.train()
        seeds = torch.randint(0, 2**62, (args.groups,)).repeat_interleave(len(CIRCLES))  # one draw per pair
        batch_loss = objective(parts, {"video": video, "caption": captions, "seed": seeds})
        opt.zero_grad()
        batch_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss = batch_loss.item()


if __name__ == "__main__":
    main()
