"""Continuing training from a bundle: the weights it starts from, the fresh clips it caches, its lineage."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import segue
from segue.bundle import read_bundle_lineage, read_bundle_weights
from segue.cli import main
from segue.data.synthetic import SyntheticVideos
from segue.errors import InputError
from segue.train import continuation
from segue.train.continuation import CONTINUATIONS, Window, continue_from_bundle
from segue.train.latents import CachedClips
from segue.train.trainer import latest_checkpoint_path, load_training_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert main(["-q", "train", "--preset", "smoke", "--out", str(out)]) == 0
    return out / "model.safetensors"


def test_a_continuation_at_a_vanishing_lr_gives_back_the_bundle(base, tmp_path, monkeypatch):
    c = CONTINUATIONS["smoke"]
    sampling = (("steps", 3), ("guidance", 1.0))
    still = replace(c, name="still", stage=replace(c.stage, lr=1e-30), decoder_steps=0, sampling=sampling)
    monkeypatch.setitem(CONTINUATIONS, "still", still)
    new = continue_from_bundle(base, "still", tmp_path / "run")
    before, after = read_bundle_weights(base), read_bundle_weights(new)
    for part in before:
        assert before[part].keys() == after[part].keys()
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part]), part
    # the new bundle carries the continuation's sampling defaults; the rest of its defaults are the base's
    old_d, new_d = segue.load(base).config.defaults, segue.load(new).config.defaults
    assert (new_d.steps, new_d.guidance) == (3, 1.0) != (old_d.steps, old_d.guidance)
    assert replace(new_d, steps=old_d.steps, guidance=old_d.guidance) == old_d
    with pytest.raises(ValueError, match=r"continuation 'x': sampling keys \['fps'\] not among"):
        replace(c, name="x", sampling=(("fps", 4),))
    with pytest.raises(ValueError, match=r"continuation 'x': loop_groups must be in \[0, 1\], got -0.1"):
        replace(c, name="x", loop_groups=-0.1)
    # lineage: the preset run that made the base bundle (its own entry), then this continuation
    assert read_bundle_lineage(base) == [{"preset": "smoke", "steps_scale": 1.0, "seed": 0}]
    lineage = read_bundle_lineage(new)
    assert [e.get("preset") for e in lineage] == ["smoke", None]
    assert lineage[1]["continuation"]["name"] == "still" and lineage[1]["steps"] == c.stage.steps
    assert lineage[1]["phase_steps"] == {"vae": 0, "dit": c.stage.steps, "decoder": 0}


def test_a_continuation_trains_the_dit_on_fresh_clips_and_keeps_the_vae(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["-q", "train", "--continue-from", str(base), "--continuation", "smoke", "--out", str(out)]) == 0
    new = out / "model.safetensors"
    assert capsys.readouterr().out.strip() == str(new)
    before, after = read_bundle_weights(base), read_bundle_weights(new)
    # the encoder is frozen (the latents, and so the DiT, stay valid); the decoder was fine-tuned on it
    decoder = [k for k in before["vae"] if k.startswith(("decoder.", "conv2."))]
    encoder = [k for k in before["vae"] if k not in decoder]
    assert encoder and all(torch.equal(before["vae"][k], after["vae"][k]) for k in encoder)
    assert any(not torch.equal(before["vae"][k], after["vae"][k]) for k in decoder)
    assert (out / "vae-decoder" / "done").is_file()
    assert any(not torch.equal(before["dit"][k], after["dit"][k]) for k in before["dit"])
    c = CONTINUATIONS["smoke"]
    steps = json.loads((out / c.stage.name / "done").read_text())["steps"]
    assert steps == c.stage.steps and len((out / c.stage.name / "log.jsonl").read_text().splitlines()) == steps
    # the cache holds the window's clips, not the first ones that earlier runs trained on
    cache = CachedClips(out / "latents")
    data = SyntheticVideos("train", length=c.data_length, frames=c.stage.frames, size=c.stage.size)
    assert len(cache) == c.cache_clips
    assert [cache[i]["caption"] for i in range(len(cache))] == [
        data.clip(c.cache_start + i).caption for i in range(c.cache_clips)
    ]
    assert json.loads((out / "latents" / "config.json").read_text())["dataset"]["start"] == c.cache_start
    pipe = segue.load(new)
    video = pipe.generate("examples/first.png", "examples/last.png", "the red circle moves to the right", steps=2)
    assert video.frames.shape == (17, 64, 64, 3)


def test_a_continuation_that_trains_the_vae_measures_its_latent_statistics_again(base, tmp_path, monkeypatch):
    c = CONTINUATIONS["smoke"]
    monkeypatch.setitem(CONTINUATIONS, "vae", replace(c, name="vae", vae_steps=2, decoder_steps=0))
    new = continue_from_bundle(base, "vae", tmp_path / "run")
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
    # bench/ckpt_bundle.py rebuilds this bundle from the stage's last checkpoint (no ema.pt: a running stage)
    # with the run's VAE and the same re-measured statistics
    (tmp_path / "run" / c.stage.name / "ema.pt").unlink()
    spec = importlib.util.spec_from_file_location("ckpt_bundle", Path(__file__).parents[1] / "bench" / "ckpt_bundle.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mid = tmp_path / "mid.safetensors"
    argv = ["ckpt_bundle.py", str(tmp_path / "run"), "--from-bundle", str(base), "--out", str(mid)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert segue.load(mid).config.vae == cfg
    rebuilt = read_bundle_weights(mid)
    for part in after:
        assert all(torch.equal(after[part][k], rebuilt[part][k]) for k in after[part]), part
    # --vae-from a bundle whose VAE is not the one this DiT trained on is refused, naming that file
    monkeypatch.setattr(sys, "argv", [*argv, "--vae-from", str(base)])
    with pytest.raises(SystemExit, match=rf"{base.name}: its VAE config differs from the run's"):
        bench.main()


def test_a_continuation_can_deepen_the_dit(base, tmp_path, monkeypatch):
    c = CONTINUATIONS["smoke"]
    monkeypatch.setitem(CONTINUATIONS, "deeper", replace(c, name="deeper", insert_blocks=(0,), decoder_steps=0))
    new = continue_from_bundle(base, "deeper", tmp_path / "run")
    layers = segue.load(base).config.dit.num_layers
    assert segue.load(new).config.dit.num_layers == layers + 1
    before, after = read_bundle_weights(base)["dit"], read_bundle_weights(new)["dit"]
    assert len(after) == len(before) + sum(k.startswith("blocks.0.") for k in before)
    # the inserted block trained away from its zero start; the last source block moved up by one
    assert after["blocks.1.ffn.2.weight"].abs().sum() > 0 and after["blocks.1.self_attn.o.weight"].abs().sum() > 0
    assert f"blocks.{layers}.ffn.2.weight" in after and f"blocks.{layers + 1}.ffn.2.weight" not in after
    # bench/ckpt_bundle.py rebuilds the deeper model from the run
    (tmp_path / "run" / c.stage.name / "ema.pt").unlink()
    spec = importlib.util.spec_from_file_location("ckpt_bundle", Path(__file__).parents[1] / "bench" / "ckpt_bundle.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mid = tmp_path / "mid.safetensors"
    monkeypatch.setattr(
        sys, "argv", ["ckpt_bundle.py", str(tmp_path / "run"), "--from-bundle", str(base), "--out", str(mid)]
    )
    bench.main()
    rebuilt = read_bundle_weights(mid)["dit"]
    assert rebuilt.keys() == after.keys() and all(torch.equal(after[k], rebuilt[k]) for k in after)
    # --raw: the last checkpoint's raw weights in place of the EMA; --vae-from: another bundle's VAE
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(new), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(k for k in tensors if k.startswith("vae.decoder.") and k.endswith("weight"))
    tensors[key] = tensors[key] + 1
    other = tmp_path / "other-vae.safetensors"
    save_file(tensors, str(other), metadata=meta)
    raw = tmp_path / "raw.safetensors"
    argv = ["ckpt_bundle.py", str(tmp_path / "run"), "--from-bundle", str(base), "--raw", "--vae-from", str(other)]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(raw)])
    bench.main()
    ck = load_training_checkpoint(latest_checkpoint_path(tmp_path / "run" / c.stage.name / "ckpt"))
    got = read_bundle_weights(raw)
    assert all(torch.equal(got["dit"][k], ck["model"]["dit"][k].half().float()) for k in after)
    assert any(not torch.equal(got["dit"][k], after[k]) for k in after)  # the raw weights are not the EMA
    assert torch.equal(got["vae"][key.removeprefix("vae.")], tensors[key].float())
    # an index past the bundle's blocks is refused by name before anything trains
    monkeypatch.setitem(CONTINUATIONS, "too-deep", replace(c, name="too-deep", insert_blocks=(layers,)))
    with pytest.raises(
        InputError, match=rf"continuation 'too-deep' on .*: blocks to insert after must be .* got \[{layers}\]"
    ):
        continue_from_bundle(base, "too-deep", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_object_weights_change_at_their_steps_and_resume_there(base, tmp_path, monkeypatch):
    from segue.train.latents import CachedFLF2VObjective

    c = CONTINUATIONS["smoke"]
    weighted = replace(c, name="weighted", stage=replace(c.stage, steps=3), object_weights=((0, 4.0), (2, 2.0)),
                       decoder_steps=0)  # fmt: skip
    monkeypatch.setitem(CONTINUATIONS, "weighted", weighted)
    seen = []
    call = CachedFLF2VObjective.__call__

    def spy(self, parts, batch):
        seen.append((self.object_weight, bool(batch["objects"].any())))
        return call(self, parts, batch)

    monkeypatch.setattr(CachedFLF2VObjective, "__call__", spy)
    continue_from_bundle(base, "weighted", tmp_path / "run")
    assert seen == [(4.0, True), (4.0, True), (2.0, True)]  # steps 0, 1 at 4; step 2 at 2; the masks are there
    assert (tmp_path / "run" / "latents" / "objects.pt").is_file()
    with pytest.raises(ValueError, match=r"object_weights must start at step 0"):
        replace(c, name="x", object_weights=((1, 4.0),))
    with pytest.raises(ValueError, match=r"weights >= 1; got \(\(0, 0.5\),\)"):
        replace(c, name="x", object_weights=((0, 0.5),))


def test_paired_groups_put_a_groups_clips_in_one_batch_with_one_draw(base, tmp_path, monkeypatch):
    from segue.train.latents import CachedFLF2VObjective, shared_seeds

    c = CONTINUATIONS["smoke"]
    paired = replace(c, name="paired", stage=replace(c.stage, steps=4, batch_size=3), cache_start=9, cache_clips=6,
                     ambiguous_fraction=1.0, paired_groups=True, decoder_steps=0)  # fmt: skip
    monkeypatch.setitem(CONTINUATIONS, "paired", paired)
    seen = []
    call = CachedFLF2VObjective.__call__

    def spy(self, parts, batch):
        seen.append((self.share_group_draws, batch["index"].tolist(), batch["group"].tolist(), shared_seeds(batch)))
        return call(self, parts, batch)

    monkeypatch.setattr(CachedFLF2VObjective, "__call__", spy)
    continue_from_bundle(base, "paired", tmp_path / "run")
    data = continuation.stage_clips(paired)
    assert len(seen) == 4
    for share, index, group, seeds in seen:
        assert share and sorted(index) in ([0, 1, 2], [3, 4, 5])  # a whole chunk, in any order of chunks
        assert group == [data.group_of(9 + i) for i in index] and len(set(group)) == 1
        assert len(set(seeds.tolist())) == 1  # one draw for the group
    with pytest.raises(ValueError, match="paired_groups needs cache_start on a 3-clip chunk boundary .* got 8"):
        replace(c, name="x", paired_groups=True)


def test_text_dropout_is_set_on_the_jointly_trained_text_encoder(base, tmp_path, monkeypatch):
    from segue.train.latents import CachedFLF2VObjective

    c = CONTINUATIONS["smoke"]
    seen = []
    call = CachedFLF2VObjective.__call__

    def spy(self, parts, batch):
        text = parts["text"]
        rates = {m.p for m in text.modules() if isinstance(m, torch.nn.Dropout)}
        rates |= {m.dropout for m in text.modules() if isinstance(getattr(m, "dropout", None), float)}
        seen.append((text.training, sorted(rates)))
        return call(self, parts, batch)

    monkeypatch.setattr(CachedFLF2VObjective, "__call__", spy)
    for rate, expect in ((None, [0.1]), (0.0, [0.0])):  # None: umT5's own rate, as every run before r16
        name = f"drop-{rate}"
        monkeypatch.setitem(CONTINUATIONS, name, replace(c, name=name, text_dropout=rate, decoder_steps=0))
        seen.clear()
        continue_from_bundle(base, name, tmp_path / name)
        assert seen and all(s == (True, expect) for s in seen), (rate, seen)
    assert json.loads((tmp_path / "drop-0.0" / "continuation.json").read_text())["continuation"]["text_dropout"] == 0
    with pytest.raises(ValueError, match=r"continuation 'x': text_dropout must be in \[0, 1\) or None, got 1.0"):
        replace(c, name="x", text_dropout=1.0)


def test_window_and_bad_arguments_are_clear_errors(tmp_path, capsys):
    data = SyntheticVideos("train", length=10, frames=5, size=(32, 32))
    w = Window(data, 4, 3)
    assert len(w) == 3 and torch.equal(w[0]["video"], data[4]["video"])
    with pytest.raises(IndexError):
        w[3]
    with pytest.raises(InputError, match=r"window \[8, 11\) does not fit a dataset of 10"):
        Window(data, 8, 3)
    with pytest.raises(
        InputError,
        match="unknown continuation 'nope'; known: default-r3, default-r4, default-r5, default-r6, default-r7, "
        "default-r8, default-r9, default-r10, default-r11, default-r12, default-r13, "
        "default-r14, default-r15, default-r16, default-r17, default-r18, default-g1, default-r19, default-r20, "
        "default-r20h, default-r21, default-r22, default-r23, default-r23h, default-r24, default-r24h, default-r25, "
        "smoke",
    ):
        continue_from_bundle(tmp_path / "x.safetensors", "nope", tmp_path / "run")
    missing = tmp_path / "missing.safetensors"
    args = ["train", "--continuation", "smoke", "--out", str(tmp_path / "r"), "--continue-from"]
    assert main([*args, str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no such bundle file: {missing}" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main([*args, str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_sigma_min_reaches_the_objective_and_is_checked(base, tmp_path, monkeypatch):
    from segue.train.latents import CachedFLF2VObjective

    c = CONTINUATIONS["smoke"]
    seen = []
    draws = CachedFLF2VObjective.draws

    def spy(self, seeds, b, frames):
        d = draws(self, seeds, b, frames)
        seen.append((self.sigma_min, d.sigma.min().item()))
        return d

    monkeypatch.setattr(CachedFLF2VObjective, "draws", spy)
    monkeypatch.setitem(CONTINUATIONS, "cut", replace(c, name="cut", sigma_min=0.9, decoder_steps=0))
    continue_from_bundle(base, "cut", tmp_path / "cut")
    assert seen and all(m == 0.9 and s >= 0.9 for m, s in seen), seen
    assert json.loads((tmp_path / "cut" / "continuation.json").read_text())["continuation"]["sigma_min"] == 0.9
    assert CONTINUATIONS["default-r16"].sigma_min == 0.0  # every run before r17 drew Wan's whole range
    with pytest.raises(ValueError, match=r"continuation 'x': sigma_min must be in \[0, 1\), got 1.0"):
        replace(c, name="x", sigma_min=1.0)


def test_the_default_continuations_cache_clips_and_crops_earlier_runs_did_not_see():
    from segue.train.recipe import PRESETS

    p = PRESETS["default"]
    windows = [(0, p.cache_clips)]  # the preset's cache
    vae_seeds = {p.seed, p.seed + 1}  # the preset's VAE and decoder crops
    # r3 to r13 each ran on the one before; r14 and r15 are two tries on r13 with one window of fresh clips,
    # r16 and r17 two more on another; r18 runs on r17 with the next window, g1 (a GPU run) with the one after,
    # r19 (on r18) and r20 (on r19) with the ones after that; r21's generated clips (on r18; r22 reuses them),
    # r23 (on r20h; r23h is the same stage), r24 (on r23h) and r25's generated clips (on r20h) after those
    names = [f"default-r{k}" for k in range(3, 19)] + ["default-g1", "default-r19", "default-r20", "default-r21",
                                                       "default-r23", "default-r24", "default-r25"]  # fmt: skip
    for name in names:
        c = continuation.CONTINUATIONS[name]
        if name in ("default-r15", "default-r17"):  # the window before, which r13 had not seen
            generated, cache = windows.pop(), windows.pop()  # the try before's, taken back
            assert cache == (c.cache_start, c.cache_start + c.cache_clips) and generated[0] == generated[1]
        assert c.stage.size == p.stages[0].size and c.stage.frames == p.stages[0].frames
        # the DiT's cache, and the clips whose generated latents the decoder learns from (the DiT's output on
        # clips it trained on would be better than on new keyframes)
        for start, count in ((c.cache_start, c.cache_clips), (c.generated_start, c.decoder_generated)):
            stop = start + count
            assert all(stop <= a or start >= b for a, b in windows), (name, windows)
            windows.append((start, stop))
        for steps, seed in ((c.vae_steps, c.vae_seed), (c.decoder_steps, c.decoder_seed)):
            if steps:
                assert seed not in vae_seeds, (name, seed)
                vae_seeds.add(seed)


def test_the_sampling_sweep_prints_one_scored_row_per_setting(base, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "sampling_sweep", Path(__file__).parents[1] / "bench" / "sampling_sweep.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["sampling_sweep.py", str(base), "--steps", "1,2", "--guidance", "2", "--guidance-steps", "all,1",
            "--clips", "1", "--groups", "1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    settings = [r.split(" | ")[:4] for r in rows]
    assert settings == [
        ["| 1", "2", "all", "3"],
        ["| 1", "2", "1", "3"],
        ["| 2", "2", "all", "3"],
        ["| 2", "2", "1", "3"],
    ]
    cells = [[float(x) for x in r.strip("| ").split(" | ")[4:]] for r in rows]
    assert all(len(c) == 6 and 0.0 <= c[3] <= 1.0 and 0.0 <= c[4] <= 1.0 for c in cells)  # SSIM, compliance
    # one step guided on a 1-step run is the run guided throughout: the same scores
    assert cells[0][:5] == cells[1][:5]
    assert "val split, 1 clips, 1 groups" in captured.out and "crossfade: in-between" in captured.out
    assert captured.err.count("[sweep]") == 4


def test_the_inbetween_breakdown_splits_the_error_into_shapes_and_scenery(base, monkeypatch, capsys):
    from segue.evaluate import crossfade, held_out_set

    spec = importlib.util.spec_from_file_location(
        "inbetween_breakdown", Path(__file__).parents[1] / "bench" / "inbetween_breakdown.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["inbetween_breakdown.py", str(base), "--clips", "2"])
    bench.main()
    out = capsys.readouterr().out
    rows = {r.split(" | ")[0][2:]: [float(x) for x in r.strip("| ").split(" | ")[1:]]
            for r in out.splitlines() if r.startswith("| ") and not r.startswith("| source")}  # fmt: skip
    assert set(rows) == {"model", "crossfade", "VAE"}
    frac = float(out.split("object pixels ")[1].split("%")[0]) / 100
    assert 0.0 < frac < 0.5
    for name, (total, obj, scenery, obj_fixed, scenery_fixed) in rows.items():
        # the pooled MSE is the pixel-weighted sum of the two parts', and fixing a part can only help
        mse = frac * 10 ** (-obj / 10) + (1 - frac) * 10 ** (-scenery / 10)
        assert abs(10 * np.log10(1 / mse) - total) < 0.02, name
        assert obj_fixed >= total - 0.01 and scenery_fixed >= total - 0.01, name
    # the crossfade row against the crossfade scored directly, pooled over the same clips
    pipe = segue.load(base)
    clips, _ = held_out_set(pipe.config.defaults, 2, 0, "test")
    fades = [crossfade(c.frames[0], c.frames[-1], len(c.frames)) for c in clips]
    err = np.concatenate([((f[1:-1].astype(float) - c.frames[1:-1]) ** 2).ravel() for f, c in zip(fades, clips)])
    want = 10 * np.log10(255**2 / err.mean())
    assert abs(rows["crossfade"][0] - want) < 0.01


def test_the_decoder_phase_weights_the_keyframes_as_registered(base, tmp_path, monkeypatch):
    from segue.train.vae_loss import DecoderObjective

    c = CONTINUATIONS["smoke"]
    monkeypatch.setitem(CONTINUATIONS, "keyframes", replace(c, name="keyframes", decoder_steps=2,
                                                            decoder_endpoint_weight=4.0))  # fmt: skip
    seen = []
    call = DecoderObjective.__call__

    def spy(self, parts, batch):
        seen.append(self.endpoint_weight)
        return call(self, parts, batch)

    monkeypatch.setattr(DecoderObjective, "__call__", spy)
    continue_from_bundle(base, "keyframes", tmp_path / "run")
    assert seen == [4.0, 4.0]  # both decoder steps
    record = json.loads((tmp_path / "run" / "continuation.json").read_text())
    assert record["continuation"]["decoder_endpoint_weight"] == 4.0  # the lineage says how it was trained
    with pytest.raises(ValueError, match=r"continuation 'x': decoder_endpoint_weight must be > 0, got -1"):
        replace(c, name="x", decoder_endpoint_weight=-1.0)


def test_a_continuation_can_widen_the_decoder_and_leave_the_dit_as_it_is(base, tmp_path, monkeypatch):
    c = CONTINUATIONS["smoke"]
    width = segue.load(base).config.vae.dim + 2
    wide = replace(c, name="wide", stage=replace(c.stage, steps=0), decoder_dim=width, decoder_steps=2,
                   decoder_cooldown=1)  # fmt: skip
    monkeypatch.setitem(CONTINUATIONS, "wide", wide)
    new = continue_from_bundle(base, "wide", tmp_path / "run")
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
    # bench/ckpt_bundle.py --decoder: the decoder phase's latest checkpoint at its width, the bundle's DiT
    (tmp_path / "run" / "vae-decoder" / "ema.pt").unlink()
    spec = importlib.util.spec_from_file_location("ckpt_bundle", Path(__file__).parents[1] / "bench" / "ckpt_bundle.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mid = tmp_path / "mid.safetensors"
    argv = ["ckpt_bundle.py", str(tmp_path / "run"), "--from-bundle", str(base), "--decoder", "--out", str(mid)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert segue.load(mid).config.vae.decoder_dim == width
    rebuilt = read_bundle_weights(mid)
    for part in after:
        assert all(torch.equal(after[part][k], rebuilt[part][k]) for k in after[part]), part
    with pytest.raises(ValueError, match=r"continuation 'x': the DiT stage needs steps >= 0 \(0: the bundle's DiT"):
        replace(wide, name="x", insert_blocks=(0,))
    with pytest.raises(ValueError, match=r"continuation 'x': a widened decoder \(decoder_dim\) needs decoder_steps"):
        replace(wide, name="x", decoder_steps=0, decoder_cooldown=0)
    with pytest.raises(ValueError, match=r"decoder_cooldown must be in 0..decoder_steps \(2\), got 3"):
        replace(wide, name="x", decoder_cooldown=3)


def test_the_decoder_can_train_on_the_latents_the_model_generates(base, tmp_path, monkeypatch):
    from segue.train.generated import GeneratedClips
    from segue.train.vae_loss import DecoderObjective

    c = CONTINUATIONS["smoke"]
    gen = replace(c, name="gen", stage=replace(c.stage, steps=0), decoder_steps=2, decoder_generated=3,
                  generated_start=5, generated_repeat=2)  # fmt: skip
    monkeypatch.setitem(CONTINUATIONS, "gen", gen)
    seen = []
    call = DecoderObjective.__call__

    def spy(self, parts, batch):
        seen.append(tuple(batch["latent"].shape) if "latent" in batch else None)
        return call(self, parts, batch)

    monkeypatch.setattr(DecoderObjective, "__call__", spy)
    new = continue_from_bundle(base, "gen", tmp_path / "run")
    gen_dir = tmp_path / "run" / "generated"
    stored = torch.load(gen_dir / "part-00000.pt", weights_only=True)
    cfg = segue.load(base).config
    lat_t = (c.stage.frames - 1) // cfg.vae.temporal_factor + 1
    lat_hw = c.stage.size[0] // cfg.vae.spatial_factor
    assert stored.shape == (3, cfg.vae.z_dim, lat_t, lat_hw, lat_hw) and stored.dtype == torch.float16
    # the decoder saw generated latents, cropped as the preset crops its clips (24 px)
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

    c = CONTINUATIONS["smoke"]
    keep = replace(c, name="keep", stage=replace(c.stage, steps=0), decoder_steps=2, decoder_generated=2,
                   generated_start=5, generated_repeat=1, decoder_keep_shapes=True)  # fmt: skip
    monkeypatch.setitem(CONTINUATIONS, "keep", keep)
    seen = []
    call = DecoderObjective.__call__

    def spy(self, parts, batch):
        seen.append((self.anchor, sorted(batch)))
        return call(self, parts, batch)

    monkeypatch.setattr(DecoderObjective, "__call__", spy)
    continue_from_bundle(base, "keep", tmp_path / "run")
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


def test_a_continuation_ships_its_decoder_part_of_the_way_and_the_bench_blends_the_same(base, tmp_path, monkeypatch):
    from segue.train.recipe import load_ema

    c = CONTINUATIONS["smoke"]
    whole = replace(c, name="whole", stage=replace(c.stage, steps=0), decoder_steps=2)
    part = replace(whole, name="part", decoder_blend=0.25)
    monkeypatch.setitem(CONTINUATIONS, "whole", whole)
    monkeypatch.setitem(CONTINUATIONS, "part", part)
    run = tmp_path / "run"
    trained = read_bundle_weights(continue_from_bundle(base, "whole", run))["vae"]
    (run / "model.safetensors").rename(tmp_path / "whole.safetensors")
    blended = read_bundle_weights(continue_from_bundle(base, "part", run))["vae"]  # the same decoder phase, resumed
    start, ema = read_bundle_weights(base)["vae"], load_ema(run / "vae-decoder", "vae")
    assert any(not torch.equal(start[k], trained[k]) for k in start if k.startswith("decoder."))
    for k in start:  # the bundle stores fp16: the blend of the fp32 states, rounded once
        assert torch.equal(trained[k], ema[k].half().float()), k
        assert torch.equal(blended[k], torch.lerp(start[k], ema[k], 0.25).half().float()), k
    assert read_bundle_lineage(run / "model.safetensors")[-1]["continuation"]["decoder_blend"] == 0.25
    # bench/blend_bundles.py from the two bundles: the same line, within fp16 rounding of the stored END
    spec = importlib.util.spec_from_file_location("blend", Path(__file__).parents[1] / "bench" / "blend_bundles.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.safetensors"
    argv = ["blend_bundles.py", str(base), str(tmp_path / "whole.safetensors"), "--t", "0.25", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    again = read_bundle_weights(out)
    for k in start:
        torch.testing.assert_close(again["vae"][k], blended[k], atol=2e-3, rtol=2e-3)
    assert all(torch.equal(again["dit"][k], v) for k, v in read_bundle_weights(base)["dit"].items())
    assert read_bundle_lineage(out)[-1]["blend"] == {"start": base.name, "end": "whole.safetensors", "t": 0.25,
                                                     "parts": ["vae"]}  # fmt: skip
    monkeypatch.setattr(sys, "argv", [*argv[:-2], "--parts", "vae,unet"])
    with pytest.raises(SystemExit, match=r"--parts: \['unet'\]; allowed: dit, vae, text, image"):
        bench.main()
    with pytest.raises(ValueError, match=r"decoder_blend must be in \(0, 1\] and below 1 only with decoder_steps"):
        replace(whole, name="x", decoder_blend=0.0)
    with pytest.raises(ValueError, match=r"decoder_blend must be in \(0, 1\] and below 1 only with decoder_steps"):
        replace(c, name="x", decoder_steps=0, decoder_blend=0.5)


def test_a_continuation_ships_its_trained_parts_part_of_the_way(base, tmp_path, monkeypatch):
    c = CONTINUATIONS["smoke"]
    whole = replace(c, name="whole", decoder_steps=0)
    part = replace(whole, name="part", stage_blend=0.25)  # the same stage (name and run): resumed, then blended
    monkeypatch.setitem(CONTINUATIONS, "whole", whole)
    monkeypatch.setitem(CONTINUATIONS, "part", part)
    run = tmp_path / "run"
    trained = read_bundle_weights(continue_from_bundle(base, "whole", run))
    blended = read_bundle_weights(continue_from_bundle(base, "part", run))
    start = read_bundle_weights(base)
    for p in ("dit", "text", "image"):
        assert any(not torch.equal(start[p][k], trained[p][k]) for k in start[p]), p  # the stage moved it
        for k in start[p]:  # the blend of the stored (fp16) states, within one more fp16 rounding
            want = torch.lerp(start[p][k], trained[p][k], 0.25)
            torch.testing.assert_close(blended[p][k], want, atol=2e-3, rtol=2e-3, msg=f"{p}.{k}")
    assert all(torch.equal(blended["vae"][k], v) for k, v in start["vae"].items())  # no decoder phase
    assert read_bundle_lineage(run / "model.safetensors")[-1]["continuation"]["stage_blend"] == 0.25
    with pytest.raises(ValueError, match=r"stage_blend must be in \(0, 1\] and below 1 only with a DiT stage"):
        replace(whole, name="x", stage_blend=1.5)
    with pytest.raises(ValueError, match=r"stage_blend must be in \(0, 1\] and below 1 only with a DiT stage"):
        replace(whole, name="x", stage=replace(c.stage, steps=0), stage_blend=0.5)


def test_a_time_budget_picks_the_steps_that_fit_and_a_resume_keeps_them(base, tmp_path, monkeypatch):
    c = CONTINUATIONS["smoke"]
    long = replace(c, name="long", stage=replace(c.stage, steps=400, warmup=2, cooldown=100), decoder_steps=0)
    monkeypatch.setitem(CONTINUATIONS, "long", long)
    timed = []

    def probe(*a, **kw):
        timed.append(0.25)
        return 0.25  # seconds per step, as if measured: the budget then cuts the stage

    monkeypatch.setattr(continuation, "seconds_per_step", probe)
    ticks = iter([100.0, 112.0])  # the call starts, then the cache and the probe took 12 s
    out = tmp_path / "run"
    new = continue_from_bundle(base, "long", out, time_budget=20.0, clock=lambda: next(ticks))
    info = json.loads((out / "budget.json").read_text())
    assert len(timed) == 1 and info["seconds_per_step"] == 0.25
    assert info["time_budget_s"] == 20.0 and info["seconds_left"] == 8.0 and info["of"] == 400
    assert info["steps"] == continuation.budget_steps(8.0, 0.25, 400) < 400
    steps = info["steps"]
    log = [json.loads(line) for line in (out / long.stage.name / "log.jsonl").read_text().splitlines()]
    assert len(log) == steps and json.loads((out / long.stage.name / "done").read_text())["steps"] == steps
    lineage = read_bundle_lineage(new)[-1]
    assert lineage["steps"] == lineage["phase_steps"]["dit"] == steps
    assert json.loads((out / "continuation.json").read_text())["steps"] == steps
    # the cooldown scaled with the steps: the lr of the last step is the cooled-down one
    if steps > long.stage.warmup:
        assert log[-1]["lr"] < long.stage.lr
    # a resume, with another budget or none, keeps the length chosen and probes nothing
    before, lineage_before = read_bundle_weights(new), read_bundle_lineage(new)
    continue_from_bundle(base, "long", out, time_budget=1e6)
    continue_from_bundle(base, "long", out)
    after = read_bundle_weights(out / "model.safetensors")
    assert len(timed) == 1 and read_bundle_lineage(out / "model.safetensors") == lineage_before
    assert all(torch.equal(before[p][k], after[p][k]) for p in before for k in before[p])


def test_the_step_probe_leaves_the_models_and_random_state_as_they_were(base, monkeypatch):
    from segue.train.latents import CachedFLF2VObjective
    from segue.train.recipe import stage_train_config

    model = segue.load(base)
    parts = {"dit": model.dit.requires_grad_(True), "text": model.text_encoder, "image": model.image_encoder}
    before = {k: v.clone() for k, v in model.dit.state_dict().items()}
    cache = CachedClips(_smoke_cache(base))
    cfg = stage_train_config(CONTINUATIONS["smoke"].stage, 2, 0, Path("unused"))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    per_step = continuation.seconds_per_step(parts, CachedFLF2VObjective(shift=3.0, modes={"first_last": 1.0}),
                                             cache, cfg, steps=4)  # fmt: skip
    assert per_step > 0 and torch.equal(torch.rand(3), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.dit.state_dict().items())
    # collating in workers: a step takes the longer of its training and its share of the collating
    monkeypatch.setattr(continuation.Trainer, "time_steps", lambda self, n: [(9.0, 9.0)] + [(0.4, 0.1)] * (n - 1))
    loss = CachedFLF2VObjective(shift=3.0, modes={"first_last": 1.0})
    m = continuation.WORKER_MARGIN
    got = [continuation.seconds_per_step(parts, loss, cache, replace(cfg, num_workers=w), steps=4) for w in (0, 2, 8)]
    assert got == pytest.approx([0.5, 0.2 * m, 0.1 * m])


def _smoke_cache(base: Path) -> Path:
    """The latent cache of the smoke continuation on ``base`` (built once next to it)."""
    out = base.parent / "smoke-cache-run"
    if not (out / "latents" / "meta.pt").is_file():
        continue_from_bundle(base, "smoke", out)
    return out / "latents"


def test_durations_and_budget_errors_are_clear(base, tmp_path, capsys):
    assert [continuation.parse_duration(t) for t in ("420", "420s", "7m", "1.5h", " 2M ")] == [
        420.0, 420.0, 420.0, 5400.0, 120.0,
    ]  # fmt: skip
    for bad in ("", "m", "-3", "0", "7 min", "soon"):
        with pytest.raises(InputError, match="is not a positive duration"):
            continuation.parse_duration(bad)
    assert continuation.budget_steps(100.0, 1.0, 1000) == 90 and continuation.budget_steps(100.0, 1.0, 50) == 50
    assert continuation.budget_steps(0.5, 1.0, 1000) == 1
    out = tmp_path / "r"
    assert main(["-q", "train", "--time-budget", "7m", "--out", str(out)]) == 2
    assert "--time-budget and --workers need --continue-from" in capsys.readouterr().err
    args = ["-q", "train", "--continue-from", str(base), "--continuation", "smoke", "--out", str(out)]
    assert main([*args, "--time-budget", "soon"]) == 2
    assert "--time-budget: 'soon' is not a positive duration" in capsys.readouterr().err
    assert main([*args, "--workers", "-1"]) == 2
    assert "--workers must be >= 0, got -1" in capsys.readouterr().err
    assert not out.exists()
