"""The umT5 encoder stack: Wan2.1's text encoder network (umT5-XXL at full size).

What it computes (the reference's ``wan/modules/t5.py`` encoder, and transformers' ``UMT5EncoderModel``):

- token embedding, then per block: RMS norm -> self-attention -> residual, RMS norm -> gated-GELU FFN ->
  residual; a final RMS norm. No absolute positions, no biases anywhere.
- attention scores are ``q . k`` (no 1/sqrt(d) scaling) plus a learned relative position bias. Unlike T5,
  umT5 gives EVERY layer its own bias table ``[buckets, heads]``; the bucket of a (query, key) pair depends
  only on ``key - query``: half the buckets for keys after the query, half before; within each half, exact
  distances below ``buckets/4`` and log-spaced ones up to ``max_distance``.
- the RMS norm has no mean subtraction and no bias; the FFN is ``wo(gelu_tanh(wi_0 x) * wi_1 x)``.
- padding keys (mask 0) are masked out of every attention row.

The module and parameter names follow transformers' (``shared``, ``encoder.block.i.layer.0.SelfAttention.q``,
``layer.1.DenseReluDense.wi_0``, ...) because that is segue's stored layout for this encoder: diffusers
folders and segue bundles hold these names, the official ``.pth`` is renamed to them by
``segue.adapters.encoders``. The embedding is one module under two names (``shared`` and
``encoder.embed_tokens``): both keys are in the state dict, one tensor is stored.

The arithmetic is the same op for op as transformers' SDPA path (the bias folded into a float mask), so a
checkpoint gives bit-identical features; dropout sits where transformers puts it (jointly trained encoders).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TextEncoderConfig

# umT5's dropout rate (its config's ``dropout_rate``): active only in train mode (joint training).
DROPOUT = 0.1


def gelu_tanh(x: Tensor) -> Tensor:
    """The tanh approximation of GELU written out as T5 uses it ("gelu_new"): not ``F.gelu(approximate=
    "tanh")``, whose fused kernel rounds differently."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bucket index of each ``key - query`` distance for bidirectional attention (int64, same shape)."""
    half = num_buckets // 2
    buckets = (relative > 0).to(torch.long) * half  # keys after the query use the upper half
    distance = torch.abs(relative)
    exact = half // 2
    is_small = distance < exact
    # log-spaced buckets from `exact` up to max_distance (distance 0 gives -inf here, masked by is_small)
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (half - exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, half - 1))
    return buckets + torch.where(is_small, distance, large)


