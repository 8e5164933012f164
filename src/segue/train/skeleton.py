"""A VAE started from its skeleton: the first-frame path trained as a 2-D network on photo crops, then set
into a ``WanVAE`` exactly.

The skeleton is the VAE with every residual branch and attention at zero: the encoder's first conv, its
strided downsampling convs and the 1x1 shortcuts where the width changes, the heads' RMS norm and SiLU,
the decoder's nearest upsampling and its convs. On one frame a causal conv sees only its last time tap, so
the skeleton is a 2-D network: a step costs a small fraction of a VAE step on clips, and its code of photos
comes within 4 dB of the best linear code of 4x4 patches, where a VAE trained on clips stalls 9 dB below
(docs/broad-data.md).

``embed`` writes it into the last time tap of the VAE's convs, zeroes the residual branches' last convs and
the attention projections, makes the time downsamplers average each pair of frames and the time
upsamplers repeat each frame, gives the posterior a log-variance of -8 (``vae_loss.narrow_posterior``) and
the moments' 1x1 convs the identity. The VAE then decodes a first frame as the skeleton does, and every
frame of a still clip as its first: training on clips starts from there (``continuation``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import VAEConfig
from ..data.photo_crops import PhotoCrops
from ..models.vae import NearestUpsample2x, Resample, RMSNorm, WanVAE
from .trainer import TrainConfig, Trainer
from .vae_loss import detail_weighted_mse


class Skeleton(nn.Module):
    """The first-frame path of a ``WanVAE`` of ``cfg`` without residual branches: [B, 3, H, W] -> [B, 3, H, W].

    ``places`` maps each of its weighted layers ("encoder.4") to the VAE module it becomes."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.places: dict[str, str] = {}
        enc: list[nn.Module] = []

        def add(layers: list[nn.Module], part: str, layer: nn.Module, place: str | None = None) -> None:
            if place is not None:
                self.places[f"{part}.{len(layers)}"] = f"{part}.{place}"
            layers.append(layer)

        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        add(enc, "encoder", nn.Conv2d(3, dims[0], 3, padding=1), "conv1")
        block = 0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                if in_dim != out_dim:
                    add(enc, "encoder", nn.Conv2d(in_dim, out_dim, 1), f"downsamples.{block}.shortcut")
                in_dim, block = out_dim, block + 1
            if i < last:
                add(enc, "encoder", nn.ZeroPad2d((0, 1, 0, 1)))  # as ``Resample``: right and bottom only
                add(enc, "encoder", nn.Conv2d(out_dim, out_dim, 3, stride=2), f"downsamples.{block}.resample.1")
                block += 1
        add(enc, "encoder", RMSNorm(dims[-1], spatial_dims=2), "head.0")
        add(enc, "encoder", nn.SiLU())
        add(enc, "encoder", nn.Conv2d(dims[-1], cfg.z_dim, 3, padding=1), "head.2")

        dec: list[nn.Module] = []
        mult = cfg.dim_mult
        dims = [cfg.decoder_width * m for m in (mult[-1], *mult[::-1])]
        add(dec, "decoder", nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1), "conv1")
        block = 0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous upsampler halved the width
            for _ in range(cfg.num_res_blocks + 1):
                if in_dim != out_dim:
                    add(dec, "decoder", nn.Conv2d(in_dim, out_dim, 1), f"upsamples.{block}.shortcut")
                in_dim, block = out_dim, block + 1
            if i < last:
                add(dec, "decoder", NearestUpsample2x())
                add(dec, "decoder", nn.Conv2d(out_dim, out_dim // 2, 3, padding=1), f"upsamples.{block}.resample.1")
                block += 1
        add(dec, "decoder", RMSNorm(dims[-1], spatial_dims=2), "head.0")
        add(dec, "decoder", nn.SiLU())
        add(dec, "decoder", nn.Conv2d(dims[-1], 3, 3, padding=1), "head.2")
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, 3, H, W] -> latent [B, z, H/8, W/8] -> [B, 3, H, W]
        return self.decoder(self.encoder(x))


def _time_eye(conv: nn.Conv3d, taps: tuple[int, ...], value: float, repeat: int = 1) -> None:
    """``conv`` (a time conv [C * repeat, C, 3, 1, 1]): each of the ``repeat`` output copies of channel c is
    ``value`` times the sum of c at the time ``taps``."""
    conv.weight.zero_()
    conv.bias.zero_()
    c = conv.weight.shape[1]
    for r in range(repeat):
        for t in taps:
            conv.weight[r * c + torch.arange(c), torch.arange(c), t] = value


@torch.no_grad()
def embed(sk: Skeleton, vae: WanVAE, logvar: float = -8.0) -> None:
    """Write ``sk`` into ``vae`` (of the same config): see the module's docstring."""
    if sk.cfg != vae.cfg:
        raise ValueError("the skeleton and the VAE have different configs")
    z = vae.cfg.z_dim
    for name, m in vae.named_modules():
        if name.endswith(("residual.6", ".proj")):  # residual branches and attention add nothing
            m.weight.zero_()
            m.bias.zero_()
        elif isinstance(m, Resample) and m.mode == "downsample3d":
            _time_eye(m.time_conv, (1, 2), 0.5)  # [last of the previous pair, a, b] -> (a + b) / 2
        elif isinstance(m, Resample) and m.mode == "upsample3d":
            _time_eye(m.time_conv, (2,), 1.0, repeat=2)  # each frame twice
    for conv, n in ((vae.conv1, 2 * z), (vae.conv2, z)):
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[torch.arange(n), torch.arange(n)] = 1.0
    for src_name, dst_name in sk.places.items():
        src, dst = sk.get_submodule(src_name), vae.get_submodule(dst_name)
        if isinstance(src, RMSNorm):
            dst.gamma.copy_(src.gamma.reshape(dst.gamma.shape))
        elif isinstance(dst, nn.Conv3d):  # a causal conv: the last time tap alone sees the frame
            n = src.weight.shape[0]
            dst.weight.zero_()
            dst.weight[:n, :, -1] = src.weight
            dst.bias[:n] = src.bias
            if dst_name == "encoder.head.2":
                dst.bias[n:] = logvar  # the log-variance half of the moments
        else:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)


