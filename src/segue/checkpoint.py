"""Checkpoint folders: detect the layout, read tensors with clear errors, build the components.

Two layouts are understood (SPEC section 6):
- official (Wan-AI/Wan2.1-FLF2V-14B-720P): ``config.json`` + (sharded) ``diffusion_pytorch_model*.safetensors``,
  ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl/``, and
  ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``;
- diffusers (``*-diffusers``): ``model_index.json`` + component folders.
Sizes not stated in a config file are inferred from tensor shapes, so smaller checkpoints of the
same architecture load too. Every component is built on the meta device and receives its tensors
by assignment, after every name and shape was checked.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import GenerationDefaults, ImageEncoderConfig, ModelConfig, TextEncoderConfig, json_value
from .errors import CheckpointError

log = logging.getLogger("segue")

OFFICIAL_DIT_CONFIG = "config.json"
OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_T5_TOKENIZER = "google/umt5-xxl"
OFFICIAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
DIT_WEIGHTS = "diffusion_pytorch_model"
OFFICIAL_FILES = (OFFICIAL_DIT_CONFIG, f"{DIT_WEIGHTS}.safetensors[.index.json]", OFFICIAL_VAE, OFFICIAL_T5,
                  OFFICIAL_T5_TOKENIZER + "/", OFFICIAL_CLIP)  # fmt: skip
DIFFUSERS_FILES = (
    "model_index.json",
    "transformer/",
    "vae/",
    "text_encoder/",
    "tokenizer/",
    "image_encoder/",
)


# ---------------------------------------------------------------------------------------------
# Reading tensors.


class TensorSource:
    """Named tensors of one component, read lazily one at a time in the native key names.

    Safetensors shards are renamed key by key (``rename`` maps a file's key to the native key, or None
    to skip it), so the full foreign dict is never held in memory. ``.pth`` files are memory-mapped and
    passed whole through their adapter (which may split tensors, e.g. CLIP's fused qkv), still lazily.
    """

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self._where: dict[str, tuple[Path, str]] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}

    @classmethod
    def from_safetensors(cls, files: list[Path], rename: Callable[[str], str | None] | None = None) -> TensorSource:
        src = cls(", ".join(str(f) for f in files))
        for f in files:
            for key, (shape, dtype) in _safetensors_shapes(f).items():
                native = rename(key) if rename else key
                if native is None:
                    continue
                if native in src._shapes:
                    raise CheckpointError(f"tensor {native} appears twice (in {src._where[native][0]} and {f})")
                src._where[native] = (f, key)
                src._shapes[native] = shape
                src._dtypes[native] = dtype
        return src

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], origin: str) -> TensorSource:
        """From an in-memory (typically memory-mapped) dict already in native names."""
        src = cls(origin)
        src._tensors = tensors
        src._shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        src._dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
        return src

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self._dtypes.values():
            counts[d] = counts.get(d, 0) + 1
        return counts

    def meta_dict(self) -> dict[str, torch.Tensor]:
        """Shape-only stand-ins, for key checks before anything is read."""
        return {k: torch.empty(s, device="meta") for k, s in self._shapes.items()}

    def read(
        self, device: torch.device | str, dtype_for: Callable[[str, torch.Tensor], torch.dtype | None]
    ) -> dict[str, torch.Tensor]:
        """All tensors, each moved to ``device`` and cast per ``dtype_for`` as soon as it is read."""
        from safetensors import safe_open

        out = {k: _convert(t, k, device, dtype_for) for k, t in self._tensors.items()}
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for native, (f, key) in self._where.items():
            by_file.setdefault(f, []).append((native, key))
        for f, items in by_file.items():
            try:
                with safe_open(str(f), framework="pt", device="cpu") as sf:
                    for native, key in items:
                        out[native] = _convert(sf.get_tensor(key), native, device, dtype_for)
            except Exception as e:  # truncated data surfaces only when read
                raise CheckpointError(f"cannot read tensors from {f}: {e}") from None
        return out


def _convert(t: torch.Tensor, name: str, device: Any, dtype_for: Callable) -> torch.Tensor:
    dtype = dtype_for(name, t) or t.dtype
    out = t.to(device=device, dtype=dtype)
    # CPU BLAS kernels pick code paths by alignment, so a tensor at an odd offset inside a safetensors
    # file gives other last bits than the same values elsewhere: copy it to aligned memory so results
    # do not depend on the file layout (the two layouts of one model give the same video).
    if out.device.type == "cpu" and (out.data_ptr() % 64 or not out.is_contiguous()):
        out = out.contiguous().clone()
    return out


_ST_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
}


def _safetensors_shapes(f: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype name of every tensor in a safetensors file, read from its header only."""
    from safetensors import safe_open

    if not f.is_file():
        raise CheckpointError(f"weight file not found: {f}")
    try:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            out = {}
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = sf.get_slice(k)
                out[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower()))
            return out
    except Exception as e:
        raise CheckpointError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_pth(f: Path) -> dict[str, torch.Tensor]:
    """A flat dict of tensors from a .pth, read with weights_only=True (never unpickles code)."""
    if not f.is_file():
        raise CheckpointError(f"weight file not found: {f}")
    try:
        try:  # mmap keeps a 10+ GB .pth out of RAM until each tensor is used
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{f} is not a readable PyTorch weight file (truncated or corrupt?): {e}") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{f} does not hold a flat dict of tensors")
    return dict(sd)


