"""Typed configuration for every component, plus a registry of named sizes.

Configs are plain frozen dataclasses validated in ``__post_init__`` (ValueError on bad values).
Sizes that a checkpoint does not state in a config file are inferred from tensor shapes by the
adapters in ``segue.adapters``; the registry below names the real sizes and the tiny test sizes.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# Latent normalisation of the Wan2.1 VAE: z = (mu - mean) / std (SPEC section 4).
WAN_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# The reference's shared Chinese negative prompt (wan/configs/shared_config.py); FLF2V prepends
# "镜头切换，镜头晃动，" when the user gives none.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
FLF2V_NEGATIVE_PROMPT = "镜头切换，镜头晃动，" + WAN_NEGATIVE_PROMPT


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


_NAMES = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"),
          bool: ("a boolean (true/false)", "booleans"), str: ("a string", "strings")}  # fmt: skip


def _type_name(tp: Any, plural: bool = False) -> str:
    """How an annotation reads in an error: 'an integer', 'a list of 3 integers', 'an integer or null'."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0], plural=True)}"
        return f"a list of {len(args)} {_type_name(args[0], plural=True)}"
    names = _NAMES.get(tp, (f"a {getattr(tp, '__name__', tp)}", f"{getattr(tp, '__name__', tp)}s"))
    return names[plural]


def _fits(value: Any, tp: Any) -> bool:
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp)


_REQUIRED: Any = object()


def json_value(data: Mapping[str, Any], key: str, tp: Any, default: Any = _REQUIRED) -> Any:
    """``data[key]`` (a config file's value) if it has type ``tp`` (JSON lists read as tuples), else ``default``
    when the key is absent; ValueError naming the key, the value and what is allowed otherwise. Nothing is
    coerced: ``"32"`` is not an integer."""
    if key not in data:
        if default is _REQUIRED:
            raise ValueError(f"{key} is missing (it must be {_type_name(tp)})")
        return default
    value = data[key]
    if isinstance(value, list):
        value = tuple(value)
    if not _fits(value, tp):
        shown = repr(list(value) if isinstance(value, tuple) else value)
        raise ValueError(f"{key} must be {_type_name(tp)}, got {shown[:80]}")
    if typing.get_origin(tp) is tuple and float in typing.get_args(tp):
        return tuple(float(v) for v in value)
    return float(value) if tp is float else value