def embedding(num: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` left uninitialised (``init_weights`` fills it): its default init, a normal draw,
    would run PyTorch's Python reference on the meta device, which imports torch._dynamo (seconds, and a
    cache folder in TMPDIR)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def clamp_fp16(x: Tensor) -> Tensor:
    """Keep a float16 residual stream finite (as transformers does after each sub-layer); other dtypes pass."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square (computed in float32), no mean, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # [B, L, C] -> [B, L, C]
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)  # [B, L, 1]
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class SelfAttention(nn.Module):
    """Multi-head self-attention with this layer's relative position bias and no score scaling."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.relative_attention_bias = embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.dropout = DROPOUT  # on the attention weights, in train mode only

    def forward(self, x: Tensor, buckets: Tensor, keep: Tensor | None) -> Tensor:
        """x [B, L, C]; buckets [L, L] (int64); keep [B, 1, L, L] (bool, False = padding key) or None."""
        b, n = x.shape[:2]
        q = self.q(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        k = self.k(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        v = self.v(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        bias = self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)  # [1, H, L, L]
        if keep is None:
            scores_bias = bias.contiguous()
        else:  # padding keys get the lowest finite value, so they get no weight after the softmax
            lowest = max(torch.finfo(k.dtype).min, torch.finfo(bias.dtype).min)
            scores_bias = torch.where(keep, bias, lowest).contiguous()  # [B, H, L, L]
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=scores_bias, dropout_p=p, scale=1.0, is_causal=False)
        out = out.reshape(out.shape[0], -1, n, self.head_dim).transpose(1, 2).contiguous()  # [B, L, H, D]
        return self.o(out.reshape(b, n, -1).contiguous())  # [B, L, C]


class GatedFFN(nn.Module):
    """``wo(gelu_tanh(wi_0 x) * wi_1 x)``: wi_0 is the GELU side, wi_1 the linear side."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: Tensor) -> Tensor:  # [B, L, C] -> [B, L, C]
        h = gelu_tanh(self.wi_0(x)) * self.wi_1(x)  # [B, L, F]
        h = self.dropout(h)
        return self.wo(h.to(self.wo.weight.dtype))  # `wo` may be kept in another dtype than the rest


class AttentionLayer(nn.Module):
    """Pre-norm self-attention sub-layer with its residual (transformers' ``layer.0``)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.SelfAttention = SelfAttention(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: Tensor, buckets: Tensor, keep: Tensor | None) -> Tensor:  # [B, L, C] -> [B, L, C]
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), buckets, keep))


class FeedForwardLayer(nn.Module):
    """Pre-norm gated FFN sub-layer with its residual (transformers' ``layer.1``)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.DenseReluDense = GatedFFN(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: Tensor) -> Tensor:  # [B, L, C] -> [B, L, C]
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class Block(nn.Module):
    """One encoder block: ``layer`` = [self-attention, FFN]."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(cfg), FeedForwardLayer(cfg)])

    def forward(self, x: Tensor, buckets: Tensor, keep: Tensor | None) -> Tensor:  # [B, L, C] -> [B, L, C]
        x = clamp_fp16(self.layer[0](x, buckets, keep))
        return clamp_fp16(self.layer[1](x))


class Stack(nn.Module):
    """Embedding lookup, the blocks and the final norm (transformers' ``encoder``)."""

    def __init__(self, cfg: TextEncoderConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids [B, L] (int64), mask [B, L] (1 = token, 0 = padding) -> features [B, L, C]."""
        x = self.embed_tokens(ids)  # [B, L, C]
        b, n = ids.shape
        keep = None
        if mask is not None and not bool(mask.all()):  # without padding, no mask at all
            keep = mask.bool()[:, None, None, :].expand(b, 1, n, n)  # [B, 1, L, L], keys only
        pos = torch.arange(n, dtype=torch.long, device=ids.device)
        relative = pos[None, :] - pos[:, None]  # key - query, [L, L]
        buckets = relative_position_bucket(
            relative, self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance
        )  # [L, L], the same for every layer; each layer has its own table
        x = self.dropout(x)
        for block in self.block:
            x = block(x, buckets, keep)
        return self.dropout(self.final_layer_norm(x))  # [B, L, C]


class UMT5Encoder(nn.Module):
    """The umT5 encoder: ``shared`` embedding (also ``encoder.embed_tokens``) and the ``encoder`` stack."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared = embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, self.shared)
        self.init_weights()

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:  # [B, L] -> [B, L, C]
        return self.encoder(ids, mask)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Mesh-TensorFlow's T5 initialisation (as transformers): embedding N(0, 1), each matrix N(0, 1/fan),
        q with 1/(d_model * d_kv), norms 1. For a model trained from scratch; loading replaces it all."""
        if self.shared.weight.is_meta:
            return  # nothing to fill
        c = self.cfg
        nn.init.normal_(self.shared.weight, std=1.0)
        for block in self.encoder.block:
            att, ffn = block.layer[0].SelfAttention, block.layer[1].DenseReluDense
            nn.init.normal_(att.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
            nn.init.normal_(att.k.weight, std=c.d_model**-0.5)
            nn.init.normal_(att.v.weight, std=c.d_model**-0.5)
            nn.init.normal_(att.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
            nn.init.normal_(att.relative_attention_bias.weight, std=c.d_model**-0.5)
            nn.init.normal_(ffn.wi_0.weight, std=c.d_model**-0.5)
            nn.init.normal_(ffn.wi_1.weight, std=c.d_model**-0.5)
            nn.init.normal_(ffn.wo.weight, std=c.d_ff**-0.5)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
