"""The latent cache: stored latents equal the VAE's encodes, the cached objective's loss equals the
uncached one, and an interrupted build resumes to the same contents."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from segue.data.synthetic import LOOP_GROUPS, SyntheticVideos, object_mask
from segue.errors import InputError
from segue.models.dit import WanDiT
from segue.models.encoders import ImageEncoder, TextEncoder
from segue.models.vae import WanVAE
from segue.testing import randomize_
from segue.tokenizer import load_tokenizer, save_tiny_tokenizer
from segue.train.flow import FLF2VObjective, conditioning_for_training, conditioning_from_given
from segue.train.latents import (
    CachedClips,
    CachedFLF2VObjective,
    GroupedClips,
    build_latent_cache,
    build_object_masks,
    cached_subset,
    latent_object_mask,
    shared_seeds,
)
from segue.train.recipe import load_recipe

CFG = load_recipe(Path(__file__).parent / "data" / "tiny.toml").model.config()  # tiny VAE (dim 4), DiT, encoders
N_CLIPS = 5
MODES = ("first_last", "first", "random_subset")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest (and far faster than two on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latents")
    vae = randomize_(WanVAE(CFG.vae), 3).eval().requires_grad_(False)
    data = SyntheticVideos("train", length=16, frames=5, size=(16, 16))
    path = build_latent_cache(vae, data, N_CLIPS, tmp / "cache", MODES, batch_size=2, progress=False, shard_size=2)
    videos = torch.stack([data[i]["video"] for i in range(N_CLIPS)])  # [5, 3, 5, 16, 16]
    return vae, data, path, videos, tmp


def test_cached_latents_equal_the_encodes(setup):
    vae, _, path, videos, _ = setup
    ds = CachedClips(path)
    assert len(ds) == N_CLIPS and ds.x0.dtype == torch.float32 and ds.modes == [*MODES, "none"]
    with torch.no_grad():
        assert _rel(ds.x0, vae.encode(videos)) < 1e-5
        items = [ds[i] for i in range(N_CLIPS)]
        for mode in ("first_last", "first"):
            y = conditioning_for_training(vae.encode, videos, [mode] * N_CLIPS)  # [5, 4 + z, T, h, w]
            assert _rel(ds.cond[mode], y[:, 4:]) < 1e-5, mode
            assert torch.equal(torch.stack([it["mask"][mode] for it in items]), y[:, :4])
        # one fixed subset per clip, from the clip index
        given = torch.stack([cached_subset(i, 5) for i in range(N_CLIPS)])
        assert torch.equal(ds.given["random_subset"], given)
        assert len({tuple(g.tolist()) for g in given}) > 1  # not the same subset everywhere
        y = conditioning_from_given(vae.encode, videos, given)
        assert _rel(ds.cond["random_subset"], y[:, 4:]) < 1e-5
        assert torch.equal(torch.stack([it["mask"]["random_subset"] for it in items]), y[:, :4])
        zero = vae.encode(torch.zeros_like(videos[:1]))[0]
        assert _rel(items[0]["cond"]["none"], zero) < 1e-5 and not items[0]["mask"]["none"].any()
    # CLIP frames: first, last, then the subset's first and last given frame, 8-bit exact
    for i, it in enumerate(items):
        idx = given[i].nonzero().flatten().tolist()
        frames = it["frames"].float() / 127.5 - 1.0  # [4, 3, H, W]
        assert torch.equal(frames, videos[i][:, [0, 4, idx[0], idx[-1]]].transpose(0, 1))
        assert it["caption"] == setup[1][i]["caption"]


def _parts(tmp: Path) -> dict:
    save_tiny_tokenizer(tmp / "tok", CFG.text.vocab_size)
    text = randomize_(TextEncoder(CFG.text, load_tokenizer(tmp / "tok")), 4).eval()
    image = randomize_(ImageEncoder(CFG.image), 5).eval()
    return {"dit": randomize_(WanDiT(CFG.dit), 6), "text": text, "image": image}


def test_cached_objective_loss_equals_uncached(setup):
    vae, data, path, videos, tmp = setup
    parts = _parts(tmp)
    ds = CachedClips(path)
    modes = {"first_last": 0.4, "first": 0.3, "none": 0.3}
    kw = dict(shift=3.0, modes=modes, caption_dropout=0.3)
    seeds = torch.tensor([101, 102, 103, 104, 105])
    drawn = FLF2VObjective(vae, **kw).draws(seeds, N_CLIPS, 5)
    assert set(drawn.modes) == set(modes) and any(drawn.drop) and not all(drawn.drop)  # every path is taken
    raw = {"video": videos, "caption": [data[i]["caption"] for i in range(N_CLIPS)], "seed": seeds}
    cached = {**default_collate([ds[i] for i in range(N_CLIPS)]), "seed": seeds}
    with torch.no_grad():
        ref = FLF2VObjective(vae, **kw)(parts, raw)
        ours = CachedFLF2VObjective(**kw)(parts, cached)
    assert _rel(ours, ref) < 1e-5

    # with random subsets among the modes: the same draws, so samples of the other modes match one by one,
    # and a random_subset sample differs only by its (cached, fixed) subset
    hybrid = {"first_last": 0.4, "first": 0.2, "none": 0.1, "random_subset": 0.3}
    obj, cobj = FLF2VObjective(vae, modes=hybrid), CachedFLF2VObjective(modes=hybrid)
    seeds = torch.arange(200, 200 + N_CLIPS)
    drawn = obj.draws(seeds, N_CLIPS, 5)
    assert "random_subset" in drawn.modes and len(set(drawn.modes)) > 1
    with torch.no_grad():
        for i, mode in enumerate(drawn.modes):
            one = {k: v[i : i + 1] for k, v in raw.items()} | {"seed": seeds[i : i + 1]}
            cone = {**default_collate([ds[i]]), "seed": seeds[i : i + 1]}
            ours = cobj(parts, cone)
            if mode == "random_subset":
                # the uncached loss on the cached subset: same sigma, noise, caption
                fixed = FLF2VObjective(vae, modes=hybrid)
                fixed.draws = _with_subset(fixed.draws, cached_subset(i, 5))  # type: ignore[method-assign]
                ref = fixed(parts, one)
            else:
                ref = obj(parts, one)
            assert _rel(ours, ref) < 1e-5, (i, mode)

    # a mode the cache lacks is a clear error
    small = tmp / "small"
    build_latent_cache(vae, data, 2, small, ["first_last"], progress=False)
    with pytest.raises(InputError, match="not in the latent cache"):
        CachedFLF2VObjective(modes=hybrid)(parts, {**default_collate([CachedClips(small)[0]]), "seed": seeds[:1]})


def test_latent_object_mask_folds_time_causally_and_pools_space():
    mask = torch.zeros(9, 16, 16, dtype=torch.bool)
    mask[5, 6, 9] = True  # frame 5 is in latent 2 (latent 0: frame 0; latent t: frames 4t-3..4t)
    m = latent_object_mask(mask, temporal=4, spatial=4, dilate=0)
    assert m.shape == (3, 4, 4) and m.sum() == 1 and m[2, 1, 2]
    grown = latent_object_mask(mask, temporal=4, spatial=4, dilate=1)
    assert grown.sum() == 9 and grown[2, 0:3, 1:4].all()
    first = torch.zeros(9, 16, 16, dtype=torch.bool)
    first[0, 0, 0] = True
    assert latent_object_mask(first, 4, 4, 0).nonzero().tolist() == [[0, 0, 0]]
    with pytest.raises(InputError, match="does not fold"):
        latent_object_mask(torch.zeros(8, 16, 16, dtype=torch.bool), 4, 4)


def test_object_weighted_loss(setup, monkeypatch):
    vae, data, path, videos, tmp = setup
    parts = _parts(tmp)
    kw = dict(shift=3.0, modes={"first_last": 1.0})
    seeds = torch.tensor([11, 12, 13])
    with pytest.raises(InputError, match="object masks"):  # no objects.pt yet
        one = {**default_collate([CachedClips(path)[0]]), "seed": seeds[:1]}
        CachedFLF2VObjective(object_weight=4.0, **kw)(parts, one)
    with pytest.raises(ValueError, match="object_weight must be >= 1"):
        CachedFLF2VObjective(object_weight=0.5, **kw)
    objects = tmp / "objects"
    build_latent_cache(vae, data, 3, objects, ["first_last"], progress=False)
    build_object_masks(data, objects, temporal=4, spatial=CFG.vae.spatial_factor, dilate=0)
    ds = CachedClips(objects)
    item = ds[1]
    assert item["objects"].shape == (2, *ds.x0.shape[-2:]) and item["objects"].any() and not item["objects"].all()
    want = latent_object_mask(torch.from_numpy(object_mask(data.scene(1))), 4, CFG.vae.spatial_factor, 0)
    assert torch.equal(item["objects"], want)
    batch = {**default_collate([ds[i] for i in range(3)]), "seed": seeds}
    with torch.no_grad():
        plain = CachedFLF2VObjective(**kw)(parts, batch)
        assert torch.equal(CachedFLF2VObjective(object_weight=1.0, **kw)(parts, batch), plain)
        weighted = CachedFLF2VObjective(object_weight=4.0, **kw)(parts, batch)
        # the weighted mean by hand: the squared error of each cell from a run that returns it unreduced
        errs = []
        orig = torch.nn.functional.mse_loss
        with monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "mse_loss", lambda a, b: errs.append((a - b) ** 2) or orig(a, b))
            CachedFLF2VObjective(**kw)(parts, batch)
        w = (1 + 3 * batch["objects"][:, None].float()).expand_as(errs[0])
        assert abs(float((w * errs[0]).sum() / w.sum()) - float(weighted)) < 1e-6 * float(weighted)
        assert abs(float(weighted) - float(plain)) > 1e-4 * float(plain)  # the weights change the loss
    # masks of another cache's shape are refused by name
    torch.save({"dilate": 0, "objects": torch.zeros(2, 2, 2, 2, dtype=torch.bool)}, objects / "objects.pt")
    with pytest.raises(InputError, match="objects.pt: masks"):
        CachedClips(objects)
    with pytest.raises(InputError, match="scene"):
        build_object_masks([data[0]] * 3, objects, 4, 4)


def test_group_members_share_their_draws(setup):
    vae, data, path, videos, tmp = setup
    parts = _parts(tmp)
    ds = GroupedClips(CachedClips(path), [None, 7, 7, 3, None])
    assert [ds[i]["group"] for i in range(N_CLIPS)] == [-1, 7, 7, 3, -1]
    assert torch.equal(ds[2]["x0"], CachedClips(path)[2]["x0"])
    seeds = torch.tensor([11, 12, 13, 14, 15])
    batch = {**default_collate([ds[i] for i in range(N_CLIPS)]), "seed": seeds}
    assert shared_seeds(batch).tolist() == [11, 12, 12, 14, 15]  # the first member's seed; loners keep theirs
    assert shared_seeds({**batch, "group": torch.tensor([5, -1, 5, 5, -1])}).tolist() == [11, 12, 11, 11, 15]
    kw = dict(shift=3.0, modes={"first_last": 0.5, "first": 0.5}, caption_dropout=0.3)
    pair = {**default_collate([ds[1], ds[2]]), "seed": seeds[1:3]}
    with torch.no_grad():
        shared = CachedFLF2VObjective(share_group_draws=True, **kw)(parts, pair)
        same = CachedFLF2VObjective(**kw)(parts, {**pair, "seed": torch.tensor([12, 12])})
        own = CachedFLF2VObjective(**kw)(parts, pair)
    assert torch.equal(shared, same) and abs(float(shared) - float(own)) > 1e-4 * float(own)
    with pytest.raises(InputError, match="need the batch's 'seed' and 'group'"):
        CachedFLF2VObjective(share_group_draws=True, **kw)(parts, {**default_collate([CachedClips(path)[0]]),
                                                                   "seed": seeds[:1]})  # fmt: skip
    with pytest.raises(ValueError, match="4 group ids for a dataset of 5 items"):
        GroupedClips(CachedClips(path), [None] * 4)
    with pytest.raises(ValueError, match="group ids must be >= 0"):
        GroupedClips(CachedClips(path), [None, -2, None, None, None])


def _with_subset(draws, subset: torch.Tensor):
    def patched(*args, **kw):
        d = draws(*args, **kw)
        d.given = [subset if m == "random_subset" else g for m, g in zip(d.modes, d.given)]
        return d

    return patched


def test_float16_storage(setup):
    vae, data, path, videos, tmp = setup
    half = build_latent_cache(vae, data, N_CLIPS, tmp / "half", MODES, progress=False, dtype=torch.float16)
    ds16, ds32 = CachedClips(half), CachedClips(path)
    assert ds16.x0.dtype == torch.float16 and ds16[0]["x0"].dtype == torch.float32
    err = _rel(ds16.x0, ds32.x0)
    assert 0 < err < 2**-11  # the rounding of float16, no more
    parts = _parts(tmp)
    seeds = torch.tensor([7, 8, 9, 10, 11])
    obj = CachedFLF2VObjective(modes={"first_last": 1.0})
    with torch.no_grad():
        a = obj(parts, {**default_collate([ds16[i] for i in range(N_CLIPS)]), "seed": seeds})
        b = obj(parts, {**default_collate([ds32[i] for i in range(N_CLIPS)]), "seed": seeds})
    assert 0 < _rel(a, b) < 1e-2


def test_interrupted_build_resumes_to_the_same_contents(setup, monkeypatch):
    vae, data, path, _, tmp = setup
    out = tmp / "resumed"
    calls = []
    encode = vae.encode

    def failing(video, *a, **kw):
        calls.append(video.shape[0])
        if len(calls) == 2:  # during the second shard
            raise KeyboardInterrupt
        return encode(video, *a, **kw)

    monkeypatch.setattr(vae, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(vae, data, N_CLIPS, out, MODES, batch_size=2, progress=False, shard_size=2)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "shard-00000.pt"]  # no partial file
    first = (out / "shard-00000.pt").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(vae, "encode", lambda video, *a, **kw: calls.append(video.shape[0]) or encode(video, *a, **kw))
    build_latent_cache(vae, data, N_CLIPS, out, MODES, batch_size=2, progress=False, shard_size=2)
    # shards 1 and 2 (clips 2-3, then 4: each with its 3 conditioning videos) and the zero video
    assert calls == [8, 4, 1] and (out / "shard-00000.pt").stat().st_mtime_ns == first
    for name in ("shard-00000.pt", "shard-00001.pt", "shard-00002.pt", "meta.pt"):
        a = torch.load(out / name, weights_only=True)
        b = torch.load(path / name, weights_only=True)
        assert _equal(a, b), name
    # a finished cache is not rebuilt; other settings are refused
    calls.clear()
    build_latent_cache(vae, data, N_CLIPS, out, MODES, batch_size=2, progress=False, shard_size=2)
    assert calls == []
    with pytest.raises(InputError, match="other settings.*n_clips"):
        build_latent_cache(vae, data, N_CLIPS - 1, out, MODES, batch_size=2, progress=False, shard_size=2)
    other = copy.copy(data)  # the same clips but for where their circles lie: another dataset
    other.loops = "any" if data.loops == "inward" else "inward"
    with pytest.raises(InputError, match=r"other settings \(dataset\)"):
        build_latent_cache(vae, other, N_CLIPS, out, MODES, batch_size=2, progress=False, shard_size=2)
    # the default share of loop groups is the cache's as recorded before the option; another share is refused
    other = copy.copy(data)
    other.loop_groups = LOOP_GROUPS
    build_latent_cache(vae, other, N_CLIPS, out, MODES, batch_size=2, progress=False, shard_size=2)
    assert calls == [] and "loop_groups" not in json.loads((out / "config.json").read_text())["dataset"]
    other.loop_groups = 0.6
    with pytest.raises(InputError, match=r"other settings \(dataset\)"):
        build_latent_cache(vae, other, N_CLIPS, out, MODES, batch_size=2, progress=False, shard_size=2)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_cache_build_reports_progress_within_a_shard(tmp_path, monkeypatch, capsys):
    """Progress lines come between shards too (a real shard takes minutes), with counts and an ETA."""
    import segue.train.latents as latents

    vae = randomize_(WanVAE(CFG.vae), 3).eval().requires_grad_(False)
    data = SyntheticVideos("train", length=16, frames=5, size=(16, 16))
    monkeypatch.setattr(latents, "PROGRESS_EVERY_S", 0.0)  # a line after every batch
    build_latent_cache(vae, data, 5, tmp_path / "c", ("first_last",), batch_size=2, shard_size=4)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("latent cache")]
    # batches end at clips 2, 4 (shard 1 ends there: no second line), 5 (shard 2)
    assert [ln.split()[2] for ln in lines] == ["2/5", "4/5", "5/5"]
    assert all(" s/clip  eta " in ln for ln in lines)
    monkeypatch.setattr(latents, "PROGRESS_EVERY_S", 3600.0)  # only the shard lines
    build_latent_cache(vae, data, 5, tmp_path / "d", ("first_last",), batch_size=2, shard_size=4)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("latent cache")]
    assert [ln.split()[2] for ln in lines] == ["4/5", "5/5"]


def test_workers_render_the_same_cache_and_object_masks(setup):
    vae, data, path, _, tmp = setup
    out = tmp / "workers"
    build_latent_cache(vae, data, N_CLIPS, out, MODES, batch_size=2, progress=False, shard_size=2, workers=2)
    for name in ("config.json",):
        assert (out / name).read_text() == (path / name).read_text()  # workers are not a setting of the cache
    for name in ("shard-00000.pt", "shard-00001.pt", "shard-00002.pt", "meta.pt"):
        assert _equal(torch.load(out / name, weights_only=True), torch.load(path / name, weights_only=True)), name
    build_object_masks(data, out, 4, CFG.vae.spatial_factor, dilate=1, workers=2)
    one = tmp / "one-process"
    build_latent_cache(vae, data, N_CLIPS, one, MODES, batch_size=2, progress=False, shard_size=2)
    build_object_masks(data, one, 4, CFG.vae.spatial_factor, dilate=1)
    a, b = (torch.load(p / "objects.pt", weights_only=True) for p in (out, one))
    assert a["objects"].shape == (N_CLIPS, 2, 16 // CFG.vae.spatial_factor, 16 // CFG.vae.spatial_factor)
    assert a["objects"].any() and _equal(a, b)
    with pytest.raises(InputError, match="workers >= 0"):
        build_latent_cache(vae, data, N_CLIPS, tmp / "bad", MODES, progress=False, workers=-1)
