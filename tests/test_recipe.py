"""The training recipe end to end at smoke size: train -> bundle -> generate -> eval, and resume."""

from __future__ import annotations

import json

import pytest
import torch

import segue
from segue.cli import main
from segue.train.recipe import PRESETS


def _contents(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_smoke_preset_trains_ships_generates_and_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["-q", "train", "--preset", "smoke", "--out", str(out)]) == 0
    bundle = out / "model.safetensors"
    assert capsys.readouterr().out.strip() == str(bundle)
    # every stage finished and logged one line per step
    for stage in ("vae", *(s.name for s in PRESETS["smoke"].stages), "vae-decoder"):
        assert (out / stage / "done").is_file()
        steps = json.loads((out / stage / "done").read_text())["steps"]
        assert len((out / stage / "log.jsonl").read_text().splitlines()) == steps
    # the stages at the first stage's size trained on the latent cache, built once; the larger one did not
    assert (out / "latents" / "done").is_file()
    cached = [json.loads((out / s.name / "data.json").read_text())["cached"] for s in PRESETS["smoke"].stages]
    assert cached == [True, True, False]
    pipe = segue.load(bundle)
    cfg = pipe.config
    assert cfg.name == "segue-smoke" and cfg.defaults.frames == 17 and cfg.defaults.fps == 8
    assert cfg.vae.latent_std != (1.0,) * 16  # the normalisation was measured on the data
    # the shipped VAE: the encoder of the VAE stage, the decoder fine-tuned on it afterwards
    vae_ema = torch.load(out / "vae" / "ema.pt", weights_only=True)["vae"]
    dec_ema = torch.load(out / "vae-decoder" / "ema.pt", weights_only=True)["vae"]
    shipped = {k: v.float() for k, v in pipe.vae.state_dict().items()}
    for k, v in shipped.items():
        source = dec_ema if k.startswith(("decoder.", "conv2.")) else vae_ema
        assert torch.allclose(v, source[k].half().float()), k
    assert any(not torch.equal(dec_ema[k], vae_ema[k]) for k in dec_ema if k.startswith("decoder."))
    video = pipe.generate("examples/first.png", "examples/last.png", "the red circle moves to the right", steps=2)
    assert video.frames.shape == (17, 64, 64, 3) and video.fps == 8
    # a second run finds every stage done and writes the same bundle (same tensors and metadata; the
    # header's key order is not fixed by safetensors, so bytes are not compared)
    before = _contents(bundle)
    assert main(["-q", "train", "--preset", "smoke", "--out", str(out)]) == 0
    after = _contents(bundle)
    assert before[0] == after[0] and before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    capsys.readouterr()
    ev = tmp_path / "eval"
    assert (
        main(
            [
                "-q",
                "eval",
                "--ckpt",
                str(bundle),
                "--clips",
                "2",
                "--groups",
                "1",
                "--steps",
                "2",
                "--guidance",
                "1",
                "--out",
                str(ev),
            ]
        )
        == 0
    )
    summary = json.loads((ev / "eval.json").read_text())
    assert summary["pass"] is False  # an untrained model does not beat the crossfade
    assert (ev / "eval.md").is_file() and (ev / "contact_sheet.png").is_file()


def test_unknown_preset_is_a_clear_error(capsys):
    assert main(["train", "--preset", "huge", "--out", "/tmp/never"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_training_on_a_missing_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--preset", "smoke", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_default_preset_fits_the_size_budget():
    from segue.parallel.cost import param_counts

    counts = param_counts(PRESETS["default"].model)
    assert sum(counts.values()) * 2 < 25e6  # fp16 bundle under 25 MB
    assert torch.finfo(getattr(torch, PRESETS["default"].bundle_dtype)).bits == 16
