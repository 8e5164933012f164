"""Training core: the flow objective and its conditioning, the VAE objective, the trainer (overfitting,
exact resume) and data parallel / FSDP2 training over 2 gloo processes against one process."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segue.config import REGISTRY, VAEConfig
from segue.models.dit import WanDiT
from segue.models.vae import WanVAE
from segue.pipeline import Pipeline
from segue.recipe import frame_mask, image_to_tensor
from segue.sampling.solvers import Euler
from segue.testing import join_workers, randomize_, rendezvous_env, start_workers
from segue.train.checkpoints import latest_ema
from segue.train.flow import (
    FLF2VObjective,
    conditioning_for_training,
    dit_loss,
    flow_targets,
    given_frames,
    mask_from_given,
    sample_sigmas,
)
from segue.train.trainer import TrainConfig, Trainer, lr_factor, sample_seed
from segue.train.vae_loss import (
    DecoderObjective,
    VAEObjective,
    endpoint_weighted,
    freeze_encoder,
    kl_divergence,
    narrow_posterior,
    vae_loss,
)

CFG = REGISTRY["tiny-flf2v"]
TIMEOUT_S = 80


# -- flow objective ----------------------------------------------------------------------------------


def test_sample_sigmas_range_and_shift():
    s1 = sample_sigmas(4096, 1.0, torch.Generator().manual_seed(0))
    s5 = sample_sigmas(4096, 5.0, torch.Generator().manual_seed(0))
    assert s1.shape == (4096,) and s1.dtype == torch.float32
    assert s1.min() >= 0 and s1.max() < 1 and s5.min() >= 0 and s5.max() < 1
    assert abs(s1.mean().item() - 0.5) < 0.02  # shift 1 is the plain uniform
    # same u: the shift moves every sigma up (more noise), order-preserving
    assert torch.all(s5 >= s1) and s5.mean() > s1.mean() + 0.2
    assert torch.all(s5[torch.argsort(s1)].diff() >= 0)
    # the formula, and a larger shift gives larger sigmas on average
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(s5, (5 * u / (1 + 4 * u)).float())
    means = [sample_sigmas(2048, s, torch.Generator().manual_seed(1)).mean().item() for s in (0.5, 1, 3, 16)]
    assert means == sorted(means)


def test_sample_sigmas_cut_below_sigma_min():
    plain = sample_sigmas(4096, 3.0, torch.Generator().manual_seed(0))
    assert torch.equal(sample_sigmas(4096, 3.0, torch.Generator().manual_seed(0), 0.0), plain)
    cut = sample_sigmas(4096, 3.0, torch.Generator().manual_seed(0), 0.5)
    assert cut.min() >= 0.5 and cut.max() < 1
    # the same shifted density, renormalised: its quantiles are the plain draw's above 0.5
    above = plain[plain >= 0.5]
    q = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(torch.quantile(cut, q), torch.quantile(above, q), atol=0.01)
    assert torch.all(cut[torch.argsort(plain)].diff() >= 0)  # one random number each, order kept
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=f"sigma_min must be in \\[0, 1\\), got {bad}"):
            sample_sigmas(4, 3.0, None, bad)


def test_objective_draws_no_sigma_below_its_sigma_min():
    cut = FLF2VObjective(vae=None, sigma_min=0.6).draws(torch.arange(256), 256, 5).sigma
    plain = FLF2VObjective(vae=None).draws(torch.arange(256), 256, 5).sigma
    assert cut.min() >= 0.6 and plain.min() < 0.3
    with pytest.raises(ValueError, match=r"sigma_min must be in \[0, 1\), got 1.5"):
        FLF2VObjective(vae=None, sigma_min=1.5)


def test_flow_targets_and_one_step_euler_inversion():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 2, 4, 4, generator=g), torch.randn(3, 16, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    x_t, v = flow_targets(x0, noise, sigma)
    assert torch.allclose(x_t[1], 0.5 * x0[1] + 0.5 * noise[1])
    assert torch.equal(v, noise - x0)
    for i in range(3):
        # the perfect velocity: one Euler step from sigma down to 0 lands on x0
        solver = Euler(torch.tensor([int(sigma[i] * 1000)]), torch.tensor([sigma[i].item(), 0.0]))
        assert torch.allclose(solver.step(v[i], x_t[i]), x0[i], atol=1e-6)
    assert torch.allclose(x_t - sigma.view(-1, 1, 1, 1, 1) * v, x0, atol=1e-6)


class _SpyDiT(torch.nn.Module):
    """Stands in for the DiT inside Pipeline.generate and records the conditioning it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = CFG.dit
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, context, clip=None, y=None, step=None):
        self.seen.append(y.clone())
        return torch.zeros_like(x)


