"""bench/gpu.py's step machinery on CPU at a small size: every lossless option matches the plain path and
diffusers' transformer holds the same weights (what the GPU table's relative-error column relies on)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


def test_small_step_table_on_cpu(capsys):
    import gpu

    gpu.main(["--small", "--device", "cpu", "--cases", "480p", "--dtype", "float32", "--iters", "1", "--warmup", "0",
              "--options", "plain,fused,cfg-batch,fp8,diffusers"])  # fmt: skip
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert {"plain", "fused", "cfg-batch", "fp8", "diffusers"} <= rows.keys()
    err = {k: float(v[7]) for k, v in rows.items() if k != "option"}
    assert err["plain"] == 0.0
    assert err["fused"] < 1e-5 and err["cfg-batch"] < 1e-5  # lossless within fp32 rounding
    assert err["diffusers"] < 1e-4  # same weights through diffusers' own arithmetic
    assert 1e-4 < err["fp8"] < 0.1  # lossy, measured, not broken
    assert rows["fp8"][2].strip() == "yes"


def test_no_gpu_rows_say_not_measured(capsys, monkeypatch):
    import gpu

    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    gpu.main(["--options", "plain,lossless,diffusers"])
    out = capsys.readouterr().out
    assert "No GPU here: not measured." in out
    assert out.count("| not measured |") == 6  # 3 options x 480p and 720p
    assert "75,600 tokens" in out and "32,760 tokens" in out  # the 14B sizes (SPEC section 7)


def test_caption_effect_scores_a_group():
    import numpy as np
    from caption_effect import group_effect

    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 256, (5, 8, 8, 3)).astype(np.uint8) for _ in range(3)]
    # videos equal to their own truths: the caption moves the video exactly as far as the paths differ
    sm, st, own, n = group_effect(truths, truths)
    assert sm == st > 0 and (own, n) == (6, 6)
    # the same video (truth 0) for every caption: no spread; video 0 wins both its comparisons, videos 1 and 2
    # lose theirs against truth 0 and, between truths 1 and 2, exactly one of them wins
    same = [truths[0]] * 3
    sm, st, own, n = group_effect(same, truths)
    assert sm == 0.0 and n == 6 and own == 3
    # the endpoints (frames 0 and F-1) do not count
    edited = [t.copy() for t in truths]
    for e in edited:
        e[0] = e[-1] = 0
    assert group_effect(edited, truths) == group_effect(truths, truths)


def test_caption_effect_splits_the_spread_by_pair_of_paths():
    import numpy as np
    from caption_effect import pair_spreads

    rng = np.random.default_rng(1)
    truths = [rng.integers(0, 256, (5, 8, 8, 3)).astype(np.uint8) for _ in range(3)]
    paths = ["still", "circle_cw", "circle_ccw"]
    # the "clockwise" caption's video equals the "counterclockwise" one's: that pair has no spread, the others do
    videos = [truths[0], truths[2], truths[2]]
    out = pair_spreads(videos, truths, paths)
    assert sorted(out) == ["circle_ccw / circle_cw", "circle_ccw / still", "circle_cw / still"]
    m, t = out["circle_ccw / circle_cw"]
    assert m == 0.0 and t > 0
    # "still" (video = truth 0) against "clockwise" (video = truth 2), on the middle frames 1..3 only
    m, t = out["circle_cw / still"]
    mid = slice(1, 4)
    rms = lambda a, b: np.sqrt(np.mean((a[mid].astype(float) - b[mid].astype(float)) ** 2))  # noqa: E731
    assert abs(m - rms(truths[0], truths[2])) < 1e-9 and abs(t - rms(truths[0], truths[1])) < 1e-9


def test_caption_paths_counts_paths_and_the_circles_sense(tmp_path, capsys):
    import json

    from caption_paths import main

    def rec(path: str, correct: bool, distances: list) -> dict:
        return {"path": path, "model_correct": correct, "model_distances": distances}

    loop = [rec("circle_ccw", False, [3.0, 1.0, 12.0]), rec("still", True, [9.0, 1.0, 8.0]),
            rec("circle_cw", True, [12.0, 1.0, 3.0])]  # fmt: skip
    lost = [rec("circle_cw", False, ["inf", "inf", "inf"]), rec("circle_ccw", False, [5.0, 5.0, 5.0])]
    slide = [rec("straight", True, [0.5, 7.0]), rec("wave", False, [0.4, 6.0])]
    f = tmp_path / "eval.json"
    f.write_text(json.dumps({"groups": [{"results": loop}, {"results": slide}, {"results": lost}]}))
    assert main([str(f)]) == 0
    header, _, row = capsys.readouterr().out.strip().splitlines()
    assert header.split(" | ")[2:-1] == ["circle_ccw", "circle_cw", "still", "straight", "wave"]
    # 3 of 7 followed; the first loop group's videos differ by (9 + 0 + 9) / 3 px, the second lost its object
    assert row == f"| {f} | 3/7 | 0/2 | 1/2 | 1/1 | 1/1 | 0/1 | 6.0 nan |"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main([str(bad)]) == 2
    assert f"{bad}: not a segue eval.json (KeyError" in capsys.readouterr().err


def test_sense_probe_trains_on_loop_groups_and_measures_the_word(tmp_path, capsys):
    import pytest
    import sense_probe

    from segue.cli import main as cli
    from segue.data.synthetic import SyntheticVideos

    assert cli(["-q", "train", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    sense_probe.main([str(tmp_path / "model.safetensors"), "--groups", "2", "--start", "9", "--steps", "2",
                      "--every", "1", "--text-dropout", "0"])  # fmt: skip
    rows = [r.split("|") for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "step" not in r]
    assert [int(r[1]) for r in rows] == [0, 1, 2]
    assert rows[0][2].strip() == "nan" and all(float(r[2]) > 0 for r in rows[1:])  # no loss before a step
    ratios = [(float(r[3]), float(r[4])) for r in rows]
    assert all(0 <= a < 10 and 0 <= b < 10 for a, b in ratios) and ratios[1] != ratios[0]  # the model trained
    data = SyntheticVideos("train", length=30, frames=5, size=(32, 32), ambiguous_fraction=0.0)
    with pytest.raises(ValueError, match="training clips 9..11 are not a loop group"):
        sense_probe.loop_group(data, 9)
    with pytest.raises(SystemExit):
        sense_probe.main(["--start", "10"])


def test_oracle_inbetween_redraws_only_what_the_inputs_do_not_show(tmp_path, capsys):
    import dataclasses
    import json

    import numpy as np
    import oracle_inbetween as oracle
    import pytest

    from segue.data.synthetic import sample_scene
    from segue.evaluate import video_psnr

    rng = np.random.default_rng(0)
    arc = sample_scene(5, path="arc_over", camera=False)
    arc = dataclasses.replace(arc, main=dataclasses.replace(arc.main, turns=0.0), second=None)
    truth = oracle.render_frames(arc)
    alts = [dataclasses.replace(arc, main=oracle.redraw_mover(arc.main, arc, rng)) for _ in range(8)]
    assert {a.main.amp for a in alts} != {arc.main.amp} and {a.main.easing for a in alts} == {"smooth", "linear"}
    for a in alts:  # same shape, place and keyframes; only the unseen draws move
        frames = oracle.render_frames(a)
        assert np.abs(frames[[0, -1]] - truth[[0, -1]]).max() <= 0.5
        assert (a.main.p0, a.main.p1, a.main.radius, a.main.path) == (arc.main.p0, arc.main.p1, arc.main.radius,
                                                                      "arc_over")  # fmt: skip
    mean, kept, draw = oracle.posterior_mean(arc, 16, rng)
    assert kept == 16 and video_psnr(oracle.to_uint8(mean), oracle.to_uint8(truth), 1, -1) > 25
    # one draw is another arc through the same keyframes, not the true one
    assert np.abs(draw[[0, -1]] - truth[[0, -1]]).max() <= 0.5 and not np.array_equal(draw, truth)
    still = dataclasses.replace(arc, main=dataclasses.replace(arc.main, path="still", p1=arc.main.p0))
    mean, kept, draw = oracle.posterior_mean(still, 4, rng)  # nothing unseen moves a shape that stays: one video
    assert kept == 4 and np.array_equal(oracle.to_uint8(mean), oracle.to_uint8(oracle.render_frames(still)))
    assert np.array_equal(oracle.to_uint8(draw), oracle.to_uint8(oracle.render_frames(still)))
    scores = tmp_path / "eval.json"  # a segue eval.json's per-clip in-between PSNRs
    scores.write_text(json.dumps({"clips": [{"index": i, "model": {"psnr": 20.0 + i}} for i in range(3)]}))
    assert oracle.main(["--clips", "3", "--samples", "4", "--split", "val", "--eval", str(scores)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("| the model (dB) |")
    rows = [r.split("|") for r in out[2:]]
    total = rows[-1]
    assert total[1].strip() == "all" and total[2].strip() == "3" and sum(int(r[2]) for r in rows[:-1]) == 3
    assert float(total[3]) + 2 < float(total[4]) <= oracle.CAP  # the posterior mean beats the crossfade
    assert "| gain | one posterior draw (dB) |" in out[0] and 0 < float(total[6]) <= oracle.CAP
    assert float(total[7]) == 21.0  # the model's mean over the same clips
    with pytest.raises(SystemExit):
        oracle.main(["--samples", "0"])
    with pytest.raises(SystemExit):
        oracle.main(["--clips", "4", "--eval", str(scores)])
    assert "scores clips [0, 1, 2], not all of 0..3" in capsys.readouterr().err


def test_gpu_continue_runs_a_budgeted_continuation_and_brings_the_bundle_back_in_parts(tmp_path, capsys):
    import json

    import gpu_continue
    import pytest

    from segue.cli import main

    base = tmp_path / "base"
    assert main(["-q", "train", "--preset", "smoke", "--out", str(base)]) == 0
    out, run = tmp_path / "OUT", tmp_path / "run"
    args = ["--out", str(out), "--bundle", str(base / "model.safetensors"), "--continuation", "smoke", "--device",
            "cpu", "--workers", "1", "--run", str(run), "--budget", "600", "--part-bytes", "200000"]  # fmt: skip
    assert gpu_continue.main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    parts = [n for n in names if n.startswith("model.part-")]
    whole = (run / "model.safetensors").read_bytes()
    assert len(parts) == -(-len(whole) // 200000) > 1
    assert {"train.log", "budget.json", "continuation.json", "log.jsonl", "model.sha256"} <= set(names)
    budget = json.loads((out / "budget.json").read_text())
    assert budget["steps"] == budget["of"] == 2  # the smoke stage's 2 steps fit 600 s
    log = (out / "train.log").read_text()
    assert "torch " in log and "time budget:" in log and "segue train exited 0" in log
    joined = tmp_path / "back" / "model.safetensors"
    assert gpu_continue.main(["--join", str(out), "--to", str(joined)]) == 0
    assert joined.read_bytes() == whole
    (out / parts[-1]).write_bytes(b"x")  # a part that came back cut
    with pytest.raises(SystemExit, match="do not give the sha256"):
        gpu_continue.main(["--join", str(out), "--to", str(tmp_path / "bad.safetensors")])
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob("bad*"))


def test_flow_loss_scores_bundles_on_the_same_draws_and_refuses_another_vaes_cache(tmp_path, capsys):
    import flow_loss
    import pytest

    import segue
    from segue.bundle import save_bundle
    from segue.data.synthetic import SyntheticVideos
    from segue.models.dit import WanDiT
    from segue.models.encoders import ImageEncoder, TextEncoder
    from segue.models.vae import WanVAE
    from segue.testing import randomize_
    from segue.tokenizer import load_tokenizer, save_tiny_tokenizer
    from segue.train.latents import build_latent_cache
    from segue.train.recipe import PRESETS

    cfg = PRESETS["smoke"].model
    save_tiny_tokenizer(tmp_path / "tok", cfg.text.vocab_size)
    tok = load_tokenizer(tmp_path / "tok")
    modules = {
        "dit": randomize_(WanDiT(cfg.dit), 1),
        "vae": randomize_(WanVAE(cfg.vae), 2),
        "text": randomize_(TextEncoder(cfg.text, tok).model, 3),
        "image": randomize_(ImageEncoder(cfg.image).model, 4),
    }
    a = save_bundle(tmp_path / "a.safetensors", cfg, modules, tmp_path / "tok", torch.float32)
    modules["dit"] = randomize_(WanDiT(cfg.dit), 5)  # another DiT on the same VAE and encoders
    b = save_bundle(tmp_path / "b.safetensors", cfg, modules, tmp_path / "tok", torch.float32)
    data = SyntheticVideos("train", length=8, frames=5, size=(16, 16))
    cache = build_latent_cache(segue.load(a).vae, data, 4, tmp_path / "run" / "latents", ["first_last"], progress=False)

    def table(*args: str) -> dict[str, list[str]]:
        assert flow_loss.main([*args, "--cache", str(cache), "--clips", "3"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "| bundle | run | vs first |"
        return {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in lines[2:]}

    rows = table(str(a), str(b))
    assert rows["a"][1] == "+0.0%" and rows["a"][0] != rows["b"][0] and rows["b"][1] != "+0.0%"
    assert table(str(b))["b"][0] == rows["b"][0]  # the same clips and draws, whichever bundles share the run
    assert torch.is_grad_enabled()  # scored without gradients, and the caller's mode left as it was
    assert table(str(a), "--sigma-min", "0")["a"][0] != rows["a"][0]  # the noise levels are the option's
    another_vae = randomize_(WanVAE(cfg.vae), 9)
    other = build_latent_cache(another_vae, data, 4, tmp_path / "other", ["first_last"], progress=False)
    with pytest.raises(SystemExit, match="other was built by another VAE than .*a.safetensors's"):
        flow_loss.main([str(a), "--cache", str(other), "--clips", "3"])
    with pytest.raises(SystemExit, match="holds 4 clips, --clips asks for 5"):
        flow_loss.main([str(a), "--cache", str(cache), "--clips", "5"])
    with pytest.raises(SystemExit, match="has no 'first' latents"):
        flow_loss.main([str(a), "--cache", str(cache), "--clips", "3", "--mode", "first"])
