"""Write a bundle from a running continuation's latest checkpoint (EMA weights), to evaluate it mid-run.

    python bench/ckpt_bundle.py RUN --from-bundle BUNDLE [--stage NAME] [--raw] [--vae-from FILE] [--decoder]
                                [--out FILE]

RUN is a ``segue train --continue-from BUNDLE`` folder; the config, the tokenizer and (unless the run trained
its own) the VAE come from BUNDLE, the one the run started from (once a run is installed, the packaged file is
no longer it). The DiT and encoders come from the stage's latest checkpoint. A continuation that trained the
whole VAE (``vae_steps``) gives its finished VAE (``RUN/vae/ema.pt``), and the latent statistics are measured
again exactly as the run measured them (``with_latent_stats``). A run that inserted DiT blocks
(``insert_blocks``) gets the deeper config.

``--raw`` takes the latest checkpoint's raw weights in place of the EMA (also of a finished stage: its last
checkpoint is at its last step), to compare the two after a cooldown. ``--vae-from FILE`` takes the VAE from
another bundle with the same VAE config, e.g. a finished run's ``model.safetensors`` with its new decoder.

``--decoder`` takes the VAE from the decoder phase's latest checkpoint (EMA; ``RUN/vae-decoder``), at the width
the continuation gave it (``decoder_dim``). A continuation without a DiT stage (its steps 0) keeps BUNDLE's DiT
and encoders.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from segue.bundle import read_bundle_metadata, read_bundle_weights, save_bundle
from segue.checkpoint import is_plain_file_name
from segue.models.dit import WanDiT
from segue.models.encoders import ImageEncoder, TextEncoder
from segue.models.vae import WanVAE
from segue.tokenizer import load_tokenizer
from segue.train.continuation import CONTINUATIONS, with_latent_stats
from segue.train.grow import deepened
from segue.train.recipe import load_ema
from segue.train.trainer import latest_checkpoint_path, latest_ema, load_training_checkpoint


def latest_raw(run: Path) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """``(step, {part: state dict})`` of the raw (non-EMA) weights in a stage's latest checkpoint."""
    path = latest_checkpoint_path(run / "ckpt")
    if path is None:
        sys.exit(f"{run}: no checkpoint (ckpt/latest) to take raw weights from")
    ck = load_training_checkpoint(path)
    return ck["step"], ck["model"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--stage", default=None, help="stage folder (default: the continuation's stage)")
    ap.add_argument("--from-bundle", type=Path, required=True, help="the bundle the run continued from")
    ap.add_argument("--raw", action="store_true", help="the latest checkpoint's raw weights, not the EMA")
    ap.add_argument("--vae-from", type=Path, default=None, help="take the VAE from this bundle")
    ap.add_argument("--decoder", action="store_true", help="the VAE from the decoder phase's latest checkpoint")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    record = json.loads((args.run / "continuation.json").read_text())
    stage = args.stage or record["continuation"]["stage"]["name"]
    if not is_plain_file_name(stage):  # a name read from a file never leads out of the run folder
        sys.exit(f"{args.run / 'continuation.json'}: stage name {stage!r} is not a folder name inside {args.run}")
    config, _ = read_bundle_metadata(args.from_bundle)
    bundle_w = read_bundle_weights(args.from_bundle)
    if record["steps"] == 0:  # no DiT stage: the bundle's DiT and encoders
        step = None
        wrapped = {part: {f"model.{k}": v for k, v in bundle_w[part].items()} for part in ("text", "image")}
        ema = {"dit": bundle_w["dit"], **wrapped}  # the encoders' wrappers hold the bundle's modules as .model
    else:
        step, ema = latest_raw(args.run / stage) if args.raw else latest_ema(args.run / stage)
    # a run that inserted DiT blocks (grow.insert_identity_blocks) trained the deeper DiT
    config = replace(config, dit=deepened(config.dit, tuple(record["continuation"].get("insert_blocks", []))))
    vae_state = bundle_w["vae"]
    if record["continuation"]["vae_steps"] > 0:
        if not (args.run / "vae" / "ema.pt").is_file():
            sys.exit(f"{args.run}/vae: the run's VAE phase has not finished (no ema.pt)")
        c = CONTINUATIONS.get(record["continuation"]["name"])
        if c is None or json.loads(json.dumps(asdict(c))) != record["continuation"]:  # JSON: tuples are lists
            sys.exit(f"{args.run}: continuation {record['continuation']['name']!r} is not the registry's any more")
        vae_state = load_ema(args.run / "vae", "vae")
        config = with_latent_stats(c, config, vae_state)
    if args.vae_from is not None:
        vae_config, _ = read_bundle_metadata(args.vae_from)
        if vae_config.vae != config.vae:
            sys.exit(f"{args.vae_from}: its VAE config differs from the run's; the DiT was trained on the run's")
        vae_state = read_bundle_weights(args.vae_from)["vae"]
    if args.decoder:
        width = record["continuation"].get("decoder_dim") or config.vae.decoder_dim
        config = replace(config, vae=replace(config.vae, decoder_dim=width))
        step, vae_ema = latest_ema(args.run / "vae-decoder")
        vae_state, stage = vae_ema["vae"], "vae-decoder"
    tokenizer = load_tokenizer(args.run / "tokenizer")
    parts = {
        "dit": WanDiT(config.dit),
        "text": TextEncoder(config.text, tokenizer),
        "image": ImageEncoder(config.image),
    }
    for part, module in parts.items():
        module.load_state_dict(ema[part])
    vae = WanVAE(config.vae)
    vae.load_state_dict(vae_state)
    modules = {"dit": parts["dit"], "vae": vae, "text": parts["text"].model, "image": parts["image"].model}
    kind = "raw-" if args.raw else ""
    out = args.out or args.run / f"{stage}-{kind}step{step if step is not None else 'final'}.safetensors"
    save_bundle(out, config, modules, args.run / "tokenizer", torch.float16)
    print(out)


if __name__ == "__main__":
    main()
