"""LoRA files for the Wan DiT, merged into the weights: ``load_lora(dit, path)`` / ``unload_lora(dit, info)``.

Accepted key layouts (a file may mix suffix styles; the names map onto the official parameter names):

(a) diffusers / PEFT: ``transformer.blocks.N.attn1.to_q.lora_A.weight`` + ``lora_B.weight`` (attn1 = self,
    attn2 = cross, ``add_k_proj``/``add_v_proj`` = ``k_img``/``v_img``, ``ffn.net.0.proj``/``ffn.net.2``),
    ``lora_B.bias`` = a bias delta (PEFT ``lora_bias``);
(b) official names, ``diffusion_model.`` prefix: ``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` or
    ``lora_down``/``lora_up``, optional ``.alpha``, and the full deltas of the distilled LoRAs (lightx2v,
    CausVid extractions): ``X.diff`` (added to ``X.weight``, or to the parameter ``X`` itself, e.g. a norm
    weight), ``X.diff_b`` (added to ``X.bias``), ``blocks.N.diff_m`` (added to ``blocks.N.modulation``);
(c) kohya / ComfyUI / musubi: ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` + ``.alpha``, the module
    path written with underscores.

Merge rule, per parameter W (Linear [out, in] or Conv [out, in, k...]), computed in fp32 and cast back:
``W += scale * (alpha / rank) * up @ down`` (alpha defaults to the rank), ``W += scale * diff``,
``bias += scale * diff_b``. ``scale`` is the LoRA strength; it scales the full deltas too (as ComfyUI).

Unloading. ``LoraInfo`` keeps a CPU copy of every parameter the LoRA changed, as it was before the merge, in
its own dtype (``exact=True``, the default): ``unload_lora`` restores those bits exactly. This costs host
memory equal to the touched weights (about 26 GB of bf16 for a LoRA on every block Linear of the 14B model);
``exact=False`` keeps only the LoRA's own tensors and subtracts the recomputed delta instead (off by one
rounding of the weight dtype). LoRAs stack; unloading one that is not the last loaded restores the ones
above it, removes it and merges the others again, so the result equals loading only the others, in order.

Merged weights cannot be fp8 (``segue.accel.fp8``): load LoRAs first, then quantize.

Few-step distilled LoRAs (lightx2v "StepDistill-CfgDistill", CausVid): 4 steps, no CFG pass (guidance 1),
the stochastic ``lcm`` solver: ``FEW_STEP`` below. The lightx2v recipe for Wan2.1 (its
``wan_i2v_distill_lora_4step_cfg.json``: 4 steps, ``enable_cfg`` false, ``sample_shift`` 5) takes
``denoising_step_list`` [1000, 750, 500, 250] on the grid ``linspace(1, 0, 1001)[:-1]`` shifted by 5: sigmas
1.0, 0.9375, 0.8333, 0.625, timesteps 1000, 937.5, 833.33, 625 (floats); CausVid's 4-step config warps the
same four points with shift 8 (pass ``shift=8``). Each step takes ``x0 = x - sigma * v`` and re-noises it to the next
sigma with fresh Gaussian noise, the last step returning x0: segue's ``lcm`` solver, on exactly that grid
(float32 timesteps), its noise drawn from a CPU generator seeded from the generation's seed. This is the
sampler of the distillation (CausVid, Self-Forcing) and of lightx2v until Nov 2025; lightx2v's scheduler now
steps deterministically (``x0 + sigma_next * v``), which ``euler`` approximates (its grid starts at timestep
999, not 1000).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters.dit import native_to_diffusers
from .errors import InputError

# Recommended settings for few-step distilled LoRAs (lightx2v 4-step, CausVid): see the module docstring.
FEW_STEP = dict(steps=4, guidance=1.0, shift=5.0, solver="lcm")

# Key prefixes stripped before mapping (diffusers pipelines, official/ComfyUI files, PEFT wrappers).
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
_KOHYA_PREFIX = "lora_unet_"
# Key suffix -> (role, what it changes). Longest first: ".diff_b" before ".diff".
_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_B.bias", "bias"),
    (".alpha", "alpha"),
    (".diff_b", "bias"),
    (".diff_m", "modulation"),
    (".diff", "diff"),
)
_MAX_LISTED = 20


@dataclass
class _Term:
    """One contribution to a parameter: low rank (up @ down * factor) or full (diff * factor)."""

    factor: float
    full: Tensor | None = None
    up: Tensor | None = None
    down: Tensor | None = None

    def delta(self, shape: torch.Size, device: torch.device) -> Tensor:
        if self.full is not None:
            return self.full.to(device=device, dtype=torch.float32) * self.factor
        assert self.up is not None and self.down is not None
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)  # [out, r]
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)  # [r, in*k]
        return (up @ down).mul_(self.factor).view(shape)


@dataclass(eq=False)
class LoraInfo:
    """What ``load_lora`` merged: enough to undo it. ``params``: the official names it changed."""

    source: str
    scale: float
    params: list[str]
    rank: int | None
    skipped: list[str] = field(default_factory=list)  # problems ignored with strict=False
    exact: bool = True
    _terms: dict[str, list[_Term]] = field(default_factory=dict, repr=False)
    _originals: dict[str, Tensor] = field(default_factory=dict, repr=False)


@dataclass
class _Group:
    """The keys of one file that target one module (or parameter) path."""

    keys: list[str] = field(default_factory=list)
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: Tensor | None = None
    diff: Tensor | None = None
    bias: Tensor | None = None
    modulation: Tensor | None = None


def check_lora_file(path: str | os.PathLike[str]) -> list[str]:
    """Check, from its header only (no tensor is read), that ``path`` is a whole safetensors file with LoRA
    tensor names; returns its tensor names. InputError naming the file and what is wrong otherwise."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"LoRA file {p} does not exist")
    if p.suffix != ".safetensors":
        raise InputError(f"LoRA file {p}: only .safetensors files are read")
    size = p.stat().st_size
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100_000_000):
                raise ValueError("no safetensors header")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            offsets = info.get("data_offsets") if isinstance(info, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
                raise ValueError(f"tensor {key!r} has no data_offsets")
            end = max(end, offsets[1])
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"LoRA file {p} is not a readable safetensors file ({e})") from None
    if 8 + n + end > size:
        raise InputError(f"LoRA file {p} is truncated: its header describes {8 + n + end} bytes, the file has {size}")
    names = [k for k in header if k != "__metadata__"]
    if not names:
        raise InputError(f"LoRA file {p} holds no tensors")
    if not any(_split_key(k) is not None for k in names):
        suffixes = ", ".join(s for s, _ in _SUFFIXES)
        raise InputError(
            f"LoRA file {p} has no LoRA tensor names (first: {', '.join(names[:3])}); "
            f"LoRA names end in one of: {suffixes}"
        )
    return names


