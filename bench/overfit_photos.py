"""The built-in VAE trained on the first ``--n`` training photos alone (whole 64x64 frames, first-frame path,
no EMA): whether the architecture can hold photos at all, scored on them and on the held-out photos.

    python -m bench.overfit_photos --n 4 --steps 250
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.vae_roundtrip import fitted_photo, load_vae, scores
from segue.data.photos import photo_names
from segue.loader import DEFAULT_MODEL
from segue.models.vae import WanVAE

ap = argparse.ArgumentParser()
ap.add_argument("--init", default="r25")
ap.add_argument("--n", type=int, default=4)
ap.add_argument("--steps", type=int, default=500)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--warmup", type=int, default=0)
ap.add_argument("--every", type=int, default=50)
a = ap.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
_, vae = load_vae(DEFAULT_MODEL)
if a.init == "random":
    vae = WanVAE(vae.cfg)
vae.train()
train = np.stack([fitted_photo(n, 64) for n in photo_names("train")[: a.n]])  # [N, 64, 64, 3] uint8?
held = np.stack([fitted_photo(n, 64) for n in photo_names("heldout")])
x = torch.from_numpy(train).float().div(127.5).sub(1).permute(0, 3, 1, 2).unsqueeze(2)  # [N,3,1,64,64]
opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, a.warmup)))
t0 = time.time()
for step in range(1, a.steps + 1):
    z = vae.encode(x, normalize=False)
    loss = F.mse_loss(vae.decode(z, normalized=False, clamp=False), x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % a.every == 0:
        vae.eval()
        tr = scores(vae, train)
        he = scores(vae, held)
        vae.train()
        print(
            step,
            f"loss {loss.item():.5f} ({10 * np.log10(4 / loss.item()):.2f} dB)",
            f"train {tr[0]:.2f}/{tr[2]:.2f}",
            f"held {he[0]:.2f}/{he[2]:.2f}",
            f"{time.time() - t0:.0f}s",
            flush=True,
        )
