"""fp8 (float8_e4m3fn) weights for the DiT's big Linear layers, applied from outside the model.

``quantize_fp8(dit)`` swaps the Linear layers inside the blocks (self-attention q/k/v/o, cross-attention
q/k/v/o/k_img/v_img, FFN) for ``FP8Linear``: e4m3 weights (clamped to +-448, rounded to nearest) and fp32
scales, one per output channel or one per tensor. Everything small and precision-critical keeps its dtype:
norms, modulation, time/text/image embeddings, patch embedding and head are not touched.

Forward, two paths:
- fp8 matmul (``torch._scaled_mm``) on CUDA GPUs of compute capability >= 8.9 (Ada, Hopper): the activation
  is quantized on the fly (per tensor, or per row with per-channel weights) and multiplied in fp8 with fp32
  accumulation. Lossy in both operands, about 2x the bf16 matmul throughput.
- weight-only: the weight is dequantized to the layer's compute dtype and multiplied there. Only the weights
  are lossy; it halves the weight memory wherever it runs (CPU, older GPUs).

State dict: ``<layer>.weight`` holds the e4m3 tensor and ``<layer>.scale_weight`` the fp32 scale ([out, 1]
per channel, [] per tensor), so a quantized model saves and loads like any other (safetensors stores
F8_E4M3). To load such a file: build the DiT on meta, ``quantize_fp8`` it (meta stays meta), then
``load_state_dict(sd, assign=True)``.

Order with other features: merge LoRAs before quantizing (``segue.lora`` refuses fp8 layers), and do not
cast the model (``.to(dtype)``, ``apply_dtype_policy``) afterwards: that would turn the e4m3 codes into
plain numbers without their scales; the layer checks this and raises.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
GRANULARITIES = ("channel", "tensor")

# Linear layers inside each block that get fp8 weights (official names, relative to ``blocks.i``;
# ``self_attn.qkv`` is the fused projection of segue.accel.fuse).
BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "self_attn.qkv",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
    "ffn.0", "ffn.2",
)  # fmt: skip

# Smallest scale: keeps all-zero rows (and underflowing amax) from dividing by zero.
_MIN_SCALE = 1e-12


def quantize_weight(weight: Tensor, granularity: str = "channel") -> tuple[Tensor, Tensor]:
    """[out, in] weight -> (e4m3 codes [out, in], fp32 scale [out, 1] or []) with weight ~= codes * scale.

    The scale maps the largest magnitude (of a row, or of the tensor) to 448; the division is done in fp32
    and the cast to e4m3 rounds to nearest even.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if granularity == "channel" else w.abs().amax()
    scale = amax.clamp(min=_MIN_SCALE * E4M3_MAX) / E4M3_MAX
    codes = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale


def _activation_scale(x: Tensor, rowwise: bool) -> Tensor:
    """Dynamic fp32 scale of a [M, K] activation: per row [M, 1] or per tensor []."""
    amax = x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().amax()
    return amax.float().clamp(min=_MIN_SCALE * E4M3_MAX) / E4M3_MAX


