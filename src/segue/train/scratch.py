"""A model from random weights: tokenizer, VAE, the DiT and its encoders in stages, the decoder, a bundle.

``train_scratch(recipe, out_dir)`` runs a recipe's ``[scratch]`` into ``out_dir``; every phase resumes from
its own checkpoints after an interruption (a finished phase leaves a ``done`` marker and is skipped).
docs/training.md gives the schedule and the reasons behind it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..bundle import save_bundle, trained_on
from ..config import ModelConfig
from ..data.synthetic import SyntheticVideos, vocabulary
from ..io import atomic_write_text
from ..models.dit import WanDiT
from ..models.encoders import ImageEncoder, TextEncoder
from ..models.vae import WanVAE
from ..placement.tensors import resolve_device
from ..tokenizer import load_tokenizer, train_tokenizer
from .flow import FLF2VObjective
from .latents import CachedClips, CachedFLF2VObjective, build_latent_cache
from .phases import (
    is_done,
    load_ema,
    mark_done,
    measured_vae_config,
    scaled,
    stage_train_config,
    train_vae_run,
    vae_data,
)
from .recipe import Recipe, Scratch, Stage, VAEClips
from .trainer import TrainConfig, Trainer
from .vae_loss import VAEObjective, narrow_posterior


def tokenizer_phase(s: Scratch, vocab_size: int, out: Path) -> Path:
    """A T5-style tokenizer on the caption vocabulary and a sample of training captions (deterministic)."""
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        captions = [SyntheticVideos("train", length=2000, loops=s.loops).clip(i).caption for i in range(0, 2000, 7)]
        train_tokenizer([" ".join(vocabulary())] * 20 + captions, vocab_size, tok_dir)
    return tok_dir


def vae_phase(
    s: Scratch, clips: VAEClips, config: ModelConfig, out: Path, steps: int, dev: torch.device
) -> tuple[ModelConfig, WanVAE]:
    """The whole VAE from random weights (seeded by ``s.seed`` alone) into ``out/vae``; returns the config
    with the latent statistics measured on the first DiT stage's clips, and the VAE, frozen."""
    run = out / "vae"
    if not is_done(run):
        torch.manual_seed(s.seed)  # the VAE's initial weights depend on the seed alone
        vae = WanVAE(config.vae)
        narrow_posterior(vae)
        vae.to(dev)
        tc = TrainConfig(steps=steps, batch_size=clips.batch, lr=s.vae_lr, warmup=min(s.vae_warmup, s.vae_steps // 10),
                         ema_decay=clips.ema, seed=s.seed, out_dir=str(run), ckpt_every=250)  # fmt: skip
        Trainer({"vae": vae}, VAEObjective(kl_weight=clips.kl_weight, recon=clips.recon), vae_data(clips, s.seed),
                tc).run()  # fmt: skip
        mark_done(run, {"steps": tc.steps})
    state = load_ema(run, "vae")
    first = s.stages[0]
    stats_data = SyntheticVideos("train", length=s.data_length, frames=first.frames, size=first.size, loops=s.loops)
    config = replace(config, vae=measured_vae_config(config.vae, state, stats_data, clips.stats_batches, dev))
    vae = WanVAE(config.vae)
    vae.load_state_dict(state)
    vae.to(dev).eval().requires_grad_(False)
    return config, vae


class _Cache:
    """The latent cache of the stages at the first stage's clip shape: built once, when first needed."""

    def __init__(self, s: Scratch, vae: WanVAE, out: Path, scale: float) -> None:
        self.s, self.vae, self.dir = s, vae, out / "latents"
        self.clips_wanted = min(scaled(s.cache_clips, scale), s.data_length)
        self.shape = (s.stages[0].frames, s.stages[0].size)
        stages = [t for t in s.stages if (t.frames, t.size) == self.shape]
        self.modes = sorted({m for t in stages for m, w in t.modes.items() if w > 0})
        self.clips: CachedClips | None = None

    def used_by(self, stage: Stage, run: Path) -> bool:
        """Whether ``stage`` trains on the cache; a stage keeps the choice it started with."""
        marker = run / "data.json"
        if marker.is_file():
            return bool(json.loads(marker.read_text())["cached"])
        started = (run / "ckpt" / "latest").exists()  # begun before the cache existed: finish uncached
        return self.s.cache_clips > 0 and (stage.frames, stage.size) == self.shape and not started

    def get(self, data: SyntheticVideos) -> CachedClips:
        if not is_done(self.dir):
            n = self.clips_wanted
            build_latent_cache(self.vae, data, n, self.dir, self.modes, dtype=getattr(torch, self.s.cache_dtype))
            mark_done(self.dir, {"clips": n, "modes": self.modes})
        if self.clips is None:
            self.clips = CachedClips(self.dir, temporal=self.vae.cfg.temporal_factor)
        return self.clips


def dit_stage(s: Scratch, stage: Stage, parts: dict[str, torch.nn.Module], cache: _Cache, run: Path,
              steps: int) -> None:  # fmt: skip
    """One DiT stage into ``run`` (resumes; skipped when done): on the latent cache at its shape, else
    encoding its clips every step."""
    if is_done(run):
        return
    tc = stage_train_config(stage, steps, s.seed, run)
    data = SyntheticVideos("train", length=s.data_length, frames=stage.frames, size=stage.size, loops=s.loops)
    cached = cache.used_by(stage, run)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "data.json", json.dumps({"cached": cached}))
    if cached:
        objective = CachedFLF2VObjective(shift=s.shift, modes=stage.modes, caption_dropout=stage.caption_dropout)
        Trainer(parts, objective, cache.get(data), tc).run()
    else:
        objective = FLF2VObjective(cache.vae, shift=s.shift, modes=stage.modes, caption_dropout=stage.caption_dropout)
        Trainer(parts, objective, data, tc).run()
    mark_done(run, {"steps": tc.steps})


