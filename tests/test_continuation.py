"""Continuing training from a bundle: its phases, the fresh clips it caches, its lineage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import segue
from segue.bundle import read_bundle_lineage, read_bundle_weights
from segue.data.synthetic import SyntheticVideos
from segue.errors import CheckpointError, InputError
from segue.train import budget, continuation
from segue.train.continuation import Window, continue_from_bundle
from segue.train.latents import CachedClips
from segue.train.recipe import load_recipe

TINY = load_recipe(Path(__file__).parent / "data" / "tiny.toml")
SMOKE = TINY.continuations[0]  # a continuation in seconds


def run(base: Path, c, out: Path, **kw) -> Path:
    """Continuation ``c`` on ``base`` into ``out``, with the tiny recipe's VAE clips."""
    return continue_from_bundle(base, c, TINY.vae, out, **kw)


@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base


def test_a_continuation_at_a_vanishing_lr_gives_back_the_bundle(base, tmp_path, monkeypatch):
    c = SMOKE
    sampling = (("steps", 3), ("guidance", 1.0))
    still = replace(c, name="still", stage=replace(c.stage, lr=1e-30), decoder_steps=0, sampling=sampling)
    new = run(base, still, tmp_path / "run")
    before, after = read_bundle_weights(base), read_bundle_weights(new)
    for part in before:
        assert before[part].keys() == after[part].keys()
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part]), part
    # the new bundle carries the continuation's sampling defaults and the clips its DiT stage trained on
    # (the base: its last stage's); the rest of its defaults are the base's
    old_d, new_d = segue.load(base).config.defaults, segue.load(new).config.defaults
    assert (new_d.steps, new_d.guidance) == (3, 1.0) != (old_d.steps, old_d.guidance)
    last = TINY.scratch.stages[-1]
    assert (old_d.trained_frames, old_d.trained_size) == (last.frames, tuple(last.size))
    assert (new_d.trained_frames, new_d.trained_size) == (c.stage.frames, tuple(c.stage.size))
    trained = {"trained_frames": old_d.trained_frames, "trained_size": old_d.trained_size}
    assert replace(new_d, steps=old_d.steps, guidance=old_d.guidance, **trained) == old_d
    with pytest.raises(ValueError, match=r"continuation 'x': sampling keys \['fps'\] not all among"):
        replace(c, name="x", sampling=(("fps", 4),))
    with pytest.raises(ValueError, match=r"continuation 'x': loop_groups must be in \[0, 1\], got -0.1"):
        replace(c, name="x", loop_groups=-0.1)
    # lineage: the stage from scratch that made the base bundle (its own entry), then this continuation
    assert read_bundle_lineage(base) == [{"recipe": "tiny", "scratch": "base", "steps_scale": 1.0, "seed": 0}]
    lineage = read_bundle_lineage(new)
    assert len(lineage) == 2 and lineage[0] == read_bundle_lineage(base)[0]
    assert lineage[1]["continuation"]["name"] == "still" and lineage[1]["steps"] == c.stage.steps
    assert lineage[1]["phase_steps"] == {"vae": 0, "dit": c.stage.steps, "decoder": 0}


def test_a_continuation_trains_the_dit_on_fresh_clips_and_keeps_the_vae_encoder(base, tmp_path):
    c = SMOKE
    out = tmp_path / "run"
    new = run(base, c, out)
    before, after = read_bundle_weights(base), read_bundle_weights(new)
    # the encoder is frozen (the latents, and so the DiT, stay valid); the decoder was fine-tuned on it
    decoder = [k for k in before["vae"] if k.startswith(("decoder.", "conv2."))]
    encoder = [k for k in before["vae"] if k not in decoder]
    assert encoder and all(torch.equal(before["vae"][k], after["vae"][k]) for k in encoder)
    assert any(not torch.equal(before["vae"][k], after["vae"][k]) for k in decoder)
    assert any(not torch.equal(before["dit"][k], after["dit"][k]) for k in before["dit"])
    steps = json.loads((out / c.stage.name / "done").read_text())["steps"]
    assert steps == c.stage.steps and len((out / c.stage.name / "log.jsonl").read_text().splitlines()) == steps
    # the cache holds the window's clips, not the first ones that earlier stages trained on
    cache = CachedClips(out / "latents")
    data = SyntheticVideos("train", length=c.data_length, frames=c.stage.frames, size=c.stage.size)
    assert len(cache) == c.cache_clips
    assert [cache[i]["caption"] for i in range(len(cache))] == [
        data.clip(c.cache_start + i).caption for i in range(c.cache_clips)
    ]
    assert json.loads((out / "latents" / "config.json").read_text())["dataset"]["start"] == c.cache_start
    # the bundle records the clips its DiT was trained on (the pipeline warns outside them)
    defaults = segue.load(new).config.defaults
    assert (defaults.trained_frames, defaults.trained_size) == (c.stage.frames, tuple(c.stage.size))
    # a smaller scale caches fewer clips of the same window
    half = run(base, c, tmp_path / "half", steps_scale=0.5)
    assert len(CachedClips(tmp_path / "half" / "latents")) == c.cache_clips // 2
    assert read_bundle_lineage(half)[-1]["phase_steps"] == {"vae": 0, "dit": 1, "decoder": 1}


