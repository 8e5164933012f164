"""segue.load(speed=...) and segue generate's speed/memory flags: the order of the transforms, exactness of
the lossless ones, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import segue
from segue.accel.options import SpeedOptions, parse_lora
from segue.cli import main
from segue.errors import InputError
from segue.lora import load_lora


def _gen(pipe, frames_dir):
    return pipe.generate(frames_dir / "first.png", frames_dir / "last.png", "a ball", frames=5, steps=2, seed=1)


def test_cpu_default_speed_is_the_plain_path(official_ckpt, frames_dir):
    plain = _gen(segue.load(official_ckpt), frames_dir)
    pipe = segue.load(official_ckpt, speed=SpeedOptions())
    assert pipe.applied == ["memory gpu", "attention sdpa"]  # nothing lossless-but-different on CPU
    assert torch.equal(_gen(pipe, frames_dir).latent, plain.latent)


def test_block_swap_lora_and_lossless_options_compose(official_ckpt, frames_dir, tmp_path):
    ref_pipe = segue.load(official_ckpt)
    cfg = ref_pipe.dit.cfg
    lora = _lora_file(tmp_path / "l.safetensors", cfg.dim, cfg.ffn_dim)
    load_lora(ref_pipe.dit, lora, 0.5)
    ref = _gen(ref_pipe, frames_dir)

    speed = SpeedOptions(memory="block-swap", loras=((lora, 0.5),), fuse=True, cfg_batch=True)
    pipe = segue.load(official_ckpt, speed=speed)
    assert pipe.applied[:3] == ["memory block-swap", "LoRA l.safetensors x0.5", "fused QKV + fp32 RoPE"]
    out = _gen(pipe, frames_dir)
    err = (out.latent - ref.latent).norm() / ref.latent.norm()
    assert 0 <= err < 1e-5, err  # fp32 RoPE and the batch of two round differently, nothing more
    assert out.info["speed"] == pipe.applied


def _lora_file(path, dim: int, ffn: int, rank: int = 2) -> str:
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name, out in (("self_attn.q", dim), ("self_attn.v", dim), ("ffn.0", ffn)):
        sd[f"diffusion_model.blocks.0.{name}.lora_A.weight"] = torch.randn(rank, dim, generator=g) * 0.1
        sd[f"diffusion_model.blocks.0.{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
    save_file(sd, str(path))
    return str(path)


def test_step_cache_from_the_cli_and_threshold_zero_is_exact(official_ckpt, frames_dir, tmp_path):
    base = ["-q", "generate", "--ckpt-dir", str(official_ckpt), "--first", str(frames_dir / "first.png"),
            "--last", str(frames_dir / "last.png"), "--frames", "5", "--steps", "3", "--seed", "2"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "a.mp4"), "--save-latent", str(tmp_path / "a.pt")]) == 0
    args = ["--step-cache", "teacache", "--cache-threshold", "0"]
    assert main([*base, *args, "--out", str(tmp_path / "b.mp4"), "--save-latent", str(tmp_path / "b.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt"))
    args = ["--step-cache", "teacache", "--cache-threshold", "10"]  # skips every step after the warm-up
    assert main([*base, *args, "--out", str(tmp_path / "c.mp4"), "--save-latent", str(tmp_path / "c.pt")]) == 0
    assert not torch.equal(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "c.pt"))


def test_bad_options_are_one_line_errors(official_ckpt, frames_dir, tmp_path, capsys):
    base = ["generate", "--ckpt-dir", str(official_ckpt), "--first", str(frames_dir / "first.png"),
            "--out", str(tmp_path / "v.mp4")]  # fmt: skip
    cases = {
        ("--memory", "tiny"): "unknown memory profile 'tiny'; choose one of: auto, gpu, offload, block-swap",
        ("--attention", "fast"): "unknown attention backend 'fast'",
        ("--cache-threshold", "0.1"): "without a step cache (--step-cache)",
        ("--lora", str(tmp_path / "none.safetensors")): "none.safetensors does not exist",
        ("--lora", "x.safetensors:big"): "LoRA scale in 'x.safetensors:big' must be a number",
        ("--ulysses", "2", "--memory", "low"): "--memory: one-process options",
        ("--attention", "flash"): "attention backend 'flash' needs a CUDA GPU",
    }
    for extra, message in cases.items():
        code = main([*base, *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert message in err, (extra, err)
        assert "Traceback" not in err
    assert not (tmp_path / "v.mp4").exists()


def test_parse_lora():
    assert parse_lora("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora("dir/a.safetensors:0.75") == ("dir/a.safetensors", 0.75)
    with pytest.raises(InputError, match="must be a number"):
        parse_lora("a.safetensors:x")