def safetensors_files(folder: Path, stem: str) -> list[Path]:
    """``stem.safetensors`` or the shards listed in ``stem.safetensors.index.json``."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid shard index ({e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file name")
        for key, name in weight_map.items():
            if not is_plain_file_name(name) or not name.endswith(".safetensors"):
                raise CheckpointError(
                    f"{index}: weight_map[{key!r}] = {name!r}; allowed: a .safetensors file name in {folder} "
                    "(no folder part)"
                )
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    if single.is_file():
        return [single]
    raise CheckpointError(f"no weights in {folder}: expected {single.name} or {index.name}")


def is_plain_file_name(name: object) -> bool:
    """Whether ``name`` (read from a file) names an entry straight inside a folder: a non-empty string with no
    folder separator, not ``.`` or ``..``, no NUL. Only such names are joined to a folder."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
        and not Path(name).is_absolute()
    )


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing config file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# Layouts.


@dataclass
class CheckpointPlan:
    """What a folder holds: its layout, the model config, and where each component's tensors are."""

    folder: Path
    layout: str
    config: ModelConfig
    dit: TensorSource
    vae: TensorSource
    text: TensorSource
    image: TensorSource | None
    tokenizer_dir: Path | None  # a folder of tokenizer files, or None when they are in ``tokenizer_files``
    notes: list[str] = field(default_factory=list)
    tokenizer_files: dict[str, str] | None = None  # a bundle's tokenizer files (name -> content)

    def load_tokenizer(self) -> Any:
        """The tokenizer, from its folder or from the bundle's files (``segue.bundle.load_bundle_tokenizer``)."""
        if self.tokenizer_files is not None:
            from .bundle import load_bundle_tokenizer

            return load_bundle_tokenizer(self.tokenizer_files, str(self.folder))
        from .tokenizer import load_tokenizer

        assert self.tokenizer_dir is not None
        return load_tokenizer(self.tokenizer_dir)