class _FakeText:
    def encode(self, prompts):
        return [torch.zeros(3, CFG.dit.text_dim) for _ in prompts]


def _frame_img(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def test_first_last_conditioning_equals_inference():
    """y from the training conditioning == the y Pipeline.generate hands the DiT, for the same frames."""
    vae = randomize_(WanVAE(CFG.vae), seed=2).eval()
    spy = _SpyDiT()
    pipe = Pipeline(CFG, spy, vae, _FakeText(), None, torch.device("cpu"))
    first, last = _frame_img(1), _frame_img(2)
    frames = 9
    pipe.generate(first, last, frames=frames, size=(32, 32), steps=1, solver="euler", guidance=1.0)
    pipe.generate(first, None, frames=frames, size=(32, 32), steps=1, solver="euler", guidance=1.0)
    y_flf, y_i2v = (s[0] for s in spy.seen)  # [4 + z, T, h, w]

    video = torch.rand(2, 3, frames, 32, 32) * 2 - 1  # middle frames are dropped by the conditioning
    video[:, :, 0] = image_to_tensor(first)
    video[1, :, -1] = image_to_tensor(last)
    with torch.no_grad():
        y = conditioning_for_training(vae.encode, video, ["first", "first_last"])
    assert y.shape == (2, 20, 3, 4, 4)
    assert torch.equal(y[1, :4], y_flf[:4]) and torch.equal(y[0, :4], y_i2v[:4])  # masks exactly
    for got, ref in ((y[1], y_flf), (y[0], y_i2v)):
        rel = ((got[4:] - ref[4:]).norm() / ref[4:].norm()).item()
        assert rel < 1e-5, rel


def test_masks_and_conditioning_video_for_every_mode():
    frames, h, w = 9, 2, 3
    assert torch.equal(mask_from_given(given_frames("first_last", frames), h, w), frame_mask(frames, 3, h, w, True))
    assert torch.equal(mask_from_given(given_frames("first", frames), h, w), frame_mask(frames, 3, h, w, False))
    assert mask_from_given(given_frames("none", frames), h, w).sum() == 0
    g = torch.Generator().manual_seed(3)
    subsets = [given_frames("random_subset", frames, g) for _ in range(50)]
    assert all(1 <= s.sum() <= frames for s in subsets) and len({tuple(s.tolist()) for s in subsets}) > 30
    given = torch.tensor([0, 0, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    m = mask_from_given(given, h, w)  # latent 0 <- frame 0; latent 1 <- frames 1-4; latent 2 <- frames 5-8
    assert m[:, :, 0, 0].t().tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]]

    seen = []

    def capture(cond: torch.Tensor) -> torch.Tensor:
        seen.append(cond)
        return torch.zeros(cond.shape[0], 16, 3, 1, 1)

    video = torch.rand(4, 3, frames, 8, 8) + 0.5  # no zeros of its own
    modes = ["first_last", "first", "none", "random_subset"]
    y = conditioning_for_training(capture, video, modes, torch.Generator().manual_seed(0))
    cond = seen[0]
    kept = (cond != 0).flatten(3).any(-1).any(1)  # [B, F] frames the conditioning video keeps
    assert kept[0].tolist() == [True] + [False] * 7 + [True]
    assert kept[1].tolist() == [True] + [False] * 8 and not kept[2].any()
    assert torch.equal(
        cond[kept[:, None].expand_as(cond[:, :, :, 0, 0])], video[kept[:, None].expand_as(cond[:, :, :, 0, 0])]
    )
    assert torch.equal(y[3, :4, :, 0, 0], mask_from_given(kept[3], 1, 1)[:, :, 0, 0])


# -- tiny DiT: overfitting and the full objective ----------------------------------------------------


def _fixed_dit_batch(b: int = 2):
    g = torch.Generator().manual_seed(1)
    return dict(
        x0=torch.randn(b, 16, 2, 8, 8, generator=g),
        y=torch.randn(b, 20, 2, 8, 8, generator=g),
        context=torch.randn(b, 5, CFG.dit.text_dim, generator=g),
        clip=torch.randn(b, CFG.dit.image_pos_len, CFG.dit.image_dim, generator=g),
        sigma=sample_sigmas(b, 3.0, g),
        noise=torch.randn(b, 16, 2, 8, 8, generator=g),
    )


def test_tiny_dit_overfits_one_batch(tmp_path: Path):
    fixed = _fixed_dit_batch()
    torch.manual_seed(0)
    dit = WanDiT(CFG.dit)
    cfg = TrainConfig(steps=30, batch_size=2, lr=1e-2, grad_clip=1.0, ema_decay=0.9, out_dir=str(tmp_path))
    trainer = Trainer({"dit": dit}, lambda parts, batch: dit_loss(parts["dit"], **fixed), [{"i": 0}] * 4, cfg)
    losses = trainer.run()
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])  # measured: 2.37 -> 0.42
    log = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31)) and log[-1]["loss"] == losses[-1]
    assert {"lr", "grad_norm", "seconds"} <= set(log[0])
    ema = torch.load(tmp_path / "ema.pt")["dit"]
    w = dict(dit.named_parameters())["head.head.weight"]
    assert not torch.equal(ema["head.head.weight"], w) and ema["head.head.weight"].shape == w.shape


