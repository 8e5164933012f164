"""Memory profiles as data: one ``Profile`` per name, each trait a field, in one registry.

A profile says where each component's weights live during a generation and which memory-saving
transforms run; ``segue.placement.apply.apply_profile`` turns one into hooks and tensor moves, and
``segue.placement.estimate.estimate_memory`` predicts its device memory. The registry:

- ``gpu``: everything on the compute device (the plain pipeline).
- ``offload``: text encoder, image encoder and VAE stay in CPU memory (pinned with CUDA) and are
  copied to the device only for the duration of their ``encode`` / ``decode`` call.
- ``block-swap``: offload, plus the DiT's blocks live in pinned CPU memory and stream through a
  few device slots (``BlockSwap``), plus the VAE decodes in row bands (``tiled_decode``).
- ``fp8``: offload, plus fp8 DiT block weights (``segue.accel.fp8.quantize_fp8``; lossy).
- ``low``: block swap with fp8 blocks, tiled decode, and the text encoder running on the CPU.

"auto" tries the profiles with ``auto=True`` in registry order and takes the first whose estimated
peak fits the free GPU memory. A new profile is one more entry here (and a row in docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

__all__ = ["AUTO_ORDER", "DEFAULT_BAND_ROWS", "DEFAULT_PREFETCH", "DEFAULT_RESIDENT", "PROFILES", "Profile", "get"]

DEFAULT_BAND_ROWS = 16  # latent rows per VAE band: at 720p 9.7 GB decode peak instead of 18.8 GB
DEFAULT_RESIDENT = 0  # swapped-profile blocks kept on the device besides the swap slots
DEFAULT_PREFETCH = 1  # blocks copied ahead of the running one


@dataclass(frozen=True)
class Profile:
    """Where weights live and which memory-saving transforms run. All False: everything on the device."""

    name: str
    description: str
    offload: bool = False  # text encoder, image encoder and VAE in CPU memory, moved in around their calls
    block_swap: bool = False  # DiT blocks streamed from CPU memory through a few device slots
    tiled_decode: bool = False  # VAE decoded in row bands (bounded memory, same result)
    fp8: bool = False  # fp8 DiT block weights (lossy)
    # quantize_fp8's ``scaled_mm``: None = fp8 matmul where the GPU has it, False = dequantize per layer
    # (no fp8 copy of the activations)
    fp8_matmul: bool | None = None
    text_encoder_on_cpu: bool = False  # umT5 runs on the CPU; its output is moved over
    auto: bool = True  # tried by "auto" (in registry order)

    @property
    def lossless(self) -> bool:
        """Gives the "gpu" profile's video bit for bit."""
        return not self.fp8

    def __post_init__(self) -> None:
        if (self.block_swap or self.fp8) and not self.offload:
            raise ValueError(f"profile {self.name!r}: block swap and fp8 build on offload")


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("gpu", "everything on the device"),
        Profile(
            "offload", "text encoder, image encoder and VAE on the CPU, moved in only while they run", offload=True
        ),
        Profile(
            "block-swap",
            "offload + DiT blocks streamed from pinned CPU memory + VAE decoded in row bands",
            offload=True,
            block_swap=True,
            tiled_decode=True,
        ),  # fmt: skip
        Profile("fp8", "offload + fp8 DiT block weights (lossy)", offload=True, fp8=True, auto=False),
        Profile(
            "low",
            "block swap with fp8 blocks + banded VAE decode + text encoder run on the CPU (lossy)",
            offload=True,
            block_swap=True,
            tiled_decode=True,
            fp8=True,
            fp8_matmul=False,
            text_encoder_on_cpu=True,
        ),  # fmt: skip
    )
}
# Tried by "auto" in this order: the fastest that fits; fp8 only when nothing exact fits.
AUTO_ORDER = tuple(name for name, p in PROFILES.items() if p.auto)


def get(name: str) -> Profile:
    """The profile called ``name``; a clear error naming the choices otherwise."""
    if name not in PROFILES:
        raise InputError(f"unknown memory profile {name!r}; choose one of: {', '.join(PROFILES)}")
    return PROFILES[name]
