"""A latent cache for DiT training: the VAE encodes of every clip done once instead of at every step.

``FLF2VObjective`` encodes the clean clip and its conditioning video at every step, which on CPU costs
several times the DiT step itself. The VAE is frozen during DiT training, so these latents are a pure
function of the clip: ``build_latent_cache`` stores them for clips ``0..n-1`` of a dataset, and
``CachedFLF2VObjective`` trains on ``CachedClips`` with the same per-sample draws (mode, sigma, caption
drop, noise) as ``FLF2VObjective``, so that its loss on a clip and seed is the uncached loss.

What is stored per clip:
- ``x0``: the normalised latent of the clip [z, T, h, w];
- ``cond[mode]``: the latent of the conditioning video (given frames kept, zeros elsewhere) of each cached
  mode: "first_last", "first" and "random_subset". "none" needs no encode per clip: its conditioning
  video is all zeros, encoded once for the whole cache;
- ``given[mode]``: the given pixel frames, bool [F];
- ``frames``: uint8 [K, 3, H, W] pixel frames for CLIP: the first and the last frame, then the first and
  the last frame of the random subset (K = 4 when "random_subset" is cached, else 2);
- the caption.

Differences from uncached training, by design:
- "random_subset" has ONE subset per clip, drawn from the clip index (``cached_subset``): every epoch shows
  a clip with the same subset, where uncached training draws a new subset per sample. The draws that
  chose the subset are still consumed, so sigma, caption drop and noise are those of the uncached run.
- Latents may be stored as float16 (the default in the recipe): a relative rounding error of at most
  2**-11 (~5e-4; ~2e-4 measured on whole latents) on normalised latents of unit scale, far below the
  noise the flow target adds; the loss moved by ~1e-5 relative in the tests (float32 storage: bit equal).
- Training cycles over the ``n`` cached clips instead of the dataset's whole length.

Optionally (``build_object_masks``, for a loss that weights the moving shapes more): ``objects.pt``, bool
[N, T, h, w], the latent cells each clip's shapes touch, from datasets that can give a clip's scene.

Layout of the cache folder: ``config.json`` (what was cached, with a fingerprint of the VAE's weights),
``shard-XXXXX.pt`` (``shard_size`` clips each, each written atomically) and ``meta.pt`` (written last, the
mark of a finished cache). An interrupted build resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..errors import InputError
from ..io import atomic_torch_save, atomic_write_text
from .flow import MODES, FLF2VObjective, dit_loss, encode_clip_frames, fold_time, given_frames, mask_from_given
from .recipe import without_later_defaults
from .trainer import fmt_seconds, sample_seed

PROGRESS_EVERY_S = 30.0  # the cache's progress line between shards (a 1024-clip shard takes minutes on a CPU)

CACHE_VERSION = 1
SHARD_NAME = re.compile(r"shard-\d{5}\.pt")  # the names build_latent_cache writes into meta.pt
ENCODED_MODES = ("first_last", "first", "random_subset")  # the modes with one conditioning encode per clip
SUBSET_SEED = 0x5EB5E7  # mixed with the clip index: the fixed random subset of each clip
# which two slots of the stored frames CLIP sees for each mode (first and last given frame)
CLIP_SLOTS = {"first_last": (0, 1), "first": (0, 0), "none": (0, 0), "random_subset": (2, 3)}


def cached_subset(index: int, frames: int) -> Tensor:
    """Bool [frames]: the random subset of given frames of clip ``index`` in a cache (fixed per clip)."""
    g = torch.Generator().manual_seed(sample_seed(SUBSET_SEED, index))
    return given_frames("random_subset", frames, g)


def _given(mode: str, index: int, frames: int) -> Tensor:
    return cached_subset(index, frames) if mode == "random_subset" else given_frames(mode, frames)


def vae_fingerprint(vae: nn.Module) -> str:
    """sha256 of the VAE's weights and latent normalisation: a cache is only valid for the VAE that made it."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    h.update(json.dumps([list(vae.cfg.latent_mean), list(vae.cfg.latent_std)]).encode())
    return h.hexdigest()


def _to_uint8(video: Tensor) -> Tensor:
    """[3, F, H, W] in [-1, 1] -> uint8; the data must be 8-bit frames (x / 127.5 - 1), checked bit for bit."""
    u8 = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if not torch.equal(u8.float() / 127.5 - 1.0, video.float()):
        raise InputError("the latent cache stores CLIP frames as uint8: the dataset's videos must be 8-bit frames")
    return u8


