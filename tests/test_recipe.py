"""Recipes: the TOML format (checked key by key), the shipped ones, and a whole chain run end to end."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import segue
from segue.bundle import read_bundle_lineage
from segue.cli import main
from segue.errors import InputError
from segue.loader import DEFAULT_MODEL
from segue.train.recipe import load_recipe, parse_recipe, shipped_recipes

TINY = Path(__file__).parent / "data" / "tiny.toml"


def _contents(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _with(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_a_chain_trains_every_stage_resumes_and_ships_generates_and_evaluates(tmp_path, capsys):
    recipe = load_recipe(TINY)
    out = tmp_path / "run"
    assert main(["-q", "train", "--recipe", str(TINY), "--out", str(out)]) == 0
    bundle = out / "model.safetensors"
    assert capsys.readouterr().out.strip() == str(bundle)
    base, nxt = out / recipe.scratch.name, out / recipe.continuations[0].name
    # every phase finished and logged one line per step
    phases = [base / "vae", *(base / s.name for s in recipe.scratch.stages), base / "vae-decoder", nxt / "dit",
              nxt / "vae-decoder"]  # fmt: skip
    for phase in phases:
        steps = json.loads((phase / "done").read_text())["steps"]
        assert len((phase / "log.jsonl").read_text().splitlines()) == steps, phase
    # the stages at the first stage's size trained on the latent cache, built once; the larger one did not
    cached = [json.loads((base / s.name / "data.json").read_text())["cached"] for s in recipe.scratch.stages]
    assert cached == [True, True, False] and (base / "latents" / "done").is_file()
    # the shipped VAE: the encoder of the VAE phase, the decoder fine-tuned on it afterwards
    first = segue.load(base / "model.safetensors")
    vae_ema = torch.load(base / "vae" / "ema.pt", weights_only=True)["vae"]
    dec_ema = torch.load(base / "vae-decoder" / "ema.pt", weights_only=True)["vae"]
    for k, v in first.vae.state_dict().items():
        source = dec_ema if k.startswith(("decoder.", "conv2.")) else vae_ema
        assert torch.allclose(v.float(), source[k].half().float()), k
    assert first.config.vae.latent_std != (1.0,) * 16  # the normalisation was measured on the data
    # the chain's result is its last stage's bundle, with the whole lineage
    assert bundle.read_bytes() == (nxt / "model.safetensors").read_bytes()
    lineage = read_bundle_lineage(bundle)
    assert lineage[0] == {"recipe": "tiny", "scratch": "base", "steps_scale": 1.0, "seed": 0}
    assert lineage[1]["continuation"] == json.loads(json.dumps(asdict(recipe.continuations[0])))
    pipe = segue.load(bundle)
    assert pipe.config.name == "segue-tiny" and pipe.config.defaults.frames == 17
    video = pipe.generate("examples/first.png", "examples/last.png", "the red circle moves to the right", steps=2)
    assert video.frames.shape == (17, 64, 64, 3) and video.fps == 8
    # a second run finds every stage done and trains nothing; the same tensors and metadata
    before = _contents(bundle)
    logs = {p: (p / "log.jsonl").read_text() for p in phases}
    assert main(["-q", "train", "--recipe", str(TINY), "--out", str(out)]) == 0
    after = _contents(bundle)
    assert before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert all((p / "log.jsonl").read_text() == text for p, text in logs.items())
    # an interrupted stage resumes: the continuation's bundle and done marker gone, its checkpoints kept
    (nxt / "model.safetensors").unlink()
    (nxt / "dit" / "done").unlink()
    assert main(["-q", "train", "--recipe", str(TINY), "--out", str(out)]) == 0
    assert (nxt / "dit" / "log.jsonl").read_text() == logs[nxt / "dit"]  # resumed at its last step: none again
    # a run started before a key existed (its run.json lacks it) resumes where the key holds its default
    record = json.loads((out / "run.json").read_text())
    assert record["recipe"]["vae"]["recolour"] == record["recipe"]["vae"]["still_clips"] == 0.0
    del record["recipe"]["vae"]["recolour"], record["recipe"]["vae"]["still_clips"], record["recipe"]["vae"]["photos"]
    for cont in record["recipe"]["continuations"]:
        del cont["recolour"], cont["photos"]
    (out / "run.json").write_text(json.dumps(record))
    assert main(["-q", "train", "--recipe", str(TINY), "--out", str(out)]) == 0
    record["recipe"]["vae"]["recolour"] = 0.5
    (out / "run.json").write_text(json.dumps(record))
    assert main(["-q", "train", "--recipe", str(TINY), "--out", str(out)]) == 2
    assert "holds a run of another recipe or settings (recipe differ)" in capsys.readouterr().err
    del record["recipe"]["vae"]["recolour"]
    (out / "run.json").write_text(json.dumps(record))
    # the same folder with another scale is refused, naming what differs
    assert main(["-q", "train", "--recipe", str(TINY), "--out", str(out), "--steps-scale", "2"]) == 2
    assert "holds a run of another recipe or settings (steps_scale differ)" in capsys.readouterr().err
    ev = tmp_path / "eval"
    args = ["-q", "eval", "--ckpt", str(bundle), "--clips", "2", "--groups", "1", "--steps", "2", "--out", str(ev)]
    assert main(args) == 0
    assert json.loads((ev / "eval.json").read_text())["pass"] is False  # a barely trained model
    assert (ev / "eval.md").is_file() and (ev / "contact_sheet.png").is_file()


def test_unknown_keys_are_refused_with_the_keys_allowed_there():
    text = TINY.read_text()
    with pytest.raises(InputError) as e:
        parse_recipe(_with(text, "vae_steps = 2", "vae_step = 2"), "r.toml")
    msg = str(e.value)
    assert msg.startswith("r.toml: scratch.vae_step: unknown key; allowed here: name, stages, vae_steps, vae_lr")
    with pytest.raises(InputError, match=r"r.toml: continue\[0\].stage.lrate: unknown key; allowed here: steps, lr,"):
        parse_recipe(_with(text, "steps = 2, lr = 1e-3, modes", "steps = 2, lrate = 1e-3, modes"), "r.toml")
    with pytest.raises(InputError, match=r"r.toml: seed: unknown key; allowed at the top: name, from, model, vae"):
        parse_recipe("seed = 1\n" + text, "r.toml")
    with pytest.raises(InputError, match=r"r.toml: model.dim: missing \(required here: dim\)"):
        parse_recipe(_with(text, "dim = 32\n", ""), "r.toml")


def test_toml_syntax_errors_give_the_line_and_column():
    text = TINY.read_text()
    bad = _with(text, "vae_steps = 2", "vae_steps 2")
    line = bad.splitlines().index("vae_steps 2") + 1
    with pytest.raises(InputError, match=rf"r.toml: not valid TOML: .*\(at line {line}, column 11\)"):
        parse_recipe(bad, "r.toml")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("vae_steps = 2", 'vae_steps = "2"', "scratch.vae_steps: expected an integer, got '2'"),
        ("vae_steps = 2", "vae_steps = 2.5", "scratch.vae_steps: expected an integer, got 2.5"),
        ("vae_steps = 2", "vae_steps = true", "scratch.vae_steps: expected an integer, got True"),
        ("vae_steps = 2", "vae_steps = -1", r"scratch.vae_steps: -1 is out of range \(allowed: >= 0\)"),
        ("batch = 2", "batch = 0", r"vae.batch: 0 is out of range \(allowed: >= 1\)"),
        ("lr = 1e-3, modes", "lr = 0, modes", r"continue\[0\].stage.lr: 0.0 is out of range \(allowed: > 0\)"),
        ("crop = [24, 24]", "crop = [24]", r"vae.crop: expected an array of 2 \(an integer, an integer\)"),
        ("crop = [24, 24]", "crop = [24, 0]", r"vae.crop: 0 is out of range"),
        ("crop = [24, 24]", "crop = [40, 24]", r"vae: crop \[40, 24\] does not fit clips of size \[32, 32\]"),
        ("batch = 2", 'batch = 2\nrecon = "l2"', "vae.recon: 'l2' is not one of l1, mse"),
        ("cache_clips = 4\n", "cache_clips = 4\nsigma_min = 1.0\n", r"sigma_min: 1.0 is out of range .*< 1"),
        ("modes = { first_last = 0.9, first = 0.1 }, size = [32, 32], frames = 5, batch_size = 2 }",
         "modes = { first_last = 0.9, last = 0.1 }, size = [32, 32], frames = 5, batch_size = 2 }",
         r"stage 'dit': modes must be non-negative weights of modes among"),
        ("cache_clips = 4\n", "cache_clips = 4\ndecoder_cooldown = 3\n",
         r"continuation 'next': decoder_cooldown must be in 0..decoder_steps \(1\), got 3"),
        ("cache_clips = 4\n", "cache_clips = 4\nsampling = { fps = 4 }\n",
         r"continuation 'next': sampling keys \['fps'\] not all among"),
        ('name = "next"', 'name = "base"', "stage names must differ .* repeated: base"),
        ('name = "next"', 'name = "../next"', r"continuation name '../next' must be letters, digits, .*folder"),
        ('name = "stage2-flf"', 'name = "a/b"', r"stage name 'a/b' must be letters"),
        ('name = "tiny"', 'name = "tiny"\nfrom = "builtin"', "a recipe with \\[scratch\\] starts from scratch"),
        ("batch = 2\n", "batch = 2\nbroad = 1.5\n", r"vae.broad: 1.5 is out of range \(allowed: >= 0 and <= 1\)"),
        ("batch = 2\n", "batch = 2\nstills = -1\n", r"vae.stills: -1 is out of range \(allowed: >= 0\)"),
        ("batch = 2\n", "batch = 2\nflat_stills = 1.5\n", r"vae.flat_stills: 1.5 is out of range"),
        ("batch = 2\n", "batch = 2\nrecolour = 1.5\n", r"vae.recolour: 1.5 is out of range"),
        ("batch = 2\n", 'batch = 2\nphotos = "flickr"\n', r"vae.photos: 'flickr' is not one of pypi, pypi\+debian"),
        ("batch = 2\n", "batch = 2\nstill_clips = 0.5\n", r"vae: still_clips is a share in \[0, 1\] that needs stills"),
        ("batch = 2\n", "batch = 2\nrecolour = 0.5\n", r"vae: recolour changes broad clips' photos: it needs broad"),
        ('name = "next"', 'name = "next"\nrecolour = 0.5', r"continuation 'next': recolour changes .* needs broad > 0"),
        ('name = "next"', 'name = "next"\nvae_steps = 1\nvae_anchor = 1.0',
         r"continuation 'next': vae_anchor trains with recon = \"mse\" in \[vae\], got 'l1'"),
        ('name = "next"', 'name = "next"\nvae_anchor = -1.0', r"vae_anchor: -1.0 is out of range \(allowed: >= 0\)"),
        ('name = "tiny"', 'name = "tiny"\nfrom = "/etc/x"', r"from: '/etc/x'; allowed: \"builtin\""),
    ],
)  # fmt: skip
def test_values_are_typed_and_ranged(old, new, message):
    with pytest.raises(InputError, match=rf"^r.toml: .*{message}"):
        parse_recipe(_with(TINY.read_text(), old, new), "r.toml")


def test_recipes_are_read_by_path_or_shipped_name_and_a_bad_one_is_one_line_on_the_cli(tmp_path, capsys):
    assert {"default", "gpu", "broad", "keyframes"} <= set(shipped_recipes())
    assert load_recipe("gpu").start == "builtin" and load_recipe("gpu").scratch is None
    broad = load_recipe("broad")  # the built-in model on broad clips: the whole VAE, then the DiT
    assert broad.start == "builtin" and broad.vae.broad > 0 and broad.continuations[0].vae_steps > 0
    keyframes = load_recipe("keyframes").continuations[0]  # a new VAE from its skeleton, then the DiT on it
    assert keyframes.vae_start == "skeleton" and keyframes.vae_anchor == 0 and keyframes.stage.steps > 0
    out = tmp_path / "run"
    assert main(["train", "--recipe", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--recipe nope: no such file, and no shipped recipe" in err and "default" in err
    bad = tmp_path / "bad.toml"
    bad.write_text(_with(TINY.read_text(), "lr = 1e-3\n", "lr = fast\n"))
    assert main(["train", "--recipe", str(bad), "--out", str(out)]) == 2
    assert f"error: {bad}: not valid TOML: " in capsys.readouterr().err
    # refused before anything is written: a recipe from scratch given --from, a budget for a scratch stage,
    # a missing bundle, a bad duration, a missing GPU
    for args, message in (
        (["--from", str(DEFAULT_MODEL)], "recipe 'tiny' trains from scratch ([scratch]); --from is for"),
        (["--time-budget", "7m"], "--time-budget and --workers are for the continuations of a recipe without"),
        (["--steps-scale", "0"], "--steps-scale must be positive, got 0.0"),
    ):
        assert main(["train", "--recipe", str(TINY), "--out", str(out), *args]) == 2
        assert message in capsys.readouterr().err
    gpu = ["train", "--recipe", "gpu", "--out", str(out)]
    assert main([*gpu, "--from", str(tmp_path / "missing.safetensors")]) == 2
    assert f"--from: no such bundle file: {tmp_path / 'missing.safetensors'}" in capsys.readouterr().err
    assert main([*gpu, "--time-budget", "soon"]) == 2
    assert "--time-budget: 'soon' is not a positive duration" in capsys.readouterr().err
    assert main([*gpu, "--workers", "-1"]) == 2
    assert "--workers must be >= 0, got -1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*gpu, "--device", "cuda"]) == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err
    assert not out.exists()


def test_the_default_recipe_is_the_chain_recorded_in_the_built_in_model():
    """Each stage of recipes/default.toml carries the values the shipped bundle's lineage records for it."""
    recipe = load_recipe("default")
    lineage = read_bundle_lineage(DEFAULT_MODEL)
    assert lineage[0]["preset"] == recipe.scratch.name  # the first model, from scratch
    shipped = [e["continuation"] for e in lineage[1:]]
    assert [c["name"] for c in shipped] == [c.name for c in recipe.continuations]
    for c, record in zip(recipe.continuations, shipped):
        mine = json.loads(json.dumps(asdict(c)))
        for key, value in record.items():
            if key == "stage":
                assert {k: v for k, v in value.items() if k != "name"} == {
                    k: v for k, v in mine["stage"].items() if k in value and k != "name"
                }, c.name
            elif key != "preset":  # the VAE clips now come from the recipe's [vae]
                assert mine[key] == value, (c.name, key)
    # the model and its VAE phases as the bundle has them (before the DiT grew and the decoder widened)
    config = segue.load().config
    first = recipe.model.config()
    assert (first.dit.dim, first.dit.patch_size, first.vae.dim, first.vae.z_dim) == (
        config.dit.dim, config.dit.patch_size, config.vae.dim, config.vae.z_dim,
    )  # fmt: skip
    layers = first.dit.num_layers + sum(len(c.insert_blocks) for c in recipe.continuations)
    assert layers == config.dit.num_layers


