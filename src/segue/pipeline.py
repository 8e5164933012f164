"""The generation pipeline: the reference's FLF2V recipe (SPEC section 1) as plain functions plus one loop.

The DiT is only the denoiser. Sizing, the frame mask, the conditioning video, text and image features,
noise, classifier-free guidance and the solver live here. The same loop serves first+last frame
(FLF2V) and first-frame-only (I2V) generation; they differ only in the conditioning they build.
"""

from __future__ import annotations

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

from .config import ModelConfig
from .errors import InputError
from .media import load_image, write_frames, write_video
from .sampling.solvers import SOLVERS, make_solver

log = logging.getLogger("segue")

ImageLike = str | Path | Image.Image
Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------
# The recipe, step by step (SPEC section 1).


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB uint8 -> [3, H, W] float32 in [-1, 1], the reference's to_tensor then (x - 0.5) / 0.5."""
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return t.sub(0.5).div(0.5)


def fit_latent_size(height: int, width: int, max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """Latent (h, w) of the reference: aspect of the first frame, area about max_area, patch-aligned."""
    ar = height / width
    lat_h = round(np.sqrt(max_area * ar) // stride // patch * patch)
    lat_w = round(np.sqrt(max_area / ar) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise InputError(f"max area {max_area} is too small for a {width}x{height} frame")
    return int(lat_h), int(lat_w)


def check_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """An explicit output size must be a positive multiple of the VAE stride times the patch size."""
    bad = [f"{n}={v}" for n, v in (("width", width), ("height", height)) if v <= 0 or v % multiple]
    if bad:
        near_w, near_h = (max(multiple, round(v / multiple) * multiple) for v in (width, height))
        raise InputError(f"size {width}x{height}: {', '.join(bad)} not divisible by {multiple} (try {near_w}x{near_h})")
    return width, height


def check_frames(frames: int, temporal: int = 4) -> int:
    if frames < 1 or (frames - 1) % temporal:
        lo = max(1, (frames - 1) // temporal * temporal + 1)
        hi = lo + temporal
        hint = f"{lo} or {hi}" if frames > 1 else f"{1 + temporal}"
        raise InputError(f"frames must be {temporal}n+1 (5, 9, ..., 81); got {frames}, nearest valid: {hint}")
    return frames


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
    """A generated clip: ``frames`` uint8 [T, H, W, 3] at ``fps``; ``latent`` is the final latent."""

    frames: np.ndarray
    fps: int
    latent: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path, frames_dir: str | Path | None = None) -> Path:
        """Write the clip (mp4/webm/gif by extension) and optionally PNG frames; both appear whole."""
        out = write_video(self.frames, path, self.fps)
        if frames_dir is not None:
            write_frames(self.frames, frames_dir)
        return out


@dataclass
class GenerationSettings:
    frames: int
    height: int
    width: int
    steps: int
    shift: float
    guidance: float
    solver: str
    seed: int
    guidance_steps: int | None = None  # guided steps from the first; None: all

    def guidance_at(self, step: int) -> float:
        """The guidance scale of step ``step`` (0-based): 1 (no second pass) past ``guidance_steps``."""
        return self.guidance if self.guidance_steps is None or step < self.guidance_steps else 1.0


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
        # Set by segue.parallel.parallelize: which rank this is and the groups to talk over.
        # What segue.accel.options applied (memory profile, kernels, LoRAs), for logs and Video.info.
        self.applied: list[str] = []
        self.parallel: Any | None = None
        # Classifier-free guidance as one DiT call on a batch of two (cond, uncond) instead of two
        # calls: fewer, larger kernels for twice the activation memory. Ignored under CFG parallel.
        self.cfg_batch: bool = False

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
    ) -> GenerationSettings:
        d = self.config.defaults
        stride = self.config.vae.spatial_factor
        patch = self.config.dit.patch_size[1]
        frames = check_frames(d.frames if frames is None else frames, self.config.vae.temporal_factor)
        if size is not None:
            w, h = check_size(size[0], size[1], stride * patch)
        else:
            area = d.max_area if max_area is None else max_area
            if area <= 0:
                raise InputError(f"max area must be positive, got {area}")
            lat_h, lat_w = fit_latent_size(first_hw[0], first_hw[1], area, stride, patch)
            h, w = lat_h * stride, lat_w * stride
        steps = d.steps if steps is None else steps
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        shift = d.shift if shift is None else shift
        if shift <= 0:
            raise InputError(f"shift must be positive, got {shift}")
        guidance = d.guidance if guidance is None else guidance
        solver = d.solver if solver is None else solver
        if solver not in SOLVERS:
            raise InputError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
        if not 0 <= seed < 2**63:
            raise InputError(f"seed must be in [0, 2**63), got {seed}")
        guidance_steps = d.guidance_steps if guidance_steps is None else guidance_steps
        if guidance_steps is not None and guidance_steps < 1:
            raise InputError(f"guidance steps must be at least 1, got {guidance_steps}")
        return GenerationSettings(frames, h, w, steps, shift, guidance, solver, seed, guidance_steps)

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
        every rank calls this; rank 0 gets the Video, the others None."""
        first_img = load_image(first, "first frame")
        last_img = load_image(last, "last frame") if last is not None else None
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        first_t = image_to_tensor(first_img)
        s = self.resolve(
            first_t.shape[1:], frames, max_area, size, steps, shift, guidance, solver, seed, guidance_steps
        )
        last_t = fit_last_frame(image_to_tensor(last_img), *first_t.shape[1:]) if last_img is not None else None
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

        latent = self.denoise(noise, context, context_neg, clip, y, s, progress)
        t1 = time.perf_counter()
        video = self.decode(latent) if decode else None  # [3, F, H, W] in [-1, 1], None on ranks other than 0
        t_decode = time.perf_counter() - t1
        info = {
            "settings": s.__dict__,
            "speed": list(self.applied),
            "seconds": {"conditioning": t_cond, "denoise": t1 - t0 - t_cond, "decode": t_decode},
        }
        if not decode:  # every rank holds the latent
            return Video(np.zeros((0, s.height, s.width, 3), np.uint8), cfg.defaults.fps, latent.cpu(), info)
        if video is None:
            return None  # a parallel run's other ranks: only rank 0 holds the video
        return Video(to_uint8(video), cfg.defaults.fps, latent.cpu(), info)

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
        """VAE-decode [z, T, h, w]; in a parallel run split over the ranks, the video lands on rank 0."""
        ps = self.parallel
        if ps is None or ps.world_size == 1:
            return self.vae.decode(latent[None])[0]
        if ps.config.vae:
            from .parallel.vae import parallel_decode

            out = parallel_decode(self.vae, latent[None], ps.world_group, dst=0)
            return None if out is None else out[0]
        return self.vae.decode(latent[None])[0] if ps.is_main else None

    def denoise(
        self,
        noise: torch.Tensor,
        context: torch.Tensor,
        context_neg: torch.Tensor,
        clip: torch.Tensor | None,
        y: torch.Tensor | None,
        s: GenerationSettings,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """The sampling loop: velocity with classifier-free guidance, one solver step per timestep."""
        solver = make_solver(s.solver, s.steps, s.shift, self.device, seed=s.seed)
        latent = noise
        n = len(solver.timesteps)
        for i, t in enumerate(solver.timesteps):
            timestep = t[None].to(self.device)  # [1]; the solver's timestep (integer-valued except lcm's)
            v = self.velocity(latent, timestep, context, context_neg, clip, y, s.guidance_at(i))
            latent = solver.step(v, latent)
            if progress is not None:
                progress(i + 1, n)
        return latent

    def velocity(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_neg: torch.Tensor,
        clip: torch.Tensor | None,
        y: torch.Tensor | None,
        guidance: float,
    ) -> torch.Tensor:
        """Guided velocity ``v_u + g * (v_c - v_u)``. With CFG parallel each half of the ranks runs one
        of the two passes and they swap results; the arithmetic is the same, so the same latent.
        With ``cfg_batch`` both passes run as one batch of two (equal within fp rounding)."""
        ps = self.parallel
        if guidance == 1.0:  # the conditional velocity alone: skip the second pass
            return self.dit(latent[None], timestep, context[None], clip, y)[0]
        if ps is not None and ps.config.cfg:
            import torch.distributed as dist

            mine = self.dit(latent[None], timestep, (context if ps.cfg_rank == 0 else context_neg)[None], clip, y)
            both = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(both, mine.contiguous(), group=ps.cfg_group)
            v, v_neg = both[0][0], both[1][0]
        elif self.cfg_batch:
            # One batch of two, cond first. The DiT zero-pads text to text_len itself: pad both here
            # so prompts of different token lengths stack.
            text_len = self.config.dit.text_len
            for name, c in (("prompt", context), ("negative prompt", context_neg)):
                if c.shape[0] > text_len:
                    raise InputError(f"{name} context has {c.shape[0]} tokens, at most {text_len} allowed")
            texts = torch.stack([F.pad(c, (0, 0, 0, text_len - c.shape[0])) for c in (context, context_neg)])
            # clip and y belong to the one sample: FLF2V's two frames' CLIP tokens regroup to one row.
            clip2 = None if clip is None else clip.reshape(1, -1, clip.shape[-1]).expand(2, -1, -1)
            y2 = None if y is None else y.expand(2, *y.shape[1:])
            both = self.dit(latent[None].expand(2, *latent.shape), timestep, texts, clip2, y2)
            v, v_neg = both[0], both[1]
        else:
            v = self.dit(latent[None], timestep, context[None], clip, y)[0]
            v_neg = self.dit(latent[None], timestep, context_neg[None], clip, y)[0]
        return v_neg + guidance * (v - v_neg)
