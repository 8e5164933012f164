"""The three-stage FLF2V recipe as a preset: tokenizer, VAE, then DiT + encoders in three stages, then a bundle.

``train_preset("default", out_dir)`` reproduces the built-in model from scratch; every step resumes from
its own checkpoints after an interruption (a finished step leaves a ``done`` marker and is skipped).
See docs/training.md for the schedule and the reasons behind it.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..bundle import save_bundle
from ..config import DiTConfig, GenerationDefaults, ImageEncoderConfig, ModelConfig, TextEncoderConfig, VAEConfig
from ..data.synthetic import SyntheticVideos, vocabulary
from ..io import atomic_write_text
from ..loader import resolve_device
from ..models.dit import WanDiT
from ..models.encoders import ImageEncoder, TextEncoder
from ..models.vae import WanVAE
from ..tokenizer import load_tokenizer, train_tokenizer
from .flow import FLF2VObjective
from .latents import CachedClips, CachedFLF2VObjective, build_latent_cache
from .trainer import TrainConfig, Trainer
from .vae_loss import DecoderObjective, VAEObjective, freeze_encoder, narrow_posterior

log = logging.getLogger("segue")

HYBRID = {"first_last": 0.4, "first": 0.2, "none": 0.1, "random_subset": 0.3}
FLF = {"first_last": 0.9, "first": 0.1}


@dataclass(frozen=True)
class Stage:
    """One DiT stage: conditioning modes, data size, optimisation."""

    name: str
    steps: int
    lr: float
    modes: dict[str, float]
    size: tuple[int, int] = (64, 64)
    frames: int = 17
    batch_size: int = 16
    warmup: int = 0
    caption_dropout: float = 0.1
    # > 0: the last ``cooldown`` steps decay the lr linearly to ``min_lr_ratio * lr`` (a "wsd" schedule);
    # 0: the lr stays constant after the warmup (a stage cut short at a checkpoint is then a whole stage)
    cooldown: int = 0
    min_lr_ratio: float = 0.0


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


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    stages: tuple[Stage, ...]
    vae_steps: int
    vae_lr: float = 3e-4
    vae_warmup: int = 200
    vae_batch: int = 8
    vae_recon: str = "l1"
    vae_ema: float = 0.999
    vae_clip: tuple[int, tuple[int, int]] = (9, (32, 32))  # frames, size of the VAE's training clips
    # crops of this size from the rendered clips (same scale as the native size, a quarter of the pixels)
    vae_crop: tuple[int, int] | None = None
    kl_weight: float = 1e-6
    # then the decoder alone, on the frozen encoder (the latent space the DiT learned stays as it is)
    decoder_steps: int = 0
    decoder_lr: float = 5e-4
    shift: float = 3.0
    data_length: int = 200_000
    seed: int = 0
    stats_batches: int = 8
    bundle_dtype: str = "float16"
    # VAE latents of this many clips are cached once for the stages at the first stage's size and frame
    # count (the others encode every step); 0: no cache. The cached stages cycle over these clips.
    cache_clips: int = 10_000
    cache_dtype: str = "float16"
    # where the training clips' circles lie (``synthetic.LOOP_CENTRES``); "any" is what run 2, the start of the
    # built-in model's lineage, was trained on
    loops: str = "any"
    notes: dict[str, str] = field(default_factory=dict)


def _default_model(
    vocab: int,
    name: str,
    dim: int,
    layers: int,
    heads: int,
    vae_dim: int,
    z_dim: int = 16,
    vae_mult: tuple[int, ...] = (1, 2, 4, 4),
    vae_temporal: tuple[bool, ...] = (False, True, True),
    patch: tuple[int, int, int] = (1, 2, 2),
) -> ModelConfig:
    text = TextEncoderConfig(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, text_len=64)
    image = ImageEncoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, image_size=64,
                               patch_size=8)  # fmt: skip
    dit = DiTConfig(dim=dim, ffn_dim=dim * 8 // 3, num_heads=heads, num_layers=layers, freq_dim=64, text_dim=64,
                    text_len=64, image_dim=64, image_pos_len=2 * image.num_tokens, in_dim=2 * z_dim + 4,
                    out_dim=z_dim, patch_size=patch)  # fmt: skip
    vae = VAEConfig(dim=vae_dim, z_dim=z_dim, dim_mult=vae_mult, temporal_downsample=vae_temporal,
                    latent_mean=(0.0,) * z_dim, latent_std=(1.0,) * z_dim)  # fmt: skip
    defaults = GenerationDefaults(frames=17, max_area=64 * 64, steps=25, shift=3.0, guidance=4.0, fps=8,
                                  negative_prompt="")  # fmt: skip
    return ModelConfig(name=name, dit=dit, vae=vae, text=text, image=image, defaults=defaults)


PRESETS: dict[str, Preset] = {
    "default": Preset(
        # A 4x-space causal VAE (16 latent channels, Wan's count): the small objects survive it (an 8x VAE of
        # this width reconstructed them at 8-12 dB after 3000 steps). DiT patch (1, 2, 2), 320 tokens per
        # 64x64 17-frame clip: with patch (1, 4, 4), 576 input values per token into width 192 was too narrow
        # for the DiT to copy its keyframes (docs/training.md, the first and second whole runs).
        model=_default_model(
            vocab=320,
            name="segue-default",
            dim=192,
            layers=6,
            heads=3,
            vae_dim=16,
            z_dim=16,
            vae_mult=(1, 2, 4),
            vae_temporal=(True, True),
            patch=(1, 2, 2),
        ),  # fmt: skip
        stages=(
            Stage("stage1-hybrid", steps=1500, lr=3e-4, modes=HYBRID, warmup=200),
            Stage("stage2-flf", steps=1200, lr=2e-4, modes=FLF),
            Stage("stage3-detail", steps=100, lr=5e-5, modes=FLF, size=(80, 80), batch_size=8),
        ),
        vae_steps=3000,
        vae_lr=5e-4,
        vae_recon="mse",  # the metric is PSNR; L1 trailed MSE at equal steps (docs/training.md)
        vae_warmup=100,
        # an EMA of 0.999 lags thousands of steps behind in a run this short
        vae_ema=0.99,
        # whole 17-frame clips (every causal-cache position; shorter clips drifted past their length) at the
        # native 64x64 scale (a VAE trained on 32x32 renders lost 4 dB at 64x64), as 32x32 crops for speed
        vae_clip=(17, (64, 64)),
        vae_crop=(32, 32),
        vae_batch=4,
        decoder_steps=500,
        decoder_lr=5e-4,
        cache_clips=2000,
    ),
    # the whole path in seconds, for tests: same code, tiny sizes and step counts
    "smoke": Preset(
        model=_default_model(vocab=160, name="segue-smoke", dim=32, layers=1, heads=2, vae_dim=4),
        stages=(
            Stage("stage1-hybrid", steps=2, lr=1e-3, modes=HYBRID, size=(32, 32), frames=5, batch_size=2),
            Stage("stage2-flf", steps=1, lr=1e-3, modes=FLF, size=(32, 32), frames=5, batch_size=2),
            Stage("stage3-detail", steps=1, lr=1e-3, modes=FLF, size=(48, 48), frames=5, batch_size=2),
        ),
        vae_steps=2,
        decoder_steps=1,
        vae_batch=2,
        vae_clip=(5, (32, 32)),
        vae_crop=(24, 24),
        data_length=64,
        stats_batches=1,
        cache_clips=8,
    ),
}


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
        return {"video": video[:, :, top : top + self.size[0], left : left + self.size[1]]}


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


def latent_stats(vae: WanVAE, data: SyntheticVideos, batches: int, batch_size: int) -> tuple[list, list]:
    """Per-channel mean and std of the VAE's raw latent mean over training clips (the normalisation)."""
    zs = []
    with torch.no_grad():
        for b in range(batches):
            video = torch.stack([data[b * batch_size + i]["video"] for i in range(batch_size)])
            zs.append(vae.encode(video.to(vae.conv1.weight.device), normalize=False).float().cpu())
    z = torch.cat(zs).transpose(0, 1).reshape(vae.cfg.z_dim, -1)  # [z, N]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


