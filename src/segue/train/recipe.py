"""A training run as data: the recipe file (TOML) and its typed, checked form.

A recipe is a chain. It starts from scratch (``[scratch]``: tokenizer, VAE, DiT stages, decoder, a bundle)
or from a bundle (``from = "builtin"``, or ``segue train --from FILE``), then runs its ``[[continue]]``
stages in order, each starting from the bundle the one before wrote. ``segue train --recipe NAME|FILE``
runs it (``segue.train.chain``). Recipes shipped with the package live in ``segue/recipes/`` and are
named without their ``.toml``; any other recipe is read from its path.

Every table is checked before anything trains: an unknown key is refused with the keys allowed there, a
value of the wrong type or out of range is refused with the key's full name, and a TOML syntax error
gives its line and column. docs/training.md describes the keys; ``recipes/default.toml`` uses most of them.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import DiTConfig, GenerationDefaults, ImageEncoderConfig, ModelConfig, TextEncoderConfig, VAEConfig
from ..data.photos import COLLECTIONS
from ..data.synthetic import GROUP_SIZE, LOOP_GROUPS, check_loop_groups, check_loops
from ..errors import InputError
from .flow import MODES

DTYPES = ("float16", "bfloat16", "float32")
# a stage's name is its folder in the run: one plain path component
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str, what: str) -> None:
    """ValueError unless ``name`` can name a run folder (letters, digits, '.', '_', '-'; no path)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"{what} name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")


SAMPLING_KEYS = ("steps", "guidance", "shift", "solver", "guidance_steps")


@dataclass(frozen=True)
class ModelSizes:
    """The architecture a chain trains from scratch (the encoders' sizes are fixed: they are small)."""

    vocab: int
    dim: int
    layers: int
    heads: int
    vae_dim: int
    name: str = "segue"
    z_dim: int = 16
    vae_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_temporal: tuple[bool, ...] = (False, True, True)
    patch: tuple[int, int, int] = (1, 2, 2)

    def config(self) -> ModelConfig:
        """The model's config, with unit latent statistics (the VAE phase measures them)."""
        z = self.z_dim
        text = TextEncoderConfig(vocab_size=self.vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 text_len=64)  # fmt: skip
        image = ImageEncoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, image_size=64,
                                   patch_size=8)  # fmt: skip
        dit = DiTConfig(dim=self.dim, ffn_dim=self.dim * 8 // 3, num_heads=self.heads, num_layers=self.layers,
                        freq_dim=64, text_dim=64, text_len=64, image_dim=64, image_pos_len=2 * image.num_tokens,
                        in_dim=2 * z + 4, out_dim=z, patch_size=self.patch)  # fmt: skip
        vae = VAEConfig(dim=self.vae_dim, z_dim=z, dim_mult=self.vae_mult, temporal_downsample=self.vae_temporal,
                        latent_mean=(0.0,) * z, latent_std=(1.0,) * z)  # fmt: skip
        defaults = GenerationDefaults(frames=17, max_area=64 * 64, steps=25, shift=3.0, guidance=4.0, fps=8,
                                      negative_prompt="")  # fmt: skip
        return ModelConfig(name=self.name, dit=dit, vae=vae, text=text, image=image, defaults=defaults)


