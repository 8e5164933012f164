"""Tiny random-weight checkpoints in the real file layouts and key names (for tests and demos).

``make_tiny_checkpoint(dest, layout)`` writes a complete folder in the official Wan2.1 layout
(sharded DiT safetensors with an index, the three .pth files, tokenizer folder) or in the diffusers
layout (model_index.json and component folders). Same seed, same weights in both layouts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig, get_config
from .errors import InputError
from .io import atomic_folder, check_output_folder

DIFFUSERS_VERSION = "0.33.0.dev0"


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with deterministic random values of a sensible scale (by name order).

    Matrices get N(0, 1/fan_in); norm weights 1 + N(0, 0.1); biases, tables and modulation N(0, 0.1).
    Nothing stays at its init value (zero-initialised projections would hide mapping bugs).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            lname = name.lower()
            if p.ndim >= 2 and not any(s in lname for s in ("modulation", "scale_shift", "emb_pos", "embedding")):
                fan_in = math.prod(p.shape[1:])
                p.copy_(r / math.sqrt(fan_in))
            elif "norm" in lname or "gamma" in lname:
                p.copy_(1 + 0.1 * r)
            elif "token_embedding" in lname or "shared" in lname or "embed_tokens" in lname:
                p.copy_(r)
            else:
                p.copy_(0.1 * r)
    return module


def build_random_components(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The four components in native modules with random weights: dit, vae, text (HF UMT5), image (HF CLIP)."""
    from .models.dit import WanDiT
    from .models.encoders import ImageEncoder, TextEncoder
    from .models.vae import WanVAE

    torch.manual_seed(seed)
    comps: dict[str, torch.nn.Module] = {
        "dit": randomize_(WanDiT(cfg.dit), seed + 1),
        "vae": randomize_(WanVAE(cfg.vae), seed + 2),
        "text": randomize_(TextEncoder(cfg.text, tokenizer=None).model, seed + 3),
    }
    if cfg.image is not None:
        comps["image"] = randomize_(ImageEncoder(cfg.image).model, seed + 4)
    return {k: m.eval() for k, m in comps.items()}


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings) and views: write independent copies
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_sharded(sd: dict[str, torch.Tensor], folder: Path, stem: str, shards: int) -> None:
    """``stem.safetensors``, or ``stem-0000k-of-0000N.safetensors`` plus ``stem.safetensors.index.json``."""
    sd = _contiguous(sd)
    folder.mkdir(parents=True, exist_ok=True)
    if shards <= 1:
        save_file(sd, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(sd)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def _segue_defaults(cfg: ModelConfig) -> dict:
    d = asdict(cfg.defaults)
    d.pop("negative_prompt")  # keep the model type's default negative prompt
    return d


def make_tiny_checkpoint(
    dest: str | os.PathLike[str],
    layout: str = "official",
    model: str = "tiny-flf2v",
    seed: int = 0,
    shards: int = 2,
) -> Path:
    """Write a random-weight checkpoint of a registry size in the official or diffusers layout into
    ``dest``, a new or empty folder (InputError for one that holds files)."""
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
    cfg = get_config(model)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"checkpoint folder {dest} exists and is not an empty folder; give a new or empty one")
    check_output_folder(dest, "checkpoint folder")  # writable, its parent there (or only that level missing)
    with atomic_folder(dest, mark=False) as staging:  # appears whole or not at all
        _write_tiny(staging, layout, cfg, seed, shards)
    return dest


def _write_tiny(out: Path, layout: str, cfg: ModelConfig, seed: int, shards: int) -> None:
    from .adapters import dit as dit_adapter
    from .adapters import encoders as enc_adapter
    from .adapters import vae as vae_adapter
    from .tokenizer import save_tiny_tokenizer

    comps = build_random_components(cfg, seed)
    dit_sd = comps["dit"].state_dict()
    vae_sd = comps["vae"].state_dict()
    text_sd = comps["text"].state_dict()
    image_sd = comps["image"].state_dict() if "image" in comps else None

    if layout == "official":
        _write_json(
            out / "config.json",
            {**dit_adapter.config_to_official(cfg.dit), "segue_defaults": _segue_defaults(cfg)},
        )
        save_sharded(dit_sd, out, "diffusion_pytorch_model", shards)
        torch.save(_contiguous(vae_sd), out / "Wan2.1_VAE.pth")
        torch.save(_contiguous(enc_adapter.t5_hf_to_official(text_sd)), out / "models_t5_umt5-xxl-enc-bf16.pth")
        save_tiny_tokenizer(out / "google" / "umt5-xxl", cfg.text.vocab_size)
        if image_sd is not None:
            clip = _contiguous(enc_adapter.clip_hf_to_official(image_sd))
            torch.save(clip, out / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
        return

    index = {
        "_class_name": "WanImageToVideoPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "segue_defaults": _segue_defaults(cfg),
    }
    if image_sd is not None:
        index["image_encoder"] = ["transformers", "CLIPVisionModel"]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    _write_json(out / "model_index.json", index)
    _write_json(out / "transformer" / "config.json", dit_adapter.config_to_diffusers(cfg.dit))
    save_sharded(dit_adapter.native_to_diffusers(dit_sd), out / "transformer", "diffusion_pytorch_model", shards)
    _write_json(out / "vae" / "config.json", vae_adapter.config_to_diffusers(cfg.vae))
    save_sharded(vae_adapter.native_to_diffusers(vae_sd), out / "vae", "diffusion_pytorch_model", 1)
    _write_json(out / "text_encoder" / "config.json", enc_adapter.t5_config_to_hf(cfg.text))
    save_sharded(text_sd, out / "text_encoder", "model", 1)
    save_tiny_tokenizer(out / "tokenizer", cfg.text.vocab_size)
    if image_sd is not None and cfg.image is not None:
        _write_json(out / "image_encoder" / "config.json", enc_adapter.clip_config_to_hf(cfg.image))
        save_sharded(image_sd, out / "image_encoder", "model", 1)
        _write_json(
            out / "image_processor" / "preprocessor_config.json",
            {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": cfg.image.image_size,
             "width": cfg.image.image_size}, "size": {"shortest_edge": cfg.image.image_size},
             "image_mean": list(cfg.image.mean), "image_std": list(cfg.image.std), "do_normalize": True,
             "do_resize": True, "do_center_crop": True, "resample": 3},
        )  # fmt: skip
    _write_json(
        out / "scheduler" / "scheduler_config.json",
        {"_class_name": "UniPCMultistepScheduler", "_diffusers_version": DIFFUSERS_VERSION,
         "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": cfg.defaults.shift,
         "num_train_timesteps": 1000, "solver_order": 2, "solver_type": "bh2", "predict_x0": True,
         "lower_order_final": True, "final_sigmas_type": "zero"},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Multi-process runs on one machine (gloo tests and CPU benchmarks), the way torchrun starts them.


def free_port() -> int:
    """A free TCP port on the loopback interface, for the rendezvous of a local process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_env(rank: int, world: int, port: int) -> None:
    """Set the variables torchrun sets, so ``segue.parallel.init_parallel`` joins a local group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip


def start_workers(target, world: int, *args) -> list:
    """Start ``target(rank, world, port, *args)`` in ``world`` spawned processes sharing a fresh port."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def join_workers(procs: list, timeout: float) -> list:
    """Wait for all workers under one shared deadline (a failed rank can leave the others waiting in a
    collective); kill the ones still running and return them, so a test fails instead of hanging."""
    import time

    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    return alive