def test_ema_warmup_follows_the_model_early(tmp_path: Path):
    fixed = _fixed_dit_batch()
    torch.manual_seed(0)
    dit = WanDiT(CFG.dit)
    init = {n: p.detach().clone() for n, p in dit.named_parameters()}
    cfg = TrainConfig(steps=1, batch_size=2, lr=1e-2, ema_decay=0.999, ema_warmup=True, out_dir=str(tmp_path))
    trainer = Trainer({"dit": dit}, lambda parts, batch: dit_loss(parts["dit"], **fixed), [{"i": 0}] * 4, cfg)
    assert [trainer.ema_decay_at(s) for s in (1, 10, 100)] == [2 / 11, 11 / 20, 101 / 110]
    assert trainer.ema_decay_at(100_000) == 0.999
    trainer.run()
    # after one step the EMA is 9/11 of the way to the new weights (0.1% without the warmup)
    w = dict(dit.named_parameters())["head.head.weight"].detach()
    ema = trainer.ema_state_dicts()["dit"]["head.head.weight"]
    assert not torch.equal(w, init["head.head.weight"])
    assert torch.allclose(ema, init["head.head.weight"].lerp(w, 9 / 11), atol=1e-7)


def test_lr_schedule():
    cfg = TrainConfig(steps=11, lr=1.0, warmup=2, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(11)]
    assert f[:3] == [0.5, 1.0, 1.0] and abs(f[-1] - 0.1) < 1e-12 and f == sorted(f[:2]) + sorted(f[2:], reverse=True)


def test_wsd_schedule_holds_then_cools_down_linearly():
    cfg = TrainConfig(steps=10, lr=1.0, warmup=2, schedule="wsd", cooldown=4, min_lr_ratio=0.2)
    f = [lr_factor(s, cfg) for s in range(10)]
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
    assert all(abs(a - b) < 1e-12 for a, b in zip(f, expected, strict=True)), f
    # the same steps before the cooldown as a constant run: a constant stage can be turned into wsd at a checkpoint
    const = TrainConfig(steps=10, lr=1.0, warmup=2)
    assert f[:6] == [lr_factor(s, const) for s in range(6)]
    for bad in (0, 9):
        with pytest.raises(ValueError, match=r"wsd cooldown must be 1\.\.8"):
            TrainConfig(steps=10, warmup=2, schedule="wsd", cooldown=bad)


def test_stage_train_config_scales_the_cooldown_inside_the_run(tmp_path: Path):
    from segue.train.phases import stage_train_config
    from segue.train.recipe import Stage

    flf = {"first_last": 0.9, "first": 0.1}
    stage = Stage(name="s", steps=4000, lr=2e-4, modes=flf, warmup=100, cooldown=1000, min_lr_ratio=0.1)
    tc = stage_train_config(stage, 4000, 7, tmp_path)
    assert (tc.schedule, tc.cooldown, tc.min_lr_ratio, tc.warmup, tc.seed) == ("wsd", 1000, 0.1, 100, 7)
    assert stage_train_config(stage, 2000, 7, tmp_path).cooldown == 500  # --steps-scale 0.5
    assert stage_train_config(stage, 104, 7, tmp_path).cooldown == 4  # never into the warmup
    assert stage_train_config(stage, 100, 7, tmp_path).schedule == "constant"  # all warmup: nothing to cool
    plain = Stage(name="p", steps=500, lr=1e-3, modes=flf)
    assert stage_train_config(plain, 500, 0, tmp_path).schedule == "constant"