@dataclass(frozen=True)
class VAEClips:
    """The clips every VAE phase of the chain trains on (renders of ``frames`` x ``size``, cropped to
    ``crop``), and how: batch, EMA, reconstruction loss, KL weight; ``stats_batches`` batches of 4 measure
    the latent statistics."""

    frames: int = 17
    size: tuple[int, int] = (64, 64)
    crop: tuple[int, int] | None = None
    batch: int = 8
    ema: float = 0.999
    recon: str = "l1"
    kl_weight: float = 1e-6
    loops: str = "any"
    data_length: int = 200_000
    stats_batches: int = 8
    broad: float = 0.0  # share of broad clips (``data.broad``: any colour, training photos); the rest synthetic
    # Single frames beside each clip (``phases.WithStills``): ``stills`` 1-frame crops of a broad clip's frames,
    # a share ``flat_stills`` of them flat fields of random colours. A first keyframe is encoded and decoded
    # alone; one frame in ``frames`` trains that path, a still trains nothing else (docs/broad-data.md).
    stills: int = 0
    flat_stills: float = 0.25
    # share of the broad clips' photos (clips and stills) drawn in other colours (``data.broad.recoloured``)
    recolour: float = 0.0
    # share of the clips replaced by their first single frame held still (the last keyframe's chunk path)
    still_clips: float = 0.0
    photos: str = "pypi"  # the photo collections of the broad clips (``data.photos.COLLECTIONS``)

    def __post_init__(self) -> None:
        check_loops(self.loops, "vae: ")
        if not 0.0 <= self.broad <= 1.0 or not 0.0 <= self.recolour <= 1.0:
            raise ValueError(f"vae: broad and recolour must be in [0, 1], got {self.broad}, {self.recolour}")
        if self.recolour > 0 and self.broad <= 0 and not self.stills:
            raise ValueError("vae: recolour changes broad clips' photos: it needs broad > 0 or stills > 0")
        if self.photos not in COLLECTIONS:
            raise ValueError(f"vae: photos must be one of {', '.join(COLLECTIONS)}, got {self.photos!r}")
        if not 0.0 <= self.still_clips <= 1.0 or (self.still_clips > 0 and not self.stills):
            raise ValueError(f"vae: still_clips is a share in [0, 1] that needs stills > 0, got {self.still_clips}")
        if self.stills < 0 or not 0.0 <= self.flat_stills <= 1.0:
            raise ValueError(f"vae: need stills >= 0 and flat_stills in [0, 1], got {self.stills}, {self.flat_stills}")
        if self.crop is not None and not (self.crop[0] <= self.size[0] and self.crop[1] <= self.size[1]):
            raise ValueError(f"vae: crop {list(self.crop)} does not fit clips of size {list(self.size)}")


@dataclass(frozen=True)
class Stage:
    """One DiT stage: conditioning modes, data size, optimisation."""

    steps: int
    lr: float
    modes: dict[str, float]
    name: str = "dit"
    size: tuple[int, int] = (64, 64)
    frames: int = 17
    batch_size: int = 16
    warmup: int = 0
    caption_dropout: float = 0.1
    # > 0: the last ``cooldown`` steps decay the lr linearly to ``min_lr_ratio * lr`` (a "wsd" schedule);
    # 0: the lr stays constant after the warmup
    cooldown: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_name(self.name, "stage")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes or min(self.modes.values()) < 0 or sum(self.modes.values()) <= 0:
            raise ValueError(f"stage {self.name!r}: modes must be non-negative weights of modes among {MODES}, "
                             f"not all 0; got {self.modes}")  # fmt: skip


@dataclass(frozen=True)
class Scratch:
    """The chain's first model, from random weights: tokenizer, VAE, the DiT stages in order (each from the
    previous one's EMA), the decoder alone on the frozen encoder, a bundle."""

    name: str
    stages: tuple[Stage, ...]
    vae_steps: int
    vae_lr: float = 3e-4
    vae_warmup: int = 200
    decoder_steps: int = 0
    decoder_lr: float = 5e-4
    shift: float = 3.0
    data_length: int = 200_000
    seed: int = 0
    bundle_dtype: str = "float16"
    # VAE latents of this many clips are cached once for the stages at the first stage's size and frame count
    # (the others encode every step); 0: no cache
    cache_clips: int = 10_000
    cache_dtype: str = "float16"
    loops: str = "any"

    def __post_init__(self) -> None:
        check_name(self.name, "scratch")
        check_loops(self.loops, f"scratch {self.name!r}: ")
        if not self.stages:
            raise ValueError(f"scratch {self.name!r}: at least one DiT stage")


