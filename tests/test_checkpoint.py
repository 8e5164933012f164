"""Checkpoint folders: both layouts, sharded indexes, and every way a folder can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import segue
from segue.checkpoint import detect_layout, plan_checkpoint
from segue.errors import CheckpointError
from segue.testing import make_tiny_checkpoint


def test_layouts_are_detected_and_configs_agree(official_ckpt, diffusers_ckpt):
    assert detect_layout(official_ckpt) == "official"
    assert detect_layout(diffusers_ckpt) == "diffusers"
    a, b = plan_checkpoint(official_ckpt).config, plan_checkpoint(diffusers_ckpt).config
    for part in ("dit", "vae", "text", "image", "defaults"):
        assert getattr(a, part) == getattr(b, part), part
    assert a.dit == segue.config.get_config("tiny-flf2v").dit
    assert (official_ckpt / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_loaded_weights_equal_across_layouts(official_ckpt, diffusers_ckpt):
    a, b = segue.load(official_ckpt), segue.load(diffusers_ckpt)
    for x, y in ((a.dit, b.dit), (a.vae, b.vae), (a.text_encoder.model, b.text_encoder.model),
                 (a.image_encoder.model, b.image_encoder.model)):  # fmt: skip
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)
        assert all(p.device.type == "cpu" for p in x.parameters())


def test_diffusers_classes_load_our_diffusers_folder(diffusers_ckpt):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    t = WanTransformer3DModel.from_pretrained(diffusers_ckpt / "transformer")
    v = AutoencoderKLWan.from_pretrained(diffusers_ckpt / "vae")
    assert t.config.pos_embed_seq_len == 514 and v.config.z_dim == 16


@pytest.fixture
def copy_of(tmp_path, official_ckpt):
    def make(src=official_ckpt):
        dst = tmp_path / "ck"
        shutil.copytree(src, dst)
        return dst

    return make


def test_missing_shard_is_named(copy_of):
    ck = copy_of()
    shard = sorted(ck.glob("diffusion_pytorch_model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        segue.load(ck)


def test_truncated_weight_files_are_named(copy_of):
    ck = copy_of()
    vae = ck / "Wan2.1_VAE.pth"
    vae.write_bytes(vae.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth.*truncated or corrupt"):
        segue.load(ck)


def test_truncated_safetensors_is_named(copy_of):
    ck = copy_of()
    shard = sorted(ck.glob("diffusion_pytorch_model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=shard.name):
        segue.load(ck)


def test_missing_and_unexpected_keys_are_named(copy_of):
    ck = copy_of()
    vae = ck / "Wan2.1_VAE.pth"
    sd = torch.load(vae, weights_only=True)
    sd["encoder.extra.weight"] = sd.pop("decoder.head.2.bias")
    torch.save(sd, vae)
    with pytest.raises(CheckpointError) as e:
        segue.load(ck)
    assert "decoder.head.2.bias" in str(e.value) and "encoder.extra.weight" in str(e.value)


def test_bad_index_and_config(copy_of):
    ck = copy_of()
    (ck / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index"):
        segue.load(ck)


def test_config_without_sizes_is_rejected(copy_of):
    ck = copy_of()
    (ck / "config.json").write_text(json.dumps({"model_type": "flf2v"}))
    with pytest.raises(CheckpointError, match="config|dim"):
        segue.load(ck)


def test_missing_folder_and_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        segue.load(tmp_path / "nothing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        segue.load(f)


def test_single_file_dit_and_i2v(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "one", shards=1, model="tiny-i2v")
    assert (ck / "diffusion_pytorch_model.safetensors").is_file()
    assert plan_checkpoint(ck).config.dit.model_type == "i2v"


def test_single_file_bundle_round_trip(official_ckpt, tmp_path, frames_dir):
    from segue.bundle import save_bundle

    pipe = segue.load(official_ckpt)
    parts = {"dit": pipe.dit, "vae": pipe.vae, "text": pipe.text_encoder.model, "image": pipe.image_encoder.model}
    path = save_bundle(tmp_path / "model.safetensors", pipe.config, parts, official_ckpt / "google" / "umt5-xxl")
    assert detect_layout(path) == "segue"
    again = segue.load(path)
    assert again.config == pipe.config
    a = pipe.generate(frames_dir / "first.png", frames_dir / "last.png", "a ball", frames=5, steps=2, seed=3)
    b = again.generate(frames_dir / "first.png", frames_dir / "last.png", "a ball", frames=5, steps=2, seed=3)
    assert torch.equal(a.latent, b.latent)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        segue.load(path)