def write_bundle(path: Path, config: ModelConfig, parts: dict[str, torch.nn.Module], vae: WanVAE, tok_dir: Path,
                 dtype: str, lineage: list[dict]) -> Path:  # fmt: skip
    """Ship every component (the encoders' stored models, not their wrappers) in one file."""
    modules = {"dit": parts["dit"], "vae": vae, "text": parts["text"].model, "image": parts["image"].model}
    return save_bundle(path, config, modules, tok_dir, dtype=getattr(torch, dtype), lineage=lineage)


def train_scratch(recipe: Recipe, out_dir: str | Path, device: str = "cpu", steps_scale: float = 1.0) -> Path:
    """Run ``recipe.scratch`` end to end (resuming where it stopped); returns ``out_dir/model.safetensors``.
    ``steps_scale`` multiplies every phase's steps and the clips cached (at least 1 each).

    Every model trains on ``device``; data, the latent cache and checkpoints stay on the CPU."""
    s, clips = recipe.scratch, recipe.vae
    if s is None or recipe.model is None:
        raise ValueError(f"recipe {recipe.name!r} has no [scratch]")
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"recipe": recipe.name, "steps_scale": steps_scale, "scratch": asdict(s), "vae": asdict(clips)}
    atomic_write_text(out / "scratch.json", json.dumps(record, indent=2))
    torch.manual_seed(s.seed)
    config = recipe.model.config()
    tok_dir = tokenizer_phase(s, config.text.vocab_size, out)
    tokenizer = load_tokenizer(tok_dir)
    config, vae = vae_phase(s, clips, config, out, scaled(s.vae_steps, steps_scale), dev)

    # The DiT and the text and image encoders train jointly; each stage starts from the previous one's EMA.
    parts = {"dit": WanDiT(config.dit), "text": TextEncoder(config.text, tokenizer),
             "image": ImageEncoder(config.image)}  # fmt: skip
    for m in parts.values():
        m.to(dev).requires_grad_(True)
    cache, prev = _Cache(s, vae, out, steps_scale), None
    for stage in s.stages:
        if prev is not None:
            for part, module in parts.items():
                module.load_state_dict(load_ema(prev, part))
        dit_stage(s, stage, parts, cache, out / stage.name, scaled(stage.steps, steps_scale))
        prev = out / stage.name
    for part, module in parts.items():
        module.load_state_dict(load_ema(prev, part))

    # The decoder on the frozen encoder: the latents, their statistics and so the DiT stay valid.
    if s.decoder_steps > 0:
        run = train_vae_run(clips, config.vae, load_ema(out / "vae", "vae"), out / "vae-decoder",
                            steps=scaled(s.decoder_steps, steps_scale), lr=s.decoder_lr, seed=s.seed + 1,
                            decoder_only=True, device=dev)  # fmt: skip
        vae.load_state_dict(load_ema(run, "vae"))
    lineage = [{"recipe": recipe.name, "scratch": s.name, "steps_scale": steps_scale, "seed": s.seed}]
    config = trained_on(config, s.stages[-1].frames, s.stages[-1].size)
    return write_bundle(out / "model.safetensors", config, parts, vae, tok_dir, s.bundle_dtype, lineage)