def test_a_continuation_that_trains_the_vae_measures_its_latent_statistics_again(base, tmp_path, monkeypatch):
    c = SMOKE
    new = run(base, replace(c, name="vae", vae_steps=2, decoder_steps=0), tmp_path / "run")
    before, after = read_bundle_weights(base), read_bundle_weights(new)
    moved = [k for k in before["vae"] if not torch.equal(before["vae"][k], after["vae"][k])]
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("decoder.") for k in moved)
    old, cfg = segue.load(base).config.vae, segue.load(new).config.vae
    assert cfg.latent_mean != old.latent_mean and cfg.latent_std != old.latent_std
    # the DiT trained on latents of the new VAE: the cache records that VAE's fingerprint
    from segue.models.vae import WanVAE
    from segue.train.latents import vae_fingerprint

    vae = WanVAE(cfg)
    vae.load_state_dict(torch.load(tmp_path / "run" / "vae" / "ema.pt", weights_only=True)["vae"])
    assert json.loads((tmp_path / "run" / "latents" / "config.json").read_text())["vae"] == vae_fingerprint(vae)


def test_a_continuation_can_deepen_the_dit(base, tmp_path, monkeypatch):
    c = SMOKE
    new = run(base, replace(c, name="deeper", insert_blocks=(0,), decoder_steps=0), tmp_path / "run")
    layers = segue.load(base).config.dit.num_layers
    assert segue.load(new).config.dit.num_layers == layers + 1
    before, after = read_bundle_weights(base)["dit"], read_bundle_weights(new)["dit"]
    assert len(after) == len(before) + sum(k.startswith("blocks.0.") for k in before)
    # the inserted block trained away from its zero start; the last source block moved up by one
    assert after["blocks.1.ffn.2.weight"].abs().sum() > 0 and after["blocks.1.self_attn.o.weight"].abs().sum() > 0
    assert f"blocks.{layers}.ffn.2.weight" in after and f"blocks.{layers + 1}.ffn.2.weight" not in after
    # an index past the bundle's blocks is refused by name before anything trains
    with pytest.raises(
        InputError, match=rf"continuation 'too-deep' on .*: blocks to insert after must be .* got \[{layers}\]"
    ):
        run(base, replace(c, name="too-deep", insert_blocks=(layers,)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_object_weights_change_at_their_steps_and_resume_there(base, tmp_path, monkeypatch):
    from segue.train.latents import CachedFLF2VObjective

    c = SMOKE
    weighted = replace(c, name="weighted", stage=replace(c.stage, steps=3), object_weights=((0, 4.0), (2, 2.0)),
                       decoder_steps=0)  # fmt: skip
    seen = []
    call = CachedFLF2VObjective.__call__

    def spy(self, parts, batch):
        seen.append((self.object_weight, bool(batch["objects"].any())))
        return call(self, parts, batch)

    monkeypatch.setattr(CachedFLF2VObjective, "__call__", spy)
    run(base, weighted, tmp_path / "run")
    assert seen == [(4.0, True), (4.0, True), (2.0, True)]  # steps 0, 1 at 4; step 2 at 2; the masks are there
    assert (tmp_path / "run" / "latents" / "objects.pt").is_file()
    with pytest.raises(ValueError, match=r"object_weights must start at step 0"):
        replace(c, name="x", object_weights=((1, 4.0),))
    with pytest.raises(ValueError, match=r"weights >= 1; got \(\(0, 0.5\),\)"):
        replace(c, name="x", object_weights=((0, 0.5),))


def test_paired_groups_put_a_groups_clips_in_one_batch_with_one_draw(base, tmp_path, monkeypatch):
    from segue.train.latents import CachedFLF2VObjective, shared_seeds

    c = SMOKE
    paired = replace(c, name="paired", stage=replace(c.stage, steps=4, batch_size=3), cache_start=9, cache_clips=6,
                     ambiguous_fraction=1.0, paired_groups=True, decoder_steps=0)  # fmt: skip
    seen = []
    call = CachedFLF2VObjective.__call__

    def spy(self, parts, batch):
        seen.append((self.share_group_draws, batch["index"].tolist(), batch["group"].tolist(), shared_seeds(batch)))
        return call(self, parts, batch)

    monkeypatch.setattr(CachedFLF2VObjective, "__call__", spy)
    run(base, paired, tmp_path / "run")
    data = continuation.stage_clips(paired)
    assert len(seen) == 4
    for share, index, group, seeds in seen:
        assert share and sorted(index) in ([0, 1, 2], [3, 4, 5])  # a whole chunk, in any order of chunks
        assert group == [data.group_of(9 + i) for i in index] and len(set(group)) == 1
        assert len(set(seeds.tolist())) == 1  # one draw for the group
    with pytest.raises(ValueError, match="paired_groups needs cache_start on a 3-clip chunk boundary, got 8"):
        replace(c, name="x", paired_groups=True)


def test_text_dropout_is_set_on_the_jointly_trained_text_encoder(base, tmp_path, monkeypatch):
    from segue.train.latents import CachedFLF2VObjective

    c = SMOKE
    seen = []
    call = CachedFLF2VObjective.__call__

    def spy(self, parts, batch):
        text = parts["text"]
        rates = {m.p for m in text.modules() if isinstance(m, torch.nn.Dropout)}
        rates |= {m.dropout for m in text.modules() if isinstance(getattr(m, "dropout", None), float)}
        seen.append((text.training, sorted(rates)))
        return call(self, parts, batch)

    monkeypatch.setattr(CachedFLF2VObjective, "__call__", spy)
    for rate, expect in ((None, [0.1]), (0.0, [0.0])):  # None: umT5's own rate
        name = f"drop-{rate}"
        seen.clear()
        run(base, replace(c, name=name, text_dropout=rate, decoder_steps=0), tmp_path / name)
        assert seen and all(s == (True, expect) for s in seen), (rate, seen)
    assert json.loads((tmp_path / "drop-0.0" / "continuation.json").read_text())["continuation"]["text_dropout"] == 0
    with pytest.raises(ValueError, match=r"continuation 'x': text_dropout must be in \[0, 1\), got 1.0"):
        replace(c, name="x", text_dropout=1.0)


def test_window_and_bad_bundles_are_clear_errors(tmp_path):
    data = SyntheticVideos("train", length=10, frames=5, size=(32, 32))
    w = Window(data, 4, 3)
    assert len(w) == 3 and torch.equal(w[0]["video"], data[4]["video"])
    with pytest.raises(IndexError):
        w[3]
    with pytest.raises(InputError, match=r"window \[8, 11\) does not fit a dataset of 10"):
        Window(data, 8, 3)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(InputError, match=f"no such bundle file: {missing}"):
        run(missing, SMOKE, tmp_path / "r")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        run(bad, SMOKE, tmp_path / "r")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_sigma_min_reaches_the_objective_and_is_checked(base, tmp_path, monkeypatch):
    from segue.train.latents import CachedFLF2VObjective

    c = SMOKE
    seen = []
    draws = CachedFLF2VObjective.draws

    def spy(self, seeds, b, frames):
        d = draws(self, seeds, b, frames)
        seen.append((self.sigma_min, d.sigma.min().item()))
        return d

    monkeypatch.setattr(CachedFLF2VObjective, "draws", spy)
    run(base, replace(c, name="cut", sigma_min=0.9, decoder_steps=0), tmp_path / "cut")
    assert seen and all(m == 0.9 and s >= 0.9 for m, s in seen), seen
    assert json.loads((tmp_path / "cut" / "continuation.json").read_text())["continuation"]["sigma_min"] == 0.9


@pytest.mark.parametrize("phase", ["decoder", "whole VAE"])
def test_a_vae_phase_weights_the_keyframes_as_registered(phase, base, tmp_path, monkeypatch):
    from segue.train.vae_loss import DecoderObjective, VAEObjective

    if phase == "decoder":
        objective, key, weight = DecoderObjective, "decoder_endpoint_weight", 4.0
        c = replace(SMOKE, name="keyframes", decoder_steps=2, decoder_endpoint_weight=weight)
    else:
        objective, key, weight = VAEObjective, "vae_endpoint_weight", 3.0
        c = replace(SMOKE, name="whole", stage=replace(SMOKE.stage, steps=0), vae_steps=2, vae_endpoint_weight=weight)
    seen = []
    call = objective.__call__

    def spy(self, parts, batch):
        seen.append(self.endpoint_weight)
        return call(self, parts, batch)

    monkeypatch.setattr(objective, "__call__", spy)
    run(base, c, tmp_path / "run")
    assert seen == [weight, weight]  # both steps of the phase
    record = json.loads((tmp_path / "run" / "continuation.json").read_text())
    assert record["continuation"][key] == weight  # the lineage says how it was trained


def test_a_continuation_can_widen_the_decoder_and_leave_the_dit_as_it_is(base, tmp_path, monkeypatch):
    c = SMOKE
    width = segue.load(base).config.vae.dim + 2
    wide = replace(c, name="wide", stage=replace(c.stage, steps=0), decoder_dim=width, decoder_steps=2,
                   decoder_cooldown=1)  # fmt: skip
    new = run(base, wide, tmp_path / "run")
    assert not (tmp_path / "run" / c.stage.name).exists() and not (tmp_path / "run" / "latents").exists()
    config = segue.load(new).config
    assert config.vae.decoder_dim == width and config.vae.decoder_width == width
    assert config.vae == replace(segue.load(base).config.vae, decoder_dim=width)  # latent statistics kept
    before, after = read_bundle_weights(base), read_bundle_weights(new)
    for part in ("dit", "text", "image"):  # no DiT stage: the bundle's weights as they were
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part]), part
    enc = [k for k in before["vae"] if k.startswith(("encoder.", "conv1."))]  # conv2 is the decoder's
    assert all(torch.equal(before["vae"][k], after["vae"][k]) for k in enc)  # the latent space is untouched
    assert after["vae"]["decoder.conv1.weight"].shape[0] == width * config.vae.dim_mult[-1]
    log = [json.loads(line) for line in (tmp_path / "run" / "vae-decoder" / "log.jsonl").read_text().splitlines()]
    assert [e["lr"] for e in log] == [c.decoder_lr, 0.0]  # the cooldown: down to 0 at the last step
    lineage = read_bundle_lineage(new)[-1]
    assert lineage["phase_steps"] == {"vae": 0, "dit": 0, "decoder": 2}
    assert lineage["continuation"]["decoder_dim"] == width
    with pytest.raises(ValueError, match=r"continuation 'x': a continuation without a DiT stage \(steps 0\) takes"):
        replace(wide, name="x", insert_blocks=(0,))
    with pytest.raises(ValueError, match=r"continuation 'x': a widened decoder \(decoder_dim\) needs decoder_steps"):
        replace(wide, name="x", decoder_steps=0, decoder_cooldown=0)
    with pytest.raises(ValueError, match=r"decoder_cooldown must be in 0..decoder_steps \(2\), got 3"):
        replace(wide, name="x", decoder_cooldown=3)


