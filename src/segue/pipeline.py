"""The generation pipeline: the reference's FLF2V recipe (SPEC section 1) as plain functions plus one loop.

The DiT is only the denoiser. Sizing, the frame mask, the conditioning video, text and image features,
noise, classifier-free guidance and the solver live here. The same loop serves first+last frame
(FLF2V) and first-frame-only (I2V) generation; they differ only in the conditioning they build.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import GenerationDefaults, ModelConfig
from .errors import InputError
from .io import Protected, atomic_folder, atomic_path
from .media import check_outputs, load_image, write_png_frames, write_video_file
from .sampling.guidance import Conditioning, Guidance, OneBatch, StepContext, TwoPasses, cond_velocity
from .sampling.solvers import make_solver
from .settings import GenerationSettings, check_progress, check_request, host_memory, resolve_settings

log = logging.getLogger("segue")

ImageLike = str | Path | Image.Image
Progress = Callable[[int, int], None]
VideoDecoder = Callable[[torch.Tensor], "torch.Tensor | None"]  # [1, z, T, h, w] -> [1, 3, F, H, W] or None

_RUNS = itertools.count()  # numbers the sampling loops (StepContext.run)


# ---------------------------------------------------------------------------------------------
# The recipe, step by step (SPEC section 1).


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB uint8 -> [3, H, W] float32 in [-1, 1], the reference's to_tensor then (x - 0.5) / 0.5."""
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return t.sub(0.5).div(0.5)


def fit_last_frame(last: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale the last frame to cover the first frame's size keeping its aspect, then center-crop.

    The reference crops with swapped, unscaled sizes instead (SPEC section 1); equal sizes pass unchanged.
    """
    _, h, w = last.shape
    if (h, w) == (height, width):
        return last
    ratio = max(height / h, width / w)
    nh, nw = max(height, round(h * ratio)), max(width, round(w * ratio))
    scaled = F.interpolate(last[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=ratio < 1)[0]
    top, left = (nh - height) // 2, (nw - width) // 2
    return scaled[:, top : top + height, left : left + width]


def frame_mask(
    frames: int, lat_t: int, lat_h: int, lat_w: int, given: bool | Iterable[int], temporal: int = 4
) -> torch.Tensor:
    """Mask [4, T_lat, lat_h, lat_w]: which pixel frames are given, folded 4 per latent frame.

    ``given`` lists the given pixel frames (any positions in [0, frames)); ``True`` / ``False`` is the
    reference's FLF2V / I2V case: the first frame and the last one when it is given."""
    positions = given_positions(frames, given)
    m = torch.zeros(1, frames, lat_h, lat_w)
    m[:, positions] = 1
    # the first latent stands for one pixel frame: repeat it so every latent covers `temporal` frames
    m = torch.cat([m[:, :1].repeat_interleave(temporal, dim=1), m[:, 1:]], dim=1)  # [1, F+3, h, w]
    return m.view(1, lat_t, temporal, lat_h, lat_w).transpose(1, 2)[0]  # [4, T_lat, h, w]


def given_positions(frames: int, given: bool | Iterable[int]) -> list[int]:
    """Sorted given pixel-frame positions; a bool means FLF2V (``True``: first and last) or I2V (first)."""
    if isinstance(given, bool):
        return [0, frames - 1] if given and frames > 1 else [0]
    positions = sorted(set(given))
    bad = [p for p in positions if not 0 <= p < frames]
    if bad:
        raise InputError(f"given frame positions {bad} outside the clip's {frames} frames (0..{frames - 1})")
    return positions


def conditioning_video(
    first: torch.Tensor | Mapping[int, torch.Tensor], last: torch.Tensor | None, frames: int, height: int, width: int
) -> torch.Tensor:
    """[3, F, H, W]: the given frames bicubic-resized (on CPU, as the reference) and zeros elsewhere.

    ``first`` is the first frame ([3, h, w]) with ``last`` the last one or None (FLF2V / I2V), or a mapping
    from pixel-frame position to frame for any set of given frames (``last`` then None)."""
    if isinstance(first, Mapping):
        given = dict(first)
    else:
        given = {0: first, **({frames - 1: last} if last is not None else {})}
    video = torch.zeros(3, frames, height, width)
    for pos in given_positions(frames, given):
        # one frame per call, as the reference resizes them
        video[:, pos] = F.interpolate(given[pos][None].cpu(), size=(height, width), mode="bicubic")[0]
    return video


def given_frames(
    first: torch.Tensor, last: torch.Tensor | None, given: Mapping[int, Any] | None, frames: int
) -> dict[int, torch.Tensor]:
    """Position -> frame [3, h, w] of every given frame: the keyframes, then ``given`` (images or uint8
    [H, W, 3] arrays) at their positions, checked to lie inside the clip."""
    out = {0: first, **({frames - 1: last} if last is not None else {})}
    for pos in given_positions(frames, given or {}):
        img = given[pos]  # type: ignore[index]
        img = Image.fromarray(np.asarray(img, dtype=np.uint8)) if isinstance(img, np.ndarray) else img
        out[pos] = image_to_tensor(load_image(img, f"given frame {pos}"))
    return out


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


def initial_noise(channels: int, lat_t: int, lat_h: int, lat_w: int, seed: int, device: torch.device) -> torch.Tensor:
    """The reference's noise: a generator on the run device seeded once, one randn call."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.randn(channels, lat_t, lat_h, lat_w, dtype=torch.float32, generator=g, device=device)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], truncating as the reference's writer does."""
    x = video.clamp(-1, 1).add(1).div(2).mul(255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Results and the pipeline object.


@dataclass
class Video:
    """A generated clip: ``frames`` uint8 [T, H, W, 3] at ``fps``; ``latent`` is the final latent;
    ``inputs`` the (path, what) files it was made from, which ``save`` never overwrites."""

    frames: np.ndarray
    fps: int
    latent: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[tuple[str, str], ...] = ()

    def save(
        self,
        path: str | Path,
        frames_dir: str | Path | None = None,
        latent_path: str | Path | None = None,
        overwrite: bool = False,
        protected: Protected | None = None,
    ) -> Path:
        """Write the clip (mp4/webm/gif by extension), optionally PNG frames into ``frames_dir`` (a folder
        swapped in whole; one holding files segue did not write is refused unless ``overwrite``) and the
        final latent (torch .pt). All are checked first (segue.io: never onto an input), written under
        temporary names and renamed together at the end, so an error leaves none of them half-written."""
        if protected is None:
            protected = Protected()
            for p, what in self.inputs:
                protected.add(p, what)
        out, frames, lat = check_outputs(path, frames_dir, latent_path, protected, overwrite)
        with atomic_path(out) as tmp:
            write_video_file(self.frames, tmp, out, self.fps)
            if frames is not None:
                with atomic_folder(frames, overwrite) as staging:
                    write_png_frames(self.frames, staging)
            if lat is not None:
                if self.latent is None:
                    raise InputError(f"latent file {lat}: this clip has no latent")
                with atomic_path(lat) as tmp_latent:
                    torch.save(self.latent, tmp_latent)
        return out


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
