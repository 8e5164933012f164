"""segue: two keyframes and a prompt in, a smooth video out (Wan2.1 FLF2V family)."""

from __future__ import annotations

from .errors import CheckpointError, InputError, SegueError
from .loader import load
from .pipeline import Pipeline, Video

__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "Video", "SegueError", "InputError", "CheckpointError", "__version__"]
