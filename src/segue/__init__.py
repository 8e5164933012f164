"""segue: two keyframes and a prompt in, a smooth video out (Wan2.1 FLF2V family).

``load``, ``Pipeline`` and ``Video`` are imported on first use, so ``segue --help`` and argument errors
answer without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, InputError, OutputError, SegueError

if TYPE_CHECKING:
    from .loader import load
    from .pipeline import Pipeline
    from .video import Video

__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "Video", "SegueError", "InputError", "OutputError", "CheckpointError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from .loader import load

        return load
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "Video":
        from .video import Video

        return Video
    raise AttributeError(f"module 'segue' has no attribute {name!r}")