def check_field_types(obj: Any) -> None:
    """ValueError naming the first field of a config dataclass whose value has the wrong type: configs come
    from JSON files, where ``"dim": "32"`` or ``"z_dim": "sixteen"`` must be refused, not coerced."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _fits(value, hints[f.name]):
            shown = repr(list(value) if isinstance(value, tuple) else value)
            raise ValueError(f"{f.name} must be {_type_name(hints[f.name])}, got {shown[:80]}")


@dataclass(frozen=True)
class DiTConfig:
    """Wan DiT denoiser. ``image_dim`` None means no image branch (text-to-video);
    ``image_pos_len`` set means the FLF2V learned position table ``img_emb.emb_pos``."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 36
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_dim: int | None = 1280
    image_pos_len: int | None = 514
    rope_max_len: int = 1024

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len"):
            _positive(name, getattr(self, name))
        for name in ("in_dim", "out_dim", "rope_max_len"):
            _positive(name, getattr(self, name))
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim {self.head_dim} must be even and at least 6 for 3-D RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints, got {self.patch_size}")
        if self.image_pos_len is not None and self.image_dim is None:
            raise ValueError("image_pos_len needs an image branch (image_dim)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def model_type(self) -> str:
        if self.image_dim is None:
            return "t2v"
        return "flf2v" if self.image_pos_len is not None else "i2v"


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal 3-D VAE (4x time, 8x space)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN_LATENT_STD
    # the decoder's base width (diffusers' ``decoder_base_dim``); None: ``dim``, as in every Wan2.1 checkpoint
    decoder_dim: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("dim", "z_dim", "num_res_blocks"):
            _positive(name, getattr(self, name))
        if self.decoder_dim is not None:
            _positive("decoder_dim", self.decoder_dim)
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.dim_mult) - 1} entries for dim_mult "
                f"{self.dim_mult}, got {self.temporal_downsample}"
            )
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"latent_mean/latent_std need {self.z_dim} values each")
        if min(self.latent_std) <= 0:
            raise ValueError("latent_std values must be positive")

    @property
    def decoder_width(self) -> int:
        return self.dim if self.decoder_dim is None else self.decoder_dim

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5 encoder (``segue.models.umt5``; transformers' ``UMT5EncoderModel`` architecture)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    text_len: int = 512

    def __post_init__(self) -> None:
        check_field_types(self)
        for f in fields(self):
            if f.name != "layer_norm_epsilon":
                _positive(f.name, getattr(self, f.name))


# The MLP activations a CLIP vision config may name (transformers' names; ViT-H/14 uses "gelu").
CLIP_ACTIVATIONS = ("gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class ImageEncoderConfig:
    """CLIP ViT visual tower (``segue.models.clip_vision``; transformers' ``CLIPVisionModel`` architecture)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size"):
            _positive(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {', '.join(CLIP_ACTIVATIONS)}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class GenerationDefaults:
    """Per-model generation defaults (CLI and API fall back to these)."""

    frames: int = 81
    max_area: int = 1280 * 720
    steps: int = 50
    shift: float = 16.0
    guidance: float = 5.0
    solver: str = "unipc"
    fps: int = 16
    negative_prompt: str = FLF2V_NEGATIVE_PROMPT
    # guidance on the first this many steps only, the conditional velocity alone after; None: every step
    guidance_steps: int | None = None
    # what a trained model saw in training (frames per clip, (height, width)); None: not recorded. Generation
    # outside it warns in one line (``Pipeline.resolve``): a small model does not carry over to other sizes.
    trained_frames: int | None = None
    trained_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"default frames must be 4n+1, got {self.frames}")
        if self.guidance_steps is not None and self.guidance_steps < 1:
            raise ValueError(f"default guidance_steps must be >= 1 or None, got {self.guidance_steps}")
        for name in ("max_area", "steps", "shift", "fps"):
            _positive(name, getattr(self, name))
        if self.trained_frames is not None and self.trained_frames < 1:
            raise ValueError(f"trained_frames must be >= 1 or None, got {self.trained_frames}")
        if self.trained_size is not None and (len(self.trained_size) != 2 or min(self.trained_size) < 1):
            raise ValueError(f"trained_size must be (height, width) >= 1 or None, got {self.trained_size}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole model: the four components and its generation defaults."""

    name: str
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig | None = field(default_factory=ImageEncoderConfig)
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.dit.text_dim != self.text.d_model:
            raise ValueError(f"DiT text_dim {self.dit.text_dim} != text encoder width {self.text.d_model}")
        if self.dit.image_dim is not None:
            if self.image is None:
                raise ValueError("the DiT has an image branch but no image encoder is configured")
            if self.dit.image_dim != self.image.hidden_size:
                raise ValueError(f"DiT image_dim {self.dit.image_dim} != image encoder width {self.image.hidden_size}")
            frames_seen = 2 if self.dit.image_pos_len is not None else 1
            if self.dit.image_pos_len not in (None, frames_seen * self.image.num_tokens):
                raise ValueError(f"image_pos_len {self.dit.image_pos_len} != 2 x {self.image.num_tokens} CLIP tokens")
        z = self.vae.z_dim
        cond = z + 4 if self.dit.image_dim is not None else 0  # mask (4) + conditioning latent
        if self.dit.in_dim != z + cond or self.dit.out_dim != z:
            raise ValueError(
                f"DiT in/out ({self.dit.in_dim}/{self.dit.out_dim}) do not fit VAE z_dim {z} (expected {z + cond}/{z})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        def tup(x: Any) -> Any:
            return tuple(x) if isinstance(x, list) else x

        def build(kind: type, data: dict[str, Any] | None) -> Any:
            if data is None:
                return None
            return kind(**{k: tup(v) for k, v in data.items()})

        return cls(
            name=d["name"],
            dit=build(DiTConfig, d["dit"]),
            vae=build(VAEConfig, d["vae"]),
            text=build(TextEncoderConfig, d["text"]),
            image=build(ImageEncoderConfig, d.get("image")),
            defaults=build(GenerationDefaults, d["defaults"]),
        )


# ---------------------------------------------------------------------------------------------
# Registry of named sizes.

_TINY_TEXT = TextEncoderConfig(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
_TINY_IMAGE = ImageEncoderConfig(hidden_size=160, intermediate_size=320, num_layers=3, num_heads=2)
_TINY_VAE = VAEConfig(dim=8, z_dim=16)
_TINY_DIT = DiTConfig(
    dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, image_dim=160,
    image_pos_len=2 * 257, in_dim=36, out_dim=16,
)  # fmt: skip
_TINY_DEFAULTS = GenerationDefaults(frames=9, max_area=64 * 64, steps=4, shift=5.0, guidance=5.0)

REGISTRY: dict[str, ModelConfig] = {
    "flf2v-14b": ModelConfig(name="flf2v-14b"),
    "i2v-14b-720p": ModelConfig(
        name="i2v-14b-720p",
        dit=DiTConfig(image_pos_len=None),
        defaults=GenerationDefaults(steps=40, shift=5.0, negative_prompt=WAN_NEGATIVE_PROMPT),
    ),
    "i2v-14b-480p": ModelConfig(
        name="i2v-14b-480p",
        dit=DiTConfig(image_pos_len=None),
        defaults=GenerationDefaults(max_area=832 * 480, steps=40, shift=3.0, negative_prompt=WAN_NEGATIVE_PROMPT),
    ),
    "tiny-flf2v": ModelConfig(
        name="tiny-flf2v",
        dit=_TINY_DIT,
        vae=_TINY_VAE,
        text=_TINY_TEXT,
        image=_TINY_IMAGE,
        defaults=_TINY_DEFAULTS,
    ),  # fmt: skip
    "tiny-i2v": ModelConfig(
        name="tiny-i2v",
        dit=replace(_TINY_DIT, image_pos_len=None),
        vae=_TINY_VAE,
        text=_TINY_TEXT,
        image=_TINY_IMAGE,
        defaults=replace(_TINY_DEFAULTS, negative_prompt=WAN_NEGATIVE_PROMPT),
    ),  # fmt: skip
}


def get_config(name: str) -> ModelConfig:
    """Look up a named size; raises ValueError naming the known sizes."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