def measured_vae_config(
    cfg: VAEConfig, state: dict[str, torch.Tensor], data: SyntheticVideos, batches: int, device: str | torch.device
) -> VAEConfig:
    """``cfg`` with the latent statistics (``latent_stats``, batches of 4) of the VAE ``state`` measured on ``data``."""
    vae = WanVAE(cfg)
    vae.load_state_dict(state)
    mean, std = latent_stats(vae.to(device).eval(), data, batches, 4)
    return replace(cfg, latent_mean=tuple(mean), latent_std=tuple(std))


def vae_data(p: Preset, seed: int) -> torch.utils.data.Dataset:
    """The VAE's training clips: ``p.vae_clip`` renders, cropped to ``p.vae_crop`` at positions from ``seed``."""
    frames, size = p.vae_clip
    data = SyntheticVideos("train", length=p.data_length, frames=frames, size=size, loops=p.loops)
    return data if p.vae_crop is None else Crops(data, p.vae_crop, seed=seed)


def train_vae_run(
    p: Preset,
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
) -> Path:
    """Train the VAE ``state`` further into ``run`` (resumes; skipped when done) on ``p``'s VAE clips drawn
    with ``seed``: the whole VAE, or (``decoder_only``) its decoder on the frozen encoder, the first and last
    frames' error counted ``endpoint_weight`` times (``DecoderObjective``); ``cooldown`` > 0: the lr falls
    linearly to 0 over the last ``cooldown`` steps (else it stays constant after the warmup). ``data``
    replaces the VAE clips (e.g. ``generated.GeneratedClips`` for the decoder). ``keep_shapes`` (the decoder on
    generated latents with their backdrops): shapes are kept as the decoder renders them at the start
    (``DecoderObjective.anchor``), so it learns the scenery from the true frames only."""
    if not is_done(run):
        vae = WanVAE(cfg)
        vae.load_state_dict(state)
        vae.to(device)
        if decoder_only:
            freeze_encoder(vae)
        warmup = min(50, steps // 10)
        cooldown = min(cooldown, steps - warmup)
        tc = TrainConfig(steps=steps, batch_size=p.vae_batch, lr=lr, warmup=warmup, ema_decay=p.vae_ema, seed=seed,
                         out_dir=str(run), ckpt_every=250, schedule="wsd" if cooldown > 0 else "constant",
                         cooldown=cooldown)  # fmt: skip
        if decoder_only:
            anchor = copy.deepcopy(vae).eval().requires_grad_(False) if keep_shapes else None  # as it starts
            objective: DecoderObjective | VAEObjective = DecoderObjective(p.vae_recon, endpoint_weight, anchor)
        else:
            objective = VAEObjective(kl_weight=p.kl_weight, recon=p.vae_recon)
        Trainer({"vae": vae}, objective, vae_data(p, seed) if data is None else data, tc).run()
        mark_done(run, {"steps": tc.steps})
    return run


def train_decoder(p: Preset, vae_cfg: VAEConfig, out: Path, steps: int, device: str | torch.device = "cpu") -> Path:
    """Fine-tune the decoder of ``out/vae``'s EMA VAE with the encoder frozen, into ``out/vae-decoder``
    (resumes; skipped when done). Fresh clips: the data order is seeded with ``p.seed + 1``."""
    run = out / "vae-decoder"
    if is_done(run):
        return run
    state = load_ema(out / "vae", "vae")
    return train_vae_run(p, vae_cfg, state, run, steps=steps, lr=p.decoder_lr, seed=p.seed + 1,
                         decoder_only=True, device=device)  # fmt: skip


def train_preset(name: str, out_dir: str | Path, device: str = "cpu", steps_scale: float = 1.0) -> Path:
    """Run the preset end to end (resuming where it stopped) and write ``out_dir/model.safetensors``.

    Every model trains on ``device``; data, the latent cache and checkpoints stay on the CPU."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    dev = resolve_device(device)
    p = PRESETS[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"preset": name, "steps_scale": steps_scale, **asdict(p)}
    atomic_write_text(out / "preset.json", json.dumps(record, indent=2))
    torch.manual_seed(p.seed)

    def steps(n: int) -> int:
        return max(1, round(n * steps_scale))

    # 1. Tokenizer on the caption vocabulary (deterministic).
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        captions = [SyntheticVideos("train", length=2000, loops=p.loops).clip(i).caption for i in range(0, 2000, 7)]
        train_tokenizer([" ".join(vocabulary())] * 20 + captions, p.model.text.vocab_size, tok_dir)
    tokenizer = load_tokenizer(tok_dir)

    # 2. VAE on short clips (the causal chunks see the same 1 + 4 frame pattern as long clips).
    vae_run = out / "vae"
    if not is_done(vae_run):
        torch.manual_seed(p.seed)  # the VAE's initial weights depend on the seed alone
        vae = WanVAE(p.model.vae)
        narrow_posterior(vae)
        vae.to(dev)
        tc = TrainConfig(steps=steps(p.vae_steps), batch_size=p.vae_batch, lr=p.vae_lr,
                         warmup=min(p.vae_warmup, p.vae_steps // 10), ema_decay=p.vae_ema, seed=p.seed,
                         out_dir=str(vae_run), ckpt_every=250)  # fmt: skip
        Trainer({"vae": vae}, VAEObjective(kl_weight=p.kl_weight, recon=p.vae_recon), vae_data(p, p.seed), tc).run()
        mark_done(vae_run, {"steps": tc.steps})
    vae_state = load_ema(vae_run, "vae")
    stats_data = SyntheticVideos("train", length=p.data_length, frames=p.stages[0].frames, size=p.stages[0].size,
                                 loops=p.loops)  # fmt: skip
    vae_cfg = measured_vae_config(p.model.vae, vae_state, stats_data, p.stats_batches, dev)
    model_cfg = replace(p.model, vae=vae_cfg)
    vae = WanVAE(vae_cfg)
    vae.load_state_dict(vae_state)
    vae.to(dev).eval().requires_grad_(False)

    # 3. DiT + text + image encoders, three stages; each starts from the previous stage's EMA weights.
    # Stages at the first stage's shape train on cached VAE latents (built once, below, when first needed).
    cache_shape = (p.stages[0].frames, p.stages[0].size)
    cache_dir = out / "latents"
    cached_stages = [s for s in p.stages if (s.frames, s.size) == cache_shape]
    cached_modes = sorted({m for s in cached_stages for m, w in s.modes.items() if w > 0})
    cache: CachedClips | None = None

    def uses_cache(stage: Stage, run: Path) -> bool:
        """Whether this stage trains on the cache; a stage keeps the choice it started with."""
        marker = run / "data.json"
        if marker.is_file():
            return bool(json.loads(marker.read_text())["cached"])
        started = (run / "ckpt" / "latest").exists()  # begun before the cache existed: finish uncached
        return p.cache_clips > 0 and (stage.frames, stage.size) == cache_shape and not started

    parts = {"dit": WanDiT(model_cfg.dit), "text": TextEncoder(model_cfg.text, tokenizer),
             "image": ImageEncoder(model_cfg.image)}  # fmt: skip
    for m in parts.values():
        m.to(dev).requires_grad_(True)
    prev: Path | None = None
    for stage in p.stages:
        run = out / stage.name
        if prev is not None:
            for part, module in parts.items():
                module.load_state_dict(load_ema(prev, part))
        if not is_done(run):
            tc = stage_train_config(stage, steps(stage.steps), p.seed, run)
            data = SyntheticVideos("train", length=p.data_length, frames=stage.frames, size=stage.size, loops=p.loops)
            cached = uses_cache(stage, run)
            run.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run / "data.json", json.dumps({"cached": cached}))
            if cached:
                if not is_done(cache_dir):
                    n = min(p.cache_clips, p.data_length)
                    build_latent_cache(vae, data, n, cache_dir, cached_modes, dtype=getattr(torch, p.cache_dtype))
                    mark_done(cache_dir, {"clips": n, "modes": cached_modes})
                if cache is None:
                    cache = CachedClips(cache_dir, temporal=vae.cfg.temporal_factor)
                kw = dict(shift=p.shift, modes=stage.modes, caption_dropout=stage.caption_dropout)
                objective = CachedFLF2VObjective(**kw)
                data = cache
            else:
                objective = FLF2VObjective(vae, shift=p.shift, modes=stage.modes, caption_dropout=stage.caption_dropout)
            Trainer(parts, objective, data, tc).run()
            mark_done(run, {"steps": tc.steps})
        prev = run

    # 4. Decoder fine-tuning on the frozen encoder: the latents, their statistics and so the DiT stay valid.
    if p.decoder_steps > 0:
        train_decoder(p, vae_cfg, out, steps(p.decoder_steps), dev)
        vae.load_state_dict(load_ema(out / "vae-decoder", "vae"))

    # 5. Ship the EMA weights of every component in one file.
    assert prev is not None
    final = {part: load_ema(prev, part) for part in parts}
    for part, module in parts.items():
        module.load_state_dict(final[part])
    modules = {"dit": parts["dit"], "vae": vae, "text": parts["text"].model, "image": parts["image"].model}
    dtype = getattr(torch, p.bundle_dtype)
    lineage = [{"preset": name, "steps_scale": steps_scale, "seed": p.seed}]  # continuations append to it
    return save_bundle(out / "model.safetensors", model_cfg, modules, tok_dir, dtype=dtype, lineage=lineage)