def detect_layout(folder: str | Path) -> str:
    """'official' or 'diffusers'; CheckpointError listing the expected files otherwise."""
    p = Path(folder)
    if not p.exists():
        raise CheckpointError(f"checkpoint folder not found: {p}")
    from .bundle import is_bundle

    if is_bundle(p):
        return "segue"
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path is not a folder nor a segue .safetensors bundle: {p}")
    if (p / "model_index.json").is_file():
        return "diffusers"
    if (p / OFFICIAL_DIT_CONFIG).is_file() and (p / OFFICIAL_VAE).is_file():
        return "official"
    present = sorted(x.name + ("/" if x.is_dir() else "") for x in p.iterdir())[:20]
    raise CheckpointError(
        f"{p} is neither an official Wan2.1 folder (expected {', '.join(OFFICIAL_FILES)}) nor a diffusers "
        f"folder (expected {', '.join(DIFFUSERS_FILES)}); found: {', '.join(present) or 'nothing'}"
    )


def plan_checkpoint(folder: str | Path) -> CheckpointPlan:
    folder = Path(folder)
    layout = detect_layout(folder)
    planners = {"official": _plan_official, "diffusers": _plan_diffusers, "segue": _plan_bundle}
    return planners[layout](folder)


def _plan_bundle(path: Path) -> CheckpointPlan:
    """segue's single-file format: components under dit./vae./text./image., config in the metadata."""
    from .bundle import read_bundle_metadata

    config, tok_files = read_bundle_metadata(path)

    def part(prefix: str) -> TensorSource:
        return TensorSource.from_safetensors(
            [path], rename=lambda k: k[len(prefix) :] if k.startswith(prefix) else None
        )

    image = part("image.") if config.image is not None else None
    if not tok_files:
        raise CheckpointError(f"{path}: the bundle holds no tokenizer files (metadata keys tokenizer/...)")
    return CheckpointPlan(
        path, "segue", config, part("dit."), part("vae."), part("text."), image, None, tokenizer_files=tok_files
    )


def _defaults_for(cfg_dit_type: str) -> GenerationDefaults:
    from .config import REGISTRY

    return REGISTRY["flf2v-14b" if cfg_dit_type == "flf2v" else "i2v-14b-720p"].defaults


def _segue_defaults(raw: Mapping[str, Any], fallback: GenerationDefaults, source: Path) -> GenerationDefaults:
    """Generation defaults stored by segue in a config (key ``segue_defaults``) override the fallback."""
    extra = raw.get("segue_defaults")
    if not extra:
        return fallback
    if not isinstance(extra, Mapping):
        raise CheckpointError(f"{source}: segue_defaults must be an object, got {extra!r:.80}")
    unknown = sorted(set(extra) - set(asdict(fallback)))
    if unknown:
        raise CheckpointError(f"{source}: unknown segue_defaults key(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(asdict(fallback))}")  # fmt: skip
    try:
        return GenerationDefaults(**{**asdict(fallback), **{k: _tuples(v) for k, v in extra.items()}})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad segue_defaults: {e}") from None


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _from_file(path: Path, build: Callable[..., Any], *args: Any) -> Any:
    """``build(*args)``, a config read from the file ``path``: a bad value is a CheckpointError naming the file."""
    try:
        return build(*args)
    except CheckpointError:
        raise  # already says what is wrong (a ValueError too: InputError derives from it)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _plan_official(folder: Path) -> CheckpointPlan:
    from .adapters import dit as dit_adapter
    from .adapters import encoders as enc_adapter
    from .adapters import vae as vae_adapter

    raw = read_json(folder / OFFICIAL_DIT_CONFIG)
    dit_src = TensorSource.from_safetensors(safetensors_files(folder, DIT_WEIGHTS))
    vae_src = TensorSource.from_tensors(load_pth(folder / OFFICIAL_VAE), str(folder / OFFICIAL_VAE))
    t5_raw = load_pth(folder / OFFICIAL_T5)
    clip_path = folder / OFFICIAL_CLIP
    clip_src = None
    try:
        dit_cfg = _from_file(folder / OFFICIAL_DIT_CONFIG, dit_adapter.config_from_official, raw, dit_src.shapes)
        vae_cfg = vae_adapter.config_from_shapes(vae_src.shapes)
        text_cfg = enc_adapter.t5_config_from_shapes({k: tuple(v.shape) for k, v in t5_raw.items()})
        t5_src = TensorSource.from_tensors(enc_adapter.t5_official_to_hf(t5_raw), str(folder / OFFICIAL_T5))
        image_cfg = None
        if dit_cfg.image_dim is not None:
            if not clip_path.is_file():
                raise CheckpointError(f"the DiT has an image branch but {clip_path} is missing")
            clip_raw = load_pth(clip_path)
            image_cfg = enc_adapter.clip_config_from_shapes({k: tuple(v.shape) for k, v in clip_raw.items()})
            clip_src = TensorSource.from_tensors(enc_adapter.clip_official_to_hf(clip_raw), str(clip_path))
        defaults = _segue_defaults(raw, _defaults_for(dit_cfg.model_type), folder / OFFICIAL_DIT_CONFIG)
        config = ModelConfig(
            name=folder.name, dit=dit_cfg, vae=vae_cfg, text=text_cfg, image=image_cfg, defaults=defaults
        )
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    tok = folder / OFFICIAL_T5_TOKENIZER
    return CheckpointPlan(folder, "official", config, dit_src, vae_src, t5_src, clip_src, tok)


