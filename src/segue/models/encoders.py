"""Text (umT5-XXL) and image (CLIP ViT-H/14) encoders with the reference's pre/post-processing.

The networks are segue's ``umt5.UMT5Encoder`` and ``clip_vision.CLIPVisionTower`` (the reference's T5
encoder and CLIP visual tower; transformers' ``UMT5EncoderModel`` / ``CLIPVisionModel`` compute the same,
and are the parity tests' oracle). What this module adds is what the reference does around them:

- text: clean the prompt (ftfy, html entities, whitespace), tokenize to ``text_len`` with EOS, run the
  encoder with the padding mask and trim each output to its true length (EOS included).
- image: bicubic resize of [-1, 1] frames straight to ``image_size`` (aspect squashed), map to
  [0, 1], normalise with the CLIP mean/std, and return the output of all blocks but the last
  (no post-norm), i.e. transformers' ``hidden_states[-2]``.

Both load on the meta device from a state dict in their stored (transformers) names; the official
``.pth`` names are mapped to those by ``segue.adapters.encoders``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import ftfy
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.encoders import clip_hf_strip
from ..config import ImageEncoderConfig, TextEncoderConfig
from ..weights import load_into
from .clip_vision import CLIPVisionTower
from .umt5 import UMT5Encoder

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

_WHITESPACE = re.compile(r"\s+")

# The two names of umT5's single (tied) token embedding.
_T5_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


def clean_prompt(text: str) -> str:
    """The reference's prompt cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class TextEncoder(nn.Module):
    """umT5 encoder plus the reference's tokenization and trimming."""

    def __init__(self, cfg: TextEncoderConfig, tokenizer: Tokenizer | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer  # None: a model that only stores or counts weights
        self.model = UMT5Encoder(cfg)
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[Tensor]:
        """One float32 [L_i, d_model] tensor per prompt, L_i = its token count incl. EOS."""
        if self.tokenizer is None:
            raise ValueError("this text encoder was built without a tokenizer: it cannot encode prompts")
        ids, mask = self.tokenizer.batch([clean_prompt(p) for p in prompts], self.cfg.text_len)
        ids, mask = ids.to(self.device), mask.to(self.device)  # [B, text_len] each
        lens = mask.sum(dim=1).tolist()
        # Padding sits at the end and is masked out of every key, and the relative position bias depends
        # only on distances, so the columns after the longest prompt change nothing: drop them.
        longest = max(lens)
        out = self.model(ids[:, :longest], mask[:, :longest])  # [B, longest, d_model]
        return [u[:n].float() for u, n in zip(out, lens)]  # B x [L_i, d_model]


class ImageEncoder(nn.Module):
    """CLIP vision tower plus the reference's resize/normalise; returns the penultimate block's output."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = CLIPVisionTower(cfg)
        self.eval().requires_grad_(False)

    def preprocess(self, frames: Tensor | Sequence[Tensor]) -> Tensor:
        """[-1, 1] frames ([N, 3, H, W], or a sequence of [3, H, W] / [n, 3, H, W] of any sizes)
        -> normalised float32 pixels [N, 3, S, S]."""
        if isinstance(frames, Tensor):
            frames = [frames]
        size = (self.cfg.image_size, self.cfg.image_size)
        resized = []
        for f in frames:
            f = f.float()
            if f.ndim == 3:
                f = f.unsqueeze(0)
            if f.ndim != 4 or f.shape[1] != 3:
                raise ValueError(f"frames must be [N, 3, H, W], got {tuple(f.shape)}")
            # Straight to S x S (aspect squashed, no crop), as the reference does.
            resized.append(F.interpolate(f, size=size, mode="bicubic", align_corners=False))
        x = torch.cat(resized).mul(0.5).add(0.5)  # [N, 3, S, S] in about [0, 1]
        mean = x.new_tensor(self.cfg.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.cfg.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, frames: Tensor | Sequence[Tensor]) -> Tensor:
        """[N, 3, H, W] frames in [-1, 1] -> [N, tokens, width] float32 features after num_layers-1 blocks."""
        weight = self.model.embeddings.patch_embedding.weight
        x = self.preprocess(frames).to(device=weight.device, dtype=weight.dtype)
        # Only the first num_layers-1 blocks: the last one and the post-norm are never used.
        return self.model(x, layers=self.cfg.num_layers - 1).float()  # [N, tokens, width]


# ---------------------------------------------------------------------------------------------
# Loading


def _tie_t5_embedding(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fill both names of the tied umT5 embedding from whichever the checkpoint has."""
    sd = dict(sd)
    present = [k for k in _T5_EMBED_KEYS if k in sd]
    if present:
        # When both are there, the one the encoder reads (embed_tokens) wins.
        t = sd[present[-1]]
        for k in _T5_EMBED_KEYS:
            sd[k] = t
    return sd


def load_text_encoder(
    cfg: TextEncoderConfig,
    hf_state_dict: Mapping[str, Tensor],
    tokenizer: Tokenizer | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> TextEncoder:
    """Build on meta, strictly load a state dict in transformers' ``UMT5EncoderModel`` names (either name of
    the tied embedding will do), cast everything to ``dtype``."""
    with torch.device("meta"):
        enc = TextEncoder(cfg, tokenizer)
    sd = _tie_t5_embedding(hf_state_dict)
    load_into(enc.model, sd, "text encoder (umT5)", device=device, dtype_for=lambda _n, _t: dtype)
    return enc.eval().requires_grad_(False)


def load_image_encoder(
    cfg: ImageEncoderConfig,
    hf_state_dict: Mapping[str, Tensor],
    device: torch.device | str,
    dtype: torch.dtype,
) -> ImageEncoder:
    """Build on meta, strictly load a state dict in transformers' ``CLIPVisionModel[WithProjection]`` names,
    cast to ``dtype``."""
    with torch.device("meta"):
        enc = ImageEncoder(cfg)
    sd = clip_hf_strip(hf_state_dict)
    load_into(enc.model, sd, "image encoder (CLIP)", device=device, dtype_for=lambda _n, _t: dtype)
    return enc.eval().requires_grad_(False)