@dataclass(frozen=True)
class Continuation:
    """One model made from the one before: optionally the whole VAE, then a DiT stage on a window of fresh
    training clips (cached as latents), then optionally the decoder alone; a new bundle."""

    name: str
    stage: Stage
    cache_start: int  # first training-split index of the stage's latent cache
    cache_clips: int
    shift: float = 3.0
    data_length: int = 200_000
    seed: int = 0
    # share of the training split's 3-clip chunks that are ambiguous groups (same keyframes, other paths)
    ambiguous_fraction: float = 0.25
    cache_dtype: str = "float16"
    loops: str = "any"  # where the clips' circles lie (``synthetic.LOOP_CENTRES``)
    loop_groups: float = LOOP_GROUPS  # share of the ambiguous groups that are loop groups
    # a group's clips share one batch and one draw of noise, sigma and mode (the cache shuffled in chunks)
    paired_groups: bool = False
    text_dropout: float | None = None  # the jointly trained text encoder's dropout; unset: its config's
    sigma_min: float = 0.0  # the DiT trains on noise levels >= this only
    # (first step, weight): the moving shapes' latent cells (grown by ``object_dilate``) weigh this much
    object_weights: tuple[tuple[int, float], ...] = ()
    object_dilate: int = 1
    bundle_dtype: str = "float16"
    insert_blocks: tuple[int, ...] = ()  # a new identity block behind each of these DiT blocks
    vae_steps: int = 0  # the whole VAE first (the latent space moves; its statistics are measured again)
    vae_lr: float = 5e-4
    vae_seed: int = 3
    vae_endpoint_weight: float = 1.0  # the keyframes' error counts this many times in the whole-VAE phase
    # > 0: the synthetic clips' latents held near the bundle's encoder this strongly (``AnchoredVAEObjective``)
    vae_anchor: float = 0.0
    # "skeleton": the VAE starts from its first-frame path trained alone on photo crops (``skeleton``), not
    # from the bundle's VAE: a new latent space, so the DiT stage learns it afresh
    vae_start: str = "bundle"
    skeleton_steps: int = 6000
    skeleton_lr: float = 1e-3
    skeleton_detail_weight: float = 4.0  # the weight of neighbouring pixels' error differences
    broad: float = 0.0  # share of broad clips (``data.broad``) in the DiT stage's cache; the rest synthetic
    recolour: float = 0.0  # share of those broad clips' photos drawn in other colours (``data.broad.recoloured``)
    photos: str = "pypi"  # the photo collections of those broad clips (``data.photos.COLLECTIONS``)
    decoder_steps: int = 0  # the decoder alone on the frozen encoder, at the end
    decoder_lr: float = 5e-4
    decoder_seed: int = 2
    decoder_endpoint_weight: float = 1.0  # the keyframes' error counts this many times
    decoder_cooldown: int = 0
    # > 0: the decoder trains on the latents this model generates for that many clips from generated_start
    decoder_generated: int = 0
    generated_start: int = 0
    generated_repeat: int = 16
    decoder_keep_shapes: bool = False  # shapes kept as the starting decoder renders generated latents
    decoder_dim: int | None = None  # the decoder widened to this base width first
    decoder_blend: float = 1.0  # the decoder shipped this far from the starting one to the trained one
    stage_blend: float = 1.0  # the DiT and encoders shipped this far from the bundle's to the stage's EMA
    # generation defaults written into the new bundle (keys among SAMPLING_KEYS)
    sampling: tuple[tuple[str, float | int | str], ...] = ()

    def __post_init__(self) -> None:
        where = f"continuation {self.name!r}: "
        check_name(self.name, "continuation")
        check_loops(self.loops, where)
        check_loop_groups(self.loop_groups, where)
        problems = _continuation_problems(self)
        if problems:
            raise ValueError(where + problems[0])


# Keys added after run folders and latent caches were recorded, with the value that means what those records
# hold: a record is compared (and a cache's clips recorded) without the keys at that value, so run folders
# and caches made before a key existed stay valid.
LATER_DEFAULTS: dict[str, object] = {
    "loop_groups": LOOP_GROUPS, "recolour": 0.0, "still_clips": 0.0, "photos": "pypi", "vae_start": "bundle",
    "skeleton_steps": 6000, "skeleton_lr": 1e-3, "skeleton_detail_weight": 4.0,
}  # fmt: skip


def without_later_defaults(value: object) -> object:
    """A JSON record without the ``LATER_DEFAULTS`` keys that hold their value there, at any depth."""
    if isinstance(value, dict):
        return {k: without_later_defaults(v) for k, v in value.items()
                if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}  # fmt: skip
    if isinstance(value, list):
        return [without_later_defaults(v) for v in value]
    return value