def _tiny_encoders():
    from segue.models.encoders import ImageEncoder, TextEncoder
    from segue.tokenizer import load_tokenizer, save_tiny_tokenizer

    return TextEncoder, ImageEncoder, load_tokenizer, save_tiny_tokenizer


def test_set_dropout_gives_a_training_text_encoder_its_inference_output(tmp_path: Path):
    from segue.train.flow import encode_captions, set_dropout

    TextEncoder, _, load_tokenizer, save_tiny_tokenizer = _tiny_encoders()
    save_tiny_tokenizer(tmp_path / "tok", CFG.text.vocab_size)
    torch.manual_seed(0)
    text = TextEncoder(CFG.text, load_tokenizer(tmp_path / "tok")).requires_grad_(True)
    caps = ["a red ball moves", "two blue squares"]
    with torch.no_grad():
        clean = encode_captions(text.eval(), caps, 16)
        noisy = encode_captions(text.train(), caps, 16)  # umT5's dropout (0.1) applies in train mode
        assert not torch.allclose(noisy, clean)
        assert set_dropout(text, 0.0) > 0
        again = encode_captions(text.train(), caps, 16)
        assert torch.equal(again, clean)  # the attention weights' dropout (a float rate in umT5) too
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got -0.1"):
        set_dropout(text, -0.1)


