"""The result of a generation: uint8 frames at a frame rate, written to a video file (and PNG frames, the
final latent) without ever overwriting the files it was made from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .io import Protected, atomic_folder, atomic_path
from .media import check_outputs, write_png_frames, write_video_file


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