def test_the_default_recipe_trains_every_stage_on_clips_no_stage_before_used():
    recipe = load_recipe("default")
    s = recipe.scratch
    windows = [(0, s.cache_clips)]  # the first model's cache
    vae_seeds = {s.seed, s.seed + 1}  # its VAE and decoder crops
    for c in recipe.continuations:
        assert (c.stage.size, c.stage.frames) == (s.stages[0].size, s.stages[0].frames)
        # the DiT's cache, and the clips whose generated latents the decoder learns from
        for start, count in ((c.cache_start, c.cache_clips), (c.generated_start, c.decoder_generated)):
            assert all(start + count <= a or start >= b for a, b in windows), (c.name, windows)
            windows.append((start, start + count))
        for steps, seed in ((c.vae_steps, c.vae_seed), (c.decoder_steps, c.decoder_seed)):
            if steps:
                assert seed not in vae_seeds, (c.name, seed)
                vae_seeds.add(seed)


def test_the_default_recipe_fits_the_size_budget():
    from segue.parallel.cost import param_counts

    recipe = load_recipe("default")
    assert sum(param_counts(recipe.model.config()).values()) * 2 < 25e6  # fp16 bundle under 25 MB
    assert all(c.bundle_dtype == "float16" for c in recipe.continuations)