def test_flf2v_objective_trains_encoders_and_ignores_batch_split(tmp_path: Path):
    """The whole objective: per-sample draws make a split batch's weighted losses equal the whole batch's,
    and the jointly trained text and image encoders get gradients."""
    TextEncoder, ImageEncoder, load_tokenizer, save_tiny_tokenizer = _tiny_encoders()
    save_tiny_tokenizer(tmp_path / "tok", CFG.text.vocab_size)
    torch.manual_seed(0)
    # trainable, but in eval mode: umT5's dropout (0.1 in train mode) would draw from torch's RNG
    text = TextEncoder(CFG.text, load_tokenizer(tmp_path / "tok")).requires_grad_(True).eval()
    image = ImageEncoder(CFG.image).requires_grad_(True).eval()
    parts = {"dit": randomize_(WanDiT(CFG.dit), 1), "text": text, "image": image}
    obj = FLF2VObjective(
        randomize_(WanVAE(CFG.vae), 2).eval(),
        shift=3.0,
        modes={"first_last": 0.4, "first": 0.2, "none": 0.1, "random_subset": 0.3},
        caption_dropout=0.3,
    )
    batch = {
        "video": torch.rand(4, 3, 5, 16, 16) * 2 - 1,
        "caption": ["a red ball", "two blue squares move", "", "a cat"],
        "seed": torch.tensor([11, 12, 13, 14]),
    }
    loss = obj(parts, batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    for name in ("text", "image", "dit"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parts[name].parameters()), name
    with torch.no_grad():
        halves = [obj(parts, {k: v[s] for k, v in batch.items()}) for s in (slice(0, 2), slice(2, 4))]
        whole = obj(parts, batch)
    assert abs((halves[0] + halves[1]).item() / 2 - whole.item()) < 1e-5 * whole.item()
    assert abs(whole.item() - loss.item()) < 1e-5 * loss.item()


# -- exact resume ------------------------------------------------------------------------------------


class _LatentSet(torch.utils.data.Dataset):
    """A tiny fake dataset of pre-encoded samples (latent, conditioning, text and CLIP features)."""

    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(5)
        self.x0 = torch.randn(n, 16, 2, 4, 4, generator=g)
        self.y = torch.randn(n, 20, 2, 4, 4, generator=g)
        self.ctx = torch.randn(n, 4, CFG.dit.text_dim, generator=g)
        self.clip = torch.randn(n, CFG.dit.image_pos_len, CFG.dit.image_dim, generator=g)

    def __len__(self) -> int:
        return len(self.x0)

    def __getitem__(self, i: int) -> dict:
        return {"x0": self.x0[i], "y": self.y[i], "context": self.ctx[i], "clip": self.clip[i]}


def latent_loss(parts, batch) -> torch.Tensor:
    """dit_loss with per-sample noise and sigma from batch['seed'], plus a pinch of torch's global RNG (a
    dropout-like draw) so that resuming must restore the RNG state too."""
    gens = [torch.Generator().manual_seed(int(s)) for s in batch["seed"]]
    sigma = torch.cat([sample_sigmas(1, 3.0, g) for g in gens])
    noise = torch.stack([torch.randn(batch["x0"].shape[1:], generator=g) for g in gens])
    loss = dit_loss(parts["dit"], batch["x0"], batch["y"], batch["context"], batch["clip"], sigma, noise)
    return loss * (1 + 1e-3 * torch.rand(()))


def _train_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(
        steps=6, batch_size=4, lr=1e-3, weight_decay=0.01, warmup=2, schedule="cosine", grad_clip=0.5,
        ema_decay=0.8, log_every=2, ckpt_every=3, seed=7, adam_eps=1e-6, out_dir=str(out),
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _new_dit() -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(CFG.dit)


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"i": i}


def test_keep_together_shuffles_whole_blocks(tmp_path: Path):
    def order(keep: int) -> list[int]:
        seen: list[int] = []

        def loss(parts, batch):
            seen.extend(batch["i"].tolist())
            return (parts["w"].weight ** 2).sum()

        cfg = _train_cfg(tmp_path / str(keep), steps=6, batch_size=5, keep_together=keep, ckpt_every=100)
        Trainer({"w": torch.nn.Linear(1, 1)}, loss, _Items(10), cfg).run()
        return seen

    # 1 (the default): the item permutation of every run before the option
    g = torch.Generator().manual_seed(sample_seed(7, -1))
    assert order(1)[:10] == torch.randperm(10, generator=g).tolist()
    three = order(3)
    epochs = [three[:10], three[10:20], three[20:]]
    for epoch in epochs:
        runs: list[list[int]] = []
        for i in epoch:  # consecutive items of one block
            if runs and runs[-1][-1] // 3 == i // 3:
                runs[-1].append(i)
            else:
                runs.append([i])
        # every block once, whole and in order (the last one short), the blocks shuffled
        assert sorted(runs) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]], epoch
    assert epochs[0] != list(range(10)) and len({tuple(e) for e in epochs}) > 1
    with pytest.raises(ValueError, match="keep_together must be >= 1, got 0"):
        TrainConfig(keep_together=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(tmp_path: Path, workers: int):
    data = _LatentSet()
    straight = Trainer({"dit": _new_dit()}, latent_loss, data, _train_cfg(tmp_path / "a", num_workers=workers))
    losses_a = straight.run()

    first = Trainer({"dit": _new_dit()}, latent_loss, data, _train_cfg(tmp_path / "b", num_workers=workers))
    losses_b = first.run(stop_at=3)
    first.close()
    torch.manual_seed(123)  # the interruption scrambles the RNG; resuming must restore it
    np.random.seed(5)
    del first
    torch.manual_seed(99)
    resumed = Trainer({"dit": WanDiT(CFG.dit)}, latent_loss, data, _train_cfg(tmp_path / "b", num_workers=workers))
    losses_b += resumed.run()  # resumes from ckpt/step-00000003.pt

    assert losses_a == losses_b, (losses_a, losses_b)
    assert len(set(losses_a)) == 6
    for (name, p), (_, q) in zip(straight.parts["dit"].named_parameters(), resumed.parts["dit"].named_parameters()):
        assert torch.equal(p, q), name
    for n in straight.ema:
        assert torch.equal(straight.ema[n], resumed.ema[n]), n
    ema_a, ema_b = torch.load(tmp_path / "a" / "ema.pt"), torch.load(tmp_path / "b" / "ema.pt")
    assert all(torch.equal(ema_a["dit"][k], ema_b["dit"][k]) for k in ema_a["dit"])
    log = [json.loads(ln) for ln in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and [r["loss"] for r in log] == losses_a
    assert sorted(p.name for p in (tmp_path / "b" / "ckpt").glob("step-*.pt")) == [
        "step-00000003.pt",
        "step-00000006.pt",
    ]
    assert not list((tmp_path / "b" / "ckpt").glob(".*tmp*"))  # temp files renamed away


def test_latest_ema_reads_a_running_and_a_finished_run(tmp_path: Path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="neither ema.pt nor a checkpoint"):
        latest_ema(out)
    trainer = Trainer({"dit": _new_dit()}, latent_loss, _LatentSet(), _train_cfg(out))
    trainer.run(stop_at=3)  # stopped at the step-3 checkpoint: no ema.pt yet
    step, mid = latest_ema(out)
    assert step == 3 and not (out / "ema.pt").exists()
    want = trainer.ema_state_dicts()["dit"]
    assert mid["dit"].keys() == want.keys() and all(torch.equal(mid["dit"][k], want[k]) for k in want)
    trainer.run()
    step, final = latest_ema(out)
    assert step is None and all(torch.equal(final["dit"][k], trainer.ema_state_dicts()["dit"][k]) for k in want)
    assert not all(torch.equal(final["dit"][k], mid["dit"][k]) for k in want)


# -- distributed: 2 gloo processes vs one process -----------------------------------------------------


def _dist_run(out: Path, fsdp: bool, state) -> dict:
    trainer = Trainer({"dit": _new_dit()}, latent_loss, _LatentSet(), _train_cfg(out, steps=3, ckpt_every=2), state)
    losses = trainer.run()
    sharded = all(hasattr(p, "to_local") for p in trainer.parts["dit"].parameters())  # DTensors under FSDP
    model, ema = trainer.model_state_dicts()["dit"], trainer.ema_state_dicts()["dit"]
    return {"losses": losses, "model": model, "ema": ema, "sharded": sharded}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    rendezvous_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from segue.dist import init_data_parallel

    result: dict = {}
    try:
        for fsdp in (False, True):
            state = init_data_parallel(fsdp=fsdp, device="cpu")
            key = "fsdp" if fsdp else "dp"
            result[key] = _dist_run(Path(out_dir) / key, fsdp, state)
            if fsdp:
                # resume under FSDP from the step-2 checkpoint: the third step again, same result
                cfg = _train_cfg(Path(out_dir) / key, steps=3, ckpt_every=2)
                again = Trainer({"dit": _new_dit()}, latent_loss, _LatentSet(), cfg, state)
                again.load_checkpoint(Path(out_dir) / key / "ckpt" / "step-00000002.pt")
                result[key]["resumed"] = again.run()
                result[key]["resumed_model"] = again.model_state_dicts()["dit"]
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if dist.is_initialized():
        if "error" not in result:  # no rank tears gloo down while another still uses it (a rare SIGABRT)
            dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("dist")
    procs = start_workers(_worker, 2, str(out))
    single = _dist_run(out / "single", False, None)  # meanwhile: one process, the whole batch of 4
    alive = join_workers(procs, TIMEOUT_S)
    assert not alive, f"{len(alive)} worker(s) hung past {TIMEOUT_S}s"
    res = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    errors = [r["error"] for r in res if "error" in r]
    assert not errors, errors[0]
    return res, single


@pytest.mark.parametrize("kind", ["dp", "fsdp"])
def test_two_ranks_match_one_process(dist_results, kind: str):
    res, single = dist_results
    for r in res:
        got = r[kind]
        rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], single["losses"]))
        assert len(got["losses"]) == 3 and rel < 1e-6, rel
        for what in ("model", "ema"):
            diff = max((got[what][k] - single[what][k]).abs().max().item() for k in single[what])
            assert diff < 1e-5, (what, diff)
    assert res[0][kind]["losses"] == res[1][kind]["losses"]  # every rank logs the global loss
    assert res[0][kind]["sharded"] == (kind == "fsdp") and not single["sharded"]
    if kind == "fsdp":
        got = res[0]["fsdp"]
        assert got["resumed"] == got["losses"][2:]
        assert all(torch.equal(got["resumed_model"][k], got["model"][k]) for k in got["model"])


