"""A model made from another: training resumed from a bundle's weights, one ``[[continue]]`` of a recipe.

Every component starts from the bundle, the VAE optionally from its skeleton trained on photo crops
(``skeleton``: a new latent space). Optionally the whole VAE trains first (its latent space moves, so the
statistics are measured again); then the VAE is frozen and the DiT and its encoders train for one
stage on a latent cache of fresh training clips (a window of the training split the chain has not used);
then optionally the decoder alone, on the frozen encoder, on fresh crops or on the latents the model
itself generates. The new bundle's ``segue_lineage`` lists every stage that made it, oldest first.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..bundle import (
    build_modules,
    materialize_tokenizer,
    read_bundle_lineage,
    read_bundle_metadata,
    read_bundle_weights,
    save_bundle,
    trained_on,
)
from ..config import ModelConfig, VAEConfig
from ..data.broad import BroadVideos, Mixed
from ..data.synthetic import GROUP_SIZE, Scene, SyntheticVideos
from ..errors import InputError
from ..io import atomic_write_text
from ..loader import load
from ..models.encoders import ImageEncoder, TextEncoder
from ..models.vae import WanVAE
from ..placement.tensors import resolve_device
from ..tokenizer import load_tokenizer
from .budget import budget_steps, seconds_per_step
from .flow import set_dropout
from .generated import GeneratedClips, generate_latents
from .grow import insert_identity_blocks, widen_decoder
from .latents import CachedClips, CachedFLF2VObjective, GroupedClips, build_latent_cache, build_object_masks
from .phases import is_done, load_ema, mark_done, measured_vae_config, scaled, stage_train_config, train_vae_run
from .recipe import Continuation, VAEClips
from .skeleton import skeleton_vae_state, train_skeleton
from .trainer import TrainConfig, Trainer


class Window(Dataset):
    """Items ``start .. start + length - 1`` of a dataset (synthetic clips, or them mixed with broad clips), as
    items 0 .. length - 1."""

    def __init__(self, data: SyntheticVideos | Mixed, start: int, length: int) -> None:
        if start < 0 or length < 1 or start + length > len(data):
            raise InputError(f"window [{start}, {start + length}) does not fit a dataset of {len(data)} items")
        self.data, self.start, self.length = data, start, length
        synthetic = data
        if isinstance(data, Mixed):  # what the cache records: a cache of another mix is not reused
            synthetic, self.broad = data.a, data.share_b
            self.recolour, self.photos = data.b.recolour, data.b.photos
        self.split, self.frames, self.size = synthetic.split, synthetic.frames, synthetic.size
        self.ambiguous_fraction, self.loops = synthetic.ambiguous_fraction, synthetic.loops
        self.loop_groups = synthetic.loop_groups

    def __len__(self) -> int:
        return self.length

    def _position(self, index: int) -> int:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.start + index

    def __getitem__(self, index: int) -> dict:
        return self.data[self._position(index)]

    def scene(self, index: int) -> Scene:
        return self.data.scene(self._position(index))


def blend_states(
    start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], t: float
) -> dict[str, torch.Tensor]:
    """``start + t * (end - start)`` for every floating tensor (weight-space interpolation of two states of one
    model; other tensors are taken from ``end``). The keys and shapes must match."""
    if start.keys() != end.keys():
        raise ValueError(f"cannot blend states with different keys: {sorted(start.keys() ^ end.keys())[:5]}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"blend fraction must be in [0, 1], got {t}")
    if t == 1.0:
        return dict(end)  # exactly the trained state
    out = {}
    for k, b in end.items():
        a = start[k]
        if a.shape != b.shape:
            raise ValueError(f"cannot blend {k!r}: shapes {tuple(a.shape)} and {tuple(b.shape)}")
        out[k] = torch.lerp(a.to(b.dtype), b, t) if b.is_floating_point() else b
    return out


def with_sampling(config: ModelConfig, sampling: tuple[tuple[str, float | int | str], ...]) -> ModelConfig:
    """``config`` with its generation defaults overridden by ``sampling`` ((key, value) pairs)."""
    return replace(config, defaults=replace(config.defaults, **dict(sampling))) if sampling else config


def stage_clips(c: Continuation) -> SyntheticVideos | Mixed:
    """The clips of the continuation's DiT stage: its cache window and the VAE's latent statistics come from
    them. A share ``c.broad`` are broad clips (training photos), drawn from ``c.seed``."""
    synthetic = SyntheticVideos("train", length=c.data_length, frames=c.stage.frames, size=c.stage.size,
                                ambiguous_fraction=c.ambiguous_fraction, loops=c.loops,
                                loop_groups=c.loop_groups)  # fmt: skip
    if c.broad <= 0:
        return synthetic
    broad = BroadVideos("train", length=c.data_length, frames=c.stage.frames, size=c.stage.size,
                        recolour=c.recolour, photos=c.photos)  # fmt: skip
    return Mixed(synthetic, broad, share_b=c.broad, seed=c.seed)


@dataclass
class Run:
    """What one continuation's phases share: its settings, its folder, where it trains, the bundle's tokenizer."""

    c: Continuation
    clips: VAEClips
    out: Path
    dev: torch.device
    tok_dir: Path
    data: SyntheticVideos | Mixed  # the stage's clips
    workers: int = 0
    scale: float = 1.0  # ``--steps-scale``: of the steps, and of the clips cached or generated
    clock: Callable[[], float] = time.monotonic  # seconds, for a time budget's deadline

    @property
    def cache_clips(self) -> int:
        return scaled(self.c.cache_clips, self.scale)

    @property
    def generated(self) -> int:
        return scaled(self.c.decoder_generated, self.scale)


def vae_phase(r: Run, cfg: VAEConfig, state: dict[str, torch.Tensor], steps: int, decoder_only: bool,
              data: Dataset | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Train the VAE ``state`` (whole, or its decoder on the frozen encoder) into ``out/vae`` or
    ``out/vae-decoder`` (resumes; skipped when done); returns its EMA weights."""
    c = r.c
    run = r.out / ("vae-decoder" if decoder_only else "vae")
    lr, seed = (c.decoder_lr, c.decoder_seed) if decoder_only else (c.vae_lr, c.vae_seed)
    ew = c.decoder_endpoint_weight if decoder_only else c.vae_endpoint_weight
    cooldown = round(c.decoder_cooldown * steps / c.decoder_steps) if decoder_only and c.decoder_cooldown else 0
    train_vae_run(r.clips, cfg, state, run, steps=steps, lr=lr, seed=seed, decoder_only=decoder_only, device=r.dev,
                  endpoint_weight=ew, cooldown=cooldown, data=data,
                  keep_shapes=decoder_only and c.decoder_keep_shapes,
                  anchor_weight=0.0 if decoder_only else c.vae_anchor, workers=r.workers)  # fmt: skip
    return load_ema(run, "vae")