def _encode_batch(vae: nn.Module, videos: Tensor, modes: Sequence[str], indices: Sequence[int]) -> dict[str, Tensor]:
    """x0 and conditioning latents of videos [b, 3, F, H, W] for each mode, in one VAE call."""
    b, frames = videos.shape[0], videos.shape[2]
    inputs = [videos]
    for mode in modes:
        keep = torch.stack([_given(mode, i, frames) for i in indices])[:, None, :, None, None]  # [b, 1, F, 1, 1]
        inputs.append(torch.where(keep, videos, torch.zeros((), dtype=videos.dtype)))
    with torch.no_grad():  # on the VAE's device; the cache lives on the CPU
        # the conditioning videos share the clip's first frame and each other's zeros: encoded once
        batch = torch.cat(inputs).to(vae.conv1.weight.device)
        latents = vae.encode(batch, share_prefixes=True).float().cpu()  # [(1 + M) b, z, T, h, w]
    parts = latents.split(b)
    return {"x0": parts[0], **{mode: z for mode, z in zip(modes, parts[1:])}}


def _build_shard(
    vae: nn.Module,
    dataset: Dataset,
    indices: range,
    modes: Sequence[str],
    batch_size: int,
    dtype: torch.dtype,
    on_batch: Callable[[int], None] | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Encode clips ``indices``; ``on_batch(last index + 1)`` after each batch (progress). ``workers`` > 0
    renders the clips in that many processes while the VAE encodes (a GPU encodes faster than one CPU
    core renders); the batches come in order, so the shard is the same."""
    x0, cond, frames_u8, captions = [], {m: [] for m in modes}, [], []
    n_frames = 0
    batches = [
        list(range(s, min(s + batch_size, indices.stop))) for s in range(indices.start, indices.stop, batch_size)
    ]
    rendered = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=list)  # 0: in-process
    for idx, items in zip(batches, rendered):
        videos = torch.stack([it["video"] for it in items]).float()  # [b, 3, F, H, W]
        z = _encode_batch(vae, videos, modes, idx)
        x0.append(z["x0"].to(dtype))
        for m in modes:
            cond[m].append(z[m].to(dtype))
        n_frames = videos.shape[2]
        for i, it in zip(idx, items):
            u8 = _to_uint8(it["video"])  # [3, F, H, W]
            slots = [0, n_frames - 1]
            if "random_subset" in modes:
                given = cached_subset(i, n_frames).nonzero().flatten().tolist()
                slots += [given[0], given[-1]]
            frames_u8.append(u8[:, slots].transpose(0, 1))  # [K, 3, H, W]
            captions.append(it["caption"])
        if on_batch is not None:
            on_batch(idx[-1] + 1)
    given = {m: torch.stack([_given(m, i, n_frames) for i in indices]) for m in modes}
    return {
        "index": torch.tensor(list(indices)),
        "x0": torch.cat(x0),
        "cond": {m: torch.cat(v) for m, v in cond.items()},
        "given": given,
        "frames": torch.stack(frames_u8),
        "caption": captions,
    }


def _dataset_info(dataset: Dataset) -> dict[str, Any]:
    keys = ("split", "start", "length", "frames", "size", "ambiguous_fraction", "loops", "loop_groups", "broad",
            "recolour", "photos")  # fmt: skip
    info = {k: getattr(dataset, k) for k in keys if hasattr(dataset, k)}
    info = without_later_defaults(info)  # type: ignore[assignment]
    if "size" in info:
        info["size"] = list(info["size"])
    return {"class": type(dataset).__name__, **info}


def build_latent_cache(
    vae: nn.Module,
    dataset: Dataset,
    n_clips: int,
    path: str | Path,
    modes: Sequence[str],
    batch_size: int = 8,
    progress: bool = True,
    *,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.float32,
    workers: int = 0,
) -> Path:
    """Encode clips ``0..n_clips-1`` of ``dataset`` (items with ``video`` [3, F, H, W] 8-bit in [-1, 1] and
    ``caption``) into the cache folder ``path``; returns it. ``modes``: the conditioning modes to cache
    ("none" is always available). ``batch_size`` clips go through the VAE at a time, each with its
    conditioning videos (one call of (1 + modes) * batch_size videos). Latents are stored in ``dtype``.
    ``workers`` > 0 renders the clips in that many processes (the same cache, sooner where the encode is fast).

    Resumable: finished shards are kept; a folder built with other settings (or another VAE) is an error."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise InputError(f"unknown conditioning modes {bad}; known: {', '.join(MODES)}")
    if n_clips < 1 or n_clips > len(dataset) or batch_size < 1 or shard_size < 1 or workers < 0:  # type: ignore[arg-type]
        raise InputError(f"need 1 <= n_clips <= {len(dataset)}, batch_size, shard_size >= 1, workers >= 0")  # type: ignore[arg-type]
    encoded = [m for m in ENCODED_MODES if m in modes]
    path = Path(path)
    config = {
        "version": CACHE_VERSION, "n_clips": n_clips, "shard_size": shard_size, "modes": encoded,
        "dtype": str(dtype).removeprefix("torch."), "dataset": _dataset_info(dataset), "vae": vae_fingerprint(vae),
    }  # fmt: skip
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        old = json.loads(cfg_file.read_text())
        if old != config:
            diff = sorted(k for k in config if old.get(k) != config[k])
            raise InputError(f"the latent cache at {path} was built with other settings ({', '.join(diff)}); remove it")
    else:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg_file, json.dumps(config, indent=2))
    if (path / "meta.pt").is_file():
        return path

    shards = [range(s, min(s + shard_size, n_clips)) for s in range(0, n_clips, shard_size)]
    names = [f"shard-{k:05d}.pt" for k in range(len(shards))]
    t0 = last_report = time.perf_counter()
    done_before = last_done = 0

    def report(done: int, force: bool = False) -> None:
        # a line at each finished shard and at most every PROGRESS_EVERY_S seconds in between
        nonlocal last_report, last_done
        now = time.perf_counter()
        if not progress or done == last_done or (not force and now - last_report < PROGRESS_EVERY_S):
            return
        last_report, last_done = now, done
        per = (now - t0) / max(1, done - done_before)
        eta = fmt_seconds(per * (n_clips - done))
        print(f"latent cache {done}/{n_clips} clips  {per:.3f} s/clip  eta {eta}", file=sys.stderr, flush=True)

    for rng, name in zip(shards, names):
        if (path / name).is_file():
            done_before = rng.stop
            continue
        atomic_torch_save(path / name, _build_shard(vae, dataset, rng, encoded, batch_size, dtype, report, workers))
        report(rng.stop, force=True)

    # "none": the latent of an all-zero conditioning video, the same for every clip
    video = dataset[0]["video"]
    with torch.no_grad():
        zero = vae.encode(torch.zeros_like(video)[None].float().to(vae.conv1.weight.device))[0].to("cpu", dtype)
    atomic_torch_save(path / "meta.pt", {"config": config, "shards": names, "none": zero})
    return path