# -- VAE objective -----------------------------------------------------------------------------------


def test_kl_term():
    z = torch.zeros(2, 16, 3, 4, 4)
    assert kl_divergence(z, z).item() == 0.0
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        mu, logvar = torch.randn(2, 16, 3, 4, 4, generator=g), 3 * torch.randn(2, 16, 3, 4, 4, generator=g)
        assert kl_divergence(mu, logvar).item() > 0
    # closed form for one element: mu=1, var=e -> 0.5 * (1 + e - 1 - 1)
    assert abs(kl_divergence(torch.ones(1), torch.ones(1)).item() - 0.5 * (np.e - 1)) < 1e-6


def _waves() -> torch.Tensor:
    """Two smooth moving colour waves in [-0.8, 0.8], [2, 3, 5, 16, 16]: something a tiny VAE can learn."""
    t, yy, xx = (torch.linspace(a, 1, n).view(-1, *[1] * k) for a, n, k in ((0, 5, 2), (-1, 16, 1), (-1, 16, 0)))
    phase = torch.tensor([0.0, 2.0, 4.0]).view(3, 1, 1, 1)
    return torch.stack([0.8 * torch.sin(3 * xx + 2 * yy + 2 * t + phase + k) for k in (0, 1)])


def _tiny_vae_and_waves() -> tuple[WanVAE, torch.Tensor]:
    torch.manual_seed(0)
    return WanVAE(VAEConfig(dim=4, z_dim=4, latent_mean=(0.0,) * 4, latent_std=(1.0,) * 4)), _waves()


