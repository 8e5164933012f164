"""segue: two keyframes and a prompt in, a smooth video out (Wan2.1 FLF2V family)."""

from __future__ import annotations

__version__ = "0.1.0"