def latent_object_mask(mask: Tensor, temporal: int, spatial: int, dilate: int = 1) -> Tensor:
    """Pixel mask bool [F, H, W] -> bool [T, h, w]: the latent cells whose pixels touch the mask (the
    causal fold: latent 0 is frame 0, latent t frames 4t-3..4t), grown by ``dilate`` cells each way."""
    frames, height, width = mask.shape
    if (frames - 1) % temporal or height % spatial or width % spatial:
        raise InputError(f"mask {tuple(mask.shape)} does not fold into {temporal}x time, {spatial}x space latents")
    m = fold_time(mask.float(), temporal).amax(dim=1)  # [T, H, W]
    m = torch.nn.functional.max_pool2d(m[:, None], spatial)  # [T, 1, h, w]
    if dilate > 0:
        m = torch.nn.functional.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m[:, 0] > 0


class _ObjectMasks(Dataset):
    """Item i: the latent object mask of clip i of ``data`` (a dataset, so that workers can render them)."""

    def __init__(self, data: Dataset, n: int, temporal: int, spatial: int, dilate: int) -> None:
        self.data, self.n, self.temporal, self.spatial, self.dilate = data, n, temporal, spatial, dilate

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        from ..data.synthetic import object_mask

        mask = torch.from_numpy(object_mask(self.data.scene(i)))  # type: ignore[attr-defined]
        return latent_object_mask(mask, self.temporal, self.spatial, self.dilate)


def build_object_masks(
    dataset: Dataset, path: str | Path, temporal: int, spatial: int, dilate: int = 1, workers: int = 0
) -> Path:
    """Write ``objects.pt`` into the finished latent cache at ``path``: for each cached clip (index i of
    ``dataset``, which must have ``scene(i)``) its shapes' latent cells (``latent_object_mask``), rendered
    in ``workers`` processes when > 0 (the same masks)."""
    path = Path(path)
    if not (path / "meta.pt").is_file():
        raise InputError(f"no finished latent cache at {path} (meta.pt is missing)")
    if not hasattr(dataset, "scene"):
        raise InputError(f"object masks need a dataset with scene(i) (procedural clips), not {type(dataset).__name__}")
    n = json.loads((path / "config.json").read_text())["n_clips"]
    items = _ObjectMasks(dataset, n, temporal, spatial, dilate)
    masks = torch.cat(list(DataLoader(items, batch_size=256, num_workers=workers)))  # workers 0: in-process
    atomic_torch_save(path / "objects.pt", {"dilate": dilate, "objects": masks})
    return path


