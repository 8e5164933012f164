"""Write a bundle whose chosen parts lie a fraction of the way from one bundle's weights to another's.

    python bench/blend_bundles.py START END --t 0.5 [--parts vae] [--out FILE]

START and END are bundles of one config (e.g. the shipped model and a continuation that trained its decoder on
generated latents); every floating tensor of ``--parts`` becomes ``START + t * (END - START)``
(``continuation.blend_states``, what a continuation's ``decoder_blend`` does at its end); the other parts, the
config, the tokenizer and the lineage come from END, with a record of the blend appended to the lineage. Used
to find how far along that line a model keeps its captions while it gains PSNR (docs/training.md, session 21).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from segue.bundle import (
    PARTS,
    materialize_tokenizer,
    read_bundle_lineage,
    read_bundle_metadata,
    read_bundle_weights,
    save_bundle,
)
from segue.models.dit import WanDiT
from segue.models.encoders import ImageEncoder, TextEncoder
from segue.models.vae import WanVAE
from segue.train.continuation import blend_states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("start", type=Path)
    ap.add_argument("end", type=Path)
    ap.add_argument("--t", type=float, required=True, help="0 gives START's parts, 1 END's")
    ap.add_argument("--parts", default="vae", help=f"comma-separated, among {', '.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        sys.exit(f"--parts: {bad or 'none given'}; allowed: {', '.join(PARTS)}")
    config, tok_files = read_bundle_metadata(args.end)
    if read_bundle_metadata(args.start)[0] != config:
        sys.exit(f"{args.start} and {args.end} have different configs; only one model's states can be blended")
    a, b = read_bundle_weights(args.start), read_bundle_weights(args.end)
    try:
        states = {p: blend_states(a[p], b[p], args.t) if p in parts else b[p] for p in PARTS}
    except ValueError as e:
        sys.exit(str(e))
    modules = {
        "dit": WanDiT(config.dit),
        "vae": WanVAE(config.vae),
        "text": TextEncoder(config.text, tokenizer=None).model,
        "image": ImageEncoder(config.image).model,
    }
    for part, module in modules.items():
        module.load_state_dict(states[part])
    lineage = read_bundle_lineage(args.end) + [
        {"blend": {"start": args.start.name, "end": args.end.name, "t": args.t, "parts": parts}}
    ]
    out = args.out or args.end.with_name(f"{args.end.stem}-blend{args.t:g}.safetensors")
    with tempfile.TemporaryDirectory(prefix="segue-tokenizer-") as tok_dir:  # only written into the new bundle
        save_bundle(out, config, modules, materialize_tokenizer(tok_files, Path(tok_dir)), torch.float16, lineage)
    print(out)


if __name__ == "__main__":
    main()