def test_the_decoder_can_train_on_the_latents_the_model_generates(base, tmp_path, monkeypatch):
    from segue.train.generated import GeneratedClips
    from segue.train.vae_loss import DecoderObjective

    c = SMOKE
    gen = replace(c, name="gen", stage=replace(c.stage, steps=0), decoder_steps=2, decoder_generated=3,
                  generated_start=5, generated_repeat=2)  # fmt: skip
    seen = []
    call = DecoderObjective.__call__

    def spy(self, parts, batch):
        seen.append(tuple(batch["latent"].shape) if "latent" in batch else None)
        return call(self, parts, batch)

    monkeypatch.setattr(DecoderObjective, "__call__", spy)
    new = run(base, gen, tmp_path / "run")
    gen_dir = tmp_path / "run" / "generated"
    stored = torch.load(gen_dir / "part-00000.pt", weights_only=True)
    cfg = segue.load(base).config
    lat_t = (c.stage.frames - 1) // cfg.vae.temporal_factor + 1
    lat_hw = c.stage.size[0] // cfg.vae.spatial_factor
    assert stored.shape == (3, cfg.vae.z_dim, lat_t, lat_hw, lat_hw) and stored.dtype == torch.float16
    # the decoder saw generated latents, cropped as the recipe's [vae] crops its clips (24 px)
    sf = cfg.vae.spatial_factor
    assert seen == [(2, cfg.vae.z_dim, lat_t, 24 // sf, 24 // sf)] * 2
    # they are what the model generates for those clips (its own pipeline, noise seed = clip index)
    data = SyntheticVideos("train", length=c.data_length, frames=c.stage.frames, size=c.stage.size)
    clip = data.clip(6)
    pipe = segue.load(gen_dir / "generator.safetensors")
    from PIL import Image

    first, last = Image.fromarray(clip.frames[0]), Image.fromarray(clip.frames[-1])
    latent_only = pipe.generate(first, last, clip.caption, frames=c.stage.frames, size=c.stage.size[::-1], seed=6,
                                decode=False)  # fmt: skip
    assert latent_only.frames.shape[0] == 0
    torch.testing.assert_close(latent_only.latent.half(), stored[1])
    full = pipe.generate(first, last, clip.caption, frames=c.stage.frames, size=c.stage.size[::-1], seed=6)
    assert torch.equal(full.latent, latent_only.latent) and full.frames.shape[0] == c.stage.frames
    # the DiT and its encoders are the bundle's; the decoder moved
    before, after = read_bundle_weights(base), read_bundle_weights(new)
    assert all(torch.equal(before["dit"][k], after["dit"][k]) for k in before["dit"])
    assert any(not torch.equal(before["vae"][k], after["vae"][k]) for k in before["vae"] if k.startswith("decoder."))
    # the pairs: item i is clip start + i % count, latent cells and their pixels cropped at one place
    pairs = GeneratedClips(data, 5, 3, gen_dir, cfg.vae.spatial_factor, crop=(2, 3), seed=1, repeat=2)
    assert len(pairs) == 6
    for i in (1, 4):
        item = pairs[i]
        lat, vid = item["latent"], item["video"]
        assert lat.shape[-2:] == (2, 3) and vid.shape[-2:] == (2 * sf, 3 * sf)
        whole = GeneratedClips(data, 5, 3, gen_dir, cfg.vae.spatial_factor)[i % 3]
        spots = [(r, q) for r in range(lat_hw - 1) for q in range(lat_hw - 2)
                 if torch.equal(whole["latent"][:, :, r : r + 2, q : q + 3], lat)]  # fmt: skip
        assert spots
        r, q = spots[0]
        assert torch.equal(vid, whole["video"][:, :, sf * r : sf * (r + 2), sf * q : sf * (q + 3)])
    with pytest.raises(IndexError):
        pairs[6]
    with pytest.raises(InputError, match=r"3 generated latents, expected 4"):
        GeneratedClips(data, 5, 4, gen_dir, 4)
    with pytest.raises(InputError, match=r"no generated latents"):
        GeneratedClips(data, 5, 3, tmp_path, 4)
    with pytest.raises(ValueError, match=r"decoder_generated needs decoder_steps > 0"):
        replace(gen, name="x", decoder_steps=0)


def test_a_decoder_on_generated_latents_can_keep_the_shapes_as_it_rendered_them(base, tmp_path, monkeypatch):
    from segue.data.synthetic import object_mask, render_frames
    from segue.train.generated import GeneratedClips
    from segue.train.vae_loss import DecoderObjective

    c = SMOKE
    keep = replace(c, name="keep", stage=replace(c.stage, steps=0), decoder_steps=2, decoder_generated=2,
                   generated_start=5, generated_repeat=1, decoder_keep_shapes=True)  # fmt: skip
    seen = []
    call = DecoderObjective.__call__

    def spy(self, parts, batch):
        seen.append((self.anchor, sorted(batch)))
        return call(self, parts, batch)

    monkeypatch.setattr(DecoderObjective, "__call__", spy)
    run(base, keep, tmp_path / "run")
    start = read_bundle_weights(base)["vae"]
    for anchor, keys in seen:  # every step: the decoder as it started, and the clip's scenery and shapes
        assert keys == ["backdrop", "latent", "objects", "seed", "video"]  # seed: the trainer adds it
        assert all(torch.equal(v, start[k]) for k, v in anchor.state_dict().items())
        assert not any(p.requires_grad for p in anchor.parameters())
    # the items: the scenery without its shapes and the shapes' pixels, cropped with the frames
    data = SyntheticVideos("train", length=c.data_length, frames=c.stage.frames, size=c.stage.size)
    sf = segue.load(base).config.vae.spatial_factor
    gen_dir = tmp_path / "run" / "generated"
    whole = GeneratedClips(data, 5, 2, gen_dir, sf, backdrop=True)[1]
    scene = data.scene(6)
    scenery = torch.from_numpy(render_frames(scene, with_objects=False)).permute(3, 0, 1, 2)  # [3, F, H, W]
    torch.testing.assert_close(whole["backdrop"] * 127.5 + 127.5, scenery)
    assert torch.equal(whole["objects"], torch.from_numpy(object_mask(scene))) and whole["objects"].any()
    crop = GeneratedClips(data, 5, 2, gen_dir, sf, crop=(2, 3), seed=1, backdrop=True)[1]
    r, q = next((r, q) for r in range(8) for q in range(8)
                if torch.equal(whole["latent"][:, :, r : r + 2, q : q + 3], crop["latent"]))  # fmt: skip
    for k in ("video", "backdrop", "objects"):
        assert torch.equal(crop[k], whole[k][..., sf * r : sf * (r + 2), sf * q : sf * (q + 3)]), k
    with pytest.raises(ValueError, match=r"continuation 'x': decoder_keep_shapes needs decoder_generated > 0"):
        replace(keep, name="x", decoder_generated=0)


def test_blend_states_lies_on_the_line_between_two_states():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor([1])}
    b = {"w": torch.tensor([4.0, -2.0]), "n": torch.tensor([7])}
    mid = continuation.blend_states(a, b, 0.25)
    assert torch.equal(mid["w"], torch.tensor([1.0, 1.0])) and torch.equal(mid["n"], b["n"])  # ints: END's
    assert torch.equal(continuation.blend_states(a, b, 0.0)["w"], a["w"])
    assert continuation.blend_states(a, b, 1.0)["w"] is b["w"]  # exactly the trained state
    with pytest.raises(ValueError, match=r"different keys: \['v'\]"):
        continuation.blend_states(a, {"w": b["w"], "n": b["n"], "v": b["w"]}, 0.5)
    with pytest.raises(ValueError, match=r"cannot blend 'w': shapes \(2,\) and \(3,\)"):
        continuation.blend_states(a, {"w": torch.zeros(3), "n": b["n"]}, 0.5)
    with pytest.raises(ValueError, match=r"blend fraction must be in \[0, 1\], got 1.5"):
        continuation.blend_states(a, b, 1.5)


def test_a_continuation_ships_its_decoder_part_of_the_way(base, tmp_path):
    from segue.train.phases import load_ema

    c = SMOKE
    whole = replace(c, name="whole", stage=replace(c.stage, steps=0), decoder_steps=2)
    part = replace(whole, name="part", decoder_blend=0.25)
    out = tmp_path / "run"
    trained = read_bundle_weights(run(base, whole, out))["vae"]
    blended = read_bundle_weights(run(base, part, out))["vae"]  # the same decoder phase, resumed
    start, ema = read_bundle_weights(base)["vae"], load_ema(out / "vae-decoder", "vae")
    assert any(not torch.equal(start[k], trained[k]) for k in start if k.startswith("decoder."))
    for k in start:  # the bundle stores fp16: the blend of the fp32 states, rounded once
        assert torch.equal(trained[k], ema[k].half().float()), k
        assert torch.equal(blended[k], torch.lerp(start[k], ema[k], 0.25).half().float()), k
    assert read_bundle_lineage(out / "model.safetensors")[-1]["continuation"]["decoder_blend"] == 0.25
    with pytest.raises(ValueError, match=r"decoder_blend below 1 needs decoder_steps > 0"):
        replace(c, name="x", decoder_steps=0, decoder_blend=0.5)


def test_a_continuation_ships_its_trained_parts_part_of_the_way(base, tmp_path, monkeypatch):
    c = SMOKE
    whole = replace(c, name="whole", decoder_steps=0)
    part = replace(whole, name="part", stage_blend=0.25)  # the same stage (name and run): resumed, then blended
    out = tmp_path / "run"
    trained = read_bundle_weights(run(base, whole, out))
    blended = read_bundle_weights(run(base, part, out))
    start = read_bundle_weights(base)
    for p in ("dit", "text", "image"):
        assert any(not torch.equal(start[p][k], trained[p][k]) for k in start[p]), p  # the stage moved it
        for k in start[p]:  # the blend of the stored (fp16) states, within one more fp16 rounding
            want = torch.lerp(start[p][k], trained[p][k], 0.25)
            torch.testing.assert_close(blended[p][k], want, atol=2e-3, rtol=2e-3, msg=f"{p}.{k}")
    assert all(torch.equal(blended["vae"][k], v) for k, v in start["vae"].items())  # no decoder phase
    assert read_bundle_lineage(out / "model.safetensors")[-1]["continuation"]["stage_blend"] == 0.25
    with pytest.raises(ValueError, match=r"stage_blend below 1 needs a DiT stage"):
        replace(whole, name="x", stage=replace(c.stage, steps=0), stage_blend=0.5)


def test_a_time_budget_picks_the_steps_that_fit_and_a_resume_keeps_them(base, tmp_path, monkeypatch, capsys):
    c = SMOKE
    long = replace(c, name="long", stage=replace(c.stage, steps=400, warmup=2, cooldown=100), decoder_steps=0)
    timed = []

    def probe(*a, **kw):
        timed.append(0.25)
        return 0.25  # seconds per step, as if measured: the budget then cuts the stage

    monkeypatch.setattr(continuation, "seconds_per_step", probe)
    ticks = iter([112.0])  # the deadline is 120; the cache and the probe took until 112
    out = tmp_path / "run"
    new = run(base, long, out, deadline=120.0, clock=lambda: next(ticks))
    info = json.loads((out / "budget.json").read_text())
    assert len(timed) == 1 and info["seconds_per_step"] == 0.25
    assert info["seconds_left"] == 8.0 and info["of"] == 400
    assert info["steps"] == budget.budget_steps(8.0, 0.25, 400) < 400
    steps = info["steps"]
    log = [json.loads(line) for line in (out / long.stage.name / "log.jsonl").read_text().splitlines()]
    assert len(log) == steps and json.loads((out / long.stage.name / "done").read_text())["steps"] == steps
    lineage = read_bundle_lineage(new)[-1]
    assert lineage["steps"] == lineage["phase_steps"]["dit"] == steps
    assert json.loads((out / "continuation.json").read_text())["steps"] == steps
    assert "time budget: " in capsys.readouterr().err
    # the cooldown scaled with the steps: the lr of the last step is the cooled-down one
    if steps > long.stage.warmup:
        assert log[-1]["lr"] < long.stage.lr
    # a resume, with another budget or none, keeps the length chosen and probes nothing
    before, lineage_before = read_bundle_weights(new), read_bundle_lineage(new)
    run(base, long, out, deadline=1e6, clock=lambda: 0.0)
    run(base, long, out)
    after = read_bundle_weights(out / "model.safetensors")
    assert len(timed) == 1 and read_bundle_lineage(out / "model.safetensors") == lineage_before
    assert all(torch.equal(before[p][k], after[p][k]) for p in before for k in before[p])


def test_the_step_probe_leaves_the_models_and_random_state_as_they_were(base, monkeypatch):
    from segue.train.latents import CachedFLF2VObjective
    from segue.train.phases import stage_train_config

    model = segue.load(base)
    parts = {"dit": model.dit.requires_grad_(True), "text": model.text_encoder, "image": model.image_encoder}
    before = {k: v.clone() for k, v in model.dit.state_dict().items()}
    cache = CachedClips(_smoke_cache(base))
    cfg = stage_train_config(SMOKE.stage, 2, 0, Path("unused"))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    per_step = budget.seconds_per_step(parts, CachedFLF2VObjective(shift=3.0, modes={"first_last": 1.0}),
                                             cache, cfg, steps=4)  # fmt: skip
    assert per_step > 0 and torch.equal(torch.rand(3), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.dit.state_dict().items())
    # collating in workers: a step takes the longer of its training and its share of the collating
    monkeypatch.setattr(budget.Trainer, "time_steps", lambda self, n: [(9.0, 9.0)] + [(0.4, 0.1)] * (n - 1))
    loss = CachedFLF2VObjective(shift=3.0, modes={"first_last": 1.0})
    m = budget.WORKER_MARGIN
    got = [budget.seconds_per_step(parts, loss, cache, replace(cfg, num_workers=w), steps=4) for w in (0, 2, 8)]
    assert got == pytest.approx([0.5, 0.2 * m, 0.1 * m])


def _smoke_cache(base: Path) -> Path:
    """The latent cache of the smoke continuation on ``base`` (built once next to it)."""
    out = base.parent / "smoke-cache-run"
    if not (out / "latents" / "meta.pt").is_file():
        run(base, SMOKE, out)
    return out / "latents"


def test_durations_and_budget_steps():
    assert [budget.parse_duration(t) for t in ("420", "420s", "7m", "1.5h", " 2M ")] == [
        420.0, 420.0, 420.0, 5400.0, 120.0,
    ]  # fmt: skip
    for bad in ("", "m", "-3", "0", "7 min", "soon"):
        with pytest.raises(InputError, match="is not a positive duration"):
            budget.parse_duration(bad)
    assert budget.budget_steps(100.0, 1.0, 1000) == 90 and budget.budget_steps(100.0, 1.0, 50) == 50
    assert budget.budget_steps(0.5, 1.0, 1000) == 1


def test_broad_clips_train_the_vae_with_synthetic_latents_anchored_and_join_the_dit_cache(base, tmp_path, monkeypatch):
    from segue.train import anchored_vae
    from segue.train.continuation import stage_clips
    from segue.train.phases import vae_data

    flags = []
    parts = anchored_vae.AnchoredVAEObjective.parts

    def spy(self, vae, video, anchored, stills=None):
        flags.append((anchored.clone(), stills.shape))
        return parts(self, vae, video, anchored, stills)

    monkeypatch.setattr(anchored_vae.AnchoredVAEObjective, "parts", spy)
    c = replace(SMOKE, name="broad", vae_steps=2, vae_anchor=1.0, broad=0.5, decoder_steps=0, recolour=1.0)
    run_dir = tmp_path / "run"
    clips = replace(TINY.vae, broad=0.5, recon="mse", stills=3, recolour=1.0)  # anchoring trains MSE
    assert vae_data(clips, 0).broad.recolour == 1.0  # the stills' photos too
    continue_from_bundle(base, c, clips, run_dir)
    assert len(flags) == 2 and all(f.dtype == torch.bool and len(f) == TINY.vae.batch for f, _ in flags)
    assert {s for _, s in flags} == {(TINY.vae.batch, 3, 3, 1, *TINY.vae.crop)}  # single frames beside each clip
    info = json.loads((run_dir / "latents" / "config.json").read_text())["dataset"]
    assert info["broad"] == 0.5 and info["recolour"] == 1.0  # a cache of other colours is not reused
    # the cache holds the mixed window: each clip's caption is its own source's
    mixed, cached = stage_clips(c), CachedClips(run_dir / "latents")
    sources = {mixed.from_b(c.cache_start + i) for i in range(c.cache_clips)}
    assert sources == {True, False}
    for i in range(c.cache_clips):
        src = mixed.b if mixed.from_b(c.cache_start + i) else mixed.a
        assert cached[i]["caption"] == src[c.cache_start + i]["caption"]


def test_broad_shares_are_checked():
    with pytest.raises(ValueError, match=r"broad and recolour must be in \[0, 1\], got 1.5, 0.0"):
        replace(TINY.vae, broad=1.5)
    with pytest.raises(ValueError, match="no paired_groups"):
        replace(SMOKE, broad=0.5, paired_groups=True, cache_start=9)
    with pytest.raises(ValueError, match="decoder_generated"):
        replace(SMOKE, broad=0.5, decoder_generated=4)
    with pytest.raises(ValueError, match="vae_anchor needs vae_steps"):
        replace(SMOKE, vae_anchor=1.0)
    with pytest.raises(ValueError, match="vae_endpoint_weight needs vae_steps"):
        replace(SMOKE, vae_endpoint_weight=4.0)