class CachedClips(Dataset):
    """The clips of a finished latent cache, all in memory. Item: ``x0`` float32 [z, T, h, w]; per mode
    (the cached ones and "none"): ``cond`` float32 [z, T, h, w], ``given`` bool [F] and ``mask``
    [4, T, h, w] (the DiT's frame mask); ``frames`` uint8 [K, 3, H, W] (see the module doc), ``caption``
    and ``index``; ``objects`` bool [T, h, w] when the cache has object masks."""

    def __init__(self, path: str | Path, temporal: int = 4) -> None:
        path = Path(path)
        if not (path / "meta.pt").is_file():
            raise InputError(f"no finished latent cache at {path} (meta.pt is missing)")
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        bad = [n for n in meta["shards"] if not isinstance(n, str) or not SHARD_NAME.fullmatch(n)]
        if bad:  # a name read from a file never leads out of the cache folder
            raise InputError(f"{path / 'meta.pt'}: shard names {bad[:3]!r} are not shard-NNNNN.pt files of {path}")
        shards = [torch.load(path / n, map_location="cpu", weights_only=True) for n in meta["shards"]]
        self.config = meta["config"]
        self.modes = [*self.config["modes"], "none"]
        self.temporal = temporal
        self.x0 = torch.cat([s["x0"] for s in shards])  # [N, z, T, h, w] in the storage dtype
        self.cond = {m: torch.cat([s["cond"][m] for s in shards]) for m in self.config["modes"]}
        self.given = {m: torch.cat([s["given"][m] for s in shards]) for m in self.config["modes"]}
        self.frames = torch.cat([s["frames"] for s in shards])  # [N, K, 3, H, W] uint8
        self.captions = [c for s in shards for c in s["caption"]]
        self.none = meta["none"]
        self.objects = None
        if (path / "objects.pt").is_file():
            self.objects = torch.load(path / "objects.pt", map_location="cpu", weights_only=True)["objects"]
            expected = (self.x0.shape[0], *self.x0.shape[2:])
            if tuple(self.objects.shape) != expected:
                got = tuple(self.objects.shape)
                raise InputError(f"{path / 'objects.pt'}: masks {got}, the cache's clips need {expected}")
        # the frame count: from a cached mode's given frames, else from the latent's time axis
        given_any = next(iter(self.given.values()), None)
        n_frames = given_any.shape[-1] if given_any is not None else (self.x0.shape[2] - 1) * temporal + 1
        self.n_frames = n_frames
        lat_h, lat_w = self.x0.shape[-2:]
        none_given = torch.zeros(n_frames, dtype=torch.bool)
        self._fixed_masks = {
            m: mask_from_given(given_frames(m, n_frames), lat_h, lat_w, temporal) for m in ("first_last", "first")
        }
        self._fixed_masks["none"] = mask_from_given(none_given, lat_h, lat_w, temporal)

    def __len__(self) -> int:
        return self.x0.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        lat_h, lat_w = self.x0.shape[-2:]
        cond = {m: z[i].float() for m, z in self.cond.items()}
        given = {m: g[i] for m, g in self.given.items()}
        cond["none"] = self.none.float()
        given["none"] = torch.zeros(self.n_frames, dtype=torch.bool)
        mask = {
            m: self._fixed_masks[m] if m in self._fixed_masks else mask_from_given(g, lat_h, lat_w, self.temporal)
            for m, g in given.items()
        }
        item = {"x0": self.x0[i].float(), "cond": cond, "given": given, "mask": mask, "frames": self.frames[i],
                "caption": self.captions[i], "index": i}  # fmt: skip
        if self.objects is not None:
            item["objects"] = self.objects[i]
        return item


def shared_seeds(batch: Mapping[str, Any]) -> Tensor:
    """int64 [B]: ``batch["seed"]`` with each ambiguous group's members (equal ``batch["group"]`` >= 0; -1: a
    clip of its own) given the seed of the group's first member in the batch."""
    if "seed" not in batch or "group" not in batch:
        raise InputError("shared group draws need the batch's 'seed' and 'group' (a GroupedClips dataset)")
    seeds, groups = batch["seed"].clone(), batch["group"].tolist()
    first: dict[int, int] = {}
    for i, grp in enumerate(groups):
        if grp >= 0:
            seeds[i] = seeds[first.setdefault(grp, i)]
    return seeds