class SkeletonObjective:
    """Loss of one batch of ``PhotoCrops`` for ``Trainer``: ``detail_weighted_mse`` of the round trip."""

    def __init__(self, detail_weight: float) -> None:
        if detail_weight < 0:
            raise ValueError(f"detail_weight must be >= 0, got {detail_weight}")
        self.detail_weight = detail_weight

    def __call__(self, parts: dict[str, nn.Module], batch: dict[str, Tensor]) -> Tensor:
        sk = parts["skeleton"]
        x = batch["image"].to(sk.decoder[-1].weight.device)  # [B, 3, H, W]
        return detail_weighted_mse(sk(x) - x, self.detail_weight)


def train_skeleton(
    cfg: VAEConfig,
    run: Path,
    *,
    steps: int,
    lr: float,
    detail_weight: float,
    photos: str,
    recolour: float,
    seed: int,
    batch_size: int = 20,
    device: str | torch.device = "cpu",
) -> None:
    """Train a ``Skeleton`` of ``cfg`` into ``run`` (resumes from its checkpoints; its EMA weights end in
    ``run/ema.pt``) on ``PhotoCrops`` of ``photos`` (a fifth of them flat fields), Adam at ``lr`` with a
    cosine schedule to 0."""
    torch.manual_seed(seed)
    sk = Skeleton(cfg).to(device)
    data = PhotoCrops(photos, size=32, flat=0.2, recolour=recolour, seed=seed)
    tc = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=0, schedule="cosine", grad_clip=None,
                     ema_decay=0.999, ema_warmup=True, seed=seed, out_dir=str(run), ckpt_every=500)  # fmt: skip
    Trainer({"skeleton": sk}, SkeletonObjective(detail_weight), data, tc).run()


def skeleton_vae_state(cfg: VAEConfig, skeleton_state: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """The state of a ``WanVAE`` of ``cfg`` with the skeleton of ``skeleton_state`` set into it (``embed``).
    What the skeleton leaves (the residual branches' first convs, attention's qkv) keeps an init drawn from
    ``seed``, apart from torch's global random state: a resumed run gets the same state."""
    sk = Skeleton(cfg)
    sk.load_state_dict(skeleton_state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = WanVAE(cfg)
    embed(sk, vae)
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}
