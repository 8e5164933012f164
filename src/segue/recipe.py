"""The reference's FLF2V recipe as plain functions (SPEC section 1): input frames to tensors, the last frame
fitted to the first's size, the mask and conditioning video of the given frames at any positions (first and
last, first only, or any set), the initial noise, and the decoded video back to uint8 frames."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError
from .media import load_image


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


def initial_noise(channels: int, lat_t: int, lat_h: int, lat_w: int, seed: int, device: torch.device) -> torch.Tensor:
    """The reference's noise: a generator on the run device seeded once, one randn call."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.randn(channels, lat_t, lat_h, lat_w, dtype=torch.float32, generator=g, device=device)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], truncating as the reference's writer does."""
    x = video.clamp(-1, 1).add(1).div(2).mul(255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()
