"""The decoder trained on the latents the model generates, against the true frames of the same clips.

A decoder trained on encoded clips learns ``decode(encode(video)) ~ video``. At generation time it decodes
the DiT's latent instead, which misses the true one in a way the DiT repeats (mid-clip its shapes are a
blur between their likely paths, its last latent frame comes from a keyframe seen through a mask). Trained
on ``(generated latent, true clip)`` pairs, the decoder learns the best clip for the latents it will be
given, on held-out keyframes just as well as on the training ones (the pairs are training clips only).

``generate_latents`` runs a bundle's own pipeline (its sampling defaults, one noise seed per clip, no
decode) on a window of training clips and stores the final latents in parts that a resumed run keeps;
``GeneratedClips`` serves them with the clips, both cropped at one place (latent cells and their pixels).
The encoder is not used, so the latent space the DiT learned stays as it is.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.synthetic import SyntheticVideos, object_mask, render_frames
from ..errors import InputError
from ..io import atomic_torch_save
from .recipe import crop_origin
from .trainer import fmt_seconds

PART = 64  # clips per stored part: an interrupted run loses at most one part's work


def _part_path(out: Path, k: int) -> Path:
    return out / f"part-{k:05d}.pt"


def generate_latents(
    pipe, data: SyntheticVideos, start: int, count: int, out_dir: str | Path, progress: bool = True
) -> Path:
    """Generate clips ``start .. start + count - 1`` of ``data`` from their first and last frames and
    captions with ``pipe`` (a ``segue.Pipeline``; noise seed = the clip's index) and store the latents
    (DiT-normalised, float16 [z, T, h, w] each) in ``out_dir`` parts of ``PART`` clips; finished parts are
    kept when a run resumes; a line per part on stderr with ``progress``. Returns ``out_dir``."""
    if start < 0 or count < 1 or start + count > len(data):
        raise InputError(f"generated clips [{start}, {start + count}) do not fit a dataset of {len(data)} items")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = data.size
    parts = (count + PART - 1) // PART
    t0, done = time.perf_counter(), 0
    for k in range(parts):
        path = _part_path(out, k)
        if path.is_file():
            continue
        latents = []
        for i in range(start + k * PART, start + min(count, (k + 1) * PART)):
            clip = data.clip(i)
            first, last = Image.fromarray(clip.frames[0]), Image.fromarray(clip.frames[-1])
            video = pipe.generate(first, last, clip.caption, frames=data.frames, size=(w, h), seed=i, decode=False)
            latents.append(video.latent.to(torch.float16))
        atomic_torch_save(path, torch.stack(latents))  # [n, z, T, h, w]; a part is whole or absent
        done += 1
        if progress:
            per = (time.perf_counter() - t0) / (done * PART)
            eta = fmt_seconds(per * PART * (parts - k - 1))
            print(f"generated latents {k + 1}/{parts} parts  {per:.2f} s/clip  eta {eta}", file=sys.stderr, flush=True)
    return out


class GeneratedClips(Dataset):
    """Item i: ``{"latent": [z, T, h, w], "video": [3, F, H, W]}``, the generated latent of clip
    ``start + i % count`` and its true frames, cropped to ``crop`` latent cells (and their pixels) at a place
    drawn from (seed, i); ``crop`` None keeps the whole frame. ``repeat`` > 1 serves every clip that many
    times (at other crops). ``backdrop``: also ``"backdrop"`` [3, F, H, W], the clip's scenery rendered
    without its shapes, and ``"objects"`` bool [F, H, W], the pixels its shapes change (``object_mask``)."""

    def __init__(
        self, data: SyntheticVideos, start: int, count: int, latents_dir: str | Path, spatial: int,
        crop: tuple[int, int] | None = None, seed: int = 0, repeat: int = 1, backdrop: bool = False,
    ) -> None:  # fmt: skip
        parts = sorted(Path(latents_dir).glob("part-*.pt"))
        if not parts:
            raise InputError(f"{latents_dir}: no generated latents (part-*.pt)")
        self.latents = torch.cat([torch.load(p, weights_only=True) for p in parts])  # [N, z, T, h, w]
        if len(self.latents) != count:
            raise InputError(f"{latents_dir}: {len(self.latents)} generated latents, expected {count}")
        lh, lw = self.latents.shape[-2:]
        if crop is not None and not (0 < crop[0] <= lh and 0 < crop[1] <= lw):
            raise InputError(f"latent crop {crop} does not fit latents of {(lh, lw)}")
        if repeat < 1:
            raise InputError(f"repeat must be >= 1, got {repeat}")
        self.data, self.start, self.spatial, self.crop, self.seed = data, start, spatial, crop, seed
        self.repeat, self.backdrop = repeat, backdrop

    def __len__(self) -> int:
        return len(self.latents) * self.repeat

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        clip = index % len(self.latents)
        latent = self.latents[clip].float()  # [z, T, h, w]
        item = {"latent": latent, "video": self.data[self.start + clip]["video"]}  # video [3, F, H, W]
        if self.backdrop:
            scene = self.data.scene(self.start + clip)
            scenery = render_frames(scene, with_objects=False)  # [F, H, W, 3]
            item["backdrop"] = torch.from_numpy(scenery).permute(3, 0, 1, 2) / 127.5 - 1.0  # [3, F, H, W]
            item["objects"] = torch.from_numpy(object_mask(scene, scenery))  # [F, H, W]
        if self.crop is None:
            return item
        room = (latent.shape[2] - self.crop[0] + 1, latent.shape[3] - self.crop[1] + 1)
        top, left = crop_origin(self.seed, index, room)  # the place Crops would draw, in latent cells
        s, (ch, cw) = self.spatial, self.crop
        rows, cols = slice(s * top, s * (top + ch)), slice(s * left, s * (left + cw))
        out = {"latent": latent[:, :, top : top + ch, left : left + cw]}
        for k, v in item.items():
            if k != "latent":
                out[k] = v[..., rows, cols]  # the pixels of those cells
        return out