def _train_20_steps(vae: WanVAE, objective, video: torch.Tensor, out: Path) -> list[float]:
    data = [{"video": video[i]} for i in range(2)]
    tc = TrainConfig(steps=20, batch_size=2, lr=3e-3, grad_clip=1.0, ema_decay=0.9, out_dir=str(out))
    return Trainer({"vae": vae}, objective, data, tc).run()


def test_vae_loss_runs_the_causal_chunks_and_decreases(tmp_path: Path):
    vae, video = _tiny_vae_and_waves()  # video [2, 3, 5, 16, 16]
    # encode_moments is encode's chunked pass: its first z channels are the (unnormalised) mean
    with torch.no_grad():
        moments = vae.encode_moments(video)
        assert moments.shape == (2, 8, 2, 2, 2)
        assert torch.equal(moments[:, :4], vae.encode(video, normalize=False))
        loss, parts = vae_loss(vae, video, kl_weight=1e-3, noise=torch.zeros(2, 4, 2, 2, 2))
        mu = moments[:, :4]
        recon = vae.decode(mu, normalized=False, clamp=False)  # zero noise: the chunked decode of the mean
        assert torch.allclose(parts["recon"], (recon - video).abs().mean())
        assert parts["kl"] >= 0 and torch.allclose(loss, parts["recon"] + 1e-3 * parts["kl"])

    losses = _train_20_steps(vae, VAEObjective(kl_weight=1e-3), video, tmp_path)
    # measured: 0.515 -> 0.219 (means of the first and last three steps)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), (losses[:3], losses[-3:])