def skeleton_phase(r: Run, cfg: VAEConfig, steps: int) -> dict[str, torch.Tensor]:
    """The VAE's skeleton trained for ``steps`` on photo crops into ``out/vae-skeleton`` (resumes; skipped when
    done), of the [vae] clips' photos recoloured as theirs are; returns the state of a VAE of ``cfg`` it is
    set into (``skeleton.embed``)."""
    c, run = r.c, r.out / "vae-skeleton"
    if not is_done(run):
        train_skeleton(cfg, run, steps=steps, lr=c.skeleton_lr, detail_weight=c.skeleton_detail_weight,
                       photos=r.clips.photos, recolour=r.clips.recolour, seed=c.vae_seed, device=r.dev)  # fmt: skip
        mark_done(run, {"steps": steps})
    return skeleton_vae_state(cfg, load_ema(run, "skeleton"), seed=c.vae_seed)


def _trainable(config: ModelConfig, modules: dict[str, torch.nn.Module], r: Run) -> dict[str, torch.nn.Module]:
    """The DiT and the encoders' training wrappers around the bundle's stored models, on the device."""
    text, image = TextEncoder(config.text, load_tokenizer(r.tok_dir)), ImageEncoder(config.image)
    text.model, image.model = modules["text"], modules["image"]
    parts = {"dit": modules["dit"], "text": text, "image": image}
    for m in parts.values():
        m.to(r.dev).requires_grad_(True)
    if r.c.text_dropout is not None:
        set_dropout(text, r.c.text_dropout)
    return parts