def read_lora_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a .safetensors LoRA file (on CPU), after ``check_lora_file``."""
    from safetensors.torch import load_file

    check_lora_file(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise InputError(f"LoRA file {path} cannot be read ({e})") from None


def _path_index(params: Mapping[str, Tensor]) -> dict[str, str]:
    """Every spelling of a module/parameter path -> its official path: official, diffusers, and both with
    underscores for kohya names."""
    index: dict[str, str] = {}
    for name in params:
        official = name.rpartition(".")[0] if name.endswith((".weight", ".bias")) else name
        spellings = {official}
        try:
            diff_name = next(iter(native_to_diffusers({name: None})))
            spellings.add(diff_name.rpartition(".")[0] if name.endswith((".weight", ".bias")) else diff_name)
        except (ValueError, StopIteration):
            pass
        for s in spellings:
            index.setdefault(s, official)
            index.setdefault(s.replace(".", "_"), official)
    return index


def _split_key(key: str) -> tuple[str, str] | None:
    """File key -> (module path as written, role), or None for an unknown suffix."""
    body = key
    for prefix in _PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    if body.startswith(_KOHYA_PREFIX):
        body = body[len(_KOHYA_PREFIX) :]
    for suffix, role in _SUFFIXES:
        if body.endswith(suffix):
            return body[: -len(suffix)], role
    return None


def _listing(problems: list[str]) -> str:
    shown = "; ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def _group_tensors(sd: Mapping[str, Tensor], index: dict[str, str], problems: list[str]) -> dict[str, _Group]:
    """File tensors grouped by the official parameter they change (``#m`` marks a modulation delta)."""
    groups: dict[str, _Group] = {}
    for key, tensor in sd.items():
        split = _split_key(key)
        if split is None:
            problems.append(f"{key} (not a LoRA tensor name segue knows)")
            continue
        path, role = split
        if role == "modulation":
            official = index.get(f"{path}.modulation") or index.get(f"{path}_modulation")
        else:
            official = index.get(path)
        if official is None:
            problems.append(f"{key} (no DiT parameter of that name)")
            continue
        g = groups.setdefault(official if role != "modulation" else f"{official}#m", _Group())
        g.keys.append(key)
        if getattr(g, role) is not None:
            problems.append(f"{key} (a second {role} tensor for {official})")
            continue
        setattr(g, role, tensor)
    return groups


def _low_rank_term(
    official: str, g: _Group, scale: float, p: Tensor | None, problems: list[str]
) -> tuple[_Term, tuple[int, ...], int] | None:
    """The up/down pair of one group as a term, its delta shape and rank; None (a problem noted) if malformed."""
    if (g.down is None) != (g.up is None):
        missing = "down (lora_A/lora_down)" if g.down is None else "up (lora_B/lora_up)"
        problems.append(f"{', '.join(g.keys)} (no {missing} matrix for {official})")
        return None
    if g.down is None or g.up is None:
        if g.alpha is not None:
            problems.append(f"{', '.join(g.keys)} (alpha without lora matrices for {official})")
        return None
    rank = g.down.shape[0]
    if g.up.ndim < 2 or g.up.shape[1] != rank or math.prod(g.up.shape[2:]) != 1:
        problems.append(f"{', '.join(g.keys)} (up {tuple(g.up.shape)} and down {tuple(g.down.shape)} differ)")
        return None
    alpha = float(g.alpha.item()) if g.alpha is not None else float(rank)
    shape = (g.up.shape[0], *g.down.shape[1:])
    # Linear and Conv: [out, in] or [out, in, k...]; a flat down covers a conv's in*k too
    if p is not None and p.ndim > 2 and len(shape) == 2 and shape[1] == math.prod(p.shape[1:]):
        shape = tuple(p.shape)
    return _Term(scale * alpha / rank, up=g.up, down=g.down), shape, rank


def _plan(
    dit: nn.Module, sd: Mapping[str, Tensor], scale: float
) -> tuple[dict[str, list[_Term]], list[str], int | None]:
    """Map a LoRA state dict onto the DiT: (terms per official parameter, problems, max rank)."""
    params = dict(dit.named_parameters())
    problems: list[str] = []
    groups = _group_tensors(sd, _path_index(params), problems)
    terms: dict[str, list[_Term]] = {}
    ranks: list[int] = []

    def add(name: str, term: _Term, shape: tuple[int, ...], keys: list[str]) -> None:
        p = params.get(name)
        if p is None:
            problems.append(f"{', '.join(keys)} (the DiT has no {name})")
        elif tuple(p.shape) != shape:
            problems.append(f"{', '.join(keys)} (delta shape {shape} does not fit {name} {tuple(p.shape)})")
        else:
            terms.setdefault(name, []).append(term)

    for official, g in groups.items():
        if official.endswith("#m"):
            assert g.modulation is not None
            add(official[:-2], _Term(scale, full=g.modulation), tuple(g.modulation.shape), g.keys)
            continue
        weight_name = f"{official}.weight" if f"{official}.weight" in params else official
        low_rank = _low_rank_term(official, g, scale, params.get(weight_name), problems)
        if low_rank is not None:
            term, shape, rank = low_rank
            ranks.append(rank)
            add(weight_name, term, shape, g.keys)
        if g.diff is not None:
            add(weight_name, _Term(scale, full=g.diff), tuple(g.diff.shape), g.keys)
        if g.bias is not None:
            add(f"{official}.bias", _Term(scale, full=g.bias), tuple(g.bias.shape), g.keys)
    return terms, problems, max(ranks) if ranks else None


def _lora_stack(dit: nn.Module) -> list[LoraInfo]:
    stack = getattr(dit, "_segue_loras", None)
    if stack is None:
        stack = []
        dit._segue_loras = stack  # type: ignore[assignment]
    return stack


def _check_mergeable(dit: nn.Module, names: list[str]) -> None:
    from .accel.fp8 import FP8Linear

    for name in names:
        owner = dit.get_submodule(name.rpartition(".")[0]) if "." in name else dit
        if isinstance(owner, FP8Linear):
            raise InputError(f"{name} holds fp8 weights: load LoRAs before quantize_fp8, not after")
    meta = [n for n in names if dict(dit.named_parameters())[n].is_meta]
    if meta:
        raise InputError(f"the DiT's weights are not loaded (meta tensors: {meta[0]}, ...): load it first")


@torch.no_grad()
def _merge(dit: nn.Module, info: LoraInfo) -> None:
    params = dict(dit.named_parameters())
    info._originals = {}
    for name, terms in info._terms.items():
        p = params[name]
        if info.exact:
            info._originals[name] = p.detach().to("cpu", copy=True)
        acc = p.detach().float()  # for an fp32 weight this is the weight itself: updated in place
        for term in terms:
            acc += term.delta(p.shape, p.device)
        p.copy_(acc)  # rounds to the weight's dtype once


@torch.no_grad()
def _restore(dit: nn.Module, info: LoraInfo) -> None:
    params = dict(dit.named_parameters())
    for name, terms in info._terms.items():
        p = params[name]
        if info.exact:
            p.copy_(info._originals[name])
        else:
            acc = p.detach().float()
            for term in terms:
                acc -= term.delta(p.shape, p.device)
            p.copy_(acc)
    info._originals = {}


def load_lora(
    dit: nn.Module,
    path: str | os.PathLike[str] | Mapping[str, Tensor],
    scale: float = 1.0,
    strict: bool = True,
    exact: bool = True,
) -> LoraInfo:
    """Merge a LoRA (a .safetensors path, or its state dict) into ``dit``'s weights, in place.

    ``strict``: keys that map to no DiT parameter, or whose shapes do not fit, raise InputError naming them;
    with ``strict=False`` they are skipped with a warning (listed in ``LoraInfo.skipped``). ``exact``: keep the
    original weights on the CPU so ``unload_lora`` restores them bit for bit (see the module docstring).
    """
    model = dit
    if isinstance(path, Mapping):
        sd, source = dict(path), "<state dict>"
    else:
        sd, source = read_lora_file(path), str(path)
    if not sd:
        raise InputError(f"LoRA {source} holds no tensors")
    terms, problems, rank = _plan(model, sd, float(scale))
    if problems and strict:
        raise InputError(f"LoRA {source}: {len(problems)} key(s) do not fit this DiT: {_listing(problems)}")
    if problems:
        warnings.warn(f"LoRA {source}: skipped {len(problems)} key(s): {_listing(problems)}", stacklevel=2)
    if not terms:
        raise InputError(f"LoRA {source}: none of its keys apply to this DiT")
    _check_mergeable(model, list(terms))
    info = LoraInfo(source, float(scale), sorted(terms), rank, problems, exact, terms)
    _merge(model, info)
    _lora_stack(model).append(info)
    return info


def unload_lora(dit: nn.Module, info: LoraInfo) -> None:
    """Undo ``load_lora``. LoRAs loaded after ``info`` stay merged (they are taken out and merged again)."""
    model = dit
    stack = _lora_stack(model)
    if not any(i is info for i in stack):
        raise InputError(f"LoRA {info.source} is not loaded on this DiT")
    pos = next(k for k, i in enumerate(stack) if i is info)
    above = stack[pos + 1 :]
    for other in reversed(above):
        _restore(model, other)
    _restore(model, info)
    del stack[pos:]
    for other in above:
        _merge(model, other)
        stack.append(other)


def loaded_loras(dit: nn.Module) -> list[LoraInfo]:
    """The LoRAs merged into ``dit``, in load order."""
    return list(_lora_stack(dit))
