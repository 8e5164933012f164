"""Write a bundle from a running continuation's latest checkpoint (EMA weights), to evaluate it mid-run.

    python bench/ckpt_bundle.py RUN --from-bundle BUNDLE [--stage NAME] [--out FILE]

RUN is a ``segue train --continue-from BUNDLE`` folder; the VAE and the config come from BUNDLE (the one
the run started from: once a run is installed, the packaged file is no longer it), the DiT and encoders
from the stage's latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from segue.bundle import read_bundle_metadata, read_bundle_weights, save_bundle
from segue.models.dit import WanDiT
from segue.models.encoders import ImageEncoder, TextEncoder
from segue.models.vae import WanVAE
from segue.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--stage", default=None, help="stage folder (default: the continuation's stage)")
    ap.add_argument("--from-bundle", type=Path, required=True, help="the bundle the run continued from")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    record = json.loads((args.run / "continuation.json").read_text())
    stage = args.stage or record["continuation"]["stage"]["name"]
    ckpt_dir = args.run / stage / "ckpt"
    ckpt = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    config, _ = read_bundle_metadata(args.from_bundle)
    weights = read_bundle_weights(args.from_bundle)
    tokenizer = load_tokenizer(args.run / "tokenizer")
    parts = {
        "dit": WanDiT(config.dit),
        "text": TextEncoder(config.text, tokenizer),
        "image": ImageEncoder(config.image),
    }
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for part, module in parts.items():
        sd = dict(state["model"][part])
        sd.update({n.split(".", 1)[1]: t for n, t in state["ema"].items() if n.startswith(part + ".")})
        module.load_state_dict(sd)
    vae = WanVAE(config.vae)
    vae.load_state_dict(weights["vae"])
    modules = {"dit": parts["dit"], "vae": vae, "text": parts["text"].model, "image": parts["image"].model}
    out = args.out or args.run / f"{stage}-step{state['step']}.safetensors"
    save_bundle(out, config, modules, args.run / "tokenizer", torch.float16)
    print(out)


if __name__ == "__main__":
    main()