def _continuation_problems(c: Continuation) -> list[str]:
    """What is inconsistent between a continuation's fields (empty when nothing is)."""
    starts, ow = [s for s, _ in c.object_weights], c.object_weights
    checks = [
        (c.paired_groups and c.cache_start % GROUP_SIZE != 0,
         f"paired_groups needs cache_start on a {GROUP_SIZE}-clip chunk boundary, got {c.cache_start}"),
        (c.text_dropout is not None and not 0.0 <= c.text_dropout < 1.0,
         f"text_dropout must be in [0, 1), got {c.text_dropout}"),
        (bool(c.stage.steps == 0 and (c.object_weights or c.insert_blocks)),
         "a continuation without a DiT stage (steps 0) takes no object_weights or insert_blocks"),
        (not 0 <= c.decoder_cooldown <= c.decoder_steps,
         f"decoder_cooldown must be in 0..decoder_steps ({c.decoder_steps}), got {c.decoder_cooldown}"),
        (c.decoder_generated > 0 and c.decoder_steps <= 0, "decoder_generated needs decoder_steps > 0"),
        (c.vae_anchor > 0 and c.vae_steps <= 0, "vae_anchor needs vae_steps > 0"),
        (c.vae_start not in ("bundle", "skeleton"), f"vae_start must be 'bundle' or 'skeleton', got {c.vae_start!r}"),
        (c.vae_anchor > 0 and c.vae_start == "skeleton",
         "vae_anchor holds latents near the bundle's VAE; a skeleton start (vae_start) leaves that latent space"),
        (c.vae_start == "skeleton" and c.skeleton_steps <= 0, "a skeleton start (vae_start) needs skeleton_steps > 0"),
        (c.vae_start == "skeleton" and c.stage.steps <= 0,
         "a skeleton start (vae_start) makes a new latent space: the DiT stage must learn it (steps > 0)"),
        (c.recolour > 0 and c.broad <= 0, "recolour changes broad clips' photos: it needs broad > 0"),
        (c.photos not in COLLECTIONS, f"photos must be one of {', '.join(COLLECTIONS)}, got {c.photos!r}"),
        (c.vae_endpoint_weight != 1.0 and c.vae_steps <= 0, "vae_endpoint_weight needs vae_steps > 0"),
        (c.broad > 0 and (c.paired_groups or bool(c.object_weights) or c.decoder_generated > 0),
         "broad clips have no groups or tracked shapes: broad > 0 takes no paired_groups, object_weights or "
         "decoder_generated"),
        (c.decoder_dim is not None and c.decoder_steps <= 0, "a widened decoder (decoder_dim) needs decoder_steps > 0"),
        (c.decoder_keep_shapes and not c.decoder_generated, "decoder_keep_shapes needs decoder_generated > 0"),
        (c.decoder_blend != 1.0 and c.decoder_steps <= 0, "decoder_blend below 1 needs decoder_steps > 0"),
        (c.stage_blend != 1.0 and c.stage.steps <= 0, "stage_blend below 1 needs a DiT stage (steps > 0)"),
        (bool(ow) and (starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= c.stage.steps
                       or min(w for _, w in ow) < 1.0),
         f"object_weights must start at step 0, with increasing steps below the stage's {c.stage.steps} and "
         f"weights >= 1; got {ow}"),
        (any(k not in SAMPLING_KEYS for k, _ in c.sampling),
         f"sampling keys {[k for k, _ in c.sampling]} not all among {SAMPLING_KEYS}"),
    ]  # fmt: skip
    return [message for bad, message in checks if bad]


