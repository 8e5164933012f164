"""The generation pipeline: the reference's FLF2V recipe (SPEC section 1; its plain functions in
``segue.recipe``) driven by one loop.

The DiT is only the denoiser. Sizing, text and image features, classifier-free guidance and the solver are
applied here. The same loop serves first+last frame
(FLF2V) and first-frame-only (I2V) generation; they differ only in the conditioning they build.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import GenerationDefaults, ModelConfig
from .errors import InputError
from .media import load_image
from .recipe import (
    conditioning_video,
    fit_last_frame,
    frame_mask,
    given_frames,
    image_to_tensor,
    initial_noise,
    to_uint8,
)
from .sampling.guidance import Conditioning, Guidance, OneBatch, StepContext, TwoPasses, cond_velocity
from .sampling.solvers import make_solver
from .settings import GenerationSettings, check_progress, check_request, host_memory, resolve_settings
from .video import Video

log = logging.getLogger("segue")

ImageLike = str | Path | Image.Image
Progress = Callable[[int, int], None]
VideoDecoder = Callable[[torch.Tensor], "torch.Tensor | None"]  # [1, z, T, h, w] -> [1, 3, F, H, W] or None

_RUNS = itertools.count()  # numbers the sampling loops (StepContext.run)


# ---------------------------------------------------------------------------------------------
# What the model was trained for.


def untrained_note(defaults: GenerationDefaults, frames: int, height: int, width: int) -> str | None:
    """One line when ``frames`` or the size lie outside what the model records it was trained on (more
    frames, another frame count, or a side larger than the trained one), else None."""
    tf, ts = defaults.trained_frames, defaults.trained_size
    outside = []
    if tf is not None and frames != tf:
        outside.append(f"{frames} frames")
    if ts is not None and (height > ts[0] or width > ts[1]):
        outside.append(f"{width}x{height}")
    if not outside:
        return None
    trained = " at ".join(x for x in (f"{tf} frames" if tf else "", f"{ts[1]}x{ts[0]}" if ts else "") if x)
    return f"{' and '.join(outside)} is outside what this model was trained for ({trained}): expect a degraded video"


def warn_untrained(defaults: GenerationDefaults, frames: int, height: int, width: int) -> None:
    note = untrained_note(defaults, frames, height, width)
    if note is not None:
        log.warning(note)


# ---------------------------------------------------------------------------------------------
# Results and the pipeline object.


class Pipeline:
    """Holds the four components; ``generate`` runs the recipe. Build it with ``segue.load``."""

    def __init__(
        self,
        config: ModelConfig,
        dit: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: Any,
        image_encoder: Any | None,
        device: torch.device,
        source: str = "",
    ) -> None:
        self.config = config
        self.dit, self.vae = dit, vae
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.device = device
        self.source = source
        # What segue.load applied (memory profile, kernels, LoRAs), for logs and Video.info.
        self.applied: list[str] = []
        # Set by segue.parallel.parallelize: which rank this is and the groups to talk over.
        self.parallel: Any | None = None
        # Classifier-free guidance (segue.sampling.guidance): chosen when the pipeline is built.
        self.cfg_strategy: Guidance = TwoPasses()
        # The VAE decode step; None: ``vae.decode`` on this process. A parallel run sets its split decode.
        self.video_decoder: VideoDecoder | None = None

    @property
    def cfg_batch(self) -> bool:
        """Whether CFG runs as one batch of two (``OneBatch``); setting it picks that or two passes."""
        return isinstance(self.cfg_strategy, OneBatch)

    @cfg_batch.setter
    def cfg_batch(self, batch: bool) -> None:
        self.cfg_strategy = OneBatch() if batch else TwoPasses()

    # -- settings ------------------------------------------------------------------------------
    def resolve(
        self,
        first_hw: tuple[int, int],
        frames: int | None,
        max_area: int | None,
        size: tuple[int, int] | None,
        steps: int | None,
        shift: float | None,
        guidance: float | None,
        solver: str | None,
        seed: int,
        guidance_steps: int | None = None,
        has_last: bool = False,
    ) -> GenerationSettings:
        """The settings of one generation, checked (segue.settings) and completed by the model's defaults."""
        request = check_request(frames=frames, max_area=max_area, size=size, steps=steps, shift=shift,
                                guidance=guidance, solver=solver, seed=seed, guidance_steps=guidance_steps)  # fmt: skip
        s = resolve_settings(request, self.config, first_hw, has_last, host_memory())
        warn_untrained(self.config.defaults, s.frames, s.height, s.width)
        return s

    # -- conditioning --------------------------------------------------------------------------
    def encode_text(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
        # two calls, as the reference: batching the prompts could change the last bits
        (ctx,) = self.text_encoder.encode([prompt])
        (neg,) = self.text_encoder.encode([negative])
        return ctx.to(self.device), neg.to(self.device)

    def encode_images(self, first: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor | None:
        """CLIP features [1, N, width]: both frames for FLF2V. A first-frame-only run of an FLF2V model
        shows CLIP the first frame twice (its position table expects two frames)."""
        if self.image_encoder is None:
            return None
        two = self.config.dit.image_pos_len is not None
        frames = [first, last if last is not None else first] if two else [first]
        feats = self.image_encoder.encode(torch.stack(frames).to(self.device))  # [n, 257, width]
        return feats.reshape(1, -1, feats.shape[-1])

    # -- the loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        first: ImageLike,
        last: ImageLike | None = None,
        prompt: str = "",
        negative_prompt: str | None = None,
        frames: int | None = None,
        max_area: int | None = None,
        steps: int | None = None,
        shift: float | None = None,
        guidance: float | None = None,
        solver: str | None = None,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        progress: Progress | None = None,
        guidance_steps: int | None = None,
        decode: bool = True,
        given: Mapping[int, ImageLike | np.ndarray] | None = None,
    ) -> Video | None:
        """Generate a clip from ``first`` (and ``last``) keyframes. ``size`` is (width, height) and
        overrides ``max_area``. ``guidance_steps`` limits guidance to the first that many steps (where the
        layout and the path are decided). Unset settings come from the model's defaults. ``decode=False``
        skips the VAE decode: the Video has no frames, only its ``latent``. ``given`` adds frames at any
        pixel-frame positions (0-based; e.g. frames carried from a previous shot), through the same mask
        branch; at 0 or the last position it replaces that keyframe. In a parallel run (torchrun)
        every rank calls this; rank 0 gets the Video, the others None. Every setting is checked first
        (segue.settings: InputError naming the argument); ``progress(step, total)`` is called with 0 before
        the first step and after each."""
        # every setting checked before any model work (segue.settings): one InputError naming the argument
        request = check_request(prompt, negative_prompt, frames, max_area, size, steps, shift, guidance, solver, seed,
                                guidance_steps)  # fmt: skip
        check_progress(progress)
        if not isinstance(decode, bool):
            raise InputError(f"decode must be True or False, got {type(decode).__name__} {decode!r}")
        first_img = load_image(first, "first frame")
        last_img = load_image(last, "last frame") if last is not None else None
        first_t = image_to_tensor(first_img)
        s = resolve_settings(request, self.config, first_t.shape[1:], last_img is not None, host_memory())
        last_t = fit_last_frame(image_to_tensor(last_img), *first_t.shape[1:]) if last_img is not None else None
        sources = ((first, "first frame"), (last, "last frame"), (self.source, "checkpoint"))
        inputs = tuple((str(p), what) for p, what in sources if isinstance(p, (str, Path)) and str(p))
        negative = negative_prompt or self.config.defaults.negative_prompt
        cond_frames = given_frames(first_t, last_t, given, s.frames)

        cfg = self.config
        stride, tf = cfg.vae.spatial_factor, cfg.vae.temporal_factor
        lat_t, lat_h, lat_w = (s.frames - 1) // tf + 1, s.height // stride, s.width // stride
        t0 = time.perf_counter()
        noise = initial_noise(cfg.vae.z_dim, lat_t, lat_h, lat_w, s.seed, self.device)
        context, context_neg = self.encode_text(prompt, negative)
        clip = self.encode_images(first_t, last_t)
        y = None
        if cfg.dit.image_dim is not None:
            mask = frame_mask(s.frames, lat_t, lat_h, lat_w, cond_frames, tf)
            cond = conditioning_video(cond_frames, None, s.frames, s.height, s.width)
            cond_latent = self.vae.encode(cond[None].to(self.device))[0]  # [z, T, h, w]
            y = torch.cat([mask.to(self.device), cond_latent.float()])[None]  # [1, 4 + z, T, h, w]
        t_cond = time.perf_counter() - t0

        latent = self.denoise(noise, Conditioning(context, context_neg, clip, y), s, progress)
        t1 = time.perf_counter()
        video = self.decode(latent) if decode else None  # [3, F, H, W] in [-1, 1], None on ranks other than 0
        t_decode = time.perf_counter() - t1
        if decode:
            log.info("decoded %d frames %dx%d in %.1fs", s.frames, s.width, s.height, t_decode)
        info = {
            "settings": s.__dict__,
            "speed": list(self.applied),
            "seconds": {"conditioning": t_cond, "denoise": t1 - t0 - t_cond, "decode": t_decode},
        }
        if not decode:  # every rank holds the latent
            return Video(np.zeros((0, s.height, s.width, 3), np.uint8), cfg.defaults.fps, latent.cpu(), info, inputs)
        if video is None:
            return None  # a parallel run's other ranks: only rank 0 holds the video
        return Video(to_uint8(video), cfg.defaults.fps, latent.cpu(), info, inputs)

    def story(
        self,
        story: dict[str, Any] | str | Path,
        cache_dir: str | Path | None = None,
        progress: Progress | None = None,
        color_match: bool = False,
    ) -> Video | None:
        """Render a story (a dict, or a TOML/JSON file: keyframes and the shots between them, docs/storyboard.md)
        into one film; ``info["report"]`` holds its report. ``cache_dir`` keeps each shot by content so a
        later run re-renders only the shots that changed (None: no cache). ``color_match`` anchors every
        shot's colours at its keyframes."""
        from .story.film import render_story

        return render_story(self, story, cache_dir=cache_dir, progress=progress, color_match_all=color_match)

    def decode(self, latent: torch.Tensor) -> torch.Tensor | None:
        """VAE-decode [z, T, h, w] -> [3, F, H, W]; None where a parallel run's decoder leaves no video."""
        decode = self.vae.decode if self.video_decoder is None else self.video_decoder
        out = decode(latent[None])
        return None if out is None else out[0]

    def denoise(
        self, noise: torch.Tensor, cond: Conditioning, s: GenerationSettings, progress: Progress | None = None
    ) -> torch.Tensor:
        """The sampling loop: one step context, one guided velocity and one solver step per timestep."""
        solver = make_solver(s.solver, s.steps, s.shift, self.device, seed=s.seed)
        latent = noise
        n = len(solver.timesteps)
        run = next(_RUNS)
        if progress is not None:
            progress(0, n)  # before the first step, so a bar's clock covers every step
        for i, t in enumerate(solver.timesteps):
            # the solver's timestep [1] (integer-valued except lcm's)
            step = StepContext(index=i, total=n, timestep=t[None].to(self.device), run=run)
            latent = solver.step(self.velocity(latent, cond, step, s.guidance_at(i)), latent)
            if progress is not None:
                progress(i + 1, n)
        return latent

    def velocity(self, latent: torch.Tensor, cond: Conditioning, step: StepContext, guidance: float) -> torch.Tensor:
        """Guided velocity ``v_u + g * (v_c - v_u)`` by the pipeline's CFG strategy; the conditional
        velocity alone where the scale is 1 (no second pass)."""
        if guidance == 1.0:
            return cond_velocity(self.dit, latent, cond, step)
        return self.cfg_strategy(self.dit, latent, cond, step, guidance)
