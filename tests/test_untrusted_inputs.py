"""Files segue reads are untrusted (docs/security.md): crafted bundles, checkpoints, run folders, LoRAs and images
give one clear error, run no code, write no file and leave the inputs as they were.

CLI cases run ``python -m segue`` in a subprocess with a private TMPDIR: exit code 2, one line naming the file,
key or argument and what is allowed, no traceback, nothing left in TMPDIR, inputs byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import segue
from segue.checkpoint import plan_checkpoint
from segue.errors import CheckpointError, InputError
from segue.loader import DEFAULT_MODEL
from segue.media import load_image
from segue.testing import make_tiny_checkpoint
from segue.train import checkpoints as trainer_checkpoints

PROMPT = "a triangle moves"


def _digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of the file itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    tmp = tmp_path / "private-tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "segue", *args], capture_output=True, text=True, env=env, timeout=600)
    left = [p.name for p in tmp.iterdir()]
    assert not left, f"stray files in TMPDIR: {left}"
    return r


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def keyframes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    rng = np.random.default_rng(0)
    for name in ("first.png", "last.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / name)
    return d


def _crafted_bundle(path: Path, **extra_meta: str) -> Path:
    """A file with the built-in model's segue metadata plus ``extra_meta``, and one tiny tensor."""
    with safe_open(str(DEFAULT_MODEL), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(extra_meta)
    save_file({"dit.x": torch.zeros(2)}, str(path), metadata=meta)
    return path


# ---------------------------------------------------------------------------------------------
# Names read from files never become paths.


@pytest.mark.parametrize("name", ["../escaped.json", "/ABS/escaped.json", "sub/tokenizer.json", "notes.txt"])
def test_a_bundle_naming_other_tokenizer_files_is_refused_and_writes_nothing(tmp_path, name):
    name = name.replace("/ABS", str(tmp_path))
    bundle = _crafted_bundle(tmp_path / "crafted.safetensors", **{f"tokenizer/{name}": "{}"})
    before = _digest(tmp_path)
    with pytest.raises(CheckpointError, match="tokenizer/") as err:
        segue.load(bundle)
    assert repr(f"tokenizer/{name}") in str(err.value) and "allowed: tokenizer/tokenizer.json" in str(err.value)
    r = _cli(tmp_path, "info", str(bundle))  # info reports it, writes nothing
    _one_line_error(r, repr(f"tokenizer/{name}"))
    assert r.stdout == ""
    assert _digest(tmp_path) == before  # nothing written next to the bundle, above it, or at the absolute name
    assert not (tmp_path / "escaped.json").exists() and not (tmp_path.parent / "escaped.json").exists()


@pytest.mark.parametrize("lineage", ["not json", '{"a": 1}', "[1, 2]"])
def test_a_malformed_lineage_is_named_when_read_and_says_nothing_about_trained_clips(tmp_path, lineage):
    from segue.bundle import read_bundle_lineage, read_bundle_metadata

    bundle = _crafted_bundle(tmp_path / "crafted.safetensors", segue_lineage=lineage)
    config, _ = read_bundle_metadata(bundle)  # the config still reads; no trained clip is guessed
    assert config.defaults.trained_frames is None and config.defaults.trained_size is None
    with pytest.raises(CheckpointError, match="segue_lineage is not a JSON list of objects"):
        read_bundle_lineage(bundle)


def test_loading_the_built_in_model_leaves_no_temporary_folder(tmp_path):
    tmp = tmp_path / "private-tmp"
    tmp.mkdir()
    code = "import segue; p = segue.load(); print(p.text_encoder.tokenizer.ids('a cat'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TMPDIR": str(tmp)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("1]")  # tokenized, EOS (id 1) appended
    assert [p.name for p in tmp.iterdir()] == []


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/ABS/outside.safetensors", "a/b.safetensors", ".."])
def test_a_shard_index_naming_files_outside_the_folder_is_refused(tmp_path, official_ckpt, shard):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(official_ckpt, ckpt)
    shard = shard.replace("/ABS", str(tmp_path))
    index = ckpt / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = sorted(data["weight_map"])[0]
    real = ckpt / data["weight_map"][key]
    (tmp_path / "outside.safetensors").write_bytes(real.read_bytes())  # a readable file is there
    data["weight_map"][key] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as err:
        plan_checkpoint(ckpt)
    msg = str(err.value)
    assert str(index) in msg and repr(key) in msg and repr(shard) in msg and "no folder part" in msg


class _RunsCode:
    """Unpickling this writes a marker file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "code ran"))


def _crafted_run(run: Path, marker: Path, latest: str = "step-00000001.pt") -> Path:
    ckpt = run / "ckpt"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1, "model": {}, "ema": {}, "rng": [_RunsCode(marker)]}, ckpt / "step-00000001.pt")
    (ckpt / "latest").write_text(latest)
    return ckpt / "step-00000001.pt"


def test_a_training_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "marker"
    path = _crafted_run(tmp_path / "run", marker)
    before = _digest(tmp_path)
    with pytest.raises(CheckpointError, match="does not unpickle"):
        trainer_checkpoints.latest_ema(tmp_path / "run")
    with pytest.raises(CheckpointError, match="does not unpickle"):
        trainer_checkpoints.load_training_checkpoint(path)
    assert not marker.exists() and _digest(tmp_path) == before
    # the file really is armed: a plain unpickle would have run it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("latest", ["../../outside.pt", "/ABS/outside.pt", "step-1.pt", "sub/step-00000001.pt"])
def test_ckpt_latest_names_only_a_checkpoint_inside_the_run(tmp_path, latest):
    latest = latest.replace("/ABS", str(tmp_path))
    _crafted_run(tmp_path / "run", tmp_path / "marker", latest)
    with pytest.raises(CheckpointError) as err:
        trainer_checkpoints.latest_checkpoint_path(tmp_path / "run" / "ckpt")
    assert "latest" in str(err.value) and repr(latest) in str(err.value) and "step-NNNNNNNN.pt" in str(err.value)
    with pytest.raises(CheckpointError):
        trainer_checkpoints.latest_ema(tmp_path / "run")


def test_training_checkpoints_hold_no_pickled_objects(tmp_path):
    from segue.train.trainer import TrainConfig, Trainer

    model = torch.nn.Linear(3, 2)
    data = [{"x": torch.randn(3)} for _ in range(4)]
    cfg = TrainConfig(steps=2, batch_size=2, ckpt_every=1, out_dir=str(tmp_path / "run"))
    Trainer({"m": model}, lambda parts, b: parts["m"](b["x"]).square().mean(), data, cfg).run(stop_at=1)
    path = trainer_checkpoints.latest_checkpoint_path(tmp_path / "run" / "ckpt")
    ck = torch.load(path, weights_only=True)  # raises if anything but tensors and plain values is inside
    assert ck["step"] == 1 and isinstance(ck["rng"][0]["numpy"][1], torch.Tensor)


def test_a_latent_cache_naming_other_files_is_refused(tmp_path):
    from segue.train.latents import CachedClips

    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save({"config": {"modes": []}, "shards": ["../outside.pt"], "none": torch.zeros(1)}, cache / "meta.pt")
    with pytest.raises(InputError, match="shard-NNNNN.pt"):
        CachedClips(cache)


# ---------------------------------------------------------------------------------------------
# Config files with values of the wrong type.


@pytest.mark.parametrize(
    ("layout", "file", "key", "value", "allowed"),
    [
        ("official", "config.json", "dim", "32", "must be an integer"),
        ("official", "config.json", "eps", "small", "must be a finite number"),
        ("diffusers", "vae/config.json", "z_dim", "sixteen", "must be an integer"),
        ("diffusers", "transformer/config.json", "patch_size", [1, 2], "must be a list of 3 integers"),
        ("diffusers", "text_encoder/config.json", "d_model", 32.5, "must be an integer"),
        ("diffusers", "image_encoder/config.json", "hidden_act", 3, "must be a string"),
    ],
)
def test_a_config_value_of_the_wrong_type_names_file_key_value_and_type(tmp_path, layout, file, key, value, allowed):
    ckpt = make_tiny_checkpoint(tmp_path / layout, layout=layout)
    cfg_file = ckpt / file
    data = json.loads(cfg_file.read_text())
    data[key] = value
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as err:
        segue.load(ckpt)
    msg = str(err.value)
    assert (
        str(cfg_file) in msg and key in msg and repr(value).replace("'", "") in msg.replace("'", "") and allowed in msg
    )
    assert "\n" not in msg


def test_the_cli_refuses_a_wrong_typed_config_before_loading(tmp_path, keyframes):
    ckpt = make_tiny_checkpoint(tmp_path / "diffusers", layout="diffusers")
    cfg_file = ckpt / "vae" / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"z_dim": 16', '"z_dim": "sixteen"'))
    before = {**_digest(ckpt), **_digest(keyframes)}
    out = tmp_path / "out" / "v.mp4"
    r = _cli(tmp_path, "generate", "--ckpt-dir", str(ckpt), "--first", str(keyframes / "first.png"),
             "--prompt", PROMPT, "--out", str(out))  # fmt: skip
    _one_line_error(r, str(cfg_file), "z_dim", "sixteen", "must be an integer")
    assert {**_digest(ckpt), **_digest(keyframes)} == before and not out.exists()


# ---------------------------------------------------------------------------------------------
# LoRA files are checked from their header, before any model loads.


def _lora(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 32, generator=g),
          "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(32, 4, generator=g)}  # fmt: skip
    save_file(sd, str(path))
    return path


def test_a_truncated_or_foreign_lora_is_refused_from_its_header(tmp_path):
    from segue.accel.options import SpeedOptions
    from segue.lora import check_lora_file

    good = _lora(tmp_path / "good.safetensors")
    assert len(check_lora_file(good)) == 2
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"cut.safetensors is truncated: its header describes \d+ bytes"):
        SpeedOptions(loras=((str(cut), 1.0),))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="junk.safetensors is not a readable safetensors file"):
        check_lora_file(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"model.weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(InputError, match=r"foreign.safetensors has no LoRA tensor names .*lora_A.weight"):
        check_lora_file(foreign)


def test_the_cli_refuses_a_truncated_lora_before_loading(tmp_path, keyframes):
    lora = _lora(tmp_path / "style.safetensors")
    lora.write_bytes(lora.read_bytes()[:-50])
    before = {**_digest(lora), **_digest(keyframes)}
    out = tmp_path / "v.mp4"
    r = _cli(tmp_path, "generate", "--first", str(keyframes / "first.png"), "--prompt", PROMPT,
             "--lora", str(lora), "--out", str(out))  # fmt: skip
    _one_line_error(r, str(lora), "truncated")
    assert {**_digest(lora), **_digest(keyframes)} == before and not out.exists()


# ---------------------------------------------------------------------------------------------
# Images.


def test_an_image_over_the_decompression_bomb_limit_is_one_line(tmp_path, keyframes):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 9_000)).save(bomb)  # 90 M pixels: over PIL's 89.5 M limit, a small file
    before = _digest(bomb)
    with pytest.raises(InputError, match=r"first frame: .*bomb.png has more pixels than the \d+ allowed"):
        load_image(bomb, "first frame")
    out = tmp_path / "v.mp4"
    r = _cli(tmp_path, "generate", "--first", str(bomb), "--prompt", PROMPT, "--out", str(out))
    _one_line_error(r, str(bomb), "more pixels than")
    assert _digest(bomb) == before and not out.exists()


def test_numpy_images_are_accepted_as_uint8_rgb_only():
    arr = np.random.default_rng(0).integers(0, 255, (6, 10, 3), dtype=np.uint8)
    im = load_image(arr, "first frame")
    assert im.size == (10, 6) and np.array_equal(np.asarray(im), arr)
    for bad in (arr.astype(np.float32), arr[..., 0], arr[..., :2]):
        with pytest.raises(InputError, match=r"first frame: a numpy image must be a uint8 \[H, W, 3\] RGB array"):
            load_image(bad, "first frame")
    with pytest.raises(InputError, match="first frame must be an image file path"):
        load_image(5, "first frame")  # type: ignore[arg-type]


def test_jpeg_keyframes_are_turned_upright_by_their_exif_orientation(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    up = np.asarray(load_image(tmp_path / "phone.jpg"))
    assert up.shape == (40, 20, 3)  # upright: 20 wide, 40 tall
    assert up[5, 10, 2] > 200 and up[35, 10, 0] > 200  # the blue half is on top after turning clockwise


# ---------------------------------------------------------------------------------------------
# segue.load arguments and segue info.


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": ""}, "path must be a checkpoint folder or a segue .safetensors bundle"),
        ({"path": 3}, "path must be a checkpoint folder"),
        ({"speed": "fast"}, "speed must be a segue.accel.options.SpeedOptions (or None), got 'fast'"),
        ({"device": "gpu"}, "unknown device 'gpu'; allowed: 'cpu', 'cuda', 'cuda:N'"),
        ({"device": 1.5}, "device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got 1.5"),
        ({"dtype": "fp64"}, "unknown dtype 'fp64'; choose one of: fp32, bf16, fp16"),
        ({"dtype": torch.int8}, "dtype torch.int8 is not a run dtype; choose one of: fp32, bf16, fp16"),
    ],
)
def test_load_checks_its_arguments_before_reading_anything(monkeypatch, kwargs, message):
    import segue.loader

    def no_plan(*a, **kw):
        raise AssertionError("a checkpoint was read before the arguments were checked")

    monkeypatch.setattr(segue.loader, "plan_checkpoint", no_plan)
    with pytest.raises(InputError) as err:
        segue.load(**kwargs)
    assert message in str(err.value)


def test_info_on_a_missing_folder_is_an_error(tmp_path):
    r = _cli(tmp_path, "info", str(tmp_path / "nowhere"))
    _one_line_error(r, str(tmp_path / "nowhere"), "not found")


def _damaged_checkpoints(tmp_path: Path, official: Path, diffusers: Path) -> dict[str, tuple[Path, str]]:
    """Copies of the tiny checkpoints, each damaged one way: (folder, what the error must name)."""
    out = {}
    ckpt = tmp_path / "truncated"
    shutil.copytree(official, ckpt)
    shard = sorted(ckpt.glob("diffusion_pytorch_model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # cut inside the header
    out["truncated safetensors"] = (ckpt, shard.name)
    ckpt = tmp_path / "corrupt"
    shutil.copytree(diffusers, ckpt)
    weights = ckpt / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\xff" * 16  # the JSON header is no longer JSON
    weights.write_bytes(bytes(data))
    out["corrupt safetensors"] = (ckpt, "model.safetensors")
    ckpt = tmp_path / "wrong-type"
    shutil.copytree(official, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_heads"] = "two"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out["wrong-typed config value"] = (ckpt, "num_heads")
    return out


def test_info_on_a_damaged_checkpoint_is_a_one_line_error(tmp_path, official_ckpt, diffusers_ckpt):
    for what, (ckpt, needle) in _damaged_checkpoints(tmp_path, official_ckpt, diffusers_ckpt).items():
        before = _digest(ckpt)
        r = _cli(tmp_path, "info", str(ckpt))
        line = _one_line_error(r, str(ckpt), needle)
        assert r.stdout == "", what
        assert _digest(ckpt) == before, what
        # the same checkpoint through the Python API: a CheckpointError, caught as an InputError
        with pytest.raises(InputError) as err:
            segue.load(ckpt)
        assert isinstance(err.value, CheckpointError) and needle in str(err.value), (what, line)


def test_a_checkpoint_error_is_an_input_error():
    assert issubclass(CheckpointError, InputError)
    try:
        plan_checkpoint(Path(__file__))  # a file that is no checkpoint
    except InputError as e:  # what a Python caller catches for any bad input
        assert type(e) is CheckpointError and str(Path(__file__)) in str(e)
    else:
        raise AssertionError("no error for a file that is no checkpoint")


def test_info_describes_a_segue_bundle(tmp_path):
    r = _cli(tmp_path, "info", str(DEFAULT_MODEL))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "layout: segue" in r.stdout and "missing:" not in r.stdout
    assert "tokenizer: tokenizer.json, tokenizer_config.json (inside the bundle)" in r.stdout
    assert "DiT:" in r.stdout and "keys ok" in r.stdout
