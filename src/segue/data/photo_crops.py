"""Single-frame crops of the training photos at many scales, in their colours and in others: what a VAE's
first-frame path (the path a first keyframe takes) trains on before it sees any clip.

Item ``i`` is a function of (seed, i): a resumed run draws the same crops. A share ``flat`` of the items are
flat fields of uniformly random colours (the whole RGB cube, black and white included); the others are
crops of a training photo resized (Lanczos) so its short side is one of ``SIDES`` pixels, flipped half the
time, a share ``recolour`` of them in other colours (``broad.recoloured``).
"""

from __future__ import annotations

import numpy as np
import torch

from .broad import fit_short_side, recoloured
from .photos import load_photo, photo_names

SIDES = (64, 80, 96, 128, 160, 192)  # the short sides the photos are drawn at: fine and coarse textures


class PhotoCrops(torch.utils.data.Dataset):
    """Item i: ``{"image": float [3, size, size] in [-1, 1]}``, drawn from (seed, i)."""

    def __init__(self, photos: str = "pypi", size: int = 32, flat: float = 0.2, recolour: float = 0.75,
                 seed: int = 0, length: int = 1_000_000) -> None:  # fmt: skip
        if not (0 < size <= min(SIDES) and 0.0 <= flat <= 1.0 and 0.0 <= recolour <= 1.0 and length >= 1):
            raise ValueError(f"need 0 < size <= {min(SIDES)}, flat and recolour in [0, 1] and length >= 1")
        self.size, self.flat, self.recolour, self.seed, self.length = size, flat, recolour, seed, length
        # float32 [H, W, 3], 0..255: every training photo at every side
        self.views = [fit_short_side(load_photo(name), side) for name in photo_names("train", photos) for side in SIDES]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng, n = np.random.default_rng([self.seed, index, 21]), self.size
        if rng.random() < self.flat:
            colour = torch.from_numpy(rng.uniform(-1.0, 1.0, 3)).float()
            return {"image": colour[:, None, None].expand(3, n, n).clone()}
        view = self.views[int(rng.integers(len(self.views)))]
        top, left = (int(rng.integers(d - n + 1)) for d in view.shape[:2])
        crop = view[top : top + n, left : left + n]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < self.recolour:
            crop = recoloured(np.ascontiguousarray(crop), rng)
        image = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1) / 127.5 - 1.0  # [3, n, n]
        return {"image": image.clamp(-1.0, 1.0)}

    def batch(self, step: int, n: int) -> torch.Tensor:
        """Items ``step * n`` .. ``step * n + n - 1`` stacked: [n, 3, size, size] (a loop's ``step``-th batch)."""
        return torch.stack([self[step * n + i]["image"] for i in range(n)])