def _plan_diffusers(folder: Path) -> CheckpointPlan:
    from .adapters import dit as dit_adapter
    from .adapters import encoders as enc_adapter
    from .adapters import vae as vae_adapter

    index = read_json(folder / "model_index.json")
    missing = [d for d in ("transformer", "vae", "text_encoder", "tokenizer") if not (folder / d).is_dir()]
    if missing:
        raise CheckpointError(f"diffusers folder {folder} lacks component folder(s): {', '.join(missing)}")
    t_raw = read_json(folder / "transformer" / "config.json")
    dit_src = _renamed_safetensors(folder / "transformer", DIT_WEIGHTS, dit_adapter.diffusers_to_native)
    vae_src = _renamed_safetensors(folder / "vae", DIT_WEIGHTS, vae_adapter.diffusers_to_native)
    text_src = TensorSource.from_safetensors(safetensors_files(folder / "text_encoder", "model"))
    try:
        dit_cfg = _from_file(folder / "transformer" / "config.json", dit_adapter.config_from_diffusers, t_raw)
        vae_json = folder / "vae" / "config.json"
        vae_cfg = _from_file(vae_json, vae_adapter.config_from_diffusers, read_json(vae_json))
        text_json = folder / "text_encoder" / "config.json"
        text_cfg: TextEncoderConfig = _from_file(text_json, enc_adapter.t5_config_from_hf, read_json(text_json))
        image_cfg: ImageEncoderConfig | None = None
        image_src = None
        if dit_cfg.image_dim is not None:
            if not (folder / "image_encoder").is_dir():
                raise CheckpointError(f"the transformer has an image branch but {folder / 'image_encoder'} is missing")
            image_json = folder / "image_encoder" / "config.json"
            image_cfg = _from_file(image_json, enc_adapter.clip_config_from_hf, read_json(image_json))
            image_src = TensorSource.from_safetensors(
                safetensors_files(folder / "image_encoder", "model"),
                rename=lambda k: None if k.startswith("visual_projection.") else k,
            )
        sched = folder / "scheduler" / "scheduler_config.json"
        fallback = _defaults_for(dit_cfg.model_type)
        if sched.is_file():
            shift = _from_file(sched, json_value, read_json(sched), "flow_shift", float | None, None)
            if shift:
                fallback = replace(fallback, shift=float(shift))
        defaults = _segue_defaults(index, fallback, folder / "model_index.json")
        config = ModelConfig(
            name=folder.name, dit=dit_cfg, vae=vae_cfg, text=text_cfg, image=image_cfg, defaults=defaults
        )
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    return CheckpointPlan(folder, "diffusers", config, dit_src, vae_src, text_src, image_src, folder / "tokenizer")


