"""The phases every chain stage is made of, as small functions: run folders and their markers, the VAE
phase (the whole VAE, or its decoder on the frozen encoder), a DiT stage's trainer config, the latent
statistics. ``scratch`` and ``continuation`` put them together.

A phase trains into its own run folder and resumes from its checkpoints; a finished phase leaves a ``done``
marker and is skipped.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..config import VAEConfig
from ..data.broad import BroadVideos, Mixed
from ..data.synthetic import SyntheticVideos
from ..io import atomic_write_text
from ..models.vae import WanVAE
from .anchored_vae import AnchoredVAEObjective
from .recipe import Stage, VAEClips
from .trainer import TrainConfig, Trainer
from .vae_loss import DecoderObjective, VAEObjective, freeze_encoder


def is_done(path: Path) -> bool:
    """Whether a run folder's phase finished (it has a ``done`` marker); a resumed run skips it."""
    return (path / "done").is_file()


def mark_done(path: Path, info: dict) -> None:
    """Mark a run folder's phase finished, recording ``info`` (its step count, its clips) in the marker."""
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "done", json.dumps(info, indent=2))


def load_ema(run: Path, part: str) -> dict[str, torch.Tensor]:
    """The EMA weights of component ``part`` from a finished run folder."""
    return torch.load(run / "ema.pt", map_location="cpu", weights_only=True)[part]


def scaled(n: int, scale: float) -> int:
    """A count ``n`` times ``scale``, at least 1 (0 stays 0: a phase that does not run)."""
    return max(1, round(n * scale)) if n else 0


def stage_train_config(stage: Stage, steps: int, seed: int, out_dir: Path) -> TrainConfig:
    """The trainer's config for a DiT stage run for ``steps`` (its own count, or scaled): EMA 0.999 with
    warmup; the cooldown scales with the steps and stays inside the run after the warmup."""
    schedule, cooldown = "constant", 0
    if stage.cooldown > 0 and steps > stage.warmup:
        schedule = "wsd"
        cooldown = min(max(1, round(stage.cooldown * steps / stage.steps)), steps - stage.warmup)
    return TrainConfig(steps=steps, batch_size=stage.batch_size, lr=stage.lr, warmup=stage.warmup,
                       schedule=schedule, cooldown=cooldown, min_lr_ratio=stage.min_lr_ratio, ema_decay=0.999,
                       ema_warmup=True, seed=seed, out_dir=str(out_dir), ckpt_every=250)  # fmt: skip


def crop_origin(seed: int, index: int, room: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of item ``index``'s crop, one of ``room`` (rows, columns) places, a function of (seed, index)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    top = int(torch.randint(room[0], (1,), generator=g))
    return top, int(torch.randint(room[1], (1,), generator=g))


class Crops(torch.utils.data.Dataset):
    """Item i: a crop of ``data[i]['video']`` at a position that is a function of (seed, i) (resumes exactly)."""

    def __init__(self, data: torch.utils.data.Dataset, size: tuple[int, int], seed: int = 0) -> None:
        h, w = data.size  # type: ignore[attr-defined]
        if not (0 < size[0] <= h and 0 < size[1] <= w):
            raise ValueError(f"crop {size} does not fit clips of {(h, w)}")
        self.data, self.size, self.seed = data, tuple(size), seed

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        item = self.data[index]
        video = item["video"]  # [3, F, H, W]
        room = (video.shape[2] - self.size[0] + 1, video.shape[3] - self.size[1] + 1)
        top, left = crop_origin(self.seed, index, room)
        crop = {"video": video[:, :, top : top + self.size[0], left : left + self.size[1]]}
        return crop if "anchor" not in item else {**crop, "anchor": item["anchor"]}  # ``broad.Mixed``'s flag


class WithStills(torch.utils.data.Dataset):
    """Item i: ``data[i]`` and ``stills`` [n, 3, 1, h, w]: ``n`` single frames, a share ``flat`` of them flat
    fields of uniformly random colours, the others ``size`` crops of frames of one broad clip (``broad``,
    rendered once per item), all drawn from (seed, i): a resumed run sees the same ones. A share ``held`` of
    the items (drawn apart) have their clip replaced by their first still held for the clip's frames, not
    anchored: a last keyframe at the end of a still clip is decoded through the causal chunk path, which the
    moving clips alone leave behind (docs/broad-data.md)."""

    def __init__(self, data: torch.utils.data.Dataset, broad: BroadVideos, n: int, flat: float,
                 size: tuple[int, int], seed: int = 0, held: float = 0.0) -> None:  # fmt: skip
        h, w = broad.size
        if n < 1 or not 0.0 <= flat <= 1.0 or not 0.0 <= held <= 1.0 or not (0 < size[0] <= h and 0 < size[1] <= w):
            raise ValueError(f"need n >= 1, flat and held in [0, 1] and crops {size} inside frames of {(h, w)}")
        self.data, self.broad, self.n, self.flat, self.size, self.seed = data, broad, n, flat, tuple(size), seed
        self.held = held

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index, 11])
        flat = rng.random(self.n) < self.flat  # [n]
        colours = rng.uniform(-1.0, 1.0, (self.n, 3))  # [n, 3]
        ch, cw = self.size
        stills = torch.from_numpy(colours).float()[:, :, None, None, None].expand(-1, -1, 1, ch, cw).clone()
        if not flat.all():
            video = self.broad[int(rng.integers(len(self.broad)))]["video"]  # [3, F, H, W]
            for j in np.flatnonzero(~flat):
                f = int(rng.integers(video.shape[1]))
                top, left = (int(rng.integers(video.shape[k] - c + 1)) for k, c in ((2, ch), (3, cw)))
                stills[j] = video[:, f : f + 1, top : top + ch, left : left + cw]
        item = {**self.data[index], "stills": stills}  # stills: [n, 3, 1, ch, cw]
        if self.held > 0 and np.random.default_rng([self.seed, index, 12]).random() < self.held:
            item["video"] = stills[0].expand(-1, item["video"].shape[1], -1, -1).clone()  # [3, F, ch, cw]
            if "anchor" in item:
                item["anchor"] = False
        return item