def _stage_cache(r: Run, vae: WanVAE) -> Path:
    """The stage's latent cache of its window of fresh clips (and the shapes' masks when they weigh more)."""
    c, cache_dir = r.c, r.out / "latents"
    window = Window(r.data, c.cache_start, r.cache_clips)
    modes = sorted(m for m, w in c.stage.modes.items() if w > 0)
    if not is_done(cache_dir):
        encode_batch = 64 if r.dev.type == "cuda" else 8  # the same cache; a GPU encodes big batches faster
        build_latent_cache(vae, window, r.cache_clips, cache_dir, modes, batch_size=encode_batch,
                           dtype=getattr(torch, c.cache_dtype), workers=r.workers)  # fmt: skip
        mark_done(cache_dir, {"clips": r.cache_clips, "start": c.cache_start, "modes": modes})
    if any(w != 1.0 for _, w in c.object_weights) and not (cache_dir / "objects.pt").is_file():
        build_object_masks(window, cache_dir, vae.cfg.temporal_factor, vae.cfg.spatial_factor, c.object_dilate,
                           r.workers)  # fmt: skip
    return cache_dir


def _budgeted(r: Run, parts: dict, objective: CachedFLF2VObjective, clips: Dataset, tc: TrainConfig,
              deadline: float | None) -> int:  # fmt: skip
    """The stage's steps: all of them, a resumed run's recorded count, or those that fit until ``deadline``."""
    budget_file = r.out / "budget.json"
    if budget_file.is_file():  # a resumed time-budgeted run keeps the length it chose
        return json.loads(budget_file.read_text())["steps"]
    if deadline is None:
        return tc.steps
    per_step = seconds_per_step(parts, objective, clips, tc)
    left = deadline - r.clock()
    steps = budget_steps(left, per_step, tc.steps)
    info = {"seconds_left": round(left, 1), "seconds_per_step": round(per_step, 4), "steps": steps, "of": tc.steps}
    atomic_write_text(budget_file, json.dumps(info, indent=2))
    print(f"time budget: {left:.0f} s left at {per_step:.3f} s/step: {steps} of {tc.steps} steps",
          file=sys.stderr, flush=True)  # fmt: skip
    return steps


def dit_stage(r: Run, parts: dict[str, torch.nn.Module], vae: WanVAE, steps: int, deadline: float | None) -> int:
    """The DiT stage into ``out/<stage name>`` on the cached window (resumes; skipped when done); returns the
    steps it ran (fewer than ``steps`` when a time budget cut it)."""
    c, run = r.c, r.out / r.c.stage.name
    if is_done(run):
        return json.loads((run / "done").read_text())["steps"]
    cache_dir = _stage_cache(r, vae)
    segments = c.object_weights or ((0, 1.0),)

    def train_config(steps: int) -> TrainConfig:
        # paired groups: the cache starts on a chunk boundary (checked), so its 3-item blocks are chunks
        return replace(stage_train_config(c.stage, steps, c.seed, run), num_workers=r.workers,
                       keep_together=GROUP_SIZE if c.paired_groups else 1)  # fmt: skip

    def objective(weight: float) -> CachedFLF2VObjective:
        return CachedFLF2VObjective(shift=c.shift, modes=c.stage.modes, caption_dropout=c.stage.caption_dropout,
                                    object_weight=weight, share_group_draws=c.paired_groups,
                                    sigma_min=c.sigma_min)  # fmt: skip

    clips: Dataset = CachedClips(cache_dir, temporal=vae.cfg.temporal_factor)
    if c.paired_groups:
        clips = GroupedClips(clips, [r.data.group_of(c.cache_start + i) for i in range(r.cache_clips)])
    steps = _budgeted(r, parts, objective(segments[0][1]), clips, train_config(steps), deadline)
    trainer = Trainer(parts, objective(segments[0][1]), clips, train_config(steps))
    # one run per weight segment; the first resumes from the latest checkpoint, which may lie past its end
    ends = [round(s * steps / c.stage.steps) for s, _ in segments[1:]] + [steps]
    for (_, weight), end in zip(segments, ends):
        trainer.loss_fn = objective(weight)
        trainer.run(stop_at=end)
    mark_done(run, {"steps": steps})
    return steps