def _shrunk(recipe):
    """``recipe``'s chain, every stage and phase as it is, on a tiny model and tiny clips."""
    from dataclasses import replace

    def small(stage):
        return replace(stage, size=(48, 48) if stage.size != (64, 64) else (32, 32), frames=5, batch_size=2)

    s = recipe.scratch
    return replace(
        recipe,
        model=replace(recipe.model, vocab=160, dim=32, heads=2, vae_dim=4),
        vae=replace(recipe.vae, frames=5, size=(32, 32), crop=(24, 24), batch=2, stats_batches=1),
        scratch=replace(s, stages=tuple(small(t) for t in s.stages)),
        continuations=tuple(
            replace(c, stage=small(c.stage), decoder_dim=None if c.decoder_dim is None else 6)
            for c in recipe.continuations
        ),
    )


def test_the_default_chain_runs_whole_at_a_tiny_scale(tmp_path):
    from segue.train.chain import train_recipe

    recipe = _shrunk(load_recipe("default"))
    out = train_recipe(recipe, tmp_path / "run", steps_scale=1e-4)
    lineage = read_bundle_lineage(out)
    assert [e.get("scratch") or e["continuation"]["name"] for e in lineage] == [s.name for s in recipe.stages()]
    config = segue.load(out).config
    assert config.dit.num_layers == recipe.model.layers + sum(len(c.insert_blocks) for c in recipe.continuations)
    assert config.vae.decoder_dim == 6
    assert config.defaults.guidance == dict(recipe.continuations[-1].sampling)["guidance"]


def test_later_defaults_are_the_defaults_of_their_keys():
    import dataclasses

    from segue.train.recipe import LATER_DEFAULTS, Continuation, VAEClips, without_later_defaults

    defaults = {f.name: f.default for cls in (Continuation, VAEClips) for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}  # fmt: skip
    assert all(defaults[k] == v for k, v in LATER_DEFAULTS.items()), LATER_DEFAULTS
    record = {"a": 1, "photos": "pypi", "continuations": [{"vae_start": "bundle", "vae_steps": 3}, {"photos": "x"}]}
    assert without_later_defaults(record) == {"a": 1, "continuations": [{"vae_steps": 3}, {"photos": "x"}]}