class GroupedClips(Dataset):
    """A dataset's items with ``group`` added: the id (>= 0) of the ambiguous group each belongs to, -1 for
    a clip of its own (``groups[i]`` None)."""

    def __init__(self, data: Dataset, groups: Sequence[int | None]) -> None:
        if len(groups) != len(data):  # type: ignore[arg-type]
            raise ValueError(f"{len(groups)} group ids for a dataset of {len(data)} items")  # type: ignore[arg-type]
        if any(g is not None and g < 0 for g in groups):
            raise ValueError("group ids must be >= 0 (None: no group)")
        self.data, self.groups = data, [-1 if g is None else int(g) for g in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.data[i], "group": self.groups[i]}


def cached_clip_frames(frames: Tensor, modes: Sequence[str], count: int) -> Tensor:
    """[B*count, 3, H, W] in [-1, 1]: each sample's CLIP frames for its conditioning mode, picked from the
    cache's uint8 frames [B, K, 3, H, W] (mapped as the dataset maps 8-bit frames)."""
    slots = torch.tensor([CLIP_SLOTS[m][:count] for m in modes])  # [B, count]
    picked = frames[torch.arange(frames.shape[0])[:, None], slots]  # [B, count, 3, H, W] uint8
    return picked.flatten(0, 1).float() / 127.5 - 1.0


@dataclass
class CachedFLF2VObjective(FLF2VObjective):
    """``FLF2VObjective`` on ``CachedClips`` batches: the same per-sample draws, latents from the cache.

    For "first_last", "first" and "none" the loss equals ``FLF2VObjective``'s on the same clip and seed (up
    to the cache's storage precision); "random_subset" uses the clip's cached subset. No VAE is needed.

    ``object_weight`` > 1 weights the squared error on the latent cells of the moving shapes (the cache's
    ``objects``) that much more than the rest: they cover a few percent of the frame and carry most of the
    in-between error.

    ``share_group_draws``: the members of one ambiguous group in a batch (equal ``batch["group"]`` >= 0) all
    take the draws of the first of them (mode, sigma, caption drop, noise). Their inputs then differ only where
    their clips do and in the caption, so the part of the gradient that teaches the caption's use is not
    drowned by the rest of each sample's noise."""

    vae: nn.Module | None = None
    object_weight: float = 1.0
    share_group_draws: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.object_weight < 1.0:
            raise ValueError(f"object_weight must be >= 1, got {self.object_weight}")

    def __call__(self, parts: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> Tensor:
        dit = parts["dit"]
        device = next(dit.parameters()).device
        x0 = batch["x0"].to(device).float()  # [B, z, T, h, w]
        b = x0.shape[0]
        missing = sorted(m for m, w in self.modes.items() if w > 0 and m not in batch["cond"])
        if missing:
            raise InputError(f"modes {missing} are not in the latent cache (it has {sorted(batch['cond'])})")
        n_frames = batch["given"]["none"].shape[-1]
        # the draws consume the same numbers as uncached; a random subset is then replaced by the cached one
        d = self.draws(shared_seeds(batch) if self.share_group_draws else batch.get("seed"), b, n_frames)
        given = [batch["given"][m][i] if m == "random_subset" else g for i, (m, g) in enumerate(zip(d.modes, d.given))]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in d.gens]).to(device)

        y = clip = None
        if dit.cfg.image_dim is not None:
            mask = torch.stack([batch["mask"][m][i] for i, m in enumerate(d.modes)])  # [B, 4, T, h, w]
            cond = torch.stack([batch["cond"][m][i] for i, m in enumerate(d.modes)])  # [B, z, T, h, w]
            y = torch.cat([mask.float(), cond.float()], dim=1).to(device)
        context = self.context(parts, batch, d.drop)
        if y is not None:
            image_encoder = parts.get("image", self.image_encoder)
            if image_encoder is None:
                clip = batch["clip"].to(device)
            else:
                count = 2 if dit.cfg.image_pos_len is not None else 1
                frames = cached_clip_frames(batch["frames"], d.modes, count)
                shown = torch.tensor([bool(g.any()) for g in given])
                clip = encode_clip_frames(image_encoder, frames.to(device), shown)
        weight = None
        if self.object_weight != 1.0:
            if "objects" not in batch:
                raise InputError("object_weight needs the cache's object masks (objects.pt, build_object_masks)")
            weight = 1.0 + (self.object_weight - 1.0) * batch["objects"][:, None].to(device).float()  # [B,1,T,h,w]
        return dit_loss(dit, x0, y, context, clip, d.sigma, noise, weight)
