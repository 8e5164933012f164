"""The CLIP ViT vision tower: Wan2.1's image encoder network (ViT-H/14 at full size).

What it computes (the visual tower of the reference's open-clip XLM-R ViT-H/14, and transformers'
``CLIPVisionModel``):

- patch embedding: a Conv2d with kernel = stride = patch (no bias) -> ``(S/P)^2`` patch tokens; a learned
  class token in front; learned absolute position embeddings added; a LayerNorm (``pre_layrnorm``).
- pre-norm transformer layers: ``x + attn(LN1(x))``, ``x + mlp(LN2(x))``; attention with biases and the
  usual 1/sqrt(head_dim) scaling, no mask; the MLP is fc1 -> activation (exact GELU for ViT-H) -> fc2.
- Wan uses the output of all layers but the last, without the final norm (``forward(x, layers=n-1)``).
  The last layer and ``post_layernorm`` are part of every checkpoint and are loaded, never run.

Module and parameter names follow transformers' (``embeddings.class_embedding``, ``pre_layrnorm``,
``encoder.layers.i.self_attn.q_proj``, ...), segue's stored layout for this encoder; the official
``.pth`` (fused ``to_qkv``) is converted to it by ``segue.adapters.encoders``. The arithmetic is the same
op for op as transformers' SDPA path, so a checkpoint gives bit-identical features.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ImageEncoderConfig
from .umt5 import embedding, gelu_tanh


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


# What each activation a CLIP config may name computes (transformers' names; config.CLIP_ACTIVATIONS).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


class Embeddings(nn.Module):
    """Patch tokens behind a class token, plus learned positions: [B, 3, S, S] -> [B, 1 + (S/P)^2, W]."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        w = cfg.hidden_size
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.patch_embedding = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = embedding(cfg.num_tokens, w)

    def forward(self, pixels: Tensor) -> Tensor:  # [B, 3, S, S] -> [B, T, W]
        b, _, h, w = pixels.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"pixels must be {self.image_size}x{self.image_size}, got {h}x{w}")
        patches = self.patch_embedding(pixels.to(dtype=self.patch_embedding.weight.dtype))  # [B, W, g, g]
        patches = patches.flatten(2).transpose(1, 2)  # [B, g*g, W]
        x = torch.cat([self.class_embedding.expand(b, 1, -1), patches], dim=1)  # [B, T, W]
        return x + self.position_embedding.weight.unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask)."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        w = cfg.hidden_size
        self.head_dim = w // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = 0.0  # on the attention weights, in train mode only (CLIP trains without)
        self.k_proj = nn.Linear(w, w)
        self.v_proj = nn.Linear(w, w)
        self.q_proj = nn.Linear(w, w)
        self.out_proj = nn.Linear(w, w)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, W] -> [B, T, W]
        b, t = x.shape[:2]
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(shape).transpose(1, 2)  # [B, H, T, D]
        v = self.v_proj(x).view(shape).transpose(1, 2)  # [B, H, T, D]
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=p, scale=self.scale, is_causal=False)
        out = out.reshape(out.shape[0], -1, t, self.head_dim).transpose(1, 2).contiguous()  # [B, T, H, D]
        return self.out_proj(out.reshape(b, t, -1).contiguous())


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, W] -> [B, T, W]
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    """One pre-norm transformer layer."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, W] -> [B, T, W]
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Layers(nn.Module):
    """The layer list (transformers' ``encoder``)."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_layers)])


class CLIPVisionTower(nn.Module):
    """CLIP's ViT image tower; ``forward(pixels, layers)`` is the output after the first ``layers`` layers."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Layers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # loaded, not run
        self.init_weights()

    def forward(self, pixels: Tensor, layers: int | None = None) -> Tensor:
        """Normalised pixels [B, 3, S, S] -> token features [B, T, W] after ``layers`` layers (all by default;
        Wan takes ``num_layers - 1``), no final norm."""
        n = self.cfg.num_layers if layers is None else layers
        if not 0 <= n <= self.cfg.num_layers:
            raise ValueError(f"layers must be in [0, {self.cfg.num_layers}], got {n}")
        x = self.pre_layrnorm(self.embeddings(pixels))  # [B, T, W]
        for layer in self.encoder.layers[:n]:
            x = layer(x)
        return x

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's initialisation (as transformers): for a model trained from scratch; loading replaces it all."""
        if self.embeddings.class_embedding.is_meta:
            return  # nothing to fill
        c = self.cfg
        w, depth = c.hidden_size, (2 * c.num_layers) ** -0.5
        nn.init.normal_(self.embeddings.class_embedding, std=w**-0.5)
        nn.init.normal_(self.embeddings.patch_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.02)
        for layer in self.encoder.layers:
            att, mlp = layer.self_attn, layer.mlp
            for lin, std in ((att.q_proj, w**-0.5 * depth), (att.k_proj, w**-0.5 * depth),
                             (att.v_proj, w**-0.5 * depth), (att.out_proj, w**-0.5),
                             (mlp.fc1, (2 * w) ** -0.5), (mlp.fc2, w**-0.5 * depth)):  # fmt: skip
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