def test_decoder_fine_tuning_keeps_the_latent_space_and_lowers_the_loss(tmp_path: Path):
    vae, video = _tiny_vae_and_waves()  # video [2, 3, 5, 16, 16]
    with torch.no_grad():
        latents = vae.encode(video, normalize=False)
        before = {k: v.clone() for k, v in vae.state_dict().items()}
    freeze_encoder(vae)
    with pytest.raises(ValueError, match="recon must be"):
        DecoderObjective(recon="l2")
    losses = _train_20_steps(vae, DecoderObjective(recon="mse"), video, tmp_path)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), (losses[:3], losses[-3:])
    after = vae.state_dict()
    frozen = [k for k in after if k.startswith(("encoder.", "conv1."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(after["decoder.head.2.weight"], before["decoder.head.2.weight"])
    with torch.no_grad():
        assert torch.equal(vae.encode(video, normalize=False), latents)  # the DiT's latent space is unchanged


def test_decoder_endpoint_weight_is_a_weighted_mean_over_frames():
    vae, video = _tiny_vae_and_waves()  # video [2, 3, 5, 16, 16]
    with torch.no_grad():
        out = vae.decode(vae.encode(video, normalize=False), normalized=False, clamp=False)
        per_frame = (out - video).square().mean(dim=(0, 1, 3, 4))  # [5]
        plain = DecoderObjective()({"vae": vae}, {"video": video})
        weighted = DecoderObjective(endpoint_weight=4.0)({"vae": vae}, {"video": video})
    assert torch.allclose(plain, (out - video).square().mean())  # weight 1: the plain MSE
    w = torch.tensor([4.0, 1.0, 1.0, 1.0, 4.0])
    assert torch.allclose(weighted, (w * per_frame).sum() / w.sum())
    assert not torch.allclose(weighted, plain)
    with pytest.raises(ValueError, match="endpoint_weight must be > 0, got 0"):
        DecoderObjective(endpoint_weight=0.0)


def test_vae_loss_counts_the_keyframes_endpoint_weight_times():
    vae, video = _tiny_vae_and_waves()  # video [2, 3, 5, 16, 16]
    noise = torch.zeros(2, 4, 2, 2, 2)  # the posterior mean
    with torch.no_grad():
        out = vae.decode(vae.encode(video, normalize=False), normalized=False, clamp=False)
        per_frame = (out - video).abs().mean(dim=(0, 1, 3, 4))  # [5]
        plain, _ = vae_loss(vae, video, kl_weight=0.0, noise=noise)
        weighted, _ = vae_loss(vae, video, kl_weight=0.0, noise=noise, endpoint_weight=4.0)
        by_objective = VAEObjective(kl_weight=0.0, endpoint_weight=4.0)({"vae": vae}, {"video": video, "seed": [0, 0]})
    w = torch.tensor([4.0, 1.0, 1.0, 1.0, 4.0])
    assert torch.allclose(plain, per_frame.mean())  # weight 1: the plain mean
    assert torch.allclose(weighted, (w * per_frame).sum() / w.sum())
    assert torch.allclose(endpoint_weighted((out - video).abs(), 4.0), weighted)
    assert not torch.allclose(weighted, plain)
    # the objective draws its posterior noise from the seeds: close to the mean's loss, not equal
    assert abs(float(by_objective) - float(weighted)) < 0.05
    with pytest.raises(ValueError, match="endpoint_weight must be > 0, got 0"):
        VAEObjective(endpoint_weight=0.0)


def test_the_decoder_keeps_the_anchors_shapes_and_learns_the_scenery_from_the_true_frames():
    vae, _ = _tiny_vae_and_waves()
    anchor = WanVAE(vae.cfg)
    anchor.load_state_dict(vae.state_dict())
    anchor.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(1, 4, 2, 2, 2, generator=g)  # a generated latent, DiT-normalised
    with torch.no_grad():
        kept = anchor.decode(latent, clamp=False)  # [1, 3, 5, 16, 16]
    video = kept + 0.05 * torch.randn(kept.shape, generator=g)  # the true frames: near the anchor's scenery
    backdrop = kept.clone()  # the true scenery: what the anchor shows, but for one shape it adds at (2, 3..4, 5..6)
    backdrop[:, :, 2, 3:5, 5:7] -= 0.6
    objects = torch.zeros(1, 5, 16, 16, dtype=torch.bool)  # and one true shape the anchor does not show
    objects[0, 4, 10, 12] = True
    batch = {"latent": latent, "video": video, "backdrop": backdrop, "objects": objects}
    obj = DecoderObjective(endpoint_weight=2.0, anchor=anchor, anchor_threshold=0.25)
    target = obj.target(latent, video, backdrop, objects)
    shape = torch.zeros(5, 16, 16, dtype=torch.bool)
    shape[2, 2:6, 4:8] = True  # the anchor's shape and the pixel around it
    shape[4, 10, 12] = True
    assert torch.equal(target[0][:, shape], kept[0][:, shape])
    assert torch.equal(target[0][:, ~shape], video[0][:, ~shape])
    with torch.no_grad():
        # the decoder as it starts: no error on the shapes, the true frames' error on the scenery
        w = torch.tensor([2.0, 1.0, 1.0, 1.0, 2.0])
        scenery = torch.where(shape, 0.0, (kept - video).square()[0]).mean(dim=(0, 2, 3))  # [5]
        torch.testing.assert_close(obj({"vae": vae}, batch), (w * scenery).sum() / w.sum())
        # without the backdrop (or the anchor) it is the plain loss against the true frames
        plain = DecoderObjective(endpoint_weight=2.0)({"vae": vae}, batch)
        assert torch.equal(obj({"vae": vae}, {"latent": latent, "video": video}), plain)
        assert plain > obj({"vae": vae}, batch)
    with pytest.raises(ValueError, match="anchor_threshold must be > 0, got 0"):
        DecoderObjective(anchor_threshold=0.0)


def test_narrow_posterior_sets_the_log_variance_and_keeps_the_mean():
    cfg = VAEConfig(dim=4, z_dim=4, latent_mean=(0.0,) * 4, latent_std=(1.0,) * 4)
    torch.manual_seed(0)
    vae = WanVAE(cfg)
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        before = vae.encode_moments(video)
        assert before[:, 4:].abs().max() < 5  # default init: log-variance near 0, posterior noise std ~1
        narrow_posterior(vae, logvar=-8.0)
        after = vae.encode_moments(video)
    assert torch.equal(after[:, :4], before[:, :4])
    assert torch.equal(after[:, 4:], torch.full_like(after[:, 4:], -8.0))
