"""The whole VAE of a bundle trained on broad clips (``segue.data.broad``) and the synthetic clips, with the
synthetic clips' latents anchored to the bundle's encoder (``segue.train.anchored_vae``): the run measured in
docs/broad-data.md. Writes RUN/model.safetensors: the bundle with this VAE (its DiT, encoders and tokenizer
unchanged) and the size and frame count it was trained for recorded in its config. Resumes from RUN.

    python bench/broad_vae.py MODEL.safetensors --out RUN --steps 174 --lr 2e-4 --warmup 17 --stop-at 100
    python bench/broad_vae.py MODEL.safetensors --out RUN2 --steps 280 --lr 5e-4 --warmup 20 \\
        --init RUN/ckpt/step-00000100.pt

``--init``: start from the raw VAE weights of another run's checkpoint (fresh optimiser); the anchor is still
the bundle's encoder. Data: item i is broad clip i (training photos only) or synthetic training clip
``--synthetic-start`` + i, by a fixed draw with ``--share`` for broad, cropped to ``--crop`` pixels.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from segue.bundle import (
    materialize_tokenizer,
    read_bundle_lineage,
    read_bundle_metadata,
    read_bundle_weights,
    save_bundle,
)
from segue.data.broad import BroadVideos, Mixed
from segue.data.synthetic import SyntheticVideos
from segue.models.dit import WanDiT
from segue.models.encoders import ImageEncoder, TextEncoder
from segue.models.vae import WanVAE
from segue.tokenizer import load_tokenizer
from segue.train.anchored_vae import AnchoredVAEObjective
from segue.train.checkpoints import latest_ema
from segue.train.phases import crop_origin
from segue.train.trainer import TrainConfig, Trainer


class Offset(torch.utils.data.Dataset):
    def __init__(self, data: torch.utils.data.Dataset, start: int, length: int) -> None:
        self.data, self.start, self.length = data, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.data[self.start + i]


class Crops(torch.utils.data.Dataset):
    """Item i: a ``size`` crop of the video of ``data[i]`` at a place that is a function of (seed, i)."""

    def __init__(self, data: torch.utils.data.Dataset, size: int, seed: int) -> None:
        self.data, self.size, self.seed = data, size, seed

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        item = self.data[i]
        v = item["video"]  # [3, F, H, W]
        top, left = crop_origin(self.seed, i, (v.shape[2] - self.size + 1, v.shape[3] - self.size + 1))
        return {"video": v[:, :, top : top + self.size, left : left + self.size], "anchor": item["anchor"]}


def training_data(args: argparse.Namespace) -> torch.utils.data.Dataset:
    size = (args.size, args.size)
    synthetic = SyntheticVideos("train", length=args.synthetic_start + args.clips, frames=args.frames, size=size,
                                ambiguous_fraction=0.5, loops="inward")  # fmt: skip
    broad = BroadVideos("train", length=args.clips, frames=args.frames, size=size)
    mixed = Mixed(Offset(synthetic, args.synthetic_start, args.clips), broad, share_b=args.share, seed=args.mix_seed)
    return Crops(mixed, args.crop, seed=args.crop_seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this step (the schedule keeps --steps)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--init", type=Path, default=None, help="a checkpoint whose raw VAE weights start the run")
    ap.add_argument("--anchor-weight", type=float, default=1.0)
    ap.add_argument("--endpoint-weight", type=float, default=2.0)
    ap.add_argument("--share", type=float, default=0.75, help="share of broad clips (the rest synthetic, anchored)")
    ap.add_argument("--synthetic-start", type=int, default=90_000)
    ap.add_argument("--clips", type=int, default=60_000)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--mix-seed", type=int, default=11)
    ap.add_argument("--crop-seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    config, tok_files = read_bundle_metadata(args.bundle)
    weights = read_bundle_weights(args.bundle)
    vae = WanVAE(config.vae)
    init = weights["vae"]
    if args.init is not None:
        init = torch.load(args.init, map_location="cpu", weights_only=False)["model"]["vae"]  # a run of ours
    vae.load_state_dict(init)
    anchor = WanVAE(config.vae)
    anchor.load_state_dict(weights["vae"])
    objective = AnchoredVAEObjective(anchor, args.anchor_weight, args.endpoint_weight)
    cooldown = max(1, args.steps // 4)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=args.warmup, schedule="wsd",
                     cooldown=cooldown, ema_decay=0.99, seed=args.crop_seed, out_dir=str(args.out),
                     ckpt_every=100)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
    Trainer({"vae": vae}, objective, training_data(args), tc).run(stop_at=args.stop_at)
    step, ema = latest_ema(args.out)
    vae.load_state_dict(ema["vae"])
    tok_dir = args.out / "tokenizer"
    materialize_tokenizer(tok_files, tok_dir)
    dit, text = WanDiT(config.dit), TextEncoder(config.text, load_tokenizer(tok_dir)).model
    image = ImageEncoder(config.image).model
    for module, part in ((dit, "dit"), (text, "text"), (image, "image")):
        module.load_state_dict(weights[part])
    trained = {"trained_frames": args.frames, "trained_size": (args.size, args.size)}  # what its clips were
    config = replace(config, defaults=replace(config.defaults, **trained))
    record = {"run": "broad-vae", "step": step, "args": {k: str(v) for k, v in vars(args).items()}}
    lineage = [*read_bundle_lineage(args.bundle), record]
    modules = {"dit": dit, "vae": vae, "text": text, "image": image}
    path = save_bundle(args.out / "model.safetensors", config, modules, tok_dir, torch.float16, lineage)
    print(f"{path} (VAE at step {step or tc.steps}, {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
