"""Text (umT5-XXL) and image (CLIP ViT-H/14) encoders with the reference's pre/post-processing.

The networks are transformers' ``UMT5EncoderModel`` and ``CLIPVisionModel``: the same architectures
as the reference's own T5 encoder and the CLIP visual tower. What segue adds is the configs, loading
on the meta device, and what the reference does around them:

- text: clean the prompt (ftfy, html entities, whitespace), tokenize to ``text_len`` with EOS, run the
  encoder with the padding mask and trim each output to its true length (EOS included).
- image: bicubic resize of [-1, 1] frames straight to ``image_size`` (aspect squashed), map to
  [0, 1], normalise with the CLIP mean/std, and return the output of all blocks but the last
  (no post-norm), i.e. transformers' ``hidden_states[-2]``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ftfy
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from ..adapters.encoders import clip_config_to_hf, clip_hf_strip, t5_config_to_hf
from ..config import ImageEncoderConfig, TextEncoderConfig
from ..weights import load_into

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

    def __init__(self, cfg: TextEncoderConfig, tokenizer: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        hf_cfg = t5_config_to_hf(cfg)
        hf_cfg.pop("architectures")
        self.model = UMT5EncoderModel(UMT5Config(**hf_cfg))
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[Tensor]:
        """One float32 [L_i, d_model] tensor per prompt, L_i = its token count incl. EOS."""
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.cfg.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)  # [B, text_len]
        mask = batch["attention_mask"].to(self.device)  # [B, text_len]
        lens = mask.sum(dim=1).tolist()
        # Padding sits at the end and is masked out of every key, and the relative position bias depends
        # only on distances, so the columns after the longest prompt change nothing: drop them.
        longest = max(lens)
        out = self.model(input_ids=ids[:, :longest], attention_mask=mask[:, :longest]).last_hidden_state
        return [u[:n].float() for u, n in zip(out, lens)]  # B x [L_i, d_model]


class ImageEncoder(nn.Module):
    """CLIP vision tower plus the reference's resize/normalise; returns the penultimate block's output."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hf_cfg = clip_config_to_hf(cfg)
        hf_cfg.pop("architectures")
        hf_cfg.pop("model_type")
        self.model = CLIPVisionModel(CLIPVisionConfig(**hf_cfg))
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
        m = self.model
        weight = m.embeddings.patch_embedding.weight
        x = self.preprocess(frames).to(device=weight.device, dtype=weight.dtype)
        h = m.pre_layrnorm(m.embeddings(x))  # [N, tokens, width]
        # Only the first num_layers-1 blocks: the last one and the post-norm are never used.
        for layer in m.encoder.layers[:-1]:
            h = layer(h, None)
        return h.float()


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
    tokenizer: Any,
    device: torch.device | str,
    dtype: torch.dtype,
) -> TextEncoder:
    """Build on meta, strictly load a ``UMT5EncoderModel`` state dict, cast everything to ``dtype``."""
    with torch.device("meta"):
        enc = TextEncoder(cfg, tokenizer)
    sd = _tie_t5_embedding(hf_state_dict)
    load_into(enc.model, sd, "text encoder (umT5)", device=device, dtype_for=lambda _n, _t: dtype)
    enc.model.encoder.embed_tokens.weight = enc.model.shared.weight  # one tensor, as in the reference
    return enc.eval().requires_grad_(False)


def load_image_encoder(
    cfg: ImageEncoderConfig,
    hf_state_dict: Mapping[str, Tensor],
    device: torch.device | str,
    dtype: torch.dtype,
) -> ImageEncoder:
    """Build on meta, strictly load a ``CLIPVisionModel[WithProjection]`` state dict, cast to ``dtype``."""
    with torch.device("meta"):
        enc = ImageEncoder(cfg)
    sd = clip_hf_strip(hf_state_dict)
    load_into(enc.model, sd, "image encoder (CLIP)", device=device, dtype_for=lambda _n, _t: dtype)
    # transformers keeps position ids in a non-persistent buffer that the meta build left empty.
    emb = enc.model.embeddings
    emb.position_ids = torch.arange(emb.num_positions, device=device).expand(1, -1)
    return enc.eval().requires_grad_(False)