@dataclass(frozen=True)
class Recipe:
    """A whole chain: the clips of its VAE phases, then from scratch or from a bundle, then continuations."""

    name: str
    vae: VAEClips = field(default_factory=VAEClips)
    model: ModelSizes | None = None
    scratch: Scratch | None = None
    continuations: tuple[Continuation, ...] = ()
    start: str | None = None  # "builtin": the chain continues the package's built-in model

    def __post_init__(self) -> None:
        if (self.scratch is None) != (self.model is None):
            raise ValueError("[scratch] and [model] go together: a chain from scratch needs both")
        if self.scratch is not None and self.start is not None:
            raise ValueError("a recipe with [scratch] starts from scratch; `from` is for one without")
        if self.scratch is None and not self.continuations:
            raise ValueError("nothing to train: give [scratch] or at least one [[continue]]")
        anchored = [c.name for c in self.continuations if c.vae_anchor > 0]
        if anchored and self.vae.recon != "mse":  # AnchoredVAEObjective's reconstruction is MSE
            raise ValueError(f"continuation {anchored[0]!r}: vae_anchor trains with recon = \"mse\" in [vae], "
                             f"got {self.vae.recon!r}")  # fmt: skip
        names = [s.name for s in self.stages()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"stage names must differ (each is a run folder), repeated: {', '.join(twice)}")

    def stages(self) -> list[Scratch | Continuation]:
        """The chain's stages in the order they run."""
        return ([self.scratch] if self.scratch is not None else []) + list(self.continuations)


# Allowed ranges by key (the same key means the same thing in every table)
_AT_LEAST_1 = "vocab dim layers heads vae_dim z_dim vae_mult patch frames size crop batch batch_size data_length " \
    "stats_batches generated_repeat decoder_dim"  # fmt: skip
_AT_LEAST_0 = "steps warmup cooldown vae_steps vae_warmup decoder_steps cache_clips cache_start seed vae_seed " \
    "decoder_seed object_dilate insert_blocks decoder_cooldown decoder_generated generated_start kl_weight " \
    "vae_anchor stills skeleton_steps skeleton_detail_weight"  # fmt: skip
_POSITIVE = "lr vae_lr skeleton_lr decoder_lr shift decoder_endpoint_weight vae_endpoint_weight"
# [0, 1]; those of _BELOW_ONE: [0, 1)
_IN_0_1 = "caption_dropout min_lr_ratio ambiguous_fraction sigma_min ema broad flat_stills recolour still_clips"
_IN_0_1_OPEN_LOW = "decoder_blend stage_blend"  # (0, 1]
# key: (low, high, low is open)
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    **dict.fromkeys(_AT_LEAST_1.split(), (1, None, False)),
    **dict.fromkeys(_AT_LEAST_0.split(), (0, None, False)),
    **dict.fromkeys(_POSITIVE.split(), (0, None, True)),
    **dict.fromkeys(_IN_0_1.split(), (0, 1, False)),
    **dict.fromkeys(_IN_0_1_OPEN_LOW.split(), (0, 1, True)),
}
_CHOICES: dict[str, tuple[str, ...]] = {"recon": ("l1", "mse"), "bundle_dtype": DTYPES, "cache_dtype": DTYPES,
                                        "photos": tuple(COLLECTIONS), "vae_start": ("bundle", "skeleton")}  # fmt: skip
# keys whose upper bound is open: [0, 1)
_BELOW_ONE = ("caption_dropout", "ambiguous_fraction", "sigma_min", "ema")


