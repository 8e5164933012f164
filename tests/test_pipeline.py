"""The generation recipe: its pieces against SPEC values, and the whole run against an oracle.

The oracle is the reference recipe written out independently here, on diffusers' WanTransformer3DModel
and AutoencoderKLWan, transformers' UMT5 and CLIP, and diffusers' UniPC with the reference sigma grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segue
from segue.errors import InputError
from segue.recipe import fit_last_frame, frame_mask, image_to_tensor, to_uint8
from segue.settings import fit_latent_size


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# -- recipe pieces ----------------------------------------------------------------------------------


def test_latent_size_matches_spec_examples():
    assert fit_latent_size(720, 1280, 1280 * 720) == (90, 160)  # 16:9 -> 720x1280
    assert fit_latent_size(512, 512, 1280 * 720) == (120, 120)  # square -> 960x960
    # floor of sqrt(399360 * 480/832) = 479.99...: the reference gives 464x832 here, not 480x832
    assert fit_latent_size(480, 832, 832 * 480) == (58, 104)


def test_frame_mask_values():
    m = frame_mask(81, 21, 2, 3, given=True)
    assert m.shape == (4, 21, 2, 3)
    assert torch.equal(m[:, 0], torch.ones(4, 2, 3))
    assert torch.equal(m[:, -1, 0, 0], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert m[:, 1:-1].abs().sum() == 0
    m = frame_mask(9, 3, 1, 1, given=False)
    assert m[:, 0].sum() == 4 and m[:, 1:].sum() == 0


def test_image_to_tensor_and_uint8_truncation():
    from PIL import Image

    img = Image.fromarray(np.array([[[0, 128, 255]]], dtype=np.uint8))
    t = image_to_tensor(img)
    assert torch.allclose(t[:, 0, 0], torch.tensor([-1.0, 128 / 255 * 2 - 1, 1.0]), atol=1e-6)
    # truncation, not rounding: 0.999 of a level stays below it
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0 * 100.999 / 255 - 1]).view(1, 4, 1, 1).expand(3, 4, 1, 1)
    assert to_uint8(x)[:, 0, 0, 0].tolist() == [0, 127, 255, 100]


def test_last_frame_is_scaled_to_cover_then_cropped():
    last = torch.zeros(3, 50, 100)
    last[:, :, 45:55] = 1.0  # a vertical bar in the middle
    out = fit_last_frame(last, 80, 80)
    assert out.shape == (3, 80, 80)
    # scaled by 1.6 (cover 80 rows), the 10-px bar becomes 16 px, still centred
    col = out[:, :, 40].mean(0)  # the bar covers column 40 top to bottom
    row = out.mean((0, 1))
    assert col.mean() > 0.9 and row[:20].abs().max() < 0.05
    same = torch.rand(3, 80, 80)
    assert fit_last_frame(same, 80, 80) is same


# -- the oracle -------------------------------------------------------------------------------------


def reference_sigmas(n: int, shift: float) -> np.ndarray:
    sigma_max = float(np.float32(0.999))
    s = np.linspace(sigma_max, 0, n + 1)[:-1]
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def oracle_video(ckpt, first, last, prompt, negative, frames, max_area, steps, shift, guidance, seed, guided=None):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

    dit = WanTransformer3DModel.from_pretrained(ckpt / "transformer").eval()
    vae = AutoencoderKLWan.from_pretrained(ckpt / "vae").eval()
    t5 = UMT5EncoderModel.from_pretrained(ckpt / "text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    clip = CLIPVisionModel.from_pretrained(ckpt / "image_encoder").eval()

    def text(p):
        enc = tok([p], padding="max_length", truncation=True, max_length=512, return_tensors="pt")
        n = int(enc.attention_mask.sum())
        out = t5(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state[0, :n]
        return torch.cat([out, out.new_zeros(512 - n, out.shape[1])])[None]

    def tensor(img):
        a = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255
        return (a - 0.5) / 0.5

    f, l = tensor(first), tensor(last)
    h0, w0 = f.shape[1:]
    ar = h0 / w0
    lat_h = round(np.sqrt(max_area * ar) // 8 // 2 * 2)
    lat_w = round(np.sqrt(max_area / ar) // 8 // 2 * 2)
    h, w, lat_t = lat_h * 8, lat_w * 8, (frames - 1) // 4 + 1
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(16, lat_t, lat_h, lat_w, dtype=torch.float32, generator=g)
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:-1] = 0
    msk = torch.cat([msk[:, :1].repeat(1, 4, 1, 1), msk[:, 1:]], 1).view(1, lat_t, 4, lat_h, lat_w)
    msk = msk.transpose(1, 2)[0]
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)

    px = torch.cat([F.interpolate(u[None], size=(224, 224), mode="bicubic", align_corners=False) for u in (f, l)])
    px = px * 0.5 + 0.5
    cm = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    cs = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    # diffusers takes the frames' features as a batch of 2 and regroups them to [1, 514, D] itself
    img_ctx = clip((px - cm) / cs, output_hidden_states=True).hidden_states[-2]

    cond = torch.cat(
        [F.interpolate(f[None], size=(h, w), mode="bicubic").transpose(0, 1), torch.zeros(3, frames - 2, h, w),
         F.interpolate(l[None], size=(h, w), mode="bicubic").transpose(0, 1)], 1)  # fmt: skip
    mu = vae.encode(cond[None]).latent_dist.mode()
    y = torch.cat([msk[None], (mu - mean) * inv_std], 1)
    ctx, ctx_neg = text(prompt), text(negative)

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                    solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                                    final_sigmas_type="zero")  # fmt: skip
    sched.set_timesteps(steps)
    s = reference_sigmas(steps, shift)
    sched.timesteps = torch.from_numpy(s * 1000).to(torch.int64)
    sched.sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    sched.set_begin_index(0)
    x = noise[None]
    for i, t in enumerate(sched.timesteps):
        inp = torch.cat([x, y], 1)
        vc = dit(inp, t[None], ctx, img_ctx, return_dict=False)[0]
        vu = dit(inp, t[None], ctx_neg, img_ctx, return_dict=False)[0]
        g = guidance if guided is None or i < guided else 1.0  # ``guided``: guidance on the first steps only
        x = sched.step(vu + g * (vc - vu), t, x, return_dict=False)[0]
    video = vae.decode(x / inv_std + mean, return_dict=False)[0][0].clamp(-1, 1)
    return x[0], ((video + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()


ARGS = dict(prompt="a red ball rolls to the right", negative="blurry", frames=9, max_area=64 * 64, steps=4,
            shift=5.0, guidance=5.0, seed=42)  # fmt: skip


@pytest.fixture(scope="module")
def oracle(diffusers_ckpt, frames_dir):
    from PIL import Image

    first, last = Image.open(frames_dir / "first.png"), Image.open(frames_dir / "last.png")
    return oracle_video(diffusers_ckpt, first, last, **ARGS)


def _run(ckpt, frames_dir, **over):
    pipe = segue.load(ckpt)
    a = {**ARGS, **over}
    return pipe.generate(
        frames_dir / "first.png", frames_dir / "last.png", a["prompt"], negative_prompt=a["negative"],
        frames=a["frames"], max_area=a["max_area"], steps=a["steps"], shift=a["shift"], guidance=a["guidance"],
        seed=a["seed"], guidance_steps=a.get("guidance_steps"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def ours_official(official_ckpt, frames_dir):
    return _run(official_ckpt, frames_dir)


@pytest.fixture(scope="module")
def ours_diffusers(diffusers_ckpt, frames_dir):
    return _run(diffusers_ckpt, frames_dir)


def test_video_matches_reference_oracle(oracle, ours_diffusers):
    latent_ref, frames_ref = oracle
    rel = float((ours_diffusers.latent - latent_ref).norm() / latent_ref.norm())
    assert ours_diffusers.frames.shape == frames_ref.shape == (9, 48, 64, 3)
    p = psnr(ours_diffusers.frames, frames_ref)
    same = float(np.mean(ours_diffusers.frames == frames_ref))
    print(f"\noracle parity: latent rel err {rel:.2e}, PSNR {p:.1f} dB, identical pixels {same:.2%}")
    assert rel < 1e-5, f"final latent relative error {rel:.2e}"
    assert p > 40


def test_guidance_on_the_first_steps_only_matches_the_oracle(diffusers_ckpt, frames_dir, ours_diffusers):
    from PIL import Image

    first, last = Image.open(frames_dir / "first.png"), Image.open(frames_dir / "last.png")
    latent_ref, _ = oracle_video(diffusers_ckpt, first, last, **ARGS, guided=2)  # guided steps 0, 1 of 4
    ours = _run(diffusers_ckpt, frames_dir, guidance_steps=2)
    rel = float((ours.latent - latent_ref).norm() / latent_ref.norm())
    assert rel < 1e-5, f"final latent relative error {rel:.2e}"
    assert not torch.allclose(ours.latent, ours_diffusers.latent, rtol=0, atol=1e-3)  # it did change the video
    assert ours.info["settings"]["guidance_steps"] == 2
    # as many guided steps as there are steps: every step guided, the plain run
    assert torch.equal(_run(diffusers_ckpt, frames_dir, guidance_steps=4).latent, ours_diffusers.latent)
    with pytest.raises(InputError, match=r"guidance_steps must be an integer in \[1, 1000\], got 0"):
        _run(diffusers_ckpt, frames_dir, guidance_steps=0)


def test_both_layouts_give_the_same_video(ours_official, ours_diffusers):
    assert np.array_equal(ours_official.frames, ours_diffusers.frames)
    assert torch.equal(ours_official.latent, ours_diffusers.latent)


def test_same_seed_same_video_other_seed_differs(official_ckpt, frames_dir, ours_official):
    again = _run(official_ckpt, frames_dir)
    assert np.array_equal(again.frames, ours_official.frames)
    other = _run(official_ckpt, frames_dir, seed=7)
    assert not np.array_equal(other.frames, ours_official.frames)


def test_first_frame_only_with_i2v_model(i2v_ckpt, frames_dir):
    pipe = segue.load(i2v_ckpt)
    assert pipe.config.dit.model_type == "i2v"
    v = pipe.generate(frames_dir / "first.png", None, "a ball", frames=5, steps=2, seed=1)
    assert v.frames.shape == (5, 48, 64, 3)


def test_any_4n_plus_1_frame_count_and_explicit_size(official_ckpt, frames_dir):
    pipe = segue.load(official_ckpt)
    v = pipe.generate(frames_dir / "first.png", frames_dir / "tall.png", "x", frames=13, steps=1, size=(48, 32))
    assert v.frames.shape == (13, 32, 48, 3)


def test_guidance_steps_default_is_validated_and_kept_in_the_config():
    from segue.config import GenerationDefaults, ModelConfig, get_config

    with pytest.raises(ValueError, match="default guidance_steps must be >= 1 or None, got 0"):
        GenerationDefaults(frames=17, guidance_steps=0)
    cfg = get_config("flf2v-14b")
    assert cfg.defaults.guidance_steps is None  # the reference guides every step
    d = cfg.to_dict()
    d["defaults"]["guidance_steps"] = 1
    assert ModelConfig.from_dict(d).defaults.guidance_steps == 1
    del d["defaults"]["guidance_steps"]  # a bundle written before the field existed
    assert ModelConfig.from_dict(d).defaults.guidance_steps is None