def generated_clips(r: Run, config: ModelConfig, modules: dict[str, torch.nn.Module]) -> GeneratedClips:
    """The decoder's training pairs: the latents the model as it stands (DiT, encoders, VAE encoder, the
    sampling it ships with) generates for ``decoder_generated`` (scaled) fresh clips, with their frames."""
    c, gen_dir = r.c, r.out / "generated"
    if not is_done(gen_dir):
        gen_dir.mkdir(parents=True, exist_ok=True)
        generator = gen_dir / "generator.safetensors"  # the model that generates them, as a bundle loads
        if not generator.is_file():
            save_bundle(generator, config, modules, r.tok_dir, getattr(torch, c.bundle_dtype))
        generate_latents(load(generator, device=r.dev), r.data, c.generated_start, r.generated, gen_dir)
        mark_done(gen_dir, {"clips": r.generated, "start": c.generated_start})
    sf, crop = config.vae.spatial_factor, r.clips.crop
    crop = None if crop is None else (crop[0] // sf, crop[1] // sf)
    return GeneratedClips(r.data, c.generated_start, r.generated, gen_dir, sf, crop, c.decoder_seed,
                          c.generated_repeat, backdrop=c.decoder_keep_shapes)  # fmt: skip


def decoder_phase(r: Run, config: ModelConfig, modules: dict[str, torch.nn.Module], steps: int) -> ModelConfig:
    """The decoder alone on the frozen encoder (widened first when asked), on fresh crops or on generated
    latents; ``modules['vae']`` becomes the decoder shipped (``decoder_blend`` of the way). Returns the config."""
    c = r.c
    vae_state = {k: v.detach().cpu().clone() for k, v in modules["vae"].state_dict().items()}
    data = generated_clips(r, config, modules) if c.decoder_generated else None
    if c.decoder_dim is not None:  # same output at first; the encoder, so the latents, as they were
        vae_cfg, vae_state = widen_decoder(config.vae, vae_state, c.decoder_dim, seed=c.decoder_seed)
        config = replace(config, vae=vae_cfg)
        modules["vae"] = WanVAE(vae_cfg).to(r.dev).eval().requires_grad_(False)
    state = vae_phase(r, config.vae, vae_state, steps, True, data)
    modules["vae"].load_state_dict(blend_states(vae_state, state, c.decoder_blend))
    return config


def _start(bundle: Path, c: Continuation) -> tuple[ModelConfig, dict, dict[str, str]]:
    """The bundle's config, weights (the DiT deepened when ``insert_blocks`` asks) and tokenizer files."""
    if not bundle.is_file():
        raise InputError(f"no such bundle file: {bundle}")
    config, tok_files = read_bundle_metadata(bundle)  # a bad bundle is refused before anything is written
    weights = read_bundle_weights(bundle)
    if c.insert_blocks:
        try:
            dit_cfg, weights["dit"] = insert_identity_blocks(config.dit, weights["dit"], c.insert_blocks)
        except ValueError as e:
            raise InputError(f"continuation {c.name!r} on {bundle}: {e}") from None
        config = replace(config, dit=dit_cfg)
    return config, weights, tok_files


def continue_from_bundle(
    bundle: str | Path,
    c: Continuation,
    clips: VAEClips,
    out_dir: str | Path,
    device: str = "cpu",
    steps_scale: float = 1.0,
    deadline: float | None = None,
    workers: int = 0,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """Run continuation ``c`` on ``bundle``'s weights into ``out_dir`` (resumes); returns the new bundle.
    ``steps_scale`` multiplies every phase's steps and the clips it caches or generates (at least 1 each).

    ``clips``: the recipe's VAE clips (the VAE and decoder phases train on them). ``deadline`` (a ``clock()``
    value; ``time.monotonic`` unless a test passes its own): the DiT stage runs the steps that fit until
    then (``budget``), recorded in ``budget.json`` and kept on a resume. ``workers``: processes that render
    the VAE phases' clips and the cache's, and collate the DiT's batches (for a GPU, whose steps outrun one
    CPU core's data, or a second core beside one training thread)."""
    if workers < 0:
        raise InputError(f"workers must be >= 0, got {workers}")
    bundle, out = Path(bundle), Path(out_dir)
    config, weights, tok_files = _start(bundle, c)
    out.mkdir(parents=True, exist_ok=True)
    phase_steps = {"vae": scaled(c.vae_steps, steps_scale), "dit": scaled(c.stage.steps, steps_scale),
                   "decoder": scaled(c.decoder_steps, steps_scale)}  # fmt: skip
    if c.vae_start == "skeleton":
        phase_steps["skeleton"] = scaled(c.skeleton_steps, steps_scale)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        materialize_tokenizer(tok_files, tok_dir)
    r = Run(c, clips, out, resolve_device(device), tok_dir, stage_clips(c), workers, steps_scale, clock)

    vae_state = weights["vae"] if c.vae_start == "bundle" else skeleton_phase(r, config.vae, phase_steps["skeleton"])
    if c.vae_steps > 0:
        vae_state = vae_phase(r, config.vae, vae_state, phase_steps["vae"], decoder_only=False)
    if c.vae_steps > 0 or c.vae_start == "skeleton":  # a new latent space: its statistics are measured again
        vae_cfg = measured_vae_config(config.vae, vae_state, r.data, clips.stats_batches, r.dev)
        config = replace(config, vae=vae_cfg)
    modules = build_modules(config, {**weights, "vae": vae_state})
    vae = modules["vae"].to(r.dev).eval().requires_grad_(False)  # frozen: the DiT learns its latent space
    parts = _trainable(config, modules, r)
    if phase_steps["dit"]:
        phase_steps["dit"] = dit_stage(r, parts, vae, phase_steps["dit"], deadline)
        for part, module in parts.items():  # the EMA holds the wrappers' names (text.model.*, image.model.*)
            module.load_state_dict(load_ema(out / c.stage.name, part))
            if c.stage_blend != 1.0:
                stored = modules[part]
                stored.load_state_dict(blend_states(weights[part], stored.state_dict(), c.stage_blend))
    config = with_sampling(config, c.sampling)
    if phase_steps["dit"]:
        config = trained_on(config, c.stage.frames, c.stage.size)
    if c.decoder_steps > 0:
        config = decoder_phase(r, config, modules, phase_steps["decoder"])
    record = {"continuation": asdict(c), "steps": phase_steps["dit"], "phase_steps": phase_steps,
              "steps_scale": steps_scale, "from": bundle.name}  # fmt: skip
    atomic_write_text(out / "continuation.json", json.dumps(record, indent=2))
    lineage = read_bundle_lineage(bundle) or [{"note": "no lineage recorded in " + bundle.name}]
    return save_bundle(out / "model.safetensors", config, modules, tok_dir, getattr(torch, c.bundle_dtype),
                       lineage + [record])  # fmt: skip