def _device_has_fp8_mm(device: torch.device) -> bool:
    """True where torch._scaled_mm runs: CUDA compute capability >= 8.9, or torch's CPU kernel; on meta
    (shapes only) too, so that the memory estimate traces the fp8-matmul path a GPU takes."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type in ("cpu", "meta")


class FP8Linear(nn.Module):
    """A Linear with e4m3 weights and fp32 scales; computes in ``compute_dtype`` (the original weight dtype).

    ``scaled_mm``: None = fp8 matmul on CUDA >= 8.9 only, True = wherever torch has the kernel (CUDA >= 8.9
    or CPU; used by the tests), False = always weight-only.
    """

    in_features: int
    out_features: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        granularity: str = "channel",
        compute_dtype: torch.dtype = torch.bfloat16,
        scaled_mm: bool | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.in_features, self.out_features = in_features, out_features
        self.granularity = granularity
        self.compute_dtype = compute_dtype
        self.scaled_mm = scaled_mm
        # Stored straight in _parameters: ``weight`` is also a property (below) that the attention code reads.
        codes = torch.empty(out_features, in_features, dtype=E4M3, device=device)
        self._parameters["weight"] = nn.Parameter(codes, requires_grad=False)
        scale_shape = (out_features, 1) if granularity == "channel" else ()
        self.register_buffer("scale_weight", torch.ones(scale_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "channel", scaled_mm: bool | None = None) -> FP8Linear:
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, granularity, w.dtype, scaled_mm, w.device
        )
        if not w.is_meta:
            codes, scale = quantize_weight(w, granularity)
            layer._parameters["weight"] = nn.Parameter(codes, requires_grad=False)
            layer.scale_weight = scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """The dequantized weight in ``compute_dtype``. The model reads ``o.weight.dtype`` for the attention
        dtype; the e4m3 codes themselves are ``codes`` (and ``weight`` in the state dict)."""
        return self.dequantize()

    @property
    def codes(self) -> Tensor:
        return self._parameters["weight"]  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """codes * scale in fp32, cast to ``dtype`` (default: compute_dtype). [out, in]."""
        self._check_codes()
        return (self.codes.float() * self.scale_weight.float()).to(dtype or self.compute_dtype)

    def _check_codes(self) -> None:
        if self.codes.dtype != E4M3:
            raise RuntimeError(
                f"FP8Linear weight is {self.codes.dtype}, not float8_e4m3fn: the model was cast after "
                "quantize_fp8 (model.to(dtype) or apply_dtype_policy); cast before quantizing instead"
            )

    def _use_scaled_mm(self, x: Tensor) -> bool:
        if self.scaled_mm is False or self.in_features % 16 or self.out_features % 16:
            return False
        if self.scaled_mm is None and x.device.type != "cuda":
            return False
        return _device_has_fp8_mm(x.device)

    def forward(self, x: Tensor) -> Tensor:
        self._check_codes()
        x = x.to(self.compute_dtype)
        if not self._use_scaled_mm(x):
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            return F.linear(x, self.dequantize(), bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        rowwise = self.granularity == "channel"
        scale_a = _activation_scale(x2, rowwise)  # [M, 1] or []
        xq = (x2.float() / scale_a).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        scale_b = self.scale_weight.float().reshape(1, -1) if rowwise else self.scale_weight.float()
        # Row-wise scaling needs a bf16 output; per-tensor takes the half dtypes too.
        half = self.compute_dtype in (torch.bfloat16, torch.float16)
        out_dtype = self.compute_dtype if half and not rowwise else torch.bfloat16
        # codes [N, K] row-major: .t() is the column-major [K, N] operand _scaled_mm wants
        out = torch._scaled_mm(xq, self.codes.t(), scale_a, scale_b, out_dtype=out_dtype)  # [M, N]
        out = out.to(self.compute_dtype)
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"granularity={self.granularity}, compute_dtype={self.compute_dtype}, scaled_mm={self.scaled_mm}"
        )


def fp8_targets(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Names of the block Linear layers ``quantize_fp8`` replaces (``skip``: fnmatch patterns on names)."""
    patterns = tuple(skip)
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
            continue
        if ".".join(parts[2:]) not in BLOCK_LINEARS or not isinstance(module, nn.Linear):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        names.append(name)
    return names


@torch.no_grad()
def quantize_fp8(
    dit: nn.Module,
    granularity: str = "channel",
    scaled_mm: bool | None = None,
    skip: Iterable[str] = (),
) -> nn.Module:
    """Replace the blocks' big Linear layers of ``dit`` by FP8Linear, in place; returns ``dit``.

    ``skip``: fnmatch patterns of layer names to keep, e.g. ``("blocks.0.*", "*.ffn.2")``. Works on a meta
    model too (then load an fp8 state dict with ``assign=True``). Layers already in fp8 are left as they are.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    for name in fp8_targets(dit, skip):
        parent_name, _, child = name.rpartition(".")
        parent = dit.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, FP8Linear.from_linear(linear, granularity, scaled_mm))
    return dit


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (fp8 codes count one byte each)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