def _check_range(key: str, value: Any, where: str) -> None:
    if key not in _RANGES or isinstance(value, bool) or not isinstance(value, int | float):
        return
    low, high, low_open = _RANGES[key]
    high_open = key in _BELOW_ONE
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise InputError(f"{where}{key}: {value!r} is out of range (allowed: {' and '.join(x for x in (lo, hi) if x)})")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"an array of {_describe(args[0])}"
        return f"an array of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is dict:
        return f"a table of {_describe(args[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _typed(value: Any, hint: Any, key: str, where: str) -> Any:
    """``value`` (from TOML) as ``hint`` wants it, checked; an InputError names ``where + key`` otherwise."""
    origin = typing.get_origin(hint)
    wrong = InputError(f"{where}{key}: expected {_describe(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise wrong
        return build(hint, value, f"{where}{key}.")
    if origin in (typing.Union, types.UnionType):
        return _union(value, typing.get_args(hint), key, where, wrong)
    if origin is tuple:
        return _array(value, typing.get_args(hint), key, where, wrong)
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        return {k: _typed(v, typing.get_args(hint)[1], f"{key}.{k}", where) for k, v in value.items()}
    return _scalar(value, hint, key, where, wrong)


def _union(value: Any, args: tuple, key: str, where: str, wrong: InputError) -> Any:
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # an optional value (TOML has no null: absent means unset)
        return _typed(value, options[0], key, where)
    exact = [o for o in options if type(value) is o]  # an int stays an int where int is allowed
    for option in exact + options:
        try:
            return _typed(value, option, key, where)
        except InputError:
            continue
    raise wrong


def _array(value: Any, args: tuple, key: str, where: str, wrong: InputError) -> tuple:
    repeated = len(args) == 2 and args[1] is Ellipsis
    if isinstance(value, dict) and repeated:  # a table as (key, value) pairs
        value = [[k, v] for k, v in value.items()]
    if not isinstance(value, list):
        raise wrong
    hints = [args[0]] * len(value) if repeated else list(args)
    if len(hints) != len(value):
        raise wrong
    return tuple(_typed(v, h, key, where) for v, h in zip(value, hints))


def _scalar(value: Any, hint: type, key: str, where: str, wrong: InputError) -> Any:
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        value = float(value)
    elif hint is int and isinstance(value, bool):
        raise wrong
    if not isinstance(value, hint):
        raise wrong
    _check_range(key, value, where)
    if key in _CHOICES and value not in _CHOICES[key]:
        raise InputError(f"{where}{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
    return value


def build(cls: type, table: dict[str, Any], where: str = "") -> Any:
    """An instance of the dataclass ``cls`` from a TOML table: unknown keys, missing required keys, wrong
    types and values out of range are InputErrors that name the key (``where`` prefixes it)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in table if k not in fields]
    if unknown:
        raise InputError(f"{where}{unknown[0]}: unknown key; allowed here: {', '.join(fields)}")
    missing = [k for k, f in fields.items() if k not in table and _required(f)]
    if missing:
        raise InputError(f"{where}{missing[0]}: missing (required here: {', '.join(missing)})")
    values = {k: _typed(v, hints[k], k, where) for k, v in table.items()}
    try:
        return cls(**values)
    except ValueError as e:
        raise InputError(f"{where.rstrip('.') or cls.__name__}: {e}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


_TOP = ("name", "from", "model", "vae", "scratch", "continue")


def parse_recipe(text: str, source: str) -> Recipe:
    """A recipe from TOML ``text``; every error names ``source`` (a file, or a shipped recipe's name)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{source}: not valid TOML: {e}") from None
    where = f"{source}: "
    unknown = [k for k in doc if k not in _TOP]
    if unknown:
        raise InputError(f"{where}{unknown[0]}: unknown key; allowed at the top: {', '.join(_TOP)}")
    name = _typed(doc.get("name", Path(source).stem), str, "name", where)
    start = doc.get("from")
    if start is not None and start != "builtin":
        raise InputError(f'{where}from: {start!r}; allowed: "builtin" (any other bundle: segue train --from FILE)')
    scratch = doc.get("scratch")
    continues = doc.get("continue", [])
    if not isinstance(continues, list):
        raise InputError(f"{where}continue: expected an array of tables ([[continue]]), got {continues!r}")
    try:
        return Recipe(
            name=name,
            vae=_typed(doc.get("vae", {}), VAEClips, "vae", where),
            model=None if "model" not in doc else _typed(doc["model"], ModelSizes, "model", where),
            scratch=None if scratch is None else _typed(scratch, Scratch, "scratch", where),
            continuations=tuple(_typed(c, Continuation, f"continue[{i}]", where) for i, c in enumerate(continues)),
            start=start,
        )
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"{where}{e}") from None


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in the package (``segue/recipes/NAME.toml``)."""
    folder = resources.files("segue") / "recipes"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe(recipe: str | Path) -> Recipe:
    """A recipe by its path, or by the name of a shipped one (``default``)."""
    path = Path(recipe)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read the recipe ({e})") from None
        return parse_recipe(text, str(path))
    name = str(recipe)
    if NAME.fullmatch(name) and name in shipped_recipes():
        text = (resources.files("segue") / "recipes" / f"{name}.toml").read_text()
        return parse_recipe(text, f"recipe {name!r}")
    raise InputError(f"--recipe {name}: no such file, and no shipped recipe of that name "
                     f"(shipped: {', '.join(shipped_recipes())})")  # fmt: skip