def latent_stats(vae: WanVAE, data: torch.utils.data.Dataset, batches: int, batch_size: int) -> tuple[list, list]:
    """Per-channel mean and std of the VAE's raw latent mean over training clips (the normalisation)."""
    zs = []
    with torch.no_grad():
        for b in range(batches):
            video = torch.stack([data[b * batch_size + i]["video"] for i in range(batch_size)])
            zs.append(vae.encode(video.to(vae.conv1.weight.device), normalize=False).float().cpu())
    z = torch.cat(zs).transpose(0, 1).reshape(vae.cfg.z_dim, -1)  # [z, N]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


def measured_vae_config(
    cfg: VAEConfig,
    state: dict[str, torch.Tensor],
    data: torch.utils.data.Dataset,
    batches: int,
    device: str | torch.device,
) -> VAEConfig:
    """``cfg`` with the latent statistics (``latent_stats``, batches of 4) of the VAE ``state`` measured on ``data``."""
    vae = WanVAE(cfg)
    vae.load_state_dict(state)
    mean, std = latent_stats(vae.to(device).eval(), data, batches, 4)
    return replace(cfg, latent_mean=tuple(mean), latent_std=tuple(std))


def vae_data(clips: VAEClips, seed: int) -> torch.utils.data.Dataset:
    """The VAE's training clips: renders of ``clips``' frames and size, a share ``clips.broad`` of them broad
    clips (``data.broad``, training photos; the rest synthetic, flagged ``anchor``), cropped at positions
    drawn from ``seed``; each with ``clips.stills`` single frames (``WithStills``) when it asks for them, a share
    ``clips.still_clips`` of the clips replaced by their first one held still."""
    data: torch.utils.data.Dataset = SyntheticVideos("train", length=clips.data_length, frames=clips.frames,
                                                     size=clips.size, loops=clips.loops)  # fmt: skip
    broad = BroadVideos("train", length=clips.data_length, frames=clips.frames, size=clips.size,
                        recolour=clips.recolour, photos=clips.photos)  # fmt: skip
    if clips.broad > 0:
        data = Mixed(data, broad, share_b=clips.broad, seed=seed)
    data = data if clips.crop is None else Crops(data, clips.crop, seed=seed)
    if clips.stills:
        data = WithStills(data, broad, clips.stills, clips.flat_stills, clips.crop or clips.size, seed,
                          clips.still_clips)  # fmt: skip
    return data


def train_vae_run(
    clips: VAEClips,
    cfg: VAEConfig,
    state: dict[str, torch.Tensor],
    run: Path,
    *,
    steps: int,
    lr: float,
    seed: int,
    decoder_only: bool,
    device: str | torch.device = "cpu",
    endpoint_weight: float = 1.0,
    cooldown: int = 0,
    data: torch.utils.data.Dataset | None = None,
    keep_shapes: bool = False,
    anchor_weight: float = 0.0,
    workers: int = 0,
) -> Path:
    """Train the VAE ``state`` further into ``run`` (resumes; skipped when done) on ``clips`` drawn with
    ``seed``: the whole VAE, or (``decoder_only``) its decoder on the frozen encoder, the first and last
    frames' error counted ``endpoint_weight`` times (``vae_loss.endpoint_weighted``); ``cooldown`` > 0: the lr falls
    linearly to 0 over the last ``cooldown`` steps (else it stays constant after the warmup). ``data``
    replaces the clips (e.g. ``generated.GeneratedClips`` for the decoder). ``keep_shapes`` (the decoder on
    generated latents with their backdrops): shapes are kept as the decoder renders them at the start
    (``DecoderObjective.anchor``), so it learns the scenery from the true frames only. ``anchor_weight`` > 0
    (the whole VAE, MSE): the encoder's latents of the clips flagged ``anchor`` are held near the starting
    encoder's (``AnchoredVAEObjective``), so a DiT trained on them needs to learn only what moved. ``workers``
    processes render the clips while the VAE trains (the same batches: every item is a function of its index)."""
    if is_done(run):
        return run
    vae = WanVAE(cfg)
    vae.load_state_dict(state)
    vae.to(device)
    if decoder_only:
        freeze_encoder(vae)
    warmup = min(50, steps // 10)
    cooldown = min(cooldown, steps - warmup)
    tc = TrainConfig(steps=steps, batch_size=clips.batch, lr=lr, warmup=warmup, ema_decay=clips.ema, seed=seed,
                     out_dir=str(run), ckpt_every=250, schedule="wsd" if cooldown > 0 else "constant",
                     cooldown=cooldown, num_workers=workers)  # fmt: skip
    if decoder_only:
        anchor = copy.deepcopy(vae).eval().requires_grad_(False) if keep_shapes else None  # as it starts
        objective: DecoderObjective | VAEObjective | AnchoredVAEObjective
        objective = DecoderObjective(clips.recon, endpoint_weight, anchor)
    elif anchor_weight > 0:
        start = copy.deepcopy(vae)
        objective = AnchoredVAEObjective(start, anchor_weight, endpoint_weight, clips.kl_weight)
    else:
        objective = VAEObjective(kl_weight=clips.kl_weight, recon=clips.recon, endpoint_weight=endpoint_weight)
    Trainer({"vae": vae}, objective, vae_data(clips, seed) if data is None else data, tc).run()
    mark_done(run, {"steps": tc.steps})
    return run