def _renamed_safetensors(folder: Path, stem: str, adapter: Callable[[dict], dict]) -> TensorSource:
    """Apply a rename-only adapter key by key: run it on an identity dict of the file keys."""
    files = safetensors_files(folder, stem)
    keys = [k for f in files for k in _safetensors_shapes(f)]
    mapping = adapter({k: k for k in keys})  # native key -> foreign key
    if not all(isinstance(v, str) for v in mapping.values()):
        raise TypeError(f"adapter {adapter.__qualname__} must only rename keys for safetensors sources")
    inverse = {foreign: native for native, foreign in mapping.items()}
    return TensorSource.from_safetensors(files, rename=inverse.get)


# ---------------------------------------------------------------------------------------------
# `segue info`.


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit} ({n:,})"
    return str(n)


def describe(folder: str | Path) -> str:
    """A readable report of a checkpoint (folder or bundle): layout, files present or missing, component sizes,
    parameter counts and dtypes, and whether every tensor fits the model. A path that is no checkpoint at all,
    or one that cannot be planned (a damaged file, a wrong-typed config value), is a CheckpointError; tensors
    that do not fit the model are reported in the text."""
    from .models.dit import WanDiT
    from .models.vae import WanVAE

    folder = Path(folder)
    lines = [f"checkpoint: {folder}"]
    layout = detect_layout(folder)
    lines.append(f"layout: {layout}")
    if layout == "segue":
        lines.append(f"file: segue bundle, {folder.stat().st_size / 1e6:.1f} MB")
    else:
        expected = [OFFICIAL_DIT_CONFIG, OFFICIAL_VAE, OFFICIAL_T5, OFFICIAL_T5_TOKENIZER, OFFICIAL_CLIP]
        if layout == "diffusers":
            expected = ["model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "image_encoder",
                        "scheduler"]  # fmt: skip
        missing = [e for e in expected if not (folder / e).exists()]
        lines.append("missing: " + (", ".join(missing) if missing else "nothing"))
    try:
        plan = plan_checkpoint(folder)
    except CheckpointError as e:
        raise CheckpointError(f"cannot plan the model: {e}") from None
    if plan.tokenizer_files is not None:
        lines.append(f"tokenizer: {', '.join(sorted(plan.tokenizer_files))} (inside the bundle)")
    else:
        lines.append(f"tokenizer: {plan.tokenizer_dir}")
    cfg = plan.config
    lines.append(f"model type: {cfg.dit.model_type}")
    d = cfg.defaults
    lines.append(
        f"defaults: {d.frames} frames, max area {d.max_area}, {d.steps} steps, shift {d.shift}, "
        f"guidance {d.guidance}"
        + ("" if d.guidance_steps is None else f" on the first {d.guidance_steps} steps")
        + f", {d.solver}, {d.fps} fps"
    )
    import torch

    with torch.device("meta"):
        modules = {"dit": WanDiT(cfg.dit), "vae": WanVAE(cfg.vae)}
    comps = [("DiT", plan.dit, cfg.dit, modules["dit"]), ("VAE", plan.vae, cfg.vae, modules["vae"]),
             ("text encoder", plan.text, cfg.text, None), ("image encoder", plan.image, cfg.image, None)]  # fmt: skip
    from .weights import check_keys

    for name, src, ccfg, module in comps:
        if src is None:
            lines.append(f"{name}: none")
            continue
        n = sum(math.prod(s) for s in src.shapes.values())
        dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(src.dtype_counts().items()))
        status = "ok"
        if module is not None:
            try:
                check_keys(module, src.meta_dict(), name)
            except CheckpointError as e:
                status = str(e)
        lines.append(f"{name}: {len(src.shapes)} tensors, {_fmt_count(n)} parameters, {dtypes}; keys {status}")
        lines.append(f"  config: {ccfg}")
        lines.append(f"  from: {src.origin}")
    return "\n".join(lines)
